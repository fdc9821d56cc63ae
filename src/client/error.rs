//! `ClientError`: every way a client call can fail, and what the caller may
//! do about it (`is_retryable`, `is_conflict`, `is_outcome_unknown`).
//!
//! This module owns the classification of failures only. It must never do
//! I/O, and it never hides a failure: a commit whose reply was lost is
//! reported as *unknown*, never as failed.

use std::fmt;

use crate::protocol::{ProtocolError, WireError};
use crate::types::{hex, Oid};

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Network failure (connect, send, receive or timeout) with `addr`. On a
    /// commit this variant means the request was not (completely) sent, so
    /// it was not applied; a lost reply is [`ClientError::OutcomeUnknown`].
    #[error("network error with {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// A commit was sent but no outcome came back (the connection broke or
    /// timed out, or the server failed internally): it may or may not have
    /// been applied. `Session::commit_status(&token)` tells whether it was
    /// so far; resending the body with this token settles it for good.
    /// Resending is safe only with this `token` in the body
    /// (`body.token = Some(token)`; a body given its own token before the
    /// first call already has it): a body sent without one got a random
    /// token inside `Session::commit_body`, and resending that body as it
    /// was would make a new token and may apply the commit twice.
    #[error("outcome of commit with token {} is unknown ({addr}): {cause}", hex(.token))]
    OutcomeUnknown {
        token: Vec<u8>,
        addr: String,
        #[source]
        cause: Box<ClientError>,
    },
    /// The commit was rejected as a whole: these objects changed since they
    /// were read. Nothing was applied; re-read them and commit again.
    #[error("commit conflicts on objects {oids:?}")]
    Conflict { oids: Vec<Oid> },
    /// Any other error the server reported (see `docs/PROTOCOL.md`).
    #[error("server refused: {0}")]
    Server(WireError),
    /// The server broke the protocol (bad frame, mismatched id, unexpected
    /// response type). The connection is dropped.
    #[error("protocol violation by {addr}: {reason}")]
    Protocol { addr: String, reason: String },
    /// No server of the node could be reached; every attempt is listed.
    #[error("no server reachable; tried {}", Attempts(.tried))]
    NoServerReachable { tried: Vec<Attempt> },
    /// A value could not be encoded as MessagePack.
    #[error("cannot encode value: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// A value could not be decoded into the requested type.
    #[error("cannot decode value: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// One failed attempt to reach a server.
#[derive(Debug)]
pub struct Attempt {
    pub addr: String,
    pub error: Box<ClientError>,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.addr, self.error)
    }
}

struct Attempts<'a>(&'a [Attempt]);

impl fmt::Display for Attempts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no address");
        }
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

impl ClientError {
    /// The error a server reported in `ResponseBody::Error`.
    pub fn from_wire(error: WireError) -> ClientError {
        match error {
            WireError::Conflict { oids } => ClientError::Conflict { oids },
            other => ClientError::Server(other),
        }
    }

    /// A framing failure on the connection to `addr`.
    pub(crate) fn from_protocol(addr: &str, e: ProtocolError) -> ClientError {
        let io = |source| ClientError::Io {
            addr: addr.to_string(),
            source,
        };
        match e {
            ProtocolError::Io(source) => io(source),
            ProtocolError::Closed => io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            )),
            ProtocolError::FrameTooLarge { size, limit } => ClientError::Protocol {
                addr: addr.to_string(),
                reason: format!("response frame of {size} bytes exceeds the limit of {limit}"),
            },
            ProtocolError::Malformed(reason) => ClientError::Protocol {
                addr: addr.to_string(),
                reason: format!("undecodable response: {reason}"),
            },
        }
    }

    /// True when the operation certainly did not take effect and repeating
    /// it unchanged may succeed: network failures before a commit was sent,
    /// no reachable server, and the transient server errors (`behind`,
    /// `wrong_server`, `shutting_down`, `unavailable`). False for conflicts
    /// (re-read first) and for unknown commit outcomes (resend with the same
    /// token instead).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Io { .. } | ClientError::NoServerReachable { .. } => true,
            ClientError::Server(e) => matches!(
                e,
                WireError::Behind { .. }
                    | WireError::WrongServer { .. }
                    | WireError::ShuttingDown
                    | WireError::Unavailable { .. }
            ),
            _ => false,
        }
    }

    /// True for a commit rejected because objects it rewrites changed.
    pub fn is_conflict(&self) -> bool {
        matches!(self, ClientError::Conflict { .. })
    }

    /// True when a commit may or may not have been applied.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, ClientError::OutcomeUnknown { .. })
    }

    /// True for failures of the network rather than answers of a server.
    pub fn is_network(&self) -> bool {
        matches!(
            self,
            ClientError::Io { .. }
                | ClientError::NoServerReachable { .. }
                | ClientError::OutcomeUnknown { .. }
        )
    }

    /// The server's error, when the server answered with one.
    pub fn wire_error(&self) -> Option<&WireError> {
        match self {
            ClientError::Server(e) => Some(e),
            _ => None,
        }
    }

    /// A short, stable name for the kind of failure, for logs and for
    /// `error: <kind>: <message>` lines: `network`, `outcome_unknown`,
    /// `conflict`, `protocol`, `no_server_reachable`, `encode`, `decode`, or
    /// the server's error code (`wrong_server`, `behind`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Io { .. } => "network",
            ClientError::OutcomeUnknown { .. } => "outcome_unknown",
            ClientError::Conflict { .. } => "conflict",
            ClientError::Server(e) => wire_code(e),
            ClientError::Protocol { .. } => "protocol",
            ClientError::NoServerReachable { .. } => "no_server_reachable",
            ClientError::Encode(_) => "encode",
            ClientError::Decode(_) => "decode",
        }
    }
}

