//! Reading secrets (passphrases, S3 keys, age identities) from files.
//!
//! A secret file that group or others can read is refused: a backup is only
//! as private as its key, and a world-readable key is a finding in every
//! audit. The contents never reach a log line or an error message.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use age::secrecy::SecretString;

use crate::error::{Error, Result, io_reason};

/// What says a secret file changed (inode, size, modification time), so
/// a key rotated by a secret manager (a rename, or Kubernetes' symlink
/// swap) is read again without reading it on every use.
pub type FileStamp = (u64, u64, i64, i64);

/// The [`FileStamp`] of `path`, following symlinks; `None` when it cannot be read.
pub fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// Checks that a file holding a secret is private to its owner.
pub fn check_private(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::Secret {
        path: path.to_path_buf(),
        reason: format!("cannot read secret file: {}", io_reason(&e)),
    })?;
    if !meta.is_file() {
        return Err(Error::Secret {
            path: path.to_path_buf(),
            reason: "is not a regular file".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::Secret {
            path: path.to_path_buf(),
            reason: format!(
                "is readable by group or others (mode {mode:04o}): run `chmod 600 {}`",
                path.display()
            ),
        });
    }
    Ok(())
}

/// Reads a private file's contents as text, for identity files. Every
/// read is in the audit log (the file, never its contents).
pub fn read_private_text(path: &Path) -> Result<String> {
    let r = read_unaudited(path);
    crate::audit::record(
        crate::audit::Entry::new("secret_loaded")
            .detail(path.display().to_string())
            .outcome(&r),
    );
    r
}

fn read_unaudited(path: &Path) -> Result<String> {
    check_private(path)?;
    let mut s = String::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(|e| Error::Secret {
            path: path.to_path_buf(),
            reason: format!("cannot read secret file: {}", io_reason(&e)),
        })?;
    Ok(s)
}

/// Reads a one-line secret (passphrase, key) from a private file, without the trailing newline.
pub fn read_secret(path: &Path) -> Result<SecretString> {
    one_line(path, read_private_text(path)?)
}

/// [`read_secret`] without an audit line: for the metrics token, read at
/// every scrape (its loading at start is audited).
pub fn read_secret_unaudited(path: &Path) -> Result<SecretString> {
    one_line(path, read_unaudited(path)?)
}

fn one_line(path: &Path, text: String) -> Result<SecretString> {
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(Error::Secret {
            path: path.to_path_buf(),
            reason: "the secret file is empty".into(),
        });
    }
    Ok(SecretString::from(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;

    #[test]
    fn open_files_are_refused_with_chmod_hint() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("pass");
        std::fs::write(&p, "hunter2\n").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_secret(&p)
            .expect_err("0644 must be refused")
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains("hunter2"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            read_secret(&p).expect("0600 is fine").expose_secret(),
            "hunter2"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let err = read_secret(Path::new("/nonexistent/dr/pass"))
            .expect_err("missing")
            .to_string();
        assert!(
            err.contains("/nonexistent/dr/pass") && err.contains("no such file"),
            "{err}"
        );
    }
}
