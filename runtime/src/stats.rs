//! A point-in-time snapshot of a pool.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use crate::pool::Inner;

/// A pool's statistics at one moment. Serialises to JSON for dashboards.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct PoolStats {
    /// The pool's name.
    pub name: String,
    /// Core workers: the configured size, or the last [`Pool::resize`](crate::Pool::resize).
    pub size: usize,
    /// Overflow workers allowed.
    pub max_overflow: usize,
    /// Workers launching.
    pub starting: usize,
    /// Workers ready and idle.
    pub idle: usize,
    /// Workers checked out or finishing an abandoned call.
    pub busy: usize,
    /// Callers waiting for a worker.
    pub waiting: usize,
    /// Sessions open.
    pub sessions: usize,
    /// Calls made.
    pub calls: u64,
    /// Calls that succeeded.
    pub ok: u64,
    /// Errors by kind (see `Error::kind`).
    pub errors: BTreeMap<String, u64>,
    /// Restarts by the restart policy (crashes, failed starts, siblings restarted with them).
    pub restarts: u64,
    /// Workers replaced on purpose (recycling, deadline kills), outside the restart policy.
    pub replacements: u64,
    /// Idempotent calls retried after their worker died.
    pub retries: u64,
    /// Launches that failed before the worker was ready.
    pub start_failures: u64,
    /// Successful checkouts.
    pub checkouts: u64,
    /// Mean time a checkout waited.
    pub mean_checkout_wait: Duration,
    /// Whether the pool has failed (restart intensity exceeded).
    pub failed: bool,
}

impl PoolStats {
    pub(crate) fn snapshot(inner: &Inner) -> Self {
        let state = inner.state();
        let c = &inner.counters;
        let checkouts = c.checkouts.load(Ordering::Relaxed);
        let wait_ns = c.checkout_wait_ns.load(Ordering::Relaxed);
        PoolStats {
            name: inner.name().to_owned(),
            size: inner.size(),
            max_overflow: inner.config.max_overflow,
            starting: state.starting,
            idle: state.idle,
            busy: state.busy,
            waiting: state.waiting,
            sessions: inner
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len(),
            calls: c.calls.load(Ordering::Relaxed),
            ok: c.ok.load(Ordering::Relaxed),
            errors: c
                .errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            restarts: c.restarts.load(Ordering::Relaxed),
            replacements: c.replacements.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            start_failures: c.start_failures.load(Ordering::Relaxed),
            checkouts,
            mean_checkout_wait: Duration::from_nanos(wait_ns.checked_div(checkouts).unwrap_or(0)),
            failed: inner.is_failed(),
        }
    }
}
