//! The answer to each backup request (admin sessions only; `dispatch.rs`
//! has already refused them elsewhere), as a future over the
//! `BackupActor`'s reply.
//!
//! This file holds no state and makes no decisions: the `BackupActor` owns
//! the job and its rules; here its replies become response bodies and its
//! errors `WireError`s (through `BackupError::to_wire`).

use std::sync::Arc;

use actix::prelude::*;

use crate::actors::backup::{
    AbortBackup, BackupActor, BackupError, FinishPull, GetBackupReport, PauseBackup, PullChunk,
    ResumeBackup, StartBackup, StartPull,
};
use crate::actors::convert::mailbox_error;
use crate::actors::session::connection::SessionEnv;
use crate::protocol::RequestBody;
use crate::protocol::{ResponseBody, WireError};

type Answer = Result<ResponseBody, WireError>;

async fn ask<M, T>(env: &SessionEnv, msg: M) -> Result<T, WireError>
where
    M: Message<Result = Result<T, BackupError>> + Send + 'static,
    T: Send + 'static,
    BackupActor: Handler<M>,
{
    match env.backup.send(msg).await {
        Ok(r) => r.map_err(|e| e.to_wire()),
        Err(e) => Err(mailbox_error("the backup actor", e)),
    }
}

/// The job's report, or the `backup` error saying none ever ran.
pub(super) async fn report(
    env: &SessionEnv,
) -> Result<Option<crate::protocol::BackupReport>, WireError> {
    env.backup
        .send(GetBackupReport)
        .await
        .map_err(|e| mailbox_error("the backup actor", e))
}

/// Answer one backup request (`body` is one of the `backup*` requests).
pub(super) async fn answer(env: Arc<SessionEnv>, body: RequestBody) -> Answer {
    let env = &*env;
    Ok(match body {
        RequestBody::Backup { to, rate } => {
            ResponseBody::BackupState(ask(env, StartBackup { to, rate }).await?)
        }
        RequestBody::BackupStatus => match report(env).await? {
            Some(r) => ResponseBody::BackupState(r),
            None => return Err(BackupError::NeverRan.to_wire()),
        },
        RequestBody::BackupPause => ResponseBody::BackupState(ask(env, PauseBackup).await?),
        RequestBody::BackupResume => ResponseBody::BackupState(ask(env, ResumeBackup).await?),
        RequestBody::BackupAbort => ResponseBody::BackupState(ask(env, AbortBackup).await?),
        RequestBody::BackupPullStart { rate, to } => {
            ResponseBody::BackupPull(ask(env, StartPull { rate, to }).await?)
        }
        RequestBody::BackupPullChunk {
            id,
            file,
            offset,
            len,
        } => {
            let data = ask(
                env,
                PullChunk {
                    id,
                    file: file.clone(),
                    offset,
                    len,
                },
            )
            .await?;
            ResponseBody::BackupChunk {
                id,
                file,
                offset,
                data,
            }
        }
        RequestBody::BackupPullFinish { id, files } => ResponseBody::BackupPullDone {
            id,
            files: ask(env, FinishPull { id, held: files }).await?,
        },
        other => {
            return Err(WireError::Internal {
                reason: format!("{other:?} is not a backup request"),
            })
        }
    })
}
