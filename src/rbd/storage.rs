//! [`RbdStorage`]: the [`Storage`] trait over one open RBD image.
//!
//! Every call submits one `rbd_aio_*` request (readv/writev get the caller's iovecs as they are:
//! `IoSlice`/`IoSliceMut` are ABI-compatible with `struct iovec`) and waits for its completion, so
//! each queue worker has its requests in flight in librbd while the others have theirs.
//!
//! The store behaves as a file does for the layers above: reads past the end return zeroes,
//! writes past the end grow the image first (`rbd_resize`, as QEMU's rbd driver does), and
//! `punch_hole` reads back as zeroes (`rbd_aio_write_zeroes`: a plain discard may skip partial
//! objects).

use std::ffi::{c_int, CString};
use std::io::{self, IoSlice, IoSliceMut};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::ffi::{self, Api, Completion, Image, Ioctx, Rados};
use super::lock::{self, Held};
use super::{errno, RbdError, RbdName};
use crate::storage::{Result, Storage, StorageError};

/// How long connecting to the monitors may take (`client_mount_timeout`) unless the name sets it.
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u32 = 20;

/// Most iovecs librbd takes in one call (it refuses more than IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// Largest single write-zeroes request.
const ZERO_CHUNK: u64 = 1 << 30;

fn cstring(s: &str) -> std::result::Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Name(super::NameError::Nul))
}

/// A connected cluster handle and a pool context; closed on drop.
struct Conn {
    api: &'static Api,
    cluster: Rados,
    ioctx: Ioctx,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: both handles were created by `connect` and are destroyed exactly once here,
        // after every image opened on them has been closed (RbdStorage drops its image first).
        unsafe {
            if !self.ioctx.is_null() {
                (self.api.rados_ioctx_destroy)(self.ioctx);
            }
            (self.api.rados_shutdown)(self.cluster);
        }
    }
}

fn connect(name: &RbdName) -> std::result::Result<Conn, RbdError> {
    let api = ffi::api().map_err(RbdError::Library)?;
    let client = name.client_name();
    let c_client = cstring(&client)?;
    let c_cluster = cstring("ceph")?;
    let mut cluster: Rados = ptr::null_mut();
    // SAFETY: out-pointer and NUL-terminated strings valid for the call.
    let r = unsafe { (api.rados_create2)(&mut cluster, c_cluster.as_ptr(), c_client.as_ptr(), 0) };
    let conf_shown = name.conf.clone().unwrap_or_else(|| "default".to_owned());
    if r < 0 {
        return Err(RbdError::Connect {
            conf: conf_shown,
            client,
            timeout_secs: "0".to_owned(),
            source: errno(r),
        });
    }
    let mut conn = Conn {
        api,
        cluster,
        ioctx: ptr::null_mut(),
    };
    match &name.conf {
        Some(path) => {
            let c_path = cstring(path)?;
            // SAFETY: `cluster` is a created handle; the path is NUL-terminated.
            let r = unsafe { (api.rados_conf_read_file)(cluster, c_path.as_ptr()) };
            if r < 0 {
                return Err(RbdError::Conf {
                    path: path.clone(),
                    source: errno(r),
                });
            }
        }
        None => {
            // librados's default search (/etc/ceph/ceph.conf, ...); a missing file is not an
            // error here, as in QEMU: options in the name may be all there is.
            // SAFETY: NULL asks for the default search path.
            let _ = unsafe { (api.rados_conf_read_file)(cluster, ptr::null()) };
        }
    }
    let timeout = DEFAULT_CONNECT_TIMEOUT_SECS.to_string();
    let mut options: Vec<(&str, &str)> = name
        .options
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if !name.has_option("client_mount_timeout") {
        options.push(("client_mount_timeout", &timeout));
    }
    for (k, v) in &options {
        let (ck, cv) = (cstring(k)?, cstring(v)?);
        // SAFETY: `cluster` is a created, unconnected handle; strings NUL-terminated.
        let r = unsafe { (api.rados_conf_set)(cluster, ck.as_ptr(), cv.as_ptr()) };
        if r < 0 {
            return Err(RbdError::Option {
                key: (*k).to_owned(),
                source: errno(r),
            });
        }
    }
    let timeout_secs = options
        .iter()
        .find(|(k, _)| *k == "client_mount_timeout")
        .map_or(timeout.clone(), |(_, v)| (*v).to_owned());
    // SAFETY: `cluster` is configured and not yet connected.
    let r = unsafe { (api.rados_connect)(cluster) };
    if r < 0 {
        return Err(RbdError::Connect {
            conf: conf_shown,
            client,
            timeout_secs,
            source: errno(r),
        });
    }
    let c_pool = cstring(&name.pool)?;
    // SAFETY: connected handle, NUL-terminated pool name, valid out-pointer.
    let r = unsafe { (api.rados_ioctx_create)(cluster, c_pool.as_ptr(), &mut conn.ioctx) };
    if r == -libc::ENOENT {
        return Err(RbdError::NoPool {
            pool: name.pool.clone(),
        });
    }
    if r < 0 {
        return Err(RbdError::Pool {
            pool: name.pool.clone(),
            source: errno(r),
        });
    }
    if let Some(ns) = &name.namespace {
        let c_ns = cstring(ns)?;
        // SAFETY: valid ioctx; librados copies the namespace.
        unsafe { (api.rados_ioctx_set_namespace)(conn.ioctx, c_ns.as_ptr()) };
    }
    Ok(conn)
}

