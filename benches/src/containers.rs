//! Scenario 7: container workers against process workers, and warm containers against a
//! container per job. Needs a Docker engine; skipped (with a message) when none answers.
//!
//! Four comparisons, each interleaved in the same rounds:
//! - a warm call: the same 100 B echo through a one-worker pool of processes, of containers
//!   over the default transport (a FIFO pair), over a unix socket, and over Docker's attach
//!   stream;
//! - a job: a warm checkout + call on the FIFO pool, against a container created, started,
//!   handshaken, called once and force-removed through the engine's API per job, against
//!   `docker run --rm -i` per job (the CLI as a process worker on stdio);
//! - recovery: `docker kill` of one container of a warm pool until the pool is back at full
//!   strength, against one cold create + start + ready.
//!
//! Every container carries a `wharf.pool` label with one of this module's names; at the end
//! none of them may be left.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use bollard::query_parameters::{
    KillContainerOptions, ListContainersOptions, RemoveContainerOptions,
};
use serde_json::json;
use wharf::image::{self, HostPythonImage, HostPythonOptions};
use wharf::{
    CallOptions, Channel, ContainerSpec, Engine, Pool, ProcessSpec, Transport, Value, WorkerSpec,
};
use wharf_actors::port::container::{new_instance, sweep, Sweep};
use wharf_actors::port::Port;

use crate::scenarios::{body, us, wharf_latencies, Outcome};
use crate::{median, percentile, Env, Scale};

/// The process pool of the warm-call comparison.
const PROCESS_POOL: &str = "bench-process";
/// The container pool on the default transport, FIFOs (warm calls, and the warm side of the
/// per-job jobs).
const FIFO_POOL: &str = "bench-ct-fifo";
/// The socket-transport container pool.
const SOCKET_POOL: &str = "bench-ct-socket";
/// The attach-transport container pool.
const ATTACH_POOL: &str = "bench-ct-attach";
/// Containers created through the API, one per job.
const JOB: &str = "bench-ct-job";
/// Containers of `docker run --rm`, one per job.
const CLI: &str = "bench-ct-cli";
/// The pool whose containers are killed.
const REPLACE_POOL: &str = "bench-ct-replace";
/// The cold starts the replacement is compared with.
const COLD: &str = "bench-ct-cold";
/// Every container label value this scenario uses.
const NAMES: [&str; 7] = [
    FIFO_POOL,
    SOCKET_POOL,
    ATTACH_POOL,
    JOB,
    CLI,
    REPLACE_POOL,
    COLD,
];

const READY: Duration = Duration::from_secs(120);

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// The local engine, if one answers.
async fn engine() -> Result<Engine, String> {
    let engine = Engine::local(Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    engine
        .ping(Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    Ok(engine)
}

/// The containers labelled `wharf.pool=name`, running or not: (id, `wharf.worker` label).
async fn labelled(engine: &Engine, name: &str, all: bool) -> anyhow::Result<Vec<(String, String)>> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("wharf.pool={name}")])]);
    let list = engine
        .docker()
        .list_containers(Some(ListContainersOptions {
            all,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let worker = c
                .labels
                .as_ref()
                .and_then(|l| l.get("wharf.worker").cloned())
                .unwrap_or_default();
            Some((c.id?, worker))
        })
        .collect())
}

/// Removes the containers of the pools `names` left on `engine` (with a warning each); returns
/// how many there were.
pub(crate) async fn remove_left(engine: &Engine, names: &[&str]) -> anyhow::Result<usize> {
    let mut left = 0;
    for name in names {
        for (id, _) in labelled(engine, name, true).await? {
            eprintln!(
                "WARNING: container {id} ({name}) left behind on {}; removing it",
                engine.name()
            );
            left += 1;
            let _ = engine.docker().remove_container(&id, force()).await;
        }
    }
    Ok(left)
}

fn force() -> Option<RemoveContainerOptions> {
    Some(RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    })
}

