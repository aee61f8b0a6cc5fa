//! The `wharf` command line.
//!
//! `wharf check [--stdio] [--init-timeout-ms N] [--timeout-ms N] [--max-frame N] -- CMD [ARGS...]`
//! runs the protocol conformance suite (`docs/protocol.md`, section 6) against a worker command;
//! with `--container IMAGE [--transport fifo|socket|attach] [--mount SRC:DST[:ro]] [--user U]` each
//! worker runs in a container of IMAGE, with `--host-python` in one of the local host-Python
//! image (CMD is then the arguments to its Python).
//! It prints one line per check (`PASS name`, `FAIL name: reason`, `SKIP name: reason`), then a
//! summary (`N passed, N failed[, N skipped]`), and exits 0 if no check failed, 1 if one did, 2
//! on a usage error. Logs (`RUST_LOG`, default `warn`) go to stderr.
//!
//! `wharf image build host-python|static BINARY|debian-python` builds a worker image locally
//! through the engine's import API (no registry, no Dockerfile; see `wharf::image`) and prints
//! its id and how to run it; `wharf image ls` lists wharf's images, `wharf image prune` removes
//! the untagged ones no container uses. Exit 0 on success, 1 on an
//! error.
//!
//! `wharf config check FILE` reads a configuration file (`docs/configuration.md`) and
//! validates every pool in it: it prints one line per problem (`error: KEY: MESSAGE at
//! FILE:LINE`) to stderr and exits 1, or one summary line per pool to stdout and exits 0.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wharf::check::{run_checks_with, CheckOptions, Outcome};
use wharf::image::{self, DebianPythonOptions, HostPythonOptions, StaticBinaryOptions};
use wharf::{
    Channel, ConfigFile, ConfigFileError, ContainerSpec, Engine, ProcessSpec, Transport, WorkerSpec,
};

#[derive(Parser, Debug)]
#[command(
    name = "wharf",
    version,
    about = "wharf: supervised pools of external workers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check that a worker command speaks the wharf protocol (docs/protocol.md).
    ///
    /// The worker gets only PATH, HOME, PYTHONPATH and a few more variables from this
    /// environment (like under a pool); add others with --env. Its own stdout/stderr lines are
    /// logged at info level: RUST_LOG=wharf::worker=info shows them.
    Check {
        /// Frames on stdin/stdout instead of fds 3/4.
        #[arg(long)]
        stdio: bool,
        /// How long the worker may take to answer the init ping, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 10_000,
              value_parser = clap::value_parser!(u64).range(1..))]
        init_timeout_ms: u64,
        /// How long each check may take, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 10_000,
              value_parser = clap::value_parser!(u64).range(1..))]
        timeout_ms: u64,
        /// Largest frame payload either side may send, in bytes.
        #[arg(long, value_name = "BYTES", default_value_t = wharf_protocol::DEFAULT_MAX_FRAME as u64,
              value_parser = clap::value_parser!(u64).range(64..=u64::from(u32::MAX)))]
        max_frame: u64,
        /// An extra environment variable for the worker (repeatable).
        #[arg(long, short, value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(OsString, OsString)>,
        /// Run each worker in a container of IMAGE on the local Docker engine; CMD is the
        /// command in the container.
        #[arg(long, value_name = "IMAGE", conflicts_with_all = ["stdio", "host_python"])]
        container: Option<String>,
        /// Run each worker in a container of the local host-Python image (built if missing);
        /// CMD is the arguments to its Python, e.g. `-- -m wharf_worker.demo`.
        #[arg(long, conflicts_with = "stdio")]
        host_python: bool,
        /// With --container or --host-python: where frames travel.
        #[arg(long, value_enum, default_value_t = TransportArg::Fifo)]
        transport: TransportArg,
        /// With --container: a bind mount `SRC:DST[:ro]` (repeatable).
        #[arg(long, value_name = "SRC:DST[:ro]", value_parser = parse_mount)]
        mount: Vec<wharf::Mount>,
        /// With --container: the user to run as (`uid:gid` or a name).
        #[arg(long)]
        user: Option<String>,
        /// The worker command and its arguments.
        #[arg(last = true, required = true, num_args = 1.., value_name = "CMD")]
        cmd: Vec<OsString>,
    },
    /// Build and list worker images, locally, through the Docker engine's import API.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Work with configuration files (docs/configuration.md).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a configuration file: every error with its line and key, or a line per pool.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

