//! Cron expressions as users write them.
//!
//! Users write classic 5-field cron (minute first) or 6 fields (seconds
//! first), with day-of-week 0 or 7 meaning Sunday. The `cron` crate counts
//! days of week from 1 = Sunday, so numeric days are translated here once;
//! names (`Sun`, `Mon-Fri`) pass through unchanged.
//!
//! Day of month and day of week combine as crontab(5) says: when both are
//! restricted, the job runs on days matching *either* (`0 3 1 * 1` is 03:00
//! on the 1st and on every Monday); the `cron` crate alone would require
//! both.

use std::str::FromStr;

use chrono::{DateTime, Utc};

/// A parsed schedule, keeping the text the user wrote for messages.
#[derive(Debug, Clone)]
pub struct CronSpec {
    pub text: String,
    schedule: cron::Schedule,
    /// With both day fields restricted: the day-of-week half of the OR
    /// (`schedule` then holds the day-of-month half).
    or_weekday: Option<cron::Schedule>,
    /// The zone the fields are read in (`[daemon] timezone`, default UTC).
    zone: chrono_tz::Tz,
}

impl CronSpec {
    /// Parses a 5- or 6-field expression; the error says what is accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let mut six: Vec<String> = match fields.len() {
            5 => std::iter::once("0")
                .chain(fields.iter().copied())
                .map(String::from)
                .collect(),
            6 => fields.iter().map(|s| s.to_string()).collect(),
            n => {
                return Err(format!(
                    "cron expression '{text}' has {n} fields: write 5 (minute hour day month weekday) or 6 (second first)"
                ));
            }
        };
        six[5] = translate_dow(&six[5]).map_err(|e| format!("cron expression '{text}': {e}"))?;
        let parse = |six: &[String]| {
            cron::Schedule::from_str(&six.join(" "))
                .map_err(|e| format!("cron expression '{text}' is not valid: {e}"))
        };
        let any = |f: &str| f == "*" || f == "?";
        let (schedule, or_weekday) = if !any(&six[3]) && !any(&six[5]) {
            let mut by_day = six.clone();
            by_day[5] = "*".into();
            let mut by_weekday = six.clone();
            by_weekday[3] = "*".into();
            (parse(&by_day)?, Some(parse(&by_weekday)?))
        } else {
            (parse(&six)?, None)
        };
        Ok(CronSpec {
            text: text.to_string(),
            schedule,
            or_weekday,
            zone: chrono_tz::UTC,
        })
    }

    /// The same schedule read in another time zone ("3 o'clock" there).
    pub fn in_zone(mut self, zone: chrono_tz::Tz) -> Self {
        self.zone = zone;
        self
    }

    /// How long the schedule's runs are apart, measured at `now`.
    pub fn period(&self, now: DateTime<Utc>) -> Option<chrono::Duration> {
        let a = self.next_after(now)?;
        let b = self.next_after(a)?;
        Some(b - a)
    }

    /// The first time this schedule fires strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let next = |s: &cron::Schedule| self.next_in_zone(s, t);
        match (
            next(&self.schedule),
            self.or_weekday.as_ref().and_then(next),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next run of `s` after `t` in the zone. A wall-clock time that
    /// a spring-forward change skips (02:30 on the night 02:00 becomes
    /// 03:00) runs at the change, as cron(8) does, instead of not at all
    /// that day; a time a fall-back change repeats runs once.
    fn next_in_zone(&self, s: &cron::Schedule, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        use chrono::{LocalResult, TimeZone};
        let local = t.with_timezone(&self.zone);
        let real = s.after(&local).next().map(|d| d.with_timezone(&Utc));
        // The schedule read on the wall clock, where no hour is skipped:
        // a time before `real` that the zone cannot show is one the
        // change skipped.
        let wall = Utc.from_utc_datetime(&local.naive_local());
        for w in s.after(&wall).take(10_000) {
            let naive = w.naive_utc();
            let mapped = match self.zone.from_local_datetime(&naive) {
                LocalResult::Single(d) | LocalResult::Ambiguous(d, _) => d.with_timezone(&Utc),
                LocalResult::None => match gap_end(self.zone, naive) {
                    Some(at) if at > t => return Some(real.map_or(at, |r| r.min(at))),
                    _ => continue,
                },
            };
            if real.is_none_or(|r| mapped >= r) {
                break;
            }
        }
        real
    }
}

