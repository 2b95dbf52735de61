//! dr through a faulty network: a proxy in front of the real S3 server
//! resets connections, answers 500 and 503 SlowDown, adds latency and cuts
//! response bodies short on a seeded schedule. Every backup-s3, restore-s3,
//! verify and expire either succeeds with correct data or fails with a
//! clear message, and nothing committed is ever broken.

mod common;

use common::faults::{Fault, FaultProxy};
use common::s3::{S3Server, SECRET_KEY, env_at};
use std::time::Duration;

use common::{Env, dump, make_db};

fn faulty_env(proxy: &FaultProxy, extra: &str) -> Env {
    env_at(&proxy.endpoint(), "[\"s3\"]", extra, SECRET_KEY, "backups")
}

/// A failure dr may report under faults: one of `codes` (1: target or
/// network; 4: a lease left by an attempt cut off; never 3, which says the
/// backup is damaged, for a network that failed), naming the target; never
/// a panic, never a silent exit 0.
fn clear_failure(r: &common::Run, codes: &[i32]) {
    assert!(codes.contains(&r.code), "exit {}: {}", r.code, r.stderr);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(
        all.contains("'s3'") || all.contains(" on s3"),
        "names the target: {all}"
    );
    assert!(!all.contains("panicked"), "{all}");
    eprintln!("clear failure, exit {}: {}", r.code, all.trim());
}

#[test]
fn backup_restore_verify_and_expire_under_injected_faults_never_break_what_is_committed() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let proxy = FaultProxy::start(server.port, common::faults::seed(), 20);
    let env = faulty_env(&proxy, "[retention]\nfull = 2\ndiff = 2\n");
    // Incompressible rows: the full spans two 8 MiB parts.
    make_db(&env.db, true, 5_000, 2000);
    let key = env.key_arg();
    let mut committed_states: Vec<Vec<String>> = Vec::new();
    let mut ok = 0;
    for i in 0..10 {
        {
            let c = rusqlite::Connection::open(&env.db).expect("open");
            c.execute("UPDATE t SET v = randomblob(2000) WHERE id % 50 = ?1", [i])
                .expect("update");
        }
        let kind = if i % 4 == 0 { "full" } else { "diff" };
        let r = env.dr(&["backup-s3", "app", "--type", kind]);
        if r.code == 0 {
            ok += 1;
            committed_states.push(dump(&env.db));
        } else {
            clear_failure(&r, &[1, 4]);
        }
        let to = env.path(&format!("r{i}.db")).display().to_string();
        let r = env.dr(&["restore-s3", "app", "--to", &to, "--identity", &key]);
        if r.code == 0 {
            assert_eq!(
                Some(&dump(&env.path(&format!("r{i}.db")))),
                committed_states.last(),
                "a restore that says ok returns the newest committed state"
            );
        } else {
            if committed_states.is_empty() {
                assert!(matches!(r.code, 1 | 5), "{}", r.stderr);
            } else {
                clear_failure(&r, &[1]);
            }
            assert!(!env.path(&format!("r{i}.db")).exists());
        }
        let r = env.dr(&["verify", "app", "--identity", &key]);
        if r.code != 0 {
            clear_failure(&r, &[1]);
        }
        let r = env.dr(&["expire", "app"]);
        if r.code != 0 {
            clear_failure(&r, &[1, 4]);
        }
    }
    let seen = proxy.injected();
    eprintln!("faults injected: {seen:?}; {ok} of 10 backups committed");
    for f in [
        Fault::Reset,
        Fault::Status500,
        Fault::SlowDown,
        Fault::Truncate,
    ] {
        assert!(
            seen.get(&f).copied().unwrap_or(0) > 0,
            "no {f:?} injected: {seen:?}"
        );
    }
    assert!(
        ok >= 7,
        "retries (5 per request) carry most backups through 20% faults: {ok} of 10"
    );
    // The network heals: everything committed is intact and restorable.
    proxy.set_rate(0);
    let info = env.dr(&["info", "--json"]);
    assert_eq!(
        info.code, 0,
        "nothing committed is damaged: {}",
        info.stderr
    );
    let labels: Vec<String> = info.json()["policies"][0]["targets"][0]["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| b["label"].as_str().expect("label").to_string())
        .collect();
    assert!(!labels.is_empty());
    for l in &labels {
        env.dr(&["verify", "app", "--backup", l, "--identity", &key])
            .ok();
    }
    let to = env.path("final.db").display().to_string();
    env.dr(&["restore-s3", "app", "--to", &to, "--identity", &key])
        .ok();
    assert_eq!(Some(&dump(&env.path("final.db"))), committed_states.last());
}

