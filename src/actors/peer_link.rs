//! `PeerLink`: one async connection from this server to another member,
//! said `peer` in its hello. Used by the replication actors (broadcast,
//! follow) and by membership checks.
//!
//! It owns a socket and request ids only; it never retries, never decides
//! anything: callers own the policy. Every call is bounded by a timeout.
//! `into_pipe` splits a link for pipelining (the `BroadcastActor`'s
//! stream of `replicate` batches): there the caller owns the timeouts,
//! and the pipe only moves frames and hands back what it read.

use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::actors::busy_poll;
use crate::protocol::codec::{decode, encode, read_frame_async, DEFAULT_MAX_FRAME};
use crate::protocol::{Request, RequestBody, Response, ResponseBody, SessionRole, WireError};
use crate::protocol::{ServerRole, PROTOCOL_VERSION};
use crate::types::{CommitNumber, Epoch, Node};

/// Why a call to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("{addr}: {reason}")]
    Io { addr: String, reason: String },
    #[error("{addr}: no answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("{addr} answered: {error}")]
    Server { addr: String, error: WireError },
    #[error("{addr}: protocol error: {reason}")]
    Protocol { addr: String, reason: String },
}

impl LinkError {
    /// The peer could not be reached or stopped answering (as opposed to a
    /// typed refusal).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, LinkError::Io { .. } | LinkError::Timeout { .. })
    }
}

/// What a peer said about itself in its hello.
#[derive(Debug, Clone)]
pub struct PeerHello {
    pub server_id: u64,
    pub repository_id: String,
    pub role: ServerRole,
    pub node: Node,
    pub epoch: Epoch,
    pub commit: CommitNumber,
}

impl PeerHello {
    /// The hello in the answer `body` (carrying `commit`); any other
    /// answer is given back.
    fn from_answer(commit: CommitNumber, body: ResponseBody) -> Result<Self, Box<ResponseBody>> {
        match body {
            ResponseBody::Hello {
                server_id,
                repository_id,
                role,
                node,
                epoch,
                ..
            } => Ok(PeerHello {
                server_id,
                repository_id,
                role,
                node,
                epoch,
                commit,
            }),
            other => Err(Box::new(other)),
        }
    }
}

pub struct PeerLink {
    addr: String,
    /// Buffered for reading: a reply's length prefix and body come in with
    /// one read (requests and replies alternate, so nothing is read ahead
    /// of its call).
    stream: BufReader<TcpStream>,
    next_id: u64,
    pub hello: PeerHello,
}

