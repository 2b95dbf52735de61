//! One writer per policy across hosts sharing a bucket.
//!
//! The local lock keeps two runs on one host apart; a lease object
//! `<policy>/lease` on a shared target keeps hosts apart. It is created
//! with `If-None-Match: *`, replaced with `If-Match: <etag>` (to take over an
//! expired one or to renew), and read back after every write: a store that
//! ignores conditional writes (Garage does) can then still be caught when
//! another writer overwrote the lease, and the backup stops before its
//! manifest. On such stores two hosts racing within the same instant can both
//! proceed; each writes only its own labels, so the repository stays valid,
//! but retention may run twice. Point one host at a policy there.

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::{Condition, Storage};

/// How long a lease lasts without renewal; a crashed holder blocks others this long.
pub const TTL_MINUTES: i64 = 60;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    holder: String,
    /// The holder's host name and process: a lease from this host whose
    /// process is gone is stale (a killed run); one whose process lives is
    /// another dr here (another state_dir or config), and it is respected.
    #[serde(default)]
    host: String,
    #[serde(default)]
    pid: u32,
    command: String,
    token: String,
    acquired: DateTime<Utc>,
    expires: DateTime<Utc>,
    /// Released by its holder on an append-only target (where dr deletes
    /// nothing): taking it is no takeover.
    #[serde(default)]
    released: bool,
}

impl Record {
    /// Whether the holder may still be writing, as seen from `host`.
    fn alive(&self, host: &str) -> bool {
        if self.host != host {
            return true; // another host's process cannot be checked: trust the expiry
        }
        self.pid != std::process::id() && crate::scratch::pid_alive(self.pid)
    }
}

/// A held lease. Dropping it releases it (best effort).
#[derive(Debug)]
pub struct Lease<'s> {
    store: &'s dyn Storage,
    key: String,
    record: Record,
    etag: String,
    released: bool,
}

fn key_of(policy: &str) -> String {
    format!("{policy}/lease")
}

fn token() -> String {
    let seed = format!(
        "{}-{}-{:?}",
        crate::lock::hostname(),
        std::process::id(),
        std::time::SystemTime::now()
    );
    blake3::hash(seed.as_bytes()).to_hex()[..32].to_string()
}

