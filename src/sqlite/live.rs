//! WAL applied to a database that readers have open (`dr follow`). Each
//! segment of the source (whole transactions, ending at a commit) becomes
//! one SQLite transaction of page writes through `sqlite_dbpage`, so
//! SQLite's own locking gives every reader a committed state of the source
//! (the one before the segment or the one after it), never a half-applied
//! segment, and the copy's own WAL keeps it crash-safe.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, params};

use super::segment::SegmentReader;
use crate::codec::read_error;
use crate::error::{Error, Result};

/// A live copy and the WAL frame it is at.
pub struct LiveCopy {
    conn: Connection,
    path: PathBuf,
    page_size: u32,
    /// Every frame of the generation up to here is applied.
    pub seq: u64,
    /// Commit time of the last transaction applied.
    pub last_commit: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for LiveCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveCopy({}, frame {})", self.path.display(), self.seq)
    }
}

fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::Other(format!("the copy at {}: {e}", path.display()))
}

impl LiveCopy {
    /// Opens the copy at `path`, which holds every frame up to `seq`.
    pub fn open(path: &Path, seq: u64) -> Result<LiveCopy> {
        let err = db_err(path);
        let conn = Connection::open(path).map_err(&err)?;
        // Readers hold their snapshot briefly; a write waits for them.
        conn.busy_timeout(Duration::from_secs(30)).map_err(&err)?;
        // WAL mode with synchronous=NORMAL: a power cut may take the last
        // segments applied, never consistency; the follower applies them
        // again from its recorded position.
        conn.execute_batch("PRAGMA synchronous=NORMAL")
            .map_err(&err)?;
        let page_size: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(&err)?;
        Ok(LiveCopy {
            conn,
            path: path.to_path_buf(),
            page_size,
            seq,
            last_commit: None,
        })
    }

    /// Applies the transactions of one segment (`object`, named as holding
    /// frames `first` to `last`) that are past `seq`. Returns how many.
    /// `sealed`: it was read out of age, which authenticated it
    /// ([`SegmentReader::sealed`]).
    pub fn segment(
        &mut self,
        input: impl Read,
        object: &str,
        first: u64,
        last: u64,
        sealed: bool,
    ) -> Result<u64> {
        let bad = |reason: String| Error::Integrity {
            object: object.to_string(),
            reason,
        };
        let path = self.path.clone();
        let err = db_err(&path);
        let r = if sealed {
            SegmentReader::sealed(input)
        } else {
            SegmentReader::new(input)
        };
        let mut r = r.map_err(|e| read_error(object, e))?;
        if r.first_seq != first {
            return Err(bad(format!(
                "starts at frame {} but its name says {first}",
                r.first_seq
            )));
        }
        if r.page_size != self.page_size {
            return Err(bad(format!(
                "page size {} differs from the copy's {}",
                r.page_size, self.page_size
            )));
        }
        let mut at = first - 1;
        let mut applied = 0;
        let mut last_commit = None;
        let mut final_pages = None;
        // One SQLite transaction per segment: its end is a committed state
        // of the source as much as each transaction's end is, and one
        // commit (one fsync) a segment instead of one per transaction.
        // Within it only the last version of each page is written.
        let tx = self.conn.unchecked_transaction().map_err(&err)?;
        let mut pages = Pending {
            held: BTreeMap::new(),
            size: tx
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .map_err(&err)?,
            page_size: self.page_size as usize,
        };
        while let Some(t) = r.next_txn().map_err(|e| read_error(object, e))? {
            if t.db_pages == 0 {
                return Err(bad(format!(
                    "a transaction after frame {at} commits a database of 0 pages"
                )));
            }
            let start = at + 1;
            at += u64::from(t.nframes);
            let apply = at > self.seq;
            if apply && start <= self.seq {
                return Err(bad(format!(
                    "a transaction spans frame {}, where the copy is",
                    self.seq
                )));
            }
            for _ in 0..t.nframes {
                let (pgno, page) = r.next_frame().map_err(|e| read_error(object, e))?;
                if apply && pgno <= t.db_pages {
                    pages.hold(&tx, pgno, page).map_err(&err)?;
                }
            }
            if apply {
                pages.cut(&tx, t.db_pages).map_err(&err)?;
                final_pages = Some(t.db_pages);
                last_commit = Utc.timestamp_millis_opt(t.commit_ms).single();
                applied += 1;
            }
        }
        if at != last {
            return Err(bad(format!("ends at frame {at} but its name says {last}")));
        }
        pages.write(&tx).map_err(&err)?;
        if let Some(n) = final_pages {
            truncate(&tx, n).map_err(&err)?;
        }
        // Dropped without a commit (an error above): nothing of it is seen.
        tx.commit().map_err(&err)?;
        if applied > 0 {
            self.seq = at;
            self.last_commit = last_commit;
        }
        Ok(applied)
    }

