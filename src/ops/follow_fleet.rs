//! `dr follow FLEET`: every database of a fleet policy followed in one
//! process, each by its own follower (`ops::follow`) into one directory,
//! under one coordinator.
//!
//! The coordinator reads the fleet's activity record (`repo::activity`,
//! written by the fleet's streamer) with a conditional GET, at `poll` while
//! it changes and backing off to `idle_poll`, and rings the follower of
//! each database it names (`ops::bell`): an idle fleet of 1,000 costs a few
//! requests a minute, not a listing per database. A database the record
//! names that is not followed yet (new on the primary) is followed at once.
//! Against a primary whose dr writes no record, each follower polls on its
//! own as a single database's does, and the fleet's listing is read every
//! [`RESCAN`] for new databases.
//!
//! The coordinator also watches the followers' stop files (one inotify
//! instance for the whole fleet; a local target's record too), so that
//! `dr promote FLEET --db NAME` stops that database's follower at once and
//! the others go on, and its own stop file (`state_dir/follow/<fleet>.stop`)
//! so that `dr promote FLEET` stops the whole fleet's. One whose follower
//! stops on an error is named and the others go on.
//!
//! Run by the daemon (a fleet policy with `[follow]`), each database's
//! follower is reported through [`Report`]: `/healthz`, `/metrics` and the
//! verdict see each database's lag, as they do a single database's.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::bell::{Bell, Gate};
use super::follow::{FollowOptions, Followed, Pass, PidFile, follow};
use crate::config::{Policy, Target, TargetKind};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::repo::activity::{self, Activity, Since};
use crate::storage::{Fetched, Storage};

/// How often the fleet's listing on the target is read for new databases
/// when the primary writes no activity record: a listing of every object
/// of the fleet, so not on every look.
const RESCAN: Duration = Duration::from_secs(300);
/// The same while the record is read (it names new databases itself).
const GOVERNED_RESCAN: Duration = Duration::from_secs(3600);
/// The coordinator's longest sleep: how late a signal's stop is seen.
const TICK: Duration = Duration::from_secs(1);
/// First copies made at once (each a whole restore).
const FIRST_COPIES: usize = 4;
/// Looks at the target (one listing each) made at once.
const LOOKS: usize = 16;
/// A follower that stopped because the target could not be read starts
/// again after this, doubling to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// What a fleet's followers did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FleetFollowed {
    pub policy: String,
    pub target: String,
    pub followed: Vec<Followed>,
    /// Databases whose follower stopped on an error: (database, error).
    pub failed: Vec<(String, String)>,
    /// Stopped because `dr promote FLEET` asked: the copies are the
    /// primary's databases now.
    pub released: bool,
}

