//! The library's error type.
//!
//! Every variant carries what a person needs to act: the object, the target,
//! the file, and what to do. The CLI maps variants to documented exit codes
//! (see README.md, "Exit codes"), so scripts can tell a failed integrity
//! check from a busy lock without parsing text.

use std::path::PathBuf;

use crate::config::Diagnostic;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in dr, grouped by what the user must do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration has one or more problems; all of them are listed.
    #[error("{}", render_diagnostics(.0))]
    Config(Vec<Diagnostic>),

    /// A secret or key file is missing, unreadable, too open or malformed.
    #[error("{path}: {reason}")]
    Secret { path: PathBuf, reason: String },

    /// Decryption failed: wrong identity or passphrase, or a damaged header.
    #[error("cannot decrypt {object}: {reason}")]
    Decrypt { object: String, reason: String },

    /// A stored object does not match its recorded hashes or is truncated.
    #[error("integrity check failed for {object}: {reason}")]
    Integrity { object: String, reason: String },

    /// A storage operation failed on a target.
    #[error("target '{target}' ({location}): {action} {key}: {reason}")]
    Storage {
        target: String,
        location: String,
        action: &'static str,
        key: String,
        reason: String,
    },

    /// The source database cannot be used as asked.
    #[error("{path}: {reason}")]
    Source { path: PathBuf, reason: String },

    /// Another process holds the lock for this policy and target.
    #[error("{0}")]
    Busy(String),

    /// The thing asked for does not exist (policy, target, backup label).
    #[error("{0}")]
    NotFound(String),

    /// Restore would overwrite an existing file without --force.
    #[error("{0}")]
    Refused(String),

    /// The repository cannot give what was asked without giving less (a WAL
    /// gap before the newest commits); the message says what it can give.
    #[error("{0}")]
    Incomplete(String),

    /// Verification found a problem (the message lists each one).
    #[error("{0}")]
    VerifyFailed(String),

    /// A local file operation outside storage failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// Any other failure with a self-explaining message.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Wraps an I/O error with the file or action it concerns.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The process exit code documented in README.md.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Secret { .. } => 2,
            Error::Integrity { .. } | Error::Decrypt { .. } | Error::VerifyFailed(_) => 3,
            Error::Busy(_) => 4,
            Error::NotFound(_) => 5,
            Error::Refused(_) => 6,
            Error::Incomplete(_) => 7,
            Error::Storage { .. } | Error::Source { .. } | Error::Io { .. } | Error::Other(_) => 1,
        }
    }
}

fn render_diagnostics(d: &[Diagnostic]) -> String {
    let mut out = format!(
        "configuration has {} problem{}:",
        d.len(),
        if d.len() == 1 { "" } else { "s" }
    );
    for item in d {
        out.push_str("\n  ");
        out.push_str(&item.to_string());
    }
    out
}

/// Turns an I/O error into a short human reason, naming the usual causes.
pub fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::StorageFull => {
            "no space left on device (free space or choose another path)".into()
        }
        ErrorKind::PermissionDenied => {
            "permission denied (check the owner and mode of the path)".into()
        }
        ErrorKind::ReadOnlyFilesystem => "read-only file system".into(),
        ErrorKind::NotFound => "no such file or directory".into(),
        ErrorKind::NotADirectory => "a component of the path is not a directory".into(),
        _ => e.to_string(),
    }
}
