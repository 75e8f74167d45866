//! `cargo xtask vm-test`: the integration suite against a real guest.
//!
//! Every check drives the agent the way an operator does, through
//! `kvmmanager-ctl --json` (plus one raw probe of the port). Each check
//! prints PASS/FAIL with its name; the run ends with `N passed, M failed`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::guest::{self, GuestImage, GuestOptions, GUEST_HOSTNAME};
use crate::probe;
use crate::util::{
    bail, cargo, heading, is_ci, is_root, output_with_timeout, run, target_dir, Result,
};
use crate::vm::{Domain, Libvirt, QemuOptions, QemuVm};

/// PASS/FAIL bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    passed: u32,
    failed: Vec<String>,
}

impl Tally {
    /// Runs one check and records its outcome.
    pub(crate) fn check(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> bool {
        let start = Instant::now();
        let r = f();
        let secs = start.elapsed().as_secs_f64();
        match r {
            Ok(()) => {
                println!("PASS {name} ({secs:.1} s)");
                self.passed += 1;
                true
            }
            Err(e) => {
                println!("FAIL {name} ({secs:.1} s): {e}");
                self.failed.push(name.to_owned());
                false
            }
        }
    }

    /// Checks failed so far.
    pub(crate) fn failed_count(&self) -> usize {
        self.failed.len()
    }

    /// Records a failure that happened outside a check (e.g. the VM did not boot).
    pub(crate) fn fail(&mut self, name: &str, e: &dyn std::fmt::Display) {
        println!("FAIL {name}: {e}");
        self.failed.push(name.to_owned());
    }

    /// Prints `N passed, M failed`; an error if anything failed.
    pub(crate) fn finish(&self) -> Result<()> {
        println!("{} passed, {} failed", self.passed, self.failed.len());
        if self.failed.is_empty() {
            Ok(())
        } else {
            bail!("failed checks: {}", self.failed.join(", "))
        }
    }
}

/// How `kvmmanager-ctl` reaches the guest.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// `--socket PATH`.
    Socket(PathBuf),
    /// `--domain NAME`.
    Domain(String),
}

/// One `kvmmanager-ctl` run.
#[derive(Debug)]
pub(crate) struct CtlRun {
    /// Exit code (-1 if killed by a signal).
    pub(crate) code: i32,
    /// Standard output.
    pub(crate) stdout: String,
    /// Standard error.
    pub(crate) stderr: String,
}

impl CtlRun {
    /// stdout parsed as JSON.
    pub(crate) fn json(&self) -> Result<Value> {
        serde_json::from_str(self.stdout.trim()).map_err(|e| {
            format!(
                "ctl output is not JSON ({e}); exit {}; stdout: {:?}; stderr: {:?}",
                self.code,
                clip(&self.stdout),
                clip(&self.stderr)
            )
            .into()
        })
    }

    /// Fails unless the exit code is 0.
    pub(crate) fn ok(self) -> Result<CtlRun> {
        if self.code != 0 {
            bail!(
                "exit {}; stdout: {:?}; stderr: {:?}",
                self.code,
                clip(&self.stdout),
                clip(&self.stderr)
            );
        }
        Ok(self)
    }

    /// stdout and stderr together, for error-kind checks.
    pub(crate) fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Shortens long outputs in messages.
fn clip(s: &str) -> String {
    if s.len() > 600 {
        let mut end = 600;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}... ({} bytes)", &s[..end], s.len())
    } else {
        s.to_owned()
    }
}

/// The `kvmmanager-ctl` binary and its target.
#[derive(Debug, Clone)]
pub(crate) struct Ctl {
    /// Path of the binary.
    pub(crate) bin: PathBuf,
    /// Where it connects.
    pub(crate) target: Target,
}

impl Ctl {
    /// The command with the target options and `--json` (if `json`).
    pub(crate) fn command(&self, json: bool, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        match &self.target {
            Target::Socket(p) => c.arg("--socket").arg(p),
            Target::Domain(d) => c.arg("--domain").arg(d),
        };
        if json {
            c.arg("--json");
        }
        c.args(args);
        c
    }

