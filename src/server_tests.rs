//! In-process tests of a whole server: real sockets, a real repository in a
//! temporary directory, a minimal blocking client speaking raw frames.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rmpv::Value;

use super::*;
use crate::actors::session::MAX_RANGE_BYTES;
use crate::protocol::codec::{self, read_frame, write_frame};
use crate::protocol::{
    CommitBody, Request, RequestBody, Response, ResponseBody, ServerRole, SessionRole, WireAppend,
    WireError, WireNew, WireRef, PROTOCOL_VERSION,
};
use crate::storage::object::COLLECTION_CLASS;

struct Conn {
    stream: TcpStream,
    next_id: u64,
}

impl Conn {
    fn raw(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Conn { stream, next_id: 1 }
    }

    fn open(addr: SocketAddr, role: SessionRole) -> Conn {
        Conn::open_expecting(addr, role, ServerRole::Primary)
    }

    fn open_expecting(addr: SocketAddr, role: SessionRole, server: ServerRole) -> Conn {
        let mut c = Conn::raw(addr);
        match c.call(hello(role, PROTOCOL_VERSION)).body {
            ResponseBody::Hello { role, .. } if role == server => c,
            other => panic!("hello: {other:?}"),
        }
    }

    fn send(&mut self, body: RequestBody) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.stream, &Request { id, body }).unwrap();
        id
    }

    /// Commit one new object of class "Blob" holding `value`; its oid.
    fn create_blob(&mut self, value: String) -> u64 {
        let body = CommitBody {
            news: vec![WireNew {
                temp_id: 1,
                class: "Blob".into(),
                value: Value::from(value),
            }],
            ..CommitBody::default()
        };
        match self.call(RequestBody::Commit(body)).body {
            ResponseBody::Committed { new_oids, .. } => new_oids[0].1,
            other => panic!("commit: {other:?}"),
        }
    }

    /// The server still answers this connection (a ping).
    fn assert_served(&mut self) {
        assert!(matches!(
            self.call(RequestBody::Ping).body,
            ResponseBody::Pong
        ));
    }

    /// A frame of `body` as given, MessagePack or not.
    fn send_raw(&mut self, body: &[u8]) {
        self.stream
            .write_all(&(body.len() as u32).to_be_bytes())
            .unwrap();
        self.stream.write_all(body).unwrap();
    }

    fn recv(&mut self) -> Response {
        let body = read_frame(&mut self.stream, codec::DEFAULT_MAX_FRAME).unwrap();
        codec::decode(&body).unwrap()
    }

    fn call(&mut self, body: RequestBody) -> Response {
        let id = self.send(body);
        let r = self.recv();
        assert_eq!(r.id, id, "{r:?}");
        r
    }

    fn error(&mut self, body: RequestBody) -> WireError {
        match self.call(body).body {
            ResponseBody::Error { error, .. } => error,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// The server closed the connection (after its last reply).
    fn assert_closed(&mut self) {
        assert!(matches!(
            read_frame(&mut self.stream, codec::DEFAULT_MAX_FRAME),
            Err(crate::protocol::ProtocolError::Closed)
        ));
    }
}

fn hello(role: SessionRole, protocol_version: u32) -> RequestBody {
    RequestBody::Hello {
        protocol_version,
        role,
        client_name: "server-tests".into(),
    }
}

fn config(dir: &std::path::Path) -> Config {
    Config {
        dir: dir.join("repo"),
        listen: "127.0.0.1:0".into(),
        max_frame: 4096,
        ..Config::default()
    }
}

/// A collection under a root object; returns (commit, collection oid).
fn make_root_with_collection(c: &mut Conn) -> (u64, u64) {
    let body = CommitBody {
        news: vec![
            WireNew {
                temp_id: 1,
                class: "Root".into(),
                value: Value::Map(vec![(
                    Value::from("items"),
                    Value::Ext(
                        crate::storage::object::TEMP_REF_EXT,
                        2u64.to_be_bytes().to_vec(),
                    ),
                )]),
            },
            WireNew {
                temp_id: 2,
                class: COLLECTION_CLASS.into(),
                value: Value::Nil,
            },
        ],
        set_root: Some(WireRef::New(1)),
        ..CommitBody::default()
    };
    match c.call(RequestBody::Commit(body)).body {
        ResponseBody::Committed {
            number, new_oids, ..
        } => (number, new_oids.iter().find(|(t, _)| *t == 2).unwrap().1),
        other => panic!("commit: {other:?}"),
    }
}

/// A commit of one append of `s` to `coll`.
fn append_request(coll: u64, s: &str) -> RequestBody {
    RequestBody::Commit(CommitBody {
        appends: vec![WireAppend {
            coll: WireRef::Oid(coll),
            value: Value::from(s),
        }],
        ..CommitBody::default()
    })
}

fn append(c: &mut Conn, coll: u64, s: &str) -> u64 {
    match c.call(append_request(coll, s)).body {
        ResponseBody::Committed { number, .. } => number,
        other => panic!("append: {other:?}"),
    }
}

#[test]
fn serves_commits_and_reads_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(config(tmp.path())).unwrap();
    let addr = server.local_addr();
    let mut app = Conn::open(addr, SessionRole::Application);
    app.assert_served();

    // A new repository's first commit writes the anchor.
    let (first, coll) = make_root_with_collection(&mut app);
    for i in 1..=5 {
        assert_eq!(append(&mut app, coll, &format!("e{i}")), first + i);
    }
    let last = first + 5;
    let r = app.call(RequestBody::ReadRoot {
        depth: 1,
        required_progress: Some(last),
    });
    assert_eq!(r.commit, last);
    match r.body {
        ResponseBody::Root { root, objects } => {
            assert_eq!(objects[0].oid, root.unwrap());
            assert_eq!(objects[1].oid, coll);
            assert_eq!(objects[1].collection_len, Some(5));
        }
        other => panic!("read root: {other:?}"),
    }
    match app
        .call(RequestBody::CollectionRange {
            coll,
            start: 1,
            count: 2,
            required_progress: None,
        })
        .body
    {
        ResponseBody::Elements {
            start: 1,
            values,
            len: Some(5),
        } => {
            assert_eq!(values, vec![Value::from("e2"), Value::from("e3")])
        }
        other => panic!("range: {other:?}"),
    }
    let len = app.call(RequestBody::CollectionLength {
        coll,
        required_progress: None,
    });
    assert!(matches!(len.body, ResponseBody::Length { len: 5 }));
    match app.call(RequestBody::Status).body {
        ResponseBody::Status(s) => {
            assert_eq!(s.role, ServerRole::Primary);
            assert_eq!(s.commit, last);
            assert_eq!(s.flush, "group");
            assert_eq!(s.members.len(), 1);
            assert_eq!(s.members[0].commit, last);
            assert!(!s.partition_safe);
        }
        other => panic!("status: {other:?}"),
    }
    // A retried token is answered with the original commit, not re-applied.
    let retry = || CommitBody {
        token: Some(b"token-1".to_vec()),
        appends: vec![WireAppend {
            coll: WireRef::Oid(coll),
            value: Value::from("once"),
        }],
        ..CommitBody::default()
    };
    let first_try = app.call(RequestBody::Commit(retry()));
    let second_try = app.call(RequestBody::Commit(retry()));
    match (first_try.body, second_try.body) {
        (
            ResponseBody::Committed { number: a, .. },
            ResponseBody::Committed {
                number: b,
                positions,
                ..
            },
        ) => {
            assert_eq!((a, b), (last + 1, last + 1));
            assert!(positions.is_empty());
        }
        other => panic!("token retry: {other:?}"),
    }
    let last = last + 1;
    let len = app.call(RequestBody::CollectionLength {
        coll,
        required_progress: None,
    });
    assert!(matches!(len.body, ResponseBody::Length { len: 6 }));
    let digest = match app.call(RequestBody::Digest).body {
        ResponseBody::Digest { commit, digest } if commit == last => digest,
        other => panic!("digest: {other:?}"),
    };

    // Admin requests are refused on an application session, which stays open.
    assert_eq!(
        app.error(RequestBody::Shutdown { save: true }),
        WireError::NotAdmin
    );
    // A second hello is refused; the session stays open too.
    assert_eq!(
        app.error(hello(SessionRole::Application, PROTOCOL_VERSION)),
        WireError::HelloExpected
    );
    app.assert_served();
    server.shutdown(true).unwrap();

    let server = spawn(config(tmp.path())).unwrap();
    let mut admin = Conn::open(server.local_addr(), SessionRole::Admin);
    match admin.call(RequestBody::Digest).body {
        ResponseBody::Digest { commit, digest: d } if commit == last => assert_eq!(d, digest),
        other => panic!("digest after restart: {other:?}"),
    }
    // A backup target must be an absolute path on the server's machine.
    assert!(matches!(
        admin.error(RequestBody::Backup {
            to: "relative/x".into(),
            rate: None,
        }),
        WireError::Backup { reason } if reason.contains("absolute")
    ));
    assert!(matches!(
        admin.call(RequestBody::Shutdown { save: false }).body,
        ResponseBody::Ok
    ));
    server.join().unwrap();
}

#[test]
fn protocol_violations_close_only_the_offending_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(config(tmp.path())).unwrap();
    let addr = server.local_addr();
    let mut good = Conn::open(addr, SessionRole::Application);

    let mut c = Conn::raw(addr);
    assert_eq!(c.error(RequestBody::Ping), WireError::HelloExpected);
    c.assert_closed();

    let mut c = Conn::raw(addr);
    assert_eq!(
        c.error(hello(SessionRole::Application, PROTOCOL_VERSION + 1)),
        WireError::UnsupportedProtocol {
            requested: PROTOCOL_VERSION + 1,
            supported: PROTOCOL_VERSION
        }
    );
    c.assert_closed();

    let mut c = Conn::open(addr, SessionRole::Application);
    c.stream.write_all(&[0, 0, 0x20, 0]).unwrap(); // 8192 > the 4096 limit
    assert!(matches!(
        c.recv().body,
        ResponseBody::Error {
            error: WireError::FrameTooLarge {
                size: 8192,
                limit: 4096
            },
            ..
        }
    ));
    c.assert_closed();

    let mut c = Conn::open(addr, SessionRole::Application);
    c.stream.write_all(&[0, 0, 0, 2, 0x92, 0x01]).unwrap();
    assert!(matches!(
        c.recv().body,
        ResponseBody::Error {
            error: WireError::BadRequest { .. },
            ..
        }
    ));
    c.assert_closed();

    // Pipelined requests are answered in order, each with its id.
    let ids: Vec<u64> = (0..3).map(|_| good.send(RequestBody::Ping)).collect();
    let got: Vec<u64> = (0..3).map(|_| good.recv().id).collect();
    assert_eq!(got, ids);

    let now = good.call(RequestBody::Ping).commit;
    let started = Instant::now();
    let behind = good.error(RequestBody::CollectionLength {
        coll: 1,
        required_progress: Some(now + 50),
    });
    assert_eq!(
        behind,
        WireError::Behind {
            commit: now,
            required: now + 50
        }
    );
    assert!(started.elapsed() >= PROGRESS_WAIT);
    good.assert_served();
    server.shutdown(true).unwrap();
}

