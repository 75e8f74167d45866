//! The virtio-serial port: `fcntl` with an integer argument, registration
//! with the runtime, and a read straight into a `ReadBuf`'s uninitialised
//! space, for [`crate::transport`].

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::ReadBuf;

/// `fcntl(fd, cmd, arg)` for the commands that take an integer argument and
/// touch no memory (`F_GETFL`, `F_SETFL`, `F_SETOWN`); refuses the others.
pub(crate) fn fcntl_int(
    file: &File,
    cmd: libc::c_int,
    arg: libc::c_int,
) -> io::Result<libc::c_int> {
    if !matches!(cmd, libc::F_GETFL | libc::F_SETFL | libc::F_SETOWN) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `file` keeps the descriptor open for the call, and the commands
    // allowed above take an integer argument and touch no memory of ours.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Registers `file` with the runtime's reactor.
pub(crate) fn register(file: File) -> io::Result<AsyncFd<File>> {
    // SAFETY: `File` owns its descriptor, which stays open and refers to the
    // same file description until the `AsyncFd` (and the `File` in it) is
    // dropped.
    unsafe { AsyncFd::register(file) }.map_err(io::Error::from)
}

/// Size of the buffers a virtio-serial port receives into (one page each,
/// `fill_queue` in `virtio_console`): one `read(2)` returns at most one.
const PORT_BUFFER: usize = 4096;

/// Most buffers one [`read_into`] asks for.
const MAX_SEGMENTS: usize = 64;

/// Reads from `fd` into the unfilled part of `buf`, which it then marks
/// initialised and filled by the bytes read.
///
/// One `readv(2)` of page-sized segments: the port has no `read_iter`, so
/// the kernel reads each segment in turn and goes on while each comes back
/// full, so one call takes up to [`MAX_SEGMENTS`] of the port's page-sized
/// buffers instead of one (a short segment ends it, as a short `read`
/// would). It reads straight into the uninitialised space: zeroing it
/// first (`initialize_unfilled`) cost a memset of the whole space per read,
/// and with room reserved for a 1 MiB attachment, that was most of a
/// transfer's time.
pub(crate) fn read_into(fd: BorrowedFd<'_>, buf: &mut ReadBuf<'_>) -> io::Result<usize> {
    // SAFETY: only `readv(2)` writes to `unfilled`, and the bytes it reports
    // are marked initialised below and no others.
    let unfilled = unsafe { buf.unfilled_mut() };
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_SEGMENTS];
    let mut count = 0;
    for segment in unfilled.chunks_mut(PORT_BUFFER).take(MAX_SEGMENTS) {
        iov[count] = libc::iovec {
            iov_base: segment.as_mut_ptr().cast(),
            iov_len: segment.len(),
        };
        count += 1;
    }
    // SAFETY: each of the first `count` iovecs describes a disjoint part of
    // `unfilled`, which lives for the call; readv(2) writes at most that
    // many bytes, in order, from the start of `unfilled`. `count` is at
    // most MAX_SEGMENTS, so it fits a c_int.
    let n = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), count as libc::c_int) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: readv(2) initialised the first `n` bytes.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(n)
}
