//! Commit records: the unit of durability and of replication.
//!
//! Owns the record's byte layout (see `docs/STORAGE.md`): a fixed binary
//! head (number, epoch, previous hash) followed by a MessagePack payload of
//! operations. The same body bytes are written to the log, streamed to
//! secondaries and hashed into the chain, so a record is encoded once on the
//! primary and never re-encoded. This module must never touch files.

use serde::{Deserialize, Serialize};

use crate::storage::error::StorageError;
use crate::types::{CommitNumber, Epoch, Hash, Node, Oid};

/// Bytes of the fixed head of a record body: number, epoch.term,
/// epoch.server, previous hash.
pub const RECORD_HEAD_LEN: usize = 8 + 8 + 8 + 32;

/// An operation of a commit record, with every oid and collection position
/// already assigned by the primary, so applying it is deterministic and
/// idempotent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Write (or create) an object. `value` is MessagePack.
    Put {
        oid: Oid,
        class: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Write element `index` of the large collection `coll`. The primary
    /// assigns `index` = the collection's length at commit time.
    Append {
        coll: Oid,
        index: u64,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Point the root anchor at the user's domain root.
    SetRoot { oid: Option<Oid> },
    /// Set (Some) or remove (None) a user meta attribute of the definition.
    SetMeta {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
    },
    /// Replace the persisted node.
    SetNode { node: Node },
}

/// The MessagePack part of a record body, encoded compactly: the array
/// `[token, ops]`, each op a one-entry map `{name: [fields...]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// Client-chosen idempotency token, recognised after a failover.
    #[serde(default, with = "serde_bytes")]
    pub token: Option<Vec<u8>>,
    pub ops: Vec<Op>,
}

/// A decoded commit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitRecord {
    pub number: CommitNumber,
    pub epoch: Epoch,
    pub prev_hash: Hash,
    pub payload: Payload,
}

impl CommitRecord {
    /// Encode the body (head + payload). The body is what is hashed,
    /// checksummed, logged and replicated.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(RECORD_HEAD_LEN + 64);
        body.extend_from_slice(&self.number.to_le_bytes());
        body.extend_from_slice(&self.epoch.term.to_le_bytes());
        body.extend_from_slice(&self.epoch.server.to_le_bytes());
        body.extend_from_slice(&self.prev_hash);
        // Compact form (structs as arrays): the log is the hot path and the
        // layout is ours, documented in docs/STORAGE.md.
        rmp_serde::encode::write(&mut body, &self.payload)
            .expect("encoding a payload into a Vec cannot fail");
        body
    }

    pub fn decode(body: &[u8]) -> Result<Self, StorageError> {
        let head = RecordHead::parse(body)?;
        let payload: Payload = rmp_serde::from_slice(&body[RECORD_HEAD_LEN..]).map_err(|e| {
            StorageError::Corrupted(format!("record {}: bad payload: {e}", head.number))
        })?;
        Ok(CommitRecord {
            number: head.number,
            epoch: head.epoch,
            prev_hash: head.prev_hash,
            payload,
        })
    }
}

/// The fixed head of a body, readable without decoding the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHead {
    pub number: CommitNumber,
    pub epoch: Epoch,
    pub prev_hash: Hash,
}

impl RecordHead {
    pub fn parse(body: &[u8]) -> Result<Self, StorageError> {
        if body.len() < RECORD_HEAD_LEN {
            return Err(StorageError::Corrupted(format!(
                "record body of {} bytes is shorter than its head",
                body.len()
            )));
        }
        let u = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap());
        let mut prev_hash = [0u8; 32];
        prev_hash.copy_from_slice(&body[24..56]);
        Ok(RecordHead {
            number: u(0),
            epoch: Epoch {
                term: u(8),
                server: u(16),
            },
            prev_hash,
        })
    }
}

/// The chain hash of a record: BLAKE3 of its body (which contains the
/// previous hash, so equal hashes mean equal histories).
pub fn record_hash(body: &[u8]) -> Hash {
    *blake3::hash(body).as_bytes()
}

/// The hash that precedes commit 1.
pub const GENESIS_HASH: Hash = [0u8; 32];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Member, MemberRole};

    fn sample() -> CommitRecord {
        CommitRecord {
            number: 7,
            epoch: Epoch { term: 2, server: 5 },
            prev_hash: [3u8; 32],
            payload: Payload {
                token: Some(vec![1, 2, 3]),
                ops: vec![
                    Op::Put {
                        oid: 4,
                        class: "Person".into(),
                        value: vec![0xc0],
                    },
                    Op::Append {
                        coll: 9,
                        index: 100,
                        value: vec![0xa1, b'x'],
                    },
                    Op::SetRoot { oid: Some(4) },
                    Op::SetMeta {
                        key: "k".into(),
                        value: None,
                    },
                    Op::SetNode {
                        node: Node {
                            members: vec![Member {
                                server_id: 1,
                                addr: "127.0.0.1:1".into(),
                                role: MemberRole::Primary,
                            }],
                        },
                    },
                ],
            },
        }
    }

    #[test]
    fn record_round_trips() {
        let r = sample();
        let body = r.encode();
        assert_eq!(CommitRecord::decode(&body).unwrap(), r);
        let head = RecordHead::parse(&body).unwrap();
        assert_eq!(head.number, 7);
        assert_eq!(head.epoch, Epoch { term: 2, server: 5 });
    }

    #[test]
    fn short_body_is_corruption_not_panic() {
        assert!(matches!(
            CommitRecord::decode(&[1, 2, 3]),
            Err(StorageError::Corrupted(_))
        ));
    }

    #[test]
    fn hash_depends_on_previous_hash() {
        let a = sample();
        let mut b = sample();
        b.prev_hash = [4u8; 32];
        assert_ne!(record_hash(&a.encode()), record_hash(&b.encode()));
    }
}
