//! The pool: checkout without a central actor, and the pool's side of worker lifecycle.
//!
//! Ready workers wait in a shared idle stack guarded by a fair (FIFO) semaphore whose permits
//! equal the workers in the stack. A caller takes a permit, pops a worker and owns it through a
//! [`Lease`] until the lease drops; no actor is asked which worker it may have. The supervisor
//! only adds workers (when ready) and learns of their deaths; a dead worker left in the stack is
//! discarded by the next caller that pops it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore, TryAcquireError};
use wharf_actors::fleet::{Fleet, Health};
use wharf_actors::port::container::{self, Sweep};
use wharf_actors::port::{PortError, WorkerSpec};
use wharf_actors::supervisor::{
    PoolEvents, ReplaceOutcome, Supervisor, SupervisorArgs, SupervisorMsg,
};
use wharf_actors::worker::{ExitKind, Lifecycle, WorkerHandle, WorkerShared};
use wharf_protocol::Value;

use crate::call::{decode, CallOptions, CallStream, Holder};
use crate::config::{PoolBuilder, PoolConfig};
use crate::error::{Error, PoolState, Result};
use crate::events::{EventSender, PoolEvent};
use crate::lease::Lease;
use crate::session::Session;
use crate::stats::PoolStats;
use crate::telemetry::Telemetry;

/// Where the pool is in its life.
#[derive(Debug, Clone)]
pub(crate) enum Status {
    Running,
    Failed {
        reason: String,
        errors: Vec<PortError>,
    },
    NoWorkers(String),
    ShutDown,
}

/// Counters behind [`PoolStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Calls under way now (a stream until its end or until it is dropped).
    pub active: AtomicUsize,
    pub calls: AtomicU64,
    pub ok: AtomicU64,
    pub restarts: AtomicU64,
    pub replacements: AtomicU64,
    pub retries: AtomicU64,
    pub start_failures: AtomicU64,
    pub checkouts: AtomicU64,
    pub checkout_wait_ns: AtomicU64,
    pub errors: Mutex<BTreeMap<&'static str, u64>>,
}

/// The pool's shared core. Leases and sessions hold it; the supervisor reaches it weakly.
pub(crate) struct Inner {
    pub config: PoolConfig,
    /// Core workers now: `config.size` until [`Pool::resize`] changes it.
    size: AtomicUsize,
    idle: Mutex<Vec<WorkerHandle>>,
    permits: Semaphore,
    waiting: AtomicUsize,
    workers: Mutex<HashMap<String, Arc<WorkerShared>>>,
    status: Mutex<Status>,
    /// `status` is `Running`: read without the lock on every checkout and checkin.
    running: AtomicBool,
    pub counters: Counters,
    supervisor: OnceLock<ActorRef<SupervisorMsg>>,
    /// Taken while a resize is sent, so the supervisor and `size` see resizes in one order.
    resizing: Mutex<()>,
    pub sessions: Mutex<HashSet<String>>,
    /// Workers finishing an abandoned call before they can be handed out again.
    draining: Mutex<HashSet<String>>,
    /// Woken when a worker becomes ready and when the pool's status changes (not on every
    /// checkin: that is the hot path; waiters poll as well).
    changed: Notify,
    /// Lifecycle events, for whoever subscribed.
    pub events: EventSender,
    /// Metrics, with the `metrics` feature.
    pub telemetry: Telemetry,
    /// The workers' resident memory at the last sample, in bytes.
    rss_total: AtomicU64,
    /// How each slot's last worker ended (an exit's label, or `start_failed`): the cause of
    /// the slot's next restart, for the metrics.
    last_exit: Mutex<HashMap<usize, &'static str>>,
    /// The engines the pool spreads over, and their health (see `docs/scale-out.md`).
    fleet: Option<Arc<Fleet>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Core workers now.
    /// See [`Pool::home_engine`].
    pub(crate) fn home_engine(&self, session: &str) -> Option<String> {
        let fleet = self.fleet.as_ref()?;
        let up = |i: usize| !matches!(fleet.health(i), Health::Down { .. });
        let home = wharf_actors::fleet::placement::home(session, fleet.len(), up)?;
        Some(fleet.engine(home).engine.name().to_owned())
    }

    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    fn status_error(&self) -> Option<Error> {
        if self.running.load(Ordering::Acquire) {
            return None;
        }
        match &*lock(&self.status) {
            Status::Running => None,
            Status::Failed { reason, errors } => Some(Error::PoolFailed {
                pool: self.config.name.clone(),
                reason: reason.clone(),
                last_errors: errors.clone(),
            }),
            Status::NoWorkers(last_exit) => Some(Error::NoWorkers {
                pool: self.config.name.clone(),
                last_exit: last_exit.clone(),
            }),
            Status::ShutDown => Some(Error::ShutDown(self.config.name.clone())),
        }
    }

    /// Leaves `Running` for `status`, once: later changes are ignored (the first cause wins),
    /// and so is the event telling subscribers.
    fn set_status(&self, status: Status) {
        let pool = self.config.name.clone();
        let event = match &status {
            Status::Failed { reason, .. } => Some(PoolEvent::PoolFailed {
                pool,
                reason: reason.clone(),
            }),
            Status::NoWorkers(last_exit) => Some(PoolEvent::NoWorkers {
                pool,
                last_exit: last_exit.clone(),
            }),
            Status::Running | Status::ShutDown => None,
        };
        {
            let mut current = lock(&self.status);
            if !matches!(*current, Status::Running) {
                return;
            }
            *current = status;
            self.running.store(false, Ordering::Release);
        }
        if let Some(event) = event {
            self.events.emit(|| event);
        }
        self.publish_gauges();
        // Closing the semaphore wakes every waiting caller, who then reads the status.
        self.permits.close();
        self.changed.notify_waiters();
    }

    /// The error for a pool whose supervisor stopped answering: its status if it has one
    /// already (it is set before the supervisor stops on purpose).
    fn supervisor_gone(&self) -> Error {
        self.status_error().unwrap_or_else(|| Error::PoolFailed {
            pool: self.config.name.clone(),
            reason: "the supervisor stopped unexpectedly".into(),
            last_errors: Vec::new(),
        })
    }

    pub fn is_failed(&self) -> bool {
        matches!(*lock(&self.status), Status::Failed { .. })
    }

    /// Publishes the pool's gauges (the `metrics` feature): from the sampler, and at once when
    /// the status changes and at the end of a shutdown, so a pool dropped right after never
    /// stays `running` in the metrics.
    pub fn publish_gauges(&self) {
        if Telemetry::ENABLED {
            let sessions = lock(&self.sessions).len();
            let rss = self.rss_total.load(Ordering::Relaxed);
            self.telemetry
                .gauges(&self.state(), sessions, rss, self.status_label());
        }
    }

