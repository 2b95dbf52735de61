//! S3-compatible object storage (AWS S3, MinIO, Wasabi, Garage, R2, B2) as a target.
//!
//! The blocking `Storage` surface is kept: this module owns a small tokio
//! runtime and drives aws-sdk-s3 on it. Uploads are streamed as multipart
//! uploads with a bounded number of parts in flight, so memory stays flat
//! whatever the size of the object; small objects go up in one PUT. A writer
//! dropped without `commit` aborts its multipart upload.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use chrono::{DateTime, Utc};

mod abandoned;
mod upload;

use super::{ObjectMeta, ObjectWriter, Storage};
use crate::error::{Error, Result, transport_error};
use crate::secret::{FileStamp, stamp};
use abandoned::{journal_add, journal_remove};
use upload::Throttle;
pub use upload::{Sse, UNREADABLE_CLASSES, Upload};

/// Size of one multipart part: big enough for throughput, small enough that
/// `MAX_IN_FLIGHT` of them stay well inside the memory budget.
const PART_SIZE: usize = 8 << 20;
/// Parts uploading at once per object.
const MAX_IN_FLIGHT: usize = 4;

/// Settings of an S3-compatible target.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: Option<String>,
    pub prefix: String,
    pub path_style: bool,
    pub access_key_id_file: Option<PathBuf>,
    pub secret_access_key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub request_checksums: bool,
    /// S3 Object Lock on every backup and WAL object dr writes.
    pub object_lock: Option<ObjectLock>,
    /// dr never deletes on this target.
    pub append_only: bool,
    /// Storage classes, server-side encryption and the upload rate.
    pub upload: Upload,
}

/// `object_lock`: the retention dr puts on each object it writes (the
/// bucket must have been created with Object Lock enabled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub days: u32,
    /// COMPLIANCE (nobody can shorten it) rather than GOVERNANCE.
    pub compliance: bool,
}

impl ObjectLock {
    fn mode(self) -> aws_sdk_s3::types::ObjectLockMode {
        if self.compliance {
            aws_sdk_s3::types::ObjectLockMode::Compliance
        } else {
            aws_sdk_s3::types::ObjectLockMode::Governance
        }
    }

    /// Retain-until for an object written now.
    fn until(self) -> aws_sdk_s3::primitives::DateTime {
        let t = Utc::now() + chrono::Duration::days(i64::from(self.days));
        aws_sdk_s3::primitives::DateTime::from_secs(t.timestamp() + 1)
    }
}

/// Shared state of one S3 target.
#[derive(Debug)]
struct Inner {
    name: String,
    bucket: String,
    prefix: String,
    endpoint: String,
    client: aws_sdk_s3::Client,
    /// The key files, when the target reads its keys from files.
    creds: Option<FileCredentials>,
    object_lock: Option<ObjectLock>,
    append_only: bool,
    /// Multipart uploads started and not yet completed or aborted, one file
    /// each, so a later run can abort what a crash or an outage left behind
    /// (stores such as s3s-fs or Garage may not list multipart uploads).
    journal: PathBuf,
    upload: Upload,
    /// `max_upload_rate`, over every upload to this target.
    throttle: Option<Throttle>,
}

/// An S3 bucket (and prefix) as a target.
///
/// Tasks spawned on the runtime hold only `Inner` (no runtime), so the
/// runtime is always dropped on a caller's thread, never inside itself.
#[derive(Debug, Clone)]
pub struct S3Storage {
    inner: Arc<Inner>,
    rt: Arc<tokio::runtime::Runtime>,
}

