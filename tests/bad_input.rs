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
    common::make_db(&ok.db, true, 10, 10);
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

#[test]
fn config_validate_checks_what_the_config_points_at_and_reports_it_all_at_once() {
    let env = Env::new("");
    // Each of these can never back up: validate says so, every one at once.
    std::fs::write(env.path("backup.pub"), "").expect("empty recipients");
    std::fs::write(env.path("blocker"), b"a file").expect("blocker");
    let cfg = std::fs::read_to_string(env.config()).expect("cfg");
    std::fs::write(
        env.config(),
        format!("{cfg}[targets.broken]\nkind = \"local\"\npath = \"blocker/backups\"\n"),
    )
    .expect("cfg");
    std::fs::write(
        env.path("policies/app.toml"),
        "name = \"app\"\ntargets = [\"local\", \"broken\"]\n[source]\nkind = \"sqlite\"\npath = \"missing.db\"\n",
    )
    .expect("policy");
    std::fs::write(
        env.path("policies/pg.toml"),
        "name = \"pg\"\ntargets = [\"local\"]\n[source]\nkind = \"postgres\"\ndata_dir = \"/nonexistent/pgdata\"\nport = 1\ncipher_pass_file = \"missing.pass\"\n",
    )
    .expect("pg policy");
    let r = env.dr(&["config", "validate"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    for want in [
        "backup.pub",
        "missing.db",
        "blocker",
        "missing.pass",
        "does not answer",
    ] {
        assert!(r.stderr.contains(want), "names {want}: {}", r.stderr);
    }
    assert!(
        r.stderr.contains("app.toml:5"),
        "file:line of the source path: {}",
        r.stderr
    );
    let j = env.dr(&["config", "validate", "--json"]);
    assert_eq!(j.code, 2);
    let doc = j.json();
    assert_eq!(doc["ok"], false, "{doc}");
    let findings = doc["findings"].as_array().expect("findings");
    assert!(findings.len() >= 5, "{doc}");
    assert!(findings.iter().any(|f| f["severity"] == "warning"), "{doc}");
    // Fixed: ok again.
    std::fs::write(env.config(), &cfg).expect("cfg");
    std::fs::remove_file(env.path("policies/pg.toml")).expect("rm");
    std::fs::write(
        env.path("policies/app.toml"),
        "name = \"app\"\ntargets = [\"local\"]\n[source]\nkind = \"sqlite\"\npath = \"app.db\"\n",
    )
    .expect("policy");
    common::make_db(&env.db, true, 10, 10);
    let key = std::fs::read_to_string(env.path("backup.key")).expect("key");
    let recipient = key
        .lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .expect("recipient")
        .to_string();
    std::fs::write(env.path("backup.pub"), format!("{recipient}\n")).expect("recipients");
    env.dr(&["config", "validate"]).ok();
}

#[test]
fn relative_config_paths_become_absolute_for_other_programs() {
    let env = Env::new("");
    common::make_db(&env.db, true, 10, 10);
    let out = std::process::Command::new(common::dr_bin())
        .current_dir(env.dir.path())
        .args(["--config", "dr.toml", "info", "--json"])
        .output()
        .expect("dr");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let loc = j["policies"][0]["targets"][0]["location"]
        .as_str()
        .expect("location");
    assert!(loc.starts_with('/'), "{loc}");
}

#[test]
fn the_systemd_unit_is_hardened_and_does_not_restart_a_bad_config() {
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/dr.service");
    let text = std::fs::read_to_string(&unit).expect("unit");
    for want in [
        "StateDirectory=dr",
        "RestartPreventExitStatus=2 64",
        "ProtectSystem=strict",
    ] {
        assert!(text.contains(want), "{want}");
    }
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze is missing ({e}): it comes with systemd"));
    let report = String::from_utf8_lossy(&out.stdout);
    let level: f64 = report
        .lines()
        .find_map(|l| l.split("exposure level for dr.service: ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {report}"));
    // What the README promises (deploy/dr.service).
    assert!(level <= 2.8, "exposure {level}:\n{report}");

    // `systemd-analyze verify` on the unit as the install steps in its
    // header leave it: dr where ExecStart says (here: this build), its
    // manual page where man finds it.
    let dir = tempfile::tempdir().expect("tmp");
    let man1 = dir.path().join("man/man1");
    std::fs::create_dir_all(&man1).expect("man dir");
    let page = std::process::Command::new(common::dr_bin())
        .arg("man")
        .output()
        .expect("dr man");
    assert!(page.status.success(), "dr man");
    std::fs::write(man1.join("dr.1"), &page.stdout).expect("dr.1");
    let installed = dir.path().join("dr.service");
    std::fs::write(
        &installed,
        text.replace(
            "/usr/local/bin/dr",
            &std::fs::canonicalize(common::dr_bin())
                .expect("dr")
                .display()
                .to_string(),
        ),
    )
    .expect("unit");
    common::systemd_verifies(&installed, &dir.path().join("man"));
    assert!(
        text.contains("StateDirectoryMode=0711"),
        "archive_command passes through state_dir"
    );
}

#[test]
fn every_wrong_type_in_a_file_is_reported_at_once() {
    let env = Env::new("[retention]\nfull = \"two\"\ndiff = \"seven\"\n");
    let r = env.dr(&["config", "validate"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("2 problems"), "{}", r.stderr);
    assert!(
        r.stderr.contains("\"two\"") && r.stderr.contains("\"seven\""),
        "{}",
        r.stderr
    );
}

#[test]
fn copy_and_security_settings_that_cannot_work_are_named_with_their_line() {
    let env = Env::new(
        "[copy]\nfrom = \"offsite\"\nto = [\"local\", \"nowhere\"]\nschedule = \"0 3 * *\"\n",
    );
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "[security]\nrotate_after = \"ninety days\"\ncert_warn = \"0s\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    let r = env.dr(&["config", "validate"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    for said in [
        "app.toml:7: copy.from 'offsite' is not a target of policy 'app'",
        "app.toml:8: copy.to names 'local', which policy 'app' already backs up to",
        "app.toml:8: copy.to names target 'nowhere', which dr.toml does not define",
        "app.toml:9: cron expression '0 3 * *' has 4 fields",
        "dr.toml:9: security.rotate_after: ",
        "(write e.g. \"90d\")",
        "dr.toml:10: security.cert_warn must be more than zero",
    ] {
        assert!(r.stderr.contains(said), "{said}:\n{}", r.stderr);
    }
}
