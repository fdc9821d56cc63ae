//! Start and stop one `magma-server`: configuration, repository opening,
//! wiring of the actors, signals.
//!
//! Three ways to run a server:
//!
//! * [`run`]: what the binary does. Builds an actix `System`, serves until
//!   SIGTERM/SIGINT (graceful: stop accepting, drain commits, final
//!   checkpoint, exit 0), an admin `shutdown`, or a fatal error (`Err`).
//! * [`Server::start`] inside a running actix `System` (e.g. `#[actix::test]`):
//!   returns once the server listens; [`Server::wait`] resolves when it
//!   stopped, [`Server::shutdown_handle`] asks it to stop.
//! * [`spawn`]: the same on a thread of its own, for tests whose client
//!   blocks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::{anyhow, bail, Context as _};
use log::{info, warn};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::actors::backup::Pacing;
use crate::actors::broadcast::{LinkSettings, SYNC_IN_FLIGHT};
use crate::actors::busy_poll;
use crate::actors::supervisor::{NodeSupervisor, ServerState, SupervisorParts};
use crate::actors::{
    BackupActor, CommitCoordinator, CommitLogActor, Controlled, Controller, Identity, Listener,
    Outcome, RequestShutdown, SessionEnv, SessionSettings, StorageActor,
};
use crate::protocol::codec::DEFAULT_MAX_FRAME;
use crate::protocol::ReplicateAck;
use crate::storage::{RepoOptions, Repository, StorageError};
use crate::types::{CommitNumber, RepositoryId};

pub use crate::actors::backup::DEFAULT_BUSY_RATE as DEFAULT_BACKUP_BUSY_RATE;
pub use crate::actors::broadcast::ASYNC_COALESCE as DEFAULT_ASYNC_BATCH_DELAY;
pub use crate::actors::busy_poll::DEFAULT_WINDOW as DEFAULT_BUSY_POLL;
/// Longest `busy_poll` accepted, in microseconds.
pub const MAX_BUSY_POLL_US: u64 = 10_000;

/// Longest `async_batch_delay` accepted, in microseconds: beyond it the lag
/// it adds would rival the replica timeout.
pub const MAX_ASYNC_BATCH_DELAY_US: u64 = 100_000;
pub use crate::actors::{FlushPolicy, FlushPolicyError};

/// Default `--listen` address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:51969";
/// Default `--dir`.
pub const DEFAULT_DIR: &str = "./magma-data";
/// Default `--replica-timeout`.
pub const DEFAULT_REPLICA_TIMEOUT: Duration = Duration::from_millis(2000);
/// How long a read waits for a required progress before answering `behind`.
pub const PROGRESS_WAIT: Duration = Duration::from_secs(1);
/// Default `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Admin and peer sessions served at once, besides the applications' limit
/// (an operator and the node's own links get in while applications are
/// turned away).
pub const RESERVED_CONNECTIONS: usize = 64;
/// Connections that have not said hello yet, kept apart from both: when
/// more arrive, the oldest silent one is closed, so idle sockets can never
/// crowd out sessions that did say hello. Connections beyond all three are
/// closed unread.
pub const PRE_HELLO_CONNECTIONS: usize = 64;
/// File descriptors the server needs besides client connections: open
/// collections (at most 256, two files each), log segments and their
/// readers, data files, backup and pull files, links to peers, the
/// runtime's own (epoll, eventfds per thread), with room to spare.
const FDS_FOR_STORAGE: u64 = 1024;
/// The least of it: 256 collections of two files, plus the log, data
/// files, peer links and the runtime's own.
const MIN_FDS_FOR_STORAGE: u64 = 640;

