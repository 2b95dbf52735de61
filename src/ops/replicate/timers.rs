//! The timer heap: when a stream has a segment to seal, an idle mark or
//! heartbeat to write, a target to retry, or a restart due.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum TimerKind {
    /// The stream's own next due time (only the newest one counts).
    Due,
    /// A change was seen within [`stream::POLL`] of the last look.
    Poll,
    Ship,
    Base,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Timer {
    pub(super) at: Instant,
    pub(super) seq: u64,
    pub(super) kind: TimerKind,
    pub(super) member: String,
}

impl Inner {
    pub(super) fn timer(&self, at: Instant, kind: TimerKind, member: &str) {
        let seq = self.timer_seq.fetch_add(1, Ordering::Relaxed);
        lock(&self.timers).push(Reverse(Timer {
            at,
            seq,
            kind,
            member: member.to_string(),
        }));
    }

    pub(super) fn fire_timers(&self) {
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut timers = lock(&self.timers);
            while timers.peek().is_some_and(|Reverse(t)| t.at <= now) {
                if let Some(Reverse(t)) = timers.pop() {
                    due.push(t);
                }
            }
        }
        for t in due {
            let Some(m) = self.member(&t.member) else {
                continue;
            };
            match t.kind {
                TimerKind::Due => {
                    if *lock(&m.due) == Some(t.at) {
                        self.step(&m);
                    }
                }
                TimerKind::Poll => {
                    m.poll_pending.store(false, Ordering::SeqCst);
                    self.step(&m);
                }
                TimerKind::Ship => self.ship(&m),
                TimerKind::Base => self.io.push(Job::Base(m.clone())),
            }
        }
    }
}
