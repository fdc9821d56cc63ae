//! The wire protocol: frames, messages and their errors.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of
//! MessagePack with named fields. This module owns shapes and encoding only;
//! it never does socket I/O policy, never imports actix or storage.

pub mod codec;
pub mod direct;
pub mod error;
pub mod messages;

pub use error::{ProtocolError, WireError};
pub use messages::*;
