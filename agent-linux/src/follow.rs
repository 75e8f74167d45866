//! Log follow (`follow_log`; PROTOCOL.md): a file beneath
//! `security.allowed_read_paths` followed as it grows, with `tail -F`'s
//! rules, its lines carried by a stream (`crate::streams`).
//!
//! The file is opened through the path policy, then checked whenever its
//! folder changes (inotify on the folder: an append or a truncation is a
//! change of an entry, and so are rotations; [`POLL`] where the folder
//! cannot be watched): new bytes are read (as far as the host's credit
//! allows: a host that stops reading stops the reading), a file shorter
//! than what was read (truncated) is read again from its start, and a path
//! that now names another file (rotated) is switched to once the old file
//! has been read to its end; a path that is gone is waited for. No timer
//! runs while the file does not change. The first lines sent are the last
//! `lines` of the file. A `filter` keeps the lines that contain it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent_common::error::ErrorKind;
use agent_common::methods::{FollowLogParams, FollowLogResult};
use bytes::Bytes;
use nix::sys::inotify::AddWatchFlags;

use crate::config::Config;
use crate::dirwatch::{DirWatch, ENTRY_CHANGES};
use crate::error::RpcError;
use crate::policy::{PathPolicy, PolicyError};
use crate::session::Session;
use crate::streams::{host_window, spawn_sender, Stream, StreamError};

/// How often a followed file is checked where its folder cannot be
/// watched (no inotify, or no watch left).
pub const POLL: Duration = Duration::from_millis(250);

/// Files switched to in one read of a follow (a path replaced again and
/// again must not keep the read going).
const MAX_SWITCHES: usize = 8;

/// What wakes a follow: entries of the folder created, removed, renamed,
/// written or truncated.
const FOLDER_CHANGES: AddWatchFlags = ENTRY_CHANGES.union(AddWatchFlags::IN_MODIFY);

/// The most lines `lines` may ask for.
pub const MAX_LINES: u32 = 10_000;

/// How far back the last lines are looked for.
const TAIL_SCAN: u64 = 1 << 20;

/// A line longer than this is sent in pieces of this size.
const MAX_LINE: usize = 64 * 1024;

/// Why a follow could not start.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The params are invalid.
    #[error("invalid follow_log request: {reason}")]
    Invalid {
        /// Why.
        reason: String,
    },
    /// The path policy refused, or the file cannot be opened.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Reading the file failed.
    #[error("reading {path} failed")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The stream could not be opened.
    #[error(transparent)]
    Stream(#[from] StreamError),
}

impl RpcError for FollowError {
    fn kind(&self) -> ErrorKind {
        match self {
            FollowError::Invalid { .. } => ErrorKind::InvalidParams,
            FollowError::Policy(e) => e.kind(),
            FollowError::Read { source, .. } => crate::error::io_error_kind(source),
            FollowError::Stream(e) => e.kind(),
        }
    }
}

/// Splits bytes into lines, keeps those the filter matches, and holds a
/// partial last line (bounded) until its end comes.
#[derive(Debug, Default)]
struct Lines {
    filter: Option<Vec<u8>>,
    partial: Vec<u8>,
}

impl Lines {
    fn keep(&self, line: &[u8]) -> bool {
        match &self.filter {
            None => true,
            Some(f) => f.is_empty() || line.windows(f.len()).any(|w| w == f.as_slice()),
        }
    }

    /// The complete, matching lines of `data` (with what came before).
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        for piece in data.split_inclusive(|b| *b == b'\n') {
            self.partial.extend_from_slice(piece);
            if piece.ends_with(b"\n") || self.partial.len() >= MAX_LINE {
                if self.keep(&self.partial) {
                    out.extend_from_slice(&self.partial);
                }
                self.partial.clear();
            }
        }
    }
}