    /// Runs `kvmmanager-ctl [--json] ARGS`, killed after `timeout`.
    pub(crate) fn run(&self, json: bool, args: &[&str], timeout: Duration) -> Result<CtlRun> {
        let out = output_with_timeout(&mut self.command(json, args), timeout)?;
        Ok(CtlRun {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs with `--json`, requires exit 0, parses stdout.
    pub(crate) fn json(&self, args: &[&str]) -> Result<Value> {
        self.run(true, args, Duration::from_secs(60))?.ok()?.json()
    }

    /// Runs a shell line in the guest through `exec`; its stdout (exit
    /// status 0 required).
    pub(crate) fn sh(&self, script: &str) -> Result<String> {
        let v = self.json(&["exec", "--", "sh", "-c", script])?;
        let r = exec_result(&v);
        ensure(r["exit_code"] == 0, || {
            format!("`{script}` in the guest: {v}")
        })?;
        Ok(r["stdout"].as_str().unwrap_or("").to_owned())
    }

    /// `push LOCAL GUEST`, required to succeed within `timeout`.
    pub(crate) fn push(&self, local: &Path, guest: &str, timeout: Duration) -> Result<()> {
        self.run(
            true,
            &["push", &local.display().to_string(), guest],
            timeout,
        )?
        .ok()
        .map(|_| ())
    }

    /// Retries `ping` until it succeeds or `timeout` passes.
    pub(crate) fn wait_ping(&self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self
                .run(true, &["--timeout", "5", "ping"], Duration::from_secs(20))
                .and_then(|r| r.ok())
                .and_then(|r| r.json());
            match r {
                Ok(v) if v["pong"] == Value::Bool(true) => return Ok(v),
                Ok(v) if Instant::now() >= deadline => bail!("unexpected ping reply: {v}"),
                Err(e) if Instant::now() >= deadline => {
                    bail!("no ping answer within {timeout:?}: {e}")
                }
                _ => std::thread::sleep(Duration::from_secs(1)),
            }
        }
    }
}

/// Builds `kvmmanager-ctl` (debug, like `cargo build`) and returns its path.
pub(crate) fn build_ctl() -> Result<PathBuf> {
    run(cargo().args(["build", "-p", "host-client", "--bin", "kvmmanager-ctl"]))?;
    Ok(target_dir().join("debug/kvmmanager-ctl"))
}

/// The exec result object in ctl's JSON (the result itself, or under `result`).
pub(crate) fn exec_result(v: &Value) -> &Value {
    if v.get("exit_code").is_some() || v.get("timed_out").is_some() {
        v
    } else {
        &v["result"]
    }
}

/// Fails with a message unless `cond`.
pub(crate) fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(msg().into())
    }
}

/// A file of `len` random bytes.
pub(crate) fn random_file(path: &Path, len: u64) -> Result<()> {
    let mut src = fs::File::open("/dev/urandom")?.take(len);
    let mut dst = fs::File::create(path)?;
    let n = std::io::copy(&mut src, &mut dst)?;
    ensure(n == len, || format!("short random file: {n} bytes"))
}

/// Compares two files byte for byte.
pub(crate) fn same_content(a: &Path, b: &Path) -> Result<()> {
    let (ma, mb) = (fs::metadata(a)?.len(), fs::metadata(b)?.len());
    ensure(ma == mb, || {
        format!(
            "sizes differ: {} has {ma} bytes, {} has {mb}",
            a.display(),
            b.display()
        )
    })?;
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        ensure(na == nb && ba[..na] == bb[..nb], || {
            format!("contents differ in the MiB at offset {offset}")
        })?;
        if na == 0 {
            return Ok(());
        }
        offset += na as u64;
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// Scratch folder on the host for file transfers.
pub(crate) fn scratch(name: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("kvmm-xtask-{}-{name}", std::process::id()));
    fs::create_dir_all(&d)?;
    Ok(d)
}

