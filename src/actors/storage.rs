//! `StorageActor`: the one owner of the open [`Repository`].
//!
//! The only actor of its own `Arbiter` (a thread with its own event loop):
//! every repository call blocks on disk, so none may run on the server's
//! event loop; blocking in a handler here stalls nothing but this actor's
//! own mailbox. Not a `SyncArbiter`: a thread of one does not poll, and a
//! busy commit pipeline would have to wake it for every batch, which on a
//! virtual machine costs more than applying the batch (see
//! [`busy_poll`]). Handlers that carry the commit and read paths note
//! activity, so the thread polls through a burst of them.
//! It applies commits, serves reads and checkpoints. It never fsyncs the
//! commit log: each [`Committed`] carries a `LogSync` handle that the
//! `CommitLogActor` syncs, so reads never wait behind an fsync.
//!
//! After each applied commit it publishes the last applied commit number on a
//! `tokio::sync::watch` channel. That channel has exactly one writer (this
//! actor) and is how sessions stamp every response with the server's commit
//! and wait for a required progress, without a message round trip.
//!
//! It also publishes this server's [`Identity`] (ids, restore mode, epoch,
//! node) after every change, so a hello is answered without waiting for
//! this thread: a long digest or snapshot must never make a live primary
//! look dead to a secondary's orphan check.
//!
//! Callers: the `CommitCoordinator` (commits), sessions (reads), the
//! `Controller` (checkpoints, close).

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use actix::dev::RecipientRequest;
use actix::prelude::*;
use log::{debug, error, info, warn};
use tokio::sync::watch;

use crate::actors::busy_poll;
use crate::actors::commit_log::Flush;
use crate::storage::object::references_in;
use crate::storage::{
    Anchor, CommitRequest, Committed, DigestView, LogSync, PendingSnapshot, RepoInfo, Repository,
    StorageError, StoredObject, Unwritten,
};
use crate::types::{CommitNumber, Epoch, Hash, Node, Oid, RepositoryId};

type Result<T, E = StorageError> = std::result::Result<T, E>;

/// What a hello or a `node` request says about this server; published by
/// the [`StorageActor`] whenever it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub server_id: u64,
    pub repository_id: RepositoryId,
    pub restore_mode: bool,
    pub epoch: Epoch,
    pub node: Node,
}

impl Identity {
    pub fn of(repo: &mut Repository) -> Result<Identity> {
        let info = repo.info();
        Ok(Identity {
            server_id: info.server_id,
            repository_id: info.repository_id,
            restore_mode: info.restore_mode,
            epoch: info.epoch,
            node: repo.anchor_ref()?.node.clone(),
        })
    }
}

/// Owns the repository; see the module doc.
pub struct StorageActor {
    /// `None` once closed: the directory lock is released on close.
    repo: Option<Repository>,
    commits: watch::Sender<CommitNumber>,
    identity: watch::Sender<Identity>,
}

impl StorageActor {
    /// Start the actor on its own thread with `repo`, publishing applied
    /// commit numbers on `commits` and changes of its [`Identity`] on
    /// `identity` (which starts as [`Identity::of`] the repository).
    /// Between messages the thread's loop polls for `busy_poll` instead of
    /// sleeping (see [`busy_poll`]).
    pub fn start(
        repo: Repository,
        commits: watch::Sender<CommitNumber>,
        identity: watch::Sender<Identity>,
        busy_poll: Duration,
    ) -> Addr<StorageActor> {
        commits.send_replace(repo.info().last_commit);
        // An unbounded mailbox: a sender never waits for room, so a
        // message is queued the moment it is sent and messages from one
        // sender are handled in the order sent (replicated records rely on
        // it). `start_in_arbiter` would bound it until the actor starts.
        let (tx, rx) = actix::dev::channel::channel(0);
        let thread = Arbiter::new();
        thread.spawn_fn(move || {
            busy_poll::start(busy_poll);
            let actor = StorageActor {
                repo: Some(repo),
                commits,
                identity,
            };
            actix_rt::spawn(Context::with_receiver(rx).into_future(actor));
        });
        Addr::new(tx)
    }

    fn repo(&self) -> Result<&Repository> {
        self.repo.as_ref().ok_or_else(closed)
    }

    fn repo_mut(&mut self) -> Result<&mut Repository> {
        self.repo.as_mut().ok_or_else(closed)
    }

