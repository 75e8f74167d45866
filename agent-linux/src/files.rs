//! `file_read` and `file_write`.
//!
//! Every path goes through [`PathPolicy`] first (see `policy.rs` for how
//! paths are resolved); all blocking I/O runs in `spawn_blocking`.
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
//!   removed (a `/tmp` cleaner), always through the safe walk of `policy.rs`
//!   (`mkdirat` on the walked parent, never through an existing link). A
//!   root that exists but is unsafe is refused, never followed or "fixed".

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
use crate::policy::{check_regular_single, normalize_path, Found, PathPolicy, PolicyError};
use crate::sys;

/// Most chunked uploads open at once (all sessions together).
pub const MAX_UPLOADS: usize = 16;

/// Smallest `file_read` attachment chunk read into a pooled buffer (1 MiB
/// each); smaller ones get a buffer of their own size.
const POOLED_READ_MIN: usize = 64 * 1024;

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
            FileError::BadPermissions { .. } | FileError::InvalidRequest { .. } => {
                ErrorKind::InvalidParams
            }
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
            FileError::Decode(_)
            | FileError::InvalidRequest { .. }
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

/// A staging file in the target's directory, deleted on drop unless renamed into place.
struct Staged {
    dir: OwnedFd,
    tmp_name: OsString,
    final_name: OsString,
    file: File,
    live: bool,
}

impl Staged {
    /// Creates `.<name>.kvmtmp-<random>` in `dir` with exactly `perms` (and `owner`).
    fn create(
        dir: OwnedFd,
        final_name: OsString,
        perms: u32,
        owner: Option<(u32, u32)>,
        path: &str,
    ) -> Result<Staged, FileError> {
        // Keep the staging name within NAME_MAX (255): a prefix of the name will do.
        let bytes = final_name.as_bytes();
        let prefix = &bytes[..bytes.len().min(200)];
        let mut attempts = 0;
        let (fd, tmp_name) = loop {
            let suffix = sys::random_hex(16).map_err(io_err("create a staging file for", path))?;
            let mut tmp = Vec::with_capacity(prefix.len() + 48);
            tmp.push(b'.');
            tmp.extend_from_slice(prefix);
            tmp.extend_from_slice(b".kvmtmp-");
            tmp.extend_from_slice(suffix.as_bytes());
            let tmp = OsString::from(OsStr::from_bytes(&tmp));
            match sys::openat2(
                dir.as_fd(),
                &tmp,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                perms,
                sys::BENEATH,
            ) {
                Ok(fd) => break (fd, tmp),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && attempts < 3 => attempts += 1,
                Err(e) => return Err(io_err("create a staging file for", path)(e)),
            }
        };
        let staged = Staged {
            dir,
            tmp_name,
            final_name,
            file: File::from(fd),
            live: true,
        };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&staged.file, Some(uid), Some(gid))
                .map_err(io_err("set the owner of", path))?;
        }
        // Exactly `perms`, whatever the umask.
        staged
            .file
            .set_permissions(std::fs::Permissions::from_mode(perms))
            .map_err(io_err("set the permissions of", path))?;
        Ok(staged)
    }

    /// fsyncs the data and renames it into place.
    fn commit(&mut self, mode: WriteMode, path: &str) -> Result<(), FileError> {
        self.file.sync_all().map_err(io_err("write", path))?;
        let mut linked = false;
        let renamed = if mode == WriteMode::CreateNew {
            match sys::renameat2(
                self.dir.as_fd(),
                &self.tmp_name,
                &self.final_name,
                libc::RENAME_NOREPLACE,
            ) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // No RENAME_NOREPLACE on this filesystem: link fails if the name exists.
                    linked = true;
                    sys::linkat(self.dir.as_fd(), &self.tmp_name, &self.final_name)
                }
                other => other,
            }
        } else {
            sys::renameat2(self.dir.as_fd(), &self.tmp_name, &self.final_name, 0)
        };
        match renamed {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && mode == WriteMode::CreateNew => {
                return Err(FileError::AlreadyExists {
                    path: path.to_owned(),
                })
            }
            Err(e) => return Err(io_err("rename into place", path)(e)),
        }
        // After a rename the staging name is gone; after the link fallback
        // it remains and Drop removes it.
        if !linked {
            self.live = false;
        }
        sync_dir(&self.dir);
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.live {
            if let Err(e) = sys::unlinkat(self.dir.as_fd(), &self.tmp_name) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    tracing::warn!(name = ?self.tmp_name, error = %e, "cannot remove staging file");
                }
            }
        }
    }
}

/// Best-effort fsync of a directory (an `O_PATH` descriptor cannot be fsynced itself).
fn sync_dir(dir: &OwnedFd) {
    if let Ok(fd) = sys::openat2(
        dir.as_fd(),
        OsStr::new("."),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
        sys::BENEATH,
    ) {
        let _ = File::from(fd).sync_all();
    }
}

/// What replacing the target must preserve.
struct TargetInfo {
    perms: u32,
    owner: Option<(u32, u32)>,
}

/// Looks at the existing target of a replacing write.
fn inspect_target(
    dir: &OwnedFd,
    name: &OsStr,
    path: &str,
    mode: WriteMode,
    requested: u32,
) -> Result<TargetInfo, FileError> {
    let new = TargetInfo {
        perms: requested,
        owner: None,
    };
    let Some(st) = sys::lstatat(dir.as_fd(), name).map_err(io_err("inspect", path))? else {
        return Ok(new);
    };
    if mode == WriteMode::CreateNew {
        return Err(FileError::AlreadyExists {
            path: path.to_owned(),
        });
    }
    if sys::is_regular(&st) {
        let root = sys::geteuid() == 0;
        return Ok(TargetInfo {
            perms: st.st_mode & 0o777,
            owner: root.then_some((st.st_uid, st.st_gid)),
        });
    }
    if sys::is_symlink(&st) {
        // The link itself is replaced; refuse only if it points, inside the
        // root, at something that is not a regular file.
        if let Ok(fd) = sys::openat2(dir.as_fd(), name, libc::O_PATH, 0, sys::BENEATH) {
            let target = sys::fstat(fd.as_fd()).map_err(io_err("inspect", path))?;
            if !sys::is_regular(&target) {
                return Err(FileError::NotRegularFile {
                    path: path.to_owned(),
                });
            }
        }
        return Ok(new);
    }
    Err(FileError::NotRegularFile {
        path: path.to_owned(),
    })
}

/// An open chunked upload.
struct Upload {
    session: u64,
    /// Normalised path the upload will be committed to.
    path: String,
    mode: WriteMode,
    /// `None` once committed; chunk writers hold the read lock, the commit the write lock.
    staged: RwLock<Option<Staged>>,
    /// When a chunk last arrived or finished.
    last_active: Mutex<Instant>,
    /// Stops the upload's expiry task when the upload goes.
    _expiry: DropGuard,
}

impl Upload {
    fn touch(&self) {
        *lock(&self.last_active) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        lock(&self.last_active).elapsed()
    }
}

