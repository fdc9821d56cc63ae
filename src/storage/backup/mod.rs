//! Backups on disk: how a snapshot becomes a directory that a server can be
//! started on, and how anyone can tell whether such a directory is complete.
//!
//! Blocking and synchronous, like the rest of `storage`; it never imports
//! actix. Three users share it: the server's `BackupActor` (local backups,
//! one [`SnapshotCopy::step`] per chunk), the `magma backup --pull` client
//! (writes what it receives through [`Receiver`], then [`seal`]s), and the
//! offline `magma verify-backup` ([`verify`]).
//!
//! A backup directory (byte layouts in `docs/STORAGE.md`, "Backups"):
//!
//! ```text
//! TARGET/BACKUP-INCOMPLETE   present from the first byte until sealing; says why
//!                            a copy that stopped is unusable
//! TARGET/objects.dat, index.map, coll/*.idx, coll/*.dat   the snapshot's files
//! TARGET/log/                empty: the log continues at snapshot commit + 1
//! TARGET/header              restore-mode bit set, server id 0; written after
//!                            every data file
//! TARGET/MANIFEST            JSON: every file with size and BLAKE3; written
//!                            LAST (tmp + fsync + rename), so only a complete
//!                            backup has one
//! ```
//!
//! This module must never write into a live repository directory other than
//! its `backup-tmp/` scratch area, and never leave a target that looks
//! complete when it is not: the manifest is the one proof of completeness.

mod copy;
mod manifest;
mod receive;
mod target;
mod transfer;
mod verify;
mod writeback;

pub use copy::{SnapshotCopy, Step};
pub use manifest::{
    read_marker, seal, write_marker, Manifest, ManifestFile, INCOMPLETE_FILE, MANIFEST_FILE,
    MANIFEST_FORMAT, MANIFEST_VERSION,
};
pub use receive::{safe_relative_path, Receiver};
pub use target::{clear_scratch, prepare_target, remove_scratch, TargetRefusal, SCRATCH_DIR};
pub use verify::{describe_problems, verify, Problem, Verified};

pub(crate) use copy::incomplete_text;
pub(crate) use verify::hash_file;

/// Largest piece read or written at once (a copy step may do several).
pub(crate) const IO_PIECE: usize = 1024 * 1024;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
