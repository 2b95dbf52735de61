//! The use cases. The CLI and the daemon call these and nothing else.

pub mod archive_fence;
pub mod audit_log;
pub mod backup;
pub mod bell;
pub mod copy;
pub mod expire;
pub mod fanout;
pub mod follow;
pub mod follow_fleet;
pub mod frame_sample;
pub mod hooks;
pub mod info;
pub mod keys;
pub mod listing;
pub mod members;
pub mod pg;
pub mod policy_repo;
pub mod promotion;
pub mod proof;
pub mod replicate;
pub mod report;
pub mod restore;
pub mod rotation;
pub mod runs;
pub mod source;
pub mod stored_check;
pub mod validate;
pub mod verdict;
pub mod verify;

pub use crate::units::human_bytes;
pub use fanout::TargetFilter;
pub use members::Scope;
pub use policy_repo::{Committed, PolicyRepo, wal_base};
pub use source::{BackupOptions, Source};
