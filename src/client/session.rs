//! `Session`: an application's view of a node as one server. It learns the
//! node from any member, reads from one secondary chosen at random (the
//! primary when there is none), sends commits to the primary, and hides
//! failures that are safe to hide:
//!
//! * a read whose server fails on the network (or is shutting down) moves
//!   silently to another secondary, then the primary, re-learning the node
//!   when every known server has failed;
//! * a read answered `behind` is retried once elsewhere (another secondary,
//!   the primary as last choice; the first one that answers decides);
//! * a commit answered `wrong_server`, `shutting_down`, `unavailable` or
//!   `restore_mode` was not applied: it is re-routed to the primary (named
//!   by the redirect, or re-learned from the members) and resent with the
//!   same idempotency token, pausing when the node still names the same
//!   server, within `SessionOptions::reroute_timeout` (`restore_mode` from
//!   the only primary the node knows is returned at once);
//! * a commit that could not be sent at all is resent once after
//!   re-learning the node: to a different primary if the node names one,
//!   else to the node's successor, which pings the primary and takes over
//!   if it is gone; with neither, the network error reaches the
//!   application (the commit was not applied).
//!
//! A commit that was sent but got no reply is never retried here: it is
//! `ClientError::OutcomeUnknown`, carrying its token. The application
//! resolves it with `commit_status(token)`, which is routed exactly as a
//! commit is (one helper, `ask_primary`, serves both), so it reaches the
//! successor when the primary died and makes it take over. Being a query,
//! a `commit_status` sent without a reply is resent like one never sent.
//!
//! A server that hangs (its kernel still accepts connections, it never
//! answers) holds up no new session: connecting, choosing a read server and
//! re-learning the node ask every server at once and go on with those that
//! answer (see `probe`). A read already sent to a server that then hangs
//! moves elsewhere after `read_failover_timeout`; a commit waits for the
//! primary up to the read timeout.
//!
//! A read server that failed on the network is reported to the primary
//! (`complain`, best effort), which removes it only if it cannot reach it
//! either.
//!
//! This module owns the retry policy and the typed API. It must never open
//! sockets or pick servers itself (that is `router`), never change a commit
//! body between attempts, and never report an unanswered commit as failed.

use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::client::connection::{unexpected, CallFailure, ConnectOptions};
use crate::client::error::{Attempt, ClientError, Result};
use crate::client::router::{ConnIdx, Router};
use crate::client::transaction::{CommitOutcome, Transaction};
use crate::client::value::{from_value, Object};
use crate::protocol::{
    CommitBody, RequestBody, RequiredProgress, Response, ResponseBody, WireError, WireRef,
};
use crate::types::{CommitNumber, Epoch, Node, Oid};

/// How long a commit keeps being re-routed by default (see
/// [`SessionOptions::reroute_timeout`]). A server promoting itself keeps its
/// own waits under it (`actors::supervisor`).
pub const DEFAULT_REROUTE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of an application session.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Socket settings of every connection the session opens.
    pub connect: ConnectOptions,
    /// How long a commit keeps being re-routed (redirects, a node changing
    /// primary under a take-over) before the last error reaches the
    /// application. Default 10 s.
    pub reroute_timeout: Duration,
    /// A read not answered within this long moves to another server that
    /// may serve it, as a read whose server failed does; the last such
    /// server waits the whole `connect.read_timeout`. Reads answer within
    /// milliseconds (about a second when waiting for a required progress),
    /// so a server silent for this long is hung or overloaded. `None`: every
    /// read waits the whole read timeout. Default 5 s.
    pub read_failover_timeout: Option<Duration>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            connect: ConnectOptions::default(),
            reroute_timeout: DEFAULT_REROUTE_TIMEOUT,
            read_failover_timeout: Some(Duration::from_secs(5)),
        }
    }
}

/// A blocking application session on a node. Use one session per thread.
pub struct Session {
    router: Router,
    reroute_timeout: Duration,
    read_failover_timeout: Option<Duration>,
    required_progress: RequiredProgress,
    /// When a read that every server answered `behind` last re-learned
    /// the node.
    relearned_for_behind: Option<Instant>,
}

/// How often a read answered `behind` everywhere may re-learn the node: a
/// requirement another session's commit set is often `behind` for a
/// moment, and re-learning asks every server.
const BEHIND_RELEARN_INTERVAL: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("read_server", &self.read_server())
            .field("commit_server", &self.commit_server())
            .field("epoch", &self.epoch())
            .field("last_seen_commit", &self.last_seen_commit())
            .finish()
    }
}

