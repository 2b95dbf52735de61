//! Writing a format 2 page stream into the restored file on every core.
//!
//! The codec hands over whole decoded frames, in order, each already
//! checked against its BLAKE3. A pool of writers takes them: each finds the
//! page records that lie wholly inside its frame (records have a fixed
//! size, so where they start follows from the frame's offset in the
//! stream) and writes runs of them with one `pwritev` straight from the
//! frame's buffer, a run of at most 128 KiB at a time: no copy but the
//! kernel's, from a buffer still in cache (the one-thread path's copy into
//! a 1 MiB buffer, then a 1 MiB `pwrite`, took three times the system
//! time at 4 GiB). A diff's pages are hashed there too, for the proof of
//! identity. The calling thread puts the results back in stream order: it
//! stitches the one record a frame boundary cuts, and hands every page's
//! number and hash to the proof in the order the stream holds them, as the
//! single-threaded path does. Pages of one stream never overlap (each
//! number once), so the order of the writes does not matter; a repeated
//! page number is refused.
//!
//! Memory: a window of frames, the codec's plus one per writer.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::IoSlice;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel, sync_channel};
use std::sync::{Arc, Mutex};

use super::apply::{HeadStart, Seen, header_agrees, write_error};
use super::pages::{HASH_LEN, STREAM_HEADER, page_hash, parse_stream_header};
use crate::codec::framed::FrameReader;
use crate::codec::read_error;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Where records start: after the header, every `4 + page_size` bytes.
#[derive(Debug, Clone, Copy)]
struct Layout {
    page_size: u32,
    page_count: u64,
    /// Pages are hashed for the proof (a diff's).
    hash: bool,
}

impl Layout {
    fn record(self) -> u64 {
        4 + u64::from(self.page_size)
    }

    /// The first record boundary at or after stream offset `at` (the
    /// header's end for offsets inside it).
    fn boundary_from(self, at: u64) -> u64 {
        let h = STREAM_HEADER as u64;
        if at <= h {
            return h;
        }
        h + (at - h).div_ceil(self.record()) * self.record()
    }

    fn offset_of(self, pgno: u32) -> u64 {
        (u64::from(pgno) - 1) * u64::from(self.page_size)
    }

    /// The record at record boundary `at` of `bytes` (a frame, or the
    /// bytes carried over frame boundaries), checked.
    fn record_at(self, bytes: &[u8], at: usize, object: &str) -> Result<Record> {
        if at + 4 > bytes.len() {
            return Ok(Record::Cut);
        }
        let pgno = pgno_at(bytes, at);
        if pgno == 0 {
            if at + 4 != bytes.len() {
                return Err(integrity(object, "data after the end of the page stream"));
            }
            return Ok(Record::End);
        }
        let record = self.record() as usize;
        if at + record > bytes.len() {
            return Ok(Record::Cut);
        }
        if u64::from(pgno) > self.page_count {
            return Err(integrity(
                object,
                &format!("page {pgno} is beyond the page count {}", self.page_count),
            ));
        }
        let hash = if self.hash {
            page_hash(&bytes[at + 4..at + record])
        } else {
            [0; HASH_LEN]
        };
        Ok(Record::Page(pgno, hash))
    }
}

/// What a record boundary holds.
enum Record {
    /// A page: its number, and its hash when pages are hashed (else zeros).
    Page(u32, [u8; HASH_LEN]),
    /// The end marker, the stream's last bytes.
    End,
    /// A record not all here.
    Cut,
}

fn pgno_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

struct Job {
    seq: u64,
    /// Where the frame starts in the plain stream.
    offset: u64,
    buf: Vec<u8>,
}

/// A frame's records written, and what is left for the calling thread.
struct Done {
    seq: u64,
    /// Where the frame starts in the plain stream.
    offset: u64,
    buf: Vec<u8>,
    /// Bytes before the frame's first record boundary: the end of a record
    /// the frame before began (or the stream header). The whole frame when
    /// no boundary falls inside it.
    head: usize,
    /// Where the bytes after the last whole record start (the beginning of
    /// a record the next frame ends); `buf.len()` when none.
    tail: usize,
    /// Each whole record's page number and page hash, in stream order.
    pages: Vec<(u32, [u8; HASH_LEN])>,
    /// The end marker was found in this frame.
    ended: bool,
}

