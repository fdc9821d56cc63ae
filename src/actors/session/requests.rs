//! The answer to each request kind, as a future over other actors' replies.
//!
//! These functions hold no session state: they take the shared
//! [`SessionEnv`] and return the response body or the `WireError` to send.
//! Every storage failure goes through `convert::wire_error`; a fatal one is
//! also reported to the `Controller`, which stops the server.

use std::sync::Arc;
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;
use tokio::sync::oneshot;

use crate::actors::controller::Fatal;
use crate::actors::convert::{commit_request, mailbox_error, wire_error, wire_objects, wire_value};
use crate::actors::coordinator::{self, AwaitAcknowledgeable, NoteReplicated, QueueCommit};
use crate::actors::session::connection::{clipped, SessionEnv, MAX_ECHO};
use crate::actors::storage::{
    is_closed, Applied, ApplyRecords, CollectionLength, CollectionRange, Digest, GetMeta,
    ReadObject, ReadRecords, ReadRoot, RecordHashOf, StorageActor, TokenCommit,
};
use crate::actors::supervisor::{
    CommitAtSecondary, Complaint, FollowPrimary, GetMembers, HandOverTo, Leave, NeedResync,
    PeerCatchingUp, PeerCaughtUp, PromoteIfOrphaned, RemoveMember,
    Replicated as SupervisorReplicated, StreamDiverged, TakeOverNow,
};
use crate::protocol::{
    CommitBody, MemberStatus, ReplicateAck, ResponseBody, ServerRole, SessionRole, StatusReport,
    WireError, PROTOCOL_VERSION,
};
use crate::storage::StorageError;
use crate::types::{hex, CommitNumber, Epoch, Oid};

type Answer = Result<ResponseBody, WireError>;

/// Most elements one `collection_range` reply carries; a client pages on.
pub const MAX_RANGE: u64 = 65_536;
/// A `collection_range` reply carries its first element, and more only
/// while their data stays within this much in all, so that it stays below
/// any client's frame limit (16 MiB by default) and one request cannot
/// make the storage thread read gigabytes of large elements.
pub const MAX_RANGE_BYTES: u64 = 4 << 20;

/// Ask the storage actor; map its error once, reporting fatal ones.
async fn ask<M, T>(env: &SessionEnv, msg: M) -> Result<T, WireError>
where
    M: Message<Result = Result<T, StorageError>> + Send + 'static,
    T: Send + 'static,
    StorageActor: Handler<M>,
    <StorageActor as Actor>::Context: ToEnvelope<StorageActor, M>,
{
    match env.storage.send(msg).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(storage_refused(env, e)),
        Err(e) => Err(mailbox_error("the storage actor", e)),
    }
}

/// The answer to a read that storage failed; a fatal failure (damage, I/O
/// on the live repository) also stops the server.
fn storage_refused(env: &SessionEnv, e: StorageError) -> WireError {
    if is_closed(&e) {
        return WireError::ShuttingDown;
    }
    if e.is_fatal() {
        env.fatal.do_send(Fatal {
            reason: format!("storage failed serving a read: {e}"),
        });
    }
    wire_error(&e)
}

/// May this server answer a read: not while deposed (its data may not be
/// the node's: it may hold commits the node does not, or lack the newest
/// ones); then wait (bounded by `progress_wait`) until it applied
/// `required`.
async fn reach(env: &SessionEnv, required: Option<CommitNumber>) -> Result<(), WireError> {
    let state = env.state.borrow().clone();
    if state.role == ServerRole::Deposed {
        return Err(WireError::Unavailable {
            reason: format!(
                "this server is deposed and serves no reads ({}); read from another member",
                state
                    .note
                    .as_deref()
                    .unwrap_or("its data may not be the node's")
            ),
        });
    }
    let Some(required) = required else {
        return Ok(());
    };
    let mut applied = env.applied.clone();
    let wait = async move { applied.wait_for(|c| *c >= required).await.is_ok() };
    match tokio::time::timeout(env.settings.progress_wait, wait).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(WireError::ShuttingDown),
        Err(_) => Err(WireError::Behind {
            commit: *env.applied.borrow(),
            required,
        }),
    }
}

