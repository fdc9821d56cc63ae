//! `NodeSupervisor`: this server's place in the node.
//!
//! It owns the node as this server knows it, the role it publishes
//! ([`ServerState`], on a `watch` channel sessions read), and the
//! replication actors it starts and stops:
//!
//! * on the **primary**, one `BroadcastActor` per secondary. A catching-up
//!   server that reached the primary's last commit ([`PeerCaughtUp`]) gets a
//!   broadcaster, then a node change adding it is committed. A secondary
//!   reported in trouble (by its broadcaster, or by a client's complaint) is
//!   checked: only if the primary cannot reach it either is it removed
//!   (first from the commit pipeline, so waiting commits complete, then from
//!   the node by a commit). It also tells storage how much log the
//!   secondaries still need;
//! * on a **secondary** (a repository in restore mode), one `FollowerActor`
//!   catching up from the primary the node names (or `--primary`/`follow`).
//!
//! Membership changes are commits through the `CommitCoordinator`, so they
//! replicate like any other.
//!
//! Role changes follow `failover` (pure rules): a commit reaching a
//! secondary whose primary is unreachable promotes the node's successor
//! under a new epoch; a take-over drains the primary to a current secondary
//! and swaps the roles; a primary that meets a newer epoch is deposed; a
//! former primary that restarts rejoins the newer primary if its log is a
//! prefix of that primary's, and otherwise keeps its divergent commits in a
//! file and waits for the operator.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use log::{debug, error, info, warn};
use tokio::sync::watch;

use crate::actors::broadcast::{
    BroadcastActor, GetReplicaStats, LinkSettings, ProbeDurable, ReplicaTrouble, StopBroadcast,
};
use crate::actors::commit_log::{CommitLogActor, Flush};
use crate::actors::convert::{mailbox_error, wire_error};
use crate::actors::coordinator::{
    AddReplica, CommitCoordinator, Fence, JoinedAt, Lead, Pause, RemoveReplica, StopCounting,
    SubmitCommit,
};
use crate::actors::failover::{
    on_commit_at_secondary, on_restart_as_primary, promoted_node, swapped_node, CommitOnSecondary,
    PeerView, Startup,
};
use crate::actors::follower::{
    FollowState, FollowerActor, FollowerReport, PrimaryHeard, Resync, StopFollowing,
};
use crate::actors::peer_link::{reachable, LinkError, PeerHello, PeerLink};
use crate::actors::session::{clipped, MAX_ECHO};
use crate::actors::storage::{
    ApplyRecords, GetAnchor, GetInfo, ReadRecords, RecordHashOf, RetainFrom, SetRestoreMode,
    StorageActor,
};
use crate::client::response_type;
use crate::protocol::{
    MemberStatus, ReplicateAck, RequestBody, ResponseBody, ServerRole, SessionRole, WireError,
};
use crate::storage::CommitRequest;
use crate::types::{CommitNumber, Epoch, Hash, Member, MemberRole, Node, NodeAddr};

/// What this server is, for sessions: published by the supervisor only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerState {
    pub role: ServerRole,
    /// Where commits go (this server when primary).
    pub primary: Option<NodeAddr>,
    /// Why a secondary stopped following, for status and logs.
    pub note: Option<String>,
    /// Nothing published yet: the supervisor is still reading the node to
    /// decide this server's role.
    pub starting: bool,
    /// A promotion or hand-over is under way: the role published may be
    /// about to change.
    pub changing_role: bool,
}

impl ServerState {
    pub fn starting() -> Self {
        ServerState {
            role: ServerRole::Restore,
            primary: None,
            note: None,
            starting: true,
            changing_role: false,
        }
    }
}

/// The parts the supervisor drives.
pub struct SupervisorParts {
    pub storage: Addr<StorageActor>,
    pub flusher: Addr<CommitLogActor>,
    pub commits: Addr<CommitCoordinator>,
    pub state: watch::Sender<ServerState>,
    /// The last applied commit, published by the `StorageActor`.
    pub applied: watch::Receiver<CommitNumber>,
    /// The last durable commit, published by the `CommitLogActor`.
    pub durable: watch::Receiver<CommitNumber>,
    pub advertise: NodeAddr,
    /// The repository directory (divergent commits are kept there).
    pub dir: std::path::PathBuf,
    /// `--primary`: follow this server instead of the node's primary.
    pub follow: Option<NodeAddr>,
    pub settings: LinkSettings,
    /// Stops the server: a catch-up whose records cannot be applied or
    /// made durable leaves this copy unfit to serve.
    pub fatal: Recipient<crate::actors::controller::Fatal>,
}

pub struct NodeSupervisor {
    parts: SupervisorParts,
    server_id: u64,
    repository_id: String,
    is_primary: bool,
    node: Node,
    /// The commit as of which a secondary's `node` was learned from applied
    /// records: a node learned as of an earlier commit (a catch-up glob
    /// whose fsync finished after a streamed batch's) never replaces it.
    node_at: CommitNumber,
    epoch: Epoch,
    last_commit: CommitNumber,
    broadcasters: HashMap<u64, Addr<BroadcastActor>>,
    follower: Option<Addr<FollowerActor>>,
    follow_state: Option<FollowState>,
    /// Catching-up servers and the record they asked for last.
    catching_up: HashMap<u64, (CommitNumber, Instant)>,
    /// Member checks in progress (server ids).
    checking: std::collections::HashSet<u64>,
    /// Members whose removal is being committed, and removed members still
    /// streamed to until they apply their removal (server ids): neither is
    /// added back by catching up meanwhile.
    /// Each entry carries the generation of its removal, so a timer or a
    /// completion of an earlier removal never acts on a later one.
    removing: HashMap<u64, u64>,
    retiring: HashMap<u64, u64>,
    removal_gen: u64,
    /// A promotion or hand-over is under way.
    changing_role: bool,
    /// Asking the members who leads (see [`PrimaryUnreachable`]).
    looking_for_primary: bool,
    /// A restart as former primary is held by a silent member (logged once).
    restart_held: bool,
    /// A primary of an older epoch than the copy's, already reported.
    told_older_leader: Option<NodeAddr>,
    /// The server this one handed the node over to, until this one leads
    /// again (see [`NamedAsPrimary`]).
    handed_over_to: Option<u64>,
    /// This copy's log diverged from the primary's stream (see
    /// [`StreamDiverged`]): deposed for good in this process.
    diverged: Option<String>,
}

impl NodeSupervisor {
    pub fn new(parts: SupervisorParts) -> Self {
        NodeSupervisor {
            parts,
            server_id: 0,
            repository_id: String::new(),
            is_primary: false,
            node: Node::default(),
            node_at: 0,
            epoch: Epoch::default(),
            last_commit: 0,
            broadcasters: HashMap::new(),
            follower: None,
            follow_state: None,
            catching_up: HashMap::new(),
            checking: Default::default(),
            removing: HashMap::new(),
            retiring: HashMap::new(),
            removal_gen: 0,
            changing_role: false,
            looking_for_primary: false,
            restart_held: false,
            told_older_leader: None,
            handed_over_to: None,
            diverged: None,
        }
    }

    /// Mark a promotion or hand-over as under way (or over), also for the
    /// sessions: a server taking over answers catching-up peers
    /// `unavailable`, not `wrong_server` naming the primary it replaces.
    fn set_changing_role(&mut self, on: bool) {
        self.changing_role = on;
        self.parts.state.send_if_modified(|s| {
            let changed = s.changing_role != on;
            s.changing_role = on;
            changed
        });
    }

    fn publish(&self, role: ServerRole, primary: Option<NodeAddr>, note: Option<String>) {
        if self.diverged.is_some() && role != ServerRole::Deposed {
            // Deposed for good in this process: its reads stay refused,
            // whatever a late completion (a follow check, a follower's
            // report) would publish.
            return;
        }
        self.parts.state.send_if_modified(|s| {
            let new = ServerState {
                role,
                primary,
                note,
                starting: false,
                changing_role: s.changing_role,
            };
            let changed = *s != new;
            if changed {
                info!(
                    "role: {:?}{}{}",
                    new.role,
                    new.primary
                        .as_deref()
                        .map(|p| format!(", primary {p}"))
                        .unwrap_or_default(),
                    new.note
                        .as_deref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                );
                *s = new;
            }
            changed
        });
    }

    fn publish_follow_state(&self) {
        if let Some(note) = &self.diverged {
            let primary = self.node.primary().map(|p| p.addr.clone());
            self.publish(ServerRole::Deposed, primary, Some(note.clone()));
            return;
        }
        let Some(state) = &self.follow_state else {
            self.publish(ServerRole::Restore, None, None);
            return;
        };
        match state {
            FollowState::CatchingUp { primary } | FollowState::Streaming { primary } => {
                // A member re-syncing after a gap is still a secondary; a
                // server the primary has not added yet is catching up.
                let member = self
                    .node
                    .secondaries()
                    .any(|m| m.server_id == self.server_id);
                let role = if member {
                    ServerRole::Secondary
                } else {
                    ServerRole::CatchingUp
                };
                self.publish(role, Some(primary.clone()), None);
            }
            FollowState::Stopped { reason } => {
                self.publish(ServerRole::Restore, None, Some(reason.clone()))
            }
        }
    }

    /// Stream to `member` from `next` on. `joining`: it is not yet in the
    /// node (see the coordinator's `JoinedAt`).
    fn start_broadcaster(
        &mut self,
        member: Member,
        next: CommitNumber,
        joining: bool,
        ctx: &mut Context<Self>,
    ) {
        if self.broadcasters.contains_key(&member.server_id) {
            return;
        }
        let server_id = member.server_id;
        let b = BroadcastActor::new(
            member,
            self.server_id,
            self.epoch,
            next,
            self.last(),
            self.parts.storage.clone(),
            self.parts.commits.clone().recipient(),
            ctx.address().recipient(),
            self.parts.settings,
        )
        .start();
        self.parts.commits.do_send(AddReplica {
            server_id,
            link: b.clone().recipient(),
            joining,
        });
        self.broadcasters.insert(server_id, b);
    }

    fn stop_broadcaster(&mut self, server_id: u64) {
        // Its stream is gone: nothing left to retire. (A removal being
        // committed stays marked: the member must not be added back.)
        self.retiring.remove(&server_id);
        self.parts.commits.do_send(RemoveReplica { server_id });
        if let Some(b) = self.broadcasters.remove(&server_id) {
            b.do_send(StopBroadcast);
        }
    }

    /// Stop streaming to a removed member once it has applied `upto` (its
    /// removal, so it stops following) or a replica timeout passed.
    fn retire_broadcaster(&mut self, server_id: u64, upto: CommitNumber, ctx: &mut Context<Self>) {
        let Some(b) = self.broadcasters.get(&server_id).cloned() else {
            return;
        };
        self.removal_gen += 1;
        let gen = self.removal_gen;
        self.retiring.insert(server_id, gen);
        let patience = self.parts.settings.replica_timeout;
        let watched = b.clone();
        async move {
            let start = Instant::now();
            while start.elapsed() < patience {
                match watched.send(GetReplicaStats).await {
                    Ok(s) if s.applied < upto => {}
                    _ => return,
                }
                actix_rt::time::sleep(Duration::from_millis(10)).await;
            }
        }
        .into_actor(self)
        .map(move |_, act, _| {
            // Unless it was stopped meanwhile (and maybe re-joined since).
            if act.retiring.get(&server_id) == Some(&gen)
                && act.broadcasters.get(&server_id) == Some(&b)
            {
                act.stop_broadcaster(server_id);
            }
        })
        .spawn(ctx);
    }