/// Writes the pages of the format 2 object `object` (its frames, from
/// `frames`) into `file` at `path`; the manifest says its pages are of
/// `page_size` bytes and the database has `page_count`. `seen` hears each
/// page's number and hash in stream order, when given (the pages are
/// hashed only then); `progress` hears the plain bytes.
#[allow(clippy::too_many_arguments)]
pub fn apply_frames(
    frames: &mut FrameReader,
    object: &str,
    page_size: u32,
    page_count: u64,
    file: &File,
    path: &Path,
    progress: &dyn Progress,
    mut seen: Option<&mut Seen<'_>>,
) -> Result<()> {
    let layout = Layout {
        page_size,
        page_count,
        hash: seen.is_some(),
    };
    let writers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let mut order = Order {
        object,
        layout,
        file,
        path,
        carry: Vec::new(),
        carry_at: 0,
        ended: false,
        seen_pages: Pages::new(page_count),
        writeback: HeadStart::new(file),
    };
    frames.hold(writers);
    std::thread::scope(|s| -> Result<()> {
        let (jobs, queue) = sync_channel::<Job>(writers);
        let queue = Arc::new(Mutex::new(queue));
        let (results, done) = channel::<Result<Done>>();
        for _ in 0..writers {
            let (queue, results) = (queue.clone(), results.clone());
            s.spawn(move || write_frames(&queue, &results, layout, file, path, object));
        }
        drop(results);
        let mut offset = 0u64;
        let mut sent = 0u64;
        let mut next = 0u64;
        let mut waiting: BTreeMap<u64, Done> = BTreeMap::new();
        let mut more = true;
        loop {
            // Keep every writer busy, and no more frames out of the
            // codec's window than there are writers.
            if more && sent - next < writers as u64 {
                match frames.next_frame() {
                    Ok(Some(buf)) => {
                        progress.advance(buf.len() as u64);
                        let len = buf.len() as u64;
                        let job = Job {
                            seq: sent,
                            offset,
                            buf,
                        };
                        jobs.send(job).map_err(|_| stopped())?;
                        offset += len;
                        sent += 1;
                        continue;
                    }
                    Ok(None) => more = false,
                    Err(e) => return Err(read_error(object, e)),
                }
            }
            if next == sent {
                break;
            }
            let d = done
                .recv()
                .map_err(|_| stopped())?
                .map_err(|e| cause_first(frames, object, e))?;
            waiting.insert(d.seq, d);
            while let Some(d) = waiting.remove(&next) {
                let buf = order
                    .take(d, &mut seen)
                    .map_err(|e| cause_first(frames, object, e))?;
                frames.recycle(buf);
                next += 1;
            }
        }
        order
            .finish(&mut seen)
            .map_err(|e| cause_first(frames, object, e))
    })
}

fn stopped() -> Error {
    Error::Other("internal: a page writing thread stopped".into())
}

/// A stream that makes no sense may be the effect of an object changed on
/// the way: its frames' digests name that at the object's end, which is
/// then the error to report. (A failed write is its own cause.)
fn cause_first(frames: &mut FrameReader, object: &str, e: Error) -> Error {
    if !matches!(e, Error::Integrity { .. }) {
        return e;
    }
    loop {
        match frames.next_frame() {
            Ok(Some(buf)) => frames.recycle(buf),
            Ok(None) => return e,
            Err(cause) => return read_error(object, cause),
        }
    }
}

/// A writer: takes frames until the calling thread stops sending them.
fn write_frames(
    queue: &Mutex<Receiver<Job>>,
    results: &Sender<Result<Done>>,
    layout: Layout,
    file: &File,
    path: &Path,
    object: &str,
) {
    loop {
        let job = match queue.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else {
            return;
        };
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            write_frame(job, layout, file, path, object)
        }))
        .unwrap_or_else(|_| {
            Err(Error::Other(
                "internal: a page writing thread panicked".into(),
            ))
        });
        if results.send(done).is_err() {
            return;
        }
    }
}

/// Bytes of pages hashed, then written, at a time: well inside a core's
/// L2 cache (1 MiB on the machine the README's figures come from).
const RUN_BYTES: usize = 128 << 10;

