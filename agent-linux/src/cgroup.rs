//! Command containment: one cgroup v2 per `exec_command`.
//!
//! A process group ends where a descendant calls `setsid()` or `setpgid()`
//! (daemons, double forks). A cgroup does not: every descendant stays in its
//! parent's cgroup unless someone with write access to the hierarchy moves
//! it. So each command gets a cgroup of its own, killed as a whole on timeout,
//! at the end of the request and on cancellation, then removed.
//!
//! Layout (chosen once at start by [`init`]):
//! - The agent's own cgroup is the `0::` line of `/proc/self/cgroup`, under
//!   the first cgroup2 mount of `/proc/self/mountinfo` (normally
//!   `/sys/fs/cgroup`).
//! - Delegated cgroup (systemd `Delegate=yes`, e.g.
//!   `/system.slice/kvmmanager-agent.service`): the agent first moves itself
//!   into the leaf `<own>/agent` (cgroup v2 lets only leaves hold processes
//!   once controllers are enabled), enables the controllers the configured
//!   limits need in `<own>/cgroup.subtree_control`, and makes each command's
//!   cgroup as `<own>/exec-<agent pid>-<n>`.
//!   The root of a cgroup namespace (systemd `ProtectControlGroups=private`,
//!   where `/proc/self/cgroup` reads `0::/`) is treated the same way, and so
//!   is any other non-root cgroup the agent can write to (root started by
//!   hand in a login session): that works, but outside a delegated unit it
//!   changes a tree systemd considers its own.
//! - Root cgroup (a busybox initramfs guest whose `/init` mounted cgroup2):
//!   the agent stays in the root (exempt from the leaf rule) and makes the
//!   commands' cgroups under one directory, `/kvmmanager-agent/exec-<agent
//!   pid>-<n>`, so they are easy to find and never mix with the system's.
//!
//! Controllers (`memory`, `pids`) are enabled only when
//! `security.command_memory_max_mb` / `security.command_max_processes` ask
//! for them; killing needs none (`cgroup.kill` and `cgroup.freeze` are core
//! files). A limit whose controller is not available is reported as a warning
//! at start and left out of `get_agent_info`'s `limits`.
//!
//! Killing: `cgroup.kill` (Linux 5.14+) SIGKILLs every member at once, new
//! forks included. Older kernels: `cgroup.freeze` (frozen processes cannot
//! fork), then SIGKILL to each pid of `cgroup.procs`. Removal is `rmdir`,
//! retried, killing again between tries, for at most [`REMOVE_TIMEOUT`];
//! a cgroup still populated then is left with a warning. At start, the
//! cgroups of agents that are gone (SIGKILLed or crashed while commands
//! ran) are killed and removed.
//!
//! Where any step of the set-up fails (no cgroup2 mount, cgroup v1 only, no
//! write access, read-only cgroupfs) the agent falls back to the process
//! group alone and says so once, as a warning, at start; `get_agent_info`
//! reports `command_containment: "process_group"`. That commands in cgroups
//! really die whole is proven in the real-VM suite (`cargo xtask vm-test`,
//! check `exec-setsid-contained`), which fails on an agent without it.
//!
//! This module does plain file I/O on cgroupfs; it spawns nothing (that is
//! `exec`'s job) and holds no `unsafe`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Directory made under the root cgroup for the commands' cgroups when the
/// agent itself runs in the root cgroup.
pub const ROOT_PARENT: &str = "kvmmanager-agent";

/// Leaf the agent moves itself into inside a delegated cgroup.
pub const AGENT_LEAF: &str = "agent";

