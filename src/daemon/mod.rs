//! `dr daemon`: every policy's work on schedule, the WAL streamers, and an
//! HTTP endpoint saying whether backups are fresh. It calls the same ops as
//! the CLI and has no backup logic of its own.

pub mod followers;
pub mod http;
mod rotation_watch;
pub mod status_page;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::{self, Config, Policy};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::history::History;
use crate::ops::runs::RunLog;
use crate::ops::{self, BackupOptions, Scope, Source, TargetFilter, fanout};
use crate::progress::Silent;
use crate::repo::BackupType;
use crate::schedule::CronSpec;

/// What a scheduled job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Full,
    Diff,
    Verify,
    /// `[copy] schedule`: `dr copy` to each of `[copy] to`.
    Copy,
}

impl JobKind {
    pub fn word(self) -> &'static str {
        match self {
            JobKind::Full => "full",
            JobKind::Diff => "diff",
            JobKind::Verify => "verify",
            JobKind::Copy => "copy",
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
    /// What runs one at a time ([`slot_of`]).
    pub slot: String,
}

/// The scheduler's unit of "one run at a time": a policy; for a fleet, its
/// jobs of one kind. A fleet's full, diff and verify run side by side and
/// each database is held by one job at a time ([`MemberLocks`]), so a
/// drill of the whole fleet never holds its backups (at 1,000 databases
/// one fleet verify used to hold every backup for half an hour).
pub fn slot_of(policy: &Policy, kind: JobKind) -> String {
    if policy.fleet.is_some() {
        format!("{}{SLOT_KIND}{}", policy.name, kind.word())
    } else {
        policy.name.clone()
    }
}

/// Separates a fleet's name from the job kind in its slot: `#` is not a
/// character of a policy name.
const SLOT_KIND: char = '#';

/// The policy a slot runs.
fn policy_of_slot(slot: &str) -> &str {
    slot.split_once(SLOT_KIND).map_or(slot, |(p, _)| p)
}

/// The databases of fleets a job holds now: one job at a time per
/// database, whatever the fleet's other jobs do.
#[derive(Debug, Default)]
pub struct MemberLocks {
    held: Mutex<HashMap<String, JobKind>>,
    freed: std::sync::Condvar,
}

/// A database held by a job; released on drop.
pub struct MemberGuard<'l> {
    locks: &'l MemberLocks,
    member: String,
}

impl MemberLocks {
    /// Waits until no other job holds `member`, then holds it for `kind`.
    pub fn hold(&self, member: &str, kind: JobKind) -> MemberGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut said = false;
        while let Some(other) = held.get(member).copied() {
            if !said {
                tracing::info!(policy = %member, job = kind.word(), "waits for the {} run of this database", other.word());
                said = true;
            }
            held = self.freed.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.insert(member.to_string(), kind);
        MemberGuard {
            locks: self,
            member: member.to_string(),
        }
    }
}

impl Drop for MemberGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        held.remove(&self.member);
        self.locks.freed.notify_all();
    }
}

/// The newest committed backup of a kind on a target of a policy, as the
/// repository holds it (see [`jobs`]).
pub type Stored<'a> = dyn Fn(&Policy, &str, JobKind) -> Option<DateTime<Utc>> + 'a;

