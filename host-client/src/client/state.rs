//! The state of a [`Client`](super::Client)'s connection, published on a
//! `watch` channel ([`Client::state`](super::Client::state)).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

/// Where a [`Client`](super::Client)'s connection stands.
///
/// ```
/// use host_client::{Client, ClientOptions, ConnectionState};
/// let client = Client::lazy("/tmp/vm.sock", ClientOptions::default());
/// assert_eq!(*client.state().borrow(), ConnectionState::Idle);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Not connected yet: the first call connects.
    Idle,
    /// Opening the first connection and syncing.
    Connecting,
    /// Connected and in sync: calls go straight out.
    Connected,
    /// Resynchronising in place (0xFF + `sync`) after a call was given up.
    Resyncing,
    /// The connection was lost; the next call reconnects.
    Disconnected,
    /// Opening a new connection after one was lost or reset.
    Reconnecting,
    /// Closed for good ([`Client::close`](super::Client::close), or lost
    /// with `reconnect` off, or a stream that cannot be reopened): every
    /// call fails with `ConnectionLost`.
    Gone,
}

/// The sender side, with the generation of the current connection so that
/// the reader of a connection already replaced does not report its end.
pub(super) struct StateTx {
    tx: watch::Sender<ConnectionState>,
    generation: AtomicU64,
}

impl StateTx {
    pub(super) fn new() -> StateTx {
        StateTx {
            tx: watch::Sender::new(ConnectionState::Idle),
            generation: AtomicU64::new(0),
        }
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<ConnectionState> {
        self.tx.subscribe()
    }

    pub(super) fn get(&self) -> ConnectionState {
        *self.tx.borrow()
    }

    pub(super) fn set(&self, state: ConnectionState) {
        self.tx.send_if_modified(|s| {
            // Gone is final.
            if *s == state || *s == ConnectionState::Gone {
                return false;
            }
            *s = state;
            true
        });
    }

    /// A new connection; returns its generation.
    pub(super) fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The reader of connection `generation` saw its end.
    pub(super) fn lost(&self, generation: u64, reconnect: bool) {
        if self.generation.load(Ordering::Acquire) == generation {
            self.set(if reconnect {
                ConnectionState::Disconnected
            } else {
                ConnectionState::Gone
            });
        }
    }
}
