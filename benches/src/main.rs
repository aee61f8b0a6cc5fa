//! wharf-bench: wharf side by side with what users would pick instead, in one run, as ratios.
//!
//! `cargo run --release -p wharf-bench -- [--quick] [--json FILE] [--only a,b]`
//!
//! Each pair of contenders runs interleaved (A, B, A, B ...) in the same process, and every
//! ratio is a ratio of medians over those rounds: absolute times on a shared machine swing by
//! 2x between runs, ratios measured side by side do not.

mod containers;
#[allow(dead_code)]
#[path = "../../tests/common/fleet.rs"]
mod fleet;
mod floor;
mod inprocess;
mod rolling;
mod scale_out;
mod scenarios;
mod single_actor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value as Json};

/// wharf's benchmark suite.
#[derive(Parser, Debug)]
#[command(name = "wharf-bench")]
struct Args {
    /// A short run (a few minutes on 2 cores) instead of the full one the docs quote.
    #[arg(long)]
    quick: bool,
    /// Write every figure to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these scenarios (roundtrip, throughput, map, concurrent_io, checkout,
    /// warm_vs_cold, recovery, payload, rolling, containers, inprocess, scale_out); all by
    /// default. `containers` needs a Docker engine and is skipped, with a message, when none
    /// answers; `scale_out` also needs root and network namespaces for its fleet.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Internal: run as a host that embeds Python (`startup`, `exit` or `segv`), for the
    /// inprocess scenario.
    #[arg(long, hide = true)]
    pyo3_child: Option<String>,
    /// For profilers: drive one saturated contender alone and print its rate, no scenario:
    /// `wharf,WORKERS,IN_FLIGHT,CALLS`, or `floor|async-floor,WORKERS,_,CALLS` (the
    /// hand-written loops, one per worker, blocking or on tokio's reactor).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "KIND,WORKERS,IN_FLIGHT,CALLS"
    )]
    drive: Vec<String>,
}

/// How much of everything to do.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Interleaved rounds per contender.
    pub rounds: usize,
    /// Calls per round trip round.
    pub calls: usize,
    /// Calls per throughput measurement.
    pub throughput_calls: usize,
    /// Duration of one checkout round.
    pub checkout_round: Duration,
    /// Batches in the warm-vs-cold scenario.
    pub batches: usize,
    /// Samples of start-up and recovery.
    pub samples: usize,
}

impl Scale {
    fn new(quick: bool) -> Self {
        if quick {
            Scale {
                rounds: 3,
                calls: 300,
                throughput_calls: 2_000,
                checkout_round: Duration::from_millis(300),
                batches: 20,
                samples: 5,
            }
        } else {
            Scale {
                rounds: 7,
                calls: 1_000,
                throughput_calls: 10_000,
                checkout_round: Duration::from_secs(1),
                batches: 100,
                samples: 15,
            }
        }
    }
}

/// Where things are and how to start the Python demo worker.
pub struct Env {
    /// The repository root.
    pub root: PathBuf,
}

impl Env {
    /// The Python package directory, for `PYTHONPATH`.
    pub fn python_path(&self) -> PathBuf {
        self.root.join("protocol/python")
    }

    /// The demo worker's spec.
    pub fn demo_spec(&self) -> wharf::ProcessSpec {
        wharf::ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"])
            .expect("non-empty argv")
            .env("PYTHONPATH", self.python_path().into_os_string())
    }

    /// The Python pools script.
    pub fn pools_script(&self) -> PathBuf {
        self.root.join("benches/python/pools.py")
    }
}

/// The median of some samples (0 for none).
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// A percentile of some samples (0 for none).
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// What the machine is, read at run time.
fn machine() -> Json {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cmd = |c: &str, args: &[&str]| {
        std::process::Command::new(c)
            .args(args)
            .output()
            .map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).trim().to_owned();
                s.push_str(String::from_utf8_lossy(&o.stderr).trim());
                s
            })
            .unwrap_or_default()
    };
    let mem_kb: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory_gib": (mem_kb as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": cmd("uname", &["-r"]),
        "python": cmd("python3", &["--version"]),
    })
}

