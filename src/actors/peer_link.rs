//! `PeerLink`: one async connection from this server to another member,
//! said `peer` in its hello. Used by the replication actors (broadcast,
//! follow) and by membership checks.
//!
//! It owns a socket and request ids only; it never retries, never decides
//! anything: callers own the policy. Every call is bounded by a timeout.

use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

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
        match body {
            ResponseBody::Hello {
                server_id,
                repository_id,
                role,
                node,
                epoch,
                ..
            } => {
                link.hello = PeerHello {
                    server_id,
                    repository_id,
                    role,
                    node,
                    epoch,
                    commit,
                };
                Ok(link)
            }
            other => Err(link.unexpected("hello", &other)),
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

    pub fn unexpected(&self, expected: &str, got: &ResponseBody) -> LinkError {
        LinkError::Protocol {
            addr: self.addr.clone(),
            reason: format!("expected a {expected} response, got {got:?}"),
        }
    }
}

/// Is a server answering at `addr`? (connect + hello within `timeout`).
pub async fn reachable(addr: &str, timeout: Duration) -> bool {
    PeerLink::connect(addr, timeout).await.is_ok()
}
