//! The errors callers of a pool see. Each says what happened and what to do about it.

use std::time::Duration;

use thiserror::Error;
use wharf_actors::port::PortError;
use wharf_actors::worker::ExitKind;

/// A pool's occupancy at the moment an error was raised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolState {
    /// Core workers: the configured size, or the last [`Pool::resize`](crate::Pool::resize).
    pub size: usize,
    /// Workers running or starting (core and overflow).
    pub workers: usize,
    /// Workers checked out.
    pub busy: usize,
    /// Workers ready and idle.
    pub idle: usize,
    /// Workers launching.
    pub starting: usize,
    /// Callers waiting for a worker.
    pub waiting: usize,
}

impl std::fmt::Display for PoolState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "size {}, workers {}, busy {}, idle {}, starting {}, waiting {}",
            self.size, self.workers, self.busy, self.idle, self.starting, self.waiting
        )
    }
}

/// Everything a call, a checkout or a session can fail with. Each variant says who should act;
/// `docs/operations.md` lists them all with what to do.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> Result<(), wharf::Error> {
/// use std::time::Duration;
/// use wharf::{CallOptions, Error, Pool, ProcessSpec};
///
/// let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"]).unwrap();
/// let pool = Pool::builder(spec).size(1).build().await?;
///
/// // The handler raised: the worker keeps serving.
/// match pool.call::<()>("fail", "no such user").await {
///     Err(Error::Remote { kind, message }) => {
///         assert_eq!((kind.as_str(), message.as_str()), ("RuntimeError", "no such user"));
///     }
///     other => panic!("{other:?}"),
/// }
///
/// // The call overran its deadline: its worker was killed and is being replaced.
/// let options = CallOptions::new().deadline(Duration::from_millis(100));
/// let err = pool.call_with::<u64>("sleep", &5_000, options).await.unwrap_err();
/// assert!(matches!(err, Error::DeadlineExceeded { .. }));
/// assert_eq!(err.kind(), "deadline_exceeded"); // a stable name for logs and metrics
/// # pool.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum Error {
    /// No worker became free in time. Raise the pool's size or checkout timeout, or lower the
    /// load.
    #[error("no worker free within {waited:?} ({state})")]
    CheckoutTimeout {
        /// How long the caller waited.
        waited: Duration,
        /// The pool at that moment.
        state: PoolState,
    },
    /// No worker is free and the caller may not wait: the line of waiting callers is full
    /// (`max_waiting`), or the caller asked not to wait (`try_call`, `try_checkout`). Shed the
    /// load (answer "busy", retry later) or raise the pool's size or `max_waiting`.
    #[error("pool {pool} is overloaded ({state})")]
    Overloaded {
        /// The pool's name.
        pool: String,
        /// The pool at that moment.
        state: PoolState,
    },
    /// The worker died while serving this call; the pool replaces it. Retrying is safe only
    /// for idempotent calls.
    #[error("worker {worker} died during the call: {cause}")]
    WorkerDied {
        /// The worker's name.
        worker: String,
        /// How it ended.
        cause: PortError,
    },
    /// The call overran its deadline; its worker was killed and is being replaced.
    #[error("call to {method} on worker {worker} exceeded its deadline of {deadline:?}")]
    DeadlineExceeded {
        /// The worker's name.
        worker: String,
        /// The method called.
        method: String,
        /// The deadline.
        deadline: Duration,
    },
    /// The worker served several calls at once and was killed because another of them
    /// overran its deadline; this call ended with it. The pool replaces the worker; retrying
    /// is safe for idempotent calls (the pool does).
    #[error("worker {worker} was killed during the call because another call on it ({method}) overran its deadline of {deadline:?}")]
    KilledForDeadline {
        /// The worker's name.
        worker: String,
        /// The method of the call that overran.
        method: String,
        /// Its deadline.
        deadline: Duration,
    },
    /// The worker pinned to this session died or was killed; its state is gone. Open a new
    /// session.
    #[error("session {session} lost its worker: {cause}")]
    SessionLost {
        /// The session id.
        session: String,
        /// What happened to the worker.
        cause: String,
    },
    /// The session ended (explicitly, or after being idle too long).
    #[error("session {session} has ended ({why})")]
    SessionEnded {
        /// The session id.
        session: String,
        /// `closed` or `expired`.
        why: &'static str,
    },
    /// A session with this id is already open; share that `Session` (it is `Clone`).
    #[error("session {0} is already open")]
    SessionInUse(String),
    /// The pool has failed for good: its workers restarted too often (restart intensity
    /// exceeded), a slot's worker failed to start `max_start_failures` times in a row, or its
    /// supervisor stopped unexpectedly. `reason` says which; the last start errors say why
    /// workers did not come up.
    #[error("pool {pool} failed: {reason}; last start errors: {}", fmt_errors(.last_errors))]
    PoolFailed {
        /// The pool's name.
        pool: String,
        /// Why the pool failed.
        reason: String,
        /// The most recent start errors, oldest first.
        last_errors: Vec<PortError>,
    },
    /// Every worker has stopped and none will be restarted (restart type transient or
    /// temporary); `last_exit` says how the last one ended.
    #[error("pool {pool} has no workers left and will start none; {last_exit}")]
    NoWorkers {
        /// The pool's name.
        pool: String,
        /// How the last worker ended.
        last_exit: String,
    },
    /// The pool is shutting down or shut down.
    #[error("pool {0} is shut down")]
    ShutDown(String),
    /// The worker broke the protocol; it was killed and is being replaced.
    #[error("worker {worker} broke the protocol: {reason}")]
    ProtocolViolation {
        /// The worker's name.
        worker: String,
        /// What was wrong.
        reason: String,
    },
    /// The worker's handler raised an error; the worker keeps serving.
    #[error("worker error {kind}: {message}")]
    Remote {
        /// Error kind (exception type name, or a protocol kind such as `unknown_method`).
        kind: String,
        /// The worker's message.
        message: String,
    },
    /// A body could not be converted to or from MessagePack, or is too large to send.
    #[error("bad body: {0}")]
    Body(String),
    /// The worker's reply does not decode to the type the caller asked for; the worker keeps
    /// serving. Ask for a [`wharf_protocol::Value`] to see what it sent.
    #[error("the reply of {method} does not fit the expected type: {reason}")]
    Reply {
        /// The method called.
        method: String,
        /// Why it does not fit.
        reason: String,
    },
    /// A pool of this name already runs in the [`Runtime`](crate::Runtime) with another
    /// configuration. Give the new one another name, or stop the running one first.
    #[error("pool {pool} already runs with another configuration (it differs in {})", .differs.join(", "))]
    PoolConflict {
        /// The pool's name.
        pool: String,
        /// The settings that differ (`size`, `spec`, ... as in [`PoolConfig`](crate::PoolConfig)).
        differs: Vec<&'static str>,
    },
    /// A new worker started by [`Pool::rolling_restart`](crate::Pool::rolling_restart) failed to
    /// start (or died at once). The worker it was to replace keeps serving, and the rolling
    /// restart stopped there; workers already replaced stay replaced. Look at `cause` (a
    /// broken deployment of the worker's code, usually), fix it and restart again.
    #[error("pool {pool}: the replacement for worker {worker} {cause}; the worker keeps serving and the rolling restart stopped")]
    ReplacementFailed {
        /// The pool's name.
        pool: String,
        /// The worker that was to be replaced (it keeps serving).
        worker: String,
        /// How the new worker ended.
        cause: ExitKind,
    },
    /// The pool's configuration is invalid: `field` names the setting (as in the builder, e.g.
    /// `backoff.jitter`), `reason` says what is wrong with its value.
    #[error("invalid pool configuration: {field}: {reason}")]
    Config {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn fmt_errors(errors: &[PortError]) -> String {
    if errors.is_empty() {
        return "none recorded".into();
    }
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// A short stable name for this error's kind, for statistics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::CheckoutTimeout { .. } => "checkout_timeout",
            Error::Overloaded { .. } => "overloaded",
            Error::WorkerDied { .. } => "worker_died",
            Error::DeadlineExceeded { .. } => "deadline_exceeded",
            Error::KilledForDeadline { .. } => "killed_for_deadline",
            Error::SessionLost { .. } => "session_lost",
            Error::SessionEnded { .. } => "session_ended",
            Error::SessionInUse(_) => "session_in_use",
            Error::PoolFailed { .. } => "pool_failed",
            Error::NoWorkers { .. } => "no_workers",
            Error::ShutDown(_) => "shut_down",
            Error::ProtocolViolation { .. } => "protocol_violation",
            Error::Remote { .. } => "remote",
            Error::Body(_) => "body",
            Error::Reply { .. } => "reply",
            Error::Config { .. } => "config",
            Error::PoolConflict { .. } => "pool_conflict",
            Error::ReplacementFailed { .. } => "replacement_failed",
        }
    }

    /// Turns a port error from a call into the caller's error.
    pub(crate) fn from_port(worker: &str, e: PortError) -> Self {
        match e {
            PortError::Remote { kind, message } => Error::Remote { kind, message },
            PortError::ProtocolViolation { reason } => Error::ProtocolViolation {
                worker: worker.to_owned(),
                reason,
            },
            PortError::Encode { reason } => Error::Body(reason),
            PortError::KilledForDeadline { method, deadline } => Error::KilledForDeadline {
                worker: worker.to_owned(),
                method,
                deadline,
            },
            other => Error::WorkerDied {
                worker: worker.to_owned(),
                cause: other,
            },
        }
    }
}

/// The result type of pool operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