    fn publish(&self, number: CommitNumber) {
        crate::actors::publish_newer(&self.commits, number);
    }

    /// Publish the identity if a handler changed it (a node change, a new
    /// epoch, restore mode). Cheap when nothing changed: no clone.
    fn publish_identity(&mut self) {
        let Some(repo) = self.repo.as_mut() else {
            return;
        };
        let info = repo.info();
        let node = match repo.anchor_ref() {
            Ok(a) => &a.node,
            Err(e) => {
                error!("cannot read the node to publish it: {e}");
                return;
            }
        };
        self.identity.send_if_modified(|cur| {
            if cur.epoch == info.epoch && cur.restore_mode == info.restore_mode && cur.node == *node
            {
                return false;
            }
            cur.epoch = info.epoch;
            cur.restore_mode = info.restore_mode;
            cur.node = node.clone();
            true
        });
    }

    /// The object `oid` first, then objects reachable from it through at
    /// most `depth` references, each once, breadth first, until about
    /// [`MAX_GRAPH_BYTES`] of them are read: a deep read of a large graph
    /// neither holds the storage thread for long nor makes a reply beyond
    /// a client's frame limit (the client reads on from what it got). A
    /// reference to an object that does not exist is skipped (a dangling
    /// reference is the application's business, not a failed read).
    fn read_graph(&self, oid: Oid, depth: u32) -> Result<Vec<StoredObject>> {
        let repo = self.repo()?;
        let first = repo.get(oid)?.ok_or(StorageError::UnknownObject(oid))?;
        let mut seen = HashSet::from([oid]);
        // The first object counts: with it as large as a frame allows, more
        // would make the reply larger than the client accepts.
        let mut bytes = first.value.len() + first.class.len();
        let mut queue = VecDeque::from([(first, 0u32)]);
        let mut out = Vec::new();
        'read: while let Some((obj, level)) = queue.pop_front() {
            let refs = if level < depth {
                references_in(&obj.value)?
            } else {
                Vec::new()
            };
            out.push(obj);
            for r in refs {
                if seen.insert(r) {
                    match repo.get(r)? {
                        Some(child) => {
                            bytes += child.value.len() + child.class.len();
                            if bytes > MAX_GRAPH_BYTES {
                                break 'read;
                            }
                            queue.push_back((child, level + 1));
                        }
                        None => debug!("object {oid} reaches a missing object {r}"),
                    }
                }
            }
        }
        out.extend(queue.into_iter().map(|(obj, _)| obj));
        Ok(out)
    }
}

/// A read to a depth returns the first object, and more only while the
/// objects stay within about this much in all.
pub const MAX_GRAPH_BYTES: usize = 4 << 20;

const CLOSED: &str = "serving a request after the repository was closed";

fn closed() -> StorageError {
    StorageError::io(
        CLOSED,
        std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "the server is shutting down",
        ),
    )
}

/// True for the error every request gets once the repository is closed:
/// the server is stopping, which is not a failure.
pub fn is_closed(err: &StorageError) -> bool {
    matches!(err, StorageError::Io { context, .. } if context == CLOSED)
}

impl Actor for StorageActor {
    type Context = Context<Self>;

    /// Once nobody can send to it any more (the server's event loop is
    /// gone), its thread ends too.
    fn stopped(&mut self, _: &mut Context<Self>) {
        Arbiter::current().stop();
    }
}

/// What a [`Commit`] did.
#[derive(Debug)]
pub enum CommitReply {
    /// Applied now: logged (not yet synced) and visible to reads.
    Applied(Committed),
    /// An earlier commit carried the same idempotency token: nothing was
    /// applied again, `number` is that earlier commit (its new oids and
    /// positions are not remembered). `sync` covers it; `None` means the log
    /// holds nothing written by this process, so it is already on disk.
    Duplicate {
        number: CommitNumber,
        sync: Option<LogSync>,
    },
}

impl CommitReply {
    pub fn number(&self) -> CommitNumber {
        match self {
            CommitReply::Applied(c) => c.number,
            CommitReply::Duplicate { number, .. } => *number,
        }
    }

    pub fn sync(&self) -> Option<&LogSync> {
        match self {
            CommitReply::Applied(c) => Some(&c.sync),
            CommitReply::Duplicate { sync, .. } => sync.as_ref(),
        }
    }
}

