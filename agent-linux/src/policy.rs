//! The agent's policy: which paths may be read or written and which commands
//! may run.
//!
//! # Paths
//!
//! The host controls the path string and a guest user may control files
//! inside the allowed roots, so a path is never resolved by the ordinary
//! kernel lookup. Instead [`PathPolicy`] finds the allowed roots the path is
//! lexically under (longest first), opens the root (an admin-trusted path,
//! ordinary resolution) and resolves the rest of the path with `openat2(2)`
//! and `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`. The kernel then refuses
//! `..` that climbs out, absolute symlinks, relative symlinks that leave the
//! root and `/proc` magic links, in the same system call that opens the file,
//! so there is no window between a check and its use. `openat2` needs Linux
//! 5.6 or later; on older kernels every path request fails with
//! `not_supported`.
//!
//! A root that is a regular file (for example `/etc/os-release`, which is
//! often a symlink itself) allows exactly that path, opened with ordinary
//! resolution because the administrator named it.
//!
//! Reads open the file twice: first with `O_PATH` (which has no side effect
//! even on a device or a FIFO) to check that it is a regular file, then for
//! reading, checking that both opens found the same inode.
//!
//! Hard links: a hard link inside a root to a file outside it cannot be told
//! apart from an ordinary file by its path. Regular files reached through a
//! directory root are therefore refused when they have more than one link
//! (`st_nlink > 1`), for reading and for appending. Replacing writes
//! (`truncate`, `create_new`) rename a new file over the name, so they never
//! write into the linked inode and need no such check. A file root is
//! trusted whatever its link count.
//!
//! # Commands
//!
//! [`CommandPolicy`] resolves a bare name in [`SAFE_PATH`] only (never in the
//! request's `PATH`) and an absolute path as given, and applies the optional
//! `security.command_whitelist`. Paths are compared as strings after lexical
//! normalisation, never canonicalised through symlinks: on a multi-call
//! system (busybox) `/bin/ls` and `/bin/cat` are links to one binary, and
//! allowing `ls` must not allow `cat`.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use agent_common::error::ErrorKind;
use serde_json::Value;

use crate::error::{io_error_kind, RpcError};

/// The only `PATH` a bare command name is looked up in, and the `PATH` the
/// child process starts with.
pub const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Config key that lists the readable roots, named in refusals.
pub const READ_KEY: &str = "security.allowed_read_paths";
/// Config key that lists the writable roots, named in refusals.
pub const WRITE_KEY: &str = "security.allowed_write_paths";
/// Config key of the command whitelist, named in refusals.
pub const WHITELIST_KEY: &str = "security.command_whitelist";

/// Why a path or a command is refused or could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The path is empty, relative, contains a NUL byte or a `..` component.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path as requested.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
        /// The error kind (`invalid_params` for malformed strings,
        /// `policy_denied` for relative paths and `..`).
        kind: ErrorKind,
    },
    /// The path is under none of the allowed roots.
    #[error("{path} is outside the allowed paths; add it (or a parent directory) to {key} in the agent config to allow it")]
    OutsideRoots {
        /// The path as requested.
        path: String,
        /// The config key that would allow it.
        key: &'static str,
    },
    /// Resolving the path left the allowed root (`..`, a symlink or a magic link) or met a symlink loop.
    #[error("{path} resolves outside the allowed roots (through '..', a symbolic link or a /proc magic link) or through a symbolic link loop")]
    Escapes {
        /// The path as requested.
        path: String,
    },
    /// The allowed root the path is under does not exist.
    #[error("{path} is under the allowed root {root}, which does not exist")]
    RootMissing {
        /// The path as requested.
        path: String,
        /// The missing root.
        root: String,
    },
    /// The path names a directory, FIFO, device or socket.
    #[error("{path} is not a regular file")]
    NotRegularFile {
        /// The path as requested.
        path: String,
    },
    /// The file has several hard links, one of which may be outside the roots.
    #[error(
        "{path} has {links} hard links and one of them may be outside the allowed roots; refused"
    )]
    HardLinked {
        /// The path as requested.
        path: String,
        /// Its link count.
        links: u64,
    },
    /// The file was replaced between the two steps of opening it.
    #[error("{path} changed while it was being opened; retry")]
    Changed {
        /// The path as requested.
        path: String,
    },
    /// The kernel has no `openat2` (Linux < 5.6).
    #[error("this kernel lacks openat2 (Linux 5.6 or later is needed for file access)")]
    Unsupported,
    /// An operating-system error while resolving or opening the path.
    #[error("cannot open {path}")]
    Io {
        /// The path as requested.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The command string is refused outright (empty, NUL, relative with a slash, `..`).
    #[error("command {command:?} refused: {reason}")]
    BadCommand {
        /// The command as requested.
        command: String,
        /// Why.
        reason: &'static str,
    },
    /// The command is not in `security.command_whitelist`.
    #[error("command {command:?} is not allowed by {key} in the agent config")]
    CommandNotAllowed {
        /// The command as requested.
        command: String,
        /// The config key.
        key: &'static str,
    },
    /// No executable of that name in the agent's PATH, or no file at that path.
    #[error("command {command:?} not found (bare names are looked up in {SAFE_PATH})")]
    CommandNotFound {
        /// The command as requested.
        command: String,
    },
    /// The command exists but is not an executable regular file.
    #[error("{path} is not an executable regular file")]
    NotExecutable {
        /// The resolved path.
        path: String,
    },
}

