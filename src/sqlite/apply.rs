//! Putting a database back together from what dr stored: a page stream
//! written into a file, and WAL segments replayed over it up to an instant.
//! Readers come in already decrypted and checked by the caller; this module
//! knows the formats, not the repository.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};

use super::PageReader;
use super::pages::{HASH_LEN, page_hash};
use super::segment::SegmentReader;
use crate::codec::read_error;
use crate::error::{Error, Result, io_reason};

/// A failed write into the restored database, naming it.
pub fn write_error(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        context: format!(
            "writing the restored database {}: {}",
            path.display(),
            io_reason(&e)
        ),
        source: e,
    }
}

/// What a restore's writer tells the proof of identity about each page it
/// writes, in stream order, when asked to hash them (a diff's pages): its
/// number and its hash.
pub type Seen<'a> = dyn FnMut(u32, &[u8; HASH_LEN]) + 'a;

/// Writes every page of the stream `pages` (the object `object`, which the
/// manifest says has `page_size` and `page_count`) into `file` at `path`,
/// on the calling thread (a format 1 stream, which decodes on one core);
/// `seen`, if given, hears each page's hash before it is written.
pub fn apply_pages(
    pages: impl Read,
    object: &str,
    page_size: u32,
    page_count: u64,
    file: &File,
    path: &Path,
    mut seen: Option<&mut Seen<'_>>,
) -> Result<()> {
    let write_err = |e| write_error(path, e);
    let mut pages = PageReader::new(pages).map_err(|e| read_error(object, e))?;
    header_agrees(
        object,
        (pages.page_size, pages.page_count),
        (page_size, page_count),
    )?;
    let ps = u64::from(pages.page_size);
    let mut out = Coalesce::new(file);
    while let Some((pgno, data)) = pages.next_page().map_err(|e| read_error(object, e))? {
        if let Some(seen) = seen.as_mut() {
            seen(pgno, &page_hash(data));
        }
        out.put((u64::from(pgno) - 1) * ps, data)
            .map_err(write_err)?;
    }
    out.flush().map_err(write_err)
}

/// A page stream's header (`found`: its page size and page count) must say
/// what the manifest does (`expected`).
pub(super) fn header_agrees(object: &str, found: (u32, u64), expected: (u32, u64)) -> Result<()> {
    if found != expected {
        return Err(Error::Integrity {
            object: object.to_string(),
            reason: "page stream header disagrees with the manifest".into(),
        });
    }
    Ok(())
}

/// Gathers runs of adjacent pages into large positioned writes: a full
/// backup's pages arrive in order, and one syscall per page would dominate.
struct Coalesce<'f> {
    file: &'f File,
    start: u64,
    buf: Vec<u8>,
    writeback: HeadStart<'f>,
}

impl<'f> Coalesce<'f> {
    const CAP: usize = 1 << 20;

    fn new(file: &'f File) -> Self {
        Coalesce {
            file,
            start: 0,
            buf: Vec::with_capacity(Self::CAP),
            writeback: HeadStart::new(file),
        }
    }

    fn put(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let contiguous = offset == self.start + self.buf.len() as u64;
        if !contiguous || self.buf.len() + data.len() > Self::CAP {
            self.flush()?;
            self.start = offset;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.start)?;
            self.start += self.buf.len() as u64;
            self.writeback.wrote(self.buf.len() as u64);
            self.buf.clear();
        }
        Ok(())
    }
}

/// Sends a restored file's pages on to the disk as they are written: with
/// gigabytes of page cache, Linux would otherwise hold a whole restored
/// database dirty until the closing fsync, which then writes it all while
/// nothing else happens. Every [`HeadStart::EVERY`] bytes written a helper
/// thread runs `fdatasync`, unless the one before is still at it. Only a
/// head start: the fsync before the rename is what makes the restore
/// durable, so a failure here is left for it to report.
pub(super) struct HeadStart<'f> {
    file: &'f File,
    /// Bytes written since the last head start.
    unsent: u64,
    running: Option<std::thread::JoinHandle<()>>,
}

impl<'f> HeadStart<'f> {
    /// How much is written before it is sent on: the restore's closing
    /// fsync then waits for little.
    const EVERY: u64 = 32 << 20;

    pub(super) fn new(file: &'f File) -> Self {
        HeadStart {
            file,
            unsent: 0,
            running: None,
        }
    }

    /// `bytes` more were written.
    pub(super) fn wrote(&mut self, bytes: u64) {
        self.unsent += bytes;
        if self.unsent < Self::EVERY {
            return;
        }
        self.unsent = 0;
        if self.running.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        if let Some(h) = self.running.take() {
            let _ = h.join();
        }
        if let Ok(f) = self.file.try_clone() {
            self.running = std::thread::Builder::new()
                .name("dr-writeback".into())
                .spawn(move || {
                    let _ = f.sync_data();
                })
                .ok();
        }
    }
}

impl Drop for HeadStart<'_> {
    /// The last head start ends before the caller goes on: WAL replayed
    /// next must not write pages an `fdatasync` is still writing out.
    fn drop(&mut self) {
        if let Some(h) = self.running.take() {
            let _ = h.join();
        }
    }
}

/// Replays WAL segments, in order, over a restored backup.
#[derive(Debug)]
pub struct Replayer<'f> {
    file: &'f File,
    path: &'f Path,
    page_size: u64,
    db_pages: u64,
    /// Frames up to here are in the file (the backup's WAL position first).
    seq: u64,
    base: String,
    until_ms: Option<i64>,
    stopped: bool,
    pub segments: usize,
    pub transactions: u64,
    pub last_commit: Option<DateTime<Utc>>,
}

