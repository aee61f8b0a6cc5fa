//! A pool's configuration and its builder.

use std::time::Duration;

use wharf_actors::fleet::{FleetEngine, HealthOptions};
use wharf_actors::port::{Channel, Transport, WorkerSpec};
use wharf_actors::restart::{Backoff, Intensity, RestartPolicy, RestartType, Strategy};
use wharf_actors::worker::HealthCheck;

use crate::error::{Error, Result};
use crate::pool::Pool;

/// What happens to a session's worker when the session ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SessionEnd {
    /// Send the protocol's `reset`; the worker drops its session state and is reused.
    #[default]
    Reset,
    /// Stop the worker and start a fresh one (for workers whose state cannot be trusted to
    /// reset).
    Recycle,
}

/// Bounded retries for idempotent calls ([`CallOptions::idempotent`](crate::CallOptions::idempotent)): a call whose worker died
/// under it is retried on another worker. Deadline overruns and remote errors are never retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Pause before each retry.
    pub delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_retries: 3,
            delay: Duration::from_millis(5),
        }
    }
}

/// Everything that shapes a pool. Build one with [`Pool::builder`]. Two configurations are
/// equal when every setting and the worker spec are.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// The pool's name, in logs and worker names.
    pub name: String,
    /// How to launch a worker.
    pub spec: WorkerSpec,
    /// Core workers.
    pub size: usize,
    /// Extra workers started while callers wait, stopped after `overflow_idle`.
    pub max_overflow: usize,
    /// How long an overflow worker may sit idle before it is stopped.
    pub overflow_idle: Duration,
    /// Start the core workers at once (default) or on demand.
    pub eager: bool,
    /// Most worker launches in progress at once.
    pub startup_concurrency: usize,
    /// Longest a call may run before its worker is killed and replaced.
    pub call_timeout: Duration,
    /// Longest a caller waits for a free worker.
    pub checkout_timeout: Duration,
    /// Most callers waiting for a worker at once; one more fails at once with
    /// [`Error::Overloaded`]. `None` (default): no bound.
    pub max_waiting: Option<usize>,
    /// Restart strategy, restart type, intensity and backoff.
    pub restart: RestartPolicy,
    /// Health pings of idle workers.
    pub health: HealthCheck,
    /// Retire a worker after this many calls.
    pub max_calls: Option<u64>,
    /// Retire a worker after it has been in service (since its init pong) this long.
    pub max_lifetime: Option<Duration>,
    /// Fraction (0 to 1) of `max_calls` and `max_lifetime` randomised away, drawn once per
    /// worker: each worker's limits are uniform in `[limit × (1 − jitter), limit]`, so workers
    /// started together do not retire together.
    pub recycle_jitter: f64,
    /// Retire a worker whose process's resident memory exceeds this many bytes (sampled every
    /// `sample_interval`, never on a call's path).
    pub max_rss: Option<u64>,
    /// How often the pool samples its workers' memory (for `max_rss`) and publishes its gauges
    /// (with the `metrics` feature).
    pub sample_interval: Duration,
    /// What happens to a session's worker when the session ends.
    pub session_end: SessionEnd,
    /// Sessions unused this long end by themselves.
    pub session_idle_timeout: Duration,
    /// Grace period for stopping a worker (shutdown message, then SIGTERM, then SIGKILL).
    pub shutdown_grace: Duration,
    /// How long an abandoned call may take to finish before its worker is recycled.
    pub drain_timeout: Duration,
    /// How long a session's worker may take to answer its `reset` before it is recycled.
    pub session_reset_timeout: Duration,
    /// Retries of idempotent calls whose worker died.
    pub retry: Retry,
    /// The Docker engines a container pool spreads its workers over (empty: the spec's own
    /// engine). See `docs/scale-out.md`.
    pub engines: Vec<FleetEngine>,
    /// How those engines are watched.
    pub engine_health: HealthOptions,
}

