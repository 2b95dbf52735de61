//! Repository format 2's data object: the page stream cut into frames
//! that decode on their own, so that a backup compresses and a restore
//! decompresses and checks them on every core while one thread reads and
//! decrypts (format 1's single zstd frame decodes on one core).
//!
//! Layout of the plaintext inside age (or of the stored bytes when the
//! policy does not encrypt), for each frame in order:
//!
//! - a zstd *skippable* frame: magic `0x184D2A5D` (u32 LE), length 48
//!   (u32 LE), then `"DRF2"`, the frame's plain length (u32 LE), its
//!   compressed length (u32 LE), a reserved u32 (zero) and the BLAKE3 of
//!   its plain bytes (32 bytes);
//! - one zstd frame of that compressed length (content size recorded, no
//!   zstd checksum: BLAKE3 covers it).
//!
//! Concatenated frames are still one valid zstd stream, so `age -d |
//! zstd -d` reads a format 2 object without dr.
//!
//! The manifest binds the frames together ([`Framed`]): `plain_blake3` is
//! the BLAKE3 of, for each frame in order, its plain length (u64 LE) and
//! its hash; `stored_blake3` is the BLAKE3 of the stored bytes. One changed
//! byte anywhere is refused and named: inside a frame by its hash (or by
//! zstd), in a header by the fold, anywhere in the stored bytes by age's
//! authentication and the stored hash.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::{Mismatch, read_full};

/// The skippable frame's magic (zstd reserves 0x184D2A50..=0x184D2A5F).
const MAGIC: u32 = 0x184D_2A5D;
const TAG: &[u8; 4] = b"DRF2";
/// Bytes of a frame header's content, after the skippable frame's 8.
const HEADER: u32 = 48;
const HEAD_LEN: usize = 8 + HEADER as usize;
/// Plain bytes per frame when the policy does not say: measured on a 1 GiB
/// database (README, "Repository format 2"): large enough that independent
/// frames cost nothing in ratio at level 3 (its window is 2 MiB), small
/// enough that a window of frames in flight stays a few tens of MiB.
pub const DEFAULT_FRAME: u32 = 4 << 20;
/// The bounds a policy's `compression.frame` must keep, and a reader's
/// limit: a damaged unencrypted header must not make it allocate
/// gigabytes.
pub const MIN_FRAME: u32 = 64 << 10;
pub const MAX_FRAME: u32 = 64 << 20;

/// What a format 2 object's manifest digest adds: how it was cut and the
/// digests that bind its frames together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Framed {
    /// Plain bytes per frame; the last one may be shorter.
    pub frame_size: u32,
    pub frames: u64,
    /// BLAKE3 over each frame's plain length (u64 LE) and plain BLAKE3.
    pub plain_blake3: String,
    /// BLAKE3 of the stored bytes.
    pub stored_blake3: String,
}

fn mismatch(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Mismatch(msg))
}

fn stopped() -> io::Error {
    io::Error::other("internal: a frame coding thread stopped")
}

/// Threads that compress or decompress frames: one per core this process
/// may run on (`taskset` included).
fn workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The running digest both sides compute over the frames' headers.
#[derive(Default)]
struct Fold {
    hash: blake3::Hasher,
    frames: u64,
    plain: u64,
}

impl Fold {
    fn add(&mut self, len: usize, hash: &[u8; 32]) {
        self.hash.update(&(len as u64).to_le_bytes());
        self.hash.update(hash);
        self.frames += 1;
        self.plain += len as u64;
    }
}

fn header(plain_len: usize, comp_len: usize, hash: &[u8; 32]) -> [u8; HEAD_LEN] {
    let mut h = [0u8; HEAD_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&HEADER.to_le_bytes());
    h[8..12].copy_from_slice(TAG);
    h[12..16].copy_from_slice(&(plain_len as u32).to_le_bytes());
    h[16..20].copy_from_slice(&(comp_len as u32).to_le_bytes());
    h[24..56].copy_from_slice(hash);
    h
}