/// The role the `NodeSupervisor` publishes; before it has (start-up), what
/// the repository itself says.
fn server_role(env: &SessionEnv, restore_mode: bool) -> ServerRole {
    let state = env.state.borrow();
    match (state.role, restore_mode) {
        (ServerRole::Restore, false) => ServerRole::Primary,
        (role, _) => role,
    }
}

/// Until the supervisor has decided this server's role (it reads the node
/// at start), no role we could name is true: wait for it, boundedly.
async fn role_decided(env: &SessionEnv) {
    let mut state = env.state.clone();
    let decided = tokio::time::timeout(ROLE_WAIT, state.wait_for(|s| !s.starting)).await;
    if decided.is_err() {
        log::warn!("no role decided {ROLE_WAIT:?} after start; answering as the repository says");
    }
}

/// How long a hello at start-up waits for the role.
const ROLE_WAIT: Duration = Duration::from_secs(10);

/// Answered from the published identity, never through the storage thread:
/// peers take a hello that does not come within their ping timeout for a
/// dead server (see the `storage` module doc). A peer's hello never waits
/// for the role either: two former primaries restarting together ask each
/// other before deciding, and each must hear the other's epoch at once
/// (waiting, both would time out and both serve as primary). Clients wait,
/// so they never commit to a server that does not lead yet.
pub(super) async fn hello(env: Arc<SessionEnv>, role: SessionRole) -> Answer {
    if role != SessionRole::Peer {
        role_decided(&env).await;
    }
    let id = env.identity.borrow().clone();
    Ok(ResponseBody::Hello {
        protocol_version: PROTOCOL_VERSION,
        server_id: id.server_id,
        repository_id: id.repository_id.to_string(),
        role: server_role(&env, id.restore_mode),
        node: id.node,
        epoch: id.epoch,
    })
}

pub(super) async fn node(env: Arc<SessionEnv>) -> Answer {
    role_decided(&env).await;
    let id = env.identity.borrow().clone();
    Ok(ResponseBody::Node {
        role: server_role(&env, id.restore_mode),
        node: id.node,
        epoch: id.epoch,
    })
}

pub(super) async fn read(
    env: Arc<SessionEnv>,
    oid: Oid,
    depth: u32,
    required: Option<CommitNumber>,
) -> Answer {
    reach(&env, required).await?;
    let objects = ask(&env, ReadObject { oid, depth }).await?;
    Ok(ResponseBody::Objects {
        objects: wire_objects(objects)?,
    })
}

pub(super) async fn read_root(
    env: Arc<SessionEnv>,
    depth: u32,
    required: Option<CommitNumber>,
) -> Answer {
    reach(&env, required).await?;
    let (root, objects) = ask(&env, ReadRoot { depth }).await?;
    Ok(ResponseBody::Root {
        root,
        objects: wire_objects(objects)?,
    })
}

pub(super) async fn collection_length(
    env: Arc<SessionEnv>,
    coll: Oid,
    required: Option<CommitNumber>,
) -> Answer {
    reach(&env, required).await?;
    let len = ask(&env, CollectionLength { coll }).await?;
    Ok(ResponseBody::Length { len })
}

pub(super) async fn collection_range(
    env: Arc<SessionEnv>,
    coll: Oid,
    start: u64,
    count: u64,
    required: Option<CommitNumber>,
) -> Answer {
    reach(&env, required).await?;
    let (len, raw) = ask(
        &env,
        CollectionRange {
            coll,
            start,
            count: count.min(MAX_RANGE),
            max_bytes: MAX_RANGE_BYTES,
        },
    )
    .await?;
    let values = raw
        .iter()
        .enumerate()
        .map(|(i, v)| wire_value(&format!("element {} of {coll}", start + i as u64), v))
        .collect::<Result<_, _>>()?;
    Ok(ResponseBody::Elements {
        start,
        values,
        len: Some(len),
    })
}

pub(super) async fn meta(
    env: Arc<SessionEnv>,
    key: String,
    required: Option<CommitNumber>,
) -> Answer {
    reach(&env, required).await?;
    let what = format!("meta attribute {key:?}");
    let value = ask(&env, GetMeta { key }).await?;
    Ok(ResponseBody::Meta {
        value: value.map(|v| wire_value(&what, &v)).transpose()?,
    })
}