/// Hashes and writes the records wholly inside one frame.
fn write_frame(job: Job, layout: Layout, file: &File, path: &Path, object: &str) -> Result<Done> {
    let buf = job.buf;
    let len = buf.len();
    let first = layout.boundary_from(job.offset) - job.offset;
    let head = usize::try_from(first).map_or(len, |f| f.min(len));
    let record = layout.record() as usize;
    let mut pages = Vec::with_capacity(len / record + 1);
    let mut at = head;
    let mut ended = false;
    // A run at a time: hashed (a diff's) and written while it is still in
    // this core's cache.
    let chunk = (RUN_BYTES / record).max(1);
    let mut written = head;
    let mut from = 0usize;
    loop {
        let (pgno, hash) = match layout.record_at(&buf, at, object)? {
            Record::Page(pgno, hash) => (pgno, hash),
            Record::End => {
                ended = true;
                break;
            }
            Record::Cut => break,
        };
        pages.push((pgno, hash));
        at += record;
        if pages.len() - from >= chunk {
            write_runs(&buf[written..at], &pages[from..], layout, file)
                .map_err(|e| write_error(path, e))?;
            written = at;
            from = pages.len();
        }
    }
    write_runs(&buf[written..at], &pages[from..], layout, file)
        .map_err(|e| write_error(path, e))?;
    if ended {
        at = len;
    }
    let tail = at;
    Ok(Done {
        seq: job.seq,
        offset: job.offset,
        buf,
        head,
        tail,
        pages,
        ended,
    })
}

/// Writes `records` (whole records, whose pages are `pages`) with one
/// `pwritev` per run of adjacent page numbers, straight from the buffer.
fn write_runs(
    records: &[u8],
    pages: &[(u32, [u8; HASH_LEN])],
    layout: Layout,
    file: &File,
) -> std::io::Result<()> {
    // Linux's IOV_MAX.
    const MAX_SLICES: usize = 1024;
    let record = layout.record() as usize;
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(pages.len().min(MAX_SLICES));
    let mut start = 1u32;
    for (i, (pgno, _)) in pages.iter().enumerate() {
        let adjacent = u64::from(*pgno) == u64::from(start) + slices.len() as u64;
        if !adjacent || slices.len() == MAX_SLICES {
            write_slices(file, &mut slices, layout, start)?;
            start = *pgno;
        }
        slices.push(IoSlice::new(&records[i * record + 4..(i + 1) * record]));
    }
    write_slices(file, &mut slices, layout, start)
}