type Uploads = Arc<Mutex<HashMap<String, Arc<Upload>>>>;

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
    /// Buffers for chunks read as attachments.
    read_buffers: Arc<BufferPool>,
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
            read_buffers: BufferPool::new(MAX_READ_CHUNK as usize),
        }
    }

    /// Number of uploads open (all sessions).
    pub fn open_uploads(&self) -> usize {
        lock(&self.uploads).len()
    }

    /// `file_read`; with `encoding: attachment` the bytes are returned
    /// beside the result, which then has an empty `content`.
    pub async fn read(
        &self,
        params: FileReadParams,
    ) -> Result<(FileReadResult, Option<Bytes>), FileError> {
        let policy = Arc::clone(&self.read_policy);
        let limit = self.config.security.max_file_size;
        let buffers = Arc::clone(&self.read_buffers);
        blocking(move || read_blocking(&policy, &params, limit, &buffers)).await
    }

    /// `file_write` on behalf of `session` (the host connection). With
    /// `encoding: attachment` the bytes are `attachment`, the raw bytes that
    /// followed the request line.
    pub async fn write(
        &self,
        session: u64,
        params: FileWriteParams,
        attachment: Option<Bytes>,
        gate: &CommitGate,
    ) -> Result<FileWriteResult, FileError> {
        let perms = match params.permissions {
            None => DEFAULT_PERMISSIONS,
            Some(mode) if mode & !ALLOWED_PERMISSIONS == 0 => mode,
            Some(mode) => return Err(FileError::BadPermissions { mode }),
        };
        let data = match (params.encoding, attachment) {
            (Encoding::Attachment, Some(data)) if params.content.is_empty() => data,
            (Encoding::Attachment, Some(_)) => {
                return Err(FileError::InvalidRequest {
                    reason: "with encoding attachment, content must be empty".into(),
                })
            }
            (Encoding::Attachment, None) => {
                return Err(FileError::InvalidRequest {
                    reason: "encoding attachment needs the data as the request's attachment \
                             (the attachment member and the raw bytes after the line)"
                        .into(),
                })
            }
            (_, Some(_)) => {
                return Err(FileError::InvalidRequest {
                    reason: "a request with an attachment must say encoding attachment".into(),
                })
            }
            (encoding, None) => Bytes::from(
                encoding
                    .decode(&params.content)
                    .map_err(FileError::Decode)?,
            ),
        };
        let limit = self.config.security.max_file_size;
        if let Some(id) = params.upload_id.clone() {
            return self.write_chunk(session, id, params, data, gate).await;
        }
        if params.offset.is_some_and(|o| o != 0) {
            return Err(FileError::InvalidRequest {
                reason: "offset is only allowed with upload_id".into(),
            });
        }
        let len = data.len() as u64;
        if len > limit {
            return Err(FileError::TooLarge {
                path: params.path,
                size: len,
                limit,
            });
        }
        let policy = Arc::clone(&self.write_policy);
        match (params.mode, params.more) {
            (WriteMode::Append, true) => Err(FileError::InvalidRequest {
                reason: "chunked uploads (more: true) need mode truncate or create_new".into(),
            }),
            (WriteMode::Append, false) => {
                let gate = gate.clone();
                blocking(move || {
                    gate.begin(&params.path)?;
                    append_blocking(&policy, &params.path, &data, perms, limit)
                })
                .await
            }
            (mode, false) => {
                let gate = gate.clone();
                blocking(move || {
                    let (dir, name) = policy.open_parent_for_write(&params.path)?;
                    let target = inspect_target(&dir, &name, &params.path, mode, perms)?;
                    let mut staged =
                        Staged::create(dir, name, target.perms, target.owner, &params.path)?;
                    staged
                        .file
                        .write_all(&data)
                        .map_err(io_err("write", &params.path))?;
                    gate.begin(&params.path)?;
                    staged.commit(mode, &params.path)?;
                    Ok(FileWriteResult {
                        bytes_written: len,
                        size: len,
                        upload_id: None,
                        committed: true,
                    })
                })
                .await
            }
            (mode, true) => {
                self.start_upload(session, params, mode, perms, data, gate)
                    .await
            }
        }
    }

    async fn start_upload(
        &self,
        session: u64,
        params: FileWriteParams,
        mode: WriteMode,
        perms: u32,
        data: Bytes,
        gate: &CommitGate,
    ) -> Result<FileWriteResult, FileError> {
        self.expire_idle();
        if lock(&self.uploads).len() >= MAX_UPLOADS {
            return Err(FileError::TooManyUploads { limit: MAX_UPLOADS });
        }
        let norm = normalize_path(&params.path).ok();
        let policy = Arc::clone(&self.write_policy);
        let path = params.path.clone();
        let gate = gate.clone();
        let staged = blocking(move || {
            let (dir, name) = policy.open_parent_for_write(&path)?;
            let target = inspect_target(&dir, &name, &path, mode, perms)?;
            let staged = Staged::create(dir, name, target.perms, target.owner, &path)?;
            staged
                .file
                .write_all_at(&data, 0)
                .map_err(io_err("write", &path))?;
            // From here the upload is registered and its id answered.
            gate.begin(&path)?;
            Ok(staged)
        })
        .await?;
        let size = staged
            .file
            .metadata()
            .map_err(io_err("write", &params.path))?
            .len();
        let id = sys::random_hex(16).map_err(io_err("start an upload for", &params.path))?;
        let expiry = CancellationToken::new();
        let upload = Arc::new(Upload {
            session,
            // open_parent_for_write accepted the path, so it normalises.
            path: norm.unwrap_or_else(|| params.path.clone()),
            mode,
            staged: RwLock::new(Some(staged)),
            last_active: Mutex::new(Instant::now()),
            _expiry: expiry.clone().drop_guard(),
        });
        {
            let mut map = lock(&self.uploads);
            if map.len() >= MAX_UPLOADS {
                drop(map);
                // Dropping the upload deletes its staging file.
                drop(upload);
                return Err(FileError::TooManyUploads { limit: MAX_UPLOADS });
            }
            map.insert(id.clone(), Arc::clone(&upload));
        }
        tokio::spawn(expire_when_idle(
            Arc::clone(&self.uploads),
            id.clone(),
            Arc::downgrade(&upload),
            self.idle_timeout,
            expiry,
        ));
        tracing::debug!(upload_id = %id, path = %params.path, "upload started");
        Ok(FileWriteResult {
            bytes_written: size,
            size,
            upload_id: Some(id),
            committed: false,
        })
    }

    async fn write_chunk(
        &self,
        session: u64,
        id: String,
        params: FileWriteParams,
        data: Bytes,
        gate: &CommitGate,
    ) -> Result<FileWriteResult, FileError> {
        let upload = lock(&self.uploads)
            .get(&id)
            .filter(|u| u.session == session)
            .cloned()
            .ok_or_else(|| FileError::UnknownUpload { id: id.clone() })?;
        upload.touch();
        let result = self
            .write_chunk_inner(&upload, &id, params, data, gate)
            .await;
        upload.touch();
        if result.is_err() {
            // Any failed chunk aborts the upload; the staging file goes with the last reference.
            self.remove_if_same(&id, &upload);
        }
        result
    }

    async fn write_chunk_inner(
        &self,
        upload: &Arc<Upload>,
        id: &str,
        params: FileWriteParams,
        data: Bytes,
        gate: &CommitGate,
    ) -> Result<FileWriteResult, FileError> {
        if normalize_path(&params.path).ok().as_deref() != Some(upload.path.as_str()) {
            return Err(FileError::InvalidRequest {
                reason: format!(
                    "path {:?} differs from the upload's path {:?}",
                    params.path, upload.path
                ),
            });
        }
        let offset = params.offset.ok_or_else(|| FileError::InvalidRequest {
            reason: "offset is required with upload_id".into(),
        })?;
        let len = data.len() as u64;
        let limit = self.config.security.max_file_size;
        let end = offset.saturating_add(len);
        if end > limit {
            return Err(FileError::TooLarge {
                path: params.path,
                size: end,
                limit,
            });
        }
        let commit = !params.more;
        if commit && !self.remove_if_same(id, upload) {
            return Err(FileError::UnknownUpload { id: id.to_owned() });
        }
        let upload = Arc::clone(upload);
        let id = id.to_owned();
        let path = params.path;
        let gate = gate.clone();
        blocking(move || {
            let unknown = || FileError::UnknownUpload { id: id.clone() };
            if let Err(e) = gate.begin(&path) {
                // Given up before the chunk was written: like any failed
                // chunk, it aborts the upload (its request's future, which
                // would remove it, is gone).
                *upload.staged.write().unwrap_or_else(|e| e.into_inner()) = None;
                return Err(e);
            }
            if commit {
                let mut guard = upload.staged.write().unwrap_or_else(|e| e.into_inner());
                let staged = guard.as_mut().ok_or_else(unknown)?;
                staged
                    .file
                    .write_all_at(&data, offset)
                    .map_err(io_err("write", &path))?;
                let size = staged
                    .file
                    .metadata()
                    .map_err(io_err("write", &path))?
                    .len();
                staged.commit(upload.mode, &path)?;
                // Committed: nothing more may be written to it.
                *guard = None;
                tracing::debug!(upload_id = %id, %path, size, "upload committed");
                Ok(FileWriteResult {
                    bytes_written: len,
                    size,
                    upload_id: None,
                    committed: true,
                })
            } else {
                let guard = upload.staged.read().unwrap_or_else(|e| e.into_inner());
                let staged = guard.as_ref().ok_or_else(unknown)?;
                staged
                    .file
                    .write_all_at(&data, offset)
                    .map_err(io_err("write", &path))?;
                let size = staged
                    .file
                    .metadata()
                    .map_err(io_err("write", &path))?
                    .len();
                Ok(FileWriteResult {
                    bytes_written: len,
                    size,
                    upload_id: Some(id),
                    committed: false,
                })
            }
        })
        .await
    }

    /// Aborts the uploads idle for [`UPLOAD_IDLE_TIMEOUT`] or more (their
    /// expiry tasks do it too; this makes a new upload see the slots free
    /// even if a task has not run yet).
    fn expire_idle(&self) {
        let expired: Vec<(String, Arc<Upload>)> = {
            let mut map = lock(&self.uploads);
            let ids: Vec<String> = map
                .iter()
                .filter(|(_, u)| u.idle_for() >= self.idle_timeout)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| map.remove(&id).map(|u| (id, u)))
                .collect()
        };
        for (id, upload) in expired {
            tracing::warn!(upload_id = %id, path = %upload.path, "upload idle too long; aborted");
        }
    }

    /// Removes upload `id` if it is still `upload`; true if this call removed it.
    fn remove_if_same(&self, id: &str, upload: &Arc<Upload>) -> bool {
        let mut map = lock(&self.uploads);
        match map.get(id) {
            Some(u) if Arc::ptr_eq(u, upload) => {
                map.remove(id);
                true
            }
            _ => false,
        }
    }

    /// Aborts `session`'s uploads and deletes their staging files.
    pub fn end_session(&self, session: u64) {
        self.read_buffers.clear();
        let removed: Vec<Arc<Upload>> = {
            let mut map = lock(&self.uploads);
            let ids: Vec<String> = map
                .iter()
                .filter(|(_, u)| u.session == session)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        if !removed.is_empty() {
            tracing::debug!(
                session,
                count = removed.len(),
                "aborting uploads of ended session"
            );
        }
        // Dropped here, outside the lock: each deletes its staging file
        // (or the last chunk writer still holding it does).
        drop(removed);
    }

    /// Aborts every upload (agent shutdown).
    pub fn abort_all(&self) {
        let removed: Vec<Arc<Upload>> = lock(&self.uploads).drain().map(|(_, u)| u).collect();
        drop(removed);
    }
}

