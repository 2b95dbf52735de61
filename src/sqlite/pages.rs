//! The page stream format inside `data.zst.age`, and the page-hash index.
//!
//! Page stream (before compression): an 24-byte header
//! `b"DRPAGES1"`, page size (u32 LE), page count of the database (u64 LE),
//! a reserved u32 (zero), then for each page its number (u32 LE, 1-based)
//! and its bytes, ending with page number 0. The end marker lets a reader
//! tell a complete stream from a truncated one before the hashes do.
//!
//! Page index (inside `pages.zst.age`): `b"DRPIDX01"`, page size (u32 LE),
//! count (u32 LE), then 16 bytes of BLAKE3 per page in page order.

use std::io::{self, Read, Write};

const PAGES_MAGIC: &[u8; 8] = b"DRPAGES1";
const INDEX_MAGIC: &[u8; 8] = b"DRPIDX01";

/// Bytes of page hash kept per page: collisions are out of reach at 128 bits.
pub const HASH_LEN: usize = 16;

/// Hash of one page for the index.
pub fn page_hash(page: &[u8]) -> [u8; HASH_LEN] {
    let h = blake3::hash(page);
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(&h.as_bytes()[..HASH_LEN]);
    out
}

/// Hashes a snapshot's pages on a second core while SQLite reads the next
/// ones: in a diff, hashing every page to compare it with the full's index
/// is as much work as reading it.
#[derive(Debug)]
pub struct HashAhead {
    page_size: usize,
    batch: Vec<u8>,
    first: u32,
    work: std::sync::mpsc::SyncSender<(u32, Vec<u8>)>,
    done: std::sync::mpsc::Receiver<Hashed>,
    spare: Vec<Vec<u8>>,
    in_flight: usize,
    worker: std::thread::JoinHandle<()>,
}

/// A batch of pages back from the hashing thread: first page number, the
/// pages, and their hashes.
type Hashed = (u32, Vec<u8>, Vec<[u8; HASH_LEN]>);

fn hasher_gone() -> crate::error::Error {
    crate::error::Error::Other("internal: the page hashing thread stopped".into())
}

impl HashAhead {
    const BATCH_PAGES: usize = 256;
    const MAX_IN_FLIGHT: usize = 2;

    pub fn start(page_size: u32) -> Self {
        let page_size = page_size as usize;
        let (work, jobs) = std::sync::mpsc::sync_channel::<(u32, Vec<u8>)>(Self::MAX_IN_FLIGHT);
        let (results, done) = std::sync::mpsc::sync_channel::<Hashed>(Self::MAX_IN_FLIGHT + 1);
        let worker = std::thread::spawn(move || {
            for (first, pages) in jobs {
                let hashes = pages.chunks(page_size).map(page_hash).collect();
                if results.send((first, pages, hashes)).is_err() {
                    return;
                }
            }
        });
        HashAhead {
            page_size,
            batch: Vec::with_capacity(page_size * Self::BATCH_PAGES),
            first: 0,
            work,
            done,
            spare: Vec::new(),
            in_flight: 0,
            worker,
        }
    }

    /// Queues page `pgno` (pages come in order, without gaps); `sink` gets
    /// earlier pages, in order, with their hashes, as they come back.
    pub fn push(
        &mut self,
        pgno: u32,
        data: &[u8],
        mut sink: impl FnMut(u32, &[u8], [u8; HASH_LEN]) -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        if self.batch.is_empty() {
            self.first = pgno;
        }
        self.batch.extend_from_slice(data);
        if self.batch.len() >= self.page_size * Self::BATCH_PAGES {
            self.send()?;
            while self.in_flight > Self::MAX_IN_FLIGHT {
                self.take_one(&mut sink)?;
            }
        }
        Ok(())
    }

    /// Hands every page still queued to `sink` and stops the thread.
    pub fn finish(
        mut self,
        mut sink: impl FnMut(u32, &[u8], [u8; HASH_LEN]) -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        if !self.batch.is_empty() {
            self.send()?;
        }
        while self.in_flight > 0 {
            self.take_one(&mut sink)?;
        }
        let HashAhead { work, worker, .. } = self;
        drop(work);
        worker.join().map_err(|_| hasher_gone())
    }

    fn send(&mut self) -> crate::error::Result<()> {
        let next = self.spare.pop().unwrap_or_default();
        let full = std::mem::replace(&mut self.batch, next);
        self.batch.clear();
        self.work
            .send((self.first, full))
            .map_err(|_| hasher_gone())?;
        self.in_flight += 1;
        Ok(())
    }