/// A request for the primary reached this secondary. The seed's rule: ping
/// the primary; if it is gone, the successor takes over. `Ok` when this
/// server is (now) the primary and may answer; else where to go instead.
async fn orphan_check(env: &SessionEnv) -> Result<(), WireError> {
    env.node
        .send(CommitAtSecondary)
        .await
        .map_err(|e| mailbox_error("the node supervisor", e))?
}

pub(super) async fn commit(env: Arc<SessionEnv>, body: CommitBody) -> Answer {
    let role = env.state.borrow().role;
    match role {
        ServerRole::Primary => {}
        ServerRole::Restore => return Err(WireError::RestoreMode),
        ServerRole::Secondary => orphan_check(&env).await?,
        _ => {
            return Err(WireError::WrongServer {
                primary: env.state.borrow().primary.clone(),
            })
        }
    }
    let request = commit_request(body)?;
    // The coordinator stops only once drained for shutdown.
    if !env.commits.connected() {
        return Err(WireError::ShuttingDown);
    }
    let (reply, answer) = oneshot::channel();
    env.commits.do_send(QueueCommit { request, reply });
    let ack = answer
        .await
        .unwrap_or_else(|_| Err(coordinator::stopped()))?;
    Ok(ResponseBody::Committed {
        number: ack.number,
        new_oids: ack.new_oids,
        positions: ack.positions,
    })
}

pub(super) async fn status(env: Arc<SessionEnv>) -> Answer {
    // From what the storage actor publishes, not a request to its thread:
    // status answers while that thread is busy (a checkpoint, a long
    // read), and a monitor polling it often takes no turn from commits.
    let identity = env.identity.borrow().clone();
    let last_commit = *env.applied.borrow();
    let role = server_role(&env, identity.restore_mode);
    let mut members: Vec<MemberStatus> = env
        .node
        .send(GetMembers)
        .await
        .map_err(|e| mailbox_error("the node supervisor", e))?;
    for m in &mut members {
        if m.addr == env.settings.advertise {
            m.role = role;
            m.commit = last_commit;
        }
    }
    let s = &env.settings;
    Ok(ResponseBody::Status(StatusReport {
        role,
        commit: last_commit,
        epoch: identity.epoch,
        repository: identity.repository_id.to_string(),
        server_id: identity.server_id,
        addr: s.advertise.clone(),
        // Promotion by majority (witnesses) is not in this release.
        partition_safe: false,
        members,
        backup: super::backup::report(&env).await?,
        flush: s.flush.to_string(),
        sync_replicas: s.sync_replicas,
    }))
}

pub(super) async fn digest(env: Arc<SessionEnv>) -> Answer {
    // The storage thread only checkpoints and pins the index; the index
    // copy and the graph are read on a blocking-pool thread, so commits
    // and reads go on.
    let view = ask(&env, Digest).await?;
    let (commit, digest) = actix_rt::task::spawn_blocking(move || view.digest())
        .await
        .map_err(|e| WireError::Internal {
            reason: format!("the digest task failed: {e}"),
        })?
        .map_err(|e| storage_refused(&env, e))?;
    Ok(ResponseBody::Digest {
        commit,
        digest: hex(&digest),
    })
}

/// A client could not reach `addr`: a hint, checked by the primary.
pub(super) async fn complain(env: Arc<SessionEnv>, addr: String) -> Answer {
    env.node.do_send(Complaint { addr });
    Ok(ResponseBody::Ok)
}

/// What a catching-up server asks for.
pub(super) struct CatchUpAsk {
    pub from: CommitNumber,
    pub max_count: u32,
    pub max_bytes: u64,
    pub server_id: u64,
    pub addr: String,
    pub repository_id: String,
    pub for_promotion: bool,
}

