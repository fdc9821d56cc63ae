//! `CommitCoordinator`: the commit pipeline of the primary.
//!
//! An async actor. Commits ([`QueueCommit`], [`SubmitCommit`]) that arrive together are
//! queued and sent on as one [`CommitBatch`] once the mailbox is drained
//! (a self-sent `Dispatch`), so the `StorageActor`'s thread wakes once per
//! batch, not once per commit; a batch never waits for anything but the
//! messages already delivered. The `StorageActor` numbers, logs (unsynced)
//! and applies each commit of the batch; the coordinator then decides when
//! to acknowledge each, following the [`FlushPolicy`]:
//!
//! * `group`: the applied commit waits in `waiters` until the log is durable
//!   up to its number. The batch carries the `CommitLogActor`'s address:
//!   right after applying it, the `StorageActor` sends a [`Flush`] of its
//!   newest `LogSync` handle (the fsync starts without a hop through this
//!   actor) and the reply carries that flush's answer, which the
//!   coordinator awaits. It never waits for the flush in flight: flushes
//!   queue at the `CommitLogActor`, which runs them back to back, lets each
//!   fsync cover every record written before it started and answers a
//!   flush already covered without syncing again (group commit: concurrent
//!   commits share one fsync). When a flush reports the log durable up to
//!   N, every waiter ≤ N is answered.
//! * `interval:MS`: the commit is acknowledged right after it is applied; a
//!   timer flushes the newest handle every MS.
//!
//! With secondaries (`sync-replicas` N > 0), a commit is also held until
//! at least min(N, replicas) of them report it durable ([`ReplicaAck`]).
//! Every applied record is handed to each replica's `BroadcastActor` as
//! soon as its batch is applied, while the primary's own flush runs.
//!
//! A failed fsync, a fatal storage error or a vanished storage/log actor is
//! fatal: the error is logged, every waiter and every later commit gets
//! `WireError::Internal`, and the `Controller` is told to stop the server.
//!
//! [`Drain`] (from the `Controller` at shutdown) refuses new commits with
//! `ShuttingDown` and answers once every commit already submitted (queued
//! ones included) has been applied, flushed and acknowledged.
//!
//! Handlers never block: storage and flush replies come back as actor
//! futures, and a commit's reply is a oneshot answered from the actor's state.
//! Both downstream addresses are `Recipient`s so tests can plug in probes.

use std::collections::{BTreeMap, HashMap};

use actix::prelude::*;
use log::{debug, error, info};
use tokio::sync::oneshot;

use crate::actors::broadcast::{Broadcast, ReplicaAck};
use crate::actors::busy_poll;
use crate::actors::commit_log::Flush;
use crate::actors::controller::Fatal;
use crate::actors::convert::{mailbox_error, wire_error};
use crate::actors::flush_policy::FlushPolicy;
use crate::actors::storage::{BatchApplied, CommitBatch, CommitReply};
use crate::protocol::WireError;
use crate::storage::{CommitRequest, LogSync, StorageError};
use crate::types::{CommitNumber, Oid};

type Reply = oneshot::Sender<Result<Acknowledged, WireError>>;
/// Storage's answer to a batch, its commits' replies, and the fence
/// generation it was sent under.
type BatchAnswer = (Result<BatchApplied, MailboxError>, Vec<Reply>, u64);

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
    storage: Recipient<CommitBatch>,
    flusher: Recipient<Flush>,
    fatal: Recipient<Fatal>,
    policy: FlushPolicy,
    /// Commits received and not yet sent to storage, in arrival order; a
    /// `Dispatch` is pending whenever this is not empty.
    queued: Vec<(CommitRequest, Reply)>,
    /// Commits sent to storage and not yet answered by it.
    applying: usize,
    /// Applied commits waiting for durability, by number (a retried token
    /// can make two waiters share a number).
    waiters: BTreeMap<CommitNumber, Vec<(Acknowledged, Reply)>>,
    /// Batches sent to storage, and handled, so far; answers that arrive
    /// before an earlier batch's wait in `answered`.
    batches_sent: u64,
    batches_handled: u64,
    answered: BTreeMap<u64, BatchAnswer>,
    /// The newest handle not yet handed to a flush.
    pending: Option<LogSync>,
    /// Flushes sent and not yet answered.
    flushing: usize,
    /// The highest commit handed to a flush.
    requested: CommitNumber,
    /// Everything up to here is known durable.
    durable: CommitNumber,
    failed: Option<String>,
    draining: bool,
    /// A take-over is draining this primary: new commits are refused with
    /// `unavailable` (clients retry with the same token).
    paused: bool,
    /// This server stepped down ([`Fence`]) and is not primary again yet
    /// ([`Lead`]): commits are refused with `wrong_server`.
    fenced: bool,
    /// Bumped by every [`Fence`]: a batch sent to storage before it is
    /// never acknowledged, whatever its flush and replicas say.
    fence_gen: u64,
    drained: Vec<oneshot::Sender<Result<CommitNumber, String>>>,
    /// Secondaries in the node, by server id: their link and what they
    /// hold durably.
    replicas: HashMap<u64, Replica>,
    sync_replicas: u32,
}

