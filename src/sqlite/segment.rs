//! The plaintext of a WAL segment: whole committed transactions, each with
//! the time dr saw it commit, so a restore can stop at any instant.
//!
//! ```text
//! "DRWALSG1" | page_size u32 | reserved u32 | first_seq u64
//! repeat: nframes u32 (> 0) | db_pages u32 | commit_ms i64
//!         nframes x (pgno u32 | page)
//! end: nframes 0 u32 | sha256 of every byte before it (32 bytes)
//! ```
//! Little-endian. The trailing hash makes a segment check itself, with or
//! without encryption: nothing is applied from a segment that fails it
//! because the reader buffers nothing and the restore only renames a file
//! after every segment it used has been read to its end. A follower
//! reading an encrypted segment relies on age's authentication instead of
//! the hash ([`SegmentReader::sealed`]); restore and verify keep both.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"DRWALSG1";

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Writes a segment; frames go straight through, nothing is buffered.
pub struct SegmentWriter<W: Write> {
    out: W,
    hash: Sha256,
    page_size: u32,
    pending: u32,
    frames: u64,
}

impl<W: Write> std::fmt::Debug for SegmentWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SegmentWriter({} frames)", self.frames)
    }
}

impl<W: Write> SegmentWriter<W> {
    pub fn new(out: W, page_size: u32, first_seq: u64) -> io::Result<Self> {
        let mut w = SegmentWriter {
            out,
            hash: Sha256::new(),
            page_size,
            pending: 0,
            frames: 0,
        };
        w.put(MAGIC)?;
        w.put(&page_size.to_le_bytes())?;
        w.put(&0u32.to_le_bytes())?;
        w.put(&first_seq.to_le_bytes())?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.hash.update(b);
        self.out.write_all(b)
    }

    /// Starts a transaction of `nframes` frames; exactly that many `frame` calls follow.
    pub fn txn(&mut self, nframes: u32, db_pages: u32, commit_ms: i64) -> io::Result<()> {
        if self.pending != 0 || nframes == 0 {
            return Err(bad("internal: segment transaction framing"));
        }
        self.put(&nframes.to_le_bytes())?;
        self.put(&db_pages.to_le_bytes())?;
        self.put(&commit_ms.to_le_bytes())?;
        self.pending = nframes;
        Ok(())
    }

    pub fn frame(&mut self, pgno: u32, page: &[u8]) -> io::Result<()> {
        if self.pending == 0 || page.len() != self.page_size as usize || pgno == 0 {
            return Err(bad("internal: segment frame out of place"));
        }
        self.put(&pgno.to_le_bytes())?;
        self.put(page)?;
        self.pending -= 1;
        self.frames += 1;
        Ok(())
    }

    /// Frames written so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    pub fn finish(mut self) -> io::Result<W> {
        if self.pending != 0 {
            return Err(bad("internal: segment ends inside a transaction"));
        }
        self.put(&0u32.to_le_bytes())?;
        let sum = std::mem::take(&mut self.hash).finalize();
        self.out.write_all(&sum)?;
        Ok(self.out)
    }
}

/// One transaction's header, as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnHeader {
    pub nframes: u32,
    pub db_pages: u32,
    pub commit_ms: i64,
}

/// Reads a segment, checking its framing and, at the end, its hash.
pub struct SegmentReader<R: Read> {
    input: R,
    hash: Sha256,
    /// The trailing hash is compared (see [`SegmentReader::sealed`]).
    hashing: bool,
    pub page_size: u32,
    pub first_seq: u64,
    pending: u32,
    page: Vec<u8>,
    done: bool,
}

impl<R: Read> std::fmt::Debug for SegmentReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SegmentReader(first_seq {})", self.first_seq)
    }
}

impl<R: Read> SegmentReader<R> {
    pub fn new(input: R) -> io::Result<Self> {
        Self::open(input, true)
    }

    /// A segment read out of age, whose ChaCha20-Poly1305 has already
    /// authenticated every byte of the stored stream and its end: the
    /// writer's SHA-256 over the same plaintext would catch nothing more
    /// than a zstd decoding defect, and costs a standby applying a segment
    /// a second a quarter of its CPU. The framing is still checked to the
    /// last byte. A restore keeps the hash (`new`).
    pub fn sealed(input: R) -> io::Result<Self> {
        Self::open(input, false)
    }

