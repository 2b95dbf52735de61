//! `dr follow`: a warm standby. Restores the newest state, then applies
//! each WAL segment as it is committed on the target, one source
//! transaction at a time (`sqlite::live`), until stopped. Applications may
//! read the copy meanwhile; a new generation on the source is followed by
//! re-basing on its base backup; a gap stops the copy at the last state it
//! holds, with an error (exit 7), never a silently shorter copy.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
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
    /// How often the target is asked while segments arrive.
    pub poll: Duration,
    /// The longest wait while the source is quiet: the wait doubles from
    /// `poll` up to this (a local target also wakes the follower when a
    /// segment lands).
    pub idle_poll: Duration,
    /// Run beside other followers in one process (the daemon's, a fleet's):
    /// `dr promote` stops it through the stop file, not a signal (which
    /// would stop them all).
    pub shared_process: bool,
    /// One of a fleet's many followers: its coordinator rings this when
    /// the fleet's activity record names the database, when `dr promote`
    /// asks for it and when the process stops. It makes no inotify
    /// instance (a per-user limit, 128 by default, shared with every other
    /// program of the user) and, while the coordinator reads the record,
    /// looks at the target on its own only every [`GOVERNED_LOOK`] when
    /// idle.
    pub bell: Option<std::sync::Arc<super::bell::Bell>>,
    /// A fleet's followers make their first copy through this, a few at a
    /// time.
    pub gate: Option<std::sync::Arc<super::bell::Gate>>,
    /// And look at the target through this, some at a time: a record
    /// that names every database (a primary's new epoch) must not send a
    /// thousand listings at once.
    pub looks: Option<std::sync::Arc<super::bell::Gate>>,
}

/// How often an idle follower of a fleet whose activity record is read
/// looks at the target on its own: in case a change escaped the record (a
/// write of it failed on the primary).
pub const GOVERNED_LOOK: Duration = Duration::from_secs(600);

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
    /// Stopped because `dr promote` asked: the copy is the primary now.
    pub released: bool,
}

/// What a follower knows after each look at the target: what `/metrics`,
/// `/healthz` and the verdict report of a daemon's follower.
#[derive(Debug, Clone)]
pub struct Pass {
    /// When the listing that the copy now holds everything of was asked.
    pub checked: DateTime<Utc>,
    /// The newest instant the copy is known to hold every commit of (the
    /// streamer's `until` of the segments applied, heartbeats included).
    pub source_until: Option<DateTime<Utc>>,
    /// Commit time of the newest transaction applied.
    pub last_commit: Option<DateTime<Utc>>,
    /// Transactions applied since the follower started.
    pub transactions: u64,
}

/// Follows `policy` from `target` into `opts.to` until `stop` (or until
/// `dr promote` asks); `report` hears every look at the target.
pub fn follow(
    ctx: &Context,
    policy: &Policy,
    target: &Target,
    opts: &FollowOptions,
    stop: &AtomicBool,
    report: &dyn Fn(&Pass),
) -> Result<Followed> {
    let started = Instant::now();
    let state_path = ctx.state().follow_pid(&policy.name).with_extension("json");
    // A follower restarted over its own copy continues where it stopped
    // (a standby's restart does not restore the whole database again).
    let (generation, frame) = match Position::load(&state_path) {
        Some(st)
            if !opts.force && st.to == opts.to && st.target == target.name && opts.to.is_file() =>
        {
            crate::sqlite::quick_check(&opts.to)?;
            tracing::info!(policy = %policy.name, to = %opts.to.display(), generation = %st.generation, frame = st.frame, "continuing the copy where it stopped");
            (st.generation, st.frame)
        }
        _ => {
            let _entered = opts.gate.as_ref().map(|g| g.enter());
            first_copy(ctx, policy, target, opts)?
        }
    };
    let mut f = Follower {
        ctx,
        policy,
        target,
        opts,
        state_path,
        generation,
        frame,
        transactions: 0,
        rebased: 0,
        source_until: None,
    };
    let released = f.run(stop, report)?;
    Ok(Followed {
        policy: policy.name.clone(),
        target: target.name.clone(),
        to: opts.to.clone(),
        generation: f.generation.clone(),
        frame: f.frame,
        transactions: f.transactions,
        rebased: f.rebased,
        seconds: started.elapsed().as_secs_f64(),
        released,
    })
}

/// Restores the newest state into `opts.to`: the generation and frame the
/// copy then stands at.
fn first_copy(
    ctx: &Context,
    policy: &Policy,
    target: &Target,
    opts: &FollowOptions,
) -> Result<(String, u64)> {
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
            check: super::proof::Check::Auto,
        },
        &Silent,
    )?;
    if let Some(w) = &first.wal {
        return Ok((w.generation.clone(), w.frame));
    }
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
    Ok((pos.generation, pos.frame))
}

