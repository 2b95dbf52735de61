//! Reading a live SQLite `-wal` file the way SQLite's own recovery does.
//!
//! A frame counts only if its salts match the header's and the cumulative
//! checksum, chained from the header through every earlier frame, matches.
//! A transaction counts only once its commit frame (non-zero "database size
//! after commit") is valid. Anything else (frames from an older incarnation
//! of the file, a half-written frame, a rolled-back spill) stops the scan,
//! exactly where SQLite would stop replaying it after a crash.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Size of the WAL header and of each frame header.
pub const HEADER_LEN: u64 = 32;
const FRAME_HEADER_LEN: u64 = 24;
const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;

/// The 32-byte header of a WAL file: it names one incarnation of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    /// Checksums are computed on big-endian words (magic ends in 3).
    pub big_endian: bool,
    pub page_size: u32,
    pub checkpoint_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    /// The header's own checksum: the seed of frame 1's checksum.
    pub checksum: (u32, u32),
}

impl WalHeader {
    /// Byte offset of frame `n` (1-based).
    pub fn frame_offset(&self, n: u64) -> u64 {
        HEADER_LEN + (n - 1) * self.frame_len()
    }

    /// Length of one frame: header plus page.
    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN + u64::from(self.page_size)
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing from `s`.
fn checksum(big_endian: bool, data: &[u8], s: (u32, u32)) -> (u32, u32) {
    let (mut s0, mut s1) = s;
    for pair in data.chunks_exact(8) {
        let (x0, x1) = if big_endian {
            (be32(&pair[0..4]), be32(&pair[4..8]))
        } else {
            (
                u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]),
                u32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]),
            )
        };
        s0 = s0.wrapping_add(x0).wrapping_add(s1);
        s1 = s1.wrapping_add(x1).wrapping_add(s0);
    }
    (s0, s1)
}

/// Reads and checks the header; `None` when the file is shorter than a
/// header (absent, or truncated by a checkpoint) or the header is not valid.
pub fn read_header(f: &File) -> io::Result<Option<WalHeader>> {
    let mut b = [0u8; HEADER_LEN as usize];
    match f.read_exact_at(&mut b, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let magic = be32(&b[0..4]);
    let big_endian = match magic {
        MAGIC_LE => false,
        MAGIC_BE => true,
        _ => return Ok(None),
    };
    let page_size = be32(&b[8..12]);
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Ok(None);
    }
    let header = WalHeader {
        big_endian,
        page_size,
        checkpoint_seq: be32(&b[12..16]),
        salt1: be32(&b[16..20]),
        salt2: be32(&b[20..24]),
        checksum: (be32(&b[24..28]), be32(&b[28..32])),
    };
    if checksum(big_endian, &b[0..24], (0, 0)) != header.checksum {
        return Ok(None);
    }
    Ok(Some(header))
}

/// A committed transaction found in the WAL: frames `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Txn {
    pub first: u64,
    pub last: u64,
    /// Database size in pages after this commit.
    pub db_pages: u32,
    /// Cumulative checksum after the commit frame.
    pub checksum: (u32, u32),
}

/// Where a scan of one WAL incarnation stands: frames `1..=frame` are
/// committed and already consumed, and `checksum` is the running checksum
/// after frame `frame` (the header's checksum when `frame` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub header: WalHeader,
    pub frame: u64,
    pub checksum: (u32, u32),
}

impl Cursor {
    /// The start of an incarnation: nothing consumed yet.
    pub fn start(header: WalHeader) -> Self {
        Cursor {
            header,
            frame: 0,
            checksum: header.checksum,
        }
    }
}

/// Finds every committed transaction after `cur`, in order, without moving it.
/// Reads in 4 MiB blocks, so memory stays bounded.
pub fn scan(f: &File, cur: &Cursor) -> io::Result<Vec<Txn>> {
    scan_at_most(f, cur, u64::MAX).map(|(t, _)| t)
}

