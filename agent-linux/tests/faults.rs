//! Fault tests against the real binary: hosts that vanish mid-request, an
//! agent killed during a write, and commands that misbehave.

mod common;

use std::time::{Duration, Instant};

use common::{error_kind, AgentProcess};
use serde_json::json;

/// Pids of processes whose command line is exactly `argv`.
fn pids_running(argv: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .ok()
                .as_deref()
                == Some(&want[..])
        })
        .collect()
}

fn wait_gone(argv: &[&str]) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = pids_running(argv);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agent_killed_during_a_chunked_write_leaves_the_old_file() {
    let mut agent = AgentProcess::start();
    let target = agent.write_dir().join("config.txt");
    std::fs::write(&target, "old and complete").unwrap();
    let path = target.display().to_string();
    let mut c = agent.connect();
    let r = c.call(
        1,
        "file_write",
        json!({"path": path, "content": "new part one, ", "more": true}),
    );
    let id = r["result"]["upload_id"]
        .as_str()
        .expect("an upload id")
        .to_owned();
    let r = c.call(
        2,
        "file_write",
        json!({"path": path, "content": "two, ", "upload_id": id, "offset": 14, "more": true}),
    );
    assert!(r.get("result").is_some(), "{r}");
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "old and complete"
    );
}

#[test]
fn a_host_vanishing_mid_request_does_not_disturb_the_agent() {
    let agent = AgentProcess::start();
    for _ in 0..5 {
        let mut c = agent.connect();
        c.send(&json!({"jsonrpc":"2.0","method":"exec_command","params":{"command":"sleep","args":["0.3"]},"id":1}));
        // Half a request, then gone.
        c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"pi");
        drop(c);
    }
    let mut c = agent.connect();
    assert_eq!(c.call(7, "ping", json!({}))["result"]["pong"], true);
    let r = c.call(
        8,
        "exec_command",
        json!({"command": "echo", "args": ["still here"]}),
    );
    assert_eq!(r["result"]["stdout"], "still here\n");
}

#[test]
fn a_fork_bomb_within_the_time_limit_is_killed_whole() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    let script = "i=0; while [ $i -lt 40 ]; do sleep 4141 & i=$((i+1)); done; wait";
    let r = c.call(
        1,
        "exec_command",
        json!({"command": "sh", "args": ["-c", script], "timeout_seconds": 2}),
    );
    assert_eq!(r["result"]["timed_out"], true, "{r}");
    assert_eq!(r["result"]["signal"], 9, "{r}");
    assert!(
        wait_gone(&["sleep", "4141"]).is_empty(),
        "children survived"
    );
    assert_eq!(c.call(2, "ping", json!({}))["result"]["pong"], true);
}

#[test]
fn children_ignoring_sigterm_or_closing_stdout_early_are_handled() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    let r = c.call(
        1,
        "exec_command",
        json!({"command": "sh", "args": ["-c", "trap '' TERM; sleep 4242"], "timeout_seconds": 1}),
    );
    assert_eq!(r["result"]["timed_out"], true, "{r}");
    assert!(wait_gone(&["sleep", "4242"]).is_empty());
    // stdout closed early, the command goes on and then exits 3.
    let r = c.call(
        2,
        "exec_command",
        json!({"command": "sh", "args": ["-c", "echo early; exec >&-; sleep 0.2; echo late >&2; exit 3"]}),
    );
    assert_eq!(r["result"]["exit_code"], 3, "{r}");
    assert_eq!(r["result"]["stdout"], "early\n");
    assert_eq!(r["result"]["stderr"], "late\n");
    // A command that is not there.
    let r = c.call(
        3,
        "exec_command",
        json!({"command": "no-such-command-kvmm"}),
    );
    assert_eq!(error_kind(&r), "not_found");
}
