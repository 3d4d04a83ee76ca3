use clap::Parser;
use command_trigger::{app, cli::Cli};
use std::process::ExitCode;

fn main() -> ExitCode {
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
