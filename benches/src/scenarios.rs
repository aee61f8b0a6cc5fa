//! The scenarios but three (containers is in `containers.rs`, rolling in `rolling.rs`, inprocess in `inprocess.rs`). Each returns (figures as JSON, ratios, table rows).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ractor::Actor;
use serde_json::{json, Value as Json};
use wharf::{CallOptions, Pool, Value};

use crate::floor::{AsyncRawWorker, RawWorker};
use crate::single_actor::{DispatchMsg, Dispatcher};
use crate::{median, percentile, Env, Scale};

pub(crate) type Outcome = anyhow::Result<(Json, Vec<(String, f64)>, Vec<(String, String)>)>;

async fn pool(env: &Env, size: usize) -> anyhow::Result<Pool> {
    ready_pool(env.demo_spec(), "bench", size).await
}

/// A pool of `size` workers of `spec`, all of them ready.
pub(crate) async fn ready_pool(
    spec: wharf::ProcessSpec,
    name: &str,
    size: usize,
) -> anyhow::Result<Pool> {
    let pool = Pool::builder(spec).name(name).size(size).build().await?;
    pool.wait_ready(size, Duration::from_secs(60)).await?;
    Ok(pool)
}

pub(crate) fn body(size: usize) -> Value {
    Value::from("x".repeat(size))
}

/// Per-call latencies (µs) of `n` sequential wharf calls, made from a runtime task (as an
/// application's request handlers would), not from the main thread's `block_on`.
pub(crate) async fn wharf_latencies(
    pool: &Pool,
    n: usize,
    body: &Value,
) -> anyhow::Result<Vec<f64>> {
    let (pool, body) = (pool.clone(), body.clone());
    tokio::spawn(async move {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            pool.call_value("echo", body.clone(), CallOptions::new())
                .await?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(v)
    })
    .await?
}

/// Per-call latencies (µs) of `n` sequential raw-floor calls.
async fn floor_latencies(
    w: &mut Option<RawWorker>,
    n: usize,
    body: &Value,
) -> anyhow::Result<Vec<f64>> {
    let mut worker = w.take().context("floor worker")?;
    let body = body.clone();
    let (worker, v) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            worker.echo(&body)?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok((worker, v))
    })
    .await??;
    *w = Some(worker);
    Ok(v)
}

/// Per-call latencies (µs) of `n` sequential async-floor calls, from a runtime task.
async fn async_floor_latencies(
    w: &mut Option<AsyncRawWorker>,
    n: usize,
    body: &Value,
) -> anyhow::Result<Vec<f64>> {
    let mut worker = w.take().context("async floor worker")?;
    let body = body.clone();
    let (worker, v) = tokio::spawn(async move {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            worker.echo(&body).await?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        anyhow::Ok((worker, v))
    })
    .await??;
    *w = Some(worker);
    Ok(v)
}

async fn python_pool(env: &Env, args: &[String]) -> anyhow::Result<Json> {
    let out = tokio::process::Command::new("python3")
        .arg(env.pools_script())
        .args(args)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "pools.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub(crate) fn us(v: f64) -> String {
    format!("{v:.1} µs")
}

