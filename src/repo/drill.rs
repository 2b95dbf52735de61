//! Restore drills' results, kept on the target. The full drill (decrypt,
//! replay, `integrity_check`) runs where the age identity lives, which
//! need not be the production host; it writes its outcome next to the
//! backups so that every host reading the target (production's `dr info`,
//! `/healthz` and metrics) knows the newest drill that passed, and where.
//!
//! `<policy>/drills/<finished, UTC, to the millisecond>-<host>.json`: the
//! names sort by time, so the newest are found from one listing.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::Storage;

/// The format of a drill record this dr writes and reads.
pub const FORMAT: u32 = 1;

/// One drill's outcome on one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillRecord {
    pub format: u32,
    pub policy: String,
    pub target: String,
    /// The host that ran the drill (the one with the key).
    pub host: String,
    pub ok: bool,
    /// The newest backup drilled.
    pub label: String,
    pub finished: DateTime<Utc>,
    pub seconds: f64,
    /// What was restored and checked (backups, WAL replays).
    #[serde(default)]
    pub restored: Vec<String>,
    /// Why the drill failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub dr_version: String,
}

/// Where the drills of `policy` are.
pub fn prefix(policy: &str) -> String {
    format!("{policy}/drills/")
}

fn key(r: &DrillRecord) -> String {
    let host: String = r
        .host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "{}{}-{host}.json",
        prefix(&r.policy),
        r.finished.format("%Y%m%dT%H%M%S%.3fZ")
    )
}

/// Writes a drill's outcome to the target.
pub fn write(storage: &dyn Storage, r: &DrillRecord) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(r)
        .map_err(|e| Error::Other(format!("cannot encode a drill record: {e}")))?;
    storage.put_bytes(&key(r), &bytes)
}

/// The newest drill that passed on a target and the newest that failed
/// after it (a failure older than the newest pass is history, not news).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Drills {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passed: Option<DrillRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<DrillRecord>,
}

/// How many records, newest first, are read looking for a pass: a drill
/// host failing daily for a month is reported as failing, not read whole.
const READ_AT_MOST: usize = 32;

/// Reads the newest drills of `policy` on a target: one listing and the
/// records from the newest back to the first that passed.
pub fn newest(storage: &dyn Storage, policy: &str) -> Result<Drills> {
    let keys = super::records_newest_first(storage, &prefix(policy))?;
    let mut out = Drills::default();
    for k in keys.iter().take(READ_AT_MOST) {
        let bytes = storage.get_bytes(k)?;
        let Ok(r) = serde_json::from_slice::<DrillRecord>(&bytes) else {
            tracing::warn!(target = %storage.target(), key = %k, "not a drill record dr reads: skipped");
            continue;
        };
        if r.format > FORMAT || r.policy != policy {
            continue;
        }
        if r.ok {
            out.passed = Some(r);
            break;
        }
        if out.failed.is_none() {
            out.failed = Some(r);
        }
    }
    Ok(out)
}

/// The newest drill record of `policy` on a target that concerns backup
/// `label`: one that restored it (and passed), or one that failed on it
/// or failed without naming its backup.
/// One listing, then the records from the newest back, at most
/// [`READ_AT_MOST`] of them.
pub fn about(storage: &dyn Storage, policy: &str, label: &str) -> Result<Option<DrillRecord>> {
    let keys = super::records_newest_first(storage, &prefix(policy))?;
    for k in keys.iter().take(READ_AT_MOST) {
        let bytes = storage.get_bytes(k)?;
        let Ok(r) = serde_json::from_slice::<DrillRecord>(&bytes) else {
            continue;
        };
        if r.format > FORMAT || r.policy != policy {
            continue;
        }
        let restored = r.restored.iter().any(|l| l == label);
        // A failed drill that does not name its backup may have failed on
        // this one: nothing older is relied on.
        let concerns = if r.ok {
            restored
        } else {
            r.label.is_empty() || r.label == label || restored
        };
        if concerns {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_time_and_hold_a_safe_host_name() {
        let mut r = DrillRecord {
            format: FORMAT,
            policy: "app".into(),
            target: "s3".into(),
            host: "drill host/1".into(),
            ok: true,
            label: "20261206-050000F".into(),
            finished: DateTime::from_timestamp_millis(1_796_540_400_123).expect("time"),
            seconds: 1.0,
            restored: Vec::new(),
            error: None,
            dr_version: "0".into(),
        };
        let a = key(&r);
        assert!(a.starts_with("app/drills/2026"), "{a}");
        assert!(a.ends_with("-drill_host_1.json"), "{a}");
        r.finished += chrono::Duration::milliseconds(1);
        assert!(key(&r) > a);
    }
}
