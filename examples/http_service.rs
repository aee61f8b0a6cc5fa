//! An HTTP service that embeds wharf: pools of Python workers behind a JSON API, built on axum.
//!
//! ```text
//! cargo run --release --features metrics --example http_service -- --listen 127.0.0.1:8080
//! cargo run --release --features metrics --example http_service -- --config examples/wharf.toml
//!
//! curl -s -X POST localhost:8080/call/demo/echo -d '{"hello": "world"}'
//! curl -s -X POST 'localhost:8080/call/demo/sleep?deadline_ms=100' -d '1000'    # 504
//! curl -s -X POST localhost:8080/sessions/alice/call/state_set -d '{"key": "k", "value": 1}'
//! curl -s -X POST localhost:8080/sessions/alice/call/state_get -d '{"key": "k"}'
//! curl -s -X DELETE localhost:8080/sessions/alice
//! curl -s localhost:8080/healthz
//! curl -s localhost:8080/metrics
//! ```
//!
//! - `POST /call/{pool}/{method}`: the JSON body goes to the method of any free worker of the
//!   pool; its reply comes back as JSON. `?deadline_ms=N` bounds the call, `?idempotent=true`
//!   lets it be retried on another worker if its worker dies.
//! - `POST /sessions/{id}/call/{method}`: the same, on a worker pinned to the session `id`
//!   (opened on first use, in the session pool); `DELETE /sessions/{id}` ends it.
//! - `GET /healthz`: 200 while every pool serves (`ok`, or `degraded` with fewer ready workers
//!   than its size), 503 with the reason when one has failed.
//! - `GET /stats`: every pool's statistics as JSON. `GET /metrics`: Prometheus text.
//!
//! Errors are JSON `{"error": KIND, "message": ...}` with a status that says who should act:
//! 400 a bad request, 404 an unknown pool or session, 409 a session in use, 410 a session lost
//! or ended, 422 the worker's own error, 502 a worker that died or broke the protocol, 503 an
//! overloaded or failed pool (with `Retry-After` when it is only busy), 504 a deadline overrun.
//! SIGTERM or SIGINT: stop accepting, finish the requests under way, shut every pool down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use clap::Parser;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{json, Value as JsonValue};
use tokio::sync::Mutex;
use wharf::{
    CallOptions, ConfigFile, Error, Pool, PoolStatus, ProcessSpec, Runtime, RuntimeSettings,
    Session,
};

/// Serves wharf pools over HTTP.
#[derive(Parser, Debug)]
#[command(name = "http_service")]
struct Args {
    /// A wharf TOML file (`[pools.NAME]` tables). Without it: one pool named `demo` of Python
    /// demo workers.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (port 0: any free port; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The pool sessions run in (default: `demo`, or the file's first pool).
    #[arg(long)]
    session_pool: Option<String>,
    /// Workers of the built-in `demo` pool.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

/// What every handler shares.
struct App {
    runtime: Runtime,
    metrics: PrometheusHandle,
    session_pool: String,
    sessions: Mutex<HashMap<String, Session>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Installed before any pool starts, so every pool's series are recorded.
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .context("installing the Prometheus recorder")?;

    let (runtime, session_pool) = match &args.config {
        Some(path) => {
            let file = ConfigFile::load(path).map_err(|e| {
                // Every mistake, with its file, line and key.
                anyhow::anyhow!(
                    "{}",
                    e.issues()
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                )
                .context(e.to_string())
            })?;
            let runtime = Runtime::from_file(&file).await?;
            let first = file.pool_names().next().map(str::to_owned);
            let session_pool = args.session_pool.clone().or(first).unwrap_or_default();
            (runtime, session_pool)
        }
        None => {
            let runtime = Runtime::new(RuntimeSettings::default());
            let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"])
                .context("the demo worker's command")?;
            runtime
                .get_or_start(Pool::builder(spec).name("demo").size(args.workers))
                .await?;
            let session_pool = args.session_pool.clone().unwrap_or_else(|| "demo".into());
            (runtime, session_pool)
        }
    };

