//! Paths: [`PathPolicy`], the safe walk of the allowed roots, and path
//! syntax (see the [module documentation](super) for the rules).

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use agent_common::error::ErrorKind;

use crate::sys;

use super::{PolicyError, READ_KEY, WRITE_KEY};

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

/// Most symbolic links the walk of one root follows (as the kernel's `ELOOP` limit).
const MAX_ROOT_SYMLINKS: u32 = 40;

/// What makes an allowed root unsafe; see the module documentation for the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootFlaw {
    /// A symbolic link in a sticky directory (anyone could have planted it).
    SymlinkInSticky {
        /// The sticky directory.
        dir: String,
        /// The link's owner.
        uid: u32,
    },
    /// An entry owned by neither root nor the agent's user.
    Owner {
        /// "a directory", "a symbolic link", "a file".
        what: &'static str,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
        /// The sticky directory it sits in, if it does.
        sticky_dir: Option<String>,
    },
    /// A directory on the way that group or others may write to, without the sticky bit.
    Writable {
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// More than 40 symbolic links on the way.
    TooManyLinks,
}

impl RootFlaw {
    /// The owner of the offending entry, if the flaw is about one.
    pub(super) fn uid(&self) -> Option<u32> {
        match self {
            RootFlaw::SymlinkInSticky { uid, .. }
            | RootFlaw::Owner { uid, .. }
            | RootFlaw::Writable { uid, .. } => Some(*uid),
            RootFlaw::TooManyLinks => None,
        }
    }

    /// The permission bits of the offending entry, if known.
    pub(super) fn mode(&self) -> Option<u32> {
        match self {
            RootFlaw::Owner { mode, .. } | RootFlaw::Writable { mode, .. } => Some(*mode),
            RootFlaw::SymlinkInSticky { .. } | RootFlaw::TooManyLinks => None,
        }
    }
}

impl std::fmt::Display for RootFlaw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootFlaw::SymlinkInSticky { dir, uid } => {
                write!(f, "is a symbolic link in the sticky directory {dir} owned by uid {uid}")
            }
            RootFlaw::Owner {
                what,
                uid,
                mode,
                sticky_dir,
            } => {
                write!(f, "is {what} owned by uid {uid} (mode {mode:04o})")?;
                if let Some(dir) = sticky_dir {
                    write!(f, " in the sticky directory {dir}")?;
                }
                write!(f, "; only root or the agent's own user is trusted")
            }
            RootFlaw::Writable { uid, mode } => write!(
                f,
                "is a directory writable by group or others without the sticky bit (owner uid {uid}, mode {mode:04o})"
            ),
            RootFlaw::TooManyLinks => write!(
                f,
                "leads through more than {MAX_ROOT_SYMLINKS} symbolic links"
            ),
        }
    }
}

/// What the walk of an allowed root found at its end.
pub(crate) enum Found {
    /// A directory: resolve beneath this descriptor.
    Dir(OwnedFd),
    /// Anything else (normally a regular file): only the exact path is
    /// allowed. What it is.
    Other(libc::stat),
    /// The root does not exist; `last` if only its final component is missing.
    Missing {
        /// Only the final component is missing (the walk's `dir` is its parent).
        last: bool,
    },
}

/// The result of [`walk_root`].
pub(crate) struct Walked {
    /// The directory holding what was found (or the first missing component).
    pub(crate) dir: OwnedFd,
    /// The name of what was found in `dir` (`.` for `/`).
    pub(crate) name: OsString,
    /// When the root's final component, as named, is a symbolic link that
    /// was followed: the directory holding the link, and the link's name.
    pub(crate) named: Option<(OwnedFd, OsString)>,
    /// What is there.
    pub(crate) found: Found,
}

impl Walked {
    /// The directory and name of the root's final component as named (the
    /// link itself when it is a symbolic link).
    fn named_entry(self) -> (OwnedFd, OsString) {
        match self.named {
            Some(named) => named,
            None => (self.dir, self.name),
        }
    }
}

