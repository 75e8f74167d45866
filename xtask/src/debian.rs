//! The Debian 12 guest: a distribution as a user has it, built from Debian
//! packages alone and cached outside the clone, keyed by its inputs.
//!
//! `debootstrap --variant=minbase` of bookworm with systemd, udev, dbus and
//! the cloud kernel (see `../shared/VM-TESTING.md` for why each is there),
//! packed into an ext4 root disk image with `mkfs.ext4 -d`; its kernel and
//! Debian's own initramfs are copied out for a direct kernel boot. A second,
//! small ext4 data disk (label `kvmm-data`, mounted at `/srv/data`) is for
//! tests that need a disk of their own. The image holds **no agent**: tests
//! install the freshly built `.deb` with `apt install` in the running guest.
//!
//! How the `.deb` gets in: the image has one unit of test plumbing,
//! `kvmm-console-report.service`. At every boot it prints a marker line
//! (`KVMM-DEBIAN-UP`) on the serial console, which the host reads; and on
//! the first boot that finds a disk labelled `KVMMPROV` (a read-only disk
//! the test attaches, holding the `.deb` and `provision.sh`) it runs that
//! script once, its output on the console, the way a provisioning tool
//! (cloud-init's `runcmd`) would. Nothing else of the test is in the image.
//!
//! Each boot runs on qcow2 overlays of the cached disks, so the cache stays
//! pristine and repeated runs (and CI on the same machine) reuse it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::deps::{self, Group};
use crate::util::{bail, heading, is_root, output, run, Result};

/// The Debian release of the guest.
pub(crate) const SUITE: &str = "bookworm";
/// The guest's host name.
pub(crate) const HOSTNAME: &str = "kvmm-debian";
/// Printed on the console by the image at the end of every boot.
pub(crate) const UP_MARKER: &str = "KVMM-DEBIAN-UP";
/// Printed once the provisioning script ran: `KVMM-PROVISIONED rc=N`.
pub(crate) const PROVISIONED_MARKER: &str = "KVMM-PROVISIONED";
/// Label of the provisioning disk the image looks for.
pub(crate) const PROVISION_LABEL: &str = "KVMMPROV";
/// Serial number of the data disk (what the host sees as the disk's serial).
pub(crate) const DATA_SERIAL: &str = "kvmm-data";
/// Where the image mounts the data disk.
pub(crate) const DATA_MOUNT: &str = "/srv/data";
/// Root password, for a person on the serial console (`--distro debian --keep`).
pub(crate) const ROOT_PASSWORD: &str = "kvmm";

/// Where the image keeps Debian's `qemu-guest-agent` `.deb` (not
/// installed; its libraries are), for the test that installs it beside the
/// agent with `apt install`, offline.
pub(crate) const QEMU_GA_DEB_DIR: &str = "/var/cache/kvmm-debs";

/// Printed by [`INSTALL_SCRIPT`] after `apt install`: the unit's state.
pub(crate) const AGENT_STATE_MARKER: &str = "KVMM-AGENT-STATE";

/// What the provisioning disk runs in the guest: the install a user types.
pub(crate) const INSTALL_SCRIPT: &str = r#"set -u
deb=$(ls kvmmanager-agent_*.deb)
echo "KVMM-PROVISION: apt install ./$deb"
cp "$deb" /root/
cd /root
DEBIAN_FRONTEND=noninteractive apt install -y "./$deb" >/var/log/kvmm-install.log 2>&1
rc=$?
[ "$rc" = 0 ] || tail -n 20 /var/log/kvmm-install.log
echo "KVMM-AGENT-STATE $(systemctl is-active kvmmanager-agent.service)"
exit $rc
"#;

/// Packages on top of debootstrap's minbase. `dbus` and `libpam-systemd`:
/// without them `shutdown` fails with "Failed to connect to bus".
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "libpam-systemd",
    "linux-image-cloud-amd64",
    "e2fsprogs",
    "iproute2",
    "procps",
    "kmod",
    // Installed by debootstrap only to pull in its libraries and keep its
    // `.deb` (QEMU_GA_DEB_DIR); purged again by the setup script, so the
    // guest boots with no qemu-ga and the test installs it with apt.
    "qemu-guest-agent",
];

/// Bump when the recipe below changes in a way the other inputs do not show.
const RECIPE_VERSION: u32 = 4;

