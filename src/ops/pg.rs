//! PostgreSQL policies: dr drives pgBackRest (setup, backup, restore,
//! verify) and reads its info into the same reports as SQLite backups.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::report::{BackupKind, BackupReport, Expired, RestoreReport, Verified};
use super::restore::RestoreOptions;
use crate::config::{PgSource, Policy, Target};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::pg::info::{self, PgBackup};
use crate::pg::run::{self, PgBackRest};
use crate::repo::BackupType;

/// What `dr pg setup` did and what is left to the user.
#[derive(Debug, Clone, Serialize)]
pub struct SetupReport {
    pub policy: String,
    pub stanza: String,
    pub config: PathBuf,
    pub archive_command: String,
    /// Settings changed with ALTER SYSTEM that need a restart of PostgreSQL.
    pub restart_needed: bool,
    /// `check` passed: WAL reaches every repository.
    pub checked: bool,
    /// What to do by hand, when dr could not.
    pub todo: Vec<String>,
}

/// Runs SQL through `psql` as the cluster's OS user; `None` when it
/// cannot connect (logged).
fn psql(pg: &PgSource, sql: &str) -> Option<String> {
    crate::pg::psql::query(pg, sql)
        .inspect_err(|e| tracing::warn!("psql: {e}"))
        .ok()
}