impl S3Storage {
    /// Lists `prefix`, from after `after` when given (`StartAfter`, and
    /// filtered again here for a store that ignores it).
    fn list_from(&self, prefix: &str, after: Option<&str>) -> Result<Vec<ObjectMeta>> {
        let inner = &self.inner;
        let full_prefix = inner.full_key(prefix);
        let start_after = after.map(|a| inner.full_key(a));
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .rt
                .block_on(inner.send(|| {
                    inner
                        .client
                        .list_objects_v2()
                        .bucket(&inner.bucket)
                        .prefix(&full_prefix)
                        .set_start_after(start_after.clone())
                        .set_continuation_token(token.clone())
                        .send()
                }))
                .map_err(|e| inner.err("list", prefix, &e))?;
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                let Some(rel) = inner.relative(k) else {
                    continue;
                };
                let modified = o
                    .last_modified()
                    .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()))
                    .unwrap_or_else(Utc::now);
                out.push(ObjectMeta {
                    key: rel.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified,
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated().unwrap_or(false) => token = Some(t.to_string()),
                _ => break,
            }
        }
        if let Some(a) = after {
            out.retain(|o| o.key.as_str() > a);
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Connects to the target described by `cfg` (no request is made
    /// yet), on `rt`, which every target of the process shares.
    pub fn connect(
        name: &str,
        cfg: &S3Settings,
        journal: &Path,
        rt: Arc<tokio::runtime::Runtime>,
    ) -> Result<Self> {
        let (client, creds) = rt.block_on(build_client(name, cfg))?;
        Ok(S3Storage {
            inner: Arc::new(Inner {
                name: name.to_string(),
                bucket: cfg.bucket.clone(),
                prefix: cfg.prefix.clone(),
                endpoint: cfg.endpoint.clone().unwrap_or_else(|| "AWS S3".to_string()),
                client,
                creds,
                object_lock: cfg.object_lock,
                append_only: cfg.append_only,
                journal: journal.to_path_buf(),
                upload: cfg.upload.clone(),
                throttle: cfg.upload.max_upload_rate.map(Throttle::new),
            }),
            rt,
        })
    }
}

async fn build_client(
    name: &str,
    cfg: &S3Settings,
) -> Result<(aws_sdk_s3::Client, Option<FileCredentials>)> {
    use aws_config::{BehaviorVersion, Region};
    use aws_sdk_s3::config::{
        RequestChecksumCalculation, ResponseChecksumValidation, retry::RetryConfig,
        timeout::TimeoutConfig,
    };
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(ep) = &cfg.endpoint {
        // Said once per target and process: a command connects to a
        // target more than once (a backup, then its expire).
        static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let first = WARNED.lock().is_ok_and(|mut w| {
            let new = !w.contains(&name.to_string());
            if new {
                w.push(name.to_string());
            }
            new
        });
        if ep.starts_with("http://") && first {
            tracing::warn!(
                target = %name,
                "target '{name}' talks to {ep} over plain http: object names, sizes and request signatures cross the network in the clear (and the contents of any policy with encryption = \"none\"); use https (with `ca_file` for a private CA)"
            );
        }
        loader = loader.endpoint_url(ep);
    }
    match (&cfg.region, &cfg.endpoint) {
        (Some(r), _) => loader = loader.region(Region::new(r.clone())),
        // S3-compatible stores accept any region name; us-east-1 is what most expect.
        (None, Some(_)) => loader = loader.region(Region::new("us-east-1")),
        (None, None) => {}
    }
    let file_creds = match (&cfg.access_key_id_file, &cfg.secret_access_key_file) {
        (Some(id_file), Some(secret_file)) => {
            let creds = FileCredentials {
                target: name.to_string(),
                id_file: id_file.clone(),
                secret_file: secret_file.clone(),
                current: Arc::default(),
            };
            // Read now: a missing or unreadable key file fails the command
            // as a secret-file problem, before any request.
            creds.load()?;
            loader = loader.credentials_provider(creds.clone());
            Some(creds)
        }
        _ => None,
    };
    if let Some(ca) = &cfg.ca_file {
        use aws_smithy_http_client::tls;
        let pem = std::fs::read(ca).map_err(|e| Error::Secret {
            path: ca.clone(),
            reason: format!(
                "cannot read ca_file of target '{name}': {}",
                crate::error::io_reason(&e)
            ),
        })?;
        let ctx = tls::TlsContext::builder()
            .with_trust_store(tls::TrustStore::empty().with_pem_certificate(pem))
            .build()
            .map_err(|e| Error::Other(format!("target '{name}': ca_file {}: {e}", ca.display())))?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .tls_context(ctx)
            .build_https();
        loader = loader.http_client(http);
    }
    loader = loader
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(5)
                .with_initial_backoff(Duration::from_millis(200)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(60))
                .build(),
        );
    let shared = loader.load().await;
    if shared.region().is_none() {
        return Err(Error::Config(vec![crate::error::Diagnostic {
            file: std::path::PathBuf::from(format!("targets.{name}")),
            line: None,
            message: "no region: set `region` for this target (or AWS_REGION)".into(),
        }]));
    }
    let mut b = aws_sdk_s3::config::Builder::from(&shared).force_path_style(cfg.path_style);
    if file_creds.is_some() {
        // FileCredentials keeps what it read and looks at the files on each
        // request: the SDK's own cache would hold a rotated key forever.
        b = b.identity_cache(aws_sdk_s3::config::IdentityCache::no_cache());
    }
    // aws-chunked uploads with trailing checksums break several S3-compatible
    // stores (B2, R2, older MinIO, Wasabi): send checksums only when required,
    // unless the user asks for them.
    // A locked PUT must carry a checksum (S3 refuses it without one).
    if cfg.endpoint.is_some() && !cfg.request_checksums && cfg.object_lock.is_none() {
        b = b
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    }
    Ok((aws_sdk_s3::Client::from_conf(b.build()), file_creds))
}