/// How long removing a command's cgroup may take (killing again between
/// tries) before it is left behind with a warning.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest pause between two removal tries.
const REMOVE_PAUSE_MAX: Duration = Duration::from_millis(50);

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/cgroup` has no cgroup v2 (`0::`) line: a cgroup v1 host.
    #[error("no cgroup v2 entry in /proc/self/cgroup (cgroup v1 only)")]
    NoUnifiedEntry,
    /// No cgroup2 filesystem is mounted.
    #[error("no cgroup2 filesystem mounted")]
    NotMounted,
    /// The agent's cgroup is not visible under the cgroup2 mount.
    #[error("cgroup {cgroup} is outside the cgroup2 mount at {mount}")]
    OutsideMount {
        /// The agent's cgroup path.
        cgroup: String,
        /// The mount point.
        mount: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be made.
    #[error("cannot create cgroup {path}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A value could not be written to a cgroup file.
    #[error("cannot write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Per-command controller limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommandLimits {
    /// `memory.max`, bytes.
    pub memory_max: Option<u64>,
    /// `pids.max`.
    pub pids_max: Option<u64>,
}

/// How a command's cgroup is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillMethod {
    /// Write `1` to `cgroup.kill` (Linux 5.14+).
    Kill,
    /// Freeze, then SIGKILL each pid of `cgroup.procs`.
    Freeze,
}

/// The containment in force for commands.
#[derive(Debug)]
pub enum Containment {
    /// Each command in a cgroup of its own.
    Cgroup(CommandCgroups),
    /// Only the process group (see the module docs for when).
    ProcessGroup {
        /// Why cgroups are not used.
        reason: String,
    },
}

impl Containment {
    /// The name reported in `get_agent_info` (`limits.command_containment`).
    pub fn name(&self) -> &'static str {
        match self {
            Containment::Cgroup(_) => "cgroup",
            Containment::ProcessGroup { .. } => "process_group",
        }
    }

    /// The per-command limits in force (none without cgroups).
    pub fn limits(&self) -> CommandLimits {
        match self {
            Containment::Cgroup(c) => c.limits,
            Containment::ProcessGroup { .. } => CommandLimits::default(),
        }
    }

    /// The command cgroups, if that is the containment.
    pub fn cgroups(&self) -> Option<&CommandCgroups> {
        match self {
            Containment::Cgroup(c) => Some(c),
            Containment::ProcessGroup { .. } => None,
        }
    }
}

static CONTAINMENT: OnceLock<Containment> = OnceLock::new();

/// Sets up command containment once per process (later calls return the
/// first result) and logs which containment is in force.
///
/// In a delegated cgroup this moves the whole agent into `<own>/agent`:
/// call it once at start, from the agent's `main`, never from tests.
pub fn init(wanted: CommandLimits) -> &'static Containment {
    CONTAINMENT.get_or_init(|| {
        let c = match setup(wanted) {
            Ok(c) => {
                tracing::info!(parent = %c.parent.display(), kill = ?c.kill, limits = ?c.limits,
                    "command containment: cgroup (every descendant of a command is killed with it)");
                Containment::Cgroup(c)
            }
            Err(e) => {
                let reason = crate::error::chain(&e);
                tracing::warn!(
                    %reason,
                    "command containment: process group only (descendants that call setsid() escape the kill)"
                );
                Containment::ProcessGroup { reason }
            }
        };
        if let Containment::Cgroup(c) = &c {
            if c.limits != wanted {
                tracing::warn!(wanted = ?wanted, in_force = ?c.limits,
                    "per-command limits not in force: their cgroup controller is not available");
            }
        }
        c
    })
}

/// The containment set up by [`init`], if it ran.
pub fn current() -> Option<&'static Containment> {
    CONTAINMENT.get()
}

/// The cgroup v2 path of the `0::` line of `/proc/<pid>/cgroup`.
pub fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim_end)
        .filter(|p| p.starts_with('/') && !p.ends_with(" (deleted)"))
}

/// A cgroup2 mount: the cgroup path at its root and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// Root of the mount inside the hierarchy (`/`, or deeper with cgroup
    /// namespaces or bind mounts).
    pub root: String,
    /// The mount point.
    pub point: PathBuf,
}

impl Cgroup2Mount {
    /// The directory of cgroup `path` under this mount, if visible there.
    pub fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let rel = if self.root == "/" {
            path.strip_prefix('/')?
        } else {
            let rest = path.strip_prefix(self.root.as_str())?;
            if !rest.is_empty() && !rest.starts_with('/') {
                return None;
            }
            rest.trim_start_matches('/')
        };
        if rel.split('/').any(|c| c == ".." || c == ".") {
            return None;
        }
        Some(if rel.is_empty() {
            self.point.clone()
        } else {
            self.point.join(rel)
        })
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                // Three octal digits: at most 0o777, which fits u16.
                let v = oct.iter().fold(0u16, |a, c| a * 8 + u16::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first cgroup2 mount listed in `/proc/self/mountinfo` text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<Cgroup2Mount> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mut f = pre.split(' ');
        let root = f.nth(3)?;
        let point = f.next()?;
        Some(Cgroup2Mount {
            root: unescape_mountinfo(root),
            point: PathBuf::from(unescape_mountinfo(point)),
        })
    })
}

/// Where the agent and its commands go, given the agent's cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The leaf the agent moves itself into (`None`: it stays where it is).
    pub agent_leaf: Option<PathBuf>,
    /// The directory holding the commands' cgroups.
    pub parent: PathBuf,
    /// Directories whose `cgroup.subtree_control` must enable the
    /// controllers, top down.
    pub enable_in: Vec<PathBuf>,
}

/// The layout for an agent in cgroup `own_dir` (`is_root`: the root of the
/// hierarchy). See the module docs.
pub fn layout(own_dir: &Path, is_root: bool) -> Layout {
    if is_root {
        let parent = own_dir.join(ROOT_PARENT);
        Layout {
            agent_leaf: None,
            enable_in: vec![own_dir.to_owned(), parent.clone()],
            parent,
        }
    } else {
        Layout {
            agent_leaf: Some(own_dir.join(AGENT_LEAF)),
            parent: own_dir.to_owned(),
            enable_in: vec![own_dir.to_owned()],
        }
    }
}

/// The controllers `wanted` needs, as `(name, wanted)`.
fn needed(wanted: CommandLimits) -> Vec<&'static str> {
    let mut v = Vec::new();
    if wanted.memory_max.is_some() {
        v.push("memory");
    }
    if wanted.pids_max.is_some() {
        v.push("pids");
    }
    v
}

/// The limits of `wanted` whose controller is in `enabled` (the text of a
/// `cgroup.subtree_control` or `cgroup.controllers` file).
pub fn limits_in_force(wanted: CommandLimits, enabled: &str) -> CommandLimits {
    let has = |c: &str| enabled.split_whitespace().any(|e| e == c);
    CommandLimits {
        memory_max: wanted.memory_max.filter(|_| has("memory")),
        pids_max: wanted.pids_max.filter(|_| has("pids")),
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The agent's own cgroup directory and whether it is the hierarchy's root.
pub fn own_cgroup() -> Result<(PathBuf, bool), CgroupError> {
    let text = read(Path::new("/proc/self/cgroup"))?;
    let own = unified_path(&text).ok_or(CgroupError::NoUnifiedEntry)?;
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    let mount = cgroup2_mount(&mountinfo).ok_or(CgroupError::NotMounted)?;
    let dir = mount.dir_of(own).ok_or_else(|| CgroupError::OutsideMount {
        cgroup: own.to_owned(),
        mount: mount.point.clone(),
    })?;
    // The root of a cgroup namespace (systemd's
    // `ProtectControlGroups=private`) also reads as `/`, but it is an
    // ordinary cgroup, bound by the leaf rule: only the real root has no
    // `cgroup.type`.
    let is_root = own == "/" && !dir.join("cgroup.type").exists();
    Ok((dir, is_root))
}

/// Does the set-up described in the module docs.
fn setup(wanted: CommandLimits) -> Result<CommandCgroups, CgroupError> {
    let (own_dir, is_root) = own_cgroup()?;
    let layout = layout(&own_dir, is_root);
    match &layout.agent_leaf {
        Some(leaf) => {
            mkdir(leaf)?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
        }
        None => mkdir(&layout.parent)?,
    }
    let controllers = needed(wanted);
    if !controllers.is_empty() {
        for dir in &layout.enable_in {
            let available = read(&dir.join("cgroup.controllers"))?;
            let value = controllers
                .iter()
                .filter(|c| available.split_whitespace().any(|a| a == **c))
                .map(|c| format!("+{c}"))
                .collect::<Vec<_>>()
                .join(" ");
            if value.is_empty() {
                break;
            }
            if let Err(e) = write(&dir.join("cgroup.subtree_control"), &value) {
                // EBUSY: processes other than the agent share its cgroup.
                tracing::warn!(error = %crate::error::chain(&e), "cannot enable cgroup controllers");
                break;
            }
        }
    }
    let enabled = read(&layout.parent.join("cgroup.subtree_control"))?;
    let cgroups = CommandCgroups::new(layout.parent, limits_in_force(wanted, &enabled))?;
    cgroups.remove_stale();
    Ok(cgroups)
}

/// The agent pid in a command cgroup's name (`exec-<pid>-<n>`).
pub fn owner_pid(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix("exec-")?.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Where the commands' cgroups are made and how they are killed.
#[derive(Debug)]
pub struct CommandCgroups {
    parent: PathBuf,
    kill: KillMethod,
    limits: CommandLimits,
    next: AtomicU64,
    /// Empty cgroups of finished commands, kept for the next ones: making
    /// and removing a cgroup per command was most of what containment
    /// added to an `exec_command` (measured in `cargo xtask bench`).
    free: Mutex<Vec<CommandCgroup>>,
}

/// Empty command cgroups kept for reuse.
const KEEP_FREE: usize = 4;

impl CommandCgroups {
    /// Commands' cgroups under `parent` (an existing cgroup directory whose
    /// `cgroup.subtree_control` already enables the controllers of
    /// `limits`). Checks that a child can be made and removed there.
    pub fn new(parent: PathBuf, limits: CommandLimits) -> Result<CommandCgroups, CgroupError> {
        let kill = if parent.join("cgroup.kill").exists() {
            KillMethod::Kill
        } else {
            KillMethod::Freeze
        };
        let c = CommandCgroups {
            parent,
            kill,
            limits,
            next: AtomicU64::new(0),
            free: Mutex::new(Vec::new()),
        };
        // A probe: mkdir and rmdir work here (not read-only, not refused).
        let probe = c.create()?;
        probe.remove_blocking();
        Ok(c)
    }

    /// Kills and removes the command cgroups of agents that are gone
    /// (killed with SIGKILL, or crashed, while commands ran): their
    /// commands have nobody to report to. Under systemd the unit's cgroup
    /// is emptied on restart anyway; in the root layout nothing else would.
    fn remove_stale(&self) {
        let Ok(entries) = fs::read_dir(&self.parent) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(owner_pid) else {
                continue;
            };
            // A live pid may be a reused one: left alone, harmlessly.
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            tracing::info!(cgroup = %entry.path().display(), "removing the cgroup of a command of a previous agent");
            CommandCgroup::at(entry.path(), self.kill).remove_blocking();
        }
    }

    /// Takes back the cgroup of a finished command (already SIGKILLed):
    /// kept for the next command when it is empty, else killed again and
    /// removed in the background. Never waits.
    pub fn recycle(&self, cg: CommandCgroup) {
        // Found empty by the kill at the command's end: nothing can have
        // entered since (only the agent puts processes in it), so no
        // second read of cgroup.events.
        let empty = cg.seen_empty.swap(false, Ordering::Relaxed) || cg.is_empty();
        if !cg.killed.load(Ordering::Relaxed) && empty {
            let mut free = self.lock_free();
            if free.len() < KEEP_FREE {
                free.push(cg);
                return;
            }
        }
        // Dropping it kills what is left and removes it off this thread.
        drop(cg);
    }

    fn lock_free(&self) -> std::sync::MutexGuard<'_, Vec<CommandCgroup>> {
        // A Vec push/pop cannot leave the list inconsistent on a panic.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The directory holding the commands' cgroups.
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// The limits every command's cgroup gets.
    pub fn limits(&self) -> CommandLimits {
        self.limits
    }

    /// An empty cgroup for one command, with the limits applied: one kept
    /// from a finished command, or a new one.
    pub fn create(&self) -> Result<CommandCgroup, CgroupError> {
        if let Some(cg) = self.lock_free().pop() {
            return Ok(cg);
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.parent.join(format!("exec-{}-{n}", std::process::id()));
        fs::create_dir(&dir).map_err(|source| CgroupError::Create {
            path: dir.clone(),
            source,
        })?;
        let cg = CommandCgroup::at(dir, self.kill);
        let limits = [
            ("memory.max", self.limits.memory_max),
            ("pids.max", self.limits.pids_max),
        ];
        for (file, value) in limits {
            if let Some(v) = value {
                if let Err(e) = write(&cg.dir.join(file), &v.to_string()) {
                    cg.remove_blocking();
                    return Err(e);
                }
            }
        }
        Ok(cg)
    }
}

/// One command's cgroup. Remove it with [`CommandCgroup::remove`] or
/// [`CommandCgroup::remove_blocking`], which kill what is left in it first;
/// dropped without that (a cancelled request), it kills its processes and
/// is removed on a blocking thread.
#[derive(Debug)]
pub struct CommandCgroup {
    dir: PathBuf,
    kill: KillMethod,
    /// True once removed (or given up on, with a warning).
    done: bool,
    /// True once `cgroup.kill` (or the freeze) was used on it. Such a
    /// cgroup is never reused: on some kernels (seen on 6.18) a child
    /// cloned into a cgroup that was once killed is killed at birth.
    killed: AtomicBool,
    /// True when [`CommandCgroup::kill`] last found it empty; taken by
    /// [`CommandCgroups::recycle`].
    seen_empty: AtomicBool,
}

impl Drop for CommandCgroups {
    fn drop(&mut self) {
        // Kept cgroups are empty: removed at once.
        for cg in self.lock_free().drain(..) {
            cg.remove_blocking();
        }
    }
}

impl Drop for CommandCgroup {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.kill();
        let rest = CommandCgroup::at(std::mem::take(&mut self.dir), self.kill);
        self.done = true;
        let remove = move || rest.remove_blocking();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(remove)),
            Err(_) => drop(std::thread::spawn(remove)),
        }
    }
}

impl CommandCgroup {
    /// The cgroup at `dir`, emptied with `kill`, not yet removed.
    fn at(dir: PathBuf, kill: KillMethod) -> CommandCgroup {
        CommandCgroup {
            dir,
            kill,
            done: false,
            killed: AtomicBool::new(false),
            seen_empty: AtomicBool::new(false),
        }
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup's directory, open for `clone3(CLONE_INTO_CGROUP)`.
    pub fn open_dir(&self) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&self.dir)?;
        Ok(dir.into())
    }

    /// Moves process `pid` (with all its threads) into this cgroup. A
    /// process that already exited is not an error.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        match write(&self.dir.join("cgroup.procs"), &pid.to_string()) {
            Err(CgroupError::Write { source, .. })
                if source.raw_os_error() == Some(libc::ESRCH) =>
            {
                Ok(())
            }
            r => r,
        }
    }

    /// SIGKILLs every process in the cgroup (best effort: the removal
    /// retries and reports what is left); nothing when it is empty, so that
    /// a cgroup whose command ended by itself can be reused.
    pub fn kill(&self) {
        if self.is_empty() {
            self.seen_empty.store(true, Ordering::Relaxed);
            return;
        }
        self.killed.store(true, Ordering::Relaxed);
        match self.kill {
            KillMethod::Kill => {
                let _ = fs::write(self.dir.join("cgroup.kill"), "1");
            }
            KillMethod::Freeze => {
                // Frozen processes cannot fork, and SIGKILL still ends them.
                let _ = fs::write(self.dir.join("cgroup.freeze"), "1");
                if let Ok(procs) = fs::read_to_string(self.dir.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }

    /// True when no process is left in the cgroup (`cgroup.events`).
    fn is_empty(&self) -> bool {
        fs::read_to_string(self.dir.join("cgroup.events"))
            .is_ok_and(|events| events.lines().any(|l| l == "populated 0"))
    }

    /// One removal try: `Ok(true)` once the directory is gone, `Ok(false)`
    /// while processes are still in it (they were just killed).
    fn try_remove(&self) -> io::Result<bool> {
        match fs::remove_dir(&self.dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                self.kill();
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// One try of the removal loop; true when it is over (removed, or given
    /// up on with a warning).
    fn remove_step(&mut self, deadline: Instant) -> bool {
        let failure = match self.try_remove() {
            Ok(true) => None,
            Ok(false) if Instant::now() < deadline => return false,
            Ok(false) => Some(None),
            Err(e) => Some(Some(e)),
        };
        if let Some(e) = failure {
            self.removal_failed(e);
        }
        self.done = true;
        true
    }

    fn removal_failed(&self, e: Option<io::Error>) {
        match e {
            Some(e) => {
                tracing::warn!(cgroup = %self.dir.display(), error = %e, "cannot remove a command's cgroup")
            }
            None => tracing::warn!(cgroup = %self.dir.display(), timeout = ?REMOVE_TIMEOUT,
                "a command's cgroup is still populated after SIGKILL; left in place"),
        }
    }

    /// Kills what is left in the cgroup and removes it, waiting at most
    /// [`REMOVE_TIMEOUT`] for the killed processes to go.
    pub async fn remove(mut self) {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        let mut pause = Duration::from_millis(1);
        loop {
            if self.remove_step(deadline) {
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(REMOVE_PAUSE_MAX);
        }
    }

    /// [`CommandCgroup::remove`] for a blocking thread.
    pub fn remove_blocking(mut self) {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        let mut pause = Duration::from_millis(1);
        loop {
            if self.remove_step(deadline) {
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(REMOVE_PAUSE_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_path_finds_the_v2_line() {
        let cases: &[(&str, Option<&str>)] = &[
            ("0::/\n", Some("/")),
            (
                "0::/system.slice/kvmmanager-agent.service\n",
                Some("/system.slice/kvmmanager-agent.service"),
            ),
            // Hybrid: v1 lines first.
            (
                "9:name=systemd:/\n4:memory:/x\n0::/user.slice/a.scope\n",
                Some("/user.slice/a.scope"),
            ),
            // Pure v1: no 0:: line.
            ("12:pids:/\n1:name=systemd:/init.scope\n", None),
            ("", None),
            ("0::\n", None),
            ("0::/gone (deleted)\n", None),
            ("10::/not-v2\n", None),
        ];
        for (text, want) in cases {
            assert_eq!(unified_path(text), *want, "{text:?}");
        }
    }

    #[test]
    fn cgroup2_mount_is_found_in_mountinfo() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
            35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let ns =
            "700 650 0:26 /system.slice/x.service /sys/fs/cgroup ro,relatime - cgroup2 cgroup rw\n";
        let odd = "5 1 0:9 / /mnt/cg\\040two rw - cgroup2 none rw\n";
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            (hybrid, Some(("/", "/sys/fs/cgroup/unified"))),
            (unified, Some(("/", "/sys/fs/cgroup"))),
            (ns, Some(("/system.slice/x.service", "/sys/fs/cgroup"))),
            (odd, Some(("/", "/mnt/cg two"))),
            (
                "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n36 31 0:1 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n",
                None,
            ),
            ("", None),
            ("garbage line without separator\n", None),
            ("1 2 - cgroup2\n", None),
        ];
        for (text, want) in cases {
            let got = cgroup2_mount(text);
            let want = want.map(|(root, point)| Cgroup2Mount {
                root: root.to_owned(),
                point: PathBuf::from(point),
            });
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn dir_of_maps_cgroup_paths_under_the_mount() {
        let m = |root: &str| Cgroup2Mount {
            root: root.to_owned(),
            point: PathBuf::from("/sys/fs/cgroup"),
        };
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("/", "/", Some("/sys/fs/cgroup")),
            (
                "/",
                "/system.slice/a.service",
                Some("/sys/fs/cgroup/system.slice/a.service"),
            ),
            ("/system.slice", "/system.slice", Some("/sys/fs/cgroup")),
            (
                "/system.slice",
                "/system.slice/a.service",
                Some("/sys/fs/cgroup/a.service"),
            ),
            ("/system.slice", "/system.slicex/a", None),
            ("/system.slice", "/user.slice", None),
            ("/", "/a/../b", None),
            ("/", "relative", None),
        ];
        for (root, path, want) in cases {
            assert_eq!(
                m(root).dir_of(path),
                want.map(PathBuf::from),
                "{root} {path}"
            );
        }
    }

    #[test]
    fn layout_root_and_delegated() {
        let root = layout(Path::new("/sys/fs/cgroup"), true);
        assert_eq!(
            root,
            Layout {
                agent_leaf: None,
                parent: PathBuf::from("/sys/fs/cgroup/kvmmanager-agent"),
                enable_in: vec![
                    PathBuf::from("/sys/fs/cgroup"),
                    PathBuf::from("/sys/fs/cgroup/kvmmanager-agent")
                ],
            }
        );
        let own = Path::new("/sys/fs/cgroup/system.slice/kvmmanager-agent.service");
        assert_eq!(
            layout(own, false),
            Layout {
                agent_leaf: Some(own.join("agent")),
                parent: own.to_owned(),
                enable_in: vec![own.to_owned()],
            }
        );
    }

    #[test]
    fn limits_follow_the_enabled_controllers() {
        let both = CommandLimits {
            memory_max: Some(1 << 20),
            pids_max: Some(10),
        };
        let cases: &[(CommandLimits, &str, CommandLimits)] = &[
            (both, "memory pids\n", both),
            (both, "cpu io memory pids\n", both),
            (
                both,
                "pids\n",
                CommandLimits {
                    memory_max: None,
                    pids_max: Some(10),
                },
            ),
            (both, "", CommandLimits::default()),
            (both, "memoryx pid\n", CommandLimits::default()),
            (
                CommandLimits::default(),
                "memory pids",
                CommandLimits::default(),
            ),
        ];
        for (wanted, enabled, want) in cases {
            assert_eq!(limits_in_force(*wanted, enabled), *want, "{enabled:?}");
        }
        assert_eq!(needed(both), ["memory", "pids"]);
        assert!(needed(CommandLimits::default()).is_empty());
    }

    #[test]
    fn owner_pid_of_command_cgroups() {
        let cases: &[(&str, Option<u32>)] = &[
            ("exec-123-0", Some(123)),
            ("exec-1-18446744073709551615", Some(1)),
            ("exec-123", None),
            ("exec--1", None),
            ("exec-x-1", None),
            ("exec-1-x", None),
            ("agent", None),
            ("kvmm-test-1-end", None),
            ("exec-99999999999-1", None),
        ];
        for (name, want) in cases {
            assert_eq!(owner_pid(name), *want, "{name}");
        }
    }

    #[test]
    fn mountinfo_unescape() {
        for (raw, want) in [
            ("/a\\040b", "/a b"),
            ("/a\\011b", "/a\tb"),
            ("/a\\\\b", "/a\\\\b"),
            ("/end\\04", "/end\\04"),
            ("/x\\999", "/x\\999"),
            ("/", "/"),
        ] {
            assert_eq!(unescape_mountinfo(raw), want, "{raw}");
        }
    }
}
