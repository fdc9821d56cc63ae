//! Actor tests of the `CommitCoordinator`, with probe actors standing in for
//! the storage actor, the commit-log actor and the controller.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::mpsc;

use super::*;
use crate::storage::Committed;

/// Numbers commits 1, 2, ...; a commit with a put conflicts on its oid.
/// Records the size of every batch it is sent and, like the real one,
/// starts the batch's flush when asked to.
struct FakeStorage {
    last: CommitNumber,
    file: Arc<std::fs::File>,
    batches: Arc<Mutex<Vec<usize>>>,
    /// Answer the first batch this late (later ones at once).
    slow_first: Option<Duration>,
}

impl Actor for FakeStorage {
    type Context = Context<Self>;
}

impl FakeStorage {
    fn commit(&mut self, req: CommitRequest) -> Result<CommitReply, StorageError> {
        if let Some(put) = req.puts.first() {
            return Err(StorageError::Conflict {
                oids: vec![put.oid],
            });
        }
        self.last += 1;
        Ok(CommitReply::Applied(Committed {
            number: self.last,
            body: Arc::new(vec![1]),
            new_oids: Vec::new(),
            positions: vec![self.last],
            sync: LogSync::new(self.file.clone(), self.last),
        }))
    }
}

impl Handler<CommitBatch> for FakeStorage {
    type Result = ResponseFuture<BatchApplied>;

    fn handle(&mut self, msg: CommitBatch, _: &mut Context<Self>) -> Self::Result {
        self.batches.lock().unwrap().push(msg.commits.len());
        let results: Vec<_> = msg.commits.into_iter().map(|r| self.commit(r)).collect();
        let newest = results
            .iter()
            .filter_map(|r| r.as_ref().ok()?.sync())
            .max_by_key(|s| s.upto())
            .cloned();
        let flush = match (msg.flush, newest) {
            (Some(flusher), Some(sync)) => Some((sync.upto(), flusher.send(Flush { sync }))),
            _ => None,
        };
        let delay = self.slow_first.take();
        Box::pin(async move {
            if let Some(d) = delay {
                actix_rt::time::sleep(d).await;
            }
            BatchApplied { results, flush }
        })
    }
}

/// Takes `delay` per flush, records each completed flush, fails on demand.
struct FakeLog {
    delay: Duration,
    fail: bool,
    requested: Arc<Mutex<Vec<CommitNumber>>>,
    flushed: Arc<Mutex<Vec<CommitNumber>>>,
}

impl Actor for FakeLog {
    type Context = Context<Self>;
}

impl Handler<Flush> for FakeLog {
    type Result = ResponseFuture<std::io::Result<CommitNumber>>;

    fn handle(&mut self, msg: Flush, _: &mut Context<Self>) -> Self::Result {
        let (delay, fail, flushed) = (self.delay, self.fail, self.flushed.clone());
        self.requested.lock().unwrap().push(msg.sync.upto());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            if fail {
                return Err(std::io::Error::other("injected fsync failure"));
            }
            flushed.lock().unwrap().push(msg.sync.upto());
            Ok(msg.sync.upto())
        })
    }
}

struct FatalProbe(mpsc::UnboundedSender<String>);

impl Actor for FatalProbe {
    type Context = Context<Self>;
}

impl Handler<Fatal> for FatalProbe {
    type Result = ();

    fn handle(&mut self, msg: Fatal, _: &mut Context<Self>) {
        let _ = self.0.send(msg.reason);
    }
}

struct Rig {
    coordinator: Addr<CommitCoordinator>,
    batches: Arc<Mutex<Vec<usize>>>,
    /// `upto` of each flush, when the commit-log probe received it.
    requested: Arc<Mutex<Vec<CommitNumber>>>,
    flushed: Arc<Mutex<Vec<CommitNumber>>>,
    fatal: mpsc::UnboundedReceiver<String>,
    /// The log file the fake storage's handles refer to.
    file: Arc<std::fs::File>,
}

fn rig(policy: FlushPolicy, delay: Duration, fail: bool) -> Rig {
    rig_with(policy, delay, fail, 0)
}

fn rig_with(policy: FlushPolicy, delay: Duration, fail: bool, sync_replicas: u32) -> Rig {
    rig_full(policy, delay, fail, sync_replicas, None)
}

