//! The repository format dr writes: labels, manifests, and the pure logic
//! that reads a listing into backups and plans retention. No I/O here.
//!
//! Layout per target and policy (the contract is docs/repository-format.md):
//! `<policy>/backup/<label>/{manifest.json,data.zst.age,pages.zst.age}`.

pub mod activity;
pub mod calendar;
pub mod catalog;
pub mod drill;
pub mod label;
pub mod manifest;
pub mod retention;
pub mod wal;

pub use catalog::{BackupDir, group_backups};
pub use label::{BackupType, Label};
pub use manifest::{Manifest, ManifestError};

/// One object in a target's listing: what every plan in this module reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the target root, '/'-separated.
    pub key: String,
    pub size: u64,
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// Key of a policy's backup directory prefix.
pub fn backup_prefix(policy: &str) -> String {
    format!("{policy}/backup/")
}

/// Key of an object inside a backup.
pub fn object_key(policy: &str, label: &Label, name: &str) -> String {
    format!("{policy}/backup/{label}/{name}")
}

/// Object names inside a backup directory.
pub const MANIFEST: &str = "manifest.json";
/// Page data (full: every page; diff: changed pages).
pub const DATA: &str = "data.zst.age";
/// Page-hash index of a full, used to compute later diffs.
pub const PAGES: &str = "pages.zst.age";

/// The keys of the JSON records under `prefix` (drills, promotions), newest
/// first: their names start with the time they were written.
pub fn records_newest_first(
    storage: &dyn crate::storage::Storage,
    prefix: &str,
) -> crate::error::Result<Vec<String>> {
    let mut keys: Vec<String> = storage
        .list(prefix)?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.ends_with(".json"))
        .collect();
    keys.sort();
    keys.reverse();
    Ok(keys)
}