/// S3 keys from `access_key_id_file` and `secret_access_key_file`, read
/// again whenever either file changes (inode, size or modification time):
/// a key rotated by a secret manager is used from the next request on,
/// without a restart, and the change is one warning line. Each request
/// costs two `stat` calls; the files are read only when they changed.
/// Clones share what was read: the client asks one, the target keeps
/// another to force a re-read after the store refused a key.
#[derive(Debug, Clone)]
struct FileCredentials {
    target: String,
    id_file: PathBuf,
    secret_file: PathBuf,
    current: Arc<std::sync::Mutex<Option<Loaded>>>,
}

/// The keys last read, and the stamps of their files then.
type Loaded = (Vec<FileStamp>, aws_sdk_s3::config::Credentials);

impl FileCredentials {
    /// Makes the next request read both files again, changed or not: a
    /// secret manager may rewrite a file within the same second, at the
    /// same size, on a filesystem that keeps no finer time.
    fn forget(&self) {
        if let Ok(mut cur) = self.current.lock()
            && let Some((stamps, _)) = cur.as_mut()
        {
            stamps.clear();
        }
    }

    fn load(&self) -> Result<aws_sdk_s3::config::Credentials> {
        use age::secrecy::ExposeSecret;
        let stamps: Vec<FileStamp> = [&self.id_file, &self.secret_file]
            .iter()
            .filter_map(|p| stamp(p))
            .collect();
        let mut cur = self
            .current
            .lock()
            .map_err(|_| Error::Other("S3 credentials lock poisoned".into()))?;
        if let Some((s, c)) = &*cur
            && *s == stamps
        {
            return Ok(c.clone());
        }
        let id = crate::secret::read_secret(&self.id_file)?;
        let secret = crate::secret::read_secret(&self.secret_file)?;
        let creds = aws_sdk_s3::config::Credentials::new(
            id.expose_secret().trim(),
            secret.expose_secret().trim(),
            None,
            None,
            "dr-secret-files",
        );
        let changed = cur.as_ref().is_some_and(|(_, old)| {
            old.access_key_id() != creds.access_key_id()
                || old.secret_access_key() != creds.secret_access_key()
        });
        if changed {
            tracing::warn!(
                target = %self.target,
                "the S3 credentials of target '{}' changed ({}, {}): using the new ones from now on",
                self.target,
                self.id_file.display(),
                self.secret_file.display()
            );
        }
        *cur = Some((stamps, creds.clone()));
        Ok(creds)
    }
}

