//! Many databases under one policy: `[source] path = "/srv/tenants/*.db"`.
//!
//! A policy whose path has a pattern in its file name is a *fleet*: every
//! matching file is a database of its own, backed up, streamed, restored
//! and verified as a *member* policy named `<policy>/<db>` (so its objects
//! live under `<root>/<policy>/<db>/`, its state under
//! `state_dir/wal/<policy>/<db>/`). Members are found on disk when a
//! command runs (and by the streaming engine as files come and go), and in
//! the repository for databases that no longer exist on disk, so a deleted
//! tenant can still be restored.
//!
//! A database's name is what the pattern's single `*` matched (`alice` for
//! `/srv/tenants/alice.db` under `*.db`), or its whole file name when the
//! pattern is anything else; either way the name maps back to one path.

use std::path::{Path, PathBuf};

/// Files next to a database that are never databases themselves.
const SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// The pattern of a fleet policy.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// The directory the databases live in (no pattern here).
    pub dir: PathBuf,
    pattern: glob::Pattern,
    /// `(prefix, suffix)` around the one `*` of a simple pattern.
    star: Option<(String, String)>,
}

impl PartialEq for Fleet {
    fn eq(&self, other: &Self) -> bool {
        self.dir == other.dir && self.pattern.as_str() == other.pattern.as_str()
    }
}

/// One database of a fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The fleet policy's name.
    pub policy: String,
    /// The database's name inside it.
    pub db: String,
}

impl Fleet {
    /// A fleet when `path`'s file name holds a pattern (`*`, `?`, `[`),
    /// `None` for one database. The directory part must be literal.
    pub fn parse(path: &Path) -> Result<Option<Fleet>, String> {
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            return Ok(None);
        };
        if !file.contains(['*', '?', '[']) {
            return Ok(None);
        }
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.to_string_lossy().contains(['*', '?', '[']) {
            return Err(format!(
                "{}: a pattern may only be in the file name (one directory of databases, e.g. /srv/tenants/*.db)",
                path.display()
            ));
        }
        let pattern = glob::Pattern::new(file)
            .map_err(|e| format!("{}: not a valid pattern: {e}", path.display()))?;
        let star = match file.split_once('*') {
            Some((pre, post)) if !post.contains('*') && !file.contains(['?', '[']) => {
                Some((pre.to_string(), post.to_string()))
            }
            _ => None,
        };
        Ok(Some(Fleet { dir, pattern, star }))
    }

    /// The pattern as written, for messages.
    pub fn display(&self) -> String {
        self.dir.join(self.pattern.as_str()).display().to_string()
    }

    /// The database name of a file in the fleet's directory, when the file
    /// is one of its databases. Any name SQLite can open is a name (spaces,
    /// letters of any script, a leading dot); only an empty one is not.
    pub fn name_of(&self, file: &str) -> Option<String> {
        if SIDE_FILES.iter().any(|s| file.ends_with(s)) || !self.pattern.matches(file) {
            return None;
        }
        let name = match &self.star {
            Some((pre, post)) => file
                .strip_prefix(pre.as_str())?
                .strip_suffix(post.as_str())?,
            None => file,
        };
        (!name.is_empty()).then(|| name.to_string())
    }

    /// Where the database called `name` lives.
    pub fn path_of(&self, name: &str) -> PathBuf {
        match &self.star {
            Some((pre, post)) => self.dir.join(format!("{pre}{name}{post}")),
            None => self.dir.join(name),
        }
    }

    /// The fleet's databases on disk now, by name.
    pub fn scan(&self) -> std::io::Result<Vec<(String, PathBuf)>> {
        Ok(self.scan_all()?.members)
    }

    /// The fleet's databases on disk now, and the files that match the
    /// pattern but cannot be named (a name that is not UTF-8, or empty):
    /// those are never skipped in silence, the protection verdict lists
    /// them as at risk.
    pub fn scan_all(&self) -> std::io::Result<Scan> {
        let mut out = Scan::default();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let raw = entry.file_name();
            let file = raw.to_string_lossy();
            if !self.pattern.matches(&file) || SIDE_FILES.iter().any(|s| file.ends_with(s)) {
                continue;
            }
            // Regular files (through links): not directories, sockets or the like.
            if !std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
                continue;
            }
            match raw.to_str().and_then(|f| self.name_of(f)) {
                Some(name) => out.members.push((name, entry.path())),
                None => {
                    tracing::warn!(
                        file = %entry.path().display(),
                        "matches {} but its name cannot name a database (not UTF-8, or nothing where the pattern's '*' is): NOT backed up; rename it",
                        self.display()
                    );
                    out.unnamed.push(entry.path());
                }
            }
        }
        out.members.sort();
        out.unnamed.sort();
        Ok(out)
    }
}

/// What a directory scan of a fleet found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Databases by name, sorted.
    pub members: Vec<(String, PathBuf)>,
    /// Files the pattern matches that no name can stand for.
    pub unnamed: Vec<PathBuf>,
}

/// The bytes a database name keeps as they are in object keys and
/// state_dir paths; every other byte (and a leading `.`) is written `%XX`.
fn plain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'
}

