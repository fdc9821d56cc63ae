//! Primary failure, the deliberate swap, and a former primary rejoining:
//! the seed's use-cases 2, 3 and 4, plus forced divergence, two secondaries
//! detecting a failure at once, and an unknown outcome resolved by token.

use std::time::Duration;

use magma::client::{ConnectOptions, Connection, Ref, Session};
use magma::protocol::{CommitBody, RequestBody, ServerRole, SessionRole, WireAppend, WireRef};

use crate::harness::{
    backup, dump, pair, pair_with, status, stop_floods_and_verify, stop_or_move_on, verify_flood,
    wait_for_equal_digests, wait_for_members, wait_for_more_acks, wait_for_role, wait_until,
    Cluster, Flood,
};
use crate::phase;

const JOIN: Duration = Duration::from_secs(90);

fn role(addr: &str) -> ServerRole {
    status(addr).role
}

/// One commit through a session that knows both servers: after a primary
/// failure this is what promotes the successor.
fn probe_commit(addrs: &[&str]) -> u64 {
    let mut s = Session::connect(addrs).unwrap();
    s.commit(|tx| {
        tx.set_meta("probe", Some(&"after failover"));
    })
    .unwrap()
    .number
}

/// `magma take-over --server new`: succeeds, and `new` becomes the primary
/// with `old` its secondary.
fn take_over(new: &str, old: &str) {
    let out = std::process::Command::new(crate::harness::CLI)
        .args(["take-over", "--server", new])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "take-over failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(Duration::from_secs(30), "the swap", || {
        (role(new) == ServerRole::Primary && role(old) == ServerRole::Secondary).then_some(())
    });
}

#[test]
fn t50_use_cases_2_3_4_primary_killed_former_primary_rejoins_then_swap_back() {
    let mut c = Cluster::new();
    let (s1, s2, a1, a2) = pair(&mut c, &[]);
    let dir = c.root.path().to_path_buf();

    phase!("use case 2: two flooders; kill -9 the primary");
    let mut floods = vec![
        Flood::start(&dir, &[a1.as_str()], "u1", &["--duration", "600"]),
        Flood::start(&dir, &[a1.as_str()], "u2", &["--duration", "600"]),
    ];
    wait_until(Duration::from_secs(60), "flooders under way", || {
        floods.iter().all(|f| f.acked().len() >= 300).then_some(())
    });
    c.servers[s1].kill();
    // A commit in flight at the kill surfaces an error (its outcome is
    // unknown) and the flooder stops; a commit sent after it finds the
    // primary gone and goes to the successor, which takes over.
    stop_or_move_on(&mut floods, Duration::from_secs(60));
    phase!("every acknowledged append is on server2, which becomes primary");
    for f in &floods {
        verify_flood(&dump(&a2, &f.name), &f.name, &f.acked(), 1);
    }
    probe_commit(&[&a1, &a2]);
    assert_eq!(role(&a2), ServerRole::Primary);
    assert!(status(&a2).epoch.term >= 2, "a promotion opens a new epoch");
    for f in &floods {
        verify_flood(&dump(&a2, &f.name), &f.name, &f.acked(), 1);
    }

    phase!("use case 3: flood server2; the former primary restarts and rejoins");
    let mut floods3 = vec![
        Flood::start(
            &dir,
            &[a1.as_str(), a2.as_str()],
            "v1",
            &["--duration", "600"],
        ),
        Flood::start(
            &dir,
            &[a1.as_str(), a2.as_str()],
            "v2",
            &["--duration", "600"],
        ),
    ];
    wait_until(
        Duration::from_secs(60),
        "flooders under way on server2",
        || floods3.iter().all(|f| f.acked().len() >= 200).then_some(()),
    );
    c.servers[s1].start();
    // The commit in flight when server1 died may be in its log but not on
    // server2: then server1 diverged, keeps it in a file and waits for the
    // operator, who re-seeds it (--join). Otherwise it rejoins by itself.
    let outcome = wait_until(JOIN, "server1 to rejoin or report divergence", || {
        let st = status(&a1);
        match st.role {
            ServerRole::Secondary => Some(false),
            ServerRole::Deposed
                if c.servers[s1].dir.read_dir().ok()?.any(|e| {
                    e.ok()
                        .is_some_and(|e| e.file_name().to_string_lossy().starts_with("divergent-"))
                }) =>
            {
                Some(true)
            }
            _ => None,
        }
    });
    if outcome {
        phase!("server1 diverged: the operator re-seeds it from server2 with --join");
        c.servers[s1].kill();
        let old = c.servers[s1].dir.clone();
        let aside = c.root.path().join("s1-diverged");
        std::fs::rename(&old, &aside).unwrap();
        c.servers[s1].args = vec!["--join".into(), a2.clone()];
        c.servers[s1].start();
    }
    wait_for_members(&a2, &[&a1, &a2], JOIN);
    wait_for_role(&a1, ServerRole::Secondary, JOIN);

    phase!("use case 4: take-over under flood; clients notice nothing");
    take_over(&a1, &a2);
    wait_for_more_acks(
        &floods3,
        300,
        Duration::from_secs(60),
        "flooding goes on after the swap",
    );
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    stop_floods_and_verify(&mut floods3, &[&a1, &a2], "during the swap");
    let _ = s2;
}

