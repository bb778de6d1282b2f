//! Connections on the gRPC socket, in a bounded table: no peer can use up the process's file
//! descriptors or memory with connections, and a client that connects and calls always gets in.
//!
//! - At most `max` connections. When the table is full, a new connection evicts one that has no
//!   call in progress, told apart by the peer's uid: one of the newcomer's own uid if it has
//!   any, else one of the uid holding the most connections; among those, first one that never
//!   made a call, else the one idle longest. So a peer flooding the table only ever displaces
//!   its own connections, never another uid's (the apiserver's). If no connection can go, the
//!   new one is closed.
//! - A connection that has not sent the 24-byte HTTP/2 preface within [`HANDSHAKE_TIMEOUT`] is
//!   closed (half-open or silent peers).
//! - A connection with no call for [`IDLE_TIMEOUT`] is closed. The apiserver calls Status at
//!   least once a minute, far inside it.
//!
//! Closing is `shutdown(2)` on a duplicate of the socket's descriptor: the peer sees EOF and the
//! HTTP/2 server ends the connection as if the peer had left.
//!
//! A closed connection still holds its descriptors until its task has seen the EOF. Accepting
//! is faster than that under a connection flood (measured: 20,000 descriptors, the process
//! limit, within 4 s from one Python loop of another uid against a 16-connection table, after
//! which every newcomer, the apiserver's too, was dropped). So the acceptor waits while
//! [`Connections::max_live`] accepted connections are still alive, closed or not: descriptors
//! stay bounded, and newcomers wait in the listen backlog for a moment instead of being reset.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tracing::{debug, warn};

/// A connection that has sent fewer bytes than the HTTP/2 client preface by then is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection with no call for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Length of the HTTP/2 client connection preface.
const PREFACE_LEN: u64 = 24;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// One connection's counters, shared by its stream, the table and the calls on it.
pub struct Conn {
    id: u64,
    /// The peer's uid (SO_PEERCRED), None if unknown.
    uid: Option<u32>,
    /// A duplicate of the socket, to shut it down from outside the connection's task.
    fd: OwnedFd,
    opened: Instant,
    bytes_read: AtomicU64,
    calls: AtomicU64,
    active: AtomicU32,
    /// Milliseconds since `opened` at the last call's start or end.
    last_call_ms: AtomicU64,
    closed: AtomicBool,
}

impl Conn {
    /// Who is on the other end, for per-peer shares.
    pub fn peer(&self) -> crate::shares::Peer {
        crate::shares::Peer {
            uid: self.uid,
            conn: self.id,
        }
    }

    /// Marks a call in progress until the returned guard drops.
    pub fn begin_call(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Relaxed);
        self.active.fetch_add(1, Relaxed);
        self.touch();
        CallGuard(Arc::clone(self))
    }

    fn touch(&self) {
        self.last_call_ms
            .store(self.opened.elapsed().as_millis() as u64, Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.opened
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_call_ms.load(Relaxed)))
    }

    /// Ends the connection: the peer sees EOF, and so does the HTTP/2 server reading it.
    fn close(&self) {
        if !self.closed.swap(true, Relaxed) {
            let _ = rustix::net::shutdown(&self.fd, rustix::net::Shutdown::Both);
        }
    }
}

/// Ends a call on a connection (see [`Conn::begin_call`]).
pub struct CallGuard(Arc<Conn>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
        self.0.touch();
    }
}

/// What each request on a connection carries in its extensions (tonic's `ConnectInfo`).
#[derive(Clone)]
pub struct ConnInfo(pub Arc<Conn>);

/// The table of open connections.
pub struct Connections {
    max: usize,
    table: Mutex<Table>,
    open: Gauge,
    closed: Family<Reason, Counter>,
    /// Streams and connections the HTTP/2 layer refused (see `server::http2`).
    http2_refusals: Arc<super::http2::refusals::Refusals>,
    /// Accepted connections not yet dropped by the server (in the table, or closed and not
    /// yet reaped), and the acceptor waiting for one of them to go.
    live: Mutex<(usize, Option<Waker>)>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    conns: HashMap<u64, Arc<Conn>>,
}

