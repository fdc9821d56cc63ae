//! Warm backups: a server started on a backup catches up under flood,
//! joins the node by itself and serves reads; a dead secondary is invisible
//! to applications; acknowledged means replicated.

use std::time::Duration;

use magma::client::{from_value, ConnectOptions, Connection, Ref, Session, SessionOptions};
use magma::protocol::{RequestBody, ServerRole, SessionRole};
use serde::{Deserialize, Serialize};

use crate::harness::{
    backup, dump, pair, pair_with, status, stop_floods_and_verify, stop_or_move_on, verify_flood,
    wait_for_equal_digests, wait_for_members, wait_for_more_acks, wait_for_role, wait_until,
    Cluster, Flood,
};
use crate::phase;

const JOIN: Duration = Duration::from_secs(90);

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Person {
    name: String,
    age: u32,
}

/// Object structures committed early, verified later through a secondary.
fn commit_structures(addr: &str) -> u64 {
    let mut s = Session::connect(&[addr]).unwrap();
    let out = s
        .commit(|tx| {
            let ada = tx.create(
                "Person",
                &Person {
                    name: "ada".into(),
                    age: 36,
                },
            );
            let alan = tx.create(
                "Person",
                &Person {
                    name: "alan".into(),
                    age: 41,
                },
            );
            let log = tx.create_collection();
            let root = tx.create_value(
                "Domain",
                rmpv::Value::Map(vec![
                    (
                        "people".into(),
                        rmpv::Value::Array(vec![ada.to_value(), alan.to_value()]),
                    ),
                    ("log".into(), log.to_value()),
                ]),
            );
            tx.set_root(root);
        })
        .unwrap();
    let log = out.new_oids[2].1;
    for i in 0..100 {
        s.append(Ref(log), &format!("entry-{i}")).unwrap();
    }
    out.number
}

/// When quiet, the primary's figures for `secondary` show no lag (they are
/// as of its last answer, so they may trail the content by a moment).
fn wait_for_no_lag(primary: &str, secondary: &str) -> magma::protocol::StatusReport {
    wait_until(
        Duration::from_secs(10),
        "the secondary's lag to reach 0",
        || {
            let st = status(primary);
            let lag = st.members.iter().find(|m| m.addr == secondary)?.lag_commits;
            (lag == 0).then_some(st)
        },
    )
}

