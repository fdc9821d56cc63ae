//! `BroadcastActor`: the primary's link to one secondary.
//!
//! One per secondary member. It receives every new record from the
//! `CommitCoordinator` ([`Broadcast`], before the primary's own fsync),
//! sends them in order over one peer connection as `replicate` batches —
//! pipelined, at most `max_in_flight` unanswered, replies matched by id;
//! any failure drops the connection and resends from the first record not
//! acknowledged (a secondary that lost records asks for them) — and
//! reports what the secondary made durable
//! ([`ReplicaAck`], to the coordinator, which holds back acknowledgements
//! for `sync-replicas`). Records it does not hold (it started late, its
//! queue overflowed, or the secondary asked for a resend) are read back from
//! the log. When idle it sends empty batches as heartbeats, so lag is
//! measured, not guessed.
//!
//! Batches ask to be answered once durable (synchronous replication) or
//! once applied (asynchronous, [`LinkSettings::ack`]); lag counts to the
//! last record acknowledged as applied; heartbeats ask for durability.
//!
//! It never decides membership: when the secondary cannot be reached or
//! stops acknowledging for `replica_timeout`, it tells the `NodeSupervisor`
//! ([`ReplicaTrouble`]), which verifies and decides.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use log::{debug, info, warn};

use crate::actors::peer_link::{LinkError, PeerLink, PeerPipe, PipeEvent};
use crate::actors::storage::{ReadRecords, RecordHashOf, StorageActor};
use crate::protocol::{ReplicateAck, RequestBody, ResponseBody, WireError};
use crate::storage::record::RecordHead;
use crate::types::{CommitNumber, Epoch, Hash, Member};

/// Records held in memory for one secondary; beyond this many, or this many
/// bytes, they are read back from the log when the secondary gets to them.
const MAX_QUEUE: usize = 100_000;
const MAX_QUEUE_BYTES: usize = 64 << 20;
const MAX_BATCH_RECORDS: usize = 4096;
const MAX_BATCH_BYTES: usize = 4 << 20;
const HEARTBEAT: Duration = Duration::from_millis(100);
/// A hash check the secondary refused (busy, or the record gone) is asked
/// again after this long, not at every heartbeat.
const HASH_CHECK_RETRY: Duration = Duration::from_secs(1);
/// Batches in flight under synchronous replication: while the secondary applies
/// and fsyncs one, the next is already on its way (it reads on while a
/// `replicate` is being made durable), so a round trip no longer sits
/// between its fsyncs.
pub const SYNC_IN_FLIGHT: usize = 4;

/// Timing settings of replication links.
#[derive(Clone, Copy, Debug)]
pub struct LinkSettings {
    /// A secondary that has not acknowledged outstanding records (or cannot
    /// be reached) for this long is reported to the supervisor.
    pub replica_timeout: Duration,
    /// Bound on one request to a peer.
    pub call_timeout: Duration,
    /// With asynchronous replication (`--sync-replicas 0`) nobody waits for
    /// the secondary, so a batch may wait up to this long for more records
    /// before it is sent: far fewer round trips (each costs both servers
    /// syscalls and thread wake-ups) for a bounded extra lag. `None` (any
    /// synchronous replication): a batch goes as soon as the link is free.
    pub coalesce: Option<Duration>,
    /// Batches sent before the first is answered ([`SYNC_IN_FLIGHT`] for
    /// synchronous replication; 1 for asynchronous, where the round trip
    /// is what gathers records into batches).
    pub max_in_flight: usize,
    /// When the secondary answers a batch of records: `durable` for
    /// synchronous replication (the coordinator counts those answers);
    /// `applied` for asynchronous, so the secondary's fsyncs neither pace
    /// the stream nor count as lag. Heartbeats always ask for `durable`,
    /// so what the secondary holds durably (what retention, take-over and
    /// hand-over go by) is known within a heartbeat once the stream pauses.
    pub ack: ReplicateAck,
}

/// [`LinkSettings::coalesce`] under asynchronous replication, unless the
/// operator sets another (`--async-batch-delay-us`).
pub const ASYNC_COALESCE: Duration = Duration::from_micros(500);
/// A batch this large goes at once, coalescing or not.
const COALESCE_RECORDS: usize = 512;

/// New records for the secondary: every record of one applied batch, in
/// order (one message per batch, so the batch goes out together rather
/// than its first record alone). Sender: the `CommitCoordinator`; may be
/// dropped (the records are then read back from the log).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Broadcast {
    pub records: Vec<(CommitNumber, Arc<Vec<u8>>)>,
}

/// What the secondary made durable. Receiver: the `CommitCoordinator`.
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct ReplicaAck {
    pub server_id: u64,
    pub durable: CommitNumber,
}

/// The secondary cannot be reached or stopped acknowledging (or refused
/// our epoch, or holds another history). Receiver: the `NodeSupervisor`,
/// which verifies.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct ReplicaTrouble {
    pub server_id: u64,
    pub addr: String,
    pub reason: String,
    /// The secondary answered with a newer epoch: we are deposed.
    pub newer_epoch: Option<Epoch>,
    /// The secondary holds other records than ours under this number, or
    /// refuses ours as invalid (a version that cannot read them): it can
    /// never acknowledge them, and no check would change that.
    pub diverged: Option<CommitNumber>,
}

/// Stop streaming (the member left the node). Sender: the supervisor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopBroadcast;

/// Ask the secondary what it holds durably as soon as the link is free
/// (an empty batch asking for `durable`), rather than at the next
/// heartbeat. Sender: the supervisor, while a hand-over waits for it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ProbeDurable;

