//! Command-line interface: one clap subcommand per file.
//!
//! Adding a subcommand = a module here, a variant in [`Command`] and an arm in [`run`] (and, if it
//! has its own error type, a variant in [`enum@Error`]).

use clap::{Parser, Subcommand};
use thiserror::Error;

pub mod serve;

/// vhost-user-blk backend serving raw, qcow2 and LUKS-encrypted images.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-qcow2", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve an image to a VMM over a vhost-user-blk socket.
    Serve(serve::ServeArgs),
}

/// Errors of any subcommand.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Serve(args) => serve::run(args)?,
    }
    Ok(())
}

/// `e` and its chain of sources on one line, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.ends_with(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    msg
}
