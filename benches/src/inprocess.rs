//! Scenario 8: wharf against in-process Python through pyo3, on the same Python code
//! (`benches/python/inprocess.py`, imported in this process and served by wharf workers).
//!
//! - **Small call**: a trivial function (`echo` of 100 B), the GIL acquired per call as an
//!   embedding's request handlers would, against a one-worker wharf pool's `echo`.
//! - **CPU-bound throughput**: a pure-Python loop of a few ms, called by as many concurrent
//!   callers as cores (2): two threads through pyo3 (the GIL serialises them) against a wharf
//!   pool of 2 workers; one thread and one worker alone are the references, and the cores
//!   other work took meanwhile are measured.
//! - **Crash**: the Python code ends its process (`os._exit`) or segfaults. In process, the
//!   host goes down with it: shown in a child process (this binary with the hidden
//!   `--pyo3-child` flag). Through wharf, the call fails with a typed error and the pool serves
//!   on. A runaway call with a deadline is stopped (its worker killed and replaced).
//! - **Start-up and memory**: interpreter start-up in process (in a child) against a one-worker
//!   pool built to ready; the host's memory growth from embedding Python against a worker's.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pyo3::prelude::*;
use serde_json::{json, Value as Json};
use wharf::{CallOptions, Error, Pool, Value};

use crate::scenarios::{ready_pool, us, Outcome};
use crate::{median, percentile, Env, Scale};

/// The module's name, from `benches/python`.
const MODULE: &str = "inprocess";
/// What a crash child prints before it calls into Python, and if it is still alive after.
const BEFORE: &str = "calling into Python";
const SURVIVED: &str = "host survived the call";
/// The target duration of one CPU-bound call.
const CPU_CALL: Duration = Duration::from_millis(5);

fn python_dir(root: &Path) -> String {
    root.join("benches/python").to_string_lossy().into_owned()
}

/// Imports the scenario's module into this process's interpreter (started on first use).
fn import<'py>(py: Python<'py>, root: &Path) -> PyResult<Bound<'py, PyModule>> {
    py.import("sys")?
        .getattr("path")?
        .call_method1("insert", (0, python_dir(root)))?;
    py.import(MODULE)
}

/// The same module served by wharf workers.
fn spec(env: &Env) -> wharf::ProcessSpec {
    let script = env.root.join("benches/python/inprocess.py");
    wharf::ProcessSpec::from_argv(["python3".into(), script.into_os_string()])
        .expect("non-empty argv")
        .env("PYTHONPATH", env.python_path().into_os_string())
}

async fn pool(env: &Env, size: usize) -> anyhow::Result<Pool> {
    ready_pool(spec(env), "bench-inprocess", size).await
}

/// A field in KiB from a `/proc/<pid>/` file (`status`'s `VmRSS:`, `smaps_rollup`'s `Pss:`:
/// shared pages split among their sharers).
fn proc_kib(pid: &str, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The 1-minute load average: how much other work shared the machine.
fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// CPU time (clock ticks) of the whole machine and of this process and some of its workers.
struct CpuTicks {
    busy: u64,
    total: u64,
    ours: u64,
}

impl CpuTicks {
    fn read(pids: &[u32]) -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| cpu.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
        let process = |pid: &str| -> u64 {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = s.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
            let f: Vec<u64> = after
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            // utime and stime, fields 14 and 15 of the line.
            f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
        };
        let ours = process("self") + pids.iter().map(|p| process(&p.to_string())).sum::<u64>();
        CpuTicks {
            busy,
            total: busy + at(3) + at(4),
            ours,
        }
    }

    /// How many cores, on average since `self`, went to work other than this process and
    /// those workers: 0 on a quiet machine; each core taken halves what 2 workers can do on 2.
    fn other_cores(&self, now: &CpuTicks) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = now.total.saturating_sub(self.total) as f64 / cores;
        let other = now
            .busy
            .saturating_sub(self.busy)
            .saturating_sub(now.ours.saturating_sub(self.ours));
        if wall > 0.0 {
            other as f64 / wall
        } else {
            0.0
        }
    }
}