/// Everything a server is started with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Repository directory; created as a new repository if absent or empty.
    pub dir: PathBuf,
    /// `host:port` to listen on (port 0 picks a free port).
    pub listen: String,
    /// The address members and clients use; default: the bound address.
    pub advertise: Option<String>,
    pub flush: FlushPolicy,
    /// Secondaries that must hold a commit durably before it is
    /// acknowledged (at most as many as the node has; 0: asynchronous).
    pub sync_replicas: u32,
    /// With `sync_replicas` 0: how long a batch for a secondary may wait
    /// for more records before it is sent (zero: as soon as the link is
    /// free). Longer means fewer, larger batches (less CPU and fewer fsyncs
    /// on both servers) for more lag.
    pub async_batch_delay: Duration,
    /// Follow this primary (beWarmBackupFor) instead of the one the
    /// repository's node names.
    pub primary: Option<String>,
    /// With an empty `dir`: pull a backup from this server over the
    /// protocol, then catch up and join its node.
    pub join: Option<String>,
    /// Largest request frame body accepted, in bytes.
    pub max_frame: u64,
    /// How often the repository is asked whether a checkpoint is due.
    pub checkpoint_interval: Duration,
    /// Most bytes per second a backup copies or serves (`None`: no limit);
    /// a request may ask for less.
    pub backup_rate: Option<u64>,
    /// Most bytes per second a backup copies or serves while commits are
    /// flowing (`None`: never yield to them); `backup_rate` still applies.
    pub backup_busy_rate: Option<u64>,
    /// A secondary that does not acknowledge (or cannot be reached) for this
    /// long is checked and, if unreachable, removed from the node; a
    /// secondary that hears nothing from its primary for this long re-syncs.
    pub replica_timeout: Duration,
    /// Bound on the commit log kept for catching-up secondaries beyond the
    /// last checkpoint; a secondary further behind must start from a new
    /// backup.
    pub max_log_bytes: u64,
    /// Size at which a new commit-log segment starts.
    pub log_segment_bytes: u64,
    /// Start even if the header's commit-log segment is missing (see
    /// `RepoOptions::accept_missing_log`).
    pub accept_missing_log: bool,
    /// Application connections served at once; more are told `unavailable`
    /// at their hello (admin and peer sessions have a reserve beyond it).
    /// Lowered at start to what the file-descriptor limit allows.
    pub max_connections: usize,
    /// A connection that has not said hello within this long is closed.
    pub hello_timeout: Duration,
    /// A client that takes no reply bytes for this long is disconnected
    /// (its queued replies are dropped).
    pub reply_timeout: Duration,
    /// After activity, the event loop keeps polling for this long instead
    /// of sleeping (zero: never); see [`crate::actors::busy_poll`].
    pub busy_poll: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dir: PathBuf::from(DEFAULT_DIR),
            listen: DEFAULT_LISTEN.into(),
            advertise: None,
            flush: FlushPolicy::Group,
            sync_replicas: 1,
            async_batch_delay: DEFAULT_ASYNC_BATCH_DELAY,
            primary: None,
            join: None,
            max_frame: DEFAULT_MAX_FRAME,
            checkpoint_interval: Duration::from_secs(5),
            backup_rate: None,
            backup_busy_rate: Some(DEFAULT_BACKUP_BUSY_RATE),
            replica_timeout: DEFAULT_REPLICA_TIMEOUT,
            max_log_bytes: RepoOptions::default().max_log_bytes,
            log_segment_bytes: RepoOptions::default().segment_bytes,
            accept_missing_log: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            hello_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(60),
            busy_poll: DEFAULT_BUSY_POLL,
        }
    }
}

