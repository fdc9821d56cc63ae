//! `BackupActor`: the server's one background backup job, the seed's
//! "backup process" (MaClientProcess): started, watched, paused, resumed
//! and aborted through admin requests.
//!
//! An async actor. It owns at most one job at a time, of one of two kinds:
//!
//! * **local** (`local.rs`): `backup --to DIR` copies a snapshot into a
//!   directory on this machine, one chunk per self-message ([`CopyChunk`]);
//!   each chunk's blocking I/O runs on a blocking thread
//!   (`spawn_blocking(..).into_actor(self)`), so pause, resume, abort and
//!   progress requests are ordinary messages handled between chunks;
//! * **pull** (`pull.rs`): `backup --pull` keeps a snapshot open while a
//!   client fetches its files chunk by chunk over the protocol; it is
//!   released when the client finishes, when aborted, or after an idle
//!   timeout.
//!
//! Both start from [`TakeSnapshot`] on the `StorageActor`: a checkpoint, a
//! copy of the index made at that instant, and the lengths of files that
//! later commits only extend. Commits therefore go on during the whole copy
//! and nothing is buffered (the seed held commits in memory until its copy
//! ended). An optional rate limit (bytes/s: the server's `--backup-rate`,
//! and the request's own, the lower wins) paces chunks so a backup does not
//! starve the commit path.
//!
//! The last finished job's report is kept for `backup_status`. This actor
//! never does file I/O inside a handler, never writes into the live
//! repository directory except its `backup-tmp/` scratch area, and never
//! reports a backup as completed before its manifest is durable.
//!
//! Callers: sessions (admin requests and `status`), the `Controller`
//! ([`StopBackups`] at shutdown).

mod local;
mod pull;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use actix::prelude::*;
use log::info;

use crate::actors::controller::Fatal;
use crate::actors::storage::TakeSnapshot;
use crate::protocol::{BackupReport, PullFile, PullSnapshot, WireError};
use crate::storage::backup::{clear_scratch, TargetRefusal, SCRATCH_DIR};

use local::LocalJob;
use pull::PullJob;

/// Bytes one local chunk copies without a rate limit.
const LOCAL_CHUNK: u64 = 4 * 1024 * 1024;
/// Largest chunk a pull request is answered with.
pub const MAX_PULL_CHUNK: u64 = 1024 * 1024;
/// Smallest chunk under a rate limit (so a tiny rate still progresses).
const MIN_CHUNK: u64 = 16 * 1024;
/// A pull job nobody asked anything of for this long is released.
pub const PULL_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const PULL_SWEEP: Duration = Duration::from_secs(5);

/// Why a backup request is refused or a job could not run.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("a backup is already running ({what}); wait for it or abort it (backup-abort)")]
    Busy { what: String },
    #[error(transparent)]
    Target(#[from] TargetRefusal),
    #[error("no backup is running{}", last.as_ref().map(|l| format!(" (the last one {l})")).unwrap_or_default())]
    NotRunning { last: Option<String> },
    #[error("no backup has run since the server started")]
    NeverRan,
    #[error("the snapshot failed: {0}")]
    Snapshot(String),
    #[error("pull job {id} is not active: it finished, was aborted, or was idle for over {} s", PULL_IDLE_TIMEOUT.as_secs())]
    UnknownPull { id: u64 },
    #[error("bad chunk request: {0}")]
    BadChunk(String),
    #[error("reading {file} for a pull failed: {error}")]
    Read { file: String, error: String },
    #[error("a pull backup is paced by its client: stop the client to pause it, run the same command again to resume")]
    PullNotPausable,
    #[error("the backup rate must be at least 1 byte per second")]
    BadRate,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Internal(String),
}

impl BackupError {
    /// What the wire carries for this error.
    pub fn to_wire(&self) -> WireError {
        match self {
            BackupError::ShuttingDown => WireError::ShuttingDown,
            other => WireError::Backup {
                reason: other.to_string(),
            },
        }
    }
}

/// Run `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BackupError> {
    actix_rt::task::spawn_blocking(f)
        .await
        .map_err(|e| BackupError::Internal(format!("a backup I/O task failed: {e}")))
}

/// A bytes-per-second budget: a chunk may start once the bytes before it
/// have had their time. Unused time is not banked beyond the present.
#[derive(Clone, Debug)]
struct Pace {
    rate: Option<u64>,
    next: Instant,
}

impl Pace {
    fn new(rate: Option<u64>) -> Pace {
        Pace {
            rate,
            next: Instant::now(),
        }
    }

