//! A small Rust worker SDK: register handlers, then [`Worker::serve`] them on the channel the
//! runtime set up (fds 3/4; stdin/stdout in `stdio` mode; a unix socket or a FIFO pair for a
//! container worker), following `docs/protocol.md`.
//!
//! Handlers run one at a time on the serving thread. [`Worker::serve`] reads the runtime's
//! messages ahead on a reader thread, so a handler can honour `cancel` and `deadline_ms` by
//! polling [`Call::check`] (or sleeping with [`Call::sleep`]) between steps of its work; EOF,
//! `shutdown` and a violation received cancel the running call too. Serving ends with `Ok` on
//! EOF or `shutdown` (exit 0) and with an error on a violation (exit non-zero).
//!
//! A worker may serve several calls at once: [`Worker::max_concurrency`] declares how many in
//! its init pong, and methods registered with [`Worker::concurrent_method`] (`Fn + Send +
//! Sync`) then run on that many handler threads, their replies written as they finish, in any
//! order (request ids route them).
//!
//! ```no_run
//! use wharf_protocol::worker::{Worker, Value};
//!
//! Worker::new()
//!     .method("echo", |call| Ok(call.body.clone()))
//!     .serve()
//!     .expect("worker failed");
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::error::ProtocolError;
use crate::frame::{decode, encode, read_frame, DEFAULT_MAX_FRAME};
use crate::message::{kinds, FromWorker, InitStatus, ToWorker, PROTOCOL_VERSION};

pub use crate::message::Value;

/// What a handler sees of one call.
///
/// Cancellation is cooperative: a handler that wants to honour `cancel` and `deadline_ms`
/// polls [`Call::check`] (or sleeps with [`Call::sleep`]) between steps of its work. Under
/// [`Worker::serve`] (and [`Worker::serve_on_threaded`]) a reader thread reads the runtime's
/// messages while a call runs, so a `cancel` is seen at once; under [`Worker::serve_on`] input
/// is read only between calls, and a call is never seen cancelled.
#[derive(Debug, Clone)]
pub struct Call {
    /// Request id.
    pub id: u64,
    /// Method name.
    pub method: String,
    /// Argument.
    pub body: Value,
    /// Session the call belongs to, if any.
    pub session: Option<String>,
    /// The caller's remaining budget in milliseconds.
    pub deadline_ms: Option<u64>,
    /// When the call was read: `deadline_ms` counts from here.
    received: Instant,
    /// Set once the runtime cancels the call (or closes the channel, or asks for shutdown).
    cancelled: Arc<AtomicBool>,
}

impl Call {
    /// A call as the runtime would send it, without session or deadline (set the public
    /// fields for those): for testing handlers. It is never cancelled.
    pub fn new(id: u64, method: impl Into<String>, body: Value) -> Self {
        Self {
            id,
            method: method.into(),
            body,
            session: None,
            deadline_ms: None,
            received: Instant::now(),
            cancelled: Arc::default(),
        }
    }

