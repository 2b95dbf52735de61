//! The WAL streamers, supervised. Each streamed policy has a thread that
//! runs its streamer and, when the streamer stops on an error, logs it,
//! counts it and starts it again after a backoff (1 s doubling to 60 s,
//! back to 1 s after a minute of running). Its status is what `/healthz`
//! (`streamer_down`) and `/metrics` (`dr_wal_streamer_up`) report.
//!
//! A reload restarts only the streamers whose policy changed: a streamer
//! that keeps running keeps its generation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::Policy;
use crate::context::Context;
use crate::ops;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A streamer that ran this long without failing starts its backoff anew.
const STABLE: Duration = Duration::from_secs(60);

/// One streamer as its supervisor sees it.
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

/// Every supervised streamer's status, by policy.
pub type Statuses = Arc<Mutex<BTreeMap<String, Status>>>;

struct Running {
    /// What the streamer was started with: a reload restarts it only when
    /// this changes.
    fingerprint: String,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

/// Starts, keeps and stops the streamers of the running configuration.
pub struct Supervisor {
    running: BTreeMap<String, Running>,
    statuses: Statuses,
}

impl Supervisor {
    pub fn new(statuses: Statuses) -> Self {
        Supervisor {
            running: BTreeMap::new(),
            statuses,
        }
    }

    /// Makes the running streamers those of `ctx`'s configuration: new
    /// policies start, removed ones stop, changed ones restart, unchanged
    /// ones keep running untouched.
    pub fn apply(&mut self, ctx: &Context) {
        let cfg = ctx.cfg();
        let wanted: BTreeMap<String, (String, Policy)> = cfg
            .policies
            .iter()
            .filter(|p| p.wal.enabled)
            .map(|p| (p.name.clone(), (fingerprint(ctx, p), p.clone())))
            .collect();
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| wanted.get(*name).is_none_or(|(f, _)| *f != r.fingerprint))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(r) = self.running.remove(&name) {
                tracing::info!(policy = %name, "restarting the WAL streamer: its policy changed");
                r.stop.store(true, Ordering::SeqCst);
                let _ = r.handle.join();
            }
            if let Ok(mut s) = self.statuses.lock() {
                s.remove(&name);
            }
        }
        for (name, (fp, policy)) in wanted {
            if self.running.contains_key(&name) {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let handle = {
                let (ctx, stop, statuses) = (ctx.clone(), stop.clone(), self.statuses.clone());
                std::thread::spawn(move || supervise(&ctx, &policy, &stop, &statuses))
            };
            self.running.insert(
                name,
                Running {
                    fingerprint: fp,
                    stop,
                    handle,
                },
            );
        }
    }

    /// Stops every streamer; each ships what is committed first.
    pub fn stop_all(&mut self) {
        for r in self.running.values() {
            r.stop.store(true, Ordering::SeqCst);
        }
        for (_, r) in std::mem::take(&mut self.running) {
            let _ = r.handle.join();
        }
    }
}

/// What a streamer depends on: the policy, its targets, the keys and the
/// state directory.
fn fingerprint(ctx: &Context, p: &Policy) -> String {
    let cfg = ctx.cfg();
    let targets: Vec<_> = p.targets.iter().map(|t| cfg.target(t).ok()).collect();
    format!(
        "{p:?}|{targets:?}|{:?}|{}",
        cfg.encryption,
        cfg.state_dir.display()
    )
}

fn set(statuses: &Statuses, policy: &str, f: impl FnOnce(&mut Status)) {
    if let Ok(mut s) = statuses.lock() {
        let st = s.entry(policy.to_string()).or_insert_with(|| Status {
            running: false,
            since: Utc::now(),
            restarts: 0,
            error: None,
            grace: Duration::ZERO,
        });
        f(st);
    }
}

fn supervise(ctx: &Context, policy: &Policy, stop: &AtomicBool, statuses: &Statuses) {
    // A restarted streamer is up once it has sealed a couple of segments.
    let grace = policy.wal.sync_interval * 2 + Duration::from_secs(1);
    let mut backoff = FIRST_BACKOFF;
    loop {
        set(statuses, &policy.name, |s| {
            s.running = true;
            s.since = Utc::now();
            s.grace = grace;
        });
        let started = Instant::now();
        let result = ops::replicate::stream_policy(ctx, policy, stop);
        if stop.load(Ordering::SeqCst) {
            match result {
                Ok(r) if r.unshipped > 0 => {
                    tracing::error!(policy = %policy.name, "{} WAL segment(s) could not be shipped and stay in the spool; they ship when the streamer runs again", r.unshipped)
                }
                Ok(_) => {}
                Err(e) => tracing::error!(policy = %policy.name, "WAL streamer stopped: {e}"),
            }
            set(statuses, &policy.name, |s| s.running = false);
            return;
        }
        let why = match result {
            Ok(_) => "the streamer ended by itself".to_string(),
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= STABLE {
            backoff = FIRST_BACKOFF;
        }
        let mut restarts = 0;
        set(statuses, &policy.name, |s| {
            s.running = false;
            s.since = Utc::now();
            s.restarts += 1;
            s.error = Some(why.clone());
            restarts = s.restarts;
        });
        tracing::error!(policy = %policy.name, restarts, "WAL streamer stopped: {why}; restarting in {}", humantime::format_duration(backoff));
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