impl RpcError for PolicyError {
    fn kind(&self) -> ErrorKind {
        match self {
            PolicyError::InvalidPath { kind, .. } => *kind,
            PolicyError::OutsideRoots { .. }
            | PolicyError::Escapes { .. }
            | PolicyError::HardLinked { .. }
            | PolicyError::Changed { .. }
            | PolicyError::BadCommand { .. }
            | PolicyError::CommandNotAllowed { .. } => ErrorKind::PolicyDenied,
            PolicyError::RootMissing { .. } | PolicyError::CommandNotFound { .. } => {
                ErrorKind::NotFound
            }
            PolicyError::NotRegularFile { .. } => ErrorKind::NotARegularFile,
            PolicyError::Unsupported => ErrorKind::NotSupported,
            PolicyError::Io { source, .. } => io_error_kind(source),
            PolicyError::NotExecutable { .. } => ErrorKind::SpawnFailed,
        }
    }

    fn data(&self) -> Vec<(&'static str, Value)> {
        match self {
            PolicyError::InvalidPath { path, .. }
            | PolicyError::Escapes { path }
            | PolicyError::NotRegularFile { path }
            | PolicyError::Changed { path }
            | PolicyError::Io { path, .. }
            | PolicyError::NotExecutable { path } => vec![("path", path.as_str().into())],
            PolicyError::OutsideRoots { path, key } => {
                vec![
                    ("path", path.as_str().into()),
                    ("config_key", (*key).into()),
                ]
            }
            PolicyError::RootMissing { path, root } => {
                vec![
                    ("path", path.as_str().into()),
                    ("root", root.as_str().into()),
                ]
            }
            PolicyError::HardLinked { path, links } => {
                vec![("path", path.as_str().into()), ("links", (*links).into())]
            }
            PolicyError::Unsupported => Vec::new(),
            PolicyError::BadCommand { command, .. } | PolicyError::CommandNotFound { command } => {
                vec![("command", command.as_str().into())]
            }
            PolicyError::CommandNotAllowed { command, key } => {
                vec![
                    ("command", command.as_str().into()),
                    ("config_key", (*key).into()),
                ]
            }
        }
    }
}

/// Why a path string is not acceptable (see [`normalize_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathSyntaxError {
    /// The string is empty.
    #[error("the path is empty")]
    Empty,
    /// The string contains a NUL byte.
    #[error("the path contains a NUL byte")]
    Nul,
    /// The path does not start with `/`.
    #[error("the path is not absolute")]
    NotAbsolute,
    /// The path has a `..` component.
    #[error("the path contains a '..' component")]
    DotDot,
}

/// Normalises an absolute path lexically: collapses `//`, drops `.`
/// components and any trailing slash. Refuses empty, relative, NUL and `..`.
pub fn normalize_path(path: &str) -> Result<String, PathSyntaxError> {
    if path.is_empty() {
        return Err(PathSyntaxError::Empty);
    }
    if path.contains('\0') {
        return Err(PathSyntaxError::Nul);
    }
    if !path.starts_with('/') {
        return Err(PathSyntaxError::NotAbsolute);
    }
    let mut out = String::with_capacity(path.len());
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(PathSyntaxError::DotDot),
            p => {
                out.push('/');
                out.push_str(p);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

fn check_request_path(path: &str) -> Result<String, PolicyError> {
    normalize_path(path).map_err(|e| PolicyError::InvalidPath {
        path: path.to_owned(),
        reason: match e {
            PathSyntaxError::Empty => "the path is empty",
            PathSyntaxError::Nul => "the path contains a NUL byte",
            PathSyntaxError::NotAbsolute => "the path must be absolute",
            PathSyntaxError::DotDot => "the path must not contain '..' components",
        },
        kind: match e {
            PathSyntaxError::Empty | PathSyntaxError::Nul => ErrorKind::InvalidParams,
            PathSyntaxError::NotAbsolute | PathSyntaxError::DotDot => ErrorKind::PolicyDenied,
        },
    })
}

/// The part of normalised `path` below normalised `root`, if `path` is
/// `root` itself (`Some("")`) or lies beneath it.
fn rest_under<'a>(root: &str, path: &'a str) -> Option<&'a str> {
    if root == "/" {
        return Some(&path[1..]);
    }
    let rest = path.strip_prefix(root)?;
    if rest.is_empty() {
        Some(rest)
    } else {
        rest.strip_prefix('/')
    }
}

