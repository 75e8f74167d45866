//! `metrics`: the cost of `get_metrics`, the call an exporter or `top`
//! makes every few seconds per VM: its round trip, and the agent's CPU
//! time per call (utime + stime of `/proc/PID/stat`, before and after).

use std::time::Instant;

use agent_common::methods::GetMetricsRpc;

use super::err;
use super::harness::{ms, sh, Bench};
use super::stats::{Figure, Spread};
use crate::util::{heading, Result};

/// Calls measured.
const CALLS: usize = 100;

impl Bench<'_> {
    /// `metrics`: 100 `get_metrics` calls, one at a time.
    pub(crate) async fn metrics(&mut self) -> Result<()> {
        heading("bench: get_metrics x100");
        let before = cpu_ms(self).await?;
        let mut times = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let t = Instant::now();
            self.c
                .call::<GetMetricsRpc>(&Default::default())
                .await
                .map_err(err("get_metrics"))?;
            times.push(ms(t));
        }
        let after = cpu_ms(self).await?;
        self.figures.push(Figure::new(
            "get_metrics round trip (ms)",
            Spread::of(&times),
            None,
            "(measured)",
            |_| true,
        ));
        let per_call = (after - before) / CALLS as f64;
        self.figures.push(
            Figure::new(
                "  agent CPU per get_metrics (ms)",
                Spread::one(per_call),
                None,
                "<= 50 ms (1% of a 5 s interval)",
                move |_| per_call <= 50.0,
            )
            .with_note(format!(
                "{:.1} ms of agent CPU for {CALLS} calls, by /proc/PID/stat",
                after - before
            )),
        );
        Ok(())
    }
}

/// The agent's CPU time so far, in ms (`utime` + `stime`, at 100 ticks a
/// second, the guest kernel's `USER_HZ`).
async fn cpu_ms(b: &Bench<'_>) -> Result<f64> {
    let stat = sh(&b.c, &format!("cat /proc/{}/stat", b.our_pid)).await?;
    // Fields after the command name, which may hold spaces: `) S ppid ...`.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 here
    // (field 3, the state, is the first after the name).
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Ok((ticks(11) + ticks(12)) * 10.0)
}
