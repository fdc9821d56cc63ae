//! Identifiers shared by every layer: object ids, commit numbers, epochs,
//! repository ids and the persisted description of a node.
//!
//! This module owns plain data only. It must never do I/O and never depend on
//! actix, the protocol or the storage engine: everything else depends on it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Object identifier. Oid 0 is the root anchor; user objects start at 1.
pub type Oid = u64;

/// The root anchor (Magma's MaRootAnchor).
pub const ROOT_ANCHOR: Oid = 0;

/// A commit number: dense, the first commit is 1, 0 means "nothing yet".
pub type CommitNumber = u64;

/// 128-bit random repository identity, fixed at creation and copied by backups.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RepositoryId(pub [u8; 16]);

impl RepositoryId {
    pub fn random() -> Self {
        RepositoryId(rand::random())
    }
}

impl fmt::Display for RepositoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RepositoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepositoryId({self})")
    }
}

/// A 32-byte BLAKE3 hash: of a commit record (the chain) or of content (digest).
pub type Hash = [u8; 32];

/// Hex rendering for hashes and digests.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Fencing epoch. Ordered by `term` first, then by the promoting server's id,
/// so two servers promoting concurrently with the same term still produce
/// distinct, totally ordered epochs. Every promotion raises `term`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Epoch {
    pub term: u64,
    pub server: u64,
}

impl Epoch {
    /// The epoch a repository is created in.
    pub fn initial(server: u64) -> Self {
        Epoch { term: 1, server }
    }

    /// The next epoch, created by `server` promoting itself.
    pub fn next(self, server: u64) -> Self {
        Epoch {
            term: self.term + 1,
            server,
        }
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:x}", self.term, self.server)
    }
}

/// `host:port` of a server, as members and clients reach it.
pub type NodeAddr = String;

/// What a member of the node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberRole {
    Primary,
    Secondary,
    /// Votes, holds no data.
    Witness,
}

/// One server of the node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// Random identity chosen when the server's directory was created or restored.
    pub server_id: u64,
    pub addr: NodeAddr,
    pub role: MemberRole,
}

/// The node (Magma's MagmaNode), persisted in the root anchor and changed
/// only by commits. `members` is ordered: the first secondary is the one
/// promoted when the primary fails.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    pub members: Vec<Member>,
}

impl Node {
    pub fn primary(&self) -> Option<&Member> {
        self.members.iter().find(|m| m.role == MemberRole::Primary)
    }

    pub fn secondaries(&self) -> impl Iterator<Item = &Member> {
        self.members
            .iter()
            .filter(|m| m.role == MemberRole::Secondary)
    }

    pub fn member(&self, server_id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.server_id == server_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_order_by_term_then_server() {
        let a = Epoch { term: 2, server: 9 };
        let b = Epoch { term: 3, server: 1 };
        assert!(a < b);
        assert!(a.next(1) > a);
        assert!(Epoch { term: 3, server: 2 } > b);
    }

    #[test]
    fn hex_renders_lowercase() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
