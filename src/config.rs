//! Loading and validating `dr.toml` and the policy directory.
//!
//! The files users write are a contract (see `examples/` in the repository). Validation
//! collects every problem it can find, each with its file and line and what
//! to do, so that one `dr config validate` run is enough to fix a config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, Result};
use crate::fleet::{Fleet, Member};
use crate::schedule::CronSpec;

pub mod copy;
pub mod follow;
pub mod hooks;
pub mod security;
mod upload;
pub use copy::Copy;
pub use follow::Follow;
pub use hooks::Hooks;
pub use security::Security;

pub use crate::error::Diagnostic;

// ---------------------------------------------------------------- raw files

#[derive(Debug, Deserialize)]
struct RawMain {
    state_dir: Option<Spanned<String>>,
    policies: Option<Spanned<String>>,
    #[serde(default)]
    encryption: RawEncryption,
    #[serde(default)]
    targets: BTreeMap<String, Spanned<RawTarget>>,
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    notify: RawNotify,
    #[serde(default)]
    security: security::RawSecurity,
}

#[derive(Debug, Default, Deserialize)]
struct RawNotify {
    ping_url: Option<Spanned<String>>,
    kuma_url: Option<Spanned<String>>,
    ntfy_url: Option<Spanned<String>>,
    webhook_url: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct RawEncryption {
    recipients_file: Option<Spanned<String>>,
    recipients: Option<Vec<Spanned<String>>>,
    passphrase_file: Option<Spanned<String>>,
    identity_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
struct RawTarget {
    kind: Spanned<String>,
    path: Option<Spanned<String>>,
    endpoint: Option<Spanned<String>>,
    bucket: Option<Spanned<String>>,
    region: Option<String>,
    prefix: Option<String>,
    path_style: Option<bool>,
    access_key_id_file: Option<Spanned<String>>,
    secret_access_key_file: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    verify_tls: Option<bool>,
    request_checksums: Option<bool>,
    object_lock: Option<Spanned<RawObjectLock>>,
    append_only: Option<bool>,
    storage_class: Option<Spanned<String>>,
    wal_storage_class: Option<Spanned<String>>,
    sse: Option<Spanned<String>>,
    kms_key_id: Option<Spanned<String>>,
    max_upload_rate: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObjectLock {
    mode: Spanned<String>,
    days: Spanned<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct RawDaemon {
    listen: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
struct RawPolicy {
    name: Spanned<String>,
    notify: Option<RawNotify>,
    targets: Spanned<Vec<Spanned<String>>>,
    source: Spanned<RawSource>,
    #[serde(default)]
    schedule: RawSchedule,
    retention: Option<RawRetention>,
    #[serde(default)]
    wal: RawWal,
    #[serde(default)]
    compression: RawCompression,
    encryption: Option<Spanned<String>>,
    follow: Option<follow::RawFollow>,
    hooks: Option<hooks::RawHooks>,
    copy: Option<copy::RawCopy>,
}

#[derive(Debug, Deserialize)]
struct RawSource {
    kind: Spanned<String>,
    path: Option<Spanned<String>>,
    stanza: Option<String>,
    data_dir: Option<String>,
    socket_dir: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    run_as: Option<String>,
    cipher_pass_file: Option<String>,
    archive_timeout: Option<Spanned<String>>,
    process_max: Option<Spanned<u32>>,
    archive_async: Option<bool>,
    bundle: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct RawSchedule {
    full: Option<Spanned<String>>,
    diff: Option<Spanned<String>>,
    verify: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
struct RawRetention {
    full: Option<Spanned<u32>>,
    diff: Option<Spanned<u32>>,
    keep_daily: Option<Spanned<u32>>,
    keep_weekly: Option<Spanned<u32>>,
    keep_monthly: Option<Spanned<u32>>,
    keep_yearly: Option<Spanned<u32>>,
    incomplete_grace: Option<Spanned<String>>,
    window: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct RawWal {
    enabled: Option<bool>,
    sync_interval: Option<Spanned<String>>,
    spool_max: Option<Spanned<String>>,
    segment_max: Option<Spanned<String>>,
    checkpoint_pages: Option<Spanned<u32>>,
    diff_after: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct RawCompression {
    level: Option<Spanned<i32>>,
    /// Plain bytes per independent frame of a format 2 data object.
    frame: Option<Spanned<String>>,
    /// The repository format new backups are written in (1 or 2).
    format: Option<Spanned<u32>>,
}

// ---------------------------------------------------------------- resolved

/// The validated configuration every operation works from.
#[derive(Debug, Clone)]
pub struct Config {
    /// The dr.toml this came from; relative paths were resolved against its directory.
    pub file: PathBuf,
    pub state_dir: PathBuf,
    pub encryption: Encryption,
    pub targets: BTreeMap<String, Target>,
    pub policies: Vec<Policy>,
    pub daemon_listen: String,
    /// `[daemon] token_file`: `/metrics` and `/healthz`'s detail then need
    /// `Authorization: Bearer <token>`. Read at each request, so a rotated
    /// token counts at once.
    pub daemon_token_file: Option<PathBuf>,
    pub notify: Notify,
    /// `[security]`: when secrets are due for rotation and certificates
    /// for renewal.
    pub security: Security,
}

/// Where runs are reported (`[notify]` in dr.toml, or in a policy, which
/// then replaces the global one for that policy). See `notify.rs`.
#[derive(Debug, Clone, Default)]
pub struct Notify {
    /// healthchecks.io style: `URL/start`, `URL`, `URL/fail`.
    pub ping_url: Option<String>,
    /// Uptime Kuma push URL: `?status=up|down&msg=` is added.
    pub kuma_url: Option<String>,
    /// ntfy topic URL: a message on every failure.
    pub ntfy_url: Option<String>,
    /// Receives a JSON document for every start and finished run.
    pub webhook_url: Option<String>,
}

/// How archives are encrypted and, at restore, decrypted.
pub type Encryption = crate::keys::KeySettings;

/// A place backups are written to.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub kind: TargetKind,
}

pub use crate::storage::TargetKind;
pub use crate::storage::s3::S3Settings as S3Target;

/// One database and how it is protected.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub file: PathBuf,
    pub targets: Vec<String>,
    pub source: Source,
    pub schedule: Schedule,
    pub retention: Retention,
    pub wal: Wal,
    pub compression_level: i32,
    /// Repository format of new backups: 2 (framed, the default), or 1 for
    /// repositories an older dr must still restore.
    pub format: u32,
    /// Plain bytes per frame of a format 2 data object.
    pub compression_frame: u32,
    /// False only when the policy says `encryption = "none"`.
    pub encrypted: bool,
    /// The policy's own `[notify]`, replacing the global one.
    pub notify: Option<Notify>,
    /// Set when the source path is a pattern: the policy's databases are
    /// its members (see `fleet.rs`); the policy itself is never backed up.
    pub fleet: Option<Fleet>,
    /// Set on a member: which fleet policy and database it is.
    pub member: Option<Member>,
    /// `[follow]`: this host keeps a standby of the policy (see
    /// `config/follow.rs`).
    pub follow: Option<Follow>,
    /// `[hooks]`: commands run around each backup (`config/hooks.rs`).
    pub hooks: Option<Hooks>,
    /// `[copy]`: targets that receive copies of its backups and WAL
    /// (`config/copy.rs`).
    pub copy: Option<Copy>,
}

impl Policy {
    /// The member policy of database `db` of this fleet policy: the same
    /// settings, named `<policy>/<db>`, for the one file `path`.
    pub fn member_policy(&self, db: &str, path: PathBuf) -> Policy {
        Policy {
            name: crate::fleet::member_name(&self.name, db),
            source: Source::Sqlite { path },
            fleet: None,
            // A standby's member is a standby too: it writes nothing
            // until the fleet is promoted here (`ops::promotion::fence`).
            follow: self.follow.clone(),
            member: Some(Member {
                policy: self.name.clone(),
                db: db.to_string(),
            }),
            ..self.clone()
        }
    }

    /// The name of the policy as configured: a member's fleet policy.
    pub fn configured_name(&self) -> &str {
        self.member.as_ref().map_or(&self.name, |m| &m.policy)
    }
}

/// What a policy backs up.
#[derive(Debug, Clone)]
pub enum Source {
    Sqlite { path: PathBuf },
    Postgres(PgSource),
}

/// A PostgreSQL cluster that pgBackRest backs up for a policy.
#[derive(Debug, Clone)]
pub struct PgSource {
    pub stanza: String,
    pub data_dir: PathBuf,
    pub socket_dir: Option<PathBuf>,
    pub port: u16,
    pub user: String,
    pub run_as: Option<String>,
    pub cipher_pass_file: Option<PathBuf>,
    /// PostgreSQL's `archive_timeout`, which `dr pg setup` sets: the
    /// longest a commit waits in an unfinished WAL segment before it is
    /// archived, so it bounds what a lost host loses (the RPO).
    pub archive_timeout: Duration,
    /// pgBackRest's `process-max`: processes that compress, encrypt and
    /// transfer files (backup, restore, asynchronous archiving). Default:
    /// this host's cores.
    pub process_max: u32,
    /// pgBackRest's `archive-async`: `archive_command` returns once the
    /// segment is in the repository, but a background process pushes the
    /// segments queued behind it in parallel (`process_max`), so a busy
    /// cluster's archive keeps up. Default on.
    pub archive_async: bool,
    /// pgBackRest's `repo-bundle`: small files of a backup stored
    /// together, far fewer objects (and S3 requests) for a cluster of many
    /// small relations. Default on.
    pub bundle: bool,
}

impl Source {
    /// The `kind` word users write in the config.
    pub fn word(&self) -> &'static str {
        match self {
            Source::Sqlite { .. } => "sqlite",
            Source::Postgres(_) => "postgres",
        }
    }
}

/// Cron schedules of a policy (used by the daemon).
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    pub full: Option<CronSpec>,
    pub diff: Option<CronSpec>,
    pub verify: Option<CronSpec>,
}

/// pgBackRest-style retention. `None` keeps everything of that kind.
#[derive(Debug, Clone)]
pub struct Retention {
    pub full: Option<u32>,
    pub diff: Option<u32>,
    /// How old an interrupted backup (no manifest) must be before expire removes it.
    pub incomplete_grace: Duration,
    /// Every instant this far back stays restorable, whatever the counts say.
    pub window: Option<Duration>,
    /// `keep_daily` … `keep_yearly`, in the daemon's time zone: with any
    /// of them, retention keeps what any rule keeps (`repo::retention::plan_calendar`).
    pub calendar: crate::repo::calendar::Calendar,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            full: None,
            diff: None,
            incomplete_grace: Duration::from_secs(3600),
            window: None,
            calendar: Default::default(),
        }
    }
}

/// WAL streaming settings of a SQLite policy.
#[derive(Debug, Clone)]
pub struct Wal {
    pub enabled: bool,
    /// How often committed frames are sealed into a segment and shipped.
    pub sync_interval: Duration,
    /// Bound on segments waiting locally for a target that is down.
    pub spool_max: u64,
    /// A segment is sealed early at a commit once it holds this much.
    pub segment_max: u64,
    /// WAL size (frames) at which dr runs its own PASSIVE checkpoint.
    pub checkpoint_pages: u32,
    /// When the streamer takes a diff backup on its own, so that a
    /// point-in-time restore replays a bounded amount of WAL however long
    /// the stream has run.
    pub diff_after: DiffAfter,
}

/// `[wal] diff_after`: how much WAL may pile up after the newest backup
/// before the streamer takes a diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffAfter {
    /// The larger of 256 MiB and a quarter of the database: a restore
    /// replays at most that much, and a busy large database is not read
    /// whole every few minutes.
    Auto,
    Bytes(u64),
    Off,
}

impl DiffAfter {
    /// Floor of [`DiffAfter::Auto`].
    pub const AUTO_MIN: u64 = 256 << 20;

    /// The WAL volume that calls for a diff of a database of `db_size` bytes.
    pub fn threshold(self, db_size: u64) -> Option<u64> {
        match self {
            DiffAfter::Auto => Some(Self::AUTO_MIN.max(db_size / 4)),
            DiffAfter::Bytes(n) => Some(n),
            DiffAfter::Off => None,
        }
    }
}

impl Config {
    /// Where `policy`'s runs are reported: its own `[notify]`, else the global one.
    pub fn notify_for<'a>(&'a self, policy: &'a Policy) -> &'a Notify {
        policy.notify.as_ref().unwrap_or(&self.notify)
    }

    /// The policy of that name, or an error listing the known ones.
    pub fn policy(&self, name: &str) -> Result<&Policy> {
        self.policies
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.policies.iter().map(|p| p.name.as_str()).collect();
                Error::NotFound(format!(
                    "no policy named '{name}' (known policies: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })
    }

    /// The target of that name (validated to exist when a policy names it).
    pub fn target(&self, name: &str) -> Result<&Target> {
        self.targets.get(name).ok_or_else(|| {
            Error::NotFound(format!(
                "no target named '{name}' in {} (known targets: {})",
                self.file.display(),
                self.targets.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

// ---------------------------------------------------------------- loading

/// The longest `incomplete_grace` dr accepts (it must fit in a time stamp).
const MAX_GRACE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The largest config or policy file dr reads: anything bigger is not a
/// config (a link to /dev/zero would otherwise grow memory without bound).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a config file, refusing what is not a regular file of sane size.
fn read_config_text(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(
            "not a regular file (a device, FIFO or directory)",
        ));
    }
    let mut text = String::new();
    f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} KiB: not a dr configuration",
            MAX_CONFIG_BYTES >> 10
        )));
    }
    Ok(text)
}

/// Where the config is looked for when neither `--config` nor `DR_CONFIG` is given.
pub const DEFAULT_CONFIG: &str = "dr.toml";

/// Loads and validates the configuration, returning every problem at once.
pub fn load(path: &Path) -> Result<Config> {
    let mut diags = Vec::new();
    let text = match read_config_text(path) {
        Ok(t) => t,
        Err(e) => {
            return Err(Error::Config(vec![Diagnostic {
                file: path.to_path_buf(),
                line: None,
                message: format!(
                    "cannot read the configuration: {} (pass --config FILE or set DR_CONFIG; `dr demo` writes an example)",
                    crate::error::io_reason(&e)
                ),
            }]));
        }
    };
    let base = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .to_path_buf();
    // Absolute: other programs (PostgreSQL's archive_command, pgBackRest)
    // read these paths from other working directories.
    let base = std::path::absolute(&base).unwrap_or(base);
    let Some(raw) = parse_file::<RawMain>(path, &text, &mut diags) else {
        return Err(Error::Config(diags));
    };
    let mut d = FileDiags {
        file: path.to_path_buf(),
        text: &text,
        out: &mut diags,
    };
    let resolve = |s: &str| resolve_path(&base, s);

    let state_dir = raw
        .state_dir
        .as_ref()
        .map(|s| resolve(s.get_ref()))
        .unwrap_or_else(|| base.join("state"));

    let mut encryption = Encryption::default();
    if let Some(f) = &raw.encryption.recipients_file {
        encryption.recipients_file = Some(resolve(f.get_ref()));
    }
    if let Some(list) = &raw.encryption.recipients {
        for r in list {
            if let Err(e) = crate::keys::parse_recipient(r.get_ref()) {
                d.at(r.span(), e);
            }
            encryption.recipients.push(r.get_ref().clone());
        }
    }
    if let Some(f) = &raw.encryption.passphrase_file {
        encryption.passphrase_file = Some(resolve(f.get_ref()));
        if raw.encryption.recipients_file.is_some() || raw.encryption.recipients.is_some() {
            d.at(
                f.span(),
                "[encryption] has both recipients and passphrase_file; age cannot mix them: keep one".into(),
            );
        }
    }
    if let Some(f) = &raw.encryption.identity_file {
        encryption.identity_file = Some(resolve(f.get_ref()));
    }

    let mut targets = BTreeMap::new();
    for (name, t) in &raw.targets {
        if let Some(kind) = check_target(name, t, &resolve, &mut d) {
            targets.insert(
                name.clone(),
                Target {
                    name: name.clone(),
                    kind,
                },
            );
        }
    }
    let daemon_listen = raw
        .daemon
        .listen
        .as_ref()
        .map(|l| {
            if l.get_ref().parse::<std::net::SocketAddr>().is_err() {
                d.at(
                    l.span(),
                    format!(
                        "daemon.listen '{}' is not an address like 127.0.0.1:9187",
                        l.get_ref()
                    ),
                );
            }
            l.get_ref().clone()
        })
        .unwrap_or_else(|| "127.0.0.1:9187".to_string());

    let daemon_token_file = raw.daemon.token_file.as_ref().map(|f| resolve(f.get_ref()));
    let security = security::resolve(&mut d, &raw.security);

    let zone = match &raw.daemon.timezone {
        Some(z) => match z.get_ref().parse::<chrono_tz::Tz>() {
            Ok(tz) => tz,
            Err(_) => {
                d.at(
                    z.span(),
                    format!(
                        "daemon.timezone '{}' is not an IANA time zone: write e.g. \"UTC\" or \"Europe/Berlin\"",
                        z.get_ref()
                    ),
                );
                chrono_tz::UTC
            }
        },
        None => chrono_tz::UTC,
    };
    let notify = notify_of(&raw.notify, &mut d);

    let policy_dir = raw
        .policies
        .as_ref()
        .map(|p| resolve(p.get_ref()))
        .unwrap_or_else(|| base.join("policies"));
    let mut policies: Vec<Policy> = Vec::new();
    let mut any_encrypted = false;
    match list_policy_files(&policy_dir) {
        Ok(files) => {
            let mut seen: BTreeMap<String, (PathBuf, usize)> = BTreeMap::new();
            for file in files {
                let ptext = match read_config_text(&file) {
                    Ok(t) => t,
                    Err(e) => {
                        diags.push(Diagnostic {
                            file: file.clone(),
                            line: None,
                            message: format!("cannot read: {}", crate::error::io_reason(&e)),
                        });
                        continue;
                    }
                };
                let Some(rp) = parse_file::<RawPolicy>(&file, &ptext, &mut diags) else {
                    continue;
                };
                let mut pd = FileDiags {
                    file: file.clone(),
                    text: &ptext,
                    out: &mut diags,
                };
                let line = pd.line_of(rp.name.span());
                if let Some((other, other_line)) = seen.get(rp.name.get_ref()) {
                    pd.at(
                        rp.name.span(),
                        format!(
                            "duplicate policy name '{}' (also in {}:{}): give each policy its own name",
                            rp.name.get_ref(),
                            other.display(),
                            other_line
                        ),
                    );
                    continue;
                }
                seen.insert(rp.name.get_ref().clone(), (file.clone(), line));
                if let Some(mut p) =
                    check_policy(&file, rp, &targets, &raw.targets, &resolve, &mut pd)
                {
                    any_encrypted |= p.encrypted;
                    for spec in [
                        &mut p.schedule.full,
                        &mut p.schedule.diff,
                        &mut p.schedule.verify,
                    ] {
                        *spec = spec.take().map(|s| s.in_zone(zone));
                    }
                    p.retention.calendar.zone = zone;
                    policies.push(p);
                }
            }
        }
        Err(e) => diags.push(Diagnostic {
            file: policy_dir.clone(),
            line: None,
            message: format!(
                "cannot list the policy directory: {} (set `policies = \"DIR\"` in {})",
                crate::error::io_reason(&e),
                path.display()
            ),
        }),
    }
    if any_encrypted
        && encryption.recipients.is_empty()
        && encryption.recipients_file.is_none()
        && encryption.passphrase_file.is_none()
    {
        diags.push(Diagnostic {
            file: path.to_path_buf(),
            line: None,
            message: "no [encryption] recipients, recipients_file or passphrase_file: add one (`dr keygen --output FILE` prints a recipient), or set encryption = \"none\" in each policy that must not be encrypted".into(),
        });
    }
    if diags.is_empty() {
        Ok(Config {
            file: path.to_path_buf(),
            state_dir,
            encryption,
            targets,
            policies,
            daemon_listen,
            daemon_token_file,
            notify,
            security,
        })
    } else {
        Err(Error::Config(diags))
    }
}

fn resolve_path(base: &Path, s: &str) -> PathBuf {
    let p = Path::new(s);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn list_policy_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "toml") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

struct FileDiags<'a> {
    file: PathBuf,
    text: &'a str,
    out: &'a mut Vec<Diagnostic>,
}

impl FileDiags<'_> {
    fn line_of(&self, span: std::ops::Range<usize>) -> usize {
        line_at(self.text, span.start)
    }
    fn at(&mut self, span: std::ops::Range<usize>, message: String) {
        let line = Some(self.line_of(span));
        self.out.push(Diagnostic {
            file: self.file.clone(),
            line,
            message,
        });
    }
    fn whole(&mut self, message: String) {
        self.out.push(Diagnostic {
            file: self.file.clone(),
            line: None,
            message,
        });
    }
}

/// The duration `raw` of setting `key` (`default` when absent), which must
/// be more than zero; else a diagnostic that shows `example`, `ok` false,
/// and `default`.
fn positive_duration(
    d: &mut FileDiags<'_>,
    key: &str,
    raw: &Option<Spanned<String>>,
    default: Duration,
    example: &str,
    ok: &mut bool,
) -> Duration {
    let Some(s) = raw else { return default };
    match humantime::parse_duration(s.get_ref()) {
        Ok(v) if !v.is_zero() => v,
        Ok(_) => {
            d.at(s.span(), format!("{key} must be more than zero"));
            *ok = false;
            default
        }
        Err(e) => {
            d.at(s.span(), format!("{key}: {e} (write e.g. {example})"));
            *ok = false;
            default
        }
    }
}

/// A schedule's cron expression, or `None` (with a diagnostic, `ok`
/// cleared) when it does not parse or never fires.
fn cron(d: &mut FileDiags<'_>, expr: &Spanned<String>, ok: &mut bool) -> Option<CronSpec> {
    match CronSpec::parse(expr.get_ref()) {
        Ok(c) if c.next_after(chrono::Utc::now()).is_none() => {
            d.at(
                expr.span(),
                format!(
                    "cron expression '{}' never fires (no such date within the years it can reach): check the day and month",
                    expr.get_ref()
                ),
            );
            *ok = false;
            None
        }
        Ok(c) => Some(c),
        Err(e) => {
            d.at(expr.span(), e);
            *ok = false;
            None
        }
    }
}

fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Parses one TOML file into `T`, reporting syntax and type errors and every unknown key.
fn parse_file<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<T> {
    let mut unknown: Vec<String> = Vec::new();
    let de = match toml::de::Deserializer::parse(text) {
        Ok(de) => de,
        Err(e) => {
            diags.push(toml_diag(file, text, &e));
            return None;
        }
    };
    let result: std::result::Result<T, _> = serde_ignored::deserialize(de, |path| {
        // `Spanned<T>` shows up in paths as a private wrapper key; users never wrote it.
        let full = path.to_string();
        let key: Vec<&str> = full
            .split('.')
            .filter(|seg| !seg.starts_with("$__serde_spanned"))
            .collect();
        unknown.push(key.join("."));
    });
    let spans = toml::de::DeTable::parse(text).ok();
    for key in &unknown {
        let line = spans
            .as_ref()
            .and_then(|t| key_span(t.get_ref(), key))
            .map(|s| line_at(text, s.start));
        diags.push(Diagnostic {
            file: file.to_path_buf(),
            line,
            message: format!("unknown key '{key}': remove it or check its spelling (see examples/dr.toml in dr's repository for every key)"),
        });
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            diags.push(toml_diag(file, text, &e));
            more_type_errors::<T>(file, text, &e, diags);
            None
        }
    }
}

