//! Helpers shared by the integration tests: worker specs and process checks.

#![allow(dead_code)]

pub mod fleet;

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

/// The local Docker engine, for a test that needs one; `None` (after a loud notice on stderr)
/// when no engine answers, so the test can skip. Under `CI=true` a missing engine is a failure:
/// this panics instead.
pub async fn docker_engine(test: &str) -> Option<wharf::Engine> {
    match wharf::Engine::local(Duration::from_secs(10)).await {
        Ok(engine) => Some(engine),
        Err(e) => {
            needs_docker(test, &format!("no Docker engine is reachable ({e})"));
            None
        }
    }
}

/// Whether the `docker` command line runs (a test whose workers are `docker run` processes
/// needs it); like [`docker_engine`], loud when it does not, and a failure under `CI=true`.
pub fn docker_cli(test: &str) -> bool {
    let ok = std::process::Command::new("docker")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        needs_docker(test, "the docker command is not installed");
    }
    ok
}

/// Reports a Docker test that cannot run: a panic under `CI=true`, a loud skip otherwise.
fn needs_docker(test: &str, why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs Docker and CI=true, but {why}");
    }
    // Straight to stderr: the test harness captures eprintln! of passing tests, and a skip
    // must be seen.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {test}: it needs Docker, but {why}. (Under CI=true this is a failure.) ***"
    );
}

/// The local engine and the demo worker's container spec over `transport` (the host-Python
/// image, built if missing), or `None` (after a loud notice) if the test must skip.
pub async fn demo_container(
    test: &str,
    transport: wharf::Transport,
) -> Option<(wharf::Engine, wharf::ContainerSpec)> {
    let engine = docker_engine(test).await?;
    init_logs();
    let opts = wharf::image::HostPythonOptions {
        worker_package: Some(python_path().into()),
        ..wharf::image::HostPythonOptions::default()
    };
    let img = wharf::image::ensure_host_python(&engine, &opts)
        .await
        .expect("the host-Python image builds");
    let spec = img
        .spec(["-m", "wharf_worker.demo"])
        .transport(transport)
        .init_timeout(Duration::from_secs(30));
    Some((engine, spec))
}

/// The containers of pool `pool`: running ones, or all (`all`).
pub async fn pool_containers(
    engine: &wharf::Engine,
    pool: &str,
    all: bool,
) -> Vec<bollard::models::ContainerSummary> {
    let filters =
        std::collections::HashMap::from([("label".to_owned(), vec![format!("wharf.pool={pool}")])]);
    engine
        .docker()
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap()
}

/// An example's binary, built next to the test binaries by `cargo test`.
pub fn example_exe(name: &str) -> PathBuf {
    // <target>/<profile>/deps/<test binary> -> <target>/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors()
        .nth(2)
        .expect("a test binary lives in <target>/<profile>/deps")
        .join("examples")
        .join(name)
}

/// The `--json` summary an example printed on its last line, after checking that it exited
/// successfully, that none of its `calls` hung and that every one is accounted for.
pub fn example_summary(out: &std::process::Output, calls: u64) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    println!("{summary}");
    assert_eq!(summary["hung"], 0);
    let (ok, failed) = (
        summary["ok"].as_u64().unwrap(),
        summary["failed"].as_u64().unwrap(),
    );
    assert_eq!(ok + failed, calls, "every call is accounted for");
    summary
}

/// The target directory this test binary was built in.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // <target>/<profile>/deps/<test binary>
    exe.ancestors()
        .nth(3)
        .expect("a test binary lives in <target>/<profile>/deps")
        .to_owned()
}

/// The example Rust worker (`wharf-example-worker`) linked statically, for a static-binary
/// image: `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target
/// <arch>-unknown-linux-gnu -p wharf --bin wharf-example-worker` (the explicit `--target` keeps
/// the flag off the host build). Built once per test process; cargo makes later calls no-ops.
pub fn static_example_worker() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
            let target = target_dir();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let status = std::process::Command::new(cargo)
                .args(["build", "--release", "--target", &triple])
                .args(["-p", "wharf", "--bin", "wharf-example-worker"])
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .env("CARGO_TARGET_DIR", &target)
                .current_dir(repo_root())
                .status()
                .expect("cargo runs");
            assert!(
                status.success(),
                "the static build of the example worker failed"
            );
            target.join(triple).join("release/wharf-example-worker")
        })
        .clone()
}
