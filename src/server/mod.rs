//! Serving: the gRPC server on the bound socket, and bounded graceful shutdown.

pub mod socket;

use std::future::Future;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio_stream::Stream;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::proto::v2::key_management_service_server::KeyManagementServiceServer;
use crate::service::KmsService;

/// Largest request the server decodes; anything bigger is refused before it is parsed.
/// Generous over the contract's limits (1 KiB ciphertext + 32 KiB annotations).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Which peers may connect, by SO_PEERCRED; empty lists allow everyone the socket's file
/// permissions allow.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl PeerPolicy {
    fn allows(&self, stream: &tokio::net::UnixStream) -> bool {
        if self.uids.is_empty() && self.gids.is_empty() {
            return true;
        }
        match stream.peer_cred() {
            Ok(cred) => {
                let ok = (self.uids.is_empty() || self.uids.contains(&cred.uid()))
                    && (self.gids.is_empty() || self.gids.contains(&cred.gid()));
                if !ok {
                    warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "connection refused by the peer allow-list");
                }
                ok
            }
            Err(e) => {
                warn!(error = %e, "could not read peer credentials; connection refused");
                false
            }
        }
    }
}

/// The accepted connections: refused peers are dropped here, before any HTTP/2 or gRPC work,
/// and an accept error (EMFILE …) pauses accepting for a moment instead of spinning.
struct Incoming {
    listener: tokio::net::UnixListener,
    peers: PeerPolicy,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stream for Incoming {
    type Item = std::io::Result<tokio::net::UnixStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(sleep) = self.backoff.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                self.backoff = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _)) if self.peers.allows(&stream) => return Poll::Ready(Some(Ok(stream))),
                Ok(_) => continue,
                Err(e) => {
                    warn!(error = %e, "accept failed; pausing 100 ms");
                    self.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                }
            }
        }
    }
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight calls finish for up
/// to `grace`, and returns. The caller owns the socket and removes it afterwards.
pub async fn serve(
    listener: tokio::net::UnixListener,
    service: KmsService,
    peers: PeerPolicy,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let grpc = KeyManagementServiceServer::new(service)
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES);
    let incoming = Incoming {
        listener,
        peers,
        backoff: None,
    };
    let server = Server::builder()
        .add_service(grpc)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        _ = shutdown => {}
    }
    info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: no new connections, draining in-flight calls"
    );
    let _ = stop_tx.send(());
    match tokio::time::timeout(grace, server).await {
        Ok(result) => result,
        Err(_) => {
            warn!("grace period elapsed with calls still in flight; closing them");
            Ok(())
        }
    }
}
