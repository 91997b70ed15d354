//! Executing parsed requests against a [`BlockImage`], and the one place where errors become
//! virtio statuses.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryBackend;

use super::request::{self, Limits, Parsed, Request, RequestError, RequestKind, Scratch};
use super::stats::{Kind, QueueStats};
use super::{ID_BYTES, STATUS_IOERR as IOERR, STATUS_OK, STATUS_UNSUPP as UNSUPP};
use crate::image::{BlockImage, ImageError};

/// Everything that can go wrong with one request.
#[derive(Debug, Error)]
pub enum BlkError {
    #[error("bad request")]
    Request(#[source] RequestError),
    #[error("image")]
    Image(#[source] ImageError),
}

/// Who caused an error: decides the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blame {
    Guest,
    Host,
}

/// The virtio status for an error, and who is to blame. The one exhaustive match: a new error
/// variant anywhere below must be given its status here.
fn classify(e: &BlkError) -> (u8, Blame) {
    match e {
        BlkError::Request(r) => match r {
            RequestError::NoStatus
            | RequestError::BadAddress { .. }
            | RequestError::DescriptorOrder
            | RequestError::HeaderTooShort { .. }
            | RequestError::TooManySegments { .. }
            | RequestError::DataTooLong
            | RequestError::WrongDirection { .. }
            | RequestError::Unaligned { .. }
            | RequestError::OutOfRange { .. }
            | RequestError::SectorOverflow { .. }
            | RequestError::BadSegmentPayload { .. }
            | RequestError::TooManyDwzSegments { .. }
            | RequestError::DwzSegmentTooLarge { .. } => (IOERR, Blame::Guest),
            RequestError::BadDwzFlags { .. } | RequestError::Unsupported { .. } => {
                (UNSUPP, Blame::Guest)
            }
        },
        BlkError::Image(i) => match i {
            // The request layer checked the range already: the image disagreeing is our bug or
            // a shrunk file, not the guest's doing.
            ImageError::OutOfRange { .. } => (IOERR, Blame::Host),
            ImageError::ReadOnly | ImageError::ProbedFormatChange { .. } => (IOERR, Blame::Guest),
            ImageError::Unsupported => (UNSUPP, Blame::Guest),
            ImageError::Storage(_)
            | ImageError::Qcow2(_)
            | ImageError::BackingDenied { .. }
            | ImageError::BackingChain { .. }
            | ImageError::BackingFormat { .. }
            | ImageError::Luks(_)
            | ImageError::Cipher(_)
            | ImageError::NeedKey(_)
            | ImageError::DirectUnsupported { .. }
            | ImageError::DataFileDenied { .. }
            | ImageError::DataFileConsent { .. }
            | ImageError::DataFileUnexpected { .. }
            | ImageError::ForceShareWritable
            | ImageError::Lock(_) => (IOERR, Blame::Host),
        },
    }
}

/// The `VIRTIO_BLK_S_*` status for an error.
pub fn status_of(e: &BlkError) -> u8 {
    classify(e).0
}

/// At most `LIMIT` messages per second per limiter; the rest are counted and summarised.
struct LogLimiter {
    second: AtomicU64,
    count: AtomicU32,
}

impl LogLimiter {
    const LIMIT: u32 = 10;

    const fn new() -> Self {
        Self {
            second: AtomicU64::new(0),
            count: AtomicU32::new(0),
        }
    }

    /// Whether to log now; returns how many messages were suppressed in the last window when a
    /// new window starts.
    fn allow(&self) -> (bool, u32) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let prev = self.second.load(Ordering::Relaxed);
        let mut suppressed = 0;
        if prev != now
            && self
                .second
                .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            suppressed = self
                .count
                .swap(0, Ordering::Relaxed)
                .saturating_sub(Self::LIMIT);
        }
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        (n < Self::LIMIT, suppressed)
    }
}

static GUEST_ERRORS: LogLimiter = LogLimiter::new();
static HOST_ERRORS: LogLimiter = LogLimiter::new();

fn log_error(queue: usize, e: &BlkError) {
    let (_, blame) = classify(e);
    let limiter = match blame {
        Blame::Guest => &GUEST_ERRORS,
        Blame::Host => &HOST_ERRORS,
    };
    let (allowed, suppressed) = limiter.allow();
    if suppressed > 0 {
        log::debug!("{suppressed} similar request errors not logged");
    }
    if !allowed {
        return;
    }
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    match blame {
        Blame::Guest => log::debug!("queue {queue}: {msg}"),
        Blame::Host => log::error!("queue {queue}: {msg}"),
    }
}

