//! An in-process fake agent on a real Unix socket, for unit tests. Each test
//! scripts it, including misbehaviour (stale lines, wrong nonces, late or
//! missing replies, dropped connections).

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use agent_common::codec::{encode_line, Frame, JsonLinesCodec};
use agent_common::error::ErrorObject;
use agent_common::jsonrpc::{parse_message, Id, Incoming, Request, Response};
use agent_common::RESYNC_BYTE;
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::codec::Decoder;

/// Client options for tests against a fake agent: short connect and sync
/// limits, so a broken script fails fast.
pub(crate) fn client_opts() -> crate::ClientOptions {
    crate::ClientOptions {
        call_timeout: std::time::Duration::from_secs(5),
        connect_timeout: std::time::Duration::from_secs(2),
        sync_timeout: std::time::Duration::from_secs(2),
        // The fakes serve neither `get_agent_info` (which flow control
        // asks for) nor `cancel`: the tests that need those say so.
        flow_control: false,
        cancel_abandoned: false,
        busy_retries: 0,
        ..crate::ClientOptions::default()
    }
}

pub(crate) struct FakeAgent {
    _dir: tempfile::TempDir,
    pub(crate) path: PathBuf,
    pub(crate) connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves each accepted connection with `f(conn, index)`.
pub(crate) fn spawn<F, Fut>(f: F) -> FakeAgent
where
    F: Fn(FakeConn, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let n = count.fetch_add(1, Ordering::SeqCst);
            let (read, write) = stream.into_split();
            let conn = FakeConn {
                read,
                buf: BytesMut::new(),
                codec: JsonLinesCodec::new(1 << 20),
                writer: Arc::new(Mutex::new(write)),
                resync_bytes: 0,
            };
            tokio::spawn(f(conn, n));
        }
    });
    FakeAgent {
        _dir: dir,
        path,
        connections,
        task,
    }
}

pub(crate) struct FakeConn {
    read: OwnedReadHalf,
    buf: BytesMut,
    codec: JsonLinesCodec,
    pub(crate) writer: Arc<Mutex<OwnedWriteHalf>>,
    /// 0xFF bytes received so far.
    pub(crate) resync_bytes: usize,
}

impl FakeConn {
    /// The next well-formed request, or `None` at end of stream.
    pub(crate) async fn next_request(&mut self) -> Option<Request> {
        self.next_request_with_attachment()
            .await
            .map(|(req, _)| req)
    }

    /// The next well-formed request and its attachment, or `None` at end of
    /// stream.
    pub(crate) async fn next_request_with_attachment(
        &mut self,
    ) -> Option<(Request, Option<Bytes>)> {
        let mut awaiting = None;
        loop {
            while let Some(frame) = self.codec.decode(&mut self.buf).unwrap() {
                match frame {
                    Frame::Line(line) => {
                        if let Incoming::Single(Ok(req)) = parse_message(&line) {
                            match req.attachment {
                                Some(len) => {
                                    self.codec.expect_attachment(len as usize);
                                    awaiting = Some(req);
                                }
                                None => return Some((req, None)),
                            }
                        }
                    }
                    Frame::Attachment(data) => {
                        let req = awaiting.take().expect("an announced attachment");
                        return Some((req, Some(data.freeze())));
                    }
                    Frame::Oversized => {}
                }
            }
            let mut chunk = [0u8; 8192];
            let n = self.read.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.resync_bytes += chunk[..n].iter().filter(|&&b| b == RESYNC_BYTE).count();
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads the next request, which must be `sync`; returns its id and nonce.
    pub(crate) async fn expect_sync(&mut self) -> (Id, u64) {
        let req = self.next_request().await.expect("a sync request");
        assert_eq!(req.method, "sync");
        let p: Value = req.params().unwrap();
        (req.id.unwrap(), p["nonce"].as_u64().unwrap())
    }

    pub(crate) async fn send_raw(&self, bytes: &[u8]) {
        let _ = self.writer.lock().await.write_all(bytes).await;
    }
}

pub(crate) async fn send_response(writer: &Mutex<OwnedWriteHalf>, resp: &Response) {
    let mut buf = BytesMut::new();
    encode_line(resp, &mut buf).unwrap();
    let _ = writer.lock().await.write_all(&buf).await;
}

/// Writes `resp` and the attachment it announces.
pub(crate) async fn send_with_attachment(
    writer: &Mutex<OwnedWriteHalf>,
    mut resp: Response,
    data: Option<Bytes>,
) {
    resp.attachment = data.as_ref().map(|d| d.len() as u64);
    let mut buf = BytesMut::new();
    encode_line(&resp, &mut buf).unwrap();
    if let Some(d) = data {
        buf.extend_from_slice(&d);
    }
    let _ = writer.lock().await.write_all(&buf).await;
}

pub(crate) async fn reply(conn: &FakeConn, id: Id, result: Value) {
    send_response(&conn.writer, &Response::ok(id, &result)).await;
}

pub(crate) type Handler =
    Arc<dyn Fn(String, Value) -> BoxFuture<'static, Result<Value, ErrorObject>> + Send + Sync>;

/// Makes a [`Handler`] from an async closure.
pub(crate) fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(String, Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, ErrorObject>> + Send + 'static,
{
    Arc::new(move |m, p| Box::pin(f(m, p)))
}

/// A well-behaved agent loop: answers `sync` at once and every other
/// request from its own task (so replies may overtake each other).
pub(crate) async fn serve(conn: FakeConn, h: Handler) {
    let raw: RawHandler = Arc::new(move |method, params, _| {
        let reply = h(method, params);
        Box::pin(async move { reply.await.map(|v| (v, None)) })
    });
    serve_raw(conn, raw).await;
}

/// A handler that also takes and returns attachments.
pub(crate) type RawHandler = Arc<
    dyn Fn(
            String,
            Value,
            Option<Bytes>,
        ) -> BoxFuture<'static, Result<(Value, Option<Bytes>), ErrorObject>>
        + Send
        + Sync,
>;

/// [`serve`] for a handler that deals in attachments.
pub(crate) async fn serve_raw(mut conn: FakeConn, h: RawHandler) {
    while let Some((req, data)) = conn.next_request_with_attachment().await {
        let Some(id) = req.id.clone() else { continue };
        let params: Value = req.params().unwrap_or(Value::Null);
        if req.method == "sync" {
            reply(&conn, id, params).await;
            continue;
        }
        let writer = conn.writer.clone();
        let h = h.clone();
        tokio::spawn(async move {
            match h(req.method, params, data).await {
                Ok((v, data)) => send_with_attachment(&writer, Response::ok(id, &v), data).await,
                Err(e) => send_response(&writer, &Response::error(id, e)).await,
            }
        });
    }
}

/// Writes a notification (a request without `id`) and the attachment it
/// announces.
pub(crate) async fn notify(conn: &FakeConn, method: &str, params: Value, data: Option<&[u8]>) {
    let mut msg = serde_json::json!({"jsonrpc": "2.0", "method": method, "params": params});
    if let Some(d) = data {
        msg["attachment"] = d.len().into();
    }
    let mut buf = serde_json::to_vec(&msg).unwrap();
    buf.push(b'\n');
    if let Some(d) = data {
        buf.extend_from_slice(d);
    }
    conn.send_raw(&buf).await;
}
