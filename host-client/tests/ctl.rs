//! `kvmmanager-ctl` run as a program, for what needs no real agent: usage
//! errors, connection errors, channel-xml and completions, and the output and
//! exit codes of the commands against a small scripted fake agent. The
//! commands are covered against the real agent by the workspace's
//! integration suite.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use serde_json::{json, Value};

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvmmanager-ctl"))
        .args(args)
        .env_remove("KVMMANAGER_SOCKET")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("kvmmanager-ctl runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn channel_xml_prints_the_channel_element() {
    let out = ctl(&["channel-xml"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout),
        "<channel type='unix'>\n  <source mode='bind'/>\n  <target type='virtio' name='org.kvmmanager.agent.0'/>\n</channel>\n"
    );
}

#[test]
fn completions_are_generated() {
    let out = ctl(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0));
    let script = text(&out.stdout);
    assert!(script.contains("complete -F"), "{script}");
    assert!(script.contains("channel-xml"));
}

#[test]
fn a_missing_socket_is_exit_3_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let out = ctl(&["--socket", sock.to_str().unwrap(), "ping"]);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("kvmmanager-ctl: error: cannot connect to the agent socket "),
        "{err}"
    );
    assert!(err.contains("channel-xml"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn a_refused_socket_is_exit_3_and_exec_reports_255() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    // A socket file nobody listens on: connection refused.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let out = ctl(&["--socket", sock.to_str().unwrap(), "info"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let out = ctl(&["--socket", sock.to_str().unwrap(), "exec", "--", "true"]);
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
}

#[test]
fn the_socket_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("env.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_kvmmanager-ctl"))
        .arg("ping")
        .env("KVMMANAGER_SOCKET", &sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("env.sock"));
}

#[test]
fn usage_errors_are_exit_2() {
    for args in [
        &["frobnicate"][..],
        &["exec"],
        &["--socket"],
        &["write", "/tmp/x", "--mode", "sideways"],
    ] {
        let out = ctl(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // No target at all.
    let out = ctl(&["ping"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--socket PATH or --domain NAME"));
    // Bad JSON params are refused before connecting.
    let out = ctl(&["--socket", "/nonexistent", "call", "ping", "{nope"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_and_version_succeed_and_document_exit_codes() {
    let out = ctl(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for needle in [
        "Exit status:",
        "3  cannot connect",
        "--domain",
        "channel-xml",
        "Examples:",
    ] {
        assert!(help.contains(needle), "missing {needle:?} in help");
    }
    let out = ctl(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).starts_with("kvmmanager-ctl "));
}

// ---------------------------------------------------------------------------
// A scripted fake agent on a Unix socket (threads, no tokio).

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// 3000 bytes of every byte value.
fn guest_file() -> Vec<u8> {
    (0..3000u32).map(|i| (i * 7 % 256) as u8).collect()
}

fn answer(method: &str, p: &Value) -> Result<Value, Value> {
    let err = |code: i32, kind: &str, msg: &str| {
        Err(json!({"code": code, "message": msg, "data": {"kind": kind}}))
    };
    match method {
        "sync" => Ok(json!({"nonce": p["nonce"]})),
        "ping" => Ok(json!({"pong": true, "timestamp": 5})),
        "get_agent_info" => Ok(json!({
            "name": "kvmmanager-agent", "version": "9.9.9", "protocol_version": 1,
            "platform": "linux", "methods": ["ping", "sync"],
            "limits": {"max_message_size": 65536, "max_response_size": 8388608,
                "max_read_chunk": 1000, "max_file_size": 10485760, "max_exec_output": 1048576,
                "max_command_timeout_seconds": 300, "request_timeout_seconds": 30,
                "max_concurrent_requests": 10}})),
        "get_disk_usage" => Ok(json!({"filesystems": [{"device": "/dev/vda1",
            "mount_point": "/", "fs_type": "ext4", "total_bytes": 1073741824u64,
            "used_bytes": 268435456u64, "free_bytes": 805306368u64, "total_inodes": 0,
            "free_inodes": 0, "read_only": false}]})),
        "exec_command" => {
            let args: Vec<String> = serde_json::from_value(p["args"].clone()).unwrap_or_default();
            let stdin = p["stdin"].as_str().map(unb64).unwrap_or_default();
            let (exit_code, signal, timed_out) = match p["command"].as_str().unwrap() {
                "exit" => (Some(args[0].parse::<i32>().unwrap()), None, false),
                "killed" => (None, Some(9), false),
                "sleep" => (None, Some(9), true),
                _ => return err(-32001, "not_found", "command not found"),
            };
            let mut out = b"out\xff\n".to_vec();
            out.extend_from_slice(&stdin);
            Ok(
                json!({"exit_code": exit_code, "signal": signal, "stdout": b64(&out),
                "stderr": b64(b"err\n"), "encoding": "base64", "stdout_truncated": false,
                "stderr_truncated": false, "timed_out": timed_out, "duration_ms": 3}),
            )
        }
        "file_read" => {
            if p["path"] != "/tmp/data.bin" {
                return err(-32001, "not_found", "no such file");
            }
            let data = guest_file();
            let off = p["offset"].as_u64().unwrap_or(0) as usize;
            let len = p["length"].as_u64().unwrap_or(1000).min(1000) as usize;
            let end = (off + len).min(data.len());
            Ok(
                json!({"content": b64(&data[off..end]), "encoding": "base64", "offset": off,
                "bytes_read": end - off, "eof": end == data.len(), "size": data.len()}),
            )
        }
        "file_write" => err(
            -32000,
            "policy_denied",
            "path is outside allowed_write_paths",
        ),
        _ => err(-32601, "method_not_found", "no such method"),
    }
}

fn serve(stream: UnixStream) {
    let mut w = stream.try_clone().unwrap();
    for line in BufReader::new(stream).split(b'\n') {
        let Ok(mut line) = line else { return };
        // 0xFF discards what came before it.
        if let Some(i) = line.iter().rposition(|&b| b == 0xff) {
            line.drain(..=i);
        }
        let Ok(req) = serde_json::from_slice::<Value>(&line) else {
            continue;
        };
        let reply = match answer(req["method"].as_str().unwrap_or(""), &req["params"]) {
            Ok(r) => json!({"jsonrpc": "2.0", "result": r, "id": req["id"]}),
            Err(e) => json!({"jsonrpc": "2.0", "error": e, "id": req["id"]}),
        };
        let mut text = serde_json::to_vec(&reply).unwrap();
        text.push(b'\n');
        if w.write_all(&text).is_err() {
            return;
        }
    }
}

fn fake_agent(dir: &Path) -> PathBuf {
    let path = dir.join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || serve(s));
        }
    });
    path
}

fn ctl_at(sock: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmmanager-ctl"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn ping_info_and_df_print_tables_or_json() {
    let dir = tempfile::tempdir().unwrap();
    let sock = fake_agent(dir.path());
    let out = ctl_at(&sock, &["ping"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("pong from "));
    let out = ctl_at(&sock, &["info"], b"");
    assert!(text(&out.stdout).contains("kvmmanager-agent 9.9.9"));
    let out = ctl_at(&sock, &["df"], b"");
    let table = text(&out.stdout);
    assert!(table.starts_with("FILESYSTEM"), "{table}");
    assert!(
        table.contains("1.0 GiB  256.0 MiB  768.0 MiB   25%  /"),
        "{table}"
    );
    let out = ctl_at(&sock, &["--json", "df"], b"");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["filesystems"][0]["mount_point"], "/");
}

#[test]
fn exec_passes_output_through_and_exits_like_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let sock = fake_agent(dir.path());
    let out = ctl_at(&sock, &["exec", "--", "exit", "3"], b"");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stdout, b"out\xff\n", "raw bytes, not text");
    assert_eq!(out.stderr, b"err\n");
    let out = ctl_at(
        &sock,
        &["exec", "--stdin", "-", "--", "exit", "0"],
        b"in\x00put",
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"out\xff\nin\x00put");
    assert_eq!(
        ctl_at(&sock, &["exec", "killed"], b"").status.code(),
        Some(137)
    );
    assert_eq!(
        ctl_at(&sock, &["exec", "sleep"], b"").status.code(),
        Some(124)
    );
    let out = ctl_at(&sock, &["exec", "--", "nosuch"], b"");
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr)
        .starts_with("kvmmanager-ctl: error: the agent refused exec_command: command not found"));
    let out = ctl_at(&sock, &["--json", "exec", "--", "exit", "4"], b"");
    assert_eq!(out.status.code(), Some(4));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stdout"], "out\u{fffd}\n");
    assert_eq!(v["encoding"], "utf8");
}

