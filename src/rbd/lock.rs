//! Who may write an RBD image.
//!
//! Images with the `exclusive-lock` feature (the default since Ceph 12): a writer takes the lock
//! with `rbd_lock_acquire`. librbd's own clients (QEMU, `rbd`, krbd) take it automatically on their
//! first write and hand it over cooperatively to whoever asks; an explicit acquire instead keeps
//! it: while we hold it, other clients' writes fail with EROFS. Before acquiring we look at the
//! current owner: if it is still a live client (it watches the image header), we refuse rather
//! than ask it for the lock, which a QEMU would grant, leaving two writers taking turns. A dead
//! owner (its process killed, its watch gone) is broken by librbd during the acquire.
//!
//! Images without `exclusive-lock`: an advisory exclusive lock (`rbd lock ls` shows it), which
//! only cooperating tools honour, and which stays behind if the process dies
//! (`rbd lock rm` clears it).
//!
//! Exit: the daemon leaves with `exit()` from its signal thread, without closing the image. An
//! `atexit` handler releases every lock still held (and only that: worker threads may still be
//! inside librbd), so the next writer finds the image unowned at once. A process killed with
//! SIGKILL cannot: its lock is broken by the next writer once the OSD has dropped the dead
//! client's watch (`osd_client_watch_timeout`, 30 s by default); until then opening refuses.
//!
//! Live migration hand-over: the source daemon releases the lock when it closes the image
//! (`rbd_lock_release`, then close), which happens when it exits; the destination then opens
//! read-write. `release` and `acquire` are the calls a control-socket hand-over would use.

use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::{Mutex, Once};

use super::ffi::{Api, Image, Watcher, FEATURE_EXCLUSIVE_LOCK, LOCK_MODE_EXCLUSIVE};
use super::{errno, RbdError};

/// The cookie of our advisory locks.
pub const ADVISORY_COOKIE: &str = "vhost-user-qcow2";

/// Most lock owners / watchers listed.
const MAX_LISTED: usize = 64;

/// A lock we hold.
#[derive(Debug)]
pub enum Held {
    /// Read-only open: no lock.
    None,
    /// RBD's exclusive lock, taken with `rbd_lock_acquire`.
    Exclusive,
    /// An advisory exclusive lock with this cookie.
    Advisory(CString),
}

fn lock_err(image: &str, r: c_int) -> RbdError {
    RbdError::Lock {
        image: image.to_owned(),
        source: errno(r),
    }
}

/// The current exclusive-lock owners (their addresses), empty when unlocked.
fn owners(api: &Api, image: Image, spec: &str) -> Result<Vec<String>, RbdError> {
    let mut mode: c_int = 0;
    let mut ptrs: [*mut c_char; MAX_LISTED] = [std::ptr::null_mut(); MAX_LISTED];
    let mut n: usize = MAX_LISTED;
    // SAFETY: `image` is open; `ptrs` has room for `n` pointers, which librbd fills with
    // strings it allocates and we free with the cleanup call below.
    let r = unsafe { (api.rbd_lock_get_owners)(image, &mut mode, ptrs.as_mut_ptr(), &mut n) };
    if r == -libc::ENOENT {
        return Ok(Vec::new());
    }
    if r < 0 {
        return Err(lock_err(spec, r));
    }
    let n = n.min(MAX_LISTED);
    let list = ptrs[..n]
        .iter()
        .filter(|p| !p.is_null())
        // SAFETY: librbd returned `n` NUL-terminated strings.
        .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .collect();
    // SAFETY: exactly the `n` strings librbd allocated in the call above.
    unsafe { (api.rbd_lock_get_owners_cleanup)(ptrs.as_mut_ptr(), n) };
    Ok(list)
}

/// The clients watching the image header: (address, global id).
fn watchers(api: &Api, image: Image, spec: &str) -> Result<Vec<(String, i64)>, RbdError> {
    let mut list: Vec<Watcher> = (0..MAX_LISTED)
        .map(|_| Watcher {
            addr: std::ptr::null_mut(),
            id: 0,
            cookie: 0,
        })
        .collect();
    let mut n = MAX_LISTED;
    // SAFETY: `list` has room for `n` watchers; librbd allocates their address strings, freed by
    // the cleanup call below.
    let r = unsafe { (api.rbd_watchers_list)(image, list.as_mut_ptr(), &mut n) };
    if r < 0 {
        return Err(lock_err(spec, r));
    }
    let n = n.min(MAX_LISTED);
    let out = list[..n]
        .iter()
        .map(|w| {
            let addr = if w.addr.is_null() {
                String::new()
            } else {
                // SAFETY: librbd filled a NUL-terminated address string.
                unsafe { CStr::from_ptr(w.addr) }
                    .to_string_lossy()
                    .into_owned()
            };
            (addr, w.id)
        })
        .collect();
    // SAFETY: the `n` watchers librbd filled in the call above.
    unsafe { (api.rbd_watchers_list_cleanup)(list.as_mut_ptr(), n) };
    Ok(out)
}

