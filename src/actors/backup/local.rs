//! The local job: a snapshot copied into a directory on this machine, one
//! [`CopyChunk`] at a time.
//!
//! Life of a job: `StartBackup` checks and creates the target (marked
//! incomplete) on a blocking thread, asks the `StorageActor` for a
//! snapshot, then notifies itself `CopyChunk`. Each `CopyChunk` hands the
//! `SnapshotCopy` to a blocking thread for one step and gets it back with
//! the step's outcome; while it is away the job has no copier, which is how
//! "a chunk is in flight" is known. Pause stops notifying; abort is acted on
//! at the next `CopyChunk` (at once when no chunk is in flight); the step
//! that seals the manifest completes the job. Nothing here blocks.

use std::path::PathBuf;
use std::time::Instant;

use actix::prelude::*;
use log::{error, info, warn};
use tokio::sync::oneshot;

use crate::actors::backup::vanished;
use crate::actors::backup::{
    blocking, effective_rate, yield_to_commits, AbortBackup, BackupActor, BackupError, Pace,
    PauseBackup, ResumeBackup, StartBackup, LOCAL_CHUNK,
};
use crate::actors::controller::Fatal;
use crate::actors::storage::{BackupEnded, TakeSnapshot};
use crate::protocol::{BackupReport, BackupState};
use crate::storage::backup::{
    prepare_target, remove_scratch, unix_ms_now, write_marker, SnapshotCopy, Step,
};
use crate::storage::{Snapshot, StorageError};

/// Copy the next chunk of the local job. Sent by the actor to itself;
/// harmless when there is nothing to do (no job, paused, a chunk in
/// flight, pacing), so extra ones never double a copy.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct CopyChunk;

/// The running local job.
pub(super) struct LocalJob {
    target: String,
    target_path: PathBuf,
    scratch: PathBuf,
    state: BackupState,
    /// `None` while a chunk runs on a blocking thread.
    copier: Option<SnapshotCopy>,
    snapshot_commit: u64,
    bytes_total: u64,
    files_total: u64,
    bytes_done: u64,
    files_done: u64,
    current_file: Option<String>,
    started: Instant,
    started_unix_ms: u64,
    pace: Pace,
    abort: Option<String>,
    waiters: Vec<oneshot::Sender<BackupReport>>,
    timer: Option<SpawnHandle>,
}

impl LocalJob {
    fn new(copier: SnapshotCopy, target: String, scratch: PathBuf, rate: Option<u64>) -> Self {
        LocalJob {
            target_path: copier.target().to_path_buf(),
            target,
            scratch,
            state: BackupState::Running,
            snapshot_commit: copier.snapshot().commit,
            bytes_total: copier.bytes_total(),
            files_total: copier.files_total(),
            bytes_done: 0,
            files_done: 0,
            current_file: copier.current_file(),
            started: Instant::now(),
            started_unix_ms: unix_ms_now(),
            pace: Pace::new(rate),
            abort: None,
            waiters: Vec::new(),
            timer: None,
            copier: Some(copier),
        }
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "{} to {}, {} of {} bytes copied",
            self.state.name(),
            self.target,
            self.bytes_done,
            self.bytes_total
        )
    }

    pub(super) fn report(&self) -> BackupReport {
        BackupReport {
            state: self.state,
            target: self.target.clone(),
            snapshot_commit: self.snapshot_commit,
            current_file: self.current_file.clone(),
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
            files_done: self.files_done,
            files_total: self.files_total,
            started_unix_ms: self.started_unix_ms,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            error: None,
        }
    }

    fn cancel_timer(&mut self, ctx: &mut Context<BackupActor>) {
        if let Some(h) = self.timer.take() {
            ctx.cancel_future(h);
        }
    }
}

/// Set up a job: target, then snapshot. On a failed snapshot the target
/// just created is removed again (it holds nothing but the marker).
async fn set_up(
    storage: Recipient<TakeSnapshot>,
    fatal: Recipient<Fatal>,
    live: PathBuf,
    target: PathBuf,
    scratch: PathBuf,
) -> Result<Snapshot, BackupError> {
    let t = target.clone();
    blocking(move || prepare_target(&live, &t)).await??;
    let failed = match storage
        .send(TakeSnapshot {
            scratch: scratch.clone(),
        })
        .await
    {
        // The index copy, on a blocking thread (the storage thread only
        // pinned the index).
        Ok(Ok(pending)) => match blocking(move || pending.complete()).await {
            Ok(Ok(snapshot)) => return Ok(snapshot),
            Ok(Err(e)) => snapshot_failure(&fatal, e),
            Err(e) => e,
        },
        Ok(Err(e)) => snapshot_failure(&fatal, e),
        Err(e) => BackupError::Snapshot(format!("the storage actor is gone ({e})")),
    };
    let _ = blocking(move || {
        let _ = std::fs::remove_dir_all(&target);
        remove_scratch(&scratch);
    })
    .await;
    Err(failed)
}

