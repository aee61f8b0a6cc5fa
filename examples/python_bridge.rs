//! The Python bridge: a pool of Python workers under load, with a session, while a killer
//! SIGKILLs workers — and every call accounted for.
//!
//! ```text
//! cargo run --release --example python_bridge -- --workers 4 --calls 20000 --concurrency 16 --kill-every 500
//! cargo run --release --example python_bridge -- --json            # summary as JSON on the last line
//! cargo run --release --example python_bridge -- --worker 'python3 my_worker.py'
//! ```

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rand::seq::IndexedRandom;
use wharf::{Pool, ProcessSpec, Value};

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

/// What happened to the calls.
#[derive(Default)]
struct Tally {
    ok: u64,
    hung: u64,
    errors: BTreeMap<&'static str, u64>,
    latencies_us: Vec<u64>,
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

    say(&args, &format!("starting {} workers ...", args.workers));
    let t0 = Instant::now();
    match pool.wait_ready(args.workers, Duration::from_secs(30)).await {
        Ok(_) => {}
        Err(e) => {
            pool.shutdown().await;
            bail!("the pool could not start its workers: {e}");
        }
    }
    let pids = pool.worker_pids();
    say(
        &args,
        &format!(
            "ready: {} workers in {:.0?}, pids {:?}",
            pids.len(),
            t0.elapsed(),
            pids
        ),
    );

    if is_demo {
        session_demo(&pool, &args).await?;
    }

    // The load: `concurrency` closed-loop callers sharing one budget of calls.
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    // A call not finished within this bound is "hung": checkout + call timeouts, and margin.
    let hang_bound = Duration::from_secs(25);
    let started = Instant::now();
    let callers: Vec<_> = (0..args.concurrency)
        .map(|c| {
            let (pool, next, done, tally) =
                (pool.clone(), next.clone(), done.clone(), tally.clone());
            let calls = args.calls;
            tokio::spawn(async move {
                let mut local = Tally::default();
                while next.fetch_add(1, Ordering::Relaxed) < calls {
                    let body = Value::Array(vec![Value::from(c as u64), Value::from("payload")]);
                    let t = Instant::now();
                    match tokio::time::timeout(hang_bound, pool.call_value("echo", body.clone()))
                        .await
                    {
                        Ok(Ok(v)) if v == body => {
                            local.ok += 1;
                            local.latencies_us.push(t.elapsed().as_micros() as u64);
                        }
                        Ok(Ok(_)) => *local.errors.entry("wrong_reply").or_default() += 1,
                        Ok(Err(e)) => *local.errors.entry(e.kind()).or_default() += 1,
                        Err(_) => local.hung += 1,
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                let mut t = tally.lock().unwrap();
                t.ok += local.ok;
                t.hung += local.hung;
                for (k, v) in local.errors {
                    *t.errors.entry(k).or_default() += v;
                }
                t.latencies_us.extend(local.latencies_us);
            })
        })
        .collect();

    // The killer: SIGKILL a random worker on a timer while the load runs.
    let kills = Arc::new(AtomicU64::new(0));
    let killer = (args.kill_every > 0).then(|| {
        let (pool, kills, done) = (pool.clone(), kills.clone(), done.clone());
        let (every, calls) = (Duration::from_millis(args.kill_every), args.calls);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            while done.load(Ordering::Relaxed) < calls {
                tick.tick().await;
                let pids = pool.worker_pids();
                if let Some(pid) = pids.choose(&mut rand::rng()) {
                    let pid = nix::unistd::Pid::from_raw(*pid as i32);
                    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                        kills.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    });

    // The live progress line.
    let progress = {
        let (pool, done, kills) = (pool.clone(), done.clone(), kills.clone());
        let (calls, tty) = (args.calls, std::io::stderr().is_terminal());
        let quiet = args.json && !tty;
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_millis(if tty { 200 } else { 2000 }));
            loop {
                tick.tick().await;
                let n = done.load(Ordering::Relaxed);
                let s = pool.stats();
                let line = format!(
                    "{n}/{calls} calls, {} ok, {} restarts, {} kills, workers idle {} busy {} starting {}",
                    s.ok, s.restarts, kills.load(Ordering::Relaxed), s.idle, s.busy, s.starting
                );
                if !quiet {
                    if tty {
                        eprint!("\r\x1b[2K{line}");
                    } else {
                        eprintln!("{line}");
                    }
                    let _ = std::io::stderr().flush();
                }
                if n >= calls {
                    if tty && !quiet {
                        eprintln!();
                    }
                    return;
                }
            }
        })
    };

    for c in callers {
        c.await.context("a caller task panicked")?;
    }
    let elapsed = started.elapsed();
    if let Some(k) = killer {
        k.await?;
    }
    progress.await?;

    // Recovery: the pool returns to full strength after the kills stop.
    let recovered = pool
        .wait_ready(args.workers, Duration::from_secs(30))
        .await
        .is_ok();
    let stats = pool.stats();
    pool.shutdown().await;

    let mut tally = Arc::try_unwrap(tally)
        .ok()
        .expect("callers are done")
        .into_inner()?;
    tally.latencies_us.sort_unstable();
    let failed: u64 = tally.errors.values().sum();
    let summary = serde_json::json!({
        "calls": args.calls,
        "ok": tally.ok,
        "failed": failed,
        "hung": tally.hung,
        "errors": tally.errors,
        "kills": kills.load(Ordering::Relaxed),
        "restarts": stats.restarts,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "recovered": recovered,
        "p50_us": percentile(&tally.latencies_us, 0.50),
        "p99_us": percentile(&tally.latencies_us, 0.99),
        "throughput_per_s": (tally.ok as f64 / elapsed.as_secs_f64()).round(),
        "duration_s": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!("summary");
        println!("  calls        {}", args.calls);
        println!("  ok           {}", tally.ok);
        println!("  failed       {failed}  {:?}", tally.errors);
        println!("  hung         {}", tally.hung);
        println!("  kills        {}", summary["kills"]);
        println!("  restarts     {}", stats.restarts);
        println!("  recovered    {recovered}");
        println!(
            "  p50 / p99    {} us / {} us",
            summary["p50_us"], summary["p99_us"]
        );
        println!(
            "  throughput   {} calls/s over {:.2?}",
            summary["throughput_per_s"], elapsed
        );
    }
    if tally.hung > 0 {
        bail!("{} calls hung", tally.hung);
    }
    Ok(())
}

/// Shows a session keeping state on its pinned worker.
async fn session_demo(pool: &Pool, args: &Args) -> anyhow::Result<()> {
    let session = pool.session("demo-session").await?;
    let pid = session.pid().await.unwrap_or(0);
    for i in 1..=3 {
        session
            .call(
                "state_set",
                &serde_json::json!({"key": "visits", "value": i}),
            )
            .await?;
    }
    let visits = session
        .call("state_get", &serde_json::json!({"key": "visits"}))
        .await?;
    let same = session.call("pid", &()).await? == Value::from(pid);
    session.end().await?;
    say(
        args,
        &format!("session: 3 calls pinned to worker pid {pid} (same worker every call: {same}), state visits = {visits}; ended and reset"),
    );
    Ok(())
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn say(args: &Args, line: &str) {
    if args.json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
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
