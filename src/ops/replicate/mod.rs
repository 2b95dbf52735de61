//! Continuous WAL streaming (`dr replicate`, and the daemon): one engine
//! drives every streamed database of a configuration, one or a thousand.
//!
//! Nothing runs per database while it is idle. A watcher (inotify on the
//! directories that hold the databases) says which `-wal` changed; a timer
//! heap says which stream has a segment to seal, an idle mark or heartbeat
//! to write, or a target to retry. Work goes to two small fixed pools:
//! capture (copying committed frames into the spool, `sqlite::stream`) and
//! I/O (shipping sealed segments to every target in order, taking the full
//! backup a new generation starts from). All S3 targets share the
//! context's one client and runtime.
//!
//! Fleet policies (a pattern for a path, `fleet.rs`) are rescanned when
//! their directory changes: a new database starts streaming, a removed one
//! stops; neither needs a restart. A stream that fails is restarted with a
//! backoff and reported (`/healthz`, `dr_wal_streamer_up`); under `dr
//! replicate`, a single-database policy that fails ends the command instead.
//!
//! The parts: `watcher` (inotify), `timers` (the heap), `pool` (the two
//! pools and their jobs), `reconcile` (which streams run), `capture`
//! (frames into the spool; opening and restarting a stream), `shipping`
//! (segments to the targets) and `bases` (a generation's base, the diffs).
//! This file holds the engine, its members and the dispatcher.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::members::{self, Scope};
use super::{PolicyRepo, TargetFilter};
use crate::config::{Policy, Source};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::lock::Lock;
use crate::progress::Silent;
use crate::repo::{self, wal as rwal};
use crate::sqlite::stream::{self, Next, Spool, Spooled, Stream, StreamReport, StreamState};
use crate::storage::Storage;

/// Longest wait between retries of a target that fails.
const MAX_SHIP_BACKOFF: Duration = Duration::from_secs(5);
/// A stream that fails is opened again after this, doubling to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A stream that ran this long without failing starts its backoff anew.
const STABLE: Duration = Duration::from_secs(60);
/// A failed base backup of a new generation is tried again after this.
const BASE_RETRY: Duration = Duration::from_secs(10);
/// Fleets are rescanned this often even when their directory is quiet (a
/// watcher can miss what happens on some filesystems).
const RESCAN: Duration = Duration::from_secs(60);
/// Every stream is looked at this often even without a change seen, in
/// case a change escaped the watcher.
const FALLBACK: Duration = Duration::from_secs(60);
/// The watcher reads events at most this often, so a busy writer's
/// thousands of writes a second cost a few wake-ups.
const WATCH_BATCH: Duration = Duration::from_millis(10);
/// Threads that copy committed frames; shipping has its own.
const CAPTURE_WORKERS: usize = 2;
const IO_WORKERS: usize = 4;

mod activity;
mod bases;
mod capture;
mod pool;
mod reconcile;
mod shipping;
mod timers;
mod watcher;

use activity::Activities;
use capture::Capture;
use pool::{Job, Pool};
use shipping::Shipping;
use timers::{Timer, TimerKind};
use watcher::Watcher;

/// One streamer as `/healthz` and `/metrics` see it.
#[derive(Debug, Clone)]
pub struct Status {
    /// Running now (it may still fail again soon after a restart).
    pub running: bool,
    /// When it last started or stopped.
    pub since: DateTime<Utc>,
    /// How often it stopped on an error and was restarted.
    pub restarts: u64,
    /// Why it last stopped, while it is down or has just been restarted.
    pub error: Option<String>,
    /// How long a restarted streamer must run before it counts as up again.
    pub grace: Duration,
}

impl Status {
    /// Up: running, and (after a failure) running for longer than its grace.
    pub fn up(&self, now: DateTime<Utc>) -> bool {
        self.running
            && (self.restarts == 0 || (now - self.since).to_std().unwrap_or_default() >= self.grace)
    }
}

/// Every stream's status, by (member) policy name.
pub type Statuses = Arc<Mutex<BTreeMap<String, Status>>>;

/// How failures are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `dr replicate`: a single-database policy that fails is done (and
    /// its error is the command's); fleet members are restarted.
    Command,
    /// The daemon: every stream that fails is restarted with a backoff.
    Supervised,
}

/// The streaming engine.
pub struct Engine {
    inner: Arc<Inner>,
    dispatcher: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Engine")
    }
}

