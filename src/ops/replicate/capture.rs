//! Capture: copying a stream's committed frames into its spool
//! (`sqlite::stream`), opening a stream (fenced, locked, its generation
//! chosen) and restarting one that failed, with backoff.

use super::*;

/// Where a stream's capture stands.
pub(super) enum Capture {
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

impl Inner {
    /// One step of a stream's capture, through its states.
    pub(super) fn capture_step(self: &Arc<Self>, m: &Arc<Member>) {
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
    pub(super) fn restart(&self, m: &Member, cap: &mut Capture, why: String) {
        tracing::warn!(policy = %m.policy.name, "{why}: starting a new generation");
        *cap = Capture::Closed {
            first: false,
            why: Some(why),
        };
    }

    /// A stream failed: say so, mark its state stopped (its lag grows), and
    /// open it again later, or (a single-database policy under `dr
    /// replicate`, or a database gone from its fleet) end it.
    pub(super) fn failed(&self, m: &Arc<Member>, e: Error, started: Option<Instant>) -> Capture {
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
    pub(super) fn open(
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
                    match crate::ops::promotion::fence(ctx, policy, store.as_ref()) {
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
}
