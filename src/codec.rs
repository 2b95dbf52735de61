//! The streaming codec: plaintext sha256 -> zstd -> age -> stored sha256.
//!
//! Both directions work on `Read`/`Write` chains with fixed-size buffers, so
//! memory does not grow with the size of a database. Decoding checks the age
//! authentication of every chunk and, at the end of the stream, both hashes
//! and sizes against the manifest: a single flipped byte anywhere fails the
//! read with an error naming the object.

use std::io::{self, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::keys::{Sealing, Unsealing};

pub mod framed;

pub use framed::Framed;

/// Sizes and hashes of one stored object, recorded in its manifest.
///
/// Format 1 objects carry sha256 digests; a format 2 data object carries
/// `framed` (BLAKE3 digests, cheaper and bound frame by frame) instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectDigest {
    pub plain_size: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plain_sha256: String,
    pub stored_size: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stored_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framed: Option<Framed>,
}

impl ObjectDigest {
    /// A running hash of the stored bytes in the algorithm this digest
    /// records them in: BLAKE3 for a format 2 data object, else sha256.
    pub(crate) fn stored_hasher(&self) -> Running {
        match self.framed {
            Some(_) => Running::Blake(Box::default()),
            None => Running::Sha(Sha256::new()),
        }
    }

    /// The recorded digest of the stored bytes, and its algorithm's name.
    pub(crate) fn stored_recorded(&self) -> (&str, &'static str) {
        match &self.framed {
            Some(f) => (&f.stored_blake3, "BLAKE3"),
            None => (&self.stored_sha256, "sha256"),
        }
    }
}

/// A running digest of a byte stream: sha256 (format 1), BLAKE3 (format
/// 2), or none for objects that check themselves.
pub(crate) enum Running {
    Sha(Sha256),
    Blake(Box<blake3::Hasher>),
    Off,
}

impl Running {
    pub(crate) fn update(&mut self, b: &[u8]) {
        match self {
            Running::Sha(h) => h.update(b),
            Running::Blake(h) => {
                h.update(b);
            }
            Running::Off => {}
        }
    }

    /// The hex digest; the running state is spent.
    pub(crate) fn hex(&mut self) -> String {
        match std::mem::replace(self, Running::Off) {
            Running::Sha(h) => hex::encode(h.finalize()),
            Running::Blake(h) => h.finalize().to_hex().to_string(),
            Running::Off => String::new(),
        }
    }
}

/// A writer that hashes and counts what passes through it.
struct Tally<W> {
    inner: W,
    hash: Running,
    count: u64,
}

impl<W: Write> Write for Tally<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Sealed<W: Write> {
    Age(age::stream::StreamWriter<Tally<W>>),
    Plain(Tally<W>),
}

impl<W: Write> Write for Sealed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sealed::Age(w) => w.write(buf),
            Sealed::Plain(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealed::Age(w) => w.flush(),
            Sealed::Plain(w) => w.flush(),
        }
    }
}

/// Encodes a plaintext stream written into it; `finish` returns the digest.
pub struct Encoder<W: Write> {
    inner: Encoding<W>,
}

enum Encoding<W: Write> {
    /// Format 1: one zstd stream (zstd's own worker threads), sha256.
    Stream {
        zstd: Box<zstd::stream::write::Encoder<'static, Sealed<W>>>,
        hash: Sha256,
        count: u64,
    },
    /// Format 2: independent frames (`framed`), BLAKE3.
    Framed {
        frames: Box<framed::FrameWriter<Sealed<W>>>,
        frame_size: u32,
    },
}

impl<W: Write> std::fmt::Debug for Encoder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Encoding::Stream { count, .. } => write!(f, "Encoder({count} bytes in)"),
            Encoding::Framed { frame_size, .. } => write!(f, "Encoder(frames of {frame_size})"),
        }
    }
}

/// Worker threads for zstd: every core, so compression is not the bottleneck.
fn zstd_workers() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(2)
        .max(2)
}

