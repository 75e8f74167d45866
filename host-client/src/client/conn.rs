//! The connection behind a [`Client`]: the write half, the reader task that
//! hands each reply to the call waiting for its id, sync and resync after a
//! timeout, reconnects, and attachments in both directions. See the parent
//! module for how a connection works.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::Duration;

use agent_common::codec::{encode_line, Frame, JsonLinesCodec};
use agent_common::error::ErrorObject;
use agent_common::jsonrpc::{parse_response, Id, OutgoingRequest, Response};
use agent_common::methods::{CancelParams, Method, SyncParams, SyncResult};
use agent_common::{MAX_ATTACHMENT_SIZE, MAX_RESPONSE_SIZE, RESYNC_BYTE};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, Mutex as AsyncMutex, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;

use super::call::Flow;
use super::connector::{ReadHalf, WriteHalf};
use super::notify::{self, Subscribers};
use super::state::{ConnectionState, StateTx};
use super::streams::{self, StreamTable};
use super::Client;
use crate::error::ClientError;

/// One connection: the write half, the reader task and the pending calls.
pub(super) struct Conn {
    writer: Arc<AsyncMutex<Writer>>,
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    pub(super) needs_resync: AtomicBool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct Writer {
    half: WriteHalf,
    /// True while a line is being written; still true if that write was
    /// cancelled half-way, so the next write starts with the resync byte.
    dirty: bool,
}

/// State shared between the callers and the reader task.
#[derive(Default)]
struct Shared {
    state: StdMutex<ConnState>,
    /// The connection's writer, for the `cancel` the reader sends itself.
    writer: std::sync::OnceLock<std::sync::Weak<AsyncMutex<Writer>>>,
}

type SyncWaiter = oneshot::Sender<Result<(), ErrorObject>>;

/// A reply as the reader task hands it to its caller.
struct Reply {
    response: Response,
    /// The bytes the response announced; `None` if it announced none, or
    /// more than [`MAX_ATTACHMENT_SIZE`] (then they were skipped).
    attachment: Option<Bytes>,
}

/// A call waiting for its reply, or one given up after it was sent.
enum Waiter {
    /// The caller waits.
    Call(oneshot::Sender<Reply>),
    /// Nobody waits any more: the reply, when it comes, is dropped, and
    /// with it the flow-control permit kept until then (the agent holds the
    /// request's slot until it has written that reply).
    Abandoned(Option<OwnedSemaphorePermit>),
}

#[derive(Default)]
struct ConnState {
    pending: HashMap<u64, Waiter>,
    /// The sync in progress.
    sync: Option<PendingSync>,
    dead: bool,
}

/// A sync in progress: every `sync` request sent for it (id, nonce), and
/// who waits for the first answer to any of them.
struct PendingSync {
    attempts: Vec<(u64, u64)>,
    tx: SyncWaiter,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every critical section is a single insert/remove), so recover.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands a response (and its attachment) to the call waiting for it.
    fn dispatch(&self, resp: Response, attachment: Option<Bytes>) {
        let mut st = self.lock();
        if let Some(sync) = &st.sync {
            let ours = match &resp.outcome {
                Ok(raw) => serde_json::from_str::<SyncResult>(raw.get())
                    .is_ok_and(|r| sync.attempts.iter().any(|&(_, n)| n == r.nonce)),
                Err(_) => resp
                    .id
                    .as_u64()
                    .is_some_and(|id| sync.attempts.iter().any(|&(i, _)| i == id)),
            };
            if ours {
                if let Some(sync) = st.sync.take() {
                    let _ = sync.tx.send(resp.outcome.map(|_| ()));
                }
                return;
            }
        }
        if let Some(waiter) = resp.id.as_u64().and_then(|id| st.pending.remove(&id)) {
            match waiter {
                Waiter::Call(tx) => {
                    let _ = tx.send(Reply {
                        response: resp,
                        attachment,
                    });
                }
                Waiter::Abandoned(permit) => {
                    tracing::debug!(id = %resp.id, "the reply to a call given up came");
                    drop(st);
                    drop(permit);
                    // A chunked upload that call opened (the first chunk
                    // of a push given up) is nobody's: abort it.
                    if let Some(upload_id) = opened_upload(&resp) {
                        tracing::debug!(%upload_id, "aborting an upload opened by a call given up");
                        if let Some(writer) = self.writer.get().and_then(std::sync::Weak::upgrade) {
                            spawn_cancel(
                                writer,
                                None,
                                CancelParams {
                                    id: None,
                                    upload_id: Some(upload_id),
                                },
                            );
                        }
                    }
                }
            }
        } else if let (true, Err(e)) = (resp.id.is_null(), &resp.outcome) {
            // E.g. message_too_large or parse_error: not addressable to a call.
            tracing::warn!("the agent reported an error for no call: {e}");
        } else {
            tracing::debug!(id = %resp.id, "dropping a reply with an unknown id");
        }
    }

    /// Marks the connection dead and fails every pending call.
    fn close(&self) {
        let mut st = self.lock();
        st.dead = true;
        let pending = std::mem::take(&mut st.pending);
        st.sync = None;
        drop(st);
        // Outside the lock: dropping a permit wakes a queued call.
        drop(pending);
    }

    /// The ids of calls still waiting or given up unanswered.
    fn unanswered(&self) -> Vec<u64> {
        self.lock().pending.keys().copied().collect()
    }
}

/// What the next attachment frame belongs to.
enum Awaiting {
    Reply(Response),
    Notification(notify::Header),
    /// A stream's data (`crate::client::streams`).
    Stream(notify::Header),
}

/// What the reader reports its end to.
struct Ends {
    state: Arc<StateTx>,
    generation: u64,
    reconnect: bool,
}

/// Where the reader hands notifications: subscriptions, and the streams.
struct Sinks {
    subscribers: Arc<Subscribers>,
    streams: Arc<StreamTable>,
}

