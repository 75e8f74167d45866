//! Properties the fuzz targets check. `checks.rs` is also compiled into
//! `agent-common/tests/fuzz_regressions.rs`, which replays every input kept
//! under `fuzz/regressions/` in the ordinary test suite.

pub mod checks;

pub mod agent;
