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

use std::collections::{BTreeMap, HashMap};
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
    CallOptions, ConfigFile, Error, Pool, PoolConfig, PoolStatus, ProcessSpec, Runtime,
    RuntimeSettings, Session,
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
    /// Every pool the service serves, by name: a pool the runtime stopped as idle starts again
    /// on its next request.
    configs: BTreeMap<String, PoolConfig>,
    metrics: PrometheusHandle,
    session_pool: String,
    /// Open sessions by client id; each id has its own lock, so concurrent first requests for
    /// one id open one session, and different ids never wait for each other.
    sessions: std::sync::Mutex<HashMap<String, Arc<Mutex<Option<Session>>>>>,
}

impl App {
    /// The running pool `name`, started again if the runtime stopped it as idle; `None` if the
    /// service has no such pool.
    async fn pool(&self, name: &str) -> Option<Result<Pool, Error>> {
        if let Some(pool) = self.runtime.pool(name) {
            return Some(Ok(pool));
        }
        let config = self.configs.get(name)?.clone();
        Some(self.runtime.get_or_start(config).await)
    }

    /// The slot of session `id`, made if it is new.
    fn session_slot(&self, id: &str) -> Arc<Mutex<Option<Session>>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.entry(id.to_owned()).or_default().clone()
    }

    /// Forgets sessions that have ended (expired, lost): their ids hold no memory.
    fn prune_sessions(&self) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, slot| match slot.try_lock() {
            Ok(session) => session.as_ref().is_some_and(Session::is_open),
            Err(_) => true, // in use right now
        });
    }
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

    let (runtime, configs, session_pool) = match &args.config {
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
            let configs = file
                .configs()
                .map(|c| (c.name.clone(), c.clone()))
                .collect();
            (runtime, configs, session_pool)
        }
        None => {
            let runtime = Runtime::new(RuntimeSettings::default());
            let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"])
                .context("the demo worker's command")?;
            let demo = Pool::builder(spec)
                .name("demo")
                .size(args.workers)
                .into_config();
            runtime.get_or_start(demo.clone()).await?;
            let session_pool = args.session_pool.clone().unwrap_or_else(|| "demo".into());
            (
                runtime,
                BTreeMap::from([("demo".to_owned(), demo)]),
                session_pool,
            )
        }
    };

    let app = Arc::new(App {
        runtime,
        configs,
        metrics,
        session_pool,
        sessions: std::sync::Mutex::new(HashMap::new()),
    });
    let pruner = {
        let app = Arc::downgrade(&app);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(30));
            loop {
                ticks.tick().await;
                let Some(app) = app.upgrade() else { return };
                app.prune_sessions();
            }
        })
    };
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
    pruner.abort();
    let slots: Vec<_> = {
        let mut sessions = app.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.drain().map(|(_, slot)| slot).collect()
    };
    for slot in slots {
        if let Some(session) = slot.lock().await.take() {
            let _ = session.end().await;
        }
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

impl CallRequest {
    /// A client may shorten a call's deadline, not lengthen it past the pool's `call_timeout`
    /// nor make it zero (which would only get healthy workers killed).
    #[allow(clippy::result_large_err)]
    fn check_deadline(&self, pool: &Pool) -> Result<(), Response> {
        let Some(deadline) = self.options.deadline else {
            return Ok(());
        };
        let limit = pool.config().call_timeout;
        if deadline.is_zero() || deadline > limit {
            return Err(problem(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!(
                    "deadline_ms must be between 1 and the pool's call timeout ({} ms)",
                    limit.as_millis()
                ),
            ));
        }
        Ok(())
    }
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
    let pool = match app.pool(&pool).await {
        Some(Ok(pool)) => pool,
        Some(Err(e)) => return failure(&e),
        None => {
            return problem(
                StatusCode::NOT_FOUND,
                "unknown_pool",
                format!("no pool named {pool}"),
            )
        }
    };
    if let Err(bad) = call.check_deadline(&pool) {
        return bad;
    }
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
    let (pool, session) = match session(&app, &id).await {
        Ok(open) => open,
        Err(e) => return e,
    };
    if let Err(bad) = call.check_deadline(&pool) {
        return bad;
    }
    let result = session
        .call_with::<JsonValue>(&method, &call.body, call.options)
        .await;
    match result {
        Ok(reply) => Json(reply).into_response(),
        // Lost or ended: the slot is cleared by the next call under this id, which opens a
        // fresh session (a newer session under the id is never removed by mistake).
        Err(e) => failure(&e),
    }
}

/// The session pool and the open session `id`, opened now if it is not (or no longer) open.
async fn session(app: &App, id: &str) -> Result<(Pool, Session), Response> {
    let pool = match app.pool(&app.session_pool).await {
        Some(Ok(pool)) => pool,
        Some(Err(e)) => return Err(failure(&e)),
        None => {
            return Err(problem(
                StatusCode::NOT_FOUND,
                "unknown_pool",
                format!("no session pool named {}", app.session_pool),
            ))
        }
    };
    let slot = app.session_slot(id);
    // Held while the session opens (it may wait for a worker): a concurrent first request for
    // the same id waits here and then uses the session this one opened.
    let mut slot = slot.lock().await;
    if let Some(open) = slot.as_ref().filter(|s| s.is_open()) {
        return Ok((pool, open.clone()));
    }
    match pool.session(id).await {
        Ok(opened) => {
            *slot = Some(opened.clone());
            Ok((pool, opened))
        }
        Err(e) => Err(failure(&e)),
    }
}

async fn end_session(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let slot = app.session_slot(&id);
    let session = slot.lock().await.take();
    app.prune_sessions();
    match session {
        Some(session) if session.is_open() => match session.end().await {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => failure(&e),
        },
        _ => problem(
            StatusCode::NOT_FOUND,
            "unknown_session",
            format!("no open session {id}"),
        ),
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
    for name in app.configs.keys() {
        if !pools.contains_key(name) {
            // Stopped by the runtime after being idle: it starts on its next request.
            pools.insert(
                name.clone(),
                json!({"status": "idle", "reason": "stopped while idle; starts on its next request"}),
            );
        }
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
        Error::WorkerDied { .. } | Error::ProtocolViolation { .. } => StatusCode::BAD_GATEWAY,
        // The worker answered, with something JSON cannot say (a map with non-string keys,
        // bytes): the service's limit, not the worker's fault.
        Error::Reply { .. } => StatusCode::INTERNAL_SERVER_ERROR,
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