fn check_python(env: &Env) -> anyhow::Result<()> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import msgpack, wharf_worker"])
        .env("PYTHONPATH", env.python_path())
        .status()
        .context("python3 is needed for the benchmarks")?
        .success();
    if !ok {
        bail!(
            "the Python worker package or msgpack is missing: run `python3 -m pip install ./protocol/python`"
        );
    }
    Ok(())
}

type Figures = (Json, Vec<(String, f64)>, Vec<(String, String)>);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()?;
    let env = Env { root };
    if let Some(mode) = &args.pyo3_child {
        return inprocess::child(mode, &env.root);
    }
    check_python(&env)?;
    if !args.drive.is_empty() {
        let [kind, workers, inflight, calls] = &args.drive[..] else {
            bail!("--drive takes KIND,WORKERS,IN_FLIGHT,CALLS");
        };
        let n = |s: &str| s.parse::<usize>().context("--drive: not a number");
        let (workers, inflight, calls) = (n(workers)?, n(inflight)?, n(calls)?);
        let rate = scenarios::drive(&env, kind, workers, inflight, calls).await?;
        println!("{kind}: {workers} workers, {inflight} in flight: {rate:.0} calls/s");
        return Ok(());
    }
    let scale = Scale::new(args.quick);
    let machine = machine();
    eprintln!("machine: {machine}");
    eprintln!("scale: {scale:?}");

    let mut results: BTreeMap<&str, Json> = BTreeMap::new();
    let mut ratios: BTreeMap<String, f64> = BTreeMap::new();
    let mut table: Vec<(String, String)> = Vec::new();
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let mut record = |name: &'static str, (figures, r, rows): Figures| {
        results.insert(name, figures);
        for (k, v) in r {
            ratios.insert(k, (v * 1000.0).round() / 1000.0);
        }
        table.extend(rows);
    };
    if wanted("roundtrip") {
        eprintln!("== roundtrip");
        record("roundtrip", scenarios::roundtrip(&env, scale).await?);
    }
    if wanted("throughput") {
        eprintln!("== throughput");
        record("throughput", scenarios::throughput(&env, scale).await?);
    }
    if wanted("map") {
        eprintln!("== map");
        record("map", scenarios::map(&env, scale).await?);
    }
    if wanted("concurrent_io") {
        eprintln!("== concurrent_io");
        record(
            "concurrent_io",
            scenarios::concurrent_io(&env, scale).await?,
        );
    }
    if wanted("checkout") {
        eprintln!("== checkout");
        record("checkout", scenarios::checkout(&env, scale).await?);
    }
    if wanted("warm_vs_cold") {
        eprintln!("== warm_vs_cold");
        record("warm_vs_cold", scenarios::warm_vs_cold(&env, scale).await?);
    }
    if wanted("recovery") {
        eprintln!("== recovery");
        record("recovery", scenarios::recovery(&env, scale).await?);
    }
    if wanted("payload") {
        eprintln!("== payload");
        record("payload", scenarios::payload(&env, scale).await?);
    }
    if wanted("rolling") {
        eprintln!("== rolling");
        record("rolling", rolling::rolling(&env, scale).await?);
    }
    if wanted("containers") {
        eprintln!("== containers");
        record("containers", containers::containers(&env, scale).await?);
    }
    if wanted("scale_out") {
        eprintln!("== scale_out");
        record("scale_out", scale_out::scale_out(&env, scale).await?);
    }
    if wanted("inprocess") {
        eprintln!("== inprocess");
        record("inprocess", inprocess::inprocess(&env, scale).await?);
    }

    println!("{:<58} result (median of interleaved rounds)", "measure");
    for (k, v) in &table {
        println!("{k:<58} {v}");
    }
    println!();
    println!("ratios (of medians, same run):");
    for (k, v) in &ratios {
        println!("  {k:<52} {v:.3}");
    }
    if let Some(path) = args.json {
        let doc = json!({
            "machine": machine,
            "quick": args.quick,
            "scale": format!("{scale:?}"),
            "results": results,
            "ratios": ratios,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
