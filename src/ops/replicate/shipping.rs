//! Shipping: sealed segments to every target, in order, each target at
//! its own pace with its own backoff; draining what is committed when a
//! stream stops.

use super::*;

/// Shipping state of one stream.
pub(super) struct Shipping {
    pub(super) stores: Vec<Arc<dyn Storage>>,
    pub(super) retry_at: BTreeMap<String, (Instant, Duration)>,
    /// Targets whose promotion records could not be read yet (down when
    /// the stream started): checked before the first segment goes there.
    pub(super) unfenced: std::collections::BTreeSet<String>,
}

impl Inner {
    /// One shipping pass: every sealed segment to every target, in order.
    /// Returns how many segments are left, and when to retry a target
    /// that failed (unless `drain`, which tries every target now).
    pub(super) fn ship_pass(&self, m: &Member, drain: bool) -> (u64, Option<Instant>) {
        let mut guard = lock(&m.shipping);
        let Some(sh) = guard.as_mut() else {
            return (m.spool.list().len() as u64, None);
        };
        let policy = &m.policy;
        let segs = m.spool.list();
        let mut retry: Option<Instant> = None;
        for store in &sh.stores {
            let t = store.target().to_string();
            if let Some((at, _)) = sh.retry_at.get(&t)
                && !drain
                && Instant::now() < *at
            {
                retry = Some(retry.map_or(*at, |r| r.min(*at)));
                continue;
            }
            let mut cur = lock(&m.state).targets.get(&t).cloned().unwrap_or_default();
            let mut pending: Vec<&Spooled> = segs.iter().filter(|s| !s.shipped_to(&cur)).collect();
            if !pending.is_empty() && sh.unfenced.contains(&t) {
                match crate::ops::promotion::fence(&m.ctx, policy, store.as_ref()) {
                    Ok(()) => {
                        sh.unfenced.remove(&t);
                    }
                    Err(e @ Error::Refused(_)) => {
                        // Fenced: nothing goes there; the error shows in the
                        // stream's state and status.
                        tracing::error!(policy = %policy.name, target = %t, "{e}");
                        cur.error = Some(e.to_string());
                        pending.clear();
                        let at = Instant::now() + MAX_SHIP_BACKOFF;
                        sh.retry_at.insert(t.clone(), (at, MAX_SHIP_BACKOFF));
                        retry = Some(retry.map_or(at, |r| r.min(at)));
                    }
                    // Still unreadable: the segments go as before (a flaky
                    // listing must not hold the WAL back); the records are
                    // read again on the next pass.
                    Err(e) => {
                        tracing::debug!(policy = %policy.name, target = %t, "promotion records not read yet: {e}");
                    }
                }
            }
            let put = |path: &Path, key: &str| {
                File::open(path)
                    .map_err(|e| Error::io(format!("cannot read spooled {}", path.display()), e))
                    .and_then(|mut f| {
                        let mut w = store.create(key)?;
                        std::io::copy(&mut f, &mut w).map_err(|e| store.err("write", key, &e))?;
                        w.commit()
                    })
            };
            let mut landed: Option<crate::repo::activity::Note> = None;
            for s in pending {
                let key = rwal::segment_key(&policy.name, &s.generation, &s.name);
                // The keys record first: no segment is stored without it.
                let sent = match &s.keys {
                    Some(record) => put(
                        record,
                        &rwal::keys_record_key(&policy.name, &s.generation, &s.name),
                    ),
                    None => Ok(()),
                }
                .and_then(|()| put(&s.path, &key));
                match sent {
                    Ok(()) => {
                        cur.generation = s.generation.clone();
                        cur.name = s.name.clone();
                        cur.seq = s.last;
                        cur.until = Some(s.until);
                        cur.error = None;
                        // A segment with no frames is a heartbeat.
                        landed
                            .get_or_insert_default()
                            .merge(crate::repo::activity::Note {
                                changed: s.last >= s.first,
                                until: (s.last < s.first).then_some(s.until),
                            });
                        if sh.retry_at.remove(&t).is_some() {
                            tracing::info!(policy = %policy.name, target = %t, "target takes WAL segments again; catching up");
                        }
                    }
                    Err(e) => {
                        let backoff = sh
                            .retry_at
                            .get(&t)
                            .map_or(Duration::from_millis(500), |(_, b)| {
                                (*b * 2).min(MAX_SHIP_BACKOFF)
                            });
                        tracing::error!(policy = %policy.name, target = %t, "cannot ship WAL segment {key}: {e} (retrying in {:?}; segments wait in the spool)", backoff);
                        cur.error = Some(e.to_string());
                        let at = Instant::now() + backoff;
                        sh.retry_at.insert(t.clone(), (at, backoff));
                        retry = Some(retry.map_or(at, |r| r.min(at)));
                        break;
                    }
                }
            }
            if let (Some(note), Some(f)) = (landed, &policy.member) {
                self.activities.note(store, &f.policy, &f.db, note);
            }
            cur.pending_since = segs
                .iter()
                .find(|s| !s.shipped_to(&cur) && s.last >= s.first)
                .map(|s| s.first_commit);
            lock(&m.state).targets.insert(t.clone(), cur);
        }
        // A segment every target has is done with. The state file is
        // written once a pass, with every target's cursor and what is left
        // in the spool (for `dr info` and /metrics: an idle stream
        // publishes nothing itself), before the spool lets go of anything.
        // Creating that file is most of a busy fleet's shipping cost: it
        // was written once per target and once more for the spool.
        let done: Vec<&Spooled> = {
            let mut st = lock(&m.state);
            let done: Vec<&Spooled> = segs
                .iter()
                .filter(|s| {
                    sh.stores.iter().all(|store| {
                        st.targets
                            .get(store.target())
                            .is_some_and(|c| s.shipped_to(c))
                    })
                })
                .collect();
            if !done.is_empty() {
                let left: u64 = segs.iter().map(|s| s.size).sum::<u64>()
                    - done.iter().map(|s| s.size).sum::<u64>();
                st.spool_bytes = left;
                st.spool_full = left >= policy.wal.spool_max;
            }
            if let Err(e) = st.save_relaxed(&m.state_path) {
                tracing::error!(policy = %policy.name, "{e}");
            }
            done
        };
        for s in &done {
            if let Some(record) = &s.keys {
                let _ = std::fs::remove_file(record);
            }
            let _ = std::fs::remove_file(&s.path);
        }
        ((segs.len() - done.len()) as u64, retry)
    }