/// Lag figures for status. Sender: the supervisor.
#[derive(Message)]
#[rtype(result = "ReplicaStats")]
pub struct GetReplicaStats;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// What the secondary acknowledged as applied (and, under synchronous
    /// replication, durable); lag counts from here.
    pub applied: CommitNumber,
    /// What the secondary holds durably.
    pub durable: CommitNumber,
    pub lag_commits: u64,
    pub lag_ms: u64,
    pub connected: bool,
}

pub struct BroadcastActor {
    peer: Member,
    primary_id: u64,
    epoch: Epoch,
    storage: Addr<StorageActor>,
    acks: Recipient<ReplicaAck>,
    trouble: Recipient<ReplicaTrouble>,
    settings: LinkSettings,
    /// The connection, split for pipelining (see [`SYNC_IN_FLIGHT`]).
    pipe: Option<PeerPipe>,
    /// Which connection `LinkEvent`s must come from; bumped on every
    /// (re)connect and break, so a dead pipe's late events are ignored.
    generation: u64,
    /// Requests sent and not yet answered, oldest first.
    in_flight: VecDeque<Sent>,
    /// Connecting, or reading records back from the log.
    busy: bool,
    /// Next record number to send.
    next: CommitNumber,
    /// Highest record the secondary acknowledged as applied.
    acked: CommitNumber,
    /// Highest record this connection has shown the secondary holds as
    /// ours: a batch of records up to it passed the secondary's chain check
    /// (its first record continued the secondary's log, or the newest one
    /// it already held is ours byte for byte). No answer is credited beyond
    /// it: an answer tells how many records the secondary holds, not
    /// whose, and after a failover or a restart it may hold another
    /// primary's record under one of our numbers. Reset with each
    /// connection.
    verified: CommitNumber,
    /// The secondary's last record, sent again for it to compare with its
    /// own (see `on_reply`); `unchecked` once it proved unreadable here.
    checking: Option<CommitNumber>,
    /// A record this primary cannot read back (a primary started from a
    /// backup holds no records up to its snapshot): its hash is compared
    /// instead (`record_hash`), once per connection.
    unchecked: Option<CommitNumber>,
    /// A refused hash check is asked again from then on.
    check_again_at: Option<Instant>,
    /// What the secondary last said it holds durably (credited only up to
    /// `verified`; a hash check that passes credits it).
    claimed_durable: CommitNumber,
    /// The secondary answered at least once: until then `acked` is only
    /// where the stream starts, not what it holds (status must not show a
    /// lagging secondary level with us after a promotion).
    heard: bool,
    /// Highest record the secondary acknowledged as durable (≤ `acked`).
    durable: CommitNumber,
    /// Highest record the primary has handed us.
    primary_last: CommitNumber,
    queue: Held,
    /// When each record not yet acknowledged by the secondary was handed to
    /// us (for lag in ms): lag counts from the commit, not from our send,
    /// so time spent queued behind the batch in flight or a reconnect
    /// counts.
    handed: VecDeque<(CommitNumber, Instant)>,
    last_send: Instant,
    /// Since when outstanding records wait for an acknowledgement, or the
    /// peer is unreachable.
    stalled_since: Option<Instant>,
    /// When trouble was last reported (re-armed after `replica_timeout`).
    reported_at: Option<Instant>,
    retry_at: Instant,
    /// Test hook (`MAGMA_FAULT_DROP_RECORD`): skip sending this record once.
    drop_once: Option<CommitNumber>,
    /// A pump is scheduled for when the oldest waiting record's coalescing
    /// window ends.
    coalescing: bool,
    /// [`ProbeDurable`] asked; cleared by the next request asking for
    /// `durable`.
    probe: bool,
}

/// A request sent and not yet answered.
struct Sent {
    id: u64,
    at: Instant,
    /// The `primary_last` it carried: what its answer may be credited with
    /// (see [`credited`]).
    primary_last: CommitNumber,
    /// The last record it carried; `None` for a heartbeat.
    last_record: Option<CommitNumber>,
    /// A `record_hash` request: the record asked about and our hash of it.
    hash_check: Option<(CommitNumber, Hash)>,
}

/// Records held in memory for one secondary, bounded by count and by bytes
/// (a slow secondary must not make the primary hold gigabytes of large
/// records); those not admitted are read back from the log.
#[derive(Default)]
struct Held {
    records: BTreeMap<CommitNumber, Arc<Vec<u8>>>,
    bytes: usize,
}

impl Held {
    /// Keep `body` if it fits; `false` if it will have to be read back.
    fn admit(&mut self, number: CommitNumber, body: Arc<Vec<u8>>) -> bool {
        if self.records.len() >= MAX_QUEUE || self.bytes + body.len() > MAX_QUEUE_BYTES {
            return false;
        }
        self.put(number, body);
        true
    }

    fn put(&mut self, number: CommitNumber, body: Arc<Vec<u8>>) {
        self.bytes += body.len();
        if let Some(old) = self.records.insert(number, body) {
            self.bytes -= old.len();
        }
    }

    /// Keep a record read back from the log to fill the gap at the start of
    /// the stream, even beyond the bound (one batch at a time): refusing it
    /// would leave the gap for ever.
    fn insert_read_back(&mut self, number: CommitNumber, body: Arc<Vec<u8>>) {
        self.put(number, body);
    }

    fn get(&self, number: &CommitNumber) -> Option<&Arc<Vec<u8>>> {
        self.records.get(number)
    }

    /// Forget records up to and including `number`.
    fn drop_through(&mut self, number: CommitNumber) {
        let kept = self.records.split_off(&(number + 1));
        self.bytes -= self.records.values().map(|b| b.len()).sum::<usize>();
        self.records = kept;
    }
}

