//! `/healthz`, `/metrics` and the status page (`/`, `status_page.rs`) on
//! `daemon.listen` (loopback by default).
//!
//! Health: 200 when every database is protected (`ops::verdict::judge`);
//! else 503 with a JSON body naming each reason, as `dr info` names them.

use std::sync::Arc;

use chrono::Utc;
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::{Shared, status_page};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::history::History;
use crate::ops::verdict::{self, Evidence, Promise, StreamEvidence, TargetEvidence};
use crate::pg::archiver::Archiver;
use crate::sqlite::stream::{self, StreamState};

/// One thing that makes the daemon unhealthy.
#[derive(Debug, Serialize)]
pub struct Problem {
    pub policy: String,
    pub target: String,
    /// A reason of `ops::verdict::Reason` (`overdue`, `failing`,
    /// `verify_failed`, `streamer_down`, `spool_full`, `never_backed_up`, ...).
    pub problem: String,
    pub detail: String,
}

/// The running config and the run history, as one request sees them.
fn snapshot(shared: &Shared) -> Result<(Context, History)> {
    let ctx = shared
        .ctx
        .read()
        .map_err(|_| Error::Other("config lock poisoned".into()))?
        .clone();
    let history = History::open(ctx.state().root())?;
    Ok((ctx, history))
}

/// What is wrong now, by policy and target: the reasons of every database
/// at risk, decided by `ops::verdict::judge` (the function `dr info`
/// decides with) from what the daemon knows without listing a target: the
/// run history, the streamers' live status and their state files.
pub fn problems(shared: &Shared) -> Result<Vec<Problem>> {
    let (ctx, history) = snapshot(shared)?;
    let cfg = ctx.cfg();
    let now = Utc::now();
    let mut out = Vec::new();
    for p in &super::policies_now(cfg) {
        for r in judged(shared, &ctx, &history, p, now)?.verdict.reasons {
            out.push(Problem {
                policy: p.name.clone(),
                target: r.target.unwrap_or_else(|| "*".into()),
                problem: r.reason.word().into(),
                detail: r.detail,
            });
        }
    }
    Ok(out)
}

/// A streamed policy's state file and its process's last beat, read once
/// per request (both `None` for a policy that does not stream).
type StreamView = (Option<StreamState>, Option<chrono::DateTime<Utc>>);

fn stream_view(ctx: &Context, p: &crate::config::Policy) -> StreamView {
    let state = p
        .wal
        .enabled
        .then(|| StreamState::load(&ctx.state().stream_state(&p.name)))
        .flatten();
    let beat = state
        .as_ref()
        .and_then(|st| stream::beat_at(&ctx.state().stream_beat(st.pid)));
    (state, beat)
}

/// A PostgreSQL policy's archiver, when its cluster answers.
fn archiver_of(p: &crate::config::Policy) -> Option<Archiver> {
    match &p.source {
        crate::config::Source::Postgres(pg) => crate::pg::archiver::status(pg),
        crate::config::Source::Sqlite { .. } => None,
    }
}

/// One database as a request sees it, for `/healthz`, `/metrics` and the
/// status page alike: its stream, its archiver (PostgreSQL), the evidence
/// and the verdict `ops::verdict::judge` gives on it.
struct Judged {
    view: StreamView,
    archiver: Option<Archiver>,
    evidence: Evidence,
    verdict: verdict::Verdict,
}

fn judged(
    shared: &Shared,
    ctx: &Context,
    history: &History,
    p: &crate::config::Policy,
    now: chrono::DateTime<Utc>,
) -> Result<Judged> {
    let view = stream_view(ctx, p);
    let archiver = archiver_of(p);
    let mut evidence = evidence(shared, history, p, &view, archiver.as_ref(), now)?;
    evidence.security = shared
        .rotation
        .lock()
        .map(|f| f.risks(&ctx.cfg().security, p, now))
        .unwrap_or_default();
    let verdict = verdict::judge(&evidence, now);
    Ok(Judged {
        view,
        archiver,
        evidence,
        verdict,
    })
}

