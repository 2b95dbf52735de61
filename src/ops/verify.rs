//! The restore drill: read every object back, check it, restore it to a
//! scratch file and run `integrity_check`. A backup that passes here will
//! restore on the worst day.

use std::path::Path;

use indicatif::ProgressBar;
use serde::Serialize;

use super::PolicyRepo;
use super::restore::{materialize, pick, unsealing_for};
use crate::codec::{Decoder, read_error};
use crate::config::{Config, Policy, Target};
use crate::error::{Error, Result};
use crate::repo::{self, Label, Manifest};
use crate::{sqlite, storage};

/// The outcome for one backup.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub policy: String,
    pub target: String,
    pub label: String,
    pub ok: bool,
    pub error: Option<String>,
    pub seconds: f64,
}

/// Verifies one backup (the newest by default) of `policy` on `target`.
pub fn verify(
    cfg: &Config,
    policy: &Policy,
    target: &Target,
    label: Option<&str>,
    identity: Option<&Path>,
    progress: &ProgressBar,
) -> Result<Verified> {
    let started = std::time::Instant::now();
    if let crate::config::Source::Postgres { .. } = policy.source {
        super::pg::verify(cfg, policy, target)?;
        return Ok(Verified {
            policy: policy.name.clone(),
            target: target.name.clone(),
            label: label.unwrap_or("repository").to_string(),
            ok: true,
            error: None,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    super::sqlite_path(policy)?;
    let store = storage::open(target, &cfg.state_dir)?;
    let repo = PolicyRepo {
        storage: store.as_ref(),
        policy: &policy.name,
    };
    let unsealing = unsealing_for(cfg, policy, identity)?;
    // Everything past the keys is part of the drill: a missing backup or an
    // unreadable target is a failed verification, reported with the others.
    let picked = pick(&repo, label);
    let shown = match &picked {
        Ok(l) => l.to_string(),
        Err(_) => label.unwrap_or("newest").to_string(),
    };
    let outcome = picked.and_then(|l| drill(cfg, &repo, &l, unsealing.as_ref(), progress));
    // The WAL is part of what a restore needs: every segment is read back
    // and hash-checked, and a gap is a failure, whatever the backup's outcome.
    let wal = check_wal(&repo, unsealing.as_ref(), policy.encrypted);
    let outcome = match (outcome, wal) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(a), Err(b)) => Err(Error::VerifyFailed(format!("{a}; {b}"))),
    };
    Ok(Verified {
        policy: policy.name.clone(),
        target: target.name.clone(),
        label: shown,
        ok: outcome.is_ok(),
        error: outcome.err().map(|e| e.to_string()),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn drill(
    cfg: &Config,
    repo: &PolicyRepo<'_>,
    label: &Label,
    unsealing: Option<&crate::keys::Unsealing>,
    progress: &ProgressBar,
) -> Result<()> {
    let chain = repo.chain(label)?;
    // Objects that a restore does not read (page indexes) are read back too.
    for m in &chain {
        check_other_objects(repo, m, unsealing)?;
    }
    let scratch = cfg.state_dir.join("tmp");
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

/// Reads back every WAL segment of the policy (decrypting and checking its
/// hash) and checks each generation for gaps. Every problem is listed.
fn check_wal(
    repo: &PolicyRepo<'_>,
    unsealing: Option<&crate::keys::Unsealing>,
    encrypted: bool,
) -> Result<()> {
    let prefix = repo::wal::wal_prefix(repo.policy);
    let segs = repo::wal::segments(&prefix, &repo.storage.list(&prefix)?);
    let mut problems: Vec<String> = repo::wal::gaps(&segs)
        .iter()
        .map(|g| format!("WAL gap in {g}"))
        .collect();
    for seg in &segs {
        let object = format!("target '{}': {}", repo.storage.target(), seg.key);
        let read = repo.storage.open(&seg.key).and_then(|raw| {
            let mut dec = Decoder::self_checked(raw, &object, unsealing, encrypted)?;
            std::io::copy(&mut dec, &mut std::io::sink())
                .map(|_| ())
                .map_err(|e| read_error(&object, e))
        });
        if let Err(e) = read {
            problems.push(e.to_string());
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::VerifyFailed(problems.join("; ")))
    }
}

fn check_other_objects(
    repo: &PolicyRepo<'_>,
    m: &Manifest,
    unsealing: Option<&crate::keys::Unsealing>,
) -> Result<()> {
    for (name, digest) in m.objects.iter().filter(|(n, _)| n.as_str() != repo::DATA) {
        let key = repo::object_key(repo.policy, &m.label, name);
        let object = format!("target '{}': {key}", repo.storage.target());
        let raw = repo.storage.open(&key)?;
        let mut dec = Decoder::new(raw, &object, digest, unsealing, m.encrypted())?;
        // The decoder's last read checks both hashes.
        std::io::copy(&mut dec, &mut std::io::sink()).map_err(|e| read_error(&object, e))?;
    }
    Ok(())
}