async fn read_loop(read: ReadHalf, shared: Arc<Shared>, sinks: Sinks, ends: Ends) {
    let Sinks {
        subscribers,
        streams,
    } = sinks;
    let mut frames = FramedRead::new(read, JsonLinesCodec::new(MAX_RESPONSE_SIZE));
    // A response or notification waiting for its attachment.
    let mut awaiting: Option<Awaiting> = None;
    while let Some(frame) = frames.next().await {
        match frame {
            Ok(Frame::Line(line)) => {
                let resp = match parse_response(&line) {
                    Ok(r) => r,
                    Err(e) => {
                        if let Some(n) = notify::Header::parse(&line) {
                            awaiting =
                                notification(&mut frames, &shared, (&subscribers, &streams), n);
                        } else {
                            tracing::debug!("dropping a line that is not a response: {e}");
                        }
                        continue;
                    }
                };
                // Until the sync reply, lines may be stale, cut, or bytes of
                // a stale attachment: an attachment member there is not
                // trusted (its bytes are read as lines and dropped).
                let syncing = shared.lock().sync.is_some();
                match resp.attachment {
                    None => shared.dispatch(resp, None),
                    Some(_) if syncing => shared.dispatch(resp, None),
                    Some(len) if len <= MAX_ATTACHMENT_SIZE => {
                        // Within the limit, so it fits in usize.
                        frames.decoder_mut().expect_attachment(len as usize);
                        awaiting = Some(Awaiting::Reply(resp));
                    }
                    Some(len) => {
                        tracing::warn!(
                            "skipping an attachment of {len} bytes, over {MAX_ATTACHMENT_SIZE}"
                        );
                        frames.decoder_mut().skip_attachment(len);
                        shared.dispatch(resp, None);
                    }
                }
            }
            Ok(Frame::Attachment(data)) => match awaiting.take() {
                Some(Awaiting::Reply(resp)) => shared.dispatch(resp, Some(data.freeze())),
                Some(Awaiting::Notification(n)) => {
                    subscribers.deliver(n.into_notification(Some(data.freeze())));
                }
                Some(Awaiting::Stream(n)) => {
                    stream_message(&shared, &streams, n, Some(data.freeze()));
                }
                None => {}
            },
            Ok(Frame::Oversized) => {
                tracing::warn!("dropping a reply longer than {MAX_RESPONSE_SIZE} bytes");
            }
            Err(e) => {
                tracing::debug!("reading from the agent failed: {e}");
                break;
            }
        }
    }
    tracing::debug!("agent connection closed");
    shared.close();
    streams.lost(Arc::as_ptr(&shared) as usize);
    ends.state.lost(ends.generation, ends.reconnect);
}

/// Handles a notification line: delivers it, or sets the decoder up to
/// read (or skip) its attachment first. Returns what then awaits the
/// attachment.
///
/// While syncing, notifications are dropped with their `attachment` member
/// untrusted, like stale replies: they may be an earlier host's. Once in
/// sync, an announced attachment is always consumed, subscribed to or not,
/// so the stream stays in step.
fn notification(
    frames: &mut FramedRead<ReadHalf, JsonLinesCodec>,
    shared: &Arc<Shared>,
    (subscribers, streams): (&Subscribers, &StreamTable),
    n: notify::Header,
) -> Option<Awaiting> {
    if shared.lock().sync.is_some() {
        tracing::debug!(method = %n.method, "dropping a notification while syncing");
        return None;
    }
    if streams::is_stream_method(&n.method) {
        return match n.attachment {
            None => {
                stream_message(shared, streams, n, None);
                None
            }
            Some(len) if len <= MAX_ATTACHMENT_SIZE => {
                // Within the limit, so it fits in usize.
                frames.decoder_mut().expect_attachment(len as usize);
                Some(Awaiting::Stream(n))
            }
            Some(len) => {
                frames.decoder_mut().skip_attachment(len);
                None
            }
        };
    }
    match n.attachment {
        None => {
            subscribers.deliver(n.into_notification(None));
            None
        }
        Some(len) if len <= MAX_ATTACHMENT_SIZE && subscribers.wants(&n.method) => {
            // Within the limit, so it fits in usize.
            frames.decoder_mut().expect_attachment(len as usize);
            Some(Awaiting::Notification(n))
        }
        Some(len) => {
            if len > MAX_ATTACHMENT_SIZE {
                tracing::warn!(
                    method = %n.method,
                    "dropping a notification whose attachment of {len} bytes is over {MAX_ATTACHMENT_SIZE}"
                );
            } else {
                tracing::debug!(method = %n.method, "dropping a notification nobody subscribed to");
            }
            frames.decoder_mut().skip_attachment(len);
            None
        }
    }
}

/// Hands a stream message to its stream; resets a stream whose rules
/// the agent broke.
fn stream_message(
    shared: &Arc<Shared>,
    streams: &StreamTable,
    n: notify::Header,
    data: Option<Bytes>,
) {
    if let streams::Reply::Reset(stream, reason) = streams.deliver(&n.method, &n.params, data) {
        if let Some(writer) = shared.writer.get().and_then(std::sync::Weak::upgrade) {
            spawn_line(
                writer,
                Some(shared.clone()),
                Method::StreamReset.as_str(),
                &agent_common::methods::StreamResetParams {
                    stream,
                    reason: Some(reason.to_owned()),
                },
            );
        }
    }
}

/// Writes a notification line (no attachment) from a task of its own;
/// without a runtime (it is shutting down) nothing is sent. A failed write
/// ends the connection (`shared`).
fn spawn_line<P: Serialize>(
    writer: Arc<AsyncMutex<Writer>>,
    shared: Option<Arc<Shared>>,
    method: &str,
    params: &P,
) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Ok(line) = encode_notification(method, params, None) else {
        return;
    };
    handle.spawn(async move {
        if shared.as_ref().is_some_and(|s| s.lock().dead) {
            return;
        }
        let mut w = writer.lock_owned().await;
        if write_line(&mut w, &line, false).await.is_err() {
            if let Some(s) = shared {
                s.close();
            }
        }
    });
}

impl Conn {
    fn is_dead(&self) -> bool {
        self.shared.lock().dead
    }

