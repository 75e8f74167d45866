//! The host's end of streams (PROTOCOL.md, "Streams"): readers and writers
//! over the agent's `stream_*` messages, with credit both ways.
//!
//! The connection's reader task hands every stream message to the
//! [`StreamTable`] and never waits: data goes into the stream's buffer,
//! which the window this side granted bounds (an agent that sends more
//! gets the stream reset). A [`StreamReader`] grants credit back as its
//! user takes the data, so a user that stops reading one stream stalls
//! that stream alone; a [`StreamWriter`] sends only what the agent
//! granted. Stream messages never reach [`Subscription`](crate::Subscription)s.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use agent_common::methods::{
    ExecExitParams, Method, StreamCloseParams, StreamCreditParams, StreamDataParams,
    StreamResetParams, EXEC_EXIT,
};
use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::conn::Conn;
use crate::error::ClientError;

/// True for the agent's messages that belong to streams.
pub(super) fn is_stream_method(method: &str) -> bool {
    method == EXEC_EXIT
        || matches!(
            Method::from_name(method),
            Some(
                Method::StreamData
                    | Method::StreamCredit
                    | Method::StreamClose
                    | Method::StreamReset
            )
        )
}

/// The streams of a client, by id. Shared by the client and the reader
/// task of its connection.
#[derive(Default)]
pub(crate) struct StreamTable {
    map: Mutex<HashMap<u64, Arc<Shared>>>,
}

/// The most bytes this side sends in one `stream_data`: a quarter of the
/// agent's window, so the agent's grants keep several in flight.
const HOST_CHUNK: u64 = agent_common::methods::STREAM_WINDOW / 4;

/// The window this side grants by default: the agent's data waits in
/// this side's memory, not the guest's, and a larger window keeps the
/// agent's 256 KiB messages flowing.
pub(crate) const HOST_WINDOW: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section is a few field updates: never inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One stream's state, shared by its reader, writer and the reader task.
pub(super) struct Shared {
    id: u64,
    /// The connection the stream lives on (`Arc::as_ptr` of its state).
    conn: usize,
    /// The window this side grants.
    window: u64,
    state: Mutex<State>,
    /// The command's exit, for a stream opened by `exec_start`.
    exit: watch::Sender<Option<Result<ExecExitParams, String>>>,
}