/// Builds a [`Pool`]: `Pool::builder(spec).size(4).build().await`. Every setting has a
/// default (listed with its configuration-file key in `docs/configuration.md`);
/// [`PoolBuilder::build`] validates them before anything starts.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> Result<(), wharf::Error> {
/// use std::time::Duration;
/// use wharf::{Backoff, Error, Pool, ProcessSpec, RestartType};
///
/// let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"]).unwrap();
/// let builder = Pool::builder(spec)
///     .name("ml")
///     .size(1)
///     .max_overflow(1) // one more worker while callers wait
///     .lazy() // no worker until the first call
///     .call_timeout(Duration::from_secs(5))
///     .max_waiting(16) // a 17th waiting caller fails at once with Overloaded
///     .restart_type(RestartType::Transient)
///     .backoff(Backoff {
///         initial: Duration::from_millis(100),
///         ..Backoff::default()
///     })
///     .max_calls(10_000); // retire a worker after 10,000 calls
/// assert_eq!(builder.config().max_overflow, 1);
///
/// // Settings that cannot work are refused before anything starts.
/// let none = builder.clone().size(0).max_overflow(0).build().await;
/// assert!(matches!(none, Err(Error::Config { field: "size", .. })));
///
/// let pool = builder.build().await?;
/// let slept: u64 = pool.call("sleep", &1).await?; // the first call starts a worker
/// assert_eq!(slept, 1);
/// pool.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    config: PoolConfig,
}

impl PoolBuilder {
    pub(crate) fn new(spec: WorkerSpec) -> Self {
        Self {
            config: PoolConfig {
                name: "pool".into(),
                spec,
                size: 4,
                max_overflow: 0,
                overflow_idle: Duration::from_secs(30),
                eager: true,
                startup_concurrency: 4,
                call_timeout: Duration::from_secs(30),
                checkout_timeout: Duration::from_secs(10),
                max_waiting: None,
                restart: RestartPolicy::default(),
                health: HealthCheck::default(),
                max_calls: None,
                max_lifetime: None,
                recycle_jitter: 0.1,
                max_rss: None,
                sample_interval: Duration::from_secs(1),
                session_end: SessionEnd::Reset,
                session_idle_timeout: Duration::from_secs(300),
                shutdown_grace: Duration::from_secs(2),
                drain_timeout: Duration::from_secs(5),
                session_reset_timeout: Duration::from_secs(5),
                retry: Retry::default(),
                engines: Vec::new(),
                engine_health: HealthOptions::default(),
            },
        }
    }

    /// Names the pool.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }
    /// Core workers (default 4).
    #[must_use]
    pub fn size(mut self, size: usize) -> Self {
        self.config.size = size;
        self
    }
    /// Extra workers started under load (default 0).
    #[must_use]
    pub fn max_overflow(mut self, n: usize) -> Self {
        self.config.max_overflow = n;
        self
    }
    /// Idle time after which an overflow worker stops (default 30 s).
    #[must_use]
    pub fn overflow_idle_timeout(mut self, d: Duration) -> Self {
        self.config.overflow_idle = d;
        self
    }
    /// Start workers on demand instead of at once.
    #[must_use]
    pub fn lazy(mut self) -> Self {
        self.config.eager = false;
        self
    }
    /// Adds a Docker engine to spread the pool's container workers over (with its capacity
    /// and start-up concurrency, if a [`FleetEngine`]). A pool with engines places each
    /// worker on the least-loaded engine that is up, moves the workers of an engine it loses
    /// to the others, and ships its image from the local engine to each (see
    /// `docs/scale-out.md`). Its workers must use the attach transport.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use wharf::{ContainerSpec, Engine, FleetEngine, Pool, TlsFiles, Transport};
    ///
    /// let tls = TlsFiles {
    ///     ca: "certs/ca.pem".into(),
    ///     cert: "certs/cert.pem".into(),
    ///     key: "certs/key.pem".into(),
    /// };
    /// let h2 = Engine::tls("h2", "tcp://10.250.0.2:2376", &tls, Duration::from_secs(30))?;
    /// let h3 = Engine::tls("h3", "tcp://10.250.0.3:2376", &tls, Duration::from_secs(30))?;
    /// let spec = ContainerSpec::new("my/worker:1", ["python3", "-m", "my_worker"])
    ///     .transport(Transport::Attach);
    /// let pool = Pool::builder(spec)
    ///     .size(8)
    ///     .engine(FleetEngine::from(h2).capacity(16))
    ///     .engine(h3)
    ///     .build()
    ///     .await?;
    /// println!("{:?}", pool.workers_by_engine()); // {"h2": 4, "h3": 4}
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn engine(mut self, engine: impl Into<FleetEngine>) -> Self {
        self.config.engines.push(engine.into());
        self
    }

    /// How the pool's engines are watched (default: a ping every second, answered within 2 s,
    /// two missed in a row take an engine down).
    #[must_use]
    pub fn engine_health(mut self, options: HealthOptions) -> Self {
        self.config.engine_health = options;
        self
    }

