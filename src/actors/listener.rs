//! `Listener`: accepts TCP connections and keeps the table of open sessions,
//! and decides which sessions a hello admits.
//!
//! An async actor. The accept loop is a future in the actor's context that
//! hands each connection to the actor as [`Accepted`]; the actor starts a
//! `Session` for it. Sessions report their hello with [`SaidHello`] (the
//! answer admits them or not) and their end with [`SessionClosed`] (a
//! back-edge, `do_send`). At shutdown the `Controller` sends
//! [`StopAccepting`] (the listening socket is closed at once) and, once the
//! commit pipeline drained, [`CloseSessions`].
//!
//! Three pools, so that no kind of connection crowds out another:
//!
//! * connections that have not said hello: at most
//!   [`PRE_HELLO_CONNECTIONS`]; a new one closes the oldest of them (it had
//!   the longest to speak, an honest client or peer speaks within
//!   milliseconds), so idle sockets never lock anyone out;
//! * application sessions: at most `max_connections`;
//! * admin and peer sessions: every place of `max_connections` +
//!   [`RESERVED_CONNECTIONS`] that applications do not hold (so at least
//!   the reserve).
//!
//! Beyond the three, new connections are closed unread (the descriptor
//! budget in `server.rs` counts on that bound).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use log::{info, warn};
use tokio::net::{TcpListener, TcpStream};

use crate::actors::session::{CloseSession, CloseSilent, Session, SessionEnv};
use crate::protocol::SessionRole;
use crate::server::{PRE_HELLO_CONNECTIONS, RESERVED_CONNECTIONS};

/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts connections; see the module doc.
pub struct Listener {
    socket: Option<TcpListener>,
    local: SocketAddr,
    accepting: Option<SpawnHandle>,
    env: Arc<SessionEnv>,
    /// Every open connection, with or without a hello.
    sessions: HashMap<u64, Addr<Session>>,
    /// Connections that have not said hello, oldest (lowest id) first.
    silent: BTreeSet<u64>,
    /// The role of every admitted session.
    admitted: HashMap<u64, SessionRole>,
    applications: usize,
    /// Admin and peer sessions.
    privileged: usize,
    next_id: u64,
    /// New connections are being closed unread (beyond every limit).
    refusing: bool,
    /// New connections are closing the oldest silent ones (the pre-hello
    /// pool is full).
    evicting: bool,
}

impl Listener {
    /// Serve `socket` (already bound to `local`); every session gets `env`.
    pub fn new(socket: TcpListener, local: SocketAddr, env: Arc<SessionEnv>) -> Self {
        Listener {
            local,
            socket: Some(socket),
            accepting: None,
            env,
            sessions: HashMap::new(),
            silent: BTreeSet::new(),
            admitted: HashMap::new(),
            applications: 0,
            privileged: 0,
            next_id: 1,
            refusing: false,
            evicting: false,
        }
    }

    /// Forget session `id` (idempotent: a session may report its end twice).
    fn forget(&mut self, id: u64) {
        self.sessions.remove(&id);
        self.silent.remove(&id);
        match self.admitted.remove(&id) {
            Some(SessionRole::Application) => self.applications -= 1,
            Some(SessionRole::Admin | SessionRole::Peer) => self.privileged -= 1,
            None => {}
        }
    }

    /// Make room in the pre-hello pool for one more connection.
    fn evict_silent(&mut self) {
        if self.silent.len() < PRE_HELLO_CONNECTIONS {
            if self.evicting {
                info!("fewer than {PRE_HELLO_CONNECTIONS} connections without a hello again");
                self.evicting = false;
            }
            return;
        }
        let Some(oldest) = self.silent.pop_first() else {
            return;
        };
        // Out of the pool at once; it leaves the table when it has stopped.
        if let Some(session) = self.sessions.get(&oldest) {
            session.do_send(CloseSilent);
        }
        // Once per episode, not once per connection.
        if !self.evicting {
            warn!(
                "{PRE_HELLO_CONNECTIONS} connections have not said hello: closing the oldest \
                 of them for each new one"
            );
            self.evicting = true;
        }
    }
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let socket = self.socket.take().expect("a listener starts once");
        let me = ctx.address();
        let local = self.local;
        let accept = async move {
            loop {
                match socket.accept().await {
                    Ok((stream, peer)) => {
                        if me.send(Accepted { stream, peer }).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!("accepting on {local} failed: {e}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
            }
        };
        self.accepting = Some(ctx.spawn(accept.into_actor(self)));
        info!("listening on {local}");
    }
}

/// A new connection. Sender: the listener's own accept loop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
}

impl Handler<Accepted> for Listener {
    type Result = ();