    /// Commit `node` as the new node. It is adopted at once, so the next
    /// change builds on it; the supervisor keeps handling messages while
    /// the commit waits (it may wait on a replica only we can remove).
    fn commit_node(&mut self, node: Node, what: String, ctx: &mut Context<Self>) {
        self.commit_node_then(node, what, |_, _| {}, ctx);
    }

    /// [`Self::commit_node`], then `done` with the change's commit number
    /// once it is acknowledged, or `None` if it failed.
    fn commit_node_then(
        &mut self,
        node: Node,
        what: String,
        done: impl FnOnce(&mut Self, Option<CommitNumber>) + 'static,
        ctx: &mut Context<Self>,
    ) {
        let req = CommitRequest {
            set_node: Some(node.clone()),
            ..Default::default()
        };
        self.node = node;
        self.parts
            .commits
            .send(SubmitCommit(req))
            .into_actor(self)
            .map(move |res, act, _| match res {
                Ok(Ok(ack)) => {
                    info!("node change committed as {}: {what}", ack.number);
                    done(act, Some(ack.number));
                }
                Ok(Err(e)) => {
                    error!("node change ({what}) failed: {e}");
                    done(act, None);
                }
                Err(e) => {
                    error!("node change ({what}) failed: {e}");
                    done(act, None);
                }
            })
            .spawn(ctx);
    }

    fn last(&self) -> CommitNumber {
        (*self.parts.applied.borrow()).max(self.last_commit)
    }

    fn remove_member(&mut self, server_id: u64, why: &str, ctx: &mut Context<Self>) {
        let Some(member) = self.node.member(server_id).cloned() else {
            self.stop_broadcaster(server_id);
            return;
        };
        self.stop_broadcaster(server_id);
        let mut node = self.node.clone();
        node.members.retain(|m| m.server_id != server_id);
        warn!("removing secondary {} from the node: {why}", member.addr);
        self.commit_node(node, format!("removed {} ({why})", member.addr), ctx);
    }

    /// Verify a member reported in trouble: remove it only if it does not
    /// make progress for us either.
    fn check_member(
        &mut self,
        server_id: u64,
        addr: String,
        reason: String,
        ctx: &mut Context<Self>,
    ) {
        if !self.is_primary || !self.checking.insert(server_id) {
            return;
        }
        let timeout = self.parts.settings.call_timeout;
        let probe = addr.clone();
        let (epoch, me, last) = (self.epoch, self.server_id, self.last());
        async move { makes_progress(&probe, epoch, me, last, timeout).await }
            .into_actor(self)
            .map(move |answer, act, ctx| {
                act.checking.remove(&server_id);
                match answer {
                    Ok(()) => info!("secondary {addr} reported ({reason}) but answers: kept"),
                    Err(why) => act.remove_member(server_id, &format!("{why} ({reason})"), ctx),
                }
            })
            .spawn(ctx);
    }

    fn start_following(&mut self, primary: NodeAddr, ctx: &mut Context<Self>) {
        if let Some(f) = self.follower.take() {
            f.do_send(StopFollowing);
        }
        let f = FollowerActor::new(
            primary.clone(),
            self.server_id,
            self.parts.advertise.clone(),
            self.repository_id.clone(),
            self.last(),
            self.parts.storage.clone(),
            self.parts.flusher.clone(),
            ctx.address(),
            self.parts.fatal.clone(),
            self.parts.settings,
        )
        .start();
        self.follower = Some(f);
        self.follow_state = Some(FollowState::CatchingUp { primary });
        self.publish_follow_state();
    }

    fn retain(&mut self) {
        if !self.is_primary {
            return;
        }
        self.catching_up
            .retain(|_, (_, t)| t.elapsed() < Duration::from_secs(60));
        let from = self
            .catching_up
            .values()
            .map(|(f, _)| *f)
            .min()
            .unwrap_or(CommitNumber::MAX);
        let members = self.broadcasters.keys().copied().collect::<Vec<_>>();
        let storage = self.parts.storage.clone();
        let stats: Vec<_> = members
            .iter()
            .filter_map(|id| self.broadcasters.get(id).cloned())
            .collect();
        actix::spawn(async move {
            let mut keep = from;
            for b in stats {
                if let Ok(s) = b.send(GetReplicaStats).await {
                    // Its last durable record too: a new connection sends
                    // it again for the secondary to compare with its own.
                    keep = keep.min(s.durable.max(1));
                }
            }
            if keep != CommitNumber::MAX {
                storage.do_send(RetainFrom { from: keep });
            }
        });
    }
}

type RoleFuture =
    std::pin::Pin<Box<dyn ActorFuture<NodeSupervisor, Output = Result<(), WireError>>>>;

impl NodeSupervisor {
    fn me(&self) -> Member {
        self.node.member(self.server_id).cloned().unwrap_or(Member {
            server_id: self.server_id,
            addr: self.parts.advertise.clone(),
            role: MemberRole::Secondary,
        })
    }

    /// Become primary of `new_node` under a new epoch: leave restore mode,
    /// stream to the other secondaries, commit the node with the epoch.
    /// `patience`: how long to wait, in all, for other secondaries that are
    /// alive but silent before promoting without their records (see
    /// [`SILENT_PEER_PATIENCE`]); zero after a drained hand-over, which
    /// left nothing acknowledged that this server lacks.
    fn promote(&mut self, new_node: Node, why: &'static str, patience: Duration) -> RoleFuture {
        self.set_changing_role(true);
        self.handed_over_to = None;
        if let Some(f) = self.follower.take() {
            f.do_send(StopFollowing);
        }
        let me = self.server_id;
        let storage = self.parts.storage.clone();
        let flusher = self.parts.flusher.clone();
        let commits = self.parts.commits.clone();
        let others: Vec<NodeAddr> = new_node
            .secondaries()
            .filter(|m| m.server_id != me)
            .map(|m| m.addr.clone())
            .collect();
        let ask = PullAsk {
            server_id: me,
            addr: self.parts.advertise.clone(),
            repository_id: self.repository_id.clone(),
        };
        let fatal = self.parts.fatal.clone();
        let deadline = Instant::now() + patience;
        Box::pin(
            async move {
                // A commit the old primary acknowledged may be held by another
                // secondary and not by us: take it before we number anything.
                for peer in others {
                    if let Err(e) = pull_from_peer(&storage, &flusher, &peer, &ask, deadline).await
                    {
                        // Those records exist elsewhere and we cannot hold
                        // them: promoting would lose them.
                        fatal.do_send(crate::actors::controller::Fatal { reason: e.clone() });
                        return Err((true, e));
                    }
                }
                let leave = |e: String| (false, format!("cannot leave restore mode: {e}"));
                // The newest epoch this copy has seen is in its records.
                let info = storage
                    .send(GetInfo)
                    .await
                    .map_err(|e| leave(e.to_string()))?
                    .map_err(|e| leave(e.to_string()))?;
                storage
                    .send(SetRestoreMode { on: false })
                    .await
                    .map_err(|e| leave(e.to_string()))?
                    .map_err(|e| leave(e.to_string()))?;
                Ok::<_, (bool, String)>(info.epoch)
            }
            .into_actor(self)
            .then(move |res, act, ctx| {
                let current = match res {
                    Ok(e) => e,
                    Err((fatal, e)) => {
                        // After a fatal failure the server is stopping:
                        // still "changing role", it refuses every other
                        // promotion (a retry could find the peer holding
                        // those records unreachable and promote without
                        // them).
                        if !fatal {
                            act.set_changing_role(false);
                        }
                        error!("promotion failed: {e}");
                        let failed: RoleFuture = Box::pin(fut::ready(Err(WireError::Internal {
                            reason: format!("promotion failed: {e}"),
                        })));
                        return failed;
                    }
                };
                let epoch = current.max(act.epoch).next(me);
                warn!("promoted to primary under epoch {epoch}: {why}");
                act.is_primary = true;
                // A follower started while this promotion ran (a hand-over's
                // restore-mode switch completing late) must not go on.
                if let Some(f) = act.follower.take() {
                    f.do_send(StopFollowing);
                }
                // Before the epoch commit below, which must be taken.
                act.parts.commits.do_send(Lead);
                act.epoch = epoch;
                act.follow_state = None;
                act.publish(ServerRole::Primary, Some(act.parts.advertise.clone()), None);
                let next = act.last() + 1;
                let secondaries: Vec<Member> = new_node.secondaries().cloned().collect();
                for m in secondaries {
                    act.start_broadcaster(m, next, false, ctx);
                }
                act.node = new_node.clone();
                let req = CommitRequest {
                    set_node: Some(new_node),
                    new_epoch: Some(epoch),
                    ..Default::default()
                };
                let committing: RoleFuture =
                    Box::pin(commits.send(SubmitCommit(req)).into_actor(act).map(
                        move |res, act, _| {
                            act.set_changing_role(false);
                            match res {
                                Ok(Ok(ack)) => {
                                    info!("primary under epoch {epoch} from commit {}", ack.number);
                                    Ok(())
                                }
                                Ok(Err(e)) => Err(e),
                                Err(e) => Err(WireError::Internal {
                                    reason: e.to_string(),
                                }),
                            }
                        },
                    ));
                committing
            }),
        )
    }

    /// Stop being primary: stop streaming, answer waiting commits as
    /// unknown, and publish `role` (deposed, or secondary after a swap).
    fn step_down(&mut self, role: ServerRole, primary: Option<NodeAddr>, note: Option<String>) {
        self.is_primary = false;
        // The fence first: it answers the waiting commits as unknown and
        // forgets the replicas. Removing the replicas first would leave
        // none to wait for, and the coordinator would acknowledge those
        // commits (a deposed primary's, which its replicas refused).
        self.parts.commits.do_send(Fence {
            reason: "this server is no longer the primary".into(),
        });
        let ids: Vec<u64> = self.broadcasters.keys().copied().collect();
        for id in ids {
            self.stop_broadcaster(id);
        }
        self.publish(role, primary, note);
    }

    /// Ask every other member who it is: (addr, epoch, role, named primary).
    fn probe_members(
        &self,
    ) -> impl std::future::Future<Output = Vec<(NodeAddr, crate::actors::peer_link::PeerHello)>>
    {
        let probe = self.probe_members_except("");
        async move { probe.await.answers }
    }

    /// [`Self::probe_members`] but `skip`, all at once: dead members cost
    /// one connect and hello timeout together (at most twice
    /// [`PEER_PROBE_TIMEOUT`], and half a second more for a member that
    /// gave no hello), not one each.
    fn probe_members_except(&self, skip: &str) -> impl std::future::Future<Output = Probe> {
        let addrs: Vec<NodeAddr> = self
            .node
            .members
            .iter()
            .filter(|m| m.server_id != self.server_id && m.addr != skip)
            .map(|m| m.addr.clone())
            .collect();
        let timeout = PEER_PROBE_TIMEOUT;
        async move {
            let asks: Vec<_> = addrs
                .into_iter()
                .map(|a| {
                    actix_rt::spawn(async move {
                        match PeerLink::connect(&a, timeout).await {
                            Ok(link) => Heard::Answer(a, link.hello),
                            // No hello in time: stopped or hung if its
                            // kernel still takes connections, else gone.
                            Err(LinkError::Timeout { .. })
                                if accepts_connections(&a, SILENT_CHECK).await =>
                            {
                                Heard::Silent(a)
                            }
                            Err(e) => Heard::Nothing {
                                timed_out: matches!(e, LinkError::Timeout { .. }),
                                addr: a,
                            },
                        }
                    })
                })
                .collect();
            let mut out = Probe::default();
            for ask in asks {
                match ask.await {
                    Ok(Heard::Answer(a, hello)) => out.answers.push((a, hello)),
                    Ok(Heard::Silent(a)) => out.silent.push(a),
                    Ok(Heard::Nothing { addr, timed_out }) => {
                        if timed_out {
                            out.timed_out.push(addr.clone());
                        }
                        out.gone.push(addr);
                    }
                    Err(_) => {}
                }
            }
            out
        }
    }