fn verify_structures(session: &mut Session) {
    let root = session.root().unwrap().expect("the domain root");
    let map = root.value.as_map().expect("the root is a map");
    let field = |k: &str| {
        map.iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let people: Vec<Ref> = from_value(&field("people")).unwrap();
    let names: Vec<String> = people
        .iter()
        .map(|p| session.get::<Person>(*p).unwrap().0.name)
        .collect();
    assert_eq!(names, ["ada", "alan"]);
    let log: Ref = from_value(&field("log")).unwrap();
    let entries: Vec<String> = session.collection_range_as(log, 0, 1000).unwrap();
    assert_eq!(entries.len(), 100);
    assert_eq!(entries[99], "entry-99");
}

/// s1 primary with structures and a backup taken early; returns the
/// backup directory.
fn primary_with_early_backup(c: &mut Cluster, args: &[&str]) -> (usize, std::path::PathBuf) {
    let s1 = c.add_server("s1", args);
    c.servers[s1].start();
    let a1 = c.servers[s1].addr.clone();
    commit_structures(&a1);
    let b = c.root.path().join("backup-early");
    backup(&a1, &b);
    (s1, b)
}

#[test]
fn t30_use_case_1_a_server_started_on_a_backup_catches_up_under_flood_and_joins() {
    let mut c = Cluster::new();
    let (s1, b) = primary_with_early_backup(&mut c, &[]);
    let a1 = c.servers[s1].addr.clone();
    let dir = c.root.path().to_path_buf();

    phase!("commits after the backup, then two flooders");
    let mut pre = Flood::start(&dir, &[a1.as_str()], "pre", &["--count", "300"]);
    assert!(pre.wait(Duration::from_secs(60)).status.success());
    let mut floods = vec![
        Flood::start(&dir, &[a1.as_str()], "c1", &["--duration", "600"]),
        Flood::start(&dir, &[a1.as_str()], "c2", &["--duration", "600"]),
    ];
    wait_until(Duration::from_secs(30), "flooders under way", || {
        floods.iter().all(|f| f.acked().len() >= 50).then_some(())
    });

    phase!("server2 starts on the early backup, catches up and joins by itself");
    let s2 = c.add_server_on("s2", &b, &[]);
    c.servers[s2].start();
    let a2 = c.servers[s2].addr.clone();
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    wait_until(JOIN, "server2 to report itself secondary", || {
        (status(&a2).role == magma::protocol::ServerRole::Secondary).then_some(())
    });

    phase!("verify the early structures through server2 while the flood goes on");
    let mut via2 = Session::connect(&[a2.as_str()]).unwrap();
    assert_eq!(via2.read_server(), Some(a2.as_str()));
    verify_structures(&mut via2);
    wait_for_more_acks(
        &floods,
        200,
        Duration::from_secs(60),
        "200 more acks per flooder after the join",
    );

    phase!("quiet: identical content, every acknowledged append on both servers");
    stop_floods_and_verify(&mut floods, &[&a1, &a2], "before or after the join");
    verify_flood(&dump(&a2, "pre"), "pre", &pre.acked(), 0);
    let st = wait_for_no_lag(&a1, &a2);
    let m2 = st.members.iter().find(|m| m.addr == a2).unwrap();
    assert!(m2.known, "{st:?}");
    // The secondary knows its own figures only.
    let st2 = status(&a2);
    let (mine, others): (Vec<_>, Vec<_>) = st2.members.iter().partition(|m| m.addr == a2);
    assert!(mine[0].known && mine[0].commit == st2.commit, "{st2:?}");
    assert!(others.iter().all(|m| !m.known), "{st2:?}");
}

#[test]
fn t30_use_case_6_a_killed_secondary_is_invisible_to_clients_and_rejoins() {
    let mut c = Cluster::new();
    let (s1, b) = primary_with_early_backup(&mut c, &["--replica-timeout-ms", "1000"]);
    let a1 = c.servers[s1].addr.clone();
    let dir = c.root.path().to_path_buf();
    let s2 = c.add_server_on("s2", &b, &[]);
    c.servers[s2].start();
    let a2 = c.servers[s2].addr.clone();
    wait_for_members(&a1, &[&a1, &a2], JOIN);

    phase!("two flooders (their sessions read from server2)");
    let mut floods = vec![
        Flood::start(&dir, &[a1.as_str()], "d1", &["--duration", "600"]),
        Flood::start(&dir, &[a1.as_str()], "d2", &["--duration", "600"]),
    ];
    wait_until(Duration::from_secs(30), "flooders under way", || {
        floods.iter().all(|f| f.acked().len() >= 100).then_some(())
    });

    phase!("kill -9 server2: the primary removes it, the flood goes on");
    c.servers[s2].kill();
    wait_for_members(&a1, &[&a1], Duration::from_secs(30));
    wait_for_more_acks(
        &floods,
        200,
        Duration::from_secs(60),
        "200 more acks per flooder",
    );
    for f in &mut floods {
        assert!(f.running(), "flood {} saw an error", f.name);
    }

    phase!("restart server2: it catches up and rejoins");
    c.servers[s2].start();
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    wait_for_more_acks(
        &floods,
        100,
        Duration::from_secs(60),
        "100 more acks per flooder",
    );
    stop_floods_and_verify(&mut floods, &[&a1, &a2], "while server2 rejoined");
}

/// A hung secondary (SIGSTOP: its kernel still completes connections, it
/// never answers) holds up no session. Every server is asked at once, so
/// connecting, choosing a read server and re-learning the node go on with
/// the primary instead of waiting out the read timeout on it; a read it
/// does not answer moves to the primary after the read failover timeout.
#[test]
fn t30_a_hung_secondary_holds_up_no_new_session() {
    // Commits never wait for it, and it stays a member throughout.
    let args = ["--sync-replicas", "0", "--replica-timeout-ms", "600000"];
    let mut c = Cluster::new();
    let (_, s2, a1, a2) = pair(&mut c, &args);
    // What a session waiting on the hung server would wait.
    let mut opts = SessionOptions::default();
    opts.connect.read_timeout = Some(Duration::from_secs(120));
    // A session reading from the secondary before it hangs (`pair` waits
    // until it knows it is one).
    let mut early = Session::connect_with(&[a2.as_str()], opts.clone()).unwrap();
    assert_eq!(early.read_server(), Some(a2.as_str()));
    early.root().unwrap();
    c.servers[s2].freeze();

    phase!("the early session's next read moves to the primary; sessions seeded with both servers connect, commit, read and re-learn the node");
    let (done, finished) = std::sync::mpsc::channel();
    let (p, s) = (a1.clone(), a2.clone());
    let work = std::thread::spawn(move || {
        early.root().unwrap();
        assert_eq!(early.read_server(), Some(p.as_str()));
        for seeds in [[&s, &p], [&p, &s]] {
            let mut session = Session::connect_with(&seeds, opts.clone()).unwrap();
            assert_eq!(session.read_server(), Some(p.as_str()));
            let coll = session
                .commit(|tx| {
                    let coll = tx.create_collection();
                    tx.set_root(coll);
                })
                .unwrap()
                .new_oids[0]
                .1;
            session.append(Ref(coll), "x").unwrap();
            session.require_last_seen();
            assert!(session.root().unwrap().is_some());
            session.refresh_node().unwrap();
            assert_eq!(session.node().members.len(), 2, "{:?}", session.node());
        }
        done.send(()).unwrap();
    });
    match finished.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("sessions were held up by the hung secondary")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(work.join().unwrap_err())
        }
    }
    c.servers[s2].thaw();
}