#[test]
fn t50_a_diverged_former_primary_keeps_its_commits_in_a_file_and_merges_nothing() {
    let mut c = Cluster::new();
    // Asynchronous replication and a long timeout: the primary keeps
    // committing while the secondary hangs, and keeps it in the node.
    let (s1, s2, a1, a2) = pair(
        &mut c,
        &["--sync-replicas", "0", "--replica-timeout-ms", "60000"],
    );
    let dir = c.root.path().to_path_buf();
    let mut f = Flood::start(&dir, &[a1.as_str()], "base", &["--count", "100"]);
    assert!(f.wait(Duration::from_secs(60)).status.success());
    wait_for_equal_digests(&[&a1, &a2], Duration::from_secs(30));

    phase!("server2 hangs; server1 commits on alone; server1 dies");
    c.servers[s2].freeze();
    let mut lone = Flood::start(&dir, &[a1.as_str()], "lone", &["--count", "50"]);
    assert!(lone.wait(Duration::from_secs(60)).status.success());
    let s1_commit = status(&a1).commit;
    c.servers[s1].kill();
    c.servers[s2].thaw();

    phase!("server2 takes over on the next commit and commits its own history");
    probe_commit(&[&a2]);
    assert_eq!(role(&a2), ServerRole::Primary);
    let mut other = Flood::start(&dir, &[a2.as_str()], "other", &["--count", "20"]);
    assert!(other.wait(Duration::from_secs(60)).status.success());

    phase!("server1 restarts: diverged; the divergent commits go to a file");
    c.servers[s1].start();
    let file = wait_until(JOIN, "the divergent file", || {
        c.servers[s1]
            .dir
            .read_dir()
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("divergent-"))
            .map(|e| e.path())
    });
    wait_for_role(&a1, ServerRole::Deposed, Duration::from_secs(10));
    let bytes = std::fs::read(&file).unwrap();
    let mut records = 0;
    let mut at = 0;
    while at + 4 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + len;
        records += 1;
    }
    assert_eq!(
        at,
        bytes.len(),
        "the file is a sequence of length-prefixed records"
    );
    assert!(
        records >= 50,
        "the lone commits are kept: {records} records"
    );
    assert!(s1_commit > 0);
    // Nothing merged: server2 never got the lone appends.
    assert!(
        std::process::Command::new(crate::harness::CLI)
            .args(["dump", "--server", &a2, "--collection", "lone"])
            .output()
            .map(|o| !o.status.success() || o.stdout.is_empty())
            .unwrap(),
        "the divergent commits must not appear on the new primary"
    );
    // And the deposed server takes no commits.
    let mut conn =
        Connection::connect(&a1, SessionRole::Application, &ConnectOptions::default()).unwrap();
    let r = conn.call(RequestBody::Commit(CommitBody {
        meta: vec![("x".into(), None)],
        ..Default::default()
    }));
    assert!(r.is_err(), "a deposed server must refuse commits");
    // Nor reads, to any client: it holds commits the node does not.
    let r = conn.call(RequestBody::Read {
        oid: 0,
        depth: 0,
        required_progress: None,
    });
    match r {
        Err(magma::client::ClientError::Server(magma::protocol::WireError::Unavailable {
            reason,
        })) => assert!(reason.contains("deposed"), "{reason}"),
        other => panic!("a deposed server must refuse reads: {other:?}"),
    }
    // Nor can it be made to follow: it holds commits of its own.
    let out = std::process::Command::new(crate::harness::CLI)
        .args(["follow", "--server", &a1, "--primary", &a2])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: unavailable: ") && err.contains("not a backup"),
        "{err}"
    );
}