    /// A restarted former primary: serve, or rejoin a newer primary.
    ///
    /// With no member answering, it serves, unless one of them takes
    /// connections but says nothing (stopped, hung, overloaded): that one
    /// may have taken over while this server was down and hold
    /// acknowledged commits; serving beside it would make two primaries.
    /// It then serves nothing and asks again once something changes: a
    /// silent member answers, refuses or closes the connection held to it,
    /// or a member that was not reached takes one (`until_one_speaks`);
    /// `hold` is what that wait learnt.
    fn check_restart(&mut self, hold: HoldOutcome, ctx: &mut Context<Self>) {
        let my_epoch = self.epoch;
        self.probe_members_except("")
            .into_actor(self)
            .map(move |probe, act, ctx| {
                let probe = probe.after_hold(hold);
                if probe.answers.is_empty() && !probe.silent.is_empty() {
                    let note = format!(
                        "not serving yet: {} {} connections but {} not answer, and may have \
                         taken over while this server was down; serving once a member answers \
                         or stops taking connections (stop a hung server to go on without it)",
                        probe.silent.join(", "),
                        if probe.silent.len() == 1 {
                            "takes"
                        } else {
                            "take"
                        },
                        if probe.silent.len() == 1 {
                            "does"
                        } else {
                            "do"
                        },
                    );
                    if !act.restart_held {
                        act.restart_held = true;
                        warn!("restarted former primary {note}");
                    }
                    act.publish(ServerRole::Deposed, None, Some(note));
                    // Not probed again on a timer: each probe leaves a
                    // connection in a stopped process's accept queue, and
                    // once that is full new ones time out, which would
                    // read as "gone". One connection each is held until
                    // something happens to it; then everyone is asked again.
                    until_one_speaks(probe.silent, probe.gone)
                        .into_actor(act)
                        .map(|hold, act, ctx| act.check_restart(hold, ctx))
                        .spawn(ctx);
                    return;
                }
                act.restart_held = false;
                let peers = probe.answers;
                let views: Vec<PeerView> = peers
                    .iter()
                    .map(|(addr, h)| PeerView {
                        addr: addr.clone(),
                        epoch: h.epoch,
                        is_primary: h.role == ServerRole::Primary,
                        names_primary: h.node.primary().map(|p| p.addr.clone()),
                    })
                    .collect();
                match on_restart_as_primary(my_epoch, &views) {
                    Startup::ServeAsPrimary => act.serve_as_primary(ctx),
                    Startup::Rejoin { primary, epoch } => {
                        warn!("a newer epoch {epoch} exists with primary {primary}: rejoining it");
                        act.rejoin(primary, ctx);
                    }
                    Startup::Wait { epoch } => {
                        act.publish(
                            ServerRole::Deposed,
                            None,
                            Some(format!(
                                "epoch {epoch} is newer than ours; waiting for its primary"
                            )),
                        );
                        ctx.run_later(Duration::from_secs(1), |act, ctx| {
                            act.check_restart(HoldOutcome::default(), ctx)
                        });
                    }
                }
            })
            .spawn(ctx);
    }

    fn serve_as_primary(&mut self, ctx: &mut Context<Self>) {
        self.is_primary = true;
        self.parts.commits.do_send(Lead);
        self.publish(
            ServerRole::Primary,
            Some(self.parts.advertise.clone()),
            None,
        );
        let secondaries: Vec<Member> = self.node.secondaries().cloned().collect();
        let next = self.last() + 1;
        for m in secondaries {
            // It tells us where it stands with a resend request.
            self.start_broadcaster(m, next, false, ctx);
        }
    }

    /// Compare our log with `primary`'s: a prefix → follow it; diverged →
    /// keep our extra commits in a file and wait for the operator; its log
    /// trimmed past what must be compared → deposed, waiting for the
    /// operator too (nothing can be told).
    fn rejoin(&mut self, primary: NodeAddr, ctx: &mut Context<Self>) {
        self.publish(
            ServerRole::Deposed,
            Some(primary.clone()),
            Some("checking our log against the new primary".into()),
        );
        let storage = self.parts.storage.clone();
        let last = self.last();
        let dir_probe = primary.clone();
        async move {
            let mut link = PeerLink::connect(&dir_probe, Duration::from_secs(2))
                .await
                .map_err(|e| e.to_string())?;
            // Fast path: our whole log is a prefix of theirs.
            match same_record(&storage, &mut link, last).await? {
                Same::Yes => return Ok(Rejoin::Prefix),
                Same::No => {}
                Same::Trimmed { oldest } => return Ok(Rejoin::Unknown { oldest }),
            }
            // Highest n < last where both hold the same record. Records
            // older than our log (a copy seeded from the node, or trimmed)
            // came from the node: they count as common.
            let oldest = storage
                .send(GetInfo)
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
                .log_start;
            let (mut lo, mut hi) = (oldest.saturating_sub(1).min(last), last.saturating_sub(1));
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                match same_record(&storage, &mut link, mid).await? {
                    Same::Yes => lo = mid,
                    Same::No => hi = mid - 1,
                    // Where the logs part is older than the peer keeps.
                    Same::Trimmed { oldest } => return Ok(Rejoin::Unknown { oldest }),
                }
            }
            Ok::<_, String>(Rejoin::Diverged { common: lo })
        }
        .into_actor(self)
        .map(move |res, act, ctx| match res {
            Ok(Rejoin::Prefix) => {
                info!("our log is a prefix of {primary}'s: catching up as its secondary");
                let storage = act.parts.storage.clone();
                let p = primary.clone();
                async move { storage.send(SetRestoreMode { on: true }).await }
                    .into_actor(act)
                    .map(move |res, act, ctx| match res {
                        Ok(Ok(())) if act.is_primary => {
                            info!("not following {p}: this server's role changed meanwhile")
                        }
                        Ok(Ok(())) => act.start_following(p, ctx),
                        Ok(Err(e)) => error!("cannot enter restore mode to rejoin: {e}"),
                        Err(e) => error!("cannot enter restore mode to rejoin: {e}"),
                    })
                    .spawn(ctx);
            }
            Ok(Rejoin::Diverged { common }) => act.keep_divergent(common, primary, ctx),
            Ok(Rejoin::Unknown { oldest }) => {
                // Not a divergence found: a log too old to compare. Our
                // commits may all be on the new primary, or not.
                let note = format!(
                    "{primary}'s log starts at commit {oldest}, after records this server \
                     would have to compare: it cannot tell whether its commits are on the \
                     new primary; start it from a new backup"
                );
                error!("{note}");
                act.publish(ServerRole::Deposed, Some(primary), Some(note));
            }
            Err(e) => {
                warn!("cannot compare logs with {primary}: {e}; retrying");
                ctx.run_later(Duration::from_secs(1), |act, ctx| {
                    act.check_restart(HoldOutcome::default(), ctx)
                });
            }
        })
        .spawn(ctx);
    }

    /// Our commits after `common` are not on the new primary: write them to
    /// a file, report, and never serve them as primary.
    fn keep_divergent(&mut self, common: CommitNumber, primary: NodeAddr, ctx: &mut Context<Self>) {
        let last = self.last();
        let storage = self.parts.storage.clone();
        let file = self
            .parts
            .dir
            .join(format!("divergent-{}-{}.records", common + 1, last));
        let path = file.clone();
        async move {
            let mut out = Vec::new();
            let mut from = common + 1;
            while from <= last {
                let batch = storage
                    .send(ReadRecords {
                        from,
                        max_count: 10_000,
                        max_bytes: 16 << 20,
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                if batch.is_empty() {
                    break;
                }
                from += batch.len() as u64;
                for b in batch {
                    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    out.extend_from_slice(&b);
                }
            }
            let p = path.clone();
            actix_rt::task::spawn_blocking(move || std::fs::write(&p, &out))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            Ok::<_, String>(())
        }
        .into_actor(self)
        .map(move |res, act, _| {
            let note = match res {
                Ok(()) => format!(
                    "diverged: commits {}..={last} are not on the new primary {primary}; they are kept in {} \
                     (length-prefixed records, docs/STORAGE.md). To rejoin, move this directory aside and \
                     start with --join {primary}",
                    common + 1,
                    file.display()
                ),
                Err(e) => format!(
                    "diverged after commit {common} from the new primary {primary}; keeping the divergent commits failed: {e}"
                ),
            };
            error!("{note}");
            act.publish(ServerRole::Deposed, Some(primary), Some(note));
        })
        .spawn(ctx);
    }

    /// Someone knows a newer epoch: we are no longer primary.
    fn deposed(&mut self, epoch: Epoch, ctx: &mut Context<Self>) {
        if !self.is_primary {
            return;
        }
        error!(
            "epoch {epoch} is newer than ours ({}): this server is deposed",
            self.epoch
        );
        self.step_down(
            ServerRole::Deposed,
            None,
            Some(format!("deposed by epoch {epoch}")),
        );
        self.probe_members()
            .into_actor(self)
            .map(move |peers, act, _| {
                let primary = peers
                    .into_iter()
                    .filter(|(_, h)| h.role == ServerRole::Primary && h.epoch >= epoch)
                    .max_by_key(|(_, h)| h.epoch)
                    .map(|(a, _)| a);
                act.publish(
                    ServerRole::Deposed,
                    primary,
                    Some(format!("deposed by epoch {epoch}; restart to rejoin")),
                );
            })
            .spawn(ctx);
    }
}

impl Actor for NodeSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let storage = self.parts.storage.clone();
        async move {
            let info = storage.send(GetInfo).await;
            let anchor = storage.send(GetAnchor).await;
            (info, anchor)
        }
        .into_actor(self)
        .map(|(info, anchor), act, ctx| {
            let (Ok(Ok(info)), Ok(Ok(anchor))) = (info, anchor) else {
                error!("node supervisor: cannot read the repository's node");
                return;
            };
            act.server_id = info.server_id;
            act.repository_id = info.repository_id.to_string();
            act.epoch = info.epoch;
            act.last_commit = info.last_commit;
            act.node = anchor.node;
            if !info.restore_mode {
                let alone = act
                    .node
                    .members
                    .iter()
                    .all(|m| m.server_id == act.server_id);
                if alone {
                    act.serve_as_primary(ctx);
                } else {
                    // A restarted former primary asks first (rejoin).
                    act.check_restart(HoldOutcome::default(), ctx);
                }
            } else {
                if let Some(p) = act.parts.follow.clone() {
                    act.follow_explicit(p, ctx);
                    return;
                }
                let primary = act
                    .node
                    .primary()
                    .filter(|p| p.server_id != act.server_id)
                    .map(|p| p.addr.clone());
                match primary {
                    Some(p) => act.start_following(p, ctx),
                    None => act.publish(
                        ServerRole::Restore,
                        None,
                        Some("restore mode: no primary to follow".into()),
                    ),
                }
            }
        })
        .wait(ctx);
        ctx.run_interval(Duration::from_secs(1), |act, _| act.retain());
    }
}