    /// How long to wait before the next chunk may start.
    fn wait(&self, now: Instant) -> Option<Duration> {
        self.rate?;
        (self.next > now).then(|| self.next - now)
    }

    /// Account `bytes` moved by a chunk that started at `start`; returns
    /// when that chunk was allowed to start (for reservations ahead).
    fn charge(&mut self, start: Instant, bytes: u64) -> Instant {
        let begin = self.next.max(start);
        if let Some(rate) = self.rate {
            self.next = begin + Duration::from_secs_f64(bytes as f64 / rate as f64);
        }
        begin
    }

    fn reset(&mut self) {
        self.next = Instant::now();
    }

    /// Bytes per chunk: about five chunks a second under a limit.
    fn chunk(&self, max: u64) -> u64 {
        match self.rate {
            None => max,
            Some(r) => (r / 5).clamp(MIN_CHUNK, max),
        }
    }
}

/// The lower of two optional rates; `Err` for a zero rate.
fn effective_rate(requested: Option<u64>, server: Option<u64>) -> Result<Option<u64>, BackupError> {
    if requested == Some(0) {
        return Err(BackupError::BadRate);
    }
    Ok(match (requested, server) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// Runs backup jobs; see the module doc.
pub struct BackupActor {
    storage: Recipient<TakeSnapshot>,
    fatal: Recipient<Fatal>,
    live_dir: PathBuf,
    /// Names this server in manifests.
    source: String,
    default_rate: Option<u64>,
    /// Prefix of this process's scratch directories.
    instance: String,
    /// A job being set up (target checked, snapshot taken): its target.
    starting: Option<String>,
    local: Option<LocalJob>,
    pull: Option<PullJob>,
    last: Option<BackupReport>,
    stopping: bool,
}

impl BackupActor {
    /// `live_dir` is the repository directory (scratch area, and the place
    /// no backup may go); `source` names this server in manifests;
    /// `default_rate` is `--backup-rate`.
    pub fn new(
        storage: Recipient<TakeSnapshot>,
        fatal: Recipient<Fatal>,
        live_dir: PathBuf,
        source: String,
        default_rate: Option<u64>,
    ) -> BackupActor {
        BackupActor {
            storage,
            fatal,
            live_dir,
            source,
            default_rate,
            instance: format!("{:08x}-", rand::random::<u32>()),
            starting: None,
            local: None,
            pull: None,
            last: None,
            stopping: false,
        }
    }

    fn check_free(&self) -> Result<(), BackupError> {
        if self.stopping {
            return Err(BackupError::ShuttingDown);
        }
        let what = if let Some(t) = &self.starting {
            format!("starting, to {t}")
        } else if let Some(j) = &self.local {
            j.describe()
        } else if let Some(p) = &self.pull {
            p.describe()
        } else {
            return Ok(());
        };
        Err(BackupError::Busy { what })
    }

    /// A fresh job id (random, so a pull client resuming against a
    /// restarted server can never continue someone else's job; below 2^53
    /// so every language reads it exactly) and its scratch directory.
    fn new_job(&mut self) -> (u64, PathBuf) {
        let id = (rand::random::<u64>() >> 11).max(1);
        let scratch = self
            .live_dir
            .join(SCRATCH_DIR)
            .join(format!("{}{id}", self.instance));
        (id, scratch)
    }

    fn not_running(&self) -> BackupError {
        match &self.last {
            Some(r) => BackupError::NotRunning {
                last: Some(format!("to {}: {}", r.target, r.state.name())),
            },
            None => BackupError::NeverRan,
        }
    }

    fn report(&self) -> Option<BackupReport> {
        if let Some(j) = &self.local {
            return Some(j.report());
        }
        if let Some(p) = &self.pull {
            return Some(p.report());
        }
        self.last.clone()
    }
}

impl Actor for BackupActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let live = self.live_dir.clone();
        let keep = self.instance.clone();
        ctx.spawn(
            blocking(move || clear_scratch(&live, &keep))
                .into_actor(self)
                .map(|_, _, _| ()),
        );
        ctx.run_interval(PULL_SWEEP, |act, ctx| act.expire_idle_pull(ctx));
    }
}

/// Start a local backup into `to` (absolute, must not exist). Replies with
/// the job's first report once the snapshot is taken; the copy goes on in
/// the background. Sender: admin sessions.
#[derive(Message)]
#[rtype(result = "Result<BackupReport, BackupError>")]
pub struct StartBackup {
    pub to: String,
    pub rate: Option<u64>,
}