/// serde stops at the first wrong type; the user should see every one at
/// once. Blanks the line of each error found (keeping line numbers) and
/// parses again, reporting what else is wrong, until the file parses, an
/// error repeats, or blanking breaks the syntax.
fn more_type_errors<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
    first: &toml::de::Error,
    diags: &mut Vec<Diagnostic>,
) {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut err_span = first.span();
    let mut seen = Vec::new();
    for _ in 0..32 {
        let Some(span) = err_span else { return };
        let line = line_at(text, span.start);
        if seen.contains(&line) || line == 0 || line > lines.len() {
            return;
        }
        seen.push(line);
        lines[line - 1] = String::new();
        let blanked = lines.join("\n");
        let Ok(de) = toml::de::Deserializer::parse(&blanked) else {
            return;
        };
        match serde_ignored::deserialize::<_, _, T>(de, |_| {}) {
            Ok(_) => return,
            Err(e) => {
                // A required key that blanking removed is not the user's error.
                if e.message().starts_with("missing field") {
                    return;
                }
                let d = toml_diag(file, &blanked, &e);
                if diags
                    .iter()
                    .any(|x| x.line == d.line && x.message == d.message)
                {
                    return;
                }
                diags.push(d);
                err_span = e.span();
            }
        }
    }
}

