//! Taking a full or differential backup of a SQLite policy to one target.
//!
//! [`backup`] reads as the steps a backup takes; each step is a function
//! below it. The caller holds the policy's lock on this host.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::PolicyRepo;
use super::report::{BackupReport, PageCounts};
use crate::codec::{Decoder, Encoder, ObjectDigest, read_error};
use crate::config::{Policy, Target};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::keys::Sealing;
use crate::lease::Lease;
use crate::progress::Progress;
use crate::repo::{self, BackupType, Label, Manifest};
use crate::sqlite::pages::{HASH_LEN, HashAhead};
use crate::sqlite::stream::StreamState;
use crate::sqlite::{self, IndexReader, IndexWriter, PageWriter, Snapshot};
use crate::storage::{ObjectWriter, Storage};

/// The chain a backup's page stream is written through.
type DataWriter = PageWriter<BufWriter<Encoder<Box<dyn ObjectWriter>>>>;

/// A backup the streamer takes on its own: its state in memory (for the
/// WAL position) and why it takes it, recorded as the manifest's `trigger`.
#[derive(Clone, Copy)]
pub struct ByStreamer<'a> {
    pub state: &'a Mutex<StreamState>,
    /// `generation`: the base of a new generation; `wal`: the WAL since the
    /// newest backup passed `wal.diff_after`.
    pub trigger: &'static str,
}

/// Backs up the SQLite database `db` of `policy` to `target`, then expires
/// by the policy's retention. A streamed policy's backup records its WAL
/// position: from `stream` when the streamer itself takes it (state handed
/// over in memory), else from the state file of the streamer on this host,
/// if any.
pub fn backup(
    ctx: &Context,
    policy: &Policy,
    db: &Path,
    target: &Target,
    kind: Option<BackupType>,
    progress: &dyn Progress,
    by_streamer: Option<ByStreamer<'_>>,
) -> Result<BackupReport> {
    let stream = by_streamer.map(|b| b.state);
    let started = Instant::now();
    let store = ctx.storage(target)?;
    // A host another one was promoted over writes nothing. The streamer's
    // own backups are fenced where its stream starts (`replicate::open`):
    // not checked again here, on the way to the snapshot's pin.
    if stream.is_none() {
        super::promotion::fence(ctx, policy, store.as_ref())?;
    }
    let sealing = ctx.sealing(policy)?;
    let repo = PolicyRepo {
        storage: store.as_ref(),
        policy: &policy.name,
    };
    // Fail on a bad source before touching the target.
    let mut conn = sqlite::open_source(db)?;
    // Listing first: a missing bucket or bad credentials fail before anything is written.
    let committed = repo.committed()?;
    let mut lease = Lease::acquire(store.as_ref(), &policy.name, "backup")?;
    let base = choose_base(ctx, &repo, policy, &conn, &sealing, &committed, kind)?;
    // Listed again under the lease: a writer that committed between the
    // first listing and the lease is seen, so labels keep growing.
    let label = new_label(base.parent(), &repo.dirs()?, store.as_ref())?;
    let wal = pin_wal(ctx, policy, db, &mut conn, stream)?;
    let timestamp_start = Utc::now();
    tracing::info!(policy = %policy.name, target = %target.name, %label, "starting {} backup of {}", label.kind(), db.display());
    let written = write_objects(
        ctx,
        store.as_ref(),
        policy,
        db,
        &label,
        &mut conn,
        &sealing,
        base.index,
        progress,
    )?;
    drop(conn);
    let manifest = Manifest {
        format: policy.format,
        label: label.clone(),
        kind: label.kind(),
        parent: base.index_of.clone(),
        source_kind: "sqlite".into(),
        source_path: db.display().to_string(),
        page_size: written.snapshot.page_size,
        page_count: written.snapshot.page_count,
        pages_stored: written.pages_stored,
        wal,
        timestamp_start,
        timestamp_stop: Utc::now(),
        dr_version: env!("CARGO_PKG_VERSION").to_string(),
        zstd_level: policy.compression_level,
        encryption: encryption_word(policy).into(),
        recipients: sealing.fingerprints(),
        objects: written.objects,
        trigger: by_streamer.map(|b| b.trigger.to_string()),
    };
    commit(store.as_ref(), &policy.name, lease.as_mut(), &manifest)?;
    tracing::info!(policy = %policy.name, target = %target.name, %label, "committed");
    let expired =
        super::expire::expire_locked(ctx, policy, target, store.as_ref(), false, Utc::now())?;
    Ok(BackupReport {
        policy: policy.name.clone(),
        target: target.name.clone(),
        label: label.to_string(),
        kind: manifest.kind.into(),
        parent: manifest.parent.as_ref().map(|p| p.to_string()),
        pages: Some(PageCounts {
            page_count: manifest.page_count,
            pages_stored: manifest.pages_stored,
        }),
        size: manifest.plain_size(),
        stored_size: manifest.stored_size(),
        seconds: started.elapsed().as_secs_f64(),
        note: base.note,
        expired: expired
            .into_iter()
            .filter(|r| r.removed)
            .map(|r| r.label)
            .collect(),
    })
}

