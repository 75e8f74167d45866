//! How a [`Client`](super::Client) opens its connection: a Unix socket
//! path (the usual channel socket), a connector of the embedder's own (a
//! vsock, a passed file descriptor, an ssh tunnel), or a single stream
//! handed in once.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

/// A byte stream to an agent: anything readable and writable that can move
/// between tasks. Implemented for every such type (`UnixStream`,
/// `tokio::io::DuplexStream`, a vsock stream, ...).
pub trait AgentStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AgentStream for T {}

/// A boxed [`AgentStream`], as a connector returns it.
pub type BoxedStream = Box<dyn AgentStream>;

/// The future a connector returns.
pub type ConnectFuture = Pin<Box<dyn Future<Output = std::io::Result<BoxedStream>> + Send>>;

pub(super) type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
pub(super) type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

type ConnectFn = dyn Fn() -> ConnectFuture + Send + Sync;

/// Where the client's connections come from.
pub(super) enum Connector {
    /// The channel's Unix socket.
    Unix(PathBuf),
    /// The embedder's connector, called for the first connection and each
    /// reconnect.
    Custom(Arc<ConnectFn>),
    /// One stream, used once: no reconnect.
    Once(Mutex<Option<BoxedStream>>),
}

impl Connector {
    pub(super) fn custom<F, Fut, S>(connect: F) -> Connector
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::io::Result<S>> + Send + 'static,
        S: AgentStream,
    {
        Connector::Custom(Arc::new(move || {
            let fut = connect();
            Box::pin(async move { fut.await.map(|s| Box::new(s) as BoxedStream) })
        }))
    }

    pub(super) fn once(stream: BoxedStream) -> Connector {
        Connector::Once(Mutex::new(Some(stream)))
    }

    /// Opens a connection and splits it.
    pub(super) async fn connect(&self) -> std::io::Result<(ReadHalf, WriteHalf)> {
        match self {
            Connector::Unix(path) => {
                let (read, write) = UnixStream::connect(path).await?.into_split();
                Ok((Box::new(read), Box::new(write)))
            }
            Connector::Custom(connect) => Ok(split(connect().await?)),
            Connector::Once(slot) => {
                let stream = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                match stream {
                    Some(s) => Ok(split(s)),
                    None => Err(std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        "the stream given to Client::from_stream is used up; \
                         use Client::with_connector to let the client reconnect",
                    )),
                }
            }
        }
    }
}

fn split(stream: BoxedStream) -> (ReadHalf, WriteHalf) {
    let (read, write) = tokio::io::split(stream);
    (Box::new(read), Box::new(write))
}
