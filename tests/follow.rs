//! `dr follow`: a warm standby that applications can read while it
//! follows (issue 24). Real streamer, real target, real SQLite readers.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Env, dump, make_db, metric};

const POLICY: &str = "[wal]\nenabled = true\nsync_interval = \"1s\"\n";

fn insert(env: &Env, n: usize, pause_ms: u64) {
    let c = rusqlite::Connection::open(&env.db).expect("open");
    for _ in 0..n {
        c.execute("INSERT INTO t(v) VALUES (randomblob(300))", [])
            .expect("insert");
        std::thread::sleep(Duration::from_millis(pause_ms));
    }
}

fn count(path: &std::path::Path) -> Result<i64, String> {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| e.to_string())?;
    let ok: String = c
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if ok != "ok" {
        return Err(format!("quick_check: {ok}"));
    }
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .map_err(|e| e.to_string())
}

/// `dr follow app` with `config`, every 200 ms, into `to` (the policy's
/// path when `None`); its log in `log`, its final report in `out`.
fn follow_with(
    config: &std::path::Path,
    env: &Env,
    to: Option<&std::path::Path>,
    log: &std::path::Path,
    out: Option<std::path::PathBuf>,
) -> common::Proc {
    let stdout = match out {
        Some(p) => Stdio::from(std::fs::File::create(p).expect("out")),
        None => Stdio::null(),
    };
    let mut cmd = Command::new(common::dr_bin());
    cmd.arg("--config").arg(config).args([
        "follow",
        "app",
        "--poll",
        "200ms",
        "--identity",
        &env.key_arg(),
    ]);
    if let Some(to) = to {
        cmd.arg("--to").arg(to);
    }
    common::Proc::spawn(
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(std::fs::File::create(log).expect("log")),
    )
    .expect("dr follow")
}

/// `dr follow app --to COPY` with `env`'s own configuration.
fn spawn_follower(
    env: &Env,
    copy: &std::path::Path,
    log: &std::path::Path,
    out: Option<std::path::PathBuf>,
) -> common::Proc {
    follow_with(&env.config(), env, Some(copy), log, out)
}

#[test]
fn a_follower_stays_readable_and_consistent_catches_up_and_rebases_on_a_new_generation() {
    let env = Env::new(POLICY);
    make_db(&env.db, true, 50, 300);
    let mut streamer = common::spawn_replicate(&env);
    common::wait_for_log(&env.path("replicate.log"), "generation base committed", 30);
    let copy = env.path("standby.db");
    let log = env.path("follow.log");
    let mut follower = spawn_follower(&env, &copy, &log, Some(env.path("follow.out")));
    common::wait_for_log(&log, "following", 30);

    // A reader polls the copy throughout: every read is a consistent,
    // committed state, and the count never goes back.
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (done, copy) = (done.clone(), copy.clone());
        std::thread::spawn(move || {
            let (mut last, mut reads) = (0i64, 0u32);
            while !done.load(Ordering::Relaxed) {
                let n = count(&copy).map_err(|e| format!("read {reads}: {e}"))?;
                if n < last {
                    return Err(format!("the copy went back from {last} rows to {n}"));
                }
                (last, reads) = (n, reads + 1);
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(reads)
        })
    };
    insert(&env, 120, 15);
    let caught_up = |what: &str| {
        common::wait_until(
            what,
            60,
            || dump(&copy) == dump(&env.db),
            || std::fs::read_to_string(&log).unwrap_or_default(),
        );
    };
    caught_up("the copy to catch up with the source");

    // The source starts a new generation: its WAL is reset while nothing
    // streams it. The follower re-bases on the new base without a restart.
    streamer.kill_group();
    insert(&env, 20, 0);
    {
        let c = rusqlite::Connection::open(&env.db).expect("open");
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
    }
    insert(&env, 5, 0);
    let _streamer = common::spawn_replicate(&env);
    common::wait_for_log(&env.path("replicate.log"), "generation base committed", 30);
    insert(&env, 30, 10);
    caught_up("the copy to follow the new generation");
    done.store(true, Ordering::Relaxed);
    let reads = reader
        .join()
        .expect("reader")
        .expect("every read consistent");
    assert!(reads > 10, "the reader read {reads} times");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("re-based"), "{text}");
    // A DELETE and a VACUUM on the source (every page rewritten, the file
    // shorter): the copy follows, shrinks with it, and a reader polling it
    // meanwhile always finds a consistent database.
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (done, copy) = (done.clone(), copy.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                count(&copy)?;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok::<(), String>(())
        })
    };
    {
        let c = rusqlite::Connection::open(&env.db).expect("open");
        c.execute("DELETE FROM t WHERE id % 2 = 0", [])
            .expect("delete");
        c.execute_batch("VACUUM").expect("vacuum");
    }
    insert(&env, 5, 0);
    caught_up("the copy to follow a VACUUM");
    let pages = |p: &std::path::Path| -> i64 {
        rusqlite::Connection::open_with_flags(p, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.query_row("PRAGMA page_count", [], |r| r.get(0)))
            .expect("page_count")
    };
    assert_eq!(
        pages(&copy),
        pages(&env.db),
        "the copy shrank with the source"
    );
    done.store(true, Ordering::Relaxed);
    reader
        .join()
        .expect("reader")
        .expect("every read consistent");

    // SIGTERM: the follower stops, saying where the copy is.
    let _ = Command::new("kill")
        .args(["-TERM", &follower.id().to_string()])
        .status();
    let status = follower.wait().expect("wait");
    assert!(status.success(), "{text}");
    let out = std::fs::read_to_string(env.path("follow.out")).unwrap_or_default();
    assert!(out.contains("stopped following app"), "{out}");

    // Restarted over its copy, it continues where it stopped: no restore.
    let log2 = env.path("follow2.log");
    let _follower = spawn_follower(&env, &copy, &log2, None);
    common::wait_for_log(&log2, "continuing the copy where it stopped", 30);
    insert(&env, 10, 0);
    common::wait_until(
        "the restarted follower to apply new commits",
        60,
        || dump(&copy) == dump(&env.db),
        || std::fs::read_to_string(&log2).unwrap_or_default(),
    );
}