impl aws_sdk_s3::config::ProvideCredentials for FileCredentials {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::ready(self.load().map_err(
            |e| {
                aws_credential_types::provider::error::CredentialsError::provider_error(
                    std::io::Error::other(e.to_string()),
                )
            },
        ))
    }
}

impl Inner {
    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// A key as the store lists it, relative to the target's prefix (the
    /// inverse of [`Self::full_key`] for keys listed under it).
    fn relative<'k>(&self, full: &'k str) -> Option<&'k str> {
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        full.get(strip..)
    }

    /// Sends a request, and once more when the store refused the key
    /// files' credentials: the files are read again first, a second
    /// later, so a rotation caught between the store and the files (or
    /// between the two files) costs a retry, not a failed backup.
    async fn send<T, E, R, F, Fut>(&self, mut request: F) -> std::result::Result<T, SdkError<E, R>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata,
    {
        let first = request().await;
        match (&first, &self.creds) {
            (Err(e), Some(creds)) if refused(e) => {
                tracing::warn!(target = %self.name, "target '{}' refused the credentials; reading {} and {} again and retrying once", self.name, creds.id_file.display(), creds.secret_file.display());
                creds.forget();
                tokio::time::sleep(Duration::from_secs(1)).await;
                request().await
            }
            _ => first,
        }
    }

    /// Runs the upload `send` of `bytes` within `max_upload_rate`, if set.
    async fn paced<T>(&self, bytes: usize, send: impl std::future::Future<Output = T>) -> T {
        match &self.throttle {
            Some(t) => t.paced(bytes, send).await,
            None => send.await,
        }
    }

    /// Aborts a multipart upload of `key` (relative to the prefix).
    async fn abort_upload(
        &self,
        key: &str,
        upload_id: &str,
    ) -> std::result::Result<
        aws_sdk_s3::operation::abort_multipart_upload::AbortMultipartUploadOutput,
        SdkError<aws_sdk_s3::operation::abort_multipart_upload::AbortMultipartUploadError>,
    > {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .upload_id(upload_id)
            .send()
            .await
    }

    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{} at {}", self.bucket, self.endpoint)
        } else {
            format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint)
        }
    }

    /// Turns an SDK error into one message naming the target, bucket, key and the fix.
    fn err<E, R>(&self, action: &'static str, key: &str, e: &SdkError<E, R>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let code = e.as_service_error().and_then(|s| s.code()).unwrap_or("");
        let detail = format!("{}", DisplayErrorContext(e));
        let reason = match code {
            "NoSuchBucket" => format!(
                "bucket '{}' does not exist: create it (dr does not create buckets)",
                self.bucket
            ),
            _ if refused(e) => {
                "the server refused the credentials: check access_key_id_file and secret_access_key_file".to_string()
            }
            "AccessDenied" if action == "delete" => format!(
                "access denied: the credentials may not delete objects in bucket '{}' (write-only credentials: set append_only = true on target '{}', and dr never deletes)",
                self.bucket, self.name
            ),
            "AccessDenied" => format!(
                "access denied: the credentials may not {action} objects in bucket '{}'",
                self.bucket
            ),
            "NoSuchKey" => "the object does not exist".to_string(),
            _ if matches!(e, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)) => {
                let lower = detail.to_lowercase();
                if detail.contains("CaUsedAsEndEntity") {
                    format!(
                        "TLS failed talking to {}: the server's certificate is a CA certificate (basicConstraints CA:TRUE), which TLS clients refuse as a server certificate: re-issue it with CA:FALSE, or sign it with a CA and give that CA as `ca_file` for target '{}'",
                        self.endpoint, self.name
                    )
                } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
                    format!(
                        "TLS failed talking to {}: if the server uses a private CA or a self-signed certificate, set `ca_file` for target '{}' ({detail})",
                        self.endpoint, self.name
                    )
                } else {
                    format!("cannot reach {} ({detail})", self.endpoint)
                }
            }
            _ => detail,
        };
        Error::Storage {
            target: self.name.clone(),
            location: self.location(),
            action,
            key: key.to_string(),
            reason,
        }
    }
}

