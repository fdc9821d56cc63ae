//! `Router`: the connections of one application session and the view of the
//! node they are chosen by — which server reads go to, which takes commits,
//! re-learning the node, dropping what is no longer used.
//!
//! This module owns connection state only. It must never retry a request or
//! decide what an error means for the application (that is `session`), and
//! never keep a connection after a network or protocol failure.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::client::connection::{progress_of, ConnectOptions, Connection};
use crate::client::error::{Attempt, ClientError, Result};
use crate::client::probe::{Answer, Probes, FRESH, STRAGGLERS};
use crate::client::routing::{self, ViewRank};
use crate::protocol::{Response, ResponseBody, ServerRole, SessionRole, WireError};
use crate::types::{CommitNumber, Epoch, Member, MemberRole, Node};

/// Index of a connection inside the router; valid until the next call that
/// takes `&mut Router`.
pub(crate) type ConnIdx = usize;

pub(crate) struct Router {
    opts: ConnectOptions,
    seeds: Vec<String>,
    /// The repository of the first server reached: a server of another
    /// one (restarted on an empty directory, or a seed of another node) is
    /// treated as unreachable.
    repository_id: String,
    node: Node,
    view: ViewRank,
    conns: Vec<Connection>,
    read_target: Option<Member>,
    commit_target: Option<Member>,
    last_seen: CommitNumber,
    /// The epoch `last_seen` counts commits of (`None` before any answer).
    progress_epoch: Option<Epoch>,
    /// The commit of the first primary heard in a newer epoch, until the
    /// session has capped its required progress at it.
    epoch_start: Option<CommitNumber>,
    rng: StdRng,
    /// Connection attempts and node requests running on their own
    /// threads (see `probe`).
    probes: Probes,
    /// See [`Router::set_read_wait`].
    read_wait: Option<Duration>,
    /// When a newer epoch's primary was last heard (and the connections
    /// of older epochs dropped).
    epoch_changed: Option<Instant>,
    /// When `last_seen` last grew: an answer from before then is older
    /// than what the session saw.
    seen_at: Option<Instant>,
    /// The server whose answer last made it grow, if known.
    seen_from: Option<Seen>,
}

/// Who told the session the commit it last counted: the epoch its hello
/// named and its server id (0: not known).
#[derive(Clone, Copy, Debug)]
struct Seen {
    epoch: Epoch,
    server_id: u64,
}

/// What [`Router::start`] heard from the seeds so far.
#[derive(Default)]
struct SeedsHeard {
    /// Connections that said hello, by the seed's index.
    answered: Vec<(usize, Connection)>,
    failed: Vec<usize>,
    tried: Vec<Attempt>,
    /// Set by the first answer: earlier seeds get until then.
    deadline: Option<Instant>,
}

impl SeedsHeard {
    fn record(&mut self, seeds: &[String], Answer { addr, result, .. }: Answer) {
        let i = seeds.iter().position(|s| *s == addr).unwrap_or(usize::MAX);
        match result {
            Ok((c, _)) => {
                self.answered.push((i, c));
                self.deadline
                    .get_or_insert_with(|| Instant::now() + STRAGGLERS);
            }
            Err(e) => {
                self.failed.push(i);
                self.tried.push(Attempt {
                    addr,
                    error: Box::new(e),
                });
            }
        }
    }

    /// Done once a seed answered and every seed before it has failed.
    fn settled(&self) -> bool {
        self.answered
            .iter()
            .map(|(i, _)| *i)
            .min()
            .is_some_and(|best| (0..best).all(|i| self.failed.contains(&i)))
    }
}

/// What a round of [`Router::refresh_node`] heard so far.
#[derive(Default)]
struct Heard {
    best: Option<(ViewRank, Node)>,
    tried: Vec<Attempt>,
    /// Set by the first view heard: the others get until then.
    deadline: Option<Instant>,
}

fn matches(c: &Connection, m: &Member) -> bool {
    c.addr() == m.addr || (m.server_id != 0 && c.hello().server_id == m.server_id)
}