    /// The pool's status, as a label: `running`, `failed`, `no_workers` or `shut_down`.
    pub fn status_label(&self) -> &'static str {
        match *lock(&self.status) {
            Status::Running => "running",
            Status::Failed { .. } => "failed",
            Status::NoWorkers(_) => "no_workers",
            Status::ShutDown => "shut_down",
        }
    }

    pub fn state(&self) -> PoolState {
        let workers = lock(&self.workers);
        let mut state = PoolState {
            size: self.size(),
            workers: workers.len(),
            waiting: self.waiting.load(Ordering::Relaxed),
            ..PoolState::default()
        };
        for w in workers.values() {
            match w.lifecycle() {
                Lifecycle::Starting => state.starting += 1,
                Lifecycle::Idle => state.idle += 1,
                Lifecycle::Held => state.busy += 1,
                Lifecycle::Stopping | Lifecycle::Dead => {}
            }
        }
        state
    }

    /// A worker's state as the pool sees it.
    fn worker_state(&self, w: &WorkerShared) -> WorkerState {
        match w.lifecycle() {
            Lifecycle::Starting => WorkerState::Starting,
            Lifecycle::Idle => WorkerState::Idle,
            Lifecycle::Held if lock(&self.draining).contains(&w.id) => WorkerState::Draining,
            Lifecycle::Held => WorkerState::Busy,
            Lifecycle::Stopping => WorkerState::Stopping,
            Lifecycle::Dead => WorkerState::Dead,
        }
    }

    pub fn worker_states(&self) -> Vec<(String, WorkerState)> {
        let workers: Vec<_> = lock(&self.workers).values().cloned().collect();
        let mut v: Vec<_> = workers
            .iter()
            .map(|w| (w.id.clone(), self.worker_state(w)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn record_error(&self, e: &Error) {
        *lock(&self.counters.errors).entry(e.kind()).or_default() += 1;
    }

    /// Counts a call's outcome; `took` is how long it ran.
    pub fn account<T>(&self, method: &str, result: &Result<T>, took: Duration) {
        let outcome = match result {
            Ok(_) => {
                self.counters.ok.fetch_add(1, Ordering::Relaxed);
                "ok"
            }
            Err(e) => {
                self.record_error(e);
                e.kind()
            }
        };
        self.telemetry.call(method, outcome, took);
    }

    /// Takes a ready worker for exclusive use, waiting up to `timeout`.
    /// `timeout` of `None`: do not wait at all ([`Pool::try_checkout`]).
    pub async fn checkout(self: &Arc<Self>, timeout: Option<Duration>) -> Result<Lease> {
        self.checkout_as(timeout, Hold::Exclusive).await
    }

    /// Takes a ready worker, waiting up to `timeout`: exclusively (a lease, a session), or one
    /// of its call slots (a pool's call) if it serves several calls at once.
    ///
    /// The idle stack holds one entry, and the semaphore one permit, per free call slot: one
    /// per idle worker that serves one call at a time (today's path, unchanged), and up to
    /// `max_concurrency` for a worker that serves more. A shared hold takes one slot; an
    /// exclusive hold of such a worker gathers all of its slots: it takes those still in the
    /// stack and waits for the others (calls in flight, callers between permit and pop) to
    /// come back to it.
    pub(crate) async fn checkout_as(
        self: &Arc<Self>,
        timeout: Option<Duration>,
        hold: Hold,
    ) -> Result<Lease> {
        self.checkout_preferring(timeout, hold, None).await
    }

    /// [`Inner::checkout_as`], taking a free worker on engine `prefer` if there is one (any
    /// free worker otherwise: a preference never makes a caller wait).
    pub(crate) async fn checkout_preferring(
        self: &Arc<Self>,
        timeout: Option<Duration>,
        hold: Hold,
        prefer: Option<&str>,
    ) -> Result<Lease> {
        // The clock is read only if the caller has to wait: the fast path is a few atomics and
        // one short lock.
        let mut started: Option<Instant> = None;
        loop {
            if let Some(e) = self.status_error() {
                return Err(e);
            }
            let permit = match self.permits.try_acquire() {
                Ok(permit) => permit,
                Err(TryAcquireError::Closed) => continue,
                Err(TryAcquireError::NoPermits) => {
                    let overloaded = || {
                        let e = Error::Overloaded {
                            pool: self.config.name.clone(),
                            state: self.state(),
                        };
                        self.record_error(&e);
                        e
                    };
                    let Some(timeout) = timeout else {
                        self.demand();
                        return Err(overloaded());
                    };
                    let since = *started.get_or_insert_with(Instant::now);
                    // Shed load rather than queue callers who would all time out together.
                    let Some(_waiting) = WaitGuard::enter(&self.waiting, self.config.max_waiting)
                    else {
                        return Err(overloaded());
                    };
                    self.demand();
                    // A timeout too large to add to the clock means no limit.
                    let deadline = since
                        .checked_add(timeout)
                        .map(tokio::time::Instant::from_std);
                    match until(deadline, self.permits.acquire()).await {
                        Ok(Ok(permit)) => permit,
                        Ok(Err(_closed)) => continue,
                        Err(_) => {
                            let e = Error::CheckoutTimeout {
                                waited: since.elapsed(),
                                state: self.state(),
                            };
                            self.record_error(&e);
                            return Err(e);
                        }
                    }
                }
            };
            permit.forget();
            let popped = {
                let mut idle = lock(&self.idle);
                let at = prefer.and_then(|engine| {
                    idle.iter().rposition(|h| h.shared.engine() == Some(engine))
                });
                match at {
                    Some(at) => Some(idle.remove(at)),
                    None => idle.pop(),
                }
            };
            let Some(handle) = popped else {
                continue;
            };
            if handle.max_concurrency() > 1 {
                let gathered = match self.take_slot(&handle, hold) {
                    Taken::Shared => {
                        let waited = self.count_checkout(started);
                        return Ok(Lease::shared(self.clone(), handle, waited));
                    }
                    Taken::No => continue,
                    Taken::Reserved(gathered) => gathered,
                };
                let mut reservation = Reservation {
                    pool: self,
                    handle: Some(handle),
                };
                if let Some(gathered) = gathered {
                    // Calls still in flight on it: wait for them, within the caller's budget.
                    let budget = match timeout {
                        None => None,
                        Some(timeout) => {
                            let since = *started.get_or_insert_with(Instant::now);
                            Some(
                                since
                                    .checked_add(timeout)
                                    .map(tokio::time::Instant::from_std),
                            )
                        }
                    };
                    let Some(deadline) = budget else {
                        drop(reservation);
                        self.demand();
                        let e = Error::Overloaded {
                            pool: self.config.name.clone(),
                            state: self.state(),
                        };
                        self.record_error(&e);
                        return Err(e);
                    };
                    if until(deadline, gathered).await.is_err() {
                        drop(reservation);
                        let e = Error::CheckoutTimeout {
                            waited: started.map_or(Duration::ZERO, |t| t.elapsed()),
                            state: self.state(),
                        };
                        self.record_error(&e);
                        return Err(e);
                    }
                }
                let handle = reservation.handle.take().expect("the reservation holds it");
                if !handle.is_alive() {
                    continue;
                }
                let waited = self.count_checkout(started);
                return Ok(Lease::new(self.clone(), handle, waited));
            }
            if handle.port.is_open() && handle.shared.try_hold() {
                if let Some(reason) = handle.shared.superseded() {
                    // Its successor is ready: it was popped just before it could be retired.
                    handle.retire(reason);
                    continue;
                }
                let waited = self.count_checkout(started);
                return Ok(Lease::new(self.clone(), handle, waited));
            }
            // A worker that died or is being retired while idle: drop it and look again.
        }
    }

    /// Counts a checkout; returns how long its caller waited.
    fn count_checkout(&self, started: Option<Instant>) -> Duration {
        let waited = started.map_or(Duration::ZERO, |t| t.elapsed());
        self.counters.checkouts.fetch_add(1, Ordering::Relaxed);
        self.telemetry.checkout(waited);
        if !waited.is_zero() {
            self.counters
                .checkout_wait_ns
                .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        }
        waited
    }

    /// Takes the slot just popped of a worker that serves several calls at once.
    fn take_slot(&self, handle: &WorkerHandle, hold: Hold) -> Taken {
        let n = handle.max_concurrency();
        let mut shares = handle.shared.shares();
        if shares.reserved {
            // An exclusive holder is gathering this worker's slots: this one is its.
            gather(&mut shares, n);
            return Taken::No;
        }
        if !handle.port.is_open() || handle.shared.superseded().is_some() {
            // Dead, or superseded (its successor is ready): this slot serves no one; the last
            // call out retires it (`slot_back`).
            return Taken::No;
        }
        // The first slot taken holds the worker (`Idle → Held`): a worker being retired or
        // dead while idle fails here, and its slot is dropped.
        if shares.calls == 0 && !handle.shared.try_hold() {
            return Taken::No;
        }
        if hold == Hold::Shared {
            shares.calls += 1;
            return Taken::Shared;
        }
        shares.reserved = true;
        shares.gathered = 1;
        drop(shares);
        // Its other slots still in the stack are the reservation's now (each with its permit;
        // one whose permit a caller already took comes back through that caller).
        let mut taken = 0;
        {
            let mut idle = lock(&self.idle);
            while let Some(pos) = idle
                .iter()
                .position(|h| Arc::ptr_eq(&h.shared, &handle.shared))
            {
                let Ok(permit) = self.permits.try_acquire() else {
                    break;
                };
                permit.forget();
                idle.remove(pos);
                taken += 1;
            }
        }
        let mut shares = handle.shared.shares();
        shares.gathered += taken;
        if shares.gathered >= n {
            return Taken::Reserved(None);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        shares.waiter = Some(tx);
        Taken::Reserved(Some(rx))
    }

    /// Gives back one slot of a worker serving several calls at once, after a shared call. A
    /// call abandoned mid-flight (`call` still in flight) gives it back only once its reply
    /// has come (the protocol's `cancel` was sent when it was dropped).
    pub(crate) fn return_slot(self: &Arc<Self>, handle: WorkerHandle, call: Option<u64>) {
        match call.filter(|&id| handle.port.is_in_flight(id)) {
            Some(id) => self.drain(handle, Some(id)),
            None => self.slot_back(handle),
        }
    }

    fn slot_back(self: &Arc<Self>, handle: WorkerHandle) {
        let n = handle.max_concurrency();
        let mut shares = handle.shared.shares();
        shares.calls = shares.calls.saturating_sub(1);
        if shares.reserved {
            gather(&mut shares, n);
            return;
        }
        if !handle.is_alive()
            || matches!(
                handle.shared.lifecycle(),
                Lifecycle::Stopping | Lifecycle::Dead
            )
        {
            return;
        }
        if let Some(reason) = handle.shared.superseded() {
            // Its successor is ready: the slot goes; the last call out retires it.
            if shares.calls == 0 {
                drop(shares);
                handle.retire(reason);
            }
            return;
        }
        if let Some(reason) = self.recycle_reason(&handle) {
            // The slot goes; the last call out retires the worker.
            if shares.calls == 0 {
                drop(shares);
                tracing::debug!(worker = %handle.shared.id, reason, "recycling worker");
                handle.retire(reason);
            }
            return;
        }
        if shares.calls == 0 {
            handle.shared.touch();
            handle.shared.unhold();
        }
        drop(shares);
        if self.running.load(Ordering::Acquire) {
            lock(&self.idle).push(handle);
            self.permits.add_permits(1);
        }
    }

    /// An exclusive holder that gave up gathering: the slots it gathered go back.
    fn unreserve(&self, handle: WorkerHandle) {
        let gathered = {
            let mut shares = handle.shared.shares();
            shares.reserved = false;
            shares.waiter = None;
            let gathered = std::mem::take(&mut shares.gathered);
            if shares.calls == 0 {
                handle.shared.unhold();
            }
            gathered
        };
        if gathered > 0 && handle.is_alive() && self.running.load(Ordering::Acquire) {
            lock(&self.idle).extend(std::iter::repeat_n(handle, gathered));
            self.permits.add_permits(gathered);
        }
    }

    /// Fails the pool for good: callers get [`Error::PoolFailed`] with `reason` from now on,
    /// and idle workers are killed.
    fn fail(&self, reason: String, errors: Vec<PortError>) {
        self.set_status(Status::Failed { reason, errors });
        for h in lock(&self.idle).drain(..) {
            h.kill(ExitKind::Stopped);
        }
    }

    /// Drops a dead worker from the idle stack (every entry of it: one per free call slot),
    /// with their permits, so its port (and fds) go now rather than when a caller happens to
    /// pop it. If a permit is already taken, the caller holding it discards the worker instead.
    fn forget_idle(&self, id: &str) {
        let mut idle = lock(&self.idle);
        // A worker serving several calls at once has an entry per free slot.
        while let Some(pos) = idle.iter().position(|h| h.shared.id == id) {
            let Ok(permit) = self.permits.try_acquire() else {
                break;
            };
            permit.forget();
            idle.remove(pos);
        }
    }

    /// Asks the supervisor for more workers if the pool may grow (lazy or overflow workers).
    fn demand(&self) {
        // Workers on their way out (superseded, stopping) will not serve: they do not count.
        let running = lock(&self.workers)
            .values()
            .filter(|w| {
                w.superseded().is_none()
                    && !matches!(w.lifecycle(), Lifecycle::Stopping | Lifecycle::Dead)
            })
            .count();
        if running < self.size() + self.config.max_overflow {
            if let Some(sup) = self.supervisor.get() {
                let waiting = self.waiting.load(Ordering::Relaxed);
                let _ = sup.cast(SupervisorMsg::Demand { waiting });
            }
        }
    }

    /// Returns a worker after use: back to the idle stack, or drained, or retired.
    pub fn checkin(self: &Arc<Self>, handle: WorkerHandle) {
        if !handle.is_alive() {
            return;
        }
        if matches!(
            handle.shared.lifecycle(),
            Lifecycle::Stopping | Lifecycle::Dead
        ) {
            return;
        }
        if handle.port.in_flight() > 0 {
            // The caller gave up mid-call: the worker is dirty until its reply has come.
            lock(&self.draining).insert(handle.shared.id.clone());
            self.drain(handle, None);
            return;
        }
        self.release(handle);
    }

    /// Waits, in a task and up to the drain timeout, for an abandoned call to finish: the call
    /// `call` of a shared slot, which then goes back ([`Inner::slot_back`]), or every request
    /// of a worker held whole, which then goes back ([`Inner::release`]). A worker whose call
    /// does not finish in time is killed.
    fn drain(self: &Arc<Self>, handle: WorkerHandle, call: Option<u64>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            handle.kill(ExitKind::Recycled(
                "abandoned call, no runtime to drain it".into(),
            ));
            return;
        };
        let pool = self.clone();
        let limit = self.config.drain_timeout;
        rt.spawn(async move {
            let settled = match call {
                Some(id) => tokio::time::timeout(limit, handle.port.settle(id)).await,
                None => tokio::time::timeout(limit, handle.port.quiesce()).await,
            };
            if call.is_none() {
                lock(&pool.draining).remove(&handle.shared.id);
            }
            match (settled, call) {
                (Ok(()), Some(_)) => pool.slot_back(handle),
                (Ok(()), None) => pool.release(handle),
                (Err(_), _) => {
                    handle.kill(ExitKind::Recycled("abandoned call did not finish".into()))
                }
            }
        });
    }

    /// Puts a clean worker back, unless it has been superseded (its successor is ready: it is
    /// retired). A worker over a recycling limit is replaced make before break: its
    /// replacement is asked for, and it keeps serving until the replacement is ready — from
    /// the bottom of the idle stack, so it is handed out only when no other worker is free.
    fn release(self: &Arc<Self>, handle: WorkerHandle) {
        if !handle.is_alive() {
            return;
        }
        let over = self.recycle_reason(&handle);
        if let Some(reason) = over {
            self.request_replacement(&handle.shared, reason);
        }
        handle.shared.touch();
        if handle.max_concurrency() > 1 {
            // Every slot is back: calls may share it again.
            let mut shares = handle.shared.shares();
            shares.reserved = false;
            shares.gathered = 0;
            shares.waiter = None;
        }
        let mut idle = lock(&self.idle);
        // Under the stack's lock, like `worker_superseded`: either it sees this worker in the
        // stack, or this sees the mark.
        if let Some(reason) = handle.shared.superseded() {
            drop(idle);
            tracing::debug!(worker = %handle.shared.id, reason, "retiring a superseded worker");
            handle.retire(reason);
            return;
        }
        handle.shared.unhold();
        if self.running.load(Ordering::Acquire) {
            // A worker over a limit serves from the bottom of the stack until its successor
            // is ready; one entry per call slot.
            let slots = handle.max_concurrency();
            let at = if over.is_some() { 0 } else { idle.len() };
            for _ in 1..slots {
                idle.insert(at, handle.clone());
            }
            idle.insert(at, handle);
            drop(idle);
            self.permits.add_permits(slots);
        }
    }

    /// The recycling limit `handle` has reached, if any: its own `max_calls` and
    /// `max_lifetime` (jittered), or the pool's `max_rss`.
    fn recycle_reason(&self, handle: &WorkerHandle) -> Option<&'static str> {
        let limits = handle.shared.limits();
        if limits
            .max_calls
            .is_some_and(|max| handle.shared.calls() >= max)
        {
            return Some("max_calls reached");
        }
        if limits
            .max_lifetime
            .is_some_and(|max| handle.shared.service_age() >= max)
        {
            return Some("max_lifetime reached");
        }
        // The last sample, taken off the hot path (see `sample`).
        if self
            .config
            .max_rss
            .is_some_and(|max| handle.shared.rss() > max)
        {
            return Some("max_rss exceeded");
        }
        None
    }

    /// Asks the supervisor, once per worker, to replace `worker` make before break.
    fn request_replacement(&self, worker: &Arc<WorkerShared>, reason: &str) {
        if !worker.request_replacement() {
            return;
        }
        tracing::debug!(worker = %worker.id, reason, "replacing a worker over a recycling limit");
        if let Some(sup) = self.supervisor.get() {
            let _ = sup.cast(SupervisorMsg::Replace {
                worker: worker.clone(),
                reason: reason.to_owned(),
                give_up_on_failure: false,
                reply: None,
            });
        }
    }
}

/// The resident memory of a process, from `/proc/<pid>/status` (Linux).
pub(crate) fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// How a caller holds the worker it takes from the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Alone: a lease, a session.
    Exclusive,
    /// One call slot of a worker that serves several calls at once (the whole worker if it
    /// serves one): a pool's call.
    Shared,
}

