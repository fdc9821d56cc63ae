//! Session behaviour against fake servers (threads speaking the protocol):
//! routing, read failover, `behind` retries, commit redirects, unknown
//! outcomes and resolving them with `commit_status`. The real cluster suite lives in `tests/cluster/`.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rmpv::Value;

use crate::client::{ClientError, ConnectOptions, Ref, Session, SessionOptions};
use crate::protocol::codec::{self, DEFAULT_MAX_FRAME};
use crate::protocol::*;
use crate::types::{Epoch, Member, MemberRole, Node};

type Handler = dyn Fn(&RequestBody) -> Option<ResponseBody> + Send + Sync;

/// A fake server: answers each request with its handler (`None` closes the
/// connection without answering) and records what it was sent.
struct Fake {
    addr: String,
    listener: Option<TcpListener>,
    stop: Arc<AtomicBool>,
    /// The commit number every response carries.
    commit: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<RequestBody>>>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Fake {
    fn bind() -> Fake {
        Fake::bind_to("127.0.0.1:0")
    }

    fn bind_to(addr: &str) -> Fake {
        let listener = TcpListener::bind(addr).unwrap();
        Fake {
            addr: listener.local_addr().unwrap().to_string(),
            listener: Some(listener),
            stop: Arc::default(),
            commit: Arc::new(AtomicU64::new(10)),
            seen: Arc::default(),
            streams: Arc::default(),
            acceptor: None,
        }
    }

    fn serve(
        &mut self,
        handler: impl Fn(&RequestBody) -> Option<ResponseBody> + Send + Sync + 'static,
    ) {
        let handler: Arc<Handler> = Arc::new(handler);
        let listener = self.listener.take().unwrap();
        let (stop, seen, streams) = (self.stop.clone(), self.seen.clone(), self.streams.clone());
        let commit = self.commit.clone();
        self.acceptor = Some(thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut s) = stream else { continue };
                streams.lock().unwrap().push(s.try_clone().unwrap());
                let (handler, seen, commit) = (handler.clone(), seen.clone(), commit.clone());
                thread::spawn(move || {
                    while let Ok(frame) = codec::read_frame(&mut s, DEFAULT_MAX_FRAME) {
                        let req: Request = codec::decode(&frame).unwrap();
                        seen.lock().unwrap().push(req.body.clone());
                        let Some(body) = handler(&req.body) else {
                            break;
                        };
                        let resp = Response {
                            id: req.id,
                            commit: commit.load(Ordering::SeqCst),
                            body,
                        };
                        if std::io::Write::write_all(&mut s, &codec::encode(&resp)).is_err() {
                            break;
                        }
                    }
                    let _ = s.shutdown(Shutdown::Both);
                });
            }
        }));
    }

    /// Crash: close every connection and refuse new ones.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let _ = TcpStream::connect(&self.addr);
        if let Some(a) = self.acceptor.take() {
            a.join().unwrap();
        }
    }

    fn seen(&self) -> Vec<RequestBody> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self, pred: impl Fn(&RequestBody) -> bool) -> usize {
        self.seen().iter().filter(|b| pred(b)).count()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.kill();
    }
}

fn is_read(b: &RequestBody) -> bool {
    matches!(b, RequestBody::Read { .. })
}

fn is_commit(b: &RequestBody) -> bool {
    matches!(b, RequestBody::Commit(_))
}

fn token_of(b: &RequestBody) -> Option<Vec<u8>> {
    match b {
        RequestBody::Commit(c) => c.token.clone(),
        _ => None,
    }
}

fn node_of(members: &[(&Fake, MemberRole)]) -> Node {
    Node {
        members: members
            .iter()
            .enumerate()
            .map(|(i, (f, role))| Member {
                server_id: 100 + i as u64,
                addr: f.addr.clone(),
                role: *role,
            })
            .collect(),
    }
}

/// A node of `m` alone, as its primary (after a take-over, or a new
/// repository).
fn alone_as_primary(m: &Member) -> Node {
    Node {
        members: vec![Member {
            role: MemberRole::Primary,
            ..m.clone()
        }],
    }
}

fn hello(node: &Node, addr: &str) -> ResponseBody {
    let me = node.members.iter().find(|m| m.addr == addr).unwrap();
    ResponseBody::Hello {
        protocol_version: PROTOCOL_VERSION,
        server_id: me.server_id,
        repository_id: "r".into(),
        role: match me.role {
            MemberRole::Primary => ServerRole::Primary,
            MemberRole::Secondary => ServerRole::Secondary,
            MemberRole::Witness => ServerRole::Witness,
        },
        node: node.clone(),
        epoch: Epoch {
            term: 1,
            server: 100,
        },
    }
}

fn object(oid: u64) -> ResponseBody {
    ResponseBody::Objects {
        objects: vec![WireObject {
            oid,
            version: 3,
            class: "C".into(),
            value: Ref(oid + 1).to_value(),
            collection_len: None,
        }],
    }
}

fn committed() -> ResponseBody {
    ResponseBody::Committed {
        number: 11,
        new_oids: vec![],
        positions: vec![4],
    }
}

