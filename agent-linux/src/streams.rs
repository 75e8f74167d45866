//! A session's streams (PROTOCOL.md, "Streams"): the agent's end of each
//! stream the host opened, its credit both ways, half-close and reset.
//!
//! The host's stream messages (`stream_data`, `stream_credit`,
//! `stream_close`, `stream_reset`) are handled by the session's reader
//! itself, in the order they arrive, and never wait: data goes into the
//! stream's queue, which the credit the agent granted bounds (a host that
//! sends more than it was granted gets the stream reset, the data
//! dropped). What the agent sends waits for the host's credit, so a host
//! that stops reading one stream stalls that stream alone: it holds no
//! place in the writer's queues and none of the session's permits.
//!
//! A [`Stream`] is the handler's end. Dropping its last clone forgets the
//! stream; the session's end resets them all.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use agent_common::error::ErrorKind;
use agent_common::methods::{
    StreamCloseParams, StreamCreditParams, StreamDataParams, StreamResetParams, MAX_STREAMS,
    MAX_STREAM_WINDOW, STREAM_CHUNK, STREAM_WINDOW,
};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::Notify;

use crate::error::RpcError;
use crate::payload::Payload;
use crate::session::{Notifier, Session, SessionEnded};

/// Why a stream message or an open was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// No open stream has this id.
    #[error("no stream {stream} is open on this connection")]
    Unknown {
        /// The id.
        stream: u64,
    },
    /// The id names a stream that is still open.
    #[error("stream {stream} is already open on this connection; pick another id")]
    InUse {
        /// The id.
        stream: u64,
    },
    /// The connection has as many streams as it may.
    #[error("this connection has {limit} streams open, the most it may; close one first")]
    TooMany {
        /// [`MAX_STREAMS`].
        limit: usize,
    },
}

impl RpcError for StreamError {
    fn kind(&self) -> ErrorKind {
        match self {
            StreamError::Unknown { .. } => ErrorKind::NotFound,
            StreamError::InUse { .. } => ErrorKind::AlreadyExists,
            StreamError::TooMany { .. } => ErrorKind::Busy,
        }
    }
}

/// The stream ended before the message could be sent: reset by either
/// side, or the session ended.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the stream was reset or its connection ended")]
pub struct StreamGone;

impl From<SessionEnded> for StreamGone {
    fn from(_: SessionEnded) -> StreamGone {
        StreamGone
    }
}

/// The credit a host grants in the method that opens a stream (its
/// `window`; [`STREAM_WINDOW`] if absent); `Err` says the allowed range.
pub fn host_window(window: Option<u64>) -> Result<u64, String> {
    match window.unwrap_or(STREAM_WINDOW) {
        credit @ 1..=MAX_STREAM_WINDOW => Ok(credit),
        _ => Err(format!(
            "window must be from 1 to {MAX_STREAM_WINDOW} bytes"
        )),
    }
}

/// Opens stream `id`, on which only the agent sends (the host's `credit`
/// lets it), and runs `send` on a task of its own until it returns, the
/// stream is reset, or the session ends (`follow_log`,
/// `file_read_stream`).
pub fn spawn_sender<F, Fut>(
    session: &Session,
    id: u64,
    credit: u64,
    send: F,
) -> Result<(), StreamError>
where
    F: FnOnce(Stream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let stream = session.streams().open(
        Open {
            id,
            credit,
            window: 0,
        },
        session.notifier(),
    )?;
    let ended = session.ended().clone();
    let sending = send(stream.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = sending => {}
            () = stream.was_reset() => {}
            () = ended.cancelled() => {}
        }
    });
    Ok(())
}

type Table = Mutex<HashMap<u64, Arc<Shared>>>;

/// A session's open streams, by id.
#[derive(Debug, Default)]
pub struct Streams {
    table: Arc<Table>,
}

