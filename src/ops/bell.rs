//! A fleet follower's bell: how the fleet's one coordinator
//! (`ops::follow_fleet`) wakes one of its many followers (`ops::follow`)
//! when the fleet's activity record names its database, when `dr promote`
//! asks for it, or when the process stops, so that an idle follower sleeps
//! without looking at the target or its stop file.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Ring {
    rung: bool,
    governed: bool,
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct Bell {
    ring: Mutex<Ring>,
    cv: Condvar,
}

impl Bell {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the follower (or makes its next wait return at once).
    pub fn ring(&self) {
        self.lock().rung = true;
        self.cv.notify_all();
    }

    /// Whether the coordinator reads the fleet's activity record (then an
    /// idle follower need not look on its own); a change rings.
    pub fn govern(&self, on: bool) {
        let mut r = self.lock();
        if r.governed != on {
            r.governed = on;
            r.rung = true;
            self.cv.notify_all();
        }
    }

    pub fn governed(&self) -> bool {
        self.lock().governed
    }

    /// Sleeps up to `timeout`; whether it was rung (the ring is used up).
    pub fn wait(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut r = self.lock();
        while !r.rung {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            r = match self.cv.wait_timeout(r, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        r.rung = false;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_before_the_wait_is_not_lost_and_is_used_once() {
        let b = std::sync::Arc::new(Bell::default());
        b.ring();
        assert!(b.wait(Duration::from_secs(5)));
        assert!(!b.wait(Duration::from_millis(10)));
        let r = b.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            r.govern(true);
        });
        assert!(b.wait(Duration::from_secs(5)), "governing rings");
        assert!(b.governed());
        t.join().expect("join");
    }
}