/// What the daemon knows of one database, for the verdict.
fn evidence(
    shared: &Shared,
    history: &History,
    p: &crate::config::Policy,
    (state, beat): &StreamView,
    archiver: Option<&Archiver>,
    now: chrono::DateTime<Utc>,
) -> Result<Evidence> {
    // A standby's verdict is its follower's: the primary answers for the
    // backups and the stream.
    if let Some(f) = shared
        .followers
        .lock()
        .ok()
        .and_then(|f| f.get(&p.name).cloned())
    {
        return Ok(Evidence {
            promise: Promise {
                backups_within: None,
                stream_within: None,
                drill_within: None,
            },
            source: super::followers::risks(&p.name, &f, now),
            retired: false,
            targets: Vec::new(),
            security: Vec::new(),
        });
    }
    let status = shared
        .streamers
        .lock()
        .ok()
        .and_then(|s| s.get(&p.name).cloned());
    let stale = StreamState::stale_after(p.wal.sync_interval);
    let mut targets = Vec::new();
    for t in &p.targets {
        let mut ok: Option<chrono::DateTime<Utc>> = None;
        let mut bad: Option<crate::history::Run> = None;
        for kind in ["full", "diff"] {
            if let Some(r) = history.last(&p.name, t, kind, true)? {
                ok = Some(ok.map_or(r.finished, |o| o.max(r.finished)));
            }
            if let Some(r) = history.last(&p.name, t, kind, false)?
                && bad.as_ref().is_none_or(|b| r.finished > b.finished)
            {
                bad = Some(r);
            }
        }
        let failing = bad
            .filter(|b| ok.is_none_or(|o| b.finished > o))
            .map(|b| b.error.unwrap_or_default());
        let verified = history.last(&p.name, t, "verify", true)?;
        let checked = history.last(&p.name, t, "check", true)?;
        // A drill that failed after the last that passed; on a host without
        // the key, a check of the stored objects that failed after the last
        // that passed.
        let verify_failed = history
            .last(&p.name, t, "verify", false)?
            .filter(|b| verified.as_ref().is_none_or(|o| b.finished > o.finished))
            .map(|b| b.error.unwrap_or_default())
            .or(history
                .last(&p.name, t, "check", false)?
                .filter(|b| checked.as_ref().is_none_or(|o| b.finished > o.finished))
                .map(|b| {
                    format!(
                        "the check of the stored objects (without the key) failed: {}",
                        b.error.unwrap_or_default()
                    )
                }));
        let shipped = state
            .as_ref()
            .and_then(|st| st.targets.get(t))
            .and_then(|s| s.until);
        let stream = p.wal.enabled.then(|| {
            let (running, error) = match &status {
                Some(s) if s.up(now) => (true, None),
                Some(s) => (
                    false,
                    Some(match &s.error {
                        Some(e) if !s.running => format!(
                            "stopped {} s ago after {} restart(s): {e}",
                            (now - s.since).num_seconds(),
                            s.restarts
                        ),
                        Some(e) => format!("restarted {} time(s), last error: {e}", s.restarts),
                        None => "not running".into(),
                    }),
                ),
                None => (false, Some("no streamer is running for this policy".into())),
            };
            StreamEvidence {
                running,
                lag_seconds: state.as_ref().and_then(|st| st.lag(t, now, stale, *beat)),
                error,
                spool_full: state.as_ref().is_some_and(|st| st.spool_full),
            }
        });
        // PostgreSQL: WAL archived after a backup extends what a restore
        // reaches (archive-push stores each segment in every repository).
        let archived = archiver
            .and_then(|a| a.last_archived)
            .filter(|a| ok.is_some_and(|o| *a >= o));
        targets.push(TargetEvidence {
            target: t.clone(),
            unreachable: None,
            newest_restorable: [ok, shipped, archived].into_iter().flatten().max(),
            damaged: Vec::new(),
            newer: Vec::new(),
            hidden: Vec::new(),
            failing,
            verify_failed,
            drill_passed: verified.as_ref().map(|r| r.finished),
            since: history.first_success(&p.name, t, &["full", "diff"])?,
            stream,
        });
    }
    let source = match (&p.source, archiver) {
        (crate::config::Source::Postgres(pg), Some(a)) => a
            .risk(&p.name, &pg.stanza)
            .map(|why| (verdict::Reason::ArchiveFailing, why))
            .into_iter()
            .collect(),
        _ => Vec::new(),
    };
    Ok(Evidence {
        promise: Promise::of(p, now),
        source,
        retired: false,
        targets,
        security: Vec::new(),
    })
}

