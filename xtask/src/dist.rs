//! `cargo xtask dist`: the release build of the agent and its packages.
//!
//! A static musl build (stripped), then a `.deb` (cargo-deb) and an `.rpm`
//! (cargo-generate-rpm) in `target/dist/`. The package metadata lives in
//! `agent-linux/Cargo.toml` (`[package.metadata.deb]`,
//! `[package.metadata.generate-rpm]`), copied from `packaging/metadata.toml`;
//! a check keeps the two in step. `--check` inspects both packages (files,
//! modes, owners, conffiles, and the `.rpm`'s scriptlets against the
//! `.deb`'s maintainer scripts) and installs each into a scratch root
//! (`dpkg --root`, `rpm --root`; the scripts run there under busybox's
//! `/bin/sh`), runs the installed binary on the installed config, then
//! removes (and for the `.deb` purges) it. No RPM distribution is booted:
//! the `.rpm` is never started by systemd nor installed by dnf here.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::deps::{self, Group, MUSL_TARGET};
use crate::util::{bail, cargo, heading, output, root, run, succeeds, target_dir, Result};

/// The package name, in both formats.
const PACKAGE: &str = "kvmmanager-agent";

/// Files every package must hold.
const DEB_FILES: &[&str] = &[
    "/usr/bin/kvmmanager-agent",
    "/etc/kvmmanager-agent/config.json",
    "/lib/systemd/system/kvmmanager-agent.service",
    "/lib/udev/rules.d/99-kvmmanager-agent.rules",
    "/usr/lib/tmpfiles.d/kvmmanager-agent.conf",
    "/usr/share/doc/kvmmanager-agent/README.md",
    "/usr/share/doc/kvmmanager-agent/PROTOCOL.md",
    "/usr/share/doc/kvmmanager-agent/SECURITY.md",
];
const RPM_FILES: &[&str] = &[
    "/usr/bin/kvmmanager-agent",
    "/etc/kvmmanager-agent/config.json",
    "/usr/lib/systemd/system/kvmmanager-agent.service",
    "/usr/lib/udev/rules.d/99-kvmmanager-agent.rules",
    "/usr/lib/tmpfiles.d/kvmmanager-agent.conf",
    "/usr/share/doc/kvmmanager-agent/README.md",
    "/usr/share/doc/kvmmanager-agent/PROTOCOL.md",
    "/usr/share/doc/kvmmanager-agent/SECURITY.md",
];
const CONFIG_FILE: &str = "/etc/kvmmanager-agent/config.json";
const CONFIG_DIR: &str = "/etc/kvmmanager-agent";

/// Maintainer scripts of the `.deb` and the `.rpm` scriptlets that must do
/// the same (`rpm -qp --scripts` names).
const SCRIPT_PAIRS: &[(&str, &str)] = &[
    ("postinst", "postinstall"),
    ("prerm", "preuninstall"),
    ("postrm", "postuninstall"),
];

/// Commands that run in one case only, and the test that guards each in the
/// `.deb`'s scripts and in the `.rpm`'s scriptlets (where `$1` is the number
/// of installed copies after the transaction): restart on upgrade only,
/// stop on removal only.
const GUARDS: &[(&str, &str, &str)] = &[
    ("systemctl try-restart", "[ -n \"$2\" ]", "[ \"$1\" -ge 2 ]"),
    (
        "systemctl stop",
        "[ \"$1\" = \"remove\" ]",
        "[ \"$1\" -eq 0 ]",
    ),
];

/// Built packages.
#[derive(Debug)]
pub(crate) struct Packages {
    /// The `.deb`.
    pub(crate) deb: PathBuf,
    /// The `.rpm`.
    pub(crate) rpm: PathBuf,
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
        let summary = check_packages(&pkgs)?;
        eprintln!("dist: {summary}");
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

/// The same package again with Debian revision `revision` (cargo-deb's
/// default is 1), in `target/dist-rev<revision>/`: a newer build of the
/// same binary, for the upgrade check. Needs [`build`] first.
pub(crate) fn build_deb_revision(revision: u32) -> Result<PathBuf> {
    let out = target_dir().join(format!("dist-rev{revision}"));
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
            "--deb-revision",
            &revision.to_string(),
            "-o",
        ])
        .arg(&out))?;
    find_ext(&out, "deb")
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

