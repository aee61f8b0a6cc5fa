//! The pool's metrics (the `metrics` feature), read back through a recording recorder: calls by
//! method and outcome, latency and checkout wait, workers by state, exits and restarts by cause,
//! sessions, and the cap on method labels.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use wharf::telemetry::MAX_METHODS;
use wharf::{Error, Value};

/// name{label=value,...} -> value, for every series recorded so far (histograms: sample count).
fn series(snap: &Snapshotter) -> BTreeMap<String, f64> {
    snap.snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let mut labels: Vec<_> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let value = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(h) => h.len() as f64,
            };
            (format!("{}{{{}}}", key.name(), labels.join(",")), value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_reports_its_calls_workers_and_failures() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let pool = ready(
        builder(2)
            .name("m")
            .sample_interval(Duration::from_millis(50)),
        2,
    )
    .await;
    for i in 0..5 {
        assert_eq!(pool.call::<u32>("echo", &i).await.unwrap(), i);
    }
    let err = pool.call::<Value>("fail", &"boom").await.unwrap_err();
    assert!(matches!(err, Error::Remote { .. }), "{err:?}");
    let session = pool.session("one").await.unwrap();
    // The worker dies: an exit by crash, a restart, a lost session.
    let _ = session.call::<Value>("crash", &3).await.unwrap_err();
    let _open = pool.session("two").await.unwrap();
    // Settled: the replacement is up, and the gauges have been sampled since.
    let settled = || {
        let s = pool.state();
        (s.starting, s.idle, s.busy) == (0, 1, 1)
    };
    assert!(eventually(Duration::from_secs(15), settled).await);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let s = series(&snap);
    let get = |k: &str| {
        s.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {s:#?}"))
    };
    assert_eq!(get("wharf_calls_total{method=echo,outcome=ok,pool=m}"), 5.0);
    assert_eq!(
        get("wharf_calls_total{method=fail,outcome=remote,pool=m}"),
        1.0
    );
    assert_eq!(
        get("wharf_calls_total{method=crash,outcome=worker_died,pool=m}"),
        1.0
    );
    assert_eq!(get("wharf_call_duration_seconds{method=echo,pool=m}"), 5.0);
    assert!(get("wharf_checkout_wait_seconds{pool=m}") >= 7.0);
    assert_eq!(get("wharf_worker_exits_total{cause=crashed,pool=m}"), 1.0);
    assert_eq!(get("wharf_restarts_total{cause=crashed,pool=m}"), 1.0);
    assert_eq!(get("wharf_sessions_open{pool=m}"), 1.0);
    assert_eq!(get("wharf_workers{pool=m,state=busy}"), 1.0);
    assert_eq!(get("wharf_workers{pool=m,state=idle}"), 1.0);
    assert_eq!(get("wharf_waiting_callers{pool=m}"), 0.0);
    assert!(get("wharf_worker_rss_bytes{pool=m}") > 1e6);
    assert_eq!(get("wharf_pool_status{pool=m,status=running}"), 1.0);
    assert_eq!(get("wharf_pool_status{pool=m,status=failed}"), 0.0);

    // Callers that make up method names cannot grow the series without bound.
    for i in 0..MAX_METHODS + 10 {
        let _ = pool.call::<Value>(&format!("made_up_{i}"), &()).await;
    }
    let s = series(&snap);
    let methods: std::collections::HashSet<_> = s
        .keys()
        .filter(|k| k.starts_with("wharf_calls_total{"))
        .filter_map(|k| k.split("method=").nth(1)?.split(',').next())
        .collect();
    assert_eq!(methods.len(), MAX_METHODS + 1, "{methods:?}");
    assert!(methods.contains("other"));

    drop(_open);
    pool.shutdown().await;
    // Dropped at once: the gauges were published by the shutdown itself.
    drop(pool);
    let s = series(&snap);
    assert_eq!(s["wharf_workers{pool=m,state=idle}"], 0.0);
    assert_eq!(s["wharf_pool_status{pool=m,status=shut_down}"], 1.0);
    assert_eq!(s["wharf_pool_status{pool=m,status=running}"], 0.0);
}
