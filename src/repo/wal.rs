//! WAL generations and segments in the repository, and the pure planning
//! behind point-in-time restore, `dr info` windows and WAL retention.
//!
//! A generation is one unbroken stream of a database's commits. Frames are
//! numbered by a sequence that only grows within a generation, so a gap
//! between two segments is visible in their names. Each segment's key also
//! carries the commit times it spans, so the covered window is known from a
//! listing alone, without keys to decrypt anything.

use chrono::{DateTime, NaiveDateTime, Utc};

use super::ObjectMeta;

/// Key prefix of a policy's WAL.
pub fn wal_prefix(policy: &str) -> String {
    format!("{policy}/wal/")
}

const TIME_FMT: &str = "%Y%m%dT%H%M%S%.3fZ";
const SUFFIX: &str = ".zst.age";

/// One stored segment, parsed from its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub generation: String,
    /// Sequence of its first and last frame in the generation.
    pub first: u64,
    pub last: u64,
    /// Commit time (as dr saw it) of its first transaction.
    pub first_commit: DateTime<Utc>,
    /// Until when the streamer had seen every commit when it sealed this
    /// segment: no commit it lacks happened before this instant. An empty
    /// segment (`last + 1 == first`) only carries this: a heartbeat.
    pub until: DateTime<Utc>,
    pub key: String,
    pub size: u64,
}

impl Segment {
    /// An empty segment whose times differ marks an interval the streamer
    /// did not watch (it was stopped, then continued the generation): the
    /// commits made meanwhile follow in the next segment, stamped with the
    /// instant they were read, `until`. No instant from `first_commit` up
    /// to `until` can be restored exactly; the instants on either side can.
    pub fn is_blind_mark(&self) -> bool {
        self.last + 1 == self.first && self.first_commit < self.until
    }
}

/// The object name of a segment inside its generation directory.
pub fn segment_name(first: u64, last: u64, t0: DateTime<Utc>, t1: DateTime<Utc>) -> String {
    format!(
        "{first:016}-{last:016}_{}_{}{SUFFIX}",
        t0.format(TIME_FMT),
        t1.format(TIME_FMT)
    )
}

/// Full key of a segment.
pub fn segment_key(policy: &str, generation: &str, name: &str) -> String {
    format!("{policy}/wal/{generation}/{name}")
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(s, TIME_FMT)
        .ok()
        .map(|n| n.and_utc())
}

/// Parses a segment name (no directory); `None` for anything else.
pub fn parse_name(name: &str) -> Option<(u64, u64, DateTime<Utc>, DateTime<Utc>)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let mut parts = stem.split('_');
    let range = parts.next()?;
    let t0 = parse_time(parts.next()?)?;
    let t1 = parse_time(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    let (a, b) = range.split_once('-')?;
    if a.len() != 16 || b.len() != 16 {
        return None;
    }
    let (first, last): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    (first <= last.saturating_add(1) && t0 <= t1).then_some((first, last, t0, t1))
}

/// Where the keys of a generation's segments are recorded: the age
/// header of a segment does not say which recipients it was encrypted
/// to, so each time the keys change the streamer writes this small
/// plaintext record, named after the first segment sealed with them.
/// It holds fingerprints only, like a manifest's `recipients`.
pub fn keys_record_key(policy: &str, generation: &str, segment_name: &str) -> String {
    let stem = segment_name.strip_suffix(SUFFIX).unwrap_or(segment_name);
    format!("{policy}/wal/{generation}/{KEYS_DIR}{stem}.json")
}

const KEYS_DIR: &str = "keys/";

/// The contents of a keys record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeysRecord {
    /// Fingerprints of the recipients (or the passphrase), sorted.
    pub recipients: Vec<String>,
}

/// A keys record in a listing, and the segments it covers: from the
/// segment it is named after up to the next record of its generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysRange {
    pub generation: String,
    pub key: String,
    /// The stem of the first segment sealed with these keys.
    pub from: String,
    /// Keys of the listed segments it covers.
    pub segments: Vec<String>,
    /// Whether a later record follows in its generation (the last one
    /// also covers the segments still to come).
    pub superseded: bool,
}

