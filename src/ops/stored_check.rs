//! What a host without the key can prove about its backups: every object
//! a manifest lists is stored with the size and sha256 the manifest
//! recorded (the bytes a restore will decrypt are the ones written), every
//! diff's full is there and intact, and each WAL generation's segments
//! follow one another without a gap. What it cannot prove (that the bytes
//! decrypt, replay and pass `integrity_check`) is the restore drill's, run
//! where the key lives; its newest outcomes, recorded on the target
//! (`repo::drill`), are read and reported alongside.

use std::io::Read;

use super::PolicyRepo;
use super::report::Verified;
use super::restore::pick;
use super::verify::{Problems, as_drill_failure, manifest_failure, name_problems};
use crate::codec::{ObjectDigest, read_error};
use crate::config::{Policy, Target};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo;

/// Checks `policy` on `target` without the key. Every problem is named;
/// exit 3 for what is missing or changed, 1 when the target cannot be read.
pub fn check(
    ctx: &Context,
    policy: &Policy,
    target: &Target,
    progress: &dyn Progress,
) -> Result<Verified> {
    let started = std::time::Instant::now();
    let store = ctx.storage(target)?;
    let repo = PolicyRepo {
        storage: store.as_ref(),
        policy: &policy.name,
    };
    let newest = pick(&repo, None).map_err(as_drill_failure)?;
    let mut problems: Problems = Vec::new();
    let committed = repo.committed()?;
    let mut backups = 0;
    for c in &committed {
        let label = &c.dir.label;
        let m = match &c.manifest {
            Ok(m) => m,
            Err(e) => {
                problems.push((format!("backup {label}"), manifest_failure(e)));
                continue;
            }
        };
        backups += 1;
        if let Err(e) = repo.chain(label) {
            problems.push((format!("backup {label}"), as_drill_failure(e)));
        }
        progress.set_total(m.objects.values().map(|o| o.stored_size).sum());
        for (name, digest) in &m.objects {
            let key = repo::object_key(repo.policy, &m.label, name);
            if let Err(e) = stored_bytes(repo.storage, &key, digest, progress, &mut |_| Ok(())) {
                problems.push((format!("backup {label}"), as_drill_failure(e)));
            }
        }
    }
    let prefix = repo::wal::wal_prefix(repo.policy);
    let segments = match repo.storage.list(&prefix) {
        Ok(listing) => {
            let segs = repo::wal::segments(&prefix, &listing);
            problems.extend(name_problems(&segs));
            for s in segs.iter().filter(|s| s.size == 0) {
                problems.push((
                    format!("WAL segment {}", s.key),
                    Error::VerifyFailed("is stored empty".into()),
                ));
            }
            segs.len()
        }
        Err(e) => {
            problems.push(("WAL".into(), as_drill_failure(e)));
            0
        }
    };
    let drills = repo::drill::newest(repo.storage, repo.policy)
        .inspect_err(|e| tracing::warn!(policy = %policy.name, target = %target.name, "cannot read the drills recorded on the target: {e}"))
        .ok();
    super::verify::outcome(
        Verified {
            policy: policy.name.clone(),
            target: target.name.clone(),
            label: newest.to_string(),
            ok: true,
            seconds: started.elapsed().as_secs_f64(),
            backups_read: Some(backups),
            segments_read: Some(segments),
            restored: Vec::new(),
            without_key: true,
            drills,
            frames_sampled: None,
        },
        problems,
    )
}

/// Reads one object's stored bytes, handing each piece to `sink` (a copy
/// writes them on), and compares their size and digest with what its
/// manifest recorded: an `Err` means the bytes must not be trusted, and
/// a copy must not commit what it wrote.
pub(super) fn stored_bytes(
    storage: &dyn crate::storage::Storage,
    key: &str,
    digest: &ObjectDigest,
    progress: &dyn Progress,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let object = format!("target '{}': {key}", storage.target());
    let mut raw = storage.open(key)?;
    let mut hash = digest.stored_hasher();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = raw.read(&mut buf).map_err(|e| read_error(&object, e))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        sink(&buf[..n])?;
        size += n as u64;
        progress.advance(n as u64);
    }
    let bad = |reason: String| Error::Integrity {
        object: object.clone(),
        reason,
    };
    if size != digest.stored_size {
        return Err(bad(format!(
            "{size} bytes stored, the manifest says {}",
            digest.stored_size
        )));
    }
    let (recorded, name) = digest.stored_recorded();
    if hash.hex() != recorded {
        return Err(bad(format!(
            "its stored bytes' {name} differs from the manifest's: changed since the backup"
        )));
    }
    Ok(())
}
