//! Run history in `state_dir/history.db` (SQLite): what the daemon did,
//! for catch-up after downtime, `/healthz`, `/metrics` and `dr info`.

use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};

/// One finished run of a job on a target.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub policy: String,
    pub target: String,
    /// `full`, `diff` or `verify`.
    pub kind: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub ok: bool,
    pub error: Option<String>,
    pub label: Option<String>,
    pub size: u64,
}

impl Run {
    /// A run of `kind` on `target` that started at `started` and ends now:
    /// `outcome` is its label and stored size, or why it failed.
    pub fn ended(
        policy: &str,
        target: &str,
        kind: &str,
        started: DateTime<Utc>,
        outcome: std::result::Result<(&str, u64), String>,
    ) -> Run {
        Run {
            policy: policy.to_string(),
            target: target.to_string(),
            kind: kind.to_string(),
            started,
            finished: Utc::now(),
            ok: outcome.is_ok(),
            label: outcome.as_ref().ok().map(|(l, _)| l.to_string()),
            size: outcome.as_ref().map_or(0, |(_, s)| *s),
            error: outcome.err(),
        }
    }
}

/// The columns [`run_of`] reads, in its order.
const RUN_COLUMNS: &str = "kind, started, finished, ok, error, label, size";

/// A run of `policy` on `target` from a row of [`RUN_COLUMNS`].
fn run_of(policy: &str, target: &str, row: &rusqlite::Row<'_>) -> rusqlite::Result<Run> {
    let t = |s: String| {
        DateTime::parse_from_rfc3339(&s)
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default()
    };
    Ok(Run {
        policy: policy.to_string(),
        target: target.to_string(),
        kind: row.get(0)?,
        started: t(row.get(1)?),
        finished: t(row.get(2)?),
        ok: row.get(3)?,
        error: row.get(4)?,
        label: row.get(5)?,
        size: row.get::<_, i64>(6)? as u64,
    })
}

/// The history database.
#[derive(Debug)]
pub struct History {
    conn: Connection,
}

/// How long opening the history waits for another process's lock.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `f` again while SQLite answers busy or locked, until `deadline`.
fn until_not_busy(
    deadline: std::time::Instant,
    mut f: impl FnMut() -> rusqlite::Result<()>,
) -> Result<()> {
    loop {
        match f() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r.map_err(db_err),
        }
    }
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::Other(format!("run history: {e}"))
}

