//! Worker images built without a registry (`wharf::image`), each proved by running a container
//! of it and driving the packet protocol through Docker's attach stream (`WHARF_CHANNEL=stdio`),
//! and by running a pool whose workers are `docker run` processes.
//!
//! These tests need a Docker engine. Without one they say so on stderr and skip; under
//! `CI=true` a missing engine fails them. Every container carries the label `wharf.test=1` and
//! `wharf.test.case=<test>`, and each test removes its case's leftovers first and its own
//! containers last. Images are left in place (they are cheap, and reused by content hash).
//!
//! The Debian image test is `#[ignore]`d (about a minute, needs `debootstrap` and Debian's
//! package servers): `cargo test -p wharf --test images -- --ignored debian`.

mod common;

use std::collections::HashMap;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bytes::BytesMut;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};
use wharf::image::{
    self, DebianPythonOptions, HostPythonOptions, ImageError, Mount, StaticBinaryOptions,
};
use wharf::{Channel, Engine, Pool, ProcessSpec};
use wharf_protocol::{FromWorker, InitStatus, MessageCodec, ToWorker, Value, DEFAULT_MAX_FRAME};

/// How long any one step against the engine or a worker may take.
const STEP: Duration = Duration::from_secs(30);

/// Labels on this test's images (a tag of their own, so a user's images are left alone).
fn test_labels() -> Vec<(String, String)> {
    vec![("wharf.test".to_owned(), "1".to_owned())]
}

/// Options for the test's host-Python image: the repository's own `wharf_worker`.
fn host_python_options() -> HostPythonOptions {
    HostPythonOptions {
        tag: "wharf-test/host-python:latest".to_owned(),
        worker_package: Some(common::repo_root().join("protocol/python")),
        labels: test_labels(),
        ..HostPythonOptions::default()
    }
}