fn encryption_word(policy: &Policy) -> &'static str {
    if policy.encrypted { "age" } else { "none" }
}

/// What a new backup builds on: a full's page index (then it is a diff of
/// that full), or nothing (a full), and why when that is not what was asked.
struct Base {
    index_of: Option<Label>,
    index: Option<(IndexReader<BufReader<File>>, u32)>,
    note: Option<String>,
}

impl Base {
    fn parent(&self) -> Option<&Label> {
        self.index_of.as_ref()
    }
}

/// A diff builds only on the newest *intact* full, and only when the chain
/// stays restorable with the keys configured now; otherwise the backup is a
/// full, with a note that says why.
fn choose_base(
    ctx: &Context,
    repo: &PolicyRepo<'_>,
    policy: &Policy,
    conn: &rusqlite::Connection,
    sealing: &Sealing,
    committed: &[super::Committed],
    kind: Option<BackupType>,
) -> Result<Base> {
    let target = repo.storage.target();
    let newest_full = committed.iter().rev().find_map(|c| {
        c.manifest
            .as_ref()
            .ok()
            .filter(|m| m.kind == BackupType::Full)
    });
    if let Some(damaged) = committed
        .iter()
        .rev()
        .take_while(|c| newest_full.is_none_or(|m| m.label != c.dir.label))
        .find_map(|c| c.manifest.as_ref().err())
    {
        tracing::warn!(policy = %policy.name, target, "a newer backup is damaged and not built on: {damaged}");
    }
    let mut base = Base {
        index_of: None,
        index: None,
        note: None,
    };
    let want = kind.unwrap_or(if newest_full.is_some() {
        BackupType::Diff
    } else {
        BackupType::Full
    });
    if want == BackupType::Full {
        return Ok(base);
    }
    let Some(m) = newest_full else {
        base.note =
            Some("no intact full backup exists on this target: taking a full instead".into());
        tracing::warn!(policy = %policy.name, target, "{}", base.note.as_deref().unwrap_or(""));
        return Ok(base);
    };
    let page_size = sqlite::snapshot::page_size(conn)?;
    let why = match m.diff_base_mismatch(
        policy.format,
        page_size,
        encryption_word(policy),
        &sealing.fingerprints(),
    ) {
        Some(why) => why,
        None => match cached_index(ctx, repo, m)? {
            Ok(path) => {
                let f = File::open(&path).map_err(|e| {
                    Error::io(format!("cannot open page index {}", path.display()), e)
                })?;
                let idx = IndexReader::new(BufReader::new(f)).map_err(|e| {
                    Error::io(format!("cannot read page index {}", path.display()), e)
                })?;
                base.index_of = Some(m.label.clone());
                base.index = Some((idx, m.page_size));
                return Ok(base);
            }
            Err(why) => why,
        },
    };
    base.note = Some(format!("{why}: taking a full instead"));
    tracing::warn!(policy = %policy.name, target, "{}", base.note.as_deref().unwrap_or(""));
    Ok(base)
}

