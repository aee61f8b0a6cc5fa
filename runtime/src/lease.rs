//! A lease: one worker, held by one caller, returned to the pool on drop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;
use wharf_actors::port::PortError;
use wharf_actors::worker::{ExitKind, WorkerHandle};
use wharf_protocol::Value;

use crate::call::{decode, CallOptions, CallStream, Holder, Opened};
use crate::error::{Error, Result};
use crate::pool::{to_value, ActiveCall, Inner};

/// Exclusive use of one worker. Calls through a lease go straight to the worker's port. When
/// the lease drops, the worker goes back to the pool — or, if a call was abandoned mid-flight,
/// it first finishes that call (its reply is discarded), so the next caller gets a clean worker.
///
/// A lease that holds a session's worker is dirty until the session's reset succeeded: dropped
/// before that (whatever the reason: a cancelled end, a runtime shutting down), it retires its
/// worker instead of returning it, so session state never reaches another caller.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> Result<(), wharf::Error> {
/// use wharf::{Pool, ProcessSpec};
///
/// let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"]).unwrap();
/// let pool = Pool::builder(spec).size(2).build().await?;
///
/// let mut lease = pool.checkout().await?; // waits up to the pool's checkout timeout
/// let first: u32 = lease.call("pid", &()).await?;
/// let second: u32 = lease.call("pid", &()).await?;
/// assert_eq!(first, second); // every call goes to the same worker
/// assert_eq!(first, lease.pid());
/// drop(lease); // the worker goes back to the pool
/// # pool.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Lease {
    pool: Arc<Inner>,
    handle: Option<WorkerHandle>,
    queue_wait: Duration,
    session: Option<String>,
    /// One call slot of a worker that serves several calls at once (a pool's call), rather
    /// than the whole worker.
    shared: bool,
    /// The id of the last call made through a shared lease (`NO_CALL`: none): dropped while it
    /// is still in flight, the lease gives its slot back only once its reply has come.
    call: AtomicU64,
}

const NO_CALL: u64 = u64::MAX;

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("worker", &self.worker_id())
            .field("session", &self.session)
            .finish()
    }
}

impl Lease {
    pub(crate) fn new(pool: Arc<Inner>, handle: WorkerHandle, queue_wait: Duration) -> Self {
        Self {
            pool,
            handle: Some(handle),
            queue_wait,
            session: None,
            shared: false,
            call: AtomicU64::new(NO_CALL),
        }
    }

    /// A lease of one call slot of a worker that serves several calls at once.
    pub(crate) fn shared(pool: Arc<Inner>, handle: WorkerHandle, queue_wait: Duration) -> Self {
        let mut lease = Self::new(pool, handle, queue_wait);
        lease.shared = true;
        lease
    }

    pub(crate) fn set_session(&mut self, session: String) {
        self.session = Some(session);
    }

    /// The session's state is gone from the worker (its reset succeeded): the lease may return
    /// the worker to the pool.
    pub(crate) fn session_cleaned(&mut self) {
        self.session = None;
    }

    pub(crate) fn handle(&self) -> Option<&WorkerHandle> {
        self.handle.as_ref()
    }

    /// The leased worker's name.
    pub fn worker_id(&self) -> &str {
        self.handle.as_ref().map_or("", |h| h.shared.id.as_str())
    }

    /// The leased worker's OS process id.
    pub fn pid(&self) -> u32 {
        self.handle.as_ref().map_or(0, |h| h.port.pid())
    }

    /// Whether the leased worker is still alive.
    pub fn is_alive(&self) -> bool {
        self.handle.as_ref().is_some_and(WorkerHandle::is_alive)
    }

    /// How long the caller waited for this worker.
    pub fn queue_wait(&self) -> Duration {
        self.queue_wait
    }

    /// Calls `method` with a body that serialises to MessagePack and decodes the reply as `R`
    /// (a [`Value`] is handed over as it is).
    pub async fn call<R: DeserializeOwned + 'static>(
        &mut self,
        method: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<R> {
        self.call_with(method, body, CallOptions::new()).await
    }

