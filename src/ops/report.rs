//! What each operation reports, the same shape whatever the source: the
//! terminal, `--json`, the daemon's history and its alerts read these.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::repo::BackupType;

/// The type of a backup as its tool names it: dr takes fulls and diffs,
/// pgBackRest also incrementals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    Full,
    Diff,
    Incr,
}

impl BackupKind {
    /// pgBackRest's word for a backup type; `None` for a word dr does not know.
    pub fn from_word(w: &str) -> Option<BackupKind> {
        match w {
            "full" => Some(BackupKind::Full),
            "diff" => Some(BackupKind::Diff),
            "incr" => Some(BackupKind::Incr),
            _ => None,
        }
    }
}

impl From<BackupType> for BackupKind {
    fn from(t: BackupType) -> Self {
        match t {
            BackupType::Full => BackupKind::Full,
            BackupType::Diff => BackupKind::Diff,
        }
    }
}

impl std::fmt::Display for BackupKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackupKind::Full => "full",
            BackupKind::Diff => "diff",
            BackupKind::Incr => "incr",
        })
    }
}

/// Page counts of a SQLite backup (PostgreSQL backups have none).
#[derive(Debug, Clone, Serialize)]
pub struct PageCounts {
    pub page_count: u64,
    pub pages_stored: u64,
}

/// What a backup did.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub policy: String,
    pub target: String,
    pub label: String,
    #[serde(rename = "type")]
    pub kind: BackupKind,
    pub parent: Option<String>,
    #[serde(flatten)]
    pub pages: Option<PageCounts>,
    /// Bytes this backup holds before compression: for a diff or an
    /// incremental, its own changes, not the whole database.
    pub size: u64,
    /// Bytes it takes on the target.
    pub stored_size: u64,
    pub seconds: f64,
    /// Why the type differs from the one asked for, if it does.
    pub note: Option<String>,
    /// Backups expired after this one committed.
    pub expired: Vec<String>,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub policy: String,
    pub target: String,
    /// The backup restored (PostgreSQL: the one asked for, if any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The backups applied, full first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// SQLite: WAL replayed on top of the backup, when any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal: Option<Replayed>,
    /// The instant asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
    pub to: PathBuf,
    /// SQLite: size of the restored database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    pub seconds: f64,
    /// What the user must do next (PostgreSQL: start the cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_step: Option<String>,
    /// SQLite: what the restore proved before it replaced anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proof: Option<super::proof::Proof>,
}

/// The WAL part of a point-in-time restore.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub generation: String,
    /// The last WAL frame of the generation applied.
    pub frame: u64,
    pub segments: usize,
    pub transactions: u64,
    /// Commit time of the last transaction applied (as dr saw it commit).
    pub last_commit: Option<DateTime<Utc>>,
}

/// A restore drill that passed. A failed drill is an error (exit 3).
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub policy: String,
    pub target: String,
    /// The backup drilled (PostgreSQL: `repository`, the whole of it).
    pub label: String,
    pub ok: bool,
    pub seconds: f64,
    /// SQLite: backups read back and hash-checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backups_read: Option<usize>,
    /// SQLite: WAL segments read back and hash-checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments_read: Option<usize>,
    /// SQLite: the backups restored to a scratch file and checked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restored: Vec<String>,
    /// Checked without the key (`--without-key`): stored bytes, chains
    /// and WAL continuity; no restore drill ran here.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub without_key: bool,
    /// Without the key: the newest drills recorded on the target by the
    /// host that has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drills: Option<crate::repo::drill::Drills>,
    /// `--sample`: the older format 2 backups checked by a share of their
    /// frames rather than read whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames_sampled: Option<FramesSampled>,
}

/// Frames a sampled drill read, over the backups it sampled by frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FramesSampled {
    pub backups: u64,
    /// Frames those backups hold.
    pub frames: u64,
    /// Frames decoded and checked.
    pub read: u64,
}

/// One backup expire removed (or would remove, with `--dry-run`).
#[derive(Debug, Clone, Serialize)]
pub struct Expired {
    pub policy: String,
    pub target: String,
    pub label: String,
    pub reason: String,
    pub removed: bool,
    /// `--dry-run` with calendar rules: a backup that stays, and `reason`
    /// says which rules keep it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

/// One line for a check without the key: what was proven here, and the
/// newest drill the host with the key recorded on the target.
pub fn render_checked(v: &Verified) -> String {
    let drill = match v.drills.as_ref().and_then(|d| d.passed.as_ref()) {
        Some(d) => format!(
            "newest restore drill passed {} on host {} ({})",
            d.finished
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            d.host,
            d.label
        ),
        None => "no restore drill recorded on the target: run `dr verify` where the key is".into(),
    };
    let failed = v
        .drills
        .as_ref()
        .and_then(|d| d.failed.as_ref())
        .map_or(String::new(), |d| {
            format!(
                "; the drill on host {} at {} FAILED: {}",
                d.host,
                d.finished
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                d.error.as_deref().unwrap_or("?")
            )
        });
    format!(
        "checked {} on {}: {} ({:.1}s): {} backup(s)' stored bytes and {} WAL segment(s) intact, without the key (no restore drill here); {drill}{failed}",
        v.policy,
        v.target,
        v.label,
        v.seconds,
        v.backups_read.unwrap_or(0),
        v.segments_read.unwrap_or(0),
    )
}
