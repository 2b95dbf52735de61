//! The README's "Your first backup" commands, run as written in an empty
//! directory, with the `dr` under test first on PATH.

mod common;

#[test]
fn the_readme_first_backup_runs_as_written() {
    let block = common::readme_block("readme-test");
    let dir = tempfile::tempdir().expect("tmp");
    let path = common::path_with_dr();
    let mut out_all = String::new();
    let mut selected = None;
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let out = std::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", line])
            .current_dir(dir.path())
            .env("PATH", &path)
            .env_remove("DR_CONFIG")
            .output()
            .expect("bash");
        let text = format!(
            "$ {line}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out_all.push_str(&text);
        assert!(out.status.success(), "{out_all}");
        if line.starts_with("sqlite3 restored.db") {
            selected = Some(String::from_utf8_lossy(&out.stdout).into_owned());
        }
    }
    // What the README's reader sees: the row, read from the restored file
    // alone (not from an echo of the command that wrote it).
    assert_eq!(
        selected.as_deref(),
        Some("hello\n"),
        "the restored row: {out_all}"
    );
    assert_eq!(
        common::dump(&dir.path().join("restored.db")),
        common::dump(&dir.path().join("app.db")),
        "the restored database equals the source"
    );
    // dr init never overwrites what exists.
    let again = std::process::Command::new(common::dr_bin())
        .args(["init", "--db", "app.db", "--target", "backups"])
        .current_dir(dir.path())
        .output()
        .expect("dr");
    assert_eq!(again.status.code(), Some(6));
}
