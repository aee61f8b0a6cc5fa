//! Ports: the owner of one external worker each, whatever runs it.
//!
//! A [`Port`] starts its worker from a [`WorkerSpec`], performs the init-ping handshake under
//! the spec's init timeout, and then carries requests to it and replies back. The parts:
//!
//! - `router` (crate-private): the protocol channel, shared by every kind of worker — the one
//!   writer, the reader task that routes replies by request id, the requests in flight;
//! - [`process`]: a worker OS process in its own process group, with its watchdog and reaper;
//! - [`container`]: a worker in a Docker container, over FIFOs, a unix socket or attach;
//! - `fifo` (crate-private): the FIFO pair a container worker's channel can be;
//! - [`logs`]: a worker's log lines into `tracing`.
//!
//! Stopping, in one vocabulary for the whole runtime:
//! - **stop** ([`Port::stop`]): graceful — the protocol's `shutdown`, a grace period, then the
//!   host's termination (SIGTERM to the group), another grace period, then a kill;
//! - **kill** ([`Port::kill`]): at once — every request in flight fails with the given reason
//!   and the worker is killed (SIGKILL to the group); nothing waits;
//! - **close the channel** ([`Port::close_channel`]): the worker's EOF, its dead-man switch.
//!
//! Dropping a port kills its worker.

pub mod container;
mod fifo;
pub mod logs;
pub mod process;
pub(crate) mod router;

mod error;

use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use wharf_protocol::message::{FromWorker, InitStatus, ToWorker, Value, PROTOCOL_VERSION};

pub use container::{ContainerSpec, Mount, Transport};
pub use error::{ExitInfo, PortError};
pub use process::{Channel, ProcessSpec};
pub use router::STREAM_BUFFER;

use router::{Request, Router, Slot};

/// The variable that asks a worker to keep a watchdog ([`WorkerSpec::watchdog`]).
pub const WATCHDOG_ENV: &str = "WHARF_WATCHDOG_MS";

/// How to start one worker: an OS process or a Docker container. Everything above the port
/// (worker actor, supervisor, pool, sessions) treats both alike.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum WorkerSpec {
    /// An OS process on this machine.
    Process(ProcessSpec),
    /// A Docker container on an engine.
    Container(Box<ContainerSpec>),
}

impl From<ProcessSpec> for WorkerSpec {
    fn from(spec: ProcessSpec) -> Self {
        WorkerSpec::Process(spec)
    }
}

impl From<ContainerSpec> for WorkerSpec {
    fn from(spec: ContainerSpec) -> Self {
        WorkerSpec::Container(Box::new(spec))
    }
}

impl WorkerSpec {
    /// Names the worker (in logs and in `WHARF_WORKER_ID`).
    #[must_use]
    pub fn worker_id(self, id: impl Into<String>) -> Self {
        match self {
            WorkerSpec::Process(spec) => WorkerSpec::Process(spec.worker_id(id)),
            WorkerSpec::Container(spec) => WorkerSpec::Container(Box::new(spec.worker_id(id))),
        }
    }

    /// Names the pool and pool instance the worker belongs to (a container's `wharf.pool` and
    /// `wharf.instance` labels).
    pub fn set_pool(&mut self, pool: &str, instance: &str) {
        if let WorkerSpec::Container(spec) = self {
            spec.pool = pool.to_owned();
            spec.instance = instance.to_owned();
        }
    }

    /// Places a container worker on `engine` (a process worker runs here whatever it says).
    #[must_use]
    pub fn on_engine(self, engine: &crate::engine::Engine) -> Self {
        match self {
            WorkerSpec::Container(spec) => {
                WorkerSpec::Container(Box::new(spec.engine(engine.clone())))
            }
            other => other,
        }
    }

    /// Asks the worker to end by itself when it has heard nothing from the runtime for
    /// `after` (`WHARF_WATCHDOG_MS`; the protocol's watchdog, for workers the runtime may be
    /// cut off from). The runtime then pings it at least that often, held or not.
    #[must_use]
    pub fn watchdog(self, after: Duration) -> Self {
        let ms = after.as_millis().max(1).to_string();
        match self {
            WorkerSpec::Process(spec) => WorkerSpec::Process(spec.env(WATCHDOG_ENV, ms)),
            WorkerSpec::Container(spec) => {
                WorkerSpec::Container(Box::new(spec.env(WATCHDOG_ENV, ms)))
            }
        }
    }

