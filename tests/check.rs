//! `wharf check` against good workers (the Python demo and the Rust example, both channels) and
//! broken ones (`tests/workers/*.py`): each broken worker must fail the right check, with a
//! reason that names what it did wrong. Every test is bounded, so a hang fails instead of
//! hanging the suite.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use wharf::check::{
    run_checks, run_checks_with, CheckOptions, CheckReport, Outcome, CHECKS, CONCURRENCY_CHECK,
};
use wharf::{Channel, ProcessSpec};

/// The longest any one test may take.
const TEST_LIMIT: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn opts() -> CheckOptions {
    CheckOptions {
        // Generous: Python start-up on a loaded machine.
        init_timeout: Duration::from_secs(20),
        timeout: Duration::from_secs(10),
    }
}

fn rust_worker() -> ProcessSpec {
    ProcessSpec::new(env!("CARGO_BIN_EXE_wharf-example-worker"))
}

/// The Python SDK's demo worker, found through `PYTHONPATH` whether or not it is installed.
fn python_demo(args: &[&str]) -> ProcessSpec {
    ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"])
        .unwrap()
        .args(args.iter().copied())
        .env("PYTHONPATH", repo_root().join("protocol/python"))
}

/// A broken worker from `tests/workers/`.
fn fixture(script: &str) -> ProcessSpec {
    ProcessSpec::new("python3").args([repo_root().join("tests/workers").join(script)])
}

/// Runs the suite, failing the test if it takes longer than [`TEST_LIMIT`].
async fn check(spec: ProcessSpec, opts: CheckOptions) -> CheckReport {
    bounded(run_checks(spec, opts)).await
}

async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_LIMIT, fut)
        .await
        .expect("the checker hung")
}

/// Every check ran, in order, and passed (none skipped: both good workers offer `stream`).
fn assert_conforms(report: &CheckReport) {
    assert_passes(report, CHECKS);
}

/// Exactly the checks `expected` ran, in order, and passed.
fn assert_passes(report: &CheckReport, expected: &[&str]) {
    let names: Vec<_> = report.results.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, expected, "{report:#?}");
    let not_passed: Vec<_> = report
        .results
        .iter()
        .filter(|r| r.outcome != Outcome::Pass)
        .collect();
    assert!(not_passed.is_empty(), "{not_passed:#?}");
    assert!(report.all_passed());
}

/// The named check failed with a reason containing every one of `texts`.
fn assert_fails(report: &CheckReport, check: &str, texts: &[&str]) {
    match report.outcome(check) {
        Some(Outcome::Fail(why)) => {
            for text in texts {
                assert!(why.contains(text), "{check}: {why:?} lacks {text:?}");
            }
        }
        other => panic!("{check}: expected a failure mentioning {texts:?}, got {other:?}"),
    }
    assert!(!report.all_passed());
}

/// Exactly the named checks failed; every other check passed (none skipped).
fn assert_only_failed(report: &CheckReport, checks: &[&str]) {
    let names: Vec<_> = report.results.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, CHECKS, "{report:#?}");
    let failed: Vec<_> = report
        .results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Fail(_)))
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(failed, checks, "{report:#?}");
    assert_eq!(report.skipped(), 0, "{report:#?}");
}

/// The handshake failed as described and every other check was skipped.
fn assert_handshake_fails(report: &CheckReport, texts: &[&str]) {
    assert_fails(report, "handshake", texts);
    assert_eq!(report.results.len(), CHECKS.len(), "{report:#?}");
    assert_eq!(report.failed(), 1, "{report:#?}");
    assert_eq!(report.skipped(), CHECKS.len() - 1, "{report:#?}");
}

// -- conforming workers ---------------------------------------------------------------------

#[tokio::test]
async fn the_python_demo_conforms_over_fds() {
    assert_conforms(&check(python_demo(&[]), opts()).await);
}

#[tokio::test]
async fn the_python_demo_conforms_over_stdio() {
    assert_conforms(&check(python_demo(&[]).channel(Channel::Stdio), opts()).await);
}

#[tokio::test]
async fn the_python_demo_serving_many_calls_at_once_conforms_and_passes_the_concurrency_check() {
    let report = check(python_demo(&["--max-concurrency", "8"]), opts()).await;
    assert_passes(&report, &with_concurrency_check());
}

