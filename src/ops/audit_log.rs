//! The audit log off the host: what `state_dir/audit.log` gained since the
//! last shipment goes, compressed and encrypted to the configured
//! recipients, to every target as one object under `.audit/<host>/`
//! (`.audit`, because no policy name starts with a dot). Erasing the host
//! then does not erase the record; `dr audit --target NAME` reads it back.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use chrono::Utc;

use crate::audit::{self, Entry};
use crate::codec::{Decoder, Encoder};
use crate::config::Target;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::keys::{self, Sealing};

/// Key prefix of shipped audit logs, relative to a target's root.
pub const PREFIX: &str = ".audit/";

/// How far the log has been shipped to each target (`state_dir/audit.shipped`).
type Cursors = BTreeMap<String, u64>;

fn sealing(ctx: &Context) -> Result<Sealing> {
    let enc = &ctx.cfg().encryption;
    let configured = enc.recipients_file.is_some()
        || !enc.recipients.is_empty()
        || enc.passphrase_file.is_some();
    if configured {
        ctx.keys()
    } else {
        Ok(Sealing::None)
    }
}

/// Ships the new lines to every target. Never fails the caller: what
/// cannot go now is a warning, and goes next time from the same place.
pub fn ship(ctx: &Context) {
    if let Err(e) = ship_all(ctx) {
        tracing::warn!("the audit log stays on this host for now: {e}");
    }
}

/// [`ship`]; a target that fails is a warning of its own and the others
/// still get their lines.
fn ship_all(ctx: &Context) -> Result<()> {
    let sealing = sealing(ctx)?.frequent();
    let targets: Vec<Target> = ctx.cfg().targets.values().cloned().collect();
    // Open the targets first: reading their key files is itself audited,
    // and goes out with this shipment.
    let stores: Vec<_> = targets.iter().map(|t| (t, ctx.storage(t))).collect();
    let root = ctx.state().root();
    let log = std::fs::read(root.join(audit::FILE)).unwrap_or_default();
    let cursor_path = root.join("audit.shipped");
    let mut cursors: Cursors = std::fs::read(&cursor_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    // Whole lines only.
    let end = log.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) as u64;
    for (t, store) in stores {
        let from = cursors.get(&t.name).copied().unwrap_or(0);
        // A log that shrank was rotated by the user: ship it from its start.
        let from = if from > end { 0 } else { from };
        if from == end {
            continue;
        }
        let r = store.and_then(|store| {
            let key = format!(
                "{PREFIX}{}/{}-{from:016x}.jsonl.zst.age",
                crate::lock::hostname(),
                Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
            );
            let mut enc = Encoder::new(store.create(&key)?, 3, &sealing)?;
            let chunk = log.get(from as usize..end as usize).unwrap_or_default();
            enc.write_all(chunk)
                .map_err(|e| Error::io(format!("writing {key}"), e))?;
            let (_, w) = enc
                .finish()
                .map_err(|e| Error::io(format!("writing {key}"), e))?;
            w.commit()
        });
        match r {
            Ok(()) => {
                cursors.insert(t.name.clone(), end);
            }
            Err(e) => {
                tracing::warn!(target = %t.name, "the audit log stays on this host for now: {e}");
            }
        }
    }
    let bytes = serde_json::to_vec(&cursors).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(&cursor_path, bytes)
        .map_err(|e| Error::io(format!("cannot write {}", cursor_path.display()), e))
}

/// Every entry shipped to `target` (by any host), oldest first, read with
/// `identity` (or the configured identity or passphrase).
pub fn read_target(ctx: &Context, target: &Target, identity: Option<&Path>) -> Result<Vec<Entry>> {
    let store = ctx.storage(target)?;
    let encrypted = !matches!(sealing(ctx)?, Sealing::None);
    let unsealing = keys::unsealing(&ctx.cfg().encryption, identity)?;
    if encrypted && unsealing.is_none() {
        return Err(Error::Secret {
            path: ctx.cfg().file.clone(),
            reason: "the shipped audit log is encrypted: pass --identity FILE".into(),
        });
    }
    let mut out = Vec::new();
    for o in store.list(PREFIX)? {
        let object = format!("target '{}': {}", target.name, o.key);
        let mut dec =
            Decoder::self_checked(store.open(&o.key)?, &object, unsealing.as_ref(), encrypted)?;
        let mut text = String::new();
        dec.read_to_string(&mut text)
            .map_err(|e| crate::codec::read_error(&object, e))?;
        out.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Entry>(l).ok()),
        );
    }
    out.sort_by_key(|e| e.time);
    Ok(out)
}
