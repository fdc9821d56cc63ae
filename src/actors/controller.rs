//! `Controller`: the server's lifecycle: periodic checkpoints, graceful
//! shutdown and fatal stops.
//!
//! An async actor. It sends [`Checkpoint`] to the `StorageActor` on a timer
//! (its handlers block its thread, so it keeps no timers of its own), at
//! most one in flight.
//!
//! Shutdown ([`RequestShutdown`] from a signal, an admin session or a test,
//! or [`Fatal`] from whoever met a fatal error) runs these steps in order,
//! each one awaited, none able to stall the next (errors are logged and the
//! sequence goes on):
//!
//! 1. the listener stops accepting connections;
//! 2. the commit pipeline drains: commits already submitted are applied,
//!    flushed and acknowledged, new ones are refused;
//! 3. every session is closed once its queued replies are written;
//! 4. a running backup job is aborted (its target marked incomplete);
//! 5. the repository is closed (final checkpoint unless `save` is false or
//!    the server failed), which releases its lock;
//! 6. the outcome is sent to whoever started the server.

use std::time::Duration;

use actix::prelude::*;
use log::{error, info, warn};
use tokio::sync::oneshot;

use crate::actors::backup::StopBackups;
use crate::actors::coordinator::Drain;
use crate::actors::listener::{CloseSessions, StopAccepting};
use crate::actors::supervisor::LeaveNode;

/// Bound on leaving the node (hand-over included) at shutdown.
const LEAVE_WAIT: Duration = Duration::from_secs(10);
use crate::actors::storage::{Checkpoint, Close};

/// How the server ended: `Err` names the fatal failure.
pub type Outcome = Result<(), String>;

/// The addresses the controller steers.
pub struct Controlled {
    pub storage_checkpoint: Recipient<Checkpoint>,
    pub storage_close: Recipient<Close>,
    pub drain: Recipient<Drain>,
    pub stop_accepting: Recipient<StopAccepting>,
    pub close_sessions: Recipient<CloseSessions>,
    pub stop_backups: Recipient<StopBackups>,
    pub leave_node: Recipient<LeaveNode>,
}

/// Runs the lifecycle; see the module doc.
pub struct Controller {
    parts: Controlled,
    checkpoint_every: Duration,
    checkpointing: bool,
    stopping: bool,
    failure: Option<String>,
    outcome: Option<oneshot::Sender<Outcome>>,
}

impl Controller {
    /// `outcome` receives how the server ended, once it has fully stopped.
    pub fn new(
        parts: Controlled,
        checkpoint_every: Duration,
        outcome: oneshot::Sender<Outcome>,
    ) -> Self {
        Controller {
            parts,
            checkpoint_every,
            checkpointing: false,
            stopping: false,
            failure: None,
            outcome: Some(outcome),
        }
    }

    fn checkpoint_tick(&mut self, ctx: &mut Context<Self>) {
        if self.stopping || self.checkpointing {
            return;
        }
        self.checkpointing = true;
        self.parts
            .storage_checkpoint
            .send(Checkpoint)
            .into_actor(self)
            .map(|res, act, ctx| {
                act.checkpointing = false;
                match res {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if e.is_fatal() => {
                        ctx.notify(Fatal {
                            reason: format!("checkpoint failed: {e}"),
                        });
                    }
                    Ok(Err(e)) => warn!("checkpoint failed: {e}"),
                    Err(e) if !act.stopping => warn!("checkpoint not delivered: {e}"),
                    Err(_) => {}
                }
            })
            .spawn(ctx);
    }

    fn begin_stop(&mut self, save: bool, ctx: &mut Context<Self>) {
        self.stopping = true;
        let stop_accepting = self.parts.stop_accepting.clone();
        let drain = self.parts.drain.clone();
        let close_sessions = self.parts.close_sessions.clone();
        let close = self.parts.storage_close.clone();
        let stop_backups = self.parts.stop_backups.clone();
        let leave_node = self.parts.leave_node.clone();
        async move {
            // First, while still listening: a secondary tells the primary it
            // leaves; a primary hands over to a current secondary.
            match tokio::time::timeout(LEAVE_WAIT, leave_node.send(LeaveNode)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("node supervisor gone during shutdown: {e}"),
                Err(_) => warn!("leaving the node took over {LEAVE_WAIT:?}; stopping anyway"),
            }
            if let Err(e) = stop_accepting.send(StopAccepting).await {
                warn!("listener gone during shutdown: {e}");
            }
            let drained = match drain.send(Drain).await {
                Ok(Ok(durable)) => {
                    info!("commit pipeline drained; durable up to commit {durable}");
                    true
                }
                Ok(Err(reason)) => {
                    warn!("commit pipeline failed before shutdown: {reason}");
                    false
                }
                Err(e) => {
                    warn!("commit coordinator gone during shutdown: {e}");
                    false
                }
            };
            match close_sessions.send(CloseSessions).await {
                Ok(n) if n > 0 => info!("closed {n} open session(s)"),
                Ok(_) => {}
                Err(e) => warn!("listener gone while closing sessions: {e}"),
            }
            if let Err(e) = stop_backups.send(StopBackups).await {
                warn!("backup actor gone during shutdown: {e}");
            }
            let save = save && drained;
            match close.send(Close { save }).await {
                Ok(Ok(last)) => info!("repository closed at commit {last}"),
                Ok(Err(e)) => error!("closing the repository failed: {e}"),
                Err(e) => error!("storage actor gone during shutdown: {e}"),
            }
        }
        .into_actor(self)
        .map(|(), act, ctx| {
            let outcome = match act.failure.take() {
                Some(reason) => Err(reason),
                None => Ok(()),
            };
            match &outcome {
                Ok(()) => info!("server stopped"),
                Err(reason) => error!("server stopped after a fatal error: {reason}"),
            }
            if let Some(tx) = act.outcome.take() {
                let _ = tx.send(outcome);
            }
            ctx.stop();
        })
        .spawn(ctx);
    }
}