/// Every check, with the concurrency check where it runs (after `session`).
fn with_concurrency_check() -> Vec<&'static str> {
    let mut expected = CHECKS.to_vec();
    let after = expected.iter().position(|n| *n == "session").unwrap() + 1;
    expected.insert(after, CONCURRENCY_CHECK);
    expected
}

#[tokio::test]
async fn the_rust_example_serving_many_calls_at_once_conforms_and_passes_the_concurrency_check() {
    for channel in [Channel::Fds, Channel::Stdio] {
        let spec = rust_worker()
            .args(["--max-concurrency", "8"])
            .channel(channel);
        assert_passes(&check(spec, opts()).await, &with_concurrency_check());
    }
}

#[tokio::test]
async fn a_worker_declaring_concurrency_it_does_not_serve_fails_the_concurrency_check() {
    // Sync handlers on the event loop, no threads: the declared 4 calls run one at a time.
    let report = check(
        python_demo(&["--max-concurrency", "4", "--threads", "0"]),
        opts(),
    )
    .await;
    assert_fails(
        &report,
        CONCURRENCY_CHECK,
        &["max_concurrency 4", "does not serve them at once"],
    );
}

#[tokio::test]
async fn the_rust_example_conforms_over_fds() {
    assert_conforms(&check(rust_worker(), opts()).await);
}

#[tokio::test]
async fn the_rust_example_conforms_over_stdio() {
    assert_conforms(&check(rust_worker().channel(Channel::Stdio), opts()).await);
}

#[tokio::test]
async fn results_are_reported_as_they_come_and_the_suite_is_send() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // tokio::spawn needs a Send future: the checker can run on any task.
    let task = tokio::spawn(run_checks_with(rust_worker(), opts(), move |r| {
        let _ = tx.send(r.clone());
    }));
    let report = bounded(task).await.unwrap();
    let mut streamed = Vec::new();
    while let Ok(r) = rx.try_recv() {
        streamed.push(r);
    }
    assert_eq!(streamed, report.results);
}

#[tokio::test]
async fn a_small_max_frame_skips_the_1mib_echo_instead_of_failing_it() {
    let report = check(rust_worker().max_frame(512 * 1024), opts()).await;
    match report.outcome("echo_1mib") {
        Some(Outcome::Skip(why)) => assert!(why.contains("exceeds max_frame"), "{why}"),
        other => panic!("echo_1mib: {other:?}"),
    }
    assert!(report.all_passed(), "{report:#?}");
}

// -- workers that break the protocol after a good handshake ---------------------------------

#[tokio::test]
async fn a_wrong_request_id_fails() {
    let report = check(fixture("wrong_id.py"), opts()).await;
    assert_eq!(report.outcome("handshake"), Some(&Outcome::Pass));
    assert_fails(&report, "echo_nil", &["unknown request id 4000000000"]);
    // Every check gets a fresh worker, which breaks the same way.
    assert_fails(&report, "ping", &["unknown request id"]);
    assert_eq!(report.outcome("eof_exits"), Some(&Outcome::Pass));
}

#[tokio::test]
async fn a_truncated_frame_fails() {
    let report = check(fixture("truncated.py"), opts()).await;
    assert_eq!(report.outcome("handshake"), Some(&Outcome::Pass));
    assert_fails(&report, "echo_nil", &["truncated frame", "14 of 104 bytes"]);
}

#[tokio::test]
async fn an_oversized_frame_fails() {
    let report = check(fixture("oversized.py"), opts()).await;
    assert_eq!(report.outcome("handshake"), Some(&Outcome::Pass));
    assert_fails(
        &report,
        "echo_nil",
        &["frame of 4294967295 bytes exceeds max_frame"],
    );
}

#[tokio::test]
async fn garbage_messagepack_fails() {
    let report = check(fixture("garbage.py"), opts()).await;
    assert_eq!(report.outcome("handshake"), Some(&Outcome::Pass));
    assert_fails(&report, "echo_nil", &["malformed message"]);
}

