//! Routing of one request: the hello handshake, the admin check, and which
//! requests are answered at once and which need another actor.
//!
//! Rules (documented in `docs/PROTOCOL.md`):
//!
//! * the first request must be `hello` with this build's protocol version;
//!   otherwise the reply is `hello_expected` / `unsupported_protocol` and the
//!   connection is closed. A second hello is refused, the connection stays;
//! * admin requests on a session that is not `admin` get `not_admin`, the
//!   connection stays;
//! * requests this release cannot serve on a single server (backups,
//!   follow, take-over, remove) get `unavailable`, saying so.

use std::future::Future;
use std::pin::Pin;

use crate::actors::session::connection::{error_body, Session};
use crate::actors::session::requests;
use crate::protocol::{RequestBody, ResponseBody, SessionRole, WireError, PROTOCOL_VERSION};

/// A request's answer as a future that needs no session state.
pub(super) type Work = Pin<Box<dyn Future<Output = ResponseBody>>>;

/// How a request is answered.
pub(super) enum Routed {
    /// Already known; then do `After`.
    Now(Box<ResponseBody>, After),
    /// Computed by other actors.
    Later(Work),
}

/// What the session does once an immediate reply is queued.
pub(super) enum After {
    Continue,
    Close(String),
    /// Ask the controller to stop the server (after the reply is queued).
    Shutdown {
        save: bool,
    },
}

const BACKUP_LATER: &str = "backups arrive with the backup/replication release";
const REPLICATION_LATER: &str =
    "replication (follow, take-over, remove) arrives with the backup/replication release";

fn now(body: ResponseBody, after: After) -> Routed {
    Routed::Now(Box::new(body), after)
}

fn refuse(error: WireError) -> Routed {
    now(error_body(error), After::Continue)
}

fn unavailable(reason: &str) -> Routed {
    refuse(WireError::Unavailable {
        reason: reason.to_string(),
    })
}

fn later(work: impl Future<Output = Result<ResponseBody, WireError>> + 'static) -> Routed {
    Routed::Later(Box::pin(
        async move { work.await.unwrap_or_else(error_body) },
    ))
}

/// Requests only an admin session may send.
pub(super) fn is_admin_request(body: &RequestBody) -> bool {
    matches!(
        body,
        RequestBody::Backup { .. }
            | RequestBody::BackupStatus
            | RequestBody::BackupAbort
            | RequestBody::BackupPause
            | RequestBody::BackupResume
            | RequestBody::Shutdown { .. }
            | RequestBody::Follow { .. }
            | RequestBody::TakeOver
            | RequestBody::RemoveSecondary { .. }
    )
}

impl Session {
    pub(super) fn route(&mut self, body: RequestBody) -> Routed {
        let Some(role) = self.role else {
            return self.hello(body);
        };
        if is_admin_request(&body) && role != SessionRole::Admin {
            return refuse(WireError::NotAdmin);
        }
        let env = self.env.clone();
        match body {
            RequestBody::Hello { .. } => refuse(WireError::HelloExpected),
            RequestBody::Ping => now(ResponseBody::Pong, After::Continue),
            RequestBody::GetNode => later(requests::node(env)),
            RequestBody::Read {
                oid,
                depth,
                required_progress,
            } => later(requests::read(env, oid, depth, required_progress)),
            RequestBody::ReadRoot {
                depth,
                required_progress,
            } => later(requests::read_root(env, depth, required_progress)),
            RequestBody::CollectionLength {
                coll,
                required_progress,
            } => later(requests::collection_length(env, coll, required_progress)),
            RequestBody::CollectionRange {
                coll,
                start,
                count,
                required_progress,
            } => later(requests::collection_range(
                env,
                coll,
                start,
                count,
                required_progress,
            )),
            RequestBody::GetMeta {
                key,
                required_progress,
            } => later(requests::meta(env, key, required_progress)),
            RequestBody::Commit(commit) => later(requests::commit(env, commit)),
            RequestBody::Status => later(requests::status(env)),
            RequestBody::Digest => later(requests::digest(env)),
            RequestBody::Shutdown { save } => now(ResponseBody::Ok, After::Shutdown { save }),
            RequestBody::Backup { .. }
            | RequestBody::BackupStatus
            | RequestBody::BackupAbort
            | RequestBody::BackupPause
            | RequestBody::BackupResume => unavailable(BACKUP_LATER),
            RequestBody::Follow { .. }
            | RequestBody::TakeOver
            | RequestBody::RemoveSecondary { .. } => unavailable(REPLICATION_LATER),
        }
    }

    /// The first request of a connection.
    fn hello(&mut self, body: RequestBody) -> Routed {
        let RequestBody::Hello {
            protocol_version,
            role,
            client_name,
        } = body
        else {
            return now(
                error_body(WireError::HelloExpected),
                After::Close("first request was not a hello".into()),
            );
        };
        if protocol_version != PROTOCOL_VERSION {
            return now(
                error_body(WireError::UnsupportedProtocol {
                    requested: protocol_version,
                    supported: PROTOCOL_VERSION,
                }),
                After::Close(format!("unsupported protocol version {protocol_version}")),
            );
        }
        self.role = Some(role);
        self.client = client_name;
        self.log_opened();
        later(requests::hello(self.env.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_requests_are_exactly_the_admin_ones() {
        let admin = [
            RequestBody::Backup { to: "/x".into() },
            RequestBody::BackupStatus,
            RequestBody::BackupAbort,
            RequestBody::BackupPause,
            RequestBody::BackupResume,
            RequestBody::Shutdown { save: true },
            RequestBody::Follow {
                primary: "h:1".into(),
            },
            RequestBody::TakeOver,
            RequestBody::RemoveSecondary { addr: "h:2".into() },
        ];
        assert!(admin.iter().all(is_admin_request));
        let open = [
            RequestBody::Ping,
            RequestBody::GetNode,
            RequestBody::Status,
            RequestBody::Digest,
            RequestBody::ReadRoot {
                depth: 0,
                required_progress: None,
            },
        ];
        assert!(!open.iter().any(is_admin_request));
    }
}
