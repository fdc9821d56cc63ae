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
//! copy of the index as of that instant (made on a blocking thread of the
//! job's: the storage thread only pins the index), and the lengths of
//! files that later commits only extend. Commits therefore go on during the whole copy
//! and nothing is buffered (the seed held commits in memory until its copy
//! ended). An optional rate limit (bytes/s: the server's `--backup-rate`,
//! and the request's own, the lower wins) paces chunks so a backup does not
//! starve the commit path.
//!
//! A job also **yields to a busy commit path**: while the applied commit
//! number (the `StorageActor`'s watch channel) moved within `BUSY_WINDOW`,
//! chunks are paced at `--backup-busy-rate` (or the explicit limit, if
//! lower); when commits stop, the copy goes back to full speed. A backup's
//! write stream lengthens every commit's fsync and takes CPU from a small
//! machine, while a fixed cap would slow every backup of an idle server.
//! The state is sampled between chunks (`CommitPath`), never waited on.
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
use log::{debug, info};
use tokio::sync::{oneshot, watch};

use crate::actors::controller::Fatal;
use crate::actors::storage::{BackupEnded, TakeSnapshot};
use crate::protocol::{BackupReport, PullFile, PullSnapshot, WireError};
use crate::storage::backup::{clear_scratch, TargetRefusal, SCRATCH_DIR};
use crate::types::CommitNumber;

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
/// Default `--backup-busy-rate`: where commits/s of 8 clients during a
/// backup stayed above 0.8x of normal on the development machine.
pub const DEFAULT_BUSY_RATE: u64 = 100 * 1024 * 1024;
/// The commit path counts as busy this long after the applied commit
/// number last moved. Under load commits land every few milliseconds; a
/// gap this long means the clients stopped (or nearly), and a copy going
/// back to full speed costs them little.
const BUSY_WINDOW: Duration = Duration::from_millis(100);

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
    #[error("a backup is starting ({what}): it is taking its snapshot; ask again in a moment")]
    Starting { what: String },
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

/// A job's end was never reported (its actor stopped first).
fn vanished() -> BackupError {
    BackupError::Internal("the backup job vanished".into())
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
    /// The explicit limit (request or `--backup-rate`, the lower): always
    /// applies.
    limit: Option<u64>,
    /// The limit of the next chunk: `limit`, or lower while yielding.
    rate: Option<u64>,
    /// Whether the busy rate binds now (see [`Pace::adapt`]).
    yielding: bool,
    next: Instant,
}

impl Pace {
    fn new(limit: Option<u64>) -> Pace {
        Pace {
            limit,
            rate: limit,
            yielding: false,
            next: Instant::now(),
        }
    }

