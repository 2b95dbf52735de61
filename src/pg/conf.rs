//! The pgBackRest configuration dr writes for a PostgreSQL policy.
//!
//! One pgBackRest repository per target of the policy, numbered in the
//! policy's target order, so `--repo=N` addresses a target. The file holds
//! secrets (cipher pass, S3 keys) because PostgreSQL runs `archive_command`
//! without dr's environment; dr writes it with mode 0600, owned by the user
//! pgBackRest runs as, and never passes a secret on a command line.

use std::fmt::Write as _;
use std::path::PathBuf;

/// Where one repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repo {
    /// A local target: `<path>/<policy>/pgbackrest`.
    Posix { path: PathBuf },
    /// An S3 target.
    S3(S3Repo),
}

/// An S3 repository as pgBackRest spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Repo {
    pub host: String,
    pub port: u16,
    pub bucket: String,
    pub region: String,
    /// Path inside the bucket: `/<prefix>/<policy>/pgbackrest`.
    pub path: String,
    pub path_style: bool,
    pub key: String,
    pub key_secret: String,
    pub ca_file: Option<PathBuf>,
    /// SSE-KMS on every object pgBackRest writes (`sse = "aws:kms"`).
    pub kms_key_id: Option<String>,
}

/// Everything the file says.
#[derive(Debug, Clone)]
pub struct PgConf {
    pub stanza: String,
    pub data_dir: PathBuf,
    pub port: u16,
    pub socket_dir: Option<PathBuf>,
    pub user: String,
    /// In target order: repo1 is the policy's first target.
    pub repos: Vec<Repo>,
    pub retention_full: Option<u32>,
    pub retention_diff: Option<u32>,
    pub cipher_pass: Option<String>,
    pub compress_level: i32,
    /// `state_dir/pg/<policy>`: lock, log and spool paths go under it.
    pub state: PathBuf,
    pub process_max: u32,
    pub archive_async: bool,
    pub bundle: bool,
}

/// Splits an S3 endpoint URL into host and port. pgBackRest 2.45 speaks
/// only HTTPS to S3.
pub fn endpoint(url: &str) -> Result<(String, u16), String> {
    let rest = match url.split_once("://") {
        Some(("https", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "endpoint '{url}': pgBackRest 2.45 reaches S3 only over https, not {scheme}; put a TLS terminator in front of the server and set ca_file"
            ));
        }
        None => url,
    };
    let host_port = rest.split('/').next().unwrap_or(rest);
    match host_port.rsplit_once(':') {
        Some((h, p)) => p
            .parse()
            .map(|p| (h.to_string(), p))
            .map_err(|_| format!("endpoint '{url}': '{p}' is not a port")),
        None => Ok((host_port.to_string(), 443)),
    }
}

/// A rendered configuration as `PGBACKREST_*` variables (every option of
/// every section: `repo1-s3-key` becomes `PGBACKREST_REPO1_S3_KEY`), for a
/// run that writes no file. Secrets stay out of the command line.
pub fn as_env(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                format!("PGBACKREST_{}", k.trim().to_uppercase().replace('-', "_")),
                v.trim().to_string(),
            )
        })
        .collect()
}

