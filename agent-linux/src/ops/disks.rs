//! `get_fsinfo`: each filesystem on a block device and the whole disks
//! beneath it, found through sysfs as qemu-ga does: the filesystem's
//! device number leads to `/sys/dev/block/MAJ:MIN`, a link into
//! `/sys/devices`; a device with `slaves/` (LVM, LUKS, RAID: device mapper
//! and md) is followed into each slave, a partition to its disk, and a disk
//! is described by its path (the PCI function of its controller, the
//! virtio or SCSI address) and its `serial`. Blocking; the sysfs root is a
//! parameter so tests use a scratch tree.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use agent_common::methods::{BlockDevice, BlockDevices, DiskAddress, FsInfo, FsInfoEntry};

use super::freeze::dev_numbers;
use super::mounts::Mount;

/// Where sysfs is.
pub const SYSFS: &str = "/sys";

/// How deep stacked devices are followed.
const MAX_DEPTH: usize = 16;

/// `get_fsinfo` of `mounts` (in mount order) over the sysfs at `sys`.
pub fn fsinfo(sys: &Path, mounts: &[Mount]) -> FsInfo {
    let mut filesystems = Vec::new();
    for m in mounts.iter().filter(|m| m.source.starts_with("/dev/")) {
        // btrfs and some others report an anonymous device number in the
        // mount table: the source device's own number is the real one.
        let (major, minor) = if m.major != 0 {
            (m.major, m.minor)
        } else {
            match std::fs::metadata(&m.source) {
                Ok(meta) => dev_numbers(meta.rdev()),
                Err(_) => continue,
            }
        };
        let Ok(dev_dir) = sys
            .join("dev/block")
            .join(format!("{major}:{minor}"))
            .canonicalize()
        else {
            continue;
        };
        let mut disks = Vec::new();
        disks_beneath(&dev_dir, &mut disks, 0);
        let usage = nix::sys::statvfs::statvfs(m.mount_point.as_str()).ok();
        filesystems.push(FsInfoEntry {
            mount_point: m.mount_point.clone(),
            name: file_name(&dev_dir),
            fs_type: m.fs_type.clone(),
            total_bytes: usage
                .as_ref()
                .map(|s| s.blocks().saturating_mul(s.fragment_size())),
            used_bytes: usage.as_ref().map(|s| {
                s.blocks()
                    .saturating_sub(s.blocks_free())
                    .saturating_mul(s.fragment_size())
            }),
            available_bytes: usage
                .as_ref()
                .map(|s| s.blocks_available().saturating_mul(s.fragment_size())),
            disks,
        });
    }
    FsInfo { filesystems }
}

/// Names of the entries of `dir` (none if it does not exist), sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    n.sort();
    n
}

/// `get_block_devices` over the sysfs at `sys`.
pub fn block_devices(sys: &Path) -> BlockDevices {
    let mut devices = Vec::new();
    for name in names_in(&sys.join("class/block")) {
        let Ok(dir) = sys.join("class/block").join(&name).canonicalize() else {
            continue;
        };
        let partition = dir.join("partition").exists();
        let kind = if partition {
            "partition"
        } else if name.starts_with("dm-") {
            "dm"
        } else if name.starts_with("md") {
            "md"
        } else if name.starts_with("loop") {
            "loop"
        } else if name.starts_with("sr") {
            "rom"
        } else {
            "disk"
        };
        let size_bytes = read_trimmed(&dir.join("size"))
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            .saturating_mul(512);
        // Loop devices with nothing attached, as lsblk leaves them out.
        if kind == "loop" && size_bytes == 0 {
            continue;
        }
        let mut dependencies = names_in(&dir.join("slaves"));
        if partition {
            if let Some(disk) = dir.parent() {
                dependencies.push(file_name(disk));
            }
        }
        let mut holders = names_in(&dir.join("holders"));
        // A disk's partitions are built on it too.
        if !partition {
            holders.extend(
                names_in(&dir)
                    .into_iter()
                    .filter(|n| dir.join(n).join("partition").exists()),
            );
            holders.sort();
        }
        devices.push(BlockDevice {
            mapper_name: read_trimmed(&dir.join("dm/name")),
            size_bytes,
            read_only: read_trimmed(&dir.join("ro")).as_deref() == Some("1"),
            address: (kind == "disk" || kind == "rom").then(|| describe(&dir)),
            name,
            kind: kind.to_owned(),
            dependencies,
            holders,
        });
    }
    BlockDevices { devices }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Adds the whole disks beneath the block device directory `dev` to `out`.
fn disks_beneath(dev: &Path, out: &mut Vec<DiskAddress>, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    let mut slaves: Vec<PathBuf> = std::fs::read_dir(dev.join("slaves"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.path().canonicalize().ok())
                .collect()
        })
        .unwrap_or_default();
    slaves.sort();
    if !slaves.is_empty() {
        for s in slaves {
            disks_beneath(&s, out, depth + 1);
        }
    } else if dev.join("partition").exists() {
        if let Some(disk) = dev.parent() {
            disks_beneath(disk, out, depth + 1);
        }
    } else {
        let d = describe(dev);
        if !out.contains(&d) {
            out.push(d);
        }
    }
}