    /// The watchdog the worker was asked to keep ([`WorkerSpec::watchdog`]), if any.
    pub fn watchdog_after(&self) -> Option<Duration> {
        let ms = match self {
            WorkerSpec::Process(spec) => spec
                .env
                .iter()
                .find(|(k, _)| k == WATCHDOG_ENV)
                .and_then(|(_, v)| v.to_str()?.parse().ok()),
            WorkerSpec::Container(spec) => spec
                .env
                .iter()
                .find(|(k, _)| k == WATCHDOG_ENV)
                .and_then(|(_, v)| v.parse().ok()),
        };
        ms.map(Duration::from_millis)
    }

    /// How long the worker may take to answer the init ping.
    pub fn init_timeout(&self) -> Duration {
        match self {
            WorkerSpec::Process(spec) => spec.init_timeout,
            WorkerSpec::Container(spec) => spec.init_timeout,
        }
    }

    /// Sets the init timeout.
    pub fn set_init_timeout(&mut self, timeout: Duration) {
        match self {
            WorkerSpec::Process(spec) => spec.init_timeout = timeout,
            WorkerSpec::Container(spec) => spec.init_timeout = timeout,
        }
    }

    /// The largest payload either side may send.
    pub fn max_frame(&self) -> usize {
        match self {
            WorkerSpec::Process(spec) => spec.max_frame,
            WorkerSpec::Container(spec) => spec.max_frame,
        }
    }

    /// Sets the largest payload either side may send.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        match self {
            WorkerSpec::Process(spec) => spec.max_frame = max_frame,
            WorkerSpec::Container(spec) => spec.max_frame = max_frame,
        }
    }

    /// What the worker runs, for error messages (a program, or an image).
    pub fn describe(&self) -> String {
        match self {
            WorkerSpec::Process(spec) => spec.program_name(),
            WorkerSpec::Container(spec) => format!("container image {}", spec.image),
        }
    }
}

/// What a worker said of itself in its init pong.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    /// Its process id as it sees it.
    pub pid: u32,
    /// The protocol version it speaks.
    pub version: u32,
    /// The methods it offers.
    pub methods: Vec<String>,
    /// How many calls it serves at once (1 unless its init pong declared more).
    pub max_concurrency: usize,
}

/// One event of a streamed call.
#[derive(Debug)]
pub enum StreamEvent {
    /// A chunk, in order.
    Chunk {
        /// Its position in the stream.
        seq: u64,
        /// The piece.
        body: Value,
    },
    /// The end of the stream: the call's result.
    End(Result<Value, PortError>),
}

/// The `call` message.
fn call_msg(
    id: u64,
    method: &str,
    body: Value,
    session: Option<String>,
    deadline_ms: Option<u64>,
) -> ToWorker {
    ToWorker::Call {
        id,
        method: method.to_owned(),
        body,
        session,
        deadline_ms,
    }
}

/// The events of one streamed call ([`Port::call_stream`]): its chunks, in order, then its end.
/// Dropped before the end, it sends the worker the protocol's `cancel` at once; the rest of
/// the stream is read and discarded.
pub struct StreamReceiver {
    rx: mpsc::Receiver<StreamEvent>,
    router: Arc<Router>,
    id: u64,
    ended: bool,
}

impl std::fmt::Debug for StreamReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReceiver")
            .field("id", &self.id)
            .field("ended", &self.ended)
            .finish()
    }
}

impl StreamReceiver {
    /// The next event; `None` once the stream has ended (or the port closed without an end).
    pub async fn recv(&mut self) -> Option<StreamEvent> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next event, as [`StreamReceiver::recv`] waits for it.
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<StreamEvent>> {
        if self.ended {
            return std::task::Poll::Ready(None);
        }
        let event = std::task::ready!(self.rx.poll_recv(cx));
        if !matches!(event, Some(StreamEvent::Chunk { .. })) {
            self.ended = true;
        }
        std::task::Poll::Ready(event)
    }

