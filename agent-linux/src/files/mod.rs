//! `file_read` and `file_write`.
//!
//! Every path goes through [`PathPolicy`] first (see [`crate::policy`] for
//! how paths are resolved); all blocking I/O runs in `spawn_blocking`.
//!
//! # Writes
//!
//! - `truncate` and `create_new` never write into an existing file: the data
//!   goes to a staging file `.<name>.kvmtmp-<random>` created (`O_EXCL`) in
//!   the target's directory, is fsynced, then renamed over the name
//!   (`create_new`: `renameat2(RENAME_NOREPLACE)`, falling back to
//!   `link`+`unlink` where the filesystem lacks it). Readers see the old or
//!   the new file, never a mix; a failure (disk full included) removes the
//!   staging file and leaves the target untouched. Replacing an existing
//!   regular file keeps its permission bits (minus setuid, setgid and
//!   sticky) and, when the agent runs as root, its owner and group; the
//!   request's `permissions` apply to new files only. A final component that
//!   is a symbolic link is replaced itself (never written through), unless it
//!   resolves, inside the root, to something other than a regular file.
//! - `append` opens the file beneath the root with `O_APPEND|O_NOFOLLOW`
//!   (creating it with `permissions` if missing) and is not atomic: a
//!   concurrent reader may see part of the data. On a write error the file is
//!   truncated back to its old length (or removed if this call created it).
//!   Files with more than one hard link are refused.
//! - Chunked uploads stage into the same kind of staging file; the call with
//!   `more: false` commits (fsync + rename). The commit waits for chunk
//!   writes already in progress, so the host must send it only after every
//!   other chunk of the upload has been acknowledged; a chunk that arrives
//!   after the commit gets `not_found`. Any failed chunk aborts the whole
//!   upload. Uploads belong to the session (host connection) that started
//!   them; [`FileService::end_session`] and [`FileService::abort_all`] delete
//!   their staging files. At most [`MAX_UPLOADS`] uploads are open at once.
//!   An upload that gets no chunk for [`UPLOAD_IDLE_TIMEOUT`] (5 minutes) is
//!   aborted and its staging file deleted, so idle uploads cannot hold every
//!   slot. Each open upload has one tokio task sleeping until its deadline
//!   (moved by each chunk), ended as soon as the upload goes; a new upload
//!   also expires idle ones before counting slots. No timer runs while no
//!   upload is open: the agent has no idle wake-ups.
//! - A staging file left by a killed agent keeps the name
//!   `.<name>.kvmtmp-<32 hex digits>`. [`remove_stale_staging`] removes such
//!   files at start-up, before anything is served: regular files owned by
//!   the agent's user, beneath every write root (and beside file roots, with
//!   the root's own name), walked with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)` so no link is followed and no
//!   mount point crossed, at most [`SWEEP_MAX_ENTRIES`] entries in all. Each
//!   removal is logged. A user could only make it remove a file of that
//!   pattern owned by the agent's user, which nothing but the agent creates.
//! - `file_write` never creates directories beneath a root. The write roots
//!   themselves are created (mode 0755, with missing parents) when missing:
//!   at start-up by [`prepare_roots`], and again when a write finds one
//!   removed (a `/tmp` cleaner), always through the safe walk of [`crate::policy`]
//!   (`mkdirat` on the walked parent, never through an existing link). A
//!   root that exists but is unsafe is refused, never followed or "fixed".
//!
//! # Where
//!
//! This file holds [`FileService`], [`FileError`], the [`CommitGate`] and
//! the start-up check of the roots ([`prepare_roots`]); `read.rs` serves
//! `file_read`, `write.rs` the `file_write` request and the atomic
//! whole-file write (the staging file, `Staged`), `upload.rs` the
//! chunked uploads and their expiry, `append.rs` the appends and
//! `staging.rs` the sweep of stale staging files.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use agent_common::encoding::{DecodeError, Encoding};
use agent_common::error::ErrorKind;
use agent_common::methods::{
    FileReadParams, FileReadResult, FileWriteParams, FileWriteResult, WriteMode,
};
use agent_common::MAX_READ_CHUNK;
use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::buffers::BufferPool;
use crate::config::Config;
use crate::error::{io_error_kind, RpcError};
use crate::payload::PipePool;
use crate::policy::{check_regular_single, normalize_path, Found, PathPolicy, PolicyError};
use crate::sys;

