//! The command line: argument parsing, output and exit codes. Every command
//! is a thin call into `ops`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::config;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::ops::runs::RunLog;
use crate::ops::{self, BackupOptions, Scope, Source, TargetFilter, fanout};
use crate::progress::Progress;
use crate::repo::BackupType;

const AFTER_HELP: &str = "\
Quick start:
  dr init --db app.db --target backups   config, policy and key for one database
  dr demo                          see the whole pipeline on a demo database
  dr keygen --output backup.key    make an age identity; put its recipient in dr.toml
  dr config validate               check dr.toml and the policies
  dr backup-local app              full or diff backup of policy 'app' to its local targets
  dr restore-local app --to /tmp/app.db --identity backup.key
  dr replicate app                 stream the WAL of 'app' to every target (Ctrl-C stops)
  dr restore-s3 app --to /tmp/app.db --at '2026-11-22 07:21:04'
  dr info --json                   every backup of every policy, for machines

Exit codes: 0 success, 1 failure, 2 configuration or secret error,
3 integrity or decryption failure, 4 lock or lease held by another run,
5 not found (policy, target or backup), 6 refused (would overwrite, not a
regular file, in use), 7 incomplete (a WAL gap keeps the newest state out of
reach: the message names the newest instant that --at can restore),
64 usage (a command line dr cannot parse). With several failures, the most
severe (3, 7, 2, 1, 4, 6, 5). Under --json an error is a JSON object on
stdout: {\"error\": \"...\", \"exit_code\": N}.";

/// Backups and disaster recovery for SQLite and PostgreSQL.
///
/// Every archive is compressed (zstd), encrypted (age) and checked (sha256),
/// and written to local volumes or S3-compatible storage.
#[derive(Debug, Parser)]
#[command(name = "dr", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// The configuration file; relative paths in it resolve against its directory.
    #[arg(long, short = 'c', global = true, env = "DR_CONFIG", default_value = config::DEFAULT_CONFIG)]
    pub config: PathBuf,

    /// How much to log on stderr; DR_LOG takes tracing filter syntax instead.
    #[arg(long, global = true, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// Only errors on stderr, and no progress bars (for cron and scripts).
    #[arg(long, short = 'q', global = true, conflicts_with = "log_level")]
    pub quiet: bool,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// How much is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn filter(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Full or diff, as given on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TypeArg {
    Full,
    Diff,
}

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Policy to back up; every policy with a target of this kind when omitted.
    pub policy: Option<String>,
    /// One database of a policy whose path is a pattern (`/srv/tenants/*.db`):
    /// its name (`alice` for alice.db). Also written `POLICY/NAME`.
    #[arg(long, value_name = "NAME")]
    pub db: Option<String>,
    /// full, or diff (pages changed since the newest full). Default: diff when a full exists.
    #[arg(long = "type", value_enum)]
    pub kind: Option<TypeArg>,
    /// Only this target (by name).
    #[arg(long)]
    pub target: Option<String>,
    /// Seconds to wait for another run holding the policy's lock.
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// Policy to restore.
    pub policy: String,
    /// One database of a policy whose path is a pattern (`/srv/tenants/*.db`):
    /// its name (`alice` for alice.db). Also written `POLICY/NAME`.
    #[arg(long, value_name = "NAME")]
    pub db: Option<String>,
    /// Database file to create. An existing file is replaced only with --force.
    #[arg(long)]
    pub to: PathBuf,
    /// Backup label to restore (see `dr info`), without WAL replay.
    #[arg(long, conflicts_with = "at")]
    pub backup: Option<String>,
    /// Point in time to restore (WAL-streamed policies): RFC 3339
    /// ("2026-11-22T07:21:04Z", "...+01:00") or "YYYY-MM-DD HH:MM:SS[.mmm]"
    /// in UTC. dr restores the newest backup at or before it, then replays
    /// the WAL up to the last commit at or before it. Without --at and
    /// --backup: the newest state the target holds.
    #[arg(long, value_parser = parse_instant)]
    pub at: Option<DateTime<Utc>>,
    /// age identity file that can decrypt the backups (or [encryption] identity_file).
    #[arg(long, env = "DR_IDENTITY")]
    pub identity: Option<PathBuf>,
    /// Replace an existing database at --to (its -wal/-shm go with it).
    #[arg(long, conflicts_with = "if_not_exists")]
    pub force: bool,
    /// Do nothing (exit 0) when --to already exists: for container
    /// entrypoints that restore only on a fresh volume.
    #[arg(long)]
    pub if_not_exists: bool,
    /// Do nothing (exit 0) when the target holds no backup yet, instead of
    /// exit 5: the first start of a new deployment.
    #[arg(long)]
    pub if_backup_exists: bool,
    /// Restore from this target (by name) when the policy has several of the kind.
    #[arg(long)]
    pub target: Option<String>,
    /// SQLite: how the restored database is proven healthy before it
    /// replaces anything. Every page written is compared with the backup's
    /// page hashes whatever this says. auto: `PRAGMA quick_check` when the
    /// newest drill of this backup on the target passed (`dr verify` ran
    /// the full `integrity_check` on it), else the full `integrity_check`
    /// (always after a WAL replay: a state no drill checked). full:
    /// `integrity_check` always. quick: `quick_check` only.
    #[arg(long, value_enum, default_value_t = CheckArg::Auto)]
    pub check: CheckArg,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--check` of a restore (see `ops::proof::Check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckArg {
    Auto,
    Quick,
    Full,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole pipeline on a demo database in ./demo (or --dir): key,
    /// config, full and diff backups under a live writer, restore, verify, info.
    Demo {
        /// Directory to create the demo in (refused when it holds anything but an earlier demo).
        #[arg(long, default_value = "demo")]
        dir: PathBuf,
    },
    /// Start a configuration for one SQLite database: dr.toml, a policy,
    /// an age key (backup.key, mode 0600: keep a copy off this host) and
    /// its recipients file, in --dir. Never overwrites anything.
    Init {
        /// The SQLite database to back up.
        #[arg(long)]
        db: PathBuf,
        /// Local directory the backups go to.
        #[arg(long)]
        target: PathBuf,
        /// The policy's name.
        #[arg(long, default_value = "app")]
        name: String,
        /// Where to write the configuration.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Write a new age X25519 identity (mode 0600) and print its recipient.
    Keygen {
        /// File to write the identity to (refused when it exists). Keep it off the backup host.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Back up policies to their local targets.
    BackupLocal(BackupArgs),
    /// Back up policies to their S3 targets.
    BackupS3(BackupArgs),
    /// Stream the WAL of SQLite policies with [wal] enabled = true to every
    /// target of each, in the foreground, until Ctrl-C or SIGTERM; then ship
    /// what is committed and exit. Starts with a full backup of a new WAL
    /// generation unless it can continue the last one.
    Replicate {
        /// Policies to stream; every policy with [wal] enabled when omitted.
        policies: Vec<String>,
        /// Run this command (through `sh -c`) as a child and stream while it
        /// runs: SIGINT and SIGTERM go to it, and when it exits dr ships what
        /// is committed and exits with its status. For containers whose
        /// entrypoint is dr (Litestream's -exec).
        #[arg(long, value_name = "COMMAND")]
        exec: Option<String>,
        /// Print the final report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A warm standby of a SQLite policy with [wal]: restore the newest
    /// state into --to (the policy's own path by default, so a standby host
    /// runs the primary's policy file and fails over in place), then apply
    /// each WAL segment as the target receives it, one source transaction
    /// at a time, until Ctrl-C or SIGTERM. Applications may open the copy
    /// read-only meanwhile: they see a committed state of the source. A new
    /// generation on the source (a restart after a gap, a VACUUM) is
    /// followed by re-basing; a gap stops with exit 7. A fleet policy
    /// without --db follows every database the target holds, in one
    /// process, into --to as a directory (default: the fleet's own); one
    /// that stops on an error is named, the others go on, and the command
    /// then exits 1.
    Follow {
        /// The policy to follow (a SQLite policy with [wal] enabled).
        policy: String,
        /// One database of a fleet policy.
        #[arg(long, value_name = "NAME")]
        db: Option<String>,
        /// Where the copy is kept (default: the policy's database path; for
        /// a whole fleet, the directory of the copies).
        #[arg(long)]
        to: Option<PathBuf>,
        /// Follow this target (default: the policy's first).
        #[arg(long)]
        target: Option<String>,
        /// age identity file that can decrypt the backups (or [encryption] identity_file).
        #[arg(long, env = "DR_IDENTITY")]
        identity: Option<PathBuf>,
        /// Replace an existing file at --to with the newest state first.
        #[arg(long)]
        force: bool,
        /// How often to look for new segments while they arrive (default:
        /// the policy's [follow] poll, else 1s).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        poll: Option<Duration>,
        /// The longest wait between looks while the source is quiet: the
        /// wait doubles from --poll up to this, so an idle follower of S3
        /// costs a few requests a minute (default: [follow] idle_poll, else
        /// 15s; a local target also wakes the follower when a segment lands).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        idle_poll: Option<Duration>,
        /// Print the final report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fail over to this host: stop the policy's `dr follow`, leave its copy
    /// at the policy's path as the live database, and write a promotion
    /// record to every target. Returns as soon as the application may
    /// write; the next `dr replicate` (or the daemon) takes the base of a
    /// new WAL generation in the same repository, so point-in-time restore
    /// spans the failover. From then on any other host (the old primary
    /// coming back) is refused when it streams, backs up or expires.
    ///
    /// A fleet without --db fails over whole: every database its pattern
    /// finds here, and any it gains later, in one record.
    Promote {
        /// The policy whose copy on this host becomes the primary.
        policy: String,
        /// One database of a fleet policy (one followed by `dr follow
        /// FLEET` as a service; a fleet with [follow] fails over whole).
        #[arg(long, value_name = "NAME")]
        db: Option<String>,
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
    },
    /// PostgreSQL policies: pgBackRest set-up.
    Pg {
        #[command(subcommand)]
        action: PgAction,
    },
    /// Which keys the stored backups need, for key rotation: add the new
    /// recipient to recipients_file (read again on change, no signal
    /// needed; inline recipients in dr.toml take a SIGHUP), and retire the
    /// old identity once `dr keys status` says no backup needs it.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Run every policy's schedules ([schedule] full/diff/verify, read in
    /// [daemon] timezone, UTC by default), the supervised WAL streamers, and
    /// /healthz + /metrics on daemon.listen, until SIGTERM or Ctrl-C. Jobs
    /// due while their policy runs another are queued, never dropped. SIGHUP
    /// reloads the config (an invalid one is logged and the running one
    /// kept; unchanged streamers keep running). Runs missed while the daemon
    /// was down run at start-up.
    Daemon,
    /// Ask the running daemon whether all is well (GET /healthz on
    /// daemon.listen): exit 0 when healthy, 1 with its problems otherwise.
    /// For container healthchecks, without curl or a shell.
    Healthcheck {
        /// Seconds to wait for an answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Restore a policy from a local target.
    RestoreLocal(RestoreArgs),
    /// Restore a policy from an S3 target.
    RestoreS3(RestoreArgs),
    /// List every backup of every policy and target: labels, chains, sizes,
    /// WAL windows, what each target covers and the daemon's runs. Exit 3
    /// when a backup is damaged or the WAL has a gap, 1 when a target
    /// cannot be read (what could be read is still printed).
    Info {
        /// Only this policy.
        policy: Option<String>,
        /// One database of a policy whose path is a pattern (`/srv/tenants/*.db`):
        /// its name (`alice` for alice.db). Also written `POLICY/NAME`.
        #[arg(long, value_name = "NAME")]
        db: Option<String>,
        /// Only this target (by name).
        #[arg(long)]
        target: Option<String>,
        /// One JSON document (schema in README.md).
        #[arg(long)]
        json: bool,
    },
    /// Restore drill: read back, decrypt, check hashes, restore to a scratch
    /// file and run integrity_check, on every target of every policy (or
    /// the ones named). PostgreSQL: pgbackrest verify, its report read.
    /// Exit code 3 when a drill finds damage or nothing to restore, 1 when a
    /// target cannot be reached; every target is tried.
    Verify {
        /// Only this policy; every policy when omitted.
        policy: Option<String>,
        /// One database of a policy whose path is a pattern (`/srv/tenants/*.db`):
        /// its name (`alice` for alice.db). Also written `POLICY/NAME`.
        #[arg(long, value_name = "NAME")]
        db: Option<String>,
        /// Drill this backup (and its full) only, instead of the whole repository.
        #[arg(long)]
        backup: Option<String>,
        /// Restore every backup to a scratch file, not only the newest.
        #[arg(long, conflicts_with = "backup")]
        restore_all: bool,
        /// Read back only this percentage of the older backups and WAL
        /// segments, chosen at random (restic's read-data-subset); the
        /// newest backup is always restored. An older backup in repository
        /// format 2 is never skipped: this share of its frames, chosen at
        /// random, is read by ranges and checked, with all its frame
        /// headers.
        #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
        sample: Option<f64>,
        /// Only this target (by name).
        #[arg(long)]
        target: Option<String>,
        /// age identity file that can decrypt the backups (or [encryption] identity_file).
        #[arg(long, env = "DR_IDENTITY")]
        identity: Option<PathBuf>,
        /// On a host that keeps no key (production, when the identity lives
        /// elsewhere): check every stored object's size and sha256 against
        /// its manifest, every diff's full and the WAL's continuity, and
        /// report the newest restore drill the host with the key recorded
        /// on the target. No restore drill runs here. `dr daemon` does this
        /// for a scheduled verify when no key is configured.
        #[arg(long, conflicts_with_all = ["identity", "backup", "restore_all", "sample"])]
        without_key: bool,
        /// Print the results as JSON (failures as objects with their exit code).
        #[arg(long)]
        json: bool,
    },
    /// Copy a policy's committed backups and WAL, as stored, from one of
    /// its targets to another: an offsite copy, a move to a new provider.
    /// No key is needed (nothing is decrypted); every object is checked
    /// against its manifest's digest on the way and a backup is committed
    /// there only once all of it is; a rerun, after a kill too, copies
    /// only what is missing. The destination is one of the policy's
    /// `[copy] to` targets (restore, info, verify and expire reach it with
    /// `--target`). Exit 3 names each backup too damaged to copy.
    Copy {
        /// The policy (a fleet: every database it holds on the source).
        policy: String,
        /// One database of a fleet policy.
        #[arg(long, value_name = "NAME")]
        db: Option<String>,
        /// The target copied from (default: `[copy] from`, else the
        /// policy's first target).
        #[arg(long, value_name = "TARGET")]
        from: Option<String>,
        /// The target copied to (default: every `[copy] to`).
        #[arg(long, value_name = "TARGET")]
        to: Option<String>,
        /// Only backups taken at or after this instant (RFC 3339,
        /// `2026-12-01`, or back from now: `7d`), the fulls their diffs
        /// need, and the WAL that continues them.
        #[arg(long, value_name = "WHEN", conflicts_with = "backup")]
        since: Option<String>,
        /// Only this backup (and its full), no WAL.
        #[arg(long, value_name = "LABEL")]
        backup: Option<String>,
        /// Seconds to wait for another run holding the policy's lock.
        #[arg(long, default_value_t = 0)]
        wait: u64,
        /// Print the results as JSON (failures as objects with their exit code).
        #[arg(long)]
        json: bool,
    },
    /// Remove backups beyond the policy's retention, and interrupted backups
    /// older than retention.incomplete_grace (default 1h).
    Expire {
        /// Only this policy; every policy when omitted.
        policy: Option<String>,
        /// One database of a policy whose path is a pattern (`/srv/tenants/*.db`):
        /// its name (`alice` for alice.db). Also written `POLICY/NAME`.
        #[arg(long, value_name = "NAME")]
        db: Option<String>,
        /// Show what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only this target (by name).
        #[arg(long)]
        target: Option<String>,
        /// Seconds to wait for another run holding the policy's lock.
        #[arg(long, default_value_t = 0)]
        wait: u64,
        /// Print what was (or would be) removed as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the audit log (state_dir/audit.log): every restore, verify,
    /// expire (each backup removed), backup, pg setup, config reload, key or
    /// secret file loaded, lease taken over and refused or failed command,
    /// one line each with time, host, uid, command, policy, target, labels
    /// and result. Secrets are never in it.
    Audit {
        /// Only entries at or after this instant (RFC 3339, `2026-12-01`,
        /// or a duration back from now: `24h`, `7d`).
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// One JSON object per line, as stored.
        #[arg(long)]
        json: bool,
        /// Read what every host shipped to this target (under `.audit/`)
        /// instead of this host's file: the record survives the host.
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// The age identity that opens the shipped log (with --target).
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
    /// Print a shell completion script: `dr completions bash > /etc/bash_completion.d/dr`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `dr man > /usr/local/share/man/man1/dr.1`;
    /// with --dir, write a page for dr and one for every subcommand there
    /// (dr.1, dr-backup-local.1, dr-keys-status.1, ...).
    Man {
        /// Write dr.1 and a dr-COMMAND.1 for every subcommand into DIR.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Per key (recipient fingerprint): current or not, the backups it
    /// opens on every target, those only it opens, and whether it can be
    /// retired. Reads every target's manifests; nothing is decrypted.
    /// Then every key and secret file dr loads, with when it last changed
    /// (due for rotation past `[security] rotate_after`), and the TLS
    /// certificate of every HTTPS endpoint dr talks to, with its expiry
    /// (to renew within `[security] cert_warn`, default 30 days).
    Status {
        /// Only the keys of these identity files (age-keygen format).
        #[arg(long, value_name = "FILE")]
        identity: Vec<PathBuf>,
        /// One JSON document.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PgAction {
    /// Write the pgBackRest config for POLICY into state_dir, turn on WAL
    /// archiving (ALTER SYSTEM, or print what to add), create the stanza
    /// and run pgBackRest's check.
    Setup {
        /// The PostgreSQL policy to set up.
        policy: String,
        /// Print what was done and what is left as JSON.
        #[arg(long)]
        json: bool,
    },
    /// What PostgreSQL's archive_command runs (`dr pg setup` writes the
    /// line): hands segment WAL to pgBackRest's archive-push unless a
    /// promotion record names another host than HOST_ID, in which case
    /// the segment is refused (exit 6) and stays in pg_wal. Reads only
    /// pgBackRest's config, which the cluster's user can read.
    #[command(hide = true)]
    ArchivePush {
        /// The PostgreSQL policy whose cluster archives.
        policy: String,
        /// The segment (`%p`).
        wal: PathBuf,
        /// The host this cluster was declared the primary on.
        #[arg(long)]
        host_id: String,
        /// The pgBackRest binary.
        #[arg(long)]
        pgbackrest: PathBuf,
        /// pgBackRest's config for the policy (under state_dir).
        #[arg(long)]
        pgbackrest_config: PathBuf,
        /// The policy's pgBackRest stanza.
        #[arg(long)]
        stanza: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Check dr.toml and every policy, and what they point at: key, secret
    /// and credential files (present, private, not empty, parse), SQLite
    /// databases, local target paths (creatable and writable), PostgreSQL
    /// clusters (a warning when one does not answer). Every problem with
    /// file:line; exit 2 when any is an error.
    Validate {
        /// Print `{"config","ok","policies","targets","findings":[{"file","line","severity","message"}]}`.
        #[arg(long)]
        json: bool,
    },
}

/// Log ceilings for crates that would otherwise print secrets.
const SDK_CAP: &str = "aws_sigv4=info,aws_smithy_runtime=info,aws_smithy_runtime_api=info,aws_config=info,aws_credential_types=info,aws_runtime=info,aws_sdk_s3=info,aws_smithy_http_client=info,aws_smithy_types=info,hyper=info,hyper_util=info,rustls=info,h2=info";

/// Sets up logging on stderr.
pub fn init_logging(cli: &Cli) {
    let level = if cli.quiet {
        LogLevel::Error
    } else {
        cli.log_level
    };
    QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    let filter = std::env::var("DR_LOG").unwrap_or_else(|_| level.filter().to_string());
    // The AWS SDK logs its resolved identity (the access key id among it)
    // at debug level and request signing at trace: those crates stop at
    // info, whatever was asked.
    let filter = if filter.contains("trace") || filter.contains("debug") {
        format!("{filter},{SDK_CAP}")
    } else {
        filter
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| BarSafe)
        .with_target(false);
    let _ = match cli.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Set by `--quiet`: no progress bars.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The progress bar on screen, if any: log lines are written around it.
static SHOWN: std::sync::Mutex<Option<ProgressBar>> = std::sync::Mutex::new(None);

/// stderr for log lines that first lifts the progress bar off the screen
/// and draws it again after, so a log line never tears it.
struct BarSafe;

impl std::io::Write for BarSafe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = SHOWN.lock().ok().and_then(|b| b.clone());
        match bar {
            Some(pb) => pb
                .suspend(|| std::io::stderr().write_all(buf))
                .map(|()| buf.len()),
            None => std::io::stderr().write_all(buf).map(|()| buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// A progress bar on the terminal, for the ops' [`Progress`].
struct Bar(ProgressBar);

impl Progress for Bar {
    fn set_total(&self, bytes: u64) {
        self.0.set_length(bytes);
        self.0.set_position(0);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Ok(mut s) = SHOWN.lock() {
            *s = None;
        }
        self.0.finish_and_clear();
    }
}

fn progress(json: bool, what: &str) -> Bar {
    let pb = progress_bar(json, what);
    if !pb.is_hidden()
        && let Ok(mut s) = SHOWN.lock()
    {
        *s = Some(pb.clone());
    }
    Bar(pb)
}

fn progress_bar(json: bool, what: &str) -> ProgressBar {
    if json || QUIET.load(std::sync::atomic::Ordering::Relaxed) || !std::io::stderr().is_terminal()
    {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Set once a command printed its JSON document: an error after it (a
/// fan-out's failures, listed in that document) is not printed twice.
static JSON_PRINTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let s = serde_json::to_string_pretty(v)
        .map_err(|e| Error::Other(format!("cannot render JSON: {e}")))?;
    println!("{s}");
    JSON_PRINTED.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

fn filter(kind: Option<&'static str>, name: Option<&String>) -> TargetFilter {
    match (name, kind) {
        (Some(n), _) => TargetFilter::Name(n.clone()),
        (None, Some(k)) => TargetFilter::Kind(k),
        (None, None) => TargetFilter::All,
    }
}

/// Runs a parsed command line. A refused or failed command is in the
/// audit log (once a configuration named its state directory).
pub fn run(cli: Cli) -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    crate::audit::set_command(&argv.join(" "));
    let config = cli.config.clone();
    let r = run_command(cli);
    if let Err(e) = &r {
        let action = match e {
            Error::Refused(_) | Error::Usage(_) => "refused",
            _ => "failed",
        };
        crate::audit::record(crate::audit::Entry::new(action).outcome(&r));
    }
    // What this command added to the audit log goes to the targets too
    // (the daemon ships on its own). A failure is a warning: the command's
    // own outcome stands.
    if crate::audit::take_written()
        && let Ok(ctx) = Context::load(&config)
    {
        crate::ops::audit_log::ship(&ctx);
    }
    r
}

fn run_command(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Demo { dir } => crate::demo::run(dir),
        Command::Init {
            db,
            target,
            name,
            dir,
        } => {
            let r = crate::init::init(dir, db, target, name)?;
            println!(
                "wrote {}, {}, {} (mode 0600) and {}",
                r.config.display(),
                r.policy.display(),
                r.identity.display(),
                r.recipients.display()
            );
            println!("recipient: {}", r.recipient);
            println!(
                "next: dr config validate && dr backup-local; keep a copy of {} off this host: without it no backup can be restored",
                r.identity.display()
            );
            Ok(())
        }
        Command::Keygen { output } => {
            let r = crate::keys::keygen(output)?;
            eprintln!(
                "wrote identity {} (mode 0600); keep it off the backup host and safe",
                output.display()
            );
            println!("{r}");
            Ok(())
        }
        Command::Config {
            action: ConfigAction::Validate { json },
        } => {
            let cfg = config::load(&cli.config)?;
            let findings = ops::validate::check(&cfg);
            let result = ops::validate::into_result(&findings);
            if *json {
                print_json(&serde_json::json!({
                    "config": cli.config,
                    "ok": result.is_ok(),
                    "policies": cfg.policies.len(),
                    "targets": cfg.targets.len(),
                    "findings": findings,
                }))?;
                return result;
            }
            for f in findings.iter().filter(|f| f.severity != "error") {
                eprintln!("{f}");
            }
            result?;
            println!(
                "{}: ok ({} polic{}, {} target{})",
                cli.config.display(),
                cfg.policies.len(),
                if cfg.policies.len() == 1 { "y" } else { "ies" },
                cfg.targets.len(),
                if cfg.targets.len() == 1 { "" } else { "s" }
            );
            Ok(())
        }
        Command::BackupLocal(a) => backup(&cli.config, a, "local"),
        Command::BackupS3(a) => backup(&cli.config, a, "s3"),
        Command::Replicate {
            policies,
            exec,
            json,
        } => replicate(&cli.config, policies, exec.as_deref(), *json),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "dr", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match dir {
                Some(dir) => clap_mangen::generate_to(cmd, dir).map_err(|e| {
                    Error::io(
                        format!("cannot write the manual pages into {}", dir.display()),
                        e,
                    )
                }),
                None => clap_mangen::Man::new(cmd)
                    .render(&mut std::io::stdout())
                    .map_err(|e| Error::io("cannot write the manual page", e)),
            }
        }
        Command::Pg {
            action:
                PgAction::ArchivePush {
                    policy,
                    wal,
                    host_id,
                    pgbackrest,
                    pgbackrest_config,
                    stanza,
                },
        } => ops::archive_fence::archive_push(&ops::archive_fence::ArchivePush {
            policy: policy.clone(),
            host_id: host_id.clone(),
            pgbackrest: pgbackrest.clone(),
            config: pgbackrest_config.clone(),
            stanza: stanza.clone(),
            wal: wal.clone(),
        }),
        Command::Pg {
            action: PgAction::Setup { policy, json },
        } => {
            let ctx = Context::load(&cli.config)?;
            let r = Source::of(ctx.cfg().policy(policy)?).pg_setup(&ctx)?;
            if *json {
                return print_json(&r);
            }
            println!(
                "{}: pgBackRest config {} (stanza {}), archive_command set{}",
                r.policy,
                r.config.display(),
                r.stanza,
                if r.checked { ", check passed" } else { "" }
            );
            for t in &r.todo {
                println!("todo: {t}");
            }
            Ok(())
        }
        Command::Daemon => {
            let stop = flag_on(&[signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
            let hup = flag_on(&[signal_hook::consts::SIGHUP])?;
            crate::daemon::run(&cli.config, &stop, &hup)
        }
        Command::Healthcheck { timeout } => healthcheck(&cli.config, *timeout),
        Command::Audit {
            since,
            json,
            target,
            identity,
        } => audit(
            &cli.config,
            since.as_deref(),
            *json,
            target.as_deref(),
            identity.as_deref(),
        ),
        Command::Keys {
            action: KeysAction::Status { identity, json },
        } => {
            let ctx = Context::load(&cli.config)?;
            let (uses, unread) = crate::ops::keys::status(&ctx, identity)?;
            let found =
                crate::ops::rotation::Findings::gather(ctx.cfg(), crate::ops::rotation::Probe::All);
            let (security, now) = (&ctx.cfg().security, chrono::Utc::now());
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "keys": uses,
                        "unread": unread,
                        "secrets": found.secrets_at(security, now),
                        "certificates": found.certs_at(security, now),
                    }))
                    .map_err(|e| Error::Other(e.to_string()))?
                );
            } else {
                print!("{}", crate::ops::keys::render(&uses, &unread));
                print!("{}", crate::ops::rotation::render(&found, security, now));
            }
            if unread.is_empty() {
                Ok(())
            } else {
                Err(Error::Other(format!(
                    "{} targets could not be read: no key is called retirable until they are",
                    unread.len()
                )))
            }
        }
        Command::Follow {
            policy,
            db,
            to,
            target,
            identity,
            force,
            poll,
            idle_poll,
            json,
        } => {
            let ctx = Context::load(&cli.config)?;
            // A fleet without --db: every database it has on the target, in
            // one process, into one directory.
            if db.is_none()
                && !policy.contains('/')
                && let Some(f) = &ctx.cfg().policy(policy)?.fleet
            {
                let p = ctx.cfg().policy(policy)?;
                let t = ctx
                    .cfg()
                    .target(target.as_deref().unwrap_or(p.follow_target()))?;
                let (poll, idle_poll) = p.follow_waits(*poll, *idle_poll);
                let opts = ops::follow::FollowOptions {
                    to: to.clone().unwrap_or_else(|| f.dir.clone()),
                    identity: identity.clone(),
                    force: *force,
                    poll,
                    idle_poll,
                    // The coordinator is alone in this process: `dr
                    // promote FLEET` may stop it with a signal.
                    shared_process: false,
                    bell: None,
                    gate: None,
                    looks: None,
                };
                let stop = flag_on(&[signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
                let r = ops::follow_fleet::follow_fleet(&ctx, p, t, &opts, &stop, None)?;
                if *json {
                    print_json(&r)?;
                } else {
                    for f in &r.followed {
                        println!(
                            "stopped following {}: {} at frame {} of generation {} ({} transactions applied)",
                            f.policy,
                            f.to.display(),
                            f.frame,
                            f.generation,
                            f.transactions
                        );
                    }
                }
                if !r.failed.is_empty() {
                    return Err(Error::Other(format!(
                        "{} database(s) of policy '{}' stopped following on an error: {}",
                        r.failed.len(),
                        r.policy,
                        r.failed
                            .iter()
                            .map(|(n, e)| format!("{n}: {e}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )));
                }
                return Ok(());
            }
            let p = &ops::members::one(&ctx, policy, db.as_deref())?;
            let t = ctx
                .cfg()
                .target(target.as_deref().unwrap_or(p.follow_target()))?;
            let to = to.clone().unwrap_or_else(|| p.copy_path());
            // PostgreSQL follows by itself: a standby data directory whose
            // restore_command fetches each archived segment.
            if let config::Source::Postgres(pg) = &p.source {
                let opts = ops::restore::RestoreOptions {
                    to,
                    backup: None,
                    identity: None,
                    force: *force,
                    at: None,
                    standby: true,
                    check: ops::proof::Check::Auto,
                };
                let r = ops::pg::restore(&ctx, p, pg, t, &opts)?;
                if *json {
                    print_json(&r)?;
                } else {
                    println!(
                        "standby of {} from {} in {} ({:.1}s)",
                        r.policy,
                        r.target,
                        r.to.display(),
                        r.seconds
                    );
                    if let Some(next) = &r.next_step {
                        println!("{next}");
                    }
                }
                return Ok(());
            }
            let stop = flag_on(&[signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
            let (poll, idle_poll) = p.follow_waits(*poll, *idle_poll);
            let opts = ops::follow::FollowOptions {
                to,
                identity: identity.clone(),
                force: *force,
                poll,
                idle_poll,
                shared_process: false,
                bell: None,
                gate: None,
                looks: None,
            };
            let r = ops::follow::follow(&ctx, p, t, &opts, &stop, &|_| {})?;
            if *json {
                print_json(&r)?;
            } else {
                println!(
                    "stopped following {} from {}: {} at frame {} of generation {} ({} transactions applied, {} re-base(s))",
                    r.policy,
                    r.target,
                    r.to.display(),
                    r.frame,
                    r.generation,
                    r.transactions,
                    r.rebased
                );
            }
            Ok(())
        }
        Command::Promote { policy, db, json } => {
            let ctx = Context::load(&cli.config)?;
            // A fleet without --db: every database of it at once.
            if db.is_none() && !policy.contains('/') && ctx.cfg().policy(policy)?.fleet.is_some() {
                let r = ops::promotion::promote_fleet(&ctx, ctx.cfg().policy(policy)?)?;
                if *json {
                    print_json(&r)?;
                } else {
                    println!(
                        "promoted: {} ({}) is the primary of fleet '{}'; its {} database(s) in {} are live, the applications may write to them now{}. Recorded on {}: any other host is refused when it streams or backs up a database of this fleet. Start `dr replicate` or the daemon here: it takes the base of a new WAL generation of each.",
                        r.host,
                        r.host_id,
                        r.policy,
                        r.databases.unwrap_or_default(),
                        r.path.display(),
                        r.follower_stopped.map_or(String::new(), |pid| format!(
                            " (the fleet's follower, pid {pid}, stopped)"
                        )),
                        r.targets.join(", ")
                    );
                }
                return Ok(());
            }
            let p = &ops::members::one(&ctx, policy, db.as_deref())?;
            let path = match &p.source {
                config::Source::Sqlite { path } => path,
                config::Source::Postgres(pg) => {
                    let r = ops::pg::promote(&ctx, p, pg)?;
                    if *json {
                        print_json(&r)?;
                    } else {
                        println!(
                            "promoted: the cluster at {} is the primary of policy '{}'; {}",
                            pg.data_dir.display(),
                            p.name,
                            if r.checked {
                                "it archives into the stanza on its new timeline (pgBackRest's check passed)".to_string()
                            } else {
                                r.todo.join("; ")
                            }
                        );
                    }
                    return Ok(());
                }
            };
            let r = ops::promotion::promote(&ctx, p, path)?;
            if *json {
                print_json(&r)?;
            } else {
                println!(
                    "promoted: {} ({}) is the primary of policy '{}'; {} is the live database, the application may write to it now{}. Recorded on {}: any other host is refused when it streams or backs up this policy. Start `dr replicate` or the daemon here: it takes the base of a new WAL generation.",
                    r.host,
                    r.host_id,
                    r.policy,
                    r.path.display(),
                    r.follower_stopped.map_or(String::new(), |pid| format!(
                        " (the follower, pid {pid}, stopped)"
                    )),
                    r.targets.join(", ")
                );
            }
            Ok(())
        }
        Command::RestoreLocal(a) => restore(&cli.config, a, "local"),
        Command::RestoreS3(a) => restore(&cli.config, a, "s3"),
        Command::Info {
            policy,
            db,
            target,
            json,
        } => {
            let ctx = Context::load(&cli.config)?;
            let policies =
                ops::members::select(&ctx, policy.as_deref(), db.as_deref(), Scope::Stored)?;
            let policies: Vec<&config::Policy> = policies.iter().collect();
            let mut info = ops::info::info(&ctx, &policies, &filter(None, target.as_ref()))?;
            if db.is_none() {
                let excluded = ops::members::unnamed(&ctx, policy.as_deref());
                info.policies
                    .extend(excluded.iter().map(|(p, f)| ops::info::excluded(p, f)));
            }
            if *json {
                print_json(&info)?;
            } else {
                print!("{}", ops::info::render(&info));
            }
            info.problems().map_or(Ok(()), Err)
        }
        Command::Verify {
            policy,
            db,
            backup,
            restore_all,
            sample,
            target,
            identity,
            without_key,
            json,
        } => {
            let ctx = Context::load(&cli.config)?;
            let opts = ops::verify::VerifyOptions {
                label: backup.clone(),
                identity: identity.clone(),
                restore_all: *restore_all,
                sample: *sample,
                without_key: *without_key,
            };
            let job = if *without_key { "check" } else { "verify" };
            let policies =
                ops::members::select(&ctx, policy.as_deref(), db.as_deref(), Scope::Stored)?;
            let pairs = fanout::pairs(ctx.cfg(), &policies, &filter(None, target.as_ref()))?;
            let log = RunLog::open(&ctx);
            let out = fanout::each(&pairs, job, |p, t| {
                log.start(p, job);
                let started = chrono::Utc::now();
                let pb = progress(*json, &format!("{job} {}/{}", p.name, t.name));
                let v = Source::of(p).verify(&ctx, t, &opts, &pb);
                drop(pb);
                let recorded = v.as_ref().map(|v| (v.label.clone(), 0));
                log.record(
                    p,
                    t,
                    job,
                    started,
                    &recorded.map_err(|e| Error::Other(e.to_string())),
                );
                if let Ok(v) = &v {
                    log.import_drills(v);
                }
                match &v {
                    Ok(v) if v.without_key && !*json => {
                        println!("{}", ops::report::render_checked(v));
                    }
                    Ok(v) if !*json => println!(
                        "ok    {} on {}: {} ({:.1}s){}",
                        v.policy,
                        v.target,
                        v.label,
                        v.seconds,
                        match (v.backups_read, v.segments_read) {
                            (Some(b), Some(s)) => format!(
                                ": {b} backup(s) and {s} WAL segment(s) read back{}, {} restored",
                                v.frames_sampled.map_or(String::new(), |f| format!(
                                    " ({} of them by a sample of {} of their {} frames)",
                                    f.backups, f.read, f.frames
                                )),
                                v.restored.len()
                            ),
                            _ => String::new(),
                        }
                    ),
                    Err(e) if !*json => println!("FAIL  {} on {}: {e}", p.name, t.name),
                    _ => {}
                }
                v
            });
            log.finish_all(pairs.iter().map(|(p, _)| *p), job, &out.failures);
            finish(out, *json)
        }
        Command::Copy {
            policy,
            db,
            from,
            to,
            since,
            backup,
            wait,
            json,
        } => {
            let opts = ops::copy::CopyOptions {
                since: since.as_deref().map(parse_since).transpose()?,
                backup: backup
                    .as_deref()
                    .map(|b| {
                        b.parse()
                            .map_err(|e| Error::Usage(format!("--backup: {e}")))
                    })
                    .transpose()?,
                lock_wait: Duration::from_secs(*wait),
            };
            copy(
                &cli.config,
                policy,
                db.as_deref(),
                from.as_ref(),
                to.as_ref(),
                &opts,
                *json,
            )
        }
        Command::Expire {
            policy,
            db,
            dry_run,
            target,
            wait,
            json,
        } => {
            let ctx = Context::load(&cli.config)?;
            let policies =
                ops::members::select(&ctx, policy.as_deref(), db.as_deref(), Scope::Stored)?;
            let pairs = fanout::pairs(ctx.cfg(), &policies, &filter(None, target.as_ref()))?;
            let out = fanout::each(&pairs, "expire", |p, t| {
                Source::of(p).expire(&ctx, t, *dry_run, Duration::from_secs(*wait))
            });
            let all: Vec<&ops::report::Expired> = out.done.iter().flatten().collect();
            if *json {
                let mut items: Vec<serde_json::Value> = Vec::new();
                for e in &all {
                    items.push(to_json(e)?);
                }
                for f in &out.failures {
                    items.push(to_json(f)?);
                }
                print_json(&items)?;
            } else {
                if all.is_empty() && out.failures.is_empty() {
                    println!("nothing to expire");
                }
                for e in &all {
                    println!(
                        "{} {} {} on {}: {}",
                        match (e.removed, e.kept) {
                            (true, _) => "removed",
                            (false, true) => "keeps",
                            (false, false) => "would remove",
                        },
                        e.policy,
                        e.label,
                        e.target,
                        e.reason
                    );
                }
            }
            out.error().map_or(Ok(()), Err)
        }
    }
}

/// `dr copy`: every database of the policy, to every destination asked.
fn copy(
    config: &Path,
    policy: &str,
    db: Option<&str>,
    from: Option<&String>,
    to: Option<&String>,
    opts: &ops::copy::CopyOptions,
    json: bool,
) -> Result<()> {
    let ctx = Context::load(config)?;
    let policies = ops::members::select(&ctx, Some(policy), db, Scope::Stored)?;
    let mut pairs = Vec::new();
    for p in &policies {
        for d in ops::copy::ends(ctx.cfg(), p, from, to)?.1 {
            pairs.push((p, d));
        }
    }
    let bar = progress(json, "copy");
    let out = fanout::each(&pairs, "copy", |p, dst| {
        let (src, _) = ops::copy::ends(ctx.cfg(), p, from, Some(&dst.name))?;
        ops::copy::copy(&ctx, p, src, dst, opts, &bar)
    });
    if !json {
        for c in &out.done {
            println!(
                "copied {} from {} to {}: {} backup(s){}, {} already there; {} WAL object(s), {} already there; {} in {:.1} s{}",
                c.policy,
                c.from,
                c.to,
                c.copied.len(),
                if c.copied.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", c.copied.join(", "))
                },
                c.present,
                c.wal_copied,
                c.wal_present,
                crate::units::human_bytes(c.bytes),
                c.seconds,
                if c.conflicts.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; the destination holds other backups under {}: left as they are",
                        c.conflicts.join(", ")
                    )
                }
            );
        }
    }
    finish(out, json)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Other(format!("cannot render JSON: {e}")))
}

/// Ends a fanned-out command: `--json` prints every report and failure;
/// the exit code is the most severe failure's.
fn finish<T: serde::Serialize>(out: fanout::Outcome<T>, json: bool) -> Result<()> {
    if json {
        print_json(&out.items())?;
    }
    out.error().map_or(Ok(()), Err)
}

fn backup(config_path: &Path, a: &BackupArgs, kind: &'static str) -> Result<()> {
    let ctx = Context::load(config_path)?;
    let policies = ops::members::select(&ctx, a.policy.as_deref(), a.db.as_deref(), Scope::OnDisk)?;
    let opts = BackupOptions {
        kind: a.kind.map(|k| match k {
            TypeArg::Full => BackupType::Full,
            TypeArg::Diff => BackupType::Diff,
        }),
        lock_wait: Duration::from_secs(a.wait),
    };
    let pairs = fanout::pairs(ctx.cfg(), &policies, &filter(Some(kind), a.target.as_ref()))?;
    if pairs.is_empty() {
        return Err(Error::NotFound(match &a.policy {
            Some(p) => format!("policy '{p}' has no {kind} target: add one to its `targets`"),
            None => format!("no policy has a {kind} target"),
        }));
    }
    // Recorded and reported like the daemon's runs, so a crontab line is
    // covered by /healthz, catch-up and the policy's alerts.
    let log = RunLog::open(&ctx);
    let job = opts.kind.map_or("backup", BackupType::word);
    let out = fanout::each(&pairs, "backup", |p, t| {
        log.start(p, job);
        let started = chrono::Utc::now();
        let pb = progress(a.json, &format!("{} -> {}", p.name, t.name));
        let r = Source::of(p).backup(&ctx, t, &opts, &pb);
        drop(pb);
        let kind = match &r {
            Ok(r) => r.kind.to_string(),
            Err(_) => opts.kind.unwrap_or(BackupType::Diff).word().to_string(),
        };
        let recorded = r.as_ref().map(|r| (r.label.clone(), r.stored_size));
        log.record(
            p,
            t,
            &kind,
            started,
            &recorded.map_err(|e| Error::Other(e.to_string())),
        );
        if let (Ok(r), false) = (&r, a.json) {
            print_backup(r);
        }
        r
    });
    log.finish_all(pairs.iter().map(|(p, _)| *p), job, &out.failures);
    finish(out, a.json)
}

fn print_backup(r: &ops::report::BackupReport) {
    if let Some(n) = &r.note {
        println!("note: {n}");
    }
    let pages = r.pages.as_ref().map_or(String::new(), |p| {
        format!("{} pages stored of {}, ", p.pages_stored, p.page_count)
    });
    println!(
        "ok {} backup {} of {} on {}: {pages}{} -> {} in {:.1}s",
        r.kind,
        r.label,
        r.policy,
        r.target,
        ops::human_bytes(r.size),
        ops::human_bytes(r.stored_size),
        r.seconds
    );
    for e in &r.expired {
        println!("expired {e}");
    }
}

fn restore(config_path: &Path, a: &RestoreArgs, kind: &'static str) -> Result<()> {
    let ctx = Context::load(config_path)?;
    let p = &ops::members::one(&ctx, &a.policy, a.db.as_deref())?;
    let targets = filter(Some(kind), a.target.as_ref()).select(ctx.cfg(), p)?;
    let t = match targets.as_slice() {
        [] => {
            return Err(Error::NotFound(format!(
                "policy '{}' has no {kind} target (its targets: {})",
                p.name,
                p.targets.join(", ")
            )));
        }
        [t] => *t,
        many => {
            return Err(Error::Other(format!(
                "policy '{}' has several {kind} targets ({}): choose one with --target",
                p.name,
                many.iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    };
    // An empty directory is where a PostgreSQL restore goes: not "existing".
    let empty_dir = std::fs::read_dir(&a.to).is_ok_and(|mut d| d.next().is_none());
    if a.if_not_exists && std::fs::symlink_metadata(&a.to).is_ok() && !empty_dir {
        println!(
            "{} exists: nothing restored (--if-not-exists)",
            a.to.display()
        );
        return Ok(());
    }
    let opts = ops::restore::RestoreOptions {
        to: a.to.clone(),
        backup: a.backup.clone(),
        identity: a.identity.clone(),
        force: a.force,
        at: a.at,
        standby: false,
        check: match a.check {
            CheckArg::Auto => ops::proof::Check::Auto,
            CheckArg::Quick => ops::proof::Check::Quick,
            CheckArg::Full => ops::proof::Check::Full,
        },
    };
    let pb = progress(a.json, &format!("restore {} <- {}", p.name, t.name));
    let r = Source::of(p).restore(&ctx, t, &opts, &pb);
    drop(pb);
    let r = match r {
        Err(Error::NotFound(why)) if a.if_backup_exists => {
            println!("nothing restored (--if-backup-exists): {why}");
            return Ok(());
        }
        r => r?,
    };
    if a.json {
        return print_json(&r);
    }
    let what = match (&r.label, r.chain.is_empty()) {
        (_, false) => format!("backup {}", r.chain.join(" + ")),
        (Some(l), true) => format!("backup {l}"),
        (None, true) => match r.at {
            Some(at) => format!("state at {}", at.to_rfc3339()),
            None => "newest state".to_string(),
        },
    };
    let wal = match &r.wal {
        Some(w) => format!(
            " + WAL of generation {} ({} transactions from {} segments, last commit {})",
            w.generation,
            w.transactions,
            w.segments,
            w.last_commit.map_or("none".into(), |t| t.to_rfc3339())
        ),
        None => String::new(),
    };
    let checked = match (r.bytes, &r.proof) {
        (Some(b), Some(p)) => format!(
            " ({}; {} pages read back equal to the backup's; {} ok{})",
            ops::human_bytes(b),
            p.pages_identical,
            p.check,
            p.drill.as_ref().map_or(String::new(), |d| format!(
                ", integrity_check by the drill of {} on {} (newest backup drilled: {})",
                d.finished
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                d.host,
                d.label
            ))
        ),
        (Some(b), None) => format!(" ({})", ops::human_bytes(b)),
        _ => String::new(),
    };
    println!(
        "restored {} {what}{wal} from {} into {}{checked} in {:.1}s",
        r.policy,
        r.target,
        r.to.display(),
        r.seconds
    );
    if let Some(n) = &r.next_step {
        println!("{n}");
    }
    Ok(())
}

/// The application `dr replicate --exec` runs as its child.
struct App {
    child: std::sync::Arc<std::sync::Mutex<std::process::Child>>,
    watcher: std::thread::JoinHandle<()>,
}

impl App {
    /// Starts `cmd` through `sh -c`. A watcher thread forwards SIGINT or
    /// SIGTERM (the `stop` flag) to it, and sets `stop` when it exits, so
    /// the streamers ship what is committed and end.
    fn start(cmd: &str, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<App> {
        use std::sync::atomic::Ordering;
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .spawn()
            .map_err(|e| Error::io(format!("cannot start `{cmd}` (--exec)"), e))?;
        let pid = child.id();
        tracing::info!(pid, "started the application: {cmd}");
        let child = std::sync::Arc::new(std::sync::Mutex::new(child));
        let watcher = {
            let child = child.clone();
            std::thread::spawn(move || {
                let mut forwarded = false;
                loop {
                    let exited = child
                        .lock()
                        .map(|mut c| !matches!(c.try_wait(), Ok(None)))
                        .unwrap_or(true);
                    if exited {
                        stop.store(true, Ordering::SeqCst);
                        return;
                    }
                    if stop.load(Ordering::SeqCst) && !forwarded {
                        terminate(pid);
                        forwarded = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Ok(App { child, watcher })
    }

    /// Waits for the application (asking it to stop first if it still
    /// runs) and returns its exit status (128 + signal when killed).
    fn finish(self) -> Result<i32> {
        use std::os::unix::process::ExitStatusExt;
        let status = {
            let mut c = self.child.lock().map_err(|_| {
                Error::Other("internal: the application's handle is poisoned".into())
            })?;
            if matches!(c.try_wait(), Ok(None)) {
                terminate(c.id());
            }
            c.wait()
                .map_err(|e| Error::io("cannot wait for the application (--exec)", e))?
        };
        let _ = self.watcher.join();
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(1);
        tracing::info!("the application exited with status {code}");
        Ok(code)
    }
}

/// Asks a process to stop (SIGTERM).
fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// `dr healthcheck`: the daemon's /healthz, as an exit code.
fn audit(
    config: &Path,
    since: Option<&str>,
    json: bool,
    target: Option<&str>,
    identity: Option<&Path>,
) -> Result<()> {
    let since = since.map(parse_since).transpose()?;
    let (entries, torn) = match target {
        Some(name) => {
            let ctx = Context::load(config)?;
            let t = ctx.cfg().target(name)?.clone();
            let all = crate::ops::audit_log::read_target(&ctx, &t, identity)?;
            let kept = all
                .into_iter()
                .filter(|e| since.is_none_or(|s| e.time.is_some_and(|t| t >= s)))
                .collect();
            (kept, 0)
        }
        None => crate::audit::read(&config::load(config)?.state_dir, since)?,
    };
    for e in &entries {
        if json {
            println!(
                "{}",
                serde_json::to_string(e).map_err(|e| Error::Other(e.to_string()))?
            );
        } else {
            let time = e
                .time
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default();
            let mut line = format!("{time} {} uid={} {}", e.host, e.uid, e.action);
            for (k, v) in [("policy", &e.policy), ("target", &e.target)] {
                if let Some(v) = v {
                    line.push_str(&format!(" {k}={v}"));
                }
            }
            if !e.labels.is_empty() {
                line.push_str(&format!(" labels={}", e.labels.join(",")));
            }
            if let Some(d) = &e.detail {
                line.push_str(&format!(" ({d})"));
            }
            line.push_str(&format!(": {}", e.result));
            // Every field came from somewhere a user controls (a --to path,
            // an error): one entry is one line, whatever it holds.
            println!("{}", crate::audit::escape(&line));
        }
    }
    if torn > 0 {
        tracing::warn!("{torn} lines of the audit log are not entries (a write cut short)");
    }
    Ok(())
}

/// `--since`: an instant (as `--at` takes it), a date, or a duration back
/// from now.
fn parse_since(s: &str) -> Result<chrono::DateTime<Utc>> {
    if let Ok(t) = parse_instant(s) {
        return Ok(t);
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc());
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(Utc::now() - chrono::Duration::from_std(d).unwrap_or_default()),
        Err(_) => Err(Error::Usage(format!(
            "--since '{s}' is not an instant (2026-12-01T10:00:00Z), a date (2026-12-01) or a duration back from now (24h, 7d)"
        ))),
    }
}

fn healthcheck(config: &Path, timeout: u64) -> Result<()> {
    let cfg = config::load(config)?;
    // Port 0: the system picked one, which the running daemon recorded.
    let listen = if cfg.daemon_listen.ends_with(":0") {
        let file = crate::state_dir::StateDir::new(&cfg.state_dir).daemon_listen();
        std::fs::read_to_string(&file)
            .map(|a| a.trim().to_string())
            .map_err(|e| {
                Error::Other(format!(
                    "daemon.listen asks for port 0 and {} (where the running daemon names the port it bound) cannot be read: {e}: is the daemon running?",
                    file.display()
                ))
            })?
    } else {
        cfg.daemon_listen.clone()
    };
    // A daemon listening on every address answers on loopback too.
    let listen = listen
        .replace("0.0.0.0:", "127.0.0.1:")
        .replace("[::]:", "[::1]:");
    let url = format!("http://{listen}/healthz");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(timeout)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(&url);
    // With the token the daemon names what is wrong, not only that it is.
    if let Some(f) = &cfg.daemon_token_file {
        use age::secrecy::ExposeSecret;
        let token = crate::secret::read_secret(f)?;
        req = req.header(
            "Authorization",
            &format!("Bearer {}", token.expose_secret()),
        );
    }
    let mut resp = req
        .call()
        .map_err(|e| Error::Other(format!("the daemon does not answer at {url}: {e}")))?;
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    println!("{body}");
    if status == 200 {
        Ok(())
    } else {
        Err(Error::Other(format!(
            "the daemon is unhealthy ({status} from {url})"
        )))
    }
}

/// Parses `--sample`: a percentage above 0 and at most 100.
fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(p),
        _ => Err(format!(
            "'{s}' is not a percentage: write a number above 0 and at most 100, e.g. 10"
        )),
    }
}

/// Parses `--at`: RFC 3339, or `YYYY-MM-DD HH:MM:SS[.fff]` taken as UTC.
pub fn parse_instant(s: &str) -> std::result::Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s.trim(), fmt) {
            return Ok(t.and_utc());
        }
    }
    Err(format!(
        "'{s}' is not a time: write RFC 3339 (2026-11-22T07:21:04Z) or 'YYYY-MM-DD HH:MM:SS' in UTC"
    ))
}

/// A flag that any of `signals` sets (the long-running commands poll it).
fn flag_on(signals: &[i32]) -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for &sig in signals {
        signal_hook::flag::register(sig, flag.clone())
            .map_err(|e| Error::Other(format!("cannot install the signal handler: {e}")))?;
    }
    Ok(flag)
}

fn replicate(config: &Path, names: &[String], exec: Option<&str>, json: bool) -> Result<()> {
    let ctx = Context::load(config)?;
    let cfg = ctx.cfg();
    let policies: Vec<&config::Policy> = if names.is_empty() {
        cfg.policies.iter().filter(|p| p.wal.enabled).collect()
    } else {
        let mut v = Vec::new();
        for n in names {
            let p = cfg.policy(n)?;
            if !p.wal.enabled {
                return Err(Error::Refused(format!(
                    "policy '{n}' does not stream its WAL: set [wal] enabled = true in its policy file"
                )));
            }
            v.push(p);
        }
        v
    };
    if policies.is_empty() {
        return Err(Error::NotFound(format!(
            "no policy in {} has [wal] enabled = true: nothing to stream",
            config.display()
        )));
    }
    let stop = flag_on(&[signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    tracing::info!(
        "streaming {}; Ctrl-C or SIGTERM ships what is committed and stops",
        policies
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let app = match exec {
        Some(cmd) => Some(App::start(cmd, stop.clone())?),
        None => None,
    };
    let results = ops::replicate::replicate(&ctx, &policies, &stop);
    // The streamers are done (the application exited, a signal came, or a
    // streamer failed): the application stops too, and its status is ours.
    let app_status = app.map(App::finish).transpose()?;
    // Each failure was logged by the streamer as it happened; the command
    // says them once more, together, as its error (and exit code).
    let mut failed: Vec<(String, Error)> = Vec::new();
    let mut reports = Vec::new();
    for (name, r) in results {
        match r {
            Ok(r) => {
                if r.unshipped > 0 {
                    failed.push((
                        format!("policy '{name}'"),
                        Error::Other(format!(
                            "{} WAL segment(s) left unshipped in the spool; they ship when dr replicate runs again",
                            r.unshipped
                        )),
                    ));
                }
                reports.push(r);
            }
            Err(e) => failed.push((format!("policy '{name}'"), e)),
        }
    }
    // One failure keeps its own type (and exit code), named.
    let first_err = match failed.len() {
        0 => None,
        1 => failed.pop().map(|(who, e)| match e {
            Error::Other(m) => Error::Other(format!("{who}: {m}")),
            e => e,
        }),
        _ => Some(Error::Several(failed)),
    };
    if json {
        print_json(&reports)?;
    } else {
        // A fleet's idle databases are one line, not a thousand.
        let many = reports.len() > 10;
        let mut idle = 0;
        for r in &reports {
            if many && r.frames == 0 {
                idle += 1;
                continue;
            }
            println!(
                "{}: generation {}, {} segments, {} frames shipped this run",
                r.policy, r.generation, r.segments, r.frames
            );
        }
        if idle > 0 {
            println!("{idle} more database(s) streamed with no commit this run");
        }
    }
    match (first_err, app_status) {
        (Some(e), _) => Err(e),
        (None, Some(status)) if status != 0 => Err(Error::Child(status)),
        (None, _) => Ok(()),
    }
}

/// The exit code for a command line dr cannot parse (sysexits' EX_USAGE),
/// apart from the configuration's 2.
pub const EXIT_USAGE: i32 = 64;

/// Prints clap's message for a command line it could not parse and returns
/// the exit code: 0 for `--help` and `--version`, [`EXIT_USAGE`] otherwise.
///
/// `--help` and `--version` exit 0; anything else is a usage error, exit
/// 64: a command line with no command too (the help it prints is the
/// answer to a mistake, not a success a script should take for one). Under
/// `--json` the error is also one JSON object on stdout, as for any other
/// failure.
pub fn usage_error(e: &clap::Error) -> i32 {
    let _ = e.print();
    let code = match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
        _ => EXIT_USAGE,
    };
    if code != 0 && std::env::args().any(|a| a == "--json") {
        let first = e.to_string();
        let first = first
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("error: ");
        let v = serde_json::json!({"error": first, "exit_code": code});
        println!("{v}");
    }
    code
}

/// Reports a failed command: on stderr, and under `--json` also as one JSON
/// object on stdout, so a script reading stdout gets the error too.
pub fn report_error(e: &Error, json: bool) {
    eprintln!("dr: error: {e}");
    if json && !JSON_PRINTED.load(std::sync::atomic::Ordering::Relaxed) {
        let v = serde_json::json!({"error": e.to_string(), "exit_code": e.exit_code()});
        println!("{v}");
    }
}

impl Cli {
    /// Whether the command asked for `--json`.
    pub fn json(&self) -> bool {
        match &self.command {
            Command::BackupLocal(a) | Command::BackupS3(a) => a.json,
            Command::RestoreLocal(a) | Command::RestoreS3(a) => a.json,
            Command::Replicate { json, .. }
            | Command::Info { json, .. }
            | Command::Verify { json, .. }
            | Command::Expire { json, .. }
            | Command::Copy { json, .. }
            | Command::Audit { json, .. }
            | Command::Keys {
                action: KeysAction::Status { json, .. },
            } => *json,
            Command::Pg {
                action: PgAction::Setup { json, .. },
            } => *json,
            Command::Config {
                action: ConfigAction::Validate { json },
            } => *json,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every option and argument of every command says what it is for.
    #[test]
    fn every_option_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(format!("{path} {}", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "dr", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
        Cli::command().debug_assert();
    }
}
