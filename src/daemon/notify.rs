//! Telling the outside world about runs: ping URLs in the style of
//! healthchecks.io (`URL/start`, `URL` on success, `URL/fail`) and a JSON
//! webhook. A notification that fails is logged; it never fails a backup.

use std::time::Duration;

use serde::Serialize;

use crate::config::Notify;

/// The webhook's body.
#[derive(Debug, Clone, Serialize)]
pub struct Event<'a> {
    /// `start`, `success` or `failure`.
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

/// Pings `ping_url` (`/start`, nothing, or `/fail`) with the detail as body.
pub fn ping(n: &Notify, event: &str, detail: &str) {
    let Some(base) = &n.ping_url else { return };
    let url = match event {
        "start" => format!("{base}/start"),
        "failure" => format!("{base}/fail"),
        _ => base.clone(),
    };
    if let Err(e) = agent().post(&url).send(detail) {
        tracing::warn!("notification ping to {url} failed: {e} (the run itself is unaffected)");
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
        tracing::warn!("webhook to {url} failed: {e} (the run itself is unaffected)");
    }
}
