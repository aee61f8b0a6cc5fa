//! The request router: one worker's protocol channel, whatever runs the worker.
//!
//! A [`Router`] owns the channel's two ends once a port has made them (pipes to a process, a
//! unix socket, Docker's attach stream): one writer that every request goes through, and a
//! reader task that routes each frame from the worker to the request it answers, by id. It
//! keeps the requests in flight, and what "in flight" means is exact (see [`Request`]): a
//! request dropped before its frame was buffered leaves nothing, an abandoned call is sent
//! `cancel` and awaited, a control request that timed out is dropped from the count, a stream
//! is in flight from its request to its end. Any violation, or EOF, closes the router for good:
//! every request in flight fails with a typed error and the worker is killed through its
//! [`Host`]. It never resynchronises a broken stream.

use std::collections::HashMap;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, FramedWrite};
use wharf_protocol::message::{FromWorker, ToWorker, Value};
use wharf_protocol::MessageCodec;

use super::error::{ExitInfo, PortError};
use super::logs::Tail;
use super::StreamEvent;

/// How long an error report waits for a dead worker's last stderr lines.
const STDERR_EOF_WAIT: Duration = Duration::from_millis(200);

/// How long a worker that closed its channel may take to exit before it is killed.
const EOF_EXIT_GRACE: Duration = Duration::from_millis(500);

/// What runs a worker — a process group, a container — as its router and port see it: how to
/// stop it, and what to let go of at the end. Every method returns at once; a host whose
/// operations take time (an engine's API) runs them in tasks of its own. How the worker ended
/// is published on the exit channel the host was made with.
pub(crate) trait Host: Send + Sync + 'static {
    /// Asks the worker to stop (SIGTERM to its group; the container's stop signal).
    fn terminate(&self);
    /// Kills the worker at once (SIGKILL to its group; the container killed).
    fn kill(&self);
    /// The port is gone: the last kill, then let go of whatever the host holds.
    fn release(&self);
    /// The worker's process id as the runtime sees it, if it has one here.
    fn pid(&self) -> Option<u32>;
    /// Whether the worker was killed for exceeding its memory limit (known once it ended).
    fn oom_killed(&self) -> bool {
        false
    }
}

pub(crate) type Writer =
    FramedWrite<Box<dyn AsyncWrite + Send + Unpin>, MessageCodec<FromWorker, ToWorker>>;
pub(crate) type Reader =
    FramedRead<Box<dyn AsyncRead + Send + Unpin>, MessageCodec<FromWorker, ToWorker>>;

/// Where a reply goes.
pub(crate) enum Slot {
    Init(oneshot::Sender<Result<FromWorker, PortError>>),
    Unary(oneshot::Sender<Result<Value, PortError>>),
    /// A streamed call: chunks go through a bounded channel, so a consumer that stops reading
    /// stops the reader, and the pipe pushes back on the worker. `cancelled` once the runtime
    /// has asked the worker to stop it (its consumer went away).
    Stream {
        tx: mpsc::Sender<StreamEvent>,
        cancelled: bool,
    },
    /// A ping (answered only by `pong`) or a reset (answered by `ok` or `error`).
    Ping(oneshot::Sender<Result<(), PortError>>),
    Reset(oneshot::Sender<Result<(), PortError>>),
    /// A ping or reset whose waiter gave up (it timed out or was cancelled): its reply, if it
    /// ever comes, is read and dropped. It does not count as a request in flight, so a worker
    /// slow to answer control messages is never taken for one with a call stuck on it.
    Abandoned,
}

impl Slot {
    /// Whether this entry makes the worker busy. A ping does not: its pong changes nothing in
    /// the worker, so a pending ping must never keep a worker draining (a health ping sent
    /// just before a caller took the worker would otherwise hold it, and a worker slow to pong
    /// would be killed as if a call were stuck on it). Nor does an abandoned request.
    fn counts(&self) -> bool {
        !matches!(self, Slot::Abandoned | Slot::Ping(_))
    }

    fn fail(self, err: PortError) {
        match self {
            Slot::Init(tx) => drop(tx.send(Err(err))),
            Slot::Unary(tx) => drop(tx.send(Err(err))),
            // A full buffer drops the final error: the consumer then reads the chunks it has,
            // sees the stream close and asks the port why (`close_reason`).
            Slot::Stream { tx, .. } => drop(tx.try_send(StreamEvent::End(Err(err)))),
            Slot::Ping(tx) | Slot::Reset(tx) => drop(tx.send(Err(err))),
            Slot::Abandoned => {}
        }
    }
}

