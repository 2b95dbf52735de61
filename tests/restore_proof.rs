//! A restore proves identity, the drill proves health (issue 25): every
//! page a restore writes is read back and compared with the backup's page
//! hashes; the full `integrity_check` runs unless the newest drill of that
//! very backup passed it, and the restore says which proof it used.

mod common;

use common::{Env, dump, make_db};

/// The restore's `--json` report's proof.
fn proof(r: &common::Run) -> serde_json::Value {
    r.json()["proof"].clone()
}

fn restore(env: &Env, to: &str, extra: &[&str]) -> common::Run {
    let dest = env.path(to).display().to_string();
    let mut args = vec![
        "restore-local",
        "app",
        "--to",
        &dest,
        "--identity",
        // Leaked for the args' lifetime: a test's few strings.
        Box::leak(env.key_arg().into_boxed_str()),
        "--json",
    ];
    args.extend_from_slice(extra);
    env.dr(&args)
}

fn verify(env: &Env) -> common::Run {
    env.dr(&["verify", "app", "--identity", &env.key_arg()])
}

#[test]
fn a_restore_relies_on_a_passing_drill_of_the_same_backup_and_says_so() {
    let env = Env::new("");
    make_db(&env.db, false, 400, 300);
    env.dr(&["backup-local", "app", "--type", "full"]).ok();
    let c = rusqlite::Connection::open(&env.db).expect("open");
    c.execute_batch("CREATE INDEX tv ON t(v); INSERT INTO t(v) VALUES (randomblob(5000));")
        .expect("change");
    drop(c);
    env.dr(&["backup-local", "app", "--type", "diff"]).ok();

    // No drill yet: the full check, every page compared.
    let r = restore(&env, "a.db", &[]).ok();
    let p = proof(&r);
    assert_eq!(p["check"], "integrity_check", "{p}");
    assert!(p["drill"].is_null(), "{p}");
    let pages = rusqlite::Connection::open(env.path("a.db"))
        .and_then(|c| c.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0)))
        .expect("page_count");
    assert_eq!(p["pages_identical"], pages, "{p}");
    assert_eq!(dump(&env.path("a.db")), dump(&env.db));

    // The drill passes on that backup: the restore relies on it.
    verify(&env).ok();
    let r = restore(&env, "b.db", &[]).ok();
    let p = proof(&r);
    assert_eq!(p["check"], "quick_check", "{p}");
    assert_eq!(p["drill"]["host"], common::hostname(), "{p}");
    assert_eq!(dump(&env.path("b.db")), dump(&env.db));
    let text = env
        .dr(&[
            "restore-local",
            "app",
            "--to",
            &env.path("c.db").display().to_string(),
            "--identity",
            &env.key_arg(),
        ])
        .ok()
        .stdout;
    assert!(
        text.contains(
            "pages read back equal to the backup's; quick_check ok, integrity_check by the drill of"
        ),
        "{text}"
    );

    // Asked for: the full check all the same.
    let r = restore(&env, "d.db", &["--check", "full"]).ok();
    assert_eq!(proof(&r)["check"], "integrity_check");

    // A newer backup no drill has seen: the full check again.
    let c = rusqlite::Connection::open(&env.db).expect("open");
    c.execute("INSERT INTO t(v) VALUES (randomblob(100))", [])
        .expect("insert");
    drop(c);
    env.dr(&["backup-local", "app", "--type", "diff"]).ok();
    let r = restore(&env, "e.db", &[]).ok();
    assert_eq!(proof(&r)["check"], "integrity_check");
    assert!(proof(&r)["drill"].is_null());
}

/// Two indexes whose b-trees are swapped: every page well formed (so
/// `quick_check` passes), each index's entries another column's (so
/// `integrity_check` fails), as a source damaged by a bug or a bad disk
/// would be.
fn damage_indexes(db: &std::path::Path) {
    let c = rusqlite::Connection::open(db).expect("open");
    c.execute_batch(
        "CREATE TABLE d(a INTEGER, b INTEGER);
         WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < 2000)
         INSERT INTO d SELECT i, 3000 - i FROM s;
         CREATE INDEX da ON d(a); CREATE INDEX db ON d(b);",
    )
    .expect("indexes");
    let roots: Vec<i64> = ["da", "db"]
        .iter()
        .map(|n| {
            c.query_row(
                "SELECT rootpage FROM sqlite_schema WHERE name = ?1",
                [n],
                |r| r.get(0),
            )
            .expect("root")
        })
        .collect();
    c.execute_batch("PRAGMA writable_schema = ON")
        .expect("writable");
    c.execute(
        "UPDATE sqlite_schema SET rootpage = ?1 WHERE name = 'da'",
        [roots[1]],
    )
    .expect("swap");
    c.execute(
        "UPDATE sqlite_schema SET rootpage = ?1 WHERE name = 'db'",
        [roots[0]],
    )
    .expect("swap");
    drop(c);
    let c = rusqlite::Connection::open(db).expect("reopen");
    let quick: String = c
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .expect("quick_check");
    assert_eq!(quick, "ok", "the damage passes quick_check");
    let full: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_ne!(full, "ok", "the damage fails integrity_check");
}

#[test]
fn a_backup_of_a_damaged_source_fails_its_drill_and_its_restore_runs_the_full_check() {
    let env = Env::new("");
    make_db(&env.db, false, 50, 100);
    damage_indexes(&env.db);
    env.dr(&["backup-local", "app", "--type", "full"]).ok();

    // The drill fails, naming integrity_check.
    let r = verify(&env);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("integrity_check"), "{}", r.stderr);

    // No drill passed: the restore runs the full check, reports the damage
    // and creates nothing.
    let r = restore(&env, "r.db", &[]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    let err = r.json();
    assert!(
        err.to_string().contains("integrity_check"),
        "the error names the check: {err}"
    );
    assert!(!env.path("r.db").exists(), "nothing restored");

    // --check quick is the user's choice, and says so: the damage passes it.
    let r = restore(&env, "q.db", &["--check", "quick"]).ok();
    assert_eq!(proof(&r)["check"], "quick_check");
}
