//! PostgreSQL through pgBackRest, against a real PostgreSQL 15 cluster and
//! the real pgbackrest binary, driven through the real `dr` binary.

mod common;

use std::path::Path;
use std::time::Duration;

use common::Env;
use common::pg::{
    PgCluster, give_to_postgres, pg_env, setup, sql_at, start_restored, stop, wait_out_recovery,
};

#[test]
fn setup_full_diff_info_expire_and_point_in_time_restore_into_a_new_directory() {
    let dir = tempfile::tempdir().expect("tmp");
    let cluster = PgCluster::start(&dir.path().join("pg"));
    let env = pg_env(&cluster, "[retention]\nfull = 1\n");
    setup(&env, &cluster);
    let audit = env.dr(&["audit", "--json"]).ok().stdout;
    assert!(
        audit.lines().any(|l| l.contains("\"pg_setup\"")
            && l.contains("\"policy\":\"main-pg\"")
            && l.contains("\"result\":\"ok\"")),
        "{audit}"
    );
    cluster.pgbench(&["-i", "-s", "2", "-q"]);
    cluster.sql("CREATE TABLE marks(id int primary key, note text)");
    cluster.sql("INSERT INTO marks SELECT g, 'before' FROM generate_series(1, 1000) g");

    let full = env
        .dr(&["backup-local", "main-pg", "--type", "full", "--json"])
        .ok()
        .json();
    assert_eq!(full[0]["type"], "full", "{full}");
    cluster.pgbench(&["-T", "2", "-c", "2"]);
    cluster.sql("INSERT INTO marks SELECT g, 'diff' FROM generate_series(1001, 2000) g");
    let diff = env.dr(&["backup-local", "main-pg", "--json"]).ok().json();
    assert_eq!(diff[0]["type"], "diff", "{diff}");
    assert_eq!(diff[0]["parent"], full[0]["label"]);

    // The instant to restore to, between two commits.
    std::thread::sleep(Duration::from_millis(1100));
    let at = cluster.sql("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')");
    std::thread::sleep(Duration::from_millis(1100));
    cluster.sql("INSERT INTO marks VALUES (5000, 'after')");
    cluster.sql("SELECT pg_switch_wal()");
    std::thread::sleep(Duration::from_millis(1500));

    // Every core and the asynchronous archive (issue 25): pgBackRest's
    // config says so, and the segments went through its spool, whose
    // queue the point-in-time restore below depends on.
    let conf = std::fs::read_to_string(env.path("state/pg/main-pg/pgbackrest.conf")).expect("conf");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for line in [
        format!("process-max={cores}"),
        "archive-async=y".to_string(),
        "repo1-bundle=y".to_string(),
    ] {
        assert!(conf.lines().any(|l| l == line), "{line} missing:\n{conf}");
    }
    let spool = env.path("state/pg/main-pg/spool/archive/main/out");
    let pushed = std::fs::read_dir(&spool)
        .map(|d| d.flatten().count())
        .unwrap_or(0);
    assert!(
        pushed > 0,
        "nothing went through the spool {}",
        spool.display()
    );

    // info: both backups on the local target, chain and sizes.
    let info = env.dr(&["info", "--json"]).ok().json();
    let backups = info["policies"][0]["targets"][0]["backups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(backups.len(), 2, "{info}");
    assert!(
        backups
            .iter()
            .all(|b| b["size"].as_u64().is_some_and(|s| s > 0)),
        "{info}"
    );

    // A new full expires the old chain (retention.full = 1).
    env.dr(&["backup-local", "main-pg", "--type", "full"]).ok();
    let info = env.dr(&["info", "--json"]).ok().json();
    let backups = info["policies"][0]["targets"][0]["backups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(backups.len(), 1, "{info}");

    // Point-in-time restore into a new directory, started on its own port.
    let to = dir.path().join("restored");
    give_to_postgres(&to);
    let r = env.dr(&[
        "restore-local",
        "main-pg",
        "--to",
        &to.display().to_string(),
        "--at",
        &at,
    ]);
    // The only backup left is newer than the instant: not found (5),
    // naming the oldest instant that can be reached.
    assert_eq!(r.code, 5, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("the oldest ends at"), "{}", r.stderr);
    std::fs::remove_dir_all(&to).ok();
    give_to_postgres(&to);
    std::thread::sleep(Duration::from_millis(2100));
    let later = cluster.sql("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')");
    std::thread::sleep(Duration::from_millis(1100));
    cluster.sql("INSERT INTO marks VALUES (6000, 'too late')");
    cluster.sql("SELECT pg_switch_wal()");
    std::thread::sleep(Duration::from_millis(1500));
    let r = env
        .dr(&[
            "restore-local",
            "main-pg",
            "--to",
            &to.display().to_string(),
            "--at",
            &later,
        ])
        .ok();
    assert!(r.stdout.contains("pg_ctl"), "{}", r.stdout);
    let port = start_restored(
        &to,
        &cluster.sock,
        &dir.path().join("pg").join("restored.log"),
    );
    let count = sql_at(
        &cluster.sock,
        port,
        "SELECT count(*) FROM marks WHERE id <= 5000",
    );
    let late = sql_at(
        &cluster.sock,
        port,
        "SELECT count(*) FROM marks WHERE id = 6000",
    );
    stop(&to);
    assert_eq!(count, "2001", "rows before the instant must be there");
    assert_eq!(late, "0", "the row after the instant must not");
}

#[test]
fn a_missing_cipher_pass_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let cluster = PgCluster::start(&dir.path().join("pg"));
    let env = pg_env(&cluster, "");
    std::fs::remove_file(env.path("cipher.pass")).expect("rm");
    let r = env.dr(&["pg", "setup", "main-pg"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("cipher.pass"), "{}", r.stderr);
    assert!(!Path::new(&env.path("state/pg/main-pg/pgbackrest.conf")).exists());
}

#[test]
fn pgbackrest_absent_from_path_says_how_to_install_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let cluster = PgCluster::start(&dir.path().join("pg"));
    let env = pg_env(&cluster, "");
    let out = std::process::Command::new(common::dr_bin())
        .arg("--config")
        .arg(env.config())
        .args(["backup-local", "main-pg"])
        .env("PATH", "/nonexistent")
        .output()
        .expect("dr");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("apt-get install -y pgbackrest"), "{err}");
}

