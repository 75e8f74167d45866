//! Leak soak against the real binary: many pings, execs, file reads and
//! writes over one connection, then many connect/disconnect cycles, then
//! floods: hosts that send 1 MiB reads and pings until the agent stops
//! reading them, and leave without reading a reply. After a warm-up, the
//! agent's resident memory may grow by at most 500 kB, its open descriptors
//! must return to where they started, and its peak stays within the
//! documented bound (`agent_linux::server::memory_bound`).
//!
//! The default is a short run for the test suite. `cargo xtask soak` sets
//! `KVMM_SOAK_PINGS=1000000 KVMM_SOAK_OPS=10000 KVMM_SOAK_CYCLES=1000
//! KVMM_SOAK_FLOODS=50` for the full figures.

mod common;

use std::io::{BufRead, BufReader, Write};

use agent_linux::config::Config;
use agent_linux::server::memory_bound;
use common::{flood, flood_file, push_until_stalled, status_kb, AgentProcess};
use serde_json::json;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Sends `lines` pipelined in windows of 64 and checks every reply.
fn pipeline(conn: &mut common::Conn, lines: &[Vec<u8>]) {
    for window in lines.chunks(64) {
        let mut buf = Vec::new();
        for l in window {
            buf.extend_from_slice(l);
        }
        conn.send_raw(&buf);
        for _ in window {
            let r = conn.recv();
            assert!(r.get("result").is_some(), "{r}");
        }
    }
}

fn line(v: serde_json::Value) -> Vec<u8> {
    let mut l = serde_json::to_vec(&v).unwrap();
    l.push(b'\n');
    l
}

fn round(agent: &AgentProcess, pings: usize, ops: usize, cycles: usize, floods: usize) {
    let mut c = agent.connect();
    let ping: Vec<_> = (0..pings)
        .map(|i| line(json!({"jsonrpc":"2.0","method":"ping","id":i})))
        .collect();
    pipeline(&mut c, &ping);
    let file = agent.write_dir().join("soak.txt");
    let path = file.display().to_string();
    for i in 0..ops {
        // Sequential: at most max_concurrent_requests run at once.
        let w = c.call(
            1,
            "file_write",
            json!({"path": path, "content": format!("soak {i}\n")}),
        );
        assert!(w.get("result").is_some(), "{w}");
        let r = c.call(2, "file_read", json!({"path": path}));
        assert_eq!(r["result"]["content"], format!("soak {i}\n"));
        let e = c.call(3, "exec_command", json!({"command": "true"}));
        assert_eq!(e["result"]["exit_code"], 0, "{e}");
    }
    drop(c);
    for _ in 0..cycles {
        let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
        s.write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":1}\n")
            .unwrap();
        let mut l = String::new();
        BufReader::new(&s).read_line(&mut l).unwrap();
        assert!(l.contains("pong"));
    }
    let wire = flood(flood_file(agent).to_str().unwrap());
    for _ in 0..floods {
        let mut s = agent.connect().stream;
        let sent = push_until_stalled(
            &mut s,
            &wire,
            std::time::Duration::from_millis(500),
            std::time::Duration::from_secs(20),
        );
        assert!(sent < wire.len(), "the agent read a whole flood");
    }
    // The flooders are gone; the agent serves the next host.
    let r = agent.connect().call(9, "ping", json!({}));
    assert_eq!(r["result"]["pong"], true);
}

#[test]
fn memory_and_descriptors_stay_flat() {
    let pings = env_or("KVMM_SOAK_PINGS", 40_000);
    let ops = env_or("KVMM_SOAK_OPS", 300);
    let cycles = env_or("KVMM_SOAK_CYCLES", 200);
    let floods = env_or("KVMM_SOAK_FLOODS", 4);
    let agent = AgentProcess::start_with(json!({}), json!({"log_level": "warn"}));
    let pid = agent.pid();
    // Warm-up: allocator pools, thread pools and lazy statics settle.
    round(&agent, pings / 4, ops / 4, cycles / 4, floods.div_ceil(4));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let fds_before = fd_count(pid);
    let rss_before = status_kb(&pid.to_string(), "VmRSS");
    let threads_before = status_kb(&pid.to_string(), "Threads");
    round(&agent, pings, ops, cycles, floods);
    // The flooders' sessions hand their memory back once their last
    // request is done, and the blocking-pool threads their file reads
    // started retire after tokio's 10 s keep-alive: give both up to 15 s on
    // a busy machine before judging.
    let mut rss_after = 0;
    for _ in 0..150 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        rss_after = status_kb(&pid.to_string(), "VmRSS");
        if rss_after <= rss_before + 500 {
            break;
        }
    }
    let fds_after = fd_count(pid);
    let threads_after = status_kb(&pid.to_string(), "Threads");
    let hwm = status_kb(&pid.to_string(), "VmHWM");
    let bound = memory_bound(&Config::default(), 2) / 1024;
    println!(
        "soak: {pings} pings, {ops} each of write/read/exec, {cycles} connections, \
         {floods} floods: RSS {rss_before} kB -> {rss_after} kB (peak {hwm} kB, bound \
         {bound} kB), fds {fds_before} -> {fds_after}, threads {threads_before} -> {threads_after}"
    );
    assert!(hwm <= bound, "peak RSS {hwm} kB over the bound {bound} kB");
    assert!(
        rss_after <= rss_before + 500,
        "RSS grew from {rss_before} kB to {rss_after} kB"
    );
    assert_eq!(fds_after, fds_before, "descriptor count changed");
}
