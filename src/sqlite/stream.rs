//! Capturing a SQLite database's WAL as it is committed: the streamer's
//! read transaction that pins the WAL, the scan of checksum-valid committed
//! frames into segments stamped with the time each commit was seen, the
//! spool that holds sealed segments until every target has them, and the
//! state a streamer publishes (its position, for restarts and for backups
//! taken meanwhile; its lag and spool, for `dr info`).
//!
//! Whenever the streamer cannot prove that no commit escaped it, it starts
//! a new generation (and asks for a base backup) instead of leaving a
//! silent gap. Shipping the spool to targets is `ops::replicate`'s job.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::codec::Encoder;
use crate::config::Policy;
use crate::error::{Error, Result};
use crate::keys::Sealing;
use crate::repo::{manifest::WalPosition, wal as rwal};
use crate::sqlite::pin::{self, Gate};
use crate::sqlite::segment::SegmentWriter;
use crate::sqlite::wal::{self, Cursor, WalHeader};

/// The shortest time between two looks at one WAL: the precision of
/// commit times while a database is busy.
pub const POLL: Duration = Duration::from_millis(50);
/// An idle stream writes an empty segment this often, so the restore
/// window keeps up with the clock while nothing commits.
pub const HEARTBEAT: Duration = Duration::from_secs(300);
/// Shortest time between two of dr's checkpoints: often enough that a busy
/// writer's WAL stays near `checkpoint_pages` (a long WAL slows every
/// reader and writer of the database), rarely enough to be cheap.
const CYCLE_SPACING: Duration = Duration::from_millis(200);
/// Most frames dr copies while holding the database's write lock.
const GATED_FRAMES: u64 = 2000;
/// How often a stream asks whether the configured keys changed.
const KEYS_CHECK: Duration = Duration::from_secs(1);

/// What a streamer leaves in `state_dir/wal/<policy>/state.json`: where it
/// stands, for its own restart, for backups taken meanwhile (their WAL
/// position), and for `dr info` (lag, spool).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamState {
    pub generation: String,
    /// Salts of the WAL incarnation `frame` counts in (none: no WAL yet).
    pub salts: Option<(u32, u32)>,
    /// Sequence number of frame 0 of that incarnation.
    pub seq_base: u64,
    /// Last frame sealed into a segment, and the WAL checksum after it.
    pub frame: u64,
    pub checksum: (u32, u32),
    pub pid: u32,
    pub host: String,
    pub updated: Option<DateTime<Utc>>,
    /// Newest commit the streamer has seen.
    pub last_commit: Option<DateTime<Utc>>,
    /// First commit not yet sealed, if any.
    pub open_since: Option<DateTime<Utc>>,
    pub spool_bytes: u64,
    pub spool_max: u64,
    pub spool_full: bool,
    pub targets: BTreeMap<String, Shipped>,
    /// The database file (inode) the position is in: a generation only
    /// continues in the same file.
    #[serde(default)]
    pub db_ino: Option<u64>,
    /// Until when every commit up to `frame` had been seen: where a
    /// continued generation's unwatched interval starts.
    #[serde(default)]
    pub watched_until: Option<DateTime<Utc>>,
    /// When the streamer stopped (on a signal or an error), if it did.
    #[serde(default)]
    pub stopped: Option<DateTime<Utc>>,
    /// The generation and WAL sequence of the newest backup the streamer
    /// knows of: the WAL after it is what a point-in-time restore replays,
    /// and `wal.diff_after` bounds it.
    #[serde(default)]
    pub based: Option<(String, u64)>,
    /// Fingerprints of the keys the generation's segments are sealed to:
    /// a generation continues under new keys only if they include these.
    #[serde(default)]
    pub keys: Vec<String>,
}

/// How far one target has been shipped.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Shipped {
    pub generation: String,
    /// Name of the last segment shipped in `generation`.
    pub name: String,
    pub seq: u64,
    /// Until when every commit is on the target.
    pub until: Option<DateTime<Utc>>,
    /// Oldest commit waiting for this target, if any.
    pub pending_since: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

