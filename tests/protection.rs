//! Every database dr is told about is protected, or dr says so: the edges
//! where dr used to say "ok" and lose data (issue 22). Each test runs the
//! real binary and compares what a restore gives with the source.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Env, dump, make_db};

const WAL: &str = "[wal]\nenabled = true\nsync_interval = \"1s\"\ncheckpoint_pages = 200\nsegment_max = \"256KiB\"\n";

/// A dr process in its own process group, killed with it on drop: a
/// failed assertion never leaves it running.
struct Reaped(common::Proc);

impl Reaped {
    /// SIGTERM, then the exit code.
    fn stop(mut self) -> i32 {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.0.try_wait().expect("wait") {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "dr did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn log(env: &Env) -> String {
    std::fs::read_to_string(env.path("replicate.log")).unwrap_or_default()
}

fn wait_for(env: &Env, what: &str, secs: u64, f: impl FnMut() -> bool) {
    common::wait_until(what, secs, f, || log(env));
}

/// The verdict `dr info --json` gives database `name`.
fn verdict_of(info: &serde_json::Value, name: &str) -> serde_json::Value {
    info["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .find(|p| p["name"] == name)
        .map(|p| p["verdict"].clone())
        .unwrap_or_else(|| panic!("{name} not listed: {info}"))
}

/// Adds `[daemon] listen` on a port the daemon picks (and `extra` TOML) to
/// the config, starts `dr daemon`, and returns it with the port it bound.
fn daemon_with_listen(env: &Env, extra: &str, args: &[&str]) -> (Reaped, u16) {
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + &format!("[daemon]\nlisten = \"127.0.0.1:0\"\n{extra}");
    std::fs::write(env.config(), cfg).expect("cfg");
    let (daemon, port) = common::start_daemon_listening(env, args);
    (Reaped(daemon), port)
}

fn daemon_log(env: &Env) -> String {
    std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default()
}

/// Polls `/healthz` until it answers 503 with a body `settled` accepts,
/// and returns that body.
fn unhealthy_body(env: &Env, port: u16, secs: u64, settled: impl Fn(&str) -> bool) -> String {
    let mut body = String::new();
    common::wait_until(
        "/healthz 503 with the expected problems",
        secs,
        || match common::http_get(port, "/healthz") {
            Some((503, b)) if settled(&b) => {
                body = b;
                true
            }
            _ => false,
        },
        || {
            format!(
                "{:?}\n{}",
                common::http_get(port, "/healthz"),
                daemon_log(env)
            )
        },
    );
    body
}

/// Waits until the daemon's log holds `needle`.
fn wait_daemon_log(env: &Env, needle: &str, secs: u64) {
    common::wait_for_log(&env.path("daemon.log"), needle, secs);
}

/// Commits `n` rows, one transaction each, through `path`.
fn commit_rows(path: &Path, from: i64, n: i64) {
    let c = rusqlite::Connection::open(path).expect("open");
    c.busy_timeout(Duration::from_secs(10)).expect("busy");
    for i in from..from + n {
        c.execute(
            "INSERT INTO t(id, v) VALUES (?1, randomblob(300))",
            rusqlite::params![1_000_000 + i],
        )
        .expect("insert");
    }
}

fn backups_dir_wal(env: &Env, policy: &str) -> std::path::PathBuf {
    env.path(&format!("backups/{policy}/wal"))
}

#[test]
fn a_database_given_through_a_symbolic_link_is_streamed_and_restores_every_commit() {
    let env = Env::new(WAL);
    std::fs::remove_file(env.path("policies/app.toml")).expect("rm");
    std::fs::create_dir_all(env.path("release/data")).expect("dir");
    let real = env.path("release/data/real.db");
    make_db(&real, true, 20, 500);
    std::os::unix::fs::symlink(&real, env.path("link.db")).expect("link");
    env.write_policy("app", "link.db", WAL);
    let dr = Reaped(common::spawn_replicate(&env));
    wait_for(&env, "the generation's base", 30, || {
        log(&env).contains("generation base committed")
    });
    // Writes through the link and through the real name: one database.
    commit_rows(&env.path("link.db"), 0, 200);
    commit_rows(&real, 200, 100);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(dr.stop(), 0, "{}", log(&env));
    let r = env.restore("out.db", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let got = dump(&env.path("out.db"));
    assert_eq!(got.len(), 320, "every commit made through either name");
    assert_eq!(got, dump(&real));
}

fn fleet_env(extra: &str) -> Env {
    let env = Env::new("");
    std::fs::remove_file(env.path("policies/app.toml")).expect("rm app policy");
    std::fs::create_dir_all(env.path("tenants")).expect("tenants dir");
    env.write_policy("tenants", "tenants/*.db", extra);
    env
}

#[test]
fn fleet_databases_named_with_spaces_accents_or_a_leading_dot_are_backed_up_and_restored() {
    let env = fleet_env("");
    let names = ["my db", "café", ".hidden", "plain"];
    for (i, n) in names.iter().enumerate() {
        make_db(
            &env.path(&format!("tenants/{n}.db")),
            false,
            5 + i as i64,
            100,
        );
    }
    env.dr(&["backup-local", "tenants"]).ok();
    let j = env.dr(&["info", "tenants", "--json"]).ok().json();
    let mut listed: Vec<String> = j["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .map(|p| {
            assert_eq!(p["verdict"]["state"], "protected", "{p}");
            assert_eq!(p["targets"][0]["backups"].as_array().map(Vec::len), Some(1));
            p["name"].as_str().expect("name").to_string()
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "tenants/%2Ehidden",
            "tenants/caf%C3%A9",
            "tenants/my%20db",
            "tenants/plain"
        ]
    );
    let key = env.key_arg();
    for n in names {
        let to = env.path(&format!("out-{}.db", n.replace(' ', "_")));
        let r = env.dr(&[
            "restore-local",
            "tenants",
            "--db",
            n,
            "--to",
            &to.display().to_string(),
            "--identity",
            &key,
        ]);
        assert_eq!(r.code, 0, "{n}: {}", r.stderr);
        assert_eq!(
            dump(&to),
            dump(&env.path(&format!("tenants/{n}.db"))),
            "{n}"
        );
    }
    // The key form names the same database.
    let to = env.path("again.db");
    let r = env.dr(&[
        "restore-local",
        "tenants/my%20db",
        "--to",
        &to.display().to_string(),
        "--identity",
        &key,
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(dump(&to), dump(&env.path("tenants/my db.db")));
}

#[test]
fn a_fleet_database_that_cannot_be_streamed_fails_replicate_and_is_at_risk() {
    let env = fleet_env(WAL);
    make_db(&env.path("tenants/good.db"), true, 10, 100);
    make_db(&env.path("tenants/journal.db"), false, 10, 100);
    let dr = Reaped(common::spawn_replicate(&env));
    wait_for(
        &env,
        "the streamer to refuse the rollback-journal database",
        30,
        || log(&env).contains("journal_mode=delete"),
    );
    commit_rows(&env.path("tenants/good.db"), 0, 5);
    std::thread::sleep(Duration::from_millis(1500));
    let code = dr.stop();
    assert_eq!(code, 1, "a database that cannot be streamed: {}", log(&env));
    let r = env.dr(&["info", "tenants", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let j = r.json();
    let verdict = |name: &str| verdict_of(&j, name);
    let bad = verdict("tenants/journal");
    assert_eq!(bad["state"], "at_risk", "{bad}");
    let reasons: Vec<&str> = bad["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert!(reasons.contains(&"cannot_stream"), "{bad}");
    assert!(r.stderr.contains("cannot_stream"), "{}", r.stderr);
}

#[test]
fn a_spool_smaller_than_one_segment_is_refused() {
    let env = Env::new("[wal]\nenabled = true\nspool_max = \"0\"\n");
    let r = env.dr(&["config", "validate"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("spool_max") && r.stderr.contains("smaller than one segment"),
        "{}",
        r.stderr
    );
}

/// A repository with two generations of WAL for policy `app`: returns
/// the segment keys (relative to the policy's `wal/`) of each, oldest first.
fn two_generations(env: &Env) -> Vec<Vec<String>> {
    make_db(&env.db, true, 20, 400);
    for round in 0..2 {
        let dr = Reaped(common::spawn_replicate(env));
        wait_for(env, "a generation's base", 30, || {
            log(env).contains("generation base committed")
        });
        commit_rows(&env.db, round * 1000, 60);
        std::thread::sleep(Duration::from_millis(1500));
        commit_rows(&env.db, round * 1000 + 500, 60);
        std::thread::sleep(Duration::from_millis(2000));
        assert_eq!(dr.stop(), 0, "{}", log(env));
        // The WAL restarts offline: the next stream cannot continue this
        // generation and starts a new one.
        let c = rusqlite::Connection::open(&env.db).expect("open");
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
    }
    let wal = backups_dir_wal(env, "app");
    let mut gens: Vec<String> = std::fs::read_dir(&wal)
        .expect("wal dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    gens.sort();
    assert_eq!(gens.len(), 2, "{gens:?}");
    gens.iter()
        .map(|g| {
            let mut segs: Vec<String> = std::fs::read_dir(wal.join(g))
                .expect("gen dir")
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".zst.age"))
                .collect();
            segs.sort();
            segs.into_iter().map(|s| format!("{g}/{s}")).collect()
        })
        .collect()
}

fn frames_of(name: &str) -> (u64, u64) {
    let file = name.rsplit('/').next().expect("file");
    let (a, rest) = file.split_once('-').expect("first");
    let b = rest.split('_').next().expect("last");
    (a.parse().expect("a"), b.parse().expect("b"))
}

#[test]
fn verify_fails_wal_that_restore_would_refuse() {
    let env = Env::new(WAL);
    let gens = two_generations(&env);
    let r = env.dr(&["verify", "app", "--identity", &env.key_arg(), "--json"]);
    assert_eq!(r.code, 0, "an untouched repository verifies: {}", r.stderr);
    let drilled = r.stdout.clone();
    assert!(drilled.contains("WAL replay of generation"), "{drilled}");
    // A sample also replays to an instant drawn inside the newest generation.
    let r = env.dr(&[
        "verify",
        "app",
        "--identity",
        &env.key_arg(),
        "--sample",
        "100",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let restored = r.json()[0]["restored"].clone();
    let instants = restored
        .as_array()
        .expect("restored")
        .iter()
        .filter(|x| {
            x.as_str()
                .is_some_and(|x| x.contains("WAL replay") && !x.contains("newest instant"))
        })
        .count();
    assert!(instants >= 1, "no drill at a sampled instant: {restored}");

    // 1. A segment of the first generation over the second's segment of
    //    the same first frame: same name, foreign content.
    let wal = backups_dir_wal(&env, "app");
    let nonempty = |s: &&String| {
        let (a, b) = frames_of(s);
        b >= a
    };
    let victim = gens[1]
        .iter()
        .filter(nonempty)
        .find(|s| {
            gens[0]
                .iter()
                .filter(nonempty)
                .any(|o| frames_of(o).0 == frames_of(s).0)
        })
        .expect("a segment number both generations have")
        .clone();
    let foreign = gens[0]
        .iter()
        .filter(nonempty)
        .find(|o| frames_of(o).0 == frames_of(&victim).0)
        .expect("foreign");
    let saved = std::fs::read(wal.join(&victim)).expect("read");
    std::fs::copy(wal.join(foreign), wal.join(&victim)).expect("copy");
    let r = env.dr(&["verify", "app", "--identity", &env.key_arg()]);
    assert_eq!(r.code, 3, "a foreign segment: {}", r.stderr);
    assert!(r.stderr.contains(&victim), "{}", r.stderr);
    std::fs::write(wal.join(&victim), saved).expect("put back");

    // 2. A segment copied under a later name, so that two overlap.
    let last_gen = &gens[1];
    let src = last_gen
        .iter()
        .find(|s| {
            let (a, b) = frames_of(s);
            b > a
        })
        .expect("a segment with frames");
    let (a, b) = frames_of(src);
    let file = src.rsplit('/').next().expect("file");
    let moved = file.replacen(
        &format!("{a:016}-{b:016}"),
        &format!("{:016}-{:016}", a + 1, b + 1),
        1,
    );
    let generation = src.split('/').next().expect("gen");
    std::fs::copy(wal.join(src), wal.join(generation).join(&moved)).expect("copy");
    let r = env.dr(&["verify", "app", "--identity", &env.key_arg()]);
    assert_eq!(r.code, 3, "overlapping segments: {}", r.stderr);
    assert!(r.stderr.contains("overlaps"), "{}", r.stderr);
}

#[test]
fn an_older_full_stored_under_a_newer_label_is_damaged_not_newest() {
    use sha2::Digest;
    let env = Env::new("");
    make_db(&env.db, true, 20, 200);
    let old = env.full_backup("backup-local");
    std::thread::sleep(Duration::from_millis(1100));
    commit_rows(&env.db, 0, 30);
    let newest = env.full_backup("backup-local");
    // The old full replayed under a label newer than everything: the
    // manifest is edited and its envelope hash recomputed, as a writer to
    // the bucket could.
    let fake = "29991231-235959F";
    let dir = env.path("backups/app/backup");
    std::fs::create_dir_all(dir.join(fake)).expect("dir");
    for e in std::fs::read_dir(dir.join(&old)).expect("old") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.join(fake).join(e.file_name())).expect("copy");
    }
    let t = std::fs::read_to_string(dir.join(fake).join("manifest.json")).expect("manifest");
    let body_start = t[1..].find('{').expect("body") + 1;
    let body_end = t.rfind(",\n\"sha256\"").expect("sum");
    let body = t[body_start..body_end].replace(&old, fake);
    let sum = hex::encode(sha2::Sha256::digest(body.as_bytes()));
    std::fs::write(
        dir.join(fake).join("manifest.json"),
        format!("{{\"manifest\": {body},\n\"sha256\": \"{sum}\"}}\n"),
    )
    .expect("write");
    let r = env.dr(&["info", "--json"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("another label"), "{}", r.stderr);
    let r = env.dr(&["verify", "app", "--identity", &env.key_arg()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    // Restore of "newest" never hands back the older state as newest.
    let r = env.restore("out.db", &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains(&newest),
        "names what to restore: {}",
        r.stderr
    );
    let r = env.restore("out.db", &["--backup", &newest]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(dump(&env.path("out.db")), dump(&env.db));
}

#[test]
fn the_streamers_own_backups_are_audited_and_an_unwritable_log_stops_a_restore() {
    let env = Env::new(WAL);
    make_db(&env.db, true, 20, 200);
    let dr = Reaped(common::spawn_replicate(&env));
    wait_for(&env, "the generation's base", 30, || {
        log(&env).contains("generation base committed")
    });
    assert_eq!(dr.stop(), 0, "{}", log(&env));
    let lines = env.dr(&["audit", "--json"]).ok().stdout;
    assert!(
        lines.lines().any(|l| l.contains("\"action\":\"backup\"")
            && l.contains("by the WAL streamer (generation)")
            && l.contains("\"result\":\"ok\"")),
        "{lines}"
    );
    // A directory where the log should be: the restore does not happen.
    let log_path = env.path("state/audit.log");
    std::fs::remove_file(&log_path).expect("rm log");
    std::fs::create_dir(&log_path).expect("dir");
    let r = env.restore("out.db", &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("audit log"), "{}", r.stderr);
    assert!(!env.path("out.db").exists(), "restored unrecorded");
    std::fs::remove_dir(&log_path).expect("rmdir");
    // A link planted at its path is not followed.
    let elsewhere = env.path("elsewhere.log");
    std::os::unix::fs::symlink(&elsewhere, &log_path).expect("link");
    let r = env.restore("out.db", &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(!elsewhere.exists(), "the audit log followed a link");
    std::fs::remove_file(&log_path).expect("rm link");
    // A path with a newline cannot fake a line in the text view.
    let r = env.restore("out\nFAKE.db", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let text = env.dr(&["audit"]).ok().stdout;
    assert!(
        !text.lines().any(|l| l.starts_with("FAKE")),
        "a control character started a line: {text}"
    );
}

#[test]
fn info_gives_one_verdict_per_database_and_exits_non_zero_when_any_is_at_risk() {
    let env = Env::new("[schedule]\ndiff = \"0 * * * *\"\n");
    make_db(&env.db, false, 10, 100);
    env.write_policy("never", "never.db", "");
    make_db(&env.path("never.db"), false, 10, 100);
    env.full_backup("backup-local");
    let r = env.dr(&["info", "--json"]);
    assert_eq!(r.code, 1, "one database was never backed up: {}", r.stdout);
    let j = r.json();
    let by_name = |n: &str| verdict_of(&j, n);
    let app = by_name("app");
    assert_eq!(app["state"], "protected", "{app}");
    assert!(app["newest_restorable"].is_string(), "{app}");
    assert!(
        app["age_seconds"].as_f64().is_some_and(|a| a < 60.0),
        "{app}"
    );
    assert_eq!(app["promised_seconds"].as_f64(), Some(7260.0), "{app}");
    let never = by_name("never");
    assert_eq!(never["state"], "at_risk", "{never}");
    assert_eq!(never["reasons"][0]["reason"], "never_backed_up", "{never}");
    assert!(r.stderr.contains("policy 'never'"), "{}", r.stderr);
    let r = env.dr(&["info", "app"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("PROTECTED"), "{}", r.stdout);
}

#[test]
fn an_idle_stream_marks_how_far_it_watched_when_it_stops() {
    let env = Env::new(WAL);
    make_db(&env.db, true, 20, 200);
    // The log emptied offline: the stream starts with no WAL header.
    let c = rusqlite::Connection::open(&env.db).expect("open");
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    drop(c);
    let dr = Reaped(common::spawn_replicate(&env));
    wait_for(&env, "the generation's base", 30, || {
        log(&env).contains("generation base committed")
    });
    std::thread::sleep(Duration::from_millis(3000));
    let watched = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dr.stop(), 0, "{}", log(&env));
    // An instant the stream watched, seconds after its base, restores.
    let at = watched.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let r = env.restore("at.db", &["--at", &at]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, log(&env));
    assert_eq!(dump(&env.path("at.db")), dump(&env.db));
}

#[test]
fn a_daemon_stopped_mid_backup_says_it_abandoned_the_run_and_releases_the_lease() {
    let env = Env::new(&format!("{WAL}[schedule]\nfull = \"*/2 * * * * *\"\n"));
    make_db(&env.db, true, 50, 500);
    // A full from the command line first: the daemon has no run to catch
    // up at its start, so its streamer takes its base alone.
    env.full_backup("backup-local");
    let (daemon, _) = daemon_with_listen(&env, "", &["--log-level", "debug"]);
    wait_daemon_log(&env, "generation base committed", 30);
    // The application holds the write lock: the next scheduled full waits
    // for it (to pin the WAL) while holding the policy's lease.
    let app = rusqlite::Connection::open(&env.db).expect("open");
    app.busy_timeout(Duration::from_secs(10)).expect("busy");
    app.execute_batch("BEGIN IMMEDIATE; INSERT INTO t(v) VALUES (x'00');")
        .expect("lock");
    std::thread::sleep(Duration::from_millis(3500));
    let code = daemon.stop();
    app.execute_batch("ROLLBACK").expect("release");
    let text = daemon_log(&env);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("abandoned: the daemon stopped during the full run"),
        "{text}"
    );
    assert!(
        !env.path("backups/app/lease").exists(),
        "the lease is left held: {text}"
    );
    // The history counts it as a failure: dr info shows it.
    let j = env.dr(&["info", "--json"]).json();
    let runs = &j["policies"][0]["targets"][0]["runs"];
    let full = runs
        .as_array()
        .and_then(|r| r.iter().find(|r| r["type"] == "full"))
        .unwrap_or_else(|| panic!("no full runs: {j}"));
    assert!(
        full["error"]
            .as_str()
            .is_some_and(|e| e.contains("abandoned")),
        "{full}"
    );
}

#[test]
fn healthz_and_info_give_the_same_verdict_from_the_same_function() {
    let env = Env::new("[schedule]\nfull = \"*/2 * * * * *\"\n");
    make_db(&env.db, false, 20, 200);
    // A second policy whose database is gone: its runs fail.
    env.write_policy("lost", "lost.db", "[schedule]\nfull = \"*/2 * * * * *\"\n");
    let (hook_port, hooks) = common::http_sink();
    let (daemon, port) = daemon_with_listen(
        &env,
        &format!("[notify]\nwebhook_url = \"http://127.0.0.1:{hook_port}/hook\"\n"),
        &[],
    );
    // Wait until the daemon ran both: the history has a success and a failure.
    let body = unhealthy_body(&env, port, 30, |b| {
        b.contains("\"lost\"") && !b.contains("\"app\"")
    });
    let health: serde_json::Value = serde_json::from_str(&body).expect("json");
    let r = env.dr(&["info", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let info = r.json();
    let state = |n: &str| verdict_of(&info, n);
    assert_eq!(state("app")["state"], "protected", "{info}");
    assert_eq!(state("lost")["state"], "at_risk", "{info}");
    // Every reason /healthz gives, dr info gives too.
    let info_reasons: Vec<String> = state("lost")["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|r| r["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    for p in health["problems"].as_array().expect("problems") {
        assert_eq!(p["policy"], "lost", "{body}");
        let reason = p["problem"].as_str().unwrap_or_default().to_string();
        assert!(
            info_reasons.contains(&reason),
            "{reason} not in {info_reasons:?}"
        );
    }
    assert!(
        info_reasons.contains(&"failing".to_string()),
        "{info_reasons:?}"
    );
    // The notification says the same: an at_risk event for 'lost', as JSON.
    let deadline = Instant::now() + Duration::from_secs(40);
    let event = loop {
        let found = hooks.lock().expect("hooks").iter().find_map(|req| {
            let body = req.split("\r\n\r\n").nth(1)?;
            let j: serde_json::Value = serde_json::from_str(body).ok()?;
            (j["event"] == "at_risk" && j["policy"] == "lost").then_some(j)
        });
        if let Some(j) = found {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "no at_risk notification: {:?}",
            hooks.lock().expect("hooks")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(event["job"], "protection", "{event}");
    drop(daemon);
}

#[test]
fn an_empty_file_in_a_fleet_does_not_fail_the_others_and_an_unknown_db_is_not_found() {
    let env = fleet_env("");
    make_db(&env.path("tenants/a.db"), false, 10, 100);
    std::fs::write(env.path("tenants/new.db"), b"").expect("empty");
    let r = env.dr(&["backup-local", "tenants", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Once written, it is a database like the others.
    make_db(&env.path("tenants/new.db"), false, 3, 100);
    std::thread::sleep(Duration::from_millis(1100));
    env.dr(&["backup-local", "tenants"]).ok();
    let j = env.dr(&["info", "tenants", "--json"]).ok().json();
    assert_eq!(j["policies"].as_array().map(Vec::len), Some(2), "{j}");
    for cmd in ["expire", "verify", "info"] {
        let r = env.dr(&[cmd, "tenants", "--db", "nosuch"]);
        assert_eq!(r.code, 5, "{cmd}: {}", r.stderr);
        assert!(
            r.stderr.contains("no database 'nosuch'"),
            "{cmd}: {}",
            r.stderr
        );
    }
}

#[test]
fn a_reload_that_changes_nothing_a_stream_uses_leaves_it_running() {
    let env = Env::new(WAL);
    make_db(&env.db, true, 20, 200);
    let (daemon, _) = daemon_with_listen(&env, "", &[]);
    let cfg = std::fs::read_to_string(env.config()).expect("cfg");
    wait_daemon_log(&env, "generation base committed", 30);
    // The identity restores use, and a schedule: nothing the stream uses.
    let with_identity = cfg.replace(
        "[encryption]\n",
        &format!("[encryption]\nidentity_file = \"{}\"\n", env.key_arg()),
    );
    std::fs::write(env.config(), with_identity).expect("cfg");
    let policy = env.path("policies/app.toml");
    let text = std::fs::read_to_string(&policy).expect("policy");
    std::fs::write(
        &policy,
        format!("{text}[schedule]\nverify = \"0 3 * * *\"\n"),
    )
    .expect("policy");
    let _ = Command::new("kill")
        .args(["-HUP", &daemon.0.id().to_string()])
        .status();
    wait_daemon_log(&env, "configuration reloaded", 10);
    // A changed sync_interval is a setting the stream uses: it restarts.
    std::thread::sleep(Duration::from_millis(1500));
    let text = std::fs::read_to_string(&policy).expect("policy");
    std::fs::write(
        &policy,
        text.replace("sync_interval = \"1s\"", "sync_interval = \"2s\""),
    )
    .expect("policy");
    let _ = Command::new("kill")
        .args(["-HUP", &daemon.0.id().to_string()])
        .status();
    wait_daemon_log(&env, "restarting the WAL streamer", 10);
    let log = daemon_log(&env);
    assert_eq!(
        log.matches("restarting the WAL streamer").count(),
        1,
        "only the sync_interval change restarts the stream: {log}"
    );
    assert_eq!(daemon.stop(), 0, "{}", daemon_log(&env));
}

#[test]
fn a_reload_that_adds_a_target_and_a_wal_policy_takes_both_up() {
    let env = Env::new("[schedule]\nfull = \"*/2 * * * * *\"\n");
    make_db(&env.db, true, 20, 200);
    let (daemon, _) = daemon_with_listen(&env, "", &[]);
    common::wait_until(
        "a scheduled backup",
        30,
        || {
            env.dr(&["info", "--json"]).json()["policies"][0]["targets"][0]["backups"]
                .as_array()
                .is_some_and(|b| !b.is_empty())
        },
        || daemon_log(&env),
    );
    // A second target for app, and a new policy that streams its WAL.
    let cfg = std::fs::read_to_string(env.config()).expect("cfg");
    std::fs::write(
        env.config(),
        format!("{cfg}[targets.second]\nkind = \"local\"\npath = \"second\"\n"),
    )
    .expect("cfg");
    let policy = env.path("policies/app.toml");
    let text = std::fs::read_to_string(&policy).expect("policy");
    std::fs::write(
        &policy,
        text.replace("targets = [\"local\"]", "targets = [\"local\", \"second\"]"),
    )
    .expect("policy");
    let streamed = env.path("stream.db");
    make_db(&streamed, true, 20, 200);
    env.write_policy("stream", "stream.db", WAL);
    let _ = Command::new("kill")
        .args(["-HUP", &daemon.0.id().to_string()])
        .status();
    wait_daemon_log(&env, "configuration reloaded", 10);
    wait_daemon_log(&env, "generation base committed", 30);
    common::wait_until(
        "app's backup on the new target",
        30,
        || {
            common::files_under(&env.path("second"))
                .iter()
                .any(|f| f.starts_with("app/") && f.ends_with("manifest.json"))
        },
        || daemon_log(&env),
    );
    commit_rows(&streamed, 1000, 20);
    let want = common::dump(&streamed);
    assert_eq!(daemon.stop(), 0, "{}", daemon_log(&env));
    // The new policy's every commit restores, and app from its new target.
    let to = env.path("stream-restored.db").display().to_string();
    env.dr(&[
        "restore-local",
        "stream",
        "--to",
        &to,
        "--identity",
        &env.key_arg(),
    ])
    .ok();
    assert_eq!(common::dump(&env.path("stream-restored.db")), want);
    let to = env.path("app-second.db").display().to_string();
    env.dr(&[
        "restore-local",
        "app",
        "--target",
        "second",
        "--to",
        &to,
        "--identity",
        &env.key_arg(),
    ])
    .ok();
    assert_eq!(
        common::dump(&env.path("app-second.db")),
        common::dump(&env.db)
    );
}

/// The generations under the policy's WAL directory.
fn generation_count(env: &Env) -> usize {
    std::fs::read_dir(backups_dir_wal(env, "app"))
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0)
}

#[test]
fn continuity_broken_while_dr_is_stopped_starts_a_new_generation_never_a_splice() {
    let env = Env::new(WAL);
    make_db(&env.db, true, 20, 300);
    let now = || chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut instants: Vec<(String, Vec<String>)> = Vec::new();
    let stream_round = |env: &Env, from: i64, instants: &mut Vec<(String, Vec<String>)>| {
        // Each run logs afresh to replicate.log.
        let dr = Reaped(common::spawn_replicate(env));
        wait_for(env, "the stream's base", 30, || {
            log(env).contains("generation base committed")
                || log(env).contains("continuing the generation")
        });
        commit_rows(&env.db, from, 30);
        // An instant the stream watched: later writes stay out of it.
        std::thread::sleep(Duration::from_millis(1200));
        instants.push((now(), dump(&env.db)));
        std::thread::sleep(Duration::from_millis(200));
        let out = log(env);
        assert_eq!(dr.stop(), 0, "{out}");
    };
    stream_round(&env, 0, &mut instants);
    assert_eq!(generation_count(&env), 1);

    // Offline: commits dr never saw, then the WAL restarts and is cut
    // short (journal_size_limit) under a new salt.
    {
        let c = rusqlite::Connection::open(&env.db).expect("open");
        c.execute_batch("PRAGMA journal_size_limit = 0;")
            .expect("limit");
        commit_rows(&env.db, 2000, 40);
        c.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
            .expect("checkpoint");
    }
    commit_rows(&env.db, 3000, 5);
    stream_round(&env, 4000, &mut instants);
    assert_eq!(generation_count(&env), 2, "{}", log(&env));

    // Offline: the file is replaced by another database (a restore by
    // hand, a copy from elsewhere).
    let other = env.path("other.db");
    make_db(&other, true, 7, 100);
    for side in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{side}", env.db.display()));
    }
    std::fs::rename(&other, &env.db).expect("replace");
    stream_round(&env, 5000, &mut instants);
    assert_eq!(generation_count(&env), 3, "{}", log(&env));

    // Every watched instant restores exactly what the database held then:
    // frames of one generation never applied to another's base.
    for (i, (at, want)) in instants.iter().enumerate() {
        let r = env.restore(&format!("at{i}.db"), &["--at", at]);
        assert_eq!(r.code, 0, "{at}: {}", r.stderr);
        assert_eq!(
            &dump(&env.path(&format!("at{i}.db"))),
            want,
            "instant {i} at {at}"
        );
    }
    let r = env.restore("newest.db", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(dump(&env.path("newest.db")), dump(&env.db));
    env.dr(&["verify", "app", "--identity", &env.key_arg()])
        .ok();
}

#[test]
fn healthz_says_overdue_once_the_newest_backup_is_older_than_the_schedule_promises() {
    // Hourly fulls promise a backup at most 2 h 1 min old. The newest one
    // is 2 h 10 min old (its run moved back in the history), and the run
    // the daemon catches up fails (the database moved away): overdue, over
    // HTTP, beside the failure.
    let env = Env::new("[schedule]\nfull = \"0 0 * * * *\"\n");
    make_db(&env.db, false, 20, 200);
    env.full_backup("backup-local");
    {
        let h = rusqlite::Connection::open(env.path("state/history.db")).expect("history");
        let old = (chrono::Utc::now() - chrono::Duration::minutes(130)).to_rfc3339();
        h.execute("UPDATE runs SET started = ?1, finished = ?1", [&old])
            .expect("age the run");
    }
    std::fs::rename(&env.db, env.path("moved.db")).expect("move");
    let (daemon, port) = daemon_with_listen(&env, "", &[]);
    let body = unhealthy_body(&env, port, 30, |b| {
        b.contains("overdue") && b.contains("failing")
    });
    let health: serde_json::Value = serde_json::from_str(&body).expect("json");
    let overdue = health["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .find(|p| p["problem"] == "overdue")
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(overdue["policy"], "app", "{body}");
    assert_eq!(daemon.stop(), 0, "{}", daemon_log(&env));
}

#[test]
fn a_fleet_whose_directory_is_a_link_streams_every_database_through_it() {
    let env = Env::new("");
    std::fs::remove_file(env.path("policies/app.toml")).expect("rm app policy");
    std::fs::create_dir_all(env.path("volume/tenants")).expect("dir");
    std::os::unix::fs::symlink(env.path("volume/tenants"), env.path("tenants")).expect("link");
    env.write_policy("tenants", "tenants/*.db", WAL);
    let real = env.path("volume/tenants/alice.db");
    make_db(&real, true, 20, 300);
    let dr = Reaped(common::spawn_replicate(&env));
    wait_for(&env, "alice's base", 30, || {
        log(&env).contains("generation base committed")
    });
    commit_rows(&env.path("tenants/alice.db"), 0, 150);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(dr.stop(), 0, "{}", log(&env));
    let to = env.path("out.db");
    let r = env.dr(&[
        "restore-local",
        "tenants",
        "--db",
        "alice",
        "--to",
        &to.display().to_string(),
        "--identity",
        &env.key_arg(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(dump(&to).len(), 170);
    assert_eq!(dump(&to), dump(&real));
}

#[test]
fn a_database_replaced_by_mv_keeps_its_old_generation_up_to_the_swap() {
    let env = Env::new(WAL);
    make_db(&env.db, true, 20, 200);
    let dr = Reaped(common::spawn_replicate(&env));
    wait_for(&env, "the generation's base", 30, || {
        log(&env).contains("generation base committed")
    });
    // Commits, then a quiet moment (dr stamps a commit when it reads it),
    // then the instant just before the swap.
    let c = rusqlite::Connection::open(&env.db).expect("open");
    for i in 0..60 {
        c.execute(
            "INSERT INTO t(id, v) VALUES (?1, randomblob(200))",
            [2_000_000 + i],
        )
        .expect("insert");
        std::thread::sleep(Duration::from_millis(50));
    }
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .expect("count");
    drop(c);
    std::thread::sleep(Duration::from_millis(1500));
    let last = (
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        n,
    );
    std::thread::sleep(Duration::from_millis(300));
    // Another database is moved over it (a deploy, a restore by hand).
    let other = env.path("other.db");
    make_db(&other, true, 5, 100);
    std::fs::rename(&other, &env.db).expect("mv");
    wait_for(&env, "the swap to be seen", 20, || {
        log(&env).contains("the database file was replaced")
    });
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(dr.stop(), 0, "{}", log(&env));
    // The last instant before the swap restores the old file's last state.
    let r = env.restore("at.db", &["--at", &last.0]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, log(&env));
    assert_eq!(dump(&env.path("at.db")).len() as i64, last.1);
}

#[test]
fn a_failed_drill_turns_healthz_503_naming_verify_failed() {
    let env = Env::new("[schedule]\nverify = \"*/2 * * * * *\"\n");
    make_db(&env.db, false, 200, 300);
    let label = env.full_backup("backup-local");
    // Damage the stored data: the daemon's scheduled drill must fail.
    let data = env.path(&format!("backups/app/backup/{label}/data.zst.age"));
    let mut bytes = std::fs::read(&data).expect("data");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).expect("tamper");
    let key = env.key_arg();
    let cfg = std::fs::read_to_string(env.config()).expect("cfg").replace(
        "[encryption]\n",
        &format!("[encryption]\nidentity_file = \"{key}\"\n"),
    );
    std::fs::write(env.config(), cfg).expect("cfg");
    let (daemon, port) = daemon_with_listen(&env, "", &[]);
    let body = unhealthy_body(&env, port, 30, |b| b.contains("verify_failed"));
    let j: serde_json::Value = serde_json::from_str(&body).expect("json");
    let p = &j["problems"][0];
    assert_eq!(p["policy"], "app", "{body}");
    assert_eq!(p["target"], "local", "{body}");
    assert!(
        p["detail"].as_str().is_some_and(|d| d.contains(&label)),
        "{body}"
    );
    assert_eq!(daemon.stop(), 0, "{}", daemon_log(&env));
}