/// Wraps `out` in age for `sealing` (or not), counting and hashing the
/// stored bytes.
fn seal<W: Write>(out: W, sealing: &Sealing, hash: Running) -> Result<Sealed<W>> {
    let tally = Tally {
        inner: out,
        hash,
        count: 0,
    };
    Ok(match sealing {
        Sealing::None => Sealed::Plain(tally),
        Sealing::Recipients(rs) => {
            let enc = age::Encryptor::with_recipients(rs.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| Error::Other(format!("cannot set up age encryption: {e}")))?;
            Sealed::Age(
                enc.wrap_output(tally)
                    .map_err(|e| Error::io("writing the age header", e))?,
            )
        }
        Sealing::Passphrase(p, ..) => {
            let enc = age::Encryptor::with_user_passphrase(p.clone());
            Sealed::Age(
                enc.wrap_output(tally)
                    .map_err(|e| Error::io("writing the age header", e))?,
            )
        }
    })
}

/// Ends age (when sealing) and returns the stored bytes' tally.
fn unseal<W: Write>(sealed: Sealed<W>) -> io::Result<Tally<W>> {
    let mut tally = match sealed {
        Sealed::Age(w) => w.finish()?,
        Sealed::Plain(t) => t,
    };
    tally.flush()?;
    Ok(tally)
}

impl<W: Write> Encoder<W> {
    /// Starts a format 1 object (one zstd stream) on `out`: WAL segments,
    /// page indexes, audit logs, and data objects of policies that ask
    /// for format 1.
    pub fn new(out: W, level: i32, sealing: &Sealing) -> Result<Self> {
        let sealed = seal(out, sealing, Running::Sha(Sha256::new()))?;
        let mut zstd = zstd::stream::write::Encoder::new(sealed, level)
            .map_err(|e| Error::io("starting zstd", e))?;
        zstd.multithread(zstd_workers())
            .map_err(|e| Error::io("starting zstd worker threads", e))?;
        zstd.include_checksum(false)
            .map_err(|e| Error::io("configuring zstd", e))?;
        Ok(Encoder {
            inner: Encoding::Stream {
                zstd: Box::new(zstd),
                hash: Sha256::new(),
                count: 0,
            },
        })
    }

    /// Starts a format 2 object: independent frames of `frame_size` plain
    /// bytes, compressed on every core.
    pub fn framed(out: W, level: i32, sealing: &Sealing, frame_size: u32) -> Result<Self> {
        let sealed = seal(out, sealing, Running::Blake(Box::default()))?;
        let frame_size = frame_size.clamp(framed::MIN_FRAME, framed::MAX_FRAME);
        Ok(Encoder {
            inner: Encoding::Framed {
                frames: Box::new(framed::FrameWriter::new(sealed, level, frame_size)),
                frame_size,
            },
        })
    }

    /// Flushes every layer and returns the digest and the underlying writer.
    pub fn finish(self) -> io::Result<(ObjectDigest, W)> {
        match self.inner {
            Encoding::Stream { zstd, hash, count } => {
                let mut tally = unseal(zstd.finish()?)?;
                Ok((
                    ObjectDigest {
                        plain_size: count,
                        plain_sha256: hex::encode(hash.finalize()),
                        stored_size: tally.count,
                        stored_sha256: tally.hash.hex(),
                        framed: None,
                    },
                    tally.inner,
                ))
            }
            Encoding::Framed { frames, frame_size } => {
                let (sealed, written) = frames.finish()?;
                let mut tally = unseal(sealed)?;
                Ok((
                    ObjectDigest {
                        plain_size: written.plain_size,
                        plain_sha256: String::new(),
                        stored_size: tally.count,
                        stored_sha256: String::new(),
                        framed: Some(Framed {
                            frame_size,
                            frames: written.frames,
                            plain_blake3: written.plain_blake3,
                            stored_blake3: tally.hash.hex(),
                        }),
                    },
                    tally.inner,
                ))
            }
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Encoding::Stream { zstd, hash, count } => {
                let n = zstd.write(buf)?;
                hash.update(&buf[..n]);
                *count += n as u64;
                Ok(n)
            }
            Encoding::Framed { frames, .. } => frames.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Encoding::Stream { zstd, .. } => zstd.flush(),
            Encoding::Framed { frames, .. } => frames.flush(),
        }
    }
}

