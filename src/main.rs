//! Command-line entry point: parse arguments, set up logging, map the result to an exit code.

use clap::Parser;
use vhost_user_qcow2::cli;

fn main() {
    cli::log_filter::init();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vhost-user-qcow2: {}", cli::error_chain(&e));
            std::process::exit(1);
        }
    }
}