/// Force-removes every container labelled with this test case.
async fn sweep(engine: &Engine, case: &str) {
    let mut filters = HashMap::new();
    filters.insert("label".to_owned(), vec![format!("wharf.test.case={case}")]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let leftovers = engine
        .docker()
        .list_containers(Some(options))
        .await
        .expect("list containers");
    for c in leftovers {
        if let Some(id) = c.id {
            remove(engine, &id).await;
        }
    }
}

/// The ids of this case's containers, running or not.
async fn containers(engine: &Engine, case: &str) -> Vec<String> {
    let mut filters = HashMap::new();
    filters.insert("label".to_owned(), vec![format!("wharf.test.case={case}")]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    engine
        .docker()
        .list_containers(Some(options))
        .await
        .expect("list containers")
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

async fn remove(engine: &Engine, id: &str) {
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    let _ = engine.docker().remove_container(id, Some(options)).await;
}

/// What to run: an image, its entrypoint/command, mounts, environment.
struct Run<'a> {
    case: &'a str,
    image: &'a str,
    entrypoint: Option<Vec<String>>,
    cmd: Vec<String>,
    mounts: &'a [Mount],
    env: Vec<String>,
}

/// A container worker driven over its attach stream.
struct Attached {
    id: String,
    input: Pin<Box<dyn AsyncWrite + Send>>,
    output: Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>,
    /// Stdout bytes not yet decoded: attach chunks do not line up with frames.
    buf: BytesMut,
    codec: MessageCodec<FromWorker, ToWorker>,
    stderr: String,
    case: String,
    created: Instant,
}

/// Creates a container with wharf's secure defaults, attaches stdin/stdout/stderr (before
/// start, so no output is lost), and starts it.
async fn start(engine: &Engine, run: Run<'_>) -> Attached {
    let began = Instant::now();
    let mut env = vec![
        "WHARF_CHANNEL=stdio".to_owned(),
        format!("WHARF_MAX_FRAME={DEFAULT_MAX_FRAME}"),
        format!("WHARF_WORKER_ID={}", run.case),
    ];
    env.extend(run.env);
    let labels = HashMap::from([
        ("wharf.test".to_owned(), "1".to_owned()),
        ("wharf.test.case".to_owned(), run.case.to_owned()),
    ]);
    let host = HostConfig {
        binds: Some(run.mounts.iter().map(Mount::bind).collect()),
        network_mode: Some("none".to_owned()),
        init: Some(true),
        readonly_rootfs: Some(true),
        tmpfs: Some(HashMap::from([(
            "/tmp".to_owned(),
            "rw,noexec,nosuid,size=16m".to_owned(),
        )])),
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
        memory: Some(256 << 20),
        pids_limit: Some(64),
        ..HostConfig::default()
    };
    let body = ContainerCreateBody {
        image: Some(run.image.to_owned()),
        entrypoint: run.entrypoint,
        cmd: Some(run.cmd),
        env: Some(env),
        user: Some("65534:65534".to_owned()),
        labels: Some(labels),
        open_stdin: Some(true),
        stdin_once: Some(true),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(false),
        host_config: Some(host),
        ..ContainerCreateBody::default()
    };
    let created = tokio::time::timeout(
        STEP,
        engine
            .docker()
            .create_container(Some(CreateContainerOptionsBuilder::default().build()), body),
    )
    .await
    .expect("create in time")
    .expect("create the container");
    let id = created.id;
    let attach = AttachContainerOptionsBuilder::default()
        .stdin(true)
        .stdout(true)
        .stderr(true)
        .stream(true)
        .logs(false)
        .build();
    let attached = tokio::time::timeout(STEP, engine.docker().attach_container(&id, Some(attach)))
        .await
        .expect("attach in time")
        .expect("attach");
    tokio::time::timeout(STEP, engine.docker().start_container(&id, None))
        .await
        .expect("start in time")
        .unwrap_or_else(|e| panic!("start the container: {e}"));
    Attached {
        id,
        input: attached.input,
        output: attached.output,
        buf: BytesMut::new(),
        codec: MessageCodec::new(DEFAULT_MAX_FRAME),
        stderr: String::new(),
        case: run.case.to_owned(),
        created: began,
    }
}

impl Attached {
    async fn send(&mut self, msg: &ToWorker) {
        let mut frame = BytesMut::new();
        self.codec.encode(msg, &mut frame).expect("encode");
        self.input.write_all(&frame).await.expect("write a frame");
        self.input.flush().await.expect("flush");
    }

    /// The next message from the worker: stdout bytes are buffered and decoded as frames.
    async fn recv(&mut self) -> FromWorker {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(msg) = self
                .codec
                .decode(&mut self.buf)
                .expect("a well-formed frame")
            {
                return msg;
            }
            let item = tokio::time::timeout_at(deadline.into(), self.output.next())
                .await
                .unwrap_or_else(|_| panic!("no frame within {STEP:?}; stderr: {}", self.stderr));
            match item {
                Some(Ok(LogOutput::StdOut { message })) => self.buf.extend_from_slice(&message),
                Some(Ok(LogOutput::StdErr { message })) => {
                    self.stderr.push_str(&String::from_utf8_lossy(&message))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("attach stream failed: {e}; stderr: {}", self.stderr),
                None => panic!("the worker closed stdout; stderr: {}", self.stderr),
            }
        }
    }

    /// Init ping, then `echo` of a short string and of 1 MiB (one frame over ~60 attach
    /// chunks). Returns the methods the worker offers.
    async fn round_trip(&mut self) -> Vec<String> {
        self.send(&ToWorker::Init { id: 0, version: 1 }).await;
        let methods = match self.recv().await {
            FromWorker::InitPong {
                id: 0,
                status: InitStatus::Ok,
                version: 1,
                methods,
                ..
            } => methods,
            other => panic!(
                "expected a good init_pong, got {other:?}; stderr: {}",
                self.stderr
            ),
        };
        assert!(methods.iter().any(|m| m == "echo"), "{methods:?}");
        eprintln!(
            "{}: create + attach + start -> init_pong in {:?}",
            self.case,
            self.created.elapsed()
        );
        for (id, body) in [
            (1, Value::from("hi")),
            (2, Value::Binary(vec![0xa5; 1 << 20])),
        ] {
            let sent = Instant::now();
            self.send(&ToWorker::Call {
                id,
                method: "echo".to_owned(),
                body: body.clone(),
                session: None,
                deadline_ms: None,
            })
            .await;
            match self.recv().await {
                FromWorker::Ok {
                    id: got,
                    body: echoed,
                } => {
                    assert_eq!(got, id);
                    assert!(echoed == body, "echo {id} came back changed");
                    eprintln!(
                        "{}: echo {id} round trip in {:?}",
                        self.case,
                        sent.elapsed()
                    );
                }
                other => panic!("expected ok for call {id}, got {other:?}"),
            }
        }
        methods
    }

    /// Closes stdin (the worker sees EOF) and returns the container's exit code.
    async fn close_and_wait(mut self, engine: &Engine) -> i64 {
        self.input.shutdown().await.expect("close stdin");
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut wait = engine.docker().wait_container(&self.id, Some(options));
        let code = match tokio::time::timeout(STEP, wait.next()).await {
            Err(_) => panic!("the container did not exit within {STEP:?} of EOF"),
            Ok(Some(Ok(r))) => r.status_code,
            Ok(Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. }))) => code,
            Ok(Some(Err(e))) => panic!("wait: {e}"),
            Ok(None) => panic!("wait ended without a status"),
        };
        remove(engine, &self.id).await;
        code
    }
}

