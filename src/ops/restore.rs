//! Restoring a SQLite backup into a file, atomically.
//!
//! Pages are written into a temporary file next to the destination, the
//! stream's hashes are checked, every page written is read back and
//! compared with the backup's page hashes, WAL is replayed when asked,
//! SQLite checks the result (`proof`: `integrity_check`, or `quick_check`
//! when a drill already ran `integrity_check` on the same backup), and only
//! then is it fsynced and renamed over the destination. Any failure before
//! the rename leaves the destination exactly as it was.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::PolicyRepo;
use super::proof::{self, Check, Proof, Written};
use super::report::{Replayed, RestoreReport};
use crate::codec::Decoder;
use crate::config::{Policy, Target};
use crate::context::Context;
use crate::error::{Error, Result, io_reason};
use crate::keys::Unsealing;
use crate::progress::{Counted, Progress};
use crate::repo::{self, Label, Manifest, wal::Replay};
use crate::sqlite::apply;
use crate::sqlite::frame_apply;
use crate::sqlite::pages::HASH_LEN;

/// Options of a restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub to: PathBuf,
    /// A backup label; the newest committed backup when absent.
    pub backup: Option<String>,
    pub identity: Option<PathBuf>,
    /// Replace an existing destination.
    pub force: bool,
    /// Restore the state as of this instant (WAL replay); the newest state when absent.
    pub at: Option<DateTime<Utc>>,
    /// PostgreSQL: a standby that keeps replaying the archive (`dr follow`)
    /// until `dr promote`, instead of a cluster that promotes at the end.
    pub standby: bool,
    /// SQLite: how the restored database is proven healthy (`proof`).
    pub check: Check,
}

/// Picks the backup to restore: the named label, or the newest committed one.
pub fn pick(repo: &PolicyRepo<'_>, label: Option<&str>) -> Result<Label> {
    let target = repo.storage.target();
    match label {
        Some(l) => {
            let label: Label = l.parse().map_err(Error::NotFound)?;
            let dirs = repo.dirs()?;
            match dirs.iter().find(|d| d.label == label) {
                Some(d) if d.has_manifest => Ok(label),
                Some(_) => Err(Error::NotFound(format!(
                    "backup {label} on target '{target}' was interrupted (it has no manifest) and cannot be restored"
                ))),
                None => Err(Error::NotFound(format!(
                    "no backup {label} of policy '{}' on target '{target}' (see `dr info {}`)",
                    repo.policy, repo.policy
                ))),
            }
        }
        None => {
            // "Newest" is what the bucket holds, delete markers or not.
            if let Some(e) = repo.hidden_error()? {
                return Err(e);
            }
            let dirs = repo.dirs()?;
            let Some(newest) = dirs.iter().rev().find(|d| d.has_manifest) else {
                return Err(Error::NotFound(format!(
                    "policy '{}' has no committed backup on target '{target}' ({})",
                    repo.policy,
                    repo.storage.location()
                )));
            };
            // The newest backup is what "newest" promises: when it is
            // damaged, say so and name the newest one that restores,
            // rather than silently return an older state.
            if let Some(Err(e)) = repo
                .committed_of(std::slice::from_ref(newest))
                .pop()
                .map(|c| c.manifest)
            {
                let candidates: Vec<_> = repo
                    .committed_of(&dirs)
                    .iter()
                    .map(super::Committed::candidate)
                    .collect();
                let hint = match repo::retention::newest_restorable(&candidates) {
                    Some(l) => format!(
                        "; the newest restorable backup is {l}: restore it with --backup {l}"
                    ),
                    None => "; no backup on this target can be restored".to_string(),
                };
                return Err(match e {
                    Error::Integrity { object, reason } => Error::Integrity {
                        object,
                        reason: format!("{reason}{hint}"),
                    },
                    other => other,
                });
            }
            Ok(newest.label.clone())
        }
    }
}