impl Connections {
    /// A table of at most `max` connections (at least 1).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            table: Mutex::new(Table::default()),
            open: Gauge::default(),
            closed: Family::default(),
            http2_refusals: Arc::default(),
            live: Mutex::new((0, None)),
        })
    }

    /// Accepted connections that may be alive at once: the table, and as many closed ones
    /// waiting for their task to see the EOF.
    pub fn max_live(&self) -> usize {
        self.max * 2
    }

    /// Whether another connection may be accepted now; if not, `cx` is woken when one goes.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if live.0 < self.max_live() {
            return Poll::Ready(());
        }
        live.1 = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Registers the connection metrics into `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "socket_connections",
            "Open connections on the gRPC socket",
            self.open.clone(),
        );
        registry.register(
            "socket_connections_closed",
            "Connections the plugin closed, by reason (evicted, refused, handshake_timeout, idle_timeout)",
            self.closed.clone(),
        );
        self.http2_refusals.register_metrics(registry);
    }

    /// The counter of HTTP/2 refusals, shared by every connection.
    pub fn http2_refusals(&self) -> Arc<super::http2::refusals::Refusals> {
        Arc::clone(&self.http2_refusals)
    }

    fn count(&self, reason: &'static str) {
        self.closed.get_or_create(&Reason { reason }).inc();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a new connection into the table, evicting an idle one if it is full; None if
    /// every connection has a call in progress (the new one is then dropped, i.e. closed).
    pub fn admit(self: &Arc<Self>, stream: UnixStream) -> Option<Tracked> {
        let fd = match stream.as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e, "could not duplicate a connection's descriptor; connection closed");
                return None;
            }
        };
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        let mut table = self.lock();
        if table.conns.len() >= self.max {
            let victim = victim(&table, uid);
            match victim {
                Some(victim) => {
                    table.conns.remove(&victim.id);
                    self.count("evicted");
                    victim.close();
                    debug!(
                        idle_ms = victim.idle_for().as_millis() as u64,
                        "connection table full; closed the idlest connection"
                    );
                }
                None => {
                    self.count("refused");
                    warn!(
                        max = self.max,
                        "connection table full and every connection has a call in progress; new connection closed"
                    );
                    return None;
                }
            }
        }
        table.next_id += 1;
        let conn = Arc::new(Conn {
            id: table.next_id,
            uid,
            fd,
            opened: Instant::now(),
            bytes_read: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            active: AtomicU32::new(0),
            last_call_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        table.conns.insert(conn.id, Arc::clone(&conn));
        self.open.set(table.conns.len() as i64);
        self.live.lock().unwrap_or_else(PoisonError::into_inner).0 += 1;
        Some(Tracked {
            stream,
            conn,
            table: Arc::clone(self),
        })
    }

    /// Closes connections past the handshake or idle timeout, once a second, until dropped.
    pub async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let table = self.lock();
            for conn in table.conns.values() {
                if conn.closed.load(Relaxed) {
                    continue;
                }
                let reason = if conn.bytes_read.load(Relaxed) < PREFACE_LEN && conn.opened.elapsed() > HANDSHAKE_TIMEOUT
                {
                    "handshake_timeout"
                } else if conn.active.load(Relaxed) == 0 && conn.idle_for() > IDLE_TIMEOUT {
                    "idle_timeout"
                } else {
                    continue;
                };
                // Counted first: the peer may look at the metrics as soon as it sees EOF.
                self.count(reason);
                conn.close();
                debug!(reason, "connection closed");
            }
        }
    }

    /// Open connections now.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The connection to close for a newcomer of `uid` (see the module documentation).
fn victim(table: &Table, uid: Option<u32>) -> Option<Arc<Conn>> {
    let idlest = |of: Option<u32>| {
        table
            .conns
            .values()
            .filter(|c| c.uid == of && c.active.load(Relaxed) == 0)
            .max_by_key(|c| (c.calls.load(Relaxed) == 0, c.idle_for()))
            .cloned()
    };
    idlest(uid).or_else(|| {
        let mut held: HashMap<Option<u32>, usize> = HashMap::new();
        for c in table.conns.values() {
            *held.entry(c.uid).or_default() += 1;
        }
        let hog = held.into_iter().max_by_key(|(_, n)| *n)?.0;
        idlest(hog)
    })
}

/// An accepted connection in the table; leaves the table when the server drops it.
pub struct Tracked {
    stream: UnixStream,
    conn: Arc<Conn>,
    table: Arc<Connections>,
}

impl Tracked {
    /// The peer's uid (SO_PEERCRED), None if unknown.
    pub fn uid(&self) -> Option<u32> {
        self.conn.uid
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut table = self.table.lock();
        table.conns.remove(&self.conn.id);
        self.table.open.set(table.conns.len() as i64);
        drop(table);
        let mut live = self.table.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.0 = live.0.saturating_sub(1);
        if let Some(acceptor) = live.1.take() {
            acceptor.wake();
        }
    }
}

impl tonic::transport::server::Connected for Tracked {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo(Arc::clone(&self.conn))
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.conn.bytes_read.fetch_add(read, Relaxed);
        }
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