/// The form of database name `db` used in object keys, member policy
/// names and state_dir paths (docs/repository-format.md): names of
/// letters, digits, `-`, `_` and `.` (not first) as they are, so every
/// repository written before stays valid; any other name percent-encoded
/// byte by byte (`my db` is `my%20db`, `.hidden` is `%2Ehidden`). A plain
/// name never holds `%`, so the two forms never meet. The one name the
/// fleet's own record has (`activity.json`, a file beside the databases'
/// prefixes) is written with its first byte encoded, so that on a local
/// target a database of that name is a directory of its own.
pub fn key_name(db: &str) -> String {
    let reserved = db == crate::repo::activity::NAME;
    if valid_name(db) && !reserved {
        return db.to_string();
    }
    let mut out = String::with_capacity(db.len() * 3);
    for (i, b) in db.bytes().enumerate() {
        if plain_byte(b) && !(i == 0 && (b == b'.' || reserved)) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The database name a key segment written by [`key_name`] stands for,
/// or `None` when the segment is no such form.
pub fn name_of_key(key: &str) -> Option<String> {
    if valid_name(key) {
        return (key != crate::repo::activity::NAME).then(|| key.to_string());
    }
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = key.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if plain_byte(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    let name = String::from_utf8(out).ok()?;
    // Only the canonical spelling: one name, one key.
    (!name.is_empty() && key_name(&name) == key).then_some(name)
}

/// Whether `name` is written as it is in keys and paths (see [`key_name`]).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// The member policy name of database `db` in fleet policy `policy`:
/// its key form, so objects and state_dir paths follow from it.
pub fn member_name(policy: &str, db: &str) -> String {
    format!("{policy}/{}", key_name(db))
}

/// The distinct database names found under `<policy>/` in a listing of
/// object keys.
pub fn names_in_keys<'k>(policy: &str, keys: impl Iterator<Item = &'k str>) -> Vec<String> {
    let prefix = format!("{policy}/");
    let mut names: Vec<String> = keys
        .filter_map(|k| k.strip_prefix(&prefix))
        .filter_map(|rest| rest.split_once('/').map(|(db, _)| db))
        .filter_map(name_of_key)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(p: &str) -> Fleet {
        Fleet::parse(Path::new(p)).expect("valid").expect("a fleet")
    }

    #[test]
    fn names_map_back_to_their_paths() {
        let f = fleet("/srv/tenants/*.db");
        assert_eq!(f.name_of("alice.db").as_deref(), Some("alice"));
        assert_eq!(f.path_of("alice"), Path::new("/srv/tenants/alice.db"));
        assert_eq!(f.name_of("alice.db-wal"), None);
        assert_eq!(f.name_of("alice.db-shm"), None);
        assert_eq!(f.name_of("alice.sqlite"), None);
        assert_eq!(f.name_of(".db"), None, "an empty name is no name");
        assert_eq!(f.name_of("my db.db").as_deref(), Some("my db"));
        assert_eq!(f.name_of(".hidden.db").as_deref(), Some(".hidden"));
        let g = fleet("/srv/t/tenant-?.sqlite");
        assert_eq!(
            g.name_of("tenant-1.sqlite").as_deref(),
            Some("tenant-1.sqlite")
        );
        assert_eq!(
            g.path_of("tenant-1.sqlite"),
            Path::new("/srv/t/tenant-1.sqlite")
        );
        let h = fleet("/srv/t/*");
        assert_eq!(h.name_of("x.db-journal"), None);
        assert_eq!(h.name_of("x.db").as_deref(), Some("x.db"));
    }

    #[test]
    fn one_database_is_not_a_fleet_and_patterns_stay_in_the_file_name() {
        assert!(
            Fleet::parse(Path::new("/srv/app.db"))
                .expect("ok")
                .is_none()
        );
        assert!(
            Fleet::parse(Path::new("/srv/*/app.db"))
                .expect("ok")
                .is_none()
        );
        assert!(Fleet::parse(Path::new("/srv/*/x*.db")).is_err());
    }

    #[test]
    fn any_name_has_one_key_and_comes_back_from_it() {
        for (name, key) in [
            ("alice", "alice"),
            ("a.b-c_d", "a.b-c_d"),
            ("my db", "my%20db"),
            (".hidden", "%2Ehidden"),
            ("café", "caf%C3%A9"),
            ("100%", "100%25"),
            ("a/b", "a%2Fb"),
            ("activity.json", "%61ctivity.json"),
        ] {
            assert_eq!(key_name(name), key, "{name}");
            assert_eq!(name_of_key(key).as_deref(), Some(name), "{key}");
        }
        // Not the canonical spelling of any name: refused, so two keys
        // never stand for one database.
        for key in ["my%2", "%61lice", "a b", "%zz", "", "%2e", "activity.json"] {
            assert_eq!(name_of_key(key), None, "{key}");
        }
    }

    #[test]
    fn stored_names_come_from_keys() {
        let keys = [
            "t/alice/backup/20260101-000000F/manifest.json",
            "t/bob/wal/g/1-2_a_b.zst.age",
            "t/bob/lease",
            "t/my%20db/backup/l/manifest.json",
            "t/lease",
            "other/x/backup/l/manifest.json",
        ];
        assert_eq!(
            names_in_keys("t", keys.into_iter()),
            vec!["alice", "bob", "my db"]
        );
    }
}
