//! Test harness: a throwaway dr setup (config, key, database) in a temp
//! directory, and the real `dr` binary run as a separate process.
#![allow(dead_code)]

pub mod faults;
pub mod pg;
pub mod s3;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A child process in a process group of its own, killed with its whole
/// group (an nginx master's workers, a shell's children) when the guard is
/// dropped: after a test that passed, and after a failed assertion or a
/// panic alike. Derefs to the [`std::process::Child`].
pub struct Proc(Option<std::process::Child>);

impl Proc {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(cmd: &mut Command) -> std::io::Result<Proc> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0).spawn().map(|c| Proc(Some(c)))
    }

    /// SIGKILL to the whole group, then reaps the leader.
    pub fn kill_group(&mut self) {
        if let Some(mut c) = self.0.take() {
            kill_group_of(c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the leader and collects its output; whatever it left in
    /// its group is killed then.
    pub fn wait_with_output(mut self) -> std::io::Result<Output> {
        let child = self.0.take().expect("process already stopped");
        let pgid = child.id();
        let out = child.wait_with_output();
        kill_group_of(pgid);
        out
    }
}

fn kill_group_of(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl std::ops::Deref for Proc {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("process already stopped")
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("process already stopped")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_group();
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub db: PathBuf,
}

pub fn dr_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dr")
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "dr failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

impl Env {
    /// A config with one local target and one sqlite policy `app` (extra policy TOML appended).
    pub fn new(policy_extra: &str) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("backup.key");
        let out = Command::new(dr_bin())
            .args(["keygen", "--output"])
            .arg(&key)
            .output()
            .expect("keygen");
        assert!(
            out.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let recipient = String::from_utf8_lossy(&out.stdout).trim().to_string();
        std::fs::write(dir.path().join("backup.pub"), format!("{recipient}\n")).expect("pub");
        std::fs::create_dir_all(dir.path().join("policies")).expect("policies");
        std::fs::write(
            dir.path().join("dr.toml"),
            "state_dir = \"state\"\npolicies = \"policies\"\n[encryption]\nrecipients_file = \"backup.pub\"\n[targets.local]\nkind = \"local\"\npath = \"backups\"\n",
        )
        .expect("dr.toml");
        let db = dir.path().join("app.db");
        let env = Env { dir, key, db };
        env.write_policy("app", "app.db", policy_extra);
        env
    }

    pub fn write_policy(&self, name: &str, db: &str, extra: &str) {
        std::fs::write(
            self.dir.path().join(format!("policies/{name}.toml")),
            format!("name = \"{name}\"\ntargets = [\"local\"]\n[source]\nkind = \"sqlite\"\npath = \"{db}\"\n{extra}\n"),
        )
        .expect("policy");
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn config(&self) -> PathBuf {
        self.path("dr.toml")
    }

    pub fn dr(&self, args: &[&str]) -> Run {
        Run::from(
            Command::new(dr_bin())
                .arg("--config")
                .arg(self.config())
                .args(args)
                .stdin(Stdio::null())
                .output()
                .expect("run dr"),
        )
    }

    /// Switches the config to passphrase encryption read from `pass`
    /// (written with `text` and mode `mode`), one local target.
    pub fn use_passphrase(&self, pass: &Path, text: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(pass, text).expect("write passphrase");
        std::fs::set_permissions(pass, std::fs::Permissions::from_mode(mode)).expect("chmod");
        std::fs::write(
            self.config(),
            format!(
                "state_dir = \"state\"\n[encryption]\npassphrase_file = \"{}\"\n[targets.local]\nkind = \"local\"\npath = \"backups\"\n",
                pass.display()
            ),
        )
        .expect("config");
    }

    /// Takes a full backup of policy `app` (`cmd`: backup-local or
    /// backup-s3) and returns its label.
    pub fn full_backup(&self, cmd: &str) -> String {
        self.dr(&[cmd, "app", "--type", "full", "--json"])
            .ok()
            .json()[0]["label"]
            .as_str()
            .expect("label")
            .to_string()
    }

    pub fn key_arg(&self) -> String {
        self.key.display().to_string()
    }

    /// Restores the newest backup into `rel` and returns its path.
    pub fn restore(&self, rel: &str, extra: &[&str]) -> Run {
        let to = self.path(rel).display().to_string();
        let key = self.key_arg();
        let mut args = vec!["restore-local", "app", "--to", &to, "--identity", &key];
        args.extend_from_slice(extra);
        self.dr(&args)
    }

    /// Keys of the backup and WAL objects under the backups directory,
    /// relative to it (the shipped audit log under `.audit/` is not one).
    pub fn objects(&self) -> Vec<String> {
        files_under(&self.path("backups"))
            .into_iter()
            .filter(|k| !k.starts_with(".audit/"))
            .collect()
    }
}

/// Replaces a file the way secret managers do: a new file (mode 0600),
/// then a rename over the old one.
#[allow(dead_code)]
pub fn replace_private_file(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Fails when a running dr process shows one of `secrets` where `ps`
/// looks: its command line. Returns how many dr processes of `env` (its
/// config on their command line) it saw, so other tests running at the
/// same time never count.
#[allow(dead_code)]
pub fn assert_no_dr_process_shows(env: &Env, secrets: &[&str]) -> usize {
    let config = env.config().display().to_string();
    let mut seen = 0;
    for p in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.first().is_some_and(|a| a.ends_with("/dr")) {
            continue;
        }
        // Only this test's processes count as seen; every dr's command
        // line is checked for the secrets all the same.
        if args.contains(&config) {
            seen += 1;
        }
        for s in secrets {
            assert!(
                !args.iter().any(|a| a.contains(s)),
                "a dr command line shows a secret: {args:?}"
            );
        }
    }
    seen
}

/// Every file below `root`, as sorted paths relative to it.
pub fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Creates a database with `rows` rows of ~`size` bytes each in table `t`.
pub fn make_db(path: &Path, wal: bool, rows: i64, size: i64) {
    let c = rusqlite::Connection::open(path).expect("open");
    if wal {
        c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .expect("wal");
    }
    c.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB NOT NULL);")
        .expect("create");
    c.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < ?1)
         INSERT INTO t(v) SELECT randomblob(?2) FROM n",
        rusqlite::params![rows, size],
    )
    .expect("fill");
}

/// Every row of every user table, as text, for equality checks.
pub fn dump(path: &Path) -> Vec<String> {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open");
    let tables: Vec<String> = c
        .prepare("SELECT name FROM sqlite_schema WHERE type='table' ORDER BY name")
        .expect("prep")
        .query_map([], |r| r.get(0))
        .expect("q")
        .collect::<Result<_, _>>()
        .expect("tables");
    let mut out = Vec::new();
    for t in tables {
        let mut stmt = c
            .prepare(&format!("SELECT * FROM \"{t}\" ORDER BY 1"))
            .expect("prep");
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                let mut s = format!("{t}:");
                for i in 0..n {
                    let v: rusqlite::types::Value = r.get(i)?;
                    s.push_str(&format!("{v:?}|"));
                }
                Ok(s)
            })
            .expect("q");
        for r in rows {
            out.push(r.expect("row"));
        }
    }
    out
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).expect("read")))
}