#[test]
fn backup_and_point_in_time_restore_through_an_s3_target_behind_tls() {
    let dir = tempfile::tempdir().expect("tmp");
    let cluster = PgCluster::start(&dir.path().join("pg"));
    let (_server, _proxy, env) = common::pg::pg_env_on_s3(dir.path(), &cluster, "");

    setup(&env, &cluster);
    cluster.sql("CREATE TABLE marks(id int primary key)");
    cluster.sql("INSERT INTO marks SELECT generate_series(1, 500)");
    let r = env.dr(&["backup-s3", "main-pg", "--json"]).ok().json();
    assert_eq!(r[0]["type"], "full", "{r}");
    assert_eq!(r[0]["target"], "s3");
    std::thread::sleep(Duration::from_millis(1100));
    let at = cluster.sql("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')");
    std::thread::sleep(Duration::from_millis(1100));
    cluster.sql("INSERT INTO marks VALUES (9999)");
    cluster.sql("SELECT pg_switch_wal()");
    std::thread::sleep(Duration::from_millis(1500));
    let info = env.dr(&["info", "--json"]).ok().json();
    assert_eq!(
        info["policies"][0]["targets"][0]["backups"]
            .as_array()
            .map(|b| b.len()),
        Some(1),
        "{info}"
    );
    let to = dir.path().join("restored");
    give_to_postgres(&to);
    env.dr(&[
        "restore-s3",
        "main-pg",
        "--to",
        &to.display().to_string(),
        "--at",
        &at,
    ])
    .ok();
    let port = start_restored(
        &to,
        &cluster.sock,
        &dir.path().join("pg").join("restored.log"),
    );
    let n = sql_at(&cluster.sock, port, "SELECT count(*) FROM marks");
    stop(&to);
    assert_eq!(n, "500");
}

