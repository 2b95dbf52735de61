//! What exists: every policy's backups on every target.
//!
//! The JSON document is a contract documented in README.md:
//! `{"policies":[{"name","source":{"kind",...},"targets":[{"name","kind",
//! "backups":[{"label","type","parent","timestamp_start","timestamp_stop",
//! "size","stored_size"}]}]}]}`. Secrets never appear in it.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::listing::{BackupInfo, WalInfo};
use super::report::BackupKind;
use super::source::Source;
use super::verdict::{self, Evidence, Promise, Reason, StreamEvidence, TargetEvidence, Verdict};
use super::{TargetFilter, human_bytes};
use crate::config::{self, Policy, TargetKind};
use crate::context::Context;
use crate::error::{Error, Result};

/// The whole `dr info` document.
#[derive(Debug, Serialize)]
pub struct Info {
    pub policies: Vec<PolicyInfo>,
}

/// One policy (one database: a fleet's databases are listed one by one).
#[derive(Debug, Serialize)]
pub struct PolicyInfo {
    pub name: String,
    pub source: SourceInfo,
    /// Protected or at risk, and why (`ops::verdict::judge`).
    pub verdict: Verdict,
    pub targets: Vec<TargetInfo>,
}

/// Where the data comes from (no secrets).
#[derive(Debug, Serialize)]
pub struct SourceInfo {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stanza: Option<String>,
}

/// One target of a policy.
#[derive(Debug, Serialize)]
pub struct TargetInfo {
    pub name: String,
    pub kind: String,
    pub location: String,
    pub backups: Vec<BackupInfo>,
    /// Labels of interrupted backups (no manifest) waiting for expire.
    pub incomplete: Vec<String>,
    /// The daemon's runs of each scheduled job on this target.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<RunInfo>,
    /// WAL streaming on this target (SQLite policies with segments or `[wal]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal: Option<WalInfo>,
    /// Why the target could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Backups hidden by S3 delete markers (versioned or locked buckets).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<String>,
    /// From the oldest to the newest instant a restore from this target
    /// reaches (a backup's own instant, or any instant of a WAL window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub covered: Option<crate::repo::wal::Window>,
    /// The policy's `retention.window`, when it asks for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_asked: Option<String>,
    /// PostgreSQL: the newest WAL segment archived on this target and when
    /// it was stored (a point-in-time restore reaches that far).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<super::pg::ArchivedWal>,
    /// SQLite policies with `[schedule] verify`: the newest restore drills
    /// recorded on the target (by whichever host has the key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drills: Option<crate::repo::drill::Drills>,
}

/// A scheduled job as the daemon ran it.
#[derive(Debug, Serialize)]
pub struct RunInfo {
    /// `full`, `diff` or `verify`.
    #[serde(rename = "type")]
    pub kind: String,
    pub schedule: String,
    pub next_run: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_failure: Option<DateTime<Utc>>,
    /// The error of the last failure, when it is newer than the last success.
    pub error: Option<String>,
}

fn source_info(p: &Policy) -> SourceInfo {
    match &p.source {
        config::Source::Sqlite { path } => SourceInfo {
            kind: "sqlite".into(),
            path: Some(path.display().to_string()),
            stanza: None,
        },
        config::Source::Postgres(pg) => SourceInfo {
            kind: "postgres".into(),
            path: Some(pg.data_dir.display().to_string()),
            stanza: Some(pg.stanza.clone()),
        },
    }
}