fn rig_full(
    policy: FlushPolicy,
    delay: Duration,
    fail: bool,
    sync_replicas: u32,
    slow_first: Option<Duration>,
) -> Rig {
    let file = Arc::new(tempfile::tempfile().unwrap());
    let batches = Arc::new(Mutex::new(Vec::new()));
    let storage = FakeStorage {
        last: 0,
        file: file.clone(),
        batches: batches.clone(),
        slow_first,
    }
    .start();
    let requested = Arc::new(Mutex::new(Vec::new()));
    let flushed = Arc::new(Mutex::new(Vec::new()));
    let log = FakeLog {
        delay,
        fail,
        requested: requested.clone(),
        flushed: flushed.clone(),
    }
    .start();
    let (tx, fatal) = mpsc::unbounded_channel();
    let probe = FatalProbe(tx).start();
    let coordinator = CommitCoordinator::new(
        storage.recipient(),
        log.recipient(),
        probe.recipient(),
        policy,
        0,
    )
    .with_sync_replicas(sync_replicas)
    .start();
    Rig {
        coordinator,
        batches,
        requested,
        flushed,
        fatal,
        file,
    }
}

fn append() -> SubmitCommit {
    SubmitCommit(CommitRequest::default())
}

/// Send `n` commits at once; each task checks, when its reply arrives,
/// that a completed flush covers it.
async fn concurrent_commits(rig: &Rig, n: usize) -> Vec<Result<Acknowledged, WireError>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let addr = rig.coordinator.clone();
            let flushed = rig.flushed.clone();
            actix_rt::spawn(async move {
                let res = addr.send(append()).await.unwrap();
                if let Ok(ack) = &res {
                    let durable = flushed.lock().unwrap().iter().copied().max();
                    assert!(
                        durable >= Some(ack.number),
                        "commit {} acknowledged before a flush covered it ({durable:?})",
                        ack.number
                    );
                }
                res
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[actix::test]
async fn group_commit_shares_fsyncs_and_acks_only_durable_commits() {
    let rig = rig(FlushPolicy::Group, Duration::from_millis(50), false);
    let acks = concurrent_commits(&rig, 20).await;
    let mut numbers: Vec<_> = acks.into_iter().map(|a| a.unwrap().number).collect();
    numbers.sort();
    assert_eq!(numbers, (1..=20).collect::<Vec<_>>());
    let flushed = rig.flushed.lock().unwrap().clone();
    // The first flush starts with the first commit; every other commit
    // arrives while it runs and shares the next one.
    assert!(
        flushed.len() <= 3,
        "expected batched flushes, got {flushed:?}"
    );
    assert_eq!(flushed.last(), Some(&20));
    assert!(flushed.windows(2).all(|w| w[0] < w[1]), "{flushed:?}");
}

#[actix::test]
async fn sequential_commits_each_wait_for_their_flush() {
    let rig = rig(FlushPolicy::Group, Duration::from_millis(1), false);
    for n in 1..=3 {
        let ack = rig.coordinator.send(append()).await.unwrap().unwrap();
        assert_eq!(ack.number, n);
        assert_eq!(rig.flushed.lock().unwrap().last(), Some(&n));
    }
}

#[actix::test]
async fn expected_errors_pass_through_and_do_not_stop_the_pipeline() {
    let mut rig = rig(FlushPolicy::Group, Duration::from_millis(1), false);
    let mut req = CommitRequest::default();
    req.puts.push(crate::storage::PutRequest {
        oid: 9,
        expected_version: 1,
        class: "C".into(),
        value: vec![0xc0],
    });
    let res = rig.coordinator.send(SubmitCommit(req)).await.unwrap();
    assert_eq!(res, Err(WireError::Conflict { oids: vec![9] }));
    assert_eq!(
        rig.coordinator
            .send(append())
            .await
            .unwrap()
            .unwrap()
            .number,
        1
    );
    assert!(rig.fatal.try_recv().is_err());
}

#[actix::test]
async fn failed_fsync_is_fatal() {
    let mut rig = rig(FlushPolicy::Group, Duration::from_millis(20), true);
    let acks = concurrent_commits(&rig, 5).await;
    for a in acks {
        assert!(matches!(a, Err(WireError::Internal { .. })), "{a:?}");
    }
    let reason = rig.fatal.recv().await.unwrap();
    assert!(reason.contains("injected fsync failure"), "{reason}");
    let later = rig.coordinator.send(append()).await.unwrap();
    assert!(
        matches!(later, Err(WireError::Internal { .. })),
        "{later:?}"
    );
    assert!(rig.flushed.lock().unwrap().is_empty());
}

#[actix::test]
async fn interval_policy_acks_at_once_and_flushes_on_the_timer() {
    let rig = rig(FlushPolicy::Interval(100), Duration::from_millis(1), false);
    for n in 1..=3 {
        let ack = rig.coordinator.send(append()).await.unwrap().unwrap();
        assert_eq!(ack.number, n);
    }
    assert!(
        rig.requested.lock().unwrap().is_empty(),
        "only the timer flushes"
    );
    assert!(rig.flushed.lock().unwrap().is_empty());
    wait_until("a timer flush up to commit 3", || {
        rig.flushed.lock().unwrap().last() == Some(&3)
    })
    .await;
}

#[actix::test]
async fn drain_flushes_then_refuses() {
    let rig = drain_only_rig();
    for _ in 0..3 {
        rig.coordinator.send(append()).await.unwrap().unwrap();
    }
    let durable = rig.coordinator.send(Drain).await.unwrap();
    assert_eq!(durable, Ok(3));
    assert_eq!(rig.flushed.lock().unwrap().last(), Some(&3));
    // Drained for good: the coordinator stopped, or refuses.
    assert_refused_after_drain(rig.coordinator.send(append()).await);
}

/// A long interval: only a drain makes the commits durable in time.
fn drain_only_rig() -> Rig {
    rig(
        FlushPolicy::Interval(60_000),
        Duration::from_millis(5),
        false,
    )
}

/// A commit sent after a drain: refused, or never answered by the
/// coordinator that stopped.
fn assert_refused_after_drain<E: std::fmt::Debug>(
    answer: Result<Result<Acknowledged, WireError>, E>,
) {
    match answer {
        Err(_) | Ok(Err(WireError::ShuttingDown)) => {}
        other => panic!("commit after drain: {other:?}"),
    }
}

/// The sessions' message: answered on its own channel, in one batch with
/// `SubmitCommit`s delivered beside it, refused alike once drained.
#[actix::test]
async fn queued_commits_are_answered_on_their_channel_and_refused_after_a_drain() {
    let rig = drain_only_rig();
    let queue = |rig: &Rig| {
        let (reply, answer) = oneshot::channel();
        rig.coordinator.do_send(QueueCommit {
            request: CommitRequest::default(),
            reply,
        });
        answer
    };
    let first = queue(&rig);
    let submitted = rig.coordinator.send(append());
    let second = queue(&rig);
    let mut numbers = vec![
        first.await.unwrap().unwrap().number,
        submitted.await.unwrap().unwrap().number,
        second.await.unwrap().unwrap().number,
    ];
    numbers.sort();
    assert_eq!(numbers, vec![1, 2, 3]);
    assert_eq!(*rig.batches.lock().unwrap(), vec![3], "one storage batch");
    assert_eq!(rig.coordinator.send(Drain).await.unwrap(), Ok(3));
    assert_refused_after_drain(queue(&rig).await);
}

#[actix::test]
async fn drain_waits_for_commits_in_flight() {
    let rig = rig(FlushPolicy::Group, Duration::from_millis(30), false);
    let pending = {
        let addr = rig.coordinator.clone();
        actix_rt::spawn(async move { addr.send(append()).await.unwrap() })
    };
    tokio::task::yield_now().await;
    let durable = rig.coordinator.send(Drain).await.unwrap();
    assert_eq!(durable, Ok(1));
    assert_eq!(pending.await.unwrap().unwrap().number, 1);
}

#[actix::test]
async fn commits_delivered_together_share_one_storage_batch() {
    let rig = rig(FlushPolicy::Group, Duration::from_millis(1), false);
    let acks = concurrent_commits(&rig, 12).await;
    let mut numbers: Vec<_> = acks.into_iter().map(|a| a.unwrap().number).collect();
    numbers.sort();
    assert_eq!(numbers, (1..=12).collect::<Vec<_>>());
    let batches = rig.batches.lock().unwrap().clone();
    assert_eq!(batches.iter().sum::<usize>(), 12, "{batches:?}");
    assert!(
        batches.len() < 12 && batches[0] > 1,
        "commits delivered together were not batched: {batches:?}"
    );
    // Once the pipeline is idle, a lone commit is sent on at once.
    let ack = rig.coordinator.send(append()).await.unwrap().unwrap();
    assert_eq!(ack.number, 13);
    assert_eq!(rig.batches.lock().unwrap().last(), Some(&1));
}

#[actix::test]
async fn each_commit_of_a_batch_gets_its_own_answer_in_order() {
    let mut rig = rig(FlushPolicy::Group, Duration::from_millis(5), false);
    let mut conflicting = CommitRequest::default();
    conflicting.puts.push(crate::storage::PutRequest {
        oid: 7,
        expected_version: 1,
        class: "C".into(),
        value: vec![0xc0],
    });
    // Sent without awaiting: all three are in the mailbox together.
    let first = rig.coordinator.send(append());
    let refused = rig.coordinator.send(SubmitCommit(conflicting));
    let third = rig.coordinator.send(append());
    let (first, refused, third) = tokio::join!(first, refused, third);
    assert_eq!(rig.batches.lock().unwrap().clone(), vec![3]);
    assert_eq!(first.unwrap().unwrap().number, 1);
    assert_eq!(refused.unwrap(), Err(WireError::Conflict { oids: vec![7] }));
    assert_eq!(third.unwrap().unwrap().number, 2);
    assert_eq!(rig.flushed.lock().unwrap().clone(), vec![2]);
    assert!(rig.fatal.try_recv().is_err());
}

#[actix::test]
async fn drain_waits_for_commits_still_queued() {
    let rig = rig(FlushPolicy::Group, Duration::from_millis(5), false);
    let a = rig.coordinator.send(append());
    let b = rig.coordinator.send(append());
    // Delivered right behind the two commits, before they were dispatched.
    let drained = rig.coordinator.send(Drain);
    let (a, b, drained) = tokio::join!(a, b, drained);
    assert_eq!(drained.unwrap(), Ok(2));
    assert_eq!(
        (a.unwrap().unwrap().number, b.unwrap().unwrap().number),
        (1, 2)
    );
    assert_eq!(rig.flushed.lock().unwrap().last(), Some(&2));
}

/// Poll `done` every millisecond until it holds (at most 5 s).
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[actix::test]
async fn group_flushes_queue_behind_the_one_in_flight() {
    let rig = rig(FlushPolicy::Group, Duration::from_millis(100), false);
    let first = {
        let addr = rig.coordinator.clone();
        actix_rt::spawn(async move { addr.send(append()).await.unwrap() })
    };
    wait_until("first flush", || *rig.requested.lock().unwrap() == [1]).await;
    let second = {
        let addr = rig.coordinator.clone();
        actix_rt::spawn(async move { addr.send(append()).await.unwrap() })
    };
    // The second commit's flush is requested while the first one runs.
    wait_until("second flush", || *rig.requested.lock().unwrap() == [1, 2]).await;
    assert!(
        rig.flushed.lock().unwrap().is_empty(),
        "the first flush ended"
    );
    assert_eq!(first.await.unwrap().unwrap().number, 1);
    assert_eq!(second.await.unwrap().unwrap().number, 2);
    assert_eq!(*rig.flushed.lock().unwrap(), [1, 2]);
}

/// What a secondary's `replicate` (answered once applied) tells the
/// coordinator: records up to `upto` were written.
fn replicated(rig: &Rig, upto: CommitNumber) -> NoteReplicated {
    NoteReplicated {
        sync: Some(LogSync::new(rig.file.clone(), upto)),
    }
}

#[actix::test]
async fn replicated_records_are_flushed_at_once_under_group_without_waiting() {
    let rig = rig(FlushPolicy::Group, Duration::from_millis(50), false);
    // Handled before the 50 ms flush it started ends.
    rig.coordinator.send(replicated(&rig, 5)).await.unwrap();
    assert_eq!(*rig.requested.lock().unwrap(), [5]);
    assert!(rig.flushed.lock().unwrap().is_empty());
    wait_until("the flush up to 5", || *rig.flushed.lock().unwrap() == [5]).await;
    rig.coordinator.send(replicated(&rig, 7)).await.unwrap();
    wait_until("the flush up to 7", || {
        rig.flushed.lock().unwrap().last() == Some(&7)
    })
    .await;
}

#[actix::test]
async fn replicated_records_wait_for_the_interval_timer_or_the_drain() {
    let rig = rig(FlushPolicy::Interval(100), Duration::from_millis(1), false);
    rig.coordinator.send(replicated(&rig, 4)).await.unwrap();
    assert!(
        rig.requested.lock().unwrap().is_empty(),
        "only the timer flushes"
    );
    wait_until("a timer flush up to 4", || {
        rig.flushed.lock().unwrap().last() == Some(&4)
    })
    .await;

    let rig = self::rig(
        FlushPolicy::Interval(60_000),
        Duration::from_millis(1),
        false,
    );
    rig.coordinator.send(replicated(&rig, 3)).await.unwrap();
    assert!(rig.requested.lock().unwrap().is_empty());
    assert_eq!(rig.coordinator.send(Drain).await.unwrap(), Ok(3));
    assert_eq!(rig.flushed.lock().unwrap().last(), Some(&3));
}

#[actix::test]
async fn a_failed_fsync_of_replicated_records_is_fatal() {
    let mut rig = rig(FlushPolicy::Group, Duration::from_millis(1), true);
    rig.coordinator.send(replicated(&rig, 2)).await.unwrap();
    let reason = rig.fatal.recv().await.unwrap();
    assert!(reason.contains("injected fsync failure"), "{reason}");
    // What the log holds is unknown now: nothing is flushed again.
    rig.coordinator.send(replicated(&rig, 3)).await.unwrap();
    assert_eq!(*rig.requested.lock().unwrap(), [2]);
}

#[actix::test]
async fn after_a_fence_nothing_is_acknowledged_until_lead() {
    let rig = rig(FlushPolicy::Group, Duration::from_millis(30), false);
    // Delivered before the fence: on their way through the pipeline.
    let before: Vec<_> = (0..3).map(|_| rig.coordinator.send(append())).collect();
    rig.coordinator.do_send(Fence {
        reason: "deposed".into(),
    });
    let after = rig.coordinator.send(append()).await.unwrap();
    assert_eq!(after, Err(WireError::WrongServer { primary: None }));
    for res in before {
        match res.await.unwrap() {
            Ok(ack) => panic!("commit {} acknowledged after the fence", ack.number),
            Err(WireError::WrongServer { .. } | WireError::Internal { .. }) => {}
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }
    rig.coordinator.do_send(Lead);
    let led = rig.coordinator.send(append()).await.unwrap().unwrap();
    let durable = rig.flushed.lock().unwrap().iter().copied().max();
    assert!(durable >= Some(led.number));
}

/// The acknowledgement a coordinator request resolves to, within 10 s.
async fn acknowledged<F>(request: F) -> Acknowledged
where
    F: std::future::Future<Output = Result<Result<Acknowledged, WireError>, MailboxError>>,
{
    tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("answered within 10 s")
        .unwrap()
        .unwrap()
}

/// Stands in for a secondary's `BroadcastActor`: records what it is handed.
struct LinkProbe(Arc<Mutex<Vec<CommitNumber>>>);

impl Actor for LinkProbe {
    type Context = Context<Self>;
}

impl Handler<crate::actors::broadcast::Broadcast> for LinkProbe {
    type Result = ();

    fn handle(&mut self, msg: crate::actors::broadcast::Broadcast, _: &mut Context<Self>) {
        let mut seen = self.0.lock().unwrap();
        seen.extend(msg.records.iter().map(|(n, _)| *n));
    }
}

#[actix::test]
async fn a_replica_being_removed_is_still_streamed_to_but_waited_for_by_nobody() {
    let rig = rig_with(FlushPolicy::Group, Duration::ZERO, false, 1);
    let handed = Arc::new(Mutex::new(Vec::new()));
    let link = LinkProbe(handed.clone()).start();
    rig.coordinator.do_send(AddReplica {
        server_id: 7,
        link: link.recipient(),
        joining: false,
    });
    // It never acknowledges: the commit waits for it...
    let waiting = rig.coordinator.send(append());
    let mut waiting = Box::pin(waiting);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut waiting)
            .await
            .is_err(),
        "acknowledged without the replica"
    );
    // ...until it stops being counted (its removal is being committed).
    rig.coordinator.do_send(StopCounting { server_id: 7 });
    let first = acknowledged(waiting).await;
    // Later commits are acknowledged alone and still handed to it, so it
    // receives the record of its own removal.
    let second = rig.coordinator.send(append()).await.unwrap().unwrap();
    wait_until("both records handed to the replica", || {
        *handed.lock().unwrap() == vec![first.number, second.number]
    })
    .await;
}

#[actix::test]
async fn a_commit_status_waits_as_long_as_the_commit_itself() {
    let rig = rig_with(FlushPolicy::Group, Duration::ZERO, false, 1);
    let link = LinkProbe(Arc::default()).start();
    rig.coordinator.do_send(AddReplica {
        server_id: 7,
        link: link.recipient(),
        joining: false,
    });
    let mut commit = Box::pin(rig.coordinator.send(append()));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut commit)
            .await
            .is_err()
    );
    // Applied here (the fake storage numbers it 1), not yet replicated:
    // asking about it waits like the commit.
    let mut status = Box::pin(rig.coordinator.send(AwaitAcknowledgeable { number: 1 }));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut status)
            .await
            .is_err(),
        "a commit status said 1 exists before the secondary held it"
    );
    rig.coordinator.do_send(ReplicaAck {
        server_id: 7,
        durable: 1,
    });
    assert_eq!(acknowledged(status).await.number, 1);
    assert_eq!(acknowledged(commit).await.number, 1);
    // Once acknowledged, the answer is immediate.
    let again = rig.coordinator.send(AwaitAcknowledgeable { number: 1 });
    assert_eq!(acknowledged(again).await.number, 1);
}

