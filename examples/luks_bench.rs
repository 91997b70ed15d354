//! In-process throughput of the image layer on an encrypted image, to run side by side with
//! `qemu-img bench` on the same file (both single-threaded, depth 1, sequential):
//!
//! ```sh
//! cargo run --release --example luks_bench -- IMAGE PASSFILE read|write BUFSIZE COUNT
//! qemu-img bench --object secret,id=s0,file=PASSFILE --image-opts \
//!     driver=qcow2,encrypt.key-secret=s0,file.filename=IMAGE -t none -c COUNT -s BUFSIZE [-w]
//! ```
//!
//! Prints MB/s (10^6 bytes per wall-clock second). Not a daemon benchmark: no vhost-user, no
//! guest; it isolates format + crypto cost.

use std::io::{IoSlice, IoSliceMut};
use std::path::PathBuf;
use std::time::Instant;

use vhost_user_qcow2::crypto::secret::Passphrase;
use vhost_user_qcow2::image::{self, OpenOptions};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!("usage: luks_bench IMAGE PASSFILE read|write BUFSIZE COUNT");
        std::process::exit(2);
    }
    let path = PathBuf::from(&a[1]);
    let pass = Passphrase::from_file(std::path::Path::new(&a[2])).expect("passphrase");
    let write = a[3] == "write";
    let bs: usize = a[4].parse().expect("bufsize");
    let count: u64 = a[5].parse().expect("count");
    let img =
        image::open_with_secret(&path, &OpenOptions::default(), Some(&pass)).expect("open image");
    let cap = img.capacity();
    let mut buf = vec![0x5au8; bs];
    let bs64 = bs as u64;
    let start = Instant::now();
    let mut off = 0u64;
    for _ in 0..count {
        if off + bs64 > cap {
            off = 0;
        }
        if write {
            img.write(off, &[IoSlice::new(&buf)]).expect("write");
        } else {
            img.read(off, &mut [IoSliceMut::new(&mut buf)])
                .expect("read");
        }
        off += bs64;
    }
    if write {
        img.flush().expect("flush");
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = (count * bs64) as f64;
    println!(
        "{} {} x {} bytes: {:.3} s, {:.0} MB/s",
        if write { "write" } else { "read" },
        count,
        bs,
        secs,
        bytes / secs / 1e6
    );
}