    /// [`Lease::call`] with options for this call.
    pub async fn call_with<R: DeserializeOwned + 'static>(
        &mut self,
        method: &str,
        body: &(impl Serialize + ?Sized),
        options: CallOptions,
    ) -> Result<R> {
        let reply = self.call_value(method, to_value(body)?, options).await?;
        decode(method, reply)
    }

    /// Calls `method` with a MessagePack body and returns the raw reply. A call that overruns
    /// its deadline kills the worker.
    pub async fn call_value(
        &mut self,
        method: &str,
        body: Value,
        options: CallOptions,
    ) -> Result<Value> {
        let handle = self.live_handle()?;
        self.settle(&handle).await?;
        let deadline = options.deadline.unwrap_or(self.pool.config.call_timeout);
        let id = handle.port.next_request_id();
        if self.shared {
            self.call.store(id, Ordering::Relaxed);
        }
        handle.shared.count_call();
        self.pool.counters.calls.fetch_add(1, Ordering::Relaxed);
        let _active = ActiveCall::new(&self.pool);
        let span = tracing::debug_span!(
            "wharf.call",
            pool = %self.pool.name(),
            worker = %handle.shared.id,
            session = self.session.as_deref().unwrap_or(""),
            request_id = id,
            method,
            queue_wait_us = self.queue_wait.as_micros() as u64,
            run_us = tracing::field::Empty,
        );
        let started = Instant::now();
        let call = handle.port.call(
            id,
            method,
            body,
            self.session.clone(),
            Some(millis(deadline)),
        );
        let outcome = tokio::time::timeout(deadline, call)
            .instrument(span.clone())
            .await;
        span.record("run_us", started.elapsed().as_micros() as u64);
        let result = match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Error::from_port(&handle.shared.id, e)),
            Err(_) => {
                kill_for_deadline(&handle, method, deadline);
                Err(Error::DeadlineExceeded {
                    worker: handle.shared.id.clone(),
                    method: method.to_owned(),
                    deadline,
                })
            }
        };
        self.pool.account(method, &result, started.elapsed());
        result
    }

    /// Calls a streaming method: returns a stream of its chunks, which ends with the result.
    /// The pool's call timeout bounds the whole stream.
    pub async fn call_stream(
        &mut self,
        method: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<CallStream<'_>> {
        self.call_stream_with(method, body, CallOptions::new())
            .await
    }

    /// [`Lease::call_stream`] with options for this call (its deadline bounds the whole stream).
    pub async fn call_stream_with(
        &mut self,
        method: &str,
        body: &(impl Serialize + ?Sized),
        options: CallOptions,
    ) -> Result<CallStream<'_>> {
        let opened = self.open_stream(method, to_value(body)?, options).await?;
        Ok(CallStream::new(
            self.pool.clone(),
            opened,
            Holder::Borrowed(self),
        ))
    }

    /// Starts a streamed call on the leased worker; whoever keeps the lease holds the stream.
    pub(crate) async fn open_stream(
        &self,
        method: &str,
        body: Value,
        options: CallOptions,
    ) -> Result<Opened> {
        let handle = self.live_handle()?;
        self.settle(&handle).await?;
        let deadline = options.deadline.unwrap_or(self.pool.config.call_timeout);
        let id = handle.port.next_request_id();
        if self.shared {
            self.call.store(id, Ordering::Relaxed);
        }
        handle.shared.count_call();
        self.pool.counters.calls.fetch_add(1, Ordering::Relaxed);
        let active = ActiveCall::new(&self.pool);
        let rx = handle
            .port
            .call_stream(
                id,
                method,
                body,
                self.session.clone(),
                Some(millis(deadline)),
            )
            .await
            .map_err(|e| Error::from_port(&handle.shared.id, e))?;
        Ok(Opened {
            handle,
            rx,
            active,
            deadline,
            method: method.to_owned(),
            started: Instant::now(),
        })
    }

    /// Waits, up to the pool's `drain_timeout`, for a call abandoned on this worker (a stream
    /// dropped before its end, a cancelled call) to end, so the next call does not queue
    /// behind it and overrun its own deadline. A worker that does not settle is retired.
    async fn settle(&self, handle: &WorkerHandle) -> Result<()> {
        // A shared slot (a pool's call on a worker serving several at once) holds one fresh
        // call: the other calls in flight there are other callers'.
        if self.shared || handle.port.in_flight() == 0 {
            return Ok(());
        }
        let limit = self.pool.config.drain_timeout;
        if tokio::time::timeout(limit, handle.port.quiesce())
            .await
            .is_ok()
        {
            return Ok(());
        }
        handle.kill(ExitKind::Recycled(
            "an abandoned call did not finish".into(),
        ));
        Err(Error::from_port(
            &handle.shared.id,
            handle.port.close_reason().unwrap_or(PortError::Closed),
        ))
    }

    fn live_handle(&self) -> Result<WorkerHandle> {
        let handle = self
            .handle
            .as_ref()
            .expect("a lease holds a worker until dropped");
        if !handle.is_alive() {
            let cause = handle.port.close_reason().unwrap_or(PortError::Closed);
            return Err(Error::from_port(&handle.shared.id, cause));
        }
        Ok(handle.clone())
    }

    /// Takes the worker out of the lease without returning it to the pool.
    pub(crate) fn take_handle(&mut self) -> Option<WorkerHandle> {
        self.handle.take()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        if self.shared {
            let call = *self.call.get_mut();
            self.pool
                .return_slot(handle, (call != NO_CALL).then_some(call));
            return;
        }
        if self.session.is_some() {
            // Its session's state may still be in the worker: never hand it out again.
            if handle.is_alive() {
                tracing::debug!(worker = %handle.shared.id, session = ?self.session, "a session's worker left without a reset; retiring it");
                handle.retire("a session ended without a successful reset");
            }
            return;
        }
        self.pool.checkin(handle);
    }
}

/// Kills a worker whose call overran its deadline. On a worker serving several calls at once
/// the others in flight fail with [`PortError::KilledForDeadline`], which says why.
pub(crate) fn kill_for_deadline(handle: &WorkerHandle, method: &str, deadline: Duration) {
    if handle.max_concurrency() > 1 {
        let reason = PortError::KilledForDeadline {
            method: method.to_owned(),
            deadline,
        };
        handle.kill_because(ExitKind::DeadlineKilled, reason);
    } else {
        handle.kill(ExitKind::DeadlineKilled);
    }
}

/// A deadline in whole milliseconds for the wire, saturating (`Duration::MAX` is no limit).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
