//! `[security]` in dr.toml: when a secret is old enough to rotate and a
//! certificate close enough to expiry to act on. Both make a database *at
//! risk* (see `ops/rotation.rs`), so the alert that already watches the
//! verdict calls someone while there is still time, rather than on the day
//! a credential is revoked or a certificate lapses.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{FileDiags, positive_duration};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecurity {
    rotate_after: Option<Spanned<String>>,
    cert_warn: Option<Spanned<String>>,
}

/// What `[security]` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Security {
    /// A secret file whose contents last changed longer ago than this is
    /// due for rotation. Off by default: only the operator knows their
    /// rotation policy (the guides dr follows say 30 to 90 days).
    pub rotate_after: Option<Duration>,
    /// A TLS certificate that expires within this is at risk (default 30
    /// days: the warning window of certificate monitors and Let's Encrypt).
    pub cert_warn: Duration,
}

/// The default `cert_warn`.
pub const CERT_WARN: Duration = Duration::from_secs(30 * 86_400);

impl Default for Security {
    fn default() -> Security {
        Security {
            rotate_after: None,
            cert_warn: CERT_WARN,
        }
    }
}

pub(super) fn resolve(d: &mut FileDiags<'_>, raw: &RawSecurity) -> Security {
    let mut ok = true;
    let rotate_after = raw.rotate_after.as_ref().map(|_| {
        positive_duration(
            d,
            "security.rotate_after",
            &raw.rotate_after,
            Duration::ZERO,
            "\"90d\"",
            &mut ok,
        )
    });
    let cert_warn = positive_duration(
        d,
        "security.cert_warn",
        &raw.cert_warn,
        CERT_WARN,
        "\"30d\"",
        &mut ok,
    );
    Security {
        rotate_after,
        cert_warn,
    }
}
