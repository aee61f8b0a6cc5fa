//! The container pool: the main job's counterpart with Docker containers as workers. It builds
//! the local worker image if it is missing (no registry needed), prewarms a pool of containers,
//! runs a concurrent load, shows a session keeping state, has containers killed from outside
//! (`docker kill`, through the engine's API) on a timer and replaced with no hung call, and ends
//! with a summary — including how many of the pool's containers are left after its shutdown.
//!
//! ```text
//! cargo run --release --example container_pool -- --workers 4 --calls 20000 --concurrency 16 --kill-every 500
//! cargo run --release --example container_pool -- --transport attach --json
//! cargo run --release --example container_pool -- --image my/worker:1   # an image with its own Python
//! cargo run --release --example container_pool -- --config fleet.toml --json  # over the file's [[engines]]
//! ```
//!
//! With `--config FILE`, the pool spreads over the Docker engines the file lists (its
//! `[[engines]]` tables; see `docs/scale-out.md`), over the attach transport; the image is
//! built on the local engine and shipped to each. The summary's `workers_by_engine` says where
//! the workers ran at the end.

#[path = "common/load.rs"]
mod load;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bollard::query_parameters::{KillContainerOptions, ListContainersOptions};
use clap::{Parser, ValueEnum};
use load::{say, Load};
use rand::seq::IndexedRandom;
use wharf::image::{self, HostPythonOptions};
use wharf::{ConfigFile, ContainerSpec, Engine, FleetEngine, Pool, Transport};

/// Where frames travel.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum TransportArg {
    /// Two FIFOs (named pipes) bind-mounted into the container (local engines; the default).
    Fifo,
    /// A unix socket bind-mounted into each container (local engines).
    Socket,
    /// Docker's attach stream (any engine).
    Attach,
}

/// Runs a warm pool of container workers under concurrent load, kills containers while it
/// serves, and reports what happened to every call.
#[derive(Parser, Debug)]
#[command(name = "container_pool")]
struct Args {
    /// Containers in the pool.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Calls to make in total.
    #[arg(long, default_value_t = 50_000)]
    calls: u64,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// `docker kill` a random container of the pool every this many milliseconds (0 = never).
    #[arg(long, default_value_t = 500)]
    kill_every: u64,
    /// An image with its own Python and `wharf_worker` (run as `python3 -m
    /// wharf_worker.demo`); by default a local host-Python image is built if missing.
    #[arg(long)]
    image: Option<String>,
    /// Where frames travel.
    #[arg(long, value_enum, default_value_t = TransportArg::Fifo)]
    transport: TransportArg,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// A configuration file whose `[[engines]]` the pool spreads over (attach transport).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}

const POOL: &str = "container-pool";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    if args.workers == 0 || args.concurrency == 0 {
        bail!("--workers and --concurrency must be at least 1");
    }
    let engine = Engine::local(Duration::from_secs(10))
        .await
        .context("this example needs a Docker engine")?;
    let fleet: Vec<FleetEngine> = match &args.config {
        Some(path) => ConfigFile::load(path)?.engines().cloned().collect(),
        None => Vec::new(),
    };
    if args.config.is_some() && fleet.is_empty() {
        bail!("the configuration file lists no [[engines]]");
    }
    let transport = match args.transport {
        _ if !fleet.is_empty() => Transport::Attach,
        TransportArg::Fifo => Transport::Fifo,
        TransportArg::Socket => Transport::Socket,
        TransportArg::Attach => Transport::Attach,
    };
    let spec = worker_spec(&engine, &args).await?.transport(transport);
    // Where each worker's container is: its engine by name (the local one without a file).
    let engines: HashMap<String, Engine> = if fleet.is_empty() {
        HashMap::from([("local".to_owned(), engine.clone())])
    } else {
        fleet
            .iter()
            .map(|e| (e.engine.name().to_owned(), e.engine.clone()))
            .collect()
    };

    // Room in the restart intensity for the kills this run makes on purpose.
    let kills_per_5s = 5_000u64.checked_div(args.kill_every).unwrap_or(0);
    let mut builder = Pool::builder(spec);
    for e in fleet {
        builder = builder.engine(e);
    }
    let pool = builder
        .name(POOL)
        .size(args.workers)
        .init_timeout(Duration::from_secs(30))
        .call_timeout(Duration::from_secs(10))
        .checkout_timeout(Duration::from_secs(20))
        .intensity((2 * kills_per_5s + 10) as u32, Duration::from_secs(5))
        .build()
        .await?;
    say(
        args.json,
        &format!("prewarming {} containers ...", args.workers),
    );
    if let Err(e) = load::prewarm(&pool, args.workers, Duration::from_secs(120), args.json).await {
        pool.shutdown().await;
        return Err(e);
    }
    load::session_demo(&pool, args.json).await?;