/// A catching-up server reached our last commit. Sender: the `catch_up`
/// request handler; may be dropped (the server asks again).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PeerCaughtUp {
    pub server_id: u64,
    pub addr: NodeAddr,
    /// The first record it does not have yet.
    pub next: CommitNumber,
}

impl Handler<PeerCaughtUp> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: PeerCaughtUp, ctx: &mut Context<Self>) {
        if !self.is_primary || msg.server_id == self.server_id {
            return;
        }
        self.catching_up.remove(&msg.server_id);
        if self.removing.contains_key(&msg.server_id) || self.retiring.contains_key(&msg.server_id)
        {
            // Level by catch-up (where it took its removal for history):
            // the operator's removal wins while it is under way.
            info!(
                "{} caught up while its removal is under way: not added back",
                msg.addr
            );
            return;
        }
        let member = Member {
            server_id: msg.server_id,
            addr: msg.addr.clone(),
            role: MemberRole::Secondary,
        };
        // Another server id at the same address is a replaced server.
        let stale: Vec<u64> = self
            .node
            .members
            .iter()
            .filter(|m| m.addr == msg.addr && m.server_id != msg.server_id)
            .map(|m| m.server_id)
            .collect();
        for id in stale {
            self.remove_member(id, "replaced by a new server at the same address", ctx);
        }
        let joining = self.node.member(msg.server_id).is_none();
        self.start_broadcaster(member.clone(), msg.next, joining, ctx);
        if joining {
            let mut node = self.node.clone();
            node.members.push(member);
            let server_id = msg.server_id;
            // The stream this join started: a later one (the server
            // removed and re-added meanwhile) has a join of its own.
            let stream = self.broadcasters.get(&server_id).cloned();
            self.commit_node_then(
                node,
                format!("added secondary {}", msg.addr),
                move |act, commit| {
                    let same = act.broadcasters.get(&server_id).cloned() == stream;
                    match commit {
                        Some(commit) if same => {
                            act.parts.commits.do_send(JoinedAt { server_id, commit })
                        }
                        // Not a member after all (a hand-over paused commits,
                        // say): it catches up and asks again, rather than
                        // being streamed to uncounted.
                        None if same => {
                            act.stop_broadcaster(server_id);
                            act.node.members.retain(|m| m.server_id != server_id);
                        }
                        _ => {}
                    }
                },
                ctx,
            );
        }
    }
}

/// A catching-up server asked for records from `from`. Sender: the
/// `catch_up` request handler; may be dropped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PeerCatchingUp {
    pub server_id: u64,
    pub from: CommitNumber,
}

impl Handler<PeerCatchingUp> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: PeerCatchingUp, _: &mut Context<Self>) {
        if self.is_primary && !self.broadcasters.contains_key(&msg.server_id) {
            self.catching_up
                .insert(msg.server_id, (msg.from, Instant::now()));
        }
    }
}

impl Handler<ReplicaTrouble> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ReplicaTrouble, ctx: &mut Context<Self>) {
        if let Some(e) = msg.newer_epoch {
            // A refusal sent before our own promotion reached that peer can
            // name an epoch we already hold: only a newer one deposes us.
            if e > self.epoch {
                error!(
                    "secondary {} knows a newer epoch {e} than ours {}: another primary exists",
                    msg.addr, self.epoch
                );
                self.deposed(e, ctx);
            }
            return;
        }
        if msg.diverged.is_some() {
            // Waiting would not help: it can never acknowledge our
            // records, and commits waiting for it complete once it is out.
            if self.is_primary {
                self.remove_member(msg.server_id, &msg.reason, ctx);
            }
            return;
        }
        self.check_member(msg.server_id, msg.addr, msg.reason, ctx);
    }
}

/// An application could not reach `addr`. Sender: sessions; may be dropped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Complaint {
    pub addr: NodeAddr,
}

impl Handler<Complaint> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Complaint, ctx: &mut Context<Self>) {
        let Some(m) = self
            .node
            .secondaries()
            .find(|m| m.addr == msg.addr)
            .cloned()
        else {
            return;
        };
        self.check_member(
            m.server_id,
            m.addr,
            "a client could not reach it".into(),
            ctx,
        );
    }
}

/// Remove a secondary on the operator's request (removeWarmBackup).
/// Sender: admin sessions.
#[derive(Message)]
#[rtype(result = "Result<(), WireError>")]
pub struct RemoveMember {
    pub addr: NodeAddr,
}

impl Handler<RemoveMember> for NodeSupervisor {
    type Result = ResponseActFuture<Self, Result<(), WireError>>;

    fn handle(&mut self, msg: RemoveMember, ctx: &mut Context<Self>) -> Self::Result {
        if !self.is_primary {
            let primary = self.parts.state.borrow().primary.clone();
            return Box::pin(fut::ready(Err(WireError::WrongServer { primary })));
        }
        let Some(m) = self
            .node
            .secondaries()
            .find(|m| m.addr == msg.addr)
            .cloned()
        else {
            return Box::pin(fut::ready(Err(WireError::Unavailable {
                reason: format!(
                    "{} is not a secondary of this node",
                    clipped(&msg.addr, MAX_ECHO)
                ),
            })));
        };
        let mut node = self.node.clone();
        node.members.retain(|x| x.server_id != m.server_id);
        let req = CommitRequest {
            set_node: Some(node.clone()),
            ..Default::default()
        };
        self.node = node;
        info!("removing secondary {} on the operator's request", m.addr);
        // The removal is committed like any commit, waiting for this
        // member too: commits acknowledged before it knows it was removed
        // must be on it, for it still takes itself for the successor. One
        // that does not acknowledge within REMOVAL_PATIENCE (its disk
        // hangs) is waited for no more. It is streamed to until it applied
        // its removal (or a replica timeout passed), so it stops following.
        let id = m.server_id;
        self.removal_gen += 1;
        let gen = self.removal_gen;
        self.removing.insert(id, gen);
        let patience = REMOVAL_PATIENCE.min(self.parts.settings.replica_timeout);
        ctx.run_later(patience, move |act, _| {
            if act.removing.get(&id) == Some(&gen) {
                warn!("the removed secondary has not acknowledged its removal within {patience:?}: commits no longer wait for it");
                act.parts.commits.do_send(StopCounting { server_id: id });
            }
        });
        Box::pin(
            self.parts
                .commits
                .send(SubmitCommit(req))
                .into_actor(self)
                .map(move |res, act, ctx| {
                    if act.removing.get(&m.server_id) == Some(&gen) {
                        act.removing.remove(&m.server_id);
                    }
                    // Stopped meanwhile (found unreachable): nothing left.
                    let still_removed = act.broadcasters.contains_key(&m.server_id);
                    match res {
                        Ok(Ok(ack)) => {
                            info!(
                                "node change committed as {}: removed {}",
                                ack.number, m.addr
                            );
                            if still_removed {
                                act.retire_broadcaster(m.server_id, ack.number, ctx);
                            }
                            Ok(())
                        }
                        Ok(Err(e)) => {
                            if still_removed {
                                act.stop_broadcaster(m.server_id);
                            }
                            Err(e)
                        }
                        Err(e) => {
                            if still_removed {
                                act.stop_broadcaster(m.server_id);
                            }
                            Err(WireError::Internal {
                                reason: e.to_string(),
                            })
                        }
                    }
                }),
        )
    }
}

/// Follow `primary` (beWarmBackupFor). Sender: admin sessions.
#[derive(Message)]
#[rtype(result = "Result<(), WireError>")]
pub struct FollowPrimary {
    pub primary: NodeAddr,
}

impl Handler<FollowPrimary> for NodeSupervisor {
    type Result = ResponseActFuture<Self, Result<(), WireError>>;

    fn handle(&mut self, msg: FollowPrimary, _: &mut Context<Self>) -> Self::Result {
        Box::pin(
            self.follow_checked(msg.primary, false)
                .map(|res, _, _| res.map_err(FollowRefused::into_wire)),
        )
    }
}

/// Why a server does not follow the primary it was pointed at.
enum FollowRefused {
    /// It cannot be reached (yet).
    Unreachable(WireError),
    /// It is no primary of ours, or this server cannot follow at all.
    Refused(WireError),
}

impl FollowRefused {
    fn into_wire(self) -> WireError {
        match self {
            FollowRefused::Unreachable(e) | FollowRefused::Refused(e) => e,
        }
    }
}

impl NodeSupervisor {
    /// Follow `primary` once it proves to be a primary of this repository,
    /// not behind this server, which must be a backup (`magma follow`,
    /// `--primary`). `unless_following`: not if this server started
    /// following another meanwhile (an operator's `magma follow` wins over
    /// `--primary`'s retries).
    fn follow_checked(
        &mut self,
        primary: NodeAddr,
        unless_following: bool,
    ) -> std::pin::Pin<Box<dyn ActorFuture<Self, Output = Result<(), FollowRefused>>>> {
        let refused = |e| Err(FollowRefused::Refused(e));
        if self.is_primary {
            return Box::pin(fut::ready(refused(WireError::Unavailable {
                reason: "this server is the primary; a primary cannot follow another".into(),
            })));
        }
        if let Some(note) = &self.diverged {
            return Box::pin(fut::ready(refused(WireError::Unavailable {
                reason: format!("this server is deposed: {note}"),
            })));
        }
        let timeout = self.parts.settings.call_timeout;
        let target = primary.clone();
        let storage = self.parts.storage.clone();
        Box::pin(
            async move {
                let info = storage.send(GetInfo).await;
                (info, PeerLink::connect(&target, timeout).await)
            }
            .into_actor(self)
            .map(move |(info, res), act, ctx| {
                // Only a backup (restore mode) takes records as they
                // come. A deposed primary holds commits of its own:
                // streaming to it would fail on every batch, and
                // whether its log is a prefix of the new primary's is
                // what a restart checks.
                match info {
                    Ok(Ok(i)) if i.restore_mode => {}
                    Ok(Ok(_)) => {
                        return refused(WireError::Unavailable {
                            reason: "this server is not a backup (not in restore mode): it \
                                         served as a primary; restart it on its directory to \
                                         rejoin, or start it on a new backup"
                                .into(),
                        })
                    }
                    Ok(Err(e)) => return refused(wire_error(&e)),
                    Err(e) => return refused(mailbox_error("the storage actor", e)),
                }
                let link = res.map_err(|e| {
                    let error = WireError::Unavailable {
                        reason: format!("cannot reach {}: {e}", clipped(&primary, MAX_ECHO)),
                    };
                    // Not there (yet), or there and not a Magma server of a
                    // protocol we speak.
                    if e.is_unreachable() {
                        FollowRefused::Unreachable(error)
                    } else {
                        FollowRefused::Refused(error)
                    }
                })?;
                let h = &link.hello;
                if h.repository_id != act.repository_id {
                    return refused(WireError::RepositoryMismatch {
                        expected: act.repository_id.clone(),
                        got: clipped(&h.repository_id, MAX_ECHO),
                    });
                }
                if h.role != ServerRole::Primary {
                    return refused(WireError::WrongServer {
                        primary: h.node.primary().map(|p| p.addr.clone()),
                    });
                }
                if h.commit < act.last() {
                    return refused(WireError::Unavailable {
                        reason: format!(
                            "{} is at commit {}, behind this server's {}",
                            clipped(&primary, MAX_ECHO),
                            h.commit,
                            act.last()
                        ),
                    });
                }
                // What changed while we asked.
                if act.is_primary || act.diverged.is_some() {
                    return refused(WireError::Unavailable {
                        reason: "this server changed role meanwhile; it follows no primary".into(),
                    });
                }
                if unless_following && act.follow_state.is_some() {
                    return Ok(());
                }
                act.start_following(primary, ctx);
                Ok(())
            }),
        )
    }

