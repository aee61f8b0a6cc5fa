//! The `wharf` command line.
//!
//! `wharf check [--stdio] -- CMD [ARGS...]` runs the protocol conformance suite against a worker
//! command and exits 0 only if every check passes.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wharf::check::{run_checks, CheckOptions, Outcome};
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
    Check {
        /// Frames on stdin/stdout instead of fds 3/4.
        #[arg(long)]
        stdio: bool,
        /// How long the worker may take to answer the init ping, in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        init_timeout_ms: u64,
        /// How long each check may take, in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Largest frame either side may send, in bytes.
        #[arg(long, default_value_t = wharf_protocol::DEFAULT_MAX_FRAME)]
        max_frame: usize,
        /// The worker command and its arguments.
        #[arg(last = true, required = true, num_args = 1..)]
        cmd: Vec<String>,
    },
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
            cmd,
        } => {
            let spec = ProcessSpec::from_argv(cmd)
                .expect("clap requires a command")
                .channel(if stdio { Channel::Stdio } else { Channel::Fds })
                .max_frame(max_frame);
            let opts = CheckOptions {
                init_timeout: Duration::from_millis(init_timeout_ms),
                timeout: Duration::from_millis(timeout_ms),
            };
            let report = run_checks(spec, &opts).await;
            for r in &report.results {
                match &r.outcome {
                    Outcome::Pass => println!("PASS {}", r.name),
                    Outcome::Fail(why) => println!("FAIL {}: {why}", r.name),
                    Outcome::Skip(why) => println!("SKIP {}: {why}", r.name),
                }
            }
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
