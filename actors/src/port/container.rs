//! The container host: one worker in one Docker container, reached over a pair of FIFOs, a unix
//! socket or Docker's attach stream.
//!
//! `launch` creates the container (labelled `wharf.pool`, `wharf.owner`, `wharf.worker`),
//! connects the channel, starts it, and hands the channel to a `Router`; the port then does
//! the init-ping handshake as for any worker. The container is watched from two sides: the
//! channel's EOF (the router) and the engine's `wait` (a task of ours), because an attach
//! stream can stay open after the container has exited. How it ended — its exit code, and
//! whether the kernel killed it for memory — is read back from the engine.
//!
//! Transports:
//! - **fifo** (default, local engines only): the runtime makes two FIFOs (named pipes) in a
//!   per-launch directory that is bind-mounted into the container; the worker reads requests
//!   from one and writes replies to the other (`WHARF_CHANNEL=fifo`, `WHARF_FIFO_IN`,
//!   `WHARF_FIFO_OUT`). Pipe semantics across the container's boundary: the fastest path. Until
//!   the worker's first byte arrives the runtime holds the far end of each FIFO itself, so no
//!   open blocks on either side and a worker that has not opened its end yet is not taken for
//!   a dead one; the engine's `wait` reports a death before that.
//! - **socket** (local engines only): the runtime listens on a unix socket in the same kind of
//!   directory; the worker connects to it (`WHARF_CHANNEL=socket`, `WHARF_SOCKET`).
//! - **attach** (any engine): the protocol's `stdio` mode over Docker's attach stream, attached
//!   before the start (output before an attach is lost) with `stdin_once`, so the container
//!   gets EOF, and ends, when the runtime goes. The stream multiplexes stdout and stderr in
//!   chunks that do not line up with frames; stdout is reassembled into one byte stream.
//!
//! Defaults are secure and lean, each overridable: no network, read-only root filesystem with a
//! tmpfs `/tmp`, all capabilities dropped, no-new-privileges, `init` (tini) as PID 1, user
//! nobody (65534:65534), no log driver (the runtime forwards stdout and stderr into `tracing`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, InspectContainerOptions, KillContainerOptions,
    ListContainersOptions, RemoveContainerOptions, StartContainerOptions, WaitContainerOptions,
};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use wharf_protocol::DEFAULT_MAX_FRAME;

use super::error::PortError;
use super::fifo::{Fifos, FIFO_IN, FIFO_OUT};
use super::logs::{self, Stream, Tail};
use super::router::{self, Host, Router};
use crate::engine::{Engine, EngineError};

/// Where a container worker's frames travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// Two FIFOs (named pipes) in a directory bind-mounted into the container (local engines
    /// only): the fastest, with a pipe's cost per call.
    #[default]
    Fifo,
    /// A unix socket in a directory bind-mounted into the container (local engines only).
    Socket,
    /// Docker's attach stream: the worker's stdin and stdout (any engine).
    Attach,
}

/// A bind mount from the engine's host into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The path on the engine's host.
    pub source: PathBuf,
    /// The path in the container.
    pub target: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
}

