//! LUKS1: header parse, keyslot unlock, and a read through the unlocked image.

use std::io::IoSliceMut;

use super::storage::SparseTail;
use crate::crypto::luks::header::{DIGEST_LEN, HEADER_LEN, NUM_KEY_SLOTS, SALT_LEN};
use crate::crypto::luks::{self, CreateParams, Iterations, LuksArea};
use crate::crypto::secret::Passphrase;
use crate::image::luks::LuksImage;
use crate::image::BlockImage;
use crate::storage::MemStorage;

/// The passphrase the target tries (the seeds are made with it).
pub const LUKS_FUZZ_PASSPHRASE: &[u8] = b"fuzz";

/// The target caps every PBKDF2 iteration count of the header at this (so one run stays well
/// under a millisecond); seeds use exactly this count so that they still unlock.
pub const LUKS_MAX_ITERATIONS: u32 = 16;

/// The input is the start of a raw LUKS1 file; the rest of a file of this size reads as zeroes.
const AREA_LEN: u64 = 4 << 20;

const OFF_MK_DIGEST: usize = 112;
const OFF_MK_SALT: usize = 132;
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

/// A seed for [`luks1_unlock`]: a LUKS1 area formatted with `params` and
/// [`LUKS_FUZZ_PASSPHRASE`], the keyslot and the master-key digest both at
/// [`LUKS_MAX_ITERATIONS`] (below the formatter's 1000-iteration floor for the digest, so the
/// digest is recomputed), without its trailing zeroes.
pub fn luks1_seed(params: &CreateParams) -> luks::Result<Vec<u8>> {
    let params = CreateParams {
        iterations: Iterations::Fixed(LUKS_MAX_ITERATIONS),
        ..*params
    };
    let len = luks::create::area_len(&params.spec)?;
    let len = usize::try_from(len).map_err(|_| luks::header::HeaderError::Overflow)?;
    let st = MemStorage::new(vec![0; len]);
    let area = LuksArea::whole(&st)?;
    let vol = luks::create::format(&area, &params, &Passphrase::new(LUKS_FUZZ_PASSPHRASE))?;
    let mut b = st.contents();
    let mut digest = [0u8; DIGEST_LEN];
    vol.hash().pbkdf2(
        vol.master_key().expose(),
        &b[OFF_MK_SALT..OFF_MK_SALT + SALT_LEN],
        LUKS_MAX_ITERATIONS,
        &mut digest,
    )?;
    b[OFF_MK_DIGEST..OFF_MK_DIGEST + DIGEST_LEN].copy_from_slice(&digest);
    b[OFF_MK_ITERATIONS..OFF_MK_ITERATIONS + 4].copy_from_slice(&LUKS_MAX_ITERATIONS.to_be_bytes());
    let end = b.iter().rposition(|&x| x != 0).map_or(0, |p| p + 1);
    b.truncate(end);
    Ok(b)
}