    /// Set the rate of the next chunk for the commit path's state. Returns
    /// the new yielding state when it changed (for a log line per change,
    /// not per chunk). Time already reserved at the old rate stands.
    fn adapt(&mut self, busy_rate: Option<u64>, commit_path_busy: bool) -> Option<bool> {
        self.rate = chunk_rate(self.limit, busy_rate, commit_path_busy);
        let yielding = self.rate != self.limit;
        (yielding != self.yielding).then(|| {
            self.yielding = yielding;
            yielding
        })
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

/// The lower of two optional limits (`None`: no limit).
fn lower(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The lower of two optional rates; `Err` for a zero rate.
fn effective_rate(requested: Option<u64>, server: Option<u64>) -> Result<Option<u64>, BackupError> {
    if requested == Some(0) {
        return Err(BackupError::BadRate);
    }
    Ok(lower(requested, server))
}

/// The rate of one chunk: the explicit limit always; while the commit path
/// is busy, also the busy rate (`None`: never yield).
fn chunk_rate(
    explicit: Option<u64>,
    busy_rate: Option<u64>,
    commit_path_busy: bool,
) -> Option<u64> {
    if commit_path_busy {
        lower(explicit, busy_rate)
    } else {
        explicit
    }
}

/// Whether commits are flowing, judged from the applied commit number as
/// sampled between chunks. Pure: callers supply the number and the instant.
#[derive(Clone, Debug)]
struct CommitActivity {
    seen: CommitNumber,
    /// When `seen` was observed to have moved; `None` since a reset.
    moved: Option<Instant>,
}

impl CommitActivity {
    fn new(commit: CommitNumber) -> Self {
        CommitActivity {
            seen: commit,
            moved: None,
        }
    }

    /// Forget the past: a number that moved long before a job started says
    /// nothing about now. Called when a job is requested, so the job's
    /// set-up is the first sampling interval.
    fn reset(&mut self, commit: CommitNumber) {
        *self = CommitActivity::new(commit);
    }

    /// Sample the number at `now`; whether the commit path is busy. A move
    /// seen now may have happened any time since the last sample: counting
    /// it as now errs towards yielding.
    fn observe(&mut self, commit: CommitNumber, now: Instant) -> bool {
        if commit != self.seen {
            self.seen = commit;
            self.moved = Some(now);
        }
        self.moved
            .is_some_and(|t| now.saturating_duration_since(t) < BUSY_WINDOW)
    }
}

/// The commit path as a job sees it: the `StorageActor`'s applied commit
/// number (read without waiting) and its recent activity.
struct CommitPath {
    applied: watch::Receiver<CommitNumber>,
    activity: CommitActivity,
}

impl CommitPath {
    fn new(applied: watch::Receiver<CommitNumber>) -> Self {
        let now = *applied.borrow();
        CommitPath {
            applied,
            activity: CommitActivity::new(now),
        }
    }

    fn busy(&mut self, now: Instant) -> bool {
        let commit = *self.applied.borrow();
        self.activity.observe(commit, now)
    }

    fn reset(&mut self) {
        let commit = *self.applied.borrow();
        self.activity.reset(commit);
    }
}

/// Pace a job's next chunk for the commit path's state; one debug line
/// when the job starts or stops yielding (never one per chunk).
fn yield_to_commits(
    pace: &mut Pace,
    busy_rate: Option<u64>,
    commit_path_busy: bool,
    job: impl FnOnce() -> String,
) {
    match pace.adapt(busy_rate, commit_path_busy) {
        Some(true) => debug!(
            "{}: commits are flowing, yielding to them at {} bytes/s",
            job(),
            pace.rate.unwrap_or_default()
        ),
        Some(false) => debug!(
            "{}: the commit path is idle, back to {}",
            job(),
            pace.limit
                .map_or("full speed".to_string(), |r| format!("{r} bytes/s"))
        ),
        None => {}
    }
}

/// How the server paces backup jobs.
pub struct Pacing {
    /// `--backup-rate`: the most bytes/s at any time (`None`: no limit).
    pub rate: Option<u64>,
    /// `--backup-busy-rate`: the most bytes/s while commits flow (`None`:
    /// never yield).
    pub busy_rate: Option<u64>,
    /// The applied commit number, as the `StorageActor` publishes it.
    pub applied: watch::Receiver<CommitNumber>,
}

/// An abort (or a shutdown) waiting for a job still starting.
type AbortWaiter = oneshot::Sender<Result<BackupReport, BackupError>>;

/// Runs backup jobs; see the module doc.
pub struct BackupActor {
    storage: Recipient<TakeSnapshot>,
    /// Told when a job ends, so the log is kept for the newest completed
    /// backup, not for one that failed.
    ended: Recipient<BackupEnded>,
    fatal: Recipient<Fatal>,
    live_dir: PathBuf,
    /// Names this server in manifests.
    source: String,
    default_rate: Option<u64>,
    busy_rate: Option<u64>,
    commit_path: CommitPath,
    /// Prefix of this process's scratch directories.
    instance: String,
    /// A job being set up (target checked, snapshot taken): its target.
    starting: Option<String>,
    /// Aborts asked while a job was starting: answered once it is one.
    abort_on_start: Vec<AbortWaiter>,
    local: Option<LocalJob>,
    pull: Option<PullJob>,
    last: Option<BackupReport>,
    stopping: bool,
}

impl BackupActor {
    /// `live_dir` is the repository directory (scratch area, and the place
    /// no backup may go); `source` names this server in manifests.
    pub fn new(
        storage: Recipient<TakeSnapshot>,
        ended: Recipient<BackupEnded>,
        fatal: Recipient<Fatal>,
        live_dir: PathBuf,
        source: String,
        pacing: Pacing,
    ) -> BackupActor {
        BackupActor {
            storage,
            ended,
            fatal,
            live_dir,
            source,
            default_rate: pacing.rate,
            busy_rate: pacing.busy_rate,
            commit_path: CommitPath::new(pacing.applied),
            instance: format!("{:08x}-", rand::random::<u32>()),
            starting: None,
            abort_on_start: Vec::new(),
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

    /// Pause and resume need a job: not one still taking its snapshot.
    fn check_started(&self) -> Result<(), BackupError> {
        match &self.starting {
            Some(what) => Err(BackupError::Starting { what: what.clone() }),
            None => Ok(()),
        }
    }

    /// A job that has just started, asked to stop meanwhile (a shutdown or
    /// an abort): why, and the aborts waiting for it.
    fn abort_at_start(&mut self) -> Option<(&'static str, Vec<AbortWaiter>)> {
        let waiters = std::mem::take(&mut self.abort_on_start);
        if self.stopping {
            Some(("the server shut down", waiters))
        } else if !waiters.is_empty() {
            Some(("aborted by an operator", waiters))
        } else {
            None
        }
    }

    /// The job being set up failed before it ran: the log kept for it is
    /// released, and aborts waiting for it are told.
    fn failed_to_start(&mut self, e: &BackupError) {
        self.ended.do_send(BackupEnded {
            snapshot_commit: None,
            completed: false,
        });
        for waiter in std::mem::take(&mut self.abort_on_start) {
            let _ = waiter.send(Err(BackupError::NotRunning {
                last: Some(format!("failed to start: {e}")),
            }));
        }
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
/// one sequential pass. The job ends completed only if every file was
/// served and, when the client says what it stored (`held`), that matches
/// them; otherwise aborted. Sender: admin sessions.
#[derive(Message)]
#[rtype(result = "Result<Vec<PullFile>, BackupError>")]
pub struct FinishPull {
    pub id: u64,
    pub held: Option<Vec<PullFile>>,
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
        if self.starting.is_some() {
            // Taking its snapshot: it is aborted as soon as it is a job
            // (or fails to start); the shutdown waits for that.
            info!("shutdown: aborting the backup being started");
            let (tx, rx) = oneshot::channel();
            self.abort_on_start.push(tx);
            return Box::pin(
                async move {
                    let _ = rx.await;
                }
                .into_actor(self),
            );
        }
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
    use crate::actors::storage::BackupEnded;
    use crate::protocol::BackupState;
    use crate::storage::{PendingSnapshot, Repository, StorageError};
    use std::sync::{Arc, Mutex};

    /// Takes real snapshots, each once the test opens the gate.
    struct GatedStorage {
        repo: Arc<Mutex<Repository>>,
        gate: Arc<tokio::sync::Notify>,
    }

    impl Actor for GatedStorage {
        type Context = Context<Self>;
    }

    impl Handler<TakeSnapshot> for GatedStorage {
        type Result = ResponseFuture<Result<PendingSnapshot, StorageError>>;
        fn handle(&mut self, m: TakeSnapshot, _: &mut Context<Self>) -> Self::Result {
            let (repo, gate) = (self.repo.clone(), self.gate.clone());
            Box::pin(async move {
                gate.notified().await;
                let snapshot = repo.lock().unwrap().snapshot_deferred(&m.scratch);
                snapshot
            })
        }
    }

    /// Records what the storage actor and the controller are told.
    struct Told(Arc<Mutex<Vec<String>>>);

    impl Actor for Told {
        type Context = Context<Self>;
    }

    impl Handler<BackupEnded> for Told {
        type Result = ();
        fn handle(&mut self, m: BackupEnded, _: &mut Context<Self>) {
            self.0.lock().unwrap().push(format!(
                "ended {:?} completed {}",
                m.snapshot_commit, m.completed
            ));
        }
    }

    impl Handler<Fatal> for Told {
        type Result = ();
        fn handle(&mut self, m: Fatal, _: &mut Context<Self>) {
            self.0.lock().unwrap().push(format!("fatal {}", m.reason));
        }
    }

    /// An operator who aborts a backup still taking its snapshot gets it
    /// aborted, not "no backup is running" and a backup that then runs;
    /// pausing it meanwhile says it is starting.
    /// A backup actor whose snapshots wait for `gate`; what it tells the
    /// storage actor and the controller goes to `told`.
    fn gated_backups(
        tmp: &std::path::Path,
    ) -> (
        Addr<BackupActor>,
        Arc<tokio::sync::Notify>,
        Arc<Mutex<Vec<String>>>,
    ) {
        let live = tmp.join("live");
        let repo = Repository::create(&live, 1, "127.0.0.1:1").unwrap();
        let gate = Arc::new(tokio::sync::Notify::new());
        let storage = GatedStorage {
            repo: Arc::new(Mutex::new(repo)),
            gate: gate.clone(),
        }
        .start();
        let told = Arc::new(Mutex::new(Vec::new()));
        let sink = Told(told.clone()).start();
        let backup = BackupActor::new(
            storage.recipient(),
            sink.clone().recipient(),
            sink.recipient(),
            live,
            "test".into(),
            Pacing {
                rate: None,
                busy_rate: None,
                applied: watch::channel(0).1,
            },
        )
        .start();
        (backup, gate, told)
    }

    #[actix::test]
    async fn a_backup_aborted_while_it_takes_its_snapshot_is_aborted() {
        let tmp = tempfile::tempdir().unwrap();
        let (backup, gate, told) = gated_backups(tmp.path());
        let target = tmp.path().join("b").to_string_lossy().to_string();
        let start = backup.send(StartBackup {
            to: target.clone(),
            rate: None,
        });
        let start = actix_rt::spawn(start);
        // Messages are handled in order: these find the job starting.
        let paused = backup.send(PauseBackup).await.unwrap();
        assert!(
            matches!(&paused, Err(BackupError::Starting { .. })),
            "{paused:?}"
        );
        let abort = actix_rt::spawn(backup.send(AbortBackup));
        // Let the abort reach the actor before the snapshot is taken.
        let status = backup.send(GetBackupReport).await.unwrap();
        assert!(status.is_none(), "no job yet: {status:?}");
        gate.notify_one();
        let started = start.await.unwrap().unwrap().unwrap();
        assert_eq!(started.target, target);
        let aborted = abort.await.unwrap().unwrap().unwrap();
        assert_eq!(aborted.state, BackupState::Aborted, "{aborted:?}");
        let last = backup.send(GetBackupReport).await.unwrap().unwrap();
        assert_eq!(last.state, BackupState::Aborted);
        let told = told.lock().unwrap().clone();
        assert_eq!(
            told,
            vec![format!(
                "ended Some({}) completed false",
                started.snapshot_commit
            )]
        );
    }

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
    fn a_busy_commit_path_lowers_the_rate_never_raises_it() {
        let busy = Some(100);
        // Idle: the explicit limit alone, whatever the busy rate.
        assert_eq!(chunk_rate(None, busy, false), None);
        assert_eq!(chunk_rate(Some(50), busy, false), Some(50));
        // Busy: the lower of the two.
        assert_eq!(chunk_rate(None, busy, true), Some(100));
        assert_eq!(chunk_rate(Some(500), busy, true), Some(100));
        assert_eq!(chunk_rate(Some(50), busy, true), Some(50));
        // No busy rate (`--backup-busy-rate 0`): never yields.
        assert_eq!(chunk_rate(None, None, true), None);
        assert_eq!(chunk_rate(Some(50), None, true), Some(50));
    }

    #[test]
    fn pace_reports_yielding_only_when_it_changes() {
        let mut p = Pace::new(None);
        assert_eq!(p.adapt(Some(100), false), None);
        assert_eq!(p.rate, None);
        assert_eq!(p.adapt(Some(100), true), Some(true));
        assert_eq!(p.rate, Some(100));
        assert_eq!(p.chunk(LOCAL_CHUNK), MIN_CHUNK);
        assert_eq!(p.adapt(Some(100), true), None, "no news per chunk");
        assert_eq!(p.adapt(Some(100), false), Some(false));
        assert_eq!((p.rate, p.chunk(LOCAL_CHUNK)), (None, LOCAL_CHUNK));
        // An explicit limit below the busy rate: busy or not, no yielding.
        let mut p = Pace::new(Some(10));
        assert_eq!(p.adapt(Some(100), true), None);
        assert_eq!(p.rate, Some(10));
        // Switching back to full speed drops the pacing wait at once, and
        // idle time is not banked when yielding starts again.
        let mut p = Pace::new(None);
        let t0 = Instant::now();
        p.adapt(Some(1000), true);
        p.charge(t0, 1000);
        assert_eq!(p.wait(t0), Some(Duration::from_secs(1)));
        p.adapt(Some(1000), false);
        assert_eq!(p.wait(t0), None);
        let later = t0 + Duration::from_secs(60);
        p.adapt(Some(1000), true);
        assert_eq!(p.wait(later), None);
        assert_eq!(p.charge(later, 500), later);
        assert_eq!(p.wait(later), Some(Duration::from_millis(500)));
    }

    #[test]
    fn the_commit_path_is_busy_for_a_window_after_the_number_moves() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut a = CommitActivity::new(7);
        assert!(!a.observe(7, t0), "nothing moved since it was created");
        assert!(a.observe(8, t0 + ms(10)));
        assert!(a.observe(8, t0 + ms(10) + BUSY_WINDOW - ms(1)));
        assert!(!a.observe(8, t0 + ms(10) + BUSY_WINDOW));
        // Commits resume: busy again, and each move extends the window.
        let t1 = t0 + ms(500);
        assert!(a.observe(9, t1));
        let t2 = t1 + BUSY_WINDOW * 3 / 4;
        assert!(a.observe(12, t2));
        assert!(a.observe(12, t1 + BUSY_WINDOW), "the window runs from t2");
        assert!(!a.observe(12, t2 + BUSY_WINDOW));
        // A reset forgets moves made before a job was requested.
        let t3 = t2 + BUSY_WINDOW * 2;
        a.reset(20);
        assert!(!a.observe(20, t3));
        // A sample earlier than the last move (clock order) counts as busy.
        assert!(a.observe(21, t3 + ms(10)));
        assert!(a.observe(21, t3));
    }

    #[test]
    fn the_commit_path_reads_the_storage_watch_without_waiting() {
        let (tx, rx) = watch::channel(5);
        let mut path = CommitPath::new(rx);
        let t0 = Instant::now();
        assert!(!path.busy(t0));
        tx.send_replace(6);
        assert!(path.busy(t0));
        assert!(!path.busy(t0 + BUSY_WINDOW));
        tx.send_replace(9);
        path.reset();
        assert!(!path.busy(t0 + BUSY_WINDOW));
        // The storage actor gone (shutdown): the last number stands.
        drop(tx);
        assert!(!path.busy(t0 + BUSY_WINDOW * 2));
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

    /// A shutdown while a job takes its snapshot waits for it and aborts
    /// it, rather than closing the repository under it.
    #[actix::test]
    async fn a_shutdown_while_a_backup_starts_waits_for_it_and_aborts_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (backup, gate, told) = gated_backups(tmp.path());
        let target = tmp.path().join("b").to_string_lossy().to_string();
        let start = actix_rt::spawn(backup.send(StartBackup {
            to: target,
            rate: None,
        }));
        let stop = actix_rt::spawn(backup.send(StopBackups));
        // The stop waits for the snapshot: once a later message was handled
        // and the spawned tasks had their turns, it is still pending.
        backup.send(GetBackupReport).await.unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!stop.is_finished(), "the shutdown did not wait");
        gate.notify_one();
        stop.await.unwrap().unwrap();
        let started = start.await.unwrap().unwrap().unwrap();
        let last = backup.send(GetBackupReport).await.unwrap().unwrap();
        assert_eq!(last.state, BackupState::Aborted);
        assert_eq!(
            told.lock().unwrap().clone(),
            vec![format!(
                "ended Some({}) completed false",
                started.snapshot_commit
            )]
        );
    }
}