impl StreamState {
    pub fn load(path: &Path) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.write(path, true)
    }

    /// [`Self::save`] without waiting for the disk: for shipping cursors
    /// and spool sizes, which a crash may lose (the segments are shipped
    /// again; a state file lost whole starts a new generation, with a full).
    pub fn save_relaxed(&self, path: &Path) -> Result<()> {
        self.write(path, false)
    }

    fn write(&self, path: &Path, durable: bool) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        let err = |e| Error::io(format!("cannot write {}", tmp.display()), e);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::Other(e.to_string()))?;
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(&bytes)
            .and_then(|_| if durable { f.sync_all() } else { Ok(()) })
            .map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Whether the streamer that wrote this state is still at work: its
    /// process lives (when it ran on this host) and it published within
    /// `stale`, or its engine beat (`beat`, see [`beat_at`]) is that recent:
    /// an idle stream publishes nothing.
    pub fn alive(&self, now: DateTime<Utc>, stale: Duration, beat: Option<DateTime<Utc>>) -> bool {
        let fresh = |u: DateTime<Utc>| (now - u).to_std().unwrap_or_default() <= stale;
        let recent = self.updated.is_some_and(fresh) || beat.is_some_and(fresh);
        let process = self.host != crate::lock::hostname() || crate::scratch::pid_alive(self.pid);
        self.stopped.is_none() && recent && process
    }

    /// How long before a state counts as stale, for a policy streaming
    /// every `sync_interval`.
    pub fn stale_after(sync_interval: Duration) -> Duration {
        sync_interval * 3 + Duration::from_secs(5)
    }

    /// Commit lag of a target, in seconds. A live streamer: how old the
    /// oldest commit not yet on the target is (0 when caught up). A stopped
    /// one: how long since the last instant the target has every commit
    /// of, which grows until a streamer runs again.
    pub fn lag(
        &self,
        target: &str,
        now: DateTime<Utc>,
        stale: Duration,
        beat: Option<DateTime<Utc>>,
    ) -> Option<f64> {
        let t = self.targets.get(target);
        let secs = |o: DateTime<Utc>| (now - o).num_milliseconds().max(0) as f64 / 1000.0;
        if !self.alive(now, stale, beat) {
            return t.and_then(|t| t.until).or(self.updated).map(secs);
        }
        let oldest = [t.and_then(|t| t.pending_since), self.open_since]
            .into_iter()
            .flatten()
            .min();
        Some(oldest.map_or(0.0, secs))
    }
}

/// How often a streaming process rewrites its beat file.
pub const BEAT: Duration = Duration::from_secs(2);

/// When the streaming process `pid` last beat (its beat file in
/// `StateDir::stream_beat`), if it ever did.
pub fn beat_at(path: &Path) -> Option<DateTime<Utc>> {
    let m = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(DateTime::<Utc>::from(m))
}

/// The WAL position a snapshot pinned at `cur` has in the streamer's
/// current generation, if a streamer is counting this WAL incarnation.
/// `state` is the streamer's state file (`StateDir::stream_state`).
pub fn position_for(state: &Path, cur: Option<&Cursor>) -> Option<WalPosition> {
    position_in(&StreamState::load(state)?, cur)
}

/// [`position_for`] with the streamer's state in hand (its own base backups).
pub fn position_in(st: &StreamState, cur: Option<&Cursor>) -> Option<WalPosition> {
    let salts = cur.map(|c| (c.header.salt1, c.header.salt2));
    (st.salts == salts && !st.generation.is_empty()).then(|| WalPosition {
        generation: st.generation.clone(),
        frame: st.seq_base + cur.map_or(0, |c| c.frame),
    })
}

/// What one streamer did, for the terminal and `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub policy: String,
    pub generation: String,
    pub generations_started: u32,
    pub segments: u64,
    pub frames: u64,
    /// Segments left in the spool because a target could not take them.
    pub unshipped: u64,
}

/// The spool of one policy: sealed segments waiting for their targets.
#[derive(Debug, Clone)]
pub struct Spool {
    pub dir: PathBuf,
}

/// A sealed segment in the spool.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub generation: String,
    pub name: String,
    pub first: u64,
    pub last: u64,
    pub first_commit: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub path: PathBuf,
    pub size: u64,
    /// The keys record to ship before it (the keys changed at this segment).
    pub keys: Option<PathBuf>,
}

impl Spooled {
    /// Whether a target at `cur` already has this segment.
    pub fn shipped_to(&self, cur: &Shipped) -> bool {
        (&self.generation, &self.name) <= (&cur.generation, &cur.name)
    }
}

impl Spool {
    fn gen_dir(&self, generation: &str) -> PathBuf {
        self.dir.join(generation)
    }