#[test]
fn t50_two_secondaries_detecting_the_failure_at_once_make_one_primary() {
    let mut c = Cluster::new();
    let s1 = c.add_server("s1", &[]);
    c.servers[s1].start();
    let a1 = c.servers[s1].addr.clone();
    let (b2, b3) = (c.root.path().join("b2"), c.root.path().join("b3"));
    backup(&a1, &b2);
    backup(&a1, &b3);
    let s2 = c.add_server_on("s2", &b2, &[]);
    let s3 = c.add_server_on("s3", &b3, &[]);
    c.servers[s2].start();
    let a2 = c.servers[s2].addr.clone();
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    c.servers[s3].start();
    let a3 = c.servers[s3].addr.clone();
    wait_for_members(&a1, &[&a1, &a2, &a3], JOIN);
    wait_for_equal_digests(&[&a1, &a2, &a3], Duration::from_secs(30));

    phase!("kill the primary; commits reach both secondaries at the same time");
    c.servers[s1].kill();
    let threads: Vec<_> = [a2.clone(), a3.clone()]
        .into_iter()
        .map(|addr| {
            std::thread::spawn(move || {
                let mut conn = Connection::connect(
                    &addr,
                    SessionRole::Application,
                    &ConnectOptions::default(),
                )
                .unwrap();
                conn.call(RequestBody::Commit(CommitBody {
                    token: Some(addr.as_bytes().to_vec()),
                    meta: vec![("who".into(), Some(rmpv::Value::from(addr.as_str())))],
                    ..Default::default()
                }))
                .map(|_| ())
                .map_err(|e| e.to_string())
            })
        })
        .collect();
    for t in threads {
        // Each either committed (it is the successor) or was told where the
        // primary now is.
        let _ = t.join().unwrap();
    }
    wait_until(
        Duration::from_secs(30),
        "one primary, one secondary",
        || {
            let roles = [role(&a2), role(&a3)];
            let primaries = roles.iter().filter(|r| **r == ServerRole::Primary).count();
            (primaries == 1 && roles.contains(&ServerRole::Secondary)).then_some(())
        },
    );
    assert_eq!(
        role(&a2),
        ServerRole::Primary,
        "the successor is the first secondary"
    );
    wait_for_members(&a2, &[&a2, &a3], JOIN);
    probe_commit(&[&a3]);
    wait_for_equal_digests(&[&a2, &a3], Duration::from_secs(30));
}

