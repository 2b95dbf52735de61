//! The policies a command applies to, with fleet policies (a pattern for
//! a path, `fleet.rs`) expanded into one member policy per database.
//!
//! Commands that read the repository (info, verify, expire, restore) also
//! see databases that exist only there (a tenant deleted from disk is still
//! restorable); backups and streams see the files on disk.

use super::fanout::TargetFilter;
use crate::config::Policy;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::fleet;

/// Where a fleet's databases are looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The files matching the pattern now.
    OnDisk,
    /// Those, and every database the policy's targets hold backups of.
    Stored,
}

/// The policies named (`name`, or every policy), members expanded; `db`
/// narrows a fleet policy to one database. `name` may also be a member's
/// own name, `<policy>/<db>`.
pub fn select(
    ctx: &Context,
    name: Option<&str>,
    db: Option<&str>,
    scope: Scope,
) -> Result<Vec<Policy>> {
    let cfg = ctx.cfg();
    let Some(name) = name else {
        if let Some(db) = db {
            return Err(Error::Usage(format!(
                "--db {db} needs a policy: name the fleet policy it belongs to"
            )));
        }
        let mut out = Vec::new();
        for p in &cfg.policies {
            out.extend(expand(ctx, p, scope)?);
        }
        return Ok(out);
    };
    if name.contains('/') || db.is_some() {
        return one(ctx, name, db).map(|p| vec![p]);
    }
    expand(ctx, cfg.policy(name)?, scope)
}

/// Exactly one database: a plain policy, or one member of a fleet. A fleet
/// policy without `db` is a usage error that says how many it holds.
pub fn one(ctx: &Context, name: &str, db: Option<&str>) -> Result<Policy> {
    let (name, db) = match (name.split_once('/'), db) {
        (Some(_), Some(_)) => {
            return Err(Error::Usage(format!(
                "'{name}' names one database already: leave out --db"
            )));
        }
        // `<policy>/<db>` is how members are named in messages: the
        // database in its key form (`fleet/my%20db`).
        (Some((n, d)), None) => (n, Some(d)),
        (None, db) => (name, db),
    };
    let p = ctx.cfg().policy(name)?;
    match (&p.fleet, db) {
        (None, None) => Ok(p.clone()),
        (None, Some(_)) => Err(Error::Usage(format!(
            "policy '{name}' backs up one database: --db applies only to policies whose path is a pattern"
        ))),
        (Some(f), None) => {
            let n = f.scan().map(|v| v.len()).unwrap_or(0);
            Err(Error::Usage(format!(
                "policy '{name}' holds a database per file of {} ({n} now): name one with --db NAME (`dr info {name}` lists them)",
                f.display()
            )))
        }
        (Some(f), Some(db)) => {
            // The name as the file has it, or its key form as messages show
            // it: the one whose file or backups exist wins.
            let decoded = fleet::name_of_key(db).filter(|d| d != db);
            let db = match decoded {
                Some(d) if !f.path_of(db).exists() => d,
                _ => db.to_string(),
            };
            if db.is_empty() || db.contains('/') || db.contains('\0') {
                return Err(Error::Usage(format!(
                    "'{db}' is not a database name: name the part of the file name the pattern's '*' matches"
                )));
            }
            let path = f.path_of(&db);
            if !path.exists() && !stored(ctx, p, &db) {
                return Err(Error::NotFound(format!(
                    "policy '{name}' has no database '{db}': no {} on disk and no target holds backups of it (`dr info {name}` lists its databases)",
                    path.display()
                )));
            }
            Ok(p.member_policy(&db, path))
        }
    }
}

/// Whether any target of fleet policy `p` holds objects of database `db`
/// (a target that cannot be listed counts as holding it: the command
/// then says what is wrong with the target itself).
fn stored(ctx: &Context, p: &Policy, db: &str) -> bool {
    let Ok(targets) = TargetFilter::All.select(ctx.cfg(), p) else {
        return true;
    };
    let prefix = format!("{}/", fleet::member_name(&p.name, db));
    targets.iter().any(|t| {
        ctx.storage(t)
            .and_then(|s| s.list(&prefix))
            .map_or(true, |objs| !objs.is_empty())
    })
}

/// A configured policy as the policies it stands for: itself, or its
/// members (sorted by name).
pub fn expand(ctx: &Context, p: &Policy, scope: Scope) -> Result<Vec<Policy>> {
    let Some(f) = &p.fleet else {
        return Ok(vec![p.clone()]);
    };
    let mut names: Vec<String> = match on_disk(p) {
        Ok(v) => v
            .into_iter()
            .filter_map(|m| m.member.map(|m| m.db))
            .collect(),
        Err(e) if scope == Scope::Stored => {
            tracing::warn!(policy = %p.name, "cannot list {}: {} (listing the backups only)", f.dir.display(), crate::error::io_reason(&e));
            Vec::new()
        }
        Err(e) => {
            return Err(Error::Source {
                path: f.dir.clone(),
                reason: format!(
                    "cannot list the databases of policy '{}' ({}): {}",
                    p.name,
                    f.display(),
                    crate::error::io_reason(&e)
                ),
            });
        }
    };
    if scope == Scope::Stored {
        for t in TargetFilter::All.select(ctx.cfg(), p)? {
            let listed = ctx.storage(t).and_then(|s| s.list(&format!("{}/", p.name)));
            match listed {
                Ok(objs) => names.extend(fleet::names_in_keys(
                    &p.name,
                    objs.iter().map(|o| o.key.as_str()),
                )),
                Err(e) => {
                    tracing::warn!(policy = %p.name, target = %t.name, "cannot list the databases backed up there: {e}")
                }
            }
        }
        names.sort();
        names.dedup();
    }
    Ok(names
        .iter()
        .map(|n| p.member_policy(n, f.path_of(n)))
        .collect())
}

/// A configured policy as the policies it stands for on disk now: itself,
/// or one member per matching file (sorted by name).
///
/// An empty file (a database its application has not written yet) holds
/// nothing to protect: it is left out until it has a header, so one new
/// tenant never fails the fleet's backup, and the streamer picks it up
/// when it is written.
pub fn on_disk(p: &Policy) -> std::io::Result<Vec<Policy>> {
    match &p.fleet {
        None => Ok(vec![p.clone()]),
        Some(f) => Ok(f
            .scan()?
            .into_iter()
            .filter(|(n, path)| {
                let empty = std::fs::metadata(path).is_ok_and(|m| m.len() == 0);
                if empty {
                    tracing::debug!(policy = %p.name, db = %n, "empty: nothing to back up yet");
                }
                !empty
            })
            .map(|(n, path)| p.member_policy(&n, path))
            .collect()),
    }
}

/// Files a fleet's pattern matches that no database name stands for (a
/// name that is not UTF-8, or empty), with their fleet policy: the
/// protection verdict lists each as at risk. `name` narrows to one policy.
pub fn unnamed(ctx: &Context, name: Option<&str>) -> Vec<(Policy, std::path::PathBuf)> {
    ctx.cfg()
        .policies
        .iter()
        .filter(|p| name.is_none_or(|n| n == p.name))
        .filter_map(|p| Some((p, p.fleet.as_ref()?.scan_all().ok()?)))
        .flat_map(|(p, scan)| scan.unnamed.into_iter().map(|f| (p.clone(), f)))
        .collect()
}
