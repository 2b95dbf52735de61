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

/// A job for a pool.
enum Job {
    Step(Arc<Member>),
    Ship(Arc<Member>),
    Base(Arc<Member>),
    /// The WAL since the newest backup passed `wal.diff_after`.
    Diff(Arc<Member>),
    /// Ship what is left after the stream stopped, then the member is done.
    Drain(Arc<Member>),
}

#[derive(Default)]
struct Pool {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    closed: AtomicBool,
}

impl Pool {
    fn push(&self, job: Job) {
        lock(&self.queue).push_back(job);
        self.ready.notify_one();
    }

    fn next(&self) -> Option<Job> {
        let mut q = lock(&self.queue);
        loop {
            if let Some(j) = q.pop_front() {
                return Some(j);
            }
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            q = self
                .ready
                .wait_timeout(q, Duration::from_secs(1))
                .map(|(q, _)| q)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.ready.notify_all();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// The stream's own next due time (only the newest one counts).
    Due,
    /// A change was seen within [`stream::POLL`] of the last look.
    Poll,
    Ship,
    Base,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Instant,
    seq: u64,
    kind: TimerKind,
    member: String,
}

/// Where a stream's capture stands.
enum Capture {
    /// Not opened yet, or to be opened again (`why`: a new generation's reason).
    Closed { first: bool, why: Option<String> },
    Running {
        stream: Box<Stream>,
        _lock: Lock,
        started: Instant,
    },
    /// Failed; opened again at `until`.
    Down { until: Instant },
    /// Stopped (or failed for good under `dr replicate`).
    Done,
}

/// Shipping state of one stream.
struct Shipping {
    stores: Vec<Arc<dyn Storage>>,
    retry_at: BTreeMap<String, (Instant, Duration)>,
    /// Targets whose promotion records could not be read yet (down when
    /// the stream started): checked before the first segment goes there.
    unfenced: std::collections::BTreeSet<String>,
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
}

impl Inner {
    fn beat_path(&self) -> PathBuf {
        lock(&self.ctx).state().stream_beat(std::process::id())
    }

    fn timer(&self, at: Instant, kind: TimerKind, member: &str) {
        let seq = self.timer_seq.fetch_add(1, Ordering::Relaxed);
        lock(&self.timers).push(Reverse(Timer {
            at,
            seq,
            kind,
            member: member.to_string(),
        }));
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

    fn fire_timers(&self) {
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut timers = lock(&self.timers);
            while timers.peek().is_some_and(|Reverse(t)| t.at <= now) {
                if let Some(Reverse(t)) = timers.pop() {
                    due.push(t);
                }
            }
        }
        for t in due {
            let Some(m) = self.member(&t.member) else {
                continue;
            };
            match t.kind {
                TimerKind::Due => {
                    if *lock(&m.due) == Some(t.at) {
                        self.step(&m);
                    }
                }
                TimerKind::Poll => {
                    m.poll_pending.store(false, Ordering::SeqCst);
                    self.step(&m);
                }
                TimerKind::Ship => self.ship(&m),
                TimerKind::Base => self.io.push(Job::Base(m.clone())),
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

    /// Makes the members those the policies stand for now: new databases
    /// start, removed or changed ones stop.
    fn reconcile(self: &Arc<Self>) {
        let ctx = lock(&self.ctx).clone();
        let policies = lock(&self.policies).clone();
        let mut wanted: BTreeMap<String, (Policy, String)> = BTreeMap::new();
        for p in &policies {
            let expanded = match members::expand(&ctx, p, Scope::OnDisk) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(policy = %p.name, "{e}");
                    continue;
                }
            };
            for m in expanded {
                let fp = fingerprint(&ctx, &m);
                wanted.insert(m.name.clone(), (m, fp));
            }
        }
        let current: Vec<Arc<Member>> = lock(&self.members).values().cloned().collect();
        for m in current {
            let keep = wanted
                .get(&m.policy.name)
                .is_some_and(|(_, fp)| *fp == m.fingerprint);
            if keep || m.stopping.load(Ordering::SeqCst) {
                continue;
            }
            if wanted.contains_key(&m.policy.name) {
                tracing::info!(policy = %m.policy.name, "restarting the WAL streamer: its policy changed");
            } else if m.policy.member.is_some() {
                tracing::info!(policy = %m.policy.name, "database left its fleet: it is no longer streamed (its backups stay)");
            }
            m.stopping.store(true, Ordering::SeqCst);
            self.step(&m);
        }
        // Members that finished stopping make room for their successors.
        {
            let mut members = lock(&self.members);
            let gone: Vec<String> = members
                .iter()
                .filter(|(_, m)| {
                    m.finished.load(Ordering::SeqCst) && m.stopping.load(Ordering::SeqCst)
                })
                .map(|(n, _)| n.clone())
                .collect();
            for n in gone {
                if let Some(m) = members.remove(&n) {
                    let mut by_db = lock(&self.by_db);
                    by_db.remove(&m.db);
                    by_db.remove(&m.real);
                    drop(by_db);
                    lock(&self.statuses).remove(&n);
                }
            }
        }
        for (name, (policy, fp)) in wanted {
            if lock(&self.members).contains_key(&name) {
                continue;
            }
            let Source::Sqlite { path: db } = &policy.source else {
                let why = format!(
                    "policy '{}' is PostgreSQL: its WAL is archived by PostgreSQL through pgBackRest (`dr pg setup`), not streamed by dr",
                    policy.name
                );
                self.record(&name, Err(Error::Refused(why)));
                continue;
            };
            let db = db.clone();
            // A database given through a link has its `-wal` beside the
            // file the link points to: both directories are watched.
            let real = crate::sqlite::pin::real_path(&db);
            if let Some(w) = &self.watcher {
                for dir in [db.parent(), real.parent()].into_iter().flatten() {
                    w.watch(dir);
                }
            }
            let m = Arc::new(Member {
                spool: Spool {
                    dir: ctx.state().spool(&policy.name),
                },
                state_path: ctx.state().stream_state(&policy.name),
                state: Arc::new(Mutex::new(
                    StreamState::load(&ctx.state().stream_state(&policy.name)).unwrap_or_default(),
                )),
                report: Mutex::new(StreamReport {
                    policy: policy.name.clone(),
                    generation: String::new(),
                    generations_started: 0,
                    segments: 0,
                    frames: 0,
                    unshipped: 0,
                }),
                db: db.clone(),
                real: real.clone(),
                fingerprint: fp,
                ctx: ctx.clone(),
                capture: Mutex::new(Capture::Closed {
                    first: true,
                    why: None,
                }),
                shipping: Mutex::new(None),
                base: Mutex::new(None),
                diffing: AtomicBool::new(false),
                diff_retry: Mutex::new(None),
                result: Mutex::new(None),
                queued: AtomicBool::new(false),
                ship_queued: AtomicBool::new(false),
                poll_pending: AtomicBool::new(false),
                last_step: Mutex::new(Instant::now() - stream::POLL),
                due: Mutex::new(None),
                stopping: AtomicBool::new(false),
                finished: AtomicBool::new(false),
                backoff: Mutex::new(FIRST_BACKOFF),
                policy,
            });
            if m.policy.member.is_some() {
                tracing::info!(policy = %name, db = %db.display(), "streaming a database of the fleet");
            }
            {
                let mut by_db = lock(&self.by_db);
                by_db.insert(real, name.clone());
                by_db.insert(db, name.clone());
            }
            lock(&self.members).insert(name, m.clone());
            self.step(&m);
        }
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

    /// One step of a stream's capture, through its states.
    fn capture_step(self: &Arc<Self>, m: &Arc<Member>) {
        let mut cap = lock(&m.capture);
        *lock(&m.last_step) = Instant::now();
        let stopping = m.stopping.load(Ordering::SeqCst);
        let name = m.policy.name.clone();
        loop {
            match &mut *cap {
                Capture::Done => return,
                Capture::Closed { .. } | Capture::Down { .. } if stopping => {
                    *cap = Capture::Done;
                    self.io.push(Job::Drain(m.clone()));
                    return;
                }
                Capture::Down { until, .. } if Instant::now() < *until => {
                    let at = *until;
                    *lock(&m.due) = Some(at);
                    self.timer(at, TimerKind::Due, &name);
                    return;
                }
                Capture::Down { .. } => {
                    *cap = Capture::Closed {
                        first: true,
                        why: None,
                    };
                }
                Capture::Closed { first, why } => {
                    let (first, why) = (*first, why.take());
                    match self.open(m, first, why) {
                        Ok((stream, lock_, next)) => {
                            *cap = Capture::Running {
                                stream: Box::new(stream),
                                _lock: lock_,
                                started: Instant::now(),
                            };
                            let grace = m.policy.wal.sync_interval * 2 + Duration::from_secs(1);
                            // Streaming again: an earlier failure of a
                            // fleet's database no longer fails `dr replicate`.
                            if self.mode == Mode::Command && m.policy.member.is_some() {
                                lock(&m.result).take();
                            }
                            self.set_status(&name, |s| {
                                s.running = true;
                                s.since = Utc::now();
                                s.grace = grace;
                            });
                            if let Some(Next::Restart(why)) = next {
                                self.restart(m, &mut cap, why);
                                continue;
                            }
                        }
                        Err(e) => {
                            *cap = self.failed(m, e, None);
                            continue;
                        }
                    }
                }
                Capture::Running {
                    stream, started, ..
                } => {
                    // A key file that changed is seen within a second; one
                    // that cannot be used is the context's error to report,
                    // and the stream keeps the keys it has.
                    if !stopping
                        && stream.keys_due()
                        && let Ok(s) = m.ctx.sealing(&m.policy)
                    {
                        stream.offer_keys(s);
                    }
                    let r = if stopping {
                        stream.stop()
                    } else {
                        stream.step()
                    };
                    let sealed = stream.take_sealed();
                    if let Some(g) = stream.take_wants_base() {
                        *lock(&m.base) = Some((g, m.policy.targets.clone()));
                        self.io.push(Job::Base(m.clone()));
                    }
                    if sealed && self.diff_due(m, stream) {
                        self.io.push(Job::Diff(m.clone()));
                    }
                    *lock(&m.report) = stream.report().clone();
                    let due = stream.next_due();
                    let started = *started;
                    if sealed {
                        self.ship(m);
                    }
                    match r {
                        Ok(None) => {
                            // One timer per due time: an idle stream looked at
                            // again keeps the one it has.
                            let new = lock(&m.due).replace(due) != Some(due);
                            if new {
                                self.timer(due, TimerKind::Due, &name);
                            }
                            if started.elapsed() >= STABLE {
                                *lock(&m.backoff) = FIRST_BACKOFF;
                            }
                            return;
                        }
                        Ok(Some(Next::Stop)) => {
                            *cap = Capture::Done;
                            self.set_status(&name, |s| s.running = false);
                            self.io.push(Job::Drain(m.clone()));
                            return;
                        }
                        Ok(Some(Next::Restart(why))) => {
                            self.restart(m, &mut cap, why);
                            if stopping {
                                *cap = Capture::Done;
                                self.io.push(Job::Drain(m.clone()));
                                return;
                            }
                        }
                        Err(e) => {
                            *cap = self.failed(m, e, Some(started));
                            if matches!(*cap, Capture::Done) {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Continuity was lost: the stream is pinned again, in a new generation.
    fn restart(&self, m: &Member, cap: &mut Capture, why: String) {
        tracing::warn!(policy = %m.policy.name, "{why}: starting a new generation");
        *cap = Capture::Closed {
            first: false,
            why: Some(why),
        };
    }

    /// A stream failed: say so, mark its state stopped (its lag grows), and
    /// open it again later, or (a single-database policy under `dr
    /// replicate`, or a database gone from its fleet) end it.
    fn failed(&self, m: &Arc<Member>, e: Error, started: Option<Instant>) -> Capture {
        let name = &m.policy.name;
        {
            let mut st = lock(&m.state);
            st.stopped = Some(Utc::now());
            let _ = st.save(&m.state_path);
        }
        let gone = m.policy.member.is_some() && !m.db.exists();
        if gone {
            tracing::info!(policy = %name, "database removed from its fleet: streaming it stopped (its backups stay)");
            self.rescan.store(true, Ordering::SeqCst);
            m.stopping.store(true, Ordering::SeqCst);
        }
        if gone || (self.mode == Mode::Command && m.policy.member.is_none()) {
            if !gone {
                tracing::error!(policy = %name, "WAL streamer stopped: {e}");
                *lock(&m.result) = Some(Err(e));
            }
            self.set_status(name, |s| s.running = false);
            self.io.push(Job::Drain(m.clone()));
            return Capture::Done;
        }
        let mut backoff = lock(&m.backoff);
        if started.is_some_and(|s| s.elapsed() >= STABLE) {
            *backoff = FIRST_BACKOFF;
        }
        let wait = *backoff;
        let why = e.to_string();
        // A fleet's database that fails keeps being retried (the others
        // stream on), and `dr replicate` exits non-zero for it unless it
        // came back: a database that cannot be streamed is never an "ok".
        if self.mode == Mode::Command {
            *lock(&m.result) = Some(Err(e));
        }
        let mut restarts = 0;
        self.set_status(name, |s| {
            s.running = false;
            s.since = Utc::now();
            s.restarts += 1;
            s.error = Some(why.clone());
            restarts = s.restarts;
        });
        tracing::error!(policy = %name, restarts, "WAL streamer stopped: {why}; restarting in {}", humantime::format_duration(wait));
        *backoff = (wait * 2).min(MAX_BACKOFF);
        Capture::Down {
            until: Instant::now() + wait,
        }
    }

    /// Opens a stream: its lock, keys, targets and spool, then the
    /// database pinned.
    fn open(
        &self,
        m: &Member,
        first: bool,
        why: Option<String>,
    ) -> Result<(Stream, Lock, Option<Next>)> {
        let ctx = &m.ctx;
        let policy = &m.policy;
        let lock_ = Lock::acquire(
            &ctx.state().locks(),
            &policy.name,
            "wal-stream",
            "replicate",
            Duration::ZERO,
        )?;
        let sealing = ctx.sealing(policy)?;
        {
            let mut shipping = lock(&m.shipping);
            if shipping.is_none() {
                let stores = TargetFilter::All
                    .select(ctx.cfg(), policy)?
                    .into_iter()
                    .map(|t| ctx.storage(t))
                    .collect::<Result<Vec<_>>>()?;
                let unfenced = stores.iter().map(|s| s.target().to_string()).collect();
                *shipping = Some(Shipping {
                    stores,
                    retry_at: BTreeMap::new(),
                    unfenced,
                });
            }
            // Every (re)start of the stream: a host another was promoted
            // over streams nothing (the promotion record is the fence). A
            // target that cannot be read now does not stop the stream (the
            // spool is for that); it is checked before its first segment.
            if let Some(sh) = shipping.as_mut() {
                for store in &sh.stores {
                    match super::promotion::fence(ctx, policy, store.as_ref()) {
                        Ok(()) => {
                            sh.unfenced.remove(store.target());
                        }
                        Err(e @ Error::Refused(_)) => return Err(e),
                        Err(e) => {
                            tracing::warn!(policy = %policy.name, target = %store.target(), "cannot read the promotion records yet ({e}): checked again before the first segment is shipped there")
                        }
                    }
                }
            }
        }
        std::fs::create_dir_all(&m.spool.dir).map_err(|e| {
            Error::io(
                format!("cannot create the spool {}", m.spool.dir.display()),
                e,
            )
        })?;
        if first {
            m.spool.tidy();
        }
        let prev = first.then(|| lock(&m.state).clone());
        let report = lock(&m.report).clone();
        let (stream, next) = Stream::open(
            policy,
            &m.db,
            sealing,
            m.spool.clone(),
            &m.state_path,
            &m.state,
            prev.as_ref(),
            why,
            report,
        )?;
        Ok((stream, lock_, next))
    }

    /// One shipping pass: every sealed segment to every target, in order.
    /// Returns how many segments are left, and when to retry a target
    /// that failed (unless `drain`, which tries every target now).
    fn ship_pass(&self, m: &Member, drain: bool) -> (u64, Option<Instant>) {
        let mut guard = lock(&m.shipping);
        let Some(sh) = guard.as_mut() else {
            return (m.spool.list().len() as u64, None);
        };
        let policy = &m.policy;
        let segs = m.spool.list();
        let mut retry: Option<Instant> = None;
        for store in &sh.stores {
            let t = store.target().to_string();
            if let Some((at, _)) = sh.retry_at.get(&t)
                && !drain
                && Instant::now() < *at
            {
                retry = Some(retry.map_or(*at, |r| r.min(*at)));
                continue;
            }
            let mut cur = lock(&m.state).targets.get(&t).cloned().unwrap_or_default();
            let mut pending: Vec<&Spooled> = segs.iter().filter(|s| !s.shipped_to(&cur)).collect();
            if !pending.is_empty() && sh.unfenced.contains(&t) {
                match super::promotion::fence(&m.ctx, policy, store.as_ref()) {
                    Ok(()) => {
                        sh.unfenced.remove(&t);
                    }
                    Err(e @ Error::Refused(_)) => {
                        // Fenced: nothing goes there; the error shows in the
                        // stream's state and status.
                        tracing::error!(policy = %policy.name, target = %t, "{e}");
                        cur.error = Some(e.to_string());
                        pending.clear();
                        let at = Instant::now() + MAX_SHIP_BACKOFF;
                        sh.retry_at.insert(t.clone(), (at, MAX_SHIP_BACKOFF));
                        retry = Some(retry.map_or(at, |r| r.min(at)));
                    }
                    // Still unreadable: the segments go as before (a flaky
                    // listing must not hold the WAL back); the records are
                    // read again on the next pass.
                    Err(e) => {
                        tracing::debug!(policy = %policy.name, target = %t, "promotion records not read yet: {e}");
                    }
                }
            }
            let put = |path: &Path, key: &str| {
                File::open(path)
                    .map_err(|e| Error::io(format!("cannot read spooled {}", path.display()), e))
                    .and_then(|mut f| {
                        let mut w = store.create(key)?;
                        std::io::copy(&mut f, &mut w).map_err(|e| store.err("write", key, &e))?;
                        w.commit()
                    })
            };
            for s in pending {
                let key = rwal::segment_key(&policy.name, &s.generation, &s.name);
                // The keys record first: no segment is stored without it.
                let sent = match &s.keys {
                    Some(record) => put(
                        record,
                        &rwal::keys_record_key(&policy.name, &s.generation, &s.name),
                    ),
                    None => Ok(()),
                }
                .and_then(|()| put(&s.path, &key));
                match sent {
                    Ok(()) => {
                        cur.generation = s.generation.clone();
                        cur.name = s.name.clone();
                        cur.seq = s.last;
                        cur.until = Some(s.until);
                        cur.error = None;
                        if sh.retry_at.remove(&t).is_some() {
                            tracing::info!(policy = %policy.name, target = %t, "target takes WAL segments again; catching up");
                        }
                    }
                    Err(e) => {
                        let backoff = sh
                            .retry_at
                            .get(&t)
                            .map_or(Duration::from_millis(500), |(_, b)| {
                                (*b * 2).min(MAX_SHIP_BACKOFF)
                            });
                        tracing::error!(policy = %policy.name, target = %t, "cannot ship WAL segment {key}: {e} (retrying in {:?}; segments wait in the spool)", backoff);
                        cur.error = Some(e.to_string());
                        let at = Instant::now() + backoff;
                        sh.retry_at.insert(t.clone(), (at, backoff));
                        retry = Some(retry.map_or(at, |r| r.min(at)));
                        break;
                    }
                }
            }
            cur.pending_since = segs
                .iter()
                .find(|s| !s.shipped_to(&cur) && s.last >= s.first)
                .map(|s| s.first_commit);
            let mut st = lock(&m.state);
            st.targets.insert(t.clone(), cur);
            if let Err(e) = st.save_relaxed(&m.state_path) {
                tracing::error!(policy = %policy.name, "{e}");
            }
        }
        // A segment every target has is done with.
        let done: Vec<&Spooled> = {
            let st = lock(&m.state);
            segs.iter()
                .filter(|s| {
                    sh.stores.iter().all(|store| {
                        st.targets
                            .get(store.target())
                            .is_some_and(|c| s.shipped_to(c))
                    })
                })
                .collect()
        };
        for s in &done {
            if let Some(record) = &s.keys {
                let _ = std::fs::remove_file(record);
            }
            let _ = std::fs::remove_file(&s.path);
        }
        if !done.is_empty() {
            // What is left, for `dr info` and /metrics: an idle stream
            // publishes nothing itself.
            let left: u64 =
                segs.iter().map(|s| s.size).sum::<u64>() - done.iter().map(|s| s.size).sum::<u64>();
            let mut st = lock(&m.state);
            st.spool_bytes = left;
            st.spool_full = left >= policy.wal.spool_max;
            if let Err(e) = st.save_relaxed(&m.state_path) {
                tracing::error!(policy = %policy.name, "{e}");
            }
        }
        ((segs.len() - done.len()) as u64, retry)
    }

    /// After the stream stopped: ship what is left, giving a failing target
    /// a few retries, then leave its segments in the spool for the next run.
    fn drain(&self, m: &Member) {
        let unshipped = loop {
            let (left, _) = self.ship_pass(m, true);
            let spent = lock(&m.shipping)
                .as_ref()
                .is_none_or(|s| s.retry_at.values().any(|(_, b)| *b >= MAX_SHIP_BACKOFF));
            if left == 0 || spent {
                break left;
            }
            let wait = lock(&m.shipping)
                .as_ref()
                .and_then(|s| s.retry_at.values().map(|(_, b)| *b).max())
                .unwrap_or(Duration::from_millis(200));
            std::thread::sleep(wait.min(MAX_SHIP_BACKOFF));
        };
        {
            let mut st = lock(&m.state);
            st.stopped = Some(Utc::now());
            if let Err(e) = st.save(&m.state_path) {
                tracing::error!(policy = %m.policy.name, "{e}");
            }
        }
        let mut report = lock(&m.report).clone();
        report.unshipped = unshipped;
        let result = match lock(&m.result).take() {
            Some(Err(e)) => Err(e),
            _ => Ok(report),
        };
        if unshipped > 0 && self.mode == Mode::Supervised {
            tracing::error!(policy = %m.policy.name, "{unshipped} WAL segment(s) could not be shipped and stay in the spool; they ship when the streamer runs again");
        }
        self.record(&m.policy.name, result);
        m.finished.store(true, Ordering::SeqCst);
        // Its successor (a changed policy) can start now.
        self.rescan.store(true, Ordering::SeqCst);
        let _ = self.events.send(Event::Wake);
    }

    /// Takes the full backup a new generation starts from on every target
    /// that lacks one. Returns whether a target still lacks it.
    fn base_pass(&self, m: &Member) -> bool {
        let Some((generation, missing)) = lock(&m.base).clone() else {
            return false;
        };
        if m.stopping.load(Ordering::SeqCst) {
            return false;
        }
        let mut still = Vec::new();
        for t in &missing {
            if let Err(e) = base_one(&m.ctx, &m.policy, &m.db, &m.state, t, &generation) {
                tracing::error!(policy = %m.policy.name, target = %t, generation = %generation, "full backup for the new generation failed: {e} (retrying in {} s)", BASE_RETRY.as_secs());
                still.push(t.clone());
            }
        }
        let mut base = lock(&m.base);
        // A newer generation asked meanwhile: that one is what counts now.
        if base.as_ref().is_some_and(|(g, _)| *g == generation) {
            *base = (!still.is_empty()).then(|| (generation, still.clone()));
        }
        !still.is_empty()
    }

    /// Whether the WAL read since the newest backup passed the policy's
    /// `wal.diff_after`: then a diff bounds what a point-in-time restore
    /// replays. Marks the diff as queued when it is due.
    fn diff_due(&self, m: &Member, stream: &Stream) -> bool {
        if m.diffing.load(Ordering::SeqCst)
            || m.stopping.load(Ordering::SeqCst)
            || lock(&m.base).is_some()
            || lock(&m.diff_retry).is_some_and(|t| Instant::now() < t)
        {
            return false;
        }
        let Some((generation, seq, page_size)) = stream.position() else {
            return false;
        };
        let based = {
            let mut st = lock(&m.state);
            match &st.based {
                Some((g, s)) if g == generation => *s,
                // A generation just started (its base is being taken) or
                // one from before dr kept this: count from here.
                _ => {
                    st.based = Some((generation.to_string(), seq));
                    return false;
                }
            }
        };
        let wal = seq.saturating_sub(based) * u64::from(page_size);
        let db_size = std::fs::metadata(&m.db).map_or(0, |md| md.len());
        let due = m
            .policy
            .wal
            .diff_after
            .threshold(db_size)
            .is_some_and(|t| wal >= t);
        if due {
            m.diffing.store(true, Ordering::SeqCst);
        }
        due
    }

    /// Takes the diff [`Self::diff_due`] asked for on every target. The
    /// stream goes on meanwhile; once every target has it, the WAL before
    /// it no longer counts.
    fn diff_pass(&self, m: &Member) {
        let from = {
            let st = lock(&m.state);
            (st.generation.clone(), st.seq_base + st.frame)
        };
        let mut failed = false;
        for t in &m.policy.targets {
            if m.stopping.load(Ordering::SeqCst) {
                failed = true;
                break;
            }
            match streamer_backup(
                &m.ctx,
                &m.policy,
                &m.db,
                &m.state,
                t,
                repo::BackupType::Diff,
                "wal",
            ) {
                Ok(label) => {
                    tracing::info!(policy = %m.policy.name, target = %t, %label, "the WAL since the newest backup passed wal.diff_after: diff committed (point-in-time restores replay from it)")
                }
                Err(e) => {
                    tracing::error!(policy = %m.policy.name, target = %t, "the diff for wal.diff_after failed: {e} (retrying in {} s)", BASE_RETRY.as_secs());
                    failed = true;
                }
            }
        }
        if failed {
            *lock(&m.diff_retry) = Some(Instant::now() + BASE_RETRY);
        } else {
            lock(&m.state).based = Some(from);
        }
        m.diffing.store(false, Ordering::SeqCst);
    }

    /// Stops every member and waits until each has shipped what it could.
    fn drain_all(&self) {
        let members: Vec<Arc<Member>> = lock(&self.members).values().cloned().collect();
        for m in &members {
            m.stopping.store(true, Ordering::SeqCst);
            self.step(m);
        }
        while !members.iter().all(|m| m.finished.load(Ordering::SeqCst)) {
            std::thread::sleep(Duration::from_millis(20));
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

/// A full backup of `generation` to one target, unless it has one. Its WAL
/// position comes from the streamer's state in memory.
fn base_one(
    ctx: &Context,
    policy: &Policy,
    db: &Path,
    state: &Mutex<StreamState>,
    target: &str,
    generation: &str,
) -> Result<()> {
    let t = ctx.cfg().target(target)?;
    let store = ctx.storage(t)?;
    let repo = PolicyRepo {
        storage: store.as_ref(),
        policy: &policy.name,
    };
    let has = repo.committed()?.into_iter().any(|c| {
        c.manifest
            .as_ref()
            .is_ok_and(|m| m.wal.as_ref().is_some_and(|w| w.generation == generation))
    });
    if has {
        return Ok(());
    }
    // The WAL can restart (new salts) between the stream's start and the
    // snapshot's pin, as an application opens the database: the backup is
    // then committed without a position in this generation, and is no base
    // of it. Taken again once the stream has seen the restart (it does
    // within a capture step), up to three attempts in all, before the
    // pass's own retry.
    let mut attempt = 0;
    let label = loop {
        attempt += 1;
        let label = match streamer_backup(
            ctx,
            policy,
            db,
            state,
            target,
            repo::BackupType::Full,
            "generation",
        ) {
            Ok(label) => label,
            // Taking it again after a backup without a position: a failure
            // now (a network error) is tried again as soon, not in the
            // pass's 10 s, while the attempts last.
            Err(e) if attempt > 1 && attempt < 3 => {
                tracing::warn!(policy = %policy.name, target = %target, "{e}: taking it again");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            Err(e) => return Err(e),
        };
        let based = repo.committed()?.into_iter().any(|c| {
            c.dir.label.to_string() == label
                && c.manifest
                    .as_ref()
                    .is_ok_and(|m| m.wal.as_ref().is_some_and(|w| w.generation == generation))
        });
        if based {
            break label;
        }
        let why = format!(
            "backup {label} was committed without a position in generation {generation} (the WAL restarted while it was taken), so it is no base of it"
        );
        if attempt == 3 {
            return Err(Error::Other(why));
        }
        tracing::warn!(policy = %policy.name, target = %target, "{why}: taking it again");
        std::thread::sleep(Duration::from_millis(500));
    };
    tracing::info!(policy = %policy.name, target = %target, %label, generation, "generation base committed");
    Ok(())
}

/// A backup the streamer takes on its own (`trigger` says why), under the
/// policy's backup lock, its WAL position from the state in memory.
fn streamer_backup(
    ctx: &Context,
    policy: &Policy,
    db: &Path,
    state: &Mutex<StreamState>,
    target: &str,
    kind: repo::BackupType,
    trigger: &'static str,
) -> Result<String> {
    let t = ctx.cfg().target(target)?;
    let _lock = super::source::lock(ctx, policy, t, "backup", Duration::from_secs(600))?;
    crate::audit::writable()?;
    let started = chrono::Utc::now();
    let r = super::backup::backup(
        ctx,
        policy,
        db,
        t,
        Some(kind),
        &Silent,
        Some(super::backup::ByStreamer { state, trigger }),
    );
    // And recorded in the run history as any other: a policy's base
    // backup is a restore point the verdict counts from the moment it is
    // committed, not only once WAL after it has been shipped.
    record_run(ctx, policy, target, kind, started, &r);
    // The streamer's own backups are audited as any other, with why.
    let r = super::source::audit(
        policy,
        t,
        "backup",
        r,
        |b| vec![b.label.clone()],
        Some(format!("by the WAL streamer ({trigger})")),
    )?;
    Ok(r.label)
}

/// Records a streamer backup in the history; a history that cannot be
/// written is logged, the backup stands.
fn record_run(
    ctx: &Context,
    policy: &Policy,
    target: &str,
    kind: repo::BackupType,
    started: chrono::DateTime<chrono::Utc>,
    r: &Result<super::report::BackupReport>,
) {
    let run = crate::history::Run::ended(
        &policy.name,
        target,
        kind.word(),
        started,
        r.as_ref()
            .map(|b| (b.label.as_str(), b.stored_size))
            .map_err(ToString::to_string),
    );
    if let Err(e) = crate::history::History::open(ctx.state().root()).and_then(|h| h.record(&run)) {
        tracing::warn!(policy = %policy.name, target, "the streamer's backup is not in the run history: {e}");
    }
}

/// inotify on the directories that hold streamed databases: one watch per
/// directory, however many databases it holds.
struct Watcher {
    watches: Mutex<inotify::Watches>,
    dirs: Arc<Mutex<HashMap<inotify::WatchDescriptor, PathBuf>>>,
    watched: Mutex<HashMap<PathBuf, inotify::WatchDescriptor>>,
    /// A directory could not be watched: every stream is polled instead.
    degraded: AtomicBool,
}

impl Watcher {
    fn start(events: Sender<Event>) -> Option<Watcher> {
        let mut ino = inotify::Inotify::init().ok()?;
        let watches = ino.watches();
        let dirs: Arc<Mutex<HashMap<inotify::WatchDescriptor, PathBuf>>> = Arc::default();
        let seen = dirs.clone();
        std::thread::Builder::new()
            .name("dr-watch".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let evs = match ino.read_events_blocking(&mut buf) {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::error!(
                                "watching the databases failed: {e}; polling every stream instead"
                            );
                            let _ = events.send(Event::Blind);
                            return;
                        }
                    };
                    // One event per file per batch: a busy writer modifies
                    // its WAL thousands of times a second.
                    let mut paths = std::collections::BTreeSet::new();
                    let mut overflow = false;
                    for ev in evs {
                        if ev.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                            overflow = true;
                        } else if let (Some(d), Some(n)) =
                            (lock(&seen).get(&ev.wd).cloned(), ev.name)
                        {
                            paths.insert(d.join(n));
                        }
                    }
                    let mut sent = if overflow {
                        events.send(Event::Overflow)
                    } else {
                        Ok(())
                    };
                    for p in paths {
                        sent = sent.and_then(|()| events.send(Event::Path(p)));
                    }
                    if sent.is_err() {
                        return; // the engine is gone
                    }
                    // Let the kernel merge repeated events meanwhile: a change
                    // is still seen well within stream::POLL.
                    std::thread::sleep(WATCH_BATCH);
                }
            })
            .ok()?;
        Some(Watcher {
            watches: Mutex::new(watches),
            dirs,
            watched: Mutex::new(HashMap::new()),
            degraded: AtomicBool::new(false),
        })
    }

    fn watch(&self, dir: &Path) {
        let mut watched = lock(&self.watched);
        if watched.contains_key(dir) {
            return;
        }
        use inotify::WatchMask as W;
        let mask = W::MODIFY | W::CREATE | W::DELETE | W::MOVED_FROM | W::MOVED_TO;
        match lock(&self.watches).add(dir, mask) {
            Ok(wd) => {
                lock(&self.dirs).insert(wd.clone(), dir.to_path_buf());
                watched.insert(dir.to_path_buf(), wd);
            }
            Err(e) => {
                tracing::warn!(
                    "cannot watch {}: {e}; polling every stream instead",
                    dir.display()
                );
                self.degraded.store(true, Ordering::SeqCst);
            }
        }
    }
}
