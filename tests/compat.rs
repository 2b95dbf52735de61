//! Repositories written by earlier dr builds (tests/fixtures/repository-v1,
//! format 1; tests/fixtures/repository-v2, format 2: framed data objects)
//! still list, verify and restore with the dr under test, byte for byte:
//! the compatibility promise, checked on every change.

mod common;

use std::path::Path;

/// One fixture: its labels, and the sha256 of the files the dr that
/// wrote it restored (the newest backup, then the full alone).
struct Fixture {
    dir: &'static str,
    format: u64,
    full: &'static str,
    diff: &'static str,
    restored_sha256: &'static str,
    full_sha256: &'static str,
}

const V1: Fixture = Fixture {
    dir: "repository-v1",
    format: 1,
    full: "20261206-003026F",
    diff: "20261206-003026F_20261206-003028D",
    restored_sha256: "9e6fc9165676e96b9cda540c7a02a1e0548d2c578dc7938f9fdf886a4c318be6",
    full_sha256: "3cb62052cb6610554a1fe9b56491c60d4a71c98b5075de19c9e5503800ed145c",
};

const V2: Fixture = Fixture {
    dir: "repository-v2",
    format: 2,
    full: "20261206-213550F",
    diff: "20261206-213550F_20261206-213551D",
    restored_sha256: "c3f430336d7e411a3248ce01aefa2b9682c704663317b1d93e574f6e55385baf",
    full_sha256: "a3007c6638ffc38ecff8ca295b72ba856d477f3a746075df567bfa6993edf2b8",
};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).expect("copy");
        }
    }
}

fn rows(db: &Path) -> String {
    let c = rusqlite::Connection::open(db).expect("open");
    let mut st = c
        .prepare("SELECT id, body FROM notes ORDER BY id")
        .expect("prepare");
    let rows: Vec<String> = st
        .query_map([], |r| {
            Ok(format!(
                "{}|{}",
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?
            ))
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    rows.iter().map(|r| format!("{r}\n")).collect()
}

#[test]
fn a_repository_written_by_format_1_lists_verifies_and_restores() {
    assert_eq!(check(&V1), "1|first\n2|second\n3|third\n");
}

#[test]
fn a_repository_written_by_format_2_lists_verifies_and_restores() {
    check(&V2);
}

/// Lists, verifies and restores `fx`; returns the rows of its full
/// restored alone.
fn check(fx: &Fixture) -> String {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fx.dir);
    let dir = tempfile::tempdir().expect("tmp");
    copy_dir(&fixture.join("app"), &dir.path().join("backups/app"));
    // Git keeps no file modes: the identity is made private again.
    let key = dir.path().join("backup.key");
    std::fs::copy(fixture.join("backup.key"), &key).expect("key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::create_dir_all(dir.path().join("policies")).expect("policies");
    std::fs::write(
        dir.path().join("dr.toml"),
        format!(
            "state_dir = \"state\"\npolicies = \"policies\"\n[encryption]\nrecipients_file = \"{}\"\nidentity_file = \"{}\"\n[targets.local]\nkind = \"local\"\npath = \"backups\"\n",
            fixture.join("backup.pub").display(),
            key.display()
        ),
    )
    .expect("config");
    std::fs::write(
        dir.path().join("policies/app.toml"),
        "name = \"app\"\ntargets = [\"local\"]\n[source]\nkind = \"sqlite\"\npath = \"app.db\"\n",
    )
    .expect("policy");
    let dr = |args: &[&str]| {
        common::Run::from(
            std::process::Command::new(common::dr_bin())
                .arg("--config")
                .arg(dir.path().join("dr.toml"))
                .args(args)
                .output()
                .expect("dr"),
        )
    };
    let info = dr(&["info", "app", "--json"]);
    let labels: Vec<String> = info.json()["policies"][0]["targets"][0]["backups"]
        .as_array()
        .unwrap_or_else(|| panic!("{}{}", info.stdout, info.stderr))
        .iter()
        .map(|b| {
            assert!(b["error"].is_null(), "{b}");
            assert_eq!(b["format"], fx.format, "{b}");
            b["label"].as_str().expect("label").to_string()
        })
        .collect();
    assert_eq!(labels, [fx.full, fx.diff]);
    let v = dr(&["verify", "app"]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    let to = dir.path().join("restored.db");
    let r = dr(&["restore-local", "app", "--to", &to.display().to_string()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let want = std::fs::read_to_string(fixture.join("expected.txt")).expect("expected");
    assert_eq!(rows(&to), want);
    assert_eq!(common::sha256_file(&to), fx.restored_sha256);
    let full = dir.path().join("full.db");
    let r = dr(&[
        "restore-local",
        "app",
        "--to",
        &full.display().to_string(),
        "--backup",
        fx.full,
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(common::sha256_file(&full), fx.full_sha256);
    rows(&full)
}