/// Removes this run's scratch folders (checks that fail early leave theirs).
fn remove_scratch() {
    let prefix = format!("kvmm-xtask-{}-", std::process::id());
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix)
                && std::env::var_os("XTASK_KEEP_LOGS").is_none()
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The checks every target gets (QEMU and libvirt).
pub(crate) fn basic_checks(t: &mut Tally, ctl: &Ctl, prefix: &str) -> Result<()> {
    let n = |s: &str| format!("{prefix}{s}");
    t.check(&n("ping"), || {
        let v = ctl.json(&["ping"])?;
        ensure(v["pong"] == Value::Bool(true), || format!("no pong: {v}"))?;
        ensure(v["timestamp"].is_u64(), || format!("no timestamp: {v}"))
    });
    t.check(&n("info"), || {
        let v = ctl.json(&["info"])?;
        ensure(v["protocol_version"] == 1, || {
            format!("protocol_version: {v}")
        })?;
        let methods: Vec<&str> = v["methods"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for m in [
            "ping",
            "sync",
            "get_agent_info",
            "get_system_info",
            "get_network_info",
            "get_disk_usage",
            "exec_command",
            "file_read",
            "file_write",
            "shutdown",
            "reboot",
            "cancel",
        ] {
            ensure(methods.contains(&m), || {
                format!("method {m} missing from {methods:?}")
            })?;
        }
        Ok(())
    });
    t.check(&n("exec-echo"), || {
        let v = ctl.json(&["exec", "--", "echo", "hi"])?;
        let r = exec_result(&v);
        ensure(r["stdout"] == "hi\n", || format!("stdout: {v}"))?;
        ensure(r["exit_code"] == 0, || format!("exit_code: {v}"))
    });
    t.check(&n("push-pull-small"), || {
        let dir = scratch(&format!("{prefix}small"))?;
        let (src, back) = (dir.join("src"), dir.join("back"));
        fs::write(&src, b"hello from the host\n\x00\xff binary too\n")?;
        let guest_path = "/tmp/kvmmanager/small.bin";
        ctl.run(
            true,
            &["push", &src.display().to_string(), guest_path],
            Duration::from_secs(60),
        )?
        .ok()?;
        ctl.run(
            true,
            &["pull", guest_path, &back.display().to_string()],
            Duration::from_secs(60),
        )?
        .ok()?;
        same_content(&src, &back)?;
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    });
    Ok(())
}

/// A command whose descendants leave its process group: a `setsid` one and
/// a double-forked one, each writing its pid to /tmp before it sleeps.
const ESCAPERS: &str = r#"rm -f /tmp/kvmm-esc1 /tmp/kvmm-esc2
setsid sh -c 'echo $$ > /tmp/kvmm-esc1; exec sleep 300' &
(sh -c 'echo $$ > /tmp/kvmm-esc2; exec sleep 301' &)
sleep 30"#;

/// Reports each escaper's state (`gone`, or the state letter of
/// /proc/PID/stat), the command cgroups present, and the limits of its own
/// cgroup.
const ESCAPER_REPORT: &str = r#"for n in 1 2; do
    p=$(cat /tmp/kvmm-esc$n 2>/dev/null) || { echo "esc$n nopid"; continue; }
    s=$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null)
    echo "esc$n $p ${s:-gone}"
done
own=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)
for d in ${own%/*}/exec-*; do echo "cgroup ${d##*/}"; done
echo "pids.max $(cat $own/pids.max)"
echo "memory.max $(cat $own/memory.max)"
"#;

