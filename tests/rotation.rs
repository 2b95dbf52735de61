//! Rotation and expiry you can see: a secret file older than
//! `[security] rotate_after` and a TLS certificate within `cert_warn` of
//! its expiry put the policies that depend on them at risk, in `dr info`,
//! `dr keys status`, `/metrics`, the status page, and the shipped alert
//! rules.

mod common;

use std::time::{Duration, SystemTime};

use common::s3::{S3Server, SECRET_KEY, TlsProxy, env_at};
use common::{Env, make_db};

/// Sets `path`'s modification time `days` back.
fn age_file(path: &std::path::Path, days: u64) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now() - Duration::from_secs(days * 86_400)))
        .expect("set mtime");
}

fn add_to_config(env: &Env, text: &str) {
    let cfg = std::fs::read_to_string(env.config()).expect("cfg");
    std::fs::write(env.config(), cfg + text).expect("cfg");
}

/// The reasons `dr info --json` gives for policy `app`, as (reason, target, detail).
fn reasons(env: &Env) -> Vec<(String, Option<String>, String)> {
    let info = env.dr(&["info", "app", "--json"]);
    let doc = info.json();
    doc["policies"][0]["verdict"]["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|r| {
            (
                r["reason"].as_str().unwrap_or("").to_string(),
                r["target"].as_str().map(str::to_string),
                r["detail"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// A daemon's `/metrics` once `series` shows in it, and the daemon.
fn metrics_once(env: &Env, series: &str) -> (common::Proc, u16, String) {
    add_to_config(env, "[daemon]\nlisten = \"127.0.0.1:0\"\n");
    let (daemon, port) = common::start_daemon_listening(env, &[]);
    let mut body = String::new();
    common::wait_until(
        series,
        30,
        || {
            body = common::http_get(port, "/metrics")
                .map(|(_, b)| b)
                .unwrap_or_default();
            body.lines().any(|l| l.starts_with(series))
        },
        || std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default(),
    );
    (daemon, port, body)
}

fn line_of<'a>(body: &'a str, series: &str) -> &'a str {
    body.lines()
        .find(|l| l.starts_with(series))
        .unwrap_or_else(|| panic!("{series} in {body}"))
}

#[test]
fn a_secret_older_than_rotate_after_puts_its_policies_at_risk_until_it_is_rotated() {
    let env = Env::new("");
    make_db(&env.db, true, 100, 100);
    env.dr(&["backup-local", "app", "--type", "full"]).ok();
    let recipients = env.path("backup.pub");
    age_file(&recipients, 100);
    // Off by default: an old file is shown, not judged.
    assert!(reasons(&env).is_empty(), "{:?}", reasons(&env));
    add_to_config(&env, "[security]\nrotate_after = \"90d\"\n");
    let r = reasons(&env);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].0, "rotation_due");
    assert_eq!(
        r[0].1, None,
        "every encrypted policy depends on [encryption]"
    );
    assert!(
        r[0].2.contains(&recipients.display().to_string())
            && r[0].2.contains("encryption.recipients_file")
            && r[0].2.contains("100 days ago"),
        "{r:?}"
    );
    let info = env.dr(&["info", "app"]);
    assert_ne!(info.code, 0, "at risk is not ok: {}", info.stdout);
    // dr keys status shows every secret's age, and which is due.
    let keys = env.dr(&["keys", "status", "--json"]).ok().json();
    let secret = keys["secrets"]
        .as_array()
        .expect("secrets")
        .iter()
        .find(|s| s["setting"] == "encryption.recipients_file")
        .expect("the recipients file is listed")
        .clone();
    assert_eq!(secret["at_risk"], true, "{secret}");
    let days = secret["days"].as_f64().expect("days");
    assert!((99.9..100.1).contains(&days), "{secret}");
    let text = env.dr(&["keys", "status"]).ok().stdout;
    assert!(
        text.contains("secret encryption.recipients_file") && text.contains("ROTATE"),
        "{text}"
    );
    // The daemon: the metric, the verdict, the status page, the alert.
    let (daemon, port, body) = metrics_once(&env, "dr_secret_rotation_due{");
    let due = line_of(&body, "dr_secret_rotation_due{").to_string();
    assert!(
        due.contains("setting=\"encryption.recipients_file\"") && due.ends_with(" 1.0"),
        "{due}"
    );
    assert_eq!(
        common::metric(&body, "dr_protected{policy=\"app\"}"),
        Some(0.0),
        "{body}"
    );
    let changed =
        common::metric(&body, "dr_secret_file_changed_timestamp_seconds{").expect("changed");
    let age_days = (SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
        - changed)
        / 86_400.0;
    assert!((99.9..100.1).contains(&age_days), "{body}");
    let (_, page) = common::http_get(port, "/").expect("status page");
    assert!(
        page.contains("secret encryption.recipients_file")
            && page.contains("data-at-risk=\"true\"")
            && page.contains("rotation_due"),
        "{page}"
    );
    drop(daemon);
    assert!(common::alert_fires("DrSecretRotationDue", &due));
    assert!(!common::alert_fires(
        "DrSecretRotationDue",
        &due.replace("} 1", "} 0")
    ));
    // Rotated (rewritten): protected again.
    let text = std::fs::read_to_string(&recipients).expect("read");
    std::fs::write(&recipients, text).expect("rewrite");
    assert!(reasons(&env).is_empty(), "{:?}", reasons(&env));
}

