//! `get_system_info`, `get_network_info` and `get_disk_usage`: read-only
//! facts from `/proc`, `/sys`, `uname`, `getifaddrs` and `statvfs`.
//!
//! These functions block (file reads, `statvfs`); callers run them on the
//! blocking pool.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use agent_common::error::ErrorKind;
use agent_common::methods::{
    DiskUsage, Filesystem, InterfaceStatistics, IpAddress, IpFamily, NetworkInfo, NetworkInterface,
    SystemInfo,
};
use nix::net::if_::InterfaceFlags;

use crate::error::{io_error_kind, RpcError};

/// Failure to gather system facts.
#[derive(Debug, thiserror::Error)]
pub enum SysInfoError {
    /// A file under /proc or /sys could not be read.
    #[error("could not read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A system call failed.
    #[error("{call} failed")]
    Sys {
        /// The call.
        call: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
}

impl RpcError for SysInfoError {
    fn kind(&self) -> ErrorKind {
        match self {
            SysInfoError::Read { source, .. } => io_error_kind(source),
            SysInfoError::Sys { .. } => ErrorKind::IoError,
        }
    }
}

/// The text of a file under `/proc` or `/sys`.
pub(crate) fn read(path: &str) -> Result<String, SysInfoError> {
    fs::read_to_string(path).map_err(|source| SysInfoError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Parses `KEY=value` lines of an os-release file (values may be quoted).
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (
                k.trim().to_owned(),
                v.replace("\\\"", "\"").replace("\\\\", "\\"),
            )
        })
        .collect()
}

/// Value in bytes of a `/proc/meminfo` field (given in kB there).
pub(crate) fn meminfo_bytes(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb.saturating_mul(1024))
}

/// The 1, 5 and 15 minute load averages of `/proc/loadavg`.
pub(crate) fn parse_loadavg(text: &str) -> [f64; 3] {
    let mut load = [0.0f64; 3];
    for (slot, field) in load.iter_mut().zip(text.split_whitespace()) {
        *slot = field.parse().unwrap_or(0.0);
    }
    load
}

/// Seconds since boot, the first field of `/proc/uptime`.
pub(crate) fn parse_uptime(text: &str) -> f64 {
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

/// Gathers `get_system_info`.
pub fn system_info() -> Result<SystemInfo, SysInfoError> {
    let uts = nix::sys::utsname::uname().map_err(|source| SysInfoError::Sys {
        call: "uname",
        source,
    })?;
    let os = fs::read_to_string("/etc/os-release")
        .or_else(|_| fs::read_to_string("/usr/lib/os-release"))
        .map(|t| parse_os_release(&t))
        .unwrap_or_default();
    let meminfo = read("/proc/meminfo")?;
    let uptime = read("/proc/uptime")?;
    let loadavg = read("/proc/loadavg")?;
    let cpu_model = fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    });
    let cpus = crate::sys::online_cpus();
    Ok(SystemInfo {
        os_type: "linux".into(),
        os_name: os.get("NAME").cloned(),
        os_version: os.get("VERSION_ID").cloned(),
        os_pretty_name: os.get("PRETTY_NAME").cloned(),
        os_id: os.get("ID").cloned(),
        os_version_name: os.get("VERSION").cloned(),
        os_variant: os.get("VARIANT").cloned(),
        os_variant_id: os.get("VARIANT_ID").cloned(),
        kernel_release: uts.release().to_string_lossy().into_owned(),
        kernel_version: uts.version().to_string_lossy().into_owned(),
        architecture: uts.machine().to_string_lossy().into_owned(),
        hostname: uts.nodename().to_string_lossy().into_owned(),
        cpu_count: u32::try_from(cpus).unwrap_or(1).max(1),
        cpu_model,
        memory_total_bytes: meminfo_bytes(&meminfo, "MemTotal"),
        memory_available_bytes: meminfo_bytes(&meminfo, "MemAvailable"),
        swap_total_bytes: meminfo_bytes(&meminfo, "SwapTotal"),
        swap_free_bytes: meminfo_bytes(&meminfo, "SwapFree"),
        uptime_seconds: parse_uptime(&uptime),
        load_average: parse_loadavg(&loadavg),
    })
}