/// Apply commits in arrival order, each on its own: one refused (a
/// conflict, a bad request) does not stop the next. A commit whose
/// idempotency token was already committed is not applied again (see
/// [`CommitReply`]). The applied commit number is published once, after
/// the batch. With `flush` set, the batch's newest log handle goes straight
/// to that flusher (the `CommitLogActor`) before the reply, so the fsync
/// starts without a round trip through the sender. Sender: the
/// `CommitCoordinator`, which batches the commits that arrive together so
/// that this thread wakes once per batch; never dropped.
#[derive(Message)]
#[rtype(result = "BatchApplied")]
pub struct CommitBatch {
    pub commits: Vec<CommitRequest>,
    pub flush: Option<Recipient<Flush>>,
}

/// What a [`CommitBatch`] did.
#[derive(MessageResponse)]
pub struct BatchApplied {
    /// One result per commit, in order.
    pub results: Vec<Result<CommitReply, StorageError>>,
    /// The flush started for the batch: the last commit it was asked to
    /// cover, and its answer to come.
    pub flush: Option<(CommitNumber, RecipientRequest<Flush>)>,
}

impl Handler<CommitBatch> for StorageActor {
    type Result = BatchApplied;

    fn handle(&mut self, msg: CommitBatch, _: &mut Context<Self>) -> Self::Result {
        busy_poll::note_activity();
        let unwritten: Vec<_> = msg.commits.into_iter().map(|r| self.commit(r)).collect();
        // One log write for the whole batch; every commit of it is covered
        // by the handle, so nothing leaves this thread unwritten.
        let written = self.repo_mut().and_then(|repo| repo.log_sync());
        if let Err(e) = &written {
            error!("writing a batch of commits to the log failed: {e}");
        }
        self.publish_identity();
        let results: Vec<Result<CommitReply>> = unwritten
            .into_iter()
            .map(|r| match (r?, &written) {
                (Pending::Duplicate { number, sync }, _) => {
                    Ok(CommitReply::Duplicate { number, sync })
                }
                (Pending::Applied(u), Ok(Some(sync))) => {
                    Ok(CommitReply::Applied(u.written(sync.clone())))
                }
                (Pending::Applied(_), Ok(None)) => Err(StorageError::Invalid(
                    "no log segment after a commit was appended".into(),
                )),
                // Applied in memory but not in the log: fatal (the
                // coordinator stops the server), never acknowledged.
                (Pending::Applied(u), Err(e)) => Err(StorageError::io(
                    format!("writing commit {} to the log", u.number),
                    std::io::Error::other(e.to_string()),
                )),
            })
            .collect();
        if let Some(repo) = &self.repo {
            self.publish(repo.info().last_commit);
        }
        let newest = results
            .iter()
            .filter_map(|r| r.as_ref().ok()?.sync())
            .max_by_key(|s| s.upto());
        let flush = match (msg.flush, newest) {
            (Some(flusher), Some(sync)) => {
                let upto = sync.upto();
                Some((upto, flusher.send(Flush { sync: sync.clone() })))
            }
            _ => None,
        };
        BatchApplied { results, flush }
    }
}

/// A commit of a batch before the batch's log write.
enum Pending {
    Applied(Unwritten),
    Duplicate {
        number: CommitNumber,
        sync: Option<LogSync>,
    },
}

impl StorageActor {
    fn commit(&mut self, req: CommitRequest) -> Result<Pending> {
        let repo = self.repo_mut()?;
        if let Some(token) = &req.token {
            if let Some(number) = repo.token_commit(token) {
                debug!("commit token already committed as {number}: not applied again");
                return Ok(Pending::Duplicate {
                    number,
                    sync: repo.log_sync()?,
                });
            }
        }
        Ok(Pending::Applied(repo.commit_unwritten(req)?))
    }
}

/// Apply consecutive records received from the primary (catch-up globs and
/// replicated batches). Records at or below the last applied number are
/// skipped (a resend after a reconnect overlaps). Sender: the replication
/// actors and the `replicate` request. Reply: see [`Applied`].
#[derive(Message)]
#[rtype(result = "Result<Applied, StorageError>")]
pub struct ApplyRecords {
    pub bodies: Vec<Vec<u8>>,
    /// A `replicate` from the primary of this epoch: refused unless the
    /// repository is in restore mode (`NotInRestoreMode`) at an epoch not
    /// newer (`StaleEpoch`). Checked here so the check costs no extra hop.
    pub from_primary: Option<Epoch>,
    /// Start a flush of the batch's newest handle right away (the answer
    /// comes back in [`Applied::flushing`]): one hop less than flushing
    /// after the reply.
    pub flush: Option<Recipient<Flush>>,
}