/// A frame compressed by a worker, with its plain buffer to reuse.
struct Compressed {
    seq: u64,
    plain: Vec<u8>,
    comp: Vec<u8>,
    hash: [u8; 32],
}

type CompressJob = (u64, Vec<u8>, Vec<u8>);

/// Cuts what is written into frames and compresses them on every core;
/// frames are written to `out` in order.
pub struct FrameWriter<W: Write> {
    out: W,
    frame_size: usize,
    buf: Vec<u8>,
    jobs: Option<SyncSender<CompressJob>>,
    done: Receiver<io::Result<Compressed>>,
    threads: Vec<JoinHandle<()>>,
    in_flight: u64,
    sent: u64,
    written: u64,
    ready: BTreeMap<u64, Compressed>,
    spare: Vec<(Vec<u8>, Vec<u8>)>,
    fold: Fold,
}

/// What a finished [`FrameWriter`] wrote, before the stored digest.
pub struct Written {
    pub frames: u64,
    pub plain_size: u64,
    pub plain_blake3: String,
}

impl<W: Write> FrameWriter<W> {
    /// `frame_size` is within [`MIN_FRAME`]..=[`MAX_FRAME`] (the caller
    /// clamps it, and records it).
    pub fn new(out: W, level: i32, frame_size: u32) -> Self {
        let n = workers();
        let (jobs, rx) = sync_channel::<CompressJob>(n);
        let rx = Arc::new(Mutex::new(rx));
        let (tx, done) = channel();
        let threads = (0..n)
            .map(|_| {
                let (rx, tx) = (rx.clone(), tx.clone());
                std::thread::spawn(move || compress_frames(level, &rx, &tx))
            })
            .collect();
        let frame_size = frame_size as usize;
        FrameWriter {
            out,
            frame_size,
            buf: Vec::with_capacity(frame_size),
            jobs: Some(jobs),
            done,
            threads,
            in_flight: n as u64 + 2,
            sent: 0,
            written: 0,
            ready: BTreeMap::new(),
            spare: Vec::new(),
            fold: Fold::default(),
        }
    }

    fn dispatch(&mut self) -> io::Result<()> {
        let (mut next, comp) = self.spare.pop().unwrap_or_default();
        next.clear();
        next.reserve(self.frame_size);
        let plain = std::mem::replace(&mut self.buf, next);
        while self.sent - self.written >= self.in_flight {
            self.collect()?;
        }
        let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
        jobs.send((self.sent, plain, comp)).map_err(|_| stopped())?;
        self.sent += 1;
        Ok(())
    }

    /// Waits for one compressed frame and writes every frame now in order.
    fn collect(&mut self) -> io::Result<()> {
        let c = self.done.recv().map_err(|_| stopped())??;
        self.ready.insert(c.seq, c);
        while let Some(c) = self.ready.remove(&self.written) {
            self.out
                .write_all(&header(c.plain.len(), c.comp.len(), &c.hash))?;
            self.out.write_all(&c.comp)?;
            self.fold.add(c.plain.len(), &c.hash);
            self.written += 1;
            self.spare.push((c.plain, c.comp));
        }
        Ok(())
    }