#[test]
fn replicate_through_faults_ships_every_commit_in_order() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let proxy = FaultProxy::start(server.port, common::faults::seed() ^ 0x11, 20);
    let env = faulty_env(
        &proxy,
        "[wal]\nenabled = true\nsync_interval = \"1s\"\nsegment_max = \"256KiB\"\n",
    );
    make_db(&env.db, true, 50, 500);
    let writer = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/wal_writer.py");
    let mut dr = common::Proc::spawn(
        std::process::Command::new(common::dr_bin())
            .arg("--config")
            .arg(env.config())
            .arg("replicate")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(env.path("replicate.log")).expect("log")),
    )
    .expect("dr replicate");
    let st = std::process::Command::new("python3")
        .arg(&writer)
        .args(["write"])
        .arg(&env.db)
        .arg(env.path("marks"))
        .args(["6", "40", "700", "1000"])
        .status()
        .expect("writer");
    assert!(st.success());
    let digest = |db: &std::path::Path| {
        let o = std::process::Command::new("python3")
            .arg(&writer)
            .arg("digest")
            .arg(db)
            .output()
            .expect("digest");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let want = digest(&env.db);
    // The network heals before the stop, so SIGTERM can ship what is left.
    std::thread::sleep(Duration::from_secs(3));
    proxy.set_rate(0);
    std::thread::sleep(Duration::from_secs(3));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &dr.id().to_string()])
        .status();
    let code = dr.wait().expect("wait").code();
    let log = std::fs::read_to_string(env.path("replicate.log")).unwrap_or_default();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    eprintln!("faults injected: {:?}", proxy.injected());
    assert!(!proxy.injected().is_empty());
    let key = env.key_arg();
    let to = env.path("newest.db").display().to_string();
    // No gap, nothing damaged: at risk only because the streamer stopped.
    let info = env.dr(&["info", "--json"]);
    assert_eq!(info.code, 1, "{}", info.stderr);
    for reason in info.json()["policies"][0]["verdict"]["reasons"]
        .as_array()
        .expect("reasons")
    {
        assert_eq!(reason["reason"], "streamer_down", "{}", info.stderr);
    }
    env.dr(&["restore-s3", "app", "--to", &to, "--identity", &key])
        .ok();
    assert_eq!(digest(&env.path("newest.db")), want);
    env.dr(&["verify", "app", "--identity", &key]).ok();
}

#[test]
fn a_download_cut_short_mid_restore_is_a_network_failure_not_damage() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let proxy = FaultProxy::start(server.port, common::faults::seed(), 0);
    let env = faulty_env(&proxy, "");
    // Incompressible: the data object spans three 8 MiB parts.
    make_db(&env.db, true, 11_000, 2000);
    env.dr(&["backup-s3", "app"]).ok();
    proxy.cut_large_bodies(true);
    let key = env.key_arg();
    let to = env.path("r.db").display().to_string();
    let r = env.dr(&["restore-s3", "app", "--to", &to, "--identity", &key]);
    assert_eq!(r.code, 1, "a dropped download is exit 1: {}", r.stderr);
    assert!(
        r.stderr.contains("target 's3'") && r.stderr.contains("in transport"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("damaged"), "{}", r.stderr);
    assert!(!env.path("r.db").exists());
    let v = env.dr(&["verify", "app", "--identity", &key]);
    assert_eq!(v.code, 1, "a dropped download is not damage: {}", v.stderr);
    assert!(v.stdout.contains("in transport"), "{}", v.stdout);
    // The network heals: the same backup restores and verifies.
    proxy.cut_large_bodies(false);
    env.dr(&["restore-s3", "app", "--to", &to, "--identity", &key])
        .ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
}

