//! The manifest: the record that commits a backup.
//!
//! It is written last; its presence is what makes a backup exist. The file
//! is an envelope `{"manifest": {...}, "sha256": "..."}` whose hash covers
//! the exact bytes of the inner document, so any edit or truncation of the
//! manifest is detected without re-serialising (and newer fields added by
//! later versions of dr do not disturb the check).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::label::{BackupType, Label};
use crate::codec::ObjectDigest;

/// The newest repository format this build reads and writes (it reads
/// every older one). Format 2 cut the data object into frames
/// (`codec::framed`); a policy may still write format 1.
pub const FORMAT_VERSION: u32 = 2;

/// Everything needed to restore and check one backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub label: Label,
    #[serde(rename = "type")]
    pub kind: BackupType,
    /// The full this diff applies on top of.
    pub parent: Option<Label>,
    /// `sqlite` (PostgreSQL backups live in pgBackRest's own repository).
    pub source_kind: String,
    /// The database file this was taken from, for `dr info`.
    pub source_path: String,
    pub page_size: u32,
    /// Pages in the database at snapshot time.
    pub page_count: u64,
    /// Pages stored in `data.zst.age` (all for a full, changed for a diff).
    pub pages_stored: u64,
    /// WAL position at the snapshot, when WAL streaming knows one.
    pub wal: Option<WalPosition>,
    pub timestamp_start: DateTime<Utc>,
    pub timestamp_stop: DateTime<Utc>,
    pub dr_version: String,
    pub zstd_level: i32,
    /// `age` or `none`.
    pub encryption: String,
    /// Fingerprints (first 8 bytes of sha256, hex) of the recipients, or `scrypt`.
    pub recipients: Vec<String>,
    /// Every object of the backup except the manifest, by name.
    pub objects: BTreeMap<String, ObjectDigest>,
    /// Why dr took it when no schedule or user asked: `generation` for the
    /// base of a new WAL generation. Retention does not count such a full
    /// against `retention.full`, so it never shortens the history kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
}

/// A point in a WAL stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalPosition {
    pub generation: String,
    pub frame: u64,
}

impl Manifest {
    /// Whether the objects are age-encrypted.
    pub fn encrypted(&self) -> bool {
        self.encryption != "none"
    }

    /// Plaintext bytes of all objects (what `dr info` calls size).
    pub fn plain_size(&self) -> u64 {
        self.objects.values().map(|o| o.plain_size).sum()
    }

    /// Stored bytes of all objects.
    pub fn stored_size(&self) -> u64 {
        self.objects.values().map(|o| o.stored_size).sum()
    }

    /// Why a new diff must not build on this full, if it must not: a diff is
    /// restorable only with its full, so both need the same page size, the
    /// same format and the same keys. `page_size`, `encryption` and
    /// `fingerprints` describe the backup about to be taken.
    pub fn diff_base_mismatch(
        &self,
        format: u32,
        page_size: u32,
        encryption: &str,
        fingerprints: &[String],
    ) -> Option<String> {
        let full = &self.label;
        if self.format != format {
            return Some(format!(
                "full backup {full} is in repository format {}, the policy writes format {format}: a diff is always in its full's format",
                self.format
            ));
        }
        if self.page_size != page_size {
            return Some(format!(
                "the database's page size is now {page_size} bytes but full backup {full} has {}",
                self.page_size
            ));
        }
        if self.encryption != encryption {
            return Some(format!(
                "full backup {full} has encryption '{}', the policy now '{encryption}'",
                self.encryption
            ));
        }
        let mut recorded = self.recipients.clone();
        recorded.sort();
        recorded.dedup();
        if recorded != fingerprints {
            return Some(format!(
                "full backup {full} was encrypted for [{}], the configured keys are [{}]: a diff needs the same keys as its full",
                recorded.join(", "),
                fingerprints.join(", ")
            ));
        }
        None
    }