    /// Writes the last frame and returns the writer underneath.
    pub fn finish(mut self) -> io::Result<(W, Written)> {
        if !self.buf.is_empty() {
            self.dispatch()?;
        }
        self.jobs = None;
        while self.written < self.sent {
            self.collect()?;
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let written = Written {
            frames: self.fold.frames,
            plain_size: self.fold.plain,
            plain_blake3: self.fold.hash.finalize().to_hex().to_string(),
        };
        Ok((self.out, written))
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = (self.frame_size - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.frame_size {
            self.dispatch()?;
        }
        Ok(n)
    }

    /// A frame is written whole or not at all: nothing to flush before
    /// [`FrameWriter::finish`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn compress_frames(
    level: i32,
    jobs: &Mutex<Receiver<CompressJob>>,
    done: &Sender<io::Result<Compressed>>,
) {
    let mut z = match zstd::bulk::Compressor::new(level) {
        Ok(z) => z,
        Err(e) => {
            let _ = done.send(Err(e));
            return;
        }
    };
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((seq, plain, mut comp)) = job else {
            return;
        };
        let hash = *blake3::hash(&plain).as_bytes();
        comp.clear();
        comp.reserve(zstd::zstd_safe::compress_bound(plain.len()));
        let result = z
            .compress_to_buffer(&plain[..], &mut comp)
            .map(|_| Compressed {
                seq,
                plain,
                comp,
                hash,
            });
        if done.send(result).is_err() {
            return;
        }
    }
}

/// A frame read and waiting for a worker.
struct DecodeJob {
    seq: u64,
    comp: Vec<u8>,
    plain_len: usize,
    hash: [u8; 32],
    out: Vec<u8>,
}

struct Decoded {
    seq: u64,
    plain: Vec<u8>,
    hash: [u8; 32],
}

/// The reading thread's end: frames read and the stored bytes' digest.
pub struct Ended {
    pub frames: u64,
    pub stored_size: u64,
    pub stored_blake3: String,
}

enum Msg {
    Frame(io::Result<Decoded>),
    End(io::Result<Ended>),
}

/// What the caller gives the reading thread to end with: drain and hash
/// what is left of the stored bytes.
pub type Finish = Box<dyn FnOnce() -> io::Result<(u64, String)> + Send>;

/// The plaintext of a format 2 object, in order: one thread reads (and
/// decrypts) the frames, every core decodes and checks them, and the
/// reader gets them back in order. Memory is a window of frames: a frame
/// buffer is handed back for the next read only once its bytes are used.
pub struct FrameReader {
    results: Receiver<Msg>,
    buffers: SyncSender<Vec<u8>>,
    ready: BTreeMap<u64, Decoded>,
    next: u64,
    end: Option<Ended>,
    chunk: Vec<u8>,
    pos: usize,
    fold: Fold,
    plain_size: u64,
    stored_size: u64,
    framed: Framed,
    done: bool,
    /// Buffers [`FrameReader::hold`] may still add to the window.
    room: usize,
}

impl FrameReader {
    /// Starts reading `opened` (the decrypted, or unencrypted, stored
    /// bytes). `finish` runs after its end; the digests are compared with
    /// `plain_size`, `stored_size` and `framed` at the reader's end.
    pub fn start(
        opened: Box<dyn Read + Send>,
        finish: Finish,
        plain_size: u64,
        stored_size: u64,
        framed: &Framed,
    ) -> Self {
        let n = workers();
        // Frames being decoded, one being read and one being consumed; a
        // consumer that keeps frames while it works on them adds room for
        // them ([`FrameReader::hold`]).
        let window = n + 2;
        let (buffers, free) = sync_channel::<Vec<u8>>(window + n);
        for _ in 0..window {
            let _ = buffers.try_send(Vec::new());
        }
        let (tx, results) = channel();
        let (jobs, rx) = sync_channel::<DecodeJob>(n);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..n {
            let (rx, tx) = (rx.clone(), tx.clone());
            std::thread::spawn(move || decode_frames(&rx, &tx));
        }
        let frame_size = u64::from(framed.frame_size);
        std::thread::spawn(move || {
            let ended = read_frames(opened, frame_size, &jobs, &free).and_then(|frames| {
                let (stored_size, stored_blake3) = finish()?;
                Ok(Ended {
                    frames,
                    stored_size,
                    stored_blake3,
                })
            });
            let _ = tx.send(Msg::End(ended));
        });
        FrameReader {
            results,
            buffers,
            ready: BTreeMap::new(),
            next: 0,
            end: None,
            chunk: Vec::new(),
            pos: 0,
            fold: Fold::default(),
            plain_size,
            stored_size,
            framed: framed.clone(),
            done: false,
            room: n,
        }
    }