/// A server of `node` at `addr`; `extra` answers what it wants to, the
/// rest is hello / node / a read of any oid / a commit.
fn standard(
    node: Node,
    addr: String,
    extra: impl Fn(&RequestBody) -> Option<Option<ResponseBody>> + Send + Sync + 'static,
) -> impl Fn(&RequestBody) -> Option<ResponseBody> + Send + Sync + 'static {
    move |body| {
        if let Some(answer) = extra(body) {
            return answer;
        }
        Some(match body {
            RequestBody::Hello { .. } => hello(&node, &addr),
            RequestBody::GetNode => ResponseBody::Node {
                node: node.clone(),
                epoch: Epoch {
                    term: 1,
                    server: 100,
                },
                role: ServerRole::Secondary,
            },
            RequestBody::Read { oid, .. } => object(*oid),
            RequestBody::Commit(_) => committed(),
            _ => ResponseBody::Ok,
        })
    }
}

fn options() -> SessionOptions {
    SessionOptions {
        connect: ConnectOptions {
            connect_timeout: Duration::from_secs(2),
            read_timeout: Some(Duration::from_secs(5)),
            ..ConnectOptions::default()
        },
        reroute_timeout: Duration::from_secs(3),
        ..SessionOptions::default()
    }
}

/// A primary and one secondary, both answering normally.
fn pair() -> (Fake, Fake, Node) {
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    p.serve(standard(node.clone(), p.addr.clone(), |_| None));
    s.serve(standard(node.clone(), s.addr.clone(), |_| None));
    (p, s, node)
}

#[test]
fn reads_go_to_the_secondary_and_commits_to_the_primary() {
    let (p, s, _) = pair();
    let mut session = Session::connect_with(&[&p.addr], options()).unwrap();
    assert_eq!(session.read_server(), Some(s.addr.as_str()));
    assert_eq!(session.commit_server(), Some(p.addr.as_str()));
    let obj = session.read(5u64).unwrap();
    assert_eq!((obj.oid, obj.version), (5, 3));
    assert_eq!(obj.references(), vec![Ref(6)]);
    let (r, version): (Ref, u64) = session.get(Ref(7)).unwrap();
    assert_eq!((r, version), (Ref(8), 3));
    let out = session.append(Ref(9), &"x").unwrap();
    assert_eq!((out.number, out.positions.clone()), (11, vec![4]));
    assert_eq!(session.last_seen_commit(), 11);
    assert_eq!(s.count(is_read), 2);
    assert_eq!(p.count(is_read), 0);
    let commits: Vec<_> = p.seen().into_iter().filter(is_commit).collect();
    assert_eq!(commits.len(), 1);
    assert_eq!(token_of(&commits[0]).unwrap().len(), 16);
    assert_eq!(s.count(is_commit), 0);
}

#[test]
fn a_dead_secondary_is_invisible_to_reads() {
    let (p, mut s, _) = pair();
    let mut session = Session::connect_with(&[&s.addr], options()).unwrap();
    assert_eq!(session.read_server(), Some(s.addr.as_str()));
    session.read(1u64).unwrap();
    s.kill();
    assert_eq!(session.read(2u64).unwrap().oid, 2);
    assert_eq!(session.read_server(), Some(p.addr.as_str()));
    assert_eq!(p.count(is_read), 1);
    // The primary is told, so that it checks the secondary.
    let about_s = |b: &RequestBody| matches!(b, RequestBody::Complain { addr } if *addr == s.addr);
    assert_eq!(p.count(about_s), 1);
}

#[test]
fn every_server_dead_is_no_server_reachable() {
    let (mut p, mut s, _) = pair();
    let mut session = Session::connect_with(&[&p.addr], options()).unwrap();
    p.kill();
    s.kill();
    match session.read(1u64) {
        Err(e @ ClientError::NoServerReachable { .. }) => {
            assert!(e.to_string().contains(&p.addr), "{e}");
            assert!(e.is_retryable());
        }
        other => panic!("expected NoServerReachable, got {other:?}"),
    }
    let none: [&str; 1] = [&p.addr];
    assert!(matches!(
        Session::connect_with(&none, options()),
        Err(ClientError::NoServerReachable { .. })
    ));
}

#[test]
fn behind_is_retried_once_elsewhere() {
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    p.serve(standard(node.clone(), p.addr.clone(), |_| None));
    s.serve(standard(node.clone(), s.addr.clone(), |b| {
        is_read(b).then_some(Some(ResponseBody::Error {
            error: WireError::Behind {
                commit: 3,
                required: 50,
            },
            message: "behind".into(),
        }))
    }));
    let mut session = Session::connect_with(&[&s.addr], options()).unwrap();
    session.set_required_progress(50);
    assert_eq!(session.read(4u64).unwrap().oid, 4);
    assert_eq!(
        session.read_server(),
        Some(s.addr.as_str()),
        "keeps its read server"
    );
    assert_eq!((s.count(is_read), p.count(is_read)), (1, 1));
    assert_eq!(required_of_reads(&p), vec![Some(50)]);
}