/// Restores `policy` from `target` into `opts.to`.
pub fn restore(
    ctx: &Context,
    policy: &Policy,
    target: &Target,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let to = &opts.to;
    let replaced = check_destination(to, opts.force)?;
    let unsealing = ctx.unsealing(policy, opts.identity.as_deref())?;
    let store = ctx.storage(target)?;
    let repo = PolicyRepo {
        storage: store.as_ref(),
        policy: &policy.name,
    };
    let (label, replay) = choose(&repo, opts)?;
    let chain = repo.chain(&label)?;
    let dir = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let fname = to
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "restore".into());
    // Plaintext a killed restore left here goes before this one adds its own.
    let kind = format!(".{fname}.dr-restore.");
    crate::scratch::sweep(&dir, &kind);
    let tmp = tempfile::Builder::new()
        .prefix(&crate::scratch::prefix_for(&kind))
        .tempfile_in(&dir)
        .map_err(|e| {
            Error::io(
                format!(
                    "cannot create a temporary file in {}: {}",
                    dir.display(),
                    io_reason(&e)
                ),
                e,
            )
        })?;
    if let Some(meta) = &replaced {
        keep_owner_and_mode(tmp.as_file(), meta, to)?;
    }
    let (bytes, written) = materialize(
        &repo,
        &chain,
        unsealing.as_ref(),
        tmp.as_file(),
        tmp.path(),
        progress,
    )?;
    tracing::debug!(seconds = started.elapsed().as_secs_f64(), "pages written");
    // The pages go to disk while they are read back and checked (CPU);
    // both must pass before the rename. A WAL replay dirties a few pages
    // more, synced again below.
    let syncing = tmp
        .as_file()
        .try_clone()
        .map(|f| std::thread::spawn(move || f.sync_all()));
    let (check, drill) = proof::health(&repo, &label, replay.is_some(), opts.check);
    // With no WAL to replay the file is final once written: its SQLite
    // check runs beside the read-back (one core each, where they used to
    // take turns).
    let early = replay.is_none().then(|| {
        let path = tmp.path().to_path_buf();
        std::thread::spawn(move || proof::run_check(&path, check))
    });
    // Before any WAL changes a page: the file is the backup, page by page.
    let pages_identical =
        proof::identity(&repo, &chain, unsealing.as_ref(), &written, tmp.as_file())?;
    let wal = match &replay {
        Some(plan) => Some(replay_wal(
            &repo,
            plan,
            &chain,
            unsealing.as_ref(),
            tmp.as_file(),
            tmp.path(),
        )?),
        None => None,
    };
    let bytes = tmp.as_file().metadata().map(|m| m.len()).unwrap_or(bytes);
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        "pages written, hashes verified"
    );
    let checked = match early {
        Some(h) => h
            .join()
            .unwrap_or_else(|_| Err(Error::Other("internal: the check thread panicked".into()))),
        None => proof::run_check(tmp.path(), check),
    };
    let synced = match syncing {
        Ok(handle) => handle
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("fsync thread panicked"))),
        Err(e) => Err(e),
    }
    .and_then(|()| match &wal {
        Some(_) => tmp.as_file().sync_all(),
        None => Ok(()),
    });
    checked?;
    synced.map_err(|e| Error::io(format!("cannot fsync {}", tmp.path().display()), e))?;
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        check,
        "checked, fsynced"
    );
    replace(tmp, to)?;
    Ok(RestoreReport {
        policy: policy.name.clone(),
        target: target.name.clone(),
        label: Some(label.to_string()),
        chain: chain.iter().map(|m| m.label.to_string()).collect(),
        wal,
        at: opts.at,
        to: to.clone(),
        bytes: Some(bytes),
        seconds: started.elapsed().as_secs_f64(),
        next_step: None,
        proof: Some(Proof {
            pages_identical,
            check,
            drill,
        }),
    })
}

/// Checks what `--to` names before anything is decrypted. Returns the
/// metadata of the regular file a `--force` restore replaces. Refused: a
/// directory, anything not a regular file (a device or FIFO would be
/// replaced by a file), a symbolic link (dangling or not: the restore
/// would land somewhere the user did not name), an existing file without
/// `--force`, and a database another process has open (its later writes
/// would go into the replaced file, lost).
fn check_destination(to: &Path, force: bool) -> Result<Option<std::fs::Metadata>> {
    let meta = match std::fs::symlink_metadata(to) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot inspect {}", to.display()), e)),
    };
    let t = meta.file_type();
    let shown = to.display();
    if t.is_dir() {
        return Err(Error::Refused(format!(
            "{shown} is a directory: --to takes the path of the database file to create"
        )));
    }
    if t.is_symlink() {
        let dest = std::fs::read_link(to)
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        return Err(Error::Refused(format!(
            "{shown} is a symbolic link (to {dest}): dr does not restore through links; pass the path of the real file"
        )));
    }
    if !t.is_file() {
        return Err(Error::Refused(format!(
            "{shown} is not a regular file (a device, FIFO or socket): dr restores only into regular files"
        )));
    }
    if !force {
        return Err(Error::Refused(format!(
            "{shown} exists: dr does not overwrite a database unless you pass --force"
        )));
    }
    let mut users = crate::scratch::opened_by_others(to);
    for side in sidecars(to) {
        users.extend(crate::scratch::opened_by_others(&side));
    }
    users.sort();
    users.dedup();
    if !users.is_empty() {
        let who: Vec<String> = users
            .iter()
            .map(|(pid, comm)| format!("pid {pid} ({comm})"))
            .collect();
        return Err(Error::Refused(format!(
            "{shown} is open in {}: stop the application before restoring over its database (its writes would be lost)",
            who.join(", ")
        )));
    }
    Ok(Some(meta))
}

