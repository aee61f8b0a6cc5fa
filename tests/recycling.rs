//! Recycling without gaps, with real Python workers: per-worker jittered limits, replacements
//! that are ready before the worker they replace stops serving (make before break), rolling
//! restarts and resizing under load with no failed call.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use wharf::{
    Backoff, Error, ExitKind, HealthCheck, Pool, PoolBuilder, PoolEvent, ProcessSpec, Value,
    WorkerInfo,
};

const SETTLE: Duration = Duration::from_secs(30);

/// Callers calling `sleep 2` (ms) in a loop until stopped, each waiting for a worker as long
/// as it takes; every failed call is kept.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<Error>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(pool: &Pool, callers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..callers)
            .map(|_| {
                let (pool, stop, ok, failed) =
                    (pool.clone(), stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match pool.call::<Value>("sleep", &2).await {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failed.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    /// Calls that succeeded so far.
    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the callers; returns the calls that succeeded and those that failed.
    async fn stop(self) -> (u64, Vec<Error>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failed = std::mem::take(&mut *self.failed.lock().unwrap());
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

/// Polls the pool's state until stopped and keeps the fewest ready workers (idle + busy)
/// seen: a worker whose replacement is not ready yet must never have left.
struct ReadyWatch {
    stop: Arc<AtomicBool>,
    task: JoinHandle<usize>,
}

impl ReadyWatch {
    fn start(pool: &Pool) -> ReadyWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let (pool, flag) = (pool.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut fewest = usize::MAX;
            while !flag.load(Ordering::Relaxed) {
                let s = pool.state();
                fewest = fewest.min(s.idle + s.busy);
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            fewest
        });
        ReadyWatch { stop, task }
    }

    async fn fewest_ready(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// Collects a pool's events in a task, so the pool never waits on the test.
struct Recorder {
    seen: Arc<Mutex<Vec<PoolEvent>>>,
    task: JoinHandle<()>,
}

impl Recorder {
    fn start(mut events: broadcast::Receiver<PoolEvent>) -> Recorder {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let into = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => into.lock().unwrap().push(event),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        panic!("the recorder missed {n} events")
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Recorder { seen, task }
    }

    fn events(&self) -> Vec<PoolEvent> {
        self.seen.lock().unwrap().clone()
    }

    /// Workers that exited recycled so far.
    fn recycled(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    PoolEvent::WorkerExited {
                        cause: ExitKind::Recycled(_),
                        ..
                    }
                )
            })
            .count()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Builds the pool, records its events from its start and waits until `n` workers are ready;
/// returns the workers ready then too.
async fn recorded(builder: PoolBuilder, n: usize) -> (Pool, Recorder, Vec<WorkerInfo>) {
    let pool = builder.build().await.unwrap();
    let recorder = Recorder::start(pool.events());
    pool.wait_ready(n, READY).await.unwrap();
    let earlier = pool.worker_info();
    (pool, recorder, earlier)
}

/// Checks, on a pool's events in order, that every worker that exited recycled had been
/// superseded by a worker of its own slot, started after it was ready and ready before it
/// exited; returns how many workers exited recycled. `earlier` are the workers that were ready
/// before the events were recorded.
fn assert_replaced_before_exit(earlier: &[WorkerInfo], events: &[PoolEvent]) -> usize {
    // Positions in `events`, shifted by one: 0 is "before the recording".
    let mut slot_of: HashMap<&str, usize> = HashMap::new();
    let mut started_at: HashMap<&str, usize> = HashMap::new();
    let mut ready_at: HashMap<&str, usize> = HashMap::new();
    for w in earlier {
        slot_of.insert(&w.id, w.slot);
        started_at.insert(&w.id, 0);
        ready_at.insert(&w.id, 0);
    }
    let mut recycled = 0;
    for (i, event) in events.iter().enumerate() {
        let i = i + 1;
        match event {
            PoolEvent::WorkerStarting { worker, slot, .. } => {
                slot_of.insert(worker, *slot);
                started_at.insert(worker, i);
            }
            PoolEvent::WorkerReady { worker, .. } => {
                ready_at.entry(worker).or_insert(i);
            }
            PoolEvent::WorkerExited {
                worker,
                cause: ExitKind::Recycled(_),
                ..
            } => {
                recycled += 1;
                let (Some(slot), Some(&old_ready)) =
                    (slot_of.get(&**worker), ready_at.get(&**worker))
                else {
                    panic!("{worker} exited recycled without having started here: {events:#?}");
                };
                let successor = ready_at.iter().find(|(w, &ready)| {
                    **w != worker
                        && slot_of.get(*w) == Some(slot)
                        && started_at[*w] > old_ready
                        && ready < i
                });
                assert!(
                    successor.is_some(),
                    "{worker} (slot {slot}) exited before a successor in its slot was ready: \
                     {events:#?}"
                );
            }
            _ => {}
        }
    }
    recycled
}

/// The most successors launching at once, from the events: launches started and not yet
/// ready or failed.
fn most_launching_at_once(events: &[PoolEvent]) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for event in events {
        match event {
            PoolEvent::WorkerStarting { .. } => now += 1,
            PoolEvent::WorkerReady { .. } | PoolEvent::StartFailed { .. } => {
                now = now.saturating_sub(1)
            }
            _ => {}
        }
        most = most.max(now);
    }
    most
}

/// Waits until none of the pool's workers is one of `old` (by pid); whether that happened.
async fn none_left(pool: &Pool, old: &HashSet<u32>) -> bool {
    eventually(SETTLE, || {
        pool.worker_pids().iter().all(|p| !old.contains(p))
    })
    .await
}

/// A demo worker that refuses to start (exits 3 before its init pong) while `flag` exists:
/// a deployment gone wrong, for workers started after the flag appears.
fn breakable_spec(flag: &Path) -> ProcessSpec {
    let script = format!(
        "test -e '{}' && exit 3; exec python3 -m wharf_worker.demo",
        flag.display()
    );
    ProcessSpec::from_argv(["/bin/sh", "-c", &script])
        .expect("non-empty argv")
        .env("PYTHONPATH", python_path())
        .init_timeout(Duration::from_secs(20))
}

/// A flag file path for this test process, removed if it is there.
fn flag(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "wharf-recycling-{}-{name}.flag",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_draws_its_own_limits_within_bounds() {
    let hour = Duration::from_secs(3600);
    let pool = ready(
        builder(6)
            .max_calls(1000)
            .max_lifetime(hour)
            .recycle_jitter(0.5),
        6,
    )
    .await;
    let info = pool.worker_info();
    assert_eq!(info.len(), 6);
    for w in &info {
        let (calls, life) = (w.max_calls.unwrap(), w.max_lifetime.unwrap());
        assert!((500..=1000).contains(&calls), "{w:?}");
        assert!(life >= hour / 2 && life <= hour, "{w:?}");
    }
    let calls: HashSet<u64> = info.iter().filter_map(|w| w.max_calls).collect();
    let lives: HashSet<Duration> = info.iter().filter_map(|w| w.max_lifetime).collect();
    assert!(
        calls.len() > 1 && lives.len() > 1,
        "workers started together drew the same limits: {info:?}"
    );
    pool.shutdown().await;

    let exact = ready(builder(2).max_calls(1000).recycle_jitter(0.0), 2).await;
    for w in exact.worker_info() {
        assert_eq!((w.max_calls, w.max_lifetime), (Some(1000), None), "{w:?}");
    }
    exact.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_replaced_at_its_own_jittered_limit() {
    let pool = ready(builder(1).max_calls(20).recycle_jitter(0.5), 1).await;
    let first = pool.worker_info()[0].clone();
    let limit = first.max_calls.unwrap();
    assert!((10..=20).contains(&limit), "{first:?}");
    for _ in 1..limit {
        let pid: u32 = pool.call("pid", &()).await.unwrap();
        assert_eq!(pid, first.pid);
    }
    // One call short of its limit: nothing is being replaced.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool.state().starting, 0, "{:?}", pool.workers());
    assert_eq!(pool.worker_info().len(), 1);
    // The last call it owes is still its own; then its successor comes in, then it goes.
    let pid: u32 = pool.call("pid", &()).await.unwrap();
    assert_eq!(pid, first.pid);
    assert!(eventually(SETTLE, || !pid_exists(first.pid)).await);
    let only = |pids: Vec<u32>| pids.len() == 1 && pids[0] != first.pid;
    assert!(
        eventually(SETTLE, || only(pool.worker_pids())).await,
        "{:?}",
        pool.worker_info()
    );
    assert!(eventually(SETTLE, || pool.stats().replacements == 1).await);
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recycled_workers_replacement_is_ready_before_it_exits() {
    let (pool, recorder, earlier) = recorded(builder(2).max_calls(15).recycle_jitter(0.0), 2).await;
    let watch = ReadyWatch::start(&pool);
    let load = Load::start(&pool, 3);
    assert!(
        eventually(SETTLE, || recorder.recycled() >= 4).await,
        "workers were recycled under load: {:#?}",
        recorder.events()
    );
    let (ok, failed) = load.stop().await;
    let fewest = watch.fewest_ready().await;
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    assert!(ok >= 4 * 15, "{ok} calls");
    assert!(
        fewest >= 2,
        "at some moment only {fewest} of 2 workers were ready"
    );
    assert!(assert_replaced_before_exit(&earlier, &recorder.events()) >= 4);
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_past_its_lifetime_is_replaced_before_it_goes() {
    let lifetime = builder(1)
        .max_lifetime(Duration::from_millis(300))
        .recycle_jitter(0.0)
        .health_check(HealthCheck {
            interval: Some(Duration::from_millis(50)),
            ..HealthCheck::default()
        });
    let (pool, recorder, earlier) = recorded(lifetime, 1).await;
    let watch = ReadyWatch::start(&pool);
    // Nobody calls: the worker is replaced on age alone.
    assert!(eventually(SETTLE, || recorder.recycled() >= 2).await);
    let fewest = watch.fewest_ready().await;
    assert_eq!(fewest, 1, "the slot was left without a ready worker");
    let events = recorder.events();
    assert!(assert_replaced_before_exit(&earlier, &events) >= 2);
    assert!(
        events.iter().any(|e| matches!(
            e,
            PoolEvent::WorkerExited { cause: ExitKind::Recycled(why), .. }
                if why == "max_lifetime reached"
        )),
        "{events:#?}"
    );
    assert_eq!(pool.stats().restarts, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_that_cannot_start_does_not_keep_the_old_worker_forever() {
    let broken = flag("limit");
    init_logs();
    let pool = ready(
        Pool::builder(breakable_spec(&broken))
            .size(1)
            .max_calls(2)
            .recycle_jitter(0.0)
            .max_start_failures(3)
            .backoff(Backoff {
                initial: Duration::from_millis(500),
                jitter: 0.0,
                ..Backoff::default()
            }),
        1,
    )
    .await;
    let old = pool.worker_pids()[0];
    std::fs::write(&broken, b"").unwrap();
    // Its limit is reached: the successor launches fail, and the old worker serves meanwhile,
    // until the restart policy gives up on the slot and the pool fails (killing it, maybe in
    // the middle of a call).
    let (mut served, mut died) = (0, 0);
    let err = loop {
        match pool.call::<u32>("pid", &()).await {
            Ok(pid) => {
                assert_eq!(pid, old);
                served += 1;
            }
            Err(Error::WorkerDied { .. }) if died == 0 => died += 1,
            Err(e) => break e,
        }
        assert!(served < 100_000, "the pool never gave up on the successor");
    };
    let _ = std::fs::remove_file(&broken);
    assert!(
        served > 2,
        "the old worker stopped serving at its limit: {served}"
    );
    match &err {
        Error::PoolFailed {
            reason,
            last_errors,
            ..
        } => {
            assert!(reason.contains("failed to start 3 times"), "{err}");
            assert!(!last_errors.is_empty(), "{err}");
        }
        other => panic!("expected PoolFailed, got {other:?}"),
    }
    assert!(eventually(SETTLE, || !pid_exists(old)).await);
    assert_eq!(pool.stats().start_failures, 3);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_replaces_every_worker_under_load_without_a_failed_call() {
    let (pool, recorder, earlier) = recorded(builder(4), 4).await;
    let before: HashSet<u32> = earlier.iter().map(|w| w.pid).collect();
    let load = Load::start(&pool, 6);
    assert!(eventually(SETTLE, || load.ok() > 50).await);
    let watch = ReadyWatch::start(&pool);
    let from = recorder.events().len();
    assert_eq!(pool.rolling_restart(1).await.unwrap(), 4);
    let fewest = watch.fewest_ready().await;
    let served_during = load.ok();
    let (ok, failed) = load.stop().await;
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    assert!(ok > served_during && served_during > 50, "{ok} calls");
    assert!(fewest >= 4, "at some moment only {fewest} of 4 were ready");
    for pid in &before {
        assert!(eventually(SETTLE, || !pid_exists(*pid)).await, "{pid} left");
    }
    assert!(none_left(&pool, &before).await);
    let after: HashSet<u32> = pool.worker_pids().into_iter().collect();
    assert_eq!(after.len(), 4, "{:?}", pool.worker_info());
    // A process is reaped a moment before its exit is reported.
    assert!(eventually(SETTLE, || recorder.recycled() == 4).await);
    let events = recorder.events();
    assert_eq!(
        assert_replaced_before_exit(&earlier, &events),
        4,
        "{events:#?}"
    );
    assert_eq!(
        most_launching_at_once(&events[from..]),
        1,
        "one at a time: {events:#?}"
    );
    assert!(eventually(SETTLE, || pool.stats().replacements == 4).await);
    assert_eq!(pool.stats().restarts, 0);

    // Two at a time: never more than two launches under way.
    let load = Load::start(&pool, 6);
    let from = recorder.events().len();
    assert_eq!(pool.rolling_restart(2).await.unwrap(), 4);
    let (_, failed) = load.stop().await;
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    assert!(most_launching_at_once(&recorder.events()[from..]) <= 2);
    assert!(none_left(&pool, &after).await);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_whose_new_workers_cannot_start_keeps_the_old_ones() {
    let broken = flag("rolling");
    init_logs();
    let pool = ready(Pool::builder(breakable_spec(&broken)).size(2), 2).await;
    let before: HashSet<u32> = pool.worker_pids().into_iter().collect();
    let load = Load::start(&pool, 3);
    std::fs::write(&broken, b"").unwrap();
    let err = pool.rolling_restart(1).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::ReplacementFailed {
                cause: ExitKind::Crashed(_),
                ..
            }
        ),
        "{err:?}"
    );
    // The old workers serve on; the pool is healthy.
    let served = load.ok();
    assert!(eventually(SETTLE, || load.ok() > served + 20).await);
    assert!(pool.failure().is_none());
    let now: HashSet<u32> = pool.worker_pids().into_iter().collect();
    assert_eq!(now, before);
    // Fixed: the next rolling restart goes through.
    std::fs::remove_file(&broken).unwrap();
    assert_eq!(pool.rolling_restart(1).await.unwrap(), 2);
    let (_, failed) = load.stop().await;
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    assert!(none_left(&pool, &before).await);
    assert_eq!(pool.stats().start_failures, 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_up_and_down_under_load() {
    let pool = ready(builder(2), 2).await;
    let load = Load::start(&pool, 4);
    pool.resize(4).await.unwrap();
    assert_eq!((pool.stats().size, pool.state().size), (4, 4));
    pool.wait_ready(4, READY).await.unwrap();
    assert!(eventually(SETTLE, || pool.worker_info().len() == 4).await);
    let served = load.ok();
    pool.resize(1).await.unwrap();
    assert_eq!((pool.stats().size, pool.state().size), (1, 1));
    assert!(
        eventually(SETTLE, || pool.worker_info().len() == 1).await,
        "{:?}",
        pool.worker_info()
    );
    assert!(eventually(SETTLE, || load.ok() > served + 20).await);
    pool.resize(3).await.unwrap();
    assert!(eventually(SETTLE, || pool.worker_info().len() == 3).await);
    let (ok, failed) = load.stop().await;
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    assert!(ok > 0);
    let stats = pool.stats();
    assert_eq!((stats.size, stats.restarts), (3, 0), "{stats:?}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrinking_retires_idle_workers_first_and_busy_ones_when_they_come_back() {
    let pool = ready(builder(3), 3).await;
    let mut a = pool.checkout().await.unwrap();
    let mut b = pool.checkout().await.unwrap();
    let held: HashSet<u32> = [a.pid(), b.pid()].into();
    let idle = *pool
        .worker_pids()
        .iter()
        .find(|p| !held.contains(p))
        .unwrap();
    pool.resize(2).await.unwrap();
    assert!(
        eventually(SETTLE, || !pid_exists(idle)).await,
        "the idle worker goes first"
    );
    assert!(held.iter().all(|p| pid_exists(*p)));
    pool.resize(1).await.unwrap();
    assert_eq!(pool.state().size, 1);
    // Both are busy: the one removed finishes its holder's work first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(held.iter().all(|p| pid_exists(*p)));
    assert_eq!(a.call::<u8>("echo", &1).await.unwrap(), 1);
    assert_eq!(b.call::<u8>("echo", &2).await.unwrap(), 2);
    drop(a);
    drop(b);
    assert!(eventually(SETTLE, || pool.worker_info().len() == 1).await);
    let left = pool.worker_pids()[0];
    assert!(held.contains(&left));
    assert!(
        eventually(SETTLE, || held.iter().filter(|p| pid_exists(**p)).count()
            == 1)
        .await
    );
    assert_eq!(pool.call::<u8>("echo", &3).await.unwrap(), 3);

    // Never below zero workers for good: 0 needs overflow workers to serve.
    let err = pool.resize(0).await.unwrap_err();
    assert!(
        matches!(err, Error::Config { field: "size", .. }),
        "{err:?}"
    );
    assert_eq!(pool.stats().size, 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_resized_to_zero_serves_from_overflow_workers() {
    let pool = ready(builder(1).max_overflow(1), 1).await;
    let core = pool.worker_pids()[0];
    pool.resize(0).await.unwrap();
    assert!(eventually(SETTLE, || !pid_exists(core)).await);
    assert_eq!(pool.state().size, 0);
    let pid: u32 = pool.call("pid", &()).await.unwrap();
    assert_ne!(pid, core);
    let slot = pool.worker_info()[0].slot;
    assert_eq!(slot, 1, "an overflow slot serves");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serving_many_calls_at_once_are_replaced_without_a_failed_call() {
    // Two workers each declaring 4 calls at once, under 8 callers: a rolling restart and then
    // max_calls recycling replace them while every call is served.
    init_logs();
    let pool = Pool::builder(demo_spec(&["--max-concurrency", "4"]))
        .size(2)
        .build()
        .await
        .unwrap();
    pool.wait_ready(2, SETTLE).await.unwrap();
    let before: HashSet<u32> = pool.worker_pids().into_iter().collect();
    let load = Load::start(&pool, 8);
    assert!(eventually(SETTLE, || load.ok() > 50).await);
    assert_eq!(pool.rolling_restart(1).await.unwrap(), 2);
    let (ok, failed) = load.stop().await;
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    assert!(ok > 50, "{ok} calls");
    for pid in &before {
        assert!(eventually(SETTLE, || !pid_exists(*pid)).await, "{pid} left");
    }
    assert!(eventually(SETTLE, || pool.worker_pids().len() == 2).await);
    pool.shutdown().await;

    let pool = Pool::builder(demo_spec(&["--max-concurrency", "4"]))
        .size(2)
        .max_calls(40)
        .recycle_jitter(0.0)
        .build()
        .await
        .unwrap();
    pool.wait_ready(2, SETTLE).await.unwrap();
    let first: HashSet<u32> = pool.worker_pids().into_iter().collect();
    let load = Load::start(&pool, 8);
    assert!(eventually(SETTLE, || load.ok() > 300).await);
    let (_, failed) = load.stop().await;
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    for pid in &first {
        assert!(
            eventually(SETTLE, || !pid_exists(*pid)).await,
            "{pid} was never recycled"
        );
    }
    assert!(eventually(SETTLE, || pool.worker_pids().len() == 2).await);
    pool.shutdown().await;
}
