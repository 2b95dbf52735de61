//! `dr copy`: backups and WAL copied as stored between targets, with a
//! real S3 server between two local targets: the copy of a copy restores
//! exactly, a rerun copies nothing twice, a damaged backup is never
//! committed at the destination, a copy killed half-way is finished by the
//! next run, and the daemon copies on `[copy] schedule`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::s3::{S3Server, SECRET_KEY, target_toml};
use common::{Env, make_db};

/// An env whose policy `app` backs up to `local` and copies to an S3
/// target `s3` and a second local target `back` (plus `extra_to`).
fn env_with_copies(
    (endpoint, bucket): (&str, &str),
    policy_extra: &str,
    extra_to: &[&str],
    s3_extra: &str,
) -> Env {
    let env = Env::new(policy_extra);
    let mut cfg = std::fs::read_to_string(env.config()).expect("cfg");
    cfg.push_str(&target_toml(
        env.dir.path(),
        "s3",
        endpoint,
        bucket,
        SECRET_KEY,
    ));
    cfg.push_str(s3_extra);
    cfg.push_str("[targets.back]\nkind = \"local\"\npath = \"back\"\n");
    for t in extra_to {
        cfg.push_str(&format!(
            "[targets.{t}]\nkind = \"local\"\npath = \"{t}\"\n"
        ));
    }
    std::fs::write(env.config(), cfg).expect("cfg");
    let to: Vec<String> = ["s3", "back"]
        .iter()
        .chain(extra_to)
        .map(|t| format!("\"{t}\""))
        .collect();
    let policy = env.path("policies/app.toml");
    let p = std::fs::read_to_string(&policy).expect("policy");
    std::fs::write(&policy, format!("{p}[copy]\nto = [{}]\n", to.join(", "))).expect("policy");
    env
}

/// `dr copy app --to TO` fails with exit `code`, saying `says`.
fn copy_refused(env: &Env, to: &str, code: i32, says: &str) {
    let r = env.dr(&["copy", "app", "--to", to]);
    assert_eq!(r.code, code, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains(says), "{}", r.stderr);
}

fn labels_on(env: &Env, target: &str) -> Vec<String> {
    let r = env.dr(&["info", "app", "--target", target, "--json"]);
    common::labels_in(&r.json())
}

