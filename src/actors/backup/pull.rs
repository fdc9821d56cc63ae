//! The pull job: a snapshot held open while a client (`magma backup
//! --pull`) fetches its files over the protocol, chunk by chunk.
//!
//! The job survives the client's connection: a client that reconnects with
//! the job's id continues from the offsets it has. The job ends when the
//! client sends `FinishPull`, when an operator aborts it, at shutdown, or
//! after [`PULL_IDLE_TIMEOUT`] without a request. Chunk reads run on
//! blocking threads; the rate limit (and yielding to a busy commit path,
//! as a local job does) delays a chunk's reply, never a thread. The chunk
//! size told to the client is fixed at the start, so yielding only spaces
//! replies out.
//! While a file is served in one sequential pass, its BLAKE3 is computed on
//! the way, so the client can check what it stored against what was sent;
//! the client's own checksums, sent with `FinishPull`, decide whether the
//! job ends as a completed backup (the one the commit log is kept for).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use actix::prelude::*;
use log::{info, warn};

use crate::actors::backup::local::snapshot_failure;
use crate::actors::backup::{
    blocking, effective_rate, yield_to_commits, BackupActor, BackupError, FinishPull, Pace,
    PullChunk, StartPull, MAX_PULL_CHUNK, PULL_IDLE_TIMEOUT,
};
use crate::actors::storage::{BackupEnded, TakeSnapshot};
use crate::protocol::{BackupReport, BackupState, PullFile, PullSnapshot};
use crate::storage::backup::{remove_scratch, unix_ms_now};
use crate::storage::Snapshot;
use crate::types::hex;

/// One file of a pull job.
struct Served {
    path: String,
    source: PathBuf,
    size: u64,
    /// End of the furthest chunk served.
    served_to: u64,
    /// Hash of `[0, hashed_to)`; `None` while a chunk holds it, or for good
    /// once the pass was not sequential.
    hasher: Option<blake3::Hasher>,
    hashed_to: u64,
}

/// The open pull job.
pub(super) struct PullJob {
    id: u64,
    label: String,
    scratch: PathBuf,
    snapshot_commit: u64,
    files: Vec<Served>,
    pace: Pace,
    max_chunk: u64,
    current: Option<String>,
    started: Instant,
    started_unix_ms: u64,
    last_used: Instant,
}

