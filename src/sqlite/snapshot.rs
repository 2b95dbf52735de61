//! Consistent snapshots of a live SQLite database.
//!
//! Every page is read through SQLite's own pager (the `sqlite_dbpage`
//! virtual table) inside one read transaction, so the snapshot is exactly
//! the database as of one commit, whatever other processes write meanwhile,
//! in WAL or rollback-journal mode. It is never a copy of the file, which
//! would tear under a concurrent writer and miss the WAL.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, Result};

/// What a snapshot saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub page_size: u32,
    pub page_count: u64,
}

fn source_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Source {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Opens a source database after checking that it exists and is SQLite.
pub fn open_source(path: &Path) -> Result<Connection> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            source_err(
                path,
                "the database file does not exist: check [source] path in the policy",
            )
        } else {
            source_err(
                path,
                format!(
                    "cannot read the database file: {}",
                    crate::error::io_reason(&e)
                ),
            )
        }
    })?;
    if !meta.is_file() {
        return Err(source_err(
            path,
            "is not a regular file: [source] path must name the database file",
        ));
    }
    if meta.len() == 0 {
        return Err(source_err(
            path,
            "the database file is empty: there is nothing to back up yet",
        ));
    }
    // The header is checked through SQLite, never by opening the file
    // ourselves: closing any descriptor of a file drops every POSIX lock
    // this process holds on it, including a streamer's read lock.
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| source_err(path, format!("cannot open: {e}")))?;
    conn.busy_handler(Some(wait_for_lock))
        .map_err(|e| source_err(path, format!("cannot set a busy handler: {e}")))?;
    conn.query_row("PRAGMA schema_version", [], |_| Ok(()))
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => source_err(
                path,
                "is not a SQLite database (its header does not start with \"SQLite format 3\")",
            ),
            _ => sql_error(path, "cannot read the database", e),
        })?;
    Ok(conn)
}

/// How long dr waits for a lock another connection holds on the source.
const LOCK_WAIT: Duration = Duration::from_secs(30);
const LOCK_POLL: Duration = Duration::from_millis(50);

/// SQLite's busy handler: waits up to [`LOCK_WAIT`], saying so after a second.
fn wait_for_lock(tries: i32) -> bool {
    let tries = u32::try_from(tries).unwrap_or(0);
    if tries == 20 {
        tracing::warn!(
            "the database is locked by another connection (an exclusive transaction, or locking_mode = EXCLUSIVE): waiting up to {} s",
            LOCK_WAIT.as_secs()
        );
    }
    if LOCK_POLL * tries >= LOCK_WAIT {
        return false;
    }
    std::thread::sleep(LOCK_POLL);
    true
}

/// A SQLite error on the source, naming a lock that outlasted the wait.
fn sql_error(path: &Path, doing: &str, e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy) | Some(rusqlite::ErrorCode::DatabaseLocked) => {
            source_err(
                path,
                format!(
                    "{doing}: another connection held a lock on it for {} s (an exclusive transaction, or locking_mode = EXCLUSIVE): retry when the application releases it",
                    LOCK_WAIT.as_secs()
                ),
            )
        }
        _ => source_err(path, format!("{doing}: {e}")),
    }
}

/// Reads every page of the database inside one read transaction, calling
/// `each(snapshot, pgno, page)` in page order; `snapshot` (page size and
/// count) is fixed from the first call on. A connection already inside a
/// read transaction (a WAL pin) is read as it stands and left in it.
pub fn read_pages(
    conn: &mut Connection,
    path: &Path,
    each: impl FnMut(&Snapshot, u32, &[u8]) -> Result<()>,
) -> Result<Snapshot> {
    let sqlerr = |e: rusqlite::Error| sql_error(path, "reading the snapshot failed", e);
    if !conn.is_autocommit() {
        return read_in(conn, path, each);
    }
    let tx = conn.transaction().map_err(sqlerr)?;
    let snapshot = read_in(&tx, path, each)?;
    tx.commit().map_err(sqlerr)?;
    Ok(snapshot)
}

fn read_in(
    tx: &Connection,
    path: &Path,
    mut each: impl FnMut(&Snapshot, u32, &[u8]) -> Result<()>,
) -> Result<Snapshot> {
    let sqlerr = |e: rusqlite::Error| sql_error(path, "reading the snapshot failed", e);
    // The first read starts the snapshot; everything after sees the same commit.
    let page_size: u32 = tx
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(sqlerr)?;
    let page_count: i64 = tx
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .map_err(sqlerr)?;
    let page_count = u64::try_from(page_count).unwrap_or(0);
    if page_count == 0 {
        return Err(source_err(
            path,
            "the database has no pages: there is nothing to back up yet",
        ));
    }
    let snapshot = Snapshot {
        page_size,
        page_count,
    };
    {
        let mut stmt = tx
            .prepare("SELECT pgno, data FROM sqlite_dbpage('main') ORDER BY pgno")
            .map_err(|e| {
                source_err(
                    path,
                    format!("this dr was built without SQLite's dbpage support ({e}); build with the repository's .cargo/config.toml"),
                )
            })?;
        let mut rows = stmt.query([]).map_err(sqlerr)?;
        let mut seen: u64 = 0;
        while let Some(row) = rows.next().map_err(sqlerr)? {
            let pgno: u32 = row.get(0).map_err(sqlerr)?;
            let data = row
                .get_ref(1)
                .map_err(sqlerr)?
                .as_blob()
                .map_err(|e| sqlerr(e.into()))?;
            each(&snapshot, pgno, data)?;
            seen += 1;
        }
        if seen != page_count {
            return Err(source_err(
                path,
                format!("snapshot read {seen} pages but the database has {page_count}"),
            ));
        }
    }
    Ok(snapshot)
}

/// The database's journal mode (`wal`, `delete`, ...), for messages and checks.
pub fn journal_mode(conn: &Connection) -> Result<String> {
    conn.query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0))
        .map_err(|e| Error::Other(format!("cannot read journal_mode: {e}")))
}

/// The database's page size now (a `VACUUM` after `PRAGMA page_size` changes it).
pub fn page_size(conn: &Connection) -> Result<u32> {
    conn.query_row("PRAGMA page_size", [], |r| r.get::<_, u32>(0))
        .map_err(|e| Error::Other(format!("cannot read page_size: {e}")))
}
