//! The conformance checker behind `wharf check`: the executable form of `docs/protocol.md`.
//!
//! [`run_checks`] starts a worker command through the process port
//! ([`Port`]) and drives it through the protocol, one
//! named check at a time:
//!
//! | check | passes when |
//! |---|---|
//! | `handshake` | `init_pong` ok, version 1, a pid other than 0, `echo` and `fail` offered, no second `init_pong` |
//! | `echo_nil` ... `echo_1mib` | each class of MessagePack value comes back unchanged, type included (a float64 as the same float64) |
//! | `unknown_method` | an unoffered method gives error kind `unknown_method`; an echo then works |
//! | `handler_error` | `fail` gives an error with a non-empty kind; an echo then works |
//! | `ping`, `reset` | answered with one `pong` / one `ok` with body nil |
//! | `stream` | `{"n": 5}` gives chunks 0..4 in order then `ok` 5 (skipped if `stream` is not offered) |
//! | `cancel` | a long `wait`, cancelled, ends with error kind `cancelled` within 2 s; a cancel of an ended call is ignored (skipped without `wait`) |
//! | `deadline` | a long `wait` with `deadline_ms` 300 ends with `deadline_exceeded`, not early, within 2 s after (skipped without `wait`) |
//! | `concurrency` | a worker declaring `max_concurrency` N > 1 answers N (at most 16) overlapping echoes each with its own body, and as many overlapping 500 ms `wait`s in well under N × 500 ms (run only for a worker declaring N > 1, after `session`; skipped without `wait`) |
//! | `session` | state set in a session is read back in it, and gone after `reset` (skipped without `state_set`/`state_get`) |
//! | `shutdown_exits` | a fresh worker exits by itself with status 0 within 2 s of `shutdown` |
//! | `eof_exits` | a fresh worker exits by itself with status 0 within 2 s of EOF on its input |
//! | `init_version` | a fresh worker sent `init` with version 2 answers one `init_pong` stating version 1 |
//! | `oversized_frame` | a fresh worker sent a header of `max_frame` + 1 bytes exits non-zero within 2 s |
//! | `malformed_payload` | ... sent invalid MessagePack exits non-zero within 2 s |
//! | `not_a_map` | ... sent an array instead of a map exits non-zero within 2 s |
//! | `unknown_type` | ... sent a message of an unknown type exits non-zero within 2 s |
//! | `truncated_frame` | ... sent half a frame, then EOF, exits non-zero within 2 s |
//!
//! A late violation (a second reply to a request of the check) fails the check at hand: before a
//! check passes, the checker echoes nil once more and waits for it, so a duplicate sent after
//! the first reply arrives first; the handshake watches for a second `init_pong` for 200 ms.
//!
//! Every check is bounded: spawning by the init timeout, each check by the per-check timeout
//! ([`CheckOptions`]), so a hung worker fails a check instead of hanging the checker.
//!
//! After a check fails, its worker is killed and the next check gets a fresh one: a worker that
//! crashes, hangs or breaks the protocol fails the check at hand (with the exit status and last
//! stderr lines, or the violation) and the remaining checks still report their own results. If
//! a fresh worker cannot be started, every remaining check fails with that reason at once. If
//! the first start (the handshake) fails, the handshake check fails with the port's error and
//! every other check is skipped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use wharf_actors::port::container;
use wharf_actors::port::{Channel, Port, PortError, ProcessSpec, StreamEvent, WorkerSpec};
use wharf_protocol::frame::{check_len, decode, encode};
use wharf_protocol::message::kinds;
use wharf_protocol::{FromWorker, ToWorker, Value, PROTOCOL_VERSION};

/// How the checker runs.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// How long each worker may take to answer the init ping (overrides the spec's own).
    /// Default 10 s.
    pub init_timeout: Duration,
    /// How long each check may take once its worker is ready. Default 10 s.
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
    /// The check does not apply or could not run; the reason says why.
    Skip(String),
}

/// One named check and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The check's name, e.g. `echo_int` (see [`CHECKS`]).
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
    /// How many checks passed.
    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Pass))
    }

    /// How many checks failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Fail(_)))
    }

    /// How many checks were skipped.
    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skip(_)))
    }

    /// Whether no check failed (skipped checks do not count against the worker).
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
}

/// The names of the checks, in the order they run.
pub const CHECKS: &[&str] = &[
    "handshake",
    "echo_nil",
    "echo_bool",
    "echo_int",
    "echo_float",
    "echo_str",
    "echo_bin",
    "echo_nested",
    "echo_1mib",
    "unknown_method",
    "handler_error",
    "ping",
    "reset",
    "stream",
    "cancel",
    "deadline",
    "session",
    "shutdown_exits",
    "eof_exits",
    "init_version",
    "oversized_frame",
    "malformed_payload",
    "not_a_map",
    "unknown_type",
    "truncated_frame",
];

/// The check run, after `session`, only for a worker whose init pong declares a
/// `max_concurrency` above 1 (so it is not in [`CHECKS`]): overlapping calls are answered
/// correctly, and at once.
pub const CONCURRENCY_CHECK: &str = "concurrency";

/// How soon a worker must exit after `shutdown`, EOF or a protocol violation it receives
/// (`docs/protocol.md`, section 4): the checker's bound, capped by the per-check timeout.
pub const EXIT_BOUND: Duration = Duration::from_secs(2);

/// The version the `init_version` check states in its `init`: one no worker speaks yet.
const OTHER_VERSION: u32 = PROTOCOL_VERSION + 1;

/// How soon a call of `wait` must end after its `cancel`, or after its `deadline_ms` ran out.
pub const STOP_BOUND: Duration = Duration::from_secs(2);

/// [`STOP_BOUND`], shortened to leave the `cancel` and `deadline` checks' other steps room
/// within a short per-check `timeout` (so they fail with their own reason, not the timeout's).
fn stop_bound(timeout: Duration) -> Duration {
    let others = Duration::from_millis(DEADLINE_MS + 200);
    STOP_BOUND.min(timeout.saturating_sub(others))
}

/// How long `wait` is asked to run in the `cancel` and `deadline` checks: far longer than any
/// check, so only a cancel or the deadline can end it in time.
const WAIT_MS: u64 = 600_000;

/// The `deadline_ms` of the `deadline` check's call.
const DEADLINE_MS: u64 = 300;