#[test]
fn restore_never_overwrites_a_directory_or_a_running_cluster_and_rewinds_a_stopped_one_in_place() {
    let dir = tempfile::tempdir().expect("tmp");
    let cluster = PgCluster::start(&dir.path().join("pg"));
    let env = pg_env(&cluster, "");
    let data = cluster.data.display().to_string();
    let r = env.dr(&["restore-local", "main-pg", "--to", &data]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        r.stderr.contains("not empty") && r.stderr.contains("--force"),
        "{}",
        r.stderr
    );
    let r = env.dr(&["restore-local", "main-pg", "--to", &data, "--force"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("stop PostgreSQL first"), "{}", r.stderr);
    assert_eq!(
        cluster.sql("SELECT 1"),
        "1",
        "the running cluster is untouched"
    );

    // Stopped, and with --force: a delta restore in place rewinds the
    // cluster to the chosen backup, and it starts and promotes.
    setup(&env, &cluster);
    cluster.sql("CREATE TABLE marks(id int primary key)");
    cluster.sql("INSERT INTO marks SELECT generate_series(1, 300)");
    let full = env
        .dr(&["backup-local", "main-pg", "--type", "full", "--json"])
        .ok()
        .json();
    let label = full[0]["label"].as_str().unwrap_or_default().to_string();
    cluster.sql("INSERT INTO marks VALUES (7777)");
    cluster.pg_ctl("stop");
    let r = env
        .dr(&[
            "restore-local",
            "main-pg",
            "--to",
            &data,
            "--force",
            "--backup",
            &label,
        ])
        .ok();
    assert!(r.stdout.contains("pg_ctl"), "{}", r.stdout);
    cluster.pg_ctl("start");
    wait_out_recovery(&cluster.sock, cluster.port);
    assert_eq!(cluster.sql("SELECT count(*) FROM marks"), "300");
    assert_eq!(
        cluster.sql("SELECT count(*) FROM marks WHERE id = 7777"),
        "0",
        "a row written after the backup is gone after the in-place restore"
    );
    // At the policy's own path, the restored cluster still writes nothing
    // into the repository it came from: it may be the wrong restore.
    let archive = env.path("backups/main-pg/pgbackrest/archive");
    let before = common::files_under(&archive);
    cluster.sql("INSERT INTO marks VALUES (8888)");
    cluster.sql("SELECT pg_switch_wal()");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(cluster.sql("SHOW archive_mode"), "off");
    assert_eq!(
        common::files_under(&archive),
        before,
        "the restored cluster archived into the repository"
    );
    // And it is not protected until declared: info, /healthz and the
    // metrics say that its commits reach no repository.
    let r = env.dr(&["info", "main-pg"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("archive_failing") && r.stderr.contains("dr pg setup main-pg"),
        "{}",
        r.stderr
    );
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "[daemon]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    let (daemon, port) = common::start_daemon_listening(&env, &[]);
    let (code, body) = common::http_get(port, "/healthz").expect("healthz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"archive_failing\""), "{body}");
    let (_, metrics) = common::http_get(port, "/metrics").expect("metrics");
    assert!(
        metrics.contains("dr_protected{policy=\"main-pg\"} 0")
            && metrics.contains("dr_pg_archive_last_success_timestamp_seconds{policy=\"main-pg\"}"),
        "{metrics}"
    );
    // What the shipped dashboard shows of PostgreSQL is served.
    for name in common::dashboard_metrics()
        .iter()
        .filter(|n| n.starts_with("dr_pg_"))
    {
        assert!(
            metrics.contains(&format!("{name}{{policy=\"main-pg\"}}")),
            "the dashboard's {name}: {metrics}"
        );
    }
    // Declared the new primary (`dr pg setup`): its next WAL is archived,
    // on its new timeline.
    setup(&env, &cluster);
    cluster.sql("INSERT INTO marks VALUES (9999)");
    cluster.sql("SELECT pg_switch_wal()");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while common::files_under(&archive).len() <= before.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new primary's WAL is not archived"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = env.dr(&["info", "main-pg"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let (code, body) = common::http_get(port, "/healthz").expect("healthz");
    assert_eq!(code, 200, "{body}");
    drop(daemon);
}

#[test]
fn verify_and_expire_include_postgres_expire_runs_pgbackrest_and_info_writes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let cluster = PgCluster::start(&dir.path().join("pg"));
    let env = pg_env(&cluster, "[retention]\nfull = 2\n");
    setup(&env, &cluster);
    // Set up again the way the README does it, with a relative --config from
    // the config's directory: PostgreSQL runs archive_command from its own
    // data directory, so every path in it must be absolute.
    let out = std::process::Command::new(common::dr_bin())
        .current_dir(env.dir.path())
        .args(["--config", "dr.toml", "pg", "setup", "main-pg", "--json"])
        .output()
        .expect("dr pg setup");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let cmd = j["archive_command"]
        .as_str()
        .unwrap_or_else(|| panic!("{j} {}", String::from_utf8_lossy(&out.stderr)));
    assert!(
        cmd.starts_with('/') && cmd.contains("--pgbackrest-config=/"),
        "{cmd}"
    );
    assert_eq!(j["checked"], true, "{j}");
    cluster.pgbench(&["-i", "-s", "1", "-q"]);
    let first = env
        .dr(&["backup-local", "main-pg", "--type", "full", "--json"])
        .ok()
        .json()[0]["label"]
        .clone();
    std::thread::sleep(Duration::from_millis(1100));
    let second = env
        .dr(&["backup-local", "main-pg", "--type", "full", "--json"])
        .ok()
        .json()[0]["label"]
        .clone();
    assert_ne!(first, second);

    // An incremental taken with pgBackRest itself is listed as what it is,
    // with its own size, under its full.
    let conf = env.path("state/pg/main-pg/pgbackrest.conf");
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--", "pgbackrest"])
        .arg(format!("--config={}", conf.display()))
        .args(["--stanza=main", "--repo=1", "--type=incr", "backup"])
        .output()
        .expect("pgbackrest");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // info reads and writes nothing: pgbackrest.conf keeps its bytes and mtime.
    let before = (
        std::fs::read(&conf).expect("conf"),
        std::fs::metadata(&conf)
            .and_then(|m| m.modified())
            .expect("mtime"),
    );
    std::thread::sleep(Duration::from_millis(1100));
    let info = env.dr(&["info", "--json"]).ok().json();
    let after = (
        std::fs::read(&conf).expect("conf"),
        std::fs::metadata(&conf)
            .and_then(|m| m.modified())
            .expect("mtime"),
    );
    assert!(before == after, "dr info rewrote {}", conf.display());
    let backups = info["policies"][0]["targets"][0]["backups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(backups.len(), 3, "{info}");
    let incr = &backups[2];
    assert_eq!(incr["type"], "incr", "{info}");
    assert_eq!(incr["parent"], second, "{info}");
    assert!(
        incr["size"].as_u64() < backups[1]["size"].as_u64(),
        "an incremental's size is its own delta: {info}"
    );
    let text = env.dr(&["info"]).ok().stdout;
    assert!(text.contains("incr"), "{text}");

    // A new host: the same config with an empty state_dir, the cluster
    // stopped. info reads the repository as it is, writing nothing.
    let new_host = env.path("dr-new-host.toml");
    let cfg = std::fs::read_to_string(env.config()).expect("cfg");
    std::fs::write(
        &new_host,
        cfg.replace("state_dir = \"state\"", "state_dir = \"state-new-host\"")
            .replace(
                "policies = \"policies\"",
                &format!("policies = \"{}\"", env.path("policies").display()),
            ),
    )
    .expect("cfg");
    cluster.pg_ctl("stop");
    let r = common::Run::from(
        std::process::Command::new(common::dr_bin())
            .arg("--config")
            .arg(&new_host)
            .args(["info", "--json"])
            .output()
            .expect("dr info"),
    );
    let listed = r.json()["policies"][0]["targets"][0]["backups"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(listed, 3, "{}{}", r.stdout, r.stderr);
    assert!(
        !env.path("state-new-host/pg").exists(),
        "info wrote a pgBackRest config on the new host"
    );
    cluster.pg_ctl("start");

    // Verify and expire with no policy named include PostgreSQL policies.
    let v = env.dr(&["verify"]).ok();
    assert!(v.stdout.contains("ok    main-pg on local"), "{}", v.stdout);

    // Lower retention to one full: expire removes the older chain through
    // pgBackRest, and a dry run first says so without removing it.
    let policy = env.path("policies/main-pg.toml");
    let text = std::fs::read_to_string(&policy).expect("policy");
    std::fs::write(&policy, text.replace("full = 2", "full = 1")).expect("policy");
    let dry = env.dr(&["expire", "--dry-run", "--json"]).ok().json();
    assert!(
        dry.as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["label"] == first && e["removed"] == false)),
        "{dry}"
    );
    let count = |env: &Env| {
        env.dr(&["info", "--json"]).ok().json()["policies"][0]["targets"][0]["backups"]
            .as_array()
            .map_or(0, Vec::len)
    };
    assert_eq!(count(&env), 3, "a dry run removes nothing");
    let done = env.dr(&["expire", "--json"]).ok().json();
    assert!(
        done.as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["label"] == first && e["removed"] == true)),
        "{done}"
    );
    let info = env.dr(&["info", "--json"]).ok().json();
    let left: Vec<_> = info["policies"][0]["targets"][0]["backups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(left.iter().all(|b| b["label"] != first), "{info}");
    assert!(left.iter().any(|b| b["label"] == second), "{info}");

    // A damaged file in the repository fails verify with exit 3, read from
    // pgBackRest's report (it exits 0 itself).
    let set = env.path(&format!(
        "backups/main-pg/pgbackrest/backup/main/{}/pg_data",
        second.as_str().expect("label")
    ));
    let victim = common::files_under(&set)
        .into_iter()
        .map(|f| set.join(f))
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 64))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a file in the backup set");
    let mut bytes = std::fs::read(&victim).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&victim, bytes).expect("write");
    let v = env.dr(&["verify", "main-pg"]);
    assert_eq!(v.code, 3, "{}\n{}", v.stdout, v.stderr);
    assert!(v.stdout.contains("FAIL  main-pg on local"), "{}", v.stdout);
}

