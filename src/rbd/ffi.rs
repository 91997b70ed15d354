//! The few librados/librbd entry points a block backend needs, resolved at run time.
//!
//! Hand-written declarations (from `rados/librados.h` and `rbd/librbd.h` of Ceph 16 "Pacific",
//! librbd 1.16) rather than a bindgen crate: 25 functions with plain C types do not justify
//! libclang at build time, and loading `librbd.so.1` with `dlopen` (as QEMU loads its rbd block
//! module) keeps the binary building and running on hosts without Ceph. Only an `rbd:` image
//! name loads the library; its absence is then a clear error.
//!
//! Every function used here exists in librbd since Ceph 15 (Octopus), so any librbd.so.1 from
//! then on works; a missing symbol is reported by name.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

/// `rados_t`.
pub type Rados = *mut c_void;
/// `rados_ioctx_t`.
pub type Ioctx = *mut c_void;
/// `rbd_image_t`.
pub type Image = *mut c_void;
/// `rbd_completion_t`.
pub type Completion = *mut c_void;
/// `rbd_callback_t`.
pub type Callback = Option<unsafe extern "C" fn(Completion, *mut c_void)>;

/// `RBD_LOCK_MODE_EXCLUSIVE`.
pub const LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK`.
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;

/// `rbd_image_watcher_t`.
#[repr(C)]
pub struct Watcher {
    /// Client address.
    pub addr: *mut c_char,
    /// Client global id (the N of `client.N`).
    pub id: i64,
    /// Watch cookie.
    pub cookie: u64,
}

/// The library file names tried, in order.
pub const LIBRARY_NAMES: [&str; 2] = ["librbd.so.1", "librbd.so"];

macro_rules! api {
    ($( $name:ident : fn($($arg:ty),*) $(-> $ret:ty)? ; )*) => {
        /// Entry points of librbd and librados (found through librbd's dependencies).
        #[allow(missing_docs)]
        pub struct Api {
            $( pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?, )*
        }

        impl Api {
            fn resolve(lib: &'static Library) -> Result<Self, String> {
                Ok(Api {
                    $( $name: {
                        let sym = concat!(stringify!($name), "\0");
                        // SAFETY: the type is the C prototype from Pacific's headers; the
                        // library is never unloaded ('static), so the pointer stays valid.
                        let f = unsafe {
                            lib.get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(sym.as_bytes())
                        }
                        .map_err(|e| format!("{}: {e}", stringify!($name)))?;
                        *f
                    }, )*
                })
            }
        }
    };
}

api! {
    rados_create2: fn(*mut Rados, *const c_char, *const c_char, u64) -> c_int;
    rados_conf_read_file: fn(Rados, *const c_char) -> c_int;
    rados_conf_set: fn(Rados, *const c_char, *const c_char) -> c_int;
    rados_connect: fn(Rados) -> c_int;
    rados_shutdown: fn(Rados);
    rados_ioctx_create: fn(Rados, *const c_char, *mut Ioctx) -> c_int;
    rados_ioctx_destroy: fn(Ioctx);
    rados_ioctx_set_namespace: fn(Ioctx, *const c_char);
    rbd_create: fn(Ioctx, *const c_char, u64, *mut c_int) -> c_int;
    rbd_open: fn(Ioctx, *const c_char, *mut Image, *const c_char) -> c_int;
    rbd_open_read_only: fn(Ioctx, *const c_char, *mut Image, *const c_char) -> c_int;
    rbd_close: fn(Image) -> c_int;
    rbd_get_size: fn(Image, *mut u64) -> c_int;
    rbd_get_features: fn(Image, *mut u64) -> c_int;
    rbd_resize: fn(Image, u64) -> c_int;
    rbd_aio_create_completion: fn(*mut c_void, Callback, *mut Completion) -> c_int;
    rbd_aio_wait_for_complete: fn(Completion) -> c_int;
    rbd_aio_get_return_value: fn(Completion) -> isize;
    rbd_aio_release: fn(Completion);
    rbd_aio_readv: fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int;
    rbd_aio_writev: fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int;
    rbd_aio_write_zeroes: fn(Image, u64, usize, Completion, c_int, c_int) -> c_int;
    rbd_aio_flush: fn(Image, Completion) -> c_int;
    rbd_lock_acquire: fn(Image, c_int) -> c_int;
    rbd_lock_release: fn(Image) -> c_int;
    rbd_lock_get_owners: fn(Image, *mut c_int, *mut *mut c_char, *mut usize) -> c_int;
    rbd_lock_get_owners_cleanup: fn(*mut *mut c_char, usize);
    rbd_lock_exclusive: fn(Image, *const c_char) -> c_int;
    rbd_unlock: fn(Image, *const c_char) -> c_int;
    rbd_watchers_list: fn(Image, *mut Watcher, *mut usize) -> c_int;
    rbd_watchers_list_cleanup: fn(*mut Watcher, usize);
}

/// librbd, loaded once per process; `Err` says why it could not be.
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let mut errors = Vec::new();
        for name in LIBRARY_NAMES {
            // SAFETY: loading librbd runs its (and librados's) initialisers, which only set up
            // their own globals; nothing else in this process depends on them.
            match unsafe { Library::new(name) } {
                Ok(lib) => return Api::resolve(Box::leak(Box::new(lib))),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(errors.join("; "))
    })
    .as_ref()
    .map_err(Clone::clone)
}
