//! Hostile workers and input: every broken frame, message or behaviour gets a clear typed
//! error, memory stays bounded, nothing panics, and the other workers keep serving.
//! Also the restart storm: workers that all crash at once, again and again.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use wharf::{Backoff, Error, Pool, ProcessSpec, RestartType, Value};

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
}

fn hostile_spec(args: &[&str]) -> ProcessSpec {
    let script = repo_root().join("tests/workers/hostile.py");
    ProcessSpec::from_argv(["python3"])
        .unwrap()
        .args([script.into_os_string()])
        .args(args.iter().copied())
        .init_timeout(Duration::from_secs(20))
}

/// This process's resident set, in bytes (0 if unknown).
fn own_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// What a misbehaving call must produce.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A protocol violation whose reason contains the text; the worker is replaced.
    Violation(&'static str),
    /// The worker died under the call; it is replaced.
    Died,
    /// The call succeeds, then the worker is replaced (its later output broke the protocol).
    OkThenReplaced,
    /// The call succeeds and the same worker keeps serving.
    OkAndKept,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_behaviour_gets_a_typed_error_and_the_pool_keeps_serving() {
    init_logs();
    count_panics();
    let pool = Pool::builder(hostile_spec(&[]))
        .size(2)
        .intensity(100, Duration::from_secs(5))
        .call_timeout(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    pool.wait_ready(2, Duration::from_secs(30)).await.unwrap();
    let rss_before = own_rss();
    let cases = [
        ("oversized", Expect::Violation("exceeds max_frame")),
        ("too_large", Expect::Violation("exceeds max_frame")),
        ("zero_frame", Expect::Violation("zero-length frame")),
        ("truncated_eof", Expect::Violation("truncated frame")),
        ("garbage", Expect::Violation("malformed message")),
        ("not_a_map", Expect::Violation("not a MessagePack map")),
        ("deep_nesting", Expect::Violation("malformed message")),
        ("unknown_type", Expect::Violation("unknown variant")),
        ("unknown_id", Expect::Violation("unknown request id")),
        ("duplicate", Expect::OkThenReplaced),
        ("junk_stdout", Expect::OkAndKept),
        ("flood_stderr", Expect::OkAndKept),
        ("close_fd", Expect::Died),
    ];
    let mut seen = Vec::new();
    for (method, expect) in cases {
        let mut lease = pool.checkout().await.unwrap();
        let pid = lease.pid();
        let result = lease.call::<Value>(method, &"payload").await;
        drop(lease);
        match (expect, &result) {
            (Expect::Violation(text), Err(e @ Error::ProtocolViolation { reason, .. })) => {
                assert!(reason.contains(text), "{method}: {e}");
            }
            (Expect::Died, Err(Error::WorkerDied { .. })) => {}
            (Expect::OkThenReplaced | Expect::OkAndKept, Ok(v)) => {
                assert_eq!(v, &Value::from("payload"), "{method}");
            }
            _ => panic!("{method}: expected {expect:?}, got {result:?}"),
        }
        match expect {
            Expect::OkAndKept => assert!(pid_exists(pid), "{method}: the worker is kept"),
            _ => assert!(
                eventually(Duration::from_secs(10), || !pid_exists(pid)).await,
                "{method}: the offending worker {pid} is killed"
            ),
        }
        // The pool keeps serving and returns to full strength.
        assert_eq!(
            pool.call::<Value>("echo", &method).await.unwrap(),
            Value::from(method)
        );
        pool.wait_ready(2, Duration::from_secs(20)).await.unwrap();
        seen.push(
            serde_json::json!({"case": method, "result": format!("{:?}", result.map(|_| "ok"))}),
        );
    }
    let growth = own_rss().saturating_sub(rss_before);
    println!(
        "{}",
        serde_json::json!({"scenario": "hostile_calls", "cases": seen, "rss_growth_bytes": growth})
    );
    assert!(
        growth < 64 * 1024 * 1024,
        "runtime memory grew by {growth} bytes"
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "nothing panicked");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_answers_the_init_ping_fails_the_pool() {
    init_logs();
    let pool = Pool::builder(hostile_spec(&["--silent-init"]))
        .size(1)
        .init_timeout(Duration::from_millis(500))
        .intensity(2, Duration::from_secs(30))
        .checkout_timeout(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let err = pool.call::<Value>("echo", &1).await.unwrap_err();
    assert!(matches!(err, Error::PoolFailed { .. }), "{err:?}");
    assert!(
        err.to_string().contains("did not answer the init ping"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(pool.stats().start_failures, 3);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_right_after_ready_is_bounded_by_the_restart_policy() {
    init_logs();
    // Permanent: restarted, too often: the pool fails instead of flapping forever.
    let pool = Pool::builder(demo_spec(&["--exit-after-ready"]))
        .size(1)
        .intensity(3, Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(30), || pool.stats().failed).await);
    let launches = pool.stats().restarts;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pool.stats().restarts, launches, "no restart after failing");
    assert!(matches!(
        pool.call::<Value>("echo", &1).await,
        Err(Error::PoolFailed { .. })
    ));
    pool.shutdown().await;

    // Transient: exiting with status 0 is normal, so the worker stays down: no workers left.
    let pool = Pool::builder(demo_spec(&["--exit-after-ready"]))
        .size(1)
        .checkout_timeout(Duration::from_secs(5))
        .restart_type(RestartType::Transient)
        .build()
        .await
        .unwrap();
    // The first call may meet the worker on its way out; soon every call is refused at once.
    let mut refused = false;
    for _ in 0..100 {
        match pool.call::<Value>("echo", &1).await {
            Err(Error::NoWorkers { .. }) => {
                refused = true;
                break;
            }
            Err(Error::WorkerDied { .. }) | Ok(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(
        refused,
        "a transient worker that exited normally is not restarted"
    );
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

fn cpu_time() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_storm_is_deterministic_and_cheap() {
    init_logs();
    let size = 4;
    let pool = Pool::builder(demo_spec(&[]))
        .size(size)
        .intensity(10, Duration::from_secs(60))
        .backoff(Backoff {
            initial: Duration::from_millis(100),
            jitter: 0.0,
            ..Backoff::default()
        })
        .build()
        .await
        .unwrap();
    pool.wait_ready(size, Duration::from_secs(30))
        .await
        .unwrap();
    let cpu_start = cpu_time();
    let wall_start = Instant::now();
    // Each round crashes every worker at once: 4 restarts a round, 10 allowed in the window.
    for round in 1..=3 {
        let leases = futures::future::join_all((0..size).map(|_| pool.checkout())).await;
        let crashes = leases.into_iter().map(|lease| async move {
            let mut lease = lease.unwrap();
            lease.call::<Value>("crash", &3).await
        });
        for r in futures::future::join_all(crashes).await {
            assert!(matches!(r, Err(Error::WorkerDied { .. })), "{r:?}");
        }
        if round < 3 {
            pool.wait_ready(size, Duration::from_secs(30))
                .await
                .unwrap();
            assert!(
                !pool.stats().failed,
                "round {round}: {} restarts so far",
                pool.stats().restarts
            );
        }
    }
    assert!(
        eventually(Duration::from_secs(10), || pool.stats().failed).await,
        "round 3 exceeds 10 restarts"
    );
    let stats = pool.stats();
    assert_eq!(
        stats.restarts, 10,
        "exactly the tolerated restarts happened"
    );
    let cpu = cpu_time() - cpu_start;
    let wall = wall_start.elapsed();
    // Nothing spins once failed.
    let idle_cpu_start = cpu_time();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_cpu = cpu_time() - idle_cpu_start;
    println!(
        "{}",
        serde_json::json!({
            "scenario": "restart_storm", "rounds": 3, "restarts": stats.restarts,
            "runtime_cpu_ms": cpu.as_millis() as u64, "wall_ms": wall.as_millis() as u64,
            "cpu_ms_in_1s_after_failure": idle_cpu.as_millis() as u64,
        })
    );
    assert!(cpu < wall, "the runtime used {cpu:?} of CPU in {wall:?}");
    assert!(
        idle_cpu < Duration::from_millis(100),
        "{idle_cpu:?} of CPU while failed"
    );
    pool.shutdown().await;
}
