//! Scenario 8: one pool over several Docker engines. Needs root, network namespaces and
//! `dockerd` for its fleet (two extra daemons reached over TCP with TLS through a veth bridge,
//! the fixture of `tests/common/fleet.rs`); skipped, with a message, where that cannot be made.
//!
//! Two comparisons, interleaved in the same run:
//! - a warm call: the same 100 B echo through a one-worker pool on the local engine over a
//!   unix socket (the fast local path), over attach, and on a remote engine over attach (TLS,
//!   through the bridge);
//! - moving a lost engine's slots: a pool of four spread two and two; one host's dockerd is
//!   SIGKILLed (or its link cut) and the time until the pool is at full size again on the other
//!   host is set against one cold start of a container on that host.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use wharf::image::{self, HostPythonOptions};
use wharf::{ContainerSpec, Engine, FleetEngine, HealthOptions, Pool, Transport, WorkerSpec};
use wharf_actors::port::container::{sweep, Sweep};
use wharf_actors::port::Port;

use crate::containers::{one_off, remove_left};
use crate::fleet::Fleet;
use crate::scenarios::{body, us, wharf_latencies, Outcome};
use crate::{median, percentile, Env, Scale};

/// Every pool name this scenario uses (container labels).
const NAMES: [&str; 5] = [
    "bench-so-socket",
    "bench-so-attach",
    "bench-so-remote",
    "bench-so-move",
    "bench-so-cold",
];

const READY: Duration = Duration::from_secs(120);

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// A ready one-worker pool of `spec` named `name`, over `engines` if any.
async fn one_worker(spec: &ContainerSpec, name: &str, engines: &[&Engine]) -> anyhow::Result<Pool> {
    let mut b = Pool::builder(spec.clone()).name(name).size(1);
    for e in engines {
        b = b.engine(FleetEngine::from((*e).clone()));
    }
    let pool = b.build().await?;
    pool.wait_ready(1, READY).await?;
    Ok(pool)
}