/// A client's complaint is a hint: the primary removes a secondary only if
/// it cannot reach it either, so a client cut off from a healthy secondary
/// never evicts it.
#[test]
fn t30_a_complaint_about_a_secondary_the_primary_reaches_keeps_it() {
    let mut c = Cluster::new();
    // The primary's own check waits this long for a durable answer: a
    // secondary stalled by a loaded machine must not fail it.
    let (s1, _, a1, a2) = pair(&mut c, &["--replica-timeout-ms", "10000"]);
    let mut conn =
        Connection::connect(&a1, SessionRole::Application, &ConnectOptions::default()).unwrap();
    conn.call(RequestBody::Complain { addr: a2.clone() })
        .unwrap();
    wait_until(Duration::from_secs(30), "the primary to check it", || {
        c.servers[s1]
            .log_contains("(a client could not reach it) but answers: kept")
            .then_some(())
    });
    let members: Vec<String> = status(&a1).members.into_iter().map(|m| m.addr).collect();
    assert!(members.contains(&a2), "{a2} was removed: {members:?}");
}

/// A primary started with `args` and a secondary whose fsync for commit
/// 300 on never returns (test hook): its process, event loop and storage
/// thread go on, so it answers hellos. Returns (s1, s2, a1, a2).
fn pair_with_a_disk_that_will_hang(
    c: &mut Cluster,
    args: &[&str],
) -> (usize, usize, String, String) {
    pair_with(c, args, &[], &[("MAGMA_FAULT_HANG_FSYNC_FROM", "300")])
}

/// Start a flood on `primary` and wait until secondary `s2`'s hooked fsync
/// hangs.
fn flood_until_the_disk_hangs(c: &Cluster, s2: usize, primary: &str, name: &str) -> Flood {
    let dir = c.root.path().to_path_buf();
    let flood = Flood::start(&dir, &[primary], name, &["--duration", "600"]);
    wait_until(Duration::from_secs(90), "server2's fsync to hang", || {
        c.servers[s2]
            .log_contains("MAGMA_FAULT_HANG_FSYNC_FROM")
            .then_some(())
    });
    flood
}

