//! The process logger: env_logger behind a rate limiter for messages our dependencies log.
//!
//! rust-vmm crates log guest-triggered conditions themselves: virtio-queue logs an error line for
//! every malformed available-ring index it meets, so a guest that keeps writing a bad index
//! could fill the host's logs. Our own modules rate-limit what they log about guests
//! (virtio_blk's request log limiter); records from any other crate pass through here, at most
//! [`LIMIT`] per second per crate, with one summary line for what was dropped.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Log, Metadata, Record};

/// Records per second let through per dependency.
pub const LIMIT: u32 = 10;

/// Our crate's log targets all start with this; they are never limited here.
const OWN_TARGET: &str = "vhost_user_qcow2";

/// The window of one dependency: (second, records seen in it).
type Window = (&'static str, u64, u32);

/// A logger that forwards to `inner`, rate-limiting records of other crates.
pub struct RateLimited<L> {
    inner: L,
    windows: Mutex<Vec<Window>>,
}

impl<L: Log> RateLimited<L> {
    /// Wraps `inner`.
    pub fn new(inner: L) -> Self {
        Self {
            inner,
            windows: Mutex::new(Vec::new()),
        }
    }

    /// The crate part of a target (`virtio_queue::queue` → `virtio_queue`), as a static name
    /// for the few crates we know (others share one window).
    fn family(target: &str) -> &'static str {
        const KNOWN: [&str; 4] = ["virtio_queue", "vhost_user_backend", "vhost", "vm_memory"];
        let head = target.split("::").next().unwrap_or(target);
        KNOWN.into_iter().find(|k| *k == head).unwrap_or("other")
    }

    /// Whether to forward now, and how many records of this family were dropped in the window
    /// that just ended.
    fn admit(&self, family: &'static str, now: u64) -> (bool, u32) {
        let mut w = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = match w.iter().position(|e| e.0 == family) {
            Some(i) => i,
            None => {
                w.push((family, now, 0));
                w.len() - 1
            }
        };
        let e = &mut w[i];
        let mut dropped = 0;
        if e.1 != now {
            dropped = e.2.saturating_sub(LIMIT);
            e.1 = now;
            e.2 = 0;
        }
        e.2 = e.2.saturating_add(1);
        (e.2 <= LIMIT, dropped)
    }
}

impl<L: Log> Log for RateLimited<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        if record.target().starts_with(OWN_TARGET) {
            self.inner.log(record);
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let family = Self::family(record.target());
        let (pass, dropped) = self.admit(family, now);
        if dropped > 0 {
            self.inner.log(
                &Record::builder()
                    .level(log::Level::Warn)
                    .target(OWN_TARGET)
                    .args(format_args!(
                        "{dropped} log messages from {family} suppressed"
                    ))
                    .build(),
            );
        }
        if pass {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs env_logger (default `level`, `RUST_LOG` overrides) behind the rate limiter. Once
/// `serve` has named its image and socket ([`super::set_log_context`]), every line carries them
/// (several daemons can share one journal).
pub fn init(level: log::LevelFilter) {
    use std::io::Write;
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level.as_str()))
            .format(|buf, record| {
                let ts = buf.timestamp();
                let (l, t) = (record.level(), record.target());
                match super::log_context() {
                    Some(ctx) => writeln!(buf, "[{ts} {l} {t}] {ctx}: {}", record.args()),
                    None => writeln!(buf, "[{ts} {l} {t}] {}", record.args()),
                }
            })
            .build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(RateLimited::new(inner))).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize, AtomicUsize);

    impl Log for &Count {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &Record<'_>) {
            if r.target().starts_with(OWN_TARGET) {
                self.1.fetch_add(1, Ordering::Relaxed);
            } else {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        fn flush(&self) {}
    }

    fn emit(l: &impl Log, target: &str, n: usize) {
        for i in 0..n {
            l.log(
                &Record::builder()
                    .level(log::Level::Error)
                    .target(target)
                    .args(format_args!("Iterator error {i}"))
                    .build(),
            );
        }
    }

    #[test]
    fn a_flood_of_virtio_queue_errors_is_cut_to_the_limit() {
        let c = Count::default();
        let l = RateLimited::new(&c);
        let t0 = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        emit(&l, "virtio_queue::queue", 10_000);
        let t1 = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let passed = c.0.load(Ordering::Relaxed);
        let summaries = c.1.load(Ordering::Relaxed);
        // At most LIMIT per second window the flood spanned.
        let windows = usize::try_from(t1 - t0 + 1).expect("small");
        assert!(passed <= windows * 10, "{passed} of 10000 passed");
        assert!(passed >= 10);
        // Our own records are never limited.
        emit(&l, "vhost_user_qcow2::virtio_blk::exec", 100);
        assert!(c.1.load(Ordering::Relaxed) >= summaries + 100);
    }
}
