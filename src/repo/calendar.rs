//! Calendar retention (`[retention] keep_daily`, `keep_weekly`,
//! `keep_monthly`, `keep_yearly`), restic's semantics: for the last N
//! periods that hold a restorable backup, the newest backup of each.
//! Periods are calendar days, ISO weeks, months and years in the daemon's
//! time zone (`[daemon] timezone`), so "daily" means the user's days across
//! DST changes. A pure function: `retention::plan` combines what it keeps
//! with the other rules.

use std::collections::BTreeMap;

use chrono::{Datelike, TimeZone};

use super::label::Label;

/// The calendar rules of a policy; `None` is no rule of that period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calendar {
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
    pub zone: chrono_tz::Tz,
}

impl Default for Calendar {
    fn default() -> Self {
        Calendar {
            daily: None,
            weekly: None,
            monthly: None,
            yearly: None,
            zone: chrono_tz::UTC,
        }
    }
}

/// A period kind: the rule's name and how a backup's instant names its
/// period.
struct Period {
    rule: &'static str,
    keep: Option<u32>,
    name: fn(&chrono::DateTime<chrono_tz::Tz>) -> String,
}

impl Calendar {
    /// Whether any calendar rule is set.
    pub fn any(&self) -> bool {
        self.daily.is_some()
            || self.weekly.is_some()
            || self.monthly.is_some()
            || self.yearly.is_some()
    }

    fn periods(&self) -> [Period; 4] {
        [
            Period {
                rule: "keep_daily",
                keep: self.daily,
                name: |t| t.format("%Y-%m-%d").to_string(),
            },
            Period {
                rule: "keep_weekly",
                keep: self.weekly,
                name: |t| {
                    let w = t.iso_week();
                    format!("{}-W{:02}", w.year(), w.week())
                },
            },
            Period {
                rule: "keep_monthly",
                keep: self.monthly,
                name: |t| t.format("%Y-%m").to_string(),
            },
            Period {
                rule: "keep_yearly",
                keep: self.yearly,
                name: |t| t.format("%Y").to_string(),
            },
        ]
    }

    /// What the rules keep among `restorable` (any order), with why: for
    /// each rule, the newest backup of each of its last N periods that
    /// hold one.
    pub fn keeps(&self, restorable: &[&Label]) -> BTreeMap<Label, Vec<String>> {
        let mut newest_first: Vec<&Label> = restorable.to_vec();
        newest_first.sort_by(|a, b| b.cmp(a));
        let mut out: BTreeMap<Label, Vec<String>> = BTreeMap::new();
        for p in self.periods() {
            let Some(n) = p.keep else { continue };
            let mut seen: Option<String> = None;
            let mut periods = 0;
            for l in &newest_first {
                let at = self.zone.from_utc_datetime(&l.time().naive_utc());
                let period = (p.name)(&at);
                if seen.as_ref() == Some(&period) {
                    continue;
                }
                if periods == n {
                    break;
                }
                periods += 1;
                out.entry((*l).clone())
                    .or_default()
                    .push(format!("{} = {n}: the newest of {period}", p.rule));
                seen = Some(period);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn full(y: i32, m: u32, d: u32, h: u32, min: u32) -> Label {
        Label::full(
            Utc.with_ymd_and_hms(y, m, d, h, min, 0)
                .single()
                .expect("time"),
        )
    }

    fn kept(c: &Calendar, ls: &[Label]) -> Vec<Label> {
        let refs: Vec<&Label> = ls.iter().collect();
        c.keeps(&refs).into_keys().collect()
    }

    #[test]
    fn daily_keeps_the_newest_of_each_of_the_last_days_that_have_one() {
        let ls = vec![
            full(2026, 11, 28, 1, 0),
            full(2026, 11, 30, 1, 0),
            full(2026, 11, 30, 13, 0),
            full(2026, 12, 1, 1, 0),
            full(2026, 12, 1, 13, 0),
            full(2026, 12, 1, 23, 0),
        ];
        let c = Calendar {
            daily: Some(2),
            ..Calendar::default()
        };
        // 1 December's newest, and 30 November's (a day without a backup
        // between them does not count).
        assert_eq!(kept(&c, &ls), vec![ls[2].clone(), ls[5].clone()]);
        let c = Calendar {
            daily: Some(3),
            ..Calendar::default()
        };
        assert_eq!(
            kept(&c, &ls),
            vec![ls[0].clone(), ls[2].clone(), ls[5].clone()]
        );
    }

    #[test]
    fn months_end_where_the_calendar_says_including_leap_days() {
        let ls = [
            full(2028, 1, 31, 23, 0),
            full(2028, 2, 28, 12, 0),
            full(2028, 2, 29, 12, 0),
            full(2028, 3, 1, 0, 30),
        ];
        let c = Calendar {
            monthly: Some(3),
            daily: Some(2),
            ..Calendar::default()
        };
        let k = {
            let refs: Vec<&Label> = ls.iter().collect();
            c.keeps(&refs)
        };
        // Months: March's, February's newest (the leap day), January's.
        // Days: 1 March, 29 February.
        assert_eq!(
            k.keys().cloned().collect::<Vec<_>>(),
            vec![ls[0].clone(), ls[2].clone(), ls[3].clone()]
        );
        assert_eq!(
            k[&ls[2]],
            vec![
                "keep_daily = 2: the newest of 2028-02-29".to_string(),
                "keep_monthly = 3: the newest of 2028-02".to_string()
            ]
        );
    }

    #[test]
    fn days_and_weeks_are_the_zones_across_a_dst_change() {
        let berlin: chrono_tz::Tz = "Europe/Berlin".parse().expect("zone");
        // 28 March 2026 23:30 UTC is 29 March 00:30 in Berlin (CET, +1);
        // 29 March 22:30 UTC is 30 March 00:30 (CEST, +2 since 02:00).
        let ls = [
            full(2026, 3, 28, 22, 0),  // 28 March 23:00 Berlin
            full(2026, 3, 28, 23, 30), // 29 March 00:30
            full(2026, 3, 29, 21, 30), // 29 March 23:30
            full(2026, 3, 29, 22, 30), // 30 March 00:30, a Monday: week 14
        ];
        let c = Calendar {
            daily: Some(3),
            zone: berlin,
            ..Calendar::default()
        };
        assert_eq!(
            kept(&c, &ls),
            vec![ls[0].clone(), ls[2].clone(), ls[3].clone()]
        );
        let c = Calendar {
            weekly: Some(2),
            zone: berlin,
            ..Calendar::default()
        };
        // Week 13 ends on Sunday 29 March in Berlin: its newest is ls[2].
        assert_eq!(kept(&c, &ls), vec![ls[2].clone(), ls[3].clone()]);
        // In UTC every one of them is on 28 or 29 March, in week 13.
        let utc = Calendar {
            weekly: Some(2),
            ..Calendar::default()
        };
        assert_eq!(kept(&utc, &ls), vec![ls[3].clone()]);
    }

    #[test]
    fn years_and_no_rules() {
        let ls = vec![
            full(2024, 12, 31, 23, 0),
            full(2025, 6, 1, 0, 0),
            full(2026, 1, 1, 0, 0),
        ];
        assert!(kept(&Calendar::default(), &ls).is_empty());
        assert!(!Calendar::default().any());
        let c = Calendar {
            yearly: Some(10),
            ..Calendar::default()
        };
        assert!(c.any());
        assert_eq!(kept(&c, &ls), ls);
    }
}
