//! The object model on top of MessagePack values.
//!
//! An object is a class name plus a MessagePack value. References to
//! persistent objects are the MessagePack extension type [`REF_EXT`] holding
//! the oid (8 bytes, big-endian), so any MessagePack library can decode an
//! object and the server can find references without knowing user types.
//! Inside a commit, new objects are referenced by a temporary id with the
//! extension type [`TEMP_REF_EXT`]; the primary rewrites those to real oids.
//!
//! This module owns value inspection and rewriting only; it never does I/O.

use std::collections::HashMap;

use rmpv::Value;

use crate::storage::error::{Result, StorageError};
use crate::types::Oid;

/// Extension type of a reference to a persistent object.
pub const REF_EXT: i8 = 1;
/// Extension type of a reference to an object created in the same commit.
pub const TEMP_REF_EXT: i8 = 2;

/// Class name of a large collection (Magma's MagmaCollection).
pub const COLLECTION_CLASS: &str = "MagmaCollection";
/// Class name of the root anchor (Magma's MaRootAnchor).
pub const ANCHOR_CLASS: &str = "MaRootAnchor";

/// An object as read from a repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredObject {
    pub oid: Oid,
    /// Number of the commit that last wrote the object.
    pub version: u64,
    pub class: String,
    /// MessagePack.
    pub value: Vec<u8>,
    /// For a large collection, its number of elements.
    pub collection_len: Option<u64>,
}

pub fn ref_value(oid: Oid) -> Value {
    Value::Ext(REF_EXT, oid.to_be_bytes().to_vec())
}

pub fn decode_value(bytes: &[u8]) -> Result<Value> {
    let mut slice = bytes;
    let v = rmpv::decode::read_value(&mut slice)
        .map_err(|e| StorageError::Invalid(format!("value is not MessagePack: {e}")))?;
    if !slice.is_empty() {
        return Err(StorageError::Invalid(format!(
            "value has {} trailing bytes after its MessagePack value",
            slice.len()
        )));
    }
    Ok(v)
}

pub fn encode_value(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("writing to a Vec cannot fail");
    out
}

fn ext_id(tag: i8, data: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = data.try_into().map_err(|_| {
        StorageError::Invalid(format!(
            "reference extension {tag} must hold 8 bytes, holds {}",
            data.len()
        ))
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Every persistent reference inside `value`, in document order.
pub fn references(value: &Value, out: &mut Vec<Oid>) -> Result<()> {
    match value {
        Value::Ext(REF_EXT, data) => out.push(ext_id(REF_EXT, data)?),
        Value::Array(items) => {
            for v in items {
                references(v, out)?;
            }
        }
        Value::Map(entries) => {
            for (k, v) in entries {
                references(k, out)?;
                references(v, out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Persistent references of an encoded value.
pub fn references_in(bytes: &[u8]) -> Result<Vec<Oid>> {
    let mut out = Vec::new();
    // Cheap pre-check: a value with no ext marker bytes cannot hold refs.
    if !bytes.iter().any(|b| matches!(b, 0xd4..=0xd8 | 0xc7..=0xc9)) {
        return Ok(out);
    }
    references(&decode_value(bytes)?, &mut out)?;
    Ok(out)
}

/// A value as a commit sends it, made ready to store: it must be one
/// MessagePack value, every reference extension in it must hold 8 bytes,
/// and every temporary reference is rewritten through `temp_to_oid`
/// (unknown temporary ids are an error naming the id). Checked in full at
/// commit, so that nothing stored can later fail a deep read, a digest or
/// a compaction.
pub fn checked_value(bytes: &[u8], temp_to_oid: &HashMap<u64, Oid>) -> Result<Vec<u8>> {
    let mut v = decode_value(bytes)?;
    let mut changed = false;
    rewrite(&mut v, temp_to_oid, &mut changed)?;
    Ok(if changed {
        encode_value(&v)
    } else {
        bytes.to_vec()
    })
}

fn rewrite(v: &mut Value, map: &HashMap<u64, Oid>, changed: &mut bool) -> Result<()> {
    match v {
        Value::Ext(REF_EXT, data) => {
            ext_id(REF_EXT, data)?;
        }
        Value::Ext(TEMP_REF_EXT, data) => {
            let temp = ext_id(TEMP_REF_EXT, data)?;
            let oid = *map.get(&temp).ok_or_else(|| {
                StorageError::Invalid(format!(
                    "temporary reference {temp} names no new object of this commit"
                ))
            })?;
            *v = ref_value(oid);
            *changed = true;
        }
        Value::Array(items) => {
            for i in items {
                rewrite(i, map, changed)?;
            }
        }
        Value::Map(entries) => {
            for (k, val) in entries {
                rewrite(k, map, changed)?;
                rewrite(val, map, changed)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_references() {
        let v = Value::Map(vec![
            (Value::from("a"), ref_value(5)),
            (
                Value::from("b"),
                Value::Array(vec![ref_value(7), Value::from(3)]),
            ),
        ]);
        assert_eq!(references_in(&encode_value(&v)).unwrap(), vec![5, 7]);
        assert!(references_in(&encode_value(&Value::from("plain")))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn resolves_temporary_references() {
        let v = Value::Array(vec![Value::Ext(TEMP_REF_EXT, 3u64.to_be_bytes().to_vec())]);
        let map = HashMap::from([(3u64, 42u64)]);
        let out = checked_value(&encode_value(&v), &map).unwrap();
        assert_eq!(references_in(&out).unwrap(), vec![42]);
        let missing = HashMap::new();
        assert!(checked_value(&encode_value(&v), &missing).is_err());
    }

    #[test]
    fn a_committed_value_with_a_short_reference_is_refused_whatever_its_marker() {
        let map = HashMap::from([(3u64, 42u64)]);
        // Payloads of 1, 2, 4 and 16 bytes use the fixext markers d4..d8,
        // 3 bytes the ext8 marker c7: none may be stored.
        for len in [1usize, 2, 3, 4, 16] {
            for tag in [REF_EXT, TEMP_REF_EXT] {
                let v = Value::Map(vec![(Value::from("r"), Value::Ext(tag, vec![0; len]))]);
                let err = checked_value(&encode_value(&v), &map).unwrap_err();
                assert!(
                    err.to_string().contains("must hold 8 bytes"),
                    "ext {tag} of {len} bytes: {err}"
                );
            }
        }
        // Other extension types are the application's own business.
        let other = encode_value(&Value::Ext(7, vec![1, 2, 3, 4]));
        assert_eq!(checked_value(&other, &map).unwrap(), other);
        // A value without temporary references is stored byte for byte.
        let plain = encode_value(&Value::Array(vec![ref_value(9), Value::from("x")]));
        assert_eq!(checked_value(&plain, &map).unwrap(), plain);
        assert!(
            checked_value(&[0x92, 0x01], &map).is_err(),
            "truncated array"
        );
    }

    #[test]
    fn bad_reference_payload_is_an_error() {
        let v = Value::Ext(REF_EXT, vec![1, 2]);
        assert!(references_in(&encode_value(&v)).is_err());
    }
}