struct Replica {
    link: Recipient<Broadcast>,
    durable: CommitNumber,
    /// Commits wait for it; `false` once it is being removed (it is still
    /// streamed to, so it learns of its removal).
    counted: bool,
    /// Whether its acknowledgements may make a commit acknowledged.
    join: Join,
}

/// A replica's standing in the node, for acknowledgements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Join {
    /// A member when this primary started leading.
    Member,
    /// Joining: the node change adding it is not committed yet.
    Pending,
    /// Added by node change `n`. It counts (for acknowledgements, and
    /// among the replicas commits wait for) once every other replica holds
    /// `n`, that is, knows it as a member. Before then a commit held by it
    /// alone would be lost if the primary died and a secondary that never
    /// heard of it took over: a promoting server pulls from the members it
    /// knows.
    At(CommitNumber),
}

impl CommitCoordinator {
    /// `durable`: the last commit already on disk when the pipeline starts
    /// (what the repository recovered at open).
    pub fn new(
        storage: Recipient<CommitBatch>,
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
            queued: Vec::new(),
            applying: 0,
            waiters: BTreeMap::new(),
            batches_sent: 0,
            batches_handled: 0,
            answered: BTreeMap::new(),
            pending: None,
            flushing: 0,
            requested: durable,
            durable,
            failed: None,
            draining: false,
            paused: false,
            fenced: false,
            fence_gen: 0,
            drained: Vec::new(),
            replicas: HashMap::new(),
            sync_replicas: 0,
        }
    }

    /// Hold acknowledgements until `n` secondaries (at most as many as the
    /// node has) hold the commit durably.
    pub fn with_sync_replicas(mut self, n: u32) -> Self {
        self.sync_replicas = n;
        self
    }

    /// Highest commit that enough replicas hold (everything when none is
    /// required).
    fn replicated_upto(&self) -> CommitNumber {
        // Could `o` take over? Only a member that knows it is one.
        let may_promote = |o: &Replica| match o.join {
            Join::Member => true,
            Join::At(m) => o.durable >= m,
            Join::Pending => false,
        };
        let known_by_all = |id: u64, n: CommitNumber| {
            self.replicas
                .iter()
                .all(|(other, o)| *other == id || !o.counted || !may_promote(o) || o.durable >= n)
        };
        // A joining replica counts neither way until it may (not even as a
        // replica to wait for: the node change adding it must be
        // acknowledged without it).
        let mut durable: Vec<CommitNumber> = self
            .replicas
            .iter()
            .filter(|(id, r)| {
                r.counted
                    && match r.join {
                        Join::Member => true,
                        Join::At(n) => known_by_all(**id, n),
                        Join::Pending => false,
                    }
            })
            .map(|(_, r)| r.durable)
            .collect();
        let required = (self.sync_replicas as usize).min(durable.len());
        if required == 0 {
            return CommitNumber::MAX;
        }
        durable.sort_unstable_by(|a, b| b.cmp(a));
        durable[required - 1]
    }

    /// Answer every waiter that is now as durable and as replicated as
    /// promised. Never while fenced: the fence answered them as unknown.
    fn release(&mut self) {
        if self.fenced {
            return;
        }
        let local = match self.policy {
            FlushPolicy::Group => self.durable,
            FlushPolicy::Interval(_) => CommitNumber::MAX,
        };
        let upto = local.min(self.replicated_upto());
        if upto == CommitNumber::MAX {
            for (_, batch) in std::mem::take(&mut self.waiters) {
                for (ack, reply) in batch {
                    let _ = reply.send(Ok(ack));
                }
            }
            return;
        }
        let later = self.waiters.split_off(&(upto + 1));
        for (_, batch) in std::mem::replace(&mut self.waiters, later) {
            for (ack, reply) in batch {
                let _ = reply.send(Ok(ack));
            }
        }
    }

    /// Send every queued commit to storage as one batch.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        if self.queued.is_empty() {
            return;
        }
        let (requests, replies): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.queued).into_iter().unzip();
        if let Some(reason) = &self.failed {
            for reply in replies {
                let _ = reply.send(Err(internal(reason)));
            }
            return;
        }
        self.applying += replies.len();
        let gen = self.fence_gen;
        let batch = CommitBatch {
            commits: requests,
            // Group: storage starts the batch's flush itself (one hop less).
            flush: (self.policy == FlushPolicy::Group).then(|| self.flusher.clone()),
        };
        let seq = self.batches_sent;
        self.batches_sent += 1;
        self.storage
            .send(batch)
            .into_actor(self)
            .map(move |res, act, ctx| act.on_batch_answer(seq, res, replies, gen, ctx))
            .spawn(ctx);
    }

    /// Take storage's answers in the order the batches were sent. The
    /// storage thread answers them in order, but futures spawned in an
    /// actor's context are not polled in spawn order: two answers ready
    /// together could be handled late one first (records handed to the
    /// secondaries out of order, acknowledgements out of order).
    fn on_batch_answer(
        &mut self,
        seq: u64,
        res: Result<BatchApplied, MailboxError>,
        replies: Vec<Reply>,
        gen: u64,
        ctx: &mut Context<Self>,
    ) {
        busy_poll::note_activity();
        self.answered.insert(seq, (res, replies, gen));
        while let Some((res, replies, gen)) = self.answered.remove(&self.batches_handled) {
            self.batches_handled += 1;
            self.on_applied(res, replies, gen, ctx);
        }
    }

    fn on_applied(
        &mut self,
        res: Result<BatchApplied, MailboxError>,
        replies: Vec<Reply>,
        gen: u64,
        ctx: &mut Context<Self>,
    ) {
        self.applying -= replies.len();
        match res {
            Err(e) => {
                let err = mailbox_error("the storage actor", e);
                self.fail(format!("commit pipeline broken: {err}"));
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
            Ok(done) if done.results.len() != replies.len() => {
                let reason = format!(
                    "the storage actor answered {} of {} commits",
                    done.results.len(),
                    replies.len()
                );
                self.fail(reason.clone());
                for reply in replies {
                    let _ = reply.send(Err(internal(&reason)));
                }
            }
            Ok(BatchApplied { results, flush }) => {
                if let Some((upto, answer)) = flush {
                    self.requested = self.requested.max(upto);
                    self.flushing += 1;
                    answer
                        .into_actor(self)
                        .map(move |res, act, ctx| act.on_flushed(upto, res, ctx))
                        .spawn(ctx);
                }
                let fenced = gen != self.fence_gen;
                if !fenced {
                    self.broadcast(&results);
                }
                for (res, reply) in results.into_iter().zip(replies) {
                    self.on_one_applied(res, reply, fenced);
                }
                if self.policy == FlushPolicy::Group {
                    self.start_flush(ctx);
                }
            }
        }
        self.check_drained(ctx);
    }

    /// Hand the batch's applied records to every secondary's link, as one
    /// message each, before any of them is acknowledged: secondaries get
    /// them while our own flush runs.
    fn broadcast(&self, results: &[Result<CommitReply, StorageError>]) {
        if self.replicas.is_empty() || self.failed.is_some() {
            return;
        }
        let records: Vec<_> = results
            .iter()
            .filter_map(|r| match r {
                Ok(CommitReply::Applied(c)) => Some((c.number, c.body.clone())),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return;
        }
        for r in self.replicas.values() {
            r.link.do_send(Broadcast {
                records: records.clone(),
            });
        }
    }

    /// Answer or park one commit of an applied batch.
    fn on_one_applied(
        &mut self,
        res: Result<CommitReply, StorageError>,
        reply: Reply,
        fenced: bool,
    ) {
        let done = match res {
            Ok(done) => done,
            Err(e) => {
                if e.is_fatal() {
                    self.fail(format!("commit failed: {e}"));
                } else {
                    debug!("commit refused: {e}");
                }
                let _ = reply.send(Err(wire_error(&e)));
                return;
            }
        };
        if let Some(reason) = &self.failed {
            // Applied, but the log can no longer be made durable.
            let _ = reply.send(Err(internal(reason)));
            return;
        }
        // No handle: nothing this process wrote needs a sync.
        let must_flush = match done.sync() {
            Some(sync) => {
                self.note_sync(sync);
                done.number() > self.durable
            }
            None => false,
        };
        if fenced {
            // Applied here after this server stepped down: the new
            // primary decides whether it exists.
            let _ = reply.send(Err(internal("this server is no longer the primary")));
            return;
        }
        let must_replicate = done.number() > self.replicated_upto();
        let ack = Acknowledged::from(done);
        if (self.policy == FlushPolicy::Group && must_flush) || must_replicate {
            self.waiters
                .entry(ack.number)
                .or_default()
                .push((ack, reply));
        } else {
            let _ = reply.send(Ok(ack));
        }
    }

    fn note_sync(&mut self, sync: &LogSync) {
        let newer = match &self.pending {
            Some(p) => sync.upto() > p.upto(),
            None => sync.upto() > self.durable.max(self.requested),
        };
        if newer {
            self.pending = Some(sync.clone());
        }
    }

    /// Send a flush for the newest pending handle. Under `group` it goes at
    /// once, queueing behind the flush in flight (see the module doc); the
    /// interval timer keeps at most one in flight.
    fn start_flush(&mut self, ctx: &mut Context<Self>) {
        let queue = self.policy == FlushPolicy::Group;
        if (self.flushing > 0 && !queue) || self.failed.is_some() {
            return;
        }
        let Some(sync) = self.pending.take() else {
            return;
        };
        let upto = sync.upto();
        if upto <= self.durable {
            return;
        }
        self.requested = upto;
        self.flushing += 1;
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
        busy_poll::note_activity();
        self.flushing -= 1;
        match res {
            Ok(Ok(n)) => {
                self.durable = self.durable.max(n);
                self.release();
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
        let idle = self.queued.is_empty()
            && self.applying == 0
            && self.flushing == 0
            && self.waiters.is_empty();
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

/// Commit on the primary. Sender: the supervisor (node changes) and
/// tests. Reply: the applied commit, once it is as durable as the flush
/// policy promises; `ShuttingDown` while draining; `Internal` after a
/// fatal failure (outcome unknown).
#[derive(Message)]
#[rtype(result = "Result<Acknowledged, WireError>")]
pub struct SubmitCommit(pub CommitRequest);

impl Handler<SubmitCommit> for CommitCoordinator {
    type Result = ResponseFuture<Result<Acknowledged, WireError>>;

    fn handle(&mut self, msg: SubmitCommit, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.submit(msg.0, tx, ctx);
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err(stopped())) })
    }
}

/// [`SubmitCommit`] with the answer sent on `reply`: the sessions' path.
/// The coordinator answers the oneshot itself, where `SubmitCommit`'s
/// answer costs a task per commit (actix runs each handler's future as one)
/// and a second channel. `reply` is dropped unanswered only when the
/// coordinator is gone (see [`stopped`]). Sender: sessions, with
/// `do_send`: each has one commit in flight, so the mailbox stays short.
#[derive(Message)]
#[rtype(result = "()")]
pub struct QueueCommit {
    pub request: CommitRequest,
    pub reply: oneshot::Sender<Result<Acknowledged, WireError>>,
}

impl Handler<QueueCommit> for CommitCoordinator {
    type Result = ();

    fn handle(&mut self, msg: QueueCommit, ctx: &mut Context<Self>) {
        self.submit(msg.request, msg.reply, ctx);
    }
}

/// What a commit whose coordinator stopped before answering is told.
pub(crate) fn stopped() -> WireError {
    WireError::Internal {
        reason: "the commit coordinator stopped; the outcome of this commit is unknown".into(),
    }
}

impl CommitCoordinator {
    /// Queue one commit for the next batch, or refuse it at once.
    fn submit(&mut self, request: CommitRequest, reply: Reply, ctx: &mut Context<Self>) {
        let refusal = if let Some(reason) = &self.failed {
            Some(WireError::Internal {
                reason: reason.clone(),
            })
        } else if self.draining {
            Some(WireError::ShuttingDown)
        } else if self.paused {
            Some(WireError::Unavailable {
                reason: "the primary is handing over to another server; retry".into(),
            })
        } else if self.fenced {
            Some(WireError::WrongServer { primary: None })
        } else {
            None
        };
        if let Some(refusal) = refusal {
            let _ = reply.send(Err(refusal));
            return;
        }
        if self.queued.is_empty() {
            // Runs once the mailbox is drained: every commit delivered
            // meanwhile joins the batch.
            ctx.notify(Dispatch);
        }
        self.queued.push((request, reply));
    }
}

/// Send the queued commits to storage. Sender: the coordinator itself,
/// after the first commit of a batch is queued.
#[derive(Message)]
#[rtype(result = "()")]
struct Dispatch;

impl Handler<Dispatch> for CommitCoordinator {
    type Result = ();

    fn handle(&mut self, _: Dispatch, ctx: &mut Context<Self>) {
        self.dispatch(ctx);
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

/// Refuse (`on`) or take again new commits; answers once nothing is in
/// flight (applied, flushed and acknowledged), with the durable commit.
/// Sender: the `NodeSupervisor` during a take-over.
#[derive(Message)]
#[rtype(result = "PauseState")]
pub struct Pause {
    pub on: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PauseState {
    /// Nothing in flight.
    pub idle: bool,
    pub durable: CommitNumber,
}

impl Handler<Pause> for CommitCoordinator {
    type Result = MessageResult<Pause>;

    fn handle(&mut self, msg: Pause, _: &mut Context<Self>) -> Self::Result {
        self.paused = msg.on;
        let idle = self.applying == 0
            && self.queued.is_empty()
            && self.flushing == 0
            && self.waiters.is_empty();
        MessageResult(PauseState {
            idle,
            durable: self.durable,
        })
    }
}

/// This server is no longer primary: stop streaming, answer every commit
/// still waiting with an unknown outcome (the new primary decides), and
/// acknowledge nothing more until [`Lead`]: commits not yet sent to
/// storage, and later ones, get `wrong_server` (not applied); those being
/// applied get an unknown outcome. Sender: the `NodeSupervisor`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Fence {
    pub reason: String,
}

impl Handler<Fence> for CommitCoordinator {
    type Result = ();

    fn handle(&mut self, msg: Fence, ctx: &mut Context<Self>) {
        self.fenced = true;
        self.fence_gen += 1;
        self.replicas.clear();
        for (_, batch) in std::mem::take(&mut self.waiters) {
            for (_, reply) in batch {
                let _ = reply.send(Err(internal(&msg.reason)));
            }
        }
        for (_, reply) in std::mem::take(&mut self.queued) {
            let _ = reply.send(Err(WireError::WrongServer { primary: None }));
        }
        self.check_drained(ctx);
    }
}

/// This server is primary (again): take commits. Sender: the
/// `NodeSupervisor`, before anything it commits as the new primary.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Lead;

impl Handler<Lead> for CommitCoordinator {
    type Result = ();

    fn handle(&mut self, _: Lead, _: &mut Context<Self>) {
        self.fenced = false;
    }
}

/// A secondary joined the node: stream every new record to `link` and
/// count its acknowledgements. Sender: the `NodeSupervisor`.
///
/// The replica counts as holding nothing until its first [`ReplicaAck`]:
/// where its stream starts says nothing of what it holds (a joining server
/// is credited before its last glob arrives; after a restart or a
/// promotion it may lack records this server has), and a commit counted
/// as replicated on such credit — a resent token answered `Duplicate`, a
/// commit waiting for another secondary — would be acknowledged without
/// the copy `sync-replicas` promises.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddReplica {
    pub server_id: u64,
    pub link: Recipient<Broadcast>,
    /// A server joining the node: its acknowledgements count only from
    /// [`JoinedAt`] on (see `Join`).
    pub joining: bool,
}

impl Handler<AddReplica> for CommitCoordinator {
    type Result = ();

    fn handle(&mut self, msg: AddReplica, _: &mut Context<Self>) {
        self.replicas.insert(
            msg.server_id,
            Replica {
                link: msg.link,
                durable: 0,
                counted: true,
                join: if msg.joining {
                    Join::Pending
                } else {
                    Join::Member
                },
            },
        );
    }
}

/// The node change adding a joining replica was committed as `commit`.
/// Sender: the `NodeSupervisor`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct JoinedAt {
    pub server_id: u64,
    pub commit: CommitNumber,
}

impl Handler<JoinedAt> for CommitCoordinator {
    type Result = ();

    fn handle(&mut self, msg: JoinedAt, ctx: &mut Context<Self>) {
        if let Some(r) = self.replicas.get_mut(&msg.server_id) {
            if r.join == Join::Pending {
                r.join = Join::At(msg.commit);
                self.release();
                self.check_drained(ctx);
            }
        }
    }
}

/// A secondary left the node: commits no longer wait for it. Sender: the
/// `NodeSupervisor`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoveReplica {
    pub server_id: u64,
}

impl Handler<RemoveReplica> for CommitCoordinator {
    type Result = ();

    fn handle(&mut self, msg: RemoveReplica, ctx: &mut Context<Self>) {
        if self.replicas.remove(&msg.server_id).is_some() {
            self.release();
            self.check_drained(ctx);
        }
    }
}

/// Answer once commit `number` (already applied here) is as durable and as
/// replicated as an acknowledged commit: what `commit_status` must wait
/// for before it says a commit exists, or a kill -9 of this primary could
/// lose a commit a client was told about. Sender: `commit_status` requests.
#[derive(Message)]
#[rtype(result = "Result<Acknowledged, WireError>")]
pub struct AwaitAcknowledgeable {
    pub number: CommitNumber,
}

impl Handler<AwaitAcknowledgeable> for CommitCoordinator {
    type Result = ResponseFuture<Result<Acknowledged, WireError>>;

    fn handle(&mut self, msg: AwaitAcknowledgeable, _: &mut Context<Self>) -> Self::Result {
        if let Some(reason) = &self.failed {
            let e = internal(reason);
            return Box::pin(async move { Err(e) });
        }
        if self.fenced {
            return Box::pin(async { Err(WireError::WrongServer { primary: None }) });
        }
        let ack = Acknowledged {
            number: msg.number,
            new_oids: Vec::new(),
            positions: Vec::new(),
        };
        let must_flush = self.policy == FlushPolicy::Group && msg.number > self.durable;
        if !must_flush && msg.number <= self.replicated_upto() {
            return Box::pin(async move { Ok(ack) });
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.entry(msg.number).or_default().push((ack, tx));
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(WireError::Internal {
                    reason: "the commit coordinator stopped; ask again".into(),
                })
            })
        })
    }
}

