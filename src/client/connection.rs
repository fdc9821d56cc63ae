//! One blocking connection to one server: TCP set-up, the hello handshake,
//! request ids, framing, and turning `ResponseBody::Error` into
//! [`ClientError`].
//!
//! This module owns a single socket. It must never retry, fail over or pick
//! servers (that is `session`'s job), and never reuse a connection after a
//! network or protocol failure: such a connection is marked broken.

use std::io::{BufReader, ErrorKind};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::client::error::{ClientError, Result};
use crate::protocol::codec::{self, DEFAULT_MAX_FRAME};
use crate::protocol::direct;
use crate::protocol::{
    RequestBody, Response, ResponseBody, ServerRole, SessionRole, WireError, PROTOCOL_VERSION,
};
use crate::types::{CommitNumber, Epoch, Node};

/// Socket settings for every connection a client opens.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Per address tried; default 3 s.
    pub connect_timeout: Duration,
    /// Longest wait for a whole reply; `None` waits forever. Default 30 s (a
    /// read with a required progress may legitimately wait about a second
    /// on the server, a commit waits for its fsync and its replicas). A
    /// reply still incomplete past it fails with a `TimedOut` network error,
    /// at the latest twice this after the request (each read is bounded by
    /// it too).
    pub read_timeout: Option<Duration>,
    /// Default 30 s.
    pub write_timeout: Option<Duration>,
    /// Sent in the hello; shows up in server logs.
    pub client_name: String,
    /// Largest response frame accepted; default 16 MiB.
    pub max_frame: u64,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(3),
            read_timeout: Some(Duration::from_secs(30)),
            write_timeout: Some(Duration::from_secs(30)),
            client_name: format!("magma-rust/{}", env!("CARGO_PKG_VERSION")),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// What the server said about itself in its hello.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerHello {
    pub protocol_version: u32,
    /// The server's last applied commit when it answered.
    pub commit: CommitNumber,
    pub server_id: u64,
    pub repository_id: String,
    pub role: ServerRole,
    pub node: Node,
    pub epoch: Epoch,
}

/// A blocking, hello'd connection. One request at a time through
/// [`Connection::call`]; [`Connection::send`] and [`Connection::receive`]
/// allow pipelining.
pub struct Connection {
    addr: String,
    stream: BufReader<TcpStream>,
    next_id: u64,
    hello: ServerHello,
    max_frame: u64,
    read_timeout: Option<Duration>,
    /// What the socket's read timeout is set to now: `read_timeout`,
    /// unless the last call asked for less.
    socket_timeout: Option<Duration>,
    broken: bool,
}

/// Reads of one reply that give up once its deadline passed. The socket's
/// read timeout bounds each read; this bounds the whole reply, which a
/// server sending a byte now and then would otherwise hold for ever. A
/// socket timeout is reported as such, not as "resource temporarily
/// unavailable".
struct Until<'a> {
    inner: &'a mut BufReader<TcpStream>,
    deadline: Option<(Instant, Duration)>,
    /// What the socket's read timeout is (each read's wait), for the
    /// message.
    silence: Option<Duration>,
}

impl std::io::Read for Until<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let timed_out = |limit: &Duration, what: &str| {
            std::io::Error::new(
                ErrorKind::TimedOut,
                format!("{what} within {limit:?}: the server is stopped, hung or overloaded"),
            )
        };
        if let Some((at, limit)) = &self.deadline {
            if Instant::now() >= *at {
                return Err(timed_out(limit, "no complete reply"));
            }
        }
        self.inner
            .read(buf)
            .map_err(|e| match (&self.silence, e.kind()) {
                (Some(limit), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    timed_out(limit, "no reply")
                }
                _ => e,
            })
    }
}

/// A [`Request`](crate::protocol::Request) by reference: encoded exactly alike, without cloning the
/// body (a commit's values) for every attempt.
#[derive(serde::Serialize)]
struct OutgoingRequest<'a> {
    id: u64,
    body: &'a RequestBody,
}

/// A failed call, with whether the request had been completely handed to
/// the network (so a commit may have been applied).
pub(crate) struct CallFailure {
    pub sent: bool,
    pub error: ClientError,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("server_id", &self.hello.server_id)
            .field("role", &self.hello.role)
            .field("broken", &self.broken)
            .finish()
    }
}

