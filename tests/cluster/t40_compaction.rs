//! Use-case 5, garbage collection without stopping the node: under flood,
//! a full backup of the primary is compacted offline with `magma compact`,
//! the secondary is stopped gracefully and restarted on the compacted copy;
//! it catches up, rejoins and serves the same content without the garbage.
//! Then the application links a dropped object again: the compacted server,
//! which can no longer hold what the node holds, stops with an error that
//! says so, and the primary goes on without it.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use magma::client::{from_value, ClientError, Ref, Session};
use magma::protocol::{ServerRole, WireError};
use serde::{Deserialize, Serialize};

use crate::harness::{
    backup, status, stop_floods_and_verify, wait_for_members, wait_for_more_acks, wait_for_role,
    wait_until, Cluster, Flood, CLI,
};
use crate::phase;

const JOIN: Duration = Duration::from_secs(90);
/// Unreachable blobs made before the backup: about 1.6 MB of garbage.
const JUNK: usize = 200;
const JUNK_BYTES: usize = 8 * 1024;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Person {
    name: String,
    age: u32,
}

/// What the structures committed early are, for checking them later.
struct Structures {
    people: [Ref; 2],
    log: Ref,
    /// Objects made unreachable.
    junk: Vec<Ref>,
}

fn person(name: &str, age: u32) -> Person {
    Person {
        name: name.into(),
        age,
    }
}

fn field(map: &[(rmpv::Value, rmpv::Value)], key: &str) -> rmpv::Value {
    map.iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("the root has no {key:?}"))
}

/// A domain root {people, log, junk}; then garbage: ada rewritten three
/// times (superseded versions) and the root rewritten without `junk`.
fn commit_structures_and_garbage(addr: &str) -> Structures {
    let mut s = Session::connect(&[addr]).unwrap();
    let blob = "j".repeat(JUNK_BYTES);
    let out = s
        .commit(|tx| {
            let ada = tx.create("Person", &person("ada", 36));
            let alan = tx.create("Person", &person("alan", 41));
            let log = tx.create_collection();
            let junk: Vec<rmpv::Value> = (0..JUNK)
                .map(|i| tx.create("Junk", &format!("{i}{blob}")).to_value())
                .collect();
            let root = tx.create_value(
                "Domain",
                rmpv::Value::Map(vec![
                    (
                        "people".into(),
                        rmpv::Value::Array(vec![ada.to_value(), alan.to_value()]),
                    ),
                    ("log".into(), log.to_value()),
                    ("junk".into(), rmpv::Value::Array(junk)),
                ]),
            );
            tx.set_root(root);
        })
        .unwrap();
    let oid = |i: usize| Ref(out.new_oids[i].1);
    let (ada, alan, log) = (oid(0), oid(1), oid(2));
    let junk: Vec<Ref> = (3..3 + JUNK).map(oid).collect();
    for i in 0..100 {
        s.append(log, &format!("entry-{i}")).unwrap();
    }
    for age in 37..40 {
        let (_, version) = s.get::<Person>(ada).unwrap();
        s.commit(|tx| {
            tx.put(ada, version, "Person", &person("ada", age));
        })
        .unwrap();
    }
    let root = s.root().unwrap().expect("the domain root");
    let map = root.value.as_map().unwrap().clone();
    let kept: Vec<_> = map
        .into_iter()
        .filter(|(k, _)| k.as_str() != Some("junk"))
        .collect();
    s.commit(|tx| {
        tx.put_value(root.oid, root.version, &root.class, rmpv::Value::Map(kept));
    })
    .unwrap();
    Structures {
        people: [ada, alan],
        log,
        junk,
    }
}

/// The structures through one server: latest versions, the whole log, and
/// when `compacted`, none of the garbage.
fn verify_structures(session: &mut Session, st: &Structures, compacted: bool) {
    let root = session.root().unwrap().expect("the domain root");
    let map = root.value.as_map().expect("the root is a map");
    let people: Vec<Ref> = from_value(&field(map, "people")).unwrap();
    assert_eq!(people, st.people);
    let got: Vec<Person> = people
        .iter()
        .map(|p| session.get::<Person>(*p).unwrap().0)
        .collect();
    assert_eq!(got, [person("ada", 39), person("alan", 41)]);
    let log: Ref = from_value(&field(map, "log")).unwrap();
    assert_eq!(log, st.log);
    let entries: Vec<String> = session.collection_range_as(log, 0, 1000).unwrap();
    let want: Vec<String> = (0..100).map(|i| format!("entry-{i}")).collect();
    assert_eq!(entries, want);
    if compacted {
        for j in [st.junk[0], st.junk[JUNK - 1]] {
            match session.read(j) {
                Err(ClientError::Server(WireError::UnknownObject { .. })) => {}
                other => panic!("garbage object {j:?} on the compacted server: {other:?}"),
            }
        }
    }
}

