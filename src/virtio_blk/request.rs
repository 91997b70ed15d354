//! Parsing a virtio-blk descriptor chain, once, at the boundary.
//!
//! A chain is `header (device-readable, 16 bytes) | data... | status (device-writable, 1 byte)`.
//! With `VIRTIO_F_VERSION_1` the driver may lay these out over descriptors as it likes
//! (virtio 1.2 §2.7.4), so, like QEMU, we collect the device-readable bytes and the
//! device-writable bytes as two iovec lists: the header is the first 16 readable bytes and the
//! status is the last byte of the chain, which must therefore sit in a device-writable descriptor
//! of at least one byte. Everything a guest controls is checked here:
//!
//! - every descriptor must lie in guest memory (resolved to host pointers once, here);
//! - device-readable descriptors must precede device-writable ones;
//! - the data direction must suit the request type;
//! - the number of data segments is capped by `seg_max`, the total length by `u32`;
//! - sector ranges are computed with `checked_mul`/`checked_add` and compared with the capacity;
//! - discard / write-zeroes segments are copied out of guest memory and validated.
//!
//! A chain without a usable status byte is [`Parsed::Dropped`]: the device must not write to a
//! device-readable descriptor, so it is completed with nothing written.

use std::marker::PhantomData;

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestMemoryBackend};

use super::{SECTOR_SHIFT, SECTOR_SIZE};

/// Length of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: usize = 16;
/// Length of one `struct virtio_blk_discard_write_zeroes`.
pub const DWZ_SEGMENT_LEN: usize = 16;
/// Upper bound on discard / write-zeroes segments per request (what we advertise at most).
pub const MAX_DWZ_SEGMENTS: usize = 16;

/// What the device accepts; fixed for the life of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size in bytes (512 or 4096): IN/OUT offsets and lengths must be multiples.
    pub block_size: u32,
    /// Maximum number of data segments (iovecs) in one request.
    pub seg_max: u32,
    /// Whether DISCARD is offered (else it is unsupported).
    pub discard: bool,
    /// Whether WRITE_ZEROES is offered (else it is unsupported).
    pub write_zeroes: bool,
    /// Maximum sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// Maximum discard segments in one request.
    pub max_discard_seg: u32,
    /// Maximum sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Maximum write-zeroes segments in one request.
    pub max_write_zeroes_seg: u32,
}

/// Why a chain was refused. Each maps to exactly one virtio status in
/// [`super::exec::status_of`] (or to dropping the chain, for [`RequestError::NoStatus`]).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    #[error("the chain does not end in a device-writable status byte")]
    NoStatus,
    #[error("descriptor at guest address {addr:#x} (+{len}) is outside guest memory")]
    BadAddress { addr: u64, len: u32 },
    #[error("device-readable descriptor after a device-writable one")]
    DescriptorOrder,
    #[error("request header is {len} bytes, shorter than 16")]
    HeaderTooShort { len: u64 },
    #[error("more than {max} data segments")]
    TooManySegments { max: u32 },
    #[error("total data length exceeds 4 GiB")]
    DataTooLong,
    #[error("data buffers of request type {kind} point the wrong way")]
    WrongDirection { kind: u32 },
    #[error("sector {sector} + {len} bytes is not aligned to the {block_size}-byte block size")]
    Unaligned {
        sector: u64,
        len: u64,
        block_size: u32,
    },
    #[error("sector {sector} + {sectors} sectors is past the capacity of {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("sector {sector} overflows a byte offset")]
    SectorOverflow { sector: u64 },
    #[error("discard/write-zeroes payload of {len} bytes is not a whole number of segments")]
    BadSegmentPayload { len: u64 },
    #[error("{count} discard/write-zeroes segments, more than {max}")]
    TooManyDwzSegments { count: u64, max: u32 },
    #[error("discard/write-zeroes segment of {sectors} sectors, more than {max}")]
    DwzSegmentTooLarge { sectors: u32, max: u32 },
    #[error("unknown or forbidden flags {flags:#x} in a discard/write-zeroes segment")]
    BadDwzFlags { flags: u32 },
    #[error("request type {kind} is not supported")]
    Unsupported { kind: u32 },
}

