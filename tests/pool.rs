//! The supervised pool with real Python workers: restart strategies and types, intensity,
//! backoff, deaths mid-call, deadlines, overflow, recycling, sessions, cancellation, shutdown.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use wharf::{
    Backoff, CallOptions, Error, HealthCheck, Pool, RestartType, SessionEnd, Strategy, Value,
};

const SETTLE: Duration = Duration::from_secs(15);

/// slot -> pid of the running workers.
fn pids_by_slot(pool: &Pool) -> HashMap<usize, u32> {
    pool.worker_info()
        .into_iter()
        .map(|w| (w.slot, w.pid))
        .collect()
}

async fn pid_of_some_worker(pool: &Pool) -> u32 {
    let v = pool.call::<Value>("pid", &()).await.expect("pid call");
    v.as_u64().expect("pid is an int") as u32
}

/// Crashes the worker in `slot` (exit `code`) through a lease on exactly that worker.
async fn crash_slot(pool: &Pool, slot: usize, code: i32) {
    let mut held = Vec::new();
    loop {
        let mut lease = pool.checkout().await.expect("checkout");
        let info = pool
            .worker_info()
            .into_iter()
            .find(|w| w.pid == lease.pid())
            .expect("leased worker is listed");
        if info.slot == slot {
            let err = lease.call::<Value>("crash", &code).await.unwrap_err();
            assert!(
                matches!(err, Error::WorkerDied { .. }),
                "crash gave {err:?}"
            );
            return;
        }
        held.push(lease);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_for_one_restarts_only_the_crashed_worker() {
    let pool = ready(builder(3).strategy(Strategy::OneForOne), 3).await;
    let before = pids_by_slot(&pool);
    crash_slot(&pool, 1, 3).await;
    assert!(eventually(SETTLE, || pids_by_slot(&pool).len() == 3).await);
    let after = pids_by_slot(&pool);
    assert_eq!(before[&0], after[&0]);
    assert_ne!(before[&1], after[&1]);
    assert_eq!(before[&2], after[&2]);
    assert_eq!(pool.stats().restarts, 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_for_all_restarts_every_worker() {
    let pool = ready(builder(3).strategy(Strategy::OneForAll), 3).await;
    let before = pids_by_slot(&pool);
    crash_slot(&pool, 1, 3).await;
    assert!(
        eventually(SETTLE, || {
            let now = pids_by_slot(&pool);
            now.len() == 3 && now.iter().all(|(slot, pid)| before[slot] != *pid)
        })
        .await,
        "every slot gets a new worker"
    );
    for pid in before.values() {
        assert!(
            eventually(SETTLE, || !pid_exists(*pid)).await,
            "old worker {pid} is gone"
        );
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_for_one_restarts_the_crashed_worker_and_later_slots() {
    let pool = ready(builder(4).strategy(Strategy::RestForOne), 4).await;
    let before = pids_by_slot(&pool);
    crash_slot(&pool, 1, 3).await;
    assert!(
        eventually(SETTLE, || {
            let now = pids_by_slot(&pool);
            now.len() == 4 && (1..4).all(|s| now[&s] != before[&s])
        })
        .await
    );
    assert_eq!(pids_by_slot(&pool)[&0], before[&0], "slot 0 is left alone");
    pool.shutdown().await;
}

/// Crashes slot 0 with `code` and reports whether the slot came back.
async fn restarted_after_exit(restart: RestartType, code: i32) -> bool {
    let pool = ready(builder(2).restart_type(restart), 2).await;
    let before = pids_by_slot(&pool);
    crash_slot(&pool, 0, code).await;
    // Give a restart every chance to happen.
    let back = eventually(Duration::from_secs(5), || {
        pids_by_slot(&pool)
            .get(&0)
            .is_some_and(|pid| *pid != before[&0])
    })
    .await;
    assert_eq!(
        pids_by_slot(&pool)[&1],
        before[&1],
        "the other worker is untouched"
    );
    pool.shutdown().await;
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_workers_always_restart() {
    assert!(restarted_after_exit(RestartType::Permanent, 0).await);
    assert!(restarted_after_exit(RestartType::Permanent, 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_workers_restart_only_after_abnormal_exit() {
    assert!(!restarted_after_exit(RestartType::Transient, 0).await);
    assert!(restarted_after_exit(RestartType::Transient, 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_workers_never_restart() {
    assert!(!restarted_after_exit(RestartType::Temporary, 0).await);
    assert!(!restarted_after_exit(RestartType::Temporary, 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_start_escalates_to_pool_failed_within_the_window_without_spinning() {
    init_logs();
    let builder = Pool::builder(python_spec(
        "import sys; sys.stderr.write('boom at start\\n'); sys.exit(3)",
    ))
    .size(2)
    .intensity(3, Duration::from_secs(5))
    .backoff(Backoff {
        initial: Duration::from_millis(50),
        jitter: 0.0,
        ..Backoff::default()
    })
    .checkout_timeout(Duration::from_secs(20));
    let pool = builder.build().await.unwrap();
    let mut events = pool.events();
    let started = Instant::now();
    let err = pool.call::<Value>("echo", &1).await.unwrap_err();
    let took = started.elapsed();
    // Subscribers are told once, with the reason the callers get.
    let mut failed = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let wharf::PoolEvent::PoolFailed { reason, .. } = event {
            failed.push(reason);
        }
    }
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(err.to_string().contains(&failed[0]), "{err} / {failed:?}");
    match &err {
        Error::PoolFailed { last_errors, .. } => {
            assert!(!last_errors.is_empty());
            let text = err.to_string();
            assert!(text.contains("exited before it was ready"), "{text}");
            assert!(text.contains("boom at start"), "{text}");
        }
        other => panic!("expected PoolFailed, got {other:?}"),
    }
    assert!(
        took < Duration::from_secs(5),
        "escalation within the window, took {took:?}"
    );
    // Nothing spins after the failure: no further launches, and new callers fail at once. A
    // launch already under way when the pool failed (the other slot's) may still end, and
    // count, just after: let it, then nothing more may come.
    assert!(
        pool.stats().start_failures >= 4,
        "4 failed starts exceed 3 restarts, saw {}",
        pool.stats().start_failures
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failures = pool.stats().start_failures;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(pool.stats().start_failures, failures);
    let t = Instant::now();
    assert!(matches!(
        pool.call::<Value>("echo", &1).await,
        Err(Error::PoolFailed { .. })
    ));
    assert!(t.elapsed() < Duration::from_millis(100));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_delays_grow_between_restarts_of_a_slot() {
    init_logs();
    let dir = std::env::temp_dir().join(format!("wharf-backoff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("starts");
    let code = format!(
        "import time,sys; open({:?},'a').write(repr(time.monotonic())+'\\n'); sys.exit(3)",
        log.display().to_string()
    );
    let pool = Pool::builder(python_spec(&code))
        .size(1)
        .intensity(6, Duration::from_secs(30))
        .max_start_failures(100)
        .backoff(Backoff {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            jitter: 0.0,
            max: Duration::from_secs(5),
            reset_after: Duration::from_secs(10),
        })
        .build()
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(30), || pool.stats().failed).await);
    let starts: Vec<f64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(starts.len(), 7, "1 start + 6 restarts, then escalation");
    let gaps: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    // The first restart is immediate; from the second on, each waits its backoff (100, 200,
    // 400, 800, 1600 ms without jitter) on top of the interpreter's start-up time. Start-up
    // time only grows a gap, so each gap is at least its backoff whatever the machine's load;
    // the last one (1.6 s) cannot be reached without exponential growth.
    let backoffs = [0.0, 0.1, 0.2, 0.4, 0.8, 1.6];
    for (gap, backoff) in gaps.iter().zip(backoffs) {
        assert!(
            *gap >= backoff * 0.98,
            "a gap shorter than its backoff {backoff} s: {gaps:?}"
        );
    }
    pool.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_call_fails_that_call_only_and_pool_refills() {
    let pool = ready(builder(3), 3).await;
    let mut victim = pool.checkout().await.unwrap();
    let victim_pid = victim.pid();
    let others: Vec<_> = (0..2)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.call::<Value>("sleep", &300).await })
        })
        .collect();
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sigkill(victim_pid);
    });
    let err = victim.call::<Value>("sleep", &2000).await.unwrap_err();
    assert!(matches!(err, Error::WorkerDied { .. }), "{err:?}");
    assert!(err.to_string().contains("signal: 9"), "{err}");
    killer.await.unwrap();
    for o in others {
        assert_eq!(o.await.unwrap().unwrap(), Value::from(300));
    }
    drop(victim);
    assert!(eventually(SETTLE, || pool.state().idle == 3).await);
    assert!(!pool.worker_pids().contains(&victim_pid));
    assert_eq!(
        pool.call::<Value>("echo", &"still serving").await.unwrap(),
        Value::from("still serving")
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_overrun_kills_and_replaces_the_worker() {
    let pool = ready(builder(1), 1).await;
    let mut lease = pool.checkout().await.unwrap();
    let pid = lease.pid();
    let started = Instant::now();
    let err = lease
        .call_value(
            "sleep",
            Value::from(10_000),
            CallOptions::new().deadline(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(lease);
    assert!(
        eventually(SETTLE, || !pid_exists(pid)).await,
        "the overrunning worker is killed"
    );
    let new_pid = pid_of_some_worker(&pool).await;
    assert_ne!(new_pid, pid);
    let stats = pool.stats();
    assert_eq!(
        stats.restarts, 0,
        "a deadline kill is a replacement, not a restart"
    );
    assert_eq!(stats.errors.get("deadline_exceeded"), Some(&1));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_workers_start_under_load_and_stop_when_idle() {
    let pool = ready(
        builder(1)
            .max_overflow(2)
            .overflow_idle_timeout(Duration::from_millis(500)),
        1,
    )
    .await;
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.call::<Value>("sleep", &1500).await })
        })
        .collect();
    assert!(
        eventually(SETTLE, || pool.worker_info().len() == 3).await,
        "overflow workers start while callers wait"
    );
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert!(
        eventually(SETTLE, || pool.worker_info().len() == 1).await,
        "overflow workers stop after their idle timeout: {:?}",
        pool.worker_info()
    );
    assert_eq!(pool.worker_info()[0].slot, 0, "the core worker stays");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_recycled_after_max_calls() {
    // Make before break: a worker at its limit serves on until its successor is ready, so
    // each round lets the old worker go before calling again; then every worker serves
    // exactly its 3 calls (no jitter).
    let pool = ready(builder(1).max_calls(3).recycle_jitter(0.0), 1).await;
    let mut seen: Vec<u32> = Vec::new();
    for _ in 0..3 {
        let mut round = Vec::new();
        for _ in 0..3 {
            round.push(pid_of_some_worker(&pool).await);
        }
        assert!(round.iter().all(|p| *p == round[0]), "{seen:?} {round:?}");
        seen.push(round[0]);
        assert!(
            eventually(SETTLE, || !pid_exists(round[0])).await,
            "the worker that served 3 calls was recycled"
        );
    }
    let distinct: HashSet<_> = seen.iter().collect();
    assert_eq!(distinct.len(), 3, "a new worker every 3 calls: {seen:?}");
    assert!(eventually(SETTLE, || pool.stats().replacements == 3).await);
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_recycled_when_their_rss_exceeds_max_rss() {
    // Memory is sampled off the calls' path, every sample interval: an idle worker over the
    // limit is retired at the next sample.
    let period = Duration::from_millis(50);
    let pool = ready(
        builder(1)
            .max_rss(150 * 1024 * 1024)
            .sample_interval(period),
        1,
    )
    .await;
    let first = pid_of_some_worker(&pool).await;
    tokio::time::sleep(period * 4).await;
    assert_eq!(
        pid_of_some_worker(&pool).await,
        first,
        "a small worker stays"
    );
    pool.call::<Value>("alloc", &200).await.unwrap();
    assert!(
        eventually(SETTLE, || !pid_exists(first)).await,
        "the worker holding 200 MiB was recycled"
    );
    let next = pid_of_some_worker(&pool).await;
    assert_ne!(next, first);
    let stats = pool.stats();
    assert_eq!((stats.replacements, stats.restarts), (1, 0), "{stats:?}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_over_max_rss_is_recycled_when_it_comes_back() {
    let period = Duration::from_millis(50);
    let pool = ready(
        builder(1)
            .max_rss(150 * 1024 * 1024)
            .sample_interval(period),
        1,
    )
    .await;
    let mut lease = pool.checkout().await.unwrap();
    let first = lease.pid();
    lease.call::<()>("alloc", &200).await.unwrap();
    // Held across several samples: nobody takes it from its caller.
    tokio::time::sleep(period * 6).await;
    assert!(lease.is_alive());
    assert_eq!(lease.call::<u8>("echo", &1).await.unwrap(), 1);
    drop(lease);
    assert!(eventually(SETTLE, || !pid_exists(first)).await);
    assert_ne!(pid_of_some_worker(&pool).await, first);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_tell_hooks_what_happened() {
    use wharf::{ExitKind, PoolEvent};
    let pool = builder(1).build().await.unwrap();
    let mut events = pool.events();
    pool.wait_ready(1, SETTLE).await.unwrap();
    let session = pool.session("s").await.unwrap();
    let pid = session.pid().await.unwrap();
    let err = session.call::<Value>("crash", &9).await.unwrap_err();
    assert!(matches!(err, Error::SessionLost { .. }), "{err:?}");
    pool.wait_ready(1, SETTLE).await.unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline {
        let event = tokio::time::timeout(SETTLE, events.recv())
            .await
            .expect("an event in time")
            .expect("no event lost");
        let ready_again = matches!(&event, PoolEvent::WorkerReady { pid: p, .. } if *p != pid);
        seen.push(event);
        if ready_again {
            break;
        }
    }
    let first_ready = seen
        .iter()
        .position(|e| matches!(e, PoolEvent::WorkerReady { pid: p, .. } if *p == pid));
    let crashed = seen.iter().position(|e| {
        matches!(
            e,
            PoolEvent::WorkerExited {
                cause: ExitKind::Crashed(_),
                ..
            }
        )
    });
    let lost = seen
        .iter()
        .position(|e| matches!(e, PoolEvent::SessionLost { session, .. } if session == "s"));
    let restarting = seen
        .iter()
        .position(|e| matches!(e, PoolEvent::Restarting { slot: 0, .. }));
    let starting = seen
        .iter()
        .rposition(|e| matches!(e, PoolEvent::WorkerStarting { slot: 0, .. }));
    let (Some(ready), Some(crashed), Some(lost), Some(restarting), Some(starting)) =
        (first_ready, crashed, lost, restarting, starting)
    else {
        panic!("missing events: {seen:#?}");
    };
    assert!(
        ready < crashed && crashed < restarting && restarting < starting,
        "{seen:#?}"
    );
    assert!(ready < lost, "{seen:#?}");
    match seen.last() {
        Some(PoolEvent::WorkerReady { pool: name, .. }) => assert_eq!(name, pool.name()),
        other => panic!("{other:?}"),
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_pin_strictly_and_never_leak_state() {
    let pool = ready(builder(2).checkout_timeout(Duration::from_millis(300)), 2).await;
    let a = pool.session("a").await.unwrap();
    let b = pool.session("b").await.unwrap();
    let (pa, pb) = (a.pid().await.unwrap(), b.pid().await.unwrap());
    assert_ne!(pa, pb, "each session has its own worker");
    a.call::<Value>(
        "state_set",
        &serde_json::json!({"key": "k", "value": "from-a"}),
    )
    .await
    .unwrap();
    assert_eq!(
        b.call::<Value>("state_get", &serde_json::json!({"key": "k"}))
            .await
            .unwrap(),
        Value::Nil
    );
    for _ in 0..5 {
        assert_eq!(
            a.call::<Value>("pid", &()).await.unwrap(),
            Value::from(pa),
            "strict pin"
        );
    }
    // Both workers are pinned: nobody else gets one.
    assert!(matches!(
        pool.call::<Value>("echo", &1).await,
        Err(Error::CheckoutTimeout { .. })
    ));
    assert!(matches!(
        pool.session("a").await,
        Err(Error::SessionInUse(_))
    ));
    // End a: its worker is reset, then reused by a new session that must not see a's state.
    a.end().await.unwrap();
    assert!(matches!(
        a.call::<Value>("pid", &()).await,
        Err(Error::SessionEnded { .. })
    ));
    let c = pool.session("c").await.unwrap();
    assert_eq!(
        c.pid().await.unwrap(),
        pa,
        "the only free worker is a's old one"
    );
    assert_eq!(
        c.call::<Value>("state_get", &serde_json::json!({"key": "k"}))
            .await
            .unwrap(),
        Value::Nil
    );
    c.end().await.unwrap();
    b.end().await.unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycle_session_end_policy_replaces_the_worker() {
    let pool = ready(builder(1).session_end(SessionEnd::Recycle), 1).await;
    let s = pool.session("s").await.unwrap();
    let pid = s.pid().await.unwrap();
    s.end().await.unwrap();
    assert_ne!(pid_of_some_worker(&pool).await, pid);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_worker_dies_is_lost_not_moved() {
    let pool = ready(builder(2), 2).await;
    let s = pool.session("s").await.unwrap();
    s.call::<Value>("state_set", &serde_json::json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    sigkill(s.pid().await.unwrap());
    for _ in 0..2 {
        let err = s
            .call::<Value>("state_get", &serde_json::json!({"key": "k"}))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::SessionLost { .. }), "{err:?}");
    }
    // The id is free again for a fresh session on a fresh worker.
    assert!(eventually(SETTLE, || pool.state().idle == 2).await);
    let again = pool.session("s").await.unwrap();
    // The lost session's last handle going away must not free the id the new one holds.
    drop(s);
    assert!(matches!(
        pool.session("s").await,
        Err(Error::SessionInUse(_))
    ));
    assert_eq!(
        again
            .call::<Value>("state_get", &serde_json::json!({"key": "k"}))
            .await
            .unwrap(),
        Value::Nil
    );
    again.end().await.unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_expire_and_reset_their_worker() {
    let pool = ready(
        builder(1).session_idle_timeout(Duration::from_millis(200)),
        1,
    )
    .await;
    let s = pool.session("s").await.unwrap();
    s.call::<Value>("state_set", &serde_json::json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let err = s.call::<Value>("pid", &()).await.unwrap_err();
    assert!(
        matches!(err, Error::SessionEnded { why: "expired", .. }),
        "{err:?}"
    );
    assert_eq!(
        pool.call::<Value>("state_get", &serde_json::json!({"key": "k"}))
            .await
            .unwrap(),
        Value::Nil
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_caller_never_leaves_a_dirty_worker() {
    let pool = ready(builder(1), 1).await;
    let pid = pid_of_some_worker(&pool).await;
    for round in 0..3 {
        let p = pool.clone();
        let task = tokio::spawn(async move { p.call::<Value>("sleep", &300).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        task.abort();
        let _ = task.await;
        // The next caller must get its own reply, not the abandoned call's.
        let tag = format!("round-{round}");
        assert_eq!(
            pool.call::<Value>("echo", &tag).await.unwrap(),
            Value::from(tag.as_str())
        );
    }
    assert_eq!(
        pid_of_some_worker(&pool).await,
        pid,
        "the worker was drained, not killed"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_no_child_process() {
    let pool = ready(
        builder(3).health_check(HealthCheck {
            interval: Some(Duration::from_millis(100)),
            ..HealthCheck::default()
        }),
        3,
    )
    .await;
    let grandchild = pool
        .call::<Value>("spawn_grandchild", &())
        .await
        .unwrap()
        .as_u64()
        .unwrap() as u32;
    let pids = pool.worker_pids();
    assert_eq!(pids.len(), 3);
    let busy = {
        let p = pool.clone();
        tokio::spawn(async move { p.call::<Value>("sleep", &200).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    pool.shutdown().await;
    assert_eq!(
        busy.await.unwrap().unwrap(),
        Value::from(200),
        "in-flight call drained"
    );
    for pid in pids.iter().chain([&grandchild]) {
        assert!(
            eventually(Duration::from_secs(5), || !pid_exists(*pid)).await,
            "{pid} survived"
        );
    }
    assert!(matches!(
        pool.call::<Value>("echo", &1).await,
        Err(Error::ShutDown(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_command_fails_the_pool_with_a_clear_error() {
    init_logs();
    let pool = Pool::builder(wharf::ProcessSpec::new("wharf-no-such-command"))
        .size(1)
        .intensity(2, Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let err = pool.call::<Value>("echo", &1).await.unwrap_err();
    assert!(matches!(err, Error::PoolFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("cannot spawn worker"), "{err}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_pools_start_workers_on_demand() {
    let pool = builder(2).lazy().build().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool.worker_info().len(), 0, "nothing starts before demand");
    assert_eq!(
        pool.call::<Value>("echo", &5).await.unwrap(),
        Value::from(5)
    );
    assert!(!pool.worker_info().is_empty());
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_calls_deliver_chunks_then_the_result() {
    let pool = ready(builder(1), 1).await;
    let mut lease = pool.checkout().await.unwrap();
    let mut stream = lease
        .call_stream("stream", &serde_json::json!({"n": 4}))
        .await
        .unwrap();
    let mut chunks = Vec::new();
    let mut done = None;
    while let Some(item) = stream.next().await {
        match item.unwrap() {
            wharf::StreamItem::Chunk(v) => chunks.push(v),
            wharf::StreamItem::Done(v) => done = Some(v),
        }
    }
    assert_eq!(chunks, (0..4).map(Value::from).collect::<Vec<_>>());
    assert_eq!(done, Some(Value::from(4)));
    drop(lease);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_typed_on_pools_leases_and_sessions() {
    #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
    struct Point {
        x: i64,
        label: String,
    }
    let pool = ready(builder(2), 2).await;
    let p = Point {
        x: -3,
        label: "a".into(),
    };
    // A struct goes in and comes back out, through the pool, a lease and a session.
    let back: Point = pool.call("echo", &p).await.unwrap();
    assert_eq!(back, p);
    // It goes as a map keyed by field name, as a Python handler reads it (body["key"]).
    #[derive(serde::Serialize)]
    struct Set<'a> {
        key: &'a str,
        value: i32,
    }
    let raw: Value = pool.call("echo", &p).await.unwrap();
    assert_eq!(raw["label"], Value::from("a"), "{raw}");
    let mut lease = pool.checkout().await.unwrap();
    let n: u64 = lease.call("echo", &7).await.unwrap();
    assert_eq!(n, 7);
    drop(lease);
    let session = pool.session("typed").await.unwrap();
    session
        .call::<()>(
            "state_set",
            &serde_json::json!({"key": "k", "value": [1, 2]}),
        )
        .await
        .unwrap();
    session
        .call::<()>("state_set", &Set { key: "s", value: 7 })
        .await
        .unwrap();
    let s: i32 = session
        .call("state_get", &serde_json::json!({"key": "s"}))
        .await
        .unwrap();
    assert_eq!(s, 7);
    let v: Vec<u8> = session
        .call("state_get", &serde_json::json!({"key": "k"}))
        .await
        .unwrap();
    assert_eq!(v, vec![1, 2]);
    // Asking for nothing discards whatever the method returns.
    session.call::<()>("echo", &p).await.unwrap();
    // A reply that does not fit is a typed error that names the method; nothing is lost: the
    // session and the pool keep serving.
    let err = session.call::<String>("echo", &5).await.unwrap_err();
    assert!(
        matches!(&err, Error::Reply { method, .. } if method == "echo"),
        "{err:?}"
    );
    assert_eq!(session.call::<u8>("echo", &5).await.unwrap(), 5);
    session.end().await.unwrap();
    let err = pool.call::<Point>("echo", &"text").await.unwrap_err();
    assert_eq!(err.kind(), "reply", "{err}");
    // The raw value is there for whoever wants it.
    let raw = pool
        .call_value("echo", Value::from("raw"), CallOptions::new())
        .await
        .unwrap();
    assert_eq!(raw, Value::from("raw"));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_deadlines_hold_on_pools_leases_and_sessions() {
    let pool = ready(builder(2).call_timeout(Duration::from_secs(60)), 2).await;
    let short = CallOptions::new().deadline(Duration::from_millis(300));
    let started = Instant::now();
    let err = pool
        .call_with::<Value>("sleep", &10_000, short)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::DeadlineExceeded { deadline, .. } if deadline == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut lease = pool.checkout().await.unwrap();
    let err = lease
        .call_with::<Value>("sleep", &10_000, short)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "deadline_exceeded", "{err}");
    drop(lease);
    let session = pool.session("deadline").await.unwrap();
    let err = session
        .call_with::<Value>("sleep", &10_000, short)
        .await
        .unwrap_err();
    // The worker was killed for overrunning: the session's state went with it.
    assert!(matches!(err, Error::SessionLost { .. }), "{err:?}");
    // A deadline long enough lets the call finish.
    let ok: u64 = pool
        .call_with(
            "sleep",
            &50,
            CallOptions::new().deadline(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    assert_eq!(ok, 50);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_from_a_pool_and_a_session_are_futures_streams() {
    use futures::StreamExt;
    let pool = ready(builder(1), 1).await;
    // From the pool: the stream holds its worker until it ends.
    let stream = pool
        .call_stream("stream", &serde_json::json!({"n": 3}))
        .await
        .unwrap();
    assert_eq!(pool.state().busy, 1);
    let items: Vec<_> = stream.map(|item| item.unwrap()).collect().await;
    assert_eq!(
        items,
        vec![
            wharf::StreamItem::Chunk(Value::from(0)),
            wharf::StreamItem::Chunk(Value::from(1)),
            wharf::StreamItem::Chunk(Value::from(2)),
            wharf::StreamItem::Done(Value::from(3)),
        ]
    );
    // Read to its end, a stream gives its worker back at once, while it is still alive.
    let mut stream = pool
        .call_stream("stream", &serde_json::json!({"n": 2}))
        .await
        .unwrap();
    while stream.next().await.is_some() {}
    assert_eq!(
        pool.state().idle,
        1,
        "the worker waits for the stream's drop"
    );
    assert_eq!(pool.try_call::<u64>("echo", &8).await.unwrap(), 8);
    drop(stream);
    // Dropped halfway, the worker is cancelled and comes back, clean, for the next caller.
    let mut stream = pool
        .call_stream("stream", &serde_json::json!({"n": 100_000}))
        .await
        .unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Ok(wharf::StreamItem::Chunk(_)))
    ));
    drop(stream);
    assert_eq!(pool.call::<u64>("echo", &9).await.unwrap(), 9);
    // From a session: its state is there, and the session's other calls wait for the stream.
    let session = pool.session("streaming").await.unwrap();
    session
        .call::<()>("state_set", &serde_json::json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    let mut stream = session
        .call_stream("stream", &serde_json::json!({"n": 2}))
        .await
        .unwrap();
    let other = session.clone();
    let waiting = tokio::spawn(async move {
        other
            .call::<u64>("state_get", &serde_json::json!({"key": "k"}))
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "a session call overtook its stream");
    let mut n = 0;
    while let Some(item) = stream.next().await {
        item.unwrap();
        n += 1;
    }
    assert_eq!(n, 3);
    // Its end frees the session for the call that waited, with the stream still alive.
    assert_eq!(waiting.await.unwrap().unwrap(), 1);
    drop(stream);
    session.end().await.unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_yields_results_in_input_order_with_bounded_calls_in_flight() {
    use futures::StreamExt;
    let pool = ready(builder(4), 4).await;
    // Replies come back out of order (the long sleeps finish last); results do not.
    let items: Vec<u64> = (0..24).map(|i| [60, 0, 30, 5][i % 4]).collect();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watcher = {
        let (pool, peak) = (pool.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(pool.state().busy, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let got: Vec<u64> = pool
        .map_with::<_, u64>("sleep", items.clone(), 2, CallOptions::new())
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(got, items);
    let seen = peak.load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=2).contains(&seen), "{seen} calls in flight, bound 2");
    // By default as many in flight as workers; a failed item keeps its place.
    peak.store(0, std::sync::atomic::Ordering::Relaxed);
    let bodies = vec![
        serde_json::json!(1),
        serde_json::json!("not a number"),
        serde_json::json!(3),
    ];
    let got: Vec<Result<u64, Error>> = pool
        .map(
            "sleep",
            bodies.into_iter().cycle().take(30).collect::<Vec<_>>(),
        )
        .collect()
        .await;
    assert_eq!(got.len(), 30);
    for (i, r) in got.iter().enumerate() {
        match i % 3 {
            1 => assert!(matches!(r, Err(Error::Remote { .. })), "{i}: {r:?}"),
            _ => assert_eq!(r.as_ref().ok(), Some(&(i as u64 % 3 + 1)), "{i}"),
        }
    }
    assert!(peak.load(std::sync::atomic::Ordering::Relaxed) <= 4);
    watcher.abort();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_timeout_reports_the_pool_state() {
    let pool = ready(builder(1).checkout_timeout(Duration::from_millis(200)), 1).await;
    let _held = pool.checkout().await.unwrap();
    let err = pool.call::<Value>("echo", &1).await.unwrap_err();
    match &err {
        Error::CheckoutTimeout { state, .. } => {
            assert_eq!(
                (state.size, state.busy, state.idle, state.waiting),
                (1, 1, 0, 1)
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("busy 1"), "{err}");
    drop(_held);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_that_stops_answering_pings_is_replaced() {
    let pool = ready(
        builder(2).health_check(HealthCheck {
            interval: Some(Duration::from_millis(100)),
            timeout: Duration::from_millis(200),
            max_missed: 2,
        }),
        2,
    )
    .await;
    let before = pids_by_slot(&pool);
    let stopped = before[&0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(stopped as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    assert!(
        eventually(SETTLE, || {
            let now = pids_by_slot(&pool);
            now.len() == 2 && now[&0] != stopped
        })
        .await,
        "the hung worker is declared dead and replaced"
    );
    assert!(
        eventually(SETTLE, || !pid_exists(stopped)).await,
        "and killed"
    );
    assert_eq!(pids_by_slot(&pool)[&1], before[&1]);
    assert_eq!(
        pool.stats().restarts,
        1,
        "an unresponsive worker counts as a crash"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_never_starts_fails_the_pool_after_max_start_failures() {
    init_logs();
    // A generous intensity (as a chaos-tolerant pool would have) must not delay the verdict
    // on a worker that cannot start at all.
    let pool = Pool::builder(python_spec("import sys; sys.exit(5)"))
        .size(2)
        .intensity(1000, Duration::from_secs(5))
        .max_start_failures(4)
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let err = pool.call::<Value>("echo", &1).await.unwrap_err();
    assert!(matches!(err, Error::PoolFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("exit status: 5"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let failures = pool.stats().start_failures;
    assert!(
        (4..=8).contains(&failures),
        "{failures} failed starts for 2 slots"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_are_retired_after_max_lifetime() {
    let pool = ready(
        builder(1)
            .max_lifetime(Duration::from_millis(400))
            .health_check(HealthCheck {
                interval: Some(Duration::from_millis(100)),
                ..HealthCheck::default()
            }),
        1,
    )
    .await;
    let first = pool.worker_pids()[0];
    // Nobody calls: the idle worker is retired on age alone, and replaced.
    assert!(
        eventually(SETTLE, || pool
            .worker_pids()
            .first()
            .is_some_and(|p| *p != first))
        .await,
        "the idle worker was replaced after its lifetime"
    );
    assert!(eventually(SETTLE, || !pid_exists(first)).await);
    assert_eq!(pool.stats().restarts, 0, "retirement is not a restart");
    pool.shutdown().await;
}

/// Backpressure: with `max_waiting`, callers beyond the bound fail at once with `Overloaded`
/// (carrying the pool's state) while the waiting ones are served; `try_call` never waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_waiting_sheds_load_and_try_call_never_waits() {
    let pool = ready(builder(1).max_waiting(2), 1).await;
    let busy = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call::<Value>("sleep", &600).await })
    };
    assert!(eventually(SETTLE, || pool.state().busy == 1).await);
    let t = Instant::now();
    match pool.try_call::<Value>("echo", &0).await {
        Err(Error::Overloaded { state, .. }) => assert_eq!(state.busy, 1),
        other => panic!("try_call on a busy pool: {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(1), "try_call waited");
    let waiters: Vec<_> = (1..=2)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.call::<Value>("echo", &i).await })
        })
        .collect();
    assert!(eventually(SETTLE, || pool.state().waiting == 2).await);
    let t = Instant::now();
    match pool.call::<Value>("echo", &3).await {
        Err(Error::Overloaded { state, .. }) => assert_eq!(state.waiting, 2),
        other => panic!("a third waiter over max_waiting 2: {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the shed caller waited"
    );
    busy.await.unwrap().unwrap();
    for (i, w) in waiters.into_iter().enumerate() {
        assert_eq!(w.await.unwrap().unwrap(), Value::from(i as u64 + 1));
    }
    assert_eq!(
        pool.try_call::<Value>("echo", &4).await.unwrap(),
        Value::from(4)
    );
    assert_eq!(pool.stats().errors.get("overloaded"), Some(&2));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deadline_holds_for_a_slow_consumer_and_an_idle_one() {
    use wharf::StreamItem;
    let pool = ready(builder(2), 2).await;
    let short = CallOptions::new().deadline(Duration::from_millis(200));
    // A consumer slower than its worker always finds a chunk waiting: the deadline still ends
    // the stream.
    let mut stream = pool
        .call_stream_with("stream", &serde_json::json!({"n": 100_000}), short)
        .await
        .unwrap();
    let started = Instant::now();
    let ended = loop {
        match stream.next().await {
            Some(Ok(StreamItem::Chunk(_))) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
                assert!(
                    started.elapsed() < SETTLE,
                    "the deadline never ended the stream"
                );
            }
            other => break other,
        }
    };
    assert!(
        matches!(ended, Some(Err(Error::DeadlineExceeded { .. }))),
        "{ended:?}"
    );
    // A stream nobody polls still has its worker killed at the deadline.
    let stream = pool
        .call_stream_with("stream", &serde_json::json!({"n": 100_000}), short)
        .await
        .unwrap();
    let victim = stream.worker_id().to_owned();
    assert!(
        eventually(SETTLE, || !pool
            .workers()
            .iter()
            .any(|(id, _)| *id == victim))
        .await,
        "the unpolled stream's worker outlived its deadline"
    );
    drop(stream);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_call_after_a_dropped_stream_waits_for_it_to_end() {
    use wharf::StreamItem;
    let pool = ready(builder(1), 1).await;
    let session = pool.session("s").await.unwrap();
    {
        let mut stream = session
            .call_stream("stream", &serde_json::json!({"n": 3_000_000}))
            .await
            .unwrap();
        assert!(matches!(
            stream.next().await,
            Some(Ok(StreamItem::Chunk(_)))
        ));
    }
    // The abandoned stream is cancelled and ends before the next call starts its clock.
    let reply = session
        .call_with::<String>(
            "echo",
            "hi",
            CallOptions::new().deadline(Duration::from_millis(500)),
        )
        .await;
    assert_eq!(reply.unwrap(), "hi");
    session.end().await.unwrap();
    pool.shutdown().await;
}