fn rss_kib(pid: &str) -> u64 {
    proc_kib(pid, "status", "VmRSS:")
}

/// The hidden `--pyo3-child MODE` entry point: this binary as a host that embeds Python.
/// `startup` prints the interpreter's start-up time and the host's memory growth as JSON;
/// `exit` and `segv` call Python code that ends the process, and print [`SURVIVED`] only if
/// the host lives on.
pub fn child(mode: &str, root: &Path) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    match mode {
        "startup" => {
            let before = rss_kib("self");
            let t = Instant::now();
            Python::attach(|py| import(py, root).map(drop))?;
            let init_us = t.elapsed().as_secs_f64() * 1e6;
            let after = rss_kib("self");
            writeln!(
                out,
                "{}",
                json!({"init_us": init_us, "rss_before_kib": before, "rss_after_kib": after})
            )?;
        }
        "exit" | "segv" => {
            Python::attach(|py| import(py, root).map(drop))?;
            writeln!(out, "{BEFORE}")?;
            out.flush()?;
            let r = Python::attach(|py| -> PyResult<()> {
                let m = import(py, root)?;
                if mode == "exit" {
                    m.call_method1("exit_now", (1,))?;
                } else {
                    m.call_method0("segfault")?;
                }
                Ok(())
            });
            writeln!(out, "{SURVIVED} ({r:?})")?;
        }
        other => anyhow::bail!("unknown --pyo3-child mode {other:?}"),
    }
    Ok(())
}

/// Runs this binary as a child host in `mode`; returns its stdout and how it ended.
async fn run_child(env: &Env, mode: &str) -> anyhow::Result<(String, std::process::ExitStatus)> {
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--pyo3-child", mode])
        .env("PYTHONPATH", env.python_path())
        .output()
        .await?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status,
    ))
}

fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{status}"),
    }
}

/// The functions called in process.
struct InProc {
    echo: Py<PyAny>,
    spin: Py<PyAny>,
}

/// Per-call latencies (µs) of `n` sequential in-process calls of `echo`, each acquiring the
/// GIL and converting the argument and the reply, on a blocking thread.
async fn pyo3_latencies(f: &Arc<InProc>, n: usize, body: &str) -> anyhow::Result<Vec<f64>> {
    let (f, body) = (f.clone(), body.to_owned());
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f64>> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let reply: String =
                Python::attach(|py| f.echo.call1(py, (body.as_str(),))?.extract(py))?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
            debug_assert_eq!(reply.len(), body.len());
        }
        Ok(v)
    })
    .await?
}

/// Per-call latencies (µs) of `n` sequential wharf calls of `echo`, from a runtime task.
async fn wharf_latencies(pool: &Pool, n: usize, body: &str) -> anyhow::Result<Vec<f64>> {
    let (pool, body) = (pool.clone(), Value::from(body));
    tokio::spawn(async move {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            pool.call::<Value>("echo", &body).await?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        anyhow::Ok(v)
    })
    .await?
}