#[test]
fn a_second_server_on_the_same_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let first = spawn(config(tmp.path())).unwrap();
    let err = match spawn(config(tmp.path())) {
        Ok(_) => panic!("two servers opened one repository"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("locked"), "{err}");
    first.shutdown(true).unwrap();
}

#[test]
fn primary_and_join_together_are_refused_plainly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.primary = Some("127.0.0.1:1".into());
    cfg.join = Some("127.0.0.1:2".into());
    let err = format!("{:#}", spawn(cfg).err().unwrap());
    assert!(
        err.contains("--primary and --join exclude each other"),
        "{err}"
    );
}

#[test]
fn primary_on_a_directory_without_a_repository_is_refused_not_created() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.primary = Some("127.0.0.1:1".into());
    let err = format!("{:#}", spawn(cfg).err().unwrap());
    assert!(err.contains("holds no repository"), "{err}");
    assert!(err.contains("--join 127.0.0.1:1"), "{err}");
    assert!(!tmp.path().join("repo").exists(), "nothing was created");
}

/// A copy marked incomplete (an aborted backup, a pull that failed its
/// verification) may hold a header and still be partial: never served.
#[test]
fn a_directory_marked_as_an_incomplete_backup_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    {
        let mut repo = crate::storage::Repository::create(&cfg.dir, 7, "127.0.0.1:1").unwrap();
        repo.set_restore_mode(true).unwrap();
    }
    std::fs::write(
        cfg.dir.join(crate::storage::backup::INCOMPLETE_FILE),
        "This directory is an INCOMPLETE Magma backup.\nstate: failed\nreason: FAILED verification\n",
    )
    .unwrap();
    let err = format!("{:#}", spawn(cfg.clone()).err().unwrap());
    assert!(err.contains("incomplete or failed backup copy"), "{err}");
    assert!(err.contains("FAILED verification"), "{err}");
    assert!(err.contains("take the backup again"), "{err}");
    // With a pull's state beside it: an interrupted pull, to continue.
    std::fs::write(cfg.dir.join(crate::pull::STATE_FILE), "{}").unwrap();
    let err = format!("{:#}", spawn(cfg.clone()).err().unwrap());
    assert!(err.contains("run the same `magma backup --pull`"), "{err}");
    // A pull that crashed while sealing: the marker gone, its state there.
    std::fs::remove_file(cfg.dir.join(crate::storage::backup::INCOMPLETE_FILE)).unwrap();
    let err = format!("{:#}", spawn(cfg).err().unwrap());
    assert!(err.contains("run the same `magma backup --pull`"), "{err}");
}

#[test]
fn a_repository_in_restore_mode_serves_reads_and_refuses_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    {
        let mut repo = crate::storage::Repository::create(&cfg.dir, 7, "127.0.0.1:1").unwrap();
        repo.set_restore_mode(true).unwrap();
    }
    let server = spawn(cfg).unwrap();
    let mut c = Conn::open_expecting(
        server.local_addr(),
        SessionRole::Application,
        ServerRole::Restore,
    );
    match c.call(RequestBody::Status).body {
        ResponseBody::Status(s) => assert_eq!(s.role, ServerRole::Restore),
        other => panic!("status: {other:?}"),
    }
    assert!(matches!(
        c.call(RequestBody::ReadRoot {
            depth: 0,
            required_progress: None
        })
        .body,
        ResponseBody::Root { root: None, .. }
    ));
    assert_eq!(
        c.error(RequestBody::Commit(CommitBody::default())),
        WireError::RestoreMode
    );
    server.shutdown(true).unwrap();
}

#[test]
fn an_async_batch_delay_beyond_the_limit_is_refused_by_name() {
    let at = |us| Config {
        async_batch_delay: Duration::from_micros(us),
        ..Config::default()
    };
    assert!(at(MAX_ASYNC_BATCH_DELAY_US).validate().is_ok());
    assert!(at(0).validate().is_ok());
    let err = at(MAX_ASYNC_BATCH_DELAY_US + 1).validate().unwrap_err();
    assert!(err.to_string().contains("--async-batch-delay-us"), "{err}");
}

/// A secondary answering a batch once applied (`ack: applied`) reports as
/// durable what its commit-log actor last made durable, whoever asked for
/// that flush: here a `durable` heartbeat, which its commit coordinator
/// (keeping the interval policy's flushes) never hears of.
/// A new repository (server id 7) under `tmp`, and a backup of it at
/// `backup`: a server started there takes the repository's records.
fn primary_with_backup_at(
    tmp: &std::path::Path,
    backup: &std::path::Path,
) -> crate::storage::Repository {
    let mut primary =
        crate::storage::Repository::create(&tmp.join("primary"), 7, "127.0.0.1:1").unwrap();
    primary
        .snapshot(&tmp.join("scratch"))
        .unwrap()
        .copy_to(backup)
        .unwrap();
    primary
}

#[test]
fn an_applied_answer_reports_what_the_commit_log_made_durable() {
    use crate::protocol::ReplicateAck;
    use crate::storage::CommitRequest;

    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.flush = crate::actors::FlushPolicy::Interval(600_000);
    let mut primary = primary_with_backup_at(tmp.path(), &cfg.dir);
    let base = primary.info().last_commit;
    for i in 0..5 {
        primary
            .commit(CommitRequest {
                meta: vec![(format!("k{i}"), Some(vec![0xc0]))],
                ..Default::default()
            })
            .unwrap();
    }
    let bodies: Vec<serde_bytes::ByteBuf> = primary
        .read_records(base + 1, 100, 1 << 20)
        .unwrap()
        .into_iter()
        .map(serde_bytes::ByteBuf::from)
        .collect();
    assert_eq!(bodies.len(), 5);
    let (epoch, last) = (primary.info().epoch, primary.info().last_commit);

    let server = spawn(cfg).unwrap();
    // Restore or catching up (from a primary that is not there): either
    // takes streamed records.
    let mut peer = Conn::raw(server.local_addr());
    match peer.call(hello(SessionRole::Peer, PROTOCOL_VERSION)).body {
        ResponseBody::Hello { role, .. } => assert_ne!(role, ServerRole::Primary),
        other => panic!("hello: {other:?}"),
    }
    let mut replicate = |records: &[serde_bytes::ByteBuf], ack| match peer
        .call(RequestBody::Replicate {
            epoch,
            primary_id: 7,
            records: records.to_vec(),
            primary_last: last,
            ack,
        })
        .body
    {
        ResponseBody::Replicated { applied, durable } => (applied, durable),
        other => panic!("replicate: {other:?}"),
    };
    // Applied, not flushed: the interval is ten minutes.
    assert_eq!(
        replicate(&bodies[..3], ReplicateAck::Applied),
        (base + 3, base)
    );
    // A heartbeat asking for durability flushes everything written.
    assert_eq!(replicate(&[], ReplicateAck::Durable), (base + 3, base + 3));
    // The next applied batch says so too.
    assert_eq!(
        replicate(&bodies[3..], ReplicateAck::Applied),
        (base + 5, base + 3)
    );
    server.shutdown(true).unwrap();
}

/// A server taking commits of up to 2 MiB, and an application connection
/// to it.
fn serving_large_values(dir: &std::path::Path) -> (ServerThread, Conn) {
    let server = spawn(Config {
        max_frame: 2 << 20,
        ..config(dir)
    })
    .unwrap();
    let app = Conn::open(server.local_addr(), SessionRole::Application);
    (server, app)
}

#[test]
fn a_range_of_large_elements_is_cut_by_bytes_and_names_the_length_to_page_to() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, mut app) = serving_large_values(tmp.path());
    let (_, coll) = make_root_with_collection(&mut app);
    // 24 elements of 1 MiB: one reply of them all would be a 24 MiB frame,
    // beyond every client's default limit.
    let big = |i: usize| format!("{i:02}{}", "x".repeat(1 << 20));
    for i in 0..24 {
        append(&mut app, coll, &big(i));
    }
    let mut got = Vec::new();
    let mut replies = 0;
    while got.len() < 24 {
        replies += 1;
        assert!(replies <= 24, "no progress after {} elements", got.len());
        match app
            .call(RequestBody::CollectionRange {
                coll,
                start: got.len() as u64,
                count: 1000,
                required_progress: None,
            })
            .body
        {
            ResponseBody::Elements { start, values, len } => {
                assert_eq!(start, got.len() as u64);
                assert_eq!(len, Some(24));
                assert!(!values.is_empty());
                let bytes: usize = values.iter().map(|v| v.as_str().unwrap().len()).sum();
                assert!(
                    values.len() == 1 || bytes as u64 <= MAX_RANGE_BYTES + (1 << 20) + 2,
                    "{} elements, {bytes} bytes in one reply",
                    values.len()
                );
                got.extend(values);
            }
            other => panic!("range: {other:?}"),
        }
    }
    assert!(
        replies >= 5,
        "24 MiB in {replies} replies of at most ~5 MiB"
    );
    for (i, v) in got.iter().enumerate() {
        assert_eq!(v.as_str().unwrap(), big(i));
    }
    server.shutdown(true).unwrap();
}

#[test]
fn a_resend_of_other_records_than_those_held_is_refused_not_acknowledged() {
    use crate::protocol::ReplicateAck;
    use crate::storage::{CommitRequest, Repository};

    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let mut primary = primary_with_backup_at(tmp.path(), &cfg.dir);
    // A second history from the same base: what a server that promoted
    // without some of our records would stream.
    primary
        .snapshot(&tmp.path().join("scratch2"))
        .unwrap()
        .copy_to(&tmp.path().join("other"))
        .unwrap();
    let mut other = Repository::open(&tmp.path().join("other")).unwrap();
    other.set_restore_mode(false).unwrap();
    let base = primary.info().last_commit;
    let records = |repo: &mut Repository, tag: &str| -> Vec<serde_bytes::ByteBuf> {
        for i in 0..3 {
            repo.commit(CommitRequest {
                meta: vec![(format!("{tag}{i}"), Some(vec![0xc0]))],
                ..Default::default()
            })
            .unwrap();
        }
        repo.read_records(base + 1, 100, 1 << 20)
            .unwrap()
            .into_iter()
            .map(serde_bytes::ByteBuf::from)
            .collect()
    };
    let ours = records(&mut primary, "a");
    let theirs = records(&mut other, "b");
    let epoch = primary.info().epoch;

    let server = spawn(cfg).unwrap();
    let mut peer = Conn::raw(server.local_addr());
    peer.call(hello(SessionRole::Peer, PROTOCOL_VERSION));
    let mut replicate = |records: &[serde_bytes::ByteBuf]| {
        peer.call(RequestBody::Replicate {
            epoch,
            primary_id: 7,
            records: records.to_vec(),
            primary_last: base + 3,
            ack: ReplicateAck::Durable,
        })
        .body
    };
    assert!(matches!(
        replicate(&ours),
        ResponseBody::Replicated { applied, .. } if applied == base + 3
    ));
    // The same numbers again, resent: fine.
    assert!(matches!(
        replicate(&ours[1..]),
        ResponseBody::Replicated { applied, .. } if applied == base + 3
    ));
    // Other records under numbers we hold: never "applied".
    for overlap in [&theirs[..], &theirs[..2]] {
        match replicate(overlap) {
            ResponseBody::Error {
                error: WireError::Diverged { .. },
                ..
            } => {}
            other => panic!("a diverged resend was answered {other:?}"),
        }
    }
    server.shutdown(true).unwrap();
}