    let app = Arc::new(App {
        runtime,
        metrics,
        session_pool,
        sessions: Mutex::new(HashMap::new()),
    });
    let router = Router::new()
        .route("/call/{pool}/{method}", post(call))
        .route("/sessions/{id}/call/{method}", post(session_call))
        .route("/sessions/{id}", delete(end_session))
        .route("/healthz", get(healthz))
        .route("/stats", get(stats))
        .route("/metrics", get(render_metrics))
        .with_state(app.clone());

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!("listening on http://{}", listener.local_addr()?);
    let signal = wharf::shutdown_signal()?;
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let which = signal.await;
            eprintln!("{which:?}: draining and shutting down");
        })
        .await?;
    // Every request has been answered: end the sessions, then stop every pool.
    for (_, session) in app.sessions.lock().await.drain() {
        let _ = session.end().await;
    }
    app.runtime.shutdown().await;
    println!("shut down");
    Ok(())
}

/// `?deadline_ms=N&idempotent=true`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallQuery {
    deadline_ms: Option<u64>,
    #[serde(default)]
    idempotent: bool,
}

impl CallQuery {
    fn options(&self) -> CallOptions {
        let mut options = CallOptions::new();
        if let Some(ms) = self.deadline_ms {
            options = options.deadline(Duration::from_millis(ms));
        }
        if self.idempotent {
            options = options.idempotent();
        }
        options
    }
}

/// A call's options (from the query) and JSON body; a request with either wrong is answered
/// with a 400 that says what is wrong.
struct CallRequest {
    options: CallOptions,
    body: JsonValue,
}

impl<S: Send + Sync> FromRequest<S> for CallRequest {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let Query(query) = Query::<CallQuery>::from_request_parts(&mut parts, state)
            .await
            .map_err(|e| problem(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
        let bytes = Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(|e| problem(StatusCode::BAD_REQUEST, "bad_body", e.body_text()))?;
        let body = if bytes.is_empty() {
            JsonValue::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| {
                problem(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    format!("the body is not JSON: {e}"),
                )
            })?
        };
        Ok(CallRequest {
            options: query.options(),
            body,
        })
    }
}

async fn call(
    State(app): State<Arc<App>>,
    Path((pool, method)): Path<(String, String)>,
    call: CallRequest,
) -> Response {
    let Some(pool) = app.runtime.pool(&pool) else {
        return problem(
            StatusCode::NOT_FOUND,
            "unknown_pool",
            format!("no pool named {pool}"),
        );
    };
    match pool
        .call_with::<JsonValue>(&method, &call.body, call.options)
        .await
    {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => failure(&e),
    }
}

async fn session_call(
    State(app): State<Arc<App>>,
    Path((id, method)): Path<(String, String)>,
    call: CallRequest,
) -> Response {
    let session = match session(&app, &id).await {
        Ok(session) => session,
        Err(e) => return e,
    };
    let result = session
        .call_with::<JsonValue>(&method, &call.body, call.options)
        .await;
    match result {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => {
            if matches!(e, Error::SessionLost { .. } | Error::SessionEnded { .. }) {
                // Gone for good: the next call under this id opens a fresh session.
                app.sessions.lock().await.remove(&id);
            }
            failure(&e)
        }
    }
}

/// The open session `id`, opened now if it is not.
async fn session(app: &App, id: &str) -> Result<Session, Response> {
    if let Some(s) = app.sessions.lock().await.get(id) {
        return Ok(s.clone());
    }
    let Some(pool) = app.runtime.pool(&app.session_pool) else {
        return Err(problem(
            StatusCode::NOT_FOUND,
            "unknown_pool",
            format!("no session pool named {}", app.session_pool),
        ));
    };
    // Opened without the map's lock (it waits for a worker); a request that opened the same
    // id meanwhile wins, and this one uses its session.
    match pool.session(id).await {
        Ok(opened) => {
            let mut sessions = app.sessions.lock().await;
            Ok(sessions.entry(id.to_owned()).or_insert(opened).clone())
        }
        Err(Error::SessionInUse(_)) => match app.sessions.lock().await.get(id) {
            Some(s) => Ok(s.clone()),
            None => Err(failure(&Error::SessionInUse(id.to_owned()))),
        },
        Err(e) => Err(failure(&e)),
    }
}

