//! The Rust worker SDK, served over in-memory channels.

use std::io::Cursor;

use wharf_protocol::frame::{decode, encode, read_frame};
use wharf_protocol::worker::{HandlerError, ServeError, Worker};
use wharf_protocol::{FromWorker, InitStatus, ToWorker, Value};

fn input(msgs: &[ToWorker]) -> Cursor<Vec<u8>> {
    Cursor::new(
        msgs.iter()
            .flat_map(|m| encode(m, 1 << 20).unwrap())
            .collect(),
    )
}

fn replies(out: Vec<u8>) -> Vec<FromWorker> {
    let mut r = Cursor::new(out);
    let mut v = Vec::new();
    while let Some(payload) = read_frame(&mut r, 1 << 20).unwrap() {
        v.push(decode(&payload).unwrap());
    }
    v
}

fn call(id: u64, method: &str, body: Value) -> ToWorker {
    ToWorker::Call {
        id,
        method: method.into(),
        body,
        session: None,
        deadline_ms: None,
    }
}

fn demo() -> Worker {
    Worker::new()
        .method("echo", |c| Ok(c.body.clone()))
        .method("fail", |_| Err(HandlerError::new("RuntimeError", "nope")))
        .method("big", |_| Ok(Value::Binary(vec![0; 4096])))
        .stream_method("count", |c, sink| {
            let n = c.body.as_u64().unwrap_or(0);
            for i in 0..n {
                sink.send(Value::from(i)).unwrap();
            }
            Ok(Value::from(n))
        })
}

#[test]
fn serves_the_whole_protocol() {
    let reset_runs = std::rc::Rc::new(std::cell::Cell::new(0));
    let counter = reset_runs.clone();
    let worker = demo().on_reset(move || {
        counter.set(counter.get() + 1);
        Ok(())
    });
    let msgs = [
        ToWorker::Init { id: 0, version: 1 },
        call(1, "echo", Value::from("hi")),
        call(2, "nope", Value::Nil),
        call(3, "fail", Value::Nil),
        call(4, "count", Value::from(2)),
        ToWorker::Reset {
            id: 5,
            session: None,
        },
        ToWorker::Ping { id: 6 },
        ToWorker::Cancel { id: 4 },
        ToWorker::Shutdown { id: None },
        call(7, "echo", Value::from("never served")),
    ];
    let mut out = Vec::new();
    worker.serve_on(input(&msgs), &mut out, 1 << 20).unwrap();
    let r = replies(out);
    match &r[0] {
        FromWorker::InitPong {
            status,
            methods,
            pid,
            ..
        } => {
            assert_eq!(*status, InitStatus::Ok);
            assert_eq!(methods, &["big", "count", "echo", "fail"]);
            assert_eq!(*pid, std::process::id());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r[1],
        FromWorker::Ok {
            id: 1,
            body: Value::from("hi")
        }
    );
    assert!(matches!(&r[2], FromWorker::Error { id: 2, kind, .. } if kind == "unknown_method"));
    assert!(matches!(&r[3], FromWorker::Error { id: 3, kind, .. } if kind == "RuntimeError"));
    assert_eq!(
        r[4],
        FromWorker::Chunk {
            id: 4,
            seq: 0,
            body: Value::from(0)
        }
    );
    assert_eq!(
        r[5],
        FromWorker::Chunk {
            id: 4,
            seq: 1,
            body: Value::from(1)
        }
    );
    assert_eq!(
        r[6],
        FromWorker::Ok {
            id: 4,
            body: Value::from(2)
        }
    );
    assert_eq!(
        r[7],
        FromWorker::Ok {
            id: 5,
            body: Value::Nil
        }
    );
    assert_eq!(r[8], FromWorker::Pong { id: 6 });
    assert_eq!(r.len(), 9, "nothing after shutdown: {r:?}");
    assert_eq!(reset_runs.get(), 1);
}

#[test]
fn a_failing_init_hook_is_reported_and_stops_the_worker() {
    let worker = demo().on_init(|| Err(HandlerError::new("ImportError", "no model")));
    let mut out = Vec::new();
    let err = worker
        .serve_on(
            input(&[ToWorker::Init { id: 0, version: 1 }]),
            &mut out,
            1 << 20,
        )
        .unwrap_err();
    assert!(matches!(err, ServeError::Init(_)));
    match &replies(out)[0] {
        FromWorker::InitPong {
            status, message, ..
        } => {
            assert_eq!(*status, InitStatus::Error);
            assert_eq!(message.as_deref(), Some("ImportError: no model"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_reply_over_max_frame_becomes_an_error() {
    let mut out = Vec::new();
    demo()
        .serve_on(input(&[call(1, "big", Value::Nil)]), &mut out, 1024)
        .unwrap();
    assert!(
        matches!(&replies(out)[0], FromWorker::Error { id: 1, kind, .. } if kind == "frame_too_large")
    );
}

#[test]
fn a_broken_frame_from_the_runtime_is_a_typed_error() {
    let mut out = Vec::new();
    let err = demo()
        .serve_on(Cursor::new(vec![0xff, 0xff, 0xff, 0xff]), &mut out, 1024)
        .unwrap_err();
    assert!(matches!(err, ServeError::Protocol(_)), "{err:?}");
}