#[test]
fn a_deep_read_of_large_objects_stops_at_its_byte_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, mut app) = serving_large_values(tmp.path());
    let mut oids = Vec::new();
    for i in 0..10 {
        oids.push(app.create_blob(format!("{i}{}", "x".repeat(1 << 20))));
    }
    let refs = oids
        .iter()
        .map(|o| Value::Ext(crate::storage::object::REF_EXT, o.to_be_bytes().to_vec()))
        .collect();
    let body = CommitBody {
        news: vec![WireNew {
            temp_id: 1,
            class: "Index".into(),
            value: Value::Array(refs),
        }],
        ..CommitBody::default()
    };
    let index = match app.call(RequestBody::Commit(body)).body {
        ResponseBody::Committed { new_oids, .. } => new_oids[0].1,
        other => panic!("commit: {other:?}"),
    };
    // 10 MiB reachable at depth 1: the reply stops after about 4 MiB.
    let got = match app
        .call(RequestBody::Read {
            oid: index,
            depth: 1,
            required_progress: Default::default(),
        })
        .body
    {
        ResponseBody::Objects { objects } => objects,
        other => panic!("read: {other:?}"),
    };
    assert_eq!(got[0].oid, index, "the object asked for comes first");
    assert!(
        (2..=5).contains(&got.len()),
        "{} objects in one reply",
        got.len()
    );
    for (obj, oid) in got[1..].iter().zip(&oids) {
        assert_eq!(obj.oid, *oid, "breadth first, in reference order");
    }
    server.shutdown(true).unwrap();
}

#[test]
fn a_deep_read_of_an_object_over_the_byte_budget_returns_it_alone() {
    // Whatever it references would be on top of an object already as large
    // as the budget (a frame-sized one would make the reply larger than a
    // client accepts); the client reads on from what it got.
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(Config {
        max_frame: 8 << 20,
        ..config(tmp.path())
    })
    .unwrap();
    let mut app = Conn::open(server.local_addr(), SessionRole::Application);
    let small: Vec<u64> = (0..3)
        .map(|i| app.create_blob(format!("small {i}")))
        .collect();
    let mut value = vec![Value::from("x".repeat(5 << 20))];
    value.extend(
        small
            .iter()
            .map(|o| Value::Ext(crate::storage::object::REF_EXT, o.to_be_bytes().to_vec())),
    );
    let body = CommitBody {
        news: vec![WireNew {
            temp_id: 1,
            class: "Big".into(),
            value: Value::Array(value),
        }],
        ..CommitBody::default()
    };
    let big = match app.call(RequestBody::Commit(body)).body {
        ResponseBody::Committed { new_oids, .. } => new_oids[0].1,
        other => panic!("commit: {other:?}"),
    };
    let read = |app: &mut Conn, oid| match app
        .call(RequestBody::Read {
            oid,
            depth: 1,
            required_progress: Default::default(),
        })
        .body
    {
        ResponseBody::Objects { objects } => objects.iter().map(|o| o.oid).collect::<Vec<_>>(),
        other => panic!("read: {other:?}"),
    };
    assert_eq!(read(&mut app, big), vec![big]);
    server.shutdown(true).unwrap();
}

#[test]
fn hellos_are_answered_while_the_storage_thread_is_busy() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(config(tmp.path())).unwrap();
    // Once the server has decided its role (a hello waits for that)...
    Conn::open(server.local_addr(), SessionRole::Application);
    // ...the storage thread held, as by a long digest or snapshot.
    let release = hold_storage(&server);
    // A secondary's ping (a peer hello) must come back, or it would take
    // this live primary for dead and promote itself; clients learn the
    // node the same way.
    for role in [SessionRole::Peer, SessionRole::Application] {
        let mut c = Conn::raw(server.local_addr());
        // Within a secondary's ping bound (it would promote itself past
        // it), and below the 10 s a hello waits at start-up for a role:
        // the answer must not come from that.
        c.stream
            .set_read_timeout(Some(crate::actors::supervisor::PRIMARY_PING_TIMEOUT))
            .unwrap();
        match c.call(hello(role, PROTOCOL_VERSION)).body {
            ResponseBody::Hello {
                role: ServerRole::Primary,
                node,
                ..
            } => assert_eq!(node.members.len(), 1),
            other => panic!("hello: {other:?}"),
        }
        match c.call(RequestBody::GetNode).body {
            ResponseBody::Node { node, .. } => assert_eq!(node.members.len(), 1),
            other => panic!("node: {other:?}"),
        }
    }
    // Nor does an operator's status wait for that thread.
    let mut admin = Conn::raw(server.local_addr());
    admin
        .stream
        .set_read_timeout(Some(crate::actors::supervisor::PRIMARY_PING_TIMEOUT))
        .unwrap();
    admin.call(hello(SessionRole::Admin, PROTOCOL_VERSION));
    match admin.call(RequestBody::Status).body {
        ResponseBody::Status(s) => {
            assert_eq!(s.role, ServerRole::Primary);
            assert!(s.commit >= 1, "{s:?}");
        }
        other => panic!("status: {other:?}"),
    }
    drop(release);
    server.shutdown(true).unwrap();
}

/// `peer_link::reachable`, as a secondary checks its primary, from a
/// blocking test.
fn reachable(addr: SocketAddr) -> bool {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(crate::actors::peer_link::reachable(
            &addr.to_string(),
            Duration::from_secs(5),
        ))
}

#[test]
fn applications_beyond_the_connection_limit_are_turned_away_but_admins_get_in() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(Config {
        max_connections: 2,
        ..config(tmp.path())
    })
    .unwrap();
    let addr = server.local_addr();
    let _a = Conn::open(addr, SessionRole::Application);
    let _b = Conn::open(addr, SessionRole::Application);
    let mut c = Conn::raw(addr);
    match c.error(hello(SessionRole::Application, PROTOCOL_VERSION)) {
        WireError::Unavailable { reason } => assert!(reason.contains("at most 2"), "{reason}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    c.assert_closed();
    // The reserve: an operator (and the node's peers) still get in.
    let mut admin = Conn::open(addr, SessionRole::Admin);
    assert!(matches!(
        admin.call(RequestBody::Status).body,
        ResponseBody::Status(_)
    ));

    // Admins and peers have every place left of limit + reserve: with the
    // two applications, 64 of them; one more is refused.
    let held: Vec<Conn> = (1..crate::server::RESERVED_CONNECTIONS)
        .map(|_| Conn::open(addr, SessionRole::Peer))
        .collect();
    let mut last = Conn::raw(addr);
    match last.error(hello(SessionRole::Peer, PROTOCOL_VERSION)) {
        WireError::Unavailable { reason } => assert!(
            reason.contains(&format!(
                "at most {} sessions",
                2 + crate::server::RESERVED_CONNECTIONS
            )),
            "{reason}"
        ),
        other => panic!("expected unavailable, got {other:?}"),
    }
    last.assert_closed();
    // That refusal is an answer: a secondary checking this primary finds it
    // alive, and does not take over.
    assert!(reachable(addr));
    // A place freed is a place taken again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = Conn::raw(addr);
        match again.call(hello(SessionRole::Peer, PROTOCOL_VERSION)).body {
            ResponseBody::Hello { .. } => break,
            ResponseBody::Error {
                error: WireError::Unavailable { .. },
                ..
            } if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            other => panic!("hello: {other:?}"),
        }
    }
    server.shutdown(true).unwrap();
}

#[test]
fn idle_connections_never_lock_out_admins_peers_or_applications() {
    use crate::server::{PRE_HELLO_CONNECTIONS, RESERVED_CONNECTIONS};
    let tmp = tempfile::tempdir().unwrap();
    let limit = 4;
    let server = spawn(Config {
        max_connections: limit,
        ..config(tmp.path())
    })
    .unwrap();
    let addr = server.local_addr();
    // More silent sockets than every pool together holds.
    let extra = 32;
    let mut idle: Vec<Conn> = (0..limit + RESERVED_CONNECTIONS + PRE_HELLO_CONNECTIONS + extra)
        .map(|_| Conn::raw(addr))
        .collect();
    // Each connection below closes the oldest silent one.
    let mut admin = Conn::open(addr, SessionRole::Admin);
    assert!(matches!(
        admin.call(RequestBody::Status).body,
        ResponseBody::Status(_)
    ));
    assert!(reachable(addr), "a peer's check of this server failed");
    Conn::open(addr, SessionRole::Application).assert_served();
    // The oldest silent ones were closed; the newest still may speak.
    idle[0].assert_closed();
    let newest = idle.last_mut().unwrap();
    match newest
        .call(hello(SessionRole::Application, PROTOCOL_VERSION))
        .body
    {
        ResponseBody::Hello { .. } => newest.assert_served(),
        other => panic!("hello: {other:?}"),
    }
    drop(idle);
    server.shutdown(true).unwrap();
}

#[test]
fn a_connection_that_never_says_hello_is_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(Config {
        hello_timeout: Duration::from_millis(200),
        ..config(tmp.path())
    })
    .unwrap();
    let mut silent = Conn::raw(server.local_addr());
    silent.assert_closed();
    // One that says hello in time stays.
    let mut app = Conn::open(server.local_addr(), SessionRole::Application);
    std::thread::sleep(Duration::from_millis(400));
    app.assert_served();
    server.shutdown(true).unwrap();
}

#[test]
fn the_connection_limit_fits_the_open_file_limit() {
    assert_eq!(connection_limit(1024, 1 << 20), 1024);
    // 2048 descriptors: the server's own 1024, the reserve's 64 and the
    // pre-hello pool's 64 first.
    assert_eq!(connection_limit(1024, 2048), 896);
    // A 1024 limit: the server keeps what its collection cache may need.
    assert_eq!(connection_limit(1024, 1024), 256);
    assert_eq!(connection_limit(1024, 4096), 1024);
    assert_eq!(connection_limit(10, 100), 1);
}

