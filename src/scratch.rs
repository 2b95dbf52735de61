//! Temporary files that hold decrypted data (a restore in progress, a
//! verify drill's scratch database) and the processes behind files.
//!
//! A temporary's name carries the pid of the process that made it, so the
//! next run can tell a file whose maker was killed (remove it: nothing
//! plaintext is left behind for long) from one a live run is still writing.

use std::path::{Path, PathBuf};

/// Whether a process with this pid exists on this host.
pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && Path::new("/proc").join(pid.to_string()).exists()
}

/// The name prefix of this process's temporaries of kind `prefix`.
pub fn prefix_for(prefix: &str) -> String {
    format!("{prefix}{}.", std::process::id())
}

/// Removes the temporaries named `prefix<pid>.…` in `dir` whose process is
/// gone (or whose name carries no pid, as older versions of dr wrote them).
/// Returns what was removed, for the log.
pub fn sweep(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid = rest
            .split('.')
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0);
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        if e.file_type().is_ok_and(|t| t.is_file()) && std::fs::remove_file(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    if !removed.is_empty() {
        tracing::warn!(
            "removed {} temporary file(s) left by a dr run that was killed: {}",
            removed.len(),
            removed
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    removed
}

/// Processes other than this one that have `path` open, as (pid, command).
/// Linux only (reads /proc); elsewhere, and for processes this user may not
/// inspect, it finds nothing.
pub fn opened_by_others(path: &Path) -> Vec<(u32, String)> {
    let Ok(want) = std::fs::canonicalize(path) else {
        return Vec::new();
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == want))
        {
            let comm = std::fs::read_to_string(p.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default();
            out.push((pid, comm));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_only_what_dead_processes_left() {
        let dir = tempfile::tempdir().expect("tmp");
        let dead = dir.path().join(".a.db.dr-restore.999999999.x");
        let mine = dir
            .path()
            .join(format!(".a.db.dr-restore.{}.y", std::process::id()));
        let other = dir.path().join(".b.db.dr-restore.999999999.x");
        for f in [&dead, &mine, &other] {
            std::fs::write(f, b"plain").expect("write");
        }
        let removed = sweep(dir.path(), ".a.db.dr-restore.");
        assert_eq!(removed, vec![dead.clone()]);
        assert!(!dead.exists() && mine.exists() && other.exists());
    }

    #[test]
    fn finds_a_process_holding_a_file_open() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("db");
        std::fs::write(&f, b"x").expect("write");
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3<\"$0\"; sleep 30")
            .arg(&f)
            .spawn()
            .expect("sh");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut seen = Vec::new();
        while seen.is_empty() && std::time::Instant::now() < deadline {
            seen = opened_by_others(&f);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(seen.iter().any(|(pid, _)| *pid == child.id()), "{seen:?}");
    }
}