/// The text of `pgbackrest.conf`.
pub fn render(c: &PgConf) -> String {
    let mut s = String::new();
    let st = c.state.display();
    let _ = writeln!(
        s,
        "# Written by dr: changes are overwritten. Holds secrets: mode 0600."
    );
    let _ = writeln!(s, "[global]");
    let _ = writeln!(s, "compress-type=zst");
    let _ = writeln!(s, "compress-level={}", c.compress_level.clamp(1, 19));
    let _ = writeln!(s, "lock-path={st}/lock");
    let _ = writeln!(s, "log-path={st}/log");
    let _ = writeln!(s, "spool-path={st}/spool");
    let _ = writeln!(s, "log-level-file=info");
    let _ = writeln!(s, "start-fast=y");
    // Every core compresses and transfers (backup, restore, the async
    // archive push).
    let _ = writeln!(s, "process-max={}", c.process_max.max(1));
    if c.archive_async {
        // archive_command still returns only once the segment is in every
        // repository; the segments queued behind it are pushed ahead in
        // parallel from the spool (spool-path above).
        let _ = writeln!(s, "archive-async=y");
    }
    for (i, r) in c.repos.iter().enumerate() {
        let n = i + 1;
        match r {
            Repo::Posix { path } => {
                let _ = writeln!(s, "repo{n}-type=posix");
                let _ = writeln!(s, "repo{n}-path={}", path.display());
            }
            Repo::S3(r) => {
                let _ = writeln!(s, "repo{n}-type=s3");
                let _ = writeln!(s, "repo{n}-path={}", r.path);
                let _ = writeln!(s, "repo{n}-s3-bucket={}", r.bucket);
                let _ = writeln!(s, "repo{n}-s3-endpoint={}", r.host);
                let _ = writeln!(s, "repo{n}-storage-port={}", r.port);
                let _ = writeln!(s, "repo{n}-s3-region={}", r.region);
                let _ = writeln!(s, "repo{n}-s3-key={}", r.key);
                let _ = writeln!(s, "repo{n}-s3-key-secret={}", r.key_secret);
                if r.path_style {
                    let _ = writeln!(s, "repo{n}-s3-uri-style=path");
                }
                if let Some(ca) = &r.ca_file {
                    let _ = writeln!(s, "repo{n}-storage-ca-file={}", ca.display());
                }
                if let Some(k) = &r.kms_key_id {
                    let _ = writeln!(s, "repo{n}-s3-kms-key-id={k}");
                }
            }
        }
        if c.bundle {
            let _ = writeln!(s, "repo{n}-bundle=y");
        }
        if let Some(f) = c.retention_full {
            let _ = writeln!(s, "repo{n}-retention-full={f}");
            let _ = writeln!(s, "repo{n}-retention-full-type=count");
        }
        if let Some(d) = c.retention_diff {
            let _ = writeln!(s, "repo{n}-retention-diff={d}");
        }
        if let Some(p) = &c.cipher_pass {
            let _ = writeln!(s, "repo{n}-cipher-type=aes-256-cbc");
            let _ = writeln!(s, "repo{n}-cipher-pass={p}");
        }
    }
    let _ = writeln!(s, "\n[{}]", c.stanza);
    let _ = writeln!(s, "pg1-path={}", c.data_dir.display());
    let _ = writeln!(s, "pg1-port={}", c.port);
    let _ = writeln!(s, "pg1-user={}", c.user);
    if let Some(sock) = &c.socket_dir {
        let _ = writeln!(s, "pg1-socket-path={}", sock.display());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PgConf {
        PgConf {
            stanza: "main".into(),
            data_dir: "/var/lib/postgresql/data".into(),
            port: 5432,
            socket_dir: Some("/var/run/postgresql".into()),
            user: "postgres".into(),
            repos: vec![
                Repo::Posix {
                    path: "/var/backups/main-pg/pgbackrest".into(),
                },
                Repo::S3(S3Repo {
                    host: "s3.us-west-1.wasabisys.com".into(),
                    port: 443,
                    bucket: "my-backups".into(),
                    region: "us-west-1".into(),
                    path: "/prod/main-pg/pgbackrest".into(),
                    path_style: true,
                    key: "AKIA".into(),
                    key_secret: "s3cret".into(),
                    ca_file: None,
                    kms_key_id: Some("alias/dr-backups".into()),
                }),
            ],
            retention_full: Some(2),
            retention_diff: Some(7),
            cipher_pass: Some("pass".into()),
            compress_level: 3,
            state: "/var/lib/dr/pg/main-pg".into(),
            process_max: 2,
            archive_async: true,
            bundle: true,
        }
    }

    #[test]
    fn one_repo_per_target_in_order_with_retention_and_cipher() {
        let text = render(&sample());
        for line in [
            "repo1-type=posix",
            "repo1-path=/var/backups/main-pg/pgbackrest",
            "repo2-type=s3",
            "repo2-s3-endpoint=s3.us-west-1.wasabisys.com",
            "repo2-storage-port=443",
            "repo2-s3-uri-style=path",
            "repo2-s3-kms-key-id=alias/dr-backups",
            "repo1-retention-full=2",
            "process-max=2",
            "archive-async=y",
            "repo1-bundle=y",
            "repo2-bundle=y",
            "repo2-retention-diff=7",
            "repo2-cipher-type=aes-256-cbc",
            "compress-type=zst",
            "lock-path=/var/lib/dr/pg/main-pg/lock",
            "[main]",
            "pg1-socket-path=/var/run/postgresql",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }

    #[test]
    fn endpoints_need_https_and_keep_their_port() {
        assert_eq!(
            endpoint("https://localhost:9443"),
            Ok(("localhost".into(), 9443))
        );
        assert_eq!(
            endpoint("https://s3.amazonaws.com"),
            Ok(("s3.amazonaws.com".into(), 443))
        );
        let e = endpoint("http://minio:9000").expect_err("http must be refused");
        assert!(e.contains("https"), "{e}");
    }
}