#[test]
fn client_chosen_text_is_bounded_in_replies() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(Config {
        max_frame: 4 << 20,
        ..config(tmp.path())
    })
    .unwrap();
    let addr = server.local_addr();
    // A megabyte client name is refused, not logged.
    let mut c = Conn::raw(addr);
    let err = c.error(RequestBody::Hello {
        protocol_version: PROTOCOL_VERSION,
        role: SessionRole::Application,
        client_name: "n".repeat(1 << 20),
    });
    match err {
        WireError::BadRequest { reason } => assert!(reason.contains("client_name"), "{reason}"),
        other => panic!("expected bad_request, got {other:?}"),
    }
    c.assert_closed();
    // An unknown request type of a megabyte is quoted back clipped.
    let mut c = Conn::open(addr, SessionRole::Application);
    let mut body = Vec::new();
    rmpv::encode::write_value(
        &mut body,
        &Value::Map(vec![
            (Value::from("id"), Value::from(5)),
            (
                Value::from("body"),
                Value::Map(vec![(
                    Value::from("type"),
                    Value::from("t".repeat(1 << 20)),
                )]),
            ),
        ]),
    )
    .unwrap();
    c.send_raw(&body);
    match c.recv().body {
        ResponseBody::Error {
            error: WireError::BadRequest { reason },
            ..
        } => assert!(reason.len() < 1024, "{} bytes", reason.len()),
        other => panic!("expected bad_request, got {other:?}"),
    }
    c.assert_closed();
    server.shutdown(true).unwrap();
}

#[test]
fn a_request_of_millions_of_items_is_refused_before_it_is_decoded() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(Config {
        max_frame: 4 << 20,
        ..config(tmp.path())
    })
    .unwrap();
    let addr = server.local_addr();
    let mut c = Conn::open(addr, SessionRole::Application);
    // {"id": 3, "body": {"type": "ping", "junk": [nil × 2 Mi]}}
    let mut body = Vec::new();
    rmp::encode::write_map_len(&mut body, 2).unwrap();
    rmp::encode::write_str(&mut body, "id").unwrap();
    rmp::encode::write_uint(&mut body, 3).unwrap();
    rmp::encode::write_str(&mut body, "body").unwrap();
    rmp::encode::write_map_len(&mut body, 2).unwrap();
    rmp::encode::write_str(&mut body, "type").unwrap();
    rmp::encode::write_str(&mut body, "ping").unwrap();
    rmp::encode::write_str(&mut body, "junk").unwrap();
    rmp::encode::write_array_len(&mut body, 2 << 20).unwrap();
    body.resize(body.len() + (2 << 20), 0xc0);
    c.send_raw(&body);
    let r = c.recv();
    assert_eq!(r.id, 3);
    match r.body {
        ResponseBody::Error {
            error: WireError::BadRequest { reason },
            ..
        } => assert!(reason.contains("items"), "{reason}"),
        other => panic!("expected bad_request, got {other:?}"),
    }
    c.assert_closed();
    let mut other = Conn::open(addr, SessionRole::Application);
    other.assert_served();
    server.shutdown(true).unwrap();
}

/// A server with `reply_timeout` holding a blob of `size` bytes: the
/// server, an application connection, the blob's oid.
fn serving_a_blob(
    dir: &std::path::Path,
    reply_timeout: Duration,
    size: usize,
) -> (ServerThread, Conn, u64) {
    let server = spawn(Config {
        max_frame: (size as u64 + (1 << 20)).max(2 << 20),
        reply_timeout,
        ..config(dir)
    })
    .unwrap();
    let mut app = Conn::open(server.local_addr(), SessionRole::Application);
    let oid = app.create_blob("x".repeat(size));
    (server, app, oid)
}

#[test]
fn a_client_that_never_reads_its_replies_is_disconnected() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, mut app, oid) = serving_a_blob(tmp.path(), Duration::from_millis(500), 1 << 20);
    let addr = server.local_addr();
    // 200 reads of 1 MiB, none of the replies read: 200 MiB if the server
    // queued them all. It stops reading past its byte budget, then gives
    // up on the client.
    let mut reader = Conn::open(addr, SessionRole::Application);
    reader
        .stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut sent = 0;
    for _ in 0..200 {
        let req = Request {
            id: 100 + sent,
            body: RequestBody::Read {
                oid,
                depth: 0,
                required_progress: Default::default(),
            },
        };
        if write_frame(&mut reader.stream, &req).is_err() {
            break;
        }
        sent += 1;
    }
    // Not reading is the point: give the server its reply timeout a few
    // times over (nothing to wait for on this side: whether it gave up is
    // only seen by reading).
    std::thread::sleep(Duration::from_secs(3));
    let mut answered = 0;
    while read_frame(&mut reader.stream, 4 << 20).is_ok() {
        answered += 1;
    }
    assert!(answered < 200, "every one of {sent} reads was answered");
    // Everyone else is served.
    app.assert_served();
    server.shutdown(true).unwrap();
}

/// The `/proc/net/tcp` fields of the server side of the loopback
/// connection from `client_port` to `server_port`, if it exists.
fn server_side(server_port: u16, client_port: u16) -> Option<Vec<String>> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port_of = |field: &str| u16::from_str_radix(field.rsplit(':').next().unwrap(), 16).unwrap();
    tcp.lines().skip(1).find_map(|line| {
        let f: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        (port_of(&f[1]) == server_port && port_of(&f[2]) == client_port).then_some(f)
    })
}

/// Whether this process still holds that server side (a socket a process
/// closed has inode 0, or is gone).
fn server_side_open(server_port: u16, client_port: u16) -> bool {
    server_side(server_port, client_port).is_some_and(|f| f[9] != "0")
}

/// A connection whose client vanishes without a word is found out by TCP
/// keepalive: the server side of an idle session has its keepalive timer
/// running (`/proc/net/tcp` timer kind 2).
#[test]
fn accepted_connections_have_tcp_keepalive() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(config(tmp.path())).unwrap();
    let addr = server.local_addr();
    let app = Conn::open(addr, SessionRole::Application);
    let client_port = app.stream.local_addr().unwrap().port();
    // Field 5 is "timer kind:expiry".
    let timer = server_side(addr.port(), client_port).map(|f| f[5][..2].to_string());
    assert_eq!(timer.as_deref(), Some("02"));
    server.shutdown(true).unwrap();
}

#[test]
fn a_client_that_stops_reading_and_sending_is_closed_once_the_writer_gives_up() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, mut app, oid) = serving_a_blob(tmp.path(), Duration::from_millis(300), 2 << 20);
    let addr = server.local_addr();
    // A small receive buffer, so three 2 MiB replies (under the reply
    // queue's byte budget: the reader goes back to waiting for a request)
    // stall the writer.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut quiet = Conn {
        stream: socket.into(),
        next_id: 1,
    };
    quiet
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(matches!(
        quiet
            .call(hello(SessionRole::Application, PROTOCOL_VERSION))
            .body,
        ResponseBody::Hello { .. }
    ));
    let client_port = quiet.stream.local_addr().unwrap().port();
    assert!(server_side_open(addr.port(), client_port));
    for _ in 0..3 {
        quiet.send(RequestBody::Read {
            oid,
            depth: 0,
            required_progress: Default::default(),
        });
    }
    // It neither reads nor sends again: the server must close it anyway.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server_side_open(addr.port(), client_port) {
        assert!(
            Instant::now() < deadline,
            "the session of a client that took no reply bytes is still open after 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    app.assert_served();
    server.shutdown(true).unwrap();
}

#[test]
fn a_client_reading_slowly_but_steadily_gets_a_reply_longer_than_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _app, oid) = serving_a_blob(tmp.path(), Duration::from_millis(200), 6 << 20);
    let addr = server.local_addr();
    // A small receive buffer, so the server's write waits on this reader.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut slow = Conn {
        stream: socket.into(),
        next_id: 1,
    };
    slow.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(matches!(
        slow.call(hello(SessionRole::Application, PROTOCOL_VERSION))
            .body,
        ResponseBody::Hello { .. }
    ));
    let id = slow.send(RequestBody::Read {
        oid,
        depth: 0,
        required_progress: Default::default(),
    });
    // At most 16 KiB (the receive buffer) every 5 ms: far longer than the
    // 200 ms timeout in all, never 200 ms without taking bytes.
    let started = Instant::now();
    let mut frame = Vec::new();
    let mut piece = vec![0u8; 64 << 10];
    loop {
        let n = std::io::Read::read(&mut slow.stream, &mut piece).unwrap();
        assert!(
            n > 0,
            "the server closed the connection after {} bytes",
            frame.len()
        );
        frame.extend_from_slice(&piece[..n]);
        if frame.len() >= 4 {
            let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
            if frame.len() == 4 + len {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed();
    let reply: Response = codec::decode(&frame[4..]).unwrap();
    assert_eq!(reply.id, id);
    match reply.body {
        ResponseBody::Objects { objects } => assert_eq!(objects[0].oid, oid),
        other => panic!("read: {other:?}"),
    }
    assert!(
        took > Duration::from_secs(1),
        "the reply was not read slowly: {took:?}"
    );
    server.shutdown(true).unwrap();
}

#[test]
fn a_restarting_primary_answers_peers_at_once_while_it_asks_its_members() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let tmp = tempfile::tempdir().unwrap();
    // A member that takes the restarting primary's probe and never answers
    // it: the primary decides its role only when its 2 s probe gives up.
    // It takes no connection after that one (it is gone, not hung), so
    // the primary then serves.
    let member = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let member_addr = member.local_addr().unwrap().to_string();
    let probe_over = std::sync::Arc::new(AtomicBool::new(false));
    let over = probe_over.clone();
    std::thread::spawn(move || {
        let accepted = member.accept();
        drop(member);
        if let Ok((mut probe, _)) = accepted {
            let mut buf = [0u8; 4096];
            while matches!(std::io::Read::read(&mut probe, &mut buf), Ok(n) if n > 0) {}
            over.store(true, Ordering::SeqCst);
        }
    });
    former_primary(&tmp.path().join("repo"), 6, &member_addr);
    let started = Instant::now();
    let server = spawn(config(tmp.path())).unwrap();
    // Another former primary restarting at the same time asks this one: it
    // must hear the epoch now, not after this server's own probe.
    let mut peer = Conn::raw(server.local_addr());
    match peer.call(hello(SessionRole::Peer, PROTOCOL_VERSION)).body {
        ResponseBody::Hello { epoch, .. } => assert_eq!(epoch, crate::types::Epoch::initial(5)),
        other => panic!("hello: {other:?}"),
    }
    assert!(
        !probe_over.load(Ordering::SeqCst),
        "the peer hello waited for the role decision"
    );
    // An application waits for the decision, then finds a primary: the
    // probe, started after `started`, gave up first (a lower bound no slow
    // machine can break; the member may see the probe closed later still).
    Conn::open(server.local_addr(), SessionRole::Application);
    assert!(
        started.elapsed() >= crate::actors::supervisor::PEER_PROBE_TIMEOUT,
        "the application's hello did not wait for the role decision"
    );
    server.shutdown(true).unwrap();
}

/// A member that takes connections but never answers may be a server that
/// took over while this one was down: a restarted former primary serves
/// nothing until it answers or stops taking connections.
#[test]
fn a_restarting_primary_does_not_serve_beside_a_member_that_takes_connections_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let member = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let member_addr = member.local_addr().unwrap().to_string();
    // Connections are taken and never answered, as by a stopped process
    // (whose kernel completes the handshakes); counted.
    let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = taken.clone();
    member.set_nonblocking(true).unwrap();
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        let until = Instant::now() + Duration::from_secs(60);
        while stopped.try_recv().is_err() && Instant::now() < until {
            match member.accept() {
                Ok((s, _)) => {
                    held.push(s);
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        // Gone: the listener and every connection close.
    });
    former_primary(&tmp.path().join("repo"), 6, &member_addr);
    let server = spawn(config(tmp.path())).unwrap();
    // The first probe gives up after 2 s; the answer is then "not yet".
    let mut app = Conn::raw(server.local_addr());
    match app
        .call(hello(SessionRole::Application, PROTOCOL_VERSION))
        .body
    {
        ResponseBody::Hello { role, .. } => assert_eq!(role, ServerRole::Deposed),
        other => panic!("hello: {other:?}"),
    }
    match app.call(RequestBody::Commit(CommitBody::default())).body {
        ResponseBody::Error {
            error: WireError::WrongServer { .. },
            ..
        } => {}
        other => panic!("a commit while held: {other:?}"),
    }
    let mut admin =
        Conn::open_expecting(server.local_addr(), SessionRole::Admin, ServerRole::Deposed);
    match admin.call(RequestBody::Status).body {
        ResponseBody::Status(s) => assert_eq!(s.role, ServerRole::Deposed),
        other => panic!("status: {other:?}"),
    }
    // Held, it takes three connections in all (the probe's, a bare one to
    // see whether connections are taken, and one it waits on) and makes
    // no more while nothing happens to them: a probe on a timer would
    // fill a stopped process's accept queue until new connections time
    // out and the member reads as gone (one every 3.5 s or so).
    let deadline = Instant::now() + Duration::from_secs(30);
    while taken.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "no connection to wait on");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        taken.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "connections to the silent member while nothing changed"
    );
    Conn::open_expecting(
        server.local_addr(),
        SessionRole::Application,
        ServerRole::Deposed,
    );
    // Gone for good: the next round finds nobody and serves.
    stop.send(()).unwrap();
    holder.join().unwrap();
    wait_for_primary(server.local_addr(), "once the member is gone");
    server.shutdown(true).unwrap();
}