fn io_error(addr: &str, source: std::io::Error) -> ClientError {
    ClientError::Io {
        addr: addr.to_string(),
        source,
    }
}

fn open_socket(addr: &str, opts: &ConnectOptions) -> Result<TcpStream> {
    let targets = addr.to_socket_addrs().map_err(|e| io_error(addr, e))?;
    let mut last = None;
    for target in targets {
        match TcpStream::connect_timeout(&target, opts.connect_timeout) {
            Ok(s) => {
                let setup = s
                    .set_nodelay(true)
                    .and_then(|_| s.set_read_timeout(opts.read_timeout))
                    .and_then(|_| s.set_write_timeout(opts.write_timeout));
                setup.map_err(|e| io_error(addr, e))?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(io_error(
        addr,
        last.unwrap_or_else(|| {
            std::io::Error::new(ErrorKind::NotFound, "address resolves to nothing")
        }),
    ))
}

impl Connection {
    /// Connect to `addr` (`host:port`) and say hello as `role`.
    pub fn connect(addr: &str, role: SessionRole, opts: &ConnectOptions) -> Result<Connection> {
        let stream = open_socket(addr, opts)?;
        let placeholder = ServerHello {
            protocol_version: 0,
            commit: 0,
            server_id: 0,
            repository_id: String::new(),
            role: ServerRole::Deposed,
            node: Node::default(),
            epoch: Epoch::default(),
        };
        let mut conn = Connection {
            addr: addr.to_string(),
            stream: BufReader::new(stream),
            next_id: 1,
            hello: placeholder,
            max_frame: opts.max_frame,
            read_timeout: opts.read_timeout,
            socket_timeout: opts.read_timeout,
            broken: false,
        };
        let resp = conn.call(RequestBody::Hello {
            protocol_version: PROTOCOL_VERSION,
            role,
            client_name: opts.client_name.clone(),
        })?;
        match resp.body {
            ResponseBody::Hello {
                protocol_version,
                server_id,
                repository_id,
                role,
                node,
                epoch,
            } => {
                conn.hello = ServerHello {
                    protocol_version,
                    commit: resp.commit,
                    server_id,
                    repository_id,
                    role,
                    node,
                    epoch,
                };
                Ok(conn)
            }
            other => Err(unexpected(addr, "hello", &other)),
        }
    }

    /// The address this connection was opened to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The server's hello.
    pub fn hello(&self) -> &ServerHello {
        &self.hello
    }

    /// False once a network or protocol failure happened on it.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// Wait until the server closes this connection, at most `limit`.
    /// Anything it still sends is skipped. False when `limit` passed first.
    pub fn wait_closed(&mut self, limit: Duration) -> Result<bool> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            self.limit_reads(Some(left))?;
            match std::io::Read::read(&mut self.stream, &mut buf) {
                Ok(0) => return Ok(true),
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(true),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(&self.addr, e)),
            }
        }
    }

    /// Send one request and wait for its response. An `Error` response
    /// becomes `Err` (a conflict as [`ClientError::Conflict`]); any other
    /// response is returned whole, so the caller sees the server's `commit`.
    pub fn call(&mut self, body: RequestBody) -> Result<Response> {
        self.call_tracked(&body).map_err(|f| f.error)
    }

    pub(crate) fn call_tracked(
        &mut self,
        body: &RequestBody,
    ) -> std::result::Result<Response, CallFailure> {
        self.call_limited(body, self.read_timeout)
    }

    /// [`Connection::call`] giving up with a `TimedOut` network error
    /// when the server stays silent for `silence` (or the read timeout,
    /// if shorter); the connection is then broken. A reply under way may
    /// take the whole read timeout. For a request another server could
    /// answer instead.
    pub(crate) fn call_within(
        &mut self,
        body: &RequestBody,
        silence: Duration,
    ) -> Result<Response> {
        // A zero socket timeout is refused by the system.
        let silence = silence.max(Duration::from_millis(1));
        let silence = match self.read_timeout {
            Some(t) if t <= silence => t,
            _ => silence,
        };
        self.call_limited(body, Some(silence)).map_err(|f| f.error)
    }

    fn call_limited(
        &mut self,
        body: &RequestBody,
        silence: Option<Duration>,
    ) -> std::result::Result<Response, CallFailure> {
        let id = self
            .send(body)
            .map_err(|error| CallFailure { sent: false, error })?;
        let resp = self
            .receive_within(silence)
            .map_err(|error| CallFailure { sent: true, error })?;
        self.check(id, resp)
            .map_err(|error| CallFailure { sent: true, error })
    }

    /// Send a request without waiting; returns its id. Responses come back
    /// in request order.
    pub fn send(&mut self, body: &RequestBody) -> Result<u64> {
        if self.broken {
            return Err(io_error(
                &self.addr,
                std::io::Error::new(ErrorKind::NotConnected, "connection already failed"),
            ));
        }
        let id = self.next_id;
        self.next_id += 1;
        let frame = codec::encode(&OutgoingRequest { id, body });
        std::io::Write::write_all(self.stream.get_mut(), &frame).map_err(|e| {
            self.broken = true;
            io_error(&self.addr, e)
        })?;
        Ok(id)
    }

    /// Receive the next response as it is, `Error` bodies included.
    pub fn receive(&mut self) -> Result<Response> {
        self.receive_within(self.read_timeout)
    }

    /// The next response, each read waiting at most `silence`, the whole
    /// reply at most the read timeout.
    fn receive_within(&mut self, silence: Option<Duration>) -> Result<Response> {
        self.limit_reads(silence)?;
        let mut reader = Until {
            inner: &mut self.stream,
            deadline: self.read_timeout.map(|t| (Instant::now() + t, t)),
            silence,
        };
        let body = codec::read_frame(&mut reader, self.max_frame).map_err(|e| {
            self.broken = true;
            ClientError::from_protocol(&self.addr, e)
        })?;
        direct::decode_response(&body).map_err(|e| {
            self.broken = true;
            ClientError::from_protocol(&self.addr, e)
        })
    }

    /// Make each read of the socket wait at most `limit` (one syscall, only
    /// when that changes).
    fn limit_reads(&mut self, limit: Option<Duration>) -> Result<()> {
        if self.socket_timeout != limit {
            if let Err(e) = self.stream.get_ref().set_read_timeout(limit) {
                self.broken = true;
                return Err(io_error(&self.addr, e));
            }
            self.socket_timeout = limit;
        }
        Ok(())
    }

    /// Match a response to the request `id` it answers.
    fn check(&mut self, id: u64, resp: Response) -> Result<Response> {
        match resp.body {
            ResponseBody::Error { error, message } => {
                log::debug!(
                    "{} answered request {id} with {error:?}: {message}",
                    self.addr
                );
                if resp.id != id || closes_connection(&error) {
                    self.broken = true;
                }
                Err(ClientError::from_wire(error))
            }
            _ if resp.id != id => {
                self.broken = true;
                Err(ClientError::Protocol {
                    addr: self.addr.clone(),
                    reason: format!("response id {} does not answer request {id}", resp.id),
                })
            }
            _ => Ok(resp),
        }
    }

    /// True when the connection can no longer carry a request: it failed
    /// before, or the server closed it (or sent something unasked) while it
    /// was idle. Checked before a commit so that a connection the server
    /// dropped long ago does not turn the commit's outcome into "unknown".
    pub fn is_stale(&mut self) -> bool {
        if self.broken || !self.stream.buffer().is_empty() {
            return true;
        }
        // One non-blocking peek (a single syscall on the commit path): an
        // idle, healthy connection has nothing to read.
        let sock = socket2::SockRef::from(self.stream.get_ref());
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        let peeked = sock.recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT);
        if !matches!(peeked, Err(ref e) if e.kind() == ErrorKind::WouldBlock) {
            self.broken = true;
        }
        self.broken
    }
}

