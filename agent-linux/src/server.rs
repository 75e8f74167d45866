//! One host connection: read request lines, run them concurrently, write
//! the replies.
//!
//! The same session loop serves a virtio-serial port and a Unix socket; the
//! transports differ only in what end of input means (see [`OnEof`]).
//!
//! # Framing
//!
//! What a line says about an attachment is read apart from everything else
//! about it ([`announced_attachment`]), so the framing stays in step however
//! malformed the line is:
//! - a valid size: exactly that many bytes are taken (up to
//!   [`MAX_ATTACHMENT_SIZE`], handed to the request) or skipped unbuffered
//!   (larger, or the line is refused for another reason), and the line gets
//!   the reply it deserves;
//! - a size that cannot be known (a malformed or repeated `attachment`
//!   member, or a line too long to keep): the line is answered and input is
//!   dropped up to the next resync byte, so nothing that may be attachment
//!   data is ever parsed as a request;
//! - an attachment that stops arriving is given up after
//!   [`ATTACHMENT_TIMEOUT`]: its request is answered `timeout` and input is
//!   dropped up to the next resync byte, because the bytes that follow (a new
//!   host's, if the old one died half-way) cannot be told apart from its
//!   data. An attachment completed by such bytes fails its check value
//!   (`attachment_crc32`) and is never written.
//!
//! # Back-pressure
//!
//! Every request read holds a permit of its session until its reply has
//! been written (or, for a notification, until it has run): at most
//! [`pending_limit`] requests, plus [`INSTANT_RESERVE`] for `ping`, `sync`,
//! `get_agent_info` and `cancel`, so that a health check needs no place behind
//! queued work. When the permits are gone the session stops reading, and
//! the port's and the kernel's buffers push back on the host instead of the
//! agent's heap growing. Requests that do work also hold one of the agent's
//! `max_concurrent_requests` slots until their reply is written, so the
//! large replies (file data, command output) that exist at once are bounded
//! by the slot count. The resulting memory bound is in SECURITY.md.
//!
//! Replies go out through two queues: small replies first, then replies
//! with an attachment (file data). A `ping` sent during a transfer waits for
//! at most the one attachment being written, not for every chunk queued.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_common::codec::{Frame, JsonLinesCodec};
use agent_common::envelope;
use agent_common::jsonrpc::{announced_attachment, parse_message, Announced, Incoming};
use agent_common::methods::Method;
use agent_common::MAX_ATTACHMENT_SIZE;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::buffers::BufferPool;
use crate::config::Config;
use crate::dispatch::{answered_from_memory, Agent, Outgoing, SessionId};
use crate::payload::{write_payload, ReplySink};
use crate::session::Session;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A new session's id, unique among the sessions of either dialect.
pub(crate) fn next_session_id() -> SessionId {
    SessionId(NEXT_SESSION.fetch_add(1, Ordering::Relaxed))
}

/// Replies queued for the writer before request tasks wait. Small on
/// purpose: a `file_read` reply is up to 1.4 MB (1 MiB as an attachment),
/// and a deep queue of them was most of the agent's peak memory during
/// transfers (16 deep: 33 MB peak RSS for a 100 MB pull).
const REPLY_QUEUE: usize = 2;

/// How long an attachment may take to arrive after its line. A host that
/// stops half-way (it died, and the next host's bytes would be read as the
/// rest of the data) is cut off: the request is answered `timeout` and input
/// is dropped up to the next resync byte.
pub const ATTACHMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Permits of a session kept for `ping`, `sync`, `get_agent_info` and `cancel`
/// (single requests without an attachment), besides [`pending_limit`].
pub const INSTANT_RESERVE: usize = 4;

/// Requests of one session that may be read and not yet answered (their
/// replies not yet written), besides the [`INSTANT_RESERVE`]: twice the
/// concurrency slots, so that requests beyond the slots still get their
/// `busy` reply at once while every slot is taken.
pub fn pending_limit(config: &Config) -> usize {
    2 * config.max_concurrent_requests
}

/// Memory the agent needs besides what hosts make it hold: code, the
/// runtime and its worker threads, logging, configuration.
pub const FIXED_OVERHEAD: u64 = 16 << 20;

/// The largest reply a request holding a concurrency slot can make, with
/// what it holds while the reply waits: an `exec_command` reply is at most
/// `max_response_size` (8 MiB) and was made from at most
/// 2 x `MAX_EXEC_OUTPUT` of captured output; a `file_read` chunk is 1 MiB
/// of data and 1.4 MB of base64.
pub const LARGEST_REPLY: u64 =
    agent_common::MAX_RESPONSE_SIZE as u64 + 2 * agent_common::MAX_EXEC_OUTPUT;

