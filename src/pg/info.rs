//! Reading `pgbackrest info --output=json` into dr's own view of backups.
//!
//! Fields that pgBackRest leaves out in some set-ups (repository sizes with
//! block incremental, archive ranges of a backup still running) are
//! optional, so a missing field never fails `dr info`.

use chrono::{DateTime, Utc};
use serde::Deserialize;

/// One backup set as dr shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBackup {
    /// pgBackRest's label (`20261122-031500F`, `..._20261122-091500D`).
    pub label: String,
    /// `full`, `diff` or `incr`.
    pub kind: String,
    /// The backup this one depends on.
    pub prior: Option<String>,
    /// 1-based repository number: the policy's target at that position.
    pub repo: u32,
    pub start: DateTime<Utc>,
    pub stop: DateTime<Utc>,
    pub size: u64,
    pub repo_size: Option<u64>,
    /// What this backup added itself (a full: all of it; a diff or an
    /// incremental: the files it copied).
    pub delta: u64,
    pub repo_delta: Option<u64>,
    /// First and last WAL segment the backup needs.
    pub archive_start: Option<String>,
    pub archive_stop: Option<String>,
    /// pgBackRest found an error in the set (checksum failures on pages).
    pub error: bool,
}

#[derive(Debug, Deserialize)]
struct Stanza {
    name: String,
    #[serde(default)]
    backup: Vec<Backup>,
    #[serde(default)]
    archive: Vec<ArchiveRange>,
}

/// One repository's WAL archive of one database system, as `info` lists it.
#[derive(Debug, Deserialize)]
struct ArchiveRange {
    /// The archive id (`15-1`): the directory under `archive/<stanza>`.
    id: String,
    max: Option<String>,
    #[serde(default)]
    database: Option<Database>,
}

/// Where the newest WAL segment of one repository is: enough to find its
/// object, and when the repository stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewestWal {
    pub repo: u32,
    /// `archive/<stanza>/<id>/<first 16 hex digits>`: the directory holding it.
    pub dir: String,
    /// The segment's name (24 hex digits).
    pub segment: String,
}

