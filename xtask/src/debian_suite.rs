//! The real-VM suite against the Debian guest: the package installed with
//! `apt install` in a booted Debian 12, started by udev and systemd.
//!
//! Under QEMU the guest boots **without** the agent's port, the package is
//! installed (the agent must stay stopped: no port), then the port is
//! hot-plugged through QMP and the agent must start by itself. Then: every
//! check of [`crate::suite::guest_checks`], the unit's state, the journal,
//! `systemctl restart` in the middle of a transfer, an upgrade that keeps an
//! edited config, the hardened drop-in, a reboot, and `apt remove` /
//! `apt purge` (reported on the console, since the agent is gone then).
//! Under libvirt the port is there from boot: the package's postinst starts
//! the agent at once; then the owner's config edit, every check of
//! `guest_checks` again, the journal, a reboot and a shutdown through the
//! agent.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::debian::{self, DebianImage, AGENT_STATE_MARKER, DATA_MOUNT, PROVISIONED_MARKER};
use crate::suite::{ensure, exec_result, guest_checks, scratch, GuestFacts};
use crate::suite::{Ctl, Tally, Target};
use crate::util::{bail, heading, Result};
use crate::vm::{DebianBoot, QemuVm, DEBIAN_BOOT_TIMEOUT};

/// The Debian guest as the checks see it (QEMU: 2 vCPUs).
const DEBIAN_FACTS: GuestFacts = GuestFacts {
    hostname: debian::HOSTNAME,
    cpus: 2,
    filesystems: &[("/", "ext4"), (DATA_MOUNT, "ext4")],
};

/// The packages under test: the release and a newer build of it.
#[derive(Debug, Clone)]
pub(crate) struct Debs {
    /// The package as built by `cargo xtask dist`.
    pub(crate) current: PathBuf,
    /// The same build with a higher Debian revision, for the upgrade check.
    pub(crate) newer: PathBuf,
}