impl Mount {
    /// A read-only mount of `source` at `target`.
    pub fn read_only(source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Mount {
        Mount {
            source: source.into(),
            target: target.into(),
            read_only: true,
        }
    }

    /// The engine's `Binds` form: `source:target:ro` (or `:rw`).
    pub fn bind(&self) -> String {
        let mode = if self.read_only { "ro" } else { "rw" };
        format!("{}:{}:{mode}", self.source.display(), self.target.display())
    }
}

/// How to start a container worker. Build one with [`ContainerSpec::new`] and its setters.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    /// The image (a tag or an id) on the engine.
    pub image: String,
    /// The command: the program and its arguments (replaces the image's entrypoint).
    pub command: Vec<String>,
    /// Environment variables, besides the `WHARF_*` ones the port adds.
    pub env: Vec<(String, String)>,
    /// Where frames travel.
    pub transport: Transport,
    /// The engine; the local one (default socket or `DOCKER_HOST`) if `None`.
    pub engine: Option<Engine>,
    /// Bind mounts.
    pub mounts: Vec<Mount>,
    /// tmpfs mounts: path and options (default `/tmp` with `rw,noexec,nosuid,size=64m`).
    pub tmpfs: Vec<(String, String)>,
    /// The network mode (default `none`: no network at all).
    pub network: String,
    /// A read-only root filesystem (default true).
    pub read_only_rootfs: bool,
    /// Drop every Linux capability (default true).
    pub drop_capabilities: bool,
    /// Forbid gaining privileges through setuid binaries (default true).
    pub no_new_privileges: bool,
    /// Run tini as PID 1, so signals reach the worker and zombies are reaped (default true).
    pub init: bool,
    /// The user (`uid:gid` or a name); default `65534:65534` (nobody), never root unless asked;
    /// the image's own user if `None`.
    pub user: Option<String>,
    /// The working directory; the image's if `None`.
    pub workdir: Option<String>,
    /// The memory limit in bytes (swap included: no swap beyond it).
    pub memory: Option<u64>,
    /// The CPU limit in CPUs (0.5 = half a CPU).
    pub cpus: Option<f64>,
    /// The most processes the container may hold.
    pub pids_limit: Option<i64>,
    /// Extra labels.
    pub labels: Vec<(String, String)>,
    /// Largest payload either side may send.
    pub max_frame: usize,
    /// How long the worker may take to answer the init ping (from the start request).
    pub init_timeout: Duration,
    /// The worker's name in logs, labels and `WHARF_WORKER_ID`.
    pub worker_id: String,
    /// The pool the container belongs to (the `wharf.pool` label; set by the pool).
    pub pool: String,
    /// The pool instance (the `wharf.instance` label; set by the pool, see [`new_instance`]).
    pub instance: String,
}

impl ContainerSpec {
    /// A spec for `image` running `command` (program and arguments), with the secure defaults
    /// and the FIFO transport.
    pub fn new<I, S>(image: impl Into<String>, command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            image: image.into(),
            command: command.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            transport: Transport::default(),
            engine: None,
            mounts: Vec::new(),
            tmpfs: vec![("/tmp".into(), "rw,noexec,nosuid,size=64m".into())],
            network: "none".into(),
            read_only_rootfs: true,
            drop_capabilities: true,
            no_new_privileges: true,
            init: true,
            user: Some("65534:65534".into()),
            workdir: None,
            memory: None,
            cpus: None,
            pids_limit: None,
            labels: Vec::new(),
            max_frame: DEFAULT_MAX_FRAME,
            init_timeout: Duration::from_secs(30),
            worker_id: "worker".into(),
            pool: "wharf".into(),
            instance: String::new(),
        }
    }

    /// Sets one environment variable.
    #[must_use]
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// Sets the transport.
    #[must_use]
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Runs the container on `engine`.
    #[must_use]
    pub fn engine(mut self, engine: Engine) -> Self {
        self.engine = Some(engine);
        self
    }

    /// Adds a bind mount.
    #[must_use]
    pub fn mount(
        mut self,
        source: impl Into<PathBuf>,
        target: impl Into<PathBuf>,
        read_only: bool,
    ) -> Self {
        self.mounts.push(Mount {
            source: source.into(),
            target: target.into(),
            read_only,
        });
        self
    }

    /// Sets the user (`uid:gid` or a name).
    #[must_use]
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Sets the memory limit, in bytes.
    #[must_use]
    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = Some(bytes);
        self
    }

    /// Sets the CPU limit, in CPUs.
    #[must_use]
    pub fn cpus(mut self, cpus: f64) -> Self {
        self.cpus = Some(cpus);
        self
    }

    /// Sets the process limit.
    #[must_use]
    pub fn pids_limit(mut self, n: i64) -> Self {
        self.pids_limit = Some(n);
        self
    }

    /// Sets the network mode (`none`, `bridge`, a network's name ...).
    #[must_use]
    pub fn network(mut self, mode: impl Into<String>) -> Self {
        self.network = mode.into();
        self
    }

    /// Sets the init timeout.
    #[must_use]
    pub fn init_timeout(mut self, timeout: Duration) -> Self {
        self.init_timeout = timeout;
        self
    }

    /// Sets the worker's name.
    #[must_use]
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = id.into();
        self
    }

    /// The engine the container runs on: the spec's, or the local one.
    pub async fn engine_or_local(&self) -> Result<Engine, EngineError> {
        match &self.engine {
            Some(engine) => Ok(engine.clone()),
            None => local_engine().await,
        }
    }
}