impl Drop for FileService {
    fn drop(&mut self) {
        self.abort_all();
    }
}

/// Sleeps until upload `id` has been idle for `timeout`, then aborts it
/// (its staging file goes with the last reference). Ends at once when the
/// upload goes (committed, aborted, session ended): `cancel` fires when the
/// upload is dropped. One timer per open upload, none when there is none.
async fn expire_when_idle(
    uploads: Uploads,
    id: String,
    upload: Weak<Upload>,
    timeout: Duration,
    cancel: CancellationToken,
) {
    loop {
        // Not held across the sleep: holding it would keep the upload alive.
        let Some(last) = upload.upgrade().map(|u| *lock(&u.last_active)) else {
            return;
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(last + timeout) => {}
        }
        let Some(current) = upload.upgrade() else {
            return;
        };
        if current.idle_for() < timeout {
            continue;
        }
        let removed = {
            let mut map = lock(&uploads);
            match map.get(&id) {
                Some(u) if Arc::ptr_eq(u, &current) => map.remove(&id),
                _ => None,
            }
        };
        if removed.is_some() {
            tracing::warn!(upload_id = %id, path = %current.path, "upload idle too long; aborted");
        }
        return;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map stays consistent even if a holder panicked: every update is one call.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads into `buf` from `offset` until it is full or the file ends;
/// returns the bytes read.
fn read_at_full(file: &File, buf: &mut [u8], offset: u64, path: &str) -> Result<usize, FileError> {
    let mut filled = 0usize;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break, // The file shrank.
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read", path)(e)),
        }
    }
    Ok(filled)
}