    /// Serialises into the checksummed envelope.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string());
        let sum = hex::encode(Sha256::digest(body.as_bytes()));
        let mut out = String::with_capacity(body.len() + 100);
        out.push_str("{\"manifest\": ");
        out.push_str(&body);
        out.push_str(",\n\"sha256\": \"");
        out.push_str(&sum);
        out.push_str("\"}\n");
        out.into_bytes()
    }

    /// Parses and checks an envelope; the error says what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ManifestError> {
        #[derive(Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow)]
            manifest: &'a RawValue,
            sha256: String,
        }
        let env: Envelope<'_> = serde_json::from_slice(bytes)
            .map_err(|e| ManifestError::Invalid(format!("not a dr manifest: {e}")))?;
        let sum = hex::encode(Sha256::digest(env.manifest.get().as_bytes()));
        if sum != env.sha256 {
            return Err(ManifestError::Invalid(format!(
                "manifest checksum mismatch (computed {sum}, recorded {}): the manifest was modified or damaged",
                env.sha256
            )));
        }
        // The format first: a newer dr may have changed every other field.
        #[derive(Deserialize)]
        struct Version {
            format: u32,
        }
        if let Ok(v) = serde_json::from_str::<Version>(env.manifest.get())
            && v.format > FORMAT_VERSION
        {
            return Err(ManifestError::Newer(v.format));
        }
        let m: Manifest = serde_json::from_str(env.manifest.get())
            .map_err(|e| ManifestError::Invalid(format!("manifest is unreadable: {e}")))?;
        Ok(m)
    }
}

/// Why a manifest cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestError {
    /// Written by a newer dr, in this manifest format.
    Newer(u32),
    /// Not a valid manifest (damaged, modified, not dr's): why.
    Invalid(String),
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestError::Newer(n) => write!(
                f,
                "written by a newer dr (manifest format {n}; this dr reads formats up to {FORMAT_VERSION}): upgrade dr to restore it"
            ),
            ManifestError::Invalid(why) => f.write_str(why),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A plausible full's manifest, for tests across repo/.
    pub(crate) fn sample() -> Manifest {
        let t = Utc::now();
        Manifest {
            trigger: None,
            format: FORMAT_VERSION,
            label: Label::full(t),
            kind: BackupType::Full,
            parent: None,
            source_kind: "sqlite".into(),
            source_path: "/srv/app.db".into(),
            page_size: 4096,
            page_count: 10,
            pages_stored: 10,
            wal: None,
            timestamp_start: t,
            timestamp_stop: t,
            dr_version: "0".into(),
            zstd_level: 3,
            encryption: "age".into(),
            recipients: vec!["abcd".into()],
            objects: BTreeMap::new(),
        }
    }

    #[test]
    fn envelope_round_trips_and_detects_edits() {
        let m = sample();
        let bytes = m.to_bytes();
        assert_eq!(Manifest::from_bytes(&bytes).expect("parse"), m);
        let text = String::from_utf8(bytes).expect("utf8");
        let edited = text.replace("\"page_count\": 10", "\"page_count\": 11");
        assert_ne!(edited, text);
        let err = Manifest::from_bytes(edited.as_bytes()).expect_err("edited");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert!(Manifest::from_bytes(&text.as_bytes()[..text.len() / 2]).is_err());
    }

    #[test]
    fn diffs_need_the_same_page_size_format_and_keys_as_their_full() {
        let m = sample();
        let keys = vec!["abcd".to_string()];
        assert_eq!(
            m.diff_base_mismatch(FORMAT_VERSION, 4096, "age", &keys),
            None
        );
        let e = m
            .diff_base_mismatch(FORMAT_VERSION, 8192, "age", &keys)
            .expect("page size");
        assert!(e.contains("8192") && e.contains("4096"), "{e}");
        assert!(
            m.diff_base_mismatch(FORMAT_VERSION, 4096, "none", &[])
                .is_some()
        );
        let e = m
            .diff_base_mismatch(FORMAT_VERSION, 4096, "age", &["scrypt:00".to_string()])
            .expect("keys");
        assert!(e.contains("same keys"), "{e}");
        let mut old = sample();
        old.format = 1;
        let e = old
            .diff_base_mismatch(2, 4096, "age", &keys)
            .expect("a format 1 full under a format 2 policy");
        assert!(e.contains("repository format 1"), "{e}");
    }
}
