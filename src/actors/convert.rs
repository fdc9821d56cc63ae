//! Conversions between the wire (`protocol`) and the storage engine's types,
//! and the one mapping from [`StorageError`] to [`WireError`].
//!
//! Every actor that answers a client goes through these functions, so an
//! error means the same thing whichever path produced it. Values travel as
//! `rmpv::Value` on the wire and as encoded MessagePack bytes in storage.

use actix::MailboxError;

use crate::protocol::{CommitBody, WireError, WireObject, WireRef};
use crate::storage::object::{decode_value, encode_value};
use crate::storage::{
    AppendRequest, CommitRequest, NewRequest, ObjRef, PutRequest, StorageError, StoredObject,
};

/// Longest idempotency token a commit may carry.
pub const MAX_TOKEN_LEN: usize = 32;

/// The wire error a client sees for a storage failure. Expected errors keep
/// their meaning; fatal ones (I/O, corruption) and start-up-only ones become
/// `Internal`, which tells the client the outcome of a commit is unknown.
pub fn wire_error(err: &StorageError) -> WireError {
    match err {
        StorageError::Conflict { oids } => WireError::Conflict { oids: oids.clone() },
        StorageError::UnknownObject(oid) | StorageError::DroppedObject(oid) => {
            WireError::UnknownObject { oid: *oid }
        }
        StorageError::NotACollection(oid) => WireError::NotACollection { oid: *oid },
        StorageError::RestoreMode => WireError::RestoreMode,
        StorageError::LogTruncated { requested, oldest } => WireError::LogTruncated {
            requested: *requested,
            oldest: *oldest,
        },
        StorageError::Invalid(reason) => WireError::BadRequest {
            reason: reason.clone(),
        },
        // Replication sequencing: the request (a record, a range) cannot be
        // accepted as sent; the text says what to resend.
        StorageError::OutOfSequence { .. }
        | StorageError::NotInRestoreMode
        | StorageError::ChainMismatch { .. }
        | StorageError::StaleEpoch { .. }
        | StorageError::BeyondEnd { .. } => WireError::BadRequest {
            reason: err.to_string(),
        },
        StorageError::Io { .. }
        | StorageError::BackupIo { .. }
        | StorageError::Corrupted(_)
        | StorageError::CorruptRecord { .. }
        | StorageError::DroppedNeeded { .. }
        | StorageError::Stopped(_)
        | StorageError::Locked(_)
        | StorageError::NotARepository(_)
        | StorageError::UnsupportedFormat { .. } => WireError::Internal {
            reason: err.to_string(),
        },
    }
}

/// An actor that should answer is gone: the server is failing or stopping.
pub fn mailbox_error(actor: &str, err: MailboxError) -> WireError {
    WireError::Internal {
        reason: format!("{actor} is gone ({err})"),
    }
}

fn obj_ref(r: WireRef) -> ObjRef {
    match r {
        WireRef::Oid(oid) => ObjRef::Oid(oid),
        WireRef::New(temp) => ObjRef::New(temp),
    }
}

/// The storage request for a wire commit. Only the token's length is checked
/// here; everything else is validated by the repository.
pub fn commit_request(body: CommitBody) -> Result<CommitRequest, WireError> {
    if let Some(token) = &body.token {
        if token.len() > MAX_TOKEN_LEN {
            return Err(WireError::BadRequest {
                reason: format!(
                    "idempotency token of {} bytes exceeds {MAX_TOKEN_LEN}",
                    token.len()
                ),
            });
        }
    }
    Ok(CommitRequest {
        token: body.token,
        puts: body
            .puts
            .into_iter()
            .map(|p| PutRequest {
                oid: p.oid,
                expected_version: p.expected_version,
                class: p.class,
                value: encode_value(&p.value),
            })
            .collect(),
        news: body
            .news
            .into_iter()
            .map(|n| NewRequest {
                temp_id: n.temp_id,
                class: n.class,
                value: encode_value(&n.value),
            })
            .collect(),
        appends: body
            .appends
            .into_iter()
            .map(|a| AppendRequest {
                coll: obj_ref(a.coll),
                value: encode_value(&a.value),
            })
            .collect(),
        set_root: body.set_root.map(obj_ref),
        meta: body
            .meta
            .into_iter()
            .map(|(k, v)| (k, v.as_ref().map(encode_value)))
            .collect(),
        set_node: None,
        new_epoch: None,
    })
}

/// A stored value as a wire value. Stored bytes that are not MessagePack are
/// damage in the repository, not a bad request: `Internal`.
pub fn wire_value(what: &str, bytes: &[u8]) -> Result<rmpv::Value, WireError> {
    decode_value(bytes).map_err(|e| WireError::Internal {
        reason: format!("{what} holds an undecodable value: {e}"),
    })
}