impl Router {
    /// Connect to the first reachable seed and learn the node from it.
    ///
    /// Every seed is asked at once: a hung one must not hold the session
    /// up. Of those that answer, the first in `seeds` is taken, waiting for
    /// the seeds before it at most [`STRAGGLERS`] after the first answer;
    /// the others that answered are kept too.
    pub fn start(mut seeds: Vec<String>, opts: ConnectOptions) -> Result<Router> {
        let mut seen = std::collections::HashSet::new();
        seeds.retain(|a| seen.insert(a.clone()));
        let mut probes = Probes::new(opts.clone());
        let mut seeds_heard = SeedsHeard::default();
        for addr in &seeds {
            if !probes.connect(addr) {
                continue;
            }
            // No room for a thread: it ran here, as attempts did before
            // probes; stop at the first seed that answers, as they did.
            while let Some(answer) = probes.ready() {
                seeds_heard.record(&seeds, answer);
            }
            if !seeds_heard.answered.is_empty() {
                break;
            }
        }
        while !seeds_heard.settled() {
            let deadline = seeds_heard.deadline;
            let Some(answer) = probes.next(deadline) else {
                break;
            };
            seeds_heard.record(&seeds, answer);
        }
        let SeedsHeard {
            mut answered,
            tried,
            ..
        } = seeds_heard;
        answered.sort_by_key(|(i, _)| *i);
        let mut answered = answered.into_iter().map(|(_, c)| c);
        let first = answered
            .next()
            .ok_or(ClientError::NoServerReachable { tried })?;
        let repository_id = first.hello().repository_id.clone();
        let mut router = Router::new(opts, seeds, repository_id, probes);
        router.adopt_hello(&first, Instant::now());
        if router.node.members.is_empty() {
            // A server that knows no node yet stands for the whole node.
            let h = first.hello();
            let role = match h.role {
                ServerRole::Primary => MemberRole::Primary,
                _ => MemberRole::Secondary,
            };
            router.node.members.push(Member {
                server_id: h.server_id,
                addr: first.addr().to_string(),
                role,
            });
        }
        router.conns.push(first);
        for other in answered {
            let _ = router.admit(other);
        }
        Ok(router)
    }

