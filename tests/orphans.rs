//! When the runtime itself dies (SIGKILL, no cleanup at all), none of its workers survive,
//! nor anything a worker forked.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The `hold_pool` example, built next to this test by `cargo test`.
fn hold_pool_exe() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let target = deps.parent().and_then(|p| p.parent()).unwrap();
    target.join("examples").join("hold_pool")
}

#[tokio::test]
async fn no_worker_or_grandchild_outlives_a_sigkilled_runtime() {
    let exe = hold_pool_exe();
    assert!(exe.exists(), "{} is built by cargo test", exe.display());
    let mut holder = Command::new(&exe)
        .arg("3")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&line).expect("pids line");
    let mut pids: Vec<u32> = report["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(pids.len(), 3);
    let grandchild = report["grandchild"].as_u64().unwrap() as u32;
    pids.push(grandchild);
    for pid in &pids {
        assert!(pid_exists(*pid), "{pid} runs before the kill");
    }

    sigkill(holder.id());
    holder.wait().unwrap();

    for pid in &pids {
        assert!(
            eventually(Duration::from_secs(5), || !pid_exists(*pid)).await,
            "process {pid} outlived the runtime (grandchild is {grandchild})"
        );
    }
    println!(
        "{}",
        serde_json::json!({"scenario": "runtime_sigkilled", "workers": 3, "grandchildren": 1, "orphans": 0})
    );
}