/// Device-wide settings the executor needs besides the image.
#[derive(Debug, Clone, Copy)]
pub struct Device<'a> {
    /// Request limits (capacity, seg_max...).
    pub limits: &'a Limits,
    /// GET_ID answer, NUL-padded.
    pub serial: &'a [u8; ID_BYTES],
    /// Write-through cache mode: flush after every write.
    pub writethrough: bool,
}

/// Executes a valid request; returns the number of bytes written into the data buffers.
pub fn execute(
    image: &dyn BlockImage,
    req: &mut Request<'_>,
    dev: &Device<'_>,
) -> Result<u64, ImageError> {
    match req.kind {
        RequestKind::In { offset } => {
            if req.data_len() > 0 {
                image.read(offset, req.data_mut())?;
            }
            Ok(req.data_len())
        }
        RequestKind::Out { offset } => {
            if req.data_len() > 0 {
                image.write(offset, req.data())?;
                if dev.writethrough {
                    image.flush()?;
                }
            }
            Ok(0)
        }
        RequestKind::Flush => {
            image.flush()?;
            Ok(0)
        }
        RequestKind::GetId => {
            let mut done = 0usize;
            for buf in req.data_mut() {
                if done == ID_BYTES {
                    break;
                }
                let n = buf.len().min(ID_BYTES - done);
                buf[..n].copy_from_slice(&dev.serial[done..done + n]);
                done += n;
            }
            Ok(u64::try_from(done).unwrap_or(0))
        }
        RequestKind::Discard { count } => {
            for r in &req.ranges[..count] {
                image.discard(r.offset, r.len)?;
            }
            if dev.writethrough {
                image.flush()?;
            }
            Ok(0)
        }
        RequestKind::WriteZeroes { count } => {
            for r in &req.ranges[..count] {
                image.write_zeroes(r.offset, r.len, r.unmap)?;
            }
            if dev.writethrough {
                image.flush()?;
            }
            Ok(0)
        }
    }
}

/// Handles one descriptor chain end to end: parse, execute, write the status. Returns the
/// used length to report (bytes written into the chain; 0 for a dropped chain).
pub fn handle_chain<M: GuestMemoryBackend>(
    mem: &M,
    descs: impl Iterator<Item = Descriptor>,
    scratch: &mut Scratch,
    image: &dyn BlockImage,
    dev: &Device<'_>,
    queue: usize,
) -> u32 {
    handle_chain_counted(mem, descs, scratch, image, dev, queue, None)
}

/// [`handle_chain`], counting the request in `stats` when given.
pub fn handle_chain_counted<M: GuestMemoryBackend>(
    mem: &M,
    descs: impl Iterator<Item = Descriptor>,
    scratch: &mut Scratch,
    image: &dyn BlockImage,
    dev: &Device<'_>,
    queue: usize,
    stats: Option<&QueueStats>,
) -> u32 {
    let started = stats.map(|s| {
        s.started();
        std::time::Instant::now()
    });
    let (kind, bytes, status, used) = match request::parse(mem, descs, dev.limits, scratch) {
        Parsed::Ok(mut req) => {
            let kind = Kind::from(req.kind);
            let bytes = req.data_len();
            let (status, written) = match execute(image, &mut req, dev) {
                Ok(n) => (STATUS_OK, n),
                Err(e) => {
                    let e = BlkError::Image(e);
                    log_error(queue, &e);
                    (status_of(&e), 0)
                }
            };
            req.status.write(status);
            let used = u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX);
            (kind, bytes, Some(status), used)
        }
        Parsed::Invalid { status, error } => {
            let e = BlkError::Request(error);
            log_error(queue, &e);
            let code = status_of(&e);
            status.write(code);
            (Kind::Invalid, 0, Some(code), 1)
        }
        Parsed::Dropped(error) => {
            log_error(queue, &BlkError::Request(error));
            (Kind::Invalid, 0, None, 0)
        }
    };
    if let (Some(s), Some(t)) = (stats, started) {
        s.finished(kind, bytes, status, t.elapsed());
    }
    used
}
