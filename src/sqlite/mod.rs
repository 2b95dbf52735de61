//! SQLite as a source: consistent page snapshots, page-hash indexes for
//! diffs, and putting pages back into a file.

pub mod apply;
pub mod frame_apply;
pub mod live;
pub mod pages;
pub mod pin;
pub mod segment;
pub mod snapshot;
pub mod stream;
pub mod wal;

pub use pages::{IndexReader, IndexWriter, PageReader, PageWriter};
pub use snapshot::{Snapshot, open_source};

use std::path::Path;

use crate::error::{Error, Result};

/// Runs `PRAGMA quick_check` on a live database (one that may have a
/// `-wal` beside it: a copy `dr follow` kept), read-only.
pub fn quick_check(path: &Path) -> Result<()> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| Error::Other(format!("cannot open {}: {e}", path.display())))?;
    let found: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| Error::Other(format!("{}: quick_check: {e}", path.display())))?;
    if found != "ok" {
        return Err(Error::Integrity {
            object: path.display().to_string(),
            reason: format!("quick_check: {found}"),
        });
    }
    Ok(())
}

/// Runs `PRAGMA integrity_check` on a restored file (nothing else may have it
/// open) and fails with SQLite's own findings.
pub fn integrity_check(path: &Path) -> Result<()> {
    check_restored(path, "integrity_check")
}

/// `PRAGMA quick_check` on a restored file: the b-trees' structure and
/// records, without matching each index against its table (a fifth of
/// `integrity_check`'s time on a database with one index): what a restore
/// runs when a drill already ran `integrity_check` on the same backup.
pub fn quick_check_restored(path: &Path) -> Result<()> {
    check_restored(path, "quick_check")
}

fn check_restored(path: &Path, pragma: &str) -> Result<()> {
    // `immutable=1`: the file is complete and private to dr, so SQLite reads it
    // as it is, with no locks and no -wal/-shm created beside it.
    let escaped = path
        .to_string_lossy()
        .replace('%', "%25")
        .replace('?', "%3f")
        .replace('#', "%23");
    let conn = rusqlite::Connection::open_with_flags(
        format!("file:{escaped}?immutable=1"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
            | rusqlite::OpenFlags::SQLITE_OPEN_URI
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::Source {
        path: path.to_path_buf(),
        reason: format!("cannot open the restored database: {e}"),
    })?;
    let mut stmt = conn
        .prepare(&format!("PRAGMA {pragma}"))
        .map_err(|e| Error::Integrity {
            object: path.display().to_string(),
            reason: format!("{pragma} could not run: {e}"),
        })?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|it| it.collect())
        .map_err(|e| Error::Integrity {
            object: path.display().to_string(),
            reason: format!("{pragma} failed: {e}"),
        })?;
    if rows.len() == 1 && rows[0] == "ok" {
        Ok(())
    } else {
        Err(Error::Integrity {
            object: path.display().to_string(),
            reason: format!(
                "PRAGMA {pragma}: {}",
                rows.into_iter().take(5).collect::<Vec<_>>().join("; ")
            ),
        })
    }
}
