//! One-server benchmark (issue 3's table): `magma bench` with K = 1, 2 and 8
//! clients against a fresh `magma-server` with `--flush group`, then with
//! `--flush interval:1000`.
//!
//! `cargo bench --bench server` runs each row 5 times for 4 s, each run on a
//! fresh repository in a temporary directory (`TMPDIR` chooses the file
//! system), and prints per row the median commits/s with its range, the
//! p50/p99 latency of the median run, and the server's CPU per commit
//! (from `/proc/PID/stat`; the clients share the machine and are not
//! counted). Add `-- quick` for 3 runs of 2 s, and `group` or `interval`
//! to run only those rows; `MAGMA_BENCH_BIN_DIR` runs another build's
//! binaries, `MAGMA_BENCH_SERVER_FLAGS` adds flags to every server (e.g.
//! `--busy-poll-us 0`). The figures depend on the machine: say which when quoting
//! them.

mod common;
use common::{bench_json, cpu_seconds, median, port, server};

/// One `magma bench` run against a fresh server.
struct Run {
    commits_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Server CPU (user + system) per commit, in microseconds.
    server_cpu_us: f64,
}

fn run_once(flush: &str, clients: u32, secs: u32) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let addr = port();
    let p = server(&dir.path().join("repo"), &addr, &["--flush", flush]);
    let before = cpu_seconds(p.0.id());
    let out = bench_json(&addr, clients, secs);
    let used = cpu_seconds(p.0.id()) - before;
    Run {
        commits_per_sec: out.commits_per_sec,
        p50_ms: out.p50_ms,
        p99_ms: out.p99_ms,
        server_cpu_us: used / out.commits * 1e6,
    }
}

fn row(flush: &str, clients: u32, runs: usize, secs: u32) {
    let mut all: Vec<Run> = (0..runs).map(|_| run_once(flush, clients, secs)).collect();
    all.sort_by(|a, b| a.commits_per_sec.total_cmp(&b.commits_per_sec));
    let rates: Vec<f64> = all.iter().map(|r| r.commits_per_sec).collect();
    let cpu: Vec<f64> = all.iter().map(|r| r.server_cpu_us).collect();
    // The run whose rate is the median's (the lower middle one when even).
    let mid = &all[(runs - 1) / 2];
    println!(
        "--flush {flush:<13} K={clients}  {:>8.0} commits/s median ({:.0}-{:.0})  \
         p50 {:.3} ms  p99 {:.3} ms  server CPU {:.1} us/commit",
        median(&rates),
        rates[0],
        rates[runs - 1],
        mid.p50_ms,
        mid.p99_ms,
        median(&cpu),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "quick");
    let only: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| ["group", "interval"].contains(a))
        .collect();
    let (runs, secs) = if quick { (3, 2) } else { (5, 4) };
    println!(
        "magma one-server benchmark: {runs} runs of {secs} s per row, a fresh repository each \
         ({} cores; the clients share them)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (name, flush) in [("group", "group"), ("interval", "interval:1000")] {
        if only.is_empty() || only.contains(&name) {
            for clients in [1, 2, 8] {
                row(flush, clients, runs, secs);
            }
        }
    }
}
