//! A policy's source, decided once: the only place dr matches on whether a
//! policy backs up SQLite or PostgreSQL. The CLI and the daemon call these
//! methods and get the same reports from either.

use std::path::Path;
use std::time::Duration;

use super::listing::{self, Listing};
use super::report::{BackupReport, Expired, RestoreReport, Verified};
use super::restore::RestoreOptions;
use super::{backup, expire, pg, restore, verify};
use crate::config::{self, PgSource, Policy, Target};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::lock::Lock;
use crate::progress::Progress;
use crate::repo::BackupType;

/// What a policy backs up, with the policy.
#[derive(Debug, Clone, Copy)]
pub enum Source<'p> {
    Sqlite {
        policy: &'p Policy,
        db: &'p Path,
    },
    Postgres {
        policy: &'p Policy,
        pg: &'p PgSource,
    },
}

/// Options of a backup run.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Full or diff; `None` chooses diff when a full exists, else full.
    pub kind: Option<BackupType>,
    /// How long to wait for another dr holding this policy's lock.
    pub lock_wait: Duration,
}

impl<'p> Source<'p> {
    pub fn of(policy: &'p Policy) -> Source<'p> {
        match &policy.source {
            config::Source::Sqlite { path } => Source::Sqlite { policy, db: path },
            config::Source::Postgres(pg) => Source::Postgres { policy, pg },
        }
    }

    pub fn policy(&self) -> &'p Policy {
        match self {
            Source::Sqlite { policy, .. } | Source::Postgres { policy, .. } => policy,
        }
    }

    /// Takes a full or diff backup to `target` under the policy's lock,
    /// then expires by the policy's retention.
    pub fn backup(
        &self,
        ctx: &Context,
        target: &Target,
        opts: &BackupOptions,
        progress: &dyn Progress,
    ) -> Result<BackupReport> {
        let _lock = lock(ctx, self.policy(), target, "backup", opts.lock_wait)?;
        crate::audit::writable()?;
        let (policy, database) = match *self {
            Source::Sqlite { policy, db } => (policy, db),
            Source::Postgres { policy, pg } => (policy, pg.data_dir.as_path()),
        };
        let around = super::hooks::Backup {
            policy,
            target: &target.name,
            database,
            kind: opts.kind.map_or("", |k| k.word()),
        };
        let r = super::hooks::around(
            around,
            || match *self {
                Source::Sqlite { policy, db } => {
                    backup::backup(ctx, policy, db, target, opts.kind, progress, None)
                }
                Source::Postgres { policy, pg } => pg::backup(ctx, policy, pg, target, opts.kind),
            },
            |b| b.label.clone(),
        );
        audit(
            self.policy(),
            target,
            "backup",
            r,
            |b| vec![b.label.clone()],
            None,
        )
    }

    /// Restores from `target` into `opts.to`.
    pub fn restore(
        &self,
        ctx: &Context,
        target: &Target,
        opts: &RestoreOptions,
        progress: &dyn Progress,
    ) -> Result<RestoreReport> {
        crate::audit::writable()?;
        let r = match *self {
            Source::Sqlite { policy, .. } => restore::restore(ctx, policy, target, opts, progress),
            Source::Postgres { policy, pg } => pg::restore(ctx, policy, pg, target, opts),
        };
        let detail = match opts.at {
            Some(at) => format!("to {} at {}", opts.to.display(), at.to_rfc3339()),
            None => format!("to {}", opts.to.display()),
        };
        audit(
            self.policy(),
            target,
            "restore",
            r,
            |rep| rep.chain.clone(),
            Some(detail),
        )
    }

    /// The restore drill on `target`: a failure is an error (exit 3 for
    /// damage, 1 when the target could not be read).
    pub fn verify(
        &self,
        ctx: &Context,
        target: &Target,
        opts: &verify::VerifyOptions,
        progress: &dyn Progress,
    ) -> Result<Verified> {
        crate::audit::writable()?;
        let r = self.verify_unaudited(ctx, target, opts, progress);
        audit(
            self.policy(),
            target,
            "verify",
            r,
            |v| vec![v.label.clone()],
            None,
        )
    }

