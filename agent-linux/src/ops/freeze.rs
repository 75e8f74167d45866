//! `fs_freeze`, `fs_thaw` and `fs_freeze_status`.
//!
//! # Order
//!
//! Filesystems are frozen in **reverse mount order** (the one mounted last
//! first) and thawed in mount order, as qemu-ga does. A filesystem mounted
//! on or from another (a child mount, or an image file loop-mounted from a
//! file of its parent) is mounted after it; freezing it first lets it write
//! back what it still holds while its parent can still take writes. Frozen
//! the other way round, the child's write-back into the frozen parent would
//! wait for a thaw that never comes. Thawing parents first lets the child's
//! pending writes land at once.
//!
//! # State
//!
//! One freeze at a time: `fs_freeze` and `fs_thaw` take turns (a thaw sent
//! while a freeze is being set up waits for it, then thaws). The frozen
//! filesystems' descriptors are kept, and thawed through, so a thaw acts on
//! exactly what was frozen. A freeze ends by itself: a timer started with
//! the first `FIFREEZE` thaws everything after `freeze_timeout_seconds`,
//! and `fs_freeze_status` then says `last_thaw: timeout`. The agent also
//! thaws when it stops. An `fs_thaw` when the agent holds nothing frozen
//! (it was restarted while frozen) tries `FITHAW` on every local
//! filesystem, and reports those that were frozen.
//!
//! While frozen, the agent writes nothing to any filesystem: requests that
//! could (every method that changes the guest, except `fs_thaw`) answer
//! `frozen` at once (in `dispatch`), and log lines wait in memory (bounded)
//! until the thaw ([`crate::logging::hold`]).
//!
//! # Hooks
//!
//! Before freezing, every hook in `fsfreeze_hook_dir` runs with the
//! argument `freeze`, in name order; after thawing, with `thaw`, in the
//! same order (qemu-ga's `fsfreeze-hook.d` convention). A hook is a regular
//! file (not a link), executable, owned by root (or the agent's user) and
//! not writable by group or others, in a directory that is owned so and not
//! writable by group or others; names starting with `.` or ending in `~` or
//! holding `.dpkg-` or `.rpm` are skipped, as are unsafe hooks (with a
//! warning). Each runs for at most [`HOOK_TIMEOUT`]; its exit status and
//! output are logged. A `freeze` hook that fails (non-zero, killed, timed
//! out) aborts the freeze: the hooks that ran before it run with `thaw`,
//! and nothing is frozen. A failing `thaw` hook is logged only.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_common::error::ErrorKind;
use agent_common::methods::{
    FreezeStatus, FsFreezeParams, FsFreezeResult, FsFreezeStatusResult, FsThawResult, ThawReason,
};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::mounts::{self, Mount, SelectError};
use crate::config::Config;
use crate::error::{io_error_kind, RpcError};
use crate::sys;

/// Longest a freeze or thaw hook may run before its process group is killed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a freeze or thaw failed.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// The mount points asked for cannot be frozen.
    #[error(transparent)]
    Select(#[from] SelectError),
    /// No filesystem qualifies.
    #[error("there is no local, writable filesystem on a block device to freeze")]
    NothingToFreeze,
    /// A freeze is already in force.
    #[error("filesystems are already frozen ({0}); call fs_thaw first")]
    AlreadyFrozen(String),
    /// The mount table could not be read.
    #[error("cannot read the mount table")]
    Mounts(#[source] io::Error),
    /// A `freeze` hook failed: nothing was frozen.
    #[error("fsfreeze hook {hook} {outcome}; nothing was frozen")]
    Hook {
        /// The hook.
        hook: String,
        /// What it did (`exited with status 1: <stderr>`).
        outcome: String,
    },
    /// `FIFREEZE` failed on a filesystem; those frozen before it were thawed.
    #[error(
        "cannot freeze {mount_point} (the {thawed} filesystem(s) frozen before it were thawed)"
    )]
    Freeze {
        /// The filesystem that failed.
        mount_point: String,
        /// How many were frozen, then thawed, before it.
        thawed: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A worker thread failed.
    #[error("the freeze worker thread failed")]
    Worker,
}