    fn open(mut input: R, hashing: bool) -> io::Result<Self> {
        let mut head = [0u8; 24];
        input.read_exact(&mut head)?;
        if &head[0..8] != MAGIC {
            return Err(bad("not a dr WAL segment (bad magic)"));
        }
        let page_size = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(bad(format!("segment has a bad page size {page_size}")));
        }
        let mut hash = Sha256::new();
        hash.update(head);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&head[16..24]);
        Ok(SegmentReader {
            input,
            hash,
            hashing,
            page_size,
            first_seq: u64::from_le_bytes(seq),
            pending: 0,
            page: vec![0u8; page_size as usize],
            done: false,
        })
    }

    fn take(&mut self, n: usize) -> io::Result<[u8; 16]> {
        let mut b = [0u8; 16];
        self.input.read_exact(&mut b[..n])?;
        if self.hashing {
            self.hash.update(&b[..n]);
        }
        Ok(b)
    }

    /// The next transaction, or `None` at the (verified) end.
    pub fn next_txn(&mut self) -> io::Result<Option<TxnHeader>> {
        while self.pending > 0 {
            self.next_frame()?;
        }
        if self.done {
            return Ok(None);
        }
        let b = self.take(4)?;
        let nframes = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if nframes == 0 {
            let mut sum = [0u8; 32];
            self.input.read_exact(&mut sum)?;
            if self.hashing && std::mem::take(&mut self.hash).finalize().as_slice() != sum {
                return Err(bad("segment checksum does not match its contents"));
            }
            let mut extra = [0u8; 1];
            if self.input.read(&mut extra)? != 0 {
                return Err(bad("bytes after the end of the segment"));
            }
            self.done = true;
            return Ok(None);
        }
        let b = self.take(12)?;
        let db_pages = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let mut ms = [0u8; 8];
        ms.copy_from_slice(&b[4..12]);
        self.pending = nframes;
        Ok(Some(TxnHeader {
            nframes,
            db_pages,
            commit_ms: i64::from_le_bytes(ms),
        }))
    }

    /// The next frame of the current transaction.
    pub fn next_frame(&mut self) -> io::Result<(u32, &[u8])> {
        if self.pending == 0 {
            return Err(bad("internal: no frame pending"));
        }
        let b = self.take(4)?;
        let pgno = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if pgno == 0 {
            return Err(bad("segment frame with page number 0"));
        }
        self.input.read_exact(&mut self.page)?;
        if self.hashing {
            self.hash.update(&self.page);
        }
        self.pending -= 1;
        Ok((pgno, &self.page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = SegmentWriter::new(Vec::new(), 512, 41).expect("test");
        w.txn(2, 3, 1_000).expect("test");
        w.frame(1, &[1u8; 512]).expect("test");
        w.frame(3, &[3u8; 512]).expect("test");
        w.txn(1, 3, 2_000).expect("test");
        w.frame(2, &[2u8; 512]).expect("test");
        assert_eq!(w.frames(), 3);
        w.finish().expect("test")
    }

    #[test]
    fn round_trip() {
        let b = sample();
        let mut r = SegmentReader::new(&b[..]).expect("test");
        assert_eq!(r.first_seq, 41);
        let t = r.next_txn().expect("test").expect("test");
        assert_eq!((t.nframes, t.db_pages, t.commit_ms), (2, 3, 1_000));
        assert_eq!(r.next_frame().expect("test").0, 1);
        assert_eq!(r.next_frame().expect("test").0, 3);
        let t = r.next_txn().expect("test").expect("test");
        assert_eq!(t.commit_ms, 2_000);
        let (p, page) = r.next_frame().expect("test");
        assert_eq!((p, page[0]), (2, 2));
        assert_eq!(r.next_txn().expect("test"), None);
    }

    #[test]
    fn a_flipped_byte_fails_at_the_end() {
        let mut b = sample();
        b[100] ^= 1;
        let mut r = SegmentReader::new(&b[..]).expect("test");
        let mut err = None;
        loop {
            match r.next_txn() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert!(err.is_some());
    }

    /// Sealed (inside age, which authenticates it), a segment is read
    /// without its hash, its framing still checked to the last byte.
    #[test]
    fn a_sealed_segment_reads_the_same_and_its_framing_is_still_checked() {
        let b = sample();
        let read = |mut r: SegmentReader<&[u8]>| -> io::Result<Vec<u32>> {
            let mut pages = Vec::new();
            while let Some(t) = r.next_txn()? {
                for _ in 0..t.nframes {
                    pages.push(r.next_frame()?.0);
                }
            }
            Ok(pages)
        };
        assert_eq!(
            read(SegmentReader::sealed(&b[..]).expect("test")).expect("reads"),
            read(SegmentReader::new(&b[..]).expect("test")).expect("reads")
        );
        let mut longer = b.clone();
        longer.push(0);
        assert!(read(SegmentReader::sealed(&longer[..]).expect("test")).is_err());
        let short = &b[..b.len() - 1];
        assert!(read(SegmentReader::sealed(short).expect("test")).is_err());
    }
}
