//! The command line as scripts and containers use it: exit codes, --json
//! errors, --quiet, completions and the manual, restore guards for
//! entrypoints, and `replicate --exec`.

mod common;

use std::process::Command;

use common::{Env, dump, make_db};

fn raw(args: &[&str]) -> common::Run {
    common::Run::from(
        Command::new(common::dr_bin())
            .args(args)
            .output()
            .expect("run dr"),
    )
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    let r = raw(&["--log-level", "verbose", "info"]);
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("possible values"), "{}", r.stderr);
    assert_eq!(raw(&["no-such-command"]).code, 64);
    assert_eq!(raw(&["backup-local", "--type", "weekly"]).code, 64);
    // No command at all is a mistake too, not a success.
    let none = raw(&[]);
    assert_eq!(none.code, 64, "{}", none.stderr);
    assert!(none.stderr.contains("Usage"), "{}", none.stderr);
    // Under --json a usage error is a JSON object on stdout as well.
    let j = raw(&["info", "--json", "--bogus"]);
    assert_eq!(j.code, 64, "{}", j.stderr);
    let v = j.json();
    assert_eq!(v["exit_code"], 64, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("--bogus")),
        "{v}"
    );
    let h = raw(&["--help"]);
    assert_eq!(h.code, 0);
    assert!(h.stdout.contains("64 usage"), "{}", h.stdout);
    assert_eq!(raw(&["--version"]).code, 0);
    let d = raw(&["daemon", "--help"]);
    assert!(d.stdout.contains("timezone"), "{}", d.stdout);
}

#[test]
fn errors_under_json_are_a_json_object_on_stdout() {
    let env = Env::new("");
    let r = env.dr(&["info", "no-such-policy", "--json"]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["exit_code"], 5, "{j}");
    assert!(
        j["error"]
            .as_str()
            .is_some_and(|e| e.contains("no-such-policy")),
        "{j}"
    );
    // A configuration error is one too.
    std::fs::write(env.config(), "state_dir = [").expect("cfg");
    let r = env.dr(&["backup-local", "--json"]);
    assert_eq!(r.code, 2);
    assert_eq!(r.json()["exit_code"], 2, "{}", r.stdout);
}

#[test]
fn quiet_logs_only_errors() {
    let env = Env::new("");
    make_db(&env.db, true, 50, 100);
    let r = env.dr(&["-q", "backup-local", "app"]).ok();
    assert!(r.stderr.trim().is_empty(), "{}", r.stderr);
    assert!(r.stdout.starts_with("ok full backup"), "{}", r.stdout);
    let loud = env.dr(&["backup-local", "app"]).ok();
    assert!(loud.stderr.contains("INFO"), "{}", loud.stderr);
}

