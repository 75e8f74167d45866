//! A hostile host floods the real agent with requests and reads its
//! replies slowly or never: the agent's memory stays within the bound
//! SECURITY.md states (`agent_linux::server::memory_bound`), and another
//! host's `ping` is still answered.

mod common;

use std::io::{ErrorKind, Read};
use std::time::{Duration, Instant};

use agent_linux::config::Config;
use agent_linux::server::memory_bound;
use common::{flood, push_until_stalled, status_kb, AgentProcess};
use serde_json::json;

fn big_file(agent: &AgentProcess) -> String {
    common::flood_file(agent).to_str().unwrap().to_owned()
}

fn bound_kb(sessions: u64) -> u64 {
    // The test agent runs with the default limits that matter here
    // (max_message_size_kb, max_concurrent_requests).
    memory_bound(&Config::default(), sessions) / 1024
}

#[test]
fn a_host_that_never_reads_is_pushed_back_and_memory_stays_bounded() {
    let agent = AgentProcess::start();
    let path = big_file(&agent);
    let wire = flood(&path);
    let mut flooder = agent.connect().stream;
    let sent = push_until_stalled(
        &mut flooder,
        &wire,
        Duration::from_secs(3),
        Duration::from_secs(30),
    );
    // The agent stopped reading long before the end: its input pushed back.
    assert!(
        sent < wire.len() / 2,
        "the agent read {sent} of {} bytes from a host that reads nothing",
        wire.len()
    );
    // Another host is still served at once.
    let started = Instant::now();
    let r = agent.connect().call(1, "ping", json!({}));
    assert_eq!(r["result"]["pong"], true);
    assert!(started.elapsed() < Duration::from_secs(10));
    let pid = agent.pid().to_string();
    let peak = status_kb(&pid, "VmHWM");
    let bound = bound_kb(2);
    eprintln!("flood, never read: {sent} bytes taken, agent peak RSS {peak} kB (bound {bound} kB)");
    assert!(
        peak <= bound,
        "peak RSS {peak} kB over the bound {bound} kB"
    );
    // The flooder's replies are still owed: it gets them once it reads.
    flooder
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = flooder.read(&mut buf).unwrap();
    assert!(n > 0);
}

#[test]
fn a_host_that_reads_slowly_keeps_memory_bounded_and_others_served() {
    let agent = AgentProcess::start();
    let path = big_file(&agent);
    let wire = flood(&path);
    let mut slow = agent.connect().stream;
    let mut reader = slow.try_clone().unwrap();
    // Read about 300 KB/s for a while, in a thread of its own.
    let read_for = Duration::from_secs(8);
    let drain = std::thread::spawn(move || {
        reader
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let started = Instant::now();
        let mut buf = vec![0u8; 30 * 1024];
        let mut total = 0usize;
        while started.elapsed() < read_for {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("reading replies failed: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        total
    });
    let sent = push_until_stalled(
        &mut slow,
        &wire,
        Duration::from_secs(3),
        Duration::from_secs(8),
    );
    let r = agent.connect().call(1, "ping", json!({}));
    assert_eq!(r["result"]["pong"], true);
    let received = drain.join().unwrap();
    let peak = status_kb(&agent.pid().to_string(), "VmHWM");
    let bound = bound_kb(2);
    eprintln!(
        "flood, slow reader: {sent} bytes sent, {received} bytes of replies read, \
         agent peak RSS {peak} kB (bound {bound} kB)"
    );
    assert!(received > 0, "the slow host got no replies");
    assert!(
        peak <= bound,
        "peak RSS {peak} kB over the bound {bound} kB"
    );
}
