//! The on-disk layout of `state_dir`, spelled once.
//!
//! Everything dr keeps on the host between runs lives here; nothing in it
//! is needed to restore (the targets hold the backups), but losing it costs
//! work: page-index caches mean a diff need not download its full's index,
//! the spool holds WAL not yet shipped, the history says what the daemon
//! ran. Every other module asks this type for a path instead of joining
//! names itself, so the layout can be read (and changed) in one place.

use std::path::{Path, PathBuf};

use crate::repo::Label;

/// The state directory of one configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `locks/`: one flock file per policy and target (see `lock.rs`).
    pub fn locks(&self) -> PathBuf {
        self.root.join("locks")
    }

    /// `tmp/`: scratch files of restore drills (pid-named, swept).
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// `daemon.listen`: the address the running daemon bound (its
    /// `listen` may ask for port 0), read by `dr healthcheck`.
    pub fn daemon_listen(&self) -> PathBuf {
        self.root.join("daemon.listen")
    }

    /// `keys.seen`: the fingerprints the audit log last recorded as
    /// `key_loaded` on this host.
    pub fn keys_seen(&self) -> PathBuf {
        self.root.join("keys.seen")
    }

    /// `host.id`: this state_dir's identity in promotion records (a new
    /// host after a disaster is a new identity, as it should be).
    pub fn host_id(&self) -> PathBuf {
        self.root.join("host.id")
    }

    /// `follow/<policy>.pid`: the running `dr follow` of a policy, which
    /// `dr promote` stops.
    pub fn follow_pid(&self, policy: &str) -> PathBuf {
        self.root.join("follow").join(format!("{policy}.pid"))
    }

    /// `history.db`: the daemon's runs and the CLI's.
    pub fn history_db(&self) -> PathBuf {
        self.root.join("history.db")
    }

    /// `cache/<target>/<policy>/`: page indexes of fulls, to build diffs.
    pub fn page_cache_dir(&self, target: &str, policy: &str) -> PathBuf {
        self.root.join("cache").join(target).join(policy)
    }

    /// The cached page index of one full backup.
    pub fn page_cache(&self, target: &str, policy: &str, label: &Label) -> PathBuf {
        self.page_cache_dir(target, policy)
            .join(format!("{label}.pages"))
    }

    /// `wal/<policy>/`: the streamer's state and spool.
    pub fn wal_dir(&self, policy: &str) -> PathBuf {
        self.root.join("wal").join(policy)
    }

    /// `wal/.alive-<pid>`: the streaming process `pid` is at work (its
    /// mtime is its last beat; idle streams publish nothing themselves).
    pub fn stream_beat(&self, pid: u32) -> PathBuf {
        self.root.join("wal").join(format!(".alive-{pid}"))
    }

    /// `wal/<policy>/state.json`: where the streamer stands.
    pub fn stream_state(&self, policy: &str) -> PathBuf {
        self.wal_dir(policy).join("state.json")
    }

    /// `wal/<policy>/spool/`: sealed segments waiting for their targets.
    pub fn spool(&self, policy: &str) -> PathBuf {
        self.wal_dir(policy).join("spool")
    }

    /// `pg/<policy>/`: pgBackRest's config, lock, log and spool.
    pub fn pg(&self, policy: &str) -> PathBuf {
        self.root.join("pg").join(policy)
    }

    /// `uploads/<target>/`: multipart uploads to abort after a crash.
    pub fn uploads(&self, target: &str) -> PathBuf {
        self.root.join("uploads").join(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_under_the_root() {
        let s = StateDir::new("/var/lib/dr");
        let label: Label = "20261122-072104F".parse().expect("label");
        for p in [
            s.locks(),
            s.tmp(),
            s.history_db(),
            s.page_cache("t", "p", &label),
            s.stream_state("p"),
            s.spool("p"),
            s.pg("p"),
            s.uploads("t"),
        ] {
            assert!(p.starts_with("/var/lib/dr"), "{}", p.display());
        }
        assert_eq!(
            s.page_cache("t", "p", &label),
            Path::new("/var/lib/dr/cache/t/p/20261122-072104F.pages")
        );
    }
}
