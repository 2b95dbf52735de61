//! Applying retention and clearing interrupted backups.

use chrono::{DateTime, Utc};

use super::PolicyRepo;
use super::report::Expired;
use crate::config::{Policy, Target};
use crate::context::Context;
use crate::error::Result;
use crate::repo::{self, retention};
use crate::storage::Storage;

/// Expires `policy` on `target`; the caller holds the policy's lock.
pub fn expire(
    ctx: &Context,
    policy: &Policy,
    target: &Target,
    dry_run: bool,
) -> Result<Vec<Expired>> {
    let store = ctx.storage(target)?;
    let _lease = if dry_run {
        None
    } else {
        super::promotion::fence(ctx, policy, store.as_ref())?;
        crate::lease::Lease::acquire(store.as_ref(), &policy.name, "expire")?
    };
    expire_locked(ctx, policy, target, store.as_ref(), dry_run, Utc::now())
}

/// Backups retention removes, each with why; with calendar rules, why
/// each kept backup stays.
pub(super) type Plan = (
    Vec<(repo::Label, String)>,
    Option<std::collections::BTreeMap<repo::Label, Vec<String>>>,
);

/// What `policy`'s retention removes from `candidates` at `now`, each
/// with why; with calendar rules, also why each kept backup stays. `dr
/// copy` asks too, so that it never copies what would go at once.
pub(super) fn retention_plan(
    policy: &Policy,
    candidates: &[retention::Candidate],
    now: DateTime<Utc>,
) -> Plan {
    let window_start = policy
        .retention
        .window
        .and_then(|w| chrono::Duration::from_std(w).ok())
        .map(|w| now - w);
    let r = &policy.retention;
    if r.calendar.any() {
        let (removals, kept) =
            retention::plan_calendar(candidates, r.full, r.diff, window_start, &r.calendar);
        (
            removals.into_iter().map(|r| (r.label, r.reason)).collect(),
            Some(kept),
        )
    } else {
        (
            retention::plan(candidates, r.full, r.diff, window_start)
                .into_iter()
                .map(|r| (r.label, r.reason))
                .collect(),
            None,
        )
    }
}

/// Expire for a caller that already holds the lock (a backup that just committed).
pub fn expire_locked(
    ctx: &Context,
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
    // How long an unfinished write may be a live run's: interrupted
    // backups and abandoned multipart uploads older than this go.
    let grace = chrono::Duration::from_std(policy.retention.incomplete_grace)
        .unwrap_or(chrono::Duration::hours(1));
    if !dry_run {
        store.clean_abandoned(&format!("{}/", policy.name), now - grace)?;
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
    let (removals, kept) = retention_plan(policy, &candidates, now);
    let mut doomed = removals;
    if dry_run && let Some(kept) = kept {
        out.extend(kept.into_iter().rev().map(|(label, whys)| Expired {
            policy: policy.name.clone(),
            target: target.name.clone(),
            label: label.to_string(),
            reason: whys.join("; "),
            removed: false,
            kept: true,
        }));
    }
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
    // What goes: a backup the target still holds stays, and so does the
    // WAL it needs.
    let mut doomed_labels = Vec::new();
    let protection = store.protection();
    for (label, reason) in doomed {
        let Some(dir) = dirs.iter().find(|d| d.label == label) else {
            continue;
        };
        if let Some(until) = protection.held_until(dir.modified, now) {
            // Not even tried: with dr's credentials it would fail, or
            // (versioned buckets) only hide the objects behind a marker.
            out.push(Expired {
                policy: policy.name.clone(),
                target: target.name.clone(),
                label: label.to_string(),
                reason: format!("{reason}; kept: {}", held_why(protection, until)),
                removed: false,
                kept: false,
            });
            continue;
        }
        doomed_labels.push(label.clone());
        if !dry_run {
            // Uncommit first: a crash half-way leaves an interrupted backup, never a damaged one.
            let manifest = repo::object_key(&policy.name, &label, repo::MANIFEST);
            if dir.has_manifest {
                store.delete(&manifest)?;
            }
            for key in dir.keys.iter().filter(|k| **k != manifest) {
                store.delete(key)?;
            }
            let _ =
                std::fs::remove_file(ctx.state().page_cache(&target.name, &policy.name, &label));
            tracing::info!(policy = %policy.name, target = %target.name, %label, "expired: {reason}");
            audit_removal(policy, target, label.to_string(), &reason);
        }
        out.push(Expired {
            policy: policy.name.clone(),
            target: target.name.clone(),
            label: label.to_string(),
            reason,
            removed: !dry_run,
            kept: false,
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

/// Why an object retention would remove stays, and until when.
fn held_why(p: crate::storage::Protection, until: chrono::DateTime<Utc>) -> String {
    match p {
        crate::storage::Protection::AppendOnly => "the target is append_only: dr never deletes there; expire it with the store's lifecycle rules or from a host whose credentials may delete".into(),
        crate::storage::Protection::Locked { compliance, .. } => format!(
            "under S3 Object Lock ({}) until {}: expire removes it after that",
            if compliance { "compliance" } else { "governance" },
            until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        crate::storage::Protection::None => String::new(),
    }
}

/// One audit line per backup or WAL generation removed, written once its
/// objects are gone.
fn audit_removal(policy: &Policy, target: &Target, label: String, reason: &str) {
    crate::audit::record(
        crate::audit::Entry::new("expire")
            .policy(&policy.name)
            .target(&target.name)
            .labels(vec![label])
            .detail(reason),
    );
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
    let protection = repo.storage.protection();
    let now = Utc::now();
    for r in repo::wal::expire(&prefix, &listing, &kept) {
        let label = format!("wal/{} ({} objects)", r.generation, r.keys.len());
        let newest = listing
            .iter()
            .filter(|o| r.keys.contains(&o.key))
            .map(|o| o.modified)
            .max();
        if let Some(until) = newest.and_then(|m| protection.held_until(m, now)) {
            out.push(Expired {
                policy: policy.name.clone(),
                target: target.name.clone(),
                label,
                reason: format!("{}; kept: {}", r.reason, held_why(protection, until)),
                removed: false,
                kept: false,
            });
            continue;
        }
        if !dry_run {
            for k in &r.keys {
                repo.storage.delete(k)?;
            }
            tracing::info!(policy = %policy.name, target = %target.name, generation = %r.generation, "expired {} WAL objects: {}", r.keys.len(), r.reason);
            audit_removal(policy, target, label.clone(), &r.reason);
        }
        out.push(Expired {
            policy: policy.name.clone(),
            target: target.name.clone(),
            label,
            reason: r.reason,
            removed: !dry_run,
            kept: false,
        });
    }
    Ok(out)
}