#[tokio::test]
async fn host_python_image_is_idempotent_and_serves_a_round_trip() {
    const CASE: &str = "host_python_round_trip";
    let Some(engine) = common::docker_engine(CASE).await else {
        return;
    };
    sweep(&engine, CASE).await;
    let img = image::ensure_host_python(&engine, &host_python_options())
        .await
        .expect("build the host-Python image");
    let again = image::ensure_host_python(&engine, &host_python_options())
        .await
        .unwrap();
    assert!(again.reused, "same content must reuse the image");
    assert_eq!(again.id, img.id);
    assert_eq!(
        again,
        image::HostPythonImage {
            reused: true,
            ..img.clone()
        }
    );
    // The image itself holds no Python: /usr and the Python prefix are read-only mounts.
    assert!(img.mounts.iter().all(|m| m.read_only));
    assert!(img.mounts.iter().any(|m| m.target.as_os_str() == "/usr"));
    assert!(img
        .env
        .iter()
        .any(|(k, v)| k == "PYTHONPATH" && v == image::WORKER_PACKAGE_TARGET));
    let inspected = engine.docker().inspect_image(&img.image).await.unwrap();
    let labels = inspected.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(
        labels.get(image::LABEL_KIND).map(String::as_str),
        Some("host-python")
    );
    assert_eq!(labels.get("wharf.test").map(String::as_str), Some("1"));

    let mut worker = start(
        &engine,
        Run {
            case: CASE,
            image: &img.image,
            entrypoint: Some(img.command(["-m", "wharf_worker.demo"])),
            cmd: Vec::new(),
            mounts: &img.mounts,
            env: img.env_strings(),
        },
    )
    .await;
    worker.round_trip().await;
    let code = worker.close_and_wait(&engine).await;
    assert_eq!(code, 0, "EOF on stdin must make the worker exit 0");
    assert!(containers(&engine, CASE).await.is_empty());
}

