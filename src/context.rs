//! What one run of dr shares across its work: the configuration, the
//! state directory, every target opened once, and the keys.
//!
//! Built once per command (and once per configuration in the daemon), then
//! passed to every op. Opening a target is not free (an S3 client resolves
//! credentials and builds a connection pool), so each target is opened on
//! first use and kept; all S3 targets share one async runtime, started only
//! when the first one is opened, so a run with local targets only starts no
//! threads for it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use crate::config::{Config, Policy, Target};
use crate::error::{Error, Result};
use crate::keys::{self, Sealing, Unsealing};
use crate::secret::FileStamp;
use crate::state_dir::StateDir;
use crate::storage::{self, Storage};

/// The shared state of one run. Cheap to clone; clones share targets and keys.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Config,
    state: StateDir,
    runtime: OnceLock<Arc<tokio::runtime::Runtime>>,
    stores: Mutex<HashMap<String, Arc<dyn Storage>>>,
    /// How encrypted policies seal, resolved on first use and again when
    /// the key file changes (a passphrase's fingerprint costs a deliberate
    /// scrypt, paid once per key).
    sealing: Mutex<Keys>,
}

/// The sealing in use and the stamp of the file it came from.
#[derive(Default)]
struct Keys {
    loaded: Option<(Option<FileStamp>, Sealing)>,
    /// A changed key file that could not be used, said once.
    refused: Option<Option<FileStamp>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.inner.cfg.file)
            .field("state_dir", &self.inner.state)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(cfg: Config) -> Context {
        let state = StateDir::new(cfg.state_dir.clone());
        crate::audit::set_dir(&cfg.state_dir);
        Context {
            inner: Arc::new(Inner {
                cfg,
                state,
                runtime: OnceLock::new(),
                stores: Mutex::new(HashMap::new()),
                sealing: Mutex::default(),
            }),
        }
    }

    /// A context whose targets are the given stores (unit tests).
    #[cfg(test)]
    pub(crate) fn with_stores(cfg: Config, stores: Vec<Arc<dyn Storage>>) -> Context {
        let ctx = Context::new(cfg);
        if let Ok(mut m) = ctx.inner.stores.lock() {
            for s in stores {
                m.insert(s.target().to_string(), s);
            }
        }
        ctx
    }

    /// Loads the configuration at `path` into a new context.
    pub fn load(path: &Path) -> Result<Context> {
        Ok(Context::new(crate::config::load(path)?))
    }

    pub fn cfg(&self) -> &Config {
        &self.inner.cfg
    }

    pub fn state(&self) -> &StateDir {
        &self.inner.state
    }

    /// The storage of a target, opened on first use and shared after.
    pub fn storage(&self, target: &Target) -> Result<Arc<dyn Storage>> {
        let mut stores = self
            .inner
            .stores
            .lock()
            .map_err(|_| Error::Other("internal: the target registry is poisoned".into()))?;
        if let Some(s) = stores.get(&target.name) {
            return Ok(s.clone());
        }
        let rt = self.runtime()?;
        let s = storage::open(
            &target.name,
            &target.kind,
            &self.inner.state.uploads(&target.name),
            &rt,
        )?;
        stores.insert(target.name.clone(), s.clone());
        Ok(s)
    }

    fn runtime(&self) -> Result<Arc<tokio::runtime::Runtime>> {
        if let Some(rt) = self.inner.runtime.get() {
            return Ok(rt.clone());
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dr-net")
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot start the network client runtime", e))?;
        Ok(self.inner.runtime.get_or_init(|| Arc::new(rt)).clone())
    }

    /// How `policy`'s archives are sealed with the configured keys.
    pub fn sealing(&self, policy: &Policy) -> Result<Sealing> {
        if !policy.encrypted {
            return Ok(Sealing::None);
        }
        self.keys()
    }

    /// The configured keys, whatever a policy says: the audit log is
    /// encrypted to them when any are configured.
    pub fn keys(&self) -> Result<Sealing> {
        let enc = &self.inner.cfg.encryption;
        // The file that holds the keys: a rotation is a change to it, seen
        // by the next backup or WAL segment without a restart.
        let file = enc
            .passphrase_file
            .as_ref()
            .or(enc.recipients_file.as_ref());
        let now = file.and_then(|f| crate::secret::stamp(f));
        let mut keys = self
            .inner
            .sealing
            .lock()
            .map_err(|_| Error::Other("internal: the key cache is poisoned".into()))?;
        if let Some((stamp, s)) = &keys.loaded
            && *stamp == now
        {
            return Ok(s.clone());
        }
        let s = match keys::sealing(enc, true) {
            Ok(s) => s,
            Err(e) => {
                if keys.loaded.is_some() && keys.refused != Some(now) {
                    keys.refused = Some(now);
                    tracing::error!(
                        "the changed key file cannot be used: {e}; running WAL streams keep encrypting to the previous keys, backups fail until it is fixed"
                    );
                }
                return Err(e);
            }
        };
        let fps = s.fingerprints().join(", ");
        let detail = match file {
            Some(f) => format!("encrypting to {fps} (from {})", f.display()),
            None => format!("encrypting to {fps}"),
        };
        // On the record when the keys differ from the last ones recorded
        // on this host, not at every command that loads them (`dr audit`
        // ships the log encrypted, and would add a line each time).
        let seen = self.inner.state.keys_seen();
        if std::fs::read_to_string(&seen).ok().as_deref() != Some(fps.as_str()) {
            crate::audit::record(crate::audit::Entry::new("key_loaded").detail(detail.clone()));
            if let Err(e) = std::fs::write(&seen, &fps) {
                tracing::debug!("cannot write {}: {e}", seen.display());
            }
        }
        if let Some((_, old)) = &keys.loaded
            && old.fingerprints() != s.fingerprints()
        {
            tracing::warn!(
                "the encryption keys changed: {detail}; new backups and WAL segments use them from now on"
            );
        }
        keys.refused = None;
        keys.loaded = Some((now, s.clone()));
        Ok(s)
    }

    /// The identities that open `policy`'s archives: `identity`, else the
    /// configured identity file or passphrase. An encrypted policy with
    /// none is a secret error that says what to pass.
    /// Whether this host is set up to decrypt `policy`'s backups (an
    /// identity or a passphrase file is configured, or nothing is
    /// encrypted). A host without: production keeping the key elsewhere,
    /// where a scheduled verify checks what it can without the key.
    pub fn holds_key(&self, policy: &Policy) -> bool {
        let enc = &self.inner.cfg.encryption;
        !policy.encrypted || enc.identity_file.is_some() || enc.passphrase_file.is_some()
    }

    pub fn unsealing(&self, policy: &Policy, identity: Option<&Path>) -> Result<Option<Unsealing>> {
        let u = keys::unsealing(&self.inner.cfg.encryption, identity)?;
        if u.is_none() && policy.encrypted {
            return Err(Error::Secret {
                path: identity
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| self.inner.cfg.file.clone()),
                reason: format!(
                    "policy '{}' is encrypted: pass --identity FILE (the age identity whose recipient is in [encryption]), or set [encryption] identity_file",
                    policy.name
                ),
            });
        }
        Ok(u)
    }
}
