//! A fleet follower's bell: how the fleet's one coordinator
//! (`ops::follow_fleet`) wakes one of its many followers (`ops::follow`)
//! when the fleet's activity record names its database, when `dr promote`
//! asks for it, or when the process stops, so that an idle follower sleeps
//! without looking at the target or its stop file; and the gate that
//! keeps the followers' first copies from all running at once.

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

/// Bounds how many of a fleet's followers make their first copy (a whole
/// restore each) at once: a thousand at once overwhelm the store (seen at
/// 1,000 databases on S3: reads timed out after 60 s).
#[derive(Debug)]
pub struct Gate {
    free: Mutex<usize>,
    cv: Condvar,
}

/// A place taken in a [`Gate`], given back when dropped.
#[derive(Debug)]
pub struct Entered<'g>(&'g Gate);

impl Gate {
    pub fn new(places: usize) -> Gate {
        Gate {
            free: Mutex::new(places.max(1)),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a place.
    pub fn enter(&self) -> Entered<'_> {
        let mut free = self.lock();
        while *free == 0 {
            free = match self.cv.wait(free) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
        *free -= 1;
        Entered(self)
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        *self.0.lock() += 1;
        self.0.cv.notify_one();
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

    #[test]
    fn a_gate_lets_so_many_in_at_once() {
        let g = std::sync::Arc::new(Gate::new(2));
        let inside = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (g, inside, most) = (g.clone(), inside.clone(), most.clone());
                std::thread::spawn(move || {
                    let _in = g.enter();
                    let n = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    most.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
