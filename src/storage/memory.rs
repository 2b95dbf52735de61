//! An in-memory target for unit tests of the logic above storage (fan-out,
//! retention): objects in a map, and a switch that makes every request fail
//! the way an unreachable target does. Integration tests use real servers.

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::{ObjectMeta, ObjectWriter, Storage};
use crate::error::{Error, Result};

type Objects = Arc<Mutex<BTreeMap<String, (Vec<u8>, DateTime<Utc>)>>>;

#[derive(Debug, Default)]
pub struct MemoryStorage {
    name: String,
    objects: Objects,
    broken: AtomicBool,
}

impl MemoryStorage {
    pub fn new(name: &str) -> MemoryStorage {
        MemoryStorage {
            name: name.to_string(),
            ..MemoryStorage::default()
        }
    }

    /// From now on every request fails, as against a target that is down.
    pub fn break_it(&self) {
        self.broken.store(true, Ordering::SeqCst);
    }

    fn check(&self, action: &'static str, key: &str) -> Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(Error::Storage {
                target: self.name.clone(),
                location: self.location(),
                action,
                key: key.to_string(),
                reason: "connection refused".into(),
            });
        }
        Ok(())
    }
}

struct MemoryWriter {
    key: String,
    buf: Vec<u8>,
    objects: Objects,
}

impl Write for MemoryWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for MemoryWriter {
    fn commit(self: Box<Self>) -> Result<()> {
        let mut o = self
            .objects
            .lock()
            .map_err(|_| Error::Other("memory storage poisoned".into()))?;
        o.insert(self.key, (self.buf, Utc::now()));
        Ok(())
    }
}

impl Storage for MemoryStorage {
    fn target(&self) -> &str {
        &self.name
    }
    fn location(&self) -> String {
        format!("memory:{}", self.name)
    }
    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        self.check("write", key)?;
        Ok(Box::new(MemoryWriter {
            key: key.to_string(),
            buf: Vec::new(),
            objects: self.objects.clone(),
        }))
    }
    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>> {
        self.check("read", key)?;
        let o = self
            .objects
            .lock()
            .map_err(|_| Error::Other("memory storage poisoned".into()))?;
        match o.get(key) {
            Some((b, _)) => Ok(Box::new(Cursor::new(b.clone()))),
            None => Err(Error::NotFound(format!("no object {key}"))),
        }
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.check("list", prefix)?;
        let o = self
            .objects
            .lock()
            .map_err(|_| Error::Other("memory storage poisoned".into()))?;
        Ok(o.range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (b, t))| ObjectMeta {
                key: k.clone(),
                size: b.len() as u64,
                modified: *t,
            })
            .collect())
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.check("delete", key)?;
        if let Ok(mut o) = self.objects.lock() {
            o.remove(key);
        }
        Ok(())
    }
}