/// The required progress of each read `f` was sent.
fn required_of_reads(f: &Fake) -> Vec<Option<u64>> {
    f.seen()
        .into_iter()
        .filter_map(|b| match b {
            RequestBody::Read {
                required_progress, ..
            } => Some(required_progress),
            _ => None,
        })
        .collect()
}

#[test]
fn commits_a_failover_lost_stop_being_required_once_the_new_primary_is_heard() {
    // The primary's replies counted commits up to 60, but only 56 reached
    // the secondary (55 was this session's, acknowledged) before the
    // primary died. The secondary takes over in epoch 2 at commit 56.
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    let after = alone_as_primary(&node.members[1]);
    let epoch2 = Epoch {
        term: 2,
        server: 101,
    };
    p.commit.store(60, Ordering::SeqCst);
    s.commit.store(56, Ordering::SeqCst);
    p.serve(standard(node.clone(), p.addr.clone(), |b| {
        is_commit(b).then_some(Some(ResponseBody::Committed {
            number: 55,
            new_oids: vec![],
            positions: vec![],
        }))
    }));
    let promoted = Arc::new(AtomicBool::new(false));
    let is_primary = promoted.clone();
    s.serve(standard(node.clone(), s.addr.clone(), move |b| {
        if !is_primary.load(Ordering::SeqCst) {
            return None;
        }
        Some(Some(match b {
            RequestBody::Hello { .. } => ResponseBody::Hello {
                protocol_version: PROTOCOL_VERSION,
                server_id: 101,
                repository_id: "r".into(),
                role: ServerRole::Primary,
                node: after.clone(),
                epoch: epoch2,
            },
            RequestBody::GetNode => ResponseBody::Node {
                node: after.clone(),
                epoch: epoch2,
                role: ServerRole::Primary,
            },
            RequestBody::Read {
                required_progress: Some(required),
                ..
            } if *required > 56 => ResponseBody::Error {
                error: WireError::Behind {
                    commit: 56,
                    required: *required,
                },
                message: "behind".into(),
            },
            RequestBody::Read { oid, .. } => object(*oid),
            _ => return None,
        }))
    }));
    let mut session = Session::connect_with(&[&p.addr], options()).unwrap();
    assert_eq!(session.read_server(), Some(s.addr.as_str()));
    assert_eq!(session.append(Ref(9), &"x").unwrap().number, 55);
    assert_eq!(session.last_seen_commit(), 60);

    p.kill();
    promoted.store(true, Ordering::SeqCst);
    session.require_last_seen();
    assert_eq!(session.required_progress(), Some(60));
    let obj = session
        .read(4u64)
        .expect("read-your-writes after the failover");
    assert_eq!(obj.oid, 4);
    assert_eq!(session.required_progress(), Some(56));
    assert_eq!(session.last_seen_commit(), 56);
    assert_eq!(required_of_reads(&s), vec![Some(60), Some(56)]);

    // A requirement set after the failover is the application's own: a
    // server behind it is still `behind`.
    session.set_required_progress(57);
    match session.read(4u64) {
        Err(ClientError::Server(WireError::Behind { commit, required })) => {
            assert_eq!((commit, required), (56, 57));
        }
        other => panic!("expected behind, got {other:?}"),
    }
    assert_eq!(session.required_progress(), Some(57));
}

#[test]
fn a_server_of_another_repository_is_never_used() {
    // The secondary's machine came back on an empty directory: a new
    // repository, its only member a primary, of a higher epoch.
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    let alone = alone_as_primary(&node.members[1]);
    p.serve(standard(node.clone(), p.addr.clone(), |_| None));
    s.serve(standard(node.clone(), s.addr.clone(), move |b| match b {
        RequestBody::Hello { .. } => Some(Some(ResponseBody::Hello {
            protocol_version: PROTOCOL_VERSION,
            server_id: 101,
            repository_id: "another".into(),
            role: ServerRole::Primary,
            node: alone.clone(),
            epoch: Epoch { term: 5, server: 9 },
        })),
        _ => None,
    }));
    let mut session = Session::connect_with(&[&p.addr], options()).unwrap();
    assert_eq!(session.read(4u64).unwrap().oid, 4);
    session.append(Ref(9), &"x").unwrap();
    assert_eq!(session.read_server(), Some(p.addr.as_str()));
    assert_eq!(session.commit_server(), Some(p.addr.as_str()));
    assert_eq!((p.count(is_read), p.count(is_commit)), (1, 1));
    assert_eq!(s.count(is_read) + s.count(is_commit), 0);
}

#[test]
fn wrong_server_redirects_the_same_commit() {
    let (mut old, mut new) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&old, MemberRole::Primary), (&new, MemberRole::Secondary)]);
    let new_addr = new.addr.clone();
    old.serve(standard(node.clone(), old.addr.clone(), move |b| {
        is_commit(b).then(|| {
            Some(ResponseBody::Error {
                error: WireError::WrongServer {
                    primary: Some(new_addr.clone()),
                },
                message: "swapped".into(),
            })
        })
    }));
    new.serve(standard(node.clone(), new.addr.clone(), |_| None));
    let mut session = Session::connect_with(&[&old.addr], options()).unwrap();
    let out = session
        .commit(|tx| {
            tx.put(Ref(3), 2, "C", &Value::from(1));
        })
        .unwrap();
    assert_eq!(out.number, 11);
    assert_eq!(session.commit_server(), Some(new.addr.as_str()));
    let first: Vec<_> = old.seen().into_iter().filter(is_commit).collect();
    let second: Vec<_> = new.seen().into_iter().filter(is_commit).collect();
    assert_eq!((first.len(), second.len()), (1, 1));
    assert_eq!(first[0], second[0], "same body, same token");
}