/// What a secondary's answer may be credited with: never records beyond
/// the last one this primary holds. A secondary can hold more when the
/// primary lost an unsynced tail (a power failure after it streamed
/// record n, before its own fsync): crediting that n would acknowledge the
/// primary's *new* record n on the strength of the old one, and skip
/// sending it. Clamped, the new n is sent, the secondary refuses it
/// (`diverged`) and is removed before anything counts on it.
fn credited(
    applied: CommitNumber,
    durable: CommitNumber,
    primary_last: CommitNumber,
) -> (CommitNumber, CommitNumber) {
    (applied.min(primary_last), durable.min(primary_last))
}

impl BroadcastActor {
    /// `next`: the first record the secondary needs, as far as we know (it
    /// corrects us with a resend request if it needs earlier ones).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        peer: Member,
        primary_id: u64,
        epoch: Epoch,
        next: CommitNumber,
        primary_last: CommitNumber,
        storage: Addr<StorageActor>,
        acks: Recipient<ReplicaAck>,
        trouble: Recipient<ReplicaTrouble>,
        settings: LinkSettings,
    ) -> Self {
        let drop_once = std::env::var("MAGMA_FAULT_DROP_RECORD")
            .ok()
            .and_then(|v| v.parse().ok());
        BroadcastActor {
            peer,
            primary_id,
            epoch,
            storage,
            acks,
            trouble,
            settings,
            pipe: None,
            generation: 0,
            in_flight: VecDeque::new(),
            busy: false,
            next,
            acked: next.saturating_sub(1),
            verified: 0,
            checking: None,
            unchecked: None,
            claimed_durable: 0,
            check_again_at: None,
            heard: false,
            // Known only once the secondary says (see `AddReplica`).
            durable: 0,
            primary_last,
            queue: Held::default(),
            handed: VecDeque::new(),
            last_send: Instant::now(),
            stalled_since: None,
            reported_at: None,
            retry_at: Instant::now(),
            drop_once,
            coalescing: false,
            probe: false,
        }
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.busy || Instant::now() < self.retry_at {
            return;
        }
        if self.pipe.is_none() {
            self.connect(ctx);
            return;
        }
        if self.in_flight.len() >= self.settings.max_in_flight.max(1) {
            return;
        }
        // Contiguous records from `next` held in memory.
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut n = self.next;
        while let Some(body) = self.queue.get(&n) {
            if batch.len() >= MAX_BATCH_RECORDS || bytes >= MAX_BATCH_BYTES {
                break;
            }
            bytes += body.len();
            batch.push(body.clone());
            n += 1;
        }
        if batch.is_empty() && self.next <= self.primary_last {
            // A gap: read it back from the log.
            self.busy = true;
            let from = self.next;
            self.storage
                .send(ReadRecords {
                    from,
                    max_count: MAX_BATCH_RECORDS,
                    max_bytes: MAX_BATCH_BYTES,
                })
                .into_actor(self)
                .map(move |res, act, ctx| {
                    act.busy = false;
                    match res {
                        Ok(Ok(records)) if !records.is_empty() => {
                            for r in records {
                                if let Ok(h) = RecordHead::parse(&r) {
                                    act.queue.insert_read_back(h.number, Arc::new(r));
                                }
                            }
                            act.pump(ctx);
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) if act.checking == Some(from) => {
                            debug!(
                                "replication to {}: cannot read record {from} to check it ({e}): \
                                 comparing its hash",
                                act.peer.addr
                            );
                            act.skip_check(from);
                            act.check_hash(from, ctx);
                            act.pump(ctx);
                        }
                        Ok(Err(e)) => {
                            warn!(
                                "replication to {}: cannot read records from {from}: {e}",
                                act.peer.addr
                            );
                            act.report(format!("records from {from} unavailable: {e}"), None);
                            act.break_link();
                        }
                        Err(e) => warn!("replication to {}: storage gone: {e}", act.peer.addr),
                    }
                })
                .spawn(ctx);
            return;
        }
        let heartbeat_due = self.probe || self.last_send.elapsed() >= HEARTBEAT;
        if batch.is_empty() && (!self.in_flight.is_empty() || !heartbeat_due) {
            return;
        }
        if let (Some(window), false) = (self.settings.coalesce, batch.is_empty()) {
            let next = self.next;
            let oldest = self
                .handed
                .iter()
                .find(|(n, _)| *n >= next)
                .map(|(_, t)| *t);
            let due = oldest.map(|t| t + window);
            if batch.len() < COALESCE_RECORDS && due.is_some_and(|d| d > Instant::now()) {
                if !self.coalescing {
                    self.coalescing = true;
                    let wait = due.map_or(window, |d| d - Instant::now());
                    ctx.run_later(wait, |act, ctx| {
                        act.coalescing = false;
                        act.pump(ctx);
                    });
                }
                return;
            }
        }
        if let Some(skip) = self.drop_once {
            if let Some(pos) = batch
                .iter()
                .position(|b| RecordHead::parse(b).is_ok_and(|h| h.number == skip))
            {
                warn!(
                    "fault injection: not sending record {skip} to {}",
                    self.peer.addr
                );
                batch.remove(pos);
                self.drop_once = None;
            }
        }
        let count = batch.len() as u64;
        let last_record = (count > 0).then(|| self.next + count - 1);
        let ack = if batch.is_empty() {
            ReplicateAck::Durable
        } else {
            self.settings.ack
        };
        let request = RequestBody::Replicate {
            epoch: self.epoch,
            primary_id: self.primary_id,
            records: batch
                .iter()
                .map(|b| serde_bytes::ByteBuf::from(b.as_ref().clone()))
                .collect(),
            primary_last: self.primary_last,
            ack,
        };
        let pipe = self.pipe.as_mut().expect("checked above");
        match pipe.send(request) {
            Ok(id) => {
                if ack == ReplicateAck::Durable {
                    self.probe = false;
                }
                self.next += count;
                self.last_send = Instant::now();
                self.in_flight.push_back(Sent {
                    id,
                    at: self.last_send,
                    primary_last: self.primary_last,
                    last_record,
                    hash_check: None,
                });
                // Records that came meanwhile may go as the next batch.
                self.pump(ctx);
            }
            Err(e) => self.on_link_error(e),
        }
    }

    /// What the secondary answered to one of our requests.
    fn on_reply(&mut self, id: u64, body: Result<ResponseBody, LinkError>) {
        let Some(pos) = self.in_flight.iter().position(|s| s.id == id) else {
            self.on_link_error(LinkError::Protocol {
                addr: self.peer.addr.clone(),
                reason: format!("answer to request {id}, which is not outstanding"),
            });
            return;
        };
        let sent = self.in_flight.remove(pos).expect("found above");
        if let Some((number, ours)) = sent.hash_check {
            self.on_hash_checked(number, ours, body);
            return;
        }
        match body {
            Ok(ResponseBody::Replicated { applied, durable }) => {
                // Clamped to what we held when the request went: a record
                // applied here since (a new n) was not in it, and the
                // secondary's n may be an older one.
                let (held, held_durable) = credited(applied, durable, sent.primary_last);
                self.claimed_durable = held_durable;
                if let Some(last) = sent.last_record {
                    // It took our records: its chain check passed.
                    self.verified = self.verified.max(last.min(held));
                }
                // Durability is credited only as far as shown; `applied`
                // (status, lag, where a new connection resumes) is what
                // it says it holds, checked again by each connection.
                let (applied, durable) = (held, held_durable.min(self.verified));
                self.heard = true;
                if applied > self.acked {
                    self.acked = applied;
                    // Progress: any stall starts again from now.
                    self.stalled_since = None;
                    self.reported_at = None;
                }
                self.credit_durable(durable);
                if held > self.verified {
                    // It holds records no batch of this connection has
                    // shown to be ours (a heartbeat answered first, after a
                    // reconnect, a restart or a promotion). Once nothing
                    // else is outstanding, send what makes it check them:
                    // the record after its last, chained onto it, or with
                    // none after, its last again, compared byte for byte.
                    // A secondary holding other records refuses either
                    // (`diverged`) before anything counts on it.
                    if self.in_flight.is_empty() {
                        if self.check_again_at.is_some_and(|t| Instant::now() >= t) {
                            self.check_again_at = None;
                            self.unchecked = None;
                        }
                        let check = held >= self.primary_last && self.unchecked != Some(held);
                        self.next = if check { held } else { held + 1 };
                        self.checking = check.then_some(held);
                        // `acked` may be where the stream started.
                        self.acked = held;
                        debug!(
                            "replication to {}: it holds up to {held}, unchecked: sending from {}",
                            self.peer.addr, self.next
                        );
                    }
                } else if self.in_flight.is_empty() && applied + 1 < self.next {
                    // Nothing else outstanding, yet it lacks records counted
                    // as sent: a stream started at our last record + 1
                    // (after a restart or a promotion) to a secondary that
                    // never got the last ones. Without new commits nothing
                    // else would bring them: send them again from what it
                    // has.
                    info!(
                        "replication to {}: it holds up to {applied}, not {}: sending again from {}",
                        self.peer.addr,
                        self.next - 1,
                        applied + 1
                    );
                    self.next = applied + 1;
                    self.acked = applied;
                }
                // Records it applied but has not made durable yet are not
                // kept: should it need them again, they are read back
                // from the log.
                self.queue.drop_through(self.acked);
                while self.handed.front().is_some_and(|(n, _)| *n <= self.acked) {
                    self.handed.pop_front();
                }
                self.refresh_stall();
            }
            Ok(other) => {
                warn!(
                    "replication to {}: unexpected answer, a `{}` response; reconnecting",
                    self.peer.addr,
                    crate::client::response_type(&other)
                );
                self.break_link();
            }
            Err(LinkError::Server {
                error: WireError::BadRequest { reason },
                ..
            }) => {
                // It cannot take our records (damaged in transit, or a
                // version that cannot read them): resending the same ones
                // would loop for ever while commits wait for it.
                warn!(
                    "replication to {}: it refuses our records: {reason}",
                    self.peer.addr
                );
                self.trouble.do_send(ReplicaTrouble {
                    server_id: self.peer.server_id,
                    addr: self.peer.addr.clone(),
                    reason: format!("it refuses our records: {reason}"),
                    newer_epoch: None,
                    diverged: Some(self.next),
                });
                self.break_link();
            }
            Err(LinkError::Server {
                error: WireError::Resend { from },
                ..
            }) => {
                // Batches in flight behind this one get the same answer;
                // records the secondary already has are skipped by it.
                debug!("replication to {}: resend from {from}", self.peer.addr);
                self.next = from;
            }
            Err(LinkError::Server {
                error: WireError::StaleEpoch { current, .. },
                ..
            }) => {
                self.report(
                    format!("refuses our epoch {}: it knows {current}", self.epoch),
                    Some(current),
                );
                self.break_link();
            }
            Err(LinkError::Server {
                error: WireError::Diverged { number },
                ..
            }) => self.diverged_at(number),
            Err(e) => self.on_link_error(e),
        }
    }

    /// The link failed: reconnect later, resend what is not durable, and
    /// tell the supervisor if the peer looks unreachable.
    fn on_link_error(&mut self, e: LinkError) {
        info!("replication to {}: {e}; reconnecting", self.peer.addr);
        self.break_link();
        if e.is_unreachable() {
            self.stalled_since.get_or_insert_with(Instant::now);
            self.report(e.to_string(), None);
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        self.busy = true;
        let addr = self.peer.addr.clone();
        let timeout = self.settings.call_timeout;
        async move { PeerLink::connect(&addr, timeout).await }
            .into_actor(self)
            .map(|res, act, ctx| {
                act.busy = false;
                match res {
                    Ok(link) => {
                        debug!("replication link to {} up", act.peer.addr);
                        act.generation += 1;
                        let (me, generation) = (ctx.address(), act.generation);
                        act.pipe =
                            Some(link.into_pipe(move |event| {
                                me.do_send(LinkEvent { generation, event })
                            }));
                        act.pump(ctx);
                    }
                    Err(e) => {
                        act.stalled_since.get_or_insert_with(Instant::now);
                        act.report(e.to_string(), None);
                        act.break_link();
                    }
                }
            })
            .spawn(ctx);
    }

    /// Drop the connection (what it still delivers is ignored), forget
    /// what was in flight and resend from the first record not
    /// acknowledged once reconnected (after a pause). Not from the first
    /// one not durable: under asynchronous replication that may be far
    /// back, and its records no longer held in memory; a secondary that
    /// restarted without them answers `resend` with what it needs.
    fn break_link(&mut self) {
        self.pipe = None;
        self.generation += 1;
        self.in_flight.clear();
        self.verified = 0;
        self.checking = None;
        self.unchecked = None;
        self.claimed_durable = 0;
        self.check_again_at = None;
        self.next = self.acked + 1;
        self.retry_at = Instant::now() + Duration::from_millis(100);
    }

    /// The record `from`, sent only for the secondary to compare, cannot be
    /// read here: not sent (the first record after it is chained onto it,
    /// once there is one), and not tried again on this connection.
    fn skip_check(&mut self, from: CommitNumber) {
        self.checking = None;
        self.unchecked = Some(from);
        self.next = from + 1;
    }

    /// Compare our hash of record `number` with the secondary's
    /// (`record_hash`): for a record we hold only as our last commit's hash
    /// (a primary started from a backup), and a quiet node where no next
    /// record comes to be chained.
    fn check_hash(&mut self, number: CommitNumber, ctx: &mut Context<Self>) {
        let generation = self.generation;
        self.storage
            .send(RecordHashOf { number })
            .into_actor(self)
            .map(move |res, act, _| {
                let Ok(Ok(ours)) = res else {
                    // Not even its hash: only the next record's chain
                    // check will tell.
                    return;
                };
                if act.generation != generation {
                    return;
                }
                let Some(pipe) = act.pipe.as_mut() else {
                    return;
                };
                match pipe.send(RequestBody::RecordHash { number }) {
                    Ok(id) => act.in_flight.push_back(Sent {
                        id,
                        at: Instant::now(),
                        primary_last: act.primary_last,
                        last_record: None,
                        hash_check: Some((number, ours)),
                    }),
                    Err(e) => act.on_link_error(e),
                }
            })
            .spawn(ctx);
    }

    /// The secondary holds `durable` records of ours durably: tell the
    /// coordinator when that is news.
    fn credit_durable(&mut self, durable: CommitNumber) {
        if durable > self.durable {
            self.durable = durable;
            self.acks.do_send(ReplicaAck {
                server_id: self.peer.server_id,
                durable,
            });
        }
    }

    /// The secondary holds another record than ours under `number`: it can
    /// never acknowledge ours, and no check would change that.
    fn diverged_at(&mut self, number: CommitNumber) {
        warn!(
            "replication to {}: it holds other records than ours at commit {number}",
            self.peer.addr
        );
        self.trouble.do_send(ReplicaTrouble {
            server_id: self.peer.server_id,
            addr: self.peer.addr.clone(),
            reason: format!("it holds other records than ours at commit {number}"),
            newer_epoch: None,
            diverged: Some(number),
        });
        self.break_link();
    }

    /// The secondary's answer to a hash check of record `number`.
    fn on_hash_checked(
        &mut self,
        number: CommitNumber,
        ours: Hash,
        answer: Result<ResponseBody, LinkError>,
    ) {
        match answer {
            Ok(ResponseBody::RecordHash { number: n, hash }) if n == number => {
                if hash.as_slice() == ours.as_slice() {
                    self.verified = self.verified.max(number);
                    self.credit_durable(self.claimed_durable.min(self.verified));
                } else {
                    self.diverged_at(number);
                }
            }
            Ok(other) => {
                warn!(
                    "replication to {}: a `{}` response to record_hash {number}; reconnecting",
                    self.peer.addr,
                    crate::client::response_type(&other)
                );
                self.break_link();
            }
            // It cannot tell now (busy, or it no longer holds the record):
            // asked again at the next answer that claims the record, and
            // the next record's chain check tells meanwhile.
            Err(LinkError::Server { error, .. }) => {
                debug!(
                    "replication to {}: record_hash {number} refused: {error}",
                    self.peer.addr
                );
                self.check_again_at = Some(Instant::now() + HASH_CHECK_RETRY);
            }
            Err(e) => self.on_link_error(e),
        }
    }

    /// Outstanding records not acknowledged: since when?
    fn refresh_stall(&mut self) {
        if self.heard && self.acked >= self.primary_last {
            self.stalled_since = None;
            self.reported_at = None;
        } else if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
        }
    }

    /// Tell the supervisor, once per episode, when the trouble has lasted
    /// long enough (or at once for an unreachable peer: the supervisor
    /// verifies before acting).
    fn report(&mut self, reason: String, newer_epoch: Option<Epoch>) {
        let recent = self
            .reported_at
            .is_some_and(|t| t.elapsed() < self.settings.replica_timeout);
        if recent && newer_epoch.is_none() {
            return;
        }
        self.reported_at = Some(Instant::now());
        self.trouble.do_send(ReplicaTrouble {
            server_id: self.peer.server_id,
            addr: self.peer.addr.clone(),
            reason,
            newer_epoch,
            diverged: None,
        });
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if let Some(sent) = self.in_flight.front() {
            if sent.at.elapsed() >= self.settings.call_timeout {
                let after = sent.at.elapsed();
                self.on_link_error(LinkError::Timeout {
                    addr: self.peer.addr.clone(),
                    after,
                });
            }
        }
        if let Some(since) = self.stalled_since {
            if since.elapsed() >= self.settings.replica_timeout {
                let reason = format!(
                    "no acknowledgement beyond {} for {:?} ({} outstanding)",
                    self.acked,
                    since.elapsed(),
                    self.primary_last.saturating_sub(self.acked)
                );
                self.report(reason, None);
            }
        }
        self.pump(ctx);
    }

    fn stats(&self) -> ReplicaStats {
        // Before its first answer, only what it holds durably is known;
        // after, what this connection has shown it holds as ours (the
        // supervisor chooses a successor by it).
        let applied = if self.heard {
            self.acked.min(self.verified.max(self.durable))
        } else {
            self.durable
        };
        let lag_ms = self
            .handed
            .front()
            .map(|(_, t)| t.elapsed().as_millis() as u64)
            .or_else(|| {
                // Outstanding records we were not handed (read back from
                // the log after a restart or overflow): since the stall.
                (applied < self.primary_last)
                    .then(|| self.stalled_since.map(|s| s.elapsed().as_millis() as u64))
                    .flatten()
            })
            .unwrap_or(0);
        ReplicaStats {
            applied,
            durable: self.durable,
            lag_commits: self.primary_last.saturating_sub(applied),
            lag_ms,
            connected: self.pipe.is_some() || self.busy,
        }
    }
}