/// A secondary is being removed: commits stop waiting for it now, but it
/// is still streamed to until `RemoveReplica`, so it receives its removal.
/// Sender: the `NodeSupervisor`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopCounting {
    pub server_id: u64,
}

impl Handler<StopCounting> for CommitCoordinator {
    type Result = ();

    fn handle(&mut self, msg: StopCounting, ctx: &mut Context<Self>) {
        if let Some(r) = self.replicas.get_mut(&msg.server_id) {
            r.counted = false;
            self.release();
            self.check_drained(ctx);
        }
    }
}

/// A secondary applied records streamed with `ack: applied` and answers
/// before they are fsynced: make them durable under this server's flush
/// policy (a flush at once under `group`, the interval timer under
/// `interval:MS`), without anyone waiting. Sender: `replicate` requests,
/// which report what is durable from the `CommitLogActor`'s channel, not
/// from here: no answer, so nothing waits on this actor's mailbox. After a
/// failed fsync nothing is flushed again (the server is stopping).
#[derive(Message)]
#[rtype(result = "()")]
pub struct NoteReplicated {
    /// The handle [`crate::actors::storage::Applied::sync`] of the batch.
    pub sync: Option<LogSync>,
}

impl Handler<NoteReplicated> for CommitCoordinator {
    type Result = ();

    fn handle(&mut self, msg: NoteReplicated, ctx: &mut Context<Self>) {
        if self.failed.is_some() {
            return;
        }
        if let Some(sync) = &msg.sync {
            self.note_sync(sync);
        }
        if self.policy == FlushPolicy::Group {
            self.start_flush(ctx);
        }
        // Shutting down: flush now rather than at the next interval.
        self.check_drained(ctx);
    }
}

impl Handler<ReplicaAck> for CommitCoordinator {
    type Result = ();

    fn handle(&mut self, msg: ReplicaAck, ctx: &mut Context<Self>) {
        if let Some(r) = self.replicas.get_mut(&msg.server_id) {
            if msg.durable > r.durable {
                r.durable = msg.durable;
                self.release();
                self.check_drained(ctx);
            }
        }
    }
}

#[cfg(test)]
#[path = "coordinator_tests.rs"]
mod tests;
