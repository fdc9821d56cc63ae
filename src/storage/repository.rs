//! `Repository`: the storage engine's one entry point.
//!
//! Owns every file of one repository directory and the in-memory state
//! derived from them: the overlay of index entries written since the last
//! checkpoint, the anchor cache and the recent idempotency tokens. A commit
//! is validated here, numbered, appended to the log (written, not synced:
//! the caller makes it durable through `LogSync`) and applied. This file
//! must never sync on the commit path and never expose file handles other
//! than `LogSync`.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmpv::Value;

use crate::storage::commit_log::{CommitLog, LogSync, Start, DEFAULT_SEGMENT_BYTES, LOG_DIR};
use crate::storage::digest::{digest_graph, DigestView, GraphSource, PAGE_BYTES, PAGE_ELEMENTS};
use crate::storage::error::{Result, StorageError};
use crate::storage::header::{Header, HEADER_FILE};
use crate::storage::index_copy::{IndexCopy, Pin, PIN_PATIENCE};
use crate::storage::index_map::{IndexEntry, IndexMap, FLAG_COLLECTION, INDEX_FILE};
use crate::storage::object::{
    checked_value, decode_value, encode_value, ref_value, references_in, StoredObject,
    ANCHOR_CLASS, COLLECTION_CLASS, REF_EXT,
};
use crate::storage::object_store::{
    dat_path, idx_path, Collections, ObjectFile, COLL_DIR, MAX_CLASS_LEN, OBJECTS_FILE,
};
use crate::storage::record::{CommitRecord, Op, Payload, RecordHead, GENESIS_HASH};
use crate::storage::tokens::TokenTable;
use crate::types::{
    CommitNumber, Epoch, Hash, Member, MemberRole, Node, Oid, RepositoryId, ROOT_ANCHOR,
};

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

/// A commit applied and buffered for the log but not yet written: see
/// [`Repository::commit_unwritten`].
#[derive(Clone, Debug)]
pub struct Unwritten {
    pub number: CommitNumber,
    pub body: std::sync::Arc<Vec<u8>>,
    pub new_oids: Vec<(u64, Oid)>,
    pub positions: Vec<u64>,
}

impl Unwritten {
    /// The commit, once the log holding it was written; `sync` must cover
    /// it.
    pub fn written(self, sync: LogSync) -> Committed {
        debug_assert!(sync.upto() >= self.number);
        Committed {
            number: self.number,
            body: self.body,
            new_oids: self.new_oids,
            positions: self.positions,
            sync,
        }
    }
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

/// A [`Snapshot`] whose copy of the index is still to be made
/// ([`Repository::snapshot_deferred`]).
#[derive(Debug)]
pub struct PendingSnapshot {
    snapshot: Snapshot,
    index: IndexCopy,
    index_dest: PathBuf,
}

impl PendingSnapshot {
    /// The commit the snapshot shows.
    pub fn commit(&self) -> CommitNumber {
        self.snapshot.commit
    }

    /// Copy the index into the snapshot's scratch directory (blocking; any
    /// thread but the storage thread) and release the pin. Dropped
    /// instead, the pin is released and the snapshot is not made.
    pub fn complete(self) -> Result<Snapshot> {
        self.index.write_to(&self.index_dest)?;
        Ok(self.snapshot)
    }
}

/// Tunables of an open repository.
#[derive(Clone, Debug)]
pub struct RepoOptions {
    /// Size at which a new log segment starts.
    pub segment_bytes: u64,
    /// Checkpoint once this much log was written since the last one.
    pub checkpoint_bytes: u64,
    /// ... or once this much time passed with changes pending.
    pub checkpoint_interval: Duration,
    /// Upper bound on retained, already checkpointed log (so a dead
    /// secondary can never fill the disk).
    pub max_log_bytes: u64,
    /// How many recent idempotency tokens are remembered.
    pub max_tokens: usize,
    /// Open even if the commit-log segment the header names is missing
    /// (deleted or lost), starting from the checkpoint: the operator
    /// accepts losing whatever it held (`--accept-missing-log`).
    pub accept_missing_log: bool,
}

impl Default for RepoOptions {
    fn default() -> Self {
        RepoOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            checkpoint_bytes: 64 * 1024 * 1024,
            checkpoint_interval: Duration::from_secs(5),
            max_log_bytes: 1024 * 1024 * 1024,
            max_tokens: 100_000,
            accept_missing_log: false,
        }
    }
}

const LOCK_FILE: &str = "LOCK";
/// Most bytes of the root anchor (root, node and every meta attribute),
/// checked before a commit that sets meta attributes.
pub const MAX_ANCHOR_BYTES: usize = 64 * 1024 * 1024;

/// An open repository. Owned by one thread; see the module doc of `storage`.
pub struct Repository {
    dir: PathBuf,
    _lock: File,
    opts: RepoOptions,
    /// Tests: the next checkpoint stops after writing the index, as a
    /// kill -9 before the header is renamed would.
    #[cfg(test)]
    pub(crate) crash_before_header: bool,
    header: Header,
    log: CommitLog,
    index: IndexMap,
    /// Index entries changed since the last checkpoint (see `index_map`).
    overlay: HashMap<Oid, IndexEntry>,
    /// Why this repository refuses every change and read until reopened
    /// (see `poisoning`).
    poisoned: Option<String>,
    objects: ObjectFile,
    colls: Collections,
    epoch: Epoch,
    next_oid: Oid,
    tokens: TokenTable,
    anchor: Option<Anchor>,
    log_bytes_since_checkpoint: u64,
    last_checkpoint: Instant,
    /// Copies of `index.map` being made on other threads (snapshots,
    /// digests): checkpoints, its only writers, wait for them or are put
    /// off (`index_copy`).
    index_pins: Vec<Pin>,
    retain_from: CommitNumber,
    /// The first record a server started from this process's newest
    /// *completed* backup will pull (its snapshot commit + 1): kept, within
    /// `max_log_bytes`, so a backup that took long is not useless by the
    /// time it is started. A backup that fails or is aborted leaves it
    /// where it was. Not persisted: a restart forgets it.
    backup_from: CommitNumber,
    /// The same for the backup being copied, from its snapshot until it
    /// ends ([`Repository::backup_ended`]).
    backup_running_from: Option<CommitNumber>,
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StorageError::io(format!("opening {}", path.display()), e))?;
    flock_exclusive(&f, dir, &path)?;
    Ok(f)
}

