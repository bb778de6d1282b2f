//! What the HTTP/2 server reads and writes on each connection, adjusted and watched.
//!
//! **Why rewrite `:authority`.** gRPC clients built on C-core (Python's grpcio, Ruby, PHP, C++)
//! send a Unix socket target's path, percent-encoded, as `:authority`
//! (`unix:/run/kms.sock` → `run%2Fkms.sock`). h2 parses `:authority` as a URI authority, which
//! allows no `%` in a host, and resets the stream with PROTOCOL_ERROR before any of our code
//! runs; it has no option to skip that check. On a Unix socket the authority means nothing: the
//! peer is whoever the socket's permissions and the SO_PEERCRED allow-list let in. So
//! [`inbound`] rewrites, on the way in, every `:authority` that h2 would refuse into a valid
//! host name of the same length (`run-2Fkms.sock`), and leaves every other byte alone.
//!
//! **Why this is safe.** Header blocks are HPACK-compressed against a dynamic table that the
//! client and h2 must keep identical. A rewritten value has the same decoded length, so it makes
//! a table entry of the same size: the two tables evict the same entries and every index still
//! points where the client meant ([`hpack`]). Only whole header blocks are buffered, at most
//! [`inbound::MAX_BLOCK`] bytes per connection; DATA passes through as it comes. Whatever the
//! rewriter cannot follow (not HTTP/2, a broken block, an oversized one) makes it stop and copy
//! the rest of the connection untouched, so h2 refuses it exactly as it would have.
//!
//! **Refusals are visible.** h2 logs its refusals at debug only. [`refusals`] watches what the
//! server writes for RST_STREAM and GOAWAY with an error code, and for responses h2 makes
//! itself (431 for headers over the limit, [`responses`]), counts them
//! (`kms_plugin_http2_refusals_total{frame,reason}`) and logs them at warn (at most 20 lines a
//! second, as the edge layer does).

pub mod hpack;
pub mod huffman;
pub mod inbound;
pub mod refusals;
pub mod responses;

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use inbound::Inbound;
use refusals::{Outbound, Refusals};

/// An accepted connection as the HTTP/2 server sees it (see the module documentation).
pub struct Watched<T> {
    inner: T,
    uid: Option<u32>,
    inbound: Inbound,
    /// Bytes for the server to read, from `pending_at` on.
    pending: Vec<u8>,
    pending_at: usize,
    eof: bool,
    logged_rewrite: bool,
    outbound: Outbound,
    refusals: Arc<Refusals>,
}

impl<T> Watched<T> {
    /// Wraps a connection from peer `uid` (for the log lines); refusals count into `refusals`.
    pub fn new(inner: T, uid: Option<u32>, refusals: Arc<Refusals>) -> Self {
        Self {
            inner,
            uid,
            inbound: Inbound::default(),
            pending: Vec::new(),
            pending_at: 0,
            eof: false,
            logged_rewrite: false,
            outbound: Outbound::default(),
            refusals,
        }
    }

    fn note_inbound(&mut self) {
        if self.inbound.rewritten() > 0 && !self.logged_rewrite {
            self.logged_rewrite = true;
            debug!(
                uid = self.uid,
                "accepting a client's :authority that is not a host name (a C-core gRPC client's socket path)"
            );
        }
        if let Some(why) = self.inbound.gave_up() {
            debug!(
                uid = self.uid,
                why, "not following this connection's header blocks any more"
            );
        }
    }

    fn observe_written(&mut self, bytes: &[u8]) {
        let (refusals, uid) = (&self.refusals, self.uid);
        self.outbound.observe(bytes, |r| refusals.record(r, uid));
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Watched<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pending_at < this.pending.len() {
                let k = (this.pending.len() - this.pending_at).min(buf.remaining());
                buf.put_slice(&this.pending[this.pending_at..this.pending_at + k]);
                this.pending_at += k;
                if this.pending_at == this.pending.len() {
                    // A large header block passed: do not keep its buffer for the connection's life.
                    if this.pending.capacity() > 16 * 1024 {
                        this.pending = Vec::new();
                    }
                    this.pending.clear();
                    this.pending_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.inbound.passing_through() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut scratch = [0u8; 8192];
            let mut read = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let gave_up = this.inbound.gave_up().is_some();
            if read.filled().is_empty() {
                this.inbound.finish(&mut this.pending);
                this.eof = true;
            } else {
                this.inbound.push(read.filled(), &mut this.pending);
            }
            if !gave_up {
                this.note_inbound();
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.observe_written(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let mut n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        let written = n;
        for b in bufs {
            let k = n.min(b.len());
            self.observe_written(&b[..k]);
            n -= k;
            if n == 0 {
                break;
            }
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_see_the_rewritten_stream_and_writes_are_watched() {
        let (mut client, server) = tokio::io::duplex(64);
        let refusals = Arc::new(Refusals::default());
        let mut watched = Watched::new(server, Some(7), Arc::clone(&refusals));
        // :authority (static name 1), literal with indexing, as a C-core client sends it.
        let mut block = vec![0x41, 14];
        block.extend_from_slice(b"run%2Fkms.sock");
        let mut sent = inbound::PREFACE.to_vec();
        sent.extend_from_slice(&[0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, 1]);
        sent.extend_from_slice(&block);
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(5) {
                client.write_all(piece).await.unwrap();
            }
            client.shutdown().await.unwrap();
            client
        });
        let mut read = Vec::new();
        watched.read_to_end(&mut read).await.unwrap();
        let mut expected = inbound::PREFACE.to_vec();
        expected.extend_from_slice(&[0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0x41, 14]);
        expected.extend_from_slice(b"run-2Fkms.sock");
        assert_eq!(read, expected);

        // The server resets stream 1 with PROTOCOL_ERROR, written in two pieces.
        let rst = [0, 0, 4, 0x3, 0, 0, 0, 0, 1, 0, 0, 0, 1];
        watched.write_all(&rst[..6]).await.unwrap();
        watched.write_all(&rst[6..]).await.unwrap();
        assert_eq!(refusals.count("rst_stream", "protocol_error"), 1);
        let mut client = writer.await.unwrap();
        let mut got = [0u8; 13];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, rst);
    }
}