fn display_path(p: &Path) -> String {
    p.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

impl PullJob {
    fn new(
        id: u64,
        snapshot: &Snapshot,
        scratch: PathBuf,
        to: Option<String>,
        rate: Option<u64>,
    ) -> Self {
        let pace = Pace::new(rate);
        PullJob {
            id,
            label: format!("pull job {id} to {}", to.as_deref().unwrap_or("a client")),
            scratch,
            snapshot_commit: snapshot.commit,
            files: snapshot
                .files
                .iter()
                .map(|f| Served {
                    path: display_path(&f.relative),
                    source: f.source.clone(),
                    size: f.len,
                    served_to: 0,
                    hasher: Some(blake3::Hasher::new()),
                    hashed_to: 0,
                })
                .collect(),
            max_chunk: pace.chunk(MAX_PULL_CHUNK),
            pace,
            current: None,
            started: Instant::now(),
            started_unix_ms: unix_ms_now(),
            last_used: Instant::now(),
        }
    }

    pub(super) fn describe(&self) -> String {
        let r = self.report();
        format!(
            "{}, {} of {} bytes served",
            self.label, r.bytes_done, r.bytes_total
        )
    }

    pub(super) fn report(&self) -> BackupReport {
        BackupReport {
            state: BackupState::Running,
            target: self.label.clone(),
            snapshot_commit: self.snapshot_commit,
            current_file: self.current.clone(),
            bytes_done: self.files.iter().map(|f| f.served_to).sum(),
            bytes_total: self.files.iter().map(|f| f.size).sum(),
            files_done: self.files.iter().filter(|f| f.served_to == f.size).count() as u64,
            files_total: self.files.len() as u64,
            started_unix_ms: self.started_unix_ms,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            error: None,
        }
    }

    fn checksums(&mut self) -> Vec<PullFile> {
        self.files
            .iter_mut()
            .map(|f| PullFile {
                path: f.path.clone(),
                size: f.size,
                blake3: match f.hasher.take() {
                    Some(h) if f.hashed_to == f.size => Some(hex(h.finalize().as_bytes())),
                    _ => None,
                },
            })
            .collect()
    }
}

impl BackupActor {
    /// End the pull job with `state`; returns its final report.
    pub(super) fn end_pull(
        &mut self,
        state: BackupState,
        reason: &str,
        ctx: &mut Context<Self>,
    ) -> BackupReport {
        let job = self.pull.take().expect("a pull job");
        let mut report = job.report();
        report.state = state;
        if state != BackupState::Completed {
            report.error = Some(reason.to_string());
            warn!("{} {}: {reason}", job.label, state.name());
        } else {
            info!(
                "{} completed: commit {}, {} bytes in {} ms",
                job.label, report.snapshot_commit, report.bytes_done, report.elapsed_ms
            );
        }
        self.last = Some(report.clone());
        self.ended.do_send(BackupEnded {
            snapshot_commit: Some(report.snapshot_commit),
            completed: state == BackupState::Completed,
        });
        let scratch = job.scratch;
        ctx.spawn(
            blocking(move || {
                remove_scratch(&scratch);
            })
            .into_actor(self)
            .map(|_, _, _| ()),
        );
        report
    }

    pub(super) fn expire_idle_pull(&mut self, ctx: &mut Context<Self>) {
        if let Some(job) = &self.pull {
            if job.last_used.elapsed() > PULL_IDLE_TIMEOUT {
                let why = format!(
                    "no request for {} s: the snapshot was released",
                    PULL_IDLE_TIMEOUT.as_secs()
                );
                self.end_pull(BackupState::Aborted, &why, ctx);
            }
        }
    }

    fn pull_job(&mut self, id: u64) -> Result<&mut PullJob, BackupError> {
        match self.pull.as_mut() {
            Some(j) if j.id == id => Ok(j),
            _ => Err(BackupError::UnknownPull { id }),
        }
    }
}

impl Handler<StartPull> for BackupActor {
    type Result = ResponseActFuture<Self, Result<PullSnapshot, BackupError>>;

    fn handle(&mut self, msg: StartPull, _: &mut Context<Self>) -> Self::Result {
        let rate = match self
            .check_free()
            .and_then(|()| effective_rate(msg.rate, self.default_rate))
        {
            Ok(rate) => rate,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        let (id, scratch) = self.new_job();
        self.starting = Some(format!("pull job {id}"));
        // Sample from now (see `StartBackup`).
        self.commit_path.reset();
        let storage = self.storage.clone();
        let fatal = self.fatal.clone();
        let s = scratch.clone();
        let work = async move {
            match storage.send(TakeSnapshot { scratch: s }).await {
                Ok(Ok(pending)) => match blocking(move || pending.complete()).await? {
                    Ok(snapshot) => Ok(snapshot),
                    Err(e) => Err(snapshot_failure(&fatal, e)),
                },
                Ok(Err(e)) => Err(snapshot_failure(&fatal, e)),
                Err(e) => Err(BackupError::Snapshot(format!(
                    "the storage actor is gone ({e})"
                ))),
            }
        };
        Box::pin(work.into_actor(self).map(move |res, act, ctx| {
            act.starting = None;
            let snapshot = match res {
                Ok(s) => s,
                Err(e) => {
                    act.failed_to_start(&e);
                    ctx.spawn(
                        blocking(move || {
                            remove_scratch(&scratch);
                        })
                        .into_actor(act)
                        .map(|_, _, _| ()),
                    );
                    return Err(e);
                }
            };
            let job = PullJob::new(id, &snapshot, scratch, msg.to, rate);
            let reply = PullSnapshot {
                id,
                snapshot_commit: snapshot.commit,
                repository_id: snapshot.repository_id.to_string(),
                header: snapshot.header.clone(),
                files: job
                    .files
                    .iter()
                    .map(|f| PullFile {
                        path: f.path.clone(),
                        size: f.size,
                        blake3: None,
                    })
                    .collect(),
                max_chunk: job.max_chunk,
                idle_timeout_s: PULL_IDLE_TIMEOUT.as_secs(),
            };
            info!(
                "{} started: snapshot commit {}, {} files, {} bytes",
                job.label,
                reply.snapshot_commit,
                reply.files.len(),
                job.report().bytes_total
            );
            act.pull = Some(job);
            if let Some((reason, waiters)) = act.abort_at_start() {
                let report = act.end_pull(BackupState::Aborted, reason, ctx);
                for waiter in waiters {
                    let _ = waiter.send(Ok(report.clone()));
                }
                return Err(if act.stopping {
                    BackupError::ShuttingDown
                } else {
                    BackupError::NotRunning {
                        last: Some(format!("to {}: aborted", report.target)),
                    }
                });
            }
            Ok(reply)
        }))
    }
}

impl Handler<PullChunk> for BackupActor {
    type Result = ResponseActFuture<Self, Result<Vec<u8>, BackupError>>;

    fn handle(&mut self, msg: PullChunk, _: &mut Context<Self>) -> Self::Result {
        let now = Instant::now();
        let busy = self.commit_path.busy(now);
        let busy_rate = self.busy_rate;
        let job = match self.pull_job(msg.id) {
            Ok(j) => j,
            Err(e) => return Box::pin(actix::fut::ready(Err(e))),
        };
        job.last_used = now;
        let max_chunk = job.max_chunk;
        let Some(index) = job.files.iter().position(|f| f.path == msg.file) else {
            let e =
                BackupError::BadChunk(format!("pull job {} has no file {:?}", msg.id, msg.file));
            return Box::pin(actix::fut::ready(Err(e)));
        };
        let f = &mut job.files[index];
        if msg.offset > f.size {
            let e = BackupError::BadChunk(format!(
                "offset {} is past the end of {} ({} bytes)",
                msg.offset, f.path, f.size
            ));
            return Box::pin(actix::fut::ready(Err(e)));
        }
        let len = msg.len.min(max_chunk).min(f.size - msg.offset);
        // The checksum goes on from where it stopped, also when this chunk
        // starts before that (a client resuming after a partial write);
        // only a gap ends it.
        let (hasher, skip) = if msg.offset <= f.hashed_to && f.hashed_to < msg.offset + len {
            (f.hasher.take(), f.hashed_to - msg.offset)
        } else {
            if msg.offset > f.hashed_to {
                // A gap: this file's checksum can no longer be computed.
                f.hasher = None;
            }
            (None, 0)
        };
        let source = f.source.clone();
        let path = f.path.clone();
        job.current = Some(path.clone());
        yield_to_commits(&mut job.pace, busy_rate, busy, || job.label.clone());
        let begin = job.pace.charge(now, len);
        let offset = msg.offset;
        let id = msg.id;
        let work = async move {
            if begin > now {
                actix_rt::time::sleep(begin - now).await;
            }
            let p = path.clone();
            blocking(move || {
                let mut data = vec![0u8; len as usize];
                let read = std::fs::File::open(&source)
                    .and_then(|file| file.read_exact_at(&mut data, offset));
                let hasher = hasher.map(|mut h| {
                    if read.is_ok() {
                        h.update(&data[skip as usize..]);
                    }
                    h
                });
                (read.map(|()| data), hasher)
            })
            .await
            .map(|(read, hasher)| {
                let read = read.map_err(|e| BackupError::Read {
                    file: p,
                    error: e.to_string(),
                });
                (read, hasher)
            })
        };
        Box::pin(work.into_actor(self).map(move |res, act, _| {
            let (data, hasher) = res?;
            if let Ok(job) = act.pull_job(id) {
                job.last_used = Instant::now();
                let f = &mut job.files[index];
                if let Some(h) = hasher {
                    f.hasher = Some(h);
                    if data.is_ok() {
                        f.hashed_to = offset + len;
                    }
                }
                if data.is_ok() {
                    f.served_to = f.served_to.max(offset + len);
                }
            }
            data
        }))
    }
}

impl Handler<FinishPull> for BackupActor {
    type Result = Result<Vec<PullFile>, BackupError>;

    fn handle(&mut self, msg: FinishPull, ctx: &mut Context<Self>) -> Self::Result {
        let job = self.pull_job(msg.id)?;
        let files = job.checksums();
        let short: Vec<&str> = job
            .files
            .iter()
            .filter(|f| f.served_to < f.size)
            .map(|f| f.path.as_str())
            .collect();
        let unconfirmed = msg
            .held
            .as_deref()
            .map(|held| PullFile::unconfirmed(&files, held))
            .unwrap_or_default();
        if !short.is_empty() {
            let why = format!(
                "the client finished without fetching all of {}",
                short.join(", ")
            );
            self.end_pull(BackupState::Aborted, &why, ctx);
        } else if !unconfirmed.is_empty() {
            // The client will not seal this copy: it is no backup the log
            // may be kept for.
            let why = format!(
                "the client's copy is not what was sent: {}",
                unconfirmed.join("; ")
            );
            self.end_pull(BackupState::Aborted, &why, ctx);
        } else {
            self.end_pull(BackupState::Completed, "", ctx);
        }
        Ok(files)
    }
}
