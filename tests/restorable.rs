//! "ok" means restorable: each test is one way an earlier dr lost good
//! backups or said ok for one that could not be restored, run through the
//! real binary against a real local target.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, dump, make_db};

fn labels(env: &Env) -> Vec<String> {
    common::labels_in(&env.dr(&["info", "--json"]).json())
}

fn backup_json(env: &Env, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["backup-local", "app", "--json"];
    args.extend_from_slice(extra);
    env.dr(&args).ok().json()[0].clone()
}

fn touch_rows(env: &Env, n: i64) {
    let c = rusqlite::Connection::open(&env.db).expect("open");
    c.execute("UPDATE t SET v = randomblob(length(v)) WHERE id <= ?1", [n])
        .expect("update");
}

/// A newer full directory beside `full`: a copy of it under a later label
/// whose manifest `edit` damages (bit rot, or a newer dr's format).
fn fake_newer_full(env: &Env, full: &str, edit: impl Fn(String, &str) -> String) -> String {
    let later = chrono::Utc::now() + chrono::Duration::seconds(1);
    let fake = format!("{}F", later.format("%Y%m%d-%H%M%S"));
    let src = env.path(&format!("backups/app/backup/{full}"));
    let dst = env.path(&format!("backups/app/backup/{fake}"));
    std::fs::create_dir_all(&dst).expect("mkdir");
    for f in ["data.zst.age", "pages.zst.age", "manifest.json"] {
        std::fs::copy(src.join(f), dst.join(f)).expect("copy");
    }
    let text = std::fs::read_to_string(dst.join("manifest.json")).expect("read");
    std::fs::write(dst.join("manifest.json"), edit(text, &fake)).expect("write");
    std::thread::sleep(Duration::from_millis(2100));
    fake
}

