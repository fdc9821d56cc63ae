//! Magma-HA: a high-availability, replicated object-repository server and
//! client library.
//!
//! One logical repository is served by a node of `magma-server` processes;
//! applications use [`client::Session`], operators the `magma` tool
//! ([`cli`]), other languages the MessagePack protocol of `docs/PROTOCOL.md`.
//!
//! | module | owns | depends on |
//! |---|---|---|
//! | [`types`] | ids, epochs, the persisted node | nothing |
//! | [`storage`] | one repository directory: log, index, objects, recovery (blocking, no actix) | types |
//! | [`protocol`] | wire messages, framing, wire errors (no I/O policy, no actix) | types |
//! | [`actors`] | the server's actor system | storage, protocol |
//! | [`server`] | configuration, start-up, signals | actors |
//! | [`client`] | sessions, failover, admin sessions | protocol |
//! | [`pull`] | pulling a backup over the protocol into a local directory | client, storage |
//! | [`cli`] | the `magma` command-line tool | client, pull |
//!
//! A commit (a "PUT") from an application to the disk:
//!
//! ```text
//!  Session (client) --frame--> Session actor --QueueCommit--> CommitCoordinator
//!                                                                 | CommitBatch (the commits
//!                                                                 v  delivered together)
//!                         StorageActor: validate, number, log write, apply each
//!                           | Flush (group)                       | BatchApplied(N, LogSync)
//!                           v                                     v
//!     CommitLogActor: one fsync covers every  --durable up to--> CommitCoordinator
//!     record written before it (group commit)     M >= N          |
//!                                                                 v
//!  Session (client) <--frame-- Session actor <--Acknowledged-- CommitCoordinator
//! ```
pub mod actors;
pub mod cli;
pub mod client;
pub mod protocol;
pub mod pull;
pub mod server;
pub mod storage;
pub mod types;