/// What [`Inner::take_slot`] got.
enum Taken {
    /// A call slot.
    Shared,
    /// The worker is reserved for an exclusive holder; with a receiver if it must wait for
    /// slots still out.
    Reserved(Option<tokio::sync::oneshot::Receiver<()>>),
    /// Nothing: the worker is gone, or the slot went to another's reservation.
    No,
}

/// One more slot for the exclusive holder gathering them; wakes it once it has them all.
fn gather(shares: &mut wharf_actors::worker::Shares, slots: usize) {
    shares.gathered += 1;
    if shares.gathered >= slots {
        if let Some(waiter) = shares.waiter.take() {
            let _ = waiter.send(());
        }
    }
}

/// An exclusive holder gathering the slots of a worker serving several calls at once; dropped
/// before it has them all (a timeout, a cancelled caller), it gives back what it gathered.
struct Reservation<'a> {
    pool: &'a Arc<Inner>,
    handle: Option<WorkerHandle>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.pool.unreserve(handle);
        }
    }
}

/// Counts a call as under way while it lives.
pub(crate) struct ActiveCall(Arc<Inner>);

impl ActiveCall {
    pub(crate) fn new(pool: &Arc<Inner>) -> Self {
        pool.counters.active.fetch_add(1, Ordering::AcqRel);
        Self(pool.clone())
    }
}

