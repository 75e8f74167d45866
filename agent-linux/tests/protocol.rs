//! The real binary over a Unix socket: framing, JSON-RPC semantics,
//! concurrency and life cycle.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use common::{error_kind, AgentProcess};
use serde_json::{json, Value};

#[test]
fn ping_by_hand_like_socat() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    // What `echo ... | socat - UNIX-CONNECT:` does: write, half-close, read.
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":1}\n");
    c.stream.shutdown(Shutdown::Write).unwrap();
    let out = c.read_to_end();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["result"]["pong"], true);
    assert_eq!(v["id"], 1);
}

#[test]
fn resync_byte_and_sync_discard_stale_input() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    // A partial request left by an earlier host, then 0xFF, then sync.
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"pi");
    c.send_raw(
        b"\xff{\"jsonrpc\":\"2.0\",\"method\":\"sync\",\"params\":{\"nonce\":77},\"id\":5}\n",
    );
    let r = c.recv();
    assert_eq!(r["result"]["nonce"], 77);
    assert_eq!(r["id"], 5);
}

#[test]
fn oversized_line_is_refused_and_input_is_dropped_until_resync() {
    let agent = AgentProcess::start_with(json!({}), json!({"max_message_size_kb": 1}));
    let mut c = agent.connect();
    let big = format!(
        "{{\"jsonrpc\":\"2.0\",\"method\":\"file_write\",\"params\":{{\"path\":\"{}/x\",\"content\":\"{}\"}},\"id\":1}}\n",
        agent.write_dir().display(),
        "a".repeat(4000)
    );
    c.send_raw(big.as_bytes());
    let r = c.recv();
    assert_eq!(error_kind(&r), "message_too_large");
    assert_eq!(r["id"], Value::Null);
    assert_eq!(r["error"]["code"], -32007);
    // Nothing of it was acted on.
    assert!(!agent.write_dir().join("x").exists());
    // It may have announced an attachment, so the input up to the next
    // 0xFF is dropped (PROTOCOL.md, "Framing"): the first ping is never
    // answered, the one after the resync byte is.
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":2}\n\xff");
    let r = c.call(3, "ping", json!({}));
    assert_eq!(r["result"]["pong"], true);
}

#[test]
fn json_rpc_errors_and_batches() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    c.send_raw(b"this is not json\n");
    let r = c.recv();
    assert_eq!(r["error"]["code"], -32700);
    assert_eq!(r["id"], Value::Null);
    c.send_raw(b"[]\n");
    assert_eq!(c.recv()["error"]["code"], -32600);
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":\"abc\"}\n");
    assert_eq!(c.recv()["id"], "abc");
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":1.50}\n");
    // Ids are echoed byte for byte: read the raw line.
    let line = c.recv_line();
    assert!(line.contains("\"id\":1.50"), "{line}");
}

#[test]
fn notifications_are_not_answered() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\"}\n");
    let r = c.call(9, "ping", json!({}));
    assert_eq!(r["id"], 9);
}

#[test]
fn a_batch_gets_an_array() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    c.send_raw(b"[{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":1},{\"jsonrpc\":\"2.0\",\"method\":\"nope\",\"id\":2}]\n");
    let r = c.recv();
    let arr = r.as_array().expect("an array");
    assert_eq!(arr.len(), 2);
    assert!(arr
        .iter()
        .any(|x| x["id"] == 1 && x["result"]["pong"] == true));
    assert!(arr
        .iter()
        .any(|x| x["id"] == 2 && x["error"]["code"] == -32601));
}

#[test]
fn several_clients_at_once() {
    let agent = AgentProcess::start();
    let mut conns: Vec<_> = (0..8).map(|_| agent.connect()).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(&json!({"jsonrpc":"2.0","method":"ping","id":i}));
    }
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(c.recv()["id"], i);
    }
}

#[test]
fn sigterm_stops_cleanly() {
    let mut agent = AgentProcess::start();
    let mut c = agent.connect();
    assert_eq!(c.call(1, "ping", json!({}))["result"]["pong"], true);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "agent did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        agent.log()
    );
    assert!(!agent.socket.exists(), "socket file left behind");
    let _ = c.stream.flush();
}

#[test]
fn check_config_reports_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.json");
    std::fs::write(&path, r#"{"log_levl":"info"}"#).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvmmanager-agent"))
        .args(["--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log_levl"), "{err}");
    std::fs::write(&path, r#"{"log_level":"info"}"#).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvmmanager-agent"))
        .args(["--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
