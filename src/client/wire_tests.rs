//! Checks of the wire encoding that `docs/PROTOCOL.md` documents: each claim
//! the document makes about bytes is asserted here, both ways (what this
//! crate sends, and what it accepts from a client built from the document).

use rmpv::Value;

use crate::protocol::codec;
use crate::protocol::*;
use crate::types::{Epoch, Member, MemberRole, Node};

/// The body of the frame `msg` encodes to, as a MessagePack value.
fn wire(msg: &impl serde::Serialize) -> Value {
    let frame = codec::encode(msg);
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4, "prefix is the body length");
    rmpv::decode::read_value(&mut &frame[4..]).unwrap()
}

fn map(entries: &[(&str, Value)]) -> Value {
    Value::Map(
        entries
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    )
}

/// Decode a hand-built value as another client would send it.
fn from_wire<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ProtocolError> {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, v).unwrap();
    codec::decode(&bytes)
}

fn ext(tag: i8, n: u64) -> Value {
    Value::Ext(tag, n.to_be_bytes().to_vec())
}

#[test]
fn ping_frame_bytes() {
    let frame = codec::encode(&Request {
        id: 1,
        body: RequestBody::Ping,
    });
    let mut expected = vec![0, 0, 0, 0x15, 0x82, 0xa2, b'i', b'd', 0x01, 0xa4];
    expected.extend(b"body");
    expected.extend([0x81, 0xa4]);
    expected.extend(b"type");
    expected.push(0xa4);
    expected.extend(b"ping");
    assert_eq!(frame, expected);
}

#[test]
fn hello_request_shape() {
    let v = wire(&Request {
        id: 1,
        body: RequestBody::Hello {
            protocol_version: 1,
            role: SessionRole::Application,
            client_name: "py".into(),
        },
    });
    let expected = map(&[
        ("id", Value::from(1)),
        (
            "body",
            map(&[
                ("type", Value::from("hello")),
                ("protocol_version", Value::from(1)),
                ("role", Value::from("application")),
                ("client_name", Value::from("py")),
            ]),
        ),
    ]);
    assert_eq!(v, expected);
}

#[test]
fn options_are_nil_or_the_value_and_may_be_omitted_in_requests() {
    let v = wire(&RequestBody::Read {
        oid: 5,
        depth: 0,
        required_progress: None,
    });
    assert_eq!(
        v,
        map(&[
            ("type", Value::from("read")),
            ("oid", Value::from(5)),
            ("depth", Value::from(0)),
            ("required_progress", Value::Nil),
        ])
    );
    let v = wire(&RequestBody::Read {
        oid: 5,
        depth: 2,
        required_progress: Some(12),
    });
    assert_eq!(v.as_map().unwrap()[3].1, Value::from(12));
    // Another client may leave out `depth` and `required_progress`, and
    // may add fields this version does not know.
    let sent = map(&[
        ("id", Value::from(7)),
        (
            "body",
            map(&[
                ("type", Value::from("read")),
                ("oid", Value::from(5)),
                ("future_field", Value::from(true)),
            ]),
        ),
    ]);
    assert_eq!(
        from_wire::<Request>(&sent).unwrap(),
        Request {
            id: 7,
            body: RequestBody::Read {
                oid: 5,
                depth: 0,
                required_progress: None
            }
        }
    );
    let unknown = map(&[
        ("id", Value::from(7)),
        ("body", map(&[("type", Value::from("frobnicate"))])),
    ]);
    assert!(from_wire::<Request>(&unknown).is_err());
}

