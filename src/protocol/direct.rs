//! Direct decoding of the hot messages: a request carrying a commit, and a
//! response carrying its outcome.
//!
//! Serde decodes an internally tagged enum (`"type"` inside the map) by
//! first copying the whole map into a private buffer, then finding the
//! variant in it: about 1 µs for a one-append commit request, 0.5 µs for
//! its `committed` reply, on every commit of every client and server. Our
//! own encoder (and any library that keeps field order) writes `"type"`
//! first, so these decoders look at the first entry of the body map and,
//! when it names the hot variant, decode the fields straight from the
//! bytes (the struct ignores the `"type"` entry as an unknown field).
//!
//! They are shortcuts, never a second grammar: any message they do not
//! recognise — another variant, `"type"` not first, extra top-level keys,
//! a field they cannot read — goes to the generic decoder, so the result
//! (value or error) is always what [`codec::decode`] gives. Owns no I/O.

use serde::Deserialize;

use crate::protocol::codec;
use crate::protocol::error::ProtocolError;
use crate::protocol::messages::{Request, RequestBody, Response, ResponseBody};
use crate::types::{CommitNumber, Oid};

/// Decode a request; commits take the direct path.
pub fn decode_request(body: &[u8]) -> Result<Request, ProtocolError> {
    match direct_request(body) {
        Some(request) => Ok(request),
        None => codec::decode(body),
    }
}

/// Decode a response; `committed` replies take the direct path.
pub fn decode_response(body: &[u8]) -> Result<Response, ProtocolError> {
    match direct_response(body) {
        Some(response) => Ok(response),
        None => codec::decode(body),
    }
}

/// The fields of `ResponseBody::Committed`, decoded on their own.
#[derive(Deserialize)]
struct CommittedFields {
    number: CommitNumber,
    new_oids: Vec<(u64, Oid)>,
    positions: Vec<u64>,
}

fn direct_request(body: &[u8]) -> Option<Request> {
    let mut id = None;
    let mut request_body = None;
    each_top_field(body, |key, rd| match key {
        b"id" => {
            id = Some(rmp::decode::read_int(rd).ok()?);
            Some(())
        }
        b"body" => {
            let fields = tagged(rd, b"commit")?;
            request_body = Some(RequestBody::Commit(rmp_serde::from_slice(fields).ok()?));
            Some(())
        }
        _ => None,
    })?;
    Some(Request {
        id: id?,
        body: request_body?,
    })
}

fn direct_response(body: &[u8]) -> Option<Response> {
    let (mut id, mut commit, mut response_body) = (None, None, None);
    each_top_field(body, |key, rd| match key {
        b"id" => {
            id = Some(rmp::decode::read_int(rd).ok()?);
            Some(())
        }
        b"commit" => {
            commit = Some(rmp::decode::read_int(rd).ok()?);
            Some(())
        }
        b"body" => {
            let f: CommittedFields = rmp_serde::from_slice(tagged(rd, b"committed")?).ok()?;
            response_body = Some(ResponseBody::Committed {
                number: f.number,
                new_oids: f.new_oids,
                positions: f.positions,
            });
            Some(())
        }
        _ => None,
    })?;
    Some(Response {
        id: id?,
        commit: commit?,
        body: response_body?,
    })
}

/// The most top-level fields a hot message has (`id`, `commit`, `body`).
const TOP_FIELDS: u32 = 3;

/// Walk the top-level map of `body`, handing each key and the reader
/// positioned at its value to `field`, which must consume the value. `None`
/// if `body` is not exactly one map of at most [`TOP_FIELDS`] entries, a
/// key is not a string, a key repeats or `field` gives up.
fn each_top_field(
    body: &[u8],
    mut field: impl FnMut(&[u8], &mut &[u8]) -> Option<()>,
) -> Option<()> {
    let mut rd = body;
    let len = rmp::decode::read_map_len(&mut rd).ok()?;
    // The hot messages have two or three top-level fields; the length is
    // untrusted input, so it must not size an allocation.
    if len > TOP_FIELDS {
        return None;
    }
    let mut seen: Vec<&[u8]> = Vec::with_capacity(TOP_FIELDS as usize);
    for _ in 0..len {
        let key = read_str(&mut rd)?;
        if seen.contains(&key) {
            return None;
        }
        seen.push(key);
        field(key, &mut rd)?;
    }
    rd.is_empty().then_some(())
}