impl Actor for BroadcastActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        info!(
            "replicating to {} (server {:x}) from commit {}",
            self.peer.addr, self.peer.server_id, self.next
        );
        ctx.run_interval(Duration::from_millis(20), |act, ctx| act.tick(ctx));
        self.pump(ctx);
    }
}

impl Handler<ProbeDurable> for BroadcastActor {
    type Result = ();

    fn handle(&mut self, _: ProbeDurable, ctx: &mut Context<Self>) {
        self.probe = true;
        self.pump(ctx);
    }
}

impl Handler<Broadcast> for BroadcastActor {
    type Result = ();

    fn handle(&mut self, msg: Broadcast, ctx: &mut Context<Self>) {
        let now = Instant::now();
        for (number, body) in msg.records {
            if number > self.primary_last {
                self.primary_last = number;
            }
            if number >= self.next {
                self.queue.admit(number, body);
            }
            // Beyond the cap only the oldest entries matter for the lag.
            if number > self.acked
                && self.handed.back().is_none_or(|(n, _)| *n < number)
                && self.handed.len() < MAX_QUEUE
            {
                self.handed.push_back((number, now));
            }
        }
        self.refresh_stall();
        self.pump(ctx);
    }
}

/// What the pipelined connection read. Sender: the pipe's reader and
/// writer tasks (see `PeerLink::into_pipe`).
#[derive(Message)]
#[rtype(result = "()")]
struct LinkEvent {
    generation: u64,
    event: PipeEvent,
}