/// How long the handshake watches for a late violation (a second `init_pong`) before it passes.
const HANDSHAKE_SETTLE: Duration = Duration::from_millis(200);

/// The sessions of the `session` check.
const SESSION_A: &str = "wharf.check.session-a";
const SESSION_B: &str = "wharf.check.session-b";

/// The method the `unknown_method` check calls; no worker should offer it.
const NO_SUCH_METHOD: &str = "wharf.check.no_such_method";

/// Why a check failed (rendered into [`Outcome::Fail`]).
#[derive(Debug, Error)]
enum Failure {
    /// The port reported an error (death, violation, remote error, ...).
    #[error(transparent)]
    Port(#[from] PortError),
    /// A fresh worker for this check could not be started.
    #[error("no fresh worker for this check: {0}")]
    NoWorker(String),
    /// The check did not finish in time.
    #[error("worker did not answer within {0:?}")]
    Timeout(Duration),
    /// The worker answered, but not as the protocol asks.
    #[error("{0}")]
    Wrong(String),
}

/// Runs every check against workers started from `spec`; see the [module docs](self).
///
/// The checker gives each worker the id `check` and `opts.init_timeout` as its init timeout;
/// the rest of `spec` (channel, environment, max frame) is used as is.
pub async fn run_checks(spec: impl Into<WorkerSpec>, opts: CheckOptions) -> CheckReport {
    run_checks_with(spec, opts, |_| {}).await
}

/// Like [`run_checks`], and calls `on_result` with each result as soon as its check ends (for
/// progress output).
pub async fn run_checks_with<F>(
    spec: impl Into<WorkerSpec>,
    opts: CheckOptions,
    on_result: F,
) -> CheckReport
where
    F: FnMut(&CheckResult) + Send,
{
    let mut spec = spec.into();
    spec.set_init_timeout(opts.init_timeout);
    // Containers of this run carry an instance of their own, so that every one of them can be
    // removed at the end, whichever check left it (a removal in flight is otherwise lost when
    // the program exits right after).
    let instance = container::new_instance();
    spec.set_pool("wharf-check", &instance);
    let spec = spec.worker_id("check");
    let engine = match &spec {
        WorkerSpec::Container(c) => c.engine_or_local().await.ok(),
        _ => None,
    };
    let report = run_all(spec, opts, on_result).await;
    if let Some(engine) = engine {
        let mine = container::Sweep::Instance {
            instance: &instance,
        };
        if let Err(e) = container::sweep(&engine, mine).await {
            tracing::warn!(error = %e, "cannot remove the check's containers");
        }
    }
    report
}

async fn run_all<F>(spec: WorkerSpec, opts: CheckOptions, on_result: F) -> CheckReport
where
    F: FnMut(&CheckResult) + Send,
{
    let mut run = Runner {
        spec,
        opts,
        port: None,
        broken: None,
        report: CheckReport::default(),
        on_result,
    };

    // The handshake: nothing else can run without a first worker.
    let info = match run.spawn().await {
        Ok(port) => port.info().clone(),
        Err(failure) => {
            run.record("handshake", Outcome::Fail(failure.to_string()));
            for name in &CHECKS[1..] {
                run.record(name, Outcome::Skip("the handshake failed".into()));
            }
            return run.report;
        }
    };
    let offers = |m: &str| info.methods.iter().any(|x| x == m);
    let handshake = if info.version != PROTOCOL_VERSION {
        Outcome::Fail(format!(
            "init_pong version {}, expected {PROTOCOL_VERSION}",
            info.version
        ))
    } else if info.pid == 0 {
        Outcome::Fail("init_pong pid is 0; a worker reports its real process id".into())
    } else if !offers("echo") || !offers("fail") {
        Outcome::Fail(format!(
            "methods {:?} must include echo and fail (docs/protocol.md, section 6)",
            info.methods
        ))
    } else {
        match run.settle_handshake().await {
            Some(late) => Outcome::Fail(late),
            None => Outcome::Pass,
        }
    };
    run.record("handshake", handshake);

    for (name, value) in echo_cases() {
        run.check(name, move |port| async move { echo(&port, value).await })
            .await;
    }

    run.check("unknown_method", |port| async move {
        expect_error(&port, NO_SUCH_METHOD, Some(kinds::UNKNOWN_METHOD)).await
    })
    .await;
    run.check("handler_error", |port| async move {
        expect_error(&port, "fail", None).await
    })
    .await;

    let timeout = run.opts.timeout;
    run.check("ping", |port| async move { Ok(port.ping(timeout).await?) })
        .await;
    run.check("reset", |port| async move {
        Ok(port.reset(None, timeout).await?)
    })
    .await;

    let optional: [(&str, &[&str], Skippable); 4] = [
        ("stream", &["stream"], Skippable::Stream),
        ("cancel", &["wait"], Skippable::Cancel),
        ("deadline", &["wait"], Skippable::Deadline),
        ("session", &["state_set", "state_get"], Skippable::Session),
    ];
    for (name, methods, which) in optional {
        if let Some(missing) = methods.iter().find(|m| !offers(m)) {
            let why =
                format!("the worker does not offer `{missing}` (docs/protocol.md, section 6)");
            run.record(name, Outcome::Skip(why));
            continue;
        }
        run.check(name, move |port| async move {
            match which {
                Skippable::Stream => stream(&port, 5).await,
                Skippable::Cancel => cancel(&port, stop_bound(timeout)).await,
                Skippable::Deadline => deadline(&port, stop_bound(timeout)).await,
                Skippable::Session => session(&port, timeout).await,
            }
        })
        .await;
    }

    // Only for a worker that declares more than one call at once.
    let declared = run.port().await.map_or(1, |p| p.info().max_concurrency);
    if declared > 1 && !offers("wait") {
        let why = "the worker does not offer `wait` (docs/protocol.md, section 6)";
        run.record(CONCURRENCY_CHECK, Outcome::Skip(why.into()));
    } else if declared > 1 {
        run.check(CONCURRENCY_CHECK, move |port| async move {
            concurrency(&port, timeout).await
        })
        .await;
    }

    let outcome = run.exits(Exit::Shutdown).await;
    run.record("shutdown_exits", outcome);
    let outcome = run.exits(Exit::Eof).await;
    run.record("eof_exits", outcome);
    let outcome = match (&run.broken, &run.spec) {
        (Some(why), _) => Outcome::Fail(Failure::NoWorker(why.clone()).to_string()),
        (None, WorkerSpec::Process(spec)) => init_version(spec, run.opts.init_timeout).await,
        (None, _) => Outcome::Skip(
            "run for process workers only (it starts the worker outside the port)".into(),
        ),
    };
    run.record("init_version", outcome);
    for bad in Bad::ALL {
        let outcome = if bad == Bad::Oversized && run.spec.max_frame() >= u32::MAX as usize {
            Outcome::Skip("max_frame is the largest a header can announce".into())
        } else {
            run.exits(Exit::Violation(bad)).await
        };
        run.record(bad.check(), outcome);
    }
    run.report
}

/// The optional checks, each run only if the worker offers its methods.
#[derive(Clone, Copy)]
enum Skippable {
    Stream,
    Cancel,
    Deadline,
    Session,
}

/// Malformed input the checker sends a fresh worker, one check each.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bad {
    /// A header announcing one byte more than the worker's `WHARF_MAX_FRAME`, and no payload.
    Oversized,
    /// A frame whose payload is not MessagePack.
    Garbage,
    /// A frame whose payload is valid MessagePack but not a map.
    NotAMap,
    /// A well-formed message of a type the protocol does not have.
    UnknownType,
    /// Half a frame, then EOF.
    Truncated,
}

