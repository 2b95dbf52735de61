//! A mutation fuzzer over the parsers of untrusted input (`dr::fuzz`):
//! seeds are real objects (a manifest dr wrote, segments, page streams, a
//! live SQLite -wal file, the shipped configuration), mutated on a seeded
//! schedule. No input may panic, and memory stays bounded.
//!
//! `DR_FUZZ_ITERS` sets the mutations per target (default 3000, the short
//! run in `scripts/test`); `scripts/fuzz` runs cargo-fuzz for the long run,
//! and what it finds is kept in `tests/fuzz-regressions/<target>-*.bin`,
//! replayed here as seeds.

mod common;

use std::path::Path;

use common::faults::Rng;

fn iters() -> u64 {
    std::env::var("DR_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000)
}

const INTERESTING: [u32; 8] = [0, 1, 0x7f, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 65536];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut d = seeds[rng.below(seeds.len() as u64) as usize].clone();
    for _ in 0..=rng.below(4) {
        let len = d.len().max(1) as u64;
        match rng.below(8) {
            0 if !d.is_empty() => {
                let i = rng.below(len) as usize;
                d[i] ^= 1 << rng.below(8);
            }
            1 if !d.is_empty() => {
                let i = rng.below(len) as usize;
                d[i] = rng.next() as u8;
            }
            2 => d.truncate(rng.below(len + 1) as usize),
            3 => {
                let i = rng.below(len + 1) as usize;
                let n = rng.below(64) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(i.min(d.len())..i.min(d.len()), bytes);
            }
            4 if d.len() > 1 => {
                let i = rng.below(len) as usize;
                let n = (rng.below(256) as usize).min(d.len() - i);
                d.drain(i..i + n);
            }
            5 if d.len() >= 4 => {
                let i = rng.below(len - 3) as usize;
                let v = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
                let b = if rng.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                d[i..i + 4].copy_from_slice(&b);
            }
            6 if !d.is_empty() => {
                let i = rng.below(len) as usize;
                let n = (rng.below(512) as usize).min(d.len() - i);
                let chunk = d[i..i + n].to_vec();
                let j = rng.below(d.len() as u64 + 1) as usize;
                d.splice(j..j, chunk);
            }
            _ => {
                let other = &seeds[rng.below(seeds.len() as u64) as usize];
                let cut = rng.below(d.len() as u64 + 1) as usize;
                let from = rng.below(other.len() as u64 + 1) as usize;
                d.truncate(cut);
                d.extend_from_slice(&other[from..]);
            }
        }
    }
    d
}

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Runs `target` on every seed as is, then on `n` mutations; a panic
/// fails the test with the input that caused it.
fn fuzz(name: &str, salt: u64, n: u64, mut seeds: Vec<Vec<u8>>, target: impl Fn(&[u8])) {
    assert!(!seeds.is_empty());
    // Inputs the long run (cargo-fuzz) found once stay in every short run.
    let found = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    if let Ok(rd) = std::fs::read_dir(found) {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}-"))
            {
                seeds.push(std::fs::read(e.path()).expect("regression input"));
            }
        }
    }
    // scripts/fuzz starts cargo-fuzz from these same real objects.
    if let Ok(corpus) = std::env::var("DR_FUZZ_CORPUS") {
        let dir = Path::new(&corpus).join(if name == "wal" { "wal_file" } else { name });
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).expect("corpus seed");
        }
    }
    let mut rng = Rng::new(common::faults::seed() ^ salt);
    for i in 0..n + seeds.len() as u64 {
        let input = match seeds.get(i as usize) {
            Some(s) => s.clone(),
            None => mutate(&mut rng, &seeds),
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input)));
        if outcome.is_err() {
            let dump = std::env::temp_dir().join(format!("dr-fuzz-{name}-{i}.bin"));
            let _ = std::fs::write(&dump, &input);
            panic!("{name}: input {i} panicked; saved to {}", dump.display());
        }
    }
    let rss = peak_rss_mib();
    eprintln!("{name}: {n} mutated inputs, peak RSS {rss} MiB");
    assert!(rss < 1024, "{name}: memory grew to {rss} MiB");
}