/// The raw stored stream with a running hash, shared so that the end-of-stream
/// check can drain whatever the age and zstd layers left unread.
struct RawTally<R> {
    inner: R,
    /// Off for an object that checks itself (no manifest digest to
    /// compare): hashing it would be work no one reads.
    hash: Running,
    count: u64,
}

impl<R: Read> RawTally<R> {
    fn read_tallied(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

struct TallyReader<R> {
    raw: Arc<Mutex<RawTally<R>>>,
}

fn poisoned() -> io::Error {
    io::Error::other("internal lock poisoned")
}

impl<R: Read> Read for TallyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.raw.lock().map_err(|_| poisoned())?.read_tallied(buf)
    }
}

enum Opened<R: Read> {
    Age(age::stream::StreamReader<BufReader<TallyReader<R>>>),
    Plain(TallyReader<R>),
}

impl<R: Read> Read for Opened<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Opened::Age(r) => r.read(buf),
            Opened::Plain(r) => r.read(buf),
        }
    }
}

/// Fills `buf` unless the stream ends first; returns the bytes read (fewer
/// than `buf.len()` only at the end).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Runs a reader on a background thread, handing over chunks through a
/// small bounded channel: constant memory, and the producer's CPU work
/// (hashing, decryption) overlaps with the consumer's.
struct ReadAhead {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    /// Spent chunks go back to the producer, so it neither allocates nor
    /// zeroes a buffer per chunk.
    spent: std::sync::mpsc::SyncSender<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl ReadAhead {
    const CHUNK: usize = 256 * 1024;
    const DEPTH: usize = 8;

    /// `finish` runs on the thread after the reader's end, before the end is signalled.
    fn spawn<R: Read + Send + 'static>(
        mut inner: R,
        finish: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(Self::DEPTH);
        let (spent, recycled) = std::sync::mpsc::sync_channel::<Vec<u8>>(Self::DEPTH + 2);
        std::thread::spawn(move || {
            loop {
                let mut buf = recycled.try_recv().unwrap_or_default();
                buf.resize(Self::CHUNK, 0);
                let n = match read_full(&mut inner, &mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let eof = n < buf.len();
                buf.truncate(n);
                if n > 0 && tx.send(Ok(buf)).is_err() {
                    return;
                }
                if eof {
                    // An empty chunk is the end marker, sent only once `finish` succeeded.
                    let _ = tx.send(finish().map(|()| Vec::new()));
                    return;
                }
            }
        });
        ReadAhead {
            rx,
            spent,
            chunk: Vec::new(),
            pos: 0,
            ended: false,
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) if chunk.is_empty() => self.ended = true,
                Ok(Ok(chunk)) => {
                    let old = std::mem::replace(&mut self.chunk, chunk);
                    if old.capacity() > 0 {
                        // A full return channel just drops the buffer.
                        let _ = self.spent.try_send(old);
                    }
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(io::Error::other(
                        "the reading thread stopped before the end",
                    ));
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// One stage of a decoder: on a thread of its own (large objects, where
/// the stages' CPU work overlaps), or inline on the reader's (a follower's
/// small segments, where starting two threads per object costs more than
/// it saves).
enum Stage {
    Ahead(ReadAhead),
    Inline {
        inner: Box<dyn Read + Send>,
        finish: Option<Box<dyn FnOnce() -> io::Result<()> + Send>>,
    },
}

impl Stage {
    fn new<R: Read + Send + 'static>(
        threaded: bool,
        inner: R,
        finish: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) -> Stage {
        if threaded {
            Stage::Ahead(ReadAhead::spawn(inner, finish))
        } else {
            Stage::Inline {
                inner: Box::new(inner),
                finish: Some(Box::new(finish)),
            }
        }
    }
}

impl Read for Stage {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stage::Ahead(r) => r.read(buf),
            Stage::Inline { inner, finish } => {
                let n = inner.read(buf)?;
                if n == 0
                    && !buf.is_empty()
                    && let Some(f) = finish.take()
                {
                    f()?;
                }
                Ok(n)
            }
        }
    }
}

/// The error a decoder's `read` returns when the object is not what its manifest says.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Mismatch(pub String);

/// Reads plaintext out of a stored object, verifying it as it goes.
///
/// The final `read` (the one that returns 0) fails if the stored or plain
/// hash or size differs from the manifest, so a consumer that reads to the
/// end has verified everything it used.
pub struct Decoder<R: Read> {
    inner: Body,
    /// A format 1 stream's end-of-stream checks; `None` for a format 2
    /// object, whose frame reader checks its own digests.
    tallies: Option<Tallies<R>>,
    done: bool,
}

/// Where a decoder's plaintext comes from.
enum Body {
    /// A format 1 stream through its stages.
    Stream(Stage),
    /// A format 2 object's frames, checked by the frame reader itself.
    Frames(Box<framed::FrameReader>),
}

/// What a format 1 stream is checked against at its end.
struct Tallies<R> {
    /// `None` for objects that carry their own checksum (WAL segments).
    expected: Option<ObjectDigest>,
    stored: Arc<Mutex<RawTally<R>>>,
    /// The plaintext is hashed on the decompressing thread, which has time
    /// to spare, rather than on the consumer's, which also writes it out.
    plain: Arc<Mutex<RawTally<Box<dyn Read + Send>>>>,
}

impl<R: Read + Send + 'static> std::fmt::Debug for Decoder<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tallies {
            Some(t) => {
                let out = t.plain.lock().map(|p| p.count).unwrap_or(0);
                write!(f, "Decoder({out} bytes out)")
            }
            None => f.write_str("Decoder(frames)"),
        }
    }
}

