//! A runtime of pools: several named pools under one owner, started on demand by their
//! configuration, watched, stopped when unused, and shut down together.
//!
//! This module owns the set of pools of a [`Runtime`] and their lifetimes above each pool's
//! own supervisor: which pool a name refers to, starting a configuration once however many
//! ask for it at the same time, noticing a pool that failed, stopping pools left unused for
//! the runtime's idle timeout, one graceful shutdown for all, and shutting down on SIGTERM or
//! SIGINT ([`shutdown_signal`], [`Runtime::run_until_signal`]).
//!
//! A watch task looks at every pool a few times per idle timeout (at most once a second):
//! it logs a pool that has failed (once) and stops a pool that has had no call, no checkout
//! and no open session or lease for the idle timeout, counted from when its workers were last
//! launching. A pool that has failed is kept, so that
//! [`Runtime::stats`] shows it and why, until [`Runtime::get_or_start`] replaces it with a new
//! start of the same configuration or [`Runtime::stop`] removes it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::config::PoolConfig;
use crate::error::{Error, Result};
use crate::file::ConfigFile;
use crate::pool::Pool;
use crate::stats::PoolStats;

/// How a [`Runtime`] treats its pools (the `[runtime]` table of a configuration file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuntimeSettings {
    /// Stop a pool that has had no call, checkout or open session (and no worker launching)
    /// for this long; `None` (default): never.
    pub idle_timeout: Option<Duration>,
}

impl RuntimeSettings {
    /// Stops pools unused for `timeout` (default: never).
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = Some(timeout);
        self
    }
}

/// Where one of a runtime's pools is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum PoolStatus {
    /// Its supervisor is being started.
    Starting,
    /// It serves calls (its workers may still be launching).
    Running,
    /// It failed for good, or could not start, or has no workers left; the reason is the
    /// error its callers get.
    Failed(String),
    /// It was shut down (by a caller holding it) and is no longer usable.
    ShutDown,
}

/// One pool of a runtime, at one moment.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct RuntimePoolStats {
    /// The pool's name.
    pub name: String,
    /// Where it is in its life.
    pub status: PoolStatus,
    /// How long since its last call, checkout or request through the runtime (zero while
    /// it is in use).
    pub idle_for: Duration,
    /// How many times the runtime has started this name (more than 1 after a failed or
    /// stopped pool was started again).
    pub starts: u64,
    /// The pool's own statistics, once it has started.
    pub stats: Option<PoolStats>,
}

/// Every pool of a runtime, at one moment ([`Runtime::stats`]). Serialises to JSON.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct RuntimeStats {
    /// The pools, by name.
    pub pools: Vec<RuntimePoolStats>,
}