impl ApplyRecords {
    /// Apply without checks and without starting a flush.
    pub fn plain(bodies: Vec<Vec<u8>>) -> Self {
        ApplyRecords {
            bodies,
            from_primary: None,
            flush: None,
        }
    }
}

/// What [`ApplyRecords`] did.
pub struct Applied {
    /// Last applied commit number.
    pub last: CommitNumber,
    /// Makes what was applied durable (none if nothing was ever written).
    pub sync: Option<LogSync>,
    /// The node after the batch, if the batch changed it.
    pub node_changed: Option<crate::types::Node>,
    /// The flush started for the batch (when asked): its answer to come.
    pub flushing: Option<RecipientRequest<Flush>>,
}

impl std::fmt::Debug for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applied")
            .field("last", &self.last)
            .field("sync", &self.sync)
            .field("node_changed", &self.node_changed)
            .field("flushing", &self.flushing.is_some())
            .finish()
    }
}

impl Handler<ApplyRecords> for StorageActor {
    type Result = Result<Applied, StorageError>;

    fn handle(&mut self, msg: ApplyRecords, _: &mut Context<Self>) -> Self::Result {
        busy_poll::note_activity();
        let repo = self.repo_mut()?;
        if let Some(epoch) = msg.from_primary {
            let info = repo.info();
            if epoch < info.epoch {
                return Err(StorageError::StaleEpoch {
                    number: 0,
                    got: epoch,
                    current: info.epoch,
                });
            }
            if !info.restore_mode {
                return Err(StorageError::NotInRestoreMode);
            }
        }
        let info = repo.info();
        let last = info.last_commit;
        let number_of = |b: &[u8]| crate::storage::record::RecordHead::parse(b).map(|h| h.number);
        // Records already held (a resend overlapping what we have) are
        // skipped, but never taken on trust: answering `applied: last` to
        // a batch of other records than ours would count them as held
        // here. The newest held one must be ours, byte for byte (its hash
        // covers every record before it).
        let newest_held = msg
            .bodies
            .iter()
            .filter_map(|b| Some((number_of(b).ok()?, b)))
            .filter(|(n, _)| *n <= last && *n > 0)
            .max_by_key(|(n, _)| *n);
        if let Some((number, body)) = newest_held {
            let ours = if number == last {
                Some(info.last_hash)
            } else {
                // Beyond the retained log it cannot be compared: the
                // chain check of the next new record still applies.
                repo.read_records(number, 1, 1)
                    .ok()
                    .and_then(|r| r.into_iter().next())
                    .map(|b| crate::storage::record::record_hash(&b))
            };
            if ours.is_some_and(|h| h != crate::storage::record::record_hash(body)) {
                return Err(StorageError::ChainMismatch { number });
            }
        }
        let fresh: Vec<&Vec<u8>> = msg
            .bodies
            .iter()
            .filter(|b| number_of(b).map(|n| n > last).unwrap_or(true))
            .collect();
        let held = last;
        let before = repo.anchor()?.node;
        let applied = repo.apply_records(&fresh);
        let last = repo.info().last_commit;
        let sync = repo.log_sync()?;
        let after = repo.anchor()?.node;
        self.publish(last);
        self.publish_identity();
        if let Err(e) = applied {
            // The records before the refused one stay applied: report them
            // (a node change among them included, or nobody would learn
            // it). The refused one gets its error when it is sent again.
            if e.is_fatal() || last == held {
                return Err(e);
            }
            debug!("applied records up to {last}; the next one is refused: {e}");
        }
        let flushing = match (msg.flush, &sync) {
            (Some(flusher), Some(sync)) => Some(flusher.send(Flush { sync: sync.clone() })),
            _ => None,
        };
        Ok(Applied {
            last,
            sync,
            node_changed: (after != before).then_some(after),
            flushing,
        })
    }
}

