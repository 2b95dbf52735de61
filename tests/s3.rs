//! S3 targets against a real S3 server (s3s-fs) over HTTP.

mod common;

use common::s3::{S3Server, SECRET_KEY, env_at};
use common::{Env, dump, make_db};

/// An env whose policy `app` has targets local and s3.
fn s3_env(server: &S3Server, policy_extra: &str, secret: &str, bucket: &str) -> Env {
    env_at(
        &server.endpoint(),
        "[\"local\", \"s3\"]",
        policy_extra,
        secret,
        bucket,
    )
}

fn restore_s3(env: &Env, to: &str) -> common::Run {
    let to = env.path(to).display().to_string();
    let key = env.key_arg();
    env.dr(&["restore-s3", "app", "--to", &to, "--identity", &key])
}

#[test]
fn backup_and_restore_through_s3_byte_equal_across_several_parts() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let env = s3_env(&server, "", SECRET_KEY, "backups");
    // Incompressible rows: the data object spans several 8 MiB parts.
    make_db(&env.db, true, 14_000, 2000);
    let full = env.dr(&["backup-s3", "app", "--json"]).ok().json();
    assert_eq!(full[0]["target"], "s3");
    assert!(
        full[0]["stored_size"].as_u64().expect("size") > 24 << 20,
        "{full}"
    );
    let data = root.path().join("backups/prod/app/backup");
    assert!(data.exists(), "objects are under the prefix");
    restore_s3(&env, "r.db").ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
    {
        let c = rusqlite::Connection::open(&env.db).expect("open");
        c.execute("UPDATE t SET v = randomblob(2000) WHERE id < 50", [])
            .expect("update");
    }
    let diff = env.dr(&["backup-s3", "app", "--json"]).ok().json();
    assert_eq!(diff[0]["type"], "diff");
    restore_s3(&env, "r2.db").ok();
    assert_eq!(dump(&env.path("r2.db")), dump(&env.db));
    let key = env.key_arg();
    let v = env
        .dr(&["verify", "app", "--target", "s3", "--identity", &key])
        .ok();
    assert!(v.stdout.starts_with("ok"), "{}", v.stdout);
    // backup-local does not touch the S3 target, and the other way round.
    // With nothing on the local target the database is at risk there.
    let r = env.dr(&["info", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("target 'local': never_backed_up"),
        "{}",
        r.stderr
    );
    let info = r.json();
    let targets = info["policies"][0]["targets"].as_array().expect("targets");
    assert_eq!(targets[0]["name"], "local");
    assert_eq!(targets[0]["backups"].as_array().map(|b| b.len()), Some(0));
    assert_eq!(targets[1]["backups"].as_array().map(|b| b.len()), Some(2));
}

