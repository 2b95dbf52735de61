//! Continuous WAL streaming of SQLite policies (`dr replicate`, and the
//! daemon): the wiring around `sqlite::stream`. One streamer per policy
//! captures committed frames into the spool (`sqlite::stream::run`); a
//! shipper thread here uploads sealed segments to every target in order,
//! deleting a spooled segment once every target has it; a third thread
//! takes the full backup each new generation starts from. The three share
//! the stream state in memory; the state file is for restarts and for
//! other processes (`dr info`, a `dr backup-*` taken meanwhile).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{PolicyRepo, TargetFilter};
use crate::config::Policy;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::progress::Silent;
use crate::repo::{self, wal as rwal};
use crate::sqlite::stream::{self, Spool, Spooled, StreamReport, StreamState};
use crate::storage::Storage;

/// Longest wait between retries of a target that fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Streams every policy until `stop` is set, then ships what is committed.
pub fn replicate(
    ctx: &Context,
    policies: &[&Policy],
    stop: &Arc<AtomicBool>,
) -> Vec<(String, Result<StreamReport>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = policies
            .iter()
            .map(|p| {
                let stop = stop.clone();
                (
                    p.name.clone(),
                    s.spawn(move || stream_policy(ctx, p, &stop)),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, h)| {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Other("the streamer thread panicked".into())));
                (name, r)
            })
            .collect()
    })
}

/// Streams one policy until `stop` is set (then ships what is committed) or
/// an error stops it.
pub fn stream_policy(ctx: &Context, policy: &Policy, stop: &AtomicBool) -> Result<StreamReport> {
    let crate::config::Source::Sqlite { path: db } = &policy.source else {
        return Err(Error::Refused(format!(
            "policy '{}' is PostgreSQL: its WAL is archived by PostgreSQL through pgBackRest (`dr pg setup`), not streamed by dr",
            policy.name
        )));
    };
    let _lock = crate::lock::Lock::acquire(
        &ctx.state().locks(),
        &policy.name,
        "wal-stream",
        "replicate",
        Duration::ZERO,
    )?;
    let sealing = ctx.sealing(policy)?;
    let targets = TargetFilter::All.select(ctx.cfg(), policy)?;
    let stores: Vec<Arc<dyn Storage>> = targets
        .iter()
        .map(|t| ctx.storage(t))
        .collect::<Result<_>>()?;
    let spool = Spool {
        dir: ctx.state().spool(&policy.name),
    };
    std::fs::create_dir_all(&spool.dir).map_err(|e| {
        Error::io(
            format!("cannot create the spool {}", spool.dir.display()),
            e,
        )
    })?;
    spool.tidy();
    let state_path = ctx.state().stream_state(&policy.name);
    // Only the shipping cursors carry over from an earlier run.
    let state = Arc::new(Mutex::new(
        StreamState::load(&state_path).unwrap_or_default(),
    ));
    let (wake_shipper, wake_rx) = channel();
    let (new_base, base_rx) = channel::<String>();
    let draining = Arc::new(AtomicBool::new(false));

    std::thread::scope(|s| {
        let shipper = {
            let (state, spool, state_path, draining) = (
                state.clone(),
                spool.clone(),
                state_path.clone(),
                draining.clone(),
            );
            let stores = &stores;
            s.spawn(move || {
                ship(
                    policy,
                    stores,
                    &spool,
                    &state,
                    &state_path,
                    &wake_rx,
                    &draining,
                )
            })
        };
        let bases = {
            let draining = draining.clone();
            let state = state.clone();
            s.spawn(move || take_bases(ctx, policy, &state, &base_rx, &draining))
        };
        let result = stream::run(
            policy,
            db,
            sealing,
            spool.clone(),
            &state_path,
            &state,
            stop,
            wake_shipper.clone(),
            new_base,
        );
        draining.store(true, Ordering::SeqCst);
        let _ = wake_shipper.send(());
        let unshipped = shipper.join().unwrap_or(u64::MAX);
        let _ = bases.join();
        // Say it stopped, so lag and `dr info` count from now on.
        if let Ok(mut st) = state.lock() {
            st.stopped = Some(chrono::Utc::now());
            if let Err(e) = st.save(&state_path) {
                tracing::error!(policy = %policy.name, "{e}");
            }
        }
        result.map(|mut r| {
            r.unshipped = unshipped;
            r
        })
    })
}

