//! `fleetctl`: the operators' command-line client of the coordinator's FleetService. See `fleetctl --help`
//! and docs/fleetctl.md for the commands and exit codes.

// A binary's root file looks for modules beside itself in src/bin/, so the paths point into fleetctl/.
#[path = "fleetctl/cli.rs"]
mod cli;
#[path = "fleetctl/commands.rs"]
mod commands;
#[path = "fleetctl/connect.rs"]
mod connect;
#[path = "fleetctl/render.rs"]
mod render;
#[path = "fleetctl/table.rs"]
mod table;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::connect::EXIT_SERVER;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`fleetctl events | head`) would panic. The
    // default action ends the process quietly, as other command-line tools do.
    // SAFETY: setting a signal's disposition to SIG_DFL before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }

    // clap prints its own errors and exits with 2 on an invalid command line.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_SERVER);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.exit)
        }
    }
}