type Labels = Vec<(String, String)>;
/// A family of gauges by label set, as every gauge here is.
pub(super) type Gauges = prometheus_client::metrics::family::Family<
    Labels,
    prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
>;

/// Registers a family of gauges `name` with its help text.
pub(super) fn gauge(reg: &mut Registry, name: &str, help: &str) -> Gauges {
    let f = Gauges::default();
    reg.register(name, help, f.clone());
    f
}

/// The Prometheus exposition (OpenMetrics text, through prometheus-client).
/// Every series of every configured policy, target and job is present,
/// as 0 for what has not happened yet, so alert rules see it from the start.
pub fn metrics(shared: &Shared) -> Result<String> {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    type Counters = Family<Labels, Counter>;

    let (ctx, history) = snapshot(shared)?;
    let cfg = ctx.cfg();
    let now = Utc::now();
    let mut reg = <Registry>::default();
    let counter = |reg: &mut Registry, name: &str, help: &str| {
        let f = Counters::default();
        reg.register(name, help, f.clone());
        f
    };
    // A gauge of 1 rather than an OpenMetrics info: promtool and older
    // Prometheus text parsers read it.
    gauge(
        &mut reg,
        "dr_build_info",
        "The dr version serving these metrics",
    )
    .get_or_create(&vec![(
        "version".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    )])
    .set(1.0);
    let last_ok = gauge(
        &mut reg,
        "dr_backup_last_success_timestamp_seconds",
        "When the newest successful backup finished (0: never)",
    );
    let last_bad = gauge(
        &mut reg,
        "dr_backup_last_failure_timestamp_seconds",
        "When the newest failed backup finished (0: never)",
    );
    let duration = gauge(
        &mut reg,
        "dr_backup_last_duration_seconds",
        "Duration of the newest successful backup",
    );
    let size = gauge(
        &mut reg,
        "dr_backup_size_bytes",
        "Stored size of the newest successful backup",
    );
    let verify_ok = gauge(
        &mut reg,
        "dr_verify_last_success_timestamp_seconds",
        "When the newest passing restore drill finished (0: never)",
    );
    let verify_bad = gauge(
        &mut reg,
        "dr_verify_last_failure_timestamp_seconds",
        "When the newest failing restore drill finished (0: never)",
    );
    let copy_ok = gauge(
        &mut reg,
        "dr_copy_last_success_timestamp_seconds",
        "When the newest successful copy to this target ([copy] to) finished (0: never)",
    );
    let copy_bad = gauge(
        &mut reg,
        "dr_copy_last_failure_timestamp_seconds",
        "When the newest failed copy to this target finished (0: never)",
    );
    let runs = counter(&mut reg, "dr_runs", "Runs recorded, by job and result");
    let errors = counter(&mut reg, "dr_errors", "Failed runs recorded");
    let lag = gauge(
        &mut reg,
        "dr_wal_lag_seconds",
        "Age of the oldest commit not yet on the target; while the streamer is stopped, time since the last instant the target has every commit of",
    );
    let shipped = gauge(
        &mut reg,
        "dr_wal_last_shipped_timestamp_seconds",
        "Until when the target has every commit (0: nothing shipped)",
    );
    let spool = gauge(
        &mut reg,
        "dr_wal_spool_bytes",
        "WAL segments waiting in the local spool",
    );
    let spool_max = gauge(
        &mut reg,
        "dr_wal_spool_max_bytes",
        "The spool's limit (wal.spool_max)",
    );
    let up = gauge(
        &mut reg,
        "dr_wal_streamer_up",
        "1 while the policy's WAL streamer runs, 0 while it is down",
    );
    let restarts = counter(
        &mut reg,
        "dr_wal_streamer_restarts",
        "Times the WAL streamer stopped on an error and was restarted",
    );
    let protected = gauge(
        &mut reg,
        "dr_protected",
        "1 while the database is protected, 0 while it is at risk (the verdict of dr info and /healthz)",
    );
    let restorable = gauge(
        &mut reg,
        "dr_newest_restorable_timestamp_seconds",
        "The newest instant a restore reaches on any target (the verdict's; 0: none)",
    );
    let promised = gauge(
        &mut reg,
        "dr_promised_age_seconds",
        "The oldest the newest restorable instant may be before the database is at risk (from its schedules and stream; 0: no promise)",
    );
    let archived = gauge(
        &mut reg,
        "dr_pg_archive_last_success_timestamp_seconds",
        "PostgreSQL: when the archiver last stored a WAL segment (pg_stat_archiver; 0: never, or the cluster does not answer)",
    );
    let archive_failed = gauge(
        &mut reg,
        "dr_pg_archive_last_failure_timestamp_seconds",
        "PostgreSQL: when archiving a WAL segment last failed (pg_stat_archiver; 0: never)",
    );
    let follow_up = gauge(
        &mut reg,
        "dr_follow_up",
        "1 while this host's standby of the policy follows its target, 0 while it is down ([follow])",
    );
    let follow_lag = gauge(
        &mut reg,
        "dr_follow_lag_seconds",
        "Time since the standby was last known to hold everything its target has",
    );
    let follow_source = gauge(
        &mut reg,
        "dr_follow_source_timestamp_seconds",
        "The newest instant the standby holds every commit of the primary until (heartbeats included; 0: not known yet)",
    );
    let follow_commit = gauge(
        &mut reg,
        "dr_follow_last_commit_timestamp_seconds",
        "When the newest transaction the standby applied was committed on the primary (0: none applied yet)",
    );
    let follow_applied = counter(
        &mut reg,
        "dr_follow_transactions",
        "Transactions the standby applied since its follower started",
    );
    let follow_restarts = counter(
        &mut reg,
        "dr_follow_restarts",
        "Times the standby's follower stopped on an error and was restarted",
    );
    let streamers = shared
        .streamers
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let followers = shared
        .followers
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let l = |pairs: &[(&str, &str)]| -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let ts = |t: chrono::DateTime<Utc>| t.timestamp_millis() as f64 / 1000.0;
    for p in &super::policies_now(cfg) {
        let name = p.name.as_str();
        let Judged {
            view,
            archiver,
            verdict,
            ..
        } = judged(shared, &ctx, &history, p, now)?;
        if matches!(p.source, crate::config::Source::Postgres(_)) {
            let labels = l(&[("policy", name)]);
            let a = archiver.as_ref();
            archived
                .get_or_create(&labels)
                .set(a.and_then(|a| a.last_archived).map_or(0.0, ts));
            archive_failed
                .get_or_create(&labels)
                .set(a.and_then(|a| a.last_failed).map_or(0.0, ts));
        }
        restorable
            .get_or_create(&l(&[("policy", name)]))
            .set(verdict.newest_restorable.map_or(0.0, ts));
        promised
            .get_or_create(&l(&[("policy", name)]))
            .set(verdict.promised_seconds.unwrap_or(0.0));
        protected.get_or_create(&l(&[("policy", name)])).set(
            if verdict.state == verdict::State::Protected {
                1.0
            } else {
                0.0
            },
        );
        // A standby reports its follower, not backups it does not take.
        if let Some(f) = followers.get(name) {
            let labels = l(&[("policy", name), ("target", &f.follow.target)]);
            follow_up
                .get_or_create(&labels)
                .set(if f.running && f.error.is_none() {
                    1.0
                } else {
                    0.0
                });
            follow_lag.get_or_create(&labels).set(
                f.pass
                    .as_ref()
                    .map_or((now - f.since).num_milliseconds() as f64 / 1000.0, |p| {
                        (now - p.checked).num_milliseconds() as f64 / 1000.0
                    }),
            );
            follow_source
                .get_or_create(&labels)
                .set(f.pass.as_ref().and_then(|p| p.source_until).map_or(0.0, ts));
            follow_commit
                .get_or_create(&labels)
                .set(f.pass.as_ref().and_then(|p| p.last_commit).map_or(0.0, ts));
            follow_applied
                .get_or_create(&labels)
                .inc_by(f.pass.as_ref().map_or(0, |p| p.transactions));
            follow_restarts.get_or_create(&labels).inc_by(f.restarts);
            continue;
        }
        // When `job` on `t` last succeeded and last failed (0: never).
        let newest = |ok: &Gauges, bad: &Gauges, t: &str, job: &str| -> Result<()> {
            let labels = l(&[("policy", name), ("target", t)]);
            for (g, success) in [(ok, true), (bad, false)] {
                let r = history.last(name, t, job, success)?;
                g.get_or_create(&labels)
                    .set(r.as_ref().map_or(0.0, |r| ts(r.finished)));
            }
            Ok(())
        };
        // `job`'s runs on `t` by result; returns the failures.
        let count = |t: &str, job: &str| -> Result<u64> {
            let (good, bad) = history.counts(name, t, job)?;
            for (result, n) in [("success", good), ("failure", bad)] {
                runs.get_or_create(&l(&[
                    ("policy", name),
                    ("target", t),
                    ("job", job),
                    ("result", result),
                ]))
                .inc_by(n);
            }
            Ok(bad)
        };
        let mut failed = 0;
        for t in &p.targets {
            for kind in ["full", "diff"] {
                let labels = l(&[("policy", name), ("target", t), ("type", kind)]);
                let ok = history.last(name, t, kind, true)?;
                let bad = history.last(name, t, kind, false)?;
                last_ok
                    .get_or_create(&labels)
                    .set(ok.as_ref().map_or(0.0, |r| ts(r.finished)));
                last_bad
                    .get_or_create(&labels)
                    .set(bad.as_ref().map_or(0.0, |r| ts(r.finished)));
                duration
                    .get_or_create(&labels)
                    .set(ok.as_ref().map_or(0.0, |r| {
                        (r.finished - r.started).num_milliseconds() as f64 / 1000.0
                    }));
                size.get_or_create(&labels)
                    .set(ok.as_ref().map_or(0.0, |r| r.size as f64));
            }
            newest(&verify_ok, &verify_bad, t, "verify")?;
            for job in ["full", "diff", "verify"] {
                failed += count(t, job)?;
            }
        }
        // Copies, under the target they copy to.
        for t in p.copy.iter().flat_map(|c| &c.to) {
            newest(&copy_ok, &copy_bad, t, "copy")?;
            failed += count(t, "copy")?;
        }
        errors.get_or_create(&l(&[("policy", name)])).inc_by(failed);
        if !p.wal.enabled {
            continue;
        }
        let status = streamers.get(name);
        up.get_or_create(&l(&[("policy", name)]))
            .set(if status.is_some_and(|s| s.up(now)) {
                1.0
            } else {
                0.0
            });
        restarts
            .get_or_create(&l(&[("policy", name)]))
            .inc_by(status.map_or(0, |s| s.restarts));
        let (st, beat) = view;
        let stale = StreamState::stale_after(p.wal.sync_interval);
        for t in &p.targets {
            let labels = l(&[("policy", name), ("target", t)]);
            let st = st.as_ref();
            lag.get_or_create(&labels)
                .set(st.and_then(|s| s.lag(t, now, stale, beat)).unwrap_or(0.0));
            shipped.get_or_create(&labels).set(
                st.and_then(|s| s.targets.get(t.as_str()))
                    .and_then(|s| s.until)
                    .map_or(0.0, ts),
            );
        }
        spool
            .get_or_create(&l(&[("policy", name)]))
            .set(st.as_ref().map_or(0.0, |s| s.spool_bytes as f64));
        spool_max
            .get_or_create(&l(&[("policy", name)]))
            .set(p.wal.spool_max as f64);
    }
    super::rotation_watch::metrics(&mut reg, shared, &cfg.security, now);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)
        .map_err(|e| Error::Other(format!("cannot render the metrics: {e}")))?;
    Ok(out)
}