#[test]
fn t50_an_unknown_outcome_is_resolved_by_its_token_on_the_new_primary() {
    let mut c = Cluster::new();
    let (s1, _s2, a1, a2) = pair(&mut c, &[]);
    let mut s = Session::connect(&[a1.as_str(), a2.as_str()]).unwrap();
    let out = s
        .commit(|tx| {
            let coll = tx.create_collection();
            tx.set_root(coll);
        })
        .unwrap();
    let coll = Ref(out.new_oids[0].1);
    let token = b"resolve-me-0001".to_vec();
    let body = CommitBody {
        token: Some(token.clone()),
        appends: vec![WireAppend {
            coll: WireRef::Oid(coll.0),
            value: rmpv::Value::from("once"),
        }],
        ..Default::default()
    };
    let first = s.commit_body(body.clone()).unwrap();
    assert_eq!(s.commit_server(), Some(a1.as_str()));

    phase!("kill -9 the primary; the same session asks for the token");
    c.servers[s1].kill();
    // Nothing else touches the node: the status request itself must find
    // the primary gone, go to the successor and make it take over. Every
    // step is bounded by the session's timeouts (connect 3 s, reply 30 s,
    // re-routing 10 s).
    assert_eq!(s.commit_status(&token).unwrap(), Some(first.number));
    assert_eq!(s.commit_server(), Some(a2.as_str()));
    assert_eq!(role(&a2), ServerRole::Primary);
    assert_eq!(s.commit_status(b"never-sent").unwrap(), None);
    let again = s.commit_body(body).unwrap();
    assert_eq!(
        again.number, first.number,
        "a resent commit is not applied twice"
    );
    s.require_last_seen();
    assert_eq!(s.collection_len(coll).unwrap(), 1);
}

#[test]
fn t50_graceful_stops_leave_the_node_and_a_stopping_primary_hands_over() {
    let mut c = Cluster::new();
    let (s1, s2, a1, a2) = pair(&mut c, &[]);
    let dir = c.root.path().to_path_buf();

    phase!("shutdown of a secondary: it leaves the node at once");
    let mut admin = c.servers[s2].admin();
    admin.shutdown(true).unwrap();
    assert!(c.servers[s2].wait_exit(Duration::from_secs(30)).success());
    // Its leave, not the primary's detection of a dead secondary, removed
    // it: the log says why.
    wait_for_members(&a1, &[&a1], Duration::from_secs(15));
    assert!(c.servers[s1].log_contains("it is shutting down"));

    phase!("it comes back and rejoins");
    c.servers[s2].start();
    wait_for_members(&a1, &[&a1, &a2], JOIN);

    phase!("shutdown of the primary under flood: it hands over first");
    let mut f = Flood::start(
        &dir,
        &[a1.as_str(), a2.as_str()],
        "h",
        &["--duration", "600"],
    );
    wait_until(Duration::from_secs(30), "flood under way", || {
        (f.acked().len() >= 200).then_some(())
    });
    c.servers[s1].admin().shutdown(true).unwrap();
    assert!(c.servers[s1].wait_exit(Duration::from_secs(30)).success());
    wait_for_role(&a2, ServerRole::Primary, Duration::from_secs(30));
    let n = f.acked().len();
    wait_until(Duration::from_secs(60), "the flood to go on", || {
        (f.acked().len() >= n + 200).then_some(())
    });
    assert!(f.running(), "the flood saw an error during the hand-over");
    f.kill();
    wait_for_members(&a2, &[&a2], Duration::from_secs(30));
    verify_flood(&dump(&a2, "h"), "h", &f.acked(), 1);
}

#[test]
fn t50_an_asynchronous_take_over_waits_until_the_secondary_holds_everything_durably() {
    // With `--sync-replicas 0` the secondary answers batches once applied;
    // with a 60 s flush interval only the primary's heartbeats (which ask
    // for durability) make them durable before the timer does. The
    // hand-over waits for durability: it must get it within its bound,
    // under flood, and lose nothing. Batches wait up to 100 ms for
    // company, so at the pause records are still held on the primary.
    let mut c = Cluster::new();
    let (_, _, a1, a2) = pair(
        &mut c,
        &[
            "--sync-replicas",
            "0",
            "--flush",
            "interval:60000",
            "--async-batch-delay-us",
            "100000",
        ],
    );
    let dir = c.root.path().to_path_buf();
    let mut floods = vec![
        Flood::start(&dir, &[&a1, &a2], "t1", &["--duration", "600"]),
        Flood::start(&dir, &[&a1, &a2], "t2", &["--duration", "600"]),
    ];
    wait_for_more_acks(&floods, 300, Duration::from_secs(60), "300 acks per flood");

    phase!("take-over by server2 under flood");
    take_over(&a2, &a1);
    wait_for_more_acks(
        &floods,
        300,
        Duration::from_secs(60),
        "flooding goes on after the swap",
    );
    wait_for_members(&a2, &[&a2, &a1], JOIN);
    stop_floods_and_verify(&mut floods, &[&a2, &a1], "across the take-over");
}

