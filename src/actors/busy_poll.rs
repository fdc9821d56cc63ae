//! Busy polling of the server's event loop: for a short window after
//! activity, the loop keeps polling its sockets instead of sleeping in
//! `epoll_wait`.
//!
//! Why: a commit crosses threads and processes several times (client →
//! event loop → storage thread → event loop → client), and each hand-off
//! to a thread that sleeps has to wake it. On a virtual machine a sleeping
//! vCPU halts, and waking it costs a trip through the hypervisor — tens of
//! microseconds, more than the work of the commit. Measured on the 2-core
//! VM this project is built on, the event loop sleeping between the steps
//! of a commit was what bounded throughput (see the README's performance
//! section and `--busy-poll-us` in docs/OPERATIONS.md). A
//! loop that polls for a moment after each burst of work is awake when
//! the storage thread's answer or the client's next request arrives.
//!
//! How: [`start`] spawns one task on the current (single-threaded) event
//! loop. It sleeps until [`note_activity`] is called, then yields to the
//! loop over and over — each yield is a zero-timeout poll of the sockets —
//! until nothing was noted for the window. Each turn also yields the CPU to
//! any other runnable thread (`sched_yield`), so the spin never starves the
//! storage thread, the commit-log thread or a client on the same core. A
//! server with no clients spins only for a window after each heartbeat of
//! its node (every 100 ms between primary and secondaries), and a lone
//! idle server not at all.
//!
//! The state is per thread and touched only by that thread. Three threads
//! of a server run a poller: the event loop (sessions, the commit
//! coordinator, the links to peers), the storage thread and the
//! commit-log thread. It is a scheduling hint, never data any actor
//! depends on. [`note_activity`] on a thread without a poller (a test,
//! `--busy-poll-us 0`) does nothing useful and costs a flag write.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Default `--busy-poll-us`.
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(300);

#[derive(Default)]
struct Poller {
    /// Something happened since the poller last looked.
    active: Cell<bool>,
    /// The poller's waker while it sleeps until the next activity.
    parked: RefCell<Option<Waker>>,
    /// A poller runs on this thread (one is enough; a second would take
    /// the first one's waker).
    running: Cell<bool>,
}

/// Marks the thread's poller as gone when its task is dropped (its event
/// loop stopped), so a later event loop on the same thread gets one.
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        POLLER.with(|p| {
            p.running.set(false);
            p.parked.borrow_mut().take();
        });
    }
}

thread_local! {
    static POLLER: Poller = Poller::default();
}

/// Note that the event loop of this thread did work that is likely to be
/// followed by more soon: a request arrived, a storage or flush answer came
/// back. Cheap: a flag, and a local wake if the poller sleeps.
pub fn note_activity() {
    POLLER.with(|p| {
        p.active.set(true);
        let parked = p.parked.borrow_mut().take();
        if let Some(waker) = parked {
            waker.wake();
        }
    });
}

/// Was activity noted since the last call? Clears the note.
fn take_activity() -> bool {
    POLLER.with(|p| p.active.replace(false))
}

/// Spawn the poller on the current event loop (an actix arbiter or
/// `System`): after each [`note_activity`], poll without sleeping until
/// `window` passes with none. A zero window spawns nothing, and neither
/// does a second call while this thread's poller runs.
pub fn start(window: Duration) {
    if window.is_zero() || POLLER.with(|p| p.running.replace(true)) {
        return;
    }
    actix_rt::spawn(async move {
        let _running = Running;
        loop {
            poll_fn(|cx| {
                if take_activity() {
                    return Poll::Ready(());
                }
                POLLER.with(|p| *p.parked.borrow_mut() = Some(cx.waker().clone()));
                Poll::Pending
            })
            .await;
            spin(window).await;
        }
    });
}

/// Keep the loop polling until `window` passes without activity.
async fn spin(window: Duration) {
    let mut deadline = Instant::now() + window;
    loop {
        // Another runnable thread on this core goes first: the storage
        // thread we are waiting for may be it.
        std::thread::yield_now();
        // Deferred until the loop has polled its sockets (zero timeout)
        // and run whatever became ready.
        tokio::task::yield_now().await;
        let now = Instant::now();
        if take_activity() {
            deadline = now + window;
        } else if now >= deadline {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn activity_wakes_the_poller_and_it_sleeps_again_after_the_window() {
        start(Duration::from_millis(5));
        tokio::task::yield_now().await;
        // Parked: no activity yet.
        assert!(POLLER.with(|p| p.parked.borrow().is_some()));
        note_activity();
        assert!(POLLER.with(|p| p.parked.borrow().is_none()));
        // It spins for the window, then parks again (bounded wait).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if POLLER.with(|p| p.parked.borrow().is_some()) {
                break;
            }
            assert!(Instant::now() < deadline, "the poller never parked again");
        }
        assert!(!POLLER.with(|p| p.active.get()));
    }

    #[test]
    fn one_poller_per_thread_and_a_new_event_loop_gets_its_own() {
        for _ in 0..2 {
            actix_rt::System::new().block_on(async {
                start(Duration::from_millis(5));
                // A second start on the same loop does nothing.
                start(Duration::from_millis(5));
                tokio::task::yield_now().await;
                assert!(POLLER.with(|p| p.running.get()));
                note_activity();
                let deadline = Instant::now() + Duration::from_secs(5);
                while POLLER.with(|p| p.parked.borrow().is_none()) {
                    assert!(Instant::now() < deadline, "the poller never parked again");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            // The loop is gone, and with it the poller.
            assert!(!POLLER.with(|p| p.running.get()));
        }
    }

    #[actix_rt::test]
    async fn a_zero_window_spawns_no_poller() {
        start(Duration::ZERO);
        tokio::task::yield_now().await;
        assert!(POLLER.with(|p| p.parked.borrow().is_none()));
    }
}