/// A stopped process's kernel queues connections until its accept queue
/// is full, then drops new ones, which time out like a dead host's (as
/// clients retrying that server fill it): the hold must outlast that.
#[test]
fn a_held_restart_outlasts_a_full_accept_queue_of_a_stopped_member() {
    let tmp = tempfile::tempdir().unwrap();
    // Never accepted: room for five connections (backlog 4, plus one).
    let (member, member_addr) = stopped_listener(4);
    former_primary(&tmp.path().join("repo"), 6, &member_addr);
    let member_addr: SocketAddr = member_addr.parse().unwrap();
    let server = spawn(config(tmp.path())).unwrap();
    Conn::open_expecting(
        server.local_addr(),
        SessionRole::Application,
        ServerRole::Deposed,
    );
    // The probe, the bare check and the held connection are queued; fill
    // the rest, as clients retrying the stopped server would.
    let fillers: Vec<_> = (0..4)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&member_addr, Duration::from_millis(300)).ok()
        })
        .collect();
    // Past a few rounds of a probe on a timer (about 3.5 s each), whose
    // connections would now time out as if the member were gone.
    std::thread::sleep(Duration::from_secs(8));
    Conn::open_expecting(
        server.local_addr(),
        SessionRole::Application,
        ServerRole::Deposed,
    );
    // Gone: its queued connections are reset, and the server serves.
    drop(fillers);
    drop(member);
    wait_for_primary(server.local_addr(), "once the member is gone");
    server.shutdown(true).unwrap();
}

/// Wait (30 s at most) until the server at `addr` greets applications as
/// the primary; `when` says what the test waits for.
fn wait_for_primary(addr: SocketAddr, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = Conn::raw(addr);
        match c
            .call(hello(SessionRole::Application, PROTOCOL_VERSION))
            .body
        {
            ResponseBody::Hello {
                role: ServerRole::Primary,
                ..
            } => return,
            ResponseBody::Hello { .. } if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => panic!("hello {when}: {other:?}"),
        }
    }
}

/// A listener that never accepts: a stopped process's port, with room
/// for about `backlog + 1` connections in its accept queue.
fn stopped_listener(backlog: i32) -> (socket2::Socket, String) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).unwrap();
    socket.listen(backlog).unwrap();
    let addr = socket
        .local_addr()
        .unwrap()
        .as_socket()
        .unwrap()
        .to_string();
    (socket, addr)
}

/// When one of two silent members changes, a held restart asks everyone
/// again; the other, whose accept queue has filled up by then (partly
/// with the hold's own connections), only times out, and must still hold
/// it rather than read as gone.
#[test]
fn a_held_restart_still_holds_for_a_silent_member_whose_queue_filled() {
    let tmp = tempfile::tempdir().unwrap();
    // Room for the first probe's two connections.
    let (stopped, stopped_addr) = stopped_listener(1);
    let (closing, closing_addr) = stopped_listener(16);
    former_primary_of(
        &tmp.path().join("repo"),
        &[(6, &stopped_addr), (7, &closing_addr)],
    );
    let server = spawn(config(tmp.path())).unwrap();
    Conn::open_expecting(
        server.local_addr(),
        SessionRole::Application,
        ServerRole::Deposed,
    );
    // Whatever room is left, clients retrying the stopped server take.
    let addr: SocketAddr = stopped_addr.parse().unwrap();
    let fillers: Vec<_> = (0..4)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()
        })
        .collect();
    // Member 7 goes away: its connections are reset, the hold on it ends
    // and everyone is asked again. Reads name who holds the restart up.
    drop(closing);
    let held_by = |app: &mut Conn| {
        let refused = app.error(RequestBody::Read {
            oid: 1,
            depth: 0,
            required_progress: Default::default(),
        });
        format!("{refused:?}")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut app = Conn::open_expecting(
            server.local_addr(),
            SessionRole::Application,
            ServerRole::Deposed,
        );
        let why = held_by(&mut app);
        assert!(
            why.contains(&stopped_addr),
            "held, but not for {stopped_addr}: {why}"
        );
        if !why.contains(&closing_addr) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still held for {closing_addr}: {why}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Asked again, and still held: a few seconds more change nothing.
    std::thread::sleep(Duration::from_secs(3));
    let mut app = Conn::open_expecting(
        server.local_addr(),
        SessionRole::Application,
        ServerRole::Deposed,
    );
    assert!(held_by(&mut app).contains(&stopped_addr));
    drop(fillers);
    drop(stopped);
    server.shutdown(true).unwrap();
}

/// A held restart also listens for the members it could not reach: one
/// that comes back and answers ends the hold, as at the first probe.
#[test]
fn a_held_restart_goes_on_once_a_member_it_could_not_reach_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let (silent, silent_addr) = stopped_listener(16);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    // Bound, so nobody else takes the port, but not listening yet:
    // connections to it are refused.
    let later = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    later.bind(&any.into()).unwrap();
    let later_addr = later.local_addr().unwrap().as_socket().unwrap();
    let (repository_id, last) = former_primary_of(
        &tmp.path().join("repo"),
        &[(6, &silent_addr), (7, &later_addr.to_string())],
    );
    // The fake member never acknowledges replication: with a synchronous
    // secondary the node change the new primary commits would never finish.
    let server = spawn(Config {
        sync_replicas: 0,
        ..config(tmp.path())
    })
    .unwrap();
    let mut admin =
        Conn::open_expecting(server.local_addr(), SessionRole::Admin, ServerRole::Deposed);
    let node = match admin.call(RequestBody::GetNode).body {
        ResponseBody::Node { node, .. } => node,
        other => panic!("node: {other:?}"),
    };
    // Member 7 comes up: a secondary of this server's epoch.
    later.listen(16).unwrap();
    let listener: std::net::TcpListener = later.into();
    fake_peer(listener, last, move |req| match req {
        RequestBody::Hello { .. } => ResponseBody::Hello {
            protocol_version: PROTOCOL_VERSION,
            server_id: 7,
            repository_id: repository_id.clone(),
            role: ServerRole::Secondary,
            node: node.clone(),
            epoch: crate::types::Epoch::initial(5),
        },
        _ => ResponseBody::Ok,
    });
    wait_for_primary(server.local_addr(), "once member 7 answers");
    drop(silent);
    server.shutdown(true).unwrap();
}

/// A member slower to answer than a probe waits still ends the hold: the
/// answer the held connection got counts.
#[test]
fn a_held_restart_goes_on_once_a_slow_member_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let member_addr = listener.local_addr().unwrap().to_string();
    let (repository_id, last) = former_primary(&tmp.path().join("repo"), 7, &member_addr);
    let node = crate::types::Node {
        members: vec![
            crate::types::Member {
                server_id: 5,
                addr: "127.0.0.1:1".into(),
                role: crate::types::MemberRole::Primary,
            },
            crate::types::Member {
                server_id: 7,
                addr: member_addr.clone(),
                role: crate::types::MemberRole::Secondary,
            },
        ],
    };
    // A secondary of this server's epoch that takes 3 s over each hello
    // (a probe waits 2 s).
    fake_peer(listener, last, move |req| match req {
        RequestBody::Hello { .. } => {
            std::thread::sleep(Duration::from_secs(3));
            ResponseBody::Hello {
                protocol_version: PROTOCOL_VERSION,
                server_id: 7,
                repository_id: repository_id.clone(),
                role: ServerRole::Secondary,
                node: node.clone(),
                epoch: crate::types::Epoch::initial(5),
            }
        }
        _ => ResponseBody::Ok,
    });
    // It never acknowledges replication: see the test above.
    let server = spawn(Config {
        sync_replicas: 0,
        ..config(tmp.path())
    })
    .unwrap();
    wait_for_primary(server.local_addr(), "once the slow member answered");
    server.shutdown(true).unwrap();
}

#[test]
fn a_secondary_that_cannot_apply_a_logged_record_stops() {
    use crate::protocol::ReplicateAck;
    use crate::storage::record::{CommitRecord, Op, Payload};

    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let primary = primary_with_backup_at(tmp.path(), &cfg.dir);
    let info = primary.info();
    // In sequence, in the chain, of the right epoch (so it is logged), but
    // appending to a collection nobody created: applying it fails.
    let bad = CommitRecord {
        number: info.last_commit + 1,
        epoch: info.epoch,
        prev_hash: info.last_hash,
        payload: Payload {
            token: None,
            ops: vec![Op::Append {
                coll: 999_999,
                index: 0,
                value: vec![0xc0],
            }],
        },
    }
    .encode();
    let server = spawn(cfg).unwrap();
    let mut peer = Conn::raw(server.local_addr());
    peer.call(hello(SessionRole::Peer, PROTOCOL_VERSION));
    match peer
        .call(RequestBody::Replicate {
            epoch: info.epoch,
            primary_id: 7,
            records: vec![serde_bytes::ByteBuf::from(bad)],
            primary_last: info.last_commit + 1,
            ack: ReplicateAck::Durable,
        })
        .body
    {
        ResponseBody::Error {
            error: WireError::Internal { .. },
            ..
        } => {}
        other => panic!("a record that cannot be applied was answered {other:?}"),
    }
    // The server stops by itself.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(server.join()));
    let end = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server went on after a half-applied record");
    assert!(end.is_err(), "a fatal stop is reported as an error");
}