impl Handler<LinkEvent> for BroadcastActor {
    type Result = ();

    fn handle(&mut self, msg: LinkEvent, ctx: &mut Context<Self>) {
        if msg.generation != self.generation {
            return;
        }
        match msg.event {
            PipeEvent::Reply { id, body, .. } => self.on_reply(id, body.map(|b| *b)),
            PipeEvent::Broken(e) => self.on_link_error(e),
        }
        self.pump(ctx);
    }
}

impl Handler<StopBroadcast> for BroadcastActor {
    type Result = ();

    fn handle(&mut self, _: StopBroadcast, ctx: &mut Context<Self>) {
        info!("stopped replicating to {}", self.peer.addr);
        ctx.stop();
    }
}

impl Handler<GetReplicaStats> for BroadcastActor {
    type Result = MessageResult<GetReplicaStats>;

    fn handle(&mut self, _: GetReplicaStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_held_for_a_secondary_are_bounded_by_bytes() {
        let mut held = Held::default();
        let mib = |n: usize| Arc::new(vec![0u8; n << 20]);
        for n in 1..=64 {
            assert!(held.admit(n, mib(1)), "record {n} fits");
        }
        assert!(!held.admit(65, mib(1)), "64 MiB held: read it back later");
        assert_eq!(held.bytes, 64 << 20);
        held.drop_through(10);
        assert_eq!(held.bytes, 54 << 20);
        assert!(held.get(&10).is_none() && held.get(&11).is_some());
        assert!(held.admit(65, mib(1)));
        // The same record twice is counted once.
        assert!(held.admit(65, mib(1)));
        assert_eq!(held.bytes, 55 << 20);
        // A gap read back from the log is always taken.
        held.insert_read_back(5, mib(20));
        assert!(held.get(&5).is_some());
        assert_eq!(held.bytes, 75 << 20);
        held.drop_through(u64::MAX - 1);
        assert_eq!(held.bytes, 0);
    }

    /// Swallows what a broadcaster reports.
    struct Sink;

    impl Actor for Sink {
        type Context = Context<Self>;
    }

    impl Handler<ReplicaAck> for Sink {
        type Result = ();
        fn handle(&mut self, _: ReplicaAck, _: &mut Context<Self>) {}
    }

    impl Handler<ReplicaTrouble> for Sink {
        type Result = ();
        fn handle(&mut self, _: ReplicaTrouble, _: &mut Context<Self>) {}
    }

    /// A broadcaster to secondary 2 of a fresh repository, its stream at
    /// `next` with the primary at `primary_last`, nothing connected; the
    /// directory must outlive it.
    fn broadcaster(
        tmp: &std::path::Path,
        next: CommitNumber,
        primary_last: CommitNumber,
        max_in_flight: usize,
    ) -> BroadcastActor {
        let mut repo =
            crate::storage::Repository::create(&tmp.join("r"), 1, "127.0.0.1:1").unwrap();
        let identity = crate::actors::storage::Identity::of(&mut repo).unwrap();
        let storage = StorageActor::start(
            repo,
            tokio::sync::watch::channel(0).0,
            tokio::sync::watch::channel(identity).0,
            Duration::ZERO,
        );
        let sink = Sink.start();
        let settings = LinkSettings {
            replica_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(2),
            coalesce: None,
            max_in_flight,
            ack: ReplicateAck::Durable,
        };
        let peer = Member {
            server_id: 2,
            addr: "127.0.0.1:1".into(),
            role: crate::types::MemberRole::Secondary,
        };
        BroadcastActor::new(
            peer,
            1,
            Epoch::initial(1),
            next,
            primary_last,
            storage,
            sink.clone().recipient(),
            sink.recipient(),
            settings,
        )
    }

    #[actix::test]
    async fn a_secondary_not_heard_from_is_not_shown_level() {
        let tmp = tempfile::tempdir().unwrap();
        // Promoted at 100; the secondary's stream starts at 101, but it
        // has said nothing yet (it may hold 90).
        let mut b = broadcaster(tmp.path(), 101, 100, 1);
        let s = b.stats();
        assert_eq!((s.applied, s.lag_commits), (0, 100));
        // Its first answer tells, once shown to be ours.
        b.heard = true;
        b.acked = 90;
        let s = b.stats();
        assert_eq!((s.applied, s.lag_commits), (0, 100), "not shown yet");
        b.verified = 90;
        let s = b.stats();
        assert_eq!((s.applied, s.lag_commits), (90, 10));
    }

    /// An answer is clamped to what the primary held when its request
    /// went, not when the answer comes: a batch up to 95 and then a
    /// heartbeat sent at 96, answered (100, 100) by a secondary holding an
    /// older 96..100, must not credit it with the primary's new 96,
    /// applied meanwhile and still on its way.
    #[actix::test]
    async fn an_answer_is_credited_with_what_its_request_carried() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = broadcaster(tmp.path(), 95, 94, 4);
        b.in_flight.push_back(sent(1, 95, Some(95)));
        b.primary_last = 96;
        b.in_flight.push_back(sent(2, 96, None));
        b.next = 97;
        b.on_reply(
            1,
            Ok(ResponseBody::Replicated {
                applied: 100,
                durable: 100,
            }),
        );
        assert_eq!((b.acked, b.durable), (95, 95));
        // The heartbeat sent at 95, answered after 96 was applied here:
        // still 95, even were 96 shown to be ours.
        b.in_flight.push_back(sent(3, 95, None));
        b.verified = 96;
        answer(&mut b, 3, 100, 100);
        assert_eq!((b.acked, b.durable), (95, 95));
    }