impl Drop for ActiveCall {
    fn drop(&mut self) {
        // No wake-up here: this is every call's path, and a shutdown waiting for calls to end
        // polls the count.
        self.0.counters.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a caller as waiting while it lives.
struct WaitGuard<'a>(&'a AtomicUsize);

impl<'a> WaitGuard<'a> {
    /// Joins the waiting callers, unless `max` of them wait already.
    fn enter(n: &'a AtomicUsize, max: Option<usize>) -> Option<Self> {
        let max = max.unwrap_or(usize::MAX);
        n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            (w < max).then_some(w + 1)
        })
        .ok()?;
        Some(Self(n))
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Best effort when the pool is dropped without shutdown(): stop the supervisor and
        // kill every worker's process group now.
        if let Some(sup) = self.supervisor.get() {
            sup.stop(None);
        }
        for w in lock(&self.workers).values() {
            if let Some(port) = w.port() {
                port.kill(PortError::Closed);
            }
        }
    }
}

/// The supervisor's view of the pool.
struct SupervisorView(Weak<Inner>);

impl PoolEvents for SupervisorView {
    fn worker_starting(&self, worker: &Arc<WorkerShared>) {
        if let Some(pool) = self.0.upgrade() {
            lock(&pool.workers).insert(worker.id.clone(), worker.clone());
            pool.events.emit(|| PoolEvent::WorkerStarting {
                pool: pool.config.name.clone(),
                worker: worker.id.clone(),
                slot: worker.slot,
            });
        }
    }

    fn worker_ready(&self, handle: WorkerHandle) {
        let Some(pool) = self.0.upgrade() else {
            handle.kill(ExitKind::Stopped);
            return;
        };
        tracing::debug!(pool = %pool.config.name, worker = %handle.shared.id, pid = handle.port.pid(), "worker ready");
        pool.events.emit(|| PoolEvent::WorkerReady {
            pool: pool.config.name.clone(),
            worker: handle.shared.id.clone(),
            pid: handle.port.pid(),
        });
        if pool.config.max_rss.is_some() {
            // A fresh worker over the limit is unfit: sampled now, once, before it serves.
            if let Some(rss) = resident_bytes(handle.port.pid()) {
                handle.shared.set_rss(rss);
            }
        }
        if let Some(reason) = pool.recycle_reason(&handle) {
            // Over a limit before it served anything: no replacement would do better, so this
            // is a failure under the restart policy, not a recycling.
            tracing::warn!(pool = %pool.config.name, worker = %handle.shared.id, reason, "a fresh worker already exceeds a recycling limit");
            handle.retire_as(ExitKind::Unfit(reason.to_owned()));
            return;
        }
        pool.release(handle);
        pool.changed.notify_waiters();
    }