async fn end_session(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let Some(session) = app.sessions.lock().await.remove(&id) else {
        return problem(
            StatusCode::NOT_FOUND,
            "unknown_session",
            format!("no open session {id}"),
        );
    };
    match session.end().await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => failure(&e),
    }
}

/// 200 while every pool serves (`ok`, or `degraded` with fewer ready workers than its size),
/// 503 when one has failed.
async fn healthz(State(app): State<Arc<App>>) -> Response {
    let mut failed = false;
    let mut degraded = false;
    let mut pools = serde_json::Map::new();
    for p in app.runtime.stats().pools {
        let (status, reason) = match &p.status {
            PoolStatus::Running => {
                let ready = p.stats.as_ref().map_or(0, |s| s.idle + s.busy);
                let size = p.stats.as_ref().map_or(0, |s| s.size);
                if ready < size {
                    degraded = true;
                    ("degraded", format!("{ready} of {size} workers ready"))
                } else {
                    ("ok", format!("{ready} of {size} workers ready"))
                }
            }
            PoolStatus::Starting => {
                degraded = true;
                ("degraded", "starting".to_owned())
            }
            PoolStatus::Failed(why) => {
                failed = true;
                ("failed", why.clone())
            }
            PoolStatus::ShutDown => {
                failed = true;
                ("failed", "shut down".to_owned())
            }
            other => {
                degraded = true;
                ("degraded", format!("{other:?}"))
            }
        };
        pools.insert(p.name, json!({"status": status, "reason": reason}));
    }
    let (code, status) = match (failed, degraded) {
        (true, _) => (StatusCode::SERVICE_UNAVAILABLE, "failed"),
        (false, true) => (StatusCode::OK, "degraded"),
        (false, false) => (StatusCode::OK, "ok"),
    };
    (code, Json(json!({"status": status, "pools": pools}))).into_response()
}

async fn stats(State(app): State<Arc<App>>) -> Response {
    let pools: Vec<_> = app
        .runtime
        .stats()
        .pools
        .into_iter()
        .map(|p| json!({"name": p.name, "status": p.status, "stats": p.stats}))
        .collect();
    Json(json!({ "pools": pools })).into_response()
}

async fn render_metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// An error as JSON, with a status saying who should act.
fn failure(e: &Error) -> Response {
    let code = match e {
        Error::Body(_) => StatusCode::BAD_REQUEST,
        Error::SessionInUse(_) | Error::PoolConflict { .. } => StatusCode::CONFLICT,
        Error::SessionLost { .. } | Error::SessionEnded { .. } => StatusCode::GONE,
        // The worker saw the deadline run out first and said so: the same answer as when the
        // runtime enforces it.
        Error::Remote { kind, .. } if kind == "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
        Error::Remote { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        Error::WorkerDied { .. } | Error::ProtocolViolation { .. } | Error::Reply { .. } => {
            StatusCode::BAD_GATEWAY
        }
        Error::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
        Error::Overloaded { .. } | Error::CheckoutTimeout { .. } => {
            let mut r = problem(StatusCode::SERVICE_UNAVAILABLE, e.kind(), e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let kind = match e {
        Error::Remote { kind, .. } if kind == "deadline_exceeded" => "deadline_exceeded",
        e => e.kind(),
    };
    let mut body = json!({"error": kind, "message": e.to_string()});
    if let Error::Remote { kind, message } = e {
        body["worker_error"] = json!({"kind": kind, "message": message});
    }
    (code, Json(body)).into_response()
}

fn problem(code: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (
        code,
        Json(json!({"error": kind, "message": message.into()})),
    )
        .into_response()
}
