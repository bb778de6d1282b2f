//! Any `:authority` on the Unix socket: gRPC clients built on C-core (Python's grpcio) send the
//! socket path, percent-encoded, and are served; what h2 still refuses (hostile raw HTTP/2) is
//! refused cleanly, counted and logged, and the plugin keeps serving.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::common::*;

fn python() -> String {
    std::env::var("KMS_TEST_PYTHON").unwrap_or_else(|_| {
        let local = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
        assert!(
            std::path::Path::new(local).exists(),
            "python not found: run integration/test.sh (it installs grpcio into .venv)"
        );
        local.to_string()
    })
}

/// Runs integration/grpcio_client.py against `socket`: its JSON answer, or the failure.
async fn grpcio(socket: &str) -> Result<serde_json::Value, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/integration/grpcio_client.py");
    let socket = socket.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .args([script, &socket])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(serde_json::from_str(stdout.trim()).unwrap())
}

/// The refusal counter, summed over the label sets that start with `labels`.
async fn refusals(plugin: &Plugin, labels: &str) -> f64 {
    plugin
        .metric(&format!("kms_plugin_http2_refusals_total{{{labels}"))
        .await
}

#[tokio::test]
async fn grpcio_status_encrypt_and_decrypt_work() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let key_id = status(&mut plugin.client().await).await.key_id;

    let answer = grpcio(&plugin.socket)
        .await
        .unwrap_or_else(|e| panic!("grpcio failed: {e}\n{}", plugin.logs()));
    assert_eq!(answer["status"]["version"], "v2");
    assert_eq!(answer["status"]["healthz"], "ok");
    assert_eq!(answer["status"]["key_id"], key_id.as_str());
    assert_eq!(answer["key_id"], key_id.as_str());
    assert_eq!(answer["round_trip"], true);

    // Nothing was refused, and the tonic client still works beside it.
    assert_eq!(refusals(&plugin, "").await, 0.0);
    let e = encrypt(&mut plugin.client().await, b"x").await;
    assert_eq!(decrypt(&mut plugin.client().await, &e).await.unwrap(), b"x");
    plugin.stop().await;
}

/// An HPACK literal field without indexing, both strings raw.
fn field(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00];
    for s in [name, value] {
        assert!(s.len() < 127 || s.len() > 200);
        if s.len() < 127 {
            out.push(s.len() as u8);
        } else {
            // 7-bit prefix integer: 127 then the rest in base 128.
            out.push(127);
            let mut rest = s.len() - 127;
            while rest >= 128 {
                out.push((rest % 128) as u8 | 0x80);
                rest /= 128;
            }
            out.push(rest as u8);
        }
        out.extend_from_slice(s);
    }
    out
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// Sends the preface, empty SETTINGS and `frames`; returns how the plugin ended the exchange:
/// (RST_STREAM or GOAWAY, error code), (HEADERS, 0) for a response's last HEADERS frame, or
/// None if the connection just closed.
async fn send_raw(socket: &str, frames: &[Vec<u8>]) -> Option<(u8, u32)> {
    let mut s = UnixStream::connect(socket).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    for f in frames {
        out.extend_from_slice(f);
    }
    s.write_all(&out).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut header = [0u8; 9];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read_exact(&mut header)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return None,
            Err(_) => panic!("no answer within 10 s"),
        }
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        if s.read_exact(&mut payload).await.is_err() {
            return None;
        }
        let word = |i: usize| u32::from_be_bytes(payload[i..i + 4].try_into().unwrap());
        match header[3] {
            RST_STREAM => return Some((RST_STREAM, word(0))),
            GOAWAY => return Some((GOAWAY, word(4))),
            HEADERS if header[4] & END_STREAM != 0 => return Some((HEADERS, 0)),
            _ => {}
        }
    }
}

fn request(authority: &[u8], path: Option<&[u8]>) -> Vec<u8> {
    let mut block = field(b":method", b"POST");
    block.extend(field(b":scheme", b"http"));
    block.extend(field(b":authority", authority));
    if let Some(path) = path {
        block.extend(field(b":path", path));
    }
    block.extend(field(b"content-type", b"application/grpc"));
    block.extend(field(b"te", b"trailers"));
    block
}

#[tokio::test]
async fn hostile_http2_is_refused_counted_and_logged_and_serving_goes_on() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let socket = plugin.socket.clone();
    let status_path: &[u8] = b"/v2.KeyManagementService/Status";

    // A percent-encoded authority, as C-core sends it, on a raw request: answered to the end
    // (the empty message is a valid StatusRequest).
    let ok = request(b"run%2Fkms.sock", Some(status_path));
    let call = [frame(HEADERS, END_HEADERS, 1, &ok), frame(0x0, END_STREAM, 1, &[0; 5])];
    assert_eq!(send_raw(&socket, &call).await, Some((HEADERS, 0)));
    assert_eq!(refusals(&plugin, "").await, 0.0);

    // No :path: the stream is refused with PROTOCOL_ERROR.
    let no_path = request(b"localhost", None);
    let answer = send_raw(&socket, &[frame(HEADERS, END_HEADERS | END_STREAM, 1, &no_path)]).await;
    assert_eq!(answer, Some((RST_STREAM, 0x1)));
    assert!(plugin.wait_log("HTTP/2 stream refused").await, "{}", plugin.logs());
    assert!(plugin.logs().contains("protocol_error"), "{}", plugin.logs());

    // A 20 KiB header: over the 16 KiB header list limit, h2 answers 431 itself.
    let mut huge = request(b"localhost", Some(status_path));
    huge.extend(field(b"x-padding", &vec![b'a'; 20 * 1024]));
    let (first, rest) = huge.split_at(10_000);
    let answer = send_raw(
        &socket,
        &[
            frame(HEADERS, END_STREAM, 1, first),
            frame(CONTINUATION, END_HEADERS, 1, rest),
        ],
    )
    .await;
    assert_eq!(answer, Some((HEADERS, 0)));

    // Broken HPACK (index 0) and a block over 64 KiB: the connection ends, with a GOAWAY.
    let answer = send_raw(&socket, &[frame(HEADERS, END_HEADERS, 1, &[0x80])]).await;
    assert!(matches!(answer, Some((GOAWAY, 1..))), "{answer:?}");
    let mut frames = vec![frame(HEADERS, 0, 1, &vec![0x82; 16 * 1024])];
    for _ in 0..4 {
        frames.push(frame(CONTINUATION, 0, 1, &vec![0x82; 16 * 1024]));
    }
    frames.push(frame(CONTINUATION, END_HEADERS, 1, &ok));
    let answer = send_raw(&socket, &frames).await;
    assert!(matches!(answer, None | Some((GOAWAY | RST_STREAM, 1..))), "{answer:?}");

    // Each refusal was counted, by frame and reason.
    eventually("refusals counted", || async {
        refusals(&plugin, "frame=\"rst_stream\",reason=\"protocol_error\"").await == 1.0
            && refusals(&plugin, "frame=\"response\",reason=\"status_431\"").await == 1.0
            && refusals(&plugin, "frame=\"goaway\"").await >= 1.0
    })
    .await;

    // The plugin keeps serving both kinds of client.
    let mut c = plugin.client().await;
    let e = encrypt(&mut c, b"still here").await;
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), b"still here");
    grpcio(&plugin.socket).await.unwrap();
    plugin.stop().await;
}