/// One open RBD image.
pub struct RbdStorage {
    image: Image,
    held: Held,
    /// Size as last seen or set by us; reads past it return zeroes, writes past it grow it.
    size: AtomicU64,
    /// Serialises growing the image.
    grow: Mutex<()>,
    read_only: bool,
    spec: String,
    // Dropped after `image` is closed in `Drop::drop`.
    conn: Conn,
}

// SAFETY: librbd image handles are thread-safe: every rbd_aio_* call and the calls used here may be
// made from any thread concurrently (librbd serialises internally, as QEMU relies on). The raw
// handles are only closed in Drop, which has exclusive access.
unsafe impl Send for RbdStorage {}
// SAFETY: see Send; shared access only submits requests through the thread-safe C API.
unsafe impl Sync for RbdStorage {}

impl std::fmt::Debug for RbdStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdStorage")
            .field("image", &self.spec)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl RbdStorage {
    /// Opens an image by its `rbd:` name; read-write opens take the exclusive lock.
    pub fn open_name(s: &str, read_only: bool) -> std::result::Result<Self, RbdError> {
        Self::open(&RbdName::parse(s)?, read_only)
    }

    /// Opens an image; a snapshot always opens read-only.
    pub fn open(name: &RbdName, read_only: bool) -> std::result::Result<Self, RbdError> {
        let conn = connect(name)?;
        let api = conn.api;
        let read_only = read_only || name.snap.is_some();
        let spec = name.spec();
        let c_image = cstring(&name.image)?;
        let c_snap = name.snap.as_deref().map(cstring).transpose()?;
        let snap_ptr = c_snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut image: Image = ptr::null_mut();
        let open = if read_only {
            api.rbd_open_read_only
        } else {
            api.rbd_open
        };
        // SAFETY: valid ioctx, NUL-terminated names (or NULL snapshot), valid out-pointer.
        let r = unsafe { open(conn.ioctx, c_image.as_ptr(), &mut image, snap_ptr) };
        if r == -libc::ENOENT {
            return Err(RbdError::NoImage { image: spec });
        }
        if r < 0 {
            return Err(RbdError::Image {
                image: spec,
                source: errno(r),
            });
        }
        let mut st = RbdStorage {
            image,
            held: Held::None,
            size: AtomicU64::new(0),
            grow: Mutex::new(()),
            read_only,
            spec,
            conn,
        };
        let size = st.query_size().map_err(|source| RbdError::Image {
            image: st.spec.clone(),
            source,
        })?;
        st.size.store(size, Ordering::Release);
        if !read_only {
            st.held = lock::acquire(api, image, &st.spec)?;
        }
        Ok(st)
    }

    /// Creates a new image of `size` bytes (default features and object size from the cluster's
    /// configuration) and opens it read-write.
    pub fn create_name(s: &str, size: u64) -> std::result::Result<Self, RbdError> {
        let name = RbdName::parse(s)?;
        if name.snap.is_some() {
            return Err(RbdError::Create {
                image: name.spec(),
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        {
            let conn = connect(&name)?;
            let c_image = cstring(&name.image)?;
            let mut order: c_int = 0;
            // SAFETY: valid ioctx, NUL-terminated name, valid out-pointer.
            let r =
                unsafe { (conn.api.rbd_create)(conn.ioctx, c_image.as_ptr(), size, &mut order) };
            if r == -libc::EEXIST {
                return Err(RbdError::Exists { image: name.spec() });
            }
            if r < 0 {
                return Err(RbdError::Create {
                    image: name.spec(),
                    source: errno(r),
                });
            }
        }
        Self::open(&name, false)
    }

    /// `POOL/IMAGE[@SNAP]`.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Whether this handle holds the image's exclusive (or advisory) lock.
    pub fn holds_lock(&self) -> bool {
        !matches!(self.held, Held::None)
    }

    fn api(&self) -> &'static Api {
        self.conn.api
    }

    fn query_size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: open image, valid out-pointer.
        let r = unsafe { (self.api().rbd_get_size)(self.image, &mut size) };
        if r < 0 {
            return Err(errno(r));
        }
        Ok(size)
    }

    /// Submits one request built by `submit` and waits for it; the request's return value.
    fn aio(&self, submit: impl FnOnce(Completion) -> c_int) -> io::Result<isize> {
        let api = self.api();
        let mut c: Completion = ptr::null_mut();
        // SAFETY: no callback, no argument; valid out-pointer.
        let r = unsafe { (api.rbd_aio_create_completion)(ptr::null_mut(), None, &mut c) };
        if r < 0 {
            return Err(errno(r));
        }
        let r = submit(c);
        let ret = if r < 0 {
            Err(errno(r))
        } else {
            // SAFETY: `c` was submitted with a request; waiting keeps the buffers the request
            // uses borrowed until librbd is done with them.
            unsafe { (api.rbd_aio_wait_for_complete)(c) };
            // SAFETY: `c` has completed.
            let v = unsafe { (api.rbd_aio_get_return_value)(c) };
            if v < 0 {
                Err(errno(v))
            } else {
                Ok(v)
            }
        };
        // SAFETY: `c` is ours, completed (or never submitted), and not used afterwards.
        unsafe { (api.rbd_aio_release)(c) };
        ret
    }

    fn resize(&self, len: u64) -> io::Result<()> {
        // SAFETY: open image.
        let r = unsafe { (self.api().rbd_resize)(self.image, len) };
        if r < 0 {
            return Err(errno(r));
        }
        self.size.store(len, Ordering::Release);
        Ok(())
    }

    /// Grows the image to at least `end` bytes.
    fn ensure_size(&self, end: u64) -> io::Result<()> {
        if end <= self.size.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = self
            .grow
            .lock()
            .map_err(|_| io::Error::other("resize lock poisoned"))?;
        if end <= self.size.load(Ordering::Acquire) {
            return Ok(());
        }
        self.resize(end)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut pos = offset;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK);
            let n_usize =
                usize::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let (api, image) = (self.api(), self.image);
            // SAFETY: open image; no buffers involved.
            self.aio(|c| unsafe { (api.rbd_aio_write_zeroes)(image, pos, n_usize, c, 0, 0) })?;
            pos += n;
        }
        Ok(())
    }

    fn read_only_err(&self) -> io::Error {
        io::Error::from_raw_os_error(libc::EROFS)
    }
}