#[test]
fn a_lost_reply_is_an_unknown_outcome_and_a_conflict_is_a_conflict() {
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    p.serve(standard(node.clone(), p.addr.clone(), |b| match b {
        RequestBody::Commit(c) if c.appends.is_empty() => Some(Some(ResponseBody::Error {
            error: WireError::Conflict { oids: vec![3] },
            message: "changed".into(),
        })),
        RequestBody::Commit(_) => Some(None),
        _ => None,
    }));
    s.serve(standard(node, s.addr.clone(), |_| None));
    let mut session = Session::connect_with(&[&p.addr], options()).unwrap();
    let err = session
        .commit(|tx| {
            tx.put(Ref(3), 1, "C", &0u8);
        })
        .unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    let err = session.append(Ref(9), &"x").unwrap_err();
    match &err {
        ClientError::OutcomeUnknown { token, .. } => {
            let sent: Vec<_> = p.seen().into_iter().filter(is_commit).collect();
            assert_eq!(Some(token.clone()), token_of(&sent[1]));
        }
        other => panic!("expected OutcomeUnknown, got {other:?}"),
    }
    assert!(!err.is_retryable());
    // The session recovers: the next commit reconnects.
    assert!(session
        .append(Ref(9), &"y")
        .unwrap_err()
        .is_outcome_unknown());
    assert_eq!(p.count(is_commit), 3);
}

#[test]
fn a_commit_the_dead_primary_never_got_goes_to_the_successor() {
    // The seed's rule: the secondary that receives it pings the primary and
    // takes over (here the fake secondary simply commits).
    let (mut p, s, _) = pair();
    let mut session = Session::connect_with(&[&s.addr], options()).unwrap();
    p.kill();
    let out = session.append(Ref(9), &"x").unwrap();
    assert_eq!(out.number, 11);
    assert_eq!(session.commit_server(), Some(s.addr.as_str()));
    assert_eq!(s.count(is_commit), 1);
    assert_eq!(session.read(1u64).unwrap().oid, 1);
}

#[test]
fn a_successor_still_taking_over_is_waited_for_not_left_for_the_dead_primary() {
    // The successor answers `unavailable` while it takes over, and until
    // then still names the dead primary in its node.
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    p.serve(standard(node.clone(), p.addr.clone(), |_| None));
    let refusals = Arc::new(AtomicU64::new(0));
    let counted = refusals.clone();
    s.serve(standard(node.clone(), s.addr.clone(), move |b| {
        (is_commit(b) && counted.fetch_add(1, Ordering::SeqCst) < 3).then_some(Some(
            ResponseBody::Error {
                error: WireError::Unavailable {
                    reason: "this server is changing role; retry".into(),
                },
                message: "changing role".into(),
            },
        ))
    }));
    let mut session = Session::connect_with(&[&s.addr], options()).unwrap();
    p.kill();
    let out = session
        .append(Ref(9), &"x")
        .expect("committed by the successor");
    assert_eq!(out.number, 11);
    assert_eq!(s.count(is_commit), 4);
    assert_eq!(session.commit_server(), Some(s.addr.as_str()));
}

#[test]
fn a_commit_answered_with_another_type_has_an_unknown_outcome() {
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    p.serve(standard(node.clone(), p.addr.clone(), |b| {
        is_commit(b).then_some(Some(ResponseBody::Pong))
    }));
    s.serve(standard(node.clone(), s.addr.clone(), |_| None));
    let mut session = Session::connect_with(&[&p.addr], options()).unwrap();
    match session.append(Ref(9), &"x") {
        Err(e @ ClientError::OutcomeUnknown { .. }) => {
            assert!(e.is_outcome_unknown());
            assert!(e.to_string().contains("pong"), "{e}");
        }
        other => panic!("expected an unknown outcome, got {other:?}"),
    }
}