/// Every job of the config, each due at its next time, or now when its
/// last success is older than its period (a run missed while the daemon
/// was down or the machine asleep).
///
/// A backup job this host never ran looks at the repository too (`stored`:
/// the newest committed backup of that kind on a target): on a new host
/// recovering from the bucket, with an empty state_dir, the backups taken
/// before the disaster count, so its first start takes no "missed" full on
/// top of the new WAL generation's base, and nothing that first start does
/// makes retention expire the restore points it was recovered from.
pub fn jobs(
    cfg: &Config,
    history: &History,
    now: DateTime<Utc>,
    stored: &Stored<'_>,
) -> Result<Vec<Job>> {
    let mut out = Vec::new();
    for p in &cfg.policies {
        let copy_schedule = p.copy.as_ref().and_then(|c| c.schedule.clone());
        for (kind, spec) in [
            (JobKind::Full, &p.schedule.full),
            (JobKind::Diff, &p.schedule.diff),
            (JobKind::Verify, &p.schedule.verify),
            (JobKind::Copy, &copy_schedule),
        ] {
            let Some(spec) = spec else { continue };
            // A copy's runs are recorded under the target it copies to.
            let targets = match (kind, &p.copy) {
                (JobKind::Copy, Some(c)) => &c.to,
                _ => &p.targets,
            };
            let Some(mut next) = spec.next_after(now) else {
                continue;
            };
            if let Some(per) = spec.period(now) {
                // Never ran here, or not within its period: due now. Jobs
                // due together queue in this order, full, diff, verify, so a
                // drill runs on the backup taken just before it. A fleet
                // missed its run when any of its databases did.
                let mut missed = false;
                for member in ops::members::on_disk(p).unwrap_or_default() {
                    let name = &member.name;
                    let mut newest: Option<DateTime<Utc>> = None;
                    for t in targets {
                        // A verify ran when either the drill or, on a host
                        // without the key, the check did.
                        let ran = match kind {
                            JobKind::Verify => [
                                history.last(name, t, "verify", true)?,
                                history.last(name, t, "check", true)?,
                            ]
                            .into_iter()
                            .flatten()
                            .max_by_key(|r| r.finished),
                            _ => history.last(name, t, kind.word(), true)?,
                        };
                        let seen = match ran {
                            Some(r) => Some(r.finished),
                            // Never ran here: what the repository holds (for
                            // a fleet, each database's own backups).
                            None if kind != JobKind::Verify => stored(&member, t, kind),
                            None => None,
                        };
                        if let Some(s) = seen {
                            newest = Some(newest.map_or(s, |n| n.max(s)));
                        }
                    }
                    missed |= newest.is_none_or(|last| now - last > per);
                }
                if missed {
                    tracing::info!(policy = %p.name, job = kind.word(), "catching up a missed run");
                    next = now;
                }
            }
            // Said once per job at start and reload: when a backup runs
            // next is the first thing an operator asks of a scheduler.
            tracing::info!(policy = %p.name, job = kind.word(), next = %next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "scheduled");
            out.push(Job {
                policy: p.name.clone(),
                kind,
                spec: spec.clone(),
                next,
                slot: slot_of(p, kind),
            });
        }
    }
    Ok(out)
}

/// The newest committed backup of `kind` (a diff: of either kind) that
/// `target` holds for `policy`, when it can be read.
fn newest_stored(
    ctx: &Context,
    policy: &Policy,
    target: &str,
    kind: JobKind,
) -> Option<DateTime<Utc>> {
    let t = ctx.cfg().target(target).ok()?;
    Source::of(policy)
        .list(ctx, t)
        .backups
        .iter()
        .filter(|b| b.error.is_none())
        .filter(|b| kind != JobKind::Full || b.kind == ops::report::BackupKind::Full)
        .map(|b| b.timestamp_start)
        .max()
}

/// Every policy of `cfg` as it runs now: fleets as their databases on disk.
pub fn policies_now(cfg: &Config) -> Vec<Policy> {
    let mut out = Vec::new();
    for p in &cfg.policies {
        // A fleet that cannot be listed is reported as itself: no run of it succeeds.
        out.extend(ops::members::on_disk(p).unwrap_or_else(|_| vec![p.clone()]));
    }
    out
}

/// Shared between the scheduler, the workers and the HTTP endpoint.
#[derive(Debug)]
pub struct Shared {
    /// The running configuration's context; a reload replaces it.
    pub ctx: RwLock<Context>,
    /// The job each slot ([`slot_of`]: a policy, or a fleet's jobs of one
    /// kind) is running now.
    pub running: Mutex<HashMap<String, JobKind>>,
    /// The fleets' databases held by a job now.
    pub members: MemberLocks,
    /// The WAL streamers, as their supervisor sees them.
    pub streamers: ops::replicate::Statuses,
    /// The standbys this host keeps (`[follow]`), by policy.
    pub followers: followers::FollowStatuses,
    /// The ages of the secret files and the expiry of the certificates
    /// the configuration names, as last looked at.
    pub rotation: Mutex<ops::rotation::Findings>,
}

