//! The process port: one worker OS process, its protocol channel, its logs and its death.
//!
//! [`ProcessPort::spawn`] starts the command with an explicit environment, the protocol channel
//! (fds 3/4, or stdin/stdout), its own process group and a parent-death signal, then performs the
//! init-ping handshake under a timeout. Requests go out through one writer; a reader task routes
//! replies to their requests by id. Any violation poisons the port: the process group is killed
//! and every request in flight fails with a typed error. Dropping the port kills the group; a
//! reaper task always collects the exit status.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, FramedWrite};
use wharf_protocol::message::{FromWorker, InitStatus, ToWorker, Value, PROTOCOL_VERSION};
use wharf_protocol::{MessageCodec, DEFAULT_MAX_FRAME};

use super::error::{ExitInfo, PortError};
use super::logs::{self, Stream, Tail};

/// Environment variables a worker inherits by default (when set); everything else is explicit.
pub const DEFAULT_INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
];

/// How long an error report waits for a dead worker's last stderr lines.
const STDERR_EOF_WAIT: Duration = Duration::from_millis(200);

/// How long a worker that closed its channel may take to exit before it is killed.
const EOF_EXIT_GRACE: Duration = Duration::from_millis(500);

/// Where the protocol's frames travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Channel {
    /// Frames on fd 3 (to the worker) and fd 4 (from the worker); stdout and stderr are logs.
    #[default]
    Fds,
    /// Frames on stdin and stdout; stderr is a log.
    Stdio,
}

/// How to start a worker process.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// The program to run (looked up on the worker's `PATH`).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// The worker's whole environment, besides the `WHARF_*` variables the port adds.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory; the runtime's own if `None`.
    pub cwd: Option<PathBuf>,
    /// Where frames travel.
    pub channel: Channel,
    /// Largest payload either side may send.
    pub max_frame: usize,
    /// How long the worker may take to answer the init ping.
    pub init_timeout: Duration,
    /// The worker's name in logs and in `WHARF_WORKER_ID`.
    pub worker_id: String,
    /// Refuse to start a worker whose group watchdog cannot be started (no `/bin/sh`), rather
    /// than run it with a loud warning. Without the watchdog, processes a worker forks may
    /// outlive a runtime that dies without cleanup.
    pub require_watchdog: bool,
}

impl ProcessSpec {
    /// A spec for `program` with the default environment ([`DEFAULT_INHERITED_ENV`]), the `fds`
    /// channel, the default max frame and a 30 s init timeout.
    pub fn new(program: impl Into<OsString>) -> Self {
        let env = DEFAULT_INHERITED_ENV
            .iter()
            .filter_map(|k| std::env::var_os(k).map(|v| (OsString::from(k), v)))
            .collect();
        Self {
            program: program.into(),
            args: Vec::new(),
            env,
            cwd: None,
            channel: Channel::Fds,
            max_frame: DEFAULT_MAX_FRAME,
            init_timeout: Duration::from_secs(30),
            worker_id: "worker".into(),
            require_watchdog: false,
        }
    }

    /// Builds a spec from a command line: the program followed by its arguments.
    pub fn from_argv<I, S>(argv: I) -> Option<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut it = argv.into_iter().map(Into::into);
        let mut spec = Self::new(it.next()?);
        spec.args = it.collect();
        Some(spec)
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets one environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// Sets the channel.
    pub fn channel(mut self, channel: Channel) -> Self {
        self.channel = channel;
        self
    }

    /// Sets the init timeout.
    pub fn init_timeout(mut self, timeout: Duration) -> Self {
        self.init_timeout = timeout;
        self
    }

    /// Sets the max frame.
    pub fn max_frame(mut self, max_frame: usize) -> Self {
        self.max_frame = max_frame;
        self
    }

