//! `[copy]` in a policy: other targets that hold a copy of what one of
//! its targets stores, made by `dr copy` (on a schedule by the daemon)
//! rather than by backing up to them: an offsite bucket on its own
//! schedule, a second provider, a seeded new bucket. The objects are
//! copied as stored, so the copy needs no key and restores exactly as the
//! original does. A copy destination is named like any target
//! (`--target offsite` for restore, info, verify and expire), but backups
//! never write to it.

use serde::Deserialize;
use toml::Spanned;

use super::{FileDiags, Target, cron};
use crate::schedule::CronSpec;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCopy {
    from: Option<Spanned<String>>,
    to: Spanned<Vec<Spanned<String>>>,
    schedule: Option<Spanned<String>>,
}

/// Where a policy's copies come from and go.
#[derive(Debug, Clone)]
pub struct Copy {
    /// The target copied (default: the policy's first).
    pub from: String,
    /// The targets that receive the copies.
    pub to: Vec<String>,
    /// When the daemon copies; `None`: only `dr copy` does.
    pub schedule: Option<CronSpec>,
}

pub(super) fn resolve(
    name: &str,
    raw: &RawCopy,
    policy_targets: &[String],
    targets: &BTreeMap<String, Target>,
    d: &mut FileDiags<'_>,
) -> Option<Copy> {
    let mut ok = true;
    let from = match &raw.from {
        Some(f) if !policy_targets.contains(f.get_ref()) => {
            d.at(
                f.span(),
                format!(
                    "copy.from '{}' is not a target of policy '{name}' (its targets: {}): copies are made from where its backups are written",
                    f.get_ref(),
                    policy_targets.join(", ")
                ),
            );
            ok = false;
            String::new()
        }
        Some(f) => f.get_ref().clone(),
        None => policy_targets.first().cloned().unwrap_or_default(),
    };
    let mut to = Vec::new();
    for t in raw.to.get_ref() {
        let n = t.get_ref();
        let why = if !targets.contains_key(n) {
            Some(format!(
                "copy.to names target '{n}', which dr.toml does not define (its targets: {})",
                targets.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        } else if policy_targets.contains(n) {
            Some(format!(
                "copy.to names '{n}', which policy '{name}' already backs up to: a copy destination is a target its backups do not write"
            ))
        } else if to.contains(n) {
            Some(format!("copy.to names '{n}' twice"))
        } else {
            None
        };
        match why {
            Some(w) => {
                d.at(t.span(), w);
                ok = false;
            }
            None => to.push(n.clone()),
        }
    }
    if to.is_empty() && ok {
        d.at(
            raw.to.span(),
            "copy.to is empty: name the targets that receive the copies, e.g. [\"offsite\"]".into(),
        );
        ok = false;
    }
    let schedule = raw.schedule.as_ref().and_then(|s| cron(d, s, &mut ok));
    ok.then_some(Copy { from, to, schedule })
}
