//! Files and directories: the system calls the path policy and the file
//! service need and that `std`/`nix` lack or spell awkwardly (`openat2`,
//! `renameat2`, `fstatat` without following, `readlinkat` on an `O_PATH`
//! descriptor, `getrandom(GRND_INSECURE)`, a bounded `readdir`).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// `struct open_how` of `openat2(2)` (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`.
pub(crate) const BENEATH: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;

fn cstr(path: &OsStr) -> io::Result<CString> {
    CString::new(path.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `openat2(dir, path, {flags | O_CLOEXEC, mode, resolve})`.
pub(crate) fn openat2(
    dir: BorrowedFd<'_>,
    path: &OsStr,
    flags: libc::c_int,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let path = cstr(path)?;
    let how = OpenHow {
        // The kernel wants the flags zero-extended; they are non-negative.
        flags: (flags | libc::O_CLOEXEC) as u32 as u64,
        mode: if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
            u64::from(mode)
        } else {
            0
        },
        resolve,
    };
    loop {
        // SAFETY: `dir` is a valid open descriptor for the call's duration,
        // `path` is a NUL-terminated string that outlives the call, and
        // `how` points to a properly initialised `open_how` whose size is
        // passed alongside.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if ret >= 0 {
            // The kernel returns an int-sized descriptor.
            let fd = ret as libc::c_int;
            // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let err = io::Error::last_os_error();
        // EAGAIN: RESOLVE_CACHED is not used, but the kernel may also
        // return it when a concurrent rename raced the lookup.
        if err.raw_os_error() != Some(libc::EINTR) && err.raw_os_error() != Some(libc::EAGAIN) {
            return Err(err);
        }
    }
}

/// `open(path, flags | O_CLOEXEC)` with ordinary resolution (only for `/`, where the root walk starts).
pub(crate) fn open_plain(path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let path = cstr(OsStr::new(path))?;
    loop {
        // SAFETY: `path` is NUL-terminated and outlives the call.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// `fstat(fd)`, also valid on `O_PATH` descriptors.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is valid for the call and `st` is a valid out-pointer.
    let ret = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    if ret == 0 {
        Ok(st)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`: `None` if it does not exist.
pub(crate) fn lstatat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<libc::stat>> {
    let name = cstr(name)?;
    // SAFETY: `stat` is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is valid, `name` is NUL-terminated and `st` is a valid out-pointer.
    let ret = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret == 0 {
        return Ok(Some(st));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// `renameat2(dir, from, dir, to, flags)`.
pub(crate) fn renameat2(
    dir: BorrowedFd<'_>,
    from: &OsStr,
    to: &OsStr,
    flags: libc::c_uint,
) -> io::Result<()> {
    let from = cstr(from)?;
    let to = cstr(to)?;
    // SAFETY: `dir` is valid and both names are NUL-terminated and outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            dir.as_raw_fd(),
            from.as_ptr(),
            dir.as_raw_fd(),
            to.as_ptr(),
            flags,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `linkat(dir, from, dir, to, 0)`.
pub(crate) fn linkat(dir: BorrowedFd<'_>, from: &OsStr, to: &OsStr) -> io::Result<()> {
    let from = cstr(from)?;
    let to = cstr(to)?;
    // SAFETY: `dir` is valid and both names are NUL-terminated and outlive the call.
    let ret = unsafe {
        libc::linkat(
            dir.as_raw_fd(),
            from.as_ptr(),
            dir.as_raw_fd(),
            to.as_ptr(),
            0,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `unlinkat(dir, name, 0)`.
pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: `dir` is valid and `name` is NUL-terminated and outlives the call.
    let ret = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// True if `file` is on tmpfs, whose pages (shmem's, never clean) a splice
/// can never take out of the page cache.
pub(crate) fn on_tmpfs(file: &std::fs::File) -> bool {
    nix::sys::statfs::fstatfs(file)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Fills `buf` from the kernel's random source.
///
/// `GRND_INSECURE` (Linux 5.6+, which openat2 needs anyway): the bytes
/// name staging files (created `O_EXCL`) and uploads (bound to their
/// connection), so they must be unique, not secret, and a freshly booted
/// guest must not wait for its entropy pool (a blocking `getrandom`
/// made the first write after boot take a second under TCG).
pub(crate) fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    let mut flags = libc::GRND_INSECURE;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), flags) };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                // A kernel without GRND_INSECURE: the blocking default.
                Some(libc::EINVAL) if flags != 0 => {
                    flags = 0;
                    continue;
                }
                _ => return Err(err),
            }
        }
        // `n` is non-negative and at most `rest.len()`.
        filled += n as usize;
    }
    Ok(())
}

/// A random lower-case hex string of `2 * bytes` characters.
pub(crate) fn random_hex(bytes: usize) -> io::Result<String> {
    let mut buf = vec![0u8; bytes];
    random_bytes(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// `RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: one component of the
/// safe walk of a root (no `RESOLVE_BENEATH`: the walk starts at `/`).
pub(crate) const NO_SYMLINKS: u64 = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
/// RESOLVE_NO_XDEV`: the stale staging file sweep, which follows no link
/// and stays on the root's filesystem.
pub(crate) const SWEEP: u64 = libc::RESOLVE_BENEATH
    | libc::RESOLVE_NO_SYMLINKS
    | libc::RESOLVE_NO_MAGICLINKS
    | libc::RESOLVE_NO_XDEV;

/// The agent's effective user id.
pub(crate) fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `mkdirat(dir, name, mode)` (the umask applies).
pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: `dir` is valid and `name` is NUL-terminated and outlives the call.
    let ret = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The target of the symbolic link `link` refers to (an
/// `O_PATH | O_NOFOLLOW` descriptor of the link itself).
pub(crate) fn readlink(link: BorrowedFd<'_>) -> io::Result<OsString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `link` is valid, the empty path is a NUL-terminated static
    // string, and `buf` is writable for `buf.len()` bytes.
    let n = unsafe {
        libc::readlinkat(
            link.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    // readlinkat returns -1 or the number of bytes placed in `buf`.
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    if n >= buf.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    buf.truncate(n);
    Ok(OsString::from_vec(buf))
}

/// The entries of directory `dir` (opened `O_RDONLY | O_DIRECTORY`),
/// without `.` and `..`, each with its `d_type`; at most `limit`.
pub(crate) fn read_dir(dir: OwnedFd, limit: usize) -> io::Result<Vec<(OsString, u8)>> {
    let raw = dir.into_raw_fd();
    // SAFETY: `raw` is an open directory descriptor we own; on success
    // the stream owns it and `closedir` below closes it.
    let stream = unsafe { libc::fdopendir(raw) };
    if stream.is_null() {
        let err = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
        return Err(err);
    }
    let mut out = Vec::new();
    let result = loop {
        if out.len() >= limit {
            break Ok(());
        }
        // SAFETY: errno is thread-local; resetting it tells the end of
        // the stream (NULL, errno 0) from an error (NULL, errno set).
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a valid open directory stream.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            let err = io::Error::last_os_error();
            break match err.raw_os_error() {
                Some(0) | None => Ok(()),
                Some(_) => Err(err),
            };
        }
        // SAFETY: readdir returned a valid entry whose `d_name` is
        // NUL-terminated; it stays valid until the next readdir call,
        // and is copied out before that.
        let (name, kind) = unsafe {
            (
                std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()),
                (*entry).d_type,
            )
        };
        let name = name.to_bytes();
        if name != b"." && name != b".." {
            out.push((OsString::from_vec(name.to_vec()), kind));
        }
    };
    // SAFETY: `stream` is valid and not used after this call.
    unsafe { libc::closedir(stream) };
    result.map(|()| out)
}

/// True if `st` describes a regular file.
pub(crate) fn is_regular(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

/// True if `st` describes a directory.
pub(crate) fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// True if `st` describes a symbolic link.
pub(crate) fn is_symlink(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFLNK
}
