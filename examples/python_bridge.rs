//! The Python bridge: a pool of Python workers under load, with a session, while a killer
//! SIGKILLs workers — and every call accounted for.
//!
//! ```text
//! cargo run --release --example python_bridge -- --workers 4 --calls 20000 --concurrency 16 --kill-every 500
//! cargo run --release --example python_bridge -- --json            # summary as JSON on the last line
//! cargo run --release --example python_bridge -- --worker 'python3 my_worker.py'
//! ```

#[path = "common/load.rs"]
mod load;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use load::{say, Load};
use rand::seq::IndexedRandom;
use wharf::{Pool, ProcessSpec};

/// Runs a warm pool of Python workers under concurrent load, kills workers while it serves,
/// and reports what happened to every call.
#[derive(Parser, Debug)]
#[command(name = "python_bridge")]
struct Args {
    /// Workers in the pool.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Calls to make in total.
    #[arg(long, default_value_t = 200_000)]
    calls: u64,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// SIGKILL a random worker every this many milliseconds (0 = never).
    #[arg(long, default_value_t = 200)]
    kill_every: u64,
    /// Worker command to run instead of the Python demo worker; the load calls its `echo`.
    #[arg(long)]
    worker: Option<String>,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

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

    let spec = worker_spec(args.worker.as_deref())?;
    let is_demo = args.worker.is_none();
    // Room in the restart intensity for the kills this run makes on purpose.
    let kills_per_5s = 5_000u64.checked_div(args.kill_every).unwrap_or(0);
    let pool = Pool::builder(spec)
        .name("bridge")
        .size(args.workers)
        .init_timeout(Duration::from_secs(10))
        .call_timeout(Duration::from_secs(10))
        .checkout_timeout(Duration::from_secs(10))
        .intensity((2 * kills_per_5s + 10) as u32, Duration::from_secs(5))
        .build()
        .await?;

    say(args.json, &format!("starting {} workers ...", args.workers));
    if let Err(e) = load::prewarm(&pool, args.workers, Duration::from_secs(30), args.json).await {
        pool.shutdown().await;
        return Err(e);
    }
    say(args.json, &format!("pids {:?}", pool.worker_pids()));
    if is_demo {
        load::session_demo(&pool, args.json).await?;
    }

    // SIGKILL a random worker on the timer.
    let killer: load::Killer = {
        let pool = pool.clone();
        Arc::new(move || {
            let pids = pool.worker_pids();
            Box::pin(async move {
                let Some(pid) = pids.choose(&mut rand::rng()) else {
                    return false;
                };
                let pid = nix::unistd::Pid::from_raw(*pid as i32);
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok()
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

    // Recovery: the pool returns to full strength after the kills stop.
    let recovered = pool
        .wait_ready(args.workers, Duration::from_secs(30))
        .await
        .is_ok();
    let stats = pool.stats();
    pool.shutdown().await;

    let summary = tally
        .summary(&plan, args.workers, stats.restarts, recovered)
        .into();
    load::report(&summary, args.json);
    if tally.hung > 0 {
        bail!("{} calls hung", tally.hung);
    }
    Ok(())
}

/// The demo worker (found in this repository's `protocol/python` even when not installed), or
/// the user's command.
fn worker_spec(cmd: Option<&str>) -> anyhow::Result<ProcessSpec> {
    match cmd {
        Some(cmd) => {
            let argv =
                shlex::split(cmd).with_context(|| format!("cannot parse --worker {cmd:?}"))?;
            ProcessSpec::from_argv(argv).context("--worker is empty")
        }
        None => {
            let mut spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"])
                .expect("non-empty argv");
            let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/python");
            if local.join("wharf_worker").is_dir() {
                spec = spec.env("PYTHONPATH", local.canonicalize()?.into_os_string());
            }
            Ok(spec)
        }
    }
}
