//! Resource figures: agent memory (`rss`, `flood`), wake-ups with no host
//! attached (`wake`), and the binary's size (`size`, on the host).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use host_client::Client;
use serde_json::json;

use super::err;
use super::harness::{client_options, proc_status, sh, status_kb, switch_delta, Bench};
use super::qga::Qga;
use super::stats::{Figure, Spread};
use crate::guest;
use crate::util::{bail, heading, target_dir, Result};

impl Bench<'_> {
    /// Resets both agents' peak RSS (`VmHWM`, through `clear_refs`), so
    /// that `rss` reports the file transfers' peak alone.
    pub(crate) async fn reset_peak_rss(&mut self) -> Result<()> {
        let script = format!(
            "echo 5 > /proc/{}/clear_refs && echo 5 > /proc/{}/clear_refs",
            self.our_pid, self.qga_pid
        );
        sh(&self.c, &script).await.map(drop)
    }

    /// `rss`: both agents' RSS before the first figure, and their peak in
    /// the file transfers (read, write, load), measured before the streams.
    pub(crate) async fn rss(&mut self) -> Result<()> {
        let ours_st = proc_status(&self.c, self.our_pid).await?;
        let qga_st = proc_status(&self.c, self.qga_pid).await?;
        self.figures.push(Figure::new(
            "agent RSS idle (MB)",
            Spread::one(self.ours_idle / 1024.0),
            Some(Spread::one(self.qga_idle / 1024.0)),
            "<= 1.0x",
            |r| r <= 1.0,
        ));
        let ours_peak = status_kb(&ours_st, "VmHWM").unwrap_or(0.0) / 1024.0;
        self.figures.push(Figure::new(
            "agent RSS peak in transfers (MB)",
            Spread::one(ours_peak),
            Some(Spread::one(
                status_kb(&qga_st, "VmHWM").unwrap_or(0.0) / 1024.0,
            )),
            "<= 8 MB",
            move |_| ours_peak <= 8.0,
        ));
        Ok(())
    }

    /// `wake`: each agent's context switches per second over three 10 s
    /// windows with its host socket closed, counted inside the guest by a
    /// script the other agent runs (so nothing talks to the agent measured
    /// during its window, and the count needs no calibration).
    pub(crate) async fn wake(&mut self) -> Result<()> {
        heading("bench: wake-ups with no host attached (3 x 10 s)");
        let (mut ours_w, mut theirs_w) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            // Ours, counted through qemu-ga.
            self.disconnect();
            let out = self.q.sh(&idle_window_script(self.our_pid))?;
            ours_w.push(window_switches(&out)? / WAKE_SECONDS as f64);
            // qemu-ga's, counted through ours.
            self.q.close();
            let out = sh(&self.c, &idle_window_script(self.qga_pid)).await?;
            self.q = Qga::connect(&self.vm.qga)?;
            theirs_w.push(window_switches(&out)? / WAKE_SECONDS as f64);
        }
        let ours_wake = Spread::of(&ours_w);
        self.figures.push(Figure::new(
            "wake-ups/s, no host attached",
            ours_wake,
            Some(Spread::of(&theirs_w)),
            "0 in every window",
            move |_| ours_wake.max == 0.0,
        ));
        Ok(())
    }

    /// `flood`: a host that floods the agent with requests (1 MiB
    /// `file_read`s, then pings) and reads nothing: the agent's peak RSS
    /// afterwards, against the bound `kvmmanager-agent --check-config`
    /// states for its config. The flooding host holds the port alone, then
    /// leaves; a new client follows.
    pub(crate) async fn flood(&mut self) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        heading("bench: flood of unread requests");
        sh(&self.c, "head -c 1048576 /dev/urandom > /tmp/flood.bin").await?;
        let check = sh(
            &self.c,
            "kvmmanager-agent --check-config --config /etc/kvmmanager-agent/config.json",
        )
        .await?;
        let bound_mb = check
            .lines()
            .find_map(|l| l.trim().strip_prefix("memory bound:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .ok_or_else(|| format!("no memory bound in --check-config's output:\n{check}"))?
            / (1024.0 * 1024.0);
        self.disconnect();
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
            wire.extend(
                format!("{{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":{i}}}\n").bytes(),
            );
        }
        let mut sock = tokio::net::UnixStream::connect(&self.vm.ours)
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
        self.c = Client::connect_with(&self.vm.ours, client_options())
            .await
            .map_err(err("reconnect after the flood"))?;
        let st = proc_status(&self.c, self.our_pid).await?;
        let peak = status_kb(&st, "VmHWM").unwrap_or(f64::NAN) / 1024.0;
        self.figures.push(
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
        Ok(())
    }
}

/// `size`: the static musl agent's size.
pub(crate) fn binary_size() -> Result<Figure> {
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
        // 2 MB before issue 16 (metrics and processes through sysinfo).
        "<= 2.5 MB",
        move |_| ours <= 2.5,
    ))
}

/// Length of one idle window (s).
const WAKE_SECONDS: u64 = 10;

/// How long an agent is left alone before its window starts (s): past
/// tokio's 10 s keep-alive of idle blocking threads, whose one exit after
/// the last request is not a periodic wake-up. A thread that ends inside
/// the window still counts (see [`window_switches`]).
const SETTLE_SECONDS: u64 = 12;

/// A guest script: after `SETTLE_SECONDS`, per-thread context switches of
/// `pid`, a `WAKE_SECONDS` sleep, the same again, the two snapshots apart
/// by `--`.
fn idle_window_script(pid: u32) -> String {
    let snap = format!(
        "for t in /proc/{pid}/task/*; do echo ${{t##*/}} $(grep ctxt_switches $t/status | awk '{{s+=$2}} END {{print s}}'); done"
    );
    format!("sleep {SETTLE_SECONDS}; {snap}; echo --; sleep {WAKE_SECONDS}; {snap}")
}

/// The switches between the two snapshots of [`idle_window_script`]: of
/// threads in both, their difference; a new thread, all of its own; a
/// thread that ended, one (it woke up to end).
fn window_switches(out: &str) -> Result<f64> {
    let Some((a, b)) = out.split_once("--") else {
        bail!("the idle window script printed no separator: {out}");
    };
    let parse = |s: &str| -> std::collections::BTreeMap<u32, u64> {
        s.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
            })
            .collect()
    };
    let (a, b) = (parse(a), parse(b));
    if a.is_empty() || b.is_empty() {
        bail!("the idle window script found no threads: {out}");
    }
    let ended = a.keys().filter(|t| !b.contains_key(t)).count();
    Ok(switch_delta(&a, &b) + ended as f64)
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
