//! age keys: generating identities, reading recipients and identities.
//!
//! Backup hosts hold only recipients (public keys); restores take an
//! identity file. Identity files are the standard format that `age-keygen`
//! writes, so a user's existing keys work and dr's keys work with `age -d`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};
use sha2::Digest;

use crate::error::{Error, Result, io_reason};

/// How archives are encrypted and, at restore, decrypted: the
/// `[encryption]` section, which keys own so they need not know the config.
#[derive(Debug, Clone, Default)]
pub struct KeySettings {
    /// age X25519 recipients, inline or from `recipients_file`, in order.
    pub recipients: Vec<String>,
    pub recipients_file: Option<PathBuf>,
    /// scrypt passphrase file (mode 0600), instead of recipients.
    pub passphrase_file: Option<PathBuf>,
    /// Default identity for restores and for reading page indexes on a new host.
    pub identity_file: Option<PathBuf>,
}

/// How a policy's archives are encrypted.
#[derive(Clone)]
pub enum Sealing {
    /// age X25519 recipients: the backup host cannot decrypt.
    Recipients(Vec<age::x25519::Recipient>),
    /// scrypt passphrase: the same secret encrypts and decrypts. The string
    /// is its fingerprint (see [`passphrase_fingerprint`]); the recipient
    /// is the one derived from it for objects written often
    /// ([`Sealing::frequent`]).
    Passphrase(SecretString, String, age::x25519::Recipient),
    /// `encryption = "none"`: compressed and hashed, not encrypted.
    None,
}

impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sealing::Recipients(r) => write!(f, "Recipients({})", r.len()),
            Sealing::Passphrase(..) => f.write_str("Passphrase(..)"),
            Sealing::None => f.write_str("None"),
        }
    }
}

impl Sealing {
    /// Short stable fingerprints of the recipients (or of the passphrase),
    /// recorded in manifests so dr can tell whether a diff's full was sealed
    /// for the same keys, and a user which key a backup needs, without
    /// decrypting anything. Sorted: the order of recipients does not matter.
    pub fn fingerprints(&self) -> Vec<String> {
        let mut out: Vec<String> = match self {
            Sealing::Recipients(rs) => rs.iter().map(|r| fingerprint(&r.to_string())).collect(),
            Sealing::Passphrase(_, fp, _) => vec![fp.clone()],
            Sealing::None => vec![],
        };
        out.sort();
        out.dedup();
        out
    }

    /// How objects written many times a minute are sealed: WAL segments
    /// and audit shipments. age's passphrase stanza costs about a second
    /// of scrypt per object, to write and again to read, which a stream
    /// sealing a segment a second cannot pay; under a passphrase they are
    /// sealed to the recipient derived from it ([`passphrase_identity`]),
    /// which costs one scrypt per process instead.
    pub fn frequent(&self) -> Sealing {
        match self {
            Sealing::Passphrase(_, _, derived) => Sealing::Recipients(vec![derived.clone()]),
            other => other.clone(),
        }
    }
}

/// What can open archives at restore time.
pub struct Unsealing {
    pub identities: Vec<Box<dyn age::Identity + Send + Sync>>,
    /// Where the identities came from, for messages.
    pub source: String,
}

impl std::fmt::Debug for Unsealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Unsealing({} identities from {})",
            self.identities.len(),
            self.source
        )
    }
}

/// A short fingerprint of a recipient string.
pub fn fingerprint(recipient: &str) -> String {
    let h = sha2::Sha256::digest(recipient.as_bytes());
    hex::encode(&h[..8])
}

/// Shortest passphrase dr seals backups with: anyone holding a copy of the
/// repository can guess passphrases offline, at scrypt's pace.
pub const MIN_PASSPHRASE_CHARS: usize = 12;

/// A fingerprint of a passphrase that does not give it away: the first
/// 8 bytes of scrypt (log2 N = 15) under a fixed dr-specific salt, as
/// `scrypt:<hex>`. Guessing a passphrase from it costs the same scrypt work
/// per guess as guessing it from any age header the repository already holds.
pub fn passphrase_fingerprint(pass: &SecretString) -> Result<String> {
    let out = passphrase_scrypt(pass, b"dr passphrase fingerprint v1")?;
    Ok(format!("scrypt:{}", hex::encode(&out[..8])))
}

/// 32 bytes of scrypt (log2 N = 15, r = 8, p = 1) of the passphrase under
/// `salt`: what the fingerprint and the derived identity are made of, so a
/// guess costs the same against either.
fn passphrase_scrypt(pass: &SecretString, salt: &[u8]) -> Result<[u8; 32]> {
    let params = scrypt::Params::new(15, 8, 1, 32)
        .map_err(|e| Error::Other(format!("internal: scrypt parameters: {e}")))?;
    let mut out = [0u8; 32];
    scrypt::scrypt(pass.expose_secret().as_bytes(), salt, &params, &mut out)
        .map_err(|e| Error::Other(format!("internal: scrypt: {e}")))?;
    Ok(out)
}