/// Record bodies from `from` on, bounded by count and bytes (catch-up and
/// re-sends). Sender: `catch_up` requests and `BroadcastActor`s.
#[derive(Message)]
#[rtype(result = "Result<Vec<Vec<u8>>, StorageError>")]
pub struct ReadRecords {
    pub from: CommitNumber,
    pub max_count: usize,
    pub max_bytes: usize,
}

impl Handler<ReadRecords> for StorageActor {
    type Result = Result<Vec<Vec<u8>>, StorageError>;

    fn handle(&mut self, msg: ReadRecords, _: &mut Context<Self>) -> Self::Result {
        busy_poll::note_activity();
        self.repo_mut()?
            .read_records(msg.from, msg.max_count, msg.max_bytes)
    }
}

/// The commit that carried an idempotency token, if remembered. Sender:
/// `commit_status` requests.
#[derive(Message)]
#[rtype(result = "Result<Option<CommitNumber>, StorageError>")]
pub struct TokenCommit {
    pub token: Vec<u8>,
}

impl Handler<TokenCommit> for StorageActor {
    type Result = Result<Option<CommitNumber>, StorageError>;

    fn handle(&mut self, msg: TokenCommit, _: &mut Context<Self>) -> Self::Result {
        Ok(self.repo()?.token_commit(&msg.token))
    }
}

/// The chain hash of record `number` (genesis for 0). Sender: peers
/// checking whether one log is a prefix of another.
#[derive(Message)]
#[rtype(result = "Result<Hash, StorageError>")]
pub struct RecordHashOf {
    pub number: CommitNumber,
}

impl Handler<RecordHashOf> for StorageActor {
    type Result = Result<Hash, StorageError>;

    fn handle(&mut self, msg: RecordHashOf, _: &mut Context<Self>) -> Self::Result {
        let repo = self.repo_mut()?;
        let info = repo.info();
        if msg.number == 0 {
            return Ok(crate::storage::record::GENESIS_HASH);
        }
        if msg.number == info.last_commit {
            return Ok(info.last_hash);
        }
        let body = repo
            .read_records(msg.number, 1, 1)?
            .into_iter()
            .next()
            .ok_or(StorageError::BeyondEnd {
                requested: msg.number,
                last: info.last_commit,
            })?;
        Ok(crate::storage::record::record_hash(&body))
    }
}

/// Keep log records from `from` on for catch-up (within the log bound).
/// Sender: the `NodeSupervisor`; may be dropped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RetainFrom {
    pub from: CommitNumber,
}

impl Handler<RetainFrom> for StorageActor {
    type Result = ();

    fn handle(&mut self, msg: RetainFrom, _: &mut Context<Self>) {
        if let Ok(repo) = self.repo_mut() {
            let _ = repo.retain_from(msg.from);
        }
    }
}

/// Leave restore mode (promotion) or enter it. Sender: the `NodeSupervisor`.
#[derive(Message)]
#[rtype(result = "Result<(), StorageError>")]
pub struct SetRestoreMode {
    pub on: bool,
}

impl Handler<SetRestoreMode> for StorageActor {
    type Result = Result<(), StorageError>;

    fn handle(&mut self, msg: SetRestoreMode, _: &mut Context<Self>) -> Self::Result {
        let done = self.repo_mut()?.set_restore_mode(msg.on);
        self.publish_identity();
        done
    }
}

/// Read an object and those reachable from it to `depth` (see
/// `read_graph`). Sender: sessions.
#[derive(Message)]
#[rtype(result = "Result<Vec<StoredObject>, StorageError>")]
pub struct ReadObject {
    pub oid: Oid,
    pub depth: u32,
}

impl Handler<ReadObject> for StorageActor {
    type Result = Result<Vec<StoredObject>, StorageError>;

    fn handle(&mut self, msg: ReadObject, _: &mut Context<Self>) -> Self::Result {
        busy_poll::note_activity();
        self.read_graph(msg.oid, msg.depth)
    }
}

/// The user's domain root (if set) and the objects read from it to `depth`.
/// Sender: sessions.
#[derive(Message)]
#[rtype(result = "Result<(Option<Oid>, Vec<StoredObject>), StorageError>")]
pub struct ReadRoot {
    pub depth: u32,
}

impl Handler<ReadRoot> for StorageActor {
    type Result = Result<(Option<Oid>, Vec<StoredObject>), StorageError>;

