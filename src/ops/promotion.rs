//! Failover and fencing. `dr promote` declares this host the primary of a
//! policy by writing a promotion record to every target; from then on the
//! newest record names the only host that may write the policy's backups
//! and WAL. Another host (the old primary coming back with its old
//! state_dir) is fenced: its streamer, backups and expire refuse, loudly,
//! instead of forking the history. The record is the fence, not a lease:
//! it holds while no process of the new primary runs.
//!
//! `<policy>/promotion/<YYYYMMDDTHHMMSS.mmmZ>-<host id>.json`; names sort
//! by time. A repository without any record fences nobody.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Policy;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// One promotion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Promotion {
    pub format: u32,
    pub policy: String,
    /// The promoted host's state_dir identity (`state_dir/host.id`).
    pub host_id: String,
    pub host: String,
    pub at: DateTime<Utc>,
    /// Where the copy was when it was promoted (generation and frame
    /// followed), when it was a follower.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    pub dr_version: String,
}

fn prefix(policy: &str) -> String {
    format!("{policy}/promotion/")
}

/// Where `dr promote FLEET` records a fleet's promotions: a segment that no
/// database's key can be (`fleet::key_name` never starts one with a dot),
/// beside the members' own `<fleet>/<db>/promotion/`.
fn fleet_prefix(fleet: &str) -> String {
    format!("{fleet}/.promotion/")
}

/// Where `policy`'s own records are.
fn own_prefix(policy: &Policy) -> String {
    if policy.fleet.is_some() {
        fleet_prefix(&policy.name)
    } else {
        prefix(&policy.name)
    }
}

/// A PostgreSQL policy's newest record again under one fixed name in
/// pgBackRest's repository, [`CURRENT`]: the cluster's archive_command
/// reads it with one GET through pgBackRest (`repo-get`), which neither
/// lists outside its repository nor lists a path on every S3 store (a
/// HEAD of a "directory" is an error on some). The dated records stay the
/// history dr reads.
fn current_key(policy: &Policy) -> Option<String> {
    matches!(policy.source, crate::config::Source::Postgres(_))
        .then(|| format!("{}/pgbackrest/{CURRENT}", policy.name))
}

/// [`current_key`] relative to pgBackRest's repository path.
pub const CURRENT: &str = "primary.json";

/// This state_dir's identity, made on first use.
pub fn host_id(ctx: &Context) -> Result<String> {
    let path = ctx.state().host_id();
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let id = format!("{:016x}", fastrand::u64(..));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    }
    std::fs::write(&path, format!("{id}\n"))
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
    Ok(id)
}

/// The newest promotion that governs `policy` on a target: its own, and
/// for a database of a fleet also the fleet's (`dr promote FLEET` promotes
/// every database, those the fleet gains later too); the later one wins.
pub fn governing(storage: &dyn Storage, policy: &Policy) -> Result<Option<Promotion>> {
    let own = newest_under(storage, &own_prefix(policy), &policy.name)?;
    let fleet = match &policy.member {
        Some(m) => newest_under(storage, &fleet_prefix(&m.policy), &m.policy)?,
        None => None,
    };
    Ok(match (own, fleet) {
        (Some(a), Some(b)) => Some(if b.at > a.at { b } else { a }),
        (a, b) => a.or(b),
    })
}

fn newest_under(storage: &dyn Storage, prefix: &str, policy: &str) -> Result<Option<Promotion>> {
    for k in crate::repo::records_newest_first(storage, prefix)? {
        let bytes = storage.get_bytes(&k)?;
        match serde_json::from_slice::<Promotion>(&bytes) {
            Ok(p) if p.policy == policy => return Ok(Some(p)),
            _ => {
                tracing::warn!(target = %storage.target(), key = %k, "not a promotion record dr reads: skipped")
            }
        }
    }
    Ok(None)
}

