//! Entry points for fuzzing the parsers that read what dr did not write
//! itself this run: manifests, labels, segment names, WAL segments, page
//! streams and indexes, format 2's framed data objects, SQLite `-wal`
//! files and configuration files.
//!
//! Each takes arbitrary bytes and must return without panicking, in memory
//! bounded by the input and dr's own limits. Where a parse succeeds, it
//! checks the property that makes the parse trustworthy (what is parsed
//! round-trips). The same functions serve the mutation fuzzer in
//! `tests/fuzz.rs` (a short run in `scripts/test`) and the cargo-fuzz
//! targets under `fuzz/` (`scripts/fuzz`, the long run).

use std::path::Path;

use crate::repo::{Label, Manifest};
use crate::sqlite::{IndexReader, PageReader, segment::SegmentReader};

/// A manifest envelope: parse; a parsed one re-serialises to an equal one.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = Manifest::from_bytes(data) {
        let again = Manifest::from_bytes(&m.to_bytes());
        assert_eq!(
            again.as_ref().ok(),
            Some(&m),
            "a parsed manifest round-trips"
        );
    }
}

/// A manifest *body* in a valid envelope (its sha256 recomputed, as any
/// writer to the bucket could): what the checksum would stop is parsed,
/// and a manifest judged intact against a listing that matches it in every
/// way a listing can must agree with itself: its label, type and parent,
/// dr's own object names, SQLite's page limits.
pub fn manifest_body(data: &[u8]) {
    use sha2::Digest;
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let sum = hex::encode(sha2::Sha256::digest(body.as_bytes()));
    let env = format!("{{\"manifest\": {body},\n\"sha256\": \"{sum}\"}}\n");
    let Ok(m) = Manifest::from_bytes(env.as_bytes()) else {
        return;
    };
    let dir = crate::repo::BackupDir {
        label: m.label.clone(),
        keys: Vec::new(),
        sizes: m
            .objects
            .iter()
            .map(|(n, d)| (n.clone(), d.stored_size))
            .collect(),
        has_manifest: true,
        modified: m.timestamp_stop,
    };
    if crate::repo::catalog::check_intact(&dir, &m).is_ok() {
        assert_eq!(m.kind, m.label.kind(), "type agrees with the label");
        match m.kind {
            crate::repo::BackupType::Full => assert!(m.parent.is_none(), "a full has no parent"),
            crate::repo::BackupType::Diff => {
                assert_eq!(
                    m.parent.as_ref(),
                    Some(&m.label.full_label()),
                    "a diff's parent is its full"
                );
                assert_ne!(m.parent.as_ref(), Some(&m.label), "never its own parent");
            }
        }
        assert!(
            m.objects
                .keys()
                .all(|n| n == crate::repo::DATA || n == crate::repo::PAGES),
            "only dr's own object names"
        );
        if m.source_kind == "sqlite" {
            assert!(m.page_size.is_power_of_two() && (512..=65536).contains(&m.page_size));
        }
        assert!(
            m.timestamp_start >= m.label.time(),
            "no snapshot before its label"
        );
    }
}

/// A backup label and a WAL segment name.
pub fn names(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(l) = s.parse::<Label>() {
        assert_eq!(
            l.to_string().parse::<Label>().ok(),
            Some(l.clone()),
            "a parsed label round-trips"
        );
        let _ = l.full_label();
    }
    if let Some((first, last, t0, t1)) = crate::repo::wal::parse_name(s) {
        let name = crate::repo::wal::segment_name(first, last, t0, t1);
        assert_eq!(
            crate::repo::wal::parse_name(&name),
            Some((first, last, t0, t1))
        );
    }
}

