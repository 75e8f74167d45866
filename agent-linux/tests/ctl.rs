//! `kvmmanager-ctl` (the operator's command) against the real agent on a
//! Unix socket: output, `--json`, file transfer and exit codes.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::AgentProcess;
use serde_json::Value;

/// The `kvmmanager-ctl` binary beside the agent's. `cargo test --workspace`
/// builds it (host-client has integration tests); a run of this package
/// alone needs `cargo build -p host-client` first.
fn ctl_binary() -> PathBuf {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_kvmmanager-agent"));
    let ctl = agent.with_file_name("kvmmanager-ctl");
    assert!(
        ctl.exists(),
        "{} is missing: run `cargo test --workspace`, or `cargo build -p host-client` first",
        ctl.display()
    );
    ctl
}

fn ctl(agent: &AgentProcess, args: &[&str]) -> Output {
    Command::new(ctl_binary())
        .arg("--socket")
        .arg(&agent.socket)
        .args(args)
        .output()
        .expect("run kvmmanager-ctl")
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

#[test]
fn every_read_only_command_works() {
    let agent = AgentProcess::start();
    let v = json(&ctl(&agent, &["--json", "ping"]));
    assert_eq!(v["pong"], true);
    let v = json(&ctl(&agent, &["--json", "info"]));
    assert_eq!(v["protocol_version"], 1);
    assert_eq!(v["platform"], "linux");
    let v = json(&ctl(&agent, &["--json", "sysinfo"]));
    assert!(v["cpu_count"].as_u64().unwrap() >= 1);
    let v = json(&ctl(&agent, &["--json", "net"]));
    assert!(v["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == "lo"));
    let v = json(&ctl(&agent, &["--json", "df"]));
    assert!(v["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["mount_point"] == "/"));
    // Human output is a table, not JSON.
    let out = ctl(&agent, &["df"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains('/'));
}

#[test]
fn exec_passes_output_and_exit_status_through() {
    let agent = AgentProcess::start();
    let out = ctl(
        &agent,
        &["exec", "--", "sh", "-c", "echo out; echo err >&2; exit 7"],
    );
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    let out = ctl(&agent, &["exec", "--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124));
}

#[test]
fn push_pull_cat_and_refusals() {
    let agent = AgentProcess::start();
    let local = agent.dir.path().join("local.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    let guest = agent.write_dir().join("pushed.bin");
    let out = ctl(
        &agent,
        &["push", local.to_str().unwrap(), guest.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&guest).unwrap(), data);
    let back = agent.dir.path().join("back.bin");
    let out = ctl(
        &agent,
        &["pull", guest.to_str().unwrap(), back.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&back).unwrap(), data);
    std::fs::write(agent.read_dir().join("hello.txt"), "hello\n").unwrap();
    let out = ctl(
        &agent,
        &["cat", agent.read_dir().join("hello.txt").to_str().unwrap()],
    );
    assert_eq!(out.stdout, b"hello\n");
    // Refused by policy: exit 1 and one line naming what failed.
    let out = ctl(&agent, &["cat", "/etc/shadow"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy_denied") || err.contains("policy"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn ctrl_c_stops_the_command_on_the_agent_and_exits_130() {
    let agent = AgentProcess::start_with(
        serde_json::json!({}),
        serde_json::json!({"max_concurrent_requests": 1}),
    );
    let started = agent.write_dir().join("started");
    let script = format!("touch {}; exec sleep 30", started.display());
    let child = Command::new(ctl_binary())
        .arg("--socket")
        .arg(&agent.socket)
        .args(["exec", "--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kvmmanager-ctl");
    // Hang guard: wait for the command to run in the agent's only slot.
    for _ in 0..2000 {
        if started.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(started.exists(), "the command did not start");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    // The command was stopped, not left running for 30 s in the only slot.
    let out = ctl(&agent, &["exec", "--", "true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
