//! A raw HTTP/2 gRPC client for what a well-behaved client never sends: malformed protobuf,
//! oversized messages, and streams that stop half-way.

use bytes::Bytes;
use h2::client::SendRequest;
use tonic::codegen::http;

/// An HTTP/2 connection to the plugin's socket.
pub async fn connect(socket: &str) -> SendRequest<Bytes> {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (send, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A gRPC message frame: uncompressed flag, big-endian length, then `msg`.
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

fn request(method: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost/v2.KeyManagementService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Sends `body` (framed already) as one call and returns (grpc-status, grpc-message).
pub async fn call(send: &SendRequest<Bytes>, method: &str, body: Vec<u8>) -> (i32, String) {
    call_ending(send, method, body, true).await
}

/// Like [`call`], but with `end = false` the request body never ends.
pub async fn call_ending(send: &SendRequest<Bytes>, method: &str, body: Vec<u8>, end: bool) -> (i32, String) {
    let mut send = send.clone().ready().await.unwrap();
    let (response, mut stream) = send.send_request(request(method), false).unwrap();
    stream.send_data(Bytes::from(body), end).unwrap();
    let response = response.await.unwrap();
    let status = |h: &http::HeaderMap| {
        h.get("grpc-status").map(|code| {
            let message = h.get("grpc-message").map(|m| m.to_str().unwrap().to_string());
            (code.to_str().unwrap().parse().unwrap(), message.unwrap_or_default())
        })
    };
    if let Some(s) = status(response.headers()) {
        return s;
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    status(&trailers).expect("grpc-status")
}

/// Opens a call and sends `body` without ending the stream; the stream is kept open while the
/// returned handle lives.
pub async fn open_stalled(send: &SendRequest<Bytes>, method: &str, body: Vec<u8>) -> h2::SendStream<Bytes> {
    let mut send = send.clone().ready().await.unwrap();
    let (_response, mut stream) = send.send_request(request(method), false).unwrap();
    stream.send_data(Bytes::from(body), false).unwrap();
    stream
}