impl<R: Read + Send + 'static> Decoder<R> {
    /// Opens a stored object. `object` names it in errors. Wrong keys fail here.
    pub fn new(
        input: R,
        object: &str,
        expected: &ObjectDigest,
        unsealing: Option<&Unsealing>,
        encrypted: bool,
    ) -> Result<Self> {
        Self::open(input, object, Some(expected), unsealing, encrypted, true)
    }

    /// Opens an object that has no manifest digest and checks itself (a WAL
    /// segment ends with the hash of its plaintext); age still
    /// authenticates every chunk of an encrypted one.
    pub fn self_checked(
        input: R,
        object: &str,
        unsealing: Option<&Unsealing>,
        encrypted: bool,
    ) -> Result<Self> {
        Self::open(input, object, None, unsealing, encrypted, true)
    }

    /// [`Decoder::self_checked`] on the calling thread alone: for a
    /// follower applying one small segment a second, where two threads
    /// started per segment cost more CPU than the overlap saves.
    pub fn self_checked_inline(
        input: R,
        object: &str,
        unsealing: Option<&Unsealing>,
        encrypted: bool,
    ) -> Result<Self> {
        Self::open(input, object, None, unsealing, encrypted, false)
    }

    fn open(
        input: R,
        object: &str,
        expected: Option<&ObjectDigest>,
        unsealing: Option<&Unsealing>,
        encrypted: bool,
        threaded: bool,
    ) -> Result<Self> {
        let stored = Arc::new(Mutex::new(RawTally {
            inner: input,
            hash: expected.map_or(Running::Off, ObjectDigest::stored_hasher),
            count: 0,
        }));
        let tallied = TallyReader {
            raw: stored.clone(),
        };
        let opened = if encrypted {
            Opened::Age(decrypting(tallied, object, unsealing)?)
        } else {
            Opened::Plain(tallied)
        };
        let drain = |raw: Arc<Mutex<RawTally<R>>>| {
            move || -> io::Result<()> {
                // Drain anything after the age payload so the stored hash
                // covers every byte.
                let mut raw = raw.lock().map_err(|_| poisoned())?;
                let mut sink = [0u8; 8192];
                while raw.read_tallied(&mut sink)? > 0 {}
                Ok(())
            }
        };
        if let Some((e, f)) = expected.and_then(|e| e.framed.as_ref().map(|f| (e, f))) {
            // Format 2: one thread reads and decrypts, every core decodes
            // and checks frames; the reader checks the digests at its end.
            let raw = stored.clone();
            let drained = drain(stored.clone());
            let finish: framed::Finish = Box::new(move || {
                drained()?;
                let mut raw = raw.lock().map_err(|_| poisoned())?;
                Ok((raw.count, raw.hash.hex()))
            });
            let frames = framed::FrameReader::start(
                Box::new(opened),
                finish,
                e.plain_size,
                e.stored_size,
                f,
            );
            return Ok(Decoder {
                inner: Body::Frames(Box::new(frames)),
                tallies: None,
                done: false,
            });
        }
        // Three stages on three threads, like `age -d | zstd -d | ...`:
        // read + hash + decrypt, decompress, then plaintext hashing and the
        // consumer's own work (page writes) on the calling thread.
        let decrypted = Stage::new(threaded, opened, drain(stored.clone()));
        // A buffer is zeroed on its first fill: a small object read inline
        // (a follower's segment a second) pays for all of it each time.
        let buffer = if threaded { 256 * 1024 } else { 64 * 1024 };
        let zstd =
            zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(buffer, decrypted))
                .map_err(|e| Error::io(format!("starting zstd for {object}"), e))?;
        let plain = Arc::new(Mutex::new(RawTally {
            inner: Box::new(zstd) as Box<dyn Read + Send>,
            hash: match expected {
                Some(_) => Running::Sha(Sha256::new()),
                None => Running::Off,
            },
            count: 0,
        }));
        let inner = Stage::new(threaded, TallyReader { raw: plain.clone() }, || Ok(()));
        Ok(Decoder {
            inner: Body::Stream(inner),
            tallies: Some(Tallies {
                expected: expected.cloned(),
                stored,
                plain,
            }),
            done: false,
        })
    }

    /// A format 2 object's frames, for a consumer that works on whole
    /// frames; `None` for a format 1 stream, which is read through `Read`.
    /// Reading frames and reading bytes from one decoder must not mix.
    pub fn frames(&mut self) -> Option<&mut framed::FrameReader> {
        match &mut self.inner {
            Body::Frames(f) => Some(f),
            Body::Stream(_) => None,
        }
    }

    fn check_end(&mut self) -> io::Result<()> {
        let Some(t) = &self.tallies else {
            return Ok(());
        };
        let mut raw = t.stored.lock().map_err(|_| poisoned())?;
        let stored = raw.hash.hex();
        let stored_count = raw.count;
        drop(raw);
        let mut out = t.plain.lock().map_err(|_| poisoned())?;
        let plain = out.hash.hex();
        let plain_count = out.count;
        drop(out);
        let Some(e) = &t.expected else {
            return Ok(());
        };
        let problem = if stored_count != e.stored_size {
            Some(format!(
                "stored size is {} bytes, the manifest says {}",
                stored_count, e.stored_size
            ))
        } else if stored != e.stored_sha256 {
            Some(format!(
                "stored sha256 is {stored}, the manifest says {}",
                e.stored_sha256
            ))
        } else if plain_count != e.plain_size {
            Some(format!(
                "plain size is {plain_count} bytes, the manifest says {}",
                e.plain_size
            ))
        } else if plain != e.plain_sha256 {
            Some(format!(
                "plain sha256 is {plain}, the manifest says {}",
                e.plain_sha256
            ))
        } else {
            None
        };
        match problem {
            Some(p) => Err(io::Error::new(io::ErrorKind::InvalidData, Mismatch(p))),
            None => Ok(()),
        }
    }
}