/// A snapshot that failed on the live repository (its checkpoint) is
/// fatal, as any failed checkpoint; one that failed on the scratch copy is
/// the backup's failure only.
pub(super) fn snapshot_failure(fatal: &Recipient<Fatal>, e: StorageError) -> BackupError {
    // The repository closed under it: the server is stopping, which is
    // not a failure.
    if e.is_fatal() && !crate::actors::storage::is_closed(&e) {
        fatal.do_send(Fatal {
            reason: format!("the checkpoint of a backup snapshot failed: {e}"),
        });
    }
    BackupError::Snapshot(e.to_string())
}

impl Handler<StartBackup> for BackupActor {
    type Result = ResponseActFuture<Self, Result<BackupReport, BackupError>>;

    fn handle(&mut self, msg: StartBackup, _: &mut Context<Self>) -> Self::Result {
        let rate = match self
            .check_free()
            .and_then(|()| effective_rate(msg.rate, self.default_rate))
        {
            Ok(rate) => rate,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let (_, scratch) = self.new_job();
        self.starting = Some(msg.to.clone());
        // Sample from now: the set-up (a checkpoint) is the first interval,
        // so the first chunk already knows whether commits are flowing.
        self.commit_path.reset();
        let target = PathBuf::from(&msg.to);
        let work = set_up(
            self.storage.clone(),
            self.fatal.clone(),
            self.live_dir.clone(),
            target.clone(),
            scratch.clone(),
        );
        Box::pin(work.into_actor(self).map(move |res, act, ctx| {
            act.starting = None;
            let snapshot = match res {
                Ok(s) => s,
                Err(e) => {
                    act.failed_to_start(&e);
                    return Err(e);
                }
            };
            let copier = SnapshotCopy::new(snapshot, &target, &act.source);
            let job = LocalJob::new(copier, msg.to, scratch, rate);
            info!(
                "backup to {} started: snapshot commit {}, {} files, {} bytes{}{}",
                job.target,
                job.snapshot_commit,
                job.files_total,
                job.bytes_total,
                rate.map(|r| format!(", at most {r} bytes/s"))
                    .unwrap_or_default(),
                act.busy_rate
                    .filter(|&b| rate.is_none_or(|r| b < r))
                    .map(|b| format!(", {b} bytes/s while commits flow"))
                    .unwrap_or_default()
            );
            let report = job.report();
            act.local = Some(job);
            if let Some((reason, waiters)) = act.abort_at_start() {
                act.abort_local(reason, ctx);
                for waiter in waiters {
                    if let Some(done) = act.abort_local(reason, ctx) {
                        actix::spawn(async move {
                            let _ = waiter.send(done.await.map_err(|_| vanished()));
                        });
                    }
                }
            } else {
                ctx.notify(CopyChunk);
            }
            Ok(report)
        }))
    }
}

impl Handler<CopyChunk> for BackupActor {
    type Result = ();

    fn handle(&mut self, _: CopyChunk, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let busy = self.commit_path.busy(now);
        let Some(job) = self.local.as_mut() else {
            return;
        };
        job.cancel_timer(ctx);
        if job.copier.is_none() {
            return;
        }
        if let Some(reason) = job.abort.clone() {
            self.end_local(BackupState::Aborted, reason, ctx);
            return;
        }
        if job.state == BackupState::Paused {
            return;
        }
        yield_to_commits(&mut job.pace, self.busy_rate, busy, || {
            format!("backup to {}", job.target)
        });
        if let Some(wait) = job.pace.wait(now) {
            job.timer = Some(ctx.run_later(wait, |_, ctx| ctx.notify(CopyChunk)));
            return;
        }
        let mut copier = job.copier.take().expect("checked above");
        let budget = job.pace.chunk(LOCAL_CHUNK);
        let step = blocking(move || {
            let r = copier.step(budget);
            (copier, r)
        });
        ctx.spawn(
            step.into_actor(self)
                .map(move |res, act, ctx| act.chunk_done(res, now, ctx)),
        );
    }
}

impl BackupActor {
    fn chunk_done(
        &mut self,
        res: Result<(SnapshotCopy, Result<Step, StorageError>), BackupError>,
        started: Instant,
        ctx: &mut Context<Self>,
    ) {
        let Some(job) = self.local.as_mut() else {
            return;
        };
        let (copier, step) = match res {
            Ok(r) => r,
            Err(e) => {
                // The copier went down with its thread; the marker still
                // says "in progress", and the report says why.
                self.end_local(BackupState::Failed, e.to_string(), ctx);
                return;
            }
        };
        job.current_file = copier.current_file();
        job.copier = Some(copier);
        match step {
            Ok(step) => {
                job.bytes_done += step.bytes;
                job.files_done = step.files_done;
                job.pace.charge(started, step.bytes);
                if step.complete {
                    self.end_local(BackupState::Completed, String::new(), ctx);
                } else {
                    ctx.notify(CopyChunk);
                }
            }
            Err(e) => self.end_local(BackupState::Failed, e.to_string(), ctx),
        }
    }