    fn worker_exited(&self, worker: &Arc<WorkerShared>, kind: &ExitKind) {
        if let Some(pool) = self.0.upgrade() {
            pool.forget_idle(&worker.id);
            if lock(&pool.workers).remove(&worker.id).is_some() {
                tracing::debug!(pool = %pool.config.name, worker = %worker.id, ?kind, "worker exited");
                if kind.is_replacement() {
                    pool.counters.replacements.fetch_add(1, Ordering::Relaxed);
                }
                pool.telemetry.exit(kind.label(), kind.is_replacement());
                lock(&pool.last_exit).insert(worker.slot, kind.label());
                pool.events.emit(|| PoolEvent::WorkerExited {
                    pool: pool.config.name.clone(),
                    worker: worker.id.clone(),
                    cause: kind.clone(),
                });
            }
        }
    }

    fn start_failed(&self, worker: &Arc<WorkerShared>, error: &PortError) {
        if let Some(pool) = self.0.upgrade() {
            lock(&pool.workers).remove(&worker.id);
            pool.counters.start_failures.fetch_add(1, Ordering::Relaxed);
            pool.telemetry.start_failed();
            lock(&pool.last_exit).insert(worker.slot, "start_failed");
            pool.events.emit(|| PoolEvent::StartFailed {
                pool: pool.config.name.clone(),
                worker: worker.id.clone(),
                error: error.to_string(),
            });
        }
    }

    fn restarting(&self, slot: usize, delay: Duration) {
        if let Some(pool) = self.0.upgrade() {
            pool.counters.restarts.fetch_add(1, Ordering::Relaxed);
            let cause = lock(&pool.last_exit).remove(&slot).unwrap_or("unknown");
            pool.telemetry.restart(cause);
            pool.events.emit(|| PoolEvent::Restarting {
                pool: pool.config.name.clone(),
                slot,
                delay,
            });
        }
    }

    fn escalated(&self, reason: String, last_errors: Vec<PortError>) {
        if let Some(pool) = self.0.upgrade() {
            pool.fail(reason, last_errors);
        }
    }

    fn exhausted(&self, last_exit: String) {
        if let Some(pool) = self.0.upgrade() {
            pool.set_status(Status::NoWorkers(last_exit));
        }
    }

    fn worker_superseded(&self, worker: &WorkerHandle, reason: &str) {
        let Some(pool) = self.0.upgrade() else {
            worker.kill(ExitKind::Stopped);
            return;
        };
        // Under the stack's lock, like `release`: an idle worker is in the stack and is taken
        // now (whoever pops it later discards it); a held one is retired when it comes back.
        let idle = lock(&pool.idle);
        worker.shared.mark_superseded(reason);
        let in_stack = idle.iter().any(|h| Arc::ptr_eq(&h.shared, &worker.shared));
        if in_stack && worker.shared.try_hold() {
            drop(idle);
            worker.retire(reason);
        }
    }
}

/// A worker's state, as the pool sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WorkerState {
    /// Launching and waiting for the init pong.
    Starting,
    /// Ready, waiting for a caller.
    Idle,
    /// Checked out by a caller (or pinned to a session).
    Busy,
    /// Finishing a call its caller abandoned, before it can be handed out again.
    Draining,
    /// Being stopped (retired, shut down).
    Stopping,
    /// Gone.
    Dead,
}

/// One running worker, as [`Pool::worker_info`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// The worker's name: `pool-slot.launch`.
    pub id: String,
    /// Its supervisor slot (core slots first, then overflow slots; slots a
    /// [`Pool::resize`] adds come after both).
    pub slot: usize,
    /// Its OS process id.
    pub pid: u32,
    /// Its state.
    pub state: WorkerState,
    /// Calls it has served.
    pub calls: u64,
    /// Its own `max_calls`: the pool's, less its share of `recycle_jitter`.
    pub max_calls: Option<u64>,
    /// Its own `max_lifetime`: the pool's, less its share of `recycle_jitter`.
    pub max_lifetime: Option<Duration>,
    /// The engine hosting it, if the pool spreads over engines.
    pub engine: Option<String>,
}

/// A supervised pool of external workers. Cheap to clone; every clone is the same pool.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> Result<(), wharf::Error> {
/// use std::time::Duration;
/// use wharf::{Error, Pool, ProcessSpec};
///
/// let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"]).unwrap();
/// let pool = Pool::builder(spec).name("demo").size(2).build().await?;
/// pool.wait_ready(2, Duration::from_secs(30)).await?;
///
/// let reply: String = pool.call("echo", "hello").await?; // any free worker, typed reply
/// assert_eq!(reply, "hello");
/// assert_eq!(pool.stats().ok, 1);
///
/// pool.shutdown().await; // calls in flight finish, then every worker is stopped and reaped
/// let late = pool.call::<String>("echo", "late").await;
/// assert!(matches!(late, Err(Error::ShutDown(_))));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.inner.config.name)
            .field("state", &self.inner.state())
            .finish()
    }
}

impl Pool {
    /// Starts building a pool of workers launched from `spec`.
    /// A process spec or any other [`WorkerSpec`] will do.
    pub fn builder(spec: impl Into<WorkerSpec>) -> PoolBuilder {
        PoolBuilder::new(spec.into())
    }