#[derive(Debug)]
struct Shared {
    id: u64,
    state: Mutex<State>,
    /// Woken on every change of `state`.
    changed: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// The host's data not yet taken.
    inbound: VecDeque<Bytes>,
    /// Bytes the host may still send (granted, not yet received).
    window_in: u64,
    /// The host takes data on this stream at all.
    input: bool,
    /// The host sent `stream_close`.
    host_closed: bool,
    /// Bytes the agent may still send.
    credit_out: u64,
    /// The agent sent `stream_close`.
    agent_closed: bool,
    /// Reset by either side, or the session ended.
    reset: bool,
    /// The agent's `stream_reset` is on its way: the stream's later
    /// messages (an `exec_exit`) wait until it is queued, to follow it.
    resetting: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few field updates with no call that
    // can panic half-way, so the state stays consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut lock(&self.state));
        self.changed.notify_waiters();
        r
    }

    /// Waits until `ready` gives a value.
    async fn wait<R>(&self, mut ready: impl FnMut(&mut State) -> Option<R>) -> R {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(r) = ready(&mut lock(&self.state)) {
                return r;
            }
            changed.await;
        }
    }
}

/// How a stream opens.
#[derive(Debug, Clone, Copy)]
pub struct Open {
    /// The id the host picked.
    pub id: u64,
    /// The host's window: bytes the agent may send before more credit.
    pub credit: u64,
    /// The agent's window for the host's data; 0 for a stream that takes
    /// none (the host's direction is closed from the start).
    pub window: u64,
}

impl Streams {
    /// Opens a stream; its messages go out through `notifier`.
    pub fn open(&self, open: Open, notifier: &Notifier) -> Result<Stream, StreamError> {
        let mut table = lock(&self.table);
        if table.contains_key(&open.id) {
            return Err(StreamError::InUse { stream: open.id });
        }
        if table.len() >= MAX_STREAMS {
            return Err(StreamError::TooMany { limit: MAX_STREAMS });
        }
        let shared = Arc::new(Shared {
            id: open.id,
            state: Mutex::new(State {
                window_in: open.window,
                input: open.window > 0,
                host_closed: open.window == 0,
                credit_out: open.credit,
                ..State::default()
            }),
            changed: Notify::new(),
        });
        table.insert(open.id, shared.clone());
        Ok(Stream(Arc::new(Inner {
            shared,
            notifier: notifier.clone(),
            table: Arc::downgrade(&self.table),
        })))
    }

    /// Opens several streams at once, all or none.
    pub fn open_all(
        &self,
        opens: &[Open],
        notifier: &Notifier,
    ) -> Result<Vec<Stream>, StreamError> {
        let mut ids: Vec<u64> = opens.iter().map(|o| o.id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(StreamError::InUse { stream: w[0] });
        }
        // Opened one by one; a failure drops (and so forgets) those opened.
        opens.iter().map(|o| self.open(*o, notifier)).collect()
    }

    fn get(&self, id: u64) -> Result<Arc<Shared>, StreamError> {
        lock(&self.table)
            .get(&id)
            .cloned()
            .ok_or(StreamError::Unknown { stream: id })
    }

    /// Streams open now.
    pub fn len(&self) -> usize {
        lock(&self.table).len()
    }

    /// True with no stream open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The host's `stream_data`. Never waits. Data beyond the credit the
    /// agent granted, or after the host closed its side, resets the stream
    /// (sent through `notifier`).
    pub fn data(&self, id: u64, data: Bytes, notifier: &Notifier) -> Result<(), StreamError> {
        let shared = self.get(id)?;
        let len = data.len() as u64;
        let refused = shared.update(|st| {
            if st.reset {
                return None;
            }
            if !st.input || st.host_closed {
                st.reset = true;
                st.resetting = true;
                return Some("data_after_close");
            }
            if len > st.window_in {
                st.reset = true;
                st.resetting = true;
                return Some("flow_control");
            }
            st.window_in -= len;
            if !data.is_empty() {
                st.inbound.push_back(data);
            }
            None
        });
        if let Some(reason) = refused {
            tracing::warn!(
                stream = id,
                reason,
                "the host broke a stream's rules; resetting it"
            );
            lock(&self.table).remove(&id);
            let notifier = notifier.clone();
            // From a task of its own: the reader never waits.
            tokio::spawn(async move {
                let _ = notifier
                    .notify_ordered(
                        agent_common::methods::Method::StreamReset.as_str(),
                        &StreamResetParams {
                            stream: id,
                            reason: Some(reason.to_owned()),
                        },
                        None,
                    )
                    .await;
                shared.update(|st| st.resetting = false);
            });
        }
        Ok(())
    }

