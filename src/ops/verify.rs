//! The restore drill: read every object back, check it, restore it to a
//! scratch file and run `integrity_check`. A backup that passes here will
//! restore on the worst day.

use std::path::Path;

use super::PolicyRepo;
use super::report::Verified;
use super::restore::{materialize, pick};
use crate::codec::{Decoder, read_error};
use crate::config::{Policy, Target};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::{self, Label, Manifest};
use crate::sqlite;

/// Verifies one backup (the newest by default) of `policy` on `target`, and
/// every WAL segment. A drill that fails is an error: exit 3 for what is
/// missing or damaged, 1 when the target could not be read (the network),
/// 2 when no key can open the backups.
pub fn verify(
    ctx: &Context,
    policy: &Policy,
    target: &Target,
    label: Option<&str>,
    identity: Option<&Path>,
    progress: &dyn Progress,
) -> Result<Verified> {
    let started = std::time::Instant::now();
    let store = ctx.storage(target)?;
    let repo = PolicyRepo {
        storage: store.as_ref(),
        policy: &policy.name,
    };
    let unsealing = ctx.unsealing(policy, identity)?;
    let picked = pick(&repo, label).map_err(as_drill_failure)?;
    let drilled =
        drill(ctx, &repo, &picked, unsealing.as_ref(), progress).map_err(as_drill_failure);
    // The WAL is part of what a restore needs: every segment is read back
    // and hash-checked, and a gap is a failure, whatever the backup's outcome.
    let wal = check_wal(&repo, unsealing.as_ref(), policy.encrypted).map_err(as_drill_failure);
    match (drilled, wal) {
        (Ok(()), Ok(())) => Ok(Verified {
            policy: policy.name.clone(),
            target: target.name.clone(),
            label: picked.to_string(),
            ok: true,
            seconds: started.elapsed().as_secs_f64(),
        }),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(a), Err(b)) => Err(Error::Several(vec![
            (format!("backup {picked}"), a),
            ("WAL".to_string(), b),
        ])),
    }
}

/// What a failed drill is: damage or absence is a failed verification
/// (exit 3); a target that cannot be read (1) or a key that is missing (2)
/// keeps its own code, since the backup itself may be fine.
fn as_drill_failure(e: Error) -> Error {
    match e.exit_code() {
        1..=3 => e,
        _ => Error::VerifyFailed(e.to_string()),
    }
}

fn drill(
    ctx: &Context,
    repo: &PolicyRepo<'_>,
    label: &Label,
    unsealing: Option<&crate::keys::Unsealing>,
    progress: &dyn Progress,
) -> Result<()> {
    let chain = repo.chain(label)?;
    // Objects that a restore does not read (page indexes) are read back too.
    for m in &chain {
        check_other_objects(repo, m, unsealing)?;
    }
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
