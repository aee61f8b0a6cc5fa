//! What a pool reports through the [`metrics`](https://docs.rs/metrics) facade, behind the
//! `metrics` cargo feature (without it every function here is empty and costs nothing).
//! The application installs a recorder (a Prometheus exporter, for instance); wharf only
//! records. Every series carries the pool's name as the label `pool`.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `wharf_calls_total` | counter | `method`, `outcome` | calls by method and outcome (`ok` or an [`Error::kind`](crate::Error::kind)) |
//! | `wharf_call_duration_seconds` | histogram | `method` | call latency, checkout wait excluded |
//! | `wharf_checkout_wait_seconds` | histogram | | how long callers waited for a worker |
//! | `wharf_workers` | gauge | `state` | workers `starting`, `idle`, `busy` |
//! | `wharf_waiting_callers` | gauge | | callers waiting for a worker |
//! | `wharf_sessions_open` | gauge | | sessions open |
//! | `wharf_worker_rss_bytes` | gauge | | resident memory of all the pool's workers |
//! | `wharf_pool_status` | gauge | `status` | 1 for the pool's status (`running`, `failed`, `no_workers`, `shut_down`), 0 for the others |
//! | `wharf_worker_exits_total` | counter | `cause` | workers gone, by [`ExitKind::label`](crate::ExitKind::label) |
//! | `wharf_restarts_total` | counter | `cause` | restarts under the restart policy, by how the slot's last worker ended ([`ExitKind::label`](crate::ExitKind::label), or `start_failed`) |
//! | `wharf_replacements_total` | counter | `cause` | workers the runtime replaced on purpose (`deadline`, `recycled`) |
//! | `wharf_start_failures_total` | counter | | launches that failed before the worker was ready |
//!
//! Gauges are published every `sample_interval` (and once more at shutdown). A pool labels at
//! most [`MAX_METHODS`] distinct methods; calls to any further method count as `method="other"`,
//! so callers that make up method names cannot grow the number of series without bound.

use std::time::Duration;

use crate::error::PoolState;

/// Distinct `method` label values per pool; further methods are counted as `other`.
pub const MAX_METHODS: usize = 64;

/// A pool's recording side.
#[derive(Debug)]
pub(crate) struct Telemetry {
    #[cfg(feature = "metrics")]
    pool: String,
    #[cfg(feature = "metrics")]
    methods: std::sync::Mutex<std::collections::HashSet<String>>,
}

#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
impl Telemetry {
    pub(crate) fn new(pool: &str) -> Self {
        Self {
            #[cfg(feature = "metrics")]
            pool: pool.to_owned(),
            #[cfg(feature = "metrics")]
            methods: std::sync::Mutex::default(),
        }
    }

    /// Whether anything is recorded at all (the `metrics` feature).
    pub(crate) const ENABLED: bool = cfg!(feature = "metrics");

    /// The `method` label for `method`: itself, or `other` beyond [`MAX_METHODS`].
    #[cfg(feature = "metrics")]
    fn method_label(&self, method: &str) -> String {
        let mut known = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        if known.contains(method) {
            return method.to_owned();
        }
        if known.len() < MAX_METHODS {
            known.insert(method.to_owned());
            return method.to_owned();
        }
        "other".to_owned()
    }

    /// A call ended: `outcome` is `ok` or the error's kind.
    pub(crate) fn call(&self, method: &str, outcome: &'static str, took: Duration) {
        #[cfg(feature = "metrics")]
        {
            let method = self.method_label(method);
            metrics::counter!("wharf_calls_total", "pool" => self.pool.clone(), "method" => method.clone(), "outcome" => outcome)
                .increment(1);
            metrics::histogram!("wharf_call_duration_seconds", "pool" => self.pool.clone(), "method" => method)
                .record(took.as_secs_f64());
        }
    }

    /// A caller got a worker after `waited`.
    pub(crate) fn checkout(&self, waited: Duration) {
        #[cfg(feature = "metrics")]
        metrics::histogram!("wharf_checkout_wait_seconds", "pool" => self.pool.clone())
            .record(waited.as_secs_f64());
    }

    /// A worker is gone.
    pub(crate) fn exit(&self, cause: &'static str, replaced: bool) {
        #[cfg(feature = "metrics")]
        {
            metrics::counter!("wharf_worker_exits_total", "pool" => self.pool.clone(), "cause" => cause)
                .increment(1);
            if replaced {
                metrics::counter!("wharf_replacements_total", "pool" => self.pool.clone(), "cause" => cause)
                    .increment(1);
            }
        }
    }

    /// A slot is restarted under the restart policy.
    pub(crate) fn restart(&self, cause: &'static str) {
        #[cfg(feature = "metrics")]
        metrics::counter!("wharf_restarts_total", "pool" => self.pool.clone(), "cause" => cause)
            .increment(1);
    }

    /// A launch failed.
    pub(crate) fn start_failed(&self) {
        #[cfg(feature = "metrics")]
        metrics::counter!("wharf_start_failures_total", "pool" => self.pool.clone()).increment(1);
    }

    /// Publishes the pool's gauges.
    pub(crate) fn gauges(&self, state: &PoolState, sessions: usize, rss: u64, status: &str) {
        #[cfg(feature = "metrics")]
        {
            let p = || self.pool.clone();
            for (label, n) in [
                ("starting", state.starting),
                ("idle", state.idle),
                ("busy", state.busy),
            ] {
                metrics::gauge!("wharf_workers", "pool" => p(), "state" => label).set(n as f64);
            }
            metrics::gauge!("wharf_waiting_callers", "pool" => p()).set(state.waiting as f64);
            metrics::gauge!("wharf_sessions_open", "pool" => p()).set(sessions as f64);
            metrics::gauge!("wharf_worker_rss_bytes", "pool" => p()).set(rss as f64);
            for s in ["running", "failed", "no_workers", "shut_down"] {
                let on = if s == status { 1.0 } else { 0.0 };
                metrics::gauge!("wharf_pool_status", "pool" => p(), "status" => s).set(on);
            }
        }
    }
}