/// A streamed policy pins the WAL so the snapshot knows its place in the
/// stream: point-in-time restores can start from this backup.
fn pin_wal(
    ctx: &Context,
    policy: &Policy,
    db: &Path,
    conn: &mut rusqlite::Connection,
    stream: Option<&Mutex<StreamState>>,
) -> Result<Option<repo::manifest::WalPosition>> {
    if !policy.wal.enabled || !sqlite::snapshot::journal_mode(conn)?.eq_ignore_ascii_case("wal") {
        return Ok(None);
    }
    let (pinned, cur) = sqlite::pin::pin(db)?;
    *conn = pinned;
    let wal = match stream {
        Some(st) => st
            .lock()
            .map_err(|_| crate::sqlite::stream::poisoned())
            .map(|st| crate::sqlite::stream::position_in(&st, cur.as_ref()))?,
        None => crate::sqlite::stream::position_for(
            &ctx.state().stream_state(&policy.name),
            cur.as_ref(),
        ),
    };
    if wal.is_none() {
        tracing::info!(policy = %policy.name, "no `dr replicate` is counting this WAL on this host: the backup has no WAL position");
    }
    Ok(wal)
}

/// What the snapshot wrote to the target.
struct Written {
    snapshot: Snapshot,
    pages_stored: u64,
    objects: BTreeMap<String, ObjectDigest>,
}

/// Streams the snapshot's pages (a diff: those that changed) through the
/// codec into the data object; a full also writes its page index, to a
/// local file as the pages go by (memory stays flat), then to the target
/// and into the local cache.
#[allow(clippy::too_many_arguments)]
fn write_objects(
    ctx: &Context,
    store: &dyn Storage,
    policy: &Policy,
    db: &Path,
    label: &Label,
    conn: &mut rusqlite::Connection,
    sealing: &Sealing,
    mut base: Option<(IndexReader<BufReader<File>>, u32)>,
    progress: &dyn Progress,
) -> Result<Written> {
    let kind = label.kind();
    let base_page_size = base.as_ref().map(|(_, ps)| *ps);
    let data_key = repo::object_key(&policy.name, label, repo::DATA);
    let out = store.create(&data_key)?;
    // The data object is the one a format 2 backup cuts into frames; its
    // page index stays one stream (small, read whole).
    let enc = if policy.format >= 2 {
        Encoder::framed(
            out,
            policy.compression_level,
            sealing,
            policy.compression_frame,
        )?
    } else {
        Encoder::new(out, policy.compression_level, sealing)?
    };
    let io_err = |e: std::io::Error| store_err(store, &data_key, e);
    let mut slot = Some(BufWriter::with_capacity(1 << 20, enc));
    let mut pages: Option<DataWriter> = None;
    let cache = ctx.state().page_cache(store.target(), &policy.name, label);
    let index_tmp = cache.with_extension("pages.tmp");
    let index_err =
        |e: std::io::Error| Error::io(format!("writing the page index {}", index_tmp.display()), e);
    let mut index: Option<IndexWriter<BufWriter<File>>> = None;
    let mut next_pgno: u32 = 1;
    let mut hasher: Option<HashAhead> = None;
    let mut process = |snap: &Snapshot, pgno: u32, data: &[u8], h: [u8; HASH_LEN]| {
        if pages.is_none() {
            if let Some(want) = base_page_size.filter(|&p| p != snap.page_size) {
                return Err(Error::Source {
                    path: db.to_path_buf(),
                    reason: format!(
                        "the page size changed to {} during the backup (its full has {want}): run the backup again",
                        snap.page_size
                    ),
                });
            }
            let b = slot
                .take()
                .ok_or_else(|| Error::Other("internal: snapshot began twice".into()))?;
            pages = Some(PageWriter::new(b, snap.page_size, snap.page_count).map_err(io_err)?);
            if kind == BackupType::Full {
                if let Some(dir) = index_tmp.parent() {
                    private_dir(dir).map_err(index_err)?;
                    remove_stale_temporaries(dir);
                }
                let f = private_file(&index_tmp).map_err(index_err)?;
                let count = u32::try_from(snap.page_count)
                    .map_err(|_| Error::Other("database has more than 2^32 pages".into()))?;
                index = Some(
                    IndexWriter::new(BufWriter::new(f), snap.page_size, count)
                        .map_err(index_err)?,
                );
            }
            progress.set_total(snap.page_count * u64::from(snap.page_size));
        }
        let store_it = match base.as_mut() {
            Some((idx, _)) => {
                let old = idx
                    .next_hash()
                    .map_err(|e| Error::io("reading the page index of the full", e))?;
                old != Some(h)
            }
            None => true,
        };
        if let Some(w) = index.as_mut() {
            w.push(&h).map_err(index_err)?;
        }
        if store_it && let Some(w) = pages.as_mut() {
            w.page(pgno, data).map_err(io_err)?;
        }
        progress.advance(data.len() as u64);
        Ok(())
    };
    let snapshot = sqlite::snapshot::read_pages(conn, db, |snap, pgno, data| {
        if pgno != next_pgno {
            return Err(Error::Source {
                path: db.to_path_buf(),
                reason: format!("snapshot returned page {pgno} where {next_pgno} was expected"),
            });
        }
        next_pgno += 1;
        hasher
            .get_or_insert_with(|| HashAhead::start(snap.page_size))
            .push(pgno, data, |n, page, h| process(snap, n, page, h))
    })?;
    if let Some(h) = hasher {
        h.finish(|n, page, h| process(&snapshot, n, page, h))?;
    }
    let Some(pages) = pages else {
        return Err(Error::Other(
            "internal: snapshot produced no page writer".into(),
        ));
    };
    let (buf, pages_stored) = pages.finish().map_err(io_err)?;
    let enc = buf.into_inner().map_err(|e| io_err(e.into_error()))?;
    let (data_digest, out) = enc.finish().map_err(io_err)?;
    out.commit()?;
    tracing::debug!(target = store.target(), key = %data_key, "data committed");

    let mut objects = BTreeMap::new();
    objects.insert(repo::DATA.to_string(), data_digest);
    if kind == BackupType::Full {
        let Some(index) = index else {
            return Err(Error::Other(
                "internal: full backup without a page index".into(),
            ));
        };
        index
            .finish()
            .and_then(|b| b.into_inner().map_err(|e| e.into_error()))
            .and_then(|f| f.sync_all())
            .map_err(index_err)?;
        let pages_key = repo::object_key(&policy.name, label, repo::PAGES);
        let digest = write_encoded(store, &pages_key, policy.compression_level, sealing, |w| {
            File::open(&index_tmp).and_then(|mut f| std::io::copy(&mut f, w).map(|_| ()))
        })?;
        if let Err(e) = std::fs::rename(&index_tmp, &cache) {
            tracing::warn!("could not cache the page index at {}: {e}", cache.display());
        }
        objects.insert(repo::PAGES.to_string(), digest);
    }
    Ok(Written {
        snapshot,
        pages_stored,
        objects,
    })
}