fn flock_exclusive(f: &File, dir: &Path, path: &Path) -> Result<()> {
    // SAFETY: flock on a valid, owned descriptor; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(StorageError::Locked(dir.to_path_buf()));
        }
        return Err(StorageError::io(format!("locking {}", path.display()), e));
    }
    Ok(())
}

/// Take the lock of `dir` without creating its lock file (offline tools
/// reading a backup): `None` when there is none, i.e. no server ever opened
/// the directory. `Locked` while a server holds it.
pub(crate) fn lock_existing(dir: &Path) -> Result<Option<File>> {
    let path = dir.join(LOCK_FILE);
    let f = match OpenOptions::new().read(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io(format!("opening {}", path.display()), e)),
    };
    flock_exclusive(&f, dir, &path)?;
    Ok(Some(f))
}

/// Decide how one commit's new objects, puts and appends become ops.
struct Plan {
    ops: Vec<Op>,
    new_oids: Vec<(u64, Oid)>,
    positions: Vec<u64>,
}

/// The first record whose idempotency token must survive a restart: the
/// last `max_tokens` records up to `checkpoint` (the ones after it are
/// replayed anyway). The log keeps them, within `max_log_bytes`.
/// A class name an object record can hold.
fn check_class(class: &str) -> Result<()> {
    if class.len() > MAX_CLASS_LEN {
        return Err(StorageError::Invalid(format!(
            "class name of {} bytes is over the {MAX_CLASS_LEN}-byte limit",
            class.len()
        )));
    }
    Ok(())
}

fn token_history_from(checkpoint: CommitNumber, max_tokens: usize) -> CommitNumber {
    (checkpoint + 1).saturating_sub(max_tokens as u64).max(1)
}

impl Repository {
    /// Create a new repository in `dir` (must be absent or empty) with an
    /// anchor whose node has this server as its only (primary) member at `addr`.
    pub fn create(dir: &Path, server_id: u64, addr: &str) -> Result<Repository> {
        Self::create_with(dir, server_id, addr, RepoOptions::default())
    }

    pub fn create_with(
        dir: &Path,
        server_id: u64,
        addr: &str,
        opts: RepoOptions,
    ) -> Result<Repository> {
        if dir.exists() {
            let mut entries = fs::read_dir(dir)
                .map_err(|e| StorageError::io(format!("listing {}", dir.display()), e))?;
            if entries.next().is_some() {
                return Err(StorageError::Invalid(format!(
                    "cannot create a repository in {}: the directory is not empty",
                    dir.display()
                )));
            }
        }
        fs::create_dir_all(dir)
            .map_err(|e| StorageError::io(format!("creating {}", dir.display()), e))?;
        let lock = lock_dir(dir)?;
        let server_id = if server_id == 0 {
            rand::random::<u64>() | 1
        } else {
            server_id
        };
        let repository_id = RepositoryId::random();
        Header {
            repository_id,
            server_id,
            restore_mode: false,
            tombstones: false,
            epoch: Epoch::initial(server_id),
            checkpoint: 0,
            checkpoint_hash: GENESIS_HASH,
            objects_len: 0,
            next_oid: 1,
            log_segment: 0,
        }
        .write(dir)?;
        let mut repo = Self::open_locked(dir, lock, opts)?;
        let anchor = Anchor {
            root: None,
            repository_id,
            node: Node {
                members: vec![Member {
                    server_id,
                    addr: addr.to_string(),
                    role: MemberRole::Primary,
                }],
            },
            meta: Vec::new(),
        };
        let ops = vec![Op::Put {
            oid: ROOT_ANCHOR,
            class: ANCHOR_CLASS.to_string(),
            value: anchor.encode(),
        }];
        repo.append_and_apply(ops, None, None)?;
        repo.checkpoint()?;
        Ok(repo)
    }

    /// Open an existing repository: lock, read the header, cut a torn log
    /// tail, replay past the checkpoint.
    pub fn open(dir: &Path) -> Result<Repository> {
        Self::open_with(dir, RepoOptions::default())
    }

    pub fn open_with(dir: &Path, opts: RepoOptions) -> Result<Repository> {
        if !dir.join(HEADER_FILE).exists() {
            return Err(StorageError::NotARepository(dir.to_path_buf()));
        }
        let lock = lock_dir(dir)?;
        let repo = Self::open_locked(dir, lock, opts)?;
        if repo.header.checkpoint == 0 && repo.log.last() == 0 {
            // Creation writes the header, then commits and checkpoints the
            // root anchor (commit 1); every repository, backup or copy
            // holds at least that.
            return Err(StorageError::Corrupted(format!(
                "{}: its creation was cut short (a crash before its first commit); \
                 it holds no data: remove the directory and start again",
                dir.display()
            )));
        }
        Ok(repo)
    }