impl Engine {
    /// Starts streaming `policies` (fleets expanded as their files come and go).
    pub fn start(ctx: &Context, policies: Vec<Policy>, mode: Mode, statuses: Statuses) -> Engine {
        let (events_tx, events_rx) = channel();
        let watcher = Watcher::start(events_tx.clone());
        if watcher.is_none() {
            tracing::warn!(
                "cannot watch the databases' directories (inotify): every stream is looked at every {} ms instead",
                (stream::POLL * 5).as_millis()
            );
        }
        let inner = Arc::new(Inner {
            ctx: Mutex::new(ctx.clone()),
            policies: Mutex::new(policies),
            members: Mutex::new(BTreeMap::new()),
            by_db: Mutex::new(HashMap::new()),
            capture: Pool::default(),
            io: Pool::default(),
            timers: Mutex::new(BinaryHeap::new()),
            timer_seq: AtomicU64::new(0),
            events: events_tx,
            statuses,
            mode,
            stop: AtomicBool::new(false),
            rescan: AtomicBool::new(true),
            results: Mutex::new(Vec::new()),
            watcher,
            activities: Arc::new(Activities::default()),
        });
        let mut workers = Vec::new();
        for _ in 0..CAPTURE_WORKERS {
            let inner = inner.clone();
            workers.push(std::thread::spawn(move || {
                while let Some(job) = inner.capture.next() {
                    inner.run(job);
                }
            }));
        }
        for _ in 0..IO_WORKERS {
            let inner = inner.clone();
            workers.push(std::thread::spawn(move || {
                while let Some(job) = inner.io.next() {
                    inner.run(job);
                }
            }));
        }
        let dispatcher = {
            let inner = inner.clone();
            Some(std::thread::spawn(move || inner.dispatch(&events_rx)))
        };
        Engine {
            inner,
            dispatcher,
            workers,
        }
    }

    /// Makes the streamed policies those of `ctx` (a reload): streams whose
    /// policy changed restart, removed ones stop, unchanged ones keep
    /// running (and keep their generation).
    pub fn apply(&self, ctx: &Context) {
        let wanted = streamed(ctx);
        if let Ok(mut c) = self.inner.ctx.lock() {
            *c = ctx.clone();
        }
        if let Ok(mut p) = self.inner.policies.lock() {
            *p = wanted;
        }
        self.inner.rescan.store(true, Ordering::SeqCst);
        let _ = self.inner.events.send(Event::Wake);
    }

    /// Whether the engine ended by itself (every stream done: `dr
    /// replicate` with nothing left to run).
    pub fn finished(&self) -> bool {
        self.dispatcher.as_ref().is_none_or(|d| d.is_finished())
    }

    /// Stops every stream (each seals what is committed and ships it) and
    /// returns what each did.
    pub fn stop(mut self) -> Vec<(String, Result<StreamReport>)> {
        self.inner.stop.store(true, Ordering::SeqCst);
        let _ = self.inner.events.send(Event::Wake);
        if let Some(d) = self.dispatcher.take() {
            let _ = d.join();
        }
        self.inner.capture.close();
        self.inner.io.close();
        for w in std::mem::take(&mut self.workers) {
            let _ = w.join();
        }
        let _ = std::fs::remove_file(self.inner.beat_path());
        std::mem::take(&mut *lock(&self.inner.results))
    }
}

/// The policies of `ctx`'s configuration that stream their WAL.
pub fn streamed(ctx: &Context) -> Vec<Policy> {
    ctx.cfg()
        .policies
        .iter()
        .filter(|p| p.wal.enabled)
        .cloned()
        .collect()
}