    fn handle(&mut self, msg: ReadRoot, _: &mut Context<Self>) -> Self::Result {
        busy_poll::note_activity();
        match self.repo_mut()?.anchor()?.root {
            Some(root) => Ok((Some(root), self.read_graph(root, msg.depth)?)),
            None => Ok((None, Vec::new())),
        }
    }
}

/// The length of a large collection and up to `count` of its encoded
/// elements from `start`, past the first no more than about `max_bytes`.
/// Sender: sessions.
#[derive(Message)]
#[rtype(result = "Result<(u64, Vec<Vec<u8>>), StorageError>")]
pub struct CollectionRange {
    pub coll: Oid,
    pub start: u64,
    pub count: u64,
    pub max_bytes: u64,
}

impl Handler<CollectionRange> for StorageActor {
    type Result = Result<(u64, Vec<Vec<u8>>), StorageError>;

    fn handle(&mut self, msg: CollectionRange, _: &mut Context<Self>) -> Self::Result {
        busy_poll::note_activity();
        self.repo_mut()?
            .collection_page(msg.coll, msg.start, msg.count, msg.max_bytes)
    }
}

/// The length of a large collection. Sender: sessions.
#[derive(Message)]
#[rtype(result = "Result<u64, StorageError>")]
pub struct CollectionLength {
    pub coll: Oid,
}

impl Handler<CollectionLength> for StorageActor {
    type Result = Result<u64, StorageError>;

    fn handle(&mut self, msg: CollectionLength, _: &mut Context<Self>) -> Self::Result {
        busy_poll::note_activity();
        self.repo()?.collection_len(msg.coll)
    }
}

/// A user meta attribute of the repository definition (encoded value), or
/// `None` if unset. Sender: sessions.
#[derive(Message)]
#[rtype(result = "Result<Option<Vec<u8>>, StorageError>")]
pub struct GetMeta {
    pub key: String,
}

impl Handler<GetMeta> for StorageActor {
    type Result = Result<Option<Vec<u8>>, StorageError>;

    fn handle(&mut self, msg: GetMeta, _: &mut Context<Self>) -> Self::Result {
        busy_poll::note_activity();
        let anchor = self.repo_mut()?.anchor()?;
        Ok(anchor
            .meta
            .into_iter()
            .find(|(k, _)| *k == msg.key)
            .map(|(_, v)| v))
    }
}

/// Primitive facts about the repository. Sender: sessions (hello, status).
#[derive(Message)]
#[rtype(result = "Result<RepoInfo, StorageError>")]
pub struct GetInfo;

impl Handler<GetInfo> for StorageActor {
    type Result = Result<RepoInfo, StorageError>;

    fn handle(&mut self, _: GetInfo, _: &mut Context<Self>) -> Self::Result {
        Ok(self.repo()?.info())
    }
}

/// The decoded root anchor (root, repository id, node, meta). Sender:
/// sessions (hello, node, status).
#[derive(Message)]
#[rtype(result = "Result<Anchor, StorageError>")]
pub struct GetAnchor;

impl Handler<GetAnchor> for StorageActor {
    type Result = Result<Anchor, StorageError>;

    fn handle(&mut self, _: GetAnchor, _: &mut Context<Self>) -> Self::Result {
        self.repo_mut()?.anchor()
    }
}

/// Keep the storage thread busy until `release` yields (or is dropped),
/// after saying so on `holding`: what a long digest or snapshot does.
/// Sender: tests.
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
pub struct Hold {
    pub holding: crossbeam_channel::Sender<()>,
    pub release: crossbeam_channel::Receiver<()>,
}

#[cfg(test)]
impl Handler<Hold> for StorageActor {
    type Result = ();

    fn handle(&mut self, msg: Hold, _: &mut Context<Self>) {
        let _ = msg.holding.send(());
        let _ = msg.release.recv_timeout(std::time::Duration::from_secs(60));
    }
}

/// A view that computes the content digest as of the last commit on any
/// thread (`storage::digest`): this thread only checkpoints and pins the
/// index (the view copies it), so a digest of a large repository holds up
/// commits and reads no longer than a checkpoint does (which may wait for
/// an earlier snapshot's or digest's copy, `storage::index_copy`). Sender:
/// sessions.
#[derive(Message)]
#[rtype(result = "Result<DigestView, StorageError>")]
pub struct Digest;