#[test]
fn a_received_record_that_does_not_parse_is_refused_not_fatal() {
    use crate::protocol::ReplicateAck;

    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let mut primary = primary_with_backup_at(tmp.path(), &cfg.dir);
    let info = primary.info();
    // A good record (a node change: the secondary must learn it), then a
    // damaged one, in one batch.
    let mut node = primary.anchor().unwrap().node;
    node.members.push(crate::types::Member {
        server_id: 99,
        addr: "127.0.0.1:2".into(),
        role: crate::types::MemberRole::Secondary,
    });
    primary
        .commit(crate::storage::CommitRequest {
            set_node: Some(node),
            ..Default::default()
        })
        .unwrap();
    let good = primary
        .read_records(info.last_commit + 1, 1, 1 << 20)
        .unwrap();
    let damaged = serde_bytes::ByteBuf::from(vec![1, 2, 3]);
    let server = spawn(cfg).unwrap();
    let mut peer = Conn::raw(server.local_addr());
    peer.call(hello(SessionRole::Peer, PROTOCOL_VERSION));
    let mut replicate = |records: Vec<serde_bytes::ByteBuf>| {
        peer.call(RequestBody::Replicate {
            epoch: info.epoch,
            primary_id: 7,
            records,
            primary_last: info.last_commit + 2,
            ack: ReplicateAck::Durable,
        })
        .body
    };
    // The good one is applied and reported; the damaged one is refused
    // when it comes again.
    match replicate(vec![
        serde_bytes::ByteBuf::from(good[0].clone()),
        damaged.clone(),
    ]) {
        ResponseBody::Replicated { applied, .. } => assert_eq!(applied, info.last_commit + 1),
        other => panic!("a batch with a good first record was answered {other:?}"),
    }
    match replicate(vec![damaged]) {
        ResponseBody::Error {
            error: WireError::BadRequest { .. },
            ..
        } => {}
        other => panic!("a damaged record was answered {other:?}"),
    }
    // Nothing of it was logged or applied: the server goes on serving,
    // and knows the node the good record set.
    let mut app = Conn::open_expecting(
        server.local_addr(),
        SessionRole::Application,
        ServerRole::CatchingUp,
    );
    match app.call(RequestBody::GetNode).body {
        ResponseBody::Node { node, .. } => assert_eq!(node.members.len(), 2),
        other => panic!("node: {other:?}"),
    }
    server.shutdown(true).unwrap();
}

#[test]
fn a_read_waiting_at_shutdown_is_answered_shutting_down() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(config(tmp.path())).unwrap();
    let mut app = Conn::open(server.local_addr(), SessionRole::Application);
    // A read that waits for a commit that will not come (up to 1 s).
    let id = app.send(RequestBody::ReadRoot {
        depth: 0,
        required_progress: Some(1_000_000),
    });
    stop_answering_shutting_down(&server, &mut app, &[id]);
    server.join().unwrap();
}

/// Hold the server's storage thread, as a long digest or snapshot would,
/// until the returned sender is used (or for 60 s).
fn hold_storage(server: &ServerThread) -> crossbeam_channel::Sender<()> {
    let (holding_tx, holding) = crossbeam_channel::bounded(1);
    let (release, release_rx) = crossbeam_channel::bounded::<()>(1);
    server.storage.do_send(crate::actors::storage::Hold {
        holding: holding_tx,
        release: release_rx,
    });
    holding
        .recv_timeout(Duration::from_secs(10))
        .expect("the storage thread holds");
    release
}

/// Stop `server` gracefully while `app` has sent the requests `ids`:
/// each is answered `shutting_down`, in order, then the connection closes.
fn stop_answering_shutting_down(server: &ServerThread, app: &mut Conn, ids: &[u64]) {
    let stop = server.shutdown_handle();
    std::thread::spawn(move || stop.shutdown(false));
    for &expected in ids {
        let r = app.recv();
        assert_eq!(r.id, expected);
        match r.body {
            ResponseBody::Error {
                error: WireError::ShuttingDown,
                ..
            } => {}
            other => panic!("request {expected}: expected shutting_down, got {other:?}"),
        }
    }
    app.assert_closed();
}

/// After a restart on `dir`, collection `coll` holds nothing: a commit
/// answered `shutting_down` was not applied.
fn assert_empty_after_restart(dir: &std::path::Path, coll: u64) {
    let server = spawn(config(dir)).unwrap();
    let mut app = Conn::open(server.local_addr(), SessionRole::Application);
    match app
        .call(RequestBody::CollectionLength {
            coll,
            required_progress: None,
        })
        .body
    {
        ResponseBody::Length { len } => assert_eq!(len, 0),
        other => panic!("length: {other:?}"),
    }
    server.shutdown(true).unwrap();
}

#[test]
fn a_commit_that_reaches_a_closing_session_is_answered_shutting_down_not_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(config(tmp.path())).unwrap();
    let mut app = Conn::open(server.local_addr(), SessionRole::Application);
    let (_, coll) = make_root_with_collection(&mut app);
    // A read that waits for a commit that will not come, and behind it,
    // pipelined, a commit: the session reads it only once the read is
    // done, which is after the shutdown began.
    let read = app.send(RequestBody::ReadRoot {
        depth: 0,
        required_progress: Some(1_000_000),
    });
    let commit = app.send(append_request(coll, "late"));
    stop_answering_shutting_down(&server, &mut app, &[read, commit]);
    server.join().unwrap();
    assert_empty_after_restart(tmp.path(), coll);
}

#[test]
fn a_request_behind_one_stuck_at_shutdown_is_answered_not_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(config(tmp.path())).unwrap();
    let mut app = Conn::open(server.local_addr(), SessionRole::Application);
    let (_, coll) = make_root_with_collection(&mut app);
    // The storage thread held (as by a long digest): a read waits for it,
    // for longer than a shutdown waits for a session, and a commit waits
    // behind the read, unread.
    let release = hold_storage(&server);
    let read = app.send(RequestBody::CollectionLength {
        coll,
        required_progress: None,
    });
    let commit = app.send(append_request(coll, "late"));
    // Both answered while the storage thread is still held: the read's
    // answer does not wait for its work, nor the commit for the read.
    stop_answering_shutting_down(&server, &mut app, &[read, commit]);
    release.send(()).unwrap();
    server.join().unwrap();
    assert_empty_after_restart(tmp.path(), coll);
}

