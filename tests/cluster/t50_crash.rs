//! `kill -9` and damaged files: acknowledged commits survive, damage is
//! reported clearly.

use std::fs;
use std::time::Duration;

use magma::client::{Ref, Session, SessionOptions};
use magma::protocol::{CommitBody, WireAppend, WireRef};

use crate::harness::{add_secondary, dump, pair, status, verify_flood, wait_until, Cluster, Flood};
use crate::phase;

#[test]
fn t50_kill9_under_flood_loses_no_acknowledged_commit() {
    let mut c = Cluster::new();
    let s = c.add_server("s1", &["--flush", "group"]);
    c.servers[s].start();
    let addr = c.servers[s].addr.clone();
    let dir = c.root.path().to_path_buf();

    phase!("two flooders commit as fast as they can");
    let mut floods = vec![
        Flood::start(&dir, &[addr.as_str()], "k1", &["--duration", "600"]),
        Flood::start(&dir, &[addr.as_str()], "k2", &["--duration", "600"]),
    ];
    wait_until(
        Duration::from_secs(60),
        "both flooders to have 300 acks",
        || floods.iter().all(|f| f.acked().len() >= 300).then_some(()),
    );

    phase!("kill -9 the server mid-flood");
    c.servers[s].kill();
    for f in &mut floods {
        let end = f.wait(Duration::from_secs(60));
        assert!(
            !end.status.success(),
            "flood {} should see the failure",
            f.name
        );
        assert!(
            end.stderr.contains("error: "),
            "flood {} should report `error: <kind>: ...`: {}",
            f.name,
            end.stderr
        );
    }

    phase!("restart on the same directory: every acknowledged append is there");
    c.servers[s].start();
    for f in &floods {
        let acked = f.acked();
        assert!(acked.len() >= 300);
        // At most the one commit in flight at the kill may have landed
        // without its acknowledgement.
        verify_flood(&dump(&addr, &f.name), &f.name, &acked, 1);
    }
}

#[test]
fn t50_damaged_files_on_start_up_are_reported_clearly() {
    let mut c = Cluster::new();
    let s = c.add_server("s1", &[]);
    c.servers[s].start();
    let addr = c.servers[s].addr.clone();
    let dir = c.root.path().to_path_buf();
    let mut f = Flood::start(&dir, &[addr.as_str()], "d", &["--count", "100"]);
    assert!(f.wait(Duration::from_secs(60)).status.success());
    c.servers[s].kill();
    let repo = c.servers[s].dir.clone();
    let log_dir = repo.join("log");
    let segment = fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();

    phase!("a torn log tail is cut and the server starts");
    // Segments are preallocated with zeros: the records end at the last
    // non-zero byte. A torn record is a prefix whose body never arrived.
    let mut bytes = fs::read(&segment).unwrap();
    let data_end = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
    bytes[data_end..data_end + 6].copy_from_slice(&[0x40, 0, 0, 0, 1, 2]);
    fs::write(&segment, &bytes).unwrap();
    c.servers[s].start();
    verify_flood(&dump(&addr, "d"), "d", &f.acked(), 0);
    c.servers[s].kill();

    phase!("a corrupt record in the middle of the log: refused, naming file and offset");
    let original = fs::read(&segment).unwrap();
    let mut bytes = original.clone();
    let mid = bytes.iter().rposition(|&b| b != 0).unwrap() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&segment, &bytes).unwrap();
    let (status, output) = c.servers[s].run_to_exit(Duration::from_secs(30));
    assert!(!status.success());
    let name = segment.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        output.contains(&name) && output.contains("offset"),
        "the error should name {name} and the offset: {output}"
    );
    fs::write(&segment, &original).unwrap();

    phase!("a damaged header: refused with a clear error");
    let header = repo.join("header");
    let good = fs::read(&header).unwrap();
    fs::write(&header, &good[..40]).unwrap();
    let (status, output) = c.servers[s].run_to_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(output.contains("header"), "{output}");
    fs::write(&header, &good).unwrap();

    phase!("restored files: the server serves everything again");
    c.servers[s].start();
    verify_flood(&dump(&addr, "d"), "d", &f.acked(), 0);
}

#[test]
fn t50_a_lost_newest_log_segment_is_refused_not_taken_for_the_end_of_the_log() {
    let mut c = Cluster::new();
    // Small segments: the flood's commits span several.
    let s = c.add_server("s1", &["--log-segment-bytes", "4096"]);
    c.servers[s].start();
    let addr = c.servers[s].addr.clone();
    let dir = c.root.path().to_path_buf();
    let mut f = Flood::start(&dir, &[addr.as_str()], "d", &["--count", "300"]);
    assert!(f.wait(Duration::from_secs(60)).status.success());
    c.servers[s].kill();
    let log_dir = c.servers[s].dir.join("log");
    let mut segments: Vec<_> = fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    assert!(segments.len() > 1, "several segments: {segments:?}");
    let newest = segments.pop().unwrap();
    // Not the segment the header names (bytes 112..120, docs/STORAGE.md):
    // that one's loss is caught by the header alone.
    let header = fs::read(c.servers[s].dir.join("header")).unwrap();
    let named = u64::from_le_bytes(header[112..120].try_into().unwrap());
    let newest_first: u64 = newest
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(named, newest_first, "a checkpoint since the last roll");

    phase!("the newest segment moved away: refused, naming it");
    let aside = dir.join("aside.log");
    fs::rename(&newest, &aside).unwrap();
    let (status, output) = c.servers[s].run_to_exit(Duration::from_secs(30));
    assert!(!status.success(), "started without its newest segment");
    let name = newest.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        output.contains(&name) && output.contains("is missing"),
        "the error should name {name} as missing: {output}"
    );

    phase!("put back: every acknowledged commit is served");
    fs::rename(&aside, &newest).unwrap();
    c.servers[s].start();
    verify_flood(&dump(&addr, "d"), "d", &f.acked(), 0);
}

