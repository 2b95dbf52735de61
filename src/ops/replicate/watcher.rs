//! The inotify watcher on the directories that hold the databases: which
//! `-wal` changed, which fleet directory gained or lost a file.

use super::*;

/// inotify on the directories that hold streamed databases: one watch per
/// directory, however many databases it holds.
pub(super) struct Watcher {
    pub(super) watches: Mutex<inotify::Watches>,
    pub(super) dirs: Arc<Mutex<HashMap<inotify::WatchDescriptor, PathBuf>>>,
    pub(super) watched: Mutex<HashMap<PathBuf, inotify::WatchDescriptor>>,
    /// A directory could not be watched: every stream is polled instead.
    pub(super) degraded: AtomicBool,
}

impl Watcher {
    pub(super) fn start(events: Sender<Event>) -> Option<Watcher> {
        let mut ino = inotify::Inotify::init().ok()?;
        let watches = ino.watches();
        let dirs: Arc<Mutex<HashMap<inotify::WatchDescriptor, PathBuf>>> = Arc::default();
        let seen = dirs.clone();
        std::thread::Builder::new()
            .name("dr-watch".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let evs = match ino.read_events_blocking(&mut buf) {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::error!(
                                "watching the databases failed: {e}; polling every stream instead"
                            );
                            let _ = events.send(Event::Blind);
                            return;
                        }
                    };
                    // One event per file per batch: a busy writer modifies
                    // its WAL thousands of times a second.
                    let mut paths = std::collections::BTreeSet::new();
                    let mut overflow = false;
                    for ev in evs {
                        if ev.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                            overflow = true;
                        } else if let (Some(d), Some(n)) =
                            (lock(&seen).get(&ev.wd).cloned(), ev.name)
                        {
                            paths.insert(d.join(n));
                        }
                    }
                    let mut sent = if overflow {
                        events.send(Event::Overflow)
                    } else {
                        Ok(())
                    };
                    for p in paths {
                        sent = sent.and_then(|()| events.send(Event::Path(p)));
                    }
                    if sent.is_err() {
                        return; // the engine is gone
                    }
                    // Let the kernel merge repeated events meanwhile: a change
                    // is still seen well within stream::POLL.
                    std::thread::sleep(WATCH_BATCH);
                }
            })
            .ok()?;
        Some(Watcher {
            watches: Mutex::new(watches),
            dirs,
            watched: Mutex::new(HashMap::new()),
            degraded: AtomicBool::new(false),
        })
    }

    pub(super) fn watch(&self, dir: &Path) {
        let mut watched = lock(&self.watched);
        if watched.contains_key(dir) {
            return;
        }
        use inotify::WatchMask as W;
        let mask = W::MODIFY | W::CREATE | W::DELETE | W::MOVED_FROM | W::MOVED_TO;
        match lock(&self.watches).add(dir, mask) {
            Ok(wd) => {
                lock(&self.dirs).insert(wd.clone(), dir.to_path_buf());
                watched.insert(dir.to_path_buf(), wd);
            }
            Err(e) => {
                tracing::warn!(
                    "cannot watch {}: {e}; polling every stream instead",
                    dir.display()
                );
                self.degraded.store(true, Ordering::SeqCst);
            }
        }
    }
}
