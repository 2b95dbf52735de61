//! `[follow]` in a policy: this host keeps a warm standby of the policy
//! (`dr follow` run by the daemon) instead of backing it up. The section
//! is what makes a standby's configuration differ from the primary's; once
//! `dr promote` names this host the primary, the daemon streams and backs
//! the policy up as any primary's would, and the section is left alone.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{FileDiags, positive_duration};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFollow {
    target: Option<Spanned<String>>,
    to: Option<Spanned<String>>,
    poll: Option<Spanned<String>>,
    idle_poll: Option<Spanned<String>>,
    max_lag: Option<Spanned<String>>,
}

/// How this host follows a policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Follow {
    /// The target followed (default: the policy's first).
    pub target: String,
    /// Where the copy is kept (default: the policy's own path, so that a
    /// promotion fails over in place).
    pub to: Option<PathBuf>,
    /// How often the target is asked while segments arrive.
    pub poll: Duration,
    /// The longest wait between two looks while the source is quiet: the
    /// wait doubles from `poll` up to this, so an idle follower of an S3
    /// target costs a few requests a minute; the first commit after a
    /// quiet spell is seen at most this late.
    pub idle_poll: Duration,
    /// A copy not known complete for longer than this is reported as
    /// behind (`follower_behind`).
    pub max_lag: Duration,
}

/// Defaults: looks every second, every 15 s when idle, behind after a minute.
pub const POLL: Duration = Duration::from_secs(1);
pub const IDLE_POLL: Duration = Duration::from_secs(15);
pub const MAX_LAG: Duration = Duration::from_secs(60);

/// What a policy with `[follow]` backs up.
pub(super) enum Followed {
    /// One SQLite database.
    Database,
    /// A fleet: every database is followed into the pattern's own
    /// directory, so that `dr promote` fails the fleet over in place.
    Fleet,
    /// PostgreSQL: a standby cluster replays the archive by itself.
    Postgres,
}

/// The resolved `[follow]` of policy `name`, whose targets are `targets`;
/// `kind` and `streams` say what its source is (SQLite with `[wal]`: a
/// database or a fleet).
pub(super) fn resolve(
    name: &str,
    raw: &RawFollow,
    targets: &[String],
    kind: Followed,
    streams: bool,
    resolve: &dyn Fn(&str) -> PathBuf,
    d: &mut FileDiags<'_>,
) -> Option<Follow> {
    let mut ok = true;
    match kind {
        Followed::Database => {}
        Followed::Fleet => {
            if let Some(to) = &raw.to {
                d.at(
                    to.span(),
                    format!(
                        "policy '{name}' is a fleet: its standby keeps each copy where the path pattern says, so that `dr promote {name}` fails the fleet over in place; remove follow.to"
                    ),
                );
                ok = false;
            }
        }
        Followed::Postgres => {
            d.whole(format!(
                "policy '{name}': [follow] keeps a standby of SQLite databases; a PostgreSQL standby follows by itself (`dr follow {name}` makes one)"
            ));
            ok = false;
        }
    }
    if !streams {
        d.whole(format!(
            "policy '{name}': [follow] needs [wal] enabled = true (the standby applies the WAL the primary streams)"
        ));
        ok = false;
    }
    let target = match &raw.target {
        Some(t) if !targets.contains(t.get_ref()) => {
            d.at(
                t.span(),
                format!(
                    "follow.target '{}' is not a target of policy '{name}': use one of {}",
                    t.get_ref(),
                    targets.join(", ")
                ),
            );
            ok = false;
            String::new()
        }
        Some(t) => t.get_ref().clone(),
        None => targets.first().cloned().unwrap_or_default(),
    };
    let short = "\"1s\" or \"500ms\"";
    let poll = positive_duration(d, "follow.poll", &raw.poll, POLL, short, &mut ok);
    let idle_poll = positive_duration(
        d,
        "follow.idle_poll",
        &raw.idle_poll,
        IDLE_POLL,
        short,
        &mut ok,
    )
    .max(poll);
    let max_lag = positive_duration(d, "follow.max_lag", &raw.max_lag, MAX_LAG, short, &mut ok);
    if max_lag < idle_poll
        && let Some(s) = &raw.max_lag
    {
        d.at(
            s.span(),
            format!(
                "follow.max_lag ({}) is shorter than follow.idle_poll ({}): a quiet source would look behind; raise max_lag or lower idle_poll",
                s.get_ref(),
                humantime::format_duration(idle_poll)
            ),
        );
        ok = false;
    }
    ok.then(|| Follow {
        target,
        to: raw.to.as_ref().map(|t| resolve(t.get_ref())),
        poll,
        idle_poll,
        max_lag,
    })
}

impl super::Policy {
    /// The target this host follows: `[follow] target`, else the first.
    pub fn follow_target(&self) -> &str {
        self.follow.as_ref().map_or_else(
            || self.targets.first().map_or("", String::as_str),
            |f| f.target.as_str(),
        )
    }

    /// Where this host keeps its copy: `[follow] to`, else the database's
    /// own place (a promotion then fails over in place).
    pub fn copy_path(&self) -> PathBuf {
        match (
            self.follow.as_ref().and_then(|f| f.to.clone()),
            &self.source,
        ) {
            (Some(to), _) => to,
            (None, super::Source::Sqlite { path }) => path.clone(),
            (None, super::Source::Postgres(pg)) => pg.data_dir.clone(),
        }
    }

    /// How often this host looks while segments arrive, and the longest
    /// wait while the source is quiet: what is asked (`--poll`,
    /// `--idle-poll`), else `[follow]`, else the defaults.
    pub fn follow_waits(
        &self,
        poll: Option<Duration>,
        idle_poll: Option<Duration>,
    ) -> (Duration, Duration) {
        let poll = poll
            .or(self.follow.as_ref().map(|f| f.poll))
            .unwrap_or(POLL);
        let idle = idle_poll
            .or(self.follow.as_ref().map(|f| f.idle_poll))
            .unwrap_or(IDLE_POLL);
        (poll, idle.max(poll))
    }
}