impl RuntimeStats {
    /// Whether every pool is starting or running (none failed or shut down).
    pub fn healthy(&self) -> bool {
        self.pools
            .iter()
            .all(|p| matches!(p.status, PoolStatus::Starting | PoolStatus::Running))
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&RuntimePoolStats> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// A start of a pool, shared by everyone who asked for it while it was under way.
type Start = Shared<BoxFuture<'static, Result<Pool>>>;

/// One name's pool.
struct Entry {
    /// Tells this entry from a later one of the same name.
    id: u64,
    /// The configuration it was asked for with (before the pool names its containers).
    config: PoolConfig,
    start: Start,
    /// The last call, checkout or request seen.
    last_used: Instant,
    /// Calls and checkouts at the last look: a change means it was used in between.
    seen: (u64, u64),
    starts: u64,
    /// Its failure has been logged.
    reported: bool,
}

impl Entry {
    fn pool(&self) -> Option<&Pool> {
        match self.start.peek() {
            Some(Ok(pool)) => Some(pool),
            _ => None,
        }
    }

    fn status(&self) -> PoolStatus {
        match self.start.peek() {
            None => PoolStatus::Starting,
            Some(Err(e)) => PoolStatus::Failed(e.to_string()),
            Some(Ok(pool)) => pool_status(pool),
        }
    }
}

/// A started pool's status.
fn pool_status(pool: &Pool) -> PoolStatus {
    match pool.failure() {
        Some(Error::ShutDown(_)) => PoolStatus::ShutDown,
        Some(e) => PoolStatus::Failed(e.to_string()),
        None => PoolStatus::Running,
    }
}

#[derive(Default)]
struct State {
    pools: BTreeMap<String, Entry>,
    /// Shutdowns of pools the runtime let go (idle, replaced, stopped), still under way.
    stopping: Vec<JoinHandle<()>>,
    shut_down: bool,
}

struct Core {
    settings: RuntimeSettings,
    state: Mutex<State>,
    watch: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Core {
    /// Shuts `pool` down in a task of its own, which [`Runtime::shutdown`] waits for.
    fn stop_later(state: &mut State, pool: Pool) {
        state.stopping.retain(|h| !h.is_finished());
        state
            .stopping
            .push(tokio::spawn(async move { pool.shutdown().await }));
    }

    /// One look at every pool: log new failures, stop the pools idle for too long.
    fn watch_once(&self) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let mut idle = Vec::new();
        for (name, entry) in state.pools.iter_mut() {
            let Some(pool) = entry.pool() else { continue };
            let stats = pool.stats();
            let status = pool_status(pool);
            if let PoolStatus::Failed(reason) = &status {
                if !entry.reported {
                    tracing::error!(pool = %name, %reason, "pool failed");
                    entry.reported = true;
                }
                continue; // kept, to be seen in the stats
            }
            let seen = (stats.calls, stats.checkouts);
            // Workers still launching (a slow import) do not count against the idle time.
            let active = stats.busy > 0 || stats.waiting > 0 || stats.starting > 0;
            if active || seen != entry.seen {
                entry.seen = seen;
                entry.last_used = now;
            } else if let Some(timeout) = self.settings.idle_timeout {
                if now.duration_since(entry.last_used) >= timeout {
                    idle.push(name.clone());
                }
            }
        }
        for name in idle {
            if let Some(pool) = state.pools.remove(&name).and_then(|e| e.pool().cloned()) {
                tracing::info!(pool = %name, "stopping the pool: unused for its idle timeout");
                Self::stop_later(&mut state, pool);
            }
        }
    }
}

/// Several named pools under one owner: started by configuration, shared by name, watched,
/// stopped when idle, shut down together. Cheap to clone; every clone is the same runtime.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> Result<(), wharf::Error> {
/// use std::time::Duration;
/// use wharf::{Error, Pool, ProcessSpec, Runtime, RuntimeSettings};
///
/// let runtime = Runtime::new(RuntimeSettings::default().idle_timeout(Duration::from_secs(600)));
/// let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"]).unwrap();
/// let demo = Pool::builder(spec).name("demo").size(1);
///
/// // Every request for an equal configuration gets the same pool, started once.
/// let pool = runtime.get_or_start(demo.clone()).await?;
/// let same = runtime.get_or_start(demo.clone()).await?;
/// let reply: String = same.call("echo", "hi").await?;
/// assert_eq!(reply, "hi");
/// // The same name with another configuration is refused, naming what differs.
/// match runtime.get_or_start(demo.size(3)).await {
///     Err(Error::PoolConflict { differs, .. }) => assert_eq!(differs, ["size"]),
///     other => panic!("{other:?}"),
/// }
/// assert!(runtime.stats().healthy());
///
/// // In a service's main: runtime.run_until_signal().await (SIGTERM or SIGINT), which
/// // ends with this.
/// runtime.shutdown().await;
/// assert!(matches!(pool.failure(), Some(Error::ShutDown(_))));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Runtime {
    core: Arc<Core>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("settings", &self.core.settings)
            .field("pools", &self.names())
            .finish()
    }
}

