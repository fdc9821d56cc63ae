//! `magma-server`: serve one Magma repository. A thin shell over
//! `magma::server::run`; see `--help` and `docs/OPERATIONS.md`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use magma::protocol::codec::DEFAULT_MAX_FRAME;

/// Every commit allocates a few short-lived buffers on two threads (frame,
/// request, record, reply); mimalloc's thread-local free lists cost less
/// than glibc's arenas there (see the README's performance section).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use magma::server::{
    self, Config, FlushPolicy, DEFAULT_ASYNC_BATCH_DELAY, DEFAULT_BACKUP_BUSY_RATE,
    DEFAULT_BUSY_POLL, DEFAULT_DIR, DEFAULT_LISTEN, DEFAULT_MAX_CONNECTIONS,
    MAX_ASYNC_BATCH_DELAY_US, MAX_BUSY_POLL_US,
};

/// Serve a Magma-HA object repository.
///
/// Listens for application, admin and peer sessions (length-prefixed
/// MessagePack, see docs/PROTOCOL.md). Prints one line on stdout when ready:
/// "magma-server listening on ADDR (repository ID, commit N, role ROLE)".
/// SIGTERM or SIGINT stops it gracefully: it stops accepting connections,
/// lets in-flight commits finish and reach the disk, writes a final
/// checkpoint and exits 0; a second signal exits at once. Logging goes to
/// stderr and is set with RUST_LOG (default: info).
#[derive(Parser, Debug)]
#[command(name = "magma-server", version, about, long_about)]
struct Args {
    /// Repository directory. Created as a new repository (this server its
    /// only member, as primary) if absent or empty; otherwise opened. Only
    /// one server may use a directory at a time.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    dir: PathBuf,

    /// Address to listen on, host:port (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    listen: String,

    /// Address other members and clients use to reach this server
    /// (host:port); default: the address it listens on.
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,

    /// When commits reach the disk. "group": fsync before acknowledging,
    /// concurrent commits share one fsync (nothing acknowledged is lost in a
    /// crash). "interval:MS": acknowledge at once and fsync every MS
    /// milliseconds (a crash may lose the last MS of acknowledged commits).
    #[arg(long, value_name = "group|interval:MS", default_value = "group")]
    flush: FlushPolicy,

    /// Secondaries that must hold a commit durably before the primary
    /// acknowledges it (0 = asynchronous, as in the original Magma). With
    /// fewer secondaries in the node, all of them; with none, none. A
    /// secondary that stops acknowledging is checked and, if unreachable,
    /// removed after --replica-timeout-ms, and waiting commits complete.
    #[arg(long, value_name = "N", default_value_t = 1)]
    sync_replicas: u32,

    /// With --sync-replicas 0 only: microseconds a batch of records for a
    /// secondary may wait for more before it is sent (one batch is in
    /// flight at a time). Longer gives fewer, larger batches — less CPU and
    /// fewer fsyncs on both servers, so more commits/s when they share a
    /// machine — at the price of that much more replication lag. 0: send as
    /// soon as the previous batch is acknowledged.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_ASYNC_BATCH_DELAY.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=MAX_ASYNC_BATCH_DELAY_US))]
    async_batch_delay_us: u64,

    /// Follow this primary as a warm backup (beWarmBackupFor) instead of the
    /// primary named by the repository's node. Only for a directory in
    /// restore mode (a backup or a secondary). Checked as `magma follow`
    /// checks it: a server of another repository, one that is not the
    /// primary, or one behind this copy is refused (the log says why, and
    /// the server stays a backup); one not reachable yet is asked again
    /// every second, for as long as it takes (`magma follow` points the
    /// server elsewhere meanwhile); one that answers but is no Magma server
    /// speaking this protocol is refused.
    #[arg(long, value_name = "ADDR")]
    primary: Option<String>,

    /// With an empty (or absent) --dir: pull a full backup of the node from
    /// this server over the protocol (as `magma backup --pull` does), then
    /// catch up and join the node, with no file copying by hand. With a
    /// --dir that already holds a repository, it is simply opened.
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,

    /// Largest request frame accepted, in bytes. A client sending a larger
    /// frame gets a frame_too_large error and is disconnected.
    #[arg(long = "max-frame", value_name = "BYTES", default_value_t = DEFAULT_MAX_FRAME)]
    max_frame: u64,

