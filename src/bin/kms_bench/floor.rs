//! floor: the cheapest possible request/response over a Unix socket with tokio on both ends.
//!
//! An echo server on its own multi-threaded runtime (like the plugin's) and its own OS threads
//! answers every `request_bytes` read with `response_bytes`. Each worker owns one connection
//! (a raw stream has no multiplexing). No framing, no HTTP/2, no protobuf, no crypto: what is
//! left is syscalls, wake-ups and scheduling, the part no plugin can avoid.

use std::collections::HashMap;
use std::path::PathBuf;

use kms_plugin::proto::v2::{DecryptRequest, DecryptResponse};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::Args;
use crate::load::{self, Stop, Worker};
use crate::plugin::TempDir;
use crate::report::{Extra, Report};

/// gRPC framing: 1-byte compression flag and 4-byte length before each message.
const GRPC_PREFIX: usize = 5;

/// Sizes of this plugin's Decrypt for a 32-byte seed: a 61-byte envelope, a 36-byte uid, a
/// 38-byte local key_id and a 60-byte wrapped KEK under an 18-byte annotation key.
fn default_sizes() -> (usize, usize) {
    let request = DecryptRequest {
        ciphertext: vec![0u8; 61].into(),
        uid: "0".repeat(36),
        key_id: "k".repeat(38),
        annotations: HashMap::from([("kek.kms-plugin.dev".to_string(), vec![0u8; 60].into())]),
    };
    let response = DecryptResponse {
        plaintext: vec![0u8; 32].into(),
    };
    (
        GRPC_PREFIX + request.encoded_len(),
        GRPC_PREFIX + response.encoded_len(),
    )
}

struct FloorWorker {
    stream: UnixStream,
    request: Vec<u8>,
    response: Vec<u8>,
}

impl Worker for FloorWorker {
    async fn call(&mut self) -> Result<(), String> {
        self.stream.write_all(&self.request).await.map_err(io_code)?;
        self.stream.read_exact(&mut self.response).await.map_err(io_code)?;
        Ok(())
    }
}

fn io_code(e: std::io::Error) -> String {
    format!("Io{:?}", e.kind())
}

/// Starts the echo server on its own threads; returns once it listens.
fn start_echo(path: PathBuf, threads: usize, request_bytes: usize, response_bytes: usize) -> Result<(), String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("floor-echo".into())
        .spawn(move || {
            let mut builder = match threads {
                1 => tokio::runtime::Builder::new_current_thread(),
                0 => tokio::runtime::Builder::new_multi_thread(),
                n => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(n);
                    b
                }
            };
            let runtime = match builder.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("echo runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::UnixListener::bind(&path) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("bind {}: {e}", path.display())));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                // Runs until the process exits.
                while let Ok((mut stream, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let mut request = vec![0u8; request_bytes];
                        let response = vec![0u8; response_bytes];
                        while stream.read_exact(&mut request).await.is_ok() {
                            if stream.write_all(&response).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        })
        .map_err(|e| format!("echo thread: {e}"))?;
    ready_rx.recv().map_err(|_| "echo server thread ended".to_string())?
}

pub async fn run(args: &Args) -> Result<Report, String> {
    let (default_request, default_response) = default_sizes();
    let request_bytes = args.request_bytes.unwrap_or(default_request).max(1);
    let response_bytes = args.response_bytes.unwrap_or(default_response).max(1);
    let dir = TempDir::new("floor")?;
    let path = dir.path().join("echo.sock");
    start_echo(path.clone(), args.echo_threads, request_bytes, response_bytes)?;
    let mut workers = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|e| format!("connect {}: {e}", path.display()))?;
        workers.push(FloorWorker {
            stream,
            request: vec![0x5a; request_bytes],
            response: vec![0u8; response_bytes],
        });
    }
    let stop = match args.count {
        Some(n) => Stop::Count(n),
        None => Stop::After(args.duration),
    };
    let measured = load::run(workers, args.warmup, stop).await;
    Ok(Report::new("floor", args.concurrency, args.concurrency, measured)
        .extra("threads", Extra::Int(args.threads as u64))
        .extra("request_bytes", Extra::Int(request_bytes as u64))
        .extra("response_bytes", Extra::Int(response_bytes as u64)))
}
