//! The protection verdict: the one function ([`judge`]) that decides
//! whether a database is *protected* or *at risk*, and why.
//!
//! A database is protected when its newest restorable instant is within
//! what its policy promises: with WAL streaming, a live streamer no more
//! than `StreamState::stale_after(sync_interval)` behind (or, seen from a
//! host where no streamer runs, a WAL window that reached within a
//! heartbeat of now); with scheduled backups, a restorable backup within
//! twice the most frequent schedule's period (plus a minute); with
//! neither, any restorable backup. Everything else is at risk with named
//! reasons. `dr info`, `/healthz`, the metrics and the notifications
//! gather their evidence differently (a listing of the targets, or the
//! run history and the streamers' state) but all decide here.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Policy;
use crate::sqlite::stream::StreamState;

/// How often an idle stream writes a heartbeat segment: a window seen
/// from the target reaches at least this close to now while a streamer
/// runs somewhere.
pub const HEARTBEAT: Duration = crate::sqlite::stream::HEARTBEAT;

/// Why a database is at risk. The names are the `reason` field of
/// `dr info --json` and the `problem` field of `/healthz` (README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No restorable backup on a target.
    NeverBackedUp,
    /// The newest restorable instant is older than the policy promises.
    Overdue,
    /// The newest backup run failed (after the last success).
    Failing,
    /// The newest restore drill failed.
    VerifyFailed,
    /// WAL streaming is configured but no streamer is running.
    StreamerDown,
    /// The streamer runs but has not shipped what was committed.
    Behind,
    /// The local spool is full: segments are not shipped.
    SpoolFull,
    /// The database cannot be streamed (not in WAL mode).
    CannotStream,
    /// The database file cannot be read.
    Unreadable,
    /// A file the fleet's pattern matches that no database name stands for.
    ExcludedByName,
    /// The target could not be read.
    TargetUnreachable,
    /// A backup or the WAL on the target is damaged.
    Damaged,
    /// A committed backup's objects are hidden by S3 delete markers.
    HiddenByDeleteMarker,
    /// A backup was written by a newer dr: this one cannot restore it.
    NewerFormat,
    /// No restore drill passed within what the verify schedule promises.
    DrillOverdue,
    /// PostgreSQL does not get its WAL into the repository (archiving
    /// off, pointed elsewhere, or failing since its last success).
    ArchiveFailing,
    /// This host's standby (`[follow]`) stopped on an error.
    FollowerDown,
    /// This host's standby has not been known complete for longer than
    /// `follow.max_lag`, or the primary sends it nothing.
    FollowerBehind,
    /// A key or secret file the policy depends on last changed longer
    /// ago than `[security] rotate_after`.
    RotationDue,
    /// The TLS certificate of an endpoint the policy writes to expires
    /// within `[security] cert_warn` (or has expired).
    CertExpiring,
}

impl Reason {
    /// The word used in JSON, `/healthz` and metrics.
    pub fn word(self) -> &'static str {
        match self {
            Reason::NeverBackedUp => "never_backed_up",
            Reason::Overdue => "overdue",
            Reason::Failing => "failing",
            Reason::VerifyFailed => "verify_failed",
            Reason::StreamerDown => "streamer_down",
            Reason::Behind => "behind",
            Reason::SpoolFull => "spool_full",
            Reason::CannotStream => "cannot_stream",
            Reason::Unreadable => "unreadable",
            Reason::ExcludedByName => "excluded_by_name",
            Reason::TargetUnreachable => "target_unreachable",
            Reason::Damaged => "damaged",
            Reason::HiddenByDeleteMarker => "hidden_by_delete_marker",
            Reason::NewerFormat => "newer_format",
            Reason::DrillOverdue => "drill_overdue",
            Reason::ArchiveFailing => "archive_failing",
            Reason::FollowerDown => "follower_down",
            Reason::FollowerBehind => "follower_behind",
            Reason::RotationDue => "rotation_due",
            Reason::CertExpiring => "cert_expiring",
        }
    }
}

/// Serialised as [`Reason::word`]: one spelling for JSON, `/healthz` and
/// messages.
impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.word())
    }
}

/// One reason a database is at risk, on one target or on its source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Risk {
    pub reason: Reason,
    /// The target concerned; `None` for the source itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub detail: String,
}

/// `protected` or `at_risk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Protected,
    AtRisk,
}

