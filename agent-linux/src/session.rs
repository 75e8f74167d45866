//! A host connection's context, handed to every handler.
//!
//! A [`Session`] carries what a handler needs beyond its params: the
//! session's id (state that belongs to one host, such as chunked uploads,
//! is keyed by it), a [`Notifier`] that sends messages of the handler's own
//! (notifications, with attachments) through the session's writer under the
//! same back-pressure as replies, and a cancellation signal that fires when
//! the session ends, and its running requests that a `cancel` can stop.
//! Whatever a handler starts that outlives its reply (a
//! stream, a forward, a watchdog) watches [`Session::ended`] and ends with
//! the session; uploads end through `FileService::end_session`.

use std::sync::Arc;

use agent_common::jsonrpc::OutgoingRequest;
use bytes::BytesMut;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::cancel::Running;
use crate::dispatch::Outgoing;
use crate::payload::Payload;
use crate::streams::Streams;

/// A connection's identity, for state that belongs to one host connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

/// One host connection, as its handlers see it.
#[derive(Debug)]
pub struct Session {
    id: SessionId,
    notifier: Notifier,
    ended: CancellationToken,
    running: Running,
    streams: Streams,
}

impl Session {
    /// A session whose messages go to `queue` (stream messages, which
    /// keep their order, to `ordered`), each holding a permit of `budget`
    /// until written (the session's back-pressure). The queues are held
    /// weakly: the session's writer ends when its reader and requests are
    /// done, whoever still holds the session.
    pub fn new(
        id: SessionId,
        queue: mpsc::WeakSender<Outgoing>,
        ordered: mpsc::WeakSender<Outgoing>,
        budget: Arc<Semaphore>,
    ) -> Session {
        Session {
            id,
            notifier: Notifier {
                queue: Some(queue),
                ordered: Some(ordered),
                budget,
            },
            ended: CancellationToken::new(),
            running: Running::default(),
            streams: Streams::default(),
        }
    }

    /// A session with no writer (tests and tools that call the core
    /// directly): notifications fail with [`SessionEnded`].
    pub fn detached(id: SessionId) -> Session {
        Session {
            id,
            notifier: Notifier {
                queue: None,
                ordered: None,
                budget: Arc::new(Semaphore::new(0)),
            },
            ended: CancellationToken::new(),
            running: Running::default(),
            streams: Streams::default(),
        }
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Sends the handler's own messages to this session's host.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Cancelled when the session ends (the host left, the agent stops).
    pub fn ended(&self) -> &CancellationToken {
        &self.ended
    }

    /// The session's running requests, which `cancel` can stop.
    pub fn running(&self) -> &Running {
        &self.running
    }

    /// The session's open streams (`crate::streams`).
    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    /// Ends the session: everything watching [`Session::ended`] stops, and
    /// every stream is reset.
    pub fn end(&self) {
        self.ended.cancel();
        self.streams.end_all();
    }
}

/// Sends notifications through a session's writer.
#[derive(Debug, Clone)]
pub struct Notifier {
    queue: Option<mpsc::WeakSender<Outgoing>>,
    /// The writer's second queue, written in order after `queue`: stream
    /// messages go there so that a stream's data, close and exit keep
    /// their order (and a `ping` reply overtakes them).
    ordered: Option<mpsc::WeakSender<Outgoing>>,
    budget: Arc<Semaphore>,
}

/// The session a notification was for has ended.
#[derive(Debug, thiserror::Error)]
#[error("the session has ended; the notification was not sent")]
pub struct SessionEnded;

impl Notifier {
    /// Sends `{"jsonrpc":"2.0","method":method,"params":params}` with
    /// `attachment` after it. Waits for a place in the session's budget
    /// like a request does, so a host that does not read its messages
    /// stalls the sender, never the agent's memory.
    pub async fn notify<P: Serialize>(
        &self,
        method: &str,
        params: &P,
        attachment: Option<Payload>,
    ) -> Result<(), SessionEnded> {
        self.send(&self.queue, method, params, attachment).await
    }