/// Serve a glob of records to a catching-up server; when it brings the
/// server level, tell the supervisor, which adds it to the node.
pub(super) async fn catch_up(env: Arc<SessionEnv>, ask_: CatchUpAsk) -> Answer {
    let is_primary = env.state.borrow().role == ServerRole::Primary;
    if !is_primary && !ask_.for_promotion {
        if env.state.borrow().changing_role {
            // Taking over, perhaps from the very server asking: naming the
            // primary it replaces would send that server back to itself.
            return Err(WireError::Unavailable {
                reason: "this server is changing role; retry".into(),
            });
        }
        return Err(WireError::WrongServer {
            primary: env.state.borrow().primary.clone(),
        });
    }
    // What the storage actor publishes, as of before the records are read
    // (as the request to its thread this replaces was).
    let (ours, epoch) = {
        let identity = env.identity.borrow();
        (identity.repository_id.to_string(), identity.epoch)
    };
    if ask_.repository_id != ours {
        return Err(WireError::RepositoryMismatch {
            expected: ours,
            got: clipped(&ask_.repository_id, MAX_ECHO),
        });
    }
    let records = ask(
        &env,
        ReadRecords {
            from: ask_.from,
            max_count: (ask_.max_count as usize).clamp(1, 100_000),
            max_bytes: (ask_.max_bytes as usize).clamp(1, 64 << 20),
        },
    )
    .await?;
    // Level: nothing after these (the last is what we have applied).
    let end = ask_.from + records.len() as u64;
    let last = *env.applied.borrow();
    let level = end > last;
    if ask_.for_promotion {
        // A successor pulling before it promotes: not a joining server.
    } else if level {
        env.node.do_send(PeerCaughtUp {
            server_id: ask_.server_id,
            addr: ask_.addr,
            next: end,
        });
    } else {
        env.node.do_send(PeerCatchingUp {
            server_id: ask_.server_id,
            from: ask_.from,
        });
    }
    Ok(ResponseBody::Records {
        records: records
            .into_iter()
            .map(serde_bytes::ByteBuf::from)
            .collect(),
        last,
        epoch,
        level,
    })
}

/// Apply a batch the primary streams (or a heartbeat), make it durable
/// (before answering with `ack: durable`, after it with `ack: applied`),
/// and say how far this server is.
///
/// Not `async`: the records go to the storage actor when this is called,
/// not when the answer is first polled, so batches a primary pipelines on
/// one connection are applied in the order they came.
pub(super) fn replicate(
    env: Arc<SessionEnv>,
    epoch: Epoch,
    records: Vec<serde_bytes::ByteBuf>,
    primary_last: CommitNumber,
    ack: ReplicateAck,
) -> impl std::future::Future<Output = Answer> {
    let bodies: Vec<Vec<u8>> = records.into_iter().map(|b| b.into_vec()).collect();
    // The storage actor checks epoch and restore mode and, when the answer
    // waits for durability, starts the fsync itself: one hop to it and one
    // answer from the flusher, nothing more. The fsync covers everything
    // written so far, so a `durable` heartbeat also makes earlier batches
    // acknowledged as `applied` durable.
    let apply = ApplyRecords {
        bodies,
        from_primary: Some(epoch),
        flush: (ack == ReplicateAck::Durable).then(|| env.flusher.clone().recipient()),
    };
    let applying = env.storage.send(apply);
    async move { replicated(env, applying.await, primary_last, ack).await }
}

async fn replicated(
    env: Arc<SessionEnv>,
    applied: Result<Result<Applied, StorageError>, MailboxError>,
    primary_last: CommitNumber,
    ack: ReplicateAck,
) -> Answer {
    let applied = match applied {
        Ok(Ok(a)) => a,
        // A primary takes records from nobody.
        Ok(Err(StorageError::NotInRestoreMode)) => {
            return Err(WireError::WrongServer {
                primary: Some(env.settings.advertise.clone()),
            })
        }
        Ok(Err(StorageError::OutOfSequence { expected, .. })) => {
            env.node.do_send(NeedResync);
            return Err(WireError::Resend { from: expected });
        }
        Ok(Err(StorageError::ChainMismatch { number })) => {
            // This copy holds records the node does not: it must stop
            // serving them, not only refuse the primary's.
            env.node.do_send(StreamDiverged { number });
            return Err(WireError::Diverged { number });
        }
        Ok(Err(StorageError::StaleEpoch { got, current, .. })) => {
            return Err(WireError::StaleEpoch { got, current })
        }
        Ok(Err(e)) => {
            if e.is_fatal() && !is_closed(&e) {
                // Logged records half applied, or the disk failing: this
                // copy must not acknowledge anything more.
                env.fatal.do_send(Fatal {
                    reason: format!("applying replicated records failed: {e}"),
                });
            }
            return Err(wire_error(&e));
        }
        Err(e) => return Err(mailbox_error("the storage actor", e)),
    };
    let durable = match applied.flushing {
        // The coordinator flushes under our policy; what is durable so far
        // is what the commit-log actor last published.
        None if ack == ReplicateAck::Applied => {
            env.durability
                .do_send(NoteReplicated { sync: applied.sync });
            *env.durable.borrow()
        }
        Some(flushing) => flushing
            .await
            .map_err(|e| mailbox_error("the commit-log actor", e))?
            .map_err(|e| {
                env.fatal.do_send(Fatal {
                    reason: format!("fsync of replicated records failed: {e}"),
                });
                WireError::Internal {
                    reason: format!("fsync failed: {e}"),
                }
            })?,
        // Nothing was ever written by this process: what it holds was on
        // disk when it started.
        None => applied.last,
    };
    env.node.do_send(SupervisorReplicated {
        applied: applied.last,
        primary_last,
        node_changed: applied.node_changed,
    });
    Ok(ResponseBody::Replicated {
        applied: applied.last,
        durable: durable.min(applied.last),
    })
}

