//! The message types of protocol version 1, as laid down in `docs/protocol.md`.
//!
//! Every message is a MessagePack map with a string key `t` naming its type. [`ToWorker`] is
//! what the runtime sends, [`FromWorker`] what a worker answers. Bodies are untyped MessagePack
//! values ([`Value`]).

use serde::{Deserialize, Serialize};

pub use rmpv::Value;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

fn nil() -> Value {
    Value::Nil
}

/// A message from the runtime to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ToWorker {
    /// The init ping, sent as soon as the worker is spawned; answered by
    /// [`FromWorker::InitPong`] once the worker is fully initialised.
    Init {
        /// Request id.
        id: u64,
        /// The runtime's protocol version.
        version: u32,
    },
    /// Run a method.
    Call {
        /// Request id, unique among requests in flight on this worker.
        id: u64,
        /// Method name.
        method: String,
        /// Argument; an absent body reads as nil (`docs/protocol.md`, section 3).
        #[serde(default = "nil")]
        body: Value,
        /// Session the call belongs to, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        /// The caller's remaining budget in milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_ms: Option<u64>,
    },
    /// Best-effort cancellation of the call with this id; ignored if that call has ended.
    Cancel {
        /// Id of the call to cancel.
        id: u64,
    },
    /// Liveness check, answered by [`FromWorker::Pong`].
    Ping {
        /// Request id.
        id: u64,
    },
    /// Drop all per-session state; answered by `ok` with a nil body, or `error`.
    Reset {
        /// Request id.
        id: u64,
        /// The session that ended, if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
    },
    /// Exit now, without a reply. The runtime sends no id; a worker ignores one if present.
    Shutdown {
        /// Optional request id (for logs only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
}

/// Whether a worker's initialisation succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitStatus {
    /// Fully initialised and ready to serve.
    Ok,
    /// Initialisation failed; the init pong's `message` says why.
    Error,
}

/// A message from a worker to the runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum FromWorker {
    /// The answer to the init ping.
    InitPong {
        /// Id of the init ping.
        id: u64,
        /// Whether initialisation succeeded.
        status: InitStatus,
        /// The protocol version the worker speaks.
        version: u32,
        /// The worker's process id (as it sees it).
        pid: u32,
        /// Call methods the worker offers.
        #[serde(default)]
        methods: Vec<String>,
        /// Why initialisation failed, with `status: error`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        /// How many calls the worker serves at once; absent (or 0) means 1: the runtime then
        /// sends it one call at a time (`docs/protocol.md`, section 4).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_concurrency: Option<u32>,
    },
    /// A call or reset succeeded.
    Ok {
        /// Id of the request.
        id: u64,
        /// The result (required: a reset's `ok` carries nil).
        body: Value,
    },
    /// A call or reset failed; the worker keeps serving.
    Error {
        /// Id of the request.
        id: u64,
        /// Error kind: an exception type name or one of the protocol's kinds.
        kind: String,
        /// Human-readable description.
        message: String,
    },
    /// One piece of a streamed result.
    Chunk {
        /// Id of the call.
        id: u64,
        /// Position of this chunk in the stream, from 0.
        seq: u64,
        /// The piece (required).
        body: Value,
    },
    /// The answer to a ping.
    Pong {
        /// Id of the ping.
        id: u64,
    },
}

impl FromWorker {
    /// How many calls at once an `init_pong` declares (1 when absent or 0); `None` for any
    /// other message.
    pub fn max_concurrency(&self) -> Option<u32> {
        match self {
            FromWorker::InitPong {
                max_concurrency, ..
            } => Some(max_concurrency.unwrap_or(1).max(1)),
            _ => None,
        }
    }

    /// The request id this message answers.
    pub fn id(&self) -> u64 {
        match self {
            FromWorker::InitPong { id, .. }
            | FromWorker::Ok { id, .. }
            | FromWorker::Error { id, .. }
            | FromWorker::Chunk { id, .. }
            | FromWorker::Pong { id } => *id,
        }
    }
}

/// Error kinds the protocol itself uses in [`FromWorker::Error`].
pub mod kinds {
    /// The method is not offered.
    pub const UNKNOWN_METHOD: &str = "unknown_method";
    /// The body does not fit what the method takes.
    pub const BAD_REQUEST: &str = "bad_request";
    /// The call was stopped by `cancel`.
    pub const CANCELLED: &str = "cancelled";
    /// The worker stopped the call because its deadline ran out.
    pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";
    /// The reply would exceed max_frame.
    pub const FRAME_TOO_LARGE: &str = "frame_too_large";
}
