//! The `Session` actor: one TCP connection, from accept to close.
//!
//! Socket I/O never runs inside a handler:
//!
//! * a reader future, spawned in the actor's context, reserves one slot of
//!   the outgoing queue, reads one frame
//!   (through a read buffer, so one small request costs one `recv`) and
//!   sends it to the actor as [`Inbound`], awaiting the reply before reading
//!   the next: requests are served in order and a client that stops reading
//!   its replies stops being read (at most `OUT_QUEUE` replies and about
//!   `QUEUE_BYTES` wait);
//! * a writer task owns the write half and writes queued replies, batching
//!   whatever is ready into one flush. When every sender is gone (the actor
//!   stopped), it writes what is left and shuts the socket down. A client
//!   that takes no reply bytes for `reply_timeout` is disconnected.
//!
//! The reader dies with the actor, except after an error reply that closes
//! the session: then its read half drains what the client still sends for
//! a moment, in a task of its own (`linger`), so that the close is no
//! reset, and only then tells the `Listener` the connection is gone (it
//! stays counted meanwhile: it holds a descriptor). The writer outlives the
//! actor just long enough to deliver the last replies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use log::{debug, info, warn};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::actors::busy_poll;
use crate::actors::controller::{Fatal, RequestShutdown};
use crate::actors::coordinator::QueueCommit;
use crate::actors::flush_policy::FlushPolicy;
use crate::actors::listener::{SaidHello, SessionClosed};
use crate::actors::session::dispatch::{After, Routed};
use crate::actors::storage::StorageActor;
use crate::protocol::codec::{self, read_frame_async};
use crate::protocol::direct;
use crate::protocol::{
    ProtocolError, Request, RequestBody, Response, ResponseBody, SessionRole, WireError,
};
use crate::types::CommitNumber;

/// Replies that may wait for a slow reader before the session stops reading.
const OUT_QUEUE: usize = 32;
/// Bytes of replies that may wait before the session stops reading (a
/// reply under way may add one more).
const QUEUE_BYTES: usize = 8 << 20;
/// How long a closing session waits for its last replies to be written.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// At shutdown a session answers every request that still reaches it
/// (`shutting_down`) and closes once it has been free to read for this long
/// without the client sending anything, or after `CLOSE_GRACE` at the
/// latest.
const CLOSE_QUIET: Duration = Duration::from_millis(100);
/// Longest drain of a client's input after an error reply closes its
/// session (see `linger`) ...
const LINGER_TIME: Duration = Duration::from_secs(2);
/// ... and most bytes drained (a whole frame at the default limit, and
/// more).
const LINGER_BYTES: u64 = 32 * 1024 * 1024;

/// Read-only settings every session needs.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    /// Application sessions served at once (admitted by the `Listener`).
    pub max_connections: usize,
    /// A connection silent past this long without a hello is closed.
    pub hello_timeout: Duration,
    /// A client that takes no reply bytes for this long is disconnected.
    pub reply_timeout: Duration,
    /// Largest request body accepted.
    pub max_frame: u64,
    /// The address this server is known by (status).
    pub advertise: String,
    pub flush: FlushPolicy,
    pub sync_replicas: u32,
    /// How long a read waits for a required progress before `Behind`.
    pub progress_wait: Duration,
}