impl<R: Read + Send + 'static> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = match &mut self.inner {
            Body::Stream(s) => s.read(buf)?,
            Body::Frames(f) => f.read(buf)?,
        };
        if n == 0 {
            self.done = true;
            self.check_end()?;
            return Ok(0);
        }
        Ok(n)
    }
}

/// The plaintext of the age-encrypted `input` (`object` names it in
/// errors), with the identities of `unsealing`; seekable when `input` is.
pub(crate) fn decrypting<R: Read>(
    input: R,
    object: &str,
    unsealing: Option<&Unsealing>,
) -> Result<age::stream::StreamReader<BufReader<R>>> {
    let Some(keys) = unsealing else {
        return Err(Error::Decrypt {
            object: object.to_string(),
            reason: "it is encrypted and no identity was given: pass --identity FILE (or set [encryption] identity_file)".into(),
        });
    };
    // Buffered: age parses its header a byte at a time, which on a file
    // is a syscall a byte (about 200 for each object).
    let dec = age::Decryptor::new_buffered(BufReader::with_capacity(64 * 1024, input))
        .map_err(|e| decrypt_error(object, e, keys))?;
    dec.decrypt(
        keys.identities
            .iter()
            .map(|i| i.as_ref() as &dyn age::Identity),
    )
    .map_err(|e| decrypt_error(object, e, keys))
}

