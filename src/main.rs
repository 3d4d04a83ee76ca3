use clap::Parser;
use command_trigger::{app, cli::Cli, init};
use std::process::ExitCode;

fn main() -> ExitCode {
    if let Some(code) = init::run_if_pid1() {
        return ExitCode::from(code);
    }
    let cli = Cli::parse();
    app::init_logging();
    match app::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(fatal) => {
            log::error!("{fatal}");
            ExitCode::from(fatal.exit_code())
        }
    }
}