impl RpcError for FreezeError {
    fn kind(&self) -> ErrorKind {
        match self {
            FreezeError::Select(_) => ErrorKind::InvalidParams,
            FreezeError::NothingToFreeze => ErrorKind::NotFound,
            FreezeError::AlreadyFrozen(_) => ErrorKind::Frozen,
            FreezeError::Mounts(e) => io_error_kind(e),
            FreezeError::Hook { .. } => ErrorKind::IoError,
            FreezeError::Freeze { source, .. } => match source.raw_os_error() {
                Some(libc::EOPNOTSUPP) => ErrorKind::NotSupported,
                _ => io_error_kind(source),
            },
            FreezeError::Worker => ErrorKind::InternalError,
        }
    }

    fn data(&self) -> Vec<(&'static str, Value)> {
        match self {
            FreezeError::Select(SelectError::NotMounted(m))
            | FreezeError::Select(SelectError::Unsuitable { mount_point: m, .. })
            | FreezeError::Freeze { mount_point: m, .. } => {
                vec![("mount_point", m.as_str().into())]
            }
            FreezeError::Hook { hook, .. } => vec![("hook", hook.as_str().into())],
            _ => Vec::new(),
        }
    }
}

/// Freeze state: at most one freeze, its descriptors and its timer.
pub struct FreezeService {
    timeout: Duration,
    hook_dir: Option<PathBuf>,
    /// Serialises freeze and thaw.
    turn: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    /// Set before the first `FIFREEZE`, cleared after the last `FITHAW`:
    /// while set, requests that could write answer `frozen`.
    frozen: AtomicBool,
    /// Woken when `frozen` is cleared.
    thaw_notify: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    frozen: Option<Frozen>,
    last_thaw: Option<ThawReason>,
}

struct Frozen {
    /// Mount points and a descriptor on each, in freeze order.
    mounts: Vec<(String, File)>,
    deadline: Instant,
    timer: CancellationToken,
}

impl FreezeService {
    /// The service for `config` (`freeze_timeout_seconds`, `fsfreeze_hook_dir`).
    pub fn new(config: &Config) -> Arc<FreezeService> {
        Arc::new(FreezeService {
            timeout: config.freeze_timeout,
            hook_dir: config.fsfreeze_hook_dir.clone(),
            turn: tokio::sync::Mutex::new(()),
            state: Mutex::new(State::default()),
            frozen: AtomicBool::new(false),
            thaw_notify: tokio::sync::Notify::new(),
        })
    }

    /// True while filesystems are (being) frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Returns once nothing is frozen.
    pub async fn thawed(&self) {
        loop {
            let woken = self.thaw_notify.notified();
            if !self.is_frozen() {
                return;
            }
            woken.await;
        }
    }

    fn clear_frozen(&self) {
        self.frozen.store(false, Ordering::SeqCst);
        crate::logging::hold(false);
        self.thaw_notify.notify_waiters();
    }