#[test]
fn setup_changes_postgresql_only_once_the_repository_works_and_bounds_the_rpo() {
    let dir = tempfile::tempdir().expect("tmp");
    let cluster = PgCluster::start(&dir.path().join("pg"));
    let env = pg_env(&cluster, "archive_timeout = \"30s\"\n");
    // A repository pgBackRest cannot write: a file where its directory goes.
    std::fs::create_dir_all(env.path("backups")).expect("dir");
    std::fs::write(env.path("backups/main-pg"), b"not a directory").expect("block");
    let before = (
        cluster.sql("SHOW archive_command"),
        cluster.sql("SHOW archive_timeout"),
    );
    let r = env.dr(&["pg", "setup", "main-pg"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert_eq!(
        (
            cluster.sql("SHOW archive_command"),
            cluster.sql("SHOW archive_timeout")
        ),
        before,
        "PostgreSQL was changed before the repository worked"
    );
    // The repository usable, but state_dir closed to the cluster's user
    // (root's 0700, as StateDirectory= used to make it): archive_command
    // could not read pgBackRest's config. validate says so, and setup
    // refuses before changing PostgreSQL.
    std::fs::remove_file(env.path("backups/main-pg")).expect("unblock");
    use std::os::unix::fs::PermissionsExt;
    let state = env.path("state");
    std::fs::create_dir_all(&state).expect("state");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let v = env.dr(&["config", "validate"]);
    assert_eq!(v.code, 2, "{}{}", v.stdout, v.stderr);
    assert!(
        v.stderr.contains("archive_command runs as 'postgres'")
            && v.stderr.contains("StateDirectoryMode=0711"),
        "{}",
        v.stderr
    );
    let r = env.dr(&["pg", "setup", "main-pg"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("let 'postgres' pass through"),
        "{}",
        r.stderr
    );
    assert_eq!(
        (
            cluster.sql("SHOW archive_command"),
            cluster.sql("SHOW archive_timeout")
        ),
        before,
        "PostgreSQL was changed though archiving could not work"
    );
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    // Now setup goes through and bounds the RPO.
    setup(&env, &cluster);
    assert_eq!(cluster.sql("SHOW archive_timeout"), "30s");
    // Zero would leave the open segment unarchived without bound.
    let policy = env.path("policies/main-pg.toml");
    let text = std::fs::read_to_string(&policy).expect("policy");
    std::fs::write(&policy, text.replace("\"30s\"", "\"0s\"")).expect("policy");
    let r = env.dr(&["config", "validate"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("archive_timeout"), "{}", r.stderr);
}

/// A PostgreSQL standby through pgBackRest (issue 24): `dr follow` builds
/// a standby data directory on "host B" that replays the archive as
/// segments arrive; the primary is lost; `dr promote` promotes it and
/// declares it the primary: every row archived before the loss is there,
/// it takes writes, and its new timeline is archived into the same stanza.
#[test]
fn a_standby_replays_the_archive_and_promotes_exact_to_the_last_archived_segment() {
    let dir = tempfile::tempdir().expect("tmp");
    let cluster = PgCluster::start(&dir.path().join("pg"));
    let env = pg_env(&cluster, "archive_timeout = \"1s\"\n");
    setup(&env, &cluster);
    cluster.sql("CREATE TABLE marks(id int primary key)");
    cluster.sql("INSERT INTO marks SELECT generate_series(1, 100)");
    env.dr(&["backup-local", "main-pg", "--type", "full"]).ok();

    // Host B: its own state_dir and its own cluster (data directory and
    // port), the same stanza and repository.
    let standby = dir.path().join("standby");
    give_to_postgres(&standby);
    let data = standby.join("data");
    let port = common::HeldPort::new().port;
    let b = common::second_host(&env, "main-pg", |p| {
        p.replace(
            &cluster.data.display().to_string(),
            &data.display().to_string(),
        )
        .replace(
            &format!("port = {}", cluster.port),
            &format!("port = {port}"),
        )
    });
    let dr_b = |args: &[&str]| common::dr_with(&b, args);
    let r = dr_b(&["follow", "main-pg"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("standby"), "{}", r.stdout);
    assert!(data.join("standby.signal").exists(), "no standby.signal");
    let log = standby.join("pg.log");
    let started = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--", "pg_ctl", "-D"])
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", "60", "-o"])
        .arg(format!("-p {port} -k {}", cluster.sock.display()))
        .arg("start")
        .output()
        .expect("pg_ctl");
    assert!(
        started.status.success(),
        "{}{}",
        String::from_utf8_lossy(&started.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    struct Stop(std::path::PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            stop(&self.0);
        }
    }
    let _stop = Stop(data.clone());
    assert_eq!(
        sql_at(&cluster.sock, port, "SELECT pg_is_in_recovery()"),
        "t"
    );

    // The primary commits more; the standby replays it from the archive.
    cluster.sql("INSERT INTO marks SELECT generate_series(101, 200)");
    cluster.sql("SELECT pg_switch_wal()");
    common::wait_until(
        "the standby to replay the archived rows",
        90,
        || sql_at(&cluster.sock, port, "SELECT count(*) FROM marks") == "200",
        || std::fs::read_to_string(&log).unwrap_or_default(),
    );
    // The primary is lost.
    stop(&cluster.data);

    let r = dr_b(&["promote", "main-pg"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("new timeline"), "{}", r.stdout);
    assert_eq!(
        sql_at(&cluster.sock, port, "SELECT pg_is_in_recovery()"),
        "f"
    );
    assert_eq!(
        sql_at(&cluster.sock, port, "SELECT count(*) FROM marks"),
        "200"
    );
    sql_at(&cluster.sock, port, "INSERT INTO marks VALUES (201)");
    sql_at(&cluster.sock, port, "SELECT pg_switch_wal()");
    common::wait_until(
        "the promoted standby's new timeline in the stanza",
        60,
        || {
            dr_b(&["info", "--json"]).json()["policies"][0]["targets"][0]["archive"]["segment"]
                .as_str()
                .is_some_and(|s| s > "00000001FFFFFFFFFFFFFFFF")
        },
        || dr_b(&["info", "--json"]).stdout,
    );

    // The old primary comes back with its data directory, its state_dir
    // and its archive_command: it takes writes (dr cannot stop that), but
    // none of its WAL reaches the repository, and it says so.
    let old_timeline = || old_timeline_segments(&env.path("backups/main-pg/pgbackrest/archive"));
    let archived = old_timeline();
    assert!(!archived.is_empty(), "no segment of timeline 1 archived");
    cluster.pg_ctl("start");
    cluster.sql("INSERT INTO marks VALUES (999)");
    cluster.sql("SELECT pg_switch_wal()");
    common::wait_until(
        "the old primary's archiver to be refused",
        60,
        || cluster.sql("SELECT failed_count FROM pg_stat_archiver") != "0",
        || std::fs::read_to_string(&cluster.log).unwrap_or_default(),
    );
    let log = std::fs::read_to_string(&cluster.log).unwrap_or_default();
    assert!(
        log.contains("was promoted") && log.contains("stays in pg_wal"),
        "{log}"
    );
    assert_eq!(
        old_timeline(),
        archived,
        "the old primary archived after the promotion"
    );
    let r = env.dr(&["info", "main-pg"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("archive_failing"), "{}", r.stdout);
    let r = env.dr(&["backup-local", "main-pg"]);
    assert_eq!(r.code, 6, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("was promoted on host"), "{}", r.stderr);
    let r = env.dr(&["pg", "setup", "main-pg"]);
    assert_eq!(r.code, 6, "{}{}", r.stdout, r.stderr);
    assert_eq!(old_timeline(), archived);
}

/// Names of the timeline-1 WAL segments under a stanza's archive.
fn old_timeline_segments(archive: &std::path::Path) -> Vec<String> {
    common::files_under(archive)
        .into_iter()
        .filter_map(|f| f.rsplit('/').next().map(str::to_string))
        .filter(|name| name.starts_with("00000001") && name.contains('-'))
        .collect()
}
