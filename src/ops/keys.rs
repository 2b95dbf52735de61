//! `dr keys status`: which keys the stored backups and WAL still need, so
//! an old key is retired only once nothing needs it. Manifests record the
//! fingerprints of the recipients each backup was encrypted to, and a
//! generation's keys records those of its WAL segments
//! (`repo::wal::keys_ranges`). WAL stored before keys records existed has
//! none and is judged by its generation's backups.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::PolicyRepo;
use super::members::{self, Scope};
use crate::context::Context;
use crate::error::Result;

/// One key (recipient fingerprint) and what needs it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyUse {
    pub fingerprint: String,
    /// The identity file it was given as, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<PathBuf>,
    /// New backups are encrypted to it.
    pub current: bool,
    /// Backups that this key opens, as `policy/target/label`.
    pub backups: Vec<String>,
    /// Stored WAL that this key opens, as `policy/target/wal/generation`
    /// with the number of segments and the first one.
    pub wal: Vec<String>,
    /// Of those backups and WAL, the ones no current key opens: the key
    /// must stay while they exist.
    pub needed_by: Vec<String>,
    /// The newest backup it opens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub newest: Option<String>,
    /// Whether it can be retired now.
    pub retirable: bool,
}

impl KeyUse {
    fn new(fingerprint: &str, current: bool) -> KeyUse {
        KeyUse {
            fingerprint: fingerprint.to_string(),
            identity_file: None,
            current,
            backups: Vec::new(),
            wal: Vec::new(),
            needed_by: Vec::new(),
            newest: None,
            retirable: false,
        }
    }
}

/// Every key the stored backups record, or only those of `identities`.
/// Targets that cannot be read are skipped with a warning (their backups
/// are not counted: say so rather than call a key retirable).
pub fn status(ctx: &Context, identities: &[PathBuf]) -> Result<(Vec<KeyUse>, Vec<String>)> {
    let mut unread = Vec::new();
    let mut current: Vec<String> = Vec::new();
    // Everything stored that records its keys, as (`policy/target/...`,
    // the label of a backup or `None` for a WAL range, recipients).
    // WAL after every backup, as listed.
    let mut stored: Vec<(String, Option<String>, Vec<String>)> = Vec::new();
    let mut wal = Vec::new();
    for p in members::select(ctx, None, None, Scope::Stored)? {
        if !p.encrypted || !matches!(p.source, crate::config::Source::Sqlite { .. }) {
            continue;
        }
        current.extend(ctx.sealing(&p)?.fingerprints());
        for tname in &p.targets {
            let store = match ctx.storage(ctx.cfg().target(tname)?) {
                Ok(store) => store,
                Err(e) => {
                    unread.push(format!("policy '{}' on target '{tname}': {e}", p.name));
                    continue;
                }
            };
            let committed = PolicyRepo {
                storage: store.as_ref(),
                policy: &p.name,
            }
            .committed();
            match committed {
                Ok(c) => stored.extend(c.into_iter().filter_map(|c| c.manifest.ok()).map(|m| {
                    (
                        format!("{}/{tname}/{}", p.name, m.label),
                        Some(m.label.to_string()),
                        m.recipients,
                    )
                })),
                Err(e) => unread.push(format!("policy '{}' on target '{tname}': {e}", p.name)),
            }
            match wal_ranges(store.as_ref(), &p.name, tname) {
                Ok(w) => wal.extend(w.into_iter().map(|(at, r)| (at, None, r))),
                Err(e) => unread.push(format!(
                    "the WAL of policy '{}' on target '{tname}': {e}",
                    p.name
                )),
            }
        }
    }
    stored.extend(wal);
    current.sort();
    current.dedup();
    let is_current = |fp: &str| current.iter().any(|c| c == fp);
    let mut uses: BTreeMap<String, KeyUse> = current
        .iter()
        .map(|fp| (fp.clone(), KeyUse::new(fp, true)))
        .collect();
    let mut newest: BTreeMap<String, String> = BTreeMap::new();
    for (at, label, recipients) in &stored {
        let only_old = !recipients.iter().any(|r| is_current(r));
        for fp in recipients {
            let u = uses
                .entry(fp.clone())
                .or_insert_with(|| KeyUse::new(fp, false));
            if only_old {
                u.needed_by.push(at.clone());
            }
            let Some(label) = label else {
                u.wal.push(at.clone());
                continue;
            };
            u.backups.push(at.clone());
            let n = newest.entry(fp.clone()).or_default();
            if *label > *n {
                *n = label.clone();
                u.newest = Some(at.clone());
            }
        }
    }
    for u in uses.values_mut() {
        // Needed by backups no current key opens; a current key is never retired.
        u.retirable = !u.current && u.needed_by.is_empty() && unread.is_empty();
    }
    if identities.is_empty() {
        return Ok((uses.into_values().collect(), unread));
    }
    let mut out = Vec::new();
    for path in identities {
        for fp in crate::keys::identity_fingerprints(path)? {
            let mut u = uses.get(&fp).cloned().unwrap_or_else(|| {
                let mut u = KeyUse::new(&fp, is_current(&fp));
                u.retirable = !u.current && unread.is_empty();
                u
            });
            u.identity_file = Some(path.clone());
            out.push(u);
        }
    }
    Ok((out, unread))
}

