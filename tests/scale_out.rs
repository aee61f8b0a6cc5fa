//! One pool across a fleet of Docker engines: real daemons in network namespaces, reached over
//! TCP with TLS through a veth bridge (the fixture: `tests/common/fleet.rs`), really killed and
//! really cut off. Where namespaces or extra daemons cannot be made (not root, tools missing)
//! the tests say so loudly and skip; under `CI=true` that is a failure.
//!
//! No assertion here is about time: each scenario waits (up to a generous limit) for the state
//! it expects and then asserts counts. How fast things happen is the benchmark's business.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bollard::query_parameters::KillContainerOptions;
use common::fleet::Fleet;
use common::*;
use wharf::{
    CallOptions, Engine, Error, Health, HealthCheck, HealthOptions, Pool, PoolBuilder, PortError,
    RestartType, Transport, Value,
};

/// Long enough for anything the fleet does; a scenario that takes this long has failed.
const LIMIT: Duration = Duration::from_secs(60);

/// A fleet, and a pool `name` of four demo workers over attach on its two hosts, ready, two on
/// each, that fails if more than `max_restarts` restarts count against it within a minute;
/// `None` if the test must skip (after a loud notice).
async fn start(test: &str, name: &str, max_restarts: u32) -> Option<(Fleet, Pool)> {
    start_with(test, name, max_restarts, |b| b).await
}

/// [`start`], with the pool's builder changed by `more`.
async fn start_with(
    test: &str,
    name: &str,
    max_restarts: u32,
    more: impl FnOnce(PoolBuilder) -> PoolBuilder,
) -> Option<(Fleet, Pool)> {
    let (_, spec) = demo_container(test, Transport::Attach).await?;
    let fleet = Fleet::start(test).await?;
    let pool = more(Pool::builder(spec))
        .name(name)
        .size(4)
        .intensity(max_restarts, Duration::from_secs(60))
        // Health pings every 200 ms: a worker cut off from them ends by itself after
        // (0.2 s + 1 s) × 3 (its watchdog).
        .health_check(HealthCheck {
            interval: Some(Duration::from_millis(200)),
            timeout: Duration::from_secs(1),
            max_missed: 2,
        })
        .engine(fleet.engine(0).await)
        .engine(fleet.engine(1).await)
        .engine_health(HealthOptions {
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(1),
            down_after: 2,
            max_backoff: Duration::from_secs(2),
        })
        .build()
        .await
        .unwrap();
    pool.wait_ready(4, LIMIT).await.unwrap();
    assert_eq!(pool.workers_by_engine(), counts(&[("h2", 2), ("h3", 2)]));
    Some((fleet, pool))
}

/// The running containers of pool `pool` on `engine`, by id.
async fn running(engine: &Engine, pool: &str) -> Vec<String> {
    containers(engine, pool, false).await
}