fn magma(args: &[&str]) -> Output {
    Command::new(CLI)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("harness: cannot run {CLI}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Bytes of every file under `dir`.
fn du(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                du(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

#[test]
fn t40_use_case_5_garbage_collection_without_stopping_the_node() {
    let mut c = Cluster::new();
    let s1 = c.add_server("s1", &["--replica-timeout-ms", "1000"]);
    c.servers[s1].start();
    let a1 = c.servers[s1].addr.clone();
    let dir = c.root.path().to_path_buf();

    phase!("object structures, then garbage: unreachable blobs, superseded versions");
    let st = commit_structures_and_garbage(&a1);

    phase!("server2 starts on an early backup and joins");
    let early = dir.join("backup-early");
    backup(&a1, &early);
    let s2 = c.add_server_on("s2", &early, &[]);
    c.servers[s2].start();
    let a2 = c.servers[s2].addr.clone();
    wait_for_members(&a1, &[&a1, &a2], JOIN);

    phase!("two flooders on server1, running throughout");
    let mut floods = vec![
        Flood::start(&dir, &[a1.as_str()], "g1", &["--duration", "300"]),
        Flood::start(&dir, &[a1.as_str()], "g2", &["--duration", "300"]),
    ];
    wait_until(Duration::from_secs(30), "flooders under way", || {
        floods.iter().all(|f| f.acked().len() >= 50).then_some(())
    });

    phase!("full backup of the primary under flood, compacted offline");
    let full = dir.join("backup-full");
    backup(&a1, &full);
    let compacted = dir.join("compacted");
    let out = magma(&[
        "compact",
        "--from",
        full.to_str().unwrap(),
        "--to",
        compacted.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "magma compact: {}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{}", line.trim());
    assert!(line.contains(&format!("dropped {JUNK} of")), "{line}");
    let (before, after) = (du(&full), du(&compacted));
    eprintln!("backup {before} bytes, compacted {after} bytes");
    assert!(
        after + (JUNK * JUNK_BYTES) as u64 <= before,
        "the compacted copy ({after} bytes) is not smaller than the backup ({before} bytes) by the garbage"
    );
    let v = magma(&["verify-backup", compacted.to_str().unwrap()]);
    assert!(v.status.success(), "verify-backup: {}", text(&v));

    phase!("refusals: a live repository, a target that exists");
    let live = magma(&[
        "compact",
        "--from",
        c.servers[s1].dir.to_str().unwrap(),
        "--to",
        dir.join("never").to_str().unwrap(),
    ]);
    assert_eq!(live.status.code(), Some(1), "{}", text(&live));
    let err = String::from_utf8_lossy(&live.stderr);
    assert!(err.starts_with("error: compact: "), "{err}");
    assert!(err.contains("locked by a running server"), "{err}");
    assert!(!dir.join("never").exists());
    let exists = magma(&[
        "compact",
        "--from",
        full.to_str().unwrap(),
        "--to",
        compacted.to_str().unwrap(),
    ]);
    assert_eq!(exists.status.code(), Some(1), "{}", text(&exists));
    assert!(
        text(&exists).contains("already exists"),
        "{}",
        text(&exists)
    );

    phase!("stop server2 gracefully");
    let down = magma(&["shutdown", "--server", &a2]);
    assert!(down.status.success(), "shutdown: {}", text(&down));
    assert!(c.servers[s2].wait_exit(Duration::from_secs(30)).success());

    phase!("restart server2 on the compacted copy: it catches up and rejoins");
    let s2c = c.add_server_on("s2-compacted", &compacted, &[]);
    c.servers[s2c].start();
    let a2c = c.servers[s2c].addr.clone();
    wait_for_members(&a1, &[&a1, &a2c], JOIN);
    wait_for_role(&a2c, ServerRole::Secondary, JOIN);

    phase!("the early structures through the compacted server; the garbage is gone there");
    let mut via = Session::connect(&[a2c.as_str()]).unwrap();
    assert_eq!(via.read_server(), Some(a2c.as_str()));
    verify_structures(&mut via, &st, true);
    wait_for_more_acks(
        &floods,
        200,
        Duration::from_secs(60),
        "200 more acks per flooder after the rejoin",
    );

    phase!("quiet: equal digests, every acknowledged append on both servers");
    stop_floods_and_verify(&mut floods, &[&a1, &a2c], "around the compaction");
    verify_structures(&mut Session::connect(&[a1.as_str()]).unwrap(), &st, false);

    phase!("the application links a dropped object again: the compacted copy stops");
    let mut s = Session::connect(&[a1.as_str()]).unwrap();
    let root = s.root().unwrap().expect("the domain root");
    let mut map = root.value.as_map().unwrap().clone();
    map.push(("again".into(), st.junk[0].to_value()));
    // Acknowledged once the stopping replica has told the primary it
    // leaves (or, failing that, after `--replica-timeout-ms 1000`).
    s.commit(|tx| {
        tx.put_value(root.oid, root.version, &root.class, rmpv::Value::Map(map));
    })
    .unwrap();
    let exit = c.servers[s2c].wait_exit(Duration::from_secs(60));
    assert!(!exit.success(), "the compacted server went on: {exit:?}");
    assert!(
        c.servers[s2c].log_contains(&format!(
            "uses object {}, which compaction dropped from this copy",
            st.junk[0].0
        )),
        "the compacted server's log does not say why it stopped"
    );
    let mut check = Session::connect(&[a1.as_str()]).unwrap();
    let again: String = check.get(st.junk[0]).unwrap().0;
    assert!(again.starts_with('0'), "{again:.20}");
    wait_until(
        Duration::from_secs(30),
        "the primary to drop the stopped server from the node",
        || (status(&a1).members.len() == 1).then_some(()),
    );
}