/// beWarmBackupFor: follow `primary`.
pub(super) async fn follow(env: Arc<SessionEnv>, primary: String) -> Answer {
    env.node
        .send(FollowPrimary { primary })
        .await
        .map_err(|e| mailbox_error("the node supervisor", e))??;
    Ok(ResponseBody::Ok)
}

/// removeWarmBackup: remove a secondary from the node.
pub(super) async fn remove(env: Arc<SessionEnv>, addr: String) -> Answer {
    env.node
        .send(RemoveMember { addr })
        .await
        .map_err(|e| mailbox_error("the node supervisor", e))??;
    Ok(ResponseBody::Ok)
}

/// Was a commit with this token applied? (resolves an unknown outcome)
///
/// Asked most when the primary died with the commit in flight, so a
/// secondary does what a commit at a secondary does: the orphan check,
/// answering itself once it is primary.
pub(super) async fn commit_status(env: Arc<SessionEnv>, token: Vec<u8>) -> Answer {
    let role = env.state.borrow().role;
    match role {
        ServerRole::Primary => {}
        ServerRole::Secondary => orphan_check(&env).await?,
        _ => {
            return Err(WireError::WrongServer {
                primary: env.state.borrow().primary.clone(),
            })
        }
    }
    let number = ask(&env, TokenCommit { token }).await?;
    if let Some(n) = number {
        // Applied is not enough: a commit told to exist must survive this
        // primary's kill -9, as an acknowledged one does.
        env.acknowledgeable
            .send(AwaitAcknowledgeable { number: n })
            .await
            .map_err(|e| mailbox_error("the commit coordinator", e))??;
    }
    Ok(ResponseBody::TokenStatus { number })
}

/// The chain hash of one record (prefix checks by a rejoining server).
pub(super) async fn record_hash(env: Arc<SessionEnv>, number: CommitNumber) -> Answer {
    let hash = ask(&env, RecordHashOf { number }).await?;
    Ok(ResponseBody::RecordHash {
        number,
        hash: hash.to_vec(),
    })
}

/// Another secondary names this server the successor of a failed primary.
pub(super) async fn promote(env: Arc<SessionEnv>) -> Answer {
    env.node
        .send(PromoteIfOrphaned)
        .await
        .map_err(|e| mailbox_error("the node supervisor", e))??;
    Ok(ResponseBody::Ok)
}

/// A secondary taking over asks this primary to drain to it.
pub(super) async fn hand_over(env: Arc<SessionEnv>, server_id: u64) -> Answer {
    let last = env
        .node
        .send(HandOverTo { server_id })
        .await
        .map_err(|e| mailbox_error("the node supervisor", e))??;
    Ok(ResponseBody::HandedOver { last })
}

/// A secondary stops on purpose.
pub(super) async fn leaving(env: Arc<SessionEnv>, server_id: u64) -> Answer {
    env.node.do_send(Leave { server_id });
    Ok(ResponseBody::Ok)
}

/// takeOverAsPrimary (admin, on a current secondary).
pub(super) async fn take_over(env: Arc<SessionEnv>) -> Answer {
    env.node
        .send(TakeOverNow)
        .await
        .map_err(|e| mailbox_error("the node supervisor", e))??;
    Ok(ResponseBody::Ok)
}