#[test]
fn cat_pull_and_read_copy_files_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let sock = fake_agent(dir.path());
    let out = ctl_at(&sock, &["cat", "/tmp/data.bin"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, guest_file());
    let local = dir.path().join("copy.bin");
    let out = ctl_at(
        &sock,
        &["--json", "pull", "/tmp/data.bin", local.to_str().unwrap()],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bytes"], 3000);
    assert_eq!(std::fs::read(&local).unwrap(), guest_file());
    let out = ctl_at(&sock, &["read", "/tmp/data.bin", "-o", "-"], b"");
    assert_eq!(out.stdout, guest_file());
    let out = ctl_at(&sock, &["cat", "/tmp/missing"], b"");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn policy_refusals_are_exit_1_with_a_config_hint() {
    let dir = tempfile::tempdir().unwrap();
    let sock = fake_agent(dir.path());
    let out = ctl_at(&sock, &["write", "/etc/passwd"], b"x");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("policy_denied") && err.contains("/etc/kvmmanager-agent/config.json"),
        "{err}"
    );
    let out = ctl_at(&sock, &["call", "frobnicate"], b"");
    assert_eq!(out.status.code(), Some(1));
    let out = ctl_at(&sock, &["call", "ping", "{}"], b"");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pong"], true);
}

/// `kvmmanager-ctl exporter` started on a free loopback port; its address
/// is read from the line it prints.
struct Exporter {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Exporter {
    fn start(sock: &Path) -> Exporter {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvmmanager-ctl"))
            .arg("--socket")
            .arg(sock)
            .args(["exporter", "--listen", "127.0.0.1:0", "--vm-timeout", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("kvmmanager-ctl exporter: serving http://")
            .and_then(|rest| rest.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .unwrap();
        Exporter { child, addr }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_exporter_answers_while_another_client_stays_silent() {
    use std::io::Read;
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    // No agent behind the socket: the VM is reported down.
    let exporter = Exporter::start(&dir.path().join("vm.sock"));
    let silent = TcpStream::connect(exporter.addr).unwrap();
    let mut client = TcpStream::connect(exporter.addr).unwrap();
    client
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("kvmm_up{"), "{answer}");
    assert!(answer.trim_end().ends_with("# EOF"), "{answer}");
    // Served before the silent client's own time limit ran out: one client
    // at a time would have answered only after closing it.
    silent.set_nonblocking(true).unwrap();
    let r = (&silent).read(&mut [0u8; 16]);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the silent connection was closed or answered: {r:?}"
    );
}
