//! Configuration files: the example parses to the builder's defaults, every kind of mistake
//! is reported with its file, line and key, a pool from a file serves calls, and
//! `wharf config check` reports the same errors and exits non-zero.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use wharf::{
    ConfigFile, ConfigFileError, ContainerSpec, Mount, Pool, ProcessSpec, Transport, Value,
    WorkerSpec,
};

/// The one issue `text` (as `wharf.toml`) is rejected with, displayed.
fn rejected(text: &str) -> String {
    match ConfigFile::parse(text, "wharf.toml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => {
            let issues = e.issues();
            assert_eq!(issues.len(), 1, "{e}");
            issues[0].to_string()
        }
    }
}

/// A pool table `ml` running `python3`, with `keys` in the pool's table (from line 2).
fn with_keys(keys: &str) -> String {
    format!("[pools.ml]\n{keys}\n[pools.ml.process]\ncommand = \"python3\"\n")
}

#[test]
fn the_example_file_parses_and_its_demo_pool_has_the_builders_defaults() {
    let file = ConfigFile::load(repo_root().join("examples/wharf.toml")).unwrap();
    assert_eq!(file.runtime().idle_timeout, Some(Duration::from_secs(600)));
    assert_eq!(file.pool_names().collect::<Vec<_>>(), ["demo", "sandboxed"]);
    // Every key of `demo` is written out at its documented default: the file documents the
    // builder's defaults exactly.
    let spec = ProcessSpec::from_argv(["python3", "-m", "wharf_worker.demo"]).unwrap();
    let defaults = Pool::builder(spec).name("demo").into_config();
    assert_eq!(file.config("demo").unwrap(), &defaults);

    let sandboxed = file.config("sandboxed").unwrap();
    assert_eq!((sandboxed.size, sandboxed.max_overflow), (2, 2));
    assert_eq!(sandboxed.call_timeout, Duration::from_secs(120));
    assert_eq!(sandboxed.session_end, wharf::SessionEnd::Recycle);
    let WorkerSpec::Container(c) = &sandboxed.spec else {
        panic!("a container pool: {:?}", sandboxed.spec);
    };
    let mut expected = ContainerSpec::new(
        "wharf/host-python:latest",
        ["/usr/bin/python3", "-m", "wharf_worker.demo"],
    )
    .env("PYTHONPATH", "/opt/wharf")
    .transport(Transport::Fifo)
    .memory(512 * 1024 * 1024)
    .cpus(1.5)
    .pids_limit(64);
    expected.mounts = vec![
        Mount::read_only("/usr", "/usr"),
        Mount::read_only("/srv/models", "/models"),
    ];
    expected.labels = vec![("team".into(), "ml".into())];
    assert_eq!(**c, expected);
}