/// What every session talks to. Shared read-only by all sessions.
pub struct SessionEnv {
    pub storage: Addr<StorageActor>,
    pub commits: Recipient<QueueCommit>,
    pub shutdown: Recipient<RequestShutdown>,
    pub fatal: Recipient<Fatal>,
    /// Backup jobs (admin requests, and the job shown in `status`).
    pub backup: Addr<crate::actors::backup::BackupActor>,
    /// The last applied commit number, published by the `StorageActor`.
    pub applied: watch::Receiver<CommitNumber>,
    pub settings: SessionSettings,
    /// This server's place in the node.
    pub node: Addr<crate::actors::supervisor::NodeSupervisor>,
    /// Role and primary, published by the `NodeSupervisor`.
    pub state: watch::Receiver<crate::actors::supervisor::ServerState>,
    /// Ids, restore mode, epoch and node, published by the `StorageActor`:
    /// a hello never waits for the storage thread.
    pub identity: watch::Receiver<crate::actors::storage::Identity>,
    /// Makes replicated records durable before they are acknowledged
    /// (`ack: durable`).
    pub flusher: Addr<crate::actors::commit_log::CommitLogActor>,
    /// Makes replicated records durable under this server's flush policy
    /// after they are acknowledged (`ack: applied`).
    pub durability: Recipient<crate::actors::NoteReplicated>,
    /// Waits until an applied commit is as durable and replicated as an
    /// acknowledged one (`commit_status`).
    pub acknowledgeable: Recipient<crate::actors::coordinator::AwaitAcknowledgeable>,
    /// The last durable commit, published by the `CommitLogActor`: what an
    /// `ack: applied` answer reports as durable.
    pub durable: watch::Receiver<CommitNumber>,
}

/// One connection; see the module doc.
pub struct Session {
    pub(super) id: u64,
    peer: SocketAddr,
    pub(super) env: Arc<SessionEnv>,
    registry: Recipient<SessionClosed>,
    /// Asked at hello whether the session is admitted (the listener counts
    /// sessions by role).
    pub(super) admission: Recipient<SaidHello>,
    stream: Option<TcpStream>,
    writer: Option<JoinHandle<()>>,
    /// The reader drains the client's input after the close (see
    /// `linger`) and reports the connection gone itself.
    lingering: bool,
    /// Set by a hello (before the listener admits it: no other request is
    /// read meanwhile, and the hello timeout no longer applies).
    pub(super) role: Option<SessionRole>,
    pub(super) client: String,
    close_reason: Option<String>,
    /// The request being answered (one at a time outside peer sessions)
    /// and its reply slot, so a shutdown can answer it `shutting_down`
    /// rather than drop it unanswered.
    in_flight: Option<InFlight>,
    /// Set by [`CloseSession`].
    shutting_down: Option<Closing>,
    /// Tells the reader to stop and hand its read half to `linger`.
    stop_reading: Option<oneshot::Sender<()>>,
    /// A request is being worked on: the reader waits for it before it
    /// reads the next.
    busy: bool,
}

type InFlightSlot = std::rc::Rc<std::cell::RefCell<Option<Slot>>>;

/// A request a shutdown may answer for its work: its id, its reply slot,
/// and the signal that drops the work (the reader waits for it).
struct InFlight {
    id: u64,
    slot: InFlightSlot,
    abandon: oneshot::Sender<()>,
}

/// A session being closed by a shutdown.
struct Closing {
    since: Instant,
    /// Since when the session has been free to read and heard nothing.
    quiet_since: Instant,
}

impl Session {
    pub fn new(
        id: u64,
        stream: TcpStream,
        peer: SocketAddr,
        env: Arc<SessionEnv>,
        registry: Recipient<SessionClosed>,
        admission: Recipient<SaidHello>,
    ) -> Self {
        Session {
            id,
            peer,
            env,
            registry,
            admission,
            stream: Some(stream),
            writer: None,
            lingering: false,
            role: None,
            client: String::new(),
            close_reason: None,
            in_flight: None,
            shutting_down: None,
            stop_reading: None,
            busy: false,
        }
    }

    /// The log line of an admitted hello.
    pub(super) fn opened(&self) -> String {
        format!(
            "session {} from {} opened as {} (client {:?})",
            self.id,
            self.peer,
            role_name(self.role),
            self.client
        )
    }

    /// Do what a reply asked for once it is queued.
    fn follow(&mut self, after: After) -> Flow {
        match after {
            After::Continue => Flow::Continue,
            After::Close(reason) => {
                self.closing(reason);
                Flow::Close
            }
            After::Shutdown { save } => {
                // Out of the listener's registry, this connection is not
                // closed with the others: it stays open until the process
                // exits, after the repository is closed and its lock
                // released, so the operator's `magma shutdown`, waiting for
                // the close, returns only once the server is really gone.
                self.registry.do_send(SessionClosed { id: self.id });
                self.env.shutdown.do_send(RequestShutdown {
                    save,
                    reason: format!("admin request from {}", self.peer),
                });
                Flow::Continue
            }
        }
    }