/// How many chunks of one stream wait for their consumer before the reader stops reading.
pub const STREAM_BUFFER: usize = 16;

/// Requests in flight, and why the port closed if it did.
#[derive(Default)]
struct Pending {
    slots: HashMap<u64, Slot>,
    /// Abandoned entries, oldest first, so a worker that never answers cannot grow `slots`
    /// without bound.
    abandoned: std::collections::VecDeque<u64>,
    closed: Option<PortError>,
}

/// The most abandoned entries kept; older ones are forgotten (a reply to one of them is then a
/// reply with an unknown id: a worker that leaves this many requests unanswered is broken).
const MAX_ABANDONED: usize = 1024;

/// One worker's channel, its requests in flight, and how it ended.
pub(crate) struct Router {
    pub(crate) worker_id: String,
    pending: Mutex<Pending>,
    /// `None` once the channel is closed (the worker's EOF).
    writer: tokio::sync::Mutex<Option<Writer>>,
    pub(crate) host: Arc<dyn Host>,
    pub(crate) exit: watch::Receiver<Option<ExitStatus>>,
    pub(crate) stderr: Tail,
    /// Woken whenever a request leaves `pending`.
    pub(crate) settled: tokio::sync::Notify,
    /// False once the router is closed or the worker has exited (read on every checkout).
    open: Arc<AtomicBool>,
    /// How many requests in `pending` count as in flight (read on every checkin).
    in_flight: AtomicUsize,
    /// True once the reader has stopped (and has reported what it saw, if anything).
    pub(crate) reader_done: watch::Receiver<bool>,
    /// True once the router is closed: ends a reader's wait for a stream's consumer.
    poisoned: watch::Sender<bool>,
}

/// The parts a port hands a new router.
pub(crate) struct Channel {
    /// Frames from the worker.
    pub input: Box<dyn AsyncRead + Send + Unpin>,
    /// Frames to the worker.
    pub output: Box<dyn AsyncWrite + Send + Unpin>,
    /// The largest payload either side may send.
    pub max_frame: usize,
}

impl Router {
    /// Starts routing `channel` for the worker `host` runs. `exit` publishes how the worker
    /// ended; `open` is cleared by whoever sees it end first (the router when it closes, the
    /// host when the worker exits).
    pub(crate) fn start(
        worker_id: String,
        channel: Channel,
        host: Arc<dyn Host>,
        exit: watch::Receiver<Option<ExitStatus>>,
        stderr: Tail,
        open: Arc<AtomicBool>,
    ) -> Arc<Router> {
        let (reader_done_tx, reader_done) = watch::channel(false);
        let codec = MessageCodec::<FromWorker, ToWorker>::new(channel.max_frame);
        let router = Arc::new(Router {
            worker_id,
            pending: Mutex::new(Pending::default()),
            writer: tokio::sync::Mutex::new(Some(FramedWrite::new(channel.output, codec.clone()))),
            host,
            exit,
            stderr,
            settled: tokio::sync::Notify::new(),
            open,
            in_flight: AtomicUsize::new(0),
            reader_done,
            poisoned: watch::channel(false).0,
        });
        tokio::spawn(read_loop(
            FramedRead::new(channel.input, codec),
            router.clone(),
            reader_done_tx,
        ));
        router
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the router still takes requests (the worker is alive and nothing broke).
    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// How many requests count as in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Why the router closed, if it did.
    pub(crate) fn close_reason(&self) -> Option<PortError> {
        self.pending().closed.clone()
    }

    /// Waits up to `limit` for the worker to end; returns its status if it did.
    pub(crate) async fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        let mut exit = self.exit.clone();
        let ended = tokio::time::timeout(limit, exit.wait_for(Option::is_some)).await;
        match ended {
            Ok(Ok(status)) => *status,
            _ => *self.exit.borrow(),
        }
    }

    /// How the worker ended, waiting up to `limit` for it to end and briefly for its last
    /// stderr lines.
    pub(crate) async fn exit_info(&self, limit: Duration) -> ExitInfo {
        let status = self.wait_exit(limit).await;
        // The last stderr lines may still be in the pipe when the exit is seen: give the
        // forwarder a moment to reach EOF (a grandchild holding stderr open only costs the wait).
        self.stderr.wait_eof(STDERR_EOF_WAIT).await;
        ExitInfo {
            status,
            stderr_tail: self.stderr.lines(),
            oom_killed: self.host.oom_killed(),
        }
    }

    /// How the worker ended, as far as is known now.
    pub(crate) fn exit_now(&self) -> ExitInfo {
        ExitInfo {
            status: *self.exit.borrow(),
            stderr_tail: self.stderr.lines(),
            oom_killed: self.host.oom_killed(),
        }
    }

