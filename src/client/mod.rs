//! The Rust client library: application sessions that see a node as one
//! server, and admin sessions that talk to exactly one server.
//!
//! | module | owns |
//! |---|---|
//! | `error` | [`ClientError`] and what a caller may do about each failure |
//! | `connection` | one blocking socket: hello, request ids, framing |
//! | `routing` | pure routing rules: read order, node views |
//! | `probe` | asking several servers at once, so a hung one holds nobody up |
//! | `router` | a session's connections and node view: read and commit servers |
//! | `session` | [`Session`]: reads from a secondary, commits to the primary, failover |
//! | `transaction` | [`Transaction`] → `CommitBody`, [`CommitOutcome`] |
//! | `admin` | [`AdminSession`]: typed admin calls, never fails over |
//! | `value` | [`Ref`], [`NewRef`], [`Object`], `serde` ↔ `rmpv::Value` |
//!
//! The client depends on `protocol` and `types` only, never on the server's
//! actors or storage. The wire protocol is in `docs/PROTOCOL.md`.
//!
//! ```no_run
//! use magma::client::{Ref, Session};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Domain {
//!     items: Ref, // a large collection
//! }
//!
//! # fn main() -> Result<(), magma::client::ClientError> {
//! let mut s = Session::connect(&["127.0.0.1:51969"])?;
//! let root = s.root()?.expect("a domain root");
//! let domain: Domain = root.decode()?;
//! let outcome = s.append(domain.items, "hello")?;
//! s.require_last_seen(); // read your writes, wherever the read goes
//! let back: Vec<String> = s.collection_range_as(domain.items, outcome.positions[0], 1)?;
//! assert_eq!(back, ["hello"]);
//! # Ok(()) }
//! ```

mod admin;
mod connection;
pub(crate) use connection::response_type;
mod error;
mod probe;
mod router;
mod routing;
mod session;
mod transaction;
mod value;

#[cfg(test)]
mod session_tests;
#[cfg(test)]
mod wire_tests;

pub use admin::AdminSession;
pub use connection::{ConnectOptions, Connection, ServerHello};
pub use error::{wire_code, Attempt, ClientError, Result};
pub use session::{Session, SessionOptions, DEFAULT_REROUTE_TIMEOUT};
pub use transaction::{CommitOutcome, Transaction};
pub use value::{
    from_value, references, to_value, NewRef, Object, Ref, COLLECTION_CLASS, NEW_REF_EXT, REF_EXT,
};