/// Commands are contained in cgroups (issue 10): `setsid` and double-forked
/// descendants die with a timed-out command, its cgroup is removed, the
/// configured limits apply, and `get_agent_info` says so. Fails on an agent
/// with the process-group kill alone: the `setsid` sleep survives.
fn contained_check(ctl: &Ctl) -> Result<()> {
    let r = ctl.run(
        true,
        &["exec", "--timeout", "2", "--", "sh", "-c", ESCAPERS],
        Duration::from_secs(60),
    )?;
    ensure(r.code == 124, || {
        format!("ctl exit {} (want 124): {}", r.code, r.all_output())
    })?;
    let v = r.json()?;
    ensure(exec_result(&v)["timed_out"] == true, || {
        format!("result: {v}")
    })?;
    let v = ctl.json(&["exec", "--", "sh", "-c", ESCAPER_REPORT])?;
    let out = exec_result(&v)["stdout"].as_str().unwrap_or("").to_owned();
    let lines: Vec<&str> = out.lines().collect();
    for n in ["esc1", "esc2"] {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("{n} ")))
            .ok_or_else(|| format!("no {n} line: {out}"))?;
        let state = line.rsplit(' ').next().unwrap_or("");
        ensure(!line.ends_with("nopid"), || {
            format!("{n} never started: {out}")
        })?;
        ensure(matches!(state, "gone" | "Z" | "X"), || {
            format!("{n} survived the timeout: {line}\n{out}")
        })?;
    }
    // Only the report's own cgroup is left.
    let cgroups = lines
        .iter()
        .filter(|l| l.starts_with("cgroup exec-"))
        .count();
    ensure(cgroups == 1, || format!("command cgroups left over: {out}"))?;
    ensure(lines.contains(&"pids.max 64"), || {
        format!("pids.max: {out}")
    })?;
    ensure(lines.contains(&"memory.max 268435456"), || {
        format!("memory.max: {out}")
    })?;
    let info = ctl.json(&["info"])?;
    let limits = &info["limits"];
    ensure(limits["command_containment"] == "cgroup", || {
        format!("containment: {limits}")
    })?;
    ensure(
        limits["command_max_processes"] == 64 && limits["command_memory_max"] == 256u64 << 20,
        || format!("per-command limits: {limits}"),
    )
}

/// What the checks expect of a guest.
#[derive(Debug)]
pub(crate) struct GuestFacts {
    /// Its host name.
    pub(crate) hostname: &'static str,
    /// Its vCPUs.
    pub(crate) cpus: u64,
    /// Mount points `df --all` must list, with their filesystem types.
    pub(crate) filesystems: &'static [(&'static str, &'static str)],
}

/// The initramfs guest.
const INITRAMFS_FACTS: GuestFacts = GuestFacts {
    hostname: GUEST_HOSTNAME,
    cpus: 1,
    filesystems: &[("/tmp", "tmpfs")],
};

