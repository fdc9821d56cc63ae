//! The actors of `magma-server`. Each owns its state; the messages defined
//! next to it are its whole API.
//!
//! | actor | context | owns | does |
//! |---|---|---|---|
//! | [`StorageActor`] | own arbiter thread | the `Repository` | applies commits, serves reads, checkpoints, publishes the applied commit number |
//! | [`CommitLogActor`] | own arbiter thread | what its last fsync covered | fsyncs the commit log (`Flush`); one fsync covers every flush queued behind it |
//! | [`CommitCoordinator`] | async | the commit pipeline, waiters | batches commits for storage, acknowledges each once durable |
//! | [`Listener`] | async | the listening socket, session table | accepts connections, closes sessions at shutdown |
//! | [`Session`] | async, one per connection | one TCP connection | decodes requests, routes them, encodes replies |
//! | [`Controller`] | async | the lifecycle | checkpoint timer, graceful shutdown, fatal stop |
//! | [`BackupActor`] | async | the one backup job (local copy or pull) | snapshot, chunked copy with progress, pause / resume / abort, rate limit, yielding to a busy commit path |
//!
//! A commit under the `group` flush policy (arrows are messages; `=>` is the
//! reply). Reads go straight from a session to the `StorageActor` and never
//! wait behind a flush. Per commit that is three thread hand-offs (event
//! loop → storage thread → commit-log thread → event loop), each shared by
//! every commit of the same batch.
//!
//! ```text
//!  client        Session          CommitCoordinator       StorageActor        CommitLogActor
//!    | frame ---->  |                     |                     |                    |
//!    |              |-- QueueCommit ----->| queued; the commits |                    |
//!    |              |                     | delivered together  |                    |
//!    |              |                     | form one batch      |                    |
//!    |              |                     |-- CommitBatch ----->| number, log write, |
//!    |              |                     |                     | apply each; publish|
//!    |              |                     |                     |-- Flush(sync) ---->| fsync (covers all
//!    |              |                     |<= BatchApplied -----|                    |  written before it;
//!    |              |                     | waiters += N        |                    |  queued flushes run
//!    |              |                     |<= durable up to M ≥ N -------------------|  back to back)
//!    |              |<= Committed(N) -----| reply to every waiter ≤ M                |
//!    |<--- frame -- |                     |                     |                    |
//! ```
//!
//! With `interval:MS` the batch carries no flush: the coordinator replies
//! as soon as `BatchApplied` arrives, and its timer sends `Flush` every MS.
//!
//! Each of those three threads runs a [`busy_poll`] poller: after activity
//! it keeps polling for a short window instead of sleeping, so a hand-off
//! during a burst of commits does not have to wake a sleeping thread.
//!
//! Addresses held across actors are narrow (`Recipient<M>`) wherever a test
//! may plug in a probe; the only shared values are read-only (`SessionEnv`)
//! and the single-writer `watch` channels of the applied commit number
//! (the `StorageActor`'s) and of the durable one (the `CommitLogActor`'s).

pub mod backup;
pub mod broadcast;
pub mod busy_poll;
pub mod commit_log;
pub mod controller;
pub mod convert;
pub mod coordinator;
pub mod failover;
pub mod flush_policy;
pub mod follower;
pub mod listener;
pub mod peer_link;
pub mod session;
pub mod storage;
pub mod supervisor;

pub use backup::{BackupActor, StopBackups};
pub use commit_log::{CommitLogActor, Flush};
pub use controller::{Controlled, Controller, Fatal, Outcome, RequestShutdown};
pub use coordinator::{
    Acknowledged, CommitCoordinator, Drain, NoteReplicated, QueueCommit, SubmitCommit,
};
pub use flush_policy::{FlushPolicy, FlushPolicyError};
pub use listener::{Listener, SessionClosed, StopAccepting};
pub use session::{Session, SessionEnv, SessionSettings};
pub use storage::{CommitReply, Identity, StorageActor};

/// Publish `number` on a commit-number channel if it is newer: readers
/// never see the number go back, and are not woken for an older one.
pub(crate) fn publish_newer(
    tx: &tokio::sync::watch::Sender<crate::types::CommitNumber>,
    number: crate::types::CommitNumber,
) {
    tx.send_if_modified(|c| {
        let newer = number > *c;
        if newer {
            *c = number;
        }
        newer
    });
}