/// A tmpfs mounted at `dir` (root only), unmounted on drop.
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn tmpfs(dir: &Path, opts: &str) -> Mount {
        std::fs::create_dir_all(dir).expect("mkdir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "mounting a tmpfs at {} failed: this test needs root (CI and scripts/test run as root)",
            dir.display()
        );
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Starts `dr daemon` for `env` in the background, appending its log to
/// `daemon.log` in the env.
pub fn start_daemon(env: &Env, args: &[&str]) -> Proc {
    start_daemon_with(&env.config(), &env.path("daemon.log"), args)
}

/// Starts `dr daemon` with `config`, appending its log to `log`.
pub fn start_daemon_with(config: &Path, log: &Path, args: &[&str]) -> Proc {
    Proc::spawn(
        Command::new(dr_bin())
            .arg("--config")
            .arg(config)
            .arg("daemon")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .expect("log"),
            ),
    )
    .expect("start dr daemon")
}

/// Starts `dr daemon` (whose config says `listen = "127.0.0.1:0"`) and
/// returns it with the port it bound, read from its own start-up line: no
/// port is picked by the test and released for another to take.
pub fn start_daemon_listening(env: &Env, args: &[&str]) -> (Proc, u16) {
    start_daemon_listening_with(&env.config(), &env.path("daemon.log"), args)
}