/// What a policy promises about its newest restorable instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Promise {
    /// The oldest the newest restorable instant may be (scheduled backups).
    pub backups_within: Option<Duration>,
    /// WAL streaming: how far a live streamer may trail.
    pub stream_within: Option<Duration>,
    /// `[schedule] verify`: the newest passed restore drill may be at most
    /// this old (twice the schedule's period plus a minute), wherever it ran.
    pub drill_within: Option<Duration>,
}

impl Promise {
    /// What `policy` promises at `now`.
    pub fn of(policy: &Policy, now: DateTime<Utc>) -> Promise {
        let shortest = [&policy.schedule.full, &policy.schedule.diff]
            .into_iter()
            .flatten()
            .filter_map(|s| s.period(now))
            .min()
            .and_then(|d| d.to_std().ok());
        Promise {
            drill_within: policy
                .schedule
                .verify
                .as_ref()
                .and_then(|s| s.period(now))
                .and_then(|d| d.to_std().ok())
                .map(|p| p * 2 + Duration::from_secs(60)),
            backups_within: shortest.map(|p| p * 2 + Duration::from_secs(60)),
            stream_within: policy
                .wal
                .enabled
                .then(|| StreamState::stale_after(policy.wal.sync_interval)),
        }
    }

    /// The age of the newest restorable instant beyond which it is at
    /// risk, as seen from a target's contents alone.
    pub fn max_age(&self) -> Option<Duration> {
        match (self.stream_within, self.backups_within) {
            (Some(s), b) => Some(b.map_or(HEARTBEAT + s, |b| b.min(HEARTBEAT + s).max(s))),
            (None, b) => b,
        }
    }
}

/// A streamer's state as the evidence gatherer saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvidence {
    pub running: bool,
    /// Seconds the target trails the database (see `StreamState::lag`).
    pub lag_seconds: Option<f64>,
    pub error: Option<String>,
    pub spool_full: bool,
}

/// What is known of one target of a database.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetEvidence {
    pub target: String,
    /// Why the target could not be read.
    pub unreachable: Option<String>,
    /// The newest instant a restore from this target reaches.
    pub newest_restorable: Option<DateTime<Utc>>,
    /// Damaged backups, WAL gaps, hidden objects: each named.
    pub damaged: Vec<String>,
    /// Backups only a newer dr reads: each named.
    pub newer: Vec<String>,
    pub hidden: Vec<String>,
    /// The newest backup run failed after the last success: its error.
    pub failing: Option<String>,
    pub verify_failed: Option<String>,
    /// The newest restore drill that passed, on this host or recorded on
    /// the target by the host with the key.
    pub drill_passed: Option<DateTime<Utc>>,
    /// The oldest restorable instant: a drill is owed only once the
    /// target has held backups for the drill period.
    pub since: Option<DateTime<Utc>>,
    /// The streamer on this host, when one ever ran here.
    pub stream: Option<StreamEvidence>,
}

/// Everything known of one database.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    pub promise: Promise,
    /// What is wrong with the source itself (file unreadable, cannot be
    /// streamed, excluded by name).
    pub source: Vec<(Reason, String)>,
    /// The database no longer exists on disk (a fleet member kept only in
    /// the repository): nothing is promised about its freshness.
    pub retired: bool,
    pub targets: Vec<TargetEvidence>,
    /// Secrets due for rotation and certificates near expiry
    /// (`ops::rotation`), each already a reason.
    pub security: Vec<Risk>,
}

/// The verdict on one database.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub state: State,
    /// The newest instant any target restores.
    pub newest_restorable: Option<DateTime<Utc>>,
    pub age_seconds: Option<f64>,
    /// The oldest the newest restorable instant may be (none: no promise).
    pub promised_seconds: Option<f64>,
    pub reasons: Vec<Risk>,
}