#[actix::test]
async fn batches_are_handled_in_the_order_they_were_sent() {
    // Storage answers the first batch after the second (as two answers
    // ready together may be polled in any order).
    let rig = rig_full(
        FlushPolicy::Interval(5),
        Duration::ZERO,
        false,
        0,
        Some(Duration::from_millis(100)),
    );
    let order = Arc::new(Mutex::new(Vec::new()));
    let send = |order: Arc<Mutex<Vec<CommitNumber>>>| {
        let addr = rig.coordinator.clone();
        actix_rt::spawn(async move {
            let ack = addr.send(append()).await.unwrap().unwrap();
            order.lock().unwrap().push(ack.number);
        })
    };
    let first = send(order.clone());
    let batches = rig.batches.clone();
    wait_until("the first batch at storage", || {
        batches.lock().unwrap().len() == 1
    })
    .await;
    let second = send(order.clone());
    first.await.unwrap();
    second.await.unwrap();
    assert_eq!(*order.lock().unwrap(), vec![1, 2]);
}

#[actix::test]
async fn a_joining_replica_counts_only_once_every_other_replica_knows_it() {
    // sync-replicas 1, an old secondary 7 and a joiner 8 added by node
    // change 1.
    let rig = rig_with(FlushPolicy::Group, Duration::ZERO, false, 1);
    for (server_id, joining) in [(7, false), (8, true)] {
        rig.coordinator.do_send(AddReplica {
            server_id,
            link: LinkProbe(Arc::default()).start().recipient(),
            joining,
        });
    }
    // The node change adding 8 waits for 7 alone.
    let change = Box::pin(rig.coordinator.send(append()));
    let ack = |server_id, durable| ReplicaAck { server_id, durable };
    rig.coordinator.do_send(ack(7, 1));
    let change = acknowledged(change).await;
    rig.coordinator.do_send(JoinedAt {
        server_id: 8,
        commit: change.number,
    });
    // 7 has it (knows 8): 8's acknowledgement now suffices.
    let next = rig.coordinator.send(append());
    rig.coordinator.do_send(ack(8, 2));
    assert_eq!(acknowledged(next).await.number, 2);

    // A second joiner 9, added by change 3, that 7 has not applied yet:
    // 9 alone does not make commit 4 acknowledged, 7 does.
    rig.coordinator.do_send(AddReplica {
        server_id: 9,
        link: LinkProbe(Arc::default()).start().recipient(),
        joining: true,
    });
    let change = Box::pin(rig.coordinator.send(append()));
    rig.coordinator.do_send(ack(8, 3));
    let change = acknowledged(change).await;
    rig.coordinator.do_send(JoinedAt {
        server_id: 9,
        commit: change.number,
    });
    let mut held_by_9 = Box::pin(rig.coordinator.send(append()));
    rig.coordinator.do_send(ack(9, 4));
    rig.coordinator.do_send(ack(8, 2));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut held_by_9)
            .await
            .is_err(),
        "acknowledged on a replica the others do not know yet"
    );
    rig.coordinator.do_send(ack(7, 4));
    assert_eq!(acknowledged(held_by_9).await.number, 4);
}
