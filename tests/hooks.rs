//! `[hooks]` against the real binary: before, after and on_failure around
//! backups from the CLI and the daemon, their environment, their failures
//! and timeouts, and the audit log.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;

/// A hook script: appends its arguments and what dr told it to hooks.log,
/// writes a row into the database (so a restore shows whether the backup
/// saw it), and fails when a file named `fail-<stage>` exists.
const SCRIPT: &str = r#"#!/bin/sh
stage="$1"
printf '%s|%s|%s|%s|%s|%s|%s|%s|%s\n' "$stage" "$2" "$DR_HOOK" "$DR_POLICY" "$DR_TARGET" "$DR_KIND" "$DR_RESULT" "$DR_LABEL" "${AWS_SECRET_ACCESS_KEY:-no secret}" >> hooks.log
[ -n "$DR_ERROR" ] && printf 'error: %s\n' "$DR_ERROR" >> hooks.log
[ "$stage" = on_failure ] || python3 -c "import sqlite3,sys; c=sqlite3.connect('app.db'); c.execute('insert into t(v) values (?)', (sys.argv[1],)); c.commit()" "$stage"
if [ -e "fail-$stage" ]; then
  echo "the application would not pause ($stage)" >&2
  exit 3
fi
"#;

fn setup(extra: &str) -> Env {
    let hooks = format!(
        "[hooks]\nbefore = [\"./hook.sh\", \"before\", \"two words\"]\nafter = [\"./hook.sh\", \"after\", \"x\"]\non_failure = [\"./hook.sh\", \"on_failure\", \"x\"]\n{extra}"
    );
    let env = Env::new(&hooks);
    make_db(&env);
    let script = env.path("hook.sh");
    std::fs::write(&script, SCRIPT).expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    env
}