    /// How many events wait to be received (at most [`STREAM_BUFFER`]).
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether no event waits to be received.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

impl Drop for StreamReceiver {
    fn drop(&mut self) {
        if !self.ended {
            self.router.cancel_stream(self.id);
        }
    }
}

/// One running worker and its protocol channel.
///
/// Cheap operations take `&self`, so one port can serve a call while it is pinged or cancelled.
/// Dropping the port kills the worker.
pub struct Port {
    router: Arc<Router>,
    next_id: AtomicU64,
    pid: u32,
    info: WorkerInfo,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port")
            .field("worker_id", &self.router.worker_id)
            .field("pid", &self.pid)
            .finish()
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        // Kept in Drop so an actor that is killed (and skips its post_stop) still leaves no
        // worker behind.
        self.router.host.release();
    }
}

impl Port {
    /// Starts the worker and performs the init handshake; returns once the worker is ready.
    pub async fn start(spec: &WorkerSpec) -> Result<Port, PortError> {
        // One budget from the start request to the init pong (a container's connection and
        // its handshake share it).
        let began = std::time::Instant::now();
        let router = match spec {
            WorkerSpec::Process(spec) => process::launch(spec).await?,
            WorkerSpec::Container(spec) => container::launch(spec).await?,
        };
        let mut port = Port {
            pid: router.host.pid().unwrap_or(0),
            router,
            next_id: AtomicU64::new(1),
            info: WorkerInfo {
                pid: 0,
                version: PROTOCOL_VERSION,
                methods: Vec::new(),
                max_concurrency: 1,
            },
        };
        let left = spec.init_timeout().saturating_sub(began.elapsed());
        port.info = match port.handshake(left).await {
            Ok(info) => info,
            // Reported as the whole budget it was: the init timeout.
            Err(PortError::InitTimeout { info, .. }) => {
                return Err(PortError::InitTimeout {
                    after: spec.init_timeout(),
                    info,
                })
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(worker = %port.router.worker_id, pid = port.pid, "worker ready");
        Ok(port)
    }

    async fn handshake(&self, timeout: Duration) -> Result<WorkerInfo, PortError> {
        let (tx, rx) = oneshot::channel();
        self.router.register(0, Slot::Init(tx))?;
        let ping = ToWorker::Init {
            id: 0,
            version: PROTOCOL_VERSION,
        };
        // A worker that dies at once makes this write fail; the reader reports why, below.
        let _ = self.router.write(&ping, None).await;
        let pong = match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                self.router.close(PortError::Closed);
                let info = self.router.exit_info(Duration::from_secs(2)).await;
                return Err(PortError::InitTimeout {
                    after: timeout,
                    info,
                });
            }
            Ok(Err(_)) => return Err(PortError::Closed),
            Ok(Ok(Err(PortError::WorkerDied(_)))) => {
                let info = self.router.exit_info(Duration::from_secs(2)).await;
                return Err(PortError::ExitedBeforeReady(info));
            }
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Ok(Ok(pong))) => pong,
        };
        let max_concurrency = pong.max_concurrency().unwrap_or(1) as usize;
        match pong {
            FromWorker::InitPong {
                status: InitStatus::Ok,
                version,
                pid,
                methods,
                ..
            } => {
                if version != PROTOCOL_VERSION {
                    let err = PortError::IncompatibleVersion {
                        worker: version,
                        runtime: PROTOCOL_VERSION,
                    };
                    self.router.close(err.clone());
                    return Err(err);
                }
                Ok(WorkerInfo {
                    pid,
                    version,
                    methods,
                    max_concurrency,
                })
            }
            FromWorker::InitPong { message, .. } => {
                let err = PortError::InitRefused {
                    message: message.unwrap_or_else(|| "no reason given".into()),
                };
                self.router.close(err.clone());
                Err(err)
            }
            other => {
                let err = PortError::ProtocolViolation {
                    reason: format!("expected init_pong, got {other:?}"),
                };
                self.router.close(err.clone());
                Err(err)
            }
        }
    }

    /// Allocates a fresh request id.
    pub fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Calls `method` and waits for its one result. Chunks, if the worker streams, are a
    /// protocol violation here: use [`Port::call_stream`].
    ///
    /// If the caller stops waiting, the worker is sent the protocol's `cancel` for the call,
    /// and its reply is still read and discarded when it comes ([`Port::quiesce`] waits for
    /// it). A call dropped before its frame was written leaves nothing behind.
    pub async fn call(
        &self,
        id: u64,
        method: &str,
        body: Value,
        session: Option<String>,
        deadline_ms: Option<u64>,
    ) -> Result<Value, PortError> {
        let (tx, rx) = oneshot::channel();
        let msg = call_msg(id, method, body, session, deadline_ms);
        let request = Request::start(&self.router, id, Slot::Unary(tx), &msg).await?;
        let reply = rx.await.unwrap_or(Err(PortError::Closed));
        request.finish();
        reply
    }

    /// Calls `method` and returns its stream of chunks, ending with the call's result.
    ///
    /// At most [`STREAM_BUFFER`] events wait in the returned receiver: while it is full the
    /// port reads nothing more from the worker, and the worker blocks on its full channel.
    /// Dropping the receiver before the end sends the worker the protocol's `cancel`; the rest
    /// of the stream is read and discarded.
    pub async fn call_stream(
        &self,
        id: u64,
        method: &str,
        body: Value,
        session: Option<String>,
        deadline_ms: Option<u64>,
    ) -> Result<StreamReceiver, PortError> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let msg = call_msg(id, method, body, session, deadline_ms);
        let slot = Slot::Stream {
            tx,
            cancelled: false,
        };
        // From here the receiver owns the stream's end: it cancels the call if it goes first.
        Request::start(&self.router, id, slot, &msg).await?.finish();
        Ok(StreamReceiver {
            rx,
            router: self.router.clone(),
            id,
            ended: false,
        })
    }

    /// Pings the worker; fails if no pong comes within `timeout`. A pong that comes later is
    /// dropped: a ping that timed out does not keep the worker busy.
    pub async fn ping(&self, timeout: Duration) -> Result<(), PortError> {
        let id = self.next_request_id();
        let (tx, rx) = oneshot::channel();
        self.control(id, Slot::Ping(tx), rx, ToWorker::Ping { id }, timeout)
            .await
    }

    /// Asks the worker to drop all per-session state; waits for its answer up to `timeout`.
    pub async fn reset(&self, session: Option<String>, timeout: Duration) -> Result<(), PortError> {
        let id = self.next_request_id();
        let (tx, rx) = oneshot::channel();
        let msg = ToWorker::Reset { id, session };
        self.control(id, Slot::Reset(tx), rx, msg, timeout).await
    }

    async fn control(
        &self,
        id: u64,
        slot: Slot,
        rx: oneshot::Receiver<Result<(), PortError>>,
        msg: ToWorker,
        timeout: Duration,
    ) -> Result<(), PortError> {
        let request = Request::start(&self.router, id, slot, &msg).await?;
        let reply = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PortError::Closed),
            // `request` drops unfinished: the entry is abandoned.
            Err(_) => return Err(PortError::Timeout(timeout)),
        };
        request.finish();
        reply
    }

    /// Asks the worker to stop the call `id` early (best effort; its reply still comes).
    pub async fn cancel(&self, id: u64) -> Result<(), PortError> {
        self.router.write(&ToWorker::Cancel { id }, None).await
    }

    /// Sends the protocol's `shutdown` message (the worker should exit 0 without replying).
    pub async fn send_shutdown(&self) -> Result<(), PortError> {
        self.router
            .write(&ToWorker::Shutdown { id: None }, None)
            .await
    }

    /// Writes `bytes` to the worker's input as they are, outside the framing: for conformance
    /// tests that must send malformed input (a header over the worker's max frame, garbage
    /// MessagePack). Frames queued by earlier sends go first. Nothing is registered, so no
    /// reply is expected; [`PortError::Closed`] if the channel is closed or the write fails
    /// (the worker is gone).
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), PortError> {
        self.router.send_raw(bytes).await
    }

    /// Closes the runtime's end of the channel: the worker's EOF, its dead-man switch.
    pub async fn close_channel(&self) {
        self.router.close_channel().await;
    }

    /// Waits up to `limit` for the worker to exit; its status if it did.
    pub async fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        self.router.wait_exit(limit).await
    }

    /// How the worker ended: waits up to `limit` for its exit, then briefly for its last
    /// stderr lines.
    pub async fn exit_info(&self, limit: Duration) -> ExitInfo {
        self.router.exit_info(limit).await
    }

    /// Stops the worker gracefully: `shutdown` message, `grace`, the host's termination
    /// (SIGTERM to the group), `grace`, then a kill. Always waits for the exit (bounded);
    /// returns how the worker ended.
    pub async fn stop(&self, grace: Duration) -> ExitInfo {
        let _ = tokio::time::timeout(grace, self.send_shutdown()).await;
        let _ = tokio::time::timeout(grace, self.close_channel()).await;
        let mut status = self.router.wait_exit(grace).await;
        if status.is_none() {
            self.router.host.terminate();
            status = self.router.wait_exit(grace).await;
        }
        // Kill in any case: grandchildren may outlive the leader.
        self.router.host.kill();
        if status.is_none() {
            status = self.router.wait_exit(Duration::from_secs(5)).await;
        }
        self.router.close(PortError::Closed);
        ExitInfo {
            status,
            ..self.router.exit_now()
        }
    }

    /// Kills the worker now and fails every request in flight with `reason`. Synchronous, for
    /// Drop guards and for callers that must not wait ([`Port::exit_info`] waits for the end).
    /// If the worker had already exited by itself, requests in flight learn how it ended
    /// instead.
    pub fn kill(&self, reason: PortError) {
        let reason = match (reason, self.exit_status()) {
            (PortError::Closed, Some(_)) => PortError::WorkerDied(self.router.exit_now()),
            (reason, _) => reason,
        };
        self.router.close(reason);
    }

    /// The worker's OS process id as the runtime sees it (its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the worker said of itself in its init pong.
    pub fn info(&self) -> &WorkerInfo {
        &self.info
    }

    /// The worker's name in logs.
    pub fn worker_id(&self) -> &str {
        &self.router.worker_id
    }

    /// Whether the port still accepts requests (the worker is alive and nothing broke).
    pub fn is_open(&self) -> bool {
        self.router.is_open()
    }

    /// Why the port closed, if it did.
    pub fn close_reason(&self) -> Option<PortError> {
        self.router.close_reason()
    }

    /// How many requests are waiting for a reply.
    pub fn in_flight(&self) -> usize {
        self.router.in_flight()
    }

    /// Waits until no request is in flight (every reply has come, or the port closed). Frames
    /// still buffered by an abandoned send are flushed first, so their replies can come.
    pub async fn quiesce(&self) {
        self.router.flush().await;
        loop {
            let settled = self.router.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            settled.await;
        }
    }

    /// Whether the request `id` is still in flight (its reply has not come).
    pub fn is_in_flight(&self, id: u64) -> bool {
        self.router.in_flight_id(id)
    }

    /// Waits until the request `id` is no longer in flight: its reply has come (a cancelled
    /// call's too) or the port closed. Frames still buffered by an abandoned send are flushed
    /// first, so its reply can come.
    pub async fn settle(&self, id: u64) {
        self.router.flush().await;
        loop {
            let settled = self.router.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if !self.router.in_flight_id(id) {
                return;
            }
            settled.await;
        }
    }

    /// The exit status, once the worker has ended.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.router.exit.borrow()
    }

    /// Waits until the worker has ended.
    pub async fn closed(&self) {
        let mut exit = self.router.exit.clone();
        let _ = exit.wait_for(Option::is_some).await;
    }

    /// Waits up to `limit` for the reader to finish with the channel: after the worker exits,
    /// the reader may still hold its last bytes (a truncated frame, a violation) and reports
    /// them as the port's close reason, which should win over a plain "worker died".
    pub async fn reader_finished(&self, limit: Duration) {
        let mut done = self.router.reader_done.clone();
        let _ = tokio::time::timeout(limit, done.wait_for(|d| *d)).await;
    }

    /// A future, independent of the port's lifetime, that completes once the worker has ended.
    pub fn closed_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut exit = self.router.exit.clone();
        async move {
            let _ = exit.wait_for(Option::is_some).await;
        }
    }

    /// The last lines the worker wrote to stderr.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.router.stderr.lines()
    }

    /// How the worker ended, as far as is known now (no waiting).
    pub fn exit_now(&self) -> ExitInfo {
        self.router.exit_now()
    }
}
