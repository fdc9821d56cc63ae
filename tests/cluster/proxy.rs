//! A fault-injecting TCP proxy on loopback: it forwards every connection to
//! one target address, byte for byte, until told to `cut()`; then it closes
//! every forwarded connection and closes each new one at once, until
//! `heal()`. Dropping it stops it.
//!
//! A server started with `--advertise PROXY_ADDR` is reached by its members
//! and by clients only through its proxy, so a cut is a network partition
//! of that server's inbound side. (Its own connections to the others go
//! through their proxies, which stay up: the partition is asymmetric.)
//!
//! Plain std threads: one accepting, two per forwarded connection.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

struct Shared {
    target: Mutex<SocketAddr>,
    stop: AtomicBool,
    next_id: AtomicU64,
    /// `cut` and the forwarded connections (both ends of each), under one
    /// lock so that a connection accepted while cutting is either closed
    /// by the cut or refused.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    cut: bool,
    conns: HashMap<u64, (TcpStream, TcpStream)>,
}

pub struct Proxy {
    pub addr: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listen on a free loopback port and forward to `target`.
    pub fn start(target: &str) -> Proxy {
        let target: SocketAddr = target
            .parse()
            .unwrap_or_else(|e| panic!("harness: proxy target {target}: {e}"));
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("harness: proxy cannot listen: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("harness: proxy address: {e}"))
            .to_string();
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("proxy {addr}"))
            .spawn(move || accept_loop(listener, s))
            .unwrap_or_else(|e| panic!("harness: proxy thread: {e}"));
        Proxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Close every forwarded connection; close new ones until `heal`.
    pub fn cut(&self) {
        let mut st = self.shared.state.lock().unwrap();
        st.cut = true;
        for (_, (a, b)) in st.conns.drain() {
            a.shutdown(Shutdown::Both).ok();
            b.shutdown(Shutdown::Both).ok();
        }
    }

    /// Forward new connections again.
    pub fn heal(&self) {
        self.shared.state.lock().unwrap().cut = false;
    }

    /// Forward new connections to `target` from now on (a server restarted
    /// on another port: nobody else needs to know).
    pub fn set_target(&self, target: &str) {
        *self.shared.target.lock().unwrap() = target
            .parse()
            .unwrap_or_else(|e| panic!("harness: proxy target {target}: {e}"));
    }

    /// Connections forwarded right now.
    pub fn connections(&self) -> usize {
        self.shared.state.lock().unwrap().conns.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accepting thread; it sees `stop` and returns.
        TcpStream::connect_timeout(
            &self.addr.parse().expect("own address"),
            Duration::from_secs(1),
        )
        .ok();
        if let Some(t) = self.accept.take() {
            t.join().ok();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for incoming in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = incoming else {
            continue;
        };
        if shared.state.lock().unwrap().cut {
            continue; // dropped: closed at once
        }
        // Connecting to a dead target fails fast on loopback; the client
        // then sees its connection closed, as behind any TCP proxy.
        let target = *shared.target.lock().unwrap();
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
            continue;
        };
        client.set_nodelay(true).ok();
        server.set_nodelay(true).ok();
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        {
            let mut st = shared.state.lock().unwrap();
            if st.cut {
                continue;
            }
            st.conns.insert(id, (c3, s3));
        }
        let up = shared.clone();
        std::thread::spawn(move || {
            pump(client, server);
            forget(&up, id);
        });
        let down = shared.clone();
        std::thread::spawn(move || {
            pump(s2, c2);
            forget(&down, id);
        });
    }
}

/// Copy `from` to `to` until either side ends, then close both directions
/// of both (the other pump ends too).
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    from.shutdown(Shutdown::Both).ok();
    to.shutdown(Shutdown::Both).ok();
}

fn forget(shared: &Shared, id: u64) {
    shared.state.lock().unwrap().conns.remove(&id);
}