    /// Sets the worker's name.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = id.into();
        self
    }

    /// Requires the group watchdog (see [`ProcessSpec::require_watchdog`]).
    pub fn require_watchdog(mut self, required: bool) -> Self {
        self.require_watchdog = required;
        self
    }

    fn program_name(&self) -> String {
        self.program.to_string_lossy().into_owned()
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

/// Where a reply goes.
enum Slot {
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
    /// Whether this entry makes the worker busy (everything but an abandoned control request).
    fn counts(&self) -> bool {
        !matches!(self, Slot::Abandoned)
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
    closed: Option<PortError>,
}

/// The worker's process group, and what keeps its id from being reused while we may signal it.
struct Group {
    /// The watchdog, a member of the group that we never reap while the port lives: its
    /// process (or zombie) keeps the group id taken, so signalling the group can never reach
    /// another program's group that reused the id.
    watchdog: Option<tokio::process::Child>,
    /// Set when the port is dropped, after its last kill: nothing signals the group after.
    released: bool,
}

/// State shared between the port and its tasks.
struct Shared {
    worker_id: String,
    pgid: i32,
    pending: Mutex<Pending>,
    /// `None` once the channel is closed (the worker's EOF).
    writer: tokio::sync::Mutex<Option<Writer>>,
    group: Mutex<Group>,
    exit: watch::Receiver<Option<ExitStatus>>,
    stderr: Tail,
    /// Woken whenever a request leaves `pending`.
    settled: tokio::sync::Notify,
    /// False once the port is poisoned or the worker reaped (read on every checkout).
    open: Arc<AtomicBool>,
    /// How many requests in `pending` count as in flight (read on every checkin).
    in_flight: AtomicUsize,
    /// True once the reader has stopped (and has reported what it saw, if anything).
    reader_done: watch::Receiver<bool>,
    /// True once the port is poisoned: ends a reader's wait for a stream's consumer.
    poisoned: watch::Sender<bool>,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn group(&self) -> std::sync::MutexGuard<'_, Group> {
        self.group.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Signals the worker's process group, unless its id may no longer be ours: once the port
    /// has released the group, or (without a watchdog to hold the id) once the leader has
    /// been reaped.
    fn signal_group(&self, signal: Signal) {
        let group = self.group();
        if group.released || (group.watchdog.is_none() && self.exit.borrow().is_some()) {
            return;
        }
        // ESRCH (the group is already gone) is the expected outcome once the worker has exited.
        let _ = killpg(Pid::from_raw(self.pgid), signal);
    }

    /// Waits up to `limit` for the process to be reaped; returns its status if it was.
    async fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        let mut exit = self.exit.clone();
        let reaped = tokio::time::timeout(limit, exit.wait_for(Option::is_some)).await;
        match reaped {
            Ok(Ok(status)) => *status,
            _ => *self.exit.borrow(),
        }
    }

    async fn exit_info(&self, limit: Duration) -> ExitInfo {
        let status = self.wait_exit(limit).await;
        // The last stderr lines may still be in the pipe when the reap is seen: give the
        // forwarder a moment to reach EOF (a grandchild holding stderr open only costs the wait).
        self.stderr.wait_eof(STDERR_EOF_WAIT).await;
        ExitInfo {
            status,
            stderr_tail: self.stderr.lines(),
        }
    }

    fn register(&self, id: u64, slot: Slot) -> Result<(), PortError> {
        let mut pending = self.pending();
        if let Some(err) = &pending.closed {
            return Err(err.clone());
        }
        if let Some(old) = pending.slots.insert(id, slot) {
            // An id reused while its old entry still waits (only an abandoned control request
            // can still be there): the old one is gone for good.
            if old.counts() {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
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
        if let Some(slot) = pending.slots.get_mut(&id) {
            if slot.counts() {
                *slot = Slot::Abandoned;
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
        drop(pending);
        self.settled.notify_waiters();
    }

    /// Whether a request is still waiting for its reply.
    fn is_pending(&self, id: u64) -> bool {
        self.pending().slots.get(&id).is_some_and(Slot::counts)
    }

    /// Writes one message. `buffered` runs once the frame is in the writer's buffer: from then
    /// on it reaches the worker even if this future is dropped (the next write or
    /// [`ProcessPort::quiesce`] flushes it).
    async fn write(
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
                self.poison(err.clone());
                Err(err)
            }
        }
    }

    /// Asks the worker to stop call `id`, from a task of its own (the caller that gave up may
    /// be a destructor, or the reader, which must never wait for the writer).
    fn cancel_later(self: &Arc<Self>, id: u64) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.clone();
        rt.spawn(async move {
            if shared.is_pending(id) {
                let _ = shared.write(&ToWorker::Cancel { id }, None).await;
            }
        });
    }

    /// Closes the port for good: kills the group and fails every request in flight.
    /// The requests are failed before the group is signalled, so the first reason wins: a
    /// kill's own consequences (the reap, the actor's cleanup) can never overtake it with a
    /// vaguer "worker died".
    fn poison(&self, err: PortError) {
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
        self.signal_group(Signal::SIGKILL);
        self.settled.notify_waiters();
    }
}

/// One request on its way, from registration to reply. Dropped early, it undoes what would
/// otherwise stay behind: an entry never sent is removed; a call already sent is cancelled
/// (the protocol's `cancel`; its reply is still awaited, so the worker is clean when it comes);
/// a control request already sent is abandoned (its late reply is dropped).
struct Request<'a> {
    shared: &'a Arc<Shared>,
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
    async fn start(
        shared: &'a Arc<Shared>,
        id: u64,
        slot: Slot,
        msg: &ToWorker,
    ) -> Result<Request<'a>, PortError> {
        let call = matches!(slot, Slot::Unary(_) | Slot::Stream { .. });
        shared.register(id, slot)?;
        let mut request = Request {
            shared,
            id,
            sent: false,
            done: false,
            call,
        };
        match shared.write(msg, Some(&mut request)).await {
            Ok(()) => Ok(request),
            Err(e) => {
                // Nothing of it reached the worker (or the port is closed): forget it.
                request.sent = false;
                Err(e)
            }
        }
    }

    /// The reply came: nothing to undo.
    fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if !self.sent {
            self.shared.unregister(self.id);
        } else if self.call {
            self.shared.cancel_later(self.id);
        } else {
            self.shared.abandon(self.id);
        }
    }
}