#[tokio::test]
async fn a_worker_that_dies_mid_suite_fails_each_check_with_its_exit_and_the_rest_still_run() {
    let report = check(fixture("crash_on_call.py"), opts()).await;
    assert_eq!(report.outcome("handshake"), Some(&Outcome::Pass));
    // Each check got a fresh worker and saw that one die: none is masked by the first crash.
    let died = [
        "worker died",
        "exit status: 5",
        "crash_on_call: dying on purpose",
    ];
    for name in ["echo_nil", "echo_1mib", "unknown_method", "ping", "reset"] {
        assert_fails(&report, name, &died);
    }
    assert_fails(
        &report,
        "shutdown_exits",
        &["exit status: 5", "expected exit status 0"],
    );
    assert_eq!(report.outcome("eof_exits"), Some(&Outcome::Pass));
    assert_eq!(report.results.len(), CHECKS.len());
}

#[tokio::test]
async fn a_worker_that_never_answers_fails_by_timeout_not_by_hanging() {
    let opts = CheckOptions {
        timeout: Duration::from_millis(300),
        ..opts()
    };
    let start = Instant::now();
    let report = check(fixture("silent_on_call.py"), opts).await;
    assert_eq!(report.outcome("handshake"), Some(&Outcome::Pass));
    for name in ["echo_nil", "unknown_method", "ping", "reset"] {
        assert_fails(&report, name, &["did not answer within 300ms"]);
    }
    assert_fails(
        &report,
        "shutdown_exits",
        &["still running 300ms after shutdown"],
    );
    assert_eq!(report.outcome("eof_exits"), Some(&Outcome::Pass));
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
}

// -- workers that break one rule each (tests/workers/_rawframe.py's `Conforming`, overridden) --

#[tokio::test]
async fn the_stdlib_conforming_worker_conforms() {
    assert_conforms(&check(fixture("conforming.py"), opts()).await);
}

#[tokio::test]
async fn a_worker_that_ignores_cancel_fails_cancel() {
    let report = check(fixture("ignores_cancel.py"), opts()).await;
    assert_fails(
        &report,
        "cancel",
        &[
            "still running 2s after its cancel",
            "read its input while a call runs",
        ],
    );
    assert_only_failed(&report, &["cancel"]);
}

#[tokio::test]
async fn a_worker_that_ignores_deadline_ms_fails_deadline() {
    let report = check(fixture("ignores_deadline.py"), opts()).await;
    assert_fails(
        &report,
        "deadline",
        &["deadline_ms 300 was still running", "deadline_exceeded"],
    );
    assert_only_failed(&report, &["deadline"]);
}

#[tokio::test]
async fn a_worker_that_keeps_session_state_across_reset_fails_session() {
    let report = check(fixture("leaks_session.py"), opts()).await;
    assert_fails(
        &report,
        "session",
        &[
            "state leaked across reset",
            "returned str \"set in wharf.check.session-a\"",
        ],
    );
    assert_only_failed(&report, &["session"]);
}

#[tokio::test]
async fn a_worker_that_keeps_state_per_session_but_never_drops_it_fails_session() {
    let report = check(fixture("keeps_session_state.py"), opts()).await;
    assert_fails(
        &report,
        "session",
        &[
            "state leaked across reset",
            "state_get in session wharf.check.session-a returned str",
        ],
    );
    assert_only_failed(&report, &["session"]);
}

#[tokio::test]
async fn a_worker_that_waits_for_an_oversized_payload_fails_oversized_frame() {
    let report = check(fixture("waits_for_oversized_payload.py"), opts()).await;
    assert_fails(
        &report,
        "oversized_frame",
        &[
            "still running 2s after a frame header announcing 8388609 bytes",
            "WHARF_MAX_FRAME is 8388608",
            "non-zero status",
        ],
    );
    assert_only_failed(&report, &["oversized_frame"]);
}

#[tokio::test]
async fn the_oversized_header_follows_the_max_frame_the_worker_was_given() {
    let report = check(
        fixture("waits_for_oversized_payload.py").max_frame(2 * 1024 * 1024),
        opts(),
    )
    .await;
    assert_fails(
        &report,
        "oversized_frame",
        &["announcing 2097153 bytes (WHARF_MAX_FRAME is 2097152)"],
    );
    // The conforming worker checks the header against the same limit, and exits.
    let report = check(fixture("conforming.py").max_frame(2 * 1024 * 1024), opts()).await;
    assert_eq!(report.outcome("oversized_frame"), Some(&Outcome::Pass));
}

