//! Booting the guest: under QEMU directly, and as a libvirt domain.
//!
//! Both guards clean up on drop, by pid: QEMU is killed, the libvirt domain
//! destroyed and undefined, and daemons this process started are stopped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::guest::{GuestImage, AGENT_PORT, READY_MARKER};
use crate::util::{bail, kill_pid, output, pid_alive, render, succeeds, tail, Result};

/// Kernel command line of the test guest (`kvmm_ports` is appended).
const CMDLINE: &str = "console=ttyS0 panic=-1 edd=off quiet";

/// How long a TCG boot may take to reach the marker.
pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Kernel command line of the Debian guest. The root disk is found by its
/// label: QEMU does not number virtio disks in command-line order.
const DEBIAN_CMDLINE: &str = "root=LABEL=kvmm-root rw console=ttyS0 quiet";

/// How long the Debian guest may take to boot under TCG (about 40-50 s
/// measured; a loaded machine takes longer).
pub(crate) const DEBIAN_BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// A folder for one VM's sockets and logs, short enough for a Unix socket path.
fn run_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kvmm-xtask-{}-{name}", std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Counts the initramfs guest's marker lines in a console log.
pub(crate) fn count_markers(console: &Path) -> usize {
    count_lines(console, READY_MARKER)
}

/// Where `marker` stands in a console line as a word of its own (followed
/// by the end of the line or a space), and what follows it. A marker may
/// come after other output on the same line: the serial console is shared
/// with the kernel and getty.
fn find_marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let line = line.trim_end();
    line.match_indices(marker).find_map(|(i, _)| {
        let rest = &line[i + marker.len()..];
        (rest.is_empty() || rest.starts_with(' ')).then(|| rest.trim())
    })
}

/// Counts console lines that hold `marker` (see [`find_marker`]).
pub(crate) fn count_lines(console: &Path, marker: &str) -> usize {
    marker_lines(console, marker).len()
}

