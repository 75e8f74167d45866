//! `cargo xtask dist`: the release build of the agent and its packages.
//!
//! A static musl build (stripped), then a `.deb` (cargo-deb) and an `.rpm`
//! (cargo-generate-rpm) in `target/dist/`. The package metadata lives in
//! `agent-linux/Cargo.toml` (`[package.metadata.deb]`,
//! `[package.metadata.generate-rpm]`), copied from `packaging/metadata.toml`;
//! a check keeps the two in step. `--check` inspects both packages and
//! installs the `.deb` into a scratch root (maintainer scripts included,
//! run by busybox in that root), then removes and purges it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::deps::{self, Group, MUSL_TARGET};
use crate::util::{bail, cargo, heading, output, root, run, target_dir, Result};

/// The package name, in both formats.
const PACKAGE: &str = "kvmmanager-agent";

/// Files every package must hold.
const DEB_FILES: &[&str] = &[
    "/usr/bin/kvmmanager-agent",
    "/etc/kvmmanager-agent/config.json",
    "/lib/systemd/system/kvmmanager-agent.service",
    "/lib/udev/rules.d/99-kvmmanager-agent.rules",
    "/usr/share/doc/kvmmanager-agent/README.md",
    "/usr/share/doc/kvmmanager-agent/PROTOCOL.md",
    "/usr/share/doc/kvmmanager-agent/SECURITY.md",
];
const RPM_FILES: &[&str] = &[
    "/usr/bin/kvmmanager-agent",
    "/etc/kvmmanager-agent/config.json",
    "/usr/lib/systemd/system/kvmmanager-agent.service",
    "/usr/lib/udev/rules.d/99-kvmmanager-agent.rules",
    "/usr/share/doc/kvmmanager-agent/README.md",
    "/usr/share/doc/kvmmanager-agent/PROTOCOL.md",
    "/usr/share/doc/kvmmanager-agent/SECURITY.md",
];
const CONFIG_FILE: &str = "/etc/kvmmanager-agent/config.json";

/// Built packages.
#[derive(Debug)]
pub(crate) struct Packages {
    deb: PathBuf,
    rpm: PathBuf,
}

/// Lines of `packaging/metadata.toml` (tables and keys, no comments) missing
/// from `agent-linux/Cargo.toml`.
fn metadata_drift(metadata: &str, manifest: &str) -> Vec<String> {
    let manifest_lines: std::collections::HashSet<&str> = manifest.lines().map(str::trim).collect();
    metadata
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| !manifest_lines.contains(l))
        .map(str::to_owned)
        .collect()
}

fn check_metadata() -> Result<()> {
    let manifest_path = root().join("agent-linux/Cargo.toml");
    let metadata_path = root().join("packaging/metadata.toml");
    let manifest = fs::read_to_string(&manifest_path)?;
    let metadata = fs::read_to_string(&metadata_path)?;
    let missing = metadata_drift(&metadata, &manifest);
    if !missing.is_empty() {
        bail!(
            "{} is not in step with {} ({} lines differ, first: {:?}).\n\
             cargo-deb and cargo-generate-rpm read the package manifest: copy the \
             [package.metadata.deb] and [package.metadata.generate-rpm] tables of \
             packaging/metadata.toml to the end of agent-linux/Cargo.toml.",
            manifest_path.display(),
            metadata_path.display(),
            missing.len(),
            missing[0]
        );
    }
    Ok(())
}

/// The release agent binary (static musl, stripped), as packaged and as
/// put into the guest image.
pub(crate) fn build_release() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--target",
        MUSL_TARGET,
        "-p",
        "agent-linux",
        "--bin",
        "kvmmanager-agent",
    ]))?;
    let bin = target_dir()
        .join(MUSL_TARGET)
        .join("release/kvmmanager-agent");
    let sections = output(Command::new("readelf").arg("-S").arg(&bin))?;
    if sections.contains(".symtab") || sections.contains(".debug_") {
        run(Command::new("strip").arg(&bin))?;
    }
    let dynamic = output(Command::new("readelf").arg("-d").arg(&bin))?;
    if dynamic.contains("(NEEDED)") {
        bail!("{} is not static:\n{dynamic}", bin.display());
    }
    Ok(bin)
}

/// Finds the single file in `dir` with this extension.
fn find_ext(dir: &Path, ext: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one .{ext} in {}, found {found:?}", dir.display()),
    }
}

/// `cargo xtask dist [--check]`.
pub(crate) fn dist(check: bool) -> Result<()> {
    let pkgs = build()?;
    if check {
        check_packages(&pkgs)?;
    }
    Ok(())
}