#[tokio::test]
async fn a_worker_that_exits_0_on_garbage_fails_malformed_payload() {
    let report = check(fixture("exits_0_on_malformed.py"), opts()).await;
    assert_fails(
        &report,
        "malformed_payload",
        &[
            "exited with status 0 after a frame of invalid MessagePack",
            "non-zero status",
        ],
    );
    assert_only_failed(&report, &["malformed_payload"]);
}

#[tokio::test]
async fn a_worker_that_skips_a_non_map_payload_fails_not_a_map() {
    let report = check(fixture("ignores_non_map.py"), opts()).await;
    assert_fails(
        &report,
        "not_a_map",
        &[
            "still running",
            "the array [1, 2, 3] instead of a map",
            "keep serving",
        ],
    );
    assert_only_failed(&report, &["not_a_map"]);
}

#[tokio::test]
async fn a_worker_that_ignores_an_unknown_message_type_fails_unknown_type() {
    let report = check(fixture("ignores_unknown_type.py"), opts()).await;
    assert_fails(
        &report,
        "unknown_type",
        &["still running", "unknown type \"wharf.check.no_such_type\""],
    );
    assert_only_failed(&report, &["unknown_type"]);
}

#[tokio::test]
async fn a_worker_that_takes_a_truncated_frame_for_a_clean_close_fails_truncated_frame() {
    let report = check(fixture("truncated_exits_0.py"), opts()).await;
    assert_fails(
        &report,
        "truncated_frame",
        &["exited with status 0 after half a frame, then EOF"],
    );
    assert_only_failed(&report, &["truncated_frame"]);
}

#[tokio::test]
async fn a_worker_that_narrows_floats_to_float32_fails_the_float_echoes() {
    let report = check(fixture("float32.py"), opts()).await;
    assert_fails(
        &report,
        "echo_float",
        &["body[0]: sent float64 0.0, got float32 0.0"],
    );
    assert_fails(
        &report,
        "echo_nested",
        &["sent float64 3.5, got float32 3.5"],
    );
    assert_only_failed(&report, &["echo_float", "echo_nested"]);
}

#[tokio::test]
async fn a_worker_that_turns_integral_floats_into_ints_fails_echo_float() {
    let report = check(fixture("int_floats.py"), opts()).await;
    assert_fails(
        &report,
        "echo_float",
        &["body[0]: sent float64 0.0, got int 0"],
    );
    assert_only_failed(&report, &["echo_float"]);
}

#[tokio::test]
async fn a_stream_out_of_order_fails_stream() {
    let report = check(fixture("stream_out_of_order.py"), opts()).await;
    assert_fails(
        &report,
        "stream",
        &["chunk seq 4 with body int 4; expected seq 0 with body 0"],
    );
    assert_only_failed(&report, &["stream"]);
}

#[tokio::test]
async fn a_second_pong_fails_ping_not_the_next_check() {
    let report = check(fixture("duplicate_pong.py"), opts()).await;
    assert_fails(
        &report,
        "ping",
        &["after the check passed", "unknown request id", "pong"],
    );
    assert_only_failed(&report, &["ping"]);
}

#[tokio::test]
async fn a_second_init_pong_fails_the_handshake_itself() {
    let report = check(fixture("duplicate_init_pong.py"), opts()).await;
    assert_fails(
        &report,
        "handshake",
        &[
            "after a good init_pong",
            "unknown request id 0",
            "init_pong",
        ],
    );
    // Every fresh worker sends its second init_pong too: each check sees its own.
    assert_fails(&report, "echo_nil", &["unknown request id 0", "init_pong"]);
}

#[tokio::test]
async fn a_worker_that_exits_on_an_init_of_another_version_fails_init_version() {
    for spec in [
        fixture("refuses_other_version.py"),
        fixture("refuses_other_version.py").channel(Channel::Stdio),
    ] {
        let report = check(spec, opts()).await;
        assert_fails(
            &report,
            "init_version",
            &[
                "no init_pong after an init with version 2",
                "exit status: 2",
                "stating its own",
                "RefusesOtherVersion: protocol violation by the runtime: init with version 2",
            ],
        );
    }
    let report = check(fixture("refuses_other_version.py"), opts()).await;
    assert_only_failed(&report, &["init_version"]);
}

