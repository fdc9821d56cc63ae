//! Errors of the protocol layer: `ProtocolError` (framing and decoding, local
//! to one connection) and `WireError` (the documented error variants a server
//! sends in `ResponseBody::Error`). Clients match on `WireError`; the
//! `message` next to it is for people only.

use serde::{Deserialize, Serialize};

use crate::types::{CommitNumber, Epoch, NodeAddr, Oid};

/// Errors that cross the wire. Every variant is documented in
/// `docs/PROTOCOL.md`; add variants, never change their meaning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum WireError {
    /// The commit was rejected as a whole; these objects changed since read.
    #[error("conflict on objects {oids:?}")]
    Conflict { oids: Vec<Oid> },
    /// This server does not take commits; `primary` is where to send them.
    #[error("wrong server; {}", match primary {
        Some(p) => format!("the primary is {p}"),
        None => "the primary is unknown".to_string(),
    })]
    WrongServer { primary: Option<NodeAddr> },
    /// The server has not reached the required progress in time.
    #[error("server is at commit {commit}, behind the required {required}")]
    Behind {
        commit: CommitNumber,
        required: CommitNumber,
    },
    /// The repository is a backup in restore mode and refuses commits.
    #[error("repository is in restore mode")]
    RestoreMode,
    /// An admin request arrived on an application session.
    #[error("not an admin session")]
    NotAdmin,
    /// The first request was not a hello, or a second hello was sent.
    #[error("hello expected")]
    HelloExpected,
    #[error("unsupported protocol version {requested}; server speaks {supported}")]
    UnsupportedProtocol { requested: u32, supported: u32 },
    /// The frame could not be decoded as a request.
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
    /// The frame's declared length is over the server's limit.
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    FrameTooLarge { size: u64, limit: u64 },
    #[error("object {oid} does not exist")]
    UnknownObject { oid: Oid },
    #[error("object {oid} is not a large collection")]
    NotACollection { oid: Oid },
    /// Catch-up asked for records the log no longer holds: start the
    /// secondary from a new backup.
    #[error("commit {requested} no longer in the log (oldest {oldest})")]
    LogTruncated {
        requested: CommitNumber,
        oldest: CommitNumber,
    },
    /// A peer request on a session that did not say `peer` in its hello.
    #[error("not a peer session")]
    NotPeer,
    /// Replicated records did not continue the receiver's log: resend from
    /// `from` (its last applied + 1).
    #[error("out of sequence: resend from {from}")]
    Resend { from: CommitNumber },
    /// The sender's epoch is older than the receiver's.
    #[error("stale epoch {got}; current is {current}")]
    StaleEpoch { got: Epoch, current: Epoch },
    /// The peer serves another repository.
    #[error("repository {got} is not this node's repository {expected}")]
    RepositoryMismatch { expected: String, got: String },
    /// The records do not continue the receiver's hash chain: the logs
    /// diverged at or before `number`.
    #[error("logs diverge at commit {number}")]
    Diverged { number: CommitNumber },
    /// A backup is already running (or none is, for status/abort/pause).
    #[error("backup: {reason}")]
    Backup { reason: String },
    /// The server is stopping and takes no new work.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The request is valid but cannot be served now (e.g. not yet
    /// implemented for this role, or a peer is unreachable).
    #[error("unavailable: {reason}")]
    Unavailable { reason: String },
    /// The server failed internally; the outcome of a commit is unknown.
    #[error("internal error: {reason}")]
    Internal { reason: String },
}

/// Failures of one connection's framing.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    FrameTooLarge { size: u64, limit: u64 },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("connection closed")]
    Closed,
}