    fn open_locked(dir: &Path, lock: File, opts: RepoOptions) -> Result<Repository> {
        let mut header = Header::read(dir)?;
        if header.server_id == 0 {
            // A backup opened as a server for the first time: its own identity.
            header.server_id = rand::random::<u64>() | 1;
            header.write(dir)?;
        }
        let mut index = IndexMap::open(dir, header.checkpoint)?;
        let restored = index.recover(header.checkpoint)?;
        if restored > 0 {
            log::warn!(
                "{}: a checkpoint was cut short; {restored} index entries put back as of checkpoint {}",
                dir.display(),
                header.checkpoint
            );
        }
        // Tokens of the records the checkpoint already covers are read
        // back from the log too (`trim_log` keeps them): a commit applied
        // just before a checkpoint and a kill is still recognised when its
        // client resends it, never applied twice.
        let mut history = Vec::new();
        let mut pending = Vec::new();
        let start = Start {
            checkpoint: header.checkpoint,
            checkpoint_hash: header.checkpoint_hash,
            history_from: token_history_from(header.checkpoint, opts.max_tokens),
            segment: header.log_segment,
            accept_missing: opts.accept_missing_log,
        };
        let log = CommitLog::open_with_history(
            dir,
            start,
            opts.segment_bytes,
            |body| {
                let record = CommitRecord::decode(body)?;
                if let Some(token) = record.payload.token {
                    history.push((token, record.number));
                }
                Ok(())
            },
            |body| {
                pending.push(body.to_vec());
                Ok(())
            },
        )?;
        if header.log_segment != 0 && !log.has_segment(header.log_segment) {
            // Opened with `accept_missing_log`: the header names the lost
            // segment no more, so a restart before the next checkpoint
            // does not need the flag again.
            header.log_segment = 0;
            header.write(dir)?;
        }
        // Only now, the log read and found whole (up to a torn tail), are
        // the data files cut back to the checkpoint: an open refused for a
        // damaged log leaves them as they were (they hold the other copy
        // of what the damaged records did).
        let objects = ObjectFile::open(dir, header.objects_len)?;
        let mut colls = Collections::open(dir)?;
        // Cut collection files to their checkpointed lengths; later
        // elements are replayed at their explicit positions.
        for coll in colls.existing()? {
            let len = match index.get(coll)? {
                Some(e) => e.coll_len,
                // Created after the checkpoint (oids from its next_oid on
                // are new since): replayed from the log.
                None if coll >= header.next_oid => 0,
                // Checkpointed collections have entries: cutting the files
                // to nothing would destroy their elements.
                None => {
                    return Err(StorageError::Corrupted(format!(
                        "{}: collection {coll} has files but no entry, though the \
                         checkpoint's next oid is {}",
                        dir.join(crate::storage::index_map::INDEX_FILE).display(),
                        header.next_oid
                    )))
                }
            };
            colls.truncate(coll, len)?;
        }
        let mut repo = Repository {
            dir: dir.to_path_buf(),
            _lock: lock,
            epoch: header.epoch,
            next_oid: header.next_oid,
            header,
            log,
            index,
            overlay: HashMap::new(),
            poisoned: None,
            objects,
            colls,
            tokens: TokenTable::new(opts.max_tokens),
            anchor: None,
            log_bytes_since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            index_pins: Vec::new(),
            retain_from: 1,
            backup_from: CommitNumber::MAX,
            backup_running_from: None,
            opts,
            #[cfg(test)]
            crash_before_header: false,
        };
        for (token, number) in history {
            repo.tokens.remember(&token, number);
        }
        let replayed = pending.len();
        for body in pending {
            let record = CommitRecord::decode(&body)?;
            repo.log_bytes_since_checkpoint += body.len() as u64;
            repo.apply_decoded(&record)?;
        }
        if replayed > 0 {
            log::info!(
                "{}: replayed {replayed} commit records past checkpoint {}",
                dir.display(),
                repo.header.checkpoint
            );
        }
        Ok(repo)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn info(&self) -> RepoInfo {
        RepoInfo {
            repository_id: self.header.repository_id,
            server_id: self.header.server_id,
            restore_mode: self.header.restore_mode,
            epoch: self.epoch,
            last_commit: self.log.last(),
            last_hash: self.log.last_hash(),
            checkpoint: self.header.checkpoint,
            log_start: self.log.first_retained(),
            next_oid: self.next_oid,
        }
    }

    fn entry(&self, oid: Oid) -> Result<Option<IndexEntry>> {
        match self.overlay.get(&oid) {
            Some(e) => Ok(Some(*e)),
            None => self.index.get(oid),
        }
    }

    /// Validate, assign oids/positions, write the record to the log (not
    /// synced) and apply it. Refused in restore mode.
    pub fn commit(&mut self, req: CommitRequest) -> Result<Committed> {
        let done = self.commit_unwritten(req)?;
        let sync = self
            .log
            .sync_handle()?
            .expect("a record was just appended, so a segment is open");
        Ok(done.written(sync))
    }

    /// [`Repository::commit`] without writing the log: the record is
    /// buffered and applied (visible to reads), and the caller must get
    /// [`Repository::log_sync`] — which writes everything buffered — before
    /// the commit may be acknowledged or replicated. Lets a batch of commits
    /// cost one log write instead of one each.
    pub fn commit_unwritten(&mut self, req: CommitRequest) -> Result<Unwritten> {
        self.usable()?;
        if self.header.restore_mode {
            return Err(StorageError::RestoreMode);
        }
        if let Some(e) = req.new_epoch {
            if e <= self.epoch {
                return Err(StorageError::Invalid(format!(
                    "new epoch {e} is not newer than the current {}",
                    self.epoch
                )));
            }
        }
        if let Some(token) = &req.token {
            if token.len() > 64 {
                return Err(StorageError::Invalid(
                    "idempotency token over 64 bytes".into(),
                ));
            }
        }
        let plan = self.plan(&req)?;
        let appended = self.append_and_apply(plan.ops, req.token, req.new_epoch);
        let (number, body) = self.poisoning(appended)?;
        Ok(Unwritten {
            number,
            body,
            new_oids: plan.new_oids,
            positions: plan.positions,
        })
    }

    fn plan(&self, req: &CommitRequest) -> Result<Plan> {
        // New objects first: their oids are needed to resolve references.
        let mut temp_to_oid = HashMap::new();
        let mut new_classes = HashMap::new();
        for (next, n) in (self.next_oid..).zip(req.news.iter()) {
            if n.class == ANCHOR_CLASS {
                return Err(StorageError::Invalid(format!(
                    "class {ANCHOR_CLASS} is reserved for the root anchor"
                )));
            }
            check_class(&n.class)?;
            if temp_to_oid.insert(n.temp_id, next).is_some() {
                return Err(StorageError::Invalid(format!(
                    "temporary id {} is used by two new objects",
                    n.temp_id
                )));
            }
            new_classes.insert(n.temp_id, n.class.as_str());
        }
        let mut conflicts = Vec::new();
        let mut seen = HashSet::new();
        for p in &req.puts {
            if p.oid == ROOT_ANCHOR {
                return Err(StorageError::Invalid(
                    "the root anchor changes only through set_root and meta attributes".into(),
                ));
            }
            if !seen.insert(p.oid) {
                return Err(StorageError::Invalid(format!(
                    "object {} is written twice",
                    p.oid
                )));
            }
            check_class(&p.class)?;
            if p.class == COLLECTION_CLASS || p.class == ANCHOR_CLASS {
                return Err(StorageError::Invalid(format!(
                    "class {} is reserved",
                    p.class
                )));
            }
            let e = self
                .entry(p.oid)?
                .ok_or(StorageError::UnknownObject(p.oid))?;
            if e.is_collection() {
                return Err(StorageError::Invalid(format!(
                    "object {} is a large collection: it changes only by appends",
                    p.oid
                )));
            }
            if e.version != p.expected_version {
                conflicts.push(p.oid);
            }
        }
        if !conflicts.is_empty() {
            return Err(StorageError::Conflict { oids: conflicts });
        }
        let resolve = |r: ObjRef| -> Result<Oid> {
            match r {
                ObjRef::Oid(oid) => Ok(oid),
                ObjRef::New(t) => temp_to_oid.get(&t).copied().ok_or_else(|| {
                    StorageError::Invalid(format!("temporary id {t} names no new object"))
                }),
            }
        };
        let checked = |value: &[u8]| checked_value(value, &temp_to_oid);
        let mut ops = Vec::with_capacity(req.news.len() + req.puts.len() + req.appends.len() + 1);
        let mut new_oids = Vec::with_capacity(req.news.len());
        for n in &req.news {
            let oid = temp_to_oid[&n.temp_id];
            new_oids.push((n.temp_id, oid));
            let value = if n.class == COLLECTION_CLASS {
                encode_value(&Value::Nil)
            } else {
                checked(&n.value)?
            };
            ops.push(Op::Put {
                oid,
                class: n.class.clone(),
                value,
            });
        }
        for p in &req.puts {
            ops.push(Op::Put {
                oid: p.oid,
                class: p.class.clone(),
                value: checked(&p.value)?,
            });
        }
        let mut lens: HashMap<Oid, u64> = HashMap::new();
        let mut positions = Vec::with_capacity(req.appends.len());
        for a in &req.appends {
            let coll = resolve(a.coll)?;
            let len = match lens.get_mut(&coll) {
                Some(l) => l,
                None => {
                    let start = match a.coll {
                        ObjRef::New(t) if new_classes.get(&t) == Some(&COLLECTION_CLASS) => 0,
                        ObjRef::New(_) => return Err(StorageError::NotACollection(coll)),
                        ObjRef::Oid(oid) => {
                            let e = self.entry(oid)?.ok_or(StorageError::UnknownObject(oid))?;
                            if !e.is_collection() {
                                return Err(StorageError::NotACollection(oid));
                            }
                            e.coll_len
                        }
                    };
                    lens.entry(coll).or_insert(start)
                }
            };
            positions.push(*len);
            ops.push(Op::Append {
                coll,
                index: *len,
                value: checked(&a.value)?,
            });
            *len += 1;
        }
        if let Some(r) = req.set_root {
            let oid = resolve(r)?;
            if matches!(r, ObjRef::Oid(_)) && self.entry(oid)?.is_none() {
                return Err(StorageError::UnknownObject(oid));
            }
            ops.push(Op::SetRoot { oid: Some(oid) });
        }
        if !req.meta.is_empty() {
            // The anchor holds every meta attribute and is rewritten whole
            // by each change of root, meta or node: bounded, it stays a
            // record any server can write and read back (its length field
            // is 32 bits).
            let now = match self.entry(ROOT_ANCHOR)? {
                Some(e) => self.objects.stored(ROOT_ANCHOR, &e)?.value.len(),
                None => 0,
            };
            let added: usize = req
                .meta
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()) + 16)
                .sum();
            if now + added > MAX_ANCHOR_BYTES {
                return Err(StorageError::Invalid(format!(
                    "meta attributes would take up to {} bytes with these; at most {} in all",
                    now + added,
                    MAX_ANCHOR_BYTES
                )));
            }
        }
        for (key, value) in &req.meta {
            let value = match value {
                Some(v) => Some(checked(v)?),
                None => None,
            };
            ops.push(Op::SetMeta {
                key: key.clone(),
                value,
            });
        }
        if let Some(node) = &req.set_node {
            ops.push(Op::SetNode { node: node.clone() });
        }
        if ops.is_empty() && req.new_epoch.is_none() {
            return Err(StorageError::Invalid(
                "a commit must change something".into(),
            ));
        }
        if let Some(oid) = self.dropped_use(&ops)? {
            return Err(StorageError::DroppedObject(oid));
        }
        Ok(Plan {
            ops,
            new_oids,
            positions,
        })
    }

    /// The first object `ops` use (link, append to, make the root) that
    /// compaction dropped from this copy and they do not write themselves.
    /// Such a record cannot be applied faithfully here: the other servers
    /// still have the object. Free unless this copy was compacted
    /// (`Header::tombstones`); then every value of the record is parsed.
    fn dropped_use(&self, ops: &[Op]) -> Result<Option<Oid>> {
        if !self.header.tombstones {
            return Ok(None);
        }
        // Writing a dropped object back in full (a secondary following a
        // primary that kept it) makes it whole again.
        let written: HashSet<Oid> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put { oid, .. } => Some(*oid),
                _ => None,
            })
            .collect();
        let lost = |oid: Oid| -> Result<bool> {
            Ok(!written.contains(&oid) && self.entry(oid)?.is_none() && self.index.dropped(oid)?)
        };
        for op in ops {
            let (direct, value) = match op {
                Op::Put { value, .. } => (None, Some(value)),
                Op::Append { coll, value, .. } => (Some(*coll), Some(value)),
                Op::SetRoot { oid } => (*oid, None),
                Op::SetMeta { value, .. } => (None, value.as_ref()),
                Op::SetNode { .. } => (None, None),
            };
            let refs = match value {
                Some(v) => references_in(v)?,
                None => Vec::new(),
            };
            for oid in direct.into_iter().chain(refs) {
                if lost(oid)? {
                    return Ok(Some(oid));
                }
            }
        }
        Ok(None)
    }

    fn append_and_apply(
        &mut self,
        ops: Vec<Op>,
        token: Option<Vec<u8>>,
        new_epoch: Option<Epoch>,
    ) -> Result<(CommitNumber, Arc<Vec<u8>>)> {
        let record = CommitRecord {
            number: self.log.last() + 1,
            epoch: new_epoch.unwrap_or(self.epoch),
            prev_hash: self.log.last_hash(),
            payload: Payload { token, ops },
        };
        let body = record.encode();
        self.log.append_buffered(record.number, &body)?;
        self.log_bytes_since_checkpoint += body.len() as u64;
        self.apply_logged(&record)?;
        Ok((record.number, Arc::new(body)))
    }

    /// Apply a record already in the log. `plan` (or the primary that sent
    /// the record) checked everything an operation can refuse, so a failure
    /// here leaves a logged record half applied: fatal, so that nothing
    /// after it is acknowledged.
    fn apply_logged(&mut self, record: &CommitRecord) -> Result<()> {
        self.apply_decoded(record).map_err(|e| {
            if e.is_fatal() {
                e
            } else {
                StorageError::Corrupted(format!(
                    "record {} is logged but could not be applied: {e}",
                    record.number
                ))
            }
        })
    }

    /// Apply a record received from the primary (body bytes as logged there):
    /// must be number = last + 1, continue the hash chain, epoch not older.
    /// Written to the log (not synced) and applied. Allowed in restore mode.
    pub fn apply_record(&mut self, body: &[u8]) -> Result<CommitNumber> {
        self.apply_records(std::slice::from_ref(&body))
    }

    /// Apply a batch of consecutive records (as `apply_record`, with one log
    /// write for the batch). Records before the first failing one stay
    /// applied; returns the last applied number.
    pub fn apply_records<B: AsRef<[u8]>>(&mut self, bodies: &[B]) -> Result<CommitNumber> {
        self.usable()?;
        let result = bodies.iter().try_for_each(|b| self.apply_one(b.as_ref()));
        let result = self.poisoning(result);
        let written = self.log.write_pending();
        self.poisoning(written)?;
        result.map(|_| self.log.last())
    }

    /// Refuse once a failure poisoned the repository (`StorageError::Stopped`).
    fn usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(StorageError::Stopped(why.clone())),
            None => Ok(()),
        }
    }

    /// Poison the repository on a fatal failure: a record logged but not
    /// wholly applied, or a log write that failed, leaves memory and log
    /// apart. Later commits would be planned on that memory and logged
    /// after the record (replayed, they would overwrite its effects), and
    /// a checkpoint would make the half-applied state the repository's.
    /// The server stops on the fatal error; until it has, nothing more
    /// changes or is read.
    fn poisoning<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            if e.is_fatal() && self.poisoned.is_none() {
                log::error!("{}: stopped taking changes: {e}", self.dir.display());
                self.poisoned = Some(e.to_string());
            }
        }
        result
    }

    fn apply_one(&mut self, body: &[u8]) -> Result<()> {
        // A record that does not parse came damaged from the network (or
        // from a newer version): refused, not a sign that our files are
        // (nothing is logged or applied yet).
        let received = |e: StorageError| StorageError::Invalid(format!("a received record: {e}"));
        let head = RecordHead::parse(body).map_err(received)?;
        let expected = self.log.last() + 1;
        if head.number != expected {
            return Err(StorageError::OutOfSequence {
                expected,
                got: head.number,
            });
        }
        if head.prev_hash != self.log.last_hash() {
            return Err(StorageError::ChainMismatch {
                number: head.number,
            });
        }
        if head.epoch < self.epoch {
            return Err(StorageError::StaleEpoch {
                number: head.number,
                got: head.epoch,
                current: self.epoch,
            });
        }
        let record = CommitRecord::decode(body).map_err(received)?;
        if let Some(oid) = self.dropped_use(&record.payload.ops)? {
            // Refused before it is logged: a restart finds this copy as it
            // was, and stops here again.
            return Err(StorageError::DroppedNeeded {
                number: record.number,
                oid,
            });
        }
        self.log.append_buffered(record.number, body)?;
        self.log_bytes_since_checkpoint += body.len() as u64;
        self.apply_logged(&record)
    }

    /// Apply a record's operations. Deterministic and, because every
    /// position is explicit, idempotent over a partially checkpointed state.
    fn apply_decoded(&mut self, record: &CommitRecord) -> Result<()> {
        let number = record.number;
        let mut anchor: Option<Anchor> = None;
        for op in &record.payload.ops {
            match op {
                Op::Put { oid, class, value } => {
                    self.put_object(*oid, number, class, value)?;
                    if *oid == ROOT_ANCHOR {
                        self.anchor = None;
                    }
                }
                Op::Append { coll, index, value } => {
                    let mut e = self.entry(*coll)?.ok_or_else(|| {
                        StorageError::Corrupted(format!(
                            "record {number} appends to missing collection {coll} (on a \
                             server started from a compacted backup: the collection was \
                             unreachable at the backup's commit and a later commit used \
                             it again; start this server from a plain backup)"
                        ))
                    })?;
                    if !e.is_collection() || *index > e.coll_len {
                        return Err(StorageError::Corrupted(format!(
                            "record {number} appends element {index} to object {coll} of length {}",
                            e.coll_len
                        )));
                    }
                    self.colls.write(*coll, *index, value)?;
                    e.coll_len = index + 1;
                    self.overlay.insert(*coll, e);
                }
                Op::SetRoot { oid } => {
                    self.anchor_for_update(&mut anchor)?.root = *oid;
                }
                Op::SetMeta { key, value } => {
                    let a = self.anchor_for_update(&mut anchor)?;
                    a.meta.retain(|(k, _)| k != key);
                    if let Some(v) = value {
                        a.meta.push((key.clone(), v.clone()));
                        a.meta.sort();
                    }
                }
                Op::SetNode { node } => {
                    self.anchor_for_update(&mut anchor)?.node = node.clone();
                }
            }
        }
        if let Some(a) = anchor {
            self.put_object(ROOT_ANCHOR, number, ANCHOR_CLASS, &a.encode())?;
            self.anchor = Some(a);
        }
        if record.epoch > self.epoch {
            self.epoch = record.epoch;
        }
        if let Some(t) = &record.payload.token {
            self.tokens.remember(t, number);
        }
        Ok(())
    }

    fn anchor_for_update<'a>(&mut self, slot: &'a mut Option<Anchor>) -> Result<&'a mut Anchor> {
        if slot.is_none() {
            *slot = Some(self.anchor()?);
        }
        Ok(slot.as_mut().expect("just filled"))
    }

    fn put_object(&mut self, oid: Oid, version: u64, class: &str, value: &[u8]) -> Result<()> {
        let at = self.objects.append(oid, version, class, value)?;
        let flags = if class == COLLECTION_CLASS {
            FLAG_COLLECTION
        } else {
            0
        };
        self.overlay.insert(
            oid,
            IndexEntry {
                loc: at + 1,
                version,
                coll_len: 0,
                flags,
            },
        );
        if oid >= self.next_oid {
            self.next_oid = oid + 1;
        }
        Ok(())
    }

    /// A handle to fsync the log up to everything written so far (None
    /// only before the first record of a fresh backup).
    pub fn log_sync(&mut self) -> Result<Option<LogSync>> {
        self.log.sync_handle()
    }

    /// fsync the log on this thread.
    pub fn sync(&mut self) -> Result<()> {
        self.log.sync()
    }

    pub fn get(&self, oid: Oid) -> Result<Option<StoredObject>> {
        self.usable()?;
        match self.entry(oid)? {
            Some(e) => self.objects.stored(oid, &e).map(Some),
            None => Ok(None),
        }
    }

    /// Number of elements of a large collection.
    pub fn collection_len(&self, coll: Oid) -> Result<u64> {
        self.usable()?;
        let e = self.entry(coll)?.ok_or(StorageError::UnknownObject(coll))?;
        if !e.is_collection() {
            return Err(StorageError::NotACollection(coll));
        }
        Ok(e.coll_len)
    }

    pub fn collection_range(&mut self, coll: Oid, start: u64, count: u64) -> Result<Vec<Vec<u8>>> {
        Ok(self.collection_page(coll, start, count, u64::MAX)?.1)
    }

    /// The collection's length, and its elements `[start, start + count)`
    /// cut, past the first, where their data would exceed `max_bytes`.
    pub fn collection_page(
        &mut self,
        coll: Oid,
        start: u64,
        count: u64,
        max_bytes: u64,
    ) -> Result<(u64, Vec<Vec<u8>>)> {
        let len = self.collection_len(coll)?;
        Ok((len, self.colls.range(coll, len, start, count, max_bytes)?))
    }

    pub fn anchor(&mut self) -> Result<Anchor> {
        self.anchor_ref().cloned()
    }

    /// The anchor, decoded once and kept until a commit changes it.
    pub fn anchor_ref(&mut self) -> Result<&Anchor> {
        if self.anchor.is_none() {
            let obj = self
                .get(ROOT_ANCHOR)?
                .ok_or_else(|| StorageError::Corrupted("the root anchor is missing".into()))?;
            self.anchor = Some(Anchor::decode(&obj.value)?);
        }
        Ok(self.anchor.as_ref().expect("the anchor was just decoded"))
    }

    /// Record bodies from `from` on, at most `max_count` records and about
    /// `max_bytes` (at least one record is returned if any exists).
    pub fn read_records(
        &mut self,
        from: CommitNumber,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<Vec<u8>>> {
        self.log.read_from(from, max_count, max_bytes)
    }

    /// Commit number of an earlier commit carrying this idempotency token.
    pub fn token_commit(&self, token: &[u8]) -> Option<CommitNumber> {
        self.tokens.get(token)
    }

    /// Make everything applied so far durable in the data files and index,
    /// then record it in the header; older log segments may then go.
    /// Make everything applied durable in the data files and index, and
    /// name it in the header. Any failure poisons the repository (see
    /// `poisoning`): a checkpoint cut short after the index entries were
    /// written must be undone at the next open, and a second one in this
    /// process would overwrite the undo file with entries already changed.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.usable()?;
        let done = self.write_checkpoint();
        if let Err(e) = &done {
            if self.poisoned.is_none() {
                log::error!(
                    "{}: checkpoint failed, stopped taking changes: {e}",
                    self.dir.display()
                );
                self.poisoned = Some(format!("a checkpoint failed: {e}"));
            }
        }
        done
    }

    fn write_checkpoint(&mut self) -> Result<()> {
        // Checkpoints are the only writers of `index.map`: no copy of it
        // under way may see this one's entries. (Without entries to write,
        // the file is not touched and nothing waits.)
        let pins = if self.overlay.is_empty() {
            Vec::new()
        } else {
            std::mem::take(&mut self.index_pins)
        };
        for pin in pins {
            if !pin.wait_or_break(PIN_PATIENCE) {
                log::warn!(
                    "{}: a copy of the index for a backup or digest was not made within {} s; \
                     the checkpoint goes ahead and that copy will be refused",
                    self.dir.display(),
                    PIN_PATIENCE.as_secs()
                );
            }
        }
        // Everything the index and header will describe is durable before
        // either is written; the files are synced together (see `sync`).
        let mut targets = self.colls.dirty_sync_targets()?;
        targets.push(self.objects.sync_target()?);
        targets.extend(self.log.sync_target()?);
        crate::storage::sync::sync_all(&targets)?;
        self.colls.sync_new_names()?;
        let mut entries: Vec<_> = self.overlay.iter().map(|(k, v)| (*k, *v)).collect();
        entries.sort_unstable_by_key(|(k, _)| *k);
        // Undoable until the header below names this checkpoint.
        self.index.set_checkpoint(self.log.last(), &entries)?;
        #[cfg(test)]
        if self.crash_before_header {
            return Err(StorageError::Invalid(
                "test: crashed before the header".into(),
            ));
        }
        let mut h = self.header.clone();
        h.epoch = self.epoch;
        h.checkpoint = self.log.last();
        h.checkpoint_hash = self.log.last_hash();
        h.objects_len = self.objects.len();
        h.next_oid = self.next_oid;
        h.log_segment = self.log.current_segment().unwrap_or(0);
        h.write(&self.dir)?;
        self.index.checkpointed()?;
        self.header = h;
        self.overlay.clear();
        self.log_bytes_since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.trim_log()?;
        log::debug!(
            "{}: checkpoint at commit {}",
            self.dir.display(),
            self.header.checkpoint
        );
        Ok(())
    }

    fn trim_log(&mut self) -> Result<()> {
        let keep = self
            .retain_from
            .min(self.backup_from)
            .min(self.backup_running_from.unwrap_or(CommitNumber::MAX))
            .min(token_history_from(
                self.header.checkpoint,
                self.opts.max_tokens,
            ));
        self.log.remove_before(keep)?;
        // The bound wins over what secondaries asked for.
        while self.log.disk_bytes() > self.opts.max_log_bytes {
            match self.log.second_segment_first() {
                Some(next) if next <= self.header.checkpoint + 1 => {
                    self.log.remove_before(next)?;
                }
                _ => break,
            }
        }
        Ok(())
    }

    /// Checkpoint if enough log was written, or enough time passed, since
    /// the last one.
    pub fn maybe_checkpoint(&mut self) -> Result<bool> {
        let due = self.log_bytes_since_checkpoint >= self.opts.checkpoint_bytes
            || (self.log_bytes_since_checkpoint > 0
                && self.last_checkpoint.elapsed() >= self.opts.checkpoint_interval);
        if !due {
            return Ok(false);
        }
        self.index_pins.retain(Pin::holds);
        if !self.index_pins.is_empty()
            && self.log_bytes_since_checkpoint < self.opts.checkpoint_bytes.saturating_mul(2)
        {
            // A copy of the index is being made: put the checkpoint off
            // rather than wait for it here (its writes would hold up
            // commits and reads as long as the copy takes).
            return Ok(false);
        }
        self.checkpoint()?;
        Ok(true)
    }

    /// Pin `index.map` as of the last checkpoint, for a copy made on the
    /// caller's thread (see `index_copy`).
    fn pin_index(&mut self) -> Result<IndexCopy> {
        let (path, len) = self.index.file();
        let (copy, pin) = IndexCopy::pin(path, len)?;
        self.index_pins.push(pin);
        Ok(copy)
    }

    /// (last commit, BLAKE3 over every object reachable from the anchor, in
    /// traversal order: oid, version, class, value and collection elements;
    /// `storage::digest`). Two repositories with the same content print the
    /// same digest, whatever garbage either still holds. Runs on the
    /// caller's thread, as long as the graph takes to read: a server uses
    /// [`Repository::digest_view`] instead.
    pub fn digest(&mut self) -> Result<(CommitNumber, Hash)> {
        let hash = digest_graph(self)?;
        Ok((self.log.last(), hash))
    }

    /// Checkpoint and return a view of the repository as of its last
    /// commit that computes the same digest on any thread, while this
    /// repository goes on (`storage::digest`). Costs a checkpoint here;
    /// the view copies the pinned `index.map` (into a file without a name)
    /// on its own thread, and checkpoints wait for that copy.
    pub fn digest_view(&mut self) -> Result<DigestView> {
        self.checkpoint()?;
        let objects = ObjectFile::open_read_only(&self.dir, self.objects.len())?;
        let index = self.pin_index()?;
        Ok(DigestView::new(&self.dir, self.log.last(), index, objects))
    }

    /// Checkpoint and capture a consistent view; `scratch` receives a copy of
    /// the index made at that instant. Every other file of the snapshot is a
    /// prefix that later commits never rewrite, so it may be copied while
    /// commits go on. From then on the log is kept from the snapshot's
    /// commit on (within `max_log_bytes`), whatever secondaries need, so a
    /// server started from the backup can catch up.
    pub fn snapshot(&mut self, scratch: &Path) -> Result<Snapshot> {
        self.snapshot_deferred(scratch)?.complete()
    }

    /// [`Repository::snapshot`], but the index copy is left to
    /// [`PendingSnapshot::complete`] on the caller's thread: the
    /// repository only checkpoints and pins the index (a server's storage
    /// thread must not copy it, see `index_copy`). Until the copy is made
    /// the next checkpoint is put off, or waits for it.
    pub fn snapshot_deferred(&mut self, scratch: &Path) -> Result<PendingSnapshot> {
        self.checkpoint()?;
        fs::create_dir_all(scratch)
            .map_err(|e| StorageError::backup_io(format!("creating {}", scratch.display()), e))?;
        let index_copy = scratch.join(INDEX_FILE);
        let index = self.pin_index()?;
        let (_, index_len) = self.index.file();
        let mut header = self.header.clone();
        header.restore_mode = true;
        header.server_id = 0;
        // The copy holds no log: it continues at `checkpoint + 1`.
        header.log_segment = 0;
        let mut files = vec![
            SnapshotFile {
                relative: PathBuf::from(OBJECTS_FILE),
                source: self.objects.path().to_path_buf(),
                len: self.objects.len(),
            },
            SnapshotFile {
                relative: PathBuf::from(INDEX_FILE),
                source: index_copy.clone(),
                len: index_len,
            },
        ];
        let coll_dir = self.colls.dir().to_path_buf();
        for coll in self.colls.existing()? {
            let len = self.index.get(coll)?.map(|e| e.coll_len).unwrap_or(0);
            let (idx_len, dat_len) = self.colls.lengths(coll, len)?;
            for (path, len) in [
                (idx_path(&coll_dir, coll), idx_len),
                (dat_path(&coll_dir, coll), dat_len),
            ] {
                let name = path.file_name().expect("file name").to_owned();
                files.push(SnapshotFile {
                    relative: Path::new(COLL_DIR).join(name),
                    source: path,
                    len,
                });
            }
        }
        self.backup_running_from = Some(self.header.checkpoint + 1);
        let snapshot = Snapshot {
            commit: self.header.checkpoint,
            repository_id: self.header.repository_id,
            header: header.encode().to_vec(),
            files,
        };
        Ok(PendingSnapshot {
            snapshot,
            index,
            index_dest: index_copy,
        })
    }

    pub fn set_restore_mode(&mut self, on: bool) -> Result<()> {
        self.header.restore_mode = on;
        self.checkpoint()
    }

    /// The backup of the snapshot at `snapshot_commit` ended (`None`: one
    /// that failed to start, whose snapshot may or may not have been
    /// taken). Completed, it is the newest one a server may be started
    /// from: the log is kept from its commit on. Otherwise the log stays
    /// kept for the last completed one, which the operator still holds.
    pub fn backup_ended(&mut self, snapshot_commit: Option<CommitNumber>, completed: bool) {
        match snapshot_commit {
            Some(c) if completed => self.backup_from = c + 1,
            _ => {}
        }
        if snapshot_commit.is_none_or(|c| self.backup_running_from == Some(c + 1)) {
            self.backup_running_from = None;
        }
    }

    /// Keep log records from `n` on for catch-up (within the byte bound).
    pub fn retain_from(&mut self, n: CommitNumber) -> Result<()> {
        self.retain_from = n.max(1);
        Ok(())
    }

    /// Where the current log segment's records end (tests simulate crashes
    /// by cutting there; the file itself is longer, preallocated).
    #[cfg(test)]
    pub(crate) fn log_end_offset(&self) -> u64 {
        self.log.end_offset()
    }

    /// Bytes of commit log on disk.
    pub fn log_disk_bytes(&self) -> u64 {
        self.log.disk_bytes()
    }

    /// Names of the directories and files a repository consists of.
    pub fn layout() -> [&'static str; 6] {
        [
            HEADER_FILE,
            INDEX_FILE,
            OBJECTS_FILE,
            COLL_DIR,
            LOG_DIR,
            LOCK_FILE,
        ]
    }
}