/// Waits for the provisioning script's result on the console.
pub(crate) fn wait_provisioned(console_lines: impl Fn() -> Vec<String>) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = console_lines();
        if !done.is_empty() {
            return Ok(done);
        }
        if Instant::now() >= deadline {
            bail!("no {PROVISIONED_MARKER} line on the console within 300 s");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Checks the provisioning result: `rc=0`, and the unit's state after it.
fn provisioned_ok(vm_lines: &[String], states: &[String], want_state: &str) -> Result<()> {
    ensure(vm_lines.first().map(String::as_str) == Some("rc=0"), || {
        format!("apt install in the guest: {vm_lines:?}")
    })?;
    ensure(
        states.first().map(String::as_str) == Some(want_state),
        || format!("kvmmanager-agent.service after the install: {states:?} (want {want_state})"),
    )
}

/// `systemctl show` properties of the agent's unit.
fn unit_props(ctl: &Ctl) -> Result<std::collections::HashMap<String, String>> {
    let out = ctl.sh("systemctl show kvmmanager-agent.service -p ActiveState -p SubState -p MainPID -p NRestarts -p ControlGroup",
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// The agent's main pid per systemd, once it runs again after `old`.
fn wait_new_main_pid(ctl: &Ctl, old: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(p) = unit_props(ctl) {
            let pid = p.get("MainPID").cloned().unwrap_or_default();
            if p.get("ActiveState").map(String::as_str) == Some("active")
                && pid != old
                && pid != "0"
            {
                return Ok(pid);
            }
        }
        if Instant::now() >= deadline {
            bail!("the agent did not come back with a new pid (was {old}) within {timeout:?}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `systemctl restart kvmmanager-agent` through the agent, queued with
/// `--no-block`. Stopping the agent kills its commands, so the reply may
/// say the command died of SIGTERM: that is the restart under way.
fn restart_unit(ctl: &Ctl) -> Result<()> {
    let r = ctl.run(
        true,
        &[
            "exec",
            "--",
            "systemctl",
            "--no-block",
            "restart",
            "kvmmanager-agent.service",
        ],
        Duration::from_secs(60),
    )?;
    match r.code {
        // Exit 0, or killed by SIGTERM (128 + 15) as the agent stopped.
        0 | 143 => Ok(()),
        // The reply was lost with the agent: also the restart under way.
        3 | 5 | 255 => Ok(()),
        c => bail!(
            "systemctl restart through the agent: exit {c}: {}",
            r.all_output()
        ),
    }
}

/// The guest owner's edit: the test policy (the initramfs guest's config:
/// 128 MiB files, per-command cgroup limits) copied over the packaged
/// default, checked with `--check-config`, and the unit restarted.
fn owner_edits_config(ctl: &Ctl) -> Result<()> {
    let dir = scratch("deb-config")?;
    let cfg = dir.join("config.json");
    // The initramfs guest's test policy, at debug level (the journal then
    // shows every session and request, for `save_journal`), and serving
    // qemu-ga's port too (the `virsh` agent commands under libvirt).
    let mut config: serde_json::Value = serde_json::from_str(crate::guest::GUEST_CONFIG)?;
    config["log_level"] = "debug".into();
    config["qemu_ga_channel_name"] = crate::guest::QEMU_GA_PORT.into();
    fs::write(&cfg, serde_json::to_vec_pretty(&config)?)?;
    ctl.push(
        &cfg,
        "/tmp/kvmmanager/test-config.json",
        Duration::from_secs(60),
    )?;
    let before = unit_props(ctl)?.get("MainPID").cloned().unwrap_or_default();
    ctl.sh(
        "kvmmanager-agent --check-config --config /tmp/kvmmanager/test-config.json \
         && cp /tmp/kvmmanager/test-config.json /etc/kvmmanager-agent/config.json",
    )?;
    restart_unit(ctl)?;
    wait_new_main_pid(ctl, &before, Duration::from_secs(60))?;
    ctl.wait_ping(Duration::from_secs(60))?;
    let info = ctl.json(&["info"])?;
    ensure(info["limits"]["max_file_size"] == 128u64 << 20, || {
        format!("limits after the restart: {}", info["limits"])
    })?;
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

/// Saves the agent's journal (read through the agent) under
/// `target/vm-test-logs/` when a check of this pass failed, and says where.
fn save_journal(ctl: &Ctl, t: &Tally, failed_before: usize, name: &str) {
    if t.failed_count() == failed_before {
        return;
    }
    let dir = crate::util::target_dir().join("vm-test-logs");
    let path = dir.join(format!("{name}-journal.txt"));
    let r = fs::create_dir_all(&dir)
        .map_err(crate::util::XtaskError::from)
        .and_then(|()| {
            let out =
                ctl.sh("journalctl -u kvmmanager-agent.service --no-pager -o short-precise")?;
            fs::write(&path, out)?;
            Ok(())
        });
    match r {
        Ok(()) => println!(
            "  a check failed: the agent's journal is in {}",
            path.display()
        ),
        Err(e) => println!("  a check failed; the agent's journal could not be read: {e}"),
    }
}

/// The journal of the agent's unit, read through the agent.
fn journal_check(ctl: &Ctl) -> Result<()> {
    // All of this boot's journal of the unit, filtered in the guest: at
    // debug level the start lines are thousands of lines back.
    let out = ctl.sh(
        "journalctl -u kvmmanager-agent.service -b --no-pager -o cat \
         | grep -E 'kvmmanager-agent starting|command containment' | tail -n 20 || true",
    )?;
    for want in ["kvmmanager-agent starting", "command containment: cgroup"] {
        ensure(out.contains(want), || {
            format!("journal lacks {want:?}:\n{}", clip_lines(&out, 30))
        })?;
    }
    Ok(())
}

/// A pull leaves the file in the guest's page cache. On ext4 (the root
/// file system here), `virtio_console` would otherwise take the spliced
/// page-cache pages over and the file would be evicted by being read
/// (`files::read`'s `hold_pages` in the agent).
fn pull_keeps_page_cache(ctl: &Ctl) -> Result<()> {
    let dir = scratch("deb-page-cache")?;
    let src = random_in(&dir, "src", 8 << 20)?;
    let back = dir.join("back");
    let guest = "/tmp/kvmmanager/page-cache.bin";
    ctl.push(&src, guest, Duration::from_secs(120))?;
    let cached = format!("fincore --noheadings --output PAGES {guest}");
    // Flushed and read once: all its 2,048 pages in the cache.
    let before = pages(&ctl.sh(&format!("sync && cat {guest} > /dev/null && {cached}"))?)?;
    ensure(before >= 2000, || {
        format!("the test file is not in the page cache to begin with ({before} of 2,048 pages)")
    })?;
    let fs = ctl.sh(&format!("stat -f -c %T {guest}"))?;
    ensure(!fs.contains("tmpfs"), || {
        format!(
            "{guest} is on tmpfs, whose pages a port never takes: this check would prove nothing"
        )
    })?;
    ctl.run(
        true,
        &["pull", guest, &back.display().to_string()],
        Duration::from_secs(120),
    )?
    .ok()?;
    let after = pages(&ctl.sh(&format!("{cached}; rm -f {guest}"))?)?;
    println!(
        "  pull of an 8 MiB file on {}: pages cached {before} before, {after} after",
        fs.trim()
    );
    ensure(after >= before * 9 / 10, || {
        format!("the pull took the file out of the guest's page cache: {before} pages cached before, {after} after")
    })?;
    crate::suite::same_content(&src, &back)
}

/// The page count `fincore --output PAGES` printed.
fn pages(out: &str) -> Result<u64> {
    out.trim()
        .parse()
        .map_err(|_| format!("fincore printed {out:?}, not a page count").into())
}

/// The last `n` lines of a text.
fn clip_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A host file of `len` random bytes in `dir`.
fn random_in(dir: &Path, name: &str, len: u64) -> Result<PathBuf> {
    let p = dir.join(name);
    crate::suite::random_file(&p, len)?;
    Ok(p)
}

/// `systemctl restart` while a 128 MiB push runs: the push either completes
/// intact or fails with a clear error, and the next push succeeds.
fn restart_mid_transfer(ctl: &Ctl) -> Result<()> {
    let dir = scratch("deb-restart")?;
    // As large as the test policy allows (128 MiB), so the transfer runs
    // for seconds under TCG.
    let src = random_in(&dir, "src", 128 << 20)?;
    let back = dir.join("back");
    let guest = "/tmp/kvmmanager/restart.bin";
    let before = unit_props(ctl)?.get("MainPID").cloned().unwrap_or_default();
    let mut push = ctl
        .command(true, &["push", &src.display().to_string(), guest])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Let the transfer get going, then restart the unit under it.
    std::thread::sleep(Duration::from_secs(1));
    if let Some(status) = push.try_wait()? {
        bail!("the push ended ({status}) before the restart: this check would prove nothing");
    }
    restart_unit(ctl)?;
    let out = crate::util::wait_output(push, Duration::from_secs(600))?;
    let after = wait_new_main_pid(ctl, &before, Duration::from_secs(60))?;
    let push_code = out.status.code().unwrap_or(-1);
    println!(
        "  restart during a 128 MiB push: push exit {push_code}; agent pid {before} -> {after}"
    );
    if push_code == 0 {
        ctl.run(
            true,
            &["pull", guest, &back.display().to_string()],
            Duration::from_secs(600),
        )?
        .ok()?;
        crate::suite::same_content(&src, &back)?;
    } else {
        let msg = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure(matches!(push_code, 1 | 3 | 4 | 5), || {
            format!("push exit {push_code} during the restart: {msg}")
        })?;
        ensure(!msg.trim().is_empty(), || {
            "the failed push said nothing".to_owned()
        })?;
        println!("  push error: {}", msg.trim());
        // The host library recovers: the same push works now.
        ctl.push(&src, guest, Duration::from_secs(600))?;
        ctl.run(
            true,
            &["pull", guest, &back.display().to_string()],
            Duration::from_secs(600),
        )?
        .ok()?;
        crate::suite::same_content(&src, &back)?;
    }
    let _ = ctl.sh(&format!("rm -f {guest}"));
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

/// Marks the installed config, upgrades to the newer build with
/// `apt install`, and checks the edit survived and the agent restarted
/// with the new package.
fn upgrade_keeps_config(ctl: &Ctl, newer: &Path) -> Result<()> {
    let cfg = "/etc/kvmmanager-agent/config.json";
    ctl.sh(&format!(
            "sed -i 's/\"request_timeout_seconds\": *30/\"request_timeout_seconds\": 31/' {cfg} && grep -q '\"request_timeout_seconds\": 31' {cfg}"
        ),
    )?;
    let name = newer
        .file_name()
        .ok_or("no file name")?
        .to_string_lossy()
        .into_owned();
    let guest_deb = format!("/tmp/kvmmanager/{name}");
    ctl.push(newer, &guest_deb, Duration::from_secs(300))?;
    let want = crate::util::output(
        std::process::Command::new("dpkg-deb")
            .args(["-f"])
            .arg(newer)
            .arg("Version"),
    )?
    .trim()
    .to_owned();
    let before = unit_props(ctl)?.get("MainPID").cloned().unwrap_or_default();
    // The upgrade restarts the agent, which kills its own commands: run apt
    // in a transient unit of its own, as an operator would over the agent.
    ctl.sh(&format!(
            "systemd-run --unit=kvmm-upgrade --collect --no-block sh -c 'cd /tmp/kvmmanager && DEBIAN_FRONTEND=noninteractive apt install -y ./{name} > /var/log/kvmm-upgrade.log 2>&1'"
        ),
    )?;
    let after = wait_new_main_pid(ctl, &before, Duration::from_secs(180))?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let version = loop {
        let v = ctl
            .sh("dpkg-query -W -f '${Version} ${db:Status-Abbrev}' kvmmanager-agent")
            .unwrap_or_default();
        if v.starts_with(&format!("{want} ii")) || Instant::now() >= deadline {
            break v;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    ensure(version.starts_with(&format!("{want} ii")), || {
        format!("installed after the upgrade: {version:?}, want {want}")
    })?;
    ctl.sh(&format!("grep -q '\"request_timeout_seconds\": 31' {cfg}"))
        .map_err(|e| format!("the edited config did not survive the upgrade: {e}"))?;
    ensure(after != before, || "agent not restarted".to_owned())?;
    ctl.wait_ping(Duration::from_secs(60))?;
    println!("  upgraded to {want}; agent pid {before} -> {after}; edited config kept");
    let _ = ctl.sh(&format!("rm -f {guest_deb}"));
    Ok(())
}

/// The hardened drop-in from the package's examples, with a whitelist:
/// a whitelisted command runs, another is refused, a write the policy
/// allows but the sandbox does not gives a clear error at once. It also
/// puts `/tmp` on a tmpfs from the next boot on (Debian's `tmp.mount`), for
/// the reboot check that follows.
fn hardened_dropin(ctl: &Ctl) -> Result<()> {
    let dir = scratch("deb-hardened")?;
    let cfg = dir.join("config.json");
    // `systemd-run` is whitelisted only so that the test can take the
    // package out afterwards: a real whitelist must never hold it (it runs
    // anything, outside the sandbox).
    let config = serde_json::json!({
        "log_level": "info",
        "security": {
            "allowed_read_paths": ["/tmp", "/var/log", "/etc/hostname", "/etc/os-release"],
            "allowed_write_paths": ["/tmp/kvmmanager", "/var/tmp/kvmm-outside"],
            "command_whitelist": ["echo", "id", "/usr/bin/systemd-run"],
            "max_file_size_mb": 16
        }
    });
    fs::write(&cfg, serde_json::to_vec_pretty(&config)?)?;
    ctl.push(
        &cfg,
        "/tmp/kvmmanager/hardened-config.json",
        Duration::from_secs(60),
    )?;
    ctl.sh(
        "d=/etc/systemd/system/kvmmanager-agent.service.d && mkdir -p $d /var/tmp/kvmm-outside \
         && cp /usr/share/doc/kvmmanager-agent/examples/hardened.conf $d/ \
         && cp /tmp/kvmmanager/hardened-config.json /etc/kvmmanager-agent/config.json \
         && systemctl enable /usr/share/systemd/tmp.mount \
         && systemd-run --unit=kvmm-harden --collect --no-block sh -c \
            'systemctl daemon-reload; systemctl restart kvmmanager-agent.service'",
    )?;
    // The unit's state cannot be read through the agent any more (systemctl
    // is not whitelisted): wait until a command outside the whitelist is
    // refused, which only the restarted agent does.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = ctl.run(true, &["exec", "--", "ls", "/"], Duration::from_secs(30));
        match r {
            // `exec` exits 255 when kvmmanager-ctl, not the command, failed.
            Ok(r) if r.code == 255 && r.all_output().contains("policy_denied") => break,
            _ if Instant::now() >= deadline => {
                bail!("the hardened agent did not answer (refusing `ls`) within 120 s: {r:?}")
            }
            _ => std::thread::sleep(Duration::from_secs(1)),
        }
    }
    let id = ctl.json(&["exec", "--", "id", "-u"])?;
    ensure(exec_result(&id)["stdout"] == "0\n", || {
        format!("a whitelisted command (id -u): {id}")
    })?;
    let info = ctl.json(&["info"])?;
    ensure(
        info["limits"]["command_containment"] == "process_group",
        || format!("containment under ProtectControlGroups: {}", info["limits"]),
    )?;
    // Allowed by the policy, read-only in the sandbox.
    let f = dir.join("x");
    fs::write(&f, b"sandboxed\n")?;
    let start = Instant::now();
    let r = ctl.run(
        true,
        &["push", &f.display().to_string(), "/var/tmp/kvmm-outside/x"],
        Duration::from_secs(60),
    )?;
    let took = start.elapsed();
    ensure(r.code == 1, || {
        format!(
            "a write outside ReadWritePaths: exit {}: {}",
            r.code,
            r.all_output()
        )
    })?;
    let msg = r.all_output().to_lowercase();
    ensure(msg.contains("read-only"), || {
        format!("the error does not say read-only: {}", r.all_output())
    })?;
    println!(
        "  write outside ReadWritePaths refused in {:.2} s: {}",
        took.as_secs_f64(),
        r.stderr.trim()
    );
    // Inside ReadWritePaths it works.
    ctl.push(&f, "/tmp/kvmmanager/x", Duration::from_secs(60))?;
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

/// `apt remove` then `apt purge`, run outside the agent (it is what goes
/// away), results on the console; then the guest powers off.
fn remove_and_purge(ctl: &Ctl, vm: &mut QemuVm) -> Result<()> {
    let script = "cfg=/etc/kvmmanager-agent/config.json; \
        DEBIAN_FRONTEND=noninteractive apt-get remove -y kvmmanager-agent >/var/log/kvmm-remove.log 2>&1; \
        echo KVMM-REMOVED rc=$? state=$(systemctl is-active kvmmanager-agent.service) config=$(test -f $cfg && echo kept || echo gone) binary=$(test -e /usr/bin/kvmmanager-agent && echo present || echo gone) >/dev/console; \
        DEBIAN_FRONTEND=noninteractive apt-get purge -y kvmmanager-agent >/var/log/kvmm-purge.log 2>&1; \
        echo KVMM-PURGED rc=$? config=$(test -e $cfg && echo kept || echo gone) dir=$(test -e /etc/kvmmanager-agent && echo kept || echo gone) >/dev/console; \
        systemctl poweroff";
    // Through the whitelisted systemd-run (see `hardened_dropin`).
    ctl.run(
        true,
        &[
            "exec",
            "--",
            "/usr/bin/systemd-run",
            "--unit=kvmm-remove",
            "--no-block",
            "sh",
            "-c",
            script,
        ],
        Duration::from_secs(60),
    )?
    .ok()?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let purged = vm.console_lines("KVMM-PURGED");
        if !purged.is_empty() {
            let removed = vm.console_lines("KVMM-REMOVED");
            println!("  remove: {removed:?}; purge: {purged:?}");
            ensure(
                removed.first().map(String::as_str)
                    == Some("rc=0 state=inactive config=kept binary=gone"),
                || format!("after apt remove: {removed:?}"),
            )?;
            ensure(
                purged.first().map(String::as_str) == Some("rc=0 config=gone dir=gone"),
                || format!("after apt purge: {purged:?}"),
            )?;
            break;
        }
        if Instant::now() >= deadline {
            bail!("no KVMM-PURGED line within 300 s");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // And the agent is gone.
    let r = ctl.run(true, &["--timeout", "3", "ping"], Duration::from_secs(30))?;
    ensure(r.code != 0, || {
        format!("ping answered after purge: {}", r.stdout)
    })?;
    match vm.wait_exit(Duration::from_secs(120))? {
        Some(_) => Ok(()),
        None => bail!("the guest did not power off within 120 s of the purge"),
    }
}

/// The Debian suite under QEMU.
pub(crate) fn qemu_debian_suite(
    t: &mut Tally,
    image: &DebianImage,
    debs: &Debs,
    ctl_bin: &Path,
) -> Result<()> {
    heading("vm-test: Debian 12 guest under QEMU (package installed by apt, started by systemd)");
    let run_dir = scratch("deb-prov")?;
    let prov = run_dir.join("prov.img");
    debian::provision_disk(&prov, &[&debs.current], debian::INSTALL_SCRIPT)?;
    let started = Instant::now();
    let mut vm = match QemuVm::boot_debian(
        image,
        "debian",
        &DebianBoot {
            extra_disks: vec![prov],
            agent_port: false,
            cpus: DEBIAN_FACTS.cpus as u32,
            console_socket: false,
        },
    ) {
        Ok(vm) => vm,
        Err(e) => {
            t.fail("debian-boot", &e);
            return Ok(());
        }
    };
    println!(
        "  Debian guest booted in {:.1} s (TCG, 2 vCPUs)",
        started.elapsed().as_secs_f64()
    );
    t.check("debian-boot", || Ok(()));
    let ctl = Ctl {
        bin: ctl_bin.to_owned(),
        target: Target::Socket(vm.socket.clone()),
    };
    let installed = t.check("debian-apt-install-without-port", || {
        let done = wait_provisioned(|| vm.console_lines(PROVISIONED_MARKER))?;
        // No port yet: the unit must not be running.
        provisioned_ok(&done, &vm.console_lines(AGENT_STATE_MARKER), "inactive")
    });
    if !installed {
        return Ok(());
    }
    let up = t.check("debian-port-hotplug-starts-agent", || {
        let t0 = Instant::now();
        vm.hotplug_agent_port()?;
        ctl.wait_ping(Duration::from_secs(120))?;
        println!(
            "  agent answered {:.1} s after the port was hot-plugged",
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    });
    if !up {
        return Ok(());
    }
    t.check("debian-systemd-unit", || {
        let p = unit_props(&ctl)?;
        ensure(
            p.get("ActiveState").map(String::as_str) == Some("active")
                && p.get("SubState").map(String::as_str) == Some("running"),
            || format!("unit state: {p:?}"),
        )?;
        let pid = ctl.sh("pidof kvmmanager-agent")?;
        ensure(
            p.get("MainPID").map(String::as_str) == Some(pid.trim()),
            || format!("MainPID {:?} but pidof says {pid:?}", p.get("MainPID")),
        )?;
        // Delegate=yes: the agent moved into the leaf `agent` of its unit's cgroup.
        let own = ctl.sh("cat /proc/$(pidof kvmmanager-agent)/cgroup")?;
        ensure(
            own.trim()
                .ends_with("system.slice/kvmmanager-agent.service/agent"),
            || format!("agent's cgroup: {own}"),
        )
    });
    if !t.check("debian-owner-edits-config", || owner_edits_config(&ctl)) {
        return Ok(());
    }
    let failed_before = t.failed_count();
    guest_checks(t, &ctl, &DEBIAN_FACTS, "debian-")?;
    crate::ops_checks::guestops_checks(t, &ctl, "debian-");
    t.check("debian-journal", || journal_check(&ctl));
    t.check("debian-read-log-journal", || {
        crate::fleet_checks::journal_log_check(&ctl)
    });
    t.check("debian-pull-keeps-page-cache", || {
        pull_keeps_page_cache(&ctl)
    });
    t.check("debian-restart-mid-transfer", || restart_mid_transfer(&ctl));
    t.check("debian-upgrade-keeps-config", || {
        upgrade_keeps_config(&ctl, &debs.newer)
    });
    save_journal(&ctl, t, failed_before, "debian-qemu");
    t.check("debian-hardened-dropin", || hardened_dropin(&ctl));
    t.check("debian-reboot", || {
        let boots = vm.boots();
        ctl.run(true, &["reboot"], Duration::from_secs(60))?.ok()?;
        let t0 = Instant::now();
        vm.wait_for_markers(boots + 1, DEBIAN_BOOT_TIMEOUT)?;
        ctl.wait_ping(Duration::from_secs(120))?;
        println!(
            "  agent back {:.1} s after the reboot request",
            t0.elapsed().as_secs_f64()
        );
        let v = ctl.json(&["sysinfo"])?;
        ensure(v["uptime_seconds"].as_f64().unwrap_or(1e9) < 300.0, || {
            format!("uptime after reboot: {}", v["uptime_seconds"])
        })?;
        // Rebooted with the hardened drop-in and /tmp on a fresh tmpfs
        // (tmp.mount, enabled by the hardened check): tmpfiles.d made
        // /tmp/kvmmanager, so the sandboxed agent can write there.
        let df = ctl.json(&["df", "--all"])?;
        let tmp_fs = df["filesystems"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["mount_point"] == "/tmp"))
            .map(|f| f["fs_type"].clone());
        ensure(tmp_fs == Some(Value::from("tmpfs")), || {
            format!("/tmp after the reboot: {tmp_fs:?}")
        })?;
        let dir = scratch("deb-reboot")?;
        let f = dir.join("after-reboot");
        fs::write(&f, b"written after a reboot onto a tmpfs /tmp\n")?;
        ctl.push(&f, "/tmp/kvmmanager/after-reboot", Duration::from_secs(60))?;
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    });
    t.check("debian-apt-remove-purge", || {
        remove_and_purge(&ctl, &mut vm)
    });
    let _ = fs::remove_dir_all(&run_dir);
    Ok(())
}

/// The Debian suite under libvirt (port present from boot).
pub(crate) fn libvirt_debian_suite(
    t: &mut Tally,
    lv: &crate::vm::Libvirt,
    image: &DebianImage,
    debs: &Debs,
    ctl_bin: &Path,
) -> Result<()> {
    heading("vm-test: Debian 12 guest under libvirt");
    let run_dir = scratch("deb-lv")?;
    let prov = run_dir.join("prov.img");
    debian::provision_disk(&prov, &[&debs.current], debian::INSTALL_SCRIPT)?;
    let name = format!("kvmm-debian-{}", std::process::id());
    let dom = match crate::vm::Domain::start_debian(lv, image, &name, &prov) {
        Ok(d) => d,
        Err(e) => {
            t.fail("libvirt-debian-boot", &e);
            return Ok(());
        }
    };
    t.check("libvirt-debian-boot", || Ok(()));
    let ctl = Ctl {
        bin: ctl_bin.to_owned(),
        target: Target::Domain(name.clone()),
    };
    let installed = t.check("libvirt-debian-apt-install-starts-agent", || {
        let done = wait_provisioned(|| crate::vm::marker_lines(&dom.console, PROVISIONED_MARKER))?;
        // The port is there: postinst's udev trigger starts the unit.
        provisioned_ok(
            &done,
            &crate::vm::marker_lines(&dom.console, AGENT_STATE_MARKER),
            "active",
        )?;
        ctl.wait_ping(Duration::from_secs(60)).map(|_| ())
    });
    if !installed {
        return Ok(());
    }
    crate::qga_checks::default_port_check(t, &name);
    if !t.check("libvirt-debian-owner-edits-config", || {
        owner_edits_config(&ctl)
    }) {
        return Ok(());
    }
    let failed_before = t.failed_count();
    guest_checks(t, &ctl, &DEBIAN_FACTS, "libvirt-debian-")?;
    crate::ops_checks::guestops_checks(t, &ctl, "libvirt-debian-");
    t.check("libvirt-debian-journal", || journal_check(&ctl));
    crate::qga_checks::virsh_agent_checks(t, &ctl, &name);
    save_journal(&ctl, t, failed_before, "debian-libvirt");
    let wait_boot = |boots: usize| -> Result<()> {
        let deadline = Instant::now() + DEBIAN_BOOT_TIMEOUT;
        while crate::vm::count_lines(&dom.console, debian::UP_MARKER) <= boots {
            if Instant::now() >= deadline {
                bail!("no new boot marker within {DEBIAN_BOOT_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        ctl.wait_ping(Duration::from_secs(120)).map(|_| ())
    };
    // libvirt's agent modes, answered by the agent's qemu-ga dialect.
    t.check("libvirt-debian-reboot-mode-agent", || {
        let boots = crate::vm::count_lines(&dom.console, debian::UP_MARKER);
        crate::qga_checks::virsh(&["reboot", &name, "--mode", "agent"])?;
        wait_boot(boots)
    });
    // Debian's qemu-guest-agent beside the agent: handed over, never
    // fought over, at install and at boot; then masked back.
    crate::qga_checks::beside_qemu_ga_check(t, &ctl, &name);
    t.check("libvirt-debian-reboot", || {
        let boots = crate::vm::count_lines(&dom.console, debian::UP_MARKER);
        ctl.run(true, &["reboot"], Duration::from_secs(60))?.ok()?;
        wait_boot(boots)
    });
    crate::qga_checks::unmasked_at_boot_check(t, &ctl, &name);
    crate::qga_checks::mask_check(t, &ctl, &name);
    crate::qga_checks::same_guest_check(
        t,
        &ctl,
        &name,
        dom.port_socket(crate::qga_checks::QGA_PEER_PORT),
    );
    save_journal(&ctl, t, failed_before, "debian-libvirt-qemu-ga");
    t.check("libvirt-debian-shutdown-mode-agent", || {
        crate::qga_checks::virsh(&["shutdown", &name, "--mode", "agent"])?;
        dom.wait_shut_off(Duration::from_secs(120))
    });
    drop(dom);
    let _ = fs::remove_dir_all(&run_dir);
    Ok(())
}