/// Errors after which the server closes the connection.
fn closes_connection(e: &WireError) -> bool {
    matches!(
        e,
        WireError::BadRequest { .. }
            | WireError::FrameTooLarge { .. }
            | WireError::UnsupportedProtocol { .. }
            | WireError::HelloExpected
            | WireError::ShuttingDown
    )
}

/// The `type` tag of a response body.
pub(crate) fn response_type(body: &ResponseBody) -> &'static str {
    match body {
        ResponseBody::Hello { .. } => "hello",
        ResponseBody::Pong => "pong",
        ResponseBody::Node { .. } => "node",
        ResponseBody::Objects { .. } => "objects",
        ResponseBody::Root { .. } => "root",
        ResponseBody::Length { .. } => "length",
        ResponseBody::Elements { .. } => "elements",
        ResponseBody::Meta { .. } => "meta",
        ResponseBody::Committed { .. } => "committed",
        ResponseBody::Status(_) => "status",
        ResponseBody::Digest { .. } => "digest",
        ResponseBody::BackupState(_) => "backup_state",
        ResponseBody::BackupPull(_) => "backup_pull",
        ResponseBody::BackupChunk { .. } => "backup_chunk",
        ResponseBody::BackupPullDone { .. } => "backup_pull_done",
        ResponseBody::Records { .. } => "records",
        ResponseBody::RecordHash { .. } => "record_hash",
        ResponseBody::HandedOver { .. } => "handed_over",
        ResponseBody::TokenStatus { .. } => "token_status",
        ResponseBody::Replicated { .. } => "replicated",
        ResponseBody::Ok => "ok",
        ResponseBody::Error { .. } => "error",
    }
}