#[test]
fn t30_a_secondary_whose_disk_hangs_is_removed_and_commits_go_on() {
    let mut c = Cluster::new();
    let (s1, s2, a1, _) =
        pair_with_a_disk_that_will_hang(&mut c, &["--replica-timeout-ms", "1000"]);

    phase!("a flood past commit 300 (sync-replicas 1): server2's disk hangs");
    let mut floods = vec![flood_until_the_disk_hangs(&c, s2, &a1, "h")];

    phase!("the primary finds it makes no progress, removes it; the flood goes on");
    wait_for_members(&a1, &[&a1], Duration::from_secs(30));
    assert!(c.servers[s1].log_contains("no durable answer"));
    wait_for_more_acks(&floods, 200, Duration::from_secs(60), "200 more acks");
    assert!(floods[0].running(), "the flood saw an error");
    c.servers[s2].kill();
}

#[test]
fn t30_an_operator_removes_a_secondary_whose_disk_hangs_at_once() {
    let mut c = Cluster::new();
    // The primary would wait a minute before checking the secondary.
    let (s1, s2, a1, a2) =
        pair_with_a_disk_that_will_hang(&mut c, &["--replica-timeout-ms", "60000"]);
    let mut floods = vec![flood_until_the_disk_hangs(&c, s2, &a1, "r")];

    phase!("magma remove completes though server2 never acknowledges it");
    let remove = std::process::Command::new(crate::harness::CLI)
        .args(["remove", "--server", &a1, "--secondary", &a2])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let end = crate::harness::wait_or_kill(remove, Duration::from_secs(30), "magma remove");
    assert!(end.success(), "magma remove failed");
    assert!(c.servers[s1].log_contains("removed"));
    wait_for_members(&a1, &[&a1], Duration::from_secs(5));
    wait_for_more_acks(&floods, 200, Duration::from_secs(60), "200 more acks");
    assert!(floods[0].running(), "the flood saw an error");
    c.servers[s2].kill();
}

#[test]
fn t30_three_servers_stay_identical_and_reads_see_your_writes() {
    let mut c = Cluster::new();
    let (s1, b) = primary_with_early_backup(&mut c, &[]);
    let a1 = c.servers[s1].addr.clone();
    let b3 = c.root.path().join("backup-3");
    backup(&a1, &b3);
    let dir = c.root.path().to_path_buf();
    let s2 = c.add_server_on("s2", &b, &[]);
    let s3 = c.add_server_on("s3", &b3, &[]);
    c.servers[s2].start();
    c.servers[s3].start();
    let (a2, a3) = (c.servers[s2].addr.clone(), c.servers[s3].addr.clone());
    wait_for_members(&a1, &[&a1, &a2, &a3], JOIN);
    // Clients read only from servers that say they are secondaries: wait
    // until both have applied the node change that added them.
    wait_until(
        JOIN,
        "both secondaries to report themselves secondary",
        || {
            [&a2, &a3]
                .iter()
                .all(|a| status(a).role == magma::protocol::ServerRole::Secondary)
                .then_some(())
        },
    );

    phase!("read-your-writes through a secondary with required progress");
    // A session waits half a second for the secondaries' answers before it
    // settles for the primary; a loaded machine may need more than one try.
    let mut s = wait_until(JOIN, "a session reading from a secondary", || {
        let s = Session::connect(&[a1.as_str()]).unwrap();
        let reader = s.read_server().unwrap().to_string();
        (reader == a2 || reader == a3).then_some(s)
    });
    let root = s.root().unwrap().unwrap();
    let map = root.value.as_map().unwrap();
    let log: Ref = from_value(
        &map.iter()
            .find(|(k, _)| k.as_str() == Some("log"))
            .unwrap()
            .1,
    )
    .unwrap();
    for i in 0..50 {
        let out = s.append(log, &format!("ryw-{i}")).unwrap();
        s.set_required_progress(out.number);
        let len = s.collection_len(log).unwrap();
        assert!(
            len > out.positions[0],
            "a read after commit {} missed it",
            out.number
        );
    }

    phase!("flood, then all three identical");
    let mut f = Flood::start(&dir, &[a1.as_str()], "t", &["--count", "500"]);
    assert!(f.wait(Duration::from_secs(120)).status.success());
    wait_for_equal_digests(&[&a1, &a2, &a3], Duration::from_secs(30));
    for a in [&a1, &a2, &a3] {
        verify_flood(&dump(a, "t"), "t", &f.acked(), 0);
    }
}

