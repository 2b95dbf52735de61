//! WAL streaming and point-in-time restore, with a real writer process and
//! the real `dr replicate` process (and a real S3 server for the outage).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Env;
use common::s3::S3Server;

const WAL_POLICY: &str = "[wal]\nenabled = true\nsync_interval = \"1s\"\ncheckpoint_pages = 200\nsegment_max = \"256KiB\"\n";

/// Starts `dr replicate` in the background.
fn replicate(env: &Env) -> common::Proc {
    common::spawn_replicate(env)
}

/// `dr info --json` once the streamer was stopped on purpose: the
/// database is at risk for that reason alone (`streamer_down`, exit 1),
/// or protected; any other reason fails the test.
fn info_after_stop(env: &Env) -> serde_json::Value {
    let r = env.dr(&["info", "--json"]);
    let j = r.json();
    for p in j["policies"].as_array().expect("policies") {
        for reason in p["verdict"]["reasons"].as_array().expect("reasons") {
            assert_eq!(reason["reason"], "streamer_down", "{}", r.stderr);
        }
    }
    assert!(r.code == 0 || r.code == 1, "{}", r.stderr);
    j
}

/// Runs the writer to completion.
fn write(env: &Env, bursts: u32, rows: u32, gap_ms: u32, pad: u32, extra: &[&str]) {
    let st = Command::new("python3")
        .arg(common::wal_writer())
        .arg("write")
        .arg(&env.db)
        .arg(env.path("marks"))
        .args([bursts, rows, gap_ms, pad].map(|n| n.to_string()))
        .args(extra)
        .status()
        .expect("python3 writer");
    assert!(st.success(), "writer failed");
}

/// (instant, burst, digest) recorded by the writer in each quiet gap.
fn marks(env: &Env) -> Vec<(String, u32, String)> {
    std::fs::read_to_string(env.path("marks"))
        .expect("marks")
        .lines()
        .map(|l| {
            let mut it = l.split(' ');
            let t: f64 = it.next().and_then(|s| s.parse().ok()).expect("time");
            let b = it.next().and_then(|s| s.parse().ok()).expect("burst");
            let d = it.next().expect("digest").to_string();
            let at = chrono::DateTime::from_timestamp_millis((t * 1000.0) as i64)
                .expect("ts")
                .to_rfc3339();
            (at, b, d)
        })
        .collect()
}

/// Waits until the streamer's state says a base and a segment are shipped.
fn wait_streaming(env: &Env) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // info exits non-zero while a target is down, and still prints what it knows.
        let r = env.dr(&["info", "--json"]);
        if let Ok(j) = serde_json::from_str::<serde_json::Value>(&r.stdout) {
            let t = &j["policies"][0]["targets"][0];
            if !t["backups"].as_array().is_none_or(|b| b.is_empty()) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "dr took no base backup: {}{}",
            std::fs::read_to_string(env.path("replicate.log")).unwrap_or_default(),
            std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn restore_at(env: &Env, cmd: &str, at: &str, to: &str) -> common::Run {
    restore_at_with(env, cmd, at, to, &[])
}

/// [`restore_at`] with more arguments (`--json`).
fn restore_at_with(env: &Env, cmd: &str, at: &str, to: &str, extra: &[&str]) -> common::Run {
    let to = env.path(to).display().to_string();
    let key = env.key_arg();
    let mut args = vec![
        cmd,
        "app",
        "--to",
        &to,
        "--identity",
        &key,
        "--at",
        at,
        "--force",
    ];
    args.extend_from_slice(extra);
    env.dr(&args)
}

/// Adds an s3 target at `endpoint` (bucket `walbucket`) beside local, and
/// streams policy `app` to both.
fn add_s3(env: &Env, endpoint: &str) {
    let toml = common::s3::target_toml(
        env.dir.path(),
        "s3",
        endpoint,
        "walbucket",
        common::s3::SECRET_KEY,
    );
    let cfg = std::fs::read_to_string(env.config()).expect("cfg") + &toml;
    std::fs::write(env.config(), cfg).expect("cfg");
    let policy = env.path("policies/app.toml");
    let text = std::fs::read_to_string(&policy).expect("policy");
    std::fs::write(
        &policy,
        text.replace("targets = [\"local\"]", "targets = [\"local\", \"s3\"]"),
    )
    .expect("policy");
}

fn generations(env: &Env, target: usize) -> usize {
    let j = info_after_stop(env);
    j["policies"][0]["targets"][target]["wal"]["generations"]
        .as_array()
        .map_or(0, |g| g.len())
}

#[test]
fn restores_at_any_instant_through_checkpoints_a_vacuum_and_a_big_transaction() {
    let env = Env::new(WAL_POLICY);
    common::make_db(&env.db, true, 50, 1000);
    let dr = replicate(&env);
    wait_streaming(&env);
    // 10 bursts; the application's own autocheckpoint (1000 pages) and dr's
    // (200) both run; burst 4 is one 3 MiB transaction (> segment_max);
    // burst 7 deletes most rows and VACUUMs the file smaller.
    write(
        &env,
        10,
        60,
        500,
        3000,
        &["--big-at", "4", "3000000", "--vacuum-at", "7"],
    );
    let final_digest = common::digest(&env.db);
    assert_eq!(common::stop(dr), 0, "replicate must exit 0 on SIGTERM");

    for (at, burst, want) in marks(&env) {
        let r = restore_at(&env, "restore-local", &at, "at.db").ok();
        assert!(r.stdout.contains("WAL of generation"), "{}", r.stdout);
        assert_eq!(
            common::digest(&env.path("at.db")),
            want,
            "restore at {at} (after burst {burst}) differs from the writer's state then"
        );
    }
    // Without --at: the newest committed state.
    env.restore("newest.db", &["--force"]).ok();
    assert_eq!(common::digest(&env.path("newest.db")), final_digest);
    // One unbroken generation across every WAL restart.
    assert_eq!(
        generations(&env, 0),
        1,
        "continuity was lost: {}",
        env.dr(&["info"]).stdout
    );

    // An instant before anything was backed up says what is covered.
    let r = restore_at(&env, "restore-local", "2001-01-01 00:00:00", "old.db");
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(r.stderr.contains("covers"), "{}", r.stderr);
    assert!(!env.path("old.db").exists());
}

#[test]
fn kill_9_mid_stream_then_restart_loses_nothing_shipped_and_leaves_no_gap() {
    let env = Env::new(WAL_POLICY);
    common::make_db(&env.db, true, 50, 1000);
    let mut dr = replicate(&env);
    wait_streaming(&env);
    write(&env, 3, 40, 1500, 2000, &[]);
    let shipped_marks = marks(&env);
    // Once the window reaches the last instant, it is shipped: then kill.
    let last = chrono::DateTime::parse_from_rfc3339(&shipped_marks[2].0).expect("t");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let j = info_after_stop(&env);
        let end = j["policies"][0]["targets"][0]["wal"]["windows"][0]["end"]
            .as_str()
            .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok());
        if end.is_some_and(|e| e >= last) {
            break;
        }
        assert!(Instant::now() < deadline, "the window never reached {last}");
        std::thread::sleep(Duration::from_millis(100));
    }
    dr.kill().expect("kill -9");
    let _ = dr.wait();
    // The application goes on while dr is dead; its autocheckpoint runs.
    write(&env, 3, 400, 400, 2000, &[]);
    let dr = replicate(&env);
    // Streaming again: the generation continued, or a new one has its base.
    let log_text = || std::fs::read_to_string(env.path("replicate.log")).unwrap_or_default();
    common::wait_until(
        "the restarted streamer to resume",
        30,
        || {
            let l = log_text();
            l.contains("continuing the generation") || l.contains("generation base committed")
        },
        log_text,
    );
    let n = marks(&env).len();
    write(&env, 3, 40, 600, 2000, &[]);
    let after_restart: Vec<String> = marks(&env).into_iter().skip(n).map(|m| m.0).collect();
    let final_digest = common::digest(&env.db);
    // SIGTERM ships what was committed before it: no wait for a sync.
    assert_eq!(common::stop(dr), 0);
    let log = log_text();

    // Everything shipped before the kill restores exactly.
    for (at, burst, want) in &shipped_marks {
        restore_at(&env, "restore-local", at, "at.db").ok();
        assert_eq!(
            &common::digest(&env.path("at.db")),
            want,
            "burst {burst} at {at}\n{log}"
        );
    }
    // Every instant written while the restarted streamer watched restores
    // exactly; those written while dr was dead restore exactly or are
    // refused as not covered: never a state that did not exist.
    check_marks(&env, &after_restart);
    env.restore("newest.db", &["--force"]).ok();
    assert_eq!(common::digest(&env.path("newest.db")), final_digest);
}

