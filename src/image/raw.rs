//! Raw images: guest offset = file offset.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{check_range, iov_len, BlockImage, ImageError, Result};
use crate::storage::Storage;

/// A raw image file.
pub struct RawImage {
    storage: Box<dyn Storage>,
    /// Changes only on live resize.
    capacity: AtomicU64,
    read_only: bool,
    probed: bool,
}

impl RawImage {
    /// Serves `storage` as a disk; its size is rounded down to whole 512-byte sectors.
    pub fn new(storage: Box<dyn Storage>, read_only: bool) -> Result<Self> {
        let capacity = storage.len()? & !511;
        Ok(Self {
            storage,
            capacity: AtomicU64::new(capacity),
            read_only,
            probed: false,
        })
    }

    /// Marks the image as probed (no `--format` given): as QEMU's raw driver does for
    /// `bs->probed`, writes that would make sector 0 probe as another format are refused, so a
    /// guest cannot turn its disk into a qcow2 or LUKS image that names host files.
    #[must_use]
    pub fn guard_probe(mut self) -> Self {
        self.probed = true;
        self
    }

    /// Refuses a write whose new sector 0 would probe as something other than raw.
    fn check_probe(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if !self.probed || offset >= PROBE_LEN {
            return Ok(());
        }
        // The first PROBE_LEN bytes of the disk after the write: new data over old.
        let mut head = vec![0u8; PROBE_LEN_USIZE];
        self.storage.read_at(&mut head, 0)?;
        let mut pos = usize::try_from(offset).map_err(|_| ImageError::OutOfRange {
            offset,
            len: iov_len(bufs),
            capacity: self.capacity(),
        })?;
        for b in bufs {
            if pos >= PROBE_LEN_USIZE {
                break;
            }
            let n = b.len().min(PROBE_LEN_USIZE - pos);
            head[pos..pos + n].copy_from_slice(&b[..n]);
            pos += n;
        }
        if let Some(format) = foreign_format(&head) {
            return Err(ImageError::ProbedFormatChange { format });
        }
        match super::detect_format(&crate::storage::MemStorage::new(head))? {
            super::Format::Raw => Ok(()),
            f => Err(ImageError::ProbedFormatChange { format: f.name() }),
        }
    }
}

/// Formats we never open but QEMU probes from the first sector: a probed raw image must not
/// turn into one of them either, or a QEMU tool that probes the file later would follow it.
fn foreign_format(head: &[u8]) -> Option<&'static str> {
    const MAGICS: [(&[u8], &str); 9] = [
        (b"QED\0", "qed"),
        (b"KDMV", "vmdk"),
        (b"COWD", "vmdk"),
        (b"# Disk DescriptorFile", "vmdk"),
        (b"vhdxfile", "vhdx"),
        (b"conectix", "vpc"),
        (b"WithoutFreeSpace", "parallels"),
        (b"WithouFreSpacExt", "parallels"),
        (b"Bochs Virtual HD Image", "bochs"),
    ];
    if let Some((_, f)) = MAGICS.iter().find(|(m, _)| head.starts_with(m)) {
        return Some(f);
    }
    // VDI: signature 0xbeda107f (little-endian) at byte 64.
    (head.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe][..])).then_some("vdi")
}

/// Bytes at the start of the disk that decide what the image probes as (QEMU's
/// `BLOCK_PROBE_BUF_SIZE` is 512; our probes look at the magic in the first bytes).
const PROBE_LEN: u64 = 512;
const PROBE_LEN_USIZE: usize = 512;

