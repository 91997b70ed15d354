//! The read path: every mapping of a request is resolved under one acquisition of the metadata
//! lock; the data is then read (and decrypted in place in the caller's buffers) without it.

use std::io::IoSliceMut;

use super::compressed;
use super::engine::to_usize;
use super::iov::{fill_zero, total, IovMut};
use super::metadata::{Lookup, Mapping};
use super::types::{GuestOffset, HostOffset};
use super::{Error, Qcow2, Result};

/// `len` bytes of a request at guest `pos`, all mapped alike by `map`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Piece {
    pub pos: u64,
    pub len: u64,
    pub map: Mapping,
}

impl Qcow2 {
    /// The pieces of `offset..end` (contiguous runs merged), resolved under one read lock; if
    /// an L2 table is missing from the cache, under one write lock that loads what is missing.
    pub(super) fn resolve(&self, offset: u64, end: u64) -> Result<Vec<Piece>> {
        {
            let m = self.meta_r();
            if let Lookup::Found(v) =
                self.resolve_with(offset, end, |pos| m.lookup(pos, &self.geo))?
            {
                return Ok(v);
            }
        }
        let mut m = self.meta_w();
        let st = self.storage.as_ref();
        match self.resolve_with(offset, end, |pos| {
            m.lookup_load(st, pos, &self.geo).map(Lookup::Found)
        })? {
            Lookup::Found(v) => Ok(v),
            Lookup::Miss(off) => Err(Error::BadOffset {
                what: "L2 table",
                offset: off,
            }),
        }
    }

