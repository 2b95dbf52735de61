//! One writer per policy and target on this host.
//!
//! The lock is an advisory `flock` on a file in `state_dir/locks/`. The
//! kernel drops it when the holder exits, however it exits, so a lock left
//! by a killed process is recovered by simply taking it. The file also says
//! who holds it, so a refused run can name the holder.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A held lock; released on drop.
#[derive(Debug)]
pub struct Lock {
    file: File,
}

impl Lock {
    /// Takes the lock for `policy` on `target` in `dir` (the state
    /// directory's `locks/`), waiting up to `wait`.
    pub fn acquire(
        dir: &Path,
        policy: &str,
        target: &str,
        what: &str,
        wait: Duration,
    ) -> Result<Lock> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::io(
                format!("cannot create the lock directory {}", dir.display()),
                e,
            )
        })?;
        let path = dir.join(format!("{policy}.{target}.lock"));
        // A fleet's database (`tenants/alice`) locks under its policy's directory.
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::io(
                    format!("cannot create the lock directory {}", parent.display()),
                    e,
                )
            })?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open lock file {}", path.display()), e))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    if Instant::now() >= deadline {
                        let mut holder = String::new();
                        let _ = file.read_to_string(&mut holder);
                        let holder = holder.trim();
                        return Err(Error::Busy(format!(
                            "policy '{policy}' on target '{target}' is locked by another dr ({}): wait for it to finish, or pass --wait SECONDS",
                            if holder.is_empty() {
                                "holder unknown"
                            } else {
                                holder
                            }
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(TryLockError::Error(e)) => {
                    return Err(Error::io(format!("cannot lock {}", path.display()), e));
                }
            }
        }
        let info = format!(
            "pid {} on {}, {what} since {}",
            std::process::id(),
            hostname(),
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = file.write_all(info.as_bytes());
        let _ = file.flush();
        Ok(Lock { file })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

/// This host's name, for lock and lease holders.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_holder_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = Lock::acquire(dir.path(), "app", "local", "backup-local", Duration::ZERO)
            .expect("first");
        let err = Lock::acquire(
            dir.path(),
            "app",
            "local",
            "backup-local",
            Duration::from_millis(200),
        )
        .expect_err("second must wait then fail")
        .to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains("backup-local since"), "{err}");
        drop(a);
        Lock::acquire(dir.path(), "app", "local", "backup-local", Duration::ZERO)
            .expect("free again");
    }
}
