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
    drop(c);
    let lines = audit_lines(&agent.log());
    assert!(
        lines
            .iter()
            .any(|l| l["method"] == "kill_process" && l["outcome"] == "policy_denied"),
        "a blocked request leaves its audit line too:\n{}",
        agent.log()
    );
}

/// `kvmmanager-ctl`'s fleet commands against the real agent (one agent,
/// `--socket`): `list`, `top`, `exporter` (a real HTTP request on
/// loopback) and `mcp` (a scripted MCP session on its stdin).
#[test]
fn ctl_fleet_commands_against_the_real_agent() {
    use std::io::{BufRead, BufReader, Read, Write};
    let ctl = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kvmmanager-agent"))
        .with_file_name("kvmmanager-ctl");
    assert!(
        ctl.exists(),
        "{} is missing: run `cargo test --workspace`, or `cargo build -p host-client` first",
        ctl.display()
    );
    let agent = AgentProcess::start();
    let run = |args: &[&str]| {
        let out = Command::new(&ctl)
            .arg("--socket")
            .arg(&agent.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let list: Value = serde_json::from_str(&run(&["--json", "list"])).unwrap();
    assert_eq!(list[0]["state"], "up", "{list}");
    assert!(list[0]["rtt_ms"].is_number(), "{list}");
    let top = run(&["--json", "top", "-n", "2", "-i", "1"]);
    let samples: Vec<Value> = top
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 2, "{top}");
    assert!(
        samples[0][0]["cpu_percent"].is_null(),
        "no rate from one sample: {top}"
    );
    assert!(samples[1][0]["cpu_percent"].is_number(), "{top}");

    // The exporter on a port of its choosing; it says which on stderr.
    let mut exporter = Command::new(&ctl)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["exporter", "--listen", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(exporter.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = first
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_owned();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let _ = exporter.kill();
    let _ = exporter.wait();
    assert!(body.starts_with("HTTP/1.1 200 OK\r\n"), "{body}");
    let up = format!("kvmm_up{{domain=\"{}\"}} 1.0", agent.socket.display());
    assert!(
        body.contains(&up) && body.contains("kvmm_processes{") && body.ends_with("# EOF\n"),
        "{body}"
    );

    // MCP: initialize, list the tools, a refused call and a mutating one
    // without its flag.
    let session = [
        json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"test","version":"1"}}}),
        json!({"jsonrpc":"2.0","method":"notifications/initialized"}),
        json!({"jsonrpc":"2.0","id":2,"method":"tools/list"}),
        json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/etc/shadow"}}}),
        json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"exec","arguments":{"command":"true"}}}),
        json!({"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"metrics","arguments":{}}}),
    ];
    let mut mcp = Command::new(&ctl)
        .arg("--socket")
        .arg(&agent.socket)
        .arg("mcp")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = mcp.stdin.take().unwrap();
        for m in &session {
            writeln!(stdin, "{m}").unwrap();
        }
    }
    let out = mcp.wait_with_output().unwrap();
    let replies: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        replies.len(),
        5,
        "one reply per request, none for the notification"
    );
    assert_eq!(replies[0]["result"]["protocolVersion"], "2025-06-18");
    let tools = replies[1]["result"]["tools"].as_array().unwrap();
    assert!(tools
        .iter()
        .all(|t| t["name"] != "exec" && t["inputSchema"]["type"] == "object"));
    assert_eq!(replies[2]["result"]["isError"], true);
    assert!(replies[2]["result"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("policy_denied"));
    assert_eq!(
        replies[3]["result"]["isError"], true,
        "exec without --allow-exec"
    );
    assert_eq!(replies[4]["result"]["isError"], false);
    let audit = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        audit.matches("mcp: audit {").count(),
        3,
        "every tool call audited:\n{audit}"
    );
}

/// `list` says `not answering` for a channel whose socket accepts but
/// where no agent answers, and `--watch` repeats.
#[test]
fn ctl_list_not_answering_and_watch() {
    let ctl = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kvmmanager-agent"))
        .with_file_name("kvmmanager-ctl");
    assert!(
        ctl.exists(),
        "{} is missing: cargo build -p host-client",
        ctl.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let silent = dir.path().join("silent.sock");
    // Accepts connections (the kernel's backlog), never answers.
    let _listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let out = Command::new(&ctl)
        .arg("--socket")
        .arg(&silent)
        .args(["--json", "list", "--vm-timeout", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["state"], "not answering", "{v}");
    assert!(v[0]["error"].is_string(), "{v}");

    let agent = AgentProcess::start();
    let mut watch = Command::new(&ctl)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["--json", "list", "--watch", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let _ = watch.kill();
    let out = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let arrays = serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .filter_map(Result::ok)
        .filter(|v| v[0]["state"] == "up")
        .count();
    assert!(
        arrays >= 2,
        "--watch 1 for 2.5 s printed {arrays} lists:\n{text}"
    );
}