fn decrypt_error(object: &str, e: age::DecryptError, keys: &Unsealing) -> Error {
    // A download cut short while age reads its header is the network
    // failing, not a damaged object: exit 1, not 3.
    let reason = match e {
        age::DecryptError::Io(io) if crate::error::transport_cause(&io).is_some() => {
            return read_error(object, io);
        }
        age::DecryptError::NoMatchingKeys => format!(
            "none of the identities in {} can open it: this backup was encrypted to another key (its manifest lists the recipient fingerprints)",
            keys.source
        ),
        age::DecryptError::DecryptionFailed | age::DecryptError::KeyDecryptionFailed => {
            format!("wrong passphrase or identity ({})", keys.source)
        }
        other => format!("the age header is damaged or not age: {other}"),
    };
    Error::Decrypt {
        object: object.to_string(),
        reason,
    }
}

/// Maps an error from reading a decoder to the library error naming the object.
pub fn read_error(object: &str, e: io::Error) -> Error {
    if let Some(t) = crate::error::transport_cause(&e) {
        return Error::Other(format!(
            "reading {object} failed in transport, not because of its contents: {t} (retry when the target is reachable)"
        ));
    }
    let reason = match e.get_ref().and_then(|i| i.downcast_ref::<Mismatch>()) {
        Some(m) => m.0.clone(),
        None => format!("{e} (the object is damaged or was modified)"),
    };
    Error::Integrity {
        object: object.to_string(),
        reason,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh X25519 identity as sealing and unsealing keys.
    pub(crate) fn keys() -> (Sealing, Unsealing) {
        let id = age::x25519::Identity::generate();
        (
            Sealing::Recipients(vec![id.to_public()]),
            Unsealing {
                identities: vec![Box::new(id)],
                source: "test".into(),
            },
        )
    }

    fn encode(data: &[u8], sealing: &Sealing) -> (ObjectDigest, Vec<u8>) {
        let mut enc = Encoder::new(Vec::new(), 3, sealing).expect("encoder");
        enc.write_all(data).expect("write");
        enc.finish().expect("finish")
    }

    /// Decodes a whole stored object against its digest.
    pub(crate) fn decode(
        stored: &[u8],
        d: &ObjectDigest,
        u: Option<&Unsealing>,
        encrypted: bool,
    ) -> Result<Vec<u8>> {
        let input = std::io::Cursor::new(stored.to_vec());
        let mut dec = Decoder::new(input, "obj", d, u, encrypted)?;
        let mut out = Vec::new();
        dec.read_to_end(&mut out)
            .map_err(|e| read_error("obj", e))?;
        Ok(out)
    }

    /// The inline decoder (a follower's) reads what the threaded one does,
    /// and drains the stored bytes after the age payload into the tally.
    #[test]
    fn the_inline_decoder_reads_and_tallies_what_the_threaded_one_does() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 97).to_le_bytes())
            .collect();
        let (s, u) = keys();
        let (_, stored) = encode(&data, &s);
        let read = |inline: bool| {
            let input = std::io::Cursor::new(stored.clone());
            let mut dec = if inline {
                Decoder::self_checked_inline(input, "obj", Some(&u), true)
            } else {
                Decoder::self_checked(input, "obj", Some(&u), true)
            }
            .expect("open");
            let mut out = Vec::new();
            dec.read_to_end(&mut out).expect("read");
            let count = dec
                .tallies
                .as_ref()
                .and_then(|t| t.stored.lock().ok().map(|r| r.count))
                .unwrap_or(0);
            (out, count)
        };
        let (inline, inline_count) = read(true);
        let (threaded, threaded_count) = read(false);
        assert!(inline == data && threaded == data);
        assert_eq!(inline_count, stored.len() as u64);
        assert_eq!(threaded_count, stored.len() as u64);
    }

    #[test]
    fn round_trip_with_and_without_encryption() {
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let (s, u) = keys();
        let (d, stored) = encode(&data, &s);
        assert_eq!(d.plain_size, data.len() as u64);
        assert_eq!(d.stored_size, stored.len() as u64);
        assert_eq!(decode(&stored, &d, Some(&u), true).expect("decode"), data);
        let (d2, stored2) = encode(&data, &Sealing::None);
        assert_eq!(decode(&stored2, &d2, None, false).expect("decode"), data);
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let data = vec![7u8; 100_000];
        let (s, u) = keys();
        let (d, stored) = encode(&data, &s);
        for pos in [0, 40, stored.len() / 2, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[pos] ^= 0x01;
            assert!(
                decode(&bad, &d, Some(&u), true).is_err(),
                "flip at {pos} accepted"
            );
        }
        let mut longer = stored.clone();
        longer.push(0);
        assert!(
            decode(&longer, &d, Some(&u), true).is_err(),
            "trailing byte accepted"
        );
        let (d2, stored2) = encode(&data, &Sealing::None);
        let mut bad = stored2.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x10;
        assert!(decode(&bad, &d2, None, false).is_err());
    }

    /// A download cut short inside the age header (the CI run of
    /// 2026-12-06 hit this under injected faults) is a network failure
    /// (exit 1), never "the header is damaged" (exit 3).
    #[test]
    fn a_transport_failure_inside_the_age_header_is_not_damage() {
        struct CutShort(Vec<u8>, usize);
        impl Read for CutShort {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.1 >= 20 {
                    return Err(crate::error::transport_error("body cut short".into()));
                }
                let n = buf.len().min(20 - self.1);
                buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                self.1 += n;
                Ok(n)
            }
        }
        let (s, u) = keys();
        let (_, stored) = encode(b"hello", &s);
        let err = match Decoder::self_checked(CutShort(stored, 0), "obj", Some(&u), true) {
            Ok(_) => panic!("a header cut short was opened"),
            Err(e) => e,
        };
        assert_eq!(err.exit_code(), 1, "{err}");
        assert!(err.to_string().contains("in transport"), "{err}");
    }

    #[test]
    fn wrong_identity_is_a_clear_error() {
        let (s, _) = keys();
        let (_, other) = keys();
        let (d, stored) = encode(b"hello", &s);
        let err = decode(&stored, &d, Some(&other), true)
            .expect_err("wrong key")
            .to_string();
        assert!(err.contains("none of the identities"), "{err}");
    }
}
