//! Accept loops for the public listeners: each accepted connection is
//! handed, in turn, to one of the workers (`workers.rs`): a thread with its
//! own single-threaded runtime that then serves it (`connection.rs`) and
//! owns its requests and upstream connections, so a request never hops
//! between threads.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::connection::{Accepted, Mode};
use crate::workers::Workers;

/// Accepts connections on `listener` until `shutdown` flips and hands each
/// to the next worker.
pub async fn serve(
    workers: Arc<Workers>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    mode: Mode,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, usually: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        // Out of this runtime's reactor, into the worker's.
        match stream.into_std() {
            Ok(stream) => workers.dispatch(Accepted {
                stream,
                peer,
                tls: tls.clone(),
                mode,
            }),
            Err(e) => tracing::debug!(%peer, error = %e, "accepted socket not handed over"),
        }
    }
}
