//! docker-compose.yml, as far as this machine can run it: no container
//! engine runs here, so the file is checked with `docker-compose config`,
//! and every command it gives (the certificate and bucket init steps, the
//! secrets script, `dr pg setup`, dr's entrypoint and its healthcheck) runs
//! on the host against real services: s3s-fs behind nginx with the
//! generated certificate, and a real PostgreSQL cluster.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::{PgCluster, give_to_postgres};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (scripts/install-test-deps installs the tools)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

#[test]
fn the_compose_file_is_valid_and_every_command_it_runs_works_on_this_host() {
    let compose = root().join("docker-compose.yml");
    run(
        Command::new("docker-compose")
            .arg("-f")
            .arg(&compose)
            .args(["config", "-q"]),
        "docker-compose config",
    );
    let text = std::fs::read_to_string(&compose).expect("compose");
    // Every image is pinned to a tag that is not "latest" (no tag means latest).
    for line in text
        .lines()
        .filter(|l| l.trim_start().starts_with("image:"))
    {
        let image = line.trim_start().trim_start_matches("image:").trim();
        let tag = image.rsplit_once(':').map(|(_, t)| t);
        assert!(
            tag.is_some_and(|t| !t.is_empty() && t != "latest" && !t.contains('/')),
            "image tags are pinned: {line}"
        );
    }
    for want in [
        "restart: unless-stopped",
        "[\"CMD\", \"dr\", \"--config\", \"/etc/dr/dr.toml\", \"healthcheck\"]",
        "9187:9187",
        "service_completed_successfully",
        "target: pg",
        "target: dr",
    ] {
        assert!(text.contains(want), "{want}");
    }
    assert!(root().join(".dockerignore").is_file());
    let dr_toml =
        std::fs::read_to_string(root().join("deploy/compose/dr/dr.toml")).expect("dr.toml");
    assert!(
        dr_toml.contains("listen = \"0.0.0.0:9187\""),
        "reachable from the host"
    );

    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    // Published on loopback only; the healthcheck waits out a first full.
    assert!(
        text.contains("\"127.0.0.1:9187:9187\""),
        "the port is loopback"
    );
    assert!(
        text.contains("start_period: 30m"),
        "start_period covers a first full"
    );
    // Secrets, as scripts/compose-secrets writes them (twice: idempotent),
    // on a host without dr: age-keygen makes the key pair.
    let no_dr = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !Path::new(d).join("dr").exists())
        .collect::<Vec<_>>()
        .join(":");
    let bare = t.join("bare");
    for _ in 0..2 {
        run(
            Command::new(root().join("scripts/compose-secrets"))
                .arg(&bare)
                .env("PATH", &no_dr),
            "scripts/compose-secrets without dr",
        );
    }
    let bare_key = std::fs::read_to_string(bare.join("deploy/secrets/backup.key")).expect("key");
    let bare_recipient =
        std::fs::read_to_string(bare.join("deploy/secrets/backup_recipient")).expect("recipient");
    assert!(
        bare_recipient.starts_with("age1")
            && bare_key
                .to_lowercase()
                .contains(&format!("public key: {}", bare_recipient.trim())),
        "{bare_recipient}"
    );
    for _ in 0..2 {
        run(
            Command::new(root().join("scripts/compose-secrets"))
                .arg(t)
                .env("PATH", common::path_with_dr()),
            "scripts/compose-secrets",
        );
    }
    let secrets = t.join("deploy/secrets");
    for s in [
        "pg_password",
        "pgbackrest_cipher_pass",
        "s3_access_key_id",
        "s3_secret_access_key",
        "backup_recipient",
        "backup.key",
        "metrics_token",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(secrets.join(s)).expect(s);
        assert!(m.len() > 0 && m.permissions().mode() & 0o077 == 0, "{s}");
    }
    let recipient = std::fs::read_to_string(secrets.join("backup_recipient")).expect("recipient");
    assert!(recipient.starts_with("age1"), "{recipient}");

    // The certificate init step, twice (the second run keeps what exists).
    let certs = t.join("certs");
    let certs_sh = root().join("deploy/compose/init/certs.sh");
    for _ in 0..2 {
        run(
            Command::new("sh")
                .arg(&certs_sh)
                .env("CERTS_DIR", &certs)
                .env("S3_NAMES", "localhost,127.0.0.1"),
            "certs.sh",
        );
    }
    let ok = run(
        Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(certs.join("ca.crt"))
            .arg(certs.join("public.crt")),
        "openssl verify",
    );
    assert!(ok.contains("OK"), "{ok}");
    give_to_postgres(&certs);

    // The S3 store over HTTPS with that certificate; the bucket init step.
    // s3s-fs takes the test's keys: the secrets say the same.
    std::fs::write(secrets.join("s3_access_key_id"), common::s3::ACCESS_KEY).expect("key");
    std::fs::write(secrets.join("s3_secret_access_key"), common::s3::SECRET_KEY).expect("key");
    let server = common::s3::S3Server::start(&t.join("s3"), "unused");
    let proxy = common::s3::TlsProxy::start_with(
        &t.join("tls"),
        server.port,
        &certs.join("public.crt"),
        &certs.join("private.key"),
        &certs.join("ca.crt"),
    );
    let bucket_sh = root().join("deploy/compose/init/bucket.sh");
    for want in ["created", "exists"] {
        let out = run(
            Command::new("sh")
                .arg(&bucket_sh)
                .env("S3_ENDPOINT", proxy.endpoint())
                .env("S3_BUCKET", "dr-backups")
                .env("AWS_CA_BUNDLE", certs.join("ca.crt"))
                .env("S3_ACCESS_KEY_ID_FILE", secrets.join("s3_access_key_id"))
                .env(
                    "S3_SECRET_ACCESS_KEY_FILE",
                    secrets.join("s3_secret_access_key"),
                ),
            "bucket.sh",
        );
        assert!(out.contains(want), "{out}");
    }
    assert!(t.join("s3/dr-backups").is_dir(), "the bucket exists");

    // PostgreSQL as compose starts it: archiving on from the first start.
    let cluster = PgCluster::start(&t.join("pg"));
    let conf = cluster.data.join("postgresql.conf");
    let pgconf =
        std::fs::read_to_string(&conf).expect("conf") + "archive_mode = on\nwal_level = replica\n";
    std::fs::write(&conf, pgconf).expect("conf");
    cluster.pg_ctl("restart");

    // dr's configuration from the compose directory, with this host's paths.
    let etc = t.join("etc-dr");
    std::fs::create_dir_all(etc.join("policies")).expect("etc");
    // The port the compose file publishes, here one held for this test
    // until the daemon binds it (`dr healthcheck` reads it from the config).
    let mut held = common::HeldPort::new();
    let port = held.port;
    let state = t.join("state");
    give_to_postgres(&state);
    let host = |s: &str| {
        s.replace("/var/lib/dr", &state.display().to_string())
            .replace("/run/secrets/", &format!("{}/", secrets.display()))
            .replace("https://minio:9000", &proxy.endpoint())
            .replace("/certs/ca.crt", &certs.join("ca.crt").display().to_string())
            .replace("0.0.0.0:9187", &format!("127.0.0.1:{port}"))
            .replace(
                "/var/lib/postgresql/data",
                &cluster.data.display().to_string(),
            )
            .replace("/var/run/postgresql", &cluster.sock.display().to_string())
            .replace("port = 5432", &format!("port = {}", cluster.port))
    };
    let text = std::fs::read_to_string(root().join("deploy/compose/dr/dr.toml")).expect("dr.toml");
    std::fs::write(etc.join("dr.toml"), host(&text)).expect("dr.toml");
    let text = std::fs::read_to_string(root().join("deploy/compose/dr/policies/main.toml"))
        .expect("policy");
    std::fs::write(etc.join("policies/main.toml"), host(&text)).expect("policy");
    give_to_postgres(&secrets);
    let cfg = etc.join("dr.toml");
    let dr = |args: &[&str]| {
        Command::new(common::dr_bin())
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .expect("dr")
    };
    // The pgsetup init step: no restart needed, check passes.
    let setup = dr(&["pg", "setup", "main", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&setup.stdout).unwrap_or_default();
    assert_eq!(
        j["checked"],
        true,
        "{j}\n{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    assert_eq!(j["restart_needed"], false, "{j}");

    // dr's entrypoint (`dr --config /etc/dr/dr.toml daemon`) and healthcheck.
    let mut daemon = common::Proc::spawn(
        Command::new(common::dr_bin())
            .arg("--config")
            .arg(&cfg)
            .arg("daemon")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(t.join("daemon.log")).expect("log")),
    )
    .expect("daemon");
    common::wait_listening(&mut daemon, port, "dr daemon", 60, "see daemon.log");
    held.release();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let h = dr(&["healthcheck"]);
        if h.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never healthy: {}{}\n{}",
            String::from_utf8_lossy(&h.stdout),
            String::from_utf8_lossy(&h.stderr),
            std::fs::read_to_string(t.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // /metrics answers Prometheus with the metrics_token, nobody else.
    let token = std::fs::read_to_string(secrets.join("metrics_token")).expect("token");
    let auth = format!("Authorization: Bearer {}\r\n", token.trim());
    assert_eq!(common::http_get(port, "/metrics").map(|r| r.0), Some(401));
    let (code, body) = common::http_get_with(port, "/metrics", &auth).expect("metrics");
    assert!(
        code == 200 && body.contains("dr_build_info"),
        "{code} {body}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let st = daemon.wait().expect("wait");
    assert_eq!(st.code(), Some(0));
    let info = dr(&["info", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&info.stdout).expect("info");
    assert!(
        j["policies"][0]["targets"][0]["backups"]
            .as_array()
            .is_some_and(|b| !b.is_empty()),
        "the daemon's first full reached the store: {j}"
    );
}
