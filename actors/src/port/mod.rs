//! Ports: the owners of one external worker each. A port spawns its worker, performs the
//! init-ping handshake, routes replies to requests by id, and kills and reaps the worker.
//!
//! [`process`] owns an OS process; [`logs`] forwards a worker's log lines into `tracing`.

pub mod logs;
pub mod process;

mod error;

pub use error::{ExitInfo, PortError};
pub use process::{Channel, ProcessPort, ProcessSpec, StreamEvent, WorkerInfo};