fn read_blocking(
    policy: &PathPolicy,
    params: &FileReadParams,
    limit: u64,
    buffers: &Arc<BufferPool>,
) -> Result<(FileReadResult, Option<Bytes>), FileError> {
    let path = params.path.as_str();
    let file = policy.open_read(path)?;
    let size = file.metadata().map_err(io_err("read", path))?.len();
    if size > limit {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            size,
            limit,
        });
    }
    let length = params.length.unwrap_or(MAX_READ_CHUNK).min(MAX_READ_CHUNK);
    let offset = params.offset;
    // At most MAX_READ_CHUNK (1 MiB).
    let want = size.saturating_sub(offset).min(length) as usize;
    if params.encoding == Encoding::Attachment {
        // Buffers are sized to what was asked: a pooled 1 MiB buffer only
        // for a large chunk, an exact one otherwise.
        let (data, filled) = if want >= POOLED_READ_MIN {
            let mut buf = buffers.take();
            let filled = read_at_full(&file, &mut buf.space()[..want], offset, path)?;
            buf.set_len(filled);
            (buf.into_bytes(), filled)
        } else {
            let mut buf = vec![0u8; want];
            let filled = read_at_full(&file, &mut buf, offset, path)?;
            buf.truncate(filled);
            (Bytes::from(buf), filled)
        };
        let bytes_read = filled as u64;
        let result = FileReadResult {
            content: String::new(),
            encoding: Encoding::Attachment,
            offset,
            bytes_read,
            eof: offset.saturating_add(bytes_read) >= size,
            size,
        };
        return Ok((result, Some(data)));
    }
    let mut buf = vec![0u8; want];
    let filled = read_at_full(&file, &mut buf, offset, path)?;
    buf.truncate(filled);
    let content = match params.encoding {
        // Returned above.
        Encoding::Attachment => String::new(),
        Encoding::Base64 => Encoding::Base64.encode_lossy(&buf),
        Encoding::Utf8 => match std::str::from_utf8(&buf) {
            Ok(s) => s.to_owned(),
            // The chunk ends inside a character the file completes: return
            // the whole characters only; bytes_read says how many.
            Err(e)
                if e.error_len().is_none()
                    && e.valid_up_to() > 0
                    && offset + (filled as u64) < size =>
            {
                buf.truncate(e.valid_up_to());
                // Valid up to here by construction.
                String::from_utf8_lossy(&buf).into_owned()
            }
            Err(e) => {
                return Err(FileError::NotUtf8 {
                    path: path.to_owned(),
                    at: offset + e.valid_up_to() as u64,
                })
            }
        },
    };
    let bytes_read = buf.len() as u64;
    let result = FileReadResult {
        content,
        encoding: params.encoding,
        offset,
        bytes_read,
        eof: offset.saturating_add(bytes_read) >= size,
        size,
    };
    Ok((result, None))
}

fn append_blocking(
    policy: &PathPolicy,
    path: &str,
    data: &[u8],
    perms: u32,
    limit: u64,
) -> Result<FileWriteResult, FileError> {
    let (dir, name) = policy.open_parent_for_write(path)?;
    let not_regular = || FileError::NotRegularFile {
        path: path.to_owned(),
    };
    if let Some(st) = sys::lstatat(dir.as_fd(), &name).map_err(io_err("inspect", path))? {
        if sys::is_symlink(&st) {
            return Err(FileError::Symlink {
                path: path.to_owned(),
            });
        }
        if !sys::is_regular(&st) {
            return Err(not_regular());
        }
    }
    // O_NONBLOCK: a FIFO swapped in never blocks the open.
    let flags =
        libc::O_WRONLY | libc::O_APPEND | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let open = |extra| sys::openat2(dir.as_fd(), &name, flags | extra, perms, sys::BENEATH);
    let map_open = |e: io::Error| match e.raw_os_error() {
        Some(libc::ELOOP) => FileError::Symlink {
            path: path.to_owned(),
        },
        Some(libc::ENXIO) => not_regular(),
        _ => io_err("open", path)(e),
    };
    let (fd, created) = match open(libc::O_CREAT | libc::O_EXCL) {
        Ok(fd) => (fd, true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => (open(0).map_err(map_open)?, false),
        Err(e) => return Err(map_open(e)),
    };
    let mut file = File::from(fd);
    let remove_created = |file: &File| {
        if created {
            // Only if the name still is this file.
            if let (Ok(Some(st)), Ok(own)) =
                (sys::lstatat(dir.as_fd(), &name), sys::fstat(file.as_fd()))
            {
                if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino) {
                    let _ = sys::unlinkat(dir.as_fd(), &name);
                }
            }
        }
    };
    let st = sys::fstat(file.as_fd()).map_err(io_err("inspect", path))?;
    check_regular_single(&st, path)?;
    if created {
        if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(perms)) {
            remove_created(&file);
            return Err(io_err("set the permissions of", path)(e));
        }
    }
    let old_len = st.st_size as u64;
    let new_len = old_len.saturating_add(data.len() as u64);
    if new_len > limit {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            size: new_len,
            limit,
        });
    }
    if let Err(e) = file.write_all(data).and_then(|()| file.sync_data()) {
        if created {
            remove_created(&file);
        } else if let Err(t) = file.set_len(old_len) {
            tracing::warn!(%path, error = %t, "cannot undo a partial append");
        }
        return Err(io_err("append to", path)(e));
    }
    let size = file.metadata().map_err(io_err("append to", path))?.len();
    Ok(FileWriteResult {
        bytes_written: data.len() as u64,
        size,
        upload_id: None,
        committed: true,
    })
}

/// Checks every allowed root by the safe walk at start-up (see `policy.rs`)
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

/// Most directory entries [`remove_stale_staging`] visits, over all roots.
pub const SWEEP_MAX_ENTRIES: usize = 100_000;

/// What [`remove_stale_staging`] did.
#[derive(Debug, Default)]
pub struct StagingSweep {
    /// The staging files removed (paths, for the log).
    pub removed: Vec<String>,
    /// Directory entries visited.
    pub visited: usize,
    /// The sweep stopped at [`SWEEP_MAX_ENTRIES`].
    pub truncated: bool,
}

/// True if `name` is a staging file name, `.<name>.kvmtmp-<32 hex>` (with
/// `prefix` as `<name>` if given).
fn is_staging_name(name: &[u8], prefix: Option<&[u8]>) -> bool {
    const TAG: &[u8] = b".kvmtmp-";
    let Some(rest) = name.strip_prefix(b".") else {
        return false;
    };
    if rest.len() < TAG.len() + 32 + 1 {
        return false;
    }
    let (head, hex) = rest.split_at(rest.len() - 32);
    let Some(stem) = head.strip_suffix(TAG) else {
        return false;
    };
    !stem.is_empty()
        && hex
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        && prefix.map_or(true, |p| stem == &p[..p.len().min(200)])
}

/// Removes the staging files a killed agent left behind (see the module
/// documentation). Runs once at start-up, before any request is served, so
/// it never meets a staging file of this agent's own uploads.
pub fn remove_stale_staging(config: &Config) -> StagingSweep {
    let mut sweep = StagingSweep::default();
    let euid = sys::geteuid();
    let roots: Vec<String> = config
        .security
        .allowed_write_paths
        .iter()
        .filter_map(|r| r.to_str().map(normalize_path)?.ok())
        .collect();
    for root in &roots {
        // A root inside another write root is swept with it.
        let nested = roots
            .iter()
            .any(|other| other != root && (other == "/" || root.starts_with(&format!("{other}/"))));
        if nested {
            continue;
        }
        let Ok(walked) = crate::policy::walk_root(root, root, None) else {
            // Unsafe or unreadable: prepare_roots warned about it.
            continue;
        };
        match walked.found {
            Found::Dir(fd) => sweep_tree(root, &fd, euid, &mut sweep),
            Found::Other(_) | Found::Missing { last: true } => {
                // A file root: its staging files sit beside it.
                let (dir, name) = match walked.named {
                    Some(named) => named,
                    None => (walked.dir, walked.name),
                };
                let parent = root.rsplit_once('/').map_or("/", |(p, _)| p);
                sweep_dir(parent, &dir, Some(name.as_bytes()), euid, &mut sweep);
            }
            Found::Missing { last: false } => {}
        }
        if sweep.truncated {
            break;
        }
    }
    sweep
}

