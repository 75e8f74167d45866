//! `cargo xtask deps`: installs what the other tasks need, idempotently.
//!
//! Debian packages via `apt-get` (as root; otherwise the exact command is
//! printed and the task fails), Rust targets via `rustup target add`, and the
//! packagers via `cargo install --locked`. Each check is cheap, so every task
//! calls [`ensure`] for the groups it needs.

use std::collections::BTreeSet;
use std::process::Command;

use crate::util::{bail, have_command, heading, is_root, output, run, succeeds, Result};

/// The musl target the agent is built for (static binary).
pub(crate) const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The Windows target `agent-windows` is checked against.
pub(crate) const WINDOWS_TARGET: &str = "x86_64-pc-windows-gnu";

/// A set of prerequisites one task needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    /// Building the guest image: busybox, cpio, the musl target.
    Guest,
    /// Extra libraries for Debian's `qemu-ga` in the guest image (bench).
    QemuGa,
    /// Booting it under QEMU, and socat for the manual ping.
    Qemu,
    /// libvirt daemons and `virsh`.
    Libvirt,
    /// Packages: rpm tools, cargo-deb, cargo-generate-rpm.
    Dist,
    /// The Windows target for `cargo check -p agent-windows`.
    Windows,
    /// rustfmt and clippy (a minimal rustup profile lacks them).
    Lint,
    /// `cargo deny` for the dependency review.
    Review,
    /// `cargo fuzz` (it runs on the nightly toolchain the machines carry).
    Fuzz,
    /// Building the Debian guest image: debootstrap, mkfs.ext4.
    Distro,
}

impl Group {
    /// Every group, for `cargo xtask deps`.
    pub(crate) const ALL: &'static [Group] = &[
        Group::Guest,
        Group::Qemu,
        Group::Libvirt,
        Group::Dist,
        Group::Windows,
        Group::Lint,
        Group::Review,
        Group::Fuzz,
        Group::Distro,
    ];

    fn apt_packages(self) -> &'static [&'static str] {
        match self {
            Group::Guest => &["busybox-static", "cpio", "binutils"],
            // qemu-ga's shared libraries, copied from the host into the guest.
            Group::QemuGa => &["libglib2.0-0", "libnuma1", "liburing2", "libudev1"],
            Group::Qemu => &["qemu-system-x86", "qemu-utils", "socat"],
            Group::Libvirt => &[
                "libvirt-daemon",
                "libvirt-daemon-driver-qemu",
                "libvirt-clients",
            ],
            Group::Dist => &["rpm", "busybox-static", "binutils"],
            Group::Distro => &["debootstrap", "e2fsprogs"],
            Group::Windows | Group::Lint | Group::Review | Group::Fuzz => &[],
        }
    }

    fn rust_components(self) -> &'static [(&'static str, &'static str)] {
        match self {
            // (component, cargo subcommand that proves it is there)
            Group::Lint => &[("rustfmt", "fmt"), ("clippy", "clippy")],
            _ => &[],
        }
    }

    fn rust_targets(self) -> &'static [&'static str] {
        match self {
            Group::Guest | Group::Dist => &[MUSL_TARGET],
            Group::Windows => &[WINDOWS_TARGET],
            _ => &[],
        }
    }

    fn cargo_tools(self) -> &'static [(&'static str, &'static str)] {
        match self {
            // (crate, binary)
            Group::Dist => &[
                ("cargo-deb", "cargo-deb"),
                ("cargo-generate-rpm", "cargo-generate-rpm"),
            ],
            Group::Review => &[("cargo-deny", "cargo-deny")],
            Group::Fuzz => &[("cargo-fuzz", "cargo-fuzz")],
            _ => &[],
        }
    }
}

/// Makes sure every prerequisite of `groups` is installed.
pub(crate) fn ensure(groups: &[Group]) -> Result<()> {
    let mut apt: BTreeSet<&str> = BTreeSet::new();
    let mut targets: BTreeSet<&str> = BTreeSet::new();
    let mut tools: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut components: BTreeSet<(&str, &str)> = BTreeSet::new();
    for g in groups {
        apt.extend(g.apt_packages());
        targets.extend(g.rust_targets());
        tools.extend(g.cargo_tools());
        components.extend(g.rust_components());
    }
    ensure_components(&components.into_iter().collect::<Vec<_>>())?;
    ensure_apt(&apt.into_iter().collect::<Vec<_>>())?;
    ensure_targets(&targets.into_iter().collect::<Vec<_>>())?;
    ensure_cargo_tools(&tools.into_iter().collect::<Vec<_>>())?;
    Ok(())
}