/// `docker run --rm -i` of the demo worker on the host-Python image, with the mounts, user
/// and hardening of the API's containers, speaking the protocol on stdin/stdout: the CLI is
/// the worker process, and EOF on its stdin ends the container.
fn docker_run_spec(img: &HostPythonImage) -> ProcessSpec {
    let mut argv: Vec<String> = [
        "docker",
        "run",
        "--rm",
        "-i",
        "--init",
        "--network",
        "none",
        "--read-only",
        "--tmpfs",
        "/tmp:rw,noexec,nosuid,size=64m",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges:true",
        "--user",
        "65534:65534",
        "--log-driver",
        "none",
        "--label",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.push(format!("wharf.pool={CLI}"));
    for m in &img.mounts {
        argv.push("-v".into());
        argv.push(m.bind());
    }
    for e in img
        .env_strings()
        .into_iter()
        .chain(["WHARF_CHANNEL=stdio".to_owned()])
    {
        argv.push("-e".into());
        argv.push(e);
    }
    argv.push("--entrypoint".into());
    argv.push(img.python.display().to_string());
    argv.push(img.image.clone());
    argv.extend(["-m".to_owned(), "wharf_worker.demo".to_owned()]);
    ProcessSpec::from_argv(argv)
        .expect("non-empty argv")
        .channel(Channel::Stdio)
        .init_timeout(Duration::from_secs(30))
}

/// A one-off container worker's spec, labelled `wharf.pool=pool` with a fresh instance.
pub(crate) fn one_off(spec: &ContainerSpec, pool: &str, n: usize) -> (WorkerSpec, String) {
    let instance = new_instance();
    let mut ws: WorkerSpec = spec.clone().worker_id(format!("{pool}-{n}")).into();
    ws.set_pool(pool, &instance);
    (ws, instance)
}

/// The one container of a pool instance.
async fn instance_container(engine: &Engine, instance: &str) -> anyhow::Result<String> {
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("wharf.instance={instance}")],
    )]);
    let list = engine
        .docker()
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?;
    list.into_iter()
        .find_map(|c| c.id)
        .context("the job's container is not listed")
}

/// One job on a fresh container through the API (ms): create, attach, start, init handshake,
/// one echo, then a forced removal (a kill and a remove in one engine call), finished when the
/// engine answers.
async fn api_job(
    engine: &Engine,
    spec: &ContainerSpec,
    n: usize,
    b: &Value,
) -> anyhow::Result<f64> {
    let (ws, instance) = one_off(spec, JOB, n);
    let t = Instant::now();
    let port = Port::start(&ws).await?;
    let got = port
        .call(port.next_request_id(), "echo", b.clone(), None, None)
        .await?;
    anyhow::ensure!(got == *b, "the echo came back different");
    // The port knows its container's id but does not say it: ask the engine by label.
    let id = instance_container(engine, &instance).await?;
    engine.docker().remove_container(&id, force()).await?;
    let took = ms(t);
    drop(port);
    Ok(took)
}

/// One job on `docker run --rm -i` (ms): the CLI started as a process worker, init handshake,
/// one echo, then the protocol's shutdown and EOF on stdin; finished when the CLI exits, which
/// it does once the engine has removed the container.
async fn cli_job(spec: &ProcessSpec, b: &Value) -> anyhow::Result<f64> {
    let ws: WorkerSpec = spec.clone().into();
    let t = Instant::now();
    let port = Port::start(&ws).await?;
    let got = port
        .call(port.next_request_id(), "echo", b.clone(), None, None)
        .await?;
    anyhow::ensure!(got == *b, "the echo came back different");
    let info = port.stop(Duration::from_secs(10)).await;
    let took = ms(t);
    anyhow::ensure!(
        info.status.is_some_and(|s| s.success()),
        "docker run ended with {:?}: {:?}",
        info.status,
        info.stderr_tail
    );
    Ok(took)
}

/// Per-job latencies (µs) of `n` warm checkouts + calls, from a runtime task.
async fn warm_jobs(pool: &Pool, n: usize, b: &Value) -> anyhow::Result<Vec<f64>> {
    let (pool, b) = (pool.clone(), b.clone());
    tokio::spawn(async move {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let mut lease = pool.checkout().await?;
            lease
                .call_value("echo", b.clone(), CallOptions::new())
                .await?;
            drop(lease);
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        anyhow::Ok(v)
    })
    .await?
}

/// One-worker pool of `spec` named `name`, ready.
async fn ready_pool(spec: impl Into<WorkerSpec>, name: &str) -> anyhow::Result<Pool> {
    let pool = Pool::builder(spec)
        .name(name)
        .size(1)
        .init_timeout(Duration::from_secs(30))
        .build()
        .await?;
    pool.wait_ready(1, READY).await?;
    Ok(pool)
}

