//! Every run of a backup or a restore drill, from the daemon or from the
//! command line (a crontab line), is recorded in the run history and
//! reported to the policy's notifications, the same way: so `/healthz`, the
//! daemon's catch-up, `dr info` and the user's alerts all see it.

use std::collections::BTreeSet;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use super::fanout::Failure;
use crate::config::{Policy, Target};
use crate::context::Context;
use crate::error::Result;
use crate::history::{History, Run};
use crate::notify;

/// The run history and notifications of one command. Shared by the
/// threads of a command that runs several databases at once (a fleet's
/// job in the daemon): one connection, held a record at a time.
pub struct RunLog<'c> {
    ctx: &'c Context,
    history: Option<Mutex<History>>,
    announced: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for RunLog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunLog")
    }
}

impl<'c> RunLog<'c> {
    /// Opens the history; a history that cannot be opened is logged and
    /// the runs go on unrecorded.
    pub fn open(ctx: &'c Context) -> Self {
        let history = match History::open(ctx.state().root()) {
            Ok(h) => Some(Mutex::new(h)),
            Err(e) => {
                tracing::error!("runs will not be recorded: {e}");
                None
            }
        };
        RunLog {
            ctx,
            history,
            announced: Mutex::new(BTreeSet::new()),
        }
    }

    /// Announces `job` on `policy` once per command (a ping `/start`).
    pub fn start(&self, policy: &Policy, job: &str) {
        let first = self
            .announced
            .lock()
            .map(|mut a| a.insert(policy.configured_name().to_string()))
            .unwrap_or(false);
        if first {
            notify::started(
                self.ctx.cfg().notify_for(policy),
                policy.configured_name(),
                job,
            );
        }
    }

    /// Records how `job` went on one target: the history and the webhook.
    /// `result` carries the backup label and its stored size.
    pub fn record(
        &self,
        policy: &Policy,
        target: &Target,
        job: &str,
        started: DateTime<Utc>,
        result: &Result<(String, u64)>,
    ) {
        let run = Run::ended(
            &policy.name,
            &target.name,
            job,
            started,
            result
                .as_ref()
                .map(|(l, s)| (l.as_str(), *s))
                .map_err(ToString::to_string),
        );
        if let Some(h) = &self.history
            && let Err(e) = h.lock().unwrap_or_else(|e| e.into_inner()).record(&run)
        {
            tracing::error!("{e}");
        }
        notify::webhook(
            self.ctx.cfg().notify_for(policy),
            &notify::Event {
                event: if run.ok { "success" } else { "failure" },
                policy: &policy.name,
                job,
                target: Some(&target.name),
                label: run.label.as_deref(),
                error: run.error.as_deref(),
                time: Utc::now().to_rfc3339(),
            },
        );
    }

    /// Takes the drills a check without the key read from the target
    /// (the newest passed, and a failure after it) into the history.
    pub fn import_drills(&self, v: &super::report::Verified) {
        for d in v
            .drills
            .iter()
            .flat_map(|d| [&d.passed, &d.failed])
            .flatten()
        {
            self.import_drill(d);
        }
    }

    /// Takes a drill that ran on another host (read from the target) into
    /// this host's history as a `verify` run, once: `/healthz`, the
    /// metrics and `dr info` then count it as this host's own drills.
    fn import_drill(&self, r: &crate::repo::drill::DrillRecord) {
        let Some(h) = &self.history else { return };
        let run = Run {
            policy: r.policy.clone(),
            target: r.target.clone(),
            kind: "verify".into(),
            started: r.finished - chrono::Duration::milliseconds((r.seconds * 1000.0) as i64),
            finished: r.finished,
            ok: r.ok,
            error: r
                .error
                .as_ref()
                .map(|e| format!("the drill on host {} failed: {e}", r.host)),
            label: Some(r.label.clone()),
            size: 0,
        };
        match h
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record_once(&run)
        {
            Ok(true) => {
                tracing::info!(policy = %r.policy, target = %r.target, host = %r.host, ok = r.ok, "a restore drill recorded on the target by another host")
            }
            Ok(false) => {}
            Err(e) => tracing::error!("{e}"),
        }
    }

    /// Reports how `job` went on `policy` over all its targets: success
    /// only when none of `failures` is this policy's.
    /// Ends a run over `policies` (members of one fleet count as their
    /// fleet policy: one message for all its databases, naming each that
    /// failed).
    pub fn finish_all<'p>(
        &self,
        policies: impl IntoIterator<Item = &'p Policy>,
        job: &str,
        failures: &[Failure],
    ) {
        let mut seen = BTreeSet::new();
        for p in policies {
            if seen.insert(p.configured_name().to_string()) {
                self.finish(p, job, failures);
            }
        }
    }

    fn finish(&self, policy: &Policy, job: &str, failures: &[Failure]) {
        let name = policy.configured_name();
        let mine: Vec<String> = failures
            .iter()
            .filter(|f| {
                f.policy == name
                    || f.policy
                        .strip_prefix(name)
                        .is_some_and(|r| r.starts_with('/'))
            })
            .map(|f| {
                // A storage error names its target already: said once.
                let error = f.error.to_string();
                let said = error.starts_with(&format!("target '{}'", f.target));
                match (f.policy.split_once('/'), said) {
                    (Some((_, db)), true) => format!("database '{db}': {error}"),
                    (Some((_, db)), false) => {
                        format!("database '{db}' on target '{}': {error}", f.target)
                    }
                    (None, true) => error,
                    (None, false) => format!("target '{}': {error}", f.target),
                }
            })
            .collect();
        let failure = (!mine.is_empty()).then(|| mine.join("\n"));
        notify::finished(
            self.ctx.cfg().notify_for(policy),
            name,
            job,
            failure.as_deref(),
        );
    }
}
