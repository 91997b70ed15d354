//! Command-line entry point: parse arguments, set up logging, map the result to an exit code.

use clap::Parser;
use vhost_user_qcow2::cli;

fn main() {
    let args = cli::Cli::parse_from(cli::with_implied_serve(std::env::args_os().collect()));
    cli::log_filter::init(args.log_level.unwrap_or(log::LevelFilter::Info));
    match cli::run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vhost-user-qcow2: {}", cli::error_chain(&e));
            std::process::exit(1);
        }
    }
}