/// Whether a store answered that it cannot do a listing beyond objects
/// (versions, multipart uploads), or that these credentials may not: not a
/// failure of the command.
fn listing_unavailable<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    matches!(
        e.as_service_error().and_then(|s| s.code()),
        Some("NotImplemented" | "AccessDenied" | "MethodNotAllowed" | "NotSupported")
    )
}

/// Whether the store refused the credentials themselves (not what they may do).
fn refused<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    matches!(
        e.as_service_error().and_then(|s| s.code()),
        Some(
            "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "NotSignedUp"
                | "ExpiredToken"
                | "InvalidToken"
        )
    )
}

fn to_io(e: Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

type PartHandle = tokio::task::JoinHandle<Result<CompletedPart>>;

struct S3Writer {
    inner: Arc<Inner>,
    rt: Arc<tokio::runtime::Runtime>,
    key: String,
    buf: Vec<u8>,
    upload_id: Option<String>,
    next_part: i32,
    in_flight: VecDeque<PartHandle>,
    done: Vec<CompletedPart>,
    finished: bool,
}

impl S3Writer {
    fn start_upload(&mut self) -> Result<String> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        let inner = self.inner.clone();
        let full = inner.full_key(&self.key);
        let out = self
            .rt
            .block_on(inner.send(|| {
                inner
                    .client
                    .create_multipart_upload()
                    .bucket(&inner.bucket)
                    .key(&full)
                    .set_storage_class(inner.upload.storage_class(&self.key))
                    .set_server_side_encryption(inner.upload.sse())
                    .set_ssekms_key_id(inner.upload.kms_key_id())
                    .set_object_lock_mode(inner.object_lock.map(ObjectLock::mode))
                    .set_object_lock_retain_until_date(inner.object_lock.map(ObjectLock::until))
                    .send()
            }))
            .map_err(|e| inner.err("start upload of", &self.key, &e))?;
        let id = out.upload_id().unwrap_or_default().to_string();
        self.upload_id = Some(id.clone());
        if let Err(e) = journal_add(&inner.journal, &self.key, &id) {
            tracing::warn!(
                "cannot record the multipart upload of {} in {}: {e}",
                self.key,
                inner.journal.display()
            );
        }
        Ok(id)
    }

    fn send_part(&mut self, data: Vec<u8>) -> Result<()> {
        let upload_id = self.start_upload()?;
        while self.in_flight.len() >= MAX_IN_FLIGHT {
            self.wait_oldest()?;
        }
        self.next_part += 1;
        let number = self.next_part;
        let inner = self.inner.clone();
        let key = self.key.clone();
        let handle = self.rt.spawn(async move {
            let full = inner.full_key(&key);
            let len = data.len();
            let send = inner
                .client
                .upload_part()
                .bucket(&inner.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .part_number(number)
                .body(ByteStream::from(data))
                .send();
            let out = inner
                .paced(len, send)
                .await
                .map_err(|e| inner.err("upload part of", &key, &e))?;
            Ok(CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_string))
                .build())
        });
        self.in_flight.push_back(handle);
        Ok(())
    }

    fn wait_oldest(&mut self) -> Result<()> {
        if let Some(h) = self.in_flight.pop_front() {
            let part = self
                .rt
                .block_on(h)
                .map_err(|e| Error::Other(format!("upload task failed: {e}")))??;
            self.done.push(part);
        }
        Ok(())
    }

    fn abort(&mut self) {
        for h in self.in_flight.drain(..) {
            h.abort();
        }
        if let Some(id) = self.upload_id.take() {
            let inner = self.inner.clone();
            let res = self.rt.block_on(inner.abort_upload(&self.key, &id));
            if res.is_ok() {
                journal_remove(&inner.journal, &self.key, &id);
            }
            if let Err(e) = res {
                tracing::warn!(
                    "could not abort the multipart upload of {}: {} (expire and the bucket's lifecycle rules clear it)",
                    self.key,
                    inner.err("abort upload of", &self.key, &e)
                );
            }
        }
    }
}