    fn resolve_with(
        &self,
        offset: u64,
        end: u64,
        mut lookup: impl FnMut(u64) -> Result<Lookup>,
    ) -> Result<Lookup<Vec<Piece>>> {
        let mut out: Vec<Piece> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let map = match lookup(pos)? {
                Lookup::Found(map) => map,
                Lookup::Miss(off) => return Ok(Lookup::Miss(off)),
            };
            if let Mapping::Compressed { .. } = map {
                // The whole rest of the cluster, whatever the subcluster size.
                let n = (self.geo.cluster_size - self.geo.in_cluster(pos)).min(end - pos);
                out.push(Piece { pos, len: n, map });
                pos += n;
                continue;
            }
            let n = self.unit_left(pos, end);
            if let Some(last) = out.last_mut() {
                if self.continues(last, pos, map) {
                    last.len += n;
                    pos += n;
                    continue;
                }
            }
            out.push(Piece { pos, len: n, map });
            pos += n;
        }
        Ok(Lookup::Found(out))
    }

    /// Whether `map` at `pos` extends `last` (which ends at `pos`) as one run.
    fn continues(&self, last: &Piece, pos: u64, map: Mapping) -> bool {
        match (last.map, map) {
            (Mapping::Data { host: h1, .. }, Mapping::Data { host: h2, .. }) => {
                h2 + self.geo.in_cluster(pos) == h1 + self.geo.in_cluster(last.pos) + last.len
            }
            (Mapping::Unallocated, Mapping::Unallocated) => true,
            (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
            _ => false,
        }
    }

    /// Reads `bufs` in turn from guest `offset`.
    pub fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, len)?;
        let _gate = self.gate_r();
        let pieces = self.resolve(offset, offset + len)?;
        let mut cur = IovMut::new(bufs);
        for p in pieces {
            let mut slices = cur.take(to_usize(p.len)?);
            match p.map {
                Mapping::Data { host, .. } => {
                    let h = HostOffset(host + self.geo.in_cluster(p.pos));
                    self.read_data(h, GuestOffset(p.pos), &mut slices)?
                }
                Mapping::Zero { .. } => fill_zero(&mut slices),
                Mapping::Unallocated => self.read_backing(p.pos, &mut slices)?,
                Mapping::Compressed { offset, len } => {
                    let mut buf = vec![0u8; self.geo.cluster_usize()];
                    self.read_compressed(offset, len, &mut buf)?;
                    let mut i = to_usize(self.geo.in_cluster(p.pos))?;
                    for s in slices.iter_mut() {
                        let k = s.len();
                        s.copy_from_slice(&buf[i..i + k]);
                        i += k;
                    }
                }
            }
        }
        Ok(())
    }

    fn read_data(
        &self,
        host: HostOffset,
        guest: GuestOffset,
        slices: &mut [IoSliceMut<'_>],
    ) -> Result<()> {
        let Some(crypt) = &self.crypt else {
            self.data_st().readv_at(slices, host.0)?;
            return Ok(());
        };
        if slices.iter().all(|s| s.len() % 512 == 0) {
            self.storage.readv_at(slices, host.0)?;
            let mut p = 0u64;
            for s in slices.iter_mut() {
                crypt.decrypt(s, host.plus(p), guest.plus(p))?;
                p += s.len() as u64;
            }
            return Ok(());
        }
        // Unaligned iovecs: bounce through a buffer, one cluster at a time.
        let n = total(slices);
        let mut buf = vec![0u8; n.min(self.geo.cluster_usize())];
        let mut done = 0usize;
        let mut cur = IovMut::new(slices);
        while done < n {
            let chunk = (n - done).min(buf.len());
            let b = &mut buf[..chunk];
            let at = done as u64;
            self.storage.read_at(b, host.0 + at)?;
            crypt.decrypt(b, host.plus(at), guest.plus(at))?;
            let mut bp = 0;
            for s in cur.take(chunk).iter_mut() {
                let k = s.len();
                s.copy_from_slice(&b[bp..bp + k]);
                bp += k;
            }
            done += chunk;
        }
        Ok(())
    }

    pub(super) fn read_backing(&self, pos: u64, slices: &mut [IoSliceMut<'_>]) -> Result<()> {
        let Some(b) = &self.backing else {
            fill_zero(slices);
            return Ok(());
        };
        let bsize = b.size();
        let n = total(slices) as u64;
        if pos >= bsize {
            fill_zero(slices);
            return Ok(());
        }
        if pos + n <= bsize {
            return b.read(pos, slices);
        }
        // Split at the end of the backing image.
        let inside = to_usize(bsize - pos)?;
        let mut cur = IovMut::new(slices);
        {
            let mut a = cur.take(inside);
            b.read(pos, &mut a)?;
        }
        let mut rest = cur.take(to_usize(n)? - inside);
        fill_zero(&mut rest);
        Ok(())
    }

    pub(super) fn read_compressed(&self, offset: u64, len: u64, out: &mut [u8]) -> Result<()> {
        let file_len = self.storage.len()?;
        if offset >= file_len || len > 2 * self.geo.cluster_size + 512 {
            return Err(Error::Compressed { offset });
        }
        let mut inp = vec![0u8; to_usize(len)?];
        self.storage.read_at(&mut inp, offset)?;
        compressed::decompress(self.geo.compression_type, &inp, out, offset)
    }

    /// Fills `buf` with the current content of the guest range at `guest` (within one unit of
    /// mapping `m`, or one cluster).
    pub(super) fn content(&self, m: Mapping, guest: u64, buf: &mut [u8]) -> Result<()> {
        match m {
            Mapping::Unallocated => {
                let mut s = [IoSliceMut::new(buf)];
                self.read_backing(guest, &mut s)
            }
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => {
                let h = host + self.geo.in_cluster(guest);
                self.data_st().read_at(buf, h)?;
                if let Some(c) = &self.crypt {
                    c.decrypt(buf, HostOffset(h), GuestOffset(guest))?;
                }
                Ok(())
            }
            Mapping::Compressed { offset, len } => {
                let mut c = vec![0u8; self.geo.cluster_usize()];
                self.read_compressed(offset, len, &mut c)?;
                let i = to_usize(self.geo.in_cluster(guest))?;
                buf.copy_from_slice(&c[i..i + buf.len()]);
                Ok(())
            }
        }
    }
}