impl Bad {
    const ALL: [Bad; 5] = [
        Bad::Oversized,
        Bad::Garbage,
        Bad::NotAMap,
        Bad::UnknownType,
        Bad::Truncated,
    ];

    fn check(self) -> &'static str {
        match self {
            Bad::Oversized => "oversized_frame",
            Bad::Garbage => "malformed_payload",
            Bad::NotAMap => "not_a_map",
            Bad::UnknownType => "unknown_type",
            Bad::Truncated => "truncated_frame",
        }
    }

    /// The bytes sent, and what they are (for failure reasons).
    fn input(self, max_frame: usize) -> (Vec<u8>, String) {
        let framed = |payload: &[u8]| {
            let mut f = (payload.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(payload);
            f
        };
        match self {
            Bad::Oversized => {
                let n = (max_frame as u64 + 1).min(u64::from(u32::MAX)) as u32;
                (
                    n.to_be_bytes().to_vec(),
                    format!("a frame header announcing {n} bytes (WHARF_MAX_FRAME is {max_frame})"),
                )
            }
            // A map of one entry whose key is 0xc1, a byte MessagePack never uses.
            Bad::Garbage => (
                framed(b"\x81\xc1\xc1"),
                "a frame of invalid MessagePack".into(),
            ),
            Bad::NotAMap => (
                framed(b"\x93\x01\x02\x03"),
                "a frame holding the array [1, 2, 3] instead of a map".into(),
            ),
            Bad::UnknownType => {
                let msg = Value::Map(vec![
                    ("t".into(), UNKNOWN_TYPE.into()),
                    ("id".into(), 7.into()),
                ]);
                let frame = encode(&msg, usize::MAX).expect("a small map always encodes");
                (frame, format!("a message of unknown type {UNKNOWN_TYPE:?}"))
            }
            // The start of a map announced as 100 bytes: EOF after 4 + 8 of 104 bytes.
            Bad::Truncated => {
                let mut f = 100u32.to_be_bytes().to_vec();
                f.extend_from_slice(b"\x82\xa1t\xa4ping");
                (f, "half a frame, then EOF".into())
            }
        }
    }
}

/// The message type the `unknown_type` check sends; no version of the protocol has it.
const UNKNOWN_TYPE: &str = "wharf.check.no_such_type";

/// The values echoed, one check per class of MessagePack value.
fn echo_cases() -> Vec<(&'static str, Value)> {
    let ints: Vec<Value> = [
        // Every width edge: fixint, int8/uint8, int16/uint16, int32/uint32, int64/uint64.
        0,
        1,
        -1,
        -32,
        -33,
        127,
        128,
        -128,
        -129,
        255,
        256,
        -32768,
        -32769,
        65535,
        65536,
        i64::from(i32::MIN),
        i64::from(i32::MIN) - 1,
        i64::from(u32::MAX),
        i64::from(u32::MAX) + 1,
        i64::MIN,
        i64::MAX,
    ]
    .into_iter()
    .map(Value::from)
    .chain([Value::from(u64::MAX)])
    .collect();
    let floats = [
        // Integral floats (a JavaScript number would go back as an int), floats a float32
        // holds exactly (an encoder that shrinks them), -0.0, a subnormal, the extremes.
        0.0,
        -0.0,
        1.0,
        -1.5,
        1e15,
        5e-324,
        0.1,
        f64::MAX,
        f64::MIN,
        f64::MIN_POSITIVE,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ]
    .into_iter()
    .map(Value::F64)
    .collect();
    let strs = [
        String::new(),
        "hello".into(),
        "héllo wörld ✓ 漢字 🚢".into(),
        "a".repeat(31),
        "b".repeat(32),
        "c".repeat(300),
        "d".repeat(70_000),
    ]
    .into_iter()
    .map(Value::from)
    .collect();
    let bins = vec![
        Value::Binary(Vec::new()),
        Value::Binary((0..=255).collect()),
        Value::Binary(vec![0x5A; 70_000]),
    ];
    let map = |pairs: Vec<(&str, Value)>| {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    };
    let nested = map(vec![
        ("", "empty key".into()),
        ("empty_map", map(vec![])),
        ("empty_array", Value::Array(vec![])),
        (
            "mixed",
            Value::Array(vec![
                1.into(),
                "two".into(),
                Value::F64(3.5),
                Value::Nil,
                true.into(),
                Value::Binary(vec![0, 1, 2]),
                map(vec![("k", Value::Array(vec![(-1).into(), map(vec![])]))]),
            ]),
        ),
        (
            "deep",
            (0..8).fold(Value::from("bottom"), |inner, depth| {
                map(vec![
                    ("level", depth.into()),
                    ("next", Value::Array(vec![inner])),
                ])
            }),
        ),
    ]);
    vec![
        ("echo_nil", Value::Nil),
        ("echo_bool", Value::Array(vec![true.into(), false.into()])),
        ("echo_int", Value::Array(ints)),
        ("echo_float", Value::Array(floats)),
        ("echo_str", Value::Array(strs)),
        ("echo_bin", Value::Array(bins)),
        ("echo_nested", nested),
        ("echo_1mib", Value::Binary(vec![0xA5; 1024 * 1024])),
    ]
}

