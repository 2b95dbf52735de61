//! One policy x target loop for every command and the daemon.
//!
//! A failing target never stops the others: each pair runs, each failure is
//! kept with the policy and target it belongs to, and the command ends with
//! the most severe exit code among them (see [`crate::error::severity`]).

use serde::Serialize;

use super::TargetFilter;
use crate::config::{Config, Policy, Target};
use crate::error::{Error, Result};

/// One policy on one target that failed.
#[derive(Debug)]
pub struct Failure {
    pub policy: String,
    pub target: String,
    pub error: Error,
}

impl Serialize for Failure {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Failure", 5)?;
        st.serialize_field("policy", &self.policy)?;
        st.serialize_field("target", &self.target)?;
        st.serialize_field("ok", &false)?;
        st.serialize_field("error", &self.error.to_string())?;
        st.serialize_field("exit_code", &self.error.exit_code())?;
        st.end()
    }
}

/// What a fan-out did: every success, every failure.
#[derive(Debug)]
pub struct Outcome<T> {
    pub done: Vec<T>,
    pub failures: Vec<Failure>,
}

/// One element of a command's `--json` array: a report, or a failure object
/// (`{"policy","target","ok":false,"error","exit_code"}`).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Item<'a, T> {
    Done(&'a T),
    Failed(&'a Failure),
}

impl<T> Outcome<T> {
    /// Successes then failures, for `--json`.
    pub fn items(&self) -> Vec<Item<'_, T>> {
        self.done
            .iter()
            .map(Item::Done)
            .chain(self.failures.iter().map(Item::Failed))
            .collect()
    }

    /// The command's result: nothing failed, one error as it is, or
    /// several with the exit code of the most severe.
    pub fn error(self) -> Option<Error> {
        let mut f = self.failures;
        match f.len() {
            0 => None,
            1 => f.pop().map(|f| f.error),
            _ => Some(Error::Several(
                f.into_iter()
                    .map(|f| {
                        (
                            format!("policy '{}' on target '{}'", f.policy, f.target),
                            f.error,
                        )
                    })
                    .collect(),
            )),
        }
    }
}

/// Every (policy, target) pair the filter selects, in config order.
pub fn pairs<'c>(
    cfg: &'c Config,
    policies: &[&'c Policy],
    filter: &TargetFilter,
) -> Result<Vec<(&'c Policy, &'c Target)>> {
    let mut out = Vec::new();
    for p in policies {
        for t in filter.select(cfg, p)? {
            out.push((*p, t));
        }
    }
    Ok(out)
}

/// Runs `op` on every pair, in order; `what` names the operation in the
/// log line each failure gets.
pub fn each<'c, T>(
    pairs: &[(&'c Policy, &'c Target)],
    what: &str,
    mut op: impl FnMut(&'c Policy, &'c Target) -> Result<T>,
) -> Outcome<T> {
    let mut out = Outcome {
        done: Vec::new(),
        failures: Vec::new(),
    };
    for (p, t) in pairs {
        match op(p, t) {
            Ok(v) => out.done.push(v),
            Err(error) => {
                tracing::error!(policy = %p.name, target = %t.name, "{what} failed: {error}");
                out.failures.push(Failure {
                    policy: p.name.clone(),
                    target: t.name.clone(),
                    error,
                });
            }
        }
    }
    out
}
