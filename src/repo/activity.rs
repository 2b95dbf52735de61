//! A fleet's activity record, `<fleet>/activity.json` on each target: the
//! fleet's streamer rewrites it after it ships a segment or commits a base
//! of any database of the fleet, naming the databases that changed. A
//! standby following the fleet reads this one small object (a conditional
//! GET: unchanged costs a `304`) instead of listing every database's WAL,
//! so an idle fleet of 1,000 costs the standby a few requests a minute,
//! not 1,000 listings. No I/O here.
//!
//! The record holds the newest change of each database that changed
//! lately, each with the number of the write that named it (`seq`), at
//! most [`KEEP`] of them. A reader remembers the `epoch` and `seq` it last
//! read: every database changed since is in `recent` when the epoch is the
//! same and its `seq` is not older than `floor` (the newest write whose
//! names were dropped); otherwise it must look at every database.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The record's format: a reader of another format looks at every database.
pub const FORMAT: u32 = 1;
/// Changes kept: a reader that fell further behind looks at everything.
pub const KEEP: usize = 1024;

/// The record's file name, beside the fleet's databases' prefixes
/// (`<fleet>/<db>/…`), so never taken for a database.
pub const NAME: &str = "activity.json";

/// Key of a fleet policy's activity record.
pub fn key(fleet: &str) -> String {
    format!("{fleet}/{NAME}")
}

/// One database's newest change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub seq: u64,
    pub db: String,
}

/// The record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    pub format: u32,
    /// Who numbers the writes: a new epoch restarts the numbering.
    pub epoch: String,
    /// The newest write's number.
    pub seq: u64,
    /// Every change after write `floor` (older ones were dropped).
    pub floor: u64,
    /// Oldest first, one per database.
    pub recent: Vec<Change>,
}

/// Which databases a reader must look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// These changed since the reader's last read.
    Changed(BTreeSet<String>),
    /// The reader cannot know (another epoch, fell behind, another
    /// format): every database.
    Everything,
}

impl Activity {
    pub fn new(epoch: String) -> Activity {
        Activity {
            format: FORMAT,
            epoch,
            seq: 0,
            floor: 0,
            recent: Vec::new(),
        }
    }

    /// One write naming `dbs`.
    pub fn record<'a>(&mut self, dbs: impl IntoIterator<Item = &'a String>) {
        self.seq += 1;
        let named: BTreeSet<&String> = dbs.into_iter().collect();
        self.recent.retain(|c| !named.contains(&c.db));
        self.recent.extend(named.into_iter().map(|db| Change {
            seq: self.seq,
            db: db.clone(),
        }));
        if self.recent.len() > KEEP {
            let dropped = self.recent.len() - KEEP;
            if let Some(c) = self.recent.get(dropped - 1) {
                self.floor = self.floor.max(c.seq);
            }
            self.recent.drain(..dropped);
        }
    }

    /// What changed since a reader last read write `seq` of `epoch`
    /// (`None`: it never read).
    pub fn since(&self, last: Option<(&str, u64)>) -> Since {
        match last {
            Some((epoch, seq))
                if self.format == FORMAT
                    && epoch == self.epoch
                    && seq >= self.floor
                    && seq <= self.seq =>
            {
                Since::Changed(
                    self.recent
                        .iter()
                        .filter(|c| c.seq > seq)
                        .map(|c| c.db.clone())
                        .collect(),
                )
            }
            _ => Since::Everything,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The record in `bytes`, `None` when it is not one this dr reads.
    pub fn parse(bytes: &[u8]) -> Option<Activity> {
        serde_json::from_slice::<Activity>(bytes)
            .ok()
            .filter(|a| a.format == FORMAT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Since {
        Since::Changed(v.iter().map(|s| s.to_string()).collect())
    }

    fn dbs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_reader_learns_exactly_what_changed_since_it_read() {
        let mut a = Activity::new("e1".into());
        a.record(&dbs(&["alice", "bob"]));
        assert_eq!(a.since(None), Since::Everything);
        assert_eq!(a.since(Some(("e1", 0))), names(&["alice", "bob"]));
        a.record(&dbs(&["bob"]));
        assert_eq!(a.since(Some(("e1", 1))), names(&["bob"]));
        assert_eq!(a.since(Some(("e1", 2))), names(&[]));
        // One entry per database: bob's older change was replaced.
        assert_eq!(a.recent.len(), 2);
        // Another writer's numbering, or a number from the future (the
        // record was replaced by an older one): everything.
        assert_eq!(a.since(Some(("e0", 2))), Since::Everything);
        assert_eq!(a.since(Some(("e1", 3))), Since::Everything);
        let back = Activity::parse(&a.to_json()).expect("parses");
        assert_eq!(back, a);
        assert_eq!(Activity::parse(b"{\"format\":9}"), None);
    }

    #[test]
    fn a_reader_that_fell_behind_the_kept_changes_looks_at_everything() {
        let mut a = Activity::new("e".into());
        for i in 0..KEEP + 10 {
            a.record(&[format!("db{i}")]);
        }
        assert_eq!(a.recent.len(), KEEP);
        assert_eq!(a.floor, 10);
        assert_eq!(a.since(Some(("e", 9))), Since::Everything);
        let Since::Changed(c) = a.since(Some(("e", 10))) else {
            panic!("a reader at the floor knows");
        };
        assert_eq!(c.len(), KEEP);
        let Since::Changed(c) = a.since(Some(("e", a.seq - 1))) else {
            panic!("a recent reader knows");
        };
        assert_eq!(c, [format!("db{}", KEEP + 9)].into_iter().collect());
    }
}
