//! The mount table (`/proc/self/mountinfo`) and which of its filesystems
//! `fs_freeze`, `fs_trim` and `get_fsinfo` act on.

use std::io;

use crate::sysinfo::unescape_mount_field;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Device number of the filesystem (`major:minor`).
    pub major: u32,
    /// Minor device number.
    pub minor: u32,
    /// Where it is mounted.
    pub mount_point: String,
    /// Filesystem type.
    pub fs_type: String,
    /// The mount source (`/dev/vda1`, `tmpfs`, `server:/export`).
    pub source: String,
    /// Mounted read-only (the mount or its superblock).
    pub read_only: bool,
}

/// Filesystem types on a network or in userspace: never frozen or trimmed.
const REMOTE_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ceph",
    "glusterfs",
    "9p",
    "virtiofs",
    "afs",
    "ncpfs",
    "davfs",
];

impl Mount {
    /// Why this filesystem cannot be frozen or trimmed; `None` if it can:
    /// a local, writable filesystem on a block device.
    pub fn unsuitable(&self) -> Option<&'static str> {
        if self.fs_type.starts_with("fuse") || REMOTE_FS.contains(&self.fs_type.as_str()) {
            Some("it is a network or userspace filesystem")
        } else if !self.source.starts_with("/dev/") {
            Some("it is not on a block device (a virtual filesystem such as tmpfs or proc)")
        } else if self.read_only {
            Some("it is mounted read-only")
        } else {
            None
        }
    }
}

/// Parses the text of `/proc/self/mountinfo`, in mount order.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let _id = l.next()?;
    let _parent = l.next()?;
    let (major, minor) = l.next()?.split_once(':')?;
    let _root = l.next()?;
    let mount_point = unescape_mount_field(l.next()?);
    let mount_opts = l.next()?;
    let mut r = right.split(' ');
    let fs_type = r.next()?.to_owned();
    let source = unescape_mount_field(r.next()?);
    let super_opts = r.next().unwrap_or("");
    let ro = |opts: &str| opts.split(',').any(|o| o == "ro");
    Some(Mount {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mount_point,
        fs_type,
        source,
        read_only: ro(mount_opts) || ro(super_opts),
    })
}

/// The mount table of the agent's mount namespace.
pub fn read_mounts() -> io::Result<Vec<Mount>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Why a selection of mount points was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// An explicit list was empty.
    #[error("mount_points is empty: leave it out to select every local filesystem")]
    Empty,
    /// A name that is not a mount point.
    #[error("{0} is not a mount point (see get_fsinfo or get_disk_usage)")]
    NotMounted(String),
    /// A mount point that cannot be acted on.
    #[error("{mount_point} cannot be used: {reason}")]
    Unsuitable {
        /// The mount point.
        mount_point: String,
        /// Why.
        reason: &'static str,
    },
}

/// The filesystems to act on, in mount order, one per filesystem (a
/// filesystem mounted twice, a bind mount, appears once, at its first
/// mount). `wanted`: the host's list (each must be a mount point of a
/// suitable filesystem, else an error naming it); `None`: every suitable
/// filesystem.
pub fn select(mounts: &[Mount], wanted: Option<&[String]>) -> Result<Vec<Mount>, SelectError> {
    let mut picked: Vec<Mount> = Vec::new();
    let mut push = |m: &Mount| {
        if !picked
            .iter()
            .any(|p| (p.major, p.minor) == (m.major, m.minor))
        {
            picked.push(m.clone());
        }
    };
    match wanted {
        None => mounts
            .iter()
            .filter(|m| m.unsuitable().is_none())
            .for_each(&mut push),
        Some([]) => return Err(SelectError::Empty),
        Some(list) => {
            let mut chosen: Vec<&Mount> = Vec::new();
            for w in list {
                let norm = normalize_mount_point(w);
                // The last mount at a point is the one visible there.
                let Some(m) = mounts.iter().rev().find(|m| m.mount_point == norm) else {
                    return Err(SelectError::NotMounted(w.clone()));
                };
                if let Some(reason) = m.unsuitable() {
                    return Err(SelectError::Unsuitable {
                        mount_point: norm,
                        reason,
                    });
                }
                chosen.push(m);
            }
            // Keep mount order whatever order the host gave.
            for m in mounts {
                if chosen.iter().any(|c| std::ptr::eq(*c, m)) {
                    push(m);
                }
            }
        }
    }
    Ok(picked)
}

/// `/srv/data/` → `/srv/data`; `/` stays.
fn normalize_mount_point(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".to_owned()
    } else {
        t.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid - proc proc rw
24 22 0:22 / /run rw - tmpfs tmpfs rw,size=100k
25 22 254:16 / /srv/data rw,relatime shared:2 - ext4 /dev/vdb rw
26 25 254:16 /sub /srv/data/bind rw - ext4 /dev/vdb rw
27 22 7:0 / /mnt/with\\040space rw - ext4 /dev/loop0 rw
28 22 254:32 / /media/cd ro - iso9660 /dev/sr0 ro
29 22 0:40 / /nfs rw - nfs4 host:/export rw
30 22 0:41 / /fuse rw - fuse.sshfs u@h:/ rw
31 22 254:48 / /ro-super rw - xfs /dev/vdc ro
";

    #[test]
    fn mountinfo_parses_with_escapes_and_read_only_flags() {
        let m = parse_mountinfo(TABLE);
        assert_eq!(m.len(), 10);
        assert_eq!(m[0].mount_point, "/");
        assert_eq!((m[0].major, m[0].minor), (254, 1));
        assert_eq!(m[5].mount_point, "/mnt/with space");
        assert_eq!(m[5].source, "/dev/loop0");
        assert!(m[6].read_only && m[9].read_only && !m[0].read_only);
        assert!(parse_mountinfo("garbage\n1 2 x\n").is_empty());
    }

    #[test]
    fn default_selection_is_local_writable_block_filesystems_once_each() {
        let m = parse_mountinfo(TABLE);
        let s: Vec<String> = select(&m, None)
            .unwrap()
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        assert_eq!(s, ["/", "/srv/data", "/mnt/with space"]);
    }

    #[test]
    fn explicit_selection_checks_each_name_and_keeps_mount_order() {
        let m = parse_mountinfo(TABLE);
        let want = |l: &[&str]| {
            let l: Vec<String> = l.iter().map(|s| s.to_string()).collect();
            select(&m, Some(&l)).map(|v| v.into_iter().map(|m| m.mount_point).collect::<Vec<_>>())
        };
        assert_eq!(want(&["/srv/data/", "/"]).unwrap(), ["/", "/srv/data"]);
        assert_eq!(want(&[]), Err(SelectError::Empty));
        assert_eq!(want(&["/srv"]), Err(SelectError::NotMounted("/srv".into())));
        for bad in ["/run", "/proc", "/nfs", "/fuse", "/media/cd", "/ro-super"] {
            assert!(
                matches!(want(&[bad]), Err(SelectError::Unsuitable { .. })),
                "{bad}"
            );
        }
        // A bind mount of a filesystem already chosen is the same filesystem.
        assert_eq!(
            want(&["/srv/data", "/srv/data/bind"]).unwrap(),
            ["/srv/data"]
        );
    }
}
