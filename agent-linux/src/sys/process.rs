//! Processes: `pidfd_open`, `waitpid`, and `clone3(CLONE_INTO_CGROUP)`
//! with the child's code up to `execve`, for [`crate::exec`], which decides
//! what runs and how (see its module documentation).
//!
//! The child of the clone runs on the agent's memory (x86-64: `CLONE_VM`,
//! on a stack of its own, while the calling thread waits for its `execve`)
//! or on a copy-on-write copy of it (elsewhere), in which other threads'
//! locks may be held: either way it calls only async-signal-safe functions,
//! on strings and arrays built before the clone, and writes nothing of the
//! agent's.

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
/// cgroup open as `cgroup` (`clone3(CLONE_INTO_CGROUP)`). On x86-64 the
/// child shares the agent's memory and runs on a stack of its own while
/// the calling thread waits for its `execve` (`CLONE_VM | CLONE_VFORK`,
/// as `posix_spawn` does: no copy of the page tables, and no copy-on-write
/// faults in the agent afterwards); elsewhere it runs on a copy-on-write
/// copy, as after `fork`. The child puts
/// `stdio` on descriptors 0, 1 and 2, makes its own process group (with
/// `tty`: its own session, with descriptor 0 as its controlling terminal,
/// a pseudo-terminal's slave side), changes
/// to `cwd`, resets SIGPIPE, every caught signal and its signal mask and
/// calls `execve`; if any
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
    let child = ChildPlan {
        stdio: stdio.map(|fd| fd.as_raw_fd()),
        err_fd: err_fd.as_raw_fd(),
        program: program.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        cwd: cwd.as_ptr(),
        tty,
    };
    spawn_child(cgroup, &child)
}

/// What the child of the clone needs, every pointer valid until its
/// `execve` (built by [`clone_exec_into_cgroup`] before the clone).
#[derive(Clone, Copy)]
struct ChildPlan {
    stdio: [RawFd; 3],
    err_fd: RawFd,
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    tty: bool,
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

/// The child's stack under `CLONE_VM`: it runs [`exec_child`] and the libc
/// wrappers of a few system calls, nothing deeper.
#[cfg(target_arch = "x86_64")]
const CHILD_STACK: usize = 64 * 1024;

/// Starts the child of `plan` in the cgroup open as `cgroup` sharing this
/// process's memory (`CLONE_VM | CLONE_VFORK`): this thread waits until
/// the child has called `execve` or exited. Returns the child's pid.
///
/// All signals are blocked on this thread across the clone, so none of the
/// agent's handlers (tokio's) ever runs in the child, which shares their
/// memory; the child resets every caught signal to its default before it
/// unblocks them (`posix_spawn` does the same).
#[cfg(target_arch = "x86_64")]
fn spawn_child(cgroup: BorrowedFd<'_>, plan: &ChildPlan) -> io::Result<libc::pid_t> {
    // u128 for the stack's 16-byte alignment; never read by us.
    let mut stack: Vec<u128> = Vec::with_capacity(CHILD_STACK / 16);
    let mut args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.as_mut_ptr() as u64,
        stack_size: (stack.capacity() * 16) as u64,
        // A descriptor is a non-negative int.
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset fills the live local; pthread_sigmask reads one
    // set and writes the other, both live locals.
    unsafe {
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
    }
    let ret: i64;
    // SAFETY: clone3 reads `args`, alive across the call. The child starts
    // on the top of `stack` (its own, 16-byte aligned; the parent does not
    // touch it until the child is gone or has called execve, which
    // CLONE_VFORK waits for) and calls `child_entry(plan)` at once, never
    // returning into this frame; `plan` and what it points to stay alive
    // and unmoved here meanwhile. The parent gets the pid or -errno in
    // rax; rcx and r11 are the syscall's clobbers.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") &mut args as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") plan as *const ChildPlan,
            in("r13") child_entry as extern "C" fn(*const ChildPlan) -> !,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    // SAFETY: restores this thread's mask from the live local saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut());
    }
    drop(stack);
    if ret < 0 {
        // -errno from the kernel, an int.
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    // A pid fits pid_t.
    Ok(ret as libc::pid_t)
}

/// Where the child of [`spawn_child`] starts, on its own stack.
#[cfg(target_arch = "x86_64")]
extern "C" fn child_entry(plan: *const ChildPlan) -> ! {
    // SAFETY: `plan` is the parent's, alive while it waits (CLONE_VFORK);
    // this is the child of the clone, sharing the parent's memory, and
    // keeps to async-signal-safe system calls until execve.
    unsafe {
        let plan = &*plan;
        reset_caught_signals();
        exec_child(plan)
    }
}

/// Sets every signal with a handler back to its default action. The child
/// of a `CLONE_VM` clone starts with the parent's handlers, which would
/// run on the parent's memory if a signal came before `execve`.
///
/// # Safety
/// Only in the child of [`spawn_child`], with all signals blocked.
#[cfg(target_arch = "x86_64")]
unsafe fn reset_caught_signals() {
    /// The kernel's `struct sigaction` on x86-64 (all zeros: `SIG_DFL`).
    #[repr(C)]
    #[derive(Default)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction::default();
    for sig in 1..=64 {
        let mut old = KernelSigaction::default();
        // SAFETY: rt_sigaction reads and writes one live local of the
        // kernel's layout, with the kernel's sigset size (8).
        unsafe {
            let got = libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<KernelSigaction>(),
                &mut old as *mut KernelSigaction,
                8usize,
            );
            // SIG_DFL is 0, SIG_IGN 1: an ignored signal stays ignored
            // across execve, as SIGPIPE's reset in exec_child relies on.
            if got == 0 && old.handler > 1 {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &default as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                );
            }
        }
    }
}

/// Starts the child of `plan` in the cgroup open as `cgroup` on a
/// copy-on-write copy of this process (no `CLONE_VM`, as `fork`).
#[cfg(not(target_arch = "x86_64"))]
fn spawn_child(cgroup: BorrowedFd<'_>, plan: &ChildPlan) -> io::Result<libc::pid_t> {
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
    // sound (as for fork). The child only runs exec_child, which keeps to
    // async-signal-safe calls on `plan`'s pointers (alive in its copy) and
    // never returns.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match r {
        r if r < 0 => Err(io::Error::last_os_error()),
        // SAFETY: see above; this is the child.
        0 => unsafe { exec_child(plan) },
        // A pid fits pid_t.
        pid => Ok(pid as libc::pid_t),
    }
}

/// The child's half of [`clone_exec_into_cgroup`]: wires stdio, makes its own
/// process group, changes directory, resets SIGPIPE (std ignores it in the
/// agent; `Command` resets it too) and the signal mask, and executes. On
/// failure it writes `errno` to `err_fd` and exits 127.
///
/// # Safety
/// Only in the child of [`spawn_child`]. Every pointer must be valid
/// (NUL-terminated strings and NULL-terminated arrays, built before the
/// clone). It calls only async-signal-safe functions and never returns.
unsafe fn exec_child(plan: &ChildPlan) -> ! {
    let ChildPlan {
        stdio,
        err_fd,
        program,
        argv,
        envp,
        cwd,
        tty,
    } = *plan;
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
/// Only in the child of [`spawn_child`].
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
