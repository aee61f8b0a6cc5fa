//! # wharf-protocol
//!
//! The packet protocol between the wharf runtime and its workers, specified in
//! `docs/protocol.md`: [`frame`] (4-byte big-endian length + one MessagePack map), [`message`]
//! (the message types of version 1), [`error`] (typed violations) and [`worker`] (a small SDK for
//! writing workers in Rust). This crate knows nothing of actors, tasks or pools: use it alone to
//! write a worker.

pub mod error;
pub mod frame;
pub mod message;
pub mod worker;

pub use error::ProtocolError;
pub use frame::{FrameCodec, MessageCodec, DEFAULT_MAX_FRAME};
pub use message::{FromWorker, InitStatus, ToWorker, Value, PROTOCOL_VERSION};