/// How long after a seal a segment is taken to be on the target (upload
/// and listing): when a busy follower looks next.
const LANDING: Duration = Duration::from_millis(250);

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

/// One follower's loop and what it has done.
struct Follower<'a> {
    ctx: &'a Context,
    policy: &'a Policy,
    target: &'a Target,
    opts: &'a FollowOptions,
    state_path: PathBuf,
    generation: String,
    /// Every frame of the generation up to here is in the copy.
    frame: u64,
    transactions: u64,
    rebased: u64,
    source_until: Option<DateTime<Utc>>,
}

impl Follower<'_> {
    /// The copy stands at `frame`: said in memory and in the position file.
    fn save(&mut self, frame: u64) {
        self.frame = frame;
        Position {
            to: self.opts.to.clone(),
            target: self.target.name.clone(),
            generation: self.generation.clone(),
            frame,
        }
        .save(&self.state_path);
    }

    /// Follows from `self.frame` until `stop` or the stop file; `Ok(true)`
    /// when `dr promote` asked.
    fn run(&mut self, stop: &AtomicBool, report: &dyn Fn(&Pass)) -> Result<bool> {
        let frame = self.frame;
        let (ctx, policy, target, opts) = (self.ctx, self.policy, self.target, self.opts);
        let unsealing = ctx.unsealing(policy, opts.identity.as_deref())?;
        let store = ctx.storage(target)?;
        let repo = PolicyRepo {
            storage: store.as_ref(),
            policy: &policy.name,
        };
        let mut copy = LiveCopy::open(&opts.to, frame)?;
        let pidfile = ctx.state().follow_pid(&policy.name);
        let stop_file = pidfile.with_extension("stop");
        let pid = PidFile::write(pidfile, opts.shared_process)?;
        self.save(copy.seq);
        tracing::info!(policy = %policy.name, target = %target.name, to = %opts.to.display(), generation = %self.generation, frame, "following");
        let prefix = repo::wal::wal_prefix(&policy.name);
        // Each look asks only for what sorts after the newest segment the
        // copy holds: one request on S3, whatever the generation's length.
        let mut after = format!("{prefix}{}/", self.generation);
        let mut wait = opts.poll;
        // Watched before each listing, so that a segment landing while the
        // listing runs still ends the wait that follows.
        let mut arrivals = match opts.bell {
            None => Arrivals::new(&stop_file),
            Some(_) => None,
        };
        let released = loop {
            if stop.load(Ordering::Relaxed) {
                break false;
            }
            if stop_file.exists() {
                break true;
            }
            // A generation's directory appears with its first segment: until
            // then an ancestor is watched, and each look tries to add the
            // directory itself to the same watch.
            if let (Some(a), Some(d)) = (
                arrivals.as_mut(),
                local_dir(target, &prefix, &self.generation),
            ) {
                a.watch_generation(d);
            }
            let checked = Utc::now();
            let listing = {
                let _entered = opts.looks.as_ref().map(|g| g.enter());
                store.list_after(&prefix, &after)?
            };
            let all = repo::wal::segments(&prefix, &listing);
            let newer = all.iter().any(|s| s.generation > self.generation);
            let mut segs: Vec<&repo::wal::Segment> = all
                .iter()
                .filter(|s| s.generation == self.generation)
                .collect();
            segs.sort_by_key(|s| (s.first, s.last));
            let mut applied = 0;
            for s in segs {
                if s.last > copy.seq {
                    if s.first > copy.seq + 1 {
                        return Err(Error::Incomplete(format!(
                            "policy '{}' on target '{}': generation {} has a gap (frames {}..{} are missing), so the copy at {} stops at frame {}, a committed state of the source: restore again, or promote it as it is",
                            policy.name,
                            target.name,
                            self.generation,
                            copy.seq + 1,
                            s.first - 1,
                            opts.to.display(),
                            copy.seq
                        )));
                    }
                    let object = format!("target '{}': {}", target.name, s.key);
                    let raw = store.open(&s.key)?;
                    let dec = Decoder::self_checked_inline(
                        raw,
                        &object,
                        unsealing.as_ref(),
                        policy.encrypted,
                    )?;
                    applied += copy.segment(
                        std::io::BufReader::with_capacity(64 * 1024, dec),
                        &object,
                        s.first,
                        s.last,
                        policy.encrypted,
                    )?;
                }
                // Applied, or held already (a heartbeat, a blind mark).
                after = after.max(s.key.clone());
                self.source_until = self.source_until.max(Some(s.until));
            }
            if applied > 0 {
                self.save(copy.seq);
                self.transactions += applied;
                wait = self.next_look(opts.poll);
                let lag = copy
                    .last_commit
                    .map(|c| (Utc::now() - c).num_milliseconds() as f64 / 1000.0);
                tracing::debug!(policy = %policy.name, frame = copy.seq, transactions = applied, lag_seconds = lag.unwrap_or(0.0), "applied");
            } else if newer {
                if let Some(base) = newer_base(&repo, &self.generation)? {
                    self.rebase(&repo, unsealing.as_ref(), &mut copy, &base)?;
                    after = format!("{prefix}{}/", self.generation);
                    wait = opts.poll;
                    continue;
                }
                // The new generation's base is not committed yet.
                wait = opts.poll;
            } else if opts.bell.as_ref().is_some_and(|b| b.governed()) {
                // Rung when the activity record names the database.
                wait = GOVERNED_LOOK;
            } else {
                wait = (wait * 2).min(opts.idle_poll);
            }
            report(&Pass {
                checked,
                source_until: self.source_until,
                last_commit: copy.last_commit,
                transactions: self.transactions,
            });
            // Asleep until the wait is out, a segment lands on a local
            // target or `dr promote` asks (inotify), or a signal's stop is
            // seen (looked at every second; without inotify the stop file
            // is looked for as often).
            let until = Instant::now() + wait;
            while !stop.load(Ordering::Relaxed) {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match (opts.bell.as_ref(), arrivals.as_mut()) {
                    // The coordinator rings on a stop too.
                    (Some(b), _) => {
                        if b.wait(left) {
                            break;
                        }
                    }
                    (None, Some(a)) => {
                        if a.wait(left.min(Duration::from_secs(1))) {
                            break;
                        }
                    }
                    (None, None) => {
                        std::thread::sleep(left.min(Duration::from_millis(100)));
                        if stop_file.exists() {
                            break;
                        }
                    }
                }
            }
        };
        self.save(copy.seq);
        drop(pid);
        if released {
            tracing::info!(policy = %policy.name, to = %opts.to.display(), frame = copy.seq, "stopped following: `dr promote` made this copy the primary");
        }
        Ok(released)
    }

    /// While segments arrive, the next look: when the next one should have
    /// landed (the streamer seals every `sync_interval`, and the newest
    /// segment says when it was sealed), a little after, and never later
    /// than `poll`. A poll out of step with the seals waits half a poll on
    /// average for nothing.
    fn next_look(&self, poll: Duration) -> Duration {
        let Some(until) = self.source_until else {
            return poll;
        };
        let expected = until
            + chrono::Duration::from_std(self.policy.wal.sync_interval + LANDING)
                .unwrap_or_default();
        (expected - Utc::now())
            .to_std()
            .unwrap_or_default()
            .clamp(Duration::from_millis(50), poll)
    }

    /// The source started a new generation: the copy becomes its base.
    fn rebase(
        &mut self,
        repo: &PolicyRepo<'_>,
        unsealing: Option<&crate::keys::Unsealing>,
        copy: &mut LiveCopy,
        base: &repo::wal::Base,
    ) -> Result<()> {
        let ctx = self.ctx;
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
        let (_, written) =
            materialize(repo, &chain, unsealing, tmp.as_file(), tmp.path(), &Silent)?;
        super::proof::identity(repo, &chain, unsealing, &written, tmp.as_file())?;
        crate::sqlite::integrity_check(tmp.path())?;
        copy.replace_all(tmp.path(), base.seq)?;
        tracing::info!(policy = %self.policy.name, from = %self.generation, generation = %base.generation, base = %base.label, "the source started a new generation: re-based on its base backup");
        self.generation = base.generation.clone();
        self.source_until = None;
        self.save(copy.seq);
        self.rebased += 1;
        Ok(())
    }
}

