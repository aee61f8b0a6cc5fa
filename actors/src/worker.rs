//! The worker actor: owns one port for the life of one worker process.
//!
//! Its `pre_start` launches the process and performs the init handshake (under the port's init
//! timeout), so a supervisor that spawns it from a separate task never waits on a start. While it
//! runs it pings the worker when idle, notices when the process dies, and retires it on request.
//! It stops itself when its worker is gone; its supervisor learns why from [`WorkerShared`].
//!
//! Calls do not pass through the actor's mailbox: a [`WorkerHandle`] gives the port to whoever
//! holds the worker (one caller at a time, by the pool's checkout), and the actor stays on the
//! lifecycle path only.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use rand::RngExt;

use crate::port::{Port, PortError, WorkerSpec};
use crate::supervisor::SupervisorMsg;

/// How long an exited worker's actor waits for the port's reader to report the last bytes.
const READER_GRACE: Duration = Duration::from_secs(1);

/// Where a worker is in its life. Whether a running worker serves a caller is its embedder's
/// business (the pool's checkout): the embedder *holds* it ([`WorkerShared::try_hold`]), and
/// the actor leaves a held worker alone (no health pings, no retiring on age).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Lifecycle {
    /// Launching and waiting for the init pong.
    Starting = 0,
    /// Running, and nobody holds it.
    Idle = 1,
    /// Running, and held by the embedder.
    Held = 2,
    /// Being stopped (retired, shut down).
    Stopping = 3,
    /// Gone.
    Dead = 4,
}

impl Lifecycle {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Starting,
            1 => Self::Idle,
            2 => Self::Held,
            3 => Self::Stopping,
            _ => Self::Dead,
        }
    }
}

/// Why a worker ended.
#[derive(Debug, Clone)]
pub enum ExitKind {
    /// It exited with status 0 by itself.
    Normal,
    /// It crashed, was killed from outside, closed its channel or broke the protocol.
    Crashed(PortError),
    /// It stopped answering health pings and was killed.
    Unresponsive,
    /// A call overran its deadline and the runtime killed it.
    DeadlineKilled,
    /// The runtime retired it (max calls, max lifetime, max RSS, session end policy, idle
    /// overflow, or a call abandoned mid-flight that did not settle).
    Recycled(String),
    /// The supervisor stopped it (shutdown, or a sibling's restart under one_for_all or
    /// rest_for_one).
    Stopped,
    /// The runtime retired it as soon as it was ready, before it served anything, because it
    /// already exceeded a recycling limit (e.g. `max_rss` below the interpreter's baseline).
    /// Unlike [`ExitKind::Recycled`] this counts as a failure: restarted under the restart
    /// policy, with intensity and backoff, so a limit no fresh worker meets fails the pool
    /// instead of replacing workers forever.
    Unfit(String),
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Normal => write!(f, "exited with status 0"),
            ExitKind::Crashed(e) => write!(f, "crashed: {e}"),
            ExitKind::Unresponsive => write!(f, "stopped answering health pings"),
            ExitKind::DeadlineKilled => write!(f, "killed for overrunning a call's deadline"),
            ExitKind::Recycled(why) => write!(f, "recycled: {why}"),
            ExitKind::Stopped => write!(f, "stopped by its supervisor"),
            ExitKind::Unfit(why) => {
                write!(f, "retired before serving anything: {why}")
            }
        }
    }
}

impl ExitKind {
    /// Whether this is an abnormal exit in OTP's sense (it decides transient restarts).
    pub fn is_abnormal(&self) -> bool {
        matches!(
            self,
            ExitKind::Crashed(_) | ExitKind::Unresponsive | ExitKind::Unfit(_)
        )
    }

    /// Whether the runtime itself ended the worker on purpose and wants it replaced at once,
    /// outside the restart policy (no intensity, no backoff).
    pub fn is_replacement(&self) -> bool {
        matches!(self, ExitKind::DeadlineKilled | ExitKind::Recycled(_))
    }

