//! The process port against real Python workers: the bookkeeping of requests in flight
//! (streams, cancelled sends, abandoned calls, timed-out pings) and stream backpressure.
//! Each test fails on a port that miscounts, leaks an entry or buffers without bound.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wharf_actors::port::{Port, PortError, ProcessSpec, StreamEvent};
use wharf_protocol::Value;

fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A worker script from `tests/workers/`, with the SDK on its `PYTHONPATH`.
fn fixture(script: &str) -> ProcessSpec {
    ProcessSpec::new("python3")
        .args([repo_root().join("tests/workers").join(script)])
        .env("PYTHONPATH", repo_root().join("protocol/python"))
        .init_timeout(Duration::from_secs(20))
}

fn map(pairs: &[(&str, Value)]) -> Value {
    Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    )
}

/// Waits (bounded) until no request is in flight.
async fn settles(port: &Port, limit: Duration) -> bool {
    tokio::time::timeout(limit, port.quiesce()).await.is_ok() && port.in_flight() == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_stays_in_flight_between_its_chunks() {
    let port = Arc::new(Port::start(&fixture("streamer.py").into()).await.unwrap());
    const N: u64 = 20_000;
    // The last chunk is followed by a pause: until the final reply, the call is in flight.
    let body = map(&[("n", N.into()), ("end_ms", 300.into())]);
    let mut rx = port
        .call_stream(port.next_request_id(), "stream", body, None, None)
        .await
        .unwrap();

    let seen = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let spinner = {
        let (port, seen, stop) = (port.clone(), seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut dips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if port.in_flight() == 0 && seen.load(Ordering::Acquire) < N {
                    dips += 1;
                }
            }
            dips
        })
    };
    let mut end = None;
    while let Some(event) = rx.recv().await {
        match event {
            StreamEvent::Chunk { seq, .. } => {
                assert_eq!(seq, seen.load(Ordering::Relaxed));
                seen.fetch_add(1, Ordering::Release);
                if seq + 1 == N {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            StreamEvent::End(result) => {
                end = Some(result);
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let dips = spinner.join().unwrap();
    assert_eq!(end.unwrap().unwrap(), Value::from(N));
    assert_eq!(
        dips, 0,
        "in_flight() read 0 {dips} times while the stream was still running: a checkin then \
         would hand out a worker that is still streaming"
    );
    assert!(settles(&port, Duration::from_secs(5)).await);
    port.kill(PortError::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_stream_consumer_stops_the_reader() {
    let port = Port::start(&fixture("streamer.py").into()).await.unwrap();
    // 2000 chunks of 64 KiB: 125 MiB if the runtime buffered them all.
    const N: u64 = 2000;
    let body = map(&[("n", N.into()), ("size", (64 * 1024).into())]);
    let mut rx = port
        .call_stream(port.next_request_id(), "stream", body, None, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let buffered = rx.len();
    assert!(
        buffered <= 64,
        "{buffered} chunks buffered for a consumer that reads none: the stream's buffer is \
         unbounded"
    );
    // Resuming loses nothing and keeps the order.
    let mut next = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("the stream resumes")
        {
            Some(StreamEvent::Chunk { seq, body }) => {
                assert_eq!(seq, next);
                assert_eq!(body, Value::Binary(vec![b'x'; 64 * 1024]));
                next += 1;
            }
            Some(StreamEvent::End(result)) => {
                assert_eq!(result.unwrap(), Value::from(N));
                break;
            }
            None => panic!("the stream ended without its result"),
        }
    }
    assert_eq!(next, N);
    assert!(settles(&port, Duration::from_secs(5)).await);
    port.kill(PortError::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_before_it_is_sent_leaves_no_entry() {
    let port = Arc::new(Port::start(&fixture("streamer.py").into()).await.unwrap());
    // A stream of 8 MiB in 64 KiB chunks keeps the worker writing; a 4 MiB echo cannot be
    // written in full until the worker reads again, so the writer stays busy with it.
    let body = map(&[
        ("n", 128.into()),
        ("size", (64 * 1024).into()),
        ("chunk_ms", 5.into()),
    ]);
    let mut stream = port
        .call_stream(port.next_request_id(), "stream", body, None, None)
        .await
        .unwrap();
    let big = {
        let port = port.clone();
        tokio::spawn(async move {
            let blob = Value::Binary(vec![7; 4 << 20]);
            port.call(port.next_request_id(), "echo", blob, None, None)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // This request waits for the writer and is abandoned before its frame is written.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(50),
        port.call(port.next_request_id(), "echo", "late".into(), None, None),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the small echo should still wait for the writer"
    );

    while let Some(event) = stream.recv().await {
        if let StreamEvent::End(result) = event {
            assert_eq!(result.unwrap(), Value::from(128u64));
            break;
        }
    }
    let echoed = tokio::time::timeout(Duration::from_secs(30), big)
        .await
        .expect("the big echo ends")
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Value::Binary(vec![7; 4 << 20]));
    assert!(
        settles(&port, Duration::from_secs(5)).await,
        "{} request(s) still in flight: an abandoned send left its entry",
        port.in_flight()
    );
    port.kill(PortError::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_is_cancelled() {
    let port = Port::start(&fixture("cancellable.py").into())
        .await
        .unwrap();
    // The worker ends `sleep` only when cancelled.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        port.call(port.next_request_id(), "sleep", Value::Nil, None, None),
    )
    .await;
    assert!(abandoned.is_err());
    assert!(
        settles(&port, Duration::from_secs(10)).await,
        "the abandoned call never ended: the runtime did not send `cancel`"
    );
    let echo = port
        .call(port.next_request_id(), "echo", "after".into(), None, None)
        .await
        .unwrap();
    assert_eq!(echo, Value::from("after"));
    port.kill(PortError::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_that_timed_out_is_not_in_flight() {
    let port = Port::start(&fixture("no_pong.py").into()).await.unwrap();
    let missed = port.ping(Duration::from_millis(100)).await;
    assert!(matches!(missed, Err(PortError::Timeout(_))), "{missed:?}");
    assert_eq!(
        port.in_flight(),
        0,
        "a ping that timed out still counts as a request in flight"
    );
    // The worker still serves.
    let echo = port
        .call(port.next_request_id(), "echo", 5.into(), None, None)
        .await
        .unwrap();
    assert_eq!(echo, Value::from(5));
    assert!(settles(&port, Duration::from_secs(5)).await);
    port.kill(PortError::Closed);
}