/// [`start_daemon_listening`] with `config`, its log appended to `log`.
pub fn start_daemon_listening_with(config: &Path, log: &Path, args: &[&str]) -> (Proc, u16) {
    const STARTED: &str = "dr daemon started";
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    let before = read().matches(STARTED).count();
    let mut daemon = start_daemon_with(config, log, args);
    let mut port = 0;
    wait_until(
        "the daemon's start-up line naming its port",
        30,
        || {
            let text = read();
            if let Some(line) = text.lines().filter(|l| l.contains(STARTED)).nth(before) {
                port = line
                    .split("listen=")
                    .nth(1)
                    .and_then(|a| a.split_whitespace().next())
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| {
                        p.trim_end_matches(|c: char| !c.is_ascii_digit())
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0);
            }
            assert!(
                !matches!(daemon.try_wait(), Ok(Some(_))),
                "dr daemon exited at start-up: {}",
                read()
            );
            port != 0
        },
        read,
    );
    (daemon, port)
}

/// A loopback TCP port held for a server a test is about to start: bound
/// with SO_REUSEADDR and not listening, so a connection to it is refused
/// (as to a server that is down), no other bind takes it, and the server
/// (which binds with SO_REUSEADDR, as s3s-fs, moto and nginx do) can.
/// Dropped, or [`HeldPort::release`]d, once the server listens.
pub struct HeldPort {
    pub port: u16,
    hold: Option<socket2::Socket>,
}

impl HeldPort {
    pub fn new() -> HeldPort {
        HeldPort::at(0)
    }

    /// Holds `port` itself (0: any), as a restarted server's old port.
    pub fn at(port: u16) -> HeldPort {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        s.set_reuse_address(true).expect("SO_REUSEADDR");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        s.bind(&addr.into())
            .unwrap_or_else(|e| panic!("cannot hold loopback port {port}: {e}"));
        let port = s
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
            .expect("bound port");
        HeldPort {
            port,
            hold: Some(s),
        }
    }

    pub fn release(&mut self) {
        self.hold = None;
    }
}

impl Default for HeldPort {
    fn default() -> Self {
        HeldPort::new()
    }
}

/// Whether a process of process group `pgid` listens on TCP `port`: the
/// server a test started, not whatever else answers there.
pub fn group_listens(port: u16, pgid: u32) -> bool {
    let mut inodes = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = f.get(3) == Some(&"0A");
            let on_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if let (true, Some(i)) = (listening && on_port, f.get(9)) {
                inodes.insert(format!("socket:[{i}]"));
            }
        }
    }
    if inodes.is_empty() {
        return false;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid pgrp …: the comm may hold spaces.
        let group = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(2))
            .and_then(|g| g.parse::<u32>().ok());
        group == Some(pgid)
            && std::fs::read_dir(p.path().join("fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|l| inodes.contains(&l.to_string_lossy().into_owned()))
                })
            })
    })
}

/// Waits until `server` (a [`Proc`], leader of its group) listens on
/// `port`, failing with `what` and `hint` if it exits or takes longer than
/// `secs`: readiness is this server bound and listening, not an answer.
pub fn wait_listening(server: &mut Proc, port: u16, what: &str, secs: u64, hint: &str) {
    let pgid = server.id();
    wait_until(
        &format!("{what} to listen on port {port}"),
        secs,
        || {
            if let Ok(Some(st)) = server.try_wait() {
                panic!("{what} exited before listening on port {port} ({st}): {hint}");
            }
            group_listens(port, pgid)
        },
        || hint.to_string(),
    );
}