#[test]
fn a_primary_the_successor_finds_alive_is_tried_again() {
    // The primary refuses one connection (a quick restart). The successor
    // the commit then goes to pings it, finds it back, and names it.
    let (p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    let primary = p.addr.clone();
    drop(p);
    let back: Arc<Mutex<Option<Fake>>> = Arc::default();
    let restarted = back.clone();
    let for_primary = node.clone();
    s.serve(standard(node.clone(), s.addr.clone(), move |b| {
        if !is_commit(b) {
            return None;
        }
        let mut slot = restarted.lock().unwrap();
        if slot.is_none() {
            let mut f = Fake::bind_to(&primary);
            f.serve(standard(for_primary.clone(), primary.clone(), |_| None));
            *slot = Some(f);
        }
        Some(Some(ResponseBody::Error {
            error: WireError::WrongServer {
                primary: Some(primary.clone()),
            },
            message: "the primary is alive".into(),
        }))
    }));
    let mut session = Session::connect_with(&[&s.addr], options()).unwrap();
    let out = session
        .append(Ref(9), &"x")
        .expect("committed by the primary");
    assert_eq!(out.number, 11);
    let back = back.lock().unwrap();
    assert_eq!(back.as_ref().unwrap().count(is_commit), 1);
    assert_eq!(s.count(is_commit), 1);
}

#[test]
fn with_no_server_left_a_commit_gets_a_network_error_and_was_not_applied() {
    let (mut p, mut s, _) = pair();
    let mut session = Session::connect_with(&[&s.addr], options()).unwrap();
    p.kill();
    s.kill();
    let err = session.append(Ref(9), &"x").unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Io { .. } | ClientError::NoServerReachable { .. }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable(), "never sent, so never applied");
}

#[test]
fn long_ranges_are_paged_and_a_short_page_from_an_older_server_ends_them() {
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    const LEN: u64 = 70_000;
    let ranges = |b: &RequestBody| match b {
        RequestBody::CollectionRange { start, count, .. } => {
            let end = (start + count.min(&65_536)).min(LEN);
            Some(Some(ResponseBody::Elements {
                start: *start,
                values: (*start..end).map(Value::from).collect(),
                len: None,
            }))
        }
        _ => None,
    };
    p.serve(standard(node.clone(), p.addr.clone(), ranges));
    s.serve(standard(node, s.addr.clone(), ranges));
    let mut session = Session::connect_with(&[&p.addr], options()).unwrap();
    let all: Vec<u64> = session.collection_range_as(Ref(7), 0, u64::MAX).unwrap();
    assert_eq!(all.len() as u64, LEN);
    assert_eq!(all[69_999], 69_999);
    let is_range = |b: &RequestBody| matches!(b, RequestBody::CollectionRange { .. });
    assert_eq!(s.count(is_range) + p.count(is_range), 2);
    assert_eq!(session.collection_range(Ref(7), 10, 3).unwrap().len(), 3);
}

#[test]
fn a_reply_cut_short_by_bytes_is_paged_on_to_the_length_it_names() {
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    const LEN: u64 = 2_500;
    // Like a server whose byte budget holds 1 000 of these elements.
    let ranges = |b: &RequestBody| match b {
        RequestBody::CollectionRange { start, count, .. } => {
            let end = (start + count.min(&1_000)).min(LEN);
            Some(Some(ResponseBody::Elements {
                start: *start,
                values: (*start..end).map(Value::from).collect(),
                len: Some(LEN),
            }))
        }
        _ => None,
    };
    p.serve(standard(node.clone(), p.addr.clone(), ranges));
    s.serve(standard(node, s.addr.clone(), ranges));
    let mut session = Session::connect_with(&[&p.addr], options()).unwrap();
    let all: Vec<u64> = session.collection_range_as(Ref(7), 0, u64::MAX).unwrap();
    assert_eq!(all, (0..LEN).collect::<Vec<_>>());
    let is_range = |b: &RequestBody| matches!(b, RequestBody::CollectionRange { .. });
    assert_eq!(s.count(is_range) + p.count(is_range), 3);
    let some: Vec<u64> = session.collection_range_as(Ref(7), 900, 200).unwrap();
    assert_eq!(some, (900..1_100).collect::<Vec<_>>());
}

#[test]
fn take_over_without_a_named_primary_is_followed_through_the_node() {
    let (mut old, mut new) = (Fake::bind(), Fake::bind());
    let before = node_of(&[(&old, MemberRole::Primary), (&new, MemberRole::Secondary)]);
    let after = node_of(&[(&old, MemberRole::Secondary), (&new, MemberRole::Primary)]);
    let swapped = move |b: &RequestBody| match b {
        RequestBody::GetNode => Some(Some(ResponseBody::Node {
            node: after.clone(),
            epoch: Epoch {
                term: 2,
                server: 101,
            },
            role: ServerRole::Secondary,
        })),
        RequestBody::Commit(_) => Some(Some(ResponseBody::Error {
            error: WireError::WrongServer { primary: None },
            message: "draining".into(),
        })),
        _ => None,
    };
    let refusing = swapped.clone();
    old.serve(standard(before.clone(), old.addr.clone(), refusing));
    new.serve(standard(before, new.addr.clone(), move |b| match b {
        RequestBody::Commit(_) => None,
        other => swapped(other),
    }));
    let mut session = Session::connect_with(&[&old.addr], options()).unwrap();
    assert_eq!(session.commit_server(), Some(old.addr.as_str()));
    assert_eq!(session.append(Ref(9), &1u8).unwrap().number, 11);
    assert_eq!(session.commit_server(), Some(new.addr.as_str()));
    assert_eq!(session.epoch().term, 2);
    assert_eq!((old.count(is_commit), new.count(is_commit)), (1, 1));
}