/// Waits while the cluster replays WAL: a restored cluster takes writes
/// (ALTER SYSTEM, pgBackRest's check) only once its recovery has ended.
/// A cluster that cannot be reached is left to the caller to report.
fn wait_out_recovery(pg: &PgSource) -> Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(600);
    let mut said = false;
    while crate::pg::psql::query(pg, "SELECT pg_is_in_recovery()").is_ok_and(|r| r == "t") {
        if !said {
            tracing::info!(stanza = %pg.stanza, "PostgreSQL is still in recovery (replaying WAL): waiting for it to end");
            said = true;
        }
        if Instant::now() > deadline {
            return Err(Error::Other(format!(
                "PostgreSQL (stanza '{}') stayed in recovery for 10 minutes: a standby must be promoted (pg_ctl promote) before `dr pg setup` declares it the primary",
                pg.stanza
            )));
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    Ok(())
}

/// Writes the pgBackRest config, turns archiving on, creates the stanza and checks.
pub fn setup(ctx: &Context, policy: &Policy, pg: &PgSource) -> Result<SetupReport> {
    // Another host promoted over this one: declaring this cluster the
    // primary again is `dr promote`'s to do, never a re-run of setup (a
    // configuration tool runs setup on every host).
    for t in crate::ops::TargetFilter::All.select(ctx.cfg(), policy)? {
        crate::ops::promotion::fence(ctx, policy, ctx.storage(t)?.as_ref())?;
    }
    let rb = run::prepare(ctx.cfg(), ctx.state(), policy, pg)?;
    let dr = std::env::current_exe()
        .map_err(|e| Error::io("cannot find dr's own binary for archive_command", e))?;
    let archive_command = crate::ops::archive_fence::ArchivePush::command_line(
        &dr,
        &policy.name,
        &crate::ops::promotion::host_id(ctx)?,
        &rb,
    );
    let mut report = SetupReport {
        policy: policy.name.clone(),
        stanza: rb.stanza.clone(),
        config: rb.conf.clone(),
        archive_command: archive_command.clone(),
        restart_needed: false,
        checked: false,
        todo: Vec::new(),
    };
    wait_out_recovery(pg)?;
    let current = psql(
        pg,
        "SELECT current_setting('archive_mode') || '|' || current_setting('wal_level') || '|' || current_setting('archive_timeout') || '|' || current_setting('archive_command')",
    );
    // The repository first: PostgreSQL is changed only once pgBackRest has
    // shown it can write there (a wrong bucket or key leaves the cluster
    // as it was, not archiving into nowhere).
    if current.is_some() {
        rb.run("stanza-create", &["stanza-create"])?;
    }
    let timeout = format!("{}s", pg.archive_timeout.as_secs().max(1));
    // What to put back if the final check fails (the settings a reload
    // applies; the others only change on a restart, before which no check
    // runs).
    let undo: Vec<String>;
    match current {
        None => {
            report.todo.push(format!(
                "dr could not connect to PostgreSQL; add to postgresql.conf and restart it:\n  archive_mode = on\n  wal_level = replica\n  archive_command = '{archive_command}'\n  archive_timeout = '{timeout}'"
            ));
            return Ok(report);
        }
        Some(now) => {
            let mut parts = now.splitn(4, '|');
            let mode = parts.next().unwrap_or("");
            let level = parts.next().unwrap_or("");
            let was_timeout = parts.next().unwrap_or("");
            let cmd = parts.next().unwrap_or("");
            undo = vec![
                format!(
                    "ALTER SYSTEM SET archive_command = '{}'",
                    cmd.replace('\'', "''")
                ),
                format!(
                    "ALTER SYSTEM SET archive_timeout = '{}'",
                    was_timeout.replace('\'', "''")
                ),
                "SELECT pg_reload_conf()".to_string(),
            ];
            let quoted = archive_command.replace('\'', "''");
            let mut ok = true;
            // ALTER SYSTEM cannot share a transaction: one statement each.
            for sql in [
                "ALTER SYSTEM SET archive_mode = 'on'".to_string(),
                "ALTER SYSTEM SET wal_level = 'replica'".to_string(),
                format!("ALTER SYSTEM SET archive_command = '{quoted}'"),
                // A commit waits at most this long in an unfinished
                // segment before it is archived: the RPO.
                format!("ALTER SYSTEM SET archive_timeout = '{timeout}'"),
                "SELECT pg_reload_conf()".to_string(),
            ] {
                ok = ok && psql(pg, &sql).is_some();
            }
            if !ok {
                report.todo.push(format!(
                    "ALTER SYSTEM failed (is user '{}' a superuser?); add to postgresql.conf: archive_mode = on, wal_level = replica, archive_command = '{archive_command}', archive_timeout = '{timeout}'",
                    pg.user
                ));
                return Ok(report);
            }
            report.restart_needed = mode != "on" || !(level == "replica" || level == "logical");
            if cmd != archive_command {
                tracing::info!(policy = %policy.name, "archive_command set to run pgBackRest with dr's config");
            }
        }
    }
    if report.restart_needed {
        report.todo.push(
            "restart PostgreSQL (archive_mode/wal_level change only on restart), then run `dr pg setup` again to check".into(),
        );
        return Ok(report);
    }
    if let Err(e) = rb.run("check", &["check"]) {
        // Archiving that does not work would fill pg_wal: the cluster goes
        // back to what it archived with before.
        let restored = undo.iter().all(|sql| psql(pg, sql).is_some());
        return Err(Error::Other(format!(
            "{e}; {}",
            if restored {
                "PostgreSQL's archive_command and archive_timeout were put back as they were"
            } else {
                "putting PostgreSQL's archive_command back failed too: check it by hand"
            }
        )));
    }
    report.checked = true;
    Ok(report)
}

fn backups(rb: &PgBackRest, repo: usize) -> Result<Vec<PgBackup>> {
    let out = rb.run("info", &["info", "--output=json"])?;
    Ok(
        info::parse(&String::from_utf8_lossy(&out.stdout), &rb.stanza)
            .map_err(Error::Other)?
            .into_iter()
            .filter(|b| b.repo as usize == repo)
            .collect(),
    )
}

/// pgBackRest's backup type as dr reports it.
pub(crate) fn kind_of(b: &PgBackup) -> Result<BackupKind> {
    BackupKind::from_word(&b.kind).ok_or_else(|| {
        Error::Other(format!(
            "pgbackrest lists backup {} with type '{}', which this dr does not know",
            b.label, b.kind
        ))
    })
}

/// Backs a PostgreSQL policy up to one target with pgBackRest (which
/// then expires by the policy's retention).
pub fn backup(
    ctx: &Context,
    policy: &Policy,
    pg: &PgSource,
    target: &Target,
    kind: Option<BackupType>,
) -> Result<BackupReport> {
    let started = Instant::now();
    crate::ops::promotion::fence(ctx, policy, ctx.storage(target)?.as_ref())?;
    let rb = run::prepare(ctx.cfg(), ctx.state(), policy, pg)?;
    let repo = rb.repo_of(&target.name)?;
    let before: Vec<String> = backups(&rb, repo)?.into_iter().map(|b| b.label).collect();
    let repo_arg = format!("--repo={repo}");
    let type_arg = match kind {
        Some(BackupType::Full) => "--type=full",
        // Without a full pgBackRest takes a full itself, as dr does for SQLite.
        Some(BackupType::Diff) | None => "--type=diff",
    };
    rb.run("backup", &["backup", &repo_arg, type_arg])?;
    let after = backups(&rb, repo)?;
    let Some(new) = after.iter().rfind(|b| !before.contains(&b.label)) else {
        return Err(Error::Other(format!(
            "pgbackrest backup of stanza '{}' reported success but no new backup is listed on repo {repo}",
            rb.stanza
        )));
    };
    let kind = kind_of(new)?;
    let note = (type_arg == "--type=diff" && kind == BackupKind::Full)
        .then(|| "no full backup existed in this repository: pgBackRest took a full".to_string());
    // pgBackRest expired by retention itself: what it removed is what is gone.
    let expired = before
        .into_iter()
        .filter(|l| !after.iter().any(|b| &b.label == l))
        .collect();
    Ok(BackupReport {
        policy: policy.name.clone(),
        target: target.name.clone(),
        label: new.label.clone(),
        kind,
        parent: new.prior.clone(),
        pages: None,
        size: new.delta,
        stored_size: new.repo_delta.unwrap_or(0),
        seconds: started.elapsed().as_secs_f64(),
        note,
        expired,
    })
}

/// What one target holds of a PostgreSQL policy.
pub struct PgListing {
    pub backups: Vec<PgBackup>,
    /// The newest WAL segment in the repository and when it was stored:
    /// how far a point-in-time restore from this target reaches.
    pub newest_wal: Option<ArchivedWal>,
}

/// The newest archived WAL segment of a repository.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArchivedWal {
    pub segment: String,
    /// When the repository stored it (`None` when it gives no time).
    pub stored: Option<DateTime<Utc>>,
}