pub fn wire_object(obj: StoredObject) -> Result<WireObject, WireError> {
    let value = wire_value(&format!("object {}", obj.oid), &obj.value)?;
    Ok(WireObject {
        oid: obj.oid,
        version: obj.version,
        class: obj.class,
        value,
        collection_len: obj.collection_len,
    })
}

pub fn wire_objects(objs: Vec<StoredObject>) -> Result<Vec<WireObject>, WireError> {
    objs.into_iter().map(wire_object).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{WireAppend, WireNew, WirePut};
    use std::path::PathBuf;

    #[test]
    fn expected_errors_keep_their_meaning() {
        assert_eq!(
            wire_error(&StorageError::Conflict { oids: vec![3, 4] }),
            WireError::Conflict { oids: vec![3, 4] }
        );
        assert_eq!(
            wire_error(&StorageError::UnknownObject(7)),
            WireError::UnknownObject { oid: 7 }
        );
        assert_eq!(
            wire_error(&StorageError::NotACollection(8)),
            WireError::NotACollection { oid: 8 }
        );
        // On this server the object is gone: the client learns which.
        assert_eq!(
            wire_error(&StorageError::DroppedObject(9)),
            WireError::UnknownObject { oid: 9 }
        );
        assert_eq!(
            wire_error(&StorageError::RestoreMode),
            WireError::RestoreMode
        );
        assert_eq!(
            wire_error(&StorageError::LogTruncated {
                requested: 2,
                oldest: 10
            }),
            WireError::LogTruncated {
                requested: 2,
                oldest: 10
            }
        );
        assert_eq!(
            wire_error(&StorageError::Invalid("no such temp id".into())),
            WireError::BadRequest {
                reason: "no such temp id".into()
            }
        );
        assert!(matches!(
            wire_error(&StorageError::OutOfSequence {
                expected: 5,
                got: 9
            }),
            WireError::BadRequest { .. }
        ));
    }

    #[test]
    fn fatal_errors_are_internal() {
        let io = StorageError::Io {
            context: "writing the log".into(),
            source: std::io::Error::other("disk on fire"),
        };
        assert!(io.is_fatal());
        match wire_error(&io) {
            WireError::Internal { reason } => assert!(reason.contains("disk on fire")),
            other => panic!("expected Internal, got {other:?}"),
        }
        assert!(matches!(
            wire_error(&StorageError::Corrupted("bad index".into())),
            WireError::Internal { .. }
        ));
        assert!(matches!(
            wire_error(&StorageError::Locked(PathBuf::from("/x"))),
            WireError::Internal { .. }
        ));
    }

    #[test]
    fn commit_body_converts_values_and_refs() {
        let body = CommitBody {
            token: Some(vec![1; 16]),
            puts: vec![WirePut {
                oid: 5,
                expected_version: 2,
                class: "C".into(),
                value: rmpv::Value::from(1),
            }],
            news: vec![WireNew {
                temp_id: 1,
                class: "D".into(),
                value: rmpv::Value::from("x"),
            }],
            appends: vec![WireAppend {
                coll: WireRef::New(1),
                value: rmpv::Value::from(true),
            }],
            set_root: Some(WireRef::Oid(5)),
            meta: vec![("k".into(), Some(rmpv::Value::from(2))), ("g".into(), None)],
        };
        let req = commit_request(body).unwrap();
        assert_eq!(req.puts[0].value, encode_value(&rmpv::Value::from(1)));
        assert_eq!(req.news[0].temp_id, 1);
        assert_eq!(req.appends[0].coll, ObjRef::New(1));
        assert_eq!(req.set_root, Some(ObjRef::Oid(5)));
        assert_eq!(req.meta[1], ("g".to_string(), None));
        assert!(req.set_node.is_none() && req.new_epoch.is_none());
    }

    #[test]
    fn long_token_is_a_bad_request() {
        let body = CommitBody {
            token: Some(vec![0; MAX_TOKEN_LEN + 1]),
            ..CommitBody::default()
        };
        assert!(matches!(
            commit_request(body),
            Err(WireError::BadRequest { .. })
        ));
    }

    #[test]
    fn undecodable_stored_value_is_internal() {
        let obj = StoredObject {
            oid: 3,
            version: 1,
            class: "C".into(),
            value: vec![0x92, 0x01], // an array of two holding one
            collection_len: None,
        };
        assert!(matches!(wire_object(obj), Err(WireError::Internal { .. })));
    }
}