impl Config {
    fn validate(&self) -> anyhow::Result<()> {
        if self.primary.is_some() && self.join.is_some() {
            bail!("--primary and --join exclude each other");
        }
        if self.replica_timeout.is_zero() {
            bail!("--replica-timeout-ms must be positive");
        }
        if self.async_batch_delay > Duration::from_micros(MAX_ASYNC_BATCH_DELAY_US) {
            bail!(
                "--async-batch-delay-us {}: at most {MAX_ASYNC_BATCH_DELAY_US}",
                self.async_batch_delay.as_micros()
            );
        }
        if self.busy_poll > Duration::from_micros(MAX_BUSY_POLL_US) {
            bail!(
                "--busy-poll-us {}: at most {MAX_BUSY_POLL_US}",
                self.busy_poll.as_micros()
            );
        }
        if self.max_frame == 0 || self.max_frame > u32::MAX as u64 {
            bail!(
                "--max-frame {}: must be between 1 and {} bytes",
                self.max_frame,
                u32::MAX
            );
        }
        if self.max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        if self.hello_timeout.is_zero() || self.reply_timeout.is_zero() {
            bail!("the hello and reply timeouts must be positive");
        }
        if self.checkpoint_interval.is_zero() {
            bail!("--checkpoint-interval-ms must be positive");
        }
        if self.backup_rate == Some(0) {
            bail!("--backup-rate must be at least 1 byte per second");
        }
        if self.backup_busy_rate == Some(0) {
            bail!("the backup busy rate must be at least 1 byte per second (never yielding is None, --backup-busy-rate 0)");
        }
        Ok(())
    }
}

/// Raise the soft limit on open files to the hard limit; returns the soft
/// limit now in force. Running out of descriptors would fail the storage
/// engine's next file operation, which is fatal.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// The connection limit the descriptor limit `fds` allows: application
/// connections, the admin and peer reserve, the pre-hello pool and the
/// storage engine's files must fit.
fn connection_limit(wanted: usize, fds: u64) -> usize {
    // Under a small limit the server's own share shrinks too, but never
    // below what its collection cache alone may hold open, plus a margin.
    let own = FDS_FOR_STORAGE.min(fds / 2).max(MIN_FDS_FOR_STORAGE);
    let others = (RESERVED_CONNECTIONS + PRE_HELLO_CONNECTIONS) as u64;
    let room = fds.saturating_sub(own + others) as usize;
    if wanted > room {
        let limit = room.max(1);
        warn!(
            "--max-connections {wanted} lowered to {limit}: the open-file limit is {fds} \
             (raise it with ulimit -n)"
        );
        limit
    } else {
        wanted
    }
}

/// Asks a running server to stop. Cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    controller: Recipient<RequestShutdown>,
}

impl ShutdownHandle {
    /// Graceful stop; `save` writes a final checkpoint.
    pub fn shutdown(&self, save: bool) {
        self.request(save, "requested in-process");
    }

    fn request(&self, save: bool, reason: &str) {
        self.controller.do_send(RequestShutdown {
            save,
            reason: reason.into(),
        });
    }
}

/// A started server: listening, inside the current actix `System`.
pub struct Server {
    local_addr: SocketAddr,
    repository_id: RepositoryId,
    commit: CommitNumber,
    role: &'static str,
    stop: ShutdownHandle,
    outcome: oneshot::Receiver<Outcome>,
    /// Tests hold the storage thread through it.
    #[cfg(test)]
    storage: Addr<StorageActor>,
}

impl Server {
    /// Open (or create) the repository, start the actors and listen. Must
    /// run inside an actix `System`.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        config.validate()?;
        let socket = TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = socket.local_addr()?;
        let advertise = config
            .advertise
            .clone()
            .unwrap_or_else(|| local_addr.to_string());

