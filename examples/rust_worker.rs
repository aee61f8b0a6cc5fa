//! A wharf worker written in Rust on the `wharf_protocol::worker` SDK.
//!
//! It offers the conformance methods (`echo`, `fail`, `stream`) plus `pid` and per-session state
//! (`state_set` / `state_get`, cleared by `reset`). Check it with
//! `cargo run --bin wharf -- check -- target/debug/wharf-example-worker`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use wharf_protocol::worker::{HandlerError, Value, Worker};

/// Reads a string field from a map body.
fn field<'a>(body: &'a Value, key: &str) -> Option<&'a Value> {
    body.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

fn bad_request(what: &str) -> HandlerError {
    HandlerError::new("bad_request", what)
}

fn main() {
    // Session state lives in the worker; `reset` (a session ended) must clear it.
    let state: Rc<RefCell<HashMap<String, Value>>> = Rc::default();
    let (set, get, reset) = (state.clone(), state.clone(), state);

    let served = Worker::new()
        .method("echo", |call| Ok(call.body.clone()))
        .method("fail", |call| {
            Err(HandlerError::new(
                "RuntimeError",
                format!("requested failure: {}", call.body),
            ))
        })
        .method("pid", |_| Ok(Value::from(std::process::id())))
        .method("state_set", move |call| {
            let key = field(&call.body, "key")
                .and_then(Value::as_str)
                .ok_or_else(|| bad_request("key"))?;
            let value = field(&call.body, "value").cloned().unwrap_or(Value::Nil);
            set.borrow_mut().insert(key.to_owned(), value);
            Ok(Value::Nil)
        })
        .method("state_get", move |call| {
            let key = field(&call.body, "key")
                .and_then(Value::as_str)
                .ok_or_else(|| bad_request("key"))?;
            Ok(get.borrow().get(key).cloned().unwrap_or(Value::Nil))
        })
        .stream_method("stream", |call, chunks| {
            let n = field(&call.body, "n")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad_request("n"))?;
            for i in 0..n {
                chunks
                    .send(Value::from(i))
                    .map_err(|e| HandlerError::new("io", e.to_string()))?;
            }
            Ok(Value::from(n))
        })
        .on_reset(move || {
            reset.borrow_mut().clear();
            Ok(())
        })
        .serve();
    if let Err(e) = served {
        eprintln!("rust_worker: {e}");
        std::process::exit(2);
    }
}
