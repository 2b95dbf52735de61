//! `dr config validate`: beyond parsing, checks what the configuration
//! points at, so "ok" means a backup can run: key and secret files exist,
//! are private, are not empty and parse; SQLite sources exist; local target
//! paths can be created and written; a PostgreSQL cluster answers (a
//! warning when it does not: it may just be down). Every problem at once.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, Source, TargetKind};
use crate::error::Error;
use crate::keys;

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// `error` (the config cannot back up), `warning`, or `note` (how
    /// this host will work, as the operator may not expect).
    pub severity: &'static str,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(
                f,
                "{}:{l}: {}: {}",
                self.file.display(),
                self.severity,
                self.message
            ),
            None => write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.severity,
                self.message
            ),
        }
    }
}

/// The line of the first `key =` in `file` (after the line `[section]`
/// when one is given), for messages.
fn line_of(file: &Path, section: Option<&str>, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(file).ok()?;
    let start = match section {
        Some(s) => text.lines().position(|l| l.trim() == format!("[{s}]"))?,
        None => 0,
    };
    text.lines()
        .enumerate()
        .skip(start)
        .find(|(_, l)| {
            let l = l.trim_start();
            l.starts_with(key) && l[key.len()..].trim_start().starts_with('=')
        })
        .map(|(i, _)| i + 1)
}

struct Findings(Vec<Finding>);

impl Findings {
    fn error(&mut self, file: &Path, key: &str, message: String) {
        let (section, key) = match key.rsplit_once(' ') {
            Some((s, k)) => (Some(s), k),
            None => (None, key),
        };
        self.0.push(Finding {
            file: file.to_path_buf(),
            line: line_of(file, section, key),
            severity: "error",
            message,
        });
    }
    fn warning(&mut self, file: &Path, key: &str, message: String) {
        self.0.push(Finding {
            file: file.to_path_buf(),
            line: line_of(file, None, key),
            severity: "warning",
            message,
        });
    }
    fn note(&mut self, file: &Path, key: &str, message: String) {
        self.0.push(Finding {
            file: file.to_path_buf(),
            line: line_of(file, None, key),
            severity: "note",
            message,
        });
    }
}