fn sys_u64(iface: &str, file: &str) -> Option<u64> {
    fs::read_to_string(Path::new("/sys/class/net").join(iface).join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The counters of interface `name` (`/sys/class/net/<name>/statistics`;
/// 0 for a counter that cannot be read).
pub fn interface_statistics(name: &str) -> InterfaceStatistics {
    let s = |f: &str| sys_u64(name, &format!("statistics/{f}")).unwrap_or(0);
    InterfaceStatistics {
        rx_bytes: s("rx_bytes"),
        rx_packets: s("rx_packets"),
        rx_errors: s("rx_errors"),
        rx_dropped: s("rx_dropped"),
        tx_bytes: s("tx_bytes"),
        tx_packets: s("tx_packets"),
        tx_errors: s("tx_errors"),
        tx_dropped: s("tx_dropped"),
    }
}

/// The names of the network interfaces (`/sys/class/net`).
pub fn interface_names() -> Result<Vec<String>, SysInfoError> {
    let dir = "/sys/class/net";
    let entries = fs::read_dir(dir).map_err(|source| SysInfoError::Read {
        path: dir.to_owned(),
        source,
    })?;
    Ok(entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect())
}

fn prefix_len(mask: &[u8]) -> u8 {
    mask.iter().map(|b| b.count_ones() as u8).sum()
}

/// Gathers `get_network_info`.
pub fn network_info() -> Result<NetworkInfo, SysInfoError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|source| SysInfoError::Sys {
        call: "getifaddrs",
        source,
    })?;
    let mut ifaces: BTreeMap<String, NetworkInterface> = BTreeMap::new();
    for ifa in addrs {
        let entry = ifaces
            .entry(ifa.interface_name.clone())
            .or_insert_with(|| NetworkInterface {
                name: ifa.interface_name.clone(),
                mac_address: None,
                is_up: false,
                is_running: false,
                is_loopback: false,
                mtu: None,
                addresses: Vec::new(),
                statistics: InterfaceStatistics::default(),
            });
        entry.is_up |= ifa.flags.contains(InterfaceFlags::IFF_UP);
        entry.is_running |= ifa.flags.contains(InterfaceFlags::IFF_RUNNING);
        entry.is_loopback |= ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK);
        let Some(addr) = ifa.address else { continue };
        if let Some(link) = addr.as_link_addr() {
            if let Some(mac) = link.addr() {
                if mac.iter().any(|&b| b != 0) {
                    entry.mac_address = Some(
                        mac.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":"),
                    );
                }
            }
        } else if let Some(v4) = addr.as_sockaddr_in() {
            let mask = ifa
                .netmask
                .and_then(|m| m.as_sockaddr_in().map(|m| m.ip().octets()))
                .map_or(32, |m| prefix_len(&m));
            entry.addresses.push(IpAddress {
                family: IpFamily::Ipv4,
                address: v4.ip().to_string(),
                prefix_len: mask,
            });
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let mask = ifa
                .netmask
                .and_then(|m| m.as_sockaddr_in6().map(|m| m.ip().octets()))
                .map_or(128, |m| prefix_len(&m));
            entry.addresses.push(IpAddress {
                family: IpFamily::Ipv6,
                address: v6.ip().to_string(),
                prefix_len: mask,
            });
        }
    }
    for iface in ifaces.values_mut() {
        let n = iface.name.clone();
        iface.mtu = sys_u64(&n, "mtu").and_then(|m| u32::try_from(m).ok());
        iface.statistics = interface_statistics(&n);
    }
    Ok(NetworkInfo {
        interfaces: ifaces.into_values().collect(),
    })
}