/// Scenario 7: containers (see the module documentation).
pub async fn containers(env: &Env, s: Scale) -> Outcome {
    let engine = match engine().await {
        Ok(engine) => engine,
        Err(why) => {
            eprintln!("containers: SKIPPED, no Docker engine answers ({why})");
            return Ok((
                json!({"skipped": format!("no Docker engine answers: {why}")}),
                vec![],
                vec![("containers".into(), "skipped: no Docker engine".into())],
            ));
        }
    };
    let version = engine.docker().version().await?;
    let engine_name = format!(
        "Docker {} (API {})",
        version.version.unwrap_or_default(),
        version.api_version.unwrap_or_default()
    );
    let cli = std::process::Command::new("docker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    // Leftovers of an interrupted run (their runtime gone) would be counted as ours at the end.
    for name in NAMES {
        sweep(&engine, Sweep::Leftovers { pool: name }).await?;
    }
    let opts = HostPythonOptions {
        worker_package: Some(env.python_path().canonicalize()?),
        ..HostPythonOptions::default()
    };
    let img = image::ensure_host_python(&engine, &opts).await?;
    eprintln!(
        "containers: {engine_name}, image {} ({})",
        img.image,
        if img.reused { "reused" } else { "built" }
    );
    let spec = img
        .spec(["-m", "wharf_worker.demo"])
        .engine(engine.clone())
        .init_timeout(Duration::from_secs(30));
    let b = body(100);

    // 1. Warm calls: process vs container over each transport (FIFOs, the default; socket;
    // attach).
    assert_eq!(
        spec.transport,
        Transport::Fifo,
        "the default local transport"
    );
    let process = ready_pool(env.demo_spec(), PROCESS_POOL).await?;
    let fifo = ready_pool(spec.clone(), FIFO_POOL).await?;
    let socket = ready_pool(spec.clone().transport(Transport::Socket), SOCKET_POOL).await?;
    let attach = ready_pool(spec.clone().transport(Transport::Attach), ATTACH_POOL).await?;
    for pool in [&process, &fifo, &socket, &attach] {
        wharf_latencies(pool, 50, &b).await?;
    }
    let (mut m50, mut m99) = (
        [vec![], vec![], vec![], vec![]],
        [vec![], vec![], vec![], vec![]],
    );
    for _ in 0..s.rounds {
        for (i, pool) in [&process, &fifo, &socket, &attach].into_iter().enumerate() {
            let v = wharf_latencies(pool, s.calls, &b).await?;
            m50[i].push(percentile(&v, 0.5));
            m99[i].push(percentile(&v, 0.99));
        }
    }
    process.shutdown().await;
    socket.shutdown().await;
    attach.shutdown().await;
    let [p50, f50, s50, a50] = m50.map(|v| median(&v));
    let [p99, f99, s99, a99] = m99.map(|v| median(&v));

    // 2. Jobs: warm checkout + call vs a container per job (API) vs `docker run --rm` per job.
    let run_spec = docker_run_spec(&img);
    let (mut warm, mut api, mut run) = (vec![], vec![], vec![]);
    for i in 0..s.samples {
        warm.push(median(&warm_jobs(&fifo, s.calls, &b).await?));
        api.push(api_job(&engine, &spec, i, &b).await?);
        if cli {
            run.push(cli_job(&run_spec, &b).await?);
        }
    }
    fifo.shutdown().await;
    let (warm, api, run) = (median(&warm), median(&api), median(&run));

    // 3. Replacement after `docker kill` vs one cold create + start + ready.
    let pool = Pool::builder(spec.clone())
        .name(REPLACE_POOL)
        .size(2)
        .init_timeout(Duration::from_secs(30))
        .intensity(1000, Duration::from_secs(5))
        .backoff(wharf::Backoff {
            reset_after: Duration::from_millis(100),
            ..wharf::Backoff::default()
        })
        .build()
        .await?;
    pool.wait_ready(2, READY).await?;
    let (mut rec, mut after_kill, mut kill, mut cold) = (vec![], vec![], vec![], vec![]);
    let mut detect = vec![];
    for i in 0..s.samples {
        // After a healthy run, so each kill is a lone crash, restarted at once.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let running = labelled(&engine, REPLACE_POOL, false).await?;
        let (victim, worker) = running.first().context("no running container")?.clone();
        let t = Instant::now();
        engine
            .docker()
            .kill_container(
                &victim,
                Some(KillContainerOptions {
                    signal: "SIGKILL".into(),
                }),
            )
            .await?;
        let killed = Instant::now();
        kill.push(ms(t));
        let mut detected = None;
        loop {
            let info = pool.worker_info();
            if detected.is_none() && !info.iter().any(|w| w.id == worker) {
                // The pool has seen the death: its port is closed.
                detected = Some(ms(t));
            }
            if info.len() == 2
                && info
                    .iter()
                    .all(|w| w.id != worker && w.state == wharf::WorkerState::Idle)
            {
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
            anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "no replacement");
        }
        rec.push(ms(t));
        after_kill.push(ms(killed));
        detect.push(detected.unwrap_or(f64::NAN));
        let (ws, instance) = one_off(&spec, COLD, i);
        let t = Instant::now();
        let port = Port::start(&ws).await?;
        cold.push(ms(t));
        drop(port);
        sweep(
            &engine,
            Sweep::Instance {
                instance: &instance,
            },
        )
        .await?;
    }
    pool.shutdown().await;
    let (rec, after_kill, kill, cold) = (
        median(&rec),
        median(&after_kill),
        median(&kill),
        median(&cold),
    );
    let detect = median(&detect);

    // Nothing of ours may be left.
    let left = remove_left(&engine, &NAMES).await?;

    let mut figures = json!({
        "engine": engine_name,
        "image": img.image,
        "body_bytes": 100, "calls_per_round": s.calls, "rounds": s.rounds, "samples": s.samples,
        "warm_call": {
            "process": {"p50_us": p50, "p99_us": p99},
            "container_fifo": {"p50_us": f50, "p99_us": f99},
            "container_socket": {"p50_us": s50, "p99_us": s99},
            "container_attach": {"p50_us": a50, "p99_us": a99},
        },
        "job": {
            "warm_checkout_call_us": warm,
            "api_create_start_call_remove_ms": api,
        },
        "replacement": {
            "kill_to_replacement_ready_ms": rec,
            "kill_call_ms": kill,
            "kill_returned_to_replacement_ready_ms": after_kill,
            "kill_to_death_seen_ms": detect,
            "cold_create_start_ready_ms": cold,
        },
        "containers_left": left,
    });
    let mut ratios = vec![
        // The default local transport (FIFOs); the socket's figure beside it.
        ("container_call_p50_over_process_call".to_owned(), f50 / p50),
        (
            "container_socket_call_p50_over_process_call".to_owned(),
            s50 / p50,
        ),
        ("container_attach_over_socket".to_owned(), a50 / s50),
        (
            "create_start_per_job_over_warm".to_owned(),
            api * 1e3 / warm,
        ),
        (
            "container_replacement_over_cold_start".to_owned(),
            rec / cold,
        ),
    ];
    let mut rows = vec![
        (
            "warm call p50 / p99: process worker".to_owned(),
            format!("{} / {}", us(p50), us(p99)),
        ),
        (
            "warm call p50 / p99: container, FIFOs (default)".to_owned(),
            format!("{} / {}", us(f50), us(f99)),
        ),
        (
            "warm call p50 / p99: container, socket".to_owned(),
            format!("{} / {}", us(s50), us(s99)),
        ),
        (
            "warm call p50 / p99: container, attach".to_owned(),
            format!("{} / {}", us(a50), us(a99)),
        ),
        (
            "job: warm checkout+call vs container per job (API)".to_owned(),
            format!("{} vs {api:.1} ms", us(warm)),
        ),
        (
            "docker kill to replacement ready vs one cold start".to_owned(),
            format!(
                "{rec:.1} ms vs {cold:.1} ms (kill call {kill:.1} ms, death seen at {detect:.1} ms)"
            ),
        ),
        ("containers left afterwards".to_owned(), left.to_string()),
    ];
    if cli {
        figures["job"]["docker_run_rm_ms"] = json!(run);
        ratios.push(("docker_run_cli_over_warm".to_owned(), run * 1e3 / warm));
        rows.insert(
            5,
            (
                "job: warm checkout+call vs docker run --rm per job".to_owned(),
                format!("{} vs {run:.1} ms", us(warm)),
            ),
        );
    } else {
        eprintln!("containers: the docker command is not installed: no docker run contender");
        figures["job"]["docker_run_rm_ms"] = json!(null);
    }
    Ok((figures, ratios, rows))
}
