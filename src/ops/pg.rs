//! PostgreSQL policies: dr drives pgBackRest (setup, backup, restore,
//! verify) and reads its info into the same reports as SQLite backups.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::backup::BackupReport;
use crate::config::{Config, Policy, Source, Target};
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

/// The connection facts of a PostgreSQL policy.
type PgSource<'a> = (&'a Path, Option<&'a Path>, u16, &'a str, Option<&'a str>);

fn pg_source(policy: &Policy) -> Result<PgSource<'_>> {
    match &policy.source {
        Source::Postgres {
            data_dir,
            socket_dir,
            port,
            user,
            run_as,
            ..
        } => Ok((
            data_dir,
            socket_dir.as_deref(),
            *port,
            user,
            run_as.as_deref(),
        )),
        Source::Sqlite { .. } => Err(Error::Other(format!(
            "policy '{}' is a SQLite policy, not PostgreSQL",
            policy.name
        ))),
    }
}

/// Runs SQL through `psql` as the cluster's OS user; `None` when it cannot connect.
fn psql(policy: &Policy, rb: &PgBackRest, sql: &str) -> Result<Option<String>> {
    let (_, socket, port, user, _) = pg_source(policy)?;
    let mut c = match &rb.run_as {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--", "psql"]);
            c
        }
        None => Command::new("psql"),
    };
    if let Some(s) = socket {
        c.arg("-h").arg(s);
    }
    c.args([
        "-p",
        &port.to_string(),
        "-U",
        user,
        "-d",
        "postgres",
        "-XAtq",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
    ]);
    match c.output() {
        Ok(o) if o.status.success() => {
            Ok(Some(String::from_utf8_lossy(&o.stdout).trim().to_string()))
        }
        Ok(o) => {
            tracing::warn!("psql: {}", String::from_utf8_lossy(&o.stderr).trim());
            Ok(None)
        }
        Err(e) => {
            tracing::warn!("cannot run psql: {e}");
            Ok(None)
        }
    }
}

