//! The event-loop engine of `magma bench`: K application connections to the
//! primary driven by one thread (a single-threaded tokio runtime), each with
//! exactly one commit in flight — the shape of `redis-benchmark` or
//! `pgbench`, so the figures measure the server rather than K client threads
//! waking each other on a 2-core machine.
//!
//! This module owns the load loop only. Set-up (finding the primary,
//! creating the collections) goes through the client library, and every
//! commit is a real one: the same body `Session::append` sends (one append
//! of `PREFIX-<i>-<seq>`, a fresh 16-byte idempotency token), on a
//! connection that said hello as an application, its reply checked for id
//! and type. It never pipelines, never retries and never reports figures
//! from a run in which any reply was an error: a load generator that hides
//! failures would measure nothing. Every wait is bounded by the session
//! options' timeouts: connecting by `connect_timeout`, and a client with no
//! reply for `read_timeout` ends the run with a network error (a hung
//! server must not hang the benchmark); the check is a watchdog ticking
//! beside the clients, so the commit path carries no timer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

use crate::cli::bench::{BenchOptions, BenchReport, Latency};
use crate::cli::domain;
use crate::cli::error::CliError;
use crate::cli::flood::element;
use crate::client::{ClientError, Session};
use crate::protocol::codec::{encode, read_frame_async, DEFAULT_MAX_FRAME};
use crate::protocol::direct::decode_response;
use crate::protocol::messages::{
    CommitBody, Request, RequestBody, Response, ResponseBody, SessionRole, WireAppend, WireRef,
    PROTOCOL_VERSION,
};
use crate::types::Oid;

/// How often the watchdog looks for a client waiting too long.
const WATCHDOG_TICK: Duration = Duration::from_millis(250);
/// Beyond the connect timeout, for the hello's answer.
const REPLY_GRACE: Duration = Duration::from_secs(5);
/// A client's reply time once it has stopped.
const FINISHED: u64 = u64::MAX;

/// A wait on `addr` took longer than the session options allow.
fn timed_out(addr: &str, what: &str) -> CliError {
    CliError::client(ClientError::Io {
        addr: addr.to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer in time while {what}"),
        ),
    })
}

/// Run the benchmark on one thread; see the module doc.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, CliError> {
    let mut session = Session::connect_with(&opts.node, opts.session.clone())?;
    let mut colls = Vec::with_capacity(opts.clients as usize);
    for i in 1..=opts.clients {
        let name = format!("{}-{i}", opts.prefix);
        colls.push((
            name.clone(),
            domain::ensure_collection(&mut session, &name)?.oid(),
        ));
    }
    let primary = session
        .commit_server()
        .map(str::to_string)
        .ok_or_else(|| CliError::client(ClientError::NoServerReachable { tried: Vec::new() }))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Internal(format!("cannot start the event loop: {e}")))?;
    runtime.block_on(drive(opts, &primary, colls))
}