    /// `--primary`: the checks of `magma follow` before following. A target
    /// not reachable yet is asked again every second; one refused leaves
    /// this server in restore mode, saying why (status and log).
    fn follow_explicit(&mut self, primary: NodeAddr, ctx: &mut Context<Self>) {
        self.follow_checked(primary.clone(), true)
            .map(move |res, act, ctx| match res {
                Ok(()) => {}
                // Following another (an operator's `magma follow`), promoted
                // or deposed meanwhile: that state stands.
                Err(_)
                    if act.follow_state.is_some() || act.is_primary || act.diverged.is_some() => {}
                Err(FollowRefused::Unreachable(e)) => {
                    act.publish(
                        ServerRole::Restore,
                        None,
                        Some(format!("--primary {primary}: {e}; asking again")),
                    );
                    ctx.run_later(Duration::from_secs(1), move |act, ctx| {
                        if act.follow_state.is_none() && !act.is_primary {
                            act.follow_explicit(primary, ctx);
                        }
                    });
                }
                Err(FollowRefused::Refused(e)) => {
                    error!("--primary {primary} refused: {e}");
                    act.publish(
                        ServerRole::Restore,
                        None,
                        Some(format!("--primary {primary} refused: {e}")),
                    );
                }
            })
            .spawn(ctx);
    }
}

/// The server this one follows answered that this one is the primary.
/// Sender: the `FollowerActor`.
///
/// After a hand-over, the new primary can die before it commits its
/// promotion and come back still a secondary whose node names us: each
/// then names the other and neither leads. When that server is the one
/// this server handed over to (it took every commit, and never led: a
/// server that led has left restore mode and names itself), this server
/// takes the node back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NamedAsPrimary {
    pub by: NodeAddr,
}

impl Handler<NamedAsPrimary> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: NamedAsPrimary, ctx: &mut Context<Self>) {
        if self.is_primary || self.changing_role {
            return;
        }
        let Some(target) = self.handed_over_to else {
            return;
        };
        if self.node.member(target).is_none_or(|m| m.addr != msg.by) {
            return;
        }
        warn!(
            "{} names this server as the primary: the hand-over to it never completed; \
             taking the node back",
            msg.by
        );
        let node = swapped_node(&self.node, self.server_id);
        let taking = self
            .promote(
                node,
                "the server handed over to restarted before it took the node",
                Duration::ZERO,
            )
            .map(|res, _, _| {
                if let Err(e) = res {
                    error!("taking the node back failed: {e}");
                }
            });
        ctx.spawn(taking);
    }
}

impl Handler<FollowerReport> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: FollowerReport, _: &mut Context<Self>) {
        self.last_commit = self.last_commit.max(msg.applied);
        if self.is_primary {
            // A follower's late report must not publish a follower's role
            // over the primary's.
            return;
        }
        self.follow_state = Some(msg.state);
        self.publish_follow_state();
    }
}

/// Records from the primary were applied (by a `replicate` request).
/// Sender: sessions; may be dropped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Replicated {
    pub applied: CommitNumber,
    pub primary_last: CommitNumber,
    pub node_changed: Option<Node>,
}

impl Handler<Replicated> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Replicated, ctx: &mut Context<Self>) {
        self.last_commit = self.last_commit.max(msg.applied);
        if let Some(f) = &self.follower {
            f.do_send(PrimaryHeard {
                primary_last: msg.primary_last,
                applied: msg.applied,
            });
        }
        if let Some(node) = msg.node_changed {
            self.on_node_applied(node, msg.applied, true, ctx);
        }
    }
}

/// Catching up applied a node change. Sender: the `FollowerActor`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeLearned {
    pub node: Node,
    /// The last commit applied with it (the node is as of this commit).
    pub at: CommitNumber,
}

impl Handler<NodeLearned> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: NodeLearned, ctx: &mut Context<Self>) {
        self.on_node_applied(msg.node, msg.at, false, ctx);
    }
}

impl NodeSupervisor {
    /// A node change reached this secondary's copy, as of commit `at`.
    /// `live`: it came with the primary's stream (not from catching up on
    /// history). Catch-up and stream answers can arrive out of order; an
    /// older node than the one already known is ignored.
    fn on_node_applied(
        &mut self,
        node: Node,
        at: CommitNumber,
        live: bool,
        ctx: &mut Context<Self>,
    ) {
        if at < self.node_at {
            debug!(
                "node as of commit {at} ignored: the node as of {} is already known",
                self.node_at
            );
            return;
        }
        self.node_at = at;
        {
            let was_member = self.node.member(self.server_id).is_some();
            let is_member = node.member(self.server_id).is_some();
            let new_primary = node.primary().map(|p| p.addr.clone());
            self.node = node;
            if let (
                Some(p),
                Some(FollowState::Streaming { primary } | FollowState::CatchingUp { primary }),
            ) = (&new_primary, &self.follow_state)
            {
                // Only the stream tells what the node is now. A catch-up
                // glob replays history: its nodes may name a primary long
                // gone (before a failover), and switching to it would drop
                // the server actually followed (`--primary` included). A
                // server followed that is no longer the primary says so
                // itself (`wrong_server` naming the new one).
                if live && p != primary && *p != self.parts.advertise {
                    info!("the node's primary is now {p}: following it");
                    let p = p.clone();
                    self.start_following(p, ctx);
                }
            }
            let streaming = matches!(self.follow_state, Some(FollowState::Streaming { .. }));
            if was_member && !is_member && streaming && live {
                warn!("this server was removed from the node: it stops following");
                if let Some(f) = self.follower.take() {
                    f.do_send(StopFollowing);
                }
                self.follow_state = Some(FollowState::Stopped {
                    reason: "removed from the node by the primary; restart it or `magma follow` to rejoin"
                        .into(),
                });
            }
            self.publish_follow_state();
        }
    }
}

/// A replicated batch did not continue our log. Sender: sessions.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NeedResync;

impl Handler<NeedResync> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, _: NeedResync, _: &mut Context<Self>) {
        if let Some(f) = &self.follower {
            f.do_send(Resync);
        }
    }
}

/// The primary streamed a batch that does not continue this server's hash
/// chain: this copy holds records the node does not (a failover lost
/// them). It stops following and is deposed: it refuses reads, commits
/// and catch-up until the operator starts it from a new backup. Senders:
/// sessions handling `replicate`, and the `FollowerActor` when a glob it
/// pulled does not continue our log.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StreamDiverged {
    pub number: CommitNumber,
}

impl Handler<StreamDiverged> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: StreamDiverged, _: &mut Context<Self>) {
        if self.is_primary || self.diverged.is_some() {
            return;
        }
        let note = format!(
            "its log diverged from the primary's at record {}: it holds records the node \
             does not; start it from a new backup",
            msg.number
        );
        error!("{note}");
        if let Some(f) = self.follower.take() {
            f.do_send(StopFollowing);
        }
        self.diverged = Some(note.clone());
        self.follow_state = Some(FollowState::Stopped {
            reason: note.clone(),
        });
        self.publish_follow_state();
    }
}

/// The primary this server follows while catching up cannot be reached.
/// Sender: the `FollowerActor`, after 2 s and every 2 s while it lasts.
///
/// A catching-up server is no member: a successor that promoted does not
/// stream to it, and it would follow the dead primary for ever. It asks
/// the other members of the node it knows; one that answers as primary in
/// an epoch at least ours is followed instead.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PrimaryUnreachable {
    pub primary: NodeAddr,
    /// Why it is not followed: unreachable for this long, or (`None`) it
    /// serves an older epoch than the copy's.
    pub unreachable_for: Option<Duration>,
}

impl NodeSupervisor {
    /// Catching up from `primary`?
    fn catching_up_from(&self, primary: &NodeAddr) -> bool {
        matches!(&self.follow_state, Some(FollowState::CatchingUp { primary: p }) if p == primary)
    }
}

impl Handler<PrimaryUnreachable> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: PrimaryUnreachable, ctx: &mut Context<Self>) {
        if self.is_primary
            || self.changing_role
            || self.looking_for_primary
            || self.diverged.is_some()
            || !self.catching_up_from(&msg.primary)
        {
            return;
        }
        self.looking_for_primary = true;
        let storage = self.parts.storage.clone();
        let asking = self.probe_members_except(&msg.primary);
        async move {
            // Our copy's epoch now (the supervisor's own is set only at
            // start and on promotion): a server that followed through
            // failovers must not take an older primary back for the node's.
            let info = storage.send(GetInfo).await.ok().and_then(|r| r.ok());
            (info, asking.await.answers)
        }
        .into_actor(self)
        .map(move |(info, peers), act, ctx| {
            act.looking_for_primary = false;
            if act.is_primary
                || act.changing_role
                || act.diverged.is_some()
                || !act.catching_up_from(&msg.primary)
            {
                return;
            }
            let Some(info) = info else { return };
            let why = match msg.unreachable_for {
                Some(t) => format!("cannot be reached for {t:?}"),
                None => format!("serves an epoch older than this copy's {}", info.epoch),
            };
            let older = older_leader(&info, &peers);
            match leader_for(&info, peers) {
                Some((addr, h)) => {
                    warn!(
                        "the primary {} {why}; {addr} leads in epoch {}: following it",
                        msg.primary, h.epoch
                    );
                    act.start_following(addr, ctx);
                }
                // A primary of this repository in an older epoch: the node
                // may live there, and this copy hold records it abandoned.
                // Said once per such primary; only the operator can tell.
                None if older
                    .as_ref()
                    .is_some_and(|o| act.told_older_leader.as_ref() != Some(&o.0)) =>
                {
                    let (addr, epoch) = older.expect("checked above");
                    warn!(
                        "the primary {} {why}; {addr} leads this repository in epoch {epoch}, \
                         older than this copy's {}: if the node lives there now, this copy \
                         holds records it abandoned; start this server from a new backup. \
                         Looking for a primary of epoch {} or newer meanwhile.",
                        msg.primary, info.epoch, info.epoch
                    );
                    act.told_older_leader = Some(addr);
                }
                // Asked again every 2 to 4 s while it lasts: the follower
                // logs the trouble itself.
                None => debug!(
                    "the primary {} {why}, and no other member leads; asking again",
                    msg.primary
                ),
            }
        })
        .spawn(ctx);
    }
}

/// A primary of the copy's repository answering in an older epoch than the
/// copy's (the newest such), which the copy may not follow.
fn older_leader(
    info: &crate::storage::RepoInfo,
    peers: &[(NodeAddr, crate::actors::peer_link::PeerHello)],
) -> Option<(NodeAddr, Epoch)> {
    let ours = info.repository_id.to_string();
    peers
        .iter()
        .filter(|(_, h)| {
            h.role == ServerRole::Primary && h.epoch < info.epoch && h.repository_id == ours
        })
        .max_by_key(|(_, h)| h.epoch)
        .map(|(a, h)| (a.clone(), h.epoch))
}

