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

/// The history database.
#[derive(Debug)]
pub struct History {
    conn: Connection,
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::Other(format!("run history: {e}"))
}

impl History {
    pub fn open(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io(format!("cannot create {}", state_dir.display()), e))?;
        let conn = Connection::open(state_dir.join("history.db")).map_err(db_err)?;
        // Before the schema: a `dr info` opening the file at the same
        // moment must make this wait, not fail the daemon's start.
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS runs(
               policy TEXT NOT NULL, target TEXT NOT NULL, kind TEXT NOT NULL,
               started TEXT NOT NULL, finished TEXT NOT NULL, ok INTEGER NOT NULL,
               error TEXT, label TEXT, size INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX IF NOT EXISTS runs_by_job ON runs(policy, target, kind, finished);",
        )
        .map_err(db_err)?;
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

    /// The newest run of a job on a target that succeeded (`ok`) or failed.
    pub fn last(&self, policy: &str, target: &str, kind: &str, ok: bool) -> Result<Option<Run>> {
        self.conn
            .query_row(
                "SELECT started, finished, error, label, size FROM runs
                 WHERE policy = ?1 AND target = ?2 AND kind = ?3 AND ok = ?4
                 ORDER BY finished DESC LIMIT 1",
                params![policy, target, kind, ok],
                |row| {
                    let t = |s: String| {
                        DateTime::parse_from_rfc3339(&s)
                            .map(|d| d.with_timezone(&Utc))
                            .unwrap_or_default()
                    };
                    Ok(Run {
                        policy: policy.to_string(),
                        target: target.to_string(),
                        kind: kind.to_string(),
                        started: t(row.get(0)?),
                        finished: t(row.get(1)?),
                        ok,
                        error: row.get(2)?,
                        label: row.get(3)?,
                        size: row.get::<_, i64>(4)? as u64,
                    })
                },
            )
            .optional()
            .map_err(db_err)
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