/// The last `n` matching lines of `data`, which may start mid-line (it
/// does when `cut`).
fn last_lines(data: &[u8], n: usize, cut: bool, lines: &Lines) -> Vec<u8> {
    let mut all: Vec<&[u8]> = data.split_inclusive(|b| *b == b'\n').collect();
    if cut && !all.is_empty() {
        all.remove(0);
    }
    // A last line without its newline yet is left for the follow.
    if all.last().is_some_and(|l| !l.ends_with(b"\n")) {
        all.pop();
    }
    let kept: Vec<&[u8]> = all.into_iter().filter(|l| lines.keep(l)).collect();
    kept[kept.len().saturating_sub(n)..].concat()
}

/// The followed file: its descriptor, identity and read offset.
struct Followed {
    file: File,
    id: (u64, u64),
    offset: u64,
}

fn identity(f: &File) -> std::io::Result<(u64, u64)> {
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// The device and inode of the followed path's folder, when a watch on
/// that folder sees the file's changes: `None` (so the follow polls) while
/// the path names nothing, or when it reaches its file through a symbolic
/// link into another folder.
fn folder_identity(path: &Path) -> Option<(u64, u64)> {
    let dir = path.parent()?;
    let file = std::fs::canonicalize(path).ok()?;
    if file.parent()? != std::fs::canonicalize(dir).ok()? {
        return None;
    }
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

/// What a follow waits on between reads: the followed path's folder,
/// watched with inotify, or a timer of [`POLL`] where it cannot be.
struct Wake {
    /// The followed path.
    path: PathBuf,
    /// The watch of its folder, and the folder's identity when the watch
    /// began.
    watch: Option<(DirWatch, (u64, u64))>,
}

impl Wake {
    fn new(path: &str) -> Wake {
        Wake {
            path: PathBuf::from(path),
            watch: None,
        }
    }

    /// Waits until the folder changes. `now` is the folder's identity as
    /// the last read found it: when that is not the watched folder (the
    /// first time, or the folder was replaced), a new watch begins and this
    /// returns at once, so the caller reads what came before it.
    async fn wait(&mut self, now: Option<(u64, u64)>) {
        if self.watch.as_ref().map(|(_, id)| *id) != now {
            // An identity means the path has a folder (folder_identity).
            let dir = self.path.parent();
            self.watch = now.zip(dir).and_then(|(id, dir)| {
                let w = DirWatch::new(&[dir], FOLDER_CHANGES).ok().flatten();
                w.map(|w| (w, id))
            });
            if self.watch.is_some() {
                return;
            }
        }
        match &mut self.watch {
            Some((w, _)) => w.changed().await,
            None => tokio::time::sleep(POLL).await,
        }
    }
}

/// `follow_log`: checks, opens the file, sends its last lines and leaves
/// the follow to a task of its own.
pub async fn start(
    config: &Config,
    session: &Session,
    p: FollowLogParams,
) -> Result<FollowLogResult, FollowError> {
    let credit = host_window(p.window).map_err(|reason| FollowError::Invalid { reason })?;
    let n = p.lines.unwrap_or(10);
    if n > MAX_LINES {
        return Err(FollowError::Invalid {
            reason: format!("lines must be at most {MAX_LINES}"),
        });
    }
    if p.filter.as_ref().is_some_and(|f| f.len() > 1024) {
        return Err(FollowError::Invalid {
            reason: "filter must be at most 1024 bytes".into(),
        });
    }
    let policy = Arc::new(PathPolicy::new(&config.security.allowed_read_paths));
    let path = p.path.clone();
    let lines = Lines {
        filter: p.filter.map(String::into_bytes),
        partial: Vec::new(),
    };
    let (followed, first, lines) = {
        let policy = policy.clone();
        let path = path.clone();
        tokio::task::spawn_blocking(move || -> Result<_, FollowError> {
            let mut file = policy.open_read(&path)?;
            let read_err = |source| FollowError::Read {
                path: path.clone(),
                source,
            };
            let size = file.metadata().map_err(read_err)?.len();
            let from = size.saturating_sub(TAIL_SCAN);
            file.seek(SeekFrom::Start(from)).map_err(read_err)?;
            let mut data = Vec::new();
            (&mut file)
                .take(size - from)
                .read_to_end(&mut data)
                .map_err(read_err)?;
            let first = last_lines(&data, n as usize, from > 0, &lines);
            // The follow starts after the last complete line.
            let done = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let id = identity(&file).map_err(read_err)?;
            let offset = from + done as u64;
            Ok((Followed { file, id, offset }, first, lines))
        })
        .await
        .map_err(|e| FollowError::Read {
            path: p.path.clone(),
            source: std::io::Error::other(e),
        })??
    };
    spawn_sender(session, p.stream, credit, |stream| {
        follow(stream, policy, path, followed, first, lines)
    })?;
    Ok(FollowLogResult { stream: p.stream })
}

/// Sends `data` as the host's credit allows.
async fn send_all(stream: &Stream, mut data: Vec<u8>) -> bool {
    while !data.is_empty() {
        let Ok(room) = stream.writable().await else {
            return false;
        };
        let rest = data.split_off(room.min(data.len()));
        if stream.send(Bytes::from(data)).await.is_err() {
            return false;
        }
        data = rest;
    }
    true
}

/// What one check of the file found.
enum Tick {
    /// New matching lines (maybe none).
    Lines(Vec<u8>),
    /// New matching lines (maybe none), and the path named yet another
    /// file after [`MAX_SWITCHES`]: check again without waiting.
    Again(Vec<u8>),
    /// The file cannot be read any more.
    Failed(String),
}

/// Reads what is new (at most a window's worth), switching files on
/// truncation and rotation (blocking: on the blocking pool). A file
/// switched to is read in the same call (nothing may announce its lines
/// again), up to [`MAX_SWITCHES`] files per call.
fn tick(
    policy: &PathPolicy,
    path: &str,
    f: &mut Option<Followed>,
    lines: &mut Lines,
    budget: usize,
) -> Tick {
    let mut out = Vec::new();
    let mut buf = vec![0u8; budget.clamp(4096, 256 * 1024)];
    for _ in 0..=MAX_SWITCHES {
        // Read the current file as far as it goes.
        if let Some(cur) = f.as_mut() {
            match cur.file.metadata() {
                Ok(m) if m.len() < cur.offset => {
                    // Truncated: from its start again.
                    cur.offset = 0;
                }
                Ok(_) => {}
                Err(e) => return Tick::Failed(e.to_string()),
            }
            if cur.file.seek(SeekFrom::Start(cur.offset)).is_err() {
                return Tick::Failed("seek failed".into());
            }
            while out.len() < budget {
                match cur.file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        cur.offset += k as u64;
                        lines.feed(&buf[..k], &mut out);
                    }
                    Err(e) => return Tick::Failed(e.to_string()),
                }
            }
            if out.len() >= budget {
                return Tick::Lines(out);
            }
        }
        // At the end of the current file: does the path name another one
        // now? Gone for now (rotated away, not yet created again): wait.
        let Ok(file) = policy.open_read(path) else {
            return Tick::Lines(out);
        };
        let Ok(id) = identity(&file) else {
            return Tick::Lines(out);
        };
        if f.as_ref().map(|c| c.id) == Some(id) {
            return Tick::Lines(out);
        }
        tracing::debug!(path, "followed file replaced; following the new one");
        lines.partial.clear();
        *f = Some(Followed {
            file,
            id,
            offset: 0,
        });
    }
    // A path replaced faster than it is read: the caller comes back at once.
    Tick::Again(out)
}