/// Size of the root disk (sparse).
const ROOT_SIZE: &str = "2G";
/// Size of the data disk (sparse).
const DATA_SIZE: &str = "128M";

/// The console reporter of the image (the only test plumbing in it).
const REPORT_SCRIPT: &str = r#"#!/bin/sh
# kvmm-console-report: test plumbing of the kvmmanager test image.
# Reports each boot on the serial console and, once, runs the provisioning
# disk's script (label KVMMPROV) the way a provisioning tool would.
# /dev/console, not /dev/ttyS0: serial-getty's vhangup() of ttyS0 cuts off
# every other writer of that device, but never the console.
exec >/dev/console 2>&1
udevadm settle --timeout=30 || true
dev=$(blkid -L KVMMPROV 2>/dev/null || true)
if [ -n "$dev" ] && [ ! -e /var/lib/kvmm-provision/done ]; then
    mkdir -p /run/kvmm-provision /var/lib/kvmm-provision
    if mount -o ro "$dev" /run/kvmm-provision; then
        (cd /run/kvmm-provision && sh ./provision.sh)
        echo "KVMM-PROVISIONED rc=$?"
        umount /run/kvmm-provision || true
    else
        echo "KVMM-PROVISIONED rc=mount-failed"
    fi
    touch /var/lib/kvmm-provision/done
fi
echo "KVMM-DEBIAN-UP uptime=$(cut -d' ' -f1 /proc/uptime)"
"#;

const REPORT_UNIT: &str = r#"[Unit]
Description=kvmmanager test image: report boots on the console, run a provisioning disk once
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/kvmm-console-report
# An apt install under TCG can take minutes.
TimeoutStartSec=20min

[Install]
WantedBy=multi-user.target
"#;