    /// After the stream stopped: ship what is left, giving a failing target
    /// a few retries, then leave its segments in the spool for the next run.
    pub(super) fn drain(&self, m: &Member) {
        let unshipped = loop {
            let (left, _) = self.ship_pass(m, true);
            let spent = lock(&m.shipping)
                .as_ref()
                .is_none_or(|s| s.retry_at.values().any(|(_, b)| *b >= MAX_SHIP_BACKOFF));
            if left == 0 || spent {
                break left;
            }
            let wait = lock(&m.shipping)
                .as_ref()
                .and_then(|s| s.retry_at.values().map(|(_, b)| *b).max())
                .unwrap_or(Duration::from_millis(200));
            std::thread::sleep(wait.min(MAX_SHIP_BACKOFF));
        };
        {
            let mut st = lock(&m.state);
            st.stopped = Some(Utc::now());
            if let Err(e) = st.save(&m.state_path) {
                tracing::error!(policy = %m.policy.name, "{e}");
            }
        }
        let mut report = lock(&m.report).clone();
        report.unshipped = unshipped;
        let result = match lock(&m.result).take() {
            Some(Err(e)) => Err(e),
            _ => Ok(report),
        };
        if unshipped > 0 && self.mode == Mode::Supervised {
            tracing::error!(policy = %m.policy.name, "{unshipped} WAL segment(s) could not be shipped and stay in the spool; they ship when the streamer runs again");
        }
        self.record(&m.policy.name, result);
        m.finished.store(true, Ordering::SeqCst);
        // Its successor (a changed policy) can start now.
        self.rescan.store(true, Ordering::SeqCst);
        let _ = self.events.send(Event::Wake);
    }

    /// Stops every member and waits until each has shipped what it could.
    pub(super) fn drain_all(&self) {
        let members: Vec<Arc<Member>> = lock(&self.members).values().cloned().collect();
        for m in &members {
            m.stopping.store(true, Ordering::SeqCst);
            self.step(m);
        }
        while !members.iter().all(|m| m.finished.load(Ordering::SeqCst)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