type Writer = FramedWrite<Box<dyn AsyncWrite + Send + Unpin>, MessageCodec<FromWorker, ToWorker>>;

/// One running worker process and its protocol channel.
///
/// Cheap operations take `&self`, so one port can serve a call while it is pinged or cancelled.
/// Dropping the port SIGKILLs the worker's process group.
pub struct ProcessPort {
    shared: Arc<Shared>,
    next_id: AtomicU64,
    pid: u32,
    info: WorkerInfo,
    /// Our end of the group watchdog's stdin: when it closes (this port drops, or the runtime
    /// dies in any way) the watchdog kills the worker's whole process group.
    _watchdog: Option<tokio::process::ChildStdin>,
}

impl std::fmt::Debug for ProcessPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessPort")
            .field("worker_id", &self.shared.worker_id)
            .field("pid", &self.pid)
            .finish()
    }
}

impl Drop for ProcessPort {
    fn drop(&mut self) {
        // Kept in Drop so an actor that is killed (and skips its post_stop) still leaves no
        // process behind. The reaper task collects the status. This is the last signal: the
        // watchdog (its zombie, if it is dead) is released to be reaped, and with it the
        // group id, which another process may then reuse.
        self.shared.signal_group(Signal::SIGKILL);
        let watchdog = {
            let mut group = self.shared.group();
            group.released = true;
            group.watchdog.take()
        };
        drop(watchdog);
    }
}

/// Makes a pipe whose two ends are close-on-exec and numbered 10 or above, so that placing the
/// child's ends on fds 3 and 4 can never clobber one with the other.
fn high_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let lift = |fd: OwnedFd| -> std::io::Result<OwnedFd> {
        let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
        // SAFETY: fcntl just returned this new descriptor, which nothing else owns.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
    };
    Ok((lift(r)?, lift(w)?))
}

impl ProcessPort {
    /// Spawns the worker and performs the init handshake; returns once the worker is ready.
    pub async fn spawn(spec: &ProcessSpec) -> Result<Self, PortError> {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("WHARF_MAX_FRAME", spec.max_frame.to_string())
            .env("WHARF_WORKER_ID", &spec.worker_id)
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }

        let parent = std::process::id() as libc::pid_t;
        let mut child_fds: Option<(OwnedFd, OwnedFd)> = None;
        let mut parent_fds: Option<(OwnedFd, OwnedFd)> = None;
        let spawn_err = |e: std::io::Error| PortError::SpawnFailed {
            program: spec.program_name(),
            reason: e.to_string(),
        };
        match spec.channel {
            Channel::Fds => {
                let (to_r, to_w) = high_pipe().map_err(spawn_err)?;
                let (from_r, from_w) = high_pipe().map_err(spawn_err)?;
                let (cr, cw) = (to_r.as_raw_fd(), from_w.as_raw_fd());
                cmd.env("WHARF_CHANNEL", "fds")
                    .env("WHARF_FD_IN", "3")
                    .env("WHARF_FD_OUT", "4")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped());
                // SAFETY: the closure runs in the forked child before exec and only calls
                // async-signal-safe functions (dup2, prctl, getppid).
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::dup2(cr, 3) < 0 || libc::dup2(cw, 4) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        set_parent_death_signal(parent)
                    });
                }
                child_fds = Some((to_r, from_w));
                parent_fds = Some((from_r, to_w));
            }
            Channel::Stdio => {
                cmd.env("WHARF_CHANNEL", "stdio")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped());
                // SAFETY: as above; prctl and getppid are async-signal-safe.
                unsafe {
                    cmd.pre_exec(move || set_parent_death_signal(parent));
                }
            }
        }

        let mut child = cmd.spawn().map_err(spawn_err)?;
        drop(child_fds); // the child holds its own copies now
        let pid = child.id().ok_or_else(|| PortError::SpawnFailed {
            program: spec.program_name(),
            reason: "child exited before its pid was read".into(),
        })?;

        let stderr_tail = Tail::default();
        let worker_id = spec.worker_id.clone();
        if let Some(err) = child.stderr.take() {
            tokio::spawn(logs::forward(
                err,
                worker_id.clone(),
                Stream::Stderr,
                Some(stderr_tail.clone()),
            ));
        }
        let (input, output): (
            Box<dyn AsyncRead + Send + Unpin>,
            Box<dyn AsyncWrite + Send + Unpin>,
        ) = match parent_fds {
            Some((from_r, to_w)) => {
                if let Some(out) = child.stdout.take() {
                    tokio::spawn(logs::forward(out, worker_id.clone(), Stream::Stdout, None));
                }
                let rx =
                    tokio::net::unix::pipe::Receiver::from_owned_fd(from_r).map_err(spawn_err)?;
                let tx = tokio::net::unix::pipe::Sender::from_owned_fd(to_w).map_err(spawn_err)?;
                (Box::new(rx), Box::new(tx))
            }
            None => {
                let out = child.stdout.take().expect("stdout is piped");
                let inp = child.stdin.take().expect("stdin is piped");
                (Box::new(out), Box::new(inp))
            }
        };

        // The reaper owns the child and publishes its exit status.
        let (exit_tx, exit_rx) = watch::channel(None);
        let open = Arc::new(AtomicBool::new(true));
        let reaped = open.clone();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            reaped.store(false, Ordering::Release);
            let _ = exit_tx.send(status);
        });

        // The watchdog joins the group before anything can signal it (see `Group`).
        let (watchdog, watchdog_stdin) = match spawn_group_watchdog(pid) {
            Ok((child, stdin)) => (Some(child), Some(stdin)),
            Err(e) => {
                let gone = exit_rx.borrow().is_some();
                if spec.require_watchdog && !gone {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    return Err(PortError::SpawnFailed {
                        program: spec.program_name(),
                        reason: format!("no group watchdog (required): {e}"),
                    });
                }
                if !gone {
                    tracing::warn!(
                        worker = %worker_id,
                        pid,
                        error = %e,
                        "no group watchdog: if the runtime dies without cleanup, processes \
                         this worker forked may outlive it (the worker itself still dies by \
                         its parent-death signal)"
                    );
                }
                (None, None)
            }
        };

        let (reader_done_tx, reader_done) = watch::channel(false);
        let codec = MessageCodec::<FromWorker, ToWorker>::new(spec.max_frame);
        let shared = Arc::new(Shared {
            worker_id: worker_id.clone(),
            pgid: pid as i32,
            pending: Mutex::new(Pending::default()),
            writer: tokio::sync::Mutex::new(Some(FramedWrite::new(output, codec.clone()))),
            group: Mutex::new(Group {
                watchdog,
                released: false,
            }),
            exit: exit_rx,
            stderr: stderr_tail,
            settled: tokio::sync::Notify::new(),
            open,
            in_flight: AtomicUsize::new(0),
            reader_done,
            poisoned: watch::channel(false).0,
        });
        tokio::spawn(read_loop(
            FramedRead::new(input, codec),
            shared.clone(),
            reader_done_tx,
        ));

        let mut port = ProcessPort {
            _watchdog: watchdog_stdin,
            shared,
            next_id: AtomicU64::new(1),
            pid,
            info: WorkerInfo {
                pid,
                version: PROTOCOL_VERSION,
                methods: Vec::new(),
            },
        };
        port.info = port.handshake(spec.init_timeout).await?;
        tracing::debug!(worker = %worker_id, pid, "worker ready");
        Ok(port)
    }

    async fn handshake(&self, timeout: Duration) -> Result<WorkerInfo, PortError> {
        let (tx, rx) = oneshot::channel();
        self.shared.register(0, Slot::Init(tx))?;
        let ping = ToWorker::Init {
            id: 0,
            version: PROTOCOL_VERSION,
        };
        // A worker that dies at once makes this write fail; the reader reports why, below.
        let _ = self.shared.write(&ping, None).await;
        let pong = match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                self.shared.poison(PortError::Closed);
                let info = self.shared.exit_info(Duration::from_secs(2)).await;
                return Err(PortError::InitTimeout {
                    after: timeout,
                    info,
                });
            }
            Ok(Err(_)) => return Err(PortError::Closed),
            Ok(Ok(Err(PortError::WorkerDied(_)))) => {
                let info = self.shared.exit_info(Duration::from_secs(2)).await;
                return Err(PortError::ExitedBeforeReady(info));
            }
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Ok(Ok(pong))) => pong,
        };
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
                    self.shared.poison(err.clone());
                    return Err(err);
                }
                Ok(WorkerInfo {
                    pid,
                    version,
                    methods,
                })
            }
            FromWorker::InitPong { message, .. } => {
                let err = PortError::InitRefused {
                    message: message.unwrap_or_else(|| "no reason given".into()),
                };
                self.shared.poison(err.clone());
                Err(err)
            }
            other => {
                let err = PortError::ProtocolViolation {
                    reason: format!("expected init_pong, got {other:?}"),
                };
                self.shared.poison(err.clone());
                Err(err)
            }
        }
    }

    /// Allocates a fresh request id.
    pub fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Calls `method` and waits for its one result. Chunks, if the worker streams, are a
    /// protocol violation here: use [`ProcessPort::call_stream`].
    ///
    /// If the caller stops waiting, the worker is sent the protocol's `cancel` for the call,
    /// and its reply is still read and discarded when it comes ([`ProcessPort::quiesce`] waits
    /// for it). A call dropped before its frame was written leaves nothing behind.
    pub async fn call(
        &self,
        id: u64,
        method: &str,
        body: Value,
        session: Option<String>,
        deadline_ms: Option<u64>,
    ) -> Result<Value, PortError> {
        let (tx, rx) = oneshot::channel();
        let msg = ToWorker::Call {
            id,
            method: method.to_owned(),
            body,
            session,
            deadline_ms,
        };
        let request = Request::start(&self.shared, id, Slot::Unary(tx), &msg).await?;
        let reply = rx.await.unwrap_or(Err(PortError::Closed));
        request.finish();
        reply
    }

    /// Calls `method` and returns its stream of chunks, ending with the call's result.
    ///
    /// At most [`STREAM_BUFFER`] events wait in the returned receiver: while it is full the
    /// port reads nothing more from the worker, and the worker blocks on its full pipe. Dropping
    /// the receiver before the end sends the worker the protocol's `cancel`; the rest of the
    /// stream is read and discarded.
    pub async fn call_stream(
        &self,
        id: u64,
        method: &str,
        body: Value,
        session: Option<String>,
        deadline_ms: Option<u64>,
    ) -> Result<mpsc::Receiver<StreamEvent>, PortError> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let msg = ToWorker::Call {
            id,
            method: method.to_owned(),
            body,
            session,
            deadline_ms,
        };
        let slot = Slot::Stream {
            tx,
            cancelled: false,
        };
        // From here the reader owns the stream's end: it cancels the call if the receiver goes.
        Request::start(&self.shared, id, slot, &msg).await?.finish();
        Ok(rx)
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
        let request = Request::start(&self.shared, id, slot, &msg).await?;
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
        self.shared.write(&ToWorker::Cancel { id }, None).await
    }

    /// Sends the `shutdown` message (the worker should exit 0 without replying).
    pub async fn request_shutdown(&self) -> Result<(), PortError> {
        self.shared
            .write(&ToWorker::Shutdown { id: None }, None)
            .await
    }

    /// Closes the runtime's end of the channel: the worker's EOF, its dead-man switch.
    pub async fn close_channel(&self) {
        if let Some(mut writer) = self.shared.writer.lock().await.take() {
            let _ = writer.flush().await;
            // Dropping the writer closes our end of the pipe.
        }
    }

    /// Waits up to `limit` for the worker to exit and be reaped; its status if it did.
    pub async fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        self.shared.wait_exit(limit).await
    }

    /// Stops the worker gracefully: `shutdown` message, `grace`, SIGTERM to the group, `grace`,
    /// SIGKILL. Always reaps; returns how the worker ended.
    pub async fn shutdown(&self, grace: Duration) -> ExitInfo {
        let _ = tokio::time::timeout(grace, self.request_shutdown()).await;
        let _ = tokio::time::timeout(grace, self.close_channel()).await;
        let mut status = self.shared.wait_exit(grace).await;
        if status.is_none() {
            self.shared.signal_group(Signal::SIGTERM);
            status = self.shared.wait_exit(grace).await;
        }
        // SIGKILL the group in any case: grandchildren may outlive the leader.
        self.shared.signal_group(Signal::SIGKILL);
        if status.is_none() {
            status = self.shared.wait_exit(Duration::from_secs(5)).await;
        }
        self.shared.poison(PortError::Closed);
        ExitInfo {
            status,
            stderr_tail: self.shared.stderr.lines(),
        }
    }

    /// SIGKILLs the worker's process group at once and waits (briefly) for the reap.
    pub async fn kill(&self) -> ExitInfo {
        self.shared.poison(PortError::Closed);
        self.shared.exit_info(Duration::from_secs(5)).await
    }

    /// The worker's OS process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the worker said of itself in its init pong.
    pub fn info(&self) -> &WorkerInfo {
        &self.info
    }

    /// The worker's name in logs.
    pub fn worker_id(&self) -> &str {
        &self.shared.worker_id
    }

    /// Whether the port still accepts requests (the worker is alive and unpoisoned).
    pub fn is_open(&self) -> bool {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Why the port closed, if it did.
    pub fn close_reason(&self) -> Option<PortError> {
        self.shared.pending().closed.clone()
    }

    /// How many requests are waiting for a reply.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Waits until no request is in flight (every reply has come, or the port closed). Frames
    /// still buffered by an abandoned send are flushed first, so their replies can come.
    pub async fn quiesce(&self) {
        if let Some(writer) = self.shared.writer.lock().await.as_mut() {
            let _ = writer.flush().await;
        }
        loop {
            let settled = self.shared.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            settled.await;
        }
    }

    /// SIGKILLs the worker's process group now and fails every request in flight with `reason`.
    /// Synchronous, for Drop guards and for callers that must not wait.
    /// If the worker had already exited by itself, requests in flight learn how it ended
    /// instead.
    pub fn terminate(&self, reason: PortError) {
        let reason = match (reason, self.exit_status()) {
            (PortError::Closed, Some(status)) => PortError::WorkerDied(ExitInfo {
                status: Some(status),
                stderr_tail: self.shared.stderr.lines(),
            }),
            (reason, _) => reason,
        };
        self.shared.poison(reason);
    }

    /// The exit status, once the worker has been reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.shared.exit.borrow()
    }

    /// Waits until the worker has been reaped, or the port has closed, whichever comes first.
    pub async fn closed(&self) {
        let mut exit = self.shared.exit.clone();
        let _ = exit.wait_for(Option::is_some).await;
    }

    /// Waits up to `limit` for the reader to finish with the channel: after the worker exits,
    /// the reader may still hold its last bytes (a truncated frame, a violation) and reports
    /// them as the port's close reason, which should win over a plain "worker died".
    pub async fn reader_finished(&self, limit: Duration) {
        let mut done = self.shared.reader_done.clone();
        let _ = tokio::time::timeout(limit, done.wait_for(|d| *d)).await;
    }

    /// A future, independent of the port's lifetime, that completes once the worker is reaped.
    pub fn closed_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut exit = self.shared.exit.clone();
        async move {
            let _ = exit.wait_for(Option::is_some).await;
        }
    }

    /// The last lines the worker wrote to stderr.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.shared.stderr.lines()
    }
}