/// Errors after which a read moves to another server.
fn read_fails_over(e: &ClientError) -> bool {
    e.is_network()
        || matches!(
            e,
            ClientError::Server(WireError::ShuttingDown | WireError::Unavailable { .. })
        )
}

/// Longest wait for the primary to take a complaint.
const COMPLAINT_PATIENCE: Duration = Duration::from_secs(1);

/// A network error that is a timeout: the server was silent, not gone.
fn is_timeout(e: &ClientError) -> bool {
    matches!(e, ClientError::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut)
}

/// Server errors saying a commit was not applied there and belongs elsewhere.
fn commit_reroutes(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Server(
            WireError::WrongServer { .. }
                | WireError::ShuttingDown
                | WireError::Unavailable { .. }
                | WireError::RestoreMode
        )
    )
}

/// Failures after which a sent commit may or may not have been applied.
fn leaves_outcome_unknown(e: &ClientError) -> bool {
    e.is_network()
        || matches!(
            e,
            ClientError::Protocol { .. } | ClientError::Server(WireError::Internal { .. })
        )
}

/// What becomes of a request to the primary that was sent but got no
/// answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unanswered {
    /// A commit: it may have been applied, so it is never resent here.
    OutcomeUnknown,
    /// A query: asking again changes nothing, so it is resent.
    Resend,
}

/// Largest `count` asked of a server in one collection range request.
const RANGE_PAGE: u64 = 65_536;

impl Session {
    /// Connect to the node through the first reachable address of `addrs`.
    /// Every address is asked at once; of those that answer, the first in
    /// `addrs` is taken, waiting for earlier ones at most half a second
    /// after the first answer (a hung server holds nobody up).
    pub fn connect<A: AsRef<str>>(addrs: &[A]) -> Result<Session> {
        Session::connect_with(addrs, SessionOptions::default())
    }

    /// [`Session::connect`] with explicit options.
    pub fn connect_with<A: AsRef<str>>(addrs: &[A], opts: SessionOptions) -> Result<Session> {
        let seeds = addrs.iter().map(|a| a.as_ref().to_string()).collect();
        let mut router = Router::start(seeds, opts.connect)?;
        router.set_read_wait(opts.read_failover_timeout);
        router.select_read_server(&mut Vec::new(), &mut Vec::new())?;
        router.prepare_commits();
        router.prune();
        Ok(Session {
            router,
            reroute_timeout: opts.reroute_timeout,
            read_failover_timeout: opts.read_failover_timeout,
            required_progress: None,
            relearned_for_behind: None,
        })
    }

    // ---- state ----

    /// The node as last learned.
    pub fn node(&self) -> &Node {
        self.router.node()
    }

    /// The epoch of the node view the session routes by.
    pub fn epoch(&self) -> Epoch {
        self.router.epoch()
    }

    /// The address reads currently go to.
    pub fn read_server(&self) -> Option<&str> {
        self.router.read_server()
    }

    /// The address commits currently go to.
    pub fn commit_server(&self) -> Option<&str> {
        self.router.commit_server()
    }

    /// The highest commit number seen in any response (commits included).
    /// A failover that lost commits (applied by the old primary, never
    /// acknowledged) lowers it to the new primary's commit.
    pub fn last_seen_commit(&self) -> CommitNumber {
        self.router.last_seen()
    }

    /// The progress every read requires (`None`: whatever the server has).
    pub fn required_progress(&self) -> RequiredProgress {
        self.required_progress
    }

    /// Require every following read to see at least commit `n`: a server
    /// behind it waits about a second, then the read is retried once
    /// elsewhere.
    ///
    /// After a failover, a requirement set before it is lowered to the new
    /// primary's commit when first heard: numbers beyond it were never
    /// acknowledged and were lost with the old primary, so no server would
    /// ever reach them (see `last_seen_commit`).
    pub fn set_required_progress(&mut self, n: impl Into<RequiredProgress>) {
        self.router.take_epoch_start();
        self.required_progress = n.into();
    }

    /// Read-your-writes: require the highest commit seen so far.
    pub fn require_last_seen(&mut self) {
        self.set_required_progress(self.last_seen_commit());
    }

    /// Re-learn the node from every known address now (the session also
    /// does it by itself whenever routing fails).
    pub fn refresh_node(&mut self) -> Result<()> {
        let result = self.router.refresh_node();
        self.router.prune();
        result
    }