    fn verify_unaudited(
        &self,
        ctx: &Context,
        target: &Target,
        opts: &verify::VerifyOptions,
        progress: &dyn Progress,
    ) -> Result<Verified> {
        match *self {
            Source::Sqlite { policy, .. } => verify::verify(ctx, policy, target, opts, progress),
            Source::Postgres { policy, pg } => {
                if let Some(l) = &opts.label {
                    return Err(Error::Refused(format!(
                        "policy '{}' is PostgreSQL: pgBackRest verifies the whole repository, not one backup ({l}); run it without --backup",
                        policy.name
                    )));
                }
                pg::verify(ctx, policy, pg, target)
            }
        }
    }

    /// What `target` holds for the policy. Reads only: nothing is written,
    /// locked or taken over. A target that cannot be read is reported in
    /// the listing, not as an error.
    pub fn list(&self, ctx: &Context, target: &Target) -> Listing {
        match *self {
            Source::Sqlite { policy, .. } => listing::list_sqlite(ctx, policy, target),
            Source::Postgres { policy, pg } => listing::list_pg(ctx, policy, pg, target),
        }
    }

    /// Removes what the policy's retention no longer keeps on `target`.
    pub fn expire(
        &self,
        ctx: &Context,
        target: &Target,
        dry_run: bool,
        lock_wait: Duration,
    ) -> Result<Vec<Expired>> {
        let _lock = lock(ctx, self.policy(), target, "expire", lock_wait)?;
        if !dry_run {
            crate::audit::writable()?;
        }
        match *self {
            Source::Sqlite { policy, .. } => expire::expire(ctx, policy, target, dry_run),
            Source::Postgres { policy, pg } => pg::expire(ctx, policy, pg, target, dry_run),
        }
    }
}

/// The audit line of an action on `target`: the labels a success names,
/// or the error. A line that cannot be written fails the action's result
/// (an action dr cannot record is not reported as done).
pub fn audit<T>(
    policy: &Policy,
    target: &Target,
    action: &str,
    r: Result<T>,
    labels: impl FnOnce(&T) -> Vec<String>,
    detail: Option<String>,
) -> Result<T> {
    let mut e = crate::audit::Entry::new(action)
        .policy(&policy.name)
        .target(&target.name)
        .labels(r.as_ref().map(labels).unwrap_or_default())
        .outcome(&r);
    if let Some(d) = detail {
        e = e.detail(d);
    }
    let recorded = crate::audit::record_checked(e);
    let r = r?;
    recorded?;
    Ok(r)
}

/// The state_dir lock of a policy on a target: one dr at a time per host.
pub fn lock(
    ctx: &Context,
    policy: &Policy,
    target: &Target,
    what: &str,
    wait: Duration,
) -> Result<Lock> {
    Lock::acquire(&ctx.state().locks(), &policy.name, &target.name, what, wait)
}

impl Source<'_> {
    /// `dr pg setup`: pgBackRest's config, archiving, stanza and check.
    /// SQLite needs no setup, and says so.
    pub fn pg_setup(&self, ctx: &Context) -> Result<pg::SetupReport> {
        let r = self.pg_setup_unaudited(ctx);
        crate::audit::record(
            crate::audit::Entry::new("pg_setup")
                .policy(&self.policy().name)
                .outcome(&r),
        );
        r
    }

    fn pg_setup_unaudited(&self, ctx: &Context) -> Result<pg::SetupReport> {
        match *self {
            Source::Postgres { policy, pg } => pg::setup(ctx, policy, pg),
            Source::Sqlite { policy, .. } => Err(Error::Refused(format!(
                "policy '{}' is a SQLite policy: `dr pg setup` is for PostgreSQL policies (SQLite needs no setup: run `dr backup-local {}`)",
                policy.name, policy.name
            ))),
        }
    }
}
