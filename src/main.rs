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
        Ok(code) => ExitCode::from(code),
        Err(fatal) => {
            log::error!("{fatal}");
            ExitCode::from(fatal.exit_code())
        }
    }
}