    /// The identity streams record to be ended with this connection.
    pub(super) fn serial(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    /// Sends a notification, with `attachment` (and its check value) after
    /// it.
    pub(super) async fn send_notification<P: Serialize>(
        &self,
        method: &str,
        params: &P,
        attachment: Option<Bytes>,
    ) -> Result<(), ClientError> {
        if self.is_dead() {
            return Err(ClientError::ConnectionLost);
        }
        let line = encode_notification(method, params, attachment.as_deref())?;
        self.send(&line, false, attachment.as_ref()).await
    }

    /// [`Conn::send_notification`] from a task of its own (from a `Drop`
    /// or a poll function); nothing is sent without a runtime.
    pub(super) fn spawn_notification<P: Serialize + Send + Sync + 'static>(
        self: &Arc<Self>,
        method: &'static str,
        params: P,
        attachment: Option<Bytes>,
    ) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let conn = self.clone();
        handle.spawn(async move {
            let _ = conn.send_notification(method, &params, attachment).await;
        });
    }

    /// Writes `line` and the `attachment` it announces, preceded by the
    /// resync byte if asked or if an earlier write was cut short.
    ///
    /// A line with an attachment is written by a task of its own, which a
    /// caller giving up (a timeout, a dropped future) does not cut short:
    /// the resync byte is data inside an attachment, so a cut there could
    /// not be repaired, and the agent would take what follows as the rest.
    async fn send(
        &self,
        line: &[u8],
        resync: bool,
        attachment: Option<&Bytes>,
    ) -> Result<(), ClientError> {
        self.send_tracked(line, resync, attachment, None).await
    }

    /// [`Conn::send`], setting `started` once a line with an attachment is
    /// handed to its writer task (from then on it is written whole, even if
    /// this future is dropped).
    async fn send_tracked(
        &self,
        line: &[u8],
        resync: bool,
        attachment: Option<&Bytes>,
        started: Option<&AtomicBool>,
    ) -> Result<(), ClientError> {
        let mut w = self.writer.clone().lock_owned().await;
        let result = match attachment {
            None => write_line(&mut w, line, resync).await,
            Some(data) => {
                if let Some(s) = started {
                    s.store(true, Ordering::Release);
                }
                let (line, data) = (line.to_vec(), data.clone());
                let write = tokio::spawn(async move {
                    write_line(&mut w, &line, resync).await?;
                    w.half.write_all(&data).await
                });
                write.await.unwrap_or_else(|e| {
                    Err(std::io::Error::other(format!(
                        "the writer task failed: {e}"
                    )))
                })
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.close();
                Err(match e.kind() {
                    std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted => ClientError::ConnectionLost,
                    _ => ClientError::Io(e),
                })
            }
        }
    }

    /// Asks the agent to stop a request or an upload (`cancel`, sent as a
    /// notification), from a task of its own (see [`spawn_cancel`]).
    pub(super) fn spawn_cancel(&self, params: CancelParams) {
        spawn_cancel(self.writer.clone(), Some(self.shared.clone()), params);
    }

    /// Ends the connection: every pending call fails with
    /// [`ClientError::RequestLost`], the reader stops, and the socket
    /// closes once the last call holding it is done. Calls still running on
    /// the agent are asked to stop first (`cancel`), as the agent does not
    /// stop them when a connection ends.
    pub(super) async fn shut(&self) {
        for id in self.shared.unanswered() {
            let params = CancelParams {
                id: Some(id),
                upload_id: None,
            };
            let Ok(line) = encode_notification(CANCEL, &params, None) else {
                continue;
            };
            if self.send(&line, false, None).await.is_err() {
                break;
            }
        }
        self.shared.close();
        self.reader.abort();
        let _ = self.writer.lock().await.half.shutdown().await;
    }
}

/// Writes the resync byte (if asked, or if an earlier write was cut short)
/// and `line`.
async fn write_line(w: &mut Writer, line: &[u8], resync: bool) -> std::io::Result<()> {
    if resync || w.dirty {
        w.dirty = true;
        w.half.write_all(&[RESYNC_BYTE]).await?;
    }
    w.dirty = true;
    w.half.write_all(line).await?;
    w.dirty = false;
    Ok(())
}

/// Writes a `cancel` notification from a task of its own, so that a drop
/// (or the reader) can ask it; without a runtime (it is shutting down)
/// nothing is sent. A failed write ends the connection (`shared`).
fn spawn_cancel(
    writer: Arc<AsyncMutex<Writer>>,
    shared: Option<Arc<Shared>>,
    params: CancelParams,
) {
    spawn_line(writer, shared, CANCEL, &params);
}

/// The chunked upload a `file_write` reply opened (`upload_id` and not
/// `committed`), if it is one.
fn opened_upload(resp: &Response) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Opened {
        upload_id: Option<String>,
        #[serde(default)]
        committed: bool,
    }
    let raw = resp.outcome.as_ref().ok()?;
    let r: Opened = serde_json::from_str(raw.get()).ok()?;
    r.upload_id.filter(|_| !r.committed)
}

/// How one attempt at a call ended.
enum Attempt {
    /// Answered, or failed after the request was sent.
    Done(Result<Answer, ClientError>),
    /// Failed before the whole request was written.
    NotSent(ClientError),
    /// The deadline passed.
    TimedOut,
}

/// A successful reply: the raw result and the attachment that came with it.
type Answer = (Box<RawValue>, Option<Bytes>);

/// A pending call's entry in the connection, from before its request is
/// written until the call ends in any way (answered, failed, timed out, or
/// its future dropped at any await point).
///
/// A call that ends unanswered after its request may have reached the
/// agent is *abandoned*: its entry stays until the late reply (dropped
/// then), keeping the call's flow-control permit, because the agent holds
/// the request's slot until it has written that reply; and, for a method
/// that takes a slot, the agent is asked to stop it (`cancel`). A call
/// whose request was never (wholly) written leaves nothing behind: a cut
/// line is discarded by the next write's resync byte.
struct PendingGuard {
    conn: Arc<Conn>,
    id: u64,
    /// The request may have reached the agent.
    sent: Arc<AtomicBool>,
    /// The reply was taken.
    answered: bool,
    /// Ask the agent to stop the request if it is abandoned.
    cancel: bool,
    /// How long an abandoned entry waits for its reply at most.
    grace: Duration,
    permit: Option<OwnedSemaphorePermit>,
    /// Where the reply arrives.
    rx: oneshot::Receiver<Reply>,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut st = self.conn.shared.lock();
        if self.answered || !self.sent.load(Ordering::Acquire) {
            let waiter = st.pending.remove(&self.id);
            drop(st);
            drop(waiter);
            return;
        }
        let abandoned = match st.pending.get_mut(&self.id) {
            Some(w) => {
                *w = Waiter::Abandoned(self.permit.take());
                true
            }
            // Answered meanwhile (nobody took it) or the connection died.
            None => false,
        };
        drop(st);
        if let Ok(reply) = self.rx.try_recv() {
            // The reply came but nobody took it: an upload it opened is
            // nobody's (as for a late reply, see `Shared::dispatch`).
            if let Some(upload_id) = opened_upload(&reply.response) {
                self.conn.spawn_cancel(CancelParams {
                    id: None,
                    upload_id: Some(upload_id),
                });
            }
        }
        if abandoned && self.cancel {
            tracing::debug!(id = self.id, "asking the agent to stop a call given up");
            self.conn.spawn_cancel(CancelParams {
                id: Some(self.id),
                upload_id: None,
            });
        }
        if abandoned {
            forget_after(&self.conn.shared, self.id, self.grace);
        }
    }
}

/// Extra time an abandoned call's entry (and its flow-control permit) waits
/// for the agent's reply beyond what the agent's own limits allow.
const ABANDON_MARGIN: Duration = if cfg!(test) {
    Duration::from_secs(2)
} else {
    Duration::from_secs(15)
};

/// How long an abandoned call may wait for its late reply: a live agent
/// answers a cancelled call at once (a `file_write` past its point of no
/// return within 10 s), and any other within its own time limit. A reply
/// that never comes (the agent restarted behind a connection that stayed
/// open, as QEMU's chardev does across a guest reboot) must not hold a
/// permit for ever.
fn abandon_grace(limits: Option<&agent_common::methods::Limits>, cancelled: bool) -> Duration {
    if cancelled {
        return ABANDON_MARGIN;
    }
    let own = limits.map_or(300, |l| {
        l.max_command_timeout_seconds.max(l.request_timeout_seconds)
    });
    Duration::from_secs(own) + ABANDON_MARGIN
}