    // `docker kill` the container of a random ready worker on the timer (a container still
    // starting is not a worker yet: killing those would only test start failures).
    let killer: load::Killer = {
        let (engines, pool) = (engines.clone(), pool.clone());
        Arc::new(move || {
            let ready: Vec<(String, Engine)> = pool
                .worker_info()
                .into_iter()
                .filter_map(|w| {
                    let on = engines.get(w.engine.as_deref().unwrap_or("local"))?;
                    Some((w.id, on.clone()))
                })
                .collect();
            Box::pin(async move {
                let Some((worker, engine)) = ready.choose(&mut rand::rng()) else {
                    return false;
                };
                let Ok(ids) = containers(engine, "wharf.worker", worker, false).await else {
                    return false;
                };
                let Some(victim) = ids.first() else {
                    return false;
                };
                let kill = KillContainerOptions {
                    signal: "SIGKILL".into(),
                };
                engine
                    .docker()
                    .kill_container(victim, Some(kill))
                    .await
                    .is_ok()
            })
        })
    };
    let plan = Load {
        calls: args.calls,
        concurrency: args.concurrency,
        kill_every: (args.kill_every > 0).then(|| Duration::from_millis(args.kill_every)),
        json: args.json,
    };
    let tally = load::run(&pool, &plan, killer).await?;

    let recovered = pool
        .wait_ready(args.workers, Duration::from_secs(60))
        .await
        .is_ok();
    let stats = pool.stats();
    let mut workers_by_engine = pool.workers_by_engine();
    if workers_by_engine.is_empty() {
        workers_by_engine.insert("local".into(), pool.worker_info().len());
    }
    pool.shutdown().await;
    let mut containers_left = 0;
    for engine in engines.values() {
        containers_left += containers(engine, "wharf.pool", POOL, true).await?.len();
    }

    let mut summary = tally.summary(&plan, args.workers, stats.restarts, recovered);
    let transport = format!("{transport:?}").to_lowercase();
    summary.insert("transport".into(), transport.into());
    summary.insert("containers_left".into(), containers_left.into());
    summary.insert(
        "workers_by_engine".into(),
        serde_json::to_value(&workers_by_engine)?,
    );
    let summary = summary.into();
    load::report(&summary, args.json);
    if tally.hung > 0 {
        bail!("{} calls hung", tally.hung);
    }
    if containers_left > 0 {
        bail!("{containers_left} containers of the pool are left after its shutdown");
    }
    Ok(())
}

/// The demo worker in a container: of the user's image, or of the local host-Python image
/// (built if missing; it bind-mounts this machine's Python and this repository's SDK).
async fn worker_spec(engine: &Engine, args: &Args) -> anyhow::Result<ContainerSpec> {
    if let Some(image) = &args.image {
        return Ok(ContainerSpec::new(
            image.clone(),
            ["python3", "-m", "wharf_worker.demo"],
        ));
    }
    let sdk = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/python");
    let opts = HostPythonOptions {
        worker_package: sdk
            .join("wharf_worker")
            .is_dir()
            .then(|| sdk.canonicalize())
            .transpose()?,
        ..HostPythonOptions::default()
    };
    let img = image::ensure_host_python(engine, &opts).await?;
    say(
        args.json,
        &format!(
            "image {} ({}){}",
            img.image,
            &img.id[..19.min(img.id.len())],
            if img.reused { ", reused" } else { ", built" }
        ),
    );
    Ok(img.spec(["-m", "wharf_worker.demo"]))
}

/// The ids of the containers labelled `label=value`: running ones, or all (`all`).
async fn containers(
    engine: &Engine,
    label: &str,
    value: &str,
    all: bool,
) -> anyhow::Result<Vec<String>> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{label}={value}")])]);
    let list = engine
        .docker()
        .list_containers(Some(ListContainersOptions {
            all,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?;
    Ok(list.into_iter().filter_map(|c| c.id).collect())
}
