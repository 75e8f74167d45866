//! One host connection: read request lines, run them concurrently, write
//! the replies.
//!
//! The same session loop serves a virtio-serial port and a Unix socket; the
//! transports differ only in what end of input means (see [`OnEof`]).
//!
//! A request line that announces an attachment is held until its raw bytes
//! have arrived (the codec is told how many to take, see
//! [`JsonLinesCodec::expect_attachment`]); an attachment larger than
//! [`MAX_ATTACHMENT_SIZE`] is skipped unbuffered and answered
//! `message_too_large`. An attachment that stops arriving is given up after
//! [`ATTACHMENT_TIMEOUT`]: its request is answered `timeout` and input is
//! dropped up to the next resync byte, because the bytes that follow (a new
//! host's, if the old one died half-way) cannot be told apart from its data.
//!
//! Replies go out through two queues: small replies first, then replies
//! with an attachment (file data). A `ping` sent during a transfer waits for
//! at most the one attachment being written, not for every chunk queued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_common::codec::{Frame, JsonLinesCodec};
use agent_common::jsonrpc::{parse_message, Incoming};
use agent_common::MAX_ATTACHMENT_SIZE;
use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::dispatch::{Agent, Outgoing, SessionId};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Replies queued for the writer before request tasks wait. Small on
/// purpose: a `file_read` reply is up to 1.4 MB (1 MiB as an attachment),
/// and a deep queue of them was most of the agent's peak memory during
/// transfers (16 deep: 33 MB peak RSS for a 100 MB pull).
const REPLY_QUEUE: usize = 2;

/// How long an attachment may take to arrive after its line. A host that
/// stops half-way (it died, and the next host's bytes would be read as the
/// rest of the data) is cut off: the request is answered `timeout` and input
/// is dropped up to the next resync byte.
const ATTACHMENT_TIMEOUT: Duration = Duration::from_secs(10);

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
    W: AsyncWrite + Unpin + Send + 'static,
{
    let session = SessionId(NEXT_SESSION.fetch_add(1, Ordering::Relaxed));
    debug!(session = session.0, "session started");
    let (tx, rx) = mpsc::channel::<Outgoing>(REPLY_QUEUE);
    let (bulk_tx, bulk_rx) = mpsc::channel::<Outgoing>(REPLY_QUEUE);
    let write_timeout = agent.config().request_timeout.max(Duration::from_secs(30));
    let requests = TaskTracker::new();
    let mut writer_task = tokio::spawn(write_loop(writer, rx, bulk_rx, write_timeout));
    let mut frames = FramedRead::new(reader, JsonLinesCodec::new(agent.config().max_message_size));
    // A parsed request waiting for its attachment.
    let mut awaiting: Option<Incoming> = None;
    let mut eof = false;
    let mut writer_done = false;
    loop {
        let in_attachment = frames.decoder().in_attachment();
        let next = async {
            if in_attachment {
                tokio::time::timeout(ATTACHMENT_TIMEOUT, frames.next()).await
            } else {
                Ok(frames.next().await)
            }
        };
        let frame = tokio::select! {
            () = stop.cancelled() => break,
            _ = &mut writer_task => {
                writer_done = true;
                break;
            }
            frame = next => frame,
        };
        let Ok(frame) = frame else {
            warn!(
                session = session.0,
                "an attachment did not arrive within {} s; dropping input up to the next resync byte",
                ATTACHMENT_TIMEOUT.as_secs()
            );
            frames.read_buffer_mut().clear();
            frames.decoder_mut().abandon_attachment();
            if let Some(incoming) = awaiting.take() {
                if tx
                    .send(agent.attachment_timeout(&incoming, ATTACHMENT_TIMEOUT))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            continue;
        };
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
                if tx.send(agent.oversized_reply()).await.is_err() {
                    break;
                }
                continue;
            }
            Some(Ok(Frame::Line(line))) => {
                let incoming = parse_message(&line);
                match incoming.attachment() {
                    None => (incoming, None),
                    Some(len) if len <= MAX_ATTACHMENT_SIZE => {
                        // Within the limit, so it fits in usize.
                        frames.decoder_mut().expect_attachment(len as usize);
                        awaiting = Some(incoming);
                        continue;
                    }
                    Some(len) => {
                        frames.decoder_mut().skip_attachment(len);
                        if tx
                            .send(agent.attachment_too_large(&incoming, len))
                            .await
                            .is_err()
                        {
                            break;
                        }
                        continue;
                    }
                }
            }
            Some(Ok(Frame::Attachment(data))) => match awaiting.take() {
                Some(incoming) => (incoming, Some(data)),
                None => {
                    // The codec returns one only after expect_attachment.
                    warn!(
                        session = session.0,
                        "dropped an attachment no request announced"
                    );
                    continue;
                }
            },
        };
        let agent = agent.clone();
        let (tx, bulk_tx) = (tx.clone(), bulk_tx.clone());
        requests.spawn(async move {
            if let Some(out) = agent
                .handle(session, incoming, data.map(BytesMut::freeze))
                .await
            {
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
    agent.end_session(session);
    debug!(session = session.0, "session ended");
}

/// Writes replies, small ones (`rx`) before those with attachments
/// (`bulk`), until both queues are closed.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
    mut bulk: mpsc::Receiver<Outgoing>,
    write_timeout: Duration,
) {
    loop {
        let out = tokio::select! {
            biased;
            Some(out) = rx.recv() => out,
            Some(out) = bulk.recv() => out,
            else => break,
        };
        let write = async {
            writer.write_all(&out.line).await?;
            if let Some(data) = &out.attachment {
                writer.write_all(data).await?;
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
