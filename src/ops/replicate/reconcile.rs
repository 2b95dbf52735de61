//! Which streams run: the configured policies, fleets expanded as their
//! files come and go; a changed policy restarts its stream.

use super::*;

impl Inner {
    /// Makes the members those the policies stand for now: new databases
    /// start, removed or changed ones stop.
    pub(super) fn reconcile(self: &Arc<Self>) {
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
}