/// How a worker is told (or driven) to exit.
#[derive(Clone, Copy)]
enum Exit {
    /// The `shutdown` message, channel left open: exit status 0.
    Shutdown,
    /// EOF on its input, no message: exit status 0.
    Eof,
    /// Malformed input: a non-zero exit status.
    Violation(Bad),
}

/// Runs the checks and holds the current worker.
struct Runner<F> {
    spec: WorkerSpec,
    opts: CheckOptions,
    /// The worker the next check runs on, if it is still usable.
    port: Option<Arc<Port>>,
    /// Set once a fresh worker could not be started: the remaining checks fail with it.
    broken: Option<String>,
    report: CheckReport,
    on_result: F,
}

impl<F: FnMut(&CheckResult) + Send> Runner<F> {
    fn record(&mut self, name: &str, outcome: Outcome) {
        let result = CheckResult {
            name: name.to_owned(),
            outcome,
        };
        tracing::debug!(check = name, outcome = ?result.outcome, "check done");
        (self.on_result)(&result);
        self.report.results.push(result);
    }

    /// Starts a fresh worker (replacing the current one) and waits until it is ready.
    async fn spawn(&mut self) -> Result<Arc<Port>, Failure> {
        self.discard().await;
        // The port bounds the handshake by the init timeout; this also bounds the spawn itself
        // and the port's own waits for an exit status after a failed start.
        let limit = self
            .opts
            .init_timeout
            .saturating_add(Duration::from_secs(10));
        let port = tokio::time::timeout(limit, Port::start(&self.spec))
            .await
            .map_err(|_| Failure::Timeout(limit))??;
        let port = Arc::new(port);
        self.port = Some(port.clone());
        Ok(port)
    }

    /// The current worker if it is still usable, else a fresh one.
    async fn port(&mut self) -> Result<Arc<Port>, Failure> {
        if let Some(why) = &self.broken {
            return Err(Failure::NoWorker(why.clone()));
        }
        if let Some(port) = self.port.as_ref().filter(|p| p.is_open()) {
            return Ok(port.clone());
        }
        tracing::info!("starting a fresh worker");
        self.spawn().await.map_err(|failure| {
            let why = failure.to_string();
            self.broken = Some(why.clone());
            Failure::NoWorker(why)
        })
    }

    /// Kills the current worker, if any.
    async fn discard(&mut self) {
        if let Some(port) = self.port.take() {
            port.kill(PortError::Closed);
            port.exit_info(Duration::from_secs(5)).await;
        }
    }

    /// Runs one check on a usable worker under the per-check timeout and records its outcome.
    /// A worker whose check failed is discarded: the next check gets a fresh one.
    async fn check<C, Fut>(&mut self, name: &str, check: C)
    where
        C: FnOnce(Arc<Port>) -> Fut,
        Fut: Future<Output = Result<(), Failure>>,
    {
        let timeout = self.opts.timeout;
        let result = match self.port().await {
            Ok(port) => {
                let started = tokio::time::Instant::now();
                let result = match tokio::time::timeout(timeout, check(port.clone())).await {
                    Ok(result) => result,
                    Err(_) => Err(Failure::Timeout(timeout)),
                };
                // A late violation (a second reply to a request the check made) belongs to this
                // check, not the next: a ping answered in order proves nothing is still coming.
                let result = match result {
                    Ok(()) => {
                        let left = timeout.saturating_sub(started.elapsed());
                        barrier(&port, left.max(Duration::from_millis(500))).await
                    }
                    failed => failed,
                };
                match result {
                    Err(Failure::Port(PortError::WorkerDied(mut info))) => {
                        info.stderr_tail = settled_stderr(&port, info.stderr_tail.len()).await;
                        Err(PortError::WorkerDied(info).into())
                    }
                    other => other,
                }
            }
            Err(failure) => Err(failure),
        };
        let outcome = match result {
            Ok(()) => Outcome::Pass,
            // Only our own request can be too large to encode: a `--max-frame` below the
            // check's values (e.g. the 1 MiB echo). The worker is not at fault.
            Err(Failure::Port(PortError::Encode { reason })) => {
                Outcome::Skip(format!("the request does not fit: {reason}"))
            }
            Err(failure) => {
                self.discard().await;
                Outcome::Fail(failure.to_string())
            }
        };
        self.record(name, outcome);
    }

    /// After the handshake: waits briefly for a late violation (a second `init_pong`); its
    /// reason if one came (the worker is then discarded).
    async fn settle_handshake(&mut self) -> Option<String> {
        let port = self.port.clone()?;
        tokio::time::sleep(HANDSHAKE_SETTLE).await;
        let late = match port.close_reason()? {
            violation @ PortError::ProtocolViolation { .. } => {
                format!("after a good init_pong: {violation}")
            }
            other => format!("right after its init_pong: {other}"),
        };
        self.discard().await;
        Some(late)
    }

    /// A fresh worker must exit by itself after `how` within [`EXIT_BOUND`] (or the per-check
    /// timeout, if shorter), without writing anything more: with status 0 after `shutdown` or
    /// EOF, with a non-zero status after a violation. A worker still running then fails (the
    /// runtime would have had to SIGTERM or SIGKILL it).
    async fn exits(&mut self, how: Exit) -> Outcome {
        let timeout = self.opts.timeout.min(EXIT_BOUND);
        let max_frame = self.spec.max_frame();
        let port = if let Some(why) = &self.broken {
            Err(Failure::NoWorker(why.clone()))
        } else {
            self.spawn()
                .await
                .map_err(|failure| Failure::NoWorker(failure.to_string()))
        };
        // `exits` waits up to `timeout` for the exit, then briefly for the port to close; the
        // slack keeps this outer bound (for a worker that does not even read) from cutting in.
        let limit = timeout.saturating_add(Duration::from_secs(5));
        let result = match port {
            Ok(port) => tokio::time::timeout(limit, exits(&port, how, timeout, max_frame))
                .await
                .unwrap_or(Err(Failure::Timeout(limit))),
            Err(failure) => Err(failure),
        };
        self.discard().await;
        match result {
            Ok(()) => Outcome::Pass,
            Err(failure) => Outcome::Fail(failure.to_string()),
        }
    }
}

/// Echoes `value`; it must come back equal (map entries in any order).
async fn echo(port: &Port, value: Value) -> Result<(), Failure> {
    let back = call(port, "echo", value.clone()).await?;
    match difference(&value, &back) {
        None => Ok(()),
        Some(diff) => Err(Failure::Wrong(format!("echo changed the value: {diff}"))),
    }
}