/// One target's PostgreSQL backups and newest archived WAL, for `dr info`.
/// Read-only: it uses the pgBackRest configuration that setup or the last
/// backup wrote, or the same settings passed in the environment.
pub fn list(ctx: &Context, policy: &Policy, pg: &PgSource, target: &Target) -> Result<PgListing> {
    let rb = run::read_only(ctx.cfg(), ctx.state(), policy, pg)?;
    let repo = rb.repo_of(&target.name)?;
    let out = rb.run("info", &["info", "--output=json"])?;
    let json = String::from_utf8_lossy(&out.stdout);
    let backups = info::parse(&json, &rb.stanza)
        .map_err(Error::Other)?
        .into_iter()
        .filter(|b| b.repo as usize == repo)
        .collect();
    let newest = info::newest_wal(&json, &rb.stanza)
        .map_err(Error::Other)?
        .into_iter()
        .find(|w| w.repo as usize == repo);
    // When the repository stored that segment: its object's time, read
    // with dr's own storage client (one listing of one name). pgBackRest
    // keeps the repository under `<policy>/pgbackrest` on the target.
    let newest_wal = match newest {
        None => None,
        Some(w) => {
            let key = format!("{}/pgbackrest/{}/{}", policy.name, w.dir, w.segment);
            let stored = ctx
                .storage(target)?
                .list(&key)?
                .into_iter()
                .map(|o| o.modified)
                .max();
            Some(ArchivedWal {
                segment: w.segment,
                stored,
            })
        }
    };
    Ok(PgListing {
        backups,
        newest_wal,
    })
}