/// The newest base backup of the newest generation that has one (the
/// caller saw segments of a generation newer than the copy's).
fn newer_base(repo: &PolicyRepo<'_>, current: &str) -> Result<Option<repo::wal::Base>> {
    Ok(repo
        .committed()?
        .iter()
        .filter_map(|c| c.manifest.as_ref().ok())
        .filter_map(super::wal_base)
        .filter(|b| b.generation.as_str() > current)
        .max_by(|a, b| (&a.generation, a.seq).cmp(&(&b.generation, b.seq))))
}

/// `state_dir/follow/<policy>.pid` while a follower runs: how `dr promote`
/// finds it. Removed when the follower ends, however it ends.
/// A follower in a shared process says so (`<pid> shared`): `dr promote`
/// then asks through the stop file only.
pub(super) struct PidFile(PathBuf);

impl PidFile {
    pub(super) fn write(path: PathBuf, shared: bool) -> Result<PidFile> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        }
        if let Some((other, _)) = follower_of(&path) {
            return Err(Error::Refused(format!(
                "another follower (pid {other}) keeps this copy already (its pid file: {}): stop it first; two would write the same file",
                path.display()
            )));
        }
        let who = if shared { " shared" } else { "" };
        std::fs::write(&path, format!("{}{who}\n", std::process::id()))
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        Ok(PidFile(path))
    }
}