/// Stop copying after the current chunk. Idempotent. Sender: admin sessions.
#[derive(Message)]
#[rtype(result = "Result<BackupReport, BackupError>")]
pub struct PauseBackup;

/// Continue a paused job. Idempotent. Sender: admin sessions.
#[derive(Message)]
#[rtype(result = "Result<BackupReport, BackupError>")]
pub struct ResumeBackup;

/// Abort the running job (local or pull). Replies once it has ended, with
/// its final report (`completed` if it finished first). Sender: admin
/// sessions.
#[derive(Message)]
#[rtype(result = "Result<BackupReport, BackupError>")]
pub struct AbortBackup;

/// The running job's report, else the last finished one's, else `None`.
/// Sender: sessions (`backup_status`, `status`).
#[derive(Message)]
#[rtype(result = "Option<BackupReport>")]
pub struct GetBackupReport;

/// Snapshot the repository for a pull backup. Sender: admin sessions.
#[derive(Message)]
#[rtype(result = "Result<PullSnapshot, BackupError>")]
pub struct StartPull {
    pub rate: Option<u64>,
    /// The client's target directory, for reports.
    pub to: Option<String>,
}

/// Bytes of one file of a pull job, at most [`MAX_PULL_CHUNK`]. Sender:
/// admin sessions.
#[derive(Message)]
#[rtype(result = "Result<Vec<u8>, BackupError>")]
pub struct PullChunk {
    pub id: u64,
    pub file: String,
    pub offset: u64,
    pub len: u64,
}

/// Release a pull job; replies with the checksums of the files served in
/// one sequential pass. Sender: admin sessions.
#[derive(Message)]
#[rtype(result = "Result<Vec<PullFile>, BackupError>")]
pub struct FinishPull {
    pub id: u64,
}

/// Shutdown: abort any job (the target is marked incomplete) and refuse new
/// ones. Replies once the job has ended. Sender: the `Controller`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopBackups;

impl Handler<GetBackupReport> for BackupActor {
    type Result = Option<BackupReport>;

    fn handle(&mut self, _: GetBackupReport, _: &mut Context<Self>) -> Self::Result {
        self.report()
    }
}

impl Handler<StopBackups> for BackupActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: StopBackups, ctx: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        if self.pull.is_some() {
            self.end_pull(
                crate::protocol::BackupState::Aborted,
                "the server shut down",
                ctx,
            );
        }
        match self.abort_local("the server shut down", ctx) {
            Some(done) => {
                info!("shutdown: aborting the running backup");
                Box::pin(
                    async move {
                        let _ = done.await;
                    }
                    .into_actor(self),
                )
            }
            None => Box::pin(actix::fut::ready(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_spaces_chunks_by_rate_and_never_banks_idle_time() {
        let mut p = Pace::new(Some(1000));
        let t0 = Instant::now();
        assert_eq!(p.wait(t0), None);
        p.charge(t0, 500);
        assert_eq!(p.wait(t0), Some(Duration::from_millis(500)));
        // A reservation made while waiting queues behind the first.
        let begin = p.charge(t0, 1000);
        assert_eq!(begin, t0 + Duration::from_millis(500));
        assert_eq!(p.wait(t0), Some(Duration::from_millis(1500)));
        // Long idle: the next chunk starts at once, not in a burst of many.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(p.wait(later), None);
        p.charge(later, 1000);
        assert_eq!(p.wait(later), Some(Duration::from_secs(1)));
        assert_eq!(Pace::new(None).wait(t0), None);
        assert_eq!(Pace::new(Some(100)).chunk(LOCAL_CHUNK), MIN_CHUNK);
        assert_eq!(Pace::new(Some(5_000_000)).chunk(LOCAL_CHUNK), 1_000_000);
        assert_eq!(Pace::new(None).chunk(LOCAL_CHUNK), LOCAL_CHUNK);
    }

    #[test]
    fn the_lower_rate_wins_and_zero_is_refused() {
        assert_eq!(effective_rate(None, None).unwrap(), None);
        assert_eq!(effective_rate(Some(5), None).unwrap(), Some(5));
        assert_eq!(effective_rate(None, Some(7)).unwrap(), Some(7));
        assert_eq!(effective_rate(Some(9), Some(7)).unwrap(), Some(7));
        assert!(matches!(
            effective_rate(Some(0), Some(7)),
            Err(BackupError::BadRate)
        ));
    }
}