/// The first wall-clock minute after `naive` (a time `zone` skips) that
/// exists: the moment the clock jumped to, give or take the seconds of
/// `naive` (gaps are at most a few hours).
fn gap_end(zone: chrono_tz::Tz, naive: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
    use chrono::{LocalResult, TimeZone};
    (1..=6 * 60).find_map(|m| {
        match zone.from_local_datetime(&(naive + chrono::Duration::minutes(m))) {
            LocalResult::Single(d) | LocalResult::Ambiguous(d, _) => Some(d.with_timezone(&Utc)),
            LocalResult::None => None,
        }
    })
}

fn translate_dow(field: &str) -> Result<String, String> {
    let is_num = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    let day = |s: &str| -> Result<u32, String> {
        match s.parse::<u32>() {
            Ok(n) if n <= 7 => Ok(n),
            _ => Err(format!("day of week '{s}' is out of range 0-7")),
        }
    };
    let with_step = |r: String, step: Option<&str>| match step {
        Some(s) => format!("{r}/{s}"),
        None => r,
    };
    let mut out = Vec::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        match range.split_once('-') {
            Some((a, b)) if is_num(a) && is_num(b) => {
                let (a, b) = (day(a)?, day(b)?);
                if b == 7 && a == 0 {
                    out.push(with_step("1-7".to_string(), step));
                } else if b == 7 {
                    // "5-7" is Friday to Sunday: Friday-Saturday, then Sunday.
                    out.push(with_step(format!("{}-7", a + 1), step));
                    out.push("1".to_string());
                } else {
                    out.push(with_step(format!("{}-{}", a % 7 + 1, b % 7 + 1), step));
                }
            }
            _ if is_num(range) => out.push(with_step((day(range)? % 7 + 1).to_string(), step)),
            _ => out.push(item.to_string()),
        }
    }
    Ok(out.join(","))
}

#[cfg(test)]
mod zone_tests {
    use super::*;

    #[test]
    fn day_of_month_and_day_of_week_combine_with_or_as_in_crontab() {
        // Sunday 2026-11-01 .. : the 1st is a Sunday, the 2nd a Monday.
        let t = DateTime::parse_from_rfc3339("2026-11-01T04:00:00Z")
            .expect("t")
            .with_timezone(&Utc);
        let s = CronSpec::parse("0 3 1 * 1").expect("parse");
        let mut runs = Vec::new();
        let mut at = t;
        for _ in 0..4 {
            at = s.next_after(at).expect("next");
            runs.push(at.format("%m-%d %a").to_string());
        }
        assert_eq!(runs, ["11-02 Mon", "11-09 Mon", "11-16 Mon", "11-23 Mon"]);
        let next = s
            .next_after(
                DateTime::parse_from_rfc3339("2026-11-30T04:00:00Z")
                    .expect("t")
                    .with_timezone(&Utc),
            )
            .expect("next");
        assert_eq!(
            next.format("%m-%d").to_string(),
            "12-01",
            "the 1st, a Tuesday"
        );
        // One day field restricted: that field alone decides.
        let only_dom = CronSpec::parse("0 3 1 * *").expect("parse");
        assert_eq!(
            only_dom
                .next_after(t)
                .expect("next")
                .format("%m-%d")
                .to_string(),
            "12-01"
        );
    }

