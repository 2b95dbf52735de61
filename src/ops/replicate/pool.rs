//! The two fixed pools of the streaming engine: capture (copying committed
//! frames into the spool) and I/O (shipping, bases, diffs). A job names a
//! member; nothing runs per database while it is idle.

use super::*;

/// A job for a pool.
pub(super) enum Job {
    Step(Arc<Member>),
    Ship(Arc<Member>),
    Base(Arc<Member>),
    /// The WAL since the newest backup passed `wal.diff_after`.
    Diff(Arc<Member>),
    /// Ship what is left after the stream stopped, then the member is done.
    Drain(Arc<Member>),
}

#[derive(Default)]
pub(super) struct Pool {
    pub(super) queue: Mutex<VecDeque<Job>>,
    pub(super) ready: Condvar,
    pub(super) closed: AtomicBool,
}

impl Pool {
    pub(super) fn push(&self, job: Job) {
        lock(&self.queue).push_back(job);
        self.ready.notify_one();
    }

    pub(super) fn next(&self) -> Option<Job> {
        let mut q = lock(&self.queue);
        loop {
            if let Some(j) = q.pop_front() {
                return Some(j);
            }
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            q = self
                .ready
                .wait_timeout(q, Duration::from_secs(1))
                .map(|(q, _)| q)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.ready.notify_all();
    }
}