    /// Sets the frozen flag alone (nothing is frozen): for the dispatch
    /// tests of the `frozen` refusals. Compiled into tests only.
    #[cfg(test)]
    pub(crate) fn pretend_frozen(&self, on: bool) {
        self.frozen.store(on, Ordering::SeqCst);
        if !on {
            self.thaw_notify.notify_waiters();
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is only ever replaced field by field: a panic elsewhere
        // leaves it valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seconds left before the agent thaws by itself, when frozen.
    pub fn remaining_seconds(&self) -> Option<u64> {
        let state = self.state();
        let f = state.frozen.as_ref()?;
        let left = f.deadline.saturating_duration_since(Instant::now());
        Some(left.as_secs() + u64::from(left.subsec_nanos() > 0))
    }

    /// `fs_freeze_status`.
    pub fn status(&self) -> FsFreezeStatusResult {
        let remaining_seconds = self.remaining_seconds();
        let state = self.state();
        let mount_points: Vec<String> = state
            .frozen
            .iter()
            .flat_map(|f| f.mounts.iter().map(|(m, _)| m.clone()))
            .collect();
        FsFreezeStatusResult {
            status: if state.frozen.is_some() {
                FreezeStatus::Frozen
            } else {
                FreezeStatus::Thawed
            },
            mount_points,
            remaining_seconds,
            timeout_seconds: self.timeout.as_secs(),
            last_thaw: state.last_thaw,
        }
    }

    /// `fs_freeze`.
    pub async fn freeze(
        self: &Arc<Self>,
        p: FsFreezeParams,
    ) -> Result<FsFreezeResult, FreezeError> {
        let _turn = self.turn.lock().await;
        if let Some(f) = &self.state().frozen {
            let names: Vec<&str> = f.mounts.iter().map(|(m, _)| m.as_str()).collect();
            return Err(FreezeError::AlreadyFrozen(names.join(", ")));
        }
        let wanted = p.mount_points;
        let chosen = blocking(move || {
            let all = mounts::read_mounts().map_err(FreezeError::Mounts)?;
            let chosen = mounts::select(&all, wanted.as_deref())?;
            if chosen.is_empty() {
                return Err(FreezeError::NothingToFreeze);
            }
            Ok(chosen)
        })
        .await?;
        let hooks = self.hooks().await;
        let mut ran: Vec<PathBuf> = Vec::new();
        for hook in &hooks {
            if let Err(outcome) = run_hook(hook, "freeze").await {
                // Undo what the hooks before it did.
                for done in ran.iter().rev() {
                    let _ = run_hook(done, "thaw").await;
                }
                return Err(FreezeError::Hook {
                    hook: hook.display().to_string(),
                    outcome,
                });
            }
            ran.push(hook.clone());
        }
        let names: Vec<String> = chosen.iter().rev().map(|m| m.mount_point.clone()).collect();
        info!(mount_points = ?names, timeout_seconds = self.timeout.as_secs(), "freezing filesystems");
        // From here nothing may be written: log lines wait in memory.
        self.frozen.store(true, Ordering::SeqCst);
        crate::logging::hold(true);
        let deadline = Instant::now() + self.timeout;
        match blocking(move || freeze_in_order(&chosen)).await {
            Ok(frozen) => {
                let timer = CancellationToken::new();
                let result = FsFreezeResult {
                    frozen: frozen.iter().map(|(m, _)| m.clone()).collect(),
                    timeout_seconds: self.timeout.as_secs(),
                    hooks: ran.iter().map(|h| h.display().to_string()).collect(),
                };
                self.state().frozen = Some(Frozen {
                    mounts: frozen,
                    deadline,
                    timer: timer.clone(),
                });
                let svc = Arc::downgrade(self);
                tokio::spawn(async move {
                    tokio::select! {
                        () = timer.cancelled() => {}
                        () = tokio::time::sleep_until(deadline) => {
                            if let Some(svc) = svc.upgrade() {
                                warn!("freeze_timeout_seconds passed: thawing by itself");
                                let _ = svc.thaw(ThawReason::Timeout).await;
                            }
                        }
                    }
                });
                info!(mount_points = ?result.frozen, "filesystems frozen");
                Ok(result)
            }
            Err(e) => {
                self.clear_frozen();
                warn!(error = %crate::error::chain(&e), "freeze failed; thawed what was frozen");
                for hook in ran.iter() {
                    let _ = run_hook(hook, "thaw").await;
                }
                Err(e)
            }
        }
    }

    /// `fs_thaw` (and the timer's, and the agent's at exit).
    pub async fn thaw(&self, reason: ThawReason) -> Result<FsThawResult, FreezeError> {
        let _turn = self.turn.lock().await;
        let frozen = self.state().frozen.take();
        let thawed = match frozen {
            Some(f) => {
                f.timer.cancel();
                blocking(move || Ok(thaw_in_order(f.mounts))).await?
            }
            // Nothing recorded: only a host's request looks for filesystems
            // frozen by an earlier agent (or by hand).
            None if reason == ThawReason::Request => blocking(thaw_every_local).await?,
            None => {
                return Ok(FsThawResult {
                    thawed: Vec::new(),
                    hooks: Vec::new(),
                })
            }
        };
        self.clear_frozen();
        if thawed.is_empty() {
            return Ok(FsThawResult {
                thawed,
                hooks: Vec::new(),
            });
        }
        self.state().last_thaw = Some(reason);
        info!(mount_points = ?thawed, ?reason, "filesystems thawed");
        let mut hooks = Vec::new();
        for hook in self.hooks().await {
            // A failing thaw hook is logged (by run_hook) and otherwise ignored.
            let _ = run_hook(&hook, "thaw").await;
            hooks.push(hook.display().to_string());
        }
        Ok(FsThawResult { thawed, hooks })
    }

    /// The hooks to run, in name order.
    async fn hooks(&self) -> Vec<PathBuf> {
        let Some(dir) = self.hook_dir.clone() else {
            return Vec::new();
        };
        tokio::task::spawn_blocking(move || list_hooks(&dir))
            .await
            .unwrap_or_default()
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FreezeError> + Send + 'static,
) -> Result<T, FreezeError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(FreezeError::Worker))
}

/// `(major, minor)` of a `st_dev`, as glibc's `major()`/`minor()`.
pub(crate) fn dev_numbers(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    (major as u32, minor as u32)
}

/// Opens a mount point, checking it still is the filesystem the mount
/// table named.
pub(crate) fn open_mount(m: &Mount) -> io::Result<File> {
    let f = File::open(&m.mount_point)?;
    let dev = f.metadata()?.dev();
    if dev_numbers(dev) != (m.major, m.minor) {
        return Err(io::Error::other(format!(
            "{} is no longer the filesystem {}:{} (mounted over meanwhile)",
            m.mount_point, m.major, m.minor
        )));
    }
    Ok(f)
}

/// Freezes `chosen` (in mount order) last first; on a failure thaws those
/// frozen and names the one that failed.
fn freeze_in_order(chosen: &[Mount]) -> Result<Vec<(String, File)>, FreezeError> {
    let mut frozen: Vec<(String, File)> = Vec::new();
    for m in chosen.iter().rev() {
        let done = open_mount(m).and_then(|f| sys::fifreeze(f.as_fd()).map(|()| f));
        match done {
            Ok(f) => frozen.push((m.mount_point.clone(), f)),
            Err(source) => {
                let thawed = thaw_in_order(frozen).len();
                return Err(FreezeError::Freeze {
                    mount_point: m.mount_point.clone(),
                    thawed,
                    source,
                });
            }
        }
    }
    Ok(frozen)
}

/// Thaws `frozen` (in freeze order) the other way round: parents first.
/// `EINVAL` means someone else thawed it already: it counts as thawed.
fn thaw_in_order(frozen: Vec<(String, File)>) -> Vec<String> {
    let mut thawed = Vec::new();
    for (mount_point, f) in frozen.into_iter().rev() {
        match sys::fithaw(f.as_fd()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => warn!(%mount_point, error = %e, "could not thaw"),
        }
        thawed.push(mount_point);
    }
    thawed
}

/// `FITHAW` on every local filesystem; those that were frozen.
fn thaw_every_local() -> Result<Vec<String>, FreezeError> {
    let all = mounts::read_mounts().map_err(FreezeError::Mounts)?;
    let mut thawed = Vec::new();
    for m in mounts::select(&all, None)? {
        let Ok(f) = open_mount(&m) else { continue };
        match sys::fithaw(f.as_fd()) {
            Ok(()) => thawed.push(m.mount_point),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => warn!(mount_point = %m.mount_point, error = %e, "could not thaw"),
        }
    }
    Ok(thawed)
}

/// True for a name `run-parts` would skip.
fn skipped_name(name: &str) -> bool {
    name.starts_with('.') || name.ends_with('~') || name.contains(".dpkg-") || name.contains(".rpm")
}

/// Owned by root or the agent's user, not writable by group or others.
fn trusted(meta: &std::fs::Metadata) -> bool {
    (meta.uid() == 0 || meta.uid() == sys::geteuid()) && meta.permissions().mode() & 0o022 == 0
}

/// The hooks of `dir`, in name order; none if it does not exist.
pub fn list_hooks(dir: &Path) -> Vec<PathBuf> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot read the fsfreeze hook directory");
            return Vec::new();
        }
    };
    if !meta.is_dir() || !trusted(&meta) {
        warn!(dir = %dir.display(), "fsfreeze hook directory is not a directory owned by root and writable only by its owner; no hook runs");
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut hooks: Vec<PathBuf> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if skipped_name(name) {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            continue;
        }
        if !trusted(&meta) {
            warn!(hook = %path.display(), "fsfreeze hook skipped: not owned by root or writable by others");
            continue;
        }
        hooks.push(path);
    }
    hooks.sort();
    hooks
}

