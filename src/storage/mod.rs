//! The repository storage engine: one directory per repository.
//!
//! Blocking and synchronous; it never imports actix. The server gives one
//! [`Repository`] to exactly one thread (the `StorageActor`); the only thing
//! that leaves that thread is a [`LogSync`] handle used to fsync the commit
//! log from the flushing thread.
//!
//! Files (byte layouts in `docs/STORAGE.md`):
//!
//! ```text
//! DIR/LOCK          exclusive flock: one process per repository
//! DIR/header        primitive attributes, replaced atomically (tmp + rename)
//! DIR/index.map     oid -> (location, version, collection length), mmap
//! DIR/objects.dat   append-only object versions
//! DIR/coll/<oid>.idx, <oid>.dat   large-collection element offsets and data
//! DIR/log/<first>.log             commit-log segments
//! DIR/backup-tmp/<job>/index.map  a snapshot's index copy, while a backup runs
//! ```
//!
//! A backup of a repository is a directory of the same layout plus
//! `MANIFEST` (see [`backup`]); [`compact`] copies a backup keeping only
//! what is reachable from the root anchor.

pub mod backup;
mod commit_log;
pub mod compact;
mod digest;
pub mod error;
mod header;
mod index_copy;
mod index_map;
pub mod object;
mod object_store;
pub mod record;
mod repository;
mod sync;
mod tokens;

pub use commit_log::LogSync;
pub use digest::DigestView;
pub use error::StorageError;
pub use header::{Header, HEADER_FILE};
pub use object::StoredObject;
pub use record::{CommitRecord, Op, Payload};
pub use repository::{
    Anchor, AppendRequest, CommitRequest, Committed, NewRequest, ObjRef, PendingSnapshot,
    PutRequest, RepoInfo, RepoOptions, Repository, Snapshot, SnapshotFile, Unwritten,
};

#[cfg(test)]
mod tests;