    /// A request in flight: `id`, carrying `primary_last` and records up
    /// to `last_record` (`None`: a heartbeat).
    fn sent(id: u64, primary_last: CommitNumber, last_record: Option<CommitNumber>) -> Sent {
        Sent {
            id,
            at: Instant::now(),
            primary_last,
            last_record,
            hash_check: None,
        }
    }

    fn answer(b: &mut BroadcastActor, id: u64, applied: CommitNumber, durable: CommitNumber) {
        b.on_reply(id, Ok(ResponseBody::Replicated { applied, durable }));
    }

    /// After a restart or a promotion at 100 the stream starts at 101, and
    /// a heartbeat goes first. The secondary's answer (100, 100) says how
    /// many records it holds, not whose: it may hold a former primary's
    /// record 100. Nothing is credited until a batch it accepts shows it:
    /// record 100 goes again, for it to compare with its own.
    #[actix::test]
    async fn a_heartbeat_answer_is_credited_only_once_a_batch_shows_the_records_are_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = broadcaster(tmp.path(), 101, 100, 4);
        b.in_flight.push_back(sent(1, 100, None));
        answer(&mut b, 1, 100, 100);
        assert_eq!(b.durable, 0, "credited on a heartbeat");
        assert_eq!(
            (b.next, b.checking),
            (100, Some(100)),
            "its last record goes again"
        );
        // A connection lost meanwhile resumes where it holds (and checks
        // again), never from the start of the log.
        b.break_link();
        assert_eq!((b.next, b.verified, b.checking), (101, 0, None));
        b.in_flight.push_back(sent(1, 100, None));
        answer(&mut b, 1, 100, 100);
        assert_eq!(b.next, 100);
        // It accepted record 100: its chain check passed.
        b.in_flight.push_back(sent(2, 100, Some(100)));
        answer(&mut b, 2, 100, 100);
        assert_eq!((b.acked, b.durable, b.verified), (100, 100, 100));
        // Later heartbeats are credited up to what was shown.
        b.in_flight.push_back(sent(3, 100, None));
        answer(&mut b, 3, 100, 100);
        assert_eq!((b.acked, b.durable), (100, 100));
        // A new connection shows it all again.
        b.break_link();
        assert_eq!(b.verified, 0);
    }

    /// A secondary behind the stream's start gets the records after its
    /// last: the first one's chain check shows that what it holds is ours.
    #[actix::test]
    async fn a_secondary_behind_gets_the_records_after_its_last_before_any_credit() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = broadcaster(tmp.path(), 101, 100, 4);
        b.in_flight.push_back(sent(1, 100, None));
        answer(&mut b, 1, 90, 90);
        assert_eq!((b.acked, b.durable, b.next, b.checking), (90, 0, 91, None));
        b.in_flight.push_back(sent(2, 100, Some(100)));
        answer(&mut b, 2, 100, 95);
        assert_eq!((b.acked, b.durable, b.verified), (100, 95, 100));
    }

    /// A heartbeat answered while a batch is in flight waits for the
    /// batch's answer: nothing is resent meanwhile.
    #[actix::test]
    async fn an_unchecked_answer_with_a_batch_in_flight_waits_for_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = broadcaster(tmp.path(), 101, 100, 4);
        b.in_flight.push_back(sent(1, 100, None));
        b.primary_last = 102;
        b.in_flight.push_back(sent(2, 102, Some(102)));
        b.next = 103;
        answer(&mut b, 1, 100, 100);
        assert_eq!((b.durable, b.next), (0, 103));
        answer(&mut b, 2, 102, 102);
        assert_eq!((b.acked, b.durable, b.next), (102, 102, 103));
    }

    /// A broadcaster streaming from 101 whose secondary said it holds 100,
    /// which could not be read back to check it.
    fn unreadable_check(dir: &std::path::Path) -> BroadcastActor {
        let mut b = broadcaster(dir, 101, 100, 4);
        b.in_flight.push_back(sent(1, 100, None));
        answer(&mut b, 1, 100, 100);
        b.skip_check(100);
        b
    }

    /// A primary started from a backup holds no record up to its snapshot:
    /// its secondary's last one cannot be sent to compare. The check is
    /// not retried for ever; the record's hash is compared instead, and
    /// failing that, the next record's chain check tells.
    #[actix::test]
    async fn a_record_that_cannot_be_read_to_check_is_compared_by_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = broadcaster(tmp.path(), 101, 100, 4);
        b.in_flight.push_back(sent(1, 100, None));
        answer(&mut b, 1, 100, 100);
        assert_eq!(b.checking, Some(100));
        b.skip_check(100);
        assert_eq!((b.next, b.checking, b.unchecked), (101, None, Some(100)));
        // Heartbeats answered meanwhile ask for no check again.
        b.in_flight.push_back(sent(2, 100, None));
        answer(&mut b, 2, 100, 100);
        assert_eq!((b.next, b.checking, b.durable), (101, None, 0));
        // The hash of its record 100 is ours: what it holds is credited.
        let ours = [7u8; 32];
        let hash_check = |id, number| Sent {
            hash_check: Some((number, ours)),
            ..sent(id, 100, None)
        };
        b.in_flight.push_back(hash_check(3, 100));
        b.on_reply(
            3,
            Ok(ResponseBody::RecordHash {
                number: 100,
                hash: ours.to_vec(),
            }),
        );
        assert_eq!((b.durable, b.verified), (100, 100));

        // Another hash: it diverged, and the link is dropped.
        let mut b = unreadable_check(&tmp.path().join("2"));
        b.in_flight.push_back(hash_check(2, 100));
        b.on_reply(
            2,
            Ok(ResponseBody::RecordHash {
                number: 100,
                hash: vec![8u8; 32],
            }),
        );
        assert_eq!((b.durable, b.verified, b.generation), (0, 0, 1));

        // It cannot tell now: asked again at the next answer.
        let mut b = unreadable_check(&tmp.path().join("4"));
        b.in_flight.push_back(hash_check(2, 100));
        b.on_reply(
            2,
            Err(LinkError::Server {
                addr: "s".into(),
                error: WireError::Unavailable {
                    reason: "busy".into(),
                },
            }),
        );
        assert_eq!(b.generation, 0, "link kept");
        assert!(b.check_again_at.is_some(), "check re-armed");
        // Not at the next heartbeat: after a second.
        b.in_flight.push_back(sent(3, 100, None));
        answer(&mut b, 3, 100, 100);
        assert_eq!(b.checking, None);
        b.check_again_at = Some(Instant::now());
        b.in_flight.push_back(sent(4, 100, None));
        answer(&mut b, 4, 100, 100);
        assert_eq!(b.checking, Some(100));

        // No hash either (it cannot tell): the next commit's batch, once
        // taken, credits everything.
        let mut b = unreadable_check(&tmp.path().join("3"));
        b.primary_last = 101;
        b.in_flight.push_back(sent(3, 101, Some(101)));
        answer(&mut b, 3, 101, 101);
        assert_eq!((b.durable, b.verified), (101, 101));
    }

    #[test]
    fn a_secondary_is_never_credited_beyond_what_the_primary_holds() {
        // It holds 101 from before the primary lost its unsynced tail.
        assert_eq!(credited(101, 101, 100), (100, 100));
        assert_eq!(credited(99, 98, 100), (99, 98));
        assert_eq!(credited(100, 100, 100), (100, 100));
    }
}
