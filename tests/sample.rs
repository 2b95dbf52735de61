//! `dr verify --sample` on repository format 2: older backups are checked
//! by a share of their frames, read by ranges from a real S3 server, and a
//! changed byte in a sampled frame fails the drill naming the backup.

mod common;

use common::make_db;
use common::s3::{S3Server, SECRET_KEY, env_at};

#[test]
fn a_sample_checks_every_older_backup_by_its_frames_and_finds_a_changed_one() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    // Small frames: a few MiB of database make dozens of them.
    let env = env_at(
        &server.endpoint(),
        "[\"s3\"]",
        "[compression]\nframe = \"64KiB\"\n",
        SECRET_KEY,
        "backups",
    );
    make_db(&env.db, true, 4000, 800);
    let older = env.full_backup("backup-s3");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.full_backup("backup-s3");
    let key = env.key_arg();
    let verify = |percent: &str| {
        env.dr(&[
            "verify",
            "app",
            "--identity",
            &key,
            "--sample",
            percent,
            "--json",
        ])
    };
    let r = verify("10");
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let f = r.json()[0]["frames_sampled"].clone();
    assert_eq!(f["backups"], 1, "the older full, sampled by frames: {f}");
    let frames = f["frames"].as_u64().expect("frames");
    assert!(frames >= 30, "{f}");
    assert_eq!(f["read"].as_u64(), Some(frames.div_ceil(10)), "{f}");
    let text = env
        .dr(&["verify", "app", "--identity", &key, "--sample", "10"])
        .ok()
        .stdout;
    assert!(
        text.contains(&format!(
            "1 of them by a sample of {} of their {frames} frames",
            frames.div_ceil(10)
        )),
        "{text}"
    );
    // One byte changed inside the older backup's data: every frame read
    // (100%) finds it, and the drill names the backup.
    let data = root
        .path()
        .join(format!("backups/prod/app/backup/{older}/data.zst.age"));
    let mut bytes = std::fs::read(&data).expect("data");
    let at = bytes.len() * 2 / 3;
    bytes[at] ^= 0x01;
    std::fs::write(&data, bytes).expect("tamper");
    let r = verify("100");
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains(&older), "{}", r.stderr);
}

#[test]
fn a_local_target_is_sampled_by_frames_too() {
    let env = common::Env::new("[compression]\nframe = \"64KiB\"\n");
    make_db(&env.db, true, 3000, 800);
    env.full_backup("backup-local");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.full_backup("backup-local");
    let r = env
        .dr(&[
            "verify",
            "app",
            "--identity",
            &env.key_arg(),
            "--sample",
            "50",
            "--json",
        ])
        .ok();
    let f = r.json()[0]["frames_sampled"].clone();
    let frames = f["frames"].as_u64().expect("frames");
    assert_eq!(f["read"].as_u64(), Some(frames.div_ceil(2)), "{f}");
}
