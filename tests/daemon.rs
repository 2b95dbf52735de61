//! `dr daemon` as a real process: schedules, /healthz, /metrics, signals.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Env;

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    common::http_get(port, path)
}

/// Polls `f` for up to `secs`; on a timeout, panics with the daemon's log and
/// what `dr info` says, so a failure under load explains itself.
fn wait_in(env: &Env, what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        if Instant::now() >= deadline {
            let log = std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default();
            let info = env.dr(&["info", "--json"]);
            panic!(
                "timed out waiting for {what}\n--- daemon.log\n{log}\n--- dr info (exit {})\n{}{}",
                info.code, info.stdout, info.stderr
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A loopback HTTP server that records the request lines it receives.
/// Every request whole (request line, headers, body): see `common::http_sink`.
fn ping_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    common::http_sink()
}

/// The body of a request `common::http_sink` kept.
fn body(request: &str) -> &str {
    request.split("\r\n\r\n").nth(1).unwrap_or("")
}

fn backups(env: &Env) -> usize {
    let r = env.dr(&["info", "--json"]);
    let Ok(j) = serde_json::from_str::<serde_json::Value>(&r.stdout) else {
        return 0;
    };
    j["policies"][0]["targets"][0]["backups"]
        .as_array()
        .map_or(0, |b| b.len())
}

/// The diff schedule's entry in `dr info --json` runs (null when absent).
fn diff_run(env: &Env) -> serde_json::Value {
    // `dr info` exits 1 while the target cannot be read, and still prints what it knows.
    let r = env.dr(&["info", "--json"]);
    let Ok(j) = serde_json::from_str::<serde_json::Value>(&r.stdout) else {
        return serde_json::Value::Null;
    };
    j["policies"][0]["targets"][0]["runs"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["type"] == "diff"))
        .cloned()
        .unwrap_or_default()
}

fn sigterm_exits_zero_quickly(mut child: common::Proc) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            assert_eq!(st.code(), Some(0), "daemon exit status");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "daemon did not stop within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn schedules_run_health_follows_the_target_and_signals_are_handled() {
    let env = Env::new("[schedule]\nfull = \"*/20 * * * * *\"\ndiff = \"*/2 * * * * *\"\n");
    common::make_db(&env.db, true, 200, 500);
    let (ping_port, pings) = ping_server();
    let cfg_text = std::fs::read_to_string(env.config()).expect("cfg")
        + &format!(
            "[daemon]\nlisten = \"127.0.0.1:0\"\n[notify]\nping_url = \"http://127.0.0.1:{ping_port}/ping\"\nwebhook_url = \"http://127.0.0.1:{ping_port}/hook\"\n"
        );
    std::fs::write(env.config(), &cfg_text).expect("cfg");
    let (daemon, port) = common::start_daemon_listening(&env, &[]);
    wait_in(&env, "two backups", 20, || backups(&env) >= 2);
    wait_in(&env, "/healthz 200", 10, || {
        get(port, "/healthz").is_some_and(|(c, _)| c == 200)
    });
    let (code, metrics) = get(port, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("dr_backup_last_success_timestamp_seconds{policy=\"app\",target=\"local\",type=\"full\"}"), "{metrics}");
    assert!(
        metrics.contains("dr_errors_total{policy=\"app\"} 0"),
        "{metrics}"
    );

    // The target becomes unusable: health turns 503 naming it; back: 200.
    let backups_dir = env.path("backups");
    let aside = env.path("backups.aside");
    std::fs::rename(&backups_dir, &aside).expect("mv");
    std::fs::write(&backups_dir, "not a directory").expect("block");
    wait_in(&env, "/healthz 503", 15, || {
        get(port, "/healthz")
            .is_some_and(|(c, b)| c == 503 && b.contains("failing") && b.contains("local"))
    });
    let (_, m) = get(port, "/metrics").expect("metrics");
    assert!(
        m.contains("dr_backup_last_failure_timestamp_seconds"),
        "{m}"
    );
    // The healthcheck command a container runs says the same, as an exit code.
    let h = env.dr(&["healthcheck"]);
    assert_eq!(h.code, 1, "{}{}", h.stdout, h.stderr);
    assert!(h.stdout.contains("failing"), "{}", h.stdout);
    // A full and a diff can fall due together; one run per policy means the
    // diff may be skipped that tick. Keep the target down until the diff
    // schedule itself has recorded a failure.
    wait_in(&env, "a failed diff run in the history", 15, || {
        diff_run(&env)["last_failure"].is_string()
    });
    std::fs::remove_file(&backups_dir).expect("unblock");
    std::fs::rename(&aside, &backups_dir).expect("mv back");
    wait_in(&env, "/healthz 200 again", 15, || {
        get(port, "/healthz").is_some_and(|(c, _)| c == 200)
    });
    env.dr(&["healthcheck"]).ok();
    let diff = diff_run(&env);
    assert!(
        diff["last_success"].is_string()
            && diff["last_failure"].is_string()
            && diff["next_run"].is_string(),
        "{diff}"
    );
    let seen = pings.lock().expect("lock").clone();
    for want in [
        "POST /ping/start ",
        "POST /ping ",
        "POST /ping/fail ",
        "POST /hook ",
    ] {
        assert!(
            seen.iter().any(|l| l.starts_with(want)),
            "no {want:?} in {seen:?}"
        );
    }
    // What they said: the failure names the policy and the target's error;
    // the webhook carries the documented JSON.
    let fail = seen
        .iter()
        .find(|l| l.starts_with("POST /ping/fail "))
        .expect("fail ping");
    assert!(
        body(fail).starts_with("app ")
            && body(fail).contains("failed: ")
            && body(fail).contains("local"),
        "{fail}"
    );
    // The target named once, not "target 'local': target 'local' (...)".
    assert_eq!(body(fail).matches("target 'local'").count(), 1, "{fail}");
    let events: Vec<serde_json::Value> = seen
        .iter()
        .filter(|l| l.starts_with("POST /hook "))
        .filter_map(|l| serde_json::from_str(body(l)).ok())
        .collect();
    let success = events
        .iter()
        .find(|e| e["event"] == "success")
        .unwrap_or_else(|| panic!("no success event: {events:?}"));
    assert_eq!(success["policy"], "app", "{success}");
    assert_eq!(success["target"], "local", "{success}");
    assert!(
        success["label"]
            .as_str()
            .is_some_and(|l| l.ends_with('F') || l.ends_with('D')),
        "{success}"
    );
    assert!(success["time"].is_string(), "{success}");
    let failure = events
        .iter()
        .find(|e| e["event"] == "failure")
        .unwrap_or_else(|| panic!("no failure event: {events:?}"));
    assert!(
        failure["error"]
            .as_str()
            .is_some_and(|e| e.contains("local")),
        "{failure}"
    );

    // SIGHUP with a broken config keeps the running one.
    std::fs::write(env.config(), "this is = not [valid toml").expect("break");
    let _ = Command::new("kill")
        .args(["-HUP", &daemon.id().to_string()])
        .status();
    // The reload was read (and refused) before the config is mended.
    common::wait_for_log(&env.path("daemon.log"), "keeping the running one", 10);
    let before = backups(&env);
    std::fs::write(env.config(), &cfg_text).expect("fix");
    wait_in(&env, "backups to go on after a bad reload", 10, || {
        backups(&env) > before
    });
    // A good reload too; both are in the audit log.
    let _ = Command::new("kill")
        .args(["-HUP", &daemon.id().to_string()])
        .status();
    wait_in(&env, "the reload's audit line", 10, || {
        env.dr(&["audit", "--json"])
            .stdout
            .lines()
            .filter(|l| l.contains("\"config_reload\""))
            .count()
            >= 2
    });
    let audit = env.dr(&["audit", "--json"]).ok().stdout;
    let reloads: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|l: &serde_json::Value| l["action"] == "config_reload")
        .collect();
    assert!(
        reloads[0]["result"]
            .as_str()
            .is_some_and(|r| r.starts_with("invalid")),
        "{audit}"
    );
    assert_eq!(reloads[1]["result"], "ok", "{audit}");

    sigterm_exits_zero_quickly(daemon);
    // Whatever was cut off has no manifest: every listed backup verifies.
    let key = env.key_arg();
    env.dr(&["verify", "app", "--identity", &key]).ok();
}

