//! Chaos under load, Jepsen-style: closed-loop callers on a pool of Python workers while a
//! killer SIGKILLs (or SIGSTOPs) workers. Every call is accounted for — ok, failed with a typed
//! error, or hung — and every failure must be explained by a kill of that call's worker. After
//! the chaos the pool must be back at full strength, with no zombie and no leaked fd.
//!
//! The scenarios share process-wide counts (fds, children), so they run one at a time.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rand::RngExt;
use wharf::{Backoff, CallOptions, Error, HealthCheck, Pool, Value};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WORKERS: usize = 4;
const CALLERS: usize = 16;
const CHAOS: Duration = Duration::from_secs(4);
/// A call not finished within this bound is hung.
const HANG: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
struct Kill {
    at: Instant,
    pid: u32,
    /// The worker's name, for calls that know only that (a pool's calls).
    worker: String,
}

#[derive(Debug)]
struct Record {
    start: Instant,
    end: Instant,
    pid: u32,
    /// The worker a failed pool call names in its error.
    worker: Option<String>,
    outcome: Result<(), String>,
    hung: bool,
}

#[derive(Debug, Clone, Copy)]
enum Killer {
    /// SIGKILL a random worker every period.
    Timer(Duration),
    /// SIGKILL a random worker at exponentially distributed intervals with this mean.
    Poisson(Duration),
    /// SIGSTOP one worker once, a second into the chaos.
    StopOne,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Calls {
    /// Checkout, then call: failures are attributed to the leased worker's pid.
    Leased,
    /// Idempotent calls, with retries on worker death.
    Idempotent,
    /// Pool calls sharing workers that serve several calls at once: failures are attributed
    /// to the worker the error names.
    Multiplexed,
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Children of this process that are zombies (exited, not reaped).
fn zombies() -> usize {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                return false;
            };
            let mut f = rest.split_whitespace();
            let state = f.next();
            let ppid = f.next();
            state == Some("Z") && ppid == Some(me.as_str())
        })
        .count()
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).is_ok()
}

async fn chaos_pool(args: &[&str]) -> Pool {
    init_logs();
    let pool = Pool::builder(demo_spec(args))
        .name("chaos")
        .size(WORKERS)
        .intensity(200, Duration::from_secs(5))
        .backoff(Backoff {
            initial: Duration::from_millis(5),
            ..Backoff::default()
        })
        .call_timeout(Duration::from_secs(2))
        .checkout_timeout(Duration::from_secs(10))
        .health_check(HealthCheck {
            interval: Some(Duration::from_millis(200)),
            timeout: Duration::from_millis(300),
            max_missed: 2,
        })
        .retry(5, Duration::from_millis(5))
        .build()
        .await
        .unwrap();
    pool.wait_ready(WORKERS, Duration::from_secs(30))
        .await
        .unwrap();
    pool
}

struct Outcome {
    records: Vec<Record>,
    kills: Vec<Kill>,
    recovery: Duration,
}

