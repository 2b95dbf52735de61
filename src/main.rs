//! The `dr` binary: parse, run, report. All logic lives in the library.

use clap::Parser;

fn main() {
    let cli = dr::cli::Cli::parse();
    dr::cli::init_logging(&cli);
    if let Err(e) = dr::cli::run(cli) {
        eprintln!("dr: error: {e}");
        std::process::exit(e.exit_code());
    }
}