async fn containers(engine: &Engine, pool: &str, all: bool) -> Vec<String> {
    let listed = pool_containers(engine, pool, all).await;
    listed.into_iter().filter_map(|c| c.id).collect()
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Waits until the pool has `want` ready workers per engine; the last counts seen otherwise.
async fn settle(pool: &Pool, want: &BTreeMap<String, usize>) -> BTreeMap<String, usize> {
    let ready = want.values().sum::<usize>();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let seen = pool.workers_by_engine();
        if (&seen == want && pool.state().idle + pool.state().busy >= ready)
            || tokio::time::Instant::now() > deadline
        {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILLs container `id` on `engine`, behind the pool's back.
async fn sigkill_container(engine: &Engine, id: &str) {
    let options = KillContainerOptions {
        signal: "SIGKILL".into(),
    };
    engine
        .docker()
        .kill_container(id, Some(options))
        .await
        .unwrap();
}

/// The pool has not failed and answers a call.
async fn still_serves(pool: &Pool) {
    assert!(pool.failure().is_none(), "{:?}", pool.failure());
    assert_eq!(
        pool.call::<Value>("echo", &1).await.unwrap(),
        Value::from(1)
    );
}

/// Waits until engine `name` of the pool has health `down` (down or not).
async fn engine_down(pool: &Pool, name: &str, down: bool) -> bool {
    let is_down = || {
        pool.engines()
            .iter()
            .any(|(n, h)| n == name && matches!(h, Health::Down { .. }) == down)
    };
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !is_down() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    is_down()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_spreads_over_two_engines_and_replaces_a_killed_container_on_its_host() {
    let test = "a_pool_spreads_over_two_engines";
    let name = "scale-spread";
    let Some((fleet, pool)) = start(test, name, 1).await else {
        return;
    };
    let (h2, h3) = (fleet.engine(0).await, fleet.engine(1).await);
    assert_eq!(running(&h2, name).await.len(), 2);
    assert_eq!(running(&h3, name).await.len(), 2);
    // Nothing of this pool on the local engine: the image was shipped, not the workers.
    let local = docker_engine(test).await.unwrap();
    assert_eq!(containers(&local, name, true).await.len(), 0);
    // Every worker serves.
    for i in 0..8 {
        let reply: Value = pool.call("echo", &i).await.unwrap();
        assert_eq!(reply, Value::from(i));
    }

    // A container killed on h3 is replaced on h3.
    let before = running(&h3, name).await;
    sigkill_container(&h3, &before[0]).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut now = running(&h3, name).await;
    while (now.len() != 2 || now.contains(&before[0])) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = running(&h3, name).await;
    }
    assert_eq!(now.len(), 2, "h3 runs two workers again");
    assert!(
        !now.contains(&before[0]),
        "the killed container was replaced"
    );
    assert_eq!(
        settle(&pool, &counts(&[("h2", 2), ("h3", 2)])).await,
        counts(&[("h2", 2), ("h3", 2)])
    );
    assert_eq!(running(&h2, name).await.len(), 2);
    assert_eq!(pool.stats().restarts, 1);
    pool.shutdown().await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while (containers(&h2, name, true).await.len() + containers(&h3, name, true).await.len()) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(containers(&h2, name, true).await.len(), 0);
    assert_eq!(containers(&h3, name, true).await.len(), 0);
}

/// Calls `sleep` over and over from `callers` tasks until `stop`; each call has a deadline and
/// an outer limit, so a hung call is seen. Returns every call's outcome.
fn load(
    pool: &Pool,
    callers: usize,
    sleep_ms: u64,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<Vec<Result<(), Error>>>> {
    (0..callers)
        .map(|_| {
            let (pool, stop) = (pool.clone(), stop.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !*stop.borrow() {
                    let options = CallOptions::new().deadline(Duration::from_secs(3));
                    let call = pool.call_with::<Value>("sleep", &sleep_ms, options);
                    let outcome = tokio::time::timeout(Duration::from_secs(20), call)
                        .await
                        .expect("no call hangs past its deadline")
                        .map(|_| ());
                    outcomes.push(outcome);
                }
                outcomes
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_fails_its_calls_typed_and_the_pool_moves_to_the_other_host() {
    let test = "a_killed_daemon_fails_its_calls_typed";
    let name = "scale-kill";
    let Some((mut fleet, pool)) = start(test, name, 0).await else {
        return;
    };

    // A session pinned to a worker on h3: four sessions take the four workers, and all but
    // the one on h3 end.
    let (mut on_h3, mut others) = (None, Vec::new());
    for i in 0..4 {
        let session = pool.session(&format!("s{i}")).await.unwrap();
        let worker = session.worker_id().await.unwrap();
        let engine = pool
            .worker_info()
            .into_iter()
            .find(|w| w.id == worker)
            .and_then(|w| w.engine);
        if engine.as_deref() == Some("h3") && on_h3.is_none() {
            on_h3 = Some(session);
        } else {
            others.push(session);
        }
    }
    for session in others {
        session.end().await.unwrap();
    }
    let session = on_h3.expect("some session lands on h3");
    let _: Value = session
        .call("state_set", &serde_json::json!({"key": "k", "value": 1}))
        .await
        .unwrap();

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let callers = load(&pool, 3, 20, stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.kill_dockerd(1);

    assert!(engine_down(&pool, "h3", true).await, "h3 is marked down");
    assert_eq!(
        settle(&pool, &counts(&[("h2", 4), ("h3", 0)])).await,
        counts(&[("h2", 4), ("h3", 0)]),
        "the pool serves from h2 at full size"
    );
    // The calls go on, on h2.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    let (mut ok, mut typed) = (0, 0);
    for caller in callers {
        for outcome in caller.await.unwrap() {
            match outcome {
                Ok(()) => ok += 1,
                Err(Error::WorkerDied { .. }) => typed += 1,
                Err(e) => panic!("a call failed with an unexpected error: {e:?}"),
            }
        }
    }
    assert!(ok > 0, "calls were served");
    println!("{ok} calls served, {typed} failed with their worker (typed)");
    // The session's worker is gone with its engine: lost, not silently moved.
    match session.call::<Value>("state_get", &"k").await {
        Err(Error::SessionLost { .. }) => {}
        other => panic!("expected SessionLost, got {other:?}"),
    }
    // The engine's failures did not count against the pool (no restart may: its intensity is
    // 0): it is running, not failed.
    let state = pool.state();
    assert_eq!(state.workers, 4, "{state:?}");
    assert_eq!(
        pool.call::<Value>("echo", &1).await.unwrap(),
        Value::from(1)
    );
    let h2 = fleet.engine(0).await;
    assert_eq!(running(&h2, name).await.len(), 4);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_on_their_way_out_lost_with_a_killed_daemon_count_nothing_against_the_pool() {
    let test = "workers_on_their_way_out_lost_with_a_killed_daemon";
    let name = "scale-out-going";
    // No restart may count against it: one counted failure fails the pool.
    let Some((mut fleet, pool)) = start(test, name, 0).await else {
        return;
    };
    // Every worker held, then replaced (make before break): four successors start and the
    // four held workers stay on, superseded, until their leases end.
    let mut leases = Vec::new();
    for _ in 0..4 {
        leases.push(pool.checkout().await.unwrap());
    }
    let restart = tokio::spawn({
        let pool = pool.clone();
        async move { pool.rolling_restart(4).await }
    });
    assert!(
        eventually(LIMIT, || pool.worker_info().len() == 8
            && pool.state().idle == 4)
        .await,
        "four successors ready beside the four held workers: {:?}",
        pool.state()
    );
    fleet.kill_dockerd(1);
    assert!(engine_down(&pool, "h3", true).await, "h3 is marked down");
    // Its superseded workers and its successors went with it: none of that is a failure.
    assert_eq!(
        settle(&pool, &counts(&[("h2", 4), ("h3", 0)])).await,
        counts(&[("h2", 4), ("h3", 0)]),
        "the pool serves from h2 at full size"
    );
    assert!(pool.failure().is_none(), "{:?}", pool.failure());
    drop(leases);
    let _ = tokio::time::timeout(LIMIT, restart).await;
    still_serves(&pool).await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_workers_lost_with_their_engine_are_not_restarted() {
    let test = "temporary_workers_lost_with_their_engine";
    let name = "scale-temporary";
    let temporary = |b: PoolBuilder| b.restart_type(RestartType::Temporary);
    let Some((mut fleet, pool)) = start_with(test, name, 10, temporary).await else {
        return;
    };
    fleet.kill_dockerd(1);
    assert!(engine_down(&pool, "h3", true).await, "h3 is marked down");
    assert!(
        eventually(LIMIT, || pool.worker_info().len() == 2).await,
        "h3's two workers are gone: {:?}",
        pool.worker_info()
    );
    // Give a restart, if there were one, time to show: a temporary worker is not restarted,
    // whatever ended it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pool.workers_by_engine(), counts(&[("h2", 2), ("h3", 0)]));
    assert_eq!(pool.worker_info().len(), 2);
    assert!(pool.failure().is_none(), "{:?}", pool.failure());
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_under_way_on_a_cut_off_engine_does_not_hold_its_slot() {
    let test = "a_launch_under_way_on_a_cut_off_engine";
    let name = "scale-launch-cut";
    let Some((fleet, pool)) = start(test, name, 10).await else {
        return;
    };
    // h3 cut off but not yet taken for down: one of two new slots is placed there, and its
    // launch hangs (the engine's requests time out after 10 s).
    fleet.cut(1);
    pool.resize(6).await.unwrap();
    let state = || pool.state();
    assert!(
        eventually(LIMIT, || state().starting == 1
            && state().idle + state().busy == 5)
        .await,
        "one new worker ready (on h2), the other's launch out (on h3): {:?}",
        state()
    );
    assert!(engine_down(&pool, "h3", true).await, "h3 is marked down");
    // Its slot moves at once, not when its launch gives up: the pool is whole on h2 while
    // that launch is still out.
    assert_eq!(
        settle(&pool, &counts(&[("h2", 6), ("h3", 0)])).await,
        counts(&[("h2", 6), ("h3", 0)]),
    );
    assert_eq!(
        state().starting,
        1,
        "the launch on h3 has not ended yet: the slot did not wait for it"
    );
    fleet.heal(1);
    pool.shutdown().await;
}

/// The engine session `id`'s worker runs on.
async fn session_engine(pool: &Pool, session: &wharf::Session) -> Option<String> {
    let worker = session.worker_id().await.unwrap();
    pool.worker_info()
        .into_iter()
        .find(|w| w.id == worker)
        .and_then(|w| w.engine)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_take_a_worker_on_their_home_engine_which_is_stable_while_it_is_up() {
    let test = "sessions_take_a_worker_on_their_home_engine";
    let name = "scale-home";
    let Some((mut fleet, pool)) = start(test, name, 10).await else {
        return;
    };
    let ids: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();
    let homes: Vec<String> = ids.iter().map(|id| pool.home_engine(id).unwrap()).collect();
    for engine in ["h2", "h3"] {
        assert!(
            homes.iter().any(|h| h == engine),
            "some id lives on {engine}"
        );
    }
    // One session at a time, every worker free: each lands on its home engine.
    for (id, home) in ids.iter().zip(&homes) {
        let session = pool.session(id).await.unwrap();
        assert_eq!(
            session_engine(&pool, &session).await.as_deref(),
            Some(home.as_str())
        );
        session.end().await.unwrap();
    }
    // h3 down: its ids move to h2, the others keep their home.
    fleet.kill_dockerd(1);
    assert!(engine_down(&pool, "h3", true).await, "h3 is marked down");
    for (id, home) in ids.iter().zip(&homes) {
        assert_eq!(
            pool.home_engine(id).as_deref(),
            Some("h2"),
            "{id} (home {home})"
        );
    }
    assert_eq!(
        settle(&pool, &counts(&[("h2", 4), ("h3", 0)])).await,
        counts(&[("h2", 4), ("h3", 0)]),
    );
    let session = pool.session(&ids[0]).await.unwrap();
    assert_eq!(session_engine(&pool, &session).await.as_deref(), Some("h2"));
    session.end().await.unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launches_failing_on_an_engine_that_answers_open_its_breaker_not_the_pools() {
    let test = "launches_failing_on_an_engine_that_answers";
    let name = "scale-breaker";
    let Some((_, spec)) = demo_container(test, Transport::Attach).await else {
        return;
    };
    let Some((fleet, pool)) = start(test, name, 10).await else {
        return;
    };
    // h3 answers its pings, but its copy of the image is broken now (an empty file system
    // under the same name): every launch there fails.
    let socket = fleet.hosts[1].socket();
    let import = format!(
        "tar cf - -T /dev/null | docker -H unix://{} import - {} >/dev/null",
        socket.display(),
        spec.image
    );
    let status = std::process::Command::new("sh")
        .args(["-c", &import])
        .status()
        .unwrap();
    assert!(status.success(), "the broken image is imported on h3");
    // One of h3's workers is killed: its slot's launches fail on h3 until h3's breaker opens,
    // then it starts on h2. Without the breaker, five failures in a row fail the pool.
    let h3 = fleet.engine_by_socket(1).await;
    let victim = running(&h3, name).await[0].clone();
    sigkill_container(&h3, &victim).await;
    assert_eq!(
        settle(&pool, &counts(&[("h2", 3), ("h3", 1)])).await,
        counts(&[("h2", 3), ("h3", 1)]),
        "{:?}",
        pool.failure()
    );
    still_serves(&pool).await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_ends_calls_at_their_deadline_and_the_healed_host_is_swept() {
    let test = "a_cut_link_ends_calls_at_their_deadline";
    let name = "scale-cut";
    let Some((fleet, pool)) = start(test, name, 10).await else {
        return;
    };
    let h3_socket = fleet.engine_by_socket(1).await;
    assert_eq!(running(&h3_socket, name).await.len(), 2);

    // Four calls that outlive the cut, one on each worker.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let options = CallOptions::new().deadline(Duration::from_secs(4));
                let call = pool.call_with::<Value>("sleep", &8_000, options);
                tokio::time::timeout(Duration::from_secs(30), call)
                    .await
                    .expect("no call hangs past its deadline")
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.cut(1);

    let mut ended = (0, 0);
    for call in slow {
        match call.await.unwrap() {
            Ok(v) => panic!("an 8 s call finished within its 4 s deadline: {v:?}"),
            Err(Error::WorkerDied {
                cause: PortError::EngineLost { engine, .. },
                ..
            }) => {
                assert_eq!(engine, "h3");
                ended.0 += 1;
            }
            Err(Error::DeadlineExceeded { .. } | Error::KilledForDeadline { .. }) => ended.1 += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!(
        ended.0 + ended.1,
        4,
        "every call ended, at its deadline or with its engine"
    );
    assert!(engine_down(&pool, "h3", true).await, "h3 is marked down");
    assert_eq!(
        settle(&pool, &counts(&[("h2", 4), ("h3", 0)])).await,
        counts(&[("h2", 4), ("h3", 0)]),
        "h3's slots moved to h2"
    );
    // The cut-off workers are still on h3 (the engine is unreachable, not dead), and end by
    // themselves once their call is over and no ping comes (their watchdog), long before the
    // engine would notice the dead attach connections.
    assert!(!containers(&h3_socket, name, true).await.is_empty());
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !running(&h3_socket, name).await.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        running(&h3_socket, name).await.len(),
        0,
        "the cut-off workers ended by themselves"
    );
    assert!(!containers(&h3_socket, name, true).await.is_empty());

    fleet.heal(1);
    assert!(engine_down(&pool, "h3", false).await, "h3 is up again");
    // Once back, h3 is swept of this pool's leftovers before any use.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !containers(&h3_socket, name, true).await.is_empty()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        containers(&h3_socket, name, true).await.len(),
        0,
        "no stray container on h3"
    );
    assert_eq!(pool.workers_by_engine(), counts(&[("h2", 4), ("h3", 0)]));
    let h2 = fleet.engine(0).await;
    assert_eq!(running(&h2, name).await.len(), 4);
    let reply: Value = pool.call("echo", &"after").await.unwrap();
    assert_eq!(reply, Value::from("after"));
    pool.shutdown().await;
}

/// `container_pool --config FILE`, as a user runs it over the engines a file lists: under
/// `docker kill`s on both hosts, every call is accounted for, none hangs, the workers are spread
/// two and two, and nothing of the pool is left on either host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_pool_example_runs_over_the_engines_a_file_lists() {
    let test = "the_container_pool_example_runs_over_the_engines_a_file_lists";
    if docker_engine(test).await.is_none() {
        return;
    }
    let Some(fleet) = Fleet::start(test).await else {
        return;
    };
    let out = tokio::process::Command::new(example_exe("container_pool"))
        .args(["--workers", "4", "--calls", "3000", "--concurrency", "8"])
        .args(["--kill-every", "700", "--json", "--config"])
        .arg(fleet.config_file())
        .output()
        .await
        .expect("container_pool runs");
    let summary = example_summary(&out, 3000);
    assert_eq!(summary["transport"], "attach");
    assert_eq!(summary["recovered"], true);
    assert_eq!(summary["containers_left"], 0);
    assert_eq!(
        summary["workers_by_engine"],
        serde_json::json!({"h2": 2, "h3": 2})
    );
    let failed = summary["failed"].as_u64().unwrap();
    assert!(
        failed <= summary["kills"].as_u64().unwrap() * 2,
        "{summary}"
    );
    for i in 0..2 {
        let engine = fleet.engine_by_socket(i).await;
        assert_eq!(containers(&engine, "container-pool", true).await.len(), 0);
    }
}
