//! `control PATH query|resize SIZE`: a client for the daemon's control socket
//! (`serve --control-socket PATH`).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::tools::{parse_size, ToolError};

/// `control` arguments.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The daemon's control socket.
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: ControlCommand,
}

/// What to ask the daemon.
#[derive(Debug, Subcommand)]
pub enum ControlCommand {
    /// Capacity, queues, negotiated features and per-queue counters, as JSON.
    Query,
    /// Change the disk size while the guest runs (grow; shrinking needs --shrink).
    Resize {
        /// New size in bytes, or with a K, M, G, T suffix.
        size: String,
        /// Allow the new size to be smaller than the current one.
        #[arg(long)]
        shrink: bool,
    },
}

/// Sends one request; prints the answer's `return` as JSON. Exit code 0, or 1 if the daemon
/// answered with an error (printed on stderr).
pub fn run(args: &ControlArgs, out: &mut dyn Write) -> Result<i32, ToolError> {
    let request = match &args.command {
        ControlCommand::Query => json!({"execute": "query"}),
        ControlCommand::Resize { size, shrink } => json!({
            "execute": "resize",
            "arguments": {"size": parse_size(size)?, "allow-shrink": shrink},
        }),
    };
    let mut stream = UnixStream::connect(&args.socket)?;
    writeln!(stream, "{request}")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let answer: Value = serde_json::from_str(&line)?;
    if let Some(r) = answer.get("return") {
        writeln!(out, "{}", serde_json::to_string_pretty(r)?)?;
        return Ok(0);
    }
    let desc = answer
        .pointer("/error/desc")
        .and_then(Value::as_str)
        .unwrap_or("malformed answer");
    let _ = writeln!(io::stderr(), "vhost-user-qcow2: {desc}");
    Ok(1)
}