    /// Close once the reader has the answer that says so (`Flow::Close`):
    /// stopping here would drop that answer, and with it the reader's
    /// chance to drain the client's input (`linger`).
    fn closing(&mut self, reason: impl Into<String>) {
        self.close_reason.get_or_insert_with(|| reason.into());
    }

    /// The request being worked on is done: the reader reads again.
    fn done(&mut self) {
        self.busy = false;
        if let Some(closing) = &mut self.shutting_down {
            closing.quiet_since = Instant::now();
        }
    }

    fn close(&mut self, reason: impl Into<String>, ctx: &mut Context<Self>) {
        self.close_reason.get_or_insert_with(|| reason.into());
        ctx.stop();
    }
}

fn role_name(role: Option<SessionRole>) -> &'static str {
    match role {
        Some(SessionRole::Application) => "application",
        Some(SessionRole::Admin) => "admin",
        Some(SessionRole::Peer) => "peer",
        None => "no role yet",
    }
}

/// Write every queued frame, batching the ready ones into one flush.
async fn write_replies(
    half: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    peer: SocketAddr,
    queued: Arc<Queued>,
    stall: Duration,
) {
    let socket = Acked::of(&half);
    let mut w = BufWriter::new(half);
    let outcome = async {
        while let Some(frame) = rx.recv().await {
            let mut batch = frame.len();
            let mut res = timed(stall, &socket, w.write_all(&frame)).await;
            while res.is_ok() {
                match rx.try_recv() {
                    Ok(frame) => {
                        batch += frame.len();
                        res = timed(stall, &socket, w.write_all(&frame)).await;
                    }
                    Err(_) => break,
                }
            }
            res = res.and(timed(stall, &socket, w.flush()).await);
            queued.sent(batch);
            res?;
        }
        Ok::<(), std::io::Error>(())
    }
    .await;
    match outcome {
        Ok(()) => {
            let _ = w.shutdown().await;
        }
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            info!("{peer} took no reply bytes for {stall:?}: disconnecting");
        }
        Err(e) => debug!("writing to {peer} failed: {e}"),
    }
    // Wake a reader waiting for room: the queue is gone, not emptied.
    queued.room.notify_one();
}

/// A write during which the client takes no bytes for `stall` is an
/// error. A client that reads slowly but steadily (a secondary over a slow
/// link taking an 8 MiB glob) is served, however long the write takes.
///
/// Progress is read from the socket, not from the write: once the send
/// buffer is full, the kernel wakes a writer only after about a third of
/// it (up to 1.3 MiB) has drained, which can take a slow but steady reader
/// longer than `stall`. The socket is asked only when a write stalls (not
/// per reply), so a client that read before the write and then stopped is
/// given up to twice `stall`.
async fn timed(
    stall: Duration,
    socket: &Acked,
    io: impl std::future::Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    let mut io = std::pin::pin!(io);
    loop {
        match tokio::time::timeout(stall, &mut io).await {
            Ok(res) => return res,
            Err(_) if socket.advanced() => continue,
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
}

/// The bytes of a socket's stream its peer has acknowledged: they grow
/// while the client reads.
struct Acked {
    #[cfg_attr(
        not(all(target_os = "linux", any(target_env = "gnu", target_env = "musl"))),
        allow(dead_code)
    )]
    fd: std::os::fd::RawFd,
    /// As of the last `advanced`.
    seen: std::sync::atomic::AtomicU64,
}