/// Runs one job on every target of its policy (one failing target does not
/// stop the others) and records and reports each result.
fn run_job(ctx: &Context, policy: &Policy, kind: JobKind, members: &MemberLocks) {
    // A fleet's job covers every database it has now (a drill, every one
    // it has backups of).
    let scope = match kind {
        JobKind::Verify | JobKind::Copy => Scope::Stored,
        _ => Scope::OnDisk,
    };
    let policies = match ops::members::expand(ctx, policy, scope) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(policy = %policy.name, "{e}");
            let log = RunLog::open(ctx);
            log.start(policy, kind.word());
            for t in &policy.targets {
                if let Ok(t) = ctx.cfg().target(t) {
                    log.record(
                        policy,
                        t,
                        kind.word(),
                        Utc::now(),
                        &Err(Error::Other(e.to_string())),
                    );
                }
            }
            return;
        }
    };
    let pairs = match kind {
        JobKind::Copy => copy_pairs(ctx, &policies),
        _ => fanout::pairs(ctx.cfg(), &policies, &TargetFilter::All),
    };
    let pairs = match pairs {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(policy = %policy.name, "{e}");
            return;
        }
    };
    if pairs.is_empty() {
        tracing::info!(policy = %policy.name, job = kind.word(), "no database to {}", kind.word());
        return;
    }
    let log = RunLog::open(ctx);
    log.start(policy, kind.word());
    // A fleet's databases run a few at a time (small databases: the
    // time of each is mostly waiting on fsync and the network), each held
    // from the fleet's other jobs while it runs.
    let workers = if policy.fleet.is_some() {
        FLEET_WORKERS
    } else {
        1
    };
    let out = fanout::each_concurrent(&pairs, kind.word(), workers, |policy, t| {
        let _held = policy
            .member
            .is_some()
            .then(|| members.hold(&policy.name, kind));
        let source = Source::of(policy);
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
            // A copy, then the policy's retention there: what the
            // destination holds follows the same rules as the source.
            JobKind::Copy => ops::copy::ends(ctx.cfg(), policy, None, Some(&t.name))
                .and_then(|(src, _)| {
                    let opts = ops::copy::CopyOptions {
                        lock_wait: Duration::from_secs(60),
                        ..Default::default()
                    };
                    ops::copy::copy(ctx, policy, src, t, &opts, &Silent)
                })
                .and_then(|c| {
                    source.expire(ctx, t, false, Duration::from_secs(60))?;
                    Ok((c.copied.last().cloned().unwrap_or_default(), c.bytes))
                }),
            JobKind::Verify => {
                let opts = ops::verify::VerifyOptions {
                    without_key: keyless(ctx, policy),
                    ..Default::default()
                };
                source.verify(ctx, t, &opts, &Silent).map(|v| {
                    log.import_drills(&v);
                    (v.label, 0)
                })
            }
        };
        if let Ok((label, _)) = &result {
            tracing::info!(policy = %policy.name, target = %t.name, job = job_word(ctx, policy, kind), label = %label, "done");
        }
        log.record(policy, t, job_word(ctx, policy, kind), started, &result);
        result
    });
    log.finish_all(
        pairs.iter().map(|(p, _)| *p),
        job_word(ctx, policy, kind),
        &out.failures,
    );
}

/// Each database of `policies` with each of its copy destinations.
fn copy_pairs<'p, 'c>(
    ctx: &'c Context,
    policies: &'p [Policy],
) -> Result<Vec<(&'p Policy, &'c config::Target)>> {
    let mut out = Vec::new();
    for p in policies {
        for t in p.copy.iter().flat_map(|c| &c.to) {
            out.push((p, ctx.cfg().target(t)?));
        }
    }
    Ok(out)
}

/// Databases of one fleet a job runs at once.
const FLEET_WORKERS: usize = 4;