/// Labels every container of wharf carries.
pub mod labels {
    /// The pool's name.
    pub const POOL: &str = "wharf.pool";
    /// The pool instance that created it: two pools of the same name never touch each
    /// other's containers.
    pub const INSTANCE: &str = "wharf.instance";
    /// The runtime instance that created it ([`super::owner`]).
    pub const OWNER: &str = "wharf.owner";
    /// Where that runtime runs: the machine's boot id and the runtime's pid namespace. Only a
    /// runtime in the same place can tell whether the owner still runs.
    pub const HOST: &str = "wharf.host";
    /// The worker's name.
    pub const WORKER: &str = "wharf.worker";
}

/// This runtime instance's name in `wharf.owner` labels: its process id and a random part, so
/// a later runtime (even with the same pid) tells its own containers from a dead one's.
pub fn owner() -> &'static str {
    static OWNER: OnceLock<String> = OnceLock::new();
    OWNER.get_or_init(|| format!("{}-{:08x}", std::process::id(), rand::random::<u32>()))
}

/// Whether `s` has the form of an [`owner`]: `<pid>-<8 hex digits>`.
fn is_owner(s: &str) -> bool {
    s.split_once('-').is_some_and(|(pid, tag)| {
        !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && tag.len() == 8
            && tag.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// Where this runtime runs, for `wharf.host` labels: the boot id and the pid namespace.
fn host_id() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let pidns = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        format!("{}:{pidns}", boot.trim())
    })
}

/// A new pool instance id, unique in this runtime and across runtimes.
pub fn new_instance() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{}.{}", owner(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Whether the runtime that created a container is known to be gone: it ran in this same place
/// (boot and pid namespace) and its process no longer exists. An owner elsewhere (another
/// machine, another container) cannot be judged from here and is assumed alive.
fn owner_gone(owner: &str, host: &str) -> bool {
    if owner == self::owner() || host != host_id() {
        return false;
    }
    !owner
        .split('-')
        .next()
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// The local engine, connected once per runtime.
pub async fn local_engine() -> Result<Engine, EngineError> {
    static LOCAL: tokio::sync::OnceCell<Engine> = tokio::sync::OnceCell::const_new();
    LOCAL
        .get_or_try_init(|| Engine::local(Duration::from_secs(10)))
        .await
        .cloned()
}

/// Which containers a [`sweep`] removes.
#[derive(Debug, Clone, Copy)]
pub enum Sweep<'a> {
    /// Those of the pool named so whose owner runtime is known to be gone (see `wharf.host`).
    Leftovers {
        /// The pool's name.
        pool: &'a str,
    },
    /// Every container of one pool instance.
    Instance {
        /// The pool instance id ([`new_instance`]).
        instance: &'a str,
    },
}

