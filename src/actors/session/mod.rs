//! Connection actors: one [`Session`] per TCP connection.
//!
//! A session reads frames, decodes requests, routes them to the actor that
//! owns the answer, and writes responses stamped with the request's id and
//! the server's current commit number. Requests of one connection are served
//! one at a time, in order; different connections run concurrently (and
//! their commits share fsyncs in the `CommitCoordinator`).
//!
//! * `connection.rs`: the actor, its lifecycle and socket I/O (a reader
//!   future inside the actor's context, a writer task that batches replies);
//! * `dispatch.rs`: hello, admin checks and routing of each request;
//! * `requests.rs`: the asynchronous handling of each request kind;
//! * `backup.rs`: the backup requests, answered by the `BackupActor`.

mod backup;
mod connection;
mod dispatch;
mod requests;

pub(crate) use connection::{clipped, MAX_ECHO};
pub use connection::{CloseSession, CloseSilent, Inbound, Session, SessionEnv, SessionSettings};
pub use requests::MAX_RANGE_BYTES;
