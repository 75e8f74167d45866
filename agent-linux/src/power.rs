//! `shutdown` and `reboot`: answer first, then act.
//!
//! The handler only validates the request and returns a [`PowerAction`];
//! the session writes the reply, flushes it, and only then calls
//! [`PowerAction::run`]. The action goes through the init system when there
//! is one (systemd, or a `poweroff`/`reboot` command for sysvinit, OpenRC
//! and busybox init) and falls back to `sync` + the `reboot(2)` system call
//! when PID 1 is a plain shell script (a minimal guest) or when the init
//! system has not brought the guest down in time. The init system's command
//! is started by `crate::exec::run_power_command`, like every process
//! the agent starts.

use std::path::Path;
use std::time::Duration;

use tracing::{error, info, warn};

/// How long the init system gets before the agent falls back to the syscall.
const INIT_GRACE: Duration = Duration::from_secs(20);

/// What to do once the reply is on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Power the guest off.
    Shutdown {
        /// Seconds to wait first.
        delay_seconds: u64,
    },
    /// Reboot the guest.
    Reboot {
        /// Seconds to wait first.
        delay_seconds: u64,
    },
    /// Suspend the guest (`suspend`, [`crate::ops::suspend`]).
    Suspend {
        /// To RAM, to disk or both.
        mode: agent_common::methods::SuspendMode,
    },
}

/// The init system the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Init {
    Systemd,
    /// Something with `poweroff`/`reboot` commands (sysvinit, OpenRC, busybox).
    Classic,
    /// PID 1 is a shell or unknown: only the syscall works.
    None,
}

fn detect_init() -> Init {
    if Path::new("/run/systemd/system").is_dir() {
        return Init::Systemd;
    }
    let argv0 = std::fs::read("/proc/1/cmdline")
        .ok()
        .and_then(|c| c.split(|&b| b == 0).next().map(|a| a.to_vec()))
        .unwrap_or_default();
    let name = String::from_utf8_lossy(&argv0);
    let base = name.rsplit('/').next().unwrap_or("");
    match base {
        "sh" | "bash" | "ash" | "dash" | "ksh" | "zsh" | "" => Init::None,
        _ => Init::Classic,
    }
}

impl PowerAction {
    fn delay(self) -> u64 {
        match self {
            PowerAction::Shutdown { delay_seconds } | PowerAction::Reboot { delay_seconds } => {
                delay_seconds
            }
            PowerAction::Suspend { .. } => 0,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            PowerAction::Shutdown { .. } => "poweroff",
            PowerAction::Reboot { .. } => "reboot",
            PowerAction::Suspend { mode } => match mode {
                agent_common::methods::SuspendMode::Ram => "suspend",
                agent_common::methods::SuspendMode::Disk => "hibernate",
                agent_common::methods::SuspendMode::Hybrid => "hybrid-sleep",
            },
        }
    }

    /// Suspends: `systemctl suspend|hibernate|hybrid-sleep` under systemd,
    /// else (or if that fails) the kernel's `/sys/power/state`. Never
    /// falls back to powering off. Returns once the guest has resumed (or
    /// the suspend failed).
    async fn suspend(self, mode: agent_common::methods::SuspendMode) {
        info!(action = self.verb(), "guest suspend starting");
        if detect_init() == Init::Systemd {
            match crate::exec::run_power_command("systemctl", &[self.verb()]).await {
                Ok(s) if s.success() => return,
                Ok(s) => warn!(action = self.verb(), %s, "systemctl refused; using /sys/power"),
                Err(e) => {
                    warn!(action = self.verb(), error = %e, "systemctl failed; using /sys/power")
                }
            }
        }
        let root = std::path::Path::new(crate::ops::suspend::POWER_SYSFS);
        match tokio::task::spawn_blocking(move || crate::ops::suspend::enter(root, mode)).await {
            Ok(Ok(())) => info!(action = self.verb(), "guest resumed"),
            Ok(Err(e)) => error!(action = self.verb(), error = %e, "could not suspend the guest"),
            Err(e) => error!(action = self.verb(), error = %e, "the suspend worker failed"),
        }
    }

    /// Carries out the action. Returns only if every way failed (a
    /// suspend returns after the resume).
    pub async fn run(self) {
        if let PowerAction::Suspend { mode } = self {
            return self.suspend(mode).await;
        }
        tokio::time::sleep(Duration::from_secs(self.delay())).await;
        let init = detect_init();
        info!(action = self.verb(), ?init, "guest power action starting");
        let command: Option<(&str, Vec<&str>)> = match init {
            Init::Systemd => Some(("systemctl", vec![self.verb()])),
            Init::Classic => Some((self.verb(), vec![])),
            Init::None => None,
        };
        if let Some((program, args)) = command {
            let status = crate::exec::run_power_command(program, &args).await;
            match status {
                Ok(s) if s.success() => {
                    // The init system is bringing the guest down; wait for it.
                    tokio::time::sleep(INIT_GRACE).await;
                    warn!(
                        action = self.verb(),
                        "init system did not finish in time; using the reboot syscall"
                    );
                }
                Ok(s) => {
                    warn!(action = self.verb(), %s, "init system refused; using the reboot syscall")
                }
                Err(e) => {
                    warn!(action = self.verb(), error = %e, "init system command failed; using the reboot syscall")
                }
            }
        }
        let action = self;
        let result = tokio::task::spawn_blocking(move || {
            nix::unistd::sync();
            let how = match action {
                PowerAction::Shutdown { .. } => nix::sys::reboot::RebootMode::RB_POWER_OFF,
                PowerAction::Reboot { .. } => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
                // Handled at the start of run; a suspend never powers off.
                PowerAction::Suspend { .. } => return Err(nix::Error::EINVAL),
            };
            nix::sys::reboot::reboot(how)
        })
        .await;
        error!(
            action = self.verb(),
            ?result,
            "could not power the guest off or reboot it"
        );
    }
}
