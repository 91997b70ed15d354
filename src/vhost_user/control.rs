//! The control socket (`serve --control-socket PATH`): JSON lines, one request and one answer
//! per line, in the spirit of QMP.
//!
//! ```text
//! → {"execute": "query"}
//! ← {"return": {"capacity": 1073741824, "queues": 2, "connected": true, ...}}
//! → {"execute": "resize", "arguments": {"size": 2147483648}}
//! ← {"return": {"capacity": 2147483648, "guest-notified": true}}
//! ← {"error": {"class": "GenericError", "desc": "..."}}
//! ```
//!
//! `resize` grows the image, takes the new capacity into the device (requests of batches that
//! start afterwards see it) and sends CONFIG_CHANGE_MSG to the attached frontend, which re-reads
//! the config space and tells the guest. Shrinking needs `"allow-shrink": true`.
//! The socket is created mode 0600 (under a 0177 umask, so it is never reachable by others).

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::Deserialize;
use serde_json::{json, Value};

use super::Export;

/// Longest request line we read.
const MAX_LINE: u64 = 64 * 1024;

/// One request.
#[derive(Debug, Deserialize)]
struct Request {
    execute: String,
    #[serde(default)]
    arguments: Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeArgs {
    size: u64,
    #[serde(default, rename = "allow-shrink")]
    allow_shrink: bool,
}

/// `e` and its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

fn error(desc: impl std::fmt::Display) -> Value {
    json!({"error": {"class": "GenericError", "desc": desc.to_string()}})
}

/// Binds the control socket (mode 0600) and serves it on a thread named `control`.
pub fn spawn(path: &Path, export: Arc<Export>) -> io::Result<JoinHandle<()>> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && UnixStream::connect(path).is_err() {
            fs::remove_file(path)?;
        }
    }
    // SAFETY: umask only changes this process's file-creation mask; restored right after bind.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound?;
    std::thread::Builder::new()
        .name("control".to_owned())
        .spawn(move || {
            crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Control);
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = serve_client(s, &export) {
                            log::debug!("control client: {e}");
                        }
                    }
                    Err(e) => log::warn!("control socket accept: {e}"),
                }
            }
        })
}

fn serve_client(stream: UnixStream, export: &Export) -> io::Result<()> {
    // One client at a time: one that goes quiet must not hold the socket forever.
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(io::Read::take(stream, MAX_LINE));
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(&req, export),
            Err(e) => error(format!("bad request: {e}")),
        };
        writeln!(out, "{answer}")?;
    }
}

/// Answers one request.
fn handle(req: &Request, export: &Export) -> Value {
    match req.execute.as_str() {
        "query" => json!({"return": query(export)}),
        "resize" => match serde_json::from_value::<ResizeArgs>(req.arguments.clone()) {
            Ok(a) => resize(export, a.size, a.allow_shrink),
            Err(e) => error(format!("resize arguments: {e}")),
        },
        other => error(format!("unknown command {other:?}")),
    }
}

fn query(export: &Export) -> Value {
    let dev = export.device();
    let conn = export.connection();
    let negotiated = conn.as_ref().map(|c| c.negotiated()).unwrap_or_default();
    let stats: Vec<_> = dev
        .stats()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut v = serde_json::to_value(s.snapshot()).unwrap_or(Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.insert("queue".to_owned(), json!(i));
            }
            v
        })
        .collect();
    let (image, socket) = export.names();
    json!({
        "image": image,
        "socket": socket,
        "capacity": dev.capacity(),
        "logical-block-size": dev.limits().block_size,
        "read-only": dev.image().read_only(),
        "writeback": dev.writeback(),
        "queues": dev.num_queues(),
        "queue-size": dev.queue_size(),
        "connected": conn.is_some(),
        "running-queues": negotiated.running_queues,
        "features": format!("{:#x}", negotiated.features),
        "protocol-features": format!("{:#x}", negotiated.protocol_features),
        "queue-stats": stats,
    })
}

fn resize(export: &Export, size: u64, allow_shrink: bool) -> Value {
    let dev = export.device();
    let current = dev.capacity();
    let block = u64::from(dev.limits().block_size);
    if size == 0 || !size.is_multiple_of(block) {
        return error(format!(
            "size {size} is not a positive multiple of the {block}-byte block size"
        ));
    }
    if size < current && !allow_shrink {
        return error(format!(
            "shrinking from {current} to {size} bytes is refused without allow-shrink"
        ));
    }
    if let Err(e) = dev.image().resize(size) {
        return error(format!("resize failed: {}", chain(&e)));
    }
    if let Err(e) = dev.refresh_capacity() {
        return error(e);
    }
    log::info!("resized from {current} to {size} bytes");
    let notified = match export.connection().map(|c| c.notify_config_change()) {
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            log::warn!("cannot tell the frontend about the new size: {e}");
            false
        }
        None => false,
    };
    json!({"return": {"capacity": dev.capacity(), "guest-notified": notified}})
}
