//! Multipart uploads a run started and never finished: recorded in a
//! journal under `state_dir` as they open, and listed from the store for
//! the ones no journal knows (a run killed between the store opening the
//! upload and dr recording it, or a lost host). Parts of an abandoned
//! upload are billed until it is aborted, and no listing of objects shows
//! them.

use std::path::{Path, PathBuf};

use aws_sdk_s3::error::ProvideErrorMetadata;
use chrono::{DateTime, Utc};

use super::{S3Storage, listing_unavailable};
use crate::error::Result;

fn journal_file(dir: &Path, key: &str, upload_id: &str) -> PathBuf {
    let h = <sha2::Sha256 as sha2::Digest>::digest(format!("{key}\n{upload_id}").as_bytes());
    dir.join(format!("{}.upload", hex::encode(&h[..16])))
}

pub(super) fn journal_add(dir: &Path, key: &str, upload_id: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        journal_file(dir, key, upload_id),
        format!("{key}\n{upload_id}\n"),
    )
}

pub(super) fn journal_remove(dir: &Path, key: &str, upload_id: &str) {
    let _ = std::fs::remove_file(journal_file(dir, key, upload_id));
}

impl S3Storage {
    /// Aborts the uploads this host's journal holds under `prefix`.
    pub(super) fn abort_recorded(&self, prefix: &str) -> usize {
        let inner = &self.inner;
        let Ok(entries) = std::fs::read_dir(&inner.journal) else {
            return 0;
        };
        let mut cleaned = 0;
        for e in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let mut lines = text.lines();
            let (Some(key), Some(id)) = (lines.next(), lines.next()) else {
                continue;
            };
            if !key.starts_with(prefix) {
                continue;
            }
            let res = self.rt.block_on(inner.abort_upload(key, id));
            match res {
                Ok(_) => {}
                Err(err)
                    if err
                        .as_service_error()
                        .is_some_and(|s| s.is_no_such_upload()) => {}
                // A run killed between completing an upload and forgetting
                // it leaves a record of an upload some stores then refuse
                // to abort (AccessDenied rather than NoSuchUpload). Nothing
                // committed depends on it: say so, keep the record for the
                // next expire, and go on.
                Err(err) => {
                    let e = inner.err("abort the abandoned upload of", key, &err);
                    tracing::warn!(target = %inner.name, "{e} (tried again at the next expire; a lifecycle rule AbortIncompleteMultipartUpload cleans such uploads on the store's side)");
                    continue;
                }
            }
            let _ = std::fs::remove_file(e.path());
            tracing::info!(target = %inner.name, "aborted the abandoned multipart upload of {key}");
            cleaned += 1;
        }
        cleaned
    }

    /// Aborts the uploads the store lists under `prefix` that were
    /// started before `older_than`. A store that cannot list them
    /// (s3s-fs; credentials without s3:ListBucketMultipartUploads) is said
    /// once: a lifecycle rule is then the only cleaner.
    pub(super) fn abort_listed(&self, prefix: &str, older_than: DateTime<Utc>) -> Result<usize> {
        let inner = &self.inner;
        let full_prefix = inner.full_key(prefix);
        let mut stale = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let page = match self.rt.block_on(inner.send(|| {
                inner
                    .client
                    .list_multipart_uploads()
                    .bucket(&inner.bucket)
                    .prefix(&full_prefix)
                    .set_key_marker(key_marker.clone())
                    .set_upload_id_marker(id_marker.clone())
                    .send()
            })) {
                Ok(page) => page,
                Err(e) if listing_unavailable(&e) => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        tracing::debug!(target = %inner.name, "cannot list multipart uploads here ({}): uploads a killed run left before recording them are not looked for; a lifecycle rule AbortIncompleteMultipartUpload cleans them on the store's side", e.as_service_error().and_then(|s| s.code()).unwrap_or("refused"));
                    });
                    return Ok(0);
                }
                Err(e) => return Err(inner.err("list multipart uploads under", prefix, &e)),
            };
            for u in page.uploads() {
                let started = u
                    .initiated()
                    .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), 0));
                if let (Some(key), Some(id), Some(started)) = (
                    u.key().and_then(|k| inner.relative(k)),
                    u.upload_id(),
                    started,
                ) && started < older_than
                {
                    stale.push((key.to_string(), id.to_string()));
                }
            }
            if !page.is_truncated().unwrap_or(false) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() {
                break;
            }
        }
        let mut cleaned = 0;
        for (key, id) in stale {
            match self.rt.block_on(inner.abort_upload(&key, &id)) {
                Ok(_) => {
                    tracing::info!(target = %inner.name, "aborted the abandoned multipart upload of {key} (started before {older_than})");
                    cleaned += 1;
                }
                Err(err)
                    if err
                        .as_service_error()
                        .is_some_and(|s| s.is_no_such_upload()) => {}
                Err(err) => {
                    let e = inner.err("abort the abandoned upload of", &key, &err);
                    tracing::warn!(target = %inner.name, "{e} (tried again at the next expire)");
                }
            }
        }
        Ok(cleaned)
    }
}
