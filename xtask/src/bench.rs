//! `cargo xtask bench`: our agent against Debian's qemu-ga in one TCG guest.
//!
//! One QEMU guest holds both agents, each on its own virtio-serial port, plus
//! a raw port that a guest `dd` writes into (the transport ceiling). Our agent
//! is driven with the real `host_client` library; qemu-ga with its own
//! line protocol (`guest-sync-delimited` handshake, then one command a line).
//! Every figure is a median over repeated runs, printed with its spread
//! (min..max), in one table, also written to `target/bench/bench.json`.

mod qga;
mod stats;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_common::methods::ExecParams;
use host_client::{Client, ClientOptions, PushOptions};
use serde_json::json;

use crate::guest::{self, AGENT_PORT, QEMU_GA_PORT};
use crate::util::{bail, cargo, heading, kill_pid, run, target_dir, Result};
use qga::Qga;
use stats::{Figure, Spread};

/// Name of the raw port (no agent on it; a guest `dd` writes into it).
const RAW_PORT: &str = "org.kvmmanager.bench.0";
/// Size of the transfer test file.
const FILE_SIZE: u64 = 32 * 1024 * 1024;
/// Guest path of the read test file.
const GUEST_FILE: &str = "/tmp/bench32";
/// Agents of the fan-out figure.
const FANOUT: usize = 256;

/// Config of the host agents of the fan-out figure.
const FANOUT_CONFIG: &str = r#"{
  "log_level": "error",
  "log_file": null,
  "channel_name": "org.kvmmanager.agent.0",
  "max_message_size_kb": 64,
  "connection_retry_seconds": 5,
  "request_timeout_seconds": 30,
  "max_concurrent_requests": 10,
  "security": {
    "allowed_read_paths": ["/tmp"],
    "allowed_write_paths": ["/tmp"],
    "command_whitelist": null,
    "max_file_size_mb": 16,
    "max_command_timeout_seconds": 30
  }
}
"#;

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> crate::util::XtaskError + '_ {
    move |e| format!("{what}: {e}").into()
}

/// The figures `--only` can pick, by name, in the order they are measured.
const SECTIONS: &[(&str, &str)] = &[
    ("ping", "ping round trip"),
    ("exec", "exec `true`, result in hand"),
    ("raw", "raw port ceiling"),
    (
        "read",
        "read 32 MiB to host (and its share of the raw ceiling with `raw`)",
    ),
    ("write", "write 32 MiB into guest"),
    ("load", "ping p99 during a 32 MiB read"),
    ("rss", "agent RSS idle and peak"),
    ("window", "read with 1, 2, 8 chunks in flight"),
    ("push", "push 1 KiB, connection open"),
    ("wake", "wake-ups/s with no host attached"),
    (
        "flood",
        "agent peak RSS while a host floods requests and reads nothing",
    ),
    (
        "bigmsg",
        "write with max_message_size_kb 1024 (restarts the agent)",
    ),
    ("fanout", "host fan-out to 256 agents"),
    ("size", "agent binary size"),
];

