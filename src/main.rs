//! Command-line entry point. Everything but argument parsing lives in the library.

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    eprintln!("vhost-user-qcow2: no subcommand implemented yet");
    std::process::exit(1);
}