#[test]
fn restore_mode_with_no_other_primary_is_returned_at_once() {
    let mut p = Fake::bind();
    let node = node_of(&[(&p, MemberRole::Primary)]);
    p.serve(standard(node, p.addr.clone(), |b| {
        is_commit(b).then_some(Some(ResponseBody::Error {
            error: WireError::RestoreMode,
            message: "backup".into(),
        }))
    }));
    let mut session = Session::connect_with(&[&p.addr], options()).unwrap();
    let start = std::time::Instant::now();
    let err = session.append(Ref(1), &0u8).unwrap_err();
    assert!(
        matches!(err, ClientError::Server(WireError::RestoreMode)),
        "{err:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(p.count(is_commit), 1);
}

#[test]
fn an_answer_to_a_resent_token_is_marked_replayed() {
    let mut p = Fake::bind();
    let node = node_of(&[(&p, MemberRole::Primary)]);
    p.serve(standard(node, p.addr.clone(), |b| {
        is_commit(b).then_some(Some(ResponseBody::Committed {
            number: 7,
            new_oids: vec![],
            positions: vec![],
        }))
    }));
    let mut session = Session::connect_with(&[&p.addr], options()).unwrap();
    let out = session.append(Ref(1), &0u8).unwrap();
    assert!(out.replayed && out.positions.is_empty());
    let out = session.commit(|tx| {
        tx.put(Ref(1), 1, "C", &0u8);
    });
    assert!(!out.unwrap().replayed, "a put-only commit cannot tell");
}

fn is_status(b: &RequestBody) -> bool {
    matches!(b, RequestBody::CommitStatus { .. })
}

/// Answers `commit_status` with `number`.
fn token_status(number: Option<u64>) -> impl Fn(&RequestBody) -> Option<Option<ResponseBody>> {
    move |b| is_status(b).then_some(Some(ResponseBody::TokenStatus { number }))
}

#[test]
fn commit_status_with_the_primary_dead_goes_to_the_successor() {
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    p.serve(standard(node.clone(), p.addr.clone(), token_status(None)));
    s.serve(standard(node, s.addr.clone(), token_status(Some(7))));
    let mut session = Session::connect_with(&[&p.addr, &s.addr], options()).unwrap();
    assert_eq!(session.commit_server(), Some(p.addr.as_str()));
    p.kill();
    assert_eq!(session.commit_status(b"t").unwrap(), Some(7));
    assert_eq!(session.commit_server(), Some(s.addr.as_str()));
    assert_eq!((p.count(is_status), s.count(is_status)), (0, 1));
}

#[test]
fn an_unanswered_status_is_resent_but_an_unanswered_commit_is_not() {
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    // The primary takes every request for itself and never answers one.
    p.serve(standard(node.clone(), p.addr.clone(), |b| {
        (is_commit(b) || is_status(b)).then_some(None)
    }));
    s.serve(standard(node, s.addr.clone(), token_status(Some(7))));
    let mut session = Session::connect_with(&[&p.addr], options()).unwrap();
    let err = session.append(Ref(9), &"x").unwrap_err();
    assert!(err.is_outcome_unknown(), "{err:?}");
    assert_eq!((p.count(is_commit), s.count(is_commit)), (1, 0));
    assert_eq!(session.commit_status(b"t").unwrap(), Some(7));
    assert_eq!((p.count(is_status), s.count(is_status)), (1, 1));
}

/// Run `work` on a thread and return what it returns, failing with
/// `held_up` if it takes 60 s: far less than the 120 s read timeout the
/// tests that use it set, which waiting on a hung server would cost.
fn unless_held_up<T: Send + 'static>(
    held_up: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, finished) = std::sync::mpsc::channel();
    let worker = thread::spawn(move || {
        let _ = done.send(work());
    });
    match finished.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{held_up}"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(worker.join().unwrap_err())
        }
    }
}

#[test]
fn a_hung_seed_and_a_hung_secondary_hold_nothing_up() {
    // `h` never serves: its kernel completes connections and nothing is
    // ever answered, as with a stopped server.
    let (mut p, mut s, h) = (Fake::bind(), Fake::bind(), Fake::bind());
    let node = node_of(&[
        (&p, MemberRole::Primary),
        (&s, MemberRole::Secondary),
        (&h, MemberRole::Secondary),
    ]);
    p.serve(standard(node.clone(), p.addr.clone(), |_| None));
    s.serve(standard(node, s.addr.clone(), |_| None));
    let mut opts = options();
    // What waiting on `h` would cost.
    opts.connect.read_timeout = Some(Duration::from_secs(120));
    let seeds = [h.addr.clone(), p.addr.clone()];
    let (p_addr, s_addr) = (p.addr.clone(), s.addr.clone());
    unless_held_up("the session was held up by the hung server", move || {
        let mut session = Session::connect_with(&seeds, opts).unwrap();
        assert_eq!(session.read_server(), Some(s_addr.as_str()));
        assert_eq!(session.commit_server(), Some(p_addr.as_str()));
        session.refresh_node().unwrap();
        assert_eq!(session.node().members.len(), 3);
        assert_eq!(session.read(4u64).unwrap().oid, 4);
        session.append(Ref(9), &"x").unwrap();
    });
    assert_eq!((s.count(is_read), p.count(is_commit)), (1, 1));
}