    /// Most launches at once (default 4): many interpreters importing at once fight for CPU.
    #[must_use]
    pub fn startup_concurrency(mut self, n: usize) -> Self {
        self.config.startup_concurrency = n;
        self
    }
    /// How long a worker may take to answer its init ping (default 30 s).
    #[must_use]
    pub fn init_timeout(mut self, d: Duration) -> Self {
        self.config.spec.set_init_timeout(d);
        self
    }
    /// Default deadline of a call (default 30 s).
    #[must_use]
    pub fn call_timeout(mut self, d: Duration) -> Self {
        self.config.call_timeout = d;
        self
    }
    /// How long a caller waits for a worker (default 10 s).
    #[must_use]
    pub fn checkout_timeout(mut self, d: Duration) -> Self {
        self.config.checkout_timeout = d;
        self
    }
    /// Bounds the callers waiting for a worker: one more fails at once with
    /// [`Error::Overloaded`] instead of queueing (default: no bound). 0 means never wait.
    #[must_use]
    pub fn max_waiting(mut self, n: usize) -> Self {
        self.config.max_waiting = Some(n);
        self
    }
    /// Restart strategy (default one_for_one).
    #[must_use]
    pub fn strategy(mut self, s: Strategy) -> Self {
        self.config.restart.strategy = s;
        self
    }
    /// Restart type of every worker (default permanent).
    #[must_use]
    pub fn restart_type(mut self, r: RestartType) -> Self {
        self.config.restart.restart = r;
        self
    }
    /// Restart intensity: at most `max_restarts` within `within` (default 10 in 5 s).
    #[must_use]
    pub fn intensity(mut self, max_restarts: u32, within: Duration) -> Self {
        self.config.restart.intensity = Intensity {
            max_restarts,
            within,
        };
        self
    }
    /// Consecutive failed launches of one slot, with no ready worker between, after which the
    /// pool fails at once (default 5).
    #[must_use]
    pub fn max_start_failures(mut self, n: u32) -> Self {
        self.config.restart.max_start_failures = n;
        self
    }
    /// Backoff between restarts of one slot.
    #[must_use]
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.config.restart.backoff = b;
        self
    }
    /// Health pings of idle workers.
    #[must_use]
    pub fn health_check(mut self, h: HealthCheck) -> Self {
        self.config.health = h;
        self
    }
    /// Replace each worker after `n` calls (less with [`recycle_jitter`](Self::recycle_jitter)).
    /// The replacement starts first; the worker keeps serving until it is ready.
    #[must_use]
    pub fn max_calls(mut self, n: u64) -> Self {
        self.config.max_calls = Some(n);
        self
    }
    /// Replace each worker after it has been in service (since its init pong) for `d` (less
    /// with [`recycle_jitter`](Self::recycle_jitter)). The replacement starts first; the worker
    /// keeps serving until it is ready.
    #[must_use]
    pub fn max_lifetime(mut self, d: Duration) -> Self {
        self.config.max_lifetime = Some(d);
        self
    }
    /// Spreads recycling out (default 0.1): each worker's own `max_calls` and `max_lifetime`
    /// are drawn once, uniformly in `[limit × (1 − jitter), limit]`, so workers started
    /// together are not all replaced at once. 0 gives every worker the exact limits; the
    /// fraction must be between 0 and 1.
    #[must_use]
    pub fn recycle_jitter(mut self, jitter: f64) -> Self {
        self.config.recycle_jitter = jitter;
        self
    }
    /// Retire a worker whose resident memory exceeds `bytes`: an idle one at the next sample,
    /// a busy one when it comes back after that sample.
    #[must_use]
    pub fn max_rss(mut self, bytes: u64) -> Self {
        self.config.max_rss = Some(bytes);
        self
    }

    /// How often workers' memory is sampled and gauges are published (default 1 s).
    #[must_use]
    pub fn sample_interval(mut self, d: Duration) -> Self {
        self.config.sample_interval = d;
        self
    }
    /// Largest frame either side may send (default 8 MiB).
    #[must_use]
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.config.spec.set_max_frame(bytes);
        self
    }
    /// The protocol channel of process workers (default fds 3/4).
    #[must_use]
    pub fn channel(mut self, c: Channel) -> Self {
        if let WorkerSpec::Process(spec) = &mut self.config.spec {
            spec.channel = c;
        }
        self
    }
    /// What happens to a session's worker when the session ends (default reset).
    #[must_use]
    pub fn session_end(mut self, s: SessionEnd) -> Self {
        self.config.session_end = s;
        self
    }
    /// Idle time after which a session ends by itself (default 5 min).
    #[must_use]
    pub fn session_idle_timeout(mut self, d: Duration) -> Self {
        self.config.session_idle_timeout = d;
        self
    }
    /// Grace period when stopping a worker (default 2 s).
    #[must_use]
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.config.shutdown_grace = d;
        self
    }
    /// How long an abandoned call may take to settle before its worker is recycled (default
    /// 5 s).
    #[must_use]
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.config.drain_timeout = d;
        self
    }

    /// How long a session's worker may take to answer its `reset` before it is recycled
    /// (default 5 s).
    #[must_use]
    pub fn session_reset_timeout(mut self, d: Duration) -> Self {
        self.config.session_reset_timeout = d;
        self
    }

    /// Retries for [`CallOptions::idempotent`](crate::CallOptions::idempotent) (default 3 retries, 5 ms apart).
    #[must_use]
    pub fn retry(mut self, max_retries: u32, delay: Duration) -> Self {
        self.config.retry = Retry { max_retries, delay };
        self
    }

    /// The configuration so far.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The configuration, for [`Runtime::get_or_start`](crate::Runtime::get_or_start) or to
    /// keep.
    #[must_use]
    pub fn into_config(self) -> PoolConfig {
        self.config
    }

    /// Validates the configuration ([`PoolConfig::validate`]) and starts the pool's
    /// supervisor. Eager pools begin launching workers at once; use [`Pool::wait_ready`] to
    /// wait for them.
    pub async fn build(self) -> Result<Pool> {
        self.config.validate()?;
        Pool::start(self.config).await
    }
}