/// Streams `policies` until `stop` is set (or, under `dr replicate`,
/// until every stream has ended), then ships what is committed.
pub fn replicate(
    ctx: &Context,
    policies: &[&Policy],
    stop: &Arc<AtomicBool>,
) -> Vec<(String, Result<StreamReport>)> {
    let engine = Engine::start(
        ctx,
        policies.iter().map(|p| (*p).clone()).collect(),
        Mode::Command,
        Statuses::default(),
    );
    while !stop.load(Ordering::SeqCst) && !engine.finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    engine.stop()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the dispatcher hears.
enum Event {
    /// Something changed at this path (a database, its `-wal`, a new file).
    Path(PathBuf),
    /// The watcher lost events: look at everything.
    Overflow,
    /// Look at the configuration again, or stop.
    Wake,
    /// The watcher died: poll.
    Blind,
}

/// One streamed database.
struct Member {
    policy: Policy,
    db: PathBuf,
    /// `db` with its links resolved, where SQLite writes the `-wal` (the
    /// watcher maps events there back to the member too).
    real: PathBuf,
    /// What the stream was started with: a reload restarts it only when this changes.
    fingerprint: String,
    ctx: Context,
    spool: Spool,
    state_path: PathBuf,
    state: Arc<Mutex<StreamState>>,
    capture: Mutex<Capture>,
    shipping: Mutex<Option<Shipping>>,
    /// The generation whose base backups are still missing, and where.
    base: Mutex<Option<(String, Vec<String>)>>,
    /// A diff for `wal.diff_after` is queued or running.
    diffing: AtomicBool,
    /// No diff before then: the last one failed.
    diff_retry: Mutex<Option<Instant>>,
    report: Mutex<StreamReport>,
    result: Mutex<Option<Result<()>>>,
    /// A step is queued (no second one is queued meanwhile).
    queued: AtomicBool,
    ship_queued: AtomicBool,
    poll_pending: AtomicBool,
    last_step: Mutex<Instant>,
    due: Mutex<Option<Instant>>,
    /// The stream is to stop (engine stopping, member removed or changed).
    stopping: AtomicBool,
    /// Stopped and drained: nothing left to do.
    finished: AtomicBool,
    backoff: Mutex<Duration>,
}

struct Inner {
    ctx: Mutex<Context>,
    /// The streamed policies as configured (fleets unexpanded).
    policies: Mutex<Vec<Policy>>,
    members: Mutex<BTreeMap<String, Arc<Member>>>,
    by_db: Mutex<HashMap<PathBuf, String>>,
    capture: Pool,
    io: Pool,
    timers: Mutex<BinaryHeap<Reverse<Timer>>>,
    timer_seq: AtomicU64,
    events: Sender<Event>,
    statuses: Statuses,
    mode: Mode,
    stop: AtomicBool,
    rescan: AtomicBool,
    results: Mutex<Vec<(String, Result<StreamReport>)>>,
    watcher: Option<Watcher>,
    /// Each fleet's activity record, for its standbys.
    activities: Arc<Activities>,
}

impl Inner {
    fn beat_path(&self) -> PathBuf {
        lock(&self.ctx).state().stream_beat(std::process::id())
    }

    fn step(&self, m: &Arc<Member>) {
        if !m.queued.swap(true, Ordering::SeqCst) {
            self.capture.push(Job::Step(m.clone()));
        }
    }

    fn ship(&self, m: &Arc<Member>) {
        if !m.ship_queued.swap(true, Ordering::SeqCst) {
            self.io.push(Job::Ship(m.clone()));
        }
    }

    /// A change seen for `m`: look now, or as soon as [`stream::POLL`] allows.
    fn changed(&self, m: &Arc<Member>) {
        let next = *lock(&m.last_step) + stream::POLL;
        if Instant::now() >= next {
            self.step(m);
        } else if !m.poll_pending.swap(true, Ordering::SeqCst) {
            self.timer(next, TimerKind::Poll, &m.policy.name);
        }
    }

    fn member(&self, name: &str) -> Option<Arc<Member>> {
        lock(&self.members).get(name).cloned()
    }

    /// The dispatcher: events and timers in, jobs out, until stopped.
    fn dispatch(self: &Arc<Self>, events: &Receiver<Event>) {
        let mut last_beat = Instant::now() - stream::BEAT;
        let mut last_rescan = Instant::now();
        let mut last_fallback = Instant::now();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            if self.rescan.swap(false, Ordering::SeqCst) || last_rescan.elapsed() >= RESCAN {
                last_rescan = Instant::now();
                self.reconcile();
            }
            let blind = self
                .watcher
                .as_ref()
                .is_none_or(|w| w.degraded.load(Ordering::SeqCst));
            if blind && last_fallback.elapsed() >= stream::POLL * 5
                || last_fallback.elapsed() >= FALLBACK
            {
                last_fallback = Instant::now();
                for m in lock(&self.members).values() {
                    self.step(m);
                }
            }
            if last_beat.elapsed() >= stream::BEAT {
                last_beat = Instant::now();
                self.beat();
            }
            if self.mode == Mode::Command && self.all_done() {
                break;
            }
            let next_timer = lock(&self.timers).peek().map(|Reverse(t)| t.at);
            let wait = next_timer
                .map_or(stream::BEAT, |at| {
                    at.saturating_duration_since(Instant::now())
                })
                .min(stream::BEAT);
            match events.recv_timeout(wait) {
                Ok(ev) => {
                    self.on_event(ev);
                    while let Ok(ev) = events.try_recv() {
                        self.on_event(ev);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.fire_timers();
        }
        self.drain_all();
    }

    fn on_event(&self, ev: Event) {
        match ev {
            Event::Wake => {}
            Event::Blind => {
                if let Some(w) = &self.watcher {
                    w.degraded.store(true, Ordering::SeqCst);
                }
            }
            Event::Overflow => {
                self.rescan.store(true, Ordering::SeqCst);
                for m in lock(&self.members).values() {
                    self.step(m);
                }
            }
            Event::Path(p) => {
                let s = p.to_string_lossy();
                if s.ends_with("-shm") || s.ends_with("-journal") {
                    return;
                }
                let db = match s.strip_suffix("-wal") {
                    Some(d) => PathBuf::from(d),
                    None => p.clone(),
                };
                let (name, known) = {
                    let by_db = lock(&self.by_db);
                    (by_db.get(&db).cloned(), by_db.contains_key(&p))
                };
                // A database of a fleet removed or renamed away (stat only
                // for events on a database file itself, not on every WAL write).
                if known && !p.exists() {
                    self.rescan.store(true, Ordering::SeqCst);
                }
                match name.and_then(|n| self.member(&n)) {
                    Some(m) => self.changed(&m),
                    // A file that may be a new database of a fleet.
                    None => {
                        if lock(&self.policies).iter().any(|pol| {
                            pol.fleet.as_ref().is_some_and(|f| {
                                p.parent() == Some(f.dir.as_path())
                                    && p.file_name()
                                        .and_then(|n| n.to_str())
                                        .is_some_and(|n| f.name_of(n).is_some())
                            })
                        }) {
                            self.rescan.store(true, Ordering::SeqCst);
                        }
                    }
                }
            }
        }
    }

    /// Rewrites this process's beat file: the streams it runs are alive
    /// even while idle streams publish nothing.
    fn beat(&self) {
        let path = self.beat_path();
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&path, Utc::now().to_rfc3339())
        };
        if let Err(e) = write() {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }

    fn all_done(&self) -> bool {
        let members = lock(&self.members);
        let fleets = lock(&self.policies).iter().any(|p| p.fleet.is_some());
        !fleets && members.values().all(|m| m.finished.load(Ordering::SeqCst))
    }

    /// Keeps a stream's final result (for `dr replicate`'s report).
    fn record(&self, name: &str, r: Result<StreamReport>) {
        lock(&self.results).push((name.to_string(), r));
    }

    fn set_status(&self, name: &str, f: impl FnOnce(&mut Status)) {
        let mut s = lock(&self.statuses);
        let st = s.entry(name.to_string()).or_insert_with(|| Status {
            running: false,
            since: Utc::now(),
            restarts: 0,
            error: None,
            grace: Duration::ZERO,
        });
        f(st);
    }

    fn run(self: &Arc<Self>, job: Job) {
        match job {
            Job::Step(m) => {
                m.queued.store(false, Ordering::SeqCst);
                self.capture_step(&m);
            }
            Job::Ship(m) => {
                m.ship_queued.store(false, Ordering::SeqCst);
                if let Some(at) = self.ship_pass(&m, false).1 {
                    self.timer(at, TimerKind::Ship, &m.policy.name);
                }
            }
            Job::Base(m) => {
                if self.base_pass(&m) {
                    self.timer(Instant::now() + BASE_RETRY, TimerKind::Base, &m.policy.name);
                }
            }
            Job::Diff(m) => self.diff_pass(&m),
            Job::Drain(m) => self.drain(&m),
        }
    }
}

/// What a stream depends on: the policy, its targets, the keys and the
/// state directory.
///
/// Only what a stream uses counts: a reload that changes a schedule, or
/// adds the identity restores use, leaves running streams alone (a
/// restart would leave an instant nobody watched).
fn fingerprint(ctx: &Context, p: &Policy) -> String {
    let cfg = ctx.cfg();
    let targets: Vec<_> = p.targets.iter().map(|t| cfg.target(t).ok()).collect();
    let keys = crate::keys::KeySettings {
        identity_file: None,
        ..cfg.encryption.clone()
    };
    let used = Policy {
        schedule: crate::config::Schedule::default(),
        ..p.clone()
    };
    format!("{used:?}|{targets:?}|{keys:?}|{}", cfg.state_dir.display())
}
