//! Command-line interface: one clap subcommand per file.
//!
//! Adding a subcommand = a module here, a variant in [`Command`] and an arm in [`run`] (and, if it
//! has its own error type, a variant in [`enum@Error`]).

use clap::{Parser, Subcommand};
use thiserror::Error;

pub mod access;
pub mod check;
pub mod compare;
pub mod control;
pub mod convert;
pub mod create;
pub mod create_opts;
pub mod encrypt;
pub mod generate;
pub mod info;
pub mod keyslot;
pub mod log_filter;
pub mod luks2_info;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod resize;
pub mod serve;
pub mod snapshot;
pub mod socket;
pub mod stats;
pub mod systemd;
pub mod tools;

/// vhost-user-blk backend serving raw, qcow2 and LUKS-encrypted images.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-qcow2", version, about)]
pub struct Cli {
    /// Log level: error, warn, info, debug or trace (default info; RUST_LOG, if set, wins).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
    #[command(subcommand)]
    pub command: Command,
}

/// What every log line names after its level: the image and socket `serve` works on.
static LOG_CONTEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the log-line context (once; later calls are ignored).
pub fn set_log_context(ctx: String) {
    let _ = LOG_CONTEXT.set(ctx);
}

/// The log-line context, if `serve` has set one.
pub fn log_context() -> Option<&'static str> {
    LOG_CONTEXT.get().map(String::as_str)
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
    /// Show where the guest's data lives (as `qemu-img map`).
    Map(map::MapArgs),
    /// Compare the guest content of two images (as `qemu-img compare`: exit 0 same, 1 different, 2 error).
    Compare(compare::CompareArgs),
    /// Copy an image into a new raw, qcow2 or LUKS image (as `qemu-img convert`).
    Convert(convert::ConvertArgs),
    /// How large a new image must be (as `qemu-img measure`).
    Measure(measure::MeasureArgs),
    /// List, create, apply or delete internal qcow2 snapshots (as `qemu-img snapshot`).
    Snapshot(snapshot::SnapshotArgs),
    /// Change the backing file of a qcow2 image (as `qemu-img rebase`).
    Rebase(rebase::RebaseArgs),
    /// Ask a running daemon (its --control-socket): query, or resize the disk live.
    Control(control::ControlArgs),
    /// A running daemon's per-queue counters and latency histograms (text, JSON, Prometheus).
    Stats(stats::StatsArgs),
    /// Change an image's size offline (as `qemu-img resize`).
    Resize(resize::ResizeArgs),
    /// Generate the manual pages or shell completions.
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
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
        Command::Map(args) => map::run(&args, &mut out)?,
        Command::Compare(args) => compare::run(&args, &mut out)?,
        Command::Convert(args) => convert::run(&args, &mut out)?,
        Command::Measure(args) => measure::run(&args, &mut out)?,
        Command::Snapshot(args) => snapshot::run(&args, &mut out)?,
        Command::Rebase(args) => rebase::run(&args, &mut out)?,
        Command::Generate(args) => generate::run(&args, &mut out)?,
        Command::Control(args) => control::run(&args, &mut out)?,
        Command::Stats(args) => stats::run(&args, &mut out)?,
        Command::Resize(args) => resize::run(&args, &mut out)?,
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

/// Backend program conventions (vhost-user.rst): management tools start a backend as
/// `PROGRAM --socket-path PATH ...`, `PROGRAM --fd N ...` or `PROGRAM --print-capabilities`,
/// without a subcommand. If the first argument is an option other than --help/--version, the
/// arguments are taken as `serve`'s.
pub fn with_implied_serve(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let implied = args.get(1).and_then(|a| a.to_str()).is_some_and(|a| {
        a.starts_with("--")
            && !matches!(a, "--help" | "--version" | "--log-level")
            && !a.starts_with("--log-level=")
    });
    if !implied {
        return args;
    }
    let mut out = Vec::with_capacity(args.len() + 1);
    let mut it = args.into_iter();
    out.extend(it.next());
    out.push("serve".into());
    out.extend(it);
    out
}