impl Write for S3Writer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = PART_SIZE - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PART_SIZE {
            let part = std::mem::replace(&mut self.buf, Vec::with_capacity(PART_SIZE));
            self.send_part(part).map_err(to_io)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for S3Writer {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let inner = self.inner.clone();
        let full = inner.full_key(&self.key);
        if self.upload_id.is_none() {
            let body = bytes::Bytes::from(std::mem::take(&mut self.buf));
            let send = inner.send(|| {
                inner
                    .client
                    .put_object()
                    .bucket(&inner.bucket)
                    .key(&full)
                    .set_object_lock_mode(inner.object_lock.map(ObjectLock::mode))
                    .set_object_lock_retain_until_date(inner.object_lock.map(ObjectLock::until))
                    .set_storage_class(inner.upload.storage_class(&self.key))
                    .set_server_side_encryption(inner.upload.sse())
                    .set_ssekms_key_id(inner.upload.kms_key_id())
                    .body(ByteStream::from(body.clone()))
                    .send()
            });
            self.rt
                .block_on(inner.paced(body.len(), send))
                .map_err(|e| inner.err("upload", &self.key, &e))?;
            self.finished = true;
            return Ok(());
        }
        if !self.buf.is_empty() {
            let last = std::mem::take(&mut self.buf);
            self.send_part(last)?;
        }
        while !self.in_flight.is_empty() {
            self.wait_oldest()?;
        }
        let mut parts = std::mem::take(&mut self.done);
        parts.sort_by_key(|p| p.part_number());
        let id = self.upload_id.clone().unwrap_or_default();
        self.rt
            .block_on(
                inner
                    .client
                    .complete_multipart_upload()
                    .bucket(&inner.bucket)
                    .key(&full)
                    .upload_id(&id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send(),
            )
            .map_err(|e| inner.err("complete upload of", &self.key, &e))?;
        journal_remove(&inner.journal, &self.key, &id);
        self.upload_id = None;
        self.finished = true;
        Ok(())
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        if !self.finished {
            self.abort();
        }
    }
}

/// Streams a GET body to a blocking reader through a small bounded channel.
struct S3Reader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
    ended: bool,
}

impl S3Reader {
    /// Body chunks in flight (a few KiB to 64 KiB each): a few MiB at most.
    const DEPTH: usize = 64;
}

impl Read for S3Reader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Ok(c)) if c.is_empty() => self.ended = true,
                Some(Ok(c)) => self.chunk = c,
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(transport_error("download stopped before the end".into()));
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}