/// Drops abandoned entry `id` (and the permit it keeps) after `grace` if
/// its reply has not come by then.
fn forget_after(shared: &Arc<Shared>, id: u64, grace: Duration) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let shared = Arc::downgrade(shared);
    handle.spawn(async move {
        tokio::time::sleep(grace).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut st = shared.lock();
        if matches!(st.pending.get(&id), Some(Waiter::Abandoned(_))) {
            let waiter = st.pending.remove(&id);
            drop(st);
            tracing::debug!(
                id,
                "no reply to a call given up in {grace:?}; forgetting it"
            );
            drop(waiter);
        }
    });
}

/// A random `u64` from the standard library's randomly seeded hasher.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.write_u32(std::process::id());
    h.finish()
}

fn encode_request<P: Serialize>(
    method: &str,
    params: &P,
    id: u64,
    attachment: Option<&[u8]>,
) -> Result<BytesMut, ClientError> {
    let id = Id::number(id);
    let mut buf = BytesMut::new();
    let mut req = OutgoingRequest::new(method, params, &id);
    if let Some(data) = attachment {
        req = req.with_attachment(data);
    }
    encode_line(&req, &mut buf).map_err(|e| match e {
        agent_common::codec::CodecError::Serialize(source) => ClientError::Encode {
            method: method.to_owned(),
            source,
        },
        agent_common::codec::CodecError::Io(e) => ClientError::Io(e),
    })?;
    Ok(buf)
}

fn encode_notification<P: Serialize>(
    method: &str,
    params: &P,
    attachment: Option<&[u8]>,
) -> Result<BytesMut, ClientError> {
    let mut buf = BytesMut::new();
    let req = OutgoingRequest {
        jsonrpc: agent_common::jsonrpc::JSONRPC_VERSION,
        method,
        params,
        id: None,
        attachment: attachment.map(|a| a.len() as u64),
        attachment_crc32: attachment.map(agent_common::attachment_crc32),
    };
    encode_line(&req, &mut buf).map_err(|e| match e {
        agent_common::codec::CodecError::Serialize(source) => ClientError::Encode {
            method: method.to_owned(),
            source,
        },
        agent_common::codec::CodecError::Io(e) => ClientError::Io(e),
    })?;
    Ok(buf)
}

/// True for the methods that take one of the agent's slots (every method
/// but the instant ones; a method this build does not know is counted as
/// taking one).
pub(super) fn takes_slot(method: &str) -> bool {
    Method::from_name(method).map_or(true, |m| !m.is_instant())
}

/// Undoes a `sync` that did not complete (failed, timed out, or its future
/// was dropped): the reader stops waiting for its nonce, and the next call
/// resyncs.
/// How long a sync waits before it sends another (PROTOCOL.md,
/// implementer's checklist, step 1).
const SYNC_RESEND: Duration = Duration::from_secs(1);

struct SyncGuard<'a> {
    conn: &'a Conn,
    id: u64,
    done: bool,
}

impl Drop for SyncGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.conn.shared.lock();
        if matches!(&st.sync, Some(p) if p.attempts.first().is_some_and(|&(id, _)| id == self.id)) {
            st.sync = None;
        }
        drop(st);
        self.conn.needs_resync.store(true, Ordering::Release);
    }
}

impl Client {
    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Returns a connection that is synced, connecting or resyncing first if
    /// needed.
    pub(super) async fn ready(&self) -> Result<Arc<Conn>, ClientError> {
        let mut slot = self.inner.conn.lock().await;
        if slot.is_some() {
            // Let the reader task see an end of stream that is already
            // there (on a current-thread runtime it does not run between
            // calls), so a dead connection is replaced before use.
            tokio::task::yield_now().await;
        }
        let state = &self.inner.state;
        if let Some(conn) = slot.as_ref() {
            if !conn.is_dead() {
                if !conn.needs_resync.swap(false, Ordering::AcqRel) {
                    return Ok(conn.clone());
                }
                let conn = conn.clone();
                tracing::debug!("resynchronising after a timeout");
                state.set(ConnectionState::Resyncing);
                match self.sync(&conn).await {
                    Ok(()) => {
                        state.set(ConnectionState::Connected);
                        return Ok(conn);
                    }
                    Err(e) => {
                        *slot = None;
                        state.set(ConnectionState::Disconnected);
                        return Err(e);
                    }
                }
            }
            *slot = None;
            if !self.inner.opts.reconnect {
                self.inner.closed.store(true, Ordering::Release);
            }
        }
        if self.inner.closed.load(Ordering::Acquire) {
            state.set(ConnectionState::Gone);
            return Err(ClientError::ConnectionLost);
        }
        state.set(if state.get() == ConnectionState::Idle {
            ConnectionState::Connecting
        } else {
            ConnectionState::Reconnecting
        });
        let generation = state.next_generation();
        let opened = self.open(generation).await;
        let conn = match opened {
            Ok(conn) => conn,
            Err(e) => {
                state.set(ConnectionState::Disconnected);
                return Err(e);
            }
        };
        if let Err(e) = self.sync(&conn).await {
            state.set(ConnectionState::Disconnected);
            return Err(e);
        }
        *self.served_slot() = None;
        *slot = Some(conn.clone());
        state.set(ConnectionState::Connected);
        Ok(conn)
    }

    /// Ends the current connection, if any (see [`Conn::shut`]); with
    /// `for_good`, the client never connects again.
    pub(super) async fn end_connection(&self, for_good: bool) {
        let mut slot = self.inner.conn.lock().await;
        if for_good {
            self.inner.closed.store(true, Ordering::Release);
        }
        if let Some(conn) = slot.take() {
            conn.shut().await;
        }
        self.inner.state.set(if for_good {
            ConnectionState::Gone
        } else {
            ConnectionState::Disconnected
        });
    }