/// Filesystem types that hold no user data.
const VIRTUAL_FS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "proc",
    "pstore",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "sysfs",
    "tracefs",
];

/// Decodes the octal escapes (`\040` for a space) of /proc/mounts fields.
pub fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Gathers `get_disk_usage`.
pub fn disk_usage(include_virtual: bool) -> Result<DiskUsage, SysInfoError> {
    let mounts = read("/proc/self/mounts")?;
    let mut filesystems = Vec::new();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(dev), Some(mnt), Some(fstype), Some(opts)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if !include_virtual && VIRTUAL_FS.contains(&fstype) {
            continue;
        }
        let mount_point = unescape_mount_field(mnt);
        // A mount that cannot be queried (gone, or no permission) is skipped.
        let Ok(st) = nix::sys::statvfs::statvfs(mount_point.as_str()) else {
            continue;
        };
        let frsize = st.fragment_size();
        let total = st.blocks().saturating_mul(frsize);
        if !include_virtual && total == 0 {
            continue;
        }
        filesystems.push(Filesystem {
            device: unescape_mount_field(dev),
            mount_point,
            fs_type: fstype.to_owned(),
            total_bytes: total,
            used_bytes: st
                .blocks()
                .saturating_sub(st.blocks_free())
                .saturating_mul(frsize),
            free_bytes: st.blocks_available().saturating_mul(frsize),
            total_inodes: st.files(),
            free_inodes: st.files_free(),
            read_only: opts.split(',').any(|o| o == "ro"),
        });
    }
    Ok(DiskUsage { filesystems })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_values_are_unquoted() {
        let m = parse_os_release("NAME=\"Debian GNU/Linux\"\nVERSION_ID='12'\nID=debian\n# c\n");
        assert_eq!(m["NAME"], "Debian GNU/Linux");
        assert_eq!(m["VERSION_ID"], "12");
        assert_eq!(m["ID"], "debian");
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        let t = "MemTotal:        2000 kB\nMemAvailable:    1000 kB\n";
        assert_eq!(meminfo_bytes(t, "MemTotal"), 2_048_000);
        assert_eq!(meminfo_bytes(t, "MemAvailable"), 1_024_000);
        assert_eq!(meminfo_bytes(t, "SwapTotal"), 0);
    }

    #[test]
    fn mount_fields_are_unescaped() {
        assert_eq!(unescape_mount_field("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_field("/x\\134y"), "/x\\y");
        assert_eq!(unescape_mount_field("plain"), "plain");
        assert_eq!(unescape_mount_field("end\\04"), "end\\04");
    }

    #[test]
    fn prefix_lengths() {
        assert_eq!(prefix_len(&[255, 255, 255, 0]), 24);
        assert_eq!(prefix_len(&[255, 0, 0, 0]), 8);
        assert_eq!(prefix_len(&[0xff; 16]), 128);
    }

    #[test]
    fn facts_of_this_machine_are_plausible() {
        let s = system_info().unwrap();
        assert!(s.cpu_count >= 1);
        assert!(s.memory_total_bytes > 0);
        assert!(s.uptime_seconds > 0.0);
        assert!(!s.kernel_release.is_empty());
        let n = network_info().unwrap();
        let lo = n
            .interfaces
            .iter()
            .find(|i| i.name == "lo")
            .expect("lo exists");
        assert!(lo.is_loopback);
        assert!(lo
            .addresses
            .iter()
            .any(|a| a.address == "127.0.0.1" && a.prefix_len == 8));
        let d = disk_usage(false).unwrap();
        assert!(d.filesystems.iter().any(|f| f.mount_point == "/"));
        assert!(d.filesystems.iter().all(|f| f.fs_type != "proc"));
        let all = disk_usage(true).unwrap();
        assert!(all.filesystems.iter().any(|f| f.fs_type == "proc"));
    }
}