#[test]
fn t30_a_gap_in_the_stream_is_resent() {
    let mut c = Cluster::new();
    let s1 = c.add_server("s1", &[]);
    // The primary skips record 400 once when streaming it.
    c.servers[s1]
        .env
        .push(("MAGMA_FAULT_DROP_RECORD".into(), "400".into()));
    c.servers[s1].start();
    let a1 = c.servers[s1].addr.clone();
    let b = c.root.path().join("b");
    backup(&a1, &b);
    let s2 = c.add_server_on("s2", &b, &[]);
    c.servers[s2].start();
    let a2 = c.servers[s2].addr.clone();
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    let dir = c.root.path().to_path_buf();
    let mut f = Flood::start(&dir, &[a1.as_str()], "g", &["--count", "600"]);
    assert!(f.wait(Duration::from_secs(120)).status.success());
    wait_for_equal_digests(&[&a1, &a2], Duration::from_secs(30));
    verify_flood(&dump(&a2, "g"), "g", &f.acked(), 0);
    let log = std::fs::read_to_string(&c.servers[s1].log).unwrap();
    assert!(
        log.contains("fault injection: not sending record 400"),
        "the fault hook did not fire"
    );
}

#[test]
fn t30_a_secondary_beyond_the_retained_log_is_told_to_start_from_a_new_backup() {
    let mut c = Cluster::new();
    let s1 = c.add_server(
        "s1",
        &[
            "--max-log-bytes",
            "65536",
            "--log-segment-bytes",
            "16384",
            "--checkpoint-interval-ms",
            "100",
        ],
    );
    c.servers[s1].start();
    let a1 = c.servers[s1].addr.clone();
    let b = c.root.path().join("old");
    backup(&a1, &b);
    let dir = c.root.path().to_path_buf();
    let mut f = Flood::start(&dir, &[a1.as_str()], "x", &["--count", "3000"]);
    assert!(f.wait(Duration::from_secs(120)).status.success());
    wait_until(Duration::from_secs(30), "the old log to be trimmed", || {
        let log = std::fs::read_dir(c.servers[s1].dir.join("log")).ok()?;
        let first = log
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".log")?
                    .parse::<u64>()
                    .ok()
            })
            .min()?;
        (first > 10).then_some(())
    });
    let s2 = c.add_server_on("s2", &b, &[]);
    c.servers[s2].start();
    let a2 = c.servers[s2].addr.clone();
    let log = c.servers[s2].log.clone();
    wait_until(
        Duration::from_secs(30),
        "server2 to report the truncated log",
        || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|t| t.contains("start this server from a new backup"))
        },
    );
    assert_eq!(status(&a2).role, magma::protocol::ServerRole::Restore);
    assert_eq!(status(&a1).members.len(), 1);
}

#[test]
fn t30_with_sync_replicas_an_acknowledged_commit_survives_the_primary_killed() {
    let mut c = Cluster::new();
    let (s1, b) = primary_with_early_backup(&mut c, &["--sync-replicas", "1"]);
    let a1 = c.servers[s1].addr.clone();
    let s2 = c.add_server_on("s2", &b, &[]);
    c.servers[s2].start();
    let a2 = c.servers[s2].addr.clone();
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    let dir = c.root.path().to_path_buf();
    let mut f = Flood::start(&dir, &[a1.as_str()], "s", &["--duration", "600"]);
    wait_until(Duration::from_secs(60), "300 acks", || {
        (f.acked().len() >= 300).then_some(())
    });

    phase!("kill -9 the primary right after acknowledgements");
    c.servers[s1].kill();
    // A commit in flight at the kill stops the flood (outcome unknown); a
    // kill between two commits lets the next one go to server2, which
    // takes over, and the flood goes on there until stopped.
    stop_or_move_on(std::slice::from_mut(&mut f), Duration::from_secs(60));
    // Every acknowledged append is on the secondary.
    verify_flood(&dump(&a2, "s"), "s", &f.acked(), 1);
}

