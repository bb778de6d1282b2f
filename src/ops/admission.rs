//! Which connections the loopback HTTP endpoint keeps when a local process floods it.
//!
//! Any local process can connect to the port, so at most [`MAX_CONNECTIONS`] are open. The
//! kubelet's probe connects and then, on a busy node some milliseconds later, sends its whole
//! request in one write. Until then it looks exactly like a flooder's silent connection. So, with
//! every slot taken:
//!
//! - A connection that has sent (part of) its request is never closed to make room. It keeps its
//!   own deadlines: its head must be whole [`HEAD_DEADLINE`] after its first byte (on loopback a
//!   head arrives in one segment, so a slower one is a slow-loris).
//! - A silent connection is never closed during its first [`GRACE`]: a probe's request may be on
//!   its way. Past it, silent sockets must not hold the port, so the newest one past its grace is
//!   closed for a newcomer; older ones keep their slot until their deadline.
//! - Otherwise the newcomer is not closed (it may be the probe, silent for a few more
//!   milliseconds) but waits, with those behind it in the kernel's accept queue, for a slot to end
//!   or to pass its grace: at most one [`GRACE`] while any slot is silent.
//! - A newcomer that has already hung up (a connect-and-drop churn) takes no slot at all.
//!
//! So a probe whose request follows its connect within the grace is never closed, and it waits
//! only for the connections queued ahead of it (each needs at most one grace of a slot).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustix::io::Errno;
use rustix::net::RecvFlags;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::debug;

/// Most concurrent HTTP connections.
pub const MAX_CONNECTIONS: usize = 64;
/// How long after admission a silent connection is protected: a probe sends well within it.
pub const GRACE: Duration = Duration::from_millis(100);
/// How long a request head may take after its first byte.
pub const HEAD_DEADLINE: Duration = Duration::from_millis(250);

/// What a connection has sent, as its socket shows without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Nothing yet.
    Nothing,
    /// At least the first byte of its request.
    Request,
    /// It hung up.
    Closed,
}

/// Peeks at `socket` without waiting or consuming anything.
pub fn sent(socket: impl AsFd) -> Sent {
    match rustix::net::recv(socket, &mut [0u8; 1], RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((0, _)) => Sent::Closed,
        Ok(_) => Sent::Request,
        Err(e) if e == Errno::AGAIN || e == Errno::INTR => Sent::Nothing,
        Err(_) => Sent::Closed,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// The endpoint's connection counters.
#[derive(Clone, Default)]
pub struct Counters {
    closed: Family<Reason, Counter>,
    waited: Counter,
}

impl Counters {
    /// Registers the counters into `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_connections_closed",
            "Metrics/health connections the plugin closed, by reason (evicted, deadline)",
            self.closed.clone(),
        );
        registry.register(
            "http_connections_waited",
            "Metrics/health connections that found every slot protected and waited for one",
            self.waited.clone(),
        );
    }

    /// Counts a connection closed by the plugin for `reason`.
    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&Reason { reason }).inc();
    }
}

/// What a connection's task holds: it marks the request as begun, and wakes the table when the
/// task ends (it is dropped with the task, also when aborted).
pub struct Ticket {
    sent: Arc<AtomicBool>,
    ended: Arc<Notify>,
}

impl Ticket {
    /// The request's first byte arrived: from now on the connection is never evicted.
    pub fn request_began(&self) {
        self.sent.store(true, Ordering::Relaxed);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.ended.notify_one();
    }
}

struct Slot {
    since: Instant,
    sent: Arc<AtomicBool>,
    task: AbortHandle,
}

/// The open connections; used only by the endpoint's accept loop.
pub struct Table {
    slots: Vec<Slot>,
    ended: Arc<Notify>,
    counters: Counters,
}

impl Table {
    /// An empty table counting into `counters`.
    pub fn new(counters: Counters) -> Self {
        Self {
            slots: Vec::with_capacity(MAX_CONNECTIONS),
            ended: Arc::new(Notify::new()),
            counters,
        }
    }

