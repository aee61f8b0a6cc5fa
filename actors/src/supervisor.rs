//! The supervisor actor: starts a pool's workers, restarts them under the restart policy, and
//! escalates when restarts come too fast.
//!
//! It is on the lifecycle path only. It never awaits a spawn or a handshake in its message
//! handler: each start runs in its own task (the worker actor's `pre_start` does the launch and
//! init ping), which reports back with a `Started` message. Restarts after a backoff are timer
//! messages. Whoever embeds the supervisor learns of ready and exited workers through
//! [`PoolEvents`]; the supervisor itself knows nothing of checkout.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent,
};

use crate::port::{PortError, WorkerSpec};
use crate::restart::{IntensityTracker, RestartPolicy, Strategy};
use crate::worker::{
    ExitKind, HealthCheck, Lifecycle, WorkerActor, WorkerArgs, WorkerHandle, WorkerShared,
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
    /// Idle workers up longer than this are retired (checked at health ticks).
    pub max_lifetime: Option<Duration>,
    /// Where lifecycle events go.
    pub events: Arc<dyn PoolEvents>,
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
    /// Stop every worker gracefully, then reply.
    Shutdown(RpcReplyPort<()>),
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
    overflow: bool,
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
            overflow,
        }
    }
}

/// The supervisor's state.
pub struct SupervisorState {
    args: SupervisorArgs,
    slots: Vec<Slot>,
    actors: HashMap<ActorId, (usize, u64)>,
    queue: VecDeque<usize>,
    launching: usize,
    intensity: IntensityTracker,
    last_errors: VecDeque<PortError>,
    failed: bool,
    shutdown: Option<RpcReplyPort<()>>,
}

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
            Self::launch(myself, st, slot);
        }
    }

    fn launch(myself: &ActorRef<SupervisorMsg>, st: &mut SupervisorState, slot: usize) {
        let s = &mut st.slots[slot];
        s.status = SlotStatus::Starting;
        s.launches += 1;
        let token = s.token;
        let id = format!("{}-{}.{}", st.args.name, slot, s.launches);
        let shared = Arc::new(WorkerShared::new(id.clone(), slot));
        st.args.events.worker_starting(&shared);
        st.launching += 1;
        let args = WorkerArgs {
            spec: st.args.spec.clone().worker_id(id),
            shared: shared.clone(),
            health: st.args.health,
            shutdown_grace: st.args.shutdown_grace,
            max_lifetime: st.args.max_lifetime,
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
            if kind.is_abnormal() && !st.intensity.record(Instant::now()) {
                let limit = st.args.policy.intensity;
                let reason = format!(
                    "restart intensity exceeded (more than {} failures within {:?}); last exit: \
                     overflow worker in slot {slot} {kind}",
                    limit.max_restarts, limit.within
                );
                Self::escalate(st, reason);
            }
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
        let group: Vec<usize> = match policy.strategy {
            Strategy::OneForOne => vec![slot],
            Strategy::OneForAll => (0..st.args.size).collect(),
            Strategy::RestForOne => (slot..st.args.size).collect(),
        };
        for &other in &group {
            let o = &mut st.slots[other];
            if other != slot {
                if o.status == SlotStatus::Stopped {
                    continue;
                }
                if let Some(worker) = o.worker.take() {
                    worker.kill(ExitKind::Stopped);
                    st.args
                        .events
                        .worker_exited(&worker.shared, &ExitKind::Stopped);
                }
            }
            st.args.events.restarting(other, delay);
            Self::schedule(myself, st, other, delay);
        }
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
            s.status = SlotStatus::Stopped;
        }
        let errors: Vec<PortError> = st.last_errors.iter().cloned().collect();
        tracing::error!(pool = %st.args.name, reason, errors = ?errors, "pool failed");
        st.args.events.escalated(reason, errors);
    }

    fn check_exhausted(st: &mut SupervisorState, last: &ExitKind) {
        let any = st.slots.iter().any(|s| {
            (!s.overflow && s.status != SlotStatus::Stopped)
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
        let busy = st.launching > 0 || st.slots.iter().any(|s| s.worker.is_some());
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
            queue: VecDeque::new(),
            launching: 0,
            last_errors: VecDeque::new(),
            failed: false,
            shutdown: None,
        };
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
                        if !current {
                            handle.kill(ExitKind::Stopped);
                            st.args.events.worker_exited(&shared, &ExitKind::Stopped);
                        } else if shared.lifecycle() == Lifecycle::Dead {
                            // It died before this message arrived; its termination was not ours
                            // to see yet, so handle the exit here.
                            let kind = shared.exit_kind().unwrap_or(ExitKind::Normal);
                            st.args.events.worker_exited(&shared, &kind);
                            Self::on_exit(&myself, st, slot, kind, shared.age());
                        } else {
                            st.actors.insert(handle.actor.get_id(), (slot, token));
                            st.slots[slot].start_failures = 0;
                            st.slots[slot].status = SlotStatus::Running;
                            st.slots[slot].worker = Some(handle.clone());
                            st.args.events.worker_ready(handle);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(worker = %shared.id, %error, "worker failed to start");
                        st.args.events.start_failed(&shared, &error);
                        Self::remember_error(st, error.clone());
                        if current {
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
                                Self::on_exit(&myself, st, slot, kind, Duration::ZERO);
                            }
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
            SupervisorMsg::Shutdown(reply) => {
                st.shutdown = Some(reply);
                st.queue.clear();
                for s in &mut st.slots {
                    s.token += 1;
                    if let Some(worker) = &s.worker {
                        worker.shared.record_exit(ExitKind::Stopped);
                        let _ = worker.actor.cast(crate::worker::WorkerMsg::Retire);
                    } else if s.status != SlotStatus::Starting {
                        s.status = SlotStatus::Stopped;
                    }
                }
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
        let Some((slot, token)) = st.actors.remove(&cell.get_id()) else {
            return Ok(());
        };
        let Some(worker) = st.slots[slot]
            .worker
            .clone()
            .filter(|w| w.actor.get_id() == cell.get_id())
        else {
            // A worker we already replaced (killed by a strategy or by escalation).
            return Ok(());
        };
        if let Some(reason) = panic {
            worker
                .shared
                .record_exit(ExitKind::Crashed(PortError::ProtocolViolation {
                    reason: format!("worker actor failed: {reason}"),
                }));
        }
        worker.shared.set_lifecycle(Lifecycle::Dead);
        worker.port.kill(PortError::Closed);
        let kind = worker.shared.exit_kind().unwrap_or(ExitKind::Normal);
        st.args.events.worker_exited(&worker.shared, &kind);
        if st.slots[slot].token == token {
            Self::on_exit(&myself, st, slot, kind, worker.shared.age());
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
        }
        Ok(())
    }
}