/// The most bytes one stream's message on its way holds: a
/// `file_read_stream` chunk (other streams send at most `STREAM_CHUNK`).
pub const LARGEST_STREAM_MESSAGE: u64 =
    if agent_common::streams::FILE_STREAM_CHUNK > agent_common::streams::STREAM_CHUNK {
        agent_common::streams::FILE_STREAM_CHUNK
    } else {
        agent_common::streams::STREAM_CHUNK
    };

/// The bound on the agent's memory with `sessions` hosts connected, each
/// sending anything and reading nothing (PROTOCOL.md and SECURITY.md state
/// it):
///
/// `FIXED_OVERHEAD`
/// + per session: its read buffer (`max_message_size` + `MAX_ATTACHMENT_SIZE`),
///   its pending replies that hold no slot
///   ((`pending_limit` + `INSTANT_RESERVE`) x (2 x `max_message_size` + 4 KiB):
///   an error echoes at most the id and parts of its line), and its streams
///   (`MAX_STREAMS` x (`STREAM_WINDOW` of the host's data not yet used +
///   [`LARGEST_STREAM_MESSAGE`] on its way, a `file_read_stream`'s 1 MiB
///   chunk): 40 MiB)
/// + `max_concurrent_requests` x `LARGEST_REPLY` (shared by all sessions)
/// + the transfer buffers kept for reuse while no request holds them
///   ([`crate::buffers::KEEP`] x 1 MiB, shared by all sessions).
///
/// With the default config and one host: 16 MiB + 1.06 MiB + 24 x 132 KiB
/// + 40 MiB + 10 x 10 MiB + 4 MiB, about 164 MiB.
pub fn memory_bound(config: &Config, sessions: u64) -> u64 {
    let line = config.max_message_size as u64;
    let per_session = line
        + agent_common::MAX_ATTACHMENT_SIZE
        + (pending_limit(config) + INSTANT_RESERVE) as u64 * (2 * line + 4096)
        + agent_common::streams::MAX_STREAMS as u64
            * (agent_common::streams::STREAM_WINDOW + LARGEST_STREAM_MESSAGE);
    FIXED_OVERHEAD
        + sessions * per_session
        + config.max_concurrent_requests as u64 * LARGEST_REPLY
        + crate::buffers::KEEP as u64 * agent_common::MAX_READ_CHUNK
}

/// What the end of input means on a transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnEof {
    /// The peer only closed its sending side (a Unix socket client such as
    /// `socat` after its input ends): finish the requests, send the replies.
    Drain,
    /// The host went away (a virtio-serial port): drop the replies, so they
    /// never reach the next host as its own.
    Drop,
}

/// A session's permits: one per request read and not yet answered.
struct Budget {
    pending: Arc<Semaphore>,
    instant: Arc<Semaphore>,
}

impl Budget {
    fn new(config: &Config) -> Budget {
        Budget {
            pending: Arc::new(Semaphore::new(pending_limit(config))),
            instant: Arc::new(Semaphore::new(INSTANT_RESERVE)),
        }
    }

    /// Waits for the permit `incoming` needs.
    async fn acquire(&self, incoming: &Incoming, has_data: bool) -> OwnedSemaphorePermit {
        let sem = if is_instant(incoming, has_data) {
            &self.instant
        } else {
            &self.pending
        };
        // Invariant: the semaphores are never closed.
        match sem.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => unreachable!("session semaphores are never closed"),
        }
    }
}

