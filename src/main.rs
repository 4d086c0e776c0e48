use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    prefect_agent_operator::install_crypto_provider();
    let cli = prefect_agent_operator::cli::Cli::parse();
    prefect_agent_operator::app::run(cli)
}