/// Of the members' hellos, the primary a copy (`info`) may follow: what
/// `magma follow` checks (this repository, a primary, not behind the
/// copy), in an epoch at least the copy's; the newest epoch first.
fn leader_for(
    info: &crate::storage::RepoInfo,
    peers: Vec<(NodeAddr, crate::actors::peer_link::PeerHello)>,
) -> Option<(NodeAddr, crate::actors::peer_link::PeerHello)> {
    let ours = info.repository_id.to_string();
    peers
        .into_iter()
        .filter(|(_, h)| {
            h.role == ServerRole::Primary
                && h.epoch >= info.epoch
                && h.repository_id == ours
                && h.commit >= info.last_commit
        })
        .max_by_key(|(_, h)| h.epoch)
}

/// Every member with its role, commit and lag, for status. Sender: sessions.
#[derive(Message)]
#[rtype(result = "Vec<MemberStatus>")]
pub struct GetMembers;

impl Handler<GetMembers> for NodeSupervisor {
    type Result = ResponseFuture<Vec<MemberStatus>>;

    fn handle(&mut self, _: GetMembers, _: &mut Context<Self>) -> Self::Result {
        let node = self.node.clone();
        let me = self.server_id;
        let last = self.last();
        let links: HashMap<u64, Addr<BroadcastActor>> = self.broadcasters.clone();
        let durable_here = (*self.parts.durable.borrow()).min(last);
        Box::pin(async move {
            let mut out = Vec::new();
            for m in node.members {
                let role = match m.role {
                    MemberRole::Primary => ServerRole::Primary,
                    MemberRole::Secondary => ServerRole::Secondary,
                    MemberRole::Witness => ServerRole::Witness,
                };
                let figures = if m.server_id == me {
                    Some((last, durable_here, 0, 0))
                } else if let Some(b) = links.get(&m.server_id) {
                    b.send(GetReplicaStats)
                        .await
                        .ok()
                        .map(|s| (s.applied, s.durable, s.lag_commits, s.lag_ms))
                } else {
                    // A secondary knows only itself; a primary streams
                    // nothing to this member (yet, or any more).
                    None
                };
                let (commit, durable, lag_commits, lag_ms) = figures.unwrap_or_default();
                out.push(MemberStatus {
                    addr: m.addr,
                    role,
                    commit,
                    durable,
                    lag_commits,
                    lag_ms,
                    known: figures.is_some(),
                });
            }
            out
        })
    }
}

/// Does the secondary at `addr` still apply and make durable what it is
/// sent? An empty `replicate` with `ack: durable` passes through its
/// storage and commit-log threads; a hello would not (it is answered even
/// while a disk hangs), and a secondary whose disk hangs stalls every
/// commit waiting for it. A typed refusal (another epoch, a resend) is an
/// answer: the stream sorts those out.
async fn makes_progress(
    addr: &str,
    epoch: Epoch,
    primary_id: u64,
    last: CommitNumber,
    timeout: Duration,
) -> Result<(), String> {
    let mut link = PeerLink::connect(addr, timeout)
        .await
        .map_err(|e| format!("unreachable: {e}"))?;
    let heartbeat = RequestBody::Replicate {
        epoch,
        primary_id,
        records: Vec::new(),
        primary_last: last,
        ack: ReplicateAck::Durable,
    };
    match link.call(heartbeat, timeout).await {
        Ok(_) => Ok(()),
        Err(LinkError::Server {
            error: WireError::Internal { reason },
            ..
        }) => Err(format!("failing: {reason}")),
        Err(LinkError::Server { .. }) => Ok(()),
        Err(e) => Err(format!("no durable answer: {e}")),
    }
}

/// Do we and the peer behind `link` hold the same record `n`? A record
/// the peer does not hold (beyond its end, trimmed) counts as different:
/// the caller then looks further back. Anything else that stops the
/// comparison (the link, a timeout, a failing storage on either side) is an
/// error, never evidence of divergence: the caller retries.
/// What comparing our log with a new primary's found.
enum Rejoin {
    /// Ours is a prefix of theirs.
    Prefix,
    /// Both hold the same records up to `common`, and differ after it.
    Diverged { common: CommitNumber },
    /// Their log no longer reaches back to what must be compared.
    Unknown { oldest: CommitNumber },
}

/// Whether a peer holds the same record `n` as we do.
#[derive(Debug, PartialEq, Eq)]
enum Same {
    Yes,
    No,
    /// The peer's log no longer reaches back to `n` (it trimmed it):
    /// nothing can be told.
    Trimmed {
        oldest: CommitNumber,
    },
}

async fn same_record(
    storage: &Addr<StorageActor>,
    link: &mut PeerLink,
    n: CommitNumber,
) -> Result<Same, String> {
    let mine: Hash = storage
        .send(RecordHashOf { number: n })
        .await
        .map_err(|e| format!("our storage is gone ({e})"))?
        .map_err(|e| format!("our record {n}: {e}"))?;
    match link
        .call(
            RequestBody::RecordHash { number: n },
            Duration::from_secs(5),
        )
        .await
    {
        Ok((_, ResponseBody::RecordHash { hash, .. })) => Ok(if hash[..] == mine[..] {
            Same::Yes
        } else {
            Same::No
        }),
        Err(LinkError::Server {
            error: WireError::LogTruncated { oldest, .. },
            ..
        }) => Ok(Same::Trimmed { oldest }),
        // Beyond its last record: it does not hold ours.
        Err(LinkError::Server {
            error: WireError::BadRequest { .. },
            ..
        }) => Ok(Same::No),
        Ok((_, other)) => Err(format!(
            "record_hash {n} answered with {}",
            response_type(&other)
        )),
        Err(e) => Err(format!("record_hash {n}: {e}")),
    }
}

/// A commit reached this secondary (the seed's rule). Reply `Ok` when this
/// server is (now) the primary and the commit may go on; otherwise where
/// the client should send it. Sender: `commit` and `commit_status`
/// requests.
#[derive(Message)]
#[rtype(result = "Result<(), WireError>")]
pub struct CommitAtSecondary;

impl Handler<CommitAtSecondary> for NodeSupervisor {
    type Result = ResponseActFuture<Self, Result<(), WireError>>;

    fn handle(&mut self, _: CommitAtSecondary, _: &mut Context<Self>) -> Self::Result {
        self.orphan_check(false)
    }
}

/// Another secondary names this server the successor of an unreachable
/// primary. Sender: `promote` peer requests.
#[derive(Message)]
#[rtype(result = "Result<(), WireError>")]
pub struct PromoteIfOrphaned;

impl Handler<PromoteIfOrphaned> for NodeSupervisor {
    type Result = ResponseActFuture<Self, Result<(), WireError>>;

    fn handle(&mut self, _: PromoteIfOrphaned, _: &mut Context<Self>) -> Self::Result {
        self.orphan_check(true)
    }
}

impl NodeSupervisor {
    /// Ping the primary; if it is gone, promote the successor (us, or ask
    /// it). `asked`: another secondary already decided we are the successor.
    fn orphan_check(&mut self, asked: bool) -> ResponseActFuture<Self, Result<(), WireError>> {
        if self.is_primary {
            return Box::pin(fut::ready(Ok(())));
        }
        if let Some(note) = &self.diverged {
            // Its records are not the node's: never the next primary.
            return Box::pin(fut::ready(Err(WireError::Unavailable {
                reason: format!("this server is deposed: {note}"),
            })));
        }
        if self.changing_role {
            return Box::pin(fut::ready(Err(WireError::Unavailable {
                reason: "this server is changing role; retry".into(),
            })));
        }
        let Some(primary) = self.node.primary().cloned() else {
            return Box::pin(fut::ready(Err(WireError::WrongServer { primary: None })));
        };
        let timeout = PRIMARY_PING_TIMEOUT;
        let addr = primary.addr.clone();
        // One check at a time: commits arriving meanwhile are told to retry,
        // so two of them can never promote this server twice.
        self.set_changing_role(true);
        Box::pin(
            async move { reachable(&addr, timeout).await }
                .into_actor(self)
                .then(move |up, act, _| {
                    act.set_changing_role(false);
                    if act.is_primary {
                        let done: RoleFuture = Box::pin(fut::ready(Ok(())));
                        return done;
                    }
                    let decision = on_commit_at_secondary(&act.node, act.server_id, up);
                    let out: RoleFuture = match decision {
                        CommitOnSecondary::Redirect { primary } => {
                            Box::pin(fut::ready(Err(WireError::WrongServer { primary })))
                        }
                        CommitOnSecondary::PromoteSelf => {
                            let node = promoted_node(&act.node, &act.me(), Some(primary.server_id));
                            act.promote(
                                node,
                                "the primary is unreachable and this server is its successor",
                                SILENT_PEER_PATIENCE,
                            )
                        }
                        CommitOnSecondary::AskSuccessor { successor } if !asked => {
                            let to = successor.addr.clone();
                            actix::spawn(async move {
                                match PeerLink::connect(&to, Duration::from_secs(2)).await {
                                    Ok(mut link) => {
                                        if let Err(e) = link
                                            .call(RequestBody::Promote, PROMOTE_CALL_TIMEOUT)
                                            .await
                                        {
                                            warn!("asking {to} to take over failed: {e}");
                                        }
                                    }
                                    Err(e) => warn!("cannot reach the successor {to}: {e}"),
                                }
                            });
                            Box::pin(fut::ready(Err(WireError::WrongServer {
                                primary: Some(successor.addr),
                            })))
                        }
                        CommitOnSecondary::AskSuccessor { successor } => {
                            Box::pin(fut::ready(Err(WireError::WrongServer {
                                primary: Some(successor.addr),
                            })))
                        }
                    };
                    out
                }),
        )
    }
}

/// A secondary taking over asks this primary to drain to it. Reply: the
/// last commit, once that secondary holds it durably and nothing is in
/// flight; this server then follows the new primary. Sender: `hand_over`.
#[derive(Message)]
#[rtype(result = "Result<CommitNumber, WireError>")]
pub struct HandOverTo {
    pub server_id: u64,
}

const HAND_OVER_WAIT: Duration = Duration::from_secs(5);

/// How long the removal of a secondary waits for that secondary's own
/// acknowledgement (at most the replica timeout) before commits stop
/// waiting for it.
const REMOVAL_PATIENCE: Duration = Duration::from_secs(2);

impl Handler<HandOverTo> for NodeSupervisor {
    type Result = ResponseActFuture<Self, Result<CommitNumber, WireError>>;

