//! Rotation and expiry you can see: how long ago each key and secret file
//! dr loads last changed, and when the TLS certificate of each HTTPS
//! endpoint it talks to expires.
//!
//! Deployment guides ask for secrets rotated every 30 to 90 days and
//! certificates watched 30 days ahead; both deadlines pass in silence
//! unless something counts the days. [`Findings::gather`] collects the
//! facts (a file's modification time, a certificate's `notAfter`); what
//! they mean is decided against `[security]` at the moment of asking, so a
//! daemon that probed a certificate yesterday still counts today's days.
//! `dr keys status`, `dr info`, `/metrics` and the status page all read
//! them through this module, and a secret past `rotate_after` or a
//! certificate within `cert_warn` of expiry makes the policies that depend
//! on it *at risk* ([`Findings::risks`]).

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::verdict::{Reason, Risk};
use crate::config::{Config, Policy, Security, Source, TargetKind};

/// How long a certificate probe waits for a server.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which policies depend on a secret or an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `[encryption]`: every encrypted policy.
    Encryption,
    /// A target's credentials or endpoint: every policy writing to it.
    Target(String),
    /// A policy's own secret (PostgreSQL's `cipher_pass_file`).
    Policy(String),
    /// What no backup depends on (`[daemon] token_file`, notification
    /// endpoints): shown and alerted on, not part of any verdict.
    Daemon,
}

impl Scope {
    fn covers(&self, policy: &Policy) -> Option<Option<String>> {
        match self {
            Scope::Encryption => policy.encrypted.then_some(None),
            Scope::Target(t) => policy.targets.contains(t).then(|| Some(t.clone())),
            Scope::Policy(p) => (p == policy.configured_name()).then_some(None),
            Scope::Daemon => None,
        }
    }

    /// Who depends on it, in words.
    fn word(&self) -> String {
        match self {
            Scope::Encryption => "encryption".into(),
            Scope::Target(t) => format!("target '{t}'"),
            Scope::Policy(p) => format!("policy '{p}'"),
            Scope::Daemon => "daemon".into(),
        }
    }
}

/// Serialised as [`Scope::word`]: `dr keys status --json`'s `used_by`.
impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.word())
    }
}

/// One secret or key file and when its contents last changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecretFile {
    /// The setting that names it, e.g. `targets.s3.secret_access_key_file`.
    pub setting: String,
    pub path: PathBuf,
    /// Its modification time (following symlinks, so a secret manager's
    /// symlink swap counts as a change); `None` when it cannot be read.
    pub changed: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    pub scope: Scope,
}

/// The certificate of one HTTPS endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Certificate {
    /// `host:port`.
    pub endpoint: String,
    /// Who talks to it: `target 's3'`; `daemon` for notification URLs.
    pub used_by: Vec<Scope>,
    pub not_after: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Why dr's client refuses the certificate, or why none was seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub checked: DateTime<Utc>,
}

impl Certificate {
    /// Who talks to it, in words.
    pub fn users(&self) -> String {
        self.used_by
            .iter()
            .map(Scope::word)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A secret or certificate with what `[security]` makes of it now.
#[derive(Debug, Clone, Serialize)]
pub struct Judged<T> {
    #[serde(flatten)]
    pub item: T,
    /// Days since the secret changed, or until the certificate expires
    /// (negative: expired).
    pub days: Option<f64>,
    /// Past `rotate_after`, or within `cert_warn` of expiry.
    pub at_risk: bool,
}

/// Which certificates [`Findings::gather`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    None,
    /// The S3 targets' only: what a verdict depends on (`dr info`).
    Targets,
    /// Notification endpoints too (`dr keys status`, the daemon).
    All,
}

/// Everything known of a configuration's secrets and certificates.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Findings {
    pub secrets: Vec<SecretFile>,
    pub certs: Vec<Certificate>,
}

/// One HTTPS endpoint to probe, and who talks to it.
struct Endpoint {
    host: String,
    port: u16,
    ca_file: Option<PathBuf>,
    scopes: Vec<Scope>,
}

