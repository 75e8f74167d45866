//! Processes: `pidfd_open`, `waitpid`, and `clone3(CLONE_INTO_CGROUP)`
//! with the child's code up to `execve`, for [`crate::exec`], which decides
//! what runs and how (see its module documentation).
//!
//! The child of the clone shares nothing with the agent but a copy-on-write
//! copy of its memory, in which other threads' locks may be held: it calls
//! only async-signal-safe functions, on strings and arrays built before the
//! clone.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;

/// `pidfd_open(pid, 0)`: a descriptor that becomes readable when `pid` exits.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // A descriptor is int-sized.
    let fd = ret as libc::c_int;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A wrapper so `AsyncFd` can hold an `OwnedFd`.
pub(crate) struct PidFd(OwnedFd);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Registers a pidfd with the runtime, readable once its process exits.
pub(crate) fn watch_pidfd(fd: OwnedFd) -> io::Result<AsyncFd<PidFd>> {
    // SAFETY: `PidFd` owns the descriptor, so it stays open and the same for
    // the whole life of the `AsyncFd`, and `as_raw_fd` always returns it.
    unsafe { AsyncFd::register_with_interest(PidFd(fd), tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// `waitpid(pid)`, blocking or not (`WNOHANG`): `None` while it runs.
pub(crate) fn waitpid(pid: libc::pid_t, block: bool) -> io::Result<Option<ExitStatus>> {
    let flags = if block { 0 } else { libc::WNOHANG };
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes one int through a pointer to a live local.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r == pid {
            return Ok(Some(ExitStatus::from_raw(status)));
        }
        if r == 0 {
            return Ok(None);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Starts `program` with `argv` and `envp` in a new process born in the
/// cgroup open as `cgroup` (`clone3(CLONE_INTO_CGROUP)`, no `CLONE_VM`: the
/// child runs on a copy-on-write copy, as after `fork`). The child puts
/// `stdio` on descriptors 0, 1 and 2, makes its own process group (with
/// `tty`: its own session, with descriptor 0 as its controlling terminal,
/// a pseudo-terminal's slave side), changes
/// to `cwd`, resets SIGPIPE and its signal mask and calls `execve`; if any
/// step fails it writes `errno` (native-endian `c_int`) to `err_fd` and
/// exits 127. Returns the child's pid; it is the caller's to reap.
///
/// Descriptors 0-2 are overwritten in the child in order, so none of
/// `stdio` and `err_fd` may be one of them (the caller checks). `err_fd`
/// should be close-on-exec, so its reader sees end-of-file at the `execve`.
// The arguments are what execve and the child's set-up need, each once.
#[allow(clippy::too_many_arguments)]
pub(crate) fn clone_exec_into_cgroup(
    cgroup: BorrowedFd<'_>,
    stdio: [BorrowedFd<'_>; 3],
    err_fd: BorrowedFd<'_>,
    program: &CStr,
    argv: &[CString],
    envp: &[CString],
    cwd: &CStr,
    tty: bool,
) -> io::Result<libc::pid_t> {
    // Every allocation happens here, before the clone.
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_ptrs: Vec<*const libc::c_char> = envp
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let stdio = stdio.map(|fd| fd.as_raw_fd());
    // SAFETY: in the child (0) only exec_child runs, which keeps to
    // async-signal-safe calls on the pointers built above (alive in the
    // child's copy of this frame) and never returns.
    match unsafe { clone_into_cgroup(cgroup) }? {
        0 => {
            // SAFETY: see above; this is the child of clone_into_cgroup, and
            // every pointer is NUL-terminated (`CStr`) or a NULL-terminated
            // array of them, built before the clone.
            unsafe {
                exec_child(
                    stdio,
                    err_fd.as_raw_fd(),
                    program.as_ptr(),
                    argv_ptrs.as_ptr(),
                    envp_ptrs.as_ptr(),
                    cwd.as_ptr(),
                    tty,
                )
            }
        }
        pid => Ok(pid),
    }
}

/// `clone_args` of `clone3(2)` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks (no `CLONE_VM`: the child gets a copy-on-write copy, like `fork`)
/// straight into the cgroup open as `cgroup`. Returns the child's pid in
/// the parent and 0 in the child.
///
/// # Safety
/// In the child (0 returned) the caller may only call async-signal-safe
/// functions (this process has other threads, whose locks stay held in the
/// copy) and must end with `execve` or `_exit`.
unsafe fn clone_into_cgroup(cgroup: BorrowedFd<'_>) -> io::Result<libc::pid_t> {
    let mut args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        // A descriptor is a non-negative int.
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 reads `size_of::<CloneArgs>()` bytes of a live,
    // properly laid out struct; without CLONE_VM or a stack the child runs
    // on its own copy of this stack, so returning here in both processes is
    // sound (as for fork). What the child may do next is the caller's
    // contract above.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // A pid fits pid_t.
    Ok(r as libc::pid_t)
}

/// The child's half of [`clone_exec_into_cgroup`]: wires stdio, makes its own
/// process group, changes directory, resets SIGPIPE (std ignores it in the
/// agent; `Command` resets it too) and the signal mask, and executes. On
/// failure it writes `errno` to `err_fd` and exits 127.
///
/// # Safety
/// Only in the child of [`clone_into_cgroup`]. Every pointer must be valid
/// (NUL-terminated strings and NULL-terminated arrays, built before the
/// clone). It calls only async-signal-safe functions and never returns.
unsafe fn exec_child(
    stdio: [RawFd; 3],
    err_fd: RawFd,
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    tty: bool,
) -> ! {
    // SAFETY: plain syscalls on descriptors and on the caller's valid
    // pointers; the errno read and write go through valid locals.
    unsafe {
        for (target, fd) in (0..).zip(stdio) {
            // dup2 onto itself would keep O_CLOEXEC: clear it instead.
            let r = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if r < 0 {
                child_fail(err_fd);
            }
        }
        let grouped = if tty {
            libc::setsid() >= 0 && libc::ioctl(0, libc::TIOCSCTTY, 0) >= 0
        } else {
            libc::setpgid(0, 0) >= 0
        };
        if !grouped || libc::chdir(cwd) < 0 {
            child_fail(err_fd);
        }
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::execve(program, argv, envp);
        child_fail(err_fd)
    }
}

/// Reports `errno` on `err_fd` and exits 127 (async-signal-safe).
///
/// # Safety
/// Only in the child of [`clone_into_cgroup`].
unsafe fn child_fail(err_fd: RawFd) -> ! {
    // SAFETY: errno is this thread's; write reads 4 bytes of a live local;
    // _exit ends the process without running any destructor.
    unsafe {
        let errno: libc::c_int = *libc::__errno_location();
        libc::write(
            err_fd,
            (&errno as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>(),
        );
        libc::_exit(127)
    }
}