impl Handler<Digest> for StorageActor {
    type Result = Result<DigestView, StorageError>;

    fn handle(&mut self, _: Digest, _: &mut Context<Self>) -> Self::Result {
        let started = std::time::Instant::now();
        let view = self.repo_mut()?.digest_view()?;
        // Commits and reads wait meanwhile, as for a checkpoint.
        info!(
            "digest of commit {} prepared (checkpoint) in {:.1} ms",
            view.commit(),
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(view)
    }
}

/// Checkpoint if enough log was written since the last one; `true` if one
/// was written. Sender: the `Controller`'s timer (one in flight at a time).
#[derive(Message)]
#[rtype(result = "Result<bool, StorageError>")]
pub struct Checkpoint;

impl Handler<Checkpoint> for StorageActor {
    type Result = Result<bool, StorageError>;

    fn handle(&mut self, _: Checkpoint, _: &mut Context<Self>) -> Self::Result {
        let repo = self.repo_mut()?;
        let started = std::time::Instant::now();
        let written = repo.maybe_checkpoint()?;
        if written {
            // Commits and reads wait meanwhile: the time is worth seeing.
            info!(
                "checkpoint written at commit {} in {:.1} ms",
                repo.info().last_commit,
                started.elapsed().as_secs_f64() * 1000.0
            );
        }
        Ok(written)
    }
}

/// Checkpoint and capture a point-in-time snapshot for a backup. The index
/// is only pinned here: the sender completes the snapshot
/// ([`PendingSnapshot::complete`], the index copy into `scratch`) on a
/// blocking thread, so commits and reads do not wait for that copy (only
/// a checkpoint that cannot be put off does: see `storage::index_copy`). The
/// other files are prefixes commits never rewrite, so their copy runs
/// while commits go on. Sender: the `BackupActor`; never dropped.
#[derive(Message)]
#[rtype(result = "Result<PendingSnapshot, StorageError>")]
pub struct TakeSnapshot {
    pub scratch: std::path::PathBuf,
}

impl Handler<TakeSnapshot> for StorageActor {
    type Result = Result<PendingSnapshot, StorageError>;

    fn handle(&mut self, msg: TakeSnapshot, _: &mut Context<Self>) -> Self::Result {
        let started = std::time::Instant::now();
        let snapshot = self.repo_mut()?.snapshot_deferred(&msg.scratch)?;
        info!(
            "snapshot taken at commit {} for a backup in {:.1} ms (the index is copied apart)",
            snapshot.commit(),
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(snapshot)
    }
}

/// The backup of the snapshot taken at `snapshot_commit` ended (`None`:
/// it failed to start): the log is kept for the newest completed backup
/// (see `Repository::backup_ended`). Sender: the `BackupActor`; may be
/// dropped (the log is then kept longer, within its bound).
#[derive(Message)]
#[rtype(result = "()")]
pub struct BackupEnded {
    pub snapshot_commit: Option<CommitNumber>,
    pub completed: bool,
}

impl Handler<BackupEnded> for StorageActor {
    type Result = ();

    fn handle(&mut self, msg: BackupEnded, _: &mut Context<Self>) {
        if let Ok(repo) = self.repo_mut() {
            repo.backup_ended(msg.snapshot_commit, msg.completed);
        }
    }
}

/// Close the repository, releasing its lock; with `save`, write a final
/// checkpoint first. Every later request fails. Sender: the `Controller`,
/// after the commit pipeline drained (so the log is already synced).
#[derive(Message)]
#[rtype(result = "Result<CommitNumber, StorageError>")]
pub struct Close {
    pub save: bool,
}

impl Handler<Close> for StorageActor {
    type Result = Result<CommitNumber, StorageError>;

    fn handle(&mut self, msg: Close, _: &mut Context<Self>) -> Self::Result {
        let Some(mut repo) = self.repo.take() else {
            return Err(closed());
        };
        let last = repo.info().last_commit;
        if msg.save {
            if let Err(e) = repo.checkpoint() {
                warn!("final checkpoint failed: {e}");
                return Err(e);
            }
            info!("final checkpoint written at commit {last}");
        } else {
            info!("closing without a final checkpoint at commit {last}; the log will be replayed on start");
        }
        drop(repo);
        Ok(last)
    }
}
