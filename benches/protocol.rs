//! Decoding the hot messages: a one-append commit request (what every
//! `magma bench` client sends) and its `committed` reply, through serde's
//! generic path for internally tagged enums and through
//! `magma::protocol::direct`. Both decoders run on the 2 cores that the
//! server and its clients share, once per commit.
//!
//! `cargo bench --bench protocol` (criterion; it prints the median time per
//! decode with its confidence interval).

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

use magma::protocol::codec;
use magma::protocol::direct::{decode_request, decode_response};
use magma::protocol::{
    CommitBody, ProtocolError, Request, RequestBody, Response, ResponseBody, WireAppend, WireRef,
};

fn decoding(c: &mut Criterion) {
    // The shape `magma bench` sends: a 16-byte token, one string appended.
    let request = codec::encode(&Request {
        id: 42,
        body: RequestBody::Commit(CommitBody {
            token: Some(vec![7u8; 16]),
            appends: vec![WireAppend {
                coll: WireRef::Oid(12_345),
                value: rmpv::Value::from("bench-3 000000000042"),
            }],
            ..CommitBody::default()
        }),
    });
    let reply = codec::encode(&Response {
        id: 42,
        commit: 99_999,
        body: ResponseBody::Committed {
            number: 99_999,
            new_oids: vec![],
            positions: vec![77_777],
        },
    });
    let (request, reply) = (&request[4..], &reply[4..]);
    assert_eq!(
        decode_request(request).unwrap(),
        codec::decode::<Request>(request).unwrap()
    );

    compare(
        c,
        "commit request",
        request,
        codec::decode::<Request>,
        decode_request,
    );
    compare(
        c,
        "committed reply",
        reply,
        codec::decode::<Response>,
        decode_response,
    );
}

/// One criterion group: the generic decoder against the direct one.
fn compare<T>(
    c: &mut Criterion,
    name: &str,
    body: &[u8],
    generic: fn(&[u8]) -> Result<T, ProtocolError>,
    direct: fn(&[u8]) -> Result<T, ProtocolError>,
) {
    let mut g = c.benchmark_group(name);
    g.bench_function("generic", |b| b.iter(|| generic(black_box(body)).unwrap()));
    g.bench_function("direct", |b| b.iter(|| direct(black_box(body)).unwrap()));
    g.finish();
}

criterion_group!(benches, decoding);
criterion_main!(benches);
