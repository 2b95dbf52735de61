//! A fleet policy (`path = "tenants/*.db"`): one real `dr replicate`
//! process streams every tenant database, picks up one created while it
//! runs, lets one deleted go, and a point-in-time restore of one tenant is
//! exact.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Env, dump, make_db, metric};

const FLEET: &str = "[wal]\nenabled = true\nsync_interval = \"1s\"\ncheckpoint_pages = 200\n";

fn fleet_env() -> Env {
    let env = Env::new("");
    std::fs::remove_file(env.path("policies/app.toml")).expect("rm app policy");
    std::fs::create_dir_all(env.path("tenants")).expect("tenants dir");
    env.write_policy("tenants", "tenants/*.db", FLEET);
    env
}

fn replicate(env: &Env) -> common::Proc {
    common::spawn_replicate(env)
}

fn log(env: &Env) -> String {
    std::fs::read_to_string(env.path("replicate.log")).unwrap_or_default()
}

/// The databases `dr info tenants` lists, with how many backups each has.
fn tenants(env: &Env) -> Vec<(String, usize)> {
    let r = env.dr(&["info", "tenants", "--json"]);
    let Ok(j) = serde_json::from_str::<serde_json::Value>(&r.stdout) else {
        return Vec::new();
    };
    j["policies"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap_or_default().to_string(),
                        p["targets"][0]["backups"].as_array().map_or(0, |b| b.len()),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The `policy` of each item of a `--json` array.
fn policies_of(r: &common::Run) -> Vec<String> {
    r.json()
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v["policy"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn wait_for(env: &Env, what: &str, secs: u64, f: impl FnMut() -> bool) {
    common::wait_until(what, secs, f, || log(env));
}

/// `dr follow tenants` on host B (config `b`), looking every 200 ms while
/// segments arrive; its log.
fn follow_fleet(env: &Env, b: &Path, extra: &[&str]) -> (common::Proc, PathBuf) {
    let flog = env.path("follow.log");
    let follower = common::Proc::spawn(
        Command::new(common::dr_bin())
            .arg("--config")
            .arg(b)
            .args([
                "follow",
                "tenants",
                "--poll",
                "200ms",
                "--identity",
                &env.key_arg(),
            ])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&flog).expect("log")),
    )
    .expect("dr follow");
    (follower, flog)
}

/// `rows` rows committed to tenant `n`, one transaction each.
fn insert_rows(env: &Env, n: &str, rows: usize) {
    let c = rusqlite::Connection::open(env.path(&format!("tenants/{n}.db"))).expect("open");
    for _ in 0..rows {
        c.execute("INSERT INTO t(v) VALUES (randomblob(200))", [])
            .expect("insert");
    }
}

/// Whether host B's copy of tenant `n` holds what the tenant holds.
fn copy_caught_up(env: &Env, n: &str) -> bool {
    let copy = env.path(&format!("copies/{n}.db"));
    copy.exists() && dump(&copy) == dump(&env.path(&format!("tenants/{n}.db")))
}

fn has_base(env: &Env, name: &str) -> bool {
    tenants(env).iter().any(|(n, b)| n == name && *b > 0)
}

#[test]
fn a_fleet_streams_tenants_that_come_and_go_and_one_restores_exactly_at_an_instant() {
    let env = fleet_env();
    let t = |n: &str| env.path(&format!("tenants/{n}.db"));
    make_db(&t("alice"), true, 20, 200);
    make_db(&t("bob"), true, 20, 200);
    // Not databases of the fleet: another extension, a name dr cannot use.
    std::fs::write(env.path("tenants/notes.txt"), b"x").expect("txt");
    let mut child = replicate(&env);
    wait_for(&env, "bases of alice and bob", 30, || {
        has_base(&env, "tenants/alice") && has_base(&env, "tenants/bob")
    });

    // A tenant created while dr runs is picked up without a restart.
    make_db(&t("carol"), true, 5, 100);
    wait_for(&env, "a base of carol", 30, || {
        has_base(&env, "tenants/carol")
    });

    // bob writes; each quiet gap is an instant to restore.
    let st = Command::new("python3")
        .arg(common::wal_writer())
        .arg("write")
        .arg(t("bob"))
        .arg(env.path("marks"))
        .args(["4", "15", "1200", "300"])
        .status()
        .expect("writer");
    assert!(st.success());

    // alice is deleted: dr lets her go and keeps streaming the others.
    let alice_rows = dump(&t("alice"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(env.path(&format!("tenants/alice.db{suffix}")));
    }
    wait_for(&env, "alice to leave the fleet", 40, || {
        log(&env).contains("tenants/alice") && log(&env).contains("no longer streamed")
            || log(&env).contains("removed from its fleet")
    });
    assert!(
        child.try_wait().expect("wait").is_none(),
        "dr replicate must keep running: {}",
        log(&env)
    );
    std::thread::sleep(Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let code = child.wait().expect("wait").code();
    assert_eq!(code, Some(0), "{}", log(&env));
    assert!(!log(&env).contains("panicked"), "{}", log(&env));

    let names: Vec<String> = tenants(&env).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["tenants/alice", "tenants/bob", "tenants/carol"],
        "a deleted tenant is still listed from its backups"
    );

    // Every instant bob's writer marked restores exactly.
    let key = env.key_arg();
    let marks = std::fs::read_to_string(env.path("marks")).expect("marks");
    let mut checked = 0;
    for line in marks.lines() {
        let mut it = line.split(' ');
        let secs: f64 = it.next().and_then(|s| s.parse().ok()).expect("time");
        let _burst = it.next();
        let want = it.next().expect("digest");
        let at = chrono::DateTime::from_timestamp_millis((secs * 1000.0) as i64)
            .expect("ts")
            .to_rfc3339();
        let to = env.path("bob.db").display().to_string();
        env.dr(&[
            "restore-local",
            "tenants",
            "--db",
            "bob",
            "--at",
            &at,
            "--to",
            &to,
            "--identity",
            &key,
            "--force",
        ])
        .ok();
        assert_eq!(common::digest(&env.path("bob.db")), want, "bob at {at}");
        checked += 1;
    }
    assert_eq!(checked, 4);

    // The deleted tenant restores from its backups, by its member name.
    let to = env.path("alice.db").display().to_string();
    env.dr(&[
        "restore-local",
        "tenants/alice",
        "--to",
        &to,
        "--identity",
        &key,
    ])
    .ok();
    assert_eq!(dump(&env.path("alice.db")), alice_rows);

    // A fleet restore must say which database.
    let r = env.dr(&["restore-local", "tenants", "--to", &to, "--identity", &key]);
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("--db"), "{}", r.stderr);

    // verify drills every tenant, the deleted one included.
    let r = env
        .dr(&["verify", "tenants", "--identity", &key, "--json"])
        .ok();
    let drilled = policies_of(&r);
    assert_eq!(drilled, ["tenants/alice", "tenants/bob", "tenants/carol"]);
}

#[test]
fn a_backup_of_a_fleet_takes_every_database_and_db_picks_one() {
    let env = fleet_env();
    for n in ["a1", "a2", "a3"] {
        make_db(&env.path(&format!("tenants/{n}.db")), true, 10, 100);
    }
    let r = env.dr(&["backup-local", "tenants", "--json"]).ok();
    let done = policies_of(&r);
    assert_eq!(done, ["tenants/a1", "tenants/a2", "tenants/a3"]);
    assert!(
        env.objects()
            .iter()
            .any(|o| o.starts_with("tenants/a2/backup/")),
        "each database under its own prefix: {:?}",
        env.objects()
    );
    let r = env
        .dr(&["backup-local", "tenants", "--db", "a2", "--json"])
        .ok();
    assert_eq!(r.json().as_array().map(|a| a.len()), Some(1));
    let r = env.dr(&["backup-local", "tenants", "--db", "nobody"]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    let r = env.dr(&["backup-local", "--db", "a2"]);
    assert_eq!(r.code, 64, "{}", r.stderr);
}

/// Files under `root` with their modification times.
fn mtimes(root: &Path) -> Vec<(String, std::time::SystemTime)> {
    let mut out = Vec::new();
    for f in common::files_under(root) {
        if let Ok(m) = std::fs::metadata(root.join(&f)).and_then(|m| m.modified()) {
            out.push((f, m));
        }
    }
    out.sort();
    out
}

fn threads(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn idle_databases_cost_a_fixed_set_of_threads_and_write_nothing() {
    let env = fleet_env();
    for i in 0..40 {
        make_db(&env.path(&format!("tenants/t{i:02}.db")), true, 3, 50);
    }
    let mut child = replicate(&env);
    wait_for(&env, "40 bases", 90, || {
        tenants(&env).iter().filter(|(_, b)| *b > 0).count() == 40
    });
    // Each database seals its idle mark a sync_interval after its last
    // commit; then nothing is due before the heartbeat. Wait for that
    // (nothing written for 1.5 s), not for a fixed time.
    let state = env.path("state/wal/tenants");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = (mtimes(&env.path("backups")), mtimes(&state));
        std::thread::sleep(Duration::from_millis(1500));
        if (mtimes(&env.path("backups")), mtimes(&state)) == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle fleet kept writing for 30 s: {}",
            log(&env)
        );
    }
    let (targets_before, state_before) = (mtimes(&env.path("backups")), mtimes(&state));
    let n = threads(child.id());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        mtimes(&env.path("backups")),
        targets_before,
        "idle databases write nothing to the target"
    );
    assert_eq!(mtimes(&state), state_before, "nor to the state directory");
    // A fixed pool, not threads per database (40 databases, 3 each before).
    assert!(
        n <= 16,
        "dr replicate runs {n} threads for 40 idle databases"
    );
    // One commit is still seen, sealed and shipped within sync_interval.
    let c = rusqlite::Connection::open(env.path("tenants/t07.db")).expect("open");
    c.execute_batch("INSERT INTO t(v) VALUES ('late')")
        .expect("insert");
    drop(c);
    let wal = env.path("backups/tenants/t07/wal");
    let before = common::files_under(&wal).len();
    wait_for(&env, "the commit shipped", 5, || {
        common::files_under(&wal).len() > before
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert_eq!(child.wait().expect("wait").code(), Some(0), "{}", log(&env));
}

/// `dr follow FLEET`: one process follows every database of the fleet into
/// the standby's fleet directory, a database the primary gains later
/// included; `dr promote FLEET --db NAME` stops that database's follower
/// only, and the others keep following.
#[test]
fn one_process_follows_a_whole_fleet_and_promote_takes_one_database() {
    let env = fleet_env();
    let names = ["alice", "bob", "my db"];
    for n in names {
        make_db(&env.path(&format!("tenants/{n}.db")), true, 20, 200);
    }
    let _primary = replicate(&env);
    wait_for(&env, "every base", 60, || {
        ["tenants/alice", "tenants/bob", "tenants/my%20db"]
            .iter()
            .all(|n| has_base(&env, n))
    });
    // Host B: the same fleet policy over its own directory of copies.
    std::fs::create_dir_all(env.path("copies")).expect("copies");
    let b = common::second_host(&env, "tenants", |p| {
        p.replace("tenants/*.db", "copies/*.db")
    });
    let (mut follower, flog) = follow_fleet(&env, &b, &[]);
    let insert = |n: &str, rows: usize| insert_rows(&env, n, rows);
    let caught_up = |n: &str| copy_caught_up(&env, n);
    for n in names {
        insert(n, 10);
    }
    common::wait_until(
        "every copy to catch up",
        60,
        || names.iter().all(|n| caught_up(n)),
        || std::fs::read_to_string(&flog).unwrap_or_default(),
    );

    // alice fails over to B; bob and "my db" go on following.
    let alice = dump(&env.path("tenants/alice.db"));
    let r = common::dr_with(&b, &["promote", "tenants", "--db", "alice"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        matches!(follower.try_wait(), Ok(None)),
        "the fleet's follower goes on"
    );
    insert("bob", 10);
    insert("my db", 10);
    insert("alice", 10);
    common::wait_until(
        "bob and my db to catch up after alice's promotion",
        60,
        || caught_up("bob") && caught_up("my db"),
        || std::fs::read_to_string(&flog).unwrap_or_default(),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        dump(&env.path("copies/alice.db")),
        alice,
        "the promoted copy no longer follows the old primary"
    );
    let text = std::fs::read_to_string(&flog).unwrap_or_default();
    assert!(
        text.contains("stopped following: `dr promote` made this copy the primary"),
        "{text}"
    );
    follower.kill_group();
}

/// An idle fleet followed from S3 costs one conditional read of the
/// fleet's activity record a look, not a listing per database: the
/// follower of a database is woken when the record names it, and only
/// that database's WAL is listed.
#[test]
fn a_followed_fleet_on_s3_idles_on_its_activity_record_and_lists_only_what_changed() {
    use common::faults::FaultProxy;
    use common::s3::{S3Server, SECRET_KEY};
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "bucket");
    let counted = FaultProxy::start(server.port, 1, 0);
    let env = common::s3::env_at(&server.endpoint(), "[\"s3\"]", "", SECRET_KEY, "bucket");
    std::fs::remove_file(env.path("policies/app.toml")).expect("rm app policy");
    std::fs::create_dir_all(env.path("tenants")).expect("tenants dir");
    env.write_policy("tenants", "tenants/*.db", FLEET);
    let p = env.path("policies/tenants.toml");
    let text = std::fs::read_to_string(&p).expect("policy");
    std::fs::write(&p, text.replace("[\"local\"]", "[\"s3\"]")).expect("policy");
    let names = ["t0", "t1", "t2", "t3", "t4", "t5"];
    for n in names {
        make_db(&env.path(&format!("tenants/{n}.db")), true, 10, 100);
    }
    let _primary = replicate(&env);
    wait_for(&env, "every base", 60, || {
        names
            .iter()
            .all(|n| has_base(&env, &format!("tenants/{n}")))
    });
    std::fs::create_dir_all(env.path("copies")).expect("copies");
    let b = common::second_host(&env, "tenants", |p| {
        p.replace("tenants/*.db", "copies/*.db")
    });
    let text = std::fs::read_to_string(&b).expect("b.toml");
    std::fs::write(&b, text.replace(&server.endpoint(), &counted.endpoint())).expect("b.toml");
    let (_follower, flog) = follow_fleet(&env, &b, &["--idle-poll", "4s"]);
    let insert = |n: &str| insert_rows(&env, n, 1);
    let caught_up = |n: &str| copy_caught_up(&env, n);
    for n in names {
        insert(n);
    }
    common::wait_until(
        "every copy to catch up",
        60,
        || names.iter().all(|n| caught_up(n)),
        || std::fs::read_to_string(&flog).unwrap_or_default(),
    );
    // The streams' idle marks land a sync_interval after the last commit.
    std::thread::sleep(Duration::from_secs(4));

    // Quiet: one read of the record every 4 s once the wait has grown, for
    // the whole fleet (six databases polling on their own would make six
    // listings each time).
    let quiet = counted.requests_during(Duration::from_secs(16));
    assert!(
        quiet.len() <= 16 / 4 + 3,
        "{} requests while the fleet was quiet for 16 s: {quiet:#?}",
        quiet.len()
    );
    assert!(
        quiet
            .iter()
            .all(|r| r.starts_with("GET ") && r.contains("activity.json")),
        "an idle fleet costs reads of its activity record only: {quiet:#?}\n{}",
        std::fs::read_to_string(&flog).unwrap_or_default()
    );

    // One commit to t3: seen within the idle wait, and only t3's WAL is
    // listed for it.
    let before = counted.requests().len();
    insert("t3");
    let t = Instant::now();
    common::wait_until(
        "t3's commit after the quiet spell",
        30,
        || caught_up("t3"),
        || std::fs::read_to_string(&flog).unwrap_or_default(),
    );
    assert!(
        t.elapsed() < Duration::from_secs(4 + 3),
        "seen after {:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_secs(1));
    let listings: Vec<String> = counted.requests()[before..]
        .iter()
        .filter(|r| r.contains("list-type=2"))
        .cloned()
        .collect();
    assert!(
        !listings.is_empty() && listings.iter().all(|r| r.contains("t3")),
        "only the database that changed is listed: {listings:#?}"
    );
}

/// The disaster with a fleet: host B's daemon follows every database of
/// the fleet (`[follow]` on the fleet policy) and reports each one's lag;
/// one database cannot be promoted alone there (nobody would stream it);
/// the primary is lost and `dr promote FLEET` fails the whole fleet over:
/// B's daemon streams each copy as a new generation of the same
/// repository, and the old primary coming back is fenced for every
/// database.
#[test]
fn a_daemon_follows_a_whole_fleet_and_takes_every_database_over_when_the_fleet_is_promoted() {
    let env = fleet_env();
    let names = ["alice", "my db"];
    for n in names {
        make_db(&env.path(&format!("tenants/{n}.db")), true, 20, 200);
    }
    let mut primary = replicate(&env);
    wait_for(&env, "every base", 60, || {
        ["tenants/alice", "tenants/my%20db"]
            .iter()
            .all(|n| has_base(&env, n))
    });
    // Host B: the fleet's policy over its own directory, with [follow].
    std::fs::create_dir_all(env.path("copies")).expect("copies");
    let b = common::standby_daemon_host(&env, "tenants", |p| {
        p.replace("tenants/*.db", "copies/*.db")
    });
    let blog = env.path("daemon-b.log");
    let read_blog = || std::fs::read_to_string(&blog).unwrap_or_default();
    let (_daemon, port) = common::start_daemon_listening_with(&b, &blog, &[]);
    for n in names {
        insert_rows(&env, n, 10);
    }
    common::wait_until(
        "every copy to catch up",
        60,
        || names.iter().all(|n| copy_caught_up(&env, n)),
        read_blog,
    );
    let series = |m: &str, db: &str| format!("{m}{{policy=\"tenants/{db}\",target=\"local\"}}");
    let healthy = || {
        let m = common::http_get(port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        common::http_get(port, "/healthz").is_some_and(|(code, _)| code == 200)
            && ["alice", "my%20db"].iter().all(|db| {
                metric(&m, &series("dr_follow_up", db)) == Some(1.0)
                    && metric(&m, &series("dr_follow_lag_seconds", db)).is_some_and(|l| l < 4.0)
            })
    };
    common::wait_until(
        "healthz 200 and each database's follower up",
        30,
        healthy,
        read_blog,
    );
    // Quiet for longer than max_lag: each copy stays known complete
    // through the fleet's activity record, though no follower looks.
    std::thread::sleep(Duration::from_secs(7));
    common::wait_until(
        "healthz 200 and every lag under max_lag while the fleet is quiet",
        3,
        healthy,
        read_blog,
    );
    assert!(
        !read_blog().contains("generation base"),
        "the standby streamed its copies: {}",
        read_blog()
    );
    // One database alone is refused: the daemon follows the fleet whole.
    let r = common::dr_with(&b, &["promote", "tenants", "--db", "alice"]);
    assert_eq!(r.code, 6, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("`dr promote tenants`"), "{}", r.stderr);

    // The primary is lost; the fleet fails over to B.
    primary.kill_group();
    let r = common::dr_with(&b, &["promote", "tenants", "--json"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.json()["databases"], 2, "{}", r.stdout);
    common::wait_until(
        "B streams a new generation of each database",
        60,
        || read_blog().matches("generation base committed").count() >= 2,
        read_blog,
    );
    let m = common::http_get(port, "/metrics").expect("metrics").1;
    assert!(
        !m.contains("dr_follow_up{")
            && metric(&m, "dr_wal_streamer_up{policy=\"tenants/alice\"}") == Some(1.0),
        "{m}"
    );
    // B's commits to a copy restore from the same repository.
    let c = rusqlite::Connection::open(env.path("copies/alice.db")).expect("open");
    for _ in 0..20 {
        c.execute("INSERT INTO t(v) VALUES (randomblob(300))", [])
            .expect("insert");
    }
    drop(c);
    let state = dump(&env.path("copies/alice.db"));
    let mut tries = 0;
    common::wait_until(
        "B's commits to alice restore",
        60,
        || {
            tries += 1;
            let to = env.path(&format!("after-{tries}.db"));
            let r = common::dr_with(
                &b,
                &[
                    "restore-local",
                    "tenants",
                    "--db",
                    "alice",
                    "--to",
                    &to.display().to_string(),
                ],
            );
            r.code == 0 && dump(&to) == state
        },
        read_blog,
    );

    // The old primary comes back with its old state_dir: every database
    // of the fleet is refused, loudly.
    let r = env.dr(&["backup-local", "tenants"]);
    assert_eq!(r.code, 6, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("was promoted on host"), "{}", r.stderr);
    let _back = replicate(&env);
    common::wait_for_log(&env.path("replicate.log"), "was promoted on host", 30);
}
