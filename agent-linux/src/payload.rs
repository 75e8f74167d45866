//! The raw bytes a reply carries after its line, and the writers that take
//! them.
//!
//! A `file_read` chunk is moved from the file into a pipe by `splice(2)`
//! (by reference to the page cache where the file system allows it) and
//! from the pipe into the port the same way: the agent never copies it
//! through its own memory, and the port gets a whole chunk in one
//! virtqueue buffer instead of one per 32 KiB `write(2)`, the most
//! `virtio_console` takes in one write. A writer that is not a file
//! descriptor (tests, the fuzz harness) gets the bytes read out of the
//! pipe instead.

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::sys::{self, Pipe};

/// What a reply's `attachment` member announces.
#[derive(Debug)]
pub enum Payload {
    /// Bytes in memory.
    Bytes(Bytes),
    /// File data waiting in a pipe.
    Pipe(PipeChunk),
}

/// `len` bytes of file data in a pipe of their own.
#[derive(Debug)]
pub struct PipeChunk {
    pipe: Pipe,
    len: usize,
    /// A second pipe holding references to the same pages until the chunk
    /// has been written and is dropped, so that the port cannot take them
    /// out of the page cache (`files::read`'s `hold_pages`).
    _pages_held: Option<Pipe>,
}

impl PipeChunk {
    /// `pipe` must hold exactly `len` bytes (see [`ReplySink::poll_splice`]).
    pub(crate) fn new(pipe: Pipe, len: usize) -> PipeChunk {
        PipeChunk {
            pipe,
            len,
            _pages_held: None,
        }
    }

    /// Holds the chunk's pages in `held` as well (a `tee` of its pipe)
    /// until the chunk is dropped.
    pub(crate) fn holding(self, held: Pipe) -> PipeChunk {
        PipeChunk {
            _pages_held: Some(held),
            ..self
        }
    }

    /// The pipe the chunk's bytes are in.
    pub(crate) fn pipe(&self) -> &Pipe {
        &self.pipe
    }

    /// Its length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Payload {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::Pipe(c) => c.len,
        }
    }

    /// True if it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in memory (read out of the pipe if need be).
    pub fn into_bytes(self) -> io::Result<Bytes> {
        match self {
            Payload::Bytes(b) => Ok(b),
            Payload::Pipe(c) => c.pipe.drain(c.len).map(Bytes::from),
        }
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Payload {
        Payload::Bytes(b)
    }
}

/// A writer of reply lines and payloads. One that sits on a file
/// descriptor also takes a payload's pipe by `splice(2)`.
pub trait ReplySink: AsyncWrite + Unpin {
    /// Moves up to `len` bytes from `pipe` into this writer without
    /// copying them through the agent: `None` if this writer cannot.
    /// `len` is all the pipe holds (a virtio port needs that: see its
    /// implementation in `transport`).
    fn poll_splice(
        &mut self,
        _cx: &mut Context<'_>,
        _pipe: BorrowedFd<'_>,
        _len: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        None
    }
}

/// Writes `payload` to `w`, by `splice` where `w` can take it.
pub async fn write_payload<W: ReplySink>(w: &mut W, payload: &Payload) -> io::Result<()> {
    let chunk = match payload {
        Payload::Bytes(b) => return w.write_all(b).await,
        Payload::Pipe(chunk) => chunk,
    };
    // The pipe holds exactly `left` bytes: each splice offers all of them.
    let mut left = chunk.len;
    while left > 0 {
        let moved = poll_fn(|cx| match w.poll_splice(cx, chunk.pipe.reader(), left) {
            Some(p) => p.map_ok(Some),
            None => Poll::Ready(Ok(None)),
        })
        .await?;
        match moved {
            Some(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "a reply's pipe ran dry before its announced length",
                ))
            }
            Some(n) => left -= n,
            None => return w.write_all(&chunk.pipe.drain(left)?).await,
        }
    }
    Ok(())
}

/// A Unix socket (`--listen`): splices by way of tokio's readiness.
impl ReplySink for tokio::net::unix::OwnedWriteHalf {
    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        pipe: BorrowedFd<'_>,
        len: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        let stream: &tokio::net::UnixStream = self.as_ref();
        Some(loop {
            match stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
            match stream.try_io(tokio::io::Interest::WRITABLE, || {
                sys::splice_out(pipe, stream.as_fd(), len)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break Poll::Ready(r),
            }
        })
    }
}

/// In-memory writers (tests, the fuzz harness) take the bytes read out of
/// the pipe.
impl ReplySink for tokio::io::DuplexStream {}
impl<T: AsyncWrite> ReplySink for tokio::io::WriteHalf<T> {}
impl ReplySink for Vec<u8> {}