    fn handle(&mut self, msg: HandOverTo, _: &mut Context<Self>) -> Self::Result {
        if !self.is_primary {
            let primary = self.parts.state.borrow().primary.clone();
            return Box::pin(fut::ready(Err(WireError::WrongServer { primary })));
        }
        let (Some(b), Some(target)) = (
            self.broadcasters.get(&msg.server_id).cloned(),
            self.node.member(msg.server_id).cloned(),
        ) else {
            return Box::pin(fut::ready(Err(WireError::Unavailable {
                reason: "only a secondary of this node can take over".into(),
            })));
        };
        if self.changing_role {
            // Two hand-overs draining at once would both succeed: two
            // servers promoted, this one following only the last.
            return Box::pin(fut::ready(Err(WireError::Unavailable {
                reason: "another hand-over or role change is in progress; retry".into(),
            })));
        }
        self.set_changing_role(true);
        let commits = self.parts.commits.clone();
        let applied = self.parts.applied.clone();
        info!("handing over to {}: commits paused", target.addr);
        Box::pin(
            async move {
                let start = std::time::Instant::now();
                loop {
                    let p = commits.send(Pause { on: true }).await.ok();
                    let s = b.send(GetReplicaStats).await.ok();
                    if let (Some(p), Some(s)) = (p, s) {
                        // Idle: every commit is applied and acknowledged.
                        // Under `interval:MS` acknowledged commits may not
                        // be durable here yet, so the mark is the last
                        // applied commit, not this server's durable one.
                        let last = (*applied.borrow()).max(p.durable);
                        if p.idle && s.durable >= last {
                            return Ok(last);
                        }
                        if p.idle {
                            // Under asynchronous replication the secondary
                            // answers once applied: ask it now.
                            b.do_send(ProbeDurable);
                        }
                    }
                    if start.elapsed() > HAND_OVER_WAIT {
                        let _ = commits.send(Pause { on: false }).await;
                        return Err(WireError::Unavailable {
                            reason: format!(
                                "the secondary did not catch up within {HAND_OVER_WAIT:?}"
                            ),
                        });
                    }
                    actix_rt::time::sleep(Duration::from_millis(2)).await;
                }
            }
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.set_changing_role(false);
                if let Ok(last) = &res {
                    info!("handed over at commit {last}: following {}", target.addr);
                    // The node the new primary is about to commit, adopted
                    // now: should it die before committing it, a commit
                    // reaching this server pings it, finds it gone, and this
                    // server (its successor) takes the node back. Without
                    // this, our node named us primary, we followed a dead
                    // server and the node had no primary at all.
                    act.node = swapped_node(&act.node, target.server_id);
                    act.handed_over_to = Some(target.server_id);
                    act.step_down(ServerRole::Secondary, Some(target.addr.clone()), None);
                    act.parts.commits.do_send(Pause { on: false });
                    let storage = act.parts.storage.clone();
                    let to = target.addr.clone();
                    async move { storage.send(SetRestoreMode { on: true }).await }
                        .into_actor(act)
                        .map(move |r, act, ctx| match r {
                            // Meanwhile this server may have taken the node
                            // back (the new primary died): then it leads.
                            Ok(Ok(())) if act.is_primary => {
                                info!("not following {to}: this server took the node back")
                            }
                            Ok(Ok(())) => act.start_following(to, ctx),
                            Ok(Err(e)) => {
                                error!("cannot enter restore mode after handing over: {e}")
                            }
                            Err(e) => {
                                error!("cannot enter restore mode after handing over: {e}")
                            }
                        })
                        .spawn(ctx);
                }
                res
            }),
        )
    }
}

/// takeOverAsPrimary on this (current) secondary. Sender: admin sessions.
#[derive(Message)]
#[rtype(result = "Result<(), WireError>")]
pub struct TakeOverNow;

/// Most commits a secondary may be behind and still count as current.
const CURRENT_LAG: u64 = 10_000;

impl Handler<TakeOverNow> for NodeSupervisor {
    type Result = ResponseActFuture<Self, Result<(), WireError>>;

    fn handle(&mut self, _: TakeOverNow, _: &mut Context<Self>) -> Self::Result {
        if self.is_primary {
            return Box::pin(fut::ready(Err(WireError::Unavailable {
                reason: "this server is already the primary".into(),
            })));
        }
        let streaming = matches!(self.follow_state, Some(FollowState::Streaming { .. }));
        let member = self
            .node
            .secondaries()
            .any(|m| m.server_id == self.server_id);
        let Some(primary) = self.node.primary().cloned().filter(|_| streaming && member) else {
            return Box::pin(fut::ready(Err(WireError::Unavailable {
                reason: "only a current warm backup (a secondary streaming from the primary) can take over".into(),
            })));
        };
        if self.changing_role {
            return Box::pin(fut::ready(Err(WireError::Unavailable {
                reason: "this server is changing role; retry".into(),
            })));
        }
        self.set_changing_role(true);
        let me = self.server_id;
        let mine = self.last();
        let addr = primary.addr.clone();
        Box::pin(
            async move {
                let mut link = PeerLink::connect(&addr, Duration::from_secs(2))
                    .await
                    .map_err(|e| WireError::Unavailable {
                        reason: format!("cannot reach the primary: {e}"),
                    })?;
                let behind = link.hello.commit.saturating_sub(mine);
                if behind > CURRENT_LAG {
                    return Err(WireError::Unavailable {
                        reason: format!(
                            "not a current warm backup: {behind} commits behind the primary"
                        ),
                    });
                }
                match link
                    .call(RequestBody::HandOver { server_id: me }, HAND_OVER_WAIT * 2)
                    .await
                {
                    Ok((_, ResponseBody::HandedOver { last })) => Ok(last),
                    Ok((_, other)) => Err(WireError::Internal {
                        reason: format!(
                            "unexpected answer to hand_over: a `{}` response",
                            response_type(&other)
                        ),
                    }),
                    Err(LinkError::Server { error, .. }) => Err(error),
                    Err(e) => Err(WireError::Unavailable {
                        reason: e.to_string(),
                    }),
                }
            }
            .into_actor(self)
            .then(move |res, act, _| {
                act.set_changing_role(false);
                let out: RoleFuture = match res {
                    Err(e) => Box::pin(fut::ready(Err(e))),
                    Ok(last) if act.last() < last => {
                        Box::pin(fut::ready(Err(WireError::Internal {
                            reason: format!(
                                "the primary handed over at {last} but this server holds only {}",
                                act.last()
                            ),
                        })))
                    }
                    Ok(_) => {
                        if std::env::var_os("MAGMA_FAULT_EXIT_AFTER_HAND_OVER").is_some() {
                            // Test hook: die between the hand-over and the
                            // promotion, like a kill -9 at the worst moment.
                            error!("MAGMA_FAULT_EXIT_AFTER_HAND_OVER: exiting");
                            std::process::exit(137);
                        }
                        let node = swapped_node(&act.node, act.server_id);
                        act.promote(node, "take-over requested by the operator", Duration::ZERO)
                    }
                };
                out
            }),
        )
    }
}

/// A secondary stops on purpose: remove it without checks. Sender:
/// `leaving` peer requests; may be dropped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub server_id: u64,
}

impl Handler<Leave> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Leave, ctx: &mut Context<Self>) {
        if self.is_primary {
            self.remove_member(msg.server_id, "it is shutting down", ctx);
        }
    }
}

/// The server is stopping gracefully (sent before it stops listening). A
/// secondary tells the primary it leaves; a primary with a current
/// secondary asks its successor to take over and waits for the hand-over.
/// Sender: the `Controller`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeaveNode;

impl Handler<LeaveNode> for NodeSupervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: LeaveNode, _: &mut Context<Self>) -> Self::Result {
        let me = self.server_id;
        if let Some(f) = self.follower.take() {
            f.do_send(StopFollowing);
        }
        if !self.is_primary && self.follow_state.is_some() {
            // The primary we follow (our copy of the node may not yet show
            // that we joined: the primary decides).
            let following = match &self.follow_state {
                Some(FollowState::Streaming { primary } | FollowState::CatchingUp { primary }) => {
                    Some(primary.clone())
                }
                _ => None,
            };
            let Some(primary) = following.or_else(|| {
                self.node
                    .primary()
                    .filter(|p| p.server_id != me)
                    .map(|p| p.addr.clone())
            }) else {
                return Box::pin(fut::ready(()));
            };
            info!("leaving the node: telling the primary {primary}");
            return Box::pin(
                async move {
                    let t = Duration::from_secs(2);
                    match PeerLink::connect(&primary, t).await {
                        Ok(mut link) => {
                            if let Err(e) =
                                link.call(RequestBody::Leaving { server_id: me }, t).await
                            {
                                warn!("the primary did not take our leave: {e}");
                            }
                        }
                        Err(e) => warn!("cannot tell the primary we leave: {e}"),
                    }
                }
                .into_actor(self),
            );
        }
        // A primary: hand over to its successor if that one is current.
        let Some(successor) = crate::actors::failover::successor(&self.node).cloned() else {
            return Box::pin(fut::ready(()));
        };
        let Some(b) = self.broadcasters.get(&successor.server_id).cloned() else {
            return Box::pin(fut::ready(()));
        };
        let last = self.last();
        Box::pin(
            async move {
                let current = b
                    .send(GetReplicaStats)
                    .await
                    .is_ok_and(|s| last.saturating_sub(s.applied) <= CURRENT_LAG);
                if !current {
                    warn!(
                        "stopping without a hand-over: the successor {} is not current",
                        successor.addr
                    );
                    return;
                }
                info!("stopping: asking {} to take over first", successor.addr);
                let t = Duration::from_secs(8);
                match PeerLink::connect_as(&successor.addr, crate::protocol::SessionRole::Admin, t)
                    .await
                {
                    Ok(mut link) => match link.call(RequestBody::TakeOver, t).await {
                        Ok(_) => {
                            info!("{} took over; leaving the node", successor.addr);
                            if let Ok(mut peer) = PeerLink::connect(&successor.addr, t).await {
                                let _ = peer.call(RequestBody::Leaving { server_id: me }, t).await;
                            }
                        }
                        Err(e) => warn!("hand-over to {} failed: {e}", successor.addr),
                    },
                    Err(e) => warn!("cannot reach the successor {}: {e}", successor.addr),
                }
            }
            .into_actor(self),
        )
    }
}

/// Who we are, for `catch_up` requests made before a promotion.
struct PullAsk {
    server_id: u64,
    addr: NodeAddr,
    repository_id: String,
}

/// How long a member asked who leads (a former primary restarting, a copy
/// whose primary is unreachable) has to answer: connect, then hello, each
/// within this. As for
/// the ping rule: a member that is only slow must not be taken for absent
/// (a restarted former primary would serve beside the node's primary).
pub(crate) const PEER_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a secondary that received a commit gives the primary to answer
/// (connect, then hello, each within this) before it takes it for dead:
/// the ping rule. A dead
/// process refuses at once; this bounds a hung or unreachable one. Half a
/// second made a primary that was only slow (a loaded machine) look dead
/// and be replaced: a needless failover and a deposed server.
pub(crate) const PRIMARY_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// How long, in all, a successor taking over from a dead primary waits
/// for other secondaries that are alive (they accept connections) but do
/// not answer: one may hold the only copy of commits the dead primary
/// acknowledged (with two secondaries, one durable copy was enough), and
/// promoting without it would lose them. A peer that refuses connections,
/// or cannot be connected to, is dead and tried only a few times, briefly.
///
/// Commits sent meanwhile are answered `unavailable` and retried by the
/// client within its re-routing bound: the ping and this wait are kept
/// under it. They are not all of it: the attempt under way at the deadline
/// (about 1 s), each further silent peer's one attempt, a dead peer's three
/// tries and a peer that stalls in the middle of a catch-up (5 s) come on
/// top, so with several slow peers a client may see `unavailable`.
const SILENT_PEER_PATIENCE: Duration = Duration::from_secs(5);
const _: () = assert!(
    PRIMARY_PING_TIMEOUT.as_secs() * 2 + SILENT_PEER_PATIENCE.as_secs()
        < crate::client::DEFAULT_REROUTE_TIMEOUT.as_secs()
);