/// Starts a watchdog inside the worker's process group: a shell that waits for EOF on its
/// stdin, then SIGKILLs its whole group. The runtime holds the only write end, so however the
/// runtime ends — even by SIGKILL — the group dies with it, grandchildren included (the
/// parent-death signal reaches only the direct child). A process that leaves the group with
/// `setsid` escapes; nothing short of a cgroup catches that.
///
/// The watchdog is returned unreaped: the port keeps it (and, once it is dead, its zombie) so
/// that the group id stays taken for as long as the port may signal the group.
fn spawn_group_watchdog(
    pgid: u32,
) -> std::io::Result<(tokio::process::Child, tokio::process::ChildStdin)> {
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "read _ignored; kill -KILL 0"])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(pgid as i32)
        .kill_on_drop(false);
    let mut child = cmd.spawn()?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("the watchdog has no stdin"))?;
    Ok((child, stdin))
}

/// Runs in the forked child before exec: asks for SIGKILL when the runtime (`parent`) dies,
/// and exits at once if it already has. The parent's pid is captured before the fork, so a
/// runtime that is itself PID 1 (a container without an init) is told apart from a child that
/// was re-parented to init.
fn set_parent_death_signal(parent: libc::pid_t) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid are async-signal-safe and touch no memory.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may have died between fork and prctl: then we were re-parented already.
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = parent;
    Ok(())
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
async fn read_loop(
    mut frames: FramedRead<Box<dyn AsyncRead + Send + Unpin>, MessageCodec<FromWorker, ToWorker>>,
    shared: Arc<Shared>,
    done: watch::Sender<bool>,
) {
    let failure = loop {
        let msg = match frames.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => {
                break PortError::ProtocolViolation {
                    reason: e.to_string(),
                }
            }
            None => {
                // The worker closed its channel: it is exiting, or it is useless. Give an exit
                // a moment to finish (a worker may close its fds just before it exits), then
                // make sure, and tell every waiter how it ended.
                if shared.wait_exit(EOF_EXIT_GRACE).await.is_none() {
                    shared.signal_group(Signal::SIGKILL);
                }
                let info = shared.exit_info(Duration::from_secs(2)).await;
                break PortError::WorkerDied(info);
            }
        };
        let routed = route(&shared, msg);
        shared.settled.notify_waiters();
        match routed {
            Ok(Delivery::Done) => {}
            Ok(Delivery::Stream { id, tx, event }) => deliver(&shared, id, tx, event).await,
            Err(violation) => break violation,
        }
    };
    tracing::debug!(worker = %shared.worker_id, error = %failure, "worker channel closed");
    shared.poison(failure);
    let _ = done.send(true);
}

