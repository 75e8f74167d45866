//! One host connection: read request lines, run them concurrently, write
//! the replies.
//!
//! The same session loop serves a virtio-serial port and a Unix socket; the
//! transports differ only in what end of input means (see [`OnEof`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_common::codec::{Frame, JsonLinesCodec};
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
/// purpose: a `file_read` reply is up to 1.4 MB, and a deep queue of them
/// was most of the agent's peak memory during transfers (16 deep: 33 MB
/// peak RSS for a 100 MB pull).
const REPLY_QUEUE: usize = 2;

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
    let write_timeout = agent.config().request_timeout.max(Duration::from_secs(30));
    let requests = TaskTracker::new();
    let mut writer_task = tokio::spawn(write_loop(writer, rx, write_timeout));
    let mut frames = FramedRead::new(reader, JsonLinesCodec::new(agent.config().max_message_size));
    let mut eof = false;
    let mut writer_done = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = &mut writer_task => {
                writer_done = true;
                break;
            }
            frame = frames.next() => match frame {
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
                }
                Some(Ok(Frame::Line(line))) => {
                    let agent = agent.clone();
                    let tx = tx.clone();
                    requests.spawn(async move {
                        if let Some(out) = agent.handle_line(session, &line).await {
                            // The writer is gone only when the session ended.
                            let _ = tx.send(out).await;
                        }
                    });
                }
            }
        }
    }
    drop(tx);
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

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
    write_timeout: Duration,
) {
    while let Some(out) = rx.recv().await {
        let write = async {
            writer.write_all(&out.line).await?;
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
