//! `magma flood`: one application session appending `NAME-<seq>` to the
//! large collection NAME, one commit per append, recording every
//! acknowledged seq in an ack log as soon as it is acknowledged. This is the
//! flooding client of the HA acceptance suite, and its ack log is the
//! suite's oracle of what must survive.
//!
//! This module owns the flood loop and the ack log. It must never retry an
//! append whose outcome is unknown (the session already re-routes what is
//! safe to re-route), never log a seq that was not acknowledged, and never
//! keep going after an error the application sees: it stops at the first
//! one and says which seq, if any, is in doubt.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cli::domain;
use crate::cli::error::CliError;
use crate::client::{Ref, Session, SessionOptions};
use crate::types::CommitNumber;

/// The element appended for `seq`: `NAME-` and seq zero-padded to 9 digits.
pub fn element(name: &str, seq: u64) -> String {
    format!("{name}-{seq:09}")
}

/// The seq of an element written by [`element`] for `name`, if it is one.
pub fn parse_element(name: &str, element: &str) -> Option<u64> {
    let digits = element.strip_prefix(name)?.strip_prefix('-')?;
    if digits.len() < 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// When a flood stops by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloodLimit {
    /// After this long (measured from the first append).
    Duration(Duration),
    /// After this many acknowledged appends.
    Count(u64),
    /// Only on error, or when the caller's stop flag is set.
    Unlimited,
}

#[derive(Clone, Debug)]
pub struct FloodOptions {
    /// Any servers of the node.
    pub node: Vec<String>,
    pub name: String,
    pub limit: FloodLimit,
    /// File receiving each acknowledged seq (decimal, one per line).
    pub ack_log: Option<PathBuf>,
    pub session: SessionOptions,
}

impl FloodOptions {
    pub fn new(node: Vec<String>, name: &str, limit: FloodLimit) -> FloodOptions {
        FloodOptions {
            node,
            name: name.to_string(),
            limit,
            ack_log: None,
            session: SessionOptions::default(),
        }
    }
}

/// What a flood did, complete or stopped by an error.
#[derive(Clone, Debug, PartialEq)]
pub struct FloodSummary {
    pub name: String,
    /// The collection appended to (`None` if set-up failed).
    pub collection: Option<Ref>,
    /// Appends acknowledged: seqs 1..=acknowledged.
    pub acknowledged: u64,
    /// The seq whose commit was sent but never answered: it may or may not
    /// be in the collection.
    pub in_doubt: Option<u64>,
    /// Number of the last acknowledged commit (0: none).
    pub last_commit: CommitNumber,
    /// Time spent appending (set-up excluded).
    pub elapsed: Duration,
}

impl FloodSummary {
    fn new(name: &str) -> FloodSummary {
        FloodSummary {
            name: name.to_string(),
            collection: None,
            acknowledged: 0,
            in_doubt: None,
            last_commit: 0,
            elapsed: Duration::ZERO,
        }
    }

    pub fn commits_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.acknowledged as f64 / secs
        } else {
            0.0
        }
    }
}

impl fmt::Display for FloodSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "flood {}: {} appends acknowledged in {:.3} s ({:.1} commits/s), last commit {}",
            self.name,
            self.acknowledged,
            self.elapsed.as_secs_f64(),
            self.commits_per_sec(),
            self.last_commit
        )?;
        if let Some(seq) = self.in_doubt {
            write!(f, "; seq {seq} outcome unknown")?;
        }
        Ok(())
    }
}

/// A flood stopped by an error, with what it had done until then.
#[derive(Debug)]
pub struct FloodFailure {
    pub summary: FloodSummary,
    pub error: CliError,
}

/// Flood until the limit; see the module doc.
pub fn run(opts: &FloodOptions) -> Result<FloodSummary, Box<FloodFailure>> {
    run_until(opts, &AtomicBool::new(false))
}

/// Set by SIGINT or SIGTERM once [`stop_on_signals`] ran.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Make SIGINT (Ctrl-C) and SIGTERM end a flood like its limit does: the
/// append in progress is finished and the summary printed. The handler is
/// installed once (SA_RESETHAND): a second signal ends the process at
/// once. Returns the flag to pass to [`run_until`].
pub fn stop_on_signals() -> &'static AtomicBool {
    #[cfg(unix)]
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only stores an
        // atomic, installed before any flood thread starts.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
    &SIGNALLED
}