    /// A short stable name for the cause, for metrics and logs: `normal`, `crashed`,
    /// `unresponsive`, `deadline`, `recycled`, `stopped` or `unfit`.
    pub fn label(&self) -> &'static str {
        match self {
            ExitKind::Normal => "normal",
            ExitKind::Crashed(_) => "crashed",
            ExitKind::Unresponsive => "unresponsive",
            ExitKind::DeadlineKilled => "deadline",
            ExitKind::Recycled(_) => "recycled",
            ExitKind::Stopped => "stopped",
            ExitKind::Unfit(_) => "unfit",
        }
    }
}

/// One worker's recycling limits: when it should be replaced. Drawn once per worker, at its
/// launch, from the pool's limits and its jitter ([`RecycleLimits::jittered`]), so that workers
/// started together do not all retire together.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RecycleLimits {
    /// Replace the worker after this many calls.
    pub max_calls: Option<u64>,
    /// Replace the worker after it has been in service this long.
    pub max_lifetime: Option<Duration>,
}

impl RecycleLimits {
    /// These limits with `jitter` applied: each drawn uniformly in
    /// `[limit × (1 − jitter), limit]`, so a limit is never raised. `jitter` is clamped to
    /// `0..=1` (NaN counts as 0); a call limit stays at least 1.
    pub fn jittered(self, jitter: f64) -> Self {
        let jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        if jitter == 0.0 {
            return self;
        }
        let mut rng = rand::rng();
        let max_calls = self.max_calls.map(|max| {
            // `as` saturates; the lower bound is at least 1 and at most the limit.
            let low = ((max as f64) * (1.0 - jitter)).ceil() as u64;
            let low = low.max(1).min(max);
            rng.random_range(low..=max)
        });
        let max_lifetime = self.max_lifetime.map(|max| {
            let factor = 1.0 - rng.random_range(0.0..=jitter);
            // Saturates (a limit of `Duration::MAX` stays itself) and never exceeds the limit.
            Duration::try_from_secs_f64(max.as_secs_f64() * factor).map_or(max, |d| d.min(max))
        });
        Self {
            max_calls,
            max_lifetime,
        }
    }
}

/// How an embedder holds a worker that serves several calls at once (its init pong declared a
/// `max_concurrency` above 1): calls share it, an exclusive holder gathers all its slots. The
/// actor never reads it; the embedder keeps it under [`WorkerShared::shares`].
#[derive(Debug, Default)]
pub struct Shares {
    /// Calls under way on the worker through shared holds.
    pub calls: usize,
    /// An exclusive holder is gathering the worker's slots (or has them all).
    pub reserved: bool,
    /// Slots the exclusive holder has gathered so far.
    pub gathered: usize,
    /// Wakes the exclusive holder once it has gathered every slot.
    pub waiter: Option<tokio::sync::oneshot::Sender<()>>,
}

/// What a worker's actor and its holders share: its state, counters and how it ended.
#[derive(Debug)]
pub struct WorkerShared {
    /// The worker's name, e.g. `pool-3.7` (slot 3, seventh start).
    pub id: String,
    /// Its slot in the supervisor.
    pub slot: usize,
    state: AtomicU8,
    calls: AtomicU64,
    started: Instant,
    last_used_ms: AtomicU64,
    exit: Mutex<Option<ExitKind>>,
    port: OnceLock<Arc<Port>>,
    ready_at: OnceLock<Instant>,
    /// Resident memory at the last sample, in bytes (0: not sampled yet).
    rss: AtomicU64,
    /// This worker's own recycling limits.
    limits: RecycleLimits,
    /// A replacement has been asked for (it may be starting).
    replacing: AtomicBool,
    /// Its successor is ready (or its slot was removed): it serves no new caller; the reason.
    superseded: OnceLock<String>,
    shares: Mutex<Shares>,
    /// The name of the engine hosting it (a container worker of a pool with a fleet).
    engine: Option<String>,
}

