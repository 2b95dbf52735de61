//! `dr follow`: a warm standby. Restores the newest state, then applies
//! each WAL segment as it is committed on the target, one source
//! transaction at a time (`sqlite::live`), until stopped. Applications may
//! read the copy meanwhile; a new generation on the source is followed by
//! re-basing on its base backup; a gap stops the copy at the last state it
//! holds, with an error (exit 7), never a silently shorter copy.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;

use super::PolicyRepo;
use super::restore::{RestoreOptions, materialize, restore};
use crate::codec::Decoder;
use crate::config::{Policy, Target};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::progress::Silent;
use crate::repo::{self, Label};
use crate::sqlite::live::LiveCopy;

/// What `dr follow` is asked.
#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// The copy: the policy's own path by default (a standby runs the
    /// primary's policy file, and fails over in place).
    pub to: PathBuf,
    pub identity: Option<PathBuf>,
    /// Replace an existing file at `to` with the newest state first.
    pub force: bool,
    /// How often the target is asked for new segments.
    pub poll: Duration,
}

/// Where a follower stopped.
#[derive(Debug, Clone, Serialize)]
pub struct Followed {
    pub policy: String,
    pub target: String,
    pub to: PathBuf,
    pub generation: String,
    pub frame: u64,
    pub transactions: u64,
    pub rebased: u64,
    pub seconds: f64,
}

/// How many quiet polls pass between looks for a newer generation (a
/// listing of every segment of the policy, so not on every poll).
const GENERATION_EVERY: u32 = 10;

/// Follows `policy` from `target` into `opts.to` until `stop`.
pub fn follow(
    ctx: &Context,
    policy: &Policy,
    target: &Target,
    opts: &FollowOptions,
    stop: &AtomicBool,
) -> Result<Followed> {
    let started = Instant::now();
    let state_path = ctx.state().follow_pid(&policy.name).with_extension("json");
    // A follower restarted over its own copy continues where it stopped
    // (a standby's restart does not restore the whole database again).
    if !opts.force
        && let Some(st) = Position::load(&state_path)
        && st.to == opts.to
        && st.target == target.name
        && opts.to.is_file()
    {
        crate::sqlite::quick_check(&opts.to)?;
        tracing::info!(policy = %policy.name, to = %opts.to.display(), generation = %st.generation, frame = st.frame, "continuing the copy where it stopped");
        return run(
            ctx,
            policy,
            target,
            opts,
            stop,
            st.generation,
            st.frame,
            &state_path,
            started,
        );
    }
    let first = restore(
        ctx,
        policy,
        target,
        &RestoreOptions {
            to: opts.to.clone(),
            backup: None,
            identity: opts.identity.clone(),
            force: opts.force,
            at: None,
            standby: false,
        },
        &Silent,
    )?;
    let (generation, frame) = match &first.wal {
        Some(w) => (w.generation.clone(), w.frame),
        None => {
            let label: Label = first
                .label
                .as_deref()
                .unwrap_or_default()
                .parse()
                .map_err(Error::NotFound)?;
            let store = ctx.storage(target)?;
            let repo = PolicyRepo {
                storage: store.as_ref(),
                policy: &policy.name,
            };
            let chain = repo.chain(&label)?;
            let pos = chain.last().and_then(|m| m.wal.clone()).ok_or_else(|| {
                Error::Refused(format!(
                    "policy '{}': backup {label} has no WAL position: only a policy with [wal] enabled can be followed",
                    policy.name
                ))
            })?;
            (pos.generation, pos.frame)
        }
    };
    run(
        ctx,
        policy,
        target,
        opts,
        stop,
        generation,
        frame,
        &state_path,
        started,
    )
}

/// Where a follower's copy stands: `state_dir/follow/<policy>.json`,
/// written after every batch applied.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Position {
    to: PathBuf,
    target: String,
    generation: String,
    frame: u64,
}

impl Position {
    fn load(path: &std::path::Path) -> Option<Position> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    fn save(&self, path: &std::path::Path) {
        let text = serde_json::to_vec(self).unwrap_or_default();
        let tmp = path.with_extension("json.tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::warn!(file = %path.display(), "cannot record where the copy stands (a restart will restore again): {e}");
        }
    }
}

