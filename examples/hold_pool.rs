//! Starts a pool of demo workers, has one fork a grandchild, prints every pid as one JSON line,
//! then waits forever. The reliability tests SIGKILL this program and check that no worker and
//! no grandchild outlives it.

use std::time::Duration;

use wharf::{Pool, ProcessSpec};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let workers: usize = std::env::args().nth(1).map_or(Ok(2), |a| a.parse())?;
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/python");
    let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"])
        .expect("non-empty argv")
        .env("PYTHONPATH", local.into_os_string());
    let pool = Pool::builder(spec).size(workers).build().await?;
    pool.wait_ready(workers, Duration::from_secs(30)).await?;
    let grandchild = pool.call("spawn_grandchild", &()).await?;
    let line = serde_json::json!({
        "runtime": std::process::id(),
        "workers": pool.worker_pids(),
        "grandchild": grandchild.as_u64(),
    });
    println!("{line}");
    std::future::pending::<()>().await;
    Ok(())
}