/// Writes the pgBackRest config, turns archiving on, creates the stanza and checks.
pub fn setup(cfg: &Config, policy: &Policy) -> Result<SetupReport> {
    let rb = run::prepare(cfg, policy)?;
    let archive_command = format!(
        "{} --config={} --stanza={} archive-push %p",
        rb.bin.display(),
        rb.conf.display(),
        rb.stanza
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
    let current = psql(
        policy,
        &rb,
        "SELECT current_setting('archive_mode') || ' ' || current_setting('wal_level') || ' ' || current_setting('archive_command')",
    )?;
    match current {
        None => {
            report.todo.push(format!(
                "dr could not connect to PostgreSQL; add to postgresql.conf and restart it:\n  archive_mode = on\n  wal_level = replica\n  archive_command = '{archive_command}'"
            ));
            return Ok(report);
        }
        Some(now) => {
            let mut parts = now.splitn(3, ' ');
            let mode = parts.next().unwrap_or("");
            let level = parts.next().unwrap_or("");
            let cmd = parts.next().unwrap_or("");
            let quoted = archive_command.replace('\'', "''");
            let mut ok = true;
            // ALTER SYSTEM cannot share a transaction: one statement each.
            for sql in [
                "ALTER SYSTEM SET archive_mode = 'on'".to_string(),
                "ALTER SYSTEM SET wal_level = 'replica'".to_string(),
                format!("ALTER SYSTEM SET archive_command = '{quoted}'"),
                "SELECT pg_reload_conf()".to_string(),
            ] {
                ok = ok && psql(policy, &rb, &sql)?.is_some();
            }
            if !ok {
                report.todo.push(format!(
                    "ALTER SYSTEM failed (is user '{}' a superuser?); add to postgresql.conf: archive_mode = on, wal_level = replica, archive_command = '{archive_command}'",
                    pg_source(policy)?.3
                ));
                return Ok(report);
            }
            report.restart_needed = mode != "on" || !(level == "replica" || level == "logical");
            if cmd != archive_command {
                tracing::info!(policy = %policy.name, "archive_command set to run pgBackRest with dr's config");
            }
        }
    }
    rb.run("stanza-create", &["stanza-create"])?;
    if report.restart_needed {
        report.todo.push(
            "restart PostgreSQL (archive_mode/wal_level change only on restart), then run `dr pg setup` again to check".into(),
        );
        return Ok(report);
    }
    rb.run("check", &["check"])?;
    report.checked = true;
    Ok(report)
}

fn backups(rb: &PgBackRest) -> Result<Vec<PgBackup>> {
    let out = rb.run("info", &["info", "--output=json"])?;
    info::parse(&String::from_utf8_lossy(&out.stdout), &rb.stanza).map_err(Error::Other)
}

/// Backs a PostgreSQL policy up to one target with pgBackRest (which
/// then expires by the policy's retention).
pub fn backup(
    cfg: &Config,
    policy: &Policy,
    target: &Target,
    kind: Option<BackupType>,
) -> Result<BackupReport> {
    let started = Instant::now();
    let rb = run::prepare(cfg, policy)?;
    let repo = rb.repo_of(&target.name)?;
    // The label pgBackRest gives a backup is its start time (to the second).
    let started_at = Utc::now() - chrono::Duration::seconds(1);
    let repo_arg = format!("--repo={repo}");
    let type_arg = match kind {
        Some(BackupType::Full) => "--type=full",
        // Without a full pgBackRest takes a full itself, as dr does for SQLite.
        Some(BackupType::Diff) | None => "--type=diff",
    };
    rb.run("backup", &["backup", &repo_arg, type_arg])?;
    let after = backups(&rb)?;
    let Some(new) = after
        .iter()
        .rfind(|b| b.repo as usize == repo && b.start >= started_at)
    else {
        return Err(Error::Other(format!(
            "pgbackrest backup of stanza '{}' reported success but no backup is listed on repo {repo}",
            rb.stanza
        )));
    };
    let kind = if new.kind == "full" {
        BackupType::Full
    } else {
        BackupType::Diff
    };
    let note = (type_arg == "--type=diff" && kind == BackupType::Full)
        .then(|| "no full backup existed in this repository: pgBackRest took a full".to_string());
    Ok(BackupReport {
        policy: policy.name.clone(),
        target: target.name.clone(),
        label: new.label.clone(),
        kind,
        parent: new.prior.clone(),
        page_count: 0,
        pages_stored: 0,
        size: new.size,
        stored_size: new.repo_size.unwrap_or(0),
        seconds: started.elapsed().as_secs_f64(),
        note,
        // pgBackRest expired by retention itself; `dr info` shows what is left.
        expired: Vec::new(),
    })
}

/// One target's PostgreSQL backups, for `dr info`.
pub fn list(cfg: &Config, policy: &Policy, target: &Target) -> Result<Vec<PgBackup>> {
    let rb = run::prepare(cfg, policy)?;
    let repo = rb.repo_of(&target.name)?;
    Ok(backups(&rb)?
        .into_iter()
        .filter(|b| b.repo as usize == repo)
        .collect())
}

/// What a PostgreSQL restore did.
#[derive(Debug, Clone, Serialize)]
pub struct PgRestoreReport {
    pub policy: String,
    pub target: String,
    pub to: PathBuf,
    pub at: Option<DateTime<Utc>>,
    pub backup: Option<String>,
    pub seconds: f64,
    /// How to start the restored cluster.
    pub start: String,
}

/// Restores into an empty directory (or, with `force`, in place over a
/// stopped cluster with a delta restore).
pub fn restore(
    cfg: &Config,
    policy: &Policy,
    target: &Target,
    to: &Path,
    at: Option<DateTime<Utc>>,
    label: Option<&str>,
    force: bool,
) -> Result<PgRestoreReport> {
    let started = Instant::now();
    let (data_dir, _, _, _, run_as) = pg_source(policy)?;
    let rb = run::prepare(cfg, policy)?;
    let repo = rb.repo_of(&target.name)?;
    let in_place = to == data_dir;
    let empty = std::fs::read_dir(to)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    if !empty && !force {
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
    if !in_place {
        // The copy must not archive into the repository it came from.
        args.push("--archive-mode=off".into());
    }
    if !empty {
        args.push("--delta".into());
    }
    match (at, label) {
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
    let user = run_as.unwrap_or("postgres");
    Ok(PgRestoreReport {
        policy: policy.name.clone(),
        target: target.name.clone(),
        to: to.to_path_buf(),
        at,
        backup: label.map(str::to_string),
        seconds: started.elapsed().as_secs_f64(),
        start: format!(
            "start it with: runuser -u {user} -- pg_ctl -D {} -o '-p <free port>' start (it replays WAL to the target, then promotes)",
            to.display()
        ),
    })
}

/// Runs pgBackRest's verify on one repository and reads its output: 2.45
/// exits 0 even when it finds errors.
pub fn verify(cfg: &Config, policy: &Policy, target: &Target) -> Result<String> {
    let rb = run::prepare(cfg, policy)?;
    let repo = rb.repo_of(&target.name)?;
    let out = rb.run(
        "verify",
        &[
            "verify",
            &format!("--repo={repo}"),
            "--output=text",
            "--verbose",
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let bad = text.lines().any(|l| {
        let l = l.trim();
        (l.contains("invalid") || l.contains("missing") || l.contains("error"))
            && !l.ends_with(": 0")
            && !l.contains("checksum invalid: 0")
    });
    if bad {
        return Err(Error::VerifyFailed(format!(
            "pgbackrest verify of stanza '{}' on target '{}' found problems:\n{text}",
            rb.stanza, target.name
        )));
    }
    Ok(text)
}