    fn handle(&mut self, msg: Accepted, ctx: &mut Context<Self>) {
        if self.accepting.is_none() {
            return; // accepted just before the loop was cancelled: drop it
        }
        let limit = self.env.settings.max_connections;
        let cap = limit + RESERVED_CONNECTIONS + PRE_HELLO_CONNECTIONS;
        let open = self.sessions.len();
        // Reached only while every pool is full and evicted connections
        // have not closed yet: the bound the descriptor budget relies on.
        if open >= cap {
            // Close it unread, and say so once per episode, not once per
            // connection.
            if !self.refusing {
                warn!(
                    "{open} connections open (--max-connections {limit} + {RESERVED_CONNECTIONS} \
                     for admins and peers + {PRE_HELLO_CONNECTIONS} before their hello): \
                     closing new ones unread"
                );
                self.refusing = true;
            }
            return;
        }
        if self.refusing {
            info!("{open} connections open: accepting again");
            self.refusing = false;
        }
        self.evict_silent();
        let id = self.next_id;
        self.next_id += 1;
        let me = ctx.address();
        let session = Session::new(
            id,
            msg.stream,
            msg.peer,
            self.env.clone(),
            me.clone().recipient(),
            me.recipient(),
        )
        .start();
        self.sessions.insert(id, session);
        self.silent.insert(id);
    }
}

/// Session `id` said hello as `role`. Sender: the session, before it
/// answers the hello. Reply: whether it is admitted (its role's pool has
/// room); a session refused closes.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct SaidHello {
    pub id: u64,
    pub role: SessionRole,
}

impl Handler<SaidHello> for Listener {
    type Result = bool;

    fn handle(&mut self, msg: SaidHello, _: &mut Context<Self>) -> bool {
        // Out of the pre-hello pool whatever the answer: admitted, it
        // counts in its role's pool; refused, it is closing.
        self.silent.remove(&msg.id);
        if !self.sessions.contains_key(&msg.id) || self.admitted.contains_key(&msg.id) {
            return false; // already gone, or a second hello (never sent)
        }
        // Applications get at most `max_connections` places; admins and
        // peers every place left of `max_connections + RESERVED`, so the
        // reserve is always theirs and spare application places too.
        let limit = self.env.settings.max_connections;
        let room = self.applications + self.privileged < limit + RESERVED_CONNECTIONS;
        let admit = match msg.role {
            SessionRole::Application => room && self.applications < limit,
            SessionRole::Admin | SessionRole::Peer => room,
        };
        if admit {
            self.admitted.insert(msg.id, msg.role);
            match msg.role {
                SessionRole::Application => self.applications += 1,
                SessionRole::Admin | SessionRole::Peer => self.privileged += 1,
            }
        }
        admit
    }
}

/// A session ended. Sender: the session, as it stops; may be dropped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionClosed {
    pub id: u64,
}

impl Handler<SessionClosed> for Listener {
    type Result = ();

    fn handle(&mut self, msg: SessionClosed, _: &mut Context<Self>) {
        self.forget(msg.id);
    }
}

/// Close the listening socket; open sessions go on. Sender: the
/// `Controller` at shutdown.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAccepting;

impl Handler<StopAccepting> for Listener {
    type Result = ();

    fn handle(&mut self, _: StopAccepting, ctx: &mut Context<Self>) {
        if let Some(handle) = self.accepting.take() {
            ctx.cancel_future(handle);
            info!("stopped accepting connections on {}", self.local);
        }
    }
}

/// Close every open session once its queued replies are written. Sender:
/// the `Controller` at shutdown. Reply: how many sessions were open.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseSessions;

impl Handler<CloseSessions> for Listener {
    type Result = ResponseFuture<usize>;

    fn handle(&mut self, _: CloseSessions, ctx: &mut Context<Self>) -> Self::Result {
        // Every request is queued now, so the waits overlap.
        let closing: Vec<_> = self
            .sessions
            .drain()
            .map(|(_, s)| s.send(CloseSession))
            .collect();
        // Nothing is accepted any more and no session is left: done.
        if let Some(handle) = self.accepting.take() {
            ctx.cancel_future(handle);
        }
        ctx.stop();
        Box::pin(async move {
            let n = closing.len();
            for c in closing {
                // A session that already stopped has nothing left to write.
                let _ = c.await;
            }
            n
        })
    }
}
