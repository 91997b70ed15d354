//! Tests of LUKS header parsing and validation.

use super::*;

/// A header as QEMU lays one out for a 64-byte key (aes-256-xts-plain64).
pub(crate) fn sample() -> LuksHeader {
    let ks = split_key_sectors(64, STRIPES);
    LuksHeader {
        magic: MAGIC,
        version: 1,
        cipher_name: str_field("aes").expect("f"),
        cipher_mode: str_field("xts-plain64").expect("f"),
        hash_spec: str_field("sha256").expect("f"),
        payload_offset: u32::try_from(HEADER_SECTORS + 8 * ks).expect("fits"),
        key_bytes: 64,
        mk_digest: [1; 20],
        mk_salt: [2; 32],
        mk_iterations: 1000,
        uuid: [b'u'; 40],
        slots: std::array::from_fn(|i| KeySlot {
            state: if i == 0 { SLOT_ENABLED } else { SLOT_DISABLED },
            iterations: if i == 0 { 1000 } else { 0 },
            salt: [3; 32],
            key_offset: u32::try_from(HEADER_SECTORS + i as u64 * ks).expect("fits"),
            stripes: STRIPES,
        }),
    }
}

#[test]
fn qemu_layout_for_a_64_byte_key_puts_payload_at_4040() {
    let h = sample();
    assert_eq!(split_key_sectors(64, STRIPES), 504);
    assert_eq!(split_key_sectors(32, STRIPES), 256);
    assert_eq!(h.payload_offset, 4040);
    assert_eq!(h.slots[1].key_offset, 512);
    assert_eq!(h.validate(), Ok(()));
}

#[test]
fn encode_decode_round_trips_every_byte() {
    let mut raw = sample().encode();
    // Garbage after the NUL of a string field survives a rewrite.
    raw[8 + 10] = 0x77;
    let h = LuksHeader::decode(&raw);
    assert_eq!(h.encode(), raw);
    assert_eq!(h.cipher_name().expect("name"), "aes");
}

fn err_of(f: impl FnOnce(&mut LuksHeader)) -> HeaderError {
    let mut h = sample();
    f(&mut h);
    LuksHeader::parse(&h.encode()).expect_err("must be refused")
}

#[test]
fn malformed_headers_are_refused_with_the_reason() {
    assert_eq!(err_of(|h| h.magic[0] = b'X'), HeaderError::BadMagic);
    assert_eq!(
        err_of(|h| h.version = 2),
        HeaderError::UnsupportedVersion(2)
    );
    assert_eq!(
        err_of(|h| h.cipher_mode = [b'x'; 32]),
        HeaderError::NotNulTerminated {
            field: "cipher mode"
        }
    );
    assert_eq!(
        err_of(|h| h.slots[3].stripes = 3999),
        HeaderError::BadStripes {
            slot: 3,
            stripes: 3999
        }
    );
    assert_eq!(
        err_of(|h| h.slots[0].iterations = 0),
        HeaderError::ZeroSlotIterations { slot: 0 }
    );
    assert_eq!(
        err_of(|h| h.mk_iterations = 0),
        HeaderError::ZeroMasterKeyIterations
    );
    assert_eq!(
        err_of(|h| h.slots[7].key_offset = 4000),
        HeaderError::SlotOverlapsPayload { slot: 7 }
    );
    assert_eq!(
        err_of(|h| h.slots[0].key_offset = 4),
        HeaderError::SlotOverlapsHeader { slot: 0 }
    );
    assert_eq!(
        err_of(|h| h.slots[2].key_offset = 600),
        HeaderError::SlotsOverlap { a: 1, b: 2 }
    );
    assert_eq!(
        err_of(|h| h.slots[1].state = 1),
        HeaderError::BadSlotState { slot: 1, state: 1 }
    );
    assert_eq!(
        err_of(|h| h.payload_offset = 7),
        HeaderError::PayloadOverlapsHeader(7)
    );
    assert!(matches!(
        err_of(|h| h.key_bytes = 40),
        HeaderError::KeyLengthMismatch { key_bytes: 40, .. }
    ));
    assert!(matches!(
        err_of(|h| h.cipher_name = str_field("serpent").expect("f")),
        HeaderError::UnsupportedCipher(_)
    ));
    assert!(matches!(
        err_of(|h| h.hash_spec = str_field("md5").expect("f")),
        HeaderError::UnsupportedHash(_)
    ));
}

#[test]
fn cbc_with_a_64_byte_key_is_a_length_mismatch() {
    let e = err_of(|h| h.cipher_mode = str_field("cbc-essiv:sha256").expect("f"));
    assert!(matches!(
        e,
        HeaderError::KeyLengthMismatch { key_bytes: 64, .. }
    ));
}

#[test]
fn key_material_must_lie_inside_the_area() {
    let h = sample();
    let (off, len) = h.key_material_range(0);
    assert_eq!((off, len), (4096, 256_000));
    assert!(h.check_key_material_within(off + len).is_ok());
    assert!(matches!(
        h.check_key_material_within(off + len - 1),
        Err(HeaderError::KeyMaterialTruncated { slot: 0, .. })
    ));
}

#[test]
fn random_mutations_never_panic_and_accepted_headers_are_consistent() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let base = sample().encode();
    for _ in 0..20_000 {
        let mut b = base;
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..HEADER_LEN);
            b[at] = rng.random();
        }
        if let Ok(h) = LuksHeader::parse(&b) {
            for i in 0..NUM_KEY_SLOTS {
                let (off, len) = h.key_material_range(i);
                assert!(off >= KEY_SLOT_OFFSET);
                assert!(off + len <= h.payload_offset_bytes());
            }
            assert!(h.mk_iterations > 0);
            assert_eq!(h.encode(), b);
        }
    }
}