    /// The host's `stream_credit`.
    pub fn credit(&self, id: u64, bytes: u64) -> Result<(), StreamError> {
        let shared = self.get(id)?;
        shared.update(|st| st.credit_out = st.credit_out.saturating_add(bytes));
        Ok(())
    }

    /// The host's `stream_close`: no more data from it.
    pub fn close(&self, id: u64) -> Result<(), StreamError> {
        let shared = self.get(id)?;
        shared.update(|st| st.host_closed = true);
        Ok(())
    }

    /// The host's `stream_reset`: the stream ends, both ways.
    pub fn reset(&self, id: u64) -> Result<(), StreamError> {
        let shared = lock(&self.table)
            .remove(&id)
            .ok_or(StreamError::Unknown { stream: id })?;
        shared.update(|st| {
            st.reset = true;
            st.inbound.clear();
        });
        Ok(())
    }

    /// The session ended: every stream is reset.
    pub fn end_all(&self) {
        let all: Vec<_> = lock(&self.table).drain().map(|(_, s)| s).collect();
        for shared in all {
            shared.update(|st| {
                st.reset = true;
                st.inbound.clear();
            });
        }
    }
}

/// The handler's end of a stream; clones share it.
#[derive(Debug, Clone)]
pub struct Stream(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    notifier: Notifier,
    table: Weak<Table>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(table) = self.table.upgrade() {
            let mut table = lock(&table);
            if table
                .get(&self.shared.id)
                .is_some_and(|s| Arc::ptr_eq(s, &self.shared))
            {
                table.remove(&self.shared.id);
            }
        }
    }
}

impl Stream {
    /// The stream's id.
    pub fn id(&self) -> u64 {
        self.0.shared.id
    }

    /// The host's next data; `None` once the host closed its side (after
    /// all its data) or the stream was reset. Taking data does not grant
    /// credit: [`Stream::grant`] does, once the data has been used.
    pub async fn recv(&self) -> Option<Bytes> {
        self.0
            .shared
            .wait(|st| {
                if st.reset {
                    return Some(None);
                }
                match st.inbound.pop_front() {
                    Some(b) => Some(Some(b)),
                    None if st.host_closed => Some(None),
                    None => None,
                }
            })
            .await
    }

    /// Lets the host send `bytes` more (data it sent has been used).
    pub async fn grant(&self, bytes: u64) -> Result<(), StreamGone> {
        let gone = self.0.shared.update(|st| {
            if st.reset || st.host_closed {
                return true;
            }
            st.window_in += bytes;
            false
        });
        if gone {
            return Ok(());
        }
        self.send_msg(
            agent_common::methods::Method::StreamCredit.as_str(),
            &StreamCreditParams {
                stream: self.id(),
                bytes,
            },
            None,
        )
        .await
    }

    /// Waits for credit to send: at most this many bytes
    /// (up to [`STREAM_CHUNK`]) may go in the next [`Stream::send`].
    pub async fn writable(&self) -> Result<usize, StreamGone> {
        self.writable_up_to(STREAM_CHUNK).await
    }

    /// [`Stream::writable`] for a stream whose messages may carry up to
    /// `chunk` bytes (a `file_read_stream`'s carry whole file chunks).
    pub async fn writable_up_to(&self, chunk: u64) -> Result<usize, StreamGone> {
        self.0
            .shared
            .wait(|st| {
                if st.reset {
                    Some(Err(StreamGone))
                } else if st.credit_out > 0 {
                    // At most a chunk, which fits in usize.
                    Some(Ok(st.credit_out.min(chunk) as usize))
                } else {
                    None
                }
            })
            .await
    }

