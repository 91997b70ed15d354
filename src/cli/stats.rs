//! `vhost-user-qcow2 stats CONTROL_SOCKET [--output human|json|prometheus]`: the daemon's
//! per-queue counters and latency histograms, read from its control socket
//! (`serve --control-socket`) while it runs.
//!
//! `--output prometheus` prints the text exposition format, for node-exporter's textfile
//! collector: `vhost-user-qcow2 stats S --output prometheus > /var/lib/node-exporter/vm1.prom`.
//! Every series carries the image and socket as labels, so several daemons' files can sit in one
//! directory.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::tools::ToolError;

/// Output formats of `stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StatsFormat {
    #[default]
    Human,
    Json,
    Prometheus,
}

/// Arguments of `stats`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatsArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: StatsFormat,
    /// The daemon's control socket.
    pub socket: PathBuf,
}

/// Asks the daemon for `query`'s answer.
pub fn query(socket: &std::path::Path) -> Result<Value, ToolError> {
    let mut stream = UnixStream::connect(socket)?;
    writeln!(stream, "{}", json!({"execute": "query"}))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let answer: Value = serde_json::from_str(&line)?;
    answer
        .get("return")
        .cloned()
        .ok_or(ToolError::BadArgument("the daemon answered with an error"))
}

/// Prometheus label value escaping (backslash, double quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

const COUNTERS: [(&str, &str); 7] = [
    ("read", "read"),
    ("write", "write"),
    ("flush", "flush"),
    ("get_id", "get_id"),
    ("discard", "discard"),
    ("write_zeroes", "write_zeroes"),
    ("invalid", "invalid"),
];

/// The text exposition format of `q` (a `query` answer).
pub fn prometheus(q: &Value) -> String {
    let s = |k: &str| q.get(k).and_then(Value::as_str).unwrap_or("");
    let base = format!(
        "image=\"{}\",socket=\"{}\"",
        label(s("image")),
        label(s("socket"))
    );
    let queues: Vec<&Value> = q
        .get("queue-stats")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let head = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP vhost_user_qcow2_{name} {help}");
        let _ = writeln!(o, "# TYPE vhost_user_qcow2_{name} {kind}");
    };
    let mut out = String::new();
    head(
        &mut out,
        "capacity_bytes",
        "gauge",
        "Disk size the guest sees.",
    );
    let _ = writeln!(
        out,
        "vhost_user_qcow2_capacity_bytes{{{base}}} {}",
        n(q, "capacity")
    );
    head(
        &mut out,
        "connected",
        "gauge",
        "1 while a frontend is attached.",
    );
    let connected = q.get("connected").and_then(Value::as_bool).unwrap_or(false);
    let _ = writeln!(
        out,
        "vhost_user_qcow2_connected{{{base}}} {}",
        u8::from(connected)
    );
    head(
        &mut out,
        "requests_total",
        "counter",
        "Requests completed, by queue and type.",
    );
    for v in &queues {
        let qi = n(v, "queue");
        for (key, ty) in COUNTERS {
            let _ = writeln!(
                out,
                "vhost_user_qcow2_requests_total{{{base},queue=\"{qi}\",type=\"{ty}\"}} {}",
                n(v, key)
            );
        }
    }
    head(
        &mut out,
        "bytes_total",
        "counter",
        "Data bytes moved, by queue and direction.",
    );
    for v in &queues {
        let qi = n(v, "queue");
        for (key, dir) in [("read_bytes", "read"), ("write_bytes", "write")] {
            let _ = writeln!(
                out,
                "vhost_user_qcow2_bytes_total{{{base},queue=\"{qi}\",direction=\"{dir}\"}} {}",
                n(v, key)
            );
        }
    }
    head(
        &mut out,
        "errors_total",
        "counter",
        "Requests answered with an error status (ioerr, unsupp) or dropped without one.",
    );
    for v in &queues {
        let qi = n(v, "queue");
        for (key, st) in [
            ("errors_ioerr", "ioerr"),
            ("errors_unsupp", "unsupp"),
            ("dropped", "dropped"),
        ] {
            let _ = writeln!(
                out,
                "vhost_user_qcow2_errors_total{{{base},queue=\"{qi}\",status=\"{st}\"}} {}",
                n(v, key)
            );
        }
    }
    head(
        &mut out,
        "in_flight",
        "gauge",
        "Requests taken from the ring and not completed.",
    );
    for v in &queues {
        let _ = writeln!(
            out,
            "vhost_user_qcow2_in_flight{{{base},queue=\"{}\"}} {}",
            n(v, "queue"),
            n(v, "in_flight")
        );
    }
    head(
        &mut out,
        "request_duration_seconds",
        "histogram",
        "Time from taking a request off the ring to completing it.",
    );
    for v in &queues {
        let qi = n(v, "queue");
        for op in ["read", "write", "other"] {
            let Some(h) = v.pointer(&format!("/latency_us/{op}")) else {
                continue;
            };
            let arr = |k: &str| -> Vec<u64> {
                h.get(k)
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default()
            };
            let (le, counts) = (arr("le_us"), arr("counts"));
            let labels = format!("{base},queue=\"{qi}\",op=\"{op}\"");
            let mut cum = 0u64;
            for (i, le_us) in le.iter().enumerate() {
                cum += counts.get(i).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "vhost_user_qcow2_request_duration_seconds_bucket{{{labels},le=\"{}\"}} {cum}",
                    seconds(*le_us)
                );
            }
            let _ = writeln!(
                out,
                "vhost_user_qcow2_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                n(h, "count")
            );
            let _ = writeln!(
                out,
                "vhost_user_qcow2_request_duration_seconds_sum{{{labels}}} {}",
                seconds(n(h, "sum_us"))
            );
            let _ = writeln!(
                out,
                "vhost_user_qcow2_request_duration_seconds_count{{{labels}}} {}",
                n(h, "count")
            );
        }
    }
    out
}

