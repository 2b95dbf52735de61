//! dr: backup and disaster recovery for SQLite and PostgreSQL.
//!
//! The crate is a library so the CLI and the daemon share one implementation
//! of every operation (`ops`); `main.rs` only parses arguments and maps
//! errors to exit codes. See DESIGN.md in the shared folder and
//! docs/repository-format.md for the on-storage contract.

pub mod cli;
pub mod codec;
pub mod config;
pub mod context;
pub mod daemon;
pub mod demo;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod history;
pub mod keys;
pub mod lease;
pub mod lock;
pub mod ops;
pub mod pg;
pub mod progress;
pub mod repo;
pub mod schedule;
pub mod scratch;
pub mod secret;
pub mod sqlite;
pub mod state_dir;
pub mod storage;
pub mod units;

pub use error::{Error, Result};
