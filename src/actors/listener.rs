//! `Listener`: accepts TCP connections and keeps the table of open sessions.
//!
//! An async actor. The accept loop is a future in the actor's context that
//! hands each connection to the actor as [`Accepted`]; the actor starts a
//! `Session` for it. Sessions report their end with [`SessionClosed`] (a
//! back-edge, `do_send`). At shutdown the `Controller` sends
//! [`StopAccepting`] (the listening socket is closed at once) and, once the
//! commit pipeline drained, [`CloseSessions`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use log::{info, warn};
use tokio::net::{TcpListener, TcpStream};

use crate::actors::session::{CloseSession, Session, SessionEnv};
use crate::server::RESERVED_CONNECTIONS;

/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts connections; see the module doc.
pub struct Listener {
    socket: Option<TcpListener>,
    local: SocketAddr,
    accepting: Option<SpawnHandle>,
    env: Arc<SessionEnv>,
    sessions: HashMap<u64, Addr<Session>>,
    next_id: u64,
    /// New connections are being closed unread (beyond every limit).
    refusing: bool,
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
            next_id: 1,
            refusing: false,
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
        let open = self.sessions.len();
        if open >= limit + RESERVED_CONNECTIONS {
            // Not even an operator would get in: close it unread, and say
            // so once per episode, not once per connection.
            if !self.refusing {
                warn!(
                    "{open} connections open (--max-connections {limit} + {RESERVED_CONNECTIONS} \
                     for admins and peers): closing new ones unread"
                );
                self.refusing = true;
            }
            return;
        }
        if self.refusing {
            info!("{open} connections open: accepting again");
            self.refusing = false;
        }
        let id = self.next_id;
        self.next_id += 1;
        let session = Session::new(
            id,
            msg.stream,
            msg.peer,
            self.env.clone(),
            ctx.address().recipient(),
            open >= limit,
        )
        .start();
        self.sessions.insert(id, session);
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
        self.sessions.remove(&msg.id);
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
