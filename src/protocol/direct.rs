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
//! (value or error) is always what the generic decoder gives
//! ([`codec::decode_whole`] for requests, [`codec::decode`] for responses). Owns no I/O.
//!
//! Reading the fields straight from the bytes is not by itself the same
//! grammar: rmp-serde is more lenient than serde reading its buffered copy.
//! Read against rmp-serde 1.3.1 and serde 1.0.229, for the types of these
//! two messages they part in three places, all about the shape around a
//! value, never a leaf:
//!
//! - a sequence, tuple or struct asked of a `bin`: rmp-serde reads its bytes
//!   as a sequence of integers, the buffered copy refuses it;
//! - a field or variant name written as a `u16` or `u32` integer: rmp-serde
//!   takes it as the index, the buffered copy only a `u8` or `u64` one;
//! - an enum written as an array of one: rmp-serde reads the variant from it
//!   and the variant's value from whatever follows.
//!
//! Integers, floats, strings, byte strings, options, `rmpv::Value` and
//! ignored fields are taken and refused alike. So the walk that bounds the
//! body before decoding it (`tagged`) also checks the shape of each field:
//! an array wherever a `Vec` or tuple is read, a map with string keys
//! wherever a struct is, a map of one entry with a string key wherever an
//! enum is. Both readers take those markers alike; any other marker there
//! goes to the generic decoder. Our encoder writes exactly these, so its
//! messages stay on the direct path. The checks (`commit_field`,
//! `committed_field`) mirror `messages.rs` by hand; the retyping property
//! tests below catch a field left out.

use serde::Deserialize;

use crate::protocol::codec;
use crate::protocol::error::ProtocolError;
use crate::protocol::messages::{Request, RequestBody, Response, ResponseBody};
use crate::types::{CommitNumber, Oid};

/// Most MessagePack items (every value, key and container) a request may
/// hold. Decoding makes a tree of them, tens of bytes each on this side:
/// a 16 MiB frame of nils would be 16 M items, half a gigabyte and most of
/// a second on the event loop. A million keeps any one request to about
/// 50 MB and 50 ms.
pub const MAX_ITEMS: usize = 1 << 20;

/// Does `body` hold at most `limit` items? Counts what is there, in one
/// pass without recursion or allocation (a truncated or malformed body is
/// left to the decoder: `true`).
pub fn items_within(body: &[u8], limit: usize) -> bool {
    if body.len() <= limit {
        // Every item takes a byte at least: nothing to count (the commit
        // path never pays for the walk).
        return true;
    }
    !matches!(walk(body, limit), Walked::TooMany)
}

/// The bytes the MessagePack value at the start of `body` takes (`None`
/// if it is truncated or malformed), found without decoding it: what
/// follows it in a frame is not part of the request.
pub fn value_len(body: &[u8]) -> Option<usize> {
    match walk(body, usize::MAX) {
        Walked::Len(n) => Some(n),
        Walked::TooMany | Walked::Malformed => None,
    }
}

/// What [`walk`] found.
enum Walked {
    /// One whole value, of this many bytes.
    Len(usize),
    /// More than the limit of items.
    TooMany,
    /// Truncated, or a marker no encoder writes.
    Malformed,
}

