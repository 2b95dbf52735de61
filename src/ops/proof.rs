//! What a restore proves before its file is renamed into place, and how.
//!
//! Identity: every page of the written file is read back and compared with
//! the backup's own record of it: the full's page index (a BLAKE3 hash of
//! each page, taken when the backup was, stored and digested apart from
//! the data) and, for the pages a diff wrote, their hashes taken as the
//! diff's authenticated stream was written. A page that differs is refused
//! and named; nothing is replaced.
//!
//! Health: `integrity_check` is SQLite's proof that the b-trees hold
//! together and every index matches its table. The restore drill (`dr
//! verify`) runs it on the same backup and records that it passed
//! (`repo::drill`). A restore of a backup whose newest drill passed runs
//! `quick_check` (the structure, a fifth of the time on a database with an
//! index) and says which drill it relied on; a backup no drill passed, WAL
//! replayed on top of the backup (a state no drill checked), or `--check
//! full` runs the full check.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::PolicyRepo;
use crate::codec::{Decoder, read_error};
use crate::error::{Error, Result};
use crate::keys::Unsealing;
use crate::repo::{self, Label, Manifest};
use crate::sqlite::IndexReader;
use crate::sqlite::pages::{HASH_LEN, page_hash};

/// How a restore proves the database healthy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Check {
    /// `quick_check` when a drill passed on this backup, else
    /// `integrity_check`.
    #[default]
    Auto,
    /// `quick_check` only (the user's choice: no drill is looked for).
    Quick,
    /// `integrity_check` always.
    Full,
}

/// What a restore proved.
#[derive(Debug, Clone, Serialize)]
pub struct Proof {
    /// Pages of the written file read back and found equal to the backup's.
    pub pages_identical: u64,
    /// The SQLite check run on the restored file: `integrity_check` or
    /// `quick_check`.
    pub check: &'static str,
    /// The drill whose `integrity_check` of this very backup the restore
    /// relied on (with `quick_check`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillRef>,
}

/// A drill that passed, as a restore names it.
#[derive(Debug, Clone, Serialize)]
pub struct DrillRef {
    pub host: String,
    pub finished: DateTime<Utc>,
    /// The newest backup that drill restored.
    pub label: String,
}

/// Hashes of the pages the diffs of a chain wrote, by page number.
pub type Written = HashMap<u32, [u8; HASH_LEN]>;

/// Reads back every page of `file`, restored from `chain`, and compares it
/// with the full's page index and the diffs' `written` pages. Returns how
/// many pages were compared. The index is read as a stream beside the
/// file, a batch of pages at a time: memory stays the same whatever the
/// database's size.
pub fn identity(
    repo: &PolicyRepo<'_>,
    chain: &[Manifest],
    unsealing: Option<&Unsealing>,
    written: &Written,
    file: &File,
) -> Result<u64> {
    let (Some(full), Some(last)) = (chain.first(), chain.last()) else {
        return Err(Error::Other("internal: empty restore chain".into()));
    };
    let pages = u32::try_from(last.page_count).map_err(|_| Error::Integrity {
        object: format!("backup {}", last.label),
        reason: format!("page count {} is past SQLite's limit", last.page_count),
    })?;
    let mut index = FullIndex::open(repo, full, unsealing)?;
    let found = compare(file, last.page_size, pages, |pgno| {
        let indexed = index.next()?;
        written
            .get(&pgno)
            .copied()
            .or(indexed)
            .ok_or_else(|| Error::Integrity {
                object: format!("backup {}", last.label),
                reason: format!(
                    "page {pgno} is in neither the full's page index nor a diff of the chain"
                ),
            })
    })?;
    if let Some(pgno) = found {
        // Which side is wrong: a damaged page index (its digests are
        // checked at its end) names itself rather than the restored page.
        index.finish()?;
        return Err(Error::Integrity {
            object: format!("backup {}", last.label),
            reason: format!(
                "page {pgno} of the restored file differs from the backup's record of it (the page index of {}{}): nothing was replaced",
                full.label,
                if chain.len() > 1 {
                    " and the diff's pages"
                } else {
                    ""
                }
            ),
        });
    }
    index.finish()?;
    Ok(u64::from(pages))
}

/// The full's page index, read in page order through the decoder, which
/// checks its digests at its end ([`FullIndex::finish`]).
struct FullIndex {
    object: String,
    reader: IndexReader<std::io::BufReader<Decoder<Box<dyn Read + Send>>>>,
}

impl FullIndex {
    fn open(repo: &PolicyRepo<'_>, full: &Manifest, unsealing: Option<&Unsealing>) -> Result<Self> {
        let Some(digest) = full.objects.get(repo::PAGES) else {
            return Err(Error::Integrity {
                object: format!("backup {}", full.label),
                reason: "its manifest lists no page index".into(),
            });
        };
        let key = repo::object_key(repo.policy, &full.label, repo::PAGES);
        let object = format!("target '{}': {key}", repo.storage.target());
        let raw = repo.storage.open(&key)?;
        let dec = Decoder::new(raw, &object, digest, unsealing, full.encrypted())?;
        let reader = IndexReader::new(std::io::BufReader::with_capacity(1 << 20, dec))
            .map_err(|e| read_error(&object, e))?;
        if reader.page_size != full.page_size || u64::from(reader.count) != full.page_count {
            return Err(Error::Integrity {
                object,
                reason: format!(
                    "the page index is of {} pages of {} bytes, the manifest says {} of {}",
                    reader.count, reader.page_size, full.page_count, full.page_size
                ),
            });
        }
        Ok(FullIndex { object, reader })
    }

