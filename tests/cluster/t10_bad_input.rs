//! Bad input gets a clear, typed error and loses nothing: the server keeps
//! serving every other connection.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use magma::protocol::codec::{decode, encode, read_frame};
use magma::protocol::PROTOCOL_VERSION;
use magma::protocol::{
    CommitBody, Request, RequestBody, Response, ResponseBody, SessionRole, WireError, WireNew,
};

use crate::harness::{Cluster, Flood};
use crate::phase;

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn hello(role: SessionRole, version: u32) -> Request {
    Request {
        id: 1,
        body: RequestBody::Hello {
            protocol_version: version,
            role,
            client_name: "bad-input-test".into(),
        },
    }
}

fn response(s: &mut TcpStream) -> Response {
    let body = read_frame(s, 1 << 24).expect("a response frame");
    decode(&body).expect("a decodable response")
}

fn error_of(r: &Response) -> &WireError {
    match &r.body {
        ResponseBody::Error { error, .. } => error,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// After an error that ends the connection, the server closes it.
fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
}

#[test]
fn t10_bad_frames_get_typed_errors_and_others_keep_being_served() {
    let mut c = Cluster::new();
    let s = c.add_server("s1", &["--max-frame", "65536"]);
    c.servers[s].start();
    let addr = c.servers[s].addr.clone();
    let dir = c.root.path().to_path_buf();

    phase!("a flooding client keeps committing throughout");
    let mut flood = Flood::start(&dir, &[addr.as_str()], "steady", &["--count", "400"]);

    phase!("garbage body");
    let mut g = connect(&addr);
    g.write_all(&[0, 0, 0, 6, 0xc1, 0xc1, 0xff, 0x00, 0x13, 0x37])
        .unwrap();
    let r = response(&mut g);
    assert!(
        matches!(error_of(&r), WireError::BadRequest { .. }),
        "{r:?}"
    );
    assert_closed(&mut g);

    phase!("oversized length prefix");
    let mut o = connect(&addr);
    o.write_all(&[0x7f, 0xff, 0xff, 0xff]).unwrap();
    let r = response(&mut o);
    match error_of(&r) {
        WireError::FrameTooLarge { size, limit } => {
            assert_eq!(*size, 0x7fff_ffff);
            assert_eq!(*limit, 65536);
        }
        other => panic!("expected frame_too_large, got {other:?}"),
    }
    assert_closed(&mut o);

    phase!("truncated frame, then the client goes away");
    let mut t = connect(&addr);
    t.write_all(&[0, 0, 1, 0, 1, 2, 3]).unwrap();
    t.shutdown(Shutdown::Write).unwrap();
    assert_closed(&mut t);

    phase!("a request before the hello");
    let mut n = connect(&addr);
    n.write_all(&encode(&Request {
        id: 5,
        body: RequestBody::Ping,
    }))
    .unwrap();
    let r = response(&mut n);
    assert!(matches!(error_of(&r), WireError::HelloExpected), "{r:?}");

    phase!("wrong protocol version");
    let mut v = connect(&addr);
    v.write_all(&encode(&hello(SessionRole::Application, 99)))
        .unwrap();
    let r = response(&mut v);
    match error_of(&r) {
        WireError::UnsupportedProtocol {
            requested,
            supported,
        } => assert_eq!((*requested, *supported), (99, PROTOCOL_VERSION)),
        other => panic!("expected unsupported_protocol, got {other:?}"),
    }
    assert_closed(&mut v);

    phase!("an unknown message type");
    let mut u = connect(&addr);
    u.write_all(&encode(&hello(SessionRole::Application, PROTOCOL_VERSION)))
        .unwrap();
    assert!(matches!(response(&mut u).body, ResponseBody::Hello { .. }));
    let unknown = rmpv::Value::Map(vec![
        ("id".into(), 2.into()),
        (
            "body".into(),
            rmpv::Value::Map(vec![("type".into(), "frobnicate".into())]),
        ),
    ]);
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &unknown).unwrap();
    let mut frame = (bytes.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&bytes);
    u.write_all(&frame).unwrap();
    let r = response(&mut u);
    assert!(
        matches!(error_of(&r), WireError::BadRequest { .. }),
        "{r:?}"
    );
    assert_closed(&mut u);

    phase!("an admin request on an application session is refused, the session stays usable");
    let mut a = connect(&addr);
    a.write_all(&encode(&hello(SessionRole::Application, PROTOCOL_VERSION)))
        .unwrap();
    assert!(matches!(response(&mut a).body, ResponseBody::Hello { .. }));
    a.write_all(&encode(&Request {
        id: 7,
        body: RequestBody::Shutdown { save: false },
    }))
    .unwrap();
    let r = response(&mut a);
    assert_eq!(r.id, 7);
    assert!(matches!(error_of(&r), WireError::NotAdmin), "{r:?}");
    a.write_all(&encode(&Request {
        id: 8,
        body: RequestBody::Ping,
    }))
    .unwrap();
    let r = response(&mut a);
    assert_eq!((r.id, &r.body), (8, &ResponseBody::Pong));

    phase!("the flooding client never noticed");
    let end = flood.wait(Duration::from_secs(120));
    assert!(end.status.success(), "flood failed: {}", end.stderr);
    assert_eq!(flood.acked().len(), 400);
    assert!(c.servers[s].is_running());
}

