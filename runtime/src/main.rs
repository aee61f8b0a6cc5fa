//! The `wharf` command line.
//!
//! `wharf check [--stdio] [--init-timeout-ms N] [--timeout-ms N] [--max-frame N] -- CMD [ARGS...]`
//! runs the protocol conformance suite (`docs/protocol.md`, section 6) against a worker command.
//! It prints one line per check (`PASS name`, `FAIL name: reason`, `SKIP name: reason`), then a
//! summary (`N passed, N failed[, N skipped]`), and exits 0 if no check failed, 1 if one did, 2
//! on a usage error. Logs (`RUST_LOG`, default `warn`) go to stderr.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wharf::check::{run_checks_with, CheckOptions, Outcome};
use wharf::{Channel, ProcessSpec};

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
        /// The worker command and its arguments.
        #[arg(last = true, required = true, num_args = 1.., value_name = "CMD")]
        cmd: Vec<OsString>,
    },
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
        Command::Check {
            stdio,
            init_timeout_ms,
            timeout_ms,
            max_frame,
            env,
            cmd,
        } => {
            let mut spec = ProcessSpec::from_argv(cmd)
                .expect("clap requires a command")
                .channel(if stdio { Channel::Stdio } else { Channel::Fds })
                .max_frame(max_frame as usize);
            for (k, v) in env {
                spec = spec.env(k, v);
            }
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
