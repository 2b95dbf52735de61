//! The daemon's look at secrets and certificates (`ops/rotation.rs`),
//! kept in [`super::Shared::rotation`] for the verdict, `/metrics` and the
//! status page.
//!
//! Secret files are a `stat` each and are looked at every minute, so a
//! rotated key stops counting as old within a minute. Certificates cost a
//! handshake each and change only when renewed: they are read at start,
//! after a reload, and every six hours, on a thread of their own so that a
//! server that does not answer never holds the schedule.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Shared;
use crate::ops::rotation::{Findings, Probe};

const SECRETS_EVERY: Duration = Duration::from_secs(60);
const CERTS_EVERY: Duration = Duration::from_secs(6 * 3600);

#[derive(Default)]
pub struct RotationWatch {
    secrets_at: Option<Instant>,
    certs_at: Option<Instant>,
    busy: Option<JoinHandle<()>>,
}

impl RotationWatch {
    /// Starts a look when one is due (or, after `reloaded`, a full look).
    pub fn tick(&mut self, shared: &Arc<Shared>, reloaded: bool) {
        if reloaded {
            self.secrets_at = None;
            self.certs_at = None;
        }
        if self.busy.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let certs = self.certs_at.is_none_or(|t| t.elapsed() >= CERTS_EVERY);
        let secrets = self.secrets_at.is_none_or(|t| t.elapsed() >= SECRETS_EVERY);
        if !certs && !secrets {
            return;
        }
        let now = Instant::now();
        self.secrets_at = Some(now);
        if certs {
            self.certs_at = Some(now);
        }
        let Ok(cfg) = shared.ctx.read().map(|c| c.cfg().clone()) else {
            return;
        };
        let shared = shared.clone();
        self.busy = Some(std::thread::spawn(move || {
            let mut found = Findings::gather(&cfg, if certs { Probe::All } else { Probe::None });
            if let Ok(mut r) = shared.rotation.lock() {
                if !certs {
                    found.certs = std::mem::take(&mut r.certs);
                }
                *r = found;
            }
        }));
    }
}

/// The metrics of secrets and certificates: timestamps for dashboards,
/// and 0/1 series the shipped alert rules fire on, one per secret file
/// and endpoint from the first look on (a second or so after start).
pub fn metrics(
    reg: &mut prometheus_client::registry::Registry,
    shared: &Shared,
    security: &crate::config::Security,
    now: chrono::DateTime<chrono::Utc>,
) {
    let mut gauge = |name: &str, help: &str| super::http::gauge(reg, name, help);
    let changed = gauge(
        "dr_secret_file_changed_timestamp_seconds",
        "When the contents of a key or secret file dr loads last changed (its modification time; 0: it cannot be read)",
    );
    let due = gauge(
        "dr_secret_rotation_due",
        "1 while the secret file is older than [security] rotate_after (always 0 while that is off)",
    );
    let expiry = gauge(
        "dr_tls_cert_expiry_timestamp_seconds",
        "When the TLS certificate of an HTTPS endpoint dr talks to expires (0: not read)",
    );
    let expiring = gauge(
        "dr_tls_cert_expiring",
        "1 while the certificate expires within [security] cert_warn, or has expired",
    );
    let Ok(found) = shared.rotation.lock().map(|f| f.clone()) else {
        return;
    };
    let ts = |t: chrono::DateTime<chrono::Utc>| t.timestamp_millis() as f64 / 1000.0;
    for s in found.secrets_at(security, now) {
        let labels = vec![
            ("setting".to_string(), s.item.setting.clone()),
            ("file".to_string(), s.item.path.display().to_string()),
        ];
        changed
            .get_or_create(&labels)
            .set(s.item.changed.map_or(0.0, ts));
        due.get_or_create(&labels)
            .set(if s.at_risk { 1.0 } else { 0.0 });
    }
    for c in found.certs_at(security, now) {
        let labels = vec![("endpoint".to_string(), c.item.endpoint.clone())];
        expiry
            .get_or_create(&labels)
            .set(c.item.not_after.map_or(0.0, ts));
        expiring
            .get_or_create(&labels)
            .set(if c.at_risk { 1.0 } else { 0.0 });
    }
}