#[test]
fn an_s3_target_down_for_30_seconds_catches_up_in_order_without_a_gap() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = S3Server::start(&dir.path().join("s3"), "walbucket");
    let env = Env::new(WAL_POLICY);
    add_s3(&env, &server.endpoint());
    common::make_db(&env.db, true, 50, 1000);
    let dr = replicate(&env);
    wait_streaming(&env);
    write(&env, 2, 30, 600, 2000, &[]);

    server.kill();
    let down = Instant::now();
    write(&env, 6, 30, 4000, 2000, &[]);
    // While it is down the local target keeps up, and the state says why s3 lags.
    let j = env.dr(&["info", "--json", "--target", "s3"]).json();
    let stream = &j["policies"][0]["targets"][0]["wal"]["stream"];
    assert!(stream["error"].is_string(), "{stream}");
    let left = Duration::from_secs(30).saturating_sub(down.elapsed());
    std::thread::sleep(left);
    server.restart();
    write(&env, 2, 30, 600, 2000, &[]);
    let final_digest = common::digest(&env.db);
    // Catch-up: the lag on s3 falls back to zero.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = env.dr(&["info", "--json", "--target", "s3"]).json();
        let st = &j["policies"][0]["targets"][0]["wal"]["stream"];
        if st["error"].is_null() && st["lag_seconds"].as_f64() == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "s3 did not catch up: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(common::stop(dr), 0);
    assert_eq!(generations(&env, 1), 1);
    for (at, burst, want) in marks(&env) {
        restore_at(&env, "restore-s3", &at, "at.db").ok();
        assert_eq!(
            common::digest(&env.path("at.db")),
            want,
            "burst {burst} at {at} from s3"
        );
    }
    let key = env.key_arg();
    let to = env.path("newest.db").display().to_string();
    env.dr(&["restore-s3", "app", "--to", &to, "--identity", &key])
        .ok();
    assert_eq!(common::digest(&env.path("newest.db")), final_digest);
}

