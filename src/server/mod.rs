//! Serving: the gRPC server on the bound socket, its limits, and bounded graceful shutdown.
//!
//! What peers with access to the socket can make the process hold, at most (SECURITY.md):
//! `socket.max_connections` connections ([`connections`]) of [`MAX_STREAMS_PER_CONNECTION`]
//! calls each, [`MAX_REQUEST_BYTES`] per request, [`CONNECTION_WINDOW`] bytes per connection
//! received but not yet read, and [`edge::MAX_WAITING_BODIES`] calls waiting for the rest of
//! their body, each for at most [`edge::BODY_TIMEOUT`]. A call held open costs about 14 KiB in
//! all (measured); calls past their body wait only in the unwrap queue (`keys::cache`). A
//! connection also holds at most [`http2::inbound::MAX_BLOCK`] bytes of one header block while
//! [`http2`] checks its `:authority`.

pub mod connections;
pub mod edge;
pub mod http2;
pub mod socket;

use std::future::Future;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::sync::Arc;

use tokio_stream::Stream;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::proto::v2::key_management_service_server::KeyManagementServiceServer;
use crate::service::KmsService;
use connections::{Connections, Tracked};

/// Aborts a background task when the serving function returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub use crate::contract::MAX_REQUEST_BYTES;
/// Concurrent calls (HTTP/2 streams) a client may open on one connection; more wait in the
/// client. The apiserver multiplexes every call on one connection. 100 is what grpc-go assumes
/// before the server's SETTINGS arrive, so a burst on a new connection is never refused.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// HTTP/2 flow-control windows: bytes a peer may send ahead of what the server has read.
pub const CONNECTION_WINDOW: u32 = 64 * 1024;
pub const STREAM_WINDOW: u32 = 32 * 1024;
/// The longest a call may take, body included; the apiserver's own deadline is shorter.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Which peers may connect, by SO_PEERCRED (the peer's uid and primary gid when it connected,
/// as the kernel recorded them: no race with the peer changing identity later). Empty lists
/// allow everyone the socket's file permissions allow; otherwise a peer is admitted when its uid
/// is in `uids` OR its primary gid is in `gids`. Supplementary groups are not consulted: the
/// kernel does not record them with the connection, and reading them from /proc would race.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

/// Where the server reads the [`PeerPolicy`] in force, at every accepted connection: a
/// configuration reload replaces it with the rest of what the process runs with.
pub type PeerSource = Box<dyn Fn() -> Arc<PeerPolicy> + Send + Sync>;

impl PeerPolicy {
    fn allows(&self, stream: &tokio::net::UnixStream) -> bool {
        if self.uids.is_empty() && self.gids.is_empty() {
            return true;
        }
        match stream.peer_cred() {
            Ok(cred) => {
                let ok = self.uids.contains(&cred.uid()) || self.gids.contains(&cred.gid());
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
    peers: PeerSource,
    connections: Arc<Connections>,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stream for Incoming {
    type Item = std::io::Result<http2::Watched<Tracked>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(sleep) = self.backoff.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                self.backoff = None;
            }
            // Bounded descriptors: no accept while too many connections are still alive.
            ready!(self.connections.poll_room(cx));
            match ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _)) if (self.peers)().allows(&stream) => {
                    if let Some(tracked) = self.connections.admit(stream) {
                        let uid = tracked.uid();
                        let refusals = self.connections.http2_refusals();
                        return Poll::Ready(Some(Ok(http2::Watched::new(tracked, uid, refusals))));
                    }
                }
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
    peers: PeerSource,
    connections: Arc<Connections>,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The edge, outermost first; each layer is one file in edge/.
    // 1. open calls: a call over the limits is refused before anything else is spent on it
    //    (counted and logged there, so not again by 2);
    // 2. refusals: counts and logs what the layers below and tonic refuse before a handler runs;
    // 3. size limit: tonic's OutOfRange for an oversized request becomes ResourceExhausted, below
    //    2, so the refusal is counted under the code the caller gets;
    // 4. in progress: from a complete request to a ready response, the call protects its
    //    connection from eviction;
    // 5. body deadline: innermost, on the body the handler reads; its refusals reach 2.
    let log_budget = Arc::new(edge::LogBudget::default());
    let edge = tower::ServiceBuilder::new()
        .layer(edge::OpenCallsLayer::new(
            service.call_counter(),
            Arc::clone(&log_budget),
        ))
        .layer(edge::RefusalsLayer::new(service.call_counter(), log_budget))
        .layer(edge::SizeLimitLayer::new(MAX_REQUEST_BYTES))
        .layer(edge::InProgressLayer)
        .layer(edge::BodyDeadlineLayer::default());
    let grpc = KeyManagementServiceServer::new(service)
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES);
    let sweeper = tokio::spawn(Arc::clone(&connections).sweep());
    let _stop_sweeper = AbortOnDrop(sweeper);
    let incoming = Incoming {
        listener,
        peers,
        connections,
        backoff: None,
    };
    let server = Server::builder()
        .timeout(CALL_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .initial_stream_window_size(STREAM_WINDOW)
        .http2_max_header_list_size(16 * 1024)
        // Finds peers that stopped answering (frozen, or gone without closing).
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(edge)
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
