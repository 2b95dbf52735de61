//! The Debian package: built by `scripts/package-deb` (cargo-deb), installed
//! with `dpkg -i` into a scratch root, then its dr run and its systemd unit
//! verified where the package put them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/install-test-deps)"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {said}");
    said
}

fn the_package() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    run(&mut Command::new(root.join("scripts/package-deb")));
    let version = env!("CARGO_PKG_VERSION");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(root.join("target/debian"))
        .expect("target/debian")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("dr_{version}")) && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    debs.pop()
        .expect("scripts/package-deb made no dr_<version>*.deb")
}

#[test]
fn the_deb_installs_dr_its_unit_manual_pages_and_completions() {
    let deb = the_package();
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/dr",
        "./lib/systemd/system/dr.service",
        "./usr/share/man/man1/dr.1.gz",
        "./usr/share/man/man1/dr-backup-local.1.gz",
        "./usr/share/man/man1/dr-restore-s3.1.gz",
        "./usr/share/man/man1/dr-keys-status.1.gz",
        "./usr/share/man/man1/dr-pg-setup.1.gz",
        "./usr/share/bash-completion/completions/dr",
        "./usr/share/zsh/vendor-completions/_dr",
        "./usr/share/fish/vendor_completions.d/dr.fish",
        "./usr/share/doc/dr/examples/dr.toml",
        "./usr/share/doc/dr/examples/grafana-dashboard.json",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} is not in the package:\n{listing}"
        );
    }

    // dpkg -i into a scratch root of its own (its own database too).
    let scratch = tempfile::tempdir().expect("tmp");
    let root = scratch.path();
    let admin = root.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(d)).expect("dpkg dirs");
    }
    std::fs::write(admin.join("status"), "").expect("status");
    run(Command::new("dpkg")
        .arg(format!("--instdir={}", root.display()))
        .arg(format!("--admindir={}", admin.display()))
        .args([
            "--force-not-root",
            "--force-script-chrootless",
            "--force-depends",
            "-i",
        ])
        .arg(&deb));
    let status = std::fs::read_to_string(admin.join("status")).expect("status");
    assert!(
        status.contains("Package: dr\n") && status.contains("Status: install ok installed"),
        "{status}"
    );

    let dr = root.join("usr/bin/dr");
    let version = run(Command::new(&dr).arg("--version"));
    assert_eq!(version.trim(), format!("dr {}", env!("CARGO_PKG_VERSION")));

    // The unit runs the packaged dr, and verifies where it is installed.
    let unit = root.join("lib/systemd/system/dr.service");
    let text = std::fs::read_to_string(&unit).expect("unit");
    assert!(text.contains("ExecStart=/usr/bin/dr "), "{text}");
    assert!(!text.contains("/usr/local"), "{text}");
    // systemd-analyze checks ExecStart's program and man:dr(1): the unit
    // is verified as installed, with /usr/bin pointing into the scratch
    // root (`--root` would want a whole system's units there).
    let verified = scratch.path().join("verify/dr.service");
    std::fs::create_dir_all(verified.parent().expect("dir")).expect("dir");
    std::fs::write(
        &verified,
        text.replace("/usr/bin/dr", &dr.display().to_string()),
    )
    .expect("unit");
    common::systemd_verifies(&verified, &root.join("usr/share/man"));
    // The example configuration loads (its paths need not exist for that).
    let example = root.join("usr/share/doc/dr/examples/dr.toml");
    assert!(
        std::fs::read_to_string(&example)
            .expect("example")
            .contains("state_dir = \"/var/lib/dr\"")
    );
}
