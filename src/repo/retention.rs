//! pgBackRest-style retention, as a pure plan.
//!
//! `full = N` keeps the N newest fulls and everything that depends on them;
//! `diff = M` keeps the M newest diffs. Only *restorable* backups count: an
//! intact full, or an intact diff of an intact full. A damaged backup is
//! never counted (so it can never push a good one out) and never removed
//! here (it stays for the user to inspect and remove on purpose). The
//! newest restorable chain is never removed, whatever the counts say.
//!
//! Calendar rules (`keep_daily` …, `repo::calendar`) switch to keeping:
//! see [`plan_calendar`].
//!
//! `window` (pgBackRest's time-based retention, Litestream's retention) keeps
//! whatever a restore to any instant inside it needs, whatever the counts
//! say: every restorable backup taken inside it, and the newest one taken
//! before it (the base its first instants are restored from).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::label::{BackupType, Label};

/// A committed backup (it has a manifest) as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub label: Label,
    /// Manifest valid and every object present at its recorded size.
    pub intact: bool,
    /// Counted against `retention.full`: false for a full dr took only as
    /// the base of a new WAL generation. Such a full is kept while it is
    /// newer than the oldest full retention keeps, removed after.
    pub counted: bool,
}

/// What expire removes, and why, for `--dry-run` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub label: Label,
    pub reason: String,
}

/// Labels of the intact backups among `committed`.
fn intact_labels(committed: &[Candidate]) -> BTreeSet<&Label> {
    committed
        .iter()
        .filter(|c| c.intact)
        .map(|c| &c.label)
        .collect()
}

/// Whether `l` restores: it is intact and so is the full it needs.
fn restorable(intact: &BTreeSet<&Label>, l: &Label) -> bool {
    intact.contains(l) && intact.contains(&l.full_label())
}

/// The newest backup a restore can use, if any.
pub fn newest_restorable(committed: &[Candidate]) -> Option<&Label> {
    let intact = intact_labels(committed);
    intact
        .iter()
        .copied()
        .filter(|l| restorable(&intact, l))
        .max()
}

/// What a restore to any instant at or after `start` needs: every
/// restorable backup from `start` on and the newest one before it, each
/// with its full.
fn window_needs(intact: &BTreeSet<&Label>, start: Option<DateTime<Utc>>) -> BTreeSet<Label> {
    let Some(start) = start else {
        return BTreeSet::new();
    };
    let usable: Vec<&Label> = intact
        .iter()
        .copied()
        .filter(|l| restorable(intact, l))
        .collect();
    let base = usable.iter().copied().filter(|l| l.time() <= start).max();
    usable
        .into_iter()
        .filter(|l| l.time() >= start)
        .chain(base)
        .flat_map(|l| [l.clone(), l.full_label()])
        .collect()
}

/// Plans which committed backups to remove, newest first (so a diff always
/// goes before the full it needs). `committed` may be in any order.
pub fn plan(
    committed: &[Candidate],
    full: Option<u32>,
    diff: Option<u32>,
    window_start: Option<DateTime<Utc>>,
) -> Vec<Removal> {
    let labels: BTreeSet<&Label> = committed.iter().map(|c| &c.label).collect();
    let intact = intact_labels(committed);
    // The newest state a restore can reach: never removed, nor its full.
    let newest = newest_restorable(committed);
    let needed = window_needs(&intact, window_start);
    let protected =
        |l: &Label| newest.is_some_and(|n| n == l || n.full_label() == *l) || needed.contains(l);

    let uncounted: BTreeSet<&Label> = committed
        .iter()
        .filter(|c| !c.counted)
        .map(|c| &c.label)
        .collect();
    let mut fulls: Vec<&Label> = intact
        .iter()
        .copied()
        .filter(|l| l.kind() == BackupType::Full && !uncounted.contains(l))
        .collect();
    fulls.sort();
    let mut removed: BTreeSet<Label> = BTreeSet::new();
    let mut out = Vec::new();
    if let Some(keep) = full {
        let keep = keep.max(1) as usize;
        if fulls.len() > keep {
            for old in fulls[..fulls.len() - keep].iter().filter(|l| !protected(l)) {
                removed.insert((*old).clone());
                out.push(Removal {
                    label: (*old).clone(),
                    reason: format!(
                        "retention.full = {keep}: {keep} newer intact full backups exist"
                    ),
                });
            }
        }
        // Bases of WAL generations do not count, so they never push a
        // scheduled full out; they go once older than the history kept.
        if let Some(oldest_kept) = fulls.get(fulls.len().saturating_sub(keep)) {
            for base in intact
                .iter()
                .copied()
                .filter(|l| uncounted.contains(l) && l < oldest_kept && !protected(l))
            {
                removed.insert(base.clone());
                out.push(Removal {
                    label: base.clone(),
                    reason: format!(
                        "base of a WAL generation older than {oldest_kept}, the oldest full retention.full = {keep} keeps"
                    ),
                });
            }
        }
    }
    let mut counted = Vec::new();
    for d in labels.iter().filter(|l| l.kind() == BackupType::Diff) {
        let parent = d.full_label();
        if !labels.contains(&parent) {
            out.push(Removal {
                label: (*d).clone(),
                reason: format!(
                    "its full {parent} no longer exists (an interrupted expire left it): it cannot be restored"
                ),
            });
        } else if removed.contains(&parent) {
            out.push(Removal {
                label: (*d).clone(),
                reason: format!("its full {parent} expires"),
            });
        } else if restorable(&intact, d) {
            counted.push(*d);
        }
    }
    if let Some(keep) = diff {
        let keep = keep.max(1) as usize;
        if counted.len() > keep {
            for old in counted[..counted.len() - keep]
                .iter()
                .filter(|l| !protected(l))
            {
                out.push(Removal {
                    label: (*old).clone(),
                    reason: format!(
                        "retention.diff = {keep}: {keep} newer restorable diff backups exist"
                    ),
                });
            }
        }
    }
    out.sort_by(|a, b| b.label.cmp(&a.label));
    out
}

