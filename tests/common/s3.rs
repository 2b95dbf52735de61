//! A real S3 server for tests: s3s-fs (signature-checking, files on disk),
//! started and stopped by the test itself on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const ACCESS_KEY: &str = "dr-test-access";
pub const SECRET_KEY: &str = "dr-test-secret-key-0123456789";

pub struct S3Server {
    pub root: PathBuf,
    pub port: u16,
    child: Option<super::Proc>,
    /// The access key and secret the server accepts.
    keys: (String, String),
}

fn s3s_fs() -> PathBuf {
    if let Ok(p) = which("s3s-fs") {
        return p;
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = Path::new(&home).join(".cargo/bin/s3s-fs");
    assert!(
        p.exists(),
        "s3s-fs is not installed: run scripts/install-test-deps"
    );
    p
}

fn which(name: &str) -> Result<PathBuf, ()> {
    let path = std::env::var("PATH").map_err(|_| ())?;
    path.split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

impl S3Server {
    /// Starts a server with bucket `bucket` created.
    pub fn start(root: &Path, bucket: &str) -> S3Server {
        S3Server::start_on(root, bucket, super::HeldPort::new())
    }

    /// Starts a server on a port a test held from the start (one it
    /// pointed dr at while nothing listened there).
    pub fn start_on(root: &Path, bucket: &str, held: super::HeldPort) -> S3Server {
        std::fs::create_dir_all(root.join(bucket)).expect("bucket dir");
        let mut s = S3Server {
            root: root.to_path_buf(),
            port: held.port,
            child: None,
            keys: (ACCESS_KEY.into(), SECRET_KEY.into()),
        };
        s.spawn(held);
        s
    }

    fn spawn(&mut self, mut held: super::HeldPort) {
        let mut child = super::Proc::spawn(
            Command::new(s3s_fs())
                .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--access-key", &self.keys.0, "--secret-key", &self.keys.1])
                .arg(&self.root)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("start s3s-fs (run scripts/install-test-deps)");
        super::wait_listening(
            &mut child,
            self.port,
            "s3s-fs",
            10,
            "run scripts/install-test-deps",
        );
        held.release();
        self.child = Some(child);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server abruptly (kill -9).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill_group();
        }
    }

    /// Kills the server and starts it again on the same port, held in
    /// between so that no other test's server takes it.
    pub fn restart(&mut self) {
        self.kill();
        let held = super::HeldPort::at(self.port);
        self.spawn(held);
    }

    /// Restarts the server accepting only a new key pair: the old one is
    /// refused from now on, as after a rotation at the store.
    pub fn rotate(&mut self, access: &str, secret: &str) {
        self.keys = (access.into(), secret.into());
        self.restart();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes credential files (mode 0600) and returns the TOML of an s3 target.
pub fn target_toml(dir: &Path, name: &str, endpoint: &str, bucket: &str, secret: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let id = dir.join(format!("{name}.key_id"));
    let sk = dir.join(format!("{name}.secret"));
    for (p, v) in [(&id, ACCESS_KEY), (&sk, secret)] {
        std::fs::write(p, format!("{v}\n")).expect("write secret");
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    format!(
        "[targets.{name}]\nkind = \"s3\"\nendpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\nprefix = \"prod\"\npath_style = true\naccess_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\n",
        id.display(),
        sk.display()
    )
}

/// nginx terminating TLS in front of a test S3 server, with a self-signed
/// certificate for `localhost` (its PEM is the CA file clients trust).
pub struct TlsProxy {
    pub port: u16,
    pub ca: PathBuf,
    child: super::Proc,
}

impl TlsProxy {
    pub fn start(dir: &Path, upstream: u16) -> TlsProxy {
        TlsProxy::start_days(dir, upstream, 3650)
    }

    /// [`TlsProxy::start`] with a certificate valid for `days` from now.
    pub fn start_days(dir: &Path, upstream: u16, days: u32) -> TlsProxy {
        let (cert, key) = self_signed(dir, days);
        TlsProxy::start_with(dir, upstream, &cert, &key, &cert)
    }

    /// nginx with TLS on `cert`/`key` (trusted through `ca`) in front of
    /// 127.0.0.1:`upstream`.
    pub fn start_with(dir: &Path, upstream: u16, cert: &Path, key: &Path, ca: &Path) -> TlsProxy {
        TlsProxy::start_conf(dir, upstream, cert, key, ca, "access_log off;")
    }

    /// [`TlsProxy::start`] that records, for every request, its method,
    /// URI and the storage class and server-side encryption headers it
    /// carried, a line each in `dir/access.log`: what an S3 server that
    /// ignores those headers received.
    pub fn start_recording(dir: &Path, upstream: u16) -> TlsProxy {
        let (cert, key) = self_signed(dir, 3650);
        let log = format!(
            "log_format amz '$request_method $request_uri class=$http_x_amz_storage_class sse=$http_x_amz_server_side_encryption kms=$http_x_amz_server_side_encryption_aws_kms_key_id';\n access_log {}/access.log amz;",
            dir.display()
        );
        TlsProxy::start_conf(dir, upstream, &cert, &key, &cert, &log)
    }

    fn start_conf(
        dir: &Path,
        upstream: u16,
        cert: &Path,
        key: &Path,
        ca: &Path,
        access_log: &str,
    ) -> TlsProxy {
        std::fs::create_dir_all(dir).expect("mkdir");
        let mut held = super::HeldPort::new();
        let port = held.port;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 128; }}\n\
             http {{\n {access_log}\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             server {{\n  listen 127.0.0.1:{port} ssl;\n  ssl_certificate {c};\n  ssl_certificate_key {k};\n\
             client_max_body_size 0;\n  proxy_request_buffering off;\n  proxy_buffering off;\n\
             location / {{ proxy_pass http://127.0.0.1:{upstream}; proxy_http_version 1.1; proxy_set_header Host $http_host; }}\n }}\n}}\n",
            c = cert.display(),
            k = key.display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("conf");
        // Its own process group: the workers go with the master.
        let mut child = super::Proc::spawn(
            Command::new("nginx")
                .arg("-c")
                .arg(&conf_path)
                .arg("-p")
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("nginx (scripts/install-test-deps installs nginx-light)");
        super::wait_listening(&mut child, port, "nginx", 10, &format!("see {d}/error.log"));
        held.release();
        TlsProxy {
            port,
            ca: ca.to_path_buf(),
            child,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}

/// A self-signed certificate for `localhost` valid for `days`, and its key,
/// in `dir`.
fn self_signed(dir: &Path, days: u32) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            &days.to_string(),
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl (scripts/install-test-deps installs it)");
    assert!(st.success(), "openssl req failed");
    (cert, key)
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.child.kill_group();
    }
}

/// An env with an s3 target at `endpoint`; policy `app` gets `targets`.
pub fn env_at(
    endpoint: &str,
    targets: &str,
    policy_extra: &str,
    secret: &str,
    bucket: &str,
) -> super::Env {
    let env = super::Env::new(policy_extra);
    let mut cfg = std::fs::read_to_string(env.config()).expect("cfg");
    cfg.push_str(&target_toml(env.dir.path(), "s3", endpoint, bucket, secret));
    std::fs::write(env.config(), cfg).expect("cfg");
    let policy = env.path("policies/app.toml");
    let p = std::fs::read_to_string(&policy).expect("policy");
    let p = p.replace("targets = [\"local\"]", &format!("targets = {targets}"));
    std::fs::write(&policy, p).expect("policy");
    env
}

/// moto's S3 server (plain HTTP), which enforces S3 Object Lock.
pub struct Moto {
    pub port: u16,
    child: super::Proc,
}

impl Moto {
    pub fn start() -> Moto {
        let mut held = super::HeldPort::new();
        let port = held.port;
        let mut child = super::Proc::spawn(
            Command::new("python3")
                .args(["-m", "moto.server", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("python3 -m moto.server (run scripts/install-test-deps)");
        super::wait_listening(
            &mut child,
            port,
            "moto's server",
            30,
            "run scripts/install-test-deps",
        );
        held.release();
        Moto { port, child }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs tests/s3_lock.py with dr's test keys; its stdout.
    pub fn lock_tool(&self, args: &[&str]) -> String {
        let out = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3_lock.py"))
            .args(args)
            .env("S3_ENDPOINT", self.endpoint())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .output()
            .expect("python3 s3_lock.py");
        assert!(
            out.status.success(),
            "s3_lock.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.child.kill_group();
    }
}