    #[test]
    fn a_named_zone_moves_the_hour() {
        let t = DateTime::parse_from_rfc3339("2026-01-10T00:00:00Z")
            .expect("t")
            .with_timezone(&Utc);
        let utc = CronSpec::parse("0 3 * * *").expect("parse");
        let berlin = utc.clone().in_zone(chrono_tz::Europe::Berlin);
        assert_eq!(
            utc.next_after(t).map(|d| d.to_rfc3339()).as_deref(),
            Some("2026-01-10T03:00:00+00:00")
        );
        // 03:00 in Berlin in winter is 02:00 UTC.
        assert_eq!(
            berlin.next_after(t).map(|d| d.to_rfc3339()).as_deref(),
            Some("2026-01-10T02:00:00+00:00")
        );
    }

    /// Every run of a daily 02:30 Berlin job from `from` for `days` days.
    fn runs(expr: &str, from: &str, days: i64) -> Vec<String> {
        let spec = CronSpec::parse(expr)
            .expect("parse")
            .in_zone(chrono_tz::Europe::Berlin);
        let mut t = DateTime::parse_from_rfc3339(from)
            .expect("t")
            .with_timezone(&Utc);
        let end = t + chrono::Duration::days(days);
        let mut out = Vec::new();
        while let Some(n) = spec.next_after(t).filter(|n| *n < end) {
            out.push(n.to_rfc3339());
            t = n;
        }
        out
    }

    #[test]
    fn a_daily_job_in_the_hour_a_dst_change_skips_or_repeats_runs_once_each_day() {
        // Spring forward, 2026-03-29: 02:00 CET jumps to 03:00 CEST, so
        // 02:30 does not exist that day. The job still runs that day.
        let spring = runs("30 2 * * *", "2026-03-27T12:00:00Z", 4);
        let days: Vec<&str> = spring.iter().map(|r| &r[..10]).collect();
        assert_eq!(
            days,
            ["2026-03-28", "2026-03-29", "2026-03-30", "2026-03-31"],
            "{spring:?}"
        );
        // Fall back, 2026-10-25: 02:30 happens twice; the job runs once.
        let fall = runs("30 2 * * *", "2026-10-23T12:00:00Z", 4);
        let days: Vec<&str> = fall.iter().map(|r| &r[..10]).collect();
        assert_eq!(
            days,
            ["2026-10-24", "2026-10-25", "2026-10-26", "2026-10-27"],
            "{fall:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Weekday};

    fn next(expr: &str) -> DateTime<Utc> {
        let start = Utc
            .with_ymd_and_hms(2026, 11, 22, 7, 0, 0)
            .single()
            .expect("time"); // a Sunday
        CronSpec::parse(expr)
            .expect(expr)
            .next_after(start)
            .expect("fires")
    }

    #[test]
    fn sunday_is_zero_or_seven() {
        assert_eq!(next("0 3 * * 0").weekday(), Weekday::Sun);
        assert_eq!(next("0 3 * * 7").weekday(), Weekday::Sun);
        assert_eq!(next("0 3 * * 1").weekday(), Weekday::Mon);
        assert_eq!(next("0 3 * * Sat").weekday(), Weekday::Sat);
        assert_eq!(next("0 3 * * 1-5").weekday(), Weekday::Mon);
    }

    #[test]
    fn five_and_six_fields() {
        assert_eq!(
            next("0 */6 * * *").to_rfc3339(),
            "2026-11-22T12:00:00+00:00"
        );
        assert_eq!(
            next("0 3/6 * * *").to_rfc3339(),
            "2026-11-22T09:00:00+00:00"
        );
        assert_eq!(
            next("*/5 * * * * *").to_rfc3339(),
            "2026-11-22T07:00:05+00:00"
        );
    }

    #[test]
    fn bad_expressions_say_why() {
        assert!(CronSpec::parse("61 * * * *").is_err());
        assert!(
            CronSpec::parse("* * *")
                .expect_err("3 fields")
                .contains("3 fields")
        );
        assert!(CronSpec::parse("0 3 * * 9").is_err());
    }
}
