//! Tests of raw LUKS images over in-memory storage.

use super::*;
use crate::crypto::luks::Iterations;
use crate::crypto::secret::Passphrase;
use crate::storage::MemStorage;
use std::sync::Arc;

/// A MemStorage shared between the image and the test, to inspect the raw bytes.
struct Shared(Arc<MemStorage>);

impl Storage for Shared {
    fn len(&self) -> crate::storage::Result<u64> {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::storage::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> crate::storage::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> crate::storage::Result<()> {
        self.0.readv_at(bufs, offset)
    }
    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> crate::storage::Result<()> {
        self.0.writev_at(bufs, offset)
    }
    fn set_len(&self, len: u64) -> crate::storage::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> crate::storage::Result<()> {
        self.0.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> crate::storage::Result<()> {
        self.0.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> crate::storage::Result<()> {
        self.0.write_zeroes(offset, len)
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn params(cipher: &str) -> CreateParams {
    CreateParams {
        spec: luks::create::parse_cipher(cipher).expect("cipher"),
        iterations: Iterations::Fixed(1000),
        ..CreateParams::default()
    }
}

/// Formats an in-memory LUKS area followed by `size` bytes of payload.
fn mem_image(cipher: &str, size: u64) -> (Arc<MemStorage>, LuksImage) {
    let p = params(cipher);
    let area = luks::create::area_len(&p.spec).expect("len");
    let len = usize::try_from(area + size).expect("fits");
    let mem = Arc::new(MemStorage::new(vec![0u8; len]));
    let pass = Passphrase::new(b"pw");
    {
        let a = LuksArea::whole(mem.as_ref()).expect("area");
        luks::create::format(&a, &p, &pass).expect("format");
    }
    let img = LuksImage::open(Box::new(Shared(mem.clone())), false, &pass).expect("open again");
    (mem, img)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 31 + usize::from(seed)) % 251).expect("small"))
        .collect()
}

#[test]
fn write_then_read_back_through_split_iovecs() {
    for cipher in ["aes-256-xts-plain64", "aes-192-cbc-plain", "aes-128-ecb"] {
        let (_, img) = mem_image(cipher, 64 * 1024);
        let data = pattern(16 * 1024, 7);
        // Odd split points: sectors straddle the buffers.
        let (a, rest) = data.split_at(100);
        let (b, rest) = rest.split_at(1000);
        let (c, d) = rest.split_at(7);
        img.write(
            4096,
            &[
                IoSlice::new(a),
                IoSlice::new(b),
                IoSlice::new(c),
                IoSlice::new(d),
            ],
        )
        .expect("write");
        let mut whole = vec![0u8; data.len()];
        img.read(4096, &mut [IoSliceMut::new(&mut whole)])
            .expect("read");
        assert_eq!(whole, data, "{cipher}");
        let mut x = vec![0u8; 1];
        let mut y = vec![0u8; 513];
        let mut z = vec![0u8; data.len() - 514];
        img.read(
            4096,
            &mut [
                IoSliceMut::new(&mut x),
                IoSliceMut::new(&mut []),
                IoSliceMut::new(&mut y),
                IoSliceMut::new(&mut z),
            ],
        )
        .expect("read split");
        let mut joined = x.clone();
        joined.extend_from_slice(&y);
        joined.extend_from_slice(&z);
        assert_eq!(joined, data, "{cipher}");
    }
}

#[test]
fn sectors_spread_over_many_tiny_iovecs_decrypt_correctly() {
    let (_, img) = mem_image("aes-128-xts-plain", 16 * 1024);
    let data = pattern(4096, 5);
    img.write(0, &[IoSlice::new(&data)]).expect("write");
    // Buffers of 1..=7 bytes, repeating: every sector straddles dozens of them.
    let mut sizes = Vec::new();
    let mut total = 0;
    while total < data.len() {
        let n = (sizes.len() % 7 + 1).min(data.len() - total);
        sizes.push(n);
        total += n;
    }
    let mut storage: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
    let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    img.read(0, &mut bufs).expect("read");
    drop(bufs);
    assert_eq!(storage.concat(), data);
    // And writes gathered from tiny buffers.
    let rev: Vec<u8> = data.iter().rev().copied().collect();
    let pieces: Vec<IoSlice<'_>> = rev.chunks(3).map(IoSlice::new).collect();
    img.write(0, &pieces).expect("write");
    let mut back = vec![0u8; rev.len()];
    img.read(0, &mut [IoSliceMut::new(&mut back)])
        .expect("read");
    assert_eq!(back, rev);
}

#[test]
fn large_writes_are_chunked_and_unaligned_requests_work() {
    let (_, img) = mem_image("aes-256-xts-plain64", 3 * BOUNCE_MAX as u64);
    let data = pattern(2 * BOUNCE_MAX + 4096, 3);
    img.write(512, &[IoSlice::new(&data)]).expect("big write");
    let mut back = vec![0u8; data.len()];
    img.read(512, &mut [IoSliceMut::new(&mut back)])
        .expect("read");
    assert_eq!(back, data);
    // Unaligned write and read.
    let small = pattern(777, 9);
    img.write(1000, &[IoSlice::new(&small)])
        .expect("unaligned write");
    let mut got = vec![0u8; 777];
    img.read(1000, &mut [IoSliceMut::new(&mut got)])
        .expect("unaligned read");
    assert_eq!(got, small);
    let mut around = vec![0u8; 2048];
    img.read(512, &mut [IoSliceMut::new(&mut around)])
        .expect("read");
    assert_eq!(&around[..488], &data[..488]);
    assert_eq!(&around[488..488 + 777], &small[..]);
    assert_eq!(&around[1265..], &data[1265..2048]);
}

#[test]
fn plaintext_never_reaches_the_storage() {
    let (mem, img) = mem_image("aes-128-cbc-essiv:sha256", 256 * 1024);
    let marker = b"PLAINTEXT-MARKER";
    let data: Vec<u8> = marker.iter().copied().cycle().take(128 * 1024).collect();
    img.write(0, &[IoSlice::new(&data)]).expect("write");
    img.write(130 * 1024 + 3, &[IoSlice::new(&data[..5000])])
        .expect("unaligned write");
    img.write_zeroes(200 * 1024, 4096, true).expect("zeroes");
    let raw = mem.contents();
    assert!(!raw.windows(marker.len()).any(|w| w == marker));
    let mut z = vec![1u8; 4096];
    img.read(200 * 1024, &mut [IoSliceMut::new(&mut z)])
        .expect("read");
    assert!(z.iter().all(|&b| b == 0));
}

#[test]
fn wrong_passphrase_is_refused_and_writes_nothing() {
    let (mem, img) = mem_image("aes-256-xts-plain64", 4096);
    drop(img);
    let before = mem.contents();
    let e = LuksImage::open(
        Box::new(Shared(mem.clone())),
        false,
        &Passphrase::new(b"nope"),
    )
    .err()
    .expect("must fail");
    assert!(chain(&e).contains("no key slot matches"), "{}", chain(&e));
    assert_eq!(mem.contents(), before);
}