/// The keys records of a listing of [`wal_prefix`], each with the
/// segments it covers, by generation then position.
pub fn keys_ranges(prefix: &str, listing: &[ObjectMeta]) -> Vec<KeysRange> {
    let mut out: Vec<KeysRange> = listing
        .iter()
        .filter_map(|o| {
            let (generation, name) = in_generation(prefix, &o.key)?;
            let from = name.strip_prefix(KEYS_DIR)?.strip_suffix(".json")?;
            Some(KeysRange {
                generation: generation.to_string(),
                key: o.key.clone(),
                from: from.to_string(),
                segments: Vec::new(),
                superseded: false,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.generation, &a.from).cmp(&(&b.generation, &b.from)));
    for i in 1..out.len() {
        if out[i].generation == out[i - 1].generation {
            out[i - 1].superseded = true;
        }
    }
    for seg in segments(prefix, listing) {
        let stem = seg.key.rsplit('/').next().unwrap_or("");
        let stem = stem.strip_suffix(SUFFIX).unwrap_or(stem);
        if let Some(r) = out
            .iter_mut()
            .rev()
            .find(|r| r.generation == seg.generation && r.from.as_str() <= stem)
        {
            r.segments.push(seg.key.clone());
        }
    }
    out
}

/// A key under [`wal_prefix`] as (generation, the rest of its name).
fn in_generation<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
    key.strip_prefix(prefix)?.split_once('/')
}

/// Segments of a listing of [`wal_prefix`], by generation then sequence.
/// Keys that are not segments (temporaries of a cut-off upload) are skipped.
pub fn segments(prefix: &str, listing: &[ObjectMeta]) -> Vec<Segment> {
    let mut out: Vec<Segment> = listing
        .iter()
        .filter_map(|o| {
            let (generation, name) = in_generation(prefix, &o.key)?;
            let (first, last, first_commit, until) = parse_name(name)?;
            Some(Segment {
                generation: generation.to_string(),
                first,
                last,
                first_commit,
                until,
                key: o.key.clone(),
                size: o.size,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.generation, &a.key).cmp(&(&b.generation, &b.key)));
    out
}

/// Generation directories present in a listing (with or without segments).
pub fn generations(prefix: &str, listing: &[ObjectMeta]) -> Vec<String> {
    let mut g: Vec<String> = listing
        .iter()
        .filter_map(|o| in_generation(prefix, &o.key))
        .map(|(g, _)| g.to_string())
        .collect();
    g.sort();
    g.dedup();
    g
}

/// A new generation id: sortable by time, unique across hosts.
pub fn new_generation(now: DateTime<Utc>) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(u128::from(now.timestamp_subsec_nanos()));
    h.write_u32(std::process::id());
    format!("{}-{:08x}", now.format("%Y%m%d-%H%M%S"), h.finish() as u32)
}

/// The instant a generation began, from its id ([`new_generation`]).
pub fn generation_time(id: &str) -> Option<DateTime<Utc>> {
    let stamp = id.get(..15)?;
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%d-%H%M%S")
        .ok()
        .map(|n| n.and_utc())
}

/// A backup that can start a replay: it knows its place in a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub label: String,
    pub generation: String,
    /// Every frame up to this sequence is in the backup.
    pub seq: u64,
    /// When its snapshot was taken.
    pub taken: DateTime<Utc>,
}

/// An interval of instants a restore can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// What a point-in-time restore does: restore `base`, then replay
/// `segments` in order, skipping frames up to `base.seq`, stopping after the
/// last commit at or before `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub base: Base,
    /// What the chosen base reaches.
    pub window: Window,
    pub segments: Vec<Segment>,
    pub until: Option<DateTime<Utc>>,
}