/// Runs one hook with `arg`; logs what it did. `Err` describes a failure.
async fn run_hook(hook: &Path, arg: &str) -> Result<(), String> {
    let out = crate::exec::run_helper(hook, &[arg], None, HOOK_TIMEOUT).await;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    let outcome = match out {
        Err(e) => Err(format!("could not be started: {e}")),
        Ok(o) => {
            let stdout = text(&o.stdout);
            let stderr = text(&o.stderr);
            let status = match o.status {
                None => format!(
                    "ran out of time ({} s) and was killed",
                    HOOK_TIMEOUT.as_secs()
                ),
                Some(s) => s.to_string(),
            };
            info!(hook = %hook.display(), arg, %status, %stdout, %stderr, "fsfreeze hook ran");
            match o.status {
                Some(s) if s.success() => Ok(()),
                _ if stderr.is_empty() => Err(status),
                _ => Err(format!("{status}: {stderr}")),
            }
        }
    };
    if let Err(e) = &outcome {
        warn!(hook = %hook.display(), arg, error = %e, "fsfreeze hook failed");
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(hook_dir: Option<PathBuf>, timeout: Duration) -> Arc<FreezeService> {
        FreezeService::new(&Config {
            freeze_timeout: timeout,
            fsfreeze_hook_dir: hook_dir,
            ..Config::default()
        })
    }

    #[test]
    fn device_numbers_split_like_glibc() {
        assert_eq!(dev_numbers(0x0801), (8, 1));
        assert_eq!(dev_numbers((259 << 8) | 3), (259, 3));
        // Large numbers spill into the high bits (glibc's makedev).
        let (major, minor) = (0x10007u64, 0x100005u64);
        let dev = (minor & 0xff)
            | ((major & 0xfff) << 8)
            | ((minor & !0xff) << 12)
            | ((major & !0xfff) << 32);
        assert_eq!(dev_numbers(dev), (0x10007, 0x100005));
    }

    #[test]
    fn hook_names_and_owners_are_checked() {
        for n in [".hidden", "x~", "a.dpkg-old", "b.rpmnew"] {
            assert!(skipped_name(n), "{n}");
        }
        assert!(!skipped_name("10-db"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let write = |name: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("20-b", 0o755);
        write("10-a", 0o700);
        write("30-not-executable", 0o644);
        write("40-world-writable", 0o777);
        write(".50-hidden", 0o755);
        std::os::unix::fs::symlink("/bin/true", dir.path().join("60-link")).unwrap();
        let hooks = list_hooks(dir.path());
        let names: Vec<_> = hooks.iter().map(|h| h.file_name().unwrap()).collect();
        assert_eq!(names, ["10-a", "20-b"]);
        assert!(list_hooks(&dir.path().join("missing")).is_empty());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            list_hooks(dir.path()).is_empty(),
            "a writable directory runs nothing"
        );
    }

    #[tokio::test]
    async fn waiters_for_the_thaw_wake_when_it_comes() {
        let svc = service(None, Duration::from_secs(60));
        svc.thawed().await;
        svc.pretend_frozen(true);
        let waiter = tokio::spawn({
            let svc = svc.clone();
            async move { svc.thawed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        svc.pretend_frozen(false);
        // Hang guard only.
        tokio::time::timeout(Duration::from_secs(60), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn explicit_mount_points_are_checked_before_anything_runs() {
        let svc = service(None, Duration::from_secs(60));
        let cases = [
            (vec![], ErrorKind::InvalidParams),
            (vec!["/proc".to_owned()], ErrorKind::InvalidParams),
            (vec!["/no/such/mount".to_owned()], ErrorKind::InvalidParams),
        ];
        for (list, kind) in cases {
            let e = svc
                .freeze(FsFreezeParams {
                    mount_points: Some(list.clone()),
                })
                .await
                .unwrap_err();
            assert_eq!(e.kind(), kind, "{list:?}: {e}");
            assert!(!svc.is_frozen());
        }
    }
}
