//! Command-line entry point: parse arguments, set up logging, map the result to an exit code.

use clap::Parser;
use vhost_user_qcow2::cli;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("vhost-user-qcow2: {}", cli::error_chain(&e));
        std::process::exit(1);
    }
}
