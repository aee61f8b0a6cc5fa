//! The load both main-job examples run: closed-loop callers sharing a budget of echo calls, a
//! killer on a timer, a live progress line, and every call accounted for (ok, failed with a
//! typed error, or hung).

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use wharf::{CallOptions, Pool, Value};

/// What shapes a load run.
pub struct Load {
    /// Calls to make in total.
    pub calls: u64,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Kill a worker this often (`None`: never).
    pub kill_every: Option<Duration>,
    /// Quiet progress (the summary goes out as JSON).
    pub json: bool,
}

/// Kills one worker; says whether it did.
pub type Killer = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// What happened to the calls.
#[derive(Default)]
pub struct Tally {
    /// Calls answered with the body sent.
    pub ok: u64,
    /// Calls not finished within the hang bound.
    pub hung: u64,
    /// Failed calls by error kind.
    pub errors: BTreeMap<&'static str, u64>,
    /// Latencies of the ok calls, sorted.
    pub latencies_us: Vec<u64>,
    /// Workers killed.
    pub kills: u64,
    /// How long the load took.
    pub elapsed: Duration,
}

impl Tally {
    /// Failed calls, all kinds.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The latency at quantile `q` (0..=1), in microseconds.
    pub fn percentile(&self, q: f64) -> u64 {
        let sorted = &self.latencies_us;
        if sorted.is_empty() {
            return 0;
        }
        sorted[((sorted.len() - 1) as f64 * q).round() as usize]
    }

    /// Calls answered per second.
    pub fn throughput(&self) -> f64 {
        (self.ok as f64 / self.elapsed.as_secs_f64()).round()
    }
}

/// Runs the load on `pool`, killing a worker with `kill` on the timer.
pub async fn run(pool: &Pool, load: &Load, kill: Killer) -> anyhow::Result<Tally> {
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    // A call not finished within this bound is "hung": checkout + call timeouts, and margin.
    let hang_bound = Duration::from_secs(25);
    let started = Instant::now();
    let callers: Vec<_> = (0..load.concurrency)
        .map(|c| {
            let (pool, next, done, tally) =
                (pool.clone(), next.clone(), done.clone(), tally.clone());
            let calls = load.calls;
            tokio::spawn(async move {
                let mut local = Tally::default();
                while next.fetch_add(1, Ordering::Relaxed) < calls {
                    let body = Value::Array(vec![Value::from(c as u64), Value::from("payload")]);
                    let t = Instant::now();
                    match tokio::time::timeout(
                        hang_bound,
                        pool.call_value("echo", body.clone(), CallOptions::new()),
                    )
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

    // The killer: one worker on a timer while the load runs.
    let kills = Arc::new(AtomicU64::new(0));
    let killer = load.kill_every.map(|every| {
        let (kills, done, calls) = (kills.clone(), done.clone(), load.calls);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            while done.load(Ordering::Relaxed) < calls {
                tick.tick().await;
                if kill().await {
                    kills.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    });

    // The live progress line.
    let progress = {
        let (pool, done, kills) = (pool.clone(), done.clone(), kills.clone());
        let (calls, tty) = (load.calls, std::io::stderr().is_terminal());
        let quiet = load.json && !tty;
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
    let mut tally = Arc::try_unwrap(tally)
        .ok()
        .expect("callers are done")
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a caller panicked holding the tally"))?;
    tally.latencies_us.sort_unstable();
    tally.kills = kills.load(Ordering::Relaxed);
    tally.elapsed = elapsed;
    Ok(tally)
}

/// Waits for `n` ready workers, printing how many are up as they come.
pub async fn prewarm(pool: &Pool, n: usize, limit: Duration, json: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let tty = std::io::stderr().is_terminal() && !json;
    loop {
        let s = pool.stats();
        if tty {
            eprint!(
                "\r\x1b[2Kprewarming: {} ready, {} starting, {:.1?}",
                s.idle + s.busy,
                s.starting,
                t0.elapsed()
            );
        }
        match pool.wait_ready(n, Duration::from_millis(250)).await {
            Ok(_) => break,
            Err(wharf::Error::CheckoutTimeout { .. }) if t0.elapsed() < limit => continue,
            Err(e) => {
                if tty {
                    eprintln!();
                }
                anyhow::bail!("the pool could not start its workers: {e}");
            }
        }
    }
    if tty {
        eprintln!();
    }
    say(json, &format!("ready: {n} workers in {:.0?}", t0.elapsed()));
    Ok(())
}

/// Shows a session keeping state on its pinned worker.
pub async fn session_demo(pool: &Pool, json: bool) -> anyhow::Result<()> {
    let session = pool.session("demo-session").await?;
    let worker = session.worker_id().await.unwrap_or_default();
    for i in 1..=3 {
        session
            .call::<()>(
                "state_set",
                &serde_json::json!({"key": "visits", "value": i}),
            )
            .await?;
    }
    let visits: u64 = session
        .call("state_get", &serde_json::json!({"key": "visits"}))
        .await?;
    let pid: u32 = session.call("pid", &()).await?;
    let same = session.call::<u32>("pid", &()).await? == pid;
    session.end().await?;
    say(
        json,
        &format!("session: 4 calls pinned to worker {worker} (same process every call: {same}), state visits = {visits}; ended and reset"),
    );
    Ok(())
}

/// A progress line: on stdout, or on stderr when stdout carries the JSON summary.
pub fn say(json: bool, line: &str) {
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

impl Tally {
    /// The run's summary: every call accounted for, latencies, throughput, and how the pool
    /// came through (`restarts`, `recovered`). Callers add their own fields.
    pub fn summary(
        &self,
        load: &Load,
        workers: usize,
        restarts: u64,
        recovered: bool,
    ) -> serde_json::Map<String, serde_json::Value> {
        let summary = serde_json::json!({
            "calls": load.calls,
            "ok": self.ok,
            "failed": self.failed(),
            "hung": self.hung,
            "errors": self.errors,
            "kills": self.kills,
            "restarts": restarts,
            "workers": workers,
            "concurrency": load.concurrency,
            "recovered": recovered,
            "p50_us": self.percentile(0.50),
            "p99_us": self.percentile(0.99),
            "throughput_per_s": self.throughput(),
            "duration_s": (self.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        });
        match summary {
            serde_json::Value::Object(map) => map,
            _ => unreachable!("a JSON object literal"),
        }
    }
}

/// Prints the summary: one JSON object on the last line, or a short table.
pub fn report(summary: &serde_json::Value, json: bool) {
    if json {
        println!("{summary}");
        return;
    }
    println!("summary");
    if let Some(fields) = summary.as_object() {
        for (k, v) in fields {
            println!("  {k:<18} {v}");
        }
    }
}