/// The WAL ranges a policy holds on one target, each with the keys its
/// segments are sealed to (one small read per keys record that still
/// covers a segment).
fn wal_ranges(
    store: &dyn crate::storage::Storage,
    policy: &str,
    target: &str,
) -> Result<Vec<(String, Vec<String>)>> {
    use std::io::Read;
    let prefix = crate::repo::wal::wal_prefix(policy);
    let listing = store.list(&prefix)?;
    let mut out = Vec::new();
    for r in crate::repo::wal::keys_ranges(&prefix, &listing) {
        let Some(first) = r.segments.first() else {
            continue;
        };
        let mut body = String::new();
        store
            .open(&r.key)?
            .read_to_string(&mut body)
            .map_err(|e| store.err("read", &r.key, &e))?;
        let record: crate::repo::wal::KeysRecord =
            serde_json::from_str(&body).map_err(|e| crate::error::Error::Storage {
                target: target.to_string(),
                location: store.location(),
                action: "read",
                key: r.key.clone(),
                reason: format!("not a keys record: {e}"),
            })?;
        let first = first.rsplit('/').next().unwrap_or(first);
        out.push((
            format!(
                "{policy}/{target}/wal/{} ({} segments from {first})",
                r.generation,
                r.segments.len()
            ),
            record.recipients,
        ));
    }
    Ok(out)
}

/// The human report.
pub fn render(uses: &[KeyUse], unread: &[String]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for u in uses {
        let name = match &u.identity_file {
            Some(f) => format!("{} ({})", u.fingerprint, f.display()),
            None => u.fingerprint.clone(),
        };
        let state = if u.current {
            "current"
        } else {
            "not in [encryption]"
        };
        let _ = writeln!(
            s,
            "key {name}: {state}, opens {} backups and {} WAL ranges",
            u.backups.len(),
            u.wal.len()
        );
        if let Some(n) = &u.newest {
            let _ = writeln!(s, "  newest: {n}");
        }
        if !u.needed_by.is_empty() {
            let _ = writeln!(
                s,
                "  only this key (no current one) opens {}: keep it until retention has expired them (newest {})",
                u.needed_by.len(),
                u.needed_by.last().map(String::as_str).unwrap_or("")
            );
        }
        if u.retirable {
            let _ = writeln!(s, "  can be retired: no stored backup or WAL needs it");
        }
    }
    for e in unread {
        let _ = writeln!(s, "not read (no key is called retirable until it is): {e}");
    }
    s
}