/// A segment missing on the target: the follower stops at the last
/// committed state it holds, with exit 7 and the frames named, never
/// skipping ahead to a copy that silently lacks commits.
#[test]
fn a_gap_stops_the_follower_with_exit_7_at_a_committed_state() {
    let env = Env::new(POLICY);
    make_db(&env.db, true, 20, 300);
    let _streamer = common::spawn_replicate(&env);
    common::wait_for_log(&env.path("replicate.log"), "generation base committed", 30);
    let copy = env.path("standby.db");
    let log = env.path("follow.log");
    let mut follower = spawn_follower(&env, &copy, &log, None);
    common::wait_for_log(&log, "following", 30);
    let held = dump(&env.db);
    // Paused, the follower misses three shipped segments; the middle one
    // is then lost from the target.
    let _ = Command::new("kill")
        .args(["-STOP", &follower.id().to_string()])
        .status();
    let segments = || {
        let mut s: Vec<String> = common::files_under(&env.path("backups/app/wal"))
            .into_iter()
            .filter(|k| k.ends_with(".zst.age") && !k.contains("-0_"))
            .collect();
        s.sort();
        s
    };
    let before = segments().len();
    for _ in 0..3 {
        let n = segments().len();
        insert(&env, 5, 0);
        common::wait_until(
            "a segment shipped",
            30,
            || segments().len() > n,
            || format!("{:?}", segments()),
        );
    }
    let all = segments();
    assert!(all.len() >= before + 3, "{all:?}");
    let middle = &all[all.len() - 2];
    std::fs::remove_file(env.path("backups/app/wal").join(middle)).expect("lose a segment");
    let _ = Command::new("kill")
        .args(["-CONT", &follower.id().to_string()])
        .status();
    let status = follower.wait().expect("wait");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(7), "{text}");
    assert!(text.contains("has a gap"), "{text}");
    // The copy holds a committed state the source passed through: the one
    // before the burst, or after its first segment; never a torn one.
    let got = dump(&copy);
    assert!(
        got.len() >= held.len() && got.len() <= held.len() + 5,
        "{} rows",
        got.len()
    );
    assert_eq!(count(&copy).map(|n| n as usize), Ok(got.len()));
}

/// `dr info --json` of `config`: the newest instant its first target's WAL
/// windows reach.
fn window_end(config: &std::path::Path) -> Option<chrono::DateTime<chrono::Utc>> {
    let out = Command::new(common::dr_bin())
        .arg("--config")
        .arg(config)
        .args(["info", "--json"])
        .output()
        .ok()?;
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    j["policies"][0]["targets"][0]["wal"]["windows"]
        .as_array()?
        .last()?["end"]
        .as_str()
        .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
        .map(|e| e.with_timezone(&chrono::Utc))
}

