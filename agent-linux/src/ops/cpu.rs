//! `get_vcpus` and `set_vcpus`: CPU hot(un)plug through
//! `/sys/devices/system/cpu/cpuN/online`. A CPU without an `online` file
//! (the boot CPU, usually) cannot go offline. Blocking: run on the blocking
//! pool. The sysfs directory is a parameter so tests use a scratch tree.

use std::io;
use std::path::Path;

use agent_common::error::ErrorKind;
use agent_common::methods::{SetVcpusParams, Vcpu, Vcpus};
use serde_json::Value;
use tracing::info;

use crate::error::{io_error_kind, RpcError};

/// Where the kernel lists CPUs.
pub const CPU_SYSFS: &str = "/sys/devices/system/cpu";

/// Why CPUs could not be listed or changed.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// The CPU list could not be read.
    #[error("cannot read {path}")]
    Read {
        /// What.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A request names a CPU the guest does not have.
    #[error("the guest has no cpu {0} (see get_vcpus)")]
    NoSuchCpu(u32),
    /// A request names a CPU twice.
    #[error("cpu {0} is named twice")]
    Twice(u32),
    /// A CPU that cannot go offline.
    #[error("cpu {0} cannot go offline (the boot CPU, or a kernel without CPU hot-unplug)")]
    CannotOffline(u32),
    /// The kernel refused a change; those before it in the list were made.
    #[error("cannot set cpu {id} {state} ({applied} change(s) before it in the list were made)")]
    Set {
        /// The CPU.
        id: u32,
        /// `online` or `offline`.
        state: &'static str,
        /// Changes made before it.
        applied: usize,
        /// The cause (`EBUSY`: the last online CPU, or in use).
        #[source]
        source: io::Error,
    },
}

impl RpcError for CpuError {
    fn kind(&self) -> ErrorKind {
        match self {
            CpuError::Read { source, .. } => io_error_kind(source),
            CpuError::NoSuchCpu(_) | CpuError::Twice(_) | CpuError::CannotOffline(_) => {
                ErrorKind::InvalidParams
            }
            CpuError::Set { source, .. } => match source.raw_os_error() {
                Some(libc::EBUSY) | Some(libc::EINVAL) => ErrorKind::IoError,
                _ => io_error_kind(source),
            },
        }
    }

    fn data(&self) -> Vec<(&'static str, Value)> {
        match self {
            CpuError::NoSuchCpu(id) | CpuError::Twice(id) | CpuError::CannotOffline(id) => {
                vec![("cpu", (*id).into())]
            }
            CpuError::Set { id, .. } => vec![("cpu", (*id).into())],
            CpuError::Read { .. } => Vec::new(),
        }
    }
}

/// `get_vcpus` over the sysfs directory `root`.
pub fn get_vcpus(root: &Path) -> Result<Vcpus, CpuError> {
    let read_err = |source| CpuError::Read {
        path: root.display().to_string(),
        source,
    };
    let mut cpus = Vec::new();
    for entry in std::fs::read_dir(root).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("cpu"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let (online, can_offline) = match std::fs::read_to_string(entry.path().join("online")) {
            Ok(t) => (t.trim() == "1", true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (true, false),
            Err(source) => {
                return Err(CpuError::Read {
                    path: entry.path().join("online").display().to_string(),
                    source,
                })
            }
        };
        cpus.push(Vcpu {
            id,
            online,
            can_offline,
        });
    }
    cpus.sort_by_key(|c| c.id);
    Ok(Vcpus { cpus })
}

/// `set_vcpus` over `root`: every entry is checked first, then applied in
/// order (a CPU already in the wanted state is left alone); the CPUs after.
pub fn set_vcpus(root: &Path, p: SetVcpusParams) -> Result<Vcpus, CpuError> {
    let now = get_vcpus(root)?;
    for (i, want) in p.cpus.iter().enumerate() {
        let Some(cpu) = now.cpus.iter().find(|c| c.id == want.id) else {
            return Err(CpuError::NoSuchCpu(want.id));
        };
        if p.cpus[..i].iter().any(|w| w.id == want.id) {
            return Err(CpuError::Twice(want.id));
        }
        if !want.online && !cpu.can_offline {
            return Err(CpuError::CannotOffline(want.id));
        }
    }
    let mut applied = 0;
    for want in &p.cpus {
        let Some(cpu) = now.cpus.iter().find(|c| c.id == want.id) else {
            continue;
        };
        if cpu.online == want.online || !cpu.can_offline {
            continue;
        }
        let state = if want.online { "online" } else { "offline" };
        let file = root.join(format!("cpu{}", want.id)).join("online");
        std::fs::write(&file, if want.online { "1" } else { "0" }).map_err(|source| {
            CpuError::Set {
                id: want.id,
                state,
                applied,
                source,
            }
        })?;
        info!(cpu = want.id, state, "cpu state changed");
        applied += 1;
    }
    get_vcpus(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::methods::VcpuState;

    fn tree(states: &[Option<bool>]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (i, s) in states.iter().enumerate() {
            let cpu = dir.path().join(format!("cpu{i}"));
            std::fs::create_dir(&cpu).unwrap();
            if let Some(on) = s {
                std::fs::write(cpu.join("online"), if *on { "1\n" } else { "0\n" }).unwrap();
            }
        }
        // Entries that are not CPUs.
        std::fs::create_dir(dir.path().join("cpufreq")).unwrap();
        std::fs::create_dir(dir.path().join("cpuidle")).unwrap();
        std::fs::write(dir.path().join("online"), "0-1\n").unwrap();
        dir
    }

    fn want(list: &[(u32, bool)]) -> SetVcpusParams {
        SetVcpusParams {
            cpus: list
                .iter()
                .map(|&(id, online)| VcpuState { id, online })
                .collect(),
        }
    }

    #[test]
    fn cpus_are_listed_with_the_boot_cpu_fixed() {
        let t = tree(&[None, Some(true), Some(false)]);
        let v = get_vcpus(t.path()).unwrap();
        let got: Vec<(u32, bool, bool)> = v
            .cpus
            .iter()
            .map(|c| (c.id, c.online, c.can_offline))
            .collect();
        assert_eq!(got, [(0, true, false), (1, true, true), (2, false, true)]);
    }

    #[test]
    fn cpus_go_offline_and_online() {
        let t = tree(&[None, Some(true), Some(false)]);
        let v = set_vcpus(t.path(), want(&[(1, false), (2, true), (0, true)])).unwrap();
        let got: Vec<bool> = v.cpus.iter().map(|c| c.online).collect();
        assert_eq!(got, [true, false, true]);
        assert_eq!(
            std::fs::read_to_string(t.path().join("cpu1/online")).unwrap(),
            "0"
        );
    }

    #[test]
    fn bad_requests_change_nothing() {
        let t = tree(&[None, Some(true)]);
        let cases = [
            (want(&[(1, false), (0, false)]), "cannot go offline"),
            (want(&[(1, false), (7, true)]), "no cpu 7"),
            (want(&[(1, false), (1, true)]), "twice"),
        ];
        for (p, text) in cases {
            let e = set_vcpus(t.path(), p).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidParams);
            assert!(e.to_string().contains(text), "{e}");
            assert_eq!(
                std::fs::read_to_string(t.path().join("cpu1/online")).unwrap(),
                "1\n"
            );
        }
    }

    #[test]
    fn this_machine_lists_its_cpus() {
        let v = get_vcpus(Path::new(CPU_SYSFS)).unwrap();
        assert!(v.cpus.iter().any(|c| c.online));
    }
}
