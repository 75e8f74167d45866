//! Reusable 1 MiB buffers for file data: `file_read` chunks sent as
//! attachments, and attachments of 64 KiB or more received from a host.
//!
//! A fresh 1 MiB buffer per chunk costs 256 page faults to fill and an
//! `munmap` to free (musl serves such sizes with `mmap`); under TCG that was
//! a large share of a chunk's time (a fifth of a 32 MiB write's). The pool
//! keeps a few buffers alive between chunks: a chunk is read into one,
//! passed on as [`Bytes`] without a copy, and the buffer returns to the pool
//! when the reply has been written or the request is done with the data.
//! The pool holds at most [`KEEP`] buffers and is emptied when a session
//! ends, so an idle agent does not keep transfer memory.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Buffers kept for reuse: the chunks of a transfer in flight at once
/// with the host library's default window (2), the one being read, and one
/// spare.
pub const KEEP: usize = 4;

/// What a transfer pool keeps between uses: at most [`KEEP`] items, the
/// rest dropped. Shared by the byte buffers here and the pipes of
/// [`crate::payload::PipePool`].
#[derive(Debug)]
pub(crate) struct FreeList<T>(Mutex<Vec<T>>);

impl<T> FreeList<T> {
    pub(crate) const fn new() -> FreeList<T> {
        FreeList(Mutex::new(Vec::new()))
    }

    /// A kept item, if there is one.
    pub(crate) fn pop(&self) -> Option<T> {
        self.lock().pop()
    }

    /// Keeps `item` unless [`KEEP`] are kept already (then it is dropped).
    pub(crate) fn push(&self, item: T) {
        let mut free = self.lock();
        if free.len() < KEEP {
            free.push(item);
        }
    }

    /// Drops every item kept.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    /// Items kept now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<T>> {
        // A Vec push/pop cannot leave the list inconsistent on a panic.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A pool of equally sized byte buffers.
#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    free: FreeList<Vec<u8>>,
}

impl BufferPool {
    /// A pool of buffers of `size` bytes.
    pub fn new(size: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            size,
            free: FreeList::new(),
        })
    }

    /// A buffer of the pool's size (zeroed only when newly allocated).
    pub fn take(self: &Arc<Self>) -> PooledBuffer {
        let buf = self.free.pop().unwrap_or_else(|| vec![0u8; self.size]);
        PooledBuffer {
            buf,
            len: 0,
            pool: Arc::clone(self),
        }
    }

    /// The size of its buffers.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Frees every buffer kept.
    pub fn clear(&self) {
        self.free.clear();
    }

    /// Buffers kept now.
    pub fn kept(&self) -> usize {
        self.free.len()
    }
}

/// A buffer on loan from a [`BufferPool`]; its first `len` bytes are data.
#[derive(Debug)]
pub struct PooledBuffer {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl PooledBuffer {
    /// The whole buffer, to read into.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Marks the first `len` bytes as the data (at most the buffer's size).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.buf.len());
    }

    /// The data as [`Bytes`], without a copy; the buffer goes back to the
    /// pool when the last clone is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if self.buf.len() == self.pool.size {
            self.pool.free.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Makes the allocator keep one heap for every thread, as musl's does (the
/// release agent is built with musl). glibc's malloc otherwise gives each
/// busy thread an arena of its own and never returns the top of those
/// arenas to the kernel, so memory a host made the agent allocate stayed
/// resident after the host left. Called once at start.
pub fn use_one_heap() {
    crate::sys::one_malloc_arena();
}

/// Hands the heap memory freed since the last call back to the kernel,
/// where the allocator keeps it otherwise: glibc's malloc holds freed
/// memory in its arenas (a session that made the agent allocate 30 MB
/// would leave it resident); musl's returns it by itself. Called when a
/// session ends.
pub fn release_free_memory() {
    crate::sys::malloc_trim();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_the_pool_is_bounded() {
        let pool = BufferPool::new(16);
        let mut a = pool.take();
        a.space()[..3].copy_from_slice(b"abc");
        a.set_len(3);
        let bytes = a.into_bytes();
        assert_eq!(&bytes[..], b"abc");
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(pool.kept(), 0, "returned while a clone lives");
        drop(clone);
        assert_eq!(pool.kept(), 1);
        // The same memory is handed out again, contents and all.
        let mut b = pool.take();
        assert_eq!(&b.space()[..3], b"abc");
        b.set_len(100);
        assert_eq!(b.as_ref().len(), 16);
        let (c, d, e) = (pool.take(), pool.take(), pool.take());
        drop((b, c, d, e));
        assert_eq!(pool.kept(), KEEP);
        pool.clear();
        assert_eq!(pool.kept(), 0);
    }
}