    /// A router of `repository_id` that has heard nothing yet.
    fn new(
        opts: ConnectOptions,
        seeds: Vec<String>,
        repository_id: String,
        probes: Probes,
    ) -> Router {
        Router {
            opts,
            seeds,
            repository_id,
            node: Node::default(),
            view: (Epoch::default(), 0),
            conns: Vec::new(),
            read_target: None,
            commit_target: None,
            last_seen: 0,
            progress_epoch: None,
            epoch_start: None,
            rng: StdRng::from_entropy(),
            probes,
            read_wait: None,
            epoch_changed: None,
            seen_at: None,
            seen_from: None,
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn epoch(&self) -> Epoch {
        self.view.0
    }

    pub fn read_server(&self) -> Option<&str> {
        self.read_target.as_ref().map(|m| m.addr.as_str())
    }

    pub fn commit_server(&self) -> Option<&str> {
        self.commit_target.as_ref().map(|m| m.addr.as_str())
    }

    pub fn last_seen(&self) -> CommitNumber {
        self.last_seen
    }

    pub fn conn(&mut self, idx: ConnIdx) -> &mut Connection {
        &mut self.conns[idx]
    }

    /// Count the server's progress carried by a response that came from
    /// `addr` (a commit's or a status's, on the commit connection).
    pub fn observe_from(&mut self, addr: &str, resp: &Response) {
        match self.conns.iter().position(|c| c.addr() == addr) {
            Some(idx) => self.observe_on(idx, resp),
            None => self.saw(progress_of(resp), Instant::now(), None),
        }
    }

    /// Count the progress of a response that came on connection `idx`,
    /// unless its server said hello in an older epoch than the one counted
    /// (a server that kept records the failover lost).
    pub fn observe_on(&mut self, idx: ConnIdx, resp: &Response) {
        let h = self.conns[idx].hello();
        let from = Seen {
            epoch: h.epoch,
            server_id: h.server_id,
        };
        if self.progress_epoch.is_none_or(|e| from.epoch >= e) {
            self.saw(progress_of(resp), Instant::now(), Some(from));
        }
    }

    // ---- the node ----

    /// Re-learn the node from every known address and route by the newest
    /// view. Errors only when no server answered.
    ///
    /// Every address is asked at once (see `probe`): once one answered, the
    /// others get [`STRAGGLERS`] more; a later answer is taken when it
    /// comes.
    pub fn refresh_node(&mut self) -> Result<()> {
        // Answers already in are old: every address is asked afresh.
        self.take_ready();
        let addrs = routing::known_addrs(&self.node, &self.seeds);
        let mut heard = Heard::default();
        for addr in &addrs {
            if self.probes.is_running(addr) {
                continue;
            }
            // A server that restarted since we last used its connection
            // must still be heard: a connection it closed is not asked.
            match self.take_connection(addr) {
                Some(conn) => {
                    if let Some(conn) = self.probes.ask(conn) {
                        self.conns.push(conn);
                    }
                }
                None => {
                    self.probes.connect(addr);
                }
            }
            // Without room for threads, probes run here: take each answer
            // at once, while it is fresh.
            while let Some(answer) = self.probes.ready() {
                self.note(answer, &mut heard);
            }
        }
        while addrs.iter().any(|a| self.probes.is_running(a)) {
            let Some(answer) = self.probes.next(heard.deadline) else {
                break;
            };
            self.note(answer, &mut heard);
        }
        self.conns.retain(Connection::is_usable);
        match heard.best {
            Some((rank, node)) => {
                self.adopt_view(rank, node);
                Ok(())
            }
            None => Err(ClientError::NoServerReachable { tried: heard.tried }),
        }
    }

    /// Count one answer of a [`Router::refresh_node`] round.
    fn note(&mut self, answer: Answer, heard: &mut Heard) {
        let addr = answer.addr.clone();
        match self.take_answer(answer) {
            Ok(Some((rank, node))) => {
                if heard.best.as_ref().is_none_or(|(r, _)| rank > *r) {
                    heard.best = Some((rank, node));
                }
                heard
                    .deadline
                    .get_or_insert_with(|| Instant::now() + STRAGGLERS);
            }
            Ok(None) => {}
            Err(error) => heard.tried.push(Attempt {
                addr,
                error: Box::new(error),
            }),
        }
    }

    /// Take the connection to `addr` out of the router, if there is one
    /// the server has not closed; a closed one is dropped.
    fn take_connection(&mut self, addr: &str) -> Option<Connection> {
        let idx = self.conns.iter().position(|c| c.addr() == addr)?;
        let mut conn = self.conns.remove(idx);
        (!conn.is_stale()).then_some(conn)
    }

    /// Keep what a probe found and count what its server said; the node
    /// view it told, if any.
    ///
    /// An answer that waited in the channel (taken by `take_ready`, after
    /// the session went on without it) is kept as a connection only: the
    /// epoch, role and commit it tells are as old as the answer. What a
    /// fresh one tells is counted as of when it came in (see `heard`).
    fn take_answer(&mut self, answer: Answer) -> Result<Option<(ViewRank, Node)>> {
        let fresh = answer.answered.elapsed() < FRESH;
        let at = answer.answered;
        let (conn, resp) = answer.result?;
        // Out of `conns` (on its probe) when a newer epoch was heard, with
        // a hello of an older one: dropped, as `heard` dropped the others.
        let missed_retain = self.epoch_changed.is_some_and(|t| answer.started < t)
            && self.progress_epoch.is_some_and(|e| conn.hello().epoch < e);
        let Some(resp) = resp else {
            if missed_retain {
                return Ok(None);
            }
            if !fresh {
                self.admit_quietly(conn)?;
                return Ok(None);
            }
            // A new connection: its hello tells the node.
            let idx = self.admit_at(conn, at)?;
            let h = self.conns[idx].hello();
            return Ok(Some(((h.epoch, h.commit), h.node.clone())));
        };
        // The answer itself is current, whatever the hello was.
        if !missed_retain {
            self.conns.push(conn);
        }
        Ok(match resp.body {
            ResponseBody::Node { node, epoch, role } if fresh => {
                self.heard(epoch, role, resp.commit, at);
                Some(((epoch, resp.commit), node))
            }
            _ => None,
        })
    }

    /// Take the answers in, keeping what they found; the outcome for
    /// `addr` if one was in (a probe that ran on this thread).
    fn take_ready_for(&mut self, addr: Option<&str>) -> Option<Result<()>> {
        let mut outcome = None;
        while let Some(answer) = self.probes.ready() {
            let theirs = Some(answer.addr.as_str()) == addr;
            let other = answer.addr.clone();
            match self.take_answer(answer) {
                Ok(_) if theirs => outcome = Some(Ok(())),
                Err(e) if theirs => outcome = Some(Err(e)),
                Err(e) => log::debug!("{other}: {e}"),
                Ok(_) => {}
            }
        }
        outcome
    }

    /// Keep what probes found since the last call, without waiting.
    fn take_ready(&mut self) {
        self.take_ready_for(None);
    }

    /// Count what `conn`'s hello said, as of `at` (when it came in).
    fn adopt_hello(&mut self, conn: &Connection, at: Instant) {
        let h = conn.hello();
        let (epoch, role, commit, node) = (h.epoch, h.role, h.commit, h.node.clone());
        self.heard(epoch, role, commit, at);
        self.adopt_view((epoch, commit), node);
    }

    /// Count commit `n` as seen, as of `at` (when the answer telling it
    /// came in) from the server `from` (if known), noting when and from
    /// whom the count last grew.
    fn saw(&mut self, n: CommitNumber, at: Instant, from: Option<Seen>) {
        if n > self.last_seen {
            self.last_seen = n;
            self.seen_at = Some(self.seen_at.map_or(at, |t| t.max(at)));
            self.seen_from = from;
        }
    }

    /// Count the epoch, role and commit a server answered a hello or a node
    /// request with. A server of an older epoch than the one counted (an
    /// old primary back with commits the failover lost) adds nothing.
    ///
    /// A failover can lose commits that reply commit numbers had already
    /// counted: the old primary applied them, and they were never
    /// acknowledged, which `--sync-replicas` allows. No server will reach
    /// those numbers, so requiring them would keep every read `behind`
    /// until new commits pass them, for ever on a quiet node. The first
    /// primary heard in a newer epoch holds every acknowledged commit. Its
    /// commit therefore caps what this session has seen, and (through
    /// [`Router::take_epoch_start`]) the progress it requires.
    fn heard(&mut self, epoch: Epoch, role: ServerRole, commit: CommitNumber, at: Instant) {
        // Who said it is not known here; what it said is of `epoch`.
        let from = Some(Seen {
            epoch,
            server_id: 0,
        });
        let Some(known) = self.progress_epoch else {
            self.progress_epoch = Some(epoch);
            self.saw(commit, at, from);
            return;
        };
        if epoch >= known {
            self.saw(commit, at, from);
        }
        if epoch <= known || role != ServerRole::Primary {
            return;
        }
        self.progress_epoch = Some(epoch);
        // Connections opened before the failover said hello in the old
        // epoch: open them again, so each server's epoch is known afresh.
        self.conns.retain(|c| c.hello().epoch >= epoch);
        self.epoch_changed = Some(Instant::now());
        // The primary said `commit` at `at`: what the session saw later
        // from a server already in this epoch, or from this primary itself
        // (the epoch names it), may be further, not lost. Seen from an
        // older epoch, it may be lost.
        let newer = |s: &Seen| s.epoch >= epoch || s.server_id == epoch.server;
        let commit = match (self.seen_at, &self.seen_from) {
            (Some(t), Some(s)) if t > at && newer(s) => commit.max(self.last_seen),
            _ => commit,
        };
        if self.last_seen > commit {
            log::warn!(
                "the node failed over (epoch {}.{}): commits {}..={} this session saw \
                 counted were never acknowledged and are lost; counting from {commit}",
                epoch.term,
                epoch.server,
                commit + 1,
                self.last_seen
            );
            self.last_seen = commit;
        }
        self.epoch_start = Some(commit);
    }

    /// The commit of a newer epoch's primary heard since the last call: a
    /// progress requirement set before it, and beyond it, can never be met.
    pub fn take_epoch_start(&mut self) -> Option<CommitNumber> {
        self.epoch_start.take()
    }

    /// Take `node` if it is at least as new as the current view, and drop
    /// the targets it no longer supports.
    fn adopt_view(&mut self, rank: ViewRank, node: Node) {
        if rank < self.view || node.members.is_empty() {
            return;
        }
        self.view = rank;
        self.node = node;
        if let Some(t) = &self.commit_target {
            if self.node.primary().is_none_or(|p| p.addr != t.addr) {
                self.commit_target = None;
            }
        }
        if let Some(t) = &self.read_target {
            if !routing::still_readable(&self.node, t) {
                self.read_target = None;
            }
        }
    }

    // ---- connections ----

    fn find(&self, m: &Member) -> Option<ConnIdx> {
        self.conns
            .iter()
            .position(|c| c.is_usable() && matches(c, m))
    }

    /// A connection to `addr`: one the router has (not closed by the
    /// server), the one a running probe of it brings (waiting for it at
    /// most `wait`; `None`: its own timeouts), or a new one.
    fn connection_to_addr(&mut self, addr: &str, wait: Option<Duration>) -> Result<ConnIdx> {
        self.take_ready();
        if let Some(idx) = self.open_connection(addr) {
            return Ok(idx);
        }
        // Bounded (a read that could go elsewhere): connect on a probe and
        // wait for it at most `wait`. Being probed already: wait for that
        // answer rather than open another.
        if wait.is_some() {
            self.probes.connect(addr);
        }
        // A wait too long to add to now is no bound at all.
        let deadline = wait.and_then(|w| Instant::now().checked_add(w));
        while self.probes.is_running(addr) {
            let Some(answer) = self.probes.next(deadline) else {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(ClientError::Io {
                        addr: addr.to_string(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no hello within {:?}", wait.unwrap_or_default()),
                        ),
                    });
                }
                break;
            };
            let theirs = answer.addr == addr;
            match self.take_answer(answer) {
                Err(e) if theirs => return Err(e),
                _ => {}
            }
        }
        if let Some(idx) = self.open_connection(addr) {
            return Ok(idx);
        }
        let conn = Connection::connect(addr, SessionRole::Application, &self.opts)?;
        self.admit(conn)
    }

    /// A usable connection to `addr` the server has not closed (see
    /// [`Router::open_where`]).
    fn open_connection(&mut self, addr: &str) -> Option<ConnIdx> {
        self.open_where(|c| c.addr() == addr)
    }

    /// A usable connection `wanted` that the server has not closed; every
    /// closed one found on the way is dropped (one that came in from a
    /// probe may have waited long in its channel; a server may be known by
    /// two addresses, its seed's and its member's).
    fn open_where(&mut self, wanted: impl Fn(&Connection) -> bool) -> Option<ConnIdx> {
        loop {
            let idx = self.conns.iter().position(|c| c.is_usable() && wanted(c))?;
            if !self.conns[idx].is_stale() {
                return Some(idx);
            }
            self.conns.remove(idx);
        }
    }

    /// [`Router::admit`] without counting what its (old) hello said.
    fn admit_quietly(&mut self, conn: Connection) -> Result<ConnIdx> {
        self.check_repository(&conn)?;
        self.conns.push(conn);
        Ok(self.conns.len() - 1)
    }

    /// Keep a new connection if its server serves this session's
    /// repository, and count what its hello said.
    fn admit(&mut self, conn: Connection) -> Result<ConnIdx> {
        self.admit_at(conn, Instant::now())
    }

    /// [`Router::admit`] of a hello that came in at `at`.
    fn admit_at(&mut self, conn: Connection, at: Instant) -> Result<ConnIdx> {
        self.check_repository(&conn)?;
        self.adopt_hello(&conn, at);
        self.conns.push(conn);
        Ok(self.conns.len() - 1)
    }

    fn check_repository(&self, conn: &Connection) -> Result<()> {
        let (addr, theirs) = (conn.addr(), &conn.hello().repository_id);
        if *theirs != self.repository_id {
            log::warn!(
                "{addr} serves repository {theirs}, not this session's {}: not used",
                self.repository_id
            );
            return Err(ClientError::Io {
                addr: addr.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "serves repository {theirs}, not this session's {}",
                        self.repository_id
                    ),
                ),
            });
        }
        Ok(())
    }

    /// A connection to `m`, reusing one to the same server; `wait` as for
    /// [`Router::connection_to_addr`].
    fn connection_to(&mut self, m: &Member, wait: Option<Duration>) -> Result<ConnIdx> {
        match self.find(m) {
            Some(idx) => Ok(idx),
            None => self.connection_to_addr(&m.addr, wait),
        }
    }

    /// How long a read waits for a probe of its server already running
    /// (the session's read failover timeout).
    pub fn set_read_wait(&mut self, wait: Option<Duration>) {
        self.read_wait = wait;
    }

    /// Drop every connection to `m`.
    pub fn disconnect(&mut self, m: &Member) {
        self.conns.retain(|c| !matches(c, m));
    }

    /// Keep only the connections to the read and commit servers.
    pub fn prune(&mut self) {
        // Connections probes brought in and nobody took are closed too.
        self.take_ready();
        let keep: Vec<&Member> = self
            .read_target
            .iter()
            .chain(self.commit_target.iter())
            .collect();
        let mut kept: Vec<Connection> = Vec::new();
        for c in std::mem::take(&mut self.conns) {
            let wanted = c.is_usable()
                && keep.iter().any(|m| matches(&c, m))
                && !kept.iter().any(|k| k.addr() == c.addr());
            if wanted {
                kept.push(c);
            }
        }
        self.conns = kept;
    }

    // ---- commits ----

    /// The server commits go to, as the node names it.
    pub fn commit_target(&self) -> Option<&Member> {
        self.commit_target.as_ref()
    }

    /// Send commits to `addr` from now on (a `wrong_server` redirect).
    pub fn redirect_commits(&mut self, addr: &str) {
        self.commit_target = Some(routing::member_at(&self.node, addr, MemberRole::Primary));
    }

    /// Stop sending commits to the current target and drop its connection;
    /// returns the member it was (or the node's primary if none was set).
    pub fn forget_commit_target(&mut self) -> Option<Member> {
        let target = self
            .commit_target
            .take()
            .or_else(|| self.node.primary().cloned());
        if let Some(m) = &target {
            self.disconnect(m);
        }
        target
    }

    /// Start connecting to the primary on a probe's thread, so that the
    /// first commit finds its connection ready. Never waits: a dead or hung
    /// primary must not keep a session from reading.
    pub fn prepare_commits(&mut self) {
        if self.commit_target.is_none() {
            self.commit_target = self.node.primary().cloned();
        }
        if let Some(t) = self.commit_target.clone() {
            // Without room for a thread it would run here: the first
            // commit connects instead.
            if self.find(&t).is_none() && Probes::has_room() {
                self.probes.connect(&t.addr);
            }
        }
    }

    /// The connection to the primary, opened (or re-opened, when the server
    /// dropped it while idle) as needed. With no primary in the node view,
    /// `wrong_server` without a primary, as a secondary would answer.
    pub fn commit_connection(&mut self) -> Result<ConnIdx> {
        self.commit_connection_within(None)
    }

    /// [`Router::commit_connection`], waiting for a new connection at most
    /// `wait` (`None`: the connection timeouts).
    pub fn commit_connection_within(&mut self, wait: Option<Duration>) -> Result<ConnIdx> {
        let target =
            match &self.commit_target {
                Some(t) => t.clone(),
                None => self.node.primary().cloned().ok_or(ClientError::Server(
                    WireError::WrongServer { primary: None },
                ))?,
            };
        let idx = match self.open_where(|c| matches(c, &target)) {
            Some(idx) => idx,
            None => self.connection_to_addr(&target.addr, wait)?,
        };
        // Connecting may have taught a newer view without this server as
        // primary; it then answers `wrong_server`, which re-routes.
        self.commit_target = Some(target);
        Ok(idx)
    }

    // ---- reads ----

    /// The read server's connection; chooses one if there is none.
    pub fn read_connection(
        &mut self,
        exclude: &mut Vec<String>,
        tried: &mut Vec<Attempt>,
    ) -> Result<ConnIdx> {
        if let Some(t) = self.read_target.clone() {
            match self.connection_to(&t, self.read_wait) {
                Ok(idx) => return Ok(idx),
                Err(error) => {
                    exclude.push(t.addr.clone());
                    tried.push(Attempt {
                        addr: t.addr,
                        error: Box::new(error),
                    });
                    self.read_target = None;
                }
            }
        }
        self.select_read_server(exclude, tried)
    }

    /// The read server failed on connection `idx`: stop reading there and
    /// never pick it again within this request (`exclude`).
    pub fn read_server_failed(&mut self, idx: ConnIdx, exclude: &mut Vec<String>) {
        let conn = self.conns.remove(idx);
        exclude.push(conn.addr().to_string());
        if let Some(t) = self.read_target.take() {
            exclude.push(t.addr.clone());
            self.disconnect(&t);
        }
    }

    /// Choose the read server: a random secondary, else the primary,
    /// skipping `exclude`d addresses and servers not serving reads;
    /// re-learns the node once when every candidate failed.
    pub fn select_read_server(
        &mut self,
        exclude: &mut Vec<String>,
        tried: &mut Vec<Attempt>,
    ) -> Result<ConnIdx> {
        let mut refreshed = false;
        loop {
            if let Some(idx) = self.pick_reader(exclude, tried) {
                return Ok(idx);
            }
            if refreshed {
                break;
            }
            refreshed = true;
            if let Err(ClientError::NoServerReachable { tried: more }) = self.refresh_node() {
                tried.extend(more);
                break;
            }
        }
        self.read_target = None;
        Err(ClientError::NoServerReachable {
            tried: std::mem::take(tried),
        })
    }

    /// One round of [`Router::select_read_server`]. A secondary already
    /// connected is taken at once; otherwise every candidate without a
    /// connection is asked at once (see `probe`) and the first secondary
    /// to answer is taken. The primary is taken when no secondary can
    /// serve, or none answered within [`STRAGGLERS`] of being asked.
    fn pick_reader(
        &mut self,
        exclude: &mut Vec<String>,
        tried: &mut Vec<Attempt>,
    ) -> Option<ConnIdx> {
        self.take_ready();
        let order = routing::read_order(&self.node, exclude, &mut self.rng);
        let is_primary = |m: &Member| m.role == MemberRole::Primary;
        // Found by member, not index: a hello of a newer epoch drops the
        // connections of the older one.
        let mut primary: Option<Member> = None;
        for m in &order {
            let idx = match self.find(m) {
                Some(idx) => idx,
                // On a thread (or already running): waited for below.
                None if !self.probes.connect(&m.addr) => continue,
                // No room for a thread: it ran here and its answer is in.
                None => {
                    if let Some(Err(error)) = self.take_ready_for(Some(&m.addr)) {
                        exclude.push(m.addr.clone());
                        tried.push(Attempt {
                            addr: m.addr.clone(),
                            error: Box::new(error),
                        });
                        continue;
                    }
                    let Some(idx) = self.find(m) else {
                        continue;
                    };
                    idx
                }
            };
            let role = self.conns[idx].hello().role;
            if !routing::serves_reads(role) {
                log::debug!("{} does not serve reads ({role:?})", m.addr);
                exclude.push(m.addr.clone());
            } else if is_primary(m) {
                primary = Some(m.clone());
            } else {
                self.read_target = Some(m.clone());
                return Some(idx);
            }
        }
        // Once the primary can serve, each secondary still being asked gets
        // STRAGGLERS from when its probe started (an earlier round's probe,
        // e.g. of `start`, has used part of it already).
        let stragglers_until = |probes: &Probes| {
            order
                .iter()
                .filter(|m| !is_primary(m))
                .filter_map(|m| probes.started(&m.addr))
                .max()
                .map_or_else(Instant::now, |t| t + STRAGGLERS)
        };
        let mut deadline = primary.as_ref().map(|_| stragglers_until(&self.probes));
        // While a secondary is being asked, or the primary is and nothing
        // else can serve.
        while order.iter().any(|m| {
            !exclude.contains(&m.addr)
                && self.probes.is_running(&m.addr)
                && (!is_primary(m) || primary.is_none())
        }) {
            let Some(answer) = self.probes.next(deadline) else {
                break;
            };
            let Some(m) = order.iter().find(|m| m.addr == answer.addr).cloned() else {
                // An earlier round's probe: keep what it found.
                let addr = answer.addr.clone();
                if let Err(e) = self.take_answer(answer) {
                    log::debug!("{addr}: {e}");
                }
                continue;
            };
            if let Err(error) = self.take_answer(answer) {
                exclude.push(m.addr.clone());
                tried.push(Attempt {
                    addr: m.addr.clone(),
                    error: Box::new(error),
                });
                continue;
            }
            let Some(idx) = self.find(&m) else {
                continue;
            };
            let role = self.conns[idx].hello().role;
            if !routing::serves_reads(role) {
                log::debug!("{} does not serve reads ({role:?})", m.addr);
                exclude.push(m.addr.clone());
            } else if !is_primary(&m) {
                self.read_target = Some(m);
                return Some(idx);
            } else {
                primary = Some(m);
                if deadline.is_none() {
                    deadline = Some(stragglers_until(&self.probes));
                }
            }
        }
        let m = primary?;
        let idx = self.find(&m)?;
        self.read_target = Some(m);
        Some(idx)
    }

    /// Would a read failing on the read server have another member to go
    /// to (by the node view, leaving out `exclude`)?
    pub fn another_reader(&self, exclude: &[String]) -> bool {
        let current = self.read_target.as_ref().map(|m| m.addr.as_str());
        self.node.members.iter().any(|m| {
            matches!(m.role, MemberRole::Primary | MemberRole::Secondary)
                && Some(m.addr.as_str()) != current
                && !exclude.contains(&m.addr)
        })
    }

    /// Servers other than the read server that may serve a read, best
    /// first: the other secondaries in random order, then the primary.
    pub fn other_readers(&mut self) -> Vec<Member> {
        let exclude: Vec<String> = self.read_target.iter().map(|m| m.addr.clone()).collect();
        let read_id = self.read_target.as_ref().map_or(0, |m| m.server_id);
        routing::read_order(&self.node, &exclude, &mut self.rng)
            .into_iter()
            .filter(|m| read_id == 0 || m.server_id != read_id)
            .collect()
    }

    /// A connection to `m` if it serves reads.
    pub fn reader(&mut self, m: &Member) -> Option<ConnIdx> {
        match self.connection_to(m, self.read_wait) {
            Ok(idx) if routing::serves_reads(self.conns[idx].hello().role) => Some(idx),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let opts = ConnectOptions::default();
        Router::new(opts.clone(), Vec::new(), "r".into(), Probes::new(opts))
    }

    const E1: Epoch = Epoch { term: 1, server: 1 };
    const E2: Epoch = Epoch { term: 2, server: 2 };

    fn seen(epoch: Epoch, server_id: u64) -> Seen {
        Seen { epoch, server_id }
    }

    #[test]
    fn a_commit_the_new_primary_acknowledged_on_an_older_connection_is_kept() {
        // The commit went to server 2 over a connection opened while it was
        // a secondary (hello in E1); it then led E2 from commit 100.
        let mut r = router();
        let t0 = Instant::now();
        r.heard(E1, ServerRole::Secondary, 90, t0);
        r.saw(120, t0 + Duration::from_millis(10), Some(seen(E1, 2)));
        r.heard(E2, ServerRole::Primary, 100, t0 + Duration::from_millis(5));
        assert_eq!(r.last_seen(), 120);
    }

    #[test]
    fn a_new_primary_heard_after_the_last_progress_caps_it_at_its_commit() {
        // Commits 101..=140 of the old primary were never acknowledged.
        let mut r = router();
        let t0 = Instant::now();
        r.heard(E1, ServerRole::Primary, 140, t0);
        r.heard(E2, ServerRole::Primary, 100, t0 + Duration::from_millis(5));
        assert_eq!(r.last_seen(), 100);
        assert_eq!(r.take_epoch_start(), Some(100));
    }

    #[test]
    fn progress_seen_in_the_new_epoch_after_its_primary_spoke_is_kept() {
        // The primary said 100; a secondary of it later showed 140.
        let mut r = router();
        let t0 = Instant::now();
        r.heard(E1, ServerRole::Secondary, 90, t0);
        r.saw(140, t0 + Duration::from_millis(10), Some(seen(E2, 7)));
        r.heard(E2, ServerRole::Primary, 100, t0 + Duration::from_millis(5));
        assert_eq!(r.last_seen(), 140);
        assert_eq!(r.take_epoch_start(), Some(140));
    }

    #[test]
    fn progress_seen_later_from_an_older_epoch_is_still_capped() {
        // A server of the old epoch still held commits the failover lost.
        let mut r = router();
        let t0 = Instant::now();
        r.heard(E1, ServerRole::Secondary, 90, t0);
        r.saw(140, t0 + Duration::from_millis(10), Some(seen(E1, 7)));
        r.heard(E2, ServerRole::Primary, 100, t0 + Duration::from_millis(5));
        assert_eq!(r.last_seen(), 100);
        assert_eq!(r.take_epoch_start(), Some(100));
        // ... and so is progress from a server whose epoch is unknown.
        let mut r = router();
        r.heard(E1, ServerRole::Secondary, 90, t0);
        r.saw(140, t0 + Duration::from_millis(10), None);
        r.heard(E2, ServerRole::Primary, 100, t0 + Duration::from_millis(5));
        assert_eq!(r.last_seen(), 100);
    }
}
