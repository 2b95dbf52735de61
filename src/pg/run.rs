//! Running pgBackRest for a policy: its configuration file written fresh
//! from dr's config, and every command run as the cluster's OS user.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use age::secrecy::ExposeSecret;

use super::conf::{self, PgConf, Repo, S3Repo};
use crate::config::{Config, PgSource, Policy, TargetKind};
use crate::error::{Error, Result};
use crate::state_dir::StateDir;

/// A policy's pgBackRest, ready to run.
#[derive(Debug)]
pub struct PgBackRest {
    pub bin: PathBuf,
    pub conf: PathBuf,
    /// Options given as `PGBACKREST_*` variables instead of a file (a
    /// read on a host where `dr pg setup` never ran): `conf` is then
    /// /dev/null.
    pub env: Vec<(String, String)>,
    pub stanza: String,
    pub run_as: Option<String>,
    /// Target names in repository order: `repo` N is `targets[N - 1]`.
    pub targets: Vec<String>,
}

/// Where pgBackRest is, or how to install it.
pub fn find_bin() -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(|d| Path::new(d).join("pgbackrest"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::NotFound(
                "pgBackRest is not installed (no `pgbackrest` on PATH): install it with `apt-get install -y pgbackrest` (Debian/Ubuntu) or `dnf install pgbackrest` (PGDG), then run `dr pg setup POLICY`".into(),
            )
        })
}

/// (uid, gid) of an OS user, from /etc/passwd.
pub(crate) fn user_ids(user: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| Error::io("cannot read /etc/passwd", e))?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == user)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
        .ok_or_else(|| {
            Error::Other(format!(
                "run_as = \"{user}\": there is no such OS user on this host"
            ))
        })
}

pub(crate) fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// Makes a directory owned by the user pgBackRest runs as.
fn own_dir(dir: &Path, ids: Option<(u32, u32)>) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    if let Some((u, g)) = ids {
        std::os::unix::fs::chown(dir, Some(u), Some(g))
            .map_err(|e| Error::io(format!("cannot chown {}", dir.display()), e))?;
    }
    Ok(())
}

fn secret(path: &Option<PathBuf>, env: &str, what: &str, target: &str) -> Result<String> {
    match path {
        Some(p) => Ok(crate::secret::read_secret(p)?.expose_secret().trim().to_string()),
        None => std::env::var(env).map_err(|_| {
            Error::Other(format!(
                "target '{target}': pgBackRest needs the {what}: set {what}_file in the target, or {env}"
            ))
        }),
    }
}

fn plan(state: &StateDir, policy: &Policy, pg: &PgSource) -> Result<PgBackRest> {
    let run_as = match &pg.run_as {
        Some(u) if is_root() => {
            user_ids(u)?;
            Some(u.clone())
        }
        _ => None,
    };
    Ok(PgBackRest {
        bin: find_bin()?,
        conf: state.pg(&policy.name).join("pgbackrest.conf"),
        env: Vec::new(),
        stanza: pg.stanza.clone(),
        run_as,
        targets: policy.targets.clone(),
    })
}

/// Writes the policy's pgBackRest configuration (mode 0600, owned by
/// `run_as`) and the directories it names, fresh from dr's config: what
/// every command that changes the repository runs first, so pgBackRest
/// always works with the retention and targets configured now.
pub fn prepare(
    cfg: &Config,
    state: &StateDir,
    policy: &Policy,
    pg: &PgSource,
) -> Result<PgBackRest> {
    let rb = plan(state, policy, pg)?;
    let ids = match &rb.run_as {
        Some(u) => Some(user_ids(u)?),
        None => None,
    };
    let state = state.pg(&policy.name);
    for d in ["", "lock", "log", "spool"] {
        own_dir(&state.join(d), ids)?;
    }
    if let (Some((u, g)), Some(user)) = (ids, &rb.run_as) {
        // `pg/` holds only the policies' own directories (each the
        // cluster user's, 0700): the cluster user may pass through it.
        if let Some(pg_dir) = state.parent() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(pg_dir, std::fs::Permissions::from_mode(0o711));
        }
        if let Some(why) = blocked_for(&rb.conf, u, g) {
            return Err(Error::Other(format!(
                "policy '{}': PostgreSQL's archive_command runs as '{user}' and reads {}, but {why}: let '{user}' pass through it (chmod o+x, or under the shipped systemd unit StateDirectoryMode=0711)",
                policy.name,
                rb.conf.display()
            )));
        }
    }
    let text = conf::render(&conf_of(cfg, &state, policy, pg, ids, true)?);
    let path = rb.conf.clone();
    let tmp = state.join(".pgbackrest.conf.tmp");
    let werr = |e| Error::io(format!("cannot write {}", tmp.display()), e);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr)?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(werr)?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(werr)?;
    if let Some((u, g)) = ids {
        std::os::unix::fs::chown(&tmp, Some(u), Some(g)).map_err(werr)?;
    }
    std::fs::rename(&tmp, &path).map_err(werr)?;
    Ok(rb)
}

