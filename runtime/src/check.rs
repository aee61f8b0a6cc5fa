//! The conformance checker behind `wharf check`: the executable form of `docs/protocol.md`.
//!
//! It starts a worker command through the process port and drives it through the protocol:
//! the handshake, echo of assorted MessagePack values, errors that must leave the worker
//! serving, ping, reset, streaming (if offered), and clean exits on `shutdown` and on EOF. Each
//! check is bounded by a timeout, so a hung worker fails a check instead of hanging the
//! checker. A worker that dies or breaks the protocol fails the check at hand; the next check
//! gets a fresh worker.

use std::time::Duration;

use wharf_actors::port::{PortError, ProcessPort, ProcessSpec, StreamEvent};
use wharf_protocol::{Value, PROTOCOL_VERSION};

/// How the checker runs.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// How long the worker may take to answer the init ping.
    pub init_timeout: Duration,
    /// How long each check may take.
    pub timeout: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            init_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The worker did what the protocol asks.
    Pass,
    /// It did not; the reason says what happened.
    Fail(String),
    /// The check does not apply (or could not run); the reason says why.
    Skip(String),
}

/// One named check and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The check's name, e.g. `echo_int_edges`.
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
}

/// Every check's result, in the order they ran.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// The results.
    pub results: Vec<CheckResult>,
}

impl CheckReport {
    /// Checks that passed.
    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Pass))
    }

    /// Checks that failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Fail(_)))
    }

    /// Checks that were skipped.
    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skip(_)))
    }

    /// Whether no check failed.
    pub fn all_passed(&self) -> bool {
        self.failed() == 0
    }

    /// The outcome of the named check, if it ran.
    pub fn outcome(&self, name: &str) -> Option<&Outcome> {
        self.results
            .iter()
            .find(|r| r.name == name)
            .map(|r| &r.outcome)
    }

    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.outcome)).count()
    }

    fn push(&mut self, name: &str, outcome: Outcome) {
        self.results.push(CheckResult {
            name: name.to_owned(),
            outcome,
        });
    }
}

/// The values echoed, one check each.
fn echo_cases() -> Vec<(&'static str, Value)> {
    let map = |pairs: Vec<(&str, Value)>| {
        Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (Value::from(k), v))
                .collect(),
        )
    };
    vec![
        ("echo_nil", Value::Nil),
        (
            "echo_bool",
            Value::Array(vec![Value::from(true), Value::from(false)]),
        ),
        (
            "echo_int_edges",
            Value::Array(vec![
                Value::from(0),
                Value::from(-1),
                Value::from(-32),
                Value::from(-33),
                Value::from(127),
                Value::from(128),
                Value::from(255),
                Value::from(256),
                Value::from(65535),
                Value::from(65536),
                Value::from(u32::MAX),
                Value::from(i64::MIN),
                Value::from(i64::MAX),
                Value::from(u64::MAX),
            ]),
        ),
        (
            "echo_floats",
            Value::Array(vec![
                Value::F64(0.0),
                Value::F64(-1.5),
                Value::F64(f64::MAX),
                Value::F64(f64::MIN_POSITIVE),
                Value::F64(f64::INFINITY),
            ]),
        ),
        (
            "echo_str",
            Value::Array(vec![
                Value::from(""),
                Value::from("hello"),
                Value::from("héllo wörld ✓ 漢字 🚢"),
                Value::from("x".repeat(300)),
            ]),
        ),
        (
            "echo_bin",
            Value::Array(vec![
                Value::Binary(vec![]),
                Value::Binary((0..=255u8).collect()),
            ]),
        ),
        (
            "echo_nested",
            map(vec![
                (
                    "a",
                    Value::Array(vec![Value::from(1), map(vec![("b", Value::Nil)])]),
                ),
                (
                    "c",
                    map(vec![("d", map(vec![("e", Value::Array(vec![]))]))]),
                ),
                ("", Value::from("empty key")),
            ]),
        ),
        ("echo_1mib", Value::Binary(vec![0xA5; 1024 * 1024])),
    ]
}

