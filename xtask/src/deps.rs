//! `cargo xtask deps`: installs what the other tasks need, idempotently.
//!
//! Debian packages via `apt-get` (as root; otherwise the exact command is
//! printed and the task fails), never removing a package the machine has:
//! apt's plan is simulated first, a package it would remove is upgraded
//! alongside instead, and if that does not help the task stops and says
//! which packages and why. Rust targets via `rustup target add`, and the
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
    /// Booting it under QEMU (qemu-img for disk overlays), and socat for
    /// the manual ping.
    Qemu,
    /// Building the Debian guest image: debootstrap, and mkfs.ext4 for its
    /// disks.
    Distro,
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
    /// Debian's qemu-ga, the peer the qemu-ga dialect's tests compare
    /// reply bytes with (`agent-linux/tests/qga.rs`).
    Peer,
}

impl Group {
    /// Every group, for `cargo xtask deps`.
    pub(crate) const ALL: &'static [Group] = &[
        Group::Guest,
        Group::Qemu,
        Group::Distro,
        Group::Libvirt,
        Group::Dist,
        Group::Windows,
        Group::Lint,
        Group::Review,
        Group::Fuzz,
        Group::Peer,
    ];

    fn apt_packages(self) -> &'static [&'static str] {
        match self {
            Group::Guest => &["busybox-static", "cpio", "binutils"],
            // qemu-ga's shared libraries, copied from the host into the guest.
            Group::QemuGa => &["libglib2.0-0", "libnuma1", "liburing2", "libudev1"],
            // bsdutils: `script`, the terminal `top` is captured in;
            // python3-venv: the venv of the MCP client (fleet_checks.rs);
            // tmux and curl: the stream checks' terminal and HTTP client.
            Group::Qemu => &[
                "qemu-system-x86",
                "qemu-utils",
                "socat",
                "bsdutils",
                "python3-venv",
                "tmux",
                "curl",
            ],
            Group::Distro => &["debootstrap", "e2fsprogs"],
            Group::Peer => &["qemu-guest-agent"],
            // prometheus and curl: the exporter's check scrapes two domains
            // with a real Prometheus and reads its HTTP API.
            Group::Libvirt => &[
                "libvirt-daemon",
                "libvirt-daemon-driver-qemu",
                "libvirt-clients",
                "prometheus",
                "curl",
            ],
            Group::Dist => &["rpm", "busybox-static", "binutils"],
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

/// Packages `apt-get install -s` (a simulation) says it would remove:
/// its `Remv PKG [VERSION]` lines (`Purg` with `--purge`).
fn parse_removals(simulation: &str) -> Vec<String> {
    let mut out: Vec<String> = simulation
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next()) {
                (Some("Remv" | "Purg"), Some(pkg)) => Some(pkg.to_owned()),
                _ => None,
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `apt-get install` of `pkgs` with these options.
fn apt_install(opts: &[&str], pkgs: &[String]) -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive")
        .arg("install")
        .args(opts)
        .args(pkgs);
    c
}

/// How many times a simulation may add packages to upgrade alongside.
const SIMULATION_ROUNDS: usize = 3;

/// What to install so that `missing` gets installed and nothing is removed:
/// `missing` plus every installed package apt would otherwise remove (it
/// is upgraded alongside, as a newer dependency usually needs). Fails,
/// naming the packages, if apt would still remove some.
fn plan_install(missing: &[String]) -> Result<Vec<String>> {
    let first = crate::util::render(&apt_install(&["-s", "-q"], missing));
    let stop = |removals: &[String], why: String| -> Result<Vec<String>> {
        bail!(
            "installing {} would remove {}: {why}\n\
             Nothing was changed. See apt's plan with:\n  {first}\n\
             then upgrade or remove those packages yourself and run the task again",
            missing.join(" "),
            removals.join(" "),
        )
    };
    let mut list: Vec<String> = missing.to_vec();
    let mut removals: Vec<String> = Vec::new();
    for _ in 0..SIMULATION_ROUNDS {
        let mut sim = apt_install(&["-s", "-q"], &list);
        let plan = match output(&mut sim) {
            Ok(plan) => plan,
            // The first simulation failing is apt's own error, as is.
            Err(e) if removals.is_empty() => return Err(e),
            Err(e) => {
                return stop(
                    &removals,
                    format!("apt cannot upgrade them alongside:\n{e}"),
                )
            }
        };
        removals = parse_removals(&plan);
        if removals.is_empty() {
            return Ok(list);
        }
        let new: Vec<String> = removals
            .iter()
            .filter(|r| !list.contains(r))
            .cloned()
            .collect();
        if new.is_empty() {
            return stop(
                &removals,
                "apt removes them even when asked to upgrade them alongside".to_owned(),
            );
        }
        eprintln!(
            "deps: apt would remove {} to install {}: upgrading {} alongside instead",
            removals.join(" "),
            list.join(" "),
            new.join(" ")
        );
        list.extend(new);
    }
    stop(
        &removals,
        format!(
            "still plans removals after {SIMULATION_ROUNDS} rounds of upgrading packages alongside"
        ),
    )
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
    if !is_root() {
        // --no-remove: apt stops rather than remove a package.
        bail!(
            "missing Debian packages: {}\nrun as root:\n  apt-get update && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y --no-remove {}\n\
             (if apt refuses because it would remove a package, add that package \
             to the list to upgrade it alongside)",
            missing.join(" "),
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    let list = plan_install(&missing)?;
    eprintln!("deps: installing Debian packages: {}", list.join(" "));
    // --no-remove as well: should the real run differ from the simulation,
    // apt stops instead of removing anything.
    run(&mut apt_install(&["-y", "-q", "--no-remove"], &list))?;
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

    #[test]
    fn parse_removals_reads_remv_and_purg_lines() {
        // Shaped after `apt-get install -s qemu-system-x86` on a machine with
        // an older qemu-utils (issue 12).
        let sim = "\
NOTE: This is only a simulation!
      apt-get needs root privileges for real execution.
Reading package lists...
The following packages will be REMOVED:
  qemu-utils
The following NEW packages will be installed:
  qemu-system-x86
The following packages will be upgraded:
  qemu-system-common
1 upgraded, 1 newly installed, 1 to remove and 0 not upgraded.
Remv qemu-utils [1:7.2+dfsg-7+deb12u6]
Inst qemu-system-common [1:7.2+dfsg-7+deb12u6] (1:7.2+dfsg-7+deb12u18 Debian:12.15/oldstable [amd64])
Inst qemu-system-x86 (1:7.2+dfsg-7+deb12u18 Debian:12.15/oldstable [amd64])
Purg libfoo1:i386 [2.0-1]
Remv qemu-utils [1:7.2+dfsg-7+deb12u6]
Conf qemu-system-common (1:7.2+dfsg-7+deb12u18 Debian:12.15/oldstable [amd64])
";
        assert_eq!(parse_removals(sim), ["libfoo1:i386", "qemu-utils"]);
        let cases = [
            "",
            "0 upgraded, 0 newly installed, 0 to remove and 3 not upgraded.\n",
            "Inst socat (1.7.4.4-2 Debian:12.15/oldstable [amd64])\nConf socat (1.7.4.4-2)\n",
            // Only a line's first word counts.
            "Inst Remv (1.0)\n  Remv\n",
        ];
        for sim in cases {
            assert!(parse_removals(sim).is_empty(), "{sim:?}");
        }
    }

    #[test]
    fn simulation_is_never_the_real_thing() {
        let sim = apt_install(&["-s", "-q"], &["socat".to_owned()]);
        let args: Vec<_> = sim.get_args().collect();
        assert_eq!(args, ["install", "-s", "-q", "socat"]);
    }
}