/// The backup labels `dr info --json` lists for the first policy's first
/// target, oldest first (labels sort by time).
pub fn labels_in(info: &serde_json::Value) -> Vec<String> {
    let mut l: Vec<String> = info["policies"][0]["targets"][0]["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| b["label"].as_str().expect("label").to_string())
        .collect();
    l.sort();
    l
}

/// The `sh` block of README.md that follows `<!-- MARKER`: commands a
/// test runs as written.
pub fn readme_block(marker: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    readme
        .split(&format!("<!-- {marker}"))
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.split("```").next())
        .unwrap_or_else(|| panic!("README.md has no {marker} block"))
        .to_string()
}

/// Host B beside `env`: `b.toml`, with its own state_dir (`state-b`) and
/// policy directory (`policies-b/`: `env`'s policy `name`, passed through
/// `edit`), the same targets and keys. Returns b.toml's path.
pub fn second_host(env: &Env, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    std::fs::create_dir_all(env.path("policies-b")).expect("dir");
    std::fs::write(
        env.path(&format!("policies-b/{name}.toml")),
        edit(std::fs::read_to_string(env.path(&format!("policies/{name}.toml"))).expect("policy")),
    )
    .expect("policy b");
    let b = env.path("b.toml");
    std::fs::write(
        &b,
        std::fs::read_to_string(env.config())
            .expect("cfg")
            .replace("state_dir = \"state\"", "state_dir = \"state-b\"")
            .replace("policies = \"policies\"", "policies = \"policies-b\""),
    )
    .expect("b.toml");
    b
}