/// The database the hooks write into (python's sqlite3, as an application would).
fn make_db(env: &Env) {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('pragma journal_mode=wal'); c.execute('create table t(v text)'); c.execute(\"insert into t values ('source')\"); c.commit()",
        ])
        .arg(&env.db)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rows(db: &std::path::Path) -> Vec<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; print('\\n'.join(r[0] for r in sqlite3.connect(sys.argv[1]).execute('select v from t order by rowid')))",
        ])
        .arg(db)
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn log(env: &Env) -> Vec<String> {
    std::fs::read_to_string(env.path("hooks.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn backup(env: &Env) -> common::Run {
    common::Run::from(
        Command::new(common::dr_bin())
            .arg("--config")
            .arg(env.config())
            .args(["backup-local", "app", "--type", "full", "--json"])
            .env("AWS_SECRET_ACCESS_KEY", "sekrit-in-drs-environment")
            .stdin(Stdio::null())
            .output()
            .expect("dr"),
    )
}

/// The policy's backups (`dr info` exits non-zero while it has none: at risk).
fn labels(env: &Env) -> Vec<String> {
    let info = env.dr(&["info", "app", "--json"]).json();
    match info["policies"][0]["targets"][0]["backups"].as_array() {
        Some(_) => common::labels_in(&info),
        None => Vec::new(),
    }
}

fn hook_audits(env: &Env) -> Vec<serde_json::Value> {
    env.dr(&["audit", "--json"])
        .ok()
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|l| l["action"] == "hook")
        .collect()
}

#[test]
fn hooks_run_around_a_backup_and_a_failing_hook_fails_it_with_its_output() {
    let env = setup("");
    // 1. Both hooks succeed: before ran before the snapshot (its row is in
    // the backup), after ran after it (its row is not), with the label.
    let r = backup(&env).ok();
    let label = r.json()[0]["label"].as_str().expect("label").to_string();
    assert_eq!(
        log(&env),
        [
            "before|two words|before|app|local|full|||no secret".to_string(),
            format!("after|x|after|app|local|full|ok|{label}|no secret"),
        ],
        "arguments are passed as written (no shell), the secret in dr's environment is not"
    );
    env.restore("restored.db", &[]).ok();
    assert_eq!(rows(&env.path("restored.db")), ["source", "before"]);
    let audits = hook_audits(&env);
    assert_eq!(audits.len(), 2, "{audits:?}");
    assert!(
        audits[0]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("before: ") && d.contains("hook.sh before two words")),
        "{audits:?}"
    );
    assert!(
        audits
            .iter()
            .all(|a| a["result"] == "ok" && a["policy"] == "app" && a["target"] == "local")
    );

    // 2. A failing before fails the backup, names itself with its output,
    // takes no backup, runs on_failure and not after.
    std::fs::remove_file(env.path("hooks.log")).expect("rm");
    std::fs::write(env.path("fail-before"), "").expect("touch");
    let r = backup(&env);
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(
        said.contains("hook before of policy 'app' (target 'local')")
            && said.contains("exited with status 3")
            && said.contains("the application would not pause (before)"),
        "{said}"
    );
    assert_eq!(
        labels(&env),
        std::slice::from_ref(&label),
        "no backup was taken"
    );
    let lines = log(&env);
    assert!(lines[0].starts_with("before|"), "{lines:?}");
    assert!(
        lines[1].starts_with("on_failure|x|on_failure|app|local|full|failed||"),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("error: hook before of policy 'app'"),
        "on_failure is told the error: {lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("after|")),
        "after runs only once before succeeded: {lines:?}"
    );
    let audits = hook_audits(&env);
    assert!(
        audits.iter().any(|a| a["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("before:"))
            && a["result"]
                .as_str()
                .is_some_and(|r| r.contains("exited with status 3"))),
        "{audits:?}"
    );

    // 3. A failing after: the backup is committed and said to be, but the
    // run fails (what before paused may not have been resumed).
    std::fs::remove_file(env.path("fail-before")).expect("rm");
    std::fs::write(env.path("fail-after"), "").expect("touch");
    let r = backup(&env);
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    let now = labels(&env);
    assert_eq!(now.len(), 2, "{now:?}");
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(
        said.contains(&format!(
            "backup {} was committed, but hook after of policy 'app'",
            now[1]
        )),
        "{said}"
    );
    assert!(log(&env).iter().any(|l| l.starts_with("on_failure|")));
}

#[test]
fn a_hook_past_its_timeout_is_killed_with_its_children() {
    let env = Env::new(
        "[hooks]\nbefore = [\"/bin/sh\", \"-c\", \"sleep 60 & echo $! > sleeper.pid; wait\"]\ntimeout = \"1s\"\n",
    );
    common::make_db(&env.db, true, 10, 100);
    let started = Instant::now();
    let r = env.dr(&["backup-local", "app"]);
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(
        r.stderr.contains(
            "did not finish within 1s (hooks.timeout) and was killed with its process group"
        ),
        "{}",
        r.stderr
    );
    let pid = std::fs::read_to_string(env.path("sleeper.pid")).expect("pid");
    let proc_dir = format!("/proc/{}", pid.trim());
    common::wait_until(
        "the hook's child to be gone",
        5,
        || !std::path::Path::new(&proc_dir).exists(),
        || format!("{proc_dir} still there"),
    );
    assert!(labels(&env).is_empty());
}

#[test]
fn the_daemon_runs_the_hooks_of_a_scheduled_backup() {
    let env = setup("[schedule]\nfull = \"*/2 * * * * *\"\n");
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "[daemon]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    let daemon = common::start_daemon(&env, &[]);
    common::wait_until(
        "a scheduled backup's after hook",
        30,
        || log(&env).iter().any(|l| l.starts_with("after|")),
        || std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default(),
    );
    drop(daemon);
    let lines = log(&env);
    let after = lines
        .iter()
        .find(|l| l.starts_with("after|"))
        .expect("after");
    let label = after.split('|').nth(7).expect("label");
    assert!(labels(&env).iter().any(|l| l == label), "{after}");
    assert!(
        lines[0].starts_with("before|two words|before|app|local|full|"),
        "{lines:?}"
    );
}