/// The error for a well-formed response of the wrong kind.
pub(crate) fn unexpected(addr: &str, expected: &str, got: &ResponseBody) -> ClientError {
    ClientError::Protocol {
        addr: addr.to_string(),
        reason: format!(
            "expected a `{expected}` response, got `{}`",
            response_type(got)
        ),
    }
}

/// The server's commit number carried by a response.
pub(crate) fn progress_of(resp: &Response) -> CommitNumber {
    match resp.body {
        ResponseBody::Committed { number, .. } => number.max(resp.commit),
        _ => resp.commit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Request;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::thread;

    /// A one-connection fake server: answers each request with `answer`.
    fn fake_server(
        answer: impl Fn(Request) -> Option<Response> + Send + 'static,
    ) -> (String, thread::JoinHandle<Vec<Request>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            while let Ok(body) = codec::read_frame(&mut s, DEFAULT_MAX_FRAME) {
                let req: Request = codec::decode(&body).unwrap();
                seen.push(req.clone());
                match answer(req) {
                    Some(resp) => s.write_all(&codec::encode(&resp)).unwrap(),
                    None => break,
                }
            }
            seen
        });
        (addr, handle)
    }

    /// A one-connection fake server that answers the hello, then hands
    /// the socket to `then`.
    fn greeting_server(
        then: impl FnOnce(std::net::TcpStream) + Send + 'static,
    ) -> (String, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let body = codec::read_frame(&mut s, DEFAULT_MAX_FRAME).unwrap();
            let req: Request = codec::decode(&body).unwrap();
            let resp = Response {
                id: req.id,
                commit: 0,
                body: hello_body(),
            };
            s.write_all(&codec::encode(&resp)).unwrap();
            then(s);
        });
        (addr, handle)
    }

    fn hello_body() -> ResponseBody {
        ResponseBody::Hello {
            protocol_version: PROTOCOL_VERSION,
            server_id: 7,
            repository_id: "r".into(),
            role: ServerRole::Primary,
            node: Node::default(),
            epoch: Epoch::initial(7),
        }
    }

    #[test]
    fn hello_then_calls_with_increasing_ids() {
        let (addr, server) = fake_server(|req| {
            let body = match req.body {
                RequestBody::Hello { .. } => hello_body(),
                RequestBody::Ping => ResponseBody::Pong,
                _ => ResponseBody::Error {
                    error: WireError::UnknownObject { oid: 9 },
                    message: "no".into(),
                },
            };
            Some(Response {
                id: req.id,
                commit: 5,
                body,
            })
        });
        let mut c = Connection::connect(&addr, SessionRole::Admin, &Default::default()).unwrap();
        assert_eq!(c.hello().server_id, 7);
        assert_eq!(c.hello().role, ServerRole::Primary);
        assert_eq!(c.call(RequestBody::Ping).unwrap().commit, 5);
        let err = c
            .call(RequestBody::Read {
                oid: 9,
                depth: 0,
                required_progress: None,
            })
            .unwrap_err();
        assert!(matches!(
            err,
            ClientError::Server(WireError::UnknownObject { oid: 9 })
        ));
        assert!(
            c.is_usable(),
            "an ordinary server error keeps the connection"
        );
        assert!(!c.is_stale());
        drop(c);
        let seen = server.join().unwrap();
        let ids: Vec<u64> = seen.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert!(matches!(
            &seen[0].body,
            RequestBody::Hello {
                protocol_version: PROTOCOL_VERSION,
                role: SessionRole::Admin,
                ..
            }
        ));
    }

    #[test]
    fn a_reply_trickling_in_a_byte_at_a_time_times_out_as_a_whole() {
        // Each byte comes well within the read timeout; the reply never
        // completes (the server gives up after 40 bytes, 8 s).
        let (addr, server) = greeting_server(|mut s| {
            let _ping = codec::read_frame(&mut s, DEFAULT_MAX_FRAME).unwrap();
            s.write_all(&1000u32.to_be_bytes()).unwrap();
            for _ in 0..40 {
                thread::sleep(Duration::from_millis(200));
                if s.write_all(&[0x90]).is_err() {
                    break;
                }
            }
        });
        let opts = ConnectOptions {
            read_timeout: Some(Duration::from_secs(1)),
            ..ConnectOptions::default()
        };
        let mut c = Connection::connect(&addr, SessionRole::Admin, &opts).unwrap();
        match c.call(RequestBody::Ping) {
            Err(ClientError::Io { source, .. }) => {
                assert_eq!(source.kind(), ErrorKind::TimedOut, "{source}");
                assert!(
                    source.to_string().contains("no complete reply within 1s"),
                    "{source}"
                );
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(!c.is_usable());
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn mismatched_id_is_a_protocol_error_and_breaks_the_connection() {
        let (addr, _server) = fake_server(|req| {
            let body = match req.body {
                RequestBody::Hello { .. } => hello_body(),
                _ => ResponseBody::Pong,
            };
            Some(Response {
                id: if req.id == 1 { 1 } else { 99 },
                commit: 0,
                body,
            })
        });
        let mut c =
            Connection::connect(&addr, SessionRole::Application, &Default::default()).unwrap();
        assert!(matches!(
            c.call(RequestBody::Ping),
            Err(ClientError::Protocol { .. })
        ));
        assert!(!c.is_usable());
        assert!(matches!(
            c.call(RequestBody::Ping),
            Err(ClientError::Io { .. })
        ));
    }

    #[test]
    fn closed_by_server_is_detected_as_stale_and_lost_reply_is_marked_sent() {
        let (addr, server) = fake_server(|req| match req.body {
            RequestBody::Hello { .. } => Some(Response {
                id: req.id,
                commit: 0,
                body: hello_body(),
            }),
            _ => None,
        });
        let mut c =
            Connection::connect(&addr, SessionRole::Application, &Default::default()).unwrap();
        assert!(!c.is_stale());
        match c.call_tracked(&RequestBody::Ping) {
            Err(CallFailure { sent, error }) => {
                assert!(sent);
                assert!(matches!(error, ClientError::Io { .. }), "{error:?}");
            }
            Ok(r) => panic!("unexpected {r:?}"),
        }
        server.join().unwrap();
        assert!(c.is_stale());
    }

    #[test]
    fn idle_connection_closed_by_server_is_stale() {
        let (addr, server) = greeting_server(|mut s| {
            let mut rest = Vec::new();
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = s.read_to_end(&mut rest);
        });
        let mut c =
            Connection::connect(&addr, SessionRole::Application, &Default::default()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !c.is_stale() {
            assert!(std::time::Instant::now() < deadline, "close never seen");
            thread::sleep(Duration::from_millis(5));
        }
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn a_request_by_reference_encodes_like_a_request() {
        let body = RequestBody::Read {
            oid: 3,
            depth: 1,
            required_progress: Some(9),
        };
        assert_eq!(
            codec::encode(&OutgoingRequest { id: 5, body: &body }),
            codec::encode(&Request { id: 5, body })
        );
    }

    #[test]
    fn refused_connection_is_a_network_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let err =
            Connection::connect(&addr, SessionRole::Application, &Default::default()).unwrap_err();
        assert!(matches!(err, ClientError::Io { .. }), "{err:?}");
        assert!(err.is_retryable());
    }
}