/// Removes the containers `what` names on `engine`, and waits (up to 10 s) until the engine no
/// longer lists them. Returns how many there were.
pub async fn sweep(engine: &Engine, what: Sweep<'_>) -> Result<usize, EngineError> {
    let (label, value) = match what {
        Sweep::Leftovers { pool } => {
            sweep_channel_dirs();
            (labels::POOL, pool)
        }
        Sweep::Instance { instance } => (labels::INSTANCE, instance),
    };
    let mut found = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let listed = tokio::time::timeout(left, list_labelled(engine, label, value)).await;
        let ids: Vec<String> = listed
            .map_err(|_| EngineError::Timeout {
                engine: engine.name().to_owned(),
                after: Duration::from_secs(10),
            })??
            .into_iter()
            .filter(|(_, labels)| match what {
                Sweep::Instance { .. } => true,
                Sweep::Leftovers { .. } => {
                    let get = |k: &str| labels.get(k).map_or("", String::as_str);
                    owner_gone(get(labels::OWNER), get(labels::HOST))
                }
            })
            .map(|(id, _)| id)
            .collect();
        let count = *found.get_or_insert(ids.len());
        if ids.is_empty() {
            if count > 0 {
                tracing::info!(?what, removed = count, "removed containers");
            }
            return Ok(count);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(EngineError::Api {
                engine: engine.name().to_owned(),
                what: format!("the removal of {} container(s) ({what:?})", ids.len()),
                reason: "still listed after 10 s".into(),
            });
        }
        for id in &ids {
            // Already being removed (by the worker's own release) is fine: we wait below.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let removal = engine.docker().remove_container(id, Some(force_remove()));
            let _ = tokio::time::timeout(left, removal).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The containers labelled `label=value` on `engine`: id and labels.
async fn list_labelled(
    engine: &Engine,
    label: &str,
    value: &str,
) -> Result<Vec<(String, HashMap<String, String>)>, EngineError> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{label}={value}")])]);
    let list = engine
        .docker()
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(|e| engine.api_error("the container list", e))?;
    Ok(list
        .into_iter()
        .filter_map(|c| Some((c.id?, c.labels.unwrap_or_default())))
        .collect())
}

/// A container as a [`Host`].
struct ContainerHost {
    engine: Engine,
    id: String,
    /// The host pid of the container's first process, once it runs.
    pid: OnceLock<u32>,
    /// Set by the exit watch before it publishes the exit: the kernel killed it for memory.
    oom_killed: AtomicBool,
    /// The per-launch channel directory (socket or FIFOs), removed on release.
    channel_dir: Option<PathBuf>,
    released: AtomicBool,
    /// Publishes how the container ended (set once it is started; see [`watch_exit`]).
    exit: OnceLock<Arc<watch::Sender<Option<ExitStatus>>>>,
}

/// How long a killed container's end may take to be confirmed by its engine before the
/// worker is taken for dead anyway: an engine that does not answer must not keep a worker,
/// and its slot, waiting without end.
const KILL_CONFIRM: Duration = Duration::from_secs(10);

/// Publishes a container's end as a kill its engine could not confirm (status 137), unless
/// its end is known already.
fn take_for_killed(exit: &watch::Sender<Option<ExitStatus>>, container: &str, engine: &str) {
    use std::os::unix::process::ExitStatusExt;
    exit.send_if_modified(|status| {
        let unknown = status.is_none();
        if unknown {
            tracing::warn!(
                container,
                engine,
                "the engine did not confirm the container's end: taken for killed"
            );
            *status = Some(ExitStatus::from_raw(137 << 8));
        }
        unknown
    });
}

impl ContainerHost {
    /// Sends `signal` to the container from a task (the engine's API is not instant).
    fn signal(&self, signal: &'static str) {
        if self.released.load(Ordering::Acquire) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (docker, id) = (self.engine.docker().clone(), self.id.clone());
        rt.spawn(async move {
            // 404/409 (gone, not running) are the expected outcome after an exit.
            let options = KillContainerOptions {
                signal: signal.into(),
            };
            let _ = docker.kill_container(&id, Some(options)).await;
        });
    }
}

impl Host for ContainerHost {
    fn terminate(&self) {
        self.signal("SIGTERM");
    }

    fn kill(&self) {
        self.signal("SIGKILL");
        let Some(exit) = self.exit.get().cloned() else {
            return;
        };
        let (id, engine) = (self.id.clone(), self.engine.name().to_owned());
        if self.engine.is_lost() {
            // Its engine is unreachable: nothing will confirm the end. The engine's return
            // sweeps the container.
            return take_for_killed(&exit, &id, &engine);
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let mut ended = exit.subscribe();
            let confirmed = tokio::time::timeout(KILL_CONFIRM, ended.wait_for(Option::is_some));
            if confirmed.await.is_err() {
                take_for_killed(&exit, &id, &engine);
            }
        });
    }

    fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(dir) = &self.channel_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        let (docker, id) = (self.engine.docker().clone(), self.id.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _ = docker.remove_container(&id, Some(force_remove())).await;
                });
            }
            // No runtime left (it is shutting down): the container ends by itself on its
            // channel's EOF, and the pool's next start sweeps it.
            Err(_) => tracing::debug!(container = %self.id, "no runtime to remove the container"),
        }
    }

    fn pid(&self) -> Option<u32> {
        self.pid.get().copied()
    }

    fn oom_killed(&self) -> bool {
        self.oom_killed.load(Ordering::Acquire)
    }
}

