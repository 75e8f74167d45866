//! Resource figures: agent memory (`rss`, `flood`), wake-ups with no host
//! attached (`wake`), and the binary's size (`size`, on the host).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use host_client::Client;
use serde_json::json;

use super::err;
use super::harness::{client_options, ctxt, proc_status, sh, status_kb, switch_delta, Bench};
use super::qga::Qga;
use super::stats::{Figure, Spread};
use crate::guest;
use crate::util::{bail, heading, target_dir, Result};

impl Bench<'_> {
    /// `rss`: both agents' RSS before the first figure, and their peak
    /// after the transfers so far.
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

    /// `wake`: both agents' context switches per second with both host
    /// sockets closed, over three 10 s windows.
    pub(crate) async fn wake(&mut self) -> Result<()> {
        heading("bench: wake-ups with no host attached (3 x 10 s)");
        let (mut ours_w, mut theirs_w) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            // Calibration: the same reads around a close and reopen, no wait.
            let (o, t) = self.wake_window(0).await?;
            let (o10, t10) = self.wake_window(10).await?;
            ours_w.push(((o10 - o) / 10.0).max(0.0));
            theirs_w.push(((t10 - t) / 10.0).max(0.0));
        }
        let ours_wake = Spread::of(&ours_w);
        self.figures.push(Figure::new(
            "wake-ups/s, no host attached",
            ours_wake,
            Some(Spread::of(&theirs_w)),
            "0",
            move |_| ours_wake.median < 0.5,
        ));
        Ok(())
    }

    /// Context switches of both agents over `secs` with both host sockets
    /// closed.
    async fn wake_window(&mut self, secs: u64) -> Result<(f64, f64)> {
        let a_ours = ctxt(&self.c, self.our_pid).await?;
        let a_qga = ctxt(&self.c, self.qga_pid).await?;
        self.q.close();
        // Dropping the last clone closes the connection.
        self.disconnect();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        self.q = Qga::connect(&self.vm.qga)?;
        let b_qga = ctxt(&self.c, self.qga_pid).await?;
        let b_ours = ctxt(&self.c, self.our_pid).await?;
        Ok((switch_delta(&a_ours, &b_ours), switch_delta(&a_qga, &b_qga)))
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