/// The bytes of the value at `rd`, advancing `rd` past it, if it is a map
/// whose first entry is `"type": tag`, whose keys are all strings and in
/// which no other key is `"type"` (the generic decoder refuses a repeated
/// tag; the struct would ignore it).
fn tagged<'a>(rd: &mut &'a [u8], tag: &[u8]) -> Option<&'a [u8]> {
    let start = *rd;
    let len = rmp::decode::read_map_len(rd).ok()?;
    (len > 0 && read_str(rd)? == b"type" && read_str(rd)? == tag).then_some(())?;
    for _ in 1..len {
        (read_str(rd)? != b"type").then_some(())?;
        skip_value(rd, 0)?;
    }
    Some(&start[..start.len() - rd.len()])
}

/// Nesting deeper than this is left to the generic decoder (which has its
/// own limit), so a hostile frame cannot exhaust the stack here.
const MAX_DEPTH: usize = 32;

/// Advance `rd` past one MessagePack value without decoding it.
fn skip_value(rd: &mut &[u8], depth: usize) -> Option<()> {
    use rmp::Marker::*;
    if depth > MAX_DEPTH {
        return None;
    }
    // (bytes to skip, values to skip)
    let (bytes, values) = match rmp::decode::read_marker(rd).ok()? {
        FixPos(_) | FixNeg(_) | Null | True | False => (0, 0),
        U8 | I8 => (1, 0),
        U16 | I16 => (2, 0),
        U32 | I32 | F32 => (4, 0),
        U64 | I64 | F64 => (8, 0),
        FixStr(n) => (n as usize, 0),
        Str8 | Bin8 => (read_len(rd, 1)?, 0),
        Str16 | Bin16 => (read_len(rd, 2)?, 0),
        Str32 | Bin32 => (read_len(rd, 4)?, 0),
        FixArray(n) => (0, n as usize),
        Array16 => (0, read_len(rd, 2)?),
        Array32 => (0, read_len(rd, 4)?),
        FixMap(n) => (0, 2 * n as usize),
        Map16 => (0, 2 * read_len(rd, 2)?),
        Map32 => (0, 2 * read_len(rd, 4)?),
        FixExt1 => (2, 0),
        FixExt2 => (3, 0),
        FixExt4 => (5, 0),
        FixExt8 => (9, 0),
        FixExt16 => (17, 0),
        Ext8 => (read_len(rd, 1)? + 1, 0),
        Ext16 => (read_len(rd, 2)? + 1, 0),
        Ext32 => (read_len(rd, 4)? + 1, 0),
        Reserved => return None,
    };
    *rd = rd.get(bytes..)?;
    for _ in 0..values {
        skip_value(rd, depth + 1)?;
    }
    Some(())
}

/// A big-endian length of `n` bytes, advancing `rd` past it.
fn read_len(rd: &mut &[u8], n: usize) -> Option<usize> {
    let (b, rest) = (rd.get(..n)?, rd.get(n..)?);
    *rd = rest;
    Some(b.iter().fold(0usize, |acc, &x| acc << 8 | x as usize))
}