#[test]
fn commit_shape_as_another_client_sends_it() {
    let sent = map(&[
        ("id", Value::from(2)),
        (
            "body",
            map(&[
                ("type", Value::from("commit")),
                ("token", Value::Binary(vec![1, 2, 3])),
                (
                    "puts",
                    Value::Array(vec![map(&[
                        ("oid", Value::from(5)),
                        ("expected_version", Value::from(3)),
                        ("class", Value::from("C")),
                        ("value", map(&[("next", ext(1, 9))])),
                    ])]),
                ),
                (
                    "news",
                    Value::Array(vec![map(&[
                        ("temp_id", Value::from(1)),
                        ("class", Value::from("MagmaCollection")),
                        ("value", Value::Nil),
                    ])]),
                ),
                (
                    "appends",
                    Value::Array(vec![
                        map(&[
                            ("coll", map(&[("new", Value::from(1))])),
                            ("value", Value::from("x")),
                        ]),
                        map(&[
                            ("coll", map(&[("oid", Value::from(7))])),
                            ("value", ext(2, 1)),
                        ]),
                    ]),
                ),
                ("set_root", map(&[("oid", Value::from(9))])),
                (
                    "meta",
                    Value::Array(vec![
                        Value::Array(vec![Value::from("a"), Value::from(1)]),
                        Value::Array(vec![Value::from("b"), Value::Nil]),
                    ]),
                ),
            ]),
        ),
    ]);
    let expected = Request {
        id: 2,
        body: RequestBody::Commit(CommitBody {
            token: Some(vec![1, 2, 3]),
            puts: vec![WirePut {
                oid: 5,
                expected_version: 3,
                class: "C".into(),
                value: map(&[("next", ext(1, 9))]),
            }],
            news: vec![WireNew {
                temp_id: 1,
                class: "MagmaCollection".into(),
                value: Value::Nil,
            }],
            appends: vec![
                WireAppend {
                    coll: WireRef::New(1),
                    value: Value::from("x"),
                },
                WireAppend {
                    coll: WireRef::Oid(7),
                    value: ext(2, 1),
                },
            ],
            set_root: Some(WireRef::Oid(9)),
            meta: vec![("a".into(), Some(Value::from(1))), ("b".into(), None)],
        }),
    };
    assert_eq!(from_wire::<Request>(&sent).unwrap(), expected);
    assert_eq!(wire(&expected), sent, "and this crate sends exactly that");
    // Every list may be omitted; a commit with only an append is valid.
    let minimal = map(&[
        ("id", Value::from(3)),
        (
            "body",
            map(&[
                ("type", Value::from("commit")),
                (
                    "appends",
                    Value::Array(vec![map(&[
                        ("coll", map(&[("oid", Value::from(7))])),
                        ("value", Value::from("x")),
                    ])]),
                ),
            ]),
        ),
    ]);
    match from_wire::<Request>(&minimal).unwrap().body {
        RequestBody::Commit(b) => {
            assert_eq!(b.token, None);
            assert_eq!(b.appends.len(), 1);
            assert!(b.puts.is_empty() && b.news.is_empty() && b.meta.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn token_is_binary() {
    let frame = codec::encode(&CommitBody {
        token: Some(vec![0xaa, 0xbb]),
        ..Default::default()
    });
    let pos = frame.windows(5).position(|w| w == b"token").unwrap();
    assert_eq!(&frame[pos + 5..pos + 9], &[0xc4, 0x02, 0xaa, 0xbb]);
}

#[test]
fn responses_round_trip_with_references_inside_values() {
    let node = Node {
        members: vec![Member {
            server_id: 1,
            addr: "h:1".into(),
            role: MemberRole::Primary,
        }],
    };
    let bodies = vec![
        ResponseBody::Hello {
            protocol_version: 1,
            server_id: 1,
            repository_id: "ab".into(),
            role: ServerRole::Primary,
            node: node.clone(),
            epoch: Epoch { term: 1, server: 1 },
        },
        ResponseBody::Node {
            node,
            epoch: Epoch::default(),
            role: ServerRole::CatchingUp,
        },
        ResponseBody::Objects {
            objects: vec![WireObject {
                oid: 5,
                version: 2,
                class: "C".into(),
                value: Value::Array(vec![ext(1, 9), map(&[("k", ext(1, 10))])]),
                collection_len: None,
            }],
        },
        ResponseBody::Root {
            root: Some(5),
            objects: vec![],
        },
        ResponseBody::Elements {
            start: 0,
            values: vec![ext(1, 3), Value::from("a")],
            len: Some(9),
        },
        ResponseBody::Meta {
            value: Some(ext(1, 4)),
        },
        ResponseBody::Committed {
            number: 4,
            new_oids: vec![(1, 100)],
            positions: vec![0],
        },
        ResponseBody::Ok,
        ResponseBody::Error {
            error: WireError::WrongServer {
                primary: Some("h:1".into()),
            },
            message: "m".into(),
        },
    ];
    for body in bodies {
        let resp = Response {
            id: 3,
            commit: 4,
            body,
        };
        let frame = codec::encode(&resp);
        assert_eq!(codec::decode::<Response>(&frame[4..]).unwrap(), resp);
    }
}

#[test]
fn response_shapes() {
    let v = wire(&Response {
        id: 3,
        commit: 4,
        body: ResponseBody::Committed {
            number: 4,
            new_oids: vec![(1, 100)],
            positions: vec![0],
        },
    });
    assert_eq!(
        v,
        map(&[
            ("id", Value::from(3)),
            ("commit", Value::from(4)),
            (
                "body",
                map(&[
                    ("type", Value::from("committed")),
                    ("number", Value::from(4)),
                    (
                        "new_oids",
                        Value::Array(vec![Value::Array(vec![Value::from(1), Value::from(100)])])
                    ),
                    ("positions", Value::Array(vec![Value::from(0)])),
                ])
            ),
        ])
    );
    let v = wire(&ResponseBody::Error {
        error: WireError::Behind {
            commit: 3,
            required: 5,
        },
        message: "m".into(),
    });
    assert_eq!(
        v,
        map(&[
            ("type", Value::from("error")),
            (
                "error",
                map(&[
                    ("code", Value::from("behind")),
                    ("commit", Value::from(3)),
                    ("required", Value::from(5)),
                ])
            ),
            ("message", Value::from("m")),
        ])
    );
    let v = wire(&ResponseBody::Error {
        error: WireError::ShuttingDown,
        message: "m".into(),
    });
    assert_eq!(
        v.as_map().unwrap()[1].1,
        map(&[("code", Value::from("shutting_down"))])
    );
    // Roles: kebab-case for servers and members, snake_case for sessions.
    assert_eq!(wire(&ServerRole::CatchingUp), Value::from("catching-up"));
    assert_eq!(wire(&MemberRole::Witness), Value::from("witness"));
    assert_eq!(wire(&SessionRole::Admin), Value::from("admin"));
    assert_eq!(wire(&BackupState::Paused), Value::from("paused"));
    assert_eq!(
        wire(&Epoch { term: 2, server: 7 }),
        map(&[("term", Value::from(2)), ("server", Value::from(7))])
    );
}

#[test]
fn admin_reports_are_flat_maps_next_to_the_type() {
    let b = BackupReport {
        state: BackupState::Running,
        target: "/t".into(),
        snapshot_commit: 3,
        current_file: None,
        bytes_done: 1,
        bytes_total: 2,
        files_done: 0,
        files_total: 1,
        started_unix_ms: 5,
        elapsed_ms: 6,
        error: None,
    };
    let v = wire(&ResponseBody::BackupState(b));
    let m = v.as_map().unwrap();
    assert_eq!(m[0], (Value::from("type"), Value::from("backup_state")));
    assert_eq!(m[1], (Value::from("state"), Value::from("running")));
    assert!(m.contains(&(Value::from("current_file"), Value::Nil)));
}