mod append;
mod read;
mod staging;
mod stream;
mod upload;
mod write;

use append::append_blocking;
pub use staging::{remove_stale_staging, staging_files, StagingSweep, SWEEP_MAX_ENTRIES};
use upload::Uploads;
use write::{inspect_target, Staged};

/// Most chunked uploads open at once (all sessions together).
pub const MAX_UPLOADS: usize = 16;

/// An upload that receives no chunk for this long is aborted and its
/// staging file deleted, so that idle uploads cannot hold the
/// [`MAX_UPLOADS`] slots forever. Long enough for a host that pauses
/// between chunks (its own retries included), short enough that a stuck
/// host frees the slots within minutes.
pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Permission bits `file_write` accepts: no group/other write, no
/// setuid/setgid/sticky.
pub const ALLOWED_PERMISSIONS: u32 = 0o755;

/// Permission bits of a new file when the request gives none.
pub const DEFAULT_PERMISSIONS: u32 = 0o644;

/// Mode of the write roots [`prepare_roots`] creates.
pub const WRITE_ROOT_MODE: u32 = 0o755;

/// Why a file request failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The request gave up (its time limit, or the agent stopping) before
    /// the write reached its point of no return: nothing was written.
    #[error("the request was given up before {path} was written; nothing was written")]
    Cancelled {
        /// The path as requested.
        path: String,
    },
    /// The path policy refused or could not resolve the path.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// `content` is not valid in its declared encoding.
    #[error("cannot decode content")]
    Decode(#[source] DecodeError),
    /// The bytes read are not UTF-8.
    #[error("{path} is not valid UTF-8 at byte {at}; use encoding base64")]
    NotUtf8 {
        /// The path as requested.
        path: String,
        /// File offset of the first invalid byte.
        at: u64,
    },
    /// The file (or the file it would become) exceeds `max_file_size_mb`.
    #[error("{path} would be {size} bytes, more than the limit of {limit} bytes (security.max_file_size_mb)")]
    TooLarge {
        /// The path as requested.
        path: String,
        /// The size in bytes.
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// `permissions` has bits outside 0o755.
    #[error("permissions {mode:#o} refused: only bits within 0o755 are allowed (no group/other write, setuid, setgid or sticky)")]
    BadPermissions {
        /// The requested mode.
        mode: u32,
    },
    /// The params contradict each other.
    #[error("invalid file_write request: {reason}")]
    InvalidRequest {
        /// Why.
        reason: String,
    },
    /// The `file_read_stream` params are invalid.
    #[error("invalid file_read_stream request: {reason}")]
    InvalidStream {
        /// Why.
        reason: String,
    },
    /// The stream could not be opened.
    #[error(transparent)]
    Stream(#[from] crate::streams::StreamError),
    /// `create_new` found the name taken.
    #[error("{path} already exists")]
    AlreadyExists {
        /// The path as requested.
        path: String,
    },
    /// The target is a directory, FIFO, device or socket.
    #[error("{path} is not a regular file")]
    NotRegularFile {
        /// The path as requested.
        path: String,
    },
    /// `append` does not follow a symbolic link at the final component.
    #[error("{path} is a symbolic link; append does not follow symbolic links")]
    Symlink {
        /// The path as requested.
        path: String,
    },
    /// No open upload of that id in this session.
    #[error("unknown upload {id:?} (never started, already committed or aborted, or started by another session)")]
    UnknownUpload {
        /// The id.
        id: String,
    },
    /// Too many uploads are open.
    #[error("too many uploads in progress (at most {limit}); retry later")]
    TooManyUploads {
        /// The limit.
        limit: usize,
    },
    /// An operating-system error.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path as requested.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A blocking task failed (panicked or was cancelled).
    #[error("internal error: {reason}")]
    Internal {
        /// What happened.
        reason: String,
    },
}

impl RpcError for FileError {
    fn kind(&self) -> ErrorKind {
        match self {
            FileError::Policy(e) => e.kind(),
            FileError::Cancelled { .. } => ErrorKind::Timeout,
            FileError::Decode(_) | FileError::NotUtf8 { .. } => ErrorKind::InvalidEncoding,
            FileError::TooLarge { .. } => ErrorKind::TooLarge,
            FileError::BadPermissions { .. }
            | FileError::InvalidRequest { .. }
            | FileError::InvalidStream { .. } => ErrorKind::InvalidParams,
            FileError::Stream(e) => e.kind(),
            FileError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            FileError::NotRegularFile { .. } => ErrorKind::NotARegularFile,
            FileError::Symlink { .. } => ErrorKind::PolicyDenied,
            FileError::UnknownUpload { .. } => ErrorKind::NotFound,
            FileError::TooManyUploads { .. } => ErrorKind::Busy,
            FileError::Io { source, .. } => io_error_kind(source),
            FileError::Internal { .. } => ErrorKind::InternalError,
        }
    }

    fn data(&self) -> Vec<(&'static str, Value)> {
        match self {
            FileError::Policy(e) => e.data(),
            FileError::NotUtf8 { path, at } => {
                vec![("path", path.as_str().into()), ("offset", (*at).into())]
            }
            FileError::TooLarge { path, size, limit } => vec![
                ("path", path.as_str().into()),
                ("size", (*size).into()),
                ("limit", (*limit).into()),
            ],
            FileError::Cancelled { path } => vec![
                ("path", path.as_str().into()),
                ("outcome", "not_written".into()),
            ],
            FileError::AlreadyExists { path }
            | FileError::NotRegularFile { path }
            | FileError::Symlink { path }
            | FileError::Io { path, .. } => vec![("path", path.as_str().into())],
            FileError::UnknownUpload { id } => vec![("upload_id", id.as_str().into())],
            FileError::TooManyUploads { limit } => vec![("limit", (*limit).into())],
            FileError::BadPermissions { mode } => vec![("permissions", (*mode).into())],
            FileError::Stream(e) => e.data(),
            FileError::Decode(_)
            | FileError::InvalidRequest { .. }
            | FileError::InvalidStream { .. }
            | FileError::Internal { .. } => Vec::new(),
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a str) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

async fn blocking<T, F>(f: F) -> Result<T, FileError>
where
    F: FnOnce() -> Result<T, FileError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FileError::Internal {
            reason: e.to_string(),
        })?
}

/// Decides which comes first for one `file_write`: the write reaching its
/// point of no return (the rename into place, the first appended byte, a
/// chunk written into its upload) or its request giving up (time limit,
/// agent stopping). Work handed to a worker thread cannot be interrupted,
/// so without it a write answered `timeout` could still take place
/// afterwards. With it, exactly one of two things holds: the request gave
/// up first and the write never happens ([`CommitGate::cancel`] returned
/// true), or the write had begun and the request waits for its outcome.
#[derive(Debug, Clone, Default)]
pub struct CommitGate(Arc<AtomicU8>);

impl CommitGate {
    const OPEN: u8 = 0;
    const BEGUN: u8 = 1;
    const CANCELLED: u8 = 2;

    /// Called by the write just before its point of no return: `Err` when
    /// the request already gave up.
    fn begin(&self, path: &str) -> Result<(), FileError> {
        match self
            .0
            .compare_exchange(Self::OPEN, Self::BEGUN, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) | Err(Self::BEGUN) => Ok(()),
            Err(_) => Err(FileError::Cancelled {
                path: path.to_owned(),
            }),
        }
    }

    /// Called by the request when it gives up: true when the write will
    /// never take place, false when it has begun (its outcome is then the
    /// write's own).
    pub fn cancel(&self) -> bool {
        match self.0.compare_exchange(
            Self::OPEN,
            Self::CANCELLED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) | Err(Self::CANCELLED) => true,
            Err(_) => false,
        }
    }
}

