//! # wharf-actors
//!
//! The lifecycle layer of wharf. [`port`] owns one external worker process and its protocol
//! channel; [`worker`] is the actor that owns one port; [`supervisor`] starts, watches and
//! restarts a pool's workers under the policy in [`restart`]. [`engine`] is one Docker engine
//! (local, or remote over TLS); [`fleet`] is the engines a pool of containers spreads over,
//! their health, placement on them and the shipping of images between them. This crate knows
//! nothing of checkout: it tells its embedder of ready and exited workers through
//! [`supervisor::PoolEvents`].

pub mod engine;
pub mod fleet;
pub mod port;
pub mod restart;
pub mod supervisor;
pub mod worker;