    /// Adds room to the window for `frames` frames the consumer keeps while
    /// it works on them (at most one per decoding thread): without it the
    /// reading thread waits for a buffer while a core idles (a 1 GiB
    /// restore whose writers keep a frame each: 1.71–1.86 s with the window
    /// alone, 1.67–1.70 s with the room, three runs each).
    pub fn hold(&mut self, frames: usize) {
        let added = frames.min(self.room);
        for _ in 0..added {
            let _ = self.buffers.try_send(Vec::new());
        }
        self.room -= added;
    }

    fn check_end(&mut self, end: &Ended) -> io::Result<()> {
        let f = &self.framed;
        let plain = std::mem::take(&mut self.fold.hash).finalize().to_hex();
        let problem = if end.stored_size != self.stored_size {
            format!(
                "stored size is {} bytes, the manifest says {}",
                end.stored_size, self.stored_size
            )
        } else if end.stored_blake3 != f.stored_blake3 {
            format!(
                "stored BLAKE3 is {}, the manifest says {}",
                end.stored_blake3, f.stored_blake3
            )
        } else if self.fold.frames != f.frames {
            format!(
                "it holds {} frames, the manifest says {}",
                self.fold.frames, f.frames
            )
        } else if self.fold.plain != self.plain_size {
            format!(
                "plain size is {} bytes, the manifest says {}",
                self.fold.plain, self.plain_size
            )
        } else if plain.as_str() != f.plain_blake3 {
            "its frame headers differ from the manifest's plain_blake3 (a header was changed, or frames were moved)".into()
        } else {
            return Ok(());
        };
        Err(mismatch(problem))
    }
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FrameReader(frame {} of {})",
            self.next, self.framed.frames
        )
    }
}

impl FrameReader {
    /// The next frame's plain bytes, decoded and checked against its
    /// header, in order; `None` once the object's end has been checked
    /// against the manifest. For a consumer that works on whole frames
    /// (a restore writing pages on every core) without copying them out.
    /// Each buffer must come back through [`FrameReader::recycle`] once
    /// used: the window of frames in flight is made of them, and the
    /// reading thread waits for one to come back.
    pub fn next_frame(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(d) = self.ready.remove(&self.next) {
                self.fold.add(d.plain.len(), &d.hash);
                self.next += 1;
                return Ok(Some(d.plain));
            }
            if let Some(end) = self.end.take_if(|e| e.frames == self.next) {
                self.done = true;
                self.check_end(&end)?;
                return Ok(None);
            }
            match self.results.recv() {
                Ok(Msg::Frame(Ok(d))) => {
                    self.ready.insert(d.seq, d);
                }
                Ok(Msg::Frame(Err(e)) | Msg::End(Err(e))) => return Err(e),
                Ok(Msg::End(Ok(end))) => self.end = Some(end),
                Err(_) => return Err(stopped()),
            }
        }
    }

    /// Hands a frame's buffer back for a later frame. If the reading
    /// thread has stopped, it is just dropped.
    pub fn recycle(&self, spent: Vec<u8>) {
        let _ = self.buffers.try_send(spent);
    }
}