/// Runs `wharf config ...`.
fn config_command(command: ConfigCommand) -> ExitCode {
    let ConfigCommand::Check { file } = command;
    match ConfigFile::load(&file) {
        Ok(config) => {
            for pool in config.configs() {
                println!("{}: {}", pool.name, pool.summary());
            }
            let n = config.configs().count();
            println!(
                "{}: ok, {n} pool{}",
                config.origin(),
                if n == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(ConfigFileError::Invalid { issues }) => {
            for issue in &issues {
                eprintln!("error: {issue}");
            }
            eprintln!(
                "{}: {} error{}",
                file.display(),
                issues.len(),
                if issues.len() == 1 { "" } else { "s" }
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build a worker image (or reuse one with the same content) and print how to run it.
    Build {
        #[command(subcommand)]
        kind: BuildKind,
    },
    /// List wharf's images (those labelled wharf.image).
    Ls,
    /// Remove wharf's untagged images that no container uses.
    Prune,
}

#[derive(Subcommand, Debug)]
enum BuildKind {
    /// A near-empty root filesystem; the host's /usr, Python and wharf_worker are bind-mounted
    /// read-only at run time (a local engine only).
    HostPython {
        /// The image tag.
        #[arg(long, default_value = image::HOST_PYTHON_TAG)]
        tag: String,
        /// The Python to mount (its real prefix is used, not a shim's).
        #[arg(long, default_value = "python3")]
        python: OsString,
        /// The directory holding wharf_worker/ (default: where that Python finds it).
        #[arg(long, value_name = "DIR")]
        worker_package: Option<PathBuf>,
        /// An extra image label (repeatable).
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label)]
        label: Vec<(String, String)>,
    },
    /// One statically linked executable as the image's entrypoint (self-contained).
    Static {
        /// The executable (e.g. built with RUSTFLAGS="-C target-feature=+crt-static" and
        /// --target x86_64-unknown-linux-gnu).
        binary: PathBuf,
        /// The image tag (default wharf/<file name>:latest).
        #[arg(long)]
        tag: Option<String>,
        /// Where the executable goes in the image (default /usr/local/bin/<file name>).
        #[arg(long, value_name = "PATH")]
        path: Option<PathBuf>,
        /// An extra image label (repeatable).
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label)]
        label: Vec<(String, String)>,
    },
    /// A self-contained Python image from Debian's packages (debootstrap, root, ~1 minute).
    DebianPython {
        /// The directory holding wharf_worker/ (copied into the image).
        #[arg(long, value_name = "DIR")]
        worker_package: PathBuf,
        /// The image tag.
        #[arg(long, default_value = image::DEBIAN_PYTHON_TAG)]
        tag: String,
        /// The Debian suite.
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// The Debian mirror (default: debootstrap's).
        #[arg(long)]
        mirror: Option<String>,
        /// Packages on top of minbase (repeatable; default python3-minimal python3-msgpack).
        #[arg(long = "package", value_name = "NAME")]
        packages: Vec<String>,
        /// Where to build the temporary root filesystem (default: the temp directory).
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// An extra image label (repeatable).
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label)]
        label: Vec<(String, String)>,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.into(), v.into())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Runs `wharf image ...`.
async fn image_command(command: ImageCommand) -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::local(Duration::from_secs(10)).await?;
    match command {
        ImageCommand::Prune => {
            for id in image::prune(&engine).await? {
                println!("removed {id}");
            }
        }
        ImageCommand::Ls => {
            println!("{:<40} {:<15} {:<14} {:>10}", "TAG", "KIND", "ID", "SIZE");
            for i in image::list(&engine).await? {
                let id = i.id.trim_start_matches("sha256:");
                let tags = if i.tags.is_empty() {
                    vec!["<none>".to_owned()]
                } else {
                    i.tags
                };
                for tag in tags {
                    println!(
                        "{tag:<40} {:<15} {:<14} {:>10}",
                        i.kind,
                        &id[..id.len().min(12)],
                        i.size
                    );
                }
            }
        }
        ImageCommand::Build { kind } => match kind {
            BuildKind::HostPython {
                tag,
                python,
                worker_package,
                label,
            } => {
                let opts = HostPythonOptions {
                    tag,
                    python,
                    worker_package,
                    labels: label,
                };
                let img = image::ensure_host_python(&engine, &opts).await?;
                println!("image {}", img.image);
                println!("id {}", img.id);
                println!("reused {}", img.reused);
                println!("python {} ({})", img.python.display(), img.version);
                for m in &img.mounts {
                    println!("mount {}", m.bind());
                }
                for (k, v) in &img.env {
                    println!("env {k}={v}");
                }
                let mut run = vec![
                    "docker run --rm -i --init --network none --read-only --user 65534:65534"
                        .to_owned(),
                ];
                run.extend(img.mounts.iter().map(|m| format!("-v {}", m.bind())));
                run.extend(img.env.iter().map(|(k, v)| format!("-e {k}={v}")));
                run.push("-e WHARF_CHANNEL=stdio".to_owned());
                run.push(format!("--entrypoint {}", img.python.display()));
                run.push(format!("{} -m wharf_worker.demo", img.image));
                println!("run {}", run.join(" "));
            }
            BuildKind::Static {
                binary,
                tag,
                path,
                label,
            } => {
                let opts = StaticBinaryOptions {
                    binary,
                    path_in_image: path,
                    tag,
                    labels: label,
                };
                let img = image::ensure_static_binary(&engine, &opts).await?;
                println!("image {}", img.image);
                println!("id {}", img.id);
                println!("reused {}", img.reused);
                println!("entrypoint {}", img.entrypoint.display());
                println!(
                    "run docker run --rm -i --init --network none --read-only --user 65534:65534 \
                     -e WHARF_CHANNEL=stdio {}",
                    img.image
                );
            }
            BuildKind::DebianPython {
                worker_package,
                tag,
                suite,
                mirror,
                packages,
                work_dir,
                label,
            } => {
                let mut opts = DebianPythonOptions::new(worker_package);
                opts.tag = tag;
                opts.suite = suite;
                opts.mirror = mirror;
                if !packages.is_empty() {
                    opts.packages = packages;
                }
                opts.work_dir = work_dir;
                opts.labels = label;
                let img = image::ensure_debian_python(&engine, &opts).await?;
                println!("image {}", img.tag);
                println!("id {}", img.id);
                println!("reused {}", img.reused);
                println!(
                    "run docker run --rm -i --init --network none --read-only --user 65534:65534 \
                     -e WHARF_CHANNEL=stdio {} -m wharf_worker.demo",
                    img.tag
                );
            }
        },
    }
    Ok(())
}

