//! `CommitLogActor`: the thread that makes the commit log durable.
//!
//! A `SyncContext` actor on its own thread (`SyncArbiter::start(1, ..)`), so
//! an fsync never blocks the event loop nor the `StorageActor` (reads go on
//! while the log is being synced). It owns no state: each [`Flush`] carries
//! the `LogSync` handle the storage engine produced for the last commit
//! written. One thread is enough: the `CommitCoordinator` keeps at most one
//! flush in flight and makes it cover every commit waiting (group commit).
//!
//! Caller: the `CommitCoordinator` only.

use std::time::Instant;

use actix::prelude::*;
use log::trace;

use crate::storage::LogSync;
use crate::types::CommitNumber;

/// Syncs the commit log; see the module doc.
pub struct CommitLogActor;

impl CommitLogActor {
    /// Start the flushing thread.
    pub fn start() -> Addr<CommitLogActor> {
        SyncArbiter::start(1, || CommitLogActor)
    }
}

impl Actor for CommitLogActor {
    type Context = SyncContext<Self>;
}

/// fsync the log up to `sync.upto()`. Sender: the `CommitCoordinator`.
/// Reply: the commit number now durable, or the I/O error (fatal for the
/// server: what the log holds is then unknown).
#[derive(Message)]
#[rtype(result = "std::io::Result<CommitNumber>")]
pub struct Flush {
    pub sync: LogSync,
}

impl Handler<Flush> for CommitLogActor {
    type Result = std::io::Result<CommitNumber>;

    fn handle(&mut self, msg: Flush, _: &mut SyncContext<Self>) -> Self::Result {
        let started = Instant::now();
        msg.sync.sync()?;
        trace!(
            "log synced up to commit {} in {:?}",
            msg.sync.upto(),
            started.elapsed()
        );
        Ok(msg.sync.upto())
    }
}