/// Serves `file_read` and `file_write`.
pub struct FileService {
    config: Arc<Config>,
    read_policy: Arc<PathPolicy>,
    write_policy: Arc<PathPolicy>,
    uploads: Uploads,
    /// [`UPLOAD_IDLE_TIMEOUT`], shorter in tests.
    idle_timeout: Duration,
    /// Buffers for file data either way: chunks read as attachments, and
    /// attachments received (`crate::server`).
    transfer_buffers: Arc<BufferPool>,
    /// Pipes for chunks spliced from a file (`read::splice_chunk`).
    transfer_pipes: Arc<PipePool>,
}

impl FileService {
    /// A service enforcing `config.security`.
    pub fn new(config: Arc<Config>) -> FileService {
        FileService::with_idle_timeout(config, UPLOAD_IDLE_TIMEOUT)
    }

    /// A service whose uploads expire after `idle_timeout` without a chunk
    /// (instead of [`UPLOAD_IDLE_TIMEOUT`]).
    pub fn with_idle_timeout(config: Arc<Config>, idle_timeout: Duration) -> FileService {
        let read_policy = Arc::new(PathPolicy::new(&config.security.allowed_read_paths));
        let write_policy = Arc::new(
            PathPolicy::new(&config.security.allowed_write_paths)
                .creating_missing_roots(WRITE_ROOT_MODE),
        );
        FileService {
            config,
            read_policy,
            write_policy,
            uploads: Arc::new(Mutex::new(HashMap::new())),
            idle_timeout,
            transfer_buffers: BufferPool::new(MAX_READ_CHUNK as usize),
            transfer_pipes: PipePool::new(MAX_READ_CHUNK as usize),
        }
    }

