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
    Stream(mpsc::UnboundedSender<StreamEvent>),
    /// A ping (answered only by `pong`) or a reset (answered by `ok` or `error`).
    Ping(oneshot::Sender<Result<(), PortError>>),
    Reset(oneshot::Sender<Result<(), PortError>>),
}

impl Slot {
    fn fail(self, err: PortError) {
        match self {
            Slot::Init(tx) => drop(tx.send(Err(err))),
            Slot::Unary(tx) => drop(tx.send(Err(err))),
            Slot::Stream(tx) => drop(tx.send(StreamEvent::End(Err(err)))),
            Slot::Ping(tx) | Slot::Reset(tx) => drop(tx.send(Err(err))),
        }
    }
}

/// Requests in flight, and why the port closed if it did.
#[derive(Default)]
struct Pending {
    slots: HashMap<u64, Slot>,
    closed: Option<PortError>,
}

/// State shared between the port and its tasks.
struct Shared {
    worker_id: String,
    pgid: i32,
    pending: Mutex<Pending>,
    exit: watch::Receiver<Option<ExitStatus>>,
    stderr: Tail,
    /// Woken whenever a request leaves `pending`.
    settled: tokio::sync::Notify,
    /// False once the port is poisoned or the worker reaped (read on every checkout).
    open: Arc<AtomicBool>,
    /// How many requests are in `pending` (read on every checkin).
    in_flight: AtomicUsize,
    /// True once the reader has stopped (and has reported what it saw, if anything).
    reader_done: watch::Receiver<bool>,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn signal_group(&self, signal: Signal) {
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
        self.signal_group(Signal::SIGKILL);
        self.settled.notify_waiters();
    }
}

type Writer = FramedWrite<Box<dyn AsyncWrite + Send + Unpin>, MessageCodec<FromWorker, ToWorker>>;

/// One running worker process and its protocol channel.
///
/// Cheap operations take `&self`, so one port can serve a call while it is pinged or cancelled.
/// Dropping the port SIGKILLs the worker's process group.
pub struct ProcessPort {
    shared: Arc<Shared>,
    /// `None` once the channel is closed (the worker's EOF).
    writer: tokio::sync::Mutex<Option<Writer>>,
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
        // process behind. The reaper task collects the status.
        self.shared.signal_group(Signal::SIGKILL);
    }
}

