//! Image locking compatible with QEMU's (`block/file-posix.c`, `locking=auto`).
//!
//! QEMU describes what a user of a file does with four permission bits
//! (`include/block/block-common.h`): `CONSISTENT_READ` (bit 0), `WRITE` (bit 1),
//! `WRITE_UNCHANGED` (bit 2) and `RESIZE` (bit 3). It publishes them with open-file-description
//! (OFD) byte-range read locks on the image file itself:
//!
//! * byte `100 + bit` is locked while the user **holds** that permission;
//! * byte `200 + bit` is locked while the user does **not share** that permission with others.
//!
//! A new user first applies its own bytes, then tests (`F_OFD_GETLK` with a write lock) byte
//! `200 + bit` for each permission it wants (someone refuses to share it) and byte `100 + bit`
//! for each permission it refuses to share (someone holds it). Either conflict fails the open
//! with QEMU's messages: `Failed to get "write" lock` / `Failed to get shared "write" lock`,
//! followed by `Is another process using the image [PATH]?`.
//!
//! Because the bytes are the same as QEMU's, qemu-img, qemu-io, qemu-storage-daemon and QEMU see
//! our daemon as a writer and we see them. The locks are OFD locks: they belong to the open file
//! description, conflict between two opens in one process too, and vanish when the process dies.
//!
//! # API (for serve, the tools, and migration hand-over)
//! * [`ImageLock::acquire`] takes the locks for one open file with the given [`Perms`]
//!   (the file is `dup`ed; the lock lives on the same open file description as the I/O fd).
//! * [`ImageLock::downgrade`] drops write and resize (a writer turning read-only);
//!   [`ImageLock::change`] moves to any other set of permissions, checking for conflicts first
//!   and restoring the old locks if the new ones conflict; [`ImageLock::release`] unlocks at once
//!   (dropping does the same).
//! * [`LockSet`] does the same for every file an image opened (image, backing chain, data file).
//!
//! # Migration hand-over (as QEMU's inactivate / activate)
//! The destination opens the image with `image::Locking::Inactive`: every file gets an
//! [`ImageLock`] that holds nothing yet ([`Perms::INACTIVE`]) but remembers what it needs. When
//! the source has stopped writing it calls [`LockSet::inactivate`] (holds nothing, shares
//! everything); the destination then calls [`LockSet::activate`], which takes the remembered
//! permissions or fails with [`LockError::Conflict`] if the source (or anyone) still holds them.
//! A failed hand-over is undone with `activate` on the source. Locks only arbitrate: metadata a
//! destination read before `activate` may be stale (QEMU invalidates its caches at activation),
//! so read it again, or open the image only after the hand-over.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// QEMU's `BLK_PERM_CONSISTENT_READ`: the data read is consistent (no one writes behind us).
pub const PERM_CONSISTENT_READ: u8 = 1 << 0;
/// QEMU's `BLK_PERM_WRITE`.
pub const PERM_WRITE: u8 = 1 << 1;
/// QEMU's `BLK_PERM_WRITE_UNCHANGED`: writes that do not change the guest-visible data.
pub const PERM_WRITE_UNCHANGED: u8 = 1 << 2;
/// QEMU's `BLK_PERM_RESIZE`.
pub const PERM_RESIZE: u8 = 1 << 3;
/// QEMU's `BLK_PERM_ALL`.
pub const PERM_ALL: u8 = 0x0f;

/// First byte of the "permission held" locks (`RAW_LOCK_PERM_BASE`).
pub const LOCK_PERM_BASE: i64 = 100;
/// First byte of the "permission not shared" locks (`RAW_LOCK_SHARED_BASE`).
pub const LOCK_SHARED_BASE: i64 = 200;

const PERM_BITS: [(u8, &str); 4] = [
    (PERM_CONSISTENT_READ, "consistent read"),
    (PERM_WRITE, "write"),
    (PERM_WRITE_UNCHANGED, "write unchanged"),
    (PERM_RESIZE, "resize"),
];