async fn drive(
    opts: &BenchOptions,
    primary: &str,
    colls: Vec<(String, Oid)>,
) -> Result<BenchReport, CliError> {
    // Every connection is open and greeted before the clock starts.
    let limits = &opts.session.connect;
    let mut conns = Vec::with_capacity(colls.len());
    for (name, coll) in colls {
        let connecting = Client::connect(primary, name, coll);
        let client = tokio::time::timeout(limits.connect_timeout + REPLY_GRACE, connecting)
            .await
            .map_err(|_| timed_out(primary, "connecting and saying hello"))??;
        conns.push(client);
    }
    // Per client: when its last reply came, in ms since `epoch`.
    let epoch = Instant::now();
    let replied: Vec<Arc<AtomicU64>> = conns.iter().map(|_| Arc::default()).collect();
    let barrier = Arc::new(Barrier::new(conns.len() + 1));
    let mut tasks = tokio::task::JoinSet::new();
    let start_slot = Arc::new(std::sync::OnceLock::<Instant>::new());
    for (mut client, replied) in conns.into_iter().zip(&replied) {
        client.replied = Some((epoch, Arc::clone(replied)));
        let barrier = Arc::clone(&barrier);
        let start_slot = Arc::clone(&start_slot);
        let duration = opts.duration;
        tasks.spawn(async move {
            barrier.wait().await;
            let deadline = *start_slot
                .get()
                .expect("start is set before the barrier opens")
                + duration;
            client.note_reply();
            let outcome = client.flood(deadline).await;
            client.finished();
            outcome
        });
    }
    let start = Instant::now();
    start_slot
        .set(start)
        .expect("the start is set exactly once");
    barrier.wait().await;

    let mut samples = Vec::new();
    let mut end = start;
    let mut first_error = None;
    let mut watchdog = tokio::time::interval(WATCHDOG_TICK);
    loop {
        let joined = tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(joined) => joined,
                None => break,
            },
            _ = watchdog.tick() => {
                if let (Some(limit), None) = (limits.read_timeout, &first_error) {
                    let now = epoch.elapsed().as_millis() as u64;
                    let stalled = replied.iter().any(|r| {
                        let at = r.load(Ordering::Relaxed);
                        at != FINISHED && now.saturating_sub(at) > limit.as_millis() as u64
                    });
                    if stalled {
                        first_error = Some(timed_out(primary, "waiting for a commit's reply"));
                        tasks.abort_all();
                    }
                }
                continue;
            }
        };
        match joined {
            Ok(Ok((mut lat, last))) => {
                samples.append(&mut lat);
                end = end.max(last);
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
                // One failure ends the run: the figures would be wrong.
                tasks.abort_all();
            }
            Err(e) if e.is_cancelled() => {}
            Err(_) => {
                first_error.get_or_insert(CliError::Internal("a client task panicked".into()));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(BenchReport {
        clients: opts.clients,
        commits: samples.len() as u64,
        elapsed: end.saturating_duration_since(start),
        latency: Latency::of(&mut samples),
    })
}

/// One application connection appending to its own collection.
struct Client {
    addr: String,
    name: String,
    coll: Oid,
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    next_id: u64,
    /// Where the watchdog reads when this client last got a reply: (its
    /// epoch, ms since then).
    replied: Option<(Instant, Arc<AtomicU64>)>,
}

impl Client {
    async fn connect(addr: &str, name: String, coll: Oid) -> Result<Client, CliError> {
        let io = |source| {
            CliError::client(ClientError::Io {
                addr: addr.to_string(),
                source,
            })
        };
        let stream = TcpStream::connect(addr).await.map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let (r, w) = stream.into_split();
        let mut client = Client {
            addr: addr.to_string(),
            name,
            coll,
            reader: BufReader::new(r),
            writer: w,
            next_id: 0,
            replied: None,
        };
        let hello = RequestBody::Hello {
            protocol_version: PROTOCOL_VERSION,
            role: SessionRole::Application,
            client_name: format!("magma bench {}", client.name),
        };
        match client.call(hello).await? {
            ResponseBody::Hello { .. } => Ok(client),
            other => Err(client.unexpected(&other)),
        }
    }

    /// Send one request and wait for its reply; a server error becomes the
    /// client's typed error.
    async fn call(&mut self, body: RequestBody) -> Result<ResponseBody, CliError> {
        self.next_id += 1;
        let id = self.next_id;
        let frame = encode(&Request { id, body });
        let io = |source| {
            CliError::client(ClientError::Io {
                addr: self.addr.clone(),
                source,
            })
        };
        self.writer.write_all(&frame).await.map_err(io)?;
        let reply = read_frame_async(&mut self.reader, DEFAULT_MAX_FRAME)
            .await
            .map_err(|e| CliError::client(ClientError::from_protocol(&self.addr, e)))?;
        self.note_reply();
        let resp: Response = decode_response(&reply)
            .map_err(|e| CliError::client(ClientError::from_protocol(&self.addr, e)))?;
        if resp.id != id {
            return Err(self.violation(format!("reply id {} to request {id}", resp.id)));
        }
        match resp.body {
            ResponseBody::Error { error, .. } => {
                Err(CliError::client(ClientError::from_wire(error)))
            }
            body => Ok(body),
        }
    }

    /// Append until `deadline`; the latency of each commit and when the
    /// last one ended.
    async fn flood(&mut self, deadline: Instant) -> Result<(Vec<Duration>, Instant), CliError> {
        let mut latencies = Vec::new();
        let mut last = Instant::now();
        let mut seq = 0u64;
        while last < deadline {
            seq += 1;
            let body = CommitBody {
                token: Some(rand::random::<[u8; 16]>().to_vec()),
                appends: vec![WireAppend {
                    coll: WireRef::Oid(self.coll),
                    value: rmpv::Value::from(element(&self.name, seq)),
                }],
                ..CommitBody::default()
            };
            let t = Instant::now();
            match self.call(RequestBody::Commit(body)).await? {
                ResponseBody::Committed { positions, .. } if positions.len() == 1 => {}
                other => return Err(self.unexpected(&other)),
            }
            last = Instant::now();
            latencies.push(last - t);
        }
        Ok((latencies, last))
    }

    /// Tell the watchdog this client is alive.
    fn note_reply(&self) {
        if let Some((epoch, at)) = &self.replied {
            at.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// Tell the watchdog this client has stopped waiting.
    fn finished(&self) {
        if let Some((_, at)) = &self.replied {
            at.store(FINISHED, Ordering::Relaxed);
        }
    }

    fn unexpected(&self, body: &ResponseBody) -> CliError {
        self.violation(format!("unexpected reply {body:?}"))
    }

    fn violation(&self, reason: String) -> CliError {
        CliError::client(ClientError::Protocol {
            addr: self.addr.clone(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::protocol::codec::{read_frame, write_frame};
    use crate::protocol::messages::ServerRole;

    /// A "server" that greets every connection and then never answers.
    fn hung_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    while let Ok(frame) = read_frame(&mut stream, DEFAULT_MAX_FRAME) {
                        let req: Request = crate::protocol::codec::decode(&frame).unwrap();
                        if let RequestBody::Hello { .. } = req.body {
                            let hello = ResponseBody::Hello {
                                protocol_version: PROTOCOL_VERSION,
                                server_id: 1,
                                repository_id: "r".into(),
                                role: ServerRole::Primary,
                                node: Default::default(),
                                epoch: Default::default(),
                            };
                            let resp = Response {
                                id: req.id,
                                commit: 1,
                                body: hello,
                            };
                            write_frame(&mut stream, &resp).unwrap();
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn a_server_that_stops_answering_ends_the_run_with_a_network_error() {
        let addr = hung_server();
        let mut opts = BenchOptions::new(vec![addr.clone()], 2, Duration::from_secs(60));
        opts.session.connect.read_timeout = Some(Duration::from_millis(500));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let colls = vec![("bench-1".to_string(), 5), ("bench-2".to_string(), 6)];
        let began = Instant::now();
        let err = runtime
            .block_on(drive(&opts, &addr, colls))
            .expect_err("no commit was ever answered");
        assert_eq!(err.kind(), "network", "{err}");
        assert!(err.to_string().contains(&addr), "{err}");
        // Ended by the watchdog, long before the 60 s run would have.
        assert!(began.elapsed() < Duration::from_secs(30));
    }
}
