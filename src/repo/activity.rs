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
//!
//! A change that is only a heartbeat (an empty segment the streamer sends
//! so that silence means a stopped primary) says so: its entry keeps the
//! number of the database's last real change (`changed`) and carries the
//! heartbeat's instant (`until`). A reader then learns that the primary is
//! alive and the database unchanged without listing its WAL; a reader of
//! the first version of the record ignores the two fields and looks.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The record's format: a reader of another format looks at every database.
pub const FORMAT: u32 = 1;
/// Changes kept: a reader that fell further behind looks at everything.
pub const KEEP: usize = 1024;

/// The longest a heartbeat waits for the record's next write (the writer
/// groups heartbeats): a standby's verdict allows it on top of the
/// heartbeat period.
pub const HEARTBEAT_DELAY: std::time::Duration = std::time::Duration::from_secs(30);

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
    /// The write that named the database's last real change, when the
    /// newest (`seq`) was a heartbeat only; absent, `seq` was real.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<u64>,
    /// The newest heartbeat's instant: the primary held nothing newer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

impl Change {
    fn last_real(&self) -> u64 {
        self.changed.unwrap_or(self.seq)
    }
}

/// What a writer says of one database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Note {
    /// Something to apply landed (a segment with frames, a base); false
    /// for heartbeats only.
    pub changed: bool,
    /// The newest heartbeat's instant, if one landed.
    pub until: Option<DateTime<Utc>>,
}

impl Note {
    /// Both notes at once.
    pub fn merge(&mut self, other: Note) {
        self.changed |= other.changed;
        self.until = self.until.max(other.until);
    }
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

    /// One write naming the databases of `notes`.
    pub fn record(&mut self, notes: &BTreeMap<String, Note>) {
        self.seq += 1;
        let mut before: BTreeMap<String, Change> = BTreeMap::new();
        self.recent.retain(|c| {
            if notes.contains_key(&c.db) {
                before.insert(c.db.clone(), c.clone());
                false
            } else {
                true
            }
        });
        for (db, note) in notes {
            let prior = before.get(db);
            // A heartbeat keeps the last real change's number; a database
            // not in the record changed last at or before `floor`, which
            // every reader that may trust the record has read.
            let changed = (!note.changed).then(|| prior.map_or(self.floor, Change::last_real));
            let until = note.until.max(prior.and_then(|c| c.until));
            self.recent.push(Change {
                seq: self.seq,
                db: db.clone(),
                changed,
                until,
            });
        }
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
                        .filter(|c| c.last_real() > seq)
                        .map(|c| c.db.clone())
                        .collect(),
                )
            }
            _ => Since::Everything,
        }
    }

    /// The databases whose only news since write `seq` (of this epoch;
    /// see [`Activity::since`]) is a heartbeat, with its instant.
    pub fn heard(&self, seq: u64) -> Vec<(String, DateTime<Utc>)> {
        self.recent
            .iter()
            .filter(|c| c.seq > seq && c.last_real() <= seq)
            .filter_map(|c| c.until.map(|u| (c.db.clone(), u)))
            .collect()
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

    fn dbs(v: &[&str]) -> BTreeMap<String, Note> {
        v.iter()
            .map(|s| {
                (
                    s.to_string(),
                    Note {
                        changed: true,
                        until: None,
                    },
                )
            })
            .collect()
    }

    fn beats(v: &[&str], at: DateTime<Utc>) -> BTreeMap<String, Note> {
        v.iter()
            .map(|s| {
                (
                    s.to_string(),
                    Note {
                        changed: false,
                        until: Some(at),
                    },
                )
            })
            .collect()
    }

    /// A heartbeat tells a reader the primary lives without making it
    /// look; a real change before it is never hidden by it, whichever
    /// write the reader read last.
    #[test]
    fn a_heartbeat_is_heard_not_looked_at_and_never_hides_a_change() {
        let t = |s: i64| DateTime::<Utc>::from_timestamp(1_800_000_000 + s, 0).expect("t");
        let mut a = Activity::new("e".into());
        a.record(&dbs(&["alice", "bob"])); // 1
        a.record(&beats(&["alice"], t(300))); // 2
        // A reader of write 1 saw alice's change: only the heartbeat is news.
        assert_eq!(a.since(Some(("e", 1))), names(&[]));
        assert_eq!(a.heard(1), vec![("alice".to_string(), t(300))]);
        // A reader of write 0 has not seen alice's change yet.
        assert_eq!(a.since(Some(("e", 0))), names(&["alice", "bob"]));
        assert!(a.heard(0).is_empty());
        // A change and a heartbeat in one write: a change.
        let mut both = dbs(&["bob"]);
        if let Some(n) = both.get_mut("bob") {
            n.merge(Note {
                changed: false,
                until: Some(t(600)),
            });
        }
        a.record(&both); // 3
        assert_eq!(a.since(Some(("e", 2))), names(&["bob"]));
        // A heartbeat of a database the record no longer holds.
        a.record(&beats(&["carol"], t(900))); // 4
        assert_eq!(a.since(Some(("e", 3))), names(&[]));
        assert_eq!(a.heard(3), vec![("carol".to_string(), t(900))]);
        // The first version of the record (no `changed`): every entry real.
        let old: Activity = serde_json::from_str(
            r#"{"format":1,"epoch":"e","seq":2,"floor":0,"recent":[{"seq":2,"db":"x"}]}"#,
        )
        .expect("old record");
        assert_eq!(old.since(Some(("e", 1))), names(&["x"]));
        let back = Activity::parse(&a.to_json()).expect("parses");
        assert_eq!(back, a);
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
            a.record(&dbs(&[&format!("db{i}")]));
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
