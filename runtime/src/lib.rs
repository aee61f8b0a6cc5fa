//! # wharf
//!
//! The public face of wharf: warm pools of supervised external workers (Python first, any
//! language), called like local async functions.
//!
//! - [`Pool`] (`pool.rs`): checkout without a central actor, calls, stats, shutdown.
//! - [`CallOptions`], [`CallStream`] (`call.rs`): what calls share, typed replies, streams.
//! - [`Lease`] (`lease.rs`): one worker held by one caller.
//! - [`Session`] (`session.rs`): one worker pinned strictly to a session id.
//! - [`PoolConfig`] / [`PoolBuilder`] (`config.rs`): every knob.
//! - [`ConfigFile`] (`file.rs`): pools and runtime settings read from a TOML file, every
//!   mistake reported with its file, line and key (`docs/configuration.md`).
//! - [`Runtime`] (`runtime.rs`): several named pools started by configuration, shared, watched,
//!   stopped when idle and shut down together (also on SIGTERM/SIGINT: [`shutdown_signal`]).
//! - [`Error`] (`error.rs`): what callers see.
//! - [`PoolEvent`] (`events.rs`): lifecycle events for hooks; [`telemetry`]: metrics (the
//!   `metrics` feature).
//! - [`check`]: the protocol conformance checker behind `wharf check`.
//! - [`image`]: worker images built locally through the engine's import API (`wharf image`).
//!
//! The supervisor, worker actors and process ports live in `wharf-actors`; the wire protocol
//! and worker SDK in `wharf-protocol`.

pub mod call;
pub mod check;
pub mod config;
pub mod error;
pub mod events;
pub mod file;
pub mod image;
pub mod lease;
pub mod pool;
pub mod runtime;
pub mod session;
pub mod stats;
pub mod telemetry;

pub use call::{CallOptions, CallStream, StreamItem};
pub use config::{PoolBuilder, PoolConfig, Retry, SessionEnd};
pub use error::{Error, PoolState, Result};
pub use events::{ExitKind, PoolEvent};
pub use file::{ConfigFile, ConfigFileError, ConfigIssue};
pub use lease::Lease;
pub use pool::{from_value, to_value, Pool, WorkerInfo, WorkerState};
pub use runtime::{
    shutdown_signal, PoolStatus, Runtime, RuntimePoolStats, RuntimeSettings, RuntimeStats,
    ShutdownSignal,
};
pub use session::Session;
pub use stats::PoolStats;
pub use wharf_actors::engine::{Engine, EngineError, TlsFiles};
pub use wharf_actors::fleet::{FleetEngine, Health, HealthOptions};
pub use wharf_actors::port::{
    Channel, ContainerSpec, ExitInfo, Mount, PortError, ProcessSpec, Transport, WorkerSpec,
};
pub use wharf_actors::restart::{Backoff, Intensity, RestartPolicy, RestartType, Strategy};
pub use wharf_actors::worker::HealthCheck;
pub use wharf_protocol::Value;
