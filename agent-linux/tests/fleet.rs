//! The fleet-observability methods and the audit trail through the real
//! binary: metrics, a process found and signalled, a log line found, the
//! method policy, and one audit line per guest-changing request, without
//! its secrets, in the log and the audit file.

mod common;

use std::process::Command;

use common::{error_kind, AgentProcess};
use serde_json::{json, Value};

const SECRET: &str = "Tr0ub4dor-and-3";

/// The audit lines of the audit file (bare JSON) or of the log (after
/// the word `audit`).
fn audit_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix('{')
                .map(|_| l)
                .or_else(|| l.split_once(": audit ").map(|(_, j)| j))
        })
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect()
}

#[test]
fn metrics_processes_signals_logs_and_their_audit_lines() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let agent = AgentProcess::start_with(json!({}), json!({"audit_file": audit}));
    let mut c = agent.connect();

    let m = c.call(1, "get_metrics", json!({}));
    let m = &m["result"];
    assert!(m["memory"]["total_bytes"].as_u64().unwrap() > 0, "{m}");
    assert!(m["process_count"].as_u64().unwrap() > 0, "{m}");
    assert!(!m["cpus"].as_array().unwrap().is_empty(), "{m}");

    let mut child = Command::new("sleep").arg("4242").spawn().unwrap();
    let pid = child.id();
    let l = c.call(
        2,
        "list_processes",
        json!({"filter": "4242", "sort": "start"}),
    );
    let found = l["result"]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("sleep 4242 not listed: {l}"))
        .clone();
    assert_eq!(found["cmdline"], json!(["sleep", "4242"]));
    let r = c.call(3, "kill_process", json!({"pid": agent.pid()}));
    assert_eq!(
        error_kind(&r),
        "policy_denied",
        "the agent never signals itself: {r}"
    );
    let r = c.call(4, "kill_process", json!({"pid": 1}));
    assert_eq!(error_kind(&r), "policy_denied", "{r}");
    let r = c.call(
        5,
        "kill_process",
        json!({"pid": pid, "signal": "KILL", "start_time": found["start_time"]}),
    );
    assert_eq!(r["result"]["signal"], "KILL", "{r}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(child.wait().unwrap().signal(), Some(9));

    let log = agent.read_dir().join("app.log");
    std::fs::write(
        &log,
        "2026-11-27T10:00:00Z start\n2026-11-27T11:00:00Z fleet-marker one\nother\n",
    )
    .unwrap();
    let r = c.call(
        6,
        "read_log",
        json!({"path": log, "filter": "fleet-marker"}),
    );
    assert_eq!(
        r["result"]["lines"],
        json!(["2026-11-27T11:00:00Z fleet-marker one"]),
        "{r}"
    );
    let r = c.call(7, "read_log", json!({"path": "/etc/shadow"}));
    assert_eq!(error_kind(&r), "policy_denied", "{r}");

    // Requests that change the guest, carrying secrets.
    let target = agent.write_dir().join("secret.txt");
    let r = c.call(8, "file_write", json!({"path": target, "content": SECRET}));
    assert_eq!(r["result"]["committed"], true, "{r}");
    let r = c.call(
        9,
        "exec_command",
        json!({"command": "cat", "stdin": SECRET, "env": {"API_TOKEN": SECRET}}),
    );
    assert_eq!(r["result"]["stdout"], SECRET, "{r}");
    let r = c.call(
        10,
        "set_user_password",
        json!({"username": "no-such-user-kvmm", "password": SECRET}),
    );
    assert!(r["error"].is_object(), "{r}");

    drop(c);
    let file = std::fs::read_to_string(&audit).unwrap();
    let log = agent.log();
    assert!(
        !file.contains(SECRET),
        "a secret in the audit file:\n{file}"
    );
    assert!(!log.contains(SECRET), "a secret in the log:\n{log}");
    for text in [&file, &log] {
        let lines = audit_lines(text);
        let methods: Vec<&str> = lines.iter().filter_map(|l| l["method"].as_str()).collect();
        assert_eq!(
            methods,
            [
                "kill_process",
                "kill_process",
                "kill_process",
                "file_write",
                "exec_command",
                "set_user_password"
            ],
            "one line per guest-changing request, none for the others:\n{text}"
        );
        assert_eq!(lines[0]["outcome"], "policy_denied");
        assert_eq!(lines[2]["outcome"], "ok");
        assert_eq!(lines[2]["target"]["pid"], pid);
        assert_eq!(lines[3]["target"]["path"], json!(target));
        assert_eq!(lines[3]["bytes_in"], SECRET.len());
        assert_eq!(lines[4]["target"]["env_names"], json!(["API_TOKEN"]));
        assert_eq!(lines[5]["target"]["username"], "no-such-user-kvmm");
        assert!(lines[5]["outcome"] != "ok");
        assert!(lines
            .iter()
            .all(|l| l["session"].is_u64() && l["time"].is_string()));
    }
    let mode = std::fs::metadata(&audit).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
}

#[test]
fn kill_process_is_refused_when_blocked() {
    let agent = AgentProcess::start_with(json!({"blocked_methods": ["kill_process"]}), json!({}));
    let mut c = agent.connect();
    let mut child = Command::new("sleep").arg("4343").spawn().unwrap();
    let r = c.call(1, "kill_process", json!({"pid": child.id()}));
    assert_eq!(error_kind(&r), "policy_denied", "{r}");
    assert_eq!(r["error"]["data"]["config_key"], "security.blocked_methods");
    assert!(child.try_wait().unwrap().is_none(), "still running");
    child.kill().unwrap();
    child.wait().unwrap();
}