impl Acked {
    fn of(half: &OwnedWriteHalf) -> Acked {
        use std::os::fd::AsRawFd;
        let stream: &TcpStream = half.as_ref();
        Acked {
            fd: stream.as_raw_fd(),
            seen: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Did the peer acknowledge bytes since the last call? Never where the
    /// platform cannot tell: a stall then ends the write.
    fn advanced(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        match self.bytes() {
            Some(now) if now > self.seen.load(Relaxed) => {
                self.seen.store(now, Relaxed);
                true
            }
            _ => false,
        }
    }

    fn bytes(&self) -> Option<u64> {
        // libc has tcpi_bytes_acked for glibc and musl Linux only.
        #[cfg(all(target_os = "linux", any(target_env = "gnu", target_env = "musl")))]
        {
            // SAFETY: tcp_info is plain integers, valid zeroed; the
            // descriptor belongs to the write half this session's writer
            // owns for as long as it calls this; the kernel writes at most
            // `len` bytes and says how many.
            let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let rc = unsafe {
                libc::getsockopt(
                    self.fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    (&mut info as *mut libc::tcp_info).cast(),
                    &mut len,
                )
            };
            let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
            (rc == 0 && len as usize >= needed).then_some(info.tcpi_bytes_acked)
        }
        #[cfg(not(all(target_os = "linux", any(target_env = "gnu", target_env = "musl"))))]
        {
            None
        }
    }
}

/// Bytes of replies queued for the writer, and a signal when it made room.
#[derive(Default)]
pub(super) struct Queued {
    bytes: std::sync::atomic::AtomicUsize,
    room: tokio::sync::Notify,
}

impl Queued {
    fn add(&self, n: usize) {
        self.bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn sent(&self, n: usize) {
        self.bytes
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        self.room.notify_one();
    }

    fn full(&self) -> bool {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed) > QUEUE_BYTES
    }
}

/// A place reserved in the outgoing queue for one reply.
pub struct Slot {
    permit: mpsc::OwnedPermit<Vec<u8>>,
    queued: Arc<Queued>,
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let stream = self.stream.take().expect("a session starts once");
        let _ = stream.set_nodelay(true);
        // A client that vanished without a FIN or RST (power lost, a NAT
        // forgetting the flow) would hold its session for ever: nothing
        // else times out an idle session after its hello.
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive()) {
            debug!("cannot set TCP keepalive on {}: {e}", self.peer);
        }
        let (rd, wr) = stream.into_split();
        // Buffered: a frame's length prefix and body (and often the next
        // frame of a pipelining client) come in with one read.
        let mut rd = BufReader::new(rd);
        let (tx, rx) = mpsc::channel(OUT_QUEUE);
        let queued = Arc::new(Queued::default());
        self.writer = Some(tokio::spawn(write_replies(
            wr,
            rx,
            self.peer,
            queued.clone(),
            self.env.settings.reply_timeout,
        )));
        let me = ctx.address();
        let limit = self.env.settings.max_frame;
        let (stop_reading, mut stop) = oneshot::channel();
        self.stop_reading = Some(stop_reading);
        // A future of this actor: stopping the session (shutdown, hello
        // timeout, eviction) drops it, and with it the queue's sender, so
        // the writer delivers what is queued and ends. Only after an error
        // reply that closes the session does the read half outlive the
        // actor, in a task of its own that drains the client's input (see
        // `linger`).
        async move {
            loop {
                let Some(slot) = reserve(&tx, &queued).await else {
                    return Ended::Closed("the connection cannot be written to");
                };
                // The writer gives up on a client that takes no reply bytes
                // (or on a broken connection) while we may be waiting for
                // a request that never comes: its end ends the session.
                let frame = tokio::select! {
                    frame = read_frame_async(&mut rd, limit) => Some(frame),
                    () = tx.closed() => return Ended::Closed("the replies could not be written"),
                    // A shutdown closing the session (see `CloseSession`).
                    Ok(()) = &mut stop => None,
                };
                let Some(frame) = frame else {
                    return Ended::Linger(rd);
                };
                busy_poll::note_activity();
                // The client is gone, or reading broke: nothing to drain.
                let gone = matches!(&frame, Err(ProtocolError::Closed | ProtocolError::Io(_)));
                let last = frame.is_err();
                match me.send(Inbound { frame, slot }).await {
                    Ok(Flow::Continue) if !last => {}
                    // The writer flushes the error reply and sends FIN once
                    // the sender is gone.
                    Ok(Flow::Close) if !gone => return Ended::Linger(rd),
                    _ => return Ended::Closed("closed"),
                }
            }
        }
        .into_actor(self)
        // Whatever ended the reading ends the session (the first reason
        // given is the one logged).
        .map(|ended, act, ctx| match ended {
            Ended::Closed(reason) => act.close(reason, ctx),
            Ended::Linger(mut rd) => {
                // Counted by the listener until the drain is over: it
                // holds a descriptor.
                act.lingering = true;
                let (registry, id) = (act.registry.clone(), act.id);
                tokio::spawn(async move {
                    linger(&mut rd).await;
                    registry.do_send(SessionClosed { id });
                });
                act.close("closed", ctx);
            }
        })
        .spawn(ctx);
        // A connection that never says hello would hold a descriptor for
        // ever (nothing else times an idle session out).
        let wait = self.env.settings.hello_timeout;
        ctx.run_later(wait, move |act, ctx| {
            if act.role.is_none() {
                act.close(format!("no hello within {wait:?}"), ctx);
            }
        });
        debug!("connection {} from {} accepted", self.id, self.peer);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        let reason = self.close_reason.as_deref().unwrap_or("closed");
        match self.role {
            Some(_) => info!(
                "session {} from {} ({}) closed: {reason}",
                self.id,
                self.peer,
                role_name(self.role)
            ),
            None => info!(
                "connection {} from {} closed before hello: {reason}",
                self.id, self.peer
            ),
        }
        // A lingering reader still holds the socket: it reports the end.
        if !self.lingering {
            self.registry.do_send(SessionClosed { id: self.id });
        }
    }
}