    // ---- reads ----

    /// The user's domain root, if one was set.
    pub fn root(&mut self) -> Result<Option<Object>> {
        Ok(self.root_with_depth(0)?.into_iter().next())
    }

    /// The domain root first, then the objects it reaches within `depth`
    /// references (as [`Session::read_with_depth`]); empty when no root
    /// was set.
    pub fn root_with_depth(&mut self, depth: u32) -> Result<Vec<Object>> {
        let resp = self.read_request(|required_progress| RequestBody::ReadRoot {
            depth,
            required_progress,
        })?;
        match resp.body {
            ResponseBody::Root { root: None, .. } => Ok(Vec::new()),
            ResponseBody::Root { objects, .. } => {
                Ok(objects.into_iter().map(Object::from).collect())
            }
            other => Err(self.unexpected_read("root", &other)),
        }
    }

    /// One object. Oid 0 is the root anchor.
    pub fn read(&mut self, oid: impl Into<Oid>) -> Result<Object> {
        let oid = oid.into();
        let mut objects = self.read_with_depth(oid, 0)?;
        if objects.is_empty() || objects[0].oid != oid {
            return Err(ClientError::Protocol {
                addr: self.read_server().unwrap_or_default().to_string(),
                reason: format!("a read of object {oid} did not return it first"),
            });
        }
        Ok(objects.swap_remove(0))
    }

    /// An object first, then the objects it reaches within `depth`
    /// references, breadth first; the server stops after about 4 MiB of
    /// them, so read any further ones with more calls.
    pub fn read_with_depth(&mut self, oid: impl Into<Oid>, depth: u32) -> Result<Vec<Object>> {
        let oid = oid.into();
        let resp = self.read_request(|required_progress| RequestBody::Read {
            oid,
            depth,
            required_progress,
        })?;
        match resp.body {
            ResponseBody::Objects { objects } => {
                Ok(objects.into_iter().map(Object::from).collect())
            }
            other => Err(self.unexpected_read("objects", &other)),
        }
    }

    /// An object's value decoded into `T`, with its version (pass it back
    /// to [`Transaction::put`] when rewriting the object).
    pub fn get<T: DeserializeOwned>(&mut self, oid: impl Into<Oid>) -> Result<(T, u64)> {
        let object = self.read(oid)?;
        Ok((object.decode()?, object.version))
    }

    /// A meta attribute of the repository.
    pub fn meta(&mut self, key: &str) -> Result<Option<rmpv::Value>> {
        let resp = self.read_request(|required_progress| RequestBody::GetMeta {
            key: key.to_string(),
            required_progress,
        })?;
        match resp.body {
            ResponseBody::Meta { value } => Ok(value),
            other => Err(self.unexpected_read("meta", &other)),
        }
    }

    /// A meta attribute decoded into `T`.
    pub fn meta_as<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>> {
        self.meta(key)?.map(|v| from_value(&v)).transpose()
    }

    /// Number of elements of a large collection.
    pub fn collection_len(&mut self, coll: impl Into<Oid>) -> Result<u64> {
        let coll = coll.into();
        let resp = self.read_request(|required_progress| RequestBody::CollectionLength {
            coll,
            required_progress,
        })?;
        match resp.body {
            ResponseBody::Length { len } => Ok(len),
            other => Err(self.unexpected_read("length", &other)),
        }
    }

    /// Up to `count` elements of a large collection from index `start`
    /// (fewer at its end). A server reply carries at most 65 536 elements
    /// and, past the first, about 4 MiB of them; longer ranges are fetched
    /// page by page.
    pub fn collection_range(
        &mut self,
        coll: impl Into<Oid>,
        start: u64,
        count: u64,
    ) -> Result<Vec<rmpv::Value>> {
        let coll = coll.into();
        let mut out = Vec::new();
        while (out.len() as u64) < count {
            let from = start + out.len() as u64;
            let ask = (count - out.len() as u64).min(RANGE_PAGE);
            let resp = self.read_request(|required_progress| RequestBody::CollectionRange {
                coll,
                start: from,
                count: ask,
                required_progress,
            })?;
            let (values, len) = match resp.body {
                ResponseBody::Elements { values, len, .. } => (values, len),
                other => return Err(self.unexpected_read("elements", &other)),
            };
            let end = match len {
                // A reply may stop short by count or by bytes: the
                // collection's length says where the end is.
                Some(len) => values.is_empty() || from + values.len() as u64 >= len,
                // An older server cuts a reply only at 65 536 elements: a
                // shorter reply than asked is the end of the collection.
                None => (values.len() as u64) < ask,
            };
            out.extend(values);
            if end {
                break;
            }
        }
        Ok(out)
    }