/// Builds the binary and both packages.
pub(crate) fn build() -> Result<Packages> {
    heading("dist");
    deps::ensure(&[Group::Dist])?;
    check_metadata()?;
    build_release()?;
    let out = target_dir().join("dist");
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    fs::create_dir_all(&out)?;
    run(cargo()
        .args([
            "deb",
            "-p",
            "agent-linux",
            "--target",
            MUSL_TARGET,
            "--no-build",
            "-o",
        ])
        .arg(&out))?;
    run(cargo()
        .args([
            "generate-rpm",
            "-p",
            "agent-linux",
            "--target",
            MUSL_TARGET,
            "-o",
        ])
        .arg(&out))?;
    let pkgs = Packages {
        deb: find_ext(&out, "deb")?,
        rpm: find_ext(&out, "rpm")?,
    };
    eprintln!("dist: {}\ndist: {}", pkgs.deb.display(), pkgs.rpm.display());
    Ok(pkgs)
}

/// Fails unless every `want` path is in `listing`.
fn require_paths(what: &str, listing: &[String], want: &[&str]) -> Result<()> {
    for w in want {
        if !listing.iter().any(|l| l == w) {
            bail!("{what}: {w} is missing; contents:\n{}", listing.join("\n"));
        }
    }
    Ok(())
}

/// Inspects both packages and installs the `.deb` into a scratch root.
pub(crate) fn check_packages(p: &Packages) -> Result<()> {
    heading("dist: package checks");
    // .deb contents and control data.
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(&p.deb))?;
    let deb_paths: Vec<String> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').trim_end_matches('/').to_owned())
        .collect();
    require_paths("deb", &deb_paths, DEB_FILES)?;
    let bin_line = listing
        .lines()
        .find(|l| l.ends_with("./usr/bin/kvmmanager-agent"))
        .unwrap_or("");
    if !bin_line.starts_with("-rwxr-xr-x root/root") && !bin_line.starts_with("-rwxr-xr-x 0/0") {
        bail!("deb: unexpected binary entry: {bin_line}");
    }
    let info = output(Command::new("dpkg-deb").arg("-I").arg(&p.deb))?;
    for want in [
        format!("Package: {PACKAGE}"),
        "Architecture: amd64".to_owned(),
        "conffiles".to_owned(),
        "postinst".to_owned(),
    ] {
        if !info.contains(&want) {
            bail!("deb: `dpkg-deb -I` lacks {want:?}:\n{info}");
        }
    }
    let conffiles = output(
        Command::new("dpkg-deb")
            .args(["-I"])
            .arg(&p.deb)
            .arg("conffiles"),
    )?;
    if !conffiles.lines().any(|l| l.trim() == CONFIG_FILE) {
        bail!("deb: {CONFIG_FILE} is not a conffile: {conffiles:?}");
    }
    eprintln!("dist: deb contents and control data OK");

    // .rpm contents, header and config flags.
    let rpm_paths: Vec<String> = output(Command::new("rpm").arg("-qlp").arg(&p.rpm))?
        .lines()
        .map(str::to_owned)
        .collect();
    require_paths("rpm", &rpm_paths, RPM_FILES)?;
    let info = output(Command::new("rpm").arg("-qip").arg(&p.rpm))?;
    if !info
        .lines()
        .any(|l| l.starts_with("Name") && l.ends_with(PACKAGE))
    {
        bail!("rpm: unexpected header:\n{info}");
    }
    let flags = output(
        Command::new("rpm")
            .args([
                "-qp",
                "--qf",
                "[%{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILENAMES}\n]",
            ])
            .arg(&p.rpm),
    )?;
    let cfg = flags
        .lines()
        .find(|l| l.ends_with(CONFIG_FILE))
        .unwrap_or("");
    if !cfg.starts_with("cn ") {
        bail!("rpm: {CONFIG_FILE} is not %config(noreplace): {cfg:?}");
    }
    if !flags
        .lines()
        .any(|l| l.ends_with(" -rwxr-xr-x /usr/bin/kvmmanager-agent"))
    {
        bail!("rpm: unexpected binary entry:\n{flags}");
    }
    let reqs = output(Command::new("rpm").arg("-qRp").arg(&p.rpm))?;
    if reqs.lines().any(|l| l.contains(".so")) {
        bail!("rpm: a static binary should need no libraries:\n{reqs}");
    }
    eprintln!("dist: rpm contents, header and %config OK");

    scratch_install(&p.deb)
}

/// A root with a dpkg database and busybox as `/bin/sh` for maintainer scripts.
fn make_scratch_root(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "bin", "tmp"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::write(dir.join("var/lib/dpkg/status"), "")?;
    fs::copy("/bin/busybox", dir.join("bin/busybox"))?;
    let applets = output(Command::new("/bin/busybox").arg("--list"))?;
    for a in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a))?;
    }
    Ok(())
}

