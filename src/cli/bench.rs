//! `magma bench`: K flooding clients in one process, each appending to its
//! own collection `PREFIX-<i>` with one commit in flight, timed together;
//! reports commits per second and per-commit latency. Two engines drive the
//! clients: one event loop with K connections (the default, in
//! `bench_loop`, the way `redis-benchmark` and `pgbench` load a server) or
//! K threads with a client-library `Session` each (`--threads`, which also
//! measures the library and its routing).
//!
//! This module owns the measurement: set-up (connect, create collections)
//! is done before the clock starts, every client starts at the same
//! instant, and each commit's latency is measured around the blocking
//! `append` call with `Instant`. Percentiles are nearest-rank over the
//! sorted samples (exact; a run of 10^6 commits costs 16 MB, so no
//! histogram is needed). It must never report numbers from a run in which
//! a client failed: the first error ends the run and is returned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cli::domain;
use crate::cli::error::CliError;
use crate::cli::flood::element;
use crate::client::{Session, SessionOptions};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub node: Vec<String>,
    pub engine: BenchEngine,
    pub clients: u32,
    pub duration: Duration,
    /// Client i (from 1) appends to `PREFIX-<i>`.
    pub prefix: String,
    pub session: SessionOptions,
}

impl BenchOptions {
    pub fn new(node: Vec<String>, clients: u32, duration: Duration) -> BenchOptions {
        BenchOptions {
            node,
            engine: BenchEngine::EventLoop,
            clients,
            duration,
            prefix: "bench".to_string(),
            session: SessionOptions::default(),
        }
    }
}

/// How the K clients are driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchEngine {
    /// One thread, K connections to the primary, one commit in flight on
    /// each.
    EventLoop,
    /// K threads, each with its own client-library `Session`.
    Threads,
}

/// Latency figures of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

impl Latency {
    /// Figures of `samples`, which this sorts. All zero when empty.
    pub fn of(samples: &mut [Duration]) -> Latency {
        samples.sort_unstable();
        let total: Duration = samples.iter().sum();
        Latency {
            p50: percentile(samples, 50.0).unwrap_or_default(),
            p99: percentile(samples, 99.0).unwrap_or_default(),
            max: samples.last().copied().unwrap_or_default(),
            mean: match u32::try_from(samples.len()) {
                Ok(0) => Duration::ZERO,
                Ok(n) => total / n,
                Err(_) => Duration::from_secs_f64(total.as_secs_f64() / samples.len() as f64),
            },
        }
    }
}

/// Nearest-rank percentile of sorted samples: the smallest sample with at
/// least `p` percent of the samples at or below it (`p` in 0..=100).
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Result of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchReport {
    pub clients: u32,
    /// Commits acknowledged by all clients together.
    pub commits: u64,
    /// From the common start to the last client's last commit.
    pub elapsed: Duration,
    pub latency: Latency,
}

impl BenchReport {
    pub fn commits_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.commits as f64 / secs
        } else {
            0.0
        }
    }

    /// The `--json` document. Latencies are milliseconds with microsecond
    /// precision.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "clients": self.clients,
            "duration_s": round3(self.elapsed.as_secs_f64()),
            "commits": self.commits,
            "commits_per_sec": round3(self.commits_per_sec()),
            "latency_ms": {
                "p50": ms(self.latency.p50),
                "p99": ms(self.latency.p99),
                "max": ms(self.latency.max),
                "mean": ms(self.latency.mean),
            },
        })
    }

    /// The human report.
    pub fn to_text(&self) -> String {
        format!(
            "clients {}  commits {}  in {:.3} s  {:.1} commits/s\n\
             latency ms  p50 {:.3}  p99 {:.3}  max {:.3}  mean {:.3}",
            self.clients,
            self.commits,
            self.elapsed.as_secs_f64(),
            self.commits_per_sec(),
            ms(self.latency.p50),
            ms(self.latency.p99),
            ms(self.latency.max),
            ms(self.latency.mean),
        )
    }
}

/// Milliseconds, with microsecond precision.
fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Run the benchmark; see the module doc.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, CliError> {
    if opts.clients == 0 {
        return Err(CliError::Usage("bench needs at least one client".into()));
    }
    match opts.engine {
        BenchEngine::EventLoop => crate::cli::bench_loop::run(opts),
        BenchEngine::Threads => run_threads(opts),
    }
}