    /// [`Session::collection_range`] with every element decoded into `T`.
    pub fn collection_range_as<T: DeserializeOwned>(
        &mut self,
        coll: impl Into<Oid>,
        start: u64,
        count: u64,
    ) -> Result<Vec<T>> {
        self.collection_range(coll, start, count)?
            .iter()
            .map(from_value)
            .collect()
    }

    // ---- commits ----

    /// Build a transaction with `build` and commit it. Conflicts come back
    /// as [`ClientError::Conflict`]; re-read and call again.
    pub fn commit<F: FnOnce(&mut Transaction)>(&mut self, build: F) -> Result<CommitOutcome> {
        let mut tx = Transaction::new();
        build(&mut tx);
        self.commit_tx(tx)
    }

    /// Commit a transaction built beforehand.
    pub fn commit_tx(&mut self, tx: Transaction) -> Result<CommitOutcome> {
        self.commit_body(tx.into_body()?)
    }

    /// Append one element to a large collection, in a commit of its own;
    /// its index is `positions[0]` of the outcome (absent when the outcome
    /// is [`CommitOutcome::replayed`]).
    pub fn append<T: Serialize + ?Sized>(
        &mut self,
        coll: impl Into<WireRef>,
        value: &T,
    ) -> Result<CommitOutcome> {
        let coll = coll.into();
        self.commit(|tx| {
            tx.append(coll, value);
        })
    }

    /// Commit a body as given. A body without a token gets 16 random bytes
    /// (inside this call: the caller's copy of the body stays without one);
    /// every attempt of this call sends the same token, so the primary
    /// applies the commit at most once.
    ///
    /// To learn the fate of a commit that ended in
    /// [`ClientError::OutcomeUnknown`], ask [`Session::commit_status`] with
    /// the error's `token`, or resend the body carrying that token
    /// (`body.token = Some(token)`), or give the body a token of your own
    /// before the first call. Resending a body that had no token makes a
    /// new random one: that commit may then be applied twice.
    pub fn commit_body(&mut self, mut body: CommitBody) -> Result<CommitOutcome> {
        let token = body
            .token
            .get_or_insert_with(|| rand::random::<[u8; 16]>().to_vec())
            .clone();
        let expects = (!body.news.is_empty(), !body.appends.is_empty());
        let request = RequestBody::Commit(body);
        let result = match self.ask_primary(&request, Unanswered::OutcomeUnknown) {
            Ok((resp, addr)) => match self.committed(resp, &addr, expects) {
                Err(error @ ClientError::Protocol { .. }) => {
                    // An answer of another type: the commit may have been
                    // applied, and that connection is not trusted again.
                    self.router.forget_commit_target();
                    Err(ClientError::OutcomeUnknown {
                        token,
                        addr,
                        cause: Box::new(error),
                    })
                }
                other => other,
            },
            Err(CallFailure { sent: true, error }) if leaves_outcome_unknown(&error) => {
                let addr = self.router.commit_server().unwrap_or_default().to_string();
                self.router.forget_commit_target();
                Err(ClientError::OutcomeUnknown {
                    token,
                    addr,
                    cause: Box::new(error),
                })
            }
            Err(CallFailure { error, .. }) => Err(error),
        };
        self.router.prune();
        result
    }

    /// Was a commit with this token applied? `Some(number)` if so, `None`
    /// if the primary knows no such token (not applied so far, or older
    /// than the tokens it remembers); resolves a
    /// [`ClientError::OutcomeUnknown`]. `None` is final only if the
    /// original request can no longer arrive: one held up in the network
    /// (a partition that heals) may still be applied later. To settle an
    /// outcome for good, resend the body with the same token instead: the
    /// primary applies it at most once. Routed as a commit is, so it also
    /// works when the primary died: the successor that receives it takes
    /// over, and knows the tokens of every commit it replicated. Being a
    /// query, it is resent (once, after re-learning the node) when it was
    /// sent and no answer came.
    pub fn commit_status(&mut self, token: &[u8]) -> Result<Option<CommitNumber>> {
        let request = RequestBody::CommitStatus {
            token: token.to_vec(),
        };
        let result = match self.ask_primary(&request, Unanswered::Resend) {
            Ok((resp, addr)) => {
                self.router.observe_from(&addr, &resp);
                match resp.body {
                    ResponseBody::TokenStatus { number } => Ok(number),
                    other => Err(unexpected(&addr, "token_status", &other)),
                }
            }
            Err(CallFailure { error, .. }) => Err(error),
        };
        self.router.prune();
        result
    }

