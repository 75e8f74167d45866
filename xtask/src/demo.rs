//! `cargo xtask demo`: a tour of `kvmmanager-ctl` against a real guest, and
//! `cargo xtask boot`: just a running guest and its socket.

use std::path::Path;
use std::time::Duration;

use crate::deps::{self, Group};
use crate::guest::{self, GuestOptions};
use crate::suite::{build_ctl, Ctl, Target};
use crate::util::{heading, quote, Result};
use crate::vm::{DebianBoot, QemuOptions, QemuVm};

/// Prints how to reach a kept VM and how to stop it.
fn print_keep(vm: QemuVm) {
    let socket = vm.socket.clone();
    let console = vm.console.clone();
    let (pid, dir) = vm.keep();
    println!();
    println!("The guest keeps running (QEMU pid {pid}).");
    println!("  agent socket:  {}", socket.display());
    println!("  console log:   {}", console.display());
    println!("Ping it by hand (0xFF resynchronises the stream, then one JSON-RPC line;");
    println!("shut-none keeps socat from half-closing, which QEMU takes for a disconnect):");
    println!("  {}", crate::probe::socat_line(&socket));
    match crate::probe::socat_ping(&socket) {
        Ok(reply) => print!("  -> {reply}"),
        Err(e) => println!("  (tried it: {e})"),
    }
    println!("Or with the CLI:");
    println!(
        "  target/debug/kvmmanager-ctl --socket {} sysinfo",
        socket.display()
    );
    println!("Stop it:");
    println!("  kill {pid} && rm -r {}", dir.display());
}

/// `cargo xtask boot [--with-qemu-ga]`: boot, check the port with the raw
/// probe, keep running. With qemu-ga, its port is attached too (for `bench`).
pub(crate) fn boot_only(with_qemu_ga: bool) -> Result<()> {
    deps::ensure(&[Group::Qemu])?;
    let image = guest::build(GuestOptions { with_qemu_ga })?;
    heading("boot");
    let opts = QemuOptions {
        qemu_ga_port: with_qemu_ga,
        ..QemuOptions::default()
    };
    let vm = QemuVm::boot(&image, "boot", &opts)?;
    let reply = crate::probe::wait_ping(&vm.socket, Duration::from_secs(30));
    match &reply {
        Ok(v) => println!("raw probe ping: {v}"),
        Err(e) => println!("raw probe ping failed: {e}"),
    }
    if let Some(qga) = &vm.qga_socket {
        println!("qemu-ga socket: {}", qga.display());
        println!(
            "  echo '{{\"execute\":\"guest-ping\"}}' | socat -t 2 - UNIX-CONNECT:{},shut-none",
            qga.display()
        );
    }
    print_keep(vm);
    reply.map(|_| ())
}

/// Runs one tour step: prints the command line, then its output.
fn step(ctl: &Ctl, args: &[&str]) -> Result<bool> {
    let cmd = ctl.command(false, args);
    let mut line = String::from("kvmmanager-ctl");
    for a in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(a));
    }
    println!("\n$ {line}");
    let r = ctl.run(false, args, Duration::from_secs(120))?;
    print!("{}", r.stdout);
    if !r.stderr.is_empty() {
        print!("{}", r.stderr);
    }
    if r.code != 0 {
        println!("(exit status {})", r.code);
    }
    Ok(r.code == 0)
}

/// The tour's steps; the number that failed.
fn tour(ctl: &Ctl) -> Result<u32> {
    heading("demo: a tour of kvmmanager-ctl");
    let local = std::env::temp_dir().join(format!("kvmm-demo-{}.txt", std::process::id()));
    let back = std::env::temp_dir().join(format!("kvmm-demo-{}.back", std::process::id()));
    std::fs::write(
        &local,
        "Hello from the host, through a virtio-serial port.\n",
    )?;
    let s = |p: &Path| p.display().to_string();
    let (local_s, back_s) = (s(&local), s(&back));
    let mut failures = 0;
    let tour: Vec<Vec<&str>> = vec![
        vec!["ping"],
        vec!["info"],
        vec!["sysinfo"],
        vec!["net"],
        vec!["df"],
        vec!["exec", "--", "uname", "-a"],
        vec!["push", &local_s, "/tmp/kvmmanager/hello.txt"],
        vec!["cat", "/tmp/kvmmanager/hello.txt"],
        vec!["pull", "/tmp/kvmmanager/hello.txt", &back_s],
    ];
    for args in &tour {
        if !step(ctl, args)? {
            failures += 1;
        }
    }
    println!("\nThe policy refuses paths outside its allowlists:");
    if step(ctl, &["cat", "/etc/shadow"])? {
        println!("(unexpected: the refused read succeeded)");
        failures += 1;
    }
    let _ = std::fs::remove_file(&local);
    let _ = std::fs::remove_file(&back);
    Ok(failures)
}