    pub(crate) async fn start(mut config: PoolConfig) -> Result<Pool> {
        let instance = container::new_instance();
        config.spec.set_pool(&config.name, &instance);
        if let WorkerSpec::Container(spec) = &config.spec {
            // Containers a dead runtime left behind for this pool go first.
            let leftovers = Sweep::Leftovers { pool: &config.name };
            let swept = match spec.engine_or_local().await {
                Ok(engine) => container::sweep(&engine, leftovers).await,
                Err(e) => Err(e),
            };
            if let Err(e) = swept {
                // Not fatal: the pool can still run; its launches report what the engine says.
                tracing::warn!(pool = %config.name, error = %e, "cannot sweep leftover containers");
            }
        }
        let inner = Arc::new(Inner {
            size: AtomicUsize::new(config.size),
            permits: Semaphore::new(0),
            idle: Mutex::new(Vec::with_capacity(config.size + config.max_overflow)),
            waiting: AtomicUsize::new(0),
            workers: Mutex::new(HashMap::new()),
            status: Mutex::new(Status::Running),
            running: AtomicBool::new(true),
            counters: Counters::default(),
            supervisor: OnceLock::new(),
            resizing: Mutex::new(()),
            sessions: Mutex::new(HashSet::new()),
            draining: Mutex::new(HashSet::new()),
            changed: Notify::new(),
            events: EventSender::new(),
            telemetry: Telemetry::new(&config.name),
            rss_total: AtomicU64::new(0),
            last_exit: Mutex::new(HashMap::new()),
            fleet: (!config.engines.is_empty())
                .then(|| Fleet::new(config.engines.clone(), config.engine_health)),
            config,
        });
        let c = &inner.config;
        let args = SupervisorArgs {
            name: c.name.clone(),
            spec: c.spec.clone(),
            size: c.size,
            max_overflow: c.max_overflow,
            overflow_idle: c.overflow_idle,
            eager: c.eager,
            startup_concurrency: c.startup_concurrency,
            policy: c.restart,
            health: c.health,
            shutdown_grace: c.shutdown_grace,
            max_calls: c.max_calls,
            max_lifetime: c.max_lifetime,
            recycle_jitter: c.recycle_jitter,
            events: Arc::new(SupervisorView(Arc::downgrade(&inner))),
            fleet: inner.fleet.clone(),
        };
        static SUPERVISORS: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "wharf.supervisor.{}.{}",
            c.name,
            SUPERVISORS.fetch_add(1, Ordering::Relaxed)
        );
        let (sup, ended) = Actor::spawn(Some(name), Supervisor, args)
            .await
            .map_err(|e| Error::PoolFailed {
                pool: inner.config.name.clone(),
                reason: format!("the supervisor could not start: {e}"),
                last_errors: Vec::new(),
            })?;
        let _ = inner.supervisor.set(sup);
        // Watch the supervisor: if it ever stops while the pool still runs (a panic, a kill),
        // nothing would restart workers any more, so the pool fails now, with that cause,
        // instead of letting callers time out one by one.
        let pool = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let outcome = match ended.await {
                Err(e) if e.is_panic() => "the supervisor panicked".to_owned(),
                _ => "the supervisor stopped unexpectedly".to_owned(),
            };
            let Some(pool) = pool.upgrade() else {
                return;
            };
            if !pool.running.load(Ordering::Acquire) {
                return; // a shutdown or a failure stopped it
            }
            tracing::error!(pool = %pool.config.name, "{outcome}; the pool has failed");
            pool.fail(outcome, Vec::new());
            // Nothing supervises its workers any more: they go too.
            let ports: Vec<_> = lock(&pool.workers)
                .values()
                .filter_map(|w| w.port().cloned())
                .collect();
            for port in ports {
                port.kill(PortError::Closed);
            }
        });
        if inner.config.max_rss.is_some() || Telemetry::ENABLED {
            tokio::spawn(sample(Arc::downgrade(&inner)));
        }
        Ok(Pool { inner })
    }

    /// Why the pool no longer serves — the error every call now fails with
    /// ([`Error::PoolFailed`], [`Error::NoWorkers`] or [`Error::ShutDown`]) — or `None` while it
    /// runs.
    pub fn failure(&self) -> Option<Error> {
        self.inner.status_error()
    }

    /// Subscribes to the pool's lifecycle events (from now on). See [`PoolEvent`].
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<PoolEvent> {
        self.inner.events.subscribe()
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    /// The pool's configuration, as it was built (a [`Pool::resize`] shows in
    /// [`PoolStats::size`], not here).
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// Waits until `n` workers are ready and idle, or `timeout` passes, or the pool fails.
    /// Returns the pool state then; an error if the pool failed or time ran out.
    pub async fn wait_ready(&self, n: usize, timeout: Duration) -> Result<PoolState> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(e) = self.inner.status_error() {
                return Err(e);
            }
            let state = self.inner.state();
            if state.idle + state.busy >= n {
                return Ok(state);
            }
            // Also poll now and then: a worker may be ready without anyone checking in.
            let tick = tokio::time::sleep(Duration::from_millis(50));
            tokio::select! {
                _ = changed => {}
                _ = tick => {}
                _ = until(deadline, std::future::pending::<()>()) => {
                    return Err(Error::CheckoutTimeout { waited: started.elapsed(), state: self.inner.state() });
                }
            }
        }
    }

    /// Checks out a worker for several calls; it returns to the pool when the lease drops.
    pub async fn checkout(&self) -> Result<Lease> {
        self.inner
            .checkout(Some(self.inner.config.checkout_timeout))
            .await
    }

    /// Checks out a worker only if one is free now; [`Error::Overloaded`] at once otherwise
    /// (a lazy or overflow pool is asked to grow, for the next caller).
    pub async fn try_checkout(&self) -> Result<Lease> {
        self.inner.checkout(None).await
    }

    /// Calls `method` only if a worker is free now; [`Error::Overloaded`] at once otherwise.
    pub async fn try_call<R: DeserializeOwned + 'static>(
        &self,
        method: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<R> {
        let body = to_value(body)?;
        let mut lease = self.inner.checkout_as(None, Hold::Shared).await?;
        let reply = lease.call_value(method, body, CallOptions::new()).await?;
        decode(method, reply)
    }

    /// Calls `method` on any free worker with a body that serialises to MessagePack, and
    /// decodes the reply as `R` (a [`Value`] is handed over as it is).
    pub async fn call<R: DeserializeOwned + 'static>(
        &self,
        method: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<R> {
        self.call_with(method, body, CallOptions::new()).await
    }

    /// [`Pool::call`] with options for this call: its own deadline, idempotent retries.
    pub async fn call_with<R: DeserializeOwned + 'static>(
        &self,
        method: &str,
        body: &(impl Serialize + ?Sized),
        options: CallOptions,
    ) -> Result<R> {
        let reply = self.call_value(method, to_value(body)?, options).await?;
        decode(method, reply)
    }

    /// Calls `method` with a MessagePack value as body and returns the raw reply.
    ///
    /// An idempotent call ([`CallOptions::idempotent`]) whose worker dies under it
    /// (`WorkerDied`) is retried on another worker, up to the pool's retry limit.
    pub async fn call_value(
        &self,
        method: &str,
        body: Value,
        options: CallOptions,
    ) -> Result<Value> {
        let timeout = Some(self.inner.config.checkout_timeout);
        if !options.idempotent {
            let mut lease = self.inner.checkout_as(timeout, Hold::Shared).await?;
            return lease.call_value(method, body, options).await;
        }
        let retry = self.inner.config.retry;
        let mut attempt = 0;
        loop {
            let mut lease = self.inner.checkout_as(timeout, Hold::Shared).await?;
            match lease.call_value(method, body.clone(), options).await {
                Err(Error::WorkerDied { .. } | Error::KilledForDeadline { .. })
                    if attempt < retry.max_retries =>
                {
                    drop(lease);
                    attempt += 1;
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(retry.delay).await;
                }
                other => return other,
            }
        }
    }

    /// Calls a streaming method on any free worker: its chunks, then its result. The worker
    /// stays checked out until the result has been read (or the stream is dropped).
    pub async fn call_stream(
        &self,
        method: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<CallStream<'static>> {
        self.call_stream_with(method, body, CallOptions::new())
            .await
    }

    /// [`Pool::call_stream`] with options for this call (its deadline bounds the whole
    /// stream; a stream is never retried).
    pub async fn call_stream_with(
        &self,
        method: &str,
        body: &(impl Serialize + ?Sized),
        options: CallOptions,
    ) -> Result<CallStream<'static>> {
        let body = to_value(body)?;
        // A stream holds its worker alone, also one that serves several calls at once: a
        // consumer that stops reading stops the port's reader (backpressure), which would
        // hold up the replies of every other call on that worker.
        let lease = self.checkout().await?;
        let opened = lease.open_stream(method, body, options).await?;
        Ok(CallStream::new(
            self.inner.clone(),
            opened,
            Holder::Owned(lease),
        ))
    }

    /// Calls `method` once per item, up to as many calls at once as the pool has workers (its
    /// size plus overflow), and yields the replies in the items' order, as a stream — what
    /// `ProcessPoolExecutor.map` is in Python. A failed item yields its error in its place and
    /// the others go on.
    ///
    /// ```
    /// # #[tokio::main]
    /// # async fn main() -> wharf::Result<()> {
    /// use futures::StreamExt;
    /// use wharf::{Pool, ProcessSpec};
    ///
    /// let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"]).unwrap();
    /// let pool = Pool::builder(spec).size(2).build().await?;
    /// let echoed: Vec<u64> = pool
    ///     .map::<_, u64>("echo", 0..100u64)
    ///     .map(|reply| reply.unwrap())
    ///     .collect()
    ///     .await;
    /// assert_eq!(echoed, (0..100).collect::<Vec<_>>());
    /// # pool.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn map<B, R>(
        &self,
        method: &str,
        items: impl IntoIterator<Item = B, IntoIter: Send + 'static>,
    ) -> impl futures::Stream<Item = Result<R>> + Send + 'static
    where
        B: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        let in_flight = self.inner.config.size + self.inner.config.max_overflow;
        self.map_with(method, items, in_flight, CallOptions::new())
    }

    /// [`Pool::map`] with at most `in_flight` calls under way at once (at least 1) and options
    /// for every call.
    pub fn map_with<B, R>(
        &self,
        method: &str,
        items: impl IntoIterator<Item = B, IntoIter: Send + 'static>,
        in_flight: usize,
        options: CallOptions,
    ) -> impl futures::Stream<Item = Result<R>> + Send + 'static
    where
        B: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        use futures::StreamExt;
        let pool = self.clone();
        let method: Arc<str> = method.into();
        futures::stream::iter(items)
            .map(move |item| {
                let (pool, method) = (pool.clone(), method.clone());
                let body = to_value(&item);
                async move {
                    let reply = pool.call_value(&method, body?, options).await?;
                    decode(&method, reply)
                }
            })
            .buffered(in_flight.max(1))
    }

    /// Opens a session: one worker pinned exclusively to `id` until the session ends.
    pub async fn session(&self, id: impl Into<String>) -> Result<Session> {
        Session::open(self.inner.clone(), id.into()).await
    }

    /// A snapshot of the pool: workers by state, calls, errors, restarts, checkout wait.
    pub fn stats(&self) -> PoolStats {
        PoolStats::snapshot(&self.inner)
    }

    /// The pool's occupancy now.
    pub fn state(&self) -> PoolState {
        self.inner.state()
    }

    /// Every worker's name and state.
    pub fn workers(&self) -> Vec<(String, WorkerState)> {
        self.inner.worker_states()
    }

    /// The workers that are running now (ready or busy), by slot.
    pub fn worker_info(&self) -> Vec<WorkerInfo> {
        let mut v: Vec<WorkerInfo> = lock(&self.inner.workers)
            .values()
            .filter_map(|w| {
                let port = w.port().filter(|p| p.is_open())?;
                Some(WorkerInfo {
                    id: w.id.clone(),
                    slot: w.slot,
                    pid: port.pid(),
                    state: self.inner.worker_state(w),
                    calls: w.calls(),
                    max_calls: w.limits().max_calls,
                    max_lifetime: w.limits().max_lifetime,
                    engine: w.engine().map(str::to_owned),
                })
            })
            .collect();
        v.sort_by_key(|w| w.slot);
        v
    }

    /// The pool's engines by name, with their health now (empty if the pool does not spread
    /// over engines).
    pub fn engines(&self) -> Vec<(String, Health)> {
        let Some(fleet) = &self.inner.fleet else {
            return Vec::new();
        };
        (0..fleet.len())
            .map(|i| (fleet.engine(i).engine.name().to_owned(), fleet.health(i)))
            .collect()
    }

    /// The engine a session of id `session` prefers now: its *home*, chosen from the id by
    /// a hash with a coprime step over the pool's engines (OpenWhisk's way), skipping engines
    /// that are down, so it stays the same while its engine is up and changes only while it is
    /// not. A session takes a free worker there if there is one, any free worker otherwise;
    /// once open it never moves. `None` if the pool does not spread over engines.
    pub fn home_engine(&self, session: &str) -> Option<String> {
        self.inner.home_engine(session)
    }

    /// How many running workers each engine hosts (engines without one included; empty if the
    /// pool does not spread over engines).
    pub fn workers_by_engine(&self) -> BTreeMap<String, usize> {
        let mut counts: BTreeMap<String, usize> = self
            .engines()
            .into_iter()
            .map(|(name, _)| (name, 0))
            .collect();
        for engine in self.worker_info().into_iter().filter_map(|w| w.engine) {
            *counts.entry(engine).or_default() += 1;
        }
        counts
    }

    /// The OS process ids of the workers that are running now.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.worker_info().iter().map(|w| w.pid).collect()
    }

    /// Replaces every worker, `at_once` at a time (at least 1), make before break: a new worker
    /// starts in the old one's slot while the old one keeps serving, and the old one takes no
    /// new caller once the new one is ready — so the pool keeps its capacity and calls keep
    /// being served throughout. Use it to pick up new worker code on disk, or to refresh every
    /// worker.
    ///
    /// Returns how many workers were replaced, once each has a ready successor. An old worker
    /// that is idle then is stopped at once; one still held by a caller (a lease, a session)
    /// finishes that caller's work and is stopped when it comes back. Overflow workers are
    /// retired as soon as they are free (demand starts new ones); workers that end meanwhile
    /// are restarted as usual and are not counted.
    ///
    /// If a new worker fails to start, the old one keeps serving and this stops with
    /// [`Error::ReplacementFailed`]; workers already replaced stay replaced. If the pool fails
    /// or shuts down meanwhile, it stops with that error.
    pub async fn rolling_restart(&self, at_once: usize) -> Result<usize> {
        use futures::StreamExt;
        let inner = &self.inner;
        if let Some(e) = inner.status_error() {
            return Err(e);
        }
        let Some(sup) = inner.supervisor.get() else {
            return Err(inner.supervisor_gone());
        };
        let mut old: Vec<Arc<WorkerShared>> = lock(&inner.workers)
            .values()
            .filter(|w| {
                matches!(w.lifecycle(), Lifecycle::Idle | Lifecycle::Held)
                    && w.superseded().is_none()
            })
            .cloned()
            .collect();
        old.sort_by(|a, b| (a.slot, &a.id).cmp(&(b.slot, &b.id)));
        let replace = |worker: Arc<WorkerShared>| async move {
            let asked = sup
                .call(
                    |reply| SupervisorMsg::Replace {
                        worker: worker.clone(),
                        reason: "rolling restart".into(),
                        give_up_on_failure: true,
                        reply: Some(reply),
                    },
                    None,
                )
                .await;
            (worker, asked)
        };
        let mut outcomes = futures::stream::iter(old)
            .map(replace)
            .buffer_unordered(at_once.max(1));
        let mut replaced = 0;
        while let Some((worker, asked)) = outcomes.next().await {
            match asked {
                Ok(ractor::rpc::CallResult::Success(ReplaceOutcome::Replaced)) => replaced += 1,
                // It ended meanwhile: its slot is restarted (or was removed) anyway.
                Ok(ractor::rpc::CallResult::Success(ReplaceOutcome::Gone)) => {}
                Ok(ractor::rpc::CallResult::Success(ReplaceOutcome::Failed(cause))) => {
                    return Err(Error::ReplacementFailed {
                        pool: inner.config.name.clone(),
                        worker: worker.id.clone(),
                        cause,
                    });
                }
                _ => return Err(inner.supervisor_gone()),
            }
        }
        Ok(replaced)
    }

    /// Sets the number of core workers to `size` while the pool runs (`max_overflow` stays
    /// as it is). Growing starts the new workers at once (on demand for a lazy pool).
    /// Shrinking removes, in this order, slots with no ready worker (not started, restarting,
    /// launching), then idle workers — stopped at once —, then busy ones, which finish their
    /// caller's work (a call, a lease, a session) and are stopped when they come back.
    ///
    /// Returns once the change is made, not when workers have started or stopped
    /// ([`Pool::wait_ready`] waits for them); [`PoolStats::size`] and [`PoolState::size`] say
    /// the new size at once. A size of 0 needs `max_overflow` above 0 ([`Error::Config`]
    /// otherwise: the pool could never run a worker).
    pub async fn resize(&self, size: usize) -> Result<()> {
        let inner = &self.inner;
        if size == 0 && inner.config.max_overflow == 0 {
            return Err(Error::Config {
                field: "size",
                reason: "size and max_overflow are both 0: the pool could never run a worker"
                    .into(),
            });
        }
        if let Some(e) = inner.status_error() {
            return Err(e);
        }
        let Some(sup) = inner.supervisor.get() else {
            return Err(inner.supervisor_gone());
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let _order = lock(&inner.resizing);
            let reply = ractor::RpcReplyPort::from(tx);
            if sup.cast(SupervisorMsg::Resize { size, reply }).is_err() {
                return Err(inner.supervisor_gone());
            }
            inner.size.store(size, Ordering::Relaxed);
        }
        if rx.await.is_err() {
            return Err(inner.supervisor_gone());
        }
        inner.changed.notify_waiters();
        Ok(())
    }

    /// Stops the pool gracefully: refuses new checkouts at once, lets calls in flight finish
    /// for up to the shutdown grace period, then stops every worker (shutdown message, grace,
    /// SIGTERM, SIGKILL) and waits until each is reaped.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.set_status(Status::ShutDown);
        let grace = inner.config.shutdown_grace;
        let deadline = tokio::time::Instant::now().checked_add(grace);
        loop {
            let changed = inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Calls in flight, not workers held: an idle open session must not hold the
            // shutdown for the whole grace.
            if inner.counters.active.load(Ordering::Acquire) == 0 {
                break;
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = until(deadline, std::future::pending::<()>()) => break,
            }
        }
        if let Some(sup) = inner.supervisor.get() {
            let limit = grace
                .saturating_mul(3)
                .saturating_add(Duration::from_secs(5));
            let stopped = sup.call(SupervisorMsg::Shutdown, Some(limit)).await;
            if !matches!(stopped, Ok(ractor::rpc::CallResult::Success(()))) {
                tracing::warn!(pool = %inner.config.name, "workers did not stop in time; killing them");
            }
            sup.stop(None);
        }
        // Whatever is left (a stuck stop) dies now.
        let ports: Vec<_> = lock(&inner.workers)
            .values()
            .filter_map(|w| w.port().cloned())
            .collect();
        for port in ports {
            port.kill(PortError::Closed);
            port.exit_info(Duration::from_secs(5)).await;
        }
        lock(&inner.idle).clear();
        if let WorkerSpec::Container(spec) = &inner.config.spec {
            // Every container this pool created goes, whatever state its worker was left in.
            let mine = Sweep::Instance {
                instance: &spec.instance,
            };
            let swept = match spec.engine_or_local().await {
                Ok(engine) => container::sweep(&engine, mine).await,
                Err(e) => Err(e),
            };
            if let Err(e) = swept {
                tracing::warn!(pool = %inner.config.name, error = %e, "cannot remove the pool's containers");
            }
            // And on every engine of its fleet (what one that does not answer keeps is swept
            // by the pool of this name a later runtime starts on it).
            if let Some(fleet) = &inner.fleet {
                let limit = inner.config.engine_health.timeout * 5;
                let sweeps = (0..fleet.len()).map(|i| {
                    let engine = fleet.engine(i).engine.clone();
                    async move {
                        let swept = tokio::time::timeout(limit, container::sweep(&engine, mine));
                        (engine.name().to_owned(), swept.await)
                    }
                });
                for (engine, swept) in futures::future::join_all(sweeps).await {
                    match swept {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(pool = %inner.config.name, engine, error = %e, "cannot remove the pool's containers")
                        }
                        Err(_) => {
                            tracing::warn!(pool = %inner.config.name, engine, "the engine did not answer the sweep of the pool's containers")
                        }
                    }
                }
            }
        }
        // Every worker is gone: the gauges say so now, not at a sample that may never come.
        inner.rss_total.store(0, Ordering::Relaxed);
        inner.publish_gauges();
    }
}