fn read_trimmed(p: &Path) -> Option<String> {
    let t = std::fs::read(p).ok()?;
    let s = String::from_utf8_lossy(&t).trim().to_owned();
    (!s.is_empty()).then_some(s)
}

/// The serial of a SCSI disk from its VPD page 0x80 (4 header bytes).
fn vpd_serial(p: &Path) -> Option<String> {
    let t = std::fs::read(p).ok()?;
    let s = String::from_utf8_lossy(t.get(4..)?)
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .to_owned();
    (!s.is_empty()).then_some(s)
}

/// A whole disk's address, from its sysfs directory.
fn describe(disk: &Path) -> DiskAddress {
    let name = file_name(disk);
    let mut a = address_from_path(&disk.to_string_lossy());
    a.device = format!("/dev/{name}");
    a.serial = read_trimmed(&disk.join("serial"))
        .or_else(|| read_trimmed(&disk.join("device/serial")))
        .or_else(|| vpd_serial(&disk.join("device/vpd_pg80")));
    a
}

fn is_pci(c: &str) -> bool {
    let b = c.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && c.split([':', '.'])
            .all(|p| !p.is_empty() && p.bytes().all(|x| x.is_ascii_hexdigit()))
}

fn scsi_address(c: &str) -> Option<[u32; 4]> {
    let parts: Vec<u32> = c
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    <[u32; 4]>::try_from(parts).ok()
}

