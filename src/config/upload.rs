//! An S3 target's upload settings: `storage_class`, `wal_storage_class`,
//! `sse`, `kms_key_id` and `max_upload_rate` (see `storage::s3::Upload`).

use toml::Spanned;

use super::{FileDiags, RawTarget, parse_size};
use crate::storage::s3::{Sse, UNREADABLE_CLASSES, Upload};

/// The smallest `max_upload_rate`: below it a 16 MiB segment takes minutes.
const MIN_RATE: u64 = 64 << 10;

/// The upload settings of S3 target `name`, each problem a diagnostic.
pub(super) fn resolve(name: &str, raw: &RawTarget, d: &mut FileDiags<'_>) -> Upload {
    let mut class = |field: &str, v: &Option<Spanned<String>>| -> Option<String> {
        let v = v.as_ref()?;
        let c = v.get_ref().trim();
        if c.is_empty()
            || !c
                .chars()
                .all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit() || ch == '_')
        {
            d.at(v.span(), format!("targets.{name}.{field} = \"{c}\" is not a storage class: write it as S3 does, e.g. \"STANDARD_IA\", \"ONEZONE_IA\", \"INTELLIGENT_TIERING\", \"GLACIER_IR\""));
            return None;
        }
        if UNREADABLE_CLASSES.contains(&c) {
            d.at(v.span(), format!("targets.{name}.{field} = \"{c}\": objects in {c} cannot be read without a restore request first, so every restore, drill and listing of a manifest would fail; use \"GLACIER_IR\" (instant retrieval) or a bucket lifecycle rule for copies you never read"));
            return None;
        }
        Some(c.to_string())
    };
    let storage_class = class("storage_class", &raw.storage_class);
    let wal_storage_class = class("wal_storage_class", &raw.wal_storage_class);
    let sse = match raw.sse.as_ref().map(|s| (s, s.get_ref().as_str())) {
        None => None,
        Some((_, "AES256")) => Some(Sse::S3),
        Some((_, "aws:kms")) => Some(Sse::Kms {
            key_id: raw.kms_key_id.as_ref().map(|k| k.get_ref().clone()),
        }),
        Some((s, other)) => {
            d.at(s.span(), format!("targets.{name}.sse = \"{other}\": use \"AES256\" (keys the provider manages) or \"aws:kms\" (with kms_key_id, or the account's default key)"));
            None
        }
    };
    if let Some(k) = &raw.kms_key_id
        && raw.sse.as_ref().is_none_or(|s| s.get_ref() != "aws:kms")
    {
        d.at(
            k.span(),
            format!("targets.{name}.kms_key_id needs sse = \"aws:kms\" beside it"),
        );
    }
    let max_upload_rate = raw.max_upload_rate.as_ref().and_then(|r| {
        let text = r.get_ref().trim();
        let per_second = text.strip_suffix("/s").unwrap_or(text);
        match parse_size(per_second) {
            Some(n) if n >= MIN_RATE => Some(n),
            _ => {
                d.at(r.span(), format!("targets.{name}.max_upload_rate = \"{text}\": write bytes a second, at least 64KiB, e.g. \"10MiB\" or \"2MB/s\""));
                None
            }
        }
    });
    Upload {
        storage_class,
        wal_storage_class,
        sse,
        max_upload_rate,
    }
}

/// What pgBackRest (2.45) cannot do of `u`, named as the setting, if anything.
pub(super) fn pgbackrest_lacks(u: &Upload) -> Option<&'static str> {
    if u.storage_class.is_some() || u.wal_storage_class.is_some() {
        Some("storage class setting (storage_class, wal_storage_class)")
    } else if u.max_upload_rate.is_some() {
        Some("upload rate limit (max_upload_rate)")
    } else if u.sse == Some(Sse::S3) {
        Some("SSE-S3 setting (sse = \"AES256\"; set the bucket's default encryption instead)")
    } else if u.sse == Some(Sse::Kms { key_id: None }) {
        Some("SSE-KMS without a key (sse = \"aws:kms\" needs kms_key_id for pgBackRest)")
    } else {
        None
    }
}