/// Writes every byte of `slices`, pages from `first` on, however many
/// calls it takes, and empties the list.
fn write_slices(
    file: &File,
    slices: &mut Vec<IoSlice<'_>>,
    layout: Layout,
    first: u32,
) -> std::io::Result<()> {
    if slices.is_empty() {
        return Ok(());
    }
    let mut rest: &mut [IoSlice<'_>] = slices;
    let mut at = layout.offset_of(first);
    while !rest.is_empty() {
        let n = rustix::io::pwritev(file, rest, at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        at += n as u64;
        IoSlice::advance_slices(&mut rest, n);
    }
    slices.clear();
    Ok(())
}

/// Puts the writers' results back in stream order.
struct Order<'a> {
    object: &'a str,
    layout: Layout,
    file: &'a File,
    path: &'a Path,
    /// Bytes of records cut by frame boundaries, not yet whole.
    carry: Vec<u8>,
    /// Where `carry` starts in the stream.
    carry_at: u64,
    ended: bool,
    seen_pages: Pages,
    writeback: HeadStart<'a>,
}

impl Order<'_> {
    /// Takes the next frame's result: the records its start completes,
    /// then its own. Returns the frame's buffer.
    fn take(&mut self, d: Done, seen: &mut Option<&mut Seen<'_>>) -> Result<Vec<u8>> {
        if self.ended && !d.buf.is_empty() {
            return Err(integrity(
                self.object,
                "data after the end of the page stream",
            ));
        }
        self.carry.extend_from_slice(&d.buf[..d.head]);
        if d.head < d.buf.len() {
            // A boundary falls inside this frame: what is carried is whole.
            self.drain_carry(seen)?;
        }
        let ps = u64::from(self.layout.page_size);
        for (pgno, hash) in &d.pages {
            self.page(*pgno, hash, seen)?;
        }
        self.writeback.wrote(d.pages.len() as u64 * ps);
        if d.ended {
            self.ended = true;
        }
        if d.head < d.buf.len() {
            self.carry_at = d.offset + d.tail as u64;
            self.carry.extend_from_slice(&d.buf[d.tail..]);
        }
        Ok(d.buf)
    }

    /// One page, in stream order: each number once.
    fn page(
        &mut self,
        pgno: u32,
        hash: &[u8; HASH_LEN],
        seen: &mut Option<&mut Seen<'_>>,
    ) -> Result<()> {
        if !self.seen_pages.insert(pgno) {
            return Err(integrity(
                self.object,
                &format!("page {pgno} appears twice in the page stream"),
            ));
        }
        if let Some(seen) = seen {
            seen(pgno, hash);
        }
        Ok(())
    }

    /// Handles the whole units carried over frame boundaries: the stream
    /// header, records and the end marker.
    fn drain_carry(&mut self, seen: &mut Option<&mut Seen<'_>>) -> Result<()> {
        let carry = std::mem::take(&mut self.carry);
        let mut at = 0usize;
        let record = self.layout.record() as usize;
        if self.carry_at == 0 && !carry.is_empty() {
            let Some(hdr) = carry.get(..STREAM_HEADER) else {
                return Err(integrity(self.object, "page stream is truncated"));
            };
            let mut h = [0u8; STREAM_HEADER];
            h.copy_from_slice(hdr);
            let found = parse_stream_header(&h).map_err(|e| read_error(self.object, e))?;
            header_agrees(
                self.object,
                found,
                (self.layout.page_size, self.layout.page_count),
            )?;
            at = STREAM_HEADER;
        }
        while at < carry.len() {
            let (pgno, hash) = match self.layout.record_at(&carry, at, self.object)? {
                Record::Page(pgno, hash) => (pgno, hash),
                Record::End => {
                    self.ended = true;
                    break;
                }
                Record::Cut => return Err(integrity(self.object, "page stream is truncated")),
            };
            self.file
                .write_all_at(&carry[at + 4..at + record], self.layout.offset_of(pgno))
                .map_err(|e| write_error(self.path, e))?;
            self.page(pgno, &hash, seen)?;
            at += record;
        }
        self.carry = carry;
        self.carry.clear();
        Ok(())
    }

    /// After the last frame: what is still carried is whole, and the end
    /// marker was seen.
    fn finish(mut self, seen: &mut Option<&mut Seen<'_>>) -> Result<()> {
        if !self.carry.is_empty() {
            self.drain_carry(seen)?;
        }
        if !self.ended {
            return Err(integrity(self.object, "page stream is truncated"));
        }
        Ok(())
    }
}

/// The page numbers a stream has given, one bit each.
struct Pages(Vec<u64>);

impl Pages {
    fn new(count: u64) -> Self {
        Pages(vec![
            0;
            usize::try_from(count.div_ceil(64)).unwrap_or(0) + 1
        ])
    }

    /// Marks `pgno`; false if it was already.
    fn insert(&mut self, pgno: u32) -> bool {
        let (word, bit) = ((pgno / 64) as usize, 1u64 << (pgno % 64));
        match self.0.get_mut(word) {
            Some(w) if *w & bit == 0 => {
                *w |= bit;
                true
            }
            Some(_) => false,
            // Past the page count, which the writers refuse first.
            None => true,
        }
    }
}