    async fn open(&self, generation: u64) -> Result<Arc<Conn>, ClientError> {
        let path = &self.inner.path;
        let after = self.inner.opts.connect_timeout;
        let (read, write) = match tokio::time::timeout(after, self.inner.connector.connect()).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(ClientError::Connect {
                    path: path.clone(),
                    source,
                })
            }
            Err(_) => {
                return Err(ClientError::ConnectTimeout {
                    path: path.clone(),
                    after,
                })
            }
        };
        tracing::debug!(path = %path.display(), "connected");
        let shared = Arc::new(Shared::default());
        let ends = Ends {
            state: self.inner.state.clone(),
            generation,
            reconnect: self.inner.opts.reconnect,
        };
        let sinks = Sinks {
            subscribers: self.inner.subscribers.clone(),
            streams: self.inner.streams.clone(),
        };
        let reader = tokio::spawn(read_loop(read, shared.clone(), sinks, ends));
        let writer = Arc::new(AsyncMutex::new(Writer {
            half: write,
            dirty: false,
        }));
        let _ = shared.writer.set(Arc::downgrade(&writer));
        Ok(Arc::new(Conn {
            writer,
            shared,
            reader,
            needs_resync: AtomicBool::new(false),
        }))
    }

    /// 0xFF + `sync` with a fresh nonce; waits for the reply with that
    /// nonce, sending 0xFF + `sync` again with a new nonce after
    /// [`SYNC_RESEND`] (then twice as long each time, at most 4 s) until
    /// `sync_timeout`; a reply to any of them ends the sync.
    ///
    /// Resending matters: the guest kernel can deliver a new host's first
    /// bytes before it reports that the previous host left, so the agent's
    /// session for the previous host may read them and end, dropping its
    /// replies (PROTOCOL.md, "Resynchronisation").
    ///
    /// Cancellation-safe: if this future is dropped (an embedder's own
    /// timeout around a call), a guard forgets the sync in progress and
    /// marks the connection for a resync, so the next call syncs again
    /// instead of finding the reader still waiting for this nonce.
    async fn sync(&self, conn: &Conn) -> Result<(), ClientError> {
        let (tx, mut rx) = oneshot::channel();
        let mut tx = Some(tx);
        let mut guard: Option<SyncGuard<'_>> = None;
        let after = self.inner.opts.sync_timeout;
        let mut wait = SYNC_RESEND;
        let outcome = tokio::time::timeout(after, async {
            loop {
                let nonce = random_u64();
                let id = self.next_id();
                let line = encode_request(SYNC, &SyncParams { nonce }, id, None)?;
                {
                    let mut st = conn.shared.lock();
                    if st.dead {
                        return Err(ClientError::ConnectionLost);
                    }
                    match (&mut st.sync, tx.take()) {
                        // The first attempt.
                        (None, Some(tx)) => {
                            st.sync = Some(PendingSync {
                                attempts: vec![(id, nonce)],
                                tx,
                            });
                            guard = Some(SyncGuard {
                                conn,
                                id,
                                done: false,
                            });
                        }
                        // Another one for the same sync.
                        (Some(pending), None) => pending.attempts.push((id, nonce)),
                        // Answered meanwhile: the answer is in `rx`.
                        _ => {}
                    }
                }
                conn.send(&line, true, None).await?;
                match tokio::time::timeout(wait, &mut rx).await {
                    Ok(Ok(Ok(()))) => return Ok(()),
                    Ok(Ok(Err(error))) => {
                        return Err(ClientError::Agent {
                            method: SYNC.to_owned(),
                            error,
                        })
                    }
                    Ok(Err(_)) => return Err(ClientError::ConnectionLost),
                    Err(_) => {
                        tracing::debug!(?wait, "no reply to sync yet; sending another");
                        wait = (wait * 2).min(Duration::from_secs(4));
                    }
                }
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => {
                if let Some(g) = guard.as_mut() {
                    g.done = true;
                }
                Ok(())
            }
            // The guard forgets the sync and asks for another.
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Timeout {
                method: SYNC.to_owned(),
                after,
            }),
        }
    }

    pub(super) async fn request<P: Serialize>(
        &self,
        method: &str,
        params: &P,
        after: Duration,
    ) -> Result<Box<RawValue>, ClientError> {
        self.request_with(method, params, None, after)
            .await
            .map(|(raw, _)| raw)
    }

    /// A call that may send an attachment and receive one, within `after`
    /// (and the client's deadline, if it has one): flow control, the
    /// connection, the request and its reply, and the retries that are
    /// always safe (a request that was never sent; `busy`, which did
    /// nothing, when the client retries it).
    pub(super) async fn request_with<P: Serialize>(
        &self,
        method: &str,
        params: &P,
        attachment: Option<&Bytes>,
        after: Duration,
    ) -> Result<Answer, ClientError> {
        let start = tokio::time::Instant::now();
        let deadline = self.deadline_for(after);
        let timed_out = || ClientError::Timeout {
            method: method.to_owned(),
            after: deadline.saturating_duration_since(start),
        };
        let slot = takes_slot(method);
        let mut retried = false;
        let mut busy_left = self.busy_retries();
        let mut backoff = BUSY_BACKOFF;
        loop {
            let permit = if slot && self.inner.opts.flow_control {
                match self.flow_permit(deadline).await? {
                    Flow::Permit(p) => Some(p),
                    Flow::Unbounded => None,
                    Flow::TimedOut => return Err(timed_out()),
                }
            } else {
                None
            };
            let conn = match tokio::time::timeout_at(deadline, self.ready()).await {
                Ok(conn) => conn?,
                Err(_) => return Err(timed_out()),
            };
            let cancel = slot && self.cancel_abandoned();
            let attempt = self
                .request_on(&conn, method, params, attachment, deadline, permit, cancel)
                .await;
            match attempt {
                Attempt::Done(Err(e)) if e.is_busy() && busy_left > 0 => {
                    // Nothing was done: wait, then ask again.
                    busy_left -= 1;
                    let wake = tokio::time::Instant::now() + backoff;
                    if wake >= deadline {
                        return Err(e);
                    }
                    tracing::debug!("{method} answered busy; retrying in {backoff:?}");
                    tokio::time::sleep_until(wake).await;
                    backoff = backoff.saturating_mul(2);
                }
                Attempt::Done(r) => return r,
                // The request never fully reached the agent (the connection
                // had died unnoticed, e.g. while a blocking client was idle),
                // so it cannot have run: retry it once on a new connection.
                Attempt::NotSent(e) if retried || !self.inner.opts.reconnect => return Err(e),
                Attempt::NotSent(e) => {
                    tracing::debug!("{method} not sent ({e}); reconnecting");
                    retried = true;
                }
                Attempt::TimedOut => {
                    conn.needs_resync.store(true, Ordering::Release);
                    return Err(timed_out());
                }
            }
        }
    }

    /// A call on `conn` itself, never on another connection (a stream's
    /// open: the stream lives on the connection it was opened on).
    pub(super) async fn request_on_conn<P: Serialize>(
        &self,
        conn: &Arc<Conn>,
        method: &str,
        params: &P,
    ) -> Result<Box<RawValue>, ClientError> {
        let deadline = self.deadline_for(self.call_timeout());
        let timed_out = || ClientError::Timeout {
            method: method.to_owned(),
            after: self.call_timeout(),
        };
        let permit = if takes_slot(method) && self.inner.opts.flow_control {
            match self.flow_permit(deadline).await? {
                Flow::Permit(p) => Some(p),
                Flow::Unbounded => None,
                Flow::TimedOut => return Err(timed_out()),
            }
        } else {
            None
        };
        let cancel = takes_slot(method) && self.cancel_abandoned();
        match self
            .request_on(conn, method, params, None, deadline, permit, cancel)
            .await
        {
            Attempt::Done(r) => r.map(|(raw, _)| raw),
            Attempt::NotSent(e) => Err(e),
            Attempt::TimedOut => {
                conn.needs_resync.store(true, Ordering::Release);
                Err(timed_out())
            }
        }
    }

    /// One attempt at a call on `conn`.
    #[allow(clippy::too_many_arguments)]
    async fn request_on<P: Serialize>(
        &self,
        conn: &Arc<Conn>,
        method: &str,
        params: &P,
        attachment: Option<&Bytes>,
        deadline: tokio::time::Instant,
        permit: Option<OwnedSemaphorePermit>,
        cancel: bool,
    ) -> Attempt {
        let id = self.next_id();
        let line = match encode_request(method, params, id, attachment.map(|a| &a[..])) {
            Ok(l) => l,
            Err(e) => return Attempt::Done(Err(e)),
        };
        // The agent would refuse a longer line with an error it cannot
        // address to this call (`"id": null`); refuse it here instead.
        let limits = self
            .served_slot()
            .as_ref()
            .map(|s| (s.limits.max_message_size, s.limits.max_attachment_size));
        let size = line.len().saturating_sub(1);
        if let Some((limit, _)) = limits.filter(|&(l, _)| size as u64 > l) {
            return Attempt::Done(Err(ClientError::RequestTooLarge {
                method: method.to_owned(),
                size,
                limit,
            }));
        }
        if let Some(data) = attachment {
            let limit = limits.map_or(MAX_ATTACHMENT_SIZE, |(_, a)| a);
            if data.len() as u64 > limit {
                return Attempt::Done(Err(ClientError::RequestTooLarge {
                    method: method.to_owned(),
                    size: data.len(),
                    limit,
                }));
            }
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut st = conn.shared.lock();
            if st.dead {
                return Attempt::NotSent(ClientError::ConnectionLost);
            }
            st.pending.insert(id, Waiter::Call(tx));
        }
        let sent = Arc::new(AtomicBool::new(false));
        let grace = abandon_grace(self.served_slot().as_ref().map(|s| &s.limits), cancel);
        let mut guard = PendingGuard {
            conn: conn.clone(),
            id,
            sent: sent.clone(),
            answered: false,
            cancel,
            grace,
            permit,
            rx,
        };
        // A line with an attachment is written by a task of its own that a
        // drop does not stop: `send_tracked` marks it sent when it starts.
        let send = conn.send_tracked(&line, false, attachment, Some(&sent));
        match tokio::time::timeout_at(deadline, send).await {
            Err(_) => return Attempt::TimedOut,
            Ok(Err(e)) => {
                sent.store(false, Ordering::Release);
                return Attempt::NotSent(e);
            }
            Ok(Ok(())) => sent.store(true, Ordering::Release),
        }
        match tokio::time::timeout_at(deadline, &mut guard.rx).await {
            Err(_) => Attempt::TimedOut,
            Ok(Err(_)) => Attempt::Done(Err(ClientError::RequestLost {
                method: method.to_owned(),
            })),
            Ok(Ok(reply)) => {
                guard.answered = true;
                Attempt::Done(match (reply.response.outcome, reply.attachment) {
                    (Err(error), _) => Err(ClientError::Agent {
                        method: method.to_owned(),
                        error,
                    }),
                    (Ok(_), None) if reply.response.attachment.is_some() => {
                        Err(ClientError::Protocol(format!(
                            "the {method} reply announced an attachment larger than {MAX_ATTACHMENT_SIZE} bytes"
                        )))
                    }
                    (Ok(raw), data) => Ok((raw, data)),
                })
            }
        }
    }
}