async fn call(port: &Port, method: &str, body: Value) -> Result<Value, PortError> {
    port.call(port.next_request_id(), method, body, None, None)
        .await
}

/// Calls `method`, which must fail with an error reply (of `kind`, if given, else of any
/// non-empty kind); the worker must then still answer an echo.
async fn expect_error(port: &Port, method: &str, kind: Option<&str>) -> Result<(), Failure> {
    match call(port, method, "wharf check".into()).await {
        Ok(v) => {
            return Err(Failure::Wrong(format!(
                "{method} succeeded with {}; expected an error reply",
                describe(&v)
            )))
        }
        Err(PortError::Remote { kind: got, .. }) if got.is_empty() => {
            return Err(Failure::Wrong("error reply with an empty kind".into()))
        }
        Err(PortError::Remote { kind: got, message }) => {
            if let Some(want) = kind.filter(|want| *want != got) {
                return Err(Failure::Wrong(format!(
                    "error kind {got:?} ({message}), expected {want:?}"
                )));
            }
        }
        Err(e) => return Err(e.into()),
    }
    echo(port, "still serving".into())
        .await
        .map_err(|failure| Failure::Wrong(format!("the echo after the error failed: {failure}")))
}

/// Calls `stream` with `{"n": n}`: chunks seq 0..n with body = seq, then `ok` with body n.
async fn stream(port: &Port, n: u64) -> Result<(), Failure> {
    let body = Value::Map(vec![("n".into(), n.into())]);
    let id = port.next_request_id();
    let mut events = port.call_stream(id, "stream", body, None, None).await?;
    let mut next = 0;
    while let Some(event) = events.recv().await {
        match event {
            StreamEvent::Chunk { seq, body } => {
                if seq != next || body != Value::from(seq) {
                    return Err(Failure::Wrong(format!(
                        "chunk seq {seq} with body {}; expected seq {next} with body {next}",
                        describe(&body)
                    )));
                }
                next += 1;
            }
            StreamEvent::End(Ok(body)) if next == n && body == Value::from(n) => return Ok(()),
            StreamEvent::End(Ok(body)) => {
                return Err(Failure::Wrong(format!(
                    "{next} chunks then ok {}; expected {n} chunks then ok {n}",
                    describe(&body)
                )))
            }
            StreamEvent::End(Err(e)) => return Err(e.into()),
        }
    }
    Err(Failure::Wrong(
        "the stream ended without a final reply".into(),
    ))
}

/// Tells the worker to exit (`how`) and waits for it to exit by itself with the status the
/// protocol asks for: 0 after `shutdown` or EOF, non-zero after a violation.
async fn exits(port: &Port, how: Exit, timeout: Duration, max_frame: usize) -> Result<(), Failure> {
    let what = match how {
        Exit::Shutdown => {
            port.send_shutdown().await?;
            "shutdown".to_owned()
        }
        Exit::Eof => {
            port.close_channel().await;
            "EOF on its input".to_owned()
        }
        Exit::Violation(bad) => {
            let (bytes, what) = bad.input(max_frame);
            // A worker that already exited (the write fails) is judged by its exit below.
            let _ = port.send_raw(&bytes).await;
            if bad == Bad::Truncated {
                port.close_channel().await;
            }
            what
        }
    };
    let violation = matches!(how, Exit::Violation(_));
    let Some(status) = port.wait_exit(timeout).await else {
        let must = if violation {
            "; a worker must exit with a non-zero status on a protocol violation, not wait or \
             keep serving"
        } else {
            "; the runtime would have to kill it"
        };
        return Err(Failure::Wrong(format!(
            "still running {timeout:?} after {what}{must}{}",
            stderr(&port.stderr_tail())
        )));
    };
    // The port closes once it has read the worker's EOF, or first a violation: a worker must
    // not reply to `shutdown`, nor write anything broken before it exits (then the port kills
    // it, which is no clean exit either).
    let mut closed = None;
    for _ in 0..300 {
        closed = port.close_reason();
        if closed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(violation @ PortError::ProtocolViolation { .. }) = closed {
        return Err(Failure::Wrong(format!(
            "after {what}: {violation} (the worker ended with {status})"
        )));
    }
    match status.code() {
        Some(0) if !violation => Ok(()),
        Some(code) if violation && code != 0 => Ok(()),
        Some(0) => Err(Failure::Wrong(format!(
            "exited with status 0 after {what}; a protocol violation must end the worker with \
             a non-zero status{}",
            stderr(&settled_stderr(port, 0).await)
        ))),
        _ if violation => Err(Failure::Wrong(format!(
            "ended with {status} after {what}, expected an exit with a non-zero status{}",
            stderr(&settled_stderr(port, 0).await)
        ))),
        _ => Err(Failure::Wrong(format!(
            "ended with {status} after {what}, expected exit status 0{}",
            stderr(&settled_stderr(port, 0).await)
        ))),
    }
}

/// A fresh worker sent `init` with a version it does not speak must still answer one
/// `init_pong` stating its own version (docs/protocol.md, section 4): the runtime decides.
///
/// The port always states the runtime's own version, so this check starts the worker itself,
/// with the environment and channel the port would give it; in `fds` mode `/bin/sh` moves the
/// channel from stdin/stdout to fds 3/4 (as the port does, with `/dev/null` on stdin) and
/// `exec`s the worker.
async fn init_version(spec: &ProcessSpec, timeout: Duration) -> Outcome {
    let mut cmd = match spec.channel {
        Channel::Stdio => {
            let mut cmd = tokio::process::Command::new(&spec.program);
            cmd.args(&spec.args);
            cmd
        }
        Channel::Fds => {
            let mut cmd = tokio::process::Command::new("/bin/sh");
            cmd.arg("-c")
                .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2"#)
                .arg(&spec.program)
                .args(&spec.args);
            cmd
        }
    };
    cmd.env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env("WHARF_MAX_FRAME", spec.max_frame.to_string())
        .env("WHARF_WORKER_ID", &spec.worker_id)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    match spec.channel {
        Channel::Stdio => cmd.env("WHARF_CHANNEL", "stdio"),
        Channel::Fds => cmd
            .env("WHARF_CHANNEL", "fds")
            .env("WHARF_FD_IN", "3")
            .env("WHARF_FD_OUT", "4"),
    };
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return Outcome::Fail(format!("cannot start the worker: {e}")),
    };
    let (Some(mut input), Some(mut output)) = (child.stdin.take(), child.stdout.take()) else {
        return Outcome::Fail("no channel to the worker".into());
    };
    // Collected as it comes (a worker blocked on a full stderr pipe would never answer).
    let stderr_tail = child.stderr.take().map(|mut pipe| {
        tokio::spawn(async move {
            let mut all = Vec::new();
            let _ = pipe.read_to_end(&mut all).await;
            let text = String::from_utf8_lossy(&all).into_owned();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            lines[lines.len().saturating_sub(3)..].to_vec()
        })
    });
    let what = format!("an init with version {OTHER_VERSION}");
    let init = ToWorker::Init {
        id: 0,
        version: OTHER_VERSION,
    };
    let answer = async {
        let frame = encode(&init, spec.max_frame).map_err(|e| e.to_string())?;
        input.write_all(&frame).await.map_err(|e| e.to_string())?;
        input.flush().await.map_err(|e| e.to_string())?;
        read_message(&mut output, spec.max_frame).await
    };
    let outcome = match tokio::time::timeout(timeout, answer).await {
        Err(_) => Outcome::Fail(format!(
            "no init_pong within {timeout:?} of {what}; a worker answers init whatever its \
             version, stating its own"
        )),
        Ok(Err(why)) => {
            let status = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            let ended = match status {
                Ok(Ok(status)) => format!(" (it ended with {status})"),
                _ => String::new(),
            };
            // The worker has ended (or is killed now): its stderr pipe closes with it.
            let _ = child.start_kill();
            let tail = match stderr_tail {
                Some(task) => tokio::time::timeout(Duration::from_secs(1), task)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default(),
                None => Vec::new(),
            };
            Outcome::Fail(format!(
                "no init_pong after {what}: {why}{ended}; a worker answers init whatever its \
                 version, stating its own{}",
                stderr(&tail)
            ))
        }
        Ok(Ok(FromWorker::InitPong { version, .. })) if version == PROTOCOL_VERSION => {
            Outcome::Pass
        }
        Ok(Ok(FromWorker::InitPong { version, .. })) => Outcome::Fail(format!(
            "init_pong states version {version} after {what}; a worker states the version it \
             speaks ({PROTOCOL_VERSION}, as in its handshake)"
        )),
        Ok(Ok(other)) => Outcome::Fail(format!(
            "answered {what} with {other:?}, expected an init_pong"
        )),
    };
    let _ = child.kill().await;
    outcome
}

