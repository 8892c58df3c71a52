//! Which worker holds which Engine.IO session: learned from the handshake answers, looked up
//! by the `sid` of later requests, so that a client without cookies keeps its session too.
//!
//! Bounded (`capacity` entries; past it nothing new is learned until expired entries go) and
//! expiring (an entry unused for `idle` is forgotten: Engine.IO clients poll or ping every
//! 25 s, and one that upgraded to WebSocket no longer sends its sid over HTTP at all).
//! Sharded (dashmap): lookups on different sessions do not contend.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

/// Sessions remembered at most.
pub const DEFAULT_CAPACITY: usize = 100_000;
/// A session unused this long is forgotten.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(120);

/// Where a session lives: its worker, and that worker's generation when it was learned (a
/// supervised worker that restarted lost every session of the previous one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionHome {
    pub worker: usize,
    pub generation: u64,
}

struct Entry {
    home: SessionHome,
    /// Seconds since the table's epoch, refreshed on each use.
    last_used: AtomicU32,
}

pub struct SessionTable {
    map: DashMap<Box<str>, Entry>,
    capacity: usize,
    idle: Duration,
    epoch: Instant,
    /// Sessions not learned because the table was full.
    pub overflowed: AtomicU64,
}

impl SessionTable {
    pub fn new(capacity: usize, idle: Duration) -> SessionTable {
        SessionTable {
            map: DashMap::new(),
            capacity,
            idle,
            epoch: Instant::now(),
            overflowed: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// Remembers that `sid` lives at `home`. Returns false when the table is full.
    pub fn learn(&self, sid: &str, home: SessionHome) -> bool {
        if self.map.len() >= self.capacity {
            self.sweep();
            if self.map.len() >= self.capacity {
                self.overflowed.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        let entry = Entry {
            home,
            last_used: AtomicU32::new(self.now()),
        };
        self.map.insert(sid.into(), entry);
        true
    }

    /// Where `sid` lives, if known and not expired; refreshes it.
    pub fn lookup(&self, sid: &str) -> Option<SessionHome> {
        let entry = self.map.get(sid)?;
        let now = self.now();
        let last = entry.last_used.load(Ordering::Relaxed);
        if u64::from(now.saturating_sub(last)) > self.idle.as_secs() {
            drop(entry);
            self.map.remove(sid);
            return None;
        }
        if last != now {
            entry.last_used.store(now, Ordering::Relaxed);
        }
        Some(entry.home)
    }

    pub fn forget(&self, sid: &str) {
        self.map.remove(sid);
    }

    /// Forgets every session unused for `idle`. Run periodically, off the request path.
    pub fn sweep(&self) {
        let now = self.now();
        let idle = self.idle.as_secs();
        self.map.retain(|_, e| {
            u64::from(now.saturating_sub(e.last_used.load(Ordering::Relaxed))) <= idle
        });
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home(worker: usize) -> SessionHome {
        SessionHome {
            worker,
            generation: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_are_remembered_refreshed_and_expire() {
        let table = SessionTable::new(10, Duration::from_secs(120));
        assert!(table.learn("a", home(1)));
        assert_eq!(table.lookup("a"), Some(home(1)));
        assert_eq!(table.lookup("b"), None);
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(table.lookup("a"), Some(home(1)), "used: refreshed");
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(table.lookup("a"), Some(home(1)), "100 s after the last use");
        tokio::time::advance(Duration::from_secs(121)).await;
        assert_eq!(table.lookup("a"), None, "idle past 120 s");
        assert!(table.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_learns_again_once_entries_expire() {
        let table = SessionTable::new(2, Duration::from_secs(10));
        assert!(table.learn("a", home(0)));
        assert!(table.learn("b", home(1)));
        assert!(!table.learn("c", home(0)), "full");
        assert_eq!(table.overflowed.load(Ordering::Relaxed), 1);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(table.learn("c", home(0)), "the expired ones made room");
        assert_eq!(table.len(), 1);
        table.forget("c");
        assert!(table.is_empty());
    }
}