    fn take_one(
        &mut self,
        sink: &mut impl FnMut(u32, &[u8], [u8; HASH_LEN]) -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        let (first, pages, hashes) = self.done.recv().map_err(|_| hasher_gone())?;
        self.in_flight -= 1;
        for ((n, page), h) in (first..).zip(pages.chunks(self.page_size)).zip(hashes) {
            sink(n, page, h)?;
        }
        self.spare.push(pages);
        Ok(())
    }
}

/// Writes a page stream.
#[derive(Debug)]
pub struct PageWriter<W: Write> {
    out: W,
    page_size: u32,
    written: u64,
}

impl<W: Write> PageWriter<W> {
    /// Writes the header. `stored` is how many pages will follow (0 if unknown).
    pub fn new(mut out: W, page_size: u32, page_count: u64) -> io::Result<Self> {
        out.write_all(PAGES_MAGIC)?;
        out.write_all(&page_size.to_le_bytes())?;
        out.write_all(&page_count.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        Ok(PageWriter {
            out,
            page_size,
            written: 0,
        })
    }

    /// Appends one page.
    pub fn page(&mut self, pgno: u32, data: &[u8]) -> io::Result<()> {
        if pgno == 0 || data.len() != self.page_size as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "page {pgno} has {} bytes, expected {}",
                    data.len(),
                    self.page_size
                ),
            ));
        }
        self.out.write_all(&pgno.to_le_bytes())?;
        self.out.write_all(data)?;
        self.written += 1;
        Ok(())
    }

    /// Writes the end marker and returns the writer and how many pages were written.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.out.write_all(&0u32.to_le_bytes())?;
        Ok((self.out, self.written))
    }
}

/// Bytes of a page stream's header: its magic, page size (u32 LE), page
/// count (u64 LE) and a reserved u32. Each page follows as its number
/// (u32 LE) and its bytes; a page number 0 ends the stream.
pub const STREAM_HEADER: usize = 24;

/// A page stream header's page size and page count, or why it is not one.
pub fn parse_stream_header(hdr: &[u8; STREAM_HEADER]) -> io::Result<(u32, u64)> {
    if &hdr[..8] != PAGES_MAGIC {
        return Err(bad("not a dr page stream"));
    }
    let page_size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let mut pc = [0u8; 8];
    pc.copy_from_slice(&hdr[12..20]);
    let page_count = u64::from_le_bytes(pc);
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(bad(format!(
            "page size {page_size} is not a SQLite page size"
        )));
    }
    Ok((page_size, page_count))
}

/// Reads a page stream.
#[derive(Debug)]
pub struct PageReader<R: Read> {
    input: R,
    pub page_size: u32,
    pub page_count: u64,
    buf: Vec<u8>,
    ended: bool,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<R: Read> PageReader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> io::Result<Self> {
        let mut hdr = [0u8; STREAM_HEADER];
        input.read_exact(&mut hdr)?;
        let (page_size, page_count) = parse_stream_header(&hdr)?;
        Ok(PageReader {
            input,
            page_size,
            page_count,
            buf: vec![0u8; page_size as usize],
            ended: false,
        })
    }

    /// The next page, or `None` after the end marker.
    pub fn next_page(&mut self) -> io::Result<Option<(u32, &[u8])>> {
        if self.ended {
            return Ok(None);
        }
        let mut no = [0u8; 4];
        self.input.read_exact(&mut no).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                bad("page stream is truncated")
            } else {
                e
            }
        })?;
        let pgno = u32::from_le_bytes(no);
        if pgno == 0 {
            self.ended = true;
            // Read to the end so the codec can check the hashes.
            let mut rest = [0u8; 64];
            if self.input.read(&mut rest)? != 0 {
                return Err(bad("data after the end of the page stream"));
            }
            return Ok(None);
        }
        if u64::from(pgno) > self.page_count {
            return Err(bad(format!(
                "page {pgno} is beyond the page count {}",
                self.page_count
            )));
        }
        self.input.read_exact(&mut self.buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                bad("page stream is truncated")
            } else {
                e
            }
        })?;
        Ok(Some((pgno, &self.buf)))
    }
}

/// Writes the page index of a full as its pages go by, so memory does not
/// grow with the database.
#[derive(Debug)]
pub struct IndexWriter<W: Write> {
    out: W,
    count: u32,
    written: u32,
}

impl<W: Write> IndexWriter<W> {
    /// Writes the header for `count` pages of `page_size` bytes.
    pub fn new(mut out: W, page_size: u32, count: u32) -> io::Result<Self> {
        out.write_all(INDEX_MAGIC)?;
        out.write_all(&page_size.to_le_bytes())?;
        out.write_all(&count.to_le_bytes())?;
        Ok(IndexWriter {
            out,
            count,
            written: 0,
        })
    }