/// Where a container worker's frames travel.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TransportArg {
    /// Two FIFOs (named pipes) bind-mounted into the container (local engines; the default).
    Fifo,
    /// A unix socket bind-mounted into the container (local engines).
    Socket,
    /// Docker's attach stream.
    Attach,
}

fn parse_mount(s: &str) -> Result<wharf::Mount, String> {
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        [src, dst] | [src, dst, "rw"] => Ok(wharf::Mount {
            source: src.into(),
            target: dst.into(),
            read_only: false,
        }),
        [src, dst, "ro"] => Ok(wharf::Mount::read_only(*src, *dst)),
        _ => Err(format!("expected SRC:DST or SRC:DST:ro, got {s:?}")),
    }
}

fn parse_env(s: &str) -> Result<(OsString, OsString), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.into(), v.into())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match cli.command {
        Command::Config { command } => config_command(command),
        Command::Image { command } => match image_command(command).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wharf image: {e}");
                ExitCode::from(1)
            }
        },
        Command::Check {
            stdio,
            init_timeout_ms,
            timeout_ms,
            max_frame,
            env,
            container,
            host_python,
            transport,
            mount,
            user,
            cmd,
        } => {
            let transport = match transport {
                TransportArg::Fifo => Transport::Fifo,
                TransportArg::Socket => Transport::Socket,
                TransportArg::Attach => Transport::Attach,
            };
            let text = |s: OsString| s.to_string_lossy().into_owned();
            let spec: WorkerSpec = if container.is_some() || host_python {
                let mut spec = if let Some(image) = container {
                    let mut spec = ContainerSpec::new(image, cmd.into_iter().map(text));
                    spec.mounts.extend(mount);
                    spec
                } else {
                    let built = match Engine::local(Duration::from_secs(10)).await {
                        Ok(engine) => {
                            image::ensure_host_python(&engine, &HostPythonOptions::default())
                                .await
                                .map_err(|e| e.to_string())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    match built {
                        Ok(img) => img.spec(cmd.into_iter().map(text)),
                        Err(e) => {
                            eprintln!("wharf check: no host-Python image: {e}");
                            return ExitCode::from(1);
                        }
                    }
                };
                if let Some(user) = user {
                    spec = spec.user(user);
                }
                for (k, v) in env {
                    spec = spec.env(text(k), text(v));
                }
                spec.max_frame = max_frame as usize;
                spec.transport(transport).into()
            } else {
                let mut spec = ProcessSpec::from_argv(cmd)
                    .expect("clap requires a command")
                    .channel(if stdio { Channel::Stdio } else { Channel::Fds })
                    .max_frame(max_frame as usize);
                for (k, v) in env {
                    spec = spec.env(k, v);
                }
                spec.into()
            };
            let opts = CheckOptions {
                init_timeout: Duration::from_millis(init_timeout_ms),
                timeout: Duration::from_millis(timeout_ms),
            };
            // One line per check as soon as it ends, so a slow worker shows progress.
            let report = run_checks_with(spec, opts, |r| match &r.outcome {
                Outcome::Pass => println!("PASS {}", r.name),
                Outcome::Fail(why) => println!("FAIL {}: {why}", r.name),
                Outcome::Skip(why) => println!("SKIP {}: {why}", r.name),
            })
            .await;
            let mut summary = format!("{} passed, {} failed", report.passed(), report.failed());
            if report.skipped() > 0 {
                summary.push_str(&format!(", {} skipped", report.skipped()));
            }
            println!("{summary}");
            if report.all_passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
