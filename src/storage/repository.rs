//! `Repository`: the storage engine's one entry point.
//! (API section; implementation follows in the same file.)

use std::path::{Path, PathBuf};

use crate::storage::commit_log::LogSync;
use crate::storage::error::Result;
use crate::storage::object::StoredObject;
use crate::types::{CommitNumber, Epoch, Hash, Node, Oid, RepositoryId};

/// A reference inside a commit request: an existing object or one created by
/// the same commit (by its temporary id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjRef {
    Oid(Oid),
    New(u64),
}

/// Rewrite an existing object; rejected with a conflict unless its current
/// version is `expected_version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutRequest {
    pub oid: Oid,
    pub expected_version: u64,
    pub class: String,
    pub value: Vec<u8>,
}

/// Create an object; `temp_id` is how the rest of the commit refers to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRequest {
    pub temp_id: u64,
    pub class: String,
    pub value: Vec<u8>,
}

/// Append one element to a large collection; never conflicts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendRequest {
    pub coll: ObjRef,
    pub value: Vec<u8>,
}

/// Everything one commit asks for. Applied all-or-nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitRequest {
    pub token: Option<Vec<u8>>,
    pub puts: Vec<PutRequest>,
    pub news: Vec<NewRequest>,
    pub appends: Vec<AppendRequest>,
    pub set_root: Option<ObjRef>,
    pub meta: Vec<(String, Option<Vec<u8>>)>,
    /// Server-internal: a node change (never from an application).
    pub set_node: Option<Node>,
    /// Server-internal: the record opens this (newer) epoch.
    pub new_epoch: Option<Epoch>,
}

/// The outcome of a local commit: written to the log (not yet synced) and
/// applied.
#[derive(Clone, Debug)]
pub struct Committed {
    pub number: CommitNumber,
    /// The record body as logged; what is replicated.
    pub body: std::sync::Arc<Vec<u8>>,
    /// temp id -> assigned oid.
    pub new_oids: Vec<(u64, Oid)>,
    /// The element index each append got, in request order.
    pub positions: Vec<u64>,
    /// Handle that makes this record durable.
    pub sync: LogSync,
}

/// The decoded root anchor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub root: Option<Oid>,
    pub repository_id: RepositoryId,
    pub node: Node,
    pub meta: Vec<(String, Vec<u8>)>,
}

/// Primitive facts about an open repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoInfo {
    pub repository_id: RepositoryId,
    /// This copy's own identity (a backup gets a fresh one when it is opened
    /// as a new server).
    pub server_id: u64,
    pub restore_mode: bool,
    pub epoch: Epoch,
    pub last_commit: CommitNumber,
    pub last_hash: Hash,
    pub checkpoint: CommitNumber,
    /// Oldest commit number still readable from the log.
    pub log_start: CommitNumber,
    pub next_oid: Oid,
}

/// One file of a point-in-time snapshot: copy `len` bytes of `path`
/// (a prefix that later commits never change), or the given bytes.
#[derive(Clone, Debug)]
pub struct SnapshotFile {
    /// Path relative to the repository directory.
    pub relative: PathBuf,
    pub source: PathBuf,
    pub len: u64,
}

/// A consistent view of the repository at `commit`.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub commit: CommitNumber,
    pub repository_id: RepositoryId,
    /// The header to write into the copy (restore-mode bit set).
    pub header: Vec<u8>,
    pub files: Vec<SnapshotFile>,
}

/// An open repository. Owned by one thread; see the module doc of `storage`.
pub struct Repository {
    dir: PathBuf,
}

#[allow(unused_variables)]
impl Repository {
    /// Create a new repository in `dir` (must be absent or empty) with an
    /// anchor whose node has this server as its only (primary) member at `addr`.
    pub fn create(dir: &Path, server_id: u64, addr: &str) -> Result<Repository> {
        unimplemented!()
    }
    /// Open an existing repository: lock, read the header, cut a torn log
    /// tail, replay past the checkpoint.
    pub fn open(dir: &Path) -> Result<Repository> {
        unimplemented!()
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn info(&self) -> RepoInfo {
        unimplemented!()
    }
    /// Validate, assign oids/positions, write the record to the log (not
    /// synced) and apply it. Refused in restore mode.
    pub fn commit(&mut self, req: CommitRequest) -> Result<Committed> {
        unimplemented!()
    }
    /// Apply a record received from the primary (body bytes as logged there):
    /// must be number = last + 1, continue the hash chain, epoch not older.
    /// Written to the log (not synced) and applied. Allowed in restore mode.
    pub fn apply_record(&mut self, body: &[u8]) -> Result<CommitNumber> {
        unimplemented!()
    }
    /// A handle to fsync the log up to everything written so far.
    pub fn log_sync(&self) -> LogSync {
        unimplemented!()
    }
    pub fn get(&self, oid: Oid) -> Result<Option<StoredObject>> {
        unimplemented!()
    }
    pub fn collection_range(&self, coll: Oid, start: u64, count: u64) -> Result<Vec<Vec<u8>>> {
        unimplemented!()
    }
    pub fn anchor(&self) -> Result<Anchor> {
        unimplemented!()
    }
    /// Record bodies from `from` on, at most `max_count` records and about
    /// `max_bytes` (at least one record is returned if any exists).
    pub fn read_records(
        &self,
        from: CommitNumber,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Vec<u8>>> {
        unimplemented!()
    }
    /// Commit number of an earlier commit carrying this idempotency token.
    pub fn token_commit(&self, token: &[u8]) -> Option<CommitNumber> {
        unimplemented!()
    }
    pub fn checkpoint(&mut self) -> Result<()> {
        unimplemented!()
    }
    /// Checkpoint if enough log was written since the last one.
    pub fn maybe_checkpoint(&mut self) -> Result<bool> {
        unimplemented!()
    }
    /// (last commit, BLAKE3 over every object reachable from the anchor).
    pub fn digest(&self) -> Result<(CommitNumber, Hash)> {
        unimplemented!()
    }
    /// Checkpoint and capture a consistent view; `scratch` receives a copy of
    /// the index made at that instant.
    pub fn snapshot(&mut self, scratch: &Path) -> Result<Snapshot> {
        unimplemented!()
    }
    pub fn set_restore_mode(&mut self, on: bool) -> Result<()> {
        unimplemented!()
    }
    /// Allow deleting log segments holding only records below `n`.
    pub fn retain_from(&mut self, n: CommitNumber) -> Result<()> {
        unimplemented!()
    }
}