/// Restores into an empty directory (or, with `force`, in place over a
/// stopped cluster with a delta restore).
pub fn restore(
    ctx: &Context,
    policy: &Policy,
    pg: &PgSource,
    target: &Target,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let to = opts.to.as_path();
    let rb = run::prepare(ctx.cfg(), ctx.state(), policy, pg)?;
    let repo = rb.repo_of(&target.name)?;
    // An instant before every backup cannot be reached: said as not
    // found (exit 5) naming the oldest reachable instant, before anything
    // is written, rather than as pgBackRest's failure.
    if let Some(at) = opts.at {
        let oldest = backups(&rb, repo)?
            .into_iter()
            .filter(|b| !b.error)
            .map(|b| b.stop)
            .min();
        match oldest {
            Some(stop) if stop > at => {
                return Err(Error::NotFound(format!(
                    "no backup of policy '{}' on target '{}' ends before {}: the oldest ends at {}; choose --at at or after it",
                    policy.name,
                    target.name,
                    at.to_rfc3339(),
                    stop.to_rfc3339()
                )));
            }
            None => {
                return Err(Error::NotFound(format!(
                    "policy '{}' has no backup on target '{}' yet",
                    policy.name, target.name
                )));
            }
            Some(_) => {}
        }
    }
    let in_place = to == pg.data_dir;
    let empty = std::fs::read_dir(to)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    if !empty && !opts.force {
        return Err(Error::Refused(format!(
            "{} is not empty: dr restores PostgreSQL into an empty directory, or in place over a stopped cluster with --force",
            to.display()
        )));
    }
    if to.join("postmaster.pid").exists() {
        return Err(Error::Refused(format!(
            "{} holds a running cluster (postmaster.pid exists): stop PostgreSQL first",
            to.display()
        )));
    }
    std::fs::create_dir_all(to)
        .map_err(|e| Error::io(format!("cannot create {}", to.display()), e))?;
    if let Some(u) = &rb.run_as {
        let _ = Command::new("chown").args([u.as_str()]).arg(to).status();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("cannot chmod {}", to.display()), e))?;
    let mut args: Vec<String> = vec![
        "restore".into(),
        format!("--repo={repo}"),
        format!("--pg1-path={}", to.display()),
    ];
    // No restore archives into the repository it came from, not even one
    // at the policy's own path: it may be a drill, or the wrong instant.
    // `dr pg setup POLICY` declares it the new primary (archiving on, on
    // its new timeline). A standby keeps archive_mode as it was: it does
    // not archive while it replays, and once `dr promote` ends its recovery
    // it archives its new timeline with no restart.
    if opts.standby {
        args.push("--type=standby".into());
    } else {
        args.push("--archive-mode=off".into());
    }
    if !empty {
        args.push("--delta".into());
    }
    match (opts.at, &opts.backup) {
        (Some(t), _) => {
            args.push("--type=time".into());
            args.push(format!("--target={}", t.format("%Y-%m-%d %H:%M:%S%.6f+00")));
            args.push("--target-action=promote".into());
        }
        (None, Some(l)) => {
            args.push(format!("--set={l}"));
            args.push("--type=immediate".into());
            args.push("--target-action=promote".into());
        }
        (None, None) => {}
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    rb.run("restore", &refs)?;
    let user = pg.run_as.as_deref().unwrap_or("postgres");
    Ok(RestoreReport {
        policy: policy.name.clone(),
        target: target.name.clone(),
        label: opts.backup.clone(),
        chain: Vec::new(),
        wal: None,
        at: opts.at,
        to: to.to_path_buf(),
        bytes: None,
        seconds: started.elapsed().as_secs_f64(),
        proof: None,
        next_step: Some(if opts.standby {
            format!(
                "start it with: runuser -u {user} -- pg_ctl -D {} start: a standby, read-only, replaying the archive as segments arrive (restore_command runs pgBackRest's archive-get). `dr promote {}` makes it the primary",
                to.display(),
                policy.name
            )
        } else if in_place {
            format!(
                "start it with: runuser -u {user} -- pg_ctl -D {} start (it replays WAL to the target, then promotes; it does not archive). Once it is the primary you keep, run `dr promote {}`: it records this host as the primary (the old one is fenced) and turns archiving on into the repository",
                to.display(),
                policy.name
            )
        } else {
            format!(
                "start it with: runuser -u {user} -- pg_ctl -D {} -o '-p <free port>' start (it replays WAL to the target, then promotes; it does not archive)",
                to.display()
            )
        }),
    })
}