/// The `code` a server puts on the wire for `e`.
pub fn wire_code(e: &WireError) -> &'static str {
    match e {
        WireError::Conflict { .. } => "conflict",
        WireError::WrongServer { .. } => "wrong_server",
        WireError::Behind { .. } => "behind",
        WireError::RestoreMode => "restore_mode",
        WireError::NotAdmin => "not_admin",
        WireError::HelloExpected => "hello_expected",
        WireError::UnsupportedProtocol { .. } => "unsupported_protocol",
        WireError::BadRequest { .. } => "bad_request",
        WireError::FrameTooLarge { .. } => "frame_too_large",
        WireError::UnknownObject { .. } => "unknown_object",
        WireError::NotACollection { .. } => "not_a_collection",
        WireError::LogTruncated { .. } => "log_truncated",
        WireError::Backup { .. } => "backup",
        WireError::NotPeer => "not_peer",
        WireError::Resend { .. } => "resend",
        WireError::StaleEpoch { .. } => "stale_epoch",
        WireError::RepositoryMismatch { .. } => "repository_mismatch",
        WireError::Diverged { .. } => "diverged",
        WireError::ShuttingDown => "shutting_down",
        WireError::Unavailable { .. } => "unavailable",
        WireError::Internal { .. } => "internal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> ClientError {
        ClientError::Io {
            addr: "a:1".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        }
    }

    #[test]
    fn wire_conflict_becomes_conflict() {
        let e = ClientError::from_wire(WireError::Conflict { oids: vec![3, 4] });
        assert!(e.is_conflict());
        assert!(!e.is_retryable());
        assert!(matches!(e, ClientError::Conflict { ref oids } if oids == &[3, 4]));
        let e = ClientError::from_wire(WireError::NotAdmin);
        assert_eq!(e.wire_error(), Some(&WireError::NotAdmin));
        assert_eq!(e.kind(), "not_admin");
    }

    #[test]
    fn retryable_classification() {
        assert!(io().is_retryable());
        assert!(io().is_network());
        let unknown = ClientError::OutcomeUnknown {
            token: vec![0xab; 2],
            addr: "a:1".into(),
            cause: Box::new(io()),
        };
        assert!(!unknown.is_retryable());
        assert!(unknown.is_outcome_unknown());
        assert!(unknown.to_string().contains("abab"));
        assert!(ClientError::Server(WireError::Behind {
            commit: 1,
            required: 2
        })
        .is_retryable());
        assert!(!ClientError::Server(WireError::RestoreMode).is_retryable());
        assert!(!ClientError::Server(WireError::Internal { reason: "x".into() }).is_retryable());
    }

    #[test]
    fn wire_codes_match_the_serialized_tag() {
        let all = [
            WireError::Conflict { oids: vec![] },
            WireError::WrongServer { primary: None },
            WireError::Behind {
                commit: 0,
                required: 0,
            },
            WireError::RestoreMode,
            WireError::NotAdmin,
            WireError::HelloExpected,
            WireError::UnsupportedProtocol {
                requested: 0,
                supported: 0,
            },
            WireError::BadRequest { reason: "".into() },
            WireError::FrameTooLarge { size: 0, limit: 0 },
            WireError::UnknownObject { oid: 0 },
            WireError::NotACollection { oid: 0 },
            WireError::LogTruncated {
                requested: 0,
                oldest: 0,
            },
            WireError::Backup { reason: "".into() },
            WireError::ShuttingDown,
            WireError::Unavailable { reason: "".into() },
            WireError::Internal { reason: "".into() },
        ];
        for e in all {
            let v = crate::client::value::to_value(&e).unwrap();
            let code = v
                .as_map()
                .unwrap()
                .iter()
                .find(|(k, _)| k.as_str() == Some("code"));
            assert_eq!(code.unwrap().1.as_str(), Some(wire_code(&e)), "{e:?}");
        }
    }

    #[test]
    fn closed_connection_is_a_network_error() {
        let e = ClientError::from_protocol("h:1", ProtocolError::Closed);
        assert!(matches!(e, ClientError::Io { .. }));
        let e = ClientError::from_protocol("h:1", ProtocolError::Malformed("x".into()));
        assert!(matches!(e, ClientError::Protocol { .. }));
        let e = ClientError::NoServerReachable {
            tried: vec![Attempt {
                addr: "h:1".into(),
                error: Box::new(io()),
            }],
        };
        assert!(e.to_string().contains("h:1"));
    }
}