fn dpkg(root: &Path) -> Command {
    let mut c = Command::new("dpkg");
    c.arg(format!("--root={}", root.display()))
        .arg("--log=/dev/null");
    c
}

/// Installs, checks, removes and purges the `.deb` in a scratch root.
fn scratch_install(deb: &Path) -> Result<()> {
    if !crate::util::is_root() {
        bail!("installing the .deb into a scratch root needs root (dpkg --root chroots for maintainer scripts)");
    }
    let dir = target_dir().join("dist/scratch-root");
    make_scratch_root(&dir)?;
    run(dpkg(&dir).arg("-i").arg(deb))?;
    let status = output(dpkg(&dir).args(["-s", PACKAGE]))?;
    if !status.contains("Status: install ok installed") {
        bail!("scratch install: package not installed:\n{status}");
    }
    for f in DEB_FILES {
        let p = dir.join(f.trim_start_matches('/'));
        if !p.is_file() {
            bail!("scratch install: {} is missing", p.display());
        }
    }
    let installed_cfg = fs::read(dir.join(CONFIG_FILE.trim_start_matches('/')))?;
    if installed_cfg != fs::read(root().join("packaging/config.json"))? {
        bail!("scratch install: {CONFIG_FILE} differs from packaging/config.json");
    }
    // The installed binary runs, and accepts the installed default config.
    let bin = dir.join("usr/bin/kvmmanager-agent");
    let version = output(Command::new(&bin).arg("--version"))?;
    eprintln!("dist: installed binary: {}", version.trim());
    run(Command::new(&bin)
        .arg("--check-config")
        .arg("--config")
        .arg(dir.join(CONFIG_FILE.trim_start_matches('/'))))?;
    // Remove keeps the conffile; purge deletes it.
    run(dpkg(&dir).args(["-r", PACKAGE]))?;
    if dir.join("usr/bin/kvmmanager-agent").exists() {
        bail!("scratch remove: the binary is still there");
    }
    if !dir.join(CONFIG_FILE.trim_start_matches('/')).exists() {
        bail!("scratch remove: the conffile was removed (it must stay until purge)");
    }
    run(dpkg(&dir).args(["--purge", PACKAGE]))?;
    if dir.join(CONFIG_FILE.trim_start_matches('/')).exists() {
        bail!("scratch purge: the conffile is still there");
    }
    fs::remove_dir_all(&dir)?;
    eprintln!("dist: .deb installed, checked, removed and purged in a scratch root");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_drift_ignores_comments_and_indentation() {
        let metadata = "# comment\n[package.metadata.deb]\nname = \"x\"\n\n  assets = []\n";
        let cases = [
            (
                "[package]\n[package.metadata.deb]\nname = \"x\"\nassets = []\n",
                0,
            ),
            ("[package.metadata.deb]\nname = \"x\"\n", 1),
            ("", 3),
        ];
        for (manifest, want) in cases {
            assert_eq!(
                metadata_drift(metadata, manifest).len(),
                want,
                "{manifest:?}"
            );
        }
    }

    #[test]
    fn packaging_metadata_names_every_file_the_checks_require() {
        let metadata = fs::read_to_string(root().join("packaging/metadata.toml")).unwrap();
        for f in DEB_FILES {
            assert!(
                metadata.contains(&format!("\"{}\"", f.trim_start_matches('/'))),
                "{f}"
            );
        }
        for f in RPM_FILES {
            assert!(metadata.contains(&format!("dest = \"{f}\"")), "{f}");
        }
    }

    #[test]
    fn packaged_config_has_exactly_the_default_keys() {
        let text = fs::read_to_string(root().join("packaging/config.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "channel_name",
                "connection_retry_seconds",
                "freeze_timeout_seconds",
                "fsfreeze_hook_dir",
                "log_file",
                "log_level",
                "max_concurrent_requests",
                "max_message_size_kb",
                "request_timeout_seconds",
                "security"
            ]
        );
        assert_eq!(v["log_level"], "info");
        assert_eq!(v["max_message_size_kb"], 64);
        let s = &v["security"];
        assert_eq!(s["max_file_size_mb"], 10);
        assert_eq!(s["max_command_timeout_seconds"], 300);
        assert!(s["command_whitelist"].is_null());
        assert_eq!(
            s["allowed_read_paths"],
            serde_json::json!(["/tmp", "/var/log", "/etc/hostname", "/etc/os-release"])
        );
        assert_eq!(
            s["allowed_write_paths"],
            serde_json::json!(["/tmp/kvmmanager"])
        );
    }
}
