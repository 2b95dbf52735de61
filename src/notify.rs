//! Telling the outside world about runs, per policy (a policy's `[notify]`
//! replaces the global one):
//!
//! - `ping_url`, healthchecks.io style: `URL/start`, `URL` on success,
//!   `URL/fail`, with the detail as body;
//! - `kuma_url`, an Uptime Kuma push monitor: `URL?status=up|down&msg=…`;
//! - `ntfy_url`, an ntfy topic: a message on every failure;
//! - `webhook_url`: a JSON document for every start and every finished run
//!   on each target.
//!
//! A notification that fails is logged; it never fails a backup.

use std::time::Duration;

use serde::Serialize;

use crate::config::Notify;

/// The webhook's body.
#[derive(Debug, Clone, Serialize)]
pub struct Event<'a> {
    /// `start`, `success` or `failure` of a run; `at_risk` or `protected`
    /// when a database's protection verdict changes (job `protection`).
    pub event: &'a str,
    pub policy: &'a str,
    pub job: &'a str,
    pub target: Option<&'a str>,
    pub label: Option<&'a str>,
    pub error: Option<&'a str>,
    pub time: String,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(true)
        .build()
        .into()
}

fn warn(what: &str, url: &str, e: impl std::fmt::Display) {
    tracing::warn!("{what} to {url} failed: {e} (the run itself is unaffected)");
}

/// A run of `job` on `policy` starts.
pub fn started(n: &Notify, policy: &str, job: &str) {
    if let Some(base) = &n.ping_url {
        let url = format!("{base}/start");
        if let Err(e) = agent().post(&url).send(format!("{policy} {job}")) {
            warn("notification ping", &url, e);
        }
    }
    webhook(
        n,
        &Event {
            event: "start",
            policy,
            job,
            target: None,
            label: None,
            error: None,
            time: chrono::Utc::now().to_rfc3339(),
        },
    );
}

/// A run of `job` on `policy` ended on every target: `failure` holds what
/// failed, if anything did.
pub fn finished(n: &Notify, policy: &str, job: &str, failure: Option<&str>) {
    let (status, detail) = match failure {
        None => ("up", format!("{policy} {job} ok")),
        Some(f) => ("down", format!("{policy} {job} failed: {f}")),
    };
    if let Some(base) = &n.ping_url {
        let url = match failure {
            None => base.clone(),
            Some(_) => format!("{base}/fail"),
        };
        if let Err(e) = agent().post(&url).send(&detail) {
            warn("notification ping", &url, e);
        }
    }
    if let Some(url) = &n.kuma_url {
        // Uptime Kuma's push API: a GET with the status and a short message.
        let msg: String = detail.chars().take(200).collect();
        if let Err(e) = agent()
            .get(url)
            .query("status", status)
            .query("msg", &msg)
            .query("ping", "")
            .call()
        {
            warn("Uptime Kuma push", url, e);
        }
    }
    if let (Some(url), Some(_)) = (&n.ntfy_url, failure)
        && let Err(e) = agent()
            .post(url)
            .header("Title", &format!("dr: {policy} {job} failed"))
            .header("Priority", "high")
            .header("Tags", "warning")
            .send(&detail)
    {
        warn("ntfy message", url, e);
    }
}

/// Posts the event as JSON to `webhook_url`.
pub fn webhook(n: &Notify, ev: &Event<'_>) {
    let Some(url) = &n.webhook_url else { return };
    let body = serde_json::to_string(ev).unwrap_or_default();
    if let Err(e) = agent()
        .post(url)
        .header("Content-Type", "application/json")
        .send(&body)
    {
        warn("webhook", url, e);
    }
}