/// Refuses when a promotion record names another host as the primary of
/// `policy`: what this host would write forks the history.
///
/// A host whose policy says `[follow]` is a standby: it writes nothing
/// either until `dr promote` names it (its copy streamed or backed up
/// would fork the primary's history just the same).
pub fn fence(ctx: &Context, policy: &Policy, storage: &dyn Storage) -> Result<()> {
    let newest = governing(storage, policy)?;
    if let Some(p) = &newest
        && p.host_id == host_id(ctx)?
    {
        return Ok(());
    }
    if policy.follow.is_some() {
        return Err(Error::Refused(format!(
            "policy '{}' says [follow]: this host keeps a standby of it, and the primary writes its backups and WAL to target '{}'. `dr promote {}` makes this host the primary",
            policy.name,
            storage.target(),
            policy.configured_name()
        )));
    }
    let Some(p) = newest else {
        return Ok(());
    };
    Err(Error::Refused(format!(
        "policy '{}' was promoted on host {} at {}: that host is the primary now, and this one may no longer write target '{}' (its WAL and backups would fork the history). Stop the application here. To make this host the primary again, follow the new primary (`dr follow`) and `dr promote` here; on a new host after a disaster, `dr promote {}` once the database is restored",
        policy.name,
        p.host,
        p.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        storage.target(),
        policy.name
    )))
}

/// What `dr promote` did.
#[derive(Debug, Clone, Serialize)]
pub struct Promoted {
    pub policy: String,
    pub path: PathBuf,
    pub host: String,
    pub host_id: String,
    pub at: DateTime<Utc>,
    /// The pid of the follower stopped, when one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follower_stopped: Option<u32>,
    pub targets: Vec<String>,
    /// A fleet's: how many databases were promoted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub databases: Option<usize>,
}

/// Promotes this host: checks the copy at `path`, writes the promotion
/// record to every target, and stops the policy's `dr follow`.
pub fn promote(ctx: &Context, policy: &Policy, path: &Path) -> Result<Promoted> {
    if let Some(m) = &policy.member
        && policy.follow.is_some()
    {
        // The daemon here follows the fleet whole, and would not stream
        // one database promoted alone: a live database nobody protects.
        return Err(Error::Refused(format!(
            "policy '{}' follows its fleet whole ([follow]): `dr promote {}` makes this host the primary of every database of it. To fail databases over one at a time, remove [follow] and run `dr follow {}` as a service of its own",
            policy.name, m.policy, m.policy
        )));
    }
    if !path.is_file() {
        return Err(Error::NotFound(format!(
            "policy '{}': there is no database at {} to promote (restore it, or follow the primary there first)",
            policy.name,
            path.display()
        )));
    }
    // Not a quick_check: it reads the whole file, and the time to the
    // first write must not grow with the database. The follower applied
    // whole segments in SQLite transactions, so the copy is consistent;
    // what is checked is that SQLite opens it and reads its schema.
    opens(path)?;
    let from = std::fs::read(ctx.state().follow_pid(&policy.name).with_extension("json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map(|v| {
            format!(
                "generation {} frame {}",
                v["generation"].as_str().unwrap_or("?"),
                v["frame"]
            )
        });
    // The record before the follower stops: a daemon whose follower is
    // released reads the records at once to take the policy up, and
    // without this one it would start following again.
    let (record, targets) = record(ctx, policy, from)?;
    let stopped = stop_follower(ctx, &policy.name)?;
    Ok(Promoted {
        policy: policy.name.clone(),
        path: path.to_path_buf(),
        host: record.host,
        host_id: record.host_id,
        at: record.at,
        follower_stopped: stopped,
        targets,
        databases: None,
    })
}

