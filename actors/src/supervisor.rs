//! The supervisor actor: starts a pool's workers, restarts them under the restart policy, and
//! escalates when restarts come too fast.
//!
//! It is on the lifecycle path only. It never awaits a spawn or a handshake in its message
//! handler: each start runs in its own task (the worker actor's `pre_start` does the launch and
//! init ping), which reports back with a `Started` message. Restarts after a backoff are timer
//! messages. Whoever embeds the supervisor learns of ready and exited workers through
//! [`PoolEvents`]; the supervisor itself knows nothing of checkout.
//!
//! Replacements on purpose (recycling limits, rolling restarts) are *make before break*
//! ([`SupervisorMsg::Replace`]): the slot's worker becomes *outgoing* and keeps serving while a
//! successor launches in its slot; once the successor is ready the outgoing worker is
//! *superseded* ([`PoolEvents::worker_superseded`]) and retired as soon as nobody holds it.
//! The number of core slots can change at run time ([`SupervisorMsg::Resize`]).
//!
//! With a [`Fleet`] (container workers over several Docker engines), each launch is placed on
//! an engine ([`placement::spread`]): a slot's engine is where its worker runs. An engine
//! becomes usable for the pool once it is up and *prepared* (this pool's leftovers swept from
//! it, the pool's image shipped to it). When its monitor takes it for lost, its workers are
//! failed at once with [`PortError::EngineLost`] and their slots start again on the other
//! engines, without counting toward the restart intensity: the engine's own circuit breaker
//! (the monitor's backoff) stands in for it. An abnormal exit on an engine that still looks up
//! is not counted at once either: the engine is probed first, and only an exit on an engine
//! that answers counts as the worker's failure. Slots no engine has room for wait, *unplaced*,
//! until one has.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent,
};

use crate::fleet::{placement, Fleet, Health};
use crate::port::container::{self, Sweep};
use crate::port::{PortError, WorkerSpec};
use crate::restart::{IntensityTracker, RestartPolicy, Strategy};
use crate::worker::{
    ExitKind, HealthCheck, Lifecycle, RecycleLimits, WorkerActor, WorkerArgs, WorkerHandle,
    WorkerShared,
};

/// How many recent start errors a failed pool reports.
const KEPT_ERRORS: usize = 5;

/// What the supervisor tells the pool that embeds it. Called from the supervisor's task: keep
/// each call short and never block.
pub trait PoolEvents: Send + Sync + 'static {
    /// A worker is being launched.
    fn worker_starting(&self, worker: &Arc<WorkerShared>);
    /// A worker answered its init ping and may be handed out.
    fn worker_ready(&self, handle: WorkerHandle);
    /// A worker that had been ready is gone.
    fn worker_exited(&self, worker: &Arc<WorkerShared>, kind: &ExitKind);
    /// A launch failed before the worker was ready.
    fn start_failed(&self, worker: &Arc<WorkerShared>, error: &PortError);
    /// A slot will be restarted after `delay` (counted as a restart).
    fn restarting(&self, slot: usize, delay: Duration);
    /// Restart intensity was exceeded, or a slot failed to start too many times in a row: the
    /// pool has failed for good. `reason` says which, and what the last exit was.
    fn escalated(&self, reason: String, last_errors: Vec<PortError>);
    /// No worker is running or starting, and none will be started; `last_exit` says how the
    /// last one ended.
    fn exhausted(&self, last_exit: String);
    /// `worker` must serve no new caller: its successor is ready (a replacement), or its slot
    /// was removed (the pool shrank). Retire it ([`WorkerHandle::retire`]) as soon as nobody
    /// holds it — now if it is idle, when its holder gives it back otherwise. `reason` says why
    /// (it becomes the worker's [`ExitKind::Recycled`]). Its exit is reported later, through
    /// [`PoolEvents::worker_exited`], when it has ended.
    fn worker_superseded(&self, worker: &WorkerHandle, reason: &str);
}

/// How a replacement asked for with [`SupervisorMsg::Replace`] ended.
#[derive(Debug, Clone)]
pub enum ReplaceOutcome {
    /// The successor is ready and the old worker superseded: it serves no new caller and is
    /// retired once free.
    Replaced,
    /// The worker was no longer in service in its slot (it exited, or its slot was removed):
    /// there was nothing to replace.
    Gone,
    /// The successor failed to start (or died at once); how it ended. With
    /// `give_up_on_failure` the old worker keeps serving as if nothing had been asked;
    /// otherwise the supervisor keeps trying under the restart policy.
    Failed(ExitKind),
    /// The pool has failed or is shutting down.
    Stopped,
}

/// Everything a supervisor needs to run a pool's workers.
pub struct SupervisorArgs {
    /// The pool's name (prefix of worker names).
    pub name: String,
    /// How to launch one worker.
    pub spec: WorkerSpec,
    /// Core workers.
    pub size: usize,
    /// Extra workers started under load.
    pub max_overflow: usize,
    /// Overflow workers idle this long are stopped.
    pub overflow_idle: Duration,
    /// Start the core workers at once (`true`) or on demand.
    pub eager: bool,
    /// Most launches in progress at once.
    pub startup_concurrency: usize,
    /// Restart strategy, types, intensity and backoff.
    pub policy: RestartPolicy,
    /// Health pings of idle workers.
    pub health: HealthCheck,
    /// Grace period when stopping a worker.
    pub shutdown_grace: Duration,
    /// Replace each worker after this many calls (the embedder counts calls and asks with
    /// [`SupervisorMsg::Replace`]); drawn per worker with `recycle_jitter`.
    pub max_calls: Option<u64>,
    /// Replace each worker after this long in service (its actor asks, at health ticks, when
    /// it is idle); drawn per worker with `recycle_jitter`.
    pub max_lifetime: Option<Duration>,
    /// Fraction (0 to 1) of `max_calls` and `max_lifetime` randomised away, per worker
    /// ([`RecycleLimits::jittered`]).
    pub recycle_jitter: f64,
    /// Where lifecycle events go.
    pub events: Arc<dyn PoolEvents>,
    /// The engines container workers are spread over; `None`: each worker runs where its spec
    /// says (ignored for process workers).
    pub fleet: Option<Arc<Fleet>>,
}

/// How a worker of a fleet engine ended, while the supervisor asks the engine whether it was
/// to blame ([`SupervisorMsg::Probed`]).
#[derive(Debug)]
pub enum Ending {
    /// It ran, then ended so, after so long.
    Exited(ExitKind, Duration),
    /// Its launch failed.
    LaunchFailed(PortError),
}

impl Ending {
    fn engine_lost(&self) -> bool {
        matches!(
            self,
            Ending::Exited(ExitKind::Crashed(PortError::EngineLost { .. }), _)
                | Ending::LaunchFailed(PortError::EngineLost { .. })
        )
    }

    fn is_abnormal(&self) -> bool {
        match self {
            Ending::Exited(kind, _) => kind.is_abnormal() && !kind.is_replacement(),
            Ending::LaunchFailed(_) => true,
        }
    }
}