/// Reads one message from a worker's raw output: its text if the output ended or broke first.
async fn read_message<R: AsyncRead + Unpin>(
    output: &mut R,
    max_frame: usize,
) -> Result<FromWorker, String> {
    let mut header = [0u8; 4];
    output
        .read_exact(&mut header)
        .await
        .map_err(|_| "the worker closed its output".to_owned())?;
    let len = check_len(u32::from_be_bytes(header), max_frame)
        .map_err(|e| format!("protocol violation: {e}"))?;
    let mut payload = vec![0; len];
    output
        .read_exact(&mut payload)
        .await
        .map_err(|_| "the worker closed its output inside a frame".to_owned())?;
    decode(&payload).map_err(|e| format!("protocol violation: {e}"))
}

/// After a check passed: an echo of nil, answered in order, proves no late reply to the
/// check's requests is still on its way (one would have arrived first and closed the port).
/// An echo rather than a ping, so that a worker answering pings twice fails only `ping`.
async fn barrier(port: &Port, timeout: Duration) -> Result<(), Failure> {
    let id = port.next_request_id();
    match tokio::time::timeout(timeout, port.call(id, "echo", Value::Nil, None, None)).await {
        Ok(Ok(Value::Nil)) => Ok(()),
        Ok(Ok(other)) => Err(Failure::Wrong(format!(
            "after the check passed, an echo of nil returned {}",
            describe(&other)
        ))),
        Ok(Err(violation @ PortError::ProtocolViolation { .. })) => Err(Failure::Wrong(format!(
            "after the check passed (a second or late reply to its requests?): {violation}"
        ))),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(Failure::Wrong(format!(
            "after the check passed, an echo got no reply within {timeout:?}"
        ))),
    }
}

/// Calls `wait` with `{"ms": ms}`; the call's id and a task that ends with its reply.
fn start_wait(
    port: &Arc<Port>,
    ms: u64,
    deadline_ms: Option<u64>,
) -> (u64, tokio::task::JoinHandle<Result<Value, PortError>>) {
    let id = port.next_request_id();
    let body = Value::Map(vec![("ms".into(), ms.into())]);
    let port = port.clone();
    let task = tokio::spawn(async move { port.call(id, "wait", body, None, deadline_ms).await });
    (id, task)
}

/// Waits up to `bound` for a `wait` call to end; the reply, or `None` if it is still running.
async fn stopped(
    task: &mut tokio::task::JoinHandle<Result<Value, PortError>>,
    bound: Duration,
) -> Option<Result<Value, PortError>> {
    match tokio::time::timeout(bound, task).await {
        Ok(Ok(result)) => Some(result),
        Ok(Err(join)) => Some(Err(PortError::ProtocolViolation {
            reason: format!("the call's task failed: {join}"),
        })),
        Err(_) => None,
    }
}

