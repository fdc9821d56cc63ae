//! The answer to each request kind, as a future over other actors' replies.
//!
//! These functions hold no session state: they take the shared
//! [`SessionEnv`] and return the response body or the `WireError` to send.
//! Every storage failure goes through `convert::wire_error`; a fatal one is
//! also reported to the `Controller`, which stops the server.

use std::sync::Arc;

use actix::dev::ToEnvelope;
use actix::prelude::*;

use crate::actors::controller::Fatal;
use crate::actors::convert::{commit_request, mailbox_error, wire_error, wire_objects, wire_value};
use crate::actors::coordinator::SubmitCommit;
use crate::actors::session::connection::SessionEnv;
use crate::actors::storage::{
    is_closed, CollectionLength, CollectionRange, Digest, GetAnchor, GetInfo, GetMeta, ReadObject,
    ReadRoot, StorageActor,
};
use crate::protocol::{
    CommitBody, MemberStatus, ResponseBody, ServerRole, StatusReport, WireError, PROTOCOL_VERSION,
};
use crate::storage::{RepoInfo, StorageError};
use crate::types::{hex, CommitNumber, MemberRole, Oid};

type Answer = Result<ResponseBody, WireError>;

/// Most elements one `collection_range` reply carries; a client pages on.
pub const MAX_RANGE: u64 = 65_536;

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
        Ok(Err(e)) if is_closed(&e) => Err(WireError::ShuttingDown),
        Ok(Err(e)) => {
            if e.is_fatal() {
                env.fatal.do_send(Fatal {
                    reason: format!("storage failed serving a read: {e}"),
                });
            }
            Err(wire_error(&e))
        }
        Err(e) => Err(mailbox_error("the storage actor", e)),
    }
}

/// Wait (bounded by `progress_wait`) until the server applied `required`.
async fn reach(env: &SessionEnv, required: Option<CommitNumber>) -> Result<(), WireError> {
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

fn server_role(info: &RepoInfo) -> ServerRole {
    if info.restore_mode {
        ServerRole::Restore
    } else {
        ServerRole::Primary
    }
}

fn member_role(role: MemberRole) -> ServerRole {
    match role {
        MemberRole::Primary => ServerRole::Primary,
        MemberRole::Secondary => ServerRole::Secondary,
        MemberRole::Witness => ServerRole::Witness,
    }
}

pub(super) async fn hello(env: Arc<SessionEnv>) -> Answer {
    let info = ask(&env, GetInfo).await?;
    let anchor = ask(&env, GetAnchor).await?;
    Ok(ResponseBody::Hello {
        protocol_version: PROTOCOL_VERSION,
        server_id: info.server_id,
        repository_id: info.repository_id.to_string(),
        role: server_role(&info),
        node: anchor.node,
        epoch: info.epoch,
    })
}

pub(super) async fn node(env: Arc<SessionEnv>) -> Answer {
    let info = ask(&env, GetInfo).await?;
    let anchor = ask(&env, GetAnchor).await?;
    Ok(ResponseBody::Node {
        node: anchor.node,
        epoch: info.epoch,
        role: server_role(&info),
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
    let count = count.min(MAX_RANGE);
    let raw = ask(&env, CollectionRange { coll, start, count }).await?;
    let values = raw
        .iter()
        .enumerate()
        .map(|(i, v)| wire_value(&format!("element {} of {coll}", start + i as u64), v))
        .collect::<Result<_, _>>()?;
    Ok(ResponseBody::Elements { start, values })
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

pub(super) async fn commit(env: Arc<SessionEnv>, body: CommitBody) -> Answer {
    let req = commit_request(body)?;
    let ack = env
        .commits
        .send(SubmitCommit(req))
        .await
        // The coordinator stops only once drained for shutdown.
        .map_err(|_| WireError::ShuttingDown)??;
    Ok(ResponseBody::Committed {
        number: ack.number,
        new_oids: ack.new_oids,
        positions: ack.positions,
    })
}

pub(super) async fn status(env: Arc<SessionEnv>) -> Answer {
    let info = ask(&env, GetInfo).await?;
    let anchor = ask(&env, GetAnchor).await?;
    let role = server_role(&info);
    let members = anchor
        .node
        .members
        .iter()
        .map(|m| {
            let me = m.server_id == info.server_id;
            MemberStatus {
                addr: m.addr.clone(),
                role: if me { role } else { member_role(m.role) },
                // Peers' progress is known once replication lands.
                commit: if me { info.last_commit } else { 0 },
                lag_commits: 0,
                lag_ms: 0,
            }
        })
        .collect();
    let s = &env.settings;
    Ok(ResponseBody::Status(StatusReport {
        role,
        commit: info.last_commit,
        epoch: info.epoch,
        repository: info.repository_id.to_string(),
        server_id: info.server_id,
        addr: s.advertise.clone(),
        partition_safe: false,
        members,
        backup: None,
        flush: s.flush.to_string(),
        sync_replicas: s.sync_replicas,
    }))
}

pub(super) async fn digest(env: Arc<SessionEnv>) -> Answer {
    let (commit, digest) = ask(&env, Digest).await?;
    Ok(ResponseBody::Digest {
        commit,
        digest: hex(&digest),
    })
}