/// A place in the outgoing queue for the next reply, once the queue has
/// room (`None`: the writer is gone).
async fn reserve(tx: &mpsc::Sender<Vec<u8>>, queued: &Arc<Queued>) -> Option<Slot> {
    while queued.full() && !tx.is_closed() {
        queued.room.notified().await;
    }
    let permit = tx.clone().reserve_owned().await.ok()?;
    Some(Slot {
        permit,
        queued: queued.clone(),
    })
}

/// After an error reply that closes the session: read and drop what the
/// client still sends, until it closes, for at most [`LINGER_TIME`] and
/// [`LINGER_BYTES`]. Closing a socket with unread input makes the kernel
/// answer with a reset, which can destroy the error reply on its way and
/// fail a client still writing (one that sent a whole oversized frame at
/// once gets "broken pipe" instead of `frame_too_large`).
async fn linger<R: tokio::io::AsyncBufRead + Unpin>(rd: &mut R) {
    use tokio::io::AsyncBufReadExt;
    let mut drained = 0u64;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        // Through the read buffer the session has anyway: no more memory.
        while drained < LINGER_BYTES {
            let n = match rd.fill_buf().await {
                Ok([]) | Err(_) => break,
                Ok(bytes) => bytes.len(),
            };
            rd.consume(n);
            drained += n as u64;
        }
    })
    .await;
}

/// How the reader ended: the session closes, or it closes and the read
/// half drains the client's input first (see `linger`).
enum Ended {
    Closed(&'static str),
    Linger(BufReader<tokio::net::tcp::OwnedReadHalf>),
}

/// TCP keepalive of every accepted connection: probes after 60 s idle,
/// every 10 s, 6 unanswered ones close it (a dead client is noticed within
/// two minutes).
pub fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6)
}

/// Whether the reader goes on after a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close,
}

/// One frame read from the socket (or why reading stopped), with the
/// queue slot its reply goes into. Sender: the session's own reader.
#[derive(Message)]
#[rtype(result = "Flow")]
pub struct Inbound {
    pub frame: Result<Vec<u8>, ProtocolError>,
    pub slot: Slot,
}

/// Most bytes of client-chosen text quoted back in a log line or an error.
pub(crate) const MAX_ECHO: usize = 256;

