//! Backup benchmark: prints the figures quoted in the backup issue.
//!
//! `cargo bench --bench backup` (about 1 GiB of data; `-- quick` for
//! 128 MiB; `MAGMA_BENCH_DIR` chooses where the repository is built,
//! default the system temp directory). It uses the release `magma-server`.
//!
//! 1. Builds a repository of 1 MiB objects with the storage library (the
//!    commit log bounded to 64 MiB, so the directory is mostly data), then
//!    starts `magma-server` on it.
//! 2. Backup throughput: `cp -r DIR COPY && sync` against a server backup
//!    (request to `completed`, every file fsynced), alternating, two rounds
//!    each, page cache warm for both. Throughput is bytes copied per second
//!    (cp copies the whole directory, the backup the snapshot's files).
//! 3. Commit throughput: `magma bench` with 8 clients for 8 s alone, then
//!    for 8 s while backups run back to back (the first starting 250 ms
//!    after the clients; finished copies deleted after the window); three
//!    such pairs: no request
//!    rate (the server's default: full speed, yielding to flowing commits at
//!    `--backup-busy-rate`), then rate-limited through the request to 200
//!    and 100 MB/s.
//!
//! Figures on a virtual disk vary from run to run; each copy figure is the
//! median of five rounds.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use magma::cli::bench::{self, BenchOptions};
use magma::client::AdminSession;
use magma::protocol::BackupState;
use magma::storage::object::encode_value;
use magma::storage::{CommitRequest, NewRequest, RepoOptions, Repository};
use rmpv::Value;

mod common;
use common::{median, port, server};

const MIB: u64 = 1024 * 1024;
/// Timed copies of each kind, alternating.
const ROUNDS: usize = 5;

fn du(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() { du(&e.path()) } else { m.len() };
    }
    total
}

fn sync_all() {
    Command::new("sync").status().unwrap();
}

/// A repository of about `bytes` of 1 MiB objects, 8 per commit.
fn build(dir: &Path, addr: &str, bytes: u64) {
    let opts = RepoOptions {
        max_log_bytes: 64 * MIB,
        ..RepoOptions::default()
    };
    let mut repo = Repository::create_with(dir, 0, addr, opts).unwrap();
    let mut text = "0123456789abcdef".repeat((MIB / 16) as usize);
    let commits = bytes / (8 * MIB);
    for c in 0..commits {
        let news = (0..8)
            .map(|i| {
                let tag = format!("{c:08}-{i}");
                text.replace_range(0..tag.len(), &tag);
                NewRequest {
                    temp_id: i,
                    class: "Blob".into(),
                    value: encode_value(&Value::from(text.as_str())),
                }
            })
            .collect();
        repo.commit(CommitRequest {
            news,
            ..Default::default()
        })
        .unwrap();
        repo.maybe_checkpoint().unwrap();
    }
    repo.checkpoint().unwrap();
}

