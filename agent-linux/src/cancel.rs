//! The requests of a session that a `cancel` can stop.
//!
//! Every request with a numeric id that takes a slot registers here while
//! it runs ([`Running::register`]); `cancel` with that id fires its token
//! ([`Running::cancel`]). The core (`dispatch.rs`) then gives up on the
//! request as it does at shutdown: the work is dropped (a command's process
//! group and cgroup are killed by `exec.rs`'s drop guard, a `file_write`
//! not past its point of no return never takes place), the request is
//! answered `cancelled` at once, and its slot is freed when that reply is
//! written.
//!
//! Each request line runs on a task of its own, so a `cancel` sent right
//! after its request may run before that request has registered. A cancel
//! that finds nothing running is therefore remembered (the last
//! [`EARLY_CANCELS`] ids): a request with that id that starts afterwards is
//! stopped at once. Hosts use each id once per connection (PROTOCOL.md), so
//! a remembered id never stops an unrelated request.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// How many cancels of requests not (yet) running a session remembers.
pub const EARLY_CANCELS: usize = 64;

/// The running requests of one session, by id.
#[derive(Debug, Default)]
pub struct Running {
    /// Id → (token, number of requests running under that id). A host may
    /// reuse an id while an earlier request with it still runs; a cancel
    /// stops them all.
    map: Arc<Mutex<HashMap<u64, (CancellationToken, usize)>>>,
    /// Ids cancelled while nothing with them ran, oldest first.
    early: Mutex<VecDeque<u64>>,
}

/// A registered request: its token, and its entry removed when dropped.
#[derive(Debug)]
pub struct Registration {
    map: Arc<Mutex<HashMap<u64, (CancellationToken, usize)>>>,
    id: u64,
    token: CancellationToken,
}

impl Registration {
    /// Fires when a `cancel` names this request.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = lock(&self.map);
        if let Some((_, count)) = map.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.id);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is one insert, update or remove: a panic
    // cannot leave the map inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Running {
    /// Registers request `id` until the returned registration is dropped.
    pub fn register(&self, id: u64) -> Registration {
        let early = {
            let mut early = lock(&self.early);
            let found = early.iter().position(|&e| e == id);
            found.and_then(|i| early.remove(i)).is_some()
        };
        let mut map = lock(&self.map);
        let entry = map
            .entry(id)
            .or_insert_with(|| (CancellationToken::new(), 0));
        if early {
            entry.0.cancel();
        }
        entry.1 += 1;
        Registration {
            map: Arc::clone(&self.map),
            id,
            token: entry.0.clone(),
        }
    }

    /// Cancels the running request(s) with `id`; false if none runs (then
    /// a request with `id` that starts later is stopped at once).
    pub fn cancel(&self, id: u64) -> bool {
        if let Some((token, _)) = lock(&self.map).get(&id) {
            token.cancel();
            return true;
        }
        let mut early = lock(&self.early);
        if !early.contains(&id) {
            if early.len() == EARLY_CANCELS {
                early.pop_front();
            }
            early.push_back(id);
        }
        false
    }

    /// Number of ids with a request running.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// True when no request is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_fires_every_request_with_the_id_and_entries_leave_with_them() {
        let r = Running::default();
        assert!(!r.cancel(1), "nothing runs yet");
        let a = r.register(1);
        let b = r.register(1);
        let c = r.register(2);
        assert_eq!(r.len(), 2);
        assert!(r.cancel(1));
        assert!(a.token().is_cancelled() && b.token().is_cancelled());
        assert!(!c.token().is_cancelled());
        drop(a);
        assert_eq!(r.len(), 2, "b still runs under id 1");
        drop(b);
        assert!(!r.cancel(1));
        drop(c);
        assert!(r.is_empty());
    }

    #[test]
    fn a_cancel_that_overtakes_its_request_stops_it_as_it_starts() {
        let r = Running::default();
        assert!(!r.cancel(5), "not running yet");
        assert!(r.register(5).token().is_cancelled());
        // Remembered once: the id is used up.
        assert!(!r.register(5).token().is_cancelled());
        // Only the last EARLY_CANCELS are remembered.
        for id in 100..100 + EARLY_CANCELS as u64 + 1 {
            r.cancel(id);
        }
        assert!(!r.register(100).token().is_cancelled());
        assert!(r.register(101).token().is_cancelled());
    }
}