/// How long a secondary asking the successor to take over waits for the
/// answer: the successor pings the primary again and may wait for silent
/// peers first.
const PROMOTE_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Why one attempt to pull from a peer before promoting stopped short.
enum PullStop {
    /// This copy cannot take records that exist elsewhere: fatal.
    Fatal(String),
    /// The peer did not answer (connect, hello or catch-up): no answer in
    /// time or a broken connection.
    Unanswered(String),
    /// The peer answered with a refusal or something unexpected: it is
    /// left alone.
    Refused(String),
}

impl From<LinkError> for PullStop {
    fn from(e: LinkError) -> Self {
        if e.is_unreachable() {
            PullStop::Unanswered(e.to_string())
        } else {
            PullStop::Refused(e.to_string())
        }
    }
}

/// Before promoting: if `peer` holds records beyond ours that continue our
/// log, pull and apply them (durably). A peer that is not ahead, diverged
/// or refuses is left alone (logged); one that is alive but does not
/// answer is asked again until `deadline` (see [`SILENT_PEER_PATIENCE`]).
/// An error only when applying them failed fatally: this copy must then
/// not be promoted.
async fn pull_from_peer(
    storage: &Addr<StorageActor>,
    flusher: &Addr<CommitLogActor>,
    peer: &str,
    ask: &PullAsk,
    deadline: Instant,
) -> Result<(), String> {
    let mut dead_tries = 0;
    let mut said_silent = false;
    loop {
        let why = match pull_once(storage, flusher, peer, ask).await {
            Ok(()) => return Ok(()),
            Err(PullStop::Fatal(e)) => return Err(e),
            Err(PullStop::Refused(why)) => {
                warn!("before promoting: {peer} refused ({why}); promoting without its records");
                return Ok(());
            }
            Err(PullStop::Unanswered(why)) => why,
        };
        let alive = accepts_connections(peer, Duration::from_millis(500)).await;
        if alive && Instant::now() < deadline {
            if !said_silent {
                said_silent = true;
                warn!(
                    "before promoting: {peer} accepts connections but does not answer ({why}); \
                     waiting up to {} ms more: it may hold acknowledged commits this server lacks",
                    deadline
                        .saturating_duration_since(Instant::now())
                        .as_millis()
                );
            }
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        } else if !alive && dead_tries < 2 {
            dead_tries += 1;
            log::debug!("before promoting: {peer} not reached ({why}); trying again");
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        } else {
            warn!("before promoting: {peer} not reached ({why}); promoting without its records");
            return Ok(());
        }
    }
}

/// What asking the other members found (see `probe_members_except`).
#[derive(Default)]
struct Probe {
    /// Members that answered the hello.
    answers: Vec<(NodeAddr, PeerHello)>,
    /// Members that took the connection but gave no hello in time.
    silent: Vec<NodeAddr>,
    /// Members that refused it, or could not be reached at all.
    gone: Vec<NodeAddr>,
    /// Of `gone`, those whose connect or hello timed out (rather than
    /// being refused): a stopped process whose accept queue is full looks
    /// like that too.
    timed_out: Vec<NodeAddr>,
}

impl Probe {
    /// Fold in what a held restart learnt since its last probe: members
    /// still `silent` then that only time out now have not changed (their
    /// accept queue filled up, partly with our own probes), and an answer
    /// the hold got stands if this probe heard nothing newer from it (a
    /// member slower than the probe's patience).
    fn after_hold(mut self, hold: HoldOutcome) -> Probe {
        for addr in hold.still_silent {
            if self.timed_out.contains(&addr) {
                self.gone.retain(|a| *a != addr);
                self.timed_out.retain(|a| *a != addr);
                self.silent.push(addr);
            }
        }
        if let Some((addr, hello)) = hold.answer {
            if !self.answers.iter().any(|(a, _)| *a == addr) {
                self.silent.retain(|a| *a != addr);
                self.gone.retain(|a| *a != addr);
                self.timed_out.retain(|a| *a != addr);
                self.answers.push((addr, hello));
            }
        }
        self
    }
}

enum Heard {
    Answer(NodeAddr, PeerHello),
    Silent(NodeAddr),
    Nothing { addr: NodeAddr, timed_out: bool },
}

/// How long a member that gave no hello gets to take a bare connection.
const SILENT_CHECK: Duration = Duration::from_millis(500);

/// How often a held restart asks again the members it did not reach.
const GONE_RETRY: Duration = Duration::from_secs(2);

/// TCP keepalive on a held connection: a stopped process's kernel still
/// answers it; a host that is gone, or a port blocked with DROP, ends the
/// hold on it within about half a minute.
const HOLD_KEEPALIVE: (Duration, Duration, u32) =
    (Duration::from_secs(10), Duration::from_secs(5), 3);

/// What ended a held restart's wait, for the next probe.
#[derive(Default)]
struct HoldOutcome {
    /// Silent members whose held connection is still as it was.
    still_silent: Vec<NodeAddr>,
    /// A member that answered the hello meanwhile.
    answer: Option<(NodeAddr, PeerHello)>,
}

/// Wait, with no bound, until something changes for a held restart: a
/// `silent` member answers, refuses, closes or resets the one connection
/// held to it, or stops answering TCP keepalives on it; or a `gone` one
/// takes a connection (asked every [`GONE_RETRY`]). The silent members
/// get no other connection meanwhile (one more only when the kernel timed
/// the last one out). Every task ends with the returned future.
async fn until_one_speaks(silent: Vec<NodeAddr>, gone: Vec<NodeAddr>) -> HoldOutcome {
    let (changed, mut heard) = tokio::sync::mpsc::channel::<(NodeAddr, Held)>(1);
    let (cancel, cancelled) = watch::channel(());
    for addr in silent.iter().cloned() {
        let (changed, mut cancelled) = (changed.clone(), cancelled.clone());
        actix_rt::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancelled.changed() => return,
                    held = hold_on(&addr) => match held {
                        // Not in a tight loop, whatever the kernel does.
                        Held::StillSilent => actix_rt::time::sleep(GONE_RETRY).await,
                        held => {
                            let _ = changed.send((addr, held)).await;
                            return;
                        }
                    },
                }
            }
        });
    }
    for addr in gone {
        let (changed, mut cancelled) = (changed.clone(), cancelled.clone());
        actix_rt::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancelled.changed() => return,
                    asked = async {
                        actix_rt::time::sleep(GONE_RETRY).await;
                        ask_gone(&addr).await
                    } => if let Some(held) = asked {
                        let _ = changed.send((addr, held)).await;
                        return;
                    },
                }
            }
        });
    }
    drop(changed);
    let mut outcome = HoldOutcome {
        still_silent: silent,
        answer: None,
    };
    if let Some((addr, held)) = heard.recv().await {
        debug!("held restart: {addr} {held:?}; asking the members again");
        outcome.still_silent.retain(|a| *a != addr);
        if let Held::Answered(hello) = held {
            outcome.answer = Some((addr, hello));
        }
    }
    // Dropped: every task's `changed()` wakes up and it ends.
    drop(cancel);
    outcome
}

#[derive(Debug)]
enum Held {
    /// It answered the hello.
    Answered(PeerHello),
    /// It refused, closed or reset the connection, answered something
    /// else, or stopped answering keepalives: it woke up, died, or can no
    /// longer be reached.
    Ended,
    /// The connect timed out: a stopped process's accept queue may be
    /// full. Not a sign that it is gone.
    StillSilent,
}

/// Connect to `addr`, say a peer hello and wait, with no bound of our own
/// (TCP keepalive watches the path), for the answer or the connection's
/// end.
async fn hold_on(addr: &str) -> Held {
    let stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Held::StillSilent,
        Err(_) => return Held::Ended,
    };
    let (idle, interval, retries) = HOLD_KEEPALIVE;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(retries);
    if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
        warn!("held restart: no TCP keepalive on the connection to {addr}: {e}");
    }
    // No bound of our own: TCP keepalive watches the path.
    match PeerLink::hello_over(stream, addr, SessionRole::Peer, Duration::MAX).await {
        Ok(link) => Held::Answered(link.hello),
        Err(_) => Held::Ended,
    }
}

/// A member a held restart could not reach: `None` while it still cannot
/// be, else what it said (a member that takes the connection but gives no
/// hello in time is news too: the next probe finds it silent).
async fn ask_gone(addr: &str) -> Option<Held> {
    let stream = match tokio::time::timeout(
        PEER_PROBE_TIMEOUT,
        tokio::net::TcpStream::connect(addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        _ => return None,
    };
    Some(
        match PeerLink::hello_over(stream, addr, SessionRole::Peer, PEER_PROBE_TIMEOUT).await {
            Ok(link) => Held::Answered(link.hello),
            Err(_) => Held::Ended,
        },
    )
}

/// Does something accept TCP connections at `addr` within `timeout`? A
/// stopped or overloaded server still does (its kernel completes the
/// handshake); a dead one refuses them.
async fn accepts_connections(addr: &str, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// One attempt of [`pull_from_peer`]: connect, then pull and apply globs
/// until level with `peer`.
async fn pull_once(
    storage: &Addr<StorageActor>,
    flusher: &Addr<CommitLogActor>,
    peer: &str,
    ask: &PullAsk,
) -> Result<(), PullStop> {
    let mut link = PeerLink::connect(peer, Duration::from_millis(500)).await?;
    let Ok(Ok(info)) = storage.send(GetInfo).await else {
        return Ok(());
    };
    let mut last = info.last_commit;
    if link.hello.commit <= last {
        return Ok(());
    }
    info!(
        "before promoting: {peer} holds commits {}..={} we lack; pulling them",
        last + 1,
        link.hello.commit
    );
    loop {
        let req = RequestBody::CatchUp {
            from: last + 1,
            max_count: 10_000,
            max_bytes: 8 << 20,
            server_id: ask.server_id,
            addr: ask.addr.clone(),
            repository_id: ask.repository_id.clone(),
            for_promotion: true,
        };
        let records = match link.call(req, Duration::from_secs(5)).await {
            Ok((_, ResponseBody::Records { records, .. })) => records,
            Ok((_, other)) => {
                warn!(
                    "pulling from {peer} before promoting: unexpected answer, a `{}` response",
                    response_type(&other)
                );
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if records.is_empty() {
            return Ok(());
        }
        let bodies: Vec<Vec<u8>> = records.into_iter().map(|b| b.into_vec()).collect();
        let applied = match storage.send(ApplyRecords::plain(bodies)).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) if e.is_fatal() && !crate::actors::storage::is_closed(&e) => {
                return Err(PullStop::Fatal(format!(
                    "applying records pulled from {peer} failed: {e}"
                )));
            }
            Ok(Err(e)) => {
                warn!("records from {peer} do not continue our log ({e}); promoting without them");
                return Ok(());
            }
            Err(e) => {
                warn!("storage gone while pulling from {peer}: {e}");
                return Ok(());
            }
        };
        if let Some(sync) = applied.sync {
            match flusher.send(Flush { sync }).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(PullStop::Fatal(format!(
                        "fsync of records pulled from {peer} failed: {e}"
                    )));
                }
                Err(e) => {
                    warn!("flushing records pulled from {peer}: {e}");
                    return Ok(());
                }
            }
        }
        if applied.last <= last {
            return Ok(());
        }
        last = applied.last;
    }
}

#[cfg(test)]
#[path = "supervisor_tests.rs"]
mod tests;
