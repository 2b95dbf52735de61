//! pgBackRest-style retention, as a pure plan.
//!
//! `full = N` keeps the N newest fulls and everything that depends on them;
//! `diff = M` keeps the M newest diffs. A full is only ever removed when N
//! newer fulls have committed, so a failed new full never costs the old one.

use std::collections::BTreeSet;

use super::label::{BackupType, Label};

/// What expire removes, and why, for `--dry-run` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub label: Label,
    pub reason: String,
}

/// Plans which committed backups to remove. `committed` may be in any order.
pub fn plan(committed: &[Label], full: Option<u32>, diff: Option<u32>) -> Vec<Removal> {
    let mut fulls: Vec<&Label> = committed
        .iter()
        .filter(|l| l.kind() == BackupType::Full)
        .collect();
    fulls.sort();
    let mut removed: BTreeSet<Label> = BTreeSet::new();
    let mut out = Vec::new();
    if let Some(keep) = full {
        let keep = keep.max(1) as usize;
        if fulls.len() > keep {
            for old in &fulls[..fulls.len() - keep] {
                removed.insert((*old).clone());
                out.push(Removal {
                    label: (*old).clone(),
                    reason: format!("retention.full = {keep}: {} newer full backups exist", keep),
                });
            }
        }
    }
    let mut diffs: Vec<&Label> = committed
        .iter()
        .filter(|l| l.kind() == BackupType::Diff)
        .collect();
    diffs.sort();
    // Diffs of a removed full go with it (and do not count towards retention.diff).
    let mut surviving = Vec::new();
    for d in diffs {
        if removed.contains(&d.full_label()) {
            out.push(Removal {
                label: d.clone(),
                reason: format!("its full {} expires", d.full_label()),
            });
        } else {
            surviving.push(d);
        }
    }
    if let Some(keep) = diff {
        let keep = keep as usize;
        if surviving.len() > keep {
            for old in &surviving[..surviving.len() - keep] {
                out.push(Removal {
                    label: (*old).clone(),
                    reason: format!("retention.diff = {keep}: {keep} newer diff backups exist"),
                });
            }
        }
    }
    out.sort_by(|a, b| a.label.cmp(&b.label));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

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
        let all = vec![
            f1.clone(),
            d1.clone(),
            f2.clone(),
            d2.clone(),
            d3.clone(),
            f3.clone(),
        ];
        let p: Vec<Label> = plan(&all, Some(2), None)
            .into_iter()
            .map(|r| r.label)
            .collect();
        assert_eq!(p, vec![f1.clone(), d1.clone()]);
        let p: Vec<Label> = plan(&all, Some(2), Some(1))
            .into_iter()
            .map(|r| r.label)
            .collect();
        assert_eq!(p, vec![f1.clone(), d1.clone(), d2.clone()]);
        assert!(plan(&all, None, None).is_empty());
        // One full is never removed, whatever retention says.
        assert!(plan(std::slice::from_ref(&f1), Some(1), Some(0)).is_empty());
    }
}