async fn run_chaos(pool: &Pool, killer: Killer, calls: Calls) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let records = Arc::new(Mutex::new(Vec::new()));
    let kills = Arc::new(Mutex::new(Vec::new()));

    let callers: Vec<_> = (0..CALLERS)
        .map(|c| {
            let (pool, stop, records) = (pool.clone(), stop.clone(), records.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = Value::Array(vec![Value::from(c as u64), Value::from(n)]);
                    let start = Instant::now();
                    let (pid, worker, result) =
                        match tokio::time::timeout(HANG, one_call(&pool, calls, body)).await {
                            Ok((pid, worker, r)) => (pid, worker, Some(r)),
                            Err(_) => (0, None, None),
                        };
                    records.lock().unwrap().push(Record {
                        start,
                        end: Instant::now(),
                        pid,
                        worker,
                        hung: result.is_none(),
                        outcome: result.unwrap_or(Ok(())),
                    });
                }
            })
        })
        .collect();

    let killer_task = {
        let (pool, stop, kills) = (pool.clone(), stop.clone(), kills.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut stopped_one = false;
            while !stop.load(Ordering::Relaxed) {
                let wait = match killer {
                    Killer::Timer(every) => every,
                    Killer::Poisson(mean) => {
                        let u: f64 = rand::rng().random_range(f64::EPSILON..1.0);
                        mean.mul_f64(-u.ln()).min(mean * 5)
                    }
                    Killer::StopOne => Duration::from_millis(50),
                };
                tokio::time::sleep(wait).await;
                let workers = pool.worker_info();
                if workers.is_empty() {
                    continue;
                }
                let w = &workers[rand::rng().random_range(0..workers.len())];
                let (pid, worker) = (w.pid, w.id.clone());
                match killer {
                    Killer::StopOne => {
                        if !stopped_one && started.elapsed() > Duration::from_secs(1) {
                            let at = Instant::now();
                            if signal(pid, nix::sys::signal::Signal::SIGSTOP) {
                                kills.lock().unwrap().push(Kill { at, pid, worker });
                            }
                            stopped_one = true;
                        }
                    }
                    _ => {
                        // Stamped before the signal: a call may fail before we get to record it.
                        let at = Instant::now();
                        if signal(pid, nix::sys::signal::Signal::SIGKILL) {
                            kills.lock().unwrap().push(Kill { at, pid, worker });
                        }
                    }
                }
            }
        })
    };

    tokio::time::sleep(CHAOS).await;
    stop.store(true, Ordering::Relaxed);
    killer_task.await.unwrap();
    let chaos_over = Instant::now();
    for c in callers {
        c.await.unwrap();
    }
    pool.wait_ready(WORKERS, Duration::from_secs(20))
        .await
        .expect("the pool returns to full strength");
    let recovery = chaos_over.elapsed();
    let records = std::mem::take(&mut *records.lock().unwrap());
    let kills = kills.lock().unwrap().clone();
    Outcome {
        records,
        kills,
        recovery,
    }
}

/// The worker a call's error names, if any.
fn worker_of(e: &Error) -> Option<String> {
    match e {
        Error::WorkerDied { worker, .. }
        | Error::DeadlineExceeded { worker, .. }
        | Error::KilledForDeadline { worker, .. }
        | Error::ProtocolViolation { worker, .. } => Some(worker.clone()),
        _ => None,
    }
}

async fn one_call(
    pool: &Pool,
    calls: Calls,
    body: Value,
) -> (u32, Option<String>, Result<(), String>) {
    let check = |r: Result<Value, Error>| -> (Option<String>, Result<(), String>) {
        match r {
            Ok(v) if v == body => (None, Ok(())),
            Ok(v) => (None, Err(format!("wrong reply {v:?}"))),
            Err(e) => (worker_of(&e), Err(format!("{}: {e}", e.kind()))),
        }
    };
    // Every fourth call waits 5 ms, so that kills land mid-call too.
    let slow = matches!(body.as_array().and_then(|a| a[1].as_u64()), Some(n) if n % 4 == 0);
    match calls {
        Calls::Idempotent => {
            let (_, r) = check(
                pool.call_with("echo", &body, CallOptions::new().idempotent())
                    .await,
            );
            (0, None, r)
        }
        Calls::Multiplexed => {
            let r = if slow {
                pool.call::<Value>("io_wait", &5)
                    .await
                    .map(|_| body.clone())
            } else {
                pool.call_value("echo", body.clone(), CallOptions::new())
                    .await
            };
            let (worker, r) = check(r);
            (0, worker, r)
        }
        Calls::Leased => match pool.checkout().await {
            Err(e) => (0, None, Err(format!("{}: {e}", e.kind()))),
            Ok(mut lease) => {
                let pid = lease.pid();
                let r = if slow {
                    lease.call::<Value>("sleep", &5).await.map(|_| body.clone())
                } else {
                    lease
                        .call_value("echo", body.clone(), CallOptions::new())
                        .await
                };
                let (_, r) = check(r);
                (pid, None, r)
            }
        },
    }
}