    /// Replaces the whole content with the database in `file` (the base
    /// of a new generation), in one transaction, and sets the frame.
    pub fn replace_all(&mut self, file: &Path, seq: u64) -> Result<()> {
        let path = self.path.clone();
        let err = db_err(&path);
        let mut f = std::fs::File::open(file)
            .map_err(|e| Error::io(format!("cannot read {}", file.display()), e))?;
        let mut page = vec![0u8; self.page_size as usize];
        let tx = self.conn.unchecked_transaction().map_err(&err)?;
        let mut insert = tx.prepare_cached(PUT_PAGE).map_err(&err)?;
        let mut pgno: u32 = 0;
        loop {
            match f.read_exact(&mut page) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(Error::io(format!("cannot read {}", file.display()), e)),
            }
            pgno += 1;
            insert.execute(params![pgno, page]).map_err(&err)?;
        }
        drop(insert);
        if pgno == 0 {
            return Err(Error::Other(format!("{} holds no page", file.display())));
        }
        truncate(&tx, pgno).map_err(&err)?;
        tx.commit().map_err(&err)?;
        self.seq = seq;
        Ok(())
    }
}

/// The pages of a segment not written yet, newest version of each: a
/// segment of many small transactions rewrites the same few pages again
/// and again (200 transactions a second touch a handful of pages), and in
/// one SQLite transaction only the last version is ever seen. Bounded:
/// past [`Pending::MAX_BYTES`] the pages held are written and the segment
/// goes on.
struct Pending {
    held: BTreeMap<u32, Vec<u8>>,
    /// The copy's length in pages as written so far in the transaction.
    size: u32,
    page_size: usize,
}

impl Pending {
    const MAX_BYTES: usize = 64 << 20;

    fn hold(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        pgno: u32,
        page: &[u8],
    ) -> rusqlite::Result<()> {
        match self.held.entry(pgno) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut().copy_from_slice(page),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(page.to_vec());
                if self.held.len() * self.page_size > Self::MAX_BYTES {
                    self.write(tx)?;
                }
            }
        }
        Ok(())
    }

    /// A transaction ended with the database `pages` long: what lies
    /// beyond is gone, held or written (as applying each transaction in
    /// turn would have it).
    fn cut(&mut self, tx: &rusqlite::Transaction<'_>, pages: u32) -> rusqlite::Result<()> {
        self.held.split_off(&pages.saturating_add(1));
        if pages < self.size {
            cut_at(tx, pages)?;
            self.size = pages;
        }
        Ok(())
    }

    /// Writes the pages held, in page order.
    fn write(&mut self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        let mut insert = tx.prepare_cached(PUT_PAGE)?;
        for (pgno, page) in std::mem::take(&mut self.held) {
            insert.execute(params![pgno, page])?;
            self.size = self.size.max(pgno);
        }
        Ok(())
    }
}

/// Writes page `?1` with content `?2`.
const PUT_PAGE: &str = "INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)";

/// Cuts the copy to `pages` pages inside `tx`, when it is longer.
fn truncate(tx: &rusqlite::Transaction<'_>, pages: u32) -> rusqlite::Result<()> {
    let now: u32 = tx.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    if now > pages {
        cut_at(tx, pages)?;
    }
    Ok(())
}

/// Cuts the copy to `pages` pages inside `tx` (SQLite truncates when a
/// NULL page is written past the end).
fn cut_at(tx: &rusqlite::Transaction<'_>, pages: u32) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, NULL)",
        params![pages + 1],
    )?;
    Ok(())
}