/// The pid a follower's pid file names, with whether that process runs
/// other followers too, while it lives.
pub fn follower_of(pidfile: &std::path::Path) -> Option<(u32, bool)> {
    let text = std::fs::read_to_string(pidfile).ok()?;
    let mut words = text.split_whitespace();
    let pid: u32 = words.next()?.parse().ok()?;
    let shared = words.next() == Some("shared");
    let alive = pid != std::process::id() && std::path::Path::new(&format!("/proc/{pid}")).exists();
    alive.then_some((pid, shared))
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

/// What wakes a sleeping follower: a segment landing in a local target's
/// directory (a segment is renamed into place whole), and `dr promote`'s
/// stop file. A thread blocks on the inotify descriptor and says each
/// batch of events that matter on a channel, so the follower sleeps until
/// one comes instead of waking to look; dr's own temporary files (three
/// events per segment written) and the follower's position file wake
/// nobody.
struct Arrivals {
    rx: std::sync::mpsc::Receiver<()>,
    watches: inotify::Watches,
    /// The stop file's directory.
    stop_wd: inotify::WatchDescriptor,
    /// The generation's directory followed, once it is asked for.
    dir: Option<PathBuf>,
    /// The watches for [`Arrivals::dir`]: its own, and its parent's or,
    /// while that is missing too, the nearest ancestor's.
    generation: Vec<inotify::WatchDescriptor>,
    done: std::sync::Arc<AtomicBool>,
    /// The generation's own directory is watched (not only an ancestor).
    complete: bool,
}

impl Arrivals {
    /// What is watched in a generation's own directory.
    const ARRIVED: inotify::WatchMask =
        inotify::WatchMask::MOVED_TO.union(inotify::WatchMask::CLOSE_WRITE);

    /// Watches for `stop_file`; `None` when inotify cannot (the follower
    /// then looks for the stop file itself, and polls).
    fn new(stop_file: &std::path::Path) -> Option<Arrivals> {
        let mut ino = inotify::Inotify::init().ok()?;
        let watches = ino.watches();
        let stop_name = stop_file.file_name()?.to_os_string();
        let stop_wd = watches
            .clone()
            .add(
                stop_file.parent()?,
                inotify::WatchMask::CREATE | inotify::WatchMask::MOVED_TO,
            )
            .ok()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let stop_dir = stop_wd.clone();
        std::thread::Builder::new()
            .name("follow-inotify".into())
            .spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(events) = ino.read_events_blocking(&mut buf) else {
                        break;
                    };
                    let wake = events.into_iter().any(|e| match e.name {
                        Some(n) if e.wd == stop_dir => n == stop_name,
                        Some(n) => !crate::storage::local::is_temp(&n.to_string_lossy()),
                        None => e.wd != stop_dir,
                    });
                    if wake && tx.send(()).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Arrivals {
            rx,
            watches,
            stop_wd,
            dir: None,
            generation: Vec::new(),
            done,
            complete: false,
        })
    }

    /// Watches a generation's directory `dir` instead of the one before,
    /// and its parent (or, while that is missing too, the nearest
    /// ancestor) for `dir` or a newer generation's being created. Asked
    /// again for the same `dir`, adds `dir` itself once it exists.
    fn watch_generation(&mut self, dir: PathBuf) {
        if self.dir.as_ref() == Some(&dir) {
            if !self.complete
                && let Ok(wd) = self.watches.add(&dir, Self::ARRIVED)
            {
                self.generation.push(wd);
                self.complete = true;
            }
            return;
        }
        for wd in self.generation.drain(..) {
            let _ = self.watches.remove(wd);
        }
        let own = self.watches.add(&dir, Self::ARRIVED).ok();
        // The nearest directory that exists: a fresh generation's first
        // segment creates the policy's `wal/` too.
        let parent = dir
            .ancestors()
            .skip(1)
            .take(3)
            .find_map(|p| self.watches.add(p, inotify::WatchMask::CREATE).ok());
        self.complete = own.is_some();
        self.generation.extend(own.into_iter().chain(parent));
        self.dir = Some(dir);
    }

    /// Whether something arrived within `timeout`.
    fn wait(&mut self, timeout: Duration) -> bool {
        let got = self.rx.recv_timeout(timeout).is_ok();
        // One wake for a batch of events.
        while self.rx.try_recv().is_ok() {}
        got
    }
}

impl Drop for Arrivals {
    /// Removing the watches queues `IN_IGNORED`, which wakes the thread to
    /// see that it is done.
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        for wd in self.generation.drain(..) {
            let _ = self.watches.remove(wd);
        }
        let _ = self.watches.remove(self.stop_wd.clone());
    }
}
