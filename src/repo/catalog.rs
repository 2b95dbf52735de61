//! Reading a listing into backups: committed ones (with a manifest) and
//! interrupted ones (objects but no manifest).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::ObjectMeta;
use super::label::{BackupType, Label};
use super::manifest::Manifest;

/// The objects found under one label directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDir {
    pub label: Label,
    /// Full keys of the objects in the directory.
    pub keys: Vec<String>,
    /// Stored size of each object, by name inside the directory.
    pub sizes: BTreeMap<String, u64>,
    pub has_manifest: bool,
    /// Newest modification time among its objects.
    pub modified: DateTime<Utc>,
}

/// Groups a listing of `<policy>/backup/` by label, oldest first. Entries
/// whose directory is not a label are ignored (they are not dr's).
pub fn group_backups(prefix: &str, listing: &[ObjectMeta]) -> Vec<BackupDir> {
    let mut by_label: BTreeMap<Label, BackupDir> = BTreeMap::new();
    for obj in listing {
        let Some(rest) = obj.key.strip_prefix(prefix) else {
            continue;
        };
        let Some((dir, name)) = rest.split_once('/') else {
            continue;
        };
        let Ok(label) = dir.parse::<Label>() else {
            continue;
        };
        let entry = by_label.entry(label.clone()).or_insert_with(|| BackupDir {
            label,
            keys: Vec::new(),
            sizes: BTreeMap::new(),
            has_manifest: false,
            modified: obj.modified,
        });
        entry.keys.push(obj.key.clone());
        entry.sizes.insert(name.to_string(), obj.size);
        entry.has_manifest |= name == super::MANIFEST;
        entry.modified = entry.modified.max(obj.modified);
    }
    by_label.into_values().collect()
}

/// The longest a backup may take from choosing its label to its snapshot
/// (the WAL pin waits up to 10 s for a writer's lock; a loaded host more).
const MAX_LABEL_TO_START: chrono::Duration = chrono::Duration::minutes(10);

