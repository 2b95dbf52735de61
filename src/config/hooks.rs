//! `[hooks]` in a policy: commands run around each of its backups (to
//! quiesce an application, snapshot something dr does not know, page
//! someone on failure). Each is a program and its arguments, run without a
//! shell unless the user writes one (`["/bin/sh", "-c", "…"]`), so no
//! quoting in the config can turn into a second command. `ops::hooks`
//! runs them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{FileDiags, positive_duration};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHooks {
    before: Option<Spanned<toml::Value>>,
    after: Option<Spanned<toml::Value>>,
    on_failure: Option<Spanned<toml::Value>>,
    timeout: Option<Spanned<String>>,
}

/// A policy's hooks, each a program and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hooks {
    /// Before the backup; a failure (non-zero exit, timeout) fails it.
    pub before: Option<Vec<String>>,
    /// After the backup, whether it succeeded or not, once `before` (if
    /// any) succeeded: what `before` paused is resumed either way.
    pub after: Option<Vec<String>>,
    /// When the backup (or a hook) failed.
    pub on_failure: Option<Vec<String>>,
    /// The longest a hook may run; it is then killed with its process group.
    pub timeout: Duration,
    /// The directory hooks run in: dr.toml's.
    pub dir: PathBuf,
}

/// Hooks run at most this long unless `[hooks] timeout` says otherwise.
pub const TIMEOUT: Duration = Duration::from_secs(600);

/// The `[hooks]` section of a policy file, or `None` (with diagnostics)
/// when it is wrong. A program written as a path (with a `/`) is taken
/// relative to dr.toml's directory, as every path in the configuration,
/// and hooks run there; a bare name is looked up on `PATH` when the
/// hook runs. Neither is looked for now: a new host restoring from this
/// configuration need not have the hooks' programs.
pub(super) fn resolve(
    raw: &RawHooks,
    resolve: &dyn Fn(&str) -> PathBuf,
    d: &mut FileDiags<'_>,
) -> Option<Hooks> {
    let mut ok = true;
    let mut command = |field: &str, v: &Option<Spanned<toml::Value>>| -> Option<Vec<String>> {
        let v = v.as_ref()?;
        let argv = match v.get_ref() {
            toml::Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>(),
            _ => None,
        };
        match argv {
            Some(mut argv) if argv.first().is_some_and(|p| !p.trim().is_empty()) => {
                if argv[0].contains('/') {
                    argv[0] = resolve(&argv[0]).display().to_string();
                }
                Some(argv)
            }
            _ => {
                d.at(
                    v.span(),
                    format!(
                        "hooks.{field} must be a program and its arguments, e.g. [\"/usr/local/bin/app-pause\", \"--wait\"]; for a shell write [\"/bin/sh\", \"-c\", \"…\"]"
                    ),
                );
                ok = false;
                None
            }
        }
    };
    let before = command("before", &raw.before);
    let after = command("after", &raw.after);
    let on_failure = command("on_failure", &raw.on_failure);
    let timeout = positive_duration(
        d,
        "hooks.timeout",
        &raw.timeout,
        TIMEOUT,
        "\"30s\" or \"10m\", the default",
        &mut ok,
    );
    ok.then(|| Hooks {
        before,
        after,
        on_failure,
        timeout,
        dir: resolve("."),
    })
}