#[test]
fn a_run_missed_while_the_daemon_was_down_runs_at_start_up() {
    let env = Env::new("[schedule]\nfull = \"*/15 * * * * *\"\n");
    common::make_db(&env.db, true, 50, 500);
    let cfg_text = std::fs::read_to_string(env.config()).expect("cfg")
        + "[daemon]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(env.config(), &cfg_text).expect("cfg");
    let (mut daemon, _) = common::start_daemon_listening(&env, &[]);
    wait_in(&env, "the first full", 20, || backups(&env) >= 1);
    daemon.kill().expect("kill -9");
    let _ = daemon.wait();
    let n = backups(&env);
    // Down for longer than the schedule's period: the run it missed is due.
    std::thread::sleep(Duration::from_secs(17));
    let (daemon, _) = common::start_daemon_listening(&env, &[]);
    wait_in(&env, "the missed full at start-up", 4, || backups(&env) > n);
    let log = std::fs::read_to_string(env.path("daemon.log")).expect("log");
    assert!(log.contains("catching up a missed run"), "{log}");
    sigterm_exits_zero_quickly(daemon);
}

#[test]
fn schedules_read_in_a_named_time_zone_and_a_bad_one_is_a_config_error() {
    let env = Env::new("[schedule]\nfull = \"0 3 * * *\"\n");
    let base = std::fs::read_to_string(env.config()).expect("cfg");
    std::fs::write(
        env.config(),
        format!("{base}[daemon]\ntimezone = \"Mars/Olympus\"\n"),
    )
    .expect("cfg");
    let r = env.dr(&["config", "validate"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("IANA time zone"), "{}", r.stderr);
    std::fs::write(
        env.config(),
        format!("{base}[daemon]\ntimezone = \"Asia/Tokyo\"\n"),
    )
    .expect("cfg");
    common::make_db(&env.db, true, 10, 10);
    env.dr(&["config", "validate"]).ok();
}

/// Runs of each job recorded in the run history: (kind, runs, successes).
fn history_counts(env: &Env) -> Vec<(String, i64, i64)> {
    let c = rusqlite::Connection::open(env.path("state/history.db")).expect("history");
    let mut st = c
        .prepare("SELECT kind, count(*), sum(ok) FROM runs GROUP BY kind ORDER BY kind")
        .expect("sql");
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect()
}

/// Adds `identity_file` to [encryption] (the daemon's restore drills need it).
fn with_identity(env: &Env) {
    let text = std::fs::read_to_string(env.config()).expect("cfg").replace(
        "[encryption]\n",
        &format!("[encryption]\nidentity_file = \"{}\"\n", env.key.display()),
    );
    std::fs::write(env.config(), text).expect("cfg");
}

#[test]
fn jobs_due_together_for_three_minutes_are_queued_and_every_one_runs() {
    let env = Env::new(
        "[schedule]\nfull = \"*/30 * * * * *\"\ndiff = \"*/10 * * * * *\"\nverify = \"*/20 * * * * *\"\n",
    );
    common::make_db(&env.db, true, 3000, 1000);
    with_identity(&env);
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "[daemon]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    let secs: u64 = std::env::var("DR_SCHEDULE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let started = Instant::now();
    let (daemon, _) = common::start_daemon_listening(&env, &[]);
    std::thread::sleep(Duration::from_secs(secs));
    sigterm_exits_zero_quickly(daemon);
    let ran = started.elapsed().as_secs();
    let log = std::fs::read_to_string(env.path("daemon.log")).expect("log");
    let counts = history_counts(&env);
    let runs = |kind: &str| {
        counts
            .iter()
            .find(|(k, _, _)| k == kind)
            .map_or((0, 0), |(_, n, ok)| (*n, *ok))
    };
    // Each schedule's due times in the window (plus the catch-up run at
    // start-up), less one for a run cut off at the end.
    for (kind, every) in [("full", 30), ("diff", 10), ("verify", 20)] {
        let (n, ok) = runs(kind);
        let due = (ran / every) as i64;
        assert!(
            n >= due,
            "{kind}: {n} runs for {due} due times\n{counts:?}\n{log}"
        );
        assert_eq!(n, ok, "{kind}: every run succeeded\n{log}");
    }
    assert!(!log.contains("not starting another"), "{log}");
    assert!(log.contains("queued"), "{log}");
}

/// The instant of a label (`20261125-160102F`) as RFC 3339 up to seconds.
fn b_time(label: &str) -> String {
    let d = &label[..8];
    let t = &label[9..15];
    format!(
        "{}-{}-{}T{}:{}:{}",
        &d[..4],
        &d[4..6],
        &d[6..],
        &t[..2],
        &t[2..4],
        &t[4..]
    )
}

#[test]
fn a_recovery_window_keeps_what_its_instants_need_whatever_the_counts_say() {
    let env = Env::new("[retention]\nfull = 1\nwindow = \"6s\"\n");
    common::make_db(&env.db, true, 50, 100);
    let label = |env: &Env| {
        env.dr(&["backup-local", "app", "--type", "full", "--json"])
            .ok()
            .json()[0]["label"]
            .as_str()
            .expect("label")
            .to_string()
    };
    let a = label(&env);
    std::thread::sleep(Duration::from_secs(3));
    let b = label(&env);
    std::thread::sleep(Duration::from_secs(3));
    let c = label(&env);
    // full = 1 alone would keep only c; the window still reaches back to a.
    let labels = |env: &Env| -> Vec<String> {
        env.dr(&["info", "--json"]).ok().json()["policies"][0]["targets"][0]["backups"]
            .as_array()
            .expect("backups")
            .iter()
            .map(|b| b["label"].as_str().expect("label").to_string())
            .collect()
    };
    assert_eq!(labels(&env), vec![a.clone(), b.clone(), c.clone()]);
    std::thread::sleep(Duration::from_secs(4));
    // The window now starts after a: b is the base of its oldest instant.
    let r = env.dr(&["expire", "app", "--json"]).ok();
    assert!(r.stdout.contains(&a), "{}", r.stdout);
    assert_eq!(labels(&env), vec![b.clone(), c]);
    // dr info says what the target covers and what the policy asks for.
    let j = env.dr(&["info", "--json"]).ok().json();
    let target = &j["policies"][0]["targets"][0];
    assert_eq!(target["window_asked"], "6s", "{target}");
    let start = target["covered"]["start"].as_str().expect("covered");
    let start = chrono::DateTime::parse_from_rfc3339(start).expect("rfc3339");
    let taken = chrono::DateTime::parse_from_rfc3339(&format!("{}Z", b_time(&b))).expect("label");
    assert!(
        start >= taken && start < taken + chrono::Duration::seconds(2),
        "{start} is backup {b}'s instant"
    );
    let to = env.path("oldest.db").display().to_string();
    env.dr(&[
        "restore-local",
        "app",
        "--to",
        &to,
        "--backup",
        &b,
        "--identity",
        &env.key_arg(),
    ])
    .ok();
}

#[test]
fn each_policy_pings_its_own_monitors_from_the_daemon_and_from_the_command_line() {
    let (ping_port, pings) = ping_server();
    let env = Env::new(&format!(
        "[schedule]\nfull = \"*/3 * * * * *\"\n[notify]\nping_url = \"http://127.0.0.1:{ping_port}/app\"\nkuma_url = \"http://127.0.0.1:{ping_port}/kuma/app\"\nntfy_url = \"http://127.0.0.1:{ping_port}/ntfy/app\"\n"
    ));
    common::make_db(&env.db, true, 50, 100);
    // A second policy whose database does not exist: it fails every run.
    std::fs::write(
        env.path("policies/broken.toml"),
        format!(
            "name = \"broken\"\ntargets = [\"local\"]\n[source]\nkind = \"sqlite\"\npath = \"missing.db\"\n[schedule]\nfull = \"*/3 * * * * *\"\n[notify]\nping_url = \"http://127.0.0.1:{ping_port}/broken\"\nkuma_url = \"http://127.0.0.1:{ping_port}/kuma/broken\"\nntfy_url = \"http://127.0.0.1:{ping_port}/ntfy/broken\"\n"
        ),
    )
    .expect("policy");
    // The command line, as a crontab line runs it.
    let r = env.dr(&["backup-local"]);
    assert_eq!(r.code, 1, "one policy failed: {}", r.stderr);
    let seen = pings.lock().expect("lock").clone();
    for want in [
        "POST /app/start ",
        "POST /app ",
        "GET /kuma/app?status=up",
        "POST /broken/start ",
        "POST /broken/fail ",
        "GET /kuma/broken?status=down",
    ] {
        assert!(
            seen.iter().any(|l| l.starts_with(want)),
            "no {want}: {seen:?}"
        );
    }
    assert!(
        !seen.iter().any(|l| l.starts_with("POST /app/fail")),
        "{seen:?}"
    );
    // ntfy hears of the failure only, with a title and the reason.
    let ntfy: Vec<&String> = seen
        .iter()
        .filter(|l| l.starts_with("POST /ntfy/"))
        .collect();
    assert_eq!(ntfy.len(), 1, "{seen:?}");
    assert!(ntfy[0].starts_with("POST /ntfy/broken "), "{ntfy:?}");
    assert!(
        ntfy[0].to_lowercase().contains("title: dr: broken "),
        "{ntfy:?}"
    );
    assert!(body(ntfy[0]).contains("missing.db"), "{ntfy:?}");
    // The CLI run is in the history the daemon reads.
    let runs: i64 = history_counts(&env).iter().map(|(_, n, _)| n).sum();
    assert_eq!(runs, 2, "{:?}", history_counts(&env));
    pings.lock().expect("lock").clear();
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "[daemon]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    let (daemon, _) = common::start_daemon_listening(&env, &[]);
    wait_in(&env, "daemon pings of both policies", 20, || {
        let s = pings.lock().expect("lock");
        s.iter().any(|l| l.starts_with("POST /app "))
            && s.iter().any(|l| l.starts_with("POST /broken/fail "))
    });
    sigterm_exits_zero_quickly(daemon);
    let seen = pings.lock().expect("lock").clone();
    assert!(
        !seen.iter().any(|l| l.starts_with("POST /app/fail")),
        "{seen:?}"
    );
}

/// `promtool check rules` passes on `rules`.
fn promtool_checks_rules(rules: &std::path::Path, context: &str) {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(rules)
        .output()
        .unwrap_or_else(|e| panic!("promtool is missing ({e}): run scripts/install-test-deps"));
    assert!(
        out.status.success(),
        "{}{}\n{context}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A daemon streaming policy `app` (with `schedule`) whose `/metrics`
/// answers: the env, the daemon and its port.
fn streaming_daemon(schedule: &str) -> (Env, common::Proc, u16) {
    let env = Env::new(&format!(
        "[wal]\nenabled = true\nsync_interval = \"1s\"\n[schedule]\n{schedule}"
    ));
    common::make_db(&env.db, true, 50, 100);
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "[daemon]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    let (daemon, port) = common::start_daemon_listening(&env, &[]);
    wait_in(&env, "metrics", 10, || {
        get(port, "/metrics").is_some_and(|(c, _)| c == 200)
    });
    (env, daemon, port)
}

#[test]
fn the_shipped_alert_rules_pass_promtool_and_name_metrics_the_daemon_serves() {
    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/dr-alerts.yml");
    promtool_checks_rules(&rules, "");
    // Every series the rules use is served, from the first scrape on (as 0
    // for what has not happened yet).
    let (_env, daemon, port) = streaming_daemon("verify = \"0 4 * * *\"\n");
    let (_, m) = get(port, "/metrics").expect("metrics");
    // Prometheus asks for OpenMetrics and gets it, ending in # EOF.
    let (code, open) = common::http_get_with(
        port,
        "/metrics",
        "Accept: application/openmetrics-text; version=1.0.0\r\n",
    )
    .expect("metrics");
    sigterm_exits_zero_quickly(daemon);
    assert!(code == 200 && open.trim_end().ends_with("# EOF"), "{open}");
    // Without that Accept, the classic text format, which promtool checks
    // (every family has its HELP under the name its samples carry).
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    {
        use std::io::Write;
        check
            .stdin
            .take()
            .expect("stdin")
            .write_all(m.as_bytes())
            .expect("write");
    }
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{m}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&rules).expect("rules");
    for name in [
        "dr_backup_last_success_timestamp_seconds",
        "dr_backup_last_failure_timestamp_seconds",
        "dr_verify_last_success_timestamp_seconds",
        "dr_verify_last_failure_timestamp_seconds",
        "dr_wal_streamer_up",
        "dr_wal_streamer_restarts_total",
        "dr_wal_spool_bytes",
        "dr_wal_spool_max_bytes",
        "dr_wal_lag_seconds",
    ] {
        assert!(text.contains(name), "the rules use {name}");
        assert!(
            m.lines().any(|l| l.starts_with(&format!("{name}{{"))),
            "{name} is served: {m}"
        );
    }
    for name in [
        "dr_build_info{version=",
        "dr_runs_total{",
        "dr_backup_last_duration_seconds{",
        "dr_wal_last_shipped_timestamp_seconds{",
    ] {
        assert!(m.contains(name), "{name}: {m}");
    }
    assert!(
        m.contains("dr_verify_last_success_timestamp_seconds{policy=\"app\",target=\"local\"} 0"),
        "a drill that never ran is a 0 series: {m}"
    );
    assert!(
        !m.contains("# EOF"),
        "the classic format has no EOF marker: {m}"
    );
}

#[test]
fn the_grafana_dashboard_queries_parse_and_use_metrics_the_daemon_serves() {
    let queries = common::dashboard_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    // promtool parses each query as a recording rule's expression.
    let dir = tempfile::tempdir().expect("tmp");
    let rules = dir.path().join("dashboard-rules.yml");
    let mut yml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        yml.push_str(&format!(
            "      - record: dr_dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(q).expect("quoted")
        ));
    }
    std::fs::write(&rules, &yml).expect("rules");
    promtool_checks_rules(&rules, &yml);
    // Every metric a query names is one the daemon serves; those of a
    // streamed SQLite policy carry its series from the first scrape.
    let (env, daemon, port) = streaming_daemon("full = \"0 3 * * *\"\nverify = \"0 4 * * *\"\n");
    // The streamer takes its generation's base at start, under the
    // policy's lock: this backup waits for it.
    env.dr(&["backup-local", "app", "--wait", "60"]).ok();
    let (_, m) = get(port, "/metrics").expect("metrics");
    sigterm_exits_zero_quickly(daemon);
    // A standby's (dr_follow_*) are checked by tests/follow.rs against a
    // standby daemon, PostgreSQL's (dr_pg_*) by tests/pg.rs.
    let names = common::dashboard_metrics();
    for name in names
        .iter()
        .filter(|n| !n.starts_with("dr_follow_") && !n.starts_with("dr_pg_"))
    {
        assert!(
            m.lines().any(|l| l.starts_with(&format!("{name}{{"))),
            "the dashboard uses {name}, which the daemon does not serve:\n{m}"
        );
    }
    for name in [
        "dr_protected",
        "dr_newest_restorable_timestamp_seconds",
        "dr_promised_age_seconds",
        "dr_backup_last_duration_seconds",
        "dr_backup_size_bytes",
        "dr_runs_total",
        "dr_wal_lag_seconds",
        "dr_wal_streamer_up",
        "dr_wal_spool_bytes",
        "dr_verify_last_success_timestamp_seconds",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "the dashboard shows {name}"
        );
        assert!(
            m.lines()
                .any(|l| l.starts_with(&format!("{name}{{policy=\"app\""))),
            "{name} has a series for the policy: {m}"
        );
    }
    // The backup just taken is what the restorable instant says.
    let restorable = common::metric(&m, "dr_newest_restorable_timestamp_seconds{policy=\"app\"}")
        .expect("restorable");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        restorable > now - 120.0 && restorable <= now + 1.0,
        "{restorable} vs {now}"
    );
}

