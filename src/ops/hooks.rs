//! Running a policy's `[hooks]` around one backup to one target, for the
//! CLI and the daemon alike (`Source::backup` calls [`around`]).
//!
//! The order: `before`; the backup, only if `before` succeeded; `after`,
//! once `before` succeeded, whatever the backup's result (what `before`
//! paused must be resumed even when the backup failed); `on_failure` when
//! anything failed. A hook that fails `before` fails the backup with its
//! output in the error. A failing `after` fails the run too, saying that
//! the backup itself was committed: "ok" must also mean the hooks ran.
//!
//! A hook runs in its own process group, with stdin closed and the
//! policy, target, database, label and result in its environment, never
//! with dr's secrets (variables whose names say they hold one are taken
//! out). It is killed with its group after `[hooks] timeout`. Each run is
//! in the log and the audit log.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Hooks, Policy};
use crate::error::{Error, Result};

/// Lines of a hook's output kept for its error message.
const TAIL_LINES: usize = 20;
/// How long the output of a hook that exited is still read: a background
/// child it left can hold its pipes open for ever.
const DRAIN: Duration = Duration::from_secs(1);

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Before,
    After,
    OnFailure,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Before => "before",
            Stage::After => "after",
            Stage::OnFailure => "on_failure",
        }
    }
}

/// What a hook is told about the backup it runs around.
#[derive(Debug, Clone, Copy)]
pub struct Backup<'a> {
    pub policy: &'a Policy,
    pub target: &'a str,
    /// The SQLite file, or PostgreSQL's data directory.
    pub database: &'a Path,
    /// "full" or "diff" when asked for; empty when dr chooses.
    pub kind: &'a str,
}

/// Runs `backup` between the policy's hooks (see the module's doc).
/// `label` names what a successful backup committed.
pub fn around<T>(
    b: Backup<'_>,
    backup: impl FnOnce() -> Result<T>,
    label: impl Fn(&T) -> String,
) -> Result<T> {
    let Some(hooks) = &b.policy.hooks else {
        return backup();
    };
    // The result a hook is told: none yet (before), the label, or the error.
    let env = |stage: Stage, result: Option<std::result::Result<String, String>>| {
        let mut v = vec![
            ("DR_HOOK", stage.name().to_string()),
            ("DR_POLICY", b.policy.name.clone()),
            ("DR_TARGET", b.target.to_string()),
            ("DR_DATABASE", b.database.display().to_string()),
            ("DR_KIND", b.kind.to_string()),
        ];
        if let Some(m) = &b.policy.member {
            v.push(("DR_FLEET", m.policy.clone()));
        }
        match result {
            Some(Ok(label)) => {
                v.push(("DR_RESULT", "ok".into()));
                v.push(("DR_LABEL", label));
            }
            Some(Err(e)) => {
                v.push(("DR_RESULT", "failed".into()));
                v.push(("DR_ERROR", e));
            }
            None => {}
        }
        v
    };
    let told = |r: &Result<T>| Some(r.as_ref().map(&label).map_err(|e| e.to_string()));
    let before = match &hooks.before {
        Some(cmd) => run(hooks, b, Stage::Before, cmd, &env(Stage::Before, None)),
        None => Ok(()),
    };
    let (mut r, before_ok) = match before {
        Ok(()) => (backup(), true),
        Err(e) => (Err(e), false),
    };
    if before_ok
        && let Some(cmd) = &hooks.after
        && let Err(e) = run(hooks, b, Stage::After, cmd, &env(Stage::After, told(&r)))
    {
        r = match r {
            Ok(t) => Err(Error::Hook(format!(
                "backup {} was committed, but {e}",
                label(&t)
            ))),
            // The backup's own error stays the one reported; the hook's
            // was logged.
            Err(first) => Err(first),
        };
    }
    if r.is_err()
        && let Some(cmd) = &hooks.on_failure
    {
        // Its failure is logged and audited; the backup's error stays.
        let _ = run(
            hooks,
            b,
            Stage::OnFailure,
            cmd,
            &env(Stage::OnFailure, told(&r)),
        );
    }
    r
}