#[test]
fn a_database_not_in_wal_mode_is_a_clear_error() {
    let env = Env::new(WAL_POLICY);
    common::make_db(&env.db, false, 10, 100);
    let r = env.dr(&["replicate"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("not WAL"), "{}", r.stderr);
    assert!(r.stderr.contains("journal_mode=WAL"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn a_policy_without_wal_is_refused_and_at_outside_the_window_names_it() {
    let env = Env::new("");
    common::make_db(&env.db, true, 10, 100);
    let r = env.dr(&["replicate", "app"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("[wal] enabled = true"), "{}", r.stderr);
    env.dr(&["backup-local", "app"]).ok();
    let r = restore_at(&env, "restore-local", "2030-01-01T00:00:00Z", "x.db");
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("no backup on this target has a WAL position"),
        "{}",
        r.stderr
    );
    // A time dr cannot read is a usage error (64), not a config problem (2).
    let r = restore_at(&env, "restore-local", "yesterday", "x.db");
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("RFC 3339"), "{}", r.stderr);
}

#[test]
fn a_full_spool_is_loud_keeps_every_segment_and_ships_them_on_the_next_run() {
    // Nothing listens on the target's port until the end; it is held so
    // that no other test's server takes it meanwhile.
    let held = common::HeldPort::new();
    let port = held.port;
    // A spool of under a segment is refused: this one holds a few.
    let env = Env::new(
        &WAL_POLICY
            .replace("[wal]\n", "[wal]\nspool_max = \"200KiB\"\n")
            .replace("segment_max = \"256KiB\"", "segment_max = \"64KiB\""),
    );
    add_s3(&env, &format!("http://127.0.0.1:{port}"));
    common::make_db(&env.db, true, 50, 1000);
    let dr = replicate(&env);
    wait_streaming(&env);
    write(&env, 4, 30, 1200, 4000, &[]);
    let final_digest = common::digest(&env.db);
    // Under load the capture may trail the writer: wait for it to fill.
    let deadline = Instant::now() + Duration::from_secs(20);
    let j = loop {
        let j = env.dr(&["info", "--json", "--target", "s3"]).json();
        if j["policies"][0]["targets"][0]["wal"]["stream"]["spool_full"] == true
            || Instant::now() > deadline
        {
            break j;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stream = &j["policies"][0]["targets"][0]["wal"]["stream"];
    assert_eq!(stream["spool_full"], true, "{stream}");
    assert!(
        stream["lag_seconds"].as_f64().is_some_and(|l| l > 1.0),
        "{stream}"
    );
    let code = common::stop(dr);
    let log = std::fs::read_to_string(env.path("replicate.log")).expect("log");
    assert_eq!(
        code, 1,
        "unshipped segments fail the run (target: 1): {log}"
    );
    assert!(log.contains("spool is full"), "{log}");
    assert!(log.contains("left unshipped"), "{log}");

    // The server comes up; the next run ships the spool, in order, and goes on.
    let dir = tempfile::tempdir().expect("tmp");
    let _server = S3Server::start_on(&dir.path().join("s3"), "walbucket", held);
    let dr = replicate(&env);
    // Longer than one S3 read timeout (60 s) and its retry: a request the
    // server just started let stall is retried, not a failure here.
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let j = env.dr(&["info", "--json", "--target", "s3"]).json();
        let st = &j["policies"][0]["targets"][0]["wal"]["stream"];
        if st["spool_bytes"].as_u64() == Some(0) && st["error"].is_null() {
            break;
        }
        assert!(Instant::now() < deadline, "the spool never drained: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(common::stop(dr), 0);
    let key = env.key_arg();
    let to = env.path("s3.db").display().to_string();
    env.dr(&["restore-s3", "app", "--to", &to, "--identity", &key])
        .ok();
    assert_eq!(common::digest(&env.path("s3.db")), final_digest);
    // While the spool was full dr copied nothing, so it cannot say when
    // those commits happened: the next run continues the generation and
    // marks the interval it did not watch (or starts a new generation), so
    // the windows break there, and every instant restores exactly or is
    // refused as not covered.
    let info = env.dr(&["info", "--json", "--target", "local"]).json();
    let windows = info["policies"][0]["targets"][0]["wal"]["windows"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(
        windows >= 2 || generations(&env, 0) >= 2,
        "{}",
        env.dr(&["info"]).stdout
    );
    // The first burst (~120 KiB) fits the 200 KiB spool: its instant was
    // watched and must restore; the others restore exactly or are refused.
    let first = marks(&env).first().map(|m| m.0.clone()).expect("marks");
    check_marks(&env, &[first]);
}

#[test]
fn backups_taken_while_streaming_carry_a_wal_position_and_expire_trims_older_wal() {
    let env = Env::new(&format!("{WAL_POLICY}[retention]\nfull = 1\n"));
    common::make_db(&env.db, true, 50, 1000);
    let dr = replicate(&env);
    wait_streaming(&env);
    write(&env, 2, 40, 600, 2000, &[]);
    let before = env.objects().iter().filter(|o| o.contains("/wal/")).count();
    // A second full while streaming: it knows its WAL position, so the first
    // full and the WAL it covers can go.
    let r = env
        .dr(&["backup-local", "app", "--type", "full", "--json"])
        .ok();
    assert_eq!(
        r.json()[0]["expired"].as_array().map(|a| a.len()),
        Some(2),
        "{}",
        r.stdout
    );
    write(&env, 2, 40, 600, 2000, &[]);
    assert_eq!(common::stop(dr), 0);
    let j = info_after_stop(&env);
    let t = &j["policies"][0]["targets"][0];
    assert_eq!(t["backups"].as_array().map(|b| b.len()), Some(1), "{t}");
    let g = &t["wal"]["generations"][0];
    assert_eq!(g["bases"][0], t["backups"][0]["label"], "{t}");
    let after_first = env.objects().iter().filter(|o| o.contains("/wal/")).count();
    assert!(after_first > 0 && before > 0);
    let all = marks(&env);
    // Instants before the kept backup are gone; after it they restore exactly.
    let r = restore_at(&env, "restore-local", &all[0].0, "old.db");
    assert_eq!(r.code, 5, "{}", r.stderr);
    for (at, burst, want) in &all[2..] {
        restore_at(&env, "restore-local", at, "at.db").ok();
        assert_eq!(
            &common::digest(&env.path("at.db")),
            want,
            "burst {burst} at {at}"
        );
    }
}

fn segment_files(env: &Env) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = common::files_under(&env.path("backups/app/wal"))
        .into_iter()
        .filter(|f| f.ends_with(".zst.age"))
        .map(|f| env.path("backups/app/wal").join(f))
        .collect();
    out.sort();
    out
}

#[test]
fn a_wal_gap_refuses_the_newest_state_names_the_newest_instant_and_fails_verify() {
    let env = Env::new(WAL_POLICY);
    common::make_db(&env.db, true, 50, 500);
    let dr = replicate(&env);
    wait_streaming(&env);
    write(&env, 6, 30, 1500, 500, &[]);
    assert_eq!(common::stop(dr), 0);
    // Segments with frames (not heartbeats, whose first frame is past their last).
    let segs: Vec<PathBuf> = segment_files(&env)
        .into_iter()
        .filter(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            let (a, b) = name[..33].split_once('-').expect("range");
            a.parse::<u64>().expect("first") <= b.parse::<u64>().expect("last")
        })
        .collect();
    assert!(segs.len() >= 4, "{segs:?}");
    // One segment from the middle goes missing.
    std::fs::remove_file(&segs[segs.len() / 2]).expect("rm");
    let r = env.restore("newest.db", &[]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert!(r.stderr.contains("gap"), "{}", r.stderr);
    assert!(!env.path("newest.db").exists());
    // The message names the newest instant: asking for it restores the state before the gap.
    let at = r
        .stderr
        .split("--at '")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .expect("instant in the message")
        .to_string();
    restore_at(&env, "restore-local", &at, "before-gap.db").ok();
    let info = env.dr(&["info"]);
    assert_eq!(info.code, 3, "{}", info.stderr);
    assert!(info.stdout.contains("GAP"), "{}", info.stdout);
    let key = env.key_arg();
    let v = env.dr(&["verify", "app", "--identity", &key]);
    assert_eq!(v.code, 3, "{}{}", v.stdout, v.stderr);
    assert!(
        format!("{}{}", v.stdout, v.stderr).contains("gap"),
        "{}{}",
        v.stdout,
        v.stderr
    );
}

#[test]
fn verify_reads_every_wal_segment_and_names_a_corrupt_one() {
    let env = Env::new(WAL_POLICY);
    common::make_db(&env.db, true, 50, 500);
    let dr = replicate(&env);
    wait_streaming(&env);
    write(&env, 3, 30, 1500, 500, &[]);
    assert_eq!(common::stop(dr), 0);
    let key = env.key_arg();
    env.dr(&["verify", "app", "--identity", &key]).ok();
    let segs = segment_files(&env);
    let victim = segs
        .iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 400))
        .expect("a segment with frames");
    let mut bytes = std::fs::read(victim).expect("read");
    let i = bytes.len() / 2;
    bytes[i] ^= 0x40;
    std::fs::write(victim, bytes).expect("write");
    let v = env.dr(&["verify", "app", "--identity", &key]);
    assert_eq!(v.code, 3, "{}{}", v.stdout, v.stderr);
    let name = victim
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        format!("{}{}", v.stdout, v.stderr).contains(&name),
        "{}{}",
        v.stdout,
        v.stderr
    );
}

/// Starts `dr daemon` in the background, logging to daemon.log, once its
/// config listens on a port of the system's choosing ([`with_listen`]).
fn daemon(env: &Env) -> common::Proc {
    daemon_on_port(env).0
}

/// [`daemon`], with the port it bound.
fn daemon_on_port(env: &Env) -> (common::Proc, u16) {
    common::start_daemon_listening(env, &["--log-level", "debug"])
}

/// Lets the daemon listen on a free port it picks itself (tests run side
/// by side; the default port would be shared).
fn with_listen(env: &Env) {
    let text = std::fs::read_to_string(env.config()).expect("cfg")
        + "[daemon]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(env.config(), text).expect("cfg");
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    common::http_get(port, path)
}

fn wait_until(what: &str, secs: u64, env: &Env, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn lag(port: u16) -> Option<f64> {
    let (_, m) = http_get(port, "/metrics")?;
    m.lines()
        .find(|l| l.starts_with("dr_wal_lag_seconds{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn backup_count(env: &Env) -> usize {
    let r = env.dr(&["info", "--json"]);
    serde_json::from_str::<serde_json::Value>(&r.stdout)
        .ok()
        .and_then(|j| {
            j["policies"][0]["targets"][0]["backups"]
                .as_array()
                .map(Vec::len)
        })
        .unwrap_or(0)
}

/// Every mark restores exactly, or is refused as not covered; `exact` are
/// the marks that must restore.
fn check_marks(env: &Env, exact: &[String]) {
    for (at, burst, want) in marks(env) {
        let r = restore_at(env, "restore-local", &at, "at.db");
        if r.code == 0 {
            assert_eq!(
                common::digest(&env.path("at.db")),
                want,
                "burst {burst} at {at}"
            );
        } else {
            assert!(!exact.contains(&at), "{at} must restore: {}", r.stderr);
            assert_eq!(r.code, 5, "{}", r.stderr);
            assert!(r.stderr.contains("covers"), "{}", r.stderr);
        }
    }
}

#[test]
fn the_generation_continues_across_sighup_and_a_daemon_restart_under_a_live_writer() {
    let env = Env::new(WAL_POLICY);
    common::make_db(&env.db, true, 50, 500);
    with_listen(&env);
    let mut d = daemon(&env);
    wait_streaming(&env);
    write(&env, 2, 20, 1200, 500, &[]);
    let _ = Command::new("kill")
        .args(["-HUP", &d.id().to_string()])
        .status();
    common::wait_for_log(&env.path("daemon.log"), "configuration reloaded", 10);
    write(&env, 2, 20, 1200, 500, &[]);
    let before_stop: Vec<String> = marks(&env).into_iter().map(|m| m.0).collect();
    // The writer goes on while the daemon stops and starts again.
    let mut bg = common::Proc::spawn(
        Command::new("python3")
            .arg(common::wal_writer())
            .arg("write")
            .arg(&env.db)
            .arg(env.path("marks"))
            .args(["4", "20", "1000", "500"]),
    )
    .expect("writer");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(common::stop(d), 0);
    std::thread::sleep(Duration::from_millis(1500));
    let log_text = || std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default();
    let continued = log_text().matches("continuing the generation").count();
    d = daemon(&env);
    assert!(bg.wait().expect("writer").success());
    // The restarted daemon's streamer has taken the generation up again.
    common::wait_until(
        "the restarted daemon to continue the generation",
        30,
        || log_text().matches("continuing the generation").count() > continued,
        log_text,
    );
    let n = marks(&env).len();
    write(&env, 2, 20, 1200, 500, &[]);
    let after_restart: Vec<String> = marks(&env).into_iter().skip(n).map(|m| m.0).collect();
    let final_digest = common::digest(&env.db);
    // SIGTERM ships what was committed before it: no wait for a sync.
    assert_eq!(common::stop(d), 0);
    let log = std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default();
    assert_eq!(generations(&env, 0), 1, "one generation throughout\n{log}");
    assert_eq!(backup_count(&env), 1, "no extra full\n{log}");
    assert!(log.contains("continuing the generation"), "{log}");
    // Instants before the stop and after the restart restore exactly from
    // the one base; those the daemon did not watch are refused, never wrong.
    let exact: Vec<String> = before_stop.into_iter().chain(after_restart).collect();
    check_marks(&env, &exact);
    env.restore("newest.db", &["--force"]).ok();
    assert_eq!(common::digest(&env.path("newest.db")), final_digest);
}

#[test]
fn a_failing_streamer_is_reported_restarted_by_itself_and_its_lag_grows() {
    let env = Env::new(WAL_POLICY);
    common::make_db(&env.db, true, 50, 500);
    with_listen(&env);
    let (d, port) = daemon_on_port(&env);
    wait_streaming(&env);
    write(&env, 2, 20, 1000, 500, &[]);
    wait_until("healthy", 10, &env, || {
        http_get(port, "/healthz").is_some_and(|(c, _)| c == 200)
    });
    // The spool becomes unusable: a file where its directory was.
    let spool = env.path("state/wal/app/spool");
    let away = env.path("state/wal/app/spool.away");
    std::fs::rename(&spool, &away).expect("mv");
    std::fs::write(&spool, b"not a directory").expect("file");
    let t = Instant::now();
    wait_until("streamer_down", 10, &env, || {
        http_get(port, "/healthz").is_some_and(|(c, b)| c == 503 && b.contains("streamer_down"))
    });
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let l1 = lag(port).expect("lag");
    std::thread::sleep(Duration::from_secs(2));
    let l2 = lag(port).expect("lag");
    assert!(
        l2 >= l1 + 1.5,
        "the lag of a stopped streamer grows: {l1} then {l2}"
    );
    write(&env, 1, 20, 500, 500, &[]);
    // Usable again: the streamer comes back by itself.
    std::fs::remove_file(&spool).expect("rm");
    std::fs::rename(&away, &spool).expect("mv back");
    wait_until("healthy again", 40, &env, || {
        http_get(port, "/healthz").is_some_and(|(c, _)| c == 200)
    });
    let n = marks(&env).len();
    write(&env, 2, 20, 1200, 500, &[]);
    let after: Vec<String> = marks(&env).into_iter().skip(n).map(|m| m.0).collect();
    let final_digest = common::digest(&env.db);
    assert_eq!(common::stop(d), 0);
    let log = std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default();
    assert!(log.contains("restarting in"), "{log}");
    // Across the outage every instant restores exactly or is refused.
    check_marks(&env, &after);
    env.restore("newest.db", &["--force"]).ok();
    assert_eq!(common::digest(&env.path("newest.db")), final_digest);
}

#[test]
fn verify_reads_every_backup_and_segment_and_names_each_damaged_one() {
    let env = Env::new(WAL_POLICY);
    common::make_db(&env.db, true, 50, 500);
    let dr = replicate(&env);
    wait_streaming(&env);
    write(&env, 2, 30, 1200, 500, &[]);
    env.dr(&["backup-local", "app", "--type", "full"]).ok();
    write(&env, 2, 30, 1200, 500, &[]);
    assert_eq!(common::stop(dr), 0);
    let key = env.key_arg();
    let ok = env
        .dr(&["verify", "app", "--identity", &key, "--restore-all"])
        .ok();
    assert!(ok.stdout.contains("2 backup(s)"), "{}", ok.stdout);
    // One byte flipped in a WAL segment, one in the older full's data.
    let older = env
        .objects()
        .into_iter()
        .filter(|k| k.ends_with("data.zst.age"))
        .min()
        .expect("older full");
    let older_path = env.path(&format!("backups/{older}"));
    let mut bytes = std::fs::read(&older_path).expect("read");
    let i = bytes.len() / 2;
    bytes[i] ^= 0x40;
    std::fs::write(&older_path, bytes).expect("write");
    let seg = segment_files(&env)
        .into_iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 400))
        .expect("a segment with frames");
    let mut bytes = std::fs::read(&seg).expect("read");
    let i = bytes.len() / 2;
    bytes[i] ^= 0x40;
    std::fs::write(&seg, bytes).expect("write");
    let v = env.dr(&["verify", "app", "--identity", &key]);
    let all = format!("{}{}", v.stdout, v.stderr);
    assert_eq!(v.code, 3, "{all}");
    let seg_name = seg
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(all.contains(&seg_name), "names the segment: {all}");
    assert!(all.contains(&older), "names the older full: {all}");
}

#[test]
fn a_long_stream_takes_diffs_so_a_restore_replays_a_bounded_amount_of_wal() {
    let env = Env::new(&format!("{WAL_POLICY}diff_after = \"1MiB\"\n"));
    common::make_db(&env.db, true, 50, 1000);
    let dr = replicate(&env);
    wait_streaming(&env);
    // About 4 MiB of WAL in 12 bursts, far past diff_after.
    write(&env, 12, 80, 400, 3000, &[]);
    assert_eq!(common::stop(dr), 0);
    let log = std::fs::read_to_string(env.path("replicate.log")).unwrap_or_default();

    let j = info_after_stop(&env);
    let backups = j["policies"][0]["targets"][0]["backups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let diffs: Vec<_> = backups
        .iter()
        .filter(|b| b["type"] == "diff" && b["trigger"] == "wal")
        .collect();
    assert!(
        diffs.len() >= 2,
        "the streamer took {} diffs for ~4 MiB of WAL with diff_after = 1MiB: {backups:?}\n{log}",
        diffs.len()
    );
    // Every instant still restores exactly, and the newest ones replay
    // from a diff, not from the generation's first full.
    let all = marks(&env);
    for (at, burst, want) in &all {
        restore_at(&env, "restore-local", at, "at.db").ok();
        assert_eq!(
            &common::digest(&env.path("at.db")),
            want,
            "burst {burst} at {at}"
        );
    }
    let last = &all[all.len() - 1];
    let r = restore_at_with(&env, "restore-local", &last.0, "last.db", &["--json"]).ok();
    let j = r.json();
    let rep = if j.is_array() { &j[0] } else { &j };
    let chain = rep["chain"].as_array().cloned().unwrap_or_default();
    assert_eq!(chain.len(), 2, "a full and a diff: {rep}");
    assert!(
        diffs.iter().any(|d| d["label"] == chain[1]),
        "the restore started from a diff the streamer took: {rep}"
    );
    // It replays from the newest diff taken before the instant, not from
    // the generation's full: the WAL before that diff is never read.
    let ts = |v: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_default()).expect("time")
    };
    let at = chrono::DateTime::parse_from_rfc3339(&last.0).expect("mark time");
    // The diff it starts from was taken before the instant (`info` gives
    // whole seconds); under load the newest one may have taken its
    // snapshot just after it, so an earlier diff is fine too.
    let chosen = diffs
        .iter()
        .find(|d| d["label"] == chain[1])
        .expect("the chosen diff");
    assert!(
        ts(&chosen["timestamp_start"]) <= at,
        "{rep}; diffs {diffs:?}"
    );
    let replayed = rep["wal"]["transactions"].as_u64().unwrap_or(u64::MAX);
    assert!(
        replayed < 12 * 80,
        "{replayed} transactions replayed: {rep}"
    );
}

#[test]
fn the_s3_key_rotated_under_a_running_daemon_loses_nothing_and_needs_no_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = S3Server::start(&dir.path().join("s3"), "walbucket");
    let env = Env::new(WAL_POLICY);
    add_s3(&env, &server.endpoint());
    with_listen(&env);
    common::make_db(&env.db, true, 50, 1000);
    let mut daemon = daemon(&env);
    wait_streaming(&env);
    write(&env, 2, 30, 600, 2000, &[]);
    assert!(
        common::assert_no_dr_process_shows(&env, &[common::s3::SECRET_KEY]) >= 1,
        "the daemon runs"
    );

    // The store takes a new key; the old one is refused from now on. The
    // secret manager writes the new files a moment later (atomically, by
    // rename, as such tools do) while the application keeps writing.
    let (new_id, new_secret) = ("dr-rotated-access", "dr-rotated-secret-key-98765");
    server.rotate(new_id, new_secret);
    write(&env, 2, 30, 600, 2000, &[]);
    for (file, value) in [("s3.key_id", new_id), ("s3.secret", new_secret)] {
        common::replace_private_file(&env.path(file), &format!("{value}\n"));
    }
    write(&env, 2, 30, 600, 2000, &[]);
    let final_digest = common::digest(&env.db);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let j = env.dr(&["info", "--json", "--target", "s3"]).json();
        let st = &j["policies"][0]["targets"][0]["wal"]["stream"];
        if st["error"].is_null() && st["lag_seconds"].as_f64() == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "s3 did not catch up with the new key: {st}\n{}",
            std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        daemon.try_wait().expect("wait").is_none(),
        "the daemon stopped"
    );
    assert_eq!(common::stop(daemon), 0);
    let log = std::fs::read_to_string(env.path("daemon.log")).expect("log");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("S3 credentials of target 's3' changed"))
            .count(),
        1,
        "{log}"
    );
    assert!(
        !log.contains("restarting in"),
        "a streamer restarted: {log}"
    );
    // The test server speaks plain http: dr says so, naming the target.
    assert!(log.contains("target 's3' talks to http://"), "{log}");
    assert!(!log.contains(new_secret) && !log.contains(common::s3::SECRET_KEY));
    for f in common::files_under(&env.path("state")) {
        let text =
            String::from_utf8_lossy(&std::fs::read(env.path("state").join(&f)).unwrap_or_default())
                .to_string();
        assert!(
            !text.contains(new_secret) && !text.contains(common::s3::SECRET_KEY),
            "an S3 secret is in state/{f}"
        );
    }
    // Nothing was lost: every instant restores exactly from s3 (with the new key).
    assert_eq!(generations(&env, 1), 1);
    for (at, burst, want) in marks(&env) {
        restore_at(&env, "restore-s3", &at, "at.db").ok();
        assert_eq!(
            common::digest(&env.path("at.db")),
            want,
            "burst {burst} at {at}"
        );
    }
    let key = env.key_arg();
    let to = env.path("newest.db").display().to_string();
    env.dr(&["restore-s3", "app", "--to", &to, "--identity", &key])
        .ok();
    assert_eq!(common::digest(&env.path("newest.db")), final_digest);
    // The rotation is in the audit log: the key files read again.
    let audit = std::fs::read_to_string(env.path("state/audit.log")).expect("audit");
    assert!(
        audit
            .lines()
            .filter(|l| l.contains("secret_loaded") && l.contains("s3.secret"))
            .count()
            >= 2,
        "{audit}"
    );
}