/// The policy's pgBackRest settings from dr's config, secrets read from
/// their files. `create`: make the local repositories' directories (a
/// read makes nothing).
fn conf_of(
    cfg: &Config,
    state: &Path,
    policy: &Policy,
    pg: &PgSource,
    ids: Option<(u32, u32)>,
    create: bool,
) -> Result<PgConf> {
    let cipher_pass = match &pg.cipher_pass_file {
        Some(p) => Some(crate::secret::read_secret(p)?.expose_secret().to_string()),
        None if policy.encrypted => {
            return Err(Error::Config(vec![crate::error::Diagnostic {
                file: policy.file.clone(),
                line: None,
                message: format!(
                    "policy '{}': PostgreSQL backups are encrypted by pgBackRest: set [source] cipher_pass_file (a file with a long random passphrase, mode 0600), or encryption = \"none\"",
                    policy.name
                ),
            }]));
        }
        None => None,
    };
    let mut repos = Vec::new();
    for name in &policy.targets {
        let t = cfg.target(name)?;
        repos.push(match &t.kind {
            TargetKind::Local { path } => {
                let p = path.join(&policy.name).join("pgbackrest");
                if create {
                    own_dir(&p, ids)?;
                }
                Repo::Posix { path: p }
            }
            TargetKind::S3(s) => {
                let (host, port) =
                    conf::endpoint(s.endpoint.as_deref().unwrap_or("https://s3.amazonaws.com"))
                        .map_err(|e| Error::Other(format!("target '{name}': {e}")))?;
                let prefix = s.prefix.trim_matches('/');
                Repo::S3(S3Repo {
                    host,
                    port,
                    bucket: s.bucket.clone(),
                    region: s.region.clone().unwrap_or_else(|| "us-east-1".into()),
                    path: if prefix.is_empty() {
                        format!("/{}/pgbackrest", policy.name)
                    } else {
                        format!("/{prefix}/{}/pgbackrest", policy.name)
                    },
                    path_style: s.path_style,
                    key: secret(
                        &s.access_key_id_file,
                        "AWS_ACCESS_KEY_ID",
                        "access_key_id",
                        name,
                    )?,
                    key_secret: secret(
                        &s.secret_access_key_file,
                        "AWS_SECRET_ACCESS_KEY",
                        "secret_access_key",
                        name,
                    )?,
                    ca_file: s.ca_file.clone(),
                    kms_key_id: s.upload.kms_key_id(),
                })
            }
        });
    }
    Ok(PgConf {
        stanza: pg.stanza.clone(),
        data_dir: pg.data_dir.clone(),
        port: pg.port,
        socket_dir: pg.socket_dir.clone(),
        user: pg.user.clone(),
        repos,
        retention_full: policy.retention.full,
        retention_diff: policy.retention.diff,
        cipher_pass,
        compress_level: policy.compression_level,
        state: state.to_path_buf(),
        process_max: pg.process_max,
        archive_async: pg.archive_async,
        bundle: pg.bundle,
    })
}

/// The policy's pgBackRest for a read (`dr info`): the configuration
/// `dr pg setup` wrote, or, on a host where it never ran (a new host after
/// a disaster, before any cluster exists), the same settings passed as
/// `PGBACKREST_*` variables. Nothing is written either way.
pub fn read_only(
    cfg: &Config,
    state: &StateDir,
    policy: &Policy,
    pg: &PgSource,
) -> Result<PgBackRest> {
    let mut rb = plan(state, policy, pg)?;
    if rb.conf.is_file() {
        return Ok(rb);
    }
    let text = conf::render(&conf_of(
        cfg,
        &state.pg(&policy.name),
        policy,
        pg,
        None,
        false,
    )?);
    rb.env = conf::as_env(&text);
    // Nothing of this host's: no log file, no config file.
    rb.env
        .push(("PGBACKREST_LOG_LEVEL_FILE".into(), "off".into()));
    rb.conf = PathBuf::from("/dev/null");
    // Read as dr's own user: the repository is read, nothing is created
    // that the cluster's user would need to own.
    rb.run_as = None;
    Ok(rb)
}

