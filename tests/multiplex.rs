//! Workers that serve several calls at once (`max_concurrency` in their init pong), with real
//! Python workers: pool calls share one worker, cancellation and death fail exactly the calls
//! they concern, deadline kills say why, and leases and sessions still hold a worker alone.

mod common;

use std::time::{Duration, Instant};

use common::*;
use wharf::{CallOptions, Error, Pool, PoolBuilder, Value};

const SETTLE: Duration = Duration::from_secs(15);

/// A pool of one demo worker declaring `max_concurrency`, plus extra demo arguments.
fn one_worker(max_concurrency: usize, extra: &[&str]) -> PoolBuilder {
    init_logs();
    let n = max_concurrency.to_string();
    let mut args = vec!["--max-concurrency", n.as_str()];
    args.extend_from_slice(extra);
    Pool::builder(demo_spec(&args)).size(1)
}

/// Spawns `n` pool calls of `method` with bodies `body(i)`.
fn spawn_calls(
    pool: &Pool,
    n: usize,
    method: &'static str,
    body: impl Fn(usize) -> Value,
) -> Vec<tokio::task::JoinHandle<wharf::Result<Value>>> {
    (0..n)
        .map(|i| {
            let (pool, body) = (pool.clone(), body(i));
            tokio::spawn(async move { pool.call::<Value>(method, &body).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_calls_share_one_worker_and_take_about_one_handlers_time() {
    let pool = ready(one_worker(32, &[]), 1).await;
    let pid = pool.worker_pids()[0];
    let started = Instant::now();
    let calls = spawn_calls(&pool, 32, "io_wait", |i| Value::from(200 + i as u64));
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), Value::from(200 + i as u64));
    }
    let took = started.elapsed();
    // One after the other they would take 32 x ~0.2 s = 6.4 s.
    assert!(took < Duration::from_millis(3200), "took {took:?}");
    assert_eq!(pool.worker_pids(), vec![pid], "one worker served them all");
    let stats = pool.stats();
    assert_eq!((stats.calls, stats.ok), (32, 32));
    assert!(eventually(SETTLE, || pool.state().idle == 1).await);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_max_concurrency_one_still_serves_one_call_at_a_time() {
    let pool = ready(one_worker(1, &[]), 1).await;
    let started = Instant::now();
    let calls = spawn_calls(&pool, 4, "io_wait", |_| Value::from(300));
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), Value::from(300));
    }
    assert!(started.elapsed() >= Duration::from_millis(1200));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_multiplexed_call_leaves_the_others() {
    let pool = ready(one_worker(8, &[]), 1).await;
    let pid = pool.worker_pids()[0];
    let others = spawn_calls(&pool, 3, "io_wait", |_| Value::from(800));
    let victim = spawn_calls(&pool, 1, "io_wait", |_| Value::from(60_000)).remove(0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    victim.abort();
    assert!(victim.await.unwrap_err().is_cancelled());
    for call in others {
        assert_eq!(call.await.unwrap().unwrap(), Value::from(800));
    }
    // The cancelled call's slot comes back once the worker answered its cancel: the worker
    // is whole again, not killed.
    assert!(eventually(SETTLE, || pool.state().idle == 1).await);
    assert_eq!(pool.worker_pids(), vec![pid]);
    assert_eq!(
        pool.call::<Value>("echo", &"after").await.unwrap(),
        Value::from("after")
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multiplexed_worker_killed_with_n_calls_in_flight_fails_exactly_those_n() {
    const N: usize = 5;
    let pool = ready(one_worker(16, &[]), 1).await;
    let pid = pool.worker_pids()[0];
    let calls = spawn_calls(&pool, N, "io_wait", |_| Value::from(30_000));
    assert!(eventually(SETTLE, || pool.stats().calls == N as u64).await);
    tokio::time::sleep(Duration::from_millis(200)).await; // the frames reach the worker
    sigkill(pid);
    let mut died = 0;
    for call in calls {
        match call.await.unwrap() {
            Err(Error::WorkerDied { cause, .. }) => {
                assert!(cause.to_string().contains("signal: 9"), "{cause}");
                died += 1;
            }
            other => panic!("expected WorkerDied, got {other:?}"),
        }
    }
    assert_eq!(died, N);
    assert_eq!(pool.stats().errors.get("worker_died"), Some(&(N as u64)));
    assert!(eventually(SETTLE, || pool.state().idle == 1).await);
    assert_ne!(pool.worker_pids(), vec![pid], "the worker was replaced");
    assert_eq!(
        pool.call::<Value>("io_wait", &10).await.unwrap(),
        Value::from(10)
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_sdk_worker_serves_pool_calls_at_once_and_its_death_fails_exactly_those_calls() {
    const N: usize = 5;
    init_logs();
    let spec = wharf::ProcessSpec::new(env!("CARGO_BIN_EXE_wharf-example-worker"))
        .args(["--max-concurrency", "8"]);
    let pool = ready(Pool::builder(spec).size(1), 1).await;
    let pid = pool.worker_pids()[0];
    let wait = |_| Value::Map(vec![(Value::from("ms"), Value::from(60_000))]);
    let calls = spawn_calls(&pool, N, "wait", wait);
    assert!(eventually(SETTLE, || pool.stats().calls == N as u64).await);
    // Served one at a time, this echo would queue behind five minutes of waits.
    let echo = pool.call::<Value>("echo", &"beside them");
    let echoed = tokio::time::timeout(Duration::from_secs(20), echo).await;
    assert_eq!(echoed.unwrap().unwrap(), Value::from("beside them"));
    sigkill(pid);
    let mut died = 0;
    for call in calls {
        match call.await.unwrap() {
            Err(Error::WorkerDied { .. }) => died += 1,
            other => panic!("expected WorkerDied, got {other:?}"),
        }
    }
    assert_eq!(died, N);
    assert_eq!(pool.stats().errors.get("worker_died"), Some(&(N as u64)));
    assert!(eventually(SETTLE, || pool.state().idle == 1).await);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_overrun_kills_a_multiplexed_worker_and_says_so_to_its_other_calls() {
    // Sync `sleep` handlers in threads: they ignore deadline_ms, so the runtime enforces it.
    let pool = ready(one_worker(8, &["--threads", "8"]), 1).await;
    let pid = pool.worker_pids()[0];
    let others = spawn_calls(&pool, 3, "sleep", |_| Value::from(10_000));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let err = pool
        .call_with::<Value>(
            "sleep",
            &60_000,
            CallOptions::new().deadline(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    for call in others {
        match call.await.unwrap() {
            Err(Error::KilledForDeadline {
                method, deadline, ..
            }) => {
                assert_eq!(method, "sleep");
                assert_eq!(deadline, Duration::from_millis(300));
            }
            other => panic!("expected KilledForDeadline, got {other:?}"),
        }
    }
    assert!(eventually(SETTLE, || !pid_exists(pid)).await);
    assert!(eventually(SETTLE, || pool.state().idle == 1).await);
    let stats = pool.stats();
    assert_eq!(stats.restarts, 0, "a deadline kill is a replacement");
    assert_eq!(stats.errors.get("killed_for_deadline"), Some(&3));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_and_sessions_hold_a_multiplexed_worker_alone() {
    let pool = ready(one_worker(8, &[]), 1).await;
    // A lease waits for the calls in flight, then keeps every other call out.
    let calls = spawn_calls(&pool, 4, "io_wait", |_| Value::from(500));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut lease = pool.checkout().await.unwrap();
    // Each call is counted when its reply has come, before its slot goes back.
    assert_eq!(
        pool.stats().ok,
        4,
        "the lease came before the calls in flight had ended"
    );
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), Value::from(500));
    }
    let waiting = spawn_calls(&pool, 1, "echo", |_| Value::from("after the lease")).remove(0);
    assert_eq!(
        lease.call::<Value>("io_wait", &300).await.unwrap(),
        Value::from(300)
    );
    assert!(!waiting.is_finished(), "a call got in beside a lease");
    drop(lease);
    assert_eq!(
        waiting.await.unwrap().unwrap(),
        Value::from("after the lease")
    );

    // A session too: its state is its own, and no pool call runs beside it.
    let session = pool.session("s1").await.unwrap();
    session
        .call::<Value>("state_set", &serde_json::json!({"key": "k", "value": 7}))
        .await
        .unwrap();
    let waiting = spawn_calls(&pool, 1, "state_get", |_| {
        Value::Map(vec![(Value::from("key"), Value::from("k"))])
    })
    .remove(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a call got in beside a session");
    assert_eq!(
        session
            .call::<Value>("state_get", &serde_json::json!({"key": "k"}))
            .await
            .unwrap(),
        Value::from(7)
    );
    session.end().await.unwrap();
    // After the session's reset, the waiting call sees none of its state.
    assert_eq!(waiting.await.unwrap().unwrap(), Value::Nil);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_and_try_call_share_a_multiplexed_worker_and_streams_hold_it_alone() {
    let pool = ready(one_worker(16, &[]), 1).await;
    use futures::StreamExt;
    let started = Instant::now();
    let replies: Vec<u64> = pool
        .map_with("io_wait", vec![200u64; 16], 16, CallOptions::new())
        .map(|r: wharf::Result<u64>| r.unwrap())
        .collect()
        .await;
    assert_eq!(replies, vec![200; 16]);
    assert!(
        started.elapsed() < Duration::from_millis(1600),
        "map ran one at a time"
    );
    // try_call takes a free slot beside a call in flight.
    let busy = spawn_calls(&pool, 1, "io_wait", |_| Value::from(1000)).remove(0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        pool.try_call::<Value>("echo", &1).await.unwrap(),
        Value::from(1)
    );
    // A stream holds the worker alone (its backpressure would hold up the other calls'
    // replies): it starts once the call in flight has ended.
    let mut stream = pool
        .call_stream("stream", &serde_json::json!({"n": 3}))
        .await
        .unwrap();
    assert_eq!(
        pool.stats().ok,
        18,
        "the stream began beside a call in flight"
    );
    let mut items = Vec::new();
    while let Some(item) = stream.next().await {
        items.push(item.unwrap().into_value());
    }
    assert_eq!(items, vec![0.into(), 1.into(), 2.into(), 3.into()]);
    drop(stream);
    assert_eq!(busy.await.unwrap().unwrap(), Value::from(1000));
    assert!(eventually(SETTLE, || pool.state().idle == 1).await);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_multiplexed_call_keeps_its_slot_until_its_reply_has_come() {
    init_logs();
    let pool = ready(Pool::builder(fixture("stubborn_concurrent.py")).size(1), 1).await;
    let pid = pool.worker_pids()[0];
    // A call abandoned 100 ms in; the worker ignores the cancel and replies ~1.6 s later.
    let abandoned = spawn_calls(&pool, 1, "stubborn", |_| Value::from(800)).remove(0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    abandoned.abort();
    let _ = abandoned.await;
    // The second slot serves; with it busy, no slot is free: the abandoned call holds its own.
    let busy = spawn_calls(&pool, 1, "io_wait", |_| Value::from(400)).remove(0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = pool.try_call::<Value>("echo", &1).await.unwrap_err();
    assert!(matches!(err, Error::Overloaded { .. }), "{err:?}");
    assert_eq!(busy.await.unwrap().unwrap(), Value::from(400));
    // Once the late reply has come, both slots are free again, on the same worker.
    assert!(eventually(SETTLE, || pool.state().idle == 1).await);
    let both = spawn_calls(&pool, 2, "io_wait", |_| Value::from(200));
    for call in both {
        assert_eq!(call.await.unwrap().unwrap(), Value::from(200));
    }
    assert_eq!(pool.worker_pids(), vec![pid], "drained, not killed");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_waiting_for_a_multiplexed_workers_slots_are_served_first_come_first_served() {
    let pool = ready(one_worker(2, &[]), 1).await;
    let began = Instant::now();
    let first = spawn_calls(&pool, 2, "io_wait", |_| Value::from(500));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Four callers queue up, in order, behind the two calls in flight.
    let mut waiters = Vec::new();
    for _ in 0..4 {
        let pool = pool.clone();
        waiters.push(tokio::spawn(async move {
            pool.call::<Value>("io_wait", &400).await.unwrap();
            began.elapsed()
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for call in first {
        call.await.unwrap().unwrap();
    }
    let mut done = Vec::new();
    for w in waiters {
        done.push(w.await.unwrap());
    }
    // The first two waiters take the two slots as they come back (~0.5 s, done ~0.9 s); the
    // last two get them only then (done ~1.3 s).
    assert!(
        done[0].max(done[1]) + Duration::from_millis(200) < done[2].min(done[3]),
        "served out of order: {done:?}"
    );
    pool.shutdown().await;
}