/// Runs every check against workers started from `spec`.
pub async fn run_checks(spec: ProcessSpec, opts: &CheckOptions) -> CheckReport {
    let spec = spec.init_timeout(opts.init_timeout).worker_id("check");
    let mut report = CheckReport::default();
    let mut runner = Runner {
        spec,
        opts: opts.clone(),
        port: None,
    };

    // Handshake: nothing else can run without it.
    let port = match runner.fresh().await {
        Ok(port) => port,
        Err(e) => {
            report.push("handshake", Outcome::Fail(e.to_string()));
            report.push("rest", Outcome::Skip("no worker became ready".into()));
            return report;
        }
    };
    let info = port.info().clone();
    let handshake = if info.version != PROTOCOL_VERSION {
        Outcome::Fail(format!(
            "version {} (expected {PROTOCOL_VERSION})",
            info.version
        ))
    } else if info.pid == 0 {
        Outcome::Fail("init_pong pid is 0".into())
    } else if !info.methods.iter().any(|m| m == "echo") || !info.methods.iter().any(|m| m == "fail")
    {
        Outcome::Fail(format!(
            "methods {:?} must include echo and fail (docs/protocol.md, section 6)",
            info.methods
        ))
    } else {
        Outcome::Pass
    };
    report.push("handshake", handshake);

    for (name, value) in echo_cases() {
        let outcome = runner.echo(value).await;
        report.push(name, outcome);
    }

    let outcome = runner
        .expect_remote("wharf.no_such_method", Some("unknown_method"))
        .await;
    report.push("unknown_method", outcome);
    let outcome = runner.expect_remote("fail", None).await;
    report.push("handler_error", outcome);

    let outcome = runner
        .with_port(|port, t| async move { port.ping(t).await.map(|_| Outcome::Pass) })
        .await;
    report.push("ping", outcome);
    let outcome = runner
        .with_port(|port, t| async move { port.reset(None, t).await.map(|_| Outcome::Pass) })
        .await;
    report.push("reset", outcome);

    if info.methods.iter().any(|m| m == "stream") {
        let outcome = runner.stream().await;
        report.push("stream", outcome);
    } else {
        report.push(
            "stream",
            Outcome::Skip("the worker offers no `stream` method".into()),
        );
    }

    let outcome = runner.exits(true).await;
    report.push("shutdown_exits", outcome);
    let outcome = runner.exits(false).await;
    report.push("eof_exits", outcome);
    report
}

struct Runner {
    spec: ProcessSpec,
    opts: CheckOptions,
    port: Option<ProcessPort>,
}

impl Runner {
    /// A fresh worker, replacing the current one.
    async fn fresh(&mut self) -> Result<&ProcessPort, PortError> {
        if let Some(old) = self.port.take() {
            old.kill().await;
        }
        let port = ProcessPort::spawn(&self.spec).await?;
        Ok(self.port.insert(port))
    }

    /// The current worker if it is still usable, else a fresh one.
    async fn port(&mut self) -> Result<&ProcessPort, PortError> {
        if self.port.as_ref().is_some_and(ProcessPort::is_open) {
            return Ok(self.port.as_ref().expect("checked above"));
        }
        self.fresh().await
    }

