//! The vhost-user side of the daemon: protocol, queue threads, rings and guest memory.
//!
//! The `vhost` crate reads and answers messages; [`handler::Connection`] implements its
//! `VhostUserBackendReqHandler` (our own handler, since vhost-user-backend has no in-flight
//! tracking, config-change messages or dirty logging). [`serve`] accepts frontends on a
//! listening socket, one at a time; each connection gets fresh rings and memory, while the
//! device model ([`crate::virtio_blk::device::BlkDevice`]) lives for the whole export.
//!
//! Threads: the caller's thread runs the accept loop and the connection's message loop; each
//! started queue has one worker thread (`vq<N>`, see [`vring`]).

pub mod backend_channel;
pub mod control;
pub mod handler;
pub mod inflight;
pub mod memory;
pub mod vring;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::image::ImageError;
use crate::virtio_blk::device::BlkDevice;
use handler::Connection;

/// Errors of the daemon loop.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("cannot accept a connection")]
    Accept(#[source] std::io::Error),
    #[error("flush after disconnect failed")]
    Flush(#[source] ImageError),
}

/// Whether a message-loop error ends the connection (the stream may be out of step, or gone)
/// rather than being one refused request.
fn ends_connection(e: &VuError) -> bool {
    !matches!(
        e,
        VuError::ReqHandlerError(_)
            | VuError::InvalidParam
            | VuError::InvalidOperation(_)
            | VuError::InactiveFeature(_)
            | VuError::InactiveOperation(_)
    )
}

/// One exported device and the frontend currently attached to it.
pub struct Export {
    dev: Arc<BlkDevice>,
    current: Mutex<Option<Arc<Connection>>>,
    /// The image and socket names, for `query` and the statistics.
    names: std::sync::OnceLock<(String, String)>,
}

impl Export {
    /// An export of `dev` with no frontend yet.
    pub fn new(dev: Arc<BlkDevice>) -> Self {
        Self {
            dev,
            current: Mutex::new(None),
            names: std::sync::OnceLock::new(),
        }
    }

    /// Names the image and the socket (once) for `query`.
    pub fn set_names(&self, image: &str, socket: &str) {
        let _ = self.names.set((image.to_owned(), socket.to_owned()));
    }

    /// The image and socket names given to [`Export::set_names`] (empty if none).
    pub fn names(&self) -> (&str, &str) {
        self.names
            .get()
            .map_or(("", ""), |(i, s)| (i.as_str(), s.as_str()))
    }

    /// The device.
    pub fn device(&self) -> &Arc<BlkDevice> {
        &self.dev
    }

    /// The attached frontend's connection, if any.
    pub fn connection(&self) -> Option<Arc<Connection>> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn attach(&self, conn: Option<Arc<Connection>>) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = conn;
    }
}

/// Serves one connected frontend until it goes away; stops its queues afterwards.
pub fn serve_connection(stream: std::os::unix::net::UnixStream, export: &Export) {
    let conn = Arc::new(Connection::new(export.dev.clone()));
    let raw = stream.as_raw_fd();
    let mut req = BackendReqHandler::from_stream(stream, conn.clone());
    export.attach(Some(conn.clone()));
    loop {
        // The vhost crate keeps the backend-request socket to itself: take a duplicate first.
        match backend_channel::peek_backend_fd(raw) {
            Ok(Some(sock)) => conn.set_backend_channel(backend_channel::BackendChannel::new(sock)),
            Ok(None) => {}
            Err(e) => log::debug!("peek: {e}"),
        }
        match req.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected | VuError::PartialMessage) => {
                log::info!("frontend disconnected");
                break;
            }
            Err(e) if ends_connection(&e) => {
                log::warn!("connection ended: {e}");
                break;
            }
            Err(e) => log::warn!("request refused: {e}"),
        }
    }
    export.attach(None);
    let stopped = conn.stop_all();
    log::debug!("stopped {stopped} queue(s)");
}

/// Serves the export on `listener`: one frontend at a time; after a frontend disconnects the
/// image is flushed and, unless `once`, the next connection is accepted.
pub fn serve(listener: UnixListener, export: Arc<Export>, once: bool) -> Result<(), DaemonError> {
    loop {
        log::info!("waiting for a frontend");
        let (stream, _) = listener.accept().map_err(DaemonError::Accept)?;
        log::info!("frontend connected");
        serve_connection(stream, &export);
        export.dev.image().flush().map_err(DaemonError::Flush)?;
        if once {
            return Ok(());
        }
    }
}
