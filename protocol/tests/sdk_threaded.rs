//! The Rust worker SDK served with its reader thread (`Worker::serve_on_threaded`, what
//! `Worker::serve` uses) over a socket pair: `cancel`, `deadline_ms`, EOF, `shutdown` and
//! violations while a call runs.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
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
        Self::start_with(|w| w)
    }

    /// A worker set up by `setup` (a watchdog set, say) before its methods are added.
    fn start_with(setup: fn(Worker) -> Worker) -> Self {
        let (sock, theirs) = UnixStream::pair().unwrap();
        let worker = std::thread::spawn(move || {
            let output = theirs.try_clone().unwrap();
            setup(Worker::new())
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
    let mut p = Peer::start_with(|w| w.watchdog(Duration::from_millis(300)));
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
