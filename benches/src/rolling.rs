//! Scenario 8: throughput while every worker of a 4-worker pool is replaced by a rolling
//! restart (make before break, one at a time) vs steady state, interleaved in the same run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use wharf::{CallOptions, Pool, Value};

use crate::scenarios::Outcome;
use crate::{median, Env, Scale};

const WORKERS: usize = 4;
const CALLERS: usize = 8;

/// What the callers of a [`Load`] share.
#[derive(Default)]
struct Counts {
    stop: AtomicBool,
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Callers looping on one method until stopped, counting calls that succeed and that fail.
struct Load {
    counts: Arc<Counts>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(pool: &Pool, method: &'static str, body: Value) -> Load {
        let counts = Arc::new(Counts::default());
        let tasks = (0..CALLERS)
            .map(|_| {
                let (pool, body, counts) = (pool.clone(), body.clone(), counts.clone());
                tokio::spawn(async move {
                    while !counts.stop.load(Ordering::Relaxed) {
                        let call = pool.call_value(method, body.clone(), CallOptions::new());
                        let counter = match call.await {
                            Ok(_) => &counts.ok,
                            Err(e) => {
                                eprintln!("rolling: a call failed: {e}");
                                &counts.failed
                            }
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load { counts, tasks }
    }

    fn ok(&self) -> u64 {
        self.counts.ok.load(Ordering::Relaxed)
    }

    /// Stops the callers; the calls that failed.
    async fn stop(self) -> anyhow::Result<u64> {
        self.counts.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await?;
        }
        Ok(self.counts.failed.load(Ordering::Relaxed))
    }
}

/// Calls per second of `load` while `window` runs; how long it ran.
async fn rate_during<F: std::future::Future>(load: &Load, window: F) -> (f64, Duration, F::Output) {
    let (before, t) = (load.ok(), Instant::now());
    let out = window.await;
    let took = t.elapsed();
    ((load.ok() - before) as f64 / took.as_secs_f64(), took, out)
}

/// Scenario 8: rolling restart vs steady state, for a call that keeps its worker busy 2 ms
/// (the pool's capacity is the limit) and for an echo (the CPU is: the new interpreters'
/// start-up competes with the calls on the same cores).
pub async fn rolling(env: &Env, s: Scale) -> Outcome {
    let mut figures = serde_json::Map::new();
    let mut ratios = Vec::new();
    let mut rows = Vec::new();
    let loads = [
        (
            "sleep_2ms",
            "sleep",
            Value::from(2),
            "rolling_restart_throughput_over_steady",
        ),
        (
            "echo",
            "echo",
            Value::from("x"),
            "rolling_restart_echo_throughput_over_steady",
        ),
    ];
    for (name, method, body, key) in loads {
        let pool = Pool::builder(env.demo_spec())
            .name("bench-rolling")
            .size(WORKERS)
            .checkout_timeout(Duration::from_secs(60))
            .build()
            .await?;
        pool.wait_ready(WORKERS, Duration::from_secs(60)).await?;
        let load = Load::start(&pool, method, body);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (mut steady, mut rolling, mut took) = (vec![], vec![], vec![]);
        let mut window = Duration::from_secs(1);
        for round in 0..s.rounds {
            // Alternate which comes first, so a drift of the machine favours neither.
            if round % 2 == 1 {
                steady.push(rate_during(&load, tokio::time::sleep(window)).await.0);
            }
            let (rate, d, replaced) = rate_during(&load, pool.rolling_restart(1)).await;
            anyhow::ensure!(replaced? == WORKERS, "a rolling restart replaced too few");
            rolling.push(rate);
            took.push(d.as_secs_f64() * 1e3);
            window = d;
            // The old workers stop (idle ones at once, busy ones after their call).
            tokio::time::sleep(Duration::from_millis(200)).await;
            if round % 2 == 0 {
                steady.push(rate_during(&load, tokio::time::sleep(window)).await.0);
            }
        }
        let failed = load.stop().await?;
        let stats = pool.stats();
        pool.shutdown().await;
        let (st, ro, ms) = (median(&steady), median(&rolling), median(&took));
        figures.insert(
            name.into(),
            json!({
                "workers": WORKERS, "callers": CALLERS, "rounds": s.rounds,
                "steady_calls_per_s": st, "rolling_restart_calls_per_s": ro,
                "rolling_restart_ms": ms, "failed_calls": failed,
                "restarts": stats.restarts, "replacements": stats.replacements,
            }),
        );
        ratios.push((key.to_string(), ro / st));
        rows.push((
            format!("rolling restart of {WORKERS} workers, {name}, {CALLERS} callers (calls/s)"),
            format!("{ro:.0} during ({ms:.0} ms) vs {st:.0} steady; {failed} failed calls"),
        ));
    }
    Ok((Json::Object(figures), ratios, rows))
}