/// What the coordinator says of one database's follower (by its member
/// policy name, `fleet/db`).
#[derive(Debug)]
pub enum Event<'a> {
    /// It started (again).
    Started,
    /// It looked at the target: where the copy stands.
    Pass(&'a Pass),
    /// It stopped: on this error (started again when the target could
    /// not be read), or, `None`, because it was asked to.
    Stopped(Option<&'a str>),
    /// The activity record, read at `checked`, says nothing new of the
    /// database since the follower's last look (and `until`: the
    /// primary's newest heartbeat of it): the copy is known complete then
    /// without a look of its own.
    Heard {
        checked: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
    },
}

/// Hears each follower's [`Event`]s: the daemon's status of each database.
pub type Report = Arc<dyn Fn(&str, Event<'_>) + Send + Sync>;

/// One database's follower.
struct Running {
    handle: JoinHandle<Result<Followed>>,
    bell: Arc<Bell>,
    stop_file: PathBuf,
    started: Instant,
    /// When it last looked at the target (its newest pass).
    looked: Arc<std::sync::Mutex<Option<DateTime<Utc>>>>,
    /// When the coordinator last rang it for a change.
    rang: Option<DateTime<Utc>>,
}

impl Running {
    /// Rung for a change: what the record says of it is not known to
    /// the copy until its next look.
    fn ring_for_change(&mut self) {
        self.rang = Some(Utc::now());
        self.bell.ring();
    }

    /// Whether the follower looked since it was last rung for a change.
    fn caught_up(&self) -> bool {
        let looked = *self.looked.lock().unwrap_or_else(|p| p.into_inner());
        looked.is_some_and(|l| self.rang.is_none_or(|r| l >= r))
    }
}

/// Follows every database of `fleet` on `target` into `opts.to` (a
/// directory) until `stop`, or until `dr promote FLEET` asks;
/// `opts.shared_process` says whether other work runs in this process (the
/// daemon's: `dr promote` then asks through the stop file alone).
pub fn follow_fleet(
    ctx: &Context,
    fleet: &Policy,
    target: &Target,
    opts: &FollowOptions,
    stop: &Arc<AtomicBool>,
    report: Option<Report>,
) -> Result<FleetFollowed> {
    std::fs::create_dir_all(&opts.to)
        .map_err(|e| Error::io(format!("cannot create {}", opts.to.display()), e))?;
    let pidfile = ctx.state().follow_pid(&fleet.name);
    let own_stop = pidfile.with_extension("stop");
    let _pid = PidFile::write(pidfile, opts.shared_process)?;
    // The followers stop on this: `stop`, or the fleet's promotion.
    let members_stop = Arc::new(AtomicBool::new(false));
    let stop_dir = ctx
        .state()
        .follow_pid(&crate::fleet::member_name(&fleet.name, "db"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    std::fs::create_dir_all(&stop_dir)
        .map_err(|e| Error::io(format!("cannot create {}", stop_dir.display()), e))?;
    let mut c = Coordinator {
        ctx,
        fleet,
        target,
        opts,
        stop: &members_stop,
        report,
        store: ctx.storage(target)?,
        running: BTreeMap::new(),
        ended: BTreeSet::new(),
        out: FleetFollowed {
            policy: fleet.name.clone(),
            target: target.name.clone(),
            ..Default::default()
        },
        governed: false,
        last: None,
        etag: None,
        rescan_now: false,
        gate: Arc::new(Gate::new(FIRST_COPIES)),
        looks: Arc::new(Gate::new(LOOKS)),
        retry: BTreeMap::new(),
    };
    let record_dir = match &target.kind {
        TargetKind::Local { path } => Some(path.join(&fleet.name)),
        TargetKind::S3(_) => None,
    };
    let mut watch = FleetWatch::new(&stop_dir, &own_stop, record_dir.as_deref());
    // The record first, so that followers start governed and an idle
    // fleet never polls database by database.
    let mut wait = opts.poll;
    let mut next_look = Instant::now();
    let mut next_scan = Instant::now();
    // `dr promote FLEET` asked: looked for once here (a stop file written
    // before the watch began), then seen by the watch, not polled.
    let mut promoted = own_stop.exists();
    while !stop.load(Ordering::Relaxed) {
        if promoted {
            tracing::info!(policy = %fleet.name, "`dr promote {}` made this host the primary of the fleet: its followers stop", fleet.name);
            c.out.released = true;
            break;
        }
        if Instant::now() >= next_look {
            wait = match c.look() {
                Ok(true) => opts.poll,
                Ok(false) if c.governed => (wait * 2).min(opts.idle_poll),
                Ok(false) => opts.idle_poll,
                Err(e) => {
                    tracing::warn!(policy = %fleet.name, target = %target.name, "cannot read the fleet's activity record (each database is looked at within {} min regardless): {e}", super::follow::GOVERNED_LOOK.as_secs() / 60);
                    opts.idle_poll
                }
            };
            if c.rescan_now {
                next_scan = Instant::now();
            }
            next_look = Instant::now() + wait;
        }
        if Instant::now() >= next_scan {
            c.rescan_now = false;
            next_scan = Instant::now() + if c.governed { GOVERNED_RESCAN } else { RESCAN };
            if let Err(e) = c.scan() {
                tracing::error!(policy = %fleet.name, target = %target.name, "cannot list the fleet's databases (trying again in {} s): {e}", RESCAN.as_secs());
            }
        }
        c.collect_finished();
        c.retry_due();
        let nap = next_look
            .saturating_duration_since(Instant::now())
            .min(TICK);
        match watch.as_mut() {
            Some(w) => {
                if let Some(seen) = w.wait(nap) {
                    if seen.record {
                        next_look = Instant::now();
                    }
                    promoted = seen
                        .stops
                        .iter()
                        .any(|n| Some(n.as_os_str()) == own_stop.file_name());
                    c.ring_stopped(|f| {
                        seen.stops
                            .iter()
                            .any(|n| Some(n.as_os_str()) == f.file_name())
                    });
                }
                if let Some(d) = &record_dir {
                    w.watch_record(d);
                }
            }
            None => {
                std::thread::sleep(nap);
                promoted = own_stop.exists();
                c.ring_stopped(|f| f.exists());
            }
        }
    }
    members_stop.store(true, Ordering::SeqCst);
    for r in c.running.values() {
        r.bell.ring();
    }
    for (db, r) in std::mem::take(&mut c.running) {
        c.collect(&db, r);
    }
    Ok(c.out)
}

/// The coordinator's state.
struct Coordinator<'a> {
    ctx: &'a Context,
    fleet: &'a Policy,
    target: &'a Target,
    opts: &'a FollowOptions,
    stop: &'a Arc<AtomicBool>,
    report: Option<Report>,
    store: Arc<dyn Storage>,
    /// By database name.
    running: BTreeMap<String, Running>,
    /// Databases not followed again: promoted, or stopped on an error.
    ended: BTreeSet<String>,
    out: FleetFollowed,
    /// The activity record is read: idle followers wait for their bell.
    governed: bool,
    /// The record's epoch and write last read.
    last: Option<(String, u64)>,
    etag: Option<String>,
    rescan_now: bool,
    /// First copies a few at a time.
    gate: Arc<Gate>,
    /// Looks at the target some at a time.
    looks: Arc<Gate>,
    /// Followers that stopped because the target could not be read: when
    /// each starts again, and the wait after that.
    retry: BTreeMap<String, (Instant, Duration)>,
}

impl Coordinator<'_> {
    /// One read of the activity record: whether it changed.
    fn look(&mut self) -> Result<bool> {
        let key = activity::key(&self.fleet.name);
        let asked = Utc::now();
        let record = match self.store.get_if_changed(&key, self.etag.as_deref())? {
            Fetched::Unchanged => {
                self.heard(asked, &BTreeMap::new());
                return Ok(false);
            }
            Fetched::Absent => None,
            Fetched::Changed(bytes, etag) => {
                self.etag = Some(etag);
                let a = Activity::parse(&bytes);
                if a.is_none() {
                    tracing::warn!(policy = %self.fleet.name, target = %self.target.name, "{key} is not an activity record this dr reads: each database is looked at on its own");
                }
                a
            }
        };
        let Some(a) = record else {
            self.etag = None;
            self.last = None;
            self.set_governed(false);
            return Ok(false);
        };
        let first = self.last.is_none();
        let last = self.last.as_ref().map(|(e, s)| (e.as_str(), *s));
        let since = a.since(last);
        let beats: BTreeMap<String, DateTime<Utc>> = match (&since, last) {
            (Since::Changed(_), Some((_, seq))) => a.heard(seq).into_iter().collect(),
            _ => BTreeMap::new(),
        };
        self.last = Some((a.epoch.clone(), a.seq));
        self.set_governed(true);
        match since {
            Since::Changed(dbs) => {
                for db in &dbs {
                    match self.running.get_mut(db) {
                        Some(r) => r.ring_for_change(),
                        None => self.start(db)?,
                    }
                }
                self.heard(asked, &beats);
            }
            // The first read: every follower looks once as it starts.
            Since::Everything if first => self.rescan_now = true,
            Since::Everything => {
                for r in self.running.values_mut() {
                    r.ring_for_change();
                }
                self.rescan_now = true;
            }
        }
        Ok(true)
    }

    /// The record read at `asked` named no change of the followers not
    /// rung since: each that has looked since its last ring is known
    /// complete as of `asked` (and heard the heartbeats in `beats`).
    fn heard(&self, asked: DateTime<Utc>, beats: &BTreeMap<String, DateTime<Utc>>) {
        let Some(report) = &self.report else { return };
        for (db, r) in &self.running {
            if r.caught_up() {
                report(
                    &crate::fleet::member_name(&self.fleet.name, db),
                    Event::Heard {
                        checked: asked,
                        until: beats.get(db).copied(),
                    },
                );
            }
        }
    }

    fn set_governed(&mut self, on: bool) {
        if self.governed != on {
            tracing::info!(policy = %self.fleet.name, target = %self.target.name, "{}", if on {
                "the fleet's activity record says which databases changed: idle databases are not looked at one by one"
            } else {
                "the fleet has no activity record (a primary of an older dr): each database is looked at on its own"
            });
            self.governed = on;
            for r in self.running.values() {
                r.bell.govern(on);
            }
        }
    }

    /// Starts a follower for every database the target holds.
    fn scan(&mut self) -> Result<()> {
        let listing = self.store.list(&format!("{}/", self.fleet.name))?;
        for db in
            crate::fleet::names_in_keys(&self.fleet.name, listing.iter().map(|o| o.key.as_str()))
        {
            self.start(&db)?;
        }
        Ok(())
    }

    /// Follows database `db` into the fleet's directory of copies (under
    /// the file name its source has), unless it is followed or ended.
    fn start(&mut self, db: &str) -> Result<()> {
        let Some(f) = &self.fleet.fleet else {
            return Ok(());
        };
        if self.running.contains_key(db) || self.ended.contains(db) {
            return Ok(());
        }
        let source = f.path_of(db);
        let copy = self.opts.to.join(source.file_name().unwrap_or_default());
        let m = self.fleet.member_policy(db, source);
        tracing::info!(policy = %m.name, to = %copy.display(), "following a database of the fleet");
        let bell = Arc::new(Bell::default());
        bell.govern(self.governed);
        let stop_file = self.ctx.state().follow_pid(&m.name).with_extension("stop");
        let (ctx, target, stop) = (self.ctx.clone(), self.target.clone(), self.stop.clone());
        let opts = FollowOptions {
            to: copy,
            shared_process: true,
            bell: Some(bell.clone()),
            gate: Some(self.gate.clone()),
            looks: Some(self.looks.clone()),
            ..self.opts.clone()
        };
        if let Some(r) = &self.report {
            r(&m.name, Event::Started);
        }
        let report = self.report.clone();
        let looked = Arc::new(std::sync::Mutex::new(None));
        let seen = looked.clone();
        let handle = std::thread::Builder::new()
            .name(format!("follow {}", m.name))
            .spawn(move || {
                follow(&ctx, &m, &target, &opts, &stop, &|pass| {
                    *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(pass.checked);
                    if let Some(r) = &report {
                        r(&m.name, Event::Pass(pass));
                    }
                })
            })
            .map_err(|e| Error::Other(format!("cannot start a follower: {e}")))?;
        self.running.insert(
            db.to_string(),
            Running {
                handle,
                bell,
                stop_file,
                started: Instant::now(),
                looked,
                rang: None,
            },
        );
        Ok(())
    }

    /// Rings the followers whose stop file `asked` says `dr promote` wrote.
    fn ring_stopped(&self, asked: impl Fn(&Path) -> bool) {
        for r in self.running.values() {
            if asked(&r.stop_file) {
                r.bell.ring();
            }
        }
    }

    /// Starts again the followers whose retry is due.
    fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .retry
            .iter()
            .filter(|(db, (at, _))| *at <= now && !self.running.contains_key(*db))
            .map(|(db, _)| db.clone())
            .collect();
        for db in due {
            if let Err(e) = self.start(&db) {
                tracing::error!(policy = %self.fleet.name, db, "{e}");
            }
        }
    }

    fn collect_finished(&mut self) {
        let finished: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| r.handle.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        for db in finished {
            if let Some(r) = self.running.remove(&db) {
                self.collect(&db, r);
            }
        }
    }

    /// One follower's end, in `out` (an error is said when it happens). A
    /// database with nothing to restore yet (its first base is still being
    /// taken) is followed again when the record or the listing names it.
    fn collect(&mut self, db: &str, r: Running) {
        let name = crate::fleet::member_name(&self.fleet.name, db);
        let ran = r.started.elapsed();
        let ended = r.handle.join();
        if let Some(report) = &self.report {
            match &ended {
                Ok(Ok(_)) => report(&name, Event::Stopped(None)),
                Ok(Err(e)) => report(&name, Event::Stopped(Some(&e.to_string()))),
                Err(_) => report(&name, Event::Stopped(Some("the follower panicked"))),
            }
        }
        match ended {
            Ok(Ok(f)) => {
                self.out.followed.push(f);
                self.ended.insert(db.to_string());
            }
            Ok(Err(Error::NotFound(e))) if !self.stop.load(Ordering::Relaxed) => {
                tracing::info!(policy = %name, "not followed yet: {e}; followed once the target holds its first backup");
            }
            // The target could not be read (exit 1): not the database's
            // fault; it starts again, as the daemon's followers do. Under
            // the daemon (which reports it meanwhile) every failure does,
            // as a single database's follower there.
            Ok(Err(e))
                if (e.exit_code() == 1 || self.report.is_some())
                    && !self.stop.load(Ordering::Relaxed) =>
            {
                // A follower that ran a while since its last restart
                // failed anew: its wait starts again from the first.
                let wait = match self.retry.get(db) {
                    Some((_, w)) if ran < MAX_RETRY => (*w * 2).min(MAX_RETRY),
                    _ => FIRST_RETRY,
                };
                tracing::warn!(policy = %name, "the follower stopped: {e}; starting it again in {} s", wait.as_secs());
                self.retry
                    .insert(db.to_string(), (Instant::now() + wait, wait));
            }
            Ok(Err(e)) => {
                tracing::error!(policy = %name, "stopped following: {e}");
                self.out.failed.push((name, e.to_string()));
                self.ended.insert(db.to_string());
            }
            Err(_) => {
                self.out.failed.push((name, "the follower panicked".into()));
                self.ended.insert(db.to_string());
            }
        }
    }
}

/// What the coordinator's inotify instance saw.
#[derive(Debug, Default)]
struct Seen {
    /// Stop files written (their names).
    stops: Vec<OsString>,
    /// The local target's activity record was replaced.
    record: bool,
}

/// One inotify instance for the whole fleet: the followers' stop files,
/// and a local target's activity record (written by a rename).
struct FleetWatch {
    rx: Receiver<(bool, OsString)>,
    watches: inotify::Watches,
    record_wd: Option<inotify::WatchDescriptor>,
    done: Arc<AtomicBool>,
    wds: Vec<inotify::WatchDescriptor>,
}

impl FleetWatch {
    /// `None` when inotify cannot: the coordinator then looks for stop
    /// files every [`TICK`].
    fn new(stop_dir: &Path, own_stop: &Path, record_dir: Option<&Path>) -> Option<FleetWatch> {
        let mut ino = inotify::Inotify::init().ok()?;
        let watches = ino.watches();
        let created = inotify::WatchMask::CREATE | inotify::WatchMask::MOVED_TO;
        let stop_wd = watches.clone().add(stop_dir, created).ok()?;
        let stop_wd_kept = stop_wd.clone();
        // The fleet's own stop file, beside the single databases' files.
        let own_wd = watches
            .clone()
            .add(own_stop.parent().unwrap_or(stop_dir), created)
            .ok()?;
        let own_name = own_stop.file_name().map(OsString::from).unwrap_or_default();
        let own_wd_kept = own_wd.clone();
        let (tx, rx) = channel();
        let done = Arc::new(AtomicBool::new(false));
        let stopped = done.clone();
        let record_name = OsString::from(activity::NAME);
        std::thread::Builder::new()
            .name("follow-fleet-inotify".into())
            .spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !stopped.load(Ordering::Relaxed) {
                    let Ok(events) = ino.read_events_blocking(&mut buf) else {
                        break;
                    };
                    for e in events {
                        let Some(n) = e.name else { continue };
                        // Three watches: the followers' stop files, the
                        // fleet's, and the record's.
                        let sent = if e.wd == stop_wd || (e.wd == own_wd && n == own_name) {
                            tx.send((false, n.to_os_string()))
                        } else if e.wd == own_wd {
                            Ok(())
                        } else if n == record_name {
                            tx.send((true, n.to_os_string()))
                        } else {
                            Ok(())
                        };
                        if sent.is_err() {
                            return;
                        }
                    }
                }
            })
            .ok()?;
        let mut w = FleetWatch {
            rx,
            watches,
            record_wd: None,
            done,
            wds: vec![stop_wd_kept, own_wd_kept],
        };
        if let Some(d) = record_dir {
            w.watch_record(d);
        }
        Some(w)
    }

    /// Watches the local target's record directory once it exists (the
    /// primary creates it with its first database).
    fn watch_record(&mut self, dir: &Path) {
        if self.record_wd.is_some() {
            return;
        }
        if let Ok(wd) = self.watches.add(
            dir,
            inotify::WatchMask::MOVED_TO | inotify::WatchMask::CLOSE_WRITE,
        ) {
            self.wds.push(wd.clone());
            self.record_wd = Some(wd);
        }
    }

    /// What was seen within `timeout`, `None` for nothing.
    fn wait(&mut self, timeout: Duration) -> Option<Seen> {
        let first = self.rx.recv_timeout(timeout).ok()?;
        let mut seen = Seen::default();
        for (record, name) in std::iter::once(first).chain(self.rx.try_iter()) {
            if record {
                seen.record = true;
            } else {
                seen.stops.push(name);
            }
        }
        Some(seen)
    }
}

impl Drop for FleetWatch {
    /// Removing a watch queues `IN_IGNORED`, which wakes the thread.
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        for wd in self.wds.drain(..) {
            let _ = self.watches.remove(wd);
        }
    }
}
