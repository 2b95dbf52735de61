//! One policy x target loop for every command and the daemon.
//!
//! A failing target never stops the others: each pair runs, each failure is
//! kept with the policy and target it belongs to, and the command ends with
//! the most severe exit code among them (see [`crate::error::severity`]).

use serde::Serialize;

use crate::config::{Config, Policy, Target};
use crate::error::{Error, Result};

/// Which of a policy's targets an operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetFilter {
    /// Every target of the policy.
    All,
    /// Targets of one kind (`local` or `s3`), as the `-local`/`-s3` commands mean.
    Kind(&'static str),
    /// One target by name.
    Name(String),
}

impl TargetFilter {
    /// The policy's targets that pass the filter. A target named on its
    /// own may also be one of the policy's copy destinations (`[copy]
    /// to`): what `dr copy` wrote there is restored, listed, verified
    /// and expired like any target's, but backups never go there.
    pub fn select<'c>(&self, cfg: &'c Config, policy: &Policy) -> Result<Vec<&'c Target>> {
        let mut out = Vec::new();
        let copies = match self {
            TargetFilter::Name(_) => policy.copy.as_ref().map_or(&[][..], |c| &c.to[..]),
            _ => &[],
        };
        for name in policy.targets.iter().chain(copies) {
            let t = cfg.target(name)?;
            let keep = match self {
                TargetFilter::All => true,
                TargetFilter::Kind(k) => t.kind.word() == *k,
                TargetFilter::Name(n) => &t.name == n,
            };
            if keep {
                out.push(t);
            }
        }
        if out.is_empty()
            && let TargetFilter::Name(n) = self
        {
            return Err(Error::NotFound(format!(
                "policy '{}' has no target named '{n}' (its targets: {}{})",
                policy.name,
                policy.targets.join(", "),
                if copies.is_empty() {
                    String::new()
                } else {
                    format!("; its copy destinations: {}", copies.join(", "))
                }
            )));
        }
        Ok(out)
    }
}

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
pub fn pairs<'p, 'c>(
    cfg: &'c Config,
    policies: &'p [Policy],
    filter: &TargetFilter,
) -> Result<Vec<(&'p Policy, &'c Target)>> {
    let mut out = Vec::new();
    for p in policies {
        for t in filter.select(cfg, p)? {
            out.push((p, t));
        }
    }
    Ok(out)
}