    /// Sealed segments, in shipping order.
    pub fn list(&self) -> Vec<Spooled> {
        let mut out = Vec::new();
        let Ok(gens) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for g in gens.flatten() {
            let generation = g.file_name().to_string_lossy().into_owned();
            let Ok(files) = std::fs::read_dir(g.path()) else {
                continue;
            };
            let files: Vec<_> = files.flatten().collect();
            let names: std::collections::HashSet<String> = files
                .iter()
                .map(|f| f.file_name().to_string_lossy().into_owned())
                .collect();
            for f in files {
                let name = f.file_name().to_string_lossy().into_owned();
                if let Some((first, last, first_commit, until)) = rwal::parse_name(&name) {
                    let keys = keys_file_name(&name);
                    out.push(Spooled {
                        generation: generation.clone(),
                        keys: names.contains(&keys).then(|| g.path().join(&keys)),
                        name,
                        first,
                        last,
                        first_commit,
                        until,
                        path: f.path(),
                        size: f.metadata().map(|m| m.len()).unwrap_or(0),
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.generation, &a.name).cmp(&(&b.generation, &b.name)));
        out
    }

    /// Removes segment temporaries of a dead run, and empty generation dirs.
    pub fn tidy(&self) {
        let Ok(gens) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for g in gens.flatten() {
            if let Ok(files) = std::fs::read_dir(g.path()) {
                for f in files.flatten() {
                    if f.file_name().to_string_lossy().ends_with(".tmp") {
                        let _ = std::fs::remove_file(f.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(g.path());
        }
    }
}

/// The spool file of the keys record that goes before segment `name`.
fn keys_file_name(name: &str) -> String {
    format!("{name}.keys.json")
}

/// The segment being filled.
struct OpenSegment {
    writer: SegmentWriter<BufWriter<Encoder<File>>>,
    generation: String,
    tmp: PathBuf,
    first_seq: u64,
    first_commit: DateTime<Utc>,
    bytes: u64,
    /// Fingerprints of the keys it is sealed to.
    keys: Vec<String>,
}

/// The streamer's hold on one database. The streaming engine
/// (`ops::replicate`) drives it: [`Stream::open`] pins the database and
/// decides the generation, [`Stream::step`] is one look at the WAL (run
/// when the WAL changed or [`Stream::next_due`] came), [`Stream::stop`]
/// seals what is committed. Between steps it costs nothing.
pub struct Stream {
    policy: Policy,
    /// The file SQLite opens (links resolved): its `-wal` is the one read.
    db: PathBuf,
    /// `db`'s `-wal`, named once: a step does not resolve links again.
    wal_path: PathBuf,
    /// The path as configured, when it is a link: a link that comes to
    /// point at another file ends the generation.
    link: Option<PathBuf>,
    sealing: Sealing,
    spool: Spool,
    state_path: PathBuf,
    state: Arc<Mutex<StreamState>>,
    /// Pins the WAL; always inside a read transaction.
    reader: rusqlite::Connection,
    /// Takes the write lock for dr's checkpoints; open only while the
    /// database is busy (idle databases hold one connection, not two).
    gate: Option<Gate>,
    wal_file: Option<(File, u64)>,
    /// The database's page size when the stream opened: an empty segment
    /// (a heartbeat, a final mark) needs one even when the WAL has no
    /// header yet (an idle database whose log was checkpointed away).
    page_size: u32,
    db_ino: u64,
    generation: String,
    cursor: Option<Cursor>,
    seq_base: u64,
    /// A WAL restart may be taken as continuous: every frame of the old
    /// incarnation was copied before the read mark that allows it.
    restart_ok: bool,
    open: Option<OpenSegment>,
    /// When the WAL was last read to its end: the segments cover until then.
    seen_until: DateTime<Utc>,
    /// Whether an empty segment has marked the stream as idle since the last commit.
    idle_marked: bool,
    last_heartbeat: Instant,
    last_commit_at: Instant,
    last_seal: Instant,
    last_cycle: Instant,
    last_spool_check: Instant,
    report: StreamReport,
    full_warned: Option<Instant>,
    /// What the spool held (sealed, stored bytes) when it became full.
    full_listed: Option<u64>,
    /// The commit time given to the next transactions read: those made
    /// while no streamer watched, read when a generation continues.
    backlog_stamp: Option<DateTime<Utc>>,
    /// A segment was sealed since the engine last asked: ship.
    sealed: bool,
    /// A generation that needs its base backup on every target.
    wants_base: Option<String>,
    /// Fingerprints of `sealing`.
    keys: Vec<String>,
    /// Keys offered by the engine and their fingerprints, taken at the next step.
    new_sealing: Option<(Sealing, Vec<String>)>,
    last_keys_check: Instant,
    /// The keys this process last recorded in the generation: a segment
    /// sealed to others gets a keys record.
    recorded: Option<Vec<String>>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("db", &self.db)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Why a stream needs its owner's attention.
#[derive(Debug)]
pub enum Next {
    Stop,
    /// Continuity is lost or the file was replaced: pin again, new generation.
    Restart(String),
}

impl Stream {
    /// Pins `db` and decides where the stream stands: the generation in
    /// `prev` continues when the WAL provably continues it, otherwise a new
    /// one starts (`why` says why, when a restart asked for it). A
    /// [`Next`] returned with the stream means it must be opened again.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        policy: &Policy,
        db: &Path,
        sealing: Sealing,
        spool: Spool,
        state_path: &Path,
        state: &Arc<Mutex<StreamState>>,
        prev: Option<&StreamState>,
        why: Option<String>,
        report: StreamReport,
    ) -> Result<(Stream, Option<Next>)> {
        let configured = db;
        let real = pin::real_path(db);
        let db = real.as_path();
        let link = (db != configured).then(|| configured.to_path_buf());
        if let Some(l) = &link {
            tracing::info!(policy = %policy.name, "{} is a link: streaming {}", l.display(), db.display());
        }
        let reader = pin::open(db)?;
        // The reader only pins: a small page cache is enough.
        let _ = reader.execute_batch("PRAGMA cache_size = -64");
        let page_size: u32 = reader
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(|e| Error::Source {
                path: db.to_path_buf(),
                reason: format!("cannot read the page size: {e}"),
            })?;
        let gate = Gate::open(db)?;
        let db_ino = std::fs::metadata(db)
            .map(|m| m.ino())
            .map_err(|e| Error::io(format!("cannot stat {}", db.display()), e))?;
        let end = gate.hold(|| {
            pin::begin_read(&reader, db)?;
            pin::wal_end(db)
        })?;
        let continued = match prev {
            Some(prev) => continuation(prev, db_ino, end.as_ref(), db)?,
            None => None,
        };
        // The second connection is needed again only for a checkpoint: an
        // idle database holds one connection, not two.
        drop(gate);
        let now = Instant::now();
        let keys = sealing.fingerprints();
        // A generation continues under new keys only if they still open
        // what it holds: else a restore would need the old and the new.
        let dropped = prev.is_some_and(|p| drops_a_key(&p.keys, &keys));
        let continued = continued.filter(|_| !dropped);
        let why = if dropped {
            Some(KEYS_DROPPED.to_string())
        } else {
            why
        };
        let mut st = Stream {
            policy: policy.clone(),
            db: db.to_path_buf(),
            wal_path: pin::wal_path(db),
            link,
            keys,
            new_sealing: None,
            last_keys_check: now,
            recorded: None,
            sealing,
            spool,
            state_path: state_path.to_path_buf(),
            state: state.clone(),
            reader,
            gate: None,
            wal_file: None,
            page_size,
            db_ino,
            generation: String::new(),
            cursor: continued.or(end),
            seq_base: 0,
            restart_ok: true,
            open: None,
            seen_until: Utc::now(),
            idle_marked: true,
            last_heartbeat: now,
            last_commit_at: now,
            last_seal: now,
            last_cycle: now,
            last_spool_check: now,
            report,
            full_warned: None,
            full_listed: None,
            backlog_stamp: None,
            sealed: false,
            wants_base: None,
        };
        // The last generation continues when the WAL provably continues it
        // (same file, same incarnation, the recorded frame and checksum
        // still there); otherwise a new one starts, with a new full.
        let next = match (continued, prev.and_then(|p| p.watched_until)) {
            (Some(_), Some(watched)) => {
                let prev = prev.map(|p| (p.generation.clone(), p.seq_base));
                let (generation, seq_base) = prev.unwrap_or_default();
                st.resume(generation, seq_base, watched)?
            }
            _ => {
                st.start_generation(
                    why.unwrap_or_else(|| "no earlier generation continues in this WAL".into()),
                )?;
                None
            }
        };
        Ok((st, next))
    }

    pub fn report(&self) -> &StreamReport {
        &self.report
    }

    /// Whether the engine should offer the configured keys again.
    pub fn keys_due(&self) -> bool {
        self.last_keys_check.elapsed() >= KEYS_CHECK
    }

    /// The configured keys, as the engine read them: when they changed,
    /// the next segment is sealed to them. Dropping a key (or changing the
    /// passphrase) ends the generation at the next step: the stream is
    /// opened again, under the new keys, in a new one.
    pub fn offer_keys(&mut self, sealing: Sealing) {
        self.last_keys_check = Instant::now();
        let keys = sealing.fingerprints();
        if keys != self.keys {
            self.new_sealing = Some((sealing, keys));
        }
    }

    /// Whether a segment was sealed since the last call (the shipper has work).
    pub fn take_sealed(&mut self) -> bool {
        std::mem::take(&mut self.sealed)
    }

    /// The generation, the sequence of the last frame read, and the page
    /// size: how much WAL the stream holds past a backup.
    pub fn position(&self) -> Option<(&str, u64, u32)> {
        let c = self.cursor.as_ref()?;
        Some((&self.generation, self.seq(), c.header.page_size))
    }

    /// The generation that needs a base backup, once per request.
    pub fn take_wants_base(&mut self) -> Option<String> {
        self.wants_base.take()
    }

    /// One look at the database: copy what was committed, seal what is
    /// due, checkpoint when the WAL is long.
    pub fn step(&mut self) -> Result<Option<Next>> {
        let sync = self.policy.wal.sync_interval;
        if let Some((sealing, keys)) = self.new_sealing.take() {
            if drops_a_key(&self.keys, &keys) {
                // The generation ends under the keys it has, as a stop ends
                // it: what is committed is read and sealed, and a final
                // mark says how far it was watched.
                if let Some(n) = self.consume()? {
                    self.seal()?;
                    return Ok(Some(n));
                }
                self.seal()?;
                self.seal_as(true)?;
                return Ok(Some(Next::Restart(KEYS_DROPPED.into())));
            }
            tracing::info!(policy = %self.policy.name, "WAL segments are sealed to {} from now on", keys.join(", "));
            self.sealing = sealing;
            self.keys = keys;
        }
        if let Some(n) = self.replaced()? {
            // The old file's generation ends as a stop ends it: what its
            // WAL still holds is read (through the handle kept open: the
            // path may name the new file's log already), sealed, and a final
            // mark says how far it was watched, so its window reaches the
            // swap instead of its last segment.
            if self.wal_file.is_some() {
                // A failure only means nothing more can be read of it.
                let _ = self.consume();
            }
            self.seal()?;
            self.seal_as(true)?;
            return Ok(Some(n));
        }
        let was_full = self.full_warned.is_some();
        // The spool only grows through an open segment: an idle stream
        // does not list it.
        let full = if was_full || (self.open.is_some() && self.last_spool_check.elapsed() >= sync) {
            self.last_spool_check = Instant::now();
            self.spool_full()?
        } else {
            false
        };
        if was_full && !full && self.commits_waiting()? {
            self.seal()?;
            return Ok(Some(Next::Restart(
                "the spool was full and dr stopped copying: commits made meanwhile have no exact time".into(),
            )));
        }
        if !full && let Some(n) = self.consume()? {
            self.seal()?;
            return Ok(Some(n));
        }
        let big = self
            .open
            .as_ref()
            .is_some_and(|o| o.bytes >= self.policy.wal.segment_max);
        if big || (self.open.is_some() && self.last_seal.elapsed() >= sync) || self.mark_due() {
            self.seal()?;
        }
        let frames = self.cursor.map_or(0, |c| c.frame);
        if !full
            && frames >= u64::from(self.policy.wal.checkpoint_pages)
            && self.last_cycle.elapsed() >= CYCLE_SPACING
        {
            let gate = match self.gate.take() {
                Some(g) => g,
                None => Gate::open(&self.db)?,
            };
            let r = self.checkpoint(&gate);
            self.gate = Some(gate);
            if let Some(n) = r? {
                self.seal()?;
                return Ok(Some(n));
            }
        }
        Ok(None)
    }

    /// Ships what is committed: one last look, then seal and mark how far
    /// the stream watched. With a full spool dr copies nothing (the next
    /// run starts afresh).
    pub fn stop(&mut self) -> Result<Option<Next>> {
        if self.full_warned.is_none()
            && let Some(n) = self.consume()?
        {
            self.seal()?;
            return Ok(Some(n));
        }
        self.seal()?;
        self.seal_as(true)?;
        Ok(Some(Next::Stop))
    }

    /// When the stream must be looked at even if its WAL does not change:
    /// a segment to seal, an idle mark or heartbeat to write, a checkpoint
    /// to take, a full spool to re-check.
    pub fn next_due(&self) -> Instant {
        let sync = self.policy.wal.sync_interval;
        let now = Instant::now();
        let mut due = self.last_heartbeat + HEARTBEAT;
        if self.open.is_some() {
            due = due.min(self.last_seal + sync);
        } else if !self.idle_marked {
            due = due.min(self.last_commit_at + sync);
        }
        if self.cursor.map_or(0, |c| c.frame) >= u64::from(self.policy.wal.checkpoint_pages) {
            due = due.min(self.last_cycle + CYCLE_SPACING);
        }
        if self.full_warned.is_some() {
            due = due.min(now + Duration::from_secs(1));
        }
        due
    }

    /// An empty segment is due: once after the last commit (when quiet for
    /// `sync_interval`), then every [`HEARTBEAT`].
    fn mark_due(&self) -> bool {
        self.open.is_none()
            && ((!self.idle_marked
                && self.last_commit_at.elapsed() >= self.policy.wal.sync_interval)
                || self.last_heartbeat.elapsed() >= HEARTBEAT)
    }
}

/// Where the generation recorded in `prev` continues in the WAL as it is
/// now, if it provably does: the same database file, the same WAL
/// incarnation (salts), and a committed transaction ending at the recorded
/// frame with the recorded checksum. Frames after it are commits made while
/// no streamer watched.
fn continuation(
    prev: &StreamState,
    db_ino: u64,
    end: Option<&Cursor>,
    db: &Path,
) -> Result<Option<Cursor>> {
    let Some(end) = end else { return Ok(None) };
    let same = !prev.generation.is_empty()
        && prev.db_ino == Some(db_ino)
        && prev.watched_until.is_some()
        && prev.salts == Some((end.header.salt1, end.header.salt2))
        && end.frame >= prev.frame;
    if !same {
        return Ok(None);
    }
    let at = Cursor {
        header: end.header,
        frame: prev.frame,
        checksum: prev.checksum,
    };
    if prev.frame == 0 {
        return Ok((prev.checksum == end.header.checksum).then_some(at));
    }
    let p = pin::wal_path(db);
    let read = |e| Error::io(format!("cannot read {}", p.display()), e);
    let f = File::open(&p).map_err(read)?;
    let txns = wal::scan(&f, &Cursor::start(end.header)).map_err(read)?;
    Ok(txns
        .iter()
        .any(|t| t.last == prev.frame && t.checksum == prev.checksum)
        .then_some(at))
}

impl Stream {
    /// Continues `generation` from the cursor: an empty segment marks the
    /// interval no streamer watched (from `watched` to now), and the
    /// commits made meanwhile are read at once, stamped with now. Restores
    /// reach every instant before and after that interval from the
    /// generation's existing backups; no new full is needed.
    fn resume(
        &mut self,
        generation: String,
        seq_base: u64,
        watched: DateTime<Utc>,
    ) -> Result<Option<Next>> {
        self.generation = generation;
        self.seq_base = seq_base;
        self.restart_ok = false;
        let now = Utc::now().max(watched);
        let Some(page_size) = self.cursor.map(|c| c.header.page_size) else {
            return Ok(Some(Next::Restart("the WAL is gone".into())));
        };
        self.open = Some(self.new_segment(self.seq() + 1, watched, page_size)?);
        self.seen_until = now;
        self.seal()?;
        // Until the commits made meanwhile are sealed, the watched interval
        // still ends where it did: a crash now repeats the mark from there.
        {
            let mut st = self.state.lock().map_err(|_| poisoned())?;
            st.watched_until = Some(watched);
            st.save(&self.state_path)?;
        }
        tracing::info!(policy = %self.policy.name, generation = %self.generation, frame = self.seq(), "continuing the generation (not watched from {} to {}): no new full", watched.to_rfc3339(), now.to_rfc3339());
        // Every target must still have a base of this generation.
        self.wants_base = Some(self.generation.clone());
        self.backlog_stamp = Some(now);
        let next = self.consume()?;
        self.backlog_stamp = None;
        Ok(next)
    }

    fn start_generation(&mut self, why: String) -> Result<()> {
        self.generation = rwal::new_generation(Utc::now());
        self.seq_base = 0;
        self.recorded = None;
        self.report.generations_started += 1;
        tracing::info!(policy = %self.policy.name, generation = %self.generation, "new generation ({why}); taking a full backup to every target");
        self.publish(true)?;
        self.wants_base = Some(self.generation.clone());
        Ok(())
    }

    fn seq(&self) -> u64 {
        self.seq_base + self.cursor.map_or(0, |c| c.frame)
    }

    /// Writes the state file with the sealed position.
    fn publish(&mut self, sealed: bool) -> Result<()> {
        self.report.generation = self.generation.clone();
        let spool_bytes: u64 = self.spool.list().iter().map(|s| s.size).sum::<u64>()
            + self.open.as_ref().map_or(0, |o| o.bytes);
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        if sealed {
            st.generation = self.generation.clone();
            st.salts = self.cursor.map(|c| (c.header.salt1, c.header.salt2));
            st.seq_base = self.seq_base;
            st.frame = self.cursor.map_or(0, |c| c.frame);
            st.checksum = self.cursor.map_or((0, 0), |c| c.checksum);
            st.db_ino = Some(self.db_ino);
            st.watched_until = Some(self.seen_until);
            st.keys = self.recorded.clone().unwrap_or_else(|| self.keys.clone());
        }
        st.pid = std::process::id();
        st.host = crate::lock::hostname();
        st.updated = Some(Utc::now());
        st.stopped = None;
        st.open_since = self.open.as_ref().map(|o| o.first_commit);
        st.spool_bytes = spool_bytes;
        st.spool_max = self.policy.wal.spool_max;
        st.spool_full = spool_bytes >= self.policy.wal.spool_max;
        st.save(&self.state_path)
    }

    /// A database file replaced under the streamer (restored, moved) breaks the stream.
    fn replaced(&self) -> Result<Option<Next>> {
        if let Some(link) = &self.link
            && pin::real_path(link) != self.db
        {
            return Ok(Some(Next::Restart(format!(
                "{} now points to another file than {}",
                link.display(),
                self.db.display()
            ))));
        }
        match std::fs::metadata(&self.db) {
            Ok(m) if m.ino() == self.db_ino => Ok(None),
            Ok(_) => Ok(Some(Next::Restart("the database file was replaced".into()))),
            Err(e) => Err(Error::Source {
                path: self.db.clone(),
                reason: format!(
                    "the database file disappeared while streaming: {}",
                    crate::error::io_reason(&e)
                ),
            }),
        }
    }

    fn spool_full(&mut self) -> Result<bool> {
        let listed: u64 = self.spool.list().iter().map(|s| s.size).sum::<u64>();
        let used = listed + self.open.as_ref().map_or(0, |o| o.bytes);
        // Full until a target drains something: sealing the open segment
        // (counted in plaintext bytes, stored compressed) must not read as
        // room again.
        let full = used >= self.policy.wal.spool_max
            || self.full_listed.is_some_and(|mark| listed >= mark);
        if full {
            if self
                .full_warned
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                tracing::error!(
                    policy = %self.policy.name,
                    spool = %self.spool.dir.display(),
                    "WAL spool is full ({} of wal.spool_max {}): a target is not taking segments; dr keeps the WAL pinned (it grows) and ships nothing new until the spool drains; no data is dropped",
                    crate::units::human_bytes(used),
                    crate::units::human_bytes(self.policy.wal.spool_max)
                );
                self.full_warned = Some(Instant::now());
                self.publish(false)?;
            }
            if self.full_listed.is_none() {
                self.full_listed = Some(listed);
            }
        } else if self.full_warned.take().is_some() {
            self.full_listed = None;
            tracing::info!(policy = %self.policy.name, "WAL spool has room again");
        }
        Ok(full)
    }

    /// The `-wal` file, reopened when it was replaced (deleted and recreated).
    fn wal(&mut self) -> Result<Option<&File>> {
        let p = self.wal_path.clone();
        let ino = match std::fs::metadata(&p) {
            Ok(m) => m.ino(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.wal_file = None;
                return Ok(None);
            }
            Err(e) => return Err(Error::io(format!("cannot stat {}", p.display()), e)),
        };
        if self.wal_file.as_ref().is_none_or(|(_, i)| *i != ino) {
            let f =
                File::open(&p).map_err(|e| Error::io(format!("cannot open {}", p.display()), e))?;
            self.wal_file = Some((f, ino));
        }
        Ok(self.wal_file.as_ref().map(|(f, _)| f))
    }

    /// Whether committed transactions wait in the WAL beyond what was copied.
    fn commits_waiting(&mut self) -> Result<bool> {
        let (Some(cur), Some(f)) = (self.cursor, self.wal()?) else {
            return Ok(false);
        };
        let (txns, more) =
            wal::scan_at_most(f, &cur, 1).map_err(|e| Error::io("reading the WAL", e))?;
        Ok(more || !txns.is_empty())
    }

    /// Copies newly committed transactions into the open segment.
    fn consume(&mut self) -> Result<Option<Next>> {
        self.consume_at_most(u64::MAX).map(|(n, _)| n)
    }

    /// [`Self::consume`], giving up (and copying nothing) when more than
    /// about `max_frames` frames wait: the caller holds the write lock and
    /// must not keep the application waiting for a large copy.
    fn consume_at_most(&mut self, max_frames: u64) -> Result<(Option<Next>, bool)> {
        let p = self.wal_path.clone();
        let read = |e| Error::io(format!("cannot read {}", p.display()), e);
        let looked = Utc::now();
        // A log without a header holds no commit: with nothing copied yet
        // in this incarnation, the stream has seen everything until now
        // (an idle database's heartbeats and final mark say so).
        let Some(f) = self.wal()? else {
            if self.cursor.is_none() {
                self.seen_until = looked;
            }
            return Ok((None, false));
        };
        let f = f.try_clone().map_err(read)?;
        let Some(h) = wal::read_header(&f).map_err(read)? else {
            if self.cursor.is_none() {
                self.seen_until = looked;
            }
            return Ok((None, false)); // truncated by a checkpoint: nothing to read yet
        };
        let same = self
            .cursor
            .is_some_and(|c| (c.header.salt1, c.header.salt2) == (h.salt1, h.salt2));
        if !same {
            let expected_salt1 = self.cursor.map(|c| c.header.salt1.wrapping_add(1));
            if !self.restart_ok || expected_salt1.is_some_and(|s| s != h.salt1) {
                return Ok((
                    Some(Next::Restart(
                        "the WAL was restarted before dr had copied all of it".into(),
                    )),
                    false,
                ));
            }
            // A restart dr allowed: every frame of the old log is copied.
            self.seq_base = self.seq();
            self.cursor = Some(Cursor::start(h));
            self.restart_ok = false;
        }
        let Some(cur) = self.cursor else {
            return Ok((None, false));
        };
        if cur.header.page_size != h.page_size {
            return Ok((
                Some(Next::Restart("the WAL page size changed".into())),
                false,
            ));
        }
        let (txns, more) = wal::scan_at_most(&f, &cur, max_frames).map_err(read)?;
        if more {
            return Ok((None, true));
        }
        self.seen_until = looked;
        if txns.is_empty() {
            // The log may have been cut below what was copied: that is a lost continuity.
            let len = f.metadata().map_err(read)?.len();
            if cur.frame > 0 && len < h.frame_offset(cur.frame + 1) {
                return Ok((
                    Some(Next::Restart("the WAL was truncated under dr".into())),
                    false,
                ));
            }
            return Ok((None, false));
        }
        let now = self.backlog_stamp.unwrap_or_else(Utc::now);
        for t in &txns {
            self.append(&f, &h, t, now)?;
            if let Some(c) = self.cursor.as_mut() {
                c.frame = t.last;
                c.checksum = t.checksum;
            }
        }
        self.restart_ok = false;
        self.idle_marked = false;
        self.last_commit_at = Instant::now();
        if let Ok(mut st) = self.state.lock() {
            st.last_commit = Some(now);
        }
        Ok((None, false))
    }

    fn append(&mut self, f: &File, h: &WalHeader, t: &wal::Txn, now: DateTime<Utc>) -> Result<()> {
        if self.open.is_none() {
            self.open = Some(self.new_segment(self.seq_base + t.first, now, h.page_size)?);
        }
        let Some(open) = self.open.as_mut() else {
            return Err(Error::Other("internal: no open segment".into()));
        };
        let tmp = open.tmp.clone();
        let werr = |e| Error::io(format!("writing WAL segment {}", tmp.display()), e);
        let n = u32::try_from(t.last - t.first + 1)
            .map_err(|_| Error::Other("transaction with more than 2^32 frames".into()))?;
        open.writer
            .txn(n, t.db_pages, now.timestamp_millis())
            .map_err(werr)?;
        let w = &mut open.writer;
        wal::read_frames(f, h, t.first, t.last, |pgno, page| w.frame(pgno, page)).map_err(|e| {
            Error::io(
                format!("copying frames from {}", self.wal_path.display()),
                e,
            )
        })?;
        open.bytes += u64::from(n) * (u64::from(h.page_size) + 4) + 16;
        self.report.frames += u64::from(n);
        Ok(())
    }

    fn new_segment(
        &self,
        first_seq: u64,
        now: DateTime<Utc>,
        page_size: u32,
    ) -> Result<OpenSegment> {
        let dir = self.spool.gen_dir(&self.generation);
        let err = |e| Error::io(format!("cannot write to the spool {}", dir.display()), e);
        std::fs::create_dir_all(&dir).map_err(err)?;
        let tmp = dir.join(format!(".open.{}.tmp", std::process::id()));
        let f = File::create(&tmp).map_err(err)?;
        let enc = Encoder::new(f, self.policy.compression_level, &self.sealing.frequent())?;
        let writer =
            SegmentWriter::new(BufWriter::with_capacity(1 << 20, enc), page_size, first_seq)
                .map_err(err)?;
        Ok(OpenSegment {
            writer,
            generation: self.generation.clone(),
            tmp,
            first_seq,
            first_commit: now,
            bytes: 0,
            keys: self.keys.clone(),
        })
    }

    /// Closes the open segment into the spool (durably) and records the
    /// position. With nothing open, writes an empty segment when the
    /// stream has gone idle (once after the last commit, then every
    /// [`HEARTBEAT`]), so a restore knows no commit came meanwhile.
    fn seal(&mut self) -> Result<()> {
        self.seal_as(false)
    }

    /// `final_mark`: the streamer is stopping; mark how far it watched.
    fn seal_as(&mut self, final_mark: bool) -> Result<()> {
        self.last_seal = Instant::now();
        if self.open.is_none() {
            let quiet = self.last_commit_at.elapsed() >= self.policy.wal.sync_interval;
            let due = final_mark
                || (!self.idle_marked && quiet)
                || self.last_heartbeat.elapsed() >= HEARTBEAT;
            if !due {
                return Ok(());
            }
            // Without a WAL header (nothing written since the log was
            // emptied) the mark still says how far the stream watched.
            let page_size = self.cursor.map_or(self.page_size, |c| c.header.page_size);
            let first = self.seq() + 1;
            self.open = Some(self.new_segment(first, self.seen_until, page_size)?);
        }
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let tmp = open.tmp.clone();
        let err = |e| Error::io(format!("sealing WAL segment {}", tmp.display()), e);
        let frames = open.writer.frames();
        let buf = open.writer.finish().map_err(err)?;
        let enc = buf.into_inner().map_err(|e| err(e.into_error()))?;
        let (_, file) = enc.finish().map_err(err)?;
        file.sync_all().map_err(err)?;
        let last = open.first_seq + frames - 1;
        let until = self.seen_until.max(open.first_commit);
        let name = rwal::segment_name(open.first_seq, last, open.first_commit, until);
        let dir = self.spool.gen_dir(&open.generation);
        if !open.keys.is_empty() && self.recorded.as_ref() != Some(&open.keys) {
            // Before the segment, so no segment is ever spooled without it.
            let record = rwal::KeysRecord {
                recipients: open.keys.clone(),
            };
            let body = serde_json::to_vec(&record).map_err(|e| Error::Other(e.to_string()))?;
            let keys_tmp = dir.join(format!(".keys.{}.tmp", std::process::id()));
            File::create(&keys_tmp)
                .and_then(|mut f| {
                    std::io::Write::write_all(&mut f, &body)?;
                    f.sync_all()
                })
                .and_then(|()| std::fs::rename(&keys_tmp, dir.join(keys_file_name(&name))))
                .map_err(err)?;
            self.recorded = Some(open.keys.clone());
        }
        std::fs::rename(&tmp, dir.join(&name)).map_err(err)?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(err)?;
        if frames == 0 {
            self.idle_marked = true;
            self.last_heartbeat = Instant::now();
        } else {
            self.report.segments += 1;
        }
        tracing::debug!(policy = %self.policy.name, segment = %name, "sealed");
        self.publish(true)?;
        self.sealed = true;
        if frames == 0 {
            // Idle now: give back the second connection until it is busy again.
            self.gate = None;
        }
        Ok(())
    }

    /// dr's own checkpoint. The read mark moves up to the end of the log
    /// (taken under the write lock, so nothing can slip past unseen), the
    /// log is checkpointed without blocking anyone, and the read
    /// transaction is re-taken once more under the write lock after a
    /// final small checkpoint: if the log is then wholly in the database,
    /// SQLite may restart it, and dr knows it has every frame of it.
    fn checkpoint(&mut self, gate: &Gate) -> Result<Option<Next>> {
        self.last_cycle = Instant::now();
        let db = self.db.clone();
        let db = db.as_path();
        // Move the read mark up to the end of the log. Frames not yet
        // copied stay in the file: a mark above zero forbids a restart.
        gate.hold(|| {
            pin::end_read(&self.reader, db)?;
            pin::begin_read(&self.reader, db)
        })?;
        gate.checkpoint()?;
        // Copy what is there without the lock, then the last few frames with it.
        if let Some(n) = self.consume()? {
            return Ok(Some(n));
        }
        let mut lost = None;
        gate.hold(|| {
            let (l, behind) = self.consume_at_most(GATED_FRAMES)?;
            lost = l;
            if lost.is_some() || behind {
                return Ok(()); // too far behind to copy under the lock: next time
            }
            pin::end_read(&self.reader, db)?;
            let complete = pin::checkpoint_passive(&self.reader, db)?;
            pin::begin_read(&self.reader, db)?;
            self.restart_ok = complete;
            tracing::trace!(policy = %self.policy.name, complete, "checkpoint");
            Ok(())
        })?;
        Ok(lost)
    }
}

/// Whether keys `new` leave out one of `old`: what a generation holds
/// would then need the old key and the new one together.
fn drops_a_key(old: &[String], new: &[String]) -> bool {
    old.iter().any(|k| !new.contains(k))
}

/// Why a generation ends when a key is dropped.
const KEYS_DROPPED: &str = "the encryption keys changed and a key was dropped (or the passphrase changed): a new generation starts, so a restore needs only the new keys";

pub fn poisoned() -> Error {
    Error::Other("internal: a streamer thread panicked while holding its state".into())
}