#[test]
fn the_documented_example_is_the_example_file() {
    let doc = std::fs::read_to_string(repo_root().join("docs/configuration.md")).unwrap();
    let example = std::fs::read_to_string(repo_root().join("examples/wharf.toml")).unwrap();
    let (_, whole) = doc.split_once("## The whole example").expect("the section");
    let block = whole
        .split_once("```toml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("a toml block");
    assert_eq!(
        block, example,
        "docs/configuration.md and examples/wharf.toml differ"
    );
}

#[test]
fn values_of_the_wrong_type_or_range_name_the_line_and_key() {
    assert_eq!(
        rejected(&with_keys("size = -3")),
        "pools.ml.size: expected a non-negative integer, found -3 at wharf.toml:2"
    );
    assert_eq!(
        rejected(&with_keys("max_overflow = 1\nsize = \"four\"")),
        "pools.ml.size: invalid type: string \"four\", expected a non-negative integer \
         at wharf.toml:3"
    );
    assert_eq!(
        rejected(&with_keys("startup_concurrency = 0")),
        "pools.ml.startup_concurrency: expected a positive integer, found 0 at wharf.toml:2"
    );
    assert_eq!(
        rejected(&with_keys("strategy = \"one_for_some\"")),
        "pools.ml.strategy: unknown variant `one_for_some`, expected one of `one_for_one`, \
         `one_for_all`, `rest_for_one` at wharf.toml:2"
    );
    assert_eq!(
        rejected(&with_keys("max_rss = \"12 parsecs\"")),
        "pools.ml.max_rss: expected a size in bytes, or with a unit such as \"512MiB\" or \
         \"2GB\", found \"12 parsecs\" at wharf.toml:2"
    );
    assert_eq!(
        rejected("[pools]\nml = 3\n"),
        "pools.ml: invalid type: integer `3`, expected a table at wharf.toml:2"
    );
    assert_eq!(
        rejected("pools = 3\n"),
        "pools: invalid type: integer `3`, expected a table at wharf.toml:1"
    );
    assert_eq!(
        rejected("[pools.ml.process]\ncommand = \"x\"\nenv = { A = 1 }\n"),
        "pools.ml.process.env.A: invalid type: integer `1`, expected a string at wharf.toml:3"
    );
}

#[test]
fn bad_durations_are_rejected_with_the_expected_syntax() {
    assert_eq!(
        rejected(&with_keys("call_timeout = 30")),
        "pools.ml.call_timeout: expected a duration with its unit, such as \"30s\" or \
         \"30ms\", found 30 at wharf.toml:2"
    );
    let e = rejected(&with_keys("\n\n[pools.ml.backoff]\nmax = \"5 parsecs\""));
    assert!(
        e.starts_with(
            "pools.ml.backoff.max: expected a duration such as \"250ms\", \"30s\" or \"2m\", \
             found \"5 parsecs\": unknown time unit \"parsecs\""
        ),
        "{e}"
    );
    assert!(e.ends_with(" at wharf.toml:5"), "{e}");
}

#[test]
fn unknown_keys_are_errors_with_a_suggestion() {
    assert_eq!(
        rejected(&with_keys("sise = 2")),
        "pools.ml.sise: unknown key `sise` (did you mean `size`?) at wharf.toml:2"
    );
    assert_eq!(
        rejected("[pools.ml.process]\ncommand = \"x\"\n[pools.ml.backoff]\nmin = \"1s\"\n"),
        "pools.ml.backoff.min: unknown key `min` (did you mean `max`?) at wharf.toml:4"
    );
    assert_eq!(
        rejected("[runtime]\nidle = \"1m\"\n"),
        "runtime.idle: unknown key `idle`; known keys here: idle_timeout at wharf.toml:2"
    );
    assert_eq!(
        rejected("pool = 1\n"),
        "pool: unknown key `pool` (did you mean `pools`?) at wharf.toml:1"
    );
}

#[test]
fn a_pool_runs_exactly_one_of_a_process_and_a_container() {
    assert_eq!(
        rejected(
            "[pools.ml]\nsize = 1\n[pools.ml.process]\ncommand = \"python3\"\n\
             [pools.ml.container]\nimage = \"x\"\ncommand = \"y\"\n"
        ),
        "pools.ml.container: a pool runs processes or containers, not both: keep one of \
         [process] and [container] at wharf.toml:5"
    );
    assert_eq!(
        rejected("\n[pools.ml]\nsize = 2\n"),
        "pools.ml: says nothing to run: add a [process] or a [container] table at wharf.toml:2"
    );
    assert_eq!(
        rejected("[pools.ml.process]\nargs = [\"-m\"]\n"),
        "pools.ml.process: missing key `command` at wharf.toml:1"
    );
    assert_eq!(
        rejected(
            "[pools.ml.container]\nimage = \"x\"\ncommand = \"y\"\n\
             mounts = [{ source = \"/a\", target = \"/b\" }, { source = \"/c\" }]\n"
        ),
        "pools.ml.container.mounts[1]: missing key `target` at wharf.toml:4"
    );
}

#[test]
fn validation_failures_point_at_the_key_or_its_table() {
    assert_eq!(
        rejected(&with_keys("size = 0")),
        "pools.ml.size: size and max_overflow are both 0: the pool could never run a worker \
         at wharf.toml:2"
    );
    assert_eq!(
        rejected(&with_keys("backoff = { initial = \"10s\", max = \"1s\" }")),
        "pools.ml.backoff.max: 1s is shorter than backoff.initial 10s at wharf.toml:2"
    );
    // backoff.max is left out: its default (5 s) conflicts, and the line is its table's.
    assert_eq!(
        rejected("[pools.ml.process]\ncommand = \"x\"\n\n[pools.ml.backoff]\ninitial = \"10s\"\n"),
        "pools.ml.backoff.max: 5s is shorter than backoff.initial 10s at wharf.toml:4"
    );
    assert_eq!(
        rejected("[pools.ml.process]\ncommand = []\n"),
        "pools.ml.process.command: must not be empty at wharf.toml:2"
    );
    assert_eq!(
        rejected(
            "[pools.ml]\nmax_rss = \"1GiB\"\n[pools.ml.container]\nimage = \"x\"\ncommand = \"y\"\n"
        ),
        "pools.ml.max_rss: not for container workers (the host process the engine reports is \
         the container's init): set the container's memory limit instead at wharf.toml:2"
    );
    assert_eq!(
        rejected(&with_keys("recycle_jitter = 1.5")),
        "pools.ml.recycle_jitter: 1.5 must be a fraction between 0 and 1 at wharf.toml:2"
    );
}

#[test]
fn every_invalid_pool_is_reported() {
    let text = "[pools.a.process]\ncommand = \"x\"\n[pools.a.health]\ninterval = \"0s\"\n\
                [pools.b]\nsize = 0\n[pools.b.process]\ncommand = \"x\"\n\
                [pools.c.process]\ncommand = \"x\"\n";
    let err = ConfigFile::parse(text, "wharf.toml").unwrap_err();
    let issues: Vec<String> = err.issues().iter().map(ToString::to_string).collect();
    assert_eq!(
        issues,
        [
            "pools.a.health.interval: must be longer than zero at wharf.toml:4",
            "pools.b.size: size and max_overflow are both 0: the pool could never run a worker \
             at wharf.toml:6",
        ]
    );
    assert_eq!(err.issues()[0].line, Some(4));
    assert_eq!(
        err.issues()[0].key.as_deref(),
        Some("pools.a.health.interval")
    );
}

#[test]
fn syntax_errors_and_unreadable_files_are_reported() {
    assert_eq!(
        rejected("[pools.ml]\nsize = 1\nsize = 2\n"),
        "duplicate key at wharf.toml:3"
    );
    let e = ConfigFile::load("/nonexistent/wharf.toml").unwrap_err();
    assert!(matches!(e, ConfigFileError::Read { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("cannot read /nonexistent/wharf.toml: "),
        "{e}"
    );
}

#[test]
fn keys_set_every_option() {
    let text = with_keys(
        "size = 2\nmax_overflow = 3\noverflow_idle_timeout = \"1m\"\nlazy = true\n\
         startup_concurrency = 2\ninit_timeout = \"20s\"\ncall_timeout = \"250ms\"\n\
         checkout_timeout = \"1s\"\nmax_waiting = 0\nstrategy = \"rest_for_one\"\n\
         restart_type = \"transient\"\nmax_start_failures = 2\nmax_calls = 100\n\
         max_lifetime = \"1h 30m\"\nrecycle_jitter = 0.25\nmax_rss = \"512MiB\"\nsample_interval = \"250ms\"\nmax_frame = 65536\n\
         session_end = \"recycle\"\nsession_idle_timeout = \"2m\"\nshutdown_grace = \"3s\"\n\
         drain_timeout = \"4s\"\nsession_reset_timeout = \"6s\"\n\
         intensity = { max_restarts = 0, within = \"1s\" }\n\
         backoff = { initial = \"10ms\", max = \"1s\", multiplier = 3, jitter = 0.0, reset_after = \"1m\" }\n\
         health = { enabled = false, timeout = \"1s\", max_missed = 3 }\n\
         retry = { max_retries = 0, delay = \"1ms\" }",
    );
    let file = ConfigFile::parse(&text, "wharf.toml").unwrap();
    let spec = ProcessSpec::new("python3")
        .init_timeout(Duration::from_secs(20))
        .max_frame(65536);
    let expected = Pool::builder(spec)
        .name("ml")
        .size(2)
        .max_overflow(3)
        .overflow_idle_timeout(Duration::from_secs(60))
        .lazy()
        .startup_concurrency(2)
        .call_timeout(Duration::from_millis(250))
        .checkout_timeout(Duration::from_secs(1))
        .max_waiting(0)
        .strategy(wharf::Strategy::RestForOne)
        .restart_type(wharf::RestartType::Transient)
        .max_start_failures(2)
        .max_calls(100)
        .max_lifetime(Duration::from_secs(5400))
        .recycle_jitter(0.25)
        .max_rss(512 * 1024 * 1024)
        .sample_interval(Duration::from_millis(250))
        .session_end(wharf::SessionEnd::Recycle)
        .session_idle_timeout(Duration::from_secs(120))
        .shutdown_grace(Duration::from_secs(3))
        .drain_timeout(Duration::from_secs(4))
        .session_reset_timeout(Duration::from_secs(6))
        .intensity(0, Duration::from_secs(1))
        .backoff(wharf::Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
            multiplier: 3.0,
            jitter: 0.0,
            reset_after: Duration::from_secs(60),
        })
        .health_check(wharf::HealthCheck {
            interval: None,
            timeout: Duration::from_secs(1),
            max_missed: 3,
        })
        .retry(0, Duration::from_millis(1))
        .into_config();
    assert_eq!(file.config("ml").unwrap(), &expected);

    let process = ConfigFile::parse(
        "[pools.p.process]\ncommand = \"python3\"\nargs = [\"-m\", \"app\"]\n\
         env = { MODEL = \"small\" }\ninherit_env = []\ncwd = \"/srv\"\nchannel = \"stdio\"\n\
         require_watchdog = true\n",
        "wharf.toml",
    )
    .unwrap();
    let mut expected = ProcessSpec::from_argv(["python3", "-m", "app"])
        .unwrap()
        .channel(wharf::Channel::Stdio)
        .require_watchdog(true);
    expected.env = vec![("MODEL".into(), "small".into())];
    expected.cwd = Some(PathBuf::from("/srv"));
    assert_eq!(
        process.config("p").unwrap().spec,
        WorkerSpec::Process(expected)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_from_a_file_serves_calls() {
    init_logs();
    let text = format!(
        "[pools.echo]\nsize = 1\ninit_timeout = \"20s\"\n\n[pools.echo.process]\n\
         command = [\"python3\", \"-m\", \"wharf_worker.demo\"]\nenv = {{ PYTHONPATH = {:?} }}\n",
        python_path()
    );
    let file = ConfigFile::parse(&text, "wharf.toml").unwrap();
    let pool = file.builder("echo").unwrap().build().await.unwrap();
    assert_eq!(pool.name(), "echo");
    pool.wait_ready(1, READY).await.unwrap();
    assert_eq!(
        pool.call::<Value>("echo", "from a file").await.unwrap(),
        Value::from("from a file")
    );
    pool.shutdown().await;
}

/// Writes `text` to a file of its own and runs `wharf config check` on it.
fn config_check(test: &str, text: &str) -> (std::process::Output, PathBuf) {
    let dir = std::env::temp_dir().join(format!("wharf-config-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("wharf.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out, path)
}

#[test]
fn wharf_config_check_prints_each_error_and_exits_non_zero() {
    let text = "[pools.a]\nsize = 1\nsize = 2\n";
    let (out, path) = config_check("syntax", text);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("error: duplicate key at {}:3\n", path.display())),
        "{stderr}"
    );

    let text = "[pools.a.process]\ncommand = \"x\"\n[pools.a.backoff]\njitter = 2.0\n\
                [pools.b]\nsize = 0\n[pools.b.process]\ncommand = \"x\"\n";
    let (out, path) = config_check("invalid", text);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let f = path.display();
    assert_eq!(
        stderr,
        format!(
            "error: pools.a.backoff.jitter: 2 must be a fraction between 0 and 1 at {f}:4\n\
             error: pools.b.size: size and max_overflow are both 0: the pool could never run \
             a worker at {f}:6\n{f}: 2 errors\n"
        )
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn wharf_config_check_summarises_a_valid_file() {
    let example = std::fs::read_to_string(repo_root().join("examples/wharf.toml")).unwrap();
    let (out, path) = config_check("valid", &example);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        format!(
            "demo: 4 workers, eager, process python3 -m wharf_worker.demo, call timeout 30s\n\
             sandboxed: 2 workers (+2 overflow), eager, container wharf/host-python:latest \
             /usr/bin/python3 -m wharf_worker.demo, call timeout 2m\n{}: ok, 2 pools\n",
            path.display()
        )
    );
}

/// A container pool `web` over attach with `keys` in its table (from line 2), after `engines`.
fn engines_file(engines: &str, keys: &str) -> String {
    format!(
        "{engines}[pools.web]\n{keys}\n[pools.web.container]\nimage = \"x\"\ncommand = \"y\"\n\
         transport = \"attach\"\n"
    )
}

#[test]
fn engines_are_listed_once_and_named_by_pools() {
    let engines = "[[engines]]\nname = \"a\"\nhost = \"unix:///var/run/docker.sock\"\n\
                   capacity = 3\nstartup_concurrency = 2\n\n\
                   [[engines]]\nname = \"b\"\nhost = \"unix:///var/run/docker.sock\"\n\n";
    let text = engines_file(
        engines,
        "engines = [\"a\", \"b\"]\nengine_health = { interval = \"250ms\", down_after = 3 }",
    );
    let file = ConfigFile::parse(&text, "wharf.toml").unwrap();
    let web = file.config("web").unwrap();
    let names: Vec<&str> = web.engines.iter().map(|e| e.engine.name()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(web.engines[0].capacity, Some(3));
    assert_eq!(web.engines[0].startup_concurrency, Some(2));
    assert_eq!(web.engines[1].capacity, None);
    assert_eq!(web.engine_health.interval, Duration::from_millis(250));
    assert_eq!(web.engine_health.down_after, 3);
    assert!(
        web.summary().contains(", over engines a, b, call timeout"),
        "{}",
        web.summary()
    );
    assert_eq!(
        web.engine_health.timeout,
        wharf::HealthOptions::default().timeout
    );
}

#[test]
fn engine_mistakes_name_the_line_and_key() {
    let unix = "[[engines]]\nname = \"a\"\nhost = \"unix:///var/run/docker.sock\"\n\n";
    assert_eq!(
        rejected(&engines_file(unix, "engines = [\"a\", \"zz\"]")),
        "pools.web.engines: no [[engines]] entry is named \"zz\" (known: [\"a\"]) at \
         wharf.toml:6"
    );
    assert_eq!(
        rejected(&engines_file(
            "[[engines]]\nname = \"a\"\nhost = \"tcp://10.0.0.1:2376\"\n",
            ""
        )),
        "engines[0].host: cannot connect to the Docker engine a: tcp://10.0.0.1:2376: a TCP \
         engine needs TLS (its CA, certificate and key): plain TCP exposes the engine to \
         anyone on the network at wharf.toml:3"
    );
    let half = "[[engines]]\nname = \"a\"\nhost = \"tcp://h:2376\"\ntls_ca = \"ca.pem\"\n";
    assert_eq!(
        rejected(&engines_file(half, "")),
        "engines[0].tls_ca: tls_ca, tls_cert and tls_key go together: give all three or none \
         at wharf.toml:4"
    );
    let missing = "[[engines]]\nname = \"a\"\nhost = \"tcp://h:2376\"\n\
                   tls_ca = \"/nonexistent/ca.pem\"\ntls_cert = \"/nonexistent/c.pem\"\n\
                   tls_key = \"/nonexistent/k.pem\"\n";
    let issue = rejected(&engines_file(missing, ""));
    assert!(
        issue.starts_with("engines[0].host: cannot connect to the Docker engine a:")
            && issue.ends_with("at wharf.toml:3"),
        "{issue}"
    );
    let twice = format!("{unix}{unix}");
    assert_eq!(
        rejected(&engines_file(&twice, "")),
        "engines[1].name: a second engine named \"a\" at wharf.toml:6"
    );
    // Workers on engines are reached over attach only.
    let fifo = format!(
        "{unix}[pools.web]\nengines = [\"a\"]\n[pools.web.container]\nimage = \"x\"\n\
         command = \"y\"\n"
    );
    assert_eq!(
        rejected(&fifo),
        "pools.web.container.transport: a pool spread over engines reaches its workers over \
         the attach stream (FIFOs and sockets need the engine's host to be this one): set \
         transport = \"attach\" at wharf.toml:7"
    );
    assert_eq!(
        rejected(&format!(
            "{unix}[pools.ml]\nengines = [\"a\"]\n[pools.ml.process]\ncommand = \"python3\"\n"
        )),
        "pools.ml.engines: engines host container workers only at wharf.toml:6"
    );
}
