//! `fleet-node-agent --config FILE`: runs the node agent until it powers the machine off or SIGTERM stops it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fleet_node_agent::config::Config;
use fleet_node_agent::run::{self, exit_code};
use tokio::sync::mpsc;

/// Node agent of clearml-fleet: runs clearml-agent behind an API gate, drains without losing a task, and
/// terminates its own machine when the coordinator grants it.
#[derive(Debug, Parser)]
#[command(name = "fleet-node-agent", version)]
struct Args {
    /// Bootstrap config file (TOML): coordinator endpoints, bootstrap token, CA certificate, shutdown action.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

fn main() -> ExitCode {
    // Built in the workspace, rustls has both the aws-lc-rs and the ring backend and cannot pick one by itself,
    // so the first TLS handshake to the coordinator would panic. Select aws-lc-rs explicitly.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();

    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => return fail(&anyhow::Error::new(error), exit_code::CONFIG),
    };

    // Two worker threads are plenty: the agent waits on I/O, and clearml-agent needs the cores.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let error = anyhow::Error::new(error).context("failed to start the tokio runtime");
            return fail(&error, exit_code::FAILURE);
        }
    };

    runtime.block_on(async move {
        let sigterm = match forward_sigterm() {
            Ok(receiver) => receiver,
            Err(error) => return fail(&error, exit_code::FAILURE),
        };
        match run::run(config, sigterm).await {
            Ok(_) => ExitCode::from(exit_code::OK as u8),
            Err(error) => {
                let code = error.exit_code();
                fail(&anyhow::Error::new(error), code)
            }
        }
    })
}

/// Turns SIGTERM and SIGINT into messages for the agent's main loop.
fn forward_sigterm() -> anyhow::Result<mpsc::Receiver<()>> {
    use anyhow::Context;
    use tokio::signal::unix::{SignalKind, signal};

    let mut terminate =
        signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = terminate.recv() => {}
                Some(()) = interrupt.recv() => {}
                else => return,
            }
            let _ = sender.try_send(());
        }
    });
    Ok(receiver)
}

/// Prints the error once, on stderr (which systemd's journal also records), and returns the exit code.
fn fail(error: &anyhow::Error, code: i32) -> ExitCode {
    eprintln!("fleet-node-agent: error: {error:#}");
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