/// Walk one value at the start of `body`, counting its items (every value,
/// map key and container) up to `limit`: one pass, without recursion or
/// allocation.
fn walk(body: &[u8], limit: usize) -> Walked {
    let mut rd = body;
    let mut pending: u64 = 1;
    let mut seen = 0usize;
    while pending > 0 {
        let Some(marker) = read_marker(&mut rd) else {
            return Walked::Malformed;
        };
        pending -= 1;
        seen += 1;
        if seen > limit {
            return Walked::TooMany;
        }
        let (skip, more) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (usize::from(marker & 0x1f), 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 | 0xca => (4, 0),
            0xcf | 0xd3 | 0xcb => (8, 0),
            0xd9 | 0xc4 => match read_len(&mut rd, 1) {
                Some(n) => (n, 0),
                None => return Walked::Malformed,
            },
            0xda | 0xc5 => match read_len(&mut rd, 2) {
                Some(n) => (n, 0),
                None => return Walked::Malformed,
            },
            0xdb | 0xc6 => match read_len(&mut rd, 4) {
                Some(n) => (n, 0),
                None => return Walked::Malformed,
            },
            0xdc => match read_len(&mut rd, 2) {
                Some(n) => (0, n as u64),
                None => return Walked::Malformed,
            },
            0xdd => match read_len(&mut rd, 4) {
                Some(n) => (0, n as u64),
                None => return Walked::Malformed,
            },
            0xde => match read_len(&mut rd, 2) {
                Some(n) => (0, 2 * n as u64),
                None => return Walked::Malformed,
            },
            0xdf => match read_len(&mut rd, 4) {
                Some(n) => (0, 2 * n as u64),
                None => return Walked::Malformed,
            },
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xc7 => match read_len(&mut rd, 1) {
                Some(n) => (n + 1, 0),
                None => return Walked::Malformed,
            },
            0xc8 => match read_len(&mut rd, 2) {
                Some(n) => (n + 1, 0),
                None => return Walked::Malformed,
            },
            0xc9 => match read_len(&mut rd, 4) {
                Some(n) => (n + 1, 0),
                None => return Walked::Malformed,
            },
            // 0xc1: never used; the decoder refuses it.
            _ => return Walked::Malformed,
        };
        match rd.get(skip..) {
            Some(rest) => rd = rest,
            None => return Walked::Malformed,
        }
        pending += more;
    }
    Walked::Len(body.len() - rd.len())
}

