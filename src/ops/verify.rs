//! The restore drill: read every object back, check it, restore it to a
//! scratch file and run `integrity_check`. A backup that passes here will
//! restore on the worst day.

use super::PolicyRepo;
use super::report::Verified;
use super::restore::{materialize, pick};
use crate::codec::{Decoder, read_error};
use crate::config::{Policy, Target};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::progress::{Counted, Progress};
use crate::repo::{self, Label, Manifest};
use crate::sqlite;

/// What a verify run covers.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// One backup (its chain) instead of the whole repository.
    pub label: Option<String>,
    /// An identity other than the configured one.
    pub identity: Option<std::path::PathBuf>,
    /// Restore every chain, not just the newest.
    pub restore_all: bool,
    /// Read back this percentage of the older backups and WAL segments,
    /// chosen at random, instead of all of them (the newest chain is
    /// always restored).
    pub sample: Option<f64>,
}

/// Verifies `policy` on `target`: every committed backup and every WAL
/// segment is read back, decrypted and hash-checked (or a random sample of
/// them), each generation's WAL is checked for gaps, and the newest chain
/// (every chain with `restore_all`) is restored to a scratch file and
/// checked with `integrity_check`. Every problem is named; a drill that
/// fails is an error: exit 3 for what is missing or damaged, 1 when the
/// target could not be read (the network), 2 when no key can open the
/// backups.
pub fn verify(
    ctx: &Context,
    policy: &Policy,
    target: &Target,
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<Verified> {
    let started = std::time::Instant::now();
    let store = ctx.storage(target)?;
    let repo = PolicyRepo {
        storage: store.as_ref(),
        policy: &policy.name,
    };
    let unsealing = ctx.unsealing(policy, opts.identity.as_deref())?;
    let newest = pick(&repo, opts.label.as_deref()).map_err(as_drill_failure)?;
    let mut problems: Vec<(String, Error)> = Vec::new();
    let mut note = |what: String, r: Result<()>| {
        if let Err(e) = r {
            problems.push((what, as_drill_failure(e)));
        }
    };
    let newest_chain: Vec<Label> = vec![newest.full_label(), newest.clone()];
    let sampled = || sample_keeps(opts.sample);
    let mut backups = 0;
    let committed = repo.committed()?;
    for c in &committed {
        let label = &c.dir.label;
        let whole_repo = opts.label.is_none();
        let in_chain = newest_chain.contains(label);
        if !(in_chain || whole_repo && sampled()) {
            continue;
        }
        match &c.manifest {
            Err(e) => note(
                format!("backup {label}"),
                Err(Error::VerifyFailed(e.to_string())),
            ),
            Ok(m) => {
                backups += 1;
                note(
                    format!("backup {label}"),
                    read_back(&repo, m, unsealing.as_ref(), progress),
                );
            }
        }
    }
    let mut restored = Vec::new();
    let mut restore = |label: &Label| {
        restored.push(label.to_string());
        drill(ctx, &repo, label, unsealing.as_ref(), progress)
    };
    note(format!("restore of {newest}"), restore(&newest));
    if opts.restore_all && opts.label.is_none() {
        for c in committed
            .iter()
            .filter(|c| c.manifest.is_ok() && c.dir.label != newest)
        {
            let label = c.dir.label.clone();
            note(format!("restore of {label}"), restore(&label));
        }
    }
    // The WAL is part of what a restore needs: every segment is read back
    // and hash-checked, and a gap is a failure, whatever the backups' outcome.
    let segments = match check_wal(&repo, unsealing.as_ref(), policy.encrypted, &sampled) {
        Ok((n, wal_problems)) => {
            problems.extend(wal_problems);
            n
        }
        Err(e) => {
            problems.push(("WAL".into(), as_drill_failure(e)));
            0
        }
    };
    match problems.len() {
        0 => Ok(Verified {
            policy: policy.name.clone(),
            target: target.name.clone(),
            label: newest.to_string(),
            ok: true,
            seconds: started.elapsed().as_secs_f64(),
            backups_read: Some(backups),
            segments_read: Some(segments),
            restored,
        }),
        1 => Err(problems.remove(0).1),
        _ => Err(Error::Several(problems)),
    }
}

/// Whether a sample of `percent` takes the next object (always, without a
/// sample): each object is drawn on its own.
fn sample_keeps(percent: Option<f64>) -> bool {
    percent.is_none_or(|p| fastrand::f64() * 100.0 < p)
}

/// What a drill that fails means: damage or absence is a failed
/// verification (exit 3); a target that cannot be read (1) or a key that is
/// missing (2) keeps its own code, since the backup itself may be fine.
fn as_drill_failure(e: Error) -> Error {
    match e.exit_code() {
        1..=3 => e,
        _ => Error::VerifyFailed(e.to_string()),
    }
}

/// Reads every object of one backup back through the decoder, which checks
/// both hashes on the last read.
fn read_back(
    repo: &PolicyRepo<'_>,
    m: &Manifest,
    unsealing: Option<&crate::keys::Unsealing>,
    progress: &dyn Progress,
) -> Result<()> {
    for (name, digest) in &m.objects {
        let key = repo::object_key(repo.policy, &m.label, name);
        let object = format!("target '{}': {key}", repo.storage.target());
        let raw = repo.storage.open(&key)?;
        let dec = Decoder::new(raw, &object, digest, unsealing, m.encrypted())?;
        std::io::copy(&mut Counted::new(dec, progress), &mut std::io::sink())
            .map_err(|e| read_error(&object, e))?;
    }
    Ok(())
}

/// Restores the chain of `label` to a scratch file and runs `integrity_check`.
fn drill(
    ctx: &Context,
    repo: &PolicyRepo<'_>,
    label: &Label,
    unsealing: Option<&crate::keys::Unsealing>,
    progress: &dyn Progress,
) -> Result<()> {
    let chain = repo.chain(label)?;
    let scratch = ctx.state().tmp();
    std::fs::create_dir_all(&scratch)
        .map_err(|e| Error::io(format!("cannot create {}", scratch.display()), e))?;
    crate::scratch::sweep(&scratch, "verify.");
    let tmp = tempfile::Builder::new()
        .prefix(&crate::scratch::prefix_for("verify."))
        .suffix(".db")
        .tempfile_in(&scratch)
        .map_err(|e| {
            Error::io(
                format!("cannot create a scratch file in {}", scratch.display()),
                e,
            )
        })?;
    materialize(repo, &chain, unsealing, tmp.as_file(), tmp.path(), progress)?;
    sqlite::integrity_check(tmp.path())
}

/// Reads back the WAL segments of the policy (all, or the sample),
/// decrypting and checking each hash, and checks each generation for gaps.
/// Returns how many segments were read and every problem found.
fn check_wal(
    repo: &PolicyRepo<'_>,
    unsealing: Option<&crate::keys::Unsealing>,
    encrypted: bool,
    sampled: &dyn Fn() -> bool,
) -> Result<(usize, Vec<(String, Error)>)> {
    let prefix = repo::wal::wal_prefix(repo.policy);
    let segs = repo::wal::segments(&prefix, &repo.storage.list(&prefix)?);
    let mut problems: Vec<(String, Error)> = repo::wal::gaps(&segs)
        .iter()
        .map(|g| {
            (
                "WAL".to_string(),
                Error::VerifyFailed(format!("gap in {g}")),
            )
        })
        .collect();
    let mut read = 0;
    for seg in segs.iter().filter(|_| sampled()) {
        read += 1;
        let object = format!("target '{}': {}", repo.storage.target(), seg.key);
        let r = repo.storage.open(&seg.key).and_then(|raw| {
            let mut dec = Decoder::self_checked(raw, &object, unsealing, encrypted)?;
            std::io::copy(&mut dec, &mut std::io::sink())
                .map(|_| ())
                .map_err(|e| read_error(&object, e))
        });
        if let Err(e) = r {
            problems.push((format!("WAL segment {}", seg.key), as_drill_failure(e)));
        }
    }
    Ok((read, problems))
}