#[test]
fn a_read_the_server_never_answers_moves_to_another_server() {
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    p.serve(standard(node.clone(), p.addr.clone(), |_| None));
    // The secondary answers hellos, then hangs on the first read.
    s.serve(standard(node, s.addr.clone(), |b| {
        if is_read(b) {
            loop {
                thread::park();
            }
        }
        None
    }));
    let mut opts = options();
    // What waiting on the secondary would cost.
    opts.connect.read_timeout = Some(Duration::from_secs(120));
    opts.read_failover_timeout = Some(Duration::from_millis(300));
    let mut session = Session::connect_with(&[&s.addr], opts).unwrap();
    assert_eq!(session.read_server(), Some(s.addr.as_str()));
    let (oid, server) = unless_held_up("the read waited for the hung server", move || {
        let oid = session.read(4u64).unwrap().oid;
        (oid, session.read_server().map(str::to_string))
    });
    assert_eq!(oid, 4);
    assert_eq!(server.as_deref(), Some(p.addr.as_str()));
    assert_eq!((s.count(is_read), p.count(is_read)), (1, 1));
}

#[test]
fn a_secondary_slower_than_the_primary_to_say_hello_still_serves_the_reads() {
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    p.serve(standard(node.clone(), p.addr.clone(), |_| None));
    s.serve(standard(node, s.addr.clone(), |b| {
        if matches!(b, RequestBody::Hello { .. }) {
            thread::sleep(Duration::from_millis(100));
        }
        None
    }));
    // Both seeds are asked at once; the primary answers first.
    let session = Session::connect_with(&[&p.addr, &s.addr], options()).unwrap();
    assert_eq!(session.read_server(), Some(s.addr.as_str()));
    assert_eq!(session.commit_server(), Some(p.addr.as_str()));
}

#[test]
fn a_hung_primary_keeps_no_session_from_connecting_and_reading() {
    // `p` never serves: as a stopped primary.
    let (p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    s.serve(standard(node, s.addr.clone(), |_| None));
    let mut opts = options();
    opts.connect.read_timeout = Some(Duration::from_secs(120));
    let seeds = [s.addr.clone()];
    let oid = unless_held_up("the session waited for the hung primary", move || {
        let mut session = Session::connect_with(&seeds, opts).unwrap();
        session.read(4u64).unwrap().oid
    });
    assert_eq!(oid, 4);
}

#[test]
fn a_commit_connection_the_primary_closed_before_the_first_commit_is_not_used() {
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    p.serve(standard(node.clone(), p.addr.clone(), |_| None));
    s.serve(standard(node.clone(), s.addr.clone(), |_| None));
    let mut session = Session::connect_with(&[&s.addr], options()).unwrap();
    // The connection to the primary, opened in the background, is in...
    let hello = |b: &RequestBody| matches!(b, RequestBody::Hello { .. });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while p.count(hello) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no hello reached the primary"
        );
        thread::sleep(Duration::from_millis(1));
    }
    // ... and the primary restarts before the first commit.
    p.kill();
    let mut again = Fake::bind_to(&p.addr);
    again.serve(standard(node, p.addr.clone(), |_| None));
    let out = session.append(Ref(9), &"x").unwrap();
    assert_eq!(out.number, 11);
    assert_eq!(again.count(is_commit), 1);
}

#[test]
fn two_servers_naming_each_other_primary_are_not_bounced_between_at_full_speed() {
    // A take-over under way: each still thinks the other is the primary.
    let (mut a, mut b) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&a, MemberRole::Primary), (&b, MemberRole::Secondary)]);
    let names = |other: String| {
        move |body: &RequestBody| {
            is_commit(body).then(|| {
                Some(ResponseBody::Error {
                    error: WireError::WrongServer {
                        primary: Some(other.clone()),
                    },
                    message: "not me".into(),
                })
            })
        }
    };
    a.serve(standard(
        node.clone(),
        a.addr.clone(),
        names(b.addr.clone()),
    ));
    b.serve(standard(node, b.addr.clone(), names(a.addr.clone())));
    let mut opts = options();
    opts.reroute_timeout = Duration::from_secs(1);
    let mut session = Session::connect_with(&[&a.addr], opts).unwrap();
    let err = session.append(Ref(9), &"x").unwrap_err();
    assert!(
        matches!(err, ClientError::Server(WireError::WrongServer { .. })),
        "{err:?}"
    );
    // Pauses of 20 ms doubling up to 500 ms fit about a dozen attempts in
    // the second; without them, thousands.
    let attempts = a.count(is_commit) + b.count(is_commit);
    assert!((2..=40).contains(&attempts), "{attempts} attempts");
    let tokens: std::collections::HashSet<_> = a
        .seen()
        .iter()
        .chain(b.seen().iter())
        .filter_map(token_of)
        .collect();
    assert_eq!(tokens.len(), 1, "every attempt resends the same commit");
}

