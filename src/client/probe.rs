//! `Probes`: a router's questions to servers, each on a thread of its own,
//! answers taken as they come.
//!
//! A hung server (stopped, swapping, wedged) still completes TCP handshakes
//! (its kernel answers for it) and then never replies. Asked one after
//! another, the first hung server costs the whole read timeout (30 s by
//! default) before the next is asked: every new session, every choice of a
//! read server, every re-learning of the node. A router that asks them all
//! at once goes on with whoever answers, and waits for the others only
//! [`STRAGGLERS`] longer.
//!
//! A probe is never abandoned: one still running when its round ends is
//! waited for by the next round that needs its server, and its answer (a
//! connection) is kept then. There is at most one probe per address.
//!
//! This module owns the threads only. It never decides which answer is
//! right (that is `router`) and never retries. A probe of a router that is
//! dropped ends by itself within the connection's timeouts, closing its
//! connection. At most [`MAX_THREADS`] probes run on threads in a process;
//! beyond that a probe runs on the caller's thread, as every attempt did
//! before probes existed: a process opening sessions faster than a hung
//! server's timeouts must not pile up threads without bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use crate::client::connection::{ConnectOptions, Connection};
use crate::client::error::{ClientError, Result};
use crate::protocol::{RequestBody, Response, SessionRole};

/// How long a router waits for the servers it asked once one of them has
/// answered. Healthy servers answer within milliseconds; one that needs
/// longer is not worth holding the session up for, and its answer is taken
/// when it comes.
pub(crate) const STRAGGLERS: Duration = Duration::from_millis(500);

/// An answer taken within this long of coming in tells what its server
/// says now; one that waited longer is only a connection (see `router`).
pub(crate) const FRESH: Duration = Duration::from_millis(100);

/// Most probe threads running at once in this process.
pub(crate) const MAX_THREADS: usize = 256;

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Gives back its place in [`THREADS`] when the thread ends.
struct Place;

impl Drop for Place {
    fn drop(&mut self) {
        THREADS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a probe of `addr` found: a new connection, whose hello tells the
/// node (`None`), or an existing connection with its answer to a node
/// request.
pub(crate) struct Answer {
    pub addr: String,
    /// When the probe started (its connection's hello is no older).
    pub started: Instant,
    /// When it answered: what it says about the server's progress is as
    /// old as this.
    pub answered: Instant,
    pub result: Result<(Connection, Option<Response>)>,
}

/// One router's probes; see the module doc.
pub(crate) struct Probes {
    opts: ConnectOptions,
    tx: Sender<Answer>,
    rx: Receiver<Answer>,
    /// Addresses with a probe running, and when each started.
    running: HashMap<String, Instant>,
}

impl Probes {
    pub fn new(opts: ConnectOptions) -> Self {
        let (tx, rx) = mpsc::channel();
        Probes {
            opts,
            tx,
            rx,
            running: HashMap::new(),
        }
    }

    /// Connect to `addr` and say hello, unless a probe of it is running.
    /// True when it ran on the caller's thread (no room for another
    /// thread): its answer is ready.
    pub fn connect(&mut self, addr: &str) -> bool {
        if self.running.contains_key(addr) {
            return false;
        }
        let (target, opts) = (addr.to_string(), self.opts.clone());
        self.start(addr, move || {
            Connection::connect(&target, SessionRole::Application, &opts).map(|c| (c, None))
        })
    }

    /// Would a probe started now run on a thread of its own?
    pub fn has_room() -> bool {
        THREADS.load(Ordering::SeqCst) < MAX_THREADS
    }

    /// Ask the server on `conn` for the node, unless a probe of its
    /// address is running (then `conn` is handed back).
    pub fn ask(&mut self, mut conn: Connection) -> Option<Connection> {
        if self.running.contains_key(conn.addr()) {
            return Some(conn);
        }
        let addr = conn.addr().to_string();
        self.start(&addr, move || {
            let resp = conn.call(RequestBody::GetNode)?;
            Ok((conn, Some(resp)))
        });
        None
    }

    /// Run `job` on a thread, or on this one when there is no room (true).
    fn start(
        &mut self,
        addr: &str,
        job: impl FnOnce() -> Result<(Connection, Option<Response>)> + Send + 'static,
    ) -> bool {
        let (tx, started) = (self.tx.clone(), Instant::now());
        self.running.insert(addr.to_string(), started);
        // Sends what the job found, stamped with when (one per job).
        let reply = {
            let addr = addr.to_string();
            move |tx: &Sender<Answer>, result| {
                let _ = tx.send(Answer {
                    addr,
                    started,
                    answered: Instant::now(),
                    result,
                });
            }
        };
        // A panicking job must still answer: its address would otherwise
        // count as probed for ever.
        let panicked = addr.to_string();
        let job = move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).unwrap_or_else(|_| {
                Err(ClientError::Io {
                    addr: panicked,
                    source: std::io::Error::other("the connection attempt panicked"),
                })
            })
        };
        if THREADS.fetch_add(1, Ordering::SeqCst) >= MAX_THREADS {
            THREADS.fetch_sub(1, Ordering::SeqCst);
            reply(&tx, job());
            return true;
        }
        let place = Place;
        // Kept to answer if the thread cannot start (the closure goes with
        // the error).
        let fallback = reply.clone();
        let spawned = thread::Builder::new()
            .name("magma-probe".into())
            .spawn(move || {
                let _place = place;
                // Nobody waits any more (the router is gone): the
                // connection is dropped, which closes it.
                reply(&tx, job());
            });
        if let Err(e) = spawned {
            let source = ClientError::Io {
                addr: addr.to_string(),
                source: e,
            };
            fallback(&self.tx, Err(source));
        }
        false
    }