/// One validated discard / write-zeroes range, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ByteRange {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// For write-zeroes: the driver allows deallocation.
    pub unmap: bool,
}

/// The validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes at byte `offset` into the writable data buffers.
    In { offset: u64 },
    /// Write the readable data buffers at byte `offset`.
    Out { offset: u64 },
    /// Make completed writes durable.
    Flush,
    /// Return the serial number in the writable data buffers.
    GetId,
    /// Discard `count` ranges (held in the request).
    Discard { count: usize },
    /// Write zeroes over `count` ranges (held in the request).
    WriteZeroes { count: usize },
}

/// Reusable per-worker storage for the iovecs of one request, so that parsing allocates nothing
/// per request once warmed up.
#[derive(Default)]
pub struct Scratch {
    readable: Vec<libc::iovec>,
    writable: Vec<libc::iovec>,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch")
            .field("readable", &self.readable.len())
            .field("writable", &self.writable.len())
            .finish()
    }
}

// SAFETY: the raw pointers in the iovecs are only dereferenced while a `Request` borrowing the
// scratch (and, through its lifetime, the guest memory it was parsed from) is alive; between
// requests they are stale values that are never read. Moving the vectors to another thread is
// therefore harmless.
unsafe impl Send for Scratch {}

impl Scratch {
    /// Scratch sized for `seg_max` segments; it grows only if a chain needs more (it cannot
    /// grow past `seg_max + 2` entries per list: parsing refuses longer chains).
    pub fn with_capacity(seg_max: u32) -> Self {
        let n = usize::try_from(seg_max)
            .unwrap_or(0)
            .saturating_add(2)
            .min(4096);
        Self {
            readable: Vec::with_capacity(n),
            writable: Vec::with_capacity(n),
        }
    }
}

/// The status byte of a chain, in guest memory.
#[derive(Debug)]
pub struct StatusByte<'m> {
    ptr: *mut u8,
    _mem: PhantomData<&'m ()>,
}

impl StatusByte<'_> {
    /// Writes the status.
    pub fn write(self, status: u8) {
        // SAFETY: `ptr` was resolved from a device-writable descriptor of at least one byte that
        // lies in guest memory mapped for the lifetime 'm, which this value cannot outlive.
        // Guest memory is shared with the guest, hence the volatile write.
        unsafe { self.ptr.write_volatile(status) }
    }
}

/// A parsed, validated request; borrows the guest memory it points into.
#[derive(Debug)]
pub struct Request<'m> {
    /// What to do.
    pub kind: RequestKind,
    /// Discard / write-zeroes ranges (the first `count` entries are valid).
    pub ranges: [ByteRange; MAX_DWZ_SEGMENTS],
    data: &'m mut [libc::iovec],
    data_len: u64,
    /// Where to write the status.
    pub status: StatusByte<'m>,
}

impl<'m> Request<'m> {
    /// Total length of the data buffers in bytes.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// The device-writable data buffers (IN, GET_ID) as `IoSliceMut`s over guest memory.
    pub fn data_mut(&mut self) -> &mut [std::io::IoSliceMut<'m>] {
        let ptr = self.data.as_mut_ptr().cast::<std::io::IoSliceMut<'m>>();
        // SAFETY: `IoSliceMut` is guaranteed ABI-compatible with `struct iovec` on Unix. Each
        // iovec describes memory of a descriptor in guest memory that stays mapped for 'm
        // (resolved by `parse`); for IN/GET_ID these are the device-writable descriptors.
        unsafe { std::slice::from_raw_parts_mut(ptr, self.data.len()) }
    }

    /// The device-readable data buffers (OUT) as `IoSlice`s over guest memory.
    pub fn data(&self) -> &[std::io::IoSlice<'m>] {
        let ptr = self.data.as_ptr().cast::<std::io::IoSlice<'m>>();
        // SAFETY: `IoSlice` is guaranteed ABI-compatible with `struct iovec` on Unix; the iovecs
        // describe mapped guest memory valid for 'm (see `data_mut`).
        unsafe { std::slice::from_raw_parts(ptr, self.data.len()) }
    }
}

