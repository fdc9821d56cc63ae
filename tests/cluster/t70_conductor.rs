//! The conductor: the seed's HA test, use-cases 1 to 6 in sequence on two
//! servers with two flooding client processes, verifying after each step
//! the object structures committed early and the flood progress (every
//! acknowledged append present exactly once and in order, nothing never
//! sent, identical digests when quiet).

use std::time::{Duration, Instant};

use magma::client::{from_value, Ref, Session};
use magma::protocol::ServerRole;
use serde::{Deserialize, Serialize};

use crate::harness::{
    backup, dump, status, stop_or_move_on, verify_flood, wait_for_equal_digests, wait_for_members,
    wait_for_more_acks, wait_for_role, wait_until, Cluster, Flood, CLI,
};
use crate::phase;

const JOIN: Duration = Duration::from_secs(90);

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Person {
    name: String,
    age: u32,
}

fn commit_structures(addr: &str) {
    let mut s = Session::connect(&[addr]).unwrap();
    s.commit(|tx| {
        let ada = tx.create(
            "Person",
            &Person {
                name: "ada".into(),
                age: 36,
            },
        );
        let garbage = tx.create(
            "Person",
            &Person {
                name: "garbage".into(),
                age: 0,
            },
        );
        let root = tx.create_value(
            "Domain",
            rmpv::Value::Map(vec![
                ("people".into(), rmpv::Value::Array(vec![ada.to_value()])),
                ("old".into(), garbage.to_value()),
            ]),
        );
        tx.set_root(root);
    })
    .unwrap();
    // Make "garbage" unreachable (compaction drops it).
    s.require_last_seen();
    let root = s.root().unwrap().unwrap();
    let mut map = root.value.as_map().unwrap().clone();
    map.retain(|(k, _)| k.as_str() != Some("old"));
    s.commit(|tx| {
        tx.update(&root, &rmpv::Value::Map(map));
    })
    .unwrap();
}

fn verify_structures(addr: &str) {
    let mut s = Session::connect(&[addr]).unwrap();
    let root = s.root().unwrap().expect("root");
    let map = root.value.as_map().unwrap();
    let people = map
        .iter()
        .find(|(k, _)| k.as_str() == Some("people"))
        .unwrap()
        .1
        .clone();
    let people: Vec<Ref> = from_value(&people).unwrap();
    let (p, _): (Person, u64) = s.get(people[0]).unwrap();
    assert_eq!(p.name, "ada");
}