impl GraphSource for Repository {
    fn object(&mut self, oid: Oid) -> Result<Option<StoredObject>> {
        self.get(oid)
    }

    fn elements(&mut self, coll: Oid, len: u64, at: u64) -> Result<Vec<Vec<u8>>> {
        self.colls.range(coll, len, at, PAGE_ELEMENTS, PAGE_BYTES)
    }
}

impl Snapshot {
    /// Materialise the snapshot in `target` (which must not exist) in one
    /// go: the same chunked copy a server's backup job runs, ending with the
    /// restore-mode header and the manifest. For tools and tests; a server
    /// copies through `BackupActor`.
    pub fn copy_to(&self, target: &Path) -> Result<crate::storage::backup::Manifest> {
        use crate::storage::backup::{write_marker, SnapshotCopy};
        if target.symlink_metadata().is_ok() {
            return Err(StorageError::Invalid(format!(
                "{} already exists",
                target.display()
            )));
        }
        fs::create_dir_all(target)
            .map_err(|e| StorageError::backup_io(format!("creating {}", target.display()), e))?;
        write_marker(
            target,
            "This directory is an INCOMPLETE Magma backup (copy in progress).\n",
        )?;
        SnapshotCopy::new(self.clone(), target, &target.display().to_string()).run_to_end()
    }
}

