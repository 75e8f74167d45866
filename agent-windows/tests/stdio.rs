//! Runs the real binary in `--stdio` mode and talks to it over pipes.

use std::io::Write;
use std::process::{Command, Stdio};

use agent_common::jsonrpc::parse_response;
use agent_common::methods::{AgentInfo, SyncResult};

#[test]
fn stdio_mode_answers_requests_in_order_and_exits_at_eof() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmmanager-agent-windows"))
        .arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut stdin = child.stdin.take().expect("a stdin pipe");
    stdin
        .write_all(
            b"\xff{\"jsonrpc\":\"2.0\",\"method\":\"sync\",\"params\":{\"nonce\":99},\"id\":1}\n\
              {\"jsonrpc\":\"2.0\",\"method\":\"get_agent_info\",\"id\":\"info\"}\n\
              {\"jsonrpc\":\"2.0\",\"method\":\"file_write\",\"params\":{\"path\":\"C:\\\\x\",\"content\":\"\"},\"id\":3}\n",
        )
        .expect("write requests");
    drop(stdin);
    let out = child.wait_with_output().expect("the binary exits");
    assert!(out.status.success(), "exit status {}", out.status);
    let lines: Vec<&[u8]> = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 3, "{}", String::from_utf8_lossy(&out.stdout));

    let sync: SyncResult = parse_response(lines[0]).unwrap().into_result().unwrap();
    assert_eq!(sync.nonce, 99);
    let info = parse_response(lines[1]).unwrap();
    assert_eq!(info.id.as_raw(), "\"info\"");
    let info: AgentInfo = info.into_result().unwrap();
    assert_eq!(info.platform, "windows");
    let write = parse_response(lines[2]).unwrap();
    assert_eq!(write.outcome.unwrap_err().code, -32008);
}

// On Windows, no arguments starts the service instead.
#[cfg(not(windows))]
#[test]
fn without_arguments_on_linux_it_explains_and_fails() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvmmanager-agent-windows"))
        .output()
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(r"\\.\Global\org.kvmmanager.agent.0"), "{err}");
}