impl S3Storage {
    /// A download of `key` (of `range`, an HTTP Range, when given),
    /// streamed through a bounded channel.
    fn open_bytes(&self, key: &str, range: Option<String>) -> Result<Box<dyn Read + Send>> {
        let inner = self.inner.clone();
        let full = inner.full_key(key);
        let out = self.rt.block_on(inner.send(|| {
            inner
                .client
                .get_object()
                .bucket(&inner.bucket)
                .key(&full)
                .set_range(range.clone())
                .send()
        }));
        let out = match out {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Err(Error::NotFound(format!(
                    "target '{}' ({}): object {key} does not exist",
                    inner.name,
                    inner.location()
                )));
            }
            Err(e) => return Err(inner.err("download", key, &e)),
        };
        // A bounded async channel: the download task waits on `send` without
        // tying up a blocking thread per chunk, and the reader blocks on it.
        let (tx, rx) = tokio::sync::mpsc::channel(S3Reader::DEPTH);
        let mut body = out.body;
        let label = key.to_string();
        let owner = inner.clone();
        self.rt.spawn(async move {
            loop {
                let item = match body.try_next().await {
                    Ok(Some(chunk)) if chunk.is_empty() => continue,
                    Ok(Some(chunk)) => Ok(chunk),
                    Ok(None) => Ok(bytes::Bytes::new()),
                    Err(e) => Err(transport_error(format!(
                        "target '{}': download of {label} failed: {}",
                        owner.name,
                        DisplayErrorContext(&e)
                    ))),
                };
                let last = !matches!(&item, Ok(c) if !c.is_empty());
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Box::new(S3Reader {
            rx,
            chunk: bytes::Bytes::new(),
            ended: false,
        }))
    }
}

impl Storage for S3Storage {
    fn shared(&self) -> bool {
        true
    }

    fn protection(&self) -> super::Protection {
        match (self.inner.append_only, self.inner.object_lock) {
            (true, _) => super::Protection::AppendOnly,
            (false, Some(l)) => super::Protection::Locked {
                days: l.days,
                compliance: l.compliance,
            },
            (false, None) => super::Protection::None,
        }
    }

    fn put_conditional(
        &self,
        key: &str,
        bytes: &[u8],
        cond: &super::Condition,
    ) -> Result<Option<String>> {
        let inner = &self.inner;
        let body = bytes::Bytes::copy_from_slice(bytes);
        let request = || {
            let req = inner
                .client
                .put_object()
                .bucket(&inner.bucket)
                .key(inner.full_key(key))
                .set_server_side_encryption(inner.upload.sse())
                .set_ssekms_key_id(inner.upload.kms_key_id())
                .body(ByteStream::from(body.clone()));
            match cond {
                super::Condition::Absent => req.if_none_match("*"),
                super::Condition::Match(etag) => req.if_match(etag),
            }
            .send()
        };
        match self
            .rt
            .block_on(inner.paced(bytes.len(), inner.send(request)))
        {
            Ok(out) => Ok(Some(out.e_tag().unwrap_or_default().to_string())),
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                let code = e.as_service_error().and_then(|s| s.code()).unwrap_or("");
                if matches!(status, Some(412) | Some(409))
                    || code == "PreconditionFailed"
                    || code == "ConditionalRequestConflict"
                {
                    Ok(None)
                } else {
                    Err(inner.err("write", key, &e))
                }
            }
        }
    }

    fn get_with_etag(&self, key: &str) -> Result<Option<(Vec<u8>, String)>> {
        Ok(match self.get_if_changed(key, None)? {
            super::Fetched::Changed(bytes, etag) => Some((bytes, etag)),
            super::Fetched::Absent | super::Fetched::Unchanged => None,
        })
    }