/// Makes a pipe whose two ends are close-on-exec and numbered 10 or above, so that placing the
/// child's ends on fds 3 and 4 can never clobber one with the other.
fn high_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let lift = |fd: OwnedFd| -> std::io::Result<OwnedFd> {
        let raw = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
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
                        set_parent_death_signal()
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
                    cmd.pre_exec(set_parent_death_signal);
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

        let (reader_done_tx, reader_done) = watch::channel(false);
        let shared = Arc::new(Shared {
            worker_id: worker_id.clone(),
            pgid: pid as i32,
            pending: Mutex::new(Pending::default()),
            exit: exit_rx,
            stderr: stderr_tail,
            settled: tokio::sync::Notify::new(),
            open,
            in_flight: AtomicUsize::new(0),
            reader_done,
        });
        let codec = MessageCodec::<FromWorker, ToWorker>::new(spec.max_frame);
        tokio::spawn(read_loop(
            FramedRead::new(input, codec.clone()),
            shared.clone(),
            reader_done_tx,
        ));

        let watchdog = spawn_group_watchdog(pid);
        let mut port = ProcessPort {
            _watchdog: watchdog,
            shared,
            writer: tokio::sync::Mutex::new(Some(FramedWrite::new(output, codec))),
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
        self.register(0, Slot::Init(tx))?;
        let ping = ToWorker::Init {
            id: 0,
            version: PROTOCOL_VERSION,
        };
        // A worker that dies at once makes this write fail; the reader reports why, below.
        let _ = self.send(&ping).await;
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

    fn register(&self, id: u64, slot: Slot) -> Result<(), PortError> {
        let mut pending = self.shared.pending();
        if let Some(err) = &pending.closed {
            return Err(err.clone());
        }
        pending.slots.insert(id, slot);
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn unregister(&self, id: u64) {
        if self.shared.pending().slots.remove(&id).is_some() {
            self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        self.shared.settled.notify_waiters();
    }

    async fn send(&self, msg: &ToWorker) -> Result<(), PortError> {
        let mut guard = self.writer.lock().await;
        let Some(writer) = guard.as_mut() else {
            return Err(PortError::Closed);
        };
        match writer.send(msg).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_violation() => Err(PortError::from_protocol(&e)),
            Err(_) => {
                // The worker is gone (broken pipe): report it as the reader will.
                drop(guard);
                let info = self.shared.exit_info(Duration::from_secs(1)).await;
                let err = PortError::WorkerDied(info);
                self.shared.poison(err.clone());
                Err(err)
            }
        }
    }

    /// Sends a request registered under `id`; on failure the registration is undone.
    async fn request(&self, id: u64, slot: Slot, msg: &ToWorker) -> Result<(), PortError> {
        self.register(id, slot)?;
        let sent = self.send(msg).await;
        if sent.is_err() {
            self.unregister(id);
        }
        sent
    }

    /// Allocates a fresh request id.
    pub fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Calls `method` and waits for its one result. Chunks, if the worker streams, are a
    /// protocol violation here: use [`ProcessPort::call_stream`].
    ///
    /// If the caller stops waiting, the reply is still read and discarded when it comes.
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
        self.request(id, Slot::Unary(tx), &msg).await?;
        rx.await.unwrap_or(Err(PortError::Closed))
    }

    /// Calls `method` and returns its stream of chunks, ending with the call's result.
    pub async fn call_stream(
        &self,
        id: u64,
        method: &str,
        body: Value,
        session: Option<String>,
        deadline_ms: Option<u64>,
    ) -> Result<mpsc::UnboundedReceiver<StreamEvent>, PortError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let msg = ToWorker::Call {
            id,
            method: method.to_owned(),
            body,
            session,
            deadline_ms,
        };
        self.request(id, Slot::Stream(tx), &msg).await?;
        Ok(rx)
    }

    /// Pings the worker; fails if no pong comes within `timeout`.
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
        self.request(id, slot, &msg).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PortError::Closed),
            Err(_) => Err(PortError::Timeout(timeout)),
        }
    }

    /// Asks the worker to stop the call `id` early (best effort; its reply still comes).
    pub async fn cancel(&self, id: u64) -> Result<(), PortError> {
        self.send(&ToWorker::Cancel { id }).await
    }

    /// Sends the `shutdown` message (the worker should exit 0 without replying).
    pub async fn request_shutdown(&self) -> Result<(), PortError> {
        self.send(&ToWorker::Shutdown { id: None }).await
    }

    /// Closes the runtime's end of the channel: the worker's EOF, its dead-man switch.
    pub async fn close_channel(&self) {
        if let Some(mut writer) = self.writer.lock().await.take() {
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
        if let Some(writer) = self.writer.lock().await.as_mut() {
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

    /// Writes `bytes` to the worker's input as they are, outside the framing: for conformance
    /// tests that must send malformed input (a header over the worker's max frame, garbage
    /// MessagePack). Frames queued by earlier sends go first. Nothing is registered, so no
    /// reply is expected; [`PortError::Closed`] if the channel is closed or the write fails
    /// (the worker is gone).
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), PortError> {
        use tokio::io::AsyncWriteExt;
        let mut guard = self.writer.lock().await;
        let writer = guard.as_mut().ok_or(PortError::Closed)?;
        writer.flush().await.map_err(|_| PortError::Closed)?;
        let raw = writer.get_mut();
        raw.write_all(bytes).await.map_err(|_| PortError::Closed)?;
        raw.flush().await.map_err(|_| PortError::Closed)
    }
}

/// Starts a watchdog inside the worker's process group: a shell that waits for EOF on its
/// stdin, then SIGKILLs its whole group. The runtime holds the only write end, so however the
/// runtime ends — even by SIGKILL — the group dies with it, grandchildren included (the
/// parent-death signal reaches only the direct child). A process that leaves the group with
/// `setsid` escapes; nothing short of a cgroup catches that.
fn spawn_group_watchdog(pgid: u32) -> Option<tokio::process::ChildStdin> {
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "read _ignored; kill -KILL 0"])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(pgid as i32)
        .kill_on_drop(false);
    match cmd.spawn() {
        Ok(mut child) => {
            let stdin = child.stdin.take();
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            stdin
        }
        Err(e) => {
            // The worker may already be gone (its group with it); nothing to guard then.
            tracing::debug!(pgid, error = %e, "no group watchdog");
            None
        }
    }
}

fn set_parent_death_signal() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid are async-signal-safe and touch no memory.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may have died between fork and prctl: then we were re-parented already.
        if libc::getppid() == 1 {
            libc::_exit(1);
        }
    }
    Ok(())
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
        if let Err(violation) = routed {
            break violation;
        }
    };
    tracing::debug!(worker = %shared.worker_id, error = %failure, "worker channel closed");
    shared.poison(failure);
    let _ = done.send(true);
}

fn route(shared: &Shared, msg: FromWorker) -> Result<(), PortError> {
    let id = msg.id();
    let mut pending = shared.pending();
    let Some(slot) = pending.slots.remove(&id).inspect(|_| {
        shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }) else {
        return Err(PortError::ProtocolViolation {
            reason: format!("reply with unknown request id {id}: {}", describe(&msg)),
        });
    };
    match (slot, msg) {
        (Slot::Stream(tx), FromWorker::Chunk { seq, body, .. }) => {
            let _ = tx.send(StreamEvent::Chunk { seq, body });
            pending.slots.insert(id, Slot::Stream(tx));
            shared.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        (Slot::Stream(tx), FromWorker::Ok { body, .. }) => {
            let _ = tx.send(StreamEvent::End(Ok(body)));
        }
        (Slot::Stream(tx), FromWorker::Error { kind, message, .. }) => {
            let _ = tx.send(StreamEvent::End(Err(PortError::Remote { kind, message })));
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
        (slot, msg) => {
            let reason = match (&slot, &msg) {
                (Slot::Reset(_), FromWorker::Ok { .. }) => {
                    format!("ok with a non-nil body for reset {id} (a reset's ok carries nil)")
                }
                _ => format!("unexpected {} for request {id}", describe(&msg)),
            };
            drop(pending);
            slot.fail(PortError::ProtocolViolation {
                reason: reason.clone(),
            });
            return Err(PortError::ProtocolViolation { reason });
        }
    }
    Ok(())
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
