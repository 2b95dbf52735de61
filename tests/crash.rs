//! The crash suite: dr killed with SIGKILL at seeded random moments during
//! backup-local, backup-s3 (mid multipart), expire, restore and replicate.
//! After every kill: every listed backup verifies, the newest restorable
//! backup or instant never moves backwards, the next run succeeds, and no
//! plaintext is left once it has run.
//!
//! `DR_CRASH_ITERS` sets the kills per operation (default 4, as
//! `scripts/test` runs it); `scripts/crash` runs the long version (50).
//! `DR_TEST_SEED` replays a schedule.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::faults::Rng;
use common::s3::{S3Server, SECRET_KEY, env_at};
use common::{Env, dump, make_db};

fn iters() -> u64 {
    std::env::var("DR_CRASH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
}

fn spawn(config: &Path, args: &[&str]) -> common::Proc {
    common::Proc::spawn(
        Command::new(common::dr_bin())
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("dr")
}

/// Runs dr to completion and returns how long it took.
fn timed(env: &Env, args: &[&str]) -> Duration {
    let t = Instant::now();
    env.dr(args).ok();
    t.elapsed()
}

/// Starts dr and kills it with SIGKILL after `after` (if it is still running).
fn kill_after(config: &Path, args: &[&str], after: Duration) {
    let mut child = spawn(config, args);
    let deadline = Instant::now() + after;
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A moment inside a run that takes about `typical`.
fn moment(rng: &mut Rng, typical: Duration) -> Duration {
    let span = (typical.as_millis() as u64 * 6 / 5).max(5);
    Duration::from_millis(rng.below(span))
}

fn labels(env: &Env, target: &str) -> Vec<String> {
    let r = env.dr(&["info", "--json", "--target", target]);
    // A kill may leave the database at risk (its streamer is down, or no
    // backup committed yet), never damaged.
    let verdict = &r.json()["policies"][0]["verdict"];
    for reason in verdict["reasons"].as_array().expect("reasons") {
        assert!(
            matches!(
                reason["reason"].as_str(),
                Some("streamer_down" | "never_backed_up")
            ),
            "info after a kill: {}",
            r.stderr
        );
    }
    assert!(matches!(r.code, 0 | 1), "info after a kill: {}", r.stderr);
    common::labels_in(&r.json())
}

/// Every listed backup verifies; returns the newest label. `info` (exit 0)
/// checks every backup intact each time; the bytes of a backup are read
/// back once (`seen`): a kill can only touch the run's own new backup.
fn all_verify(env: &Env, target: &str, seen: &mut BTreeSet<String>) -> Option<String> {
    let key = env.key_arg();
    let all = labels(env, target);
    let fresh: Vec<&String> = all.iter().filter(|l| !seen.contains(*l)).collect();
    for l in fresh {
        let r = env.dr(&[
            "verify",
            "app",
            "--target",
            target,
            "--backup",
            l,
            "--identity",
            &key,
        ]);
        assert_eq!(
            r.code, 0,
            "backup {l} does not verify after a kill: {}{}",
            r.stdout, r.stderr
        );
        seen.insert(l.clone());
    }
    all.last().cloned()
}

/// Plaintext temporaries left anywhere under the env.
fn plaintext_left(env: &Env) -> Vec<String> {
    common::files_under(env.dir.path())
        .into_iter()
        .filter(|f| f.contains(".dr-restore.") || f.contains("tmp/verify."))
        .collect()
}

fn touch(env: &Env, rng: &mut Rng) {
    let c = rusqlite::Connection::open(&env.db).expect("open");
    c.execute(
        "UPDATE t SET v = randomblob(length(v)) WHERE id % 97 = ?1",
        [rng.below(97) as i64],
    )
    .expect("update");
}

/// The multipart uploads s3s-fs holds open under its root (one
/// `.upload-ID.json` each, beside its parts `.upload_id-ID.part-N`; all
/// gone once the upload is completed or aborted).
fn open_uploads(root: &Path) -> BTreeSet<String> {
    std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".upload"))
                .collect()
        })
        .unwrap_or_default()
}

