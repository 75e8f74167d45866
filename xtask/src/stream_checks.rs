//! The real-VM checks of streams (issue 15), on the initramfs guest under
//! QEMU: a `kvmmanager-ctl shell` driven through a real terminal (tmux),
//! 100 MiB through a streamed command's stdin and stdout, curl through
//! `kvmmanager-ctl forward` from busybox httpd in the guest, and a stalled
//! stream that leaves others, `ping` and the agent's memory alone.
//!
//! The port has one host connection at a time: each check is one
//! `kvmmanager-ctl` process (or, for the stalled stream, one host-library
//! client) at a time, and the guest's web server is started by its `/init`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::suite::{ensure, random_file, scratch, Ctl, Tally, Target};
use crate::util::{bail, output_with_timeout, Result};

/// Bytes of the large transfers.
const BIG: u64 = 100 << 20;

/// The port busybox httpd listens on in the guest (loopback only).
const HTTPD_PORT: u16 = 8080;

/// A process of ours, killed (by pid) when dropped.
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn socket(ctl: &Ctl) -> Result<&Path> {
    match &ctl.target {
        Target::Socket(p) => Ok(p),
        Target::Domain(_) => bail!("the stream checks need the socket target"),
    }
}

/// `sha256sum` of a host file.
fn sha256(path: &Path) -> Result<String> {
    let out = output_with_timeout(
        Command::new("sha256sum").arg(path),
        Duration::from_secs(120),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| format!("sha256sum {}: {text}", path.display()).into())
}

/// Every stream check; `tmux` and `curl` come from `cargo xtask deps`.
pub(crate) fn stream_checks(t: &mut Tally, ctl: &Ctl) -> Result<()> {
    let dir = scratch("streams")?;
    t.check("stream-exec-100mib-round-trip", || {
        exec_round_trip(ctl, &dir)
    });
    t.check("stream-shell-in-tmux", || shell_in_tmux(ctl, &dir));
    t.check("stream-forward-curl", || forward_curl(ctl, &dir));
    t.check("stream-stalled-stalls-alone", || stalled_stream(ctl));
    Ok(())
}

/// 100 MiB into `cat`'s stdin and back from its stdout, by checksum.
fn exec_round_trip(ctl: &Ctl, dir: &Path) -> Result<()> {
    let input = dir.join("in");
    let output = dir.join("out");
    random_file(&input, BIG)?;
    let started = Instant::now();
    let status = ctl
        .command(false, &["exec", "--stream", "--", "cat"])
        .stdin(fs::File::open(&input)?)
        .stdout(fs::File::create(&output)?)
        .stderr(Stdio::inherit())
        .status()?;
    let secs = started.elapsed().as_secs_f64();
    ensure(status.success(), || {
        format!("exec --stream exited {status}")
    })?;
    let (a, b) = (sha256(&input)?, sha256(&output)?);
    ensure(a == b, || {
        format!("the output's sha256 {b} is not the input's {a}")
    })?;
    println!(
        "  100 MiB each way in {secs:.1} s ({:.1} MiB/s each way)",
        100.0 / secs
    );
    let _ = fs::remove_file(&input);
    let _ = fs::remove_file(&output);
    Ok(())
}

