//! Cursors over the caller's iovecs: requests are split at cluster-run boundaries into
//! sub-slices of the caller's own buffers (no copies).

use std::io::{IoSlice, IoSliceMut};

/// A cursor over the caller's read buffers, handing out sub-slices in order.
pub struct IovMut<'a, 'b> {
    bufs: &'a mut [IoSliceMut<'b>],
    idx: usize,
    off: usize,
}

impl<'a, 'b> IovMut<'a, 'b> {
    pub fn new(bufs: &'a mut [IoSliceMut<'b>]) -> Self {
        Self {
            bufs,
            idx: 0,
            off: 0,
        }
    }

    /// The next `len` bytes as slices.
    pub fn take(&mut self, len: usize) -> Vec<IoSliceMut<'_>> {
        let (start_idx, start_off) = (self.idx, self.off);
        let mut left = len;
        while left > 0 && self.idx < self.bufs.len() {
            let n = (self.bufs[self.idx].len() - self.off).min(left);
            left -= n;
            self.off += n;
            if self.off == self.bufs[self.idx].len() {
                self.idx += 1;
                self.off = 0;
            }
        }
        let mut out = Vec::new();
        let mut left = len;
        let mut off = start_off;
        for b in self.bufs[start_idx..].iter_mut() {
            if left == 0 {
                break;
            }
            let n = (b.len() - off).min(left);
            if n > 0 {
                out.push(IoSliceMut::new(&mut b[off..off + n]));
            }
            left -= n;
            off = 0;
        }
        out
    }
}

/// A cursor over the caller's write buffers.
pub struct IovRef<'a, 'b> {
    bufs: &'a [IoSlice<'b>],
    idx: usize,
    off: usize,
}

impl<'a, 'b> IovRef<'a, 'b> {
    pub fn new(bufs: &'a [IoSlice<'b>]) -> Self {
        Self {
            bufs,
            idx: 0,
            off: 0,
        }
    }

    pub fn take(&mut self, len: usize) -> Vec<IoSlice<'a>> {
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 && self.idx < self.bufs.len() {
            let b: &'a [u8] = &self.bufs[self.idx];
            let n = (b.len() - self.off).min(left);
            if n > 0 {
                out.push(IoSlice::new(&b[self.off..self.off + n]));
            }
            left -= n;
            self.off += n;
            if self.off == b.len() {
                self.idx += 1;
                self.off = 0;
            }
        }
        out
    }
}

pub fn copy_from(slices: &[IoSlice<'_>], dst: &mut [u8]) {
    let mut p = 0;
    for s in slices {
        dst[p..p + s.len()].copy_from_slice(s);
        p += s.len();
    }
}

pub fn fill_zero(slices: &mut [IoSliceMut<'_>]) {
    for s in slices.iter_mut() {
        s.fill(0);
    }
}

pub fn total(slices: &[IoSliceMut<'_>]) -> usize {
    slices.iter().map(|s| s.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_splits_across_and_skips_empty_buffers() {
        let mut a = [1u8; 3];
        let mut e: [u8; 0] = [];
        let mut b = [2u8; 5];
        let mut bufs = [
            IoSliceMut::new(&mut a),
            IoSliceMut::new(&mut e),
            IoSliceMut::new(&mut b),
        ];
        let lens = |v: &[IoSliceMut<'_>]| v.iter().map(|s| s.len()).collect::<Vec<_>>();
        {
            let mut cur = IovMut::new(&mut bufs);
            assert_eq!(lens(&cur.take(2)), vec![2]);
            let mut mid = cur.take(4);
            assert_eq!(lens(&mid), vec![1, 3]);
            fill_zero(&mut mid);
            assert_eq!(lens(&cur.take(10)), vec![2]);
        }
        assert_eq!(a, [1, 1, 0]);
        assert_eq!(b, [0, 0, 0, 2, 2]);
    }

    #[test]
    fn ref_cursor_and_copy_from_keep_order() {
        let a = [1u8, 2, 3];
        let b = [4u8, 5];
        let bufs = [IoSlice::new(&a), IoSlice::new(&[]), IoSlice::new(&b)];
        let mut cur = IovRef::new(&bufs);
        let first = cur.take(4);
        let mut out = [0u8; 4];
        copy_from(&first, &mut out);
        assert_eq!(out, [1, 2, 3, 4]);
        let rest = cur.take(1);
        assert_eq!(&*rest[0], &[5]);
        assert!(cur.take(1).is_empty());
    }
}