/// The keys records stored for the local target's WAL: (generation, recipients).
fn keys_records(env: &Env) -> Vec<(String, Vec<String>)> {
    let wal = env.path("backups/app/wal");
    let mut out = Vec::new();
    for f in common::files_under(&wal) {
        let parts: Vec<&str> = f.split('/').collect();
        if let [generation, "keys", name] = parts[..]
            && name.ends_with(".json")
        {
            let j: serde_json::Value =
                serde_json::from_slice(&std::fs::read(wal.join(&f)).expect("record"))
                    .expect("a keys record is JSON");
            let r = j["recipients"]
                .as_array()
                .expect("recipients")
                .iter()
                .map(|v| v.as_str().expect("fingerprint").to_string())
                .collect();
            out.push((generation.to_string(), r));
        }
    }
    out
}

#[test]
fn the_backup_key_rotated_under_a_running_daemon_seals_new_wal_to_it_and_keys_status_follows() {
    let env = Env::new(&format!("{WAL_POLICY}[retention]\nfull = 1\n"));
    common::make_db(&env.db, true, 50, 500);
    let old_pub = std::fs::read_to_string(env.path("backup.pub")).expect("pub");
    let new_key = env.path("new.key");
    let new_pub = env
        .dr(&["keygen", "--output", &new_key.display().to_string()])
        .ok()
        .stdout;
    with_listen(&env);
    let mut d = daemon(&env);
    wait_streaming(&env);
    write(&env, 2, 20, 600, 500, &[]);
    let before_rotation: Vec<String> = marks(&env).into_iter().map(|m| m.0).collect();

    // Step 1 of the runbook: the new recipient beside the old. No SIGHUP:
    // the next segments are sealed to both.
    common::replace_private_file(&env.path("backup.pub"), &format!("{old_pub}{new_pub}"));
    wait_until("a keys record with both keys", 20, &env, || {
        write(&env, 1, 10, 100, 500, &[]);
        keys_records(&env).iter().any(|(_, r)| r.len() == 2)
    });
    assert_eq!(generations(&env, 0), 1, "adding a key keeps the generation");
    // Step 2: the old recipient removed. The generation ends (a restore
    // must not need both keys) and a new one starts with a full.
    common::replace_private_file(&env.path("backup.pub"), &new_pub);
    wait_until(
        "a new generation sealed to the new key alone",
        30,
        &env,
        || {
            write(&env, 1, 10, 100, 500, &[]);
            generations(&env, 0) == 2
                && backup_count(&env) == 2
                && keys_records(&env).iter().any(|(_, r)| r.len() == 1)
        },
    );
    write(&env, 2, 20, 600, 500, &[]);
    let final_digest = common::digest(&env.db);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(d.try_wait().expect("wait").is_none(), "the daemon stopped");
    assert_eq!(common::stop(d), 0);
    let log = std::fs::read_to_string(env.path("daemon.log")).expect("log");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("the encryption keys changed:"))
            .count(),
        2,
        "one warning per change\n{log}"
    );
    assert!(log.contains("a key was dropped"), "{log}");
    assert!(!log.contains("restarting in"), "a streamer failed: {log}");
    let audit = std::fs::read_to_string(env.path("state/audit.log")).expect("audit");
    assert!(
        audit
            .lines()
            .filter(|l| l.contains("\"key_loaded\"") && l.contains("backup.pub"))
            .count()
            >= 3,
        "{audit}"
    );

    // The new key alone restores the newest state; the old one still
    // restores what was written before the rotation.
    let to = env.path("newest.db").display().to_string();
    let nk = new_key.display().to_string();
    env.dr(&["restore-local", "app", "--to", &to, "--identity", &nk])
        .ok();
    assert_eq!(common::digest(&env.path("newest.db")), final_digest);
    let all = marks(&env);
    let (at, burst, want) = all
        .iter()
        .rfind(|m| before_rotation.contains(&m.0))
        .expect("a mark before the rotation");
    restore_at(&env, "restore-local", at, "old.db").ok();
    assert_eq!(
        &common::digest(&env.path("old.db")),
        want,
        "burst {burst} at {at}"
    );

    // keys status: the old key is needed by the first generation's base
    // and by its WAL sealed before the new key was added.
    let old = env.key_arg();
    let status = |env: &Env| {
        env.dr(&["keys", "status", "--identity", &old, "--json"])
            .ok()
            .json()["keys"][0]
            .clone()
    };
    let k = status(&env);
    assert_eq!(k["current"], false, "{k}");
    let needed: Vec<&str> = k["needed_by"]
        .as_array()
        .expect("needed_by")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        needed.iter().any(|n| n.contains("/wal/")),
        "WAL sealed to the old key alone: {k}"
    );
    assert!(
        needed.iter().any(|n| !n.contains("/wal/")),
        "the first base: {k}"
    );
    assert_eq!(k["retirable"], false, "{k}");
    // A scheduled full, and retention.full = 1 expires both generations'
    // bases and the first generation's WAL: nothing needs the old key.
    env.dr(&["backup-local", "app", "--type", "full"]).ok();
    let k = status(&env);
    assert_eq!(k["retirable"], true, "{k}");
    assert_eq!(k["wal"].as_array().map(Vec::len), Some(0), "{k}");
    let to = env.path("last.db").display().to_string();
    env.dr(&["restore-local", "app", "--to", &to, "--identity", &nk])
        .ok();
    assert_eq!(common::digest(&env.path("last.db")), final_digest);
}

