//! When the TLS certificate of a server dr talks to expires, read from a
//! handshake with it.
//!
//! A lapsed certificate stops every upload on the day it lapses, and a
//! renewal is a task for a person with a deadline: dr reads the server's
//! certificate ahead of time so the deadline shows while it is weeks away
//! (`ops/rotation.rs`). The handshake trusts what the storage client
//! trusts (the target's `ca_file`, else the system's roots); a certificate
//! it does not trust, an expired one included, is still read and its
//! expiry reported, with why it is refused. Nothing is sent over the
//! connection but the handshake and its close.

use std::io::ErrorKind;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use x509_cert::der::Decode;

/// What a handshake showed of a server's certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// The certificate's `notAfter`.
    pub not_after: DateTime<Utc>,
    /// Its subject, e.g. `CN=s3.example.com`.
    pub subject: String,
    /// Why dr's client refuses it, when it does (expired, unknown issuer).
    pub refused: Option<String>,
}

/// Reads the certificate `host:port` presents, trusting `ca_file` or
/// the system's roots. `Err` says why no certificate was seen (no answer,
/// not TLS).
pub fn probe(
    host: &str,
    port: u16,
    ca_file: Option<&Path>,
    timeout: Duration,
) -> Result<Seen, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = roots(ca_file)?;
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("no certificate to trust: {e}"))?;
    let capture = Arc::new(Capture {
        inner,
        seen: Mutex::default(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("'{host}': {e}"))?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut sock = connect(host, port, timeout)?;
    let mut refused = None;
    while conn.is_handshaking() {
        match conn.complete_io(&mut sock) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                refused = Some(e.to_string());
                break;
            }
            Err(e) => return Err(format!("TLS handshake with {host}:{port}: {e}")),
        }
    }
    if refused.is_none() {
        conn.send_close_notify();
        let _ = conn.complete_io(&mut sock);
    }
    let der = capture
        .seen
        .lock()
        .ok()
        .and_then(|s| s.clone())
        .ok_or_else(|| {
            format!(
                "{host}:{port} showed no certificate{}",
                refused.as_ref().map_or(String::new(), |r| format!(": {r}"))
            )
        })?;
    let cert = x509_cert::Certificate::from_der(&der)
        .map_err(|e| format!("the certificate of {host}:{port} cannot be read: {e}"))?;
    let tbs = &cert.tbs_certificate;
    let secs = tbs.validity.not_after.to_unix_duration().as_secs();
    let not_after = i64::try_from(secs)
        .ok()
        .and_then(|s| DateTime::<Utc>::from_timestamp(s, 0))
        .ok_or_else(|| {
            format!("the certificate of {host}:{port} has an expiry past the year 262143")
        })?;
    Ok(Seen {
        not_after,
        subject: tbs.subject.to_string(),
        refused,
    })
}

/// The roots the storage client trusts: `ca_file`'s certificates, or the
/// system's.
fn roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(ca) => {
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
            roots.add_parsable_certificates(certs);
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    Ok(roots)
}

fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{host}:{port}: {e}"))?;
    let mut last = format!("{host}:{port}: no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| e.to_string())?;
                s.set_write_timeout(Some(timeout))
                    .map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) => last = format!("{host}:{port}: {e}"),
        }
    }
    Err(last)
}

/// The usual verifier, which also keeps the certificate it was shown, so
/// that the expiry of a refused certificate can still be reported. Its
/// verdict stands: a refused certificate fails the handshake.
#[derive(Debug)]
struct Capture {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(end_entity.clone().into_owned());
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
