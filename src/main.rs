//! The `dedupd` binary: size thread stacks, parse the command line, set up logging, load the
//! config, run.
//!
//! Stacks: lapin and amq-protocol parse, clone, drop and serialize message headers
//! recursively, on lapin's I/O threads and on the thread running the routes. A stack overflow
//! aborts the process, so every such thread gets [`dedupd::amqp::HEADER_STACK_SIZE`], enough for
//! the deepest headers a frame dedupd accepts can carry (see `amqp`): lapin's threads, which it
//! spawns without a size, through `RUST_MIN_STACK` set before any thread exists; the runtime on
//! a thread of its own, since the main thread's stack is fixed by `ulimit -s`.
//!
//! Logs: every line goes through [`LossyStderr`], which drops a line it cannot write rather
//! than stop the work it describes, and first hides every password of the loaded
//! configuration ([`dedupd::config::scrub_logs`]): at `RUST_LOG=trace` lapin logs the frame
//! that carries the SASL response, password included. Scrubbing keeps those frame logs, which
//! are what one turns TRACE on for, without the password; see `config::secret`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use dedupd::amqp::HEADER_STACK_SIZE;
use dedupd::cli::{Cli, Command, LogFormat, EXIT_CONFIG, EXIT_RUNTIME};
use dedupd::config::Config;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // An operator's own RUST_MIN_STACK wins (to give more, or to trade safety for memory).
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // Sound only while this is the only thread: it is, nothing has started yet. std reads
        // the variable when it spawns the first thread without an explicit size.
        std::env::set_var("RUST_MIN_STACK", HEADER_STACK_SIZE.to_string());
    }
    let spawned = std::thread::Builder::new()
        .name("dedupd".into())
        .stack_size(HEADER_STACK_SIZE)
        .spawn(dedupd_main);
    match spawned.map(|thread| thread.join()) {
        Ok(Ok(code)) => code,
        // The panic message was printed by the panic hook.
        Ok(Err(_panic)) => ExitCode::from(EXIT_RUNTIME),
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "cannot start the main thread: {error}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn dedupd_main() -> ExitCode {
    let cli = Cli::parse();
    // `demo` reads no config file and logs around its progress bar: it sets itself up.
    if let Command::Demo(args) = &cli.command {
        return dedupd::demo::main(args, cli.log_format);
    }
    init_tracing(cli.log_format);

    let path = cli.command.config_path();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            // Not eprintln!: it panics when stderr is gone, and the exit code must stay 2.
            let _ = writeln!(
                std::io::stderr(),
                "invalid configuration: {}",
                dedupd::error_chain(&error)
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };

    // One thread runs every route: lapin does its socket I/O on threads of its own, and a
    // multi-thread scheduler only added cross-thread wake-ups (measured: see README).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(async {
        match &cli.command {
            Command::Run(_) => {
                let shutdown = match dedupd::shutdown::on_signals() {
                    Ok(token) => token,
                    Err(error) => {
                        tracing::error!(%error, "cannot install signal handlers");
                        return ExitCode::from(EXIT_RUNTIME);
                    }
                };
                let reloads = match dedupd::shutdown::reloads() {
                    Ok(reloads) => reloads,
                    Err(error) => {
                        tracing::error!(%error, "cannot install the SIGHUP handler");
                        return ExitCode::from(EXIT_RUNTIME);
                    }
                };
                match dedupd::run_reloadable(path, config, shutdown, reloads).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        tracing::error!(error = %dedupd::error_chain(&error), "dedupd failed");
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
            }
            command => dedupd::cli::execute(command, &config).await,
        }
    })
}

/// `info`, except lapin's own warning for a returned message, which prints the whole message
/// (ids included); dedupd logs the return itself without them.
const DEFAULT_LOG_FILTER: &str = "info,lapin::returned_messages=error";

fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        // By default a failed write is reported with eprintln!, which panics when stderr is a
        // closed pipe: inside whatever task logged, a route or the signal handler.
        .log_internal_errors(false)
        .with_writer(|| LossyStderr);
    // Only fails if a subscriber is already installed, and then that one logs.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// stderr for log lines, where a failed write drops the line and counts it: logging must never
/// stop the work it describes, and a reader that went away must not stop the daemon. Every
/// configured password is hidden first ([`dedupd::config::scrub_logs`]).
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // tracing-subscriber hands over each event whole, in one write_all, and this write
        // takes all of it: a password is never split across two calls.
        let text = String::from_utf8_lossy(buf);
        let line = dedupd::config::scrub_logs(&text);
        // One write_all per line, under stderr's lock: lines from threads do not interleave.
        if std::io::stderr().lock().write_all(line.as_bytes()).is_err() {
            metrics::counter!(dedupd::telemetry::LOG_WRITE_ERRORS).increment(1);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