/// Starts a backup-s3 and kills it as soon as a multipart upload has a
/// part stored (parts go up in parallel: a moment later, it is complete);
/// returns the uploads the kill
/// left open (none if the upload completed first). An upload killed
/// before dr recorded it is found by listing, which s3s-fs cannot do:
/// `s3.rs` tests that case on moto.
fn kill_mid_multipart(env: &Env, args: &[&str], root: &Path) -> BTreeSet<String> {
    let mut child = spawn(&env.config(), args);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !open_uploads(root).iter().any(|n| n.contains(".part-")) {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the backup finished before a multipart upload was seen"
        );
        assert!(
            Instant::now() < deadline,
            "no multipart upload opened in 60 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill_group();
    // The uploads still open: ids with their `.upload-ID.json`. (Parts
    // without one are a complete that s3s-fs itself cut off half-way when
    // the client went: it forgets the upload first, and no client can
    // abort it then. A real S3 completes atomically.)
    open_uploads(root)
        .iter()
        .filter_map(|n| n.strip_prefix(".upload-")?.strip_suffix(".json"))
        .map(str::to_string)
        .collect()
}

/// `uploads`: the S3 server's root, when the target is s3s-fs: every kill
/// then lands once a multipart upload is open, and the upload it leaves
/// is aborted by a later run.
fn backup_under_kills(env: &Env, cmd: &str, target: &str, rng: &mut Rng, uploads: Option<&Path>) {
    let typical = timed(env, &[cmd, "app", "--type", "full"]);
    let mut seen = BTreeSet::new();
    let mut newest = all_verify(env, target, &mut seen);
    let mut landed = 0;
    for i in 0..iters() {
        touch(env, rng);
        // A diff is too small for a multipart upload: on S3 every killed
        // run is a full.
        let kind = if i % 3 == 0 || uploads.is_some() {
            "full"
        } else {
            "diff"
        };
        let args = [cmd, "app", "--type", kind];
        let left_open = match uploads {
            Some(root) => kill_mid_multipart(env, &args, root),
            None => {
                kill_after(&env.config(), &args, moment(rng, typical));
                BTreeSet::new()
            }
        };
        landed += usize::from(!left_open.is_empty());
        let now = all_verify(env, target, &mut seen);
        assert!(
            now >= newest,
            "the newest backup moved back: {now:?} < {newest:?}"
        );
        // Past incomplete_grace, the next run succeeds, commits, and
        // aborts what the killed one left open.
        if uploads.is_some() {
            std::thread::sleep(Duration::from_millis(1100));
        }
        env.dr(&[cmd, "app"]).ok();
        if let Some(root) = uploads {
            let still: Vec<_> = open_uploads(root)
                .into_iter()
                .filter(|n| left_open.iter().any(|id| n.contains(id.as_str())))
                .collect();
            assert!(
                still.is_empty(),
                "uploads left open by the killed backup were not aborted: {still:?}"
            );
        }
        newest = all_verify(env, target, &mut seen);
        assert!(plaintext_left(env).is_empty(), "{:?}", plaintext_left(env));
    }
    if uploads.is_some() {
        assert!(
            landed * 2 >= iters() as usize,
            "only {landed} of {} kills landed inside a multipart upload",
            iters()
        );
    }
    let key = env.key_arg();
    let restore = if target == "local" {
        "restore-local"
    } else {
        "restore-s3"
    };
    let to = env.path("final.db").display().to_string();
    env.dr(&[restore, "app", "--to", &to, "--identity", &key, "--force"])
        .ok();
    assert_eq!(dump(&env.path("final.db")), dump(&env.db));
}

#[test]
fn backup_local_killed_at_random_moments() {
    let env = Env::new("");
    make_db(&env.db, true, 4_000, 2000);
    let mut rng = Rng::new(common::faults::seed());
    backup_under_kills(&env, "backup-local", "local", &mut rng, None);
}

#[test]
fn backup_s3_killed_mid_multipart() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let env = env_at(
        &server.endpoint(),
        "[\"s3\"]",
        "[retention]\nincomplete_grace = \"1s\"\n",
        SECRET_KEY,
        "backups",
    );
    // Incompressible: the data object spans three 8 MiB parts.
    make_db(&env.db, true, 11_000, 2000);
    let mut rng = Rng::new(common::faults::seed() ^ 0x53);
    backup_under_kills(&env, "backup-s3", "s3", &mut rng, Some(root.path()));
}

