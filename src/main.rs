//! The binary: parses the command line, sets up logging, runs the subcommand, and picks the
//! exit status. The one place that does: every other part returns an outcome or an error.
use clap::Parser;
use command_trigger::cli::{Cli, Command, LogFormat};
use command_trigger::{app, init, logging};
use std::process::ExitCode;

/// Counts each thread's allocations, for the per-handler memory budget (README, "Script limits").
#[global_allocator]
static ALLOCATOR: command_trigger::script::budget::CountingAllocator =
    command_trigger::script::budget::CountingAllocator;

fn main() -> ExitCode {
    if let Some(code) = init::run_if_pid1() {
        return ExitCode::from(code);
    }
    let cli = Cli::parse();
    logging::init(match &cli.command {
        Command::Serve(args) => args.log_format,
        _ => LogFormat::Text,
    });
    match app::run(cli) {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(fatal) => {
            // Not through the logger: a fatal error must be seen even with `RUST_LOG=off`.
            eprintln!("{fatal}");
            ExitCode::from(fatal.exit_code())
        }
    }
}
