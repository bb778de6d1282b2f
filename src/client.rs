//! A KMS v2 gRPC client over a Unix socket: used by `kms-plugin status`, the load generator
//! and the integration tests, so they all speak to the plugin exactly as the apiserver does.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::proto::v2::key_management_service_client::KeyManagementServiceClient;
use crate::server::socket::SocketAddress;

/// The generated client type.
pub type Client = KeyManagementServiceClient<Channel>;

/// Connects to a plugin socket (path or `@abstract`) with a per-call timeout.
pub async fn connect(address: &SocketAddress, timeout: Duration) -> Result<Client, tonic::transport::Error> {
    let address = address.clone();
    // The URI is required by tonic but unused: the connector below dials the socket.
    let channel = Endpoint::from_static("http://localhost")
        .timeout(timeout)
        .connect_timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let address = address.clone();
            async move {
                let std = address.connect_std()?;
                std.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::from_std(std)?))
            }
        }))
        .await?;
    Ok(KeyManagementServiceClient::new(channel))
}