/// Host B's configuration for a daemon that keeps a standby of policy
/// `name`: [`second_host`] with `edit` applied to the policy and
/// `[follow]` (fast waits, `max_lag` 4 s) added, the identity, and a
/// listener on a free port.
pub fn standby_daemon_host(env: &Env, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let b = second_host(env, name, |p| {
        format!(
            "{}\n[follow]\npoll = \"200ms\"\nidle_poll = \"1s\"\nmax_lag = \"4s\"\n",
            edit(p)
        )
    });
    let text = std::fs::read_to_string(&b).expect("b.toml");
    std::fs::write(
        &b,
        text.replace(
            "[encryption]\n",
            "[encryption]\nidentity_file = \"backup.key\"\n",
        ) + "[daemon]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("b.toml");
    b
}

/// The value of the line `series value` of a /metrics body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Runs dr with another configuration than an `Env`'s own.
pub fn dr_with(config: &Path, args: &[&str]) -> Run {
    Run::from(
        Command::new(dr_bin())
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run dr"),
    )
}

/// This host's name, as dr records it (drills, leases).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// PATH with the `dr` under test first.
pub fn path_with_dr() -> String {
    let bin = Path::new(dr_bin()).parent().expect("bin dir");
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A plain HTTP GET on loopback: (status, body), or `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_with(port, path, "")
}

/// [`http_get`] with extra header lines (each ending in `\r\n`).
pub fn http_get_with(port: u16, path: &str, headers: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n{headers}\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
}

/// Starts `dr replicate` in the background, its log in `replicate.log`.
pub fn spawn_replicate(env: &Env) -> Proc {
    Proc::spawn(
        Command::new(dr_bin())
            .arg("--config")
            .arg(env.config())
            .args(["replicate", "--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(env.path("replicate.log")).expect("log")),
    )
    .expect("start dr replicate")
}

/// An HTTP server on loopback that answers 200 to everything and keeps
/// each request whole (request line, headers, body), so a test can assert
/// what a notification said, not only that one came.
pub fn http_sink() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let mut r = BufReader::new(&s);
            let mut text = String::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                let end = line == "\r\n";
                text.push_str(&line);
                if end {
                    break;
                }
            }
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            text.push_str(&String::from_utf8_lossy(&body));
            log.lock().expect("lock").push(text);
            let _ = (&s)
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nOK");
        }
    });
    (port, seen)
}

/// Polls `cond` every 100 ms until it holds; after `secs` the test fails,
/// naming what it waited for and what `context` says it last saw.
pub fn wait_until(
    what: &str,
    secs: u64,
    mut cond: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            context()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Waits until the log file at `path` holds `needle`.
pub fn wait_for_log(path: &Path, needle: &str, secs: u64) {
    let text = || std::fs::read_to_string(path).unwrap_or_default();
    wait_until(
        &format!("{needle:?}"),
        secs,
        || text().contains(needle),
        text,
    );
}

/// Every PromQL expression of the shipped Grafana dashboard
/// (deploy/grafana/dr.json), its `$policy` variable given a value
/// Prometheus parses.
#[allow(dead_code)]
pub fn dashboard_queries() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/dr.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dr.json")).expect("JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        assert!(
            panel["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{panel}"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty(),
            "a panel without a query: {}",
            panel["title"]
        );
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            out.push(expr.replace("$policy", ".*"));
        }
    }
    out
}

/// The dr metrics (sample names: counters with `_total`) the dashboard's
/// queries use.
#[allow(dead_code)]
pub fn dashboard_metrics() -> Vec<String> {
    let mut names: Vec<String> = dashboard_queries()
        .iter()
        .flat_map(|q| {
            q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("dr_"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// `systemd-analyze verify` passes on `unit` (man pages looked up under
/// `manpath`) and says nothing about it.
#[allow(dead_code)]
pub fn systemd_verifies(unit: &Path, manpath: &Path) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .env("MANPATH", manpath)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze is missing ({e}): it comes with systemd"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !said.contains("dr.service"),
        "systemd-analyze verify: {said}"
    );
}

/// Whether the shipped alert rule `alert` (deploy/prometheus/dr-alerts.yml)
/// fires on `series_line`, a line of a live `/metrics` scrape held for ten
/// minutes: promtool evaluates the rule's own expression (copied into a
/// recording rule, so that its annotations need not be spelled out here).
#[allow(dead_code)]
pub fn alert_fires(alert: &str, series_line: &str) -> bool {
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/dr-alerts.yml"),
    )
    .expect("dr-alerts.yml");
    let expr = rules
        .split(&format!("- alert: {alert}\n"))
        .nth(1)
        .and_then(|rest| rest.lines().find_map(|l| l.trim().strip_prefix("expr: ")))
        .unwrap_or_else(|| panic!("no alert {alert} with an expr in dr-alerts.yml"))
        .to_string();
    let (series, value) = series_line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("not a sample line: {series_line}"));
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("rules.yml"),
        format!(
            "groups:\n  - name: t\n    rules:\n      - record: fired\n        expr: {}\n",
            serde_json::to_string(&expr).expect("quoted")
        ),
    )
    .expect("rules");
    let test = |samples: &str| {
        format!(
            "rule_files: [rules.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n      - series: {}\n        values: '{value}x10'\n    promql_expr_test:\n      - expr: count(fired)\n        eval_time: 5m\n        exp_samples: {samples}\n",
            serde_json::to_string(series).expect("quoted")
        )
    };
    let run = |text: String| {
        std::fs::write(dir.path().join("test.yml"), &text).expect("test");
        let out = Command::new("promtool")
            .args(["test", "rules", "test.yml"])
            .current_dir(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("promtool is missing ({e}): run scripts/install-test-deps"));
        (
            out.status.success(),
            format!(
                "{text}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (fired, why_not) = run(test("[{labels: '{}', value: 1}]"));
    let (silent, why) = run(test("[]"));
    assert!(
        fired != silent,
        "promtool must say one or the other for {alert}:\n{why_not}\n{why}"
    );
    fired
}

/// tests/wal_writer.py: writes bursts of transactions and digests a
/// database's contents.
#[allow(dead_code)]
pub fn wal_writer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/wal_writer.py")
}

/// The writer's digest of a database's contents: equal digests, equal rows.
#[allow(dead_code)]
pub fn digest(db: &Path) -> String {
    let out = Command::new("python3")
        .arg(wal_writer())
        .arg("digest")
        .arg(db)
        .output()
        .expect("python3 tests/wal_writer.py digest");
    assert!(
        out.status.success(),
        "digest of {}: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// SIGTERM to `child` (a `dr replicate`, say), then its exit code once it
/// stopped; the test fails if it takes over a minute.
#[allow(dead_code)]
pub fn stop(mut child: Proc) -> i32 {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st.code().unwrap_or(-1);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} did not stop on SIGTERM",
            child.id()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