/// The newest archived WAL segment of each repository of `stanza` (the
/// newest archive id of each), from `info --output=json`.
pub fn newest_wal(json: &str, stanza: &str) -> Result<Vec<NewestWal>, String> {
    let stanzas: Vec<Stanza> = serde_json::from_str(json)
        .map_err(|e| format!("pgbackrest info printed JSON dr cannot read: {e}"))?;
    let Some(s) = stanzas.into_iter().find(|s| s.name == stanza) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<NewestWal> = Vec::new();
    for a in s.archive {
        let Some(max) = a.max.filter(|m| m.len() == 24) else {
            continue;
        };
        let repo = a.database.and_then(|d| d.repo_key).unwrap_or(1);
        let w = NewestWal {
            repo,
            dir: format!("archive/{stanza}/{}/{}", a.id, &max[..16]),
            segment: max,
        };
        // A newer timeline or segment sorts later (fixed-width hex).
        match out.iter_mut().find(|o| o.repo == repo) {
            Some(o) if o.segment < w.segment => *o = w,
            Some(_) => {}
            None => out.push(w),
        }
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
struct Backup {
    label: String,
    #[serde(rename = "type")]
    kind: String,
    prior: Option<String>,
    timestamp: Timestamps,
    #[serde(default)]
    info: Sizes,
    #[serde(default)]
    archive: Option<Archive>,
    #[serde(default)]
    database: Option<Database>,
    #[serde(default)]
    error: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Timestamps {
    start: i64,
    stop: i64,
}

#[derive(Debug, Default, Deserialize)]
struct Sizes {
    size: Option<u64>,
    delta: Option<u64>,
    repository: Option<RepoSizes>,
}

#[derive(Debug, Deserialize)]
struct RepoSizes {
    size: Option<u64>,
    delta: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Archive {
    start: Option<String>,
    stop: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Database {
    #[serde(rename = "repo-key")]
    repo_key: Option<u32>,
}

/// The backups of `stanza` in pgBackRest's JSON, oldest first.
pub fn parse(json: &str, stanza: &str) -> Result<Vec<PgBackup>, String> {
    let stanzas: Vec<Stanza> = serde_json::from_str(json)
        .map_err(|e| format!("pgbackrest info printed JSON dr cannot read: {e}"))?;
    let Some(s) = stanzas.into_iter().find(|s| s.name == stanza) else {
        return Ok(Vec::new());
    };
    let time = |t: i64| DateTime::from_timestamp(t, 0).unwrap_or_default();
    let mut out: Vec<PgBackup> = s
        .backup
        .into_iter()
        .map(|b| PgBackup {
            label: b.label,
            kind: b.kind,
            prior: b.prior,
            repo: b.database.and_then(|d| d.repo_key).unwrap_or(1),
            start: time(b.timestamp.start),
            stop: time(b.timestamp.stop),
            size: b.info.size.unwrap_or(0),
            delta: b.info.delta.or(b.info.size).unwrap_or(0),
            repo_size: b.info.repository.as_ref().and_then(|r| r.size),
            repo_delta: b.info.repository.and_then(|r| r.delta.or(r.size)),
            archive_start: b.archive.as_ref().and_then(|a| a.start.clone()),
            archive_stop: b.archive.and_then(|a| a.stop),
            error: b.error.unwrap_or(false),
        })
        .collect();
    out.sort_by(|a, b| (a.start, &a.label).cmp(&(b.start, &b.label)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"[{"name":"main","status":{"code":0},"backup":[
      {"label":"20261122-072104F","type":"full","prior":null,"reference":null,
       "timestamp":{"start":1795331264,"stop":1795331267},
       "info":{"size":38000000,"delta":38000000,"repository":{"size":4000000,"delta":4000000}},
       "archive":{"start":"000000010000000000000003","stop":"000000010000000000000003"},
       "database":{"id":1,"repo-key":1},"error":false,"lsn":{"start":"0/3000028","stop":"0/3000100"}},
      {"label":"20261122-072104F_20261122-072200D","type":"diff","prior":"20261122-072104F",
       "timestamp":{"start":1795331320,"stop":1795331321},
       "info":{"size":38000000,"delta":100000},
       "database":{"id":1,"repo-key":2}}]}]"#;

    #[test]
    fn reads_sets_with_and_without_optional_fields() {
        let b = parse(SAMPLE, "main").expect("parse");
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].kind, "full");
        assert_eq!(b[0].repo_size, Some(4_000_000));
        assert_eq!(
            b[0].archive_start.as_deref(),
            Some("000000010000000000000003")
        );
        assert_eq!(b[1].prior.as_deref(), Some("20261122-072104F"));
        assert_eq!(b[1].repo, 2);
        assert_eq!(b[1].repo_size, None);
        assert_eq!(b[1].delta, 100_000, "a diff's size is its own delta");
        assert_eq!(b[0].delta, 38_000_000);
        assert!(parse(SAMPLE, "other").expect("parse").is_empty());
        assert!(parse("not json", "main").is_err());
    }

    #[test]
    fn finds_the_newest_segment_of_each_repository() {
        let json = r#"[{"name":"main","backup":[],"archive":[
          {"database":{"id":1,"repo-key":1},"id":"15-1","max":"000000010000000000000007","min":"000000010000000000000001"},
          {"database":{"id":1,"repo-key":2},"id":"15-1","max":"000000010000000000000005","min":"000000010000000000000001"},
          {"database":{"id":1,"repo-key":1},"id":"15-1","max":"000000020000000100000002","min":"000000020000000100000001"}]}]"#;
        let w = newest_wal(json, "main").expect("parse");
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].segment, "000000020000000100000002");
        assert_eq!(w[0].dir, "archive/main/15-1/0000000200000001");
        assert_eq!(w[1].repo, 2);
        assert!(newest_wal("[]", "main").expect("parse").is_empty());
    }
}
