//! Repository format 2 (issue 25): the data object is cut into frames
//! decoded on every core. A restore gets the same bytes on one core as on
//! two; one changed byte in a frame, the page index or the manifest is
//! refused and named; a format 1 chain is never extended by a format 2
//! diff, and both stay restorable.

mod common;

use common::{Env, dump, make_db, sha256_file};

/// A policy `app` with small frames, so a small database has many.
fn framed_env(extra_top: &str) -> Env {
    let env = Env::new("");
    std::fs::write(
        env.path("policies/app.toml"),
        format!(
            "name = \"app\"\ntargets = [\"local\"]\n{extra_top}[source]\nkind = \"sqlite\"\npath = \"app.db\"\n[compression]\nframe = \"64KiB\"\n"
        ),
    )
    .expect("policy");
    make_db(&env.db, true, 600, 3000);
    env
}

/// The data object's digest in the newest manifest under `backups/`.
fn data_digest(env: &Env, label: &str) -> serde_json::Value {
    let path = env.path(&format!("backups/app/backup/{label}/manifest.json"));
    let text = std::fs::read_to_string(path).expect("manifest");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["manifest"]["objects"]["data.zst.age"].clone()
}

fn formats(env: &Env) -> Vec<u64> {
    let info = env.dr(&["info", "app", "--json"]).ok().json();
    info["policies"][0]["targets"][0]["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| b["format"].as_u64().expect("format"))
        .collect()
}

#[test]
fn a_format_2_backup_restores_the_same_bytes_on_one_core_and_on_two() {
    let env = framed_env("");
    let label = env.full_backup("backup-local");
    let d = data_digest(&env, &label);
    let frames = d["framed"]["frames"].as_u64().expect("a framed digest");
    assert!(frames > 10, "{d}");
    assert!(d.get("plain_sha256").is_none(), "{d}");
    assert_eq!(formats(&env), [2]);

    env.restore("two.db", &[]).ok();
    let one = env.path("one.db");
    common::Run::from(
        std::process::Command::new("taskset")
            .args(["-c", "0", common::dr_bin(), "--config"])
            .arg(env.config())
            .args(["restore-local", "app", "--to"])
            .arg(&one)
            .args(["--identity", &env.key_arg()])
            .output()
            .expect("taskset (util-linux)"),
    )
    .ok();
    assert_eq!(sha256_file(&one), sha256_file(&env.path("two.db")));
    assert_eq!(dump(&one), dump(&env.db));
    // The stored object is still one zstd stream inside age.
    let r = env.dr(&["verify", "app", "--identity", &env.key_arg()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

fn flip(path: &std::path::Path, at: usize) {
    let mut b = std::fs::read(path).expect("read");
    let at = at.min(b.len() - 1);
    b[at] ^= 0x04;
    std::fs::write(path, b).expect("write");
}

#[test]
fn a_changed_byte_in_a_frame_the_index_or_the_manifest_is_refused_and_named() {
    // Unencrypted, so that nothing but dr's own digests stands guard.
    let env = framed_env("encryption = \"none\"\n");
    let label = env.full_backup("backup-local");
    let dir = env.path(&format!("backups/app/backup/{label}"));
    let good = env.path("good");
    std::fs::create_dir_all(&good).expect("mkdir");
    for f in ["data.zst.age", "pages.zst.age", "manifest.json"] {
        std::fs::copy(dir.join(f), good.join(f)).expect("keep");
    }
    let put_back = || {
        for f in ["data.zst.age", "pages.zst.age", "manifest.json"] {
            std::fs::copy(good.join(f), dir.join(f)).expect("put back");
        }
    };

    // A byte inside a frame, a third of the way in.
    let len = std::fs::metadata(dir.join("data.zst.age"))
        .expect("stat")
        .len() as usize;
    flip(&dir.join("data.zst.age"), len / 3);
    let r = env.restore("a.db", &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains("data.zst.age") && r.stderr.contains("frame "),
        "{}",
        r.stderr
    );
    let r = env.dr(&["verify", "app"]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(!env.path("a.db").exists());
    put_back();

    // A frame header: the second frame's plain length.
    let first_comp = {
        let b = std::fs::read(dir.join("data.zst.age")).expect("read");
        u32::from_le_bytes([b[16], b[17], b[18], b[19]]) as usize
    };
    flip(&dir.join("data.zst.age"), 56 + first_comp + 13);
    let r = env.restore("a.db", &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("frame 1"), "{}", r.stderr);
    put_back();

    // The page index.
    flip(&dir.join("pages.zst.age"), 40);
    let r = env.restore("a.db", &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("pages.zst.age"), "{}", r.stderr);
    put_back();

    // The manifest's record of the frames.
    let m = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest");
    let at = m.find("\"frames\": ").expect("frames") + "\"frames\": ".len();
    let mut b = m.into_bytes();
    b[at] = if b[at] == b'9' { b'8' } else { b'9' };
    std::fs::write(dir.join("manifest.json"), b).expect("write");
    let r = env.restore("a.db", &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("manifest"), "{}", r.stderr);
    put_back();

    env.restore("a.db", &[]).ok();
    assert_eq!(dump(&env.path("a.db")), dump(&env.db));
}

#[test]
fn a_format_1_chain_is_never_extended_by_a_format_2_diff_and_both_restore() {
    let env = Env::new("[compression]\nformat = 1\n");
    make_db(&env.db, true, 300, 1000);
    let v1 = env.full_backup("backup-local");
    assert!(data_digest(&env, &v1)["plain_sha256"].is_string());
    let before = dump(&env.db);
    let c = rusqlite::Connection::open(&env.db).expect("open");
    c.execute_batch("INSERT INTO t(v) VALUES (randomblob(2000));")
        .expect("change");
    drop(c);

    // The upgrade: the policy now writes format 2; a diff asked for
    // becomes a full that says why.
    env.write_policy("app", "app.db", "");
    let r = env
        .dr(&["backup-local", "app", "--type", "diff", "--json"])
        .ok();
    let j = r.json();
    assert_eq!(j[0]["type"], "full", "{j}");
    let note = j[0]["note"].as_str().unwrap_or_default().to_string();
    assert!(note.contains("repository format 1"), "{j}");
    assert_eq!(formats(&env), [1, 2]);

    env.restore("old.db", &["--backup", &v1]).ok();
    assert_eq!(dump(&env.path("old.db")), before);
    env.restore("new.db", &[]).ok();
    assert_eq!(dump(&env.path("new.db")), dump(&env.db));

    // A format 2 full then takes diffs in format 2.
    env.dr(&["backup-local", "app", "--type", "diff"]).ok();
    assert_eq!(formats(&env), [1, 2, 2]);
}