impl Actor for Controller {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.checkpoint_every, |act, ctx| act.checkpoint_tick(ctx));
    }
}

/// Stop the server gracefully; `save` writes a final checkpoint (without it
/// the log, already synced, is replayed on the next start). Senders: the
/// signal handler, admin sessions (after replying), tests. May be sent more
/// than once: later requests are ignored.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RequestShutdown {
    pub save: bool,
    /// Who asked, for the log.
    pub reason: String,
}

impl Handler<RequestShutdown> for Controller {
    type Result = ();

    fn handle(&mut self, msg: RequestShutdown, ctx: &mut Context<Self>) {
        if self.stopping {
            info!("shutdown already in progress ({} asked again)", msg.reason);
            return;
        }
        info!(
            "shutting down ({}), {} final checkpoint",
            msg.reason,
            if msg.save { "with a" } else { "without a" }
        );
        self.begin_stop(msg.save, ctx);
    }
}

/// A fatal failure: the server stops serving and exits non-zero. Senders:
/// the `CommitCoordinator` (failed fsync or commit), sessions (a fatal
/// storage error on a read), the controller's own checkpoint timer. May be
/// sent more than once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Fatal {
    pub reason: String,
}

impl Handler<Fatal> for Controller {
    type Result = ();

    fn handle(&mut self, msg: Fatal, ctx: &mut Context<Self>) {
        error!("fatal: {}", msg.reason);
        if self.failure.is_none() {
            self.failure = Some(msg.reason);
        }
        if !self.stopping {
            self.begin_stop(false, ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::types::CommitNumber;

    /// Stands in for storage, coordinator and listener; records each step.
    struct Probe(Arc<Mutex<Vec<String>>>);

    impl Probe {
        fn note(&self, step: impl Into<String>) {
            self.0.lock().unwrap().push(step.into());
        }
    }

    impl Actor for Probe {
        type Context = Context<Self>;
    }

    impl Handler<Checkpoint> for Probe {
        type Result = Result<bool, crate::storage::StorageError>;
        fn handle(&mut self, _: Checkpoint, _: &mut Context<Self>) -> Self::Result {
            Ok(false)
        }
    }

    impl Handler<Close> for Probe {
        type Result = Result<CommitNumber, crate::storage::StorageError>;
        fn handle(&mut self, msg: Close, _: &mut Context<Self>) -> Self::Result {
            self.note(format!("close save={}", msg.save));
            Ok(9)
        }
    }

    impl Handler<Drain> for Probe {
        type Result = Result<CommitNumber, String>;
        fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
            self.note("drain");
            Ok(9)
        }
    }

    impl Handler<StopAccepting> for Probe {
        type Result = ();
        fn handle(&mut self, _: StopAccepting, _: &mut Context<Self>) {
            self.note("stop accepting");
        }
    }

    impl Handler<StopBackups> for Probe {
        type Result = ();
        fn handle(&mut self, _: StopBackups, _: &mut Context<Self>) {
            self.note("stop backups");
        }
    }

    impl Handler<LeaveNode> for Probe {
        type Result = ();
        fn handle(&mut self, _: LeaveNode, _: &mut Context<Self>) {
            self.note("leave node");
        }
    }

    impl Handler<CloseSessions> for Probe {
        type Result = usize;
        fn handle(&mut self, _: CloseSessions, _: &mut Context<Self>) -> usize {
            self.note("close sessions");
            0
        }
    }

    fn start() -> (
        Addr<Controller>,
        oneshot::Receiver<Outcome>,
        Arc<Mutex<Vec<String>>>,
    ) {
        let steps = Arc::new(Mutex::new(Vec::new()));
        let probe = Probe(steps.clone()).start();
        let (tx, rx) = oneshot::channel();
        let parts = Controlled {
            storage_checkpoint: probe.clone().recipient(),
            storage_close: probe.clone().recipient(),
            drain: probe.clone().recipient(),
            stop_accepting: probe.clone().recipient(),
            close_sessions: probe.clone().recipient(),
            stop_backups: probe.clone().recipient(),
            leave_node: probe.recipient(),
        };
        let controller = Controller::new(parts, Duration::from_secs(60), tx).start();
        (controller, rx, steps)
    }

    #[actix::test]
    async fn graceful_shutdown_runs_every_step_in_order() {
        let (controller, outcome, steps) = start();
        controller.do_send(RequestShutdown {
            save: true,
            reason: "test".into(),
        });
        controller.do_send(RequestShutdown {
            save: false,
            reason: "again".into(),
        });
        assert_eq!(outcome.await.unwrap(), Ok(()));
        assert_eq!(
            *steps.lock().unwrap(),
            [
                "leave node",
                "stop accepting",
                "drain",
                "close sessions",
                "stop backups",
                "close save=true"
            ]
        );
    }

    #[actix::test]
    async fn fatal_stops_without_a_checkpoint_and_reports_failure() {
        let (controller, outcome, steps) = start();
        controller.do_send(Fatal {
            reason: "fsync failed".into(),
        });
        assert_eq!(outcome.await.unwrap(), Err("fsync failed".to_string()));
        assert_eq!(steps.lock().unwrap().last().unwrap(), "close save=false");
    }
}