/// "a directory", "a symbolic link", ... for messages.
fn what_is(st: &libc::stat) -> &'static str {
    if sys::is_dir(st) {
        "a directory"
    } else if sys::is_symlink(st) {
        "a symbolic link"
    } else if sys::is_regular(st) {
        "a file"
    } else {
        "a special file"
    }
}

/// `/a/b` from the components walked so far.
fn path_of(walked: &[OsString], next: Option<&OsStr>) -> String {
    let mut out = String::new();
    for part in walked.iter().map(OsString::as_os_str).chain(next) {
        out.push('/');
        out.push_str(&part.to_string_lossy());
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Opens one component beneath `dir` without following it (a symbolic link
/// is opened itself).
fn open_entry(dir: &OwnedFd, name: &OsStr) -> io::Result<OwnedFd> {
    sys::openat2(
        dir.as_fd(),
        name,
        libc::O_PATH | libc::O_NOFOLLOW,
        0,
        sys::NO_SYMLINKS,
    )
}

/// Creates directory `name` in `dir` with exactly `mode`; if something
/// appeared there first, opens that instead (the walk then checks it like
/// any other entry). Returns the descriptor and whether this call created it.
fn create_entry(dir: &OwnedFd, name: &OsStr, mode: u32) -> io::Result<(OwnedFd, bool)> {
    match sys::mkdirat(dir.as_fd(), name, mode) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            return Ok((open_entry(dir, name)?, false))
        }
        Err(e) => return Err(e),
    }
    let fd = sys::openat2(
        dir.as_fd(),
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
        sys::NO_SYMLINKS,
    )?;
    let file = File::from(fd);
    // Exactly `mode`, whatever the umask.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok((OwnedFd::from(file), true))
}

/// Opens allowed root `root` (normalised) by the safe walk described in the
/// module documentation: from `/`, one component at a time, never following
/// a symbolic link the kernel's way, checking owner and mode of each entry.
/// With `create`, missing components are created as directories of that
/// mode (`mkdirat` on the walked parent, then opened without following and
/// checked like the rest). `path` is the request path, for errors.
pub(crate) fn walk_root(
    root: &str,
    path: &str,
    create: Option<u32>,
) -> Result<Walked, PolicyError> {
    let euid = sys::geteuid();
    let trusted = |uid: u32| uid == 0 || uid == euid;
    // ENOSYS: openat2 is missing or filtered (see PolicyError::Unsupported).
    let io_err = |source: io::Error| match source.raw_os_error() {
        Some(libc::ENOSYS) => PolicyError::Unsupported,
        _ => PolicyError::Io {
            path: path.to_owned(),
            source,
        },
    };
    let flawed = |component: String, flaw: RootFlaw| PolicyError::UnsafeRoot {
        path: path.to_owned(),
        root: root.to_owned(),
        component,
        flaw,
    };
    let mut queue: VecDeque<OsString> = root
        .split('/')
        .filter(|p| !p.is_empty())
        .map(OsString::from)
        .collect();
    let mut links = 0;
    let mut named: Option<(OwnedFd, OsString)> = None;
    'restart: loop {
        let mut dir = sys::open_plain("/", libc::O_PATH | libc::O_DIRECTORY).map_err(io_err)?;
        let mut dir_st = sys::fstat(dir.as_fd()).map_err(io_err)?;
        let mode = dir_st.st_mode & 0o7777;
        if !trusted(dir_st.st_uid) {
            return Err(flawed(
                "/".into(),
                RootFlaw::Owner {
                    what: "a directory",
                    uid: dir_st.st_uid,
                    mode,
                    sticky_dir: None,
                },
            ));
        }
        if queue.is_empty() {
            // The root is `/` itself: its own mode does not matter.
            let fd = dir.try_clone().map_err(io_err)?;
            return Ok(Walked {
                dir,
                name: OsString::from("."),
                named,
                found: Found::Dir(fd),
            });
        }
        if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
            return Err(flawed(
                "/".into(),
                RootFlaw::Writable {
                    uid: dir_st.st_uid,
                    mode,
                },
            ));
        }
        let mut walked: Vec<OsString> = Vec::new();
        while let Some(comp) = queue.pop_front() {
            let last = queue.is_empty();
            let sticky = dir_st.st_mode & libc::S_ISVTX != 0;
            let fd = match open_entry(&dir, &comp) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => match create {
                    None => {
                        return Ok(Walked {
                            dir,
                            name: comp,
                            named,
                            found: Found::Missing { last },
                        })
                    }
                    Some(mode) => {
                        let (fd, created) = create_entry(&dir, &comp, mode).map_err(io_err)?;
                        if created {
                            tracing::info!(
                                root,
                                directory = %path_of(&walked, Some(&comp)),
                                "created a directory of an allowed root"
                            );
                        }
                        fd
                    }
                },
                Err(e) => return Err(io_err(e)),
            };
            let st = sys::fstat(fd.as_fd()).map_err(io_err)?;
            let mode = st.st_mode & 0o7777;
            if sys::is_symlink(&st) {
                if sticky {
                    return Err(flawed(
                        path_of(&walked, Some(&comp)),
                        RootFlaw::SymlinkInSticky {
                            dir: path_of(&walked, None),
                            uid: st.st_uid,
                        },
                    ));
                }
                if !trusted(st.st_uid) {
                    return Err(flawed(
                        path_of(&walked, Some(&comp)),
                        RootFlaw::Owner {
                            what: what_is(&st),
                            uid: st.st_uid,
                            mode,
                            sticky_dir: None,
                        },
                    ));
                }
                links += 1;
                if links > MAX_ROOT_SYMLINKS {
                    return Err(flawed(
                        path_of(&walked, Some(&comp)),
                        RootFlaw::TooManyLinks,
                    ));
                }
                let target = sys::readlink(fd.as_fd()).map_err(io_err)?;
                // Every component walked is a real directory, so `..` in the
                // target is resolved lexically, and the walk starts over
                // from `/` on the rewritten path.
                let mut next = if target.as_bytes().starts_with(b"/") {
                    Vec::new()
                } else {
                    std::mem::take(&mut walked)
                };
                for part in target.as_bytes().split(|b| *b == b'/') {
                    match part {
                        b"" | b"." => {}
                        b".." => {
                            next.pop();
                        }
                        p => next.push(OsString::from(OsStr::from_bytes(p))),
                    }
                }
                if last && named.is_none() {
                    named = Some((dir, comp));
                }
                next.extend(queue.drain(..));
                queue = next.into();
                continue 'restart;
            }
            if !trusted(st.st_uid) {
                return Err(flawed(
                    path_of(&walked, Some(&comp)),
                    RootFlaw::Owner {
                        what: what_is(&st),
                        uid: st.st_uid,
                        mode,
                        sticky_dir: sticky.then(|| path_of(&walked, None)),
                    },
                ));
            }
            if last {
                let found = if sys::is_dir(&st) {
                    Found::Dir(fd)
                } else {
                    Found::Other(st)
                };
                return Ok(Walked {
                    dir,
                    name: comp,
                    named,
                    found,
                });
            }
            if !sys::is_dir(&st) {
                return Err(io_err(io::Error::from_raw_os_error(libc::ENOTDIR)));
            }
            if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
                return Err(flawed(
                    path_of(&walked, Some(&comp)),
                    RootFlaw::Writable {
                        uid: st.st_uid,
                        mode,
                    },
                ));
            }
            dir = fd;
            dir_st = st;
            walked.push(comp);
        }
        // Not reached: the loop returns at the root's last component or
        // starts over, and the queue is not empty when it starts.
        return Err(io_err(io::Error::from_raw_os_error(libc::EINVAL)));
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
    /// Mode of missing directory roots created on a write beneath them.
    create_mode: Option<u32>,
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
        PathPolicy {
            roots: out,
            create_mode: None,
        }
    }

    /// The same policy, but a write beneath a missing root first creates it
    /// (and its missing parents) as directories of `mode`, by the safe walk
    /// (the write roots: a `/tmp` cleaner may have removed one).
    pub fn creating_missing_roots(mut self, mode: u32) -> PathPolicy {
        self.create_mode = Some(mode);
        self
    }

    /// The roots, normalised, longest first.
    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// Checks allowed root `root` by the safe walk (creating it, and its
    /// missing parents, as directories of mode `create` if given) and says
    /// what it is. For start-up checks and tests.
    pub fn check_root(root: &str, create: Option<u32>) -> Result<RootKind, PolicyError> {
        let walked = walk_root(root, root, create)?;
        Ok(match walked.found {
            Found::Dir(_) => RootKind::Directory,
            Found::Other(_) => RootKind::File,
            Found::Missing { .. } => RootKind::Missing,
        })
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
                    warn_if_unsafe(&e);
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
        let walked = walk_root(root, path, None)?;
        match walked.found {
            Found::Missing { .. } => Err(PolicyError::RootMissing {
                path: path.to_owned(),
                root: root.to_owned(),
            }),
            Found::Other(st1) => {
                if !rest.is_empty() {
                    return Err(PolicyError::OutsideRoots {
                        path: path.to_owned(),
                        key: READ_KEY,
                    });
                }
                // Never open a device or FIFO (checked on the O_PATH probe).
                let not_regular = || PolicyError::NotRegularFile {
                    path: path.to_owned(),
                };
                if !sys::is_regular(&st1) {
                    return Err(not_regular());
                }
                // Reopened in the directory the walk found it in, without
                // following anything.
                let fd = sys::openat2(
                    walked.dir.as_fd(),
                    &walked.name,
                    READ_FLAGS | libc::O_NOFOLLOW,
                    0,
                    sys::NO_SYMLINKS,
                )
                .map_err(io_err)?;
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
            Found::Dir(rootfd) => {
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
            match self.open_parent_in(root, rest, path) {
                Ok(found) => return Ok(found),
                Err(e) => {
                    warn_if_unsafe(&e);
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
        &self,
        root: &str,
        rest: &str,
        path: &str,
    ) -> Result<(OwnedFd, OsString), PolicyError> {
        // Only a write beneath a directory root recreates it: the exact
        // path of a missing root is written as a file root.
        let create = if rest.is_empty() {
            None
        } else {
            self.create_mode
        };
        let walked = walk_root(root, path, create)?;
        match walked.found {
            // The exact path of a file root (existing or not): replaced by
            // name in the directory the walk found (a symbolic link there,
            // followed to check it, is replaced itself).
            Found::Missing { last: true } | Found::Other(_) if rest.is_empty() => {
                Ok(walked.named_entry())
            }
            Found::Missing { .. } => Err(PolicyError::RootMissing {
                path: path.to_owned(),
                root: root.to_owned(),
            }),
            Found::Other(_) => Err(PolicyError::OutsideRoots {
                path: path.to_owned(),
                key: WRITE_KEY,
            }),
            Found::Dir(_) if rest.is_empty() => Err(PolicyError::NotRegularFile {
                path: path.to_owned(),
            }),
            Found::Dir(rootfd) => {
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

/// Logs a refusal for an unsafe root: abnormal, and the guest's
/// administrator should hear of it, not only the host.
fn warn_if_unsafe(e: &PolicyError) {
    if let PolicyError::UnsafeRoot { root, .. } = e {
        tracing::warn!(root = %root, "{e}; refused");
    }
}

/// What an allowed root is, as found by [`PathPolicy::check_root`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    /// A directory: paths beneath it are allowed.
    Directory,
    /// Anything else, normally a regular file: only its exact path.
    File,
    /// Nothing there yet.
    Missing,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RpcError;
    use agent_common::error::ErrorKind;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{symlink, MetadataExt};
    use std::path::Path;

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
        // A file root that is a trusted symlink in a trusted directory is followed.
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

    /// What a walk ended in, for the table below.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        Dir,
        File,
        Missing,
        /// Refused: the offending component (relative to the base) and the
        /// flaw with its directory made relative too.
        Unsafe(String, RootFlaw),
        Io(i32),
    }

    fn walk_outcome(base: &str, root: &str, create: Option<u32>) -> Outcome {
        let rel = |s: &str| s.strip_prefix(base).unwrap_or(s).to_owned();
        match walk_root(&format!("{base}/{root}"), "/x", create) {
            Ok(w) => match w.found {
                Found::Dir(_) => Outcome::Dir,
                Found::Other(_) => Outcome::File,
                Found::Missing { .. } => Outcome::Missing,
            },
            Err(PolicyError::UnsafeRoot {
                component, flaw, ..
            }) => Outcome::Unsafe(
                rel(&component),
                match flaw {
                    RootFlaw::SymlinkInSticky { dir, uid } => RootFlaw::SymlinkInSticky {
                        dir: rel(&dir),
                        uid,
                    },
                    RootFlaw::Owner {
                        what,
                        uid,
                        mode,
                        sticky_dir,
                    } => RootFlaw::Owner {
                        what,
                        uid,
                        mode,
                        sticky_dir: sticky_dir.map(|d| rel(&d)),
                    },
                    other => other,
                },
            ),
            Err(PolicyError::Io { source, .. }) => Outcome::Io(source.raw_os_error().unwrap()),
            Err(e) => panic!("{root}: unexpected {e}"),
        }
    }

    const USER: u32 = 1000;

    /// base/{ok/root/, ok/file, sticky(1777)/{mine/, user/(1000), userlink->(1000),
    /// rootlink->}, open(0777)/root/, gw(0775)/root/, userdir(1000)/root/,
    /// ok/userroot(1000), links...}
    fn walk_tree() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap().to_owned();
        let p = |s: &str| format!("{base}/{s}");
        let mode = |s: &str, m: u32| {
            std::fs::set_permissions(p(s), std::fs::Permissions::from_mode(m)).unwrap()
        };
        let own = |s: &str| std::os::unix::fs::lchown(p(s), Some(USER), Some(USER)).unwrap();
        for d in [
            "ok/root",
            "sticky/mine",
            "sticky/user",
            "open/root",
            "gw/root",
            "userdir/root",
            "ok/userroot",
        ] {
            std::fs::create_dir_all(p(d)).unwrap();
        }
        for d in ["ok", "ok/root", "sticky/mine", "userdir", "userdir/root"] {
            mode(d, 0o755);
        }
        mode("sticky", 0o1777);
        mode("open", 0o777);
        mode("gw", 0o775);
        std::fs::write(p("ok/file"), "F").unwrap();
        std::fs::write(p("sticky/userfile"), "U").unwrap();
        own("sticky/user");
        own("sticky/userfile");
        own("userdir");
        own("ok/userroot");
        symlink(p("ok/root"), p("sticky/userlink")).unwrap();
        own("sticky/userlink");
        symlink(p("ok/root"), p("sticky/rootlink")).unwrap();
        symlink(p("ok/root"), p("abs_link")).unwrap();
        let name = dir.path().file_name().unwrap().to_str().unwrap().to_owned();
        symlink(format!("../{name}/ok/root"), p("rel_link")).unwrap();
        symlink("ok", p("ok_link")).unwrap();
        symlink("sticky/user", p("to_user")).unwrap();
        symlink("ok/root", p("user_owned_link")).unwrap();
        own("user_owned_link");
        symlink("loop2", p("loop1")).unwrap();
        symlink("loop1", p("loop2")).unwrap();
        symlink("ok/file", p("file_link")).unwrap();
        symlink("ok/none", p("dangling")).unwrap();
        Tree { _dir: dir, base }
    }

    #[test]
    fn the_root_walk_trusts_only_root_owned_unwritable_ways() {
        let t = walk_tree();
        let sticky = |what, uid, mode| RootFlaw::Owner {
            what,
            uid,
            mode,
            sticky_dir: Some("/sticky".into()),
        };
        let owner = |what, uid, mode| RootFlaw::Owner {
            what,
            uid,
            mode,
            sticky_dir: None,
        };
        let cases: Vec<(&str, Outcome)> = vec![
            ("ok/root", Outcome::Dir),
            ("ok/file", Outcome::File),
            ("ok/none", Outcome::Missing),
            ("none/deeper", Outcome::Missing),
            ("ok/file/x", Outcome::Io(libc::ENOTDIR)),
            ("sticky/mine", Outcome::Dir),
            ("sticky/mine/none", Outcome::Missing),
            ("sticky/none", Outcome::Missing),
            (
                "sticky/user",
                Outcome::Unsafe("/sticky/user".into(), sticky("a directory", USER, 0o755)),
            ),
            (
                "sticky/user/x",
                Outcome::Unsafe("/sticky/user".into(), sticky("a directory", USER, 0o755)),
            ),
            (
                "sticky/userfile",
                Outcome::Unsafe("/sticky/userfile".into(), sticky("a file", USER, 0o644)),
            ),
            (
                "sticky/userlink",
                Outcome::Unsafe(
                    "/sticky/userlink".into(),
                    RootFlaw::SymlinkInSticky {
                        dir: "/sticky".into(),
                        uid: USER,
                    },
                ),
            ),
            // Even a root-owned link in a sticky directory is not followed.
            (
                "sticky/rootlink",
                Outcome::Unsafe(
                    "/sticky/rootlink".into(),
                    RootFlaw::SymlinkInSticky {
                        dir: "/sticky".into(),
                        uid: 0,
                    },
                ),
            ),
            (
                "open/root",
                Outcome::Unsafe(
                    "/open".into(),
                    RootFlaw::Writable {
                        uid: 0,
                        mode: 0o777,
                    },
                ),
            ),
            (
                "gw/root",
                Outcome::Unsafe(
                    "/gw".into(),
                    RootFlaw::Writable {
                        uid: 0,
                        mode: 0o775,
                    },
                ),
            ),
            // A writable directory is fine as the root itself: its contents
            // are the allowed area, resolved beneath it.
            ("open", Outcome::Dir),
            ("sticky", Outcome::Dir),
            (
                "userdir/root",
                Outcome::Unsafe("/userdir".into(), owner("a directory", USER, 0o755)),
            ),
            (
                "ok/userroot",
                Outcome::Unsafe("/ok/userroot".into(), owner("a directory", USER, 0o755)),
            ),
            // Trusted links in trusted directories are followed, their
            // targets walked by the same rules.
            ("abs_link", Outcome::Dir),
            ("rel_link", Outcome::Dir),
            ("ok_link/root", Outcome::Dir),
            ("file_link", Outcome::File),
            ("dangling", Outcome::Missing),
            (
                "to_user",
                Outcome::Unsafe("/sticky/user".into(), sticky("a directory", USER, 0o755)),
            ),
            (
                "user_owned_link",
                Outcome::Unsafe(
                    "/user_owned_link".into(),
                    owner("a symbolic link", USER, 0o777),
                ),
            ),
            (
                "loop1",
                // The 41st link met is loop1 again.
                Outcome::Unsafe("/loop1".into(), RootFlaw::TooManyLinks),
            ),
        ];
        for (root, want) in cases {
            assert_eq!(walk_outcome(&t.base, root, None), want, "{root}");
        }
    }

    #[test]
    fn unsafe_roots_are_named_in_the_error_and_refused_as_policy_denied() {
        let t = walk_tree();
        let b = &t.base;
        let policy = PathPolicy::new(&[
            PathBuf::from(format!("{b}/sticky/userlink")),
            PathBuf::from(format!("{b}/ok/root")),
        ]);
        std::fs::write(format!("{b}/ok/root/a"), "A").unwrap();
        let e = policy
            .open_parent_for_write(&format!("{b}/sticky/userlink/x"))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied);
        assert_eq!(
            e.to_string(),
            format!(
                "allowed root {b}/sticky/userlink is unsafe: {b}/sticky/userlink is a symbolic \
                 link in the sticky directory {b}/sticky owned by uid {USER}"
            )
        );
        let data = crate::error::to_error_object(&e).data.unwrap();
        assert_eq!(data["component"], format!("{b}/sticky/userlink"));
        assert_eq!(data["root"], format!("{b}/sticky/userlink"));
        assert_eq!(data["owner"], USER);
        let e = policy
            .open_read(&format!("{b}/sticky/userlink/a"))
            .unwrap_err();
        assert!(matches!(e, PolicyError::UnsafeRoot { .. }), "{e}");
        // The other root keeps serving.
        assert_eq!(
            read_all(policy.open_read(&format!("{b}/ok/root/a")).unwrap()),
            "A"
        );
    }

    #[test]
    fn missing_roots_are_created_by_the_walk_and_never_through_a_link() {
        let t = walk_tree();
        let b = &t.base;
        let policy = PathPolicy::new(&[
            PathBuf::from(format!("{b}/sticky/new/deeper")),
            PathBuf::from(format!("{b}/sticky/userlink/made")),
            PathBuf::from(format!("{b}/sticky/user/made")),
        ])
        .creating_missing_roots(0o755);
        let (_, name) = policy
            .open_parent_for_write(&format!("{b}/sticky/new/deeper/f"))
            .unwrap();
        assert_eq!(name, "f");
        for d in ["sticky/new", "sticky/new/deeper"] {
            let m = std::fs::symlink_metadata(format!("{b}/{d}")).unwrap();
            assert!(m.is_dir(), "{d}");
            assert_eq!(m.permissions().mode() & 0o7777, 0o755, "{d}");
            assert_eq!(m.uid(), sys::geteuid(), "{d}");
        }
        for root in ["sticky/userlink/made", "sticky/user/made"] {
            let e = policy
                .open_parent_for_write(&format!("{b}/{root}/f"))
                .unwrap_err();
            assert!(matches!(e, PolicyError::UnsafeRoot { .. }), "{root}: {e}");
        }
        // Nothing was created through the link or in the user's directory.
        assert!(!Path::new(&format!("{b}/ok/root/made")).exists());
        assert!(!Path::new(&format!("{b}/sticky/user/made")).exists());
        // Without creation, a missing root is missing.
        let plain = PathPolicy::new(&[PathBuf::from(format!("{b}/sticky/other"))]);
        let e = plain
            .open_parent_for_write(&format!("{b}/sticky/other/f"))
            .unwrap_err();
        assert!(matches!(e, PolicyError::RootMissing { .. }), "{e}");
        assert_eq!(
            PathPolicy::check_root(&format!("{b}/sticky/other"), None).unwrap(),
            RootKind::Missing
        );
    }

    #[test]
    fn a_file_root_that_is_a_trusted_link_is_replaced_by_name() {
        let t = walk_tree();
        let b = &t.base;
        let policy = PathPolicy::new(&[PathBuf::from(format!("{b}/file_link"))]);
        assert_eq!(
            read_all(policy.open_read(&format!("{b}/file_link")).unwrap()),
            "F"
        );
        let (dir, name) = policy
            .open_parent_for_write(&format!("{b}/file_link"))
            .unwrap();
        assert_eq!(name, "file_link");
        let st = sys::fstat(dir.as_fd()).unwrap();
        assert_eq!(st.st_ino as u64, std::fs::metadata(b).unwrap().ino());
    }
}