/// Serves one connection until its input ends, it fails, or `stop` is
/// cancelled (then requests already read are still answered).
pub async fn serve<R, W>(
    agent: Arc<Agent>,
    reader: R,
    writer: W,
    on_eof: OnEof,
    stop: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: ReplySink + Send + 'static,
{
    let session = next_session_id();
    debug!(session = session.0, "session started");
    let (tx, rx) = mpsc::channel::<Outgoing>(REPLY_QUEUE);
    let (bulk_tx, bulk_rx) = mpsc::channel::<Outgoing>(REPLY_QUEUE);
    let write_timeout = agent.config().request_timeout.max(Duration::from_secs(30));
    let budget = Budget::new(agent.config());
    let context = Arc::new(Session::new(
        session,
        tx.downgrade(),
        bulk_tx.downgrade(),
        Arc::clone(&budget.pending),
    ));
    let requests = TaskTracker::new();
    let mut writer_task = tokio::spawn(write_loop(writer, rx, bulk_rx, write_timeout));
    let mut frames = FramedRead::new(reader, JsonLinesCodec::new(agent.config().max_message_size));
    let buffers = agent.transfer_buffers();
    let mut eof = false;
    let mut writer_done = false;
    // Input that ends the session: stop, the writer gone, or end of input.
    macro_rules! or_end {
        ($fut:expr) => {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = &mut writer_task => {
                    writer_done = true;
                    break;
                }
                v = $fut => v,
            }
        };
    }
    loop {
        let frame = or_end!(frames.next());
        let (incoming, data) = match frame {
            None => {
                eof = true;
                break;
            }
            Some(Err(e)) => {
                warn!(session = session.0, error = %e, "reading from the host failed");
                eof = true;
                break;
            }
            Some(Ok(Frame::Oversized)) => {
                // The line may have announced an attachment: where its data
                // ends is unknown.
                frames.decoder_mut().discard_until_resync();
                if or_end!(tx.send(agent.oversized_reply())).is_err() {
                    break;
                }
                continue;
            }
            Some(Ok(Frame::Line(line))) => {
                let incoming = parse_message(&line);
                match announced_attachment(&line) {
                    Announced::Nothing => (incoming, None),
                    Announced::Unknown => {
                        frames.decoder_mut().discard_until_resync();
                        warn!(
                            session = session.0,
                            "a line announced an attachment of unknown length; dropping input up to the next resync byte"
                        );
                        let reply = Outgoing::reply(envelope::attachment_unknown(&incoming));
                        if or_end!(tx.send(reply)).is_err() {
                            break;
                        }
                        continue;
                    }
                    Announced::Bytes(len) => {
                        let usable = matches!(&incoming, Incoming::Single(Ok(_)));
                        if usable && len <= MAX_ATTACHMENT_SIZE {
                            // Within the limit, so it fits in usize.
                            let read = read_attachment(&mut frames, len as usize, &buffers);
                            match or_end!(tokio::time::timeout(ATTACHMENT_TIMEOUT, read)) {
                                Ok(Ok(data)) => (incoming, Some(data)),
                                Ok(Err(e)) => {
                                    if e.kind() != io::ErrorKind::UnexpectedEof {
                                        warn!(session = session.0, error = %e, "reading from the host failed");
                                    }
                                    eof = true;
                                    break;
                                }
                                Err(_) => {
                                    warn!(
                                        session = session.0,
                                        "an attachment did not arrive within {} s; dropping input up to the next resync byte",
                                        ATTACHMENT_TIMEOUT.as_secs()
                                    );
                                    frames.read_buffer_mut().clear();
                                    frames.decoder_mut().discard_until_resync();
                                    let reply = Outgoing::reply(envelope::attachment_timeout(
                                        &incoming,
                                        ATTACHMENT_TIMEOUT.as_secs(),
                                    ));
                                    if or_end!(tx.send(reply)).is_err() {
                                        break;
                                    }
                                    continue;
                                }
                            }
                        } else {
                            frames.decoder_mut().skip_attachment(len);
                            if !usable {
                                // Refused for another reason: its own reply.
                                (incoming, None)
                            } else {
                                warn!(
                                    session = session.0,
                                    len, "discarded an oversized attachment"
                                );
                                let reply =
                                    Outgoing::reply(envelope::attachment_too_large(&incoming, len));
                                if or_end!(tx.send(reply)).is_err() {
                                    break;
                                }
                                continue;
                            }
                        }
                    }
                }
            }
            Some(Ok(Frame::Attachment(_))) => {
                // The codec returns one only after expect_attachment, which
                // this loop never calls (see read_attachment).
                warn!(
                    session = session.0,
                    "dropped an attachment no request announced"
                );
                continue;
            }
        };
        let permit = or_end!(budget.acquire(&incoming, data.is_some()));
        if is_stream_message(&incoming) || is_answered_at_once(&incoming, data.is_some()) {
            // Here, without a task of their own: they never wait (stream
            // messages, in order: `crate::streams`; `ping`, `sync`,
            // `get_agent_info`: a task would cost a `ping` more than its
            // answer).
            if let Some(mut out) = agent.handle(&context, incoming, data).await {
                out.hold.push(permit);
                if or_end!(tx.send(out)).is_err() {
                    break;
                }
            }
            continue;
        }
        spawn_request(
            &requests,
            &agent,
            &context,
            (incoming, data),
            permit,
            (&tx, &bulk_tx),
        );
    }
    drop(tx);
    drop(bulk_tx);
    requests.close();
    if writer_done || (eof && on_eof == OnEof::Drop) {
        // Nobody to answer: let running requests finish on their own; their
        // replies go nowhere.
        writer_task.abort();
        debug!(
            session = session.0,
            "host went away; pending replies dropped"
        );
    } else {
        requests.wait().await;
        let _ = writer_task.await;
    }
    context.end();
    agent.end_session(session);
    // What the session's requests allocated goes back to the kernel once
    // the last of them is done (they may outlive a host that went away, and
    // return their read buffers to the pool after the session ended).
    tokio::spawn(async move {
        requests.wait().await;
        agent.release_memory();
    });
    debug!(session = session.0, "session ended");
}

/// Attachments at least this large are read into a pooled buffer.
const POOLED_ATTACHMENT: usize = 64 * 1024;