/// Small safe wrappers over the system calls the policy and the file service
/// need and that `std`/`nix` lack or spell awkwardly.
pub(crate) mod sys {
    use super::*;

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

    /// `open(path, flags | O_CLOEXEC)` with ordinary resolution (admin-trusted paths only).
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
}

/// How an allowed root turned out when opened.
enum OpenedRoot {
    /// A directory: resolve beneath this descriptor.
    Dir(OwnedFd),
    /// Anything else (normally a regular file): only the exact path is
    /// allowed. Holds what the root resolved to.
    File(libc::stat),
    /// The root does not exist.
    Missing,
}

fn open_root(root: &str, path: &str) -> Result<OpenedRoot, PolicyError> {
    match sys::open_plain(root, libc::O_PATH) {
        Ok(fd) => {
            let st = sys::fstat(fd.as_fd()).map_err(|source| PolicyError::Io {
                path: path.to_owned(),
                source,
            })?;
            if sys::is_dir(&st) {
                Ok(OpenedRoot::Dir(fd))
            } else {
                Ok(OpenedRoot::File(st))
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(OpenedRoot::Missing),
        Err(source) => Err(PolicyError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Maps an `openat2` failure to a policy error.
fn resolve_error(path: &str, err: io::Error) -> PolicyError {
    match err.raw_os_error() {
        Some(libc::EXDEV) | Some(libc::ELOOP) => PolicyError::Escapes {
            path: path.to_owned(),
        },
        Some(libc::ENOSYS) => PolicyError::Unsupported,
        _ => PolicyError::Io {
            path: path.to_owned(),
            source: err,
        },
    }
}

/// Read flags: never block on a FIFO, never acquire a controlling terminal.
const READ_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;

/// The allowed roots of one direction (read or write).
#[derive(Debug, Clone)]
pub struct PathPolicy {
    /// Normalised roots, longest first.
    roots: Vec<String>,
}

impl PathPolicy {
    /// A policy allowing paths under `roots`. Roots that are not absolute
    /// UTF-8 paths without `..` are ignored (the config refuses them anyway).
    pub fn new(roots: &[PathBuf]) -> PathPolicy {
        let mut out: Vec<String> = Vec::new();
        for root in roots {
            match root.to_str().map(normalize_path) {
                Some(Ok(r)) => out.push(r),
                _ => tracing::warn!(root = %root.display(), "ignoring invalid allowed path"),
            }
        }
        out.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        out.dedup();
        PathPolicy { roots: out }
    }

    /// The roots, normalised, longest first.
    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// The roots `path` (normalised) is under, with the rest of the path.
    fn candidates<'a>(&'a self, path: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.roots
            .iter()
            .filter_map(move |root| rest_under(root, path).map(|rest| (root.as_str(), rest)))
    }

    /// Opens `path` for reading (O_RDONLY|O_NONBLOCK|O_CLOEXEC|O_NOCTTY) only
    /// if it resolves inside an allowed root and is a regular file (with a
    /// single link, unless it is a file root).
    pub fn open_read(&self, path: &str) -> Result<File, PolicyError> {
        let norm = check_request_path(path)?;
        let mut first_err = None;
        for (root, rest) in self.candidates(&norm) {
            match Self::open_read_in(root, rest, path) {
                Ok(file) => return Ok(file),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| PolicyError::OutsideRoots {
            path: path.to_owned(),
            key: READ_KEY,
        }))
    }

    fn open_read_in(root: &str, rest: &str, path: &str) -> Result<File, PolicyError> {
        let io_err = |source| PolicyError::Io {
            path: path.to_owned(),
            source,
        };
        match open_root(root, path)? {
            OpenedRoot::Missing => Err(PolicyError::RootMissing {
                path: path.to_owned(),
                root: root.to_owned(),
            }),
            OpenedRoot::File(st1) => {
                if !rest.is_empty() {
                    return Err(PolicyError::OutsideRoots {
                        path: path.to_owned(),
                        key: READ_KEY,
                    });
                }
                // A file root is admin-trusted: ordinary resolution. Still,
                // never open a device or FIFO (checked on the O_PATH probe).
                let not_regular = || PolicyError::NotRegularFile {
                    path: path.to_owned(),
                };
                if !sys::is_regular(&st1) {
                    return Err(not_regular());
                }
                let fd = sys::open_plain(root, READ_FLAGS).map_err(io_err)?;
                let st2 = sys::fstat(fd.as_fd()).map_err(io_err)?;
                if (st1.st_dev, st1.st_ino) != (st2.st_dev, st2.st_ino) {
                    return Err(PolicyError::Changed {
                        path: path.to_owned(),
                    });
                }
                if !sys::is_regular(&st2) {
                    return Err(not_regular());
                }
                Ok(File::from(fd))
            }
            OpenedRoot::Dir(rootfd) => {
                let rel = OsStr::new(if rest.is_empty() { "." } else { rest });
                // Step 1: O_PATH has no side effect on devices or FIFOs.
                let probe = sys::openat2(rootfd.as_fd(), rel, libc::O_PATH, 0, sys::BENEATH)
                    .map_err(|e| resolve_error(path, e))?;
                let st1 = sys::fstat(probe.as_fd()).map_err(io_err)?;
                check_regular_single(&st1, path)?;
                // Step 2: the real open, checked to be the same inode.
                let fd = sys::openat2(rootfd.as_fd(), rel, READ_FLAGS, 0, sys::BENEATH)
                    .map_err(|e| resolve_error(path, e))?;
                let st2 = sys::fstat(fd.as_fd()).map_err(io_err)?;
                if (st1.st_dev, st1.st_ino) != (st2.st_dev, st2.st_ino) {
                    return Err(PolicyError::Changed {
                        path: path.to_owned(),
                    });
                }
                check_regular_single(&st2, path)?;
                Ok(File::from(fd))
            }
        }
    }

    /// Opens the directory that will contain `path` (an `O_PATH|O_DIRECTORY`
    /// descriptor resolved beneath an allowed root) and returns it with the
    /// final component, for writers that create a temporary file and rename
    /// it. The final component is not resolved: callers use `*at` calls that
    /// do not follow it.
    pub fn open_parent_for_write(&self, path: &str) -> Result<(OwnedFd, OsString), PolicyError> {
        let norm = check_request_path(path)?;
        let mut first_err = None;
        for (root, rest) in self.candidates(&norm) {
            match Self::open_parent_in(root, rest, path) {
                Ok(found) => return Ok(found),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| PolicyError::OutsideRoots {
            path: path.to_owned(),
            key: WRITE_KEY,
        }))
    }

    fn open_parent_in(
        root: &str,
        rest: &str,
        path: &str,
    ) -> Result<(OwnedFd, OsString), PolicyError> {
        let io_err = |source| PolicyError::Io {
            path: path.to_owned(),
            source,
        };
        // The exact path of a file root (existing or not): its parent is
        // opened with ordinary resolution, the admin named it.
        let file_root = || -> Result<(OwnedFd, OsString), PolicyError> {
            let (parent, name) = match root.rsplit_once('/') {
                Some((parent, name)) if !name.is_empty() => {
                    (if parent.is_empty() { "/" } else { parent }, name)
                }
                _ => {
                    return Err(PolicyError::NotRegularFile {
                        path: path.to_owned(),
                    })
                }
            };
            let fd = sys::open_plain(parent, libc::O_PATH | libc::O_DIRECTORY).map_err(io_err)?;
            Ok((fd, OsString::from(name)))
        };
        match open_root(root, path)? {
            OpenedRoot::Missing if rest.is_empty() => file_root(),
            OpenedRoot::Missing => Err(PolicyError::RootMissing {
                path: path.to_owned(),
                root: root.to_owned(),
            }),
            OpenedRoot::File(_) if rest.is_empty() => file_root(),
            OpenedRoot::File(_) => Err(PolicyError::OutsideRoots {
                path: path.to_owned(),
                key: WRITE_KEY,
            }),
            OpenedRoot::Dir(_) if rest.is_empty() => Err(PolicyError::NotRegularFile {
                path: path.to_owned(),
            }),
            OpenedRoot::Dir(rootfd) => {
                let (parent, name) = match rest.rsplit_once('/') {
                    Some((parent, name)) => (parent, name),
                    None => (".", rest),
                };
                let dirfd = sys::openat2(
                    rootfd.as_fd(),
                    OsStr::new(parent),
                    libc::O_PATH | libc::O_DIRECTORY,
                    0,
                    sys::BENEATH,
                )
                .map_err(|e| resolve_error(path, e))?;
                Ok((dirfd, OsString::from(name)))
            }
        }
    }
}

/// Refuses anything but a regular file with a single link.
pub(crate) fn check_regular_single(st: &libc::stat, path: &str) -> Result<(), PolicyError> {
    if !sys::is_regular(st) {
        return Err(PolicyError::NotRegularFile {
            path: path.to_owned(),
        });
    }
    if st.st_nlink > 1 {
        return Err(PolicyError::HardLinked {
            path: path.to_owned(),
            // st_nlink is u32 on some architectures.
            #[allow(clippy::unnecessary_cast)]
            links: st.st_nlink as u64,
        });
    }
    Ok(())
}

/// Which commands may run (see the module documentation).
#[derive(Debug, Clone)]
pub struct CommandPolicy {
    /// Normalised whitelist entries; `None` allows any command.
    whitelist: Option<Vec<String>>,
}

/// Looks a bare name up in [`SAFE_PATH`]: the first executable regular file.
pub fn lookup_safe_path(name: &str) -> Option<PathBuf> {
    SAFE_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| is_executable_file(p))
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

impl CommandPolicy {
    /// A policy allowing the commands in `whitelist`, or any if `None`.
    /// Entries are bare names or absolute paths (normalised here).
    pub fn new(whitelist: Option<&[String]>) -> CommandPolicy {
        let whitelist = whitelist.map(|list| {
            list.iter()
                .filter_map(|e| {
                    if e.starts_with('/') {
                        normalize_path(e).ok()
                    } else if !e.is_empty() && !e.contains('/') && !e.contains('\0') {
                        Some(e.clone())
                    } else {
                        None
                    }
                })
                .collect()
        });
        CommandPolicy { whitelist }
    }

    /// True if a whitelist is in force.
    pub fn is_restricted(&self) -> bool {
        self.whitelist.is_some()
    }

    /// Resolves the program to run: returns (path to execute, argv0).
    pub fn resolve(&self, command: &str) -> Result<(PathBuf, String), PolicyError> {
        let bad = |reason| PolicyError::BadCommand {
            command: command.to_owned(),
            reason,
        };
        if command.is_empty() {
            return Err(bad("the command is empty"));
        }
        if command.contains('\0') {
            return Err(bad("the command contains a NUL byte"));
        }
        let not_allowed = || PolicyError::CommandNotAllowed {
            command: command.to_owned(),
            key: WHITELIST_KEY,
        };
        let not_found = || PolicyError::CommandNotFound {
            command: command.to_owned(),
        };
        if command.starts_with('/') {
            let norm = normalize_path(command)
                .map_err(|_| bad("the command path must not contain '..' components"))?;
            if let Some(list) = &self.whitelist {
                let allowed = list.iter().any(|entry| {
                    if entry.starts_with('/') {
                        *entry == norm
                    } else {
                        lookup_safe_path(entry).is_some_and(|p| p.as_os_str() == OsStr::new(&norm))
                    }
                });
                if !allowed {
                    return Err(not_allowed());
                }
            }
            let path = PathBuf::from(norm);
            match std::fs::metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_found()),
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Err(not_found()),
                Err(source) => Err(PolicyError::Io {
                    path: command.to_owned(),
                    source,
                }),
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
                    Ok((path, command.to_owned()))
                }
                Ok(_) => Err(PolicyError::NotExecutable {
                    path: command.to_owned(),
                }),
            }
        } else if command.contains('/') {
            Err(bad(
                "a command must be a bare name or an absolute path, not a relative path",
            ))
        } else if command == "." || command == ".." {
            Err(bad("the command is not a program name"))
        } else {
            let found = lookup_safe_path(command);
            if let Some(list) = &self.whitelist {
                let allowed = list.iter().any(|entry| {
                    if entry.starts_with('/') {
                        found
                            .as_ref()
                            .is_some_and(|p| p.as_os_str() == OsStr::new(entry))
                    } else {
                        entry == command
                    }
                });
                if !allowed {
                    return Err(not_allowed());
                }
            }
            found.map(|p| (p, command.to_owned())).ok_or_else(not_found)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::{symlink, MetadataExt};

    fn kind_of(e: &PolicyError) -> ErrorKind {
        e.kind()
    }

    struct Tree {
        _dir: tempfile::TempDir,
        base: String,
    }

    /// base/root/{a.txt, sub/b.txt, fifo, dir/, links...}, base/outside/secret
    fn tree() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap().to_owned();
        let p = |s: &str| format!("{base}/{s}");
        std::fs::create_dir_all(p("root/sub/deeper")).unwrap();
        std::fs::create_dir_all(p("outside")).unwrap();
        std::fs::write(p("root/a.txt"), "A").unwrap();
        std::fs::write(p("root/sub/b.txt"), "B").unwrap();
        std::fs::write(p("outside/secret"), "SECRET").unwrap();
        std::fs::create_dir(p("root/dir")).unwrap();
        nix::unistd::mkfifo(
            p("root/fifo").as_str(),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        symlink(p("outside/secret"), p("root/abs_out")).unwrap();
        symlink("../outside/secret", p("root/rel_out")).unwrap();
        symlink("a.txt", p("root/rel_in")).unwrap();
        symlink("../a.txt", p("root/sub/up_in")).unwrap();
        symlink(p("outside"), p("root/dirlink_out")).unwrap();
        symlink("sub", p("root/dirlink_in")).unwrap();
        symlink("loop2", p("root/loop1")).unwrap();
        symlink("loop1", p("root/loop2")).unwrap();
        symlink("missing", p("root/dangling")).unwrap();
        symlink("/dev/null", p("root/devnull")).unwrap();
        symlink("/proc/self/root/etc/hostname", p("root/procroot")).unwrap();
        std::fs::hard_link(p("outside/secret"), p("root/hardlink")).unwrap();
        std::fs::write(p("root/caf\u{e9}.txt"), "utf8 name").unwrap();
        Tree { _dir: dir, base }
    }

    fn read_all(mut f: File) -> String {
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn normalize_path_table() {
        let cases: &[(&str, Result<&str, PathSyntaxError>)] = &[
            ("/", Ok("/")),
            ("/tmp", Ok("/tmp")),
            ("/tmp/", Ok("/tmp")),
            ("//tmp//a/./b/", Ok("/tmp/a/b")),
            ("/./", Ok("/")),
            ("", Err(PathSyntaxError::Empty)),
            ("tmp/a", Err(PathSyntaxError::NotAbsolute)),
            ("./a", Err(PathSyntaxError::NotAbsolute)),
            ("/tmp/../etc", Err(PathSyntaxError::DotDot)),
            ("/tmp/..", Err(PathSyntaxError::DotDot)),
            ("/tmp/a\0b", Err(PathSyntaxError::Nul)),
            ("/tmp/..a", Ok("/tmp/..a")),
        ];
        for (input, want) in cases {
            assert_eq!(
                normalize_path(input).as_deref(),
                want.as_deref(),
                "{input:?}"
            );
        }
    }

    #[test]
    fn rest_under_table() {
        let cases = [
            ("/tmp", "/tmp", Some("")),
            ("/tmp", "/tmp/a/b", Some("a/b")),
            ("/tmp", "/tmpx", None),
            ("/tmp", "/", None),
            ("/", "/etc/x", Some("etc/x")),
            ("/", "/", Some("")),
        ];
        for (root, path, want) in cases {
            assert_eq!(rest_under(root, path), want, "{root} {path}");
        }
    }

    #[test]
    fn read_policy_allows_inside_and_refuses_escapes() {
        let t = tree();
        let b = &t.base;
        let policy = PathPolicy::new(&[PathBuf::from(format!("{b}/root"))]);
        let ok: &[(&str, &str)] = &[
            ("root/a.txt", "A"),
            ("root/sub/b.txt", "B"),
            ("root/rel_in", "A"),
            ("root/sub/up_in", "A"),
            ("root/dirlink_in/b.txt", "B"),
            ("root//sub/./b.txt", "B"),
            ("root/caf\u{e9}.txt", "utf8 name"),
        ];
        for (rel, want) in ok {
            let f = policy
                .open_read(&format!("{b}/{rel}"))
                .unwrap_or_else(|e| panic!("{rel}: {e}"));
            assert_eq!(read_all(f), *want, "{rel}");
        }
        let denied: &[(String, ErrorKind)] = &[
            (
                format!("{b}/root/../outside/secret"),
                ErrorKind::PolicyDenied,
            ),
            (
                format!("{b}/root/sub/../../outside/secret"),
                ErrorKind::PolicyDenied,
            ),
            (format!("{b}/root/abs_out"), ErrorKind::PolicyDenied),
            (format!("{b}/root/rel_out"), ErrorKind::PolicyDenied),
            (
                format!("{b}/root/dirlink_out/secret"),
                ErrorKind::PolicyDenied,
            ),
            (format!("{b}/root/loop1"), ErrorKind::PolicyDenied),
            (format!("{b}/root/devnull"), ErrorKind::PolicyDenied),
            (format!("{b}/root/procroot"), ErrorKind::PolicyDenied),
            (format!("{b}/root/hardlink"), ErrorKind::PolicyDenied),
            (format!("{b}/outside/secret"), ErrorKind::PolicyDenied),
            (format!("{b}/rootx/a.txt"), ErrorKind::PolicyDenied),
            (
                format!("/proc/self/root{b}/root/a.txt"),
                ErrorKind::PolicyDenied,
            ),
            ("root/a.txt".to_owned(), ErrorKind::PolicyDenied),
            (String::new(), ErrorKind::InvalidParams),
            (format!("{b}/root/a\0.txt"), ErrorKind::InvalidParams),
            (format!("{b}/root/dangling"), ErrorKind::NotFound),
            (format!("{b}/root/missing"), ErrorKind::NotFound),
            (format!("{b}/root/a.txt/x"), ErrorKind::NotFound),
            (format!("{b}/root/fifo"), ErrorKind::NotARegularFile),
            (format!("{b}/root/dir"), ErrorKind::NotARegularFile),
            (format!("{b}/root"), ErrorKind::NotARegularFile),
        ];
        for (path, kind) in denied {
            match policy.open_read(path) {
                Ok(_) => panic!("{path:?} was allowed"),
                Err(e) => assert_eq!(kind_of(&e), *kind, "{path:?}: {e}"),
            }
        }
        let e = policy
            .open_read(&format!("{b}/outside/secret"))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("outside/secret") && msg.contains(READ_KEY),
            "{msg}"
        );
    }

    #[test]
    fn proc_magic_links_are_refused_even_under_a_proc_root() {
        let t = tree();
        let f = File::open(format!("{}/root/a.txt", t.base)).unwrap();
        let fd = f.as_raw_fd();
        let policy = PathPolicy::new(&[PathBuf::from("/proc/self")]);
        for path in [
            format!("/proc/self/fd/{fd}"),
            "/proc/self/root/etc/hostname".into(),
        ] {
            let e = policy.open_read(&path).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PolicyDenied, "{path}: {e}");
        }
    }

    #[test]
    fn devices_are_never_opened_for_reading() {
        let policy = PathPolicy::new(&[PathBuf::from("/dev")]);
        for path in ["/dev/null", "/dev/zero", "/dev"] {
            let e = policy.open_read(path).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NotARegularFile, "{path}: {e}");
        }
        // Neither through a file root naming a device.
        let policy = PathPolicy::new(&[PathBuf::from("/dev/null")]);
        let e = policy.open_read("/dev/null").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotARegularFile);
    }

    #[test]
    fn file_roots_allow_exactly_that_file() {
        let t = tree();
        let b = &t.base;
        symlink("root/a.txt", format!("{b}/file_root_link")).unwrap();
        let policy = PathPolicy::new(&[
            PathBuf::from(format!("{b}/outside/secret")),
            PathBuf::from(format!("{b}/file_root_link")),
            PathBuf::from(format!("{b}/no_such_root")),
        ]);
        assert_eq!(
            read_all(policy.open_read(&format!("{b}/outside/secret")).unwrap()),
            "SECRET"
        );
        // A file root that is a symlink is followed (admin-trusted).
        assert_eq!(
            read_all(policy.open_read(&format!("{b}/file_root_link")).unwrap()),
            "A"
        );
        for (path, kind) in [
            (format!("{b}/outside/other"), ErrorKind::PolicyDenied),
            (format!("{b}/outside/secret/x"), ErrorKind::PolicyDenied),
            (format!("{b}/no_such_root/x"), ErrorKind::NotFound),
        ] {
            let e = policy.open_read(&path).unwrap_err();
            assert_eq!(e.kind(), kind, "{path}: {e}");
        }
    }

    #[test]
    fn nested_roots_use_the_widest_that_contains_the_target() {
        let t = tree();
        let b = &t.base;
        // sub/up_in -> ../a.txt leaves root/sub but stays in root.
        let inner_only = PathPolicy::new(&[PathBuf::from(format!("{b}/root/sub"))]);
        let e = inner_only
            .open_read(&format!("{b}/root/sub/up_in"))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied);
        let both = PathPolicy::new(&[
            PathBuf::from(format!("{b}/root/sub")),
            PathBuf::from(format!("{b}/root")),
        ]);
        assert_eq!(
            read_all(both.open_read(&format!("{b}/root/sub/up_in")).unwrap()),
            "A"
        );
        assert_eq!(both.roots()[0], format!("{b}/root/sub"));
    }

    #[test]
    fn parent_for_write_resolves_beneath_the_root() {
        let t = tree();
        let b = &t.base;
        let policy = PathPolicy::new(&[PathBuf::from(format!("{b}/root"))]);
        let (dirfd, name) = policy
            .open_parent_for_write(&format!("{b}/root/sub/new.txt"))
            .unwrap();
        assert_eq!(name, "new.txt");
        let st = sys::fstat(dirfd.as_fd()).unwrap();
        let sub = std::fs::metadata(format!("{b}/root/sub")).unwrap();
        assert_eq!(st.st_ino as u64, sub.ino());
        // The final component is returned unresolved, even if it is a symlink out.
        let (_, name) = policy
            .open_parent_for_write(&format!("{b}/root/abs_out"))
            .unwrap();
        assert_eq!(name, "abs_out");
        for (path, kind) in [
            (format!("{b}/root/dirlink_out/x"), ErrorKind::PolicyDenied),
            (format!("{b}/root/../outside/x"), ErrorKind::PolicyDenied),
            (format!("{b}/outside/x"), ErrorKind::PolicyDenied),
            (format!("{b}/root/nodir/x"), ErrorKind::NotFound),
            (format!("{b}/root"), ErrorKind::NotARegularFile),
        ] {
            let e = policy.open_parent_for_write(&path).unwrap_err();
            assert_eq!(e.kind(), kind, "{path}: {e}");
        }
        let e = policy
            .open_parent_for_write(&format!("{b}/outside/x"))
            .unwrap_err();
        assert!(e.to_string().contains(WRITE_KEY));
        // Missing directory root: named as such.
        let missing = PathPolicy::new(&[PathBuf::from(format!("{b}/nope"))]);
        let e = missing
            .open_parent_for_write(&format!("{b}/nope/x"))
            .unwrap_err();
        assert!(matches!(e, PolicyError::RootMissing { .. }), "{e}");
        // Missing file root: its exact path may be created.
        let (_, name) = missing.open_parent_for_write(&format!("{b}/nope")).unwrap();
        assert_eq!(name, "nope");
    }

    fn safe(name: &str) -> String {
        lookup_safe_path(name)
            .unwrap_or_else(|| panic!("{name} not in {SAFE_PATH}"))
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn command_syntax_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let plain = plain.to_str().unwrap();
        let d = dir.path().to_str().unwrap();
        let open = CommandPolicy::new(None);
        for (cmd, kind) in [
            ("", ErrorKind::PolicyDenied),
            ("tr\0ue", ErrorKind::PolicyDenied),
            ("./true", ErrorKind::PolicyDenied),
            ("bin/true", ErrorKind::PolicyDenied),
            ("/usr/bin/../bin/true", ErrorKind::PolicyDenied),
            ("..", ErrorKind::PolicyDenied),
            ("no-such-command-kvm", ErrorKind::NotFound),
            ("/no/such/command", ErrorKind::NotFound),
            (plain, ErrorKind::SpawnFailed),
            (d, ErrorKind::SpawnFailed),
        ] {
            let e = open.resolve(cmd).unwrap_err();
            assert_eq!(e.kind(), kind, "{cmd:?}: {e}");
        }
        let (path, argv0) = open.resolve("true").unwrap();
        assert_eq!(path, PathBuf::from(safe("true")));
        assert_eq!(argv0, "true");
        let (path, argv0) = open.resolve("//bin/./true").unwrap();
        assert_eq!(path, PathBuf::from("/bin/true"));
        assert_eq!(argv0, "//bin/./true");
    }

    #[test]
    fn whitelist_bare_and_absolute_entries() {
        let true_path = safe("true");
        let echo_path = safe("echo");
        let list = vec!["true".to_owned(), echo_path.clone()];
        let policy = CommandPolicy::new(Some(&list));
        assert!(policy.is_restricted());
        assert_eq!(policy.resolve("true").unwrap().0, PathBuf::from(&true_path));
        assert_eq!(
            policy.resolve(&true_path).unwrap().0,
            PathBuf::from(&true_path)
        );
        assert_eq!(policy.resolve("echo").unwrap().0, PathBuf::from(&echo_path));
        assert_eq!(
            policy.resolve(&echo_path).unwrap().0,
            PathBuf::from(&echo_path)
        );
        for cmd in ["false", "sh", "/bin/sh", "no-such-command-kvm"] {
            let e = policy.resolve(cmd).unwrap_err();
            assert!(
                matches!(e, PolicyError::CommandNotAllowed { .. }),
                "{cmd}: {e}"
            );
            assert!(e.to_string().contains(WHITELIST_KEY));
        }
        // A whitelisted bare name that is not installed is "not found".
        let list = vec!["no-such-command-kvm".to_owned()];
        let e = CommandPolicy::new(Some(&list))
            .resolve("no-such-command-kvm")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn symlinked_multicall_binaries_do_not_widen_the_whitelist() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let echo = safe("echo");
        symlink(&echo, format!("{d}/ls")).unwrap();
        symlink(&echo, format!("{d}/cat")).unwrap();
        let list = vec![format!("{d}/ls")];
        let policy = CommandPolicy::new(Some(&list));
        let (path, argv0) = policy.resolve(&format!("{d}/ls")).unwrap();
        assert_eq!(path, PathBuf::from(format!("{d}/ls")));
        assert_eq!(argv0, format!("{d}/ls"));
        let e = policy.resolve(&format!("{d}/cat")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied);
        let e = policy.resolve(&echo).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied);
        let e = policy.resolve("echo").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied);
    }

    #[test]
    fn errors_carry_data() {
        let e = PolicyError::OutsideRoots {
            path: "/x".into(),
            key: READ_KEY,
        };
        let obj = crate::error::to_error_object(&e);
        assert_eq!(obj.kind(), Some(ErrorKind::PolicyDenied));
        let data = obj.data.unwrap();
        assert_eq!(data["path"], "/x");
        assert_eq!(data["config_key"], READ_KEY);
    }
}