/// The first wait before retrying a `busy` call; doubled for each retry.
const BUSY_BACKOFF: Duration = Duration::from_millis(20);

/// The wire name of `cancel`.
const CANCEL: &str = Method::Cancel.as_str();

/// The wire name of `sync` (used internally only).
const SYNC: &str = agent_common::methods::Method::Sync.as_str();

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientOptions;
    use crate::fake::{self, reply, serve, FakeConn};
    use agent_common::error::{ErrorKind, ErrorObject};
    use agent_common::methods::SystemInfo;
    use serde_json::{json, Value};
    use std::sync::atomic::AtomicUsize;

    use crate::fake::client_opts as opts;

    fn echo_agent() -> fake::Handler {
        fake::handler(|method, params| async move {
            match method.as_str() {
                "ping" => Ok(json!({"pong": true, "timestamp": 42})),
                "echo" => Ok(params),
                "fail" => Err(ErrorObject::new(ErrorKind::PolicyDenied, "not allowed")),
                _ => Err(ErrorObject::new(
                    ErrorKind::MethodNotFound,
                    "no such method",
                )),
            }
        })
    }

    #[test]
    fn client_is_send_sync_and_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Client>();
    }

    #[tokio::test]
    async fn sync_drops_stale_partial_and_wrong_nonce_lines() {
        let resyncs = Arc::new(AtomicUsize::new(0));
        let seen = resyncs.clone();
        let agent = fake::spawn(move |mut c: FakeConn, _| {
            let seen = seen.clone();
            async move {
                // Output meant for an earlier client: the tail of a line and
                // a stale sync reply, before the new client says anything.
                c.send_raw(b"\"timestamp\":1},\"id\":7}\n").await;
                c.send_raw(br#"{"jsonrpc":"2.0","result":{"nonce":1},"id":1}"#)
                    .await;
                c.send_raw(b"\n").await;
                let (id, nonce) = c.expect_sync().await;
                seen.store(c.resync_bytes, Ordering::SeqCst);
                let sid = id.as_u64().unwrap();
                // Replies carrying the ids the client will use next.
                for later in sid + 1..sid + 4 {
                    reply(&c, Id::number(later), json!({"pong": true, "timestamp": 1})).await;
                }
                // The right id with the wrong nonce, and garbage.
                reply(&c, id.clone(), json!({"nonce": nonce.wrapping_add(1)})).await;
                c.send_raw(b"{\"jsonrpc\":\"2.0\",\"result\":{\"nonce\":\n")
                    .await;
                c.send_raw(b"not json at all\n").await;
                reply(&c, id, json!({"nonce": nonce})).await;
                serve(c, echo_agent()).await;
            }
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        for _ in 0..3 {
            assert_eq!(client.ping().await.unwrap().timestamp, 42);
        }
        assert_eq!(resyncs.load(Ordering::SeqCst), 1, "0xFF precedes the sync");
    }

    #[tokio::test]
    async fn a_sync_the_agent_never_saw_is_sent_again() {
        // The first 0xFF + sync is lost, as when the agent's session for the
        // previous host reads it and ends: the client sends another, with a
        // new nonce, and is in sync once that one is answered.
        let agent = fake::spawn(|mut c: FakeConn, _| async move {
            let (_lost_id, lost_nonce) = c.expect_sync().await;
            let (id, nonce) = c.expect_sync().await;
            assert_ne!(nonce, lost_nonce, "a resent sync carries a new nonce");
            reply(&c, id, json!({ "nonce": nonce })).await;
            serve(c, echo_agent()).await;
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        assert_eq!(client.ping().await.unwrap().timestamp, 42);
        assert_eq!(agent.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_late_answer_to_an_earlier_sync_attempt_also_ends_the_sync() {
        // A slow agent answers the first sync only after the second was
        // sent: either answer will do, and the other is dropped as stale.
        let agent = fake::spawn(|mut c: FakeConn, _| async move {
            let (id1, nonce1) = c.expect_sync().await;
            let (_id2, _nonce2) = c.expect_sync().await;
            reply(&c, id1, json!({ "nonce": nonce1 })).await;
            serve(c, echo_agent()).await;
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        assert_eq!(client.ping().await.unwrap().timestamp, 42);
    }

    #[tokio::test]
    async fn a_call_dropped_during_its_resync_leaves_the_connection_in_step() {
        // The agent answers the first sync and ping, never the second ping
        // (the client's call times out: resync needed) nor the second sync
        // (the next call is dropped by the embedder while it resyncs), and
        // then everything.
        let agent = fake::spawn(|mut c: FakeConn, _| async move {
            let (id, nonce) = c.expect_sync().await;
            reply(&c, id, json!({ "nonce": nonce })).await;
            let req = c.next_request().await.unwrap();
            reply(&c, req.id.unwrap(), json!({"pong": true, "timestamp": 1})).await;
            let _ignored_ping = c.next_request().await.unwrap();
            let _ignored_sync = c.expect_sync().await;
            let (id, nonce) = c.expect_sync().await;
            reply(&c, id, json!({ "nonce": nonce })).await;
            serve(c, echo_agent()).await;
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        assert_eq!(client.ping().await.unwrap().timestamp, 1);
        let e = client
            .call_raw_with_timeout("ping", json!({}), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
        // Dropped while resyncing (the agent does not answer that sync).
        let dropped = tokio::time::timeout(Duration::from_millis(300), client.ping()).await;
        assert!(dropped.is_err(), "the call was expected to be dropped");
        // The connection is still usable: the next call resyncs first.
        assert_eq!(client.ping().await.unwrap().timestamp, 42);
        assert_eq!(agent.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn replies_out_of_order_reach_their_callers() {
        let agent = fake::spawn(|mut c: FakeConn, _| async move {
            let (id, nonce) = c.expect_sync().await;
            reply(&c, id, json!({ "nonce": nonce })).await;
            let mut held = Vec::new();
            for _ in 0..5 {
                let req = c.next_request().await.unwrap();
                held.push((req.id.clone().unwrap(), req.params::<Value>().unwrap()));
            }
            // All five are in flight at once; answer them backwards.
            for (id, params) in held.into_iter().rev() {
                reply(&c, id, params).await;
            }
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        let calls = (0..5).map(|i| {
            let c = client.clone();
            async move { c.call_raw("echo", json!({ "n": i })).await.map(|v| (i, v)) }
        });
        for r in futures::future::join_all(calls).await {
            let (i, v) = r.unwrap();
            assert_eq!(v, json!({ "n": i }));
        }
    }

    #[tokio::test]
    async fn timeout_resyncs_and_a_late_reply_is_never_taken_for_another() {
        let syncs = Arc::new(AtomicUsize::new(0));
        let resync_bytes = Arc::new(AtomicUsize::new(0));
        let (s, r) = (syncs.clone(), resync_bytes.clone());
        let agent = fake::spawn(move |mut c: FakeConn, _| {
            let (s, r) = (s.clone(), r.clone());
            async move {
                let (id, nonce) = c.expect_sync().await;
                s.fetch_add(1, Ordering::SeqCst);
                reply(&c, id, json!({ "nonce": nonce })).await;
                let slow = c.next_request().await.unwrap();
                assert_eq!(slow.method, "slow");
                let slow_id = slow.id.unwrap();
                // The client gives up and resyncs on its next call.
                let (id, nonce) = c.expect_sync().await;
                s.fetch_add(1, Ordering::SeqCst);
                r.store(c.resync_bytes, Ordering::SeqCst);
                reply(&c, slow_id.clone(), json!({ "n": "late" })).await;
                reply(&c, id, json!({ "nonce": nonce })).await;
                let echo = c.next_request().await.unwrap();
                reply(&c, slow_id, json!({ "n": "late" })).await;
                let params = echo.params::<Value>().unwrap();
                reply(&c, echo.id.unwrap(), params).await;
                serve(c, echo_agent()).await;
            }
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        let e = client
            .call_raw_with_timeout("slow", json!({}), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Timeout { method, .. } if method == "slow"),
            "{e:?}"
        );
        assert_eq!(
            client.call_raw("echo", json!({"n": 1})).await.unwrap(),
            json!({"n": 1})
        );
        assert_eq!(
            client.call_raw("echo", json!({"n": 2})).await.unwrap(),
            json!({"n": 2})
        );
        assert_eq!(syncs.load(Ordering::SeqCst), 2);
        assert_eq!(resync_bytes.load(Ordering::SeqCst), 2);
        assert_eq!(
            agent.connections.load(Ordering::SeqCst),
            1,
            "resynced in place"
        );
    }

    #[tokio::test]
    async fn connection_lost_fails_pending_calls_and_the_next_call_reconnects() {
        let agent = fake::spawn(|mut c: FakeConn, n| async move {
            if n == 0 {
                let (id, nonce) = c.expect_sync().await;
                reply(&c, id, json!({ "nonce": nonce })).await;
                // Take the call, then vanish (the VM rebooted).
                let _ = c.next_request().await;
                return;
            }
            serve(c, echo_agent()).await;
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        let e = client.ping().await.unwrap_err();
        // The agent took the ping before it vanished: it may have run.
        assert!(
            matches!(&e, ClientError::RequestLost { method } if method == "ping"),
            "{e:?}"
        );
        assert!(e.is_transient() && e.may_have_run());
        assert_eq!(client.ping().await.unwrap().timestamp, 42);
        assert_eq!(agent.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_that_died_is_replaced_without_an_error() {
        let agent = fake::spawn(|mut c: FakeConn, n| async move {
            if n == 0 {
                let (id, nonce) = c.expect_sync().await;
                reply(&c, id, json!({ "nonce": nonce })).await;
                return; // The agent restarts while the client is idle.
            }
            serve(c, echo_agent()).await;
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        // Let the close happen first (the outcome is the same either way:
        // the reader notices it, or the write fails and is retried).
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(client.ping().await.unwrap().timestamp, 42);
        assert_eq!(agent.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_attachment_is_written_whole_even_when_its_call_times_out() {
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let go_rx = Arc::new(tokio::sync::Mutex::new(Some(go_rx)));
        let got = Arc::new(StdMutex::new(Vec::new()));
        let seen = got.clone();
        let agent = fake::spawn(move |mut c: FakeConn, _| {
            let (go_rx, seen) = (go_rx.clone(), seen.clone());
            async move {
                let (id, nonce) = c.expect_sync().await;
                reply(&c, id, json!({ "nonce": nonce })).await;
                // Stop reading until the call has timed out with its
                // attachment (bigger than the socket buffers) half-written.
                if let Some(rx) = go_rx.lock().await.take() {
                    let _ = rx.await;
                }
                while let Some((req, data)) = c.next_request_with_attachment().await {
                    seen.lock()
                        .unwrap()
                        .push((req.method.clone(), data.map_or(0, |d| d.len())));
                    let result = match req.method.as_str() {
                        "sync" => req.params().unwrap(),
                        _ => json!({"pong": true, "timestamp": 42}),
                    };
                    if let Some(id) = req.id {
                        reply(&c, id, result).await;
                    }
                }
            }
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        let data = Bytes::from(vec![0xffu8; 1 << 20]);
        let r = client
            .request_with(
                "file_write",
                &json!({}),
                Some(&data),
                Duration::from_millis(200),
            )
            .await;
        assert!(
            matches!(r, Err(ClientError::Timeout { .. })),
            "{:?}",
            r.err()
        );
        go_tx.send(()).unwrap();
        assert_eq!(client.ping().await.unwrap().timestamp, 42);
        // The agent got the whole attachment, then the resync and sync that
        // follow a timeout, then the ping: the stream stayed in step.
        let got = got.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![
                ("file_write".to_owned(), 1 << 20),
                ("sync".to_owned(), 0),
                ("ping".to_owned(), 0),
            ]
        );
        assert_eq!(agent.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_write_cut_short_by_a_timeout_is_discarded_by_the_next_resync() {
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let go_rx = Arc::new(tokio::sync::Mutex::new(Some(go_rx)));
        let first_after = Arc::new(StdMutex::new(String::new()));
        let seen = first_after.clone();
        let agent = fake::spawn(move |mut c: FakeConn, _| {
            let (go_rx, seen) = (go_rx.clone(), seen.clone());
            async move {
                let (id, nonce) = c.expect_sync().await;
                reply(&c, id, json!({ "nonce": nonce })).await;
                // Stop reading until the client has given up on a request
                // too big for the socket buffers.
                if let Some(rx) = go_rx.lock().await.take() {
                    let _ = rx.await;
                }
                let req = c.next_request().await.unwrap();
                *seen.lock().unwrap() = req.method.clone();
                let params: Value = req.params().unwrap();
                reply(&c, req.id.unwrap(), params).await;
                serve(c, echo_agent()).await;
            }
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        let huge = "x".repeat(16 << 20);
        let e = client
            .call_raw_with_timeout("echo", json!({ "x": huge }), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
        go_tx.send(()).unwrap();
        assert_eq!(client.ping().await.unwrap().timestamp, 42);
        // The half-written line was dropped by the agent's codec: the next
        // thing it read was the resync.
        assert_eq!(*first_after.lock().unwrap(), "sync");
        assert_eq!(agent.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn no_reconnect_when_disabled() {
        let agent = fake::spawn(|mut c: FakeConn, _| async move {
            let (id, nonce) = c.expect_sync().await;
            reply(&c, id, json!({ "nonce": nonce })).await;
        });
        let o = ClientOptions {
            reconnect: false,
            ..opts()
        };
        let client = Client::connect_with(&agent.path, o).await.unwrap();
        assert!(client.ping().await.is_err());
        assert!(matches!(
            client.ping().await,
            Err(ClientError::ConnectionLost)
        ));
        assert_eq!(agent.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_silent_channel_is_a_sync_timeout() {
        let agent = fake::spawn(|mut c: FakeConn, _| async move {
            // QEMU accepts the connection but no agent answers.
            while c.next_request().await.is_some() {}
        });
        let o = ClientOptions {
            sync_timeout: Duration::from_millis(100),
            ..opts()
        };
        let e = Client::connect_with(&agent.path, o).await.unwrap_err();
        assert!(
            matches!(&e, ClientError::Timeout { method, .. } if method == "sync"),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nothing.sock");
        let e = Client::connect_with(&path, opts()).await.unwrap_err();
        match e {
            ClientError::Connect { path: p, source } => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn agent_errors_carry_their_kind_and_bad_results_are_reported() {
        let agent = fake::spawn(|c: FakeConn, _| serve(c, echo_agent()));
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        let e = client.call_raw("fail", json!({})).await.unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::PolicyDenied));
        assert!(e.to_string().contains("not allowed"), "{e}");
        // `echo` returns {} which is not a SystemInfo.
        let e = client
            .call_raw("echo", json!({}))
            .await
            .and_then(|v| {
                serde_json::from_value::<SystemInfo>(v).map_err(|source| ClientError::BadResult {
                    method: "echo".into(),
                    source,
                })
            })
            .unwrap_err();
        assert!(matches!(e, ClientError::BadResult { .. }));
    }

    #[tokio::test]
    async fn many_tasks_share_one_connection() {
        let agent = fake::spawn(|c: FakeConn, _| serve(c, echo_agent()));
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let c = client.clone();
                tokio::spawn(async move { c.call_raw("echo", json!({ "i": i })).await })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), json!({ "i": i }));
        }
        assert_eq!(agent.connections.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn only_an_upload_left_open_is_aborted_for_a_call_given_up() {
        let ok = |v: Value| Response::ok(Id::number(1), &v);
        let cases = [
            (
                ok(json!({"upload_id": "u1", "committed": false, "bytes_written": 1, "size": 1})),
                Some("u1"),
            ),
            (ok(json!({"upload_id": "u2"})), Some("u2")),
            (
                ok(json!({"committed": true, "bytes_written": 1, "size": 1})),
                None,
            ),
            (ok(json!({"upload_id": "u3", "committed": true})), None),
            (ok(json!({"pong": true})), None),
            (ok(json!([1, 2])), None),
            (
                Response::error(Id::number(1), ErrorObject::new(ErrorKind::Busy, "busy")),
                None,
            ),
        ];
        for (resp, want) in cases {
            assert_eq!(opened_upload(&resp).as_deref(), want, "{:?}", resp.outcome);
        }
    }

    #[test]
    fn random_values_differ() {
        let a: std::collections::HashSet<u64> = (0..100).map(|_| random_u64()).collect();
        assert_eq!(a.len(), 100);
    }
}