/// Outcome of [`parse`].
// Returned by value once per request: the inline discard ranges avoid a per-request allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed<'m> {
    /// A valid request.
    Ok(Request<'m>),
    /// An invalid request that can be answered through its status byte.
    Invalid {
        status: StatusByte<'m>,
        error: RequestError,
    },
    /// No usable status byte: complete the chain with nothing written.
    Dropped(RequestError),
}

/// The status byte of a chain whose last descriptor is `desc`, if it is usable.
fn status_byte<'m, M: GuestMemoryBackend>(mem: &'m M, desc: &Descriptor) -> Option<StatusByte<'m>> {
    if !desc.is_write_only() || desc.len() == 0 {
        return None;
    }
    let addr = desc.addr().checked_add(u64::from(desc.len()) - 1)?;
    let slice = mem.get_slice(addr, 1).ok()?;
    Some(StatusByte {
        ptr: slice.ptr_guard_mut().as_ptr(),
        _mem: PhantomData,
    })
}

/// Request type codes we know.
fn type_name(kind: u32) -> &'static str {
    match kind {
        VIRTIO_BLK_T_IN => "IN",
        VIRTIO_BLK_T_OUT => "OUT",
        VIRTIO_BLK_T_FLUSH => "FLUSH",
        VIRTIO_BLK_T_GET_ID => "GET_ID",
        VIRTIO_BLK_T_DISCARD => "DISCARD",
        VIRTIO_BLK_T_WRITE_ZEROES => "WRITE_ZEROES",
        _ => "unknown",
    }
}

fn iov_total(iovs: &[libc::iovec]) -> Option<u64> {
    iovs.iter().try_fold(0u64, |acc, v| {
        acc.checked_add(u64::try_from(v.iov_len).ok()?)
    })
}

/// Copies bytes from the start of `iovs` into `out`; returns how many were copied.
fn copy_from_iovecs(iovs: &[libc::iovec], out: &mut [u8]) -> usize {
    let mut done = 0;
    for v in iovs {
        if done == out.len() {
            break;
        }
        let n = v.iov_len.min(out.len() - done);
        // SAFETY: each iovec was resolved from a descriptor lying in mapped guest memory (see
        // `resolve`), valid for reads of `iov_len` bytes while the caller holds the memory; `out`
        // is a distinct Rust buffer with room for `n` more bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                v.iov_base.cast::<u8>().cast_const(),
                out[done..].as_mut_ptr(),
                n,
            );
        }
        done += n;
    }
    done
}