impl WorkerShared {
    /// A worker in the `Starting` state, with no recycling limits.
    pub fn new(id: String, slot: usize) -> Self {
        Self {
            id,
            slot,
            state: AtomicU8::new(Lifecycle::Starting as u8),
            calls: AtomicU64::new(0),
            started: Instant::now(),
            last_used_ms: AtomicU64::new(0),
            exit: Mutex::new(None),
            port: OnceLock::new(),
            ready_at: OnceLock::new(),
            rss: AtomicU64::new(0),
            limits: RecycleLimits::default(),
            replacing: AtomicBool::new(false),
            superseded: OnceLock::new(),
            shares: Mutex::new(Shares::default()),
            engine: None,
        }
    }

    /// The same worker with its own recycling limits.
    #[must_use]
    pub fn with_limits(mut self, limits: RecycleLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Names the engine hosting the worker.
    #[must_use]
    pub fn with_engine(mut self, engine: impl Into<String>) -> Self {
        self.engine = Some(engine.into());
        self
    }

    /// The name of the engine hosting the worker, if its pool spreads over a fleet.
    pub fn engine(&self) -> Option<&str> {
        self.engine.as_deref()
    }

    /// This worker's own recycling limits (jitter already applied).
    pub fn limits(&self) -> RecycleLimits {
        self.limits
    }

    /// Notes that a replacement is wanted; `true` only for the first caller, who should ask the
    /// supervisor ([`SupervisorMsg::Replace`]).
    pub fn request_replacement(&self) -> bool {
        !self.replacing.swap(true, Ordering::AcqRel)
    }

    /// Whether a replacement has been asked for and not given up.
    pub fn replacement_requested(&self) -> bool {
        self.replacing.load(Ordering::Acquire)
    }

    /// Forgets a replacement request that was given up (its successor failed to start), so a
    /// later one may be made.
    pub fn clear_replacement_request(&self) {
        self.replacing.store(false, Ordering::Release);
    }

    /// Marks the worker as superseded: it must serve no new caller and be retired once free.
    /// The first reason given is kept.
    pub fn mark_superseded(&self, reason: &str) {
        let _ = self.superseded.set(reason.to_owned());
    }

    /// Why the worker was superseded, if it was: it must serve no new caller.
    pub fn superseded(&self) -> Option<&str> {
        self.superseded.get().map(String::as_str)
    }

    /// The embedder's shared holds of a worker serving several calls at once (see [`Shares`]).
    pub fn shares(&self) -> std::sync::MutexGuard<'_, Shares> {
        self.shares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the worker is in its life.
    pub fn lifecycle(&self) -> Lifecycle {
        Lifecycle::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Sets the lifecycle state unconditionally.
    pub fn set_lifecycle(&self, state: Lifecycle) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// Moves from `from` to `to` only if the state is still `from`.
    pub fn transition(&self, from: Lifecycle, to: Lifecycle) -> bool {
        self.state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Takes an idle worker for the embedder (`Idle → Held`); false if it is not idle (being
    /// stopped, dead, or already held).
    pub fn try_hold(&self) -> bool {
        self.transition(Lifecycle::Idle, Lifecycle::Held)
    }

    /// Gives a held worker back (`Held → Idle`); a worker that started stopping meanwhile
    /// stays as it is.
    pub fn unhold(&self) {
        self.transition(Lifecycle::Held, Lifecycle::Idle);
    }

    /// Counts one call; returns the count so far.
    pub fn count_call(&self) -> u64 {
        self.calls.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Records a sample of the worker's resident memory, in bytes.
    pub fn set_rss(&self, bytes: u64) {
        self.rss.store(bytes, Ordering::Relaxed);
    }

    /// The worker's resident memory at the last sample, in bytes (0: not sampled yet).
    pub fn rss(&self) -> u64 {
        self.rss.load(Ordering::Relaxed)
    }

    /// Calls served so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// How long since the worker was launched.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// How long the worker has been in service: since it answered its init ping (zero before).
    /// `max_lifetime` counts this, so start-up time never eats into it: a lifetime shorter than
    /// a start-up does not retire every worker as soon as it is ready.
    pub fn service_age(&self) -> Duration {
        self.ready_at.get().map_or(Duration::ZERO, Instant::elapsed)
    }

    /// Notes that the worker was just used (returned to the idle set).
    pub fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_used_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the worker was last used (or launched).
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn set_port(&self, port: Arc<Port>) {
        let _ = self.port.set(port);
    }

    /// The worker's port, once it has started.
    pub fn port(&self) -> Option<&Arc<Port>> {
        self.port.get()
    }

    /// Records why the worker ends; the first reason recorded wins.
    pub fn record_exit(&self, kind: ExitKind) {
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_none() {
            *exit = Some(kind);
        }
    }

    /// Why the worker ended, if it has.
    pub fn exit_kind(&self) -> Option<ExitKind> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Everything needed to use a ready worker: its port, its shared state and its actor.
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    /// The worker's shared state.
    pub shared: Arc<WorkerShared>,
    /// The worker's port.
    pub port: Arc<Port>,
    /// The worker's actor.
    pub actor: ActorRef<WorkerMsg>,
}

impl WorkerHandle {
    /// Kills the worker at once (its actor then stops, and its supervisor replaces it).
    pub fn kill(&self, kind: ExitKind) {
        self.kill_because(kind, PortError::Closed);
    }

    /// Kills the worker at once; requests still in flight on it fail with `reason`.
    pub fn kill_because(&self, kind: ExitKind, reason: PortError) {
        self.shared.record_exit(kind);
        self.shared.set_lifecycle(Lifecycle::Dead);
        self.port.kill(reason);
    }

    /// How many calls the worker serves at once (its init pong's `max_concurrency`).
    pub fn max_concurrency(&self) -> usize {
        self.port.info().max_concurrency
    }

    /// Asks the actor to stop the worker gracefully and have it replaced.
    pub fn retire(&self, reason: impl Into<String>) {
        self.retire_as(ExitKind::Recycled(reason.into()));
    }

    /// Asks the actor to stop the worker gracefully; `kind` says why (and so how its
    /// supervisor treats the exit: [`ExitKind::Recycled`] is replaced at once,
    /// [`ExitKind::Unfit`] is restarted under the restart policy).
    pub fn retire_as(&self, kind: ExitKind) {
        self.shared.set_lifecycle(Lifecycle::Stopping);
        self.shared.record_exit(kind);
        if self.actor.cast(WorkerMsg::Retire).is_err() {
            self.port.kill(PortError::Closed);
        }
    }

    /// Whether the worker can still serve.
    pub fn is_alive(&self) -> bool {
        self.shared.lifecycle() != Lifecycle::Dead && self.port.is_open()
    }
}

/// Health checking of idle workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    /// How often an idle worker is pinged; `None` disables pings.
    pub interval: Option<Duration>,
    /// How long a ping may take.
    pub timeout: Duration,
    /// Consecutive missed pings after which the worker is declared dead.
    pub max_missed: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            interval: Some(Duration::from_secs(5)),
            timeout: Duration::from_secs(2),
            max_missed: 2,
        }
    }
}

/// Messages to a worker actor.
#[derive(Debug)]
pub enum WorkerMsg {
    /// The port closed: the worker died or was killed.
    PortClosed,
    /// Time to ping, if idle.
    HealthTick,
    /// A health ping ended.
    Pinged {
        /// How.
        result: Result<(), PortError>,
        /// Calls served when the ping was sent (a caller who took the worker meanwhile may
        /// delay the pong).
        calls_before: u64,
    },
    /// Stop gracefully (shutdown message, grace, signals) and end the actor.
    Retire,
}

/// What a worker actor is started with.
pub struct WorkerArgs {
    /// How to launch the process.
    pub spec: WorkerSpec,
    /// State shared with the supervisor and the pool.
    pub shared: Arc<WorkerShared>,
    /// Health checking.
    pub health: HealthCheck,
    /// Grace period for a graceful stop.
    pub shutdown_grace: Duration,
    /// The supervisor, asked for a replacement when the worker outlives its `max_lifetime`
    /// (from [`WorkerShared::limits`]) while idle.
    pub supervisor: ActorRef<SupervisorMsg>,
}

/// The worker actor.
#[derive(Debug, Default)]
pub struct WorkerActor;

/// The worker actor's state.
pub struct WorkerActorState {
    port: Arc<Port>,
    shared: Arc<WorkerShared>,
    health: HealthCheck,
    shutdown_grace: Duration,
    supervisor: ActorRef<SupervisorMsg>,
    missed: u32,
    /// A health ping is under way.
    pinging: bool,
    /// The worker keeps a watchdog: it is pinged when held too, so that it never goes
    /// without a word from the runtime for longer than its watchdog allows.
    feed_watchdog: bool,
}

impl WorkerActorState {
    /// The worker's port.
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }
}

impl Drop for WorkerActorState {
    fn drop(&mut self) {
        // An actor that is killed skips post_stop: the process group still dies with its state.
        self.port.kill(PortError::Closed);
    }
}

impl Actor for WorkerActor {
    type Msg = WorkerMsg;
    type State = WorkerActorState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkerMsg>,
        args: WorkerArgs,
    ) -> Result<WorkerActorState, ActorProcessingErr> {
        let port = match Port::start(&args.spec).await {
            Ok(port) => Arc::new(port),
            Err(e) => {
                args.shared.set_lifecycle(Lifecycle::Dead);
                return Err(Box::new(e));
            }
        };
        args.shared.set_port(port.clone());
        // Wait on a clone of the exit signal, not on the port, so the port is free to drop.
        let closed = port.closed_signal();
        let me = myself.clone();
        tokio::spawn(async move {
            closed.await;
            let _ = me.cast(WorkerMsg::PortClosed);
        });
        if let Some(interval) = args.health.interval {
            myself.send_interval(interval, || WorkerMsg::HealthTick);
        }
        // Ready: idle until its embedder holds it.
        let _ = args.shared.ready_at.set(Instant::now());
        args.shared.transition(Lifecycle::Starting, Lifecycle::Idle);
        Ok(WorkerActorState {
            port,
            shared: args.shared,
            health: args.health,
            shutdown_grace: args.shutdown_grace,
            supervisor: args.supervisor,
            missed: 0,
            pinging: false,
            feed_watchdog: args.spec.watchdog_after().is_some(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        state: &mut WorkerActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::PortClosed => {
                // The reap can overtake the reader: let it report what the worker last sent
                // (bounded: a grandchild may hold the channel open). Not for a worker whose
                // engine is lost: its stream will say nothing more.
                if !matches!(
                    state.port.close_reason(),
                    Some(PortError::EngineLost { .. })
                ) {
                    state.port.reader_finished(READER_GRACE).await;
                }
                let kind = match (state.port.exit_status(), state.port.close_reason()) {
                    (_, Some(PortError::ProtocolViolation { reason })) => {
                        ExitKind::Crashed(PortError::ProtocolViolation { reason })
                    }
                    (Some(status), _) if status.success() => ExitKind::Normal,
                    _ => ExitKind::Crashed(PortError::WorkerDied(state.port.exit_now())),
                };
                state.shared.record_exit(kind);
                state.shared.set_lifecycle(Lifecycle::Dead);
                myself.stop(None);
            }
            WorkerMsg::HealthTick => {
                let lifecycle = state.shared.lifecycle();
                let expired = state
                    .shared
                    .limits()
                    .max_lifetime
                    .is_some_and(|max| state.shared.service_age() >= max);
                // Make before break: the supervisor starts a successor, and this worker keeps
                // serving until the successor is ready. A held worker is asked for too, so its
                // successor is starting while its caller finishes.
                if expired
                    && matches!(lifecycle, Lifecycle::Idle | Lifecycle::Held)
                    && state.shared.request_replacement()
                {
                    let _ = state.supervisor.cast(SupervisorMsg::Replace {
                        worker: state.shared.clone(),
                        reason: "max_lifetime reached".into(),
                        give_up_on_failure: false,
                        reply: None,
                    });
                }
                if lifecycle != Lifecycle::Idle {
                    state.missed = 0;
                    if state.feed_watchdog && lifecycle == Lifecycle::Held {
                        // Only to feed its watchdog: a held worker is its holder's business.
                        let (port, timeout) = (state.port.clone(), state.health.timeout);
                        tokio::spawn(async move {
                            let _ = port.ping(timeout).await;
                        });
                    }
                    return Ok(());
                }
                if state.pinging {
                    return Ok(());
                }
                // The ping runs in a task of its own: the actor stays free for Retire and
                // PortClosed while a worker slow to pong makes it wait.
                state.pinging = true;
                let calls_before = state.shared.calls();
                let (port, timeout, me) =
                    (state.port.clone(), state.health.timeout, myself.clone());
                tokio::spawn(async move {
                    let result = port.ping(timeout).await;
                    let _ = me.cast(WorkerMsg::Pinged {
                        result,
                        calls_before,
                    });
                });
            }
            WorkerMsg::Pinged {
                result,
                calls_before,
            } => {
                state.pinging = false;
                match result {
                    Ok(()) => state.missed = 0,
                    // A caller took the worker while we pinged: the pong may wait behind its call.
                    Err(_) if state.shared.calls() != calls_before => state.missed = 0,
                    Err(PortError::Timeout(_)) => {
                        state.missed += 1;
                        tracing::warn!(worker = %state.shared.id, missed = state.missed, "worker missed a health ping");
                        if state.missed >= state.health.max_missed
                            && state.shared.transition(Lifecycle::Idle, Lifecycle::Dead)
                        {
                            state.shared.record_exit(ExitKind::Unresponsive);
                            state.port.kill(PortError::Closed);
                        }
                    }
                    // The port closed: PortClosed follows.
                    Err(_) => {}
                }
            }
            WorkerMsg::Retire => {
                state.shared.set_lifecycle(Lifecycle::Stopping);
                state
                    .shared
                    .record_exit(ExitKind::Recycled("retired".into()));
                state.port.stop(state.shutdown_grace).await;
                state.shared.set_lifecycle(Lifecycle::Dead);
                myself.stop(None);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<WorkerMsg>,
        state: &mut WorkerActorState,
    ) -> Result<(), ActorProcessingErr> {
        state.shared.set_lifecycle(Lifecycle::Dead);
        if state.port.is_open() {
            state.port.stop(state.shutdown_grace).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jittered_limits_stay_within_bounds_and_differ() {
        let limits = RecycleLimits {
            max_calls: Some(1000),
            max_lifetime: Some(Duration::from_secs(3600)),
        };
        assert_eq!(limits.jittered(0.0), limits, "no jitter: the exact limits");
        assert_eq!(limits.jittered(f64::NAN), limits, "NaN counts as no jitter");
        let draws: Vec<RecycleLimits> = (0..200).map(|_| limits.jittered(0.1)).collect();
        for d in &draws {
            let calls = d.max_calls.unwrap();
            let life = d.max_lifetime.unwrap();
            assert!((900..=1000).contains(&calls), "{d:?}");
            assert!(
                life >= Duration::from_secs(3240) && life <= Duration::from_secs(3600),
                "{d:?}"
            );
        }
        let calls: std::collections::HashSet<u64> =
            draws.iter().filter_map(|d| d.max_calls).collect();
        let lives: std::collections::HashSet<Duration> =
            draws.iter().filter_map(|d| d.max_lifetime).collect();
        assert!(calls.len() > 10 && lives.len() > 10, "{calls:?}");
        // A limit is never raised, a call limit never drops to 0, and nothing overflows.
        let small = RecycleLimits {
            max_calls: Some(1),
            max_lifetime: Some(Duration::MAX),
        };
        for _ in 0..100 {
            let d = small.jittered(1.0);
            assert_eq!(d.max_calls, Some(1));
            assert!(d.max_lifetime.unwrap() <= Duration::MAX);
            let d = small.jittered(1e-17);
            assert_eq!(d.max_calls, Some(1));
        }
        let none = RecycleLimits::default();
        assert_eq!(none.jittered(0.5), none);
    }
}
