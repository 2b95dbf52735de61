//! The library's error type.
//!
//! Every variant carries what a person needs to act: the object, the target,
//! the file, and what to do. The CLI maps variants to documented exit codes
//! (see README.md, "Exit codes"), so scripts can tell a failed integrity
//! check from a busy lock without parsing text.

use std::path::PathBuf;

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

    /// A backup was written by a newer dr, in a format this one cannot
    /// read: not damage, and not restorable until dr is upgraded.
    #[error("{0}")]
    Newer(String),

    /// A local file operation outside storage failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The command line asks for something that cannot be (a fleet policy
    /// without `--db`, say): exit 64, as for clap's own usage errors.
    #[error("{0}")]
    Usage(String),

    /// A policy's hook failed (`[hooks]`): the message names the hook, its
    /// command and how it failed, with the end of its output.
    #[error("{0}")]
    Hook(String),

    /// Any other failure with a self-explaining message.
    #[error("{0}")]
    Other(String),

    /// The application `dr replicate --exec` ran exited with this status,
    /// which becomes dr's.
    #[error("the application exited with status {0}")]
    Child(i32),

    /// Independent failures of one command (one per policy and target,
    /// each named); the exit code is the most severe of them.
    #[error("{} failed:\n  {}", .0.len(), .0.iter().map(|(w, e)| format!("{w}: {e}")).collect::<Vec<_>>().join("\n  "))]
    Several(Vec<(String, Error)>),
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
            Error::Newer(_) => 8,
            Error::Storage { .. }
            | Error::Source { .. }
            | Error::Io { .. }
            | Error::Hook(_)
            | Error::Other(_) => 1,
            Error::Usage(_) => 64,
            Error::Child(status) => *status,
            Error::Several(all) => all
                .iter()
                .map(|(_, e)| e.exit_code())
                .max_by_key(|&c| severity(c))
                .unwrap_or(1),
        }
    }
}

/// How bad an exit code is, for [`Error::Several`]: damage found (3) first,
/// then a backup only a newer dr reads (8), a restore that cannot give all
/// it was asked (7), a configuration or secret that stops everything (2),
/// any other failure (1), a busy lock (4, retrying helps), a refusal (6),
/// and something not found (5).
pub fn severity(code: i32) -> u8 {
    match code {
        3 => 8,
        8 => 7,
        7 => 6,
        2 => 5,
        1 => 4,
        4 => 3,
        6 => 2,
        5 => 1,
        _ => 0,
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

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.file.display(), l, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// A read that failed in transport (the connection dropped, the body was
/// cut short), not because the bytes were wrong. Backends wrap such errors
/// in it so a restore or verify reports a network failure (exit 1) and not
/// a damaged object (exit 3).
#[derive(Debug)]
pub struct Transport(pub String);

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Transport {}

/// An `io::Error` carrying a [`Transport`] failure.
pub fn transport_error(msg: String) -> std::io::Error {
    std::io::Error::other(Transport(msg))
}

/// The transport failure inside an error from a read chain, if that is what it is.
pub fn transport_cause(e: &std::io::Error) -> Option<&Transport> {
    e.get_ref().and_then(|i| i.downcast_ref::<Transport>())
}