#[test]
fn a_certificate_expiring_in_ten_days_puts_the_target_at_risk_and_fires_the_alert() {
    let root = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(root.path(), "backups");
    let tls_dir = tempfile::tempdir().expect("tmp");
    let proxy = TlsProxy::start_days(tls_dir.path(), server.port, 10);
    let env = env_at(&proxy.endpoint(), "[\"s3\"]", "", SECRET_KEY, "backups");
    let cfg = std::fs::read_to_string(env.config()).expect("cfg").replace(
        "path_style = true\n",
        &format!("path_style = true\nca_file = \"{}\"\n", proxy.ca.display()),
    );
    std::fs::write(env.config(), cfg).expect("cfg");
    make_db(&env.db, true, 100, 100);
    // Still valid: backups work, and the deadline shows.
    env.dr(&["backup-s3", "app", "--type", "full"]).ok();
    let endpoint = format!("localhost:{}", proxy.port);
    let r = reasons(&env);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].0, "cert_expiring");
    assert_eq!(r[0].1.as_deref(), Some("s3"));
    assert!(
        r[0].2.contains(&endpoint)
            && r[0].2.contains("in 10 days")
            && r[0].2.contains("CN=localhost"),
        "{r:?}"
    );
    let keys = env.dr(&["keys", "status", "--json"]).ok().json();
    let cert = keys["certificates"][0].clone();
    assert_eq!(cert["endpoint"], endpoint.as_str(), "{keys}");
    assert_eq!(cert["used_by"][0], "target 's3'", "{keys}");
    assert_eq!(cert["at_risk"], true, "{keys}");
    let days = cert["days"].as_f64().expect("days");
    assert!((9.9..10.1).contains(&days), "{cert}");
    // The target's secret key file is listed too, and judged once
    // rotate_after is set; cert_warn below 10 days lets the certificate be.
    age_file(&env.path("s3.secret"), 40);
    add_to_config(
        &env,
        "[security]\nrotate_after = \"30d\"\ncert_warn = \"7d\"\n",
    );
    let r = reasons(&env);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(
        (r[0].0.as_str(), r[0].1.as_deref()),
        ("rotation_due", Some("s3"))
    );
    assert!(
        r[0].2.contains("targets.s3.secret_access_key_file"),
        "{r:?}"
    );
    // Back to the defaults: the daemon serves the expiry and the alert fires.
    let cfg = std::fs::read_to_string(env.config()).expect("cfg");
    std::fs::write(
        env.config(),
        cfg.replace(
            "[security]\nrotate_after = \"30d\"\ncert_warn = \"7d\"\n",
            "",
        ),
    )
    .expect("cfg");
    let series = format!("dr_tls_cert_expiring{{endpoint=\"{endpoint}\"}}");
    let (daemon, port, body) = metrics_once(&env, &series);
    let expiring = line_of(&body, &series).to_string();
    assert!(expiring.ends_with(" 1.0"), "{body}");
    let expiry = common::metric(
        &body,
        &format!("dr_tls_cert_expiry_timestamp_seconds{{endpoint=\"{endpoint}\"}}"),
    )
    .expect("expiry");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(((expiry - now) / 86_400.0 - 10.0).abs() < 0.1, "{body}");
    assert_eq!(
        common::metric(&body, "dr_protected{policy=\"app\"}"),
        Some(0.0),
        "{body}"
    );
    let (_, page) = common::http_get(port, "/").expect("status page");
    assert!(
        page.contains(&format!("certificate {endpoint}")) && page.contains("cert_expiring"),
        "{page}"
    );
    drop(daemon);
    assert!(common::alert_fires("DrCertificateExpiring", &expiring));
}