        if let Some(primary) = &config.primary {
            if is_fresh(&config.dir)? {
                // Creating a repository here would start a new, unrelated
                // primary: most likely a mistyped --dir.
                bail!(
                    "--primary {primary}: {} holds no repository; start on a backup \
                     (magma backup), or use --join {primary} to pull one",
                    config.dir.display()
                );
            }
        }
        if let Some(from) = config.join.clone() {
            let dir = &config.dir;
            if is_fresh(dir)? || dir.join(crate::pull::STATE_FILE).exists() {
                // Fresh, or a pull cut short: pull::run continues it.
                pull_for_join(&from, dir).await?;
            } else if let Some(why) = crate::storage::backup::read_marker(dir) {
                bail!(
                    "--join {from}: {} holds an incomplete or failed copy; remove the \
                     directory to pull afresh. It says: {}",
                    dir.display(),
                    why.trim()
                );
            } else {
                info!(
                    "--join {from}: {} already holds a repository; opening it",
                    config.dir.display()
                );
            }
        }
        let marker = config.dir.join(crate::storage::backup::INCOMPLETE_FILE);
        let pulling = config.dir.join(crate::pull::STATE_FILE).exists();
        // A pull that crashed while sealing has no marker any more, but still
        // its state and no MANIFEST: as unfinished as one with the marker.
        if marker.exists() || pulling {
            // A backup that was aborted, failed its verification or was cut
            // by a crash may hold a header and still be damaged or partial.
            let says = crate::storage::backup::read_marker(&config.dir).unwrap_or_else(|| {
                if marker.exists() {
                    "(unreadable)".into()
                } else {
                    format!("(nothing; {} is there)", crate::pull::STATE_FILE)
                }
            });
            let what_to_do = if pulling {
                "it is an interrupted pull: run the same `magma backup --pull` (or \
                 `magma-server --join`) again to finish it"
            } else {
                "remove it and take the backup again"
            };
            bail!(
                "{} is an incomplete or failed backup copy, not a repository to serve; \
                 {what_to_do}. Its {} says: {}",
                config.dir.display(),
                crate::storage::backup::INCOMPLETE_FILE,
                says.trim()
            );
        }
        let dir = config.dir.clone();
        let addr = advertise.clone();
        let opts = RepoOptions {
            max_log_bytes: config.max_log_bytes,
            segment_bytes: config.log_segment_bytes,
            accept_missing_log: config.accept_missing_log,
            ..RepoOptions::default()
        };
        let (repo, identity) = actix_rt::task::spawn_blocking(move || {
            let mut repo = open_or_create(&dir, &addr, opts)?;
            let identity = Identity::of(&mut repo)?;
            anyhow::Ok((repo, identity))
        })
        .await
        .map_err(|e| anyhow!("opening the repository panicked: {e}"))??;
        let info = repo.info();
        if let (Some(primary), false) = (&config.primary, info.restore_mode) {
            warn!(
                "--primary {primary} ignored: {} is not in restore mode (it was a primary; \
                 it asks its node's members on start instead)",
                config.dir.display()
            );
        }
        let role = if info.restore_mode {
            "restore"
        } else {
            "primary"
        };