#[test]
fn t30_asynchronous_replication_delivers_everything_with_any_batch_delay() {
    // 0: each batch goes as soon as the previous one is acknowledged;
    // 20 ms: every batch waits far longer than a commit takes, so records
    // pile up into large batches.
    for delay in ["0", "20000"] {
        phase!("--sync-replicas 0 --async-batch-delay-us {delay}: two floods");
        let mut c = Cluster::new();
        let args = ["--sync-replicas", "0", "--async-batch-delay-us", delay];
        let (_, _, a1, a2) = pair(&mut c, &args);
        let dir = c.root.path().to_path_buf();
        let mut floods = vec![
            Flood::start(&dir, &[a1.as_str()], "f1", &["--duration", "600"]),
            Flood::start(&dir, &[a1.as_str()], "f2", &["--duration", "600"]),
        ];
        wait_for_more_acks(&floods, 400, Duration::from_secs(60), "400 acks per flood");
        stop_floods_and_verify(&mut floods, &[&a1, &a2], "with asynchronous replication");
        wait_for_no_lag(&a1, &a2);
        // The secondary answered once applied; the heartbeats that follow
        // ask for durability, so the primary learns it holds everything.
        wait_until(
            Duration::from_secs(10),
            "everything durable on both",
            || {
                let st = status(&a1);
                st.members
                    .iter()
                    .all(|m| m.commit == st.commit && m.durable == st.commit)
                    .then_some(())
            },
        );
    }
    let out = std::process::Command::new(crate::harness::SERVER)
        .args(["--async-batch-delay-us", "100001"])
        .output()
        .expect("run magma-server");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--async-batch-delay-us"), "{err}");
}

fn magma(args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::harness::CLI)
        .args(args)
        .output()
        .expect("run magma")
}