/// [`scan`], stopping after about `max_frames` frames; the flag says
/// whether it stopped early (there may be more).
pub fn scan_at_most(f: &File, cur: &Cursor, max_frames: u64) -> io::Result<(Vec<Txn>, bool)> {
    let h = cur.header;
    let flen = h.frame_len() as usize;
    let per_block = (4usize << 20).div_ceil(flen).max(1);
    // The buffer holds what the file has past the cursor, up to a block: a
    // busy WAL is scanned many times a second for a few frames each time,
    // and zeroing a whole 4 MiB block per look was most of a busy fleet's
    // CPU. Frames appended after this length are seen by the next look.
    let len = f.metadata()?.len();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut n = cur.frame; // last frame validated
    let mut sum = cur.checksum;
    let mut txn_first = cur.frame + 1;
    loop {
        let off = h.frame_offset(n + 1);
        let there = usize::try_from(len.saturating_sub(off) / flen as u64).unwrap_or(per_block);
        let want = there.min(per_block);
        if want == 0 {
            return Ok((out, false));
        }
        buf.resize(want * flen, 0);
        let got = read_at_most(f, &mut buf, off)?;
        let whole = got / flen;
        if whole == 0 {
            return Ok((out, false));
        }
        for i in 0..whole {
            let fr = &buf[i * flen..(i + 1) * flen];
            if be32(&fr[8..12]) != h.salt1 || be32(&fr[12..16]) != h.salt2 {
                return Ok((out, false));
            }
            let s = checksum(h.big_endian, &fr[0..8], sum);
            let s = checksum(h.big_endian, &fr[FRAME_HEADER_LEN as usize..], s);
            if s != (be32(&fr[16..20]), be32(&fr[20..24])) {
                return Ok((out, false));
            }
            if be32(&fr[0..4]) == 0 {
                return Ok((out, false));
            }
            sum = s;
            n += 1;
            let db_pages = be32(&fr[4..8]);
            if db_pages != 0 {
                out.push(Txn {
                    first: txn_first,
                    last: n,
                    db_pages,
                    checksum: s,
                });
                txn_first = n + 1;
            }
        }
        if whole < want {
            return Ok((out, false));
        }
        if n - cur.frame >= max_frames {
            return Ok((out, true));
        }
    }
}

/// Calls `each(pgno, page)` for frames `first..=last`, which a scan validated.
pub fn read_frames(
    f: &File,
    h: &WalHeader,
    first: u64,
    last: u64,
    mut each: impl FnMut(u32, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let flen = h.frame_len() as usize;
    let per_block = (4usize << 20).div_ceil(flen).max(1);
    // Only as large as the frames asked for (a commit is often a few pages).
    let span = usize::try_from(last.saturating_sub(first) + 1).unwrap_or(per_block);
    let mut buf = vec![0u8; span.min(per_block) * flen];
    let mut next = first;
    while next <= last {
        let count = usize::try_from((last - next + 1).min(per_block as u64)).unwrap_or(1);
        let want = &mut buf[..count * flen];
        f.read_exact_at(want, h.frame_offset(next))?;
        for fr in want.chunks_exact(flen) {
            each(be32(&fr[0..4]), &fr[FRAME_HEADER_LEN as usize..])?;
        }
        next += count as u64;
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes at `off`, fewer at end of file.
fn read_at_most(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn wal_of(dir: &std::path::Path) -> (Connection, std::path::PathBuf) {
        let db = dir.join("t.db");
        let c = Connection::open(&db).expect("test");
        c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x);")
            .expect("test");
        (c, dir.join("t.db-wal"))
    }

    #[test]
    fn finds_each_commit_and_stops_at_damage() {
        let dir = tempfile::tempdir().expect("test");
        let (c, wal) = wal_of(dir.path());
        for i in 0..5 {
            c.execute("INSERT INTO t VALUES (?1)", [i]).expect("test");
        }
        let f = File::open(&wal).expect("test");
        let h = read_header(&f).expect("test").expect("header");
        let txns = scan(&f, &Cursor::start(h)).expect("test");
        // CREATE TABLE plus five inserts.
        assert_eq!(txns.len(), 6);
        assert_eq!(txns[0].first, 1);
        for w in txns.windows(2) {
            assert_eq!(w[1].first, w[0].last + 1);
        }
        // Resuming after the third commit finds the rest.
        let mid = Cursor {
            header: h,
            frame: txns[2].last,
            checksum: txns[2].checksum,
        };
        assert_eq!(scan(&f, &mid).expect("test"), txns[3..].to_vec());

        // A flipped byte in frame 4's page ends the valid log before it.
        let bad = h.frame_offset(txns[3].first) + FRAME_HEADER_LEN + 100;
        let rw = std::fs::OpenOptions::new()
            .write(true)
            .open(&wal)
            .expect("test");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, bad).expect("test");
        rw.write_all_at(&[b[0] ^ 0xff], bad).expect("test");
        assert_eq!(
            scan(&f, &Cursor::start(h)).expect("test"),
            txns[..3].to_vec()
        );
    }

    #[test]
    fn rejects_a_file_that_is_not_a_wal() {
        let dir = tempfile::tempdir().expect("test");
        let p = dir.path().join("x");
        std::fs::write(&p, [7u8; 64]).expect("test");
        assert_eq!(
            read_header(&File::open(&p).expect("test")).expect("test"),
            None
        );
        std::fs::write(&p, []).expect("test");
        assert_eq!(
            read_header(&File::open(&p).expect("test")).expect("test"),
            None
        );
    }
}