/// Gives the restored file the owner, group and mode of the file it
/// replaces, so the application can still open it.
fn keep_owner_and_mode(file: &File, old: &std::fs::Metadata, to: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let why = |e| {
        Error::io(
            format!(
                "cannot give the restored database the owner {}:{} and mode {:o} of {} (restore as root or as its owner)",
                old.uid(),
                old.gid(),
                old.mode() & 0o7777,
                to.display()
            ),
            e,
        )
    };
    let cur = file.metadata().map_err(why)?;
    if (cur.uid(), cur.gid()) != (old.uid(), old.gid()) {
        std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid())).map_err(why)?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(old.mode() & 0o7777))
        .map_err(why)
}

/// Picks the backup, and the WAL to replay on it: a named backup alone; an
/// instant through the WAL; otherwise the newest state, whether that is a
/// backup or the end of the WAL.
fn choose(repo: &PolicyRepo<'_>, opts: &RestoreOptions) -> Result<(Label, Option<Replay>)> {
    if opts.backup.is_some() {
        if opts.at.is_some() {
            return Err(Error::Refused(
                "--backup and --at exclude each other: --at picks the backup itself".into(),
            ));
        }
        return Ok((pick(repo, opts.backup.as_deref())?, None));
    }
    let prefix = repo::wal::wal_prefix(repo.policy);
    let segs = repo::wal::segments(&prefix, &repo.storage.list(&prefix)?);
    if segs.is_empty() && opts.at.is_none() {
        return Ok((pick(repo, None)?, None));
    }
    let committed = repo.committed()?;
    let bases: Vec<_> = committed
        .iter()
        .filter_map(|c| c.manifest.as_ref().ok())
        .filter_map(super::wal_base)
        .collect();
    let target = repo.storage.target();
    let plan = match repo::wal::plan(&bases, &segs, opts.at) {
        Ok(p) => p,
        Err(covered) => {
            return match opts.at {
                Some(at) => Err(Error::NotFound(format!(
                    "cannot restore policy '{}' to {} from target '{target}': {covered}",
                    repo.policy,
                    at.to_rfc3339()
                ))),
                None => Ok((pick(repo, None)?, None)),
            };
        }
    };
    if opts.at.is_none() {
        // A backup newer than everything the WAL reaches is the newest state.
        let reach = plan.window.end;
        if let Some(newest) = committed
            .iter()
            .filter_map(|c| c.manifest.as_ref().ok())
            .max_by_key(|m| m.timestamp_start)
            && newest.timestamp_start > reach
        {
            return Ok((newest.label.clone(), None));
        }
        if let Some(gap) = repo::wal::gap_after(&plan, &segs) {
            return Err(Error::Incomplete(format!(
                "cannot restore the newest state of policy '{}' from target '{target}': the WAL has a gap ({gap}), so the commits after it cannot be replayed. The newest instant reachable is {}: restore it with --at '{}' if that is what you want, or restore from another target",
                repo.policy,
                reach.to_rfc3339(),
                reach.to_rfc3339()
            )));
        }
    }
    let label: Label = plan.base.label.parse().map_err(Error::NotFound)?;
    Ok((label, Some(plan)))
}

/// Applies the planned WAL segments on top of the restored backup, up to
/// the last commit at or before the plan's instant.
pub fn replay_wal(
    repo: &PolicyRepo<'_>,
    plan: &Replay,
    chain: &[Manifest],
    unsealing: Option<&Unsealing>,
    file: &File,
    path: &Path,
) -> Result<Replayed> {
    let Some(last) = chain.last() else {
        return Err(Error::Other("internal: empty restore chain".into()));
    };
    let mut replay = apply::Replayer::new(
        file,
        path,
        &plan.base.label,
        last.page_size,
        last.page_count,
        plan.base.seq,
        plan.until,
    );
    for seg in &plan.segments {
        if replay.done() {
            break;
        }
        let object = format!("target '{}': {}", repo.storage.target(), seg.key);
        let raw = repo.storage.open(&seg.key)?;
        let dec = Decoder::self_checked(raw, &object, unsealing, last.encrypted())?;
        replay.segment(
            std::io::BufReader::with_capacity(1 << 20, dec),
            &object,
            seg.first,
            seg.last,
        )?;
    }
    replay.finish()?;
    Ok(Replayed {
        generation: plan.base.generation.clone(),
        frame: replay.seq(),
        segments: replay.segments,
        transactions: replay.transactions,
        last_commit: replay.last_commit,
    })
}