/// Drops the first `n` bytes of `iovs` (which must hold at least `n`); returns the index of the
/// first remaining iovec, whose base/length have been adjusted in place.
fn skip_front(iovs: &mut [libc::iovec], mut n: usize) -> usize {
    let mut i = 0;
    while n > 0 && i < iovs.len() {
        let v = &mut iovs[i];
        if v.iov_len <= n {
            n -= v.iov_len;
            i += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same mapped descriptor.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    // Skip empty iovecs left at the front.
    while i < iovs.len() && iovs[i].iov_len == 0 {
        i += 1;
    }
    i
}

/// Resolves one descriptor into host iovecs appended to `out`, splitting it where it crosses
/// guest memory regions. Refuses descriptors outside guest memory and lists longer than `cap`.
fn resolve<M: GuestMemoryBackend>(
    mem: &M,
    desc: &Descriptor,
    out: &mut Vec<libc::iovec>,
    cap: usize,
) -> Result<(), RequestError> {
    let bad = RequestError::BadAddress {
        addr: desc.addr().0,
        len: desc.len(),
    };
    let len = usize::try_from(desc.len()).map_err(|_| bad)?;
    if len == 0 {
        return Ok(());
    }
    for slice in mem.get_slices(desc.addr(), len) {
        let slice = slice.map_err(|_| bad)?;
        if out.len() >= cap {
            return Err(RequestError::TooManySegments {
                max: u32::try_from(cap.saturating_sub(2)).unwrap_or(u32::MAX),
            });
        }
        out.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
    }
    Ok(())
}

/// Parses a descriptor chain. `descs` yields the chain's descriptors in order (indirect tables
/// already followed, as `virtio_queue::DescriptorChain` does); `mem` is the guest memory they
/// point into and must stay mapped while the result lives.
pub fn parse<'m, M: GuestMemoryBackend>(
    mem: &'m M,
    descs: impl Iterator<Item = Descriptor>,
    limits: &Limits,
    scratch: &'m mut Scratch,
) -> Parsed<'m> {
    scratch.readable.clear();
    scratch.writable.clear();
    // Each list holds at most seg_max data segments plus the header / status pieces.
    let cap = usize::try_from(limits.seg_max)
        .unwrap_or(usize::MAX)
        .saturating_add(2);

    // Walk the whole chain (its length is bounded by the queue or indirect table size), so that
    // the status byte is found even when something earlier is wrong.
    let mut first_error: Option<RequestError> = None;
    let mut last: Option<Descriptor> = None;
    let mut seen_writable = false;
    for desc in descs {
        last = Some(desc);
        if first_error.is_some() {
            continue;
        }
        let r = if desc.is_write_only() {
            seen_writable = true;
            resolve(mem, &desc, &mut scratch.writable, cap)
        } else if seen_writable {
            Err(RequestError::DescriptorOrder)
        } else {
            resolve(mem, &desc, &mut scratch.readable, cap)
        };
        if let Err(e) = r {
            first_error = Some(e);
        }
    }

    // Split off the status byte: the last byte of the last descriptor, which must be
    // device-writable, at least one byte long and in guest memory.
    let Some(status) = last.and_then(|d| status_byte(mem, &d)) else {
        return Parsed::Dropped(RequestError::NoStatus);
    };
    if let Some(error) = first_error {
        return Parsed::Invalid { status, error };
    }
    // No error: the last writable iovec ends with the status byte; trim it off the data.
    if let Some(v) = scratch.writable.last_mut() {
        v.iov_len = v.iov_len.saturating_sub(1);
        if v.iov_len == 0 {
            scratch.writable.pop();
        }
    }

    match parse_body(limits, scratch) {
        Ok((kind, ranges, data_readable, start, data_len)) => {
            let data: &'m mut [libc::iovec] = if data_readable {
                &mut scratch.readable[start..]
            } else {
                &mut scratch.writable[start..]
            };
            Parsed::Ok(Request {
                kind,
                ranges,
                data,
                data_len,
                status,
            })
        }
        Err(error) => Parsed::Invalid { status, error },
    }
}

type Body = (RequestKind, [ByteRange; MAX_DWZ_SEGMENTS], bool, usize, u64);

