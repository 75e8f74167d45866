//! Helpers for the integration tests: start the real `kvmmanager-agent`
//! binary on a Unix socket in a temp dir, talk raw JSON lines to it.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running agent; killed (by pid) when dropped.
pub struct AgentProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl AgentProcess {
    /// Starts the agent with a config whose roots live in the temp dir:
    /// `<dir>/read` (readable), `<dir>/write` (writable, also readable).
    pub fn start_with(extra_security: Value, top: Value) -> AgentProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let read = dir.path().join("read");
        let write = dir.path().join("write");
        std::fs::create_dir_all(&read).unwrap();
        std::fs::create_dir_all(&write).unwrap();
        let mut security = serde_json::json!({
            "allowed_read_paths": [read, write],
            "allowed_write_paths": [write],
            "command_whitelist": null,
            "max_file_size_mb": 200,
            "max_command_timeout_seconds": 60
        });
        merge(&mut security, extra_security);
        let mut config = serde_json::json!({
            "log_level": "debug",
            "request_timeout_seconds": 30,
            "security": security
        });
        merge(&mut config, top);
        let config_path = dir.path().join("config.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let socket = dir.path().join("agent.sock");
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kvmmanager-agent"))
            .arg("--foreground")
            .arg("--config")
            .arg(&config_path)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--listen")
            .arg(format!(
                "qga:unix:{}",
                dir.path().join("qga.sock").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kvmmanager-agent");
        let agent = AgentProcess { child, dir, socket };
        agent.wait_ready();
        agent
    }

    pub fn start() -> AgentProcess {
        Self::start_with(serde_json::json!({}), serde_json::json!({}))
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent did not listen in time; log:\n{}", self.log());
    }

    pub fn read_dir(&self) -> PathBuf {
        self.dir.path().join("read")
    }

    pub fn write_dir(&self) -> PathBuf {
        self.dir.path().join("write")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn connect(&self) -> Conn {
        Conn::connect(&self.socket)
    }

    /// The socket serving the qemu-ga dialect (`--listen qga:unix:PATH`).
    pub fn qga_socket(&self) -> PathBuf {
        self.dir.path().join("qga.sock")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn merge(base: &mut Value, extra: Value) {
    if let (Value::Object(b), Value::Object(e)) = (base, extra) {
        for (k, v) in e {
            b.insert(k, v);
        }
    }
}

/// A raw line connection.
pub struct Conn {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    pub fn connect(path: &Path) -> Conn {
        let stream = UnixStream::connect(path).expect("connect to the agent socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Conn { stream, reader }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send(&mut self, v: &Value) {
        let mut line = serde_json::to_vec(v).unwrap();
        line.push(b'\n');
        self.send_raw(&line);
    }

    /// The next reply line, raw (empty lines, such as the one before a
    /// `sync` reply, are skipped as a host's codec does).
    pub fn recv_line(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read a reply");
            assert!(n > 0, "the agent closed the connection");
            if line != "\n" {
                return line;
            }
        }
    }

    pub fn recv(&mut self) -> Value {
        let line = self.recv_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
    }

    /// Sends a request with `id` and returns its reply (other replies first
    /// are an error).
    pub fn call(&mut self, id: u64, method: &str, params: Value) -> Value {
        self.send(&serde_json::json!({"jsonrpc":"2.0","method":method,"params":params,"id":id}));
        let r = self.recv();
        assert_eq!(r["id"], id, "reply {r}");
        r
    }

    /// The next `len` raw bytes (an attachment after a reply line).
    pub fn recv_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.reader
            .read_exact(&mut buf)
            .expect("read an attachment");
        buf
    }

    /// Reads until EOF, returning every remaining byte.
    pub fn read_to_end(mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = self.reader.read_to_end(&mut out);
        out
    }
}

/// The `data.kind` of an error reply, or panics showing the reply.
pub fn error_kind(reply: &Value) -> String {
    reply["error"]["data"]["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error reply, got {reply}"))
        .to_owned()
}

/// A `kB` field (`VmRSS`, `VmHWM`) of `/proc/<pid>/status`; `pid` may be `self`.
pub fn status_kb(pid: &str, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// A 1 MiB file in the agent's read root, for floods of `file_read`.
pub fn flood_file(agent: &AgentProcess) -> PathBuf {
    let path = agent.read_dir().join("big.bin");
    std::fs::write(&path, vec![0xa5u8; 1 << 20]).unwrap();
    path
}

/// Requests that make the largest replies the default policy allows
/// without a command: 1 MiB `file_read`s (base64 and attachment), then
/// a long run of pings.
pub fn flood(path: &str) -> Vec<u8> {
    let mut wire = Vec::new();
    for i in 0..400u64 {
        let encoding = if i % 2 == 0 { "base64" } else { "attachment" };
        let req = serde_json::json!({"jsonrpc":"2.0","method":"file_read","id":i,
            "params":{"path":path,"length":1048576,"encoding":encoding}});
        wire.extend(serde_json::to_vec(&req).unwrap());
        wire.push(b'\n');
    }
    for i in 0..220_000u64 {
        wire.extend(format!("{{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":{i}}}\n").bytes());
    }
    wire
}

/// Writes as much of `wire` as the agent takes, until it has taken nothing
/// for `stall` (it stopped reading) or `limit` has passed. Returns the
/// bytes written.
pub fn push_until_stalled(
    stream: &mut UnixStream,
    wire: &[u8],
    stall: Duration,
    limit: Duration,
) -> usize {
    stream.set_nonblocking(true).unwrap();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut sent = 0;
    while sent < wire.len() && started.elapsed() < limit && last_progress.elapsed() < stall {
        match stream.write(&wire[sent..]) {
            Ok(n) => {
                sent += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("writing the flood failed: {e}"),
        }
    }
    stream.set_nonblocking(false).unwrap();
    sent
}

impl AgentProcess {
    /// Kills the agent with SIGKILL (by its pid) and reaps it.
    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL the agent");
        self.child.wait().expect("reap the agent");
    }

    /// Starts the agent again on the same config, socket and log (appended),
    /// after [`AgentProcess::sigkill`].
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        self.child = Command::new(env!("CARGO_BIN_EXE_kvmmanager-agent"))
            .arg("--foreground")
            .arg("--config")
            .arg(self.dir.path().join("config.json"))
            .arg("--listen")
            .arg(format!("unix:{}", self.socket.display()))
            .arg("--listen")
            .arg(format!("qga:unix:{}", self.qga_socket().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("restart kvmmanager-agent");
        self.wait_ready();
    }
}

/// Names in `dir` that look like staging files (`.<name>.kvmtmp-<hex>`).
pub fn staging_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.contains(".kvmtmp-"))
        .collect();
    names.sort();
    names
}
