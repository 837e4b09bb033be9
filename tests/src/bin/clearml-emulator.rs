//! Runs the ClearML API emulator as a standalone server, for the demo and for manual tests with the real clients.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fleet_tests::emulator::{Emulator, EmulatorConfig};

/// An in-memory emulator of the ClearML server REST API (queues, workers, tasks, projects).
#[derive(Parser)]
#[command(name = "clearml-emulator", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8008")]
    bind: SocketAddr,

    /// Access key that auth.login accepts.
    #[arg(long, env = "CLEARML_API_ACCESS_KEY")]
    access_key: String,

    /// Secret key that auth.login accepts.
    #[arg(long, env = "CLEARML_API_SECRET_KEY", hide_env_values = true)]
    secret_key: String,

    /// Seconds after its last registration or status report before a worker that registered without a
    /// timeout expires.
    #[arg(long, default_value_t = 600)]
    worker_timeout_secs: u64,

    /// Queue to create at start, so workers can poll it at once; repeat for several.
    #[arg(long = "queue")]
    queues: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr, so stdout carries only the "listening on" line; colour only on a terminal.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let args = Args::parse();
    let config = EmulatorConfig {
        access_key: args.access_key,
        secret_key: args.secret_key,
        worker_timeout: Duration::from_secs(args.worker_timeout_secs),
    };
    let emulator = Emulator::start(args.bind, config)
        .await
        .with_context(|| format!("failed to start the ClearML API emulator on {}", args.bind))?;
    for name in &args.queues {
        emulator.create_queue(name);
    }
    println!("clearml-emulator listening on {}", emulator.url());

    tokio::signal::ctrl_c()
        .await
        .context("failed to wait for Ctrl-C")?;
    tracing::info!("shutting down on Ctrl-C");
    emulator.shutdown().await;
    Ok(())
}
