//! Writing each fleet's activity record (`repo::activity`) on each target,
//! after a segment or a base of one of its databases landed there.
//!
//! Writes are grouped: a note made while the record is being written is
//! carried by the next write of the same thread, so a busy fleet's I/O
//! workers add about one small PUT per PUT in flight, not one per segment.
//! The writer that finds the record of an earlier run continues its epoch
//! and numbering, so a primary's restart does not make every standby look
//! at every database. A failed write keeps its names for the next one
//! (and a standby looks at each database at least every
//! `follow::GOVERNED_LOOK` regardless).
//!
//! Changes wait a little: a write follows the record's last one by at
//! least [`CHANGES`], so a busy fleet (a hundred databases each sealing a
//! segment a second) writes its record a few times a second, not once per
//! segment: each write serializes every database's entry, and at 1,000
//! databases those writes were a fifth of the busy fleet's CPU. A standby
//! hears a change at most that much later.
//!
//! Heartbeats wait: a note that only says a database sent its heartbeat
//! is written at most [`HEARTBEATS`] after the record's last write, with
//! whatever else came meanwhile. An idle fleet of 1,000 sends a heartbeat
//! every 0.3 s, which written one by one doubled the primary's idle PUTs
//! (one record a heartbeat, seen in the fleet bench); grouped, the record
//! costs two PUTs a minute, and a standby hears each heartbeat at most
//! that late (its verdict allows a heartbeat period plus `max_lag`).

use super::*;
use crate::repo::activity::{self, Activity, Note};

/// The longest a heartbeat-only note waits for the record's next write.
const HEARTBEATS: Duration = activity::HEARTBEAT_DELAY;
/// The least time between two writes of a record when a change waits.
const CHANGES: Duration = Duration::from_millis(200);

/// One fleet's record on one target.
#[derive(Default)]
struct Slot {
    /// Databases noted and not written yet.
    pending: BTreeMap<String, Note>,
    /// A thread is writing (it writes what is pending before it leaves).
    writing: bool,
    /// The record as last written (`None`: not read from the target yet).
    written: Option<Activity>,
    /// When it was last written.
    last_write: Option<Instant>,
    /// A deferred write is scheduled for then.
    due: Option<Instant>,
}

/// Every fleet's record, by (fleet, target).
#[derive(Default)]
pub(super) struct Activities {
    slots: Mutex<BTreeMap<(String, String), Slot>>,
}

impl Activities {
    /// Database `db` of fleet `fleet` changed on `store` (or only sent a
    /// heartbeat: `note`): the record says so before this returns, unless
    /// another thread is writing it (which then writes this too), or
    /// unless the record was written too recently ([`CHANGES`] for a
    /// change, [`HEARTBEATS`] when only heartbeats wait: a thread then
    /// writes what waits when that is out).
    pub(super) fn note(
        self: &Arc<Self>,
        store: &Arc<dyn Storage>,
        fleet: &str,
        db: &str,
        note: Note,
    ) {
        let id = (fleet.to_string(), store.target().to_string());
        {
            let mut slots = lock(&self.slots);
            let slot = slots.entry(id.clone()).or_default();
            slot.pending.entry(db.to_string()).or_default().merge(note);
            if slot.writing || self.deferred(slot, store, fleet) {
                return;
            }
            slot.writing = true;
        }
        self.write_pending(store, fleet, id);
    }

    /// Whether what waits in `slot` must wait: the record was written less
    /// than [`CHANGES`] ago (a change waits) or [`HEARTBEATS`] ago (only
    /// heartbeats wait). A thread then writes it when that is out; one is
    /// started unless one is due by then already.
    fn deferred(self: &Arc<Self>, slot: &mut Slot, store: &Arc<dyn Storage>, fleet: &str) -> bool {
        let Some(last) = slot.last_write else {
            return false;
        };
        let gap = if slot.pending.values().any(|n| n.changed) {
            CHANGES
        } else {
            HEARTBEATS
        };
        if last.elapsed() >= gap {
            return false;
        }
        let at = last + gap;
        if slot.due.is_some_and(|due| due <= at) {
            return true;
        }
        let wait = at.saturating_duration_since(Instant::now());
        let (me, store, fleet) = (self.clone(), store.clone(), fleet.to_string());
        let spawned = std::thread::Builder::new()
            .name("activity-write".into())
            .spawn(move || {
                std::thread::sleep(wait);
                me.write_due(&store, &fleet);
            });
        // Without a thread, write now rather than never.
        if spawned.is_err() {
            return false;
        }
        slot.due = Some(at);
        true
    }