    /// Sends `data`, which must fit the credit [`Stream::writable`] gave:
    /// bytes, or file data waiting in a pipe.
    pub async fn send(&self, data: impl Into<Payload>) -> Result<(), StreamGone> {
        let data = data.into();
        let len = data.len() as u64;
        let ok = self.0.shared.update(|st| {
            if st.reset || st.agent_closed || len > st.credit_out {
                return false;
            }
            st.credit_out -= len;
            true
        });
        if !ok {
            return Err(StreamGone);
        }
        self.send_msg(
            agent_common::methods::Method::StreamData.as_str(),
            &StreamDataParams { stream: self.id() },
            Some(data),
        )
        .await
    }

    /// Half-closes the agent's side: it sends no more data.
    pub async fn close(&self) -> Result<(), StreamGone> {
        let first = self.0.shared.update(|st| {
            let first = !st.agent_closed && !st.reset;
            st.agent_closed = true;
            first
        });
        if !first {
            return Ok(());
        }
        self.send_msg(
            agent_common::methods::Method::StreamClose.as_str(),
            &StreamCloseParams { stream: self.id() },
            None,
        )
        .await
    }

    /// Ends the stream both ways and tells the host why.
    pub async fn reset(&self, reason: &str) {
        let first = self.0.shared.update(|st| {
            let first = !st.reset;
            st.reset = true;
            st.inbound.clear();
            first
        });
        if first {
            let _ = self
                .send_msg(
                    agent_common::methods::Method::StreamReset.as_str(),
                    &StreamResetParams {
                        stream: self.id(),
                        reason: Some(reason.to_owned()),
                    },
                    None,
                )
                .await;
        }
    }

    /// Resolves once the stream is reset (by either side, or the session's
    /// end).
    pub async fn was_reset(&self) {
        self.0
            .shared
            .wait(|st| if st.reset { Some(()) } else { None })
            .await;
    }

    /// True once reset.
    pub fn is_reset(&self) -> bool {
        lock(&self.0.shared.state).reset
    }