/// `cargo xtask deps`.
pub(crate) fn deps() -> Result<()> {
    heading("deps: checking prerequisites");
    ensure(Group::ALL)?;
    eprintln!("deps: everything is installed");
    Ok(())
}

/// Debian packages among `pkgs` that are not installed.
fn missing_apt(pkgs: &[&str]) -> Vec<String> {
    pkgs.iter()
        .filter(|p| {
            let st = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(st, Ok(o) if o.status.success()
                && String::from_utf8_lossy(&o.stdout).ends_with("install ok installed"))
        })
        .map(|p| p.to_string())
        .collect()
}

fn ensure_apt(pkgs: &[&str]) -> Result<()> {
    if pkgs.is_empty() {
        return Ok(());
    }
    if !have_command("dpkg-query") {
        bail!("this task needs a Debian-like system (dpkg/apt); missing: {pkgs:?}");
    }
    let missing = missing_apt(pkgs);
    if missing.is_empty() {
        return Ok(());
    }
    let line = format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
        missing.join(" ")
    );
    if !is_root() {
        bail!(
            "missing Debian packages: {}\nrun as root:\n  {line}",
            missing.join(" ")
        );
    }
    eprintln!("deps: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q"])
        .args(&missing))?;
    let still = missing_apt(pkgs);
    if !still.is_empty() {
        bail!("apt-get did not install: {}", still.join(" "));
    }
    Ok(())
}

/// Rust targets installed through rustup (empty if rustup is absent).
pub(crate) fn installed_targets() -> Vec<String> {
    output(Command::new("rustup").args(["target", "list", "--installed"]))
        .map(|s| s.lines().map(|l| l.trim().to_owned()).collect())
        .unwrap_or_default()
}

/// True if the Rust standard library for `target` is installed.
pub(crate) fn has_target(target: &str) -> bool {
    if installed_targets().iter().any(|t| t == target) {
        return true;
    }
    // Without rustup, look in the sysroot directly.
    output(Command::new("rustc").args(["--print", "sysroot"]))
        .map(|s| {
            std::path::Path::new(s.trim())
                .join("lib/rustlib")
                .join(target)
                .is_dir()
        })
        .unwrap_or(false)
}

fn ensure_targets(targets: &[&str]) -> Result<()> {
    for t in targets {
        if has_target(t) {
            continue;
        }
        if !have_command("rustup") {
            bail!("the Rust target {t} is missing and rustup is not installed; install it with rustup: rustup target add {t}");
        }
        eprintln!("deps: adding Rust target {t}");
        run(Command::new("rustup").args(["target", "add", t]))?;
    }
    Ok(())
}

fn ensure_components(components: &[(&str, &str)]) -> Result<()> {
    for (component, subcommand) in components {
        if succeeds(crate::util::cargo().args([subcommand, "--version"])) {
            continue;
        }
        if !have_command("rustup") {
            bail!("cargo {subcommand} is missing and rustup is not installed; install the {component} component");
        }
        eprintln!("deps: adding Rust component {component}");
        run(Command::new("rustup").args(["component", "add", component]))?;
    }
    Ok(())
}

fn ensure_cargo_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(_, bin)| !have_command(bin) && !cargo_bin_exists(bin))
        .map(|(krate, _)| *krate)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("deps: installing cargo tools: {}", missing.join(" "));
    run(crate::util::cargo()
        .env_remove("CARGO_TARGET_DIR")
        .args(["install", "--locked"])
        .args(&missing))?;
    Ok(())
}

fn cargo_bin_exists(bin: &str) -> bool {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")));
    match home {
        Some(h) => succeeds(Command::new(h.join("bin").join(bin)).arg("--version")),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_apt_reports_only_absent_packages() {
        // dpkg itself is installed wherever this task can run at all.
        let pkgs = ["dpkg", "kvmmanager-no-such-package"];
        assert_eq!(
            missing_apt(&pkgs),
            vec!["kvmmanager-no-such-package".to_owned()]
        );
    }

    #[test]
    fn every_group_needs_something() {
        for g in Group::ALL {
            let n = g.apt_packages().len()
                + g.rust_targets().len()
                + g.cargo_tools().len()
                + g.rust_components().len();
            assert!(n > 0, "{g:?} is empty");
        }
    }
}