/// [`run`], also stopping (successfully) once `stop` is set.
pub fn run_until(
    opts: &FloodOptions,
    stop: &AtomicBool,
) -> Result<FloodSummary, Box<FloodFailure>> {
    let mut summary = FloodSummary::new(&opts.name);
    let fail = |summary: &FloodSummary, error: CliError| {
        Box::new(FloodFailure {
            summary: summary.clone(),
            error,
        })
    };
    let mut acks = match &opts.ack_log {
        Some(path) => Some(AckLog::create(path).map_err(|e| fail(&summary, e))?),
        None => None,
    };
    let mut session = Session::connect_with(&opts.node, opts.session.clone())
        .map_err(|e| fail(&summary, e.into()))?;
    let coll =
        domain::ensure_collection(&mut session, &opts.name).map_err(|e| fail(&summary, e))?;
    summary.collection = Some(coll);

    let start = Instant::now();
    let mut seq = 0u64;
    loop {
        let done = match opts.limit {
            FloodLimit::Duration(d) => start.elapsed() >= d,
            FloodLimit::Count(n) => summary.acknowledged >= n,
            FloodLimit::Unlimited => false,
        };
        if done || stop.load(Ordering::Relaxed) {
            break;
        }
        seq += 1;
        let result = session.append(coll, element(&opts.name, seq).as_str());
        summary.elapsed = start.elapsed();
        match result {
            Ok(outcome) => {
                summary.acknowledged = seq;
                summary.last_commit = outcome.number;
                if let Some(log) = &mut acks {
                    log.record(seq).map_err(|e| fail(&summary, e))?;
                }
            }
            Err(e) => {
                if e.is_outcome_unknown() {
                    summary.in_doubt = Some(seq);
                }
                return Err(fail(&summary, e.into()));
            }
        }
    }
    summary.elapsed = start.elapsed();
    Ok(summary)
}

/// The ack log: one decimal seq per line, each line handed to the OS as
/// soon as its append is acknowledged (no fsync: the oracle survives the
/// flooder being killed, not the machine crashing).
struct AckLog {
    path: PathBuf,
    file: File,
}

impl AckLog {
    fn create(path: &Path) -> Result<AckLog, CliError> {
        let file = File::create(path).map_err(|source| CliError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(AckLog {
            path: path.to_path_buf(),
            file,
        })
    }

    fn record(&mut self, seq: u64) -> Result<(), CliError> {
        // One write per line, so a killed flooder leaves whole lines only.
        self.file
            .write_all(format!("{seq}\n").as_bytes())
            .map_err(|source| CliError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_are_zero_padded_to_nine_digits() {
        assert_eq!(element("f1", 1), "f1-000000001");
        assert_eq!(element("f1", 123_456_789), "f1-123456789");
        assert_eq!(element("x", 1_234_567_890), "x-1234567890");
    }

    #[test]
    fn elements_parse_back() {
        assert_eq!(parse_element("f1", "f1-000000042"), Some(42));
        assert_eq!(parse_element("f1", "f1-1234567890"), Some(1_234_567_890));
        assert_eq!(parse_element("f1", "f2-000000042"), None);
        assert_eq!(parse_element("f1", "f1-42"), None);
        assert_eq!(parse_element("f", "f1-000000042"), None);
        assert_eq!(parse_element("a-b", "a-b-000000007"), Some(7));
    }

    #[test]
    fn summary_line() {
        let mut s = FloodSummary::new("f");
        assert_eq!(s.commits_per_sec(), 0.0);
        s.acknowledged = 50;
        s.elapsed = Duration::from_millis(500);
        s.last_commit = 77;
        assert_eq!(
            s.to_string(),
            "flood f: 50 appends acknowledged in 0.500 s (100.0 commits/s), last commit 77"
        );
        s.in_doubt = Some(51);
        assert!(s.to_string().ends_with("; seq 51 outcome unknown"));
    }

    #[test]
    fn ack_log_has_one_seq_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks");
        let mut log = AckLog::create(&path).unwrap();
        for seq in 1..=3 {
            log.record(seq).unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n2\n3\n");
        let e = AckLog::create(&dir.path().join("missing/acks"))
            .err()
            .unwrap();
        assert_eq!(e.kind(), "io");
    }

    #[test]
    fn unreachable_node_fails_before_any_append() {
        // Port 1 on localhost: nothing listens there.
        let opts = FloodOptions::new(vec!["127.0.0.1:1".into()], "f", FloodLimit::Count(1));
        let failure = run(&opts).unwrap_err();
        assert_eq!(failure.summary.acknowledged, 0);
        assert_eq!(failure.error.kind(), "no_server_reachable");
        assert!(failure.error.to_string().contains("127.0.0.1:1"));
    }
}
