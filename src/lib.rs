//! dr: backup and disaster recovery for SQLite and PostgreSQL.
//!
//! The crate is a library so the CLI and the daemon share one implementation
//! of every operation (`ops`); `main.rs` only parses arguments and maps
//! errors to exit codes. See DESIGN.md in the shared folder and
//! docs/repository-format.md for the on-storage contract.

pub mod audit;
pub mod cli;
pub(crate) mod codec;
pub(crate) mod config;
pub(crate) mod context;
pub(crate) mod daemon;
pub(crate) mod demo;
pub(crate) mod error;
pub(crate) mod fleet;
#[doc(hidden)]
pub mod fuzz;
pub(crate) mod history;
pub(crate) mod init;
pub(crate) mod keys;
pub(crate) mod lease;
pub(crate) mod lock;
pub(crate) mod notify;
pub(crate) mod ops;
pub(crate) mod pg;
pub(crate) mod progress;
pub(crate) mod repo;
pub(crate) mod schedule;
pub(crate) mod scratch;
pub(crate) mod secret;
pub mod sqlite;
pub(crate) mod state_dir;
pub(crate) mod storage;
pub(crate) mod tls_expiry;
pub(crate) mod units;

pub use error::{Error, Result};