    /// How often, in milliseconds, the server checks whether enough commit
    /// log was written to warrant a checkpoint (which shortens recovery).
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    checkpoint_interval_ms: u64,

    /// Most bytes per second a backup copies (or serves to `magma backup
    /// --pull`), so a backup does not starve the commit path; default: no
    /// limit. A backup request may ask for less, never for more.
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = clap::value_parser!(u64).range(1..))]
    backup_rate: Option<u64>,

    /// Most bytes per second a backup copies (or serves to `magma backup
    /// --pull`) while commits are flowing (one was applied within the last
    /// 100 ms); when they stop, the backup goes back to full speed (or
    /// --backup-rate). A backup's write stream lengthens every
    /// commit's fsync, so a busy server keeps most of its commit throughput
    /// while an idle one still backs up at disk speed. --backup-rate and a
    /// request's rate still apply; the lowest wins. 0: never yield (full
    /// speed always). Default: 100 MiB/s.
    #[arg(long, value_name = "BYTES_PER_SEC", default_value_t = DEFAULT_BACKUP_BUSY_RATE)]
    backup_busy_rate: u64,

    /// Milliseconds after which a secondary that does not acknowledge (or
    /// cannot be reached) is checked and, if this server cannot reach it
    /// either, removed from the node; also how long a secondary waits for
    /// its primary before re-syncing.
    #[arg(long, value_name = "MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    replica_timeout_ms: u64,

    /// Most bytes of already checkpointed commit log kept for catching-up
    /// secondaries (default 1 GiB). A secondary further behind is told to
    /// start from a new backup; a dead one can never fill the disk.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(1..))]
    max_log_bytes: u64,

    /// Size in bytes at which a new commit-log segment starts (default 64
    /// MiB). Old log is deleted a whole segment at a time.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(4096..))]
    log_segment_bytes: u64,

    /// Start even though commit-log segments are missing (log/ or its
    /// newest files deleted, moved or lost): from the last checkpoint if
    /// the segment the header names is gone, else from the end of the
    /// segments left. Whatever the lost segments held is lost (nothing
    /// after the checkpoint, if the server had been stopped cleanly), and
    /// a client resending a commit from before the loss may have it
    /// applied again. Without this flag such a directory is refused. Use
    /// it once, knowingly; in a node, starting from a new backup (--join)
    /// loses nothing.
    #[arg(long)]
    accept_missing_log: bool,

    /// Application sessions served at once. Beyond it a client's hello is
    /// answered `unavailable`. Admin and peer sessions have 64 places of
    /// their own, connections without a hello yet 64 more (a new one
    /// closes the oldest of them). Lowered at start, with a warning, to
    /// what the open-file limit (raised to its hard limit) allows. A
    /// connection that sends no hello within 10 s is closed.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_connections: usize,

    /// Microseconds the event loop keeps polling its sockets after a
    /// request or a storage answer, instead of sleeping (0: never). A loop
    /// that sleeps between the steps of a commit must be woken for each;
    /// on a virtual machine that wake-up costs more than the commit's own
    /// work. Polling keeps it awake through a burst of commits at the
    /// price of CPU while they flow (the loop yields the core to any other
    /// runnable thread each turn); an idle server never polls.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_BUSY_POLL.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=MAX_BUSY_POLL_US))]
    busy_poll_us: u64,
}

fn main() {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = Config {
        dir: args.dir,
        listen: args.listen,
        advertise: args.advertise,
        flush: args.flush,
        sync_replicas: args.sync_replicas,
        async_batch_delay: Duration::from_micros(args.async_batch_delay_us),
        primary: args.primary,
        join: args.join,
        max_frame: args.max_frame,
        checkpoint_interval: Duration::from_millis(args.checkpoint_interval_ms),
        backup_rate: args.backup_rate,
        backup_busy_rate: (args.backup_busy_rate > 0).then_some(args.backup_busy_rate),
        replica_timeout: Duration::from_millis(args.replica_timeout_ms),
        max_log_bytes: args.max_log_bytes,
        log_segment_bytes: args.log_segment_bytes,
        accept_missing_log: args.accept_missing_log,
        max_connections: args.max_connections,
        busy_poll: Duration::from_micros(args.busy_poll_us),
        ..Config::default()
    };
    if let Err(e) = server::run(config) {
        eprintln!("magma-server: error: {e:#}");
        std::process::exit(1);
    }
}