/// Reads the `len` bytes of an announced attachment: those the framing has
/// buffered already, then the rest straight from the host into the
/// attachment's own buffer, no further than its end. A large attachment
/// goes into a buffer of `pool` (a fresh 1 MiB buffer costs 256 page
/// faults to fill and an `munmap` to free: under TCG a fifth of a write's
/// time); it returns to the pool when the request is done with the bytes.
async fn read_attachment<R: AsyncRead + Unpin>(
    frames: &mut FramedRead<R, JsonLinesCodec>,
    len: usize,
    pool: &Arc<BufferPool>,
) -> io::Result<Bytes> {
    let buffered = frames.read_buffer_mut();
    if buffered.len() >= len {
        return Ok(buffered.split_to(len).freeze());
    }
    if len < POOLED_ATTACHMENT || len > pool.size() {
        let mut data = vec![0u8; len];
        fill(frames, &mut data).await?;
        return Ok(Bytes::from(data));
    }
    let mut buf = pool.take();
    fill(frames, &mut buf.space()[..len]).await?;
    buf.set_len(len);
    Ok(buf.into_bytes())
}

/// Fills `out` with what `frames` buffered (less than `out`), then from its
/// reader; end of input before it is full is `UnexpectedEof`.
async fn fill<R: AsyncRead + Unpin>(
    frames: &mut FramedRead<R, JsonLinesCodec>,
    out: &mut [u8],
) -> io::Result<()> {
    let buffered = frames.read_buffer_mut();
    let have = buffered.len();
    out[..have].copy_from_slice(buffered);
    buffered.clear();
    frames.get_mut().read_exact(&mut out[have..]).await?;
    Ok(())
}

/// True for a single request of an instant method (see
/// [`Method::is_instant`]) without an attachment: it takes a permit of the
/// [`INSTANT_RESERVE`].
fn is_instant(incoming: &Incoming, has_data: bool) -> bool {
    !has_data
        && matches!(incoming, Incoming::Single(Ok(req))
            if Method::from_name(&req.method).is_some_and(Method::is_instant))
}

/// True for a single request without an attachment of a method
/// [`answered_from_memory`]: the reader answers it itself.
fn is_answered_at_once(incoming: &Incoming, has_data: bool) -> bool {
    !has_data
        && matches!(incoming, Incoming::Single(Ok(req))
            if Method::from_name(&req.method).is_some_and(answered_from_memory))
}

/// True for the host's stream messages (`stream_data`, `stream_credit`,
/// `stream_close`, `stream_reset`), which the reader handles itself, in
/// the order they came: a stream's data must not be reordered, and
/// handling them never waits.
fn is_stream_message(incoming: &Incoming) -> bool {
    matches!(incoming, Incoming::Single(Ok(req)) if matches!(
        Method::from_name(&req.method),
        Some(Method::StreamData | Method::StreamCredit | Method::StreamClose | Method::StreamReset)
    ))
}

/// Runs one request on a task of its own; its reply, holding `permit`,
/// goes to the writer's queue.
fn spawn_request(
    requests: &TaskTracker,
    agent: &Arc<Agent>,
    session: &Arc<Session>,
    (incoming, data): (Incoming, Option<Bytes>),
    permit: OwnedSemaphorePermit,
    (tx, bulk_tx): (&mpsc::Sender<Outgoing>, &mpsc::Sender<Outgoing>),
) {
    let agent = agent.clone();
    let session = Arc::clone(session);
    let (tx, bulk_tx) = (tx.clone(), bulk_tx.clone());
    requests.spawn(async move {
        if let Some(mut out) = agent.handle(&session, incoming, data).await {
            out.hold.push(permit);
            let queue = if out.attachment.is_some() {
                bulk_tx
            } else {
                tx
            };
            // The writer is gone only when the session ended.
            let _ = queue.send(out).await;
        }
    });
}

/// Writes replies, small ones (`rx`) before those with attachments
/// (`bulk`), until both queues are closed.
async fn write_loop<W: ReplySink>(
    mut writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
    mut bulk: mpsc::Receiver<Outgoing>,
    write_timeout: Duration,
) {
    loop {
        let mut out = tokio::select! {
            biased;
            Some(out) = rx.recv() => out,
            Some(out) = bulk.recv() => out,
            else => break,
        };
        let write = async {
            writer.write_all(&out.line).await?;
            if let Some(data) = &mut out.attachment {
                write_payload(&mut writer, data).await?;
            }
            writer.flush().await
        };
        match tokio::time::timeout(write_timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "writing a reply failed; ending the session");
                return;
            }
            Err(_) => {
                warn!(
                    seconds = write_timeout.as_secs(),
                    "the host has not read replies for too long; ending the session"
                );
                return;
            }
        }
        if let Some(action) = out.after {
            info!(?action, "reply sent; starting the power action");
            tokio::spawn(action.run());
        }
    }
}
