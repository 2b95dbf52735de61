//! The audit log: one JSON line per action that reads, changes or removes
//! backups, or loads a key, appended to `state_dir/audit.log` (mode 0600,
//! fsynced line by line). It answers "who restored or expired what, when,
//! from where" after the fact. It never holds a secret: files are named by
//! path, keys by fingerprint.
//!
//! The log is per state directory; the process's context sets it
//! ([`set_dir`]) so that every module records through [`record`] without
//! carrying the context. The actions a user asks for (backups, whoever
//! takes them, restores, drills, expiries) go through [`record_checked`]
//! and check [`writable`] before they act: an action whose line cannot be
//! written fails rather than happen unrecorded. The file is opened without
//! following a link, so a link planted at its path cannot redirect it.

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
pub fn record(entry: Entry) {
    if let Err(e) = record_checked(entry) {
        tracing::error!("{e}");
    }
}

/// [`record`], returning the failure instead of logging it: the caller's
/// action fails with it.
pub fn record_checked(mut entry: Entry) -> Result<()> {
    let Some(dir) = DIR.read().ok().and_then(|d| d.clone()) else {
        return Ok(());
    };
    entry.time = Some(Utc::now());
    entry.host = crate::lock::hostname();
    entry.uid = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
    entry.pid = std::process::id();
    entry.command = COMMAND.read().map(|c| c.clone()).unwrap_or_default();
    append(&dir, &entry).map_err(|e| {
        Error::Other(format!(
            "the audit log could not be written, so its '{}' entry is not recorded: {e}; make state_dir/{FILE} a writable regular file",
            entry.action
        ))
    })?;
    WRITTEN.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// Whether a line can be appended now: checked before an action, so that
/// an unwritable log (a full disk, a directory or link at its path) stops
/// the action before it happens.
pub fn writable() -> Result<()> {
    let Some(dir) = DIR.read().ok().and_then(|d| d.clone()) else {
        return Ok(());
    };
    open(&dir).map(drop).map_err(|e| {
        Error::Other(format!(
            "the audit log cannot be written, so dr does not act unrecorded: {e}; make {} a writable regular file",
            dir.join(FILE).display()
        ))
    })
}

/// Opens the log for appending, never through a symbolic link, and only
/// when it is a regular file.
fn open(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join(FILE);
    let err = |e| Error::io(format!("cannot append to {}", path.display()), e);
    std::fs::create_dir_all(dir).map_err(err)?;
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(err)?;
    let meta = f.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(Error::Other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(f)
}

fn append(dir: &Path, entry: &Entry) -> Result<()> {
    let path = dir.join(FILE);
    let err = |e| Error::io(format!("cannot append to {}", path.display()), e);
    let mut line = serde_json::to_vec(entry).map_err(|e| Error::Other(e.to_string()))?;
    line.push(b'\n');
    let mut f = open(dir)?;
    // One write: lines from processes sharing the state directory do not
    // interleave.
    f.write_all(&line).map_err(err)?;
    f.sync_data().map_err(err)
}

/// `text` with every control character written as an escape (`\n`,
/// `\u{1b}`): a value in a line of the text view (a path given to
/// `--to`, an error) can never start a line of its own or drive the
/// terminal.
pub fn escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
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

    #[test]
    fn a_link_or_directory_at_the_path_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let elsewhere = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(FILE)).expect("link");
        let e = Entry {
            time: Some(Utc::now()),
            ..Entry::new("restore")
        };
        assert!(append(dir.path(), &e).is_err());
        assert!(!elsewhere.exists(), "the link was followed");
        let d2 = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(d2.path().join(FILE)).expect("dir");
        assert!(append(d2.path(), &e).is_err());
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("a\nb\x1b[2J"), "a\\nb\\u{1b}[2J");
        assert_eq!(escape("plain é"), "plain é");
    }
}