/// Promotes the policy's standby (`pg_ctl promote` as the cluster's
/// user), then declares it the primary as `dr pg setup` does: archiving
/// into the same stanza, on its new timeline.
pub fn promote(ctx: &Context, policy: &Policy, pg: &PgSource) -> Result<SetupReport> {
    match crate::pg::psql::query(pg, "SELECT pg_is_in_recovery()") {
        // A restored cluster (no standby.signal) replays to its target and
        // promotes itself: promoting it now would cut its recovery short of
        // WAL the archive holds. `declare` waits it out (in setup).
        Ok(r) if r == "t" && !pg.data_dir.join("standby.signal").exists() => {
            tracing::info!(policy = %policy.name, "PostgreSQL is recovering to its restore target: waiting for it to end, then declaring it");
            return declare(ctx, policy, pg);
        }
        Ok(r) if r == "t" => {}
        Ok(_) => {
            tracing::info!(policy = %policy.name, "PostgreSQL is not in recovery: already a primary; declaring it");
            return declare(ctx, policy, pg);
        }
        Err(e) => {
            return Err(Error::Other(format!(
                "policy '{}': the standby at {} does not answer on port {} ({e}): start it first",
                policy.name,
                pg.data_dir.display(),
                pg.port
            )));
        }
    }
    let mut c = match pg.run_as.as_ref().filter(|_| run::is_root()) {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--", "pg_ctl"]);
            c
        }
        None => Command::new("pg_ctl"),
    };
    let out = c
        .arg("promote")
        .arg("-D")
        .arg(&pg.data_dir)
        .args(["-w", "-t", "120"])
        .output()
        .map_err(|e| Error::io("cannot run pg_ctl".to_string(), e))?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "pg_ctl promote of {} failed: {}",
            pg.data_dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    declare(ctx, policy, pg)
}

/// Records this host as the primary (the fence: the old primary's
/// archive_command, backups and expire are refused from now on), then
/// sets archiving up for it.
fn declare(ctx: &Context, policy: &Policy, pg: &PgSource) -> Result<SetupReport> {
    wait_out_recovery(pg)?;
    crate::ops::promotion::record(ctx, policy, None)?;
    setup(ctx, policy, pg)
}

