//! The audit log: one JSON line per action that reads, changes or removes
//! backups, or loads a key, appended to `state_dir/audit.log` (mode 0600,
//! fsynced line by line). It answers "who restored or expired what, when,
//! from where" after the fact. It never holds a secret: files are named by
//! path, keys by fingerprint.
//!
//! The log is per state directory; the process's context sets it
//! ([`set_dir`]) so that every module records through [`record`] without
//! carrying the context. A line that cannot be written is an error in
//! dr's own log, never a failed backup.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The file name under the state directory.
pub const FILE: &str = "audit.log";

static DIR: RwLock<Option<PathBuf>> = RwLock::new(None);
static COMMAND: RwLock<String> = RwLock::new(String::new());
/// A line was written since [`take_written`] last asked: there is
/// something to ship.
static WRITTEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether lines were written since the last call.
pub fn take_written() -> bool {
    WRITTEN.swap(false, std::sync::atomic::Ordering::SeqCst)
}

/// Where this process's audit lines go (its state directory).
pub fn set_dir(state_dir: &Path) {
    if let Ok(mut d) = DIR.write() {
        *d = Some(state_dir.to_path_buf());
    }
}

/// The command this process runs (`restore-local`, `daemon`, ...), put on
/// every line.
pub fn set_command(command: &str) {
    if let Ok(mut c) = COMMAND.write() {
        *c = command.to_string();
    }
}

/// One audited action.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub command: String,
    /// What was done: `restore`, `verify`, `expire`, `backup`, `pg_setup`,
    /// `config_reload`, `key_loaded`, `secret_loaded`, `lease_takeover`,
    /// `refused`, `failed`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// `ok`, or what went wrong.
    pub result: String,
    /// What else a reader needs: a destination, a file, a fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Entry {
    pub fn new(action: &str) -> Entry {
        Entry {
            action: action.to_string(),
            result: "ok".into(),
            ..Entry::default()
        }
    }

    pub fn policy(mut self, p: &str) -> Entry {
        self.policy = Some(p.to_string());
        self
    }

    pub fn target(mut self, t: &str) -> Entry {
        self.target = Some(t.to_string());
        self
    }

    pub fn labels(mut self, l: Vec<String>) -> Entry {
        self.labels = l;
        self
    }

    pub fn detail(mut self, d: impl Into<String>) -> Entry {
        self.detail = Some(d.into());
        self
    }

    /// `ok`, or the error's message.
    pub fn outcome<T>(mut self, r: &Result<T>) -> Entry {
        if let Err(e) = r {
            self.result = e.to_string();
        }
        self
    }
}

/// Appends `entry` to the audit log, stamped with time, host, uid, pid and
/// command. Without a state directory (a command that has none) nothing is
/// written.
pub fn record(mut entry: Entry) {
    let Some(dir) = DIR.read().ok().and_then(|d| d.clone()) else {
        return;
    };
    entry.time = Some(Utc::now());
    entry.host = crate::lock::hostname();
    entry.uid = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
    entry.pid = std::process::id();
    entry.command = COMMAND.read().map(|c| c.clone()).unwrap_or_default();
    match append(&dir, &entry) {
        Ok(()) => WRITTEN.store(true, std::sync::atomic::Ordering::SeqCst),
        Err(e) => tracing::error!("the audit log could not be written: {e}"),
    }
}

fn append(dir: &Path, entry: &Entry) -> Result<()> {
    let path = dir.join(FILE);
    let err = |e| Error::io(format!("cannot append to {}", path.display()), e);
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut line = serde_json::to_vec(entry).map_err(|e| Error::Other(e.to_string()))?;
    line.push(b'\n');
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(err)?;
    // One write: lines from processes sharing the state directory do not
    // interleave.
    f.write_all(&line).map_err(err)?;
    f.sync_data().map_err(err)
}

/// The entries of the audit log in `state_dir` at or after `since`, oldest
/// first. A line that is not an entry (a torn write) is skipped and counted.
pub fn read(state_dir: &Path, since: Option<DateTime<Utc>>) -> Result<(Vec<Entry>, usize)> {
    let path = state_dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
    };
    let mut out = Vec::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Entry>(line) {
            Ok(e) if since.is_none_or(|s| e.time.is_some_and(|t| t >= s)) => out.push(e),
            Ok(_) => {}
            Err(_) => bad += 1,
        }
    }
    Ok((out, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_since_filters() {
        let dir = tempfile::tempdir().expect("tmp");
        let e = Entry::new("restore")
            .policy("app")
            .target("s3")
            .labels(vec!["20261203-101010F".into()])
            .detail("to /srv/app.db");
        append(
            dir.path(),
            &Entry {
                time: Some(Utc::now()),
                ..e.clone()
            },
        )
        .expect("append");
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .and_then(|mut f| f.write_all(b"{torn\n"))
            .expect("torn");
        let (all, bad) = read(dir.path(), None).expect("read");
        assert_eq!((all.len(), bad), (1, 1));
        assert_eq!(all[0].labels, e.labels);
        let later = Utc::now() + chrono::Duration::hours(1);
        assert!(read(dir.path(), Some(later)).expect("read").0.is_empty());
        let mode = std::fs::metadata(dir.path().join(FILE))
            .expect("meta")
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }
}
