//! `CommitLogActor`: the thread that makes the commit log durable.
//!
//! The only actor of its own `Arbiter` (a thread with its own event loop),
//! so an fsync never blocks the server's event loop nor the `StorageActor`
//! (reads go on while the log is being synced); blocking in its handler
//! stalls nothing but its own queue of flushes. Not a `SyncArbiter`: a
//! message to a sync actor is forwarded by the sending system's event
//! loop, which would put an extra thread wake-up between the storage thread
//! asking for a flush and the fsync starting — on the commit path of every
//! group-flushed or replicated batch. Each [`Flush`] carries the `LogSync`
//! handle the storage engine produced for the last commit written.
//!
//! Group commit happens here: the `CommitCoordinator` asks for a flush after
//! every applied batch without waiting for the previous one, so flushes
//! queue up and run back to back. One fsync covers every record written to
//! the segment before it started (`LogSync::sync_written`); a queued flush
//! of the same segment whose commits an earlier fsync already covered is
//! answered at once, without syncing. After a failed fsync every later
//! flush fails too: what the log holds is then unknown, and a retried fsync
//! could report success for data that was lost.
//!
//! Callers: the `CommitCoordinator` (commits of the primary), and whoever
//! makes replicated records durable before acknowledging them.

use std::time::Instant;

use actix::prelude::*;
use log::trace;
use tokio::sync::watch;

use crate::actors::busy_poll;
use crate::storage::LogSync;
use crate::types::CommitNumber;

/// Mailbox capacity for flushes waiting behind the fsync in progress.
const FLUSH_QUEUE: usize = 4096;

/// Syncs the commit log; see the module doc.
#[derive(Default)]
pub struct CommitLogActor {
    /// The handle of the last fsync that succeeded, and the commit it made
    /// durable. Only a handle of the same segment can be covered by it.
    synced: Option<(LogSync, CommitNumber)>,
    /// Why an fsync failed, once one did.
    failed: Option<String>,
    /// The highest commit known durable, published for status: the last
    /// one on disk at start, then the highest an fsync covered. A channel,
    /// not a message, so status answers even while an fsync hangs.
    durable: Option<watch::Sender<CommitNumber>>,
    /// Test hook (`MAGMA_FAULT_HANG_FSYNC_FROM=N`): the fsync that would
    /// make commit N durable never returns, like a hung disk.
    hang_from: Option<CommitNumber>,
}

impl CommitLogActor {
    /// Start the flushing thread (stopped with the actix system),
    /// publishing on `durable` (which starts at the last commit on disk
    /// when the repository was opened). Between flushes its loop polls for
    /// `busy_poll` instead of sleeping (see [`busy_poll`]): the next flush
    /// of a busy pipeline is then picked up without a wake-up.
    pub fn start(
        durable: watch::Sender<CommitNumber>,
        busy_poll: std::time::Duration,
    ) -> Addr<CommitLogActor> {
        let thread = Arbiter::new();
        thread.spawn_fn(move || busy_poll::start(busy_poll));
        let hang_from = std::env::var("MAGMA_FAULT_HANG_FSYNC_FROM")
            .ok()
            .and_then(|v| v.parse().ok());
        CommitLogActor::start_in_arbiter(&thread.handle(), move |_| CommitLogActor {
            durable: Some(durable),
            hang_from,
            ..CommitLogActor::default()
        })
    }

    fn flush(&mut self, sync: LogSync) -> std::io::Result<CommitNumber> {
        if let Some(reason) = &self.failed {
            return Err(std::io::Error::other(format!(
                "an earlier fsync of the commit log failed ({reason})"
            )));
        }
        if let Some((last, durable)) = &self.synced {
            if last.same_segment(&sync) && sync.upto() <= *durable {
                return Ok(*durable);
            }
        }
        let started = Instant::now();
        match sync.sync_written() {
            Ok(durable) => {
                trace!(
                    "log synced up to commit {durable} (asked {}) in {:?}",
                    sync.upto(),
                    started.elapsed()
                );
                self.synced = Some((sync, durable));
                if let Some(tx) = &self.durable {
                    crate::actors::publish_newer(tx, durable);
                }
                Ok(durable)
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                Err(e)
            }
        }
    }
}

impl Actor for CommitLogActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Flushes queue while one runs: at most one per applied batch of
        // each sender, far below this; a full mailbox would only delay
        // them. (actix bounds the capacity below usize::MAX.)
        ctx.set_mailbox_capacity(FLUSH_QUEUE);
    }

    /// Once nobody can send to it any more (the server's event loop is
    /// gone), its thread ends too.
    fn stopped(&mut self, _: &mut Context<Self>) {
        Arbiter::current().stop();
    }
}

/// fsync the log up to `sync.upto()` (unless already done). Sender: the
/// `CommitCoordinator`; never dropped. Reply: the commit number now durable
/// (at least `sync.upto()`), or the I/O error (fatal for the server: what
/// the log holds is then unknown).
#[derive(Message)]
#[rtype(result = "std::io::Result<CommitNumber>")]
pub struct Flush {
    pub sync: LogSync,
}

impl Handler<Flush> for CommitLogActor {
    type Result = std::io::Result<CommitNumber>;

    fn handle(&mut self, msg: Flush, _: &mut Context<Self>) -> Self::Result {
        busy_poll::note_activity();
        if self.hang_from.is_some_and(|n| msg.sync.upto() >= n) {
            log::error!("MAGMA_FAULT_HANG_FSYNC_FROM: the fsync hangs");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        self.flush(msg.sync)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Repository;

    fn append(repo: &mut Repository) -> LogSync {
        let c = repo.commit(crate::storage::CommitRequest {
            meta: vec![("k".into(), Some(vec![0xc0]))],
            ..Default::default()
        });
        c.unwrap().sync
    }

    #[test]
    fn one_fsync_covers_queued_flushes_written_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut repo = Repository::create(dir.path(), 1, "127.0.0.1:1").unwrap();
        let first = append(&mut repo);
        let second = append(&mut repo);
        let (tx, durable) = watch::channel(0);
        let mut log = CommitLogActor {
            durable: Some(tx),
            ..CommitLogActor::default()
        };
        let n = second.upto();
        assert_eq!(log.flush(first).unwrap(), n, "the first sync covers both");
        assert_eq!(log.flush(second).unwrap(), n, "answered without a sync");
        let third = append(&mut repo);
        assert_eq!(log.flush(third).unwrap(), n + 1);
        assert_eq!(*durable.borrow(), n + 1);
        // A handle of another log is never taken as covered.
        let other = std::sync::Arc::new(tempfile::tempfile().unwrap());
        assert_eq!(log.flush(LogSync::new(other, 2)).unwrap(), 2);
        assert_eq!(
            *durable.borrow(),
            n + 1,
            "what status reports never goes back"
        );
    }

    #[test]
    fn after_a_failed_fsync_every_flush_fails() {
        let mut log = CommitLogActor {
            failed: Some("injected".into()),
            ..CommitLogActor::default()
        };
        let file = std::sync::Arc::new(tempfile::tempfile().unwrap());
        let err = log.flush(LogSync::new(file, 1)).unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
    }
}