/// Decode a request; commits take the direct path.
pub fn decode_request(body: &[u8]) -> Result<Request, ProtocolError> {
    match direct_request(body) {
        Some(request) => Ok(request),
        None => codec::decode_whole(body),
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
            let fields = tagged(rd, b"commit", commit_field)?;
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
            let fields = tagged(rd, b"committed", committed_field)?;
            let f: CommittedFields = rmp_serde::from_slice(fields).ok()?;
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
const TOP_FIELDS: usize = 3;

/// Walk the top-level map of `body`, handing each key and the reader
/// positioned at its value to `field`, which must consume the value. `None`
/// if `body` is not exactly one map of at most [`TOP_FIELDS`] entries, a
/// key is not a string, a key repeats or `field` gives up.
fn each_top_field(
    body: &[u8],
    mut field: impl FnMut(&[u8], &mut &[u8]) -> Option<()>,
) -> Option<()> {
    let mut rd = body;
    let len = map_len(&mut rd)?;
    // The hot messages have two or three top-level fields; the length is
    // untrusted input, so it must not size an allocation.
    if len > TOP_FIELDS {
        return None;
    }
    let mut seen: Vec<&[u8]> = Vec::with_capacity(TOP_FIELDS);
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
/// whose first entry is `"type": tag`, whose keys are all strings, in
/// which no other key is `"type"` (the generic decoder refuses a repeated
/// tag; the struct would ignore it) and whose other values `field` skips.
fn tagged<'a>(
    rd: &mut &'a [u8],
    tag: &[u8],
    field: impl Fn(&[u8], &mut &[u8]) -> Option<()>,
) -> Option<&'a [u8]> {
    let start = *rd;
    let len = map_len(rd)?;
    (len > 0 && read_str(rd)? == b"type" && read_str(rd)? == tag).then_some(())?;
    for _ in 1..len {
        let key = read_str(rd)?;
        (key != b"type").then_some(())?;
        field(key, rd)?;
    }
    Some(&start[..start.len() - rd.len()])
}

/// Skip one field of a commit body, if it has the shape both readers read
/// alike (see the module doc); mirrors `CommitBody`. `token`, and any key
/// the struct ignores, read alike whatever their marker.
fn commit_field(key: &[u8], rd: &mut &[u8]) -> Option<()> {
    match key {
        // `Vec<WirePut>`, `Vec<WireNew>`: structs of leaves.
        b"puts" | b"news" => array(rd, |rd| strukt(rd, |_, rd| skip_value(rd, 2))),
        // `Vec<WireAppend>`: `coll` is a `WireRef`.
        b"appends" => array(rd, |rd| {
            strukt(rd, |key, rd| match key {
                b"coll" => enum_value(rd, 2),
                _ => skip_value(rd, 2),
            })
        }),
        // `Option<WireRef>`.
        b"set_root" => match rd.split_first() {
            Some((&NIL, rest)) => {
                *rd = rest;
                Some(())
            }
            _ => enum_value(rd, 0),
        },
        // `Vec<(String, Option<rmpv::Value>)>`.
        b"meta" => array(rd, |rd| array(rd, |rd| skip_value(rd, 2))),
        _ => skip_value(rd, 0),
    }
}

/// The same for a `committed` reply; mirrors [`CommittedFields`].
fn committed_field(key: &[u8], rd: &mut &[u8]) -> Option<()> {
    match key {
        // `Vec<(u64, Oid)>`.
        b"new_oids" => array(rd, |rd| array(rd, |rd| skip_value(rd, 2))),
        // `Vec<u64>`.
        b"positions" => array(rd, |rd| skip_value(rd, 1)),
        _ => skip_value(rd, 0),
    }
}

/// A `Vec` or tuple: an array (not a bin), each element skipped by `item`.
/// The count is untrusted, but every element consumes at least one byte.
fn array(rd: &mut &[u8], mut item: impl FnMut(&mut &[u8]) -> Option<()>) -> Option<()> {
    for _ in 0..array_len(rd)? {
        item(rd)?;
    }
    Some(())
}

/// A struct: a map (not an array, not a bin) whose keys are strings, each
/// value skipped by `field`.
fn strukt(rd: &mut &[u8], mut field: impl FnMut(&[u8], &mut &[u8]) -> Option<()>) -> Option<()> {
    for _ in 0..map_len(rd)? {
        let key = read_str(rd)?;
        field(key, rd)?;
    }
    Some(())
}

/// An enum of newtype variants (`WireRef`): a map of one entry whose key is
/// a string (not an array, not an integer).
fn enum_value(rd: &mut &[u8], depth: usize) -> Option<()> {
    (map_len(rd)? == 1).then_some(())?;
    read_str(rd)?;
    skip_value(rd, depth + 1)
}

/// The MessagePack marker of nil.
const NIL: u8 = 0xc0;

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

/// The length of the array at `rd` (`None` if it is not one), advancing
/// `rd` past its head. These small readers, rather than rmp's, keep the
/// walk cheap: it runs on every commit.
fn array_len(rd: &mut &[u8]) -> Option<usize> {
    match read_marker(rd)? {
        m @ 0x90..=0x9f => Some(usize::from(m & 0x0f)),
        0xdc => read_len(rd, 2),
        0xdd => read_len(rd, 4),
        _ => None,
    }
}

/// The length of the map at `rd` (`None` if it is not one), advancing `rd`
/// past its head.
fn map_len(rd: &mut &[u8]) -> Option<usize> {
    match read_marker(rd)? {
        m @ 0x80..=0x8f => Some(usize::from(m & 0x0f)),
        0xde => read_len(rd, 2),
        0xdf => read_len(rd, 4),
        _ => None,
    }
}

fn read_marker(rd: &mut &[u8]) -> Option<u8> {
    let (&marker, rest) = rd.split_first()?;
    *rd = rest;
    Some(marker)
}

/// A string of the message, borrowed, advancing `rd` past it.
fn read_str<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = match read_marker(rd)? {
        m @ 0xa0..=0xbf => usize::from(m & 0x1f),
        0xd9 => read_len(rd, 1)?,
        0xda => read_len(rd, 2)?,
        0xdb => read_len(rd, 4)?,
        _ => return None,
    };
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

    fn plain(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    #[test]
    fn items_are_counted_every_value_key_and_container() {
        // {"a": [1, "x", nil], "b": {"c": 1.5}}: 2 maps, 1 array, 3 keys,
        // 4 leaves.
        let v = Value::Map(vec![
            (
                Value::from("a"),
                Value::Array(vec![Value::from(1), Value::from("x"), Value::Nil]),
            ),
            (
                Value::from("b"),
                Value::Map(vec![(Value::from("c"), Value::F64(1.5))]),
            ),
        ]);
        let b = plain(&v);
        assert!(items_within(&b, 10));
        assert!(!items_within(&b, 9));
        // Leaves of every width and kind are skipped by their length.
        let leaves = Value::Array(vec![
            Value::from(u64::MAX),
            Value::from(-70000),
            Value::from("s".repeat(300)),
            Value::Binary(vec![7; 70000]),
            Value::Ext(2, vec![0; 8]),
            Value::Ext(3, vec![0; 100]),
            Value::F32(1.0),
            Value::Boolean(true),
        ]);
        assert!(items_within(&plain(&leaves), 9));
        assert!(!items_within(&plain(&leaves), 8));
    }

    #[test]
    fn a_frame_of_two_million_nils_is_over_the_limit_a_commit_is_not() {
        let mut nils = vec![0xdd];
        nils.extend_from_slice(&(2u32 << 20).to_be_bytes());
        nils.resize(nils.len() + (2 << 20), 0xc0);
        assert!(!items_within(&nils, MAX_ITEMS));
        // Declared but absent: left to the decoder, which refuses it.
        assert!(items_within(&nils[..1000], MAX_ITEMS));
        let commit = body_of(&Request {
            id: 1,
            body: RequestBody::Commit(CommitBody {
                appends: vec![WireAppend {
                    coll: WireRef::Oid(9),
                    value: Value::from("x"),
                }],
                ..Default::default()
            }),
        });
        assert!(items_within(&commit, 64));
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
        fn value_len_is_where_a_value_ends(v in value(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let one = plain(&v);
            let mut framed = one.clone();
            framed.extend_from_slice(&tail);
            prop_assert_eq!(value_len(&framed), Some(one.len()));
            // Cut short, it is no value.
            if !one.is_empty() {
                prop_assert_eq!(value_len(&one[..one.len() - 1]), None);
            }
        }

        #[test]
        fn every_commit_request_takes_the_direct_path(id: u64, commit in commit_body()) {
            // Compared with the generic decoder, not with `commit`: a
            // meta value `Some(Nil)` is sent as nil and read back as `None`.
            let body = body_of(&Request { id, body: RequestBody::Commit(commit) });
            prop_assert_eq!(direct_request(&body), Some(codec::decode_whole(&body).unwrap()));
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
            prop_assert!(same_outcome(&decode_request(&body), &codec::decode_whole(&body)));
        }

        #[test]
        fn a_damaged_committed_reply_decodes_as_the_generic_decoder_says(
            response in committed(), (at, byte, how) in damage(),
        ) {
            let body = damaged(body_of(&response), at, byte, how);
            prop_assert!(same_outcome(&decode_response(&body), &codec::decode(&body)));
        }
    }

    /// How a test writes non-negative integers: rmpv's shortest form, or
    /// one fixed width wherever the value fits. A client may write every
    /// integer as a u64; the two decoders must agree on all of these.
    #[derive(Clone, Copy, Debug)]
    enum Ints {
        Shortest,
        U16,
        U32,
        U64,
        I64,
    }

    fn ints() -> impl Strategy<Value = Ints> {
        prop::sample::select(vec![
            Ints::Shortest,
            Ints::U16,
            Ints::U32,
            Ints::U64,
            Ints::I64,
        ])
    }

    fn encode_with(v: &Value, ints: Ints, out: &mut Vec<u8>) {
        use rmp::encode as e;
        match (v, v.as_u64(), ints) {
            (_, Some(u), Ints::U16) if u <= u16::MAX as u64 => e::write_u16(out, u as u16).unwrap(),
            (_, Some(u), Ints::U32) if u <= u32::MAX as u64 => e::write_u32(out, u as u32).unwrap(),
            (_, Some(u), Ints::U64) => e::write_u64(out, u).unwrap(),
            (_, Some(u), Ints::I64) if u <= i64::MAX as u64 => e::write_i64(out, u as i64).unwrap(),
            (Value::Array(items), ..) => {
                e::write_array_len(out, items.len() as u32).unwrap();
                items.iter().for_each(|i| encode_with(i, ints, out));
            }
            (Value::Map(entries), ..) => {
                e::write_map_len(out, entries.len() as u32).unwrap();
                for (k, v) in entries {
                    encode_with(k, ints, out);
                    encode_with(v, ints, out);
                }
            }
            _ => rmpv::encode::write_value(out, v).unwrap(),
        }
    }

    fn encoded(v: &Value, ints: Ints) -> Vec<u8> {
        let mut out = Vec::new();
        encode_with(v, ints, &mut out);
        out
    }

    /// The ways to retype one node of a well-formed message that a lenient
    /// decoder might still read: the spots where rmp-serde reading the
    /// bytes and serde reading its buffered copy could part.
    const RETYPINGS: u8 = 10;

    fn retypes(v: &Value, how: u8) -> bool {
        match how {
            0 => v.is_array(),
            1 | 2 => v.is_map(),
            3 | 4 => v.as_map().is_some_and(|m| m.len() == 1),
            5 => v.as_map().is_some_and(|m| !m.is_empty()),
            6 => v.is_str(),
            7 => v.is_bin(),
            8 => v.is_number(),
            _ => !v.is_nil(),
        }
    }

    fn retype(v: &mut Value, how: u8) {
        let old = std::mem::replace(v, Value::Nil);
        *v = match (how, old) {
            // An array as a bin of the same length (its small integers
            // kept): `[5, 7]` -> bin `05 07`.
            (0, Value::Array(items)) => Value::Binary(
                items
                    .iter()
                    .map(|i| i.as_u64().map_or(0, |u| u as u8))
                    .collect(),
            ),
            (1, Value::Map(_)) => Value::Binary(vec![]),
            // A struct as the array of its fields' values.
            (2, Value::Map(m)) => Value::Array(m.into_iter().map(|(_, v)| v).collect()),
            // An enum `{variant: value}` as `[variant]` or `[variant, value]`.
            (3, Value::Map(mut m)) => Value::Array(vec![m.remove(0).0]),
            (4, Value::Map(mut m)) => {
                let (k, v) = m.remove(0);
                Value::Array(vec![k, v])
            }
            // Field names as field indices (fields are written in order).
            (5, Value::Map(m)) => Value::Map(
                m.into_iter()
                    .enumerate()
                    .map(|(i, (_, v))| (Value::from(i), v))
                    .collect(),
            ),
            (6, Value::String(s)) => Value::Binary(s.as_bytes().to_vec()),
            (7, Value::Binary(b)) => Value::Array(b.into_iter().map(Value::from).collect()),
            (8, n) => Value::F64(n.as_f64().unwrap_or(0.5)),
            _ => Value::Nil,
        }
    }

    /// Retype the `nth` node (pre-order, map keys included) that `how`
    /// applies to; false if there are not that many.
    fn retype_nth(v: &mut Value, how: u8, nth: &mut usize) -> bool {
        if retypes(v, how) {
            if *nth == 0 {
                retype(v, how);
                return true;
            }
            *nth -= 1;
        }
        match v {
            Value::Array(items) => items.iter_mut().any(|i| retype_nth(i, how, nth)),
            Value::Map(m) => m
                .iter_mut()
                .any(|(k, v)| retype_nth(k, how, nth) || retype_nth(v, how, nth)),
            _ => false,
        }
    }

    fn count_retypable(v: &Value, how: u8) -> usize {
        usize::from(retypes(v, how))
            + match v {
                Value::Array(items) => items.iter().map(|i| count_retypable(i, how)).sum(),
                Value::Map(m) => m
                    .iter()
                    .map(|(k, v)| count_retypable(k, how) + count_retypable(v, how))
                    .sum(),
                _ => 0,
            }
    }

    /// `body` with one node retyped by `how`, written with `ints`; `None`
    /// if no node of `body` can be retyped that way.
    fn retyped(body: &[u8], how: u8, pick: usize, ints: Ints) -> Option<Vec<u8>> {
        let mut v = rmpv::decode::read_value(&mut &body[..]).unwrap();
        let count = count_retypable(&v, how);
        (count > 0).then_some(())?;
        assert!(retype_nth(&mut v, how, &mut (pick % count)));
        Some(encoded(&v, ints))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, .. ProptestConfig::default() })]

        #[test]
        fn a_commit_request_with_any_integer_widths_takes_the_direct_path(
            id: u64, commit in commit_body(), ints in ints(),
        ) {
            let body = body_of(&Request { id, body: RequestBody::Commit(commit) });
            let v = rmpv::decode::read_value(&mut &body[..]).unwrap();
            let body = encoded(&v, ints);
            prop_assert_eq!(direct_request(&body), Some(codec::decode_whole(&body).unwrap()));
        }

        #[test]
        fn a_committed_reply_with_any_integer_widths_takes_the_direct_path(
            response in committed(), ints in ints(),
        ) {
            let v = rmpv::decode::read_value(&mut &body_of(&response)[..]).unwrap();
            let body = encoded(&v, ints);
            prop_assert_eq!(direct_response(&body), Some(codec::decode(&body).unwrap()));
        }

        #[test]
        fn a_retyped_commit_request_decodes_as_the_generic_decoder_says(
            id: u64, commit in commit_body(), how in 0..RETYPINGS, pick: usize, ints in ints(),
        ) {
            let request = Request { id, body: RequestBody::Commit(commit) };
            if let Some(body) = retyped(&body_of(&request), how, pick, ints) {
                let (direct, generic) = (decode_request(&body), codec::decode_whole(&body));
                prop_assert!(same_outcome(&direct, &generic), "{:?} vs {:?}", direct, generic);
            }
        }

        #[test]
        fn a_retyped_committed_reply_decodes_as_the_generic_decoder_says(
            response in committed(), how in 0..RETYPINGS, pick: usize, ints in ints(),
        ) {
            if let Some(body) = retyped(&body_of(&response), how, pick, ints) {
                let (direct, generic) = (decode_response(&body), codec::decode(&body));
                prop_assert!(same_outcome(&direct, &generic), "{:?} vs {:?}", direct, generic);
            }
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    /// The reviewer's frame: a commit whose `puts` is an empty bin. rmp-serde
    /// reads a bin as a sequence when asked for one; serde's buffered copy
    /// of the body does not.
    #[test]
    fn a_bin_for_the_puts_is_refused_as_the_generic_decoder_refuses_it() {
        let body = hex(
            "82 a2 69 64 01 a4 62 6f 64 79 83 a4 74 79 70 65 a6 63 6f 6d 6d 69 74 \
             a4 70 75 74 73 c4 00 a7 61 70 70 65 6e 64 73 91 82 a4 63 6f 6c 6c 81 \
             a3 6f 69 64 07 a5 76 61 6c 75 65 a1 78",
        );
        let generic = codec::decode_whole::<Request>(&body);
        assert!(generic.is_err(), "{generic:?}");
        assert_eq!(direct_request(&body), None);
        assert!(same_outcome(&decode_request(&body), &generic));
    }

    fn coll(variant: Value) -> Value {
        Value::Map(vec![(variant, Value::from(5))])
    }

    fn append_with(coll: Value, value_key: Value) -> Value {
        Value::Array(vec![Value::Map(vec![
            (Value::from("coll"), coll),
            (value_key, Value::from("x")),
        ])])
    }

    /// Each field of a commit body, ill-typed in each way rmp-serde
    /// forgives; the outcome must be the generic decoder's, value or error.
    #[test]
    fn ill_typed_commit_fields_decode_as_the_generic_decoder_says() {
        let bin0 = || Value::Binary(vec![]);
        let oid = || Value::from("oid");
        let cases: Vec<(&str, Value, Ints)> = vec![
            ("puts", bin0(), Ints::Shortest),
            ("news", bin0(), Ints::Shortest),
            ("appends", bin0(), Ints::Shortest),
            ("meta", bin0(), Ints::Shortest),
            ("meta", Value::Array(vec![bin0()]), Ints::Shortest),
            ("appends", Value::Array(vec![bin0()]), Ints::Shortest),
            // An enum as an array: `[variant, value]`, and `[variant]`
            // followed by a value rmp-serde takes for the variant's.
            (
                "appends",
                append_with(Value::Array(vec![oid(), 5.into()]), "value".into()),
                Ints::Shortest,
            ),
            (
                "set_root",
                Value::Array(vec![oid(), 5.into()]),
                Ints::Shortest,
            ),
            ("set_root", Value::Array(vec![oid()]), Ints::Shortest),
            // Field and variant names as indices, in each integer width.
            (
                "appends",
                append_with(coll(0.into()), "value".into()),
                Ints::Shortest,
            ),
            (
                "appends",
                append_with(coll(0.into()), "value".into()),
                Ints::U16,
            ),
            (
                "appends",
                append_with(coll(0.into()), "value".into()),
                Ints::U32,
            ),
            (
                "appends",
                append_with(coll(0.into()), "value".into()),
                Ints::U64,
            ),
            (
                "appends",
                append_with(coll(oid()), 1.into()),
                Ints::Shortest,
            ),
            ("appends", append_with(coll(oid()), 1.into()), Ints::U16),
            ("appends", append_with(coll(oid()), 1.into()), Ints::U32),
            ("appends", append_with(coll(oid()), 1.into()), Ints::U64),
            ("appends", append_with(coll(oid()), 1.into()), Ints::I64),
            // Names as bins, a struct as an array, a string as a bin.
            (
                "appends",
                append_with(
                    coll(Value::Binary(b"oid".to_vec())),
                    Value::Binary(b"value".to_vec()),
                ),
                Ints::Shortest,
            ),
            (
                "appends",
                Value::Array(vec![Value::Array(vec![coll(oid()), "x".into()])]),
                Ints::Shortest,
            ),
            (
                "puts",
                Value::Array(vec![Value::Map(vec![
                    ("oid".into(), 1.into()),
                    ("expected_version".into(), 0.into()),
                    ("class".into(), Value::Binary(b"c".to_vec())),
                    ("value".into(), Value::Ext(1, vec![0; 8])),
                ])]),
                Ints::Shortest,
            ),
            (
                "meta",
                Value::Array(vec![Value::Array(vec![
                    Value::Binary(b"k".to_vec()),
                    Value::F32(1.5),
                ])]),
                Ints::Shortest,
            ),
            // Integers as floats, tokens of each kind.
            (
                "set_root",
                Value::Map(vec![(oid(), Value::F64(5.0))]),
                Ints::Shortest,
            ),
            ("set_root", coll(Value::F64(0.0)), Ints::Shortest),
            ("token", Value::from("abc"), Ints::Shortest),
            (
                "token",
                Value::Array(vec![1.into(), 300.into()]),
                Ints::Shortest,
            ),
            ("token", Value::Array(vec![1.into(), 2.into()]), Ints::U16),
            ("token", 7.into(), Ints::Shortest),
        ];
        let mut parted = Vec::new();
        for (field, value, ints) in cases {
            let mut entries = vec![("type", Value::from("commit")), (field, value.clone())];
            if field != "appends" {
                entries.push(one_append());
            }
            let v = rmpv::decode::read_value(&mut &commit_map(entries, None)[..]).unwrap();
            let body = encoded(&v, ints);
            let (direct, generic) = (decode_request(&body), codec::decode_whole::<Request>(&body));
            if !same_outcome(&direct, &generic) {
                parted.push(format!(
                    "{field}: {value} ({ints:?}): {direct:?} vs {generic:?}"
                ));
            }
        }
        assert!(parted.is_empty(), "{parted:#?}");
    }

    /// The same for the fields of a `committed` reply.
    #[test]
    fn ill_typed_committed_fields_decode_as_the_generic_decoder_says() {
        let cases: Vec<(&str, Value)> = vec![
            ("new_oids", Value::Binary(vec![])),
            ("new_oids", Value::Array(vec![Value::Binary(vec![3, 9])])),
            ("positions", Value::Binary(vec![])),
            ("positions", Value::Binary(vec![4, 5, 6])),
            ("positions", Value::Array(vec![Value::F64(4.0)])),
            ("number", Value::F64(4.0)),
        ];
        let mut parted = Vec::new();
        for (field, value) in cases {
            let mut fields = vec![
                (Value::from("type"), Value::from("committed")),
                ("number".into(), 9.into()),
                ("new_oids".into(), Value::Array(vec![])),
                ("positions".into(), Value::Array(vec![4.into()])),
            ];
            fields
                .iter_mut()
                .find(|(k, _)| k.as_str() == Some(field))
                .unwrap()
                .1 = value.clone();
            let top = Value::Map(vec![
                ("id".into(), 7.into()),
                ("commit".into(), 9.into()),
                ("body".into(), Value::Map(fields)),
            ]);
            let body = encoded(&top, Ints::Shortest);
            let (direct, generic) = (decode_response(&body), codec::decode::<Response>(&body));
            if !same_outcome(&direct, &generic) {
                parted.push(format!("{field}: {value}: {direct:?} vs {generic:?}"));
            }
        }
        assert!(parted.is_empty(), "{parted:#?}");
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
        assert_eq!(request, codec::decode_whole::<Request>(&body).unwrap());
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
        let (direct, generic) = (decode_request(&body), codec::decode_whole::<Request>(&body));
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
        assert!(same_outcome(
            &decode_request(&body),
            &codec::decode_whole(&body)
        ));
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
            codec::decode_whole(&body).unwrap()
        );
    }
}