/// Which guest the demo boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Distro {
    /// The small initramfs guest (busybox, the agent started by `/init`).
    Initramfs,
    /// The Debian 12 guest with the `.deb` installed by apt.
    Debian,
}

/// `cargo xtask demo [--distro debian] [--keep]`.
pub(crate) fn demo(distro: Distro, keep: bool) -> Result<()> {
    if distro == Distro::Debian {
        return demo_debian(keep);
    }
    deps::ensure(&[Group::Guest, Group::Qemu])?;
    let image = guest::build(GuestOptions::default())?;
    heading("demo: building kvmmanager-ctl");
    let ctl_bin = build_ctl()?;
    heading("demo: booting the guest (QEMU, TCG)");
    let vm = QemuVm::boot(&image, "demo", &QemuOptions::default())?;
    let ctl = Ctl {
        bin: ctl_bin,
        target: Target::Socket(vm.socket.clone()),
    };
    let failures = tour(&ctl)?;
    finish(vm, keep, failures)
}

/// Leaves the VM running (and says how to reach it) or stops it; fails if
/// any tour step failed.
fn finish(vm: QemuVm, keep: bool, failures: u32) -> Result<()> {
    if keep {
        print_keep(vm);
    } else {
        drop(vm);
        println!("\nDemo done; the VM was stopped (use --keep to leave it running).");
    }
    if failures > 0 {
        return Err(format!("{failures} demo step(s) failed").into());
    }
    Ok(())
}

/// The demo on the Debian 12 guest: the `.deb` installed by apt at first
/// boot, the agent started by udev and systemd, then the tour.
fn demo_debian(keep: bool) -> Result<()> {
    deps::ensure(&[Group::Qemu])?;
    let image = crate::debian::build()?;
    let pkgs = crate::dist::build()?;
    heading("demo: building kvmmanager-ctl");
    let ctl_bin = build_ctl()?;
    heading("demo: booting the Debian 12 guest (QEMU, TCG); apt installs the .deb at first boot");
    let prov = crate::util::target_dir().join("guest/debian-demo-provision.img");
    std::fs::create_dir_all(prov.parent().unwrap_or(Path::new(".")))?;
    crate::debian::provision_disk(&prov, &[&pkgs.deb], crate::debian::INSTALL_SCRIPT)?;
    let vm = QemuVm::boot_debian(
        &image,
        "demo-debian",
        &DebianBoot {
            extra_disks: vec![prov],
            agent_port: true,
            cpus: 2,
            console_socket: true,
        },
    )?;
    let done = crate::debian_suite::wait_provisioned(|| {
        vm.console_lines(crate::debian::PROVISIONED_MARKER)
    })?;
    println!(
        "apt install in the guest: {}; kvmmanager-agent.service: {}",
        done.join(" "),
        vm.console_lines(crate::debian::AGENT_STATE_MARKER)
            .join(" ")
    );
    let ctl = Ctl {
        bin: ctl_bin,
        target: Target::Socket(vm.socket.clone()),
    };
    ctl.wait_ping(Duration::from_secs(120))?;
    let failures = tour(&ctl)?;
    if keep {
        let console = vm.console.with_file_name("console.sock");
        println!();
        println!(
            "Serial console (log in as root, password {:?}; leave with Ctrl-]):",
            crate::debian::ROOT_PASSWORD
        );
        println!(
            "  socat -,raw,echo=0,escape=0x1d UNIX-CONNECT:{}",
            console.display()
        );
    }
    finish(vm, keep, failures)
}