/// Messages to the supervisor.
pub enum SupervisorMsg {
    /// Launch slot `slot` if `token` is still current (sent after a backoff).
    Start {
        /// The slot.
        slot: usize,
        /// The slot's plan token when the start was scheduled.
        token: u64,
    },
    /// A launch finished.
    Started {
        /// The slot.
        slot: usize,
        /// The slot's plan token at launch.
        token: u64,
        /// The worker's shared state.
        shared: Arc<WorkerShared>,
        /// The worker actor, or why the launch failed.
        result: Result<ActorRef<crate::worker::WorkerMsg>, PortError>,
    },
    /// Callers are waiting and no worker is idle: start lazy or overflow workers.
    Demand {
        /// How many callers wait.
        waiting: usize,
    },
    /// Periodic housekeeping (idle overflow workers).
    Tick,
    /// Replace `worker`, make before break: a successor is launched in its slot while it keeps
    /// serving, and it is superseded once the successor is ready. An overflow worker is
    /// superseded at once (demand starts new overflow workers). A request for a worker already
    /// being replaced joins that replacement.
    Replace {
        /// The worker to replace.
        worker: Arc<WorkerShared>,
        /// Why (the old worker's [`ExitKind::Recycled`] reason).
        reason: String,
        /// If the successor fails to start: give up and keep the old worker (`true`), or keep
        /// launching successors under the restart policy (`false`: intensity, backoff and
        /// `max_start_failures` apply, and the old worker serves meanwhile).
        give_up_on_failure: bool,
        /// Told how it ended.
        reply: Option<RpcReplyPort<ReplaceOutcome>>,
    },
    /// Sets the number of core slots. Growing starts new workers (eager pools) or lets demand
    /// start them (lazy ones); shrinking removes slots without a ready worker first, then
    /// those whose worker is idle, then busy ones, whose workers are retired when free.
    Resize {
        /// The new number of core slots.
        size: usize,
        /// Told once the change is made (not when workers have started or stopped).
        reply: RpcReplyPort<()>,
    },
    /// Stop every worker gracefully, then reply.
    Shutdown(RpcReplyPort<()>),
    /// Engine `engine` of the fleet changed health.
    EngineHealth {
        /// The engine's index in the fleet.
        engine: usize,
        /// Its health now.
        health: Health,
    },
    /// Engine `engine` was prepared for the pool (swept, image in place), or could not be.
    EnginePrepared {
        /// The engine's index in the fleet.
        engine: usize,
        /// What came of it.
        result: Result<(), String>,
    },
    /// Slot `slot`'s worker on engine `engine` ended abnormally and the engine has been probed.
    Probed {
        /// The slot.
        slot: usize,
        /// The slot's plan token when it ended.
        token: u64,
        /// The engine it ran on.
        engine: usize,
        /// How it ended.
        ending: Ending,
    },
    /// Engine `engine`'s launch circuit breaker has been open long enough: one launch may try
    /// it again.
    BreakerClosing {
        /// The engine.
        engine: usize,
    },
    /// The successor launched in `slot` on a fleet engine failed and the engine has been
    /// probed: handled as a failed successor unless the engine is down.
    ProbedSuccessor {
        /// The slot.
        slot: usize,
        /// The slot's plan token when it failed.
        token: u64,
        /// How it ended.
        kind: ExitKind,
    },
    /// A worker out of its slot (superseded, outgoing) on engine `engine` ended abnormally
    /// and the engine has been probed: counted toward the intensity unless the engine is down.
    ProbedFailure {
        /// The engine it ran on.
        engine: usize,
        /// The worker, for the reason if the pool fails.
        who: String,
        /// How it ended.
        kind: ExitKind,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotStatus {
    /// Never started (lazy pool, or an overflow slot not in use).
    Unstarted,
    /// Waiting for a launch permit.
    Queued,
    /// Launching.
    Starting,
    /// Ready or serving.
    Running,
    /// Waiting out a backoff before restarting.
    Backoff,
    /// Will not be started again.
    Stopped,
    /// Waiting for an engine of the fleet with room for it.
    Unplaced,
    /// Removed by a resize; may be reused by a later one.
    Removed,
}

/// A slot's worker being replaced: it serves while its successor launches.
struct Outgoing {
    worker: WorkerHandle,
    reason: String,
    give_up_on_failure: bool,
    waiters: Vec<RpcReplyPort<ReplaceOutcome>>,
}

struct Slot {
    status: SlotStatus,
    /// Changes whenever the plan for the slot changes; stale messages carry an old token.
    token: u64,
    /// Launches so far (names workers `pool-slot.launch`).
    launches: u64,
    /// Consecutive failures, for backoff.
    failures: u32,
    /// Consecutive failed launches since a worker of this slot was last ready.
    start_failures: u32,
    worker: Option<WorkerHandle>,
    /// The previous worker, serving while `worker`'s launch (its successor) is under way.
    outgoing: Option<Outgoing>,
    overflow: bool,
    /// The fleet engine its worker runs (or last ran) on.
    engine: Option<usize>,
}

impl Slot {
    fn new(overflow: bool) -> Self {
        Self {
            status: SlotStatus::Unstarted,
            token: 0,
            launches: 0,
            failures: 0,
            start_failures: 0,
            worker: None,
            outgoing: None,
            overflow,
            engine: None,
        }
    }
}

/// The supervisor's state.
pub struct SupervisorState {
    args: SupervisorArgs,
    slots: Vec<Slot>,
    actors: HashMap<ActorId, (usize, u64)>,
    /// Superseded workers, out of their slots, until they have ended.
    retiring: HashMap<ActorId, WorkerHandle>,
    queue: VecDeque<usize>,
    launching: usize,
    intensity: IntensityTracker,
    last_errors: VecDeque<PortError>,
    failed: bool,
    shutdown: Option<RpcReplyPort<()>>,
    /// The fleet's engines as this pool sees them (empty without a fleet).
    engines: Vec<EngineState>,
}

/// A fleet engine as the pool sees it.
#[derive(Debug, Default)]
struct EngineState {
    /// Up and prepared: new workers may go there.
    usable: bool,
    /// A preparation is under way.
    preparing: bool,
    /// Its health, as last reported.
    health: Option<Health>,
    /// Its first preparation has ended (or it was found down): until every engine has
    /// settled, the pool's first workers wait, so that they spread over all engines instead
    /// of crowding onto the first one ready.
    settled: bool,
    /// Launches that failed there in a row while it answered its pings.
    launch_failures: u32,
    /// Its launch circuit breaker is open: no new worker goes there until it closes.
    tripped: bool,
    /// Times the breaker opened since the engine's last successful launch (its backoff).
    trips: u32,
}

/// Launches failing in a row on an engine that answers its pings before its circuit breaker
/// opens (see [`Supervisor::engine_failed_launch`]).
const LAUNCH_TRIP: u32 = 3;

/// The supervisor actor.
#[derive(Debug, Default)]
pub struct Supervisor;

impl Supervisor {
    fn schedule(
        myself: &ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
        slot: usize,
        delay: Duration,
    ) {
        let s = &mut st.slots[slot];
        s.token += 1;
        let token = s.token;
        if delay.is_zero() {
            Self::enqueue(myself, st, slot);
        } else {
            s.status = SlotStatus::Backoff;
            myself.send_after(delay, move || SupervisorMsg::Start { slot, token });
        }
    }

    fn enqueue(myself: &ActorRef<SupervisorMsg>, st: &mut SupervisorState, slot: usize) {
        st.slots[slot].status = SlotStatus::Queued;
        st.queue.push_back(slot);
        Self::launch_queued(myself, st);
    }

    fn launch_queued(myself: &ActorRef<SupervisorMsg>, st: &mut SupervisorState) {
        while st.launching < st.args.startup_concurrency.max(1) {
            let Some(slot) = st.queue.pop_front() else {
                return;
            };
            if st.slots[slot].status != SlotStatus::Queued {
                continue;
            }
            match Self::place(st, slot) {
                placement::Choice::Engine(engine) => Self::launch(myself, st, slot, Some(engine)),
                placement::Choice::Busy => {
                    st.queue.push_front(slot);
                    return;
                }
                placement::Choice::Nowhere if st.args.fleet.is_none() => {
                    Self::launch(myself, st, slot, None)
                }
                placement::Choice::Nowhere => st.slots[slot].status = SlotStatus::Unplaced,
            }
        }
    }

    /// The engine for `slot`'s next worker (`Nowhere` without a fleet: the spec says).
    fn place(st: &SupervisorState, slot: usize) -> placement::Choice {
        let Some(fleet) = &st.args.fleet else {
            return placement::Choice::Nowhere;
        };
        if !st.engines.iter().all(|e| e.settled) {
            return placement::Choice::Nowhere;
        }
        // One pass over the slots: what each engine runs and launches for this pool.
        let mut loads: Vec<placement::Load> = (0..fleet.len())
            .map(|i| placement::Load {
                usable: st.engines[i].usable && !st.engines[i].tripped,
                capacity: fleet.engine(i).capacity,
                startup_concurrency: fleet.engine(i).startup_concurrency,
                ..placement::Load::default()
            })
            .collect();
        for s in &st.slots {
            let Some(load) = s.engine.and_then(|i| loads.get_mut(i)) else {
                continue;
            };
            match s.status {
                SlotStatus::Starting => {
                    load.workers += 1;
                    load.launching += 1;
                }
                SlotStatus::Running => load.workers += 1,
                _ => {}
            }
        }
        placement::spread(&loads, st.slots[slot].engine)
    }

    fn launch(
        myself: &ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
        slot: usize,
        engine: Option<usize>,
    ) {
        let s = &mut st.slots[slot];
        if engine.is_some() {
            s.engine = engine;
        }
        s.status = SlotStatus::Starting;
        s.launches += 1;
        let token = s.token;
        let id = format!("{}-{}.{}", st.args.name, slot, s.launches);
        let limits = RecycleLimits {
            max_calls: st.args.max_calls,
            max_lifetime: st.args.max_lifetime,
        }
        .jittered(st.args.recycle_jitter);
        let mut shared = WorkerShared::new(id.clone(), slot).with_limits(limits);
        let mut spec = st.args.spec.clone().worker_id(id);
        if let (Some(fleet), Some(i)) = (&st.args.fleet, engine) {
            let on = &fleet.engine(i).engine;
            shared = shared.with_engine(on.name());
            spec = spec.on_engine(on);
            // A worker the runtime may be cut off from ends by itself when the health pings
            // stop coming: after as many as would declare it dead, and one more.
            if let Some(interval) = st.args.health.interval {
                let missed = st.args.health.max_missed.saturating_add(1);
                spec = spec.watchdog((interval + st.args.health.timeout) * missed);
            }
        }
        let shared = Arc::new(shared);
        st.args.events.worker_starting(&shared);
        st.launching += 1;
        let args = WorkerArgs {
            spec,
            shared: shared.clone(),
            health: st.args.health,
            shutdown_grace: st.args.shutdown_grace,
            supervisor: myself.clone(),
        };
        let me = myself.clone();
        let program = st.args.spec.describe();
        tokio::spawn(async move {
            let result = match Actor::spawn_linked(None, WorkerActor, args, me.get_cell()).await {
                Ok((actor, _)) => Ok(actor),
                Err(SpawnErr::StartupFailed(e)) => Err(match e.downcast::<PortError>() {
                    Ok(e) => *e,
                    Err(e) => PortError::SpawnFailed {
                        program,
                        reason: e.to_string(),
                    },
                }),
                Err(e) => Err(PortError::SpawnFailed {
                    program,
                    reason: e.to_string(),
                }),
            };
            let _ = me.cast(SupervisorMsg::Started {
                slot,
                token,
                shared,
                result,
            });
        });
    }

    /// Handles the end of a worker (or of a failed launch) in `slot`, whose plan is still
    /// current. `ran_for` is how long it was up (zero for a failed launch).
    fn on_exit(
        myself: &ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
        slot: usize,
        kind: ExitKind,
        ran_for: Duration,
    ) {
        st.slots[slot].worker = None;
        if st.failed || st.shutdown.is_some() {
            st.slots[slot].status = SlotStatus::Stopped;
            return;
        }
        if st.slots[slot].overflow {
            // Overflow workers are not restarted (demand starts new ones), but their failures
            // count: a crash or unfit loop fed by demand must fail the pool like any other.
            st.slots[slot].status = SlotStatus::Unstarted;
            // (One lost with its engine never comes here: see `exited`.)
            Self::count_failure(
                myself,
                st,
                None,
                format!("overflow worker in slot {slot}"),
                kind,
            );
            return;
        }
        if kind.is_replacement() {
            Self::schedule(myself, st, slot, Duration::ZERO);
            return;
        }
        if matches!(kind, ExitKind::Stopped) {
            st.slots[slot].status = SlotStatus::Stopped;
            Self::check_exhausted(st, &kind);
            return;
        }
        let policy = st.args.policy;
        if !policy.restart.restarts(kind.is_abnormal()) {
            st.slots[slot].status = SlotStatus::Stopped;
            Self::check_exhausted(st, &kind);
            return;
        }
        if !st.intensity.record(Instant::now()) {
            let limit = policy.intensity;
            let reason = format!(
                "restart intensity exceeded (more than {} restarts within {:?}); last exit: \
                 worker in slot {slot} {kind}",
                limit.max_restarts, limit.within
            );
            Self::escalate(st, reason);
            return;
        }
        let s = &mut st.slots[slot];
        if ran_for >= policy.backoff.reset_after {
            s.failures = 0;
        }
        s.failures += 1;
        let delay = policy.backoff.delay(s.failures);
        let core = |i: &usize| {
            let o = &st.slots[*i];
            !o.overflow && o.status != SlotStatus::Removed
        };
        let group: Vec<usize> = match policy.strategy {
            Strategy::OneForOne => vec![slot],
            Strategy::OneForAll => (0..st.slots.len()).filter(core).collect(),
            Strategy::RestForOne => (slot..st.slots.len()).filter(core).collect(),
        };
        for &other in &group {
            let o = &mut st.slots[other];
            if other != slot {
                if o.status == SlotStatus::Stopped {
                    continue;
                }
                let outgoing = o.outgoing.take();
                if let Some(worker) = o.worker.take() {
                    worker.kill(ExitKind::Stopped);
                    st.args
                        .events
                        .worker_exited(&worker.shared, &ExitKind::Stopped);
                }
                if let Some(out) = outgoing {
                    out.worker.kill(ExitKind::Stopped);
                    st.args
                        .events
                        .worker_exited(&out.worker.shared, &ExitKind::Stopped);
                    reply_all(out.waiters, &ReplaceOutcome::Gone);
                }
            }
            st.args.events.restarting(other, delay);
            Self::schedule(myself, st, other, delay);
        }
    }

    /// Counts an abnormal exit of a worker that needs no restart of its own (an overflow
    /// worker, an outgoing or superseded one) toward the intensity, so that a crash loop still
    /// fails the pool; `who` names it in the reason. A worker lost with its engine counts for
    /// nothing (that is the engine's failure, not the worker's); on a fleet engine that still
    /// looks up, the engine is asked first, as for a slot's worker (see
    /// [`SupervisorMsg::ProbedFailure`]).
    fn count_failure(
        myself: &ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
        engine: Option<&str>,
        who: String,
        kind: ExitKind,
    ) {
        if st.failed || st.shutdown.is_some() || !kind.is_abnormal() {
            return;
        }
        if Self::lost_with_engine(st, engine, &kind) {
            return;
        }
        let fleet = st.args.fleet.clone();
        if let Some((fleet, engine)) =
            fleet.and_then(|f| engine.and_then(|n| f.index_of(n)).map(|i| (f, i)))
        {
            let me = myself.clone();
            tokio::spawn(async move {
                fleet.probe(engine).await;
                let _ = me.cast(SupervisorMsg::ProbedFailure { engine, who, kind });
            });
            return;
        }
        Self::record_failure(st, &who, &kind);
    }

    /// Records a failure toward the intensity; escalates when there are too many.
    fn record_failure(st: &mut SupervisorState, who: &str, kind: &ExitKind) {
        if st.failed || st.shutdown.is_some() {
            return;
        }
        if !st.intensity.record(Instant::now()) {
            let limit = st.args.policy.intensity;
            let reason = format!(
                "restart intensity exceeded (more than {} failures within {:?}); last exit: \
                 {who} {kind}",
                limit.max_restarts, limit.within
            );
            Self::escalate(st, reason);
        }
    }

    /// Whether a worker on the engine named `engine` that ended with `kind` was lost with its
    /// engine: its exit says so, or that engine is down (or not ready) for this pool.
    fn lost_with_engine(st: &SupervisorState, engine: Option<&str>, kind: &ExitKind) -> bool {
        let Some(fleet) = &st.args.fleet else {
            return false;
        };
        if matches!(kind, ExitKind::Crashed(PortError::EngineLost { .. })) {
            return true;
        }
        engine
            .and_then(|name| fleet.index_of(name))
            .is_some_and(|i| !st.engines[i].usable)
    }

    /// Hands `worker` over to retirement, out of its slot: it serves no new caller and is
    /// retired as soon as it is free; its exit is reported when it has ended.
    fn supersede(st: &mut SupervisorState, worker: WorkerHandle, reason: &str) {
        tracing::debug!(pool = %st.args.name, worker = %worker.shared.id, reason, "worker superseded");
        st.args.events.worker_superseded(&worker, reason);
        st.retiring.insert(worker.actor.get_id(), worker);
    }

    /// Starts replacing `worker` (make before break), or joins the replacement under way.
    fn replace(
        myself: &ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
        worker: &Arc<WorkerShared>,
        reason: String,
        give_up_on_failure: bool,
        reply: Option<RpcReplyPort<ReplaceOutcome>>,
    ) {
        let answer = |reply: Option<RpcReplyPort<ReplaceOutcome>>, outcome: ReplaceOutcome| {
            reply_all(reply.into_iter().collect(), &outcome);
        };
        if st.failed || st.shutdown.is_some() {
            return answer(reply, ReplaceOutcome::Stopped);
        }
        let is = |h: &WorkerHandle| Arc::ptr_eq(&h.shared, worker);
        let Some(s) = st.slots.get_mut(worker.slot) else {
            return answer(reply, ReplaceOutcome::Gone);
        };
        if let Some(out) = s.outgoing.as_mut().filter(|o| is(&o.worker)) {
            out.waiters.extend(reply);
            return;
        }
        if st.retiring.values().any(is) {
            return answer(reply, ReplaceOutcome::Replaced);
        }
        let Some(handle) = s
            .worker
            .take_if(|w| s.status == SlotStatus::Running && is(w))
        else {
            // Not (or no longer) in service in its slot: a later request may be made if it
            // ever is.
            worker.clear_replacement_request();
            return answer(reply, ReplaceOutcome::Gone);
        };
        worker.request_replacement();
        if s.overflow {
            // Not restarted: the slot is free for demand at once, and the worker goes when free.
            s.status = SlotStatus::Unstarted;
            s.token += 1;
            Self::supersede(st, handle, &reason);
            return answer(reply, ReplaceOutcome::Replaced);
        }
        tracing::debug!(pool = %st.args.name, worker = %worker.id, reason, "replacing a worker: its successor starts first");
        s.outgoing = Some(Outgoing {
            worker: handle,
            reason,
            give_up_on_failure,
            waiters: reply.into_iter().collect(),
        });
        Self::schedule(myself, st, worker.slot, Duration::ZERO);
    }

    /// The successor launched for `slot`'s outgoing worker failed to start (or died before it
    /// could serve): `kind` says how. Either the replacement is given up (the outgoing worker
    /// is the slot's worker again) or the launch is retried under the restart policy while the
    /// outgoing worker keeps serving — bounded by `max_start_failures` and the intensity like
    /// any restart, which fail the pool (and so end the outgoing worker too).
    fn successor_failed(
        myself: &ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
        slot: usize,
        kind: ExitKind,
        probed: bool,
    ) {
        if st.slots[slot].outgoing.is_none() {
            return;
        }
        let engine = Self::slot_engine_name(st, slot);
        if Self::lost_with_engine(st, engine.as_deref(), &kind) {
            // Not the successor's failure: it starts again at once on another engine while the
            // outgoing worker keeps serving; nothing counts against the pool.
            st.slots[slot].engine = None;
            st.args.events.restarting(slot, Duration::ZERO);
            return Self::schedule(myself, st, slot, Duration::ZERO);
        }
        if !probed {
            if let (Some(fleet), Some(engine)) = (st.args.fleet.clone(), st.slots[slot].engine) {
                // On an engine that still looks up: ask it first, as for a slot's worker.
                let (token, me) = (st.slots[slot].token, myself.clone());
                tokio::spawn(async move {
                    fleet.probe(engine).await;
                    let _ = me.cast(SupervisorMsg::ProbedSuccessor { slot, token, kind });
                });
                return;
            }
        }
        let Some(mut out) = st.slots[slot].outgoing.take() else {
            return;
        };
        reply_all(
            std::mem::take(&mut out.waiters),
            &ReplaceOutcome::Failed(kind.clone()),
        );
        if out.give_up_on_failure {
            tracing::warn!(pool = %st.args.name, worker = %out.worker.shared.id, %kind, "the replacement failed to start; the worker keeps serving");
            out.worker.shared.clear_replacement_request();
            let s = &mut st.slots[slot];
            // Its exit is this slot's business again, under the slot's current plan.
            st.actors.insert(out.worker.actor.get_id(), (slot, s.token));
            s.worker = Some(out.worker);
            s.status = SlotStatus::Running;
            s.start_failures = 0;
            return;
        }
        st.slots[slot].outgoing = Some(out);
        let policy = st.args.policy;
        let s = &mut st.slots[slot];
        s.start_failures += 1;
        if s.start_failures >= policy.max_start_failures.max(1) {
            let reason = format!(
                "the worker in slot {slot} failed to start {} times in a row",
                s.start_failures
            );
            return Self::escalate(st, reason);
        }
        if !st.intensity.record(Instant::now()) {
            let reason = format!(
                "restart intensity exceeded (more than {} restarts within {:?}); last exit: \
                 the successor of the worker in slot {slot} {kind}",
                policy.intensity.max_restarts, policy.intensity.within
            );
            return Self::escalate(st, reason);
        }
        let s = &mut st.slots[slot];
        s.failures += 1;
        let delay = policy.backoff.delay(s.failures);
        st.args.events.restarting(slot, delay);
        Self::schedule(myself, st, slot, delay);
    }

    /// Sets the number of core slots to `size`.
    fn resize(myself: &ActorRef<SupervisorMsg>, st: &mut SupervisorState, size: usize) {
        let core: Vec<usize> = (0..st.slots.len())
            .filter(|&i| !st.slots[i].overflow && st.slots[i].status != SlotStatus::Removed)
            .collect();
        if size > core.len() {
            let mut more = size - core.len();
            let removed: Vec<usize> = (0..st.slots.len())
                .filter(|&i| !st.slots[i].overflow && st.slots[i].status == SlotStatus::Removed)
                .take(more)
                .collect();
            more -= removed.len();
            let added = st.slots.len()..st.slots.len() + more;
            st.slots.extend(added.clone().map(|_| Slot::new(false)));
            for slot in removed.into_iter().chain(added) {
                let s = &mut st.slots[slot];
                s.status = SlotStatus::Unstarted;
                s.token += 1;
                s.failures = 0;
                s.start_failures = 0;
                if st.args.eager {
                    Self::enqueue(myself, st, slot);
                }
            }
        } else {
            // Cheapest first: no worker yet, then a launch under way, then an idle worker,
            // then a busy one; the newest slots first among equals.
            let cost = |s: &Slot| match (&s.worker, s.status) {
                (_, SlotStatus::Starting) => 1,
                (None, _) => 0,
                (Some(w), _) if w.shared.lifecycle() == Lifecycle::Idle => 2,
                (Some(_), _) => 3,
            };
            let mut ranked = core.clone();
            ranked.sort_by_key(|&i| (cost(&st.slots[i]), std::cmp::Reverse(i)));
            for slot in ranked.into_iter().take(core.len() - size) {
                let s = &mut st.slots[slot];
                s.token += 1;
                s.status = SlotStatus::Removed;
                let (worker, outgoing) = (s.worker.take(), s.outgoing.take());
                if let Some(worker) = worker {
                    Self::supersede(st, worker, "pool resized");
                }
                if let Some(out) = outgoing {
                    reply_all(out.waiters, &ReplaceOutcome::Gone);
                    Self::supersede(st, out.worker, "pool resized");
                }
            }
        }
        st.args.size = size;
    }

    /// A failed launch in `slot` that was not its engine's fault: counted toward the slot's
    /// start failures (and the pool fails when there are too many in a row).
    fn launch_failed(
        myself: &ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
        slot: usize,
        error: PortError,
    ) {
        if Self::engine_failed_launch(myself, st, slot, &error) {
            return;
        }
        let s = &mut st.slots[slot];
        s.start_failures += 1;
        if s.start_failures >= st.args.policy.max_start_failures.max(1) {
            tracing::error!(
                pool = %st.args.name,
                slot,
                failures = s.start_failures,
                "a worker failed to start too many times in a row"
            );
            let reason = format!(
                "the worker in slot {slot} failed to start {} times in a row",
                s.start_failures
            );
            Self::escalate(st, reason);
        } else {
            let kind = ExitKind::Crashed(error);
            Self::on_exit(myself, st, slot, kind, Duration::ZERO);
        }
    }

    /// A launch in `slot` failed on a fleet engine that answers its pings (a broken image or
    /// runtime there, a full disk): while another engine can take the slot, that is counted
    /// against the engine, not the slot or the pool — its launch circuit breaker. After
    /// [`LAUNCH_TRIP`] failures in a row the breaker opens: no new worker goes there for the
    /// health interval, doubled at each opening since the engine's last good launch (up to
    /// the health options' `max_backoff`); then one launch may try it again (half open), and
    /// one more failure opens it again. Its running workers are left alone. With no other
    /// engine to go to, the failure is the slot's as anywhere (returns `false`).
    fn engine_failed_launch(
        myself: &ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
        slot: usize,
        error: &PortError,
    ) -> bool {
        let Some(fleet) = st.args.fleet.clone() else {
            return false;
        };
        let Some(engine) = st.slots[slot].engine else {
            return false;
        };
        let elsewhere = (0..st.engines.len())
            .any(|i| i != engine && st.engines[i].usable && !st.engines[i].tripped);
        if !elsewhere || st.failed || st.shutdown.is_some() {
            return false;
        }
        let e = &mut st.engines[engine];
        e.launch_failures += 1;
        if e.launch_failures >= LAUNCH_TRIP {
            e.tripped = true;
            e.trips += 1;
            let options = fleet.options();
            let backoff = options
                .interval
                .saturating_mul(1 << e.trips.min(10))
                .min(options.max_backoff.max(options.interval));
            tracing::warn!(pool = %st.args.name, engine = %fleet.engine(engine).engine.name(), %error, ?backoff, "launches keep failing on this engine: none goes there for a while");
            myself.send_after(backoff, move || SupervisorMsg::BreakerClosing { engine });
        }
        let policy = st.args.policy;
        let s = &mut st.slots[slot];
        // Not preferred again: the next launch goes where placement says.
        s.engine = None;
        s.failures += 1;
        let delay = policy.backoff.delay(s.failures);
        st.args.events.restarting(slot, delay);
        Self::schedule(myself, st, slot, delay);
        true
    }

    /// Handles the end of `slot`'s worker (or launch), whose plan is current. On a fleet engine
    /// an abnormal end is not held against the worker before the engine has been asked: it is
    /// probed first (see [`SupervisorMsg::Probed`]).
    fn exited(
        myself: &ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
        slot: usize,
        ending: Ending,
    ) {
        let engine = st.slots[slot].engine.filter(|_| st.args.fleet.is_some());
        let Some(engine) = engine else {
            return Self::settle(myself, st, slot, ending);
        };
        if ending.engine_lost() || !st.engines[engine].usable {
            return Self::engine_lost_exit(myself, st, slot);
        }
        if !ending.is_abnormal() || st.failed || st.shutdown.is_some() {
            return Self::settle(myself, st, slot, ending);
        }
        let s = &mut st.slots[slot];
        s.worker = None;
        s.status = SlotStatus::Backoff;
        let token = s.token;
        let (fleet, me) = (st.args.fleet.clone(), myself.clone());
        tokio::spawn(async move {
            if let Some(fleet) = fleet {
                fleet.probe(engine).await;
            }
            let _ = me.cast(SupervisorMsg::Probed {
                slot,
                token,
                engine,
                ending,
            });
        });
    }

    /// Handles an end the worker (not its engine) answers for.
    fn settle(
        myself: &ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
        slot: usize,
        ending: Ending,
    ) {
        match ending {
            Ending::Exited(kind, ran_for) => Self::on_exit(myself, st, slot, kind, ran_for),
            Ending::LaunchFailed(error) => Self::launch_failed(myself, st, slot, error),
        }
    }

    /// `slot`'s worker (or launch) was lost with its engine: the slot starts again at once,
    /// elsewhere, counting nothing against the pool — unless its restart type says a worker
    /// that ended abnormally is not restarted (temporary workers).
    fn engine_lost_exit(myself: &ActorRef<SupervisorMsg>, st: &mut SupervisorState, slot: usize) {
        let lost = Self::engine_gone(st, slot);
        let restarts = st.args.policy.restart.restarts(true);
        let s = &mut st.slots[slot];
        s.worker = None;
        s.engine = None;
        if st.failed || st.shutdown.is_some() {
            s.status = SlotStatus::Stopped;
        } else if s.overflow {
            s.status = SlotStatus::Unstarted;
        } else if !restarts {
            s.status = SlotStatus::Stopped;
            let kind = ExitKind::Crashed(lost.unwrap_or(PortError::Closed));
            Self::check_exhausted(st, &kind);
        } else {
            st.args.events.restarting(slot, Duration::ZERO);
            Self::schedule(myself, st, slot, Duration::ZERO);
        }
    }

    /// The name of the engine `slot` launches on (or runs on), in a fleet.
    fn slot_engine_name(st: &SupervisorState, slot: usize) -> Option<String> {
        let fleet = st.args.fleet.as_ref()?;
        let engine = st.slots[slot].engine?;
        Some(fleet.engine(engine).engine.name().to_owned())
    }

    /// Why `slot`'s engine is not usable, if it has one and it is not.
    fn engine_gone(st: &SupervisorState, slot: usize) -> Option<PortError> {
        let fleet = st.args.fleet.as_ref()?;
        let engine = st.slots[slot].engine?;
        if st.engines[engine].usable {
            return None;
        }
        let reason = match fleet.health(engine) {
            Health::Down { reason } => reason,
            _ => "it is not ready for this pool".into(),
        };
        Some(PortError::EngineLost {
            engine: fleet.engine(engine).engine.name().to_owned(),
            reason,
        })
    }

    /// Engine `engine` is taken for lost: no new worker goes there, and every worker of the
    /// pool on it is failed at once (their calls in flight with [`PortError::EngineLost`]).
    ///
    /// Launches under way there do not wait for their own timeouts (a cut link answers
    /// nothing until the engine's request timeout): their slots start again elsewhere now, and
    /// a launch that ends later is no longer current (a worker it made is killed). Until it
    /// ends it still holds a start-up slot.
    fn engine_down(
        myself: &ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
        engine: usize,
        reason: &str,
    ) {
        let Some(fleet) = st.args.fleet.clone() else {
            return;
        };
        st.engines[engine].usable = false;
        let name = fleet.engine(engine).engine.name().to_owned();
        let error = PortError::EngineLost {
            engine: name.clone(),
            reason: reason.to_owned(),
        };
        let fail = |worker: &WorkerHandle| {
            if worker.shared.engine() != Some(name.as_str()) {
                return;
            }
            if worker.is_alive() {
                worker.kill_because(ExitKind::Crashed(error.clone()), error.clone());
            } else {
                // Killed already (unresponsive, say) and waiting for its engine to confirm
                // it: the engine is lost and never will, so the kill is final now.
                worker.port.kill(error.clone());
            }
        };
        for s in &st.slots {
            s.worker.iter().for_each(fail);
            s.outgoing.iter().for_each(|o| fail(&o.worker));
        }
        st.retiring.values().for_each(fail);
        let starting: Vec<usize> = (0..st.slots.len())
            .filter(|&i| {
                st.slots[i].status == SlotStatus::Starting && st.slots[i].engine == Some(engine)
            })
            .collect();
        for slot in starting {
            st.slots[slot].token += 1;
            if st.slots[slot].outgoing.is_some() {
                // A successor: it starts again elsewhere; the outgoing worker keeps serving.
                st.slots[slot].engine = None;
                st.args.events.restarting(slot, Duration::ZERO);
                Self::schedule(myself, st, slot, Duration::ZERO);
            } else {
                Self::engine_lost_exit(myself, st, slot);
            }
        }
    }

    /// Makes engine `engine` ready for this pool: sweeps the pool's containers left on it
    /// (from a dead runtime, or from before it was lost) and ships the pool's image to it.
    fn prepare(myself: &ActorRef<SupervisorMsg>, st: &mut SupervisorState, engine: usize) {
        let (Some(fleet), WorkerSpec::Container(spec)) = (&st.args.fleet, &st.args.spec) else {
            return;
        };
        st.engines[engine].preparing = true;
        let target = fleet.engine(engine).engine.clone();
        let (spec, me) = (spec.clone(), myself.clone());
        tokio::spawn(async move {
            let result = async {
                container::sweep(&target, Sweep::Leftovers { pool: &spec.pool }).await?;
                if !spec.instance.is_empty() {
                    let instance = Sweep::Instance {
                        instance: &spec.instance,
                    };
                    container::sweep(&target, instance).await?;
                }
                let source = container::local_engine().await?;
                let limit = Duration::from_secs(300);
                crate::fleet::ship::ensure_image(&source, &target, &spec.image, limit).await?;
                Ok::<(), crate::engine::EngineError>(())
            }
            .await
            .map_err(|e| e.to_string());
            let _ = me.cast(SupervisorMsg::EnginePrepared { engine, result });
        });
    }

    /// Engine `engine` has had its first verdict; once every engine has, the first workers go.
    fn engine_settled(myself: &ActorRef<SupervisorMsg>, st: &mut SupervisorState, engine: usize) {
        if !st.engines[engine].settled {
            st.engines[engine].settled = true;
            Self::place_unplaced(myself, st);
        }
    }

    /// Queues the slots waiting for an engine again: one may have room now.
    fn place_unplaced(myself: &ActorRef<SupervisorMsg>, st: &mut SupervisorState) {
        for slot in 0..st.slots.len() {
            if st.slots[slot].status == SlotStatus::Unplaced {
                st.slots[slot].status = SlotStatus::Queued;
                st.queue.push_back(slot);
            }
        }
        Self::launch_queued(myself, st);
    }

    fn escalate(st: &mut SupervisorState, reason: String) {
        st.failed = true;
        st.queue.clear();
        for s in &mut st.slots {
            s.token += 1;
            if let Some(worker) = s.worker.take() {
                worker.kill(ExitKind::Stopped);
                st.args
                    .events
                    .worker_exited(&worker.shared, &ExitKind::Stopped);
            }
            if let Some(out) = s.outgoing.take() {
                out.worker.kill(ExitKind::Stopped);
                st.args
                    .events
                    .worker_exited(&out.worker.shared, &ExitKind::Stopped);
                reply_all(out.waiters, &ReplaceOutcome::Stopped);
            }
            s.status = SlotStatus::Stopped;
        }
        // Their ends are reported as they come (see `handle_supervisor_evt`).
        for worker in st.retiring.values() {
            worker.kill(ExitKind::Stopped);
        }
        let errors: Vec<PortError> = st.last_errors.iter().cloned().collect();
        tracing::error!(pool = %st.args.name, reason, errors = ?errors, "pool failed");
        st.args.events.escalated(reason, errors);
    }

    fn check_exhausted(st: &mut SupervisorState, last: &ExitKind) {
        let any = st.slots.iter().any(|s| {
            (!s.overflow && !matches!(s.status, SlotStatus::Stopped | SlotStatus::Removed))
                || (s.overflow && s.status != SlotStatus::Unstarted)
        });
        if !any {
            st.args.events.exhausted(format!("the last worker {last}"));
        }
    }

    fn maybe_finish_shutdown(st: &mut SupervisorState) {
        if st.shutdown.is_none() {
            return;
        }
        let busy = st.launching > 0
            || !st.retiring.is_empty()
            || st
                .slots
                .iter()
                .any(|s| s.worker.is_some() || s.outgoing.is_some());
        if !busy {
            if let Some(reply) = st.shutdown.take() {
                let _ = reply.send(());
            }
        }
    }

    fn remember_error(st: &mut SupervisorState, error: PortError) {
        if st.last_errors.len() == KEPT_ERRORS {
            st.last_errors.pop_front();
        }
        st.last_errors.push_back(error);
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut slots: Vec<Slot> = (0..args.size).map(|_| Slot::new(false)).collect();
        slots.extend((0..args.max_overflow).map(|_| Slot::new(true)));
        let mut st = SupervisorState {
            intensity: IntensityTracker::new(args.policy.intensity),
            args,
            slots,
            actors: HashMap::new(),
            retiring: HashMap::new(),
            queue: VecDeque::new(),
            launching: 0,
            last_errors: VecDeque::new(),
            failed: false,
            shutdown: None,
            engines: Vec::new(),
        };
        if !matches!(st.args.spec, WorkerSpec::Container(_)) {
            st.args.fleet = None;
        }
        if let Some(fleet) = st.args.fleet.clone() {
            st.engines = (0..fleet.len()).map(|_| EngineState::default()).collect();
            // Health changes come in as messages.
            for engine in 0..fleet.len() {
                let mut changes = fleet.subscribe(engine);
                let me = myself.clone();
                tokio::spawn(async move {
                    loop {
                        let health = changes.borrow_and_update().clone();
                        if me
                            .cast(SupervisorMsg::EngineHealth { engine, health })
                            .is_err()
                            || changes.changed().await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        }
        if st.args.eager {
            for slot in 0..st.args.size {
                Self::enqueue(&myself, &mut st, slot);
            }
        }
        if st.args.max_overflow > 0 {
            let period = (st.args.overflow_idle / 2).max(Duration::from_millis(10));
            myself.send_interval(period, || SupervisorMsg::Tick);
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Start { slot, token } => {
                let s = &st.slots[slot];
                if s.token == token && s.status == SlotStatus::Backoff && !st.failed {
                    Self::enqueue(&myself, st, slot);
                }
            }
            SupervisorMsg::Started {
                slot,
                token,
                shared,
                result,
            } => {
                st.launching -= 1;
                let current = st.slots[slot].token == token
                    && st.slots[slot].status == SlotStatus::Starting
                    && !st.failed
                    && st.shutdown.is_none();
                match result {
                    Ok(actor) => {
                        let port = shared.port().cloned().expect("a started worker has a port");
                        let handle = WorkerHandle {
                            shared: shared.clone(),
                            port,
                            actor,
                        };
                        let lost = Self::engine_gone(st, slot);
                        if !current {
                            handle.kill(ExitKind::Stopped);
                            st.args.events.worker_exited(&shared, &ExitKind::Stopped);
                        } else if let Some(error) = lost {
                            // Its engine was lost while it launched.
                            handle.kill_because(ExitKind::Crashed(error.clone()), error.clone());
                            st.args
                                .events
                                .worker_exited(&shared, &ExitKind::Crashed(error));
                            Self::engine_lost_exit(&myself, st, slot);
                        } else if shared.lifecycle() == Lifecycle::Dead {
                            // It died before this message arrived; its termination was not ours
                            // to see yet, so handle the exit here.
                            let kind = shared.exit_kind().unwrap_or(ExitKind::Normal);
                            st.args.events.worker_exited(&shared, &kind);
                            if st.slots[slot].outgoing.is_some() {
                                Self::successor_failed(&myself, st, slot, kind, false);
                            } else {
                                let ending = Ending::Exited(kind, shared.age());
                                Self::exited(&myself, st, slot, ending);
                            }
                        } else {
                            st.actors.insert(handle.actor.get_id(), (slot, token));
                            if let Some(e) =
                                st.slots[slot].engine.and_then(|i| st.engines.get_mut(i))
                            {
                                e.launch_failures = 0;
                                e.trips = 0;
                            }
                            let s = &mut st.slots[slot];
                            s.start_failures = 0;
                            s.status = SlotStatus::Running;
                            s.worker = Some(handle.clone());
                            let outgoing = s.outgoing.take();
                            // The successor serves first; only then does the old worker stop
                            // taking callers.
                            st.args.events.worker_ready(handle);
                            if let Some(out) = outgoing {
                                Self::supersede(st, out.worker, &out.reason);
                                reply_all(out.waiters, &ReplaceOutcome::Replaced);
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(worker = %shared.id, %error, "worker failed to start");
                        st.args.events.start_failed(&shared, &error);
                        Self::remember_error(st, error.clone());
                        if current && st.slots[slot].outgoing.is_some() {
                            let kind = ExitKind::Crashed(error);
                            Self::successor_failed(&myself, st, slot, kind, false);
                        } else if current {
                            Self::exited(&myself, st, slot, Ending::LaunchFailed(error));
                        }
                    }
                }
                Self::launch_queued(&myself, st);
                Self::maybe_finish_shutdown(st);
            }
            SupervisorMsg::Demand { waiting } => {
                if st.failed || st.shutdown.is_some() {
                    return Ok(());
                }
                let coming = st.launching + st.queue.len();
                let mut want = waiting.saturating_sub(coming);
                for slot in 0..st.slots.len() {
                    if want == 0 {
                        break;
                    }
                    if st.slots[slot].status == SlotStatus::Unstarted {
                        st.slots[slot].token += 1;
                        Self::enqueue(&myself, st, slot);
                        want -= 1;
                    }
                }
            }
            SupervisorMsg::Tick => {
                let idle_limit = st.args.overflow_idle;
                for s in st.slots.iter_mut().filter(|s| s.overflow) {
                    if let Some(worker) = &s.worker {
                        if worker.shared.idle_for() >= idle_limit
                            && worker
                                .shared
                                .transition(Lifecycle::Idle, Lifecycle::Stopping)
                        {
                            worker.retire("idle overflow worker");
                        }
                    }
                }
            }
            SupervisorMsg::Replace {
                worker,
                reason,
                give_up_on_failure,
                reply,
            } => {
                Self::replace(&myself, st, &worker, reason, give_up_on_failure, reply);
            }
            SupervisorMsg::Resize { size, reply } => {
                if !st.failed && st.shutdown.is_none() {
                    Self::resize(&myself, st, size);
                }
                let _ = reply.send(());
            }
            SupervisorMsg::EngineHealth { engine, health } => {
                let Some(fleet) = st.args.fleet.clone() else {
                    return Ok(());
                };
                if st.failed || st.shutdown.is_some() {
                    return Ok(());
                }
                st.engines[engine].health = Some(health.clone());
                match health {
                    Health::Up => {
                        let e = &st.engines[engine];
                        if !e.usable && !e.preparing {
                            Self::prepare(&myself, st, engine);
                        }
                    }
                    Health::Down { reason } => {
                        Self::engine_settled(&myself, st, engine);
                        tracing::warn!(pool = %st.args.name, engine = %fleet.engine(engine).engine.name(), reason, "engine lost: its workers are failed and their slots move");
                        Self::engine_down(&myself, st, engine, &reason);
                    }
                    Health::Unknown => {}
                }
            }
            SupervisorMsg::EnginePrepared { engine, result } => {
                let Some(fleet) = st.args.fleet.clone() else {
                    return Ok(());
                };
                st.engines[engine].preparing = false;
                if st.failed || st.shutdown.is_some() {
                    return Ok(());
                }
                let name = fleet.engine(engine).engine.name().to_owned();
                match result {
                    Ok(()) if fleet.health(engine).is_up() => {
                        tracing::info!(pool = %st.args.name, engine = %name, "engine ready for the pool");
                        st.engines[engine].usable = true;
                        Self::engine_settled(&myself, st, engine);
                        Self::place_unplaced(&myself, st);
                    }
                    // It went down meanwhile: its next Up prepares it again.
                    Ok(()) => {}
                    Err(error) => {
                        Self::engine_settled(&myself, st, engine);
                        tracing::warn!(pool = %st.args.name, engine = %name, error, "cannot prepare the engine for the pool; trying again");
                        let retry = fleet.options().interval.max(Duration::from_secs(1)) * 5;
                        myself.send_after(retry, move || SupervisorMsg::EngineHealth {
                            engine,
                            health: fleet.health(engine),
                        });
                    }
                }
            }
            SupervisorMsg::Probed {
                slot,
                token,
                engine,
                ending,
            } => {
                let s = &st.slots[slot];
                if s.token != token || s.status != SlotStatus::Backoff {
                    return Ok(());
                }
                let down = st
                    .args
                    .fleet
                    .as_ref()
                    .map(|f| f.health(engine))
                    .and_then(|h| match h {
                        Health::Down { reason } => Some(reason),
                        _ => None,
                    });
                match down {
                    Some(reason) if !st.failed && st.shutdown.is_none() => {
                        if st.engines[engine].usable {
                            Self::engine_down(&myself, st, engine, &reason);
                        }
                        Self::engine_lost_exit(&myself, st, slot);
                    }
                    _ => Self::settle(&myself, st, slot, ending),
                }
                Self::maybe_finish_shutdown(st);
            }
            SupervisorMsg::BreakerClosing { engine } => {
                let e = &mut st.engines[engine];
                e.tripped = false;
                // Half open: one more failure opens it again.
                e.launch_failures = LAUNCH_TRIP - 1;
                Self::place_unplaced(&myself, st);
            }
            SupervisorMsg::ProbedSuccessor { slot, token, kind } => {
                if st.slots[slot].token != token || st.failed || st.shutdown.is_some() {
                    return Ok(());
                }
                if let (Some(fleet), Some(engine)) = (&st.args.fleet, st.slots[slot].engine) {
                    if let Health::Down { reason } = fleet.health(engine) {
                        if st.engines[engine].usable {
                            Self::engine_down(&myself, st, engine, &reason);
                        }
                    }
                }
                Self::successor_failed(&myself, st, slot, kind, true);
            }
            SupervisorMsg::ProbedFailure { engine, who, kind } => {
                let down = st.args.fleet.as_ref().and_then(|f| match f.health(engine) {
                    Health::Down { reason } => Some(reason),
                    _ => None,
                });
                match down {
                    Some(reason) => {
                        if st.engines[engine].usable && !st.failed && st.shutdown.is_none() {
                            Self::engine_down(&myself, st, engine, &reason);
                        }
                    }
                    None => Self::record_failure(st, &who, &kind),
                }
            }
            SupervisorMsg::Shutdown(reply) => {
                st.shutdown = Some(reply);
                st.queue.clear();
                let stop = |worker: &WorkerHandle| {
                    worker.shared.record_exit(ExitKind::Stopped);
                    let _ = worker.actor.cast(crate::worker::WorkerMsg::Retire);
                };
                for s in &mut st.slots {
                    s.token += 1;
                    if let Some(out) = &mut s.outgoing {
                        stop(&out.worker);
                        reply_all(std::mem::take(&mut out.waiters), &ReplaceOutcome::Stopped);
                    }
                    if let Some(worker) = &s.worker {
                        stop(worker);
                    } else if s.status != SlotStatus::Starting {
                        s.status = SlotStatus::Stopped;
                    }
                }
                st.retiring.values().for_each(stop);
                Self::maybe_finish_shutdown(st);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, panic) = match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        let Some((slot, token)) = st.actors.remove(&id) else {
            return Ok(());
        };
        let ended = |worker: &WorkerHandle| {
            if let Some(reason) = &panic {
                worker
                    .shared
                    .record_exit(ExitKind::Crashed(PortError::ProtocolViolation {
                        reason: format!("worker actor failed: {reason}"),
                    }));
            }
            worker.shared.set_lifecycle(Lifecycle::Dead);
            worker.port.kill(PortError::Closed);
            worker.shared.exit_kind().unwrap_or(ExitKind::Normal)
        };
        if let Some(worker) = st.retiring.remove(&id) {
            // A superseded worker has ended (retired, or dead on its way out).
            let kind = ended(&worker);
            st.args.events.worker_exited(&worker.shared, &kind);
            Self::count_failure(
                &myself,
                st,
                worker.shared.engine(),
                format!("superseded worker {}", worker.shared.id),
                kind,
            );
            Self::maybe_finish_shutdown(st);
            return Ok(());
        }
        let s = &mut st.slots[slot];
        if let Some(out) = s.outgoing.take_if(|o| o.worker.actor.get_id() == id) {
            // It ended while its successor was launching: nothing to restart, the successor is
            // on its way.
            let kind = ended(&out.worker);
            st.args.events.worker_exited(&out.worker.shared, &kind);
            reply_all(out.waiters, &ReplaceOutcome::Gone);
            Self::count_failure(
                &myself,
                st,
                out.worker.shared.engine(),
                format!("outgoing worker {}", out.worker.shared.id),
                kind,
            );
            Self::maybe_finish_shutdown(st);
            return Ok(());
        }
        let Some(worker) = s.worker.clone().filter(|w| w.actor.get_id() == id) else {
            // A worker we already replaced (killed by a strategy or by escalation).
            return Ok(());
        };
        let kind = ended(&worker);
        st.args.events.worker_exited(&worker.shared, &kind);
        if st.slots[slot].token == token {
            let ending = Ending::Exited(kind, worker.shared.age());
            Self::exited(&myself, st, slot, ending);
        } else {
            st.slots[slot].worker = None;
        }
        Self::maybe_finish_shutdown(st);
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        for s in &mut st.slots {
            if let Some(worker) = s.worker.take() {
                worker.kill(ExitKind::Stopped);
            }
            if let Some(out) = s.outgoing.take() {
                out.worker.kill(ExitKind::Stopped);
            }
        }
        for (_, worker) in st.retiring.drain() {
            worker.kill(ExitKind::Stopped);
        }
        Ok(())
    }
}

/// Answers every waiter of a replacement.
fn reply_all(waiters: Vec<RpcReplyPort<ReplaceOutcome>>, outcome: &ReplaceOutcome) {
    for waiter in waiters {
        let _ = waiter.send(outcome.clone());
    }
}