/// One server backup into `to`, from request to `completed`: (seconds,
/// bytes copied, the job's own elapsed ms).
fn backup(addr: &str, to: &Path, rate: Option<u64>) -> (f64, u64, u64) {
    let mut admin = AdminSession::connect(addr).unwrap();
    let start = Instant::now();
    admin.backup_with_rate(to.to_str().unwrap(), rate).unwrap();
    loop {
        let r = admin.backup_status().unwrap();
        match r.state {
            BackupState::Completed => {
                return (start.elapsed().as_secs_f64(), r.bytes_done, r.elapsed_ms)
            }
            BackupState::Running | BackupState::Paused => {}
            other => panic!("backup ended {other:?}: {r:?}"),
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn cp(from: &Path, to: &Path) -> f64 {
    let start = Instant::now();
    let ok = Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(ok.success());
    sync_all();
    start.elapsed().as_secs_f64()
}

fn bench_commits(addr: &str, secs: u64) -> f64 {
    let opts = BenchOptions::new(vec![addr.to_string()], 8, Duration::from_secs(secs));
    bench::run(&opts).unwrap().commits_per_sec()
}

/// Commits/s of 8 clients while backups run back to back; also the share
/// of the window a backup was running.
fn bench_during_backups(
    addr: &str,
    work: &Path,
    secs: u64,
    rate: Option<u64>,
) -> (f64, usize, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let (a, w, s) = (addr.to_string(), work.to_path_buf(), stop.clone());
    let backups = thread::spawn(move || {
        // Backups are taken of a server under load: the clients start
        // first (a backup started on an idle server copies at full speed
        // until the first commit, which measures something else).
        thread::sleep(Duration::from_millis(250));
        let mut n = 0;
        let mut busy = 0.0;
        let mut done = Vec::new();
        while !s.load(Ordering::Relaxed) {
            let to = w.join(format!("during-{n}"));
            busy += backup(&a, &to, rate).0;
            n += 1;
            done.push(to);
        }
        (n, busy, done)
    });
    let start = Instant::now();
    let cps = bench_commits(addr, secs);
    let window = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (n, busy, done) = backups.join().unwrap();
    // Deleted after the window: removing a 1 GiB tree is I/O of its own.
    for d in done {
        fs::remove_dir_all(&d).unwrap();
    }
    (cps, n, (busy / window).min(1.0))
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let bytes = if quick { 128 * MIB } else { 1024 * MIB };
    let base: PathBuf = std::env::var_os("MAGMA_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("magma-backup-bench-")
        .tempdir_in(base)
        .unwrap();
    let live = tmp.path().join("live");
    let addr = port();

    let t = Instant::now();
    build(&live, &addr, bytes);
    println!(
        "repository: {:.0} MiB in {} (built in {:.1} s)",
        du(&live) as f64 / MIB as f64,
        live.display(),
        t.elapsed().as_secs_f64()
    );
    let _server = server(&live, &addr, &[]);
    println!("load average at the start: {}", load());
    sync_all();

    let live_bytes = du(&live);
    let mut cp_rates = Vec::new();
    let mut backup_rates = Vec::new();
    let mut ratios = Vec::new();
    let settle = || {
        sync_all();
        thread::sleep(Duration::from_secs(1));
    };
    for round in 0..ROUNDS {
        let copy = tmp.path().join(format!("cp-{round}"));
        settle();
        let secs = cp(&live, &copy);
        let rate = live_bytes as f64 / secs;
        println!(
            "cp -r + sync: {:.0} MiB in {secs:.2} s = {:.0} MiB/s",
            live_bytes as f64 / MIB as f64,
            rate / MIB as f64
        );
        cp_rates.push(rate);
        fs::remove_dir_all(&copy).unwrap();

        let to = tmp.path().join(format!("backup-{round}"));
        settle();
        let (secs, copied, job_ms) = backup(&addr, &to, None);
        let rate = copied as f64 / secs;
        println!(
            "magma backup: {:.0} MiB in {secs:.2} s (job {job_ms} ms) = {:.0} MiB/s",
            copied as f64 / MIB as f64,
            rate / MIB as f64
        );
        ratios.push(rate / cp_rates[round]);
        backup_rates.push(rate);
        fs::remove_dir_all(&to).unwrap();
    }
    println!(
        "backup/cp throughput: medians {:.0} / {:.0} MiB/s = {:.2}; median of the per-round ratios {:.2}",
        median(&backup_rates) / MIB as f64,
        median(&cp_rates) / MIB as f64,
        median(&backup_rates) / median(&cp_rates),
        median(&ratios)
    );
    settle();

    let secs = if quick { 3 } else { 8 };
    for rate in [None, Some(200_000_000u64), Some(100_000_000)] {
        settle();
        let alone = bench_commits(&addr, secs);
        println!("bench K=8 alone: {alone:.0} commits/s");
        settle();
        let (during, n, share) = bench_during_backups(&addr, tmp.path(), secs, rate);
        println!(
            "bench K=8 during backups ({}, {n} backups, running {:.0}% of the window): {during:.0} commits/s = {:.2}x",
            rate.map_or("no request rate, yielding".to_string(), |r| format!("rate {} MB/s", r / 1_000_000)),
            share * 100.0,
            during / alone
        );
    }
    println!("load average at the end: {}", load());
}

/// `/proc/loadavg`: the figures mean little on a busy machine.
fn load() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