    /// Appends the hash of the next page.
    pub fn push(&mut self, hash: &[u8; HASH_LEN]) -> io::Result<()> {
        self.written += 1;
        self.out.write_all(hash)
    }

    /// Checks that every page was written and returns the writer.
    pub fn finish(self) -> io::Result<W> {
        if self.written != self.count {
            return Err(bad(format!(
                "page index has {} hashes, expected {}",
                self.written, self.count
            )));
        }
        Ok(self.out)
    }
}

/// Reads a page index in page order, one hash at a time.
#[derive(Debug)]
pub struct IndexReader<R: Read> {
    input: R,
    pub page_size: u32,
    pub count: u32,
    read: u32,
}

impl<R: Read> IndexReader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> io::Result<Self> {
        let mut hdr = [0u8; 16];
        input.read_exact(&mut hdr)?;
        if &hdr[..8] != INDEX_MAGIC {
            return Err(bad("not a dr page index"));
        }
        let page_size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(bad(format!(
                "page index has page size {page_size}, not a SQLite page size"
            )));
        }
        Ok(IndexReader {
            input,
            page_size,
            count: u32::from_le_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]),
            read: 0,
        })
    }

    /// What is after the hashes read so far.
    pub fn into_inner(self) -> R {
        self.input
    }

    /// The hash of the next page, or `None` past the last indexed page.
    pub fn next_hash(&mut self) -> io::Result<Option<[u8; HASH_LEN]>> {
        if self.read == self.count {
            return Ok(None);
        }
        let mut h = [0u8; HASH_LEN];
        self.input.read_exact(&mut h).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                bad("page index is truncated")
            } else {
                e
            }
        })?;
        self.read += 1;
        Ok(Some(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_stream_round_trip_and_truncation() {
        let mut w = PageWriter::new(Vec::new(), 512, 3).expect("w");
        w.page(1, &[1u8; 512]).expect("p1");
        w.page(3, &[3u8; 512]).expect("p3");
        let (buf, n) = w.finish().expect("finish");
        assert_eq!(n, 2);
        let mut r = PageReader::new(&buf[..]).expect("r");
        assert_eq!(r.page_count, 3);
        assert_eq!(
            r.next_page().expect("p").map(|(n, d)| (n, d[0])),
            Some((1, 1))
        );
        assert_eq!(
            r.next_page().expect("p").map(|(n, d)| (n, d[0])),
            Some((3, 3))
        );
        assert!(r.next_page().expect("end").is_none());
        let mut r = PageReader::new(&buf[..buf.len() - 4]).expect("r");
        r.next_page().expect("p1");
        r.next_page().expect("p3");
        assert!(r.next_page().is_err(), "missing end marker is an error");
    }

    #[test]
    fn hash_ahead_hands_back_every_page_in_order_with_its_hash() {
        // Not a multiple of the batch, so the last batch is partial.
        let n = HashAhead::BATCH_PAGES as u32 * 3 + 17;
        let page = |i: u32| vec![(i % 251) as u8; 512];
        let mut seen = Vec::new();
        let mut ha = HashAhead::start(512);
        for i in 1..=n {
            ha.push(i, &page(i), |p, d, h| {
                seen.push((p, d == page(p).as_slice(), h == page_hash(&page(p))));
                Ok(())
            })
            .expect("push");
        }
        ha.finish(|p, d, h| {
            seen.push((p, d == page(p).as_slice(), h == page_hash(&page(p))));
            Ok(())
        })
        .expect("finish");
        assert_eq!(seen.len(), n as usize);
        for (i, (p, same, hashed)) in seen.into_iter().enumerate() {
            assert_eq!(p, i as u32 + 1);
            assert!(same && hashed, "page {p}");
        }
    }

    #[test]
    fn index_round_trip() {
        let mut w = IndexWriter::new(Vec::new(), 4096, 2).expect("w");
        w.push(&page_hash(b"a")).expect("a");
        w.push(&page_hash(b"b")).expect("b");
        let buf = w.finish().expect("finish");
        let mut r = IndexReader::new(&buf[..]).expect("r");
        assert_eq!((r.page_size, r.count), (4096, 2));
        assert_eq!(r.next_hash().expect("1"), Some(page_hash(b"a")));
        assert_eq!(r.next_hash().expect("2"), Some(page_hash(b"b")));
        assert_eq!(r.next_hash().expect("end"), None);
        let mut short = IndexWriter::new(Vec::new(), 4096, 2).expect("w");
        short.push(&page_hash(b"a")).expect("a");
        assert!(short.finish().is_err(), "a short index is refused");
        let mut r = IndexReader::new(&buf[..buf.len() - 1]).expect("r");
        r.next_hash().expect("1");
        assert!(r.next_hash().is_err(), "a truncated index is refused");
    }
}