impl Endpoint {
    /// Adds `scope`'s use of `host:port` (trusting `ca_file`) to `all`:
    /// one probe for an endpoint several targets share.
    fn add(
        all: &mut Vec<Endpoint>,
        (host, port): (String, u16),
        ca_file: Option<PathBuf>,
        scope: Scope,
    ) {
        match all
            .iter_mut()
            .find(|e| e.host == host && e.port == port && e.ca_file == ca_file)
        {
            Some(e) if !e.scopes.contains(&scope) => e.scopes.push(scope),
            Some(_) => {}
            None => all.push(Endpoint {
                host,
                port,
                ca_file,
                scopes: vec![scope],
            }),
        }
    }
}

impl Findings {
    /// Reads every secret file's modification time and the certificates
    /// of the endpoints `probe` asks for (in parallel, a handshake each).
    pub fn gather(cfg: &Config, probe: Probe) -> Findings {
        Findings {
            secrets: secret_files(cfg),
            certs: match probe {
                Probe::None => Vec::new(),
                Probe::Targets => certificates(cfg, false),
                Probe::All => certificates(cfg, true),
            },
        }
    }

    /// The secrets, judged against `security` at `now`.
    pub fn secrets_at(&self, security: &Security, now: DateTime<Utc>) -> Vec<Judged<SecretFile>> {
        self.secrets
            .iter()
            .map(|s| {
                let days = s.changed.map(|c| days_between(c, now));
                Judged {
                    item: s.clone(),
                    days,
                    at_risk: security
                        .rotate_after
                        .zip(days)
                        .is_some_and(|(r, d)| d * 86_400.0 > r.as_secs_f64()),
                }
            })
            .collect()
    }

    /// The certificates, judged against `security` at `now`.
    pub fn certs_at(&self, security: &Security, now: DateTime<Utc>) -> Vec<Judged<Certificate>> {
        self.certs
            .iter()
            .map(|c| {
                let days = c.not_after.map(|n| days_between(now, n));
                Judged {
                    item: c.clone(),
                    days,
                    at_risk: days.is_some_and(|d| d * 86_400.0 <= security.cert_warn.as_secs_f64()),
                }
            })
            .collect()
    }

    /// Why `policy` is at risk from its secrets and certificates at `now`.
    pub fn risks(&self, security: &Security, policy: &Policy, now: DateTime<Utc>) -> Vec<Risk> {
        let mut out = Vec::new();
        for s in self
            .secrets_at(security, now)
            .into_iter()
            .filter(|s| s.at_risk)
        {
            let (Some(target), Some(rotate), Some(changed)) = (
                s.item.scope.covers(policy),
                security.rotate_after,
                s.item.changed,
            ) else {
                continue;
            };
            out.push(Risk {
                reason: Reason::RotationDue,
                target,
                detail: format!(
                    "secret file {} ({}) last changed {}, {:.0} days ago, past security.rotate_after ({}): rotate it",
                    s.item.path.display(),
                    s.item.setting,
                    stamp(changed),
                    s.days.unwrap_or_default(),
                    span(rotate)
                ),
            });
        }
        for c in self
            .certs_at(security, now)
            .into_iter()
            .filter(|c| c.at_risk)
        {
            let Some(not_after) = c.item.not_after else {
                continue;
            };
            let days = c.days.unwrap_or_default();
            let when = if days < 0.0 {
                format!("expired {}, {:.0} days ago", stamp(not_after), -days)
            } else {
                format!(
                    "expires {}, in {:.0} days (security.cert_warn is {})",
                    stamp(not_after),
                    days,
                    span(security.cert_warn)
                )
            };
            for scope in &c.item.used_by {
                if let Some(target) = scope.covers(policy) {
                    out.push(Risk {
                        reason: Reason::CertExpiring,
                        target,
                        detail: format!(
                            "the TLS certificate of {} ({}) {when}: renew it",
                            c.item.endpoint,
                            c.item.subject.as_deref().unwrap_or("no subject")
                        ),
                    });
                }
            }
        }
        out
    }
}

fn days_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_seconds() as f64 / 86_400.0
}

/// A setting's duration as written: "90d" rather than humantime's "90days".
fn span(d: Duration) -> String {
    match d.as_secs() {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        _ => humantime::format_duration(d).to_string(),
    }
}

fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Every key and secret file the configuration names, with its
/// modification time.
fn secret_files(cfg: &Config) -> Vec<SecretFile> {
    let mut named: Vec<(String, PathBuf, Scope)> = Vec::new();
    let e = &cfg.encryption;
    for (setting, f) in [
        ("passphrase_file", &e.passphrase_file),
        ("identity_file", &e.identity_file),
        ("recipients_file", &e.recipients_file),
    ] {
        if let Some(f) = f {
            named.push((
                format!("encryption.{setting}"),
                f.clone(),
                Scope::Encryption,
            ));
        }
    }
    for (name, t) in &cfg.targets {
        if let TargetKind::S3(s) = &t.kind {
            for (setting, f) in [
                ("access_key_id_file", &s.access_key_id_file),
                ("secret_access_key_file", &s.secret_access_key_file),
            ] {
                if let Some(f) = f {
                    named.push((
                        format!("targets.{name}.{setting}"),
                        f.clone(),
                        Scope::Target(name.clone()),
                    ));
                }
            }
        }
    }
    for p in &cfg.policies {
        if let Source::Postgres(pg) = &p.source
            && let Some(f) = &pg.cipher_pass_file
        {
            named.push((
                format!("policy {}: source.cipher_pass_file", p.name),
                f.clone(),
                Scope::Policy(p.name.clone()),
            ));
        }
    }
    if let Some(f) = &cfg.daemon_token_file {
        named.push(("daemon.token_file".into(), f.clone(), Scope::Daemon));
    }
    named
        .into_iter()
        .map(|(setting, path, scope)| {
            let m = std::fs::metadata(&path).and_then(|m| m.modified());
            SecretFile {
                setting,
                changed: m.as_ref().ok().map(|t| DateTime::<Utc>::from(*t)),
                error: m
                    .err()
                    .map(|e| format!("cannot read: {}", crate::error::io_reason(&e))),
                path,
                scope,
            }
        })
        .collect()
}

/// Every HTTPS endpoint dr talks to, once each: S3 targets (pgBackRest's
/// repositories are S3 targets too) and notification URLs.
fn endpoints(cfg: &Config, notify: bool) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for (name, t) in &cfg.targets {
        if let TargetKind::S3(s) = &t.kind {
            let url = s.endpoint.clone().unwrap_or_else(|| {
                format!(
                    "https://s3.{}.amazonaws.com",
                    s.region.as_deref().unwrap_or("us-east-1")
                )
            });
            if let Some(at) = https_host_port(&url) {
                Endpoint::add(&mut out, at, s.ca_file.clone(), Scope::Target(name.clone()));
            }
        }
    }
    if !notify {
        return out;
    }
    let notifies =
        std::iter::once(&cfg.notify).chain(cfg.policies.iter().filter_map(|p| p.notify.as_ref()));
    for n in notifies {
        for url in [&n.ping_url, &n.kuma_url, &n.ntfy_url, &n.webhook_url]
            .into_iter()
            .flatten()
        {
            if let Some(at) = https_host_port(url) {
                Endpoint::add(&mut out, at, None, Scope::Daemon);
            }
        }
    }
    out
}

/// `host` and `port` of an `https://` URL; `None` for any other scheme.
fn https_host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, tail) = v6.split_once(']')?;
        let port = tail
            .strip_prefix(':')
            .map_or(Some(443), |p| p.parse().ok())?;
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), 443)),
    }
}

