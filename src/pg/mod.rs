//! PostgreSQL through pgBackRest: the configuration dr writes and what it
//! reads back from pgBackRest. pgBackRest owns its repository under
//! `<target>/<policy>/pgbackrest`; dr drives it and shows its backups.
//!
//! This is the pure part (rendering and parsing); running pgBackRest as
//! the cluster's OS user comes with the commands that use it.

pub mod archiver;
pub mod conf;
pub mod info;
pub mod psql;
pub mod run;