    /// Whether the runtime has cancelled this call (or closed the channel, or sent
    /// `shutdown`, or broken the protocol: in every case its reply is no longer wanted).
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Time left before `deadline_ms` runs out (zero once it has); `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        let budget = Duration::from_millis(self.deadline_ms?);
        Some(budget.saturating_sub(self.received.elapsed()))
    }

    /// `Err` with kind `cancelled` if the call was cancelled, with kind `deadline_exceeded` if
    /// its deadline has run out; a handler returns it to end the call early.
    pub fn check(&self) -> Result<(), HandlerError> {
        if self.is_cancelled() {
            return Err(HandlerError::new(
                kinds::CANCELLED,
                format!("call {} was cancelled", self.id),
            ));
        }
        if self.remaining() == Some(Duration::ZERO) {
            return Err(HandlerError::new(
                kinds::DEADLINE_EXCEEDED,
                format!(
                    "call {} ran out of its deadline_ms ({})",
                    self.id,
                    self.deadline_ms.unwrap_or_default()
                ),
            ));
        }
        Ok(())
    }

    /// Sleeps up to `duration`, ending early with [`Call::check`]'s error as soon as the call
    /// is cancelled or out of time (polled every few milliseconds).
    pub fn sleep(&self, duration: Duration) -> Result<(), HandlerError> {
        const POLL: Duration = Duration::from_millis(5);
        let end = Instant::now() + duration;
        loop {
            self.check()?;
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            let mut step = (end - now).min(POLL);
            if let Some(left) = self.remaining() {
                step = step.min(left.max(Duration::from_millis(1)));
            }
            std::thread::sleep(step);
        }
    }
}

/// One message from the runtime, as the serving loop takes it.
struct Incoming {
    msg: ToWorker,
    received: Instant,
    cancelled: Arc<AtomicBool>,
}

impl Incoming {
    fn new(msg: ToWorker) -> Self {
        Self {
            msg,
            received: Instant::now(),
            cancelled: Arc::default(),
        }
    }
}

/// What the serving loop handles next: a message from the runtime, or a call that a handler
/// thread finished.
enum Step {
    Message(Incoming),
    Finished {
        id: u64,
        result: Result<Value, HandlerError>,
    },
}

type Events = mpsc::Sender<Result<Option<Step>, ProtocolError>>;

/// The handler threads of a worker serving several calls at once: they take calls of
/// concurrent methods from a queue and send each result back to the serving loop, which alone
/// writes to the channel.
struct HandlerThreads {
    jobs: mpsc::Sender<(Shared, Call)>,
    /// What the init pong declares.
    declared: u32,
}

impl HandlerThreads {
    /// Starts `max_concurrency` threads if the worker serves several calls at once.
    fn start(worker: &Worker, events: &Events) -> Result<Option<Self>, ServeError> {
        let n = worker.max_concurrency;
        if n <= 1 {
            return Ok(None);
        }
        let declared = u32::try_from(n)
            .map_err(|_| ServeError::Config(format!("max_concurrency {n} is too large")))?;
        let (jobs, queue) = mpsc::channel::<(Shared, Call)>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..n {
            let (queue, events) = (queue.clone(), events.clone());
            std::thread::Builder::new()
                .name(format!("wharf-handler-{i}"))
                .spawn(move || loop {
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((handler, call)) = job else {
                        return;
                    };
                    let result = run_caught(handler.as_ref(), &call);
                    let finished = Step::Finished {
                        id: call.id,
                        result,
                    };
                    if events.send(Ok(Some(finished))).is_err() {
                        return;
                    }
                })
                .map_err(|e| ServeError::Config(format!("cannot start a handler thread: {e}")))?;
        }
        Ok(Some(Self { jobs, declared }))
    }

    /// Queues a call for the next free handler thread.
    fn run(&self, handler: Shared, call: Call) {
        // The threads end only once this sender is dropped.
        let _ = self.jobs.send((handler, call));
    }
}

/// Runs a concurrent method's handler; a panic becomes an error of kind `panic`.
fn run_caught(
    handler: &(dyn Fn(&Call) -> Result<Value, HandlerError> + Send + Sync),
    call: &Call,
) -> Result<Value, HandlerError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(call))).unwrap_or_else(
        |panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the handler panicked".to_owned());
            Err(HandlerError::new("panic", message))
        },
    )
}

/// An error a handler returns: becomes an `error` reply; the worker keeps serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// Error kind, e.g. `bad_request` or a type name.
    pub kind: String,
    /// Human-readable description.
    pub message: String,
}

impl HandlerError {
    /// A handler error of the given kind.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: message.into(),
        }
    }
}

/// Why [`Worker::serve`] stopped other than by a clean EOF or `shutdown`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The environment describes a channel that cannot be used.
    #[error("bad channel configuration: {0}")]
    Config(String),
    /// The init hook failed; the init pong reported it.
    #[error("init failed: {0}")]
    Init(String),
    /// The runtime broke the protocol, or the channel failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Sends the chunks of a streamed result.
pub struct ChunkSink<'a> {
    out: &'a mut dyn Write,
    id: u64,
    seq: u64,
    max_frame: usize,
}

impl ChunkSink<'_> {
    /// Sends one chunk. A chunk that is refused (too large for max_frame) uses up no `seq`.
    pub fn send(&mut self, body: Value) -> Result<(), ProtocolError> {
        let msg = FromWorker::Chunk {
            id: self.id,
            seq: self.seq,
            body,
        };
        write_msg(self.out, &msg, self.max_frame)?;
        self.seq += 1;
        Ok(())
    }
}

type Unary = Box<dyn FnMut(&Call) -> Result<Value, HandlerError>>;
type Shared = Arc<dyn Fn(&Call) -> Result<Value, HandlerError> + Send + Sync>;
type Streaming = Box<dyn FnMut(&Call, &mut ChunkSink<'_>) -> Result<Value, HandlerError>>;
type Hook = Box<dyn FnMut() -> Result<(), HandlerError>>;

enum Handler {
    Unary(Unary),
    Streaming(Streaming),
    /// May run on a handler thread, beside other calls.
    Concurrent(Shared),
}

/// A worker: a set of handlers and hooks, served with [`Worker::serve`].
#[derive(Default)]
pub struct Worker {
    handlers: BTreeMap<String, Handler>,
    on_init: Vec<Hook>,
    on_reset: Vec<Hook>,
    /// Calls served at once (0 and 1: one at a time).
    max_concurrency: usize,
    /// End after this long without a message while waiting for one ([`Worker::watchdog`]).
    watchdog: Option<Duration>,
}

impl Worker {
    /// A worker with no methods yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a method whose handler returns one result.
    #[must_use]
    pub fn method<F>(mut self, name: &str, handler: F) -> Self
    where
        F: FnMut(&Call) -> Result<Value, HandlerError> + 'static,
    {
        self.handlers
            .insert(name.to_owned(), Handler::Unary(Box::new(handler)));
        self
    }

    /// Registers a method that streams chunks through the sink, then returns a final result.
    #[must_use]
    pub fn stream_method<F>(mut self, name: &str, handler: F) -> Self
    where
        F: FnMut(&Call, &mut ChunkSink<'_>) -> Result<Value, HandlerError> + 'static,
    {
        self.handlers
            .insert(name.to_owned(), Handler::Streaming(Box::new(handler)));
        self
    }

    /// Registers a method whose calls may run at the same time as other calls, on one of the
    /// worker's handler threads (see [`Worker::max_concurrency`]): what an I/O-bound method
    /// (a request to another service, a database query) wants. Without `max_concurrency` it
    /// runs one call at a time, like [`Worker::method`]. A panic in it becomes an `error`
    /// reply of kind `panic` for that call; the worker keeps serving.
    #[must_use]
    pub fn concurrent_method<F>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(&Call) -> Result<Value, HandlerError> + Send + Sync + 'static,
    {
        self.handlers
            .insert(name.to_owned(), Handler::Concurrent(Arc::new(handler)));
        self
    }

    /// Declares, in the init pong, that the worker serves up to `n` calls at once: the
    /// runtime then sends it up to `n` of its pool's calls before the first has answered.
    /// Methods registered with [`Worker::concurrent_method`] run on `n` handler threads;
    /// the others still run one at a time on the serving thread, and while one of those runs
    /// the replies of finished concurrent calls wait for it. Sessions and leases still hold
    /// the worker alone. Only [`Worker::serve`] and [`Worker::serve_on_threaded`] serve
    /// calls at once; [`Worker::serve_on`] reads its input only between calls and declares 1.
    #[must_use]
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = n;
        self
    }

    /// Registers a hook run before the init pong is sent (heavy setup goes here).
    #[must_use]
    pub fn on_init<F>(mut self, hook: F) -> Self
    where
        F: FnMut() -> Result<(), HandlerError> + 'static,
    {
        self.on_init.push(Box::new(hook));
        self
    }

    /// Registers a hook run on `reset`: it must drop all per-session state.
    #[must_use]
    pub fn on_reset<F>(mut self, hook: F) -> Self
    where
        F: FnMut() -> Result<(), HandlerError> + 'static,
    {
        self.on_reset.push(Box::new(hook));
        self
    }

    /// Ends serving (as at EOF) when no message has come from the runtime for `after` while
    /// the worker waits for one: the runtime, which then pings at least that often, is gone or
    /// cut off. [`Worker::serve`] sets it from `WHARF_WATCHDOG_MS`; it applies to
    /// [`Worker::serve_on_threaded`] (what `serve` uses).
    #[must_use]
    pub fn watchdog(mut self, after: Duration) -> Self {
        self.watchdog = Some(after);
        self
    }

    /// Serves on the channel named by the environment (`WHARF_CHANNEL`: `fds`, `stdio`,
    /// `socket` or `fifo`; `WHARF_FD_IN`, `WHARF_FD_OUT`, `WHARF_SOCKET`, `WHARF_FIFO_IN`,
    /// `WHARF_FIFO_OUT`, `WHARF_MAX_FRAME`, `WHARF_WATCHDOG_MS`). Returns on EOF or
    /// `shutdown`.
    pub fn serve(mut self) -> Result<(), ServeError> {
        let env = |k: &str| std::env::var(k).ok();
        if let Some(v) = env("WHARF_WATCHDOG_MS") {
            let ms: u64 = v.parse().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                ServeError::Config(format!(
                    "WHARF_WATCHDOG_MS={v} is not a positive number of milliseconds"
                ))
            })?;
            self.watchdog = Some(Duration::from_millis(ms));
        }
        let max_frame = match env("WHARF_MAX_FRAME") {
            Some(v) => v
                .parse()
                .map_err(|_| ServeError::Config(format!("WHARF_MAX_FRAME={v} is not a number")))?,
            None => DEFAULT_MAX_FRAME,
        };
        match env("WHARF_CHANNEL").as_deref() {
            None | Some("fds") => {
                let fd = |k: &str, default: i32| -> Result<File, ServeError> {
                    let n: i32 = match env(k) {
                        Some(v) => v
                            .parse()
                            .map_err(|_| ServeError::Config(format!("{k}={v} is not an fd")))?,
                        None => default,
                    };
                    open_fd(n)
                };
                let input = fd("WHARF_FD_IN", 3)?;
                let output = fd("WHARF_FD_OUT", 4)?;
                self.serve_on_threaded(BufReader::new(input), output, max_frame)
            }
            Some("stdio") => {
                let stdout = std::io::stdout().lock();
                self.serve_on_threaded(std::io::stdin(), stdout, max_frame)
            }
            #[cfg(unix)]
            Some("socket") => {
                let path = env("WHARF_SOCKET").ok_or_else(|| {
                    ServeError::Config("WHARF_CHANNEL=socket needs WHARF_SOCKET".into())
                })?;
                let stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
                    ServeError::Config(format!("cannot connect to WHARF_SOCKET={path}: {e}"))
                })?;
                let output = stream.try_clone().map_err(|e| {
                    ServeError::Config(format!("cannot use the socket {path}: {e}"))
                })?;
                self.serve_on_threaded(BufReader::new(stream), output, max_frame)
            }
            #[cfg(unix)]
            Some("fifo") => {
                let path = |k: &str| {
                    env(k)
                        .ok_or_else(|| ServeError::Config(format!("WHARF_CHANNEL=fifo needs {k}")))
                };
                let (path_in, path_out) = (path("WHARF_FIFO_IN")?, path("WHARF_FIFO_OUT")?);
                let input = open_fifo(&path_in, false)?;
                let output = open_fifo(&path_out, true)?;
                self.serve_on_threaded(BufReader::new(input), output, max_frame)
            }
            Some(other) => Err(ServeError::Config(format!(
                "WHARF_CHANNEL={other}: expected fds, stdio, socket or fifo"
            ))),
        }
    }

    /// Serves on the given reader and writer, reading the next message only when the last one
    /// has been handled: a `cancel` or `ping` sent while a call runs is seen after the call
    /// (for tests and in-memory channels; see [`Worker::serve_on_threaded`]). Returns on EOF
    /// or `shutdown`.
    pub fn serve_on<R: Read, W: Write>(
        self,
        mut input: R,
        output: W,
        max_frame: usize,
    ) -> Result<(), ServeError> {
        let next = move || -> Result<Option<Step>, ProtocolError> {
            match read_frame(&mut input, max_frame)? {
                None => Ok(None),
                Some(payload) => Ok(Some(Step::Message(Incoming::new(decode(&payload)?)))),
            }
        };
        self.run(next, None, output, max_frame, |_| {})
    }

    /// Serves on the given reader and writer with a reader thread that reads the runtime's
    /// messages while a call runs: a `cancel` of the running call (and EOF, `shutdown` or a
    /// violation) marks it cancelled at once ([`Call::check`]); every other message is handled
    /// in order once the call has ended. Returns on EOF or `shutdown`; the reader thread may
    /// then still be blocked on `input` (it holds no other resource, and ends with the process).
    pub fn serve_on_threaded<R, W>(
        self,
        input: R,
        output: W,
        max_frame: usize,
    ) -> Result<(), ServeError>
    where
        R: Read + Send + 'static,
        W: Write,
    {
        let (tx, rx) = mpsc::channel();
        let handlers = HandlerThreads::start(&self, &tx)?;
        let calls = Calls::default();
        let theirs = calls.clone();
        std::thread::Builder::new()
            .name("wharf-reader".into())
            .spawn(move || read_ahead(input, max_frame, &tx, &theirs))
            .map_err(|e| ServeError::Config(format!("cannot start the reader thread: {e}")))?;
        let watchdog = self.watchdog;
        // Only a message from the runtime feeds the watchdog, not a handler thread's result.
        let mut heard = Instant::now();
        let next = move || match watchdog {
            None => rx.recv().unwrap_or(Ok(None)),
            Some(after) => {
                let left = (heard + after).saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(step) => {
                        if matches!(step, Ok(Some(Step::Message(_)))) {
                            heard = Instant::now();
                        }
                        step
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        eprintln!(
                            "wharf worker: nothing from the runtime for {after:?} \
                             (WHARF_WATCHDOG_MS): it is gone or cut off; exiting"
                        );
                        Ok(None)
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => Ok(None),
                }
            }
        };
        self.run(next, handlers, output, max_frame, |id| calls.ended(id))
    }

    /// The serving loop: handles each message `next` yields until it yields `None` (EOF) or
    /// `shutdown` comes, and writes the replies of calls that `handlers` ran.
    fn run<W: Write>(
        mut self,
        mut next: impl FnMut() -> Result<Option<Step>, ProtocolError>,
        handlers: Option<HandlerThreads>,
        mut output: W,
        max_frame: usize,
        mut call_ended: impl FnMut(u64),
    ) -> Result<(), ServeError> {
        let declared = handlers.as_ref().map(|h| h.declared);
        while let Some(step) = next()? {
            let Incoming {
                msg,
                received,
                cancelled,
            } = match step {
                Step::Message(incoming) => incoming,
                Step::Finished { id, result } => {
                    call_ended(id);
                    reply(&mut output, id, result, max_frame)?;
                    continue;
                }
            };
            match msg {
                ToWorker::Init { id, .. } => {
                    let failure = self
                        .on_init
                        .iter_mut()
                        .find_map(|hook| hook().err())
                        .map(|e| format!("{}: {}", e.kind, e.message));
                    let pong = FromWorker::InitPong {
                        id,
                        status: if failure.is_some() {
                            InitStatus::Error
                        } else {
                            InitStatus::Ok
                        },
                        version: PROTOCOL_VERSION,
                        pid: std::process::id(),
                        methods: self.handlers.keys().cloned().collect(),
                        message: failure.clone(),
                        max_concurrency: declared,
                    };
                    write_msg(&mut output, &pong, max_frame)?;
                    if let Some(reason) = failure {
                        return Err(ServeError::Init(reason));
                    }
                }
                ToWorker::Call {
                    id,
                    method,
                    body,
                    session,
                    deadline_ms,
                } => {
                    let call = Call {
                        id,
                        method,
                        body,
                        session,
                        deadline_ms,
                        received,
                        cancelled,
                    };
                    let result = match self.handlers.get_mut(&call.method) {
                        None => Err(HandlerError::new(
                            kinds::UNKNOWN_METHOD,
                            format!("no method named {:?}", call.method),
                        )),
                        Some(Handler::Concurrent(f)) => match &handlers {
                            Some(threads) => {
                                // Its reply comes back as a `Step::Finished`.
                                threads.run(f.clone(), call);
                                continue;
                            }
                            None => run_caught(f.as_ref(), &call),
                        },
                        Some(Handler::Unary(f)) => f(&call),
                        Some(Handler::Streaming(f)) => {
                            let mut sink = ChunkSink {
                                out: &mut output,
                                id,
                                seq: 0,
                                max_frame,
                            };
                            f(&call, &mut sink)
                        }
                    };
                    call_ended(id);
                    reply(&mut output, id, result, max_frame)?;
                }
                ToWorker::Reset { id, .. } => {
                    let result = self
                        .on_reset
                        .iter_mut()
                        .find_map(|hook| hook().err())
                        .map_or(Ok(Value::Nil), Err);
                    reply(&mut output, id, result, max_frame)?;
                }
                ToWorker::Ping { id } => {
                    write_msg(&mut output, &FromWorker::Pong { id }, max_frame)?
                }
                // The reader thread has already marked the call a cancel names, if it was
                // still running; here it has ended (or runs on a handler thread).
                ToWorker::Cancel { .. } => {}
                ToWorker::Shutdown { .. } => return Ok(()),
            }
        }
        Ok(())
    }
}

/// The calls the reader thread has passed on and the serving loop has not finished, with their
/// cancellation flags (calls come one at a time, but the next may be read before the last ends).
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<HashMap<u64, Arc<AtomicBool>>>>);

impl Calls {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<AtomicBool>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn started(&self, id: u64, cancelled: Arc<AtomicBool>) {
        self.lock().insert(id, cancelled);
    }

    fn ended(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn cancel(&self, id: u64) {
        if let Some(cancelled) = self.lock().get(&id) {
            cancelled.store(true, Ordering::Release);
        }
    }

    fn cancel_all(&self) {
        for cancelled in self.lock().values() {
            cancelled.store(true, Ordering::Release);
        }
    }
}

/// The reader thread of [`Worker::serve_on_threaded`]: reads messages ahead of the serving
/// loop, and marks a call cancelled when a `cancel` naming it arrives before it has ended, or
/// every unfinished call when serving is about to end (EOF, `shutdown`, a violation).
fn read_ahead<R: Read>(mut input: R, max_frame: usize, tx: &Events, calls: &Calls) {
    loop {
        let read = read_frame(&mut input, max_frame)
            .and_then(|payload| payload.map(|p| decode::<ToWorker>(&p)).transpose());
        let msg = match read {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                calls.cancel_all();
                let _ = tx.send(Ok(None));
                return;
            }
            Err(e) => {
                calls.cancel_all();
                let _ = tx.send(Err(e));
                return;
            }
        };
        let incoming = Incoming::new(msg);
        let last = match &incoming.msg {
            ToWorker::Call { id, .. } => {
                calls.started(*id, incoming.cancelled.clone());
                false
            }
            ToWorker::Cancel { id } => {
                calls.cancel(*id);
                false
            }
            ToWorker::Shutdown { .. } => {
                calls.cancel_all();
                true
            }
            _ => false,
        };
        if tx.send(Ok(Some(Step::Message(incoming)))).is_err() || last {
            return;
        }
    }
}

fn reply(
    out: &mut dyn Write,
    id: u64,
    result: Result<Value, HandlerError>,
    max_frame: usize,
) -> Result<(), ProtocolError> {
    let msg = match result {
        Ok(body) => FromWorker::Ok { id, body },
        Err(e) => FromWorker::Error {
            id,
            kind: e.kind,
            message: e.message,
        },
    };
    match write_msg(out, &msg, max_frame) {
        Err(ProtocolError::Encode { reason }) => {
            let msg = FromWorker::Error {
                id,
                kind: kinds::FRAME_TOO_LARGE.to_owned(),
                message: reason,
            };
            write_msg(out, &msg, max_frame)
        }
        other => other,
    }
}

fn write_msg(out: &mut dyn Write, msg: &FromWorker, max_frame: usize) -> Result<(), ProtocolError> {
    let frame = encode(msg, max_frame)?;
    out.write_all(&frame)?;
    out.flush()?;
    Ok(())
}

#[cfg(unix)]
fn open_fd(fd: i32) -> Result<File, ServeError> {
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl(F_GETFD) only queries the descriptor; it fails with EBADF if it is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(ServeError::Config(format!(
            "fd {fd} is not open: start this worker under the wharf runtime, or set WHARF_CHANNEL=stdio"
        )));
    }
    // SAFETY: the runtime handed this descriptor to us for our exclusive use; it is open (checked
    // above) and nothing else in the process owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Opens one FIFO of the `fifo` channel: the request FIFO to read (`write` false) or the reply
/// FIFO to write. The open does not block (the runtime holds its ends open before the worker
/// starts; a reply FIFO nobody reads fails with ENXIO: the runtime is gone), then the file is
/// made blocking for serving. Close-on-exec, as every file std opens.
#[cfg(unix)]
fn open_fifo(path: &str, write: bool) -> Result<File, ServeError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let fail = |why: String| ServeError::Config(format!("cannot open the FIFO {path}: {why}"));
    let file = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => fail("nobody reads it (is the runtime gone?)".into()),
            _ => fail(e.to_string()),
        })?;
    if !file
        .metadata()
        .map_err(|e| fail(e.to_string()))?
        .file_type()
        .is_fifo()
    {
        return Err(fail("not a FIFO".into()));
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function owns, only changing its O_NONBLOCK flag.
    let cleared = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) >= 0
    };
    if !cleared {
        return Err(fail(std::io::Error::last_os_error().to_string()));
    }
    Ok(file)
}

#[cfg(not(unix))]
fn open_fd(_fd: i32) -> Result<File, ServeError> {
    Err(ServeError::Config(
        "fds mode needs a unix system; use WHARF_CHANNEL=stdio".into(),
    ))
}