/// Hands a stream event to its consumer. While the consumer's buffer is full the reader waits
/// here, reading nothing: backpressure reaches the worker through the pipe. If the port is
/// poisoned meanwhile (the worker was killed) the wait ends and the event is dropped. If the
/// consumer is gone, the call is cancelled once and the rest of the stream is dropped as it
/// comes.
async fn deliver(shared: &Arc<Shared>, id: u64, tx: mpsc::Sender<StreamEvent>, event: StreamEvent) {
    let end = matches!(event, StreamEvent::End(_));
    let mut poisoned = shared.poisoned.subscribe();
    let permit = tokio::select! {
        biased;
        permit = tx.reserve() => permit,
        _ = poisoned.wait_for(|p| *p) => return,
    };
    match permit {
        Ok(permit) => permit.send(event),
        Err(_) if end => {}
        Err(_) => {
            let first = {
                let mut pending = shared.pending();
                match pending.slots.get_mut(&id) {
                    Some(Slot::Stream { cancelled, .. }) if !*cancelled => {
                        *cancelled = true;
                        true
                    }
                    _ => false,
                }
            };
            if first {
                shared.cancel_later(id);
            }
        }
    }
}

fn route(shared: &Shared, msg: FromWorker) -> Result<Delivery, PortError> {
    let id = msg.id();
    let mut pending = shared.pending();
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
                if let Some(slot) = shared.take(&mut pending, id) {
                    drop(pending);
                    slot.fail(PortError::ProtocolViolation {
                        reason: reason.clone(),
                    });
                }
                Err(PortError::ProtocolViolation { reason })
            }
        };
    }
    let Some(slot) = shared.take(&mut pending, id) else {
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
        (Slot::Ping(tx), FromWorker::Pong { .. }) | (Slot::Reset(tx), FromWorker::Ok { .. }) => {
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
            let reason = format!("unexpected {} for request {id}", describe(&msg));
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