/// Probes every endpoint, all at once.
fn certificates(cfg: &Config, notify: bool) -> Vec<Certificate> {
    let endpoints = endpoints(cfg, notify);
    std::thread::scope(|s| {
        let handles: Vec<_> = endpoints
            .iter()
            .map(|e| {
                s.spawn(move || {
                    let seen = crate::tls_expiry::probe(
                        &e.host,
                        e.port,
                        e.ca_file.as_deref(),
                        PROBE_TIMEOUT,
                    );
                    let (not_after, subject, error) = match seen {
                        Ok(s) => (Some(s.not_after), Some(s.subject), s.refused),
                        Err(why) => (None, None, Some(why)),
                    };
                    Certificate {
                        endpoint: format!("{}:{}", e.host, e.port),
                        used_by: e.scopes.clone(),
                        not_after,
                        subject,
                        error,
                        checked: Utc::now(),
                    }
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    })
}

/// `dr keys status`'s lines for secrets and certificates.
pub fn render(f: &Findings, security: &Security, now: DateTime<Utc>) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for j in f.secrets_at(security, now) {
        let i = &j.item;
        let _ = match (i.changed, &i.error) {
            (Some(c), _) => writeln!(
                s,
                "secret {} ({}): changed {}, {:.0} days ago{}",
                i.setting,
                i.path.display(),
                stamp(c),
                j.days.unwrap_or_default(),
                match (j.at_risk, security.rotate_after) {
                    (true, Some(r)) =>
                        format!(": ROTATE, older than security.rotate_after ({})", span(r)),
                    _ => String::new(),
                }
            ),
            (None, e) => writeln!(
                s,
                "secret {} ({}): {}",
                i.setting,
                i.path.display(),
                e.as_deref().unwrap_or("unknown")
            ),
        };
    }
    for j in f.certs_at(security, now) {
        let c = &j.item;
        let who = c.users();
        let _ = match c.not_after {
            Some(n) => writeln!(
                s,
                "certificate of {} ({who}): expires {}, {}{}{}",
                c.endpoint,
                stamp(n),
                match j.days.unwrap_or_default() {
                    d if d < 0.0 => format!("{:.0} days ago", -d),
                    d => format!("in {d:.0} days"),
                },
                if j.at_risk {
                    format!(
                        ": RENEW, within security.cert_warn ({})",
                        span(security.cert_warn)
                    )
                } else {
                    String::new()
                },
                c.error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" (refused: {e})"))
            ),
            None => writeln!(
                s,
                "certificate of {} ({who}): not read: {}",
                c.endpoint,
                c.error.as_deref().unwrap_or("unknown")
            ),
        };
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_urls_give_host_and_port() {
        assert_eq!(
            https_host_port("https://localhost:9443/x"),
            Some(("localhost".into(), 9443))
        );
        assert_eq!(
            https_host_port("https://user:pw@hc.example.com/ping/abc"),
            Some(("hc.example.com".into(), 443))
        );
        assert_eq!(
            https_host_port("https://[::1]:8443"),
            Some(("::1".into(), 8443))
        );
        assert_eq!(https_host_port("http://minio:9000"), None);
        assert_eq!(https_host_port("https://host:notaport"), None);
    }

    #[test]
    fn rotation_is_due_past_rotate_after_and_certificates_within_cert_warn() {
        let now = Utc::now();
        let f = Findings {
            secrets: vec![
                SecretFile {
                    setting: "encryption.passphrase_file".into(),
                    path: "/k".into(),
                    changed: Some(now - chrono::Duration::days(100)),
                    error: None,
                    scope: Scope::Encryption,
                },
                SecretFile {
                    setting: "daemon.token_file".into(),
                    path: "/t".into(),
                    changed: Some(now - chrono::Duration::days(10)),
                    error: None,
                    scope: Scope::Daemon,
                },
            ],
            certs: vec![Certificate {
                endpoint: "s3.example.com:443".into(),
                used_by: vec![Scope::Target("s3".into())],
                not_after: Some(now + chrono::Duration::days(10)),
                subject: Some("CN=s3.example.com".into()),
                error: None,
                checked: now,
            }],
        };
        let off = Security::default();
        let secrets = f.secrets_at(&off, now);
        assert!(
            secrets.iter().all(|s| !s.at_risk),
            "rotate_after is off by default"
        );
        assert!(
            f.certs_at(&off, now)[0].at_risk,
            "10 days is within the default 30"
        );
        let on = Security {
            rotate_after: Some(Duration::from_secs(90 * 86_400)),
            cert_warn: Duration::from_secs(7 * 86_400),
        };
        let secrets = f.secrets_at(&on, now);
        assert!(secrets[0].at_risk && !secrets[1].at_risk, "{secrets:?}");
        assert!(!f.certs_at(&on, now)[0].at_risk, "10 days is outside 7");
        assert!(f.certs_at(&on, now + chrono::Duration::days(4))[0].at_risk);
    }
}