#[test]
fn a_secondary_whose_hello_names_an_older_epoch_still_serves_reads() {
    // Secondaries may say hello in the epoch of the backup they started
    // from; only a connection opened before a failover was heard is
    // dropped for its epoch.
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    p.serve(standard(node.clone(), p.addr.clone(), |_| None));
    let older = hello_in(&node, &s.addr, Epoch { term: 0, server: 0 });
    s.serve(standard(node, s.addr.clone(), move |b| {
        matches!(b, RequestBody::Hello { .. }).then(|| Some(older.clone()))
    }));
    let mut session = Session::connect_with(&[&p.addr, &s.addr], options()).unwrap();
    assert_eq!(session.read_server(), Some(s.addr.as_str()));
    session.refresh_node().unwrap();
    assert_eq!(session.read(4u64).unwrap().oid, 4);
    assert_eq!((s.count(is_read), p.count(is_read)), (1, 0));
}

/// A hello like `hello(node, addr)`, in `epoch`.
fn hello_in(node: &Node, addr: &str, epoch: Epoch) -> ResponseBody {
    match hello(node, addr) {
        ResponseBody::Hello {
            protocol_version,
            server_id,
            repository_id,
            role,
            node,
            ..
        } => ResponseBody::Hello {
            protocol_version,
            server_id,
            repository_id,
            role,
            node,
            epoch,
        },
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_hello_that_waited_is_not_counted_as_news_of_a_failover() {
    // The secondary says hello in an older epoch than the primary, whose
    // hello comes late and is taken only at the first commit, after reads
    // from the secondary saw further.
    let (mut p, mut s) = (Fake::bind(), Fake::bind());
    let node = node_of(&[(&p, MemberRole::Primary), (&s, MemberRole::Secondary)]);
    p.commit.store(100, Ordering::SeqCst);
    s.commit.store(140, Ordering::SeqCst);
    let late = hello_in(
        &node,
        &p.addr,
        Epoch {
            term: 2,
            server: 100,
        },
    );
    p.serve(standard(node.clone(), p.addr.clone(), move |b| {
        matches!(b, RequestBody::Hello { .. }).then(|| {
            thread::sleep(Duration::from_millis(150));
            Some(late.clone())
        })
    }));
    let early = hello_in(
        &node,
        &s.addr,
        Epoch {
            term: 1,
            server: 100,
        },
    );
    s.serve(standard(node, s.addr.clone(), move |b| {
        matches!(b, RequestBody::Hello { .. }).then(|| Some(early.clone()))
    }));
    let mut session = Session::connect_with(&[&s.addr, &p.addr], options()).unwrap();
    assert_eq!(session.read_server(), Some(s.addr.as_str()));
    session.read(4u64).unwrap();
    assert_eq!(session.last_seen_commit(), 140);
    // The primary's hello comes in and waits past FRESH.
    let hello = |b: &RequestBody| matches!(b, RequestBody::Hello { .. });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while p.count(hello) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no hello reached the primary"
        );
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(150) + 2 * crate::client::probe::FRESH);
    session.set_required_progress(140);
    session.append(Ref(9), &"x").unwrap();
    session.read(5u64).unwrap();
    assert_eq!(session.required_progress(), Some(140));
    assert_eq!(session.last_seen_commit(), 140);
}

#[test]
fn a_server_that_was_only_slow_gets_the_whole_read_timeout_once_no_other_can_serve() {
    // The primary is gone (nothing listens at its address); the secondary
    // answers reads, slowly.
    let gone = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut s = Fake::bind();
    let node = Node {
        members: vec![
            Member {
                server_id: 100,
                addr: gone,
                role: MemberRole::Primary,
            },
            Member {
                server_id: 101,
                addr: s.addr.clone(),
                role: MemberRole::Secondary,
            },
        ],
    };
    s.serve(standard(node, s.addr.clone(), |b| {
        if is_read(b) {
            thread::sleep(Duration::from_millis(600));
        }
        None
    }));
    let mut opts = options();
    opts.read_failover_timeout = Some(Duration::from_millis(200));
    let mut session = Session::connect_with(&[&s.addr], opts).unwrap();
    assert_eq!(session.read(4u64).unwrap().oid, 4);
    assert_eq!(s.count(is_read), 2);
}

#[test]
fn a_primary_reached_by_two_addresses_that_restarted_gets_the_commit() {
    // The session knows the primary by its seed's spelling and by the
    // member address: two connections to one server, both closed when it
    // restarts.
    let mut p = Fake::bind();
    let port = p.addr.rsplit_once(':').unwrap().1.to_string();
    let node = alone_as_primary(&node_of(&[(&p, MemberRole::Primary)]).members[0]);
    p.serve(standard(node.clone(), p.addr.clone(), |_| None));
    let seed = format!("localhost:{port}");
    let mut session = Session::connect_with(&[&seed], options()).unwrap();
    session.refresh_node().unwrap();
    p.kill();
    let mut again = Fake::bind_to(&p.addr);
    again.serve(standard(node, p.addr.clone(), |_| None));
    let out = session.append(Ref(9), &"x").unwrap();
    assert_eq!(out.number, 11);
    assert_eq!(again.count(is_commit), 1);
}