    /// Is a probe of `addr` running?
    pub fn is_running(&self, addr: &str) -> bool {
        self.running.contains_key(addr)
    }

    /// When the probe of `addr` still running started.
    pub fn started(&self, addr: &str) -> Option<Instant> {
        self.running.get(addr).copied()
    }

    /// The next answer, whichever probe gives it first, waiting at most
    /// until `deadline` (`None`: until one comes). `None` when no probe is
    /// running or the deadline passed.
    pub fn next(&mut self, deadline: Option<Instant>) -> Option<Answer> {
        if self.running.is_empty() {
            return None;
        }
        let answer = match deadline {
            None => self.rx.recv().ok(),
            Some(d) => self
                .rx
                .recv_timeout(d.saturating_duration_since(Instant::now()))
                .ok(),
        }?;
        self.running.remove(&answer.addr);
        Some(answer)
    }

    /// An answer already in, without waiting.
    pub fn ready(&mut self) -> Option<Answer> {
        let answer = self.rx.try_recv().ok()?;
        self.running.remove(&answer.addr);
        Some(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A listener nobody serves: connections complete, nothing is answered.
    fn silent() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (l, addr)
    }

    fn opts(read: Duration) -> ConnectOptions {
        ConnectOptions {
            read_timeout: Some(read),
            ..ConnectOptions::default()
        }
    }

    #[test]
    fn a_probe_runs_once_per_address_and_is_waited_for_across_rounds() {
        let (_l, addr) = silent();
        let mut probes = Probes::new(opts(Duration::from_millis(300)));
        probes.connect(&addr);
        probes.connect(&addr);
        assert!(probes.is_running(&addr));
        // A first round gives up on it...
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(probes.next(Some(soon)).is_none());
        assert!(probes.is_running(&addr));
        // ... a later one gets its one answer (here: no hello in time).
        let answer = probes.next(None).expect("the probe answers");
        assert_eq!(answer.addr, addr);
        assert!(answer.result.is_err());
        assert!(!probes.is_running(&addr));
        assert!(probes.next(None).is_none());
        assert!(probes.ready().is_none());
    }

    #[test]
    fn an_unreachable_address_answers_with_its_error() {
        // Bound and dropped: nothing listens there now.
        let addr = silent().1;
        let mut probes = Probes::new(opts(Duration::from_secs(5)));
        probes.connect(&addr);
        let answer = probes.next(None).expect("the probe answers");
        assert!(answer.result.unwrap_err().is_network());
    }
}