/// Objects of a real backup, written unencrypted so the seeds are the plain formats.
fn real_backup() -> (tempfile::TempDir, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let env = common::Env::new("encryption = \"none\"\n");
    let policy = env.path("policies/app.toml");
    let text = std::fs::read_to_string(&policy).expect("policy");
    // `encryption` is a top-level key of the policy: move it above [source].
    let text = text.replace("encryption = \"none\"\n", "").replacen(
        "[source]",
        "encryption = \"none\"\n[source]",
        1,
    );
    std::fs::write(&policy, text).expect("policy");
    common::make_db(&env.db, true, 20, 300);
    env.dr(&["backup-local", "app"]).ok();
    let dir = common::files_under(&env.path("backups"))
        .into_iter()
        .find(|f| f.ends_with("manifest.json"))
        .expect("manifest");
    let base = env
        .path("backups")
        .join(Path::new(&dir).parent().expect("dir"));
    let read = |n: &str| std::fs::read(base.join(n)).expect("object");
    let unzstd = |b: Vec<u8>| zstd::decode_all(&b[..]).expect("zstd");
    let manifest = read("manifest.json");
    let framed = read("data.zst.age");
    // Format 2's frames are one zstd stream still.
    let data = unzstd(framed.clone());
    let pages = unzstd(read("pages.zst.age"));
    (env.dir, manifest, data, pages, framed)
}

#[test]
fn manifests_and_labels() {
    let (_dir, manifest, _, _, _) = real_backup();
    fuzz(
        "manifest",
        1,
        iters(),
        vec![manifest.clone()],
        dr::fuzz::manifest,
    );
    // The body under a recomputed envelope: the parser and the intact
    // checks behind the checksum are reached, not just the checksum.
    let text = String::from_utf8(manifest).expect("utf8");
    let start = text[1..].find('{').expect("body") + 1;
    let end = text.rfind(",\n\"sha256\"").expect("sum");
    fuzz(
        "manifest_body",
        5,
        iters(),
        vec![text.as_bytes()[start..end].to_vec()],
        dr::fuzz::manifest_body,
    );
    fuzz(
        "names",
        2,
        iters(),
        vec![
            b"20261122-031500F".to_vec(),
            b"20261122-031500F_20261122-091500D".to_vec(),
            b"0000000000000001-0000000000000453_20261122T031500.000Z_20261122T031501.250Z.zst.age"
                .to_vec(),
        ],
        dr::fuzz::names,
    );
}

#[test]
fn page_streams_indexes_and_segments() {
    let (_dir, _, data, pages, framed) = real_backup();
    fuzz("pages", 3, iters(), vec![data, pages], dr::fuzz::pages);
    fuzz("frames", 8, iters() / 3, vec![framed], dr::fuzz::frames);
    let mut seg = Vec::new();
    {
        let mut w = dr::sqlite::segment::SegmentWriter::new(&mut seg, 512, 41).expect("w");
        w.txn(2, 3, 1_000).expect("txn");
        w.frame(1, &[1u8; 512]).expect("f");
        w.frame(3, &[3u8; 512]).expect("f");
        w.txn(1, 3, 2_000).expect("txn");
        w.frame(2, &[2u8; 512]).expect("f");
        w.finish().expect("finish");
    }
    // The body with its hash recomputed, replayed as a restore would.
    let body = seg[..seg.len() - 36].to_vec();
    fuzz("segment", 4, iters(), vec![seg], dr::fuzz::segment);
    let scratch = tempfile::tempdir().expect("tmp");
    fuzz("segment_body", 6, iters() / 3, vec![body], |d| {
        dr::fuzz::segment_body(d, scratch.path())
    });
}

#[test]
fn sqlite_wal_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("seed.db");
    let c = rusqlite::Connection::open(&db).expect("open");
    c.execute_batch(
        "PRAGMA page_size=512; PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
         CREATE TABLE t(x); INSERT INTO t VALUES (randomblob(300)); INSERT INTO t VALUES (2);",
    )
    .expect("wal");
    let wal = std::fs::read(dir.path().join("seed.db-wal")).expect("wal file");
    drop(c);
    let scratch = tempfile::tempdir().expect("tmp");
    // Each input goes through a file: a third of the count.
    fuzz("wal", 5, iters() / 3, vec![wal], |d| {
        dr::fuzz::wal_file(d, scratch.path())
    });
}

#[test]
fn configuration_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let seeds: Vec<Vec<u8>> = [
        "examples/dr.toml",
        "examples/policies/app.toml",
        "examples/policies/main-pg.toml",
        "examples/policies/tenants.toml",
        "dr.example.toml",
    ]
    .iter()
    .map(|f| std::fs::read(root.join(f)).expect("seed"))
    .collect();
    let scratch = tempfile::tempdir().expect("tmp");
    fuzz("config", 6, iters() / 3, seeds, |d| {
        dr::fuzz::config(d, scratch.path())
    });
}