    /// [`Notifier::notify`] for a stream's messages: they are written in
    /// the order sent, after any reply waiting (so a `ping` is never behind
    /// more than the one message being written).
    pub async fn notify_ordered<P: Serialize>(
        &self,
        method: &str,
        params: &P,
        attachment: Option<Payload>,
    ) -> Result<(), SessionEnded> {
        self.send(&self.ordered, method, params, attachment).await
    }

    async fn send<P: Serialize>(
        &self,
        queue: &Option<mpsc::WeakSender<Outgoing>>,
        method: &str,
        params: &P,
        attachment: Option<Payload>,
    ) -> Result<(), SessionEnded> {
        let queue = queue
            .as_ref()
            .and_then(mpsc::WeakSender::upgrade)
            .ok_or(SessionEnded)?;
        let permit = Arc::clone(&self.budget)
            .acquire_owned()
            .await
            .map_err(|_| SessionEnded)?;
        let msg = OutgoingRequest {
            jsonrpc: agent_common::jsonrpc::JSONRPC_VERSION,
            method,
            params,
            id: None,
            attachment: attachment.as_ref().map(|a| a.len() as u64),
            attachment_crc32: None,
        };
        let mut line = BytesMut::new();
        // Invariant: params are the agent's own typed values, which
        // serialise.
        agent_common::codec::encode_line(&msg, &mut line).map_err(|_| SessionEnded)?;
        queue
            .send(Outgoing {
                line,
                attachment,
                after: None,
                hold: vec![permit],
            })
            .await
            .map_err(|_| SessionEnded)
    }
}

/// A session for the tests of the parts that send on one.
#[cfg(test)]
pub(crate) mod test_session {
    use super::*;
    use crate::dispatch::SessionId;

    /// A session whose ordered messages (streams) arrive on the receiver;
    /// keep the sender while the test runs (the session holds it weakly).
    pub(crate) fn session() -> (Session, mpsc::Receiver<Outgoing>, mpsc::Sender<Outgoing>) {
        let (tx, _rx) = mpsc::channel(1);
        let (otx, orx) = mpsc::channel(64);
        let s = Session::new(
            SessionId(1),
            tx.downgrade(),
            otx.downgrade(),
            Arc::new(Semaphore::new(64)),
        );
        // The senders must outlive the test: the session holds them weakly.
        std::mem::forget(tx);
        (s, orx, otx)
    }

    /// An outgoing message's line as JSON.
    pub(crate) fn line(o: &Outgoing) -> serde_json::Value {
        serde_json::from_slice(&o.line).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn notifications_go_through_the_writer_under_the_budget() {
        let (tx, mut rx) = mpsc::channel(4);
        let (ordered, _ordered_rx) = mpsc::channel(4);
        let budget = Arc::new(Semaphore::new(1));
        let s = Session::new(
            SessionId(3),
            tx.downgrade(),
            ordered.downgrade(),
            Arc::clone(&budget),
        );
        s.notifier()
            .notify(
                "stream_data",
                &serde_json::json!({"stream": 1}),
                Some(Payload::Bytes(bytes::Bytes::from_static(b"a\nb"))),
            )
            .await
            .unwrap();
        let mut out = rx.recv().await.unwrap();
        assert_eq!(
            &out.line[..],
            b"{\"jsonrpc\":\"2.0\",\"method\":\"stream_data\",\"params\":{\"stream\":1},\"attachment\":3}\n"
        );
        let data = out.attachment.take().map(|p| p.into_bytes().unwrap());
        assert_eq!(data.as_deref(), Some(&b"a\nb"[..]));
        // Its permit is held until the message is written: the next waits.
        let next = s.notifier().notify("stream_data", &(), None);
        assert!(tokio::time::timeout(Duration::from_millis(50), next)
            .await
            .is_err());
        drop(out);
        s.notifier().notify("stream_data", &(), None).await.unwrap();
        assert!(Session::detached(SessionId(4))
            .notifier()
            .notify("x", &(), None)
            .await
            .is_err());
        assert!(!s.ended().is_cancelled());
        // The session does not keep its writer's queue open.
        drop(tx);
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_none());
        assert!(s.notifier().notify("x", &(), None).await.is_err());
        s.end();
        assert!(s.ended().is_cancelled());
    }
}
