//! LUKS1: header parse, keyslot unlock, and a read through the unlocked image.

use std::io::IoSliceMut;

use super::storage::SparseTail;
use crate::crypto::luks::header::{HEADER_LEN, NUM_KEY_SLOTS};
use crate::crypto::luks::{self, CreateParams, Iterations, LuksArea};
use crate::crypto::secret::Passphrase;
use crate::image::luks::LuksImage;
use crate::image::BlockImage;
use crate::storage::MemStorage;

/// The passphrase the target tries (the seeds are made with it).
pub const LUKS_FUZZ_PASSPHRASE: &[u8] = b"fuzz";

/// The target caps every PBKDF2 iteration count of the header at this (so one run stays in
/// the milliseconds); seeds use exactly this count so that they still unlock.
pub const LUKS_MAX_ITERATIONS: u32 = 1000;

/// The input is the start of a raw LUKS1 file; the rest of a file of this size reads as zeroes.
const AREA_LEN: u64 = 4 << 20;

const OFF_MK_ITERATIONS: usize = 164;
const OFF_SLOTS: usize = 208;
const SLOT_LEN: usize = 48;

fn cap_iterations(b: &mut [u8], at: usize) {
    if let Some(f) = b.get_mut(at..at + 4) {
        let v = u32::from_be_bytes([f[0], f[1], f[2], f[3]]);
        f.copy_from_slice(&v.min(LUKS_MAX_ITERATIONS).to_be_bytes());
    }
}

/// Opens the input as a raw LUKS1 image with [`LUKS_FUZZ_PASSPHRASE`] (every iteration count
/// capped at [`LUKS_MAX_ITERATIONS`]) and reads its first and last sectors.
pub fn luks1_unlock(data: &[u8]) {
    let mut bytes = data.to_vec();
    if bytes.len() >= HEADER_LEN {
        cap_iterations(&mut bytes, OFF_MK_ITERATIONS);
        for s in 0..NUM_KEY_SLOTS {
            cap_iterations(&mut bytes, OFF_SLOTS + s * SLOT_LEN + 4);
        }
    }
    let len = AREA_LEN.max(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
    let st = SparseTail::new(bytes, len);
    let pass = Passphrase::new(LUKS_FUZZ_PASSPHRASE);
    let Ok(img) = LuksImage::open(Box::new(st), true, &pass) else {
        return;
    };
    let cap = img.capacity();
    let mut buf = [0u8; 1024];
    let _ = img.read(0, &mut [IoSliceMut::new(&mut buf)]);
    if cap >= 1024 {
        let _ = img.read(cap - 1024, &mut [IoSliceMut::new(&mut buf)]);
    }
}

/// A seed for [`luks1_unlock`]: a LUKS1 area formatted with `params` (iterations forced to
/// [`LUKS_MAX_ITERATIONS`]) and [`LUKS_FUZZ_PASSPHRASE`], without its trailing zeroes.
pub fn luks1_seed(params: &CreateParams) -> luks::Result<Vec<u8>> {
    let params = CreateParams {
        iterations: Iterations::Fixed(LUKS_MAX_ITERATIONS),
        ..*params
    };
    let len = luks::create::area_len(&params.spec)?;
    let st = MemStorage::new(vec![
        0;
        usize::try_from(len)
            .map_err(|_| luks::header::HeaderError::Overflow)?
    ]);
    let area = LuksArea::whole(&st)?;
    luks::create::format(&area, &params, &Passphrase::new(LUKS_FUZZ_PASSPHRASE))?;
    let mut b = st.contents();
    let end = b.iter().rposition(|&x| x != 0).map_or(0, |p| p + 1);
    b.truncate(end);
    Ok(b)
}