#[tokio::test]
async fn a_reset_ok_without_a_body_fails_reset() {
    let report = check(fixture("reset_ok_without_body.py"), opts()).await;
    assert_fails(
        &report,
        "reset",
        &["malformed message", "missing field `body`"],
    );
    // The session check resets too.
    assert_only_failed(&report, &["reset", "session"]);
}

#[tokio::test]
async fn a_reset_ok_with_a_body_fails_reset() {
    let report = check(fixture("reset_ok_with_body.py"), opts()).await;
    assert_fails(
        &report,
        "reset",
        &[
            "ok with a non-nil body for reset",
            "a reset's ok carries nil",
        ],
    );
    assert_only_failed(&report, &["reset", "session"]);
}

// -- workers that never become ready --------------------------------------------------------

#[tokio::test]
async fn silence_at_init_fails_the_handshake_by_init_timeout() {
    let opts = CheckOptions {
        init_timeout: Duration::from_secs(1),
        ..opts()
    };
    let start = Instant::now();
    let report = check(fixture("silent_init.py"), opts).await;
    assert_handshake_fails(&report, &["did not answer the init ping within 1s"]);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_crash_at_start_fails_the_handshake_with_status_and_stderr() {
    let report = check(fixture("crash_at_start.py"), opts()).await;
    assert_handshake_fails(
        &report,
        &[
            "exited before it was ready",
            "exit status: 3",
            "crash_at_start: cannot load the model",
        ],
    );
}

#[tokio::test]
async fn a_refused_init_fails_the_handshake_with_the_workers_reason() {
    let report = check(python_demo(&["--init-fail", "no GPU"]), opts()).await;
    assert_handshake_fails(&report, &["refused to start", "no GPU"]);
}

#[tokio::test]
async fn a_missing_command_fails_the_handshake() {
    let report = check(ProcessSpec::new("wharf-no-such-worker"), opts()).await;
    assert_handshake_fails(&report, &["cannot spawn", "wharf-no-such-worker"]);
}

// -- the binary -----------------------------------------------------------------------------

/// Runs `wharf ARGS...`, bounded; returns its exit code and stdout.
async fn wharf(args: &[&str]) -> (Option<i32>, String) {
    let out = bounded(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
    )
}

#[tokio::test]
async fn the_cli_exits_0_on_a_conforming_worker_1_on_a_broken_one_2_on_bad_usage() {
    let worker = env!("CARGO_BIN_EXE_wharf-example-worker");
    for channel in [&[][..], &["--stdio"][..]] {
        let args = [&["check"][..], channel, &["--", worker][..]].concat();
        let (code, out) = wharf(&args).await;
        assert_eq!(code, Some(0), "{out}");
        let lines: Vec<_> = out.lines().collect();
        let expected: Vec<_> = CHECKS.iter().map(|c| format!("PASS {c}")).collect();
        assert_eq!(lines[..lines.len() - 1], expected, "{out}");
        let summary = format!("{} passed, 0 failed", CHECKS.len());
        assert_eq!(lines.last(), Some(&summary.as_str()), "{out}");
    }

    let script = repo_root().join("tests/workers/crash_at_start.py");
    let (code, out) = wharf(&["check", "--", "python3", script.to_str().unwrap()]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.lines().any(
            |l| l.starts_with("FAIL handshake: worker exited before it was ready")
                && l.contains("exit status: 3")
        ),
        "{out}"
    );
    assert!(
        out.contains("SKIP eof_exits: the handshake failed"),
        "{out}"
    );
    let summary = format!("0 passed, 1 failed, {} skipped", CHECKS.len() - 1);
    assert_eq!(out.lines().last(), Some(summary.as_str()), "{out}");

    assert_eq!(wharf(&["check"]).await.0, Some(2));
    assert_eq!(
        wharf(&["check", "--timeout-ms", "x", "--", "true"]).await.0,
        Some(2)
    );
}