#[test]
fn a_wrong_secret_is_a_clear_error() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let env = s3_env(&server, "", "not-the-secret", "backups");
    make_db(&env.db, true, 50, 100);
    let r = env.dr(&["backup-s3", "app"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("target 's3'") && r.stderr.contains("s3://backups/prod"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("refused the credentials"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("not-the-secret"),
        "the secret is never printed"
    );
}

#[test]
fn a_missing_bucket_is_a_clear_error() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let env = s3_env(&server, "", SECRET_KEY, "no-such-bucket");
    make_db(&env.db, true, 50, 100);
    let r = env.dr(&["backup-s3", "app"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("bucket 'no-such-bucket' does not exist"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_unreachable_endpoint_is_a_clear_error() {
    let root = tempfile::tempdir().expect("tmp");
    let mut server = S3Server::start(root.path(), "backups");
    let env = s3_env(&server, "", SECRET_KEY, "backups");
    server.kill();
    make_db(&env.db, true, 50, 100);
    let r = env.dr(&["backup-s3", "app"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot reach http://127.0.0.1:"),
        "{}",
        r.stderr
    );
    // info still shows every target, and exits 1 because one could not be read.
    let r = env.dr(&["info", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let info = r.json();
    assert!(
        info["policies"][0]["targets"][1]["error"]
            .as_str()
            .expect("error")
            .contains("cannot reach")
    );
}

#[test]
fn retention_applies_to_local_and_s3_targets_alike() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let env = s3_env(
        &server,
        "[retention]\nfull = 1\ndiff = 1\n",
        SECRET_KEY,
        "backups",
    );
    make_db(&env.db, true, 100, 100);
    for cmd in ["backup-local", "backup-s3"] {
        for kind in ["full", "diff", "full", "diff"] {
            env.dr(&[cmd, "app", "--type", kind]).ok();
        }
    }
    let info = env.dr(&["info", "--json"]).ok().json();
    for t in info["policies"][0]["targets"].as_array().expect("targets") {
        let b = t["backups"].as_array().expect("backups");
        assert_eq!(b.len(), 2, "{}: {t}", t["name"]);
        assert_eq!(b[0]["type"], "full");
        assert_eq!(b[1]["parent"], b[0]["label"]);
    }
    let objects: Vec<_> = common::files_under(&root.path().join("backups"));
    assert_eq!(
        objects
            .iter()
            .filter(|k| k.ends_with("manifest.json"))
            .count(),
        2,
        "{objects:?}"
    );
}

#[test]
fn the_server_dying_mid_upload_fails_cleanly_and_the_next_run_succeeds() {
    let root = tempfile::tempdir().expect("tmp");
    let mut server = S3Server::start(root.path(), "backups");
    let env = s3_env(
        &server,
        "[retention]\nincomplete_grace = \"1s\"\n",
        SECRET_KEY,
        "backups",
    );
    make_db(&env.db, true, 30_000, 2000); // ~60 MiB, incompressible: several parts
    let mut child = common::Proc::spawn(
        std::process::Command::new(common::dr_bin())
            .arg("--config")
            .arg(env.config())
            .args(["backup-s3", "app"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    )
    .expect("spawn");
    // Kill the server once parts are being uploaded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_dir(root.path())
        .expect("ls")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(".upload_id-"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no multipart upload seen"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "backup finished before the outage"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    server.kill();
    let out = child.wait_with_output().expect("wait");
    assert!(
        !out.status.success(),
        "the backup must fail when the server dies"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("target 's3'"), "{stderr}");
    server.restart();
    // The failed backup left nothing restorable: at risk, exit 1.
    let r = env.dr(&["info", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let info = r.json();
    assert_eq!(
        info["policies"][0]["targets"][1]["backups"]
            .as_array()
            .map(|b| b.len()),
        Some(0)
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.dr(&["backup-s3", "app"]).ok();
    restore_s3(&env, "r.db").ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
    let manifests = common::files_under(&root.path().join("backups"))
        .into_iter()
        .filter(|k| k.ends_with("manifest.json"))
        .count();
    assert_eq!(manifests, 1);
    let data = common::files_under(&root.path().join("backups/prod"))
        .into_iter()
        .filter(|k| k.ends_with("data.zst.age"))
        .count();
    assert_eq!(
        data, 1,
        "the interrupted backup's objects are gone after expire"
    );
    let parts: Vec<_> = std::fs::read_dir(root.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload"))
        .collect();
    assert!(
        parts.is_empty(),
        "no orphan multipart parts remain: {parts:?}"
    );
}

#[test]
fn tls_with_a_private_ca_needs_ca_file_and_works_with_it() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let tls_dir = tempfile::tempdir().expect("tmp");
    let proxy = common::s3::TlsProxy::start(tls_dir.path(), server.port);
    let env = env_at(&proxy.endpoint(), "[\"s3\"]", "", SECRET_KEY, "backups");
    let cfg = std::fs::read_to_string(env.config()).expect("cfg");
    make_db(&env.db, true, 3000, 1000);
    // Without the CA, the certificate is refused and the message names ca_file.
    let r = env.dr(&["backup-s3", "app"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("ca_file"), "{}", r.stderr);
    let with_ca = cfg.replace(
        "path_style = true\n",
        &format!("path_style = true\nca_file = \"{}\"\n", proxy.ca.display()),
    );
    std::fs::write(env.config(), with_ca).expect("cfg");
    env.dr(&["backup-s3", "app"]).ok();
    restore_s3(&env, "r.db").ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
}

#[test]
fn a_lease_held_by_another_host_stops_the_backup_and_an_expired_one_is_taken_over() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let env = s3_env(&server, "", SECRET_KEY, "backups");
    make_db(&env.db, true, 100, 100);
    let lease = root.path().join("backups/prod/app/lease");
    std::fs::create_dir_all(lease.parent().expect("dir")).expect("mkdir");
    let held = |expires: &str| {
        format!(
            "{{\"holder\": \"otherhost pid 77\", \"command\": \"backup\", \"token\": \"t\", \"acquired\": \"2026-01-01T00:00:00Z\", \"expires\": \"{expires}\"}}"
        )
    };
    std::fs::write(&lease, held("2999-01-01T00:00:00Z")).expect("lease");
    let r = env.dr(&["backup-s3", "app"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("leased by otherhost pid 77"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&lease).expect("lease"),
        held("2999-01-01T00:00:00Z"),
        "not overwritten"
    );
    std::fs::write(&lease, held("2020-01-01T00:00:00Z")).expect("expired lease");
    env.dr(&["backup-s3", "app"]).ok();
    assert!(!lease.exists(), "the lease is released after the backup");
    restore_s3(&env, "r.db").ok();
    // The takeover is on record, with the lease's key.
    let audit = env.dr(&["audit", "--json"]).ok().stdout;
    assert!(
        audit.lines().any(|l| l.contains("\"lease_takeover\"")
            && l.contains("\"target\":\"s3\"")
            && l.contains("app/lease")),
        "{audit}"
    );
}

#[test]
fn trace_logging_never_prints_the_s3_credentials() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let env = s3_env(&server, "", SECRET_KEY, "backups");
    make_db(&env.db, true, 50, 100);
    for level in ["trace", "debug"] {
        let r = env.dr(&["--log-level", level, "backup-s3", "app"]).ok();
        assert!(r.stderr.contains("DEBUG"), "{level} logs: {}", r.stderr);
        for secret in [common::s3::ACCESS_KEY, SECRET_KEY] {
            assert!(
                !r.stderr.contains(secret) && !r.stdout.contains(secret),
                "--log-level {level} printed a credential"
            );
        }
    }
}

/// The objects under `backups/` of the s3 target, by data key of each label.
fn data_key(label: &str) -> String {
    format!("prod/app/backup/{label}/data.zst.age")
}

#[test]
fn object_lock_keeps_backups_a_delete_cannot_remove_and_expire_waits_for_it() {
    let moto = common::s3::Moto::start();
    moto.lock_tool(&["create", "lockbucket"]);
    let env = env_at(
        &moto.endpoint(),
        "[\"s3\"]",
        "[retention]\nfull = 1\n",
        SECRET_KEY,
        "lockbucket",
    );
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "object_lock = { mode = \"governance\", days = 2 }\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    make_db(&env.db, true, 50, 500);
    let want = dump(&env.db);
    let first = env.full_backup("backup-s3");
    // Every object dr wrote is locked for two days.
    let head = moto.lock_tool(&["head", "lockbucket", &data_key(&first)]);
    let (mode, until) = head.split_once(' ').expect("mode and date");
    assert_eq!(mode, "GOVERNANCE");
    let until: i64 = until.parse().expect("epoch");
    let now = chrono::Utc::now().timestamp();
    assert!(
        (now + 2 * 86400 - 120..=now + 2 * 86400 + 120).contains(&until),
        "retain until {until}, now {now}"
    );
    // A delete with dr's own credentials is refused.
    assert_eq!(
        moto.lock_tool(&["delete", "lockbucket", &data_key(&first)]),
        "AccessDenied"
    );
    // So is one of the audit log the command shipped: the record of what
    // was done outlives the host too.
    let audit = moto.lock_tool(&["list", "lockbucket", "prod/.audit/"]);
    let shipped = audit.lines().next().expect("a shipped audit object");
    assert!(
        moto.lock_tool(&["head", "lockbucket", shipped])
            .starts_with("GOVERNANCE "),
        "{shipped}"
    );
    assert_eq!(
        moto.lock_tool(&["delete", "lockbucket", shipped]),
        "AccessDenied"
    );

    // retention.full = 1 would remove the first full: it is locked, so
    // expire leaves it and says until when.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let second = env
        .dr(&["backup-s3", "app", "--type", "full", "--json"])
        .ok()
        .json();
    assert_eq!(second[0]["expired"], serde_json::json!([]), "{second}");
    let exp = env.dr(&["expire", "app", "--json"]).ok().json();
    let held = exp
        .as_array()
        .and_then(|a| a.iter().find(|e| e["label"] == first.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(held["removed"], false, "{exp}");
    let reason = held["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("Object Lock (governance) until 20"),
        "{reason}"
    );
    // dr info shows how long each backup is locked.
    let info = env.dr(&["info", "--json"]).ok().json();
    let b = &info["policies"][0]["targets"][0]["backups"][0];
    assert!(
        b["locked_until"]
            .as_str()
            .is_some_and(|t| t.starts_with("20")),
        "{b}"
    );
    // The locked backup restores, byte for byte.
    let to = env.path("first.db").display().to_string();
    let key = env.key_arg();
    env.dr(&[
        "restore-s3",
        "app",
        "--backup",
        &first,
        "--to",
        &to,
        "--identity",
        &key,
    ])
    .ok();
    assert_eq!(dump(&env.path("first.db")), want);
}

#[test]
fn an_append_only_target_never_sees_a_delete() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(&dir.path().join("s3"), "aobucket");
    let env = env_at(
        &server.endpoint(),
        "[\"s3\"]",
        "[retention]\nfull = 1\n",
        SECRET_KEY,
        "aobucket",
    );
    let cfg = std::fs::read_to_string(env.config()).expect("cfg") + "append_only = true\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    make_db(&env.db, true, 50, 500);
    let files = || common::files_under(&dir.path().join("s3"));
    let mut labels = Vec::new();
    for _ in 0..3 {
        let before = files();
        let r = env
            .dr(&["backup-s3", "app", "--type", "full", "--json"])
            .ok()
            .json();
        labels.push(r[0]["label"].as_str().unwrap_or_default().to_string());
        // Nothing that was there is gone: not a backup, not the lease.
        let after = files();
        for f in &before {
            assert!(after.contains(f), "{f} was deleted");
        }
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let exp = env.dr(&["expire", "app", "--json"]).ok().json();
    let kept: Vec<_> = exp
        .as_array()
        .map(|a| a.iter().filter(|e| e["removed"] == false).collect())
        .unwrap_or_default();
    assert_eq!(kept.len(), 2, "{exp}");
    assert!(
        kept.iter().all(|e| e["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("append_only")),
        "{exp}"
    );
    // The lease is released by overwriting, not deleting: no run took one over.
    let audit = env.dr(&["audit", "--json"]).ok().stdout;
    assert!(!audit.contains("lease_takeover"), "{audit}");
    let info = env.dr(&["info", "--json"]).ok().json();
    let backups = info["policies"][0]["targets"][0]["backups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(backups.len(), labels.len(), "{info}");
    assert!(
        backups.iter().all(|b| b["locked_until"] == "append_only"),
        "{info}"
    );
}

#[test]
fn a_key_refused_mid_rotation_is_read_again_and_the_request_tried_once_more() {
    use std::io::BufRead;
    let root = tempfile::tempdir().expect("tmp");
    let mut server = S3Server::start(root.path(), "backups");
    let env = s3_env(&server, "", SECRET_KEY, "backups");
    make_db(&env.db, true, 50, 100);
    // The store already takes only the new key; the files still hold the
    // old one when the backup starts, and are replaced only once dr has
    // been refused: the retry must read them again.
    let (new_id, new_secret) = ("dr-mid-rotation", "dr-mid-rotation-secret-24680");
    server.rotate(new_id, new_secret);
    let mut child = common::Proc::spawn(
        std::process::Command::new(common::dr_bin())
            .arg("--config")
            .arg(env.config())
            .args(["backup-s3", "app"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    )
    .expect("dr");
    let stderr = child.stderr.take().expect("stderr");
    let files = [
        (env.path("s3.key_id"), new_id),
        (env.path("s3.secret"), new_secret),
    ];
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.expect("stderr line");
            if line.contains("refused the credentials; reading") {
                for (path, value) in &files {
                    common::replace_private_file(path, &format!("{value}\n"));
                }
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let status = child.wait().expect("wait");
    let log = reader.join().expect("reader");
    assert!(status.success(), "{log}");
    assert_eq!(
        log.matches("refused the credentials; reading").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("S3 credentials of target 's3' changed"),
        "{log}"
    );
    assert!(!log.contains(new_secret), "{log}");
    restore_s3(&env, "r.db").ok();
    assert_eq!(dump(&env.path("r.db")), dump(&env.db));
}

#[test]
fn a_delete_marker_over_the_newest_backup_is_seen_and_removing_it_restores_it() {
    let moto = common::s3::Moto::start();
    moto.lock_tool(&["create", "markbucket"]);
    let env = env_at(&moto.endpoint(), "[\"s3\"]", "", SECRET_KEY, "markbucket");
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "object_lock = { mode = \"governance\", days = 1 }\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    make_db(&env.db, true, 20, 300);
    env.full_backup("backup-s3");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    make_db(&env.db, true, 20, 300);
    let newest = env.full_backup("backup-s3");
    let want = dump(&env.db);
    // A plain delete of the newest backup's keys: the locked versions stay,
    // hidden behind delete markers.
    let marked = moto.lock_tool(&["mark", "markbucket", &format!("prod/app/backup/{newest}/")]);
    assert!(marked.contains("manifest.json"), "{marked}");
    let r = env.dr(&["info", "--json"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("hidden_by_delete_marker"), "{}", r.stderr);
    assert!(r.stderr.contains(&newest), "{}", r.stderr);
    let key = env.key_arg();
    let v = env.dr(&["verify", "app", "--identity", &key]);
    assert_eq!(v.code, 3, "{}", v.stderr);
    let r = restore_s3(&env, "r.db");
    assert_eq!(r.code, 3, "never the older backup as newest: {}", r.stderr);
    assert!(r.stderr.contains("delete marker"), "{}", r.stderr);
    assert!(!env.path("r.db").exists());
    // The runbook: remove the markers; the locked versions are back.
    moto.lock_tool(&[
        "unmark",
        "markbucket",
        &format!("prod/app/backup/{newest}/"),
    ]);
    env.dr(&["info", "--json"]).ok();
    restore_s3(&env, "r.db").ok();
    assert_eq!(dump(&env.path("r.db")), want);
}

#[test]
fn a_multipart_upload_no_run_recorded_is_aborted_once_past_the_grace() {
    // A run killed between the store opening its upload and dr recording
    // it (or a lost host's) leaves an upload only a listing finds; its
    // parts are billed until it is aborted.
    let moto = common::s3::Moto::start();
    moto.lock_tool(&["create", "upbucket"]);
    let env = env_at(
        &moto.endpoint(),
        "[\"s3\"]",
        "[retention]\nincomplete_grace = \"3s\"\n",
        SECRET_KEY,
        "upbucket",
    );
    make_db(&env.db, true, 20, 300);
    env.full_backup("backup-s3");
    let key = "prod/app/backup/20261206-010203F/data.zst.age";
    moto.lock_tool(&["open-upload", "upbucket", key]);
    // Another policy's upload under the same bucket is not this one's to abort.
    let other = "prod/other/backup/20261206-010203F/data.zst.age";
    moto.lock_tool(&["open-upload", "upbucket", other]);
    let uploads = || moto.lock_tool(&["uploads", "upbucket", "prod/"]);
    // (Within the grace an upload may be a live run's and is kept; moto
    // reports every upload as started in 2010, so that half is not seen
    // here.)
    std::thread::sleep(std::time::Duration::from_millis(3100));
    let r = env.dr(&["expire", "app", "--log-level", "info"]).ok();
    assert_eq!(uploads(), other, "only app's stale upload is aborted");
    assert!(
        r.stderr.contains(
            "aborted the abandoned multipart upload of app/backup/20261206-010203F/data.zst.age"
        ),
        "{}",
        r.stderr
    );
}

#[test]
fn a_lease_replaced_during_a_backup_stops_its_commit() {
    // Another host took the policy over (an operator cleared the lease, a
    // clock ran ahead) while this backup uploaded: it must not commit.
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let env = s3_env(&server, "", SECRET_KEY, "backups");
    make_db(&env.db, true, 30_000, 2000); // ~60 MiB, incompressible: several parts
    let lease = root.path().join("backups/prod/app/lease");
    let child = common::Proc::spawn(
        std::process::Command::new(common::dr_bin())
            .arg("--config")
            .arg(env.config())
            .args(["backup-s3", "app", "--type", "full"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    )
    .expect("spawn");
    let uploading = || {
        std::fs::read_dir(root.path())
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".upload"))
            })
            .unwrap_or(false)
    };
    // Polled closely: the upload takes about a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !(lease.exists() && uploading()) {
        assert!(
            std::time::Instant::now() < deadline,
            "no lease and upload seen"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    std::fs::write(
        &lease,
        "{\"holder\": \"otherhost pid 77\", \"command\": \"backup\", \"token\": \"theirs\", \"acquired\": \"2026-01-01T00:00:00Z\", \"expires\": \"2999-01-01T00:00:00Z\"}",
    )
    .expect("replace the lease");
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("otherhost pid 77"), "{stderr}");
    // Nothing committed: no manifest on the target, nothing to restore.
    let manifests: Vec<_> = common::files_under(&root.path().join("backups"))
        .into_iter()
        .filter(|k| k.contains("/backup/") && k.ends_with("manifest.json"))
        .collect();
    assert!(manifests.is_empty(), "{manifests:?}");
    assert!(
        std::fs::read_to_string(&lease)
            .expect("lease")
            .contains("theirs"),
        "the other host's lease is left alone"
    );
}