fn force_remove() -> RemoveContainerOptions {
    RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    }
}

/// The root of the per-launch channel directories (a socket or two FIFOs each).
///
/// Mode 0700: no other user of this machine may reach a worker's socket or FIFOs (the engine
/// mounts the per-launch directory as root; the container never passes through this one).
/// Under the temp dir, unless that path is too long for a socket address (108 bytes); `/tmp`
/// then.
fn channel_root() -> PathBuf {
    let name = format!("wharf-{}", owner());
    let tmp = std::env::temp_dir();
    // Room for "/<launch>/s" under the root.
    if tmp.as_os_str().len() + name.len() + 24 < 100 {
        tmp.join(name)
    } else {
        PathBuf::from("/tmp").join(name)
    }
}

/// The roots under which runtimes make channel directories.
fn channel_bases() -> Vec<PathBuf> {
    let mut bases = vec![std::env::temp_dir()];
    if !bases.contains(&PathBuf::from("/tmp")) {
        bases.push(PathBuf::from("/tmp"));
    }
    bases
}

/// Removes the channel directories of runtimes of this machine that are gone.
fn sweep_channel_dirs() {
    for base in channel_bases() {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only names of the form a runtime gives them (`wharf-<pid>-<8 hex digits>`): any
            // other `wharf-*` directory is someone else's.
            let Some(owner) = name.strip_prefix("wharf-").filter(|o| is_owner(o)) else {
                continue;
            };
            if entry.path().is_dir() && owner_gone(owner, host_id()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// A container name: `wharf-<worker>-<instance>-<launch>`, in Docker's alphabet.
fn container_name(worker_id: &str, instance: &str, launch: u64) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("wharf-{}-{}-{launch}", clean(worker_id), clean(instance))
}

/// Starts the worker container described by `spec` and routes its channel; the caller
/// performs the handshake.
pub(crate) async fn launch(spec: &ContainerSpec) -> Result<Arc<Router>, PortError> {
    let engine = spec
        .engine_or_local()
        .await
        .map_err(|e| failed(spec, e.to_string()))?;
    let docker = engine.docker();

    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!("WHARF_MAX_FRAME={}", spec.max_frame));
    env.push(format!("WHARF_WORKER_ID={}", spec.worker_id));
    // This launch's number in the runtime: container names and channel directories are unique
    // per launch, even for a worker name used again before its old container is removed.
    static LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let launch = LAUNCHES.fetch_add(1, Ordering::Relaxed);
    let mut binds: Vec<String> = spec.mounts.iter().map(Mount::bind).collect();
    // A short, unique directory per launch (socket paths must stay under 108 bytes), mounted
    // at /run/wharf; none for attach.
    let dir = channel_root().join(launch.to_string());
    let cannot = |what: &str, e: std::io::Error| {
        failed(spec, format!("cannot {what} in {}: {e}", dir.display()))
    };
    let (local, dir) = match spec.transport {
        Transport::Attach => {
            env.push("WHARF_CHANNEL=stdio".into());
            (Local::Attach, None)
        }
        Transport::Socket => {
            let listener =
                in_channel_dir(&dir, listen).map_err(|e| cannot("listen on a socket", e))?;
            env.push("WHARF_CHANNEL=socket".into());
            env.push(format!("WHARF_SOCKET={CHANNEL_DIR}/s"));
            (Local::Socket(listener), Some(dir.clone()))
        }
        Transport::Fifo => {
            let fifos =
                in_channel_dir(&dir, Fifos::make).map_err(|e| cannot("make the FIFOs", e))?;
            env.push("WHARF_CHANNEL=fifo".into());
            env.push(format!("WHARF_FIFO_IN={CHANNEL_DIR}/{FIFO_IN}"));
            env.push(format!("WHARF_FIFO_OUT={CHANNEL_DIR}/{FIFO_OUT}"));
            (Local::Fifo(fifos), Some(dir.clone()))
        }
    };
    if let Some(dir) = &dir {
        binds.push(format!("{}:{CHANNEL_DIR}:rw", dir.display()));
    }
    let mut labels: HashMap<String, String> = spec.labels.iter().cloned().collect();
    let instance = if spec.instance.is_empty() {
        owner()
    } else {
        &spec.instance
    };
    labels.insert(labels::POOL.into(), spec.pool.clone());
    labels.insert(labels::INSTANCE.into(), instance.to_owned());
    labels.insert(labels::OWNER.into(), owner().into());
    labels.insert(labels::HOST.into(), host_id().into());
    labels.insert(labels::WORKER.into(), spec.worker_id.clone());
    let attach = spec.transport == Transport::Attach;
    let host_config = HostConfig {
        binds: Some(binds),
        network_mode: Some(spec.network.clone()),
        readonly_rootfs: Some(spec.read_only_rootfs),
        tmpfs: Some(spec.tmpfs.iter().cloned().collect()),
        cap_drop: spec.drop_capabilities.then(|| vec!["ALL".into()]),
        security_opt: spec
            .no_new_privileges
            .then(|| vec!["no-new-privileges:true".into()]),
        init: Some(spec.init),
        memory: spec.memory.map(|m| m as i64),
        memory_swap: spec.memory.map(|m| m as i64),
        nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
        pids_limit: spec.pids_limit,
        log_config: Some(HostConfigLogConfig {
            typ: Some("none".into()),
            config: None,
        }),
        ..Default::default()
    };
    let config = ContainerCreateBody {
        image: Some(spec.image.clone()),
        entrypoint: Some(spec.command.clone()),
        cmd: Some(Vec::new()),
        env: Some(env),
        labels: Some(labels),
        user: spec.user.clone(),
        working_dir: spec.workdir.clone(),
        attach_stdin: Some(attach),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(attach),
        stdin_once: Some(attach),
        tty: Some(false),
        host_config: Some(host_config),
        ..Default::default()
    };
    let name = container_name(&spec.worker_id, instance, launch);
    // From here until the launch succeeds, however it ends (an error, a timeout, the caller
    // giving up at any await), the container (by name) and the channel directory are removed.
    let mut guard = LaunchGuard {
        engine: engine.clone(),
        name: Some(name.clone()),
        dir: dir.clone(),
    };
    let options = CreateContainerOptions {
        name: Some(name),
        ..Default::default()
    };
    let created = within(
        spec.init_timeout,
        docker.create_container(Some(options), config),
    )
    .await
    .map_err(|e| failed(spec, format!("create: {e}")))?;
    // From here on, a failure removes the container (and the channel directory).
    let host = Arc::new(ContainerHost {
        engine: engine.clone(),
        id: created.id,
        pid: OnceLock::new(),
        oom_killed: AtomicBool::new(false),
        channel_dir: dir,
        released: AtomicBool::new(false),
        exit: OnceLock::new(),
    });
    let router = start(spec, &host, local).await?;
    guard.name = None;
    guard.dir = None;
    Ok(router)
}

/// Undoes a launch that did not finish: removes its container (by name, so even one whose
/// create was under way) and its channel directory.
struct LaunchGuard {
    engine: Engine,
    name: Option<String>,
    dir: Option<PathBuf>,
}

impl Drop for LaunchGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        let Some(name) = self.name.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let docker = self.engine.docker().clone();
        rt.spawn(async move {
            // A create still under way may land after a first try: try again, briefly.
            for _ in 0..20 {
                match docker.remove_container(&name, Some(force_remove())).await {
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 404,
                        ..
                    }) => tokio::time::sleep(Duration::from_millis(250)).await,
                    _ => return,
                }
            }
        });
    }
}

