//! `dr copy`: a policy's committed backups and WAL, copied as stored from
//! one target to another: an offsite copy on its own schedule, a move to
//! another provider, a second bucket seeded without a new full.
//!
//! The bytes are copied, never decrypted: no key is needed, and the copy
//! restores exactly as the original does. Every object a manifest lists
//! is read once and checked against the size and digest the manifest
//! recorded while it streams to the destination; a mismatch abandons the
//! object before it is committed there, and the backup's manifest is
//! written last, only after every object of it is in place and checked.
//! So a damaged backup is never copied as intact, and a copy cut off at
//! any point leaves an interrupted backup (no manifest) that the next run
//! copies again, or `expire` clears. Backups the destination already holds
//! with the same manifest are skipped, as are WAL objects it holds at the
//! same size (they are written whole), so a rerun copies only what is
//! missing. The destination's lease is held throughout, as a backup's is;
//! its Object Lock applies to what is written, as to a backup; nothing
//! committed there is ever deleted or overwritten (only the objects of an
//! interrupted copy are written again).
//!
//! WAL segments carry no digest outside their sealed contents: they are
//! copied byte for byte in order (so a cut-off copy ends early, never with
//! a gap) and checked, as everywhere, by a restore or drill with the key.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::PolicyRepo;
use super::fanout::TargetFilter;
use super::stored_check::stored_bytes;
use crate::config::{Config, Policy, Target};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::progress::Progress;
use crate::repo::{self, Label};
use crate::storage::Storage;

/// What a copy takes.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Only backups taken at or after this (with the fulls their diffs
    /// need) and the WAL that continues them.
    pub since: Option<DateTime<Utc>>,
    /// Only this backup (and its full); no WAL.
    pub backup: Option<Label>,
    /// How long to wait for this host's lock of the policy on the
    /// destination.
    pub lock_wait: Duration,
}

/// What one copy did.
#[derive(Debug, Clone, Serialize)]
pub struct Copied {
    pub policy: String,
    pub from: String,
    pub to: String,
    /// Backups this run copied, oldest first.
    pub copied: Vec<String>,
    /// Backups the destination held already.
    pub present: usize,
    /// Backups left out because the policy's retention removes them now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_kept: Vec<String>,
    /// Labels under which the destination holds a different backup (its
    /// own, written by a backup of the same second): left as they are.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    /// WAL objects (segments and keys records) copied, and held already.
    pub wal_copied: usize,
    pub wal_present: usize,
    /// Stored bytes copied.
    pub bytes: u64,
    pub seconds: f64,
}

/// The source and destinations of a copy of `policy`: `from` (default
/// `[copy] from`, else its first target) and `to` (default every `[copy]
/// to`), each one of its targets or copy destinations.
pub fn ends<'c>(
    cfg: &'c Config,
    policy: &Policy,
    from: Option<&String>,
    to: Option<&String>,
) -> Result<(&'c Target, Vec<&'c Target>)> {
    // A target of dr.toml that the policy neither backs up to nor copies
    // to is a usage error that says where to declare it.
    let named = |n: &str| -> Result<&'c Target> {
        TargetFilter::Name(n.to_string())
            .select(cfg, policy)
            .map_err(|e| match cfg.targets.contains_key(n) {
                true => Error::Usage(format!(
                    "target '{n}' is neither a target nor a copy destination of policy '{}': add `[copy] to = [\"{n}\"]` to {}, so that restore, info and verify reach the copy with --target",
                    policy.configured_name(),
                    policy.file.display()
                )),
                false => e,
            })?
            .into_iter()
            .next()
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "policy '{}' has no target named '{n}'",
                    policy.name
                ))
            })
    };
    let configured = policy.copy.as_ref();
    let src = match (from, configured) {
        (Some(f), _) => named(f)?,
        (None, Some(c)) => named(&c.from)?,
        (None, None) => named(policy.targets.first().map_or("", String::as_str))?,
    };
    let dsts = match (to, configured) {
        (Some(t), _) => vec![named(t)?],
        (None, Some(c)) => c.to.iter().map(|t| named(t)).collect::<Result<_>>()?,
        (None, None) => {
            return Err(Error::Usage(format!(
                "policy '{}' has no [copy] section: name the destination with --to TARGET (and add it to `[copy] to` so that restore, info and verify reach it with --target)",
                policy.name
            )));
        }
    };
    Ok((src, dsts))
}

