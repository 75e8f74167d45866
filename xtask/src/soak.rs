//! `cargo xtask soak`: the leak soak at full size against the real agent.
//!
//! The test suite runs a short version of `agent-linux/tests/soak.rs`; this
//! task runs the same test, optimised, with the figures of the hardening
//! issue: 1,000,000 pings, 10,000 each of file write, file read and exec over
//! one connection, 1,000 connect/disconnect cycles and 50 floods (hosts that
//! send requests until the agent stops reading them, then leave). The
//! agent's RSS may grow by at most 500 kB after warm-up, its peak must stay
//! within the documented memory bound, and its descriptor count must return
//! to its starting value; the test prints the figures.

use crate::util::{cargo, heading, run, Result};

/// Runs the full soak.
pub(crate) fn soak() -> Result<()> {
    heading("soak: 1,000,000 pings, 10,000 write/read/exec, 1,000 connections, 50 floods");
    run(cargo()
        .args([
            "test",
            "--release",
            "-p",
            "agent-linux",
            "--test",
            "soak",
            "--",
            "--nocapture",
        ])
        .env("KVMM_SOAK_PINGS", "1000000")
        .env("KVMM_SOAK_OPS", "10000")
        .env("KVMM_SOAK_CYCLES", "1000")
        .env("KVMM_SOAK_FLOODS", "50"))
}