/// A bad newer full (`edit` makes it so) never costs the good chain;
/// `info` exits `info_code` naming it (3: damage; 8: a newer dr's).
fn damaged_newer_full_keeps_the_good_chain(info_code: i32, edit: impl Fn(String, &str) -> String) {
    let env = Env::new("[retention]\nfull = 1\ndiff = 1\n");
    make_db(&env.db, true, 300, 400);
    let full = backup_json(&env, &["--type", "full"]);
    let full_label = full["label"].as_str().expect("label").to_string();
    touch_rows(&env, 10);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(backup_json(&env, &[])["type"], "diff");
    let fake = fake_newer_full(&env, &full_label, edit);
    touch_rows(&env, 10);
    let d2 = backup_json(&env, &[]);
    assert_eq!(d2["type"], "diff", "{d2}");
    assert_eq!(d2["parent"].as_str(), Some(full_label.as_str()));
    let all = labels(&env);
    assert!(all.contains(&full_label), "the good full stays: {all:?}");
    assert!(all.contains(&fake), "the damaged one is kept for the user");
    assert_eq!(all.len(), 3, "full, newest diff, damaged: {all:?}");
    let r = env.restore("r.db", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
    // info and expire name it; expire leaves it.
    let info = env.dr(&["info"]);
    assert_eq!(info.code, info_code, "{}", info.stderr);
    assert!(info.stderr.contains(&fake), "{}", info.stderr);
    let exp = env.dr(&["expire", "app", "--json"]).ok();
    assert!(!exp.stdout.contains(&fake), "{}", exp.stdout);
    assert!(labels(&env).contains(&fake));
}

#[test]
fn a_newer_full_with_a_rotten_manifest_never_costs_the_good_chain() {
    damaged_newer_full_keeps_the_good_chain(3, |t, _| {
        t.replacen("\"page_count\": ", "\"page_count\": 9", 1)
    });
}

#[test]
fn a_newer_full_from_a_newer_dr_never_costs_the_good_chain() {
    // A valid envelope around format 3: re-hashed, so only the format
    // differs. Not damage: its own exit code, and the message says to
    // upgrade.
    damaged_newer_full_keeps_the_good_chain(8, |t, fake| {
        use sha2::Digest;
        let body_start = t[1..].find('{').expect("body") + 1;
        let body_end = t.rfind(",\n\"sha256\"").expect("sum");
        let old = t[body_start..]
            .split("\"label\": \"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("label")
            .to_string();
        let body = t[body_start..body_end]
            .replace("\"format\": 2", "\"format\": 3")
            .replace(&old, fake);
        let sum = hex::encode(sha2::Sha256::digest(body.as_bytes()));
        format!("{{\"manifest\": {body},\n\"sha256\": \"{sum}\"}}\n")
    });
}

#[test]
fn a_backup_only_a_newer_dr_reads_says_so_in_info_json_and_restore() {
    let env = Env::new("");
    make_db(&env.db, true, 50, 200);
    let full = env.full_backup("backup-local");
    let newer = fake_newer_full(&env, &full, |t, fake| {
        use sha2::Digest;
        let body_start = t[1..].find('{').expect("body") + 1;
        let body_end = t.rfind(",\n\"sha256\"").expect("sum");
        let body = t[body_start..body_end]
            .replace("\"format\": 2", "\"format\": 3")
            .replace(&full, fake);
        let sum = hex::encode(sha2::Sha256::digest(body.as_bytes()));
        format!("{{\"manifest\": {body},\n\"sha256\": \"{sum}\"}}\n")
    });
    let r = env.dr(&["info", "--json"]);
    assert_eq!(r.code, 8, "{}", r.stderr);
    let j = r.json();
    let b = j["policies"][0]["targets"][0]["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .find(|b| b["label"] == newer.as_str())
        .cloned()
        .expect("listed");
    assert_eq!(b["newer_format"], true, "{b}");
    assert!(
        b["error"]
            .as_str()
            .is_some_and(|e| e.contains("format 3") && e.contains("upgrade dr")),
        "{b}"
    );
    assert!(
        j["policies"][0]["verdict"]["reasons"]
            .as_array()
            .expect("reasons")
            .iter()
            .any(|r| r["reason"] == "newer_format"),
        "{j}"
    );
    // Asked for by name, the restore says the same, with its own code.
    let r = env.restore("n.db", &["--backup", &newer]);
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert!(r.stderr.contains("upgrade dr"), "{}", r.stderr);
}

#[test]
fn a_page_size_change_makes_the_next_backup_a_full_that_says_why() {
    let env = Env::new("");
    make_db(&env.db, false, 300, 400);
    backup_json(&env, &["--type", "full"]);
    {
        let c = rusqlite::Connection::open(&env.db).expect("open");
        c.execute_batch("PRAGMA page_size=8192; VACUUM;")
            .expect("vacuum");
        let ps: i64 = c
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .expect("ps");
        assert_eq!(ps, 8192);
    }
    std::thread::sleep(Duration::from_millis(1100));
    let b = backup_json(&env, &[]);
    assert_eq!(b["type"], "full", "{b}");
    assert!(
        b["note"].as_str().unwrap_or_default().contains("page size"),
        "{b}"
    );
    env.dr(&["verify", "app", "--identity", &env.key_arg()])
        .ok();
    env.restore("r.db", &[]).ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
}

#[test]
fn changed_keys_start_a_new_chain_and_weak_passphrases_are_refused() {
    let env = Env::new("");
    make_db(&env.db, true, 300, 400);
    backup_json(&env, &["--type", "full"]);
    // Recipients -> passphrase between a full and its diffs.
    let pass = env.path("pass");
    env.use_passphrase(&pass, "first long passphrase\n", 0o600);
    std::thread::sleep(Duration::from_millis(1100));
    touch_rows(&env, 10);
    let b = backup_json(&env, &[]);
    assert_eq!(b["type"], "full", "{b}");
    assert!(
        b["note"].as_str().unwrap_or_default().contains("keys"),
        "{b}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    touch_rows(&env, 10);
    assert_eq!(backup_json(&env, &[])["type"], "diff");
    // Another passphrase: again a full, never a diff the new secret cannot open.
    std::fs::write(&pass, "second long passphrase\n").expect("pass");
    std::thread::sleep(Duration::from_millis(1100));
    touch_rows(&env, 10);
    let b = backup_json(&env, &[]);
    assert_eq!(b["type"], "full", "{b}");
    let to = env.path("r.db").display().to_string();
    env.dr(&["restore-local", "app", "--to", &to]).ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
    // One character, or only white space, is refused before anything is written.
    for weak in ["x\n", "   \t  \n"] {
        std::fs::write(&pass, weak).expect("pass");
        let before = common::files_under(&env.path("backups"));
        let r = env.dr(&["backup-local", "app"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("at least 12"), "{}", r.stderr);
        assert_eq!(common::files_under(&env.path("backups")), before);
    }
}

#[test]
fn a_backup_dated_in_the_future_is_refused_at_once_not_waited_for() {
    let env = Env::new("");
    make_db(&env.db, true, 100, 200);
    let full = backup_json(&env, &["--type", "full"]);
    let label = full["label"].as_str().expect("label").to_string();
    // An interrupted backup from a fast clock (no manifest) does not get in the way.
    let ahead = env.path("backups/app/backup/99991231-235959F");
    std::fs::create_dir_all(&ahead).expect("mkdir");
    std::fs::write(ahead.join("data.zst.age"), b"partial").expect("write");
    std::thread::sleep(Duration::from_millis(1100));
    backup_json(&env, &[]);
    std::fs::remove_dir_all(&ahead).expect("rm");
    // A committed one (another host's clock 20 s fast, and the far future).
    for when in [
        (chrono::Utc::now() + chrono::Duration::seconds(20))
            .format("%Y%m%d-%H%M%S")
            .to_string(),
        "99991231-235959".to_string(),
    ] {
        let fake = format!("{when}F");
        let dst = env.path(&format!("backups/app/backup/{fake}"));
        std::fs::create_dir_all(&dst).expect("mkdir");
        let src = env.path(&format!("backups/app/backup/{label}/manifest.json"));
        std::fs::copy(src, dst.join("manifest.json")).expect("copy");
        let started = Instant::now();
        let r = env.dr(&["backup-local", "app"]);
        assert!(started.elapsed() < Duration::from_secs(10), "it waited");
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(
            r.stderr.contains(&fake) && r.stderr.contains("ahead of this host's clock"),
            "{}",
            r.stderr
        );
        std::fs::remove_dir_all(&dst).expect("rm");
    }
    // The lock was released: the next backup runs.
    backup_json(&env, &[]);
}

#[test]
fn retention_diff_zero_and_other_settings_that_lose_data_are_config_errors() {
    let env = Env::new("[retention]\ndiff = 0\n");
    let r = env.dr(&["config", "validate"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("retention.diff must be at least 1"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("app.toml:"),
        "names file and line: {}",
        r.stderr
    );
    env.write_policy(
        "app",
        "app.db",
        "[retention]\nincomplete_grace = \"600000000y\"\n",
    );
    let r = env.dr(&["config", "validate"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("incomplete_grace"), "{}", r.stderr);
    env.write_policy(
        "app",
        "app.db",
        "[retention]
keep_weekly = 0
",
    );
    let r = env.dr(&["config", "validate"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("retention.keep_weekly must be at least 1"),
        "{}",
        r.stderr
    );
    env.write_policy("app", "app.db", "[schedule]\nfull = \"0 0 31 2 *\"\n");
    let r = env.dr(&["config", "validate"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("never fires"), "{}", r.stderr);
    // A policy file that is a link to an endless device is refused, quickly.
    env.write_policy("app", "app.db", "");
    std::os::unix::fs::symlink("/dev/zero", env.path("policies/zero.toml")).expect("link");
    let started = Instant::now();
    let r = env.dr(&["config", "validate"]);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("zero.toml"), "{}", r.stderr);
}

#[test]
fn two_dr_processes_with_different_state_dirs_never_share_a_local_target() {
    let env = Env::new("");
    // Large enough that a backup lasts a while: the two runs of a pair overlap.
    make_db(&env.db, true, 20_000, 1000);
    // A second config: same target and policies, its own state_dir.
    let text = std::fs::read_to_string(env.config()).expect("config");
    let other = env.path("other.toml");
    std::fs::write(
        &other,
        text.replace("state_dir = \"state\"", "state_dir = \"state2\""),
    )
    .expect("other");
    let mut ok = 0;
    let mut refused = 0;
    for _ in 0..8 {
        let spawn = |cfg: &std::path::Path| {
            common::Proc::spawn(
                Command::new(common::dr_bin())
                    .arg("--config")
                    .arg(cfg)
                    .args(["backup-local", "app", "--type", "full"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped()),
            )
            .expect("dr")
        };
        let a = spawn(&env.config());
        let b = spawn(&other);
        for out in [
            a.wait_with_output().expect("a"),
            b.wait_with_output().expect("b"),
        ] {
            let code = out.status.code().unwrap_or(-1);
            let err = String::from_utf8_lossy(&out.stderr);
            match code {
                0 => ok += 1,
                4 => {
                    assert!(err.contains("leased by"), "{err}");
                    refused += 1;
                }
                _ => panic!("exit {code}: {err}"),
            }
        }
        std::thread::sleep(Duration::from_millis(1100));
    }
    // Every success is a distinct, intact backup: info finds no damage.
    let r = env.dr(&["info", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let n = r.json()["policies"][0]["targets"][0]["backups"]
        .as_array()
        .expect("backups")
        .len();
    assert_eq!(n, ok, "one committed backup per successful run");
    assert!(ok >= 8, "at least one of each pair gets through");
    // Exclusion shown, not assumed: runs started together were refused,
    // and no two committed backups were ever written at the same time.
    assert!(
        refused >= 1,
        "no run was ever refused: the lease was never tested"
    );
    let j = r.json();
    let mut spans: Vec<(String, String)> = j["policies"][0]["targets"][0]["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| {
            (
                b["timestamp_start"].as_str().expect("start").to_string(),
                b["timestamp_stop"].as_str().expect("stop").to_string(),
            )
        })
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "two backups were written at once: {w:?}");
    }
}

#[test]
fn a_missing_object_is_damage_that_info_backup_and_restore_all_see() {
    let env = Env::new("");
    make_db(&env.db, true, 300, 400);
    let full = backup_json(&env, &["--type", "full"]);
    let label = full["label"].as_str().expect("label").to_string();
    std::fs::remove_file(env.path(&format!("backups/app/backup/{label}/data.zst.age")))
        .expect("rm");
    let r = env.dr(&["info", "--json"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let b = &r.json()["policies"][0]["targets"][0]["backups"][0];
    assert!(
        b["error"].as_str().unwrap_or_default().contains("missing"),
        "{b}"
    );
    // The next backup does not build a diff on it.
    std::thread::sleep(Duration::from_millis(1100));
    let next = backup_json(&env, &[]);
    assert_eq!(next["type"], "full", "{next}");
    let r = env.restore("r.db", &["--backup", &label]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("missing"), "{}", r.stderr);
    assert!(!env.path("r.db").exists());
    env.restore("r.db", &[]).ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
    // When the newest backup is the damaged one, "newest" is refused and
    // the message names the newest backup that restores.
    let newest = next["label"].as_str().expect("label").to_string();
    std::fs::remove_file(env.path(&format!("backups/app/backup/{newest}/pages.zst.age")))
        .expect("rm");
    let r = env.restore("r2.db", &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("no backup on this target can be restored"),
        "{}",
        r.stderr
    );
    std::thread::sleep(Duration::from_millis(1100));
    let good = backup_json(&env, &[])["label"]
        .as_str()
        .expect("l")
        .to_string();
    std::thread::sleep(Duration::from_millis(1100));
    touch_rows(&env, 5);
    let bad = backup_json(&env, &["--type", "full"])["label"]
        .as_str()
        .expect("l")
        .to_string();
    std::fs::remove_file(env.path(&format!("backups/app/backup/{bad}/data.zst.age"))).expect("rm");
    let r = env.restore("r3.db", &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("restore it with --backup {good}")),
        "{}",
        r.stderr
    );
    env.restore("r3.db", &["--backup", &good]).ok();
}

#[test]
fn an_orphan_diff_left_by_an_interrupted_expire_is_expired() {
    let env = Env::new("");
    make_db(&env.db, true, 200, 300);
    let f1 = backup_json(&env, &["--type", "full"]);
    touch_rows(&env, 5);
    std::thread::sleep(Duration::from_millis(1100));
    let d1 = backup_json(&env, &[]);
    std::thread::sleep(Duration::from_millis(1100));
    backup_json(&env, &["--type", "full"]);
    // An expire that died after removing the full and before its diff.
    std::fs::remove_dir_all(env.path(&format!(
        "backups/app/backup/{}",
        f1["label"].as_str().expect("l")
    )))
    .expect("rm");
    let r = env.dr(&["expire", "app", "--json"]).ok();
    assert!(
        r.stdout.contains(d1["label"].as_str().expect("l")),
        "{}",
        r.stdout
    );
    assert_eq!(env.dr(&["info"]).code, 0);
}

/// Starts a restore or verify and kills it with SIGKILL once its plaintext
/// temporary exists in `dir` (a name starting with `prefix`).
fn kill_once_temp_exists(env: &Env, args: &[&str], dir: &std::path::Path, prefix: &str) {
    let mut child = common::Proc::spawn(
        Command::new(common::dr_bin())
            .arg("--config")
            .arg(env.config())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("dr");
    let deadline = Instant::now() + Duration::from_secs(30);
    let found = loop {
        let has = std::fs::read_dir(dir).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
        });
        if has || Instant::now() > deadline {
            break has;
        }
        if child.try_wait().expect("wait").is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        found,
        "no temporary {prefix}* appeared in {}",
        dir.display()
    );
}

fn temps(dir: &std::path::Path, prefix: &str) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .count()
    })
}

#[test]
fn plaintext_left_by_a_killed_restore_or_verify_is_removed_by_the_next_run() {
    let env = Env::new("");
    make_db(&env.db, true, 40_000, 1000);
    backup_json(&env, &["--type", "full"]);
    let out = env.path("out");
    std::fs::create_dir_all(&out).expect("out");
    let to = out.join("r.db").display().to_string();
    let key = env.key_arg();
    kill_once_temp_exists(
        &env,
        &["restore-local", "app", "--to", &to, "--identity", &key],
        &out,
        ".r.db.dr-restore.",
    );
    assert_eq!(
        temps(&out, ".r.db.dr-restore."),
        1,
        "the kill left plaintext"
    );
    env.dr(&["restore-local", "app", "--to", &to, "--identity", &key])
        .ok();
    assert_eq!(temps(&out, ".r.db.dr-restore."), 0);
    let scratch = env.path("state/tmp");
    kill_once_temp_exists(
        &env,
        &["verify", "app", "--identity", &key],
        &scratch,
        "verify.",
    );
    assert_eq!(temps(&scratch, "verify."), 1, "the kill left plaintext");
    env.dr(&["verify", "app", "--identity", &key]).ok();
    assert_eq!(temps(&scratch, "verify."), 0);
}

#[test]
fn restore_force_never_replaces_devices_links_or_a_database_in_use_and_keeps_owner_and_mode() {
    let env = Env::new("");
    make_db(&env.db, true, 100, 200);
    backup_json(&env, &["--type", "full"]);
    // A FIFO (a device would be the same): refused, left as it is.
    let fifo = env.path("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success()
    );
    let r = env.restore("fifo", &["--force"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("not a regular file"), "{}", r.stderr);
    assert!(
        std::fs::symlink_metadata(&fifo)
            .expect("meta")
            .file_type()
            .is_fifo()
    );
    let r = env.dr(&[
        "restore-local",
        "app",
        "--to",
        "/dev/null",
        "--force",
        "--identity",
        &env.key_arg(),
    ]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        std::fs::metadata("/dev/null")
            .expect("null")
            .file_type()
            .is_char_device()
    );
    // A dangling link counts as existing, and a link is never followed.
    let link = env.path("link.db");
    std::os::unix::fs::symlink(env.path("nowhere.db"), &link).expect("link");
    let r = env.restore("link.db", &[]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    let r = env.restore("link.db", &["--force"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
    assert!(!env.path("nowhere.db").exists());
    // Owner and mode of the replaced database are kept.
    let owned = env.path("owned.db");
    std::fs::write(&owned, b"old").expect("write");
    let nobody = 65534;
    std::os::unix::fs::chown(&owned, Some(nobody), Some(nobody)).expect("chown");
    std::fs::set_permissions(&owned, std::fs::Permissions::from_mode(0o664)).expect("chmod");
    env.restore("owned.db", &["--force"]).ok();
    let m = std::fs::metadata(&owned).expect("meta");
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (nobody, nobody, 0o664)
    );
    assert_eq!(dump(&owned), dump(&env.db));
    // A database another process has open is not replaced under it.
    let holder = common::Proc::spawn(
Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1]); c.execute('select count(*) from t').fetchall(); print('ready', flush=True); time.sleep(60)")
        .arg(&owned)
        .stdout(Stdio::piped())
        ,
)
        .expect("python3");
    let mut holder = holder;
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(holder.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready");
    let before = common::sha256_file(&owned);
    let r = env.restore("owned.db", &["--force"]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("pid {}", holder.id())),
        "{}",
        r.stderr
    );
    assert_eq!(common::sha256_file(&owned), before);
}

#[test]
fn the_page_index_cache_is_private() {
    let env = Env::new("");
    make_db(&env.db, true, 100, 200);
    backup_json(&env, &["--type", "full"]);
    let cache = env.path("state/cache/local/app");
    let files: Vec<_> = std::fs::read_dir(&cache)
        .expect("cache")
        .flatten()
        .collect();
    assert!(!files.is_empty());
    for f in files {
        let mode = f.metadata().expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.path().display());
    }
}

#[test]
fn a_locked_source_is_waited_for_out_loud() {
    let env = Env::new("");
    make_db(&env.db, false, 100, 200);
    let mut holder = common::Proc::spawn(
Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(2.5); c.execute('COMMIT')")
        .arg(&env.db)
        .stdout(Stdio::piped())
        ,
)
        .expect("python3");
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(holder.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("locked");
    let r = env.dr(&["backup-local", "app"]);
    let _ = holder.wait();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("locked by another connection"),
        "the wait is said: {}",
        r.stderr
    );
}

/// Calendar retention on a real repository: one real full backup, cloned
/// under labels spread over five weeks (its manifest rewritten to say so),
/// then `keep_daily = 3` and `keep_weekly = 3`: `expire --dry-run` names
/// the rule that keeps each backup, `expire` removes exactly the others,
/// and the oldest backup kept still restores exactly.
#[test]
fn calendar_retention_keeps_the_newest_of_each_day_and_week_and_says_which_rule() {
    let env = Env::new("[retention]\nkeep_daily = 3\nkeep_weekly = 3\n");
    make_db(&env.db, false, 50, 200);
    env.dr(&["backup-local", "app", "--type", "full"]).ok();
    let root = env.path("backups/app/backup");
    let real = std::fs::read_dir(&root)
        .expect("backups")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .expect("one backup");
    let manifest =
        std::fs::read_to_string(root.join(&real).join("manifest.json")).expect("manifest");
    // Days of November and December 2026 (UTC), newest last; each listed
    // Monday starts an ISO week (2 Nov: week 45 … 30 Nov: week 49), and 27
    // Nov is the Friday of week 48.
    let at = [
        (11, 2, 1),
        (11, 9, 1),
        (11, 16, 1),
        (11, 23, 1),
        (11, 27, 1),
        (11, 30, 1),
        (12, 2, 1),
        (12, 2, 13),
        (12, 3, 1),
        (12, 4, 1),
        (12, 4, 13),
    ];
    let mut labels = Vec::new();
    for (m, d, h) in at {
        let label = format!("2026{m:02}{d:02}-{h:02}0000F");
        let ts = format!("2026-{m:02}-{d:02}T{h:02}:00:00Z");
        let dir = root.join(&label);
        std::fs::create_dir_all(&dir).expect("dir");
        for e in std::fs::read_dir(root.join(&real))
            .expect("objects")
            .flatten()
        {
            if e.file_name() != "manifest.json" {
                std::fs::copy(e.path(), dir.join(e.file_name())).expect("copy");
            }
        }
        // The manifest's envelope: the body, and the SHA-256 of its text.
        let v: serde_json::Value = serde_json::from_str(&manifest).expect("json");
        let mut body = v["manifest"].clone();
        body["label"] = label.clone().into();
        body["timestamp_start"] = ts.clone().into();
        body["timestamp_stop"] = ts.into();
        let text = body.to_string();
        let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()));
        std::fs::write(
            dir.join("manifest.json"),
            format!("{{\"manifest\": {text},\n\"sha256\": \"{sum}\"}}\n"),
        )
        .expect("manifest");
        labels.push(label);
    }
    // The real backup is the newest (taken today): gone with it, the
    // clones are the whole history.
    std::fs::remove_dir_all(root.join(&real)).expect("rm real");
    let r = env.dr(&["expire", "app", "--dry-run", "--json"]).ok();
    let items = r.json();
    let rows = items.as_array().expect("array");
    let kept: std::collections::BTreeMap<String, String> = rows
        .iter()
        .filter(|e| e["kept"] == true)
        .map(|e| {
            (
                e["label"].as_str().unwrap_or_default().to_string(),
                e["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let removed: Vec<String> = rows
        .iter()
        .filter(|e| e["kept"] != true)
        .map(|e| e["label"].as_str().unwrap_or_default().to_string())
        .collect();
    // Days: 4 Dec (13:00), 3 Dec, 2 Dec (13:00). Weeks: 49 (4 Dec 13:00),
    // 48 (27 Nov, newer than 23 Nov), 47 (16 Nov).
    let want_kept = [&labels[2], &labels[4], &labels[7], &labels[8], &labels[10]];
    assert_eq!(
        kept.keys().collect::<Vec<_>>(),
        want_kept.to_vec(),
        "{items:#}"
    );
    assert!(
        kept[&labels[10]].contains("keep_daily = 3: the newest of 2026-12-04"),
        "{}",
        kept[&labels[10]]
    );
    assert!(kept[&labels[10]].contains("keep_weekly = 3: the newest of 2026-W49"));
    assert!(kept[&labels[10]].contains("the newest restorable backup"));
    assert_eq!(kept[&labels[2]], "keep_weekly = 3: the newest of 2026-W47");
    assert_eq!(removed.len(), labels.len() - want_kept.len(), "{items:#}");
    let text = env.dr(&["expire", "app", "--dry-run"]).ok().stdout;
    assert!(
        text.contains(&format!(
            "keeps app {} on local: keep_weekly = 3",
            labels[4]
        )),
        "{text}"
    );

    env.dr(&["expire", "app"]).ok();
    let mut left: Vec<String> = std::fs::read_dir(&root)
        .expect("backups")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        want_kept.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    );
    let to = env.path("oldest.db").display().to_string();
    env.dr(&[
        "restore-local",
        "app",
        "--backup",
        &labels[2],
        "--to",
        &to,
        "--identity",
        &env.key_arg(),
    ])
    .ok();
    assert_eq!(common::dump(&env.path("oldest.db")), common::dump(&env.db));
}
