//! `dr demo`: the whole pipeline on a built-in example, for a first run.
//!
//! It creates a SQLite database in WAL mode with a live writer, a key, a
//! config and a policy, then takes a full and a diff backup while the writer
//! keeps committing, restores, verifies and shows `dr info`: everything a
//! newcomer needs to see, in seconds, with nothing set up beforehand.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::context::Context;
use crate::progress::Silent;

use crate::error::{Error, Result};
use crate::ops;
use crate::repo::BackupType;

const MARKER: &str = ".dr-demo";

fn sql(e: rusqlite::Error) -> Error {
    Error::Other(format!("demo database: {e}"))
}

/// Runs the demo in `dir`, replacing an earlier demo there.
pub fn run(dir: &Path) -> Result<()> {
    if dir.exists() {
        if !dir.join(MARKER).exists() {
            return Err(Error::Refused(format!(
                "{} exists and was not made by `dr demo`: pass --dir NEW_DIR",
                dir.display()
            )));
        }
        std::fs::remove_dir_all(dir)
            .map_err(|e| Error::io(format!("cannot clear {}", dir.display()), e))?;
    }
    let mk = |p: &Path| {
        std::fs::create_dir_all(p)
            .map_err(|e| Error::io(format!("cannot create {}", p.display()), e))
    };
    mk(&dir.join("keys"))?;
    mk(&dir.join("policies"))?;
    let write = |rel: &str, text: &str| {
        let p = dir.join(rel);
        std::fs::write(&p, text).map_err(|e| Error::io(format!("cannot write {}", p.display()), e))
    };
    write(
        MARKER,
        "made by dr demo; `dr demo` replaces this directory\n",
    )?;

    println!("1. dr keygen --output {}/keys/demo.key", dir.display());
    let recipient = crate::keys::keygen(&dir.join("keys/demo.key"))?;
    write("keys/demo.pub", &format!("{recipient}\n"))?;
    println!("   recipient {recipient}");
    write(
        "dr.toml",
        "# Written by `dr demo`. Paths are relative to this file.\n\
         state_dir = \"var/state\"\n\
         policies = \"policies\"\n\n\
         [encryption]\n\
         recipients_file = \"keys/demo.pub\"\n\
         # A real backup host keeps only the recipient; the demo keeps the identity too.\n\
         identity_file = \"keys/demo.key\"\n\n\
         [targets.local]\n\
         kind = \"local\"\n\
         path = \"var/backups\"\n",
    )?;
    write(
        "policies/demo.toml",
        "name = \"demo\"\n\
         targets = [\"local\"]\n\n\
         [source]\n\
         kind = \"sqlite\"\n\
         path = \"app.db\"\n\n\
         [schedule]\n\
         full = \"0 3 * * 0\"\n\
         diff = \"0 */6 * * *\"\n\n\
         [retention]\n\
         full = 2\n\
         diff = 7\n",
    )?;

    let db = dir.join("app.db");
    {
        let conn = rusqlite::Connection::open(&db).map_err(sql)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE events(id INTEGER PRIMARY KEY, at TEXT NOT NULL, payload BLOB NOT NULL);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 20000)
             INSERT INTO events(at, payload) SELECT datetime('now'), randomblob(200) FROM n;",
        )
        .map_err(sql)?;
    }
    println!(
        "2. created {} (WAL mode, 20000 rows); a writer keeps inserting while dr works",
        db.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, db) = (stop.clone(), written.clone(), db.clone());
        std::thread::spawn(move || -> rusqlite::Result<()> {
            let conn = rusqlite::Connection::open(&db)?;
            conn.busy_timeout(Duration::from_secs(10))?;
            while !stop.load(Ordering::Relaxed) {
                conn.execute(
                    "INSERT INTO events(at, payload) VALUES (datetime('now'), randomblob(200))",
                    [],
                )?;
                written.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        })
    };

    let cfg_path = dir.join("dr.toml");
    let ctx = Context::load(&cfg_path)?;
    let policy = ctx.cfg().policy("demo")?;
    let target = ctx.cfg().target("local")?;
    let source = ops::Source::of(policy);
    let hidden = Silent;
    let step = |n: u32, kind: BackupType| -> Result<()> {
        println!(
            "{n}. dr --config {} backup-local demo --type {kind}",
            cfg_path.display()
        );
        let r = source.backup(
            &ctx,
            target,
            &ops::BackupOptions {
                kind: Some(kind),
                lock_wait: Duration::from_secs(5),
            },
            &hidden,
        )?;
        let (stored, count) = r
            .pages
            .as_ref()
            .map_or((0, 0), |p| (p.pages_stored, p.page_count));
        println!(
            "   {} {}: {} of {} pages stored, {} -> {} in {:.2}s",
            r.kind,
            r.label,
            stored,
            count,
            ops::human_bytes(r.size),
            ops::human_bytes(r.stored_size),
            r.seconds
        );
        Ok(())
    };
    let result = (|| -> Result<()> {
        step(3, BackupType::Full)?;
        std::thread::sleep(Duration::from_millis(1100));
        step(4, BackupType::Diff)?;
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let w = writer.join();
    result?;
    match w {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(sql(e)),
        Err(_) => return Err(Error::Other("demo writer thread panicked".into())),
    }
    println!(
        "   the writer committed {} rows meanwhile",
        written.load(Ordering::Relaxed)
    );

    let restored = dir.join("restored.db");
    println!(
        "5. dr --config {} restore-local demo --to {} --identity {}/keys/demo.key",
        cfg_path.display(),
        restored.display(),
        dir.display()
    );
    let r = source.restore(
        &ctx,
        target,
        &ops::restore::RestoreOptions {
            to: restored.clone(),
            backup: None,
            identity: Some(dir.join("keys/demo.key")),
            force: false,
            at: None,
            standby: false,
            check: ops::proof::Check::Auto,
        },
        &hidden,
    )?;
    let rows: i64 = rusqlite::Connection::open(&restored)
        .and_then(|c| c.query_row("SELECT count(*) FROM events", [], |r| r.get(0)))
        .map_err(sql)?;
    println!(
        "   restored {} ({rows} rows, integrity_check ok)",
        r.chain.join(" + ")
    );

    println!("6. dr --config {} verify demo", cfg_path.display());
    let v = source.verify(&ctx, target, &Default::default(), &hidden)?;
    println!(
        "   ok: {} read back, decrypted, hashes match, integrity_check ok",
        v.label
    );

    println!("7. dr --config {} info", cfg_path.display());
    let info = ops::info::info(&ctx, &[policy], &ops::TargetFilter::All)?;
    print!("{}", ops::info::render(&info));
    println!(
        "\nEverything is in {}: try `dr --config {} info --json`.",
        dir.display(),
        cfg_path.display()
    );
    Ok(())
}
