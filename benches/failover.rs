//! Failover benchmark: real `magma-server` processes on loopback.
//!
//! `cargo bench --bench failover` (add `-- quick` for 3 runs instead of 5):
//! * failover time as a committing client sees it: from `kill -9` of the
//!   primary to the first acknowledged commit on the new primary (the
//!   client's next commit goes to the successor, which takes over);
//! * the longest pause between two acknowledged commits of a committing
//!   client while `magma take-over` swaps the roles (with the default
//!   settings, then with asynchronous replication and interval flushing);
//! * with the secondary hung (SIGSTOP: its kernel still accepts
//!   connections, nothing answers), how long a new session takes to
//!   connect, and to connect, commit and read, with the hung server as
//!   the first seed and as the second.
//!
//! Medians and maxima over the runs are printed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use magma::client::{Ref, Session};

mod common;
use common::{magma, pair};

/// A client committing one append at a time; every acknowledgement's time
/// and server is recorded. On an error it reconnects and goes on.
struct Committer {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<(Instant, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    fn start(nodes: Vec<String>) -> Committer {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let (s2, a2) = (stop.clone(), acks.clone());
        let thread = std::thread::spawn(move || {
            let addrs: Vec<&str> = nodes.iter().map(String::as_str).collect();
            let mut session = Session::connect(&addrs).unwrap();
            let coll = session
                .commit(|tx| {
                    let c = tx.create_collection();
                    tx.set_root(c);
                })
                .unwrap()
                .new_oids[0]
                .1;
            while !s2.load(Ordering::Relaxed) {
                match session.append(Ref(coll), &"x") {
                    Ok(_) => a2.lock().unwrap().push((
                        Instant::now(),
                        session.commit_server().unwrap_or_default().to_string(),
                    )),
                    Err(_) => {
                        if let Ok(s) = Session::connect(&addrs) {
                            session = s;
                        }
                    }
                }
            }
        });
        Committer {
            stop,
            acks,
            thread: Some(thread),
        }
    }

    fn acks(&self) -> Vec<(Instant, String)> {
        self.acks.lock().unwrap().clone()
    }

    fn wait_for(&self, n: usize, timeout: Duration) {
        let start = Instant::now();
        while self.acks.lock().unwrap().len() < n {
            assert!(start.elapsed() < timeout, "the committer made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn failover_once() -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, _s, a1, a2) = pair(&dir.path().join("p"), &dir.path().join("b"), &[]);
    let c = Committer::start(vec![a1.clone(), a2.clone()]);
    c.wait_for(200, Duration::from_secs(30));
    let t0 = Instant::now();
    let _ = p.0.kill();
    let _ = p.0.wait();
    let start = Instant::now();
    loop {
        if let Some((t, _)) = c.acks().into_iter().find(|(t, s)| *t > t0 && *s == a2) {
            return t - t0;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no failover");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn take_over_pause(flags: &[&str]) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let (_p, _s, a1, a2) = pair(&dir.path().join("p"), &dir.path().join("b"), flags);
    let c = Committer::start(vec![a1.clone(), a2.clone()]);
    c.wait_for(200, Duration::from_secs(30));
    let before = c.acks().len();
    magma(&["take-over", "--server", &a2]);
    c.wait_for(before + 200, Duration::from_secs(30));
    let acks = c.acks();
    acks[before.saturating_sub(1)..]
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default()
}

/// With the secondary of a fresh pair SIGSTOPped: per run, the time of
/// `Session::connect` alone and of connect + commit + read, for seeds
/// `[hung, primary]` then `[primary, hung]` (one sample each per run).
fn with_a_hung_secondary(runs: usize) -> [Vec<Duration>; 4] {
    let dir = tempfile::tempdir().unwrap();
    // Commits never wait for it, and it stays a member.
    let flags = ["--sync-replicas", "0", "--replica-timeout-ms", "600000"];
    let (_p, s, a1, a2) = pair(&dir.path().join("p"), &dir.path().join("b"), &flags);
    // SAFETY: signalling our own child by pid.
    unsafe {
        libc::kill(s.0.id() as i32, libc::SIGSTOP);
    }
    let mut out: [Vec<Duration>; 4] = Default::default();
    for _ in 0..runs {
        for (k, seeds) in [[&a2, &a1], [&a1, &a2]].into_iter().enumerate() {
            let t0 = Instant::now();
            let mut session = Session::connect(&seeds).unwrap();
            out[2 * k].push(t0.elapsed());
            session
                .commit(|tx| {
                    let c = tx.create_collection();
                    tx.set_root(c);
                })
                .unwrap();
            session.require_last_seen();
            session.root().unwrap();
            out[2 * k + 1].push(t0.elapsed());
        }
    }
    // SAFETY: as above; the process is killed when `s` drops.
    unsafe {
        libc::kill(s.0.id() as i32, libc::SIGCONT);
    }
    out
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{name}: median {:.1} ms, max {:.1} ms over {} runs ({:?})",
        v[v.len() / 2].as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3,
        v.len(),
        v.iter()
            .map(|d| format!("{:.1}", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let runs = if quick { 3 } else { 5 };
    println!("magma failover benchmark (2-core dev machine; the client shares it)");
    summary(
        "failover (kill -9 of the primary to the first commit acknowledged by the new primary)",
        (0..runs).map(|_| failover_once()).collect(),
    );
    summary(
        "longest commit pause during a take-over",
        (0..runs).map(|_| take_over_pause(&[])).collect(),
    );
    let asynchronous = ["--sync-replicas", "0", "--flush", "interval:1000"];
    summary(
        "the same with `--sync-replicas 0 --flush interval:1000`",
        (0..runs).map(|_| take_over_pause(&asynchronous)).collect(),
    );
    let [hung_first, hung_first_all, hung_second, hung_second_all] = with_a_hung_secondary(runs);
    summary(
        "new session, secondary hung and first seed: connect",
        hung_first,
    );
    summary("  connect + commit + read", hung_first_all);
    summary(
        "new session, secondary hung and second seed: connect",
        hung_second,
    );
    summary("  connect + commit + read", hung_second_all);
}
