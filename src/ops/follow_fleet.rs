//! `dr follow FLEET`: every database of a fleet policy followed in one
//! process, each by its own follower (`ops::follow`) into one directory.
//! A database the target gains later is picked up at the next look at the
//! fleet's listing; one whose follower stops on an error is named and the
//! others go on. `dr promote FLEET --db NAME` stops one of them (through
//! its stop file: the process runs the others).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::follow::{FollowOptions, Followed, follow};
use crate::config::{Policy, Target};
use crate::context::Context;
use crate::error::{Error, Result};

/// How often the fleet's listing on the target is read for new databases:
/// a listing of every object of the fleet, so not on every look.
const RESCAN: Duration = Duration::from_secs(300);

/// What a fleet's followers did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FleetFollowed {
    pub policy: String,
    pub target: String,
    pub followed: Vec<Followed>,
    /// Databases whose follower stopped on an error: (database, error).
    pub failed: Vec<(String, String)>,
}

/// The fleet's databases `target` holds, each with the place of its copy
/// in `dir` (the file name its source has).
fn stored_members(
    ctx: &Context,
    fleet: &Policy,
    target: &Target,
    dir: &Path,
) -> Result<Vec<(Policy, std::path::PathBuf)>> {
    let Some(f) = &fleet.fleet else {
        return Ok(Vec::new());
    };
    let listing = ctx.storage(target)?.list(&format!("{}/", fleet.name))?;
    Ok(
        crate::fleet::names_in_keys(&fleet.name, listing.iter().map(|o| o.key.as_str()))
            .into_iter()
            .map(|n| {
                let source = f.path_of(&n);
                let copy = dir.join(source.file_name().unwrap_or_default());
                (fleet.member_policy(&n, source), copy)
            })
            .collect(),
    )
}

/// Follows every database of `fleet` on `target` into `opts.to` (a
/// directory) until `stop`.
pub fn follow_fleet(
    ctx: &Context,
    fleet: &Policy,
    target: &Target,
    opts: &FollowOptions,
    stop: &Arc<AtomicBool>,
) -> Result<FleetFollowed> {
    std::fs::create_dir_all(&opts.to)
        .map_err(|e| Error::io(format!("cannot create {}", opts.to.display()), e))?;
    let mut out = FleetFollowed {
        policy: fleet.name.clone(),
        target: target.name.clone(),
        ..Default::default()
    };
    let mut running: BTreeMap<String, JoinHandle<Result<Followed>>> = BTreeMap::new();
    let mut ended: std::collections::BTreeSet<String> = Default::default();
    let mut next_scan = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_scan {
            next_scan = Instant::now() + RESCAN;
            match stored_members(ctx, fleet, target, &opts.to) {
                Ok(members) => {
                    for (m, copy) in members {
                        if running.contains_key(&m.name) || ended.contains(&m.name) {
                            continue;
                        }
                        tracing::info!(policy = %m.name, to = %copy.display(), "following a database of the fleet");
                        let (ctx, target, stop) = (ctx.clone(), target.clone(), stop.clone());
                        let opts = FollowOptions {
                            to: copy,
                            shared_process: true,
                            fleet_member: true,
                            ..opts.clone()
                        };
                        let name = m.name.clone();
                        let handle = std::thread::Builder::new()
                            .name(format!("follow {name}"))
                            .spawn(move || follow(&ctx, &m, &target, &opts, &stop, &|_| {}))
                            .map_err(|e| Error::Other(format!("cannot start a follower: {e}")))?;
                        running.insert(name, handle);
                    }
                }
                Err(e) => {
                    tracing::error!(policy = %fleet.name, target = %target.name, "cannot list the fleet's databases (trying again in {} s): {e}", RESCAN.as_secs());
                }
            }
        }
        let finished: Vec<String> = running
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        for name in finished {
            if let Some(h) = running.remove(&name) {
                collect(&mut out, &name, h);
                ended.insert(name);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for (name, h) in std::mem::take(&mut running) {
        collect(&mut out, &name, h);
    }
    Ok(out)
}

/// One follower's end, in `out` (an error is said when it happens).
fn collect(out: &mut FleetFollowed, name: &str, h: JoinHandle<Result<Followed>>) {
    match h.join() {
        Ok(Ok(f)) => out.followed.push(f),
        Ok(Err(e)) => {
            tracing::error!(policy = %name, "stopped following: {e}");
            out.failed.push((name.to_string(), e.to_string()));
        }
        Err(_) => out
            .failed
            .push((name.to_string(), "the follower panicked".into())),
    }
}