        let (applied_tx, applied_rx) = watch::channel(info.last_commit);
        let (state_tx, state_rx) = watch::channel(ServerState::starting());
        let (identity_tx, identity_rx) = watch::channel(identity);
        let storage = StorageActor::start(repo, applied_tx, identity_tx, config.busy_poll);
        #[cfg(test)]
        let storage_for_tests = storage.clone();
        let (durable_tx, durable_rx) = watch::channel(info.last_commit);
        let log = CommitLogActor::start(durable_tx, config.busy_poll);
        let link_settings = LinkSettings {
            replica_timeout: config.replica_timeout,
            call_timeout: config.replica_timeout.max(Duration::from_secs(2)),
            coalesce: (config.sync_replicas == 0 && !config.async_batch_delay.is_zero())
                .then_some(config.async_batch_delay),
            max_in_flight: if config.sync_replicas == 0 {
                1
            } else {
                SYNC_IN_FLIGHT
            },
            ack: if config.sync_replicas == 0 {
                ReplicateAck::Applied
            } else {
                ReplicateAck::Durable
            },
        };
        let follow = config.primary.clone();
        let settings = SessionSettings {
            max_connections: connection_limit(config.max_connections, raise_fd_limit()),
            hello_timeout: config.hello_timeout,
            reply_timeout: config.reply_timeout,
            max_frame: config.max_frame,
            advertise,
            flush: config.flush,
            sync_replicas: config.sync_replicas,
            progress_wait: PROGRESS_WAIT,
        };
        // This event loop runs the sessions and the commit coordinator.
        busy_poll::start(config.busy_poll);
        let (outcome_tx, outcome) = oneshot::channel();
        let controller = Controller::create(move |ctx| {
            let me = ctx.address();
            let coordinator = CommitCoordinator::new(
                storage.clone().recipient(),
                log.clone().recipient(),
                me.clone().recipient(),
                config.flush,
                info.last_commit,
            )
            .with_sync_replicas(config.sync_replicas)
            .start();
            let node = NodeSupervisor::new(SupervisorParts {
                storage: storage.clone(),
                flusher: log.clone(),
                commits: coordinator.clone(),
                state: state_tx,
                applied: applied_rx.clone(),
                durable: durable_rx.clone(),
                advertise: settings.advertise.clone(),
                dir: config.dir.clone(),
                follow,
                settings: link_settings,
                fatal: me.clone().recipient(),
            })
            .start();
            let backup = BackupActor::new(
                storage.clone().recipient(),
                storage.clone().recipient(),
                me.clone().recipient(),
                config.dir.clone(),
                settings.advertise.clone(),
                Pacing {
                    rate: config.backup_rate,
                    busy_rate: config.backup_busy_rate,
                    applied: applied_rx.clone(),
                },
            )
            .start();
            let env = Arc::new(SessionEnv {
                backup: backup.clone(),
                storage: storage.clone(),
                commits: coordinator.clone().recipient(),
                durability: coordinator.clone().recipient(),
                acknowledgeable: coordinator.clone().recipient(),
                durable: durable_rx,
                shutdown: me.clone().recipient(),
                fatal: me.recipient(),
                applied: applied_rx,
                settings,
                node: node.clone(),
                state: state_rx,
                identity: identity_rx,
                flusher: log,
            });
            let listener = Listener::new(socket, local_addr, env).start();
            Controller::new(
                Controlled {
                    storage_checkpoint: storage.clone().recipient(),
                    storage_close: storage.recipient(),
                    drain: coordinator.recipient(),
                    stop_accepting: listener.clone().recipient(),
                    close_sessions: listener.recipient(),
                    stop_backups: backup.recipient(),
                    leave_node: node.recipient(),
                },
                config.checkpoint_interval,
                outcome_tx,
            )
        });
        let server = Server {
            local_addr,
            repository_id: info.repository_id,
            commit: info.last_commit,
            role,
            stop: ShutdownHandle {
                controller: controller.recipient(),
            },
            outcome,
            #[cfg(test)]
            storage: storage_for_tests,
        };
        info!("{}", server.ready_line());
        Ok(server)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn repository_id(&self) -> RepositoryId {
        self.repository_id
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.stop.clone()
    }

    /// `magma-server listening on ADDR (repository ID, commit N, role R)`.
    pub fn ready_line(&self) -> String {
        format!(
            "magma-server listening on {} (repository {}, commit {}, role {})",
            self.local_addr, self.repository_id, self.commit, self.role
        )
    }

    /// Resolves once the server has stopped and released its repository;
    /// `Err` if it stopped because of a fatal error.
    pub async fn wait(self) -> anyhow::Result<()> {
        match self.outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(anyhow!("stopped after a fatal error: {reason}")),
            Err(_) => Err(anyhow!("the server's controller vanished")),
        }
    }
}

/// `--join`: pull a full backup of the node from `from` into `dir` (empty
/// or absent), the way `magma backup --pull` does. The server then starts
/// on it like on any backup: it catches up and joins.
async fn pull_for_join(from: &str, dir: &Path) -> anyhow::Result<()> {
    info!("--join {from}: pulling a backup into {}", dir.display());
    if dir.exists() && is_fresh(dir)? {
        std::fs::remove_dir(dir)
            .with_context(|| format!("cannot use {} for --join", dir.display()))?;
    }
    let opts = crate::pull::PullOptions {
        server: from.to_string(),
        to: dir.to_path_buf(),
        rate: None,
        progress: indicatif::ProgressBar::hidden(),
    };
    let summary = actix_rt::task::spawn_blocking(move || crate::pull::run(&opts))
        .await
        .map_err(|e| anyhow!("pulling the backup panicked: {e}"))?
        .map_err(|e| anyhow!("--join {from}: pulling a backup failed: {e}"))?;
    info!("{summary}");
    Ok(())
}