/// Decides. Pure: the same evidence gives the same verdict everywhere.
pub fn judge(e: &Evidence, now: DateTime<Utc>) -> Verdict {
    let mut reasons: Vec<Risk> = e
        .source
        .iter()
        .map(|(r, d)| Risk {
            reason: *r,
            target: None,
            detail: d.clone(),
        })
        .collect();
    let age = |t: DateTime<Utc>| (now - t).num_milliseconds().max(0) as f64 / 1000.0;
    let max_age = e.promise.max_age().filter(|_| !e.retired);
    for t in &e.targets {
        let mut risk = |reason, detail: String| {
            reasons.push(Risk {
                reason,
                target: Some(t.target.clone()),
                detail,
            })
        };
        if let Some(why) = &t.unreachable {
            risk(Reason::TargetUnreachable, why.clone());
        }
        for d in &t.damaged {
            risk(Reason::Damaged, d.clone());
        }
        for d in &t.newer {
            risk(Reason::NewerFormat, d.clone());
        }
        for h in &t.hidden {
            risk(Reason::HiddenByDeleteMarker, h.clone());
        }
        if let Some(f) = &t.failing {
            risk(Reason::Failing, f.clone());
        }
        if let Some(f) = &t.verify_failed {
            risk(Reason::VerifyFailed, f.clone());
        }
        if let Some(within) = e.promise.drill_within.filter(|_| !e.retired) {
            let limit = within.as_secs_f64();
            let owed = t.since.is_some_and(|s| age(s) > limit);
            let fresh = t.drill_passed.is_some_and(|d| age(d) <= limit);
            if owed && !fresh {
                risk(
                    Reason::DrillOverdue,
                    match t.drill_passed {
                        Some(d) => format!(
                            "the newest restore drill that passed, {}, is {:.0} s old (the verify schedule promises one within {limit:.0} s)",
                            d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            age(d)
                        ),
                        None => format!(
                            "no restore drill has passed on this target (the verify schedule promises one within {limit:.0} s): run `dr verify` where the key is"
                        ),
                    },
                );
            }
        }
        if t.unreachable.is_some() {
            continue;
        }
        let Some(newest) = t.newest_restorable else {
            risk(
                Reason::NeverBackedUp,
                "no restorable backup on this target".into(),
            );
            continue;
        };
        if e.retired {
            continue;
        }
        let live = match (&t.stream, e.promise.stream_within) {
            (Some(s), Some(within)) => {
                if s.spool_full {
                    risk(
                        Reason::SpoolFull,
                        "the WAL spool is full: segments wait on this host".into(),
                    );
                }
                if !s.running {
                    risk(
                        Reason::StreamerDown,
                        match &s.error {
                            Some(err) => format!("the WAL streamer is not running: {err}"),
                            None => "the WAL streamer is not running".into(),
                        },
                    );
                    false
                } else {
                    let lag = s.lag_seconds.unwrap_or(0.0);
                    if lag > within.as_secs_f64() {
                        risk(
                            Reason::Behind,
                            format!(
                                "the streamer trails by {lag:.1} s (promised {:.0} s){}",
                                within.as_secs_f64(),
                                s.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
                            ),
                        );
                    }
                    true
                }
            }
            _ => false,
        };
        // A live streamer answers for freshness; otherwise the target's
        // own contents must be recent enough.
        if !live
            && let Some(max) = max_age
            && age(newest) > max.as_secs_f64()
        {
            risk(
                Reason::Overdue,
                format!(
                    "the newest restorable instant, {}, is {:.0} s old (promised {:.0} s)",
                    newest.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    age(newest),
                    max.as_secs_f64()
                ),
            );
        }
    }
    reasons.extend(e.security.iter().cloned());
    let newest = e.targets.iter().filter_map(|t| t.newest_restorable).max();
    Verdict {
        state: if reasons.is_empty() {
            State::Protected
        } else {
            State::AtRisk
        },
        newest_restorable: newest,
        age_seconds: newest.map(age),
        promised_seconds: max_age.map(|d| d.as_secs_f64()),
        reasons,
    }
}

/// Why the database at `path` cannot be WAL-streamed (it is not in WAL
/// mode), from its header alone; `Err` when it cannot be read. `dr info`
/// and `config validate` say it in the same words.
pub fn not_streamable(path: &std::path::Path) -> std::io::Result<Option<String>> {
    Ok((header_says_wal(path)? == Some(false)).then(|| {
        format!(
            "{} is not in WAL mode, so [wal] cannot stream it: the application must run `PRAGMA journal_mode=WAL` once (it persists), or set [wal] enabled = false",
            path.display()
        )
    }))
}