impl Drop for RbdStorage {
    fn drop(&mut self) {
        let api = self.api();
        if self.holds_lock() {
            // Make what was written durable before giving the image up (a clean close).
            let image = self.image;
            // SAFETY: open image.
            if let Err(e) = self.aio(|c| unsafe { (api.rbd_aio_flush)(image, c) }) {
                log::warn!("rbd:{}: flush on close failed: {e}", self.spec);
            }
        }
        lock::release(api, self.image, &self.held);
        // SAFETY: the image is open and no request is in flight (every call waits for its
        // completion, and we have exclusive access here).
        let r = unsafe { (api.rbd_close)(self.image) };
        if r < 0 {
            log::warn!("rbd:{}: close failed: {}", self.spec, errno(r));
        }
    }
}

fn total<T: std::ops::Deref<Target = [u8]>>(bufs: &[T]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

fn end_of(offset: u64, len: usize) -> Result<u64> {
    let l = u64::try_from(len).map_err(|_| StorageError::Overflow {
        offset,
        len: u64::MAX,
    })?;
    offset
        .checked_add(l)
        .ok_or(StorageError::Overflow { offset, len: l })
}

/// Zero-fills `bufs` from byte `from` on.
fn zero_from(bufs: &mut [IoSliceMut<'_>], mut from: usize) {
    for b in bufs.iter_mut() {
        if from >= b.len() {
            from -= b.len();
            continue;
        }
        b[from..].fill(0);
        from = 0;
    }
}

impl Storage for RbdStorage {
    fn len(&self) -> Result<u64> {
        let size = self.query_size().map_err(StorageError::Size)?;
        self.size.store(size, Ordering::Release);
        Ok(size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.readv_at(&mut [IoSliceMut::new(buf)], offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writev_at(&[IoSlice::new(buf)], offset)
    }

    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let all = total(bufs);
        end_of(offset, all)?;
        let (api, image) = (self.api(), self.image);
        let mut pos = offset;
        for chunk in bufs.chunks_mut(MAX_IOVECS) {
            let len = total(chunk);
            let size = self.size.load(Ordering::Acquire);
            let got = if len == 0 || pos >= size {
                0
            } else {
                let n = c_int::try_from(chunk.len()).expect("at most MAX_IOVECS buffers");
                let iov = chunk.as_ptr().cast::<libc::iovec>();
                // SAFETY: IoSliceMut is ABI-compatible with iovec; the buffers stay mutably
                // borrowed until `aio` has waited for the completion. librbd clips the read at
                // the image end and returns the byte count it filled.
                let r = self
                    .aio(|c| unsafe { (api.rbd_aio_readv)(image, iov, n, pos, c) })
                    .map_err(|source| StorageError::Read {
                        offset: pos,
                        len: all,
                        source,
                    })?;
                usize::try_from(r).unwrap_or(0).min(len)
            };
            if got < len {
                zero_from(chunk, got);
            }
            pos = end_of(pos, len)?;
        }
        Ok(())
    }

    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let all = total(bufs);
        let end = end_of(offset, all)?;
        let err = |pos: u64| {
            move |source| StorageError::Write {
                offset: pos,
                len: all,
                source,
            }
        };
        if self.read_only {
            return Err(err(offset)(self.read_only_err()));
        }
        if all == 0 {
            return Ok(());
        }
        self.ensure_size(end).map_err(err(offset))?;
        let (api, image) = (self.api(), self.image);
        let mut pos = offset;
        for chunk in bufs.chunks(MAX_IOVECS) {
            let len = total(chunk);
            let n = c_int::try_from(chunk.len()).expect("at most MAX_IOVECS buffers");
            let iov = chunk.as_ptr().cast::<libc::iovec>();
            // SAFETY: IoSlice is ABI-compatible with iovec; librbd only reads the buffers, which
            // stay borrowed until `aio` has waited for the completion.
            self.aio(|c| unsafe { (api.rbd_aio_writev)(image, iov, n, pos, c) })
                .map_err(err(pos))?;
            pos = end_of(pos, len)?;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        if self.read_only {
            return Err(StorageError::Size(self.read_only_err()));
        }
        let _g = self
            .grow
            .lock()
            .map_err(|_| StorageError::Size(io::Error::other("resize lock poisoned")))?;
        self.resize(len).map_err(StorageError::Size)
    }

    fn sync(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let (api, image) = (self.api(), self.image);
        // SAFETY: open image; no buffers involved.
        self.aio(|c| unsafe { (api.rbd_aio_flush)(image, c) })
            .map(|_| ())
            .map_err(StorageError::Flush)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let err = |source| StorageError::Discard {
            offset,
            len,
            source,
        };
        offset
            .checked_add(len)
            .ok_or(StorageError::Overflow { offset, len })?;
        if self.read_only {
            return Err(err(self.read_only_err()));
        }
        let size = self.size.load(Ordering::Acquire);
        if offset >= size {
            return Ok(());
        }
        self.zero_range(offset, len.min(size - offset)).map_err(err)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or(StorageError::Overflow { offset, len })?;
        let err = |source| StorageError::Write {
            offset,
            len: usize::try_from(len).unwrap_or(usize::MAX),
            source,
        };
        if self.read_only {
            return Err(err(self.read_only_err()));
        }
        if len == 0 {
            return Ok(());
        }
        self.ensure_size(end).map_err(err)?;
        self.zero_range(offset, len).map_err(err)
    }
}
