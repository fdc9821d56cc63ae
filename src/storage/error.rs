//! `StorageError`: every way the storage layer can fail.
//!
//! Expected, per-request errors (conflict, restore mode, sequencing) are kept
//! apart from fatal ones (I/O, corruption) by `is_fatal`, so the server can
//! answer the first kind and stop serving on the second.

use std::path::PathBuf;

use crate::types::{CommitNumber, Epoch, Oid};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A corrupt structure that is not a torn tail: never silently repaired.
    #[error("corrupted repository: {0}")]
    Corrupted(String),
    #[error("corrupt commit record in {file} at offset {offset}: {reason}")]
    CorruptRecord {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("repository {0} is locked by another process")]
    Locked(PathBuf),
    #[error("{0} is not a Magma repository (no Magma header)")]
    NotARepository(PathBuf),
    #[error("{}: repository format version {found} is not supported (this build reads {supported})", .path.display())]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("the repository is in restore mode: it accepts only the primary's commit records")]
    RestoreMode,
    #[error("commit conflict: objects {oids:?} changed since they were read")]
    Conflict { oids: Vec<Oid> },
    #[error("object {0} does not exist")]
    UnknownObject(Oid),
    #[error("object {0} is not a large collection")]
    NotACollection(Oid),
    /// A commit on a compacted repository links (or appends to) an object
    /// that compaction dropped as unreachable: refused, so that no
    /// reference dangles here that resolves on the other servers.
    #[error(
        "object {0} was dropped by compaction (it was unreachable when this copy was \
         compacted), so a commit cannot use it again"
    )]
    DroppedObject(Oid),
    /// An earlier failure (a record logged but not wholly applied, a
    /// checkpoint cut short) left memory, log or index in a state only a
    /// restart sorts out: nothing more is committed, applied, checkpointed
    /// or read until then.
    #[error("the repository stopped after an earlier failure ({0}); restart the server")]
    Stopped(String),
    /// A record from the primary needs an object that compaction dropped
    /// from this copy: the copy can no longer follow the node.
    #[error(
        "commit record {number} uses object {oid}, which compaction dropped from this copy \
         (it was unreachable at the backup's commit and a later commit used it again): this \
         copy cannot follow the node; start this server from a plain backup"
    )]
    DroppedNeeded { number: CommitNumber, oid: Oid },
    #[error("commit record {got} is out of sequence: resend from {expected}")]
    OutOfSequence {
        expected: CommitNumber,
        got: CommitNumber,
    },
    #[error("commit record {number} does not continue this repository's hash chain")]
    ChainMismatch { number: CommitNumber },
    #[error("commit record {number} is from epoch {got}, older than this repository's {current}")]
    StaleEpoch {
        number: CommitNumber,
        got: Epoch,
        current: Epoch,
    },
    #[error("commit {requested} is no longer in the log (oldest retained: {oldest}); start from a new backup")]
    LogTruncated {
        requested: CommitNumber,
        oldest: CommitNumber,
    },
    #[error("commit {requested} is beyond this repository's last commit {last}")]
    BeyondEnd {
        requested: CommitNumber,
        last: CommitNumber,
    },
    /// Records from a primary reached a repository that is not a copy
    /// being kept up to date (a primary takes records from nobody).
    #[error("this repository is not in restore mode: it takes no records from a primary")]
    NotInRestoreMode,
    #[error("invalid request: {0}")]
    Invalid(String),
    /// I/O on a backup copy or a snapshot's scratch file, never on the live
    /// repository: the backup fails, the repository is unharmed.
    #[error("backup I/O error while {context}: {source}")]
    BackupIo {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn backup_io(context: impl Into<String>, source: std::io::Error) -> Self {
        StorageError::BackupIo {
            context: context.into(),
            source,
        }
    }

    /// Errors after which the repository must stop serving: its files may
    /// no longer match what was acknowledged.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            StorageError::Io { .. }
                | StorageError::Corrupted(_)
                | StorageError::CorruptRecord { .. }
                | StorageError::DroppedNeeded { .. }
                | StorageError::Stopped(_)
        )
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