    pub(crate) fn register(&self, id: u64, slot: Slot) -> Result<(), PortError> {
        let mut pending = self.pending();
        if let Some(err) = &pending.closed {
            return Err(err.clone());
        }
        if slot.counts() {
            self.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(old) = pending.slots.insert(id, slot) {
            // An id reused while its old entry still waits (only an abandoned control request
            // can still be there): the old one is gone for good.
            if old.counts() {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    /// Removes the entry `id`; returns it.
    fn take(&self, pending: &mut Pending, id: u64) -> Option<Slot> {
        let slot = pending.slots.remove(&id)?;
        if slot.counts() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        Some(slot)
    }

    fn unregister(&self, id: u64) {
        let _ = self.take(&mut self.pending(), id);
        self.settled.notify_waiters();
    }

    /// Turns a control request whose waiter gave up into an [`Slot::Abandoned`] entry.
    fn abandon(&self, id: u64) {
        let mut pending = self.pending();
        let Some(slot) = pending.slots.get_mut(&id) else {
            return;
        };
        if matches!(slot, Slot::Abandoned) {
            return;
        }
        if std::mem::replace(slot, Slot::Abandoned).counts() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        pending.abandoned.push_back(id);
        while pending.abandoned.len() > MAX_ABANDONED {
            if let Some(old) = pending.abandoned.pop_front() {
                if matches!(pending.slots.get(&old), Some(Slot::Abandoned)) {
                    pending.slots.remove(&old);
                }
            }
        }
        drop(pending);
        self.settled.notify_waiters();
    }

    /// Whether a request is still waiting for its reply (and someone for it).
    fn is_pending(&self, id: u64) -> bool {
        matches!(self.pending().slots.get(&id), Some(slot) if !matches!(slot, Slot::Abandoned))
    }

    /// Whether request `id` counts as in flight (its reply has not come).
    pub(crate) fn in_flight_id(&self, id: u64) -> bool {
        matches!(self.pending().slots.get(&id), Some(slot) if slot.counts())
    }

    /// The consumer of stream `id` is gone before its end: ask the worker to stop it (once).
    pub(crate) fn cancel_stream(self: &Arc<Self>, id: u64) {
        let first = {
            let mut pending = self.pending();
            match pending.slots.get_mut(&id) {
                Some(Slot::Stream { cancelled, .. }) if !*cancelled => {
                    *cancelled = true;
                    true
                }
                _ => false,
            }
        };
        if first {
            self.cancel_later(id);
        }
    }

    /// Writes one message. `buffered` is marked sent once the frame is in the writer's buffer:
    /// from then on it reaches the worker even if this future is dropped (the next write or
    /// [`Router::flush`] sends it).
    pub(crate) async fn write(
        &self,
        msg: &ToWorker,
        buffered: Option<&mut Request<'_>>,
    ) -> Result<(), PortError> {
        let mut guard = self.writer.lock().await;
        let Some(writer) = guard.as_mut() else {
            return Err(PortError::Closed);
        };
        let written = match writer.feed(msg).await {
            Ok(()) => {
                if let Some(request) = buffered {
                    request.sent = true;
                }
                writer.flush().await
            }
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => Ok(()),
            Err(e) if e.is_violation() => Err(PortError::from_protocol(&e)),
            Err(_) => {
                // The worker is gone (broken pipe): report it as the reader will.
                drop(guard);
                let info = self.exit_info(Duration::from_secs(1)).await;
                let err = PortError::WorkerDied(info);
                self.close(err.clone());
                Err(err)
            }
        }
    }

    /// Sends frames still buffered by an abandoned write.
    pub(crate) async fn flush(&self) {
        if let Some(writer) = self.writer.lock().await.as_mut() {
            let _ = writer.flush().await;
        }
    }

    /// Writes `bytes` as they are, outside the framing, after the frames already buffered.
    pub(crate) async fn send_raw(&self, bytes: &[u8]) -> Result<(), PortError> {
        use tokio::io::AsyncWriteExt;
        let mut guard = self.writer.lock().await;
        let writer = guard.as_mut().ok_or(PortError::Closed)?;
        writer.flush().await.map_err(|_| PortError::Closed)?;
        let raw = writer.get_mut();
        raw.write_all(bytes).await.map_err(|_| PortError::Closed)?;
        raw.flush().await.map_err(|_| PortError::Closed)
    }

    /// Closes our end of the channel (the worker's EOF), after flushing what is buffered.
    pub(crate) async fn close_channel(&self) {
        if let Some(mut writer) = self.writer.lock().await.take() {
            // Flush, then shut the write side down: a half-close is what carries EOF over a
            // socket or Docker's attach stream (dropping alone may not); dropping the writer
            // then closes a pipe.
            let _ = writer.close().await;
        }
    }

    /// Asks the worker to stop call `id`, from a task of its own (the caller that gave up may
    /// be a destructor, or the reader, which must never wait for the writer).
    fn cancel_later(self: &Arc<Self>, id: u64) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let router = self.clone();
        rt.spawn(async move {
            if router.is_pending(id) {
                let _ = router.write(&ToWorker::Cancel { id }, None).await;
            }
        });
    }

    /// Closes the router for good: fails every request in flight with `err`, then kills the
    /// worker. The requests are failed before the worker is killed, so the first reason wins:
    /// a kill's own consequences (the exit, the actor's cleanup) can never overtake it with a
    /// vaguer "worker died".
    pub(crate) fn close(&self, err: PortError) {
        let slots = {
            let mut pending = self.pending();
            if pending.closed.is_none() {
                pending.closed = Some(err.clone());
            }
            self.open.store(false, Ordering::Release);
            self.in_flight.store(0, Ordering::Release);
            std::mem::take(&mut pending.slots)
        };
        for (_, slot) in slots {
            slot.fail(err.clone());
        }
        self.poisoned.send_replace(true);
        self.host.kill();
        self.settled.notify_waiters();
    }
}

/// One request on its way, from registration to reply. Dropped early, it undoes what would
/// otherwise stay behind: an entry never sent is removed; a call already sent is cancelled
/// (the protocol's `cancel`; its reply is still awaited, so the worker is clean when it comes);
/// a control request already sent is abandoned (its late reply is dropped).
pub(crate) struct Request<'a> {
    router: &'a Arc<Router>,
    id: u64,
    /// The frame is in the writer's buffer.
    sent: bool,
    /// The reply came (or the port closed): nothing to undo.
    done: bool,
    /// A call (cancelled when abandoned) rather than a control request (abandoned).
    call: bool,
}

impl<'a> Request<'a> {
    /// Registers `slot` under `id` and sends `msg`.
    pub(crate) async fn start(
        router: &'a Arc<Router>,
        id: u64,
        slot: Slot,
        msg: &ToWorker,
    ) -> Result<Request<'a>, PortError> {
        let call = matches!(slot, Slot::Unary(_) | Slot::Stream { .. });
        router.register(id, slot)?;
        let mut request = Request {
            router,
            id,
            sent: false,
            done: false,
            call,
        };
        match router.write(msg, Some(&mut request)).await {
            Ok(()) => Ok(request),
            Err(e) => {
                // Nothing of it reached the worker (or the port is closed): forget it.
                request.sent = false;
                Err(e)
            }
        }
    }

    /// The reply came: nothing to undo.
    pub(crate) fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if !self.sent {
            self.router.unregister(self.id);
        } else if self.call {
            self.router.cancel_later(self.id);
        } else {
            self.router.abandon(self.id);
        }
    }
}