/// Writes the pages of `chain` (a full, then optionally diffs) into `file`.
/// Returns the size of the database written, and the hashes of the pages
/// the diffs wrote (for `proof::identity`).
pub fn materialize(
    repo: &PolicyRepo<'_>,
    chain: &[Manifest],
    unsealing: Option<&Unsealing>,
    file: &File,
    path: &Path,
    progress: &dyn Progress,
) -> Result<(u64, Written)> {
    let Some(last) = chain.last() else {
        return Err(Error::Other("internal: empty restore chain".into()));
    };
    let total: u64 = chain
        .iter()
        .filter_map(|m| m.objects.get(repo::DATA).map(|o| o.plain_size))
        .sum();
    progress.set_total(total);
    let mut written = Written::new();
    for (i, m) in chain.iter().enumerate() {
        let Some(expected) = m.objects.get(repo::DATA) else {
            return Err(Error::Integrity {
                object: format!("backup {}", m.label),
                reason: "its manifest lists no data object".into(),
            });
        };
        if m.page_size != last.page_size {
            return Err(Error::Integrity {
                object: format!("backup {}", last.label),
                reason: format!(
                    "page size {} differs from its full's {}",
                    last.page_size, m.page_size
                ),
            });
        }
        let key = repo::object_key(repo.policy, &m.label, repo::DATA);
        let object = format!("target '{}': {key}", repo.storage.target());
        let raw = repo.storage.open(&key)?;
        let mut dec = Decoder::new(raw, &object, expected, unsealing, m.encrypted())?;
        // The full's pages are compared with its page index when they are
        // read back; a diff's, with their hashes taken here.
        let mut hashed = |pgno: u32, hash: &[u8; HASH_LEN]| {
            written.insert(pgno, *hash);
        };
        let seen = (i > 0).then_some(&mut hashed as &mut apply::Seen<'_>);
        if let Some(frames) = dec.frames() {
            // Format 2: frames decode, and their pages are written, on
            // every core.
            frame_apply::apply_frames(
                frames,
                &object,
                m.page_size,
                m.page_count,
                file,
                path,
                progress,
                seen,
            )?;
            continue;
        }
        let counted = std::io::BufReader::with_capacity(1 << 20, Counted::new(dec, progress));
        apply::apply_pages(
            counted,
            &object,
            m.page_size,
            m.page_count,
            file,
            path,
            seen,
        )?;
    }
    let size = last.page_count * u64::from(last.page_size);
    file.set_len(size)
        .map_err(|e| apply::write_error(path, e))?;
    Ok((size, written))
}

fn sidecars(path: &Path) -> [PathBuf; 3] {
    let s = path.as_os_str().to_string_lossy();
    [
        PathBuf::from(format!("{s}-wal")),
        PathBuf::from(format!("{s}-shm")),
        PathBuf::from(format!("{s}-journal")),
    ]
}

/// Renames the verified temporary file over `to`. The destination's own
/// `-wal`/`-shm`/`-journal` files belong to the old database and would
/// corrupt the new one, so they are moved aside first and put back if the
/// rename fails.
fn replace(tmp: tempfile::NamedTempFile, to: &Path) -> Result<()> {
    let mut aside = Vec::new();
    for side in sidecars(to) {
        if side.exists() {
            let moved = PathBuf::from(format!("{}.dr-old", side.display()));
            std::fs::rename(&side, &moved)
                .map_err(|e| Error::io(format!("cannot move {} aside", side.display()), e))?;
            aside.push((side, moved));
        }
    }
    match tmp.persist(to) {
        Ok(_) => {
            for (_, moved) in aside {
                let _ = std::fs::remove_file(moved);
            }
            if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
            Ok(())
        }
        Err(e) => {
            for (side, moved) in aside {
                let _ = std::fs::rename(moved, side);
            }
            Err(Error::io(
                format!("cannot move the restored database into {}", to.display()),
                e.error,
            ))
        }
    }
}