/// A scheduled verify on a host that keeps no key for a SQLite policy
/// checks without it (`ops::stored_check`); the drill runs where the key is.
fn keyless(ctx: &Context, policy: &Policy) -> bool {
    matches!(policy.source, crate::config::Source::Sqlite { .. }) && !ctx.holds_key(policy)
}

/// The history's word for a run of `kind`: a verify without the key is a
/// `check`, so that it never counts as a restore drill.
fn job_word(ctx: &Context, policy: &Policy, kind: JobKind) -> &'static str {
    if kind == JobKind::Verify && keyless(ctx, policy) {
        "check"
    } else {
        kind.word()
    }
}

/// Runs until `stop`; `hup` asks for a config reload.
pub fn run(config_path: &Path, stop: &Arc<AtomicBool>, hup: &Arc<AtomicBool>) -> Result<()> {
    let ctx = Context::load(config_path)?;
    let history = History::open(ctx.state().root())?;
    let shared = Arc::new(Shared {
        ctx: RwLock::new(ctx.clone()),
        running: Mutex::new(HashMap::new()),
        members: MemberLocks::default(),
        streamers: Arc::new(Mutex::new(Default::default())),
        followers: Arc::new(Mutex::new(Default::default())),
        rotation: Mutex::default(),
    });
    let listen = ctx.cfg().daemon_listen.clone();
    match &ctx.cfg().daemon_token_file {
        // Checked now: a token that cannot be read fails the start, not
        // the first scrape.
        Some(f) => {
            crate::secret::read_secret(f)?;
        }
        None if !http::loopback_only(&listen) => tracing::warn!(
            listen = %listen,
            "daemon.listen is reachable from the network and /metrics and /healthz's detail are open to anyone who can reach it: set [daemon] token_file (Prometheus: authorization.credentials_file) or listen on 127.0.0.1"
        ),
        None => {}
    }
    let server = http::serve(&listen, shared.clone())?;
    // The address bound, not the one asked for: with port 0 the system
    // picks a free port, and this line is where a supervisor learns it.
    let bound = server
        .server_addr()
        .to_ip()
        .map_or(listen.clone(), |a| a.to_string());
    tracing::info!(listen = %bound, "dr daemon started: /healthz and /metrics");
    let listen_file = ctx.state().daemon_listen();
    if let Err(e) = std::fs::write(&listen_file, format!("{bound}\n")) {
        // Only `dr healthcheck` with port 0 needs it: said, not fatal.
        tracing::warn!(file = %listen_file.display(), error = %e, "cannot record the address bound");
    }
    // A policy this host follows is the primary's to stream and back up:
    // the streamers and the schedule see the others only.
    let standby = followers::standby(&ctx);
    let primary = followers::primary_view(&ctx, &standby);
    let mut following = followers::Followers::new(shared.followers.clone());
    following.apply(&ctx, &standby);
    let streamers = ops::replicate::Engine::start(
        &primary,
        ops::replicate::streamed(&primary),
        ops::replicate::Mode::Supervised,
        shared.streamers.clone(),
    );
    let mut sched = Scheduler::new(jobs(primary.cfg(), &history, Utc::now(), &|p, t, k| {
        newest_stored(&ctx, p, t, k)
    })?);
    let mut workers: Vec<std::thread::JoinHandle<()>> = Vec::new();
    let mut shipper: Option<std::thread::JoinHandle<()>> = None;
    let mut last_ship = Instant::now();
    let mut watcher: Option<std::thread::JoinHandle<()>> = None;
    // The first look comes once the first jobs have had a moment to run.
    let mut last_watch = Instant::now()
        .checked_sub(VERDICT_CHECK - Duration::from_secs(5))
        .unwrap_or_else(Instant::now);
    let at_risk: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    // Its first look starts in the loop's first turn, before any scrape
    // can count on it: nothing has been looked at yet.
    let mut rotation = rotation_watch::RotationWatch::default();
    while !stop.load(Ordering::SeqCst) {
        // The protection verdict, every VERDICT_CHECK: a database that
        // becomes at risk (or protected again) is notified once.
        if last_watch.elapsed() >= VERDICT_CHECK && watcher.as_ref().is_none_or(|h| h.is_finished())
        {
            last_watch = Instant::now();
            let (shared, at_risk) = (shared.clone(), at_risk.clone());
            watcher = Some(std::thread::spawn(move || {
                notify_verdicts(&shared, &at_risk)
            }));
        }
        // A promotion here makes this host a policy's primary: taken up as
        // a reload would (the config is read again, and the records).
        let promoted = following.released();
        if promoted {
            tracing::info!("promoted here: the streamers and the schedule take the policy up");
        }
        let reload = hup.swap(false, Ordering::SeqCst) || promoted;
        if reload {
            match config::load(config_path) {
                Ok(new) => {
                    if !promoted {
                        tracing::info!("configuration reloaded");
                    }
                    let running = shared.running.lock().map(|r| r.clone()).unwrap_or_default();
                    let new = Context::new(new);
                    let standby = followers::standby(&new);
                    let primary = followers::primary_view(&new, &standby);
                    let fresh = jobs(primary.cfg(), &history, Utc::now(), &|p, t, k| {
                        newest_stored(&new, p, t, k)
                    })?;
                    sched.replace(fresh, &running, Utc::now());
                    crate::audit::record(
                        crate::audit::Entry::new(if promoted {
                            "promotion_taken_up"
                        } else {
                            "config_reload"
                        })
                        .detail(config_path.display().to_string()),
                    );
                    following.apply(&new, &standby);
                    streamers.apply(&primary);
                    if let Ok(mut c) = shared.ctx.write() {
                        *c = new;
                    }
                }
                Err(e) => {
                    tracing::error!(
                        "the new configuration is invalid, keeping the running one:\n{e}"
                    );
                    crate::audit::record(crate::audit::Entry {
                        result: format!("invalid, the running configuration kept: {e}"),
                        ..crate::audit::Entry::new("config_reload")
                            .detail(config_path.display().to_string())
                    });
                }
            }
        }
        let running = shared.running.lock().map(|r| r.clone()).unwrap_or_default();
        for (slot, kind) in sched.due(Utc::now(), &running) {
            let Some((ctx, policy)) = shared.ctx.read().ok().and_then(|c| {
                let p = c.cfg().policy(policy_of_slot(&slot)).ok().cloned()?;
                Some((c.clone(), p))
            }) else {
                continue;
            };
            if let Ok(mut r) = shared.running.lock() {
                r.insert(slot.clone(), kind);
            }
            let shared = shared.clone();
            workers.push(std::thread::spawn(move || {
                run_job(&ctx, &policy, kind, &shared.members);
                if let Ok(mut r) = shared.running.lock() {
                    r.remove(&slot);
                }
            }));
        }
        workers.retain(|w| !w.is_finished());
        rotation.tick(&shared, reload);
        // The audit log goes to the targets at most once every
        // AUDIT_SHIP, and only when it gained lines.
        if last_ship.elapsed() >= AUDIT_SHIP
            && shipper.as_ref().is_none_or(|h| h.is_finished())
            && crate::audit::take_written()
        {
            last_ship = Instant::now();
            let ctx = shared.ctx.read().map(|c| c.clone()).ok();
            shipper = ctx.map(|ctx| std::thread::spawn(move || ops::audit_log::ship(&ctx)));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("stopping: no new runs; shipping committed WAL");
    following.stop();
    streamers.stop();
    // An in-flight backup gets a few seconds; one cut off has no manifest
    // and does not exist for restore (expire removes it later).
    let deadline = Instant::now() + Duration::from_secs(5);
    while workers.iter().any(|w| !w.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    abandon(&shared);
    server.unblock();
    let _ = std::fs::remove_file(&listen_file);
    if let Some(h) = shipper.take() {
        let _ = h.join();
    }
    if crate::audit::take_written()
        && let Ok(ctx) = shared.ctx.read().map(|c| c.clone())
    {
        ops::audit_log::ship(&ctx);
    }
    Ok(())
}

/// The runs still going when the daemon stops are abandoned, and said to
/// be: an error line naming each, a failed run in the history (so
/// `/healthz`, `dr info` and the metrics count it), the failure
/// notification, and the policy's lease released on each target.
fn abandon(shared: &Shared) {
    let running = shared.running.lock().map(|r| r.clone()).unwrap_or_default();
    let Ok(ctx) = shared.ctx.read().map(|c| c.clone()) else {
        return;
    };
    for (slot, kind) in running {
        let name = policy_of_slot(&slot).to_string();
        let Ok(policy) = ctx.cfg().policy(&name).cloned() else {
            continue;
        };
        let why = format!(
            "abandoned: the daemon stopped during the {} run of policy '{name}'; the backup it was writing has no manifest and is removed by expire",
            kind.word()
        );
        tracing::error!(policy = %name, job = kind.word(), "{why}");
        let log = RunLog::open(&ctx);
        let mut failures = Vec::new();
        for t in &policy.targets {
            let Ok(target) = ctx.cfg().target(t) else {
                continue;
            };
            log.record(
                &policy,
                target,
                kind.word(),
                Utc::now(),
                &Err(Error::Other(why.clone())),
            );
            failures.push(fanout::Failure {
                policy: name.clone(),
                target: t.clone(),
                error: Error::Other(why.clone()),
            });
            let members = ops::members::expand(&ctx, &policy, Scope::OnDisk)
                .unwrap_or_else(|_| vec![policy.clone()]);
            if let Ok(store) = ctx.storage(target) {
                for m in &members {
                    if let Err(e) = crate::lease::release_if_ours(store.as_ref(), &m.name) {
                        tracing::warn!(policy = %m.name, target = %t, "could not release the lease: {e}");
                    }
                }
            }
        }
        log.finish_all([&policy], kind.word(), &failures);
    }
}

/// How often the daemon looks at the protection verdict of every database.
const VERDICT_CHECK: Duration = Duration::from_secs(30);

/// Sends the `at_risk` and `protected` webhook events for the databases
/// whose verdict changed since the last look (`known`: at-risk databases
/// and their reasons), and logs each change.
fn notify_verdicts(shared: &Shared, known: &Mutex<BTreeMap<String, String>>) {
    let problems = match http::problems(shared) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("cannot judge the protection of the databases: {e}");
            return;
        }
    };
    let mut now: BTreeMap<String, String> = BTreeMap::new();
    for p in problems {
        let line = format!("{} (target {}): {}", p.problem, p.target, p.detail);
        now.entry(p.policy)
            .and_modify(|d| {
                d.push_str("; ");
                d.push_str(&line);
            })
            .or_insert(line);
    }
    let Ok(ctx) = shared.ctx.read().map(|c| c.clone()) else {
        return;
    };
    let Ok(mut known) = known.lock() else { return };
    let time = Utc::now().to_rfc3339();
    let send = |policy: &str, event: &str, error: Option<&str>| {
        // A fleet's database notifies through its fleet policy's [notify].
        if let Ok(p) = ctx.cfg().policy(policy.split('/').next().unwrap_or(policy)) {
            crate::notify::webhook(
                ctx.cfg().notify_for(p),
                &crate::notify::Event {
                    event,
                    policy,
                    job: "protection",
                    target: None,
                    label: None,
                    error,
                    time: time.clone(),
                },
            );
        }
    };
    for (policy, why) in now.iter().filter(|(p, _)| !known.contains_key(*p)) {
        tracing::error!(policy = %policy, "at risk: {why}");
        send(policy, "at_risk", Some(why));
    }
    for policy in known.keys().filter(|p| !now.contains_key(*p)) {
        tracing::info!(policy = %policy, "protected again");
        send(policy, "protected", None);
    }
    *known = now;
}

/// How often the daemon ships new audit lines to the targets.
const AUDIT_SHIP: Duration = Duration::from_secs(60);

/// When each job falls due, and what waits for its policy.
///
/// One run per policy at a time: a job that falls due while its policy runs
/// another is queued (once: a job already waiting is not queued twice) and
/// starts when the policy is free, in the order the jobs fell due. Nothing
/// due is ever dropped.
#[derive(Debug)]
pub struct Scheduler {
    jobs: Vec<Job>,
    queued: BTreeMap<String, VecDeque<JobKind>>,
}

impl Scheduler {
    pub fn new(jobs: Vec<Job>) -> Self {
        Scheduler {
            jobs,
            queued: BTreeMap::new(),
        }
    }

    /// New schedules (a reload); what is queued stays queued. A job whose
    /// schedule did not change keeps its next time, and one whose policy is
    /// running that very job now is not due again for it: a reload never
    /// queues a duplicate of a run in progress.
    pub fn replace(
        &mut self,
        jobs: Vec<Job>,
        running: &HashMap<String, JobKind>,
        now: DateTime<Utc>,
    ) {
        let mut jobs = jobs;
        for j in &mut jobs {
            let same = self
                .jobs
                .iter()
                .find(|o| o.policy == j.policy && o.kind == j.kind && o.spec.text == j.spec.text);
            if let Some(old) = same {
                j.next = old.next;
            } else if running.get(&j.slot) == Some(&j.kind) && j.next <= now {
                j.next = j.spec.next_after(now).unwrap_or(j.next);
            }
        }
        self.jobs = jobs;
    }

    /// The jobs to start now, by slot ([`slot_of`]), given what each slot
    /// is `running`: every job due by `now` joins its slot's queue, and
    /// each free slot starts the first job of its queue.
    pub fn due(
        &mut self,
        now: DateTime<Utc>,
        running: &HashMap<String, JobKind>,
    ) -> Vec<(String, JobKind)> {
        for job in self.jobs.iter_mut().filter(|j| j.next <= now) {
            job.next = job
                .spec
                .next_after(now)
                .unwrap_or(now + chrono::Duration::days(3650));
            let q = self.queued.entry(job.slot.clone()).or_default();
            if q.contains(&job.kind) {
                tracing::info!(policy = %job.policy, job = job.kind.word(), "due again while still queued: runs once");
                continue;
            }
            let ahead = running.get(&job.slot).or(q.front()).copied();
            q.push_back(job.kind);
            if let Some(ahead) = ahead {
                let what = if running.contains_key(&job.slot) {
                    "running"
                } else {
                    "queued"
                };
                tracing::info!(policy = %job.policy, job = job.kind.word(), "queued: waits for the {} run of this policy ({what})", ahead.word());
            }
        }
        let mut start = Vec::new();
        for (policy, q) in self.queued.iter_mut() {
            if running.contains_key(policy) {
                continue;
            }
            if let Some(kind) = q.pop_front() {
                start.push((policy.clone(), kind));
            }
        }
        self.queued.retain(|_, q| !q.is_empty());
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(policy: &str, kind: JobKind, spec: &str, next: DateTime<Utc>) -> Job {
        Job {
            policy: policy.into(),
            kind,
            spec: CronSpec::parse(spec).expect("spec"),
            next,
            slot: policy.into(),
        }
    }

    #[test]
    fn a_reload_keeps_next_times_and_never_queues_the_run_in_progress_again() {
        let t0 = DateTime::parse_from_rfc3339("2026-11-25T00:00:00Z")
            .expect("t")
            .with_timezone(&Utc);
        let later = t0 + chrono::Duration::hours(1);
        let mut s = Scheduler::new(vec![
            job("app", JobKind::Full, "0 0 * * * *", later),
            job("app", JobKind::Diff, "0 */5 * * * *", later),
        ]);
        let running: HashMap<String, JobKind> = [("app".to_string(), JobKind::Full)].into();
        // A reload computes a full due now (its run has not succeeded yet)
        // and changes the diff's schedule.
        s.replace(
            vec![
                job("app", JobKind::Full, "0 0 * * * *", t0),
                job("app", JobKind::Diff, "0 */10 * * * *", t0),
            ],
            &running,
            t0,
        );
        assert_eq!(s.jobs[0].next, later, "unchanged schedule keeps its time");
        assert_eq!(s.jobs[1].next, t0, "a changed schedule is computed anew");
        let due = s.due(t0, &running);
        assert!(due.is_empty(), "{due:?}");
        assert_eq!(
            s.queued
                .get("app")
                .map(|q| q.iter().copied().collect::<Vec<_>>()),
            Some(vec![JobKind::Diff]),
            "no second full behind the running one"
        );
    }

    #[test]
    fn jobs_due_while_their_policy_runs_are_queued_in_order_once_and_never_dropped() {
        let t0 = DateTime::parse_from_rfc3339("2026-11-25T00:00:00Z")
            .expect("t")
            .with_timezone(&Utc);
        let mut s = Scheduler::new(vec![
            job("app", JobKind::Full, "*/30 * * * * *", t0),
            job("app", JobKind::Diff, "*/10 * * * * *", t0),
            job("app", JobKind::Verify, "*/20 * * * * *", t0),
            job("other", JobKind::Diff, "*/10 * * * * *", t0),
        ]);
        let mut running = HashMap::new();
        let first = s.due(t0, &running);
        assert_eq!(
            first,
            vec![
                ("app".into(), JobKind::Full),
                ("other".into(), JobKind::Diff)
            ]
        );
        running.insert("app".to_string(), JobKind::Full);
        // Ten seconds on, diff falls due again while full runs: still one
        // diff queued, behind the first.
        let t1 = t0 + chrono::Duration::seconds(10);
        assert!(s.due(t1, &running).iter().all(|(p, _)| p != "app"));
        assert_eq!(
            s.queued
                .get("app")
                .map(|q| q.iter().copied().collect::<Vec<_>>()),
            Some(vec![JobKind::Diff, JobKind::Verify])
        );
        running.remove("app");
        let t2 = t1 + chrono::Duration::seconds(1);
        assert_eq!(s.due(t2, &running), vec![("app".into(), JobKind::Diff)]);
        running.insert("app".to_string(), JobKind::Diff);
        assert!(s.due(t2, &running).is_empty());
        running.remove("app");
        assert_eq!(s.due(t2, &running), vec![("app".into(), JobKind::Verify)]);
    }

    /// A fleet's jobs of different kinds run side by side (a drill of
    /// every database never holds the fleet's backups), its jobs of one
    /// kind one at a time; each database is held by one job at a time.
    #[test]
    fn a_fleets_verify_never_holds_its_full_and_each_database_runs_one_job_at_a_time() {
        let t0 = DateTime::parse_from_rfc3339("2026-11-25T00:00:00Z")
            .expect("t")
            .with_timezone(&Utc);
        let fleet = |kind: JobKind, spec: &str| Job {
            slot: format!("tenants{SLOT_KIND}{}", kind.word()),
            ..job("tenants", kind, spec, t0)
        };
        let mut s = Scheduler::new(vec![
            fleet(JobKind::Verify, "0 0 * * * *"),
            fleet(JobKind::Full, "*/5 * * * * *"),
        ]);
        let mut running = HashMap::new();
        let due = s.due(t0, &running);
        assert_eq!(due.len(), 2, "{due:?}");
        running.insert(format!("tenants{SLOT_KIND}verify"), JobKind::Verify);
        // The verify runs on; the next full starts anyway.
        let t1 = t0 + chrono::Duration::seconds(5);
        assert_eq!(
            s.due(t1, &running),
            vec![(format!("tenants{SLOT_KIND}full"), JobKind::Full)]
        );
        assert_eq!(
            policy_of_slot(&format!("tenants{SLOT_KIND}full")),
            "tenants"
        );
        assert_eq!(policy_of_slot("app"), "app");

        let locks = Arc::new(MemberLocks::default());
        let held = locks.hold("tenants/alice", JobKind::Verify);
        let (l2, order) = (locks.clone(), Arc::new(Mutex::new(Vec::new())));
        let o2 = order.clone();
        let other = std::thread::spawn(move || {
            let _b = l2.hold("tenants/bob", JobKind::Full);
            o2.lock().expect("order").push("bob");
            let _a = l2.hold("tenants/alice", JobKind::Full);
            o2.lock().expect("order").push("alice");
        });
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            *order.lock().expect("order"),
            ["bob"],
            "alice is held by the verify"
        );
        drop(held);
        other.join().expect("join");
        assert_eq!(*order.lock().expect("order"), ["bob", "alice"]);
    }
}
