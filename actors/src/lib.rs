//! # wharf-actors
//!
//! The lifecycle layer of wharf: [`port`] owns one external worker process and its protocol
//! channel. This crate knows nothing of checkout: it starts, watches and stops workers.

pub mod port;