/// `text` cut to at most `max` bytes (on a character boundary), saying so.
pub(crate) fn clipped(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

/// Just enough of a request to answer one that does not decode.
#[derive(serde::Deserialize)]
struct IdOnly {
    id: u64,
}

/// The id of a request that is answered without being decoded (refused,
/// or at shutdown), 0 when even that cannot be read.
fn request_id(body: &[u8]) -> u64 {
    rmp_serde::from_slice::<IdOnly>(body).map_or(0, |r| r.id)
}

pub(super) fn error_body(error: WireError) -> ResponseBody {
    ResponseBody::Error {
        message: error.to_string(),
        error,
    }
}

/// Encode one reply into its slot, stamped with the current commit.
fn reply(env: &SessionEnv, slot: Slot, id: u64, body: ResponseBody) {
    let mut commit = *env.applied.borrow();
    if let ResponseBody::Committed { number, .. } = &body {
        commit = commit.max(*number);
    }
    let frame = codec::encode(&Response { id, commit, body });
    slot.queued.add(frame.len());
    slot.permit.send(frame);
}

impl Handler<Inbound> for Session {
    type Result = ResponseActFuture<Self, Flow>;

    fn handle(&mut self, msg: Inbound, ctx: &mut Context<Self>) -> Self::Result {
        let slot = msg.slot;
        let body = match msg.frame {
            Ok(body) => body,
            Err(ProtocolError::Closed) => {
                self.closing("closed by the client");
                return Box::pin(fut::ready(Flow::Close));
            }
            Err(ProtocolError::FrameTooLarge { size, limit }) => {
                warn!(
                    "session {} from {}: frame of {size} bytes over the limit of {limit}; closing",
                    self.id, self.peer
                );
                reply(
                    &self.env,
                    slot,
                    0,
                    error_body(WireError::FrameTooLarge { size, limit }),
                );
                self.closing("frame too large");
                return Box::pin(fut::ready(Flow::Close));
            }
            Err(e) => {
                self.closing(format!("read failed: {e}"));
                return Box::pin(fut::ready(Flow::Close));
            }
        };
        if let Some(closing) = &mut self.shutting_down {
            // Not started, so truly not applied: the client goes elsewhere
            // with a definite answer instead of a closed connection.
            closing.quiet_since = Instant::now();
            let id = request_id(&body);
            reply(&self.env, slot, id, error_body(WireError::ShuttingDown));
            return Box::pin(fut::ready(Flow::Continue));
        }
        if !direct::items_within(&body, direct::MAX_ITEMS) {
            // Decoding would build a tree of them on this event loop.
            let id = request_id(&body);
            reply(
                &self.env,
                slot,
                id,
                error_body(WireError::BadRequest {
                    reason: format!(
                        "a request holds at most {} MessagePack items",
                        direct::MAX_ITEMS
                    ),
                }),
            );
            self.closing("too many items in a request");
            return Box::pin(fut::ready(Flow::Close));
        }
        let request: Request = match direct::decode_request(&body) {
            Ok(r) => r,
            Err(e) => {
                let id = request_id(&body);
                // The text can quote what the client sent (an unknown
                // `type` of megabytes): bounded, in the log and the reply.
                let reason = clipped(&e.to_string(), MAX_ECHO);
                warn!(
                    "session {} from {}: undecodable request: {reason}; closing",
                    self.id, self.peer
                );
                reply(
                    &self.env,
                    slot,
                    id,
                    error_body(WireError::BadRequest { reason }),
                );
                self.closing("undecodable request");
                return Box::pin(fut::ready(Flow::Close));
            }
        };
        let id = request.id;
        // Only requests that change nothing may be answered by a shutdown:
        // `shutting_down` says "nothing was applied", and a commit, a
        // removal or a backup may complete after the session is gone.
        let answerable_at_shutdown = matches!(
            request.body,
            RequestBody::Ping
                | RequestBody::Read { .. }
                | RequestBody::ReadRoot { .. }
                | RequestBody::GetMeta { .. }
                | RequestBody::CollectionLength { .. }
                | RequestBody::CollectionRange { .. }
                | RequestBody::GetNode
                | RequestBody::Status
                | RequestBody::Digest
                | RequestBody::BackupStatus
        );
        match self.route(request.body) {
            Routed::Now(body, after) => {
                reply(&self.env, slot, id, *body);
                Box::pin(fut::ready(self.follow(after)))
            }
            Routed::LaterThen(work) => {
                self.busy = true;
                Box::pin(
                    fut::wrap_future(work).map(move |(body, after), act: &mut Self, _| {
                        act.done();
                        reply(&act.env, slot, id, body);
                        act.follow(after)
                    }),
                )
            }
            Routed::Later(work) => {
                let env = self.env.clone();
                let cell: InFlightSlot = std::rc::Rc::new(std::cell::RefCell::new(Some(slot)));
                let abandoned = answerable_at_shutdown.then(|| {
                    let (abandon, abandoned) = oneshot::channel();
                    self.in_flight = Some(InFlight {
                        id,
                        slot: cell.clone(),
                        abandon,
                    });
                    abandoned
                });
                // Once a shutdown answered it, its work (a read waiting
                // for a progress, say) is dropped: the reader goes on to
                // whatever the client sent behind it.
                let work = async move {
                    match abandoned {
                        Some(abandoned) => tokio::select! {
                            body = work => Some(body),
                            Ok(()) = abandoned => None,
                        },
                        None => Some(work.await),
                    }
                };
                self.busy = true;
                Box::pin(fut::wrap_future(work).map(move |body, act: &mut Self, _| {
                    act.done();
                    act.in_flight = None;
                    // Unless a shutdown answered it already.
                    if let (Some(body), Some(slot)) = (body, cell.borrow_mut().take()) {
                        reply(&env, slot, id, body);
                    }
                    Flow::Continue
                }))
            }
            Routed::Detached(work) => {
                let env = self.env.clone();
                ctx.spawn(fut::wrap_future(work).map(move |body, _: &mut Self, _| {
                    reply(&env, slot, id, body);
                }));
                Box::pin(fut::ready(Flow::Continue))
            }
        }
    }
}

/// Close a connection that has not said hello: a newer one takes its place
/// in the pre-hello pool. Sender: the `Listener`. A session whose hello is
/// already under way stays (the listener counts it by its role then).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseSilent;

impl Handler<CloseSilent> for Session {
    type Result = ();

    fn handle(&mut self, _: CloseSilent, ctx: &mut Context<Self>) {
        if self.role.is_none() {
            self.close("no hello yet, and newer connections needed its place", ctx);
        }
    }
}

/// Close the connection once its queued replies are written (bounded wait).
/// Until then every request that arrives is answered `shutting_down`: a
/// request the client sent just as the server stopped reading would
/// otherwise meet a closed connection, and a commit's outcome would look
/// unknown although it was never started. The session closes once the
/// client has been quiet for `CLOSE_QUIET` while the session was free to
/// read (or after `CLOSE_GRACE`).
/// Sender: the `Listener` at shutdown.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseSession;

impl Handler<CloseSession> for Session {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: CloseSession, ctx: &mut Context<Self>) -> Self::Result {
        // A request still being worked on (a read waiting for progress, a
        // status) is dropped with the actor: answer it first.
        if let Some(InFlight { id, slot, abandon }) = self.in_flight.take() {
            if let Some(slot) = slot.borrow_mut().take() {
                reply(&self.env, slot, id, error_body(WireError::ShuttingDown));
            }
            let _ = abandon.send(());
        }
        let now = Instant::now();
        self.shutting_down = Some(Closing {
            since: now,
            quiet_since: now,
        });
        ctx.run_interval(CLOSE_QUIET / 5, |act, ctx| {
            let Some(closing) = &act.shutting_down else {
                return;
            };
            if closing.since.elapsed() >= CLOSE_GRACE {
                act.close("server shutting down", ctx);
            } else if !act.busy && closing.quiet_since.elapsed() >= CLOSE_QUIET {
                act.close_reason
                    .get_or_insert_with(|| "server shutting down".into());
                // The reader hands its read half to `linger`: the writer
                // sends FIN after the last reply, and what the client
                // still sends is drained, not met with a reset.
                match act.stop_reading.take() {
                    Some(stop) => {
                        let _ = stop.send(());
                    }
                    // Asked already (the grace bounds it), or no reader.
                    None if act.stream.is_some() => act.close("server shutting down", ctx),
                    None => {}
                }
            }
        });
        let writer = self.writer.take();
        Box::pin(async move {
            if let Some(w) = writer {
                let _ = tokio::time::timeout(CLOSE_GRACE * 2, w).await;
            }
        })
    }
}
