//! What exists: every policy's backups on every target.
//!
//! The JSON document is a contract documented in README.md:
//! `{"policies":[{"name","source":{"kind",...},"targets":[{"name","kind",
//! "backups":[{"label","type","parent","timestamp_start","timestamp_stop",
//! "size","stored_size"}]}]}]}`. Secrets never appear in it.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};

use super::{PolicyRepo, TargetFilter, human_bytes};
use crate::config::{Config, Policy, Source, TargetKind};
use crate::error::Result;
use crate::repo::BackupType;
use crate::storage;

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
    /// Why the target could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
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
    pub kind: BackupType,
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
}

fn source_info(p: &Policy) -> SourceInfo {
    match &p.source {
        Source::Sqlite { path } => SourceInfo {
            kind: "sqlite".into(),
            path: Some(path.display().to_string()),
            stanza: None,
        },
        Source::Postgres {
            stanza, data_dir, ..
        } => SourceInfo {
            kind: "postgres".into(),
            path: Some(data_dir.display().to_string()),
            stanza: Some(stanza.clone()),
        },
    }
}

/// Collects info for the selected policies and targets. A target that cannot
/// be read is reported in place, not as a failure of the whole command.
pub fn info(cfg: &Config, policies: &[&Policy], filter: &TargetFilter) -> Result<Info> {
    let mut out = Info {
        policies: Vec::new(),
    };
    for p in policies {
        let mut targets = Vec::new();
        for t in filter.select(cfg, p)? {
            let mut ti = TargetInfo {
                name: t.name.clone(),
                kind: t.kind.word().into(),
                location: match &t.kind {
                    TargetKind::Local { path } => path.display().to_string(),
                    TargetKind::S3(s) => format!("s3://{}/{}", s.bucket, s.prefix),
                },
                backups: Vec::new(),
                incomplete: Vec::new(),
                error: None,
            };
            if matches!(p.source, Source::Sqlite { .. }) {
                match collect(cfg, t, &p.name, &mut ti) {
                    Ok(()) => {}
                    Err(e) => ti.error = Some(e.to_string()),
                }
            }
            targets.push(ti);
        }
        out.policies.push(PolicyInfo {
            name: p.name.clone(),
            source: source_info(p),
            targets,
        });
    }
    Ok(out)
}

fn collect(
    cfg: &Config,
    t: &crate::config::Target,
    policy: &str,
    ti: &mut TargetInfo,
) -> Result<()> {
    let store = storage::open(t, &cfg.state_dir)?;
    let repo = PolicyRepo {
        storage: store.as_ref(),
        policy,
    };
    for d in repo.dirs()? {
        if !d.has_manifest {
            ti.incomplete.push(d.label.to_string());
            continue;
        }
        let label = d.label.to_string();
        match repo.manifest(&d.label) {
            Ok(m) => ti.backups.push(BackupInfo {
                label,
                kind: m.kind,
                parent: m.parent.as_ref().map(|p| p.to_string()),
                timestamp_start: m.timestamp_start,
                timestamp_stop: m.timestamp_stop,
                size: m.plain_size(),
                stored_size: m.stored_size(),
                error: None,
            }),
            Err(e) => ti.backups.push(BackupInfo {
                label,
                kind: d.label.kind(),
                parent: (d.label.kind() == BackupType::Diff)
                    .then(|| d.label.full_label().to_string()),
                timestamp_start: d.label.time(),
                timestamp_stop: d.label.time(),
                size: 0,
                stored_size: 0,
                error: Some(e.to_string()),
            }),
        }
    }
    Ok(())
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
            let fulls = t.backups.iter().filter(|b| b.kind == BackupType::Full);
            let orphans = t.backups.iter().filter(|b| {
                b.kind == BackupType::Diff
                    && !t
                        .backups
                        .iter()
                        .any(|f| Some(&f.label) == b.parent.as_ref())
            });
            for f in fulls {
                line(&mut s, f, "");
                for d in t
                    .backups
                    .iter()
                    .filter(|d| d.parent.as_ref() == Some(&f.label))
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
        }
    }
    if info.policies.is_empty() {
        s.push_str("no policies configured\n");
    }
    s
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
