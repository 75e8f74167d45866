//! Pseudo-terminals for [`crate::exec`]'s streamed commands: the window
//! size ioctl and the child's `setsid` + `TIOCSCTTY` when std spawns it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;

/// Sets the terminal's size (`TIOCSWINSZ`), which also sends `SIGWINCH`
/// to its foreground process group.
pub(crate) fn set_winsize(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` through a pointer to a live
    // local; the descriptor is borrowed, so open for the call.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TIOCSWINSZ,
            &size as *const libc::winsize,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the child of `cmd` the leader of a new session whose controlling
/// terminal is its stdin (a pseudo-terminal's slave side), as a login
/// does. Its process group is the session's, so `killpg` on its pid
/// reaches it; do not also ask for `process_group`.
pub(crate) fn session_with_tty(cmd: &mut std::process::Command) {
    // SAFETY: the hook runs in the child between fork and exec and calls
    // only setsid and ioctl, which are async-signal-safe; it touches no
    // memory of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A pseudo-terminal's master side, for [`register_pty`].
pub(crate) struct PtyFd(std::os::fd::OwnedFd);

impl AsRawFd for PtyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl std::os::fd::AsFd for PtyFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Makes a pseudo-terminal's master side non-blocking and registers it
/// with the runtime, for reading and writing.
pub(crate) fn register_pty(
    fd: std::os::fd::OwnedFd,
) -> io::Result<tokio::io::unix::AsyncFd<PtyFd>> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    // SAFETY: `PtyFd` owns the descriptor, so it stays open and the same for
    // the whole life of the `AsyncFd`, and `as_raw_fd` always returns it.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            PtyFd(fd),
            tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
        )
    }
    .map_err(io::Error::from)
}
