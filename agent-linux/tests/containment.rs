//! Command containment through the real binary: what `get_agent_info`
//! reports must be what the agent does to a command's `setsid` descendants.
//!
//! Either outcome is legitimate on a development machine (cgroup v1, no
//! write access to cgroupfs: `process_group`); the test checks that the
//! report and the behaviour agree. The real-VM suite (`cargo xtask vm-test`)
//! requires `cgroup`.

mod common;

use std::time::Duration;

use common::AgentProcess;
use serde_json::json;

/// True once `pid` is gone (or a zombie).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

fn wait_dead(pid: i32) -> bool {
    for _ in 0..100 {
        if dead(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn reported_containment_matches_what_happens_to_setsid_children() {
    let agent = AgentProcess::start_with(
        json!({"command_max_processes": 50, "command_memory_max_mb": 64}),
        json!({}),
    );
    let mut conn = agent.connect();
    let info = conn.call(1, "get_agent_info", json!({}));
    let limits = &info["result"]["limits"];
    let containment = limits["command_containment"].as_str().unwrap().to_owned();
    assert!(
        ["cgroup", "process_group"].contains(&containment.as_str()),
        "{info}"
    );
    let log = agent.log();
    assert!(log.contains("command containment"), "{log}");

    // The setsid child leaves the process group at once; the main process
    // waits until the timeout.
    let reply = conn.call(
        2,
        "exec_command",
        json!({
            "command": "sh",
            "args": ["-c", "setsid sleep 100 >/dev/null 2>&1 & echo $!; sleep 100"],
            "timeout_seconds": 1
        }),
    );
    let result = &reply["result"];
    assert_eq!(result["timed_out"], true, "{reply}");
    let pid: i32 = result["stdout"].as_str().unwrap().trim().parse().unwrap();
    let gone = wait_dead(pid);
    if !gone {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    match containment.as_str() {
        "cgroup" => {
            assert!(gone, "setsid child {pid} survived cgroup containment");
            // Limits are reported only when their controller is in force.
            for (key, want) in [
                ("command_max_processes", 50u64),
                ("command_memory_max", 64 << 20),
            ] {
                assert!(
                    limits[key].is_null() || limits[key] == want,
                    "{key}: {limits}"
                );
            }
        }
        _ => {
            assert!(!gone, "process_group reported, yet setsid child {pid} died");
            assert!(limits["command_max_processes"].is_null(), "{limits}");
            assert!(limits["command_memory_max"].is_null(), "{limits}");
            assert!(log.contains("process group only"), "{log}");
        }
    }
}
