//! Pinning a WAL database at a known position.
//!
//! A read transaction keeps SQLite from restarting the WAL under it, so the
//! frames after its snapshot stay in the file until dr has copied them. To
//! know exactly which frame a snapshot ends at, the read transaction is
//! started while dr briefly holds the database's write lock (the "gate"):
//! no commit can land between starting the snapshot and scanning the WAL
//! to its last commit. The gate is held for a scan of the frames written
//! since the last look, never for a copy of the database.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::config::DbConfig;

use super::wal::{self, Cursor};
use crate::error::{Error, Result};

fn source_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Source {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The file SQLite really opens for `db`: every symbolic link resolved, as
/// SQLite's unix VFS does before it names the `-wal` and `-shm` files. A
/// database given through a link (a release directory, a volume) has its
/// WAL beside the file the link points to, not beside the link. A path
/// that cannot be resolved (absent) is returned as given.
pub fn real_path(db: &Path) -> PathBuf {
    std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf())
}

/// The `-wal` file of a database, beside the file SQLite really opens.
pub fn wal_path(db: &Path) -> PathBuf {
    let mut p = real_path(db).into_os_string();
    p.push("-wal");
    PathBuf::from(p)
}

/// Opens a connection that reads the source and never checkpoints or
/// removes the WAL when it closes (that would reset the log behind the
/// streamer's back).
pub fn open(db: &Path) -> Result<Connection> {
    let conn = super::open_source(db)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(|e| source_err(db, format!("cannot configure the connection: {e}")))?;
    let mode = super::snapshot::journal_mode(&conn)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(source_err(
            db,
            format!(
                "the database is in journal_mode={mode}, not WAL: WAL streaming needs the application to run `PRAGMA journal_mode=WAL` once (it persists), or set [wal] enabled = false in the policy"
            ),
        ));
    }
    Ok(conn)
}

/// Starts a read transaction that holds a snapshot (and a WAL read mark).
pub fn begin_read(conn: &Connection, db: &Path) -> Result<()> {
    conn.execute_batch("BEGIN DEFERRED")
        .and_then(|_| conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())))
        .map_err(|e| source_err(db, format!("cannot start a read transaction: {e}")))
}

/// Ends the read transaction started by [`begin_read`].
pub fn end_read(conn: &Connection, db: &Path) -> Result<()> {
    conn.execute_batch("COMMIT")
        .map_err(|e| source_err(db, format!("cannot end the read transaction: {e}")))
}

/// Runs a PASSIVE checkpoint (never blocks the application): returns
/// whether every frame of the WAL is now in the database file.
pub fn checkpoint_passive(conn: &Connection, db: &Path) -> Result<bool> {
    let (busy, log, done): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(|e| source_err(db, format!("checkpoint failed: {e}")))?;
    Ok(busy == 0 && log >= 0 && log == done)
}

/// Holds the database's write lock while `f` runs.
#[derive(Debug)]
pub struct Gate {
    conn: Connection,
    db: PathBuf,
}

impl Gate {
    pub fn open(db: &Path) -> Result<Self> {
        let conn = open(db)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(|e| source_err(db, format!("cannot set busy timeout: {e}")))?;
        Ok(Gate {
            conn,
            db: db.to_path_buf(),
        })
    }

    /// A PASSIVE checkpoint from the gate's own connection (not holding the lock).
    pub fn checkpoint(&self) -> Result<bool> {
        checkpoint_passive(&self.conn, &self.db)
    }

    /// Runs `f` with no commit able to land; the application's writers wait
    /// on their busy timeout meanwhile, as for a checkpoint.
    pub fn hold<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| {
            source_err(
                &self.db,
                format!("cannot take the write lock to pin the WAL (is a transaction holding it for over 10 s?): {e}"),
            )
        })?;
        let out = f();
        let released = self.conn.execute_batch("ROLLBACK");
        let out = out?;
        released
            .map_err(|e| source_err(&self.db, format!("cannot release the write lock: {e}")))?;
        Ok(out)
    }
}

/// The WAL's current incarnation scanned to its last commit, or `None`
/// when the file has no valid header (absent or just truncated).
pub fn wal_end(db: &Path) -> Result<Option<Cursor>> {
    let p = wal_path(db);
    let f = match File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot open {}", p.display()), e)),
    };
    let read = |e| Error::io(format!("cannot read {}", p.display()), e);
    let Some(h) = wal::read_header(&f).map_err(read)? else {
        return Ok(None);
    };
    let mut cur = Cursor::start(h);
    if let Some(t) = wal::scan(&f, &cur).map_err(read)?.last() {
        cur.frame = t.last;
        cur.checksum = t.checksum;
    }
    Ok(Some(cur))
}

/// A read transaction on `db` with the exact WAL position of its snapshot.
pub fn pin(db: &Path) -> Result<(Connection, Option<Cursor>)> {
    let conn = open(db)?;
    let gate = Gate::open(db)?;
    let cur = gate.hold(|| {
        begin_read(&conn, db)?;
        wal_end(db)
    })?;
    Ok((conn, cur))
}