fn key_span(table: &toml::de::DeTable<'_>, dotted: &str) -> Option<std::ops::Range<usize>> {
    let mut current = table;
    let parts: Vec<&str> = dotted.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let (k, v) = current
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == *part)?;
        if i + 1 == parts.len() {
            return Some(k.span());
        }
        current = v.get_ref().as_table()?;
    }
    None
}

fn toml_diag(file: &Path, text: &str, e: &toml::de::Error) -> Diagnostic {
    Diagnostic {
        file: file.to_path_buf(),
        line: e.span().map(|s| line_at(text, s.start)),
        message: e.message().trim().to_string(),
    }
}

fn check_target(
    name: &str,
    t: &Spanned<RawTarget>,
    resolve: &dyn Fn(&str) -> PathBuf,
    d: &mut FileDiags<'_>,
) -> Option<TargetKind> {
    let raw = t.get_ref();
    let not_for = |d: &mut FileDiags<'_>, key: &str, span: std::ops::Range<usize>, kind: &str| {
        d.at(
            span,
            format!("targets.{name}.{key} does not apply to a {kind} target: remove it"),
        );
    };
    match raw.kind.get_ref().as_str() {
        "local" => {
            for (key, v) in [
                ("endpoint", &raw.endpoint),
                ("bucket", &raw.bucket),
                ("access_key_id_file", &raw.access_key_id_file),
                ("secret_access_key_file", &raw.secret_access_key_file),
                ("ca_file", &raw.ca_file),
                ("storage_class", &raw.storage_class),
                ("wal_storage_class", &raw.wal_storage_class),
                ("sse", &raw.sse),
                ("kms_key_id", &raw.kms_key_id),
                ("max_upload_rate", &raw.max_upload_rate),
            ] {
                if let Some(v) = v {
                    not_for(d, key, v.span(), "local");
                }
            }
            match &raw.path {
                Some(p) => Some(TargetKind::Local {
                    path: resolve(p.get_ref()),
                }),
                None => {
                    d.at(
                        t.span(),
                        format!("targets.{name} (kind = \"local\") needs `path = \"DIR\"`"),
                    );
                    None
                }
            }
        }
        "s3" => {
            if let Some(p) = &raw.path {
                not_for(d, "path", p.span(), "s3");
            }
            let Some(bucket) = &raw.bucket else {
                d.at(
                    t.span(),
                    format!("targets.{name} (kind = \"s3\") needs `bucket = \"NAME\"`"),
                );
                return None;
            };
            if let Some(ep) = &raw.endpoint
                && !(ep.get_ref().starts_with("http://") || ep.get_ref().starts_with("https://"))
            {
                d.at(
                    ep.span(),
                    format!(
                        "targets.{name}.endpoint must start with http:// or https:// (got '{}')",
                        ep.get_ref()
                    ),
                );
            }
            if raw.verify_tls == Some(false) {
                d.at(
                    t.span(),
                    format!("targets.{name}.verify_tls = false is not supported: dr never skips certificate checks; give the server's certificate or CA as `ca_file`"),
                );
            }
            if raw.access_key_id_file.is_some() != raw.secret_access_key_file.is_some() {
                d.at(
                    t.span(),
                    format!("targets.{name}: set both access_key_id_file and secret_access_key_file, or neither (then the AWS environment is used)"),
                );
            }
            Some(TargetKind::S3(Box::new(S3Target {
                endpoint: raw.endpoint.as_ref().map(|e| e.get_ref().clone()),
                bucket: bucket.get_ref().clone(),
                region: raw.region.clone(),
                prefix: raw
                    .prefix
                    .clone()
                    .unwrap_or_default()
                    .trim_matches('/')
                    .to_string(),
                path_style: raw.path_style.unwrap_or(false),
                access_key_id_file: raw
                    .access_key_id_file
                    .as_ref()
                    .map(|p| resolve(p.get_ref())),
                secret_access_key_file: raw
                    .secret_access_key_file
                    .as_ref()
                    .map(|p| resolve(p.get_ref())),
                ca_file: raw.ca_file.as_ref().map(|p| resolve(p.get_ref())),
                request_checksums: raw.request_checksums.unwrap_or(false),
                object_lock: object_lock(name, raw.object_lock.as_ref(), d),
                append_only: raw.append_only.unwrap_or(false),
                upload: upload::resolve(name, raw, d),
            })))
        }
        other => {
            d.at(
                raw.kind.span(),
                format!("targets.{name}.kind = \"{other}\" is not a target kind: use \"local\" or \"s3\""),
            );
            None
        }
    }
}