/// The X25519 identity derived from a passphrase: scrypt (log2 N = 15,
/// r = 8, p = 1) under the fixed salt `dr passphrase key v1`, 32 bytes, as
/// an age secret key. It costs a guesser what the fingerprint manifests
/// already show costs ([`passphrase_fingerprint`]), so it weakens nothing;
/// any age tool opens the objects sealed to it given this identity
/// (docs/repository-format.md says how to compute it).
pub fn passphrase_identity(pass: &SecretString) -> Result<age::x25519::Identity> {
    let mut key = passphrase_scrypt(pass, b"dr passphrase key v1")?;
    let hrp = bech32::Hrp::parse("age-secret-key-")
        .map_err(|e| Error::Other(format!("internal: bech32: {e}")))?;
    let encoded = bech32::encode::<bech32::Bech32>(hrp, &key)
        .map_err(|e| Error::Other(format!("internal: bech32: {e}")))?;
    key.fill(0);
    let encoded = SecretString::from(encoded.to_uppercase());
    age::x25519::Identity::from_str(encoded.expose_secret())
        .map_err(|e| Error::Other(format!("internal: derived identity: {e}")))
}

/// Refuses passphrases too weak to protect a repository copy.
fn check_passphrase(path: &Path, pass: &SecretString) -> Result<()> {
    let chars = pass.expose_secret().trim().chars().count();
    if chars < MIN_PASSPHRASE_CHARS {
        return Err(Error::Secret {
            path: path.to_path_buf(),
            reason: format!(
                "the passphrase has {chars} characters (not counting surrounding white space): use at least {MIN_PASSPHRASE_CHARS}, e.g. `openssl rand -base64 32 > {}` (existing backups stay readable with the old one)",
                path.display()
            ),
        });
    }
    Ok(())
}

/// Parses one `age1...` recipient.
pub fn parse_recipient(s: &str) -> std::result::Result<age::x25519::Recipient, String> {
    age::x25519::Recipient::from_str(s.trim()).map_err(|e| {
        format!(
            "'{}' is not an age X25519 recipient (age1...): {e}",
            s.trim()
        )
    })
}

/// Resolves how to encrypt, from the [encryption] section.
pub fn sealing(enc: &KeySettings, encrypted: bool) -> Result<Sealing> {
    if !encrypted {
        return Ok(Sealing::None);
    }
    if let Some(p) = &enc.passphrase_file {
        let pass = crate::secret::read_secret(p)?;
        check_passphrase(p, &pass)?;
        let fp = passphrase_fingerprint(&pass)?;
        let derived = passphrase_identity(&pass)?.to_public();
        return Ok(Sealing::Passphrase(pass, fp, derived));
    }
    let mut out = Vec::new();
    for r in &enc.recipients {
        out.push(parse_recipient(r).map_err(Error::Other)?);
    }
    if let Some(file) = &enc.recipients_file {
        let text = std::fs::read_to_string(file).map_err(|e| Error::Secret {
            path: file.clone(),
            reason: format!(
                "cannot read the recipients file: {} (create it with `dr keygen --output KEY > {}`)",
                io_reason(&e),
                file.display()
            ),
        })?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(parse_recipient(line).map_err(|e| Error::Secret {
                path: file.clone(),
                reason: format!("line {}: {e}", i + 1),
            })?);
        }
    }
    if out.is_empty() {
        return Err(match &enc.recipients_file {
            Some(file) => Error::Secret {
                path: file.clone(),
                reason: "the recipients file holds no recipient: put one age1... line in it (`dr keygen --output KEY` prints one)".into(),
            },
            None => Error::Other(
                "no age recipients configured: set [encryption] recipients_file or recipients"
                    .into(),
            ),
        });
    }
    Ok(Sealing::Recipients(out))
}

/// Loads identities for decryption: an explicit identity file first, then
/// the config's identity_file, then the passphrase. `None` when nothing is
/// available (the caller says what to pass).
pub fn unsealing(enc: &KeySettings, identity: Option<&Path>) -> Result<Option<Unsealing>> {
    if let Some(path) = identity.or(enc.identity_file.as_deref()) {
        return Ok(Some(read_identity_file(path)?));
    }
    if let Some(p) = &enc.passphrase_file {
        let pass = crate::secret::read_secret(p)?;
        let derived = passphrase_identity(&pass)?;
        return Ok(Some(Unsealing {
            identities: vec![
                Box::new(age::scrypt::Identity::new(pass)),
                Box::new(derived),
            ],
            source: p.display().to_string(),
        }));
    }
    Ok(None)
}