/// What follows `marker` on each console line that holds it.
pub(crate) fn marker_lines(console: &Path, marker: &str) -> Vec<String> {
    fs::read(console)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .filter_map(|l| find_marker(l, marker).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Options for a QEMU boot.
#[derive(Debug, Clone, Default)]
pub(crate) struct QemuOptions {
    /// Pass `-no-reboot` (a guest reboot then ends QEMU).
    pub(crate) no_reboot: bool,
    /// Also attach a qemu-ga port (`org.qemu.guest_agent.0`).
    pub(crate) qemu_ga_port: bool,
}

/// Options for booting the Debian guest under QEMU.
#[derive(Debug, Clone, Default)]
pub(crate) struct DebianBoot {
    /// Extra raw disk images, attached read-only after the root and data disks.
    pub(crate) extra_disks: Vec<PathBuf>,
    /// Attach the agent's port at start; otherwise it is hot-plugged later
    /// with [`QemuVm::hotplug_agent_port`].
    pub(crate) agent_port: bool,
    /// vCPUs.
    pub(crate) cpus: u32,
    /// Serve the serial console on a Unix socket (`console.sock`, for a
    /// person with socat) besides logging it.
    pub(crate) console_socket: bool,
}

/// A running QEMU guest. Dropping it kills QEMU (unless [`QemuVm::keep`]).
#[derive(Debug)]
pub(crate) struct QemuVm {
    child: Option<Child>,
    /// Host side of the agent's port.
    pub(crate) socket: PathBuf,
    /// Host side of qemu-ga's port, if attached.
    pub(crate) qga_socket: Option<PathBuf>,
    /// The guest console log.
    pub(crate) console: PathBuf,
    /// QEMU's own stdout/stderr.
    pub(crate) qemu_log: PathBuf,
    /// The QMP socket (Debian guests), for hot-plugging.
    pub(crate) qmp: Option<PathBuf>,
    /// The console line that ends a boot.
    marker: &'static str,
    dir: PathBuf,
    keep: bool,
}

impl QemuVm {
    /// Boots QEMU (TCG) and waits for the marker.
    pub(crate) fn boot(image: &GuestImage, name: &str, opts: &QemuOptions) -> Result<QemuVm> {
        if !crate::util::have_command("qemu-system-x86_64") {
            bail!("qemu-system-x86_64 is not installed (cargo xtask deps)");
        }
        let dir = run_dir(name)?;
        let socket = dir.join("agent.sock");
        let console = dir.join("console.log");
        let qemu_log = dir.join("qemu.log");
        let mut ports = vec![AGENT_PORT.to_owned()];
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "512", "-smp", "1", "-nographic"]);
        if opts.no_reboot {
            cmd.arg("-no-reboot");
        }
        cmd.arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd);
        // No NIC (the guest needs none; it also skips the iPXE ROM), no monitor.
        cmd.args(["-nic", "none", "-monitor", "none"]);
        cmd.arg("-serial")
            .arg(format!("file:{}", console.display()));
        cmd.args(["-device", "virtio-serial-pci"]);
        cmd.arg("-chardev").arg(format!(
            "socket,path={},server=on,wait=off,id=ch0",
            socket.display()
        ));
        cmd.arg("-device")
            .arg(format!("virtserialport,chardev=ch0,name={AGENT_PORT}"));
        let mut qga_socket = None;
        if opts.qemu_ga_port {
            let s = dir.join("qga.sock");
            cmd.arg("-chardev").arg(format!(
                "socket,path={},server=on,wait=off,id=ch1",
                s.display()
            ));
            cmd.arg("-device").arg(format!(
                "virtserialport,chardev=ch1,name={}",
                crate::guest::QEMU_GA_PORT
            ));
            ports.push(crate::guest::QEMU_GA_PORT.to_owned());
            qga_socket = Some(s);
        }
        cmd.arg("-append")
            .arg(format!("{CMDLINE} kvmm_ports={}", ports.join(",")));
        let log = fs::File::create(&qemu_log)?;
        eprintln!("$ {}", render(&cmd));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start QEMU: {e}"))?;
        let mut vm = QemuVm {
            child: Some(child),
            socket,
            qga_socket,
            console,
            qemu_log,
            qmp: None,
            marker: READY_MARKER,
            dir,
            keep: false,
        };
        let started = Instant::now();
        vm.wait_for_markers(1, BOOT_TIMEOUT)?;
        eprintln!(
            "vm: QEMU pid {} booted in {:.1} s; agent port at {}",
            vm.pid(),
            started.elapsed().as_secs_f64(),
            vm.socket.display()
        );
        // Give the agent a moment to open its port.
        std::thread::sleep(Duration::from_millis(1500));
        Ok(vm)
    }

    /// Boots the Debian guest (TCG, direct kernel boot from its own kernel
    /// and initramfs) on qcow2 overlays of the cached disks, and waits for
    /// its boot marker. The data disk carries the serial
    /// [`crate::debian::DATA_SERIAL`].
    pub(crate) fn boot_debian(
        image: &crate::debian::DebianImage,
        name: &str,
        opts: &DebianBoot,
    ) -> Result<QemuVm> {
        if !crate::util::have_command("qemu-system-x86_64") {
            bail!("qemu-system-x86_64 is not installed (cargo xtask deps)");
        }
        let dir = run_dir(name)?;
        let socket = dir.join("agent.sock");
        let console = dir.join("console.log");
        let qemu_log = dir.join("qemu.log");
        let qmp = dir.join("qmp.sock");
        let (root, data) = (dir.join("root.qcow2"), dir.join("data.qcow2"));
        crate::debian::overlay(&image.root, &root)?;
        crate::debian::overlay(&image.data, &data)?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "1024", "-nographic"])
            .args(["-smp", &opts.cpus.max(1).to_string()])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", DEBIAN_CMDLINE])
            .args(["-nic", "none", "-monitor", "none"]);
        if opts.console_socket {
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=ser0,path={},server=on,wait=off,logfile={},logappend=on",
                    dir.join("console.sock").display(),
                    console.display()
                ))
                .args(["-serial", "chardev:ser0"]);
        } else {
            cmd.arg("-serial")
                .arg(format!("file:{}", console.display()));
        }
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", root.display()))
            .arg("-drive")
            .arg(format!(
                // discard=unmap: fs_trim reaches the disk (FITRIM needs it).
                "file={},if=none,id=data,format=qcow2,discard=unmap",
                data.display()
            ))
            .arg("-device")
            .arg(format!(
                "virtio-blk-pci,drive=data,serial={}",
                crate::debian::DATA_SERIAL
            ));
        for d in &opts.extra_disks {
            cmd.arg("-drive").arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                d.display()
            ));
        }
        cmd.args(["-device", "virtio-serial-pci,id=vser0"]);
        if opts.agent_port {
            cmd.arg("-chardev").arg(format!(
                "socket,path={},server=on,wait=off,id=ch0",
                socket.display()
            ));
            cmd.arg("-device")
                .arg(format!("virtserialport,chardev=ch0,name={AGENT_PORT}"));
        }
        let log = fs::File::create(&qemu_log)?;
        eprintln!("$ {}", render(&cmd));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start QEMU: {e}"))?;
        let mut vm = QemuVm {
            child: Some(child),
            socket,
            qga_socket: None,
            console,
            qemu_log,
            qmp: Some(qmp),
            marker: crate::debian::UP_MARKER,
            dir,
            keep: false,
        };
        let started = Instant::now();
        vm.wait_for_markers(1, DEBIAN_BOOT_TIMEOUT)?;
        eprintln!(
            "vm: Debian guest (QEMU pid {}) booted in {:.1} s",
            vm.pid(),
            started.elapsed().as_secs_f64()
        );
        Ok(vm)
    }

    /// Hot-plugs the agent's port (chardev + virtserialport) through QMP.
    pub(crate) fn hotplug_agent_port(&self) -> Result<()> {
        let qmp = self.qmp.as_ref().ok_or("this VM has no QMP socket")?;
        let mut q = crate::qmp::Qmp::connect(qmp)?;
        q.execute(
            "chardev-add",
            serde_json::json!({
                "id": "ch0",
                "backend": {"type": "socket", "data": {
                    "addr": {"type": "unix", "data": {"path": self.socket.display().to_string()}},
                    "server": true, "wait": false
                }}
            }),
        )?;
        q.execute(
            "device_add",
            serde_json::json!({
                "driver": "virtserialport", "bus": "vser0.0", "chardev": "ch0",
                "name": AGENT_PORT, "id": "agentport"
            }),
        )?;
        Ok(())
    }

    /// The console log's lines that start with `marker`.
    pub(crate) fn console_lines(&self, marker: &str) -> Vec<String> {
        marker_lines(&self.console, marker)
    }

    /// Boot markers seen so far.
    pub(crate) fn boots(&self) -> usize {
        count_lines(&self.console, self.marker)
    }

    /// QEMU's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits until the console shows `n` markers (n-1 reboots after the first boot).
    pub(crate) fn wait_for_markers(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if count_lines(&self.console, self.marker) >= n {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "QEMU exited ({status}) before the guest was ready\n--- QEMU log ---\n{}\n--- console (last 40 lines) ---\n{}",
                    tail(&self.qemu_log, 20),
                    tail(&self.console, 40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "no {} marker #{n} within {timeout:?}\n--- console (last 40 lines) ---\n{}",
                    self.marker,
                    tail(&self.console, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// QEMU's exit status if it has exited.
    pub(crate) fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("QEMU is not running"),
        }
    }

    /// Waits up to `timeout` for QEMU to exit by itself.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => crate::util::wait_timeout(c, timeout),
            None => bail!("QEMU is not running"),
        }
    }

    /// Leaves QEMU running after this guard is dropped.
    pub(crate) fn keep(mut self) -> (u32, PathBuf) {
        self.keep = true;
        (self.pid(), self.dir.clone())
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        if std::env::var_os("XTASK_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("vm: logs kept in {}", self.dir.display());
        }
    }
}

