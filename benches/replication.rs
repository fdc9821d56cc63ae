//! Replication benchmark: real `magma-server` processes on loopback.
//!
//! `cargo bench --bench replication` (add `-- quick` for a short run, and
//! `sync`, `async` or `catch-up` to run only those parts; set
//! `MAGMA_BENCH_BIN_DIR` to run the servers and CLI of another build,
//! `MAGMA_BENCH_SERVER_FLAGS` to add flags to every server, e.g.
//! `--busy-poll-us 0`):
//! 1. `magma bench` K=8 against a primary with one secondary, both servers
//!    started with the same flags: `--sync-replicas 1 --flush group`, then
//!    `--sync-replicas 0 --flush interval:1000`; 3 runs of 10 s each (3 s
//!    with `quick`), each on fresh repositories, alternating with runs of
//!    the same flags on a primary alone, for comparison (on one machine
//!    the secondary takes CPU the primary and the clients would otherwise
//!    have). Printed: the median commits/s with its range, the latency of
//!    the median run, the CPU seconds each server used (medians), and the
//!    secondary's lag (status `lag_ms`, sampled every 2 ms) at p50/p99
//!    over the samples of all runs; then the asynchronous pair again with
//!    `--async-batch-delay-us 2000` (fewer, larger batches);
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
use common::{
    bench_json, cpu_seconds, magma, median, pair, percentile, port, server, wait_members, BenchOut,
};

/// One run: what the K=8 bench reported, and the CPU seconds each server
/// used meanwhile (the secondary's 0 when there is none).
struct Run {
    out: BenchOut,
    primary_cpu: f64,
    secondary_cpu: f64,
}

/// The same primary flags without a secondary: what the pair is compared
/// with (on one machine the secondary competes with the primary for CPU).
fn alone_once(flags: &[&str], secs: u32) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let a1 = port();
    let p = server(&dir.path().join("p"), &a1, flags);
    let before = cpu_seconds(p.0.id());
    let out = bench_json(&a1, 8, secs);
    Run {
        out,
        primary_cpu: cpu_seconds(p.0.id()) - before,
        secondary_cpu: 0.0,
    }
}

/// A temporary directory under `MAGMA_BENCH_SECONDARY_DIR`, when set: where
/// the pair's secondary keeps its repository.
fn secondary_dir() -> Option<tempfile::TempDir> {
    let base = std::env::var_os("MAGMA_BENCH_SECONDARY_DIR")?;
    Some(tempfile::tempdir_in(&base).unwrap_or_else(|e| {
        panic!("MAGMA_BENCH_SECONDARY_DIR {base:?}: cannot make a directory there: {e}")
    }))
}

/// Primary + one secondary joined from a backup; K=8 bench; the
/// secondary's lag (status `lag_ms`) sampled every 2 ms, added to `lags`.
fn pair_once(flags: &[&str], secs: u32, lags: &mut Vec<u64>) -> Run {
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
    let out = bench_json(&a1, 8, secs);
    let (p1, s1) = (cpu(&p), cpu(&s));
    stop.store(true, Ordering::Relaxed);
    lags.extend(sampler.join().unwrap());
    Run {
        out,
        primary_cpu: p1 - p0,
        secondary_cpu: s1 - s0,
    }
}

/// Medians over `runs`: commits/s with its range, the latency of the
/// median run, the CPU each server used.
fn summary(runs: &[Run]) -> String {
    let mut by_rate: Vec<&Run> = runs.iter().collect();
    by_rate.sort_by(|a, b| a.out.commits_per_sec.total_cmp(&b.out.commits_per_sec));
    let rates: Vec<f64> = by_rate.iter().map(|r| r.out.commits_per_sec).collect();
    let mid = by_rate[(runs.len() - 1) / 2];
    let cpu = |f: fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let mut line = format!(
        "{:.0} commits/s median ({:.0}-{:.0}); latency ms of the median run p50 {:.3} \
         p99 {:.3} max {:.1}; CPU s per run: primary {:.1}",
        median(&rates),
        rates[0],
        rates[rates.len() - 1],
        mid.out.p50_ms,
        mid.out.p99_ms,
        mid.out.max_ms,
        cpu(|r| r.primary_cpu),
    );
    if runs.iter().any(|r| r.secondary_cpu > 0.0) {
        line += &format!(", secondary {:.1}", cpu(|r| r.secondary_cpu));
    }
    line
}

/// `runs` runs of the pair and, when `alone`, alternating with them, runs
/// of the primary alone (so that a change in the host's speed meets both
/// alike). The lag percentiles pool the samples of every run.
fn pair_rows(flags: &[&str], runs: usize, secs: u32, alone: bool) {
    let (mut pairs, mut alones, mut lags) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        pairs.push(pair_once(flags, secs, &mut lags));
        if alone {
            alones.push(alone_once(flags, secs));
        }
    }
    lags.sort_unstable();
    println!(
        "{flags:?}, K=8, {runs} runs of {secs} s ({} cores x {secs} s per run):",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if let Some(base) = std::env::var_os("MAGMA_BENCH_SECONDARY_DIR") {
        println!(
            "  the secondaries' directories under {}",
            base.to_string_lossy()
        );
    }
    println!("  one secondary: {}", summary(&pairs));
    println!(
        "    secondary lag ms over {} samples of all runs: p50 {} p99 {} max {}",
        lags.len(),
        percentile(&lags, 50.0),
        percentile(&lags, 99.0),
        lags.last().copied().unwrap_or(0)
    );
    if alone {
        println!("  primary alone: {}", summary(&alones));
    }
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
    let (runs, secs) = if quick { (3, 3) } else { (3, 10) };
    println!("magma replication benchmark (2-core dev machine; clients share it)");
    let sync = ["--sync-replicas", "1", "--flush", "group"];
    let asynchronous = ["--sync-replicas", "0", "--flush", "interval:1000"];
    if run("sync") {
        pair_rows(&sync, runs, secs, true);
    }
    if run("async") {
        pair_rows(&asynchronous, runs, secs, true);
        // Fewer, larger batches: less CPU and fewer fsyncs for more lag.
        pair_rows(
            &[
                "--sync-replicas",
                "0",
                "--flush",
                "interval:1000",
                "--async-batch-delay-us",
                "2000",
            ],
            runs,
            secs,
            false,
        );
    }
    if run("catch-up") {
        catch_up(if quick { 50_000 } else { 1_000_000 });
    }
}