/// Which figures to measure: all, or the `--only` list.
#[derive(Debug, Clone, PartialEq)]
struct Only(Option<Vec<&'static str>>);

impl Only {
    /// Parses `--only`'s comma-separated list of [`SECTIONS`] names.
    fn parse(list: &str) -> Result<Only> {
        let mut picked = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match SECTIONS.iter().find(|(n, _)| *n == name) {
                Some((n, _)) => picked.push(*n),
                None => bail!(
                    "unknown bench figure {name:?}; known: {}",
                    SECTIONS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            }
        }
        if picked.is_empty() {
            bail!("--only needs at least one figure name");
        }
        Ok(Only(Some(picked)))
    }

    /// True if `name` is to be measured.
    fn has(&self, name: &str) -> bool {
        match &self.0 {
            None => true,
            Some(v) => v.contains(&name),
        }
    }

    /// True if any of `names` is to be measured.
    fn any(&self, names: &[&str]) -> bool {
        names.iter().any(|n| self.has(n))
    }
}

/// Usage of `cargo xtask bench`'s options, for `help` and errors.
const USAGE: &str = "cargo xtask bench [--only NAME,NAME...]";

/// Parses `cargo xtask bench`'s arguments and runs it.
pub(crate) fn main(args: &[String]) -> Result<()> {
    match args {
        [] => bench(Only(None), args),
        // Internal: the fan-out client process.
        [flag, dir] if flag == "--fanout-client" => fanout_client_main(Path::new(dir)),
        [flag, list] if flag == "--only" => bench(Only::parse(list)?, args),
        _ => {
            let names: Vec<String> = SECTIONS
                .iter()
                .map(|(n, what)| format!("  {n:<8} {what}"))
                .collect();
            bail!("usage: {USAGE}\nfigures:\n{}", names.join("\n"))
        }
    }
}

/// `cargo xtask bench`: `args` are forwarded to the release rebuild.
fn bench(only: Only, args: &[String]) -> Result<()> {
    if cfg!(debug_assertions) {
        // Host-side timings (base64, JSON) must not come from a debug build.
        heading("bench: rebuilding xtask in release");
        return run(cargo()
            .args(["run", "--quiet", "--release", "-p", "xtask", "--", "bench"])
            .args(args));
    }
    heading("bench: build");
    let image = guest::build(guest::GuestOptions { with_qemu_ga: true })?;
    if only.has("fanout") {
        // The host agents of the fan-out figure.
        run(cargo().args([
            "build",
            "--release",
            "-p",
            "agent-linux",
            "-p",
            "host-client",
        ]))?;
    }
    let out_dir = target_dir().join("bench");
    fs::create_dir_all(&out_dir)?;

    let mut figures = Vec::new();
    let in_guest: Vec<&str> = SECTIONS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !matches!(*n, "fanout" | "size"))
        .collect();
    if only.any(&in_guest) {
        heading("bench: boot");
        let vm = Vm::boot(&image)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let res = rt.block_on(measure(&vm, &out_dir, &only, &mut figures));
        drop(vm);
        if let Err(e) = res {
            print_table(&figures);
            return Err(e);
        }
    }

    if only.has("fanout") {
        heading("bench: host fan-out");
        figures.extend(fanout()?);
    }
    if only.has("size") {
        figures.push(binary_size()?);
    }

    print_table(&figures);
    let machine = machine();
    let doc = json!({
        "date": crate::util::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_default().trim(),
        "machine": machine,
        "figures": figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
    });
    // A partial run does not overwrite the full table.
    let path = out_dir.join(if only.0.is_some() {
        "bench-only.json"
    } else {
        "bench.json"
    });
    fs::write(
        &path,
        serde_json::to_string_pretty(&doc).map_err(err("json"))?,
    )?;
    eprintln!("bench: wrote {}", path.display());
    println!("machine: {machine}");
    Ok(())
}

/// The machine line of the README table.
fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = crate::util::output(Command::new("uname").arg("-r")).unwrap_or_default();
    let qemu = crate::util::output(Command::new("qemu-system-x86_64").arg("--version"))
        .unwrap_or_default();
    format!(
        "{cores} cores, TCG 1 vCPU 512 MiB, host kernel {}, {}",
        kernel.trim(),
        qemu.lines().next().unwrap_or("").trim()
    )
}

/// The bench guest: three ports (ours, qemu-ga's, raw). Killed on drop.
struct Vm {
    child: Child,
    dir: PathBuf,
    ours: PathBuf,
    qga: PathBuf,
    raw: PathBuf,
}