/// Runs an engine request under `limit`: an engine that stops answering must not hang a
/// launch or a shutdown.
async fn within<T>(
    limit: Duration,
    request: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("the engine did not answer within {limit:?}")),
    }
}

/// Attaches, starts, watches and connects the created container.
async fn start(
    spec: &ContainerSpec,
    host: &Arc<ContainerHost>,
    local: Local,
) -> Result<Arc<Router>, PortError> {
    let docker = host.engine.docker();
    let id = host.id.as_str();
    let attach = spec.transport == Transport::Attach;
    let options = AttachContainerOptions {
        stdin: attach,
        stdout: true,
        stderr: true,
        stream: true,
        logs: false,
        detach_keys: None,
    };
    // Before the start: output written before an attach is lost.
    let attached = within(
        spec.init_timeout,
        docker.attach_container(id, Some(options)),
    )
    .await
    .map_err(|e| failed(spec, format!("attach: {e}")))?;
    let stderr_tail = Tail::default();
    // Demultiplex the attach stream: stdout is the channel (attach) or a log (socket, FIFOs);
    // stderr is a log. Each goes through an in-memory pipe, so a slow reader pushes back.
    let (stdout_rx, stdout_tx) = tokio::io::simplex(64 * 1024);
    let (stderr_rx, stderr_tx) = tokio::io::simplex(64 * 1024);
    tokio::spawn(demux(attached.output, stdout_tx, stderr_tx));
    tokio::spawn(logs::forward(
        stderr_rx,
        spec.worker_id.clone(),
        Stream::Stderr,
        Some(stderr_tail.clone()),
    ));

    within(
        spec.init_timeout,
        docker.start_container(id, None::<StartContainerOptions>),
    )
    .await
    .map_err(|e| failed(spec, format!("start: {e}")))?;
    let inspected = within(
        spec.init_timeout,
        docker.inspect_container(id, None::<InspectContainerOptions>),
    )
    .await;
    if let Some(pid) = inspected
        .ok()
        .and_then(|c| c.state)
        .and_then(|s| s.pid)
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|pid| *pid > 0)
    {
        let _ = host.pid.set(pid);
    }

    // The engine's side of the watch: the exit code once the container stops running.
    let (exit_tx, exit_rx) = watch::channel(None);
    let exit_tx = Arc::new(exit_tx);
    let _ = host.exit.set(exit_tx.clone());
    let open = Arc::new(AtomicBool::new(true));
    tokio::spawn(watch_exit(host.clone(), exit_tx, open.clone()));

    let stdout: Box<dyn AsyncRead + Send + Unpin> = Box::new(stdout_rx);
    // stdout is a log unless it is the channel.
    let log_stdout = |stdout| {
        let id = spec.worker_id.clone();
        tokio::spawn(logs::forward(stdout, id, Stream::Stdout, None));
    };
    let (input, output): (
        Box<dyn AsyncRead + Send + Unpin>,
        Box<dyn AsyncWrite + Send + Unpin>,
    ) = match local {
        Local::Attach => (stdout, Box::new(attached.input)),
        Local::Fifo(fifos) => {
            log_stdout(stdout);
            fifos.into_channel(exit_rx.clone())
        }
        Local::Socket(listener) => {
            log_stdout(stdout);
            let mut exited = exit_rx.clone();
            let ended = async move {
                let _ = exited.wait_for(Option::is_some).await;
            };
            let accepted = tokio::select! {
                accepted = tokio::time::timeout(spec.init_timeout, listener.accept()) => accepted,
                () = ended => {
                    stderr_tail.wait_eof(Duration::from_millis(200)).await;
                    let status = *exit_rx.borrow();
                    return Err(PortError::ExitedBeforeReady(super::ExitInfo {
                        status,
                        stderr_tail: stderr_tail.lines(),
                        oom_killed: host.oom_killed(),
                    }));
                }
            };
            match accepted {
                Ok(Ok((stream, _))) => {
                    let (r, w) = stream.into_split();
                    (Box::new(r), Box::new(w))
                }
                Ok(Err(e)) => return Err(failed(spec, format!("accept: {e}"))),
                Err(_) => {
                    return Err(PortError::InitTimeout {
                        after: spec.init_timeout,
                        info: super::ExitInfo {
                            status: None,
                            stderr_tail: stderr_tail.lines(),
                            oom_killed: false,
                        },
                    })
                }
            }
        }
    };
    let channel = router::Channel {
        input,
        output,
        max_frame: spec.max_frame,
    };
    Ok(Router::start(
        spec.worker_id.clone(),
        channel,
        host.clone(),
        exit_rx,
        stderr_tail,
        open,
    ))
}