#[test]
fn a_copy_of_a_copy_restores_exactly_and_a_rerun_copies_nothing_twice() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "copies");
    let env = env_with_copies(
        (&server.endpoint(), "copies"),
        "[wal]\nenabled = true\nsync_interval = \"1s\"\nsegment_max = \"64KiB\"\n",
        &["fresh", "unrecorded"],
        "",
    );
    make_db(&env.db, true, 2000, 200);
    env.dr(&["backup-local", "app", "--type", "full"]).ok();
    // WAL streamed after the base the streamer takes, then a diff.
    let replicate = common::spawn_replicate(&env);
    let st = Command::new("python3")
        .arg(common::wal_writer())
        .arg("write")
        .arg(&env.db)
        .arg(env.path("marks"))
        .args(["3", "200", "300", "200"])
        .status()
        .expect("writer");
    assert!(st.success());
    common::stop(replicate);
    env.dr(&["backup-local", "app", "--type", "diff"]).ok();
    let source = labels_on(&env, "local");
    assert!(source.len() >= 3, "{source:?}");

    // local -> S3 -> local, no key anywhere in the commands.
    let first = env.dr(&["copy", "app", "--to", "s3", "--json"]).ok().json();
    let c = &first[0];
    assert_eq!(c["from"], "local");
    assert_eq!(
        c["copied"].as_array().expect("copied").len(),
        source.len(),
        "{first}"
    );
    assert!(c["wal_copied"].as_u64().expect("wal") > 0, "{first}");
    env.dr(&["copy", "app", "--from", "s3", "--to", "back"])
        .ok();
    assert_eq!(labels_on(&env, "back"), source);
    env.restore("restored.db", &["--target", "back"]).ok();
    assert_eq!(
        common::digest(&env.path("restored.db")),
        common::digest(&env.db)
    );

    // Again: everything is there already.
    let again = env.dr(&["copy", "app", "--to", "s3", "--json"]).ok().json();
    assert_eq!(
        again[0]["copied"].as_array().map(Vec::len),
        Some(0),
        "{again}"
    );
    assert_eq!(again[0]["present"].as_u64(), Some(source.len() as u64));
    assert_eq!(again[0]["wal_copied"].as_u64(), Some(0), "{again}");

    // A backup whose stored bytes changed on the source is not committed
    // where it is copied; the others are, and the copy fails naming it.
    let diff = source.last().expect("diff").clone();
    let data = env.path(&format!("backups/app/backup/{diff}/data.zst.age"));
    let mut bytes = std::fs::read(&data).expect("data");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).expect("tamper");
    let r = env.dr(&["copy", "app", "--to", "fresh"]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains(&diff), "{}", r.stderr);
    let fresh = labels_on(&env, "fresh");
    assert_eq!(fresh, source[..source.len() - 1].to_vec());
    assert!(
        !env.path(&format!("fresh/app/backup/{diff}/manifest.json"))
            .exists(),
        "a damaged backup is never committed at the destination"
    );
    let audit = env.dr(&["audit", "--json"]).ok().stdout;
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"action\":\"copy\"") && l.contains(&diff)),
        "{audit}"
    );

    // An audit log that cannot be written: the copy does not start, and
    // nothing is written at the destination.
    let log = env.path("state/audit.log");
    std::fs::remove_file(&log).expect("rm log");
    std::fs::create_dir(&log).expect("dir");
    copy_refused(&env, "unrecorded", 1, "audit log cannot be written");
    assert!(!env.path("unrecorded/app").exists(), "copied unrecorded");
}

#[test]
fn a_copy_killed_half_way_is_finished_by_the_next_run() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "copies");
    // The upload limit makes the copy last long enough to be cut off.
    let env = env_with_copies(
        (&server.endpoint(), "copies"),
        "",
        &[],
        "max_upload_rate = \"2MiB\"\n",
    );
    make_db(&env.db, true, 6000, 1000);
    env.dr(&["backup-local", "app", "--type", "full"]).ok();
    let stored: u64 = std::fs::read_dir(env.path("backups/app/backup"))
        .expect("ls")
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).expect("ls").flatten())
        .map(|f| f.metadata().expect("meta").len())
        .sum();
    assert!(stored > 4 << 20, "{stored} bytes is too quick to cut off");
    let mut child = common::Proc::spawn(
        Command::new(common::dr_bin())
            .arg("--config")
            .arg(env.config())
            .args(["copy", "app", "--to", "s3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("dr copy");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the copy ended too soon"
    );
    child.kill_group();
    assert!(
        labels_on(&env, "s3").is_empty(),
        "no backup is committed half-copied"
    );
    env.dr(&["copy", "app", "--to", "s3"]).ok();
    assert_eq!(labels_on(&env, "s3"), labels_on(&env, "local"));
    env.restore("restored.db", &["--target", "s3"]).ok();
    assert_eq!(
        common::dump(&env.path("restored.db")),
        common::dump(&env.db)
    );
}

#[test]
fn the_daemon_copies_on_schedule_and_serves_when_it_did() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "copies");
    let env = env_with_copies((&server.endpoint(), "copies"), "", &[], "");
    let policy = env.path("policies/app.toml");
    let p = std::fs::read_to_string(&policy).expect("policy");
    std::fs::write(
        &policy,
        p.replace("[copy]\n", "[copy]\nschedule = \"*/2 * * * * *\"\n"),
    )
    .expect("policy");
    make_db(&env.db, true, 100, 100);
    env.dr(&["backup-local", "app", "--type", "full"]).ok();
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "[daemon]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    let (daemon, port) = common::start_daemon_listening(&env, &[]);
    let series = "dr_copy_last_success_timestamp_seconds{policy=\"app\",target=\"back\"}";
    common::wait_until(
        "a scheduled copy to both destinations",
        30,
        || {
            common::http_get(port, "/metrics").is_some_and(|(_, m)| {
                common::metric(&m, series).is_some_and(|v| v > 0.0)
                    && common::metric(
                        &m,
                        "dr_copy_last_success_timestamp_seconds{policy=\"app\",target=\"s3\"}",
                    )
                    .is_some_and(|v| v > 0.0)
            })
        },
        || std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default(),
    );
    drop(daemon);
    let local = labels_on(&env, "local");
    assert_eq!(labels_on(&env, "s3"), local);
    assert_eq!(labels_on(&env, "back"), local);
}

