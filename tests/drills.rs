//! Drills where the key lives (issue 23): production keeps no identity and
//! checks what it can without it; a drill host with the identity and
//! read-only credentials runs the restore drill and records its outcome on
//! the target, where production's `dr info`, `/healthz` and metrics find it.

mod common;

use common::Env;
use common::faults::FaultProxy;
use common::s3::{S3Server, SECRET_KEY};

/// A second configuration beside `env`'s: the drill host's, with its own
/// state_dir, the identity, and the S3 endpoint `endpoint`.
fn drill_host(env: &Env, endpoint: &str, prod_endpoint: &str) -> std::path::PathBuf {
    let cfg = std::fs::read_to_string(env.config())
        .expect("cfg")
        .replace("state_dir = \"state\"", "state_dir = \"drill-state\"")
        .replace(
            "[encryption]\n",
            "[encryption]\nidentity_file = \"backup.key\"\n",
        )
        .replace(prod_endpoint, endpoint);
    let path = env.path("drill.toml");
    std::fs::write(&path, cfg).expect("drill.toml");
    path
}

#[test]
fn production_checks_without_the_key_and_reports_the_drills_of_the_host_that_has_it() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "bucket");
    let readonly = FaultProxy::start(server.port, 1, 0);
    readonly.read_only(true);
    let env = common::s3::env_at(
        &server.endpoint(),
        "[\"s3\"]",
        "[schedule]\nverify = \"0 4 * * *\"\n",
        SECRET_KEY,
        "bucket",
    );
    common::make_db(&env.db, true, 50, 300);
    env.dr(&["backup-s3", "app", "--type", "full"]).ok();
    let c = rusqlite::Connection::open(&env.db).expect("open");
    c.execute("INSERT INTO t(v) VALUES (randomblob(5000))", [])
        .expect("insert");
    env.dr(&["backup-s3", "app", "--type", "diff"]).ok();

    // Production keeps no key: a drill cannot run, and says what can.
    let r = env.dr(&["verify", "app"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--without-key"), "{}", r.stderr);
    let r = env.dr(&["verify", "app", "--without-key"]).ok();
    assert!(
        r.stdout.contains("checked app on s3")
            && r.stdout.contains("2 backup(s)' stored bytes")
            && r.stdout.contains("no restore drill recorded"),
        "{}",
        r.stdout
    );

    // The drill host: the identity, credentials that only read (and
    // record drills). Its drill passes and is recorded on the target.
    let drill = drill_host(&env, &readonly.endpoint(), &server.endpoint());
    let r = common::dr_with(&drill, &["verify", "app"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(!r.stderr.contains("could not be written"), "{}", r.stderr);
    // A backup through those credentials is refused: they are read-only.
    assert_ne!(common::dr_with(&drill, &["backup-s3", "app"]).code, 0);

    // Production sees the drill: in dr info, in its check, and (once its
    // daemon's scheduled check ran) in /healthz and the metrics.
    let info = env.dr(&["info", "--json"]).json();
    let passed = &info["policies"][0]["targets"][0]["drills"]["passed"];
    assert_eq!(passed["ok"], true, "{info}");
    assert_eq!(passed["host"], common::hostname(), "{info}");
    let r = env.dr(&["verify", "app", "--without-key"]).ok();
    assert!(
        r.stdout.contains("newest restore drill passed"),
        "{}",
        r.stdout
    );
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "[daemon]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    let (daemon, port) = common::start_daemon_listening(&env, &[]);
    common::wait_until(
        "the daemon's check to take in the drill",
        60,
        || {
            common::http_get(port, "/metrics").is_some_and(|(_, m)| {
                m.lines().any(|l| {
                    l.starts_with("dr_verify_last_success_timestamp_seconds{")
                        && !l.ends_with(" 0")
                        && !l.ends_with(" 0.0")
                })
            })
        },
        || std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default(),
    );
    let (code, body) = common::http_get(port, "/healthz").expect("healthz");
    assert_eq!(code, 200, "{body}");
    drop(daemon);

    // A stored object changes: production's check names it (exit 3)
    // without the key; the drill host's drill fails, is recorded, and
    // production's info reports the failed drill.
    let data = common::files_under(&root.path().join("bucket"))
        .into_iter()
        .find(|k| k.ends_with("F/data.zst.age"))
        .expect("a full's data object");
    let victim = root.path().join("bucket").join(&data);
    let mut bytes = std::fs::read(&victim).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&victim, bytes).expect("write");
    let r = env.dr(&["verify", "app", "--without-key"]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("data.zst.age") && r.stdout.contains("stored bytes' BLAKE3 differs"),
        "{}",
        r.stdout
    );
    assert_eq!(common::dr_with(&drill, &["verify", "app"]).code, 3);
    let r = env.dr(&["info", "app"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("verify_failed") && r.stderr.contains("the restore drill on host"),
        "{}",
        r.stderr
    );
}