#[test]
fn completions_and_the_manual_page() {
    let b = raw(&["completions", "bash"]);
    assert_eq!(b.code, 0);
    assert!(b.stdout.contains("restore-local"), "{}", b.stdout);
    let z = raw(&["completions", "zsh"]);
    assert!(z.stdout.contains("#compdef dr"), "{}", z.stdout);
    let m = raw(&["man"]);
    assert_eq!(m.code, 0);
    assert!(m.stdout.contains(".TH dr"), "{}", m.stdout);
    assert!(
        m.stdout.contains("dr \\- Backups and disaster recovery"),
        "the name line says dr once: {}",
        m.stdout
    );
    // A page for every subcommand, nested ones too.
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().display().to_string();
    assert_eq!(raw(&["man", "--dir", &d]).code, 0);
    for page in [
        "dr.1",
        "dr-backup-local.1",
        "dr-restore-s3.1",
        "dr-keys-status.1",
        "dr-config-validate.1",
        "dr-pg-setup.1",
        "dr-daemon.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }
}

#[test]
fn restore_guards_for_container_entrypoints() {
    let env = Env::new("");
    make_db(&env.db, true, 50, 100);
    // No backup yet: --if-backup-exists makes the first start a no-op.
    let r = env.restore("r.db", &["--if-backup-exists"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("nothing restored"), "{}", r.stdout);
    assert!(!env.path("r.db").exists());
    assert_eq!(env.restore("r.db", &[]).code, 5);
    env.dr(&["backup-local", "app"]).ok();
    // An existing database is left alone with --if-not-exists.
    std::fs::write(env.path("r.db"), b"the application's own file").expect("write");
    let r = env.restore("r.db", &["--if-not-exists"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read(env.path("r.db")).expect("read"),
        b"the application's own file"
    );
    std::fs::remove_file(env.path("r.db")).expect("rm");
    env.restore("r.db", &["--if-not-exists"]).ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
}

#[test]
fn replicate_exec_streams_while_the_application_runs_and_exits_with_its_status() {
    let env = Env::new("[wal]\nenabled = true\nsync_interval = \"1s\"\n");
    make_db(&env.db, true, 50, 100);
    let db = env.db.display().to_string();
    let app = format!(
        "sleep 3; sqlite3 '{db}' \"PRAGMA busy_timeout=5000; INSERT INTO t(v) VALUES ('from the app')\"; sleep 2; exit 3"
    );
    let r = env.dr(&["replicate", "app", "--exec", &app]);
    assert_eq!(r.code, 3, "the application's status: {}", r.stderr);
    assert!(r.stderr.contains("exited with status 3"), "{}", r.stderr);
    // What the application committed was shipped before dr exited.
    env.restore("r.db", &[]).ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
    assert!(
        dump(&env.path("r.db"))
            .iter()
            .any(|row| row.contains("from the app")),
        "the row the application wrote"
    );
}

#[test]
fn restores_verifies_expiries_and_refusals_are_in_the_audit_log_and_no_secret_is() {
    let env = Env::new("[retention]\nfull = 1\n");
    let pass = env.path("pass.txt");
    let secret = "correct-horse-battery-audit-9";
    env.use_passphrase(&pass, &format!("{secret}\n"), 0o600);
    common::make_db(&env.db, true, 50, 500);
    let first = env.full_backup("backup-local");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // retention.full = 1: this backup's expire removes the first.
    env.dr(&["backup-local", "app", "--type", "full"]).ok();
    let to = env.path("restored.db").display().to_string();
    env.dr(&["restore-local", "app", "--to", &to]).ok();
    // A restore over an existing file without --force is refused.
    let refused = env.dr(&["restore-local", "app", "--to", &to]);
    assert_eq!(refused.code, 6, "{}", refused.stderr);
    env.dr(&["verify", "app"]).ok();

    let lines: Vec<serde_json::Value> = env
        .dr(&["audit", "--json"])
        .ok()
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let of = |action: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["action"] == action).collect()
    };
    for l in &lines {
        for field in ["time", "host", "uid", "pid", "command", "result"] {
            assert!(!l[field].is_null(), "{field} missing: {l}");
        }
    }
    assert_eq!(of("backup").len(), 2, "{lines:?}");
    let expired = of("expire");
    assert!(
        expired.iter().any(|e| e["labels"][0] == first.as_str()
            && e["policy"] == "app"
            && e["target"] == "local"),
        "the first full's removal: {expired:?}"
    );
    let restores = of("restore");
    assert!(
        restores.iter().any(|r| r["result"] == "ok"
            && r["detail"].as_str().is_some_and(|d| d.contains(&to))
            && r["labels"].as_array().is_some_and(|l| !l.is_empty())),
        "{restores:?}"
    );
    assert!(
        of("verify").iter().any(|v| v["result"] == "ok"),
        "{lines:?}"
    );
    let refusals = of("refused");
    assert!(
        refusals.iter().any(|r| r["command"]
            .as_str()
            .is_some_and(|c| c.contains("restore-local"))),
        "{lines:?}"
    );
    // Key files are named, never quoted.
    assert!(
        of("secret_loaded")
            .iter()
            .any(|s| s["detail"] == pass.display().to_string().as_str()),
        "{lines:?}"
    );
    let log = std::fs::read_to_string(env.path("state/audit.log")).expect("audit.log");
    assert!(!log.contains(secret), "the passphrase is in the audit log");
    for root in ["state", "backups"] {
        for f in common::files_under(&env.path(root)) {
            let bytes = std::fs::read(env.path(root).join(&f)).unwrap_or_default();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "the passphrase is in {root}/{f}"
            );
        }
    }
    let mode = std::fs::metadata(env.path("state/audit.log"))
        .expect("meta")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // --since filters; a bad --since is a usage error.
    let later = env.dr(&["audit", "--since", "2999-01-01", "--json"]).ok();
    assert!(later.stdout.trim().is_empty(), "{}", later.stdout);
    assert_eq!(env.dr(&["audit", "--since", "yesterday-ish"]).code, 64);
    // The text form names the action, the policy and the labels.
    let text = env.dr(&["audit", "--since", "1h"]).ok().stdout;
    assert!(
        text.contains("expire policy=app target=local labels="),
        "{text}"
    );
    // Each command shipped its lines to the target, encrypted: erasing the
    // host's log does not erase the record.
    let shipped: Vec<String> = common::files_under(&env.path("backups"))
        .into_iter()
        .filter(|o| o.starts_with(".audit/"))
        .collect();
    assert!(!shipped.is_empty(), "{:?}", env.objects());
    for o in &shipped {
        let bytes = std::fs::read(env.path("backups").join(o)).expect("object");
        assert!(
            bytes.starts_with(b"age-encryption.org/v1"),
            "{o} is not age"
        );
    }
    std::fs::remove_file(env.path("state/audit.log")).expect("erase");
    let remote: Vec<serde_json::Value> = env
        .dr(&["audit", "--target", "local", "--json"])
        .ok()
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    for action in ["backup", "expire", "restore", "verify", "refused"] {
        assert!(
            remote.iter().any(|l| l["action"] == action),
            "{action} not shipped: {remote:?}"
        );
    }
}

