//! The Rust worker SDK served with its reader thread (`Worker::serve_on_threaded`, what
//! `Worker::serve` uses) over a socket pair: `cancel`, `deadline_ms`, EOF, `shutdown` and
//! violations while a call runs.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wharf_protocol::frame::{decode, encode, read_frame};
use wharf_protocol::message::kinds;
use wharf_protocol::worker::{ServeError, Worker};
use wharf_protocol::{FromWorker, InitStatus, ToWorker, Value};

const MAX: usize = 1 << 20;
/// How soon a call or the worker must stop (docs/protocol.md's exit bound).
const BOUND: Duration = Duration::from_secs(2);

/// The runtime's end of a worker served on a thread.
struct Peer {
    sock: UnixStream,
    worker: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Peer {
    fn start() -> Self {
        Self::serving(|w| w)
    }

    /// A worker with this file's methods, changed by `build`, served on a thread.
    fn serving(build: impl FnOnce(Worker) -> Worker + Send + 'static) -> Self {
        let (sock, theirs) = UnixStream::pair().unwrap();
        let worker = std::thread::spawn(move || {
            let output = theirs.try_clone().unwrap();
            build(Worker::new())
                .method("echo", |c| Ok(c.body.clone()))
                .method("wait", |c| {
                    let ms = c.body.as_u64().unwrap_or(0);
                    c.sleep(Duration::from_millis(ms))?;
                    Ok(Value::from(ms))
                })
                // Polls without sleeping, and replies ok once cancelled (cancel is best effort).
                .method("spin", |c| {
                    while !c.is_cancelled() {
                        std::hint::spin_loop();
                    }
                    Ok(Value::from("stopped"))
                })
                .serve_on_threaded(theirs, output, MAX)
        });
        let peer = Self {
            sock,
            worker: Some(worker),
        };
        peer.sock
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        peer
    }

    fn send(&mut self, msg: &ToWorker) {
        self.sock.write_all(&encode(msg, MAX).unwrap()).unwrap();
    }

    fn recv(&mut self) -> Option<FromWorker> {
        read_frame(&mut self.sock, MAX)
            .unwrap()
            .map(|p| decode(&p).unwrap())
    }

    fn call(&mut self, id: u64, method: &str, body: Value, deadline_ms: Option<u64>) {
        self.send(&ToWorker::Call {
            id,
            method: method.into(),
            body,
            session: None,
            deadline_ms,
        });
    }

    /// How serving ended; fails if the worker is still serving after `BOUND`.
    fn ended(&mut self) -> Result<(), ServeError> {
        let worker = self.worker.take().unwrap();
        let start = Instant::now();
        while !worker.is_finished() {
            assert!(start.elapsed() < BOUND, "still serving after {BOUND:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        worker.join().unwrap()
    }
}

fn error_kind(msg: Option<FromWorker>, id: u64) -> String {
    match msg {
        Some(FromWorker::Error { id: got, kind, .. }) if got == id => kind,
        other => panic!("expected an error reply to {id}, got {other:?}"),
    }
}

#[test]
fn a_watchdog_ends_serving_when_the_runtime_falls_silent() {
    let mut p = Peer::serving(|w| w.watchdog(Duration::from_millis(300)));
    p.send(&ToWorker::Init {
        id: 0,
        version: wharf_protocol::PROTOCOL_VERSION,
    });
    assert!(matches!(p.recv(), Some(FromWorker::InitPong { .. })));
    // Pinged every 0.1 s, it outlives its watchdog ...
    for id in 1..=8 {
        std::thread::sleep(Duration::from_millis(100));
        p.send(&ToWorker::Ping { id });
        assert_eq!(p.recv(), Some(FromWorker::Pong { id }));
    }
    // ... and silence ends it (the channel still open), as EOF would.
    assert!(p.ended().is_ok());
}

#[test]
fn a_cancel_stops_the_running_call_at_once() {
    let mut p = Peer::start();
    p.call(1, "wait", Value::from(60_000), None);
    std::thread::sleep(Duration::from_millis(50));
    let sent = Instant::now();
    p.send(&ToWorker::Cancel { id: 1 });
    assert_eq!(error_kind(p.recv(), 1), kinds::CANCELLED);
    assert!(sent.elapsed() < BOUND);
    // A cancel of a call that has ended, and one naming another call, change nothing.
    p.send(&ToWorker::Cancel { id: 1 });
    p.call(2, "wait", Value::from(50), None);
    p.send(&ToWorker::Cancel { id: 99 });
    assert_eq!(
        p.recv(),
        Some(FromWorker::Ok {
            id: 2,
            body: Value::from(50)
        })
    );
}

#[test]
fn a_handler_that_polls_sees_the_cancel_and_may_still_reply_ok() {
    let mut p = Peer::start();
    p.call(1, "spin", Value::Nil, None);
    p.send(&ToWorker::Cancel { id: 1 });
    assert_eq!(
        p.recv(),
        Some(FromWorker::Ok {
            id: 1,
            body: Value::from("stopped")
        })
    );
}

#[test]
fn deadline_ms_ends_the_call_with_deadline_exceeded_not_before() {
    let mut p = Peer::start();
    let sent = Instant::now();
    p.call(1, "wait", Value::from(60_000), Some(150));
    assert_eq!(error_kind(p.recv(), 1), kinds::DEADLINE_EXCEEDED);
    let took = sent.elapsed();
    assert!(took >= Duration::from_millis(150), "{took:?}");
    assert!(took < Duration::from_millis(150) + BOUND, "{took:?}");
}

#[test]
fn messages_sent_while_a_call_runs_are_handled_after_it_in_order() {
    let mut p = Peer::start();
    p.call(1, "wait", Value::from(60_000), None);
    p.send(&ToWorker::Ping { id: 2 });
    p.call(3, "echo", Value::from("next"), None);
    p.send(&ToWorker::Cancel { id: 1 });
    assert_eq!(error_kind(p.recv(), 1), kinds::CANCELLED);
    assert_eq!(p.recv(), Some(FromWorker::Pong { id: 2 }));
    assert_eq!(
        p.recv(),
        Some(FromWorker::Ok {
            id: 3,
            body: Value::from("next")
        })
    );
}

#[test]
fn eof_while_a_call_runs_cancels_it_and_ends_serving_cleanly() {
    let mut p = Peer::start();
    p.call(1, "wait", Value::from(60_000), None);
    std::thread::sleep(Duration::from_millis(50));
    p.sock.shutdown(Shutdown::Write).unwrap();
    p.ended().unwrap();
}

#[test]
fn shutdown_while_a_call_runs_cancels_it_and_ends_serving_cleanly() {
    let mut p = Peer::start();
    p.call(1, "wait", Value::from(60_000), None);
    p.send(&ToWorker::Shutdown { id: None });
    p.ended().unwrap();
}

#[test]
fn a_violation_while_a_call_runs_cancels_it_and_ends_serving_with_an_error() {
    let cases: [&[u8]; 3] = [
        &[0xff, 0xff, 0xff, 0xff],       // over max_frame
        &[0, 0, 0, 3, 0x81, 0xc1, 0xc1], // not MessagePack
        &[0, 0, 0, 4, 0x93, 1, 2, 3],    // not a map
    ];
    for bytes in cases {
        let mut p = Peer::start();
        p.call(1, "wait", Value::from(60_000), None);
        p.sock.write_all(bytes).unwrap();
        match p.ended() {
            Err(ServeError::Protocol(e)) => assert!(e.is_violation(), "{e}"),
            other => panic!("{bytes:02x?}: {other:?}"),
        }
    }
    // Half a frame, then EOF.
    let mut p = Peer::start();
    p.call(1, "wait", Value::from(60_000), None);
    p.sock.write_all(&[0, 0, 0, 100, 0x82]).unwrap();
    p.sock.shutdown(Shutdown::Write).unwrap();
    assert!(matches!(p.ended(), Err(ServeError::Protocol(_))));
}

#[test]
fn an_init_of_another_version_is_answered_with_ours() {
    let mut p = Peer::start();
    p.send(&ToWorker::Init { id: 0, version: 2 });
    match p.recv() {
        Some(FromWorker::InitPong {
            status, version, ..
        }) => assert_eq!((status, version), (InitStatus::Ok, 1)),
        other => panic!("{other:?}"),
    }
    p.call(1, "echo", Value::from(1), None);
    assert_eq!(
        p.recv(),
        Some(FromWorker::Ok {
            id: 1,
            body: Value::from(1)
        })
    );
}

/// A worker serving up to `n` calls at once, with concurrent methods: `meet` returns only once
/// `n` calls of it are running together (so it cannot pass one call at a time), `wait` sleeps,
/// `boom` panics.
fn concurrent(n: usize) -> Peer {
    let meeting = Arc::new(Barrier::new(n));
    Peer::serving(move |w| {
        w.max_concurrency(n)
            .concurrent_method("meet", move |c| {
                meeting.wait();
                Ok(c.body.clone())
            })
            .concurrent_method("nap", |c| {
                c.sleep(Duration::from_millis(c.body.as_u64().unwrap_or(0)))?;
                Ok(c.body.clone())
            })
            .concurrent_method("boom", |_| panic!("boom went the handler"))
    })
}

fn init(p: &mut Peer) -> Option<u32> {
    p.send(&ToWorker::Init { id: 0, version: 1 });
    match p.recv() {
        Some(FromWorker::InitPong {
            status: InitStatus::Ok,
            max_concurrency,
            ..
        }) => max_concurrency,
        other => panic!("expected an init pong, got {other:?}"),
    }
}

/// Replies to `n` calls, by id.
fn replies(p: &mut Peer, n: usize) -> BTreeMap<u64, FromWorker> {
    (0..n)
        .map(|_| {
            let reply = p.recv().expect("a reply");
            (reply.id(), reply)
        })
        .collect()
}

#[test]
fn a_concurrent_worker_declares_its_concurrency_and_serves_that_many_calls_at_once() {
    let mut p = concurrent(4);
    assert_eq!(init(&mut p), Some(4));
    // Four calls that each wait for the other three: served one at a time, none would return.
    for id in 1..=4 {
        p.call(id, "meet", Value::from(id), None);
    }
    let got = replies(&mut p, 4);
    for id in 1..=4 {
        assert_eq!(
            got.get(&id),
            Some(&FromWorker::Ok {
                id,
                body: Value::from(id)
            })
        );
    }
}

#[test]
fn concurrent_calls_reply_as_they_finish_and_a_cancel_stops_only_its_call() {
    let mut p = concurrent(3);
    init(&mut p);
    p.call(1, "nap", Value::from(60_000), None);
    p.call(2, "nap", Value::from(60_000), None);
    p.call(3, "nap", Value::from(20), None);
    // The short one answers first, though it came last.
    assert_eq!(
        p.recv(),
        Some(FromWorker::Ok {
            id: 3,
            body: Value::from(20)
        })
    );
    // A ping is answered while two calls run.
    p.send(&ToWorker::Ping { id: 9 });
    assert_eq!(p.recv(), Some(FromWorker::Pong { id: 9 }));
    p.send(&ToWorker::Cancel { id: 2 });
    assert_eq!(error_kind(p.recv(), 2), kinds::CANCELLED);
    p.send(&ToWorker::Cancel { id: 1 });
    assert_eq!(error_kind(p.recv(), 1), kinds::CANCELLED);
}

#[test]
fn a_panicking_concurrent_handler_fails_its_call_and_the_worker_keeps_serving() {
    let mut p = concurrent(2);
    init(&mut p);
    p.call(1, "boom", Value::Nil, None);
    match p.recv() {
        Some(FromWorker::Error {
            id: 1,
            kind,
            message,
        }) => {
            assert_eq!(kind, "panic");
            assert!(message.contains("boom went the handler"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Both handler threads still serve.
    p.call(2, "meet", Value::from(2), None);
    p.call(3, "meet", Value::from(3), None);
    assert_eq!(replies(&mut p, 2).len(), 2);
    p.call(4, "echo", Value::from(4), None);
    assert_eq!(
        p.recv(),
        Some(FromWorker::Ok {
            id: 4,
            body: Value::from(4)
        })
    );
}

#[test]
fn eof_with_concurrent_calls_running_cancels_them_and_ends_serving_cleanly() {
    let mut p = concurrent(2);
    init(&mut p);
    p.call(1, "nap", Value::from(60_000), None);
    p.call(2, "nap", Value::from(60_000), None);
    std::thread::sleep(Duration::from_millis(50));
    p.sock.shutdown(Shutdown::Write).unwrap();
    p.ended().unwrap();
}

#[test]
fn without_max_concurrency_concurrent_methods_run_one_at_a_time_and_none_is_declared() {
    let mut p = Peer::serving(|w| {
        w.concurrent_method("nap", |c| {
            c.sleep(Duration::from_millis(c.body.as_u64().unwrap_or(0)))?;
            Ok(c.body.clone())
        })
    });
    assert_eq!(init(&mut p), None);
    p.call(1, "nap", Value::from(100), None);
    p.call(2, "nap", Value::from(0), None);
    // One at a time: the second answers after the first, though it is shorter.
    assert_eq!(p.recv().map(|r| r.id()), Some(1));
    assert_eq!(p.recv().map(|r| r.id()), Some(2));
}