/// A builder that starts from `config` (from a configuration file, or kept from an earlier
/// builder).
impl From<PoolConfig> for PoolBuilder {
    fn from(config: PoolConfig) -> Self {
        Self { config }
    }
}

impl From<PoolBuilder> for PoolConfig {
    fn from(builder: PoolBuilder) -> Self {
        builder.config
    }
}

impl PoolConfig {
    /// One line that says what the pool runs and how many: `4 workers (+2 overflow), eager,
    /// process python3 -m wharf_worker.demo, call timeout 30s` (and `, over engines h2, h3`
    /// for a pool spread over engines).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} worker{}",
            self.size,
            if self.size == 1 { "" } else { "s" }
        );
        if self.max_overflow > 0 {
            s.push_str(&format!(" (+{} overflow)", self.max_overflow));
        }
        s.push_str(if self.eager { ", eager" } else { ", lazy" });
        match &self.spec {
            WorkerSpec::Process(p) => {
                s.push_str(", process ");
                let argv: Vec<_> = std::iter::once(&p.program)
                    .chain(&p.args)
                    .map(|a| a.to_string_lossy())
                    .collect();
                s.push_str(&argv.join(" "));
            }
            WorkerSpec::Container(c) => {
                s.push_str(&format!(", container {} {}", c.image, c.command.join(" ")));
            }
            other => s.push_str(&format!(", {}", other.describe())),
        }
        if !self.engines.is_empty() {
            let names: Vec<&str> = self.engines.iter().map(|e| e.engine.name()).collect();
            s.push_str(&format!(", over engines {}", names.join(", ")));
        }
        s.push_str(&format!(
            ", call timeout {}",
            humantime::format_duration(self.call_timeout)
        ));
        s
    }

    /// Checks every setting for a value that cannot work: zero, negative, NaN or infinite
    /// where that makes no sense, a pool with no worker at all, a recycling limit no worker
    /// can meet. The first problem found is returned as [`Error::Config`], naming the field.
    ///
    /// Durations may be as large as [`Duration::MAX`]: a timeout too large to add to the clock
    /// means "no limit" (wait, or let a call run, without end).
    pub fn validate(&self) -> Result<()> {
        fn bad(field: &'static str, reason: impl Into<String>) -> Result<()> {
            Err(Error::Config {
                field,
                reason: reason.into(),
            })
        }
        let nonzero = |field: &'static str, d: Duration| -> Result<()> {
            if d.is_zero() {
                bad(field, "must be longer than zero")
            } else {
                Ok(())
            }
        };
        if self.name.is_empty() {
            return bad("name", "must not be empty");
        }
        match &self.spec {
            WorkerSpec::Process(spec) if spec.program.is_empty() => {
                return bad("spec.program", "must not be empty");
            }
            WorkerSpec::Container(spec) if spec.image.is_empty() => {
                return bad("spec.image", "must not be empty");
            }
            WorkerSpec::Container(spec) if spec.command.is_empty() => {
                return bad("spec.command", "must not be empty");
            }
            _ => {}
        }
        if self.size == 0 && self.max_overflow == 0 {
            return bad(
                "size",
                "size and max_overflow are both 0: the pool could never run a worker",
            );
        }
        if self.startup_concurrency == 0 {
            return bad("startup_concurrency", "must be at least 1");
        }
        let max_frame = self.spec.max_frame();
        if !(64..=u32::MAX as usize).contains(&max_frame) {
            return bad("max_frame", format!("{max_frame} is outside 64 ..= 2^32-1"));
        }
        nonzero("init_timeout", self.spec.init_timeout())?;
        nonzero("call_timeout", self.call_timeout)?;
        if self.max_overflow > 0 {
            nonzero("overflow_idle_timeout", self.overflow_idle)?;
        }
        nonzero("session_idle_timeout", self.session_idle_timeout)?;
        nonzero("sample_interval", self.sample_interval)?;
        nonzero("intensity.within", self.restart.intensity.within)?;
        if self.restart.max_start_failures == 0 {
            return bad("max_start_failures", "must be at least 1");
        }
        let b = &self.restart.backoff;
        if !(b.multiplier.is_finite() && b.multiplier >= 1.0) {
            return bad(
                "backoff.multiplier",
                format!("{} must be a finite number of at least 1", b.multiplier),
            );
        }
        if !(0.0..=1.0).contains(&b.jitter) {
            return bad(
                "backoff.jitter",
                format!("{} must be a fraction between 0 and 1", b.jitter),
            );
        }
        if b.max < b.initial {
            return bad(
                "backoff.max",
                format!(
                    "{:?} is shorter than backoff.initial {:?}",
                    b.max, b.initial
                ),
            );
        }
        if let Some(interval) = self.health.interval {
            nonzero("health.interval", interval)?;
        }
        nonzero("health.timeout", self.health.timeout)?;
        if self.health.max_missed == 0 {
            return bad("health.max_missed", "must be at least 1");
        }
        if self.max_calls == Some(0) {
            return bad(
                "max_calls",
                "0 would retire every worker before its first call",
            );
        }
        if let Some(d) = self.max_lifetime {
            nonzero("max_lifetime", d)?;
        }
        if !(0.0..=1.0).contains(&self.recycle_jitter) {
            return bad(
                "recycle_jitter",
                format!("{} must be a fraction between 0 and 1", self.recycle_jitter),
            );
        }
        if self.max_rss == Some(0) {
            return bad("max_rss", "0 bytes: every worker would exceed it at once");
        }
        if self.max_rss.is_some() && matches!(self.spec, WorkerSpec::Container(_)) {
            return bad(
                "max_rss",
                "not for container workers (the host process the engine reports is the \
                 container's init): set the container's memory limit instead",
            );
        }
        nonzero("session_reset_timeout", self.session_reset_timeout)?;
        self.validate_engines()
    }

    fn validate_engines(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::Config { field, reason });
        if self.engines.is_empty() {
            return Ok(());
        }
        match &self.spec {
            WorkerSpec::Container(spec) if spec.transport != Transport::Attach => {
                return bad(
                    "container.transport",
                    "a pool spread over engines reaches its workers over the attach stream \
                     (FIFOs and sockets need the engine's host to be this one): set \
                     transport = \"attach\""
                        .into(),
                );
            }
            WorkerSpec::Container(_) => {}
            _ => return bad("engines", "engines host container workers only".into()),
        }
        for (i, e) in self.engines.iter().enumerate() {
            let name = e.engine.name();
            if self.engines[..i].iter().any(|o| o.engine.name() == name) {
                return bad("engines", format!("the engine {name:?} is listed twice"));
            }
            if e.capacity == Some(0) {
                return bad(
                    "engines.capacity",
                    format!("0 for engine {name:?}: must be at least 1"),
                );
            }
        }
        let h = &self.engine_health;
        if h.interval.is_zero() || h.timeout.is_zero() || h.down_after == 0 {
            return bad(
                "engine_health",
                "interval, timeout and down_after must all be above zero".into(),
            );
        }
        Ok(())
    }
}
