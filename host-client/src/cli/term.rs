//! The size of our terminal (`TIOCGWINSZ`), for `shell`.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;

nix::ioctl_read_bad!(tiocgwinsz, libc::TIOCGWINSZ, libc::winsize);

/// Rows and columns of the terminal on our stdout (else stdin), if either
/// is one and reports a size.
pub(super) fn size() -> Option<(u16, u16)> {
    let fd = if std::io::stdout().is_terminal() {
        std::io::stdout().as_raw_fd()
    } else if std::io::stdin().is_terminal() {
        std::io::stdin().as_raw_fd()
    } else {
        return None;
    };
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through a pointer to a live
    // local; `fd` is our stdout or stdin, open for the whole process.
    unsafe { tiocgwinsz(fd, &mut ws) }.ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}
