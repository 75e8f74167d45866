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

/// One `read(2)` from `fd` into the unfilled part of `buf`, which it then
/// marks initialised and filled by the bytes read.
///
/// It reads straight into the uninitialised space: zeroing it first
/// (`initialize_unfilled`) cost a memset of the whole space per read, and
/// with room reserved for a 1 MiB attachment and 4 KiB per read from the
/// port, that was most of a transfer's time.
pub(crate) fn read_into(fd: BorrowedFd<'_>, buf: &mut ReadBuf<'_>) -> io::Result<usize> {
    // SAFETY: only `read(2)` writes to `unfilled`, and the bytes it reports
    // are marked initialised below and no others.
    let unfilled = unsafe { buf.unfilled_mut() };
    // SAFETY: the pointer and length describe `unfilled`, which lives for
    // the call; read(2) writes at most that many bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len()) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: read(2) initialised the first `n` bytes.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(n)
}
