//! Per-target S3 settings against real S3 servers: the storage classes and
//! server-side encryption moto records for what dr uploads (one PUT, WAL),
//! those a multipart upload asks for (recorded in front of s3s-fs), and
//! `max_upload_rate` measured on s3s-fs.

mod common;

use std::time::{Duration, Instant};

use common::s3::{Moto, S3Server, SECRET_KEY, env_at};
use common::{dump, make_db};

fn keys_under(moto: &Moto, bucket: &str, prefix: &str) -> Vec<String> {
    moto.lock_tool(&["list", bucket, prefix])
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn storage_classes_and_server_side_encryption_reach_the_server() {
    let moto = Moto::start();
    moto.lock_tool(&["plain", "classes"]);
    let env = env_at(
        &moto.endpoint(),
        "[\"s3\"]",
        "[wal]\nenabled = true\nsync_interval = \"1s\"\n",
        SECRET_KEY,
        "classes",
    );
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + "storage_class = \"STANDARD_IA\"\nwal_storage_class = \"ONEZONE_IA\"\nsse = \"aws:kms\"\nkms_key_id = \"alias/dr-backups\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    // 2 MiB of random rows: each object goes up in one PUT.
    make_db(&env.db, true, 500, 4000);
    let label = env.full_backup("backup-s3");
    let prefix = format!("prod/app/backup/{label}/");
    let objects = keys_under(&moto, "classes", &prefix);
    assert!(objects.len() >= 3, "{objects:?}");
    for key in &objects {
        assert_eq!(
            moto.lock_tool(&["storage", "classes", key]),
            "STANDARD_IA aws:kms alias/dr-backups",
            "{key}"
        );
    }
    // Small objects rewritten often keep the bucket's class, encrypted alike.
    let lease_or_audit = keys_under(&moto, "classes", "prod/.audit/");
    let audit = lease_or_audit.first().expect("a shipped audit object");
    assert_eq!(
        moto.lock_tool(&["storage", "classes", audit]),
        "STANDARD aws:kms alias/dr-backups"
    );
    // WAL segments get the WAL class.
    let mut streamer = common::spawn_replicate(&env);
    common::wait_for_log(&env.path("replicate.log"), "generation base committed", 30);
    let c = rusqlite::Connection::open(&env.db).expect("open");
    c.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
        .expect("insert");
    let segment = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let segs: Vec<String> = keys_under(&moto, "classes", "prod/app/wal/")
                .into_iter()
                .filter(|k| k.split('/').count() == 5 && !k.contains("/keys/"))
                .collect();
            if let Some(s) = segs.into_iter().next() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "no WAL segment was shipped: {:?}\n{}",
                keys_under(&moto, "classes", "prod/app/"),
                std::fs::read_to_string(env.path("replicate.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    streamer.kill_group();
    assert_eq!(
        moto.lock_tool(&["storage", "classes", &segment]),
        "ONEZONE_IA aws:kms alias/dr-backups",
        "{segment}"
    );
    // (Multipart uploads: see the next test.)
    drop(c);
    // And everything restores as it was.
    let want = dump(&env.db);
    let to = env.path("restored.db").display().to_string();
    let key = env.key_arg();
    env.dr(&["restore-s3", "app", "--to", &to, "--identity", &key])
        .ok();
    assert_eq!(dump(&env.path("restored.db")), want);
}

#[test]
fn uploads_keep_to_max_upload_rate() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(&dir.path().join("s3"), "paced");
    let env = env_at(&server.endpoint(), "[\"s3\"]", "", SECRET_KEY, "paced");
    let limit: f64 = 1024.0 * 1024.0;
    let cfg = std::fs::read_to_string(env.config()).expect("cfg") + "max_upload_rate = \"1MiB\"\n";
    std::fs::write(env.config(), cfg).expect("cfg");
    // About 6 MiB that does not compress.
    make_db(&env.db, false, 1500, 4000);
    let r = env
        .dr(&["backup-s3", "app", "--type", "full", "--json"])
        .ok()
        .json();
    let stored = r[0]["stored_size"].as_f64().expect("stored_size");
    let seconds = r[0]["seconds"].as_f64().expect("seconds");
    let rate = stored / seconds;
    eprintln!(
        "max_upload_rate = \"1MiB\": {stored} bytes stored in {seconds:.2} s, {:.3} MiB/s",
        rate / limit
    );
    assert!(stored > 5.0 * limit, "{r}");
    assert!(
        (0.9 * limit..=1.1 * limit).contains(&rate),
        "{stored} bytes in {seconds:.2} s: {:.3} MiB/s against a limit of 1 MiB/s",
        rate / limit
    );
    // The limit is the target's: without it the same upload is far faster.
    let cfg = std::fs::read_to_string(env.config())
        .expect("cfg")
        .replace("max_upload_rate = \"1MiB\"\n", "");
    std::fs::write(env.config(), cfg).expect("cfg");
    let r = env
        .dr(&["backup-s3", "app", "--type", "full", "--json"])
        .ok()
        .json();
    let free = r[0]["seconds"].as_f64().expect("seconds");
    assert!(
        free < seconds / 3.0,
        "unlimited {free:.2} s, limited {seconds:.2} s"
    );
}

#[test]
fn settings_the_server_cannot_honour_are_refused_at_load() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(&dir.path().join("s3"), "b");
    let env = env_at(&server.endpoint(), "[\"s3\"]", "", SECRET_KEY, "b");
    let base = std::fs::read_to_string(env.config()).expect("cfg");
    for (extra, says) in [
        (
            "storage_class = \"GLACIER\"\n",
            "cannot be read without a restore request",
        ),
        (
            "storage_class = \"standard ia\"\n",
            "is not a storage class",
        ),
        ("sse = \"aws:kmss\"\n", "use \"AES256\""),
        ("kms_key_id = \"k\"\n", "kms_key_id needs sse = \"aws:kms\""),
        ("max_upload_rate = \"fast\"\n", "write bytes a second"),
    ] {
        std::fs::write(env.config(), format!("{base}{extra}")).expect("cfg");
        let r = env.dr(&["config", "validate"]);
        assert_eq!(r.code, 2, "{extra}: {} {}", r.stdout, r.stderr);
        assert!(r.stderr.contains(says), "{extra}: {}", r.stderr);
    }
    // pgBackRest 2.45 takes SSE-KMS with a key, and nothing else of these.
    std::fs::write(
        env.path("policies/pg.toml"),
        "name = \"pg\"\ntargets = [\"s3\"]\n[source]\nkind = \"postgres\"\ndata_dir = \"/srv/pgdata\"\n",
    )
    .expect("pg policy");
    std::fs::write(
        env.config(),
        format!("{base}sse = \"aws:kms\"\nkms_key_id = \"alias/dr\"\n"),
    )
    .expect("cfg");
    let r = env.dr(&["config", "validate"]);
    assert!(
        !r.stderr.contains("pgBackRest 2.45, which has no"),
        "{}",
        r.stderr
    );
    std::fs::write(
        env.config(),
        format!("{base}storage_class = \"STANDARD_IA\"\n"),
    )
    .expect("cfg");
    let r = env.dr(&["config", "validate"]);
    assert_eq!(r.code, 2, "{} {}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("policy 'pg' is PostgreSQL, backed up by pgBackRest 2.45, which has no storage class setting"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_multipart_upload_asks_for_the_storage_class_and_encryption_too() {
    // moto's answer to CompleteMultipartUpload is one the SDK refuses, so
    // the multipart path is checked on s3s-fs behind nginx, which records
    // the headers of every request. s3s-fs refuses any class but
    // STANDARD (InvalidStorageClass), so STANDARD is asked for, explicitly.
    let dir = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(&dir.path().join("s3"), "classes");
    let proxy = common::s3::TlsProxy::start_recording(&dir.path().join("proxy"), server.port);
    let env = env_at(&proxy.endpoint(), "[\"s3\"]", "", SECRET_KEY, "classes");
    let cfg = std::fs::read_to_string(env.config()).expect("cfg")
        + &format!(
            "ca_file = \"{}\"\nstorage_class = \"STANDARD\"\nsse = \"aws:kms\"\nkms_key_id = \"alias/dr-backups\"\n",
            proxy.ca.display()
        );
    std::fs::write(env.config(), cfg).expect("cfg");
    // 24 MiB of random rows: the data object goes up in 8 MiB parts.
    make_db(&env.db, true, 6000, 4000);
    let label = env.full_backup("backup-s3");
    let log = std::fs::read_to_string(dir.path().join("proxy/access.log")).expect("access.log");
    let data = format!("/classes/prod/app/backup/{label}/data.zst.age");
    let create = log
        .lines()
        .find(|l| l.starts_with(&format!("POST {data}?uploads")))
        .unwrap_or_else(|| panic!("no CreateMultipartUpload of {data}:\n{log}"));
    assert!(
        create.ends_with("class=STANDARD sse=aws:kms kms=alias/dr-backups"),
        "{create}"
    );
    // Parts and the completion carry none: the upload was asked once.
    assert!(
        log.lines()
            .filter(|l| l.starts_with(&format!("PUT {data}?")))
            .count()
            >= 2,
        "{log}"
    );
    let to = env.path("restored.db").display().to_string();
    env.dr(&[
        "restore-s3",
        "app",
        "--to",
        &to,
        "--identity",
        &env.key_arg(),
    ])
    .ok();
    assert_eq!(dump(&env.path("restored.db")), dump(&env.db));
}