/// `object_lock = { mode = "governance" | "compliance", days = N }`.
fn object_lock(
    name: &str,
    raw: Option<&Spanned<RawObjectLock>>,
    d: &mut FileDiags<'_>,
) -> Option<crate::storage::s3::ObjectLock> {
    let raw = raw?;
    let l = raw.get_ref();
    let compliance = match l.mode.get_ref().as_str() {
        "governance" => false,
        "compliance" => true,
        other => {
            d.at(
                l.mode.span(),
                format!("targets.{name}.object_lock.mode = \"{other}\": use \"governance\" (an account with s3:BypassGovernanceRetention can still delete) or \"compliance\" (nobody can, until the date)"),
            );
            return None;
        }
    };
    let days = *l.days.get_ref();
    if !(1..=36500).contains(&days) {
        d.at(
            l.days.span(),
            format!("targets.{name}.object_lock.days = {days}: use 1 to 36500 (keep it at least as long as retention keeps backups)"),
        );
        return None;
    }
    Some(crate::storage::s3::ObjectLock { days, compliance })
}

fn check_policy(
    file: &Path,
    rp: RawPolicy,
    targets: &BTreeMap<String, Target>,
    raw_targets: &BTreeMap<String, Spanned<RawTarget>>,
    resolve: &dyn Fn(&str) -> PathBuf,
    d: &mut FileDiags<'_>,
) -> Option<Policy> {
    let name = rp.name.get_ref().clone();
    let mut ok = true;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        || name.starts_with('.')
    {
        d.at(
            rp.name.span(),
            format!("policy name '{name}' may use only letters, digits, '-', '_' and '.' (it names directories and objects)"),
        );
        ok = false;
    }
    let mut policy_targets = Vec::new();
    if rp.targets.get_ref().is_empty() {
        d.at(
            rp.targets.span(),
            format!("policy '{name}' has no targets: list at least one of [targets.*]"),
        );
        ok = false;
    }
    for t in rp.targets.get_ref() {
        if !raw_targets.contains_key(t.get_ref()) {
            d.at(
                t.span(),
                format!(
                    "policy '{name}' names target '{}', which is not defined: add [targets.{}] to dr.toml or use one of: {}",
                    t.get_ref(),
                    t.get_ref(),
                    raw_targets.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
            ok = false;
        } else if targets.contains_key(t.get_ref()) {
            policy_targets.push(t.get_ref().clone());
        }
    }
    let src = rp.source.get_ref();
    let mut fleet = None;
    let source = match src.kind.get_ref().as_str() {
        "sqlite" => match &src.path {
            Some(p) => {
                let path = resolve(p.get_ref());
                match Fleet::parse(&path) {
                    Ok(f) => fleet = f,
                    Err(why) => {
                        d.at(p.span(), why);
                        ok = false;
                    }
                }
                Some(Source::Sqlite { path })
            }
            None => {
                d.at(
                    rp.source.span(),
                    "[source] kind = \"sqlite\" needs `path = \"/path/to/db\"`".into(),
                );
                None
            }
        },
        "postgres" => {
            let archive_timeout = match &src.archive_timeout {
                None => Duration::from_secs(60),
                Some(t) => match humantime::parse_duration(t.get_ref()) {
                    Ok(v) if v >= Duration::from_secs(1) => v,
                    Ok(_) => {
                        d.at(
                            t.span(),
                            "archive_timeout must be at least 1s: 0 would leave the open WAL segment unarchived for as long as PostgreSQL takes to fill it, an unbounded loss on a lost host".into(),
                        );
                        ok = false;
                        Duration::from_secs(60)
                    }
                    Err(e) => {
                        d.at(
                            t.span(),
                            format!("archive_timeout: {e} (write e.g. \"60s\" or \"5min\")"),
                        );
                        ok = false;
                        Duration::from_secs(60)
                    }
                },
            };
            let process_max = match &src.process_max {
                None => std::thread::available_parallelism().map_or(1, |n| n.get()) as u32,
                Some(n) if (1..=64).contains(n.get_ref()) => *n.get_ref(),
                Some(n) => {
                    d.at(
                        n.span(),
                        format!("process_max = {} is out of range: use 1 to 64 (the default is this host's cores)", n.get_ref()),
                    );
                    ok = false;
                    1
                }
            };
            let data_dir = src.data_dir.as_ref().map(|p| resolve(p));
            if data_dir.is_none() {
                d.at(
                    rp.source.span(),
                    "[source] kind = \"postgres\" needs `data_dir`".into(),
                );
            }
            data_dir.map(|data_dir| {
                Source::Postgres(PgSource {
                    stanza: src.stanza.clone().unwrap_or_else(|| name.clone()),
                    data_dir,
                    socket_dir: src.socket_dir.as_ref().map(|p| resolve(p)),
                    port: src.port.unwrap_or(5432),
                    user: src.user.clone().unwrap_or_else(|| "postgres".into()),
                    run_as: src.run_as.clone(),
                    cipher_pass_file: src.cipher_pass_file.as_ref().map(|p| resolve(p)),
                    archive_timeout,
                    process_max,
                    archive_async: src.archive_async.unwrap_or(true),
                    bundle: src.bundle.unwrap_or(true),
                })
            })
        }
        other => {
            d.at(
                src.kind.span(),
                format!(
                    "[source] kind = \"{other}\" is not supported: use \"sqlite\" or \"postgres\""
                ),
            );
            None
        }
    };
    if source.is_none() {
        ok = false;
    }

    let mut schedule = Schedule::default();
    for (slot, raw) in [
        (&mut schedule.full, &rp.schedule.full),
        (&mut schedule.diff, &rp.schedule.diff),
        (&mut schedule.verify, &rp.schedule.verify),
    ] {
        if let Some(expr) = raw {
            *slot = cron(d, expr, &mut ok);
        }
    }

    let mut retention = Retention::default();
    if let Some(r) = &rp.retention {
        if let Some(full) = &r.full {
            if *full.get_ref() == 0 {
                d.at(
                    full.span(),
                    "retention.full must be at least 1 (it is how many full backups to keep)"
                        .into(),
                );
                ok = false;
            }
            retention.full = Some(*full.get_ref());
        }
        if let Some(diff) = r.diff.as_ref().filter(|d| *d.get_ref() == 0) {
            d.at(
                diff.span(),
                "retention.diff must be at least 1 (it is how many diff backups to keep; 0 would delete each diff as soon as it commits): remove the key to keep every diff".into(),
            );
            ok = false;
        }
        retention.diff = r.diff.as_ref().map(|d| *d.get_ref());
        for (key, raw, slot) in [
            ("keep_daily", &r.keep_daily, &mut retention.calendar.daily),
            (
                "keep_weekly",
                &r.keep_weekly,
                &mut retention.calendar.weekly,
            ),
            (
                "keep_monthly",
                &r.keep_monthly,
                &mut retention.calendar.monthly,
            ),
            (
                "keep_yearly",
                &r.keep_yearly,
                &mut retention.calendar.yearly,
            ),
        ] {
            if let Some(v) = raw {
                if *v.get_ref() == 0 {
                    d.at(
                        v.span(),
                        format!("retention.{key} must be at least 1 (how many periods keep their newest backup): remove the key for no such rule"),
                    );
                    ok = false;
                }
                *slot = Some(*v.get_ref());
            }
        }
        if let Some(g) = &r.incomplete_grace {
            match humantime::parse_duration(g.get_ref()) {
                Ok(v) if v > MAX_GRACE => {
                    d.at(
                        g.span(),
                        format!(
                            "retention.incomplete_grace = \"{}\" is longer than dr allows ({}): write e.g. \"1h\" or \"7d\"",
                            g.get_ref(),
                            humantime::format_duration(MAX_GRACE)
                        ),
                    );
                    ok = false;
                }
                Ok(v) => retention.incomplete_grace = v,
                Err(e) => {
                    d.at(
                        g.span(),
                        format!("retention.incomplete_grace: {e} (write e.g. \"1h\" or \"30m\")"),
                    );
                    ok = false;
                }
            }
        }
        if let Some(w) = &r.window {
            match humantime::parse_duration(w.get_ref()) {
                Ok(v) if v > MAX_GRACE || v.is_zero() => {
                    d.at(
                        w.span(),
                        format!(
                            "retention.window = \"{}\" must be more than 0 and at most {}: write e.g. \"7d\" or \"36h\"",
                            w.get_ref(),
                            humantime::format_duration(MAX_GRACE)
                        ),
                    );
                    ok = false;
                }
                Ok(v) => retention.window = Some(v),
                Err(e) => {
                    d.at(
                        w.span(),
                        format!("retention.window: {e} (write e.g. \"7d\" or \"36h\")"),
                    );
                    ok = false;
                }
            }
        }
    }

    let mut wal = Wal {
        enabled: rp.wal.enabled.unwrap_or(false),
        sync_interval: Duration::from_secs(1),
        spool_max: 1 << 30,
        segment_max: 16 << 20,
        checkpoint_pages: 1000,
        diff_after: DiffAfter::Auto,
    };
    if let Some(s) = &rp.wal.diff_after {
        match s.get_ref().trim() {
            "auto" => {}
            "off" => wal.diff_after = DiffAfter::Off,
            v => match parse_size(v) {
                Some(n) if n > 0 => wal.diff_after = DiffAfter::Bytes(n),
                _ => {
                    d.at(
                        s.span(),
                        format!(
                            "wal.diff_after '{}' is not a size: write e.g. \"512MiB\", \"auto\" (the default: 256 MiB or a quarter of the database, whichever is larger) or \"off\"",
                            s.get_ref()
                        ),
                    );
                    ok = false;
                }
            },
        }
    }
    if let Some(s) = &rp.wal.segment_max {
        match parse_size(s.get_ref()) {
            Some(v) if v > 0 => wal.segment_max = v,
            _ => {
                d.at(
                    s.span(),
                    format!(
                        "wal.segment_max '{}' is not a size: write e.g. \"16MiB\"",
                        s.get_ref()
                    ),
                );
                ok = false;
            }
        }
    }
    if let Some(n) = &rp.wal.checkpoint_pages {
        if *n.get_ref() == 0 {
            d.at(
                n.span(),
                "wal.checkpoint_pages must be at least 1 (default 1000)".into(),
            );
            ok = false;
        } else {
            wal.checkpoint_pages = *n.get_ref();
        }
    }
    wal.sync_interval = positive_duration(
        d,
        "wal.sync_interval",
        &rp.wal.sync_interval,
        wal.sync_interval,
        "\"1s\" or \"500ms\"",
        &mut ok,
    );
    if let Some(s) = &rp.wal.spool_max {
        match parse_size(s.get_ref()) {
            Some(v) => wal.spool_max = v,
            None => {
                d.at(
                    s.span(),
                    format!(
                        "wal.spool_max '{}' is not a size: write e.g. \"1GiB\" or \"512MiB\"",
                        s.get_ref()
                    ),
                );
                ok = false;
            }
        }
    }
    // A spool smaller than one segment can never hold what it must ship:
    // the stream would call a healthy target full and ship nothing.
    if let Some(s) = &rp.wal.spool_max
        && wal.spool_max < wal.segment_max
    {
        d.at(
            s.span(),
            format!(
                "wal.spool_max '{}' is smaller than one segment (wal.segment_max, {} bytes): the stream could ship nothing; raise spool_max (default \"1GiB\") or lower segment_max",
                s.get_ref(),
                wal.segment_max
            ),
        );
        ok = false;
    }
    if wal.enabled && !matches!(source, Some(Source::Sqlite { .. }) | None) {
        d.whole(format!("policy '{name}': [wal] streaming is for sqlite sources; PostgreSQL WAL is archived by pgBackRest"));
        ok = false;
    }

    let compression_level = match &rp.compression.level {
        Some(l) if !(1..=19).contains(l.get_ref()) => {
            d.at(l.span(), format!("compression.level {} is out of range: use 1 (fast) to 19 (small); 3 is the default", l.get_ref()));
            ok = false;
            3
        }
        Some(l) => *l.get_ref(),
        None => 3,
    };
    let format = match &rp.compression.format {
        Some(f) if !(1..=crate::repo::manifest::FORMAT_VERSION).contains(f.get_ref()) => {
            d.at(f.span(), format!("compression.format {} is not a repository format this dr writes: use 2 (the default), or 1 for backups an older dr must restore", f.get_ref()));
            ok = false;
            crate::repo::manifest::FORMAT_VERSION
        }
        Some(f) => *f.get_ref(),
        None => crate::repo::manifest::FORMAT_VERSION,
    };
    let frame_bounds =
        u64::from(crate::codec::framed::MIN_FRAME)..=u64::from(crate::codec::framed::MAX_FRAME);
    let compression_frame = match &rp.compression.frame {
        None => crate::codec::framed::DEFAULT_FRAME,
        Some(f) => match parse_size(f.get_ref()) {
            Some(n) if frame_bounds.contains(&n) => n as u32,
            _ => {
                d.at(f.span(), format!("compression.frame '{}' must be a size from 64KiB to 64MiB, e.g. \"4MiB\" (the default)", f.get_ref()));
                ok = false;
                crate::codec::framed::DEFAULT_FRAME
            }
        },
    };
    let encrypted = match &rp.encryption {
        None => true,
        Some(e) if e.get_ref() == "age" => true,
        Some(e) if e.get_ref() == "none" => false,
        Some(e) => {
            d.at(e.span(), format!("encryption = \"{}\" is not known: leave it out (age, the default) or write \"none\"", e.get_ref()));
            ok = false;
            true
        }
    };
    let source = source?;
    if matches!(source, Source::Postgres(_)) {
        for t in policy_targets.iter().filter_map(|t| targets.get(t)) {
            if let TargetKind::S3(s3) = &t.kind
                && let Some(why) = upload::pgbackrest_lacks(&s3.upload)
            {
                d.whole(format!("policy '{name}' is PostgreSQL, backed up by pgBackRest 2.45, which has no {why} for target '{}': remove it from the target, or give this policy a target without it (pgBackRest does take sse = \"aws:kms\" with kms_key_id)", t.name));
                ok = false;
            }
        }
    }
    if matches!(source, Source::Postgres(_))
        && let Some(r) = &rp.retention
        && let Some(k) = [
            &r.keep_daily,
            &r.keep_weekly,
            &r.keep_monthly,
            &r.keep_yearly,
        ]
        .into_iter()
        .flatten()
        .next()
    {
        d.at(
            k.span(),
            "retention.keep_daily/weekly/monthly/yearly apply to SQLite policies: pgBackRest keeps by count (retention.full, retention.diff); remove the key".into(),
        );
        ok = false;
    }
    let notify = rp.notify.as_ref().map(|n| notify_of(n, d));
    let follow = match &rp.follow {
        Some(raw) => {
            let f = follow::resolve(
                &name,
                raw,
                &policy_targets,
                match (&source, &fleet) {
                    (Source::Postgres(_), _) => follow::Followed::Postgres,
                    (Source::Sqlite { .. }, Some(_)) => follow::Followed::Fleet,
                    (Source::Sqlite { .. }, None) => follow::Followed::Database,
                },
                wal.enabled,
                resolve,
                d,
            );
            ok &= f.is_some();
            f
        }
        None => None,
    };
    let hooks = match &rp.hooks {
        Some(raw) => {
            let h = hooks::resolve(raw, resolve, d);
            ok &= h.is_some();
            h
        }
        None => None,
    };
    let copy = match &rp.copy {
        Some(raw) => {
            let c = if matches!(source, Source::Postgres(_)) {
                d.whole(format!("policy '{name}': [copy] is for SQLite policies; a PostgreSQL policy gets a second copy by naming a second target, which pgBackRest writes as another repository"));
                None
            } else {
                copy::resolve(&name, raw, &policy_targets, targets, d)
            };
            ok &= c.is_some();
            c
        }
        None => None,
    };
    ok.then(|| Policy {
        name,
        file: file.to_path_buf(),
        targets: policy_targets,
        source,
        schedule,
        retention,
        wal,
        compression_level,
        format,
        compression_frame,
        encrypted,
        notify,
        fleet,
        member: None,
        follow,
        hooks,
        copy,
    })
}

/// The `[notify]` URLs, each checked to be http(s).
fn notify_of(raw: &RawNotify, d: &mut FileDiags<'_>) -> Notify {
    let mut notify = Notify::default();
    for (field, slot) in [
        (&raw.ping_url, &mut notify.ping_url),
        (&raw.kuma_url, &mut notify.kuma_url),
        (&raw.ntfy_url, &mut notify.ntfy_url),
        (&raw.webhook_url, &mut notify.webhook_url),
    ] {
        if let Some(u) = field {
            let v = u.get_ref();
            if v.starts_with("http://") || v.starts_with("https://") {
                *slot = Some(v.trim_end_matches('/').to_string());
            } else {
                d.at(
                    u.span(),
                    format!("notify URL '{v}' must start with http:// or https://"),
                );
            }
        }
    }
    notify
}

/// Parses sizes like `1GiB`, `512MiB`, `10MB`, `4096`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, text).expect("write");
    }

    #[test]
    fn shipped_examples_are_accepted_as_written() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dr.toml");
        let cfg = load(&root).expect("examples/dr.toml must load");
        assert_eq!(cfg.policies.len(), 3);
        let tenants = cfg.policy("tenants").expect("tenants");
        let fleet = tenants.fleet.as_ref().expect("a pattern makes a fleet");
        assert_eq!(fleet.dir, Path::new("/srv/tenants"));
        assert_eq!(fleet.name_of("alice.db").as_deref(), Some("alice"));
        let app = cfg.policy("app").expect("app");
        assert!(app.fleet.is_none());
        assert!(matches!(app.source, Source::Sqlite { .. }));
        assert_eq!(app.retention.full, Some(2));
        assert!(app.wal.enabled);
        assert!(matches!(
            cfg.target("s3").expect("s3").kind,
            TargetKind::S3(_)
        ));
        let pg = cfg.policy("main-pg").expect("pg");
        assert!(matches!(&pg.source, Source::Postgres(s) if s.port == 5432));
    }

    /// `[follow]` on a fleet is accepted and passed to each database (a
    /// standby's member is fenced like its fleet); a fleet's `follow.to`
    /// is refused with the reason.
    #[test]
    fn a_fleet_follows_in_place() {
        let dir = tempfile::tempdir().expect("tmp");
        let main = "state_dir = \"s\"\n[targets.local]\nkind = \"local\"\npath = \"b\"\n";
        let fleet = "name = \"t\"\ntargets = [\"local\"]\nencryption = \"none\"\n[source]\nkind = \"sqlite\"\npath = \"t/*.db\"\n[wal]\nenabled = true\n[follow]\nmax_lag = \"2m\"\n";
        write(dir.path(), "dr.toml", main);
        write(dir.path(), "policies/t.toml", fleet);
        let cfg = load(&dir.path().join("dr.toml")).expect("a fleet may say [follow]");
        let t = cfg.policy("t").expect("t");
        let m = t.member_policy("alice", dir.path().join("t/alice.db"));
        assert_eq!(m.follow, t.follow);
        assert!(m.follow.is_some());
        assert_eq!(m.copy_path(), dir.path().join("t/alice.db"));

        write(
            dir.path(),
            "policies/t.toml",
            &format!("{fleet}to = \"elsewhere\"\n"),
        );
        let Err(Error::Config(d)) = load(&dir.path().join("dr.toml")) else {
            panic!("a fleet's follow.to must be refused");
        };
        let all: Vec<String> = d.iter().map(|x| x.to_string()).collect();
        assert!(all.join("\n").contains("remove follow.to"), "{all:?}");
    }

    #[test]
    fn the_repository_example_config_is_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("dr.example.toml");
        let cfg = load(&root).expect("dr.example.toml must load");
        let app = cfg.policy("app").expect("app");
        assert_eq!(app.targets, vec!["local".to_string()]);
        assert!(app.schedule.full.is_some() && app.schedule.verify.is_some());
    }

    #[test]
    fn every_problem_is_reported_with_file_and_line() {
        let dir = tempfile::tempdir().expect("tmp");
        write(
            dir.path(),
            "dr.toml",
            "state_dir = \"s\"\nbogus = 1\n[encryption]\nrecipients = [\"age1notakey\"]\n[targets.local]\nkind = \"local\"\npath = \"b\"\n",
        );
        write(
            dir.path(),
            "policies/a.toml",
            "name = \"a\"\ntargets = [\"nowhere\"]\n[source]\nkind = \"sqlite\"\npath = \"x.db\"\n[schedule]\nfull = \"61 * * * *\"\n",
        );
        write(
            dir.path(),
            "policies/b.toml",
            "name = \"a\"\ntargets = [\"local\"]\n[source]\nkind = \"sqlite\"\npath = \"y.db\"\n",
        );
        write(
            dir.path(),
            "policies/c.toml",
            "name = \"c\"\ntargets = [\"local\"]\n[source]\nkind = \"sqlite\"\npath = \"y.db\"\n[retention]\nfull = \"two\"\n",
        );
        let Err(Error::Config(d)) = load(&dir.path().join("dr.toml")) else {
            panic!("expected config errors");
        };
        let text: Vec<String> = d.iter().map(|x| x.to_string()).collect();
        let all = text.join("\n");
        assert!(all.contains("dr.toml:2: unknown key 'bogus'"), "{all}");
        assert!(all.contains("dr.toml:4:"), "{all}");
        assert!(
            all.contains("a.toml:2: policy 'a' names target 'nowhere'"),
            "{all}"
        );
        assert!(all.contains("a.toml:7:"), "{all}");
        assert!(all.contains("b.toml:1: duplicate policy name 'a'"), "{all}");
        assert!(all.contains("c.toml:7:"), "{all}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("512 MiB"), Some(512 << 20));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("lots"), None);
    }
}