/// With calendar rules (`repo::calendar`), retention keeps rather than
/// counts down, as restic's `forget` does: a backup stays when any rule
/// keeps it (the newest restorable chain, `window`, the `full` newest
/// fulls, the `diff` newest diffs, a calendar period's newest), a kept
/// diff keeps its full, and a base of a WAL generation newer than the
/// oldest full kept stays; every other restorable backup goes. Damaged
/// backups are never removed here. Returns the removals, newest first, and
/// why each kept backup stays (for `expire --dry-run`).
pub fn plan_calendar(
    committed: &[Candidate],
    full: Option<u32>,
    diff: Option<u32>,
    window_start: Option<DateTime<Utc>>,
    calendar: &super::calendar::Calendar,
) -> (Vec<Removal>, std::collections::BTreeMap<Label, Vec<String>>) {
    let labels: BTreeSet<&Label> = committed.iter().map(|c| &c.label).collect();
    let intact = intact_labels(committed);
    let usable: Vec<&Label> = intact
        .iter()
        .copied()
        .filter(|l| restorable(&intact, l))
        .collect();
    let mut kept: std::collections::BTreeMap<Label, Vec<String>> = Default::default();
    fn keep_in(kept: &mut std::collections::BTreeMap<Label, Vec<String>>, l: &Label, why: String) {
        if l.kind() == BackupType::Diff {
            kept.entry(l.full_label())
                .or_default()
                .push(format!("the full of {l}, which is kept"));
        }
        kept.entry(l.clone()).or_default().push(why);
    }
    let mut keep = |l: &Label, why: String| keep_in(&mut kept, l, why);
    if let Some(n) = newest_restorable(committed) {
        keep(n, "the newest restorable backup".into());
    }
    for l in window_needs(&intact, window_start) {
        keep(
            &l,
            "retention.window: a restore inside the window needs it".into(),
        );
    }
    let uncounted: BTreeSet<&Label> = committed
        .iter()
        .filter(|c| !c.counted)
        .map(|c| &c.label)
        .collect();
    let fulls: Vec<&Label> = usable
        .iter()
        .copied()
        .filter(|l| l.kind() == BackupType::Full && !uncounted.contains(l))
        .collect();
    if let Some(n) = full {
        for l in fulls.iter().rev().take(n.max(1) as usize) {
            keep(l, format!("retention.full = {n}"));
        }
    }
    if let Some(n) = diff {
        for l in usable
            .iter()
            .filter(|l| l.kind() == BackupType::Diff)
            .rev()
            .take(n.max(1) as usize)
        {
            keep(l, format!("retention.diff = {n}"));
        }
    }
    for (l, whys) in calendar.keeps(&usable) {
        for why in whys {
            keep(&l, why);
        }
    }
    let oldest_full = kept
        .keys()
        .filter(|l| l.kind() == BackupType::Full)
        .min()
        .cloned();
    for base in usable.iter().filter(|l| uncounted.contains(*l)) {
        if oldest_full.as_ref().is_some_and(|o| *base > o) {
            keep_in(
                &mut kept,
                base,
                "base of a WAL generation newer than the oldest full kept".into(),
            );
        }
    }
    let mut out = Vec::new();
    let mut removed: BTreeSet<&Label> = BTreeSet::new();
    for l in usable.iter().filter(|l| l.kind() == BackupType::Full) {
        if !kept.contains_key(*l) {
            removed.insert(l);
            out.push(Removal {
                label: (*l).clone(),
                reason: "no retention rule keeps it".into(),
            });
        }
    }
    for d in labels.iter().filter(|l| l.kind() == BackupType::Diff) {
        let parent = d.full_label();
        if kept.contains_key(*d) {
            continue;
        }
        let reason = if !labels.contains(&parent) {
            format!(
                "its full {parent} no longer exists (an interrupted expire left it): it cannot be restored"
            )
        } else if removed.contains(&parent) {
            format!("its full {parent} expires")
        } else if restorable(&intact, d) {
            "no retention rule keeps it".into()
        } else {
            continue;
        };
        out.push(Removal {
            label: (*d).clone(),
            reason,
        });
    }
    out.sort_by(|a, b| b.label.cmp(&a.label));
    (out, kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    #[test]
    fn calendar_rules_keep_the_newest_of_each_period_with_what_it_needs() {
        use crate::repo::calendar::Calendar;
        let day = |d: u32, h: u32| {
            Utc.with_ymd_and_hms(2026, 11, d, h, 0, 0)
                .single()
                .expect("t")
        };
        // A full each day at 01:00, a diff at 13:00, for five days.
        let mut ls = Vec::new();
        for d in 1..=5 {
            let f = Label::full(day(d, 1));
            ls.push(Label::diff_of(&f, day(d, 13)));
            ls.push(f);
        }
        let refs: Vec<&Label> = ls.iter().collect();
        let all = intact(&refs);
        let cal = Calendar {
            daily: Some(2),
            ..Calendar::default()
        };
        let (removed, kept) = plan_calendar(&all, None, None, None, &cal);
        // The 5th's diff (the newest: also kept as such) and the 4th's
        // diff, each with its full; the rest goes, diffs before fulls.
        let f5 = Label::full(day(5, 1));
        let d5 = Label::diff_of(&f5, day(5, 13));
        let f4 = Label::full(day(4, 1));
        let d4 = Label::diff_of(&f4, day(4, 13));
        assert_eq!(
            kept.keys().cloned().collect::<Vec<_>>(),
            vec![f4.clone(), d4.clone(), f5.clone(), d5.clone()]
        );
        assert!(
            kept[&d4]
                .iter()
                .any(|w| w == "keep_daily = 2: the newest of 2026-11-04")
        );
        assert!(kept[&f4].iter().any(|w| w.starts_with("the full of")));
        assert_eq!(removed.len(), 6);
        assert!(removed.iter().all(|r| r.label.time() < day(4, 0)));
        // A rule keeps what any rule keeps: full = 3 adds the 3rd's full,
        // whose diff goes.
        let (removed, kept) = plan_calendar(&all, Some(3), None, None, &cal);
        let f3 = Label::full(day(3, 1));
        assert!(kept[&f3].iter().any(|w| w == "retention.full = 3"));
        assert!(
            removed
                .iter()
                .any(|r| r.label == Label::diff_of(&f3, day(3, 13)))
        );
        assert!(!removed.iter().any(|r| r.label == f3));
        // A damaged backup is never removed, and a diff of a damaged full
        // neither.
        let mut damaged = all.clone();
        for c in damaged
            .iter_mut()
            .filter(|c| c.label == Label::full(day(1, 1)))
        {
            c.intact = false;
        }
        let (removed, _) = plan_calendar(&damaged, None, None, None, &cal);
        assert!(!removed.iter().any(|r| r.label.time() < day(2, 0)));
    }

    fn at(h: u32) -> chrono::DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 1, h, 0, 0)
            .single()
            .expect("t")
    }

    #[test]
    fn keeps_newest_fulls_with_their_diffs() {
        let f1 = Label::full(at(0));
        let d1 = Label::diff_of(&f1, at(1));
        let f2 = Label::full(at(2));
        let d2 = Label::diff_of(&f2, at(3));
        let d3 = Label::diff_of(&f2, at(4));
        let f3 = Label::full(at(5));
        let all = intact(&[&f1, &d1, &f2, &d2, &d3, &f3]);
        assert_eq!(
            labels(plan(&all, Some(2), None, None)),
            vec![d1.clone(), f1.clone()]
        );
        assert_eq!(
            labels(plan(&all, Some(2), Some(1), None)),
            vec![d2.clone(), d1.clone(), f1.clone()]
        );
        assert!(plan(&all, None, None, None).is_empty());
        // One full is never removed, whatever retention says.
        assert!(plan(&intact(&[&f1]), Some(1), Some(0), None).is_empty());
    }

    #[test]
    fn a_window_keeps_what_its_instants_need_whatever_the_counts_say() {
        let f1 = Label::full(at(0));
        let d1 = Label::diff_of(&f1, at(1));
        let f2 = Label::full(at(2));
        let d2 = Label::diff_of(&f2, at(3));
        let f3 = Label::full(at(5));
        let all = intact(&[&f1, &d1, &f2, &d2, &f3]);
        // full = 1 alone keeps f3; a window from 01:30 needs d1 (the base
        // of its first instants) with its full f1, and everything after.
        assert_eq!(
            labels(plan(&all, Some(1), Some(1), None)),
            vec![d2.clone(), f2.clone(), d1.clone(), f1.clone()]
        );
        assert!(
            plan(
                &all,
                Some(1),
                Some(1),
                Some(at(1) + chrono::Duration::minutes(30))
            )
            .is_empty()
        );
        // A window from 04:00: d2 is the base of its start; f1 and d1 go.
        assert_eq!(
            labels(plan(&all, Some(1), Some(1), Some(at(4)))),
            vec![d1, f1]
        );
    }

    #[test]
    fn generation_bases_never_push_a_scheduled_full_out() {
        let f1 = Label::full(at(0));
        let g1 = Label::full(at(1));
        let f2 = Label::full(at(2));
        let g2 = Label::full(at(3));
        let mut all = intact(&[&f1, &g1, &f2, &g2]);
        for c in all.iter_mut().filter(|c| c.label == g1 || c.label == g2) {
            c.counted = false;
        }
        // full = 2: f1 and f2 are the history asked for; the bases add to it.
        assert!(plan(&all, Some(2), None, None).is_empty());
        // full = 1: f2 is kept; f1 goes, and g1 with it (older than f2).
        assert_eq!(labels(plan(&all, Some(1), None, None)), vec![g1, f1]);
    }

    fn intact(ls: &[&Label]) -> Vec<Candidate> {
        ls.iter()
            .map(|l| Candidate {
                label: (*l).clone(),
                intact: true,
                counted: true,
            })
            .collect()
    }

    fn labels(r: Vec<Removal>) -> Vec<Label> {
        r.into_iter().map(|r| r.label).collect()
    }

    #[test]
    fn a_damaged_newer_full_neither_counts_nor_goes() {
        let f1 = Label::full(at(0));
        let d1 = Label::diff_of(&f1, at(1));
        let f2 = Label::full(at(2));
        let d2 = Label::diff_of(&f1, at(3));
        let mut all = intact(&[&f1, &d1, &f2, &d2]);
        all[2].intact = false;
        // f2 is damaged: f1 stays the one full kept, with its newest diff.
        assert_eq!(labels(plan(&all, Some(1), Some(1), None)), vec![d1.clone()]);
        // A damaged diff is not counted: the intact one before it stays.
        all[3].intact = false;
        assert!(plan(&all, Some(1), Some(1), None).is_empty());
    }

    #[test]
    fn the_newest_restorable_chain_is_never_removed() {
        let f1 = Label::full(at(0));
        let d1 = Label::diff_of(&f1, at(1));
        let f2 = Label::full(at(2));
        let d2 = Label::diff_of(&f2, at(3));
        let mut all = intact(&[&f1, &d1, &f2, &d2]);
        // f2's data is gone: d2 cannot be restored, so f1+d1 is the newest chain.
        all[2].intact = false;
        assert!(plan(&all, Some(1), Some(1), None).is_empty());
    }

    #[test]
    fn orphan_diffs_go() {
        let f1 = Label::full(at(0));
        let d1 = Label::diff_of(&f1, at(1));
        let f2 = Label::full(at(2));
        let all = intact(&[&d1, &f2]);
        assert_eq!(labels(plan(&all, Some(1), Some(1), None)), vec![d1]);
    }
}