impl Runtime {
    /// A runtime with no pools yet. Its watch task starts at once.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(settings: RuntimeSettings) -> Runtime {
        let core = Arc::new(Core {
            settings,
            state: Mutex::new(State::default()),
            watch: Mutex::new(None),
        });
        let every = core
            .settings
            .idle_timeout
            .map_or(Duration::from_secs(1), |t| {
                (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
            });
        let weak: Weak<Core> = Arc::downgrade(&core);
        let watch = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(core) = weak.upgrade() else { return };
                core.watch_once();
            }
        });
        *lock(&core.watch) = Some(watch);
        Runtime { core }
    }

    /// A runtime with the file's `[runtime]` settings, running every pool of the file.
    pub async fn from_file(file: &ConfigFile) -> Result<Runtime> {
        let runtime = Runtime::new(file.runtime().clone());
        runtime.start_from(file).await?;
        Ok(runtime)
    }

    /// The runtime's settings.
    pub fn settings(&self) -> &RuntimeSettings {
        &self.core.settings
    }

    /// The pool of this configuration's name: the running one if it was started with an
    /// equal configuration, or a new one (started once, however many ask at the same time).
    /// A pool of that name that has failed or was shut down is replaced by a new start.
    ///
    /// Takes a [`PoolBuilder`](crate::PoolBuilder) or a [`PoolConfig`]. Fails with
    /// [`Error::PoolConflict`] if a pool of that name runs with another configuration,
    /// [`Error::Config`] if the configuration is invalid, [`Error::ShutDown`] after
    /// [`Runtime::shutdown`], or with the start's error.
    ///
    /// A [`Pool`] handle kept unused past the idle timeout may find its pool stopped
    /// ([`Error::ShutDown`]): ask the runtime again rather than keeping handles for long.
    pub async fn get_or_start(&self, config: impl Into<PoolConfig>) -> Result<Pool> {
        let config = config.into();
        config.validate()?;
        let name = config.name.clone();
        let (id, start) = {
            let mut state = lock(&self.core.state);
            if state.shut_down {
                return Err(Error::ShutDown(name));
            }
            let mut starts = 1;
            if let Some(entry) = state.pools.get_mut(&name) {
                if entry.config != config {
                    return Err(Error::PoolConflict {
                        differs: differences(&entry.config, &config),
                        pool: name,
                    });
                }
                if matches!(entry.status(), PoolStatus::Starting | PoolStatus::Running) {
                    entry.last_used = Instant::now();
                    (entry.id, entry.start.clone())
                } else {
                    starts += entry.starts;
                    let old = state.pools.remove(&name).and_then(|e| e.pool().cloned());
                    if let Some(old) = old {
                        Core::stop_later(&mut state, old);
                    }
                    Self::insert(&mut state, config, starts)
                }
            } else {
                Self::insert(&mut state, config, starts)
            }
        };
        let result = start.await;
        if result.is_err() {
            let mut state = lock(&self.core.state);
            if state.pools.get(&name).is_some_and(|e| e.id == id) {
                state.pools.remove(&name);
            }
        }
        result
    }

    /// Registers a start of `config` and begins it.
    fn insert(state: &mut State, config: PoolConfig, starts: u64) -> (u64, Start) {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        let builder = crate::PoolBuilder::from(config.clone());
        let name = config.name.clone();
        // In a task of its own: a caller that gives up does not cancel the start others await.
        let task = tokio::spawn(builder.build());
        let start = async move {
            task.await.unwrap_or_else(|e| {
                Err(Error::PoolFailed {
                    pool: name,
                    reason: format!("its start ended abnormally: {e}"),
                    last_errors: Vec::new(),
                })
            })
        }
        .boxed()
        .shared();
        state.pools.insert(
            config.name.clone(),
            Entry {
                id,
                config,
                start: start.clone(),
                last_used: Instant::now(),
                seen: (0, 0),
                starts,
                reported: false,
            },
        );
        (id, start)
    }

    /// Starts every pool of `file` (each as [`Runtime::get_or_start`], all at once) and
    /// returns them in the file's order. The file's `[runtime]` settings are not applied:
    /// see [`Runtime::from_file`].
    pub async fn start_from(&self, file: &ConfigFile) -> Result<Vec<Pool>> {
        let starts = file.configs().map(|c| self.get_or_start(c.clone()));
        futures::future::join_all(starts)
            .await
            .into_iter()
            .collect()
    }

    /// The started pool named `name`, if any (counts as a use for the idle timeout).
    pub fn pool(&self, name: &str) -> Option<Pool> {
        let mut state = lock(&self.core.state);
        let entry = state.pools.get_mut(name)?;
        entry.last_used = Instant::now();
        entry.pool().cloned()
    }

    /// The names of the runtime's pools.
    pub fn names(&self) -> Vec<String> {
        lock(&self.core.state).pools.keys().cloned().collect()
    }

    /// Every pool's status and statistics.
    pub fn stats(&self) -> RuntimeStats {
        let state = lock(&self.core.state);
        let now = Instant::now();
        let pools = state
            .pools
            .iter()
            .map(|(name, e)| {
                let stats = e.pool().map(Pool::stats);
                let in_use = stats.as_ref().is_some_and(|s| s.busy > 0 || s.waiting > 0);
                RuntimePoolStats {
                    name: name.clone(),
                    status: e.status(),
                    idle_for: if in_use {
                        Duration::ZERO
                    } else {
                        now.duration_since(e.last_used)
                    },
                    starts: e.starts,
                    stats,
                }
            })
            .collect();
        RuntimeStats { pools }
    }

    /// Stops the pool named `name` gracefully ([`Pool::shutdown`]) and forgets it; `false`
    /// if there is none.
    pub async fn stop(&self, name: &str) -> bool {
        let Some(entry) = lock(&self.core.state).pools.remove(name) else {
            return false;
        };
        if let Ok(pool) = entry.start.await {
            pool.shutdown().await;
        }
        true
    }

    /// Shuts every pool down gracefully, all at once ([`Pool::shutdown`]: calls in flight may
    /// finish within each pool's grace, then every worker is stopped and reaped), and refuses
    /// new pools. When it returns, no worker of any pool of this runtime runs.
    pub async fn shutdown(&self) {
        let (entries, stopping) = {
            let mut state = lock(&self.core.state);
            state.shut_down = true;
            (
                std::mem::take(&mut state.pools),
                std::mem::take(&mut state.stopping),
            )
        };
        if let Some(watch) = lock(&self.core.watch).take() {
            watch.abort();
        }
        let pools = entries.into_values().map(|e| async move {
            if let Ok(pool) = e.start.await {
                pool.shutdown().await;
            }
        });
        let stopping = stopping.into_iter().map(|h| async move {
            let _ = h.await;
        });
        futures::future::join(
            futures::future::join_all(pools),
            futures::future::join_all(stopping),
        )
        .await;
    }

    /// Waits for SIGTERM or SIGINT ([`shutdown_signal`]), then shuts every pool down
    /// ([`Runtime::shutdown`]); returns the signal. For a binary's `main`.
    pub async fn run_until_signal(&self) -> std::io::Result<ShutdownSignal> {
        let signal = shutdown_signal()?.await;
        tracing::info!(?signal, "shutting down");
        self.shutdown().await;
        Ok(signal)
    }
}

