//! Lifecycle events of a pool, for applications that want hooks: workers starting, ready and
//! exiting (with the cause), failed launches, restarts, the pool failing, sessions lost.
//!
//! Events go out on a broadcast channel ([`Pool::events`](crate::Pool::events)): sending
//! never blocks the pool, and a receiver that falls more than [`EVENT_BUFFER`] events behind
//! skips the oldest (it sees `RecvError::Lagged` with how many it missed).

use std::time::Duration;

use tokio::sync::broadcast;
pub use wharf_actors::worker::ExitKind;

/// Events a receiver may fall behind by before it skips the oldest.
pub const EVENT_BUFFER: usize = 1024;

/// Something that happened in a pool's life.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> Result<(), wharf::Error> {
/// use wharf::{ExitKind, Pool, PoolEvent, ProcessSpec};
///
/// let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"]).unwrap();
/// let pool = Pool::builder(spec).name("demo").size(1).lazy().build().await?;
/// let mut events = pool.events(); // what happens from now on
///
/// let _ = pool.call::<()>("crash", &1).await; // the worker exits with status 1 mid-call
/// loop {
///     match events.recv().await.expect("the pool is running") {
///         PoolEvent::WorkerReady { worker, pid, .. } => println!("{worker} ready, pid {pid}"),
///         PoolEvent::WorkerExited { worker, cause, .. } => {
///             println!("{worker}: {cause}");
///             assert!(matches!(cause, ExitKind::Crashed(_)));
///             assert_eq!(cause.label(), "crashed"); // the metrics' `cause` label
///             break;
///         }
///         _ => {}
///     }
/// }
/// pool.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PoolEvent {
    /// A worker is being launched.
    WorkerStarting {
        /// The pool's name.
        pool: String,
        /// The worker's name.
        worker: String,
        /// Its supervisor slot.
        slot: usize,
    },
    /// A worker answered its init ping and may serve.
    WorkerReady {
        /// The pool's name.
        pool: String,
        /// The worker's name.
        worker: String,
        /// Its OS process id (on the engine's host, for a container).
        pid: u32,
    },
    /// A worker that had been ready is gone; `cause` says how it ended.
    WorkerExited {
        /// The pool's name.
        pool: String,
        /// The worker's name.
        worker: String,
        /// How it ended.
        cause: ExitKind,
    },
    /// A launch failed before the worker was ready.
    StartFailed {
        /// The pool's name.
        pool: String,
        /// The worker's name.
        worker: String,
        /// Why.
        error: String,
    },
    /// A slot will be restarted after `delay`, under the restart policy.
    Restarting {
        /// The pool's name.
        pool: String,
        /// The slot.
        slot: usize,
        /// The backoff before the restart.
        delay: Duration,
    },
    /// The pool has failed for good (restart intensity exceeded, a slot that never starts,
    /// its supervisor gone); calls fail with [`Error::PoolFailed`](crate::Error::PoolFailed).
    PoolFailed {
        /// The pool's name.
        pool: String,
        /// Why.
        reason: String,
    },
    /// No worker is left and none will be started (transient or temporary restart types).
    NoWorkers {
        /// The pool's name.
        pool: String,
        /// How the last worker ended.
        last_exit: String,
    },
    /// A session's pinned worker died or was killed: the session's state is gone.
    SessionLost {
        /// The pool's name.
        pool: String,
        /// The session id.
        session: String,
        /// What happened to the worker.
        cause: String,
    },
}

/// The sending side, owned by the pool.
pub(crate) struct EventSender(broadcast::Sender<PoolEvent>);

impl EventSender {
    pub(crate) fn new() -> Self {
        Self(broadcast::channel(EVENT_BUFFER).0)
    }

    /// Sends `event` to every receiver; builds it only if anyone listens.
    pub(crate) fn emit(&self, event: impl FnOnce() -> PoolEvent) {
        if self.0.receiver_count() > 0 {
            let _ = self.0.send(event());
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<PoolEvent> {
        self.0.subscribe()
    }
}