fn is_fresh(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
}

fn open_or_create(dir: &Path, advertise: &str, opts: RepoOptions) -> anyhow::Result<Repository> {
    if is_fresh(dir)? {
        let server_id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        let repo = Repository::create_with(dir, server_id, advertise, opts)
            .with_context(|| format!("cannot create a repository in {}", dir.display()))?;
        info!(
            "created repository {} in {} (server {server_id:x})",
            repo.info().repository_id,
            dir.display()
        );
        return Ok(repo);
    }
    match Repository::open_with(dir, opts) {
        Ok(repo) => Ok(repo),
        Err(e @ StorageError::Locked(_)) => {
            Err(anyhow!("{e} (is another magma-server serving it?)"))
        }
        Err(e) => Err(anyhow!(
            "cannot open the repository in {}: {e}",
            dir.display()
        )),
    }
}

#[cfg(unix)]
async fn signalled() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[cfg(not(unix))]
async fn signalled() -> std::io::Result<&'static str> {
    tokio::signal::ctrl_c().await?;
    Ok("Ctrl-C")
}

/// Run a server until it is stopped (see the module doc). Prints the ready
/// line on stdout once it listens.
pub fn run(config: Config) -> anyhow::Result<()> {
    System::new().block_on(async move {
        let server = Server::start(config).await?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", server.ready_line());
            let _ = out.flush();
        }
        let stop = server.shutdown_handle();
        actix_rt::spawn(async move {
            match signalled().await {
                Ok(sig) => stop.request(true, &format!("received {sig}")),
                Err(e) => {
                    warn!("cannot watch for signals: {e}");
                    return;
                }
            }
            if let Ok(sig) = signalled().await {
                warn!("received {sig} again: exiting at once");
                std::process::exit(130);
            }
        });
        server.wait().await
    })
}

/// A server running on a thread of its own (see [`spawn`]).
pub struct ServerThread {
    local_addr: SocketAddr,
    repository_id: RepositoryId,
    stop: ShutdownHandle,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
    #[cfg(test)]
    storage: Addr<StorageActor>,
}

/// What a started server thread reports back.
struct Started {
    local_addr: SocketAddr,
    repository_id: RepositoryId,
    stop: ShutdownHandle,
    #[cfg(test)]
    storage: Addr<StorageActor>,
}

impl ServerThread {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn repository_id(&self) -> RepositoryId {
        self.repository_id
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.stop.clone()
    }

    /// Ask for a graceful stop and wait for it.
    pub fn shutdown(self, save: bool) -> anyhow::Result<()> {
        self.stop.shutdown(save);
        self.join()
    }

    /// Wait until the server stops by itself (admin shutdown, fatal error).
    pub fn join(self) -> anyhow::Result<()> {
        self.thread
            .join()
            .map_err(|_| anyhow!("the server thread panicked"))?
    }
}

/// Start a server on its own thread and actix `System`; returns once it
/// listens (or failed to start).
pub fn spawn(config: Config) -> anyhow::Result<ServerThread> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("magma-server".into())
        .spawn(move || {
            System::new().block_on(async move {
                match Server::start(config).await {
                    Ok(server) => {
                        let _ = tx.send(Ok(Started {
                            local_addr: server.local_addr(),
                            repository_id: server.repository_id(),
                            stop: server.shutdown_handle(),
                            #[cfg(test)]
                            storage: server.storage.clone(),
                        }));
                        server.wait().await
                    }
                    Err(e) => {
                        let text = format!("{e:#}");
                        let _ = tx.send(Err(e));
                        Err(anyhow!(text))
                    }
                }
            })
        })?;
    let started = rx
        .recv()
        .map_err(|_| anyhow!("the server thread ended before starting"))??;
    Ok(ServerThread {
        local_addr: started.local_addr,
        repository_id: started.repository_id,
        stop: started.stop,
        thread,
        #[cfg(test)]
        storage: started.storage,
    })
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
