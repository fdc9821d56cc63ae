//! Routing of one request: the hello handshake, the admin check, and which
//! requests are answered at once and which need another actor.
//!
//! Rules (documented in `docs/PROTOCOL.md`):
//!
//! * the first request must be `hello` with this build's protocol version;
//!   otherwise the reply is `hello_expected` / `unsupported_protocol` and the
//!   connection is closed. A second hello is refused, the connection stays;
//! * a hello is admitted by the `Listener`, which counts sessions by role:
//!   beyond `--max-connections` application sessions, or the reserve of
//!   admin and peer sessions, the reply is `unavailable` and the connection
//!   is closed;
//! * admin requests on a session that is not `admin` get `not_admin`, the
//!   connection stays;
//! * peer requests (`catch_up`, `replicate`, `record_hash`, `promote`,
//!   `hand_over`, `leaving`) on a session that is not `peer` get
//!   `not_peer`, the connection stays;
//! * requests this release cannot serve (take-over) get `unavailable`,
//!   saying so;
//! * backup requests go to the `BackupActor` (`backup.rs`).

use std::future::Future;
use std::pin::Pin;

use log::info;

use crate::actors::listener::SaidHello;
use crate::actors::session::connection::{error_body, Session, SessionEnv, MAX_ECHO};
use crate::actors::session::{backup, requests};
use crate::protocol::{RequestBody, ResponseBody, SessionRole, WireError, PROTOCOL_VERSION};
use crate::server::RESERVED_CONNECTIONS;

/// A request's answer as a future that needs no session state.
pub(super) type Work = Pin<Box<dyn Future<Output = ResponseBody>>>;

/// How a request is answered.
pub(super) enum Routed {
    /// Already known; then do `After`.
    Now(Box<ResponseBody>, After),
    /// Computed by other actors.
    Later(Work),
    /// Computed by other actors; then do `After` (a hello, which the
    /// listener may refuse).
    LaterThen(Pin<Box<dyn Future<Output = (ResponseBody, After)>>>),
    /// Computed by other actors while the session reads on: the reply goes
    /// out when ready, possibly after later requests' (peers match replies
    /// by id). Only for `replicate`, which a primary pipelines and whose
    /// order is fixed when it is routed (see `requests::replicate`).
    Detached(Work),
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

fn now(body: ResponseBody, after: After) -> Routed {
    Routed::Now(Box::new(body), after)
}

fn refuse(error: WireError) -> Routed {
    now(error_body(error), After::Continue)
}

/// The reply `work` yields, an error becoming its error body.
fn answer(work: impl Future<Output = Result<ResponseBody, WireError>> + 'static) -> Work {
    Box::pin(async move { work.await.unwrap_or_else(error_body) })
}

fn later(work: impl Future<Output = Result<ResponseBody, WireError>> + 'static) -> Routed {
    Routed::Later(answer(work))
}

fn detached(work: impl Future<Output = Result<ResponseBody, WireError>> + 'static) -> Routed {
    Routed::Detached(answer(work))
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
            | RequestBody::BackupPullStart { .. }
            | RequestBody::BackupPullChunk { .. }
            | RequestBody::BackupPullFinish { .. }
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
            RequestBody::Complain { addr } => later(requests::complain(env, addr)),
            RequestBody::CommitStatus { token } => later(requests::commit_status(env, token)),
            RequestBody::CatchUp { .. }
            | RequestBody::Replicate { .. }
            | RequestBody::RecordHash { .. }
            | RequestBody::Promote
            | RequestBody::HandOver { .. }
            | RequestBody::Leaving { .. }
                if role != SessionRole::Peer =>
            {
                refuse(WireError::NotPeer)
            }
            RequestBody::RecordHash { number } => later(requests::record_hash(env, number)),
            RequestBody::Promote => later(requests::promote(env)),
            RequestBody::HandOver { server_id } => later(requests::hand_over(env, server_id)),
            RequestBody::Leaving { server_id } => later(requests::leaving(env, server_id)),
            RequestBody::CatchUp {
                from,
                max_count,
                max_bytes,
                server_id,
                addr,
                repository_id,
                for_promotion,
            } => later(requests::catch_up(
                env,
                requests::CatchUpAsk {
                    from,
                    max_count,
                    max_bytes,
                    server_id,
                    addr,
                    repository_id,
                    for_promotion,
                },
            )),
            RequestBody::Replicate {
                epoch,
                primary_id: _,
                records,
                primary_last,
                ack,
            } => detached(requests::replicate(env, epoch, records, primary_last, ack)),
            RequestBody::Follow { primary } => later(requests::follow(env, primary)),
            RequestBody::RemoveSecondary { addr } => later(requests::remove(env, addr)),
            RequestBody::Status => later(requests::status(env)),
            RequestBody::Digest => later(requests::digest(env)),
            RequestBody::Shutdown { save } => now(ResponseBody::Ok, After::Shutdown { save }),
            RequestBody::Backup { .. }
            | RequestBody::BackupStatus
            | RequestBody::BackupAbort
            | RequestBody::BackupPause
            | RequestBody::BackupResume
            | RequestBody::BackupPullStart { .. }
            | RequestBody::BackupPullChunk { .. }
            | RequestBody::BackupPullFinish { .. } => later(backup::answer(env, body)),
            RequestBody::TakeOver => later(requests::take_over(env)),
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
        if client_name.len() > MAX_ECHO {
            return now(
                error_body(WireError::BadRequest {
                    reason: format!(
                        "client_name of {} bytes: at most {MAX_ECHO}",
                        client_name.len()
                    ),
                }),
                After::Close("client_name too long".into()),
            );
        }
        self.role = Some(role);
        self.client = client_name;
        let opened = self.opened();
        let admitted = self.admission.send(SaidHello { id: self.id, role });
        let env = self.env.clone();
        Routed::LaterThen(Box::pin(async move {
            match admitted.await {
                Ok(true) => {
                    info!("{opened}");
                    let body = requests::hello(env, role).await;
                    (body.unwrap_or_else(error_body), After::Continue)
                }
                Ok(false) => refused(&env, role),
                // The listener is gone: the server is stopping.
                Err(_) => (
                    error_body(WireError::ShuttingDown),
                    After::Close("server shutting down".into()),
                ),
            }
        }))
    }
}

/// The answer to a hello the listener did not admit: its role's sessions
/// are at their limit.
fn refused(env: &SessionEnv, role: SessionRole) -> (ResponseBody, After) {
    let (reason, close) = match role {
        SessionRole::Application => {
            let limit = env.settings.max_connections;
            (
                format!(
                    "this server serves at most {limit} application connections \
                     (--max-connections); retry later or use another member"
                ),
                format!("over the limit of {limit} connections"),
            )
        }
        SessionRole::Admin | SessionRole::Peer => {
            let all = env.settings.max_connections + RESERVED_CONNECTIONS;
            (
                format!(
                    "this server serves at most {all} sessions (--max-connections and \
                     {RESERVED_CONNECTIONS} more for admins and peers); retry later"
                ),
                format!("over the limit of {all} sessions"),
            )
        }
    };
    (
        error_body(WireError::Unavailable { reason }),
        After::Close(close),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_requests_are_exactly_the_admin_ones() {
        let admin = [
            RequestBody::Backup {
                to: "/x".into(),
                rate: None,
            },
            RequestBody::BackupPullChunk {
                id: 1,
                file: "objects.dat".into(),
                offset: 0,
                len: 1,
            },
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