#[test]
fn a_passphrase_changed_under_a_running_daemon_starts_a_generation_each_passphrase_restores_its_own()
 {
    let env = Env::new(WAL_POLICY);
    let pass = env.path("pass.txt");
    let (first, second) = ("first-wal-passphrase-4711", "second-wal-passphrase-0815");
    env.use_passphrase(&pass, &format!("{first}\n"), 0o600);
    common::make_db(&env.db, true, 50, 500);
    with_listen(&env);
    let d = daemon(&env);
    wait_streaming(&env);
    write(&env, 2, 20, 600, 500, &[]);
    let before: Vec<String> = marks(&env).into_iter().map(|m| m.0).collect();
    assert!(
        common::assert_no_dr_process_shows(&env, &[first]) >= 1,
        "the daemon runs"
    );
    common::replace_private_file(&pass, &format!("{second}\n"));
    wait_until(
        "a new generation under the new passphrase",
        30,
        &env,
        || {
            write(&env, 1, 10, 100, 500, &[]);
            generations(&env, 0) == 2 && backup_count(&env) == 2
        },
    );
    write(&env, 2, 20, 600, 500, &[]);
    let final_digest = common::digest(&env.db);
    assert_eq!(common::stop(d), 0);
    let log = std::fs::read_to_string(env.path("daemon.log")).expect("log");
    assert!(!log.contains(first) && !log.contains(second), "{log}");
    assert!(!log.contains("restarting in"), "a streamer failed: {log}");
    // The new passphrase alone restores the newest state...
    let to = env.path("newest.db").display().to_string();
    env.dr(&["restore-local", "app", "--to", &to]).ok();
    assert_eq!(common::digest(&env.path("newest.db")), final_digest);
    // ...and the old one what was written under it.
    common::replace_private_file(&pass, &format!("{first}\n"));
    let all = marks(&env);
    let (at, burst, want) = all
        .iter()
        .rfind(|m| before.contains(&m.0))
        .expect("a mark before the change");
    let to = env.path("old.db").display().to_string();
    env.dr(&["restore-local", "app", "--to", &to, "--at", at])
        .ok();
    assert_eq!(
        &common::digest(&env.path("old.db")),
        want,
        "burst {burst} at {at}\n{all:?}\n{:?}\n{log}",
        common::files_under(&env.path("backups"))
    );
}