impl<'s> Lease<'s> {
    /// Takes the lease of `policy` on a shared target; `Ok(None)` for targets
    /// that say only one writer can reach them.
    /// The caller must hold the local lock of the policy and target.
    pub fn acquire(
        store: &'s dyn Storage,
        policy: &str,
        command: &str,
    ) -> Result<Option<Lease<'s>>> {
        if !store.shared() {
            return Ok(None);
        }
        let key = key_of(policy);
        let now = Utc::now();
        let record = Record {
            holder: format!("{} pid {}", crate::lock::hostname(), std::process::id()),
            host: crate::lock::hostname(),
            pid: std::process::id(),
            command: command.to_string(),
            token: token(),
            acquired: now,
            expires: now + Duration::minutes(TTL_MINUTES),
            released: false,
        };
        let body = serde_json::to_vec_pretty(&record).map_err(|e| Error::Other(e.to_string()))?;
        for _ in 0..3 {
            // Read first: a missing bucket or bad credentials fail here, before any write.
            let cond = match store.get_with_etag(&key)? {
                None => Condition::Absent,
                Some((bytes, etag)) => match serde_json::from_slice::<Record>(&bytes) {
                    Ok(other) if other.expires > Utc::now() && other.alive(&record.host) => {
                        return Err(Error::Busy(format!(
                            "policy '{policy}' on target '{}' is leased by {} ({} since {}, until {}): another dr is writing it; wait, or if that process is gone, delete {key} after checking",
                            store.target(),
                            other.holder,
                            other.command,
                            other.acquired.to_rfc3339_opts(SecondsFormat::Secs, true),
                            other.expires.to_rfc3339_opts(SecondsFormat::Secs, true),
                        )));
                    }
                    Ok(other) if other.released => Condition::Match(etag),
                    _ => {
                        tracing::warn!(
                            target = store.target(),
                            "taking over the expired, stale or unreadable lease {key}"
                        );
                        crate::audit::record(
                            crate::audit::Entry::new("lease_takeover")
                                .policy(policy)
                                .target(store.target())
                                .detail(key.clone()),
                        );
                        Condition::Match(etag)
                    }
                },
            };
            if let Some(etag) = store.put_conditional(&key, &body, &cond)? {
                let mut lease = Lease {
                    store,
                    key: key.clone(),
                    record: record.clone(),
                    etag,
                    released: false,
                };
                lease.confirm()?;
                return Ok(Some(lease));
            }
            // Another writer got there between our read and our write: look again.
        }
        Err(Error::Busy(format!(
            "policy '{policy}' on target '{}': the lease {key} keeps changing hands; try again",
            store.target()
        )))
    }

    /// Reads the lease back and checks it is still this one.
    fn confirm(&mut self) -> Result<()> {
        match self.store.get_with_etag(&self.key)? {
            Some((bytes, etag)) => {
                let theirs: Option<Record> = serde_json::from_slice(&bytes).ok();
                if theirs
                    .as_ref()
                    .is_some_and(|r| r.token == self.record.token)
                {
                    self.etag = etag;
                    Ok(())
                } else {
                    self.released = true;
                    Err(Error::Busy(format!(
                        "lost the lease {} on target '{}' to {}: stopping without committing (the store may ignore conditional writes)",
                        self.key,
                        self.store.target(),
                        theirs
                            .map(|r| r.holder)
                            .unwrap_or_else(|| "an unknown writer".into())
                    )))
                }
            }
            None => {
                self.released = true;
                Err(Error::Busy(format!(
                    "the lease {} on target '{}' disappeared: stopping without committing",
                    self.key,
                    self.store.target()
                )))
            }
        }
    }

    /// Extends the lease and proves it is still held; call before committing.
    /// It is read first: a store that ignores `If-Match` (s3s-fs, Garage)
    /// would otherwise let the renewal overwrite another writer's lease
    /// and the read-back after it find this one.
    pub fn renew(&mut self) -> Result<()> {
        self.confirm()?;
        self.record.expires = Utc::now() + Duration::minutes(TTL_MINUTES);
        let body =
            serde_json::to_vec_pretty(&self.record).map_err(|e| Error::Other(e.to_string()))?;
        match self
            .store
            .put_conditional(&self.key, &body, &Condition::Match(self.etag.clone()))?
        {
            Some(etag) => {
                self.etag = etag;
                self.confirm()
            }
            None => {
                self.released = true;
                Err(Error::Busy(format!(
                    "lost the lease {} on target '{}': another writer took it; stopping without committing",
                    self.key,
                    self.store.target()
                )))
            }
        }
    }
}

/// Releases the lease of `policy` on `store` when this process holds it:
/// at a shutdown that abandons a run still holding it, so the next writer
/// (on this host or another) does not wait for it to expire. Returns
/// whether a lease was released.
pub fn release_if_ours(store: &dyn Storage, policy: &str) -> Result<bool> {
    let key = key_of(policy);
    let Some((bytes, etag)) = store.get_with_etag(&key)? else {
        return Ok(false);
    };
    let Ok(r) = serde_json::from_slice::<Record>(&bytes) else {
        return Ok(false);
    };
    if r.released || r.host != crate::lock::hostname() || r.pid != std::process::id() {
        return Ok(false);
    }
    release(store, &key, r, etag)?;
    Ok(true)
}

/// Gives up a lease known to be ours (`record` as stored, read with
/// `etag`): deleted, or on an append-only target, where dr deletes
/// nothing, left expired and marked released for the next writer.
fn release(store: &dyn Storage, key: &str, mut record: Record, etag: String) -> Result<()> {
    if store.protection() == crate::storage::Protection::AppendOnly {
        record.expires = Utc::now() - Duration::seconds(1);
        record.released = true;
        let b =
            serde_json::to_vec(&record).map_err(|e| crate::error::Error::Other(e.to_string()))?;
        store.put_conditional(key, &b, &Condition::Match(etag))?;
        Ok(())
    } else {
        store.delete(key)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // Release only if it is still ours.
        let Ok(Some((bytes, etag))) = self.store.get_with_etag(&self.key) else {
            return;
        };
        if !serde_json::from_slice::<Record>(&bytes).is_ok_and(|r| r.token == self.record.token) {
            return;
        }
        if let Err(e) = release(self.store, &self.key, self.record.clone(), etag) {
            tracing::warn!("could not release the lease {}: {e}", self.key);
        }
    }
}
