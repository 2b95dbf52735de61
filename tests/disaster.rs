//! The day the host is gone: a new host with only the repository, the
//! configuration and the identity recovers, and its first start continues
//! the history instead of cutting it short (issue 23).

mod common;

use std::process::Command;
use std::time::Duration;

use common::pg::{PgCluster, setup};
use common::{Env, dump, make_db};

const POLICY: &str = "[wal]\nenabled = true\nsync_interval = \"1s\"\n[schedule]\nfull = \"0 0 * * * *\"\n[retention]\nfull = 1\n";

fn labels(env: &Env) -> Vec<String> {
    common::labels_in(&env.dr(&["info", "--json"]).json())
}

#[test]
fn a_new_hosts_first_start_takes_one_base_and_expires_nothing_from_before() {
    let env = Env::new(POLICY);
    make_db(&env.db, true, 50, 300);
    // Host A: a scheduled-style full, then a stream with commits.
    let full = env.full_backup("backup-local");
    let mut dr = common::spawn_replicate(&env);
    common::wait_for_log(&env.path("replicate.log"), "generation base committed", 30);
    // Instants of host A, each with the state a restore must give.
    let mut marks: Vec<(String, Vec<String>)> = Vec::new();
    {
        let c = rusqlite::Connection::open(&env.db).expect("open");
        for i in 0..40 {
            c.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
                .expect("insert");
            if i % 10 == 9 {
                std::thread::sleep(Duration::from_millis(200));
                marks.push((
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    dump(&env.db),
                ));
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    std::thread::sleep(Duration::from_millis(2000));
    let before_loss = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let want = dump(&env.db);
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill")
        .args(["-TERM", &dr.id().to_string()])
        .status();
    assert!(dr.wait().expect("wait").success());
    let before = labels(&env);
    assert!(before.contains(&full), "{before:?}");

    // The host is lost: its database and state_dir are gone. Host B has
    // the configuration, the identity and the repository.
    std::fs::remove_dir_all(env.path("state")).expect("wipe state");
    for side in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{side}", env.db.display()));
    }
    let r = env.restore("app.db", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(dump(&env.db), want, "the newest state, exactly");

    // Its first daemon start: one new base for the new WAL generation, no
    // "missed" full on top of it, and nothing from before expired.
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "[daemon]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    let (mut daemon, _) = common::start_daemon_listening(&env, &[]);
    // Both decisions are made once these are logged: the stream's new base
    // is committed, and the schedule was set (a missed run would be
    // announced just before it).
    common::wait_for_log(&env.path("daemon.log"), "generation base committed", 30);
    common::wait_for_log(&env.path("daemon.log"), "scheduled", 30);
    let log = std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default();
    daemon.kill_group();
    assert!(!log.contains("catching up a missed run"), "{log}");
    let after = labels(&env);
    for l in &before {
        assert!(
            after.contains(l),
            "{l} was expired by the first start: {after:?}\n{log}"
        );
    }
    assert_eq!(
        after.len(),
        before.len() + 1,
        "one new base: {after:?}\n{log}"
    );
    // The instant before the loss still restores exactly.
    let r = env.restore("at.db", &["--at", &before_loss, "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(dump(&env.path("at.db")), want);

    // Day N on host B: a schedule that comes round in seconds (a full
    // every 20 s, a diff every 5 s) and a window of an hour. Once a
    // scheduled full and a diff after it have run (each followed by
    // expire), every pre-disaster instant in the window still restores.
    let policy = env.path("policies/app.toml");
    let text = std::fs::read_to_string(&policy).expect("policy");
    std::fs::write(
        &policy,
        text.replace(
            "full = \"0 0 * * * *\"",
            "full = \"*/20 * * * * *\"\ndiff = \"*/5 * * * * *\"",
        )
        .replace(
            "[retention]\nfull = 1",
            "[retention]\nfull = 1\nwindow = \"1h\"",
        ),
    )
    .expect("policy");
    let log_at = std::fs::metadata(env.path("daemon.log")).map_or(0, |m| m.len() as usize);
    let (mut daemon, _) = common::start_daemon_listening(&env, &[]);
    let since = || {
        std::fs::read_to_string(env.path("daemon.log"))
            .unwrap_or_default()
            .get(log_at..)
            .unwrap_or_default()
            .to_string()
    };
    common::wait_until(
        "a scheduled full, then a diff after it",
        90,
        || {
            let log = since();
            log.find("job=\"full\" label=")
                .is_some_and(|f| log[f..].contains("job=\"diff\" label="))
        },
        since,
    );
    daemon.kill_group();
    for (i, (at, state)) in marks.iter().enumerate() {
        let r = env.restore(&format!("mark{i}.db"), &["--at", at, "--force"]);
        assert_eq!(r.code, 0, "{at}: {}\n{}", r.stderr, since());
        assert_eq!(&dump(&env.path(&format!("mark{i}.db"))), state, "{at}");
    }
}

/// The README's "Disaster recovery" commands for a SQLite service on S3,
/// run as written on a "new host" (the old one's database and state_dir
/// wiped; the configuration, the identity and the bucket kept).
#[test]
fn the_readme_disaster_runbook_restores_the_newest_state_and_an_instant_from_s3() {
    let block = common::readme_block("disaster-test");
    let root = tempfile::tempdir().expect("tmp");
    let server = common::s3::S3Server::start(root.path(), "bucket");
    let env = common::s3::env_at(
        &server.endpoint(),
        "[\"s3\"]",
        "[wal]\nenabled = true\nsync_interval = \"1s\"\n",
        common::s3::SECRET_KEY,
        "bucket",
    );
    make_db(&env.db, true, 50, 300);
    // Host A streams a writer's commits.
    let mut dr = common::spawn_replicate(&env);
    common::wait_for_log(&env.path("replicate.log"), "generation base committed", 30);
    let commit = |n: usize| {
        let c = rusqlite::Connection::open(&env.db).expect("open");
        for _ in 0..n {
            c.execute("INSERT INTO t(v) VALUES (randomblob(200))", [])
                .expect("insert");
        }
    };
    commit(30);
    std::thread::sleep(Duration::from_millis(1500));
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let at_state = dump(&env.db);
    std::thread::sleep(Duration::from_millis(200));
    commit(30);
    let newest = dump(&env.db);
    // Shipped: the target's window reaches past the last commit; then the
    // host dies at once (kill -9, no shutdown).
    let last = chrono::Utc::now();
    common::wait_until(
        "the stream to ship the last commits",
        30,
        || {
            let j = env.dr(&["info", "--json"]).json();
            j["policies"][0]["targets"][0]["wal"]["windows"]
                .as_array()
                .and_then(|w| w.last())
                .and_then(|w| w["end"].as_str())
                .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
                .is_some_and(|e| e >= last)
        },
        || std::fs::read_to_string(env.path("replicate.log")).unwrap_or_default(),
    );
    dr.kill_group();
    std::fs::remove_dir_all(env.path("state")).expect("wipe state");
    for side in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{side}", env.db.display()));
    }

    // Host B: the runbook's commands, as written.
    let started = std::time::Instant::now();
    let said = run_runbook(
        &block,
        env.dir.path(),
        &[
            ("POLICY", "app".into()),
            ("DB", env.db.display().to_string()),
            ("AT", at.clone()),
        ],
    );
    assert_eq!(dump(&env.db), newest, "the newest state, exactly:\n{said}");
    assert_eq!(
        dump(&env.path("app.db.at")),
        at_state,
        "the instant, exactly:\n{said}"
    );
    eprintln!(
        "SQLite on S3: runbook {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

/// Runs a README runbook's lines as written (bash, in `dir`, with `vars`
/// and the `dr` under test on PATH). `dr info` may say "at risk" (exit 1:
/// nothing runs on the new host yet); any other failure fails the test.
/// Each line's time is reported (the RTO's parts).
fn run_runbook(block: &str, dir: &std::path::Path, vars: &[(&str, String)]) -> String {
    let path = common::path_with_dr();
    let mut said = String::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let t = std::time::Instant::now();
        // Into a file, not a pipe: a server a line starts (pg_ctl) may keep
        // its output open long after the line is done.
        let out = tempfile::tempfile().expect("out");
        let status = Command::new("bash")
            .args(["-uo", "pipefail", "-c", line])
            .current_dir(dir)
            .env("PATH", &path)
            .env_remove("DR_CONFIG")
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().expect("out"))
            .stderr(out.try_clone().expect("out"))
            .status()
            .expect("bash");
        eprintln!("{:.2} s: {line}", t.elapsed().as_secs_f64());
        let mut text = String::new();
        let mut out = out;
        use std::io::{Read, Seek};
        out.rewind().expect("rewind");
        out.read_to_string(&mut text).expect("read");
        said.push_str(&format!("$ {line}\n{text}"));
        let code = status.code().unwrap_or(-1);
        let allowed: &[i32] = if line.starts_with("dr info") {
            &[0, 1]
        } else {
            &[0]
        };
        assert!(allowed.contains(&code), "exit {code}:\n{said}");
    }
    said
}

/// PostgreSQL on S3 (behind TLS): a writer commits a row every 20 ms; the
/// cluster and everything on host A is killed with -9 and wiped; the
/// README's runbook on host B restores the newest state into the policy's
/// own data directory. Every commit up to `archive_timeout` + 5 s before
/// the loss is there (the RPO, measured against the writer's rows), the
/// rows are a gapless prefix, and once declared the primary the cluster
/// archives its new timeline into the same stanza.
#[test]
fn postgres_host_loss_restores_within_archive_timeout_and_the_new_primary_archives() {
    let block = common::readme_block("disaster-pg-test");
    let dir = tempfile::tempdir().expect("tmp");
    let cluster = PgCluster::start(&dir.path().join("pg"));
    let (_server, _proxy, env) =
        common::pg::pg_env_on_s3(dir.path(), &cluster, "archive_timeout = \"2s\"\n");
    setup(&env, &cluster);
    cluster.sql(
        "CREATE TABLE w(id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    );
    env.dr(&["backup-s3", "main-pg", "--type", "full"]).ok();

    // Host A: a writer, one committed row every 20 ms, for 10 s.
    let mut writer = common::Proc::spawn(
        Command::new("runuser")
            .args(["-u", "postgres", "--", "psql", "-h"])
            .arg(&cluster.sock)
            .args(["-p", &cluster.port.to_string(), "-U", "postgres", "-d", "postgres", "-XAtq", "-c"])
            .arg("DO $$ BEGIN FOR i IN 1..1000000 LOOP INSERT INTO w(id) VALUES (i); COMMIT; PERFORM pg_sleep(0.02); END LOOP; END $$")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .expect("writer");
    std::thread::sleep(Duration::from_secs(10));
    // Lost: every process of the cluster killed at once, then its disk.
    let pid = std::fs::read_to_string(cluster.data.join("postmaster.pid"))
        .expect("postmaster.pid")
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let killed = Command::new("bash")
        .args([
            "-c",
            &format!("kill -STOP {pid}; pkill -9 -P {pid}; kill -9 {pid}"),
        ])
        .status()
        .expect("kill");
    assert!(killed.success());
    let lost_at = chrono::Utc::now();
    writer.kill_group();
    std::fs::remove_dir_all(&cluster.data).expect("wipe data");
    std::fs::remove_dir_all(env.path("state")).expect("wipe state");
    for f in std::fs::read_dir(&cluster.sock).expect("sock").flatten() {
        let _ = std::fs::remove_file(f.path());
    }

    // Host B: the runbook as written.
    let said = run_runbook(
        &block,
        env.dir.path(),
        &[
            ("POLICY", "main-pg".into()),
            ("DATA_DIR", cluster.data.display().to_string()),
        ],
    );
    let row = cluster.sql("SELECT count(*), max(id), extract(epoch from max(at)) FROM w");
    let f: Vec<&str> = row.split('|').collect();
    let (count, max): (i64, i64) = (f[0].parse().expect("count"), f[1].parse().expect("max"));
    assert_eq!(
        count, max,
        "the restored rows are not a gapless prefix:\n{said}"
    );
    let newest: f64 = f[2].parse().expect("time");
    let rpo = lost_at.timestamp_millis() as f64 / 1000.0 - newest;
    eprintln!("PostgreSQL on S3: RPO {rpo:.2} s ({max} rows restored), archive_timeout 2 s");
    assert!(
        rpo <= 2.0 + 5.0,
        "{rpo:.2} s of commits lost, more than archive_timeout + 5 s:\n{said}"
    );
    // Declared the primary: its next WAL, on a new timeline, reaches the
    // same stanza, and nothing is at risk.
    cluster.sql("INSERT INTO w(id) VALUES (0)");
    cluster.sql("SELECT pg_switch_wal()");
    common::wait_until(
        "the new primary's WAL in the repository",
        60,
        || {
            env.dr(&["info", "--json"]).json()["policies"][0]["targets"][0]["archive"]["segment"]
                .as_str()
                .is_some_and(|s| s > "00000001FFFFFFFFFFFFFFFF")
        },
        || env.dr(&["info", "--json"]).stdout,
    );
    let r = env.dr(&["info", "main-pg"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

/// A fleet's first start on a new host counts each database's backups in
/// the repository, as a single database's does: no "missed" full of every
/// database of the fleet on top of what the old host took.
#[test]
fn a_fleets_first_start_on_a_new_host_takes_no_missed_full() {
    let env = Env::new("");
    std::fs::create_dir_all(env.path("fleet")).expect("fleet");
    for db in ["alice", "bob"] {
        make_db(&env.path(&format!("fleet/{db}.db")), true, 20, 100);
    }
    env.write_policy(
        "tenants",
        "fleet/*.db",
        "[schedule]\nfull = \"0 0 * * * *\"\n",
    );
    std::fs::remove_file(env.path("policies/app.toml")).expect("rm app");
    env.dr(&["backup-local", "tenants", "--type", "full"]).ok();
    // The host is lost; the new one has the repository and the config.
    std::fs::remove_dir_all(env.path("state")).expect("wipe state");
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "[daemon]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    let (mut daemon, _) = common::start_daemon_listening(&env, &[]);
    common::wait_for_log(&env.path("daemon.log"), "scheduled", 30);
    daemon.kill_group();
    let log = std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default();
    assert!(!log.contains("catching up a missed run"), "{log}");
}
