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
//! failures would measure nothing.

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
    let mut conns = Vec::with_capacity(colls.len());
    for (name, coll) in colls {
        conns.push(Client::connect(primary, name, coll).await?);
    }
    let barrier = Arc::new(Barrier::new(conns.len() + 1));
    let mut tasks = tokio::task::JoinSet::new();
    let start_slot = Arc::new(std::sync::OnceLock::<Instant>::new());
    for client in conns {
        let barrier = Arc::clone(&barrier);
        let start_slot = Arc::clone(&start_slot);
        let duration = opts.duration;
        tasks.spawn(async move {
            barrier.wait().await;
            let deadline = *start_slot
                .get()
                .expect("start is set before the barrier opens")
                + duration;
            client.flood(deadline).await
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
    while let Some(joined) = tasks.join_next().await {
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
    async fn flood(mut self, deadline: Instant) -> Result<(Vec<Duration>, Instant), CliError> {
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