/// Whether a SQLite database file is in WAL mode, from its header alone
/// (bytes 18 and 19 are 2 in WAL mode): `dr info` reads without opening a
/// connection that could change anything. `None`: too short to tell (an
/// empty file is a database SQLite has not written yet).
pub fn header_says_wal(path: &std::path::Path) -> std::io::Result<Option<bool>> {
    use std::io::Read;
    let mut head = [0u8; 20];
    let mut f = std::fs::File::open(path)?;
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    if got < head.len() {
        return Ok(None);
    }
    Ok(Some(head[18] == 2 && head[19] == 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        Utc::now()
    }

    fn target(newest: Option<DateTime<Utc>>) -> TargetEvidence {
        TargetEvidence {
            target: "t".into(),
            newest_restorable: newest,
            ..TargetEvidence::default()
        }
    }

    fn evidence(promise: Promise, targets: Vec<TargetEvidence>) -> Evidence {
        Evidence {
            promise,
            source: Vec::new(),
            retired: false,
            targets,
            security: Vec::new(),
        }
    }

    const HOURLY: Promise = Promise {
        backups_within: Some(Duration::from_secs(2 * 3600 + 60)),
        stream_within: None,
        drill_within: None,
    };

    fn reasons(v: &Verdict) -> Vec<Reason> {
        v.reasons.iter().map(|r| r.reason).collect()
    }

    #[test]
    fn fresh_backups_protect_and_old_ones_do_not() {
        let n = now();
        let v = judge(&evidence(HOURLY, vec![target(Some(n))]), n);
        assert_eq!(v.state, State::Protected);
        let old = n - chrono::Duration::hours(3);
        let v = judge(&evidence(HOURLY, vec![target(Some(old))]), n);
        assert_eq!(reasons(&v), vec![Reason::Overdue]);
        let v = judge(&evidence(HOURLY, vec![target(None)]), n);
        assert_eq!(reasons(&v), vec![Reason::NeverBackedUp]);
    }

    #[test]
    fn a_stream_answers_for_freshness_while_it_runs() {
        let n = now();
        let promise = Promise {
            backups_within: None,
            stream_within: Some(Duration::from_secs(8)),
            drill_within: None,
        };
        let old = n - chrono::Duration::hours(1);
        let mut t = target(Some(old));
        t.stream = Some(StreamEvidence {
            running: true,
            lag_seconds: Some(0.5),
            error: None,
            spool_full: false,
        });
        assert_eq!(
            judge(&evidence(promise, vec![t.clone()]), n).state,
            State::Protected
        );
        t.stream = Some(StreamEvidence {
            running: false,
            lag_seconds: Some(3600.0),
            error: Some("journal_mode=delete".into()),
            spool_full: false,
        });
        let v = judge(&evidence(promise, vec![t.clone()]), n);
        assert_eq!(reasons(&v), vec![Reason::StreamerDown, Reason::Overdue]);
        // Seen from another host: the window must reach within a heartbeat.
        t.stream = None;
        t.newest_restorable = Some(n - chrono::Duration::seconds(30));
        assert_eq!(
            judge(&evidence(promise, vec![t]), n).state,
            State::Protected
        );
    }

    #[test]
    fn a_drill_is_owed_once_backups_are_older_than_the_drill_period() {
        let n = now();
        let daily = Promise {
            drill_within: Some(Duration::from_secs(2 * 86400 + 60)),
            ..HOURLY
        };
        let mut t = target(Some(n));
        // A new deployment: backups for an hour, no drill yet: not owed.
        t.since = Some(n - chrono::Duration::hours(1));
        assert_eq!(
            judge(&evidence(daily, vec![t.clone()]), n).state,
            State::Protected
        );
        // Backups for three days and never a drill: overdue.
        t.since = Some(n - chrono::Duration::days(3));
        let v = judge(&evidence(daily, vec![t.clone()]), n);
        assert_eq!(reasons(&v), vec![Reason::DrillOverdue]);
        assert!(v.reasons[0].detail.contains("no restore drill"), "{v:?}");
        // A drill that passed (here or on the drill host) within the period.
        t.drill_passed = Some(n - chrono::Duration::hours(20));
        assert_eq!(
            judge(&evidence(daily, vec![t.clone()]), n).state,
            State::Protected
        );
        // One that passed too long ago.
        t.drill_passed = Some(n - chrono::Duration::hours(60));
        let v = judge(&evidence(daily, vec![t]), n);
        assert_eq!(reasons(&v), vec![Reason::DrillOverdue]);
    }

    #[test]
    fn every_reason_is_kept_and_the_source_counts() {
        let n = now();
        let mut t = target(Some(n));
        t.damaged = vec!["backup X: bad".into()];
        let mut u = target(None);
        u.target = "s3".into();
        u.unreachable = Some("connection refused".into());
        let mut e = evidence(HOURLY, vec![t, u]);
        e.source
            .push((Reason::CannotStream, "journal_mode=delete".into()));
        let v = judge(&e, n);
        assert_eq!(
            reasons(&v),
            vec![
                Reason::CannotStream,
                Reason::Damaged,
                Reason::TargetUnreachable
            ]
        );
        assert_eq!(v.newest_restorable, Some(n));
    }
}
