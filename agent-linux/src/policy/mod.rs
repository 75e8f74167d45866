//! The agent's policy: which paths may be read or written and which commands
//! may run.
//!
//! # Paths
//!
//! The host controls the path string and a guest user may control files
//! inside the allowed roots, so a path is never resolved by the ordinary
//! kernel lookup. Instead [`PathPolicy`] finds the allowed roots the path is
//! lexically under (longest first), opens the root by the safe walk below,
//! and resolves the rest of the path with `openat2(2)` and
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` from the root's descriptor. The
//! kernel then refuses `..` that climbs out, absolute symlinks, relative
//! symlinks that leave the root and `/proc` magic links, in the same system
//! call that opens the file, so there is no window between a check and its
//! use. `openat2` needs Linux 5.6 or later; on older kernels every path
//! request fails with `not_supported`.
//!
//! # Safe roots
//!
//! `RESOLVE_BENEATH` protects only what lies below the root. The root
//! itself, and every directory above it, could be replaced by whoever may
//! write to the directory holding it: with the default write root
//! `/tmp/kvmmanager`, a guest user who removes it (or finds it removed by a
//! `/tmp` cleaner) and plants a symlink or a directory of their own there
//! would make the agent write, as root, wherever they like. So every root
//! (read and write, directory and file) is opened on **every request** by a
//! walk from `/`, one component at a time, each opened beneath the previous
//! one with `openat2(O_PATH | O_NOFOLLOW, RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` and checked with `fstat`:
//!
//! - every entry on the way, the root included, must be owned by root or by
//!   the agent's effective user ("trusted");
//! - every directory above the root must not be writable by group or others,
//!   unless it is sticky (like `/tmp`, mode 1777): there only an entry's
//!   owner may remove or rename it, and by the rule above that is root;
//! - the root's own mode is not checked: its contents are the allowed area,
//!   which is treated as attacker-shaped anyway (resolved beneath it);
//! - a symbolic link on the way (an administrator-named file root such as
//!   `/etc/os-release -> ../usr/lib/os-release`, or `/var/run -> /run`) is
//!   followed only if it is trusted and sits in a directory that is trusted
//!   and not sticky, where nobody but root could have put it. Its target is
//!   read (`readlinkat`) and the walk starts over from `/` on the rewritten
//!   path, so the target is walked by the same rules; `..` in a target is
//!   resolved lexically, which is exact because every component walked is a
//!   real directory. A link in a sticky directory is refused whoever owns
//!   it. At most 40 links are followed.
//!
//! A root that breaks a rule is refused with [`PolicyError::UnsafeRoot`]
//! (`policy_denied`), naming the entry, its owner and mode; requests under
//! other roots are served as usual. The agent never follows such a root,
//! never "fixes" it and never removes what was planted there: it refuses and
//! reports (a warning at start-up, the error on every request). A root
//! under a user's home directory is therefore refused (the user could swap
//! it); choose roots on root-owned paths.
//!
//! Because the walk runs on every request, a root created, removed or
//! replaced later is judged as it is at that moment; no descriptor is kept.
//! A walk costs two system calls per component (measured: about 9 us for a
//! five-component root in a debug build, against 1 us for the single `open`
//! it replaced). A write beneath a missing write root (removed by a `/tmp`
//! cleaner, say) recreates it, and its missing parents, mode 0755, through
//! the walk ([`PathPolicy::creating_missing_roots`]): `mkdirat` on the
//! descriptor of the walked parent, then the new directory is opened without
//! following and checked like any other entry, so an entry planted in the
//! meantime is judged, never followed.
//!
//! A root that is not a directory (normally a regular file, for example
//! `/etc/os-release`) allows exactly that path. It is read by reopening its
//! name, without following anything, in the directory the walk ended in; a
//! write replaces the name the administrator gave (a link there is replaced
//! itself, as beneath a directory root).
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
//!
//! # Where
//!
//! [`PolicyError`] and the config keys named in refusals are here; the
//! path rules ([`PathPolicy`], the safe walk of the roots) are in `path.rs`,
//! the command rules ([`CommandPolicy`], [`SAFE_PATH`]) in `command.rs`,
//! and the system calls both use in `crate::sys`.

use std::io;

use agent_common::error::ErrorKind;
use serde_json::Value;

use crate::error::{io_error_kind, RpcError};

mod command;
mod path;

pub use command::*;
pub use path::*;

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
    /// The allowed root (or a directory on the way to it) could be replaced
    /// by a user other than root or the agent's; see the module documentation.
    #[error("allowed root {root} is unsafe: {component} {flaw}")]
    UnsafeRoot {
        /// The path as requested.
        path: String,
        /// The allowed root.
        root: String,
        /// The offending entry on the way to (or at) the root.
        component: String,
        /// What is wrong with it.
        flaw: RootFlaw,
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
    /// `openat2` fails with `ENOSYS`: the kernel lacks it (Linux < 5.6), or
    /// a seccomp filter blocks it (systemd's `RestrictSUIDSGID=yes` does,
    /// since it cannot inspect `openat2`'s mode).
    #[error(
        "openat2 is unavailable, so no file can be opened safely: the kernel lacks it \
         (Linux 5.6 or later is needed) or a seccomp filter blocks it (systemd's \
         RestrictSUIDSGID=yes does: remove it from the unit)"
    )]
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
            | PolicyError::UnsafeRoot { .. }
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
            PolicyError::UnsafeRoot {
                path,
                root,
                component,
                flaw,
            } => {
                let mut data = vec![
                    ("path", path.as_str().into()),
                    ("root", root.as_str().into()),
                    ("component", component.as_str().into()),
                ];
                if let Some(uid) = flaw.uid() {
                    data.push(("owner", uid.into()));
                }
                if let Some(mode) = flaw.mode() {
                    data.push(("mode", mode.into()));
                }
                data
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

#[cfg(test)]
mod tests {
    use super::*;

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