/// Run in the chroot after debootstrap.
fn setup_script() -> String {
    format!(
        r#"set -e
echo {HOSTNAME} > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n' > /etc/hosts
cat > /etc/fstab <<'EOF'
LABEL=kvmm-root / ext4 rw,errors=remount-ro 0 1
LABEL=kvmm-data {DATA_MOUNT} ext4 rw,nofail,x-systemd.device-timeout=20s 0 2
EOF
mkdir -p {DATA_MOUNT}
echo 'root:{ROOT_PASSWORD}' | chpasswd
systemctl enable serial-getty@ttyS0.service
cat > /usr/local/sbin/kvmm-console-report <<'EOF'
{REPORT_SCRIPT}EOF
chmod 755 /usr/local/sbin/kvmm-console-report
cat > /etc/systemd/system/kvmm-console-report.service <<'EOF'
{REPORT_UNIT}EOF
systemctl enable kvmm-console-report.service
# Debian's qemu-guest-agent: keep its .deb, purge the package (its
# libraries stay installed), so the guest has no qemu-ga until a test
# installs it beside the agent with apt, offline.
mkdir -p {QEMU_GA_DEB_DIR}
cp /var/cache/apt/archives/qemu-guest-agent_*.deb {QEMU_GA_DEB_DIR}/
dpkg --purge qemu-guest-agent
apt-mark manual libglib2.0-0 libnuma1 liburing2
test ! -e /usr/sbin/qemu-ga
# A fresh machine id on first boot, like a cloud image.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
apt-get clean
rm -rf /var/lib/apt/lists/*
"#
    )
}

/// A built (cached) Debian image.
#[derive(Debug, Clone)]
pub(crate) struct DebianImage {
    /// Raw ext4 root disk (never written: boots use overlays).
    pub(crate) root: PathBuf,
    /// Raw ext4 data disk.
    pub(crate) data: PathBuf,
    /// The guest's kernel.
    pub(crate) kernel: PathBuf,
    /// Debian's initramfs for it.
    pub(crate) initrd: PathBuf,
}

/// 64-bit FNV-1a: a cache key that stays the same across toolchains.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The folder cached images live in, outside the clone:
/// `$XTASK_CACHE_DIR`, else `/var/cache/kvmmanager-xtask` as root, else
/// `$XDG_CACHE_HOME` or `~/.cache` + `/kvmmanager-xtask`.
pub(crate) fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("XTASK_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if is_root() {
        return PathBuf::from("/var/cache/kvmmanager-xtask");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("kvmmanager-xtask")
}

/// The Debian archive this machine's apt uses for `suite` (first match in
/// deb822 `.sources` files, then one-line `sources.list` entries);
/// `$XTASK_DEBIAN_MIRROR` overrides.
fn mirror() -> Result<String> {
    if let Ok(m) = std::env::var("XTASK_DEBIAN_MIRROR") {
        return Ok(m);
    }
    let mut texts = Vec::new();
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            if f.extension().is_some_and(|e| e == "sources" || e == "list") {
                texts.push(fs::read_to_string(&f).unwrap_or_default());
            }
        }
    }
    texts.push(fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    texts
        .iter()
        .find_map(|t| mirror_in(t, SUITE))
        .ok_or_else(|| {
            format!(
                "no apt source for Debian {SUITE} in /etc/apt/sources.list(.d): \
                 set XTASK_DEBIAN_MIRROR to a Debian archive URL"
            )
            .into()
        })
}

/// The first archive URI serving `suite` (exactly, not `-security` or
/// `-updates`) in an apt sources text, deb822 or one-line format.
fn mirror_in(text: &str, suite: &str) -> Option<String> {
    // deb822: blank-line separated stanzas.
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(|v| v.trim().to_owned())
            })
        };
        let (Some(types), Some(uris), Some(suites)) =
            (field("Types"), field("URIs"), field("Suites"))
        else {
            continue;
        };
        if types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == suite)
        {
            if let Some(u) = uris.split_whitespace().next() {
                return Some(u.to_owned());
            }
        }
    }
    // One-line: deb [opts] URI SUITE COMPONENTS...
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace().peekable();
        if w.next() != Some("deb") {
            return None;
        }
        if w.peek().is_some_and(|x| x.starts_with('[')) {
            // Skip "[...]" options, which may span words.
            for x in w.by_ref() {
                if x.ends_with(']') {
                    break;
                }
            }
        }
        let uri = w.next()?;
        (w.next() == Some(suite)).then(|| uri.to_owned())
    })
}

/// Builds the image unless the cache holds it; prints build time.
pub(crate) fn build() -> Result<DebianImage> {
    heading("debian-image");
    let mirror = mirror()?;
    let setup = setup_script();
    let packages = PACKAGES.join(",");
    let key = fnv1a(&[
        &RECIPE_VERSION.to_string(),
        SUITE,
        &packages,
        &mirror,
        &setup,
        ROOT_SIZE,
        DATA_SIZE,
    ]);
    let cache = cache_root();
    let dir = cache.join(format!("debian-{SUITE}-{key:016x}"));
    let image = DebianImage {
        root: dir.join("root.img"),
        data: dir.join("data.img"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    };
    let stamp = dir.join("built");
    if stamp.is_file() {
        eprintln!(
            "debian-image: cached in {} ({})",
            dir.display(),
            fs::read_to_string(&stamp).unwrap_or_default().trim()
        );
        return Ok(image);
    }
    if !is_root() {
        bail!(
            "building the Debian guest image needs root (debootstrap, chroot); \
             run `cargo xtask vm-test` as root, or build it once as root into a \
             shared cache with XTASK_CACHE_DIR"
        );
    }
    deps::ensure(&[Group::Distro])?;
    // One image at a time: drop images of older inputs.
    if let Ok(entries) = fs::read_dir(&cache) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("debian-") && e.path() != dir {
                eprintln!("debian-image: removing the outdated {}", e.path().display());
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let rootfs = dir.join("rootfs");
    eprintln!("debian-image: debootstrap {SUITE} (minbase + {packages}) from the machine's Debian archive");
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include"])
        .arg(&packages)
        .arg(SUITE)
        .arg(&rootfs)
        .arg(&mirror))?;
    let strapped = started.elapsed();
    run(Command::new("chroot")
        .arg(&rootfs)
        .args(["/bin/sh", "-c", &setup]))?;
    copy_boot_files(&rootfs, &image)?;
    mkfs(&image.root, ROOT_SIZE, "kvmm-root", Some(&rootfs))?;
    mkfs(&image.data, DATA_SIZE, "kvmm-data", None)?;
    fs::remove_dir_all(&rootfs)?;
    let took = started.elapsed();
    let note = format!(
        "built in {:.0} s (debootstrap {:.0} s) on {}",
        took.as_secs_f64(),
        strapped.as_secs_f64(),
        output(Command::new("date").arg("-u").arg("+%F %T UTC"))?.trim()
    );
    fs::write(&stamp, format!("{note}\n"))?;
    eprintln!("debian-image: {note}: {}", dir.display());
    Ok(image)
}

/// Copies `/boot/vmlinuz-*` and `/boot/initrd.img-*` out of the rootfs.
fn copy_boot_files(rootfs: &Path, image: &DebianImage) -> Result<()> {
    let boot = rootfs.join("boot");
    let mut kernel = None;
    let mut initrd = None;
    for e in fs::read_dir(&boot)? {
        let p = e?.path();
        let n = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if n.starts_with("vmlinuz-") {
            kernel = Some(p);
        } else if n.starts_with("initrd.img-") {
            initrd = Some(p);
        }
    }
    let (Some(k), Some(i)) = (kernel, initrd) else {
        bail!(
            "no vmlinuz-*/initrd.img-* in {} after debootstrap",
            boot.display()
        );
    };
    fs::copy(k, &image.kernel)?;
    fs::copy(i, &image.initrd)?;
    Ok(())
}