#[test]
fn a_copy_is_under_the_destinations_object_lock_and_waits_for_its_lease() {
    let moto = common::s3::Moto::start();
    moto.lock_tool(&["create", "lockbucket"]);
    let env = env_with_copies(
        (&moto.endpoint(), "lockbucket"),
        "",
        &[],
        "object_lock = { mode = \"governance\", days = 2 }\n",
    );
    make_db(&env.db, true, 100, 100);
    let label = env.full_backup("backup-local");
    // Another host writes the policy on the destination: the copy waits
    // its turn (exit 4) and writes nothing.
    let lease = "prod/app/lease";
    let held = serde_json::json!({
        "holder": "otherhost pid 77", "host": "otherhost", "pid": 77,
        "command": "backup", "token": "t",
        "acquired": "2026-01-01T00:00:00Z", "expires": "2999-01-01T00:00:00Z"
    })
    .to_string();
    moto.lock_tool(&["put", "lockbucket", lease, &held]);
    copy_refused(&env, "s3", 4, "leased by otherhost pid 77");
    assert!(labels_on(&env, "s3").is_empty());
    moto.lock_tool(&["delete", "lockbucket", lease]);
    env.dr(&["copy", "app", "--to", "s3"]).ok();
    assert_eq!(labels_on(&env, "s3"), vec![label.clone()]);
    // What the copy wrote is locked as a backup's objects are.
    for name in ["data.zst.age", "manifest.json"] {
        let key = format!("prod/app/backup/{label}/{name}");
        let head = moto.lock_tool(&["head", "lockbucket", &key]);
        assert!(head.starts_with("GOVERNANCE "), "{key}: {head}");
        assert_eq!(
            moto.lock_tool(&["delete", "lockbucket", &key]),
            "AccessDenied"
        );
    }
}

#[test]
fn a_fleet_is_copied_database_by_database_and_each_restores() {
    let env = Env::new("");
    std::fs::remove_file(env.path("policies/app.toml")).expect("rm app policy");
    std::fs::create_dir_all(env.path("tenants")).expect("tenants dir");
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "[targets.back]\nkind = \"local\"\npath = \"back\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    env.write_policy("tenants", "tenants/*.db", "[copy]\nto = [\"back\"]\n");
    for (name, rows) in [("alice", 50), ("bob", 80)] {
        make_db(&env.path(&format!("tenants/{name}.db")), true, rows, 100);
    }
    env.dr(&["backup-local", "tenants"]).ok();
    let out = env.dr(&["copy", "tenants", "--json"]).ok().json();
    let copied: Vec<&str> = out
        .as_array()
        .expect("one report per database")
        .iter()
        .map(|c| c["policy"].as_str().expect("policy"))
        .collect();
    assert_eq!(copied, vec!["tenants/alice", "tenants/bob"], "{out}");
    for name in ["alice", "bob"] {
        let to = env
            .path(&format!("{name}-restored.db"))
            .display()
            .to_string();
        env.dr(&[
            "restore-local",
            "tenants",
            "--db",
            name,
            "--target",
            "back",
            "--to",
            &to,
            "--identity",
            &env.key_arg(),
        ])
        .ok();
        assert_eq!(
            common::dump(std::path::Path::new(&to)),
            common::dump(&env.path(&format!("tenants/{name}.db")))
        );
    }
}
