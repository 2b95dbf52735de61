//! What a target holds for one policy, as each source lists it: backups,
//! interrupted backups, and (SQLite) the WAL and the local streamer's view.
//! Read-only: listing never writes, locks or takes over anything.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};

use super::PolicyRepo;
use super::report::BackupKind;
use crate::config::{PgSource, Policy, Target};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::repo::{self, BackupType};
use crate::sqlite::stream::{self, StreamState};

/// What one target holds for a policy, as a source lists it.
#[derive(Debug, Default)]
pub struct Listing {
    pub backups: Vec<BackupInfo>,
    pub incomplete: Vec<String>,
    pub wal: Option<WalInfo>,
    /// Why the target could not be read, if it could not.
    pub error: Option<String>,
    /// Backups hidden by S3 delete markers, each with what is hidden.
    pub hidden: Vec<String>,
    /// PostgreSQL: the newest WAL segment pgBackRest archived here.
    pub archive: Option<super::pg::ArchivedWal>,
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
    /// Whether the streamer is at work now (its process lives and it
    /// reported within three sync intervals).
    pub running: bool,
    /// When not: how long ago it last reported.
    pub stopped_seconds_ago: Option<f64>,
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
    /// The manifest was written by a newer dr (`error` says which format):
    /// not damage; an upgraded dr restores it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub newer_format: bool,
    /// The repository format of a SQLite backup (`docs/repository-format.md`):
    /// 2 has a framed data object. Absent for PostgreSQL (pgBackRest's
    /// format) and for a manifest that could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<u32>,
    /// PostgreSQL: the first and last WAL segment the backup needs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_stop: Option<String>,
    /// Why dr took it on its own: `generation` (the base of a new WAL
    /// generation) or `wal` (the WAL since the newest backup passed
    /// `wal.diff_after`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// Under S3 Object Lock until then (`append_only` targets: never
    /// deleted by dr, shown as `"append_only"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<String>,
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
    l.archive = list.newest_wal;
    for b in list.backups {
        let kind = match super::pg::kind_of(&b) {
            Ok(k) => k,
            Err(e) => {
                l.error = Some(e.to_string());
                continue;
            }
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
            newer_format: false,
            format: None,
            archive_start: b.archive_start,
            archive_stop: b.archive_stop,
            trigger: None,
            locked_until: None,
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
        let stream = StreamState::load(&ctx.state().stream_state(&policy.name)).map(|st| {
            let beat = stream::beat_at(&ctx.state().stream_beat(st.pid));
            stream_info(&st, policy, &target.name, beat)
        });
        l.wal = stream.map(|s| WalInfo {
            generations: Vec::new(),
            windows: Vec::new(),
            stream: Some(s),
        });
    }
    l
}

/// What keeps a backup written at `modified` from being deleted now.
fn held(p: crate::storage::Protection, modified: DateTime<Utc>) -> Option<String> {
    match p {
        crate::storage::Protection::AppendOnly => Some("append_only".into()),
        _ => p
            .held_until(modified, Utc::now())
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
    }
}

fn collect(ctx: &Context, t: &Target, p: &Policy, ti: &mut Listing) -> Result<()> {
    let store = ctx.storage(t)?;
    let repo = PolicyRepo {
        storage: store.as_ref(),
        policy: &p.name,
    };
    let mut bases = Vec::new();
    let dirs = repo.dirs()?;
    ti.hidden = repo
        .hidden()?
        .into_iter()
        .map(|(l, names)| format!("backup {l}: {} hidden by a delete marker", names.join(", ")))
        .collect();
    ti.incomplete = dirs
        .iter()
        .filter(|d| !d.has_manifest)
        .map(|d| d.label.to_string())
        .collect();
    for c in repo.committed_of(&dirs) {
        let label = c.dir.label.to_string();
        // A manifest that could not be read (the network, the store) says
        // nothing of the backup: the target is unreadable, not damaged.
        let manifest = match c.manifest {
            Err(e) if e.exit_code() == 1 => return Err(e),
            other => other,
        };
        match manifest {
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
                    newer_format: false,
                    format: Some(m.format),
                    archive_start: None,
                    archive_stop: None,
                    trigger: m.trigger.clone(),
                    locked_until: held(store.protection(), c.dir.modified),
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
                newer_format: matches!(e, Error::Newer(_)),
                format: None,
                error: Some(e.to_string()),
                archive_start: None,
                archive_stop: None,
                trigger: None,
                locked_until: held(store.protection(), c.dir.modified),
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
        stream: state.as_ref().map(|st| {
            let beat = stream::beat_at(&ctx.state().stream_beat(st.pid));
            stream_info(st, p, &t.name, beat)
        }),
    });
    Ok(())
}

/// The local streamer's last report for one target, if it ever ran here.
fn stream_info(
    st: &StreamState,
    p: &Policy,
    target: &str,
    beat: Option<chrono::DateTime<Utc>>,
) -> StreamInfo {
    let now = Utc::now();
    let stale = StreamState::stale_after(p.wal.sync_interval);
    let running = st.alive(now, stale, beat);
    let shipped = st.targets.get(target);
    StreamInfo {
        lag_seconds: st.lag(target, now, stale, beat),
        running,
        stopped_seconds_ago: (!running)
            .then(|| {
                st.stopped
                    .or(st.updated)
                    .map(|u| (now - u).num_milliseconds().max(0) as f64 / 1000.0)
            })
            .flatten(),
        shipped_until: shipped.and_then(|s| s.until),
        error: shipped.and_then(|s| s.error.clone()),
        generation: st.generation.clone(),
        host: st.host.clone(),
        pid: st.pid,
        updated: st.updated,
        spool_bytes: st.spool_bytes,
        spool_max: st.spool_max,
        spool_full: st.spool_full,
    }
}
