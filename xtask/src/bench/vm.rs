//! The bench guest: one TCG QEMU with four virtio-serial ports.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::err;
use crate::guest::{self, AGENT_PORT, OUR_QGA_PORT, QEMU_GA_PORT};
use crate::util::{bail, kill_pid, Result};

/// Name of the raw port (no agent on it; a guest `dd` writes into it).
pub(crate) const RAW_PORT: &str = "org.kvmmanager.bench.0";

/// The bench guest: four ports (ours, qemu-ga's, ours in qemu-ga's
/// protocol, raw). Killed on drop.
pub(crate) struct Vm {
    child: Child,
    dir: PathBuf,
    pub(crate) ours: PathBuf,
    pub(crate) qga: PathBuf,
    /// Our agent's qemu-ga dialect (`qemu_ga_channel_name` of the guest).
    pub(crate) ours_qga: PathBuf,
    pub(crate) raw: PathBuf,
}

impl Vm {
    /// Boots the guest and waits until it reports ready.
    pub(crate) fn boot(image: &guest::GuestImage) -> Result<Vm> {
        let dir = std::env::temp_dir().join(format!("kvmm-bench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let console = dir.join("console.log");
        let log = fs::File::create(dir.join("qemu.log"))?;
        let ours = dir.join("agent.sock");
        let qga = dir.join("qga.sock");
        let raw = dir.join("raw.sock");
        let ours_qga = dir.join("ours-qga.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "512", "-smp", "1", "-nographic"]);
        cmd.arg("-kernel").arg(&image.kernel);
        cmd.arg("-initrd").arg(&image.initrd);
        cmd.args(["-nic", "none", "-monitor", "none"]);
        cmd.arg("-serial")
            .arg(format!("file:{}", console.display()));
        cmd.args(["-device", "virtio-serial-pci"]);
        for (i, (sock, name)) in [
            (&ours, AGENT_PORT),
            (&qga, QEMU_GA_PORT),
            (&raw, RAW_PORT),
            (&ours_qga, OUR_QGA_PORT),
        ]
        .into_iter()
        .enumerate()
        {
            cmd.arg("-chardev").arg(format!(
                "socket,path={},server=on,wait=off,id=ch{i}",
                sock.display()
            ));
            cmd.arg("-device")
                .arg(format!("virtserialport,chardev=ch{i},name={name}"));
        }
        cmd.arg("-append").arg(format!(
            "console=ttyS0 panic=-1 edd=off quiet kvmm_ports={AGENT_PORT},{QEMU_GA_PORT},{RAW_PORT},{OUR_QGA_PORT}"
        ));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(err("cannot start QEMU"))?;
        let mut vm = Vm {
            child,
            dir,
            ours,
            qga,
            ours_qga,
            raw,
        };
        let start = Instant::now();
        while crate::vm::count_markers(&console) == 0 {
            if let Some(s) = vm.child.try_wait()? {
                bail!("QEMU exited ({s}) before the guest was ready");
            }
            if start.elapsed() > crate::vm::BOOT_TIMEOUT {
                bail!(
                    "guest not ready within {:?}:\n{}",
                    crate::vm::BOOT_TIMEOUT,
                    crate::util::tail(&console, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "bench: guest booted in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(2));
        Ok(vm)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        kill_pid(self.child.id(), "KILL");
        let _ = self.child.wait();
        if std::env::var_os("XTASK_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
