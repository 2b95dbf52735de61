//! Bad input gets one clear message, a non-zero exit, and nothing is lost.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Env, Mount, dump, make_db, sha256_file};

fn first_label(env: &Env) -> String {
    env.dr(&["info", "--json"]).ok().json()["policies"][0]["targets"][0]["backups"][0]["label"]
        .as_str()
        .expect("label")
        .to_string()
}

#[test]
fn missing_database_file() {
    let env = Env::new("");
    let r = env.dr(&["backup-local", "app"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("app.db") && r.stderr.contains("does not exist"),
        "{}",
        r.stderr
    );
    assert!(
        env.objects().is_empty(),
        "nothing written: {:?}",
        env.objects()
    );
}

#[test]
fn a_file_that_is_not_sqlite() {
    let env = Env::new("");
    std::fs::write(
        &env.db,
        "hello, this is a text file and not a database at all",
    )
    .expect("write");
    let r = env.dr(&["backup-local", "app"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("is not a SQLite database"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"));
}

#[test]
fn config_errors_name_file_line_and_fix() {
    let env = Env::new("[schedule]\nfull = \"0 3 * *\"\n");
    std::fs::write(
        env.path("policies/other.toml"),
        "name = \"other\"\ntargets = [\"s4\"]\n[source]\nkind = \"sqlite\"\npath = \"x.db\"\nretension = 3\n",
    )
    .expect("write");
    let r = env.dr(&["config", "validate"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("3 problems"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("app.toml:7: cron expression '0 3 * *' has 4 fields"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("other.toml:2: policy 'other' names target 's4'"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("other.toml:6: unknown key 'source.retension'"),
        "{}",
        r.stderr
    );
    // Every command refuses a broken config the same way.
    assert_eq!(env.dr(&["backup-local", "app"]).code, 2);
    let ok = Env::new("");
    assert!(
        ok.dr(&["config", "validate"])
            .ok()
            .stdout
            .contains("ok (1 policy")
    );
}

#[test]
fn missing_or_open_secret_files() {
    let env = Env::new("");
    make_db(&env.db, true, 50, 100);
    env.dr(&["backup-local", "app"]).ok();
    let r = env.dr(&[
        "restore-local",
        "app",
        "--to",
        "/tmp/never.db",
        "--identity",
        "/nonexistent/key",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("/nonexistent/key") && r.stderr.contains("no such file"),
        "{}",
        r.stderr
    );
    std::fs::set_permissions(&env.key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let r = env.restore("r.db", &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("chmod 600"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("AGE-SECRET-KEY"),
        "secrets are never printed"
    );
    // A passphrase file that others can read is refused at backup time too.
    let pass = env.path("pass");
    env.use_passphrase(&pass, "correct horse\n", 0o640);
    let r = env.dr(&["backup-local", "app"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("chmod 600") && !r.stderr.contains("correct horse"),
        "{}",
        r.stderr
    );
    // With the mode fixed, passphrase mode round-trips.
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    env.dr(&["backup-local", "app", "--type", "full"]).ok();
    let to = env.path("p.db").display().to_string();
    env.dr(&["restore-local", "app", "--to", &to]).ok();
    assert_eq!(dump(&env.path("p.db")), dump(&env.db));
}

#[test]
fn wrong_identity_or_passphrase() {
    let env = Env::new("");
    make_db(&env.db, true, 50, 100);
    env.dr(&["backup-local", "app"]).ok();
    let other = env.path("other.key");
    std::process::Command::new(common::dr_bin())
        .args(["keygen", "--output"])
        .arg(&other)
        .output()
        .expect("keygen");
    let to = env.path("r.db").display().to_string();
    let o = other.display().to_string();
    let r = env.dr(&["restore-local", "app", "--to", &to, "--identity", &o]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("none of the identities"), "{}", r.stderr);
    assert!(!env.path("r.db").exists());
    let r = env.dr(&["restore-local", "app", "--to", &to]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--identity"), "{}", r.stderr);
}

#[test]
fn a_tampered_byte_in_any_object_is_refused_and_the_destination_is_untouched() {
    let env = Env::new("");
    make_db(&env.db, true, 400, 400);
    env.dr(&["backup-local", "app"]).ok();
    {
        let c = rusqlite::Connection::open(&env.db).expect("open");
        c.execute("UPDATE t SET v = randomblob(400) WHERE id < 20", [])
            .expect("update");
    }
    env.dr(&["backup-local", "app", "--type", "diff"]).ok();
    let good = env.path("good.db");
    make_db(&good, false, 5, 5);
    let good_hash = sha256_file(&good);
    let objects: Vec<String> = env
        .objects()
        .into_iter()
        .filter(|k| k.ends_with(".age"))
        .collect();
    assert_eq!(objects.len(), 3, "{objects:?}");
    for obj in objects {
        let path = env.path(&format!("backups/{obj}"));
        let original = std::fs::read(&path).expect("read");
        for pos in [0usize, original.len() / 2, original.len() - 1] {
            let mut bad = original.clone();
            bad[pos] ^= 0x01;
            std::fs::write(&path, &bad).expect("tamper");
            let key = env.key_arg();
            let out = if obj.ends_with("pages.zst.age") {
                env.dr(&["verify", "app", "--identity", &key])
            } else {
                env.restore("good.db", &["--force"])
            };
            assert_eq!(
                out.code, 3,
                "{obj} byte {pos}: {}\n{}",
                out.stdout, out.stderr
            );
            assert!(
                out.stderr.contains(&obj) || out.stdout.contains(&obj),
                "error names the object {obj}: {}{}",
                out.stdout,
                out.stderr
            );
            assert_eq!(sha256_file(&good), good_hash, "destination untouched");
        }
        std::fs::write(&path, &original).expect("restore original");
    }
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("dr-restore"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files removed");
    env.restore("good.db", &["--force"]).ok();
}

#[test]
fn a_manifest_whose_hash_does_not_match() {
    let env = Env::new("");
    make_db(&env.db, true, 50, 100);
    env.dr(&["backup-local", "app"]).ok();
    let label = first_label(&env);
    let m = env.path(&format!("backups/app/backup/{label}/manifest.json"));
    let text = std::fs::read_to_string(&m).expect("read");
    let edited = text.replacen("\"page_count\": ", "\"page_count\": 1", 1);
    std::fs::write(&m, edited).expect("write");
    let r = env.restore("r.db", &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains("manifest checksum mismatch") && r.stderr.contains(&label),
        "{}",
        r.stderr
    );
    // dr info shows the damage and, since a backup cannot be restored, exits 3.
    let r = env.dr(&["info", "--json"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let info = r.json();
    let b = &info["policies"][0]["targets"][0]["backups"][0];
    assert!(
        b["error"]
            .as_str()
            .expect("error shown")
            .contains("checksum mismatch")
    );
}

#[test]
fn a_target_directory_that_is_not_writable() {
    let env = Env::new("");
    make_db(&env.db, true, 50, 100);
    let _ro = Mount::tmpfs(&env.path("backups"), "ro,size=1m");
    let r = env.dr(&["backup-local", "app"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("target 'local'") && r.stderr.contains("read-only"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"));
}

#[test]
fn the_disk_filling_during_restore_leaves_the_target_untouched() {
    let env = Env::new("");
    make_db(&env.db, true, 3000, 1000); // ~3 MiB
    env.dr(&["backup-local", "app"]).ok();
    let small = env.path("small");
    let _fs = Mount::tmpfs(&small, "size=1m");
    let dest = small.join("app.db");
    make_db(&dest, false, 20, 1000); // a good database that must survive
    let before = sha256_file(&dest);
    let to = dest.display().to_string();
    let key = env.key_arg();
    let r = env.dr(&[
        "restore-local",
        "app",
        "--to",
        &to,
        "--identity",
        &key,
        "--force",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("no space left on device"), "{}", r.stderr);
    assert_eq!(
        sha256_file(&dest),
        before,
        "the existing database is untouched"
    );
    let names: Vec<String> = std::fs::read_dir(&small)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["app.db".to_string()],
        "no temporary file left behind"
    );
}
