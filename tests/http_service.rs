//! The HTTP service example (`examples/http_service.rs`), driven over real HTTP on localhost:
//! calls, sessions, bad requests, a worker SIGKILLed while requests are in flight, health,
//! metrics, a configuration file, and a graceful SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `http_service` example, built next to this test by `cargo test`.
fn service_exe() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    deps.parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("examples")
        .join("http_service")
}

/// A running service: killed if the test fails before it stops it.
struct Service {
    child: Child,
    addr: String,
}

impl Service {
    fn start(args: &[&str]) -> Service {
        let mut child = Command::new(service_exe())
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the http_service example runs");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        Service { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The service's worker processes: its children running the demo worker (each worker's
    /// watchdog is a child too).
    fn worker_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid())).unwrap() {
            let children =
                std::fs::read_to_string(task.unwrap().path().join("children")).unwrap_or_default();
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        pids.retain(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("wharf_worker.demo"))
        });
        pids
    }

    /// One request; the status and the body, or a panic if no answer comes within 30 s.
    async fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        tokio::time::timeout(
            Duration::from_secs(30),
            http(&self.addr, method, path, body),
        )
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer in 30 s (hung)"))
    }

    async fn json(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let (code, text) = self.request(method, path, body).await;
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: {code} {text:?} is not JSON: {e}"));
        (code, v)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 client: one request per connection.
async fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    (code, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_serves_calls_sessions_and_errors_and_survives_kills() {
    let svc = Service::start(&["--workers", "2"]);

    // A call, its reply as JSON.
    let (code, reply) = svc
        .json("POST", "/call/demo/echo", r#"{"hello": ["world", 1]}"#)
        .await;
    assert_eq!((code, reply), (200, json!({"hello": ["world", 1]})));
    // Bad requests get a 400 that says why, and the service keeps serving.
    let (code, err) = svc.json("POST", "/call/demo/echo", "{not json").await;
    assert_eq!(
        (code, err["error"].as_str()),
        (400, Some("bad_json")),
        "{err}"
    );
    let (code, err) = svc
        .json("POST", "/call/demo/echo?deadline_ms=soon", "1")
        .await;
    assert_eq!(
        (code, err["error"].as_str()),
        (400, Some("bad_query")),
        "{err}"
    );
    let (code, err) = svc.json("POST", "/call/nope/echo", "1").await;
    assert_eq!(
        (code, err["error"].as_str()),
        (404, Some("unknown_pool")),
        "{err}"
    );
    let (code, err) = svc.json("POST", "/call/demo/fail", r#""boom""#).await;
    assert_eq!(
        (code, err["error"].as_str()),
        (422, Some("remote")),
        "{err}"
    );
    assert_eq!(err["worker_error"]["message"], "boom");
    let (code, err) = svc
        .json("POST", "/call/demo/sleep?deadline_ms=100", "5000")
        .await;
    assert_eq!(
        (code, err["error"].as_str()),
        (504, Some("deadline_exceeded")),
        "{err}"
    );
    // A worker that watches its deadline and gives up first gets the same answer.
    let (code, err) = svc
        .json("POST", "/call/demo/wait?deadline_ms=300", r#"{"ms": 5000}"#)
        .await;
    assert_eq!(
        (code, err["error"].as_str()),
        (504, Some("deadline_exceeded")),
        "{err}"
    );
    assert_eq!(
        svc.json("POST", "/call/demo/echo", "7").await,
        (200, json!(7))
    );

    // Sessions keep state per client, and only for that client.
    let set = r#"{"key": "k", "value": "alice's"}"#;
    let get = r#"{"key": "k"}"#;
    assert_eq!(
        svc.json("POST", "/sessions/alice/call/state_set", set)
            .await
            .0,
        200
    );
    assert_eq!(
        svc.json("POST", "/sessions/alice/call/state_get", get)
            .await,
        (200, json!("alice's"))
    );
    assert_eq!(
        svc.json("POST", "/sessions/bob/call/state_get", get).await,
        (200, Value::Null)
    );
    assert_eq!(svc.request("DELETE", "/sessions/alice", "").await.0, 204);
    assert_eq!(svc.request("DELETE", "/sessions/bob", "").await.0, 204);
    assert_eq!(svc.json("DELETE", "/sessions/alice", "").await.0, 404);
    assert_eq!(
        svc.json("POST", "/sessions/alice/call/state_get", get)
            .await,
        (200, Value::Null),
        "a new session starts clean"
    );
    assert_eq!(svc.request("DELETE", "/sessions/alice", "").await.0, 204);

    // A worker SIGKILLed while requests are in flight: every request is answered, the failed
    // ones with a clear 5xx JSON error, and the pool comes back.
    let workers = {
        let mut pids = Vec::new();
        assert!(
            eventually(Duration::from_secs(15), || {
                pids = svc.worker_pids();
                pids.len() == 2
            })
            .await,
            "two workers: {pids:?}"
        );
        pids
    };
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let addr = svc.addr.clone();
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    http(&addr, "POST", "/call/demo/sleep", "300"),
                )
                .await
            })
        })
        .collect();
    // Killed while both workers are busy: exactly one call is under way on it.
    let busy = async {
        loop {
            let (_, stats) = svc.json("GET", "/stats", "").await;
            if stats["pools"][0]["stats"]["busy"] == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), busy)
        .await
        .expect("both workers busy");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(workers[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (mut ok, mut died) = (0, 0);
    for call in calls {
        let (code, body) = call.await.unwrap().expect("no request hangs");
        match code {
            200 => {
                assert_eq!(body, "300");
                ok += 1;
            }
            502 => {
                let err: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(err["error"], "worker_died", "{err}");
                assert!(err["message"].as_str().unwrap().contains("died"), "{err}");
                died += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(died, 1, "exactly the call on the killed worker fails");
    assert_eq!(ok, 11);
    let healthy = async {
        loop {
            let (code, health) = svc.json("GET", "/healthz", "").await;
            if code == 200 && health["status"] == "ok" {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let health = tokio::time::timeout(Duration::from_secs(15), healthy)
        .await
        .expect("the pool is back at full strength");
    assert_eq!(health["pools"]["demo"]["status"], "ok", "{health}");

    // What happened shows at /metrics.
    let (code, metrics) = svc.request("GET", "/metrics", "").await;
    assert_eq!(code, 200);
    for series in [
        r#"wharf_calls_total{pool="demo",method="echo",outcome="ok"} 2"#,
        r#"wharf_calls_total{pool="demo",method="sleep",outcome="worker_died"} 1"#,
        r#"wharf_calls_total{pool="demo",method="sleep",outcome="ok"} 11"#,
        r#"wharf_calls_total{pool="demo",method="fail",outcome="remote"} 1"#,
        r#"wharf_worker_exits_total{pool="demo",cause="crashed"} 1"#,
        // One, or two if the runtime also won the race of the worker that watches its deadline.
        r#"wharf_replacements_total{pool="demo",cause="deadline"} "#,
        r#"wharf_pool_status{pool="demo",status="running"} 1"#,
        "wharf_call_duration_seconds",
        "wharf_checkout_wait_seconds",
        r#"wharf_workers{pool="demo",state="idle"}"#,
    ] {
        assert!(metrics.contains(series), "no {series} in\n{metrics}");
    }

    // SIGTERM: drained, every worker stopped, exit 0.
    let workers = svc.worker_pids();
    let mut svc = svc;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(svc.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = svc.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    for pid in workers {
        assert!(!pid_exists(pid), "worker {pid} outlived the service");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_runs_the_pools_of_a_configuration_file() {
    let dir = std::env::temp_dir().join(format!("wharf-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[runtime]\nidle_timeout = \"1s\"\n\n[pools.ml]\nsize = 1\n[pools.ml.process]\ncommand = [\"python3\", \"-m\", \"wharf_worker.demo\"]\n\n\
         [pools.other]\nsize = 1\n[pools.other.process]\ncommand = [\"python3\", \"-m\", \"wharf_worker.demo\"]\n",
    )
    .unwrap();
    let svc = Service::start(&["--config", good.to_str().unwrap()]);
    assert_eq!(
        svc.json("POST", "/call/ml/echo", "1").await,
        (200, json!(1))
    );
    assert_eq!(
        svc.json("POST", "/call/other/echo", "2").await,
        (200, json!(2))
    );
    assert_eq!(svc.json("POST", "/call/demo/echo", "3").await.0, 404);
    // A client may shorten a deadline, not make it zero or longer than the pool's timeout.
    for bad in ["0", "31000"] {
        let (code, err) = svc
            .json("POST", &format!("/call/ml/echo?deadline_ms={bad}"), "1")
            .await;
        assert_eq!(
            (code, err["error"].as_str()),
            (400, Some("bad_query")),
            "{err}"
        );
    }
    // A pool the runtime stopped as idle starts again on its next request.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        svc.json("POST", "/call/ml/echo", "5").await,
        (200, json!(5))
    );
    let (code, health) = svc.json("GET", "/healthz", "").await;
    assert_eq!(code, 200, "{health}");
    // Sessions run in the file's first pool.
    assert_eq!(
        svc.json("POST", "/sessions/s/call/echo", "4").await,
        (200, json!(4))
    );
    drop(svc);

    // A bad file: the service refuses to start and says where the mistake is.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[pools.ml]\nsize = -3\n").unwrap();
    let out = Command::new(service_exe())
        .args(["--listen", "127.0.0.1:0", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pools.ml.size") && stderr.contains("bad.toml:2"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
