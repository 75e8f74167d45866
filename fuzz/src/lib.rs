//! Properties the fuzz targets check. `checks.rs` is also compiled into
//! `agent-common/tests/fuzz_regressions.rs` and `agent.rs` into
//! `agent-linux/tests/fuzz_regressions.rs`, which replay every seed and every
//! input kept under `fuzz/regressions/` in the ordinary test suite.

pub mod checks;

pub mod agent;