#[test]
fn the_status_page_says_what_dr_info_says_and_renders_in_chromium() {
    let env = Env::new("[schedule]\nfull = \"0 3 * * *\"\nverify = \"0 4 * * *\"\n");
    common::make_db(&env.db, true, 50, 500);
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "[daemon]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    // Three backups of a growing database and a drill: the chart has bars.
    for rows in [200, 400] {
        env.dr(&["backup-local", "app", "--type", "full"]).ok();
        common::make_db(&env.db, true, rows, 500);
    }
    env.dr(&["backup-local", "app", "--type", "diff"]).ok();
    env.dr(&["verify", "app", "--identity", &env.key_arg()])
        .ok();
    let info = env.dr(&["info", "app", "--json"]).json();
    let (daemon, port) = common::start_daemon_listening(&env, &[]);
    let (code, page) = get(port, "/").expect("status page");
    assert_eq!(code, 200, "{page}");
    let policy = &info["policies"][0];
    let state = policy["verdict"]["state"].as_str().expect("state");
    assert!(
        page.contains(&format!("data-policy=\"app\" data-state=\"{state}\"")),
        "dr info says {state}: {page}"
    );
    let newest = common::labels_in(&info).pop().expect("a backup");
    assert!(
        page.contains(&format!("<span class=label>{newest}</span>")),
        "{newest}: {page}"
    );
    let restorable = policy["verdict"]["newest_restorable"]
        .as_str()
        .expect("restorable");
    let restorable = chrono::DateTime::parse_from_rfc3339(restorable).expect("rfc3339");
    assert!(
        page.contains(&restorable.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
        "newest restorable {restorable}: {page}"
    );
    assert!(
        page.contains("<polyline points="),
        "a chart of three backups: {page}"
    );
    assert!(!page.contains("none passed"), "the drill is shown: {page}");
    assert!(!page.contains("<script"), "no script: {page}");

    // Headless Chromium renders it on a phone-sized screen; the screenshot
    // is kept with the test run's artefacts.
    let url = format!("http://127.0.0.1:{port}/");
    let chromium = |args: &[&str]| {
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .args(args)
            .arg(&url)
            .output()
            .unwrap_or_else(|e| panic!("chromium is missing ({e}): run scripts/install-test-deps"))
    };
    let dom = chromium(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains(&format!("data-state=\"{state}\"")) && dom.contains(&newest),
        "{dom}"
    );
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&shots).expect("artefacts");
    let png = shots.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let out = chromium(&[
        &format!("--screenshot={}", png.display()),
        "--window-size=412,915",
    ]);
    let shot = std::fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        shot.starts_with(b"\x89PNG") && shot.len() > 5_000,
        "{} bytes",
        shot.len()
    );
    sigterm_exits_zero_quickly(daemon);
}

