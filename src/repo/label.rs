//! Backup labels in pgBackRest's form, so SQLite and PostgreSQL backups read
//! the same in `dr info`: `20261122-031500F` for a full and
//! `20261122-031500F_20261122-091500D` for a diff of that full.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// Full or differential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    Full,
    Diff,
}

impl BackupType {
    /// The word users and manifests use.
    pub fn word(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Diff => "diff",
        }
    }
}

impl fmt::Display for BackupType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// A parsed label. Ordering is by the backup's own time, then its text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Label {
    full: DateTime<Utc>,
    diff: Option<DateTime<Utc>>,
}

const FMT: &str = "%Y%m%d-%H%M%S";

fn stamp(t: &DateTime<Utc>) -> String {
    t.format(FMT).to_string()
}

impl Label {
    /// A new full label at `t` (second precision).
    pub fn full(t: DateTime<Utc>) -> Self {
        Label {
            full: trunc(t),
            diff: None,
        }
    }

    /// A new diff label of `parent` (a full) at `t`.
    pub fn diff_of(parent: &Label, t: DateTime<Utc>) -> Self {
        Label {
            full: parent.full,
            diff: Some(trunc(t)),
        }
    }

    /// Full or diff.
    pub fn kind(&self) -> BackupType {
        if self.diff.is_some() {
            BackupType::Diff
        } else {
            BackupType::Full
        }
    }

    /// The label of the full this backup depends on (itself for a full).
    pub fn full_label(&self) -> Label {
        Label {
            full: self.full,
            diff: None,
        }
    }

    /// When the backup started, as encoded in the label.
    pub fn time(&self) -> DateTime<Utc> {
        self.diff.unwrap_or(self.full)
    }
}

fn trunc(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.timestamp_opt(t.timestamp(), 0).single().unwrap_or(t)
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.diff {
            None => write!(f, "{}F", stamp(&self.full)),
            Some(d) => write!(f, "{}F_{}D", stamp(&self.full), stamp(d)),
        }
    }
}

fn parse_stamp(s: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(s, FMT)
        .ok()
        .map(|n| n.and_utc())
}

impl FromStr for Label {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "'{s}' is not a backup label (like 20261122-031500F or 20261122-031500F_20261122-091500D)"
            )
        };
        let (full, diff) = match s.split_once('_') {
            None => (s.strip_suffix('F').ok_or_else(bad)?, None),
            Some((f, d)) => (
                f.strip_suffix('F').ok_or_else(bad)?,
                Some(d.strip_suffix('D').ok_or_else(bad)?),
            ),
        };
        let full = parse_stamp(full).ok_or_else(bad)?;
        let diff = match diff {
            Some(d) => Some(parse_stamp(d).ok_or_else(bad)?),
            None => None,
        };
        if diff.is_some_and(|d| d < full) {
            return Err(bad());
        }
        let label = Label { full, diff };
        // Only the canonical spelling: chrono also takes signs, spaces and
        // short fields, and a label must name exactly its directory (keys
        // are built from the label, so another spelling would point at
        // objects that are not the ones listed).
        if label.to_string() != s {
            return Err(bad());
        }
        Ok(label)
    }
}

impl Ord for Label {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.time(), self.to_string()).cmp(&(other.time(), other.to_string()))
    }
}

impl PartialOrd for Label {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Serialize for Label {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_like_pgbackrest() {
        let t = Utc
            .with_ymd_and_hms(2026, 11, 22, 3, 15, 0)
            .single()
            .expect("t");
        let f = Label::full(t);
        assert_eq!(f.to_string(), "20261122-031500F");
        let d = Label::diff_of(&f, t + chrono::Duration::hours(6));
        assert_eq!(d.to_string(), "20261122-031500F_20261122-091500D");
        assert_eq!(d.to_string().parse::<Label>().expect("parse"), d);
        assert_eq!(d.full_label(), f);
        assert_eq!(d.kind(), BackupType::Diff);
        assert!(f < d);
        assert!("20261122-031500".parse::<Label>().is_err());
        // Found by cargo-fuzz: chrono reads this as a (negative) time, and
        // it would print back differently. Only the canonical form parses.
        assert!("\n-8  0122-8\x0c\x0c\x0c0\x0c6F".parse::<Label>().is_err());
        assert!(" 20261122-031500F".parse::<Label>().is_err());
        assert!("20261122-31500F".parse::<Label>().is_err());
        assert!(
            "20261122-031500F_20261121-091500D"
                .parse::<Label>()
                .is_err()
        );
    }
}