/// The bus and address a disk's sysfs path shows.
pub fn address_from_path(path: &str) -> DiskAddress {
    let comps: Vec<&str> = path.split('/').collect();
    let pci_address = comps
        .iter()
        .rev()
        .find(|c| is_pci(c))
        .map(|c| c.to_string());
    let scsi = comps.iter().rev().find_map(|c| scsi_address(c));
    let has = |pred: &dyn Fn(&str) -> bool| comps.iter().any(|c| pred(c));
    let bus_type = if has(&|c| c.starts_with("nvme")) {
        "nvme"
    } else if has(&|c| c.starts_with("usb")) {
        "usb"
    } else if has(&|c| c.starts_with("ata") && c[3..].bytes().all(|b| b.is_ascii_digit())) {
        "ata"
    } else if scsi.is_some() {
        "scsi"
    } else if has(&|c| c.starts_with("virtio") && c[6..].bytes().all(|b| b.is_ascii_digit())) {
        "virtio"
    } else {
        "unknown"
    };
    DiskAddress {
        device: String::new(),
        bus_type: bus_type.to_owned(),
        pci_address,
        serial: None,
        bus: scsi.map(|s| s[1]),
        target: scsi.map(|s| s[2]),
        unit: scsi.map(|s| s[3]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn paths_give_bus_and_address() {
        let v = address_from_path("/sys/devices/pci0000:00/0000:00:05.0/virtio2/block/vdb");
        assert_eq!(v.bus_type, "virtio");
        assert_eq!(v.pci_address.as_deref(), Some("0000:00:05.0"));
        assert_eq!((v.bus, v.target, v.unit), (None, None, None));
        let s = address_from_path(
            "/sys/devices/pci0000:00/0000:00:06.0/virtio3/host2/target2:0:1/2:0:1:3/block/sda",
        );
        assert_eq!(s.bus_type, "scsi");
        assert_eq!(s.pci_address.as_deref(), Some("0000:00:06.0"));
        assert_eq!((s.bus, s.target, s.unit), (Some(0), Some(1), Some(3)));
        let a = address_from_path(
            "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda",
        );
        assert_eq!(a.bus_type, "ata");
        let n = address_from_path("/sys/devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1");
        assert_eq!(n.bus_type, "nvme");
        let l = address_from_path("/sys/devices/virtual/block/loop0");
        assert_eq!((l.bus_type.as_str(), l.pci_address), ("unknown", None));
    }

    /// A scratch sysfs: LVM (dm-0) on a partition (vdb1) of a virtio disk
    /// with a serial, and a plain virtio disk (vdc) holding a filesystem.
    fn scratch_sysfs() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let vdb = r.join("devices/pci0000:00/0000:00:05.0/virtio2/block/vdb");
        std::fs::create_dir_all(vdb.join("vdb1")).unwrap();
        std::fs::write(vdb.join("serial"), "kvmm-data\n").unwrap();
        std::fs::write(vdb.join("vdb1/partition"), "1\n").unwrap();
        let vdc = r.join("devices/pci0000:00/0000:00:07.0/virtio4/block/vdc");
        std::fs::create_dir_all(&vdc).unwrap();
        let dm = r.join("devices/virtual/block/dm-0");
        std::fs::create_dir_all(dm.join("slaves")).unwrap();
        symlink(
            "../../../../pci0000:00/0000:00:05.0/virtio2/block/vdb/vdb1",
            dm.join("slaves/vdb1"),
        )
        .unwrap();
        std::fs::create_dir_all(r.join("dev/block")).unwrap();
        symlink(
            "../../devices/virtual/block/dm-0",
            r.join("dev/block/253:0"),
        )
        .unwrap();
        symlink(
            "../../devices/pci0000:00/0000:00:07.0/virtio4/block/vdc",
            r.join("dev/block/254:32"),
        )
        .unwrap();
        t
    }

    fn mount(major: u32, minor: u32, mp: &str, source: &str) -> Mount {
        Mount {
            major,
            minor,
            mount_point: mp.into(),
            fs_type: "ext4".into(),
            source: source.into(),
            read_only: false,
        }
    }

    #[test]
    fn block_devices_list_their_dependencies_both_ways() {
        let t = scratch_sysfs();
        let r = t.path();
        let dm = r.join("devices/virtual/block/dm-0");
        std::fs::create_dir_all(dm.join("dm")).unwrap();
        std::fs::write(dm.join("dm/name"), "vg-data\n").unwrap();
        std::fs::write(dm.join("size"), "2048\n").unwrap();
        let vdb = r.join("devices/pci0000:00/0000:00:05.0/virtio2/block/vdb");
        std::fs::create_dir_all(vdb.join("vdb1/holders")).unwrap();
        symlink(
            "../../../../../../virtual/block/dm-0",
            vdb.join("vdb1/holders/dm-0"),
        )
        .unwrap();
        std::fs::write(vdb.join("ro"), "0\n").unwrap();
        std::fs::create_dir_all(r.join("class/block")).unwrap();
        for (name, target) in [
            ("dm-0", "../../devices/virtual/block/dm-0"),
            (
                "vdb",
                "../../devices/pci0000:00/0000:00:05.0/virtio2/block/vdb",
            ),
            (
                "vdb1",
                "../../devices/pci0000:00/0000:00:05.0/virtio2/block/vdb/vdb1",
            ),
        ] {
            symlink(target, r.join("class/block").join(name)).unwrap();
        }
        let b = block_devices(r);
        let get = |n: &str| b.devices.iter().find(|d| d.name == n).unwrap();
        let dm = get("dm-0");
        assert_eq!(
            (dm.kind.as_str(), dm.mapper_name.as_deref()),
            ("dm", Some("vg-data"))
        );
        assert_eq!(
            (dm.size_bytes, dm.dependencies.clone()),
            (1 << 20, vec!["vdb1".to_owned()])
        );
        assert_eq!(dm.address, None);
        let p = get("vdb1");
        assert_eq!(
            (p.kind.as_str(), p.dependencies.clone(), p.holders.clone()),
            ("partition", vec!["vdb".to_owned()], vec!["dm-0".to_owned()])
        );
        let d = get("vdb");
        assert_eq!(
            (d.kind.as_str(), d.holders.clone()),
            ("disk", vec!["vdb1".to_owned()])
        );
        let a = d.address.as_ref().unwrap();
        assert_eq!(
            (a.serial.as_deref(), a.pci_address.as_deref()),
            (Some("kvmm-data"), Some("0000:00:05.0"))
        );
    }

    #[test]
    fn this_machine_lists_block_devices() {
        let b = block_devices(Path::new(SYSFS));
        assert!(b.devices.iter().all(|d| !d.name.is_empty()));
    }

    #[test]
    fn filesystems_map_through_lvm_and_partitions_to_their_disks() {
        let t = scratch_sysfs();
        let mounts = [
            mount(253, 0, "/srv/data", "/dev/mapper/vg-data"),
            mount(254, 32, "/srv/other", "/dev/vdc"),
            mount(0, 22, "/run", "tmpfs"),
            mount(7, 9, "/gone", "/dev/loop9"),
        ];
        let info = fsinfo(t.path(), &mounts);
        assert_eq!(info.filesystems.len(), 2, "{info:?}");
        let data = &info.filesystems[0];
        assert_eq!(
            (data.mount_point.as_str(), data.name.as_str()),
            ("/srv/data", "dm-0")
        );
        assert_eq!(data.disks.len(), 1);
        let d = &data.disks[0];
        assert_eq!(d.device, "/dev/vdb");
        assert_eq!(d.serial.as_deref(), Some("kvmm-data"));
        assert_eq!(d.bus_type, "virtio");
        assert_eq!(d.pci_address.as_deref(), Some("0000:00:05.0"));
        let other = &info.filesystems[1];
        assert_eq!(other.disks[0].device, "/dev/vdc");
        assert_eq!(other.disks[0].serial, None);
    }
}