/// The settings in which two configurations of one name differ.
fn differences(a: &PoolConfig, b: &PoolConfig) -> Vec<&'static str> {
    let mut differs = Vec::new();
    macro_rules! compare {
        ($($field:ident),+) => {
            $(if a.$field != b.$field {
                differs.push(stringify!($field));
            })+
        };
    }
    compare!(
        spec,
        size,
        max_overflow,
        overflow_idle,
        eager,
        startup_concurrency,
        call_timeout,
        checkout_timeout,
        max_waiting,
        restart,
        health,
        max_calls,
        max_lifetime,
        recycle_jitter,
        max_rss,
        session_end,
        session_idle_timeout,
        shutdown_grace,
        drain_timeout,
        session_reset_timeout,
        retry
    );
    if differs.is_empty() {
        differs.push("other settings");
    }
    differs
}

/// The signal that asked a process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShutdownSignal {
    /// SIGTERM (a service manager, `docker stop`, `kill`).
    Terminate,
    /// SIGINT (Ctrl-C).
    Interrupt,
}

/// A future that resolves on the first SIGTERM or SIGINT after this call, with the signal.
///
/// The handlers are installed before it returns (so a signal right after is not missed) and
/// replace the default action for the rest of the process: from then on these signals no
/// longer end the process by themselves. Fails if the handlers cannot be installed.
///
/// ```no_run
/// # async fn demo(runtime: wharf::Runtime) -> std::io::Result<()> {
/// let signal = wharf::shutdown_signal()?.await;
/// runtime.shutdown().await;
/// # Ok(()) }
/// ```
///
/// # Panics
/// Outside a tokio runtime.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ShutdownSignal> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => ShutdownSignal::Terminate,
            _ = interrupt.recv() => ShutdownSignal::Interrupt,
        }
    })
}