    /// Ask the local job to stop; the returned receiver resolves with its
    /// final report. `None` when there is no local job.
    pub(super) fn abort_local(
        &mut self,
        reason: &str,
        ctx: &mut Context<Self>,
    ) -> Option<oneshot::Receiver<BackupReport>> {
        let job = self.local.as_mut()?;
        let (tx, rx) = oneshot::channel();
        job.waiters.push(tx);
        job.abort.get_or_insert_with(|| reason.to_string());
        if job.copier.is_some() {
            ctx.notify(CopyChunk);
        }
        Some(rx)
    }

    /// End the local job: record its final report at once, then (on a
    /// blocking thread) mark an unfinished target incomplete and remove the
    /// scratch copy; waiters get the report when that is done.
    fn end_local(&mut self, state: BackupState, reason: String, ctx: &mut Context<Self>) {
        let Some(mut job) = self.local.take() else {
            return;
        };
        job.cancel_timer(ctx);
        let mut report = job.report();
        report.state = state;
        if state == BackupState::Completed {
            report.current_file = None;
            info!(
                "backup to {} completed: commit {}, {} bytes in {} ms",
                report.target, report.snapshot_commit, report.bytes_done, report.elapsed_ms
            );
        } else {
            report.error = Some(reason.clone());
            warn!("backup to {} {}: {reason}", report.target, state.name());
        }
        self.last = Some(report.clone());
        self.ended.do_send(BackupEnded {
            snapshot_commit: Some(report.snapshot_commit),
            completed: state == BackupState::Completed,
        });
        let copier = job.copier.take();
        let target = job.target_path.clone();
        let scratch = job.scratch.clone();
        let waiters = std::mem::take(&mut job.waiters);
        let word = state.name();
        let cleanup = blocking(move || {
            let marked = match (state, copier) {
                (BackupState::Completed, _) => Ok(()),
                (_, Some(mut c)) => c.mark_incomplete(word, &reason),
                (_, None) => write_marker(
                    &target,
                    &format!("This directory is an INCOMPLETE Magma backup.\nstate: {word}\nreason: {reason}\n"),
                ),
            };
            remove_scratch(&scratch);
            marked
        });
        ctx.spawn(cleanup.into_actor(self).map(move |res, act, _| {
            let problem = match res {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(p) = problem {
                error!("cannot mark backup {} incomplete: {p}", report.target);
                let note = format!("; the incomplete marker could not be written: {p}");
                report.error.get_or_insert_with(String::new).push_str(&note);
                if let Some(last) = act.last.as_mut().filter(|l| l.target == report.target) {
                    *last = report.clone();
                }
            }
            for w in waiters {
                let _ = w.send(report.clone());
            }
        }));
    }
}

impl Handler<PauseBackup> for BackupActor {
    type Result = Result<BackupReport, BackupError>;

    fn handle(&mut self, _: PauseBackup, ctx: &mut Context<Self>) -> Self::Result {
        if self.pull.is_some() {
            return Err(BackupError::PullNotPausable);
        }
        self.check_started()?;
        let Some(job) = self.local.as_mut() else {
            return Err(self.not_running());
        };
        if job.state == BackupState::Running {
            job.state = BackupState::Paused;
            job.cancel_timer(ctx);
            info!(
                "backup to {} paused at {} bytes",
                job.target, job.bytes_done
            );
        }
        Ok(job.report())
    }
}

impl Handler<ResumeBackup> for BackupActor {
    type Result = Result<BackupReport, BackupError>;

    fn handle(&mut self, _: ResumeBackup, ctx: &mut Context<Self>) -> Self::Result {
        if self.pull.is_some() {
            return Err(BackupError::PullNotPausable);
        }
        self.check_started()?;
        let Some(job) = self.local.as_mut() else {
            return Err(self.not_running());
        };
        if job.state == BackupState::Paused {
            job.state = BackupState::Running;
            // Commits during the pause count as just now: the first
            // chunks yield if in doubt (see `CommitActivity::observe`).
            job.pace.reset();
            info!("backup to {} resumed", job.target);
            ctx.notify(CopyChunk);
        }
        Ok(job.report())
    }
}

impl Handler<AbortBackup> for BackupActor {
    type Result = ResponseActFuture<Self, Result<BackupReport, BackupError>>;

    fn handle(&mut self, _: AbortBackup, ctx: &mut Context<Self>) -> Self::Result {
        if self.pull.is_some() {
            let report = self.end_pull(BackupState::Aborted, "aborted by an operator", ctx);
            return Box::pin(actix::fut::ready(Ok(report)));
        }
        if self.starting.is_some() {
            // Taking its snapshot: aborted as soon as it is a job.
            let (tx, rx) = oneshot::channel();
            self.abort_on_start.push(tx);
            return Box::pin(
                async move { rx.await.unwrap_or_else(|_| Err(vanished())) }.into_actor(self),
            );
        }
        let Some(done) = self.abort_local("aborted by an operator", ctx) else {
            return Box::pin(actix::fut::ready(Err(self.not_running())));
        };
        Box::pin(async move { done.await.map_err(|_| vanished()) }.into_actor(self))
    }
}