/// Promotes this host for every database of `fleet`: checks that each
/// copy the pattern finds opens, writes one promotion record for the fleet
/// to every target (it governs the databases the fleet gains later too),
/// and stops the fleet's `dr follow` (the daemon's or a service's).
pub fn promote_fleet(ctx: &Context, fleet: &Policy) -> Result<Promoted> {
    let Some(f) = &fleet.fleet else {
        return promote(ctx, fleet, &fleet.copy_path());
    };
    let members = crate::ops::members::on_disk(fleet)
        .map_err(|e| Error::io(format!("cannot list {}", f.display()), e))?;
    if members.is_empty() {
        return Err(Error::NotFound(format!(
            "policy '{}': no database matches {} to promote (follow the primary there first, or restore the fleet)",
            fleet.name,
            f.display()
        )));
    }
    for m in &members {
        if let crate::config::Source::Sqlite { path } = &m.source {
            opens(path)?;
        }
    }
    let (record, targets) = record(ctx, fleet, None)?;
    let stopped = stop_follower(ctx, &fleet.name)?;
    Ok(Promoted {
        policy: fleet.name.clone(),
        path: f.dir.clone(),
        host: record.host,
        host_id: record.host_id,
        at: record.at,
        follower_stopped: stopped,
        targets,
        databases: Some(members.len()),
    })
}

/// Writes a promotion record naming this host to every target of
/// `policy`; returns it and the targets written.
pub fn record(
    ctx: &Context,
    policy: &Policy,
    from: Option<String>,
) -> Result<(Promotion, Vec<String>)> {
    let record = Promotion {
        format: 1,
        policy: policy.name.clone(),
        host_id: host_id(ctx)?,
        host: crate::lock::hostname(),
        at: Utc::now(),
        from,
        dr_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let key = format!(
        "{}{}-{}.json",
        own_prefix(policy),
        record.at.format("%Y%m%dT%H%M%S%.3fZ"),
        record.host_id
    );
    let bytes = serde_json::to_vec_pretty(&record)
        .map_err(|e| Error::Other(format!("cannot encode the promotion record: {e}")))?;
    let mut targets = Vec::new();
    for t in crate::ops::TargetFilter::All.select(ctx.cfg(), policy)? {
        let storage = ctx.storage(t)?;
        storage.put_bytes(&key, &bytes)?;
        if let Some(current) = current_key(policy) {
            storage.put_bytes(&current, &bytes)?;
        }
        targets.push(t.name.clone());
    }
    Ok((record, targets))
}

/// The copy is a SQLite database whose schema reads.
fn opens(path: &Path) -> Result<()> {
    let bad = |e: rusqlite::Error| Error::Integrity {
        object: path.display().to_string(),
        reason: format!("not a database SQLite opens: {e}"),
    };
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(bad)?;
    c.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(bad)?;
    Ok(())
}

/// Stops the running follower of `policy`, `dr follow`'s or the daemon's:
/// asks through the stop file (and a follower alone in its process also
/// with SIGTERM), then waits for it to exit, at most a minute. The copy is
/// then at a committed state and nothing else writes it.
fn stop_follower(ctx: &Context, policy: &str) -> Result<Option<u32>> {
    let pidfile = ctx.state().follow_pid(policy);
    let Some((pid, shared)) = crate::ops::follow::follower_of(&pidfile) else {
        return Ok(None);
    };
    let stop_file = pidfile.with_extension("stop");
    let _asked = StopFile::write(&stop_file)?;
    if !shared {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while crate::ops::follow::follower_of(&pidfile).is_some() {
        if Instant::now() > deadline {
            return Err(Error::Other(format!(
                "the follower of policy '{policy}' (pid {pid}) did not stop within a minute: stop it, then promote again"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(pid))
}

/// `state_dir/follow/<policy>.stop` while `dr promote` waits for the
/// follower to stop; removed however the wait ends, so that no later
/// follower stops on it.
struct StopFile(PathBuf);

impl StopFile {
    fn write(path: &Path) -> Result<StopFile> {
        std::fs::write(path, b"promote\n")
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        Ok(StopFile(path.to_path_buf()))
    }
}

impl Drop for StopFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
