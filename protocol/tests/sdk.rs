//! The Rust worker SDK, served over in-memory channels.

use std::cell::RefCell;
use std::io::Cursor;
use std::rc::Rc;

use wharf_protocol::frame::{decode, encode, read_frame, HEADER_LEN};
use wharf_protocol::message::kinds;
use wharf_protocol::worker::{HandlerError, ServeError, Worker};
use wharf_protocol::{FromWorker, InitStatus, ProtocolError, ToWorker, Value, PROTOCOL_VERSION};

const MAX: usize = 1 << 20;

fn input(msgs: &[ToWorker]) -> Cursor<Vec<u8>> {
    Cursor::new(msgs.iter().flat_map(|m| encode(m, MAX).unwrap()).collect())
}

fn replies(out: Vec<u8>) -> Vec<FromWorker> {
    let mut r = Cursor::new(out);
    let mut v = Vec::new();
    while let Some(payload) = read_frame(&mut r, MAX).unwrap() {
        v.push(decode(&payload).unwrap());
    }
    v
}

/// Serves `msgs` to `worker` at `max_frame`; returns how serving ended and every reply.
fn serve(
    worker: Worker,
    msgs: &[ToWorker],
    max_frame: usize,
) -> (Result<(), ServeError>, Vec<FromWorker>) {
    let mut out = Vec::new();
    let result = worker.serve_on(input(msgs), &mut out, max_frame);
    (result, replies(out))
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

fn init() -> ToWorker {
    ToWorker::Init { id: 0, version: 1 }
}

fn ok(id: u64, body: Value) -> FromWorker {
    FromWorker::Ok { id, body }
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
    let reset_runs = Rc::new(std::cell::Cell::new(0));
    let counter = reset_runs.clone();
    let worker = demo().on_reset(move || {
        counter.set(counter.get() + 1);
        Ok(())
    });
    let msgs = [
        init(),
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
    let (result, r) = serve(worker, &msgs, MAX);
    result.unwrap();
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
    assert_eq!(r[1], ok(1, Value::from("hi")));
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
    assert_eq!(r[6], ok(4, Value::from(2)));
    assert_eq!(r[7], ok(5, Value::Nil));
    assert_eq!(r[8], FromWorker::Pong { id: 6 });
    assert_eq!(r.len(), 9, "nothing after shutdown: {r:?}");
    assert_eq!(reset_runs.get(), 1);
}

#[test]
fn init_is_answered_with_an_ok_pong_and_sorted_methods() {
    let worker = Worker::new()
        .method("zeta", |_| Ok(Value::Nil))
        .method("alpha", |_| Ok(Value::Nil))
        .stream_method("mid", |_, _| Ok(Value::Nil))
        .method("Echo", |_| Ok(Value::Nil));
    let (result, r) = serve(worker, &[ToWorker::Init { id: 42, version: 1 }], MAX);
    result.unwrap();
    assert_eq!(
        r,
        [FromWorker::InitPong {
            id: 42,
            status: InitStatus::Ok,
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            methods: vec!["Echo".into(), "alpha".into(), "mid".into(), "zeta".into()],
            message: None,
            max_concurrency: None,
        }]
    );
    // And on the wire, `message` is absent rather than nil.
    let mut out = Vec::new();
    Worker::new()
        .serve_on(input(&[init()]), &mut out, MAX)
        .unwrap();
    let payload: Value = rmpv::decode::read_value(&mut &out[HEADER_LEN..]).unwrap();
    let keys: Vec<&str> = payload
        .as_map()
        .unwrap()
        .iter()
        .map(|(k, _)| k.as_str().unwrap())
        .collect();
    assert_eq!(keys, ["t", "id", "status", "version", "pid", "methods"]);
}

#[test]
fn init_hooks_run_before_the_pong() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let (a, b) = (log.clone(), log.clone());
    let worker = Worker::new()
        .on_init(move || {
            a.borrow_mut().push("first");
            Ok(())
        })
        .on_init(move || {
            b.borrow_mut().push("second");
            Ok(())
        });
    let (result, r) = serve(worker, &[init()], MAX);
    result.unwrap();
    assert_eq!(*log.borrow(), ["first", "second"]);
    assert!(matches!(
        r[..],
        [FromWorker::InitPong {
            status: InitStatus::Ok,
            ..
        }]
    ));
}

#[test]
fn echo_returns_the_body_and_the_call_is_passed_whole() {
    let seen = Rc::new(RefCell::new(None));
    let keep = seen.clone();
    let worker = Worker::new().method("echo", move |c| {
        *keep.borrow_mut() = Some(c.clone());
        Ok(c.body.clone())
    });
    let body = Value::Map(vec![
        (
            Value::from("a"),
            Value::Array(vec![Value::from(1), Value::F64(-0.5)]),
        ),
        (Value::from("b"), Value::Binary(vec![0, 255])),
    ]);
    let msg = ToWorker::Call {
        id: u64::MAX,
        method: "echo".into(),
        body: body.clone(),
        session: Some("s-1".into()),
        deadline_ms: Some(1500),
    };
    let (result, r) = serve(worker, &[msg], MAX);
    result.unwrap();
    assert_eq!(r, [ok(u64::MAX, body.clone())]);
    let call = seen.borrow_mut().take().unwrap();
    assert_eq!(call.id, u64::MAX);
    assert_eq!(call.method, "echo");
    assert_eq!(call.body, body);
    assert_eq!(call.session.as_deref(), Some("s-1"));
    assert_eq!(call.deadline_ms, Some(1500));
}

#[test]
fn an_unknown_method_is_an_error_and_the_worker_keeps_serving() {
    let (result, r) = serve(
        demo(),
        &[call(1, "nope", Value::Nil), call(2, "echo", Value::from(2))],
        MAX,
    );
    result.unwrap();
    match &r[0] {
        FromWorker::Error { id, kind, message } => {
            assert_eq!(*id, 1);
            assert_eq!(kind, kinds::UNKNOWN_METHOD);
            assert!(message.contains("nope"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r[1], ok(2, Value::from(2)));
    assert_eq!(r.len(), 2);
}

#[test]
fn a_handler_error_is_an_error_reply_and_the_worker_keeps_serving() {
    let (result, r) = serve(
        demo(),
        &[
            call(1, "fail", Value::Nil),
            call(2, "echo", Value::from("after")),
        ],
        MAX,
    );
    result.unwrap();
    assert_eq!(
        r,
        [
            FromWorker::Error {
                id: 1,
                kind: "RuntimeError".into(),
                message: "nope".into()
            },
            ok(2, Value::from("after")),
        ]
    );
}

#[test]
fn a_streaming_method_sends_numbered_chunks_then_its_result() {
    let (result, r) = serve(
        demo(),
        &[
            call(9, "count", Value::from(5)),
            call(10, "count", Value::from(0)),
        ],
        MAX,
    );
    result.unwrap();
    let mut want: Vec<FromWorker> = (0..5)
        .map(|i| FromWorker::Chunk {
            id: 9,
            seq: i,
            body: Value::from(i),
        })
        .collect();
    want.push(ok(9, Value::from(5)));
    want.push(ok(10, Value::from(0)));
    assert_eq!(r, want);
}

#[test]
fn a_stream_that_fails_ends_with_an_error_after_its_chunks() {
    let worker = Worker::new().stream_method("half", |_, sink| {
        sink.send(Value::from("first")).unwrap();
        Err(HandlerError::new(kinds::BAD_REQUEST, "second half missing"))
    });
    let (result, r) = serve(worker, &[call(3, "half", Value::Nil)], MAX);
    result.unwrap();
    assert_eq!(
        r,
        [
            FromWorker::Chunk {
                id: 3,
                seq: 0,
                body: Value::from("first")
            },
            FromWorker::Error {
                id: 3,
                kind: "bad_request".into(),
                message: "second half missing".into()
            },
        ]
    );
}

#[test]
fn a_chunk_over_max_frame_is_refused_to_the_handler() {
    let seen = Rc::new(RefCell::new(None));
    let keep = seen.clone();
    let worker = Worker::new().stream_method("s", move |_, sink| {
        *keep.borrow_mut() = Some(sink.send(Value::Binary(vec![0; 4096])));
        sink.send(Value::from("small")).unwrap();
        Ok(Value::Nil)
    });
    let (result, r) = serve(worker, &[call(1, "s", Value::Nil)], 1024);
    result.unwrap();
    assert!(matches!(
        seen.borrow_mut().take(),
        Some(Err(ProtocolError::Encode { .. }))
    ));
    // The refused chunk was not written and left no gap: seq stays contiguous from 0.
    assert_eq!(
        r,
        [
            FromWorker::Chunk {
                id: 1,
                seq: 0,
                body: Value::from("small")
            },
            ok(1, Value::Nil),
        ]
    );
}

#[test]
fn reset_runs_every_hook_and_replies_ok() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let (a, b) = (log.clone(), log.clone());
    let worker = demo()
        .on_reset(move || {
            a.borrow_mut().push("cache");
            Ok(())
        })
        .on_reset(move || {
            b.borrow_mut().push("session");
            Ok(())
        });
    let (result, r) = serve(
        worker,
        &[
            ToWorker::Reset {
                id: 1,
                session: Some("s".into()),
            },
            ToWorker::Reset {
                id: 2,
                session: None,
            },
        ],
        MAX,
    );
    result.unwrap();
    assert_eq!(r, [ok(1, Value::Nil), ok(2, Value::Nil)]);
    assert_eq!(*log.borrow(), ["cache", "session", "cache", "session"]);

    // No hooks at all: still ok.
    let (result, r) = serve(
        Worker::new(),
        &[ToWorker::Reset {
            id: 3,
            session: None,
        }],
        MAX,
    );
    result.unwrap();
    assert_eq!(r, [ok(3, Value::Nil)]);
}

#[test]
fn a_failing_reset_hook_is_an_error_reply() {
    let worker = demo().on_reset(|| Err(HandlerError::new("IOError", "disk gone")));
    let (result, r) = serve(
        worker,
        &[
            ToWorker::Reset {
                id: 1,
                session: None,
            },
            ToWorker::Ping { id: 2 },
        ],
        MAX,
    );
    result.unwrap();
    assert_eq!(
        r,
        [
            FromWorker::Error {
                id: 1,
                kind: "IOError".into(),
                message: "disk gone".into()
            },
            FromWorker::Pong { id: 2 },
        ]
    );
}

#[test]
fn ping_is_answered_with_pong_and_cancel_with_nothing() {
    let (result, r) = serve(
        demo(),
        &[
            ToWorker::Ping { id: 0 },
            ToWorker::Cancel { id: 5 },
            ToWorker::Ping { id: u64::MAX },
        ],
        MAX,
    );
    result.unwrap();
    assert_eq!(
        r,
        [
            FromWorker::Pong { id: 0 },
            FromWorker::Pong { id: u64::MAX }
        ]
    );
}

#[test]
fn shutdown_stops_serving_even_with_frames_after_it() {
    let (result, r) = serve(
        demo(),
        &[
            ToWorker::Ping { id: 1 },
            ToWorker::Shutdown { id: Some(2) },
            ToWorker::Ping { id: 3 },
            call(4, "echo", Value::Nil),
        ],
        MAX,
    );
    result.unwrap();
    assert_eq!(r, [FromWorker::Pong { id: 1 }]);

    // Frames after shutdown are not even read: garbage there goes unnoticed.
    let mut wire = encode(&ToWorker::Shutdown { id: None }, MAX).unwrap();
    wire.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    let mut out = Vec::new();
    demo().serve_on(&wire[..], &mut out, MAX).unwrap();
    assert!(out.is_empty());
}

#[test]
fn eof_ends_serving_cleanly() {
    let (result, r) = serve(demo(), &[], MAX);
    result.unwrap();
    assert!(r.is_empty());
    let (result, r) = serve(demo(), &[ToWorker::Ping { id: 1 }], MAX);
    result.unwrap();
    assert_eq!(r, [FromWorker::Pong { id: 1 }]);
}

#[test]
fn a_failing_init_hook_is_reported_and_stops_the_worker() {
    let worker = demo().on_init(|| Err(HandlerError::new("ImportError", "no model")));
    let (result, r) = serve(worker, &[init(), ToWorker::Ping { id: 1 }], MAX);
    match result {
        Err(ServeError::Init(reason)) => assert_eq!(reason, "ImportError: no model"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r,
        [FromWorker::InitPong {
            id: 0,
            status: InitStatus::Error,
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            methods: vec!["big".into(), "count".into(), "echo".into(), "fail".into()],
            message: Some("ImportError: no model".into()),
            max_concurrency: None,
        }],
        "nothing served after a failed init"
    );
}

#[test]
fn a_reply_over_max_frame_becomes_a_frame_too_large_error() {
    let (result, r) = serve(
        demo(),
        &[
            call(1, "big", Value::Nil),
            call(2, "echo", Value::from("still here")),
        ],
        1024,
    );
    result.unwrap();
    match &r[0] {
        FromWorker::Error { id, kind, message } => {
            assert_eq!(*id, 1);
            assert_eq!(kind, kinds::FRAME_TOO_LARGE);
            assert!(message.contains("1024"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r[1], ok(2, Value::from("still here")));

    // A handler *error* too large to send is replaced the same way.
    let worker = Worker::new().method("loud", |_| Err(HandlerError::new("E", "x".repeat(4096))));
    let (result, r) = serve(worker, &[call(3, "loud", Value::Nil)], 1024);
    result.unwrap();
    assert!(
        matches!(&r[..], [FromWorker::Error { id: 3, kind, .. }] if kind == kinds::FRAME_TOO_LARGE)
    );

    // An echo of a body that fits the request but not the reply, at the exact boundary: the
    // reply map is the request's minus "method": "echo", so it is smaller and always fits.
    let body = Value::Binary(vec![7; 900]);
    let request = call(4, "echo", body.clone());
    let exact = encode(&request, MAX).unwrap().len() - HEADER_LEN;
    let (result, r) = serve(demo(), &[request], exact);
    result.unwrap();
    assert_eq!(r, [ok(4, body)]);
}

#[test]
fn a_broken_frame_from_the_runtime_is_a_typed_error() {
    let mut out = Vec::new();
    let err = demo()
        .serve_on(Cursor::new(vec![0xff, 0xff, 0xff, 0xff]), &mut out, 1024)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ServeError::Protocol(ProtocolError::FrameTooLarge { .. })
        ),
        "{err:?}"
    );

    // A truncated frame after a good one: the good one is answered first.
    let mut wire = encode(&ToWorker::Ping { id: 1 }, MAX).unwrap();
    wire.extend_from_slice(&[0, 0, 0, 20, 0x82]);
    let mut out = Vec::new();
    let err = demo().serve_on(&wire[..], &mut out, MAX).unwrap_err();
    assert!(
        matches!(err, ServeError::Protocol(ProtocolError::Truncated { .. })),
        "{err:?}"
    );
    assert_eq!(replies(out), [FromWorker::Pong { id: 1 }]);

    // A message of the wrong direction, or an unknown one, is malformed.
    for payload in [encode(&FromWorker::Pong { id: 1 }, MAX).unwrap(), {
        let mut p = Vec::new();
        rmpv::encode::write_value(
            &mut p,
            &Value::Map(vec![(Value::from("t"), Value::from("reboot"))]),
        )
        .unwrap();
        let mut f = (p.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&p);
        f
    }] {
        let mut out = Vec::new();
        let err = demo().serve_on(&payload[..], &mut out, MAX).unwrap_err();
        assert!(
            matches!(err, ServeError::Protocol(ProtocolError::Malformed { .. })),
            "{err:?}"
        );
        assert!(out.is_empty());
    }
}

#[test]
fn a_broken_output_channel_is_an_io_error() {
    struct Closed;
    impl std::io::Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let err = demo()
        .serve_on(input(&[ToWorker::Ping { id: 1 }]), Closed, MAX)
        .unwrap_err();
    assert!(
        matches!(err, ServeError::Protocol(ProtocolError::Io(_))),
        "{err:?}"
    );
}

/// Under `serve_on` input is read only between calls: a handler sees its deadline through
/// `Call::check` all the same, and `Call::new` builds calls for testing handlers.
#[test]
fn call_check_reports_a_spent_deadline_and_a_new_call_is_never_cancelled() {
    let worker = Worker::new().method("wait", |c| {
        c.sleep(std::time::Duration::from_millis(
            c.body.as_u64().unwrap_or(0),
        ))?;
        Ok(c.body.clone())
    });
    let msgs = [ToWorker::Call {
        id: 1,
        method: "wait".into(),
        body: Value::from(60_000),
        session: None,
        deadline_ms: Some(0),
    }];
    let (result, r) = serve(worker, &msgs, MAX);
    result.unwrap();
    match &r[..] {
        [FromWorker::Error { id: 1, kind, .. }] => assert_eq!(kind, kinds::DEADLINE_EXCEEDED),
        other => panic!("{other:?}"),
    }

    let mut call = wharf_protocol::worker::Call::new(7, "wait", Value::from(1));
    assert!(!call.is_cancelled());
    assert_eq!(call.remaining(), None);
    assert!(call.check().is_ok());
    assert!(call.sleep(std::time::Duration::from_millis(1)).is_ok());
    call.deadline_ms = Some(0);
    let err = call.check().unwrap_err();
    assert_eq!(err.kind, kinds::DEADLINE_EXCEEDED);
}
