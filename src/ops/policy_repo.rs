//! A policy's backups on one target, as stored: the listing grouped into
//! backups, each with its manifest when the backup is intact.

use crate::error::{Error, Result};
use crate::repo::{self, BackupDir, Label, Manifest};
use crate::storage::Storage;

/// A policy's backups on one target, as stored.
#[derive(Debug)]
pub struct PolicyRepo<'a> {
    pub storage: &'a dyn Storage,
    pub policy: &'a str,
}

/// A committed backup with its manifest, or the reason its manifest is unusable.
#[derive(Debug)]
pub struct Committed {
    pub dir: BackupDir,
    pub manifest: Result<Manifest>,
}

impl Committed {
    /// How retention and restore see this backup.
    pub fn candidate(&self) -> repo::retention::Candidate {
        repo::retention::Candidate {
            label: self.dir.label.clone(),
            intact: self.manifest.is_ok(),
            counted: self
                .manifest
                .as_ref()
                .map_or(true, |m| m.trigger.as_deref() != Some("generation")),
        }
    }
}

impl PolicyRepo<'_> {
    /// Every label directory, committed or not, oldest first.
    pub fn dirs(&self) -> Result<Vec<BackupDir>> {
        let prefix = repo::backup_prefix(self.policy);
        let listing = self.storage.list(&prefix)?;
        Ok(repo::group_backups(&prefix, &listing))
    }

    /// Backups whose objects a delete marker hides on a versioned bucket
    /// (their older versions still exist, maybe locked): by label, with
    /// the hidden object names. A plain listing does not see them, so a
    /// restore of "newest" would silently return an older state.
    pub fn hidden(&self) -> Result<Vec<(Label, Vec<String>)>> {
        let prefix = repo::backup_prefix(self.policy);
        let mut by_label: std::collections::BTreeMap<Label, Vec<String>> = Default::default();
        for key in self.storage.hidden(&prefix)? {
            let Some((dir, name)) = key.strip_prefix(&prefix).and_then(|r| r.split_once('/'))
            else {
                continue;
            };
            if let Ok(label) = dir.parse::<Label>() {
                by_label.entry(label).or_default().push(name.to_string());
            }
        }
        Ok(by_label.into_iter().collect())
    }

    /// [`Self::hidden`] as an error naming each hidden backup and what to
    /// do, or `None` when nothing is hidden.
    pub fn hidden_error(&self) -> Result<Option<Error>> {
        let hidden = self.hidden()?;
        if hidden.is_empty() {
            return Ok(None);
        }
        let list: Vec<String> = hidden
            .iter()
            .map(|(l, names)| format!("{l} ({})", names.join(", ")))
            .collect();
        Ok(Some(Error::Integrity {
            object: format!(
                "target '{}': policy '{}'",
                self.storage.target(),
                self.policy
            ),
            reason: format!(
                "backup(s) hidden by S3 delete markers: {}. Their earlier versions still exist (under Object Lock they cannot be deleted): remove the delete markers (README: Restore from a version hidden by a delete marker), then run again",
                list.join("; ")
            ),
        }))
    }

    /// Reads and checks one manifest.
    pub fn manifest(&self, label: &Label) -> Result<Manifest> {
        let key = repo::object_key(self.policy, label, repo::MANIFEST);
        let bytes = self.storage.get_bytes(&key)?;
        let object = format!("target '{}': {key}", self.storage.target());
        let m = Manifest::from_bytes(&bytes).map_err(|e| match e {
            crate::repo::ManifestError::Newer(_) => Error::Newer(format!("{object}: {e}")),
            crate::repo::ManifestError::Invalid(reason) => Error::Integrity { object, reason },
        })?;
        if &m.label != label {
            return Err(Error::Integrity {
                object: format!("target '{}': {key}", self.storage.target()),
                reason: format!("manifest is for backup {}, not {label}", m.label),
            });
        }
        Ok(m)
    }

    /// Committed backups, oldest first, each with its manifest when the
    /// backup is intact (see [`repo::catalog::check_intact`]), or why not.
    pub fn committed(&self) -> Result<Vec<Committed>> {
        Ok(self.committed_of(&self.dirs()?))
    }

    /// [`Self::committed`] for directories the caller listed already.
    pub fn committed_of(&self, dirs: &[BackupDir]) -> Vec<Committed> {
        dirs.iter()
            .filter(|d| d.has_manifest)
            .map(|dir| Committed {
                dir: dir.clone(),
                manifest: self.intact_manifest(dir),
            })
            .collect()
    }

    /// Reads the manifest of a listed backup and checks it against the listing.
    fn intact_manifest(&self, dir: &BackupDir) -> Result<Manifest> {
        let m = self.manifest(&dir.label)?;
        repo::catalog::check_intact(dir, &m).map_err(|reason| Error::Integrity {
            object: format!(
                "target '{}': backup {} of policy '{}'",
                self.storage.target(),
                dir.label,
                self.policy
            ),
            reason,
        })?;
        Ok(m)
    }

    /// The manifests a restore of `label` needs, its full then the diff
    /// itself, each checked intact against a fresh listing: a missing or
    /// truncated object is an integrity failure (exit 3), found before any
    /// byte is written.
    pub fn chain(&self, label: &Label) -> Result<Vec<Manifest>> {
        let dirs = self.dirs()?;
        let target = self.storage.target();
        let find = |l: &Label| -> Result<Manifest> {
            match dirs.iter().find(|d| &d.label == l && d.has_manifest) {
                Some(d) => self.intact_manifest(d),
                None if l == label => Err(Error::NotFound(format!(
                    "no committed backup {l} of policy '{}' on target '{target}'",
                    self.policy
                ))),
                None => Err(Error::Integrity {
                    object: format!("backup {label}"),
                    reason: format!("its full backup {l} is missing from target '{target}'"),
                }),
            }
        };
        let m = find(label)?;
        if m.kind == repo::BackupType::Full {
            return Ok(vec![m]);
        }
        let p = find(&label.full_label())?;
        Ok(vec![p, m])
    }
}

/// A committed backup as a starting point for WAL replay, if it has a WAL position.
pub fn wal_base(m: &Manifest) -> Option<repo::wal::Base> {
    m.wal.as_ref().map(|w| repo::wal::Base {
        label: m.label.to_string(),
        generation: w.generation.clone(),
        seq: w.frame,
        taken: m.timestamp_start,
    })
}