impl Vm {
    fn boot(image: &guest::GuestImage) -> Result<Vm> {
        let dir = std::env::temp_dir().join(format!("kvmm-bench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let console = dir.join("console.log");
        let log = fs::File::create(dir.join("qemu.log"))?;
        let ours = dir.join("agent.sock");
        let qga = dir.join("qga.sock");
        let raw = dir.join("raw.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "512", "-smp", "1", "-nographic"]);
        cmd.arg("-kernel").arg(&image.kernel);
        cmd.arg("-initrd").arg(&image.initrd);
        cmd.args(["-nic", "none", "-monitor", "none"]);
        cmd.arg("-serial")
            .arg(format!("file:{}", console.display()));
        cmd.args(["-device", "virtio-serial-pci"]);
        for (i, (sock, name)) in [(&ours, AGENT_PORT), (&qga, QEMU_GA_PORT), (&raw, RAW_PORT)]
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
            "console=ttyS0 panic=-1 edd=off quiet kvmm_ports={AGENT_PORT},{QEMU_GA_PORT},{RAW_PORT}"
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

fn client_options() -> ClientOptions {
    ClientOptions {
        call_timeout: Duration::from_secs(120),
        ..ClientOptions::default()
    }
}

/// Runs `sh -c script` in the guest through our agent; returns stdout.
async fn sh(c: &Client, script: &str) -> Result<String> {
    let r = c
        .exec(&ExecParams {
            command: "sh".into(),
            args: vec!["-c".into(), script.into()],
            timeout_seconds: Some(120),
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            stdin_encoding: Default::default(),
            output_encoding: Default::default(),
        })
        .await
        .map_err(err("exec"))?;
    if r.exit_code != Some(0) {
        bail!("guest `{script}` failed: {r:?}");
    }
    Ok(r.stdout)
}

/// `true` for our agent, named by the same absolute path qemu-ga is given
/// (see `Qga::exec_true`), so neither agent searches PATH.
fn exec_true() -> ExecParams {
    ExecParams {
        command: "/bin/true".into(),
        args: vec![],
        timeout_seconds: None,
        env: BTreeMap::new(),
        cwd: None,
        stdin: None,
        stdin_encoding: Default::default(),
        output_encoding: Default::default(),
    }
}

/// A field (in kB) of /proc/PID/status text.
fn status_kb(status: &str, key: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Context switches per thread id of `pid` (`tid switches` lines).
async fn ctxt(c: &Client, pid: u32) -> Result<BTreeMap<u32, u64>> {
    let out = sh(
        c,
        &format!(
            "for t in /proc/{pid}/task/*; do echo ${{t##*/}} $(grep ctxt_switches $t/status | awk '{{s+=$2}} END {{print s}}'); done"
        ),
    )
    .await?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect())
}

/// Switches between two per-thread snapshots (threads gone are not counted
/// after they left; new threads count in full).
fn switch_delta(a: &BTreeMap<u32, u64>, b: &BTreeMap<u32, u64>) -> f64 {
    b.iter()
        .map(|(tid, n)| n.saturating_sub(a.get(tid).copied().unwrap_or(0)) as f64)
        .sum()
}

async fn measure(vm: &Vm, out_dir: &Path, only: &Only, figures: &mut Vec<Figure>) -> Result<()> {
    let mut c = Client::connect_with(&vm.ours, client_options())
        .await
        .map_err(err("connect to our agent"))?;
    let mut q = Qga::connect(&vm.qga)?;
    let mut our_pid: u32 = sh(&c, "pidof kvmmanager-agent")
        .await?
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or("no pid of kvmmanager-agent")?;
    let qga_pid: u32 = sh(&c, "pidof qemu-ga")
        .await?
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or("no pid of qemu-ga")?;
    eprintln!("bench: agent pid {our_pid}, qemu-ga pid {qga_pid}");
    let status = |pid: u32| format!("cat /proc/{pid}/status");
    let ours_idle = status_kb(&sh(&c, &status(our_pid)).await?, "VmRSS").unwrap_or(0.0);
    let qga_idle = status_kb(&sh(&c, &status(qga_pid)).await?, "VmRSS").unwrap_or(0.0);

    if only.has("ping") {
        heading("bench: ping x1000");
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..1000 {
            let t = Instant::now();
            c.ping().await.map_err(err("ping"))?;
            ours.push(ms(t));
            let t = Instant::now();
            q.call("guest-ping", json!({}))?;
            theirs.push(ms(t));
        }
        figures.push(Figure::new(
            "ping round trip (ms)",
            Spread::of(&ours),
            Some(Spread::of(&theirs)),
            "<= 1.0x",
            |r| r <= 1.0,
        ));
    }

    if only.has("exec") {
        heading("bench: exec true x50");
        let (ours, theirs) = exec_times(&c, &mut q).await?;
        figures.push(Figure::new(
            "exec `true`, result in hand (ms)",
            Spread::of(&ours),
            Some(Spread::of(&theirs)),
            "<= 0.5x",
            |r| r <= 0.5,
        ));
        // Experiment: the same with the agent's per-exec info line off. In
        // this guest the agent's stderr is the emulated serial console
        // (qemu-ga writes nothing there per exec); on a real system it
        // goes to the journal.
        heading("bench: exec true x50, agent log_level warn");
        let (c2, pid) = restart_agent(
            vm,
            c,
            our_pid,
            r#"s/"log_level": "info"/"log_level": "warn"/"#,
        )
        .await?;
        let (ours, theirs) = exec_times(&c2, &mut q).await?;
        figures.push(Figure::new(
            "  exec `true`, agent log_level warn (ms)",
            Spread::of(&ours),
            Some(Spread::of(&theirs)),
            "(experiment)",
            |_| true,
        ));
        (c, our_pid) =
            restart_agent(vm, c2, pid, r#"s/"log_level": "warn"/"log_level": "info"/"#).await?;
    }

    let raw_spread = if only.has("raw") {
        heading("bench: raw port ceiling");
        let mut raw = Vec::new();
        for _ in 0..3 {
            raw.push(raw_ceiling(&c, &vm.raw).await?);
        }
        Some(Spread::of(&raw))
    } else {
        None
    };

    // Every later figure but `push` and `wake` needs the test file, in the
    // guest and pulled once to the host.
    if !only.any(&[
        "read", "write", "load", "rss", "window", "push", "wake", "bigmsg",
    ]) {
        return Ok(());
    }
    heading("bench: read 32 MiB");
    sh(
        &c,
        &format!("head -c {FILE_SIZE} /dev/urandom > {GUEST_FILE}"),
    )
    .await?;
    let local = out_dir.join("pulled.bin");
    let mut ours = Vec::new();
    for _ in 0..(if only.has("read") { 3 } else { 1 }) {
        let t = Instant::now();
        c.pull(GUEST_FILE, &local, |_| {})
            .await
            .map_err(err("pull"))?;
        ours.push(mibs(FILE_SIZE, t));
    }
    let reference = fs::read(&local)?;
    if reference.len() as u64 != FILE_SIZE {
        bail!("pull gave {} bytes", reference.len());
    }
    // qemu-ga's best read rate, the reference of the read figures.
    let mut best = None;
    if only.any(&["read", "window"]) {
        let mut theirs_4k = Vec::new();
        let data = q.read_file(GUEST_FILE, 4096, &mut theirs_4k)?;
        if data != reference {
            bail!("qemu-ga read gave other bytes than our pull");
        }
        let mut theirs_4m = Vec::new();
        for _ in 0..3 {
            q.read_file(GUEST_FILE, 4 << 20, &mut theirs_4m)?;
        }
        let theirs_4k = Spread::of(&theirs_4k);
        let theirs_4m = Spread::of(&theirs_4m);
        eprintln!(
            "bench: qemu-ga read at 4 KiB: {:.2} MiB/s, at 4 MiB: {:.2} MiB/s",
            theirs_4k.median, theirs_4m.median
        );
        best = Some(if theirs_4m.median >= theirs_4k.median {
            theirs_4m
        } else {
            theirs_4k
        });
    }
    if only.has("read") {
        let ours_read = Spread::of(&ours);
        figures.push(Figure::new(
            "read 32 MiB to host (MiB/s)",
            ours_read,
            best,
            ">= 10x",
            |r| r >= 10.0,
        ));
        if let Some(raw_spread) = raw_spread {
            figures.push(Figure::new(
                "read: share of raw port ceiling (%)",
                ours_read.scale(100.0 / raw_spread.median),
                None,
                ">= 40%",
                |_| ours_read.median * 100.0 / raw_spread.median >= 40.0,
            ));
        }
    }

    let mut theirs_write = None;
    if only.has("write") {
        heading("bench: write 32 MiB");
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let t = Instant::now();
            c.push(
                &local,
                "/tmp/kvmmanager/bench-w",
                PushOptions::default(),
                |_| {},
            )
            .await
            .map_err(err("push"))?;
            ours.push(mibs(FILE_SIZE, t));
            sh(&c, "rm -f /tmp/kvmmanager/bench-w").await?;
            let t = Instant::now();
            q.write_file("/tmp/bench-w", &reference, 1 << 20)?;
            theirs.push(mibs(FILE_SIZE, t));
            sh(&c, "rm -f /tmp/bench-w").await?;
        }
        theirs_write = Some(Spread::of(&theirs));
        figures.push(Figure::new(
            "write 32 MiB into guest (MiB/s)",
            Spread::of(&ours),
            theirs_write,
            ">= 10x",
            |r| r >= 10.0,
        ));
    }

    if only.has("load") {
        heading("bench: ping during a 32 MiB read");
        let mut p99s = Vec::new();
        for _ in 0..3 {
            p99s.push(pull_with_pings(&c, &local).await?);
        }
        let p99 = Spread::of(&p99s);
        figures.push(Figure::new(
            "ping p99 during 32 MiB read (ms)",
            p99,
            None,
            "<= 20 ms",
            move |_| p99.median <= 20.0,
        ));
    }

    if only.has("rss") {
        let ours_st = sh(&c, &status(our_pid)).await?;
        let qga_st = sh(&c, &status(qga_pid)).await?;
        figures.push(Figure::new(
            "agent RSS idle (MB)",
            Spread::one(ours_idle / 1024.0),
            Some(Spread::one(qga_idle / 1024.0)),
            "<= 1.0x",
            |r| r <= 1.0,
        ));
        let ours_peak = status_kb(&ours_st, "VmHWM").unwrap_or(0.0) / 1024.0;
        figures.push(Figure::new(
            "agent RSS peak in transfers (MB)",
            Spread::one(ours_peak),
            Some(Spread::one(
                status_kb(&qga_st, "VmHWM").unwrap_or(0.0) / 1024.0,
            )),
            "<= 8 MB",
            move |_| ours_peak <= 8.0,
        ));
    }

    if only.has("window") {
        // The same pull with other chunk windows (ClientOptions::max_in_flight_chunks).
        for window in [1usize, 2, 8] {
            heading(&format!("bench: read 32 MiB, {window} chunk(s) in flight"));
            // One host connection per port at a time: replace the client.
            c = Client::lazy(
                &vm.ours,
                ClientOptions {
                    max_in_flight_chunks: window,
                    ..client_options()
                },
            );
            let cw = &c;
            let (mut rates, mut p99s) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                let t = Instant::now();
                let p99 = pull_with_pings(cw, &local).await?;
                rates.push(mibs(FILE_SIZE, t));
                p99s.push(p99);
            }
            let p99 = Spread::of(&p99s);
            figures.push(
                Figure::new(
                    &format!("  read with {window} chunk(s) in flight (MiB/s)"),
                    Spread::of(&rates),
                    best,
                    "(experiment)",
                    |_| true,
                )
                .with_note(format!("ping p99 {:.0} ms", p99.median)),
            );
        }
        c = Client::lazy(&vm.ours, client_options());
    }

    if only.has("push") {
        // Fixed cost of a tiny push (connection already open).
        let tiny = out_dir.join("tiny.bin");
        fs::write(&tiny, [7u8; 1024])?;
        let mut ours = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            c.push(
                &tiny,
                "/tmp/kvmmanager/tiny",
                PushOptions::default(),
                |_| {},
            )
            .await
            .map_err(err("push"))?;
            ours.push(ms(t));
        }
        let _ = fs::remove_file(&tiny);
        figures.push(Figure::new(
            "push 1 KiB, connection open (ms)",
            Spread::of(&ours),
            None,
            "(report)",
            |_| true,
        ));
    }

    if only.has("wake") {
        heading("bench: wake-ups with no host attached (3 x 10 s)");
        let (mut ours_w, mut theirs_w) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            // Calibration: the same reads around a close and reopen, no wait.
            let (o, t) = wake_window(&mut c, &mut q, vm, our_pid, qga_pid, 0).await?;
            let (o10, t10) = wake_window(&mut c, &mut q, vm, our_pid, qga_pid, 10).await?;
            ours_w.push(((o10 - o) / 10.0).max(0.0));
            theirs_w.push(((t10 - t) / 10.0).max(0.0));
        }
        let ours_wake = Spread::of(&ours_w);
        figures.push(Figure::new(
            "wake-ups/s, no host attached",
            ours_wake,
            Some(Spread::of(&theirs_w)),
            "0",
            move |_| ours_wake.median < 0.5,
        ));
    }

    if only.has("flood") {
        c = flood(vm, c, our_pid, figures).await?;
    }

    if only.has("bigmsg") {
        bigmsg(vm, c, our_pid, &local, theirs_write, figures).await?;
    }

    if let Some(raw_spread) = raw_spread {
        figures.push(Figure::new(
            "raw port ceiling (MiB/s)",
            raw_spread,
            None,
            "(reference)",
            |_| true,
        ));
    }
    let _ = fs::remove_file(&local);
    Ok(())
}

/// A host that floods the agent with requests (1 MiB `file_read`s, then
/// pings) and reads nothing: the agent's peak RSS afterwards, against the
/// bound `kvmmanager-agent --check-config` states for its config. The
/// flooding host holds the port alone, then leaves; a new client follows.
async fn flood(vm: &Vm, c: Client, our_pid: u32, figures: &mut Vec<Figure>) -> Result<Client> {
    use tokio::io::AsyncWriteExt;
    heading("bench: flood of unread requests");
    sh(&c, "head -c 1048576 /dev/urandom > /tmp/flood.bin").await?;
    let check = sh(
        &c,
        "kvmmanager-agent --check-config --config /etc/kvmmanager-agent/config.json",
    )
    .await?;
    let bound_mb = check
        .lines()
        .find_map(|l| l.trim().strip_prefix("memory bound:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .ok_or_else(|| format!("no memory bound in --check-config's output:\n{check}"))?
        / (1024.0 * 1024.0);
    drop(c);
    let mut wire = vec![0xffu8];
    for i in 0..400u64 {
        let encoding = if i % 2 == 0 { "base64" } else { "attachment" };
        wire.extend(
            serde_json::to_vec(&json!({"jsonrpc":"2.0","method":"file_read","id":i,
                "params":{"path":"/tmp/flood.bin","length":1048576,"encoding":encoding}}))
            .map_err(err("encode the flood"))?,
        );
        wire.push(b'\n');
    }
    for i in 0..220_000u64 {
        wire.extend(format!("{{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":{i}}}\n").bytes());
    }
    let mut sock = tokio::net::UnixStream::connect(&vm.ours)
        .await
        .map_err(err("connect the flooding host"))?;
    let started = Instant::now();
    let mut sent = 0;
    // Until the agent has taken nothing for 3 s (it stopped reading).
    while sent < wire.len() && started.elapsed() < Duration::from_secs(60) {
        match tokio::time::timeout(Duration::from_secs(3), sock.write(&wire[sent..])).await {
            Ok(Ok(n)) => sent += n,
            Ok(Err(e)) => bail!("writing the flood failed: {e}"),
            Err(_) => break,
        }
    }
    drop(sock);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = Client::connect_with(&vm.ours, client_options())
        .await
        .map_err(err("reconnect after the flood"))?;
    let st = sh(&c, &format!("cat /proc/{our_pid}/status")).await?;
    let peak = status_kb(&st, "VmHWM").unwrap_or(f64::NAN) / 1024.0;
    figures.push(
        Figure::new(
            "agent peak RSS, host floods and never reads (MB)",
            Spread::one(peak),
            None,
            &format!("<= bound ({bound_mb:.0} MB)"),
            move |_| peak <= bound_mb,
        )
        .with_note(format!(
            "{:.2} of {:.1} MB of requests taken",
            sent as f64 / 1e6,
            wire.len() as f64 / 1e6
        )),
    );
    Ok(c)
}

/// Exec `true` through both agents, alternately, 50 times each; times in
/// ms. Ours is one `exec_command` call; qemu-ga's is `guest-exec` then
/// `guest-exec-status` polled back to back (no sleep: its best case) until
/// it reports the exit.
async fn exec_times(c: &Client, q: &mut Qga) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let t = Instant::now();
        let r = c.exec(&exec_true()).await.map_err(err("exec"))?;
        if r.exit_code != Some(0) {
            bail!("exec true: {r:?}");
        }
        ours.push(ms(t));
        let t = Instant::now();
        q.exec_true()?;
        theirs.push(ms(t));
    }
    Ok((ours, theirs))
}

/// Edits the guest agent's config with `sed_expr` and restarts the agent
/// (/init's loop starts it again); returns a new client and the new pid.
async fn restart_agent(vm: &Vm, c: Client, our_pid: u32, sed_expr: &str) -> Result<(Client, u32)> {
    // The exec never answers: the agent is killed under it (by design);
    // its error is expected and ignored.
    let config = "/etc/kvmmanager-agent/config.json";
    let _ = c
        .call_raw_with_timeout(
            "exec_command",
            json!({"command": "sh", "args": ["-c", format!(
                "sed '{sed_expr}' {config} > /tmp/bench-config.json && cp /tmp/bench-config.json {config} && kill {our_pid}"
            )]}),
            Duration::from_secs(3),
        )
        .await;
    drop(c);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let c = Client::connect_with(&vm.ours, client_options())
        .await
        .map_err(err("reconnect after the agent restart"))?;
    let new_pid: u32 = sh(&c, "pidof kvmmanager-agent")
        .await?
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or("no pid of kvmmanager-agent")?;
    if new_pid == our_pid {
        bail!("the agent was not restarted");
    }
    Ok((c, new_pid))
}

/// The write again with larger request lines (the agent restarted with
/// max_message_size_kb raised).
async fn bigmsg(
    vm: &Vm,
    c: Client,
    our_pid: u32,
    local: &Path,
    theirs_write: Option<Spread>,
    figures: &mut Vec<Figure>,
) -> Result<()> {
    heading("bench: write 32 MiB with max_message_size_kb = 1024");
    let (c, new_pid) = restart_agent(
        vm,
        c,
        our_pid,
        r#"s/"max_message_size_kb": 64/"max_message_size_kb": 1024/"#,
    )
    .await?;
    let limits = c.limits().await.map_err(err("limits"))?;
    if limits.max_message_size < 1024 * 1024 {
        bail!("agent restarted without the larger max_message_size: {limits:?}");
    }
    let mut ours = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        c.push(
            local,
            "/tmp/kvmmanager/bench-w",
            PushOptions::default(),
            |_| {},
        )
        .await
        .map_err(err("push"))?;
        ours.push(mibs(FILE_SIZE, t));
        sh(&c, "rm -f /tmp/kvmmanager/bench-w").await?;
    }
    let status = format!("cat /proc/{new_pid}/status");
    let hwm = status_kb(&sh(&c, &status).await?, "VmHWM").unwrap_or(0.0) / 1024.0;
    figures.push(
        Figure::new(
            "  write, max_message_size_kb 1024 (MiB/s)",
            Spread::of(&ours),
            theirs_write,
            "(experiment)",
            |_| true,
        )
        .with_note(format!("agent peak RSS {hwm:.1} MB")),
    );
    Ok(())
}

/// Pulls the test file while pinging on the same connection; ping p99 (ms).
async fn pull_with_pings(c: &Client, local: &Path) -> Result<f64> {
    let c2 = c.clone();
    let l2 = local.to_path_buf();
    let pull = tokio::spawn(async move { c2.pull(GUEST_FILE, &l2, |_| {}).await });
    let mut lat = Vec::new();
    while !pull.is_finished() {
        let t = Instant::now();
        c.ping().await.map_err(err("ping"))?;
        lat.push(ms(t));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pull.await.map_err(err("join"))?.map_err(err("pull"))?;
    eprintln!("bench: {} pings during the pull", lat.len());
    Ok(Spread::of(&lat).p99)
}

/// Context switches of both agents over `secs` with both host sockets closed.
async fn wake_window(
    c: &mut Client,
    q: &mut Qga,
    vm: &Vm,
    our_pid: u32,
    qga_pid: u32,
    secs: u64,
) -> Result<(f64, f64)> {
    let a_ours = ctxt(c, our_pid).await?;
    let a_qga = ctxt(c, qga_pid).await?;
    q.close();
    let fresh = Client::lazy(&vm.ours, client_options());
    // Dropping the last clone closes the connection.
    *c = fresh;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    *q = Qga::connect(&vm.qga)?;
    let b_qga = ctxt(c, qga_pid).await?;
    let b_ours = ctxt(c, our_pid).await?;
    Ok((switch_delta(&a_ours, &b_ours), switch_delta(&a_qga, &b_qga)))
}

/// One guest `dd` of 32 MiB into the raw port, timed on the host (MiB/s).
async fn raw_ceiling(c: &Client, raw: &Path) -> Result<f64> {
    let mut s = UnixStream::connect(raw)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, Duration)> {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        let mut first = None;
        while got < FILE_SIZE {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            got += n as u64;
        }
        Ok((got, first.map(|f| f.elapsed()).unwrap_or_default()))
    });
    sh(
        c,
        &format!(
            "dd if=/dev/zero of=/dev/virtio-ports/{RAW_PORT} bs=64k count={} 2>/dev/null",
            FILE_SIZE / 65536
        ),
    )
    .await?;
    let (got, took) = reader
        .join()
        .map_err(|_| "raw reader panicked")?
        .map_err(err("raw read"))?;
    if got < FILE_SIZE {
        bail!("raw port gave {got} bytes");
    }
    Ok(FILE_SIZE as f64 / 1048576.0 / took.as_secs_f64().max(1e-9))
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn mibs(bytes: u64, t: Instant) -> f64 {
    bytes as f64 / 1048576.0 / t.elapsed().as_secs_f64().max(1e-9)
}

/// The static musl agent's size.
fn binary_size() -> Result<Figure> {
    let p = target_dir().join("x86_64-unknown-linux-musl/release/kvmmanager-agent");
    let ours = fs::metadata(&p)
        .map_err(err(&p.display().to_string()))?
        .len() as f64
        / 1e6;
    let qga = fs::read_dir(guest::guest_dir().join("qemu-ga"))
        .ok()
        .and_then(|_| find_qga(&guest::guest_dir().join("qemu-ga")))
        .map(|p| fs::metadata(p).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0));
    Ok(Figure::new(
        "agent binary size (MB)",
        Spread::one(ours),
        qga.map(Spread::one),
        "<= 2 MB",
        move |_| ours <= 2.0,
    ))
}