/// A string of the message, borrowed, advancing `rd` past it.
fn read_str<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = rmp::decode::read_str_len(rd).ok()? as usize;
    let (s, rest) = (rd.get(..len)?, rd.get(len..)?);
    *rd = rest;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::messages::{CommitBody, WireAppend, WireNew, WirePut, WireRef};
    use proptest::prelude::*;
    use rmpv::Value;

    fn body_of<T: serde::Serialize>(msg: &T) -> Vec<u8> {
        codec::encode(msg)[4..].to_vec()
    }

    /// Both decoders give the same value, or the same error.
    fn same_outcome<T: std::fmt::Debug>(
        a: &Result<T, ProtocolError>,
        b: &Result<T, ProtocolError>,
    ) -> bool {
        // Debug, not PartialEq: a NaN read from mutated bytes is still the
        // same value.
        match (a, b) {
            (Ok(x), Ok(y)) => format!("{x:?}") == format!("{y:?}"),
            (Err(x), Err(y)) => x.to_string() == y.to_string(),
            _ => false,
        }
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e9..1e9f64).prop_map(Value::from),
            "[a-z ]{0,12}".prop_map(Value::from),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(Value::from),
            (1i8..3, any::<u64>()).prop_map(|(t, n)| Value::Ext(t, n.to_be_bytes().to_vec())),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec(("[a-z]{1,6}".prop_map(Value::from), inner), 0..4)
                    .prop_map(Value::Map),
            ]
        })
    }

    fn wire_ref() -> impl Strategy<Value = WireRef> {
        prop_oneof![
            any::<u64>().prop_map(WireRef::Oid),
            any::<u64>().prop_map(WireRef::New)
        ]
    }

    fn commit_body() -> impl Strategy<Value = CommitBody> {
        let put = (any::<u64>(), any::<u64>(), "[a-z]{0,8}", value()).prop_map(
            |(oid, expected_version, class, value)| WirePut {
                oid,
                expected_version,
                class,
                value,
            },
        );
        let new =
            (any::<u64>(), "[a-z]{0,8}", value()).prop_map(|(temp_id, class, value)| WireNew {
                temp_id,
                class,
                value,
            });
        let append = (wire_ref(), value()).prop_map(|(coll, value)| WireAppend { coll, value });
        let meta = ("[a-z]{1,8}", proptest::option::of(value()));
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
            proptest::collection::vec(put, 0..2),
            proptest::collection::vec(new, 0..2),
            proptest::collection::vec(append, 0..3),
            proptest::option::of(wire_ref()),
            proptest::collection::vec(meta, 0..2),
        )
            .prop_map(|(token, puts, news, appends, set_root, meta)| CommitBody {
                token,
                puts,
                news,
                appends,
                set_root,
                meta,
            })
    }

    fn committed() -> impl Strategy<Value = Response> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..3),
            proptest::collection::vec(any::<u64>(), 0..3),
        )
            .prop_map(|(id, commit, number, new_oids, positions)| Response {
                id,
                commit,
                body: ResponseBody::Committed {
                    number,
                    new_oids,
                    positions,
                },
            })
    }

    /// Where and with what to damage a body: often near the start (the
    /// headers) and often with a length-carrying marker (map/array/str/bin
    /// 32), the bytes that make a decoder trust a huge count.
    fn damage() -> impl Strategy<Value = (usize, u8, u8)> {
        let at = prop_oneof![0..8usize, any::<usize>()];
        let byte = prop_oneof![
            any::<u8>(),
            prop::sample::select(vec![0xdf, 0xdd, 0xdb, 0xc6])
        ];
        (at, byte, any::<u8>())
    }

    /// Damage one frame body: overwrite a byte, cut it short, or insert one.
    fn damaged(mut body: Vec<u8>, at: usize, byte: u8, how: u8) -> Vec<u8> {
        let at = at % (body.len() + 1);
        match how % 3 {
            0 if at < body.len() => body[at] = byte,
            1 => body.truncate(at),
            _ => body.insert(at, byte),
        }
        body
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        #[test]
        fn every_commit_request_takes_the_direct_path(id: u64, commit in commit_body()) {
            // Compared with the generic decoder, not with `commit`: a
            // meta value `Some(Nil)` is sent as nil and read back as `None`.
            let body = body_of(&Request { id, body: RequestBody::Commit(commit) });
            prop_assert_eq!(direct_request(&body), Some(codec::decode(&body).unwrap()));
        }

        #[test]
        fn every_committed_reply_takes_the_direct_path(response in committed()) {
            let body = body_of(&response);
            prop_assert_eq!(direct_response(&body), Some(codec::decode(&body).unwrap()));
        }

        #[test]
        fn a_damaged_commit_request_decodes_as_the_generic_decoder_says(
            id: u64, commit in commit_body(), (at, byte, how) in damage(),
        ) {
            let request = Request { id, body: RequestBody::Commit(commit) };
            let body = damaged(body_of(&request), at, byte, how);
            prop_assert!(same_outcome(&decode_request(&body), &codec::decode(&body)));
        }

        #[test]
        fn a_damaged_committed_reply_decodes_as_the_generic_decoder_says(
            response in committed(), (at, byte, how) in damage(),
        ) {
            let body = damaged(body_of(&response), at, byte, how);
            prop_assert!(same_outcome(&decode_response(&body), &codec::decode(&body)));
        }
    }

    /// A commit request written by hand, entries in the order given.
    fn commit_map(body_entries: Vec<(&str, Value)>, top_extra: Option<(&str, Value)>) -> Vec<u8> {
        let body = Value::Map(
            body_entries
                .into_iter()
                .map(|(k, v)| (Value::from(k), v))
                .collect(),
        );
        let mut top = vec![
            (Value::from("id"), Value::from(7)),
            (Value::from("body"), body),
        ];
        top.extend(top_extra.map(|(k, v)| (Value::from(k), v)));
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &Value::Map(top)).unwrap();
        out
    }

    fn one_append() -> (&'static str, Value) {
        let append = Value::Map(vec![
            (
                Value::from("coll"),
                Value::Map(vec![(Value::from("oid"), Value::from(5))]),
            ),
            (Value::from("value"), Value::from("x")),
        ]);
        ("appends", Value::Array(vec![append]))
    }

    #[test]
    fn a_tag_that_is_not_first_takes_the_generic_path_to_the_same_request() {
        let body = commit_map(vec![one_append(), ("type", Value::from("commit"))], None);
        assert_eq!(direct_request(&body), None);
        let request = decode_request(&body).unwrap();
        assert_eq!(request, codec::decode::<Request>(&body).unwrap());
        assert!(matches!(request.body, RequestBody::Commit(c) if c.appends.len() == 1));
    }

    #[test]
    fn a_repeated_tag_is_refused_as_the_generic_decoder_refuses_it() {
        let body = commit_map(
            vec![
                ("type", Value::from("commit")),
                one_append(),
                ("type", Value::from("ping")),
            ],
            None,
        );
        assert_eq!(direct_request(&body), None);
        let (direct, generic) = (decode_request(&body), codec::decode::<Request>(&body));
        assert!(generic.is_err(), "{generic:?}");
        assert!(same_outcome(&direct, &generic));
    }

    #[test]
    fn an_unknown_top_level_key_takes_the_generic_path() {
        let body = commit_map(
            vec![("type", Value::from("commit")), one_append()],
            Some(("trace", Value::from("abc"))),
        );
        assert_eq!(direct_request(&body), None);
        assert!(same_outcome(&decode_request(&body), &codec::decode(&body)));
        assert!(decode_request(&body).is_ok());
    }

    #[test]
    fn other_requests_and_replies_take_the_generic_path() {
        let ping = body_of(&Request {
            id: 3,
            body: RequestBody::Ping,
        });
        assert_eq!(direct_request(&ping), None);
        assert_eq!(decode_request(&ping).unwrap().body, RequestBody::Ping);
        let pong = body_of(&Response {
            id: 3,
            commit: 9,
            body: ResponseBody::Pong,
        });
        assert_eq!(direct_response(&pong), None);
        assert_eq!(decode_response(&pong).unwrap().body, ResponseBody::Pong);
    }

    #[test]
    fn deep_nesting_is_left_to_the_generic_decoder() {
        let mut deep = Value::from(1);
        for _ in 0..(MAX_DEPTH + 8) {
            deep = Value::Array(vec![deep]);
        }
        let body = body_of(&Request {
            id: 1,
            body: RequestBody::Commit(CommitBody {
                appends: vec![WireAppend {
                    coll: WireRef::Oid(5),
                    value: deep,
                }],
                ..CommitBody::default()
            }),
        });
        assert_eq!(direct_request(&body), None);
        assert_eq!(
            decode_request(&body).unwrap(),
            codec::decode(&body).unwrap()
        );
    }
}