#[test]
fn the_s3_server_dying_mid_restore_is_a_network_failure_naming_the_target() {
    let root = tempfile::tempdir().expect("tmp");
    let mut server = S3Server::start(root.path(), "backups");
    let proxy = FaultProxy::start(server.port, common::faults::seed(), 0);
    let env = faulty_env(&proxy, "");
    // Incompressible: the data object spans three 8 MiB parts.
    make_db(&env.db, true, 11_000, 2000);
    env.dr(&["backup-s3", "app"]).ok();
    proxy.slow_large_bodies(true);
    let to = env.path("r.db");
    let child = common::Proc::spawn(
        std::process::Command::new(common::dr_bin())
            .arg("--config")
            .arg(env.config())
            .args(["restore-s3", "app", "--identity", &env.key_arg(), "--to"])
            .arg(&to)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    )
    .expect("spawn dr");
    // Parts trickle at about 2.5 MiB/s: once the restore's temporary file
    // holds pages, the download is under way; then the server dies.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_dir(env.dir.path())
        .expect("ls")
        .flatten()
        .any(|e| {
            e.file_name().to_string_lossy().contains("dr-restore")
                && e.metadata().is_ok_and(|m| m.len() > 0)
        })
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the restore never started writing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a server gone mid-restore is exit 1: {stderr}"
    );
    assert!(stderr.contains("target 's3'"), "names the target: {stderr}");
    assert!(
        !stderr.contains("damaged") && !stderr.contains("integrity"),
        "not reported as damage: {stderr}"
    );
    assert!(!to.exists(), "the destination is untouched");
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("dr-restore"))
        .collect();
    assert!(leftovers.is_empty(), "no plaintext left: {leftovers:?}");
}

#[test]
fn credentials_that_cannot_delete_work_append_only_and_fail_a_plain_expire_loudly() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let proxy = FaultProxy::start(server.port, common::faults::seed(), 0);
    // Write-only credentials, as for a ransomware-proof target.
    proxy.deny_deletes(true);
    let env = faulty_env(&proxy, "[retention]\nfull = 1\n");
    make_db(&env.db, true, 50, 300);
    let plain = std::fs::read_to_string(env.config()).expect("cfg");
    std::fs::write(env.config(), format!("{plain}append_only = true\n")).expect("cfg");
    let mut labels = Vec::new();
    for _ in 0..2 {
        labels.push(env.full_backup("backup-s3"));
        std::thread::sleep(Duration::from_millis(1100));
    }
    // append_only: every backup and its expire succeed without a delete;
    // the older full is kept and says why.
    let exp = env.dr(&["expire", "app", "--json"]).ok().json();
    assert!(
        exp.as_array()
            .is_some_and(|a| a.iter().any(|e| e["label"] == labels[0].as_str()
                && e["removed"] == false
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("append_only")))),
        "{exp}"
    );

    // The same credentials without append_only: expire cannot delete, and
    // says so with exit 1 naming the target and the refusal; nothing is
    // lost, every backup still restores.
    std::fs::write(env.config(), &plain).expect("cfg");
    let r = env.dr(&["expire", "app"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("target 's3'")
            && r.stderr.contains("may not delete")
            && r.stderr.contains("append_only = true"),
        "{}",
        r.stderr
    );
    let info = env.dr(&["info", "--json"]).ok().json();
    let listed: Vec<&str> = info["policies"][0]["targets"][0]["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .filter_map(|b| b["label"].as_str())
        .collect();
    assert_eq!(listed, labels, "{info}");
    let key = env.key_arg();
    env.dr(&["verify", "app", "--identity", &key]).ok();
}