/// Runs pgBackRest's verify on one repository. Failure is its exit status
/// or, since 2.45 exits 0 when it finds damage, what its report says.
pub fn verify(ctx: &Context, policy: &Policy, pg: &PgSource, target: &Target) -> Result<Verified> {
    let started = Instant::now();
    let rb = run::prepare(ctx.cfg(), ctx.state(), policy, pg)?;
    let repo = rb.repo_of(&target.name)?;
    let out = rb
        .run(
            "verify",
            &[
                "verify",
                &format!("--repo={repo}"),
                "--output=text",
                "--verbose",
            ],
        )
        .map_err(|e| Error::VerifyFailed(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    tracing::debug!(policy = %policy.name, target = %target.name, "pgbackrest verify:\n{text}");
    let problems = verify_problems(&text);
    if !problems.is_empty() {
        return Err(Error::VerifyFailed(format!(
            "pgbackrest verify of stanza '{}' on target '{}' found problems: {}",
            rb.stanza,
            target.name,
            problems.join("; ")
        )));
    }
    Ok(Verified {
        policy: policy.name.clone(),
        target: target.name.clone(),
        label: "repository".into(),
        ok: true,
        seconds: started.elapsed().as_secs_f64(),
        backups_read: None,
        segments_read: None,
        restored: Vec::new(),
        without_key: false,
        drills: None,
        frames_sampled: None,
    })
}

/// What pgBackRest's text verify report says is wrong: a status other than
/// `ok`, and every non-zero count of missing or invalid files. A report
/// without a status line is a problem too (dr cannot tell it passed).
fn verify_problems(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut status = None;
    for line in text.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix("status:") {
            status = Some(s.trim().to_string());
            if s.trim() != "ok" {
                out.push(line.to_string());
            }
        }
        for field in line.split(',').map(str::trim) {
            let Some((name, n)) = field.rsplit_once(':') else {
                continue;
            };
            let counted = ["missing", "checksum invalid", "size invalid", "other"];
            let bad_count =
                counted.contains(&name.trim()) && n.trim().parse::<u64>().is_ok_and(|n| n > 0);
            // A backup's own status: `valid`, else what is wrong with it.
            let bad_status =
                name.trim() == "status" && !line.starts_with("status:") && n.trim() != "valid";
            if bad_count || bad_status {
                out.push(line.to_string());
                break;
            }
        }
    }
    if status.is_none() {
        out.push(format!(
            "its report has no status line: {}",
            text.lines().next().unwrap_or("(empty)")
        ));
    }
    out.dedup();
    out
}

/// Runs pgBackRest's expire on one repository, with the retention the
/// policy configures now. Reports the backups it removed (with `dry_run`,
/// the ones it would remove, read from its `[DRY-RUN]` lines).
pub fn expire(
    ctx: &Context,
    policy: &Policy,
    pg: &PgSource,
    target: &Target,
    dry_run: bool,
) -> Result<Vec<Expired>> {
    if !dry_run {
        crate::ops::promotion::fence(ctx, policy, ctx.storage(target)?.as_ref())?;
    }
    let rb = run::prepare(ctx.cfg(), ctx.state(), policy, pg)?;
    let repo = rb.repo_of(&target.name)?;
    let before = backups(&rb, repo)?;
    let repo_arg = format!("--repo={repo}");
    let mut args = vec!["expire", repo_arg.as_str()];
    if dry_run {
        args.extend(["--dry-run", "--log-level-console=info"]);
    }
    let out = rb.run("expire", &args)?;
    let gone: Vec<&PgBackup> = if dry_run {
        let text = String::from_utf8_lossy(&out.stdout);
        let named: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("expire") && l.contains("backup"))
            .flat_map(|l| l.split(|c: char| c == ',' || c.is_whitespace()))
            .collect();
        before
            .iter()
            .filter(|b| named.contains(&b.label.as_str()))
            .collect()
    } else {
        let after = backups(&rb, repo)?;
        before
            .iter()
            .filter(|b| !after.iter().any(|a| a.label == b.label))
            .collect()
    };
    let keep = |n: Option<u32>| n.map_or("all".to_string(), |n| n.to_string());
    let reason = format!(
        "beyond retention (full = {}, diff = {}): pgBackRest expire",
        keep(policy.retention.full),
        keep(policy.retention.diff)
    );
    Ok(gone
        .into_iter()
        .map(|b| {
            if !dry_run {
                tracing::info!(policy = %policy.name, target = %target.name, label = %b.label, "expired: {reason}");
            }
            Expired {
                policy: policy.name.clone(),
                target: target.name.clone(),
                label: b.label.clone(),
                reason: reason.clone(),
                removed: !dry_run,
                kept: false,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::verify_problems;

    #[test]
    fn verify_report_is_read_not_grepped() {
        let ok = "stanza: main\nstatus: ok\n  archiveId: 15-1, total WAL checked: 3, total valid WAL: 3\n    missing: 0, checksum invalid: 0, size invalid: 0, other: 0\n";
        assert!(verify_problems(ok).is_empty(), "{:?}", verify_problems(ok));
        let bad = "stanza: main\nstatus: error\n  backup: 20261122-072104F, status: invalid, total files checked: 9, total valid files: 8\n    missing: 0, checksum invalid: 1, size invalid: 0, other: 0\n";
        let p = verify_problems(bad);
        assert!(p.iter().any(|l| l.contains("checksum invalid: 1")), "{p:?}");
        assert!(p.iter().any(|l| l == "status: error"), "{p:?}");
        assert!(p.iter().any(|l| l.contains("status: invalid")), "{p:?}");
        let real = "stanza: main\nstatus: ok\n  archiveId: 15-1, total WAL checked: 5, total valid WAL: 5\n    missing: 0, checksum invalid: 0, size invalid: 0, other: 0\n  backup: 20261125-152936F_20261125-152939I, status: valid, total files checked: 977, total valid files: 977\n    missing: 0, checksum invalid: 0, size invalid: 0, other: 0\n";
        assert!(
            verify_problems(real).is_empty(),
            "{:?}",
            verify_problems(real)
        );
        // A line that merely contains the word "error" is not a failure.
        let fine = "stanza: error-logs\nstatus: ok\n";
        assert!(verify_problems(fine).is_empty());
        assert!(!verify_problems("").is_empty(), "no report is no pass");
    }
}
