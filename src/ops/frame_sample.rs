//! `dr verify --sample PERCENT` on format 2 backups: every older backup
//! gets a spot check of that share of its frames, read by ranges, instead
//! of a coin toss that reads it whole or not at all.
//!
//! Format 2 frames decode on their own, and age decrypts any 64 KiB chunk
//! on its own, so a frame can be read without the bytes before it: one
//! ranged GET per frame header (the header walk proves the headers, which
//! carry every frame's BLAKE3, are the ones the manifest's `plain_blake3`
//! binds), then one per sampled frame, decoded and checked. A drill of a
//! 1 GiB backup at 10% reads a tenth of it, and every backup is touched
//! by every drill: the key still opens it, its headers are intact, and a
//! random tenth of its pages decode to what was backed up.

use std::io::{Read, Seek, SeekFrom};

use super::PolicyRepo;
use crate::codec::read_error;
use crate::error::Result;
use crate::repo::{self, Manifest};
use crate::storage::Storage;

/// What a spot check read of one backup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sampled {
    pub frames: u64,
    pub read: u64,
}

/// Whether `m`'s data can be sampled by frames (format 2).
pub fn samples(m: &Manifest) -> bool {
    m.objects
        .get(repo::DATA)
        .is_some_and(|d| d.framed.is_some())
}

/// Checks `percent` of the frames of `m`'s data object (at least one),
/// chosen at random, and all of its frame headers.
pub fn check(
    repo: &PolicyRepo<'_>,
    m: &Manifest,
    unsealing: Option<&crate::keys::Unsealing>,
    percent: f64,
) -> Result<Sampled> {
    let Some((digest, framed)) = m
        .objects
        .get(repo::DATA)
        .and_then(|d| d.framed.as_ref().map(|f| (d, f)))
    else {
        return Ok(Sampled::default());
    };
    let key = repo::object_key(repo.policy, &m.label, repo::DATA);
    let object = format!("target '{}': {key}", repo.storage.target());
    let mut ranges = Ranges::new(repo.storage, &key, digest.stored_size);
    let pick = |n: u64| {
        let want = ((n as f64 * percent / 100.0).ceil() as u64).clamp(1, n.max(1));
        let mut all: Vec<u64> = (0..n).collect();
        fastrand::shuffle(&mut all);
        all.truncate(want as usize);
        all.sort_unstable();
        all
    };
    let picked = if m.encrypted() {
        let mut plain = crate::codec::decrypting(ranges, &object, unsealing)?;
        crate::codec::framed::sample(&mut plain, digest.plain_size, framed, pick)
    } else {
        crate::codec::framed::sample(&mut ranges, digest.plain_size, framed, pick)
    }
    .map_err(|e| read_error(&object, e))?;
    Ok(Sampled {
        frames: framed.frames,
        read: picked.len() as u64,
    })
}

/// An object read by ranges as a file is read by `pread`: a seek costs
/// nothing until the next read, which fetches a window from there; a run
/// of reads without a seek fetches ever larger windows (128 KiB doubling
/// to 8 MiB), so a frame costs a few requests and a header one.
struct Ranges<'s> {
    storage: &'s dyn Storage,
    key: String,
    size: u64,
    pos: u64,
    window: Option<(Box<dyn Read + Send>, u64)>,
    next_len: u64,
}

const FIRST_WINDOW: u64 = 128 << 10;
const MAX_WINDOW: u64 = 8 << 20;

impl<'s> Ranges<'s> {
    fn new(storage: &'s dyn Storage, key: &str, size: u64) -> Self {
        Ranges {
            storage,
            key: key.to_string(),
            size,
            pos: 0,
            window: None,
            next_len: FIRST_WINDOW,
        }
    }
}

impl Read for Ranges<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.pos >= self.size || buf.is_empty() {
                return Ok(0);
            }
            if let Some((r, end)) = self.window.as_mut() {
                if self.pos < *end {
                    let want = buf.len().min((*end - self.pos) as usize);
                    let n = r.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("{} ended at byte {} of {}", self.key, self.pos, self.size),
                        ));
                    }
                    self.pos += n as u64;
                    return Ok(n);
                }
                self.next_len = (self.next_len * 2).min(MAX_WINDOW);
            }
            let len = self.next_len.min(self.size - self.pos);
            let r = self
                .storage
                .open_range(&self.key, self.pos, len)
                .map_err(std::io::Error::other)?;
            self.window = Some((r, self.pos + len));
        }
    }
}

impl Seek for Ranges<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        }
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        if pos != self.pos {
            self.window = None;
            self.next_len = FIRST_WINDOW;
            self.pos = pos;
        }
        Ok(pos)
    }
}
