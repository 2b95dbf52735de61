//! A throwaway PostgreSQL 15 cluster for tests, run as the `postgres` OS
//! user on a free port with its socket in the test's own directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct PgCluster {
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

fn as_postgres(args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .expect("runuser (PostgreSQL tests run as root)")
}

/// Makes `dir` and its parents traversable, and `dir` owned by postgres.
pub fn give_to_postgres(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut p = Some(dir);
    while let Some(d) = p {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(d) {
            let mode = m.permissions().mode() | 0o011;
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode));
        }
        p = d.parent();
    }
    let st = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status()
        .expect("chown");
    assert!(st.success());
}

impl PgCluster {
    /// initdb + start, with archiving off (dr's setup turns it on).
    pub fn start(dir: &Path) -> PgCluster {
        let data = dir.join("data");
        let sock = dir.join("sock");
        give_to_postgres(dir);
        std::fs::create_dir_all(&sock).expect("sock");
        give_to_postgres(&sock);
        let out = as_postgres(&[
            "initdb",
            "-D",
            &data.display().to_string(),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // No TCP (listen_addresses = ''): the port only names the socket
        // file in this cluster's own directory.
        let port = super::HeldPort::new().port;
        let conf = format!(
            "port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\nfsync = off\n",
            sock.display()
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).expect("conf");
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).expect("conf");
        let c = PgCluster {
            log: dir.join("pg.log"),
            data,
            sock,
            port,
        };
        give_to_postgres(dir);
        c.pg_ctl("start");
        c
    }

    pub fn pg_ctl(&self, action: &str) {
        let out = as_postgres(&[
            "pg_ctl",
            "-D",
            &self.data.display().to_string(),
            "-l",
            &self.log.display().to_string(),
            "-w",
            "-t",
            "60",
            action,
        ]);
        assert!(
            out.status.success(),
            "pg_ctl {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs pgbench with these arguments against the cluster.
    pub fn pgbench(&self, args: &[&str]) {
        let sock = self.sock.display().to_string();
        let port = self.port.to_string();
        let mut all = vec!["pgbench", "-h", &sock, "-p", &port];
        all.extend_from_slice(args);
        all.push("postgres");
        let out = as_postgres(&all);
        assert!(
            out.status.success(),
            "pgbench: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn sql(&self, sql: &str) -> String {
        sql_at(&self.sock, self.port, sql)
    }
}

pub fn sql_at(sock: &Path, port: u16, sql: &str) -> String {
    let out = as_postgres(&[
        "psql",
        "-h",
        &sock.display().to_string(),
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-XAtq",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
    ]);
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Starts a restored data directory on a new port and waits out recovery.
pub fn start_restored(data: &Path, sock: &Path, log: &Path) -> u16 {
    // Unix socket only, in `sock`: the port names the socket file.
    let port = super::HeldPort::new().port;
    let out = as_postgres(&[
        "pg_ctl",
        "-D",
        &data.display().to_string(),
        "-l",
        &log.display().to_string(),
        "-w",
        "-t",
        "120",
        "-o",
        &format!("-p {port} -k {}", sock.display()),
        "start",
    ]);
    assert!(
        out.status.success(),
        "start restored: {} {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(log).unwrap_or_default()
    );
    wait_out_recovery(sock, port);
    port
}

/// Waits until a restored cluster has replayed its WAL and promoted.
pub fn wait_out_recovery(sock: &Path, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while sql_at(sock, port, "select pg_is_in_recovery()") != "f" {
        assert!(
            Instant::now() < deadline,
            "restored cluster stays in recovery"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn stop(data: &Path) {
    let _ = as_postgres(&[
        "pg_ctl",
        "-D",
        &data.display().to_string(),
        "-m",
        "immediate",
        "-w",
        "stop",
    ]);
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        stop(&self.data);
    }
}

/// An env whose only policy is a postgres one for `cluster`.
pub fn pg_env(cluster: &PgCluster, extra: &str) -> super::Env {
    let env = super::Env::new("");
    std::fs::remove_file(env.path("policies/app.toml")).expect("rm");
    let pass = env.path("cipher.pass");
    std::fs::write(&pass, "a-long-random-test-passphrase-0123456789\n").expect("pass");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(
        env.path("policies/main-pg.toml"),
        format!(
            "name = \"main-pg\"\ntargets = [\"local\"]\n[source]\nkind = \"postgres\"\nstanza = \"main\"\ndata_dir = \"{}\"\nsocket_dir = \"{}\"\nport = {}\nuser = \"postgres\"\nrun_as = \"postgres\"\ncipher_pass_file = \"{}\"\n{extra}",
            cluster.data.display(),
            cluster.sock.display(),
            cluster.port,
            pass.display()
        ),
    )
    .expect("policy");
    // The repository and state live where the postgres user can reach them.
    let root = env.dir.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    env
}

pub fn setup(env: &super::Env, cluster: &PgCluster) {
    let mut r = env.dr(&["pg", "setup", "main-pg", "--json"]).ok();
    if r.json()["restart_needed"] == true {
        cluster.pg_ctl("restart");
        r = env.dr(&["pg", "setup", "main-pg", "--json"]).ok();
    }
    assert_eq!(r.json()["checked"], true, "{}\n{}", r.stdout, r.stderr);
}

/// A PostgreSQL policy whose only target is S3 (s3s-fs behind an nginx
/// TLS proxy with a private CA, bucket `pgbucket`), for `cluster`: the
/// servers (stopped on drop) and the env. Everything lives under `dir`.
pub fn pg_env_on_s3(
    dir: &Path,
    cluster: &PgCluster,
    extra: &str,
) -> (super::s3::S3Server, super::s3::TlsProxy, super::Env) {
    let server = super::s3::S3Server::start(&dir.join("s3"), "pgbucket");
    let proxy = super::s3::TlsProxy::start(&dir.join("tls"), server.port);
    let env = pg_env(cluster, extra);
    let toml = super::s3::target_toml(
        env.dir.path(),
        "s3",
        &proxy.endpoint(),
        "pgbucket",
        super::s3::SECRET_KEY,
    ) + &format!(
        "region = \"us-east-1\"\nca_file = \"{}\"\n",
        proxy.ca.display()
    );
    let cfg = std::fs::read_to_string(env.config()).expect("cfg") + &toml;
    std::fs::write(env.config(), cfg).expect("cfg");
    let policy = env.path("policies/main-pg.toml");
    let text = std::fs::read_to_string(&policy).expect("policy");
    std::fs::write(
        &policy,
        text.replace("targets = [\"local\"]", "targets = [\"s3\"]"),
    )
    .expect("policy");
    // pgBackRest reads the CA file as the postgres user.
    give_to_postgres(&dir.join("tls"));
    (server, proxy, env)
}
