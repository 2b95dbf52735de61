//! Bases and diffs: the full backup a new generation starts from (taken
//! again when the WAL restarted under it) and the diffs `wal.diff_after`
//! asks for, recorded in the run history like any backup.

use super::*;

impl Inner {
    /// Takes the full backup a new generation starts from on every target
    /// that lacks one. Returns whether a target still lacks it.
    pub(super) fn base_pass(&self, m: &Member) -> bool {
        let Some((generation, missing)) = lock(&m.base).clone() else {
            return false;
        };
        if m.stopping.load(Ordering::SeqCst) {
            return false;
        }
        let mut still = Vec::new();
        for t in &missing {
            match base_one(&m.ctx, &m.policy, &m.db, &m.state, t, &generation) {
                Ok(()) => {
                    // A fleet's standby waiting for this base hears of it.
                    if let Some(f) = &m.policy.member
                        && let Ok(store) = m.ctx.cfg().target(t).and_then(|t| m.ctx.storage(t))
                    {
                        self.activities.note(
                            &store,
                            &f.policy,
                            &f.db,
                            crate::repo::activity::Note {
                                changed: true,
                                until: None,
                            },
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(policy = %m.policy.name, target = %t, generation = %generation, "full backup for the new generation failed: {e} (retrying in {} s)", BASE_RETRY.as_secs());
                    still.push(t.clone());
                }
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
    pub(super) fn diff_due(&self, m: &Member, stream: &Stream) -> bool {
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
    pub(super) fn diff_pass(&self, m: &Member) {
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
}

/// A full backup of `generation` to one target, unless it has one. Its WAL
/// position comes from the streamer's state in memory.
pub(super) fn base_one(
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
pub(super) fn streamer_backup(
    ctx: &Context,
    policy: &Policy,
    db: &Path,
    state: &Mutex<StreamState>,
    target: &str,
    kind: repo::BackupType,
    trigger: &'static str,
) -> Result<String> {
    let t = ctx.cfg().target(target)?;
    let _lock = crate::ops::source::lock(ctx, policy, t, "backup", Duration::from_secs(600))?;
    crate::audit::writable()?;
    let started = chrono::Utc::now();
    let r = crate::ops::backup::backup(
        ctx,
        policy,
        db,
        t,
        Some(kind),
        &Silent,
        Some(crate::ops::backup::ByStreamer { state, trigger }),
    );
    // And recorded in the run history as any other: a policy's base
    // backup is a restore point the verdict counts from the moment it is
    // committed, not only once WAL after it has been shipped.
    record_run(ctx, policy, target, kind, started, &r);
    // The streamer's own backups are audited as any other, with why.
    let r = crate::ops::source::audit(
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
pub(super) fn record_run(
    ctx: &Context,
    policy: &Policy,
    target: &str,
    kind: repo::BackupType,
    started: chrono::DateTime<chrono::Utc>,
    r: &Result<crate::ops::report::BackupReport>,
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