impl<T> Outcome<T> {
    fn new() -> Self {
        Outcome {
            done: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Adds the result of `p` on `t`.
    fn push(&mut self, p: &Policy, t: &Target, r: Result<T>) {
        match r {
            Ok(v) => self.done.push(v),
            Err(error) => self.failures.push(Failure {
                policy: p.name.clone(),
                target: t.name.clone(),
                error,
            }),
        }
    }
}

/// Runs `op` on one pair, logging a failure as it happens; `what` names
/// the operation in the log line.
fn run_pair<'p, 'c, T>(
    p: &'p Policy,
    t: &'c Target,
    what: &str,
    op: impl FnOnce(&'p Policy, &'c Target) -> Result<T>,
) -> Result<T> {
    let r = op(p, t);
    if let Err(e) = &r {
        tracing::error!(policy = %p.name, target = %t.name, "{what} failed: {e}");
    }
    r
}

/// Runs `op` on every pair, in order; `what` names the operation in the
/// log line each failure gets.
pub fn each<'p, 'c, T>(
    pairs: &[(&'p Policy, &'c Target)],
    what: &str,
    mut op: impl FnMut(&'p Policy, &'c Target) -> Result<T>,
) -> Outcome<T> {
    let mut out = Outcome::new();
    for (p, t) in pairs {
        out.push(p, t, run_pair(p, t, what, &mut op));
    }
    out
}

/// [`each`] on up to `workers` pairs at once; the outcome lists them in
/// the pairs' order, as `each` does. One worker runs them in order on the
/// calling thread.
pub fn each_concurrent<'p, 'c, T: Send>(
    pairs: &[(&'p Policy, &'c Target)],
    what: &str,
    workers: usize,
    op: impl Fn(&'p Policy, &'c Target) -> Result<T> + Sync,
) -> Outcome<T> {
    if workers <= 1 || pairs.len() <= 1 {
        return each(pairs, what, op);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<(usize, Result<T>)>> = std::sync::Mutex::default();
    std::thread::scope(|s| {
        for _ in 0..workers.min(pairs.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((p, t)) = pairs.get(i) else { return };
                    let r = run_pair(p, t, what, &op);
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, r));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    let mut out = Outcome::new();
    for ((p, t), (_, r)) in pairs.iter().zip(results) {
        out.push(p, t, r);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::context::Context;
    use crate::ops::{BackupOptions, PolicyRepo, Source};
    use crate::progress::Silent;
    use crate::repo::BackupType;
    use crate::storage::Storage;
    use crate::storage::memory::MemoryStorage;

    /// A config with policy `app` (a small SQLite database, no encryption,
    /// `retention`) on targets `a` and `b`, each an in-memory store.
    fn setup(
        retention: &str,
    ) -> (
        tempfile::TempDir,
        Context,
        Arc<MemoryStorage>,
        Arc<MemoryStorage>,
    ) {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path();
        std::fs::create_dir_all(p.join("policies")).expect("mkdir");
        std::fs::write(
            p.join("dr.toml"),
            "state_dir = \"state\"\npolicies = \"policies\"\n[targets.a]\nkind = \"local\"\npath = \"a\"\n[targets.b]\nkind = \"local\"\npath = \"b\"\n",
        )
        .expect("dr.toml");
        std::fs::write(
            p.join("policies/app.toml"),
            format!("name = \"app\"\ntargets = [\"a\", \"b\"]\nencryption = \"none\"\n[source]\nkind = \"sqlite\"\npath = \"app.db\"\n[retention]\n{retention}\n"),
        )
        .expect("policy");
        let conn = rusqlite::Connection::open(p.join("app.db")).expect("db");
        conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (randomblob(5000));")
            .expect("sql");
        let cfg = crate::config::load(&p.join("dr.toml")).expect("config");
        let (a, b) = (
            Arc::new(MemoryStorage::new("a")),
            Arc::new(MemoryStorage::new("b")),
        );
        let ctx = Context::with_stores(cfg, vec![a.clone(), b.clone()]);
        (dir, ctx, a, b)
    }

    fn backup_all(ctx: &Context, kind: BackupType) -> Outcome<crate::ops::report::BackupReport> {
        let cfg = ctx.cfg();
        let pairs = pairs(cfg, &cfg.policies, &TargetFilter::All).expect("pairs");
        let opts = BackupOptions {
            kind: Some(kind),
            lock_wait: Duration::ZERO,
        };
        each(&pairs, "backup", |p, t| {
            Source::of(p).backup(ctx, t, &opts, &Silent)
        })
    }

    #[test]
    fn a_failing_first_target_does_not_stop_the_second() {
        let (_dir, ctx, a, b) = setup("full = 2");
        a.break_it();
        let out = backup_all(&ctx, BackupType::Full);
        assert_eq!(out.done.len(), 1);
        assert_eq!(out.done[0].target, "b");
        assert_eq!(out.failures.len(), 1);
        assert_eq!(out.failures[0].target, "a");
        let json = serde_json::to_value(out.items()).expect("json");
        assert_eq!(json[1]["ok"], false, "{json}");
        assert_eq!(json[1]["exit_code"], 1, "{json}");
        assert!(
            b.list("app/backup/")
                .expect("list")
                .iter()
                .any(|o| o.key.ends_with("manifest.json"))
        );
        assert_eq!(out.error().map(|e| e.exit_code()), Some(1));
    }

    /// Concurrent pairs keep the pairs' order in the outcome, and a
    /// failing one neither stops nor reorders the others.
    #[test]
    fn concurrent_pairs_keep_their_order_and_every_failure() {
        let (_dir, ctx, a, _b) = setup("full = 2");
        a.break_it();
        let cfg = ctx.cfg();
        let pairs = pairs(cfg, &cfg.policies, &TargetFilter::All).expect("pairs");
        let opts = BackupOptions {
            kind: Some(BackupType::Full),
            lock_wait: Duration::ZERO,
        };
        let out = each_concurrent(&pairs, "backup", 4, |p, t| {
            Source::of(p).backup(&ctx, t, &opts, &Silent)
        });
        assert_eq!(out.done.len(), 1);
        assert_eq!(out.done[0].target, "b");
        assert_eq!(out.failures.len(), 1);
        assert_eq!(out.failures[0].target, "a");
    }

    #[test]
    fn several_failures_exit_with_the_most_severe() {
        let out: Outcome<()> = Outcome {
            done: Vec::new(),
            failures: vec![
                Failure {
                    policy: "p".into(),
                    target: "a".into(),
                    error: Error::NotFound("gone".into()),
                },
                Failure {
                    policy: "p".into(),
                    target: "b".into(),
                    error: Error::VerifyFailed("damaged".into()),
                },
                Failure {
                    policy: "q".into(),
                    target: "a".into(),
                    error: Error::Other("network".into()),
                },
            ],
        };
        let e = out.error().expect("error");
        assert_eq!(e.exit_code(), 3);
        let text = e.to_string();
        assert!(text.contains("policy 'p' on target 'b': damaged"), "{text}");
        assert!(text.contains("policy 'q' on target 'a': network"), "{text}");
    }

    #[test]
    fn retention_on_a_store_keeps_the_newest_fulls_and_never_a_damaged_one() {
        let (_dir, ctx, a, _b) = setup("full = 2");
        for _ in 0..3 {
            let out = backup_all(&ctx, BackupType::Full);
            assert!(out.failures.is_empty(), "{:?}", out.failures);
            std::thread::sleep(Duration::from_millis(1100));
        }
        let repo = PolicyRepo {
            storage: a.as_ref(),
            policy: "app",
        };
        let labels = |repo: &PolicyRepo<'_>| -> Vec<String> {
            repo.committed()
                .expect("committed")
                .iter()
                .map(|c| c.dir.label.to_string())
                .collect()
        };
        let kept = labels(&repo);
        assert_eq!(
            kept.len(),
            2,
            "retention.full = 2 after three fulls: {kept:?}"
        );
        // Damage the newest full: it is kept and not counted, so the older
        // one, now the newest restorable, stays as well.
        let newest = kept[1].clone();
        let key = format!("app/backup/{newest}/data.zst.age");
        a.delete(&key).expect("delete");
        let out = backup_all(&ctx, BackupType::Full);
        assert!(out.failures.is_empty(), "{:?}", out.failures);
        let now = labels(&repo);
        assert!(
            now.contains(&newest),
            "a damaged backup is never expired: {now:?}"
        );
        assert!(
            now.contains(&kept[0]),
            "the older intact full is still counted: {now:?}"
        );
        assert_eq!(now.len(), 3, "{now:?}");
    }
}