/// Copies `policy` from `from` to `to` (see the module's doc). Problems
/// with single backups (damaged on `from`) do not stop the others; they
/// fail the copy at the end, each named (exit 3).
pub fn copy(
    ctx: &Context,
    policy: &Policy,
    from: &Target,
    to: &Target,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<Copied> {
    if from.name == to.name {
        return Err(Error::Usage(format!(
            "--from and --to both name target '{}': copy to another target",
            to.name
        )));
    }
    if !matches!(policy.source, crate::config::Source::Sqlite { .. }) {
        return Err(Error::Refused(format!(
            "policy '{}' is PostgreSQL: pgBackRest writes each of its targets as a repository of its own; name a second target in the policy instead of copying",
            policy.name
        )));
    }
    let started = Instant::now();
    let src = ctx.storage(from)?;
    let dst = ctx.storage(to)?;
    let source = PolicyRepo {
        storage: src.as_ref(),
        policy: &policy.name,
    };
    let dest = PolicyRepo {
        storage: dst.as_ref(),
        policy: &policy.name,
    };
    // Listing first: a missing bucket or bad credentials on either side
    // fail before anything is written.
    let committed = source.committed()?;
    let held = dest.dirs()?;
    super::promotion::fence(ctx, policy, dst.as_ref())?;
    let _lock = super::source::lock(ctx, policy, to, "copy", opts.lock_wait)?;
    // A copy's line in the audit log must be writable before anything is
    // written at the destination, as a backup's is.
    crate::audit::writable()?;
    let mut lease = Lease::acquire(dst.as_ref(), &policy.name, "copy")?;
    let mut out = Copied {
        policy: policy.name.clone(),
        from: from.name.clone(),
        to: to.name.clone(),
        copied: Vec::new(),
        present: 0,
        not_kept: Vec::new(),
        conflicts: Vec::new(),
        wal_copied: 0,
        wal_present: 0,
        bytes: 0,
        seconds: 0.0,
    };
    let mut problems: Vec<(String, Error)> = Vec::new();
    let chosen = choose(policy, &committed, opts, &mut out, &mut problems)?;
    let total: u64 = chosen
        .iter()
        .flat_map(|m| m.objects.values())
        .map(|o| o.stored_size)
        .sum();
    progress.set_total(total);
    for m in &chosen {
        if held.iter().any(|d| d.label == m.label && d.has_manifest) {
            match dest.manifest(&m.label) {
                Ok(theirs) if theirs.to_bytes() == m.to_bytes() => out.present += 1,
                _ => {
                    tracing::warn!(policy = %policy.name, target = %to.name, label = %m.label, "the destination holds another backup under this label: left as it is");
                    out.conflicts.push(m.label.to_string());
                }
            }
            continue;
        }
        match copy_backup(src.as_ref(), dst.as_ref(), &policy.name, m, progress) {
            Ok(bytes) => {
                if let Some(l) = lease.as_mut() {
                    l.renew()?;
                }
                // The manifest as stored (its envelope hash covers the
                // exact text): last, so the backup exists there only now.
                let key = repo::object_key(&policy.name, &m.label, repo::MANIFEST);
                let raw = src.get_bytes(&key)?;
                if repo::Manifest::from_bytes(&raw).map(|r| r.to_bytes()).ok() != Some(m.to_bytes())
                {
                    problems.push((
                        format!("backup {}", m.label),
                        Error::Integrity {
                            object: format!("target '{}': {key}", from.name),
                            reason: "the manifest changed while it was copied".into(),
                        },
                    ));
                    continue;
                }
                dst.put_bytes(&key, &raw)?;
                tracing::info!(policy = %policy.name, from = %from.name, to = %to.name, label = %m.label, "copied");
                out.bytes += bytes + raw.len() as u64;
                out.copied.push(m.label.to_string());
            }
            // A target that fails to take or give bytes stops the copy;
            // a backup whose bytes are not what its manifest says is
            // left out, and named.
            Err(e @ Error::Integrity { .. }) => problems.push((format!("backup {}", m.label), e)),
            Err(e) => return Err(e),
        }
    }
    if opts.backup.is_none() {
        copy_wal(src.as_ref(), dst.as_ref(), policy, &chosen, opts, &mut out)?;
    }
    out.seconds = started.elapsed().as_secs_f64();
    // In the audit log as every action that writes to a target is.
    super::source::audit(
        policy,
        to,
        "copy",
        super::verify::outcome(out, problems),
        |c| c.copied.clone(),
        Some(format!("from target '{}'", from.name)),
    )
}

/// The intact backups to copy, oldest first: those `opts` asks for, with
/// the fulls their diffs need, less those retention removes now.
fn choose(
    policy: &Policy,
    committed: &[super::Committed],
    opts: &CopyOptions,
    out: &mut Copied,
    problems: &mut Vec<(String, Error)>,
) -> Result<Vec<repo::Manifest>> {
    let candidates: Vec<_> = committed.iter().map(super::Committed::candidate).collect();
    let (doomed, _) = super::expire::retention_plan(policy, &candidates, Utc::now());
    let wanted = |label: &Label, taken: DateTime<Utc>| match (&opts.backup, opts.since) {
        (Some(b), _) => b == label,
        (None, Some(since)) => taken >= since,
        (None, None) => true,
    };
    let mut picked: BTreeMap<Label, repo::Manifest> = BTreeMap::new();
    for c in committed {
        let label = &c.dir.label;
        match &c.manifest {
            Ok(m) if wanted(label, m.timestamp_start) => {
                if let Some((_, why)) = doomed.iter().find(|(l, _)| l == label) {
                    tracing::info!(policy = %policy.name, %label, "not copied: retention removes it ({why})");
                    out.not_kept.push(label.to_string());
                    continue;
                }
                picked.insert(label.clone(), m.clone());
            }
            Ok(_) => {}
            Err(e) if wanted(label, label.time()) => problems.push((
                format!("backup {label}"),
                Error::Integrity {
                    object: format!("backup {label} on the source"),
                    reason: format!("not copied: {e}"),
                },
            )),
            Err(_) => {}
        }
    }
    // A diff needs its full where it goes.
    let fulls: Vec<Label> = picked
        .values()
        .filter_map(|m| m.parent.clone())
        .filter(|p| !picked.contains_key(p))
        .collect();
    for f in fulls {
        match committed
            .iter()
            .find(|c| c.dir.label == f)
            .map(|c| &c.manifest)
        {
            Some(Ok(m)) => {
                picked.insert(f, m.clone());
            }
            _ => problems.push((
                format!("backup {f}"),
                Error::Integrity {
                    object: format!("backup {f} on the source"),
                    reason:
                        "a diff chosen for the copy needs this full, which is missing or damaged"
                            .into(),
                },
            )),
        }
    }
    if let Some(b) = &opts.backup
        && !picked.contains_key(b)
        && problems.is_empty()
        && !out.not_kept.contains(&b.to_string())
    {
        return Err(Error::NotFound(format!(
            "policy '{}' has no committed backup {b} on the source (`dr info {}` lists them)",
            policy.name, policy.name
        )));
    }
    Ok(picked.into_values().collect())
}

/// Copies every object of `m` but its manifest, each checked against its
/// digest on the way; returns the stored bytes copied.
fn copy_backup(
    src: &dyn Storage,
    dst: &dyn Storage,
    policy: &str,
    m: &repo::Manifest,
    progress: &dyn Progress,
) -> Result<u64> {
    let mut bytes = 0;
    for (name, digest) in &m.objects {
        let key = repo::object_key(policy, &m.label, name);
        let mut w = dst.create(&key)?;
        stored_bytes(src, &key, digest, progress, &mut |b| {
            w.write_all(b).map_err(|e| dst.err("write", &key, &e))
        })?;
        // Only now, with the digest matched, is it visible there.
        w.commit()?;
        bytes += digest.stored_size;
    }
    Ok(bytes)
}

/// Copies the WAL objects the destination lacks, each generation's keys
/// records before its segments, segments in order.
fn copy_wal(
    src: &dyn Storage,
    dst: &dyn Storage,
    policy: &Policy,
    chosen: &[repo::Manifest],
    opts: &CopyOptions,
    out: &mut Copied,
) -> Result<()> {
    let prefix = repo::wal::wal_prefix(&policy.name);
    let theirs: BTreeMap<String, u64> = dst
        .list(&prefix)?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    let listing = src.list(&prefix)?;
    let segments = repo::wal::segments(&prefix, &listing);
    // With --since: the generations of the chosen backups, from the
    // oldest chosen backup's position in each.
    let from_frame: Option<BTreeMap<&str, u64>> = opts.since.map(|_| {
        let mut f: BTreeMap<&str, u64> = BTreeMap::new();
        for w in chosen.iter().filter_map(|m| m.wal.as_ref()) {
            let e = f.entry(w.generation.as_str()).or_insert(w.frame);
            *e = (*e).min(w.frame);
        }
        f
    });
    let wanted_segment = |s: &repo::wal::Segment| match &from_frame {
        None => true,
        Some(f) => f
            .get(s.generation.as_str())
            .is_some_and(|frame| s.last > *frame),
    };
    let wanted_generation = |g: &str| from_frame.as_ref().is_none_or(|f| f.contains_key(g));
    let size: BTreeMap<&str, u64> = listing.iter().map(|o| (o.key.as_str(), o.size)).collect();
    // Each generation's keys records before its segments (both lists are
    // by generation, then position).
    let records = repo::wal::keys_ranges(&prefix, &listing);
    let mut keys: Vec<(&str, bool, &str)> = records
        .iter()
        .filter(|r| wanted_generation(&r.generation))
        .map(|r| (r.generation.as_str(), false, r.key.as_str()))
        .chain(
            segments
                .iter()
                .filter(|s| wanted_segment(s))
                .map(|s| (s.generation.as_str(), true, s.key.as_str())),
        )
        .collect();
    keys.sort_by_key(|&(generation, segment, _)| (generation, segment));
    let keys = keys
        .into_iter()
        .map(|(_, _, k)| (k, size.get(k).copied().unwrap_or(0)));
    for (key, size) in keys {
        if size == 0 {
            return Err(Error::Integrity {
                object: format!("target '{}': {key}", src.target()),
                reason: "is stored empty: not copied (run `dr verify` where the key is)".into(),
            });
        }
        if theirs.get(key) == Some(&size) {
            out.wal_present += 1;
            continue;
        }
        let bytes = src.get_bytes(key)?;
        if bytes.len() as u64 != size {
            return Err(Error::Integrity {
                object: format!("target '{}': {key}", src.target()),
                reason: format!(
                    "{} bytes read, {size} listed: it changed while it was copied",
                    bytes.len()
                ),
            });
        }
        dst.put_bytes(key, &bytes)?;
        out.wal_copied += 1;
        out.bytes += size;
    }
    Ok(())
}