#[test]
fn a_secondary_that_refuses_our_records_is_removed_and_commits_go_on() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(config(tmp.path())).unwrap();
    let addr = server.local_addr();
    let repository_id = server.repository_id().to_string();
    // A "secondary" that says hello and refuses every record as invalid
    // (as a version that cannot read them would).
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_addr = fake.local_addr().unwrap().to_string();
    let refused = std::sync::Arc::new(AtomicUsize::new(0));
    let count = refused.clone();
    let rid = repository_id.clone();
    fake_peer(fake, 0, move |req| match req {
        RequestBody::Hello { .. } => ResponseBody::Hello {
            protocol_version: PROTOCOL_VERSION,
            server_id: 42,
            repository_id: rid.clone(),
            role: ServerRole::CatchingUp,
            node: Default::default(),
            epoch: Default::default(),
        },
        RequestBody::Replicate { records, .. } if !records.is_empty() => {
            count.fetch_add(1, Ordering::SeqCst);
            ResponseBody::Error {
                message: "cannot read this record".into(),
                error: WireError::BadRequest {
                    reason: "cannot read this record".into(),
                },
            }
        }
        RequestBody::Replicate { .. } => ResponseBody::Replicated {
            applied: 0,
            durable: 0,
        },
        _ => ResponseBody::Ok,
    });
    // It catches up (nothing to pull) and is added to the node.
    let mut peer = Conn::open_expecting(addr, SessionRole::Peer, ServerRole::Primary);
    let mut app = Conn::open(addr, SessionRole::Application);
    let last = app.call(RequestBody::Ping).commit;
    match peer
        .call(RequestBody::CatchUp {
            from: last + 1,
            max_count: 100,
            max_bytes: 1 << 20,
            server_id: 42,
            addr: fake_addr,
            repository_id,
            for_promotion: false,
        })
        .body
    {
        ResponseBody::Records { .. } => {}
        other => panic!("catch_up: {other:?}"),
    }
    // Its refusal of the records (the node change adding it first) gets it
    // removed: the commit, which would wait for it, completes.
    let (_, coll) = make_root_with_collection(&mut app);
    // The records reach it on the primary's stream, which need not have
    // sent them by the time the commit (not waiting for a joiner) is done.
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no record was ever sent to it");
        std::thread::sleep(Duration::from_millis(10));
    }
    loop {
        match app.call(RequestBody::GetNode).body {
            ResponseBody::Node { node, .. } if node.members.len() == 1 => break,
            ResponseBody::Node { .. } => assert!(Instant::now() < deadline, "still a member"),
            other => panic!("node: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    append(&mut app, coll, "after");
    server.shutdown(true).unwrap();
}

/// Error texts quote at most 256 bytes of what a client sent (an
/// operator's address, a peer's repository id), however long it was.
#[test]
fn error_texts_quote_at_most_256_bytes_of_client_input() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(config(tmp.path())).unwrap();
    let mut admin = Conn::open(server.local_addr(), SessionRole::Admin);
    // Within the test server's 4 KiB frame limit.
    let long = format!("{}:1", "h".repeat(2000));
    match admin.error(RequestBody::RemoveSecondary { addr: long.clone() }) {
        WireError::Unavailable { reason } => {
            assert!(reason.contains("(2002 bytes)"), "{reason}");
            assert!(reason.len() < 400, "{} bytes: {reason:.300}", reason.len());
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    match admin.error(RequestBody::Follow { primary: long }) {
        WireError::Unavailable { reason } | WireError::BadRequest { reason } => {
            assert!(reason.len() < 600, "{} bytes: {reason:.300}", reason.len())
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    server.shutdown(true).unwrap();
}

/// A client that writes a whole oversized frame at once (header and body,
/// as the Python client of PROTOCOL.md does) reads the `frame_too_large`
/// reply: the server reads and drops what follows before it closes, so the
/// close is not a reset that destroys the reply on its way.
#[test]
fn a_client_sending_a_whole_oversized_frame_reads_the_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let server = spawn(config(tmp.path())).unwrap();
    let mut c = Conn::open(server.local_addr(), SessionRole::Application);
    // The test server's limit is 4 KiB; 2 MiB more than the socket buffers
    // take at once, so the server closes while the body still comes.
    let body = vec![0x90u8; 2 << 20];
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    c.stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let written = c.stream.write_all(&frame);
    let reply = read_frame(&mut c.stream, 1 << 20);
    match (&written, &reply) {
        (Ok(()), Ok(bytes)) => {
            let r: Response = codec::decode(bytes).unwrap();
            assert!(
                matches!(
                    r.body,
                    ResponseBody::Error {
                        error: WireError::FrameTooLarge { .. },
                        ..
                    }
                ),
                "{r:?}"
            );
        }
        _ => panic!("the refusal was lost: write {written:?}, read {reply:?}"),
    }
    server.shutdown(true).unwrap();
}

/// A secondary whose log the primary's stream does not continue (it holds
/// a record a failover lost) stops serving: deposed, it refuses reads, as
/// well as the commits that would make it take over.
#[test]
fn a_secondary_whose_log_diverged_from_the_stream_is_deposed() {
    use crate::protocol::ReplicateAck;

    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    // The node's later primary: the same history up to here, then its own.
    let mut fork = forked_backup(tmp.path(), &cfg.dir, 2);
    let (epoch, base) = (fork.epoch, fork.base);
    let next = vec![serde_bytes::ByteBuf::from(fork.new_record(base + 2))];
    let lost = vec![serde_bytes::ByteBuf::from(fork.lost.clone())];

    let server = spawn(cfg).unwrap();
    let mut peer = Conn::raw(server.local_addr());
    assert!(matches!(
        peer.call(hello(SessionRole::Peer, PROTOCOL_VERSION)).body,
        ResponseBody::Hello { .. }
    ));
    let mut replicate = |records: Vec<serde_bytes::ByteBuf>| {
        peer.call(RequestBody::Replicate {
            epoch,
            primary_id: 7,
            records,
            primary_last: base + 2,
            ack: ReplicateAck::Applied,
        })
        .body
    };
    assert!(matches!(replicate(lost), ResponseBody::Replicated { .. }));
    match replicate(next) {
        ResponseBody::Error {
            error: WireError::Diverged { number },
            ..
        } => assert_eq!(number, base + 2),
        other => panic!("expected diverged, got {other:?}"),
    }
    let mut admin = Conn::raw(server.local_addr());
    admin.call(hello(SessionRole::Admin, PROTOCOL_VERSION));
    assert_deposed_and_refusing_reads(server, &mut admin);
}

/// Wait (10 s at most) until `server` says it is deposed; then it must
/// refuse an application's read and an operator's follow. Shuts it down.
fn assert_deposed_and_refusing_reads(server: ServerThread, admin: &mut Conn) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match admin.call(RequestBody::Status).body {
            ResponseBody::Status(s) if s.role == ServerRole::Deposed => break,
            ResponseBody::Status(s) if Instant::now() < deadline => {
                let _ = s;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => panic!("still not deposed: {other:?}"),
        }
    }
    let mut app = Conn::raw(server.local_addr());
    app.call(hello(SessionRole::Application, PROTOCOL_VERSION));
    match app.error(RequestBody::ReadRoot {
        depth: 0,
        required_progress: None,
    }) {
        WireError::Unavailable { reason } => assert!(reason.contains("deposed"), "{reason}"),
        other => panic!("a deposed server must refuse reads: {other:?}"),
    }
    // Nor is it pointed at a primary again: it says why, and stays deposed.
    match admin.error(RequestBody::Follow {
        primary: "127.0.0.1:1".into(),
    }) {
        WireError::Unavailable { reason } => assert!(reason.contains("deposed"), "{reason}"),
        other => panic!("a deposed server must refuse to follow: {other:?}"),
    }
    match admin.call(RequestBody::Status).body {
        ResponseBody::Status(s) => assert_eq!(s.role, ServerRole::Deposed),
        other => panic!("{other:?}"),
    }
    server.shutdown(true).unwrap();
}

/// Forwards what a broadcaster reports into a channel.
struct Reports(std::sync::mpsc::Sender<String>);

impl actix::Actor for Reports {
    type Context = actix::Context<Self>;
}

impl actix::Handler<crate::actors::broadcast::ReplicaAck> for Reports {
    type Result = ();
    fn handle(&mut self, m: crate::actors::broadcast::ReplicaAck, _: &mut Self::Context) {
        let _ = self.0.send(format!("durable {}", m.durable));
    }
}

impl actix::Handler<crate::actors::broadcast::ReplicaTrouble> for Reports {
    type Result = ();
    fn handle(&mut self, m: crate::actors::broadcast::ReplicaTrouble, _: &mut Self::Context) {
        let _ = self
            .0
            .send(format!("trouble {:?}: {}", m.diverged, m.reason));
    }
}

/// After a failover a secondary may hold a former primary's record under a
/// number the new primary holds too. A stream that starts after that
/// number (the new primary restarted, or has just promoted) sends a
/// heartbeat first, and the secondary answers that it holds the record.
/// That must not count as holding the new primary's: the record goes
/// again, the secondary compares it with its own and refuses it, and the
/// broadcaster reports the divergence without ever crediting it.
#[test]
fn a_secondary_holding_another_record_under_our_number_is_never_credited_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let fork = forked_backup(tmp.path(), &cfg.dir, 1);
    let (epoch, base) = (fork.epoch, fork.base);
    let server = spawn(cfg).unwrap();
    take_replicated(&server, epoch, fork.lost, base);

    let first = stream_from(fork.new, epoch, base + 1, &server, |r| {
        r.starts_with("trouble") || r.starts_with("durable")
    });
    assert!(
        first.starts_with("trouble") && first.contains(&format!("Some({})", base + 1)),
        "credited with another primary's record: {first}"
    );
    server.shutdown(true).unwrap();
}

/// Run a broadcaster of `primary` (epoch `epoch`, its last commit
/// `primary_last`, its stream starting after it as after a restart) to
/// `secondary` until it reports something `wanted`; that report.
fn stream_from(
    mut primary: crate::storage::Repository,
    epoch: crate::types::Epoch,
    primary_last: u64,
    secondary: &ServerThread,
    wanted: impl Fn(&str) -> bool,
) -> String {
    use crate::actors::broadcast::{BroadcastActor, LinkSettings};
    use crate::actors::storage::{Identity, StorageActor};
    use crate::protocol::ReplicateAck;
    use actix::Actor;

    let (tx, rx) = std::sync::mpsc::channel();
    let addr = secondary.local_addr().to_string();
    actix::System::new().block_on(async move {
        let identity = Identity::of(&mut primary).unwrap();
        let storage = StorageActor::start(
            primary,
            tokio::sync::watch::channel(0).0,
            tokio::sync::watch::channel(identity).0,
            Duration::ZERO,
        );
        let reports = Reports(tx).start();
        let settings = LinkSettings {
            replica_timeout: Duration::from_secs(30),
            call_timeout: Duration::from_secs(5),
            coalesce: None,
            max_in_flight: 4,
            ack: ReplicateAck::Durable,
        };
        let member = crate::types::Member {
            server_id: 2,
            addr,
            role: crate::types::MemberRole::Secondary,
        };
        let _b = BroadcastActor::new(
            member,
            9,
            epoch,
            primary_last + 1,
            primary_last,
            storage,
            reports.clone().recipient(),
            reports.recipient(),
            settings,
        )
        .start();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match rx.try_recv() {
                Ok(r) if wanted(&r) => return r,
                Ok(_) => {}
                Err(_) if Instant::now() < deadline => {
                    actix_rt::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("no report within 10 s: {e}"),
            }
        }
    })
}

/// A primary started from a backup holds no log record up to its
/// snapshot: its secondary's last record cannot be sent to compare. Its
/// hash is compared instead, and the secondary, a copy of the same
/// backup, is credited with holding it durably (a quiet node, where no
/// next record would be chained onto it).
#[test]
fn a_primary_started_from_a_backup_credits_its_secondary_by_hash() {
    use crate::storage::Repository;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let mut old = primary_with_backup_at(tmp.path(), &cfg.dir);
    let restored_dir = tmp.path().join("restored");
    old.snapshot(&tmp.path().join("scratch2"))
        .unwrap()
        .copy_to(&restored_dir)
        .unwrap();
    drop(old);
    let mut restored = Repository::open(&restored_dir).unwrap();
    restored.set_restore_mode(false).unwrap();
    let (last, epoch) = (restored.info().last_commit, restored.info().epoch);
    assert!(
        restored.read_records(last, 1, 1 << 20).is_err(),
        "the restored copy must hold no record to send"
    );
    let server = spawn(cfg).unwrap();
    let first = stream_from(restored, epoch, last, &server, |r| {
        r.starts_with("trouble") || r.starts_with("durable")
    });
    assert_eq!(first, format!("durable {last}"));
    server.shutdown(true).unwrap();
}

/// Two copies of one repository that part after its first commits: the
/// node's backup at `dir` (restore mode), the old primary's next record
/// (`lost`, number `base + 1`), and a new primary holding `new_records`
/// records of its own instead.
struct Fork {
    epoch: crate::types::Epoch,
    repository_id: String,
    lost: Vec<u8>,
    new: crate::storage::Repository,
    base: u64,
}

fn forked_backup(tmp: &std::path::Path, dir: &std::path::Path, new_records: u8) -> Fork {
    use crate::storage::{CommitRequest, Repository};
    let mut old = primary_with_backup_at(tmp, dir);
    let fork_dir = tmp.join("fork");
    old.snapshot(&tmp.join("scratch2"))
        .unwrap()
        .copy_to(&fork_dir)
        .unwrap();
    let mut new = Repository::open(&fork_dir).unwrap();
    new.set_restore_mode(false).unwrap();
    let base = old.info().last_commit;
    let meta = |v: u8| CommitRequest {
        meta: vec![("k".into(), Some(vec![v]))],
        ..Default::default()
    };
    old.commit(meta(1)).unwrap();
    for v in 0..new_records {
        new.commit(meta(2 + v)).unwrap();
    }
    let info = old.info();
    Fork {
        epoch: info.epoch,
        repository_id: info.repository_id.to_string(),
        lost: old.read_records(base + 1, 1, 1 << 20).unwrap().remove(0),
        new,
        base,
    }
}

impl Fork {
    /// The new primary's record `n`.
    fn new_record(&mut self, n: u64) -> Vec<u8> {
        self.new.read_records(n, 1, 1 << 20).unwrap().remove(0)
    }
}

/// `server` takes `record` (number `base + 1`) from a primary in `epoch`.
fn take_replicated(server: &ServerThread, epoch: crate::types::Epoch, record: Vec<u8>, base: u64) {
    use crate::protocol::ReplicateAck;
    let mut peer = Conn::raw(server.local_addr());
    peer.call(hello(SessionRole::Peer, PROTOCOL_VERSION));
    let took = peer.call(RequestBody::Replicate {
        epoch,
        primary_id: 7,
        records: vec![serde_bytes::ByteBuf::from(record)],
        primary_last: base + 1,
        ack: ReplicateAck::Durable,
    });
    assert!(
        matches!(took.body, ResponseBody::Replicated { applied, .. } if applied == base + 1),
        "{took:?}"
    );
}

/// A fake primary of `repository_id` in `epoch`: answers hello, and serves
/// `record` (number `base + 2`) to whoever catches up from it. Returns its
/// address and how many `catch_up` requests it got.
fn fake_primary(
    epoch: crate::types::Epoch,
    repository_id: String,
    record: Vec<u8>,
    base: u64,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use crate::types::{Member, MemberRole, Node};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let node = Node {
        members: vec![Member {
            server_id: 9,
            addr: addr.clone(),
            role: MemberRole::Primary,
        }],
    };
    let counter = asked.clone();
    fake_peer(listener, base + 2, move |req| match req {
        RequestBody::Hello { .. } => primary_hello(&repository_id, &node, epoch),
        RequestBody::CatchUp { from, .. } => {
            counter.fetch_add(1, Ordering::SeqCst);
            ResponseBody::Records {
                records: if *from == base + 2 {
                    vec![serde_bytes::ByteBuf::from(record.clone())]
                } else {
                    vec![]
                },
                last: base + 2,
                epoch,
                level: true,
            }
        }
        _ => ResponseBody::Ok,
    });
    (addr, asked)
}

/// A server on `cfg` that took `record` (number `base + 1`) from a primary
/// in `epoch`, then is told to follow `primary`; returns it and an admin
/// connection to it.
fn follower_holding(
    cfg: Config,
    epoch: crate::types::Epoch,
    record: Vec<u8>,
    base: u64,
    primary: String,
) -> (ServerThread, Conn) {
    let server = spawn(cfg).unwrap();
    take_replicated(&server, epoch, record, base);
    let mut admin = Conn::raw(server.local_addr());
    admin.call(hello(SessionRole::Admin, PROTOCOL_VERSION));
    let followed = admin.call(RequestBody::Follow { primary });
    assert!(matches!(followed.body, ResponseBody::Ok), "{followed:?}");
    (server, admin)
}

/// A secondary restarted after a failover may hold a former primary's last
/// record, which the new primary replaced. The glob it then pulls does not
/// continue its log: it is deposed (no reads of what the node does not
/// hold), not left in restore mode serving them.
#[test]
fn a_secondary_whose_log_a_caught_up_glob_does_not_continue_is_deposed() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let mut fork = forked_backup(tmp.path(), &cfg.dir, 2);
    let (epoch, base) = (fork.epoch, fork.base);
    let next = fork.new_record(base + 2);
    let (fake, _) = fake_primary(epoch, fork.repository_id, next, base);
    let (server, mut admin) = follower_holding(cfg, epoch, fork.lost, base, fake);
    assert_deposed_and_refusing_reads(server, &mut admin);
}

/// The same glob from a server of an older epoch than the copy's (a former
/// primary back, still serving as one) says nothing about the copy: it is
/// not deposed, does not take the glob, and goes on looking for the
/// primary.
#[test]
fn a_glob_from_a_server_of_an_older_epoch_deposes_nothing() {
    use std::sync::atomic::Ordering;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let mut fork = forked_backup(tmp.path(), &cfg.dir, 2);
    let (epoch, base) = (fork.epoch, fork.base);
    let next = fork.new_record(base + 2);
    let older = crate::types::Epoch {
        term: epoch.term - 1,
        server: epoch.server,
    };
    let (fake, asked) = fake_primary(older, fork.repository_id, next, base);
    let (server, mut admin) = follower_holding(cfg, epoch, fork.lost, base, fake);
    let deadline = Instant::now() + Duration::from_secs(10);
    while asked.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "not asked again");
        std::thread::sleep(Duration::from_millis(10));
    }
    match admin.call(RequestBody::Status).body {
        ResponseBody::Status(s) => {
            assert_ne!(s.role, ServerRole::Deposed);
            assert_eq!(s.commit, base + 1, "the stale glob was not applied");
        }
        other => panic!("{other:?}"),
    }
    server.shutdown(true).unwrap();
}