/// Writes the manifest, last: its presence commits the backup. The lease
/// is renewed first, so a writer that lost it never commits.
fn commit(
    store: &dyn Storage,
    policy: &str,
    lease: Option<&mut Lease>,
    manifest: &Manifest,
) -> Result<()> {
    if let Some(l) = lease {
        l.renew()?;
    }
    store.put_bytes(
        &repo::object_key(policy, &manifest.label, repo::MANIFEST),
        &manifest.to_bytes(),
    )
}

fn store_err(store: &dyn Storage, key: &str, e: std::io::Error) -> Error {
    store.err("write", key, &e)
}

/// Encodes what `fill` writes into a new object and commits it.
pub fn write_encoded(
    store: &dyn Storage,
    key: &str,
    level: i32,
    sealing: &Sealing,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<ObjectDigest> {
    let out = store.create(key)?;
    let mut buf = BufWriter::with_capacity(1 << 20, Encoder::new(out, level, sealing)?);
    fill(&mut buf).map_err(|e| store_err(store, key, e))?;
    let enc = buf
        .into_inner()
        .map_err(|e| store_err(store, key, e.into_error()))?;
    let (digest, out) = enc.finish().map_err(|e| store_err(store, key, e))?;
    out.commit()?;
    Ok(digest)
}

/// How far ahead of this host's clock the newest backup may be before dr
/// refuses instead of waiting for its own clock to pass it.
const MAX_LABEL_SKEW: Duration = Duration::from_secs(3);

/// A new label later than every committed one and unlike any directory's
/// (pgBackRest waits for the next second too). A committed backup dated
/// further ahead than [`MAX_LABEL_SKEW`] is refused with the reason, never
/// waited for: labels must grow, and a clock that runs fast somewhere would
/// otherwise stall every backup in silence.
fn new_label(
    parent: Option<&Label>,
    dirs: &[repo::BackupDir],
    store: &dyn Storage,
) -> Result<Label> {
    // Damaged backups count too: their labels are taken all the same.
    let newest = dirs
        .iter()
        .filter(|d| d.has_manifest)
        .map(|d| &d.label)
        .max();
    let mut waited = false;
    loop {
        let now: DateTime<Utc> = Utc::now();
        if let Some(n) = newest.filter(|n| n.time() > now) {
            let ahead = (n.time() - now).to_std().unwrap_or_default();
            if ahead > MAX_LABEL_SKEW {
                return Err(Error::Other(format!(
                    "backup {n} on target '{}' is dated {} ahead of this host's clock ({}): another host's clock runs fast or this one's is wrong; dr's labels must grow in time, so no backup can be added after it. Fix the clock (NTP), or remove that backup on purpose if it is not wanted",
                    store.target(),
                    humantime::format_duration(Duration::from_secs(ahead.as_secs())),
                    now.format("%Y-%m-%d %H:%M:%S UTC")
                )));
            }
            if !waited {
                tracing::info!(
                    target = store.target(),
                    "backup {n} is dated a moment ahead of this clock: waiting for it to pass"
                );
                waited = true;
            }
        }
        let l = match parent {
            Some(p) => Label::diff_of(p, now),
            None => Label::full(now),
        };
        if newest.is_none_or(|n| l.time() > n.time()) && !dirs.iter().any(|d| d.label == l) {
            return Ok(l);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Makes sure a verified copy of `full`'s page index is in the local cache
/// and returns its path: the cached file when its sha256 matches the
/// manifest, else the object from the target (which needs a key that can
/// decrypt). The inner `Err` says why a diff is not possible.
fn cached_index(
    ctx: &Context,
    repo: &PolicyRepo<'_>,
    full: &Manifest,
) -> Result<std::result::Result<PathBuf, String>> {
    let Some(expected) = full.objects.get(repo::PAGES) else {
        return Ok(Err(format!("full backup {} has no page index", full.label)));
    };
    let path = ctx
        .state()
        .page_cache(repo.storage.target(), repo.policy, &full.label);
    if let Ok(mut f) = File::open(&path) {
        let mut hash = <sha2::Sha256 as sha2::Digest>::new();
        if std::io::copy(&mut f, &mut HashWriter(&mut hash)).is_ok()
            && hex::encode(sha2::Digest::finalize(hash)) == expected.plain_sha256
        {
            return Ok(Ok(path));
        }
        tracing::warn!(
            "page index cache {} does not match the repository; reading it from the target",
            path.display()
        );
    }
    let unsealing = if full.encrypted() {
        match crate::keys::unsealing(&ctx.cfg().encryption, None)? {
            Some(u) => Some(u),
            None => {
                return Ok(Err(format!(
                    "the page index of full {} is not cached on this host and no identity is configured to read it from the target (set [encryption] identity_file)",
                    full.label
                )));
            }
        }
    } else {
        None
    };
    let key = repo::object_key(repo.policy, &full.label, repo::PAGES);
    let object = format!("target '{}': {key}", repo.storage.target());
    let reader = repo.storage.open(&key)?;
    let mut dec = Decoder::new(
        reader,
        &object,
        expected,
        unsealing.as_ref(),
        full.encrypted(),
    )?;
    let tmp = path.with_extension("pages.tmp");
    let local_err = |e: std::io::Error| Error::io(format!("writing {}", tmp.display()), e);
    if let Some(dir) = tmp.parent() {
        private_dir(dir).map_err(local_err)?;
    }
    let mut out = private_file(&tmp).map_err(local_err)?;
    // The decoder's last read checks the hashes: only a verified index is kept.
    let copied = std::io::copy(&mut dec, &mut out);
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(read_error(&object, e));
    }
    std::fs::rename(&tmp, &path).map_err(local_err)?;
    Ok(Ok(path))
}

/// The page-index cache says which pages changed when: only dr reads it.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn private_file(path: &std::path::Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Removes index files left by backups that died (the caller holds the lock).
fn remove_stale_temporaries(dir: &std::path::Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(".pages.tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Adapts a hasher to `Write` so files can be hashed with `io::copy`.
struct HashWriter<'a>(&'a mut sha2::Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sha2::Digest::update(self.0, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