/// `wait` ends early with error kind `cancelled` when cancelled while it runs; a cancel of a
/// call that has ended is ignored.
async fn cancel(port: &Arc<Port>, bound: Duration) -> Result<(), Failure> {
    let back = call(port, "wait", Value::Map(vec![("ms".into(), 10.into())])).await?;
    if back != Value::from(10) {
        return Err(Failure::Wrong(format!(
            "wait {{\"ms\": 10}} returned {}, expected 10",
            describe(&back)
        )));
    }
    let (id, mut task) = start_wait(port, WAIT_MS, None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    port.cancel(id).await?;
    let Some(result) = stopped(&mut task, bound).await else {
        task.abort();
        return Err(Failure::Wrong(format!(
            "wait {{\"ms\": {WAIT_MS}}} was still running {bound:?} after its cancel; a \
             worker must read its input while a call runs and end a cancelled call with error \
             kind \"cancelled\""
        )));
    };
    match result {
        Err(PortError::Remote { kind, .. }) if kind == kinds::CANCELLED => {}
        Err(PortError::Remote { kind, message }) => {
            return Err(Failure::Wrong(format!(
                "the cancelled wait ended with error kind {kind:?} ({message}), expected \
                 \"cancelled\""
            )))
        }
        Ok(v) => {
            return Err(Failure::Wrong(format!(
                "the cancelled wait ended with ok {}, expected error kind \"cancelled\"",
                describe(&v)
            )))
        }
        Err(e) => return Err(e.into()),
    }
    // The call has ended: a cancel naming it is ignored (no reply, no violation).
    port.cancel(id).await?;
    echo(port, "still serving".into())
        .await
        .map_err(|f| Failure::Wrong(format!("the echo after the cancelled wait failed: {f}")))
}

/// `wait` ends with error kind `deadline_exceeded` once its `deadline_ms` runs out, not before.
async fn deadline(port: &Arc<Port>, bound: Duration) -> Result<(), Failure> {
    let sent = tokio::time::Instant::now();
    let budget = Duration::from_millis(DEADLINE_MS);
    let (_, mut task) = start_wait(port, WAIT_MS, Some(DEADLINE_MS));
    let Some(result) = stopped(&mut task, budget + bound).await else {
        task.abort();
        return Err(Failure::Wrong(format!(
            "wait {{\"ms\": {WAIT_MS}}} with deadline_ms {DEADLINE_MS} was still running \
             {bound:?} after its deadline ran out; expected error kind \
             \"deadline_exceeded\""
        )));
    };
    let took = sent.elapsed();
    match result {
        // The worker's budget starts when it reads the frame, after it was sent.
        Err(PortError::Remote { kind, .. })
            if kind == kinds::DEADLINE_EXCEEDED && took + Duration::from_millis(10) < budget =>
        {
            Err(Failure::Wrong(format!(
                "wait with deadline_ms {DEADLINE_MS} ended with deadline_exceeded after only \
                 {took:?}"
            )))
        }
        Err(PortError::Remote { kind, .. }) if kind == kinds::DEADLINE_EXCEEDED => Ok(()),
        Err(PortError::Remote { kind, message }) => Err(Failure::Wrong(format!(
            "wait with deadline_ms {DEADLINE_MS} ended with error kind {kind:?} ({message}), \
             expected \"deadline_exceeded\""
        ))),
        Ok(v) => Err(Failure::Wrong(format!(
            "wait {{\"ms\": {WAIT_MS}}} with deadline_ms {DEADLINE_MS} ended with ok {}, \
             expected error kind \"deadline_exceeded\"",
            describe(&v)
        ))),
        Err(e) => Err(e.into()),
    }
}

/// How long each `wait` of the `concurrency` check runs.
const OVERLAP_MS: u64 = 500;

/// A worker declaring `max_concurrency` N > 1 serves that many calls at once: N (at most 16)
/// echoes sent together each get their own body back, and as many `wait`s of 500 ms sent
/// together end, each with its own reply, in well under the time they take one at a time.
async fn concurrency(port: &Arc<Port>, timeout: Duration) -> Result<(), Failure> {
    let n = port.info().max_concurrency.min(16);
    let echoes: Vec<_> = (0..n)
        .map(|i| {
            let port = port.clone();
            let body = Value::from(format!("overlapping echo {i}"));
            tokio::spawn(async move { (call(&port, "echo", body.clone()).await, body) })
        })
        .collect();
    for task in echoes {
        let (back, sent) = task.await.map_err(|e| Failure::Wrong(e.to_string()))?;
        let back = back?;
        if let Some(diff) = difference(&sent, &back) {
            return Err(Failure::Wrong(format!(
                "overlapping echoes came back mixed up: {diff}"
            )));
        }
    }
    let began = tokio::time::Instant::now();
    let waits: Vec<_> = (0..n)
        .map(|_| start_wait(port, OVERLAP_MS, None).1)
        .collect();
    // One at a time they take n x 500 ms; together, about 500 ms.
    let bound = Duration::from_millis(OVERLAP_MS * (n as u64 + 1) / 2).min(timeout);
    for mut task in waits {
        let left = bound.saturating_sub(began.elapsed());
        match stopped(&mut task, left).await {
            Some(Ok(v)) if v == Value::from(OVERLAP_MS) => {}
            Some(Ok(v)) => {
                return Err(Failure::Wrong(format!(
                    "an overlapping wait {{\"ms\": {OVERLAP_MS}}} returned {}",
                    describe(&v)
                )))
            }
            Some(Err(e)) => return Err(e.into()),
            None => {
                task.abort();
                return Err(Failure::Wrong(format!(
                    "{n} waits of {OVERLAP_MS} ms sent together had not all ended after \
                     {bound:?}: the worker declares max_concurrency {} but does not serve \
                     them at once",
                    port.info().max_concurrency
                )));
            }
        }
    }
    Ok(())
}

/// State set in a session is kept for that session and gone after `reset`, for the next
/// session and for the same one.
async fn session(port: &Port, timeout: Duration) -> Result<(), Failure> {
    let key = || ("key".into(), Value::from("wharf.check"));
    let value = Value::from(format!("set in {SESSION_A}"));
    let in_session = |method: &'static str, body: Value, session: &str| {
        port.call(
            port.next_request_id(),
            method,
            body,
            Some(session.to_owned()),
            None,
        )
    };
    let set = Value::Map(vec![key(), ("value".into(), value.clone())]);
    in_session("state_set", set, SESSION_A).await?;
    let get = Value::Map(vec![key()]);
    let got = in_session("state_get", get.clone(), SESSION_A).await?;
    if got != value {
        return Err(Failure::Wrong(format!(
            "state_get in session {SESSION_A} returned {} right after state_set stored {}",
            describe(&got),
            describe(&value)
        )));
    }
    port.reset(Some(SESSION_A.to_owned()), timeout).await?;
    // The next session on this worker must not see it, and it must be gone, not just kept
    // apart (a session's name may come again).
    for session in [SESSION_B, SESSION_A] {
        let got = in_session("state_get", get.clone(), session).await?;
        if got != Value::Nil {
            return Err(Failure::Wrong(format!(
                "state leaked across reset: after session {SESSION_A} was reset, state_get in \
                 session {session} returned {}, expected nil",
                describe(&got)
            )));
        }
    }
    Ok(())
}