/// Scenario 1: One call at a time: wharf vs the raw floor vs ProcessPoolExecutor vs multiprocessing.Pool.
pub async fn roundtrip(env: &Env, s: Scale) -> Outcome {
    let pool = pool(env, 1).await?;
    let mut floor = Some(RawWorker::spawn(env)?);
    let mut afloor = Some(RawWorker::spawn(env)?.into_async()?);
    let b = body(100);
    // Warm them.
    wharf_latencies(&pool, 50, &b).await?;
    floor_latencies(&mut floor, 50, &b).await?;
    async_floor_latencies(&mut afloor, 50, &b).await?;
    let (mut w50, mut w99, mut f50, mut f99) = (vec![], vec![], vec![], vec![]);
    let (mut a50, mut a99) = (vec![], vec![]);
    let (mut p50, mut p99, mut m50, mut m99) = (vec![], vec![], vec![], vec![]);
    for _ in 0..s.rounds {
        let w = wharf_latencies(&pool, s.calls, &b).await?;
        w50.push(percentile(&w, 0.5));
        w99.push(percentile(&w, 0.99));
        let f = floor_latencies(&mut floor, s.calls, &b).await?;
        f50.push(percentile(&f, 0.5));
        f99.push(percentile(&f, 0.99));
        let a = async_floor_latencies(&mut afloor, s.calls, &b).await?;
        a50.push(percentile(&a, 0.5));
        a99.push(percentile(&a, 0.99));
        for (kind, p50s, p99s) in [("ppe", &mut p50, &mut p99), ("mppool", &mut m50, &mut m99)] {
            let r = python_pool(
                env,
                &[
                    "roundtrip".into(),
                    kind.into(),
                    s.calls.to_string(),
                    "100".into(),
                ],
            )
            .await?;
            p50s.push(r["p50_us"].as_f64().unwrap_or(0.0));
            p99s.push(r["p99_us"].as_f64().unwrap_or(0.0));
        }
    }
    pool.shutdown().await;
    let (w50, w99, f50, f99) = (median(&w50), median(&w99), median(&f50), median(&f99));
    let (a50, a99) = (median(&a50), median(&a99));
    let (p50, p99, m50, m99) = (median(&p50), median(&p99), median(&m50), median(&m99));
    let figures = json!({
        "body_bytes": 100, "calls_per_round": s.calls, "rounds": s.rounds,
        "wharf": {"p50_us": w50, "p99_us": w99},
        "floor": {"p50_us": f50, "p99_us": f99},
        "async_floor": {"p50_us": a50, "p99_us": a99},
        "ppe": {"p50_us": p50, "p99_us": p99},
        "mppool": {"p50_us": m50, "p99_us": m99},
    });
    let ratios = vec![
        ("roundtrip_p50_wharf_over_floor".into(), w50 / f50),
        ("roundtrip_p99_wharf_over_floor".into(), w99 / f99),
        ("roundtrip_p50_wharf_over_async_floor".into(), w50 / a50),
        ("roundtrip_p50_async_floor_over_floor".into(), a50 / f50),
        ("roundtrip_p50_ppe_over_wharf".into(), p50 / w50),
        ("roundtrip_p50_mppool_over_wharf".into(), m50 / w50),
    ];
    let rows = vec![
        (
            "round trip p50 / p99: wharf".into(),
            format!("{} / {}", us(w50), us(w99)),
        ),
        (
            "round trip p50 / p99: raw pipe floor".into(),
            format!("{} / {}", us(f50), us(f99)),
        ),
        (
            "round trip p50 / p99: async floor (tokio pipes, one task)".into(),
            format!("{} / {}", us(a50), us(a99)),
        ),
        (
            "round trip p50 / p99: ProcessPoolExecutor".into(),
            format!("{} / {}", us(p50), us(p99)),
        ),
        (
            "round trip p50 / p99: multiprocessing.Pool".into(),
            format!("{} / {}", us(m50), us(m99)),
        ),
    ];
    Ok((figures, ratios, rows))
}

