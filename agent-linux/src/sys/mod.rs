//! Every `unsafe` system call wrapper of the agent, and nothing else.
//!
//! Each wrapper is a small safe function over one system call (or a few
//! that belong together), with a `// SAFETY:` comment on every `unsafe`
//! block; the rest of the crate calls these and holds no `unsafe` of its
//! own. The one place that cannot be made safe inside a function, the code
//! the child of `clone3` runs until `execve`, is `unsafe fn`s private to
//! [`process`], behind the safe [`clone_exec_into_cgroup`].
//! `tests/tidy.rs` fails the build when `unsafe` appears anywhere else in
//! `src/`.
//!
//! - [`fs`]: files and directories for [`crate::policy`] and
//!   [`crate::files`] (`openat2`, `renameat2`, `fstatat`, `readlinkat`,
//!   `getrandom`, a bounded `readdir`);
//! - [`process`]: pidfds, `waitpid` and `clone3(CLONE_INTO_CGROUP)` for
//!   [`crate::exec`];
//! - [`pty`]: the terminal size ioctl and the child's `setsid` +
//!   `TIOCSCTTY` for [`crate::exec`]'s streamed commands;
//! - [`ops`]: `FIFREEZE`, `FITHAW`, `FITRIM`, the RTC's ioctls and
//!   `localtime_r` for [`crate::ops`];
//! - [`pipe`]: pipes and `splice` for [`crate::files`] and
//!   [`crate::payload`] (safe wrappers over nix, kept here with the rest
//!   of the system calls);
//! - [`port`]: `fcntl`, reactor registration and reads into uninitialised
//!   buffers for [`crate::transport`];
//! - here: the allocator tunables of [`crate::buffers`] and the CPU count of
//!   [`crate::sysinfo`] and the page size of [`crate::ops::proc_pid`].

mod fs;
mod ops;
mod pipe;
mod port;
mod process;
mod pty;

pub(crate) use fs::*;
pub(crate) use ops::*;
pub(crate) use pipe::*;
pub(crate) use port::*;
pub(crate) use process::*;
pub(crate) use pty::*;

/// The number of CPUs online (`sysconf(_SC_NPROCESSORS_ONLN)`; -1 if the
/// system cannot tell).
pub(crate) fn online_cpus() -> libc::c_long {
    // SAFETY: sysconf has no memory-safety preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }
}

/// Bytes per page (`sysconf(_SC_PAGESIZE)`; 4096 if the system cannot
/// tell).
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// `mallopt(M_ARENA_MAX, 1)` under glibc (one heap for every thread); a
/// no-op under other C libraries.
pub(crate) fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt sets an allocator tunable; it takes no pointers and
    // is called before the runtime starts its threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// `malloc_trim(0)` under glibc (freed heap memory back to the kernel); a
/// no-op under other C libraries.
pub(crate) fn malloc_trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and trims the allocator's own free
    // lists; it takes no pointers and is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