    /// A deferred write of what waits, unless a thread is writing.
    fn write_due(self: &Arc<Self>, store: &Arc<dyn Storage>, fleet: &str) {
        let id = (fleet.to_string(), store.target().to_string());
        {
            let mut slots = lock(&self.slots);
            let slot = slots.entry(id.clone()).or_default();
            if slot.due.is_some_and(|due| due <= Instant::now()) {
                slot.due = None;
            }
            if slot.writing || slot.pending.is_empty() {
                return;
            }
            slot.writing = true;
        }
        self.write_pending(store, fleet, id);
    }

    /// The writing thread's loop: writes until nothing waits, or until
    /// only heartbeats wait (deferred).
    fn write_pending(
        self: &Arc<Self>,
        store: &Arc<dyn Storage>,
        fleet: &str,
        id: (String, String),
    ) {
        let key = activity::key(fleet);
        loop {
            let (batch, written) = {
                let mut slots = lock(&self.slots);
                let slot = slots.entry(id.clone()).or_default();
                if slot.pending.is_empty() || self.deferred(slot, store, fleet) {
                    slot.writing = false;
                    return;
                }
                (std::mem::take(&mut slot.pending), slot.written.clone())
            };
            let mut record = written.unwrap_or_else(|| {
                store
                    .get_with_etag(&key)
                    .ok()
                    .flatten()
                    .and_then(|(bytes, _)| Activity::parse(&bytes))
                    .unwrap_or_else(|| Activity::new(format!("{:016x}", fastrand::u64(..))))
            });
            record.record(&batch);
            let result = store.put_bytes(&key, &record.to_json());
            let mut slots = lock(&self.slots);
            let slot = slots.entry(id.clone()).or_default();
            slot.last_write = Some(Instant::now());
            match result {
                Ok(()) => slot.written = Some(record),
                Err(e) => {
                    tracing::warn!(policy = %fleet, target = %id.1, "cannot write the fleet's activity record (its standbys see these changes within {} min): {e}", crate::ops::follow::GOVERNED_LOOK.as_secs() / 60);
                    for (db, n) in batch {
                        slot.pending.entry(db).or_default().merge(n);
                    }
                    // Read again before the next write: the failed one may
                    // have landed.
                    slot.written = None;
                    slot.writing = false;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStorage;

    fn read(store: &dyn Storage) -> Activity {
        let bytes = store.get_bytes(&activity::key("f")).expect("record");
        Activity::parse(&bytes).expect("parses")
    }

    /// A heartbeat right after a write waits (for the next write, or
    /// HEARTBEATS); a real change is written within CHANGES, with it.
    #[test]
    fn heartbeats_wait_for_the_next_write_and_changes_a_moment() {
        let dir = tempfile::tempdir().expect("tmp");
        let store: Arc<dyn Storage> = Arc::new(LocalStorage::new("t", dir.path()));
        let a = Arc::new(Activities::default());
        let beat = Note {
            changed: false,
            until: Some(Utc::now()),
        };
        // The first write of the record is at once, heartbeat or not.
        a.note(&store, "f", "alice", beat);
        assert_eq!(read(store.as_ref()).seq, 1);
        // A heartbeat 0 s after it waits.
        a.note(&store, "f", "bob", beat);
        let r = read(store.as_ref());
        assert_eq!(r.seq, 1, "written at once: {r:?}");
        // A change does not, and carries the waiting heartbeat.
        let change = Note {
            changed: true,
            until: None,
        };
        a.note(&store, "f", "carol", change);
        let noted = Instant::now();
        // and a second change meanwhile goes with it: one write.
        a.note(&store, "f", "dave", change);
        let r = loop {
            let r = read(store.as_ref());
            if r.seq >= 2 || noted.elapsed() > CHANGES * 50 {
                break r;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(r.seq, 2, "a change is written within {CHANGES:?}: {r:?}");
        assert_eq!(
            r.since(Some((&r.epoch, 1))),
            activity::Since::Changed(["carol".to_string(), "dave".to_string()].into())
        );
        assert_eq!(
            r.heard(1)
                .iter()
                .map(|(d, _)| d.as_str())
                .collect::<Vec<_>>(),
            ["bob"]
        );
    }
}
