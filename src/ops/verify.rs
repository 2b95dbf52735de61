//! The restore drill: read every object back, check it, restore it to a
//! scratch file and run `integrity_check`. A backup that passes here will
//! restore on the worst day.

use super::PolicyRepo;
use super::report::{FramesSampled, Verified};
use super::restore::{materialize, pick, replay_wal};
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
    /// No key on this host: check what can be checked without it
    /// (`ops::stored_check`) instead of a restore drill.
    pub without_key: bool,
}

/// Verifies `policy` on `target`: every committed backup and every WAL
/// segment is read back, decrypted and hash-checked (or a random sample of
/// them), each generation's WAL is checked for gaps, and the newest chain
/// (every chain with `restore_all`) is restored to a scratch file and
/// checked with `integrity_check`. Every problem is named; a drill that
/// fails is an error: exit 3 for what is missing or damaged, 1 when the
/// target could not be read (the network), 2 when no key can open the
/// backups.
///
/// The outcome of a drill of the newest state (not of one `--backup`) is
/// written to the target (`repo::drill`), so that hosts without the key
/// know when a drill last passed.
pub fn verify(
    ctx: &Context,
    policy: &Policy,
    target: &Target,
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<Verified> {
    if opts.without_key {
        return super::stored_check::check(ctx, policy, target, progress);
    }
    let result = drill_repository(ctx, policy, target, opts, progress);
    // A drill that could not run (no key: 2; the target unreachable: 1)
    // has no outcome to record.
    let concluded = result
        .as_ref()
        .map_or_else(|e| e.exit_code() == 3, |_| true);
    if opts.label.is_none() && concluded {
        let r = repo::drill::DrillRecord {
            format: repo::drill::FORMAT,
            policy: policy.name.clone(),
            target: target.name.clone(),
            host: crate::lock::hostname(),
            ok: result.is_ok(),
            label: result.as_ref().map(|v| v.label.clone()).unwrap_or_default(),
            finished: chrono::Utc::now(),
            seconds: result.as_ref().map_or(0.0, |v| v.seconds),
            restored: result
                .as_ref()
                .map(|v| v.restored.clone())
                .unwrap_or_default(),
            error: result.as_ref().err().map(ToString::to_string),
            dr_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let written = ctx
            .storage(target)
            .and_then(|s| repo::drill::write(s.as_ref(), &r));
        if let Err(e) = written {
            tracing::warn!(
                policy = %policy.name,
                target = %target.name,
                "the drill's outcome could not be written to the target, so hosts without the key will not see it: {e}"
            );
        }
    }
    result
}

/// The drill itself (see [`verify`]).
fn drill_repository(
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
    let unsealing = ctx
        .unsealing(policy, opts.identity.as_deref())
        .map_err(|e| match e {
            Error::Secret { path, reason } => Error::Secret {
                path,
                reason: format!(
                    "{reason}; a host that keeps no key checks its backups with `dr verify --without-key` (the restore drill runs where the key is)"
                ),
            },
            e => e,
        })?;
    // A backup a delete marker hides is a backup the drill cannot see: it
    // fails, naming it, rather than pass on an older one (`pick` without a
    // label checks this itself).
    if opts.label.is_some()
        && let Some(e) = repo.hidden_error()?
    {
        return Err(e);
    }
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
    let mut frames = FramesSampled::default();
    let committed = repo.committed()?;
    for c in &committed {
        let label = &c.dir.label;
        let whole_repo = opts.label.is_none();
        let in_chain = newest_chain.contains(label);
        // With --sample, an older format 2 backup has that share of its
        // frames read (every backup, a part of each); a format 1 backup
        // is read whole or not at all, as the sample draws it.
        let by_frames = match (&c.manifest, opts.sample) {
            (Ok(m), Some(p)) if !in_chain && whole_repo && super::frame_sample::samples(m) => {
                Some(p)
            }
            _ => None,
        };
        if by_frames.is_none() && !(in_chain || whole_repo && sampled()) {
            continue;
        }
        match &c.manifest {
            Err(e) => note(format!("backup {label}"), Err(manifest_failure(e))),
            Ok(m) => {
                backups += 1;
                let r = match by_frames {
                    Some(p) => {
                        super::frame_sample::check(&repo, m, unsealing.as_ref(), p).map(|s| {
                            frames.backups += 1;
                            frames.frames += s.frames;
                            frames.read += s.read;
                        })
                    }
                    None => read_back(&repo, m, unsealing.as_ref(), progress),
                };
                note(format!("backup {label}"), r);
            }
        }
    }
    let mut restored = Vec::new();
    let mut restore = |label: &Label| {
        restored.push(label.to_string());
        drill(ctx, &repo, label, None, unsealing.as_ref(), progress)
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
    // Listed once, for the segment checks and the replay drill.
    let prefix = repo::wal::wal_prefix(repo.policy);
    let segs = match repo.storage.list(&prefix) {
        Ok(listing) => repo::wal::segments(&prefix, &listing),
        Err(e) => {
            problems.push(("WAL".into(), as_drill_failure(e)));
            Vec::new()
        }
    };
    let segments = match check_wal(
        &repo,
        &segs,
        &committed,
        unsealing.as_ref(),
        policy.encrypted,
        &sampled,
    ) {
        Ok((n, wal_problems)) => {
            problems.extend(wal_problems);
            n
        }
        Err(e) => {
            problems.push(("WAL".into(), as_drill_failure(e)));
            0
        }
    };
    // What verify passes, restore restores: each generation's WAL is
    // replayed onto its base, as a point-in-time restore would.
    if opts.label.is_none() {
        match drill_wal(
            ctx,
            &repo,
            &segs,
            &committed,
            unsealing.as_ref(),
            opts.sample,
            progress,
        ) {
            Ok((drilled, wal_problems)) => {
                restored.extend(drilled);
                problems.extend(wal_problems);
            }
            Err(e) => problems.push(("WAL replay".into(), as_drill_failure(e))),
        }
    }
    outcome(
        Verified {
            policy: policy.name.clone(),
            target: target.name.clone(),
            label: newest.to_string(),
            ok: true,
            seconds: started.elapsed().as_secs_f64(),
            backups_read: Some(backups),
            segments_read: Some(segments),
            restored,
            without_key: false,
            drills: None,
            frames_sampled: (frames.backups > 0).then_some(frames),
        },
        problems,
    )
}

/// What a drill found wrong, each named.
pub(super) type Problems = Vec<(String, Error)>;

/// `value` when nothing was found wrong; the one problem as it is; or
/// all of them, with the exit code of the most severe.
pub(super) fn outcome<T>(value: T, mut problems: Problems) -> Result<T> {
    match problems.len() {
        0 => Ok(value),
        1 => Err(problems.remove(0).1),
        _ => Err(Error::Several(problems)),
    }
}

/// What a manifest that could not be read means for a check: a manifest
/// the network cut off is not a damaged backup, the target could not be
/// read (exit 1), as for any other read; anything else is damage (3).
pub(super) fn manifest_failure(e: &Error) -> Error {
    if e.exit_code() == 1 {
        Error::Other(e.to_string())
    } else {
        Error::VerifyFailed(e.to_string())
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
pub(super) fn as_drill_failure(e: Error) -> Error {
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
    progress.set_total(m.objects.values().map(|o| o.plain_size).sum());
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

/// A pid-named scratch file for a drill, in the state_dir (swept by the
/// next run if this one is killed).
fn scratch_file(ctx: &Context) -> Result<tempfile::NamedTempFile> {
    let scratch = ctx.state().tmp();
    std::fs::create_dir_all(&scratch)
        .map_err(|e| Error::io(format!("cannot create {}", scratch.display()), e))?;
    crate::scratch::sweep(&scratch, "verify.");
    tempfile::Builder::new()
        .prefix(&crate::scratch::prefix_for("verify."))
        .suffix(".db")
        .tempfile_in(&scratch)
        .map_err(|e| {
            Error::io(
                format!("cannot create a scratch file in {}", scratch.display()),
                e,
            )
        })
}

/// Restores the chain of `label` to a scratch file, compares its pages
/// with the backup's page hashes, replays `wal` onto it when given, and
/// runs `integrity_check`.
fn drill(
    ctx: &Context,
    repo: &PolicyRepo<'_>,
    label: &Label,
    wal: Option<&repo::wal::Replay>,
    unsealing: Option<&crate::keys::Unsealing>,
    progress: &dyn Progress,
) -> Result<()> {
    let chain = repo.chain(label)?;
    let tmp = scratch_file(ctx)?;
    let (_, written) = materialize(repo, &chain, unsealing, tmp.as_file(), tmp.path(), progress)?;
    super::proof::identity(repo, &chain, unsealing, &written, tmp.as_file())?;
    if let Some(plan) = wal {
        replay_wal(repo, plan, &chain, unsealing, tmp.as_file(), tmp.path())?;
    }
    sqlite::integrity_check(tmp.path())
}

/// Reads back the WAL segments of the policy (all, or the sample),
/// decrypting and checking each hash, and checks that each one is what its
/// name says: it starts at the frame its name starts at, holds exactly the
/// frames its name counts, its first transaction carries the commit time
/// its name starts with, and it has its generation's page size (the page
/// size of that generation's backups). Gaps and overlaps between
/// consecutive segments of a generation are failures too. Returns how many
/// segments were read and every problem found.
fn check_wal(
    repo: &PolicyRepo<'_>,
    segs: &[repo::wal::Segment],
    committed: &[super::Committed],
    unsealing: Option<&crate::keys::Unsealing>,
    encrypted: bool,
    sampled: &dyn Fn() -> bool,
) -> Result<(usize, Problems)> {
    let mut problems = name_problems(segs);
    // The page size each generation's backups were taken with.
    let mut page_sizes = std::collections::HashMap::new();
    for m in committed.iter().filter_map(|c| c.manifest.as_ref().ok()) {
        if let Some(w) = &m.wal {
            page_sizes.insert(w.generation.clone(), m.page_size);
        }
    }
    let mut read = 0;
    for seg in segs.iter().filter(|_| sampled()) {
        read += 1;
        let object = format!("target '{}': {}", repo.storage.target(), seg.key);
        let r = repo.storage.open(&seg.key).and_then(|raw| {
            let dec = Decoder::self_checked(raw, &object, unsealing, encrypted)?;
            check_segment(
                std::io::BufReader::with_capacity(1 << 20, dec),
                &object,
                seg,
                page_sizes.get(&seg.generation).copied(),
            )
        });
        if let Err(e) = r {
            problems.push((format!("WAL segment {}", seg.key), as_drill_failure(e)));
        }
    }
    Ok((read, problems))
}

/// What the segments' names alone show wrong: gaps, and overlaps between
/// consecutive segments of a generation (checked with or without the key).
pub(super) fn name_problems(segs: &[repo::wal::Segment]) -> Problems {
    let mut problems: Vec<(String, Error)> = repo::wal::gaps(segs)
        .iter()
        .map(|g| {
            (
                "WAL".to_string(),
                Error::VerifyFailed(format!("gap in {g}")),
            )
        })
        .collect();
    for pair in segs.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.generation == b.generation && b.first <= a.last {
            problems.push((
                format!("WAL segment {}", b.key),
                Error::VerifyFailed(format!(
                    "overlaps {}: frames {}-{} are in both (a segment stored under a name it does not have)",
                    a.key,
                    b.first,
                    a.last.min(b.last)
                )),
            ));
        }
    }
    problems
}

/// Reads one segment to its end (its hash is checked there) and checks it
/// against its name and its generation's page size.
fn check_segment(
    input: impl std::io::Read,
    object: &str,
    seg: &repo::wal::Segment,
    page_size: Option<u32>,
) -> Result<()> {
    let bad = |reason: String| Error::Integrity {
        object: object.to_string(),
        reason,
    };
    let mut r = sqlite::segment::SegmentReader::new(input).map_err(|e| read_error(object, e))?;
    if r.first_seq != seg.first {
        return Err(bad(format!(
            "starts at frame {} but its name says {} (a segment stored under another's name)",
            r.first_seq, seg.first
        )));
    }
    if let Some(ps) = page_size
        && r.page_size != ps
    {
        return Err(bad(format!(
            "page size {} differs from the {ps} of generation {}'s backups (a segment of another generation or database)",
            r.page_size, seg.generation
        )));
    }
    let mut at = seg.first.saturating_sub(1);
    // The name carries the first commit's stamp, to the millisecond: a
    // segment of another generation or time stored under this name fails.
    let stamped = seg.first_commit.timestamp_millis();
    let mut first_txn = true;
    while let Some(t) = r.next_txn().map_err(|e| read_error(object, e))? {
        at += u64::from(t.nframes);
        if first_txn && t.commit_ms != stamped {
            return Err(bad(format!(
                "its first transaction committed at {} but its name says {} (a segment stored under another's name)",
                chrono::DateTime::from_timestamp_millis(t.commit_ms)
                    .map_or_else(|| t.commit_ms.to_string(), |d| d.to_rfc3339()),
                seg.first_commit.to_rfc3339()
            )));
        }
        first_txn = false;
        for _ in 0..t.nframes {
            r.next_frame().map_err(|e| read_error(object, e))?;
        }
    }
    if at != seg.last {
        return Err(bad(format!(
            "ends at frame {at} but its name says {}",
            seg.last
        )));
    }
    Ok(())
}

/// The WAL drill: for each generation that has a base backup, restores
/// the base into a scratch file, replays the generation's WAL onto it up
/// to the newest instant it reaches (and, with `--sample`, also up to one
/// instant drawn at random within it), then runs `integrity_check`, as a
/// restore does. The newest generation is always drilled; older ones as
/// the sample draws them. Returns the instants drilled, per generation.
fn drill_wal(
    ctx: &Context,
    repo: &PolicyRepo<'_>,
    segs: &[repo::wal::Segment],
    committed: &[super::Committed],
    unsealing: Option<&crate::keys::Unsealing>,
    sample: Option<f64>,
    progress: &dyn Progress,
) -> Result<(Vec<String>, Problems)> {
    let bases: Vec<repo::wal::Base> = committed
        .iter()
        .filter_map(|c| c.manifest.as_ref().ok())
        .filter_map(super::wal_base)
        .collect();
    let mut generations: Vec<&str> = bases.iter().map(|b| b.generation.as_str()).collect();
    generations.sort();
    generations.dedup();
    let newest = generations.last().copied();
    let mut drilled = Vec::new();
    let mut problems = Vec::new();
    for g in generations {
        if Some(g) != newest && !sample_keeps(sample) {
            continue;
        }
        let own: Vec<repo::wal::Base> = bases
            .iter()
            .filter(|b| b.generation == g)
            .cloned()
            .collect();
        let Ok(plan) = repo::wal::plan(&own, segs, None) else {
            continue;
        };
        if plan.segments.is_empty() {
            continue; // nothing past the base: the backup drill covers it
        }
        let mut instants = vec![None];
        if sample.is_some() && plan.window.end > plan.window.start {
            let span = (plan.window.end - plan.window.start)
                .num_milliseconds()
                .max(1);
            let off = fastrand::i64(0..=span);
            instants.push(Some(
                plan.window.start + chrono::Duration::milliseconds(off),
            ));
        }
        for at in instants {
            let plan = match at {
                None => plan.clone(),
                Some(t) => match repo::wal::plan(&own, segs, Some(t)) {
                    Ok(p) => p,
                    Err(_) => continue,
                },
            };
            let what = format!(
                "WAL replay of generation {g} to {}",
                at.map_or_else(|| "its newest instant".to_string(), |t| t.to_rfc3339())
            );
            let r = plan
                .base
                .label
                .parse::<Label>()
                .map_err(Error::NotFound)
                .and_then(|l| drill(ctx, repo, &l, Some(&plan), unsealing, progress));
            drilled.push(what.clone());
            if let Err(e) = r {
                problems.push((what, as_drill_failure(e)));
            }
        }
    }
    Ok((drilled, problems))
}