/// How far the stream reaches from a base without a gap: the segments to
/// replay, and the windows of instants it restores exactly (split where the
/// streamer did not watch: [`Segment::is_blind_mark`]).
fn reach<'s>(base: &Base, segs: &'s [Segment]) -> (Vec<&'s Segment>, Vec<Window>) {
    let mut cur = base.seq;
    let mut start = base.taken;
    let mut end = base.taken;
    let mut used = Vec::new();
    let mut windows = Vec::new();
    // Right after a blind mark, before any commit: a second mark (the
    // streamer stopped again before sealing what it read) replaces it.
    let mut fresh = false;
    for s in segs.iter().filter(|s| s.generation == base.generation) {
        if s.first > cur + 1 {
            break; // a gap: nothing after it is reachable from this base
        }
        if s.first <= base.seq && base.seq < s.last {
            // The base was taken in the middle of this segment: its state
            // holds commits stamped up to this segment's end at the latest.
            start = start.max(s.until);
        }
        if s.is_blind_mark() && s.first > base.seq {
            if !fresh {
                windows.push(Window {
                    start,
                    end: end.max(start),
                });
            }
            fresh = true;
            start = s.until;
            end = s.until;
            continue;
        }
        if s.last > cur {
            cur = s.last;
            used.push(s);
            fresh = false;
        }
        end = end.max(s.until);
    }
    windows.push(Window {
        start,
        end: end.max(start),
    });
    (used, windows)
}

/// The restore windows of a target, merged, oldest first.
pub fn windows(bases: &[Base], segs: &[Segment]) -> Vec<Window> {
    let mut w: Vec<Window> = bases.iter().flat_map(|b| reach(b, segs).1).collect();
    w.sort_by_key(|w| w.start);
    let mut out: Vec<Window> = Vec::new();
    for x in w {
        match out.last_mut() {
            Some(l) if x.start <= l.end => l.end = l.end.max(x.end),
            _ => out.push(x),
        }
    }
    out
}

/// Plans a restore at `at` (or of the newest state), or says which windows
/// are covered.
pub fn plan(bases: &[Base], segs: &[Segment], at: Option<DateTime<Utc>>) -> Result<Replay, String> {
    let mut best: Option<(Window, &Base, Vec<&Segment>)> = None;
    for b in bases {
        let (used, ws) = reach(b, segs);
        let found = match at {
            Some(t) => ws.iter().find(|w| w.start <= t && t <= w.end).copied(),
            None => ws.last().copied(),
        };
        let Some(w) = found else { continue };
        // At an instant every fitting base gives the same state: take the
        // newest (least to replay). Without one, the furthest reach wins.
        let better = best.as_ref().is_none_or(|(bw, bb, _)| match at {
            Some(_) => b.taken > bb.taken,
            None => (w.end, b.taken) > (bw.end, bb.taken),
        });
        if better {
            best = Some((w, b, used));
        }
    }
    match best {
        Some((window, b, used)) => Ok(Replay {
            base: b.clone(),
            window,
            segments: used.into_iter().cloned().collect(),
            until: at,
        }),
        None => Err(describe(&windows(bases, segs))),
    }
}

/// Frames missing between two stored segments of one generation: nothing
/// after the gap can be replayed from a backup before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub generation: String,
    /// The first and last missing frame.
    pub first_missing: u64,
    pub last_missing: u64,
    /// The stream is complete up to this instant before the gap.
    pub reached: DateTime<Utc>,
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "generation {}: frames {}-{} are missing (the stream is complete up to {})",
            self.generation,
            self.first_missing,
            self.last_missing,
            self.reached.to_rfc3339()
        )
    }
}

/// Every gap between consecutive segments of each generation.
pub fn gaps(segs: &[Segment]) -> Vec<Gap> {
    let mut out = Vec::new();
    for pair in segs.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.generation == b.generation && b.first > a.last.saturating_add(1) {
            out.push(Gap {
                generation: a.generation.clone(),
                first_missing: a.last + 1,
                last_missing: b.first - 1,
                reached: a.until,
            });
        }
    }
    out
}

/// The first gap that stops a replay planned without an instant short of
/// newer commits in its own generation: restoring "the newest state" then
/// would silently return less than the repository holds.
pub fn gap_after(plan: &Replay, segs: &[Segment]) -> Option<Gap> {
    let reached = plan
        .segments
        .last()
        .map_or(plan.base.seq, |s| s.last.max(plan.base.seq));
    gaps(segs)
        .into_iter()
        .find(|g| g.generation == plan.base.generation && g.last_missing >= reached)
}

/// Names the covered windows for an error message.
pub fn describe(w: &[Window]) -> String {
    if w.is_empty() {
        return "no backup on this target has a WAL position, so no instant can be restored (run `dr replicate`)".into();
    }
    let list: Vec<String> = w
        .iter()
        .map(|w| format!("{} to {}", w.start.to_rfc3339(), w.end.to_rfc3339()))
        .collect();
    format!("the repository covers {}", list.join(", "))
}

