//! `CliError`: every way a `magma` command fails, its stable `kind` word and
//! its exit code.
//!
//! This module owns the vocabulary of the `error: <kind>: <message>` line
//! scripts match on. Kinds are never renamed; a client failure keeps the
//! client's own kind (`ClientError::kind`, e.g. `network`,
//! `outcome_unknown`, `conflict`, or the server's error code such as
//! `unavailable`). It never prints and never exits: the binary does.

use std::fmt;
use std::path::PathBuf;

use crate::client::ClientError;
use crate::protocol::WireError;
use crate::pull::PullError;

/// The command did what was asked.
pub const EXIT_OK: i32 = 0;
/// The command failed (network, server refusal, I/O, ...).
pub const EXIT_ERROR: i32 = 1;
/// Usage error, or the feature is not available in this release. A server
/// answering `unavailable` (cannot serve it now: retry later) is a failure
/// like any other, exit 1: scripts retry on 1 and fix their call on 2.
pub const EXIT_USAGE: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A client call failed. `server` is the one server an admin command
    /// talked to, named in the message when the error itself does not.
    #[error("{}", client_message(.server.as_deref(), .source))]
    Client {
        server: Option<String>,
        #[source]
        source: ClientError,
    },
    /// A local file could not be written or read.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing the command's output failed (e.g. a closed pipe).
    #[error("cannot write output: {0}")]
    Output(#[source] std::io::Error),
    /// The feature is not available (in this release, or in this form).
    #[error("{0}")]
    Unavailable(String),
    /// The arguments make no sense together.
    #[error("{0}")]
    Usage(String),
    /// What was asked for does not exist (no domain root, no such
    /// collection).
    #[error("{0}")]
    NotFound(String),
    /// The domain root exists but does not have the documented shape.
    #[error("{0}")]
    IncompatibleRoot(String),
    /// A backup job ended without completing (aborted or failed), or a
    /// pull could not go on.
    #[error("{0}")]
    Backup(String),
    /// `verify-backup` found the directory incomplete or damaged.
    #[error("{0}")]
    InvalidBackup(String),
    /// `compact` refused its source or target, or failed.
    #[error("{0}")]
    Compact(String),
    /// The tool itself failed (a thread could not start or panicked).
    #[error("{0}")]
    Internal(String),
    /// A server asked to stop had not stopped within the time allowed.
    #[error("{0}")]
    StillRunning(String),
}

impl CliError {
    /// A client failure, without a server to name.
    pub fn client(source: ClientError) -> CliError {
        CliError::Client {
            server: None,
            source,
        }
    }

    /// A client failure of a call to `server`.
    pub fn at(server: &str) -> impl FnOnce(ClientError) -> CliError + '_ {
        move |source| CliError::Client {
            server: Some(server.to_string()),
            source,
        }
    }

    /// The stable short word after `error: `.
    pub fn kind(&self) -> &'static str {
        match self {
            CliError::Client { source, .. } => source.kind(),
            CliError::Io { .. } | CliError::Output(_) => "io",
            CliError::Unavailable(_) => "unavailable",
            CliError::Usage(_) => "usage",
            CliError::NotFound(_) => "not_found",
            CliError::IncompatibleRoot(_) => "incompatible_root",
            CliError::Backup(_) => "backup",
            CliError::InvalidBackup(_) => "invalid_backup",
            CliError::Compact(_) => "compact",
            CliError::Internal(_) => "internal",
            CliError::StillRunning(_) => "still_running",
        }
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) | CliError::Unavailable(_) => EXIT_USAGE,
            _ => EXIT_ERROR,
        }
    }

    /// The client error inside, if any.
    pub fn client_error(&self) -> Option<&ClientError> {
        match self {
            CliError::Client { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A pull reports through the CLI's own kinds (`backup`, `invalid_backup`,
/// `io`, or the client error's kind), as every other command does.
impl From<PullError> for CliError {
    fn from(e: PullError) -> Self {
        match e {
            PullError::Client { server, source } => CliError::Client {
                server: Some(server),
                source,
            },
            PullError::Io { path, source } => CliError::Io { path, source },
            PullError::Backup(m) => CliError::Backup(m),
            PullError::InvalidBackup(m) => CliError::InvalidBackup(m),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(source: ClientError) -> CliError {
        CliError::client(source)
    }
}

/// The message part of `error: <kind>: <message>` for a client failure. The
/// kind already names a server's error code, so only its details follow.
fn client_message(server: Option<&str>, e: &ClientError) -> String {
    let detail = match e {
        ClientError::Server(w) => wire_detail(w),
        other => return other.to_string(),
    };
    match server {
        Some(s) => format!("{detail} (server {s})"),
        None => detail,
    }
}

fn wire_detail(w: &WireError) -> String {
    match w {
        WireError::Unavailable { reason }
        | WireError::Backup { reason }
        | WireError::BadRequest { reason }
        | WireError::Internal { reason } => reason.clone(),
        other => other.to_string(),
    }
}

/// `error: <kind>: <message>`, the one line a failed command prints.
pub struct ErrorLine<'a>(pub &'a CliError);

impl fmt::Display for ErrorLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error: {}: {}", self.0.kind(), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_unavailable_is_a_failure_to_retry_not_a_usage_error() {
        let e = CliError::at("h:1")(ClientError::Server(WireError::Unavailable {
            reason: "cannot reach the primary".into(),
        }));
        assert_eq!(e.kind(), "unavailable");
        assert_eq!(e.exit_code(), EXIT_ERROR);
        assert_eq!(
            ErrorLine(&e).to_string(),
            "error: unavailable: cannot reach the primary (server h:1)"
        );
        let local = CliError::Unavailable("not in this release".into());
        assert_eq!(
            (local.kind(), local.exit_code()),
            ("unavailable", EXIT_USAGE)
        );
    }

    #[test]
    fn refused_connection_names_the_address() {
        let e = CliError::at("h:1")(ClientError::Io {
            addr: "h:1".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        assert_eq!(e.kind(), "network");
        assert_eq!(e.exit_code(), EXIT_ERROR);
        let line = ErrorLine(&e).to_string();
        assert!(line.starts_with("error: network: "), "{line}");
        assert!(line.contains("h:1"), "{line}");
    }

    #[test]
    fn local_kinds() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), EXIT_USAGE);
        assert_eq!(CliError::NotFound("x".into()).kind(), "not_found");
        let conflict = CliError::client(ClientError::Conflict { oids: vec![4] });
        assert_eq!(conflict.kind(), "conflict");
        assert_eq!(conflict.exit_code(), EXIT_ERROR);
    }
}