/// The status page's rows for secret files and certificates.
fn key_views(
    shared: &Shared,
    security: &crate::config::Security,
    now: chrono::DateTime<Utc>,
) -> Vec<status_page::KeyView> {
    let Ok(found) = shared.rotation.lock().map(|f| f.clone()) else {
        return Vec::new();
    };
    let secrets = found
        .secrets_at(security, now)
        .into_iter()
        .map(|s| status_page::KeyView {
            what: format!("secret {}", s.item.setting),
            whose: s.item.path.display().to_string(),
            when: s.item.changed,
            note: s.item.error,
            at_risk: s.at_risk,
        });
    let certs = found
        .certs_at(security, now)
        .into_iter()
        .map(|c| status_page::KeyView {
            what: format!("certificate {}", c.item.endpoint),
            whose: c.item.users(),
            when: c.item.not_after,
            note: c.item.error,
            at_risk: c.at_risk,
        });
    secrets.chain(certs).collect()
}

/// The status page's content (`status_page.rs` renders it): each
/// database's verdict as `problems` decides it, with the run history
/// behind it.
fn status(shared: &Shared) -> Result<String> {
    let (ctx, history) = snapshot(shared)?;
    let cfg = ctx.cfg();
    let now = Utc::now();
    let followers = shared
        .followers
        .lock()
        .map(|f| f.keys().cloned().collect::<std::collections::BTreeSet<_>>())
        .unwrap_or_default();
    let mut page = status_page::Page {
        host: crate::lock::hostname(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        policies: Vec::new(),
        keys: key_views(shared, &cfg.security, now),
    };
    for p in &super::policies_now(cfg) {
        let Judged {
            evidence, verdict, ..
        } = judged(shared, &ctx, &history, p, now)?;
        let standby = followers.contains(&p.name);
        let mut targets = Vec::new();
        if !standby {
            for t in &p.targets {
                let backups = history.recent(&p.name, t, &["full", "diff"], true, 30)?;
                let lag = evidence
                    .targets
                    .iter()
                    .find(|e| &e.target == t)
                    .and_then(|e| e.stream.as_ref())
                    .and_then(|s| s.lag_seconds);
                targets.push(status_page::TargetView {
                    name: t.clone(),
                    last_backup: backups.first().cloned(),
                    last_drill: history.last(&p.name, t, "verify", true)?,
                    lag_seconds: lag,
                    failures: history.recent(&p.name, t, &["full", "diff", "verify"], false, 3)?,
                    backups,
                });
            }
        }
        page.policies.push(status_page::PolicyView {
            name: p.name.clone(),
            protected: verdict.state == verdict::State::Protected,
            reasons: verdict
                .reasons
                .iter()
                .map(|r| {
                    (
                        r.reason.word().to_string(),
                        r.target.clone(),
                        r.detail.clone(),
                    )
                })
                .collect(),
            newest_restorable: verdict.newest_restorable,
            promised_seconds: verdict.promised_seconds,
            standby,
            targets,
        });
    }
    Ok(status_page::render(&page, now))
}

/// What a request may see.
enum Access {
    Granted,
    Denied,
    /// A token is configured but cannot be read: nothing is served.
    Broken,
}

/// Whether the scraper accepts OpenMetrics (Prometheus says so first).
fn wants_openmetrics(req: &tiny_http::Request) -> bool {
    req.headers()
        .iter()
        .filter(|h| h.field.equiv("Accept"))
        .any(|h| h.value.as_str().contains("application/openmetrics-text"))
}

/// OpenMetrics as the classic Prometheus text format: a counter's family
/// is named with its `_total` samples (OpenMetrics names it without), and
/// there is no `# EOF`. What `promtool check metrics` and curl read.
pub fn classic_text(open: &str) -> String {
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        // The classic format has neither.
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Checks the request's bearer token against `[daemon] token_file`, read
/// now (a rotated token counts at once). No token configured: all is open,
/// and the daemon warned at start when that reaches past loopback.
fn access(shared: &Shared, req: &tiny_http::Request) -> Access {
    let file = match shared.ctx.read() {
        Ok(ctx) => ctx.cfg().daemon_token_file.clone(),
        Err(_) => return Access::Broken,
    };
    let Some(file) = file else {
        return Access::Granted;
    };
    let want = match crate::secret::read_secret_unaudited(&file) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("refusing /metrics: {e}");
            return Access::Broken;
        }
    };
    let given = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .and_then(|h| h.value.as_str().strip_prefix("Bearer "))
        .map(str::trim);
    use age::secrecy::ExposeSecret;
    match given {
        Some(g) if same(g.as_bytes(), want.expose_secret().as_bytes()) => Access::Granted,
        _ => Access::Denied,
    }
}

