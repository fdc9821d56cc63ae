//! Values for Rust users: references to persistent objects ([`Ref`], ext
//! type 1), references to objects created in the same commit ([`NewRef`],
//! ext type 2), and conversions between `serde` types and the
//! [`rmpv::Value`]s that travel in requests and responses.
//!
//! This module owns the MessagePack shape of object values on the client
//! side. It must never do I/O and never depend on the storage engine (the
//! server's twin of these rules lives in `storage::object`).

use std::fmt;

use rmpv::Value;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_bytes::ByteBuf;

use crate::client::error::Result;
use crate::protocol::{WireObject, WireRef};
use crate::types::Oid;

/// MessagePack extension type of a reference to a persistent object.
pub const REF_EXT: i8 = 1;
/// MessagePack extension type of a reference to an object created in the
/// same commit (its temporary id).
pub const NEW_REF_EXT: i8 = 2;
/// Class name of a large collection (Magma's MagmaCollection).
pub const COLLECTION_CLASS: &str = "MagmaCollection";

/// rmp-serde's representation of an extension value: a newtype struct named
/// [`rmp_serde::MSGPACK_EXT_STRUCT_NAME`] around `(tag, bytes)` (a test
/// checks the literal below against the library's constant).
#[derive(Serialize, Deserialize)]
#[serde(rename = "_ExtStruct")]
struct ExtStruct((i8, ByteBuf));

fn serialize_ext<S: Serializer>(s: S, tag: i8, id: u64) -> std::result::Result<S::Ok, S::Error> {
    ExtStruct((tag, ByteBuf::from(id.to_be_bytes().to_vec()))).serialize(s)
}

fn deserialize_ext<'de, D: Deserializer<'de>>(
    d: D,
    want: i8,
) -> std::result::Result<u64, D::Error> {
    use serde::de::Error;
    let ExtStruct((tag, bytes)) = ExtStruct::deserialize(d)?;
    if tag != want {
        return Err(D::Error::custom(format!(
            "expected MessagePack extension type {want}, found type {tag}"
        )));
    }
    let raw: [u8; 8] = bytes.as_slice().try_into().map_err(|_| {
        D::Error::custom(format!(
            "extension type {tag} must hold 8 bytes, holds {}",
            bytes.len()
        ))
    })?;
    Ok(u64::from_be_bytes(raw))
}

/// A reference to a persistent object: MessagePack extension type 1 holding
/// the oid as 8 big-endian bytes. Put it in your `serde` types wherever an
/// object points to another one; the server follows these for reads to a
/// depth and for garbage collection.
///
/// Works with `rmp-serde` (and therefore [`to_value`] / [`from_value`]);
/// formats without extension types (JSON) see a `[1, [bytes]]` pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ref(pub Oid);

impl Ref {
    pub fn oid(self) -> Oid {
        self.0
    }

    /// The reference as an object value.
    pub fn to_value(self) -> Value {
        Value::Ext(REF_EXT, self.0.to_be_bytes().to_vec())
    }

    /// The reference held by `v`, if `v` is an extension of type 1.
    pub fn from_value(v: &Value) -> Option<Ref> {
        match v {
            Value::Ext(REF_EXT, data) => {
                Some(Ref(u64::from_be_bytes(data.as_slice().try_into().ok()?)))
            }
            _ => None,
        }
    }
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}

impl From<Ref> for Oid {
    fn from(r: Ref) -> Oid {
        r.0
    }
}

impl From<Ref> for WireRef {
    fn from(r: Ref) -> WireRef {
        WireRef::Oid(r.0)
    }
}

impl Serialize for Ref {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        serialize_ext(s, REF_EXT, self.0)
    }
}

impl<'de> Deserialize<'de> for Ref {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        deserialize_ext(d, REF_EXT).map(Ref)
    }
}

/// A reference, inside one commit, to an object created by that same commit:
/// MessagePack extension type 2 holding the temporary id as 8 big-endian
/// bytes. The primary rewrites it to a [`Ref`] to the new object's real oid;
/// a `NewRef` is meaningless outside the commit that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NewRef(pub u64);

impl NewRef {
    pub fn temp_id(self) -> u64 {
        self.0
    }

    /// The reference as an object value.
    pub fn to_value(self) -> Value {
        Value::Ext(NEW_REF_EXT, self.0.to_be_bytes().to_vec())
    }
}

impl fmt::Display for NewRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "new#{}", self.0)
    }
}

impl From<NewRef> for WireRef {
    fn from(r: NewRef) -> WireRef {
        WireRef::New(r.0)
    }
}

impl Serialize for NewRef {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        serialize_ext(s, NEW_REF_EXT, self.0)
    }
}

impl<'de> Deserialize<'de> for NewRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        deserialize_ext(d, NEW_REF_EXT).map(NewRef)
    }
}

/// An object as read from a server.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub oid: Oid,
    /// Number of the commit that last wrote the object; pass it back as the
    /// expected version when rewriting the object.
    pub version: u64,
    pub class: String,
    pub value: Value,
    /// For a large collection, its number of elements.
    pub collection_len: Option<u64>,
}

