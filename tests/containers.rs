//! Container workers against the real Docker engine: the same pool, protocol and guarantees
//! as process workers, over both transports. These tests need a Docker engine: where none is
//! reachable they say so loudly and skip, except under `CI=true`, where that is a failure.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::ListContainersOptions;
use common::*;
use wharf::{ContainerSpec, Engine, Error, Pool, Transport, Value};

/// The local engine, or `None` (after saying why) if the tests must skip.
async fn engine() -> Option<Engine> {
    match Engine::local(Duration::from_secs(10)).await {
        Ok(engine) => Some(engine),
        Err(e) => {
            let why = format!("DOCKER UNAVAILABLE: {e}; skipping the container tests");
            assert!(std::env::var_os("CI").is_none(), "{why} (CI=true: failing)");
            eprintln!("{why}");
            None
        }
    }
}

/// The host's Python prefix (the real one, not a shim).
fn python_prefix() -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.base_prefix)"])
        .output()
        .expect("python3 runs");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The demo worker in a container of the host-Python image.
fn demo(transport: Transport) -> ContainerSpec {
    let prefix = python_prefix();
    ContainerSpec::new(
        "wharf-dev/hostpy:1",
        [
            format!("{prefix}/bin/python3"),
            "-m".into(),
            "wharf_worker.demo".into(),
        ],
    )
    .mount("/usr", "/usr", true)
    .mount(&prefix, prefix.clone(), true)
    .mount(python_path(), "/opt/wharf", true)
    .env("PYTHONPATH", "/opt/wharf")
    .user("65534:65534")
    .transport(transport)
    .init_timeout(Duration::from_secs(30))
}

async fn containers_of(engine: &Engine, pool: &str) -> usize {
    let filters = HashMap::from([("label".to_owned(), vec![format!("wharf.pool={pool}")])]);
    engine
        .docker()
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap()
        .len()
}

async fn serves(transport: Transport, pool_name: &str) {
    let Some(engine) = engine().await else {
        return;
    };
    init_logs();
    let pool = Pool::builder(demo(transport))
        .name(pool_name)
        .size(2)
        .build()
        .await
        .unwrap();
    pool.wait_ready(2, READY).await.unwrap();
    assert_eq!(containers_of(&engine, pool_name).await, 2);
    assert_eq!(pool.call("echo", &"hi").await.unwrap(), Value::from("hi"));
    // Over a MiB: many attach chunks, one frame.
    let big = Value::Binary(vec![0x5A; 1_500_000]);
    assert_eq!(pool.call_value("echo", big.clone()).await.unwrap(), big);
    // Sessions are isolated.
    let a = pool.session("a").await.unwrap();
    a.call("state_set", &serde_json::json!({"key": "k", "value": "a"}))
        .await
        .unwrap();
    a.end().await.unwrap();
    let b = pool.session("b").await.unwrap();
    let seen = b
        .call("state_get", &serde_json::json!({"key": "k"}))
        .await
        .unwrap();
    assert_eq!(seen, Value::Nil);
    b.end().await.unwrap();
    // A crash is a typed error, and the slot comes back.
    let err = pool.call("crash", &3).await.unwrap_err();
    assert!(matches!(err, Error::WorkerDied { .. }), "{err:?}");
    pool.wait_ready(2, READY).await.unwrap();
    pool.shutdown().await;
    assert_eq!(
        containers_of(&engine, pool_name).await,
        0,
        "shutdown leaves no container"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_containers_serves_over_attach() {
    serves(Transport::Attach, "ct-attach").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_containers_serves_over_a_socket() {
    serves(Transport::Socket, "ct-socket").await;
}