/// A pair whose server2 exits between a hand-over and its promotion (test
/// hook); returns (server2's index, address 1, address 2).
fn pair_whose_take_over_target_dies(c: &mut Cluster) -> (usize, String, String) {
    let (_, s2, a1, a2) = pair_with(c, &[], &[], &[("MAGMA_FAULT_EXIT_AFTER_HAND_OVER", "1")]);
    (s2, a1, a2)
}

/// `magma take-over` on server2 fails: it dies once handed over.
fn take_over_and_lose_the_target(c: &mut Cluster, s2: usize, a2: &str) {
    let out = std::process::Command::new(crate::harness::CLI)
        .args(["take-over", "--server", a2])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "server2 died before taking over");
    // Refused for another reason, server2 would not exit: say why at once.
    assert!(
        stderr.contains("network"),
        "take-over failed, but not by server2's death: {stderr}"
    );
    let end = c.servers[s2].wait_exit(Duration::from_secs(30));
    assert_eq!(end.code(), Some(137), "the hook ended server2");
}

#[test]
fn t50_a_take_over_whose_new_primary_dies_before_promoting_leaves_a_primary() {
    let mut c = Cluster::new();
    let (s2, a1, a2) = pair_whose_take_over_target_dies(&mut c);
    let dir = c.root.path().to_path_buf();

    phase!("take-over on server2 under flood; server2 dies once handed over");
    let mut floods = vec![Flood::start(
        &dir,
        &[a1.as_str(), a2.as_str()],
        "d",
        &["--duration", "600"],
    )];
    wait_until(Duration::from_secs(30), "flood under way", || {
        (floods[0].acked().len() >= 200).then_some(())
    });
    take_over_and_lose_the_target(&mut c, s2, &a2);

    phase!("a commit reaching server1 finds the new primary gone: server1 takes the node back");
    stop_or_move_on(&mut floods, Duration::from_secs(60));
    let number = wait_until(Duration::from_secs(60), "a commit to succeed", || {
        let mut s = Session::connect(&[a1.as_str(), a2.as_str()]).ok()?;
        s.commit(|tx| {
            tx.set_meta("probe", Some(&"after the failed take-over"));
        })
        .ok()
        .map(|c| c.number)
    });
    assert_eq!(role(&a1), ServerRole::Primary);
    assert!(number > 200);
    verify_flood(&dump(&a1, "d"), "d", &floods[0].acked(), 1);

    phase!("server2, restarted without the hook, rejoins server1");
    c.servers[s2].env.clear();
    c.servers[s2].start();
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    wait_for_equal_digests(&[&a1, &a2], Duration::from_secs(60));
}

#[test]
fn t50_a_take_over_target_restarted_before_promoting_gives_the_node_back() {
    let mut c = Cluster::new();
    let (s2, a1, a2) = pair_whose_take_over_target_dies(&mut c);
    let before = probe_commit(&[&a1]);

    phase!("take-over on server2, which dies once handed over");
    take_over_and_lose_the_target(&mut c, s2, &a2);

    phase!("server2 restarted at once, no commit in between: server1 takes the node back");
    c.servers[s2].env.clear();
    c.servers[s2].start();
    wait_for_role(&a1, ServerRole::Primary, Duration::from_secs(60));
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    assert!(probe_commit(&[&a1, &a2]) > before);
    wait_for_equal_digests(&[&a1, &a2], Duration::from_secs(60));
}