/// Every check that neither reboots nor stops the guest: methods, policy
/// refusals, large transfers, disconnects and an agent killed mid-run
/// (whoever restarts it: the initramfs `/init` or systemd).
pub(crate) fn guest_checks(
    t: &mut Tally,
    ctl: &Ctl,
    facts: &GuestFacts,
    prefix: &str,
) -> Result<()> {
    let n = |s: &str| format!("{prefix}{s}");
    basic_checks(t, ctl, prefix)?;
    t.check(&n("sysinfo"), || {
        let v = ctl.json(&["sysinfo"])?;
        ensure(v["hostname"] == facts.hostname, || format!("hostname: {v}"))?;
        ensure(v["cpu_count"] == facts.cpus, || format!("cpu_count: {v}"))?;
        ensure(v["os_type"] == "linux", || format!("os_type: {v}"))
    });
    t.check(&n("net"), || {
        let v = ctl.json(&["net"])?;
        let ifs = v["interfaces"].as_array().cloned().unwrap_or_default();
        let lo = ifs
            .iter()
            .find(|i| i["name"] == "lo")
            .ok_or_else(|| format!("no lo in {v}"))?;
        let has = lo["addresses"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["address"] == "127.0.0.1" && x["prefix_len"] == 8)
        });
        ensure(has, || format!("lo lacks 127.0.0.1/8: {lo}"))?;
        ensure(lo["is_up"] == true, || format!("lo is not up: {lo}"))
    });
    t.check(&n("df"), || {
        let v = ctl.json(&["df", "--all"])?;
        let fss = v["filesystems"].as_array().cloned().unwrap_or_default();
        for (mount, fs_type) in facts.filesystems {
            let f = fss
                .iter()
                .find(|f| f["mount_point"] == *mount)
                .ok_or_else(|| format!("no {mount} in {v}"))?;
            ensure(f["fs_type"] == *fs_type, || format!("{mount}: {f}"))?;
            ensure(f["total_bytes"].as_u64().unwrap_or(0) > 0, || {
                format!("{mount}: {f}")
            })?;
        }
        Ok(())
    });
    t.check(&n("exec-nonzero-exit"), || {
        let r = ctl.run(
            true,
            &["exec", "--", "sh", "-c", "echo oops >&2; exit 3"],
            Duration::from_secs(60),
        )?;
        ensure(r.code == 3, || {
            format!("ctl exit {} (want 3): {}", r.code, r.all_output())
        })?;
        let v = r.json()?;
        let e = exec_result(&v);
        ensure(e["exit_code"] == 3 && e["stderr"] == "oops\n", || {
            format!("result: {v}")
        })
    });
    t.check(&n("exec-timeout"), || {
        let start = Instant::now();
        let r = ctl.run(
            true,
            &["exec", "--timeout", "2", "--", "sleep", "30"],
            Duration::from_secs(60),
        )?;
        let took = start.elapsed();
        ensure(took < Duration::from_secs(20), || format!("took {took:?}"))?;
        ensure(r.code == 124, || {
            format!("ctl exit {} (want 124): {}", r.code, r.all_output())
        })?;
        let v = r.json()?;
        ensure(exec_result(&v)["timed_out"] == true, || {
            format!("result: {v}")
        })
    });
    t.check(&n("exec-setsid-contained"), || contained_check(ctl));
    t.check(&n("refused-read"), || {
        let r = ctl.run(true, &["cat", "/etc/shadow"], Duration::from_secs(60))?;
        ensure(r.code == 1, || {
            format!("ctl exit {} (want 1): {}", r.code, r.all_output())
        })?;
        ensure(r.all_output().contains("policy_denied"), || {
            format!("no policy_denied in: {}", r.all_output())
        })
    });
    t.check(&n("refused-write"), || {
        let dir = scratch(&n("refused"))?;
        let f = dir.join("x");
        fs::write(&f, b"nope\n")?;
        let r = ctl.run(
            true,
            &["push", &f.display().to_string(), "/etc/kvmm-refused"],
            Duration::from_secs(60),
        )?;
        let _ = fs::remove_dir_all(&dir);
        ensure(r.code == 1, || {
            format!("ctl exit {} (want 1): {}", r.code, r.all_output())
        })?;
        ensure(r.all_output().contains("policy_denied"), || {
            format!("no policy_denied in: {}", r.all_output())
        })?;
        // And nothing was written.
        let v = ctl.json(&["exec", "--", "ls", "/etc"])?;
        ensure(
            !exec_result(&v)["stdout"]
                .as_str()
                .unwrap_or("")
                .contains("kvmm-refused"),
            || "the refused file exists in the guest".to_owned(),
        )
    });
    t.check(&n("push-pull-64MiB"), || {
        let dir = scratch(&n("big"))?;
        let (src, back) = (dir.join("src"), dir.join("back"));
        random_file(&src, 64 << 20)?;
        let guest_path = "/tmp/kvmmanager/big.bin";
        let start = Instant::now();
        ctl.run(
            true,
            &["push", &src.display().to_string(), guest_path],
            Duration::from_secs(600),
        )?
        .ok()?;
        let push = start.elapsed();
        ctl.run(
            true,
            &["pull", guest_path, &back.display().to_string()],
            Duration::from_secs(600),
        )?
        .ok()?;
        let pull = start.elapsed() - push;
        same_content(&src, &back)?;
        println!(
            "  64 MiB: push {:.1} s ({:.1} MiB/s), pull {:.1} s ({:.1} MiB/s)",
            push.as_secs_f64(),
            64.0 / push.as_secs_f64(),
            pull.as_secs_f64(),
            64.0 / pull.as_secs_f64()
        );
        let _ = fs::remove_dir_all(&dir);
        let _ = ctl.run(
            true,
            &["exec", "--", "rm", "-f", guest_path],
            Duration::from_secs(60),
        );
        Ok(())
    });
    t.check(&n("exec-ctrl-c-cancels"), || {
        // Ctrl-C on kvmmanager-ctl asks the agent to `cancel` the call: the
        // command is killed at once instead of running out its 60 s.
        let mut child = ctl
            .command(
                true,
                &[
                    "exec",
                    "--",
                    "sh",
                    "-c",
                    "echo $$ > /tmp/kvmm-cancel.pid; exec sleep 60",
                ],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(1500));
        crate::util::kill_pid(child.id(), "INT");
        let status = crate::util::wait_timeout(&mut child, Duration::from_secs(30))?;
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("kvmmanager-ctl still runs 30 s after Ctrl-C");
        };
        ensure(status.code() == Some(130), || {
            format!("kvmmanager-ctl after Ctrl-C: {status} (want exit 130)")
        })?;
        let probe = "p=$(cat /tmp/kvmm-cancel.pid) && if [ -e /proc/$p ] && \
                     [ \"$(cut -d' ' -f3 /proc/$p/stat)\" != Z ]; then echo alive; else echo gone; fi";
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = ctl.json(&["exec", "--", "sh", "-c", probe])?;
            if exec_result(&v)["stdout"] == "gone\n" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the cancelled command still runs 10 s after Ctrl-C: {v}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    t.check(&n("disconnect-reconnect"), || {
        let mut child = ctl
            .command(true, &["exec", "--", "sleep", "5"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_secs(1));
        // The host goes away mid-request (kill by pid).
        child.kill()?;
        child.wait()?;
        let v = ctl.json(&["exec", "--", "echo", "after"])?;
        ensure(exec_result(&v)["stdout"] == "after\n", || {
            format!("reply after reconnect: {v}")
        })?;
        let v = ctl.json(&["ping"])?;
        ensure(v["pong"] == true, || format!("ping after reconnect: {v}"))
    });
    t.check(&n("agent-restart"), || {
        let pid_of = || -> Result<String> {
            let v = ctl.json(&["exec", "--", "pidof", "kvmmanager-agent"])?;
            let pid = exec_result(&v)["stdout"]
                .as_str()
                .unwrap_or("")
                .trim()
                .to_owned();
            ensure(!pid.is_empty(), || format!("pidof found nothing: {v}"))?;
            Ok(pid)
        };
        let before = pid_of()?;
        // The reply may or may not arrive: the agent is the one being killed.
        let _ = ctl.run(
            true,
            &["exec", "--", "kill", &before],
            Duration::from_secs(30),
        );
        ctl.wait_ping(Duration::from_secs(60))?;
        let after = pid_of()?;
        ensure(after != before, || {
            format!("agent pid unchanged ({before})")
        })
    });
    Ok(())
}

/// The full suite against a QEMU guest.
fn qemu_suite(t: &mut Tally, image: &GuestImage, ctl_bin: &Path) -> Result<()> {
    heading("vm-test: QEMU");
    // No -no-reboot: the reboot check needs QEMU to survive a guest reboot.
    let mut vm = match QemuVm::boot(image, "test", &QemuOptions::default()) {
        Ok(vm) => vm,
        Err(e) => {
            t.fail("qemu-boot", &e);
            return Ok(());
        }
    };
    t.check("qemu-boot", || Ok(()));
    let ctl = Ctl {
        bin: ctl_bin.to_owned(),
        target: Target::Socket(vm.socket.clone()),
    };
    t.check("raw-probe-ping", || {
        probe::wait_ping(&vm.socket, Duration::from_secs(30)).map(|_| ())
    });
    t.check("socat-manual-ping", || {
        crate::probe::socat_ping(&vm.socket).map(|_| ())
    });
    guest_checks(t, &ctl, &INITRAMFS_FACTS, "")?;
    crate::fleet_checks::fleet_checks(t, &ctl, "")?;
    crate::stream_checks::stream_checks(t, &ctl)?;
    t.check("reboot", || {
        let markers = crate::vm::count_markers(&vm.console);
        ctl.run(true, &["reboot"], Duration::from_secs(60))?.ok()?;
        vm.wait_for_markers(markers + 1, crate::vm::BOOT_TIMEOUT)?;
        ctl.wait_ping(Duration::from_secs(60))?;
        let v = ctl.json(&["sysinfo"])?;
        ensure(v["uptime_seconds"].as_f64().unwrap_or(1e9) < 120.0, || {
            format!("uptime after reboot: {}", v["uptime_seconds"])
        })
    });
    t.check("shutdown", || {
        ctl.run(true, &["shutdown"], Duration::from_secs(60))?
            .ok()?;
        match vm.wait_exit(Duration::from_secs(60))? {
            Some(_) => Ok(()),
            None => bail!("QEMU still runs 60 s after shutdown"),
        }
    });
    Ok(())
}

/// The smaller suite through libvirt and `--domain`.
fn libvirt_suite(t: &mut Tally, image: &GuestImage, ctl_bin: &Path) -> Result<()> {
    heading("vm-test: libvirt");
    if !is_root() && !is_ci() {
        println!("SKIP libvirt: needs root (under CI=true this is a failure)");
        return Ok(());
    }
    let lv = match Libvirt::start() {
        Ok(lv) => lv,
        Err(e) => {
            t.fail("libvirt-daemons", &e);
            return Ok(());
        }
    };
    let name = format!("kvmm-test-{}", std::process::id());
    let dom = match Domain::start(&lv, image, &name) {
        Ok(d) => d,
        Err(e) => {
            t.fail("libvirt-boot", &e);
            return Ok(());
        }
    };
    t.check("libvirt-boot", || Ok(()));
    t.check("libvirt-channel-socket", || {
        let s = dom
            .channel_socket()
            .ok_or("no channel socket under /var/lib/libvirt/qemu/channel/target")?;
        probe::wait_ping(&s, Duration::from_secs(30)).map(|_| ())
    });
    let ctl = Ctl {
        bin: ctl_bin.to_owned(),
        target: Target::Domain(name.clone()),
    };
    basic_checks(t, &ctl, "libvirt-")?;
    // Fleet observability: a second domain, the exporter scraped by a real
    // Prometheus, `list` with one domain up and one shut off.
    let second = format!("{name}-b");
    match Domain::start(&lv, image, &second) {
        Ok(dom2) => {
            let scratch = scratch("fleet")?;
            crate::fleet_checks::exporter_prometheus_check(
                t,
                ctl_bin,
                &[name.as_str(), second.as_str()],
                &scratch,
            );
            crate::fleet_checks::list_libvirt_check(t, ctl_bin, &name, &second);
            drop(dom2);
        }
        Err(e) => t.fail("libvirt-second-domain", &e),
    }
    t.check("libvirt-shutdown", || {
        ctl.run(true, &["shutdown"], Duration::from_secs(60))?
            .ok()?;
        dom.wait_shut_off(Duration::from_secs(60))
    });
    drop(dom);
    drop(lv);
    Ok(())
}

/// Options of `cargo xtask vm-test`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VmTestOptions {
    /// Run the QEMU pass.
    pub(crate) qemu: bool,
    /// Run the libvirt pass.
    pub(crate) libvirt: bool,
    /// Against the fast initramfs guest.
    pub(crate) initramfs: bool,
    /// Against the Debian 12 guest with the package installed by apt.
    pub(crate) debian: bool,
}