/// WAL that retention removes from one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRemoval {
    pub generation: String,
    pub keys: Vec<String>,
    pub reason: String,
}

/// WAL retention: segments wholly inside the oldest kept backup of their
/// generation go; a generation with no kept backup goes whole, except the
/// newest (its first backup may still be on its way).
pub fn expire(prefix: &str, listing: &[ObjectMeta], kept: &[Base]) -> Vec<WalRemoval> {
    let segs = segments(prefix, listing);
    let ranges = keys_ranges(prefix, listing);
    let gens = generations(prefix, listing);
    let newest = gens.last().cloned();
    let mut out = Vec::new();
    for g in &gens {
        let oldest = kept
            .iter()
            .filter(|b| &b.generation == g)
            .min_by_key(|b| b.seq);
        match oldest {
            Some(b) => {
                // Inside the backup in frames *and* in time: a segment
                // sealed after the snapshot (or an empty mark, a heartbeat
                // after it) still says until when nothing more was
                // committed, which is the reach of that backup's window.
                let mut keys: Vec<String> = segs
                    .iter()
                    .filter(|s| &s.generation == g && s.last <= b.seq && s.until <= b.taken)
                    .map(|s| s.key.clone())
                    .collect();
                // A keys record goes once a later one exists and every
                // segment it covers goes.
                keys.extend(
                    ranges
                        .iter()
                        .filter(|r| {
                            &r.generation == g
                                && r.superseded
                                && r.segments.iter().all(|k| keys.contains(k))
                        })
                        .map(|r| r.key.clone())
                        .collect::<Vec<_>>(),
                );
                if !keys.is_empty() {
                    out.push(WalRemoval {
                        generation: g.clone(),
                        keys,
                        reason: format!(
                            "WAL older than backup {}, the oldest kept in its generation",
                            b.label
                        ),
                    });
                }
            }
            None if Some(g) != newest.as_ref() => {
                let dir = format!("{prefix}{g}/");
                out.push(WalRemoval {
                    generation: g.clone(),
                    keys: listing
                        .iter()
                        .filter(|o| o.key.starts_with(&dir))
                        .map(|o| o.key.clone())
                        .collect(),
                    reason: "generation with no kept backup to replay it onto".into(),
                });
            }
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0)
            .single()
            .expect("test")
    }

    fn seg(g: &str, first: u64, last: u64, t0: i64, t1: i64) -> Segment {
        let name = segment_name(first, last, t(t0), t(t1));
        Segment {
            generation: g.into(),
            first,
            last,
            first_commit: t(t0),
            until: t(t1),
            key: segment_key("p", g, &name),
            size: 1,
        }
    }

    fn listing_of(segs: &[Segment]) -> Vec<ObjectMeta> {
        segs.iter()
            .map(|s| ObjectMeta {
                key: s.key.clone(),
                size: 1,
                modified: t(0),
            })
            .collect()
    }

    fn base(label: &str, g: &str, seq: u64, taken: i64) -> Base {
        Base {
            label: label.into(),
            generation: g.into(),
            seq,
            taken: t(taken),
        }
    }

    #[test]
    fn keys_records_cover_their_segments_and_expire_with_them() {
        let a = seg("g1", 1, 10, 0, 1);
        let b = seg("g1", 11, 20, 1, 2);
        let c = seg("g1", 21, 30, 2, 3);
        let ka = keys_record_key("p", "g1", &segment_name(1, 10, t(0), t(1)));
        let kc = keys_record_key("p", "g1", &segment_name(21, 30, t(2), t(3)));
        assert!(
            ka.starts_with("p/wal/g1/keys/") && ka.ends_with(".json"),
            "{ka}"
        );
        let listing: Vec<ObjectMeta> = [&a.key, &b.key, &c.key, &ka, &kc]
            .iter()
            .map(|k| ObjectMeta {
                key: (*k).clone(),
                size: 1,
                modified: t(0),
            })
            .collect();
        // Records are not segments.
        assert_eq!(segments("p/wal/", &listing).len(), 3);
        let r = keys_ranges("p/wal/", &listing);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].segments, vec![a.key.clone(), b.key.clone()]);
        assert!(r[0].superseded && !r[1].superseded);
        assert_eq!(r[1].segments, vec![c.key.clone()]);
        // A backup at 20 keeps c: a and b go, and the record that covers
        // only them; the newest record stays.
        let removed = expire("p/wal/", &listing, &[base("L", "g1", 20, 2)]);
        assert_eq!(removed.len(), 1);
        assert!(removed[0].keys.contains(&ka), "{removed:?}");
        assert!(!removed[0].keys.contains(&kc), "{removed:?}");
        // A backup at 10 keeps b, which the first record covers.
        let removed = expire("p/wal/", &listing, &[base("L", "g1", 10, 1)]);
        assert!(!removed[0].keys.contains(&ka), "{removed:?}");
    }

    #[test]
    fn names_round_trip_and_sort() {
        let name = segment_name(1, 453, t(0), t(1));
        assert_eq!(parse_name(&name), Some((1, 453, t(0), t(1))));
        assert!(segment_name(9, 9, t(0), t(0)) < segment_name(10, 10, t(0), t(0)));
        assert_eq!(
            parse_name("0000000000000001-0000000000000002.zst.age"),
            None
        );
        let listing: Vec<ObjectMeta> = ["p/wal/g1/x.tmp", &seg("g1", 1, 2, 0, 0).key]
            .iter()
            .map(|k| ObjectMeta {
                key: k.to_string(),
                size: 1,
                modified: t(0),
            })
            .collect();
        assert_eq!(segments("p/wal/", &listing).len(), 1);
        assert_eq!(generations("p/wal/", &listing), vec!["g1".to_string()]);
    }

    #[test]
    fn plans_the_newest_base_before_the_instant() {
        let segs = vec![
            seg("g1", 11, 20, 10, 20),
            seg("g1", 21, 30, 25, 30),
            seg("g1", 31, 40, 35, 40),
        ];
        let bases = vec![base("F", "g1", 10, 5), base("D", "g1", 30, 32)];
        let p = plan(&bases, &segs, Some(t(22))).expect("test");
        assert_eq!(p.base.label, "F");
        let p = plan(&bases, &segs, Some(t(36))).expect("test");
        assert_eq!(p.base.label, "D");
        assert_eq!(p.segments.len(), 1);
        let p = plan(&bases, &segs, None).expect("test");
        assert_eq!(p.base.label, "D");
        let e = plan(&bases, &segs, Some(t(41))).expect_err("must fail");
        assert!(e.contains("covers"), "{e}");
        assert_eq!(
            windows(&bases, &segs),
            vec![Window {
                start: t(5),
                end: t(40)
            }]
        );
    }

    #[test]
    fn expire_keeps_what_a_kept_backup_needs() {
        let segs = [
            seg("g1", 1, 10, 1, 10),
            seg("g1", 11, 20, 11, 20),
            seg("g2", 1, 5, 30, 31),
            seg("g3", 1, 5, 40, 41),
        ];
        let listing = listing_of(&segs);
        let kept = [base("F", "g1", 10, 10)];
        let r = expire("p/wal/", &listing, &kept);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].keys, vec![segs[0].key.clone()]);
        assert_eq!(r[1].generation, "g2");
        // g3 is the newest: its first backup may still be running.
    }

    #[test]
    fn expire_keeps_the_marks_and_late_seals_that_reach_past_the_oldest_base() {
        // The base's snapshot (t=8) holds frames 1-10; the segment of those
        // frames was sealed at 12, and the stream then went idle: a
        // heartbeat at 20 and a final mark at 25, both without frames.
        let segs = vec![
            seg("g1", 1, 10, 1, 12),
            seg("g1", 11, 10, 20, 20),
            seg("g1", 11, 10, 25, 25),
        ];
        let listing = listing_of(&segs);
        let kept = [base("F", "g1", 10, 8)];
        let before = windows(&kept, &segs);
        assert!(expire("p/wal/", &listing, &kept).is_empty());
        assert_eq!(
            before,
            vec![Window {
                start: t(8),
                end: t(25)
            }]
        );
    }

    #[test]
    fn an_empty_heartbeat_segment_extends_the_window_without_frames() {
        let segs = vec![seg("g1", 1, 10, 1, 10), seg("g1", 11, 10, 15, 15)];
        let bases = vec![base("F", "g1", 0, 0)];
        assert_eq!(
            windows(&bases, &segs),
            vec![Window {
                start: t(0),
                end: t(15)
            }]
        );
        let p = plan(&bases, &segs, Some(t(14))).expect("test");
        assert_eq!(p.segments.len(), 1);
        assert_eq!(
            parse_name(&segs[1].key[segs[1].key.rfind('/').expect("test") + 1..]).map(|x| x.1),
            Some(10)
        );
    }

    #[test]
    fn a_gap_ends_the_window() {
        let segs = vec![seg("g1", 1, 10, 1, 10), seg("g1", 12, 20, 12, 20)];
        let bases = vec![base("F", "g1", 0, 0)];
        assert_eq!(
            windows(&bases, &segs),
            vec![Window {
                start: t(0),
                end: t(10)
            }]
        );
        assert!(plan(&bases, &segs, Some(t(15))).is_err());
    }

    #[test]
    fn a_gap_is_named_and_stops_a_newest_state_restore() {
        let segs = vec![
            seg("g1", 1, 10, 1, 10),
            seg("g1", 12, 20, 12, 20),
            seg("g2", 1, 5, 30, 31),
        ];
        let g = gaps(&segs);
        assert_eq!(g.len(), 1);
        assert_eq!((g[0].first_missing, g[0].last_missing), (11, 11));
        assert_eq!(g[0].reached, t(10));
        let bases = vec![base("F", "g1", 0, 0)];
        let p = plan(&bases, &segs, None).expect("plan");
        assert_eq!(gap_after(&p, &segs), Some(g[0].clone()));
        // A base after the gap replays the rest with nothing missing.
        let bases = vec![base("F", "g1", 0, 0), base("D", "g1", 15, 16)];
        let p = plan(&bases, &segs, None).expect("plan");
        assert_eq!(p.base.label, "D");
        assert_eq!(gap_after(&p, &segs), None);
    }

    #[test]
    fn a_base_inside_a_segment_starts_after_its_commits() {
        let segs = vec![seg("g1", 1, 10, 1, 10)];
        let bases = vec![base("D", "g1", 5, 4)];
        assert_eq!(windows(&bases, &segs)[0].start, t(10));
    }

    #[test]
    fn a_blind_mark_splits_the_window_and_instants_inside_it_are_refused() {
        let t = |s: i64| DateTime::from_timestamp(1_795_000_000 + s, 0).expect("t");
        let seg = |first: u64, last: u64, t0: i64, t1: i64| Segment {
            generation: "g".into(),
            first,
            last,
            first_commit: t(t0),
            until: t(t1),
            key: format!("p/wal/g/{}", segment_name(first, last, t(t0), t(t1))),
            size: 1,
        };
        let segs = vec![
            seg(1, 10, 1, 10),
            seg(11, 10, 10, 10), // the stop mark: watched until 10
            seg(11, 10, 10, 50), // not watched from 10 to 50
            seg(11, 20, 50, 60), // the commits made meanwhile, read at 50
        ];
        assert!(segs[2].is_blind_mark() && !segs[1].is_blind_mark());
        let base = Base {
            label: "b".into(),
            generation: "g".into(),
            seq: 0,
            taken: t(0),
        };
        let win = |a: i64, b: i64| Window {
            start: t(a),
            end: t(b),
        };
        let w = windows(std::slice::from_ref(&base), &segs);
        assert_eq!(w, vec![win(0, 10), win(50, 60)]);
        assert!(plan(std::slice::from_ref(&base), &segs, Some(t(30))).is_err());
        let p = plan(std::slice::from_ref(&base), &segs, Some(t(55))).expect("after");
        assert_eq!(p.segments.len(), 2, "replays across the mark");
        assert!(plan(std::slice::from_ref(&base), &segs, Some(t(5))).is_ok());
        assert!(gaps(&segs).is_empty(), "a blind mark is no gap");
        // Stopped again before sealing what it read: the second mark
        // replaces the first, and no instant between them is claimed.
        let twice = vec![
            seg(1, 10, 1, 10),
            seg(11, 10, 10, 50),
            seg(11, 10, 10, 70),
            seg(11, 20, 70, 80),
        ];
        let w = windows(std::slice::from_ref(&base), &twice);
        assert_eq!(w, vec![win(0, 10), win(70, 80)]);
    }
}
