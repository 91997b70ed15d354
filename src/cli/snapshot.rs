//! `vhost-user-qcow2 snapshot -l|-c NAME|-a NAME|-d NAME FILE`: internal qcow2 snapshots, as
//! `qemu-img snapshot` (the image must not be in use: the daemon must not be serving it).

use std::io::Write;
use std::path::PathBuf;

use super::tools::ToolError;
use crate::qcow2::snapshot_ops::{self as ops, Snapshot};

/// Arguments of `snapshot`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("action").required(true).multiple(false)))]
pub struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l', group = "action")]
    pub list: bool,
    /// Create a snapshot of the current state.
    #[arg(short = 'c', value_name = "NAME", group = "action")]
    pub create: Option<String>,
    /// Revert the disk to a snapshot (by id or name).
    #[arg(short = 'a', value_name = "NAME", group = "action")]
    pub apply: Option<String>,
    /// Delete a snapshot (by name).
    #[arg(short = 'd', value_name = "NAME", group = "action")]
    pub delete: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// With -l: share the image with writers (no lock), as qemu-img's -U.
    #[arg(short = 'U', long = "force-share", requires = "list")]
    pub force_share: bool,
    /// The qcow2 image.
    pub file: PathBuf,
}

/// QEMU's `size_to_str`: three significant digits and a binary suffix ("0 B", "1.5 KiB"); the
/// unit changes at 1000 of the smaller one, not 1024, so that no number has four digits.
pub fn size_to_str(v: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut i = 0usize;
    while i < 6 && u128::from(v) >= 1000u128 << (10 * i) {
        i += 1;
    }
    let val = v as f64 / (1u128 << (10 * i)) as f64;
    // %0.3g: three significant digits, trailing zeros dropped.
    let digits = if val >= 100.0 {
        0
    } else if val >= 10.0 {
        1
    } else if val >= 1.0 {
        2
    } else {
        3
    };
    let mut s = format!("{val:.digits$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s} {}B", SUFFIXES[i])
}

/// `YYYY-MM-DD HH:MM:SS` in local time, as QEMU prints snapshot dates.
fn local_date(sec: u32) -> String {
    let t = libc::time_t::from(sec);
    // SAFETY: an all-zero tm is a valid value for localtime_r to overwrite.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: `t` and `tm` are valid for the call; localtime_r is the thread-safe variant.
    if unsafe { libc::localtime_r(&raw const t, &raw mut tm) }.is_null() {
        return String::from("?");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// One line of `qemu-img snapshot -l` (QEMU's `bdrv_snapshot_dump`); `None` is the header.
pub fn dump_line(s: Option<&Snapshot>) -> String {
    let Some(s) = s else {
        return format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        );
    };
    let secs = s.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (s.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = match s.icount {
        Some(i) if i != u64::MAX => i.to_string(),
        _ => String::new(),
    };
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        s.id,
        s.name,
        size_to_str(s.vm_state_size),
        local_date(s.date_sec),
        clock,
        icount
    )
}

/// The snapshot list as `qemu-img info --output=json` shows it.
pub fn info_json(snaps: &[Snapshot]) -> serde_json::Value {
    snaps
        .iter()
        .map(|s| {
            let mut o = serde_json::Map::new();
            if let Some(i) = s.icount.filter(|&i| i != u64::MAX) {
                o.insert("icount".into(), i.into());
            }
            o.insert(
                "vm-clock-nsec".into(),
                (s.vm_clock_nsec % 1_000_000_000).into(),
            );
            o.insert("name".into(), s.name.clone().into());
            o.insert("date-sec".into(), s.date_sec.into());
            o.insert("date-nsec".into(), s.date_nsec.into());
            o.insert(
                "vm-clock-sec".into(),
                (s.vm_clock_nsec / 1_000_000_000).into(),
            );
            o.insert("id".into(), s.id.clone().into());
            o.insert("vm-state-size".into(), s.vm_state_size.into());
            serde_json::Value::Object(o)
        })
        .collect()
}

/// Runs `snapshot`.
pub fn run(args: &SnapshotArgs, out: &mut dyn Write) -> Result<i32, ToolError> {
    let read_only = args.list;
    // QEMU's locks: a shared read lock to list (none with -U), the write lock to change.
    let locking = if read_only {
        super::tools::read_locking(args.force_share)
    } else {
        crate::image::Locking::On
    };
    let (st, _lock) = crate::image::open_file_locked(&args.file, read_only, locking)?;
    if !crate::qcow2::is_qcow2(&st)? {
        return Err(ToolError::BadArgument("snapshots need a qcow2 image"));
    }
    if args.list {
        let snaps = ops::list(&st)?;
        if snaps.is_empty() {
            return Ok(0);
        }
        writeln!(out, "Snapshot list:")?;
        writeln!(out, "{}", dump_line(None))?;
        for s in &snaps {
            writeln!(out, "{}", dump_line(Some(s)))?;
        }
    } else if let Some(name) = &args.create {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let sec = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
        // qemu-img keeps microseconds.
        let nsec = now.subsec_micros() * 1000;
        ops::create(&st, name, (sec, nsec))?;
    } else if let Some(name) = &args.apply {
        ops::apply(&st, name)?;
    } else if let Some(name) = &args.delete {
        ops::delete(&st, name)?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::size_to_str;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(10 << 20), "10 MiB");
        assert_eq!(size_to_str(123_456_789), "118 MiB");
    }
}
