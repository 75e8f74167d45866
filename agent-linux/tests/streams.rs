//! Streams against the real agent binary over a Unix socket: streamed
//! commands on pipes and on a pseudo-terminal through the host library,
//! credit and resets on the raw wire, a stalled stream that stalls only
//! itself, and the session's end taking its commands with it (issue 15).

mod common;

use std::time::{Duration, Instant};

use common::{error_kind, AgentProcess};
use host_client::{Client, ExecRequest, Pty};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Appends `text` to the file at `path`, as a logging program would.
fn append(path: &std::path::Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new("sh", ["-c", script])
}

/// Reads `r` until `needle` shows up (or fails after 20 s), returning all.
async fn read_until(r: &mut host_client::StreamReader, needle: &str) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, r.read_chunk())
            .await
            .unwrap_or_else(|_| panic!("{needle:?} did not show; saw {seen:?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("end of stream before {needle:?}; saw {seen:?}"));
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_to_stdout_round_trips_megabytes_intact_with_the_exit_status() {
    let agent = AgentProcess::start();
    let client = Client::connect(&agent.socket).await.unwrap();
    let run = client
        .exec_start(ExecRequest::new("cat", Vec::<String>::new()))
        .await
        .unwrap();
    let (mut stdin, mut stdout) = (run.stdin, run.stdout);
    // 8 MiB of a pattern that shows reordering or loss.
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        stdin.write_all(&data).await.unwrap();
        stdin.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stdout.read_to_end(&mut got)).await;
    let log = agent.log();
    assert!(
        read.is_ok(),
        "stuck after {} bytes; agent log ends:\n{}",
        got.len(),
        &log[log.len().saturating_sub(3000)..]
    );
    writer.await.unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the output differs from the input");
    let exit = run.control.wait().await.unwrap();
    assert_eq!(
        (exit.exit_code, exit.signal, exit.timed_out),
        (Some(0), None, false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stderr_apart_or_merged_and_the_exit_code() {
    let agent = AgentProcess::start();
    let client = Client::connect(&agent.socket).await.unwrap();
    let mut req = sh("echo out; echo err >&2; exit 3");
    req.separate_stderr = true;
    let mut run = client.exec_start(req).await.unwrap();
    let mut out = String::new();
    run.stdout.read_to_string(&mut out).await.unwrap();
    let mut err = String::new();
    run.stderr
        .as_mut()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    assert_eq!(run.control.wait().await.unwrap().exit_code, Some(3));

    let mut run = client
        .exec_start(sh("echo out; echo err >&2"))
        .await
        .unwrap();
    assert!(run.stderr.is_none());
    let mut both = String::new();
    run.stdout.read_to_string(&mut both).await.unwrap();
    assert_eq!(both, "out\nerr\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_session_follows_resizes_and_returns_the_exit_status() {
    let agent = AgentProcess::start_with(json!({}), json!({"shell_command": "sh"}));
    let client = Client::connect(&agent.socket).await.unwrap();
    let req = ExecRequest {
        pty: Some(Pty {
            rows: 24,
            cols: 80,
            term: Some("vt100".into()),
        }),
        ..ExecRequest::default()
    };
    let mut run = client.exec_start(req).await.unwrap();
    run.stdin
        .write_all(b"tty; echo T=$TERM; stty size\n")
        .await
        .unwrap();
    let seen = read_until(&mut run.stdout, "24 80").await;
    assert!(seen.contains("/dev/pts/"), "{seen}");
    assert!(seen.contains("T=vt100"), "{seen}");
    run.control.resize(30, 100).await.unwrap();
    run.stdin.write_all(b"stty size\n").await.unwrap();
    read_until(&mut run.stdout, "30 100").await;
    run.stdin.write_all(b"exit 5\n").await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(20), run.control.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.exit_code, Some(5));
    // A command without a terminal cannot be resized.
    let pipes = client.exec_start(sh("sleep 5")).await.unwrap();
    let e = pipes.control.resize(10, 10).await.unwrap_err();
    assert!(e.to_string().contains("no terminal"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_and_time_limits_end_commands() {
    let agent = AgentProcess::start();
    let client = Client::connect(&agent.socket).await.unwrap();
    let run = client.exec_start(sh("exec sleep 100")).await.unwrap();
    run.control.signal("TERM").await.unwrap();
    let exit = run.control.wait().await.unwrap();
    assert_eq!((exit.exit_code, exit.signal), (None, Some(15)));
    let e = run.control.signal("NOPE").await.unwrap_err();
    assert!(e.to_string().contains("unknown signal"), "{e}");

    let mut req = sh("exec sleep 100");
    req.timeout_seconds = Some(1);
    let run = client.exec_start(req).await.unwrap();
    let exit = run.control.wait().await.unwrap();
    assert!(exit.timed_out, "{exit:?}");
    assert_eq!(exit.signal, Some(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_stalls_only_itself_and_the_agent_stays_small() {
    let agent = AgentProcess::start();
    let client = Client::connect(&agent.socket).await.unwrap();
    // Endless output nobody reads.
    let stalled = client
        .exec_start(ExecRequest::new("yes", ["stalled"]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = common::status_kb(&agent.pid().to_string(), "VmRSS");
    // Others still flow, and ping answers at once.
    for i in 0..20 {
        let started = Instant::now();
        client.ping().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "ping took {:?}",
            started.elapsed()
        );
        let mut run = client
            .exec_start(sh(&format!("head -c 300000 /dev/zero; echo {i}")))
            .await
            .unwrap();
        let mut out = Vec::new();
        run.stdout.read_to_end(&mut out).await.unwrap();
        assert_eq!(out.len(), 300_000 + format!("{i}\n").len());
        assert_eq!(run.control.wait().await.unwrap().exit_code, Some(0));
    }
    let rss_after = common::status_kb(&agent.pid().to_string(), "VmRSS");
    // The stalled stream holds one window on the host and one chunk here.
    assert!(
        rss_after < rss_before + 8 * 1024,
        "the agent grew from {rss_before} kB to {rss_after} kB"
    );
    // The stalled stream was only stalled: it still delivers.
    let mut stdout = stalled.stdout;
    let seen = read_until(&mut stdout, "stalled\nstalled\n").await;
    assert!(seen.starts_with("stalled\n"), "{}", &seen[..40]);
    stalled.control.signal("KILL").await.unwrap();
}

#[test]
fn the_raw_wire_credit_violations_reset_and_the_session_end_kills() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    let r = c.call(
        1,
        "exec_start",
        json!({"command":"sh","args":["-c","exec sleep 1000"],"stream":9,"window":4}),
    );
    let pid = r["result"]["pid"].as_u64().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(r["result"]["window"], 256 * 1024, "{r}");
    // The same id again is refused.
    let r = c.call(2, "exec_start", json!({"command":"true","stream":9}));
    assert_eq!(error_kind(&r), "already_exists", "{r}");
    // Messages for unknown streams are refused when sent as requests.
    let r = c.call(3, "stream_credit", json!({"stream":77,"bytes":1}));
    assert_eq!(error_kind(&r), "not_found", "{r}");
    let r = c.call(4, "exec_start", json!({"stream":10}));
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("command is required"),
        "{r}"
    );
    // More than the window: the agent resets the stream.
    let data = vec![b'x'; 256 * 1024 + 1];
    let crc = agent_common::attachment_crc32(&data);
    let mut line = serde_json::to_vec(&json!({"jsonrpc":"2.0","method":"stream_data",
        "params":{"stream":9},"attachment":data.len(),"attachment_crc32":crc}))
    .unwrap();
    line.push(b'\n');
    c.send_raw(&line);
    c.send_raw(&data);
    let reset = c.recv();
    assert_eq!(reset["method"], "stream_reset", "{reset}");
    assert_eq!(reset["params"]["reason"], "flow_control", "{reset}");
    // The reset kills the command, which reports its end.
    let exit = c.recv();
    assert_eq!(exit["method"], "exec_exit", "{exit}");
    assert_eq!(exit["params"]["signal"], 9, "{exit}");
    // A command of a session that ends is killed.
    let r = c.call(
        5,
        "exec_start",
        json!({"command":"sleep","args":["1000"],"stream":11}),
    );
    let pid2 = r["result"]["pid"].as_u64().unwrap_or_else(|| panic!("{r}"));
    drop(c);
    let gone = |pid: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie about to be reaped.
            if stat.is_empty() || stat.contains(") Z") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    assert!(gone(pid), "the reset command {pid} still runs");
    assert!(gone(pid2), "the command {pid2} outlived its session");
}

/// `kvmmanager-ctl` beside the agent (built by `cargo test --workspace`,
/// or `cargo build -p host-client`).
fn ctl(agent: &AgentProcess, args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let ctl = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kvmmanager-agent"))
        .with_file_name("kvmmanager-ctl");
    assert!(
        ctl.exists(),
        "{} is missing: build host-client first",
        ctl.display()
    );
    let mut child = std::process::Command::new(ctl)
        .arg("--socket")
        .arg(&agent.socket)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn ctl_exec_stream_and_shell_pass_bytes_and_exit_statuses() {
    let agent = AgentProcess::start();
    let out = ctl(
        &agent,
        &[
            "exec",
            "--stream",
            "--",
            "sh",
            "-c",
            "cat; echo err >&2; exit 4",
        ],
        b"piped through\n",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "piped through\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(4));
    // Killed by a signal: 128 + N.
    let out = ctl(
        &agent,
        &["exec", "--stream", "--", "sh", "-c", "kill -TERM $$"],
        b"",
    );
    assert_eq!(out.status.code(), Some(143), "{out:?}");
    // Not on a terminal here: no raw mode, the default size.
    let out = ctl(
        &agent,
        &["shell", "--", "sh", "-c", "stty size; exit 3"],
        b"",
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("24 80"),
        "{out:?}"
    );
    // A refused command is an error of kvmmanager-ctl's own.
    let agent = AgentProcess::start_with(json!({"command_whitelist": ["true"]}), json!({}));
    let out = ctl(&agent, &["shell"], b"");
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("whitelist"),
        "{out:?}"
    );
}

/// A TCP service on loopback standing in for one inside the guest: it
/// answers each connection with `size` bytes of a pattern, then echoes
/// what it reads until the peer closes.
fn tcp_service(size: usize) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
                if conn.write_all(&data).is_err() {
                    return;
                }
                let mut buf = [0u8; 65536];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_carry_many_connections_and_report_refusals() {
    let size = 3 << 20;
    let port = tcp_service(size);
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let agent = AgentProcess::start_with(
        json!({"allowed_forwards": [format!("127.0.0.1:{port}"), format!("127.0.0.1:{closed_port}")]}),
        json!({}),
    );
    let client = Client::connect(&agent.socket).await.unwrap();
    let expected: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = client.clone();
        let expected = expected.clone();
        tasks.push(tokio::spawn(async move {
            let mut f = client.forward_open("127.0.0.1", port).await.unwrap();
            let mut got = vec![0u8; size];
            f.reader.read_exact(&mut got).await.unwrap();
            assert!(got == expected, "connection {i}: the download differs");
            let hello = format!("hello {i}\n");
            f.writer.write_all(hello.as_bytes()).await.unwrap();
            f.writer.shutdown().await.unwrap();
            let mut echo = String::new();
            f.reader.read_to_string(&mut echo).await.unwrap();
            assert_eq!(echo, hello);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let e = client
        .forward_open("127.0.0.1", closed_port)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    let e = client.forward_open("127.0.0.1", 22).await.unwrap_err();
    assert!(e.is_policy_denied(), "{e}");
    let e = client.forward_open("localhost", port).await.unwrap_err();
    assert!(e.to_string().contains("IP address"), "{e}");
    // Off by default.
    let plain = AgentProcess::start();
    let client = Client::connect(&plain.socket).await.unwrap();
    assert!(client
        .forward_open("127.0.0.1", port)
        .await
        .unwrap_err()
        .is_policy_denied());
}

#[test]
fn ctl_forward_listens_and_forwards_each_connection() {
    use std::io::{BufRead, Read, Write};
    let port = tcp_service(100_000);
    let agent = AgentProcess::start_with(
        json!({"allowed_forwards": [format!("127.0.0.1:{port}")]}),
        json!({}),
    );
    let ctl = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kvmmanager-agent"))
        .with_file_name("kvmmanager-ctl");
    let mut child = std::process::Command::new(ctl)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["forward", &format!("0:127.0.0.1:{port}")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let local: std::net::SocketAddr = line
        .split_whitespace()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(local).unwrap();
        let mut got = vec![0u8; 100_000];
        s.read_exact(&mut got).unwrap();
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 253) as u8));
        s.write_all(b"ping\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut echo = String::new();
        s.read_to_string(&mut echo).unwrap();
        assert_eq!(echo, "ping\n");
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_log_tails_filters_and_survives_rotation_and_truncation() {
    let agent = AgentProcess::start();
    let path = agent.read_dir().join("app.log");
    std::fs::write(
        &path,
        "old 1\nerror old 2\nold 3\nerror old 4\nerror old 5\n",
    )
    .unwrap();
    let client = Client::connect(&agent.socket).await.unwrap();
    let p = path.to_str().unwrap();
    let mut all = client.follow_log(p, Some(2), None).await.unwrap();
    let mut errors = client.follow_log(p, Some(2), Some("error")).await.unwrap();
    assert_eq!(
        read_until(&mut all, "old 5\n").await,
        "error old 4\nerror old 5\n"
    );
    assert_eq!(
        read_until(&mut errors, "old 5\n").await,
        "error old 4\nerror old 5\n"
    );
    // A line written in two pieces arrives whole.
    append(&path, "new 6\nerror ");
    tokio::time::sleep(Duration::from_millis(600)).await;
    append(&path, "new 7\n");
    assert_eq!(
        read_until(&mut all, "new 7\n").await,
        "new 6\nerror new 7\n"
    );
    assert_eq!(read_until(&mut errors, "new 7\n").await, "error new 7\n");
    // Rotated: renamed away, a new file in its place.
    std::fs::rename(&path, agent.read_dir().join("app.log.1")).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    std::fs::write(&path, "rotated 8\nerror rotated 9\n").unwrap();
    assert_eq!(
        read_until(&mut all, "rotated 9\n").await,
        "rotated 8\nerror rotated 9\n"
    );
    assert_eq!(
        read_until(&mut errors, "rotated 9\n").await,
        "error rotated 9\n"
    );
    // Truncated: read again from its start.
    std::fs::write(&path, "").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    append(&path, "after truncation 10\n");
    assert_eq!(read_until(&mut all, "10\n").await, "after truncation 10\n");
    // Outside the read roots, and a missing file: refused at once.
    let e = client
        .follow_log("/etc/shadow", None, None)
        .await
        .unwrap_err();
    assert!(e.is_policy_denied(), "{e}");
    let missing = agent.read_dir().join("nope.log");
    let e = client
        .follow_log(missing.to_str().unwrap(), None, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nope.log"), "{e}");
}

#[test]
fn ctl_logs_follow_prints_the_last_lines_then_new_ones() {
    use std::io::BufRead;
    let agent = AgentProcess::start();
    let path = agent.read_dir().join("svc.log");
    std::fs::write(&path, "a\nb\nc\n").unwrap();
    let ctl = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kvmmanager-agent"))
        .with_file_name("kvmmanager-ctl");
    let mut child = std::process::Command::new(ctl)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["logs", "-f", "-n", "2", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut seen = Vec::new();
    for text in ["b\n", "c\n"] {
        line.clear();
        out.read_line(&mut line).unwrap();
        seen.push(line.clone());
        assert_eq!(line, text, "{seen:?}");
    }
    append(&path, "d\n");
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "d\n");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_forward_without_closing_it_lets_the_agent_go() {
    // A service that sends ten bytes and hangs up: the agent's side of each
    // stream closes, the host's never does.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = std::io::Write::write_all(&mut conn, b"0123456789");
        }
    });
    let agent = AgentProcess::start_with(
        json!({"allowed_forwards": [format!("127.0.0.1:{port}")]}),
        json!({}),
    );
    let client = Client::connect(&agent.socket).await.unwrap();
    // More forwards than a connection may have streams open at once: each
    // dropped one must free its stream on the agent.
    for _ in 0..(agent_common::methods::MAX_STREAMS + 8) {
        let mut f = client.forward_open("127.0.0.1", port).await.unwrap();
        let mut all = Vec::new();
        f.reader.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"0123456789");
        drop(f);
        // The reset goes out from a task of its own.
        tokio::task::yield_now().await;
    }
}

#[test]
fn the_blocking_client_streams_a_command_a_log_and_a_file() {
    use std::io::{BufRead, BufReader, Read, Write};
    let agent = AgentProcess::start();
    let client = host_client::blocking::Client::connect(&agent.socket).unwrap();
    let mut run = client
        .exec_start(sh("read x; echo got $x; echo oops >&2; exit 3"))
        .unwrap();
    assert!(run.control.pid() > 0);
    run.stdin.write_all(b"hi\n").unwrap();
    run.stdin.shutdown().unwrap();
    let mut out = String::new();
    run.stdout.read_to_string(&mut out).unwrap();
    assert_eq!(out, "got hi\noops\n");
    assert_eq!(run.control.wait().unwrap().exit_code, Some(3));

    let path = agent.read_dir().join("blocking.log");
    std::fs::write(&path, "one\ntwo\n").unwrap();
    let mut log = BufReader::new(
        client
            .follow_log(path.to_str().unwrap(), Some(1), None)
            .unwrap(),
    );
    let mut line = String::new();
    log.read_line(&mut line).unwrap();
    assert_eq!(line, "two\n");
    append(&path, "three\n");
    line.clear();
    log.read_line(&mut line).unwrap();
    assert_eq!(line, "three\n");

    // A file from an offset to its end, and its size.
    let file = agent.read_dir().join("data.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let (mut rest, size) = client.read_stream(file.to_str().unwrap(), 1000).unwrap();
    assert_eq!(size, data.len() as u64);
    let mut got = Vec::new();
    rest.read_to_end(&mut got).unwrap();
    assert!(got == data[1000..], "the stream gave other bytes");

    // Inside a runtime a read is refused, not a stall.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let e = rt.block_on(async { log.read_line(&mut line) }).unwrap_err();
    assert!(e.to_string().contains("runtime"), "{e}");
}
