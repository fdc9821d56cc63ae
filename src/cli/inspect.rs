//! `magma digest` and `magma dump`: what one particular server holds.
//!
//! Operators compare servers with these, so every read goes to exactly the
//! server named: `digest` through an admin session, `dump` through one
//! application connection opened to that server alone (an application
//! `Session` would read from a secondary of its choosing). This module must
//! never fail over to another server and never print a partial collection
//! as if it were whole: a short or out-of-place page is an error.

use rmpv::Value;
use serde_json::json;

use crate::cli::domain;
use crate::cli::error::CliError;
use crate::client::{AdminSession, ClientError, ConnectOptions, Connection, Ref, REF_EXT};
use crate::protocol::{RequestBody, ResponseBody, SessionRole};
use crate::types::{hex, CommitNumber};

/// Elements asked for per `collection_range` request.
pub const DUMP_PAGE: u64 = 10_000;

/// `(commit, hex digest)` of `server`'s content.
pub fn digest(server: &str) -> Result<(CommitNumber, String), CliError> {
    let mut admin = AdminSession::connect(server).map_err(CliError::at(server))?;
    admin.digest().map_err(CliError::at(server))
}

/// Call `f` with every element of the collection `name` of the domain root,
/// in order, as `server` holds them when the dump starts. Returns the number
/// of elements.
pub fn for_each_element(
    server: &str,
    name: &str,
    mut f: impl FnMut(&Value) -> Result<(), CliError>,
) -> Result<u64, CliError> {
    let at = |e: ClientError| CliError::at(server)(e);
    let mut conn =
        Connection::connect(server, SessionRole::Application, &ConnectOptions::default())
            .map_err(at)?;
    let root = match conn
        .call(RequestBody::ReadRoot {
            depth: 0,
            required_progress: None,
        })
        .map_err(at)?
        .body
    {
        ResponseBody::Root { root: None, .. } => None,
        ResponseBody::Root { objects, .. } if !objects.is_empty() => {
            objects.into_iter().next().map(|o| o.value)
        }
        other => return Err(at(unexpected(server, "a root with its object", &other))),
    };
    let coll = domain::find_in_root(root.as_ref(), name)?;
    let len = match conn
        .call(RequestBody::CollectionLength {
            coll: coll.oid(),
            required_progress: None,
        })
        .map_err(at)?
        .body
    {
        ResponseBody::Length { len } => len,
        other => return Err(at(unexpected(server, "length", &other))),
    };
    let mut next = 0u64;
    while next < len {
        let count = DUMP_PAGE.min(len - next);
        let resp = conn
            .call(RequestBody::CollectionRange {
                coll: coll.oid(),
                start: next,
                count,
                required_progress: None,
            })
            .map_err(at)?;
        let values = match resp.body {
            ResponseBody::Elements { start, values, .. } if start == next && !values.is_empty() => {
                values
            }
            other => {
                return Err(at(unexpected(
                    server,
                    &format!("elements from index {next} (of {len})"),
                    &other,
                )))
            }
        };
        for v in values.iter().take((len - next) as usize) {
            f(v)?;
        }
        next += (values.len() as u64).min(len - next);
    }
    Ok(len)
}

/// Every element of the collection `name` as `server` holds it.
pub fn read_collection(server: &str, name: &str) -> Result<Vec<Value>, CliError> {
    let mut out = Vec::new();
    for_each_element(server, name, |v| {
        out.push(v.clone());
        Ok(())
    })?;
    Ok(out)
}

fn unexpected(server: &str, expected: &str, got: &ResponseBody) -> ClientError {
    ClientError::Protocol {
        addr: server.to_string(),
        reason: format!("expected {expected}, got {}", describe(got)),
    }
}

fn describe(body: &ResponseBody) -> String {
    let s = format!("{body:?}");
    match s.char_indices().nth(120) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// One element as `dump` prints it: a string raw (JSON-quoted when it holds
/// a line break, so that every element stays on one line), anything else
/// as compact JSON (see [`to_json`]).
pub fn render_element(v: &Value) -> String {
    match v {
        Value::String(s) => match s.as_str() {
            Some(text) if !text.contains(['\n', '\r']) => text.to_string(),
            _ => to_json(v).to_string(),
        },
        other => to_json(other).to_string(),
    }
}

/// A MessagePack value as JSON: a reference becomes `{"$ref": oid}`, binary
/// `{"$bin": "<hex>"}`, other extensions `{"$ext": type, "data": "<hex>"}`,
/// a map with non-string keys uses each key's JSON text as its key, and a
/// float that JSON cannot hold (NaN, infinity) its text.
pub fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Nil => serde_json::Value::Null,
        Value::Boolean(b) => json!(b),
        Value::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => json!(u),
            (None, Some(s)) => json!(s),
            (None, None) => json!(i.to_string()),
        },
        Value::F32(f) => float(f64::from(*f)),
        Value::F64(f) => float(*f),
        Value::String(s) => match s.as_str() {
            Some(text) => json!(text),
            None => json!({ "$bin": hex(s.as_bytes()) }),
        },
        Value::Binary(b) => json!({ "$bin": hex(b) }),
        Value::Array(items) => serde_json::Value::Array(items.iter().map(to_json).collect()),
        Value::Map(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let key = match k.as_str() {
                        Some(s) => s.to_string(),
                        None => to_json(k).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Value::Ext(tag, data) => match Ref::from_value(v) {
            Some(r) if *tag == REF_EXT => json!({ "$ref": r.oid() }),
            _ => json!({ "$ext": tag, "data": hex(data) }),
        },
    }
}

fn float(f: f64) -> serde_json::Value {
    serde_json::Number::from_f64(f).map_or_else(|| json!(f.to_string()), serde_json::Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_print_raw_unless_multiline() {
        assert_eq!(render_element(&Value::from("f1-000000001")), "f1-000000001");
        assert_eq!(render_element(&Value::from("a\nb")), "\"a\\nb\"");
        assert_eq!(render_element(&Value::from(-3)), "-3");
        assert_eq!(render_element(&Value::Nil), "null");
    }

    #[test]
    fn structures_print_as_json_with_refs() {
        let v = Value::Map(vec![
            (Value::from("name"), Value::from("Ada")),
            (Value::from("orders"), Ref(7).to_value()),
            (
                Value::from(1),
                Value::Array(vec![Value::F64(1.5), Value::Boolean(true)]),
            ),
            (Value::from("raw"), Value::Binary(vec![0xab, 0x01])),
            (Value::from("odd"), Value::Ext(5, vec![1])),
        ]);
        assert_eq!(
            to_json(&v),
            json!({
                "name": "Ada",
                "orders": {"$ref": 7},
                "1": [1.5, true],
                "raw": {"$bin": "ab01"},
                "odd": {"$ext": 5, "data": "01"},
            })
        );
        assert!(!render_element(&v).contains('\n'));
        assert_eq!(to_json(&Value::F64(f64::NAN)), json!("NaN"));
        assert_eq!(to_json(&Value::from(u64::MAX)), json!(u64::MAX));
    }

    #[test]
    fn dump_of_an_unreachable_server_names_it() {
        let e = read_collection("127.0.0.1:1", "c").unwrap_err();
        assert_eq!(e.kind(), "network");
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
    }
}