fn integrity(object: &str, reason: &str) -> Error {
    Error::Integrity {
        object: object.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Read, Seek, Write};

    use super::*;
    use crate::codec::framed::MIN_FRAME;
    use crate::codec::{Decoder, Encoder};
    use crate::keys::Sealing;
    use crate::progress::Silent;
    use crate::sqlite::apply::apply_pages;
    use crate::sqlite::pages::PageWriter;

    fn page(pgno: u32, ps: usize) -> Vec<u8> {
        (0..ps as u32)
            .map(|i| (i.wrapping_mul(31) ^ pgno.wrapping_mul(2_654_435_761)) as u8)
            .collect()
    }

    /// A page stream of `order`'s pages, in that order.
    fn stream(ps: u32, count: u64, order: &[u32]) -> Vec<u8> {
        let mut w = PageWriter::new(Vec::new(), ps, count).expect("header");
        for &p in order {
            w.page(p, &page(p, ps as usize)).expect("page");
        }
        w.finish().expect("end").0
    }

    type Heard = Vec<(u32, [u8; HASH_LEN])>;

    fn file_bytes(mut f: File) -> Vec<u8> {
        let mut out = Vec::new();
        f.rewind().expect("rewind");
        f.read_to_end(&mut out).expect("read");
        out
    }

    /// Through the frame writers, from the smallest frames a policy may
    /// set: the file's bytes and what the proof heard.
    fn by_frames(plain: &[u8], ps: u32, count: u64) -> Result<(Vec<u8>, Heard)> {
        frames_into(plain, ps, count, true)
    }

    /// The same, hashing the pages (a diff's) or not (a full's).
    fn frames_into(plain: &[u8], ps: u32, count: u64, hash: bool) -> Result<(Vec<u8>, Heard)> {
        let mut enc = Encoder::framed(Vec::new(), 1, &Sealing::None, MIN_FRAME).expect("encoder");
        enc.write_all(plain).expect("encode");
        let (digest, stored) = enc.finish().expect("finish");
        let mut dec = Decoder::new(Cursor::new(stored), "obj", &digest, None, false)?;
        let file = tempfile::tempfile().expect("tmp");
        let mut heard = Vec::new();
        let frames = dec.frames().expect("a format 2 object");
        let mut hear = |p: u32, h: &[u8; HASH_LEN]| heard.push((p, *h));
        apply_frames(
            frames,
            "obj",
            ps,
            count,
            &file,
            Path::new("restored.db"),
            &Silent,
            hash.then_some(&mut hear as &mut Seen<'_>),
        )?;
        Ok((file_bytes(file), heard))
    }

    /// The same stream through the one-thread path.
    fn by_stream(plain: &[u8], ps: u32, count: u64) -> (Vec<u8>, Heard) {
        let file = tempfile::tempfile().expect("tmp");
        let mut heard = Vec::new();
        apply_pages(
            plain,
            "obj",
            ps,
            count,
            &file,
            Path::new("restored.db"),
            Some(&mut |p, h| heard.push((p, *h))),
        )
        .expect("apply");
        (file_bytes(file), heard)
    }

    fn reason(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn records_cut_by_frames_are_written_as_one_thread_writes_them() {
        // 516-byte records across 64 KiB frames: nearly every frame cuts
        // one. Then 64 KiB pages, whose records are longer than a frame:
        // some frames hold no boundary at all. Pages in any order.
        for (ps, count, order) in [
            (512u32, 2000u64, (1..=2000).collect::<Vec<u32>>()),
            (65536, 9, vec![3, 1, 9, 2, 5, 8]),
            (4096, 700, (1..=700).rev().step_by(3).collect()),
        ] {
            let plain = stream(ps, count, &order);
            let (file, heard) = by_frames(&plain, ps, count).expect("frames");
            let (want, want_heard) = by_stream(&plain, ps, count);
            assert!(file == want, "page size {ps}: the files differ");
            let (unhashed, none) = frames_into(&plain, ps, count, false).expect("frames");
            assert!(
                unhashed == want && none.is_empty(),
                "page size {ps}: unhashed"
            );
            assert_eq!(heard, want_heard, "page size {ps}");
            assert_eq!(heard.len(), order.len());
            for &p in &order {
                let at = (p as usize - 1) * ps as usize;
                assert!(file[at..at + ps as usize] == page(p, ps as usize)[..]);
            }
        }
    }

    #[test]
    fn a_stream_that_makes_no_sense_is_refused_and_named() {
        let ps = 4096;
        let twice = stream(ps, 100, &[1, 2, 3, 2, 4]);
        let e = reason(by_frames(&twice, ps, 100).expect_err("twice"));
        assert!(e.contains("page 2 appears twice"), "{e}");

        let beyond = stream(ps, 10, &[1, 11]);
        let e = reason(by_frames(&beyond, ps, 10).expect_err("beyond"));
        assert!(e.contains("page 11 is beyond the page count 10"), "{e}");

        let whole = stream(ps, 50, &(1..=50).collect::<Vec<_>>());
        let e = reason(by_frames(&whole[..whole.len() - 4], ps, 50).expect_err("cut"));
        assert!(e.contains("truncated"), "{e}");
        let e = reason(by_frames(&whole, ps, 51).expect_err("header"));
        assert!(e.contains("disagrees with the manifest"), "{e}");
        let mut after = whole.clone();
        after.extend_from_slice(&[7; 10]);
        let e = reason(by_frames(&after, ps, 50).expect_err("after"));
        assert!(e.contains("data after the end"), "{e}");
    }
}
