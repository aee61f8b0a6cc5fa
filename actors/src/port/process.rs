//! The process host: one worker OS process, its process group, its logs and its death.
//!
//! `launch` starts the command with an explicit environment, the protocol channel (fds 3/4,
//! or stdin/stdout), its own process group and a parent-death signal, and a watchdog in the
//! group; it hands the channel to a `Router`. A reaper task always collects the exit status.
//! The group is killed by signal, never after its id could have been reused (see `Group`).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::process::Command;
use tokio::sync::watch;
use wharf_protocol::DEFAULT_MAX_FRAME;

use super::error::PortError;
use super::logs::{self, Stream, Tail};
use super::router::{self, Host, Router};

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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets one environment variable.
    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// Sets the channel.
    #[must_use]
    pub fn channel(mut self, channel: Channel) -> Self {
        self.channel = channel;
        self
    }

    /// Sets the init timeout.
    #[must_use]
    pub fn init_timeout(mut self, timeout: Duration) -> Self {
        self.init_timeout = timeout;
        self
    }

    /// Sets the max frame.
    #[must_use]
    pub fn max_frame(mut self, max_frame: usize) -> Self {
        self.max_frame = max_frame;
        self
    }

    /// Sets the worker's name.
    #[must_use]
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = id.into();
        self
    }

    /// Requires the group watchdog (see [`ProcessSpec::require_watchdog`]).
    #[must_use]
    pub fn require_watchdog(mut self, required: bool) -> Self {
        self.require_watchdog = required;
        self
    }

    pub(crate) fn program_name(&self) -> String {
        self.program.to_string_lossy().into_owned()
    }
}

/// The worker's process group, and what keeps its id from being reused while we may signal it.
struct Group {
    /// The watchdog, a member of the group that we never reap while the port lives: its
    /// process (or zombie) keeps the group id taken, so signalling the group can never reach
    /// another program's group that reused the id.
    watchdog: Option<tokio::process::Child>,
    /// Our end of the watchdog's stdin: when it closes (the port is released, or the runtime
    /// dies in any way) the watchdog kills the worker's whole process group.
    watchdog_stdin: Option<tokio::process::ChildStdin>,
    /// Set when the port is released, after its last kill: nothing signals the group after.
    released: bool,
}

/// A worker process group as a [`Host`].
struct ProcessHost {
    pgid: i32,
    group: Mutex<Group>,
    /// The leader's exit status, once reaped.
    exit: watch::Receiver<Option<std::process::ExitStatus>>,
}

impl ProcessHost {
    /// Signals the worker's process group, unless its id may no longer be ours: once the port
    /// has released the group, or (without a watchdog to hold the id) once the leader has
    /// been reaped.
    fn signal(&self, signal: Signal) {
        let group = self.group.lock().unwrap_or_else(|p| p.into_inner());
        if group.released || (group.watchdog.is_none() && self.exit.borrow().is_some()) {
            return;
        }
        // ESRCH (the group is already gone) is the expected outcome once the worker has exited.
        let _ = killpg(Pid::from_raw(self.pgid), signal);
    }
}

impl Host for ProcessHost {
    fn terminate(&self) {
        self.signal(Signal::SIGTERM);
    }

    fn kill(&self) {
        self.signal(Signal::SIGKILL);
    }

    fn release(&self) {
        // The last signal: then the watchdog (its zombie, if it is dead) is let go to be
        // reaped, and with it the group id, which another process may then reuse.
        self.signal(Signal::SIGKILL);
        let (watchdog, stdin) = {
            let mut group = self.group.lock().unwrap_or_else(|p| p.into_inner());
            group.released = true;
            (group.watchdog.take(), group.watchdog_stdin.take())
        };
        drop(stdin);
        drop(watchdog);
    }

    fn pid(&self) -> Option<u32> {
        Some(self.pgid as u32)
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

/// Starts the worker process described by `spec` and routes its channel; the caller performs
/// the handshake.
pub(crate) async fn launch(spec: &ProcessSpec) -> Result<Arc<Router>, PortError> {
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
            let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(from_r).map_err(spawn_err)?;
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

    let host = Arc::new(ProcessHost {
        pgid: pid as i32,
        group: Mutex::new(Group {
            watchdog,
            watchdog_stdin,
            released: false,
        }),
        exit: exit_rx.clone(),
    });
    let channel = router::Channel {
        input,
        output,
        max_frame: spec.max_frame,
    };
    Ok(Router::start(
        worker_id,
        channel,
        host,
        exit_rx,
        stderr_tail,
        open,
    ))
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