    /// The next page's hash, `None` past the full's last page.
    fn next(&mut self) -> Result<Option<[u8; HASH_LEN]>> {
        self.reader
            .next_hash()
            .map_err(|e| read_error(&self.object, e))
    }

    /// Reads what is left to its end, so that the decoder checks the
    /// digests: hashes of pages a diff cut off, then nothing.
    fn finish(mut self) -> Result<()> {
        while self.next()?.is_some() {}
        let mut rest = Vec::new();
        self.reader
            .into_inner()
            .read_to_end(&mut rest)
            .map_err(|e| read_error(&self.object, e))?;
        if !rest.is_empty() {
            return Err(Error::Integrity {
                object: self.object,
                reason: format!("{} bytes after the last page hash", rest.len()),
            });
        }
        Ok(())
    }
}

/// The first page (1-based) of the `pages` of `file` whose hash is not
/// `expected(pgno)`'s: read a batch at a time, each batch hashed on every
/// core.
fn compare(
    file: &File,
    page_size: u32,
    pages: u32,
    mut expected: impl FnMut(u32) -> Result<[u8; HASH_LEN]>,
) -> Result<Option<u32>> {
    const BATCH_PAGES: u32 = 1024;
    let ps = page_size as usize;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let mut buf = vec![0u8; BATCH_PAGES as usize * ps];
    let mut want = Vec::with_capacity(BATCH_PAGES as usize);
    let mut first = 1u32;
    while first <= pages {
        let n = BATCH_PAGES.min(pages - first + 1);
        want.clear();
        for pgno in first..first + n {
            want.push(expected(pgno)?);
        }
        let bytes = &mut buf[..n as usize * ps];
        file.read_exact_at(bytes, u64::from(first - 1) * ps as u64)
            .map_err(|e| Error::io("cannot read the restored file back to compare its pages", e))?;
        let per = (n as usize).div_ceil(threads).max(1);
        let bad = std::thread::scope(|s| {
            let handles: Vec<_> = bytes
                .chunks(per * ps)
                .zip(want.chunks(per))
                .enumerate()
                .map(|(i, (part, hashes))| {
                    s.spawn(move || {
                        part.chunks(ps)
                            .zip(hashes)
                            .position(|(page, h)| page_hash(page) != *h)
                            .map(|k| i * per + k)
                    })
                })
                .collect();
            let mut found: Result<Option<usize>> = Ok(None);
            for h in handles {
                match h.join() {
                    Ok(Some(k)) => found = found.map(|f| Some(f.map_or(k, |x| x.min(k)))),
                    Ok(None) => {}
                    Err(_) => {
                        found = Err(Error::Other(
                            "internal: a page-comparing thread panicked".into(),
                        ))
                    }
                }
            }
            found
        })?;
        if let Some(k) = bad {
            return Ok(Some(first + k as u32));
        }
        first += n;
    }
    Ok(None)
}

/// Which check the restore of backup `label` runs, and the drill it relies
/// on when `quick_check` is enough. A drill record that cannot be read
/// means the full check, never a failed restore.
pub fn health(
    repo: &PolicyRepo<'_>,
    label: &Label,
    replayed: bool,
    check: Check,
) -> (&'static str, Option<DrillRef>) {
    match check {
        Check::Full => ("integrity_check", None),
        Check::Quick => ("quick_check", None),
        Check::Auto if replayed => ("integrity_check", None),
        Check::Auto => match repo::drill::about(repo.storage, repo.policy, &label.to_string()) {
            Ok(Some(r)) if r.ok => (
                "quick_check",
                Some(DrillRef {
                    host: r.host,
                    finished: r.finished,
                    label: r.label,
                }),
            ),
            Ok(_) => ("integrity_check", None),
            Err(e) => {
                tracing::info!(policy = %repo.policy, %label, "the drill records could not be read ({e}): running the full integrity_check");
                ("integrity_check", None)
            }
        },
    }
}

/// Runs `check` (see [`health`]) on the restored file.
pub fn run_check(path: &std::path::Path, check: &str) -> Result<()> {
    if check == "quick_check" {
        crate::sqlite::quick_check_restored(path)
    } else {
        crate::sqlite::integrity_check(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_changed_byte_anywhere_is_named_by_its_page() {
        let ps = 512usize;
        // Past one batch, so that batches and threads both split it.
        let pages = 5000;
        let mut f = tempfile::tempfile().expect("tmp");
        let data: Vec<u8> = (0..pages * ps).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).expect("write");
        let hashes: Vec<[u8; HASH_LEN]> = data.chunks(ps).map(page_hash).collect();
        let run = |f: &File| compare(f, ps as u32, pages as u32, |p| Ok(hashes[p as usize - 1]));
        assert_eq!(run(&f).expect("read"), None);
        for pgno in [1usize, 257, 1024, 1025, 4999, 5000] {
            let at = (pgno - 1) * ps + 100;
            f.write_all_at(&[data[at] ^ 1], at as u64).expect("flip");
            assert_eq!(run(&f).expect("read"), Some(pgno as u32));
            f.write_all_at(&[data[at]], at as u64).expect("restore");
        }
        // A file shorter than the backup is an error, not a pass.
        f.set_len(((pages - 1) * ps) as u64).expect("truncate");
        assert!(run(&f).is_err());
    }
}
