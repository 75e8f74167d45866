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
//! pipe instead. The pipes are kept for the next chunks ([`PipePool`]).

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::buffers::FreeList;
use crate::sys::{self, Pipe};

/// What a reply's `attachment` member announces.
#[derive(Debug)]
pub enum Payload {
    /// Bytes in memory.
    Bytes(Bytes),
    /// File data waiting in a pipe.
    Pipe(PipeChunk),
}

/// Empty pipes of one capacity kept for the next chunks: making a pipe
/// (`pipe2`, `F_SETPIPE_SZ` and its 256 slots for 1 MiB) and closing it
/// again is per-chunk work, 3-6% of a streamed pull under TCG (the bench's
/// read rows). A chunk's pipe comes back once every byte in it has been
/// written ([`write_payload`]); one that may still hold bytes (its write
/// failed, or it was never written) is closed instead, so a pipe handed
/// out is always empty. Holds at most [`crate::buffers::KEEP`] pipes and
/// is emptied when a session ends, with the buffer pool.
#[derive(Debug)]
pub struct PipePool {
    capacity: usize,
    free: FreeList<Pipe>,
}

impl PipePool {
    /// A pool of pipes that hold `capacity` bytes each.
    pub fn new(capacity: usize) -> Arc<PipePool> {
        Arc::new(PipePool {
            capacity,
            free: FreeList::new(),
        })
    }

    /// The bytes each of its pipes holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// An empty pipe of the pool's capacity: a kept one, else a new one.
    pub(crate) fn take(&self) -> io::Result<Pipe> {
        match self.free.pop() {
            Some(pipe) => Ok(pipe),
            None => Pipe::with_capacity(self.capacity),
        }
    }

    /// Closes every pipe kept.
    pub fn clear(&self) {
        self.free.clear();
    }

    /// Pipes kept now.
    pub fn kept(&self) -> usize {
        self.free.len()
    }
}

/// `len` bytes of file data in a pipe of their own.
#[derive(Debug)]
pub struct PipeChunk {
    /// Always `Some` until the chunk is dropped.
    pipe: Option<Pipe>,
    len: usize,
    /// Where the pipe goes back to once every byte has been written.
    pool: Arc<PipePool>,
    /// Set once every byte has been moved out of the pipe.
    emptied: bool,
    /// A second pipe holding references to the same pages until the chunk
    /// has been written and is dropped, so that the port cannot take them
    /// out of the page cache (`files::read`'s `hold_pages`).
    _pages_held: Option<Pipe>,
}

impl PipeChunk {
    /// `pipe`, from `pool`, must hold exactly `len` bytes (see
    /// [`ReplySink::poll_splice`]); it goes back to `pool` once the chunk
    /// has been written whole.
    pub(crate) fn new(pipe: Pipe, len: usize, pool: &Arc<PipePool>) -> PipeChunk {
        PipeChunk {
            pipe: Some(pipe),
            len,
            pool: Arc::clone(pool),
            emptied: false,
            _pages_held: None,
        }
    }

    /// Holds the chunk's pages in `held` as well (a `tee` of its pipe)
    /// until the chunk is dropped.
    pub(crate) fn holding(mut self, held: Pipe) -> PipeChunk {
        self._pages_held = Some(held);
        self
    }

    /// The pipe the chunk's bytes are in.
    pub(crate) fn pipe(&self) -> &Pipe {
        // Invariant: taken only by `drop`.
        self.pipe
            .as_ref()
            .expect("a chunk's pipe is there until it is dropped")
    }

    /// Reads the bytes out of the pipe into memory.
    fn drain(&mut self) -> io::Result<Vec<u8>> {
        let bytes = self.pipe().drain(self.len)?;
        self.emptied = true;
        Ok(bytes)
    }

    /// Its length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for PipeChunk {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take().filter(|_| self.emptied) {
            self.pool.free.push(pipe);
        }
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
            Payload::Pipe(mut c) => c.drain().map(Bytes::from),
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
pub async fn write_payload<W: ReplySink>(w: &mut W, payload: &mut Payload) -> io::Result<()> {
    let chunk = match payload {
        Payload::Bytes(b) => return w.write_all(b).await,
        Payload::Pipe(chunk) => chunk,
    };
    // The pipe holds exactly `left` bytes: each splice offers all of them.
    let mut left = chunk.len;
    while left > 0 {
        let moved = poll_fn(|cx| match w.poll_splice(cx, chunk.pipe().reader(), left) {
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
            // Nothing was spliced before (`None` is this writer's answer
            // every time), so the pipe still holds all `len` bytes.
            None => return w.write_all(&chunk.drain()?).await,
        }
    }
    chunk.emptied = true;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A chunk of `pool` holding `data` (spliced from a file, as a
    /// `file_read` chunk is).
    fn chunk_of(pool: &Arc<PipePool>, data: &[u8]) -> PipeChunk {
        let file = sys::file_holding(data);
        let pipe = pool.take().unwrap();
        assert_eq!(pipe.fill_from(&file, 0, data.len()).unwrap(), data.len());
        PipeChunk::new(pipe, data.len(), pool)
    }

    #[tokio::test]
    async fn a_chunk_written_whole_gives_its_pipe_back_empty() {
        let pool = PipePool::new(1 << 16);
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        // By splice, into a socket.
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let (_read, mut w) = a.into_split();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 20_000];
            b.read_exact(&mut got).await.unwrap();
            got
        });
        let mut payload = Payload::Pipe(chunk_of(&pool, &data));
        write_payload(&mut w, &mut payload).await.unwrap();
        drop(payload);
        assert!(reader.await.unwrap() == data, "the spliced bytes differ");
        assert_eq!(pool.kept(), 1);
        // Read out, for a writer that cannot splice: the same pipe, which
        // held nothing before (else its old bytes would come first).
        let mut payload = Payload::Pipe(chunk_of(&pool, &data[..5_000]));
        assert_eq!(pool.kept(), 0);
        let mut out = Vec::new();
        write_payload(&mut out, &mut payload).await.unwrap();
        drop(payload);
        assert!(out == data[..5_000], "the bytes read out differ");
        assert_eq!(pool.kept(), 1);
    }

    #[tokio::test]
    async fn a_chunk_not_written_whole_closes_its_pipe() {
        let pool = PipePool::new(1 << 16);
        drop(chunk_of(&pool, &[1u8; 9_000]));
        assert_eq!(pool.kept(), 0, "a chunk never written");
        // A write that fails: the socket's other end is gone.
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        drop(b);
        let (_read, mut w) = a.into_split();
        let mut payload = Payload::Pipe(chunk_of(&pool, &[7u8; 20_000]));
        assert!(write_payload(&mut w, &mut payload).await.is_err());
        drop(payload);
        assert_eq!(pool.kept(), 0, "a chunk whose write failed");
    }

    #[test]
    fn the_pool_keeps_a_few_pipes_until_cleared() {
        let pool = PipePool::new(1 << 16);
        for _ in 0..crate::buffers::KEEP + 2 {
            pool.free.push(Pipe::with_capacity(1 << 16).unwrap());
        }
        assert_eq!(pool.kept(), crate::buffers::KEEP);
        pool.clear();
        assert_eq!(pool.kept(), 0);
    }
}