/// Interprets the header and data once the chain's shape is known.
fn parse_body(limits: &Limits, scratch: &mut Scratch) -> Result<Body, RequestError> {
    let readable_len = iov_total(&scratch.readable).ok_or(RequestError::DataTooLong)?;
    let mut header = [0u8; HEADER_LEN];
    if readable_len < HEADER_LEN as u64 {
        return Err(RequestError::HeaderTooShort { len: readable_len });
    }
    copy_from_iovecs(&scratch.readable, &mut header);
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let rstart = skip_front(&mut scratch.readable, HEADER_LEN);
    let readable = &scratch.readable[rstart..];
    let writable = &scratch.writable[..];
    let rlen = readable_len - HEADER_LEN as u64;
    let wlen = iov_total(writable).ok_or(RequestError::DataTooLong)?;
    let seg_max = usize::try_from(limits.seg_max).unwrap_or(usize::MAX);
    let mut ranges = [ByteRange::default(); MAX_DWZ_SEGMENTS];

    let wrong_direction = RequestError::WrongDirection { kind };
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let (len, segs, readable_data) = if kind == VIRTIO_BLK_T_IN {
                if rlen != 0 {
                    return Err(wrong_direction);
                }
                (wlen, writable.len(), false)
            } else {
                if wlen != 0 {
                    return Err(wrong_direction);
                }
                (rlen, readable.len(), true)
            };
            if segs > seg_max {
                return Err(RequestError::TooManySegments {
                    max: limits.seg_max,
                });
            }
            if len > u64::from(u32::MAX) {
                return Err(RequestError::DataTooLong);
            }
            let offset = check_sectors(sector, len, limits)?;
            let kind = if kind == VIRTIO_BLK_T_IN {
                RequestKind::In { offset }
            } else {
                RequestKind::Out { offset }
            };
            let start = if readable_data { rstart } else { 0 };
            Ok((kind, ranges, readable_data, start, len))
        }
        VIRTIO_BLK_T_FLUSH => Ok((RequestKind::Flush, ranges, false, writable.len(), 0)),
        VIRTIO_BLK_T_GET_ID => {
            if rlen != 0 {
                return Err(wrong_direction);
            }
            if writable.len() > seg_max {
                return Err(RequestError::TooManySegments {
                    max: limits.seg_max,
                });
            }
            Ok((RequestKind::GetId, ranges, false, 0, wlen))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            let (offered, max_seg, max_sectors) = if discard {
                (
                    limits.discard,
                    limits.max_discard_seg,
                    limits.max_discard_sectors,
                )
            } else {
                (
                    limits.write_zeroes,
                    limits.max_write_zeroes_seg,
                    limits.max_write_zeroes_sectors,
                )
            };
            if !offered {
                return Err(RequestError::Unsupported { kind });
            }
            if wlen != 0 {
                return Err(wrong_direction);
            }
            if !rlen.is_multiple_of(DWZ_SEGMENT_LEN as u64) || rlen == 0 {
                return Err(RequestError::BadSegmentPayload { len: rlen });
            }
            let count = rlen / DWZ_SEGMENT_LEN as u64;
            let max = u64::from(max_seg).min(MAX_DWZ_SEGMENTS as u64);
            if count > max {
                return Err(RequestError::TooManyDwzSegments {
                    count,
                    max: u32::try_from(max).unwrap_or(u32::MAX),
                });
            }
            let count = usize::try_from(count).map_err(|_| RequestError::DataTooLong)?;
            let mut payload = [0u8; DWZ_SEGMENT_LEN * MAX_DWZ_SEGMENTS];
            let payload = &mut payload[..count * DWZ_SEGMENT_LEN];
            copy_from_iovecs(readable, payload);
            for (i, seg) in payload.chunks_exact(DWZ_SEGMENT_LEN).enumerate() {
                let s_sector = u64::from_le_bytes([
                    seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
                ]);
                let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                let allowed = if discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(RequestError::BadDwzFlags { flags });
                }
                if num > max_sectors {
                    return Err(RequestError::DwzSegmentTooLarge {
                        sectors: num,
                        max: max_sectors,
                    });
                }
                let len = u64::from(num) << SECTOR_SHIFT; // num < 2^32: cannot overflow
                let offset = check_range(s_sector, u64::from(num), limits)?;
                ranges[i] = ByteRange {
                    offset,
                    len,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                };
            }
            let kind = if discard {
                RequestKind::Discard { count }
            } else {
                RequestKind::WriteZeroes { count }
            };
            Ok((kind, ranges, true, rstart, rlen))
        }
        _ => Err(RequestError::Unsupported { kind }),
    }
}

/// Checks an IN/OUT range: alignment to the logical block size and capacity. Returns the byte
/// offset.
fn check_sectors(sector: u64, len: u64, limits: &Limits) -> Result<u64, RequestError> {
    let bs = u64::from(limits.block_size.max(512));
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::SectorOverflow { sector })?;
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(RequestError::Unaligned {
            sector,
            len,
            block_size: limits.block_size,
        });
    }
    check_range(sector, len / SECTOR_SIZE, limits)
}

/// Checks that `sectors` sectors from `sector` lie within the disk; returns the byte offset.
fn check_range(sector: u64, sectors: u64, limits: &Limits) -> Result<u64, RequestError> {
    let out_of_range = RequestError::OutOfRange {
        sector,
        sectors,
        capacity: limits.capacity_sectors,
    };
    let end = sector.checked_add(sectors).ok_or(out_of_range)?;
    if end > limits.capacity_sectors {
        return Err(out_of_range);
    }
    sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::SectorOverflow { sector })
}

/// A short name for a request type code, for logs.
pub fn kind_name(kind: u32) -> &'static str {
    type_name(kind)
}

#[cfg(test)]
mod tests;
