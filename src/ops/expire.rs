//! Applying retention and clearing interrupted backups.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::PolicyRepo;
use crate::config::{Config, Policy, Target};
use crate::error::Result;
use crate::lock::Lock;
use crate::repo::{self, retention};
use crate::storage::{self, Storage};

/// One backup expire removed (or would remove, with `--dry-run`).
#[derive(Debug, Clone, Serialize)]
pub struct Expired {
    pub policy: String,
    pub target: String,
    pub label: String,
    pub reason: String,
    pub removed: bool,
}

/// Expires `policy` on `target`, taking the policy's lock.
pub fn expire(
    cfg: &Config,
    policy: &Policy,
    target: &Target,
    dry_run: bool,
    lock_wait: Duration,
) -> Result<Vec<Expired>> {
    let _lock = Lock::acquire(
        &cfg.state_dir,
        &policy.name,
        &target.name,
        "expire",
        lock_wait,
    )?;
    let store = storage::open(target, &cfg.state_dir)?;
    let _lease = if dry_run {
        None
    } else {
        crate::lease::Lease::acquire(store.as_ref(), &policy.name, "expire")?
    };
    expire_locked(cfg, policy, target, store.as_ref(), dry_run, Utc::now())
}

/// Expire for a caller that already holds the lock (a backup that just committed).
pub fn expire_locked(
    cfg: &Config,
    policy: &Policy,
    target: &Target,
    store: &dyn Storage,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Result<Vec<Expired>> {
    let repo = PolicyRepo {
        storage: store,
        policy: &policy.name,
    };
    if !dry_run {
        store.clean_abandoned(&format!("{}/", policy.name))?;
    }
    let dirs = repo.dirs()?;
    let committed = repo.committed_of(&dirs);
    let candidates: Vec<_> = committed.iter().map(super::Committed::candidate).collect();
    let mut out = Vec::new();
    for c in &committed {
        if let Err(e) = &c.manifest {
            tracing::warn!(policy = %policy.name, target = %target.name, label = %c.dir.label, "damaged backup kept, not counted by retention: {e}");
        }
    }
    let mut doomed = Vec::new();
    for r in retention::plan(&candidates, policy.retention.full, policy.retention.diff) {
        doomed.push((r.label, r.reason));
    }
    let grace = chrono::Duration::from_std(policy.retention.incomplete_grace)
        .unwrap_or(chrono::Duration::hours(1));
    for d in dirs.iter().filter(|d| !d.has_manifest) {
        if now - d.modified >= grace {
            doomed.push((
                d.label.clone(),
                format!(
                    "interrupted backup (no manifest), untouched for more than {}",
                    humantime::format_duration(policy.retention.incomplete_grace)
                ),
            ));
        }
    }
    let doomed_labels: Vec<_> = doomed.iter().map(|(l, _)| l.clone()).collect();
    for (label, reason) in doomed {
        let Some(dir) = dirs.iter().find(|d| d.label == label) else {
            continue;
        };
        if !dry_run {
            // Uncommit first: a crash half-way leaves an interrupted backup, never a damaged one.
            let manifest = repo::object_key(&policy.name, &label, repo::MANIFEST);
            if dir.has_manifest {
                store.delete(&manifest)?;
            }
            for key in dir.keys.iter().filter(|k| **k != manifest) {
                store.delete(key)?;
            }
            let cache = cfg
                .state_dir
                .join("cache")
                .join(&target.name)
                .join(&policy.name)
                .join(format!("{label}.pages"));
            let _ = std::fs::remove_file(cache);
            tracing::info!(policy = %policy.name, target = %target.name, %label, "expired: {reason}");
        }
        out.push(Expired {
            policy: policy.name.clone(),
            target: target.name.clone(),
            label: label.to_string(),
            reason,
            removed: !dry_run,
        });
    }
    out.extend(expire_wal(
        policy,
        target,
        &repo,
        &committed,
        &doomed_labels,
        dry_run,
    )?);
    Ok(out)
}

/// Removes WAL that no kept backup can use. Skipped (with a warning) when
/// a kept backup's manifest cannot be read: dr does not guess what it needs.
fn expire_wal(
    policy: &Policy,
    target: &Target,
    repo: &PolicyRepo<'_>,
    committed: &[super::Committed],
    doomed: &[repo::Label],
    dry_run: bool,
) -> Result<Vec<Expired>> {
    let prefix = repo::wal::wal_prefix(&policy.name);
    let listing = repo.storage.list(&prefix)?;
    if listing.is_empty() {
        return Ok(Vec::new());
    }
    let mut kept = Vec::new();
    for c in committed.iter().filter(|c| !doomed.contains(&c.dir.label)) {
        match &c.manifest {
            Ok(m) => kept.extend(super::wal_base(m)),
            Err(e) => {
                tracing::warn!(policy = %policy.name, target = %target.name, "not expiring WAL: {e}");
                return Ok(Vec::new());
            }
        }
    }
    let mut out = Vec::new();
    for r in repo::wal::expire(&prefix, &listing, &kept) {
        if !dry_run {
            for k in &r.keys {
                repo.storage.delete(k)?;
            }
            tracing::info!(policy = %policy.name, target = %target.name, generation = %r.generation, "expired {} WAL objects: {}", r.keys.len(), r.reason);
        }
        out.push(Expired {
            policy: policy.name.clone(),
            target: target.name.clone(),
            label: format!("wal/{} ({} objects)", r.generation, r.keys.len()),
            reason: r.reason,
            removed: !dry_run,
        });
    }
    Ok(out)
}