/// What we do with a file (`perm`) and what we let others do (`shared`), as QEMU's
/// `(perm, shared_perm)` pair for the file node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// Permissions held.
    pub perm: u8,
    /// Permissions shared with other users.
    pub shared: u8,
}

impl Perms {
    /// A writable image (or data file): what QEMU's qcow2 or raw node takes of its file with a
    /// writable device on top: read, write and resize; others may read and do unchanged writes.
    pub const WRITE: Perms = Perms {
        perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// A read-only image or a backing file: consistent read; nobody else may write or resize.
    pub const READ: Perms = Perms {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    };
    /// `--force-share` (qemu-img `-U`): read, and share everything (read-only use only).
    pub const FORCE_SHARE: Perms = Perms {
        perm: PERM_CONSISTENT_READ,
        shared: PERM_ALL,
    };
    /// Holds nothing, shares everything (QEMU's inactive image during migration).
    pub const INACTIVE: Perms = Perms {
        perm: 0,
        shared: PERM_ALL,
    };
}

/// Errors of image locking.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another process holds a permission we need, or needs one we do not share.
    #[error(
        "Failed to get {}\"{what}\" lock\nIs another process using the image [{}]?",
        if *.shared { "shared " } else { "" },
        path.display()
    )]
    Conflict {
        path: PathBuf,
        /// QEMU's name of the permission.
        what: &'static str,
        /// Whether it is a permission we refuse to share (QEMU's "shared" lock).
        shared: bool,
    },
    #[error("{}: cannot lock byte {byte}", path.display())]
    Fcntl {
        path: PathBuf,
        byte: i64,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot duplicate the file descriptor", path.display())]
    Dup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The QEMU-compatible locks held on one open file. Unlocked on drop.
pub struct ImageLock {
    file: File,
    path: PathBuf,
    /// Held now.
    perms: Perms,
    /// Held when active (what [`ImageLock::activate`] takes).
    active: Perms,
}

impl fmt::Debug for ImageLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageLock")
            .field("path", &self.path)
            .field("perms", &self.perms)
            .finish()
    }
}

fn fcntl_lock(file: &File, cmd: libc::c_int, ty: libc::c_int, byte: i64) -> io::Result<i32> {
    // SAFETY: `flock` is plain old data; zeroed is a valid value (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = i16::try_from(ty).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    fl.l_whence = i16::try_from(libc::SEEK_SET).unwrap_or(0);
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: F_OFD_SETLK/F_OFD_GETLK read (and GETLK writes) only the `flock` we pass, a live
    // local; the fd is owned by `file`, which outlives the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &raw mut fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(fl.l_type))
}

impl ImageLock {
    /// Takes QEMU's locks for `perms` on `file` (opened from `path`, which names it in errors).
    /// Fails with [`LockError::Conflict`] if another open of the file conflicts, leaving no
    /// lock of ours behind.
    pub fn acquire(file: &File, path: &Path, perms: Perms) -> Result<Self, LockError> {
        let mut lock = Self::acquire_inactive(file, path, perms)?;
        lock.activate()?;
        Ok(lock)
    }

    /// Keeps `file` ready for locking with `perms` but holds nothing yet (a migration
    /// destination before the hand-over); [`ImageLock::activate`] takes them.
    pub fn acquire_inactive(file: &File, path: &Path, perms: Perms) -> Result<Self, LockError> {
        let file = file.try_clone().map_err(|source| LockError::Dup {
            path: path.to_owned(),
            source,
        })?;
        Ok(ImageLock {
            file,
            path: path.to_owned(),
            perms: Perms::INACTIVE,
            active: perms,
        })
    }

    /// Takes the permissions this lock was made for.
    pub fn activate(&mut self) -> Result<(), LockError> {
        self.change(self.active)
    }

    /// Holds nothing and shares everything (a migration source that stopped writing);
    /// [`ImageLock::activate`] takes the permissions back.
    pub fn inactivate(&mut self) -> Result<(), LockError> {
        self.change(Perms::INACTIVE)
    }

