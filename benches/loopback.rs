//! Loopback ceiling: what a server that does no work at all reaches on this
//! machine under the load `magma bench` applies, so the server's figures can
//! be read against it.
//!
//! `cargo bench --bench loopback` starts a null server in a child process
//! (this binary again, with `serve`): a single-threaded event loop that
//! answers every 80-byte request with 40 bytes. Then K = 1, 2 and 8 clients
//! on one event loop in this process (as `magma bench` drives its
//! connections), each with one request in flight, for 3 s each; it prints
//! round trips per second and latency p50/p99. Add `-- quick` for 1 s per
//! row. The figures depend on the machine: say which when quoting them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const REQUEST: usize = 80;
const REPLY: usize = 40;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The null server: prints its address, then answers until killed.
fn serve() {
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime(), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            tokio::task::spawn_local(async move {
                let mut request = [0u8; REQUEST];
                while s.read_exact(&mut request).await.is_ok() {
                    if s.write_all(&request[..REPLY]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// K clients on one event loop for `secs`: (round trips/s, p50, p99).
fn clients(addr: &str, k: usize, secs: f64) -> (f64, Duration, Duration) {
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime(), async {
        let mut conns = Vec::new();
        for _ in 0..k {
            let s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            conns.push(s);
        }
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut tasks = tokio::task::JoinSet::new();
        for mut s in conns {
            tasks.spawn_local(async move {
                let mut samples = Vec::new();
                let mut reply = [0u8; REPLY];
                while Instant::now() < end {
                    let sent = Instant::now();
                    s.write_all(&[7u8; REQUEST]).await.unwrap();
                    s.read_exact(&mut reply).await.unwrap();
                    samples.push(sent.elapsed());
                }
                samples
            });
        }
        let mut all = Vec::new();
        while let Some(done) = tasks.join_next().await {
            all.extend(done.unwrap());
        }
        assert!(!all.is_empty(), "no round trip was made");
        all.sort();
        let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
        (all.len() as f64 / secs, at(0.50), at(0.99))
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "serve") {
        return serve();
    }
    let secs = if args.iter().any(|a| a == "quick") {
        1.0
    } else {
        3.0
    };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("serve")
        .stdout(Stdio::piped())
        .spawn()
        .expect("the null server starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("the null server prints its address");
    let addr = line.trim().to_string();
    println!(
        "loopback ceiling: a null server in another process, {REQUEST}-byte requests, \
         {REPLY}-byte replies, {secs} s per row ({} cores; the clients share them)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for k in [1, 2, 8] {
        let (rate, p50, p99) = clients(&addr, k, secs);
        println!(
            "K={k}  {rate:>9.0} round trips/s  p50 {:.3} ms  p99 {:.3} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}
