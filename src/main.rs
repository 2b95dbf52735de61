//! The `dr` binary: parse, run, report. All logic lives in the library.

use clap::Parser;

/// mimalloc rather than glibc's malloc, for Rust and (its `override`
/// feature) for the C inside dr too: SQLite's page caches and zstd's
/// contexts. The daemon runs each job on threads of their own, and glibc
/// gave those threads arenas that kept what they freed: a busy fleet's
/// daemon grew from 122 to 157 MiB in its first five minutes, fifteen
/// arenas of 4 to 17 MiB resident each. Its `no_thp` feature keeps
/// mimalloc from asking for transparent huge pages: with them a diff's
/// peak RSS rose from 64 to 87 MiB and its system time by a quarter, each
/// first touch zeroing 2 MiB.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