#[derive(Default)]
struct State {
    inbound: VecDeque<Bytes>,
    /// Bytes the agent may still send.
    window_left: u64,
    /// Bytes taken by the user and not granted back yet.
    consumed: u64,
    agent_closed: bool,
    /// This side sent `stream_close`.
    host_closed: bool,
    /// Why the stream ended abruptly.
    reset: Option<String>,
    /// The stream ended because its connection did.
    conn_lost: bool,
    /// Bytes this side may still send.
    credit: u64,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl State {
    fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

/// What the reader task must send back after a stream message.
pub(super) enum Reply {
    Nothing,
    /// The agent broke the stream's rules: reset it.
    Reset(u64, &'static str),
}

impl StreamTable {
    /// Registers stream `id` on the connection `conn` before it is opened,
    /// granting the agent `window` bytes.
    pub(super) fn register(&self, id: u64, conn: usize, window: u64) -> Arc<Shared> {
        let (exit, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            id,
            conn,
            window,
            state: Mutex::new(State {
                window_left: window,
                ..State::default()
            }),
            exit,
        });
        lock(&self.map).insert(id, shared.clone());
        shared
    }

    /// Forgets a stream (its open failed, or its last handle went).
    pub(super) fn forget(&self, id: u64) {
        lock(&self.map).remove(&id);
    }

    fn get(&self, id: u64) -> Option<Arc<Shared>> {
        lock(&self.map).get(&id).cloned()
    }

    /// An agent's stream message (`data` is its attachment). Never waits.
    pub(super) fn deliver(&self, method: &str, params: &RawValue, data: Option<Bytes>) -> Reply {
        #[derive(serde::Deserialize)]
        struct Any {
            stream: u64,
        }
        let Ok(Any { stream }) = serde_json::from_str::<Any>(params.get()) else {
            tracing::debug!(method, "dropping a stream message without a stream id");
            return Reply::Nothing;
        };
        let Some(s) = self.get(stream) else {
            tracing::debug!(method, stream, "dropping a message for a stream not open");
            return Reply::Nothing;
        };
        if method == EXEC_EXIT {
            if let Ok(exit) = serde_json::from_str::<ExecExitParams>(params.get()) {
                s.exit.send_replace(Some(Ok(exit)));
            }
            return Reply::Nothing;
        }
        let mut st = lock(&s.state);
        let reply = match Method::from_name(method) {
            Some(Method::StreamData) => {
                let data = data.unwrap_or_default();
                let len = data.len() as u64;
                if st.reset.is_some() {
                    Reply::Nothing
                } else if len > st.window_left || st.agent_closed {
                    st.reset = Some("the agent sent more than it was granted".into());
                    Reply::Reset(stream, "flow_control")
                } else {
                    st.window_left -= len;
                    if !data.is_empty() {
                        st.inbound.push_back(data);
                    }
                    Reply::Nothing
                }
            }
            Some(Method::StreamCredit) => {
                if let Ok(p) = serde_json::from_str::<StreamCreditParams>(params.get()) {
                    st.credit = st.credit.saturating_add(p.bytes);
                }
                Reply::Nothing
            }
            Some(Method::StreamClose) => {
                st.agent_closed = true;
                Reply::Nothing
            }
            Some(Method::StreamReset) => {
                let reason = serde_json::from_str::<StreamResetParams>(params.get())
                    .ok()
                    .and_then(|p| p.reason)
                    .unwrap_or_else(|| "reset".into());
                st.reset
                    .get_or_insert(format!("the agent reset the stream ({reason})"));
                Reply::Nothing
            }
            _ => Reply::Nothing,
        };
        st.wake();
        reply
    }

    /// The connection `conn` ended: its streams end with it.
    pub(super) fn lost(&self, conn: usize) {
        let gone: Vec<_> = lock(&self.map)
            .values()
            .filter(|s| s.conn == conn)
            .cloned()
            .collect();
        for s in gone {
            let mut st = lock(&s.state);
            st.conn_lost = true;
            st.reset
                .get_or_insert_with(|| "the connection to the agent was lost".into());
            st.wake();
            drop(st);
            s.exit.send_if_modified(|e| {
                if e.is_some() {
                    return false;
                }
                *e = Some(Err("the connection to the agent was lost".into()));
                true
            });
        }
    }
}

impl Shared {
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    /// Sets the credit the agent granted in its reply to the open.
    pub(super) fn set_credit(&self, credit: u64) {
        let mut st = lock(&self.state);
        st.credit = st.credit.saturating_add(credit);
        st.wake();
    }

    /// Waits for the command's exit.
    pub(super) async fn exit(&self) -> Result<ExecExitParams, String> {
        let mut rx = self.exit.subscribe();
        let r = rx.wait_for(Option::is_some).await;
        match r {
            Ok(v) => v.clone().unwrap_or_else(|| Err("no exit".into())),
            Err(_) => Err("the stream was dropped".into()),
        }
    }

    /// Resets the stream on this side (nothing is sent).
    fn reset_here(&self, why: &str) {
        let mut st = lock(&self.state);
        st.reset.get_or_insert_with(|| why.to_owned());
        st.inbound.clear();
        st.wake();
    }
}

type SendFuture = Pin<Box<dyn Future<Output = Result<(), ClientError>> + Send>>;

/// Forgets the stream when the last of its handles goes; resets it on the
/// agent's side if it was still open.
pub(super) struct Handle {
    pub(super) shared: Arc<Shared>,
    pub(super) conn: Arc<Conn>,
    pub(super) table: Arc<StreamTable>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let st = lock(&self.shared.state);
        // Not over both ways (a writer dropped without `shutdown`, a reader
        // dropped before the end): the agent lets go of it too.
        let open = st.reset.is_none() && !(st.agent_closed && st.host_closed);
        drop(st);
        if open {
            self.conn.spawn_notification(
                Method::StreamReset.as_str(),
                StreamResetParams {
                    stream: self.shared.id,
                    reason: Some("closed".into()),
                },
                None,
            );
        }
        self.table.forget(self.shared.id);
    }
}

fn gone(reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, reason.to_owned())
}