/// Whether a committed backup is intact as far as a listing can tell: its
/// manifest agrees with its own label (type, parent, the time of its
/// snapshot, its WAL generation), and every object it records is
/// present at its recorded size. `Err` says what is wrong. Retention, diffs
/// and restore trust only intact backups; reading the bytes back is verify's job.
pub fn check_intact(dir: &BackupDir, m: &Manifest) -> Result<(), String> {
    if m.label != dir.label {
        return Err(format!(
            "manifest is for backup {}, not {}",
            m.label, dir.label
        ));
    }
    if m.kind != dir.label.kind() {
        return Err(format!(
            "manifest says {} but the label is a {}",
            m.kind,
            dir.label.kind()
        ));
    }
    match (&m.parent, dir.label.kind()) {
        (None, BackupType::Full) => {}
        (Some(p), BackupType::Diff) if *p == dir.label.full_label() => {}
        (p, _) => {
            return Err(format!(
                "manifest names parent {} but the label says {}",
                p.as_ref().map_or("none".to_string(), ToString::to_string),
                if dir.label.kind() == BackupType::Diff {
                    dir.label.full_label().to_string()
                } else {
                    "none".into()
                }
            ));
        }
    }
    // A backup's label is the second its run chose it, just before the
    // snapshot: a manifest whose snapshot is older than its label, or far
    // newer, is a backup stored under another's label (a replayed or
    // relabelled full that would pass for the newest state).
    let labelled = dir.label.time();
    if m.timestamp_start < labelled || m.timestamp_start - labelled > MAX_LABEL_TO_START {
        return Err(format!(
            "its snapshot was taken at {} but its label says {}: a backup stored under another label",
            m.timestamp_start.to_rfc3339(),
            labelled.to_rfc3339()
        ));
    }
    if m.timestamp_stop < m.timestamp_start {
        return Err(format!(
            "it finished ({}) before it started ({})",
            m.timestamp_stop.to_rfc3339(),
            m.timestamp_start.to_rfc3339()
        ));
    }
    // A generation is named for the instant it began; its bases come after.
    if let Some(w) = &m.wal
        && let Some(began) = super::wal::generation_time(&w.generation)
        && began > m.timestamp_start + chrono::Duration::seconds(1)
    {
        return Err(format!(
            "its WAL position is in generation {}, which began after the snapshot ({})",
            w.generation,
            m.timestamp_start.to_rfc3339()
        ));
    }
    if !m.objects.contains_key(super::DATA) {
        return Err("the manifest lists no data object".into());
    }
    // Only dr's own object names: a name with a path in it would make a
    // restore read (and expire remove) what is not this backup's.
    if let Some(name) = m
        .objects
        .keys()
        .find(|n| ![super::DATA, super::PAGES].contains(&n.as_str()))
    {
        return Err(format!(
            "the manifest lists an object dr never writes: {name:?}"
        ));
    }
    // SQLite's limits: a restore never sizes a file from an absurd header.
    if m.source_kind == "sqlite" {
        if !(512..=65536).contains(&m.page_size) || !m.page_size.is_power_of_two() {
            return Err(format!("page size {} is not one SQLite uses", m.page_size));
        }
        if m.page_count > u64::from(u32::MAX - 1) || m.pages_stored > m.page_count {
            return Err(format!(
                "{} pages ({} stored) is beyond what SQLite holds",
                m.page_count, m.pages_stored
            ));
        }
    }
    for (name, digest) in &m.objects {
        match dir.sizes.get(name) {
            None => return Err(format!("object {name} is missing")),
            Some(&size) if size != digest.stored_size => {
                return Err(format!(
                    "object {name} has {size} bytes where the manifest records {}",
                    digest.stored_size
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size: 1,
            modified: Utc::now(),
        }
    }

    #[test]
    fn manifests_commit_backups() {
        let l = vec![
            obj("app/backup/20261122-031500F/data.zst.age"),
            obj("app/backup/20261122-031500F/manifest.json"),
            obj("app/backup/20261122-031500F_20261122-091500D/data.zst.age"),
            obj("app/backup/not-a-label/x"),
        ];
        let g = group_backups("app/backup/", &l);
        assert_eq!(g.len(), 2);
        assert!(g[0].has_manifest);
        assert!(!g[1].has_manifest);
        assert_eq!(g[1].keys.len(), 1);
    }

    #[test]
    fn intact_means_consistent_labels_and_every_object_at_its_size() {
        use crate::codec::ObjectDigest;
        let t = Utc::now();
        let full = Label::full(t - chrono::Duration::hours(1));
        let diff = Label::diff_of(&full, t);
        let digest = |n: u64| ObjectDigest {
            plain_size: n,
            plain_sha256: String::new(),
            stored_size: n,
            stored_sha256: String::new(),
            framed: None,
        };
        let mut m = Manifest {
            trigger: None,
            timestamp_start: diff.time() + chrono::Duration::milliseconds(300),
            timestamp_stop: diff.time() + chrono::Duration::seconds(2),
            label: diff.clone(),
            kind: BackupType::Diff,
            parent: Some(full.clone()),
            objects: [(super::super::DATA.to_string(), digest(10))].into(),
            ..super::super::manifest::tests::sample()
        };
        let mut dir = BackupDir {
            label: diff.clone(),
            keys: vec![],
            sizes: [(super::super::DATA.to_string(), 10)].into(),
            has_manifest: true,
            modified: t,
        };
        assert_eq!(check_intact(&dir, &m), Ok(()));
        // An older snapshot under a newer label: a replayed backup.
        let taken = m.timestamp_start;
        m.timestamp_start = full.time() + chrono::Duration::seconds(5);
        assert!(
            check_intact(&dir, &m)
                .expect_err("relabelled")
                .contains("another label")
        );
        m.timestamp_start = taken;
        // A diff whose manifest names another full than its label does.
        m.parent = Some(Label::full(t - chrono::Duration::hours(2)));
        assert!(
            check_intact(&dir, &m)
                .expect_err("parent")
                .contains("parent")
        );
        m.parent = Some(full);
        dir.sizes.insert(super::super::DATA.to_string(), 9);
        assert!(
            check_intact(&dir, &m)
                .expect_err("size")
                .contains("9 bytes")
        );
        dir.sizes.clear();
        assert!(
            check_intact(&dir, &m)
                .expect_err("gone")
                .contains("missing")
        );
    }
}