#[test]
fn t30_remove_and_follow_are_operator_controls_with_clear_refusals() {
    let mut c = Cluster::new();
    let (s1, b) = primary_with_early_backup(&mut c, &[]);
    let a1 = c.servers[s1].addr.clone();
    let s2 = c.add_server_on("s2", &b, &[]);
    c.servers[s2].start();
    let a2 = c.servers[s2].addr.clone();
    wait_for_members(&a1, &[&a1, &a2], JOIN);

    phase!("magma remove: server2 leaves the node and stops following");
    let out = magma(&["remove", "--server", &a1, "--secondary", &a2]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_members(&a1, &[&a1], Duration::from_secs(30));
    wait_until(Duration::from_secs(30), "server2 to stop following", || {
        (status(&a2).role == magma::protocol::ServerRole::Restore).then_some(())
    });
    let dir = c.root.path().to_path_buf();
    let mut f = Flood::start(&dir, &[a1.as_str()], "r", &["--count", "100"]);
    assert!(f.wait(Duration::from_secs(60)).status.success());
    assert_eq!(
        status(&a1).members.len(),
        1,
        "a removed secondary must not rejoin by itself"
    );

    phase!("refusals: follow on a primary, a non-primary target, another repository");
    let out = magma(&["follow", "--server", &a1, "--primary", &a2]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: unavailable"));
    let out = magma(&["follow", "--server", &a2, "--primary", &a2]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong_server"));
    let other = c.add_server("other", &[]);
    c.servers[other].start();
    let ao = c.servers[other].addr.clone();
    let out = magma(&["follow", "--server", &a2, "--primary", &ao]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("repository_mismatch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    phase!("magma follow: server2 catches up and rejoins");
    let out = magma(&["follow", "--server", &a2, "--primary", &a1]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    wait_for_equal_digests(&[&a1, &a2], Duration::from_secs(30));
    verify_flood(&dump(&a2, "r"), "r", &f.acked(), 0);
}

#[test]
fn t30_join_from_nothing_pulls_a_backup_catches_up_and_joins() {
    let mut c = Cluster::new();
    let s1 = c.add_server("s1", &[]);
    c.servers[s1].start();
    let a1 = c.servers[s1].addr.clone();
    commit_structures(&a1);
    let dir = c.root.path().to_path_buf();
    let mut f = Flood::start(&dir, &[a1.as_str()], "j", &["--duration", "600"]);
    wait_until(Duration::from_secs(30), "flood under way", || {
        (f.acked().len() >= 100).then_some(())
    });
    phase!("a server on an empty directory with --join");
    let s2 = c.add_server("s2", &["--join", &a1]);
    c.servers[s2].start();
    let a2 = c.servers[s2].addr.clone();
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    let mut via2 = Session::connect(&[a2.as_str()]).unwrap();
    verify_structures(&mut via2);
    f.kill();
    wait_for_equal_digests(&[&a1, &a2], Duration::from_secs(30));
    verify_flood(&dump(&a2, "j"), "j", &f.acked(), 1);
}

/// A server catching up from a backup is no member yet: when its primary
/// dies, the successor does not stream to it. It asks the members of the
/// node it knows who leads now, and joins the new primary.
#[test]
fn t30_a_server_catching_up_from_a_dead_primary_joins_its_successor() {
    let mut c = Cluster::new();
    let (s1, _, a1, a2) = pair(&mut c, &[]);
    let b3 = c.root.path().join("b3");
    backup(&a1, &b3);

    phase!("the primary dies; server3 starts on a backup of it and cannot reach it");
    c.servers[s1].kill();
    let s3 = c.add_server_on("s3", &b3, &[]);
    c.servers[s3].start();
    let a3 = c.servers[s3].addr.clone();

    phase!("a commit reaching server2 makes it the primary");
    wait_until(Duration::from_secs(60), "a commit through server2", || {
        let mut s = Session::connect(&[a2.as_str()]).ok()?;
        s.commit(|tx| {
            tx.set_meta("after", Some(&"the primary died"));
        })
        .ok()
    });
    wait_for_role(&a2, ServerRole::Primary, Duration::from_secs(30));

    phase!("server3 finds server2 and joins it");
    wait_for_members(&a2, &[&a2, &a3], JOIN);
    wait_for_role(&a3, ServerRole::Secondary, JOIN);
    wait_for_equal_digests(&[&a2, &a3], Duration::from_secs(60));
}

/// `--primary` at start makes the checks of `magma follow`: a target that
/// is not a primary, or serves another repository, is refused (the log
/// says why) and the server stays a backup; the right one is followed.
#[test]
fn t30_primary_at_start_is_checked_like_follow() {
    let mut c = Cluster::new();
    let (_, _, a1, a2) = pair(&mut c, &[]);
    let b3 = c.root.path().join("b3");
    backup(&a1, &b3);
    let other = c.add_server("other", &[]);
    c.servers[other].start();
    let ao = c.servers[other].addr.clone();

    phase!("--primary naming another repository's primary: refused");
    let s3 = c.add_server_on("s3", &b3, &["--primary", &ao]);
    c.servers[s3].start();
    let a3 = c.servers[s3].addr.clone();
    wait_until(Duration::from_secs(30), "server3 to refuse it", || {
        c.servers[s3]
            .log_contains(&format!("--primary {ao} refused: repository"))
            .then_some(())
    });
    assert_eq!(status(&a3).role, ServerRole::Restore);

    phase!("--primary naming a secondary: refused, not redirected");
    c.servers[s3].kill();
    c.servers[s3].args = vec!["--primary".into(), a2.clone()];
    c.servers[s3].start();
    wait_until(Duration::from_secs(30), "server3 to refuse it", || {
        c.servers[s3]
            .log_contains(&format!(
                "--primary {a2} refused: wrong server; the primary is {a1}"
            ))
            .then_some(())
    });
    assert_eq!(status(&a3).role, ServerRole::Restore);
    assert_eq!(status(&a1).members.len(), 2, "server3 must not have joined");

    phase!("--primary naming the primary: followed");
    c.servers[s3].kill();
    c.servers[s3].args = vec!["--primary".into(), a1.clone()];
    c.servers[s3].start();
    wait_for_members(&a1, &[&a1, &a2, &a3], JOIN);
    wait_for_equal_digests(&[&a1, &a3], Duration::from_secs(60));
}