impl VmTestOptions {
    /// Everything: both guests, QEMU and libvirt.
    pub(crate) const ALL: VmTestOptions = VmTestOptions {
        qemu: true,
        libvirt: true,
        initramfs: true,
        debian: true,
    };
}

/// The Debian guest and the packages it installs, or the failure that
/// stops its checks.
fn debian_inputs(t: &mut Tally) -> Option<(crate::debian::DebianImage, crate::debian_suite::Debs)> {
    let image = match crate::debian::build() {
        Ok(i) => i,
        Err(e) => {
            t.fail("debian-image", &e);
            return None;
        }
    };
    let debs = crate::dist::build().and_then(|p| {
        Ok(crate::debian_suite::Debs {
            current: p.deb,
            newer: crate::dist::build_deb_revision(2)?,
        })
    });
    match debs {
        Ok(d) => Some((image, d)),
        Err(e) => {
            t.fail("debian-packages", &e);
            None
        }
    }
}

/// `cargo xtask vm-test`: the number of checks that passed, or an error
/// naming those that failed.
pub(crate) fn vm_test(opts: VmTestOptions) -> Result<u32> {
    let mut groups = vec![crate::deps::Group::Qemu];
    let libvirt = opts.libvirt && (is_root() || is_ci());
    if libvirt {
        groups.push(crate::deps::Group::Libvirt);
    }
    crate::deps::ensure(&groups)?;
    let mut t = Tally::default();
    heading("vm-test: building kvmmanager-ctl");
    // A broken ctl build fails its checks, not the raw-port ones.
    let ctl = match build_ctl() {
        Ok(p) => p,
        Err(e) => {
            t.fail("build-kvmmanager-ctl", &e);
            target_dir().join("debug/kvmmanager-ctl")
        }
    };
    if opts.initramfs {
        let image = guest::build(GuestOptions::default())?;
        if opts.qemu {
            qemu_suite(&mut t, &image, &ctl)?;
        }
        if opts.libvirt {
            libvirt_suite(&mut t, &image, &ctl)?;
        }
    }
    if opts.debian {
        if !is_root() && !is_ci() {
            println!("SKIP Debian guest: building and booting it needs root (under CI=true this is a failure)");
        } else if let Some((image, debs)) = debian_inputs(&mut t) {
            if opts.qemu {
                crate::debian_suite::qemu_debian_suite(&mut t, &image, &debs, &ctl)?;
            }
            if libvirt {
                match Libvirt::start() {
                    Ok(lv) => {
                        crate::debian_suite::libvirt_debian_suite(&mut t, &lv, &image, &debs, &ctl)?
                    }
                    Err(e) => t.fail("libvirt-daemons", &e),
                }
            }
        }
    }
    remove_scratch();
    t.finish()?;
    Ok(t.passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_and_fails_on_any_failure() {
        let mut t = Tally::default();
        assert!(t.check("good", || Ok(())));
        assert!(t.finish().is_ok());
        assert!(!t.check("bad", || bail!("boom")));
        assert_eq!((t.passed, t.failed.len()), (1, 1));
        assert!(t.finish().is_err());
    }

    #[test]
    fn exec_result_accepts_bare_and_wrapped_results() {
        let bare = serde_json::json!({"exit_code": 0, "stdout": "hi\n"});
        let wrapped = serde_json::json!({"result": {"exit_code": 0, "stdout": "hi\n"}});
        assert_eq!(exec_result(&bare)["stdout"], "hi\n");
        assert_eq!(exec_result(&wrapped)["stdout"], "hi\n");
    }

    #[test]
    fn same_content_finds_a_flipped_byte() {
        let dir = scratch("same-content-test").unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        random_file(&a, 3 << 20).unwrap();
        fs::copy(&a, &b).unwrap();
        assert!(same_content(&a, &b).is_ok());
        let mut bytes = fs::read(&b).unwrap();
        bytes[2 << 20] ^= 1;
        fs::write(&b, bytes).unwrap();
        assert!(same_content(&a, &b).is_err());
        fs::write(&b, b"short").unwrap();
        assert!(same_content(&a, &b).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
