//! Where stored objects live: one small trait, one implementation per kind.
//!
//! The trait is blocking on purpose: the data path (SQLite page reads, zstd,
//! age, hashing) is CPU-bound blocking work composed of `Read`/`Write`
//! chains, and a blocking writer gives backpressure and constant memory for
//! free. Network backends run their own async client underneath and expose
//! the same blocking surface; the daemon calls operations on blocking threads.

pub mod local;
#[cfg(test)]
pub(crate) mod memory;
pub mod s3;

use chrono::{DateTime, Utc};
use std::io::{Read, Write};

use std::path::PathBuf;

use crate::error::{Error, Result};

pub use crate::repo::ObjectMeta;

/// The kinds of storage a target can be.
#[derive(Debug, Clone)]
pub enum TargetKind {
    Local {
        path: PathBuf,
    },
    /// Boxed: its settings are ten times the size of a local target's.
    S3(Box<s3::S3Settings>),
}

impl TargetKind {
    /// The `kind` word users write in the config.
    pub fn word(&self) -> &'static str {
        match self {
            TargetKind::Local { .. } => "local",
            TargetKind::S3(_) => "s3",
        }
    }
}

/// An object being written. Dropping it without `commit` abandons it: a
/// reader never sees a partial object under the final key.
pub trait ObjectWriter: Write + Send {
    /// Makes the object durable and visible under its key.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// The precondition of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Create only: `If-None-Match: *`.
    Absent,
    /// Replace only this version: `If-Match: <etag>`.
    Match(String),
}

/// A small object read only when it changed (`Storage::get_if_changed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    Absent,
    /// Its ETag is still the one the reader had.
    Unchanged,
    /// Its bytes and ETag.
    Changed(Vec<u8>, String),
}

/// What a target does not let dr delete, so that a host that is taken
/// over cannot erase its backups with dr's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    None,
    /// `append_only = true`: dr never sends a delete to this target; the
    /// store's lifecycle rules, or a host holding other credentials, expire.
    AppendOnly,
    /// `object_lock`: every backup and WAL object dr writes is under S3
    /// Object Lock for `days` after it was written.
    Locked {
        days: u32,
        compliance: bool,
    },
}

impl Protection {
    /// Until when an object written at `modified` may not be deleted, if
    /// it may not be now; `None`: it may be.
    pub fn held_until(self, modified: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Protection::None => None,
            Protection::AppendOnly => Some(DateTime::<Utc>::MAX_UTC),
            Protection::Locked { days, .. } => {
                let until = modified + chrono::Duration::days(i64::from(days));
                (until > now).then_some(until)
            }
        }
    }
}

