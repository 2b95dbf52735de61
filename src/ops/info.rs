//! What exists: every policy's backups on every target.
//!
//! The JSON document is a contract documented in README.md:
//! `{"policies":[{"name","source":{"kind",...},"targets":[{"name","kind",
//! "backups":[{"label","type","parent","timestamp_start","timestamp_stop",
//! "size","stored_size"}]}]}]}`. Secrets never appear in it.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};

use super::report::BackupKind;
use super::source::Source;
use super::{PolicyRepo, TargetFilter, human_bytes};
use crate::config::{self, PgSource, Policy, Target, TargetKind};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::repo::{self, BackupType};
use crate::sqlite::stream::StreamState;

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

/// The WAL of a policy on one target.
#[derive(Debug, Serialize)]
pub struct WalInfo {
    pub generations: Vec<GenerationInfo>,
    /// Instants a `--at` restore can reach, merged, oldest first.
    pub windows: Vec<repo::wal::Window>,
    /// The streamer on this host, as it last reported (none if it never ran here).
    pub stream: Option<StreamInfo>,
}

/// One generation: an unbroken run of commits.
#[derive(Debug, Serialize)]
pub struct GenerationInfo {
    pub id: String,
    pub segments: usize,
    pub stored_size: u64,
    pub first_frame: Option<u64>,
    pub last_frame: Option<u64>,
    pub first_commit: Option<DateTime<Utc>>,
    /// Until when every commit is in the generation's segments.
    pub covered_until: Option<DateTime<Utc>>,
    /// Backups that a replay of this generation can start from.
    pub bases: Vec<String>,
    /// Missing frames between stored segments: nothing after a gap can be
    /// replayed from a backup before it.
    pub gaps: Vec<String>,
}

/// The local streamer's view of this target.
#[derive(Debug, Serialize)]
pub struct StreamInfo {
    pub generation: String,
    pub host: String,
    pub pid: u32,
    pub updated: Option<DateTime<Utc>>,
    /// Seconds since the oldest commit not yet on this target (0: caught up).
    pub lag_seconds: Option<f64>,
    /// Until when every commit is on this target.
    pub shipped_until: Option<DateTime<Utc>>,
    pub spool_bytes: u64,
    pub spool_max: u64,
    pub spool_full: bool,
    pub error: Option<String>,
}

fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// One committed backup.
#[derive(Debug, Serialize)]
pub struct BackupInfo {
    pub label: String,
    #[serde(rename = "type")]
    pub kind: BackupKind,
    pub parent: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub timestamp_start: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub timestamp_stop: DateTime<Utc>,
    pub size: u64,
    pub stored_size: u64,
    /// Set when the manifest is damaged; the backup cannot be restored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// PostgreSQL: the first and last WAL segment the backup needs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_stop: Option<String>,
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

/// What one target holds for a policy, as a source lists it.
#[derive(Debug, Default)]
pub struct Listing {
    pub backups: Vec<BackupInfo>,
    pub incomplete: Vec<String>,
    pub wal: Option<WalInfo>,
    /// Why the target could not be read, if it could not.
    pub error: Option<String>,
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

/// A PostgreSQL policy's backups on one target, from pgBackRest's own info.
pub fn list_pg(ctx: &Context, policy: &Policy, pg: &PgSource, target: &Target) -> Listing {
    let mut l = Listing::default();
    let list = match super::pg::list(ctx, policy, pg, target) {
        Ok(list) => list,
        Err(e) => {
            l.error = Some(e.to_string());
            return l;
        }
    };
    for b in list {
        let Some(kind) = BackupKind::from_word(&b.kind) else {
            l.error = Some(format!(
                "pgbackrest lists backup {} with type '{}', which this dr does not know",
                b.label, b.kind
            ));
            continue;
        };
        l.backups.push(BackupInfo {
            kind,
            label: b.label,
            parent: b.prior,
            timestamp_start: b.start,
            timestamp_stop: b.stop,
            size: b.delta,
            stored_size: b.repo_delta.unwrap_or(0),
            error: b
                .error
                .then(|| "pgBackRest reports errors in this backup".to_string()),
            archive_start: b.archive_start,
            archive_stop: b.archive_stop,
        });
    }
    l
}

/// A SQLite policy's backups and WAL on one target. When the target cannot
/// be read, the streamer's own view still says why and how far behind.
pub fn list_sqlite(ctx: &Context, policy: &Policy, target: &Target) -> Listing {
    let mut l = Listing::default();
    if let Err(e) = collect(ctx, target, policy, &mut l) {
        l.error = Some(e.to_string());
        let stream = stream_info(ctx, policy, &target.name);
        l.wal = stream.map(|s| WalInfo {
            generations: Vec::new(),
            windows: Vec::new(),
            stream: Some(s),
        });
    }
    l
}

fn collect(ctx: &Context, t: &Target, p: &Policy, ti: &mut Listing) -> Result<()> {
    let store = ctx.storage(t)?;
    let repo = PolicyRepo {
        storage: store.as_ref(),
        policy: &p.name,
    };
    let mut bases = Vec::new();
    let dirs = repo.dirs()?;
    ti.incomplete = dirs
        .iter()
        .filter(|d| !d.has_manifest)
        .map(|d| d.label.to_string())
        .collect();
    for c in repo.committed_of(&dirs) {
        let label = c.dir.label.to_string();
        match c.manifest {
            Ok(m) => ti.backups.push({
                bases.extend(super::wal_base(&m));
                BackupInfo {
                    label,
                    kind: m.kind.into(),
                    parent: m.parent.as_ref().map(|p| p.to_string()),
                    timestamp_start: m.timestamp_start,
                    timestamp_stop: m.timestamp_stop,
                    size: m.plain_size(),
                    stored_size: m.stored_size(),
                    error: None,
                    archive_start: None,
                    archive_stop: None,
                }
            }),
            Err(e) => ti.backups.push(BackupInfo {
                label,
                kind: c.dir.label.kind().into(),
                parent: (c.dir.label.kind() == BackupType::Diff)
                    .then(|| c.dir.label.full_label().to_string()),
                timestamp_start: c.dir.label.time(),
                timestamp_stop: c.dir.label.time(),
                size: 0,
                stored_size: 0,
                error: Some(e.to_string()),
                archive_start: None,
                archive_stop: None,
            }),
        }
    }
    let prefix = repo::wal::wal_prefix(&p.name);
    let listing = store.list(&prefix)?;
    let state = StreamState::load(&ctx.state().stream_state(&p.name));
    if listing.is_empty() && !p.wal.enabled && state.is_none() {
        return Ok(());
    }
    let segs = repo::wal::segments(&prefix, &listing);
    let gaps = repo::wal::gaps(&segs);
    let generations = repo::wal::generations(&prefix, &listing)
        .into_iter()
        .map(|g| {
            let mine: Vec<_> = segs.iter().filter(|s| s.generation == g).collect();
            GenerationInfo {
                segments: mine.len(),
                stored_size: mine.iter().map(|s| s.size).sum(),
                first_frame: mine.first().map(|s| s.first),
                last_frame: mine.last().map(|s| s.last),
                first_commit: mine.first().map(|s| s.first_commit),
                covered_until: mine.iter().map(|s| s.until).max(),
                bases: bases
                    .iter()
                    .filter(|b| b.generation == g)
                    .map(|b| b.label.clone())
                    .collect(),
                gaps: gaps
                    .iter()
                    .filter(|x| x.generation == g)
                    .map(ToString::to_string)
                    .collect(),
                id: g,
            }
        })
        .collect();
    ti.wal = Some(WalInfo {
        generations,
        windows: repo::wal::windows(&bases, &segs),
        stream: stream_info(ctx, p, &t.name),
    });
    Ok(())
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

/// The local streamer's last report for one target, if it ever ran here.
fn stream_info(ctx: &Context, p: &Policy, target: &str) -> Option<StreamInfo> {
    let st = StreamState::load(&ctx.state().stream_state(&p.name))?;
    let shipped = st.targets.get(target);
    Some(StreamInfo {
        lag_seconds: st.lag(target, Utc::now()),
        shipped_until: shipped.and_then(|s| s.until),
        error: shipped.and_then(|s| s.error.clone()),
        generation: st.generation.clone(),
        host: st.host.clone(),
        pid: st.pid,
        updated: st.updated,
        spool_bytes: st.spool_bytes,
        spool_max: st.spool_max,
        spool_full: st.spool_full,
    })
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
            let _ = writeln!(
                s,
                "      streamer on {} (pid {}): lag {}, spool {} of {}{}{}",
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
}
