//! `FollowerActor`: a secondary's side of catching up.
//!
//! On a server started on a backup (restore mode), it pulls globs of commit
//! records from the primary (`catch_up`), applies them through the
//! `StorageActor` and makes them durable, until a glob brings it level. The
//! primary then adds it to the node and streams records to it (`replicate`,
//! handled by sessions, which tell this actor they heard from the primary).
//! If the primary falls silent for `replica_timeout`, or a batch does not
//! continue its log, it re-syncs by pulling again from its last applied
//! number.
//!
//! It never commits and never changes membership: it reports its state to
//! the `NodeSupervisor` ([`FollowerReport`]).

use std::time::{Duration, Instant};

use actix::prelude::*;
use log::{error, info, warn};

use crate::actors::broadcast::LinkSettings;
use crate::actors::commit_log::{CommitLogActor, Flush};
use crate::actors::controller::Fatal;
use crate::actors::peer_link::{LinkError, PeerLink};
use crate::actors::storage::{ApplyRecords, GetInfo, StorageActor};
use crate::actors::supervisor::NodeSupervisor;
use crate::protocol::{RequestBody, ResponseBody, WireError};
use crate::storage::StorageError;
use crate::types::{CommitNumber, Epoch, NodeAddr};

const GLOB_RECORDS: u32 = 10_000;
const GLOB_BYTES: u64 = 8 << 20;
/// The primary followed while catching up could not be reached for this
/// long: ask the node who leads now (and again as often while it lasts).
const PRIMARY_LOST_AFTER: Duration = Duration::from_secs(2);
/// The server followed has served an older epoch than this copy's for this
/// long, and no other primary was found: say what it may mean, once. The
/// copy is never deposed for it: the node's primary of the copy's epoch
/// may only be slow to come back.
const STALE_TOLD_AFTER: Duration = Duration::from_secs(10);
/// The smallest glob asked for after timeouts.
const MIN_GLOB_BYTES: u64 = 64 << 10;

/// The glob size to ask for next: halved after a pull timed out (a link
/// too slow to carry a whole glob within the call timeout would otherwise
/// fail the same way for ever), grown back by an eighth after each one
/// that came in (doubling would make every other pull time out).
fn next_glob_bytes(current: u64, timed_out: bool) -> u64 {
    if timed_out {
        (current / 2).max(MIN_GLOB_BYTES)
    } else {
        (current + current / 8).min(GLOB_BYTES)
    }
}

/// Where catching up stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FollowState {
    /// Pulling globs; not level yet.
    CatchingUp { primary: NodeAddr },
    /// Level with the primary, which streams to us.
    Streaming { primary: NodeAddr },
    /// Gave up; needs the operator (e.g. a new backup).
    Stopped { reason: String },
}

/// Why applying a glob failed.
enum GlobFailed {
    /// It came from a server of an older epoch than our copy's.
    Stale {
        theirs: Epoch,
        ours: Epoch,
    },
    /// Its first record does not continue our log (at this number).
    Diverged(CommitNumber),
    Other(String),
}

/// State changes. Receiver: the `NodeSupervisor`.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct FollowerReport {
    pub state: FollowState,
    pub applied: CommitNumber,
}

/// The primary's stream arrived (records or heartbeat). Sender: sessions
/// handling `replicate`; may be dropped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PrimaryHeard {
    pub primary_last: CommitNumber,
    /// What this server has applied now.
    pub applied: CommitNumber,
}

/// The stream did not continue our log: pull from our last applied number.
/// Sender: sessions handling `replicate`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resync;

/// Stop following (removed from the node, or promoted). Sender: the
/// supervisor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopFollowing;

pub struct FollowerActor {
    primary: NodeAddr,
    server_id: u64,
    advertise: NodeAddr,
    repository_id: String,
    storage: Addr<StorageActor>,
    flusher: Addr<CommitLogActor>,
    /// Told of state changes, node changes, divergence, and a primary that
    /// cannot be reached or names us.
    supervisor: Addr<NodeSupervisor>,
    /// Stops the server when caught-up records cannot be applied or synced.
    fatal: Recipient<Fatal>,
    settings: LinkSettings,
    link: Option<PeerLink>,
    busy: bool,
    applied: CommitNumber,
    state: FollowState,
    last_heard: Instant,
    retry_at: Instant,
    /// Globs pulled since the last level state (for the log line).
    pulled: u64,
    started_at: Instant,
    /// Bytes asked for per glob (see [`next_glob_bytes`]).
    glob_bytes: u64,
    /// Since when the primary cannot be reached (catching up).
    unreachable_since: Option<Instant>,
    /// When the supervisor was last told so.
    told_lost_at: Option<Instant>,
    /// Since when the server followed serves an older epoch than ours, and
    /// whether the operator was told what it may mean.
    stale_since: Option<Instant>,
    stale_told: bool,
}