/// Why the user `uid`/`gid` cannot reach `path` (a directory on the way it
/// may not pass through), or `None`. Directories that do not exist yet are
/// not judged (dr creates them).
pub fn blocked_for(path: &Path, uid: u32, gid: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if uid == 0 {
        return None;
    }
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    dirs.into_iter().find_map(|d| {
        let m = std::fs::metadata(d).ok()?;
        let bit = if m.uid() == uid {
            0o100
        } else if m.gid() == gid {
            0o010
        } else {
            0o001
        };
        (m.mode() & bit == 0).then(|| {
            format!(
                "{} (mode {:o}, owner uid {}) does not let it pass",
                d.display(),
                m.mode() & 0o7777,
                m.uid()
            )
        })
    })
}

impl PgBackRest {
    /// The repository number of a target (repo N is the policy's Nth target).
    pub fn repo_of(&self, target: &str) -> Result<usize> {
        self.targets
            .iter()
            .position(|t| t == target)
            .map(|i| i + 1)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "stanza '{}' has no repository for target '{target}' (its targets: {})",
                    self.stanza,
                    self.targets.join(", ")
                ))
            })
    }

    /// The command line: `pgbackrest --config=FILE --stanza=S ARGS`, as `run_as`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        c.arg(format!("--config={}", self.conf.display()))
            .arg(format!("--stanza={}", self.stanza))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        c
    }

    /// Runs a command to completion; a failure carries pgBackRest's own
    /// error lines with what to do.
    ///
    /// With `archive-async`, pgBackRest's background push holds the
    /// stanza's archive lock for as long as it pushes the queue (a few
    /// seconds on a busy cluster); a command that needs that lock
    /// (`stanza-create`, `check`) waits for it, up to [`ARCHIVE_LOCK_WAIT`],
    /// instead of failing.
    pub fn run(&self, what: &str, args: &[&str]) -> Result<Output> {
        let started = std::time::Instant::now();
        let mut pause = FIRST_PAUSE;
        loop {
            let out = self
                .command(args)
                .output()
                .map_err(|e| Error::io(format!("cannot run {}", self.bin.display()), e))?;
            if out.status.success() {
                return Ok(out);
            }
            if archive_lock_held(&out) && started.elapsed() < ARCHIVE_LOCK_WAIT {
                // Said once, not at every look.
                if pause == FIRST_PAUSE {
                    tracing::info!(
                        stanza = %self.stanza,
                        "{what}: waiting for pgBackRest's asynchronous archive push to release the stanza's archive lock"
                    );
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
                continue;
            }
            return Err(Error::Other(explain(what, &self.stanza, &out)));
        }
    }
}

/// The first wait for the archive lock; it doubles up to 2 s.
const FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a command waits for the asynchronous archive push's lock.
pub const ARCHIVE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a command failed only because the archive lock was held (by
/// the asynchronous push, which ends on its own).
fn archive_lock_held(out: &Output) -> bool {
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    text.contains("unable to acquire lock") && text.contains("-archive.lock")
}

/// pgBackRest's error, with the advice dr can give for the usual causes.
fn explain(what: &str, stanza: &str, out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("HINT"))
        .collect();
    let detail = if errors.is_empty() {
        text.lines().last().unwrap_or("").to_string()
    } else {
        errors.join("; ")
    };
    let advice = if text.contains("archive_command") || text.contains("archive-push") {
        " (archiving is not set up or failing: run `dr pg setup POLICY`, then restart PostgreSQL if it says so)"
    } else if text.contains("unable to acquire lock") {
        " (another pgBackRest command holds this stanza's lock: wait for it to finish)"
    } else if text.contains("TLS") || text.contains("certificate") {
        " (the S3 TLS set-up is wrong: the endpoint must be https with a host name in the certificate, and ca_file must hold the CA that signed it)"
    } else if text.contains("does not exist") && text.contains("stanza") {
        " (run `dr pg setup POLICY` first)"
    } else {
        ""
    };
    format!("pgbackrest {what} for stanza '{stanza}' failed: {detail}{advice}")
}
