//! What a restore proves before its file is renamed into place, and how.
//!
//! Identity: every page the full gives is hashed as it is written and
//! compared with the backup's own record of it, the full's page index (a
//! BLAKE3 hash of each page, taken when the backup was, stored and digested
//! apart from the data); a diff's pages are proven by its own digests; and
//! every page of the database must have come from one or the other. What
//! is compared is the very buffer handed to the kernel, at the offset its
//! page number gives. A page that differs is refused and named; nothing is
//! replaced.
//!
//! Health: `integrity_check` is SQLite's proof that the b-trees hold
//! together and every index matches its table. The restore drill (`dr
//! verify`) runs it on the same backup and records that it passed
//! (`repo::drill`). A restore of a backup whose newest drill passed runs
//! `quick_check` (the structure, a fifth of the time on a database with an
//! index) and says which drill it relied on; a backup no drill passed, WAL
//! replayed on top of the backup (a state no drill checked), or `--check
//! full` runs the full check.

use std::io::Read;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::PolicyRepo;
use crate::codec::{Decoder, read_error};
use crate::error::{Error, Result};
use crate::keys::Unsealing;
use crate::repo::{self, Label, Manifest};
use crate::sqlite::IndexReader;
use crate::sqlite::pages::HASH_LEN;

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
    /// Pages of the restored database proven equal to the backup's.
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

/// The full's page hashes in page order: its page index, or a test's.
pub trait PageRecord {
    /// The next page's hash, `None` past the last page.
    fn next(&mut self) -> Result<Option<[u8; HASH_LEN]>>;
    /// Reads what is left, so that the record's own digests are checked.
    fn finish(self) -> Result<()>;
}

/// Proves, page by page as a restore writes them, that each page of the
/// full equals the backup's record of it, and at the end that every page
/// of the database came from the full or a diff of the chain. The index is
/// read as a stream beside the data: memory stays the same whatever the
/// database's size (one bit a page).
pub struct Identity<R: PageRecord> {
    /// Taken when it is finished.
    record: Option<R>,
    /// The backup the restore ends at, for errors.
    last: String,
    full: String,
    chained: bool,
    /// The page the record's next hash is for.
    record_at: u32,
    /// Which stage of the chain is being written: 0 is the full.
    stage: usize,
    covered: Vec<u64>,
}

impl<R: PageRecord> Identity<R> {
    /// For a restore of `chain` (a full, then diffs), whose full's page
    /// record is `record`.
    pub fn new(record: R, chain: &[Manifest]) -> Result<Self> {
        let (Some(full), Some(last)) = (chain.first(), chain.last()) else {
            return Err(Error::Other("internal: empty restore chain".into()));
        };
        let most = chain.iter().map(|m| m.page_count).max().unwrap_or(0);
        Self::of(
            record,
            &full.label.to_string(),
            &last.label.to_string(),
            chain.len() > 1,
            most,
        )
    }

    /// For a chain from `full` to `last` (`chained` when it has diffs)
    /// whose largest database has `most` pages.
    fn of(record: R, full: &str, last: &str, chained: bool, most: u64) -> Result<Self> {
        let words = usize::try_from(most / 64 + 1).map_err(|_| Error::Integrity {
            object: format!("backup {last}"),
            reason: format!("page count {most} is past SQLite's limit"),
        })?;
        Ok(Identity {
            record: Some(record),
            last: last.to_string(),
            full: full.to_string(),
            chained,
            record_at: 1,
            stage: 0,
            covered: vec![0; words],
        })
    }

    /// The pages that follow are stage `i` of the chain's (0: the full).
    pub fn stage(&mut self, i: usize) {
        self.stage = i;
    }

    /// Page `pgno`, about to be written, hashes to `hash`. The full's pages
    /// come in page order (as a full is taken) and are each compared with
    /// the record; a diff's are proven by its own digests and counted.
    pub fn page(&mut self, pgno: u32, hash: &[u8; HASH_LEN]) -> Result<()> {
        if self.stage == 0 {
            if pgno < self.record_at {
                return Err(Error::Integrity {
                    object: format!("backup {}", self.full),
                    reason: format!(
                        "page {pgno} comes after page {} in its page stream",
                        self.record_at - 1
                    ),
                });
            }
            let mut recorded = None;
            while self.record_at <= pgno {
                recorded = match self.record.as_mut() {
                    Some(r) => r.next()?,
                    None => None,
                };
                self.record_at += 1;
            }
            if recorded.as_ref() != Some(hash) {
                return Err(self.differs(pgno));
            }
        }
        let (word, bit) = ((pgno / 64) as usize, 1u64 << (pgno % 64));
        if let Some(w) = self.covered.get_mut(word) {
            *w |= bit;
        }
        Ok(())
    }

