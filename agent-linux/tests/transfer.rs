//! The host library against the real agent binary: a 100 MB file pushed and
//! pulled back byte-equal with flat memory on both sides, pulls by one
//! stream and by chunks (and the fall-back from one to the other), and
//! reconnection after the agent restarts. Kept in its own test binary so the host-side
//! memory figure is this test's alone.

mod common;

use std::io::{Read, Write};
use std::path::Path;

use common::{status_kb, AgentProcess};
use host_client::{Client, ClientOptions, PushOptions};
use serde_json::json;

const SIZE: u64 = 100 * 1024 * 1024;

/// Writes `size` pseudo-random bytes (xorshift; incompressible enough).
fn random_file(path: &Path, size: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fa.read(&mut ba).unwrap();
        let mut nb = 0;
        while nb < na {
            let n = fb.read(&mut bb[nb..na]).unwrap();
            if n == 0 {
                return false;
            }
            nb += n;
        }
        if na == 0 {
            return fb.read(&mut bb).unwrap() == 0;
        }
        if ba[..na] != bb[..na] {
            return false;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_file_round_trips_with_flat_memory() {
    let agent = AgentProcess::start_with(
        json!({"max_file_size_mb": 128}),
        json!({"log_level": "info"}),
    );
    let local = agent.dir.path().join("local.bin");
    random_file(&local, SIZE);
    let client = Client::connect(&agent.socket).await.expect("connect");
    let host_before = status_kb("self", "VmRSS");
    let guest = agent.write_dir().join("big.bin");
    let guest_path = guest.display().to_string();
    let mut last = 0;
    let up = client
        .push(&local, &guest_path, PushOptions::default(), |p| {
            last = p.done
        })
        .await
        .expect("push");
    assert_eq!(up.bytes, SIZE);
    assert_eq!(last, SIZE);
    assert!(same_bytes(&local, &guest), "pushed file differs");
    let back = agent.dir.path().join("back.bin");
    let down = client.pull(&guest_path, &back, |_| {}).await.expect("pull");
    assert_eq!(down.bytes, SIZE);
    assert!(same_bytes(&local, &back), "pulled file differs");
    let agent_peak = status_kb(&agent.pid().to_string(), "VmHWM");
    let host_peak = status_kb("self", "VmHWM");
    println!(
        "100 MB: push {:.1} MiB/s, pull {:.1} MiB/s; agent peak RSS {agent_peak} kB; \
         host RSS {host_before} kB before, peak {host_peak} kB",
        up.mib_per_s(),
        down.mib_per_s()
    );
    // Flat: far below the file size on both sides.
    assert!(agent_peak < 48 * 1024, "agent peak RSS {agent_peak} kB");
    assert!(
        host_peak < host_before + 48 * 1024,
        "host RSS grew from {host_before} kB to {host_peak} kB"
    );
}

/// A pull goes by one `file_read_stream` where the agent serves it: with
/// `file_read` disabled the pull still works, and only by that stream.
/// With `file_read_stream` disabled (or an older agent) it falls back to
/// `file_read` chunks. Both give the file's bytes, its unaligned tail and
/// an empty file included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_by_stream_and_by_chunks() {
    for blocked in ["file_read", "file_read_stream"] {
        let agent = AgentProcess::start_with(json!({ "blocked_methods": [blocked] }), json!({}));
        let files = [("big.bin", 3 * 1024 * 1024 + 12_345), ("empty.bin", 0)];
        for (name, size) in files {
            let guest = agent.write_dir().join(name);
            random_file(&guest, size);
            let guest_path = guest.display().to_string();
            for stream_reads in [true, false] {
                let client = Client::lazy(
                    &agent.socket,
                    ClientOptions {
                        stream_reads,
                        ..ClientOptions::default()
                    },
                );
                let back = agent.dir.path().join("back.bin");
                let r = client.pull(&guest_path, &back, |_| {}).await;
                // Only a client that asks for chunks against an agent
                // that disables them fails, and says why.
                if blocked == "file_read" && !stream_reads {
                    let e = r.expect_err("file_read is disabled");
                    assert!(e.is_policy_denied(), "{e}");
                    continue;
                }
                let r = r.unwrap_or_else(|e| panic!("{blocked} off, {stream_reads}: {e}"));
                assert_eq!(r.bytes, size);
                assert!(same_bytes(&guest, &back), "{name}: pulled file differs");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_the_agent_restarts() {
    let agent = AgentProcess::start();
    let client = Client::connect(&agent.socket).await.expect("connect");
    assert!(client.ping().await.unwrap().pong);
    let socket = agent.socket.clone();
    let config = agent.dir.path().join("config.json");
    let mut agent = agent;
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    // The first call after the agent died fails or reconnects; a new agent
    // on the same socket is then reached without a new Client.
    agent.child = std::process::Command::new(env!("CARGO_BIN_EXE_kvmmanager-agent"))
        .args(["--foreground", "--config"])
        .arg(&config)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match client.ping().await {
            Ok(p) => {
                assert!(p.pong);
                break;
            }
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "never reconnected: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    let r = client
        .exec(&agent_common::methods::ExecParams {
            command: "echo".into(),
            args: vec!["back".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.stdout, "back\n");
}
