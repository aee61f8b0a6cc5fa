//! A wharf worker written in Rust on the `wharf_protocol::worker` SDK: copy this to start one.
//!
//! Methods:
//! - `echo`: returns its body; `fail`: always fails; `stream` with `{"n": k}`: chunks 0..k,
//!   then `k`. These, `wait` and the state methods are the conformance methods `wharf check`
//!   needs (docs/protocol.md §6).
//! - `wait` with `{"ms": k}`: runs up to k ms, ending early with error kind `cancelled` when
//!   the runtime cancels it, or `deadline_exceeded` when its `deadline_ms` runs out (the
//!   conformance method for cancel and deadlines).
//! - `pid`: the worker's process id.
//! - `state_set` `{"key": str, "value": any}` / `state_get` `{"key": str}`: per-session state,
//!   cleared when the runtime sends `reset` (the session using this worker ended).
//!
//! `echo` and `wait` are stateless, so they are registered as concurrent methods: started with
//! `--max-concurrency N`, the worker declares N in its init pong and serves up to N of them at
//! once on handler threads (the other methods still run one at a time).
//!
//! Check it (fds 3/4, then stdin/stdout, then serving 4 calls at once):
//! ```text
//! cargo build --bin wharf-example-worker
//! cargo run --bin wharf -- check -- target/debug/wharf-example-worker
//! cargo run --bin wharf -- check --stdio -- target/debug/wharf-example-worker
//! cargo run --bin wharf -- check -- target/debug/wharf-example-worker --max-concurrency 4
//! ```

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use wharf_protocol::worker::{Call, HandlerError, Value, Worker};

/// The value under `key` in a map body.
fn field<'a>(call: &'a Call, key: &str) -> Option<&'a Value> {
    call.body
        .as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// A `bad_request` error (the body does not fit the method) naming the missing field.
fn missing(key: &str) -> HandlerError {
    HandlerError::new("bad_request", format!("the body needs a {key:?} field"))
}

/// `--max-concurrency N` from the command line (1 without it).
fn max_concurrency() -> usize {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--max-concurrency") {
        None => 1,
        Some(i) => match args.get(i + 1).and_then(|n| n.parse().ok()) {
            Some(n) => n,
            None => {
                eprintln!("rust_worker: --max-concurrency needs a number");
                std::process::exit(2);
            }
        },
    }
}

fn main() {
    // Methods registered with `method` run one at a time on this thread, so their state is
    // shared with Rc<RefCell<..>>; concurrent methods must be `Send + Sync`.
    let state: Rc<RefCell<HashMap<String, Value>>> = Rc::default();
    let (for_set, for_get, for_reset) = (state.clone(), state.clone(), state);

    let served = Worker::new()
        .max_concurrency(max_concurrency())
        .concurrent_method("echo", |call| Ok(call.body.clone()))
        // A handler error becomes an `error` reply; the worker keeps serving.
        .method("fail", |call| {
            Err(HandlerError::new(
                "RuntimeError",
                format!("failed on request: {}", call.body),
            ))
        })
        // Cancellation is cooperative: `Call::sleep` (like `Call::check`) ends the call with
        // the protocol's error kind once it is cancelled or out of time.
        .concurrent_method("wait", |call| {
            let ms = field(call, "ms")
                .and_then(Value::as_u64)
                .ok_or_else(|| missing("ms"))?;
            call.sleep(Duration::from_millis(ms))?;
            Ok(Value::from(ms))
        })
        .method("pid", |_| Ok(Value::from(std::process::id())))
        .method("state_set", move |call| {
            let key = field(call, "key")
                .and_then(Value::as_str)
                .ok_or_else(|| missing("key"))?;
            let value = field(call, "value").cloned().unwrap_or(Value::Nil);
            for_set.borrow_mut().insert(key.to_owned(), value);
            Ok(Value::Nil)
        })
        .method("state_get", move |call| {
            let key = field(call, "key")
                .and_then(Value::as_str)
                .ok_or_else(|| missing("key"))?;
            Ok(for_get.borrow().get(key).cloned().unwrap_or(Value::Nil))
        })
        // A streaming method sends chunks (seq 0, 1, ... is numbered by the SDK), then returns
        // the call's final result.
        .stream_method("stream", |call, chunks| {
            let n = field(call, "n")
                .and_then(Value::as_u64)
                .ok_or_else(|| missing("n"))?;
            for i in 0..n {
                chunks
                    .send(Value::from(i))
                    .map_err(|e| HandlerError::new("io", e.to_string()))?;
            }
            Ok(Value::from(n))
        })
        // `reset` means the session ended: drop everything it left behind.
        .on_reset(move || {
            for_reset.borrow_mut().clear();
            Ok(())
        })
        // Serves until EOF or `shutdown` (then returns Ok and we exit 0). Log with eprintln!:
        // in stdio mode stdout carries the frames.
        .serve();
    if let Err(e) = served {
        eprintln!("rust_worker: {e}");
        std::process::exit(2);
    }
}