/// Checks the accounting and prints the scenario's figures; returns (calls, failed).
fn account(name: &str, outcome: &Outcome, zombies_after: usize, fd_delta: i64) -> (usize, usize) {
    let Outcome {
        records,
        kills,
        recovery,
    } = outcome;
    let hung = records.iter().filter(|r| r.hung).count();
    let failed: Vec<&Record> = records.iter().filter(|r| r.outcome.is_err()).collect();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for r in &failed {
        let msg = r.outcome.as_ref().unwrap_err();
        *by_kind
            .entry(msg.split(':').next().unwrap_or("").to_owned())
            .or_default() += 1;
        // Each failure is explained by a kill (or stop) of that call's worker before the call
        // ended (a worker killed while idle can be handed out before its death is noticed,
        // but not long after: the reaper notices at once).
        let explained = kills.iter().any(|k| {
            (k.pid == r.pid || r.worker.as_deref() == Some(k.worker.as_str()))
                && k.at <= r.end
                && k.at + Duration::from_secs(5) >= r.start
        });
        assert!(
            explained,
            "unexplained failure on pid {} (worker {:?}): {msg}; kills {kills:?}",
            r.pid, r.worker
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": name,
            "calls": records.len(),
            "ok": records.len() - failed.len() - hung,
            "failed": failed.len(),
            "failed_by_kind": by_kind,
            "hung": hung,
            "kills": kills.len(),
            "recovery_ms": recovery.as_millis() as u64,
            "zombies": zombies_after,
            "fd_delta": fd_delta,
        })
    );
    assert_eq!(hung, 0, "no call may hang");
    assert!(records.len() > 500, "the load ran: {} calls", records.len());
    (records.len(), failed.len())
}

async fn scenario(name: &str, killer: Killer, calls: Calls) -> (usize, usize, usize) {
    let _serial = SERIAL.lock().await;
    let args: &[&str] = match calls {
        Calls::Multiplexed => &["--max-concurrency", "8"],
        _ => &[],
    };
    let pool = chaos_pool(args).await;
    // Let the runtime settle (lazy fds of the reactor, first pings) before the baseline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_before = fd_count();
    let outcome = run_chaos(&pool, killer, calls).await;
    // Dead workers' ports close as their actors stop; give that a moment, then count.
    let settled = eventually(Duration::from_secs(10), || {
        fd_count() <= fds_before && zombies() == 0
    })
    .await;
    let fd_delta = fd_count() as i64 - fds_before as i64;
    let zombies_after = zombies();
    let (n, failed) = account(name, &outcome, zombies_after, fd_delta);
    assert!(
        settled,
        "fds back to baseline ({fd_delta:+}) and no zombies ({zombies_after})"
    );
    assert!(
        outcome.recovery < Duration::from_secs(10),
        "recovery took {:?}",
        outcome.recovery
    );
    let kills = outcome.kills.len();
    pool.shutdown().await;
    (n, failed, kills)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_on_a_timer_under_load() {
    let (_, _, kills) = scenario(
        "timer_sigkill",
        Killer::Timer(Duration::from_millis(250)),
        Calls::Leased,
    )
    .await;
    assert!(kills >= 8, "the killer ran: {kills} kills");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_as_a_poisson_process_under_load() {
    let (_, _, kills) = scenario(
        "poisson_sigkill",
        Killer::Poisson(Duration::from_millis(250)),
        Calls::Leased,
    )
    .await;
    assert!(kills >= 4, "the killer ran: {kills} kills");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigstopped_worker_is_killed_and_replaced() {
    let (_, _, stops) = scenario("sigstop_one", Killer::StopOne, Calls::Leased).await;
    assert_eq!(stops, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_retries_idempotent_calls_never_fail() {
    let (calls, failed, kills) = scenario(
        "timer_sigkill_with_retry",
        Killer::Timer(Duration::from_millis(250)),
        Calls::Idempotent,
    )
    .await;
    assert!(kills >= 8, "the killer ran: {kills} kills");
    assert_eq!(
        failed, 0,
        "retries absorb every worker death ({calls} calls)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_on_a_timer_under_load_on_multiplexed_workers() {
    let (_, _, kills) = scenario(
        "timer_sigkill_multiplexed",
        Killer::Timer(Duration::from_millis(250)),
        Calls::Multiplexed,
    )
    .await;
    assert!(kills >= 8, "the killer ran: {kills} kills");
}
