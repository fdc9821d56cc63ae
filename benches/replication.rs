//! Replication benchmark: real `magma-server` processes on loopback.
//!
//! `cargo bench --bench replication` (add `-- quick` for a short run, and
//! `sync`, `async` or `catch-up` to run only those parts; set
//! `MAGMA_BENCH_BIN_DIR` to run the servers and CLI of another build,
//! `MAGMA_BENCH_SERVER_FLAGS` to add flags to every server, e.g.
//! `--busy-poll-us 0`):
//! 1. `magma bench` K=8 against a primary with one secondary, both servers
//!    started with the same flags: `--sync-replicas 1 --flush group`, then
//!    `--sync-replicas 0 --flush interval:1000`; the secondary's lag (status
//!    `lag_ms`) is sampled
//!    every 2 ms during the run and its p50/p99 printed, with the CPU
//!    seconds each server used; then the same flags on a primary alone,
//!    for comparison (on one machine the secondary takes CPU the primary
//!    and the clients would otherwise have); then the asynchronous pair
//!    again with `--async-batch-delay-us 2000` (fewer, larger batches);
//! 2. catch-up: a secondary started on a backup N commits behind; records
//!    per second until the primary lists it as a member.
//!
//! The figures depend on the machine (say which when quoting them); the
//! bench clients share it with the servers. The servers' directories are
//! temporary directories: `TMPDIR` chooses the file system (e.g. tmpfs, to
//! see what the disk's fsyncs cost); `MAGMA_BENCH_SECONDARY_DIR` puts the
//! secondary's directory on another one than the primary's (to see whose
//! fsyncs a figure waits for).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use magma::client::AdminSession;

mod common;
use common::{cpu_seconds, magma, pair, percentile, port, server, wait_members};

/// `magma bench` K=8 against `addr` for `secs`: its output lines.
fn bench(addr: &str, secs: u32) -> String {
    magma(&[
        "bench",
        "--node",
        addr,
        "--clients",
        "8",
        "--duration",
        &secs.to_string(),
    ])
}

/// The same primary flags without a secondary: what the pair is compared
/// with (on one machine the secondary competes with the primary for CPU).
fn alone_run(flags: &[&str], secs: u32) {
    let dir = tempfile::tempdir().unwrap();
    let a1 = port();
    let p = server(&dir.path().join("p"), &a1, flags);
    let before = cpu_seconds(p.0.id());
    let out = bench(&a1, secs);
    let used = cpu_seconds(p.0.id()) - before;
    println!("{flags:?}, no secondary, K=8:");
    for line in out.lines() {
        println!("  {line}");
    }
    println!("  CPU used during the run: primary {used:.1} s");
}

/// A temporary directory under `MAGMA_BENCH_SECONDARY_DIR`, when set: where
/// the pair's secondary keeps its repository.
fn secondary_dir() -> Option<tempfile::TempDir> {
    let base = std::env::var_os("MAGMA_BENCH_SECONDARY_DIR")?;
    Some(tempfile::tempdir_in(&base).unwrap_or_else(|e| {
        panic!("MAGMA_BENCH_SECONDARY_DIR {base:?}: cannot make a directory there: {e}")
    }))
}

/// Primary + one secondary joined from a backup; K=8 bench; lag sampled.
fn pair_run(flags: &[&str], secs: u32) {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = secondary_dir();
    let b = elsewhere
        .as_ref()
        .map_or(dir.path(), |d| d.path())
        .join("b");
    let (p, s, a1, a2) = pair(&dir.path().join("p"), &b, flags);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let (a1, a2) = (a1.clone(), a2.clone());
        std::thread::spawn(move || {
            let mut admin = AdminSession::connect(&a1).unwrap();
            let mut lags = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = admin.status() {
                    if let Some(m) = s.members.iter().find(|m| m.addr == a2) {
                        lags.push(m.lag_ms);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            lags
        })
    };
    let cpu = |p: &common::Proc| cpu_seconds(p.0.id());
    let (p0, s0) = (cpu(&p), cpu(&s));
    let out = bench(&a1, secs);
    let (p1, s1) = (cpu(&p), cpu(&s));
    stop.store(true, Ordering::Relaxed);
    let mut lags = sampler.join().unwrap();
    lags.sort_unstable();
    println!("{flags:?}, one secondary, K=8:");
    if let Some(d) = &elsewhere {
        println!("  secondary's directory under {}", d.path().display());
    }
    for line in out.lines() {
        println!("  {line}");
    }
    println!(
        "  secondary lag ms over {} samples: p50 {} p99 {} max {}",
        lags.len(),
        percentile(&lags, 50.0),
        percentile(&lags, 99.0),
        lags.last().copied().unwrap_or(0)
    );
    println!(
        "  CPU used during the run: primary {:.1} s, secondary {:.1} s (the machine has {} cores x {secs} s)",
        p1 - p0,
        s1 - s0,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

/// A secondary `behind` commits behind: time to catch up and join.
fn catch_up(behind: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (a1, a2) = (port(), port());
    let _p = server(
        &dir.path().join("p"),
        &a1,
        &["--flush", "interval:1000", "--sync-replicas", "0"],
    );
    magma(&["flood", "--node", &a1, "--name", "seed", "--count", "10"]);
    let b = dir.path().join("b");
    magma(&["backup", "--server", &a1, "--to", b.to_str().unwrap()]);
    let start_commit = AdminSession::connect(&a1).unwrap().status().unwrap().commit;
    // Fill the gap with a K=8 load until `behind` commits are in.
    while AdminSession::connect(&a1).unwrap().status().unwrap().commit < start_commit + behind {
        magma(&["bench", "--node", &a1, "--clients", "8", "--duration", "5"]);
    }
    let last = AdminSession::connect(&a1).unwrap().status().unwrap().commit;
    let t = Instant::now();
    let _s = server(&b, &a2, &[]);
    wait_members(&a1, 2, Duration::from_secs(600));
    let secs = t.elapsed().as_secs_f64();
    let n = last - start_commit;
    println!(
        "catch-up: {n} commits behind, joined after {secs:.2} s: {:.0} records/s (including start-up)",
        n as f64 / secs
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "quick");
    let parts = ["sync", "async", "catch-up"];
    let named: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| parts.contains(a))
        .collect();
    let run = |part: &str| named.is_empty() || named.contains(&part);
    let secs = if quick { 3 } else { 10 };
    println!("magma replication benchmark (2-core dev machine; clients share it)");
    let sync = ["--sync-replicas", "1", "--flush", "group"];
    let asynchronous = ["--sync-replicas", "0", "--flush", "interval:1000"];
    for (part, flags) in [("sync", sync), ("async", asynchronous)] {
        if run(part) {
            pair_run(&flags, secs);
            alone_run(&flags, secs);
        }
    }
    if run("async") {
        // Fewer, larger batches: less CPU and fewer fsyncs for more lag.
        pair_run(
            &[
                "--sync-replicas",
                "0",
                "--flush",
                "interval:1000",
                "--async-batch-delay-us",
                "2000",
            ],
            secs,
        );
    }
    if run("catch-up") {
        catch_up(if quick { 50_000 } else { 1_000_000 });
    }
}