    /// Runs `f` on a usable worker under the per-check timeout.
    async fn with_port<'a, F, Fut>(&'a mut self, f: F) -> Outcome
    where
        F: FnOnce(&'a ProcessPort, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<Outcome, PortError>> + 'a,
    {
        let timeout = self.opts.timeout;
        let port = match self.port().await {
            Ok(port) => port,
            Err(e) => return Outcome::Fail(format!("no worker: {e}")),
        };
        match tokio::time::timeout(timeout, f(port, timeout)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => Outcome::Fail(e.to_string()),
            Err(_) => Outcome::Fail(format!("no answer within {timeout:?}")),
        }
    }

    async fn call(
        &mut self,
        method: &'static str,
        body: Value,
    ) -> Result<Result<Value, PortError>, Outcome> {
        let timeout = self.opts.timeout;
        let port = self
            .port()
            .await
            .map_err(|e| Outcome::Fail(format!("no worker: {e}")))?;
        let id = port.next_request_id();
        tokio::time::timeout(timeout, port.call(id, method, body, None, None))
            .await
            .map_err(|_| Outcome::Fail(format!("no answer within {timeout:?}")))
    }

    async fn echo(&mut self, value: Value) -> Outcome {
        match self.call("echo", value.clone()).await {
            Err(outcome) => outcome,
            Ok(Ok(back)) if back == value => Outcome::Pass,
            Ok(Ok(back)) => Outcome::Fail(format!(
                "echo returned {} instead of {}",
                short(&back),
                short(&value)
            )),
            Ok(Err(e)) => Outcome::Fail(e.to_string()),
        }
    }

    /// Calls a method that must fail with a typed error (of `kind`, if given); the worker must
    /// then still answer an echo.
    async fn expect_remote(&mut self, method: &'static str, kind: Option<&str>) -> Outcome {
        let first = match self.call(method, Value::from("wharf check")).await {
            Err(outcome) => return outcome,
            Ok(r) => r,
        };
        match first {
            Err(PortError::Remote { kind: got, .. }) if got.is_empty() => {
                return Outcome::Fail("error reply with an empty kind".into())
            }
            Err(PortError::Remote { kind: got, .. }) if kind.is_some_and(|k| k != got) => {
                return Outcome::Fail(format!(
                    "error kind {got:?}, expected {:?}",
                    kind.unwrap_or("")
                ))
            }
            Err(PortError::Remote { .. }) => {}
            Ok(v) => {
                return Outcome::Fail(format!(
                    "{method} succeeded with {}; expected an error reply",
                    short(&v)
                ))
            }
            Err(e) => return Outcome::Fail(e.to_string()),
        }
        match self.echo(Value::from("still serving")).await {
            Outcome::Pass => Outcome::Pass,
            Outcome::Fail(why) => {
                Outcome::Fail(format!("worker stopped serving after the error: {why}"))
            }
            skip => skip,
        }
    }

    async fn stream(&mut self) -> Outcome {
        let n = 5u64;
        self.with_port(|port, _| async move {
            let id = port.next_request_id();
            let body = Value::Map(vec![(Value::from("n"), Value::from(n))]);
            let mut rx = port.call_stream(id, "stream", body, None, None).await?;
            let mut next_seq = 0;
            while let Some(event) = rx.recv().await {
                match event {
                    StreamEvent::Chunk { seq, body } => {
                        if seq != next_seq || body != Value::from(seq) {
                            return Ok(Outcome::Fail(format!(
                                "chunk seq {seq} body {}; expected seq {next_seq} body {next_seq}",
                                short(&body)
                            )));
                        }
                        next_seq += 1;
                    }
                    StreamEvent::End(Ok(body)) if next_seq == n && body == Value::from(n) => {
                        return Ok(Outcome::Pass)
                    }
                    StreamEvent::End(Ok(body)) => {
                        return Ok(Outcome::Fail(format!(
                            "stream ended after {next_seq} chunks with {}; expected {n} chunks then {n}",
                            short(&body)
                        )))
                    }
                    StreamEvent::End(Err(e)) => return Err(e),
                }
            }
            Ok(Outcome::Fail("stream ended without a final reply".into()))
        })
        .await
    }

    /// A fresh worker must exit with status 0 on its own after a `shutdown` message (with the
    /// channel left open) or after EOF on its input.
    async fn exits(&mut self, by_shutdown_message: bool) -> Outcome {
        let timeout = self.opts.timeout;
        let port = match self.fresh().await {
            Ok(port) => port,
            Err(e) => return Outcome::Fail(format!("no worker: {e}")),
        };
        if by_shutdown_message {
            if let Err(e) = port.request_shutdown().await {
                return Outcome::Fail(e.to_string());
            }
        } else {
            port.close_channel().await;
        }
        let status = port.wait_exit(timeout).await;
        let outcome = match status {
            Some(s) if s.code() == Some(0) => Outcome::Pass,
            Some(s) => Outcome::Fail(format!("worker ended with {s}, expected exit status 0")),
            None => Outcome::Fail(format!("worker still running {timeout:?} later")),
        };
        if let Some(port) = self.port.take() {
            port.kill().await;
        }
        outcome
    }
}

/// A value's debug form, cut short for messages.
fn short(v: &Value) -> String {
    let s = format!("{v}");
    if s.len() > 80 {
        let head: String = s.chars().take(80).collect();
        format!("{head}... ({} chars)", s.len())
    } else {
        s
    }
}