/// The data the agent sends on a stream, as an [`AsyncRead`]. End of file
/// is the agent's `stream_close`; a reset is an error
/// (`ConnectionReset`). Credit goes back to the agent as data is read.
pub struct StreamReader {
    handle: Arc<Handle>,
    chunk: Bytes,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("stream", &self.handle.shared.id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("stream", &self.handle.shared.id)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl StreamReader {
    pub(super) fn new(handle: Arc<Handle>) -> StreamReader {
        StreamReader {
            handle,
            chunk: Bytes::new(),
        }
    }

    /// The stream's id.
    pub fn id(&self) -> u64 {
        self.handle.shared.id
    }

    /// True once the stream ended because its connection to the agent was
    /// lost (then the reader's error is that, not a reset by the agent).
    pub fn connection_lost(&self) -> bool {
        lock(&self.handle.shared.state).conn_lost
    }

    /// The next bytes the agent sent, `None` at its end of stream.
    pub async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if !self.chunk.is_empty() {
            return Ok(Some(std::mem::take(&mut self.chunk)));
        }
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        let shared = &self.handle.shared;
        let mut st = lock(&shared.state);
        if let Some(chunk) = st.inbound.pop_front() {
            st.consumed += chunk.len() as u64;
            // Grant back once a quarter of the window was read.
            if st.consumed >= (shared.window / 4).max(1) && st.reset.is_none() {
                let bytes = std::mem::take(&mut st.consumed);
                st.window_left += bytes;
                drop(st);
                self.handle.conn.spawn_notification(
                    Method::StreamCredit.as_str(),
                    StreamCreditParams {
                        stream: shared.id,
                        bytes,
                    },
                    None,
                );
            }
            return Poll::Ready(Ok(Some(chunk)));
        }
        if let Some(why) = &st.reset {
            return Poll::Ready(Err(gone(why)));
        }
        if st.agent_closed {
            return Poll::Ready(Ok(None));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncRead for StreamReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.chunk.is_empty() {
            match self.poll_chunk(cx) {
                Poll::Ready(Ok(Some(c))) => self.chunk = c,
                Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.chunk.len().min(buf.remaining());
        buf.put_slice(&self.chunk.split_to(n));
        Poll::Ready(Ok(()))
    }
}

/// Bytes to a stream, as an [`AsyncWrite`]: sent as the agent grants
/// credit (a write waits for it); `shutdown` half-closes the stream
/// (`stream_close`).
pub struct StreamWriter {
    handle: Arc<Handle>,
    sending: Option<SendFuture>,
    closed: bool,
}

impl StreamWriter {
    pub(super) fn new(handle: Arc<Handle>) -> StreamWriter {
        StreamWriter {
            handle,
            sending: None,
            closed: false,
        }
    }

    /// The stream's id.
    pub fn id(&self) -> u64 {
        self.handle.shared.id
    }

    fn poll_sent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(f) = &mut self.sending {
            let r = std::task::ready!(f.as_mut().poll(cx));
            self.sending = None;
            if let Err(e) = r {
                self.handle.shared.reset_here(&e.to_string());
                return Poll::Ready(Err(gone(&e.to_string())));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_sent(cx))?;
        if self.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream was closed for writing",
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let shared = self.handle.shared.clone();
        let mut st = lock(&shared.state);
        if let Some(why) = &st.reset {
            return Poll::Ready(Err(gone(why)));
        }
        if st.credit == 0 {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        // At most HOST_CHUNK, which fits in usize.
        let n = data.len().min(st.credit.min(HOST_CHUNK) as usize);
        st.credit -= n as u64;
        drop(st);
        let conn = self.handle.conn.clone();
        let bytes = Bytes::copy_from_slice(&data[..n]);
        let id = shared.id;
        self.sending = Some(Box::pin(async move {
            conn.send_notification(
                Method::StreamData.as_str(),
                &StreamDataParams { stream: id },
                Some(bytes),
            )
            .await
        }));
        // Start the write now; its end is awaited by the next call.
        if let Poll::Ready(Err(e)) = self.poll_sent(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_sent(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_sent(cx))?;
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        self.closed = true;
        lock(&self.handle.shared.state).host_closed = true;
        let conn = self.handle.conn.clone();
        let id = self.handle.shared.id;
        self.sending = Some(Box::pin(async move {
            conn.send_notification(
                Method::StreamClose.as_str(),
                &StreamCloseParams { stream: id },
                None,
            )
            .await
        }));
        self.poll_sent(cx)
    }
}
