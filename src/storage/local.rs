//! A local volume (or any mounted file system) as a target.
//!
//! Objects are written to a temporary name in the final directory, fsynced,
//! renamed into place and the directory fsynced, so that after a crash an
//! object is either complete under its key or absent.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::{Condition, ObjectMeta, ObjectWriter, Storage};
use crate::error::{Error, Result};

/// Marker in temporary file names. Listings include such files, so that a
/// write cut short by a crash shows up as part of an interrupted backup and
/// is cleaned up with it.
const TMP_MARK: &str = ".dr-tmp.";

/// Whether a file name is one of dr's writes not yet renamed into place
/// (a watcher of the directory passes over its events).
pub fn is_temp(name: &str) -> bool {
    name.contains(TMP_MARK)
}

/// A target rooted at a directory.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    name: String,
    root: PathBuf,
}

impl LocalStorage {
    /// Lists `prefix`, only what sorts after `after` when given: the
    /// directories wholly before it are not read, and the entries before it
    /// are not stat'ed.
    fn list_from(&self, prefix: &str, after: Option<&str>) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        // Start from the deepest directory the prefix names.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir_part)
        };
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err("list", prefix, &e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.err("list", prefix, &e))?;
                let path = entry.path();
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel.to_string_lossy().replace('\\', "/");
                let is_dir = entry
                    .file_type()
                    .map_err(|e| self.err("list", prefix, &e))?
                    .is_dir();
                if is_dir {
                    // Every key inside sorts before `<dir>0` ('/' < '0'):
                    // a directory wholly before `after` is not read.
                    if after.is_none_or(|a| format!("{key}0").as_str() > a) {
                        stack.push(path);
                    }
                    continue;
                }
                if !key.starts_with(prefix) || after.is_some_and(|a| key.as_str() <= a) {
                    continue;
                }
                let meta = entry.metadata().map_err(|e| self.err("list", prefix, &e))?;
                let modified: DateTime<Utc> = meta
                    .modified()
                    .map(DateTime::from)
                    .unwrap_or_else(|_| Utc::now());
                out.push(ObjectMeta {
                    key,
                    size: meta.len(),
                    modified,
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// A target named `name` rooted at `root` (created on first write).
    pub fn new(name: &str, root: &Path) -> Self {
        LocalStorage {
            name: name.to_string(),
            root: root.to_path_buf(),
        }
    }

    /// Where `key` goes: its path, its directory (created) and its file name.
    fn place(&self, key: &str) -> Result<(PathBuf, PathBuf, String)> {
        let dest = self.path(key)?;
        let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| self.err("create directory for", key, &e))?;
        let fname = dest
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok((dest, dir, fname))
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(Error::Other(format!("invalid object key '{key}'")));
        }
        Ok(self.root.join(key))
    }
}

/// A temporary name beside `fname` in `dir`, unique to this process and moment.
fn temp_name(dir: &Path, fname: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    dir.join(format!(".{fname}{TMP_MARK}{}.{nanos}", std::process::id()))
}

/// A local object's version: its content (a lease holds a unique token).
fn etag_of(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..32].to_string()
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

struct LocalWriter {
    storage: LocalStorage,
    key: String,
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<BufWriter<File>>,
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(std::io::Error::other("object already committed")),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl ObjectWriter for LocalWriter {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let Some(buf) = self.file.take() else {
            return Ok(());
        };
        let key = self.key.clone();
        let file = buf
            .into_inner()
            .map_err(|e| self.storage.err("write", &key, e.error()))?;
        file.sync_all()
            .map_err(|e| self.storage.err("fsync", &key, &e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.dest)
            .map_err(|e| self.storage.err("rename into place", &key, &e))?;
        if let Some(dir) = self.dest.parent() {
            fsync_dir(dir).map_err(|e| self.storage.err("fsync directory of", &key, &e))?;
        }
        Ok(())
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl LocalStorage {
    fn open_file(&self, key: &str) -> Result<File> {
        let p = self.path(key)?;
        match File::open(&p) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound(format!(
                "target '{}' ({}): object {key} does not exist",
                self.name,
                self.location()
            ))),
            Err(e) => Err(self.err("open", key, &e)),
        }
    }
}

impl Storage for LocalStorage {
    fn target(&self) -> &str {
        &self.name
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        let (dest, dir, fname) = self.place(key)?;
        let tmp = temp_name(&dir, &fname);
        let file = File::create(&tmp).map_err(|e| self.err("create", key, &e))?;
        Ok(Box::new(LocalWriter {
            storage: self.clone(),
            key: key.to_string(),
            tmp,
            dest,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
        }))
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>> {
        Ok(Box::new(self.open_file(key)?))
    }

    fn open_range(&self, key: &str, offset: u64, len: u64) -> Result<Box<dyn Read + Send>> {
        use std::io::{Seek, SeekFrom};
        let mut f = self.open_file(key)?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| self.err("read", key, &e))?;
        Ok(Box::new(f.take(len)))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.list_from(prefix, None)
    }

    fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<ObjectMeta>> {
        self.list_from(prefix, Some(after))
    }

    /// A volume can be mounted by several hosts (NFS) or written by two dr
    /// processes with different state directories: leases apply here too.
    fn shared(&self) -> bool {
        true
    }

    fn get_with_etag(&self, key: &str) -> Result<Option<(Vec<u8>, String)>> {
        let p = self.path(key)?;
        match std::fs::read(&p) {
            Ok(bytes) => {
                let etag = etag_of(&bytes);
                Ok(Some((bytes, etag)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("read", key, &e)),
        }
    }

    /// Creation is a hard link of a complete temporary file (atomic, and it
    /// fails when the key exists, on NFS too); replacement compares and
    /// renames under an exclusive lock on a sidecar file that is never
    /// replaced itself, so two replacers cannot both see the old version.
    fn put_conditional(&self, key: &str, bytes: &[u8], cond: &Condition) -> Result<Option<String>> {
        let (dest, dir, fname) = self.place(key)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!(".{fname}.dr-lock")))
            .map_err(|e| self.err("lock", key, &e))?;
        lock.lock().map_err(|e| self.err("lock", key, &e))?;
        let tmp = temp_name(&dir, &fname);
        File::create(&tmp)
            .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                self.err("write", key, &e)
            })?;
        let done = match cond {
            Condition::Absent => match std::fs::hard_link(&tmp, &dest) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(self.err("create", key, &e));
                }
            },
            Condition::Match(etag) => match std::fs::read(&dest) {
                Ok(cur) if etag_of(&cur) == *etag => {
                    std::fs::rename(&tmp, &dest).map_err(|e| self.err("replace", key, &e))?;
                    true
                }
                Ok(_) => false,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(self.err("read", key, &e));
                }
            },
        };
        let _ = std::fs::remove_file(&tmp);
        if !done {
            return Ok(None);
        }
        fsync_dir(&dir).map_err(|e| self.err("fsync directory of", key, &e))?;
        Ok(Some(etag_of(bytes)))
    }

    fn delete(&self, key: &str) -> Result<()> {
        let p = self.path(key)?;
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.err("delete", key, &e)),
        }
        // Tidy empty directories up to the root; a non-empty one stops the walk.
        let mut dir = p.parent();
        while let Some(d) = dir {
            if d == self.root || !d.starts_with(&self.root) || std::fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandoned_writes_leave_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = LocalStorage::new("t", dir.path());
        {
            let mut w = s.create("p/backup/x/data").expect("create");
            w.write_all(b"partial").expect("write");
        }
        assert!(s.list("").expect("list").is_empty());
        s.put_bytes("p/backup/x/data", b"whole").expect("put");
        assert_eq!(s.get_bytes("p/backup/x/data").expect("get"), b"whole");
        let l = s.list("p/backup/").expect("list");
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].key, "p/backup/x/data");
        s.delete("p/backup/x/data").expect("delete");
        assert!(!dir.path().join("p").exists(), "empty dirs are tidied");
        assert!(matches!(s.open("p/nothing"), Err(Error::NotFound(_))));
        assert!(s.create("../escape").is_err());
    }
}
