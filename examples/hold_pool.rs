//! Starts a pool of demo workers, has one fork a grandchild, prints every pid as one JSON line,
//! then waits forever. The reliability tests SIGKILL this program and check that no worker and
//! no grandchild outlives it.
//!
//! `hold_pool N` holds N process workers; `hold_pool N --container POOL` holds N container
//! workers (the local host-Python image, its default FIFO transport) in a pool named POOL, and prints
//! their workers' names instead of a grandchild.

use std::time::Duration;

use wharf::image::{self, HostPythonOptions};
use wharf::{Engine, Pool, ProcessSpec};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let workers: usize = args.first().map_or(Ok(2), |a| a.parse())?;
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/python");
    if let Some(pool_name) = args
        .iter()
        .position(|a| a == "--container")
        .map(|i| &args[i + 1])
    {
        let engine = Engine::local(Duration::from_secs(10)).await?;
        let opts = HostPythonOptions {
            worker_package: Some(local.canonicalize()?),
            ..HostPythonOptions::default()
        };
        let img = image::ensure_host_python(&engine, &opts).await?;
        let pool = Pool::builder(img.spec(["-m", "wharf_worker.demo"]))
            .name(pool_name.as_str())
            .size(workers)
            .build()
            .await?;
        pool.wait_ready(workers, Duration::from_secs(60)).await?;
        let names: Vec<String> = pool.worker_info().into_iter().map(|w| w.id).collect();
        println!(
            "{}",
            serde_json::json!({"runtime": std::process::id(), "workers": names})
        );
        std::future::pending::<()>().await;
        return Ok(());
    }
    let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"])
        .expect("non-empty argv")
        .env("PYTHONPATH", local.into_os_string());
    let pool = Pool::builder(spec).size(workers).build().await?;
    pool.wait_ready(workers, Duration::from_secs(30)).await?;
    let grandchild: u64 = pool.call("spawn_grandchild", &()).await?;
    let line = serde_json::json!({
        "runtime": std::process::id(),
        "workers": pool.worker_pids(),
        "grandchild": grandchild,
    });
    println!("{line}");
    std::future::pending::<()>().await;
    Ok(())
}