#[tokio::test]
async fn new_content_under_a_tag_replaces_the_old_image() {
    const CASE: &str = "image_replaced";
    let Some(engine) = common::docker_engine(CASE).await else {
        return;
    };
    sweep(&engine, CASE).await;
    // A tag of this process's own: another checkout's run on the same engine must not move it.
    let tag = format!("wharf-test/replaced-{}:latest", std::process::id());
    let round = |n: &str| HostPythonOptions {
        tag: tag.clone(),
        labels: vec![
            ("wharf.test".to_owned(), "1".to_owned()),
            ("wharf.test.round".to_owned(), n.to_owned()),
        ],
        ..host_python_options()
    };
    let zeroth = image::ensure_host_python(&engine, &round("0"))
        .await
        .unwrap();
    let first = image::ensure_host_python(&engine, &round("1"))
        .await
        .unwrap();
    assert_ne!(zeroth.id, first.id);
    // The image the tag named before is unused, so it was removed.
    assert!(
        engine.docker().inspect_image(&zeroth.id).await.is_err(),
        "the replaced, unused image is still there"
    );

    // A container (created, never started) keeps round 1's image in use through round 2.
    let holder = engine
        .docker()
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            ContainerCreateBody {
                image: Some(first.id.clone()),
                entrypoint: Some(first.command(["-c", "pass"])),
                labels: Some(HashMap::from([
                    ("wharf.test".to_owned(), "1".to_owned()),
                    ("wharf.test.case".to_owned(), CASE.to_owned()),
                ])),
                ..ContainerCreateBody::default()
            },
        )
        .await
        .expect("create a container of round 1's image")
        .id;
    let second = image::ensure_host_python(&engine, &round("2"))
        .await
        .unwrap();
    assert!(!second.reused, "other content must be imported anew");
    assert_ne!(first.id, second.id);
    let tagged = engine.docker().inspect_image(&second.image).await.unwrap();
    assert_eq!(tagged.id.as_deref(), Some(second.id.as_str()));
    let old = engine.docker().inspect_image(&first.id).await.unwrap();
    assert!(
        old.repo_tags.unwrap_or_default().is_empty(),
        "round 1 kept its tag"
    );

    let listed = image::list(&engine).await.unwrap();
    let mine = listed
        .iter()
        .find(|i| i.id == second.id)
        .expect("the list shows the image");
    assert_eq!(mine.kind, "host-python");
    assert!(mine.tags.contains(&tag));
    assert!(listed.iter().any(|i| i.id == first.id && i.tags.is_empty()));

    // In use: prune leaves it. Unused: prune removes it.
    assert!(!image::prune(&engine).await.unwrap().contains(&first.id));
    assert!(engine.docker().inspect_image(&first.id).await.is_ok());
    remove(&engine, &holder).await;
    assert!(image::prune(&engine).await.unwrap().contains(&first.id));
    assert!(engine.docker().inspect_image(&first.id).await.is_err());
    assert!(engine.docker().inspect_image(&second.image).await.is_ok());
    engine
        .docker()
        .remove_image(
            &second.id,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await
        .expect("remove this process's image");
}

#[tokio::test]
async fn static_binary_image_serves_a_round_trip() {
    const CASE: &str = "static_round_trip";
    let Some(engine) = common::docker_engine(CASE).await else {
        return;
    };
    sweep(&engine, CASE).await;
    let binary = tokio::task::spawn_blocking(common::static_example_worker)
        .await
        .unwrap();
    let opts = StaticBinaryOptions {
        tag: Some("wharf-test/example-worker:latest".to_owned()),
        labels: test_labels(),
        ..StaticBinaryOptions::new(&binary)
    };
    let img = image::ensure_static_binary(&engine, &opts)
        .await
        .expect("build the static image");
    assert_eq!(
        img.entrypoint.as_os_str(),
        "/usr/local/bin/wharf-example-worker"
    );
    let inspected = engine.docker().inspect_image(&img.image).await.unwrap();
    assert_eq!(inspected.id.as_deref(), Some(img.id.as_str()));
    let size = inspected.size.unwrap_or_default();
    let file = std::fs::metadata(&binary).unwrap().len() as i64;
    assert!(
        size >= file && size < file + (64 << 10),
        "image of {size} bytes for {file}"
    );
    // The image's own entrypoint, no mounts, nobody: self-contained.
    let mut worker = start(
        &engine,
        Run {
            case: CASE,
            image: &img.image,
            entrypoint: None,
            cmd: Vec::new(),
            mounts: &[],
            env: Vec::new(),
        },
    )
    .await;
    let methods = worker.round_trip().await;
    assert!(methods.iter().any(|m| m == "state_set"), "{methods:?}");
    let code = worker.close_and_wait(&engine).await;
    assert_eq!(code, 0);
    assert!(containers(&engine, CASE).await.is_empty());
}

#[tokio::test]
async fn a_dynamic_binary_is_refused_before_the_engine_is_asked() {
    const CASE: &str = "static_refuses_dynamic";
    let Some(engine) = common::docker_engine(CASE).await else {
        return;
    };
    // This test binary is dynamically linked.
    let me = std::env::current_exe().unwrap();
    let opts = StaticBinaryOptions {
        tag: Some("wharf-test/never:latest".to_owned()),
        ..StaticBinaryOptions::new(me)
    };
    let err = image::ensure_static_binary(&engine, &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotStatic { .. }), "{err}");
    assert!(engine
        .docker()
        .inspect_image("wharf-test/never:latest")
        .await
        .is_err());
}