/// Reads an age identity file (as written by `age-keygen` or `dr keygen`).
pub fn read_identity_file(path: &Path) -> Result<Unsealing> {
    let text = crate::secret::read_private_text(path)?;
    let file = age::IdentityFile::from_buffer(text.as_bytes()).map_err(|e| Error::Secret {
        path: path.to_path_buf(),
        reason: format!("not an age identity file: {e}"),
    })?;
    let identities = file.into_identities().map_err(|e| Error::Secret {
        path: path.to_path_buf(),
        reason: format!("cannot use the identities in this file: {e}"),
    })?;
    if identities.is_empty() {
        return Err(Error::Secret {
            path: path.to_path_buf(),
            reason: "contains no AGE-SECRET-KEY line".into(),
        });
    }
    Ok(Unsealing {
        identities,
        source: path.display().to_string(),
    })
}

/// The recipient fingerprints of the X25519 identities in an identity
/// file: what manifests record, so `dr keys status` can say what the file
/// still opens.
pub fn identity_fingerprints(path: &Path) -> Result<Vec<String>> {
    use std::str::FromStr;
    let text = crate::secret::read_private_text(path)?;
    let fps: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("AGE-SECRET-KEY-"))
        .filter_map(|l| age::x25519::Identity::from_str(l).ok())
        .map(|i| fingerprint(&i.to_public().to_string()))
        .collect();
    if fps.is_empty() {
        return Err(Error::Secret {
            path: path.to_path_buf(),
            reason: "contains no AGE-SECRET-KEY line".into(),
        });
    }
    Ok(fps)
}

/// Writes a new X25519 identity to `path` (mode 0600, never overwriting) and returns its recipient.
pub fn keygen(path: &Path) -> Result<String> {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            Error::io(
                format!(
                    "cannot create {}{}",
                    path.display(),
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        " (it exists; dr never overwrites a key: choose another path)".to_string()
                    } else {
                        String::new()
                    }
                ),
                e,
            )
        })?;
    let body = format!(
        "# created: {}\n# public key: {}\n{}\n",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        recipient,
        identity.to_string().expose_secret()
    );
    f.write_all(body.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
    Ok(recipient)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keygen_writes_private_standard_identity() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("k");
        let r = keygen(&p).expect("keygen");
        assert!(r.starts_with("age1"));
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let u = read_identity_file(&p).expect("readable identity");
        assert_eq!(u.identities.len(), 1);
        assert!(keygen(&p).is_err(), "never overwrites");
    }

    /// The derivation is part of the repository format: a fixed input
    /// gives a fixed key, and what is sealed to it opens with it.
    #[test]
    fn the_derived_passphrase_identity_is_stable_and_opens_what_frequent_sealing_writes() {
        let pass = SecretString::from("correct horse battery".to_string());
        let a = passphrase_identity(&pass).expect("derive");
        // Computed independently, with Python's hashlib.scrypt and a Bech32
        // encoder, as docs/repository-format.md describes.
        assert_eq!(
            a.to_string().expose_secret(),
            "AGE-SECRET-KEY-1XWZ032H0R25WALY53AGZ3DMPJL8TZ3UZUDYLYRZH49QVDT68QT6QQPG6W0"
        );
        let other = passphrase_identity(&SecretString::from("correct horse battery!".to_string()))
            .expect("derive");
        assert_ne!(a.to_public().to_string(), other.to_public().to_string());
        let fp = passphrase_fingerprint(&pass).expect("fp");
        let sealing = Sealing::Passphrase(pass, fp.clone(), a.to_public());
        // The fingerprint users see stays the passphrase's.
        assert_eq!(sealing.fingerprints(), vec![fp]);
        let Sealing::Recipients(rs) = sealing.frequent() else {
            panic!("a passphrase seals frequent objects to its derived recipient");
        };
        let enc = age::Encryptor::with_recipients(rs.iter().map(|r| r as &dyn age::Recipient))
            .expect("encryptor");
        let mut sealed = Vec::new();
        let mut w = enc.wrap_output(&mut sealed).expect("wrap");
        std::io::Write::write_all(&mut w, b"segment").expect("write");
        w.finish().expect("finish");
        let dec = age::Decryptor::new(&sealed[..]).expect("header");
        let mut plain = Vec::new();
        std::io::Read::read_to_end(
            &mut dec
                .decrypt(std::iter::once(&a as &dyn age::Identity))
                .expect("the derived identity opens it"),
            &mut plain,
        )
        .expect("read");
        assert_eq!(plain, b"segment");
    }

    #[test]
    fn passphrase_fingerprints_tell_secrets_apart() {
        let a = passphrase_fingerprint(&SecretString::from("correct horse battery".to_string()))
            .expect("fp");
        let b = passphrase_fingerprint(&SecretString::from("correct horse battery!".to_string()))
            .expect("fp");
        assert!(a.starts_with("scrypt:") && a != b, "{a} {b}");
        let again =
            passphrase_fingerprint(&SecretString::from("correct horse battery".to_string()))
                .expect("fp");
        assert_eq!(a, again);
        let p = Path::new("pass");
        assert!(check_passphrase(p, &SecretString::from("x".to_string())).is_err());
        assert!(check_passphrase(p, &SecretString::from("            \t".to_string())).is_err());
        assert!(check_passphrase(p, &SecretString::from("correct horse".to_string())).is_ok());
    }
}
