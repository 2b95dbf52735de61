//! The daemon's standbys: a policy with `[follow]` is followed on this host
//! (`ops::follow`, one thread each; a fleet's by one `ops::follow_fleet`
//! coordinator, each database reported on its own) instead of streamed and
//! backed up, until `dr promote` names this host its primary. A follower that fails is
//! restarted with a backoff and reported meanwhile: `/healthz` and the
//! verdict say `follower_down` or `follower_behind`, `/metrics` has each
//! follower's lag, and the verdict watcher sends the alert.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::{Follow, Policy};
use crate::context::Context;
use crate::ops::follow::{FollowOptions, Pass};
use crate::ops::follow_fleet::{Event, Report};
use crate::ops::verdict::{HEARTBEAT, Reason};

/// One follower as `/healthz` and `/metrics` see it.
#[derive(Debug, Clone)]
pub struct FollowStatus {
    /// The policy's `[follow]`: the target followed, and `max_lag`.
    pub follow: Follow,
    pub running: bool,
    /// When it last started.
    pub since: DateTime<Utc>,
    pub restarts: u64,
    /// The last failure, until a look at the target succeeds again.
    pub error: Option<String>,
    /// The newest look at the target.
    pub pass: Option<Pass>,
}

impl FollowStatus {
    /// A follower not started yet.
    fn new(follow: &Follow) -> FollowStatus {
        FollowStatus {
            follow: follow.clone(),
            running: false,
            since: Utc::now(),
            restarts: 0,
            error: None,
            pass: None,
        }
    }
}

/// How the daemon runs a follower of `policy` into `to`: the policy's
/// waits, its identity from the config, beside other work in one process.
fn daemon_options(policy: &Policy, to: std::path::PathBuf) -> FollowOptions {
    let (poll, idle_poll) = policy.follow_waits(None, None);
    FollowOptions {
        to,
        identity: None,
        force: false,
        poll,
        idle_poll,
        shared_process: true,
        bell: None,
        gate: None,
        looks: None,
    }
}

/// Every follower of this daemon, by policy (a fleet's, by database:
/// `fleet/db`).
pub type FollowStatuses = Arc<Mutex<BTreeMap<String, FollowStatus>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The policies this host follows now: those with `[follow]` whose newest
/// promotion record does not name this host. A target that cannot be read
/// keeps the policy followed: a standby that is not sure writes nothing.
pub fn standby(ctx: &Context) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for p in &ctx.cfg().policies {
        let Some(f) = &p.follow else { continue };
        let promoted_here = ctx
            .cfg()
            .target(&f.target)
            .and_then(|t| ctx.storage(t))
            .and_then(|s| crate::ops::promotion::governing(s.as_ref(), p))
            .ok()
            .flatten()
            .is_some_and(|r| crate::ops::promotion::host_id(ctx).is_ok_and(|id| id == r.host_id));
        if promoted_here {
            tracing::info!(policy = %p.name, "promoted on this host: it is the primary here, [follow] no longer applies (remove it at leisure)");
        } else {
            out.insert(p.name.clone());
        }
    }
    out
}

/// `ctx` without the policies this host follows: what the streamers and
/// the schedule run.
pub fn primary_view(ctx: &Context, standby: &BTreeSet<String>) -> Context {
    let mut cfg = ctx.cfg().clone();
    cfg.policies.retain(|p| !standby.contains(&p.name));
    Context::new(cfg)
}

struct Running {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
    /// The policy as it was started, to restart it when a reload changes it.
    policy: String,
}

/// The followers' threads.
pub struct Followers {
    running: BTreeMap<String, Running>,
    statuses: FollowStatuses,
    /// Set when a follower stopped because `dr promote` asked: the daemon
    /// then takes the policy up as its primary.
    released: Arc<AtomicBool>,
}

impl std::fmt::Debug for Followers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Followers({:?})", self.running.keys())
    }
}

