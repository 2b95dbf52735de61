//! `dr daemon`: every policy's work on schedule, the WAL streamers, and an
//! HTTP endpoint saying whether backups are fresh. It calls the same ops as
//! the CLI and has no backup logic of its own.

pub mod http;
pub mod notify;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::{self, Config, Policy};
use crate::context::Context;
use crate::error::Result;
use crate::history::{History, Run};
use crate::ops::{self, BackupOptions, Source, TargetFilter, fanout};
use crate::progress::Silent;
use crate::repo::BackupType;
use crate::schedule::CronSpec;

/// What a scheduled job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Full,
    Diff,
    Verify,
}

impl JobKind {
    pub fn word(self) -> &'static str {
        match self {
            JobKind::Full => "full",
            JobKind::Diff => "diff",
            JobKind::Verify => "verify",
        }
    }
}

/// One schedule of one policy.
#[derive(Debug, Clone)]
pub struct Job {
    pub policy: String,
    pub kind: JobKind,
    pub spec: CronSpec,
    pub next: DateTime<Utc>,
}

/// How long a schedule's runs are apart, measured at `now`.
pub fn period(spec: &CronSpec, now: DateTime<Utc>) -> Option<chrono::Duration> {
    let a = spec.next_after(now)?;
    let b = spec.next_after(a)?;
    Some(b - a)
}

/// Every job of the config, each due at its next time, or now when its
/// last success is older than its period (a run missed while the daemon
/// was down or the machine asleep).
pub fn jobs(cfg: &Config, history: &History, now: DateTime<Utc>) -> Result<Vec<Job>> {
    let mut out = Vec::new();
    for p in &cfg.policies {
        for (kind, spec) in [
            (JobKind::Full, &p.schedule.full),
            (JobKind::Diff, &p.schedule.diff),
            (JobKind::Verify, &p.schedule.verify),
        ] {
            let Some(spec) = spec else { continue };
            let Some(mut next) = spec.next_after(now) else {
                continue;
            };
            if let Some(per) = period(spec, now) {
                let mut newest: Option<DateTime<Utc>> = None;
                for t in &p.targets {
                    if let Some(r) = history.last(&p.name, t, kind.word(), true)? {
                        newest = Some(newest.map_or(r.finished, |n| n.max(r.finished)));
                    }
                }
                let missed = match newest {
                    Some(last) => now - last > per,
                    // Never ran here: a backup is due at once, a drill can wait.
                    None => kind != JobKind::Verify,
                };
                if missed {
                    tracing::info!(policy = %p.name, job = kind.word(), "catching up a missed run");
                    next = now;
                }
            }
            out.push(Job {
                policy: p.name.clone(),
                kind,
                spec: spec.clone(),
                next,
            });
        }
    }
    Ok(out)
}

/// Shared between the scheduler, the workers and the HTTP endpoint.
#[derive(Debug)]
pub struct Shared {
    /// The running configuration's context; a reload replaces it.
    pub ctx: RwLock<Context>,
    pub running: Mutex<HashSet<String>>,
}

/// Runs one job on every target of its policy (one failing target does not
/// stop the others) and records each result.
fn run_job(ctx: &Context, policy: &Policy, kind: JobKind) {
    let history = match History::open(ctx.state().root()) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    let pairs = match fanout::pairs(ctx.cfg(), &[policy], &TargetFilter::All) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(policy = %policy.name, "{e}");
            return;
        }
    };
    let notify = &ctx.cfg().notify;
    let now = || Utc::now().to_rfc3339();
    notify::ping(notify, "start", &format!("{} {}", policy.name, kind.word()));
    notify::webhook(
        notify,
        &notify::Event {
            event: "start",
            policy: &policy.name,
            job: kind.word(),
            target: None,
            label: None,
            error: None,
            time: now(),
        },
    );
    let source = Source::of(policy);
    let out = fanout::each(&pairs, kind.word(), |_, t| {
        let started = Utc::now();
        let result: Result<(String, u64)> = match kind {
            JobKind::Full | JobKind::Diff => {
                let opts = BackupOptions {
                    kind: Some(if kind == JobKind::Full {
                        BackupType::Full
                    } else {
                        BackupType::Diff
                    }),
                    lock_wait: Duration::from_secs(60),
                };
                source
                    .backup(ctx, t, &opts, &Silent)
                    .map(|r| (r.label, r.stored_size))
            }
            JobKind::Verify => source
                .verify(ctx, t, None, None, &Silent)
                .map(|v| (v.label, 0)),
        };
        let run = Run {
            policy: policy.name.clone(),
            target: t.name.clone(),
            kind: kind.word().into(),
            started,
            finished: Utc::now(),
            ok: result.is_ok(),
            error: result.as_ref().err().map(|e| e.to_string()),
            label: result.as_ref().ok().map(|(l, _)| l.clone()),
            size: result.as_ref().map(|(_, s)| *s).unwrap_or(0),
        };
        if let Ok((label, _)) = &result {
            tracing::info!(policy = %policy.name, target = %t.name, job = kind.word(), label = %label, "done");
        }
        if let Err(e) = history.record(&run) {
            tracing::error!("{e}");
        }
        notify::webhook(
            notify,
            &notify::Event {
                event: if run.ok { "success" } else { "failure" },
                policy: &policy.name,
                job: kind.word(),
                target: Some(&t.name),
                label: run.label.as_deref(),
                error: run.error.as_deref(),
                time: now(),
            },
        );
        result
    });
    match out.error() {
        None => notify::ping(
            notify,
            "success",
            &format!("{} {} ok", policy.name, kind.word()),
        ),
        Some(e) => notify::ping(notify, "failure", &e.to_string()),
    }
}