/// A backup target's object store.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// The target's name in the config, for messages.
    fn target(&self) -> &str;
    /// Where it is (a path or `s3://bucket/prefix`), for messages.
    fn location(&self) -> String;
    /// Starts writing an object.
    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>>;
    /// Opens an object for reading; a missing object is `Error::NotFound`.
    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>>;
    /// Reads `len` bytes of an object from `offset` (S3: one ranged GET),
    /// for what reads a part of an object: a sample of a backup's frames.
    fn open_range(&self, key: &str, offset: u64, len: u64) -> Result<Box<dyn Read + Send>> {
        let mut r = self.open(key)?;
        std::io::copy(&mut (&mut r).take(offset), &mut std::io::sink())
            .map_err(|e| self.err("read", key, &e))?;
        Ok(Box::new(r.take(len)))
    }
    /// Every object whose key starts with `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Removes an object; removing a missing object is not an error.
    fn delete(&self, key: &str) -> Result<()>;

    /// Every object under `prefix` whose key sorts after `after`, sorted:
    /// what a follower asks on every poll, so that its cost does not grow
    /// with what it has already seen (S3: one request with `StartAfter`).
    fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<ObjectMeta>> {
        let mut all = self.list(prefix)?;
        all.retain(|o| o.key.as_str() > after);
        Ok(all)
    }

    /// Cleans up writes under `prefix` that a crashed or cut-off run left
    /// behind on the backend (S3: multipart uploads never completed): the
    /// ones this host recorded, and any the store lists that were started
    /// before `older_than` (a run killed before it could record its
    /// upload, or one on a lost host). The caller holds the policy's lock.
    /// Returns how many were cleaned.
    fn clean_abandoned(
        &self,
        prefix: &str,
        older_than: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize> {
        let _ = (prefix, older_than);
        Ok(0)
    }

    /// Writes a small object only if `cond` holds: absent, or its ETag
    /// matches. Returns the new ETag, or `None` when the condition failed.
    /// Backends without conditional writes return `Ok(None)` from
    /// `supports_conditional` and are not asked.
    fn put_conditional(&self, key: &str, bytes: &[u8], cond: &Condition) -> Result<Option<String>> {
        let _ = (key, bytes, cond);
        Err(Error::Other(format!(
            "target '{}' does not support conditional writes",
            self.target()
        )))
    }

    /// A small object with its ETag, or `None` when it does not exist.
    fn get_with_etag(&self, key: &str) -> Result<Option<(Vec<u8>, String)>> {
        let _ = key;
        Ok(None)
    }

    /// A small object unless its ETag is still `etag`: what a fleet's
    /// standby asks of the fleet's activity record on every look (S3:
    /// `If-None-Match`, answered `304` without a body).
    fn get_if_changed(&self, key: &str, etag: Option<&str>) -> Result<Fetched> {
        Ok(match self.get_with_etag(key)? {
            None => Fetched::Absent,
            Some((_, e)) if Some(e.as_str()) == etag => Fetched::Unchanged,
            Some((bytes, e)) => Fetched::Changed(bytes, e),
        })
    }

    /// Keys under `prefix` whose newest version is a delete marker while an
    /// older version still exists (a versioned or Object-Locked bucket): a
    /// plain listing hides them, yet they were written and may be locked.
    /// Targets without versions hide nothing.
    fn hidden(&self, prefix: &str) -> Result<Vec<String>> {
        let _ = prefix;
        Ok(Vec::new())
    }

    /// Whether several hosts may write this target, so that a lease object is needed.
    fn shared(&self) -> bool {
        false
    }

    /// What the target keeps dr from deleting.
    fn protection(&self) -> Protection {
        Protection::None
    }

    /// Writes a small object in one go.
    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let mut w = self.create(key)?;
        w.write_all(bytes).map_err(|e| self.err("write", key, &e))?;
        w.commit()
    }

    /// Reads a small object whole.
    fn get_bytes(&self, key: &str) -> Result<Vec<u8>> {
        let mut r = self.open(key)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)
            .map_err(|e| self.err("read", key, &e))?;
        Ok(out)
    }

    /// A storage error naming this target, its location and the key.
    fn err(&self, action: &'static str, key: &str, e: &std::io::Error) -> Error {
        Error::Storage {
            target: self.target().to_string(),
            location: self.location(),
            action,
            key: key.to_string(),
            reason: crate::error::io_reason(e),
        }
    }
}

/// Opens the storage behind a target named `name`. `journal` is where a
/// backend remembers what it must clean up across runs (S3: multipart
/// uploads to abort); `rt` runs network clients, shared by every target.
pub fn open(
    name: &str,
    kind: &TargetKind,
    journal: &std::path::Path,
    rt: &std::sync::Arc<tokio::runtime::Runtime>,
) -> Result<std::sync::Arc<dyn Storage>> {
    match kind {
        TargetKind::Local { path } => Ok(std::sync::Arc::new(local::LocalStorage::new(name, path))),
        TargetKind::S3(s3) => Ok(std::sync::Arc::new(s3::S3Storage::connect(
            name,
            s3,
            journal,
            rt.clone(),
        )?)),
    }
}
