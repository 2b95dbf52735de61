//! The `dr` binary: parse, run, report. All logic lives in the library.

use clap::Parser;

fn main() {
    let cli = match dr::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => std::process::exit(dr::cli::usage_error(&e)),
    };
    dr::cli::init_logging(&cli);
    let json = cli.json();
    if let Err(e) = dr::cli::run(cli) {
        dr::cli::report_error(&e, json);
        std::process::exit(e.exit_code());
    }
}
