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
use super::{TargetFilter, human_bytes};
use crate::config::{self, Policy, TargetKind};
use crate::context::Context;
use crate::error::{Error, Result};

/// The whole `dr info` document.
#[derive(Debug, Serialize)]
pub struct Info {
    pub policies: Vec<PolicyInfo>,
}

/// One policy.
#[derive(Debug, Serialize)]
pub struct PolicyInfo {
    pub name: String,
    pub source: SourceInfo,
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
    /// From the oldest to the newest instant a restore from this target
    /// reaches (a backup's own instant, or any instant of a WAL window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub covered: Option<crate::repo::wal::Window>,
    /// The policy's `retention.window`, when it asks for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_asked: Option<String>,
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
    /// What `dr info` must not exit 0 over: a damaged backup (exit 3), a WAL
    /// gap (exit 3), a target that could not be read (exit 1). Listed after
    /// the output, which still shows everything that could be read.
    pub fn problems(&self) -> Option<Error> {
        let mut damaged = Vec::new();
        let mut unreadable = Vec::new();
        for p in &self.policies {
            for t in &p.targets {
                if let Some(e) = &t.error {
                    unreadable.push(format!("policy '{}' target '{}': {e}", p.name, t.name));
                }
                for b in t
                    .backups
                    .iter()
                    .filter_map(|b| b.error.as_ref().map(|e| (b, e)))
                {
                    damaged.push(format!(
                        "policy '{}' target '{}' backup {}: {}",
                        p.name, t.name, b.0.label, b.1
                    ));
                }
                for g in t.wal.iter().flat_map(|w| &w.generations) {
                    for gap in &g.gaps {
                        damaged.push(format!("policy '{}' target '{}' WAL {gap}", p.name, t.name));
                    }
                }
            }
        }
        let all: Vec<String> = damaged.iter().chain(&unreadable).cloned().collect();
        if all.is_empty() {
            return None;
        }
        let text = format!(
            "dr info found {} problem(s):\n  {}",
            all.len(),
            all.join("\n  ")
        );
        Some(if damaged.is_empty() {
            Error::Other(text)
        } else {
            Error::VerifyFailed(text)
        })
    }
}

/// Collects info for the selected policies and targets. A target that cannot
/// be read is reported in place, not as a failure of the whole command.
pub fn info(ctx: &Context, policies: &[&Policy], filter: &TargetFilter) -> Result<Info> {
    let mut out = Info {
        policies: Vec::new(),
    };
    for p in policies {
        let source = Source::of(p);
        let mut targets = Vec::new();
        for t in filter.select(ctx.cfg(), p)? {
            let l = source.list(ctx, t);
            let covered = covered(&l.backups, l.wal.as_ref());
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
            });
        }
        out.policies.push(PolicyInfo {
            name: p.name.clone(),
            source: source_info(p),
            targets,
        });
    }
    Ok(out)
}

/// What a target covers: the instants of its restorable backups and its
/// WAL windows, from the oldest to the newest.
fn covered(backups: &[BackupInfo], wal: Option<&WalInfo>) -> Option<crate::repo::wal::Window> {
    let instants = backups
        .iter()
        .filter(|b| b.error.is_none())
        .map(|b| b.timestamp_start)
        .chain(
            wal.into_iter()
                .flat_map(|w| &w.windows)
                .flat_map(|w| [w.start, w.end]),
        );
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
                    "    {:<38} {:<5} {:<20} {:<9} {:>10} {:>10}",
                    "LABEL", "TYPE", "START (UTC)", "DURATION", "SIZE", "STORED"
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
        "    {:<38} {:<5} {:<20} {:<9} {:>10} {:>10}",
        label,
        b.kind.to_string(),
        b.timestamp_start.format("%Y-%m-%d %H:%M:%S").to_string(),
        format!("{dur:.1}s"),
        human_bytes(b.size),
        human_bytes(b.stored_size)
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