/// Sweeps the directory tree under `root` (an `O_PATH` descriptor): no
/// symbolic link is followed and no mount point crossed.
fn sweep_tree(root_path: &str, root: &OwnedFd, euid: u32, sweep: &mut StagingSweep) {
    let mut stack: Vec<OsString> = vec![OsString::from(".")];
    while let Some(rel) = stack.pop() {
        let Ok(dir) = sys::openat2(
            root.as_fd(),
            &rel,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            sys::SWEEP,
        ) else {
            continue;
        };
        let shown = if rel == "." {
            root_path.to_owned()
        } else {
            format!("{root_path}/{}", rel.to_string_lossy())
        };
        for name in sweep_dir(&shown, &dir, None, euid, sweep) {
            let mut sub = if rel == "." {
                OsString::new()
            } else {
                let mut s = rel.clone();
                s.push("/");
                s
            };
            sub.push(&name);
            stack.push(sub);
        }
        if sweep.truncated {
            return;
        }
    }
}

/// Removes the staging files in `dir` (an `O_PATH` descriptor shown as
/// `shown`) that are regular files owned by `euid`, with names matching
/// `prefix` if given; returns its subdirectories.
fn sweep_dir(
    shown: &str,
    dir: &OwnedFd,
    prefix: Option<&[u8]>,
    euid: u32,
    sweep: &mut StagingSweep,
) -> Vec<OsString> {
    let mut subdirs = Vec::new();
    let Ok(readable) = sys::openat2(
        dir.as_fd(),
        OsStr::new("."),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
        sys::SWEEP,
    ) else {
        return subdirs;
    };
    let budget = SWEEP_MAX_ENTRIES.saturating_sub(sweep.visited);
    let entries = match sys::read_dir(readable, budget) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::debug!(directory = shown, error = %e, "staging sweep cannot list a directory");
            return subdirs;
        }
    };
    sweep.visited += entries.len();
    if sweep.visited >= SWEEP_MAX_ENTRIES {
        sweep.truncated = true;
    }
    for (name, kind) in entries {
        if kind == libc::DT_DIR {
            subdirs.push(name);
            continue;
        }
        if !matches!(kind, libc::DT_REG | libc::DT_UNKNOWN)
            || !is_staging_name(name.as_bytes(), prefix)
        {
            if kind == libc::DT_UNKNOWN {
                if let Ok(Some(st)) = sys::lstatat(dir.as_fd(), &name) {
                    if sys::is_dir(&st) {
                        subdirs.push(name);
                    }
                }
            }
            continue;
        }
        match sys::lstatat(dir.as_fd(), &name) {
            Ok(Some(st)) if sys::is_regular(&st) && st.st_uid == euid => {}
            Ok(Some(st)) if sys::is_dir(&st) => {
                subdirs.push(name);
                continue;
            }
            _ => continue,
        }
        let shown_file = format!("{}/{}", shown.trim_end_matches('/'), name.to_string_lossy());
        match sys::unlinkat(dir.as_fd(), &name) {
            Ok(()) => sweep.removed.push(shown_file),
            Err(e) => {
                tracing::warn!(file = %shown_file, error = %e, "cannot remove a stale staging file")
            }
        }
    }
    subdirs
}

