//! The vhost-user-blk backend: protocol glue over `vhost-user-backend`.
//!
//! [`backend::BlkBackend`] implements `VhostUserBackend`; [`serve`] accepts frontends on a
//! listening socket, one at a time, with a fresh backend (fresh vrings and memory) per
//! connection, so that a restarted QEMU can attach again.

pub mod backend;

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::image::{BlockImage, ImageError};
use backend::{BackendError, BlkBackend, BlkOptions};

/// Errors of the daemon loop.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("invalid device options")]
    Options(#[from] BackendError),
    /// vhost-user-backend's error type does not implement `std::error::Error`; we keep its text.
    #[error("vhost-user: {0}")]
    VhostUser(String),
    #[error("flush after disconnect failed")]
    Flush(#[source] ImageError),
}

fn vu_err(e: vhost_user_backend::Error) -> DaemonError {
    DaemonError::VhostUser(e.to_string())
}

/// Serves `image` on `listener`: one frontend at a time; after a frontend disconnects the image
/// is flushed and, unless `once`, the next connection is accepted.
pub fn serve(
    listener: UnixListener,
    image: Arc<dyn BlockImage>,
    opts: &BlkOptions,
    once: bool,
) -> Result<(), DaemonError> {
    let mut listener = Listener::from(listener);
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(image.clone(), opts, mem.clone())?);
        let mut daemon =
            VhostUserDaemon::new("vhost-user-qcow2".to_owned(), backend, mem).map_err(vu_err)?;
        log::info!("waiting for a frontend");
        daemon.start(&mut listener).map_err(vu_err)?;
        log::info!("frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => log::info!("frontend disconnected"),
            Err(e) => log::warn!("connection ended: {e}"),
        }
        // Dropping the daemon stops and joins the queue workers.
        drop(daemon);
        image.flush().map_err(DaemonError::Flush)?;
        if once {
            return Ok(());
        }
    }
}