impl Info {
    /// What `dr info` must not exit 0 over: any database at risk, each
    /// reason named once. Damage (a damaged backup, a WAL gap, a backup
    /// hidden by delete markers) is exit 3; a backup only a newer dr reads
    /// exit 8; any other risk exit 1. Listed after the output, which still
    /// shows everything that could be read.
    pub fn problems(&self) -> Option<Error> {
        let mut all = Vec::new();
        let mut damaged = false;
        let mut newer = false;
        for p in &self.policies {
            for r in &p.verdict.reasons {
                damaged |= matches!(r.reason, Reason::Damaged | Reason::HiddenByDeleteMarker);
                newer |= r.reason == Reason::NewerFormat;
                let at = r
                    .target
                    .as_ref()
                    .map_or(String::new(), |t| format!(" target '{t}'"));
                all.push(format!(
                    "policy '{}'{at}: {}: {}",
                    p.name,
                    r.reason.word(),
                    r.detail
                ));
            }
        }
        if all.is_empty() {
            return None;
        }
        let text = format!(
            "{} database(s) at risk:\n  {}",
            self.policies
                .iter()
                .filter(|p| p.verdict.state == verdict::State::AtRisk)
                .count(),
            all.join("\n  ")
        );
        Some(if damaged {
            Error::VerifyFailed(text)
        } else if newer {
            Error::Newer(text)
        } else {
            Error::Other(text)
        })
    }
}

/// What is wrong with a policy's source as it is on disk now, and whether
/// it is a fleet database that no longer exists there (kept only in the
/// repository). Reads only the file's header: nothing is opened through
/// SQLite.
fn source_evidence(p: &Policy) -> (Vec<(Reason, String)>, bool) {
    let path = match &p.source {
        config::Source::Sqlite { path } => path,
        config::Source::Postgres(pg) => return (pg_evidence(p, pg), false),
    };
    let found = std::fs::metadata(path).and_then(|_| verdict::not_streamable(path));
    match found {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && p.member.is_some() => {
            (Vec::new(), true)
        }
        Err(e) => (
            vec![(
                Reason::Unreadable,
                format!("{}: {}", path.display(), crate::error::io_reason(&e)),
            )],
            false,
        ),
        Ok(Some(why)) if p.wal.enabled => (vec![(Reason::CannotStream, why)], false),
        Ok(_) => (Vec::new(), false),
    }
}

/// What is wrong with a PostgreSQL cluster's archiving, when the cluster
/// answers on this host (a host without it has no commits to lose).
pub fn pg_evidence(p: &Policy, pg: &config::PgSource) -> Vec<(Reason, String)> {
    crate::pg::archiver::status(pg)
        .and_then(|a| a.risk(&p.name, &pg.stanza))
        .map(|why| (Reason::ArchiveFailing, why))
        .into_iter()
        .collect()
}

/// The evidence `dr info` has of one target: what it holds, the runs
/// recorded on this host, the local streamer's report.
fn target_evidence(t: &TargetInfo) -> TargetEvidence {
    let failing = t
        .runs
        .iter()
        .filter(|r| r.kind != "verify")
        .find_map(|r| r.error.clone());
    let verify_failed = t
        .runs
        .iter()
        .filter(|r| r.kind == "verify")
        .find_map(|r| r.error.clone());
    // Drills: this host's, and those the host with the key recorded on
    // the target; a recorded failure counts when no pass came after it.
    let here = t
        .runs
        .iter()
        .filter(|r| r.kind == "verify")
        .filter_map(|r| r.last_success)
        .max();
    let recorded = t.drills.as_ref();
    let drill_passed = here.max(recorded.and_then(|d| d.passed.as_ref()).map(|d| d.finished));
    let verify_failed = verify_failed.or_else(|| {
        recorded
            .and_then(|d| d.failed.as_ref())
            .filter(|f| drill_passed.is_none_or(|p| f.finished > p))
            .map(|f| {
                format!(
                    "the restore drill on host {} at {} failed: {}",
                    f.host,
                    f.finished
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    f.error.as_deref().unwrap_or("?")
                )
            })
    });
    let named = |newer: bool| {
        t.backups
            .iter()
            .filter(|b| b.newer_format == newer)
            .filter_map(|b| b.error.as_ref().map(|e| format!("backup {}: {e}", b.label)))
            .collect::<Vec<String>>()
    };
    let mut damaged = named(false);
    damaged.extend(
        t.wal
            .iter()
            .flat_map(|w| &w.generations)
            .flat_map(|g| &g.gaps)
            .map(|gap| format!("WAL {gap}")),
    );
    TargetEvidence {
        target: t.name.clone(),
        unreachable: t.error.clone(),
        newest_restorable: t.covered.map(|c| c.end),
        damaged,
        newer: named(true),
        hidden: t.hidden.clone(),
        failing,
        verify_failed,
        drill_passed,
        since: t.covered.map(|c| c.start),
        stream: t
            .wal
            .as_ref()
            .and_then(|w| w.stream.as_ref())
            .map(|s| StreamEvidence {
                running: s.running,
                lag_seconds: s.lag_seconds,
                error: s.error.clone(),
                spool_full: s.spool_full,
            }),
    }
}

