//! Who serves `org.qemu.guest_agent.0` when the distribution's
//! `qemu-guest-agent` is installed too.
//!
//! A virtio-serial port is opened by one process at a time (`EBUSY` for
//! the next). qemu-guest-agent's unit restarts qemu-ga at once when it
//! cannot open the port, and systemd gives up after five tries: two agents
//! that both try would race at every boot, and the loser's unit ends up
//! failed. So there is one rule, decided from files alone before the port
//! is opened: **an installed, unmasked `qemu-guest-agent.service` owns
//! qemu-ga's port**, and this agent leaves it alone (it keeps serving its
//! own port). `systemctl mask qemu-guest-agent.service` (or removing the
//! package) hands the port to this agent. Masked, qemu-ga never starts;
//! unmasked, this agent never opens the port: nothing is ever fought over.
//!
//! The rule is watched (inotify on systemd's unit folders): when the unit
//! appears while this agent serves the port (`apt install
//! qemu-guest-agent` unpacks it before its `postinst` starts qemu-ga), the
//! agent closes the port at once; when it is masked or removed, the agent
//! opens the port without waiting for its retry interval.
//!
//! The rule applies only when the port served is qemu-ga's own name
//! ([`QEMU_GA_PORT`]); any other `qemu_ga_channel_name` is never contended.

use std::path::{Path, PathBuf};

use tracing::debug;

use crate::dirwatch::{DirWatch, ENTRY_CHANGES};

/// qemu-ga's port name (and the default of `qemu_ga_channel_name`).
pub const QEMU_GA_PORT: &str = "org.qemu.guest_agent.0";

/// The distribution's qemu-ga unit (Debian, Ubuntu, Fedora, RHEL, SUSE).
pub(crate) const QEMU_GA_UNIT: &str = "qemu-guest-agent.service";

/// systemd's system unit folders, highest precedence first (`systemd.unit`
/// (5), "System Unit Search Path"; `/lib` for distributions without
/// merged `/usr`).
pub(crate) const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// Who owns qemu-ga's port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owner {
    /// No `qemu-guest-agent.service`, or it is masked: this agent.
    Agent,
    /// `qemu-guest-agent.service` is installed (this file) and not masked.
    QemuGa(PathBuf),
}

/// Applies the rule under `root` (`/` in the product; a temporary folder in
/// tests): the unit file of highest precedence decides, and a symlink to
/// `/dev/null` or an empty file is a mask, as for systemd.
pub(crate) fn owner_in(root: &Path) -> Owner {
    for dir in UNIT_DIRS {
        let path = root.join(dir.trim_start_matches('/')).join(QEMU_GA_UNIT);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let masked = if meta.file_type().is_symlink() {
            match std::fs::read_link(&path) {
                Ok(target) if target == Path::new("/dev/null") => true,
                // A dangling link is no unit: systemd ignores it.
                _ => std::fs::metadata(&path).is_err(),
            }
        } else {
            meta.len() == 0
        };
        return if masked {
            Owner::Agent
        } else {
            Owner::QemuGa(PathBuf::from(dir).join(QEMU_GA_UNIT))
        };
    }
    Owner::Agent
}

/// The rule for port `name`, watched for changes.
pub(crate) struct Gate {
    /// `/`; a temporary folder in tests.
    root: PathBuf,
    /// systemd's unit folders.
    watch: Option<DirWatch>,
}

impl Gate {
    /// A gate for port `name`: `None` when the rule does not apply (not
    /// qemu-ga's port name, or a device path given on the command line).
    pub(crate) fn for_port(name: &str, device_given: bool) -> Option<Gate> {
        if name != QEMU_GA_PORT || device_given {
            return None;
        }
        Some(Gate::at(PathBuf::from("/")))
    }

    /// The gate with systemd's folders under `root`.
    fn at(root: PathBuf) -> Gate {
        let dirs: Vec<PathBuf> = UNIT_DIRS
            .iter()
            .map(|d| root.join(d.trim_start_matches('/')))
            .collect();
        let watch = match DirWatch::new(&dirs, ENTRY_CHANGES) {
            Ok(w) => w,
            Err(e) => {
                // Still decided before every open; changes are then seen
                // at the next retry only.
                debug!(error = %e, "cannot watch systemd's unit folders");
                None
            }
        };
        Gate { root, watch }
    }