impl Read for FrameReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.chunk.len() {
                let n = buf.len().min(self.chunk.len() - self.pos);
                buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if buf.is_empty() {
                return Ok(0);
            }
            match self.next_frame()? {
                Some(plain) => {
                    let spent = std::mem::replace(&mut self.chunk, plain);
                    self.recycle(spent);
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
    }
}

/// The reading thread: parses each header, reads its frame and hands it
/// to a worker. Returns the number of frames.
fn read_frames(
    opened: Box<dyn Read + Send>,
    frame_size: u64,
    jobs: &SyncSender<DecodeJob>,
    free: &Receiver<Vec<u8>>,
) -> io::Result<u64> {
    let mut input = BufReader::with_capacity(256 << 10, opened);
    let max_comp = zstd::zstd_safe::compress_bound(MAX_FRAME as usize);
    let mut seq = 0u64;
    loop {
        let at = || format!("frame {seq} (plain bytes from {})", seq * frame_size);
        let mut head = [0u8; HEAD_LEN];
        match read_full(&mut input, &mut head)? {
            0 => return Ok(seq),
            HEAD_LEN => {}
            _ => {
                return Err(mismatch(format!(
                    "{}: the object ends inside its header",
                    at()
                )));
            }
        }
        let (plain_len, comp_len, hash) = parse_head(&head, max_comp, &at)?;
        let out = free.recv().map_err(|_| stopped())?;
        // Grown as bytes arrive: a header that claims 64 MiB in a short
        // object allocates only what is there.
        let mut comp = Vec::new();
        if (&mut input).take(comp_len as u64).read_to_end(&mut comp)? < comp_len {
            return Err(mismatch(format!("{}: the object ends inside it", at())));
        }
        let job = DecodeJob {
            seq,
            comp,
            plain_len,
            hash,
            out,
        };
        jobs.send(job).map_err(|_| stopped())?;
        seq += 1;
    }
}

/// A frame header's plain length, compressed length and BLAKE3, or why it
/// is not one (`at` names the frame).
fn parse_head(
    head: &[u8; HEAD_LEN],
    max_comp: usize,
    at: &dyn Fn() -> String,
) -> io::Result<(usize, usize, [u8; 32])> {
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if word(0) != MAGIC || word(4) != HEADER || &head[8..12] != TAG || word(20) != 0 {
        return Err(mismatch(format!(
            "{}: its header is not a dr frame header",
            at()
        )));
    }
    let (plain_len, comp_len) = (word(12) as usize, word(16) as usize);
    if plain_len == 0 || plain_len > MAX_FRAME as usize || comp_len > max_comp {
        return Err(mismatch(format!(
            "{}: its header gives impossible lengths ({plain_len} plain, {comp_len} compressed)",
            at()
        )));
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&head[24..56]);
    Ok((plain_len, comp_len, hash))
}

/// Decodes one frame into `out` and checks it against its header.
fn decode_frame(
    z: &mut zstd::bulk::Decompressor<'_>,
    seq: u64,
    comp: &[u8],
    plain_len: usize,
    hash: &[u8; 32],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    out.clear();
    out.reserve(plain_len);
    match z.decompress_to_buffer(comp, out) {
        Err(e) => Err(mismatch(format!(
            "frame {seq}: zstd cannot decode it ({e})"
        ))),
        Ok(n) if n != plain_len => Err(mismatch(format!(
            "frame {seq}: it decodes to {n} bytes, its header says {plain_len}"
        ))),
        Ok(_) if blake3::hash(out).as_bytes() != hash => Err(mismatch(format!(
            "frame {seq}: its bytes differ from the BLAKE3 in its header"
        ))),
        Ok(_) => Ok(()),
    }
}

/// A spot check of a format 2 object through a reader that seeks (the
/// decrypted object read by ranges): every frame header is read (seeking
/// over the compressed bytes) and their fold compared with the manifest's
/// `plain_blake3`, frame count and `plain_size`; then the frames `pick`
/// chooses among them are decoded and each checked against its header's
/// BLAKE3. Returns the frames decoded. What it cannot see is a changed
/// byte in a frame not picked: the stored bytes are not all read.
pub fn sample<R: Read + Seek>(
    r: &mut R,
    plain_size: u64,
    framed: &Framed,
    pick: impl FnOnce(u64) -> Vec<u64>,
) -> io::Result<Vec<u64>> {
    let max_comp = zstd::zstd_safe::compress_bound(MAX_FRAME as usize);
    let mut fold = Fold::default();
    let mut frames: Vec<(u64, usize, usize, [u8; 32])> = Vec::new();
    let mut pos = 0u64;
    let end = r.seek(SeekFrom::End(0))?;
    while pos < end {
        let seq = frames.len() as u64;
        let at = || format!("frame {seq} (stored at plain offset {pos})");
        let mut head = [0u8; HEAD_LEN];
        r.seek(SeekFrom::Start(pos))?;
        r.read_exact(&mut head).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                mismatch(format!("{}: the object ends inside its header", at()))
            }
            _ => e,
        })?;
        let (plain_len, comp_len, hash) = parse_head(&head, max_comp, &at)?;
        fold.add(plain_len, &hash);
        frames.push((pos + HEAD_LEN as u64, plain_len, comp_len, hash));
        pos += (HEAD_LEN + comp_len) as u64;
    }
    if pos != end {
        return Err(mismatch(format!(
            "the last frame's header runs past the object's end ({pos} of {end} bytes)"
        )));
    }
    let plain = fold.hash.finalize().to_hex();
    if fold.frames != framed.frames
        || fold.plain != plain_size
        || plain.as_str() != framed.plain_blake3
    {
        return Err(mismatch(format!(
            "its {} frame headers ({} plain bytes) differ from the manifest's ({} frames, {plain_size} bytes, plain_blake3): a header was changed, or frames were moved",
            fold.frames, fold.plain, framed.frames
        )));
    }
    let picked = pick(fold.frames);
    let mut z = zstd::bulk::Decompressor::new()?;
    let (mut comp, mut out) = (Vec::new(), Vec::new());
    for &seq in &picked {
        let Some(&(at, plain_len, comp_len, hash)) = frames.get(seq as usize) else {
            continue;
        };
        r.seek(SeekFrom::Start(at))?;
        comp.clear();
        if r.by_ref().take(comp_len as u64).read_to_end(&mut comp)? < comp_len {
            return Err(mismatch(format!("frame {seq}: the object ends inside it")));
        }
        decode_frame(&mut z, seq, &comp, plain_len, &hash, &mut out)?;
    }
    Ok(picked)
}