    /// The pool of 1 MiB buffers for file data in either direction: chunks
    /// read as attachments, and attachments received.
    pub fn transfer_buffers(&self) -> Arc<BufferPool> {
        Arc::clone(&self.transfer_buffers)
    }

    /// Number of uploads open (all sessions).
    pub fn open_uploads(&self) -> usize {
        lock(&self.uploads).len()
    }
}

impl Drop for FileService {
    fn drop(&mut self) {
        self.abort_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map stays consistent even if a holder panicked: every update is one call.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks every allowed root by the safe walk at start-up (see [`crate::policy`])
/// and creates the missing `allowed_write_paths` directories (mode 0755,
/// with missing parents) through it: each by `mkdirat` on the directory the
/// walk holds, never through an existing link. Returns one warning per root
/// that could not be created or is unsafe; an unsafe root is left as it is
/// (never followed, "fixed" or removed) and refused, with the same reason,
/// by every request under it until its owner fixes it. Every missing write
/// root is created as a directory: to allow writing a single file, list a
/// file that exists.
pub fn prepare_roots(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    let roots = config
        .security
        .allowed_write_paths
        .iter()
        .map(|r| (r, Some(WRITE_ROOT_MODE)))
        .chain(config.security.allowed_read_paths.iter().map(|r| (r, None)));
    for (root, create) in roots {
        let Some(Ok(norm)) = root.to_str().map(normalize_path) else {
            continue;
        };
        match PathPolicy::check_root(&norm, create) {
            Ok(_) => {}
            Err(e @ PolicyError::UnsafeRoot { .. }) => warnings.push(format!(
                "{e}; requests under it are refused until it is fixed"
            )),
            Err(e) if create.is_some() => warnings.push(format!(
                "cannot create allowed write path {}: {}",
                root.display(),
                crate::error::chain(&e)
            )),
            Err(e) => warnings.push(format!(
                "cannot check allowed read path {}: {}",
                root.display(),
                crate::error::chain(&e)
            )),
        }
    }
    warnings
}

#[cfg(test)]
impl FileService {
    /// `read` for content carried in the result.
    async fn read_inline(&self, params: FileReadParams) -> Result<FileReadResult, FileError> {
        self.read(params).await.map(|(r, _)| r)
    }

    /// `write` without an attachment.
    async fn write_inline(
        &self,
        session: u64,
        params: FileWriteParams,
    ) -> Result<FileWriteResult, FileError> {
        self.write(session, params, None, &CommitGate::default())
            .await
    }
}

/// Test helpers shared by the tests of every part of the file service.
#[cfg(test)]
mod test_env {
    use super::*;
    use std::path::PathBuf;

    pub(crate) struct Env {
        pub(crate) _dir: tempfile::TempDir,
        pub(crate) root: String,
        pub(crate) outside: String,
        pub(crate) svc: FileService,
    }

    pub(crate) fn env_with(max_file_size: u64) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap().to_owned();
        let root = format!("{base}/root");
        let outside = format!("{base}/outside");
        std::fs::create_dir_all(format!("{root}/sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let mut config = Config::default();
        config.security.allowed_read_paths = vec![PathBuf::from(&root)];
        config.security.allowed_write_paths = vec![PathBuf::from(&root)];
        config.security.max_file_size = max_file_size;
        Env {
            _dir: dir,
            root,
            outside,
            svc: FileService::new(Arc::new(config)),
        }
    }

    pub(crate) fn env() -> Env {
        env_with(1 << 20)
    }

    /// An env whose uploads expire after `timeout` idle.
    pub(crate) fn env_expiring(timeout: Duration) -> Env {
        let e = env();
        Env {
            svc: FileService::with_idle_timeout(Arc::clone(&e.svc.config), timeout),
            ..e
        }
    }

    pub(crate) fn wp(path: &str, content: &str) -> FileWriteParams {
        FileWriteParams {
            path: path.to_owned(),
            content: content.to_owned(),
            ..Default::default()
        }
    }

    pub(crate) fn rp(path: &str) -> FileReadParams {
        FileReadParams {
            path: path.to_owned(),
            ..Default::default()
        }
    }

    pub(crate) fn mode_of(path: &str) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    pub(crate) fn no_staging(dir: &str) {
        assert_eq!(
            staging_files(Path::new(dir)).unwrap(),
            Vec::<OsString>::new()
        );
    }

    pub(crate) fn chunk(
        path: &str,
        id: &str,
        offset: u64,
        data: &[u8],
        more: bool,
    ) -> FileWriteParams {
        FileWriteParams {
            path: path.to_owned(),
            content: Encoding::Base64.encode_lossy(data),
            encoding: Encoding::Base64,
            offset: Some(offset),
            upload_id: Some(id.to_owned()),
            more,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::test_env::*;

    #[test]
    fn futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let svc = FileService::new(Arc::new(Config::default()));
        assert_send(&svc.read(rp("/tmp/x")));
        assert_send(&svc.write(1, wp("/tmp/x", ""), None, &CommitGate::default()));
        let config = Config::default();
        assert_send(&crate::exec::exec_command(&config, Default::default()));
    }

    #[test]
    fn prepare_roots_creates_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a/b");
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let blocked = file.join("sub");
        let mut config = Config::default();
        config.security.allowed_write_paths = vec![a.clone(), blocked];
        let warnings = prepare_roots(&config);
        assert!(a.is_dir());
        assert_eq!(mode_of(a.to_str().unwrap()), WRITE_ROOT_MODE);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("file/sub"), "{warnings:?}");
        assert!(prepare_roots(&Config {
            security: crate::config::SecurityConfig {
                allowed_write_paths: vec![a],
                ..Default::default()
            },
            ..Default::default()
        })
        .is_empty());
    }

    #[tokio::test]
    async fn a_write_given_up_first_never_takes_place() {
        let e = env();
        let p = format!("{}/gated", e.root);
        // Whole writes, appends and the first chunk of an upload.
        for params in [
            wp(&p, "x"),
            FileWriteParams {
                mode: WriteMode::Append,
                ..wp(&p, "x")
            },
            FileWriteParams {
                more: true,
                ..wp(&p, "x")
            },
        ] {
            let gate = CommitGate::default();
            assert!(gate.cancel());
            let err = e.svc.write(1, params, None, &gate).await.unwrap_err();
            assert!(matches!(err, FileError::Cancelled { .. }), "{err:?}");
            assert!(!Path::new(&p).exists());
            assert_eq!(e.svc.open_uploads(), 0);
        }
        assert!(staging_files(Path::new(&e.root)).unwrap().is_empty());
        // A chunk given up aborts its upload; so does a commit.
        for more in [true, false] {
            let r = e
                .svc
                .write_inline(
                    1,
                    FileWriteParams {
                        more: true,
                        ..wp(&p, "ab")
                    },
                )
                .await
                .unwrap();
            let id = r.upload_id.unwrap();
            let gate = CommitGate::default();
            assert!(gate.cancel());
            let err = e
                .svc
                .write(1, chunk(&p, &id, 2, b"cd", more), None, &gate)
                .await
                .unwrap_err();
            assert!(matches!(err, FileError::Cancelled { .. }), "{err:?}");
            assert!(!Path::new(&p).exists());
            assert!(staging_files(Path::new(&e.root)).unwrap().is_empty());
            let err = e
                .svc
                .write_inline(1, chunk(&p, &id, 2, b"cd", false))
                .await
                .unwrap_err();
            assert!(matches!(err, FileError::UnknownUpload { .. }), "{err:?}");
        }
    }

    #[tokio::test]
    async fn a_write_that_has_begun_cannot_be_given_up() {
        let e = env();
        let p = format!("{}/begun", e.root);
        let gate = CommitGate::default();
        e.svc.write(1, wp(&p, "done"), None, &gate).await.unwrap();
        assert!(!gate.cancel(), "a committed write reported as given up");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "done");
    }
}
