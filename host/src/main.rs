//! The `wasmhook` binary: parse the command line, set up logging, run the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = wasmhook::cli::Cli::parse();
    wasmhook::telemetry::init(cli.log_format);
    match cli.run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