impl Object {
    /// The value decoded into a `serde` type.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        from_value(&self.value)
    }

    /// A reference to this object, to store in other objects.
    pub fn reference(&self) -> Ref {
        Ref(self.oid)
    }

    pub fn is_collection(&self) -> bool {
        self.collection_len.is_some() || self.class == COLLECTION_CLASS
    }

    /// The persistent references in the value, in document order.
    pub fn references(&self) -> Vec<Ref> {
        references(&self.value)
    }
}

impl From<WireObject> for Object {
    fn from(o: WireObject) -> Object {
        Object {
            oid: o.oid,
            version: o.version,
            class: o.class,
            value: o.value,
            collection_len: o.collection_len,
        }
    }
}

impl From<&Object> for Ref {
    fn from(o: &Object) -> Ref {
        o.reference()
    }
}

impl From<&Object> for WireRef {
    fn from(o: &Object) -> WireRef {
        WireRef::Oid(o.oid)
    }
}

/// Encode a `serde` value as an object value, structs as maps with named
/// fields (the encoding every other client sees).
pub fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<Value> {
    let bytes = rmp_serde::to_vec_named(value)?;
    Ok(rmpv::decode::read_value(&mut bytes.as_slice())
        .expect("rmp-serde writes well-formed MessagePack"))
}

/// Decode an object value into a `serde` type.
pub fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T> {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, value).expect("writing to a Vec cannot fail");
    Ok(rmp_serde::from_slice(&bytes)?)
}

/// Every persistent reference inside `value`, in document order (map keys
/// included). Malformed extension payloads are skipped.
pub fn references(value: &Value) -> Vec<Ref> {
    fn walk(v: &Value, out: &mut Vec<Ref>) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            Value::Map(entries) => entries.iter().for_each(|(k, v)| {
                walk(k, out);
                walk(v, out);
            }),
            other => out.extend(Ref::from_value(other)),
        }
    }
    let mut out = Vec::new();
    walk(value, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::error::ClientError;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Domain {
        name: String,
        items: Ref,
        children: Vec<Ref>,
        parent: Option<Ref>,
    }

    #[test]
    fn magic_name_matches_rmp_serde() {
        assert_eq!(rmp_serde::MSGPACK_EXT_STRUCT_NAME, "_ExtStruct");
    }

    #[test]
    fn ref_encodes_as_fixext8_type_1_big_endian() {
        let bytes = rmp_serde::to_vec_named(&Ref(0x0102_0304_0506_0708)).unwrap();
        assert_eq!(bytes, [0xd7, 0x01, 1, 2, 3, 4, 5, 6, 7, 8]);
        let back: Ref = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, Ref(0x0102_0304_0506_0708));
        assert_eq!(to_value(&Ref(5)).unwrap(), Ref(5).to_value());
    }

    #[test]
    fn new_ref_encodes_as_ext_type_2() {
        let bytes = rmp_serde::to_vec_named(&NewRef(3)).unwrap();
        assert_eq!(bytes, [0xd7, 0x02, 0, 0, 0, 0, 0, 0, 0, 3]);
        assert_eq!(
            from_value::<NewRef>(&NewRef(3).to_value()).unwrap(),
            NewRef(3)
        );
    }

    #[test]
    fn wrong_ext_type_or_size_is_a_decode_error() {
        assert!(matches!(
            from_value::<Ref>(&NewRef(3).to_value()),
            Err(ClientError::Decode(_))
        ));
        assert!(matches!(
            from_value::<Ref>(&Value::Ext(REF_EXT, vec![1, 2])),
            Err(ClientError::Decode(_))
        ));
        assert!(matches!(
            from_value::<Ref>(&Value::from(7)),
            Err(ClientError::Decode(_))
        ));
    }

    #[test]
    fn struct_with_refs_round_trips_through_a_value() {
        let d = Domain {
            name: "root".into(),
            items: Ref(42),
            children: vec![Ref(1), Ref(2)],
            parent: None,
        };
        let v = to_value(&d).unwrap();
        let map = v.as_map().expect("structs are maps with named fields");
        let items = map
            .iter()
            .find(|(k, _)| k.as_str() == Some("items"))
            .unwrap();
        assert_eq!(items.1, Value::Ext(REF_EXT, 42u64.to_be_bytes().to_vec()));
        assert_eq!(references(&v), vec![Ref(42), Ref(1), Ref(2)]);
        assert_eq!(from_value::<Domain>(&v).unwrap(), d);
    }

    #[test]
    fn plain_values_round_trip() {
        let v = to_value(&("a", 7u32, vec![true])).unwrap();
        assert_eq!(
            v,
            Value::Array(vec![
                Value::from("a"),
                Value::from(7),
                Value::Array(vec![Value::from(true)])
            ])
        );
        let back: (String, u32, Vec<bool>) = from_value(&v).unwrap();
        assert_eq!(back, ("a".to_string(), 7, vec![true]));
        assert_eq!(to_value(&()).unwrap(), Value::Nil);
    }
}
