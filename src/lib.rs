//! Magma-HA: a high-availability, replicated object-repository server and
//! client library.
pub mod protocol;
pub mod storage;
pub mod types;
