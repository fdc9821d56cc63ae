//! `Probes`: asking several servers at once, each on its own thread, and
//! taking the answers as they come.
//!
//! A hung server (stopped, swapping, wedged) still completes TCP handshakes
//! (its kernel answers for it) and then never replies. Asked one after
//! another, the first hung server costs the whole read timeout (30 s by
//! default) before the next is asked: every new session, every choice of a
//! read server, every re-learning of the node. A router that asks them all
//! at once goes on with whoever answers, and waits for the others only
//! [`STRAGGLERS`] longer.
//!
//! This module owns the threads only. It never decides which answer is
//! right (that is `router`) and never retries. A thread whose answer nobody
//! waits for any more ends by itself within the connection's own timeouts,
//! and its connection is closed then. Each router runs at most one probe
//! per address at a time ([`Busy`]): re-learning the node in a loop while a
//! server hangs starts no new thread for it.

use std::collections::HashSet;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::client::error::{ClientError, Result};

/// How long a router waits for the servers it asked once one of them has
/// answered. Healthy servers answer within milliseconds; one that needs
/// longer is not worth holding up the session, and is asked again next
/// time.
pub(crate) const STRAGGLERS: Duration = Duration::from_millis(500);

/// Addresses with a probe still running, shared by a router's probes.
pub(crate) type Busy = Arc<Mutex<HashSet<String>>>;

/// Removes its address from [`Busy`] when the probe's thread ends,
/// whichever way it ends.
struct Running {
    busy: Busy,
    addr: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut set) = self.busy.lock() {
            set.remove(&self.addr);
        }
    }
}

/// One round of probes; see the module doc.
pub(crate) struct Probes<T> {
    busy: Busy,
    tx: Sender<(usize, Result<T>)>,
    rx: Receiver<(usize, Result<T>)>,
    pending: usize,
}

impl<T: Send + 'static> Probes<T> {
    pub fn new(busy: &Busy) -> Self {
        let (tx, rx) = mpsc::channel();
        Probes {
            busy: busy.clone(),
            tx,
            rx,
            pending: 0,
        }
    }

    /// Run `job`, which connects to `addr`, on a thread of its own; its
    /// answer comes back from [`Probes::next`] under `key`. False (and
    /// nothing runs) when a probe connecting to `addr` is still running
    /// from an earlier round.
    pub fn connect(
        &mut self,
        key: usize,
        addr: &str,
        job: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> bool {
        let running = {
            let mut set = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            if !set.insert(addr.to_string()) {
                return false;
            }
            Running {
                busy: self.busy.clone(),
                addr: addr.to_string(),
            }
        };
        self.run(key, addr, move || {
            let answer = job();
            drop(running);
            answer
        });
        true
    }

    /// Run `job`, which asks `addr` on a connection it owns, on a thread
    /// of its own; its answer comes back from [`Probes::next`] under `key`.
    /// Never refused: a connection is in one probe at a time.
    pub fn run(
        &mut self,
        key: usize,
        addr: &str,
        job: impl FnOnce() -> Result<T> + Send + 'static,
    ) {
        let tx = self.tx.clone();
        let spawned = thread::Builder::new()
            .name("magma-probe".into())
            .spawn(move || {
                // Nobody waits any more: the answer (a connection) is
                // dropped, which closes it.
                let _ = tx.send((key, job()));
            });
        self.pending += 1;
        if let Err(e) = spawned {
            let _ = self.tx.send((
                key,
                Err(ClientError::Io {
                    addr: addr.to_string(),
                    source: e,
                }),
            ));
        }
    }

    /// Probes started and not answered yet.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// The next answer, whichever probe gives it first, waiting at most
    /// until `deadline` (`None`: until every probe has answered). `None`
    /// when nothing is pending or the deadline passed.
    pub fn next(&mut self, deadline: Option<Instant>) -> Option<(usize, Result<T>)> {
        if self.pending == 0 {
            return None;
        }
        let answer = match deadline {
            None => self.rx.recv().ok(),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                self.rx.recv_timeout(left).ok()
            }
        };
        if answer.is_some() {
            self.pending -= 1;
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_come_as_they_are_ready_and_a_slow_one_is_left_behind() {
        let busy = Busy::default();
        let mut probes = Probes::new(&busy);
        let (release, hold) = mpsc::channel::<()>();
        assert!(probes.connect(0, "slow", move || {
            let _ = hold.recv();
            Ok(0)
        }));
        assert!(probes.connect(1, "fast", || Ok(1)));
        assert!(matches!(probes.next(None), Some((1, Ok(1)))));
        // The slow one still runs: its address is busy for a next round.
        assert!(!Probes::<u8>::new(&busy).connect(2, "slow", || Ok(2)));
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(probes.next(Some(soon)).is_none());
        assert_eq!(probes.pending(), 1);
        release.send(()).unwrap();
        assert!(matches!(probes.next(None), Some((0, Ok(0)))));
        assert!(probes.next(None).is_none());
        // Once it ended, the address may be probed again.
        let mut again = Probes::new(&busy);
        assert!(again.connect(3, "slow", || Ok(3)));
        assert!(matches!(again.next(None), Some((3, Ok(3)))));
    }

    #[test]
    fn an_abandoned_round_frees_its_addresses_when_its_threads_end() {
        let busy = Busy::default();
        let (release, hold) = mpsc::channel::<()>();
        let (done_tx, done) = mpsc::channel::<()>();
        {
            let mut probes = Probes::new(&busy);
            probes.connect(0, "a", move || {
                let _ = hold.recv();
                let _ = done_tx.send(());
                Ok(())
            });
        }
        assert!(busy.lock().unwrap().contains("a"));
        release.send(()).unwrap();
        done.recv().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while busy.lock().unwrap().contains("a") {
            assert!(Instant::now() < deadline, "the address stayed busy");
            thread::sleep(Duration::from_millis(1));
        }
    }
}