/// What the reader does with one frame once it is routed.
enum Delivery {
    /// Nothing more.
    Done,
    /// Hand this event to a stream's consumer, waiting while its buffer is full.
    Stream {
        id: u64,
        tx: mpsc::Sender<StreamEvent>,
        event: StreamEvent,
    },
}

/// Routes every frame from the worker to the request it answers; poisons the port on any
/// violation or on EOF.
async fn read_loop(mut frames: Reader, router: Arc<Router>, done: watch::Sender<bool>) {
    let failure = loop {
        let msg = match frames.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(e)) if e.is_violation() => {
                break PortError::ProtocolViolation {
                    reason: e.to_string(),
                }
            }
            // EOF, or the channel failed under us (a connection reset by a dying worker): the
            // worker's end, not a violation.
            _ => {
                // The worker closed its channel: it is exiting, or it is useless. Give an exit
                // a moment to finish (a worker may close its fds just before it exits), then
                // make sure, and tell every waiter how it ended.
                if router.wait_exit(EOF_EXIT_GRACE).await.is_none() {
                    router.host.kill();
                }
                let info = router.exit_info(Duration::from_secs(2)).await;
                break PortError::WorkerDied(info);
            }
        };
        let routed = route(&router, msg);
        router.settled.notify_waiters();
        match routed {
            Ok(Delivery::Done) => {}
            Ok(Delivery::Stream { id, tx, event }) => deliver(&router, id, tx, event).await,
            Err(violation) => break violation,
        }
    };
    tracing::debug!(worker = %router.worker_id, error = %failure, "worker channel closed");
    router.close(failure);
    let _ = done.send(true);
}