/// Twenty commits on the promoted copy, and the instant after them once
/// host B (`b`, its log `log`) has shipped them: (instant, state then).
fn write_on_the_new_primary(
    standby: &std::path::Path,
    b: &std::path::Path,
    log: &std::path::Path,
) -> (chrono::DateTime<chrono::Utc>, Vec<String>) {
    {
        let c = rusqlite::Connection::open(standby).expect("open");
        for _ in 0..20 {
            c.execute("INSERT INTO t(v) VALUES (randomblob(300))", [])
                .expect("insert");
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let t = chrono::Utc::now();
    let state = dump(standby);
    common::wait_until(
        "B's commits shipped",
        60,
        || window_end(b).is_some_and(|e| e >= t),
        || std::fs::read_to_string(log).unwrap_or_default(),
    );
    (t, state)
}

/// Failover: the standby is promoted while the primary is gone; it
/// streams a new generation into the same repository, so point-in-time
/// restore spans the failover; the old primary coming back with its old
/// state_dir is refused (no stream, no backup), though no process of the
/// new primary holds a lease then.
#[test]
fn promote_fails_over_keeps_the_history_and_fences_the_old_primary() {
    let env = Env::new(POLICY);
    make_db(&env.db, true, 30, 300);
    // Host B: the same configuration, its own state_dir, the copy at its
    // policy's path.
    let b = common::second_host(&env, "app", |p| p.replace("app.db", "standby.db"));
    let standby = env.path("standby.db");

    let mut primary = common::spawn_replicate(&env);
    common::wait_for_log(&env.path("replicate.log"), "generation base committed", 30);
    let flog = env.path("follow.log");
    let mut follower = follow_with(&b, &env, None, &flog, None);
    common::wait_for_log(&flog, "following", 30);
    insert(&env, 40, 5);
    // An instant is as the streamer saw the commits: a moment after them.
    std::thread::sleep(Duration::from_millis(500));
    let t1 = chrono::Utc::now();
    let state1 = dump(&env.db);
    common::wait_until(
        "the standby to catch up",
        60,
        || dump(&standby) == state1 && window_end(&env.config()).is_some_and(|e| e >= t1),
        || std::fs::read_to_string(&flog).unwrap_or_default(),
    );

    // The primary is lost; B is promoted.
    primary.kill_group();
    let r = common::dr_with(&b, &["promote", "app"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("promoted") && r.stdout.contains("stopped"),
        "{}",
        r.stdout
    );
    assert!(
        follower.wait().expect("wait").success(),
        "the follower stopped cleanly"
    );
    assert_eq!(
        dump(&standby),
        state1,
        "the promoted copy is the primary's last state"
    );

    // B streams a new generation into the same repository.
    let blog = env.path("replicate-b.log");
    let _b_stream = common::Proc::spawn(
        Command::new(common::dr_bin())
            .arg("--config")
            .arg(&b)
            .args(["replicate"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&blog).expect("log")),
    )
    .expect("replicate b");
    common::wait_for_log(&blog, "generation base committed", 30);
    let (t2, state2) = write_on_the_new_primary(&standby, &b, &blog);

    // The old primary comes back with its old state_dir: refused.
    let r = env.dr(&["backup-local", "app"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("was promoted on host"), "{}", r.stderr);
    let back = common::Proc::spawn(
        Command::new(common::dr_bin())
            .arg("--config")
            .arg(env.config())
            .args(["replicate"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(env.path("replicate-back.log")).expect("log")),
    )
    .expect("replicate a");
    let out = back.wait_with_output().expect("wait");
    let text = std::fs::read_to_string(env.path("replicate-back.log")).unwrap_or_default();
    assert_eq!(out.status.code(), Some(6), "{text}");
    assert!(text.contains("was promoted on host"), "{text}");

    // Point-in-time restore spans the failover.
    for (i, (at, want)) in [(t1, &state1), (t2, &state2)].into_iter().enumerate() {
        let to = env.path(&format!("pit{i}.db"));
        let at = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let r = common::dr_with(
            &b,
            &[
                "restore-local",
                "app",
                "--to",
                &to.display().to_string(),
                "--at",
                &at,
                "--identity",
                &env.key_arg(),
            ],
        );
        assert_eq!(r.code, 0, "{at}: {}", r.stderr);
        let got = dump(&to);
        assert!(
            &got == want,
            "{at}: {} rows restored, {} wanted:\n{}",
            got.len(),
            want.len(),
            r.stdout
        );
    }
}

/// Forty commits on the primary, then the wait for the copy at `standby`
/// to equal it (the follower's log, `log`, said on a timeout): the state.
fn write_and_catch_up(env: &Env, standby: &std::path::Path, log: &std::path::Path) -> Vec<String> {
    insert(env, 40, 5);
    let state = dump(&env.db);
    common::wait_until(
        "the standby to catch up",
        60,
        || dump(standby) == state,
        || std::fs::read_to_string(log).unwrap_or_default(),
    );
    state
}

#[test]
fn a_daemon_keeps_the_standby_says_when_it_fails_and_takes_over_when_promoted() {
    let env = Env::new(POLICY);
    make_db(&env.db, true, 30, 300);
    // Host B: the primary's policy with [follow], and the key.
    let b = common::standby_daemon_host(&env, "app", |p| p.replace("app.db", "standby.db"));
    let standby = env.path("standby.db");
    let blog = env.path("daemon-b.log");
    let read_blog = || std::fs::read_to_string(&blog).unwrap_or_default();

    let mut primary = common::spawn_replicate(&env);
    common::wait_for_log(&env.path("replicate.log"), "generation base committed", 30);
    let (_daemon, port) = common::start_daemon_listening_with(&b, &blog, &[]);
    common::wait_for_log(&blog, "following", 30);
    let state1 = write_and_catch_up(&env, &standby, &blog);
    let healthy = || {
        let m = common::http_get(port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        common::http_get(port, "/healthz").is_some_and(|(code, _)| code == 200)
            && metric(&m, "dr_follow_up{policy=\"app\",target=\"local\"}") == Some(1.0)
            && metric(&m, "dr_follow_lag_seconds{policy=\"app\",target=\"local\"}")
                .is_some_and(|l| l < 4.0)
    };
    common::wait_until("healthz 200 and the follower up", 30, healthy, read_blog);
    let m = common::http_get(port, "/metrics").expect("metrics").1;
    // What the shipped dashboard shows of a standby is served.
    for name in common::dashboard_metrics()
        .iter()
        .filter(|n| n.starts_with("dr_follow_"))
    {
        assert!(
            m.contains(&format!("{name}{{policy=\"app\"")),
            "the dashboard's {name}: {m}"
        );
    }
    assert!(
        metric(
            &m,
            "dr_follow_transactions_total{policy=\"app\",target=\"local\"}"
        )
        .is_some_and(|n| n >= 40.0),
        "{m}"
    );
    assert!(
        !m.contains("dr_wal_streamer_up{policy=\"app\"}")
            && !m.contains("dr_backup_last_success_timestamp_seconds{policy=\"app\""),
        "a standby reports its follower, not a stream or backups it does not run: {m}"
    );
    assert!(
        !read_blog().contains("generation base"),
        "the standby streamed its copy: {}",
        read_blog()
    );
    // Another follower of the same copy is refused.
    let r = common::dr_with(&b, &["follow", "app"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("another follower"), "{}", r.stderr);

    // The primary is lost, and a damaged segment lands where the next one
    // goes: the follower stops on it, says so, and is restarted.
    primary.kill_group();
    // Where the copy stands once it holds every segment the primary
    // shipped before it died (a segment landing just before the kill is
    // applied after it): the damaged one must be the next.
    let position = || -> (String, u64) {
        let pos: serde_json::Value = serde_json::from_slice(
            &std::fs::read(env.path("state-b/follow/app.json")).unwrap_or_default(),
        )
        .unwrap_or_default();
        (
            pos["generation"].as_str().unwrap_or_default().to_string(),
            pos["frame"].as_u64().unwrap_or_default(),
        )
    };
    let shipped = |generation: &str| -> u64 {
        std::fs::read_dir(env.path(&format!("backups/app/wal/{generation}")))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.split('_')
                    .next()?
                    .split_once('-')?
                    .1
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or_default()
    };
    common::wait_until(
        "the copy to hold every segment shipped before the kill",
        30,
        || {
            let (generation, frame) = position();
            !generation.is_empty() && frame == shipped(&generation)
        },
        read_blog,
    );
    let (generation, frame) = position();
    let t = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let bad = env.path(&format!(
        "backups/app/wal/{generation}/{:016}-{:016}_{t}_{t}.zst.age",
        frame + 1,
        frame + 3
    ));
    std::fs::write(&bad, b"not a segment").expect("bad segment");
    common::wait_until(
        "healthz 503 naming follower_down, and dr_follow_up 0",
        30,
        || {
            let m = common::http_get(port, "/metrics")
                .map(|(_, b)| b)
                .unwrap_or_default();
            common::http_get(port, "/healthz")
                .is_some_and(|(code, body)| code == 503 && body.contains("follower_down"))
                && metric(&m, "dr_follow_up{policy=\"app\",target=\"local\"}") == Some(0.0)
        },
        read_blog,
    );
    assert!(
        read_blog().contains("the follower stopped"),
        "{}",
        read_blog()
    );
    std::fs::remove_file(&bad).expect("remove");
    common::wait_until("the follower back", 90, healthy, read_blog);
    assert_eq!(
        dump(&standby),
        state1,
        "the copy is the primary's last state"
    );

    // B is promoted while its daemon runs: the daemon stops following and
    // streams a new generation of the same policy from the copy.
    let r = common::dr_with(&b, &["promote", "app"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    common::wait_for_log(&blog, "generation base committed", 60);
    let (_, state2) = write_on_the_new_primary(&standby, &b, &blog);
    let to = env.path("after.db");
    let r = common::dr_with(
        &b,
        &["restore-local", "app", "--to", &to.display().to_string()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(dump(&to), state2, "the new primary's commits restore");
    let m = common::http_get(port, "/metrics").expect("metrics").1;
    assert!(
        metric(&m, "dr_wal_streamer_up{policy=\"app\"}") == Some(1.0)
            && !m.contains("dr_follow_up{"),
        "{m}"
    );
}

/// A follower of an S3 target catches up through one listing a look
/// (`StartAfter` the newest segment it holds), and a quiet source costs a
/// look every `--idle-poll`, not every `--poll`.
#[test]
fn a_follower_of_s3_catches_up_and_idles_on_a_few_requests() {
    use common::faults::FaultProxy;
    use common::s3::{S3Server, SECRET_KEY};
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "bucket");
    let counted = FaultProxy::start(server.port, 1, 0);
    let env = common::s3::env_at(&server.endpoint(), "[\"s3\"]", POLICY, SECRET_KEY, "bucket");
    make_db(&env.db, true, 30, 300);
    let _primary = common::spawn_replicate(&env);
    common::wait_for_log(&env.path("replicate.log"), "generation base committed", 30);
    // Host B reads the bucket through a proxy that counts its requests.
    let b = common::second_host(&env, "app", |p| p.replace("app.db", "standby.db"));
    let text = std::fs::read_to_string(&b).expect("b.toml");
    std::fs::write(&b, text.replace(&server.endpoint(), &counted.endpoint())).expect("b.toml");
    let standby = env.path("standby.db");
    let flog = env.path("follow.log");
    let _follower = common::Proc::spawn(
        Command::new(common::dr_bin())
            .arg("--config")
            .arg(&b)
            .args([
                "follow",
                "app",
                "--poll",
                "200ms",
                "--idle-poll",
                "4s",
                "--identity",
                &env.key_arg(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&flog).expect("log")),
    )
    .expect("dr follow");
    common::wait_for_log(&flog, "following", 30);
    write_and_catch_up(&env, &standby, &flog);

    // Quiet: at most one look every 4 s once the wait has grown (a fixed
    // 200 ms poll would make 80 in this time).
    let quiet = counted.requests_during(Duration::from_secs(16));
    assert!(
        quiet.len() <= 16 / 4 + 6,
        "{} requests while the source was quiet for 16 s: {quiet:#?}",
        quiet.len()
    );
    assert!(
        quiet.iter().all(|r| r.starts_with("GET ")
            && r.contains("list-type=2")
            && r.contains("start-after=")),
        "every look is one listing after the newest segment held: {quiet:#?}"
    );

    // The first commit after the quiet spell is seen within the idle wait.
    insert(&env, 1, 0);
    let state = dump(&env.db);
    let t = std::time::Instant::now();
    common::wait_until(
        "the commit after the quiet spell",
        30,
        || dump(&standby) == state,
        || std::fs::read_to_string(&flog).unwrap_or_default(),
    );
    assert!(
        t.elapsed() < Duration::from_secs(4 + 3),
        "seen after {:?}",
        t.elapsed()
    );
}
