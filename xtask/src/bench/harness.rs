//! The state the in-guest figures share ([`Bench`]) and the guest helpers
//! they use.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_common::methods::ExecParams;
use host_client::{Client, ClientOptions};
use serde_json::json;

use super::err;
use super::qga::Qga;
use super::stats::{Figure, Spread};
use super::vm::Vm;
use crate::util::{bail, Result};

/// The in-guest figures of one bench run, in the making: both agents'
/// connections and pids, and what a figure measured that a later one
/// reuses. Each figure is a method (`latency`, `transfer`, `resources`),
/// called in [`super::SECTIONS`] order by [`super::measure`].
pub(crate) struct Bench<'a> {
    pub(crate) vm: &'a Vm,
    /// Where the pulled test file and other host-side files go.
    pub(crate) out_dir: &'a Path,
    /// The table, filled row by row.
    pub(crate) figures: &'a mut Vec<Figure>,
    /// Our agent, through the host client.
    pub(crate) c: Client,
    /// qemu-ga, through its line protocol.
    pub(crate) q: Qga,
    /// Our agent's pid; it changes when a figure restarts the agent.
    pub(crate) our_pid: u32,
    pub(crate) qga_pid: u32,
    /// Both agents' RSS (kB) before any figure ran.
    pub(crate) ours_idle: f64,
    pub(crate) qga_idle: f64,
    /// The raw port ceiling guest to host (`raw`), for the read share and
    /// the last rows.
    pub(crate) raw: Option<Spread>,
    /// The raw port ceiling host to guest (`raw`), for the write share.
    pub(crate) raw_in: Option<Spread>,
    /// What a guest command costs besides its work (s, `raw`), taken off
    /// the timings of commands that read the raw port.
    pub(crate) raw_idle: Option<f64>,
    /// The guest program of the write floor (`push_floor`, built for the
    /// guest), if `write` is measured.
    pub(crate) push_floor: Option<PathBuf>,
    /// The host copy of the guest's test file, once pulled.
    pub(crate) local: PathBuf,
    /// The test file's bytes, as pulled.
    pub(crate) reference: Vec<u8>,
    /// Our pull rates (MiB/s) of the test file.
    pub(crate) read_rates: Vec<f64>,
    /// qemu-ga's best read rate, the reference of the read figures.
    pub(crate) best: Option<Spread>,
    /// qemu-ga's write rate (`write`), the reference of `bigmsg`.
    pub(crate) theirs_write: Option<Spread>,
}

impl<'a> Bench<'a> {
    /// Connects to both agents and notes their pids and idle RSS.
    pub(crate) async fn start(
        vm: &'a Vm,
        out_dir: &'a Path,
        figures: &'a mut Vec<Figure>,
    ) -> Result<Bench<'a>> {
        let c = Client::connect_with(&vm.ours, client_options())
            .await
            .map_err(err("connect to our agent"))?;
        let q = Qga::connect(&vm.qga)?;
        let our_pid = pid_of(&c, "kvmmanager-agent").await?;
        let qga_pid = pid_of(&c, "qemu-ga").await?;
        eprintln!("bench: agent pid {our_pid}, qemu-ga pid {qga_pid}");
        let ours_idle = status_kb(&proc_status(&c, our_pid).await?, "VmRSS").unwrap_or(0.0);
        let qga_idle = status_kb(&proc_status(&c, qga_pid).await?, "VmRSS").unwrap_or(0.0);
        Ok(Bench {
            vm,
            out_dir,
            figures,
            c,
            q,
            our_pid,
            qga_pid,
            ours_idle,
            qga_idle,
            raw: None,
            raw_in: None,
            raw_idle: None,
            push_floor: None,
            local: out_dir.join("pulled.bin"),
            reference: Vec::new(),
            read_rates: Vec::new(),
            best: None,
            theirs_write: None,
        })
    }

    /// The last in-guest row (the raw port ceiling, if measured); removes
    /// the host copy of the test file.
    pub(crate) fn finish(self) {
        if let Some(raw_spread) = self.raw {
            self.figures.push(Figure::new(
                "raw port ceiling, guest to host (MiB/s)",
                raw_spread,
                None,
                "(reference)",
                |_| true,
            ));
        }
        if let Some(raw_spread) = self.raw_in {
            self.figures.push(Figure::new(
                "raw port ceiling, host to guest (MiB/s)",
                raw_spread,
                None,
                "(reference)",
                |_| true,
            ));
        }
        let _ = fs::remove_file(&self.local);
    }

    /// Closes our agent's connection: `c` becomes a client that connects
    /// on its next call (one host connection per port at a time).
    pub(crate) fn disconnect(&mut self) {
        self.c = Client::lazy(&self.vm.ours, client_options());
    }

    /// Edits the guest agent's config with `sed_expr` and restarts the agent
    /// (/init's loop starts it again); `c` and `our_pid` are the new ones.
    pub(crate) async fn restart_agent(&mut self, sed_expr: &str) -> Result<()> {
        // The exec never answers: the agent is killed under it (by design);
        // its error is expected and ignored.
        let config = "/etc/kvmmanager-agent/config.json";
        let our_pid = self.our_pid;
        let _ = self
            .c
            .call_raw_with_timeout(
                "exec_command",
                json!({"command": "sh", "args": ["-c", format!(
                    "sed '{sed_expr}' {config} > /tmp/bench-config.json && cp /tmp/bench-config.json {config} && kill {our_pid}"
                )]}),
                Duration::from_secs(3),
            )
            .await;
        self.disconnect();
        tokio::time::sleep(Duration::from_secs(5)).await;
        self.c = Client::connect_with(&self.vm.ours, client_options())
            .await
            .map_err(err("reconnect after the agent restart"))?;
        let new_pid = pid_of(&self.c, "kvmmanager-agent").await?;
        if new_pid == our_pid {
            bail!("the agent was not restarted");
        }
        self.our_pid = new_pid;
        Ok(())
    }
}

pub(crate) fn client_options() -> ClientOptions {
    ClientOptions {
        call_timeout: Duration::from_secs(120),
        ..ClientOptions::default()
    }
}

/// Runs `sh -c script` in the guest through our agent; returns stdout.
pub(crate) async fn sh(c: &Client, script: &str) -> Result<String> {
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

/// The pid of the guest process `name` (`pidof`).
async fn pid_of(c: &Client, name: &str) -> Result<u32> {
    Ok(sh(c, &format!("pidof {name}"))
        .await?
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no pid of {name}"))?)
}

/// The text of the guest's /proc/PID/status.
pub(crate) async fn proc_status(c: &Client, pid: u32) -> Result<String> {
    sh(c, &format!("cat /proc/{pid}/status")).await
}

/// A field (in kB) of /proc/PID/status text.
pub(crate) fn status_kb(status: &str, key: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Switches between two per-thread snapshots (threads gone are not counted
/// after they left; new threads count in full).
pub(crate) fn switch_delta(a: &BTreeMap<u32, u64>, b: &BTreeMap<u32, u64>) -> f64 {
    b.iter()
        .map(|(tid, n)| n.saturating_sub(a.get(tid).copied().unwrap_or(0)) as f64)
        .sum()
}

/// Milliseconds since `t`.
pub(crate) fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// MiB/s of `bytes` moved since `t`.
pub(crate) fn mibs(bytes: u64, t: Instant) -> f64 {
    bytes as f64 / 1048576.0 / t.elapsed().as_secs_f64().max(1e-9)
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
}
