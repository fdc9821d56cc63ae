//! `CommitCoordinator`: the commit pipeline of the primary.
//!
//! An async actor. Each [`SubmitCommit`] goes to the `StorageActor`, which
//! numbers, logs (unsynced) and applies it; the coordinator then decides when
//! to acknowledge, following the [`FlushPolicy`]:
//!
//! * `group`: the applied commit waits in `waiters` until the log is durable
//!   up to its number. At most one [`Flush`] is in flight; it is sent for the
//!   newest `LogSync` handle, so it covers every commit applied so far. When
//!   it completes up to N, every waiter ≤ N is answered and, if newer commits
//!   are waiting, the next flush starts at once: concurrent commits share one
//!   fsync.
//! * `interval:MS`: the commit is acknowledged right after it is applied; a
//!   timer flushes the newest handle every MS.
//!
//! A failed fsync, a fatal storage error or a vanished storage/log actor is
//! fatal: the error is logged, every waiter and every later commit gets
//! `WireError::Internal`, and the `Controller` is told to stop the server.
//!
//! [`Drain`] (from the `Controller` at shutdown) refuses new commits with
//! `ShuttingDown` and answers once every commit already submitted has been
//! applied, flushed and acknowledged.
//!
//! Handlers never block: storage and flush replies come back as actor
//! futures, and a commit's reply is a oneshot answered from the actor's state.
//! Both downstream addresses are `Recipient`s so tests can plug in probes.

use std::collections::BTreeMap;

use actix::prelude::*;
use log::{debug, error, info};
use tokio::sync::oneshot;

use crate::actors::commit_log::Flush;
use crate::actors::controller::Fatal;
use crate::actors::convert::{mailbox_error, wire_error};
use crate::actors::flush_policy::FlushPolicy;
use crate::actors::storage::{Commit, CommitReply};
use crate::protocol::WireError;
use crate::storage::{CommitRequest, LogSync, StorageError};
use crate::types::{CommitNumber, Oid};

type Reply = oneshot::Sender<Result<Acknowledged, WireError>>;

/// What a client is told about its commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acknowledged {
    pub number: CommitNumber,
    /// temp id -> assigned oid (empty for a retried token).
    pub new_oids: Vec<(u64, Oid)>,
    /// Element index of each append (empty for a retried token).
    pub positions: Vec<u64>,
}

impl From<CommitReply> for Acknowledged {
    fn from(reply: CommitReply) -> Self {
        match reply {
            CommitReply::Applied(c) => Acknowledged {
                number: c.number,
                new_oids: c.new_oids,
                positions: c.positions,
            },
            CommitReply::Duplicate { number, .. } => Acknowledged {
                number,
                new_oids: Vec::new(),
                positions: Vec::new(),
            },
        }
    }
}

/// The commit pipeline; see the module doc.
pub struct CommitCoordinator {
    storage: Recipient<Commit>,
    flusher: Recipient<Flush>,
    fatal: Recipient<Fatal>,
    policy: FlushPolicy,
    /// Commits sent to storage and not yet answered by it.
    applying: usize,
    /// Applied commits waiting for durability, by number (a retried token
    /// can make two waiters share a number).
    waiters: BTreeMap<CommitNumber, Vec<(Acknowledged, Reply)>>,
    /// The newest handle not yet handed to a flush.
    pending: Option<LogSync>,
    /// `upto` of the flush in flight.
    flushing: Option<CommitNumber>,
    /// Everything up to here is known durable.
    durable: CommitNumber,
    failed: Option<String>,
    draining: bool,
    drained: Vec<oneshot::Sender<Result<CommitNumber, String>>>,
}

impl CommitCoordinator {
    /// `durable`: the last commit already on disk when the pipeline starts
    /// (what the repository recovered at open).
    pub fn new(
        storage: Recipient<Commit>,
        flusher: Recipient<Flush>,
        fatal: Recipient<Fatal>,
        policy: FlushPolicy,
        durable: CommitNumber,
    ) -> Self {
        CommitCoordinator {
            storage,
            flusher,
            fatal,
            policy,
            applying: 0,
            waiters: BTreeMap::new(),
            pending: None,
            flushing: None,
            durable,
            failed: None,
            draining: false,
            drained: Vec::new(),
        }
    }

    fn on_applied(
        &mut self,
        res: Result<Result<CommitReply, StorageError>, MailboxError>,
        reply: Reply,
        ctx: &mut Context<Self>,
    ) {
        self.applying -= 1;
        match res {
            Err(e) => {
                let err = mailbox_error("the storage actor", e);
                self.fail(format!("commit pipeline broken: {err}"));
                let _ = reply.send(Err(err));
            }
            Ok(Err(e)) => {
                if e.is_fatal() {
                    self.fail(format!("commit failed: {e}"));
                } else {
                    debug!("commit refused: {e}");
                }
                let _ = reply.send(Err(wire_error(&e)));
            }
            Ok(Ok(done)) => {
                if let Some(reason) = &self.failed {
                    // Applied, but the log can no longer be made durable.
                    let _ = reply.send(Err(internal(reason)));
                } else {
                    // No handle: nothing this process wrote needs a sync.
                    let must_wait = match done.sync() {
                        Some(sync) => {
                            self.note_sync(sync);
                            done.number() > self.durable
                        }
                        None => false,
                    };
                    let ack = Acknowledged::from(done);
                    if self.policy == FlushPolicy::Group && must_wait {
                        self.waiters
                            .entry(ack.number)
                            .or_default()
                            .push((ack, reply));
                        self.start_flush(ctx);
                    } else {
                        let _ = reply.send(Ok(ack));
                    }
                }
            }
        }
        self.check_drained(ctx);
    }