impl Anchor {
    fn encode(&self) -> Vec<u8> {
        let node = rmp_serde::to_vec_named(&self.node).expect("a node encodes");
        let node = decode_value(&node).expect("a node decodes");
        let meta = self
            .meta
            .iter()
            .map(|(k, v)| {
                let v = decode_value(v).unwrap_or(Value::Binary(v.clone()));
                (Value::from(k.as_str()), v)
            })
            .collect();
        encode_value(&Value::Map(vec![
            (
                Value::from("root"),
                self.root.map(ref_value).unwrap_or(Value::Nil),
            ),
            (
                Value::from("repository_id"),
                Value::Binary(self.repository_id.0.to_vec()),
            ),
            (Value::from("node"), node),
            (Value::from("meta"), Value::Map(meta)),
        ]))
    }

    fn decode(bytes: &[u8]) -> Result<Anchor> {
        let bad = |what: &str| StorageError::Corrupted(format!("root anchor: {what}"));
        let v = decode_value(bytes).map_err(|_| bad("not MessagePack"))?;
        let map = v.as_map().ok_or_else(|| bad("not a map"))?;
        let field = |name: &str| {
            map.iter()
                .find(|(k, _)| k.as_str() == Some(name))
                .map(|(_, v)| v)
        };
        let root = match field("root") {
            Some(Value::Ext(REF_EXT, data)) if data.len() == 8 => {
                Some(u64::from_be_bytes(data[..].try_into().unwrap()))
            }
            Some(Value::Nil) | None => None,
            Some(_) => return Err(bad("root is not a reference")),
        };
        let id = match field("repository_id") {
            Some(Value::Binary(b)) if b.len() == 16 => {
                let mut id = [0u8; 16];
                id.copy_from_slice(b);
                RepositoryId(id)
            }
            _ => return Err(bad("repository_id missing")),
        };
        let node_v = field("node").ok_or_else(|| bad("node missing"))?;
        let node: Node =
            rmp_serde::from_slice(&encode_value(node_v)).map_err(|e| bad(&format!("node: {e}")))?;
        let mut meta = Vec::new();
        if let Some(Value::Map(entries)) = field("meta") {
            for (k, v) in entries {
                let k = k.as_str().ok_or_else(|| bad("meta key is not a string"))?;
                meta.push((k.to_string(), encode_value(v)));
            }
        }
        Ok(Anchor {
            root,
            repository_id: id,
            node,
            meta,
        })
    }
}