/// CPU-bound calls per second through pyo3: `threads` threads, `per` calls of `spin(n)` each.
async fn pyo3_cpu_rate(f: &Arc<InProc>, threads: usize, per: usize, n: u64) -> anyhow::Result<f64> {
    let t = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let f = f.clone();
            tokio::task::spawn_blocking(move || -> PyResult<()> {
                for _ in 0..per {
                    Python::attach(|py| f.spin.call1(py, (n,)).map(drop))?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.await??;
    }
    Ok((threads * per) as f64 / t.elapsed().as_secs_f64())
}

/// CPU-bound calls per second through wharf: `callers` tasks, `per` calls of `spin(n)` each.
async fn wharf_cpu_rate(pool: &Pool, callers: usize, per: usize, n: u64) -> anyhow::Result<f64> {
    let t = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..per {
                    pool.call::<u64>("spin", &n).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok((callers * per) as f64 / t.elapsed().as_secs_f64())
}

/// The loop count that makes one `spin` take about [`CPU_CALL`] on this machine (median of a
/// few timed calls in process).
async fn calibrate(f: &Arc<InProc>) -> anyhow::Result<u64> {
    const PROBE: u64 = 100_000;
    let f = f.clone();
    let per_iter = tokio::task::spawn_blocking(move || -> PyResult<f64> {
        let mut t = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            Python::attach(|py| f.spin.call1(py, (PROBE,)).map(drop))?;
            t.push(start.elapsed().as_secs_f64());
        }
        Ok(median(&t) / PROBE as f64)
    })
    .await??;
    Ok(((CPU_CALL.as_secs_f64() / per_iter) as u64).max(1_000))
}

/// The name of an error's variant, for the JSON.
fn variant(e: &Error) -> String {
    format!("{e:?}")
        .split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A wharf call whose Python code ends its worker: the error it gets, then whether the pool
/// serves the next calls.
async fn wharf_crash(pool: &Pool, method: &str, body: Json) -> anyhow::Result<Json> {
    let t = Instant::now();
    let r = pool.call::<Value>(method, &body).await;
    let failed_ms = t.elapsed().as_secs_f64() * 1e3;
    let error = match &r {
        Ok(_) => None,
        Err(e) => Some(variant(e)),
    };
    let mut served = 0;
    for i in 0..20u64 {
        if pool.call::<u64>("echo", &i).await? == i {
            served += 1;
        }
    }
    Ok(json!({
        "call_failed": r.is_err(),
        "error": error,
        "failed_after_ms": failed_ms,
        "host_survived": true,
        "pool_served_after": served == 20,
    }))
}

/// A crash in process, in a child host.
async fn pyo3_crash(env: &Env, mode: &str) -> anyhow::Result<Json> {
    let (stdout, status) = run_child(env, mode).await?;
    anyhow::ensure!(
        stdout.contains(BEFORE),
        "the {mode} child did not reach its call: {status}, {stdout:?}"
    );
    Ok(json!({
        "host_survived": stdout.contains(SURVIVED),
        "host_exit": describe(status),
    }))
}

/// Scenario 8: wharf against in-process Python (pyo3).
pub async fn inprocess(env: &Env, s: Scale) -> Outcome {
    let load_start = load_avg();
    let root = env.root.clone();
    let f = Arc::new(
        tokio::task::spawn_blocking(move || {
            Python::attach(|py| -> PyResult<InProc> {
                let m = import(py, &root)?;
                Ok(InProc {
                    echo: m.getattr("echo")?.unbind(),
                    spin: m.getattr("spin")?.unbind(),
                })
            })
        })
        .await??,
    );
    let python = Python::version_str().replace('\n', " ");

    // Small calls, interleaved rounds.
    let one = pool(env, 1).await?;
    let body = "x".repeat(100);
    pyo3_latencies(&f, 50, &body).await?;
    wharf_latencies(&one, 50, &body).await?;
    let (mut p50, mut p99, mut w50, mut w99) = (vec![], vec![], vec![], vec![]);
    let (mut pmean, mut wmean) = (vec![], vec![]);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    for _ in 0..s.rounds {
        let p = pyo3_latencies(&f, s.calls, &body).await?;
        p50.push(percentile(&p, 0.5));
        p99.push(percentile(&p, 0.99));
        pmean.push(mean(&p));
        let w = wharf_latencies(&one, s.calls, &body).await?;
        w50.push(percentile(&w, 0.5));
        w99.push(percentile(&w, 0.99));
        wmean.push(mean(&w));
    }
    let worker_pid = one.worker_info()[0].pid;
    let worker_rss = rss_kib(&worker_pid.to_string());
    let worker_pss = proc_kib(&worker_pid.to_string(), "smaps_rollup", "Pss:");
    let (p50, p99, w50, w99) = (median(&p50), median(&p99), median(&w50), median(&w99));
    let (pmean, wmean) = (median(&pmean), median(&wmean));

    // CPU-bound throughput, 2 callers.
    let callers = 2;
    let n = calibrate(&f).await?;
    // Short rounds, many of them: a burst of other work on this shared machine then spoils a
    // few rounds, not the median.
    let per = if s.rounds <= 3 { 8 } else { 10 };
    let cpu_rounds = s.rounds * 2;
    let two = pool(env, callers).await?;
    wharf_cpu_rate(&two, callers, 2, n).await?;
    let pids: Vec<u32> = [&one, &two]
        .iter()
        .flat_map(|p| p.worker_info())
        .map(|w| w.pid)
        .collect();
    let cpu_before = CpuTicks::read(&pids);
    let (mut p1, mut p2, mut w1, mut w2) = (vec![], vec![], vec![], vec![]);
    for _ in 0..cpu_rounds {
        p2.push(pyo3_cpu_rate(&f, callers, per, n).await?);
        w2.push(wharf_cpu_rate(&two, callers, per, n).await?);
        p1.push(pyo3_cpu_rate(&f, 1, callers * per, n).await?);
        w1.push(wharf_cpu_rate(&one, 1, callers * per, n).await?);
    }
    // Read while both pools' workers are alive: a gone worker's ticks would count as other work.
    let other_cores = cpu_before.other_cores(&CpuTicks::read(&pids));
    one.shutdown().await;
    let (p1, p2, w1, w2) = (median(&p1), median(&p2), median(&w1), median(&w2));
    let spin_ms = 1e3 / p1;

    // Crashes and a runaway call: in a child host for pyo3, on the same pool for wharf.
    let pyo3_exit = pyo3_crash(env, "exit").await?;
    let pyo3_segv = pyo3_crash(env, "segv").await?;
    let wharf_exit = wharf_crash(&two, "exit_now", json!(1)).await?;
    let wharf_segv = wharf_crash(&two, "segfault", Json::Null).await?;
    let deadline = Duration::from_millis(100);
    let t = Instant::now();
    let runaway = two
        .call_with::<u64>("spin", &(n * 10_000), CallOptions::new().deadline(deadline))
        .await;
    let stopped_ms = t.elapsed().as_secs_f64() * 1e3;
    let runaway_error = runaway.as_ref().err().map(variant);
    let after_runaway = two.call::<u64>("echo", &7u64).await? == 7;
    two.shutdown().await;

    // Start-up and memory.
    let (mut init, mut ready, mut grown) = (vec![], vec![], vec![]);
    for _ in 0..s.samples.min(8) {
        let (stdout, status) = run_child(env, "startup").await?;
        anyhow::ensure!(status.success(), "startup child: {status}");
        let j: Json = serde_json::from_str(stdout.trim()).context("startup child's JSON")?;
        init.push(j["init_us"].as_f64().unwrap_or(0.0) / 1e3);
        let (b, a) = (
            j["rss_before_kib"].as_f64().unwrap_or(0.0),
            j["rss_after_kib"].as_f64().unwrap_or(0.0),
        );
        grown.push((a - b) / 1024.0);
        let t = Instant::now();
        let p = pool(env, 1).await?;
        ready.push(t.elapsed().as_secs_f64() * 1e3);
        p.shutdown().await;
    }
    let (init, ready, grown) = (median(&init), median(&ready), median(&grown));
    let worker_mib = worker_rss as f64 / 1024.0;

    let figures = json!({
        "python": python,
        "load_avg_1m": {"start": load_start, "end": load_avg()},
        "small_call": {
            "body_bytes": 100, "calls_per_round": s.calls, "rounds": s.rounds,
            "pyo3": {"p50_us": p50, "p99_us": p99, "mean_us": pmean},
            "wharf": {"p50_us": w50, "p99_us": w99, "mean_us": wmean},
        },
        "cpu_bound": {
            "callers": callers, "calls_per_caller": per, "rounds": cpu_rounds,
            "loop_iterations": n,
            "other_work_cores": other_cores,
            "call_ms": spin_ms,
            "pyo3_1_thread_calls_per_s": p1,
            "pyo3_2_threads_calls_per_s": p2,
            "wharf_1_worker_calls_per_s": w1,
            "wharf_2_workers_calls_per_s": w2,
        },
        "crash": {
            "pyo3": {"os_exit": pyo3_exit, "segfault": pyo3_segv},
            "wharf": {"os_exit": wharf_exit, "segfault": wharf_segv},
        },
        "runaway": {
            "wharf": {
                "deadline_ms": deadline.as_secs_f64() * 1e3,
                "stopped": runaway_error.as_deref() == Some("DeadlineExceeded"),
                "error": runaway_error,
                "stopped_after_ms": stopped_ms,
                "pool_served_after": after_runaway,
            },
        },
        "startup": {
            "pyo3_init_and_import_ms": init,
            "wharf_one_worker_ready_ms": ready,
        },
        "memory": {
            "pyo3_host_growth_mib": grown,
            "wharf_worker_rss_mib": worker_mib,
            "wharf_worker_pss_mib": worker_pss as f64 / 1024.0,
        },
    });
    let ratios = vec![
        ("wharf_call_over_pyo3_call".into(), w50 / p50),
        ("wharf_call_p99_over_pyo3_call_p99".into(), w99 / p99),
        ("wharf_cpu_throughput_over_pyo3".into(), w2 / p2),
        ("pyo3_cpu_2_threads_over_1_thread".into(), p2 / p1),
        ("wharf_cpu_2_workers_over_1_worker".into(), w2 / w1),
        ("wharf_ready_over_pyo3_init".into(), ready / init),
        (
            "wharf_worker_rss_over_pyo3_growth".into(),
            worker_mib / grown,
        ),
    ];
    let survived = |j: &Json| j["host_survived"].as_bool().unwrap_or(false);
    let rows = vec![
        (
            "small call p50 / p99: pyo3 (GIL per call)".into(),
            format!("{p50:.2} µs / {p99:.2} µs"),
        ),
        (
            "small call p50 / p99: wharf".into(),
            format!("{} / {}", us(w50), us(w99)),
        ),
        (
            format!("CPU-bound {spin_ms:.1} ms calls/s, {callers} callers"),
            format!(
                "pyo3 {p2:.0} (1 thread {p1:.0}), wharf {w2:.0} (1 worker {w1:.0}); \
                 other work {other_cores:.2} cores"
            ),
        ),
        (
            "Python os._exit / segfault: host survives? pyo3".into(),
            format!(
                "{} ({}) / {} ({})",
                survived(&pyo3_exit),
                pyo3_exit["host_exit"].as_str().unwrap_or_default(),
                survived(&pyo3_segv),
                pyo3_segv["host_exit"].as_str().unwrap_or_default(),
            ),
        ),
        (
            "Python os._exit / segfault: host survives? wharf".into(),
            format!(
                "true ({}) / true ({}), pool serves on: {} / {}",
                wharf_exit["error"].as_str().unwrap_or("no error"),
                wharf_segv["error"].as_str().unwrap_or("no error"),
                wharf_exit["pool_served_after"],
                wharf_segv["pool_served_after"],
            ),
        ),
        (
            format!("runaway call, wharf deadline {deadline:?}"),
            format!(
                "{} after {stopped_ms:.0} ms, pool serves on: {after_runaway}",
                runaway_error.as_deref().unwrap_or("not stopped")
            ),
        ),
        (
            "start-up: pyo3 init + import vs wharf 1 worker ready".into(),
            format!("{init:.1} ms vs {ready:.1} ms"),
        ),
        (
            "memory: pyo3 host growth vs wharf worker RSS (PSS)".into(),
            format!(
                "{grown:.1} MiB vs {worker_mib:.1} MiB ({:.1} MiB)",
                worker_pss as f64 / 1024.0
            ),
        ),
    ];
    Ok((figures, ratios, rows))
}