    /// A page that differs from the record. Which side is wrong: a damaged
    /// page index (its digests are checked at its end) names itself rather
    /// than the page.
    fn differs(&mut self, pgno: u32) -> Error {
        if let Some(Err(e)) = self.record.take().map(R::finish) {
            return e;
        }
        Error::Integrity {
            object: format!("backup {}", self.last),
            reason: format!(
                "page {pgno} as restored differs from the backup's record of it (the page index of {}): nothing was replaced",
                self.full
            ),
        }
    }

    /// After the last stage: every page of the `page_count` the chain's
    /// last backup has was proven. Returns how many.
    pub fn finish(self, page_count: u64) -> Result<u64> {
        let pages = u32::try_from(page_count).map_err(|_| Error::Integrity {
            object: format!("backup {}", self.last),
            reason: format!("page count {page_count} is past SQLite's limit"),
        })?;
        for pgno in 1..=pages {
            let (word, bit) = ((pgno / 64) as usize, 1u64 << (pgno % 64));
            if self.covered.get(word).is_none_or(|w| w & bit == 0) {
                return Err(Error::Integrity {
                    object: format!("backup {}", self.last),
                    reason: format!(
                        "page {pgno} is in neither the full's page stream nor a diff of the chain{}",
                        if self.chained {
                            ""
                        } else {
                            " (the backup has no diff)"
                        }
                    ),
                });
            }
        }
        if let Some(r) = self.record {
            r.finish()?;
        }
        Ok(u64::from(pages))
    }
}

/// The full's page index, read in page order through the decoder, which
/// checks its digests at its end ([`PageRecord::finish`]).
pub struct FullIndex {
    object: String,
    reader: IndexReader<std::io::BufReader<Decoder<Box<dyn Read + Send>>>>,
}

impl FullIndex {
    pub fn open(
        repo: &PolicyRepo<'_>,
        full: &Manifest,
        unsealing: Option<&Unsealing>,
    ) -> Result<Self> {
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
}

impl PageRecord for FullIndex {
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
    use crate::sqlite::pages::page_hash;

    /// A page record held in memory; `damaged` makes its end fail, as a
    /// page index whose digests differ does.
    struct Held {
        hashes: std::vec::IntoIter<[u8; HASH_LEN]>,
        damaged: bool,
    }

    impl PageRecord for Held {
        fn next(&mut self) -> Result<Option<[u8; HASH_LEN]>> {
            Ok(self.hashes.next())
        }
        fn finish(self) -> Result<()> {
            if self.damaged {
                return Err(Error::Integrity {
                    object: "the page index".into(),
                    reason: "its digest differs".into(),
                });
            }
            Ok(())
        }
    }

    fn page(pgno: u32) -> [u8; HASH_LEN] {
        page_hash(&pgno.to_le_bytes().repeat(128))
    }

    fn identity(pages: u32, damaged: bool, chained: bool, most: u64) -> Identity<Held> {
        let held = Held {
            hashes: (1..=pages).map(page).collect::<Vec<_>>().into_iter(),
            damaged,
        };
        Identity::of(held, "F", "D", chained, most).expect("identity")
    }

    #[test]
    fn every_page_is_proven_and_a_changed_one_is_named() {
        let mut id = identity(300, false, false, 300);
        for p in 1..=300 {
            id.page(p, &page(p)).expect("equal");
        }
        assert_eq!(id.finish(300).expect("proven"), 300);

        let mut id = identity(300, false, false, 300);
        for p in 1..=99 {
            id.page(p, &page(p)).expect("equal");
        }
        let e = id.page(100, &page(7)).expect_err("differs").to_string();
        assert!(e.contains("page 100 as restored differs"), "{e}");
        assert!(e.contains("page index of F"), "{e}");

        // The record's own damage is the cause, and is named instead.
        let mut id = identity(300, true, false, 300);
        let e = id.page(1, &page(2)).expect_err("differs").to_string();
        assert!(e.contains("its digest differs"), "{e}");
    }

    #[test]
    fn a_page_missing_from_the_chain_or_out_of_order_is_refused() {
        // A full of 200 pages, a diff that grows the database to 220 and
        // rewrites page 5: pages 201..=220 must come from the diff.
        let mut id = identity(200, false, true, 220);
        for p in 1..=200 {
            id.page(p, &page(p)).expect("full");
        }
        id.stage(1);
        for p in (201..=219).chain([5]) {
            id.page(p, &page(0)).expect("diff");
        }
        let e = id.finish(220).expect_err("missing").to_string();
        assert!(e.contains("page 220 is in neither"), "{e}");

        let mut id = identity(200, false, false, 200);
        id.page(1, &page(1)).expect("full");
        id.page(3, &page(3)).expect("skips a page of the record");
        let e = id.page(2, &page(2)).expect_err("back").to_string();
        assert!(e.contains("page 2 comes after page 3"), "{e}");
        let mut id = identity(200, false, false, 200);
        for p in (1..=200).filter(|p| *p != 77) {
            id.page(p, &page(p)).expect("full");
        }
        let e = id.finish(200).expect_err("gap").to_string();
        assert!(e.contains("page 77 is in neither"), "{e}");
    }
}