    /// `If-None-Match`: an unchanged object is a `304` without a body (a
    /// store that ignores the header sends the object, compared here).
    fn get_if_changed(&self, key: &str, etag: Option<&str>) -> Result<super::Fetched> {
        let inner = &self.inner;
        let res = self.rt.block_on(async {
            let out = inner
                .send(|| {
                    inner
                        .client
                        .get_object()
                        .bucket(&inner.bucket)
                        .key(inner.full_key(key))
                        .set_if_none_match(etag.map(str::to_string))
                        .send()
                })
                .await?;
            let tag = out.e_tag().unwrap_or_default().to_string();
            let body = out.body.collect().await.map(|b| b.into_bytes().to_vec());
            Ok::<_, SdkError<aws_sdk_s3::operation::get_object::GetObjectError, _>>((body, tag))
        });
        match res {
            Ok((Ok(_), tag)) if Some(tag.as_str()) == etag => Ok(super::Fetched::Unchanged),
            Ok((Ok(body), tag)) => Ok(super::Fetched::Changed(body, tag)),
            Ok((Err(e), _)) => Err(Error::Storage {
                target: inner.name.clone(),
                location: inner.location(),
                action: "read",
                key: key.to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 304) => {
                Ok(super::Fetched::Unchanged)
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                Ok(super::Fetched::Absent)
            }
            Err(e) => Err(inner.err("read", key, &e)),
        }
    }

    fn clean_abandoned(
        &self,
        prefix: &str,
        older_than: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize> {
        let mut cleaned = self.abort_recorded(prefix);
        cleaned += self.abort_listed(prefix, older_than)?;
        Ok(cleaned)
    }

    fn target(&self) -> &str {
        &self.inner.name
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        Ok(Box::new(S3Writer {
            inner: self.inner.clone(),
            rt: self.rt.clone(),
            key: key.to_string(),
            buf: Vec::new(),
            upload_id: None,
            next_part: 0,
            in_flight: VecDeque::new(),
            done: Vec::new(),
            finished: false,
        }))
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>> {
        self.open_bytes(key, None)
    }

    fn open_range(&self, key: &str, offset: u64, len: u64) -> Result<Box<dyn Read + Send>> {
        if len == 0 {
            return Ok(Box::new(std::io::empty()));
        }
        self.open_bytes(key, Some(format!("bytes={offset}-{}", offset + len - 1)))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.list_from(prefix, None)
    }

    fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<ObjectMeta>> {
        self.list_from(prefix, Some(after))
    }

    fn hidden(&self, prefix: &str) -> Result<Vec<String>> {
        let inner = &self.inner;
        let full_prefix = inner.full_key(prefix);
        let mut marked = std::collections::BTreeSet::new();
        let mut versioned = std::collections::BTreeSet::new();
        let mut key_marker: Option<String> = None;
        let mut version_marker: Option<String> = None;
        loop {
            let page = match self.rt.block_on(inner.send(|| {
                inner
                    .client
                    .list_object_versions()
                    .bucket(&inner.bucket)
                    .prefix(&full_prefix)
                    .set_key_marker(key_marker.clone())
                    .set_version_id_marker(version_marker.clone())
                    .send()
            })) {
                Ok(page) => page,
                // A store without versions (s3s-fs, some S3-compatible
                // servers) or credentials without s3:ListBucketVersions:
                // nothing can be hidden that dr could see. Said once.
                Err(e) if listing_unavailable(&e) => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        tracing::info!(target = %inner.name, "cannot list object versions here ({}): backups hidden by delete markers are not looked for", e.as_service_error().and_then(|s| s.code()).unwrap_or("refused"));
                    });
                    return Ok(Vec::new());
                }
                Err(e) => return Err(inner.err("list versions of", prefix, &e)),
            };
            for m in page.delete_markers() {
                if m.is_latest().unwrap_or(false)
                    && let Some(rel) = m.key().and_then(|k| inner.relative(k))
                {
                    marked.insert(rel.to_string());
                }
            }
            for v in page.versions() {
                if let Some(rel) = v.key().and_then(|k| inner.relative(k)) {
                    versioned.insert(rel.to_string());
                }
            }
            if !page.is_truncated().unwrap_or(false) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            version_marker = page.next_version_id_marker().map(str::to_string);
            if key_marker.is_none() {
                break;
            }
        }
        Ok(marked.intersection(&versioned).cloned().collect())
    }

    fn delete(&self, key: &str) -> Result<()> {
        let inner = &self.inner;
        let full = inner.full_key(key);
        self.rt
            .block_on(inner.send(|| {
                inner
                    .client
                    .delete_object()
                    .bucket(&inner.bucket)
                    .key(&full)
                    .send()
            }))
            .map_err(|e| inner.err("delete", key, &e))?;
        Ok(())
    }
}
