//! Helpers shared by the integration tests: worker specs and process checks.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use wharf::{Backoff, Pool, PoolBuilder, ProcessSpec};

/// How long a test waits for a pool's workers to be ready.
pub const READY: Duration = Duration::from_secs(30);

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Python worker package's directory, put on the workers' `PYTHONPATH` so the tests run
/// whether or not the package is installed.
pub fn python_path() -> String {
    repo_root().join("protocol/python").display().to_string()
}

/// A spec for the Python demo worker with extra arguments.
pub fn demo_spec(args: &[&str]) -> ProcessSpec {
    ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"])
        .expect("non-empty argv")
        .args(args.iter().copied())
        .env("PYTHONPATH", python_path())
        .init_timeout(Duration::from_secs(20))
}

/// A spec for a Python one-liner (no SDK).
pub fn python_spec(code: &str) -> ProcessSpec {
    ProcessSpec::from_argv(["python3", "-c", code]).expect("non-empty argv")
}

/// Whether a process with this pid exists (a zombie counts as existing).
pub fn pid_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits until `cond` holds or `limit` passes; returns whether it held.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// SIGKILLs one process.
pub fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Installs a test log subscriber once (RUST_LOG controls it).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A worker script from `tests/workers/`, with the SDK on its `PYTHONPATH`.
pub fn fixture(script: &str) -> ProcessSpec {
    ProcessSpec::new("python3")
        .args([repo_root().join("tests/workers").join(script)])
        .env("PYTHONPATH", python_path())
        .init_timeout(Duration::from_secs(20))
}

/// A pool builder for `size` demo workers, with a short backoff and no jitter.
pub fn builder(size: usize) -> PoolBuilder {
    init_logs();
    Pool::builder(demo_spec(&[])).size(size).backoff(Backoff {
        initial: Duration::from_millis(20),
        jitter: 0.0,
        ..Backoff::default()
    })
}

/// Builds the pool and waits until `size` workers are ready.
pub async fn ready(builder: PoolBuilder, size: usize) -> Pool {
    let pool = builder.build().await.unwrap();
    pool.wait_ready(size, READY).await.unwrap();
    pool
}