/// A WAL segment, read to its end (every frame, the closing hash).
pub fn segment(data: &[u8]) {
    let Ok(mut r) = SegmentReader::new(data) else {
        return;
    };
    // Every frame costs input bytes, so this ends; the bound is a backstop.
    for _ in 0..=data.len() {
        match r.next_txn() {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

/// A WAL segment *body* with its closing hash recomputed (as anyone who
/// can write to the target and holds the public recipient could: age
/// encrypts, it does not authenticate the writer), replayed over a
/// one-page base as a restore would. What the hash would stop is applied:
/// a replay that succeeds leaves a file of whole pages, the size the last
/// applied commit declared, never empty.
pub fn segment_body(data: &[u8], scratch: &Path) {
    use sha2::Digest;
    if data.len() < 24 {
        return;
    }
    let mut seg = data.to_vec();
    seg.extend_from_slice(&0u32.to_le_bytes());
    let sum = sha2::Sha256::digest(&seg);
    seg.extend_from_slice(&sum);
    let Ok(mut r) = SegmentReader::new(&seg[..]) else {
        return;
    };
    // The frames it holds, from its own framing: its name would say so.
    let (first, page_size) = (r.first_seq, r.page_size);
    let mut frames = 0u64;
    for _ in 0..=seg.len() {
        match r.next_txn() {
            Ok(Some(t)) => frames += u64::from(t.nframes),
            Ok(None) => break,
            Err(_) => return,
        }
    }
    let (Some(last), Some(first_minus)) = ((first + frames).checked_sub(1), first.checked_sub(1))
    else {
        return;
    };
    let path = scratch.join("fuzz-replay.db");
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
    else {
        return;
    };
    if file.set_len(u64::from(page_size)).is_err() {
        return;
    }
    let mut rep =
        crate::sqlite::apply::Replayer::new(&file, &path, "base", page_size, 1, first_minus, None);
    if rep.segment(&seg[..], "fuzz", first, last).is_ok() && rep.finish().is_ok() {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "a replay never leaves an empty database");
        assert_eq!(len % u64::from(page_size), 0, "whole pages only");
        assert!(
            len <= u64::from(page_size) * u64::from(u32::MAX),
            "within SQLite's page count"
        );
    }
    let _ = std::fs::remove_file(&path);
}

/// A page stream (backup data) and a page-hash index.
pub fn pages(data: &[u8]) {
    if let Ok(mut r) = PageReader::new(data) {
        for _ in 0..=data.len() {
            match r.next_page() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
    if let Ok(mut r) = IndexReader::new(data) {
        for _ in 0..=data.len() {
            match r.next_hash() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
}

/// A format 2 data object as stored without encryption, decoded against
/// a digest that matches its stored bytes: every frame header, length
/// and hash is checked without a panic, in memory bounded by the frame
/// limit; a decode that succeeds reproduces the plain size.
pub fn frames(data: &[u8]) {
    use std::io::Read;
    let digest = crate::codec::ObjectDigest {
        plain_size: 0,
        plain_sha256: String::new(),
        stored_size: data.len() as u64,
        stored_sha256: String::new(),
        framed: Some(crate::codec::Framed {
            frame_size: crate::codec::framed::MIN_FRAME,
            frames: 0,
            plain_blake3: String::new(),
            stored_blake3: blake3::hash(data).to_hex().to_string(),
        }),
    };
    let input = std::io::Cursor::new(data.to_vec());
    if let Ok(mut d) = crate::codec::Decoder::new(input, "fuzz", &digest, None, false) {
        let mut sink = [0u8; 64 << 10];
        loop {
            match d.read(&mut sink) {
                Ok(0) => panic!(
                    "a decode against a digest of no frames succeeded on {} bytes",
                    data.len()
                ),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
}

/// A SQLite `-wal` file as the streamer reads it, written to `scratch`.
pub fn wal_file(data: &[u8], scratch: &Path) {
    let path = scratch.join("fuzz.db-wal");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(f) = std::fs::File::open(&path) else {
        return;
    };
    if let Ok(Some(h)) = crate::sqlite::wal::read_header(&f) {
        let cur = crate::sqlite::wal::Cursor::start(h);
        if let Ok(txns) = crate::sqlite::wal::scan(&f, &cur) {
            for t in txns.iter().take(64) {
                let _ = crate::sqlite::wal::read_frames(&f, &h, t.first, t.last, |_, page| {
                    assert_eq!(page.len() as u64, u64::from(h.page_size));
                    Ok(())
                });
            }
        }
    }
}

/// A configuration: `data` as dr.toml, then as a policy file beside a valid
/// dr.toml, both loaded from `scratch`.
pub fn config(data: &[u8], scratch: &Path) {
    let top = scratch.join("dr.toml");
    let policies = scratch.join("policies");
    let _ = std::fs::create_dir_all(&policies);
    if std::fs::write(&top, data).is_ok() {
        let _ = crate::config::load(&top);
    }
    let base = "state_dir = \"state\"\n[encryption]\nrecipients = [\"age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p\"]\n[targets.local]\nkind = \"local\"\npath = \"backups\"\n";
    if std::fs::write(&top, base).is_ok() && std::fs::write(policies.join("p.toml"), data).is_ok() {
        let _ = crate::config::load(&top);
    }
    let _ = std::fs::remove_file(policies.join("p.toml"));
}
