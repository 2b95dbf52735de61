//! SQL through `psql` as the cluster's OS user: how dr changes settings
//! (`dr pg setup`) and asks the archiver how it is doing, without a
//! PostgreSQL client library or a password of its own.

use std::process::{Command, Stdio};

use crate::config::PgSource;

/// Runs one statement; its output (unaligned, tuples only), or why it
/// could not (no server, no such user, an SQL error). Gives up on a
/// connection after 5 s, so a host whose cluster is down answers at once.
pub fn query(pg: &PgSource, sql: &str) -> Result<String, String> {
    let mut c = match pg.run_as.as_ref().filter(|_| super::run::is_root()) {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--", "psql"]);
            c
        }
        None => Command::new("psql"),
    };
    if let Some(s) = &pg.socket_dir {
        c.arg("-h").arg(s);
    }
    c.args([
        "-p",
        &pg.port.to_string(),
        "-U",
        &pg.user,
        "-d",
        "postgres",
        "-XAtq",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
    ])
    .env("PGCONNECT_TIMEOUT", "5")
    .stdin(Stdio::null());
    match c.output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("cannot run psql: {e}")),
    }
}