/// libvirt's URI for the system daemon.
pub(crate) const LIBVIRT_URI: &str = "qemu:///system";

fn virsh() -> Command {
    let mut c = Command::new("virsh");
    c.args(["-q", "-c", LIBVIRT_URI]);
    c
}

/// A daemon this process started, stopped on drop.
#[derive(Debug)]
struct Daemon {
    name: &'static str,
    pid: u32,
}

/// The libvirt daemons, started by hand when not already running.
#[derive(Debug)]
pub(crate) struct Libvirt {
    started: Vec<Daemon>,
}

/// Reads a pid file; the pid if that process is alive.
fn live_pid(pidfile: &Path) -> Option<u32> {
    let pid: u32 = fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    pid_alive(pid).then_some(pid)
}

/// `user`/`group` `+0` in qemu.conf: QEMU runs as root, which avoids a
/// capability re-probe (about 4 s) on every start. Idempotent.
fn configure_qemu_conf() -> Result<()> {
    let path = Path::new("/etc/libvirt/qemu.conf");
    let text = fs::read_to_string(path).unwrap_or_default();
    let has = |key: &str| {
        text.lines()
            .any(|l| l.trim_start().starts_with(key) && l.contains("\"+0\""))
    };
    let mut add = String::new();
    if !has("user") {
        add.push_str("user = \"+0\"\n");
    }
    if !has("group") {
        add.push_str("group = \"+0\"\n");
    }
    if add.is_empty() {
        return Ok(());
    }
    eprintln!("libvirt: setting user/group \"+0\" in {}", path.display());
    fs::create_dir_all("/etc/libvirt")?;
    let mut new = text;
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str("# Added by `cargo xtask` (kvmmanager-agent tests): run QEMU as root.\n");
    new.push_str(&add);
    fs::write(path, new)?;
    Ok(())
}