/// Samples the pool every `sample_interval`, off the hot path: each worker's resident memory
/// (for `max_rss`: an idle worker over the limit is retired now, a busy one when it comes
/// back), and the gauges of the `metrics` feature. Ends, after a last sample, with the pool.
async fn sample(pool: Weak<Inner>) {
    let Some(period) = pool.upgrade().map(|p| p.config.sample_interval) else {
        return;
    };
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        // A container's host process is its init, not the worker: its memory says nothing.
        let processes = matches!(pool.config.spec, WorkerSpec::Process(_));
        let workers: Vec<_> = lock(&pool.workers).values().cloned().collect();
        let mut total = 0;
        for w in workers.iter().filter(|_| processes) {
            let Some(pid) = w.port().map(|p| p.pid()).filter(|&pid| pid != 0) else {
                continue;
            };
            let Some(rss) = resident_bytes(pid) else {
                continue;
            };
            w.set_rss(rss);
            total += rss;
            let serving = matches!(w.lifecycle(), Lifecycle::Idle | Lifecycle::Held);
            if serving && pool.config.max_rss.is_some_and(|max| rss > max) {
                // Replaced make before break, idle or busy: it serves (last in line) until its
                // successor is ready, then is retired as soon as it is free.
                pool.request_replacement(w, "max_rss exceeded");
            }
        }
        pool.rss_total.store(total, Ordering::Relaxed);
        pool.publish_gauges();
        if !pool.running.load(Ordering::Acquire) {
            // Failed, out of workers or shut down: no worker will start again; the last
            // figures stay published.
            return;
        }
    }
}

/// Runs `fut` until `deadline`; `Err` if the deadline came first. No deadline (a timeout too
/// large for the clock) waits without limit.
pub(crate) async fn until<F: std::future::Future>(
    deadline: Option<tokio::time::Instant>,
    fut: F,
) -> std::result::Result<F::Output, tokio::time::error::Elapsed> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, fut).await,
        None => Ok(fut.await),
    }
}

/// Converts a serialisable body to a MessagePack value.
/// Structs become maps keyed by field name (what a Python handler reads as `body["field"]`),
/// not arrays of their fields.
pub fn to_value<B: Serialize + ?Sized>(body: &B) -> Result<Value> {
    let bytes = rmp_serde::to_vec_named(body).map_err(|e| Error::Body(e.to_string()))?;
    rmpv::decode::read_value(&mut bytes.as_slice()).map_err(|e| Error::Body(e.to_string()))
}

/// Converts a MessagePack value to a deserialisable type.
pub fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T> {
    rmpv::ext::from_value(value).map_err(|e| Error::Body(e.to_string()))
}
