//! Typed errors of a port: failed starts, violations, deaths and remote errors.

use std::fmt;
use std::process::ExitStatus;
use std::time::Duration;

use thiserror::Error;
use wharf_protocol::ProtocolError;

/// How a worker process ended, with the last lines it wrote to stderr.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ExitInfo {
    /// The exit status, if the process was reaped in time to know it.
    pub status: Option<ExitStatus>,
    /// The last lines the worker wrote to stderr (newest last).
    pub stderr_tail: Vec<String>,
    /// The kernel killed the worker for exceeding its memory limit (a container's).
    pub oom_killed: bool,
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.status {
            Some(status) => write!(f, "{status}")?,
            None => write!(f, "exit status unknown")?,
        }
        if self.oom_killed {
            write!(f, ", killed for exceeding its memory limit (OOM)")?;
        }
        if !self.stderr_tail.is_empty() {
            write!(f, "; last stderr: {}", self.stderr_tail.join(" | "))?;
        }
        Ok(())
    }
}

/// Everything that can go wrong between a port and its worker.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum PortError {
    /// The worker command could not be started (not found, not executable, ...).
    #[error("cannot spawn worker {program:?}: {reason}")]
    SpawnFailed {
        /// The program that was to be run.
        program: String,
        /// The operating system's reason.
        reason: String,
    },
    /// The worker exited before answering the init ping.
    #[error("worker exited before it was ready ({0})")]
    ExitedBeforeReady(ExitInfo),
    /// The worker did not answer the init ping in time; it was killed.
    #[error("worker did not answer the init ping within {after:?}; killed ({info})")]
    InitTimeout {
        /// The init timeout that ran out.
        after: Duration,
        /// How the killed worker ended.
        info: ExitInfo,
    },
    /// The worker answered the init ping with an error status.
    #[error("worker refused to start: {message}")]
    InitRefused {
        /// The worker's reason.
        message: String,
    },
    /// The worker speaks another protocol version.
    #[error("worker speaks protocol version {worker}, the runtime speaks {runtime}")]
    IncompatibleVersion {
        /// The worker's version.
        worker: u32,
        /// The runtime's version.
        runtime: u32,
    },
    /// The worker broke the protocol; it was killed.
    #[error("protocol violation by worker: {reason}")]
    ProtocolViolation {
        /// What was wrong.
        reason: String,
    },
    /// The worker died (or closed its channel) while the request was in flight.
    #[error("worker died during the request ({0})")]
    WorkerDied(ExitInfo),
    /// The worker served several calls at once and another of them overran its deadline: the
    /// runtime killed the worker, and this request ended with it.
    #[error(
        "worker killed because another call on it ({method}) overran its deadline of {deadline:?}"
    )]
    KilledForDeadline {
        /// The method of the call that overran.
        method: String,
        /// Its deadline.
        deadline: Duration,
    },
    /// The worker's handler reported an error; the worker keeps serving.
    #[error("worker error {kind}: {message}")]
    Remote {
        /// Error kind (exception type name or protocol kind).
        kind: String,
        /// The worker's message.
        message: String,
    },
    /// A request could not be encoded (for example, it exceeds max_frame).
    #[error("cannot send request: {reason}")]
    Encode {
        /// Why.
        reason: String,
    },
    /// A ping or control request got no answer in time.
    #[error("worker did not answer within {0:?}")]
    Timeout(Duration),
    /// The port was shut down by the runtime.
    #[error("port is closed")]
    Closed,
    /// The Docker engine hosting the worker was taken for lost (it stopped answering, its
    /// daemon died, or its link was cut): the worker was failed at once rather than left to
    /// a TCP timeout. A call in flight may or may not have run.
    #[error("the Docker engine {engine} hosting the worker was lost ({reason})")]
    EngineLost {
        /// The engine's name.
        engine: String,
        /// Why it was taken for lost.
        reason: String,
    },
}

impl PortError {
    /// Whether this error means the worker can no longer be used (it is dead or poisoned).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, PortError::Remote { .. } | PortError::Encode { .. })
    }

    pub(crate) fn from_protocol(e: &ProtocolError) -> Self {
        match e {
            ProtocolError::Encode { reason } => PortError::Encode {
                reason: reason.clone(),
            },
            other => PortError::ProtocolViolation {
                reason: other.to_string(),
            },
        }
    }
}
