//! Replays the committed fuzz corpora and the regression inputs through the targets.

use std::path::{Path, PathBuf};

use super::TARGETS;

fn corpus_dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target)
}

/// Runs every file of `fuzz/<kind>/<target>/` through its target; returns how many ran.
fn replay(kind: &str) -> usize {
    let mut n = 0;
    for (name, target) in TARGETS {
        let dir = corpus_dir(kind, name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            eprintln!("replay {}", f.display());
            target(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn corpora_replay_without_failures() {
    // Every target has a committed corpus: an empty directory would make this test vacuous.
    for (name, _) in TARGETS {
        let dir = corpus_dir("corpus", name);
        let count = std::fs::read_dir(&dir).map_or(0, |d| d.count());
        assert!(count > 0, "no corpus for {name} in {}", dir.display());
    }
    assert!(replay("corpus") > 0);
}

#[test]
fn regression_inputs_replay_without_failures() {
    replay("regressions");
}

#[test]
fn targets_accept_empty_and_tiny_inputs() {
    for (_, target) in TARGETS {
        target(&[]);
        target(&[0]);
        target(&[0xff; 7]);
    }
}

#[test]
fn debug_one() {
    let Ok(p) = std::env::var("FUZZ_ONE") else {
        return;
    };
    let data = std::fs::read(p).expect("read");
    let t = std::env::var("FUZZ_TARGET").unwrap_or_else(|_| "qcow2_ops".into());
    let f = TARGETS.iter().find(|(n, _)| *n == t).expect("target").1;
    f(&data);
}

/// Writes the LUKS1 seeds into `fuzz/corpus/luks1_unlock/` (run by hand:
/// `cargo test --lib fuzz_harness::tests::write_luks1_seeds -- --ignored`).
#[test]
#[ignore = "generates seed files"]
fn write_luks1_seeds() {
    use crate::crypto::luks::{CreateParams, Iterations, LuksHash};
    use crate::crypto::sector::{CipherAlg, CipherMode, CipherSpec, EssivHash, IvGen};
    let specs = [
        (
            "aes256-xts-plain64-sha256",
            CipherAlg::Aes256,
            CipherMode::Xts,
            IvGen::Plain64,
            LuksHash::Sha256,
        ),
        (
            "aes128-cbc-essiv-sha1",
            CipherAlg::Aes128,
            CipherMode::Cbc,
            IvGen::Essiv(EssivHash::Sha256),
            LuksHash::Sha1,
        ),
        (
            "aes128-ecb-sha512",
            CipherAlg::Aes128,
            CipherMode::Ecb,
            IvGen::Null,
            LuksHash::Sha512,
        ),
        (
            "aes192-xts-plain-sha256",
            CipherAlg::Aes192,
            CipherMode::Xts,
            IvGen::Plain,
            LuksHash::Sha256,
        ),
    ];
    let dir = corpus_dir("corpus", "luks1_unlock");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (name, alg, mode, iv, hash) in specs {
        let params = CreateParams {
            spec: CipherSpec { alg, mode, iv },
            hash,
            iterations: Iterations::Fixed(super::LUKS_MAX_ITERATIONS),
        };
        let seed = super::luks1_seed(&params).expect("seed");
        // The seed unlocks with the passphrase the target tries.
        let st = crate::storage::MemStorage::new(seed.clone());
        let area = crate::crypto::luks::LuksArea::whole(&st).expect("area");
        let pass = crate::crypto::secret::Passphrase::new(super::LUKS_FUZZ_PASSPHRASE);
        crate::crypto::luks::LuksVolume::unlock(&area, &pass).expect("seed unlocks");
        super::luks1_unlock(&seed);
        std::fs::write(dir.join(name), seed).expect("write");
    }
}

fn regression(target: &str, name: &str) -> Vec<u8> {
    let p = corpus_dir("regressions", target).join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// An allocating write into the second half of a freshly allocated extended L2 table's span
/// indexed past a table allocated with one word per entry (panic in the queue worker).
#[test]
fn regression_extended_l2_new_table_has_two_words_per_entry() {
    super::qcow2_ops(&regression("qcow2_ops", "extended-l2-new-table-half-size"));
}

/// Refcounts that call the header, L1 and refcount block free: the allocating write must be
/// refused (the image turns read-only) instead of putting guest data over the metadata.
#[test]
fn regression_allocation_over_metadata_is_refused() {
    use crate::qcow2::{Qcow2, Qcow2Options};
    use std::io::IoSlice;
    let data = regression("qcow2_ops", "alloc-reuses-metadata-cluster");
    let image = &data[..data.len() - super::OPS_TAIL];
    let st = super::storage::CappedMem::new(image.to_vec());
    let img = Qcow2::open(Box::new(st), &Qcow2Options::default(), None, None).expect("open");
    let before = img.header().l1_table_offset;
    let r = img.write(0x16_3400, &[IoSlice::new(&[0xc1; 512])]);
    assert!(r.is_err(), "the write was placed on a metadata cluster");
    assert!(img.read_only(), "the image is not marked corrupt");
    assert_eq!(img.header().l1_table_offset, before);
    // And the whole script runs without breaking the read-back oracle.
    super::qcow2_ops(&data);
}