/// The `--threads` engine: one thread and one `Session` per client.
fn run_threads(opts: &BenchOptions) -> Result<BenchReport, CliError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), CliError>>();
    let mut gos = Vec::new();
    let mut handles = Vec::new();
    for i in 1..=opts.clients {
        let (go_tx, go_rx) = mpsc::channel::<Instant>();
        gos.push(go_tx);
        let opts = opts.clone();
        let stop = Arc::clone(&stop);
        let ready = ready_tx.clone();
        let handle = thread::Builder::new()
            .name(format!("bench-{i}"))
            .spawn(move || client(&opts, i, &ready, &go_rx, &stop))
            .map_err(|e| CliError::Internal(format!("cannot start client thread {i}: {e}")))?;
        handles.push(handle);
    }
    drop(ready_tx);

    let mut setup_error = None;
    for _ in 0..opts.clients {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                setup_error = Some(e);
                break;
            }
            // Every client ended; their results say why.
            Err(_) => break,
        }
    }
    let start = Instant::now();
    if setup_error.is_none() {
        let deadline = start + opts.duration;
        for go in &gos {
            let _ = go.send(deadline);
        }
    } else {
        stop.store(true, Ordering::Relaxed);
    }
    // Dropping the senders releases clients that never got a start.
    drop(gos);

    let mut samples = Vec::new();
    let mut first_error = setup_error;
    let mut end = start;
    for h in handles {
        match h.join() {
            Ok(Ok((mut lat, last))) => {
                samples.append(&mut lat);
                end = end.max(last);
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(CliError::Internal("a client thread panicked".into()));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let commits = samples.len() as u64;
    Ok(BenchReport {
        clients: opts.clients,
        commits,
        elapsed: end.saturating_duration_since(start),
        latency: Latency::of(&mut samples),
    })
}

type ClientResult = Result<(Vec<Duration>, Instant), CliError>;

/// One client: set up, report ready, wait for the start, append until the
/// deadline. Returns its latencies and when its last commit ended.
fn client(
    opts: &BenchOptions,
    i: u32,
    ready: &mpsc::Sender<Result<(), CliError>>,
    go: &mpsc::Receiver<Instant>,
    stop: &AtomicBool,
) -> ClientResult {
    let name = format!("{}-{i}", opts.prefix);
    let setup = Session::connect_with(&opts.node, opts.session.clone())
        .map_err(CliError::from)
        .and_then(|mut s| domain::ensure_collection(&mut s, &name).map(|c| (s, c)));
    let (mut session, coll) = match setup {
        Ok(ok) => {
            let _ = ready.send(Ok(()));
            ok
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            // The error went to the coordinator; nothing to add.
            return Ok((Vec::new(), Instant::now()));
        }
    };
    let Ok(deadline) = go.recv() else {
        return Ok((Vec::new(), Instant::now()));
    };
    let mut latencies = Vec::new();
    let mut last = Instant::now();
    let mut seq = 0u64;
    while last < deadline && !stop.load(Ordering::Relaxed) {
        seq += 1;
        let value = element(&name, seq);
        let t = Instant::now();
        if let Err(e) = session.append(coll, value.as_str()) {
            stop.store(true, Ordering::Relaxed);
            return Err(e.into());
        }
        last = Instant::now();
        latencies.push(last - t);
    }
    Ok((latencies, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn nearest_rank_percentiles() {
        let sorted: Vec<Duration> = (1..=100).map(d).collect();
        assert_eq!(percentile(&sorted, 50.0), Some(d(50)));
        assert_eq!(percentile(&sorted, 99.0), Some(d(99)));
        assert_eq!(percentile(&sorted, 100.0), Some(d(100)));
        assert_eq!(percentile(&sorted, 0.0), Some(d(1)));
        assert_eq!(percentile(&[d(7)], 99.0), Some(d(7)));
        assert_eq!(percentile(&[], 50.0), None);
        let ten: Vec<Duration> = (1..=10).map(d).collect();
        assert_eq!(percentile(&ten, 50.0), Some(d(5)));
        assert_eq!(percentile(&ten, 99.0), Some(d(10)));
    }

    #[test]
    fn latency_figures_sort_their_samples() {
        let mut samples = vec![d(4), d(1), d(3), d(2)];
        let l = Latency::of(&mut samples);
        assert_eq!((l.p50, l.p99, l.max), (d(2), d(4), d(4)));
        assert_eq!(l.mean, Duration::from_micros(2500));
        assert_eq!(Latency::of(&mut []), Latency::default());
    }

    #[test]
    fn report_json_shape_and_units() {
        let r = BenchReport {
            clients: 2,
            commits: 300,
            elapsed: d(1500),
            latency: Latency {
                p50: Duration::from_micros(1234),
                p99: Duration::from_micros(5678),
                max: Duration::from_micros(9001),
                mean: Duration::from_micros(1500),
            },
        };
        let j = r.to_json();
        assert_eq!(j["clients"], 2);
        assert_eq!(j["commits"], 300);
        assert_eq!(j["commits_per_sec"], 200.0);
        assert_eq!(j["duration_s"], 1.5);
        assert_eq!(j["latency_ms"]["p50"], 1.234);
        assert_eq!(j["latency_ms"]["p99"], 5.678);
        assert_eq!(j["latency_ms"]["max"], 9.001);
        assert!(r.to_text().contains("p99 5.678"), "{}", r.to_text());
    }

    #[test]
    fn unreachable_node_is_an_error_not_a_zero_report() {
        let mut opts = BenchOptions::new(vec!["127.0.0.1:1".into()], 3, d(100));
        for engine in [BenchEngine::EventLoop, BenchEngine::Threads] {
            opts.engine = engine;
            let e = run(&opts).unwrap_err();
            assert_eq!(e.kind(), "no_server_reachable", "{engine:?}");
        }
    }
}
