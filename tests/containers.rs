//! Container workers against the real Docker engine: the same pool, protocol and guarantees
//! as process workers, over every transport (FIFOs, the default; a unix socket; attach). These tests need a Docker engine: where none is
//! reachable they say so loudly and skip, except under `CI=true`, where that is a failure.

mod common;

use std::time::Duration;

use common::*;
use wharf::{CallOptions, ContainerSpec, Engine, Error, Pool, Transport, Value};

/// How many containers pool `pool` has, running or not.
async fn containers_of(engine: &Engine, pool: &str) -> usize {
    pool_containers(engine, pool, true).await.len()
}

async fn serves(transport: Transport, pool_name: &str) {
    let Some((engine, spec)) = demo_container(pool_name, transport).await else {
        return;
    };
    let pool = Pool::builder(spec)
        .name(pool_name)
        .size(2)
        .build()
        .await
        .unwrap();
    pool.wait_ready(2, READY).await.unwrap();
    assert_eq!(containers_of(&engine, pool_name).await, 2);
    assert_eq!(
        pool.call::<Value>("echo", &"hi").await.unwrap(),
        Value::from("hi")
    );
    // Over a MiB: many attach chunks, one frame.
    let big = Value::Binary(vec![0x5A; 1_500_000]);
    assert_eq!(
        pool.call_value("echo", big.clone(), CallOptions::new())
            .await
            .unwrap(),
        big
    );
    // Sessions are isolated.
    let a = pool.session("a").await.unwrap();
    a.call::<Value>("state_set", &serde_json::json!({"key": "k", "value": "a"}))
        .await
        .unwrap();
    a.end().await.unwrap();
    let b = pool.session("b").await.unwrap();
    let seen = b
        .call::<Value>("state_get", &serde_json::json!({"key": "k"}))
        .await
        .unwrap();
    assert_eq!(seen, Value::Nil);
    b.end().await.unwrap();
    // A crash is a typed error, and the slot comes back.
    let err = pool.call::<Value>("crash", &3).await.unwrap_err();
    assert!(matches!(err, Error::WorkerDied { .. }), "{err:?}");
    pool.wait_ready(2, READY).await.unwrap();
    pool.shutdown().await;
    assert_eq!(
        containers_of(&engine, pool_name).await,
        0,
        "shutdown leaves no container"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_containers_serves_over_attach() {
    serves(Transport::Attach, "ct-attach").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_containers_serves_over_a_socket() {
    serves(Transport::Socket, "ct-socket").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_containers_serves_over_fifos() {
    serves(Transport::Fifo, "ct-fifo").await;
}

#[test]
fn fifos_are_the_default_transport() {
    assert_eq!(
        ContainerSpec::new("any", ["worker"]).transport,
        Transport::Fifo
    );
}

/// Where the container of a pool's worker has its channel directory mounted from.
async fn channel_dir(engine: &Engine, pool: &str) -> std::path::PathBuf {
    let c = inspect_worker(engine, pool).await;
    c.mounts
        .unwrap_or_default()
        .into_iter()
        .find(|m| m.destination.as_deref() == Some("/run/wharf"))
        .and_then(|m| m.source)
        .expect("the channel directory is mounted at /run/wharf")
        .into()
}

/// A worker that never opens its channel fails with the init timeout, within it, and leaves
/// neither its container nor its channel directory behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_opens_its_fifos_fails_with_the_init_timeout_and_leaves_nothing() {
    let Some((engine, spec)) = demo_container("ct-never-opens", Transport::Fifo).await else {
        return;
    };
    sweep_leftovers(&engine, "ct-never-opens").await;
    let python = spec.command[0].clone();
    let mut spec = ContainerSpec {
        command: vec![python, "-c".into(), "import time; time.sleep(120)".into()],
        ..spec
    }
    .init_timeout(Duration::from_secs(4));
    spec.pool = "ct-never-opens".into();
    spec.instance = "ct-never-opens".into();
    let spec: wharf::WorkerSpec = spec.into();
    let started = std::time::Instant::now();
    let start = tokio::spawn(async move { wharf_actors::port::Port::start(&spec).await });
    // While it starts: where its channel directory is.
    let mut dir = None;
    while dir.is_none() && !start.is_finished() {
        if !pool_containers(&engine, "ct-never-opens", false)
            .await
            .is_empty()
        {
            dir = Some(channel_dir(&engine, "ct-never-opens").await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dir = dir.expect("the container ran");
    // The worker (nobody) may read the request FIFO and write the reply FIFO, no more; the
    // directory above is the runtime's alone.
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    for (name, mode) in [("in", 0o644), ("out", 0o622)] {
        let meta = std::fs::metadata(dir.join(name)).unwrap();
        assert!(meta.file_type().is_fifo(), "{name} is not a FIFO");
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
    }
    let root = std::fs::metadata(dir.parent().unwrap()).unwrap();
    assert_eq!(root.permissions().mode() & 0o777, 0o700);
    let err = start.await.unwrap().unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, wharf::PortError::InitTimeout { after, .. } if after == Duration::from_secs(4)),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(12), "failed after {took:?}");
    assert!(
        eventually(Duration::from_secs(15), || !dir.exists()).await,
        "{} is left",
        dir.display()
    );
    assert_none_left(&engine, "ct-never-opens").await;
}

/// Removes the containers a killed earlier run of a test left in `pool` (a failed
/// `Port::start` removes its container from a task, which a test that ends at once cuts short).
async fn sweep_leftovers(engine: &Engine, pool: &str) {
    use wharf_actors::port::container::{sweep, Sweep};
    sweep(engine, Sweep::Leftovers { pool }).await.unwrap();
}

/// Waits (up to 15 s) until no container of `pool` is left.
async fn assert_none_left(engine: &Engine, pool: &str) {
    let started = std::time::Instant::now();
    while containers_of(engine, pool).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "a container of {pool} is left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A worker that dies before it has said anything over its FIFOs (its ends never written, so
/// the runtime's keepers still hold) is seen dead through the engine, at once, not after the
/// init timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_before_its_first_byte_is_seen_dead_at_once() {
    let Some((engine, spec)) = demo_container("ct-dies-early", Transport::Fifo).await else {
        return;
    };
    sweep_leftovers(&engine, "ct-dies-early").await;
    let python = spec.command[0].clone();
    let code = "import os; os.open(os.environ['WHARF_FIFO_OUT'], os.O_WRONLY); raise SystemExit(3)";
    let mut spec = ContainerSpec {
        command: vec![python, "-c".into(), code.into()],
        ..spec
    }
    .init_timeout(Duration::from_secs(60));
    spec.pool = "ct-dies-early".into();
    spec.instance = "ct-dies-early".into();
    let started = std::time::Instant::now();
    let err = wharf_actors::port::Port::start(&spec.into())
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "seen after {:?}",
        started.elapsed()
    );
    match err {
        wharf::PortError::ExitedBeforeReady(info) => {
            assert_eq!(info.status.and_then(|s| s.code()), Some(3), "{info:?}")
        }
        other => panic!("expected ExitedBeforeReady, got {other:?}"),
    }
    assert_none_left(&engine, "ct-dies-early").await;
}

/// The container a pool's worker runs in.
async fn inspect_worker(engine: &Engine, pool: &str) -> bollard::models::ContainerInspectResponse {
    let id = pool_containers(engine, pool, false).await[0]
        .id
        .clone()
        .unwrap();
    engine
        .docker()
        .inspect_container(
            &id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_run_with_the_secure_defaults_limits_and_labels() {
    let Some((engine, spec)) = demo_container("ct-secure", Transport::Fifo).await else {
        return;
    };
    let spec = spec.memory(256 << 20).cpus(0.5).pids_limit(64);
    let pool = Pool::builder(spec)
        .name("ct-secure")
        .size(1)
        .build()
        .await
        .unwrap();
    pool.wait_ready(1, READY).await.unwrap();
    let c = inspect_worker(&engine, "ct-secure").await;
    let host = c.host_config.unwrap();
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    assert_eq!(host.readonly_rootfs, Some(true));
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(
        host.security_opt,
        Some(vec!["no-new-privileges:true".to_owned()])
    );
    assert_eq!(host.init, Some(true));
    assert_eq!(host.memory, Some(256 << 20));
    assert_eq!(
        host.memory_swap,
        Some(256 << 20),
        "no swap beyond the limit"
    );
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.pids_limit, Some(64));
    assert!(host.tmpfs.unwrap().contains_key("/tmp"));
    let config = c.config.unwrap();
    assert_eq!(config.user.as_deref(), Some("65534:65534"));
    let labels = config.labels.unwrap();
    assert_eq!(labels["wharf.pool"], "ct-secure");
    assert!(labels["wharf.worker"].starts_with("ct-secure-0."));
    assert!(labels.contains_key("wharf.owner"));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_is_reported_as_such() {
    let Some((_engine, spec)) = demo_container("ct-oom", Transport::Fifo).await else {
        return;
    };
    let spec = spec.memory(96 << 20);
    let pool = Pool::builder(spec)
        .name("ct-oom")
        .size(1)
        .build()
        .await
        .unwrap();
    pool.wait_ready(1, READY).await.unwrap();
    let err = pool.call::<Value>("alloc", &512).await.unwrap_err();
    match &err {
        Error::WorkerDied {
            cause: wharf::PortError::WorkerDied(info),
            ..
        } => assert!(info.oom_killed, "{err}"),
        other => panic!("expected WorkerDied with an OOM kill, got {other:?}"),
    }
    assert!(err.to_string().contains("OOM"), "{err}");
    pool.wait_ready(1, READY).await.unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_kill_under_load_fails_only_the_killed_calls_and_the_pool_recovers() {
    docker_kill_under_load(Transport::Socket, "ct-chaos").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_kill_under_load_over_fifos_fails_only_the_killed_calls_and_the_pool_recovers() {
    docker_kill_under_load(Transport::Fifo, "ct-chaos-fifo").await;
}

async fn docker_kill_under_load(transport: Transport, name: &str) {
    let Some((engine, spec)) = demo_container(name, transport).await else {
        return;
    };
    let pool = Pool::builder(spec)
        .name(name)
        .size(3)
        .build()
        .await
        .unwrap();
    pool.wait_ready(3, READY).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = Vec::new();
    for c in 0..6 {
        let (pool, stop) = (pool.clone(), stop.clone());
        callers.push(tokio::spawn(async move {
            let (mut ok, mut died, mut other) = (0u32, 0u32, Vec::new());
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let ms = if i.is_multiple_of(4) { 5 } else { 0 };
                let call = pool.call::<Value>("sleep", &ms);
                match tokio::time::timeout(Duration::from_secs(20), call).await {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(Error::WorkerDied { .. })) => died += 1,
                    Ok(Err(e)) => other.push(e.to_string()),
                    Err(_) => panic!("caller {c}: a call hung"),
                }
            }
            (ok, died, other)
        }));
    }
    let mut kills = 0;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let running = pool_containers(&engine, name, false).await;
        if let Some(victim) = running.first().and_then(|c| c.id.clone()) {
            let killed = engine
                .docker()
                .kill_container(
                    &victim,
                    None::<bollard::query_parameters::KillContainerOptions>,
                )
                .await;
            if killed.is_ok() {
                kills += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut died) = (0, 0);
    for caller in callers {
        let (o, d, other) = caller.await.unwrap();
        assert!(
            other.is_empty(),
            "untyped or unexpected failures: {other:?}"
        );
        ok += o;
        died += d;
    }
    assert!(kills >= 4, "only {kills} kills landed");
    assert!(ok > 100, "only {ok} calls succeeded");
    assert!(died <= kills, "{died} calls died for {kills} kills");
    pool.wait_ready(3, READY).await.unwrap();
    println!(
        "{}",
        serde_json::json!({"scenario": "docker_kill_under_load", "transport": format!("{transport:?}"), "kills": kills, "ok": ok, "failed": died, "hung": 0})
    );
    pool.shutdown().await;
    assert_eq!(containers_of(&engine, name).await, 0);
}

/// Two pools of the same name in one runtime never touch each other's containers: each
/// removes only its own at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_of_the_same_name_keep_to_their_own_containers() {
    let Some((engine, spec)) = demo_container("ct-twins", Transport::Fifo).await else {
        return;
    };
    let a = Pool::builder(spec.clone())
        .name("ct-twins")
        .size(1)
        .build()
        .await
        .unwrap();
    a.wait_ready(1, READY).await.unwrap();
    let b = Pool::builder(spec)
        .name("ct-twins")
        .size(1)
        .build()
        .await
        .unwrap();
    b.wait_ready(1, READY).await.unwrap();
    assert_eq!(containers_of(&engine, "ct-twins").await, 2);
    let a2 = a.clone();
    let in_flight = tokio::spawn(async move { a2.call::<Value>("sleep", &800).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.shutdown().await;
    assert_eq!(in_flight.await.unwrap().unwrap(), Value::from(800));
    assert_eq!(
        containers_of(&engine, "ct-twins").await,
        1,
        "b removed a's container"
    );
    assert_eq!(a.stats().restarts, 0);
    a.shutdown().await;
    assert_eq!(containers_of(&engine, "ct-twins").await, 0);
}

/// The container counterpart of the main job, as a user runs it: `container_pool` under
/// `docker kill`s ends with every call accounted for, none hung, the pool recovered and no
/// container of it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_pool_example_serves_through_docker_kills() {
    let Some(_engine) = docker_engine("the_container_pool_example").await else {
        return;
    };
    let exe = example_exe("container_pool");
    for (transport, kill_every) in [("fifo", "250"), ("socket", "250"), ("attach", "500")] {
        let out = tokio::process::Command::new(&exe)
            .args(["--workers", "3", "--calls", "4000", "--concurrency", "12"])
            .args([
                "--kill-every",
                kill_every,
                "--transport",
                transport,
                "--json",
            ])
            .output()
            .await
            .expect("container_pool runs");
        let summary = example_summary(&out, 4000);
        assert_eq!(summary["transport"], transport);
        assert_eq!(
            summary["workers_by_engine"],
            serde_json::json!({"local": 3})
        );
        assert_eq!(summary["recovered"], true);
        assert_eq!(summary["containers_left"], 0);
        let failed = summary["failed"].as_u64().unwrap();
        assert!(
            failed <= summary["kills"].as_u64().unwrap() * 2,
            "{summary}"
        );
    }
}

/// `wharf check` against containerised workers: the demo worker conforms over every transport
/// (every check but `init_version`, which starts its worker outside the port, process only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerised_workers_pass_the_conformance_checks() {
    for transport in [Transport::Fifo, Transport::Socket, Transport::Attach] {
        let Some((_engine, spec)) = demo_container("ct-check", transport).await else {
            return;
        };
        let opts = wharf::check::CheckOptions {
            init_timeout: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        };
        let report = wharf::check::run_checks(spec, opts).await;
        let failed: Vec<_> = report
            .results
            .iter()
            .filter(|r| !matches!(r.outcome, wharf::check::Outcome::Pass))
            .map(|r| (r.name.clone(), r.outcome.clone()))
            .collect();
        assert_eq!(
            failed.len(),
            1,
            "{transport:?}: only init_version may be skipped: {failed:?}"
        );
        assert_eq!(failed[0].0, "init_version");
        assert!(matches!(failed[0].1, wharf::check::Outcome::Skip(_)));
    }
}

/// A runtime SIGKILLed with container workers: their channels close, so the containers stop by
/// themselves within seconds; the next start of a pool of the same name sweeps what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_of_a_sigkilled_runtime_stop_and_are_swept_at_the_next_start() {
    let Some((engine, spec)) = demo_container("ct-orphans", Transport::Fifo).await else {
        return;
    };
    // Built next to this test by `cargo test`.
    let exe = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("examples")
        .join("hold_pool");
    let mut holder = std::process::Command::new(&exe)
        .args(["2", "--container", "ct-orphans"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("hold_pool runs");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("workers"), "hold_pool said {line:?}");
    assert_eq!(containers_of(&engine, "ct-orphans").await, 2);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    holder.wait().unwrap();

    // The workers see EOF on their channel and exit: no container of the pool keeps running.
    let started = std::time::Instant::now();
    while !pool_containers(&engine, "ct-orphans", false)
        .await
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the dead runtime's containers still run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "containers stopped {:?} after the runtime's SIGKILL",
        started.elapsed()
    );
    assert_eq!(
        containers_of(&engine, "ct-orphans").await,
        2,
        "stopped, not yet removed"
    );

    // The next pool of that name sweeps them at its start, before it creates its own.
    let pool = Pool::builder(spec)
        .name("ct-orphans")
        .size(1)
        .build()
        .await
        .unwrap();
    pool.wait_ready(1, READY).await.unwrap();
    assert_eq!(
        containers_of(&engine, "ct-orphans").await,
        1,
        "only the new pool's container"
    );
    pool.shutdown().await;
    assert_eq!(containers_of(&engine, "ct-orphans").await, 0);
}

/// The socket directories' root is private to the runtime's user (no other local user may
/// connect to a worker's socket first), and a launch given up at any point leaves no container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_are_private_and_an_abandoned_launch_leaves_no_container() {
    use std::os::unix::fs::PermissionsExt;
    let Some((engine, spec)) = demo_container("ct-private", Transport::Socket).await else {
        return;
    };
    let pool = Pool::builder(spec.clone())
        .name("ct-private")
        .size(1)
        .build()
        .await
        .unwrap();
    pool.wait_ready(1, READY).await.unwrap();
    let root = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy() == format!("wharf-{}", wharf_actors::port::container::owner())
            })
        })
        .expect("the socket root exists");
    let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{} is mode {mode:o}", root.display());
    pool.shutdown().await;

    for after_ms in [1, 5, 20, 80, 300] {
        let mut spec = spec.clone();
        spec.pool = "ct-abandoned".into();
        spec.instance = format!("ct-abandoned-{after_ms}");
        let spec: wharf::WorkerSpec = spec.into();
        let start = wharf_actors::port::Port::start(&spec);
        let _ = tokio::time::timeout(Duration::from_millis(after_ms), start).await;
    }
    assert!(
        eventually(Duration::from_secs(15), || {
            let listed = std::process::Command::new("docker")
                .args(["ps", "-aq", "--filter", "label=wharf.pool=ct-abandoned"])
                .output()
                .map(|o| o.stdout.is_empty())
                .unwrap_or(false);
            listed
        })
        .await,
        "an abandoned launch left a container"
    );
    drop(engine);
}