/// The follow loop from `generation`/`frame` on.
#[allow(clippy::too_many_arguments)]
fn run(
    ctx: &Context,
    policy: &Policy,
    target: &Target,
    opts: &FollowOptions,
    stop: &AtomicBool,
    mut generation: String,
    frame: u64,
    state_path: &std::path::Path,
    started: Instant,
) -> Result<Followed> {
    let unsealing = ctx.unsealing(policy, opts.identity.as_deref())?;
    let store = ctx.storage(target)?;
    let repo = PolicyRepo {
        storage: store.as_ref(),
        policy: &policy.name,
    };
    let mut copy = LiveCopy::open(&opts.to, frame)?;
    let pid = PidFile::write(ctx.state().follow_pid(&policy.name))?;
    let position = |generation: &str, frame: u64| Position {
        to: opts.to.clone(),
        target: target.name.clone(),
        generation: generation.to_string(),
        frame,
    };
    position(&generation, copy.seq).save(state_path);
    tracing::info!(policy = %policy.name, target = %target.name, to = %opts.to.display(), generation = %generation, frame, "following");
    let prefix = repo::wal::wal_prefix(&policy.name);
    let (mut transactions, mut rebased, mut quiet) = (0u64, 0u64, 0u32);
    // Watched before each listing, so that a segment landing while the
    // listing runs still ends the wait that follows.
    let mut watch: Option<(String, Option<Arrivals>)> = None;
    while !stop.load(Ordering::Relaxed) {
        if watch.as_ref().is_none_or(|(g, _)| *g != generation) {
            let arrivals =
                local_dir(target, &prefix, &generation).and_then(|d| Arrivals::watch(&d));
            watch = Some((generation.clone(), arrivals));
        }
        let listing = store.list(&format!("{prefix}{generation}/"))?;
        let mut segs: Vec<repo::wal::Segment> = repo::wal::segments(&prefix, &listing)
            .into_iter()
            .filter(|s| s.generation == generation && s.last > copy.seq)
            .collect();
        segs.sort_by_key(|s| s.first);
        let mut applied = 0;
        for s in &segs {
            if s.first > copy.seq + 1 {
                return Err(Error::Incomplete(format!(
                    "policy '{}' on target '{}': generation {generation} has a gap (frames {}..{} are missing), so the copy at {} stops at frame {}, a committed state of the source: restore again, or promote it as it is",
                    policy.name,
                    target.name,
                    copy.seq + 1,
                    s.first - 1,
                    opts.to.display(),
                    copy.seq
                )));
            }
            let object = format!("target '{}': {}", target.name, s.key);
            let raw = store.open(&s.key)?;
            let dec = Decoder::self_checked(raw, &object, unsealing.as_ref(), policy.encrypted)?;
            applied += copy.segment(
                std::io::BufReader::with_capacity(1 << 20, dec),
                &object,
                s.first,
                s.last,
            )?;
        }
        if applied > 0 {
            position(&generation, copy.seq).save(state_path);
            transactions += applied;
            quiet = 0;
            let lag = copy
                .last_commit
                .map(|c| (Utc::now() - c).num_milliseconds() as f64 / 1000.0);
            tracing::info!(policy = %policy.name, frame = copy.seq, transactions = applied, lag_seconds = lag.unwrap_or(0.0), "applied");
        } else {
            quiet += 1;
            if quiet.is_multiple_of(GENERATION_EVERY)
                && let Some(base) = newer_base(&repo, &generation)?
            {
                let chain = repo.chain(&base.label.parse().map_err(Error::NotFound)?)?;
                let scratch = ctx.state().tmp();
                std::fs::create_dir_all(&scratch)
                    .map_err(|e| Error::io(format!("cannot create {}", scratch.display()), e))?;
                let tmp = tempfile::Builder::new()
                    .prefix(&crate::scratch::prefix_for("follow."))
                    .tempfile_in(&scratch)
                    .map_err(|e| {
                        Error::io(
                            format!("cannot create a scratch file in {}", scratch.display()),
                            e,
                        )
                    })?;
                materialize(
                    &repo,
                    &chain,
                    unsealing.as_ref(),
                    tmp.as_file(),
                    tmp.path(),
                    &Silent,
                )?;
                crate::sqlite::integrity_check(tmp.path())?;
                copy.replace_all(tmp.path(), base.seq)?;
                tracing::info!(policy = %policy.name, from = %generation, generation = %base.generation, base = %base.label, "the source started a new generation: re-based on its base backup");
                generation = base.generation;
                position(&generation, copy.seq).save(state_path);
                rebased += 1;
                continue;
            }
        }
        let until = Instant::now() + opts.poll;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20).min(opts.poll));
            // A local target says when a segment lands: no waiting out the poll.
            if let Some((_, Some(a))) = watch.as_mut()
                && a.any()
            {
                break;
            }
        }
    }
    position(&generation, copy.seq).save(state_path);
    drop(pid);
    Ok(Followed {
        policy: policy.name.clone(),
        target: target.name.clone(),
        to: opts.to.clone(),
        generation,
        frame: copy.seq,
        transactions,
        rebased,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The newest base backup of a generation newer than `current`, if the
/// source started one.
fn newer_base(repo: &PolicyRepo<'_>, current: &str) -> Result<Option<repo::wal::Base>> {
    let prefix = repo::wal::wal_prefix(repo.policy);
    let newest = repo::wal::segments(&prefix, &repo.storage.list(&prefix)?)
        .into_iter()
        .map(|s| s.generation)
        .filter(|g| g.as_str() > current)
        .max();
    let Some(newest) = newest else {
        return Ok(None);
    };
    Ok(repo
        .committed()?
        .iter()
        .filter_map(|c| c.manifest.as_ref().ok())
        .filter_map(super::wal_base)
        .filter(|b| b.generation == newest)
        .max_by_key(|b| b.seq))
}

/// `state_dir/follow/<policy>.pid` while a follower runs: how `dr promote`
/// finds it. Removed when the follower ends, however it ends.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: PathBuf) -> Result<PidFile> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        }
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where a local target keeps a generation's segments (`None` for S3,
/// which is polled).
fn local_dir(target: &Target, prefix: &str, generation: &str) -> Option<PathBuf> {
    match &target.kind {
        crate::config::TargetKind::Local { path } => Some(path.join(prefix).join(generation)),
        crate::config::TargetKind::S3(_) => None,
    }
}

/// Segments landing in a local target's directory (inotify: a segment is
/// renamed into place whole), read without blocking.
struct Arrivals {
    ino: inotify::Inotify,
    buf: Vec<u8>,
}

impl Arrivals {
    /// `None` when the directory cannot be watched: the poll still runs.
    fn watch(dir: &std::path::Path) -> Option<Arrivals> {
        let ino = inotify::Inotify::init().ok()?;
        ino.watches()
            .add(
                dir,
                inotify::WatchMask::MOVED_TO | inotify::WatchMask::CLOSE_WRITE,
            )
            .ok()?;
        Some(Arrivals {
            ino,
            buf: vec![0u8; 4096],
        })
    }

    fn any(&mut self) -> bool {
        self.ino
            .read_events(&mut self.buf)
            .map(|mut e| e.next().is_some())
            .unwrap_or(false)
    }
}
