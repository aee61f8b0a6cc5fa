//! `wharf check` against good workers (Python SDK, Rust SDK, both channels) and broken ones:
//! each broken worker must fail, with a reason that names what it did wrong.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use wharf::check::{run_checks, CheckOptions, CheckReport, Outcome};
use wharf::{Channel, ProcessSpec};

fn opts() -> CheckOptions {
    CheckOptions {
        init_timeout: Duration::from_secs(20),
        timeout: Duration::from_secs(10),
    }
}

fn rust_worker() -> ProcessSpec {
    ProcessSpec::new(env!("CARGO_BIN_EXE_wharf-example-worker"))
}

fn hostile(args: &[&str]) -> ProcessSpec {
    ProcessSpec::from_argv(["python3"])
        .unwrap()
        .args([repo_root()
            .join("tests/workers/hostile.py")
            .into_os_string()])
        .args(args.iter().copied())
}

fn assert_all_pass(report: &CheckReport) {
    let failures: Vec<_> = report
        .results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Fail(_)))
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(report.passed() >= 15, "{report:#?}");
}

/// The named check failed with a reason containing `text`.
fn assert_fails(report: &CheckReport, check: &str, text: &str) {
    match report.outcome(check) {
        Some(Outcome::Fail(why)) => assert!(why.contains(text), "{check}: {why:?} lacks {text:?}"),
        other => panic!("{check}: expected a failure mentioning {text:?}, got {other:?}"),
    }
    assert!(!report.all_passed());
}

#[tokio::test]
async fn the_python_demo_worker_conforms_in_both_channels() {
    init_logs();
    assert_all_pass(&run_checks(demo_spec(&[]), &opts()).await);
    assert_all_pass(&run_checks(demo_spec(&[]).channel(Channel::Stdio), &opts()).await);
}

#[tokio::test]
async fn the_rust_example_worker_conforms_in_both_channels() {
    assert_all_pass(&run_checks(rust_worker(), &opts()).await);
    assert_all_pass(&run_checks(rust_worker().channel(Channel::Stdio), &opts()).await);
}

#[tokio::test]
async fn a_wrong_request_id_fails() {
    let report = run_checks(hostile(&["--on-call", "unknown_id"]), &opts()).await;
    assert_eq!(report.outcome("handshake"), Some(&Outcome::Pass));
    assert_fails(&report, "echo_nil", "unknown request id");
}

#[tokio::test]
async fn a_truncated_frame_fails() {
    let report = run_checks(hostile(&["--on-call", "truncated_eof"]), &opts()).await;
    assert_fails(&report, "echo_nil", "truncated frame");
}

#[tokio::test]
async fn an_oversized_frame_fails() {
    let report = run_checks(hostile(&["--on-call", "oversized"]), &opts()).await;
    assert_fails(&report, "echo_nil", "exceeds max_frame");
}

#[tokio::test]
async fn garbage_messagepack_fails() {
    let report = run_checks(hostile(&["--on-call", "garbage"]), &opts()).await;
    assert_fails(&report, "echo_nil", "malformed message");
}

#[tokio::test]
async fn silence_at_init_fails_the_handshake() {
    let short = CheckOptions {
        init_timeout: Duration::from_secs(1),
        ..opts()
    };
    let report = run_checks(hostile(&["--silent-init"]), &short).await;
    assert_fails(&report, "handshake", "did not answer the init ping");
}

#[tokio::test]
async fn a_crash_at_start_fails_the_handshake_with_status_and_stderr() {
    let report = run_checks(hostile(&["--crash-at-start"]), &opts()).await;
    assert_fails(&report, "handshake", "exited before it was ready");
    assert_fails(&report, "handshake", "exit status: 3");
    assert_fails(&report, "handshake", "hostile: crashing at start");
}

#[tokio::test]
async fn a_missing_command_fails_the_handshake() {
    let report = run_checks(ProcessSpec::new("wharf-no-such-worker"), &opts()).await;
    assert_fails(&report, "handshake", "cannot spawn");
}

#[tokio::test]
async fn a_worker_that_dies_mid_suite_fails_that_check_and_the_rest_still_run() {
    // The handshake passes; every call then makes the worker close its channel and hang.
    let report = run_checks(hostile(&["--on-call", "close_fd"]), &opts()).await;
    assert_eq!(report.outcome("handshake"), Some(&Outcome::Pass));
    assert_fails(&report, "echo_nil", "worker died");
    assert_fails(&report, "echo_1mib", "worker died");
    // Control messages do not go through the broken call path: a fresh worker answers them.
    assert_eq!(report.outcome("ping"), Some(&Outcome::Pass));
}

fn wharf_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wharf"))
}

#[test]
fn the_cli_exits_0_on_a_conforming_worker_and_1_on_a_broken_one() {
    let good = Command::new(wharf_bin())
        .args(["check", "--", env!("CARGO_BIN_EXE_wharf-example-worker")])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&good.stdout);
    assert_eq!(good.status.code(), Some(0), "{out}");
    assert!(out.lines().any(|l| l == "16 passed, 0 failed"), "{out}");
    assert!(out.contains("PASS handshake"));

    let script = repo_root().join("tests/workers/hostile.py");
    let bad = Command::new(wharf_bin())
        .args(["check", "--", "python3"])
        .arg(script)
        .arg("--crash-at-start")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{out}");
    assert!(
        out.contains("FAIL handshake: worker exited before it was ready"),
        "{out}"
    );
    assert!(out.lines().last().unwrap().ends_with("1 skipped"), "{out}");
}