/// A file a fleet's pattern matches that no database name can stand for:
/// listed as a database at risk, never skipped in silence.
pub fn excluded(policy: &Policy, file: &std::path::Path) -> PolicyInfo {
    let now = Utc::now();
    let evidence = Evidence {
        promise: Promise::of(policy, now),
        source: vec![(
            Reason::ExcludedByName,
            format!(
                "{} matches the fleet's pattern but its name is not UTF-8 or empty: it is NOT backed up; rename it",
                file.display()
            ),
        )],
        retired: false,
        targets: Vec::new(),
        security: Vec::new(),
    };
    PolicyInfo {
        name: format!(
            "{}/{}",
            policy.name,
            file.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        source: SourceInfo {
            kind: "sqlite".into(),
            path: Some(file.display().to_string()),
            stanza: None,
        },
        verdict: verdict::judge(&evidence, now),
        targets: Vec::new(),
    }
}

/// Collects info for the selected policies and targets. A target that cannot
/// be read is reported in place, not as a failure of the whole command.
pub fn info(ctx: &Context, policies: &[&Policy], filter: &TargetFilter) -> Result<Info> {
    let mut out = Info {
        policies: Vec::new(),
    };
    // Secret files' ages and the certificates of the endpoints of the
    // targets listed: one handshake each, for all policies.
    let findings = super::rotation::Findings::gather(ctx.cfg(), super::rotation::Probe::Targets);
    for p in policies {
        let source = Source::of(p);
        let mut targets = Vec::new();
        for t in filter.select(ctx.cfg(), p)? {
            let l = source.list(ctx, t);
            let covered = covered(&l.backups, l.wal.as_ref(), l.archive.as_ref());
            targets.push(TargetInfo {
                name: t.name.clone(),
                kind: t.kind.word().into(),
                location: match &t.kind {
                    TargetKind::Local { path } => path.display().to_string(),
                    TargetKind::S3(s) => format!("s3://{}/{}", s.bucket, s.prefix),
                },
                backups: l.backups,
                incomplete: l.incomplete,
                runs: runs(ctx, p, &t.name),
                covered,
                window_asked: p
                    .retention
                    .window
                    .map(|w| humantime::format_duration(w).to_string()),
                wal: l.wal,
                error: l.error,
                hidden: l.hidden,
                archive: l.archive,
                drills: drills_of(ctx, p, t),
            });
        }
        let now = Utc::now();
        let (problems, retired) = source_evidence(p);
        let evidence = Evidence {
            promise: Promise::of(p, now),
            source: problems,
            retired,
            targets: targets.iter().map(target_evidence).collect(),
            security: findings
                .risks(&ctx.cfg().security, p, now)
                .into_iter()
                .filter(|r| {
                    r.target
                        .as_ref()
                        .is_none_or(|t| targets.iter().any(|i| &i.name == t))
                })
                .collect(),
        };
        out.policies.push(PolicyInfo {
            name: p.name.clone(),
            source: source_info(p),
            verdict: verdict::judge(&evidence, now),
            targets,
        });
    }
    Ok(out)
}

/// The drills recorded on `target` for a SQLite policy that schedules
/// them (one listing); `None` when it schedules none or they cannot be read.
fn drills_of(
    ctx: &Context,
    p: &Policy,
    target: &config::Target,
) -> Option<crate::repo::drill::Drills> {
    if p.schedule.verify.is_none() || !matches!(p.source, config::Source::Sqlite { .. }) {
        return None;
    }
    ctx.storage(target)
        .and_then(|s| crate::repo::drill::newest(s.as_ref(), &p.name))
        .inspect_err(|e| tracing::warn!(policy = %p.name, target = %target.name, "cannot read the drills recorded on the target: {e}"))
        .ok()
}

/// What a target covers: the instants of its restorable backups, its WAL
/// windows and (PostgreSQL) its newest archived WAL, oldest to newest.
/// PostgreSQL's archive reaches a commit only from a backup on: without
/// one, archived WAL restores nothing.
fn covered(
    backups: &[BackupInfo],
    wal: Option<&WalInfo>,
    archive: Option<&super::pg::ArchivedWal>,
) -> Option<crate::repo::wal::Window> {
    let restorable = backups.iter().filter(|b| b.error.is_none());
    let newest_stop = restorable.clone().map(|b| b.timestamp_stop).max();
    let archived = archive
        .and_then(|a| a.stored)
        .filter(|t| newest_stop.is_some_and(|s| *t >= s));
    let instants = restorable
        .map(|b| b.timestamp_start)
        .chain(
            wal.into_iter()
                .flat_map(|w| &w.windows)
                .flat_map(|w| [w.start, w.end]),
        )
        .chain(archived);
    let (mut lo, mut hi) = (None::<DateTime<Utc>>, None::<DateTime<Utc>>);
    for t in instants {
        lo = Some(lo.map_or(t, |l| l.min(t)));
        hi = Some(hi.map_or(t, |h| h.max(t)));
    }
    Some(crate::repo::wal::Window {
        start: lo?,
        end: hi?,
    })
}

/// The daemon's history of `p` on `target`, if the daemon ran on this host.
fn runs(ctx: &Context, p: &Policy, target: &str) -> Vec<RunInfo> {
    if !ctx.state().history_db().exists() {
        return Vec::new();
    }
    let Ok(h) = crate::history::History::open(ctx.state().root()) else {
        return Vec::new();
    };
    let now = Utc::now();
    [
        ("full", &p.schedule.full),
        ("diff", &p.schedule.diff),
        ("verify", &p.schedule.verify),
    ]
    .into_iter()
    .filter_map(|(kind, spec)| {
        let spec = spec.as_ref()?;
        let ok = h.last(&p.name, target, kind, true).ok().flatten();
        let bad = h.last(&p.name, target, kind, false).ok().flatten();
        let failing = bad
            .as_ref()
            .filter(|b| ok.as_ref().is_none_or(|o| b.finished > o.finished));
        Some(RunInfo {
            kind: kind.into(),
            schedule: spec.text.clone(),
            next_run: spec.next_after(now),
            last_success: ok.as_ref().map(|r| r.finished),
            last_failure: bad.as_ref().map(|r| r.finished),
            error: failing.and_then(|b| b.error.clone()),
        })
    })
    .collect()
}

/// The human table: fulls with their diffs indented beneath them.
pub fn render(info: &Info) -> String {
    let mut s = String::new();
    for p in &info.policies {
        let _ = writeln!(
            s,
            "policy {} ({} {})",
            p.name,
            p.source.kind,
            p.source.path.as_deref().unwrap_or("")
        );
        render_verdict(&mut s, &p.verdict);
        for t in &p.targets {
            let _ = writeln!(s, "  target {} ({} {})", t.name, t.kind, t.location);
            if let Some(e) = &t.error {
                let _ = writeln!(s, "    error: {e}");
                if let Some(w) = &t.wal {
                    render_wal(&mut s, w);
                }
                continue;
            }
            if t.backups.is_empty() {
                let _ = writeln!(s, "    no backups");
            } else {
                let _ = writeln!(
                    s,
                    "    {:<38} {:<5} {:<20} {:<9} {:>10} {:>10} {:>6}",
                    "LABEL", "TYPE", "START (UTC)", "DURATION", "SIZE", "STORED", "FORMAT"
                );
            }
            let fulls = t.backups.iter().filter(|b| b.kind == BackupKind::Full);
            // A diff's parent is its full; an incremental's may be another
            // incremental: each is shown under the full its chain starts at.
            let root = |b: &BackupInfo| -> Option<String> {
                let mut cur = b;
                for _ in 0..t.backups.len() {
                    if cur.kind == BackupKind::Full {
                        return Some(cur.label.clone());
                    }
                    cur = t
                        .backups
                        .iter()
                        .find(|p| Some(&p.label) == cur.parent.as_ref())?;
                }
                None
            };
            let orphans = t
                .backups
                .iter()
                .filter(|b| b.kind != BackupKind::Full && root(b).is_none());
            for f in fulls {
                line(&mut s, f, "");
                for d in t
                    .backups
                    .iter()
                    .filter(|d| d.kind != BackupKind::Full && root(d).as_ref() == Some(&f.label))
                {
                    line(&mut s, d, "└ ");
                }
            }
            for o in orphans {
                line(&mut s, o, "? ");
            }
            for i in &t.incomplete {
                let _ = writeln!(
                    s,
                    "    {i:<38} interrupted (no manifest; expire removes it after the grace period)"
                );
            }
            if let Some(w) = &t.wal {
                render_wal(&mut s, w);
            }
            if let Some(a) = &t.archive {
                let _ = writeln!(
                    s,
                    "    WAL archived up to segment {}{}",
                    a.segment,
                    a.stored.map_or(String::new(), |t| format!(
                        ", stored {} UTC",
                        t.format("%Y-%m-%d %H:%M:%S")
                    ))
                );
            }
            if let Some(c) = &t.covered {
                let _ = writeln!(
                    s,
                    "    covered: {} .. {} UTC ({}){}",
                    c.start.format("%Y-%m-%d %H:%M:%S"),
                    c.end.format("%Y-%m-%d %H:%M:%S"),
                    humantime::format_duration(std::time::Duration::from_secs(
                        (c.end - c.start).num_seconds().max(0) as u64
                    )),
                    t.window_asked.as_ref().map_or(String::new(), |w| format!(
                        ", retention.window asks for {w}"
                    ))
                );
            }
            if let Some(d) = &t.drills {
                let at = |r: &crate::repo::drill::DrillRecord| {
                    format!(
                        "{} UTC on host {} ({})",
                        r.finished.format("%Y-%m-%d %H:%M:%S"),
                        r.host,
                        r.label
                    )
                };
                let _ = writeln!(
                    s,
                    "    restore drills recorded: {}{}",
                    d.passed
                        .as_ref()
                        .map_or("none passed".to_string(), |p| format!("passed {}", at(p))),
                    d.failed
                        .as_ref()
                        .map_or(String::new(), |f| format!("; FAILED since: {}", at(f)))
                );
            }
            for r in &t.runs {
                let fmt = |t: &Option<DateTime<Utc>>| {
                    t.map_or("-".to_string(), |t| {
                        t.format("%Y-%m-%d %H:%M:%S").to_string()
                    })
                };
                let _ = writeln!(
                    s,
                    "    {} ({}): last ok {}, last failure {}, next {}{}",
                    r.kind,
                    r.schedule,
                    fmt(&r.last_success),
                    fmt(&r.last_failure),
                    fmt(&r.next_run),
                    r.error
                        .as_ref()
                        .map_or(String::new(), |e| format!("\n      failing: {e}"))
                );
            }
        }
    }
    if info.policies.is_empty() {
        s.push_str("no policies configured\n");
    }
    s
}

fn render_verdict(s: &mut String, v: &Verdict) {
    let newest = match (v.newest_restorable, v.age_seconds) {
        (Some(t), Some(age)) => format!(
            "newest restorable instant {} UTC ({} ago{})",
            t.format("%Y-%m-%d %H:%M:%S%.3f"),
            humantime::format_duration(std::time::Duration::from_secs(age as u64)),
            v.promised_seconds.map_or(String::new(), |p| format!(
                ", promised within {}",
                humantime::format_duration(std::time::Duration::from_secs(p as u64))
            ))
        ),
        _ => "nothing restorable".into(),
    };
    match v.state {
        verdict::State::Protected => {
            let _ = writeln!(s, "  PROTECTED: {newest}");
        }
        verdict::State::AtRisk => {
            let _ = writeln!(s, "  AT RISK: {newest}");
            for r in &v.reasons {
                let at = r
                    .target
                    .as_ref()
                    .map_or(String::new(), |t| format!(" (target {t})"));
                let _ = writeln!(s, "    {}{at}: {}", r.reason.word(), r.detail);
            }
        }
    }
}

fn render_wal(s: &mut String, w: &WalInfo) {
    let fmt = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string();
    let _ = writeln!(s, "    WAL");
    for g in &w.generations {
        let _ = writeln!(
            s,
            "      generation {}: {} segments ({}), commits {} .. covered until {}, bases: {}",
            g.id,
            g.segments,
            human_bytes(g.stored_size),
            g.first_commit.as_ref().map_or("-".into(), fmt),
            g.covered_until.as_ref().map_or("-".into(), fmt),
            if g.bases.is_empty() {
                "none".to_string()
            } else {
                g.bases.join(", ")
            }
        );
        for gap in &g.gaps {
            let _ = writeln!(s, "        GAP: {gap}");
        }
    }
    if w.windows.is_empty() {
        let _ = writeln!(
            s,
            "      restore window: none (no backup with a WAL position yet)"
        );
    }
    for win in &w.windows {
        let _ = writeln!(
            s,
            "      restore window: {} .. {} UTC",
            fmt(&win.start),
            fmt(&win.end)
        );
    }
    match &w.stream {
        Some(st) => {
            let state = match st.stopped_seconds_ago {
                Some(ago) if !st.running => format!("STOPPED {ago:.0} s ago, "),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "      streamer on {} (pid {}): {state}lag {}, spool {} of {}{}{}",
                st.host,
                st.pid,
                st.lag_seconds.map_or("-".into(), |l| format!("{l:.1}s")),
                human_bytes(st.spool_bytes),
                human_bytes(st.spool_max),
                if st.spool_full { " FULL" } else { "" },
                st.error
                    .as_ref()
                    .map_or(String::new(), |e| format!(", last error: {e}"))
            );
        }
        None => {
            let _ = writeln!(s, "      no streamer has run on this host");
        }
    }
}

fn line(s: &mut String, b: &BackupInfo, indent: &str) {
    let label = format!("{indent}{}", b.label);
    let dur = (b.timestamp_stop - b.timestamp_start).num_milliseconds() as f64 / 1000.0;
    let _ = writeln!(
        s,
        "    {:<38} {:<5} {:<20} {:<9} {:>10} {:>10} {:>6}",
        label,
        b.kind.to_string(),
        b.timestamp_start.format("%Y-%m-%d %H:%M:%S").to_string(),
        format!("{dur:.1}s"),
        human_bytes(b.size),
        human_bytes(b.stored_size),
        b.format.map_or("-".to_string(), |f| f.to_string())
    );
    if let Some(e) = &b.error {
        let _ = writeln!(s, "      damaged: {e}");
    }
    match b.locked_until.as_deref() {
        Some("append_only") | None => {}
        Some(t) => {
            let _ = writeln!(s, "      locked until {t} (S3 Object Lock)");
        }
    }
}
