//! A repository written by an earlier dr (tests/fixtures/repository-v1,
//! manifest format 1) still lists, verifies and restores with the dr under
//! test: the compatibility promise, checked on every change.

mod common;

use std::path::Path;

const FULL: &str = "20261206-003026F";
const DIFF: &str = "20261206-003026F_20261206-003028D";

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
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repository-v1");
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
            b["label"].as_str().expect("label").to_string()
        })
        .collect();
    assert_eq!(labels, [FULL, DIFF]);
    let v = dr(&["verify", "app"]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    let to = dir.path().join("restored.db");
    let r = dr(&["restore-local", "app", "--to", &to.display().to_string()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let want = std::fs::read_to_string(fixture.join("expected.txt")).expect("expected");
    assert_eq!(rows(&to), want);
    let full = dir.path().join("full.db");
    let r = dr(&[
        "restore-local",
        "app",
        "--to",
        &full.display().to_string(),
        "--backup",
        FULL,
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(rows(&full), "1|first\n2|second\n3|third\n");
}