/// Checks every file and path `cfg` refers to.
pub fn check(cfg: &Config) -> Vec<Finding> {
    let mut f = Findings(Vec::new());
    let main = cfg.file.as_path();
    let enc = &cfg.encryption;
    if cfg.policies.iter().any(|p| p.encrypted)
        && let Err(e) = keys::sealing(enc, true)
    {
        let key = if enc.passphrase_file.is_some() {
            "passphrase_file"
        } else {
            "recipients_file"
        };
        f.error(main, key, e.to_string());
    }
    if let Some(id) = &enc.identity_file
        && let Err(e) = keys::read_identity_file(id)
    {
        f.error(main, "identity_file", e.to_string());
    }
    // Production without the key (as the README advises): a scheduled
    // verify checks without it; the drill is the key holder's to run.
    if enc.identity_file.is_none() && enc.passphrase_file.is_none() {
        for p in cfg
            .policies
            .iter()
            .filter(|p| p.encrypted && p.schedule.verify.is_some())
            .filter(|p| matches!(p.source, crate::config::Source::Sqlite { .. }))
        {
            f.note(
                &p.file,
                "verify",
                format!(
                    "policy '{}': this host keeps no key, so its scheduled verify checks the stored objects without it; the restore drill runs where the key is (`dr verify` there, README \"Drills where the key lives\"), and this host reports drill_overdue if none passed within the verify schedule's period",
                    p.name
                ),
            );
        }
    }
    // A standby decrypts every segment it applies: without the key the
    // daemon's follower could only fail.
    if enc.identity_file.is_none() && enc.passphrase_file.is_none() {
        for p in cfg
            .policies
            .iter()
            .filter(|p| p.encrypted && p.follow.is_some())
        {
            f.error(
                &p.file,
                "follow",
                format!(
                    "policy '{}' says [follow], and the standby decrypts what it applies: set [encryption] identity_file (or passphrase_file) in dr.toml on this host",
                    p.name
                ),
            );
        }
    }
    if let Some(token) = &cfg.daemon_token_file
        && let Err(e) = crate::secret::read_secret(token)
    {
        f.error(main, "daemon.token_file", e.to_string());
    }
    for t in cfg.targets.values() {
        match &t.kind {
            TargetKind::Local { path } => {
                if let Err(why) = writable(path) {
                    let at = format!("targets.{} path", t.name);
                    f.error(main, &at, format!("target '{}': {why}", t.name));
                }
            }
            TargetKind::S3(s) => {
                for (key, file) in [
                    ("access_key_id_file", &s.access_key_id_file),
                    ("secret_access_key_file", &s.secret_access_key_file),
                    ("ca_file", &s.ca_file),
                ] {
                    let Some(file) = file else { continue };
                    let read = if key == "ca_file" {
                        std::fs::read(file).map(|_| ()).map_err(|e| {
                            format!("{}: {}", file.display(), crate::error::io_reason(&e))
                        })
                    } else {
                        crate::secret::read_secret(file)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    };
                    if let Err(why) = read {
                        let at = format!("targets.{} {key}", t.name);
                        f.error(main, &at, format!("target '{}': {why}", t.name));
                    }
                }
            }
        }
    }
    for p in &cfg.policies {
        if let Some(fleet) = &p.fleet {
            match fleet.scan_all() {
                Ok(scan) => {
                    for file in &scan.unnamed {
                        f.error(
                            &p.file,
                            "path",
                            format!(
                                "policy '{}': {} matches {} but no database name stands for it (not UTF-8, or nothing where '*' is): it would not be backed up; rename it",
                                p.name,
                                file.display(),
                                fleet.display()
                            ),
                        );
                    }
                    for (name, path) in &scan.members {
                        if let Some(why) = unstreamable(p, path) {
                            f.error(
                                &p.file,
                                "enabled",
                                format!("policy '{}' database '{name}': {why}", p.name),
                            );
                        }
                    }
                    if scan.members.is_empty() && scan.unnamed.is_empty() {
                        f.warning(
                            &p.file,
                            "path",
                            format!(
                                "policy '{}': no database matches {} yet (each one that appears is backed up and streamed)",
                                p.name,
                                fleet.display()
                            ),
                        );
                    }
                }
                Err(e) => f.error(
                    &p.file,
                    "path",
                    format!(
                        "policy '{}': cannot list {}: {}",
                        p.name,
                        fleet.dir.display(),
                        crate::error::io_reason(&e)
                    ),
                ),
            }
            continue;
        }
        match &p.source {
            Source::Sqlite { path } => match std::fs::metadata(path) {
                Ok(m) if m.is_file() => {
                    if let Some(why) = unstreamable(p, path) {
                        f.error(&p.file, "enabled", format!("policy '{}': {why}", p.name));
                    }
                }
                Ok(_) => f.error(
                    &p.file,
                    "path",
                    format!(
                        "policy '{}': {} is not a regular file",
                        p.name,
                        path.display()
                    ),
                ),
                // Missing, it may be what is about to be restored (a new
                // host after a disaster): said, not refused. Backups fail,
                // loudly, until it exists.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.parent().is_some_and(Path::is_dir) => f.warning(
                    &p.file,
                    "path",
                    format!(
                        "policy '{}': the database {} does not exist (yet): backups fail until it does; on a new host, restore it first (README: Disaster recovery), or correct the path",
                        p.name,
                        path.display()
                    ),
                ),
                Err(e) => f.error(
                    &p.file,
                    "path",
                    format!(
                        "policy '{}': the database {}: {}",
                        p.name,
                        path.display(),
                        crate::error::io_reason(&e)
                    ),
                ),
            },
            Source::Postgres(pg) => {
                match &pg.cipher_pass_file {
                    Some(file) => {
                        if let Err(e) = crate::secret::read_secret(file) {
                            f.error(&p.file, "cipher_pass_file", e.to_string());
                        }
                    }
                    None if p.encrypted => f.error(
                        &p.file,
                        "kind",
                        format!(
                            "policy '{}': PostgreSQL backups are encrypted by pgBackRest: set [source] cipher_pass_file, or encryption = \"none\"",
                            p.name
                        ),
                    ),
                    None => {}
                }
                if !pg.data_dir.is_dir() {
                    f.warning(
                        &p.file,
                        "data_dir",
                        format!(
                            "policy '{}': {} is not a directory on this host (fine if the cluster runs elsewhere only for restores)",
                            p.name,
                            pg.data_dir.display()
                        ),
                    );
                }
                // archive_command runs as the cluster's user: it runs dr
                // itself (`dr pg archive-push`, the fence), which reads
                // pgBackRest's config under state_dir. A mode that stops
                // either stops archiving, silently until the next backup.
                if let Some(user) = pg.run_as.as_deref()
                    && let Ok((u, g)) = crate::pg::run::user_ids(user)
                {
                    // `pg/` itself dr opens to the user (0711).
                    let pg_dir = crate::state_dir::StateDir::new(&cfg.state_dir)
                        .root()
                        .join("pg");
                    if let Some(why) = crate::pg::run::blocked_for(&pg_dir, u, g) {
                        f.error(
                            &p.file,
                            "run_as",
                            format!(
                                "policy '{}': PostgreSQL's archive_command runs as '{user}' and reads pgBackRest's config under state_dir, but {why}: let it pass through (chmod o+x, or under the shipped systemd unit StateDirectoryMode=0711)",
                                p.name
                            ),
                        );
                    }
                    if let Ok(exe) = std::env::current_exe()
                        && let Some(why) = crate::pg::run::blocked_for(&exe, u, g)
                    {
                        f.error(
                            &p.file,
                            "run_as",
                            format!(
                                "policy '{}': PostgreSQL's archive_command runs this dr ({}) as '{user}', but {why}: install dr where every user can run it (/usr/local/bin)",
                                p.name,
                                exe.display()
                            ),
                        );
                    }
                }
                if !cluster_answers(pg) {
                    f.warning(
                        &p.file,
                        "port",
                        format!(
                            "policy '{}': PostgreSQL does not answer on port {} (down, or not reachable as user '{}'): backups fail until it does",
                            p.name, pg.port, pg.user
                        ),
                    );
                }
            }
        }
    }
    f.0
}