    /// Sends a message of the stream's own (such as `exec_exit`), in order
    /// with its data.
    pub async fn send_msg<P: Serialize>(
        &self,
        method: &str,
        params: &P,
        attachment: Option<Payload>,
    ) -> Result<(), StreamGone> {
        // After the agent's own reset of the stream, if one is on its way.
        self.0.shared.wait(|st| (!st.resetting).then_some(())).await;
        self.0
            .notifier
            .notify_ordered(method, params, attachment)
            .await
            .map_err(StreamGone::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::test_session::{line, session};
    use std::time::Duration;

    #[tokio::test]
    async fn data_within_credit_is_queued_and_granted_back() {
        let (s, mut rx, _keep) = session();
        let st = s
            .streams()
            .open(
                Open {
                    id: 5,
                    credit: 0,
                    window: 4,
                },
                s.notifier(),
            )
            .unwrap();
        s.streams()
            .data(5, Bytes::from_static(b"ab"), s.notifier())
            .unwrap();
        s.streams()
            .data(5, Bytes::from_static(b"cd"), s.notifier())
            .unwrap();
        assert_eq!(st.recv().await.unwrap(), &b"ab"[..]);
        st.grant(2).await.unwrap();
        let credit = line(&rx.recv().await.unwrap());
        assert_eq!(credit["method"], "stream_credit");
        assert_eq!(credit["params"]["bytes"], 2);
        s.streams().close(5).unwrap();
        assert_eq!(st.recv().await.unwrap(), &b"cd"[..]);
        assert_eq!(st.recv().await, None);
        // The host's side is closed: more data resets the stream.
        s.streams()
            .data(5, Bytes::from_static(b"x"), s.notifier())
            .unwrap();
        let reset = line(&rx.recv().await.unwrap());
        assert_eq!(reset["method"], "stream_reset");
        assert_eq!(reset["params"]["reason"], "data_after_close");
        assert!(st.is_reset());
        assert!(s.streams().is_empty());
    }

    #[tokio::test]
    async fn data_beyond_the_window_resets_the_stream_and_never_queues() {
        let (s, mut rx, _keep) = session();
        let st = s
            .streams()
            .open(
                Open {
                    id: 1,
                    credit: 0,
                    window: 3,
                },
                s.notifier(),
            )
            .unwrap();
        s.streams()
            .data(1, Bytes::from_static(b"abcd"), s.notifier())
            .unwrap();
        let reset = line(&rx.recv().await.unwrap());
        assert_eq!(reset["params"]["reason"], "flow_control");
        assert_eq!(st.recv().await, None);
        assert_eq!(
            s.streams().data(1, Bytes::from_static(b"a"), s.notifier()),
            Err(StreamError::Unknown { stream: 1 })
        );
    }

    #[tokio::test]
    async fn sending_waits_for_credit_and_stops_at_reset() {
        let (s, mut rx, _keep) = session();
        let st = s
            .streams()
            .open(
                Open {
                    id: 2,
                    credit: 3,
                    window: 0,
                },
                s.notifier(),
            )
            .unwrap();
        assert_eq!(st.writable().await.unwrap(), 3);
        st.send(Bytes::from_static(b"abc")).await.unwrap();
        let mut data = rx.recv().await.unwrap();
        assert_eq!(line(&data)["params"]["stream"], 2);
        let bytes = data.attachment.take().map(|p| p.into_bytes().unwrap());
        assert_eq!(bytes.as_deref(), Some(&b"abc"[..]));
        // No credit left: the sender waits until the host grants some.
        assert!(
            tokio::time::timeout(Duration::from_millis(30), st.writable())
                .await
                .is_err()
        );
        assert_eq!(st.send(Bytes::from_static(b"d")).await, Err(StreamGone));
        s.streams().credit(2, 1 << 40).unwrap();
        assert_eq!(st.writable().await.unwrap(), STREAM_CHUNK as usize);
        // A stream that takes no data refuses the host's.
        s.streams()
            .data(2, Bytes::from_static(b"x"), s.notifier())
            .unwrap();
        assert_eq!(
            line(&rx.recv().await.unwrap())["params"]["reason"],
            "data_after_close"
        );
        assert_eq!(st.writable().await, Err(StreamGone));
        st.was_reset().await;
    }

    #[tokio::test]
    async fn ids_limits_reset_and_the_session_end() {
        let (s, mut rx, _keep) = session();
        let open = |id| Open {
            id,
            credit: 1,
            window: 1,
        };
        let a = s.streams().open(open(1), s.notifier()).unwrap();
        assert_eq!(
            s.streams().open(open(1), s.notifier()).unwrap_err(),
            StreamError::InUse { stream: 1 }
        );
        assert_eq!(
            s.streams()
                .open_all(&[open(7), open(7)], s.notifier())
                .unwrap_err(),
            StreamError::InUse { stream: 7 }
        );
        let many: Vec<_> = (100..100 + MAX_STREAMS as u64 - 1)
            .map(|id| s.streams().open(open(id), s.notifier()).unwrap())
            .collect();
        assert_eq!(
            s.streams().open(open(2), s.notifier()).unwrap_err(),
            StreamError::TooMany { limit: MAX_STREAMS }
        );
        drop(many);
        assert_eq!(s.streams().len(), 1);
        // The host resets it: the handler sees it, nothing is sent back.
        s.streams().reset(1).unwrap();
        a.was_reset().await;
        assert_eq!(a.recv().await, None);
        a.reset("again").await;
        assert!(rx.try_recv().is_err());
        // The id may be used again.
        let b = s.streams().open(open(1), s.notifier()).unwrap();
        b.close().await.unwrap();
        b.close().await.unwrap();
        assert_eq!(line(&rx.recv().await.unwrap())["method"], "stream_close");
        assert!(rx.try_recv().is_err());
        s.end();
        b.was_reset().await;
        assert!(s.streams().is_empty());
    }
}
