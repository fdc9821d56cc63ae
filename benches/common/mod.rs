//! Helpers shared by the process-level benchmarks: real `magma-server`
//! processes on loopback, killed when dropped.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use magma::client::AdminSession;

pub const SERVER: &str = env!("CARGO_BIN_EXE_magma-server");
pub const CLI: &str = env!("CARGO_BIN_EXE_magma");

/// The binary `name` (`SERVER` or `CLI`), or the one of that file name in
/// `MAGMA_BENCH_BIN_DIR` when set: the same benchmark against another build
/// (e.g. the previous commit's `target/release`, copied aside).
fn binary(name: &str) -> std::path::PathBuf {
    match std::env::var_os("MAGMA_BENCH_BIN_DIR") {
        Some(dir) => Path::new(&dir).join(Path::new(name).file_name().unwrap()),
        None => name.into(),
    }
}

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// Flags every benchmark server gets besides its own (from
/// `MAGMA_BENCH_SERVER_FLAGS`, split at whitespace), e.g.
/// `--busy-poll-us 0` to measure the servers without busy polling.
fn extra_server_flags() -> Vec<String> {
    std::env::var("MAGMA_BENCH_SERVER_FLAGS")
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

pub fn server(dir: &Path, addr: &str, args: &[&str]) -> Proc {
    let child = Command::new(binary(SERVER))
        .arg("--dir")
        .arg(dir)
        .args(["--listen", addr])
        .args(args)
        .args(extra_server_flags())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while AdminSession::connect(addr)
        .and_then(|mut a| a.ping())
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{addr} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Proc(child)
}

pub fn magma(args: &[&str]) -> String {
    let out = Command::new(binary(CLI)).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "magma {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What one `magma bench --json` run reported.
pub struct BenchOut {
    pub commits: f64,
    pub commits_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// `magma bench --json` with `clients` clients against `addr` for `secs`.
pub fn bench_json(addr: &str, clients: u32, secs: u32) -> BenchOut {
    let out = magma(&[
        "bench",
        "--node",
        addr,
        "--clients",
        &clients.to_string(),
        "--duration",
        &secs.to_string(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("magma bench --json printed {out:?}: {e}"));
    let number = |x: &serde_json::Value| {
        x.as_f64()
            .unwrap_or_else(|| panic!("magma bench --json: not a number in {out}"))
    };
    let commits = number(&v["commits"]);
    assert!(commits > 0.0, "no commit was made: {out}");
    BenchOut {
        commits,
        commits_per_sec: number(&v["commits_per_sec"]),
        p50_ms: number(&v["latency_ms"]["p50"]),
        p99_ms: number(&v["latency_ms"]["p99"]),
        max_ms: number(&v["latency_ms"]["max"]),
    }
}

/// The median of `values` (the mean of the middle two when even).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

pub fn members(addr: &str) -> usize {
    AdminSession::connect(addr)
        .and_then(|mut a| a.status())
        .map(|s| s.members.len())
        .unwrap_or(0)
}

pub fn wait_members(addr: &str, n: usize, timeout: Duration) -> Duration {
    let start = Instant::now();
    while members(addr) != n {
        assert!(start.elapsed() < timeout, "{addr} never listed {n} members");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

/// A primary in `primary_dir` and a secondary joined from its backup in
/// `backup_dir`, both started with `flags` (a secondary may become the
/// primary); a few commits first, so the backup holds some. Returns both
/// servers and their addresses.
pub fn pair(primary_dir: &Path, backup_dir: &Path, flags: &[&str]) -> (Proc, Proc, String, String) {
    let (a1, a2) = (port(), port());
    let p = server(primary_dir, &a1, flags);
    magma(&["flood", "--node", &a1, "--name", "seed", "--count", "10"]);
    magma(&[
        "backup",
        "--server",
        &a1,
        "--to",
        backup_dir.to_str().unwrap(),
    ]);
    let s = server(backup_dir, &a2, flags);
    wait_members(&a1, 2, Duration::from_secs(60));
    (p, s, a1, a2)
}

/// CPU time (user + system, seconds) a process has used so far, from
/// `/proc/PID/stat`: shows how much of the shared machine each server took.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) may hold spaces: count from after its ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / per_sec
}

pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