impl FollowerActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        primary: NodeAddr,
        server_id: u64,
        advertise: NodeAddr,
        repository_id: String,
        applied: CommitNumber,
        storage: Addr<StorageActor>,
        flusher: Addr<CommitLogActor>,
        supervisor: Addr<NodeSupervisor>,
        fatal: Recipient<Fatal>,
        settings: LinkSettings,
    ) -> Self {
        FollowerActor {
            state: FollowState::CatchingUp {
                primary: primary.clone(),
            },
            primary,
            server_id,
            advertise,
            repository_id,
            storage,
            flusher,
            supervisor,
            fatal,
            settings,
            link: None,
            busy: false,
            applied,
            last_heard: Instant::now(),
            retry_at: Instant::now(),
            pulled: 0,
            started_at: Instant::now(),
            glob_bytes: GLOB_BYTES,
            unreachable_since: None,
            told_lost_at: None,
            stale_since: None,
            stale_told: false,
        }
    }

    fn set_state(&mut self, state: FollowState) {
        if state != self.state {
            self.state = state.clone();
            self.supervisor.do_send(FollowerReport {
                state,
                applied: self.applied,
            });
        }
    }

    fn pull(&mut self, ctx: &mut Context<Self>) {
        if self.busy || Instant::now() < self.retry_at {
            return;
        }
        if !matches!(self.state, FollowState::CatchingUp { .. }) {
            return;
        }
        let primary = self.primary.clone();
        let request = RequestBody::CatchUp {
            from: self.applied + 1,
            max_count: GLOB_RECORDS,
            max_bytes: self.glob_bytes,
            server_id: self.server_id,
            addr: self.advertise.clone(),
            repository_id: self.repository_id.clone(),
            for_promotion: false,
        };
        let link = self.link.take();
        let timeout = self.settings.call_timeout;
        self.busy = true;
        async move {
            let mut link = match link {
                Some(l) => l,
                None => PeerLink::connect(&primary, timeout).await?,
            };
            let res = link.call(request, timeout).await;
            res.map(|r| (link, r))
        }
        .into_actor(self)
        .map(|res, act, ctx| match res {
            Ok((
                link,
                (
                    _,
                    ResponseBody::Records {
                        records,
                        level,
                        last,
                        epoch,
                    },
                ),
            )) => {
                act.link = Some(link);
                act.unreachable_since = None;
                act.glob_bytes = next_glob_bytes(act.glob_bytes, false);
                act.apply(records, level, last, epoch, ctx);
            }
            Ok((link, (_, other))) => {
                act.busy = false;
                warn!(
                    "catch-up from {}: unexpected answer, a `{}` response",
                    act.primary,
                    crate::client::response_type(&other)
                );
                drop(link);
                act.retry(Duration::from_millis(500));
            }
            Err(e) => {
                act.busy = false;
                if matches!(e, LinkError::Timeout { .. }) {
                    act.glob_bytes = next_glob_bytes(act.glob_bytes, true);
                }
                act.on_pull_error(e);
            }
        })
        .spawn(ctx);
    }

    fn on_pull_error(&mut self, e: LinkError) {
        match e {
            LinkError::Server {
                error: WireError::WrongServer { primary: Some(p) },
                ..
            } if p == self.advertise => {
                // Following ourselves would go nowhere: the supervisor
                // decides (an unfinished hand-over), and we ask again.
                warn!(
                    "catch-up: {} names this server as the primary; retrying",
                    self.primary
                );
                self.supervisor
                    .do_send(crate::actors::supervisor::NamedAsPrimary {
                        by: self.primary.clone(),
                    });
                self.retry(Duration::from_secs(1));
            }
            LinkError::Server {
                error: WireError::WrongServer { primary: Some(p) },
                ..
            } if p != self.primary => {
                info!(
                    "catch-up: {} is not the primary; following {p}",
                    self.primary
                );
                self.primary = p.clone();
                // What was measured of the former one says nothing of it.
                self.unreachable_since = None;
                self.told_lost_at = None;
                self.stale_since = None;
                self.stale_told = false;
                self.set_state(FollowState::CatchingUp { primary: p });
                self.retry(Duration::ZERO);
            }
            LinkError::Server {
                error:
                    error @ (WireError::LogTruncated { .. }
                    | WireError::RepositoryMismatch { .. }
                    | WireError::Diverged { .. }),
                ..
            } => {
                let reason = match &error {
                    WireError::LogTruncated { requested, oldest } => format!(
                        "the primary {} no longer holds commit {requested} (oldest {oldest}): start this server from a new backup",
                        self.primary
                    ),
                    other => format!("the primary {} refuses us: {other}", self.primary),
                };
                error!("{reason}");
                self.set_state(FollowState::Stopped { reason });
            }
            other => {
                warn!("catch-up from {}: {other}; retrying", self.primary);
                if other.is_unreachable() {
                    self.primary_unreachable();
                }
                self.retry(Duration::from_millis(500));
            }
        }
    }

    /// A server catching up is not a member: no new primary streams to
    /// it, and a dead primary would be followed for ever. After
    /// [`PRIMARY_LOST_AFTER`], the supervisor asks the node who leads now.
    fn primary_unreachable(&mut self) {
        let since = *self.unreachable_since.get_or_insert_with(Instant::now);
        let told_recently = self
            .told_lost_at
            .is_some_and(|t| t.elapsed() < PRIMARY_LOST_AFTER);
        if since.elapsed() >= PRIMARY_LOST_AFTER && !told_recently {
            self.told_lost_at = Some(Instant::now());
            self.supervisor
                .do_send(crate::actors::supervisor::PrimaryUnreachable {
                    primary: self.primary.clone(),
                    unreachable_for: Some(since.elapsed()),
                });
        }
    }

    fn retry(&mut self, after: Duration) {
        self.link = None;
        self.retry_at = Instant::now() + after;
    }

    fn apply(
        &mut self,
        records: Vec<serde_bytes::ByteBuf>,
        level: bool,
        primary_last: CommitNumber,
        epoch: Epoch,
        ctx: &mut Context<Self>,
    ) {
        let bodies: Vec<Vec<u8>> = records.into_iter().map(|b| b.into_vec()).collect();
        let flusher = self.flusher.clone();
        let storage = self.storage.clone();
        let fatal = self.fatal.clone();
        let stop = move |reason: String| {
            fatal.do_send(Fatal {
                reason: reason.clone(),
            });
            reason
        };
        async move {
            // A server of an older epoch (a former primary back, or cut
            // off, that still serves as one) is not the node's primary: its
            // records say nothing about whether ours diverged.
            let ours = storage
                .send(GetInfo)
                .await
                .map_err(|e| GlobFailed::Other(e.to_string()))?
                .map_err(|e| GlobFailed::Other(e.to_string()))?
                .epoch;
            if epoch < ours {
                return Err(GlobFailed::Stale { theirs: epoch, ours });
            }
            let applied = storage
                .send(ApplyRecords::plain(bodies))
                .await
                .map_err(|e| GlobFailed::Other(e.to_string()))?
                .map_err(|e| {
                    if let StorageError::ChainMismatch { number } = e {
                        GlobFailed::Diverged(number)
                    } else if e.is_fatal() && !crate::actors::storage::is_closed(&e) {
                        // Half applied, or the disk failing: this copy
                        // must not go on.
                        GlobFailed::Other(stop(format!("applying caught-up records failed: {e}")))
                    } else {
                        GlobFailed::Other(e.to_string())
                    }
                })?;
            if let Some(sync) = applied.sync.clone() {
                flusher
                    .send(Flush { sync })
                    .await
                    .map_err(|e| GlobFailed::Other(e.to_string()))?
                    .map_err(|e| {
                        GlobFailed::Other(stop(format!("fsync of caught-up records failed: {e}")))
                    })?;
            }
            Ok::<_, GlobFailed>((applied.last, applied.node_changed))
        }
        .into_actor(self)
        .map(move |res, act, ctx| {
            act.busy = false;
            match res {
                Ok((last, node_changed)) => {
                    act.applied = last;
                    act.stale_since = None;
                    act.stale_told = false;
                    if let Some(node) = node_changed {
                        act.supervisor
                            .do_send(crate::actors::supervisor::NodeLearned { node, at: last });
                    }
                    act.pulled += 1;
                    if level && last >= primary_last {
                        info!(
                            "caught up with {} at commit {last} ({} globs in {:?}); waiting to be streamed to",
                            act.primary,
                            act.pulled,
                            act.started_at.elapsed()
                        );
                        act.pulled = 0;
                        act.last_heard = Instant::now();
                        act.set_state(FollowState::Streaming {
                            primary: act.primary.clone(),
                        });
                    } else {
                        act.pull(ctx);
                    }
                }
                Err(GlobFailed::Diverged(number)) => {
                    // Our last record is not the primary's: this copy holds
                    // a record the node does not (a failover lost it). It
                    // must stop serving it, not only stop following.
                    act.supervisor
                        .do_send(crate::actors::supervisor::StreamDiverged { number });
                    act.set_state(FollowState::Stopped {
                        reason: format!(
                            "the primary's record {number} does not continue this server's log"
                        ),
                    });
                }
                Err(GlobFailed::Stale { theirs, ours }) => {
                    let since = *act.stale_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= STALE_TOLD_AFTER && !act.stale_told {
                        act.stale_told = true;
                        error!(
                            "catch-up: {} has served epoch {theirs}, older than this copy's \
                             {ours}, for {:?}, and no other primary was found. If the node \
                             now lives in epoch {theirs}, this copy holds records the node \
                             abandoned: start this server from a new backup. It goes on \
                             looking for a primary of epoch {ours} or newer meanwhile.",
                            act.primary,
                            since.elapsed()
                        );
                    } else if since.elapsed() < Duration::from_secs(1) {
                        warn!(
                            "catch-up: {} serves epoch {theirs}, older than this copy's \
                             {ours}: it is not the node's primary; looking for the primary",
                            act.primary
                        );
                    }
                    act.retry(Duration::from_secs(1));
                    act.supervisor
                        .do_send(crate::actors::supervisor::PrimaryUnreachable {
                            primary: act.primary.clone(),
                            unreachable_for: None,
                        });
                }
                Err(GlobFailed::Other(e)) => {
                    error!("catch-up: applying records from {} failed: {e}", act.primary);
                    act.set_state(FollowState::Stopped {
                        reason: format!("applying the primary's records failed: {e}"),
                    });
                }
            }
        })
        .spawn(ctx);
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if let FollowState::Streaming { .. } = self.state {
            if self.last_heard.elapsed() > self.settings.replica_timeout {
                warn!(
                    "nothing from the primary {} for {:?}: re-syncing",
                    self.primary,
                    self.last_heard.elapsed()
                );
                self.set_state(FollowState::CatchingUp {
                    primary: self.primary.clone(),
                });
            }
        }
        self.pull(ctx);
    }
}