/// Whether a lock owner (as `rbd_lock_get_owners` names it: an address, or `client.N`) still
/// watches the image.
fn owner_alive(owner: &str, watchers: &[(String, i64)]) -> bool {
    watchers.iter().any(|(addr, id)| {
        owner == addr || owner.strip_prefix("client.") == Some(id.to_string().as_str())
    })
}

/// Takes write ownership of an open image (see the module documentation).
pub(crate) fn acquire(api: &Api, image: Image, spec: &str) -> Result<Held, RbdError> {
    let mut features: u64 = 0;
    // SAFETY: `image` is open; `features` is a valid out-pointer.
    let r = unsafe { (api.rbd_get_features)(image, &mut features) };
    if r < 0 {
        return Err(lock_err(spec, r));
    }
    if features & FEATURE_EXCLUSIVE_LOCK == 0 {
        let cookie = CString::new(ADVISORY_COOKIE).expect("constant without NUL");
        // SAFETY: `image` is open; `cookie` is NUL-terminated and outlives the call.
        let r = unsafe { (api.rbd_lock_exclusive)(image, cookie.as_ptr()) };
        return match r {
            0 => Ok(Held::Advisory(cookie)),
            r if r == -libc::EBUSY || r == -libc::EEXIST => Err(RbdError::Locked {
                image: spec.to_owned(),
                owner: "another client (advisory lock: see `rbd lock ls`)".to_owned(),
            }),
            r => Err(lock_err(spec, r)),
        };
    }
    let current = owners(api, image, spec)?;
    if !current.is_empty() {
        let live = watchers(api, image, spec)?;
        let alive: Vec<&str> = current
            .iter()
            .filter(|o| owner_alive(o, &live))
            .map(String::as_str)
            .collect();
        if !alive.is_empty() {
            return Err(RbdError::Locked {
                image: spec.to_owned(),
                owner: format!("client {}", alive.join(", ")),
            });
        }
        log::warn!(
            "rbd:{spec}: breaking the exclusive lock of {} (no longer connected)",
            current.join(", ")
        );
    }
    // SAFETY: `image` is open.
    let r = unsafe { (api.rbd_lock_acquire)(image, LOCK_MODE_EXCLUSIVE) };
    match r {
        0 => {
            register(image);
            Ok(Held::Exclusive)
        }
        r if r == -libc::EROFS || r == -libc::EBUSY => Err(RbdError::Locked {
            image: spec.to_owned(),
            owner: "another client".to_owned(),
        }),
        r => Err(lock_err(spec, r)),
    }
}

/// Images whose exclusive lock we hold, for the exit handler (as addresses: raw pointers are not
/// `Send`).
static HELD: Mutex<Vec<usize>> = Mutex::new(Vec::new());

extern "C" fn release_at_exit() {
    let Ok(api) = super::ffi::api() else {
        return;
    };
    // try_lock: never block exit behind a thread that died holding the list.
    if let Ok(list) = HELD.try_lock() {
        for &image in list.iter() {
            // SAFETY: an address in HELD is an open image whose lock we hold (Drop removes it
            // before closing); librbd's calls are thread-safe.
            unsafe { (api.rbd_lock_release)(image as Image) };
        }
    }
}

/// Remembers that we hold `image`'s exclusive lock, for the exit handler.
fn register(image: Image) {
    static AT_EXIT: Once = Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain extern "C" function without arguments.
        if unsafe { libc::atexit(release_at_exit) } != 0 {
            log::warn!("cannot register the RBD lock release at exit");
        }
    });
    if let Ok(mut list) = HELD.lock() {
        list.push(image as usize);
    }
}

fn unregister(image: Image) {
    if let Ok(mut list) = HELD.lock() {
        list.retain(|&i| i != image as usize);
    }
}

/// Gives up write ownership (before close, or for a migration hand-over).
pub(crate) fn release(api: &Api, image: Image, held: &Held) {
    unregister(image);
    let r = match held {
        Held::None => 0,
        // SAFETY: `image` is open and we hold its exclusive lock.
        Held::Exclusive => unsafe { (api.rbd_lock_release)(image) },
        // SAFETY: `image` is open; the cookie is the one we locked with.
        Held::Advisory(cookie) => unsafe { (api.rbd_unlock)(image, cookie.as_ptr()) },
    };
    if r < 0 {
        log::warn!("releasing the RBD lock failed: {}", errno(r));
    }
}

#[cfg(test)]
mod tests {
    use super::owner_alive;

    #[test]
    fn owner_is_alive_while_it_watches_by_address_or_id() {
        let w = vec![("127.0.0.1:0/123".to_owned(), 4161)];
        assert!(owner_alive("127.0.0.1:0/123", &w));
        assert!(owner_alive("client.4161", &w));
        assert!(!owner_alive("client.4162", &w));
        assert!(!owner_alive("127.0.0.1:0/124", &w));
        assert!(!owner_alive("client.4161", &[]));
    }
}