fn decode_frames(jobs: &Mutex<Receiver<DecodeJob>>, done: &Sender<Msg>) {
    let mut z = match zstd::bulk::Decompressor::new() {
        Ok(z) => z,
        Err(e) => {
            let _ = done.send(Msg::Frame(Err(e)));
            return;
        }
    };
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(mut job) = job else {
            return;
        };
        let seq = job.seq;
        let result = decode_frame(
            &mut z,
            seq,
            &job.comp,
            job.plain_len,
            &job.hash,
            &mut job.out,
        )
        .map(|()| Decoded {
            seq,
            plain: job.out,
            hash: job.hash,
        });
        if done.send(Msg::Frame(result)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::codec::tests::keys;
    use crate::codec::{Decoder, Encoder, ObjectDigest};
    use crate::keys::{Sealing, Unsealing};

    fn data() -> Vec<u8> {
        (0..400_000u32)
            .flat_map(|i| (i.wrapping_mul(2_654_435_761) % 1009).to_le_bytes())
            .collect()
    }

    fn encode(data: &[u8], sealing: &Sealing) -> (ObjectDigest, Vec<u8>) {
        let mut enc = Encoder::framed(Vec::new(), 3, sealing, MIN_FRAME).expect("encoder");
        // Odd-sized writes: frames are cut by size, not by write.
        for part in data.chunks(10_007) {
            enc.write_all(part).expect("write");
        }
        enc.finish().expect("finish")
    }

    /// Decodes as a restore would; encrypted when keys are given.
    fn decode(
        stored: &[u8],
        d: &ObjectDigest,
        u: Option<&Unsealing>,
    ) -> crate::error::Result<Vec<u8>> {
        crate::codec::tests::decode(stored, d, u, u.is_some())
    }

    #[test]
    fn frames_round_trip_with_and_without_encryption() {
        let data = data();
        let (s, u) = keys();
        let (d, stored) = encode(&data, &s);
        let f = d.framed.clone().expect("a format 2 digest");
        assert_eq!(f.frames, data.len().div_ceil(MIN_FRAME as usize) as u64);
        assert_eq!(d.plain_size, data.len() as u64);
        assert_eq!(d.stored_size, stored.len() as u64);
        assert!(d.plain_sha256.is_empty() && d.stored_sha256.is_empty());
        assert!(decode(&stored, &d, Some(&u)).expect("decode") == data);
        let (d, stored) = encode(&data, &Sealing::None);
        assert!(decode(&stored, &d, None).expect("decode") == data);
        // Still one zstd stream: the skippable headers are skipped.
        assert!(zstd::stream::decode_all(&stored[..]).expect("zstd -d") == data);
        let (d, stored) = encode(&[], &Sealing::None);
        assert_eq!(d.framed.as_ref().map(|f| f.frames), Some(0));
        assert!(decode(&stored, &d, None).expect("empty").is_empty());
    }

    /// One changed byte anywhere in the stored object, or in the
    /// manifest's digest, is refused, and the error says where.
    #[test]
    fn every_changed_byte_is_refused_and_named() {
        let data = data();
        let (d, stored) = encode(&data, &Sealing::None);
        // Unencrypted: nothing but dr's own checks stands in the way.
        let step = stored.len() / 97;
        for pos in (0..stored.len()).step_by(step).chain([stored.len() - 1]) {
            let mut bad = stored.clone();
            bad[pos] ^= 0x20;
            let err = decode(&bad, &d, None).expect_err("a changed byte was accepted");
            assert_eq!(err.exit_code(), 3, "byte {pos}: {err}");
        }
        // A frame's content: named by its number.
        let mut bad = stored.clone();
        bad[HEAD_LEN + 100] ^= 0x01;
        let err = decode(&bad, &d, None)
            .expect_err("frame 0 changed")
            .to_string();
        assert!(err.contains("frame 0"), "{err}");
        // Two whole frames swapped: each is intact, the order is not.
        let first = HEAD_LEN
            + u32::from_le_bytes([stored[16], stored[17], stored[18], stored[19]]) as usize;
        let second_comp = u32::from_le_bytes([
            stored[first + 16],
            stored[first + 17],
            stored[first + 18],
            stored[first + 19],
        ]) as usize;
        let second = first + HEAD_LEN + second_comp;
        let mut swapped = stored[first..second].to_vec();
        swapped.extend_from_slice(&stored[..first]);
        swapped.extend_from_slice(&stored[second..]);
        let err = decode(&swapped, &d, None)
            .expect_err("swapped frames")
            .to_string();
        assert!(err.contains("stored BLAKE3"), "{err}");
        // Even with the stored digest made to match, the fold refuses it.
        let mut forged = d.clone();
        if let Some(f) = forged.framed.as_mut() {
            f.stored_blake3 = blake3::hash(&swapped).to_hex().to_string();
        }
        let err = decode(&swapped, &forged, None)
            .expect_err("swapped frames")
            .to_string();
        assert!(err.contains("frame headers differ"), "{err}");
        // The manifest's digests.
        for change in 0..3 {
            let mut m = d.clone();
            let f = m.framed.as_mut().expect("framed");
            match change {
                0 => f.plain_blake3.replace_range(0..1, "x"),
                1 => f.stored_blake3.replace_range(0..1, "x"),
                _ => f.frames += 1,
            }
            assert!(
                decode(&stored, &m, None).is_err(),
                "manifest change {change} accepted"
            );
        }
        // Truncated at a frame boundary.
        let err = decode(&stored[..first], &d, None)
            .expect_err("truncated")
            .to_string();
        assert!(err.contains("stored size"), "{err}");
        // Encrypted: age refuses first, as damage (exit 3).
        let (s, u) = keys();
        let (d, stored) = encode(&data, &s);
        let mut bad = stored.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x01;
        assert_eq!(decode(&bad, &d, Some(&u)).expect_err("age").exit_code(), 3);
    }

    /// A frame reader dropped half way stops its threads instead of
    /// blocking them (a restore that fails on a page stops reading).
    #[test]
    fn a_reader_dropped_early_does_not_hang() {
        let data = data();
        let (d, stored) = encode(&data, &Sealing::None);
        let mut dec =
            Decoder::new(std::io::Cursor::new(stored), "obj", &d, None, false).expect("open");
        let mut some = [0u8; 1000];
        dec.read_exact(&mut some).expect("read");
        drop(dec);
    }
}