#[test]
fn t50_kill9_of_an_asynchronous_secondary_keeps_what_it_acknowledged_as_applied() {
    // With --sync-replicas 0 a secondary answers once a batch is applied
    // and written to its log, before any fsync. With a 10-minute flush
    // interval, no checkpoint, and a flood that leaves no room for
    // heartbeats (which would ask for an fsync), what it acknowledges
    // stays unsynced; after SIGKILL it must still hold all of it (the
    // records are in the kernel's page cache, which outlives the process).
    let mut c = Cluster::new();
    let args = [
        "--sync-replicas",
        "0",
        "--flush",
        "interval:600000",
        "--checkpoint-interval-ms",
        "600000",
    ];
    let (s1, s2, a1, a2) = pair(&mut c, &args);
    let dir = c.root.path().to_path_buf();
    let mut f = Flood::start(&dir, &[a1.as_str()], "a", &["--duration", "600"]);

    phase!("the secondary acknowledges records it has not made durable");
    let acknowledged = wait_until(
        Duration::from_secs(60),
        "50 commits acknowledged by the secondary beyond what it fsynced",
        || {
            // Any pause of 100 ms (a loaded machine) brings a heartbeat and
            // an fsync: ask for a margin a short burst builds.
            let st = status(&a1);
            let m = st.members.iter().find(|m| m.addr == a2)?;
            (m.commit > m.durable + 50).then_some(m.commit)
        },
    );

    phase!("kill -9 the secondary, then the primary; the secondary restarts alone");
    c.servers[s2].kill();
    f.kill();
    c.servers[s1].kill();
    c.servers[s2].start();
    let holds = status(&a2).commit;
    assert!(
        holds >= acknowledged,
        "the secondary acknowledged commit {acknowledged} as applied but holds {holds} after a restart"
    );
}

/// A session to `addrs` whose calls give up after `secs` seconds.
fn impatient_session(addrs: &[&str], secs: u64) -> Session {
    let mut opts = SessionOptions::default();
    opts.connect.read_timeout = Some(Duration::from_secs(secs));
    opts.reroute_timeout = Duration::from_secs(secs);
    Session::connect_with(addrs, opts).unwrap()
}

#[test]
fn t50_a_restarted_primary_acknowledges_a_resent_commit_only_once_its_secondary_holds_it() {
    // A long replica timeout: the frozen secondary stays a member, so
    // every commit here must wait for it. Two secondaries, both needed:
    // the restarted primary hears server3 and serves (with server2 alone
    // stopped and silent it would not serve at all, see t50_failover).
    let args = ["--sync-replicas", "2", "--replica-timeout-ms", "60000"];
    let mut c = Cluster::new();
    let (s1, s2, a1, a2) = pair(&mut c, &args);
    let (_, a3) = add_secondary(&mut c, "s3", &a1, &[&a1, &a2], &args);
    let mut s = Session::connect(&[a1.as_str()]).unwrap();
    let coll = s
        .commit(|tx| {
            let coll = tx.create_collection();
            tx.set_root(coll);
        })
        .unwrap()
        .new_oids[0]
        .1;
    let body = CommitBody {
        token: Some(b"resend-after-restart".to_vec()),
        appends: vec![WireAppend {
            coll: WireRef::Oid(coll),
            value: rmpv::Value::from("once"),
        }],
        ..Default::default()
    };

    phase!("server2 hangs; a commit is applied on the primary and server3, unacknowledged");
    c.servers[s2].freeze();
    let err = impatient_session(&[&a1], 2)
        .commit_body(body.clone())
        .unwrap_err();
    assert!(err.is_outcome_unknown(), "{err}");

    phase!("kill -9 the primary and restart it while server2 still hangs");
    c.servers[s1].kill();
    c.servers[s1].start();

    phase!("the resent commit is a duplicate on the primary: it must still wait for server2");
    match impatient_session(&[&a1], 3).commit_body(body.clone()) {
        Err(e) if e.is_outcome_unknown() => {}
        other => panic!(
            "a commit the secondary does not hold was acknowledged (or failed otherwise): {other:?}"
        ),
    }

    phase!("server2 wakes up, gets the record, and the resend is acknowledged once");
    c.servers[s2].thaw();
    let number = Session::connect(&[a1.as_str()])
        .unwrap()
        .commit_status(body.token.as_deref().unwrap())
        .unwrap()
        .expect("the primary applied the first attempt");
    wait_until(
        Duration::from_secs(30),
        "the secondary to hold it durably",
        || {
            status(&a1)
                .members
                .iter()
                .any(|m| m.addr == a2 && m.durable >= number)
                .then_some(())
        },
    );
    let again = Session::connect(&[a1.as_str()])
        .unwrap()
        .commit_body(body)
        .unwrap();
    assert_eq!(again.number, number);
    for addr in [&a1, &a2, &a3] {
        let mut r = Session::connect(&[addr.as_str()]).unwrap();
        r.require_last_seen();
        assert_eq!(r.collection_len(Ref(coll)).unwrap(), 1, "on {addr}");
    }
}
