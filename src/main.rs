//! The `dedupd` binary: parse the command line, set up logging, load the config, run.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use dedupd::cli::{Cli, Command, LogFormat, EXIT_CONFIG, EXIT_RUNTIME};
use dedupd::config::Config;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);

    let path = cli.command.config_path();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("invalid configuration: {}", dedupd::error_chain(&error));
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
            eprintln!("cannot start the async runtime: {error}");
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
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
