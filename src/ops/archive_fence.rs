//! PostgreSQL's half of the fence. A promotion record stops dr's own
//! writers on a host another one was promoted over, but a PostgreSQL
//! primary's WAL reaches the repository without dr: PostgreSQL runs
//! `archive_command` itself, and runs it at once when the old primary's
//! host comes back. `dr pg setup` therefore makes archive_command
//! `dr pg archive-push`, which reads the policy's newest promotion record
//! (`primary.json`) through pgBackRest (its config is what the cluster's
//! user can read; dr.toml and its secret files need not be) and hands the
//! segment to pgBackRest's `archive-push` only while that record names no
//! other host.
//!
//! A refused segment stays in pg_wal: PostgreSQL keeps it and retries, its
//! archiver counts the failure, and dr's verdict on that host says
//! `archive_failing` (the log line below is in PostgreSQL's log). The
//! record is read on every segment, one GET: a returning primary is
//! refused from its first segment, with no cache to go stale.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::ops::promotion::Promotion;

/// What `dr pg setup` puts in archive_command.
#[derive(Debug, Clone)]
pub struct ArchivePush {
    pub policy: String,
    /// The host id this cluster was declared the primary on.
    pub host_id: String,
    pub pgbackrest: PathBuf,
    pub config: PathBuf,
    pub stanza: String,
    /// `%p`: the segment, relative to the data directory.
    pub wal: PathBuf,
}

impl ArchivePush {
    /// The archive_command line (PostgreSQL substitutes `%p`).
    pub fn command_line(
        dr: &std::path::Path,
        policy: &str,
        host_id: &str,
        rb: &crate::pg::run::PgBackRest,
    ) -> String {
        format!(
            "{} pg archive-push {policy} --host-id={host_id} --pgbackrest={} --pgbackrest-config={} --stanza={} %p",
            dr.display(),
            rb.bin.display(),
            rb.conf.display(),
            rb.stanza
        )
    }

    fn pgbackrest(&self) -> Command {
        let mut c = Command::new(&self.pgbackrest);
        c.arg(format!("--config={}", self.config.display()))
            .arg(format!("--stanza={}", self.stanza));
        c
    }
}

/// How long reading the record may take before the segment is refused
/// (PostgreSQL retries it): an archiver stuck on a read archives nothing
/// either, silently.
const READ_DEADLINE: Duration = Duration::from_secs(60);

/// Refuses the segment when another host was promoted, else archives it.
pub fn archive_push(a: &ArchivePush) -> Result<()> {
    if let Some(p) = promoted_elsewhere(a)? {
        return Err(Error::Refused(format!(
            "policy '{}': host {} ({}) was promoted at {}, and this cluster was declared the primary on host {}: it may no longer archive into stanza '{}' (its WAL would fork the history). Segment {} stays in pg_wal. Stop this cluster; to make this host the primary again, follow the new primary (`dr follow {}`) and `dr promote {}` here",
            a.policy,
            p.host,
            p.host_id,
            p.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            a.host_id,
            a.stanza,
            a.wal.display(),
            a.policy,
            a.policy
        )));
    }
    let status = a
        .pgbackrest()
        .arg("archive-push")
        .arg(&a.wal)
        .status()
        .map_err(|e| Error::io(format!("cannot run {}", a.pgbackrest.display()), e))?;
    if status.success() {
        return Ok(());
    }
    Err(Error::Other(format!(
        "policy '{}': pgbackrest archive-push of {} failed ({status}); its error is above",
        a.policy,
        a.wal.display()
    )))
}

/// The policy's newest promotion when it names another host: one GET of
/// the record kept under a fixed name (`promotion::CURRENT`) on the
/// policy's first target (every target holds it).
fn promoted_elsewhere(a: &ArchivePush) -> Result<Option<Promotion>> {
    let failed = |why: String| {
        Error::Other(format!(
            "policy '{}': cannot read the promotion record {} through pgBackRest ({why}), so segment {} is not archived (PostgreSQL retries it)",
            a.policy,
            crate::ops::promotion::CURRENT,
            a.wal.display()
        ))
    };
    let mut child = a
        .pgbackrest()
        // The record alone on stdout, its errors on stderr; exit 1 when
        // there is none (no host was ever promoted).
        .args([
            "--repo=1",
            "--log-level-console=off",
            "--log-level-stderr=error",
            "repo-get",
            "--raw",
            "--ignore-missing",
            crate::ops::promotion::CURRENT,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("cannot run {}", a.pgbackrest.display()), e))?;
    // Both pipes are read on threads, so a full one never stalls the wait.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + READ_DEADLINE;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!(
                    "no answer in {} s",
                    READ_DEADLINE.as_secs()
                )));
            }
            Err(e) => return Err(Error::io("cannot wait for pgbackrest".to_string(), e)),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status.code() {
        Some(0) => {}
        Some(1) => return Ok(None),
        _ => {
            return Err(failed(format!(
                "{status}: {}",
                String::from_utf8_lossy(&stderr).trim()
            )));
        }
    }
    let p: Promotion = serde_json::from_slice(&stdout)
        .map_err(|e| failed(format!("not a promotion record dr reads: {e}")))?;
    Ok((p.host_id != a.host_id).then_some(p))
}

/// Reads a child's pipe to its end on a thread of its own.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut bytes);
        }
        bytes
    })
}