impl PeerLink {
    /// Connect, say hello as a peer, within `timeout`.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<PeerLink, LinkError> {
        Self::connect_as(addr, SessionRole::Peer, timeout).await
    }

    /// Connect with another role (a server asking another for an admin
    /// action, e.g. a primary that stops asking its successor to take over).
    pub async fn connect_as(
        addr: &str,
        role: SessionRole,
        timeout: Duration,
    ) -> Result<PeerLink, LinkError> {
        let io = |e: std::io::Error| LinkError::Io {
            addr: addr.to_string(),
            reason: e.to_string(),
        };
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| LinkError::Timeout {
                addr: addr.to_string(),
                after: timeout,
            })?
            .map_err(io)?;
        Self::hello_over(stream, addr, role, timeout).await
    }

    /// Say hello as `role` on a connection already made to `addr`, and
    /// wait up to `timeout` for the answer (`Duration::MAX`: no bound).
    pub async fn hello_over(
        stream: TcpStream,
        addr: &str,
        role: SessionRole,
        timeout: Duration,
    ) -> Result<PeerLink, LinkError> {
        let _ = stream.set_nodelay(true);
        let mut link = PeerLink {
            addr: addr.to_string(),
            stream: BufReader::new(stream),
            next_id: 1,
            hello: PeerHello {
                server_id: 0,
                repository_id: String::new(),
                role: ServerRole::Restore,
                node: Node::default(),
                epoch: Epoch::default(),
                commit: 0,
            },
        };
        let (commit, body) = link
            .call(
                RequestBody::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    role,
                    client_name: "magma-server peer".into(),
                },
                timeout,
            )
            .await?;
        match PeerHello::from_answer(commit, body) {
            Ok(hello) => {
                link.hello = hello;
                Ok(link)
            }
            Err(other) => Err(link.unexpected("hello", &other)),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// One request, one response (the response's commit number first).
    pub async fn call(
        &mut self,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<(CommitNumber, ResponseBody), LinkError> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = encode(&Request { id, body });
        let addr = self.addr.clone();
        let exchange = async {
            self.stream.get_mut().write_all(&frame).await?;
            read_frame_async(&mut self.stream, DEFAULT_MAX_FRAME)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        let bytes = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| LinkError::Timeout {
                addr: addr.clone(),
                after: timeout,
            })?
            .map_err(|e| LinkError::Io {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        let response: Response = decode(&bytes).map_err(|e| LinkError::Protocol {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
        if response.id != id {
            return Err(LinkError::Protocol {
                addr,
                reason: format!("answer to request {} where {id} was asked", response.id),
            });
        }
        match response.body {
            ResponseBody::Error { error, .. } => Err(LinkError::Server { addr, error }),
            body => Ok((response.commit, body)),
        }
    }

    /// Split the link for pipelining: requests go out in order through
    /// [`PeerPipe::send`] without waiting for answers; every reply (or the
    /// link breaking, once) is handed to `deliver` as it is read. Dropping
    /// the pipe closes the connection.
    pub fn into_pipe(self, deliver: impl Fn(PipeEvent) + Clone + 'static) -> PeerPipe {
        let addr = self.addr.clone();
        // Requests and replies alternated so far: nothing is buffered.
        let (rd, mut wr) = self.stream.into_inner().into_split();
        let (out, mut frames) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let writer = {
            let (deliver, addr) = (deliver.clone(), addr.clone());
            actix_rt::spawn(async move {
                while let Some(frame) = frames.recv().await {
                    if let Err(e) = wr.write_all(&frame).await {
                        deliver(PipeEvent::Broken(LinkError::Io {
                            addr,
                            reason: e.to_string(),
                        }));
                        return;
                    }
                }
            })
        };
        let reader = {
            let addr = addr.clone();
            actix_rt::spawn(async move {
                let mut rd = BufReader::new(rd);
                loop {
                    let frame = read_frame_async(&mut rd, DEFAULT_MAX_FRAME).await;
                    busy_poll::note_activity();
                    let event = match frame {
                        Ok(bytes) => match decode::<Response>(&bytes) {
                            Ok(r) => PipeEvent::Reply {
                                id: r.id,
                                commit: r.commit,
                                body: match r.body {
                                    ResponseBody::Error { error, .. } => Err(LinkError::Server {
                                        addr: addr.clone(),
                                        error,
                                    }),
                                    body => Ok(Box::new(body)),
                                },
                            },
                            Err(e) => PipeEvent::Broken(LinkError::Protocol {
                                addr: addr.clone(),
                                reason: e.to_string(),
                            }),
                        },
                        Err(e) => PipeEvent::Broken(LinkError::Io {
                            addr: addr.clone(),
                            reason: e.to_string(),
                        }),
                    };
                    let broken = matches!(event, PipeEvent::Broken(_));
                    deliver(event);
                    if broken {
                        return;
                    }
                }
            })
        };
        PeerPipe {
            addr,
            out,
            next_id: self.next_id,
            tasks: [writer, reader],
        }
    }

    pub fn unexpected(&self, expected: &str, got: &ResponseBody) -> LinkError {
        LinkError::Protocol {
            addr: self.addr.clone(),
            reason: format!("expected a {expected} response, got {got:?}"),
        }
    }
}

/// What a pipelined link read.
#[derive(Debug)]
pub enum PipeEvent {
    /// The reply to request `id`; a server error is `Err(LinkError::Server)`.
    Reply {
        id: u64,
        commit: CommitNumber,
        body: Result<Box<ResponseBody>, LinkError>,
    },
    /// The connection failed (read, write or a reply that does not
    /// decode); nothing more comes from this pipe.
    Broken(LinkError),
}

/// A [`PeerLink`] split for pipelining; see [`PeerLink::into_pipe`].
pub struct PeerPipe {
    addr: String,
    out: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    next_id: u64,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl PeerPipe {
    /// Queue a request; returns its id (its reply is delivered with it).
    pub fn send(&mut self, body: RequestBody) -> Result<u64, LinkError> {
        let id = self.next_id;
        self.next_id += 1;
        self.out
            .send(encode(&Request { id, body }))
            .map_err(|_| LinkError::Io {
                addr: self.addr.clone(),
                reason: "the connection is closed".into(),
            })?;
        Ok(id)
    }
}

impl Drop for PeerPipe {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Is a server answering at `addr`? (connect + hello within `timeout`).
///
/// Any answer to the hello counts, a refusal too (`unavailable` from a
/// server at its connection limit): a server that answers runs, and taking
/// it for dead would promote a second primary beside it. Only a failed
/// connect, no answer in time or a broken connection is "unreachable".
pub async fn reachable(addr: &str, timeout: Duration) -> bool {
    match PeerLink::connect(addr, timeout).await {
        Ok(_) => true,
        Err(e) => !e.is_unreachable(),
    }
}