/// Starts the WAL streamers of `cfg` on their own thread; they stop when `stop` is set.
fn start_streamers(ctx: Context, stop: Arc<AtomicBool>) -> Option<std::thread::JoinHandle<()>> {
    if !ctx.cfg().policies.iter().any(|p| p.wal.enabled) {
        return None;
    }
    Some(std::thread::spawn(move || {
        let policies: Vec<&Policy> = ctx
            .cfg()
            .policies
            .iter()
            .filter(|p| p.wal.enabled)
            .collect();
        for (name, r) in ops::replicate::replicate(&ctx, &policies, &stop) {
            if let Err(e) = r {
                tracing::error!(policy = %name, "WAL streamer stopped: {e}");
            }
        }
    }))
}

/// Runs until `stop`; `hup` asks for a config reload.
pub fn run(config_path: &Path, stop: &Arc<AtomicBool>, hup: &Arc<AtomicBool>) -> Result<()> {
    let ctx = Context::load(config_path)?;
    let cfg = ctx.cfg().clone();
    let history = History::open(ctx.state().root())?;
    let shared = Arc::new(Shared {
        ctx: RwLock::new(ctx.clone()),
        running: Mutex::new(HashSet::new()),
    });
    let server = http::serve(&cfg.daemon_listen, shared.clone())?;
    tracing::info!(listen = %cfg.daemon_listen, "dr daemon started: /healthz and /metrics");
    let mut stream_stop = Arc::new(AtomicBool::new(false));
    let mut streamers = start_streamers(ctx, stream_stop.clone());
    let mut jobs = jobs(&cfg, &history, Utc::now())?;
    let mut workers: Vec<std::thread::JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        if hup.swap(false, Ordering::SeqCst) {
            match config::load(config_path) {
                Ok(new) => {
                    tracing::info!("configuration reloaded");
                    stream_stop.store(true, Ordering::SeqCst);
                    if let Some(h) = streamers.take() {
                        let _ = h.join();
                    }
                    stream_stop = Arc::new(AtomicBool::new(false));
                    jobs = self::jobs(&new, &history, Utc::now())?;
                    let new = Context::new(new);
                    streamers = start_streamers(new.clone(), stream_stop.clone());
                    if let Ok(mut c) = shared.ctx.write() {
                        *c = new;
                    }
                }
                Err(e) => {
                    tracing::error!(
                        "the new configuration is invalid, keeping the running one:\n{e}"
                    );
                }
            }
        }
        let now = Utc::now();
        for job in jobs.iter_mut().filter(|j| j.next <= now) {
            job.next = job
                .spec
                .next_after(now)
                .unwrap_or(now + chrono::Duration::days(3650));
            let busy = shared
                .running
                .lock()
                .map(|mut r| !r.insert(job.policy.clone()))
                .unwrap_or(true);
            if busy {
                tracing::warn!(policy = %job.policy, job = job.kind.word(), "previous run of this policy is still going: not starting another");
                continue;
            }
            let Some((ctx, policy)) = shared.ctx.read().ok().and_then(|c| {
                let p = c.cfg().policy(&job.policy).ok().cloned()?;
                Some((c.clone(), p))
            }) else {
                continue;
            };
            let (shared, kind) = (shared.clone(), job.kind);
            workers.push(std::thread::spawn(move || {
                run_job(&ctx, &policy, kind);
                if let Ok(mut r) = shared.running.lock() {
                    r.remove(&policy.name);
                }
            }));
        }
        workers.retain(|w| !w.is_finished());
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("stopping: no new runs; shipping committed WAL");
    stream_stop.store(true, Ordering::SeqCst);
    if let Some(h) = streamers {
        let _ = h.join();
    }
    // An in-flight backup gets a few seconds; one cut off has no manifest
    // and does not exist for restore (expire removes it later).
    let deadline = Instant::now() + Duration::from_secs(5);
    while workers.iter().any(|w| !w.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    server.unblock();
    Ok(())
}