    /// The permissions held now.
    pub fn perms(&self) -> Perms {
        self.perms
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves to `perms`: applies the new bytes, then checks for conflicts; on a conflict the old
    /// locks are restored and the error returned (as QEMU's prepare/abort).
    pub fn change(&mut self, perms: Perms) -> Result<(), LockError> {
        // Apply the union while checking, as QEMU does, so that a racing opener sees us.
        let union = Perms {
            perm: self.perms.perm | perms.perm,
            shared: self.perms.shared & perms.shared,
        };
        let r = self.apply(union).and_then(|()| self.check(perms));
        match r {
            Ok(()) => {
                self.apply(perms)?;
                self.perms = perms;
                Ok(())
            }
            Err(e) => {
                let old = self.perms;
                let _ = self.apply(old);
                Err(e)
            }
        }
    }

    /// Gives up write and resize (keeps consistent read, stops refusing others' writes to the
    /// extent [`Perms::READ`] allows). For a migration source handing the image over.
    pub fn downgrade(&mut self) -> Result<(), LockError> {
        self.change(Perms::READ)
    }

    /// Unlocks every byte now.
    pub fn release(mut self) {
        self.unlock_all();
    }

    fn unlock_all(&mut self) {
        let _ = self.apply(Perms::INACTIVE);
        self.perms = Perms::INACTIVE;
    }

    fn set(&self, byte: i64, locked: bool) -> Result<(), LockError> {
        let ty = if locked { libc::F_RDLCK } else { libc::F_UNLCK };
        fcntl_lock(&self.file, libc::F_OFD_SETLK, ty, byte)
            .map(|_| ())
            .map_err(|source| self.fcntl_err(byte, source))
    }

    fn fcntl_err(&self, byte: i64, source: io::Error) -> LockError {
        LockError::Fcntl {
            path: self.path.clone(),
            byte,
            source,
        }
    }

    fn apply(&self, p: Perms) -> Result<(), LockError> {
        for (i, (bit, _)) in (0i64..).zip(PERM_BITS) {
            self.set(LOCK_PERM_BASE + i, p.perm & bit != 0)?;
            self.set(LOCK_SHARED_BASE + i, p.shared & bit == 0)?;
        }
        Ok(())
    }

    /// Whether another open file description holds a lock on `byte`.
    fn taken(&self, byte: i64) -> Result<bool, LockError> {
        let ty = fcntl_lock(&self.file, libc::F_OFD_GETLK, libc::F_WRLCK, byte)
            .map_err(|source| self.fcntl_err(byte, source))?;
        Ok(ty != libc::F_UNLCK)
    }

    fn check(&self, p: Perms) -> Result<(), LockError> {
        for (i, (bit, what)) in (0i64..).zip(PERM_BITS) {
            let conflict = |shared| LockError::Conflict {
                path: self.path.clone(),
                what,
                shared,
            };
            if p.perm & bit != 0 && self.taken(LOCK_SHARED_BASE + i)? {
                return Err(conflict(false));
            }
            if p.shared & bit == 0 && self.taken(LOCK_PERM_BASE + i)? {
                return Err(conflict(true));
            }
        }
        Ok(())
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        // The fd is a dup: the open file description (and its locks) may outlive it.
        self.unlock_all();
    }
}

/// The locks of every file one image opened: the image, its backing chain, its data file.
#[derive(Debug, Default)]
pub struct LockSet {
    locks: Vec<ImageLock>,
}

impl LockSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a lock.
    pub fn push(&mut self, lock: ImageLock) {
        self.locks.push(lock);
    }

    /// The locks, image first.
    pub fn locks(&self) -> &[ImageLock] {
        &self.locks
    }

    /// Whether no file is locked.
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// Downgrades every writer lock to [`Perms::READ`] (migration source hand-over).
    pub fn downgrade(&mut self) -> Result<(), LockError> {
        for l in &mut self.locks {
            if l.perms().perm & (PERM_WRITE | PERM_RESIZE) != 0 {
                l.downgrade()?;
            }
        }
        Ok(())
    }

    /// Migration source: hold nothing, share everything, on every file.
    pub fn inactivate(&mut self) -> Result<(), LockError> {
        self.locks.iter_mut().try_for_each(ImageLock::inactivate)
    }