/// Waits for the container to stop running, reads how it ended, and publishes it.
async fn watch_exit(
    host: Arc<ContainerHost>,
    exit: Arc<watch::Sender<Option<ExitStatus>>>,
    open: Arc<AtomicBool>,
) {
    use std::os::unix::process::ExitStatusExt;
    let docker = host.engine.docker();
    let options = WaitContainerOptions {
        condition: "not-running".into(),
    };
    let waited = docker.wait_container(&host.id, Some(options)).next().await;
    let mut code = match waited {
        Some(Ok(reply)) => Some(reply.status_code),
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Some(code),
        _ => None,
    };
    // The wait says how it ended; the inspection says whether the kernel killed it for memory
    // (and the code, if the wait could not tell).
    if let Ok(state) = docker
        .inspect_container(&host.id, None::<InspectContainerOptions>)
        .await
        .map(|c| c.state.unwrap_or_default())
    {
        host.oom_killed
            .store(state.oom_killed.unwrap_or(false), Ordering::Release);
        code = code.or(state.exit_code);
    }
    // An engine that cannot say (it went away) reports the worker as killed.
    let code = code.unwrap_or(137).clamp(0, 255) as i32;
    open.store(false, Ordering::Release);
    // Unless it was taken for killed already (its engine did not answer).
    exit.send_if_modified(|status| {
        status.is_none() && status.replace(ExitStatus::from_raw(code << 8)).is_none()
    });
}

