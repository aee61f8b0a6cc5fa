//! The main job, as a user runs it: `python_bridge` under SIGKILLs ends with every call
//! accounted for and none hung; and with a worker that cannot start it ends quickly with the
//! pool's error instead of spinning.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{example_exe, example_summary};

/// The `python_bridge` example, built next to this test by `cargo test`.
fn bridge_exe() -> PathBuf {
    example_exe("python_bridge")
}

#[test]
fn the_bridge_serves_through_kills_with_no_hung_call() {
    let out = Command::new(bridge_exe())
        .args([
            "--workers",
            "3",
            "--calls",
            "10000",
            "--concurrency",
            "12",
            "--kill-every",
            "100",
            "--json",
        ])
        .output()
        .expect("python_bridge runs");
    let summary = example_summary(&out, 10000);
    assert_eq!(summary["calls"], 10000);
    assert!(summary["kills"].as_u64().unwrap() >= 1, "the killer ran");
    assert_eq!(summary["recovered"], true);
    for key in ["restarts", "p50_us", "p99_us", "throughput_per_s"] {
        assert!(summary[key].is_number(), "{key} in {summary}");
    }
}

#[test]
fn a_worker_that_cannot_start_ends_the_run_quickly_with_the_pools_error() {
    for worker in [
        "wharf-no-such-worker",
        "python3 -c 'import sys; sys.exit(4)'",
    ] {
        let started = Instant::now();
        let out = Command::new(bridge_exe())
            .args(["--workers", "2", "--worker", worker])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{worker}: {stderr}");
        assert!(stderr.contains("failed"), "{worker}: {stderr}");
        assert!(
            stderr.contains("exit status: 4") || stderr.contains("cannot spawn"),
            "{worker}: {stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{worker}: took {:?}",
            started.elapsed()
        );
    }
}
