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
/// many pages were compared.
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
    let index = full_index(repo, full, unsealing)?;
    let pages = u32::try_from(last.page_count).map_err(|_| Error::Integrity {
        object: format!("backup {}", last.label),
        reason: format!("page count {} is past SQLite's limit", last.page_count),
    })?;
    let mut expected = Vec::with_capacity(pages as usize);
    for pgno in 1..=pages {
        let h = written
            .get(&pgno)
            .or_else(|| index.get(pgno as usize - 1))
            .ok_or_else(|| Error::Integrity {
                object: format!("backup {}", last.label),
                reason: format!(
                    "page {pgno} is in neither the full's page index nor a diff of the chain"
                ),
            })?;
        expected.push(*h);
    }
    compare(file, last.page_size, &expected)
        .map_err(|e| Error::io("cannot read the restored file back to compare its pages", e))?
        .map_or(Ok(u64::from(pages)), |pgno| {
            Err(Error::Integrity {
                object: format!("backup {}", last.label),
                reason: format!(
                    "page {pgno} of the restored file differs from the backup's record of it (the page index of {}{}): nothing was replaced",
                    full.label,
                    if chain.len() > 1 { " and the diff's pages" } else { "" }
                ),
            })
        })
}

/// The full's page index, read whole (16 bytes a page: 4 MiB for 1 GiB)
/// through the decoder, which checks its digests at its end.
fn full_index(
    repo: &PolicyRepo<'_>,
    full: &Manifest,
    unsealing: Option<&Unsealing>,
) -> Result<Vec<[u8; HASH_LEN]>> {
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
    let mut input = std::io::BufReader::with_capacity(1 << 20, dec);
    let mut idx = IndexReader::new(&mut input).map_err(|e| read_error(&object, e))?;
    if idx.page_size != full.page_size || u64::from(idx.count) != full.page_count {
        return Err(Error::Integrity {
            object,
            reason: format!(
                "the page index is of {} pages of {} bytes, the manifest says {} of {}",
                idx.count, idx.page_size, full.page_count, full.page_size
            ),
        });
    }
    let mut out = Vec::with_capacity(idx.count as usize);
    while let Some(h) = idx.next_hash().map_err(|e| read_error(&object, e))? {
        out.push(h);
    }
    // To its end: the decoder checks the digests on its last read.
    let mut rest = Vec::new();
    input
        .read_to_end(&mut rest)
        .map_err(|e| read_error(&object, e))?;
    if !rest.is_empty() {
        return Err(Error::Integrity {
            object,
            reason: format!("{} bytes after the last page hash", rest.len()),
        });
    }
    Ok(out)
}

/// The first page (1-based) of `file` whose hash is not `expected`'s, read
/// on every core in ranges of whole pages.
fn compare(
    file: &File,
    page_size: u32,
    expected: &[[u8; HASH_LEN]],
) -> std::io::Result<Option<u32>> {
    const CHUNK_PAGES: usize = 256;
    let ps = page_size as usize;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let per = expected.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = expected
            .chunks(per)
            .enumerate()
            .map(|(i, part)| {
                s.spawn(move || -> std::io::Result<Option<u32>> {
                    let first = i * per;
                    let mut buf = vec![0u8; CHUNK_PAGES * ps];
                    for (j, hashes) in part.chunks(CHUNK_PAGES).enumerate() {
                        let at = first + j * CHUNK_PAGES;
                        let bytes = &mut buf[..hashes.len() * ps];
                        file.read_exact_at(bytes, (at * ps) as u64)?;
                        for (k, (page, want)) in bytes.chunks(ps).zip(hashes).enumerate() {
                            if page_hash(page) != *want {
                                return Ok(Some((at + k + 1) as u32));
                            }
                        }
                    }
                    Ok(None)
                })
            })
            .collect();
        let mut first: Option<u32> = None;
        for h in handles {
            let found = h.join().unwrap_or_else(|_| {
                Err(std::io::Error::other("a page-comparing thread panicked"))
            })?;
            first = match (first, found) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(first)
    })
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
        let pages = 1000;
        let mut f = tempfile::tempfile().expect("tmp");
        let data: Vec<u8> = (0..pages * ps).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).expect("write");
        let expected: Vec<[u8; HASH_LEN]> = data.chunks(ps).map(page_hash).collect();
        assert_eq!(compare(&f, ps as u32, &expected).expect("read"), None);
        for pgno in [1usize, 257, 999, 1000] {
            let at = (pgno - 1) * ps + 100;
            f.write_all_at(&[data[at] ^ 1], at as u64).expect("flip");
            assert_eq!(
                compare(&f, ps as u32, &expected).expect("read"),
                Some(pgno as u32)
            );
            f.write_all_at(&[data[at]], at as u64).expect("restore");
        }
        // A file shorter than the backup is an error, not a pass.
        f.set_len(((pages - 1) * ps) as u64).expect("truncate");
        assert!(compare(&f, ps as u32, &expected).is_err());
    }
}
