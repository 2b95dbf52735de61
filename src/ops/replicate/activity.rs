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

use super::*;
use crate::repo::activity::{self, Activity, Note};

/// One fleet's record on one target.
#[derive(Default)]
struct Slot {
    /// Databases noted and not written yet.
    pending: BTreeMap<String, Note>,
    /// A thread is writing (it writes what is pending before it leaves).
    writing: bool,
    /// The record as last written (`None`: not read from the target yet).
    written: Option<Activity>,
}

/// Every fleet's record, by (fleet, target).
#[derive(Default)]
pub(super) struct Activities {
    slots: Mutex<BTreeMap<(String, String), Slot>>,
}

impl Activities {
    /// Database `db` of fleet `fleet` changed on `store` (or only sent a
    /// heartbeat: `note`): the record says so before this returns, unless
    /// another thread is writing it (which then writes this too).
    pub(super) fn note(&self, store: &dyn Storage, fleet: &str, db: &str, note: Note) {
        let id = (fleet.to_string(), store.target().to_string());
        {
            let mut slots = lock(&self.slots);
            let slot = slots.entry(id.clone()).or_default();
            slot.pending.entry(db.to_string()).or_default().merge(note);
            if slot.writing {
                return;
            }
            slot.writing = true;
        }
        let key = activity::key(fleet);
        loop {
            let (batch, written) = {
                let mut slots = lock(&self.slots);
                let slot = slots.entry(id.clone()).or_default();
                if slot.pending.is_empty() {
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