/// Runs one hook to its end or its timeout; logs and audits it. The error
/// names the policy, target, hook and command, and carries the last lines
/// of its output.
fn run(
    hooks: &Hooks,
    b: Backup<'_>,
    stage: Stage,
    argv: &[String],
    env: &[(&str, String)],
) -> Result<()> {
    let shown = argv.join(" ");
    let started = Instant::now();
    let r = spawn_and_wait(hooks, argv, env);
    let secs = started.elapsed().as_secs_f64();
    let r = r.map_err(|why| {
        Error::Hook(format!(
            "hook {} of policy '{}' (target '{}'), `{shown}`, {why}",
            stage.name(),
            b.policy.name,
            b.target
        ))
    });
    match &r {
        Ok(()) => {
            tracing::info!(policy = %b.policy.name, target = %b.target, hook = stage.name(), "hook `{shown}` ran ({secs:.2} s)")
        }
        Err(e) => tracing::error!(policy = %b.policy.name, target = %b.target, "{e}"),
    }
    crate::audit::record(
        crate::audit::Entry::new("hook")
            .policy(&b.policy.name)
            .target(b.target)
            .detail(format!("{}: {shown} ({secs:.2} s)", stage.name()))
            .outcome(&r),
    );
    r
}

/// Whether an environment variable may hold a secret dr was given: such
/// variables are not passed to hooks.
fn secret_name(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    ["SECRET", "PASSWORD", "PASSPHRASE", "TOKEN", "CREDENTIAL"]
        .iter()
        .any(|w| n.contains(w))
        || n.starts_with("AWS_")
        || n.starts_with("PGPASS")
        || n.starts_with("PGBACKREST_")
}

/// Runs the command; `Err` says why it failed ("exited with status 3
/// after 0.20 s; its output: …").
fn spawn_and_wait(
    hooks: &Hooks,
    argv: &[String],
    env: &[(&str, String)],
) -> std::result::Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("is empty".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(&hooks.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_none_or(secret_name) {
            cmd.env_remove(&k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| {
        format!(
            "could not start: {} (a program without a '/' is looked up on PATH; a path is relative to dr.toml's directory)",
            crate::error::io_reason(&e)
        )
    })?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let (done_tx, done_rx) = mpsc::channel();
    let readers = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
    ];
    let mut reading = 0;
    for out in readers.into_iter().flatten() {
        let (tail, done) = (tail.clone(), done_tx.clone());
        let spawned = std::thread::Builder::new()
            .name("hook-output".into())
            .spawn(move || {
                for line in BufReader::new(out)
                    .lines()
                    .map_while(std::result::Result::ok)
                {
                    tracing::debug!(hook_output = %line);
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
                let _ = done.send(());
            });
        reading += usize::from(spawned.is_ok());
    }
    drop(done_tx);
    let deadline = started + hooks.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("could not be waited for: {e}")),
        }
    };
    if status.is_none() {
        let _ = rustix::process::kill_process_group(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::KILL,
        );
        let _ = child.wait();
    }
    let drain_until = Instant::now() + DRAIN;
    for _ in 0..reading {
        if done_rx
            .recv_timeout(drain_until.saturating_duration_since(Instant::now()))
            .is_err()
        {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let output = || {
        let lines: Vec<String> = tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        if lines.is_empty() {
            "; it printed nothing".to_string()
        } else {
            format!("; its output ends:\n    {}", lines.join("\n    "))
        }
    };
    match status {
        None => Err(format!(
            "did not finish within {} (hooks.timeout) and was killed with its process group{}",
            humantime::format_duration(hooks.timeout),
            output()
        )),
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(format!(
            "{} after {secs:.2} s{}",
            match s.code() {
                Some(c) => format!("exited with status {c}"),
                None => "was killed by a signal".to_string(),
            },
            output()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_the_environment_are_not_passed_on() {
        for n in [
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ACCESS_KEY_ID",
            "PGPASSWORD",
            "DR_TOKEN",
            "MY_Passphrase",
            "PGBACKREST_REPO1_CIPHER_PASS",
        ] {
            assert!(secret_name(n), "{n}");
        }
        for n in ["PATH", "HOME", "LANG", "DR_LOG"] {
            assert!(!secret_name(n), "{n}");
        }
    }
}