#[test]
fn metrics_need_the_token_once_one_is_set_and_an_open_listener_is_warned_about() {
    let env = Env::new("");
    common::make_db(&env.db, true, 50, 500);
    let token = "s3cr3t-metrics-token-7f1d";
    let token_file = env.path("metrics.token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let base = std::fs::read_to_string(env.config()).expect("cfg");
    std::fs::write(
        env.config(),
        format!(
            "{base}[daemon]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ),
    )
    .expect("cfg");
    let (daemon, port) = common::start_daemon_listening(&env, &[]);
    wait_in(&env, "the endpoint", 20, || get(port, "/healthz").is_some());
    // No token, a wrong one: 401, and nothing of the metrics.
    let (code, body) = get(port, "/metrics").expect("answer");
    assert_eq!(code, 401, "{body}");
    assert!(!body.contains("dr_"), "{body}");
    let wrong =
        common::http_get_with(port, "/metrics", "Authorization: Bearer nope\r\n").expect("answer");
    assert_eq!(wrong.0, 401);
    // The right one: the metrics.
    let auth = format!("Authorization: Bearer {token}\r\n");
    let (code, body) = common::http_get_with(port, "/metrics", &auth).expect("answer");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("dr_"), "{body}");
    // The status page is behind the same token.
    let (code, body) = get(port, "/").expect("answer");
    assert_eq!(code, 401, "{body}");
    assert!(!body.contains("app"), "{body}");
    let (code, body) = common::http_get_with(port, "/", &auth).expect("answer");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("data-policy=\"app\""), "{body}");
    // /healthz stays open for probes, without detail.
    let (_, body) = get(port, "/healthz").expect("answer");
    assert!(
        body.contains("status") && !body.contains("problems"),
        "{body}"
    );
    // A rotated token counts at once; the old one no longer does.
    std::fs::write(&token_file, "rotated-token-22\n").expect("rotate");
    assert_eq!(
        common::http_get_with(port, "/metrics", &auth)
            .expect("answer")
            .0,
        401
    );
    assert_eq!(
        common::http_get_with(
            port,
            "/metrics",
            "Authorization: Bearer rotated-token-22\r\n"
        )
        .expect("answer")
        .0,
        200
    );
    sigterm_exits_zero_quickly(daemon);
    let log = std::fs::read_to_string(env.path("daemon.log")).expect("log");
    assert!(
        !log.contains(token) && !log.contains("rotated-token-22"),
        "a token reached the log: {log}"
    );

    // Listening beyond loopback without a token: the daemon says so.
    std::fs::write(
        env.config(),
        format!("{base}[daemon]\nlisten = \"0.0.0.0:0\"\n"),
    )
    .expect("cfg");
    let (daemon, port) = common::start_daemon_listening(&env, &[]);
    wait_in(&env, "the endpoint", 20, || get(port, "/healthz").is_some());
    sigterm_exits_zero_quickly(daemon);
    let log = std::fs::read_to_string(env.path("daemon.log")).expect("log");
    assert!(
        log.contains("reachable from the network") && log.contains("token_file"),
        "{log}"
    );
}