#[test]
fn t10_a_client_that_stops_reading_holds_a_bounded_amount_of_server_memory() {
    let mut c = Cluster::new();
    let s = c.add_server("s1", &[]);
    c.servers[s].start();
    let addr = c.servers[s].addr.clone();

    phase!("a 2 MiB object, read once so the server's buffers are warm");
    let mut a = connect(&addr);
    a.write_all(&encode(&hello(SessionRole::Application, PROTOCOL_VERSION)))
        .unwrap();
    assert!(matches!(response(&mut a).body, ResponseBody::Hello { .. }));
    let blob = "x".repeat(2 << 20);
    a.write_all(&encode(&Request {
        id: 2,
        body: RequestBody::Commit(CommitBody {
            news: vec![WireNew {
                temp_id: 1,
                class: "Blob".into(),
                value: rmpv::Value::from(blob.as_str()),
            }],
            ..CommitBody::default()
        }),
    }))
    .unwrap();
    let oid = match response(&mut a).body {
        ResponseBody::Committed { new_oids, .. } => new_oids[0].1,
        other => panic!("commit: {other:?}"),
    };
    let read = |id: u64| Request {
        id,
        body: RequestBody::Read {
            oid,
            depth: 0,
            required_progress: None,
        },
    };
    a.write_all(&encode(&read(3))).unwrap();
    assert!(matches!(
        response(&mut a).body,
        ResponseBody::Objects { .. }
    ));
    let before = c.servers[s].resident_bytes();

    phase!("200 reads of it sent, no reply read: 400 MiB of replies");
    let mut r = connect(&addr);
    r.write_all(&encode(&hello(SessionRole::Application, PROTOCOL_VERSION)))
        .unwrap();
    assert!(matches!(response(&mut r).body, ResponseBody::Hello { .. }));
    let requests: Vec<u8> = (0..200).flat_map(|i| encode(&read(100 + i))).collect();
    r.write_all(&requests).unwrap();

    // The server queues replies up to its byte budget (8 MiB), then stops
    // reading this client: its memory settles far below what queueing by
    // count alone (32 replies, 64 MiB) would take. Settled: one second
    // without a change of more than 1 MiB.
    let bound = 40 << 20;
    let (mut last, mut still) = (before, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while still < 10 {
        assert!(Instant::now() < deadline, "server memory never settled");
        std::thread::sleep(Duration::from_millis(100));
        let now = c.servers[s].resident_bytes();
        assert!(
            now.saturating_sub(before) < bound,
            "a client that reads nothing made the server hold {} MiB more",
            (now - before) >> 20
        );
        still = if now.abs_diff(last) < 1 << 20 {
            still + 1
        } else {
            0
        };
        last = now;
    }

    phase!("others are served meanwhile; the reader then gets every reply, in order");
    a.write_all(&encode(&Request {
        id: 4,
        body: RequestBody::Ping,
    }))
    .unwrap();
    assert_eq!(response(&mut a).body, ResponseBody::Pong);
    for i in 0..200 {
        let reply = response(&mut r);
        assert_eq!(reply.id, 100 + i);
        match reply.body {
            ResponseBody::Objects { objects } => assert_eq!(objects[0].oid, oid),
            other => panic!("read {i}: {other:?}"),
        }
    }
}