#[test]
fn keys_status_names_the_backups_an_old_key_opens_and_retires_it_after_expire() {
    let env = Env::new("[retention]\nfull = 3\n");
    make_db(&env.db, true, 50, 500);
    let old_pub = std::fs::read_to_string(env.path("backup.pub")).expect("pub");
    let first = env.full_backup("backup-local");
    // Rotation: the new recipient is added beside the old one, then the
    // old one is removed.
    let new_key = env.path("new.key");
    let new_pub = env
        .dr(&["keygen", "--output", &new_key.display().to_string()])
        .ok()
        .stdout;
    std::fs::write(env.path("backup.pub"), format!("{}{}", old_pub, new_pub)).expect("pub");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.dr(&["backup-local", "app", "--type", "full"]).ok();
    std::fs::write(env.path("backup.pub"), &new_pub).expect("pub");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.dr(&["backup-local", "app", "--type", "full"]).ok();

    let old = env.key_arg();
    let status = |env: &Env| {
        let j = env
            .dr(&["keys", "status", "--identity", &old, "--json"])
            .ok()
            .json();
        j["keys"][0].clone()
    };
    let k = status(&env);
    assert_eq!(k["current"], false, "{k}");
    assert_eq!(k["backups"].as_array().map(|a| a.len()), Some(2), "{k}");
    assert_eq!(
        k["needed_by"],
        serde_json::json!([format!("app/local/{first}")]),
        "only the first backup needs the old key alone: {k}"
    );
    assert_eq!(k["retirable"], false, "{k}");
    let text = env.dr(&["keys", "status", "--identity", &old]).ok().stdout;
    assert!(
        text.contains("keep it until retention has expired them"),
        "{text}"
    );

    // Retention now keeps one full: once expire removes the old ones, the
    // old key opens nothing stored and can be retired.
    std::fs::write(
        env.path("policies/app.toml"),
        std::fs::read_to_string(env.path("policies/app.toml"))
            .expect("policy")
            .replace("full = 3", "full = 1"),
    )
    .expect("policy");
    env.dr(&["expire", "app"]).ok();
    let k = status(&env);
    assert_eq!(k["retirable"], true, "{k}");
    assert_eq!(k["backups"].as_array().map(|a| a.len()), Some(0), "{k}");
    // The new key restores what is left.
    let to = env.path("r.db").display().to_string();
    let nk = new_key.display().to_string();
    env.dr(&["restore-local", "app", "--to", &to, "--identity", &nk])
        .ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
}
