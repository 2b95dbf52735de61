//! What an S3 target asks of each upload: a storage class (backups and WAL
//! each their own), server-side encryption (SSE-S3 or SSE-KMS with a key),
//! and a rate limit shared by every upload to the target (backups, WAL,
//! audit, leases) in this process.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_sdk_s3::types::{ServerSideEncryption, StorageClass};

/// A target's upload settings (`[targets.X]` `storage_class`,
/// `wal_storage_class`, `sse`, `kms_key_id`, `max_upload_rate`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upload {
    /// For backup objects (`<policy>/backup/…`); the bucket's default when unset.
    pub storage_class: Option<String>,
    /// For WAL segments (`<policy>/wal/…`); `storage_class` when unset.
    pub wal_storage_class: Option<String>,
    pub sse: Option<Sse>,
    /// Bytes a second, over every upload to the target.
    pub max_upload_rate: Option<u64>,
}

/// Server-side encryption, on top of dr's own (age).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    /// `sse = "AES256"`: keys the provider manages (SSE-S3).
    S3,
    /// `sse = "aws:kms"`, with `kms_key_id` or the account's default key.
    Kms { key_id: Option<String> },
}

/// Storage classes whose objects cannot be read without a restore request
/// first: dr lists and reads its manifests and segments at every command,
/// and a drill or restore would fail.
pub const UNREADABLE_CLASSES: [&str; 2] = ["GLACIER", "DEEP_ARCHIVE"];

impl Upload {
    /// The storage class of the object at `key` (relative to the prefix):
    /// backups and WAL segments get theirs; everything else (leases,
    /// records, the audit log: small and rewritten) the bucket's default,
    /// so no minimum storage duration is charged for them.
    pub fn storage_class(&self, key: &str) -> Option<StorageClass> {
        let parts: Vec<&str> = key.rsplit('/').collect();
        let class = match parts.get(2).copied() {
            Some("backup") => self.storage_class.as_ref(),
            Some("wal") => self
                .wal_storage_class
                .as_ref()
                .or(self.storage_class.as_ref()),
            _ => None,
        };
        class.map(|c| StorageClass::from(c.as_str()))
    }

    pub fn sse(&self) -> Option<ServerSideEncryption> {
        self.sse.as_ref().map(|s| match s {
            Sse::S3 => ServerSideEncryption::Aes256,
            Sse::Kms { .. } => ServerSideEncryption::AwsKms,
        })
    }

    pub fn kms_key_id(&self) -> Option<String> {
        match &self.sse {
            Some(Sse::Kms { key_id }) => key_id.clone(),
            _ => None,
        }
    }
}

/// The rate limit: uploads reserve their bytes in turn; each starts when
/// the bytes before it are paid for and returns when its own are, so the
/// bytes sent over any stretch longer than one upload stay under the rate,
/// whatever the number of uploads in flight.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_second: f64,
    /// When the bytes reserved so far are paid for.
    paid_until: Mutex<Instant>,
}

impl Throttle {
    pub fn new(bytes_per_second: u64) -> Throttle {
        Throttle {
            bytes_per_second: bytes_per_second.max(1) as f64,
            paid_until: Mutex::new(Instant::now()),
        }
    }

    /// Reserves `bytes`: (when they may start, when they are paid for).
    pub fn reserve(&self, bytes: usize, now: Instant) -> (Instant, Instant) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second);
        let mut paid = self
            .paid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = (*paid).max(now);
        *paid = start + cost;
        (start, *paid)
    }

    /// Runs the upload `send` of `bytes` within the rate.
    pub async fn paced<T>(&self, bytes: usize, send: impl std::future::Future<Output = T>) -> T {
        let (start, paid) = self.reserve(bytes, Instant::now());
        tokio::time::sleep_until(start.into()).await;
        let out = send.await;
        tokio::time::sleep_until(paid.into()).await;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backups_and_wal_get_their_classes_and_nothing_else_does() {
        let u = Upload {
            storage_class: Some("STANDARD_IA".into()),
            wal_storage_class: Some("ONEZONE_IA".into()),
            ..Upload::default()
        };
        let class = |k: &str| u.storage_class(k).map(|c| c.as_str().to_string());
        assert_eq!(
            class("app/backup/20261207T000000Z-full/data.zst.age").as_deref(),
            Some("STANDARD_IA")
        );
        assert_eq!(
            class("fleet/wal/backup/L/manifest.json").as_deref(),
            Some("STANDARD_IA")
        );
        assert_eq!(
            class("app/wal/g1/0001-0002.seg").as_deref(),
            Some("ONEZONE_IA")
        );
        assert_eq!(
            class("fleet/backup/wal/g/seg").as_deref(),
            Some("ONEZONE_IA")
        );
        assert_eq!(class("app/lease.json"), None);
        assert_eq!(class(".audit/host/2026.jsonl"), None);
        let only = Upload {
            storage_class: Some("GLACIER_IR".into()),
            ..Upload::default()
        };
        assert_eq!(
            only.storage_class("app/wal/g1/s")
                .map(|c| c.as_str().to_string())
                .as_deref(),
            Some("GLACIER_IR"),
            "WAL follows storage_class unless told otherwise"
        );
    }

    #[test]
    fn reservations_queue_at_the_rate() {
        let t = Throttle::new(1000);
        let now = Instant::now();
        let (s1, p1) = t.reserve(500, now);
        let (s2, p2) = t.reserve(1000, now);
        assert_eq!(s1, now);
        assert_eq!(p1 - now, Duration::from_millis(500));
        assert_eq!(s2, p1, "the second waits for the first's bytes");
        assert_eq!(p2 - now, Duration::from_millis(1500));
        // After a quiet spell nothing is owed.
        let later = now + Duration::from_secs(10);
        assert_eq!(t.reserve(1, later).0, later);
    }
}