fn magma(args: &[&str]) {
    let out = std::process::Command::new(CLI).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "magma {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stop a set of floods and check them on every server.
fn finish(floods: &mut [Flood], servers: &[&str]) {
    for f in floods.iter_mut() {
        f.kill();
    }
    wait_for_equal_digests(servers, Duration::from_secs(60));
    for f in floods.iter() {
        for a in servers {
            verify_flood(&dump(a, &f.name), &f.name, &f.acked(), 1);
        }
    }
}

fn flood_pair(c: &Cluster, nodes: &[&str], tag: &str) -> Vec<Flood> {
    let dir = c.root.path().to_path_buf();
    vec![
        Flood::start(
            &dir,
            nodes,
            &format!("{tag}-client1"),
            &["--duration", "300"],
        ),
        Flood::start(
            &dir,
            nodes,
            &format!("{tag}-client2"),
            &["--duration", "300"],
        ),
    ]
}

#[test]
fn t70_conductor_runs_the_seeds_ha_use_cases_1_to_6() {
    let started = Instant::now();
    let mut c = Cluster::new();
    let s1 = c.add_server("server", &[]);
    c.servers[s1].start();
    let a1 = c.servers[s1].addr.clone();
    commit_structures(&a1);
    let early = c.root.path().join("backup-early");
    backup(&a1, &early);

    phase!("use case 1: add a server to the node under flood");
    let mut floods = flood_pair(&c, &[&a1], "uc1");
    wait_for_more_acks(&floods, 200, Duration::from_secs(60), "flooding server");
    let s2 = c.add_server_on("server2", &early, &[]);
    c.servers[s2].start();
    let a2 = c.servers[s2].addr.clone();
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    verify_structures(&a2);
    wait_for_more_acks(&floods, 200, Duration::from_secs(60), "flooding the node");
    finish(&mut floods, &[&a1, &a2]);

    phase!("use case 2: primary failure");
    let mut floods = flood_pair(&c, &[&a1, &a2], "uc2");
    wait_for_more_acks(&floods, 200, Duration::from_secs(60), "flooding");
    c.servers[s1].kill();
    stop_or_move_on(&mut floods, Duration::from_secs(60));
    let mut probe = Session::connect(&[a1.as_str(), a2.as_str()]).unwrap();
    probe
        .commit(|tx| {
            tx.set_meta("uc2", Some(&"done"));
        })
        .unwrap();
    assert_eq!(status(&a2).role, ServerRole::Primary);
    for f in floods.iter_mut() {
        f.kill();
        verify_flood(&dump(&a2, &f.name), &f.name, &f.acked(), 1);
    }
    verify_structures(&a2);

    phase!("use case 3: the former primary rejoins");
    let mut floods = flood_pair(&c, &[&a1, &a2], "uc3");
    wait_for_more_acks(&floods, 200, Duration::from_secs(60), "flooding server2");
    c.servers[s1].start();
    let diverged = wait_until(
        JOIN,
        "server to rejoin or report divergence",
        || match status(&a1).role {
            ServerRole::Secondary => Some(false),
            ServerRole::Deposed => c.servers[s1]
                .dir
                .read_dir()
                .ok()?
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("divergent-"))
                .then_some(true),
            _ => None,
        },
    );
    if diverged {
        phase!("server diverged (a commit in flight at the kill): re-seeded with --join");
        c.servers[s1].kill();
        std::fs::rename(&c.servers[s1].dir, c.root.path().join("server-diverged")).unwrap();
        c.servers[s1].args = vec!["--join".into(), a2.clone()];
        c.servers[s1].start();
    }
    wait_for_members(&a2, &[&a1, &a2], JOIN);
    wait_for_more_acks(
        &floods,
        200,
        Duration::from_secs(60),
        "flooding the reversed node",
    );

    phase!("use case 4: deliberate swap under flood, then 10 s more");
    // Re-seeded with --join, server1 knows itself a member a moment after
    // server2 lists it; a take-over asked before then is refused.
    wait_for_role(&a1, ServerRole::Secondary, JOIN);
    magma(&["take-over", "--server", &a1]);
    let t = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "10 s of flood after the swap",
        || (t.elapsed() >= Duration::from_secs(10)).then_some(()),
    );
    for f in floods.iter_mut() {
        assert!(f.running(), "flood {} noticed the swap", f.name);
    }
    assert_eq!(status(&a1).role, ServerRole::Primary);
    finish(&mut floods, &[&a1, &a2]);

    phase!("use case 5: garbage collection without stopping the node");
    let mut floods = flood_pair(&c, &[&a1, &a2], "uc5");
    wait_for_more_acks(&floods, 200, Duration::from_secs(60), "flooding");
    let full = c.root.path().join("backup-full");
    backup(&a1, &full);
    let compacted = c.root.path().join("compacted");
    magma(&[
        "compact",
        "--from",
        full.to_str().unwrap(),
        "--to",
        compacted.to_str().unwrap(),
    ]);
    c.servers[s2].admin().shutdown(true).unwrap();
    assert!(c.servers[s2].wait_exit(Duration::from_secs(30)).success());
    // The compacted server takes server2's address: wait until the primary
    // dropped the old entry, or the next wait would see it.
    wait_for_members(&a1, &[&a1], Duration::from_secs(30));
    let s2c = c.add_server_on("server2-compacted", &compacted, &[]);
    c.servers[s2c].addr = a2.clone();
    c.servers[s2c].start();
    wait_for_members(&a1, &[&a1, &a2], JOIN);
    wait_for_role(&a2, ServerRole::Secondary, JOIN);
    verify_structures(&a2);
    wait_for_more_acks(
        &floods,
        200,
        Duration::from_secs(60),
        "flooding after the restart",
    );
    finish(&mut floods, &[&a1, &a2]);

    phase!("use case 6: secondary killed while the primary serves");
    let mut floods = flood_pair(&c, &[&a1, &a2], "uc6");
    wait_for_more_acks(&floods, 200, Duration::from_secs(60), "flooding");
    c.servers[s2c].kill();
    wait_for_members(&a1, &[&a1], Duration::from_secs(30));
    wait_for_more_acks(
        &floods,
        300,
        Duration::from_secs(60),
        "flooding without server2",
    );
    for f in floods.iter_mut() {
        assert!(
            f.running(),
            "flood {} noticed the secondary's death",
            f.name
        );
        f.kill();
        verify_flood(&dump(&a1, &f.name), &f.name, &f.acked(), 1);
    }
    verify_structures(&a1);
    eprintln!("conductor run: {:.1} s", started.elapsed().as_secs_f64());
}