async fn follow(
    stream: Stream,
    policy: Arc<PathPolicy>,
    path: String,
    followed: Followed,
    first: Vec<u8>,
    lines: Lines,
) {
    if !send_all(&stream, first).await {
        return;
    }
    let mut state = Some((Some(followed), lines));
    let mut wake = Wake::new(&path);
    loop {
        // Only as much as the host may take now: a host that stops reading
        // stops the reading.
        let Ok(budget) = stream.writable().await else {
            return;
        };
        let Some((mut f, mut lines)) = state.take() else {
            return;
        };
        let (policy2, path2) = (policy.clone(), path.clone());
        let r = tokio::task::spawn_blocking(move || {
            let t = tick(&policy2, &path2, &mut f, &mut lines, budget);
            let folder = folder_identity(Path::new(&path2));
            (t, f, lines, folder)
        })
        .await;
        let Ok((t, f, lines, folder)) = r else { return };
        state = Some((f, lines));
        match t {
            Tick::Lines(out) if out.is_empty() => wake.wait(folder).await,
            Tick::Again(out) => {
                if !send_all(&stream, out).await {
                    return;
                }
                tokio::task::yield_now().await;
            }
            Tick::Lines(out) => {
                if !send_all(&stream, out).await {
                    return;
                }
            }
            Tick::Failed(e) => {
                tracing::warn!(path, error = %e, "a followed file cannot be read; ending the follow");
                let _ = stream.close().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_filtered_and_kept_whole() {
        let mut l = Lines {
            filter: Some(b"err".to_vec()),
            partial: Vec::new(),
        };
        let mut out = Vec::new();
        l.feed(b"ok 1\nerr 2\ner", &mut out);
        assert_eq!(out, b"err 2\n");
        l.feed(b"r 3\nfine\n", &mut out);
        assert_eq!(out, b"err 2\nerr 3\n");
        let all = Lines::default();
        assert_eq!(last_lines(b"a\nb\nc\nd", 2, false, &all), b"b\nc\n");
        assert_eq!(last_lines(b"tail of a\nb\n", 5, true, &all), b"b\n");
        assert_eq!(last_lines(b"a\nb\n", 0, false, &all), b"");
        assert_eq!(
            last_lines(b"x err\ny\nz err\n", 5, false, &l),
            b"x err\nz err\n"
        );
    }

    #[tokio::test]
    async fn a_follow_wakes_on_changes_of_its_folder_not_on_a_timer() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        std::fs::write(&log, b"one\n").unwrap();
        let mut wake = Wake::new(log.to_str().unwrap());
        let id = folder_identity(&log);
        assert!(id.is_some());
        // Reached through a link into another folder, or gone: polled.
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/real.log"), b"").unwrap();
        std::os::unix::fs::symlink("sub/real.log", dir.path().join("link.log")).unwrap();
        assert_eq!(folder_identity(&dir.path().join("link.log")), None);
        assert!(folder_identity(&dir.path().join("sub/real.log")).is_some());
        assert_eq!(folder_identity(&dir.path().join("gone.log")), None);
        // The first wait begins the watch and returns: the caller reads
        // what came before it.
        tokio::time::timeout(Duration::from_secs(5), wake.wait(id))
            .await
            .expect("a new watch returns at once");
        assert!(wake.watch.is_some(), "the folder is watched");
        // Nothing changes: no wake-up, not even after several POLLs.
        let idle = tokio::time::timeout(4 * POLL, wake.wait(id)).await;
        assert!(idle.is_err(), "woke up with nothing changed");
        // An append wakes it, then a truncation, then a rotation.
        for change in ["append", "truncate", "rotate"] {
            // What the previous change left queued (its close, say) is
            // taken first, so that only this change can wake the waiter.
            while tokio::time::timeout(Duration::from_millis(200), wake.wait(id))
                .await
                .is_ok()
            {}
            let waiter = tokio::spawn(async move {
                let mut wake = wake;
                wake.wait(id).await;
                wake
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            match change {
                "append" => {
                    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
                    f.write_all(b"two\n").unwrap();
                }
                "truncate" => std::fs::File::create(&log).map(drop).unwrap(),
                _ => std::fs::rename(&log, dir.path().join("app.log.1")).unwrap(),
            }
            wake = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .unwrap_or_else(|_| panic!("{change} not seen"))
                .unwrap();
        }
        // The folder gone: polled (no watch) until it comes back.
        drop(dir);
        tokio::time::timeout(Duration::from_secs(5), wake.wait(None))
            .await
            .expect("polled");
        assert!(wake.watch.is_none());
    }
}
