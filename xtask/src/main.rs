//! `cargo xtask`: everything beyond `cargo build`/`cargo test`.
//!
//! Run `cargo xtask help` for the tasks. Each task installs what it needs
//! (Debian packages as root, Rust targets, cargo tools) or, when it cannot,
//! prints the exact command to run and fails.

mod bench;
mod debian;
mod debian_suite;
mod demo;
mod deps;
mod dist;
mod fuzz;
mod guest;
mod pipeline;
mod probe;
mod qmp;
mod soak;
mod suite;
mod util;
mod vm;

use std::process::ExitCode;

use util::{bail, Result};

const HELP: &str = "\
cargo xtask <task> [options]

Tasks:
  deps                 install everything the tasks below need (apt packages as
                       root, rustup targets, cargo-deb, cargo-generate-rpm)
  guest-image          build the test guest under target/guest/ (Debian cloud
                       kernel, busybox, the static agent, /init)
      --with-qemu-ga   also include Debian's qemu-ga (for benchmarks)
  boot                 boot the guest under QEMU, ping the agent through the raw
                       port, and leave it running (prints socket, pid)
      --with-qemu-ga   also run Debian's qemu-ga on org.qemu.guest_agent.0
  vm-test              boot the guests and run the integration suite through
                       kvmmanager-ctl, under QEMU then libvirt: the initramfs
                       guest, then a Debian 12 guest (systemd, the .deb
                       installed by apt; image cached outside the clone)
      --qemu-only | --libvirt-only | --initramfs-only | --debian-only
  debian-image         build (or find cached) the Debian 12 guest image
  dist                 release build (static musl) and .deb/.rpm in target/dist/
      --check          also inspect both packages and install the .deb into a
                       scratch root
  demo                 boot the demo guest and tour kvmmanager-ctl against it
      --distro debian  the Debian 12 guest instead, the .deb installed by apt
                       (its serial console is served for a person to log in)
      --keep           leave the VM running and print how to reach it
  test                 everything CI runs: fmt, clippy, unit tests, Windows
                       check, packages, real-VM tests (QEMU and libvirt)
  bench                boot one guest with our agent and Debian's qemu-ga and
                       measure both side by side (table + target/bench/bench.json)
      --only LIST      only these figures, e.g. exec,ping (a bad name lists all;
                       the table goes to target/bench/bench-only.json)
  fuzz                 run every cargo-fuzz target in fuzz/ (nightly)
      --seconds N      per target (default 300; the test command uses 30)
  soak                 leak soak at full size: 1,000,000 pings, 10,000 each of
                       write/read/exec, 1,000 connections, 50 floods; RSS,
                       peak against the memory bound, and fds checked
  help                 this text

Environment: CI=true makes a missing prerequisite a failure, never a skip;
XTASK_KEEP_LOGS=1 keeps the VM console logs.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Splits `args` into the task name and its flags, refusing unknown flags.
fn flags<'a>(args: &'a [String], allowed: &[&str]) -> Result<Vec<&'a str>> {
    let mut out = Vec::new();
    for a in args {
        if !allowed.contains(&a.as_str()) {
            bail!("unknown option {a:?} (allowed: {allowed:?}); see `cargo xtask help`");
        }
        out.push(a.as_str());
    }
    Ok(out)
}

fn run(args: &[String]) -> Result<()> {
    let Some((task, rest)) = args.split_first() else {
        print!("{HELP}");
        return Ok(());
    };
    match task.as_str() {
        "deps" => {
            flags(rest, &[])?;
            deps::deps()
        }
        "guest-image" => {
            let f = flags(rest, &["--with-qemu-ga"])?;
            guest::build(guest::GuestOptions {
                with_qemu_ga: f.contains(&"--with-qemu-ga"),
            })
            .map(|_| ())
        }
        "debian-image" => {
            flags(rest, &[])?;
            debian::build().map(|_| ())
        }
        "boot" => {
            let f = flags(rest, &["--with-qemu-ga"])?;
            demo::boot_only(f.contains(&"--with-qemu-ga"))
        }
        "vm-test" => {
            let f = flags(
                rest,
                &[
                    "--qemu-only",
                    "--libvirt-only",
                    "--initramfs-only",
                    "--debian-only",
                ],
            )?;
            suite::vm_test(suite::VmTestOptions {
                qemu: !f.contains(&"--libvirt-only"),
                libvirt: !f.contains(&"--qemu-only"),
                initramfs: !f.contains(&"--debian-only"),
                debian: !f.contains(&"--initramfs-only"),
            })
        }
        "dist" => {
            let f = flags(rest, &["--check"])?;
            dist::dist(f.contains(&"--check"))
        }
        "demo" => {
            let mut distro = demo::Distro::Initramfs;
            let mut keep = false;
            let mut it = rest.iter();
            while let Some(a) = it.next() {
                match (a.as_str(), it.clone().next().map(String::as_str)) {
                    ("--keep", _) => keep = true,
                    ("--distro", Some("debian")) => {
                        distro = demo::Distro::Debian;
                        it.next();
                    }
                    ("--distro", Some("initramfs")) => {
                        it.next();
                    }
                    _ => bail!(
                        "unknown option {a:?}; usage: cargo xtask demo [--distro initramfs|debian] [--keep]"
                    ),
                }
            }
            demo::demo(distro, keep)
        }
        "test" => {
            flags(rest, &[])?;
            pipeline::test()
        }
        "fuzz" => {
            let seconds = match rest {
                [] => 300,
                [flag, n] if flag == "--seconds" => n
                    .parse()
                    .map_err(|_| format!("--seconds takes a number, not {n:?}"))?,
                _ => bail!("usage: cargo xtask fuzz [--seconds N]"),
            };
            Ok(fuzz::run(seconds)?)
        }
        "soak" => {
            flags(rest, &[])?;
            soak::soak()
        }
        "bench" => bench::main(rest),
        "help" | "-h" | "--help" => {
            print!("{HELP}");
            Ok(())
        }
        other => bail!("unknown task {other:?}; see `cargo xtask help`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_refuses_unknown_options() {
        let args = vec!["--keep".to_owned()];
        assert_eq!(flags(&args, &["--keep"]).unwrap(), vec!["--keep"]);
        assert!(flags(&args, &["--check"]).is_err());
        assert!(run(&["no-such-task".to_owned()]).is_err());
    }
}