/// This process's resident memory (KiB) and open sockets.
fn footprint() -> (u64, usize) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let sockets = std::fs::read_dir("/proc/self/fd")
        .map(|fds| {
            fds.flatten()
                .filter(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0);
    (rss, sockets)
}

/// What `workers` remote workers (half on each host) cost this process: resident memory
/// (KiB) and sockets per worker, from a pool of that many against none.
async fn cost_per_worker(
    fleet: &Fleet,
    spec: &ContainerSpec,
    workers: usize,
) -> anyhow::Result<(f64, f64)> {
    let (rss0, sockets0) = footprint();
    let pool = Pool::builder(spec.clone())
        .name(NAMES[3])
        .size(workers)
        .engine(fleet.engine(0).await)
        .engine(fleet.engine(1).await)
        .build()
        .await?;
    pool.wait_ready(workers, READY).await?;
    // Every worker used once, so each has its buffers.
    for _ in 0..workers * 4 {
        pool.call_value("echo", body(100), wharf::CallOptions::new())
            .await?;
    }
    let (rss1, sockets1) = footprint();
    pool.shutdown().await;
    let n = workers as f64;
    Ok((
        (rss1 as f64 - rss0 as f64) / n,
        (sockets1 as f64 - sockets0 as f64) / n,
    ))
}

/// How a host is lost.
#[derive(Clone, Copy, Debug)]
enum Loss {
    Kill,
    Cut,
}

/// A pool of four over both hosts, two and two; host 1 lost as `loss`; returns the time (ms)
/// from the loss to four ready workers on host 0, and from the loss to the engine marked down.
async fn move_once(
    fleet: &mut Fleet,
    spec: &ContainerSpec,
    loss: Loss,
) -> anyhow::Result<(f64, f64)> {
    let pool = Pool::builder(spec.clone())
        .name(NAMES[3])
        .size(4)
        .engine(fleet.engine(0).await)
        .engine(fleet.engine(1).await)
        .engine_health(HealthOptions::default())
        .build()
        .await?;
    pool.wait_ready(4, READY).await?;
    let spread = pool.workers_by_engine();
    anyhow::ensure!(
        spread.values().all(|n| *n == 2),
        "not spread two and two: {spread:?}"
    );
    let t = Instant::now();
    match loss {
        Loss::Kill => fleet.kill_dockerd(1),
        Loss::Cut => fleet.cut(1),
    }
    let mut down = None;
    loop {
        if down.is_none() && pool.engines().iter().any(|(n, h)| n == "h3" && !h.is_up()) {
            down = Some(ms(t));
        }
        let by = pool.workers_by_engine();
        let state = pool.state();
        if by.get("h2") == Some(&4) && state.idle + state.busy == 4 {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "no move: {by:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let moved = ms(t);
    let instance = match &pool.config().spec {
        WorkerSpec::Container(c) => c.instance.clone(),
        _ => unreachable!("a container pool"),
    };
    pool.shutdown().await;
    match loss {
        Loss::Kill => fleet.restart_dockerd(1).await,
        Loss::Cut => fleet.heal(1),
    }
    // The pool ended while the host was lost: what it left there (the dead workers' containers,
    // or the cut-off ones) is swept once the host answers again, as a later runtime's pool of
    // this name would.
    let h3 = fleet.engine_by_socket(1).await;
    let instance = Sweep::Instance {
        instance: &instance,
    };
    sweep(&h3, instance).await?;
    Ok((moved, down.unwrap_or(f64::NAN)))
}

/// Scenario 8: scale-out (see the module documentation).
pub async fn scale_out(env: &Env, s: Scale) -> Outcome {
    let local = Engine::local(Duration::from_secs(5))
        .await
        .context("the scale-out scenario needs the local Docker engine")?;
    let Some(mut fleet) = Fleet::start("the scale-out benchmark").await else {
        return Ok((json!({"skipped": "no fleet"}), Vec::new(), Vec::new()));
    };
    let opts = HostPythonOptions {
        worker_package: Some(env.python_path().canonicalize()?),
        ..HostPythonOptions::default()
    };
    let img = image::ensure_host_python(&local, &opts).await?;
    let spec = img
        .spec(["-m", "wharf_worker.demo"])
        .init_timeout(Duration::from_secs(30));
    let b = body(100);
    let h2 = fleet.engine(0).await;

    // 1. Warm calls: local socket, local attach, remote attach over TLS.
    let socket = one_worker(&spec.clone().transport(Transport::Socket), NAMES[0], &[]).await?;
    let attach = one_worker(&spec.clone().transport(Transport::Attach), NAMES[1], &[]).await?;
    let remote = one_worker(&spec.clone().transport(Transport::Attach), NAMES[2], &[&h2]).await?;
    let pools = [&socket, &attach, &remote];
    for pool in pools {
        wharf_latencies(pool, 50, &b).await?;
    }
    let (mut m50, mut m99) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]]);
    for _ in 0..s.rounds {
        for (i, pool) in pools.into_iter().enumerate() {
            let v = wharf_latencies(pool, s.calls, &b).await?;
            m50[i].push(percentile(&v, 0.5));
            m99[i].push(percentile(&v, 0.99));
        }
    }
    for pool in pools {
        pool.shutdown().await;
    }
    let [s50, a50, r50] = m50.map(|v| median(&v));
    let [s99, a99, r99] = m99.map(|v| median(&v));

    // 2. What a remote worker costs this process (memory, connections).
    let spec = spec.transport(Transport::Attach);
    let (kib_per_worker, sockets_per_worker) = cost_per_worker(&fleet, &spec, 16).await?;

    // 3. Moving a lost engine's slots, against one cold start on the surviving host.
    let remote_spec = spec.clone().engine(h2.clone());
    let (mut kill_move, mut kill_down, mut cut_move, mut cut_down, mut cold) =
        (vec![], vec![], vec![], vec![], vec![]);
    let samples = s.samples.min(5);
    for i in 0..samples {
        let (moved, down) = move_once(&mut fleet, &spec, Loss::Kill).await?;
        kill_move.push(moved);
        kill_down.push(down);
        let (ws, instance) = one_off(&remote_spec, NAMES[4], i);
        let t = Instant::now();
        let port = Port::start(&ws).await?;
        cold.push(ms(t));
        drop(port);
        sweep(
            &h2,
            Sweep::Instance {
                instance: &instance,
            },
        )
        .await?;
    }
    // A cut link is noticed by missed pings: slower, and the same every time; fewer samples.
    for _ in 0..samples.min(2) {
        let (moved, down) = move_once(&mut fleet, &spec, Loss::Cut).await?;
        cut_move.push(moved);
        cut_down.push(down);
    }
    let (kill_move, kill_down, cut_move, cut_down, cold) = (
        median(&kill_move),
        median(&kill_down),
        median(&cut_move),
        median(&cut_down),
        median(&cold),
    );
    let health = HealthOptions::default();

    // Nothing of ours may be left on any engine.
    let mut left = 0;
    let engines = [
        local.clone(),
        fleet.engine_by_socket(0).await,
        fleet.engine_by_socket(1).await,
    ];
    for engine in &engines {
        left += remove_left(engine, &NAMES).await?;
    }
    drop(fleet);

    let figures = json!({
        "body_bytes": 100, "calls_per_round": s.calls, "rounds": s.rounds, "samples": samples,
        "warm_call": {
            "local_socket": {"p50_us": s50, "p99_us": s99},
            "local_attach": {"p50_us": a50, "p99_us": a99},
            "remote_attach_tls": {"p50_us": r50, "p99_us": r99},
        },
        "per_remote_worker": {
            "supervisor_rss_kib": kib_per_worker,
            "sockets": sockets_per_worker,
        },
        "lost_engine": {
            "health": {
                "interval_ms": health.interval.as_millis(),
                "timeout_ms": health.timeout.as_millis(),
                "down_after": health.down_after,
            },
            "dockerd_killed_to_full_size_ms": kill_move,
            "dockerd_killed_to_marked_down_ms": kill_down,
            "link_cut_to_full_size_ms": cut_move,
            "link_cut_to_marked_down_ms": cut_down,
            "cold_start_remote_ms": cold,
        },
        "containers_left": left,
    });
    let ratios = vec![
        (
            "remote_tls_call_over_local_socket_call".to_owned(),
            r50 / s50,
        ),
        (
            "remote_tls_call_over_local_attach_call".to_owned(),
            r50 / a50,
        ),
        (
            "lost_engine_move_over_cold_start_dockerd_killed".to_owned(),
            kill_move / cold,
        ),
        (
            "lost_engine_move_over_cold_start_link_cut".to_owned(),
            cut_move / cold,
        ),
    ];
    let rows = vec![
        (
            "warm call p50 / p99: local engine, socket".to_owned(),
            format!("{} / {}", us(s50), us(s99)),
        ),
        (
            "warm call p50 / p99: local engine, attach".to_owned(),
            format!("{} / {}", us(a50), us(a99)),
        ),
        (
            "warm call p50 / p99: remote engine, attach over TLS".to_owned(),
            format!("{} / {}", us(r50), us(r99)),
        ),
        (
            "dockerd killed: 2 slots moved vs one cold start".to_owned(),
            format!("{kill_move:.0} ms vs {cold:.0} ms (marked down at {kill_down:.0} ms)"),
        ),
        (
            "link cut: 2 slots moved (down after missed pings)".to_owned(),
            format!("{cut_move:.0} ms (marked down at {cut_down:.0} ms)"),
        ),
        (
            "per remote worker, in the supervisor: memory, sockets".to_owned(),
            format!("{kib_per_worker:.0} KiB, {sockets_per_worker:.2}"),
        ),
        ("containers left afterwards".to_owned(), left.to_string()),
    ];
    Ok((figures, ratios, rows))
}