/// Microseconds as a decimal number of seconds, exact.
fn seconds(us: u64) -> String {
    let s = format!("{}.{:06}", us / 1_000_000, us % 1_000_000);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The median (bucket upper bound) of a latency histogram, in µs, or None when empty.
fn median_us(h: &Value) -> Option<u64> {
    let le: Vec<u64> = h
        .get("le_us")?
        .as_array()?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let counts: Vec<u64> = h
        .get("counts")?
        .as_array()?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let mut cum = 0;
    for (i, c) in counts.iter().enumerate() {
        cum += c;
        if cum * 2 >= total {
            return Some(le.get(i).copied().unwrap_or(u64::MAX));
        }
    }
    None
}

fn human(q: &Value) -> String {
    let mut o = String::new();
    let s = |k: &str| q.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let _ = writeln!(o, "image: {}", s("image"));
    let _ = writeln!(o, "socket: {}", s("socket"));
    let _ = writeln!(o, "capacity: {} bytes", n(q, "capacity"));
    let _ = writeln!(
        o,
        "frontend: {}",
        if q.get("connected").and_then(Value::as_bool).unwrap_or(false) {
            "connected"
        } else {
            "none"
        }
    );
    let _ = writeln!(
        o,
        "{:<6}{:>10}{:>10}{:>8}{:>12}{:>12}{:>8}{:>8}{:>10}{:>10}",
        "queue",
        "reads",
        "writes",
        "flushes",
        "read MiB",
        "write MiB",
        "errors",
        "inflight",
        "p50 rd µs",
        "p50 wr µs"
    );
    for v in q
        .get("queue-stats")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let p50 = |op: &str| {
            v.pointer(&format!("/latency_us/{op}"))
                .and_then(median_us)
                .map_or_else(|| "-".to_string(), |u| format!("≤{u}"))
        };
        let _ = writeln!(
            o,
            "{:<6}{:>10}{:>10}{:>8}{:>12.1}{:>12.1}{:>8}{:>8}{:>10}{:>10}",
            n(v, "queue"),
            n(v, "read"),
            n(v, "write"),
            n(v, "flush"),
            n(v, "read_bytes") as f64 / 1048576.0,
            n(v, "write_bytes") as f64 / 1048576.0,
            n(v, "errors_ioerr") + n(v, "errors_unsupp") + n(v, "dropped"),
            n(v, "in_flight"),
            p50("read"),
            p50("write"),
        );
    }
    o
}

/// Runs `stats`.
pub fn run(args: &StatsArgs, out: &mut dyn Write) -> Result<i32, ToolError> {
    let q = query(&args.socket)?;
    match args.output {
        StatsFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&q)?)?,
        StatsFormat::Prometheus => write!(out, "{}", prometheus(&q))?,
        StatsFormat::Human => write!(out, "{}", human(&q))?,
    }
    Ok(0)
}