/// A primary deposed by a newer epoch acknowledges a commit that was
/// waiting for its replica only if the replica, now the primary, holds it:
/// server1 commits record 30 while server2 hangs, then hangs itself;
/// server2 takes over; server1 comes back and is deposed. Whatever server1
/// answered for record 30, an acknowledgement must be backed by server2.
#[test]
fn t50_a_deposed_primary_acknowledges_only_what_the_new_primary_holds() {
    const LAST: u64 = 30;
    let mut c = Cluster::new();
    // The replica stays in the node however long it hangs.
    let (s1, s2, a1, a2) = pair(&mut c, &["--replica-timeout-ms", "60000"]);

    phase!("commits up to record {} on both servers", LAST - 1);
    let mut s = Session::connect(&[a1.as_str()]).unwrap();
    while status(&a1).commit < LAST - 1 {
        s.commit(|tx| {
            tx.set_meta("n", Some(&1));
        })
        .unwrap();
    }
    assert_eq!(status(&a1).commit, LAST - 1, "the set-up overshot");
    wait_for_equal_digests(&[&a1, &a2], Duration::from_secs(30));

    phase!("server2 hangs; record {LAST} is committed on server1 and waits for it");
    c.servers[s2].freeze();
    let to_s1 = a1.clone();
    let waiting = std::thread::spawn(move || {
        let opts = ConnectOptions {
            read_timeout: Some(Duration::from_secs(120)),
            ..ConnectOptions::default()
        };
        let mut conn = Connection::connect(&to_s1, SessionRole::Application, &opts).unwrap();
        conn.call(RequestBody::Commit(CommitBody {
            meta: vec![(
                "record-30".into(),
                Some(rmp_serde::to_vec(&true).unwrap().into()),
            )],
            ..Default::default()
        }))
    });
    wait_until(
        Duration::from_secs(30),
        "record 30 applied on server1",
        || (status(&a1).commit == LAST).then_some(()),
    );

    phase!("server1 hangs; server2 takes over");
    c.servers[s1].freeze();
    c.servers[s2].thaw();
    probe_commit(&[&a2]);
    assert_eq!(role(&a2), ServerRole::Primary);

    phase!("server1 comes back and is deposed; an acknowledgement is backed");
    c.servers[s1].thaw();
    let answer = waiting.join().unwrap();
    wait_for_role(&a1, ServerRole::Deposed, Duration::from_secs(30));
    let on_s2 = Session::connect(&[a2.as_str()])
        .unwrap()
        .meta("record-30")
        .unwrap()
        .is_some();
    eprintln!("server1 answered {answer:?}; server2 holds record 30: {on_s2:?}");
    if answer.is_ok() {
        assert!(
            on_s2,
            "record {LAST} was acknowledged, but the new primary does not hold it"
        );
    }
}

