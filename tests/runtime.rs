//! The runtime of pools with real Python workers: one pool per configuration however many ask
//! at once, conflicts by name, idle pools stopped and busy ones kept, failed pools shown and
//! replaced, one parallel shutdown that leaves no worker, pools from a file, and signals.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use wharf::{
    ConfigFile, Error, PoolBuilder, PoolStatus, ProcessSpec, Runtime, RuntimeSettings,
    ShutdownSignal, Value,
};

/// Demo workers in a pool named `name`.
fn demo(name: &str, size: usize) -> PoolBuilder {
    builder(size).name(name)
}

fn idle_after(d: Duration) -> RuntimeSettings {
    RuntimeSettings::default().idle_timeout(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_one_configuration_start_one_pool() {
    let runtime = Runtime::new(RuntimeSettings::default());
    let asks: Vec<_> = (0..8)
        .map(|_| {
            let runtime = runtime.clone();
            tokio::spawn(async move { runtime.get_or_start(demo("shared", 2)).await })
        })
        .collect();
    let mut pools = Vec::new();
    for ask in asks {
        pools.push(ask.await.unwrap().unwrap());
    }
    pools[0].wait_ready(2, READY).await.unwrap();
    let pids: HashSet<u32> = pools[0].worker_pids().into_iter().collect();
    assert_eq!(pids.len(), 2);
    for pool in &pools {
        let theirs: HashSet<u32> = pool.worker_pids().into_iter().collect();
        assert_eq!(theirs, pids, "every request got the same pool");
    }
    // A later request with an equal configuration (built anew) gets it too.
    let again = runtime.get_or_start(demo("shared", 2)).await.unwrap();
    assert_eq!(
        again.worker_pids().into_iter().collect::<HashSet<_>>(),
        pids
    );
    let stats = runtime.stats();
    assert_eq!(stats.pools.len(), 1);
    let shared = stats.pool("shared").unwrap();
    assert_eq!(shared.starts, 1);
    assert_eq!(shared.status, PoolStatus::Running);
    assert_eq!(shared.stats.as_ref().unwrap().size, 2);
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_name_with_another_configuration_is_a_conflict() {
    let runtime = Runtime::new(RuntimeSettings::default());
    runtime.get_or_start(demo("named", 1)).await.unwrap();
    let err = runtime
        .get_or_start(demo("named", 2).call_timeout(Duration::from_secs(1)))
        .await
        .unwrap_err();
    match &err {
        Error::PoolConflict { pool, differs } => {
            assert_eq!(pool, "named");
            assert_eq!(differs, &["size", "call_timeout"]);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "pool named already runs with another configuration (it differs in size, call_timeout)"
    );
    let spec = ProcessSpec::from_argv(["python3", "-c", "pass"]).unwrap();
    let err = runtime
        .get_or_start(wharf::Pool::builder(spec).name("named").size(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::PoolConflict { differs, .. } if differs.contains(&"spec")),
        "{err:?}"
    );
    // The running pool is untouched.
    assert_eq!(runtime.names(), ["named"]);
    assert_eq!(
        runtime
            .pool("named")
            .unwrap()
            .call::<Value>("echo", &1)
            .await
            .unwrap(),
        Value::from(1)
    );
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pools_are_stopped_and_pools_in_use_are_kept() {
    let idle = Duration::from_millis(800);
    let runtime = Runtime::new(idle_after(idle));
    // Three pools put to use at once (a caller waiting for a worker is a use too) ...
    let leased = runtime.get_or_start(demo("leased", 1)).await.unwrap();
    let in_session = runtime.get_or_start(demo("in_session", 1)).await.unwrap();
    let calling = runtime.get_or_start(demo("calling", 1)).await.unwrap();
    let long_call = {
        let pool = calling.clone();
        tokio::spawn(async move { pool.call::<Value>("sleep", &5000).await })
    };
    let (lease, session) = tokio::join!(leased.checkout(), in_session.session("s1"));
    let (lease, session) = (lease.unwrap(), session.unwrap());
    // ... and one left alone once ready.
    let unused = runtime.get_or_start(demo("unused", 1)).await.unwrap();
    unused.wait_ready(1, READY).await.unwrap();
    let unused_pids = unused.worker_pids();

    // The unused pool goes after its idle timeout, with its workers.
    assert!(
        eventually(Duration::from_secs(5), || !runtime
            .names()
            .contains(&"unused".to_owned()))
        .await,
        "the unused pool was stopped"
    );
    for pid in unused_pids {
        assert!(
            eventually(Duration::from_secs(5), || !pid_exists(pid)).await,
            "worker {pid} of the idle pool survived"
        );
    }
    assert!(matches!(
        unused.call::<Value>("echo", &1).await,
        Err(Error::ShutDown(_))
    ));

    // Pools in use stay for several idle timeouts: a held lease, an open session, a call.
    tokio::time::sleep(idle * 3).await;
    let names = runtime.names();
    for name in ["leased", "in_session", "calling"] {
        assert!(
            names.contains(&name.to_owned()),
            "{name} was stopped: {names:?}"
        );
    }
    assert_eq!(
        runtime.stats().pool("leased").unwrap().idle_for,
        Duration::ZERO
    );
    assert_eq!(long_call.await.unwrap().unwrap(), Value::from(5000));
    drop(lease);
    session.end().await.unwrap();

    // Once let go, they are idle too, and go.
    assert!(
        eventually(Duration::from_secs(5), || runtime.names().is_empty()).await,
        "{:?}",
        runtime.names()
    );
    // Asking again starts a new pool.
    let back = runtime.get_or_start(demo("unused", 1)).await.unwrap();
    assert_eq!(
        back.call::<Value>("echo", &2).await.unwrap(),
        Value::from(2)
    );
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pool_shows_in_the_stats_and_is_replaced_when_asked_for_again() {
    init_logs();
    let runtime = Runtime::new(idle_after(Duration::from_millis(100)));
    let broken = || {
        wharf::Pool::builder(ProcessSpec::new("wharf-no-such-command"))
            .name("broken")
            .size(1)
            .intensity(2, Duration::from_secs(5))
    };
    runtime.get_or_start(broken()).await.unwrap();
    // A pool in use, so that it is not stopped as idle meanwhile.
    let fine = runtime.get_or_start(demo("fine", 1)).await.unwrap();
    let _lease = fine.checkout().await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !runtime.stats().healthy()).await,
        "the failure shows"
    );
    let stats = runtime.stats();
    match &stats.pool("broken").unwrap().status {
        PoolStatus::Failed(reason) => assert!(reason.contains("cannot spawn worker"), "{reason}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(stats.pool("broken").unwrap().stats.as_ref().unwrap().failed);
    // A failed pool is not stopped as idle: it stays visible.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(runtime.names().contains(&"broken".to_owned()));

    // Asked for again, it is started anew.
    runtime.get_or_start(broken()).await.unwrap();
    assert_eq!(runtime.stats().pool("broken").unwrap().starts, 2);
    assert!(runtime.stop("broken").await);
    assert!(!runtime.stop("broken").await);
    assert_eq!(runtime.names(), ["fine"]);
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_every_pool_at_once_and_leaves_no_worker() {
    let runtime = Runtime::new(RuntimeSettings::default());
    let grace = Duration::from_secs(5);
    let a = runtime
        .get_or_start(demo("a", 2).shutdown_grace(grace))
        .await
        .unwrap();
    let b = runtime
        .get_or_start(demo("b", 1).shutdown_grace(grace))
        .await
        .unwrap();
    a.wait_ready(2, READY).await.unwrap();
    b.wait_ready(1, READY).await.unwrap();
    let pids: Vec<u32> = a.worker_pids().into_iter().chain(b.worker_pids()).collect();
    assert_eq!(pids.len(), 3);
    // A call in flight in each pool: each pool's shutdown lets it finish, in parallel.
    let calls: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|pool| tokio::spawn(async move { pool.call::<Value>("sleep", &1500).await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    runtime.shutdown().await;
    let took = started.elapsed();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), Value::from(1500), "drained");
    }
    // One after the other would take two drains (≥ 2.6 s).
    assert!(took < Duration::from_millis(2500), "shutdown took {took:?}");
    for pid in pids {
        assert!(
            !pid_exists(pid),
            "worker {pid} outlived the runtime's shutdown"
        );
    }
    assert!(runtime.names().is_empty());
    assert!(matches!(
        runtime.get_or_start(demo("late", 1)).await,
        Err(Error::ShutDown(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_runs_the_pools_of_a_file() {
    init_logs();
    let text = format!(
        "[runtime]\nidle_timeout = \"1m\"\n\n\
         [pools.one]\nsize = 1\n[pools.one.process]\n\
         command = [\"python3\", \"-m\", \"wharf_worker.demo\"]\nenv = {{ PYTHONPATH = {path:?} }}\n\n\
         [pools.two]\nsize = 2\nlazy = true\n[pools.two.process]\n\
         command = [\"python3\", \"-m\", \"wharf_worker.demo\"]\nenv = {{ PYTHONPATH = {path:?} }}\n",
        path = python_path()
    );
    let file = ConfigFile::parse(&text, "wharf.toml").unwrap();
    let runtime = Runtime::from_file(&file).await.unwrap();
    assert_eq!(
        runtime.settings().idle_timeout,
        Some(Duration::from_secs(60))
    );
    assert_eq!(runtime.names(), ["one", "two"]);
    for name in ["one", "two"] {
        let pool = runtime.pool(name).unwrap();
        assert_eq!(
            pool.call::<Value>("echo", name).await.unwrap(),
            Value::from(name)
        );
    }
    // Starting the same file again is a no-op: the same pools.
    let pids = runtime.pool("one").unwrap().worker_pids();
    let again = runtime.start_from(&file).await.unwrap();
    assert_eq!(again[0].worker_pids(), pids);
    assert_eq!(runtime.stats().pool("one").unwrap().starts, 1);
    assert!(runtime.pool("three").is_none());
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_end_the_runtime() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    // The handlers are installed when shutdown_signal returns: from then on, these signals
    // do not end this test process.
    let signal = wharf::shutdown_signal().unwrap();
    kill(Pid::this(), Signal::SIGTERM).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), signal)
        .await
        .expect("SIGTERM seen");
    assert_eq!(got, ShutdownSignal::Terminate);

    let runtime = Runtime::new(RuntimeSettings::default());
    let pool = runtime.get_or_start(demo("signalled", 1)).await.unwrap();
    pool.wait_ready(1, READY).await.unwrap();
    let pids = pool.worker_pids();
    let run = {
        let runtime = runtime.clone();
        tokio::spawn(async move { runtime.run_until_signal().await })
    };
    // SIGINT until the runtime has seen one (its handler may not be listening yet).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !run.is_finished() && Instant::now() < deadline {
        kill(Pid::this(), Signal::SIGINT).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(run.await.unwrap().unwrap(), ShutdownSignal::Interrupt);
    for pid in pids {
        assert!(!pid_exists(pid), "worker {pid} outlived the signal");
    }
    assert!(runtime.names().is_empty());
}
