//! Per-queue request counters, read by the control socket's `query`.
//!
//! Relaxed atomics: each counter is written by one queue's worker and read as a snapshot that
//! need not be consistent across counters.

use std::sync::atomic::{AtomicU64, Ordering};

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

/// Counters of one queue.
#[derive(Debug, Default)]
pub struct QueueStats {
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
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
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
}

impl QueueStats {
    /// A request was taken from the ring.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request finished with `status` (`None`: dropped without a status); `bytes` of data
    /// moved.
    pub fn finished(&self, kind: Kind, bytes: u64, status: Option<u8>) {
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
        s.finished(Kind::Read, 4096, Some(STATUS_OK));
        s.finished(Kind::Write, 512, Some(STATUS_IOERR));
        let snap = s.snapshot();
        assert_eq!((snap.read, snap.write, snap.read_bytes), (1, 1, 4096));
        assert_eq!((snap.write_bytes, snap.errors_ioerr), (0, 1));
        assert_eq!(snap.in_flight, 1);
    }
}