/// Hands a stream event to its consumer. While the consumer's buffer is full the reader waits
/// here, reading nothing: backpressure reaches the worker through the pipe. If the port is
/// poisoned meanwhile (the worker was killed) the wait ends and the event is dropped. If the
/// consumer is gone, the call is cancelled once and the rest of the stream is dropped as it
/// comes.
async fn deliver(router: &Arc<Router>, id: u64, tx: mpsc::Sender<StreamEvent>, event: StreamEvent) {
    let end = matches!(event, StreamEvent::End(_));
    let mut poisoned = router.poisoned.subscribe();
    let permit = tokio::select! {
        biased;
        permit = tx.reserve() => permit,
        _ = poisoned.wait_for(|p| *p) => return,
    };
    match permit {
        Ok(permit) => permit.send(event),
        Err(_) if end => {}
        Err(_) => router.cancel_stream(id),
    }
}

fn route(router: &Router, msg: FromWorker) -> Result<Delivery, PortError> {
    let id = msg.id();
    let mut pending = router.pending();
    // A chunk leaves its stream's entry in place: the call stays in flight until its end.
    if let FromWorker::Chunk { seq, body, .. } = msg {
        return match pending.slots.get(&id) {
            Some(Slot::Stream { tx, .. }) => Ok(Delivery::Stream {
                id,
                tx: tx.clone(),
                event: StreamEvent::Chunk { seq, body },
            }),
            Some(Slot::Abandoned) | None => Err(PortError::ProtocolViolation {
                reason: format!("chunk with unknown request id {id}"),
            }),
            Some(_) => {
                let reason = format!("unexpected chunk for request {id}");
                if let Some(slot) = router.take(&mut pending, id) {
                    drop(pending);
                    slot.fail(PortError::ProtocolViolation {
                        reason: reason.clone(),
                    });
                }
                Err(PortError::ProtocolViolation { reason })
            }
        };
    }
    let Some(slot) = router.take(&mut pending, id) else {
        return Err(PortError::ProtocolViolation {
            reason: format!("reply with unknown request id {id}: {}", describe(&msg)),
        });
    };
    drop(pending);
    match (slot, msg) {
        (Slot::Stream { tx, .. }, FromWorker::Ok { body, .. }) => {
            return Ok(Delivery::Stream {
                id,
                tx,
                event: StreamEvent::End(Ok(body)),
            });
        }
        (Slot::Stream { tx, .. }, FromWorker::Error { kind, message, .. }) => {
            return Ok(Delivery::Stream {
                id,
                tx,
                event: StreamEvent::End(Err(PortError::Remote { kind, message })),
            });
        }
        (Slot::Unary(tx), FromWorker::Ok { body, .. }) => {
            let _ = tx.send(Ok(body));
        }
        (Slot::Unary(tx), FromWorker::Error { kind, message, .. }) => {
            let _ = tx.send(Err(PortError::Remote { kind, message }));
        }
        (Slot::Ping(tx), FromWorker::Pong { .. })
        | (
            Slot::Reset(tx),
            FromWorker::Ok {
                body: Value::Nil, ..
            },
        ) => {
            let _ = tx.send(Ok(()));
        }
        (Slot::Reset(tx), FromWorker::Error { kind, message, .. }) => {
            let _ = tx.send(Err(PortError::Remote { kind, message }));
        }
        (Slot::Init(tx), msg @ FromWorker::InitPong { .. }) => {
            let _ = tx.send(Ok(msg));
        }
        // The late answer to a ping or reset nobody waits for any more.
        (
            Slot::Abandoned,
            FromWorker::Pong { .. } | FromWorker::Ok { .. } | FromWorker::Error { .. },
        ) => {}
        (slot, msg) => {
            let reason = match (&slot, &msg) {
                (Slot::Reset(_), FromWorker::Ok { .. }) => {
                    format!("ok with a non-nil body for reset {id} (a reset's ok carries nil)")
                }
                _ => format!("unexpected {} for request {id}", describe(&msg)),
            };
            slot.fail(PortError::ProtocolViolation {
                reason: reason.clone(),
            });
            return Err(PortError::ProtocolViolation { reason });
        }
    }
    Ok(Delivery::Done)
}

fn describe(msg: &FromWorker) -> &'static str {
    match msg {
        FromWorker::InitPong { .. } => "init_pong",
        FromWorker::Ok { .. } => "ok",
        FromWorker::Error { .. } => "error",
        FromWorker::Chunk { .. } => "chunk",
        FromWorker::Pong { .. } => "pong",
    }
}