/// Inspects both packages and installs each into a scratch root; returns a
/// one-line summary.
pub(crate) fn check_packages(p: &Packages) -> Result<String> {
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
    let owns_dir = check_rpm_owners(&p.rpm)?;
    check_rpm_scriptlets(&p.rpm, &p.deb)?;

    scratch_install(&p.deb)?;
    rpm_scratch_install(&p.rpm, owns_dir)?;
    Ok(format!(
        "{} and {}: contents, owners, scripts checked; each installed into a \
         scratch root, run and removed{}",
        file_name(&p.deb),
        file_name(&p.rpm),
        if owns_dir {
            ""
        } else {
            " (the .rpm does not own /etc/kvmmanager-agent/)"
        }
    ))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One line of `rpm -qlvp`: mode string, owner, group, path.
#[derive(Debug, PartialEq, Eq)]
struct RpmEntry {
    mode: String,
    user: String,
    group: String,
    path: String,
}

/// Parses `rpm -qlvp` (`-rwxr-xr-x 1 root root 1234 Nov 27 15:01 /usr/bin/x`).
fn parse_rpm_listing(text: &str) -> Result<Vec<RpmEntry>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 9 || !words[8].starts_with('/') {
            bail!("rpm -qlvp: unexpected line {line:?}");
        }
        out.push(RpmEntry {
            mode: words[0].to_owned(),
            user: words[2].to_owned(),
            group: words[3].to_owned(),
            path: words[8..].join(" "),
        });
    }
    Ok(out)
}

/// Every file of the `.rpm` is root:root; returns whether the package owns
/// [`CONFIG_DIR`] (then as `drwxr-xr-x root root`).
fn check_rpm_owners(rpm: &Path) -> Result<bool> {
    let listing = output(Command::new("rpm").arg("-qlvp").arg(rpm))?;
    let entries = parse_rpm_listing(&listing)?;
    let not_root: Vec<&RpmEntry> = entries
        .iter()
        .filter(|e| e.user != "root" || e.group != "root")
        .collect();
    if !not_root.is_empty() {
        bail!("rpm: files not owned by root:root: {not_root:?}");
    }
    let owns_dir = match entries.iter().find(|e| e.path == CONFIG_DIR) {
        Some(e) if e.mode == "drwxr-xr-x" => true,
        Some(e) => bail!("rpm: {CONFIG_DIR} is listed as {e:?}, not a 0755 directory"),
        None => false,
    };
    eprintln!("dist: rpm: all {} entries are root:root", entries.len());
    if owns_dir {
        eprintln!("dist: rpm: the package owns {CONFIG_DIR}/");
    } else {
        // cargo-generate-rpm 0.21.1 cannot emit a directory entry; see the
        // comment on post_uninstall_script in packaging/metadata.toml. The
        // scratch erase below checks that the directory still goes away.
        eprintln!(
            "dist: rpm: NOTE: the package does not own {CONFIG_DIR}/ (cargo-generate-rpm \
             cannot emit a directory entry); its postun removes it when empty"
        );
    }
    Ok(owns_dir)
}