#[test]
fn expire_after_a_passphrase_rotation_keeps_every_instant_the_new_generation_restores() {
    let env = Env::new(&format!("{WAL_POLICY}[retention]\nfull = 1\n"));
    let pass = env.path("pass.txt");
    env.use_passphrase(&pass, "first-rotation-passphrase\n", 0o600);
    common::make_db(&env.db, true, 50, 500);
    with_listen(&env);
    let d = daemon(&env);
    wait_streaming(&env);
    write(&env, 2, 20, 600, 500, &[]);
    common::replace_private_file(&pass, "second-rotation-passphrase\n");
    // One row at a time, until a step has seen the new passphrase: that
    // row goes to the old generation (the step that takes the new keys
    // ends it), and nothing follows the new generation's base.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        write(&env, 1, 1, 100, 100, &[]);
        std::thread::sleep(Duration::from_millis(1500));
        if generations(&env, 0) == 2 && backup_count(&env) == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new generation under the new passphrase"
        );
    }
    std::thread::sleep(Duration::from_millis(2500));
    let idle = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(common::stop(d), 0);
    let want = common::digest(&env.db);
    let restore = || {
        let to = env.path("at.db").display().to_string();
        env.dr(&[
            "restore-local",
            "app",
            "--to",
            &to,
            "--at",
            &idle,
            "--force",
        ])
    };
    // The instant the stream watched while idle restores...
    let r = restore();
    assert_eq!(r.code, 0, "before expire: {}", r.stderr);
    assert_eq!(common::digest(&env.path("at.db")), want);
    // ...and still does once expire keeps only the newest full: the marks
    // that carry the idle generation's window are not "older than" it.
    env.dr(&["expire", "app"]).ok();
    let r = restore();
    assert_eq!(r.code, 0, "after expire: {}", r.stderr);
    assert_eq!(common::digest(&env.path("at.db")), want);
}