/// Compares without stopping at the first difference, so the time taken
/// says nothing about how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `listen` reaches only this host.
pub fn loopback_only(listen: &str) -> bool {
    listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

/// Serves the endpoint on its own thread; the returned server stops with `unblock`.
pub fn serve(listen: &str, shared: Arc<Shared>) -> Result<Arc<tiny_http::Server>> {
    let server = Arc::new(tiny_http::Server::http(listen).map_err(|e| {
        Error::Other(format!(
            "cannot listen on {listen} (daemon.listen): {e}: choose a free address"
        ))
    })?);
    let srv = server.clone();
    std::thread::spawn(move || {
        for req in srv.incoming_requests() {
            let access = access(&shared, &req);
            let (code, body, kind) = match (req.url(), access) {
                (_, Access::Broken) => (
                    500,
                    "the token file cannot be read: see dr's log\n".to_string(),
                    "text/plain",
                ),
                // Without the token (when one is set), the status and no
                // detail: names of policies and targets stay private.
                ("/healthz", access) => {
                    let detail = matches!(access, Access::Granted);
                    match problems(&shared) {
                        Ok(p) if p.is_empty() => {
                            (200, "{\"status\":\"ok\"}".to_string(), "application/json")
                        }
                        Ok(p) if detail => (
                            503,
                            serde_json::json!({"status": "unhealthy", "problems": p}).to_string(),
                            "application/json",
                        ),
                        Err(e) if detail => (
                            500,
                            format!("{{\"error\":{:?}}}", e.to_string()),
                            "application/json",
                        ),
                        Ok(_) | Err(_) => (
                            503,
                            "{\"status\":\"unhealthy\"}".to_string(),
                            "application/json",
                        ),
                    }
                }
                ("/metrics", Access::Denied) => (
                    401,
                    "the metrics need `Authorization: Bearer <token>` ([daemon] token_file)\n"
                        .to_string(),
                    "text/plain",
                ),
                ("/metrics", Access::Granted) => match metrics(&shared) {
                    // Prometheus asks for OpenMetrics; anything else (curl,
                    // promtool, older scrapers) gets the classic text format.
                    Ok(m) if wants_openmetrics(&req) => (
                        200,
                        m,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                    Ok(m) => (
                        200,
                        classic_text(&m),
                        "text/plain; version=0.0.4; charset=utf-8",
                    ),
                    Err(e) => (500, e.to_string(), "text/plain"),
                },
                ("/", Access::Denied) => (
                    401,
                    "the status page needs `Authorization: Bearer <token>` ([daemon] token_file), as /metrics does\n"
                        .to_string(),
                    "text/plain",
                ),
                ("/", Access::Granted) => match status(&shared) {
                    Ok(page) => (200, page, "text/html; charset=utf-8"),
                    Err(e) => (500, e.to_string(), "text/plain"),
                },
                _ => (
                    404,
                    "not found: try /, /healthz or /metrics\n".into(),
                    "text/plain",
                ),
            };
            let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], kind.as_bytes());
            let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
            if let Ok(h) = header {
                resp = resp.with_header(h);
            }
            if code == 401
                && let Ok(h) =
                    tiny_http::Header::from_bytes(&b"WWW-Authenticate"[..], &b"Bearer"[..])
            {
                resp = resp.with_header(h);
            }
            let _ = req.respond(resp);
        }
    });
    Ok(server)
}