/// A pool whose workers are `docker run -i` processes of `image` (stdio channel): the CLI
/// forwards stdin/stdout, and EOF on stdin ends the container.
fn docker_run_spec(
    case: &str,
    image: &str,
    mounts: &[Mount],
    env: &[String],
    entrypoint: Option<&str>,
    args: &[&str],
) -> ProcessSpec {
    let mut argv: Vec<String> = [
        "docker",
        "run",
        "--rm",
        "-i",
        "--init",
        "--network",
        "none",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges:true",
        "--user",
        "65534:65534",
        "--log-driver",
        "none",
        "--label",
        "wharf.test=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.push("--label".to_owned());
    argv.push(format!("wharf.test.case={case}"));
    for m in mounts {
        argv.push("-v".to_owned());
        argv.push(m.bind());
    }
    for e in env.iter().chain(["WHARF_CHANNEL=stdio".to_owned()].iter()) {
        argv.push("-e".to_owned());
        argv.push(e.clone());
    }
    if let Some(entrypoint) = entrypoint {
        argv.push("--entrypoint".to_owned());
        argv.push(entrypoint.to_owned());
    }
    argv.push(image.to_owned());
    argv.extend(args.iter().map(|s| s.to_string()));
    ProcessSpec::from_argv(argv)
        .expect("non-empty argv")
        .channel(Channel::Stdio)
        .init_timeout(Duration::from_secs(30))
}

/// Runs a pool of two workers of `spec`, calls each, shuts down, and checks that no container
/// of the case is left.
async fn pool_round_trip(engine: &Engine, case: &str, spec: ProcessSpec) {
    common::init_logs();
    let pool = Pool::builder(spec)
        .size(2)
        .build()
        .await
        .expect("build the pool");
    pool.wait_ready(2, Duration::from_secs(60))
        .await
        .expect("two container workers ready");
    assert!(
        containers(engine, case).await.len() >= 2,
        "the workers are containers"
    );
    for i in 0..4 {
        let got = pool
            .call::<Value>("echo", &format!("call {i}"))
            .await
            .expect("echo");
        assert_eq!(got, Value::from(format!("call {i}")));
    }
    pool.shutdown().await;
    let start = Instant::now();
    while !containers(engine, case).await.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "containers left 20 s after the pool shut down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_pool_runs_on_the_host_python_image() {
    const CASE: &str = "host_python_pool";
    let Some(engine) = common::docker_engine(CASE).await else {
        return;
    };
    if !common::docker_cli(CASE) {
        return;
    }
    sweep(&engine, CASE).await;
    let img = image::ensure_host_python(&engine, &host_python_options())
        .await
        .unwrap();
    let python = img.python.display().to_string();
    let spec = docker_run_spec(
        CASE,
        &img.image,
        &img.mounts,
        &img.env_strings(),
        Some(&python),
        &["-m", "wharf_worker.demo"],
    );
    pool_round_trip(&engine, CASE, spec).await;
}

#[tokio::test]
#[ignore = "about a minute; needs root, debootstrap and Debian's package servers"]
async fn debian_python_image_is_self_contained_and_runs_a_pool() {
    const CASE: &str = "debian_python";
    let Some(engine) = common::docker_engine(CASE).await else {
        return;
    };
    sweep(&engine, CASE).await;
    let mut opts = DebianPythonOptions::new(common::repo_root().join("protocol/python"));
    opts.tag = "wharf-test/debian-python:bookworm".to_owned();
    opts.labels = test_labels();
    let started = Instant::now();
    let built = image::ensure_debian_python(&engine, &opts)
        .await
        .expect("build the Debian image");
    eprintln!(
        "debian-python image {} ({}) in {:?}, reused: {}",
        built.tag,
        built.id,
        started.elapsed(),
        built.reused
    );
    let again = image::ensure_debian_python(&engine, &opts).await.unwrap();
    assert!(again.reused && again.id == built.id);
    // Its own Python, no mounts at all.
    let mut worker = start(
        &engine,
        Run {
            case: CASE,
            image: &built.tag,
            entrypoint: None,
            cmd: vec!["-m".to_owned(), "wharf_worker.demo".to_owned()],
            mounts: &[],
            env: Vec::new(),
        },
    )
    .await;
    worker.round_trip().await;
    assert_eq!(worker.close_and_wait(&engine).await, 0);
    if common::docker_cli(CASE) {
        let spec = docker_run_spec(
            CASE,
            &built.tag,
            &[],
            &[],
            None,
            &["-m", "wharf_worker.demo"],
        );
        pool_round_trip(&engine, CASE, spec).await;
    }
}