impl Followers {
    pub fn new(statuses: FollowStatuses) -> Followers {
        Followers {
            running: BTreeMap::new(),
            statuses,
            released: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether a follower was released by `dr promote` since the last call.
    pub fn released(&self) -> bool {
        self.released.swap(false, Ordering::SeqCst)
    }

    /// Follows exactly the `standby` policies of `ctx`: new ones start,
    /// changed ones restart, others stop.
    pub fn apply(&mut self, ctx: &Context, standby: &BTreeSet<String>) {
        let wanted: BTreeMap<String, Policy> = ctx
            .cfg()
            .policies
            .iter()
            .filter(|p| standby.contains(&p.name) && p.follow.is_some())
            .map(|p| (p.name.clone(), p.clone()))
            .collect();
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| {
                wanted
                    .get(*name)
                    .is_none_or(|p| format!("{p:?}") != r.policy || r.handle.is_finished())
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(r) = self.running.remove(&name) {
                r.stop.store(true, Ordering::SeqCst);
                let _ = r.handle.join();
            }
            let members = format!("{name}/");
            lock(&self.statuses).retain(|k, _| *k != name && !k.starts_with(&members));
        }
        for (name, p) in wanted {
            if self.running.contains_key(&name) {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let (ctx, statuses, released) =
                (ctx.clone(), self.statuses.clone(), self.released.clone());
            let policy = format!("{p:?}");
            let flag = stop.clone();
            let handle =
                std::thread::spawn(move || supervise(&ctx, &p, &flag, &statuses, &released));
            self.running.insert(
                name,
                Running {
                    stop,
                    handle,
                    policy,
                },
            );
        }
    }

    /// Stops every follower (each records where its copy stands).
    pub fn stop(mut self) {
        for r in self.running.values() {
            r.stop.store(true, Ordering::SeqCst);
        }
        for (_, r) in std::mem::take(&mut self.running) {
            let _ = r.handle.join();
        }
    }
}

/// Runs one policy's follower until `stop`, restarting it after a failure
/// (1 s, doubling to a minute).
fn supervise(
    ctx: &Context,
    policy: &Policy,
    stop: &Arc<AtomicBool>,
    statuses: &FollowStatuses,
    released: &AtomicBool,
) {
    let Some(follow) = policy.follow.clone() else {
        return;
    };
    if let Some(f) = &policy.fleet {
        let to = f.dir.clone();
        return supervise_fleet(ctx, policy, follow, to, stop, statuses, released);
    }
    let opts = daemon_options(policy, policy.copy_path());
    let set = |f: &dyn Fn(&mut FollowStatus)| {
        let mut all = lock(statuses);
        let st = all
            .entry(policy.name.clone())
            .or_insert_with(|| FollowStatus::new(&follow));
        f(st);
    };
    let mut backoff = Duration::from_secs(1);
    while !stop.load(Ordering::SeqCst) {
        set(&|s| {
            s.running = true;
            s.since = Utc::now();
        });
        let result = ctx.cfg().target(&follow.target).and_then(|t| {
            crate::ops::follow::follow(ctx, policy, t, &opts, stop, &|pass| {
                set(&|s| {
                    s.pass = Some(pass.clone());
                    s.error = None;
                });
            })
        });
        set(&|s| s.running = false);
        match result {
            Ok(f) if f.released => {
                released.store(true, Ordering::SeqCst);
                return;
            }
            Ok(_) => return,
            Err(e) => {
                tracing::error!(policy = %policy.name, target = %follow.target, "the follower stopped: {e}; restarting in {} s", backoff.as_secs());
                let msg = e.to_string();
                set(&|s| {
                    s.restarts += 1;
                    s.error = Some(msg.clone());
                });
                wait_to_restart(stop, &mut backoff);
            }
        }
    }
}

/// Waits `backoff` before a restart (less if `stop` is set meanwhile),
/// then doubles it, to a minute at most.
fn wait_to_restart(stop: &AtomicBool, backoff: &mut Duration) {
    let until = std::time::Instant::now() + *backoff;
    while std::time::Instant::now() < until && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(60));
}

/// Runs a fleet's coordinator until `stop`, each database's follower in
/// `statuses` under its own name; restarts the coordinator after a failure
/// (a follower that fails is restarted by the coordinator itself).
fn supervise_fleet(
    ctx: &Context,
    fleet: &Policy,
    follow: Follow,
    to: std::path::PathBuf,
    stop: &Arc<AtomicBool>,
    statuses: &FollowStatuses,
    released: &AtomicBool,
) {
    let opts = daemon_options(fleet, to);
    let report: Report = {
        let (statuses, follow) = (statuses.clone(), follow.clone());
        Arc::new(move |name: &str, e: Event<'_>| {
            let mut all = lock(&statuses);
            let st = all
                .entry(name.to_string())
                .or_insert_with(|| FollowStatus::new(&follow));
            match e {
                Event::Started => {
                    st.running = true;
                    st.since = Utc::now();
                }
                Event::Pass(p) => {
                    st.pass = Some(p.clone());
                    st.error = None;
                }
                Event::Heard { checked, until } => {
                    if let Some(p) = st.pass.as_mut() {
                        p.checked = p.checked.max(checked);
                        p.source_until = p.source_until.max(until);
                    }
                }
                Event::Stopped(None) => st.running = false,
                Event::Stopped(Some(err)) => {
                    st.running = false;
                    st.restarts += 1;
                    st.error = Some(err.to_string());
                }
            }
        })
    };
    let mut backoff = Duration::from_secs(1);
    while !stop.load(Ordering::SeqCst) {
        let result = ctx.cfg().target(&follow.target).and_then(|t| {
            crate::ops::follow_fleet::follow_fleet(ctx, fleet, t, &opts, stop, Some(report.clone()))
        });
        match result {
            Ok(f) if f.released => {
                released.store(true, Ordering::SeqCst);
                return;
            }
            Ok(_) => return,
            Err(e) => {
                tracing::error!(policy = %fleet.name, target = %follow.target, "the fleet's follower stopped: {e}; restarting in {} s", backoff.as_secs());
                wait_to_restart(stop, &mut backoff);
            }
        }
    }
}

/// What is wrong with a follower, for the verdict of its policy on this host.
pub fn risks(policy: &str, s: &FollowStatus, now: DateTime<Utc>) -> Vec<(Reason, String)> {
    let secs = |t: DateTime<Utc>| (now - t).num_milliseconds().max(0) as f64 / 1000.0;
    let max = s.follow.max_lag.as_secs_f64();
    let mut out = Vec::new();
    if let Some(e) = &s.error {
        out.push((
            Reason::FollowerDown,
            format!(
                "the follower of target '{}' stopped ({} restart(s), retrying): {e}",
                s.follow.target, s.restarts
            ),
        ));
        return out;
    }
    match &s.pass {
        None if secs(s.since) > max => out.push((
            Reason::FollowerBehind,
            format!(
                "the follower of target '{}' has not finished its first copy after {:.0} s (follow.max_lag is {max:.0} s)",
                s.follow.target,
                secs(s.since)
            ),
        )),
        None => {}
        Some(p) if secs(p.checked) > max => out.push((
            Reason::FollowerBehind,
            format!(
                "the copy was last known to hold everything on target '{}' {:.0} s ago (follow.max_lag is {max:.0} s)",
                s.follow.target,
                secs(p.checked)
            ),
        )),
        Some(p) => {
            // A streaming primary sends at least a heartbeat every
            // HEARTBEAT: nothing for longer means it stopped, or is gone.
            // (A fleet's standby hears it through the activity record,
            // which groups heartbeats: up to HEARTBEAT_DELAY later.)
            if let Some(u) = p.source_until
                && secs(u)
                    > (HEARTBEAT + crate::repo::activity::HEARTBEAT_DELAY + s.follow.max_lag)
                        .as_secs_f64()
            {
                out.push((
                    Reason::FollowerBehind,
                    format!(
                        "target '{}' has received nothing from the primary since {} ({:.0} s; a streaming primary sends at least every {} s): if the primary is gone, `dr promote {policy}` here makes this copy the primary",
                        s.follow.target,
                        u.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        secs(u),
                        HEARTBEAT.as_secs()
                    ),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(now: DateTime<Utc>) -> FollowStatus {
        FollowStatus {
            follow: Follow {
                target: "s3".into(),
                to: None,
                poll: Duration::from_secs(1),
                idle_poll: Duration::from_secs(15),
                max_lag: Duration::from_secs(60),
            },
            running: true,
            since: now - chrono::Duration::seconds(600),
            restarts: 0,
            error: None,
            pass: Some(Pass {
                checked: now - chrono::Duration::seconds(5),
                source_until: Some(now - chrono::Duration::seconds(30)),
                last_commit: None,
                transactions: 3,
            }),
        }
    }

    fn reasons(s: &FollowStatus, now: DateTime<Utc>) -> Vec<Reason> {
        risks("app", s, now).into_iter().map(|(r, _)| r).collect()
    }

    #[test]
    fn a_follower_is_down_on_an_error_and_behind_when_stale_or_starved() {
        let now = Utc::now();
        let ok = status(now);
        assert!(reasons(&ok, now).is_empty());

        let mut down = ok.clone();
        down.error = Some("gap".into());
        assert_eq!(reasons(&down, now), vec![Reason::FollowerDown]);

        let mut stale = ok.clone();
        if let Some(p) = stale.pass.as_mut() {
            p.checked = now - chrono::Duration::seconds(61);
        }
        assert_eq!(reasons(&stale, now), vec![Reason::FollowerBehind]);

        // The primary sent nothing, not even a heartbeat, for 6.5 min
        // (a heartbeat every 5, heard up to 30 s late, max_lag 1).
        let mut starved = ok.clone();
        if let Some(p) = starved.pass.as_mut() {
            p.source_until = Some(now - chrono::Duration::seconds(391));
        }
        assert_eq!(reasons(&starved, now), vec![Reason::FollowerBehind]);

        let mut first = ok.clone();
        first.pass = None;
        assert_eq!(reasons(&first, now), vec![Reason::FollowerBehind]);
        first.since = now - chrono::Duration::seconds(10);
        assert!(reasons(&first, now).is_empty());
    }
}