impl History {
    pub fn open(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io(format!("cannot create {}", state_dir.display()), e))?;
        let conn = Connection::open(state_dir.join("history.db")).map_err(db_err)?;
        // Two processes opening a new file at once (the daemon starting
        // while a `dr info` runs) both write the schema. SQLite answers one
        // of them "locked" at once, without waiting, when a reader's upgrade
        // to writer would deadlock; so the schema is written under BEGIN
        // IMMEDIATE (the write lock first, which the busy timeout waits
        // for), and a busy answer is tried again until the deadline.
        conn.busy_timeout(BUSY_WAIT).map_err(db_err)?;
        let deadline = std::time::Instant::now() + BUSY_WAIT;
        until_not_busy(deadline, || conn.execute_batch("PRAGMA journal_mode=WAL"))?;
        until_not_busy(deadline, || {
            conn.execute_batch(
                "BEGIN IMMEDIATE;
                 CREATE TABLE IF NOT EXISTS runs(
                   policy TEXT NOT NULL, target TEXT NOT NULL, kind TEXT NOT NULL,
                   started TEXT NOT NULL, finished TEXT NOT NULL, ok INTEGER NOT NULL,
                   error TEXT, label TEXT, size INTEGER NOT NULL DEFAULT 0);
                 CREATE INDEX IF NOT EXISTS runs_by_job ON runs(policy, target, kind, finished);
                 COMMIT;",
            )
            .inspect_err(|_| {
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
            })
        })?;
        Ok(History { conn })
    }

    pub fn record(&self, r: &Run) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO runs(policy, target, kind, started, finished, ok, error, label, size)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    r.policy,
                    r.target,
                    r.kind,
                    r.started.to_rfc3339(),
                    r.finished.to_rfc3339(),
                    r.ok,
                    r.error,
                    r.label,
                    r.size as i64
                ],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// Records `r` unless a run of the same job on the same target that
    /// finished at the same instant is recorded already (a drill read
    /// from the target again). Whether it was new.
    pub fn record_once(&self, r: &Run) -> Result<bool> {
        let seen: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM runs WHERE policy = ?1 AND target = ?2 AND kind = ?3 AND finished = ?4",
                params![r.policy, r.target, r.kind, r.finished.to_rfc3339()],
                |row| row.get(0),
            )
            .map_err(db_err)?;
        if seen > 0 {
            return Ok(false);
        }
        self.record(r)?;
        Ok(true)
    }

    /// When the first successful run of any of `kinds` on a target finished.
    pub fn first_success(
        &self,
        policy: &str,
        target: &str,
        kinds: &[&str],
    ) -> Result<Option<DateTime<Utc>>> {
        let mut first: Option<DateTime<Utc>> = None;
        for kind in kinds {
            let t: Option<String> = self
                .conn
                .query_row(
                    "SELECT min(finished) FROM runs WHERE policy = ?1 AND target = ?2 AND kind = ?3 AND ok = 1",
                    params![policy, target, kind],
                    |row| row.get(0),
                )
                .map_err(db_err)?;
            if let Some(t) = t.and_then(|t| DateTime::parse_from_rfc3339(&t).ok()) {
                let t = t.with_timezone(&Utc);
                first = Some(first.map_or(t, |f| f.min(t)));
            }
        }
        Ok(first)
    }

    /// The newest run of a job on a target that succeeded (`ok`) or failed.
    /// One query on the index, kept apart from [`Self::recent`]'s: it is
    /// asked several times per database at every scrape.
    pub fn last(&self, policy: &str, target: &str, kind: &str, ok: bool) -> Result<Option<Run>> {
        self.conn
            .query_row(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs
                     WHERE policy = ?1 AND target = ?2 AND kind = ?3 AND ok = ?4
                     ORDER BY finished DESC LIMIT 1"
                ),
                params![policy, target, kind, ok],
                |row| run_of(policy, target, row),
            )
            .optional()
            .map_err(db_err)
    }

    /// The newest `limit` runs of one policy on one target of `kinds` that
    /// succeeded (`ok`) or failed, newest first: the status page's charts
    /// and its list of recent failures.
    pub fn recent(
        &self,
        policy: &str,
        target: &str,
        kinds: &[&str],
        ok: bool,
        limit: u32,
    ) -> Result<Vec<Run>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {RUN_COLUMNS} FROM runs
                 WHERE policy = ?1 AND target = ?2 AND ok = ?3
                   AND kind IN (SELECT value FROM json_each(?4))
                 ORDER BY finished DESC LIMIT ?5"
            ))
            .map_err(db_err)?;
        let kinds = serde_json::to_string(kinds).map_err(|e| Error::Other(e.to_string()))?;
        let rows = stmt
            .query_map(params![policy, target, ok, kinds, limit], |row| {
                run_of(policy, target, row)
            })
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<Vec<Run>>>().map_err(db_err)
    }

    /// How many runs of one job on one target succeeded and failed.
    pub fn counts(&self, policy: &str, target: &str, kind: &str) -> Result<(u64, u64)> {
        self.conn
            .query_row(
                "SELECT coalesce(sum(ok), 0), count(*) - coalesce(sum(ok), 0) FROM runs
                 WHERE policy = ?1 AND target = ?2 AND kind = ?3",
                params![policy, target, kind],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon starting while `dr info` runs: every opener of a new
    /// history gets it, none is told "database is locked".
    #[test]
    fn openers_racing_on_a_new_file_all_succeed() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().expect("tmp");
            let go = std::sync::Arc::new(std::sync::Barrier::new(4));
            let openers: Vec<_> = (0..4)
                .map(|_| {
                    let (path, go) = (dir.path().to_path_buf(), go.clone());
                    std::thread::spawn(move || {
                        go.wait();
                        History::open(&path).map(|_| ())
                    })
                })
                .collect();
            for o in openers {
                o.join().expect("thread").expect("open");
            }
        }
    }

    #[test]
    fn keeps_the_newest_success_and_failure_per_job() {
        let dir = tempfile::tempdir().expect("tmp");
        let h = History::open(dir.path()).expect("open");
        let t = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).expect("t");
        for (i, ok) in [(0, true), (10, false), (20, true)] {
            h.record(&Run {
                policy: "app".into(),
                target: "local".into(),
                kind: "diff".into(),
                started: t(i),
                finished: t(i + 1),
                ok,
                error: (!ok).then(|| "boom".to_string()),
                label: None,
                size: 5,
            })
            .expect("record");
        }
        let ok = h
            .last("app", "local", "diff", true)
            .expect("q")
            .expect("some");
        assert_eq!(ok.finished, t(21));
        let bad = h
            .last("app", "local", "diff", false)
            .expect("q")
            .expect("some");
        assert_eq!(bad.error.as_deref(), Some("boom"));
        assert!(h.last("app", "local", "full", true).expect("q").is_none());
        assert_eq!(h.counts("app", "local", "diff").expect("n"), (2, 1));
    }
}