impl<'f> Replayer<'f> {
    /// Replays over `file`, a backup `base` of `db_pages` pages of
    /// `page_size` that ends at frame `seq`, up to the last commit at or
    /// before `until`.
    pub fn new(
        file: &'f File,
        path: &'f Path,
        base: &str,
        page_size: u32,
        db_pages: u64,
        seq: u64,
        until: Option<DateTime<Utc>>,
    ) -> Self {
        Replayer {
            file,
            path,
            page_size: u64::from(page_size),
            db_pages,
            seq,
            base: base.to_string(),
            until_ms: until.map(|t| t.timestamp_millis()),
            stopped: false,
            segments: 0,
            transactions: 0,
            last_commit: None,
        }
    }

    /// The last frame applied (every frame up to it is in the file).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether the instant was passed: later segments are not needed.
    pub fn done(&self) -> bool {
        self.stopped
    }

    /// Applies one segment (`object`, named as holding frames `first` to
    /// `last`). The segment is read to its end either way, so its hash is
    /// checked by the caller's decoder.
    pub fn segment(
        &mut self,
        segment: impl Read,
        object: &str,
        first: u64,
        last: u64,
    ) -> Result<()> {
        let bad = |reason: String| Error::Integrity {
            object: object.to_string(),
            reason,
        };
        let write_err = |e| write_error(self.path, e);
        let mut r = SegmentReader::new(segment).map_err(|e| read_error(object, e))?;
        if r.first_seq != first {
            return Err(bad(format!(
                "starts at frame {} but its name says {first}",
                r.first_seq
            )));
        }
        if u64::from(r.page_size) != self.page_size {
            return Err(bad(format!(
                "page size {} differs from the backup's {}",
                r.page_size, self.page_size
            )));
        }
        self.segments += 1;
        let ps = self.page_size;
        let mut at = first - 1;
        while let Some(t) = r.next_txn().map_err(|e| read_error(object, e))? {
            // A database has at least one page: a commit that says none
            // would restore an empty file that passes every check.
            if t.db_pages == 0 {
                return Err(bad(format!(
                    "a transaction after frame {at} commits a database of 0 pages"
                )));
            }
            let first = at + 1;
            at += u64::from(t.nframes);
            let apply = !self.stopped && at > self.seq;
            if apply && first <= self.seq {
                return Err(bad(format!(
                    "a transaction spans frame {}, where backup {} ends",
                    self.seq, self.base
                )));
            }
            if apply && self.until_ms.is_some_and(|u| t.commit_ms > u) {
                self.stopped = true; // read on to the end: the segment's hash still gets checked
            }
            for _ in 0..t.nframes {
                let (pgno, page) = r.next_frame().map_err(|e| read_error(object, e))?;
                // Pages past the size the transaction commits are cut off
                // at its commit: not written (as SQLite's checkpoint skips
                // them), which also bounds where a frame can write.
                if apply && !self.stopped && pgno <= t.db_pages {
                    self.file
                        .write_all_at(page, (u64::from(pgno) - 1) * ps)
                        .map_err(write_err)?;
                }
            }
            if apply && !self.stopped {
                self.db_pages = u64::from(t.db_pages);
                if self.file.metadata().map_err(write_err)?.len() > self.db_pages * ps {
                    self.file.set_len(self.db_pages * ps).map_err(write_err)?;
                }
                self.seq = at;
                self.transactions += 1;
                self.last_commit = Utc.timestamp_millis_opt(t.commit_ms).single();
            }
        }
        if at != last {
            return Err(bad(format!("ends at frame {at} but its name says {last}")));
        }
        Ok(())
    }

    /// Cuts the file to the database's size at the last commit applied.
    pub fn finish(&self) -> Result<()> {
        self.file
            .set_len(self.db_pages * self.page_size)
            .map_err(|e| write_error(self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::segment::SegmentWriter;

    fn replay(seg: &[u8], frames: u64) -> (Result<()>, u64, Vec<u8>) {
        let dir = tempfile::tempdir().expect("test");
        let path = dir.path().join("r.db");
        std::fs::write(&path, [9u8; 512]).expect("test");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("test");
        let mut r = Replayer::new(&file, &path, "base", 512, 1, 0, None);
        let res = r.segment(seg, "seg", 1, frames).and_then(|()| r.finish());
        let bytes = std::fs::read(&path).expect("test");
        (res, bytes.len() as u64, bytes)
    }

    #[test]
    fn a_commit_of_no_pages_is_refused_and_pages_past_the_commit_are_not_written() {
        let mut w = SegmentWriter::new(Vec::new(), 512, 1).expect("test");
        w.txn(1, 0, 1_000).expect("test");
        w.frame(1, &[1u8; 512]).expect("test");
        let (res, _, _) = replay(&w.finish().expect("test"), 1);
        assert!(
            matches!(res, Err(Error::Integrity { .. })),
            "an empty database from a valid-looking segment: {res:?}"
        );

        // Page 5 of a commit that leaves 2 pages: cut off, as in SQLite.
        let mut w = SegmentWriter::new(Vec::new(), 512, 1).expect("test");
        w.txn(2, 2, 1_000).expect("test");
        w.frame(2, &[2u8; 512]).expect("test");
        w.frame(5, &[5u8; 512]).expect("test");
        let (res, len, bytes) = replay(&w.finish().expect("test"), 2);
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(len, 1024);
        assert_eq!((bytes[0], bytes[512]), (9, 2));
    }
}
