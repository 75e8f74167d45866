//! The qemu-ga dialect against the real binary (`--listen qga:unix:PATH`):
//! exact reply shapes, the policy shared with the native methods, and,
//! where Debian's qemu-ga is installed, the same requests answered the same
//! way by it (`qemu-ga -m unix-listen`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::AgentProcess;
use serde_json::{json, Value};

/// A qemu-ga client: JSON objects out, reply lines (raw bytes) in.
struct Qga {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qga {
    fn connect(path: &Path) -> Qga {
        let stream = UnixStream::connect(path).expect("connect to the qemu-ga socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Qga { stream, reader }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next reply line, raw, `\n` included.
    fn recv_raw(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        let n = self.reader.read_until(b'\n', &mut line).unwrap();
        assert!(n > 0, "the agent closed the connection");
        line
    }

    fn recv(&mut self) -> Value {
        let line = self.recv_raw();
        serde_json::from_slice(&line)
            .unwrap_or_else(|e| panic!("bad reply {:?}: {e}", String::from_utf8_lossy(&line)))
    }

    fn exec(&mut self, request: Value) -> Value {
        let mut bytes = serde_json::to_vec(&request).unwrap();
        bytes.push(b'\n');
        self.send_raw(&bytes);
        self.recv()
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        self.exec(json!({"execute": name, "arguments": args}))
    }
}

/// A connection to the agent's qemu-ga socket, once it listens.
fn connect(agent: &AgentProcess) -> Qga {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(agent.qga_socket()).is_err() {
        assert!(
            Instant::now() < deadline,
            "no qemu-ga socket; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Qga::connect(&agent.qga_socket())
}

fn generic(desc: &str) -> Value {
    json!({"error": {"class": "GenericError", "desc": desc}})
}

/// The requests whose replies must be the same from qemu-ga and from us,
/// with the reply qemu-ga gives.
fn dialect_cases() -> Vec<(Value, Value)> {
    vec![
        (
            json!({"execute": "guest-sync", "arguments": {"id": 1234}}),
            json!({"return": 1234}),
        ),
        (
            json!({"execute": "guest-ping", "id": "a"}),
            json!({"return": {}, "id": "a"}),
        ),
        (
            json!({"execute": "guest-ping", "arguments": {}, "id": 7}),
            json!({"return": {}, "id": 7}),
        ),
        (
            json!({"execute": "guest-nonesuch"}),
            json!({"error": {"class": "CommandNotFound", "desc": "The command guest-nonesuch has not been found"}}),
        ),
        (
            json!({"execute": "guest-ping", "arguments": {"x": 1}}),
            generic("Parameter 'x' is unexpected"),
        ),
        (
            json!({"execute": "guest-sync", "arguments": {}}),
            generic("Parameter 'id' is missing"),
        ),
        (
            json!({"execute": "guest-sync", "arguments": {"id": "s"}}),
            generic("Invalid parameter type for 'id', expected: integer"),
        ),
        (
            json!({"foo": 1}),
            generic("QMP input member 'foo' is unexpected"),
        ),
        (
            json!({"execute": "guest-shutdown", "arguments": {"mode": "nope"}}),
            generic("mode is invalid (valid values are: halt|powerdown|reboot"),
        ),
        (
            json!({"execute": "guest-suspend-ram", "arguments": {"x": 1}}),
            generic("Parameter 'x' is unexpected"),
        ),
        (
            json!({"execute": "guest-exec-status", "arguments": {"pid": 999999}}),
            generic("Invalid parameter 'pid'"),
        ),
        (
            json!({"execute": "guest-file-close", "arguments": {"handle": 999999}}),
            generic("handle '999999' has not been found"),
        ),
        (
            json!({"execute": "guest-file-read", "arguments": {"handle": 999999}}),
            generic("handle '999999' has not been found"),
        ),
        (
            json!({"execute": "guest-fsfreeze-status"}),
            json!({"return": "thawed"}),
        ),
    ]
}

#[test]
fn replies_have_qemu_ga_shapes() {
    let agent = AgentProcess::start();
    let mut q = connect(&agent);
    for (request, want) in dialect_cases() {
        assert_eq!(q.exec(request.clone()), want, "{request}");
    }
    // The bytes as qemu-ga writes them.
    q.send_raw(b"{\"execute\":\"guest-ping\",\"id\":[1]}");
    assert_eq!(q.recv_raw(), b"{\"return\": {}, \"id\": [1]}\n");
    // guest-sync-delimited: 0xFF before the reply; a 0xFF from the host
    // drops the partial request before it.
    q.send_raw(b"{\"execute\":\"guest-ping\",\"argu\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":99}}");
    assert_eq!(
        q.recv(),
        generic("JSON parse error, stray '\"argu\u{FFFD}'")
    );
    assert_eq!(q.recv_raw(), b"\xff{\"return\": 99}\n");
    // Input that is not an object: a parse error, and the stream goes on.
    q.send_raw(b"junk\n");
    let r = q.recv();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error"),
        "{r}"
    );
    assert_eq!(q.cmd("guest-ping", json!({})), json!({"return": {}}));
}

#[test]
fn guest_info_lists_every_command_with_its_flags() {
    let agent = AgentProcess::start_with(json!({"blocked_methods": ["exec_command"]}), json!({}));
    let mut q = connect(&agent);
    let info = q.cmd("guest-info", json!({}));
    assert_eq!(info["return"]["version"], env!("CARGO_PKG_VERSION"));
    let commands = info["return"]["supported_commands"].as_array().unwrap();
    let find = |name: &str| {
        commands
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {info}"))
            .clone()
    };
    assert_eq!(
        find("guest-ping"),
        json!({"name": "guest-ping", "enabled": true, "success-response": true})
    );
    assert_eq!(find("guest-shutdown")["success-response"], false);
    assert_eq!(find("guest-exec")["enabled"], false);
    assert_eq!(find("guest-exec-status")["enabled"], false);
    assert_eq!(find("guest-get-time")["enabled"], true);
    for c in commands {
        let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 3, "{c}");
    }
    // A blocked core method is refused in this dialect too, naming the rule,
    // and nothing runs.
    let marker = agent.write_dir().join("ran");
    let r = q.cmd(
        "guest-exec",
        json!({"path": "/usr/bin/touch", "arg": [marker]}),
    );
    let pid = r["return"]["pid"].as_i64().unwrap_or_else(|| panic!("{r}"));
    let status = wait_exited(&mut q, pid);
    assert_eq!(status["error"]["class"], "GenericError", "{status}");
    assert!(
        status["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("blocked_methods"),
        "{status}"
    );
    assert!(!marker.exists());
}

/// Polls `guest-exec-status` until it no longer says `exited: false`.
fn wait_exited(q: &mut Qga, pid: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = q.cmd("guest-exec-status", json!({"pid": pid}));
        if r["return"]["exited"] != false {
            return r;
        }
        assert!(Instant::now() < deadline, "pid {pid} never exited");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn guest_exec_runs_through_the_core_and_keeps_its_result_until_collected() {
    let agent = AgentProcess::start();
    let mut q = connect(&agent);
    // hello\n as input-data, echoed by cat; capture-output in its old
    // boolean form.
    let r = q.cmd(
        "guest-exec",
        json!({"path": "cat", "input-data": "aGVsbG8K", "capture-output": true}),
    );
    let pid = r["return"]["pid"].as_i64().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(r, json!({"return": {"pid": pid}}));
    assert_eq!(
        wait_exited(&mut q, pid),
        json!({"return": {"exited": true, "exitcode": 0, "out-data": "aGVsbG8K", "out-truncated": false}})
    );
    // Collected once, then gone, as in qemu-ga.
    assert_eq!(
        q.cmd("guest-exec-status", json!({"pid": pid})),
        generic("Invalid parameter 'pid'")
    );
    // The newer mode names; stderr only; an exit code.
    let r = q.cmd(
        "guest-exec",
        json!({"path": "sh", "arg": ["-c", "echo out; echo err >&2; exit 3"], "capture-output": "stderr"}),
    );
    let pid = r["return"]["pid"].as_i64().unwrap();
    assert_eq!(
        wait_exited(&mut q, pid),
        json!({"return": {"exited": true, "exitcode": 3, "err-data": "ZXJyCg==", "err-truncated": false}})
    );
    // Bad arguments are refused before anything runs.
    assert_eq!(
        q.cmd(
            "guest-exec",
            json!({"path": "true", "capture-output": "merged"})
        ),
        generic("capture-output 'merged' is not supported by this agent; use 'separated'")
    );
    assert_eq!(
        q.cmd("guest-exec", json!({"path": "true", "env": ["NOEQUALS"]})),
        generic("Parameter 'env' entry \"NOEQUALS\" is not NAME=VALUE")
    );
    assert_eq!(
        q.cmd("guest-exec", json!({"arg": []})),
        generic("Parameter 'path' is missing")
    );
}

#[test]
fn queries_map_onto_the_core_with_qemu_ga_member_names() {
    let agent = AgentProcess::start();
    let mut q = connect(&agent);
    let t = q.cmd("guest-get-time", json!({}));
    assert!(
        t["return"].as_u64().unwrap() > 1_600_000_000_000_000_000,
        "{t}"
    );
    let tz = q.cmd("guest-get-timezone", json!({}));
    assert!(tz["return"]["offset"].is_i64(), "{tz}");
    let host = q.cmd("guest-get-host-name", json!({}));
    assert!(
        !host["return"]["host-name"].as_str().unwrap().is_empty(),
        "{host}"
    );
    let os = q.cmd("guest-get-osinfo", json!({}));
    for key in ["kernel-release", "kernel-version", "machine"] {
        assert!(os["return"][key].is_string(), "{key} in {os}");
    }
    let cpus = q.cmd("guest-get-vcpus", json!({}));
    let cpus = cpus["return"].as_array().unwrap();
    assert!(!cpus.is_empty());
    for c in cpus {
        assert!(
            c["logical-id"].is_u64() && c["online"].is_boolean() && c["can-offline"].is_boolean(),
            "{c}"
        );
    }
    let nics = q.cmd("guest-network-get-interfaces", json!({}));
    let lo = nics["return"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "lo")
        .unwrap_or_else(|| panic!("no lo in {nics}"))
        .clone();
    assert!(lo["ip-addresses"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["ip-address"] == "127.0.0.1"
            && a["ip-address-type"] == "ipv4"
            && a["prefix"] == 8));
    assert!(lo["statistics"]["rx-bytes"].is_u64(), "{lo}");
    assert!(q.cmd("guest-get-users", json!({}))["return"].is_array());
    let info = q.cmd("guest-get-memory-block-info", json!({}));
    let blocks = q.cmd("guest-get-memory-blocks", json!({}));
    // Where the kernel has memory blocks, both answer; where it has none
    // (some containers), both say so.
    if info["return"].is_object() {
        assert!(info["return"]["size"].as_u64().unwrap() > 0, "{info}");
        let first = &blocks["return"][0];
        assert!(
            first["phys-index"].is_u64() && first["online"].is_boolean(),
            "{blocks}"
        );
    } else {
        assert_eq!(info["error"]["class"], "GenericError", "{info}");
        assert_eq!(blocks["error"]["class"], "GenericError", "{blocks}");
    }
    assert!(q.cmd("guest-get-fsinfo", json!({}))["return"].is_array());
    assert_eq!(
        q.cmd("guest-set-time", json!({"time": -1})),
        generic("Time -1 is invalid")
    );
    assert_eq!(
        q.cmd(
            "guest-set-user-password",
            json!({"username": "nobody", "password": "!!", "crypted": false})
        ),
        generic("Parameter 'password' must be base64 of UTF-8 text")
    );
    assert_eq!(
        q.cmd("guest-set-vcpus", json!({"vcpus": [{"logical-id": 0}]})),
        generic("Parameter 'online' is missing")
    );
}

/// Debian's qemu-ga on a local socket, killed (by pid) when dropped.
struct RealQga {
    child: Child,
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
}

impl Drop for RealQga {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn real_qga() -> Option<RealQga> {
    let binary = ["/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(binary) = binary else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but qemu-ga is not installed (apt-get install qemu-guest-agent)"
        );
        eprintln!("qemu-ga is not installed; the comparison with it is skipped");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qga.sock");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let child = Command::new(binary)
        .arg("-m")
        .arg("unix-listen")
        .arg("-p")
        .arg(&socket)
        .arg("-t")
        .arg(&state)
        .arg("-f")
        .arg(dir.path().join("qga.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-ga");
    let real = RealQga {
        child,
        _dir: dir,
        socket,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&real.socket).is_err() {
        assert!(Instant::now() < deadline, "qemu-ga did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(real)
}

#[test]
fn the_same_requests_get_the_same_replies_from_qemu_ga() {
    let Some(real) = real_qga() else { return };
    let agent = AgentProcess::start();
    let mut ours = connect(&agent);
    let mut theirs = Qga::connect(&real.socket);
    for (request, want) in dialect_cases() {
        assert_eq!(theirs.exec(request.clone()), want, "qemu-ga: {request}");
        assert_eq!(ours.exec(request.clone()), want, "ours: {request}");
    }
    // A 0xFF from the host: a parse error naming the cut token, then the
    // delimited reply; byte for byte the same.
    for conn in [&mut ours, &mut theirs] {
        conn.send_raw(b"{\"execute\":\"guest-ping\",\"argu\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":5}}\n\xff");
        assert_eq!(
            conn.recv_raw(),
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\\"argu\\uFFFD'\"}}\n"
        );
        assert_eq!(conn.recv_raw(), b"\xff{\"return\": 5}\n");
        assert_eq!(conn.recv(), generic("JSON parse error, stray '\u{FFFD}'"));
    }
    // The shapes of what both answer (values differ: our zone is the IANA
    // name, qemu-ga's the abbreviation).
    let shape = |v: &Value| -> Vec<(String, &'static str)> {
        let kind = |x: &Value| match x {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        match v {
            Value::Object(m) => m.iter().map(|(k, x)| (k.clone(), kind(x))).collect(),
            other => vec![(String::new(), kind(other))],
        }
    };
    for name in [
        "guest-get-time",
        "guest-get-host-name",
        "guest-fsfreeze-status",
    ] {
        let a = ours.cmd(name, json!({}));
        let b = theirs.cmd(name, json!({}));
        assert_eq!(
            shape(&a["return"]),
            shape(&b["return"]),
            "{name}: {a} vs {b}"
        );
    }
    let a = ours.cmd("guest-get-vcpus", json!({}));
    let b = theirs.cmd("guest-get-vcpus", json!({}));
    assert_eq!(shape(&a["return"][0]), shape(&b["return"][0]), "{a} vs {b}");
    // Every key we give for the OS, qemu-ga gives too.
    let a = ours.cmd("guest-get-osinfo", json!({}));
    let b = theirs.cmd("guest-get-osinfo", json!({}));
    for (k, kind) in shape(&a["return"]) {
        assert!(
            shape(&b["return"]).contains(&(k.clone(), kind)),
            "{k} in {b}"
        );
    }
    // Every command we serve is one qemu-ga knows, with the same
    // success-response flag.
    let a = ours.cmd("guest-info", json!({}));
    let b = theirs.cmd("guest-info", json!({}));
    let theirs_cmds = b["return"]["supported_commands"].as_array().unwrap();
    let ours_cmds = a["return"]["supported_commands"].as_array().unwrap();
    for c in ours_cmds {
        match theirs_cmds.iter().find(|t| t["name"] == c["name"]) {
            Some(t) => assert_eq!(c["success-response"], t["success-response"], "{c} vs {t}"),
            None => assert!(
                NEWER_THAN_PEER.iter().any(|(n, _)| c["name"] == *n),
                "qemu-ga has no {}",
                c["name"]
            ),
        }
    }
    // And every command the peer enables is ours too (it lists
    // guest-get-devices, Windows only, disabled).
    for t in theirs_cmds.iter().filter(|t| t["enabled"] == true) {
        assert!(
            ours_cmds.iter().any(|c| c["name"] == t["name"]),
            "we have no {}",
            t["name"]
        );
    }
}

/// Commands of qemu-ga's current schema newer than the peer on this
/// machine (Debian 12's qemu-ga 7.2), with the version that added them:
/// compared with the schema only.
const NEWER_THAN_PEER: &[(&str, &str)] = &[
    ("guest-network-get-route", "9.1"),
    ("guest-get-load", "10.0"),
];

#[test]
fn guest_file_calls_go_through_the_path_policy() {
    let agent = AgentProcess::start();
    let mut q = connect(&agent);
    let path = agent.write_dir().join("f.txt");
    let r = q.cmd("guest-file-open", json!({"path": path, "mode": "w"}));
    let w = r["return"].as_i64().unwrap_or_else(|| panic!("{r}"));
    // "hello " and "world" (base64), the second cut to its count.
    assert_eq!(
        q.cmd(
            "guest-file-write",
            json!({"handle": w, "buf-b64": "aGVsbG8g"})
        ),
        json!({"return": {"count": 6, "eof": false}})
    );
    assert_eq!(
        q.cmd(
            "guest-file-write",
            json!({"handle": w, "buf-b64": "d29ybGQhIQ==", "count": 5})
        ),
        json!({"return": {"count": 5, "eof": false}})
    );
    assert_eq!(
        q.cmd("guest-file-flush", json!({"handle": w})),
        json!({"return": {}})
    );
    assert_eq!(
        q.cmd("guest-file-read", json!({"handle": w})),
        generic(&format!("handle '{w}' was opened for writing"))
    );
    assert_eq!(
        q.cmd("guest-file-close", json!({"handle": w})),
        json!({"return": {}})
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello world");
    let r = q.cmd("guest-file-open", json!({"path": path}));
    let h = r["return"].as_i64().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(
        q.cmd("guest-file-read", json!({"handle": h, "count": 4})),
        json!({"return": {"count": 4, "buf-b64": "aGVsbA==", "eof": false}})
    );
    assert_eq!(
        q.cmd("guest-file-read", json!({"handle": h})),
        json!({"return": {"count": 7, "buf-b64": "byB3b3JsZA==", "eof": true}})
    );
    assert_eq!(
        q.cmd("guest-file-close", json!({"handle": h})),
        json!({"return": {}})
    );
    assert_eq!(
        q.cmd("guest-file-read", json!({"handle": h})),
        generic(&format!("handle '{h}' has not been found"))
    );
    // Outside the roots: refused by the core's policy, nothing written.
    let outside = agent.dir.path().join("outside.txt");
    let r = q.cmd("guest-file-open", json!({"path": outside, "mode": "w"}));
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(!outside.exists());
    let r = q.cmd("guest-file-open", json!({"path": "/etc/hostname"}));
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert_eq!(
        q.cmd("guest-file-open", json!({"path": path, "mode": "rw"})),
        generic("invalid file open mode 'rw'")
    );
    // r+: reads from the start; a write only at the end (after a seek).
    let r = q.cmd("guest-file-open", json!({"path": path, "mode": "r+"}));
    let h = r["return"].as_i64().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(
        q.cmd("guest-file-read", json!({"handle": h, "count": 5})),
        json!({"return": {"count": 5, "buf-b64": "aGVsbG8=", "eof": false}})
    );
    let r = q.cmd("guest-file-write", json!({"handle": h, "buf-b64": "IQ=="}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("writes only at the end")),
        "{r}"
    );
    assert_eq!(
        q.cmd(
            "guest-file-seek",
            json!({"handle": h, "offset": 0, "whence": "end"})
        ),
        json!({"return": {"position": 11, "eof": true}})
    );
    assert_eq!(
        q.cmd("guest-file-write", json!({"handle": h, "buf-b64": "IQ=="})),
        json!({"return": {"count": 1, "eof": false}})
    );
    q.cmd("guest-file-close", json!({"handle": h}));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello world!");
    // a+: every write appends; reads start at 0 and follow the writes.
    let r = q.cmd("guest-file-open", json!({"path": path, "mode": "a+b"}));
    let h = r["return"].as_i64().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(
        q.cmd("guest-file-write", json!({"handle": h, "buf-b64": "Pw=="})),
        json!({"return": {"count": 1, "eof": false}})
    );
    assert_eq!(
        q.cmd(
            "guest-file-seek",
            json!({"handle": h, "offset": -2, "whence": 2})
        ),
        json!({"return": {"position": 11, "eof": false}})
    );
    assert_eq!(
        q.cmd("guest-file-read", json!({"handle": h})),
        json!({"return": {"count": 2, "buf-b64": "IT8=", "eof": true}})
    );
    q.cmd("guest-file-close", json!({"handle": h}));
    // w+: truncates, then writes and reads back.
    let r = q.cmd("guest-file-open", json!({"path": path, "mode": "w+"}));
    let h = r["return"].as_i64().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    q.cmd("guest-file-write", json!({"handle": h, "buf-b64": "YWJj"}));
    q.cmd(
        "guest-file-seek",
        json!({"handle": h, "offset": 0, "whence": "set"}),
    );
    assert_eq!(
        q.cmd("guest-file-read", json!({"handle": h})),
        json!({"return": {"count": 3, "buf-b64": "YWJj", "eof": true}})
    );
    q.cmd("guest-file-close", json!({"handle": h}));
    // r+ needs the write policy too: /etc/hostname is only readable.
    let r = q.cmd(
        "guest-file-open",
        json!({"path": "/etc/hostname", "mode": "r+"}),
    );
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
}

/// Every member of a reply, recursively: `path` (`a.b`, `[]` for the
/// elements of an array) and the JSON kind of its value.
fn members(v: &Value) -> std::collections::BTreeSet<(String, &'static str)> {
    fn walk(v: &Value, path: String, out: &mut std::collections::BTreeSet<(String, &'static str)>) {
        let kind = match v {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        out.insert((path.clone(), kind));
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(x, p, out);
                }
            }
            Value::Array(a) => {
                for x in a {
                    walk(x, format!("{path}[]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(v, String::new(), &mut out);
    out
}

/// Members one agent gives and the other not, on purpose, by command
/// (PROTOCOL.md, "The qemu-ga dialect", differences): the path and why.
const DIFFERENT_ON_PURPOSE: &[(&str, &str, &str)] = &[
    (
        "guest-get-fsinfo",
        "[].disk[].serial",
        "read from sysfs; qemu-ga asks udev's database, which may have none",
    ),
    (
        "guest-get-disks",
        "[].address.serial",
        "read from sysfs; qemu-ga asks udev's database, which may have none",
    ),
];

/// Read-only commands both agents serve, compared member by member and
/// fact by fact on this machine.
const COMPARED: &[&str] = &[
    "guest-get-host-name",
    "guest-get-osinfo",
    "guest-get-timezone",
    "guest-get-time",
    "guest-get-users",
    "guest-get-vcpus",
    "guest-get-memory-blocks",
    "guest-get-memory-block-info",
    "guest-network-get-interfaces",
    "guest-get-fsinfo",
    "guest-get-disks",
    "guest-get-diskstats",
    "guest-get-cpustats",
    "guest-fsfreeze-status",
];

#[test]
fn every_query_both_serve_has_qemu_ga_s_members_and_facts() {
    let Some(real) = real_qga() else { return };
    let agent = AgentProcess::start();
    let mut ours = connect(&agent);
    let mut theirs = Qga::connect(&real.socket);
    let mut report = Vec::new();
    for name in COMPARED {
        let b = theirs.cmd(name, json!({}));
        let a = ours.cmd(name, json!({}));
        let (Some(a), Some(b)) = (a.get("return"), b.get("return")) else {
            // Both refuse alike (e.g. no memory hotplug here): same class.
            assert_eq!(
                a["error"]["class"], b["error"]["class"],
                "{name}: {a} vs {b}"
            );
            report.push(format!("{name}: both {}", a["error"]["class"]));
            continue;
        };
        let (ma, mb) = (members(a), members(b));
        // What we give, qemu-ga gives with the same kind (when it has any
        // element to show it).
        let listed = |m: &(String, &str)| {
            DIFFERENT_ON_PURPOSE
                .iter()
                .any(|(c, p, _)| c == name && *p == m.0)
        };
        for m in &ma {
            if !mb.contains(m) && !b.as_array().is_some_and(|x| x.is_empty()) && !listed(m) {
                panic!("{name}: we give {m:?}, qemu-ga does not: {a} vs {b}");
            }
        }
        for m in &mb {
            if !ma.contains(m) && !a.as_array().is_some_and(|x| x.is_empty()) && !listed(m) {
                panic!("{name}: qemu-ga gives {m:?}, we do not: {a} vs {b}");
            }
        }
        report.push(format!("{name}: {} members alike", ma.len()));
        facts(name, a, b);
    }
    eprintln!("{}", report.join("\n"));
}

/// The facts both agents must agree on, per command.
fn facts(name: &str, a: &Value, b: &Value) {
    let set = |v: &Value, key: &str| -> std::collections::BTreeSet<String> {
        v.as_array()
            .map(|x| x.iter().map(|e| e[key].to_string()).collect())
            .unwrap_or_default()
    };
    match name {
        "guest-get-host-name"
        | "guest-get-osinfo"
        | "guest-get-memory-block-info"
        | "guest-fsfreeze-status" => assert_eq!(a, b, "{name}"),
        "guest-get-timezone" => assert_eq!(a["offset"], b["offset"], "{name}: {a} vs {b}"),
        "guest-get-time" => {
            let d = a.as_i64().unwrap() - b.as_i64().unwrap();
            assert!(d.abs() < 5_000_000_000, "{name}: {a} vs {b}");
        }
        "guest-get-users" => assert_eq!(set(a, "user"), set(b, "user"), "{name}"),
        // The same CPUs and states (qemu-ga lists them in readdir order).
        "guest-get-vcpus" => {
            let sorted = |v: &Value| {
                let mut x = v.as_array().unwrap().clone();
                x.sort_by_key(|c| c["logical-id"].as_i64());
                x
            };
            assert_eq!(sorted(a), sorted(b), "{name}")
        }
        "guest-get-memory-blocks" => {
            assert_eq!(set(a, "phys-index"), set(b, "phys-index"), "{name}")
        }
        "guest-network-get-interfaces" => {
            assert_eq!(set(a, "name"), set(b, "name"), "{name}");
            for i in a.as_array().unwrap() {
                let t = b
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|t| t["name"] == i["name"])
                    .unwrap();
                assert_eq!(
                    i["hardware-address"], t["hardware-address"],
                    "{name}: {i} vs {t}"
                );
                assert_eq!(
                    set(&i["ip-addresses"], "ip-address"),
                    set(&t["ip-addresses"], "ip-address"),
                    "{name}: {i} vs {t}"
                );
            }
        }
        "guest-get-fsinfo" => {
            assert_eq!(
                set(a, "mountpoint"),
                set(b, "mountpoint"),
                "{name}: {a} vs {b}"
            );
            for f in a.as_array().unwrap() {
                let t = b
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|t| t["mountpoint"] == f["mountpoint"])
                    .unwrap();
                for k in ["name", "type", "total-bytes"] {
                    assert_eq!(f[k], t[k], "{name} {}: {k}", f["mountpoint"]);
                }
                let d = f["used-bytes"].as_i64().unwrap() - t["used-bytes"].as_i64().unwrap();
                assert!(
                    d.abs() < 64 << 20,
                    "{name} {}: used-bytes {f} vs {t}",
                    f["mountpoint"]
                );
            }
        }
        // Every disk qemu-ga lists, we list with the same address and
        // dependencies; we also list block devices without a bus address
        // (zram), which qemu-ga 7.2 leaves out.
        "guest-get-disks" => {
            for t in b.as_array().unwrap() {
                let d = a
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|d| d["name"] == t["name"])
                    .unwrap_or_else(|| panic!("{name}: we have no {}: {a}", t["name"]));
                assert_eq!(
                    (&d["partition"], &d["dependencies"], &d["alias"]),
                    (&t["partition"], &t["dependencies"], &t["alias"]),
                    "{name}: {d} vs {t}"
                );
                let mut addr = d["address"].clone();
                if let Some(o) = addr.as_object_mut() {
                    o.remove("serial");
                }
                assert_eq!(addr, t["address"], "{name}: {d} vs {t}");
            }
            for d in a.as_array().unwrap() {
                if d["address"]["pci-controller"]["domain"] != -1 {
                    assert!(
                        b.as_array().unwrap().iter().any(|t| t["name"] == d["name"]),
                        "{name}: qemu-ga has no {}",
                        d["name"]
                    );
                }
            }
        }
        "guest-get-diskstats" => {
            // Ours leaves out devices that never did I/O; every device we
            // list, qemu-ga lists with the same numbers, and counters
            // taken after its own are not smaller.
            for d in a.as_array().unwrap() {
                let t = b
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|t| t["name"] == d["name"])
                    .unwrap_or_else(|| panic!("{name}: qemu-ga has no {}", d["name"]));
                assert_eq!(
                    (&d["major"], &d["minor"]),
                    (&t["major"], &t["minor"]),
                    "{name}"
                );
                for (k, v) in d["stats"].as_object().unwrap() {
                    if k == "ios-pgr" {
                        continue;
                    }
                    assert!(
                        v.as_u64() >= t["stats"][k].as_u64(),
                        "{name} {} {k}: {v} < {}",
                        d["name"],
                        t["stats"][k]
                    );
                }
            }
        }
        "guest-get-cpustats" => {
            assert_eq!(set(a, "cpu"), set(b, "cpu"), "{name}");
            for c in a.as_array().unwrap() {
                let t = b
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|t| t["cpu"] == c["cpu"])
                    .unwrap();
                for k in ["user", "system", "idle"] {
                    // Taken after qemu-ga's, in the same unit (ms).
                    let (x, y) = (c[k].as_u64().unwrap(), t[k].as_u64().unwrap());
                    assert!(
                        x >= y && x - y < 60_000,
                        "{name} cpu {} {k}: {x} vs {y}",
                        c["cpu"]
                    );
                }
            }
        }
        _ => unreachable!("{name} has no facts"),
    }
}

#[test]
fn blank_ssh_keys_are_ignored_as_libvirt_sends_one() {
    // `virsh set-user-sshkeys --file` splits the file at newlines: its last
    // newline gives a blank key, which qemu-ga ignores. The blank entries
    // never reach the core's key check: the key list is valid and what
    // fails is the user lookup.
    let agent = AgentProcess::start();
    let mut q = connect(&agent);
    let key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDWgPSS9orBb0aATbjX0a3Rlh+phq2fU/v88KhnlgkEm one@kvmm";
    for name in [
        "guest-ssh-add-authorized-keys",
        "guest-ssh-remove-authorized-keys",
    ] {
        let r = q.cmd(
            name,
            json!({"username": "no-such-user-kvmm", "keys": [key, "", "  "]}),
        );
        let desc = r["error"]["desc"].as_str().unwrap_or_default().to_owned();
        assert!(desc.contains("no user"), "{name}: {r}");
        assert!(!desc.contains("refused"), "{name}: {r}");
    }
}

#[test]
fn guest_names_in_the_method_lists_govern_the_dialect_only() {
    let agent = AgentProcess::start_with(
        json!({"blocked_methods": ["guest-exec", "guest-get-osinfo"]}),
        json!({}),
    );
    let mut q = connect(&agent);
    assert_eq!(
        q.cmd("guest-exec", json!({"path": "/bin/true"})),
        generic("guest-exec is disabled by the agent's configuration; remove it from security.blocked_methods to allow it")
    );
    let r = q.cmd("guest-get-osinfo", json!({}));
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    // Its native twin and the other commands on it are served.
    assert!(q.cmd("guest-get-host-name", json!({}))["return"].is_object());
    let mut c = agent.connect();
    let v = c.call(1, "exec_command", json!({"command": "/bin/true"}));
    assert_eq!(v["result"]["exit_code"], 0, "{v}");
    let info = q.cmd("guest-info", json!({}));
    let enabled = |name: &str| {
        info["return"]["supported_commands"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()["enabled"]
            .clone()
    };
    assert_eq!(enabled("guest-exec"), json!(false));
    assert_eq!(enabled("guest-exec-status"), json!(true));
    assert_eq!(enabled("guest-get-host-name"), json!(true));
    // allowed_methods with guest-* names: only those in the dialect.
    let agent = AgentProcess::start_with(
        json!({"allowed_methods": ["get_system_info", "guest-get-host-name"]}),
        json!({}),
    );
    let mut q = connect(&agent);
    assert!(q.cmd("guest-get-host-name", json!({}))["return"].is_object());
    assert!(q.cmd("guest-ping", json!({}))["return"].is_object());
    assert_eq!(
        q.cmd("guest-get-osinfo", json!({})),
        generic("guest-get-osinfo is disabled by the agent's configuration; add it to security.allowed_methods to allow it")
    );
}