#[test]
fn expire_killed_at_random_moments_never_costs_the_newest_chain() {
    let env = Env::new("");
    make_db(&env.db, true, 1_000, 1000);
    // The same policy with retention, in a second config over the same
    // target and state: backups pile up under one, expire runs under the other.
    std::fs::create_dir_all(env.path("expiring")).expect("mkdir");
    let p = std::fs::read_to_string(env.path("policies/app.toml")).expect("policy");
    std::fs::write(
        env.path("expiring/app.toml"),
        format!("{p}\n[retention]\nfull = 1\ndiff = 1\n"),
    )
    .expect("policy");
    let cfg = std::fs::read_to_string(env.config()).expect("cfg");
    let expiring = env.path("expiring.toml");
    std::fs::write(
        &expiring,
        cfg.replace("policies = \"policies\"", "policies = \"expiring\""),
    )
    .expect("cfg");
    let mut rng = Rng::new(common::faults::seed() ^ 0xe7);
    let mut typical = Duration::from_millis(50);
    let mut seen = BTreeSet::new();
    for _ in 0..iters() {
        for kind in ["full", "diff", "diff"] {
            touch(&env, &mut rng);
            std::thread::sleep(Duration::from_millis(1000));
            env.dr(&["backup-local", "app", "--type", kind]).ok();
        }
        let newest = all_verify(&env, "local", &mut seen);
        kill_after(&expiring, &["expire", "app"], moment(&mut rng, typical));
        assert_eq!(
            all_verify(&env, "local", &mut seen),
            newest,
            "expire never removes the newest"
        );
        let t = Instant::now();
        let r = Command::new(common::dr_bin())
            .arg("--config")
            .arg(&expiring)
            .args(["expire", "app"])
            .output()
            .expect("expire");
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        typical = t.elapsed();
        assert_eq!(all_verify(&env, "local", &mut seen), newest);
        env.restore("r.db", &["--force"]).ok();
        assert_eq!(dump(&env.path("r.db")), dump(&env.db));
    }
}

#[test]
fn restore_killed_at_random_moments_leaves_the_destination_whole() {
    let env = Env::new("");
    make_db(&env.db, true, 8_000, 2000);
    let mut rng = Rng::new(common::faults::seed() ^ 0x7e);
    env.dr(&["backup-local", "app"]).ok();
    let want = dump(&env.db);
    let to = env.path("r.db").display().to_string();
    let key = env.key_arg();
    let args = [
        "restore-local",
        "app",
        "--to",
        &to,
        "--identity",
        &key,
        "--force",
    ];
    let typical = timed(&env, &args);
    for _ in 0..iters() {
        kill_after(&env.config(), &args, moment(&mut rng, typical));
        // The destination is the previous restore, whole, or the new one, whole.
        assert_eq!(dump(&env.path("r.db")), want);
        env.dr(&args).ok();
        assert!(
            plaintext_left(&env).is_empty(),
            "{:?}",
            plaintext_left(&env)
        );
        assert_eq!(dump(&env.path("r.db")), want);
    }
}

const WAL_POLICY: &str = "[wal]\nenabled = true\nsync_interval = \"1s\"\ncheckpoint_pages = 200\nsegment_max = \"256KiB\"\n";

fn writer(env: &Env, bursts: u32) -> common::Proc {
    common::Proc::spawn(
        Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/wal_writer.py"))
            .arg("write")
            .arg(&env.db)
            .arg(env.path("marks"))
            .args([bursts, 30, 400, 1000].map(|n| n.to_string())),
    )
    .expect("python3 writer")
}

/// The newest instant a point-in-time restore reaches.
fn reach(env: &Env) -> Option<String> {
    let j = env.dr(&["info", "--json"]).json();
    j["policies"][0]["targets"][0]["wal"]["windows"]
        .as_array()
        .and_then(|w| {
            w.iter()
                .filter_map(|w| w["end"].as_str())
                .max()
                .map(String::from)
        })
}

#[test]
fn replicate_killed_at_random_moments_never_loses_what_it_shipped() {
    let env = Env::new(WAL_POLICY);
    common::make_db(&env.db, true, 50, 500);
    let mut rng = Rng::new(common::faults::seed() ^ 0x3a);
    let mut reached: Option<String> = None;
    let mut w = writer(&env, 4 * iters() as u32);
    for _ in 0..iters() {
        kill_after(
            &env.config(),
            &["replicate"],
            Duration::from_millis(1500 + rng.below(2500)),
        );
        let now = reach(&env);
        assert!(
            now >= reached,
            "the restorable instant moved back: {now:?} < {reached:?}"
        );
        reached = now;
    }
    let _ = w.wait();
    w = writer(&env, 2);
    let mut dr = spawn(&env.config(), &["replicate"]);
    let _ = w.wait();
    let want = common::digest(&env.db);
    std::thread::sleep(Duration::from_millis(2500));
    let _ = Command::new("kill")
        .args(["-TERM", &dr.id().to_string()])
        .status();
    assert!(dr.wait().expect("wait").success());
    all_verify(&env, "local", &mut BTreeSet::new());
    env.restore("newest.db", &["--force"]).ok();
    assert_eq!(common::digest(&env.path("newest.db")), want);
}