    fn note_sync(&mut self, sync: &LogSync) {
        let newer = match &self.pending {
            Some(p) => sync.upto() > p.upto(),
            None => sync.upto() > self.durable.max(self.flushing.unwrap_or(0)),
        };
        if newer {
            self.pending = Some(sync.clone());
        }
    }

    /// Send one flush for the newest pending handle, unless one is in flight.
    fn start_flush(&mut self, ctx: &mut Context<Self>) {
        if self.flushing.is_some() || self.failed.is_some() {
            return;
        }
        let Some(sync) = self.pending.take() else {
            return;
        };
        let upto = sync.upto();
        if upto <= self.durable {
            return;
        }
        self.flushing = Some(upto);
        self.flusher
            .send(Flush { sync })
            .into_actor(self)
            .map(move |res, act, ctx| act.on_flushed(upto, res, ctx))
            .spawn(ctx);
    }

    fn on_flushed(
        &mut self,
        upto: CommitNumber,
        res: Result<std::io::Result<CommitNumber>, MailboxError>,
        ctx: &mut Context<Self>,
    ) {
        self.flushing = None;
        match res {
            Ok(Ok(n)) => {
                self.durable = self.durable.max(n);
                let later = self.waiters.split_off(&(self.durable + 1));
                for (_, batch) in std::mem::replace(&mut self.waiters, later) {
                    for (ack, reply) in batch {
                        let _ = reply.send(Ok(ack));
                    }
                }
                if self.policy == FlushPolicy::Group {
                    self.start_flush(ctx);
                }
            }
            Ok(Err(e)) => self.fail(format!("fsync of the commit log up to {upto} failed: {e}")),
            Err(e) => self.fail(format!(
                "commit pipeline broken: {}",
                mailbox_error("the commit-log actor", e)
            )),
        }
        self.check_drained(ctx);
    }

    /// Enter the failed state: answer every waiter, refuse every later
    /// commit, and ask the controller to stop the server.
    fn fail(&mut self, reason: String) {
        if self.failed.is_some() {
            return;
        }
        error!("{reason}; refusing further commits and stopping the server");
        for (_, batch) in std::mem::take(&mut self.waiters) {
            for (_, reply) in batch {
                let _ = reply.send(Err(internal(&reason)));
            }
        }
        self.pending = None;
        self.fatal.do_send(Fatal {
            reason: reason.clone(),
        });
        self.failed = Some(reason);
    }

    fn check_drained(&mut self, ctx: &mut Context<Self>) {
        if !self.draining {
            return;
        }
        if self.failed.is_none() {
            // The interval timer may be far away: flush now.
            self.start_flush(ctx);
        }
        let idle = self.applying == 0 && self.flushing.is_none() && self.waiters.is_empty();
        if !idle || (self.failed.is_none() && self.pending.is_some()) {
            return;
        }
        let outcome = match &self.failed {
            Some(reason) => Err(reason.clone()),
            None => Ok(self.durable),
        };
        for tx in self.drained.drain(..) {
            let _ = tx.send(outcome.clone());
        }
        // Drained for good: later senders learn it from the closed mailbox.
        ctx.stop();
    }
}

fn internal(reason: &str) -> WireError {
    WireError::Internal {
        reason: format!("{reason}; the outcome of this commit is unknown"),
    }
}

impl Actor for CommitCoordinator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(every) = self.policy.interval() {
            ctx.run_interval(every, |act, ctx| act.start_flush(ctx));
        }
        info!("commit pipeline started (flush policy {})", self.policy);
    }
}

/// Commit on the primary. Sender: sessions. Reply: the applied commit, once
/// it is as durable as the flush policy promises; `ShuttingDown` while
/// draining; `Internal` after a fatal failure (outcome unknown).
#[derive(Message)]
#[rtype(result = "Result<Acknowledged, WireError>")]
pub struct SubmitCommit(pub CommitRequest);

impl Handler<SubmitCommit> for CommitCoordinator {
    type Result = ResponseFuture<Result<Acknowledged, WireError>>;

    fn handle(&mut self, msg: SubmitCommit, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(reason) = &self.failed {
            let err = WireError::Internal {
                reason: reason.clone(),
            };
            return Box::pin(async move { Err(err) });
        }
        if self.draining {
            return Box::pin(async { Err(WireError::ShuttingDown) });
        }
        let (tx, rx) = oneshot::channel();
        self.applying += 1;
        self.storage
            .send(Commit(msg.0))
            .into_actor(self)
            .map(move |res, act, ctx| act.on_applied(res, tx, ctx))
            .spawn(ctx);
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(WireError::Internal {
                    reason: "the commit coordinator stopped; the outcome of this commit is unknown"
                        .into(),
                })
            })
        })
    }
}

/// Stop taking commits and wait for the pipeline to empty. Sender: the
/// `Controller` at shutdown. Reply: the durable commit number, or the reason
/// the pipeline failed.
#[derive(Message)]
#[rtype(result = "Result<CommitNumber, String>")]
pub struct Drain;

impl Handler<Drain> for CommitCoordinator {
    type Result = ResponseFuture<Result<CommitNumber, String>>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
        if !self.draining {
            info!("commit pipeline draining: new commits are refused");
        }
        self.draining = true;
        let (tx, rx) = oneshot::channel();
        self.drained.push(tx);
        self.check_drained(ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err("the commit coordinator stopped".into()))
        })
    }
}

#[cfg(test)]
#[path = "coordinator_tests.rs"]
mod tests;
