//! Command-line interface: one clap subcommand per file.
//!
//! Adding a subcommand = a module here, a variant in [`Command`] and an arm in [`run`] (and, if it
//! has its own error type, a variant in [`enum@Error`]).

use clap::{Parser, Subcommand};
use thiserror::Error;

pub mod check;
pub mod create;
pub mod encrypt;
pub mod info;
pub mod keyslot;
pub mod luks2_info;
pub mod serve;
pub mod tools;

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
    /// Create a qcow2 or raw image.
    Create(create::CreateArgs),
    /// Show what an image is (as `qemu-img info`).
    Info(info::InfoArgs),
    /// Check an image's metadata for leaks and corruption (as `qemu-img check`).
    Check(check::CheckArgs),
    /// List, add or remove LUKS key slots.
    Keyslot(keyslot::KeyslotArgs),
}

/// Errors of any subcommand.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    #[error(transparent)]
    Tool(#[from] tools::ToolError),
    #[error(transparent)]
    Keyslot(#[from] keyslot::KeyslotError),
}

/// Runs the parsed command line; the result is the process exit code.
pub fn run(cli: Cli) -> Result<i32, Error> {
    let mut out = std::io::stdout().lock();
    Ok(match cli.command {
        Command::Serve(args) => {
            serve::run(args)?;
            0
        }
        Command::Create(args) => create::run(&args, &mut out)?,
        Command::Info(args) => info::run(&args, &mut out)?,
        Command::Check(args) => check::run(&args, &mut out)?,
        Command::Keyslot(args) => {
            keyslot::run_to(args, &mut out)?;
            0
        }
    })
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