/// The port snapshots a dead worker's stderr tail as soon as it is reaped, which can be before
/// its last lines were read from the pipe: give those lines a moment to arrive.
async fn settled_stderr(port: &Port, seen: usize) -> Vec<String> {
    for _ in 0..25 {
        let tail = port.stderr_tail();
        if tail.len() > seen {
            return tail;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    port.stderr_tail()
}

/// `"; last stderr: a | b"`, or nothing.
fn stderr(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last stderr: {}", lines.join(" | "))
    }
}

/// Where `got` differs from `sent`, if it does. Maps compare as sets of entries (a worker may
/// return them in any order); everything else, types included, must be identical.
fn difference(sent: &Value, got: &Value) -> Option<String> {
    fn walk(sent: &Value, got: &Value, path: &mut String) -> Option<String> {
        match (sent, got) {
            (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
                a.iter().zip(b).enumerate().find_map(|(i, (x, y))| {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    let diff = walk(x, y, path);
                    path.truncate(len);
                    diff
                })
            }
            (Value::Map(a), Value::Map(b)) if a.len() == b.len() => a.iter().find_map(|(k, x)| {
                let len = path.len();
                match k.as_str() {
                    Some(key) => path.push_str(&format!("[{key:?}]")),
                    None => path.push_str(&format!("[{}]", describe(k))),
                }
                let diff = match b.iter().find(|(k2, _)| k2 == k) {
                    Some((_, y)) => walk(x, y, path),
                    None => Some(format!("{path}: key missing")),
                };
                path.truncate(len);
                diff
            }),
            // Floats compare by their bits (-0.0 is not 0.0; NaN is never sent), and a float64
            // must come back as a float64: not a float32, not an int.
            (Value::F64(a), Value::F64(b)) if a.to_bits() == b.to_bits() => None,
            (Value::F64(_), Value::F64(_)) => Some(format!(
                "{path}: sent {}, got {}",
                describe(sent),
                describe(got)
            )),
            (a, b) if a == b => None,
            (a, b) => Some(format!("{path}: sent {}, got {}", describe(a), describe(b))),
        }
    }
    walk(sent, got, &mut String::from("body"))
}

/// A value's type and a short rendering of it, for failure reasons.
fn describe(v: &Value) -> String {
    const MAX: usize = 60;
    match v {
        Value::Nil => "nil".into(),
        Value::Boolean(b) => format!("bool {b}"),
        Value::Integer(i) => format!("int {i}"),
        Value::F32(x) => format!("float32 {x:?}"),
        Value::F64(x) => format!("float64 {x:?}"),
        Value::String(s) => match s.as_str() {
            Some(s) if s.chars().count() > MAX => {
                let head: String = s.chars().take(MAX).collect();
                format!("str of {} chars {head:?}...", s.chars().count())
            }
            Some(s) => format!("str {s:?}"),
            None => format!("invalid UTF-8 str of {} bytes", s.as_bytes().len()),
        },
        Value::Binary(b) if b.len() > 16 => format!("bin of {} bytes", b.len()),
        Value::Binary(b) => format!("bin {b:02x?}"),
        Value::Array(a) => format!("array of {}", a.len()),
        Value::Map(m) => format!("map of {}", m.len()),
        Value::Ext(tag, data) => format!("ext {tag} of {} bytes", data.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_compare_in_any_order_and_types_must_match() {
        let m = |pairs: Vec<(&str, Value)>| {
            Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
        };
        let a = m(vec![("x", 1.into()), ("y", Value::Array(vec![2.into()]))]);
        let b = m(vec![("y", Value::Array(vec![2.into()])), ("x", 1.into())]);
        assert_eq!(difference(&a, &b), None);

        let c = m(vec![
            ("y", Value::Array(vec![Value::F64(2.0)])),
            ("x", 1.into()),
        ]);
        let diff = difference(&a, &c).unwrap();
        assert!(
            diff.contains(r#"body["y"][0]: sent int 2, got float64 2.0"#),
            "{diff}"
        );

        let d = m(vec![("x", 1.into()), ("z", Value::Nil)]);
        assert!(difference(&a, &d).unwrap().contains("key missing"));
        assert!(difference(&Value::Nil, &Value::from(false)).is_some());
    }

    #[test]
    fn the_check_list_matches_the_echo_cases() {
        let echoes: Vec<_> = echo_cases().into_iter().map(|(name, _)| name).collect();
        assert_eq!(&CHECKS[1..=echoes.len()], echoes.as_slice());
    }

    #[test]
    fn floats_must_come_back_with_their_width_and_bits() {
        let sent = Value::F64(-0.0);
        let diff = difference(&sent, &Value::F64(0.0)).unwrap();
        assert!(
            diff.contains("sent float64 -0.0, got float64 0.0"),
            "{diff}"
        );
        let diff = difference(&Value::F64(1.5), &Value::F32(1.5)).unwrap();
        assert!(diff.contains("sent float64 1.5, got float32 1.5"), "{diff}");
        let diff = difference(&Value::F64(1.0), &Value::from(1)).unwrap();
        assert!(diff.contains("sent float64 1.0, got int 1"), "{diff}");
        assert_eq!(difference(&Value::F64(0.1), &Value::F64(0.1)), None);
    }

    /// The spec's check table and this module's list every check by name (the echo checks as
    /// the range `echo_nil` ... `echo_1mib`).
    #[test]
    fn the_check_tables_in_the_docs_name_every_check() {
        let spec = include_str!("../../docs/protocol.md");
        let module = include_str!("check.rs");
        let every = CHECKS.iter().chain(std::iter::once(&CONCURRENCY_CHECK));
        for name in every.filter(|n| !n.starts_with("echo_")) {
            for (doc, text) in [("docs/protocol.md", spec), ("check.rs", module)] {
                let row = format!("| `{name}` |");
                let pair = format!("`{name}`, `");
                let paired = format!(", `{name}` |");
                assert!(
                    text.contains(&row) || text.contains(&pair) || text.contains(&paired),
                    "{doc} has no check table row for {name}"
                );
            }
        }
        for text in [spec, module] {
            assert!(text.contains("| `echo_nil` ... `echo_1mib` |"));
        }
    }

    #[test]
    fn long_values_are_described_briefly() {
        assert_eq!(
            describe(&Value::Binary(vec![0; 1 << 20])),
            "bin of 1048576 bytes"
        );
        assert!(describe(&"x".repeat(300).into()).starts_with("str of 300 chars"));
    }
}
