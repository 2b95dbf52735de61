//! `dr init`: a working configuration for one SQLite database in one
//! command, the way `restic init` starts: dr.toml, a policy, an age key and
//! its recipients file. Nothing that exists is overwritten.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What `dr init` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Initialized {
    pub config: PathBuf,
    pub policy: PathBuf,
    pub identity: PathBuf,
    pub recipients: PathBuf,
    pub recipient: String,
}

/// Writes the configuration in `dir` for the SQLite database `db`, backed up
/// to the local directory `target`, as policy `name`.
pub fn init(dir: &Path, db: &Path, target: &Path, name: &str) -> Result<Initialized> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        || name.starts_with('.')
    {
        return Err(Error::Refused(format!(
            "'{name}' cannot name a policy: use letters, digits, '-', '_' and '.'"
        )));
    }
    match std::fs::metadata(db) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            return Err(Error::Refused(format!(
                "{} is not a database file",
                db.display()
            )));
        }
        Err(e) => {
            return Err(Error::NotFound(format!(
                "the database {}: {} (give the path of an existing SQLite database)",
                db.display(),
                crate::error::io_reason(&e)
            )));
        }
    }
    let config = dir.join("dr.toml");
    let policies = dir.join("policies");
    let policy = policies.join(format!("{name}.toml"));
    let identity = dir.join("backup.key");
    let recipients = dir.join("backup.pub");
    for p in [&config, &policy, &identity, &recipients] {
        if std::fs::symlink_metadata(p).is_ok() {
            return Err(Error::Refused(format!(
                "{} exists: dr init writes a new configuration and never overwrites one (remove it, or pick another directory)",
                p.display()
            )));
        }
    }
    std::fs::create_dir_all(&policies)
        .map_err(|e| Error::io(format!("cannot create {}", policies.display()), e))?;
    let recipient = crate::keys::keygen(&identity)?;
    write_new(&recipients, &format!("{recipient}\n"))?;
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    write_new(
        &config,
        &format!(
            "# Written by `dr init`. Every key: README.md, \"Configuration\".\n\
             state_dir = \"state\"          # locks, caches, run history (relative: to this file)\n\
             policies = \"policies\"\n\
             \n\
             [encryption]\n\
             recipients_file = \"backup.pub\"   # public key: this host can encrypt, not decrypt\n\
             # identity_file = \"backup.key\"   # decrypts: keep it off this host; restores and restore drills\n\
             #   run where it is (README \"Drills where the key lives\"); verify here checks without it\n\
             \n\
             [targets.local]\n\
             kind = \"local\"\n\
             path = \"{}\"\n",
            abs(target).display()
        ),
    )?;
    write_new(
        &policy,
        &format!(
            "name = \"{name}\"\n\
             targets = [\"local\"]\n\
             \n\
             [source]\n\
             kind = \"sqlite\"\n\
             path = \"{}\"\n\
             \n\
             [schedule]              # for `dr daemon`\n\
             full = \"0 3 * * 0\"      # Sundays 03:00 UTC\n\
             diff = \"0 */6 * * *\"\n\
             verify = \"0 4 * * *\"\n\
             \n\
             [retention]\n\
             full = 2\n\
             diff = 7\n\
             \n\
             # [wal]                 # continuous WAL streaming, point-in-time restore\n\
             # enabled = true\n\
             \n\
             # On a standby host only (its copy of this file): the daemon keeps a\n\
             # copy seconds behind instead of backing up; `dr promote` fails over.\n\
             # [follow]\n\
             # max_lag = \"1m\"\n",
            abs(db).display()
        ),
    )?;
    Ok(Initialized {
        config,
        policy,
        identity,
        recipients,
        recipient,
    })
}

fn write_new(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}