/// Uploads spooled segments to every target in order until draining and
/// done (or, when draining, until every target has failed once more).
/// Returns how many segments are left unshipped.
fn ship(
    policy: &Policy,
    stores: &[Arc<dyn Storage>],
    spool: &Spool,
    state: &Mutex<StreamState>,
    state_path: &Path,
    wake: &Receiver<()>,
    draining: &AtomicBool,
) -> u64 {
    let mut retry_at: BTreeMap<String, (Instant, Duration)> = BTreeMap::new();
    loop {
        let drain = draining.load(Ordering::SeqCst);
        let segs = spool.list();
        let mut blocked = false;
        for store in stores {
            let t = store.target().to_string();
            if !drain && retry_at.get(&t).is_some_and(|(at, _)| Instant::now() < *at) {
                blocked = true;
                continue;
            }
            let mut cur = state
                .lock()
                .map(|s| s.targets.get(&t).cloned().unwrap_or_default())
                .unwrap_or_default();
            let pending: Vec<&Spooled> = segs.iter().filter(|s| !s.shipped_to(&cur)).collect();
            let mut failed = false;
            for s in &pending {
                let key = rwal::segment_key(&policy.name, &s.generation, &s.name);
                let sent = File::open(&s.path)
                    .map_err(|e| Error::io(format!("cannot read spooled {}", s.path.display()), e))
                    .and_then(|mut f| {
                        let mut w = store.create(&key)?;
                        std::io::copy(&mut f, &mut w).map_err(|e| store.err("write", &key, &e))?;
                        w.commit()
                    });
                match sent {
                    Ok(()) => {
                        cur.generation = s.generation.clone();
                        cur.name = s.name.clone();
                        cur.seq = s.last;
                        cur.until = Some(s.until);
                        cur.error = None;
                        if retry_at.remove(&t).is_some() {
                            tracing::info!(policy = %policy.name, target = %t, "target takes WAL segments again; catching up");
                        }
                    }
                    Err(e) => {
                        let backoff = retry_at
                            .get(&t)
                            .map_or(Duration::from_millis(500), |(_, b)| {
                                (*b * 2).min(MAX_BACKOFF)
                            });
                        tracing::error!(policy = %policy.name, target = %t, "cannot ship WAL segment {key}: {e} (retrying in {:?}; segments wait in the spool)", backoff);
                        cur.error = Some(e.to_string());
                        retry_at.insert(t.clone(), (Instant::now() + backoff, backoff));
                        failed = true;
                        blocked = true;
                        break;
                    }
                }
            }
            cur.pending_since = segs
                .iter()
                .find(|s| !s.shipped_to(&cur) && s.last >= s.first)
                .map(|s| s.first_commit);
            if let Ok(mut st) = state.lock() {
                st.targets.insert(t.clone(), cur);
                if let Err(e) = st.save(state_path) {
                    tracing::error!(policy = %policy.name, "{e}");
                }
            }
            let _ = failed;
        }
        // A segment every target has is done with.
        let done: Vec<&Spooled> = match state.lock() {
            Ok(st) => segs
                .iter()
                .filter(|s| {
                    stores.iter().all(|store| {
                        st.targets
                            .get(store.target())
                            .is_some_and(|c| s.shipped_to(c))
                    })
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        for s in &done {
            let _ = std::fs::remove_file(&s.path);
        }
        let left = (segs.len() - done.len()) as u64;
        if drain {
            // One more pass after the streamer's final seal, then stop
            // unless a target still fails and time remains.
            if left == 0 || (blocked && retry_budget_spent(&retry_at)) {
                return left;
            }
            if !blocked {
                continue;
            }
        }
        let _ = wake.recv_timeout(Duration::from_millis(200));
    }
}

/// While draining, give a failing target a few retries, then leave its
/// segments in the spool for the next run.
fn retry_budget_spent(retry_at: &BTreeMap<String, (Instant, Duration)>) -> bool {
    retry_at.values().any(|(_, b)| *b >= MAX_BACKOFF)
}

/// Takes a full backup of a new generation to every target that has none,
/// retrying failed targets until the streamer stops.
fn take_bases(
    ctx: &Context,
    policy: &Policy,
    state: &Mutex<StreamState>,
    rx: &Receiver<String>,
    draining: &AtomicBool,
) {
    let mut want: Option<String> = None;
    let mut missing: Vec<String> = Vec::new();
    let mut next_try = Instant::now();
    loop {
        if draining.load(Ordering::SeqCst) {
            return;
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(g) => {
                want = Some(g);
                missing = policy.targets.clone();
                next_try = Instant::now();
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            Err(_) => {}
        }
        let Some(g) = want.clone() else { continue };
        if missing.is_empty() || Instant::now() < next_try {
            continue;
        }
        let mut still = Vec::new();
        for name in &missing {
            match base_one(ctx, policy, state, name, &g) {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(policy = %policy.name, target = %name, generation = %g, "full backup for the new generation failed: {e} (retrying in 10 s)");
                    still.push(name.clone());
                }
            }
        }
        missing = still;
        next_try = Instant::now() + Duration::from_secs(10);
    }
}

/// A full backup of `generation` to one target, unless it has one. Its WAL
/// position comes from the streamer's state in memory.
fn base_one(
    ctx: &Context,
    policy: &Policy,
    state: &Mutex<StreamState>,
    target: &str,
    generation: &str,
) -> Result<()> {
    let crate::config::Source::Sqlite { path: db } = &policy.source else {
        return Ok(());
    };
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
    let _lock = super::source::lock(ctx, policy, t, "backup", Duration::from_secs(600))?;
    let r = super::backup::backup(
        ctx,
        policy,
        db,
        t,
        Some(repo::BackupType::Full),
        &Silent,
        Some(state),
    )?;
    tracing::info!(policy = %policy.name, target = %target, label = %r.label, generation, "generation base committed");
    Ok(())
}