    /// Send `request` to the primary and return its answer and the address
    /// that gave it, re-routing as the module doc says. A request sent
    /// without an answer comes back as a failure with `sent: true` when
    /// `unanswered` is [`Unanswered::OutcomeUnknown`]; with
    /// [`Unanswered::Resend`] it is treated like one never sent.
    fn ask_primary(
        &mut self,
        request: &RequestBody,
        unanswered: Unanswered,
    ) -> std::result::Result<(Response, String), CallFailure> {
        let deadline = Instant::now() + self.reroute_timeout;
        let mut pause = Duration::from_millis(20);
        let mut relearned = false;
        // The primary that could not be reached in this request, if any.
        let mut dead = None;
        // The server the last refusal came from.
        let mut bounced_from: Option<String> = None;
        loop {
            let sent = self
                .router
                .commit_connection()
                .map_err(|error| CallFailure { sent: false, error })
                .and_then(|idx| {
                    let conn = self.router.conn(idx);
                    let addr = conn.addr().to_string();
                    conn.call_tracked(request).map(|resp| (resp, addr))
                });
            match sent {
                Ok(answered) => return Ok(answered),
                Err(CallFailure { sent: false, error }) => {
                    if let Err(error) = self.reroute_unsent(error, &mut relearned, &mut dead) {
                        return Err(CallFailure { sent: false, error });
                    }
                }
                Err(CallFailure { error, .. }) if commit_reroutes(&error) => {
                    if Instant::now() >= deadline {
                        return Err(CallFailure { sent: true, error });
                    }
                    if let ClientError::Server(WireError::WrongServer { primary: Some(p) }) = &error
                    {
                        if dead.as_ref() == Some(p) {
                            // A server that pinged it says it is alive.
                            dead = None;
                        }
                    }
                    let from = self.router.commit_server().map(str::to_string);
                    let mut same_server = self.reroute(&error, dead.as_deref());
                    // Two servers naming each other (a take-over under way:
                    // each still thinks the other is the primary): pause
                    // as for one server, instead of bouncing at full speed.
                    let to = self.router.commit_server().map(str::to_string);
                    if to.is_some() && to == bounced_from {
                        same_server = true;
                    }
                    bounced_from = from;
                    if same_server && matches!(error, ClientError::Server(WireError::RestoreMode)) {
                        // A backup in restore mode stays one until an
                        // operator acts: waiting would not help.
                        return Err(CallFailure { sent: true, error });
                    }
                    if same_server {
                        thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_millis(500));
                    }
                }
                Err(CallFailure { sent: true, error })
                    if unanswered == Unanswered::Resend && error.is_network() =>
                {
                    if let Err(error) = self.reroute_unsent(error, &mut relearned, &mut dead) {
                        return Err(CallFailure { sent: true, error });
                    }
                }
                Err(failure) => return Err(failure),
            }
        }
    }

    /// Follow a refusal that says the request belongs on another primary.
    /// True when the next attempt goes to the same server (or none is
    /// known), so the caller should pause first.
    ///
    /// A successor still taking over answers `unavailable` while the node
    /// it reports still names the `dead` primary: going back there would
    /// end the request with the dead primary's error a moment before the
    /// successor serves. The request stays with the successor instead.
    fn reroute(&mut self, error: &ClientError, dead: Option<&str>) -> bool {
        let before = self.router.commit_server().map(str::to_string);
        log::debug!("request to {before:?} re-routed: {error}");
        match error {
            ClientError::Server(WireError::WrongServer {
                primary: Some(primary),
            }) if Some(primary) != before.as_ref() => self.router.redirect_commits(primary),
            _ => {
                self.router.forget_commit_target();
                let _ = self.router.refresh_node();
            }
        }
        let after = self
            .router
            .commit_target()
            .or_else(|| self.router.node().primary())
            .map(|m| m.addr.clone());
        if let (Some(back), Some(here)) = (after.as_deref(), before.as_deref()) {
            if dead == Some(back) && back != here {
                self.router.redirect_commits(here);
                return true;
            }
        }
        after.is_none() || after == before
    }

    /// A request that was not sent (or a query not answered): resend it,
    /// once, to another primary if re-learning the node names one; else to
    /// the node's successor (its first secondary), which pings the primary
    /// and, finding it gone, takes over (the seed's rule) or names the
    /// primary to use.
    fn reroute_unsent(
        &mut self,
        error: ClientError,
        relearned: &mut bool,
        dead: &mut Option<String>,
    ) -> Result<()> {
        if *relearned {
            return Err(error);
        }
        *relearned = true;
        let failed = self.router.forget_commit_target();
        *dead = failed.as_ref().map(|m| m.addr.clone());
        if self.router.refresh_node().is_err() {
            return Err(error);
        }
        let failed_addr = failed.as_ref().map(|m| m.addr.clone());
        let primary = self.router.node().primary().map(|p| p.addr.clone());
        match primary {
            Some(p) if Some(&p) != failed_addr.as_ref() => {
                self.router.redirect_commits(&p);
                Ok(())
            }
            _ => {
                let successor = self
                    .router
                    .node()
                    .secondaries()
                    .map(|m| m.addr.clone())
                    .find(|a| Some(a) != failed_addr.as_ref());
                match successor {
                    Some(s) => {
                        log::info!(
                            "primary {failed_addr:?} unreachable: sending to the successor {s}"
                        );
                        self.router.redirect_commits(&s);
                        Ok(())
                    }
                    None => Err(error),
                }
            }
        }
    }

    /// The outcome of a commit; `expects` says whether it created objects
    /// and whether it appended, to recognise a replayed answer.
    fn committed(
        &mut self,
        resp: Response,
        addr: &str,
        expects: (bool, bool),
    ) -> Result<CommitOutcome> {
        self.router.observe_from(addr, &resp);
        match resp.body {
            ResponseBody::Committed {
                number,
                new_oids,
                positions,
            } => {
                let replayed =
                    (expects.0 && new_oids.is_empty()) || (expects.1 && positions.is_empty());
                Ok(CommitOutcome {
                    number,
                    new_oids,
                    positions,
                    replayed,
                })
            }
            other => Err(unexpected(addr, "committed", &other)),
        }
    }

    // ---- read routing ----

    /// Send a read to the read server, failing over on network errors, and
    /// retry once elsewhere when it is behind the required progress.
    ///
    /// When every server is behind, the node may have failed over and lost
    /// the commits required: the session re-learns the node (at most every
    /// `BEHIND_RELEARN_INTERVAL`) and, if a newer epoch's primary lowers
    /// the requirement, reads once more.
    fn read_request(&mut self, make: impl Fn(RequiredProgress) -> RequestBody) -> Result<Response> {
        self.lower_to_epoch_start();
        match self.read_routed(&make) {
            Err(behind @ ClientError::Server(WireError::Behind { .. })) => {
                let due = self
                    .relearned_for_behind
                    .is_none_or(|at| at.elapsed() >= BEHIND_RELEARN_INTERVAL);
                if !due {
                    return Err(behind);
                }
                self.relearned_for_behind = Some(Instant::now());
                if let Err(e) = self.router.refresh_node() {
                    log::debug!("re-learning the node after 'behind' failed: {e}");
                }
                self.router.prune();
                if self.lower_to_epoch_start() {
                    self.read_routed(&make)
                } else {
                    Err(behind)
                }
            }
            other => other,
        }
    }

    /// Cap the required progress at the commit of a newer epoch's primary,
    /// if one was heard since it was set. True when that lowered it.
    fn lower_to_epoch_start(&mut self) -> bool {
        match (self.router.take_epoch_start(), self.required_progress) {
            (Some(start), Some(required)) if required > start => {
                log::warn!(
                    "required progress {required} is beyond the commit {start} the node's \
                     new primary started its epoch at: those commits were lost in a \
                     failover; requiring {start}"
                );
                self.required_progress = Some(start);
                true
            }
            _ => false,
        }
    }

    fn read_routed(&mut self, make: &impl Fn(RequiredProgress) -> RequestBody) -> Result<Response> {
        let body = make(self.required_progress);
        let mut exclude = Vec::new();
        let mut tried = Vec::new();
        // A server left only because it was silent past the read failover
        // timeout; once no other could serve, it gets the whole read
        // timeout (the node view may list servers that are gone).
        let mut slow: Option<String> = None;
        let mut patient = false;
        let result = loop {
            let idx = match self.router.read_connection(&mut exclude, &mut tried) {
                Ok(idx) => idx,
                Err(e) => match slow.take() {
                    Some(addr) if !patient => {
                        log::info!("no other server could serve the read: back to {addr}");
                        exclude.retain(|a| *a != addr);
                        // The servers that did fail are still complained
                        // about; the slow one is not.
                        if let ClientError::NoServerReachable { tried: failed } = e {
                            tried = failed;
                        }
                        tried.retain(|a| a.addr != addr);
                        patient = true;
                        continue;
                    }
                    _ => break Err(e),
                },
            };
            let addr = self.router.conn(idx).addr().to_string();
            let limit = self
                .read_failover_timeout
                .filter(|_| !patient && self.router.another_reader(&exclude));
            match self.call_read(idx, &body, limit) {
                Ok(resp) => {
                    self.router.observe_on(idx, &resp);
                    break Ok(resp);
                }
                Err(error) if read_fails_over(&error) => {
                    if limit.is_some() && is_timeout(&error) {
                        slow = Some(addr.clone());
                    }
                    log::info!("read server {addr} failed ({error}); failing over");
                    self.router.read_server_failed(idx, &mut exclude);
                    tried.push(Attempt {
                        addr,
                        error: Box::new(error),
                    });
                }
                Err(error @ ClientError::Server(WireError::Behind { .. })) => {
                    break self.read_elsewhere(&body, error);
                }
                Err(error) => break Err(error),
            }
        };
        self.router.prune();
        // Attempts the final error carries count too; each server once.
        let carried = match &result {
            Err(ClientError::NoServerReachable { tried: more }) => more.as_slice(),
            _ => &[],
        };
        let mut failed: Vec<String> = Vec::new();
        for a in tried.iter().chain(carried) {
            if !failed.contains(&a.addr) {
                failed.push(a.addr.clone());
            }
        }
        for addr in failed {
            self.complain(&addr);
        }
        result
    }

    /// Tell the primary a secondary could not be reached: a hint it checks
    /// (it removes the secondary only if it cannot reach it either). Best
    /// effort: a failed complaint is not the application's problem.
    fn complain(&mut self, addr: &str) {
        let is_secondary = self.router.node().secondaries().any(|m| m.addr == addr);
        if !is_secondary {
            return;
        }
        // Never long: the read it follows is done, and the primary may be
        // the server that hangs.
        let patience = self
            .read_failover_timeout
            .unwrap_or(COMPLAINT_PATIENCE)
            .min(COMPLAINT_PATIENCE);
        if let Ok(idx) = self.router.commit_connection_within(Some(patience)) {
            let body = RequestBody::Complain {
                addr: addr.to_string(),
            };
            match self.router.conn(idx).call_within(&body, patience) {
                Ok(_) => log::info!("told the primary that {addr} could not be reached"),
                Err(e) => log::debug!("complaint about {addr} not delivered: {e}"),
            }
        }
    }

    /// The one retry of a read the read server answered `behind`: the first
    /// other server that answers (other secondaries, the primary last)
    /// decides. The session keeps its read server.
    fn read_elsewhere(&mut self, body: &RequestBody, behind: ClientError) -> Result<Response> {
        let others = self.router.other_readers();
        let last = others.len().saturating_sub(1);
        for (i, m) in others.into_iter().enumerate() {
            let Some(idx) = self.router.reader(&m) else {
                continue;
            };
            let limit = self.read_failover_timeout.filter(|_| i < last);
            match self.call_read(idx, body, limit) {
                Ok(resp) => {
                    self.router.observe_on(idx, &resp);
                    return Ok(resp);
                }
                Err(e) if read_fails_over(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(behind)
    }

    /// Send a read on connection `idx`, giving up on it after `limit` when
    /// another server could answer instead.
    fn call_read(
        &mut self,
        idx: ConnIdx,
        body: &RequestBody,
        limit: Option<Duration>,
    ) -> Result<Response> {
        let conn = self.router.conn(idx);
        match limit {
            Some(limit) => conn.call_within(body, limit),
            None => conn.call(body.clone()),
        }
    }

    fn unexpected_read(&self, expected: &str, got: &ResponseBody) -> ClientError {
        unexpected(self.read_server().unwrap_or_default(), expected, got)
    }
}