/// Calls per second through wharf with `inflight` concurrent callers.
async fn wharf_rate(pool: &Pool, inflight: usize, calls: usize) -> anyhow::Result<f64> {
    let left = Arc::new(AtomicU64::new(calls as u64));
    let t = Instant::now();
    let tasks: Vec<_> = (0..inflight)
        .map(|_| {
            let (pool, left) = (pool.clone(), left.clone());
            tokio::spawn(async move {
                let b = Value::from("x");
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    pool.call_value("echo", b.clone(), CallOptions::new())
                        .await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(calls as f64 / t.elapsed().as_secs_f64())
}

/// One saturated contender alone (`--drive`), for a profiler (`perf`, `strace -c`): `calls`
/// echo calls through a warmed-up pool of `workers` with `inflight` callers (`wharf`), or
/// through `workers` hand-written loops, one per worker, blocking (`floor`) or on tokio's
/// reactor (`async-floor`). Returns calls per second.
pub async fn drive(
    env: &Env,
    kind: &str,
    workers: usize,
    inflight: usize,
    calls: usize,
) -> anyhow::Result<f64> {
    match kind {
        "wharf" => {
            let pool = pool(env, workers).await?;
            wharf_rate(&pool, workers, 200).await?;
            let rate = wharf_rate(&pool, inflight, calls).await?;
            pool.shutdown().await;
            Ok(rate)
        }
        "floor" => {
            let mut raw = raw_workers(env, workers)?;
            floor_rate(&mut raw, workers, calls).await
        }
        "async-floor" => {
            let mut raw = async_workers(env, workers)?;
            async_floor_rate(&mut raw, calls).await
        }
        other => anyhow::bail!("--drive: unknown contender {other:?} (wharf, floor, async-floor)"),
    }
}

fn raw_workers(env: &Env, n: usize) -> anyhow::Result<Vec<RawWorker>> {
    (0..n).map(|_| RawWorker::spawn(env)).collect()
}

fn async_workers(env: &Env, n: usize) -> anyhow::Result<Vec<AsyncRawWorker>> {
    (0..n)
        .map(|_| RawWorker::spawn(env)?.into_async())
        .collect()
}

/// Calls per second of independent hand-written loops on tokio's reactor, one task per worker:
/// what wharf's pool costs over the reactor it runs on.
async fn async_floor_rate(workers: &mut Vec<AsyncRawWorker>, calls: usize) -> anyhow::Result<f64> {
    let per = calls / workers.len();
    let t = Instant::now();
    let tasks: Vec<_> = workers
        .drain(..)
        .map(|mut w| {
            tokio::spawn(async move {
                let b = Value::from("x");
                for _ in 0..per {
                    w.echo(&b).await?;
                }
                anyhow::Ok(w)
            })
        })
        .collect();
    for task in tasks {
        workers.push(task.await??);
    }
    Ok((per * workers.len()) as f64 / t.elapsed().as_secs_f64())
}

/// Calls per second of independent raw pipe loops, one thread per worker.
async fn floor_rate(
    workers: &mut Vec<RawWorker>,
    threads: usize,
    calls: usize,
) -> anyhow::Result<f64> {
    let used: Vec<RawWorker> = workers.drain(..threads).collect();
    let per = calls / threads;
    let t = Instant::now();
    let handles: Vec<_> = used
        .into_iter()
        .map(|mut w| {
            std::thread::spawn(move || -> anyhow::Result<RawWorker> {
                let b = Value::from("x");
                for _ in 0..per {
                    w.echo(&b)?;
                }
                Ok(w)
            })
        })
        .collect();
    let mut back = Vec::new();
    for h in handles {
        back.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("floor thread panicked"))??,
        );
    }
    let rate = (per * threads) as f64 / t.elapsed().as_secs_f64();
    back.append(workers);
    *workers = back;
    Ok(rate)
}

/// Batches: 10,000 small items through `Pool::map` against `ProcessPoolExecutor.map` (its
/// default chunk size, what users reach for first), 2 workers each.
pub async fn map(env: &Env, s: Scale) -> Outcome {
    use futures::StreamExt;
    const ITEMS: usize = 10_000;
    const WORKERS: usize = 2;
    let pool = pool(env, WORKERS).await?;
    let (mut w, mut p) = (vec![], vec![]);
    for _ in 0..s.rounds.min(5) {
        let t = Instant::now();
        let mut replies = pool.map::<_, Value>("echo", (0..ITEMS).map(|_| "x"));
        let mut n = 0;
        while let Some(reply) = replies.next().await {
            reply?;
            n += 1;
        }
        anyhow::ensure!(n == ITEMS, "map yielded {n} of {ITEMS}");
        w.push(t.elapsed().as_secs_f64());
        let r = python_pool(
            env,
            &[
                "throughput".into(),
                "ppe".into(),
                WORKERS.to_string(),
                ITEMS.to_string(),
                "1".into(),
            ],
        )
        .await?;
        let rate = r["calls_per_s"].as_f64().context("PPE.map rate")?;
        p.push(ITEMS as f64 / rate);
    }
    pool.shutdown().await;
    let (w, p) = (median(&w), median(&p));
    Ok((
        json!({"items": ITEMS, "workers": WORKERS, "wharf_map_s": w, "ppe_map_s": p}),
        vec![("map_ppe_over_wharf".into(), p / w)],
        vec![(
            format!("map of {ITEMS} small items, {WORKERS} workers (s)"),
            format!("wharf {w:.3}, PPE.map {p:.3}"),
        )],
    ))
}

/// Scenario 2: Saturated throughput: 2 and 4 workers, 1/8/64 calls in flight.
pub async fn throughput(env: &Env, s: Scale) -> Outcome {
    let mut figures = serde_json::Map::new();
    let mut ratios = Vec::new();
    let mut rows = Vec::new();
    for workers in [2usize, 4] {
        let pool = pool(env, workers).await?;
        let mut raw = raw_workers(env, workers)?;
        let mut raw_async = async_workers(env, workers)?;
        wharf_rate(&pool, workers, 200).await?;
        for inflight in [1usize, 8, 64] {
            let (mut w, mut f, mut a, mut p) = (vec![], vec![], vec![], vec![]);
            for _ in 0..s.rounds.min(5) {
                w.push(wharf_rate(&pool, inflight, s.throughput_calls).await?);
                // The floor keeps one call in flight per worker: more cannot help a pipe loop.
                f.push(floor_rate(&mut raw, inflight.min(workers), s.throughput_calls).await?);
                let mut used: Vec<_> = raw_async.drain(..inflight.min(workers)).collect();
                a.push(async_floor_rate(&mut used, s.throughput_calls).await?);
                raw_async.append(&mut used);
                let r = python_pool(
                    env,
                    &[
                        "throughput".into(),
                        "ppe".into(),
                        workers.to_string(),
                        s.throughput_calls.to_string(),
                        "1".into(),
                    ],
                )
                .await?;
                p.push(r["calls_per_s"].as_f64().unwrap_or(0.0));
            }
            let (w, f, a, p) = (median(&w), median(&f), median(&a), median(&p));
            figures.insert(
                format!("w{workers}_inflight{inflight}"),
                json!({
                    "wharf_calls_per_s": w,
                    "floor_calls_per_s": f,
                    "async_floor_calls_per_s": a,
                    "ppe_map_calls_per_s": p,
                }),
            );
            ratios.push((
                format!("throughput_w{workers}_c{inflight}_wharf_over_floor"),
                w / f,
            ));
            ratios.push((
                format!("throughput_w{workers}_c{inflight}_wharf_over_async_floor"),
                w / a,
            ));
            ratios.push((
                format!("throughput_w{workers}_c{inflight}_wharf_over_ppe"),
                w / p,
            ));
            rows.push((
                format!("throughput {workers} workers, {inflight} in flight (calls/s)"),
                format!("wharf {w:.0}, floor {f:.0}, async floor {a:.0}, PPE.map {p:.0}"),
            ));
        }
        pool.shutdown().await;
    }
    Ok((Json::Object(figures), ratios, rows))
}

/// Calls per second of `callers` tasks each making `calls` calls of the demo's `io_wait` (an
/// `async def` awaiting `ms` of `asyncio.sleep`).
async fn io_rate(pool: &Pool, callers: usize, calls: usize, ms: u64) -> anyhow::Result<f64> {
    let t = Instant::now();
    let handles: Vec<_> = (0..callers)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..calls {
                    pool.call::<u64>("io_wait", &ms).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for h in handles {
        h.await??;
    }
    Ok((callers * calls) as f64 / t.elapsed().as_secs_f64())
}

/// Many calls per worker: one worker whose handler awaits 10 ms of `asyncio.sleep`, 32
/// callers, the worker declaring `max_concurrency` 32 against 1 (today's one call at a time).
pub async fn concurrent_io(env: &Env, s: Scale) -> Outcome {
    const CALLERS: usize = 32;
    const MS: u64 = 10;
    let calls = if s.rounds < 5 { 10 } else { 40 };
    let mut pools = Vec::new();
    for n in [32usize, 1] {
        let spec = env
            .demo_spec()
            .args(["--max-concurrency".to_owned(), n.to_string()]);
        let pool = Pool::builder(spec)
            .name(format!("bench-io-c{n}"))
            .size(1)
            .build()
            .await?;
        pool.wait_ready(1, Duration::from_secs(60)).await?;
        io_rate(&pool, CALLERS, 2, MS).await?; // warm up
        pools.push(pool);
    }
    let (mut c32, mut c1) = (Vec::new(), Vec::new());
    for _ in 0..s.rounds.clamp(3, 5) {
        c32.push(io_rate(&pools[0], CALLERS, calls, MS).await?);
        c1.push(io_rate(&pools[1], CALLERS, calls, MS).await?);
    }
    for pool in pools {
        pool.shutdown().await;
    }
    let (c32, c1) = (median(&c32), median(&c1));
    let figures = json!({
        "callers": CALLERS,
        "handler_ms": MS,
        "c32_calls_per_s": c32,
        "c1_calls_per_s": c1,
    });
    let ratios = vec![("concurrent_io_c32_over_c1".to_owned(), c32 / c1)];
    let rows = vec![(
        format!("concurrent_io 1 worker, {CALLERS} callers, {MS} ms async handler (calls/s)"),
        format!("max_concurrency 32: {c32:.0}, max_concurrency 1: {c1:.0}"),
    )];
    Ok((figures, ratios, rows))
}

/// Checkouts per second for `tasks` tasks looping for `dur`.
async fn rate<F, Fut>(tasks: usize, make: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send + 'static,
{
    let t = Instant::now();
    let handles: Vec<_> = (0..tasks).map(|_| tokio::spawn(make())).collect();
    let mut n = 0;
    for h in handles {
        n += h.await??;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Scenario 3: Checkout + checkin per second: wharf's lease path vs deadpool vs a single-actor
/// dispatcher, 16 workers, 16/64/256 tasks.
pub async fn checkout(env: &Env, s: Scale) -> Outcome {
    const WORKERS: usize = 16;
    let wharf = Pool::builder(env.demo_spec())
        .size(WORKERS)
        .startup_concurrency(4)
        .checkout_timeout(Duration::from_secs(60))
        .build()
        .await?;
    wharf.wait_ready(WORKERS, Duration::from_secs(120)).await?;
    let dead = deadpool::unmanaged::Pool::<usize>::from((0..WORKERS).collect::<Vec<_>>());
    let (actor, _) = Actor::spawn(None, Dispatcher, WORKERS).await?;
    let mut figures = serde_json::Map::new();
    let mut ratios = Vec::new();
    let mut rows = Vec::new();
    for tasks in [16usize, 64, 256] {
        let (mut w, mut d, mut a) = (vec![], vec![], vec![]);
        for _ in 0..s.rounds {
            let stop_at = Instant::now() + s.checkout_round;
            w.push(
                rate(tasks, || {
                    let pool = wharf.clone();
                    async move {
                        let mut n = 0;
                        while Instant::now() < stop_at {
                            drop(pool.checkout().await?);
                            n += 1;
                        }
                        Ok(n)
                    }
                })
                .await?,
            );
            let stop_at = Instant::now() + s.checkout_round;
            d.push(
                rate(tasks, || {
                    let pool = dead.clone();
                    async move {
                        let mut n = 0;
                        while Instant::now() < stop_at {
                            drop(pool.get().await.map_err(|e| anyhow::anyhow!("{e:?}"))?);
                            n += 1;
                        }
                        Ok(n)
                    }
                })
                .await?,
            );
            let stop_at = Instant::now() + s.checkout_round;
            a.push(
                rate(tasks, || {
                    let actor = actor.clone();
                    async move {
                        let mut n = 0;
                        while Instant::now() < stop_at {
                            let w = ractor::call!(actor, DispatchMsg::Checkout)?;
                            actor.cast(DispatchMsg::Checkin(w))?;
                            n += 1;
                        }
                        Ok(n)
                    }
                })
                .await?,
            );
        }
        let (w, d, a) = (median(&w), median(&d), median(&a));
        figures.insert(
            format!("tasks{tasks}"),
            json!({"wharf_per_s": w, "deadpool_per_s": d, "single_actor_per_s": a}),
        );
        ratios.push((format!("checkout_rate_wharf_over_deadpool_{tasks}"), w / d));
        ratios.push((
            format!("checkout_rate_wharf_over_single_actor_{tasks}"),
            w / a,
        ));
        rows.push((
            format!("checkout+checkin/s, 16 workers, {tasks} tasks"),
            format!("wharf {w:.0}, deadpool {d:.0}, single actor {a:.0}"),
        ));
    }
    actor.stop(None);
    wharf.shutdown().await;
    Ok((Json::Object(figures), ratios, rows))
}

/// One batch of 3 concurrent echo calls.
async fn batch(pool: &Pool) -> anyhow::Result<()> {
    let calls = (0..3).map(|i| pool.call_value("echo", Value::from(i), CallOptions::new()));
    for r in futures::future::join_all(calls).await {
        r?;
    }
    Ok(())
}

/// Scenario 4: Warm vs cold: batches on a persistent pool vs a pool spawned per batch; and start-up of
/// N workers to ready vs `python3 -c pass`.
pub async fn warm_vs_cold(env: &Env, s: Scale) -> Outcome {
    let warm = pool(env, 3).await?;
    let (mut w, mut c) = (vec![], vec![]);
    for _ in 0..s.batches {
        let t = Instant::now();
        batch(&warm).await?;
        w.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let cold = pool(env, 3).await?;
        batch(&cold).await?;
        cold.shutdown().await;
        c.push(t.elapsed().as_secs_f64() * 1e3);
    }
    warm.shutdown().await;
    let (wm, cm) = (median(&w), median(&c));
    let mut figures = json!({
        "batches": s.batches,
        "warm_batch_ms": wm, "respawn_batch_ms": cm,
        "warm_total_ms": w.iter().sum::<f64>(), "respawn_total_ms": c.iter().sum::<f64>(),
    });
    let mut ratios = vec![("batches_respawn_over_warm".to_string(), cm / wm)];
    let mut rows = vec![(
        format!("{} batches of 3: per batch, warm vs respawn", s.batches),
        format!("{wm:.2} ms vs {cm:.1} ms"),
    )];
    for n in [1usize, 4, 8] {
        let (mut st, mut py) = (vec![], vec![]);
        for _ in 0..s.samples.min(8) {
            let t = Instant::now();
            let p = pool(env, n).await?;
            st.push(t.elapsed().as_secs_f64() * 1e3);
            p.shutdown().await;
            let t = Instant::now();
            let ok = tokio::process::Command::new("python3")
                .args(["-c", "pass"])
                .status()
                .await?;
            anyhow::ensure!(ok.success());
            py.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (st, py) = (median(&st), median(&py));
        figures[format!("startup_{n}_ms")] = json!(st);
        figures[format!("python_pass_ms_{n}")] = json!(py);
        ratios.push((format!("startup_{n}_over_python_pass"), st / py));
        rows.push((
            format!("start {n} workers to ready vs python3 -c pass"),
            format!("{st:.1} ms vs {py:.1} ms"),
        ));
    }
    Ok((figures, ratios, rows))
}

/// Scenario 5: Recovery: SIGKILL of a worker to its replacement ready, vs one cold start.
pub async fn recovery(env: &Env, s: Scale) -> Outcome {
    // Each kill below comes after a healthy run of at least `reset_after`, so it is a lone
    // crash: restarted at once, as in production, not a crash loop that backs off.
    let pool = Pool::builder(env.demo_spec())
        .size(2)
        .intensity(1000, Duration::from_secs(5))
        .backoff(wharf::Backoff {
            reset_after: Duration::from_millis(100),
            ..wharf::Backoff::default()
        })
        .build()
        .await?;
    pool.wait_ready(2, Duration::from_secs(60)).await?;
    let (mut rec, mut cold) = (vec![], vec![]);
    for _ in 0..s.samples {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let victim = pool.worker_info()[0].pid;
        let t = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(victim as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        loop {
            let info = pool.worker_info();
            if info.len() == 2
                && info
                    .iter()
                    .all(|w| w.pid != victim && w.state == wharf::WorkerState::Idle)
            {
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
            anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "no recovery");
        }
        rec.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let port = wharf_actors::port::Port::start(&env.demo_spec().into()).await?;
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        port.kill(wharf::PortError::Closed);
        port.exit_info(Duration::from_secs(5)).await;
    }
    pool.shutdown().await;
    let (r, c) = (median(&rec), median(&cold));
    Ok((
        json!({"samples": s.samples, "recovery_ms": r, "cold_start_ms": c}),
        vec![("recovery_over_cold_start".into(), r / c)],
        vec![(
            "SIGKILL to replacement ready vs one cold start".into(),
            format!("{r:.1} ms vs {c:.1} ms"),
        )],
    ))
}

/// Scenario 6: Round trip by payload size: wharf vs the raw floor.
pub async fn payload(env: &Env, s: Scale) -> Outcome {
    let pool = pool(env, 1).await?;
    let mut floor = Some(RawWorker::spawn(env)?);
    let mut figures = serde_json::Map::new();
    let mut ratios = Vec::new();
    let mut rows = Vec::new();
    for (name, size) in [
        ("100B", 100usize),
        ("64KiB", 64 * 1024),
        ("1MiB", 1024 * 1024),
    ] {
        let b = Value::Binary(vec![0x5a; size]);
        let n = (s.calls * 100 / size.max(100)).clamp(20, s.calls);
        let (mut w, mut f) = (vec![], vec![]);
        for _ in 0..s.rounds {
            w.push(median(&wharf_latencies(&pool, n, &b).await?));
            f.push(median(&floor_latencies(&mut floor, n, &b).await?));
        }
        let (w, f) = (median(&w), median(&f));
        figures.insert(name.into(), json!({"wharf_p50_us": w, "floor_p50_us": f}));
        ratios.push((format!("payload_{name}_p50_wharf_over_floor"), w / f));
        rows.push((
            format!("round trip p50 at {name}: wharf vs floor"),
            format!("{} vs {}", us(w), us(f)),
        ));
    }
    pool.shutdown().await;
    Ok((Json::Object(figures), ratios, rows))
}
