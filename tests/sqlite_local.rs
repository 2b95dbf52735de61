//! SQLite backups to a local target, end to end through the real binary.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Env, dump, make_db, sha256_file};

/// A writer in a separate process: each transaction inserts the same id into
/// two tables, so a torn snapshot shows up as tables that differ.
fn start_writer(db: &std::path::Path, journal: &str) -> common::Proc {
    let script = format!(
        r#"
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
c.execute("PRAGMA journal_mode={journal}")
c.execute("CREATE TABLE IF NOT EXISTS a(id INTEGER PRIMARY KEY, v BLOB)")
c.execute("CREATE TABLE IF NOT EXISTS b(id INTEGER PRIMARY KEY, v BLOB)")
print("ready", flush=True)
i = 0
while True:
    i += 1
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO a(v) VALUES (randomblob(300))")
    c.execute("INSERT INTO b(v) VALUES (randomblob(300))")
    c.execute("COMMIT")
    time.sleep(0.001)
"#
    );
    let mut child = common::Proc::spawn(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(db)
            .stdout(Stdio::piped()),
    )
    .expect("python3 writer");
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("writer ready");
    assert_eq!(line.trim(), "ready");
    child
}

fn consistent(path: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(path).expect("open");
    // One statement, one read transaction: the source may still be written.
    let (a, b): (i64, i64) = c
        .query_row(
            "SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("counts");
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(ok, "ok");
    assert_eq!(a, b, "snapshot is torn: a has {a} rows, b has {b}");
    a
}

fn live_writer_round_trip(journal: &str) {
    let env = Env::new("[retention]\nfull = 2\n");
    make_db(&env.db, journal == "wal", 2000, 500);
    let mut writer = start_writer(&env.db, journal);
    std::thread::sleep(Duration::from_millis(300));
    let full = env.dr(&["backup-local", "app", "--json"]).ok().json();
    assert_eq!(full[0]["type"], "full");
    std::thread::sleep(Duration::from_millis(300));
    let diff = env.dr(&["backup-local", "app", "--json"]).ok().json();
    assert_eq!(
        diff[0]["type"], "diff",
        "default is diff once a full exists"
    );
    let before_stop = consistent(&env.db);
    let _ = writer.kill();
    let _ = writer.wait();

    env.restore("restored-diff.db", &[]).ok();
    let n = consistent(&env.path("restored-diff.db"));
    assert!(
        n > 0 && n <= before_stop,
        "restored {n} rows, source had {before_stop} after the backup"
    );
    // The writer only appends: the restore holds exactly the source's first
    // n rows of each table, blobs included, and all of `t`.
    same_prefix(&env.path("restored-diff.db"), &env.db, n);
    let full_label = full[0]["label"].as_str().expect("label");
    env.restore("restored-full.db", &["--backup", full_label])
        .ok();
    let m = consistent(&env.path("restored-full.db"));
    assert!(
        m < n,
        "the diff carries the writes made after the full ({m} vs {n})"
    );
    same_prefix(&env.path("restored-full.db"), &env.db, m);
}

/// Rows of `table` with id <= `n`, in order.
fn rows(path: &std::path::Path, table: &str, n: i64) -> Vec<(i64, Vec<u8>)> {
    let c = rusqlite::Connection::open(path).expect("open");
    let mut st = c
        .prepare(&format!(
            "SELECT id, v FROM {table} WHERE id <= ?1 ORDER BY id"
        ))
        .expect("prepare");
    st.query_map([n], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

fn same_prefix(restored: &std::path::Path, source: &std::path::Path, n: i64) {
    for table in ["a", "b"] {
        let got = rows(restored, table, i64::MAX);
        assert_eq!(got.len() as i64, n, "{table}");
        assert!(
            got == rows(source, table, n),
            "{table}: the restored rows differ from the source's first {n}"
        );
    }
    assert!(
        rows(restored, "t", i64::MAX) == rows(source, "t", i64::MAX),
        "t differs"
    );
}

#[test]
fn wal_database_under_a_live_writer_restores_consistently() {
    live_writer_round_trip("wal");
}

#[test]
fn rollback_journal_database_under_a_live_writer_restores_consistently() {
    live_writer_round_trip("delete");
}

#[test]
fn restored_data_equals_the_source_and_diffs_store_only_changes() {
    let env = Env::new("");
    make_db(&env.db, true, 4000, 1000); // ~4 MiB, ~1000+ pages
    let full = env.dr(&["backup-local", "--json"]).ok().json();
    let pages = full[0]["page_count"].as_u64().expect("page_count");
    assert_eq!(full[0]["pages_stored"].as_u64(), Some(pages));
    {
        let c = rusqlite::Connection::open(&env.db).expect("open");
        c.execute("UPDATE t SET v = randomblob(1000) WHERE id % 100 = 0", [])
            .expect("update 1%");
    }
    let diff = env
        .dr(&["backup-local", "app", "--type", "diff", "--json"])
        .ok()
        .json();
    let stored = diff[0]["pages_stored"].as_u64().expect("stored");
    assert!(
        stored > 0 && stored * 10 < pages,
        "diff stored {stored} of {pages} pages"
    );
    assert!(
        diff[0]["stored_size"].as_u64() < Some(full[0]["stored_size"].as_u64().expect("size") / 10)
    );
    env.restore("r.db", &[]).ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));

    // Shrinking the database: a diff restores to the smaller page count.
    {
        let c = rusqlite::Connection::open(&env.db).expect("open");
        c.execute_batch("DELETE FROM t WHERE id > 1000; VACUUM;")
            .expect("vacuum");
    }
    env.dr(&["backup-local", "app", "--type", "diff"]).ok();
    env.restore("r2.db", &[]).ok();
    assert_eq!(dump(&env.path("r2.db")), dump(&env.db));
}

#[test]
fn restore_never_overwrites_without_force_and_replaces_wal_with_it() {
    let env = Env::new("");
    make_db(&env.db, true, 500, 200);
    env.dr(&["backup-local", "app"]).ok();
    let target = env.path("existing.db");
    make_db(&target, true, 10, 10);
    // Leave a -wal from the "old" database in place.
    let keep = rusqlite::Connection::open(&target).expect("open");
    keep.execute("INSERT INTO t(v) VALUES (x'00')", [])
        .expect("insert");
    let before = sha256_file(&target);
    let r = env.restore("existing.db", &[]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    assert_eq!(sha256_file(&target), before, "existing database untouched");
    // The old database's -wal and -shm stay behind when its application
    // goes (a crash): their frames must never land on the restored file.
    let side = |s: &str| std::path::PathBuf::from(format!("{}{s}", target.display()));
    let wal = std::fs::read(side("-wal")).expect("-wal");
    let shm = std::fs::read(side("-shm")).expect("-shm");
    assert!(!wal.is_empty());
    drop(keep);
    std::fs::write(side("-wal"), &wal).expect("stale -wal");
    std::fs::write(side("-shm"), &shm).expect("stale -shm");
    env.restore("existing.db", &["--force"]).ok();
    assert_ne!(
        std::fs::read(side("-wal")).ok().as_deref(),
        Some(&wal[..]),
        "the stale -wal is gone"
    );
    assert_eq!(dump(&target), dump(&env.db));
}

#[test]
fn retention_and_expire_follow_pgbackrest_semantics() {
    let env = Env::new("[retention]\nfull = 2\ndiff = 1\nincomplete_grace = \"1s\"\n");
    make_db(&env.db, true, 100, 100);
    let mut labels = Vec::new();
    for kind in ["full", "diff", "diff", "full", "diff", "full"] {
        let r = env
            .dr(&["backup-local", "app", "--type", kind, "--json"])
            .ok()
            .json();
        labels.push(r[0]["label"].as_str().expect("label").to_string());
        let c = rusqlite::Connection::open(&env.db).expect("open");
        c.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
            .expect("write");
    }
    let info = env.dr(&["info", "app", "--json"]).ok().json();
    let kept: Vec<&str> = info["policies"][0]["targets"][0]["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| b["label"].as_str().expect("label"))
        .collect();
    // Fulls 2 and 3 remain; full 1 went with its diffs; only the newest diff is kept.
    assert_eq!(
        kept,
        vec![labels[3].as_str(), labels[4].as_str(), labels[5].as_str()]
    );

    // An interrupted backup (data, no manifest) is invisible, then expired after the grace.
    let ghost = env.path("backups/app/backup/20200101-000000F");
    std::fs::create_dir_all(&ghost).expect("mkdir");
    std::fs::write(ghost.join("data.zst.age"), b"partial").expect("write");
    let info = env.dr(&["info", "--json"]).ok().json();
    assert_eq!(
        info["policies"][0]["targets"][0]["incomplete"][0],
        "20200101-000000F"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let dry = env.dr(&["expire", "app", "--dry-run"]).ok();
    assert!(
        dry.stdout.contains("would remove app 20200101-000000F"),
        "{}",
        dry.stdout
    );
    assert!(ghost.exists(), "dry run removes nothing");
    env.dr(&["expire", "app"]).ok();
    assert!(!ghost.exists());
    env.restore("r.db", &[]).ok();
    let restored = dump(&env.path("r.db"));
    let source = dump(&env.db);
    assert_eq!(
        restored.len() + 1,
        source.len(),
        "newest backup lacks only the last write"
    );
    assert_eq!(restored[..], source[..restored.len()]);
}

#[test]
fn info_json_follows_the_documented_schema() {
    let env = Env::new("");
    make_db(&env.db, true, 100, 100);
    env.dr(&["backup-local", "app"]).ok();
    env.dr(&["backup-local", "app", "--type", "diff"]).ok();
    let info = env.dr(&["info", "--json"]).ok().json();
    let p = &info["policies"][0];
    assert_eq!(p["name"], "app");
    assert_eq!(p["source"]["kind"], "sqlite");
    let t = &p["targets"][0];
    assert_eq!(t["name"], "local");
    assert_eq!(t["kind"], "local");
    let b = t["backups"].as_array().expect("backups");
    assert_eq!(b.len(), 2);
    assert_eq!(b[0]["type"], "full");
    assert!(b[0]["parent"].is_null());
    assert_eq!(b[1]["type"], "diff");
    assert_eq!(b[1]["parent"], b[0]["label"]);
    for x in b {
        for k in ["timestamp_start", "timestamp_stop"] {
            let s = x[k].as_str().expect("timestamp");
            assert!(
                chrono::DateTime::parse_from_rfc3339(s).is_ok() && s.ends_with('Z'),
                "{s}"
            );
        }
        assert!(x["size"].as_u64().expect("size") > 0);
        assert!(x["stored_size"].as_u64().expect("stored") > 0);
    }
    let text = env.dr(&["info"]).ok().stdout;
    assert!(
        text.contains("└ "),
        "diffs are shown under their full:\n{text}"
    );
    let cfg = std::fs::read_to_string(env.path("backup.key")).expect("key");
    let secret = cfg
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY"))
        .expect("secret");
    assert!(!text.contains(secret));
}

#[test]
fn verify_passes_and_fails_with_exit_code_three() {
    let env = Env::new("");
    make_db(&env.db, true, 300, 300);
    env.dr(&["backup-local", "app"]).ok();
    let key = env.key_arg();
    let v = env.dr(&["verify", "app", "--identity", &key]).ok();
    assert!(v.stdout.starts_with("ok"), "{}", v.stdout);
    // Damage the page index, which a restore does not read but verify does.
    let label = env.dr(&["info", "--json"]).ok().json()["policies"][0]["targets"][0]["backups"][0]
        ["label"]
        .as_str()
        .expect("label")
        .to_string();
    let idx = env.path(&format!("backups/app/backup/{label}/pages.zst.age"));
    let mut bytes = std::fs::read(&idx).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&idx, bytes).expect("write");
    let v = env.dr(&["verify", "app", "--identity", &key]);
    assert_eq!(v.code, 3, "{}\n{}", v.stdout, v.stderr);
    assert!(
        v.stdout.contains("FAIL") && v.stdout.contains("pages.zst.age"),
        "{}",
        v.stdout
    );
}

#[test]
fn backups_open_with_the_age_and_zstd_tools() {
    let env = Env::new("");
    make_db(&env.db, true, 50, 100);
    env.dr(&["backup-local", "app"]).ok();
    let data = env
        .objects()
        .into_iter()
        .find(|k| k.ends_with("data.zst.age"))
        .expect("data object");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "age -d -i '{}' '{}' | zstd -d -c | head -c 8",
            env.key.display(),
            env.path(&format!("backups/{data}")).display()
        ))
        .output()
        .expect("age (scripts/install-test-deps installs it)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "DRPAGES1",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_age_keygen_identity_restores() {
    let env = Env::new("");
    let key = env.path("age-keygen.key");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&key)
        .output()
        .expect("age-keygen");
    assert!(out.status.success());
    let text = std::fs::read_to_string(&key).expect("key");
    let recipient = text
        .lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .expect("public key line");
    std::fs::write(env.path("backup.pub"), format!("{recipient}\n")).expect("pub");
    make_db(&env.db, true, 50, 100);
    env.dr(&["backup-local", "app"]).ok();
    let to = env.path("r.db").display().to_string();
    let k = key.display().to_string();
    env.dr(&["restore-local", "app", "--to", &to, "--identity", &k])
        .ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
}

#[test]
fn one_writer_per_policy_and_stale_locks_recover() {
    let env = Env::new("");
    make_db(&env.db, true, 50, 100);
    std::fs::create_dir_all(env.path("state/locks")).expect("mkdir");
    let lock = env.path("state/locks/app.local.lock");
    std::fs::write(
        &lock,
        "pid 999999 on elsewhere, backup since 2026-01-01T00:00:00Z",
    )
    .expect("stale");
    // A lock file left by a dead process is not held: the backup proceeds.
    env.dr(&["backup-local", "app"]).ok();
    // A held lock refuses the second writer and names the holder.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lock)
        .expect("open");
    f.lock().expect("flock");
    std::fs::write(
        &lock,
        "pid 4242 on testhost, backup since 2026-11-22T00:00:00Z",
    )
    .expect("holder");
    let r = env.dr(&["backup-local", "app"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("pid 4242 on testhost"), "{}", r.stderr);
    f.unlock().expect("unlock");
    env.dr(&["backup-local", "app"]).ok();
}

#[test]
fn demo_runs_from_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(common::dr_bin())
        .args(["demo", "--dir"])
        .arg(dir.path().join("demo"))
        .output()
        .expect("demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("integrity_check ok") && stdout.contains("└ "),
        "{stdout}"
    );
}

#[test]
fn a_diff_works_from_a_new_host_with_a_key_and_falls_back_to_full_without() {
    let env = Env::new("");
    make_db(&env.db, true, 500, 300);
    env.dr(&["backup-local", "app"]).ok();
    std::fs::remove_dir_all(env.path("state/cache")).expect("forget the cache");
    // A new host that has the identity reads the page index from the target.
    let cfg = std::fs::read_to_string(env.config()).expect("cfg");
    let with_identity = cfg.replace(
        "[encryption]\n",
        &format!("[encryption]\nidentity_file = \"{}\"\n", env.key.display()),
    );
    std::fs::write(env.config(), &with_identity).expect("write");
    {
        let c = rusqlite::Connection::open(&env.db).expect("open");
        c.execute("UPDATE t SET v = randomblob(300) WHERE id = 7", [])
            .expect("update");
    }
    let d = env.dr(&["backup-local", "app", "--json"]).ok().json();
    assert_eq!(d[0]["type"], "diff");
    assert!(d[0]["pages_stored"].as_u64().expect("n") < 5);
    // Without cache and without a key, a diff cannot be computed: a full, said out loud.
    std::fs::remove_dir_all(env.path("state/cache")).expect("forget the cache");
    std::fs::write(env.config(), &cfg).expect("write");
    let f = env.dr(&["backup-local", "app", "--json"]).ok().json();
    assert_eq!(f[0]["type"], "full");
    assert!(
        f[0]["note"]
            .as_str()
            .expect("note")
            .contains("not cached on this host")
    );
    env.restore("r.db", &[]).ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
}

#[test]
fn a_backup_killed_mid_write_never_looks_complete_and_is_cleaned_up() {
    let env = Env::new("[retention]\nincomplete_grace = \"1s\"\n");
    make_db(&env.db, true, 60_000, 2000); // ~120 MiB: long enough to catch mid-write
    let mut child = common::Proc::spawn(
        Command::new(common::dr_bin())
            .arg("--config")
            .arg(env.config())
            .args(["backup-local", "app"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // The data object being written (not the lease's own temporary).
        if env
            .objects()
            .iter()
            .any(|k| k.contains("/backup/") && k.contains(".dr-tmp."))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never saw the backup writing"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "backup finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    // Nothing restorable: the database is at risk, and info says so (exit 1).
    let r = env.dr(&["info", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let info = r.json();
    assert_eq!(
        info["policies"][0]["verdict"]["reasons"][0]["reason"],
        "never_backed_up"
    );
    let t = &info["policies"][0]["targets"][0];
    assert_eq!(
        t["backups"].as_array().map(|a| a.len()),
        Some(0),
        "no backup appears complete"
    );
    assert_eq!(t["incomplete"].as_array().map(|a| a.len()), Some(1));
    let r = env.restore("r.db", &[]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    std::thread::sleep(Duration::from_millis(1100));
    let next = env.dr(&["backup-local", "app", "--json"]).ok().json();
    assert_eq!(next[0]["type"], "full");
    assert_eq!(
        next[0]["expired"].as_array().map(|a| a.len()),
        Some(1),
        "the interrupted backup is expired"
    );
    assert!(
        env.objects().iter().all(|k| !k.contains(".dr-tmp.")),
        "{:?}",
        env.objects()
    );
    env.restore("r.db", &[]).ok();
}

#[test]
fn verify_reports_a_policy_without_backups_as_a_failure_and_goes_on() {
    let env = Env::new("");
    make_db(&env.db, true, 50, 100);
    env.write_policy("other", "other.db", "");
    make_db(&env.path("other.db"), true, 50, 100);
    env.dr(&["backup-local", "other"]).ok();
    let key = env.key_arg();
    let v = env.dr(&["verify", "--identity", &key]);
    assert_eq!(v.code, 3, "{}\n{}", v.stdout, v.stderr);
    assert!(
        v.stdout.contains("FAIL  app on local") && v.stdout.contains("no committed backup"),
        "{}",
        v.stdout
    );
    assert!(v.stdout.contains("ok    other on local"), "{}", v.stdout);
}

#[test]
fn a_broken_first_target_does_not_stop_the_second_and_json_lists_both() {
    let env = Env::new("");
    make_db(&env.db, true, 200, 100);
    // A target whose path runs through a regular file can never be written.
    std::fs::write(env.path("blocker"), b"not a directory").expect("blocker");
    let mut cfg = std::fs::read_to_string(env.config()).expect("dr.toml");
    cfg.push_str("[targets.broken]\nkind = \"local\"\npath = \"blocker/backups\"\n");
    std::fs::write(env.config(), cfg).expect("dr.toml");
    std::fs::write(
        env.path("policies/app.toml"),
        "name = \"app\"\ntargets = [\"broken\", \"local\"]\n[source]\nkind = \"sqlite\"\npath = \"app.db\"\n",
    )
    .expect("policy");

    let r = env.dr(&["backup-local", "app", "--json"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let items = r.json();
    let items = items.as_array().expect("array");
    assert_eq!(items.len(), 2, "both targets are listed: {items:?}");
    let failed = items
        .iter()
        .find(|i| i["target"] == "broken")
        .expect("broken listed");
    assert_eq!(failed["ok"], false);
    assert_eq!(failed["policy"], "app");
    assert_eq!(failed["exit_code"], 1);
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("broken")),
        "{failed}"
    );
    let done = items
        .iter()
        .find(|i| i["target"] == "local")
        .expect("local listed");
    assert_eq!(done["type"], "full", "{done}");

    // The second target really has the backup, and it restores.
    let info = env.dr(&["info", "--json", "--target", "local"]).ok().json();
    assert_eq!(
        info["policies"][0]["targets"][0]["backups"][0]["label"],
        done["label"]
    );
    env.restore("r.db", &["--target", "local"]).ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));

    // Verify goes on past the broken target too, and says which failed.
    let v = env.dr(&["verify", "app", "--identity", &env.key_arg(), "--json"]);
    assert_eq!(v.code, 1, "an unusable target is exit 1: {}", v.stderr);
    let items = v.json();
    let items = items.as_array().expect("array");
    assert!(
        items
            .iter()
            .any(|i| i["target"] == "local" && i["ok"] == true),
        "{items:?}"
    );
    assert!(
        items
            .iter()
            .any(|i| i["target"] == "broken" && i["ok"] == false && i["exit_code"].is_number()),
        "{items:?}"
    );
}