/// Lists the staging files in `dir` (files named `.<name>.kvmtmp-<hex>`).
pub fn staging_files(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let b = name.as_bytes();
        if b.starts_with(b".") && b.windows(8).any(|w| w == b".kvmtmp-") {
            out.push(name);
        }
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

    struct Env {
        _dir: tempfile::TempDir,
        root: String,
        outside: String,
        svc: FileService,
    }

    fn env_with(max_file_size: u64) -> Env {
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

    fn env() -> Env {
        env_with(1 << 20)
    }

    /// An env whose uploads expire after `timeout` idle.
    fn env_expiring(timeout: Duration) -> Env {
        let e = env();
        Env {
            svc: FileService::with_idle_timeout(Arc::clone(&e.svc.config), timeout),
            ..e
        }
    }

    fn wp(path: &str, content: &str) -> FileWriteParams {
        FileWriteParams {
            path: path.to_owned(),
            content: content.to_owned(),
            ..Default::default()
        }
    }

    fn rp(path: &str) -> FileReadParams {
        FileReadParams {
            path: path.to_owned(),
            ..Default::default()
        }
    }

    fn mode_of(path: &str) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn no_staging(dir: &str) {
        assert_eq!(
            staging_files(Path::new(dir)).unwrap(),
            Vec::<OsString>::new()
        );
    }

    #[tokio::test]
    async fn read_ranges_and_eof() {
        let e = env();
        let p = format!("{}/f.txt", e.root);
        std::fs::write(&p, "hello world").unwrap();
        let cases: &[(u64, Option<u64>, &str, bool)] = &[
            (0, None, "hello world", true),
            (0, Some(5), "hello", false),
            (6, Some(5), "world", true),
            (6, Some(100), "world", true),
            (11, None, "", true),
            (50, None, "", true),
            (3, Some(0), "", false),
        ];
        for (offset, length, want, eof) in cases {
            let r = e
                .svc
                .read_inline(FileReadParams {
                    offset: *offset,
                    length: *length,
                    ..rp(&p)
                })
                .await
                .unwrap();
            assert_eq!(r.content, *want, "{offset} {length:?}");
            assert_eq!(r.bytes_read, want.len() as u64);
            assert_eq!(r.eof, *eof, "{offset} {length:?}");
            assert_eq!(r.size, 11);
            assert_eq!(r.offset, *offset);
        }
    }

    #[tokio::test]
    async fn read_utf8_boundaries_and_base64() {
        let e = env();
        let p = format!("{}/u.txt", e.root);
        std::fs::write(&p, "a\u{e9}b").unwrap(); // 61 c3 a9 62
        let r = e
            .svc
            .read_inline(FileReadParams {
                length: Some(2),
                ..rp(&p)
            })
            .await
            .unwrap();
        assert_eq!((r.content.as_str(), r.bytes_read, r.eof), ("a", 1, false));
        let r = e
            .svc
            .read_inline(FileReadParams {
                offset: 1,
                length: Some(2),
                ..rp(&p)
            })
            .await
            .unwrap();
        assert_eq!((r.content.as_str(), r.bytes_read), ("\u{e9}", 2));
        // Starting inside a character is invalid UTF-8.
        let err = e
            .svc
            .read_inline(FileReadParams {
                offset: 2,
                ..rp(&p)
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidEncoding);
        let bin = format!("{}/bin", e.root);
        std::fs::write(&bin, [0u8, 0xff, 0xfe, b'x']).unwrap();
        let err = e.svc.read_inline(rp(&bin)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidEncoding);
        assert!(err.to_string().contains("use encoding base64"), "{err}");
        let r = e
            .svc
            .read_inline(FileReadParams {
                encoding: Encoding::Base64,
                ..rp(&bin)
            })
            .await
            .unwrap();
        assert_eq!(
            Encoding::Base64.decode(&r.content).unwrap(),
            [0u8, 0xff, 0xfe, b'x']
        );
        assert_eq!(r.encoding, Encoding::Base64);
        // A truncated character at the end of the file is invalid too.
        let cut = format!("{}/cut", e.root);
        std::fs::write(&cut, [b'a', 0xc3]).unwrap();
        let err = e.svc.read_inline(rp(&cut)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidEncoding);
    }

    #[tokio::test]
    async fn read_refusals() {
        let e = env_with(10);
        let big = format!("{}/big", e.root);
        std::fs::write(&big, "0123456789A").unwrap();
        let err = e.svc.read_inline(rp(&big)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge);
        let obj = crate::error::to_error_object(&err);
        let data = obj.data.unwrap();
        assert_eq!(
            (data["size"].as_u64(), data["limit"].as_u64()),
            (Some(11), Some(10))
        );
        let fifo = format!("{}/fifo", e.root);
        nix::unistd::mkfifo(
            fifo.as_str(),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        for (path, kind) in [
            (fifo, ErrorKind::NotARegularFile),
            (format!("{}/sub", e.root), ErrorKind::NotARegularFile),
            (format!("{}/x", e.outside), ErrorKind::PolicyDenied),
            (format!("{}/nope", e.root), ErrorKind::NotFound),
        ] {
            let err = e.svc.read_inline(rp(&path)).await.unwrap_err();
            assert_eq!(err.kind(), kind, "{path}: {err}");
        }
    }

    #[tokio::test]
    async fn truncate_replaces_atomically_and_keeps_permissions() {
        let e = env();
        let p = format!("{}/f", e.root);
        let r = e.svc.write_inline(1, wp(&p, "first")).await.unwrap();
        assert_eq!((r.bytes_written, r.size, r.committed), (5, 5, true));
        assert_eq!(r.upload_id, None);
        assert_eq!(mode_of(&p), DEFAULT_PERMISSIONS);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ino = std::fs::metadata(&p).unwrap().ino();
        let r = e
            .svc
            .write_inline(
                1,
                FileWriteParams {
                    permissions: Some(0o755),
                    ..wp(&p, "second!")
                },
            )
            .await
            .unwrap();
        assert_eq!(r.size, 7);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "second!");
        assert_eq!(mode_of(&p), 0o600, "existing permissions are kept");
        assert_ne!(
            std::fs::metadata(&p).unwrap().ino(),
            ino,
            "replaced, not rewritten"
        );
        // New file with explicit permissions, whatever the umask.
        let q = format!("{}/g", e.root);
        e.svc
            .write_inline(
                1,
                FileWriteParams {
                    permissions: Some(0o700),
                    ..wp(&q, "x")
                },
            )
            .await
            .unwrap();
        assert_eq!(mode_of(&q), 0o700);
        no_staging(&e.root);
    }

    #[tokio::test]
    async fn replacing_a_symlink_replaces_the_link_not_its_target() {
        let e = env();
        let secret = format!("{}/secret", e.outside);
        std::fs::write(&secret, "SECRET").unwrap();
        let link = format!("{}/link", e.root);
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        e.svc.write_inline(1, wp(&link, "mine")).await.unwrap();
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "SECRET");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "mine");
        // A hard link to an outside file is replaced too, never written through.
        let hl = format!("{}/hard", e.root);
        std::fs::hard_link(&secret, &hl).unwrap();
        e.svc.write_inline(1, wp(&hl, "mine")).await.unwrap();
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "SECRET");
    }

    #[tokio::test]
    async fn write_refusals() {
        let e = env_with(8);
        let fifo = format!("{}/fifo", e.root);
        nix::unistd::mkfifo(
            fifo.as_str(),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("sub", format!("{}/dirlink", e.root)).unwrap();
        std::os::unix::fs::symlink(&e.outside, format!("{}/outlink", e.root)).unwrap();
        let f = format!("{}/f", e.root);
        std::fs::write(&f, "old").unwrap();
        let cases: Vec<(FileWriteParams, ErrorKind)> = vec![
            (
                wp(&format!("{}/sub", e.root), "x"),
                ErrorKind::NotARegularFile,
            ),
            (wp(&fifo, "x"), ErrorKind::NotARegularFile),
            (
                wp(&format!("{}/dirlink", e.root), "x"),
                ErrorKind::NotARegularFile,
            ),
            (
                wp(&format!("{}/outlink/x", e.root), "x"),
                ErrorKind::PolicyDenied,
            ),
            (
                wp(&format!("{}/x", e.outside), "x"),
                ErrorKind::PolicyDenied,
            ),
            (
                wp(&format!("{}/../outside/x", e.root), "x"),
                ErrorKind::PolicyDenied,
            ),
            (wp(&format!("{}/nodir/x", e.root), "x"), ErrorKind::NotFound),
            (wp(&f, "123456789"), ErrorKind::TooLarge),
            (
                FileWriteParams {
                    permissions: Some(0o664),
                    ..wp(&f, "x")
                },
                ErrorKind::InvalidParams,
            ),
            (
                FileWriteParams {
                    permissions: Some(0o4755),
                    ..wp(&f, "x")
                },
                ErrorKind::InvalidParams,
            ),
            (
                FileWriteParams {
                    permissions: Some(0o1644),
                    ..wp(&f, "x")
                },
                ErrorKind::InvalidParams,
            ),
            (
                FileWriteParams {
                    encoding: Encoding::Base64,
                    ..wp(&f, "not base64!")
                },
                ErrorKind::InvalidEncoding,
            ),
            (
                FileWriteParams {
                    offset: Some(3),
                    ..wp(&f, "x")
                },
                ErrorKind::InvalidParams,
            ),
            (
                FileWriteParams {
                    mode: WriteMode::CreateNew,
                    ..wp(&f, "x")
                },
                ErrorKind::AlreadyExists,
            ),
            (
                FileWriteParams {
                    mode: WriteMode::Append,
                    more: true,
                    ..wp(&f, "x")
                },
                ErrorKind::InvalidParams,
            ),
            (
                FileWriteParams {
                    mode: WriteMode::Append,
                    ..wp(&f, "123456")
                },
                ErrorKind::TooLarge,
            ),
            (
                FileWriteParams {
                    mode: WriteMode::Append,
                    ..wp(&fifo, "x")
                },
                ErrorKind::NotARegularFile,
            ),
            (
                FileWriteParams {
                    mode: WriteMode::Append,
                    ..wp(&format!("{}/dirlink", e.root), "x")
                },
                ErrorKind::PolicyDenied,
            ),
            (
                FileWriteParams {
                    upload_id: Some("nope".into()),
                    offset: Some(0),
                    ..wp(&f, "x")
                },
                ErrorKind::NotFound,
            ),
        ];
        for (params, kind) in cases {
            let label = format!("{params:?}");
            let err = e.svc.write_inline(1, params).await.unwrap_err();
            assert_eq!(err.kind(), kind, "{label}: {err}");
        }
        // Nothing was written anywhere.
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "old");
        assert!(!Path::new(&format!("{}/x", e.outside)).exists());
        no_staging(&e.root);
    }

    #[tokio::test]
    async fn create_new_creates_once() {
        let e = env();
        let p = format!("{}/new", e.root);
        let params = FileWriteParams {
            mode: WriteMode::CreateNew,
            ..wp(&p, "one")
        };
        e.svc.write_inline(1, params.clone()).await.unwrap();
        let err = e.svc.write_inline(1, params).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "one");
        // A dangling symlink also makes the name taken.
        let dl = format!("{}/dangling", e.root);
        std::os::unix::fs::symlink("nowhere", &dl).unwrap();
        let err = e
            .svc
            .write_inline(
                1,
                FileWriteParams {
                    mode: WriteMode::CreateNew,
                    ..wp(&dl, "x")
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        no_staging(&e.root);
    }

    #[tokio::test]
    async fn append_creates_then_appends_and_refuses_hard_links() {
        let e = env();
        let p = format!("{}/log", e.root);
        let ap = |c: &str| FileWriteParams {
            mode: WriteMode::Append,
            permissions: Some(0o600),
            ..wp(&p, c)
        };
        let r = e.svc.write_inline(1, ap("ab")).await.unwrap();
        assert_eq!((r.size, r.committed), (2, true));
        assert_eq!(mode_of(&p), 0o600);
        let r = e.svc.write_inline(1, ap("cd")).await.unwrap();
        assert_eq!((r.bytes_written, r.size), (2, 4));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "abcd");
        let secret = format!("{}/secret", e.outside);
        std::fs::write(&secret, "S").unwrap();
        let hl = format!("{}/hard", e.root);
        std::fs::hard_link(&secret, &hl).unwrap();
        let err = e
            .svc
            .write_inline(
                1,
                FileWriteParams {
                    mode: WriteMode::Append,
                    ..wp(&hl, "x")
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PolicyDenied);
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "S");
        // And reading through the hard link is refused as well.
        let err = e.svc.read_inline(rp(&hl)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PolicyDenied);
    }

    fn chunk(path: &str, id: &str, offset: u64, data: &[u8], more: bool) -> FileWriteParams {
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

    #[tokio::test]
    async fn chunked_upload_out_of_order_commits_byte_equal() {
        let e = env();
        let p = format!("{}/up.bin", e.root);
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let parts: Vec<&[u8]> = data.chunks(16_384).collect();
        let first = e
            .svc
            .write_inline(
                7,
                FileWriteParams {
                    content: Encoding::Base64.encode_lossy(parts[0]),
                    encoding: Encoding::Base64,
                    more: true,
                    ..wp(&p, "")
                },
            )
            .await
            .unwrap();
        assert!(!first.committed);
        let id = first.upload_id.unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "old",
            "not yet visible"
        );
        assert_eq!(staging_files(Path::new(&e.root)).unwrap().len(), 1);
        // The middle chunks concurrently and in reverse order.
        let middle = parts.len() - 1;
        let futs = (1..middle).rev().map(|i| {
            let params = chunk(&p, &id, (i * 16_384) as u64, parts[i], true);
            e.svc.write_inline(7, params)
        });
        for r in futures::future::join_all(futs).await {
            let r = r.unwrap();
            assert_eq!(
                (r.committed, r.upload_id.as_deref()),
                (false, Some(id.as_str()))
            );
        }
        let last = e
            .svc
            .write_inline(
                7,
                chunk(&p, &id, (middle * 16_384) as u64, parts[middle], false),
            )
            .await
            .unwrap();
        assert!(last.committed);
        assert_eq!(last.size, data.len() as u64);
        assert_eq!(std::fs::read(&p).unwrap(), data);
        assert_eq!(mode_of(&p), 0o640);
        assert_eq!(e.svc.open_uploads(), 0);
        no_staging(&e.root);
        // The id is gone once committed.
        let err = e
            .svc
            .write_inline(7, chunk(&p, &id, 0, b"x", false))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    async fn start(e: &Env, session: u64, p: &str, mode: WriteMode) -> String {
        e.svc
            .write_inline(
                session,
                FileWriteParams {
                    mode,
                    more: true,
                    ..wp(p, "abc")
                },
            )
            .await
            .unwrap()
            .upload_id
            .unwrap()
    }

    #[tokio::test]
    async fn uploads_belong_to_their_session_and_end_with_it() {
        let e = env();
        let p = format!("{}/s", e.root);
        let id = start(&e, 1, &p, WriteMode::Truncate).await;
        let err = e
            .svc
            .write_inline(2, chunk(&p, &id, 3, b"x", false))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        // Still open for its own session.
        assert_eq!(e.svc.open_uploads(), 1);
        e.svc.end_session(2);
        assert_eq!(staging_files(Path::new(&e.root)).unwrap().len(), 1);
        e.svc.end_session(1);
        assert_eq!(e.svc.open_uploads(), 0);
        no_staging(&e.root);
        assert!(!Path::new(&p).exists());
        let err = e
            .svc
            .write_inline(1, chunk(&p, &id, 3, b"x", false))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        // abort_all ends every session's uploads.
        start(&e, 3, &p, WriteMode::Truncate).await;
        start(&e, 4, &format!("{p}2"), WriteMode::Truncate).await;
        e.svc.abort_all();
        assert_eq!(e.svc.open_uploads(), 0);
        no_staging(&e.root);
    }

    #[tokio::test]
    async fn failed_chunks_abort_the_upload() {
        let e = env_with(10);
        let p = format!("{}/a", e.root);
        for bad in [
            chunk(&p, "", 8, b"xyz", true),                         // too large
            chunk(&format!("{}/other", e.root), "", 3, b"x", true), // other path
            FileWriteParams {
                offset: None,
                ..chunk(&p, "", 3, b"x", true)
            },
        ] {
            let id = start(&e, 1, &p, WriteMode::Truncate).await;
            let err = e
                .svc
                .write_inline(
                    1,
                    FileWriteParams {
                        upload_id: Some(id.clone()),
                        ..bad
                    },
                )
                .await
                .unwrap_err();
            assert_ne!(err.kind(), ErrorKind::NotFound, "{err}");
            assert_eq!(e.svc.open_uploads(), 0);
            no_staging(&e.root);
        }
        assert!(!Path::new(&p).exists());
    }

    #[tokio::test]
    async fn create_new_upload_refuses_an_existing_name_at_commit() {
        let e = env();
        let p = format!("{}/cn", e.root);
        let id = start(&e, 1, &p, WriteMode::CreateNew).await;
        std::fs::write(&p, "raced").unwrap();
        let err = e
            .svc
            .write_inline(1, chunk(&p, &id, 3, b"d", false))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "raced");
        no_staging(&e.root);
        // Refused up front when the name already exists.
        let err = e
            .svc
            .write_inline(
                1,
                FileWriteParams {
                    mode: WriteMode::CreateNew,
                    more: true,
                    ..wp(&p, "abc")
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    }

    fn staging_count(dir: &str) -> usize {
        staging_files(Path::new(dir)).unwrap().len()
    }

    #[tokio::test]
    async fn idle_uploads_expire_and_chunks_keep_them_alive() {
        let timeout = Duration::from_millis(300);
        let e = env_expiring(timeout);
        let p = format!("{}/slow.bin", e.root);
        let id = start(&e, 1, &p, WriteMode::Truncate).await;
        // A chunk every 100 ms keeps the upload alive past the timeout.
        for i in 0..5u64 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            e.svc
                .write_inline(1, chunk(&p, &id, 3 + i, b"x", true))
                .await
                .unwrap_or_else(|err| panic!("chunk {i}: {err}"));
        }
        assert_eq!(e.svc.open_uploads(), 1);
        // Then silence: the upload is aborted and its staging file deleted,
        // by its own timer (nothing else happens meanwhile).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while e.svc.open_uploads() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(e.svc.open_uploads(), 0);
        assert_eq!(staging_count(&e.root), 0);
        let err = e
            .svc
            .write_inline(1, chunk(&p, &id, 8, b"late", false))
            .await
            .unwrap_err();
        assert!(matches!(err, FileError::UnknownUpload { .. }), "{err}");
        assert!(!Path::new(&p).exists());
    }

    #[tokio::test]
    async fn a_new_upload_expires_idle_ones_before_counting_slots() {
        // The test runtime has one thread: while this test blocks it, no
        // expiry task can run, so only the check at the start of an upload
        // can free the slots.
        let e = env_expiring(Duration::from_millis(100));
        for i in 0..MAX_UPLOADS {
            start(&e, 1, &format!("{}/u{i}", e.root), WriteMode::Truncate).await;
        }
        assert_eq!(staging_count(&e.root), MAX_UPLOADS);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(e.svc.open_uploads(), MAX_UPLOADS);
        let id = start(&e, 2, &format!("{}/fresh", e.root), WriteMode::Truncate).await;
        assert_eq!(e.svc.open_uploads(), 1);
        assert_eq!(staging_count(&e.root), 1);
        e.svc
            .write_inline(2, chunk(&format!("{}/fresh", e.root), &id, 3, b"", false))
            .await
            .unwrap();
        no_staging(&e.root);
    }

    #[tokio::test]
    async fn a_finished_upload_leaves_no_timer_behind() {
        let e = env_expiring(Duration::from_secs(3600));
        let p = format!("{}/quick.bin", e.root);
        let id = start(&e, 1, &p, WriteMode::Truncate).await;
        let handle = tokio::runtime::Handle::current();
        assert_eq!(handle.metrics().num_alive_tasks(), 1);
        e.svc
            .write_inline(1, chunk(&p, &id, 3, b"", false))
            .await
            .unwrap();
        // The expiry task saw its upload go and ended.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while handle.metrics().num_alive_tasks() > 0 && std::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        assert_eq!(handle.metrics().num_alive_tasks(), 0);
        let id = start(&e, 1, &p, WriteMode::Truncate).await;
        assert!(!id.is_empty());
        e.svc.end_session(1);
        while handle.metrics().num_alive_tasks() > 0 && std::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        assert_eq!(handle.metrics().num_alive_tasks(), 0);
    }

    #[test]
    fn staging_names_table() {
        let hex = "0123456789abcdef0123456789abcdef";
        let long = "n".repeat(250);
        let cases: &[(String, Option<&[u8]>, bool)] = &[
            (format!(".a.txt.kvmtmp-{hex}"), None, true),
            (format!(".a.txt.kvmtmp-{hex}"), Some(b"a.txt"), true),
            (format!(".a.txt.kvmtmp-{hex}"), Some(b"b.txt"), false),
            (format!("..kvmtmp-{hex}"), None, false),
            (format!("a.txt.kvmtmp-{hex}"), None, false),
            (format!(".a.txt.kvmtmp-{}", hex.to_uppercase()), None, false),
            (format!(".a.txt.kvmtmp-{}", &hex[1..]), None, false),
            (format!(".a.txt.kvmtmp-{hex}0"), None, false),
            (format!(".a.txt.kvmtmp-{hex}.x"), None, false),
            (".a.txt.kvmtmp-".to_owned(), None, false),
            (
                format!(".{}.kvmtmp-{hex}", "n".repeat(200)),
                Some(long.as_bytes()),
                true,
            ),
        ];
        for (name, prefix, want) in cases {
            assert_eq!(
                is_staging_name(name.as_bytes(), *prefix),
                *want,
                "{name} {prefix:?}"
            );
        }
    }

    #[test]
    fn the_staging_sweep_removes_only_the_agents_staging_files_and_follows_no_link() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        let hex = "00112233445566778899aabbccddeeff";
        let root = b.join("root");
        let outside = b.join("outside");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let stale = |d: &Path, n: &str| {
            let p = d.join(format!(".{n}.kvmtmp-{hex}"));
            std::fs::write(&p, "stale").unwrap();
            p
        };
        let gone = [stale(&root, "x"), stale(&root.join("a/b"), "y")];
        let kept = [
            stale(&outside, "z"),
            stale(&root, "users"),
            stale(b, "other-file"),
        ];
        std::os::unix::fs::chown(&kept[1], Some(1000), Some(1000)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/link")).unwrap();
        // A file root: its own staging files beside it go, others stay.
        let file_root = b.join("single.txt");
        let beside = stale(b, "single.txt");
        let mut config = Config::default();
        config.security.allowed_write_paths = vec![root.clone(), root.join("a"), file_root];
        let sweep = remove_stale_staging(&config);
        for p in gone.iter().chain([&beside]) {
            assert!(!p.exists(), "{} was left", p.display());
        }
        for p in &kept {
            assert!(p.exists(), "{} was removed", p.display());
        }
        assert_eq!(sweep.removed.len(), 3, "{:?}", sweep.removed);
        assert!(!sweep.truncated);
        assert!(sweep
            .removed
            .contains(&format!("{}/.x.kvmtmp-{hex}", root.display())));
    }

    #[tokio::test]
    async fn too_many_uploads_is_busy() {
        let e = env();
        for i in 0..MAX_UPLOADS {
            start(&e, 1, &format!("{}/u{i}", e.root), WriteMode::Truncate).await;
        }
        let err = e
            .svc
            .write_inline(
                1,
                FileWriteParams {
                    more: true,
                    ..wp(&format!("{}/one-more", e.root), "x")
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Busy);
        e.svc.end_session(1);
        no_staging(&e.root);
    }

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
