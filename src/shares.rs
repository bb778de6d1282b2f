//! Bounded shares of a limited resource, per peer: no local peer can hold more than its share,
//! so one uid (or one connection) flooding the socket never takes what another needs.
//!
//! A [`Peer`] is the kernel's view of who is calling (SO_PEERCRED uid, recorded at connect) and
//! which connection the call came on. [`Shares::try_take`] hands out a [`Share`] only while the
//! total, the peer's uid and the peer's connection are each under their limit; it never waits.
//! Dropping the share gives it back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Who made a call: the peer's uid (None if the kernel could not say) and its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    pub uid: Option<u32>,
    pub conn: u64,
}

/// Which limit refused a share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Total,
    Uid,
    Connection,
}

impl Limit {
    /// For log lines, messages and metric labels: whose share is used up.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Total => "plugin",
            Limit::Uid => "uid",
            Limit::Connection => "connection",
        }
    }
}

/// Counted shares with a total limit, a limit per uid and a limit per connection.
pub struct Shares {
    total: usize,
    per_uid: usize,
    per_conn: usize,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_uid: HashMap<Option<u32>, usize>,
    by_conn: HashMap<u64, usize>,
}

/// One share, held until dropped.
pub struct Share {
    shares: Arc<Shares>,
    peer: Peer,
}

impl Shares {
    /// At most `total` shares in all, `per_uid` to one uid, `per_conn` to one connection.
    pub fn new(total: usize, per_uid: usize, per_conn: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_uid,
            per_conn,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Counters are updated in one step under the lock; a panic cannot leave them torn.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A share for `peer`, or the limit that refuses it. Never waits.
    pub fn try_take(self: &Arc<Self>, peer: Peer) -> Result<Share, Limit> {
        let mut c = self.lock();
        if c.total >= self.total {
            return Err(Limit::Total);
        }
        if c.by_uid.get(&peer.uid).copied().unwrap_or(0) >= self.per_uid {
            return Err(Limit::Uid);
        }
        if c.by_conn.get(&peer.conn).copied().unwrap_or(0) >= self.per_conn {
            return Err(Limit::Connection);
        }
        c.total += 1;
        *c.by_uid.entry(peer.uid).or_default() += 1;
        *c.by_conn.entry(peer.conn).or_default() += 1;
        Ok(Share {
            shares: Arc::clone(self),
            peer,
        })
    }

    /// Shares held now, in all.
    pub fn in_use(&self) -> usize {
        self.lock().total
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut c = self.shares.lock();
        c.total -= 1;
        // Entries go when they reach zero, so the maps hold only peers with shares.
        if let Some(n) = c.by_uid.get_mut(&self.peer.uid) {
            *n -= 1;
            if *n == 0 {
                c.by_uid.remove(&self.peer.uid);
            }
        }
        if let Some(n) = c.by_conn.get_mut(&self.peer.conn) {
            *n -= 1;
            if *n == 0 {
                c.by_conn.remove(&self.peer.conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, conn: u64) -> Peer {
        Peer { uid: Some(uid), conn }
    }

    #[test]
    fn each_limit_holds_and_shares_come_back() {
        let shares = Shares::new(10, 6, 4);
        let a: Vec<_> = (0..4).map(|_| shares.try_take(peer(1, 1)).unwrap()).collect();
        assert_eq!(shares.try_take(peer(1, 1)).err(), Some(Limit::Connection));
        let b: Vec<_> = (0..2).map(|_| shares.try_take(peer(1, 2)).unwrap()).collect();
        assert_eq!(shares.try_take(peer(1, 3)).err(), Some(Limit::Uid));
        // Another uid is not held back by the first one's use, only by the total.
        let c: Vec<_> = (0..4).map(|i| shares.try_take(peer(2, 10 + i)).unwrap()).collect();
        assert_eq!(shares.try_take(peer(3, 20)).err(), Some(Limit::Total));
        assert_eq!(shares.in_use(), 10);
        drop((a, b, c));
        assert_eq!(shares.in_use(), 0);
        let counts = shares.lock();
        assert!(counts.by_uid.is_empty() && counts.by_conn.is_empty());
    }
}