/// The scriptlets `rpm -qp --scripts` prints, by name (`postinstall`, ...):
/// a `NAME scriptlet:` or `NAME scriptlet (using /bin/sh):` line, then the
/// body.
fn parse_scriptlets(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let header = line
            .strip_suffix(':')
            .and_then(|h| h.split_once(" scriptlet"))
            .filter(|(name, rest)| {
                !name.is_empty()
                    && name.chars().all(|c| c.is_ascii_lowercase())
                    && (rest.is_empty() || rest.starts_with(" (using "))
            });
        match (header, out.last_mut()) {
            (Some((name, _)), _) => out.push((name.to_owned(), String::new())),
            (None, Some((_, body))) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    for (_, body) in &mut out {
        let trimmed = body.trim_end().len();
        body.truncate(trimmed);
    }
    out
}

/// The `systemctl` and `udevadm` commands a shell script runs, sorted
/// (`systemctl daemon-reload`, `udevadm control --reload-rules`, ...).
fn service_actions(script: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in script
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
    {
        for tool in ["systemctl", "udevadm"] {
            for (at, _) in line.match_indices(tool) {
                let rest = &line[at..];
                let end = ["||", "&&", ";", ">"]
                    .iter()
                    .filter_map(|sep| rest.find(sep))
                    .min()
                    .unwrap_or(rest.len());
                let cmd = rest[..end].split_whitespace().collect::<Vec<_>>().join(" ");
                // `command -v systemctl >/dev/null` names it without running it.
                if cmd != tool {
                    out.push(cmd);
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Lines of `script` that run `cmd` without `guard` on the same line or in
/// the nearest `if` above it.
fn unguarded<'a>(script: &'a str, cmd: &str, guard: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = script.lines().map(str::trim).collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with('#') || !line.contains(cmd) {
            continue;
        }
        let enclosing_if = lines[..i].iter().rev().find(|l| l.starts_with("if "));
        if !line.contains(guard) && !enclosing_if.is_some_and(|l| l.contains(guard)) {
            out.push(*line);
        }
    }
    out
}

/// Compares one `.deb` maintainer script with its `.rpm` scriptlet: the
/// same systemd and udev commands, each guarded for the same case.
fn compare_scripts(deb_name: &str, deb: &str, rpm_name: &str, rpm: &str) -> Result<()> {
    let (d, r) = (service_actions(deb), service_actions(rpm));
    if d != r {
        bail!(
            "the .rpm's {rpm_name} scriptlet does not do what the .deb's {deb_name} does:\n  \
             deb: {d:?}\n  rpm: {r:?}"
        );
    }
    for (cmd, deb_guard, rpm_guard) in GUARDS {
        let bad_deb = unguarded(deb, cmd, deb_guard);
        let bad_rpm = unguarded(rpm, cmd, rpm_guard);
        if !bad_deb.is_empty() || !bad_rpm.is_empty() {
            bail!(
                "`{cmd}` must run only under `{deb_guard}` (deb {deb_name}) / \
                 `{rpm_guard}` (rpm {rpm_name}); unguarded: {bad_deb:?} {bad_rpm:?}"
            );
        }
    }
    Ok(())
}

/// The `.rpm` has post/preun/postun scriptlets that match the `.deb`'s
/// postinst/prerm/postrm, and no others.
fn check_rpm_scriptlets(rpm: &Path, deb: &Path) -> Result<()> {
    let scriptlets = parse_scriptlets(&output(
        Command::new("rpm").args(["-qp", "--scripts"]).arg(rpm),
    )?);
    let names: Vec<&str> = scriptlets.iter().map(|(n, _)| n.as_str()).collect();
    let want: Vec<&str> = SCRIPT_PAIRS.iter().map(|(_, r)| *r).collect();
    if names != want {
        bail!("rpm: scriptlets {names:?}, expected {want:?}");
    }
    for ((deb_name, rpm_name), (_, body)) in SCRIPT_PAIRS.iter().zip(&scriptlets) {
        let deb_script = output(Command::new("dpkg-deb").arg("-I").arg(deb).arg(deb_name))?;
        compare_scripts(deb_name, &deb_script, rpm_name, body)?;
    }
    eprintln!("dist: rpm scriptlets post/preun/postun match the deb's postinst/prerm/postrm");
    Ok(())
}

/// A root with a dpkg database and busybox as `/bin/sh` for maintainer scripts.
fn make_scratch_root(dir: &Path) -> Result<()> {
    make_busybox_root(dir)?;
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::write(dir.join("var/lib/dpkg/status"), "")?;
    Ok(())
}

/// An empty root with busybox (static) as `/bin/sh` and its applets, for
/// package scripts run chrooted.
fn make_busybox_root(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    for d in ["bin", "tmp", "var/tmp"] {
        fs::create_dir_all(dir.join(d))?;
    }
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

/// `rpm` on the scratch root `root`, its database at `/var/lib/rpm` in it.
fn rpm(root: &Path) -> Command {
    let mut c = Command::new("rpm");
    c.arg("--root").arg(root).args(["--dbpath", "/var/lib/rpm"]);
    c
}

/// Runs `rpm` quietly; fails on a non-zero exit or a failed scriptlet
/// (rpm reports some only as warnings). Debian's rpm also warns on stderr
/// at every install ("use Alien instead"), which is not shown.
fn rpm_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", crate::util::render(cmd)))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.contains("scriptlet failed") {
        bail!(
            "`{}` failed: {}\n{}{}",
            crate::util::render(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            stderr.trim_end()
        );
    }
    Ok(())
}

/// Installs the `.rpm` into a scratch root (scriptlets run by busybox's
/// `/bin/sh` there), checks the files, runs the installed binary on the
/// installed config, then erases it.
fn rpm_scratch_install(rpm_file: &Path, owns_dir: bool) -> Result<()> {
    if !crate::util::is_root() {
        bail!("installing the .rpm into a scratch root needs root (rpm --root chroots for scriptlets)");
    }
    let dir = target_dir().join("dist/rpm-root");
    make_busybox_root(&dir)?;
    rpm_quiet(rpm(&dir).arg("--initdb"))?;
    rpm_quiet(rpm(&dir).args(["-i", "--nodeps"]).arg(rpm_file))?;
    let q = output(rpm(&dir).args(["-q", PACKAGE]))?;
    if !q.starts_with(PACKAGE) {
        bail!("rpm scratch install: `rpm -q {PACKAGE}` says {q:?}");
    }
    let at = |f: &str| dir.join(f.trim_start_matches('/'));
    for f in RPM_FILES {
        let meta = fs::metadata(at(f))
            .map_err(|e| format!("rpm scratch install: {}: {e}", at(f).display()))?;
        if !meta.is_file() {
            bail!("rpm scratch install: {} is not a file", at(f).display());
        }
    }
    let cfg_dir = fs::metadata(at(CONFIG_DIR))?;
    if !cfg_dir.is_dir()
        || std::os::unix::fs::PermissionsExt::mode(&cfg_dir.permissions()) & 0o7777 != 0o755
    {
        bail!("rpm scratch install: {CONFIG_DIR} is not a 0755 directory");
    }
    if owns_dir {
        let owner = output(rpm(&dir).args(["-qf", CONFIG_DIR]))?;
        if !owner.starts_with(PACKAGE) {
            bail!("rpm scratch install: {CONFIG_DIR} belongs to {owner:?}");
        }
    }
    if fs::read(at(CONFIG_FILE))? != fs::read(root().join("packaging/config.json"))? {
        bail!("rpm scratch install: {CONFIG_FILE} differs from packaging/config.json");
    }
    let bin = at("/usr/bin/kvmmanager-agent");
    let version = output(Command::new(&bin).arg("--version"))?;
    eprintln!("dist: rpm-installed binary: {}", version.trim());
    output(
        Command::new(&bin)
            .arg("--check-config")
            .arg("--config")
            .arg(at(CONFIG_FILE)),
    )?;
    // Erase: every file goes, and the config directory with it (the
    // pristine config is not kept).
    rpm_quiet(rpm(&dir).args(["-e", PACKAGE]))?;
    if succeeds(rpm(&dir).args(["-q", PACKAGE])) {
        bail!("rpm scratch erase: the package is still installed");
    }
    for f in RPM_FILES {
        if at(f).exists() {
            bail!("rpm scratch erase: {} is still there", at(f).display());
        }
    }
    if at(CONFIG_DIR).exists() {
        bail!("rpm scratch erase: {CONFIG_DIR} is still there");
    }
    // Again with an edited config: erase keeps it as .rpmsave, and the
    // directory with it.
    rpm_quiet(rpm(&dir).args(["-i", "--nodeps"]).arg(rpm_file))?;
    fs::write(at(CONFIG_FILE), b"{}\n")?;
    rpm_quiet(rpm(&dir).args(["-e", PACKAGE]))?;
    let saved = at(&format!("{CONFIG_FILE}.rpmsave"));
    if fs::read(&saved).ok().as_deref() != Some(b"{}\n".as_slice()) {
        bail!(
            "rpm scratch erase: an edited {CONFIG_FILE} was not kept as {}",
            saved.display()
        );
    }
    fs::remove_dir_all(&dir)?;
    eprintln!(
        "dist: .rpm installed (scriptlets run), checked, run with --check-config and erased \
         in a scratch root (an edited config kept as .rpmsave)"
    );
    Ok(())
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
                "qemu_ga_channel_name",
                "request_timeout_seconds",
                "security",
                "shell_command",
                "zero_copy_reads"
            ]
        );
        assert_eq!(v["log_level"], "info");
        assert_eq!(v["zero_copy_reads"], true);
        // qemu-ga's port is served by default (and left to an installed,
        // unmasked qemu-guest-agent: packaging/README.md).
        assert_eq!(v["qemu_ga_channel_name"], "org.qemu.guest_agent.0");
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

    #[test]
    fn rpm_listing_parses_owners_and_refuses_junk() {
        let text = "\
drwxr-xr-x    2 root     root                        0 Nov 27 15:01 /etc/kvmmanager-agent
-rw-r--r--    1 root     root                      512 Nov 27 15:01 /etc/kvmmanager-agent/config.json
-rwxr-xr-x    1 nobody   wheel                 1234567 Nov 27 15:01 /usr/bin/kvmmanager-agent
";
        let entries = parse_rpm_listing(text).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[2],
            RpmEntry {
                mode: "-rwxr-xr-x".to_owned(),
                user: "nobody".to_owned(),
                group: "wheel".to_owned(),
                path: "/usr/bin/kvmmanager-agent".to_owned(),
            }
        );
        assert_eq!(entries[0].path, CONFIG_DIR);
        assert!(parse_rpm_listing("(contains no files)\n").is_err());
        assert!(parse_rpm_listing("").unwrap().is_empty());
    }

    #[test]
    fn scriptlets_split_by_header() {
        let text = "\
postinstall scriptlet (using /bin/sh):
if [ \"$1\" -ge 2 ]; then
    echo up
fi

preuninstall scriptlet:
echo pre

postuninstall program: /bin/sh
";
        let got = parse_scriptlets(text);
        assert_eq!(
            got,
            [
                (
                    "postinstall".to_owned(),
                    "if [ \"$1\" -ge 2 ]; then\n    echo up\nfi".to_owned()
                ),
                (
                    "preuninstall".to_owned(),
                    "echo pre\n\npostuninstall program: /bin/sh".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn service_actions_ignore_command_v_and_comments() {
        let script = "\
# systemctl restart nothing
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then systemctl daemon-reload || :; fi
    udevadm trigger --subsystem-match=virtio-ports --action=add || true
systemctl daemon-reload; udevadm control --reload-rules && echo ok
";
        assert_eq!(
            service_actions(script),
            [
                "systemctl daemon-reload",
                "udevadm control --reload-rules",
                "udevadm trigger --subsystem-match=virtio-ports --action=add",
            ]
        );
    }

    /// The body of `key = """..."""` in packaging/metadata.toml.
    fn metadata_script(metadata: &str, key: &str) -> String {
        let start = metadata
            .find(&format!("{key} = \"\"\"\n"))
            .unwrap_or_else(|| panic!("{key} missing"));
        let body = &metadata[start + key.len() + 7..];
        body[..body.find("\"\"\"").unwrap()].to_owned()
    }

    #[test]
    fn packaged_rpm_scriptlets_match_the_deb_scripts() {
        let metadata = fs::read_to_string(root().join("packaging/metadata.toml")).unwrap();
        let keys = [
            "post_install_script",
            "pre_uninstall_script",
            "post_uninstall_script",
        ];
        for ((deb_name, rpm_name), key) in SCRIPT_PAIRS.iter().zip(keys) {
            let deb = fs::read_to_string(root().join("packaging/debian").join(deb_name)).unwrap();
            let rpm = metadata_script(&metadata, key);
            assert!(!service_actions(&deb).is_empty(), "{deb_name}");
            compare_scripts(deb_name, &deb, rpm_name, &rpm).unwrap();
        }
    }

    #[test]
    fn script_comparison_catches_missing_and_unguarded_commands() {
        let deb =
            "if [ \"$1\" = \"remove\" ]; then\n    systemctl stop kvmmanager-agent.service\nfi\n";
        let cases = [
            ("systemctl stop kvmmanager-agent.service || :\n", false),
            (
                "if [ \"$1\" -eq 0 ]; then systemctl stop kvmmanager-agent.service || :; fi\n",
                true,
            ),
            ("if [ \"$1\" -eq 0 ]; then :; fi\n", false),
            (
                "if [ \"$1\" -eq 0 ]; then systemctl stop kvmmanager-agent.service; fi\nsystemctl daemon-reload\n",
                false,
            ),
        ];
        for (rpm, ok) in cases {
            assert_eq!(
                compare_scripts("prerm", deb, "preuninstall", rpm).is_ok(),
                ok,
                "{rpm:?}"
            );
        }
    }
}
