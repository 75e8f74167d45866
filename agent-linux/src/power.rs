//! `shutdown` and `reboot`: answer first, then act.
//!
//! The handler only validates the request and returns a [`PowerAction`];
//! the session writes the reply, flushes it, and only then calls
//! [`PowerAction::run`]. The action goes through the init system when there
//! is one (systemd, or a `poweroff`/`reboot` command for sysvinit, OpenRC
//! and busybox init) and falls back to `sync` + the `reboot(2)` system call
//! when PID 1 is a plain shell script (a minimal guest) or when the init
//! system has not brought the guest down in time. The init system's command
//! is started by [`crate::exec::run_power_command`], like every process
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
        }
    }

    fn verb(self) -> &'static str {
        match self {
            PowerAction::Shutdown { .. } => "poweroff",
            PowerAction::Reboot { .. } => "reboot",
        }
    }

    /// Carries out the action. Returns only if every way failed.
    pub async fn run(self) {
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
