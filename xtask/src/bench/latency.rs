//! Latency figures: `ping`, `exec` and `load` (ping during a read).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use agent_common::methods::ExecParams;
use host_client::Client;
use serde_json::json;

use super::harness::{ms, Bench};
use super::qga::Qga;
use super::stats::{Figure, Spread};
use super::{err, GUEST_FILE};
use crate::util::{bail, heading, Result};

impl Bench<'_> {
    /// `ping`: round trip of both agents, alternately, 1000 times each.
    pub(crate) async fn ping(&mut self) -> Result<()> {
        heading("bench: ping x1000");
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..1000 {
            let t = Instant::now();
            self.c.ping().await.map_err(err("ping"))?;
            ours.push(ms(t));
            let t = Instant::now();
            self.q.call("guest-ping", json!({}))?;
            theirs.push(ms(t));
        }
        self.figures.push(Figure::new(
            "ping round trip (ms)",
            Spread::of(&ours),
            Some(Spread::of(&theirs)),
            "<= 0.7x",
            |r| r <= 0.7,
        ));
        Ok(())
    }

    /// `exec`: exec `true` through both agents, then the same with our
    /// agent's log level at warn (restarts the agent twice).
    pub(crate) async fn exec(&mut self) -> Result<()> {
        heading("bench: exec true x50");
        let (ours, theirs) = exec_times(&self.c, &mut self.q).await?;
        self.figures.push(Figure::new(
            "exec `true`, result in hand (ms)",
            Spread::of(&ours),
            Some(Spread::of(&theirs)),
            "<= 0.4x",
            |r| r <= 0.4,
        ));
        // Experiment: the same with the agent's per-exec info line off. In
        // this guest the agent's stderr is the emulated serial console
        // (qemu-ga writes nothing there per exec); on a real system it
        // goes to the journal.
        heading("bench: exec true x50, agent log_level warn");
        self.restart_agent(r#"s/"log_level": "info"/"log_level": "warn"/"#)
            .await?;
        let (ours, theirs) = exec_times(&self.c, &mut self.q).await?;
        self.figures.push(Figure::new(
            "  exec `true`, agent log_level warn (ms)",
            Spread::of(&ours),
            Some(Spread::of(&theirs)),
            "(experiment)",
            |_| true,
        ));
        self.restart_agent(r#"s/"log_level": "warn"/"log_level": "info"/"#)
            .await
    }

    /// `load`: ping p99 while the test file is pulled on the same
    /// connection, three times.
    pub(crate) async fn load(&mut self) -> Result<()> {
        heading("bench: ping during a 32 MiB read");
        let mut p99s = Vec::new();
        for _ in 0..3 {
            p99s.push(pull_with_pings(&self.c, &self.local).await?);
        }
        let p99 = Spread::of(&p99s);
        self.figures.push(Figure::new(
            "ping p99 during 32 MiB read (ms)",
            p99,
            None,
            "<= 10 ms",
            move |_| p99.median <= 10.0,
        ));
        Ok(())
    }
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

/// Pulls the test file while pinging on the same connection; ping p99 (ms).
pub(crate) async fn pull_with_pings(c: &Client, local: &Path) -> Result<f64> {
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
