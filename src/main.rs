//! Command-line entry point: parse arguments, set up logging, map the result to an exit code.

use std::io::Write;

use clap::Parser;
use vhost_user_qcow2::cli;

fn main() {
    let args = cli::Cli::parse();
    let level = args.log_level.unwrap_or(log::LevelFilter::Info);
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level.as_str()))
        .format(|buf, record| {
            // `serve` names its image and socket in every line (several daemons share a journal).
            let ts = buf.timestamp();
            match cli::log_context() {
                Some(ctx) => writeln!(
                    buf,
                    "[{ts} {} {}] {ctx}: {}",
                    record.level(),
                    record.target(),
                    record.args()
                ),
                None => writeln!(
                    buf,
                    "[{ts} {} {}] {}",
                    record.level(),
                    record.target(),
                    record.args()
                ),
            }
        })
        .init();
    match cli::run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vhost-user-qcow2: {}", cli::error_chain(&e));
            std::process::exit(1);
        }
    }
}