/// Why a database of a WAL-streamed policy cannot be streamed, read from
/// its header (no connection is opened): it is not in WAL mode.
fn unstreamable(p: &crate::config::Policy, path: &Path) -> Option<String> {
    if !p.wal.enabled {
        return None;
    }
    crate::ops::verdict::not_streamable(path).ok().flatten()
}

/// Whether `path` exists as a writable directory, or can be created: its
/// nearest existing ancestor is a directory a file can be created in.
fn writable(path: &Path) -> Result<(), String> {
    let mut at = path;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(format!(
                    "{} cannot be created: {} is a file, not a directory",
                    path.display(),
                    at.display()
                ));
            }
            Err(_) => match at.parent() {
                Some(p) if !p.as_os_str().is_empty() => at = p,
                _ => {
                    return Err(format!(
                        "{} has no existing parent directory",
                        path.display()
                    ));
                }
            },
        }
    }
    tempfile::tempfile_in(at).map(|_| ()).map_err(|e| {
        format!(
            "{} is not writable here ({}): {}",
            path.display(),
            at.display(),
            crate::error::io_reason(&e)
        )
    })
}

/// `pg_isready` on the policy's socket and port.
fn cluster_answers(pg: &crate::config::PgSource) -> bool {
    let mut c = std::process::Command::new("pg_isready");
    if let Some(s) = &pg.socket_dir {
        c.arg("-h").arg(s);
    }
    c.args(["-p", &pg.port.to_string(), "-t", "3"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The findings as the command's result: errors make it a configuration
/// error (exit 2) listing them all.
pub fn into_result(findings: &[Finding]) -> Result<(), Error> {
    let errors: Vec<crate::error::Diagnostic> = findings
        .iter()
        .filter(|f| f.severity == "error")
        .map(|f| crate::error::Diagnostic {
            file: f.file.clone(),
            line: f.line,
            message: f.message.clone(),
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(errors))
    }
}