/// Splits Docker's attach stream into the worker's stdout and stderr bytes. Frames are
/// reassembled from stdout by whoever reads it: attach chunks do not line up with them.
async fn demux<S, W>(mut output: S, mut stdout: W, mut stderr: W)
where
    S: futures::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut stdout_open = true;
    while let Some(item) = output.next().await {
        match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                // Once the channel's reader is gone (the port closed), stdout is dropped and
                // stderr still flows: a dying worker's last lines (its traceback) matter most.
                if stdout_open && stdout.write_all(&message).await.is_err() {
                    stdout_open = false;
                }
            }
            Ok(LogOutput::StdErr { message }) => {
                if stderr.write_all(&message).await.is_err() {
                    break;
                }
            }
            Ok(LogOutput::StdIn { .. }) => {}
            Err(_) => break,
        }
    }
    let _ = stdout.shutdown().await;
    let _ = stderr.shutdown().await;
}

/// Where the per-launch channel directory is mounted in the container.
const CHANNEL_DIR: &str = "/run/wharf";

/// The channel a launch prepared on this machine before the container runs.
enum Local {
    /// None: the channel is the attach stream.
    Attach,
    /// The socket the worker connects to.
    Socket(tokio::net::UnixListener),
    /// The FIFO pair, both ends already open on the runtime's side.
    Fifo(Fifos),
}

/// Makes the per-launch channel directory `dir` (under the private root, see
/// [`channel_root`]) and `make`s the channel in it; removes the directory if that fails.
fn in_channel_dir<T>(
    dir: &Path,
    make: impl FnOnce(&Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    use std::os::unix::fs::PermissionsExt;
    let made = (|| {
        if let Some(root) = dir.parent() {
            std::fs::create_dir_all(root)?;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        make(dir)
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    made
}

/// Listens on a socket in `dir` that any user may connect to (a worker running as another
/// user than the runtime must be able to).
fn listen(dir: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("s");
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

fn failed(spec: &ContainerSpec, reason: String) -> PortError {
    PortError::SpawnFailed {
        program: format!("container image {}", spec.image),
        reason,
    }
}