#[test]
fn a_full_spool_under_the_daemon_turns_healthz_503_and_fills_the_spool_gauge() {
    // The S3 target's port is held: nothing answers there until the end.
    let held = common::HeldPort::new();
    let env = Env::new(
        &WAL_POLICY
            .replace("[wal]\n", "[wal]\nspool_max = \"200KiB\"\n")
            .replace("segment_max = \"256KiB\"", "segment_max = \"64KiB\""),
    );
    add_s3(&env, &format!("http://127.0.0.1:{}", held.port));
    common::make_db(&env.db, true, 50, 1000);
    with_listen(&env);
    let (d, port) = daemon_on_port(&env);
    wait_streaming(&env);
    write(&env, 4, 30, 1200, 4000, &[]);
    let mut body = String::new();
    wait_until(
        "/healthz 503 naming spool_full",
        30,
        &env,
        || match http_get(port, "/healthz") {
            Some((503, b)) if b.contains("spool_full") => {
                body = b;
                true
            }
            _ => false,
        },
    );
    let health: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(
        health["problems"]
            .as_array()
            .expect("problems")
            .iter()
            .any(|p| p["problem"] == "spool_full" && p["policy"] == "app"),
        "{body}"
    );
    // The gauges the alert DrWalSpoolFilling divides: at the limit.
    let (_, m) = http_get(port, "/metrics").expect("metrics");
    let value = |name: &str| {
        m.lines()
            .find(|l| l.starts_with(name) && l.contains("policy=\"app\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {m}"))
    };
    assert!(
        value("dr_wal_spool_bytes") / value("dr_wal_spool_max_bytes") > 0.5,
        "{m}"
    );
    let _ = common::stop(d);
}
