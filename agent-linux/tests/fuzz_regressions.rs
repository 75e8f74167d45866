//! Replays the seeds and every input kept under `fuzz/regressions/` for the
//! fuzz targets that drive the Linux agent (`dispatch`, `path_policy`,
//! `session`) through their properties in `fuzz/src/agent.rs`, so they run
//! in `cargo test` without nightly or libFuzzer. (The `codec` and `jsonrpc`
//! inputs are replayed by `agent-common/tests/fuzz_regressions.rs`.)
//!
//! Every file in `fuzz/seeds/<target>/` and `fuzz/regressions/<target>/` is
//! replayed (except `README*`): a newly kept input needs no edit here.

// The functions are `pub` for the fuzz crate; here they are used privately,
// and the fuzz-only helpers are not used at all.
#[allow(unreachable_pub, dead_code)]
#[path = "../../fuzz/src/agent.rs"]
mod agent;

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut out = Vec::new();
    for sub in ["seeds", "regressions"] {
        let path = root.join(sub).join(target);
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries {
            let entry = entry.expect("a directory entry");
            if entry.file_name().to_string_lossy().starts_with("README") {
                continue;
            }
            let data = std::fs::read(entry.path()).expect("a readable input");
            out.push((entry.path().display().to_string(), data));
        }
    }
    out.sort();
    out
}

/// Runs `check` on every input of `target`; fails naming each input that
/// breaks a property.
fn replay(target: &str, check: fn(&[u8])) {
    let all = inputs(target);
    assert!(!all.is_empty(), "fuzz/seeds/{target} is missing");
    let failed: Vec<&str> = all
        .iter()
        .filter(|(_, data)| std::panic::catch_unwind(|| check(data)).is_err())
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(
        failed.is_empty(),
        "inputs failing the {target} properties:\n{}",
        failed.join("\n")
    );
}

#[test]
fn dispatch_inputs_hold_the_dispatch_properties() {
    replay("dispatch", agent::check_dispatch);
}

#[test]
fn path_policy_inputs_hold_the_policy_properties() {
    replay("path_policy", agent::check_path_policy);
}

#[test]
fn session_inputs_hold_the_session_properties() {
    replay("session", agent::check_session);
}

/// The dispatch harness picks methods from `Method::ALL`: every method
/// that would change the machine running it is blocked by its config.
#[test]
fn the_dispatch_harness_blocks_methods_that_change_the_machine() {
    use agent_common::methods::Method;
    let blocked = agent::machine_changing_methods();
    for m in [
        Method::FsFreeze,
        Method::FsThaw,
        Method::FsTrim,
        Method::SetTime,
        Method::SshKeysAdd,
        Method::SshKeysRemove,
        Method::SshKeysSet,
        Method::SetUserPassword,
        Method::SetVcpus,
        Method::SetMemoryBlocks,
        Method::Suspend,
    ] {
        assert!(blocked.contains(&m), "{m} is not blocked");
    }
    assert!(!blocked.contains(&Method::FileWrite) && !blocked.contains(&Method::ExecCommand));
}
