//! Per-queue request counters and latency histograms, read by the control socket's `query`
//! (and printed by `vhost-user-qcow2 stats`, also in Prometheus' text format).
//!
//! Relaxed atomics: each counter is written by one queue's worker and read as a snapshot that
//! need not be consistent across counters.
//!
//! Latency is the time from taking a request off the ring to writing its status, in
//! power-of-two microsecond buckets (≤1 µs, ≤2 µs, … ≤2^25 µs ≈ 34 s, then +Inf), kept apart for
//! reads, writes and everything else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::request::RequestKind;
use super::{STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};

/// Kinds of request we count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// A chain that did not parse.
    Invalid,
}

impl From<RequestKind> for Kind {
    fn from(k: RequestKind) -> Self {
        match k {
            RequestKind::In { .. } => Kind::Read,
            RequestKind::Out { .. } => Kind::Write,
            RequestKind::Flush => Kind::Flush,
            RequestKind::GetId => Kind::GetId,
            RequestKind::Discard { .. } => Kind::Discard,
            RequestKind::WriteZeroes { .. } => Kind::WriteZeroes,
        }
    }
}

/// Number of finite histogram buckets: upper bounds 2^0 .. 2^25 µs.
pub const BUCKETS: usize = 26;

/// A latency histogram: counts per power-of-two microsecond bucket, +Inf last.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS + 1],
    sum_us: AtomicU64,
}

/// A snapshot of a [`Histogram`].
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Upper bound of each finite bucket, in microseconds.
    pub le_us: Vec<u64>,
    /// Requests per bucket (not cumulative); one more entry than `le_us`: the +Inf bucket.
    pub counts: Vec<u64>,
    pub sum_us: u64,
    pub count: u64,
}

impl Histogram {
    fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        // Bucket i holds (2^(i-1), 2^i] µs; 0 and 1 µs land in bucket 0.
        let i = if us <= 1 {
            0
        } else {
            usize::try_from(64 - (us - 1).leading_zeros()).unwrap_or(BUCKETS)
        };
        self.counts[i.min(BUCKETS)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            le_us: (0..BUCKETS).map(|i| 1u64 << i).collect(),
            count: counts.iter().sum(),
            counts,
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// Latency histograms by operation.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct LatencySnapshot {
    pub read: HistogramSnapshot,
    pub write: HistogramSnapshot,
    /// Flush, discard, write-zeroes, get-id and invalid requests.
    pub other: HistogramSnapshot,
}

/// Counters of one queue.
#[derive(Debug, Default)]
pub struct QueueStats {
    latency_read: Histogram,
    latency_write: Histogram,
    latency_other: Histogram,
    read: AtomicU64,
    write: AtomicU64,
    flush: AtomicU64,
    get_id: AtomicU64,
    discard: AtomicU64,
    write_zeroes: AtomicU64,
    invalid: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    status_ioerr: AtomicU64,
    status_unsupp: AtomicU64,
    dropped: AtomicU64,
    in_flight: AtomicU64,
}

/// A snapshot of [`QueueStats`], as `query` prints it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct QueueStatsSnapshot {
    pub read: u64,
    pub write: u64,
    pub flush: u64,
    pub get_id: u64,
    pub discard: u64,
    pub write_zeroes: u64,
    pub invalid: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors_ioerr: u64,
    pub errors_unsupp: u64,
    pub dropped: u64,
    pub in_flight: u64,
    /// Microseconds from fetch to completion.
    pub latency_us: LatencySnapshot,
}

impl QueueStats {
    /// A request was taken from the ring.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request finished with `status` (`None`: dropped without a status) after `took`;
    /// `bytes` of data moved.
    pub fn finished(&self, kind: Kind, bytes: u64, status: Option<u8>, took: Duration) {
        match kind {
            Kind::Read => &self.latency_read,
            Kind::Write => &self.latency_write,
            _ => &self.latency_other,
        }
        .record(took);
        let counter = match kind {
            Kind::Read => &self.read,
            Kind::Write => &self.write,
            Kind::Flush => &self.flush,
            Kind::GetId => &self.get_id,
            Kind::Discard => &self.discard,
            Kind::WriteZeroes => &self.write_zeroes,
            Kind::Invalid => &self.invalid,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match status {
            Some(STATUS_OK) => match kind {
                Kind::Read => {
                    self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                Kind::Write => {
                    self.write_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                _ => {}
            },
            Some(STATUS_IOERR) => {
                self.status_ioerr.fetch_add(1, Ordering::Relaxed);
            }
            Some(STATUS_UNSUPP) => {
                self.status_unsupp.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) | None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// The current values.
    pub fn snapshot(&self) -> QueueStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        QueueStatsSnapshot {
            read: l(&self.read),
            write: l(&self.write),
            flush: l(&self.flush),
            get_id: l(&self.get_id),
            discard: l(&self.discard),
            write_zeroes: l(&self.write_zeroes),
            invalid: l(&self.invalid),
            read_bytes: l(&self.read_bytes),
            write_bytes: l(&self.write_bytes),
            errors_ioerr: l(&self.status_ioerr),
            errors_unsupp: l(&self.status_unsupp),
            dropped: l(&self.dropped),
            in_flight: l(&self.in_flight),
            latency_us: LatencySnapshot {
                read: self.latency_read.snapshot(),
                write: self.latency_write.snapshot(),
                other: self.latency_other.snapshot(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_bytes_and_status() {
        let s = QueueStats::default();
        s.started();
        s.started();
        s.started();
        s.finished(Kind::Read, 4096, Some(STATUS_OK), Duration::from_micros(3));
        s.finished(
            Kind::Write,
            512,
            Some(STATUS_IOERR),
            Duration::from_micros(1),
        );
        let snap = s.snapshot();
        assert_eq!((snap.read, snap.write, snap.read_bytes), (1, 1, 4096));
        assert_eq!((snap.write_bytes, snap.errors_ioerr), (0, 1));
        assert_eq!(snap.in_flight, 1);
        // 3 µs lands in (2, 4]: bucket 2; 1 µs in bucket 0.
        assert_eq!(snap.latency_us.read.counts[2], 1);
        assert_eq!(snap.latency_us.read.sum_us, 3);
        assert_eq!(snap.latency_us.write.counts[0], 1);
        assert_eq!(snap.latency_us.other.count, 0);
    }

    #[test]
    fn histogram_buckets_are_powers_of_two() {
        let h = Histogram::default();
        for us in [0, 1, 2, 3, 4, 5, 1 << 25, (1 << 25) + 1, u64::MAX / 2] {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.counts.len(), BUCKETS + 1);
        assert_eq!(&s.counts[..4], &[2, 1, 2, 1]);
        assert_eq!(s.counts[25], 1);
        assert_eq!(s.counts[BUCKETS], 2, "past 2^25 µs: +Inf");
        assert_eq!(s.count, 9);
    }
}