fn find_qga(dir: &Path) -> Option<PathBuf> {
    for rel in ["root/usr/sbin/qemu-ga", "root/usr/bin/qemu-ga"] {
        if dir.join(rel).is_file() {
            return Some(dir.join(rel));
        }
    }
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_qga(&p) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == "qemu-ga") {
            return Some(p);
        }
    }
    None
}

/// Host agents stopped by pid on drop.
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.0 {
            kill_pid(c.id(), "KILL");
            let _ = c.wait();
        }
    }
}

/// 256 host agents on Unix sockets, pinged at once by a separate process.
fn fanout() -> Result<Vec<Figure>> {
    let dir = std::env::temp_dir().join(format!("kvmm-fanout-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("config.json"), FANOUT_CONFIG)?;
    let agent = target_dir().join("release/kvmmanager-agent");
    let mut agents = Agents(Vec::new());
    for i in 0..FANOUT {
        agents.0.push(
            Command::new(&agent)
                .arg("--foreground")
                .arg("--config")
                .arg(dir.join("config.json"))
                .arg("--listen")
                .arg(format!("unix:{}", dir.join(format!("a{i}.sock")).display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let start = Instant::now();
    while (0..FANOUT).any(|i| !dir.join(format!("a{i}.sock")).exists()) {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("host agents did not all listen within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let me = std::env::current_exe()?;
    let (mut totals, mut rss, mut answered) = (Vec::new(), Vec::new(), 0u64);
    for _ in 0..3 {
        let out = crate::util::output(
            Command::new(&me)
                .args(["bench", "--fanout-client"])
                .arg(&dir),
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim()).map_err(err("fan-out"))?;
        totals.push(v["total_ms"].as_f64().unwrap_or(0.0));
        rss.push(v["vmhwm_kb"].as_f64().unwrap_or(0.0) / 1024.0);
        answered = v["answered"].as_u64().unwrap_or(0);
    }
    drop(agents);
    let _ = fs::remove_dir_all(&dir);
    let all = answered == FANOUT as u64;
    Ok(vec![
        Figure::new(
            &format!("fan-out: ping {FANOUT} agents, total (ms)"),
            Spread::of(&totals),
            None,
            "all answered",
            move |_| all,
        )
        .with_note(format!("{answered}/{FANOUT} answered")),
        Figure::new(
            "fan-out: host-client peak RSS (MB)",
            Spread::of(&rss),
            None,
            "(report)",
            |_| true,
        ),
    ])
}

/// The fan-out client process: connect to every `a*.sock` in `dir`, ping
/// all at once, print `{"total_ms", "answered", "vmhwm_kb"}`.
fn fanout_client_main(dir: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let socks: Vec<PathBuf> = (0..FANOUT)
        .map(|i| dir.join(format!("a{i}.sock")))
        .collect();
    let (total, answered) = rt.block_on(async move {
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for s in socks {
            set.spawn(async move {
                let c = Client::connect(&s).await?;
                c.ping().await
            });
        }
        let mut ok = 0u64;
        while let Some(r) = set.join_next().await {
            if matches!(r, Ok(Ok(_))) {
                ok += 1;
            }
        }
        (ms(start), ok)
    });
    let st = fs::read_to_string("/proc/self/status")?;
    println!(
        "{}",
        json!({"total_ms": total, "answered": answered, "vmhwm_kb": status_kb(&st, "VmHWM")})
    );
    Ok(())
}

fn print_table(figures: &[Figure]) {
    println!();
    println!("{}", stats::table(figures));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_and_switch_deltas() {
        let st = "Name:\tx\nVmHWM:\t  5120 kB\nVmRSS:\t  4096 kB\n";
        for (key, want) in [
            ("VmRSS", Some(4096.0)),
            ("VmHWM", Some(5120.0)),
            ("Nope", None),
        ] {
            assert_eq!(status_kb(st, key), want, "{key}");
        }
        let a = BTreeMap::from([(1, 10), (2, 5)]);
        let b = BTreeMap::from([(1, 13), (3, 4)]);
        assert_eq!(switch_delta(&a, &b), 7.0);
    }

    #[test]
    fn only_picks_known_figures() {
        let all = Only(None);
        assert!(all.has("exec") && all.has("fanout"));
        let only = Only::parse("exec, ping").unwrap();
        assert_eq!(only, Only(Some(vec!["exec", "ping"])));
        for (name, want) in [
            ("exec", true),
            ("ping", true),
            ("read", false),
            ("size", false),
        ] {
            assert_eq!(only.has(name), want, "{name}");
        }
        assert!(only.any(&["read", "ping"]) && !only.any(&["read", "wake"]));
        for bad in ["", ",", "exec,nope", "EXEC"] {
            assert!(Only::parse(bad).is_err(), "{bad:?}");
        }
        let e = main(&["--only".to_owned()]).unwrap_err().to_string();
        assert!(e.contains("bigmsg") && e.contains("usage"), "{e}");
    }
}
