//! Magma-HA: a high-availability, replicated object-repository server and
//! client library.
pub mod actors;
pub mod cli;
pub mod client;
pub mod protocol;
pub mod server;
pub mod storage;
pub mod types;