    /// Who owns the port now.
    pub(crate) fn owner(&self) -> Owner {
        owner_in(&self.root)
    }

    /// True when changes to the unit folders are seen as they happen (else
    /// the caller looks again at its retry interval).
    pub(crate) fn is_watching(&self) -> bool {
        self.watch.is_some()
    }

    /// Waits until a unit folder changed (never, when nothing is watched).
    pub(crate) async fn changed(&mut self) {
        match &mut self.watch {
            Some(w) => w.changed().await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::time::Duration;

    fn unit(root: &Path, dir: &str) -> PathBuf {
        let d = root.join(dir.trim_start_matches('/'));
        fs::create_dir_all(&d).unwrap();
        d.join(QEMU_GA_UNIT)
    }

    #[test]
    fn an_installed_unmasked_qemu_ga_owns_the_port() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        assert_eq!(owner_in(r), Owner::Agent, "nothing installed");
        fs::write(unit(r, "/lib/systemd/system"), "[Service]\n").unwrap();
        assert_eq!(
            owner_in(r),
            Owner::QemuGa(PathBuf::from(
                "/lib/systemd/system/qemu-guest-agent.service"
            ))
        );
        // `systemctl mask`: a link to /dev/null in /etc.
        symlink("/dev/null", unit(r, "/etc/systemd/system")).unwrap();
        assert_eq!(owner_in(r), Owner::Agent, "masked in /etc");
        fs::remove_file(unit(r, "/etc/systemd/system")).unwrap();
        // `systemctl mask --runtime`: in /run.
        symlink("/dev/null", unit(r, "/run/systemd/system")).unwrap();
        assert_eq!(owner_in(r), Owner::Agent, "masked in /run");
        fs::remove_file(unit(r, "/run/systemd/system")).unwrap();
        // An empty file is a mask too.
        fs::write(unit(r, "/etc/systemd/system"), "").unwrap();
        assert_eq!(owner_in(r), Owner::Agent, "empty file");
        // An administrator's full copy in /etc overrides and owns.
        fs::write(unit(r, "/etc/systemd/system"), "[Service]\n").unwrap();
        assert_eq!(
            owner_in(r),
            Owner::QemuGa(PathBuf::from(
                "/etc/systemd/system/qemu-guest-agent.service"
            ))
        );
    }

    #[test]
    fn a_dangling_link_is_no_unit() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        symlink("/nonexistent/unit", unit(r, "/etc/systemd/system")).unwrap();
        assert_eq!(owner_in(r), Owner::Agent);
        fs::write(unit(r, "/usr/lib/systemd/system"), "[Service]\n").unwrap();
        assert_eq!(owner_in(r), Owner::Agent, "the link has precedence");
    }

    #[tokio::test]
    async fn the_gate_wakes_when_the_unit_is_installed_and_masked() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let lib = unit(r, "/usr/lib/systemd/system");
        let etc = unit(r, "/etc/systemd/system");
        let mut gate = Gate::at(r.to_path_buf());
        assert!(gate.watch.is_some());
        assert_eq!(gate.owner(), Owner::Agent);
        let wait = Duration::from_secs(5);
        // As dpkg unpacks: a temporary name, then a rename into place.
        let tmp = lib.with_extension("service.dpkg-new");
        fs::write(&tmp, "[Service]\n").unwrap();
        fs::rename(&tmp, &lib).unwrap();
        tokio::time::timeout(wait, gate.changed()).await.unwrap();
        // Events may come in more than one read: drain until decided.
        while gate.owner() == Owner::Agent {
            tokio::time::timeout(wait, gate.changed()).await.unwrap();
        }
        assert!(matches!(gate.owner(), Owner::QemuGa(_)));
        symlink("/dev/null", &etc).unwrap();
        tokio::time::timeout(wait, gate.changed()).await.unwrap();
        assert_eq!(gate.owner(), Owner::Agent);
    }

    #[test]
    fn the_rule_applies_to_qemu_ga_s_port_name_only() {
        assert!(Gate::for_port("org.kvmmanager.qemu-ga.0", false).is_none());
        assert!(Gate::for_port(QEMU_GA_PORT, true).is_none());
    }
}
