//! `suspend`: to RAM, to disk (hibernate) or both (hybrid), where the
//! guest supports it. The request is checked against `/sys/power/state`
//! (and `/sys/power/disk` for hybrid) before the reply; the suspend itself
//! runs after the reply is written, like `shutdown` ([`crate::power`]):
//! `systemctl suspend|hibernate|hybrid-sleep` under systemd, else the
//! kernel's interface directly (`/sys/power/state`).

use std::io;
use std::path::Path;

use agent_common::error::ErrorKind;
use agent_common::methods::SuspendMode;

use crate::error::RpcError;

/// Where the kernel's sleep interface is.
pub const POWER_SYSFS: &str = "/sys/power";

/// Why the guest cannot suspend that way.
#[derive(Debug, thiserror::Error)]
pub enum SuspendError {
    /// The kernel does not offer that sleep state.
    #[error("the guest cannot suspend to {mode}: {reason}")]
    Unsupported {
        /// The mode asked for.
        mode: &'static str,
        /// What is missing.
        reason: String,
    },
}

impl RpcError for SuspendError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::NotSupported
    }
}

/// The name of a mode, as PROTOCOL.md spells it.
pub fn mode_name(mode: SuspendMode) -> &'static str {
    match mode {
        SuspendMode::Ram => "ram",
        SuspendMode::Disk => "disk",
        SuspendMode::Hybrid => "hybrid",
    }
}

/// Checks `mode` against the texts of `/sys/power/state` and
/// `/sys/power/disk`.
pub fn check(mode: SuspendMode, state: &str, disk: &str) -> Result<(), SuspendError> {
    let states: Vec<&str> = state.split_whitespace().collect();
    // `/sys/power/disk` lists modes, the current one in brackets.
    let disk_modes: Vec<&str> = disk
        .split_whitespace()
        .map(|m| m.trim_matches(['[', ']']))
        .collect();
    let missing = |reason: &str| {
        Err(SuspendError::Unsupported {
            mode: mode_name(mode),
            reason: reason.to_owned(),
        })
    };
    match mode {
        SuspendMode::Ram if !states.contains(&"mem") => {
            missing("/sys/power/state does not offer mem (the VM may lack S3 support)")
        }
        SuspendMode::Disk | SuspendMode::Hybrid if !states.contains(&"disk") => {
            missing("/sys/power/state does not offer disk (no hibernation support in the kernel)")
        }
        SuspendMode::Hybrid if !disk_modes.contains(&"suspend") => {
            missing("/sys/power/disk does not offer suspend (no hybrid sleep)")
        }
        _ => Ok(()),
    }
}

/// Checks the guest's own sleep interface under `root`.
pub fn supported(root: &Path, mode: SuspendMode) -> Result<(), SuspendError> {
    let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap_or_default();
    check(mode, &read("state"), &read("disk"))
}

/// Suspends through the kernel interface under `root` (blocks until the
/// guest resumes).
pub fn enter(root: &Path, mode: SuspendMode) -> io::Result<()> {
    match mode {
        SuspendMode::Ram => std::fs::write(root.join("state"), "mem"),
        SuspendMode::Disk => {
            std::fs::write(root.join("disk"), "platform")
                .or_else(|_| std::fs::write(root.join("disk"), "shutdown"))?;
            std::fs::write(root.join("state"), "disk")
        }
        SuspendMode::Hybrid => {
            std::fs::write(root.join("disk"), "suspend")?;
            std::fs::write(root.join("state"), "disk")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_checked_against_the_kernel_offer() {
        let disk = "[platform] shutdown reboot suspend test_resume";
        assert!(check(SuspendMode::Ram, "freeze mem disk\n", disk).is_ok());
        assert!(check(SuspendMode::Disk, "freeze mem disk\n", disk).is_ok());
        assert!(check(SuspendMode::Hybrid, "freeze mem disk\n", disk).is_ok());
        let e = check(SuspendMode::Ram, "freeze disk\n", disk).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        assert!(e.to_string().contains("mem"), "{e}");
        assert!(check(SuspendMode::Disk, "freeze mem\n", "").is_err());
        assert!(check(SuspendMode::Hybrid, "mem disk", "[platform] shutdown").is_err());
        assert!(
            check(SuspendMode::Ram, "", "").is_err(),
            "no sysfs: refused"
        );
    }

    #[test]
    fn entering_writes_the_kernel_interface() {
        let t = tempfile::tempdir().unwrap();
        enter(t.path(), SuspendMode::Hybrid).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join("disk")).unwrap(),
            "suspend"
        );
        assert_eq!(
            std::fs::read_to_string(t.path().join("state")).unwrap(),
            "disk"
        );
        enter(t.path(), SuspendMode::Ram).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join("state")).unwrap(),
            "mem"
        );
    }
}