/// The ping rule's bound: a commit at a secondary whose primary answers
/// its hello only after a second (loaded, not dead) is redirected to it;
/// the secondary does not take the node over.
#[test]
fn a_commit_at_a_secondary_whose_primary_is_slow_but_alive_is_redirected() {
    use crate::storage::{CommitRequest, Repository};
    use crate::types::{Member, MemberRole, Node};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let primary = listener.local_addr().unwrap().to_string();
    let node = Node {
        members: vec![
            Member {
                server_id: 9,
                addr: primary.clone(),
                role: MemberRole::Primary,
            },
            Member {
                server_id: 5,
                addr: "127.0.0.1:1".into(),
                role: MemberRole::Secondary,
            },
        ],
    };
    let (repository_id, epoch, last) = {
        let mut repo = Repository::create(&cfg.dir, 5, "127.0.0.1:1").unwrap();
        repo.commit(CommitRequest {
            set_node: Some(node.clone()),
            ..Default::default()
        })
        .unwrap();
        repo.set_restore_mode(true).unwrap();
        repo.checkpoint().unwrap();
        let info = repo.info();
        (info.repository_id.to_string(), info.epoch, info.last_commit)
    };
    // The primary: level with the copy, answering every hello after 1 s.
    slow_primary(
        listener,
        node,
        repository_id,
        epoch,
        last,
        Duration::from_secs(1),
    );
    let server = spawn(cfg).unwrap();
    let mut app = Conn::raw(server.local_addr());
    app.call(hello(SessionRole::Application, PROTOCOL_VERSION));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match app.call(RequestBody::Status).body {
            ResponseBody::Status(s) if s.role == ServerRole::Secondary => break,
            ResponseBody::Status(s) => {
                assert!(Instant::now() < deadline, "never a secondary: {s:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
            other => panic!("{other:?}"),
        }
    }
    let body = CommitBody {
        meta: vec![("k".into(), Some(Value::from(1)))],
        ..Default::default()
    };
    match app.error(RequestBody::Commit(body)) {
        WireError::WrongServer { primary: to } => assert_eq!(to, Some(primary)),
        other => panic!("expected a redirect to the slow primary, got {other:?}"),
    }
    match app.call(RequestBody::Status).body {
        ResponseBody::Status(s) => assert_eq!(s.role, ServerRole::Secondary),
        other => panic!("{other:?}"),
    }
    server.shutdown(true).unwrap();
}

/// A fake primary on `listener` that answers every hello (as primary of
/// `node` in `epoch`) only after `delay`, and catch-ups as level at `last`.
fn slow_primary(
    listener: std::net::TcpListener,
    node: crate::types::Node,
    repository_id: String,
    epoch: crate::types::Epoch,
    last: u64,
    delay: Duration,
) {
    fake_peer(listener, last, move |req| match req {
        RequestBody::Hello { .. } => {
            std::thread::sleep(delay);
            primary_hello(&repository_id, &node, epoch)
        }
        RequestBody::CatchUp { .. } => ResponseBody::Records {
            records: vec![],
            last,
            epoch,
            level: true,
        },
        _ => ResponseBody::Ok,
    });
}

/// A former primary restarting asks its members who leads: one that is
/// the primary of a newer epoch but answers only after 1.25 s (slow, not
/// absent) still keeps it from serving as a second primary.
#[test]
fn a_restarting_former_primary_waits_for_a_slow_member_leading_a_newer_epoch() {
    use crate::types::{Epoch, Member, MemberRole, Node};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = listener.local_addr().unwrap().to_string();
    let (repository_id, last) = former_primary(&cfg.dir, 9, &other);
    // Server 9 took over (epoch 2) and leads a node without server 5.
    let node = Node {
        members: vec![Member {
            server_id: 9,
            addr: other,
            role: MemberRole::Primary,
        }],
    };
    let newer = Epoch::initial(5).next(9);
    slow_primary(
        listener,
        node,
        repository_id,
        newer,
        last,
        Duration::from_millis(1250),
    );
    let server = spawn(config(tmp.path())).unwrap();
    // An application's hello waits for the role decision.
    let mut app = Conn::raw(server.local_addr());
    app.call(hello(SessionRole::Application, PROTOCOL_VERSION));
    match app.call(RequestBody::Status).body {
        ResponseBody::Status(s) => assert_ne!(
            s.role,
            ServerRole::Primary,
            "served as primary beside the newer epoch's: {s:?}"
        ),
        other => panic!("{other:?}"),
    }
    server.shutdown(true).unwrap();
}

/// A repository in `dir` whose server 5 was the primary of a node with one
/// secondary, `member` at `addr`, as a primary left it when it stopped.
/// Returns its repository id and last commit.
fn former_primary(dir: &std::path::Path, member: u64, addr: &str) -> (String, u64) {
    former_primary_of(dir, &[(member, addr)])
}

/// [`former_primary`] with several secondaries.
fn former_primary_of(dir: &std::path::Path, secondaries: &[(u64, &str)]) -> (String, u64) {
    use crate::storage::{CommitRequest, Repository};
    use crate::types::{Member, MemberRole, Node};
    let mut repo = Repository::create(dir, 5, "127.0.0.1:1").unwrap();
    let mut members = vec![Member {
        server_id: 5,
        addr: "127.0.0.1:1".into(),
        role: MemberRole::Primary,
    }];
    members.extend(secondaries.iter().map(|(id, addr)| Member {
        server_id: *id,
        addr: (*addr).into(),
        role: MemberRole::Secondary,
    }));
    repo.commit(CommitRequest {
        set_node: Some(Node { members }),
        ..Default::default()
    })
    .unwrap();
    repo.checkpoint().unwrap();
    let info = repo.info();
    (info.repository_id.to_string(), info.last_commit)
}

/// Serve every connection to `listener` on its own thread: each request is
/// answered with `answer(request)`, every response carrying `commit`.
fn fake_peer<F>(listener: std::net::TcpListener, commit: u64, answer: F)
where
    F: Fn(&RequestBody) -> ResponseBody + Clone + Send + 'static,
{
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let answer = answer.clone();
            std::thread::spawn(move || {
                while let Ok(frame) = read_frame(&mut s, codec::DEFAULT_MAX_FRAME) {
                    let req: Request = codec::decode(&frame).unwrap();
                    let resp = Response {
                        id: req.id,
                        commit,
                        body: answer(&req.body),
                    };
                    if write_frame(&mut s, &resp).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// The hello of a fake primary, server 9, of `node` in `epoch`.
fn primary_hello(
    repository_id: &str,
    node: &crate::types::Node,
    epoch: crate::types::Epoch,
) -> ResponseBody {
    ResponseBody::Hello {
        protocol_version: PROTOCOL_VERSION,
        server_id: 9,
        repository_id: repository_id.to_string(),
        role: ServerRole::Primary,
        node: node.clone(),
        epoch,
    }
}