/// libvirtd resolves its built-in default QEMU user (`libvirt-qemu` on
/// Debian) before it reads qemu.conf, and refuses to start the QEMU driver if
/// that user does not exist. The libvirt-daemon-system package creates it;
/// without that package (no systemd here), create the same system user.
fn ensure_qemu_user() -> Result<()> {
    if succeeds(Command::new("getent").args(["passwd", "libvirt-qemu"])) {
        return Ok(());
    }
    eprintln!("libvirt: creating the system user libvirt-qemu (libvirtd needs it to exist)");
    crate::util::run(Command::new("useradd").args([
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/var/lib/libvirt",
        "--shell",
        "/usr/sbin/nologin",
        "libvirt-qemu",
    ]))
}

impl Libvirt {
    /// Starts virtlogd and libvirtd unless they run already, and waits until
    /// `virsh` answers.
    pub(crate) fn start() -> Result<Libvirt> {
        if !crate::util::is_root() {
            bail!("the libvirt tests need root (they start libvirtd and define a domain)");
        }
        for bin in ["libvirtd", "virtlogd", "virsh"] {
            if !crate::util::have_command(bin) {
                bail!("{bin} is not installed (cargo xtask deps)");
            }
        }
        // A libvirtd that already answers (a host's own, systemd-managed one)
        // is used as it is: its configuration is left alone.
        if succeeds(virsh().arg("version")) {
            eprintln!("libvirt: using the running libvirtd");
            return Ok(Libvirt {
                started: Vec::new(),
            });
        }
        configure_qemu_conf()?;
        ensure_qemu_user()?;
        // Folders a package's service setup would normally create.
        for d in [
            "/var/log/libvirt/qemu",
            "/var/lib/libvirt/qemu/channel/target",
            "/var/cache/libvirt/qemu",
            "/run/libvirt",
        ] {
            fs::create_dir_all(d)?;
        }
        let mut lv = Libvirt {
            started: Vec::new(),
        };
        for (name, pidfile) in [
            ("virtlogd", "/run/virtlogd.pid"),
            ("libvirtd", "/run/libvirtd.pid"),
        ] {
            if let Some(pid) = live_pid(Path::new(pidfile)) {
                eprintln!("libvirt: {name} already runs (pid {pid}); using it");
                continue;
            }
            crate::util::run(Command::new(name).args(["-d", "-p", pidfile]))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let pid = loop {
                if let Some(pid) = live_pid(Path::new(pidfile)) {
                    break pid;
                }
                if Instant::now() >= deadline {
                    bail!("{name} did not write {pidfile}");
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            eprintln!("libvirt: started {name} (pid {pid})");
            lv.started.push(Daemon { name, pid });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !succeeds(virsh().arg("version")) {
            if Instant::now() >= deadline {
                bail!("libvirtd does not answer `virsh -c {LIBVIRT_URI} version` after 60 s");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(lv)
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // Stop in reverse order: libvirtd, then virtlogd.
        for d in self.started.iter().rev() {
            eprintln!("libvirt: stopping {} (pid {})", d.name, d.pid);
            kill_pid(d.pid, "TERM");
            let deadline = Instant::now() + Duration::from_secs(15);
            while pid_alive(d.pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if pid_alive(d.pid) {
                kill_pid(d.pid, "KILL");
            }
        }
    }
}

/// A libvirt domain running the test guest. Dropping it destroys and undefines it.
#[derive(Debug)]
pub(crate) struct Domain {
    /// Domain name, for `kvmmanager-ctl --domain`.
    pub(crate) name: String,
    /// The console log.
    pub(crate) console: PathBuf,
    dir: PathBuf,
}

/// XML escaping for text and attribute values.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The domain definition.
pub(crate) fn domain_xml(name: &str, image: &GuestImage, console: &Path) -> String {
    let e = |p: &Path| xml_escape(&p.display().to_string());
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{CMDLINE} kvmm_ports={AGENT_PORT}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='{AGENT_PORT}'/>
    </channel>
    <serial type='pty'>
      <log file='{console}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
"#,
        name = xml_escape(name),
        kernel = e(&image.kernel),
        initrd = e(&image.initrd),
        console = e(console),
    )
}

/// The Debian guest's domain: its disks (overlays in `dir`, the data disk
/// with its serial, the provisioning disk read-only), 2 vCPUs, ACPI.
pub(crate) fn debian_domain_xml(
    name: &str,
    image: &crate::debian::DebianImage,
    dir: &Path,
    provision: &Path,
    console: &Path,
) -> String {
    let e = |p: &Path| xml_escape(&p.display().to_string());
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{DEBIAN_CMDLINE}</cmdline>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{root}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{data}'/>
      <target dev='vdb' bus='virtio'/>
      <serial>{serial}</serial>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{provision}'/>
      <target dev='vdc' bus='virtio'/>
      <readonly/>
    </disk>
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='{AGENT_PORT}'/>
    </channel>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='{QEMU_GA_PORT}'/>
    </channel>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='{QGA_PEER_PORT}'/>
    </channel>
    <serial type='pty'>
      <log file='{console}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
"#,
        QEMU_GA_PORT = crate::guest::QEMU_GA_PORT,
        QGA_PEER_PORT = crate::qga_checks::QGA_PEER_PORT,
        name = xml_escape(name),
        kernel = e(&image.kernel),
        initrd = e(&image.initrd),
        root = e(&dir.join("root.qcow2")),
        data = e(&dir.join("data.qcow2")),
        serial = crate::debian::DATA_SERIAL,
        provision = e(provision),
        console = e(console),
    )
}

impl Domain {
    /// Defines and starts a domain, waits for the marker.
    pub(crate) fn start(_lv: &Libvirt, image: &GuestImage, name: &str) -> Result<Domain> {
        let dir = run_dir(name)?;
        let console = dir.join("console.log");
        let xml = domain_xml(name, image, &console);
        Domain::define_and_boot(name, dir, console, &xml, READY_MARKER, BOOT_TIMEOUT)
    }

    /// Defines and starts the Debian guest on overlays of its disks, with
    /// the provisioning disk attached; waits for its boot marker.
    pub(crate) fn start_debian(
        _lv: &Libvirt,
        image: &crate::debian::DebianImage,
        name: &str,
        provision: &Path,
    ) -> Result<Domain> {
        let dir = run_dir(name)?;
        let console = dir.join("console.log");
        crate::debian::overlay(&image.root, &dir.join("root.qcow2"))?;
        crate::debian::overlay(&image.data, &dir.join("data.qcow2"))?;
        let xml = debian_domain_xml(name, image, &dir, provision, &console);
        Domain::define_and_boot(
            name,
            dir,
            console,
            &xml,
            crate::debian::UP_MARKER,
            DEBIAN_BOOT_TIMEOUT,
        )
    }

    fn define_and_boot(
        name: &str,
        dir: PathBuf,
        console: PathBuf,
        xml: &str,
        marker: &str,
        timeout: Duration,
    ) -> Result<Domain> {
        let xml_path = dir.join("domain.xml");
        fs::write(&xml_path, xml)?;
        // A leftover from an interrupted run would block the define.
        let _ = succeeds(virsh().args(["destroy", name]));
        let _ = succeeds(virsh().args(["undefine", name]));
        crate::util::run(virsh().arg("define").arg(&xml_path))?;
        let dom = Domain {
            name: name.to_owned(),
            console,
            dir,
        };
        crate::util::run(virsh().args(["start", name]))?;
        let started = Instant::now();
        let deadline = started + timeout;
        while count_lines(&dom.console, marker) < 1 {
            if Instant::now() >= deadline {
                bail!(
                    "libvirt domain {name}: no {marker} within {timeout:?}\n--- console ---\n{}",
                    tail(&dom.console, 40)
                );
            }
            if dom.state().as_deref() == Some("shut off") {
                bail!(
                    "libvirt domain {name} stopped during boot\n--- console ---\n{}",
                    tail(&dom.console, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "libvirt: domain {name} booted in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_millis(1500));
        Ok(dom)
    }

    /// Waits until the domain is shut off (or gone).
    pub(crate) fn wait_shut_off(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.state().as_deref() {
                Some("shut off") | None => return Ok(()),
                Some(s) if Instant::now() >= deadline => {
                    bail!("domain state still {s:?} after {timeout:?}")
                }
                _ => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// `virsh domstate`.
    pub(crate) fn state(&self) -> Option<String> {
        output(virsh().args(["domstate", &self.name]))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// The host socket libvirt made for the agent's channel.
    pub(crate) fn channel_socket(&self) -> Option<PathBuf> {
        self.port_socket(AGENT_PORT)
    }

    /// The host socket libvirt made for the channel named `port`.
    pub(crate) fn port_socket(&self, port: &str) -> Option<PathBuf> {
        let base = Path::new("/var/lib/libvirt/qemu/channel/target");
        let suffix = format!("-{}", self.name);
        fs::read_dir(base).ok()?.flatten().find_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let p = e.path().join(port);
            (n.starts_with("domain-") && n.ends_with(&suffix) && p.exists()).then_some(p)
        })
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = succeeds(virsh().args(["destroy", &self.name]));
        let _ = succeeds(virsh().args(["undefine", &self.name]));
        if std::env::var_os("XTASK_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("libvirt: logs kept in {}", self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_counted_per_line() {
        let dir = std::env::temp_dir().join(format!("xtask-markers-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("console.log");
        let cases = [
            ("", 0),
            ("booting\n", 0),
            ("KVMM-GUEST-READY\n", 1),
            ("x\r\nKVMM-GUEST-READY\r\nagent\nKVMM-GUEST-READY\n", 2),
            ("echo \"KVMM-GUEST-READY\" is in /init\n", 0),
            ("kvmm-debian login: KVMM-GUEST-READY\n", 1),
        ];
        for (text, want) in cases {
            fs::write(&f, text).unwrap();
            assert_eq!(count_markers(&f), want, "{text:?}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn markers_after_other_output_are_found_with_what_follows() {
        assert_eq!(
            find_marker(
                "kvmm-debian login: KVMM-AGENT-STATE inactive\r",
                "KVMM-AGENT-STATE"
            ),
            Some("inactive")
        );
        assert_eq!(
            find_marker("KVMM-PROVISIONED rc=0", "KVMM-PROVISIONED"),
            Some("rc=0")
        );
        assert_eq!(
            find_marker("KVMM-PROVISIONED", "KVMM-PROVISIONED"),
            Some("")
        );
        assert_eq!(
            find_marker("KVMM-PROVISIONEDX rc=0", "KVMM-PROVISIONED"),
            None
        );
        assert_eq!(find_marker("no marker here", "KVMM-PROVISIONED"), None);
    }

    #[test]
    fn domain_xml_has_the_channel_and_escapes_paths() {
        let image = GuestImage {
            kernel: PathBuf::from("/k/vmlinuz"),
            initrd: PathBuf::from("/k/a&b.gz"),
        };
        let xml = domain_xml("kvmm-t", &image, Path::new("/tmp/c.log"));
        assert!(xml.contains("<domain type='qemu'>"));
        // Without ACPI a guest poweroff only halts and the domain keeps running.
        assert!(xml.contains("<acpi/>"));
        assert!(xml.contains("<target type='virtio' name='org.kvmmanager.agent.0'/>"));
        assert!(xml.contains("<initrd>/k/a&amp;b.gz</initrd>"));
        assert!(xml.contains("<log file='/tmp/c.log' append='off'/>"));
    }
}