impl BlockImage for RawImage {
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        check_range(offset, iov_len(bufs), self.capacity())?;
        Ok(self.storage.readv_at(bufs, offset)?)
    }

    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, iov_len(bufs), self.capacity())?;
        self.check_probe(offset, bufs)?;
        Ok(self.storage.writev_at(bufs, offset)?)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        Ok(self.storage.sync()?)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.capacity())?;
        Ok(self.storage.punch_hole(offset, len)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.capacity())?;
        if unmap {
            Ok(self.storage.punch_hole(offset, len)?)
        } else {
            Ok(self.storage.write_zeroes(offset, len)?)
        }
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        if !new_size.is_multiple_of(512) {
            return Err(ImageError::OutOfRange {
                offset: new_size,
                len: 0,
                capacity: self.capacity(),
            });
        }
        let old = self.capacity();
        if new_size < old {
            // Shrink: requests past the new end fail from now on, then the file is cut.
            self.capacity.store(new_size, Ordering::Release);
            self.storage.set_len(new_size)?;
        } else {
            self.storage.set_len(new_size)?;
            self.capacity.store(new_size, Ordering::Release);
        }
        self.storage.sync()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn write_past_capacity_is_out_of_range() {
        let img = RawImage::new(Box::new(MemStorage::new(vec![0; 4096])), false).expect("raw");
        let e = img.write(4096 - 511, &[IoSlice::new(&[1u8; 512])]);
        assert!(matches!(e, Err(ImageError::OutOfRange { .. })));
    }

    #[test]
    fn read_only_refuses_writes() {
        let img = RawImage::new(Box::new(MemStorage::new(vec![0; 4096])), true).expect("raw");
        assert!(matches!(
            img.write(0, &[IoSlice::new(&[1u8; 512])]),
            Err(ImageError::ReadOnly)
        ));
    }

    fn qcow2_magic_sector() -> Vec<u8> {
        let mut s = vec![0u8; 512];
        s[..4].copy_from_slice(b"QFI\xfb");
        s
    }

    #[test]
    fn probed_raw_refuses_a_qcow2_header_at_sector_0() {
        let img = RawImage::new(Box::new(MemStorage::new(vec![0; 8192])), false)
            .expect("raw")
            .guard_probe();
        let e = img.write(0, &[IoSlice::new(&qcow2_magic_sector())]);
        assert!(matches!(
            e,
            Err(ImageError::ProbedFormatChange { format: "qcow2" })
        ));
        // Split over two buffers, the magic still counts.
        let s = qcow2_magic_sector();
        let e = img.write(0, &[IoSlice::new(&s[..2]), IoSlice::new(&s[2..])]);
        assert!(matches!(e, Err(ImageError::ProbedFormatChange { .. })));
        // A LUKS magic too.
        let mut l = vec![0u8; 512];
        l[..6].copy_from_slice(b"LUKS\xba\xbe");
        l[6..8].copy_from_slice(&1u16.to_be_bytes());
        assert!(img.write(0, &[IoSlice::new(&l)]).is_err());
        // Formats QEMU probes that we never open.
        for magic in [&b"QED\0"[..], b"KDMV", b"vhdxfile", b"conectix"] {
            let mut f = vec![0u8; 512];
            f[..magic.len()].copy_from_slice(magic);
            assert!(img.write(0, &[IoSlice::new(&f)]).is_err(), "{magic:?}");
        }
        let mut vdi = vec![0u8; 512];
        vdi[64..68].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert!(img.write(0, &[IoSlice::new(&vdi)]).is_err());
        // An MBR or any other sector 0 is fine, and so are writes elsewhere.
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        img.write(0, &[IoSlice::new(&mbr)]).expect("mbr");
        img.write(512, &[IoSlice::new(&qcow2_magic_sector())])
            .expect("magic in sector 1");
    }

    #[test]
    fn raw_with_explicit_format_takes_any_sector_0() {
        let img = RawImage::new(Box::new(MemStorage::new(vec![0; 8192])), false).expect("raw");
        img.write(0, &[IoSlice::new(&qcow2_magic_sector())])
            .expect("explicit raw");
    }

    #[test]
    fn round_trip() {
        let img = RawImage::new(Box::new(MemStorage::new(vec![0; 8192])), false).expect("raw");
        img.write(512, &[IoSlice::new(&[5u8; 1024])])
            .expect("write");
        img.write_zeroes(1024, 512, false).expect("zero");
        let mut out = vec![0u8; 2048];
        img.read(0, &mut [IoSliceMut::new(&mut out)]).expect("read");
        assert_eq!(&out[..512], &[0u8; 512][..]);
        assert_eq!(&out[512..1024], &[5u8; 512][..]);
        assert_eq!(&out[1024..1536], &[0u8; 512][..]);
    }
}