    /// Migration destination (or a source taking the image back): take every file's
    /// permissions; on a conflict the files already activated are inactivated again.
    pub fn activate(&mut self) -> Result<(), LockError> {
        for i in 0..self.locks.len() {
            if let Err(e) = self.locks[i].activate() {
                for l in &mut self.locks[..i] {
                    let _ = l.inactivate();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Unlocks everything now.
    pub fn release(self) {
        drop(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path) -> (PathBuf, File) {
        let p = dir.join("img");
        std::fs::write(&p, vec![0u8; 4096]).expect("write");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .expect("open");
        (p, f)
    }

    fn reopen(p: &Path) -> File {
        File::open(p).expect("reopen")
    }

    #[test]
    fn two_writers_conflict_with_qemus_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, f) = file(dir.path());
        let _w = ImageLock::acquire(&f, &p, Perms::WRITE).expect("first writer");
        let e = ImageLock::acquire(&reopen(&p), &p, Perms::WRITE).expect_err("second writer");
        let msg = e.to_string();
        assert!(msg.starts_with("Failed to get \"write\" lock"), "{msg}");
        assert!(msg.contains("Is another process using the image"), "{msg}");
    }

    #[test]
    fn reader_refused_by_writer_unless_force_share() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, f) = file(dir.path());
        let _w = ImageLock::acquire(&f, &p, Perms::WRITE).expect("writer");
        let e = ImageLock::acquire(&reopen(&p), &p, Perms::READ).expect_err("reader");
        assert!(matches!(
            e,
            LockError::Conflict {
                shared: true,
                what: "write",
                ..
            }
        ));
        ImageLock::acquire(&reopen(&p), &p, Perms::FORCE_SHARE).expect("force share");
    }

    #[test]
    fn readers_share_and_block_a_writer_until_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, f) = file(dir.path());
        let r1 = ImageLock::acquire(&f, &p, Perms::READ).expect("reader 1");
        let r2 = ImageLock::acquire(&reopen(&p), &p, Perms::READ).expect("reader 2");
        let w = reopen(&p);
        assert!(ImageLock::acquire(&w, &p, Perms::WRITE).is_err());
        r1.release();
        drop(r2);
        ImageLock::acquire(&w, &p, Perms::WRITE).expect("writer after release");
    }

    #[test]
    fn migration_hand_over_inactivate_then_activate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, f) = file(dir.path());
        let mut src = LockSet::new();
        src.push(ImageLock::acquire(&f, &p, Perms::WRITE).expect("source"));
        let mut dst = LockSet::new();
        dst.push(ImageLock::acquire_inactive(&reopen(&p), &p, Perms::WRITE).expect("dest"));
        // The destination cannot take over while the source writes, and stays inactive.
        assert!(dst.activate().is_err());
        assert_eq!(dst.locks()[0].perms(), Perms::INACTIVE);
        src.inactivate().expect("source inactive");
        dst.activate().expect("destination active");
        assert_eq!(dst.locks()[0].perms(), Perms::WRITE);
        // The source cannot take it back now.
        assert!(src.activate().is_err());
        assert_eq!(src.locks()[0].perms(), Perms::INACTIVE);
    }

    #[test]
    fn downgrade_lets_a_new_writer_in_and_failed_change_keeps_old_locks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, f) = file(dir.path());
        let mut src = ImageLock::acquire(&f, &p, Perms::WRITE).expect("source");
        let dst_file = reopen(&p);
        assert!(ImageLock::acquire(&dst_file, &p, Perms::WRITE).is_err());
        // A read-only destination can come in once the source shares writes: use FORCE_SHARE
        // on the source side as a hand-over state.
        src.change(Perms::FORCE_SHARE).expect("source shares all");
        let mut dst = ImageLock::acquire(&dst_file, &p, Perms::WRITE).expect("destination");
        // The source may not take the write back now.
        assert!(src.change(Perms::WRITE).is_err());
        assert_eq!(src.perms(), Perms::FORCE_SHARE);
        dst.downgrade().expect("downgrade");
        assert_eq!(dst.perms(), Perms::READ);
    }
}