/// A tmux session on a socket of its own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> Result<String> {
        let out = output_with_timeout(
            Command::new("tmux").arg("-L").arg(&self.socket).args(args),
            Duration::from_secs(20),
        )?;
        ensure(out.status.success(), || {
            format!(
                "tmux {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until the pane shows `needle`.
    fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.cmd(&["capture-pane", "-p", "-t", "s"])?;
            if screen.contains(needle) {
                return Ok(screen);
            }
            if Instant::now() >= deadline {
                bail!("{needle:?} did not show within {timeout:?}; the pane:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn keys(&self, text: &str) -> Result<()> {
        self.cmd(&["send-keys", "-t", "s", "-l", text])?;
        self.cmd(&["send-keys", "-t", "s", "Enter"]).map(drop)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `kvmmanager-ctl shell` in a real terminal: a command's output shows,
/// `stty size` follows a resize, `exit 7` becomes the command's status,
/// and the terminal is back in canonical mode afterwards.
fn shell_in_tmux(ctl: &Ctl, dir: &Path) -> Result<()> {
    let script = dir.join("shell.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n'{}' --socket '{}' shell\necho \"ctl-exit=$?\"\n\
             stty -a | grep -q -- ' icanon' && echo terminal-restored\nsleep 600\n",
            ctl.bin.display(),
            socket(ctl)?.display()
        ),
    )?;
    let tmux = Tmux {
        socket: format!("kvmm-streams-{}", std::process::id()),
    };
    tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "s",
        "-x",
        "120",
        "-y",
        "40",
        &format!("sh {}", script.display()),
    ])?;
    tmux.keys("echo shell-says-$((6*7))")?;
    tmux.wait_for("shell-says-42", Duration::from_secs(30))?;
    tmux.keys("stty size")?;
    tmux.wait_for("40 120", Duration::from_secs(20))?;
    tmux.cmd(&["resize-window", "-t", "s", "-x", "100", "-y", "30"])?;
    // The resize reaches the guest through SIGWINCH and exec_resize.
    std::thread::sleep(Duration::from_millis(500));
    tmux.keys("stty size")?;
    tmux.wait_for("30 100", Duration::from_secs(20))?;
    tmux.keys("exit 7")?;
    let screen = tmux.wait_for("ctl-exit=7", Duration::from_secs(30))?;
    tmux.wait_for("terminal-restored", Duration::from_secs(10))
        .map_err(|e| format!("{e}\n(before: {screen})"))?;
    Ok(())
}

/// The local address in `forward`'s first line
/// (`kvmmanager-ctl: forwarding ADDRESS to ...`).
fn local_address(line: &str) -> Result<String> {
    match line.split_whitespace().collect::<Vec<_>>()[..] {
        [_, "forwarding", addr, ..] => Ok(addr.to_owned()),
        _ => bail!("kvmmanager-ctl forward did not start: {}", line.trim()),
    }
}

/// Starts `kvmmanager-ctl ARGS` in the background with stderr piped.
fn ctl_bg(ctl: &Ctl, args: &[&str], stdout: Stdio) -> Result<Bg> {
    let child = ctl
        .command(false, args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()?;
    Ok(Bg(child))
}

/// busybox httpd in the guest (started by its `/init`), a forward to it,
/// 8 parallel fetches and a 100 MiB download by checksum; a refused port
/// reported cleanly.
fn forward_curl(ctl: &Ctl, dir: &Path) -> Result<()> {
    let guest_sum = ctl
        .run(
            true,
            &[
                "exec",
                "--timeout",
                "240",
                "--",
                "sh",
                "-c",
                "head -c 1048576 /dev/urandom > /tmp/www/mib && \
                 head -c 104857600 /dev/urandom > /tmp/www/big && \
                 sha256sum /tmp/www/mib /tmp/www/big",
            ],
            Duration::from_secs(300),
        )?
        .ok()?
        .json()?;
    let sums = crate::suite::exec_result(&guest_sum)["stdout"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let sum_of = |name: &str| {
        sums.lines()
            .find(|l| l.ends_with(name))
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .ok_or_else(|| format!("no checksum of {name} in {sums:?}"))
    };
    let (mib_sum, big_sum) = (sum_of("/tmp/www/mib")?, sum_of("/tmp/www/big")?);
    // busybox httpd runs from the guest's /init (guest.rs).
    let port = HTTPD_PORT.to_string();
    let mut forward = ctl_bg(
        ctl,
        &["forward", &format!("0:127.0.0.1:{port}")],
        Stdio::null(),
    )?;
    let mut err = BufReader::new(
        forward
            .0
            .stderr
            .take()
            .ok_or("the forward's stderr is not piped")?,
    );
    let mut line = String::new();
    err.read_line(&mut line)?;
    let local = local_address(&line)?;
    // httpd may take a moment to listen: retry the first page.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = output_with_timeout(
            Command::new("curl").args(["-sS", "--max-time", "20", &format!("http://{local}/")]),
            Duration::from_secs(30),
        )?;
        if String::from_utf8_lossy(&out.stdout).contains("forwarded-page") {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "no page through the forward: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // 8 connections at once, each a 1 MiB file.
    let mut curls = Vec::new();
    for i in 0..8 {
        let out = dir.join(format!("mib{i}"));
        let child = Command::new("curl")
            .args(["-sS", "--max-time", "120", "-o"])
            .arg(&out)
            .arg(format!("http://{local}/mib"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        curls.push((Bg(child), out));
    }
    for (mut c, out) in curls {
        let status = c.0.wait()?;
        ensure(status.success(), || {
            format!("a parallel curl exited {status}")
        })?;
        let sum = sha256(&out)?;
        ensure(sum == mib_sum, || {
            format!("{}: sha256 {sum}, the guest's is {mib_sum}", out.display())
        })?;
    }
    let big = dir.join("big");
    let started = Instant::now();
    let out = output_with_timeout(
        Command::new("curl")
            .args(["-sS", "--max-time", "280", "-o"])
            .arg(&big)
            .arg(format!("http://{local}/big")),
        Duration::from_secs(300),
    )?;
    let secs = started.elapsed().as_secs_f64();
    ensure(out.status.success(), || {
        format!(
            "curl of 100 MiB: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let sum = sha256(&big)?;
    ensure(sum == big_sum, || {
        format!("the 100 MiB download's sha256 {sum} is not the guest's {big_sum}")
    })?;
    println!(
        "  100 MiB through the forward in {secs:.1} s ({:.1} MiB/s)",
        100.0 / secs
    );
    let _ = fs::remove_file(&big);
    // The port takes one host at a time.
    drop(forward);
    // A port nothing listens on: curl sees the connection closed, and
    // kvmmanager-ctl says why.
    let mut refused = ctl_bg(ctl, &["forward", "0:127.0.0.1:8099"], Stdio::null())?;
    let mut err = BufReader::new(refused.0.stderr.take().ok_or("stderr not piped")?);
    let mut line = String::new();
    err.read_line(&mut line)?;
    let local = local_address(&line)?;
    let out = output_with_timeout(
        Command::new("curl").args(["-sS", "--max-time", "20", &format!("http://{local}/")]),
        Duration::from_secs(30),
    )?;
    ensure(!out.status.success(), || {
        "curl got a page from a closed port".into()
    })?;
    line.clear();
    err.read_line(&mut line)?;
    ensure(line.contains("refused"), || {
        format!("kvmmanager-ctl did not report the refusal: {line:?}")
    })
}

/// A streamed command whose output nobody reads: `ping` and other
/// streams on the same connection still answer, and the agent's memory
/// stays put (through the host library: the port has one host at a time).
fn stalled_stream(ctl: &Ctl) -> Result<()> {
    use host_client::{agent_common::methods::ExecParams, Client, ExecRequest};
    use tokio::io::AsyncReadExt;
    let sock = socket(ctl)?.to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let e = |what: &'static str| move |err: host_client::ClientError| format!("{what}: {err}");
    rt.block_on(async move {
        let c = Client::connect(&sock).await.map_err(e("connect"))?;
        let rss = || async {
            let r = c
                .exec(&ExecParams {
                    command: "sh".into(),
                    args: vec![
                        "-c".into(),
                        "grep VmRSS /proc/$(pidof kvmmanager-agent | cut -d' ' -f1)/status".into(),
                    ],
                    ..ExecParams::default()
                })
                .await
                .map_err(e("VmRSS"))?;
            r.stdout
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("no VmRSS in {:?}", r.stdout))
        };
        let mut stalled = c
            .exec_start(ExecRequest::new("yes", ["stalled"]))
            .await
            .map_err(e("exec_start yes"))?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = rss().await?;
        for i in 0..5 {
            let started = Instant::now();
            c.ping().await.map_err(e("ping"))?;
            if started.elapsed() > Duration::from_secs(2) {
                return Err(format!(
                    "ping took {:?} beside a stalled stream",
                    started.elapsed()
                ));
            }
            let mut other = c
                .exec_start(ExecRequest::new("sh", ["-c", "head -c 1000000 /dev/zero"]))
                .await
                .map_err(e("exec_start"))?;
            let mut out = Vec::new();
            other
                .stdout
                .read_to_end(&mut out)
                .await
                .map_err(|err| format!("stream {i}: {err}"))?;
            if out.len() != 1_000_000 {
                return Err(format!("stream {i} gave {} bytes", out.len()));
            }
            let exit = other.control.wait().await.map_err(e("wait"))?;
            if exit.exit_code != Some(0) {
                return Err(format!("stream {i} ended {exit:?}"));
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss().await?;
        println!(
            "  agent RSS {before} kB beside a stalled stream, {after} kB after 5 more streams"
        );
        if after > before + 4096 {
            return Err(format!(
                "the agent grew from {before} kB to {after} kB beside a stalled stream"
            ));
        }
        // Stalled, not lost: it still delivers, from its start.
        let first = stalled
            .stdout
            .read_chunk()
            .await
            .map_err(|err| format!("the stalled stream: {err}"))?
            .unwrap_or_default();
        if !first.starts_with(b"stalled\n") {
            return Err(format!(
                "the stalled stream starts {:?}",
                String::from_utf8_lossy(&first[..first.len().min(40)])
            ));
        }
        stalled
            .control
            .signal("KILL")
            .await
            .map_err(e("kill yes"))?;
        Ok::<(), String>(())
    })?;
    Ok(())
}