impl Actor for FollowerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        info!(
            "following {} from commit {}: catching up",
            self.primary,
            self.applied + 1
        );
        self.supervisor.do_send(FollowerReport {
            state: self.state.clone(),
            applied: self.applied,
        });
        ctx.run_interval(Duration::from_millis(50), |act, ctx| act.tick(ctx));
        self.pull(ctx);
    }
}

impl Handler<PrimaryHeard> for FollowerActor {
    type Result = ();

    fn handle(&mut self, msg: PrimaryHeard, _: &mut Context<Self>) {
        self.last_heard = Instant::now();
        self.applied = self.applied.max(msg.applied);
        if let FollowState::CatchingUp { .. } = self.state {
            // The primary's stream is being applied while we pull (right
            // after the glob that made us level, or after a resync that
            // the stream's own resend already repaired — pipelined
            // batches behind a gap each report it): the stream takes
            // over. A glob still in flight is harmless: its records are
            // skipped as already applied, and it pulls no further once
            // we are streaming.
            if msg.primary_last <= self.applied + GLOB_RECORDS as u64 {
                self.set_state(FollowState::Streaming {
                    primary: self.primary.clone(),
                });
            }
        }
    }
}

impl Handler<Resync> for FollowerActor {
    type Result = ();

    fn handle(&mut self, _: Resync, ctx: &mut Context<Self>) {
        if let FollowState::Streaming { .. } = self.state {
            self.set_state(FollowState::CatchingUp {
                primary: self.primary.clone(),
            });
            self.pull(ctx);
        }
    }
}

impl Handler<StopFollowing> for FollowerActor {
    type Result = ();

    fn handle(&mut self, _: StopFollowing, ctx: &mut Context<Self>) {
        info!("stopped following {}", self.primary);
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_shrink_after_timeouts_and_grow_back() {
        let mut g = GLOB_BYTES;
        for _ in 0..20 {
            g = next_glob_bytes(g, true);
        }
        assert_eq!(g, MIN_GLOB_BYTES);
        g = next_glob_bytes(g, false);
        assert_eq!(g, MIN_GLOB_BYTES + MIN_GLOB_BYTES / 8);
        for _ in 0..60 {
            g = next_glob_bytes(g, false);
        }
        assert_eq!(g, GLOB_BYTES);
    }
}