/// A sparse ext4 disk image of `size` with `label`, filled from `from`.
pub(crate) fn mkfs(img: &Path, size: &str, label: &str, from: Option<&Path>) -> Result<()> {
    run(Command::new("truncate").args(["-s", size]).arg(img))?;
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", label]);
    if let Some(d) = from {
        cmd.arg("-d").arg(d);
    }
    run(cmd.arg(img))
}

/// A qcow2 overlay of `base` at `overlay` (the base is never written).
pub(crate) fn overlay(base: &Path, overlay: &Path) -> Result<()> {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay))
}

/// The provisioning disk: an ext2 image labelled `KVMMPROV` holding the
/// given files and `provision.sh`.
pub(crate) fn provision_disk(img: &Path, files: &[&Path], script: &str) -> Result<()> {
    let dir = img.with_extension("d");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    let mut bytes = 0;
    for f in files {
        let name = f
            .file_name()
            .ok_or_else(|| format!("no file name in {}", f.display()))?;
        bytes += fs::copy(f, dir.join(name))?;
    }
    fs::write(dir.join("provision.sh"), script)?;
    let size = format!("{}M", 16 + bytes / (1 << 20) * 2);
    run(Command::new("truncate").args(["-s", &size]).arg(img))?;
    run(Command::new("mkfs.ext2")
        .args(["-q", "-F", "-L", PROVISION_LABEL, "-d"])
        .arg(&dir)
        .arg(img))?;
    fs::remove_dir_all(&dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_is_found_in_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_in(deb822, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        let security_only = "Types: deb\nURIs: http://s.example/x\nSuites: bookworm-security\n";
        assert_eq!(mirror_in(security_only, "bookworm"), None);
        let src_only = "Types: deb-src\nURIs: http://s.example/x\nSuites: bookworm\n";
        assert_eq!(mirror_in(src_only, "bookworm"), None);
        let one_line = "# comment\ndeb-src http://a.example/d bookworm main\n\
                        deb [arch=amd64 signed-by=/k.gpg] http://b.example/d bookworm main\n";
        assert_eq!(
            mirror_in(one_line, "bookworm").as_deref(),
            Some("http://b.example/d")
        );
    }

    #[test]
    fn cache_key_depends_on_every_input() {
        let a = fnv1a(&["1", "bookworm", "udev"]);
        assert_eq!(a, fnv1a(&["1", "bookworm", "udev"]));
        assert_ne!(a, fnv1a(&["2", "bookworm", "udev"]));
        // Parts are separated: moving a byte across parts changes the key.
        assert_ne!(fnv1a(&["ab", "c"]), fnv1a(&["a", "bc"]));
    }

    #[test]
    fn setup_script_installs_the_reporter_and_no_agent() {
        let s = setup_script();
        assert!(s.contains("systemctl enable kvmm-console-report.service"));
        assert!(s.contains(HOSTNAME));
        assert!(s.contains(DATA_MOUNT));
        assert!(
            !s.contains("kvmmanager-agent"),
            "the image must not carry the agent"
        );
        assert!(REPORT_SCRIPT.contains(PROVISION_LABEL));
        assert!(REPORT_SCRIPT.contains(UP_MARKER));
        assert!(REPORT_SCRIPT.contains(PROVISIONED_MARKER));
    }
}