    /// Returns once a slot is free for a newcomer, evicting only as the module docs say.
    pub async fn make_room(&mut self) {
        let mut waited = false;
        loop {
            if self.has_room().await {
                return;
            }
            let now = Instant::now();
            let slots = self.slots.iter().map(|s| (s.since, s.sent.load(Ordering::Relaxed)));
            if let Some(i) = victim(slots, now) {
                self.slots.swap_remove(i).task.abort();
                self.counters.closed("evicted");
                debug!("metrics endpoint full; closed its newest silent connection");
                return;
            }
            if !waited {
                waited = true;
                self.counters.waited.inc();
            }
            // Every slot is protected: wait for one to end or to leave its grace.
            let next = self
                .slots
                .iter()
                .filter(|s| !s.sent.load(Ordering::Relaxed))
                .map(|s| s.since + GRACE)
                .min()
                .unwrap_or(now + GRACE);
            tokio::select! {
                _ = self.ended.notified() => {}
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// Whether a slot is free, once the connections' tasks have seen what reached their sockets.
    async fn has_room(&mut self) -> bool {
        self.slots.retain(|s| !s.task.is_finished());
        if self.slots.len() < MAX_CONNECTIONS {
            return true;
        }
        // The first yield lets the runtime poll the sockets, the second lets the tasks it woke run
        // (they mark a request as begun, or end on a hang-up).
        for _ in 0..2 {
            tokio::task::yield_now().await;
        }
        self.slots.retain(|s| !s.task.is_finished());
        self.slots.len() < MAX_CONNECTIONS
    }

    /// Takes a connection into the table (`sent`: its request has begun); `spawn` starts its task.
    pub fn admit(&mut self, sent: bool, spawn: impl FnOnce(Ticket) -> AbortHandle) {
        let sent = Arc::new(AtomicBool::new(sent));
        let ticket = Ticket {
            sent: Arc::clone(&sent),
            ended: Arc::clone(&self.ended),
        };
        let task = spawn(ticket);
        self.slots.push(Slot {
            since: Instant::now(),
            sent,
            task,
        });
    }
}

/// Which connection to close, of (admitted at, request begun): the newest silent one past its
/// grace, or None when every one is protected.
fn victim(slots: impl Iterator<Item = (Instant, bool)>, now: Instant) -> Option<usize> {
    slots
        .enumerate()
        .filter(|(_, (since, sent))| !sent && now.duration_since(*since) >= GRACE)
        .max_by_key(|(_, (since, _))| *since)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_silent_connection_past_its_grace_is_closed() {
        let now = Instant::now();
        let ms = |n| now - Duration::from_millis(n);
        // Young, or with a request: protected.
        assert_eq!(
            victim([(ms(0), false), (ms(99), false), (ms(900), true)].into_iter(), now),
            None
        );
        // The newest silent one past the grace: not an older one, nor a younger or sending one.
        let slots = [
            (ms(300), false),
            (ms(900), true),
            (ms(160), false),
            (ms(10), false),
            (ms(150), true),
        ];
        assert_eq!(victim(slots.into_iter(), now), Some(2));
    }

    /// What `socket` shows once it stops showing `Sent::Nothing` (or after 5 s).
    fn settled(socket: &std::net::TcpStream) -> Sent {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while sent(socket) == Sent::Nothing && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        sent(socket)
    }

    #[test]
    fn a_peek_tells_silent_sending_and_closed_sockets_apart() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let connect = || std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut client, accepted) = (connect(), listener.accept().unwrap().0);
        assert_eq!(sent(&accepted), Sent::Nothing);
        client.write_all(b"G").unwrap();
        assert_eq!(settled(&accepted), Sent::Request);
        // A peek consumes nothing.
        assert_eq!(sent(&accepted), Sent::Request);
        let (client, accepted) = (connect(), listener.accept().unwrap().0);
        drop(client);
        assert_eq!(settled(&accepted), Sent::Closed);
    }
}