/// With two secondaries and `--sync-replicas 1`, a commit the primary
/// acknowledged may be durable on one secondary only. When the primary
/// dies, the successor must take it from that secondary before it
/// promotes, even if that one is stopped for a while (a stopped process
/// still accepts connections): promoting without it loses the commit.
#[test]
fn t50_a_successor_waits_for_a_stopped_secondary_holding_an_acknowledged_commit() {
    let mut c = Cluster::new();
    let args = ["--sync-replicas", "1", "--replica-timeout-ms", "60000"];
    let s1 = c.add_server("s1", &args);
    c.servers[s1].start();
    let a1 = c.servers[s1].addr.clone();
    let (b2, b3) = (c.root.path().join("b2"), c.root.path().join("b3"));
    backup(&a1, &b2);
    backup(&a1, &b3);
    // One at a time: server2 joins first, so it is the successor.
    let s2 = c.add_server_on("s2", &b2, &args);
    c.servers[s2].start();
    let a2 = c.servers[s2].addr.clone();
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    let s3 = c.add_server_on("s3", &b3, &args);
    c.servers[s3].start();
    let a3 = c.servers[s3].addr.clone();
    wait_for_members(&a1, &[&a1, &a2, &a3], JOIN);
    wait_for_role(&a2, ServerRole::Secondary, JOIN);
    wait_for_role(&a3, ServerRole::Secondary, JOIN);
    wait_for_equal_digests(&[&a1, &a2, &a3], Duration::from_secs(30));

    phase!("server2 stops; commits are acknowledged through server3 alone");
    c.servers[s2].freeze();
    let mut s = Session::connect(&[a1.as_str()]).unwrap();
    // The primary sends a stopped secondary at most 4 unanswered batches
    // (the replica timeout, 60 s, keeps it a member meanwhile): after 20
    // more commits, the last one never left the primary for server2.
    for i in 0..20 {
        s.commit(|tx| {
            tx.set_meta("filler", Some(&i));
        })
        .unwrap();
    }
    s.commit(|tx| {
        tx.set_meta("acked", Some(&"held by server3 only"));
    })
    .unwrap();

    phase!("server3 stops, the primary dies, server2 comes back");
    c.servers[s3].freeze();
    c.servers[s1].kill();
    c.servers[s2].thaw();

    phase!("a commit through server2 makes it promote; server3 answers later");
    let through = a2.clone();
    let committing = std::thread::spawn(move || {
        let mut s = Session::connect(&[through.as_str()])?;
        s.commit(|tx| {
            tx.set_meta("after", Some(&"the primary died"));
        })
    });
    // Server3 is woken once server2 says it waits for it (or, had it not
    // waited, once it promoted without it).
    wait_until(JOIN, "server2 to wait for server3, or to promote", || {
        (c.servers[s2].log_contains("accepts connections but does not answer")
            || c.servers[s2].log_contains("promoted to primary"))
        .then_some(())
    });
    c.servers[s3].thaw();
    committing
        .join()
        .unwrap()
        .expect("the commit that promotes server2");
    assert_eq!(role(&a2), ServerRole::Primary);
    let held = Session::connect(&[a2.as_str()])
        .unwrap()
        .meta("acked")
        .unwrap();
    assert!(
        held.is_some(),
        "the new primary lost a commit server3 acknowledged"
    );
}

/// A former primary restarting while the server that took over from it is
/// stopped (its kernel takes connections, it answers nothing) does not
/// serve beside it: it holds off, and rejoins it once it answers. Before,
/// it served as a second primary once its 2 s probe gave up, beside one
/// holding a commit it lacked.
#[test]
fn t50_a_restarted_former_primary_waits_for_a_stopped_successor_instead_of_serving_beside_it() {
    let mut c = Cluster::new();
    let (s1, s2, a1, a2) = pair(&mut c, &["--sync-replicas", "1"]);

    phase!("the primary dies; server2 takes over and acknowledges a commit");
    c.servers[s1].kill();
    probe_commit(&[&a1, &a2]);
    assert_eq!(role(&a2), ServerRole::Primary);
    Session::connect(&[a2.as_str()])
        .unwrap()
        .commit(|tx| {
            tx.set_meta("taken over", Some(&"acknowledged by server2"));
        })
        .unwrap();

    phase!("server2 stops; the former primary restarts and holds off");
    c.servers[s2].freeze();
    c.servers[s1].start();
    wait_until(JOIN, "server1 to hold off for server2, or to serve", || {
        let log = |text| c.servers[s1].last_run_log_contains(text);
        (log("not serving yet") || log("role: Primary")).then_some(())
    });
    assert!(
        !c.servers[s1].last_run_log_contains("role: Primary"),
        "server1 serves as a primary beside server2"
    );
    assert_ne!(role(&a1), ServerRole::Primary);

    phase!("server2 answers again; server1 rejoins it");
    c.servers[s2].thaw();
    wait_for_role(&a1, ServerRole::Secondary, JOIN);
    assert_eq!(role(&a2), ServerRole::Primary);
    assert!(
        !c.servers[s1].last_run_log_contains("role: Primary"),
        "server1 served as a primary beside server2"
    );
    wait_for_equal_digests(&[&a1, &a2], Duration::from_secs(30));
    let held = Session::connect(&[a1.as_str()])
        .unwrap()
        .meta("taken over")
        .unwrap();
    assert!(
        held.is_some(),
        "server2's acknowledged commit is not on server1"
    );
}
