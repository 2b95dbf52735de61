//! PostgreSQL's WAL archiver as the cluster reports it (`pg_stat_archiver`
//! and the archive settings): whether commits are reaching the repository
//! now. The repository's newest segment says how far a restore reaches;
//! only the cluster can say that archiving has been failing since, or was
//! never turned on (a restored cluster not yet declared the primary).

use chrono::{DateTime, Utc};

use crate::config::PgSource;

/// The archiver's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archiver {
    /// `archive_mode`: `on`, `off` or `always`.
    pub mode: String,
    /// The cluster replays WAL (a standby, or a restore not yet done).
    pub in_recovery: bool,
    pub command: String,
    pub last_archived: Option<DateTime<Utc>>,
    pub last_archived_wal: Option<String>,
    pub last_failed: Option<DateTime<Utc>>,
    pub last_failed_wal: Option<String>,
    pub failed_count: u64,
}

const QUERY: &str = "SELECT current_setting('archive_mode'), pg_is_in_recovery(), \
    coalesce(extract(epoch from last_archived_time)::bigint::text, ''), coalesce(last_archived_wal, ''), \
    coalesce(extract(epoch from last_failed_time)::bigint::text, ''), coalesce(last_failed_wal, ''), \
    failed_count, current_setting('archive_command') FROM pg_stat_archiver";

/// Asks the cluster; `None` when it cannot be reached (stopped, or not on
/// this host): a cluster that runs nowhere commits nothing to lose.
pub fn status(pg: &PgSource) -> Option<Archiver> {
    match super::psql::query(pg, QUERY) {
        Ok(row) => parse(&row),
        Err(e) => {
            tracing::debug!(stanza = %pg.stanza, "pg_stat_archiver not read: {e}");
            None
        }
    }
}

/// One row of [`QUERY`], `|`-separated (psql's unaligned output); the
/// archive command comes last, so a `|` in it is kept.
fn parse(row: &str) -> Option<Archiver> {
    let f: Vec<&str> = row.splitn(8, '|').collect();
    if f.len() != 8 {
        return None;
    }
    let time = |s: &str| {
        s.parse::<i64>()
            .ok()
            .and_then(|t| DateTime::from_timestamp(t, 0))
    };
    let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Some(Archiver {
        mode: f[0].to_string(),
        in_recovery: f[1] == "t",
        last_archived: time(f[2]),
        last_archived_wal: text(f[3]),
        last_failed: time(f[4]),
        last_failed_wal: text(f[5]),
        failed_count: f[6].parse().unwrap_or(0),
        command: f[7].to_string(),
    })
}

impl Archiver {
    /// Why commits of this cluster are not reaching the stanza's
    /// repository, or `None` while they are. A cluster in recovery does
    /// not archive by design (it has no commits of its own yet).
    pub fn risk(&self, policy: &str, stanza: &str) -> Option<String> {
        if self.in_recovery {
            return None;
        }
        if self.mode == "off" {
            return Some(format!(
                "PostgreSQL does not archive WAL (archive_mode = off): commits since the newest backup are in no repository. A restored cluster archives only once it is declared the primary: run `dr pg setup {policy}` (then restart PostgreSQL if it says so)"
            ));
        }
        if !self.command.contains("pgbackrest")
            || !self.command.contains(&format!("--stanza={stanza}"))
        {
            return Some(format!(
                "archive_command does not push to pgBackRest stanza '{stanza}' (it is '{}'): run `dr pg setup {policy}`",
                self.command
            ));
        }
        let failed = self.last_failed?;
        if self.last_archived.is_some_and(|ok| ok >= failed) {
            return None;
        }
        Some(format!(
            "PostgreSQL's archiver has failed {} time(s), last at {} on segment {}, and archived nothing since{}: commits since are not in the repository (see PostgreSQL's log for pgBackRest's error)",
            self.failed_count,
            failed.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.last_failed_wal.as_deref().unwrap_or("?"),
            self.last_archived.map_or(String::new(), |t| format!(
                " (last success {})",
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ))
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CMD: &str = "/usr/bin/pgbackrest --config=/x --stanza=main archive-push %p";

    fn row(mode: &str, ok: &str, failed: &str) -> Archiver {
        parse(&format!(
            "{mode}|f|{ok}|000000010000000000000003|{failed}|000000010000000000000004|2|{CMD}"
        ))
        .expect("parse")
    }

    #[test]
    fn archiving_that_works_is_no_risk() {
        let a = row("on", "1795331320", "1795331000");
        assert_eq!(
            a.last_archived_wal.as_deref(),
            Some("000000010000000000000003")
        );
        assert_eq!(a.risk("p", "main"), None);
        assert_eq!(row("on", "", "").risk("p", "main"), None);
    }

    #[test]
    fn failing_off_or_elsewhere_is_a_risk_that_says_what_to_do() {
        let a = row("on", "1795331000", "1795331320");
        let why = a.risk("p", "main").expect("failing");
        assert!(
            why.contains("failed 2 time(s)") && why.contains("000000010000000000000004"),
            "{why}"
        );
        assert!(row("on", "", "1795331320").risk("p", "main").is_some());
        let off = row("off", "", "").risk("p", "main").expect("off");
        assert!(off.contains("dr pg setup p"), "{off}");
        assert!(row("on", "", "").risk("p", "other").is_some());
        let standby = parse(&format!("off|t|||||0|{CMD}")).expect("parse");
        assert_eq!(standby.risk("p", "main"), None);
        assert_eq!(parse("on|f|1"), None);
    }

    #[test]
    fn a_bar_in_the_archive_command_is_kept() {
        let a = parse("on|f|||||0|a | b --stanza=main pgbackrest").expect("parse");
        assert_eq!(a.command, "a | b --stanza=main pgbackrest");
    }
}
