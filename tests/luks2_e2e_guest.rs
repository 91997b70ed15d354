//! End-to-end on LUKS2: a Linux guest (QEMU, TCG) runs fio with crc32c verify on raw LUKS2
//! images made by `cryptsetup luksFormat` (512- and 4096-byte encryption sectors; with 4096 the
//! daemon advertises 4 KiB logical blocks) served by our daemon with `--key-secret-file`.
//! QEMU cannot open LUKS2, so the host-side checks go through this crate's library (prefill,
//! plaintext export) and qemu-io on the plaintext export; the rig also checks that no
//! plaintext pattern is in the file. Same gates as tests/e2e_guest.rs (`VUQ_SKIP_E2E=1`
//! skips).

#[path = "guest/rig.rs"]
#[allow(dead_code)]
mod rig;
#[path = "guest/vm.rs"]
#[allow(dead_code)]
mod vm;

use std::io::{IoSlice, IoSliceMut, Write};
use std::path::Path;
use std::process::Command;

use rig::{run_guest_fio, Backend, ImageCase, PlainAccess};
use vhost_user_qcow2::crypto::secret::Passphrase;
use vhost_user_qcow2::image::luks::LuksImage;
use vhost_user_qcow2::image::BlockImage;
use vhost_user_qcow2::storage::{FileStorage, OpenFlags};

const PASS: &str = "e2e-luks2-pass";

fn open(image: &Path) -> Result<LuksImage, String> {
    let st = FileStorage::open(
        image,
        OpenFlags {
            read_only: false,
            direct: false,
        },
    )
    .map_err(|e| format!("open {}: {e}", image.display()))?;
    LuksImage::open(Box::new(st), false, &Passphrase::new(PASS.as_bytes()))
        .map_err(|e| format!("unlock {}: {e}", image.display()))
}

fn case(name: &'static str, sector_size: u64) -> ImageCase {
    let key = std::env::temp_dir().join(format!("vuq-e2e-luks2-{}.key", std::process::id()));
    std::fs::write(&key, PASS).expect("key file");
    let create_key = key.clone();
    ImageCase {
        name,
        format_opts: String::new(),
        objects: Vec::new(),
        daemon_args: vec!["--key-secret-file".to_owned(), key.display().to_string()],
        create: Box::new(move |path, size| {
            let f = std::fs::File::create(path).map_err(|e| e.to_string())?;
            f.set_len(size + (16 << 20)).map_err(|e| e.to_string())?;
            let out = Command::new("cryptsetup")
                .args([
                    "luksFormat",
                    "--type",
                    "luks2",
                    "--batch-mode",
                    "--pbkdf",
                    "argon2id",
                ])
                .args(["--pbkdf-memory", "32", "--pbkdf-force-iterations", "4"])
                .args(["--sector-size", &sector_size.to_string(), "--key-file"])
                .arg(&create_key)
                .arg(path)
                .output()
                .map_err(|e| format!("cryptsetup: {e}"))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            Ok(Vec::new())
        }),
        base: None,
        qemu_img_check: false,
        encrypted: true,
        block_size: sector_size,
        plain: Some(PlainAccess {
            fill: Box::new(|image, offset, len, byte| {
                let img = open(image)?;
                let data = vec![byte; usize::try_from(len).map_err(|e| e.to_string())?];
                img.write(offset, &[IoSlice::new(&data)])
                    .map_err(|e| e.to_string())?;
                img.flush().map_err(|e| e.to_string())
            }),
            export: Box::new(|image, raw| {
                let img = open(image)?;
                let mut out = std::fs::File::create(raw).map_err(|e| e.to_string())?;
                let mut buf = vec![0u8; 1 << 20];
                let mut at = 0;
                while at < img.capacity() {
                    let n = (img.capacity() - at).min(1 << 20);
                    let b = &mut buf[..usize::try_from(n).map_err(|e| e.to_string())?];
                    img.read(at, &mut [IoSliceMut::new(b)])
                        .map_err(|e| e.to_string())?;
                    out.write_all(b).map_err(|e| e.to_string())?;
                    at += n;
                }
                Ok(())
            }),
        }),
        location: None,
    }
}

#[test]
fn luks2_512_image_made_by_cryptsetup_guest_fio_verify_via_daemon() {
    run_guest_fio(&case("luks2-512", 512), Backend::Daemon);
}

#[test]
fn luks2_4096_image_made_by_cryptsetup_guest_fio_verify_via_daemon_with_4k_blocks() {
    run_guest_fio(&case("luks2-4096", 4096), Backend::Daemon);
}
