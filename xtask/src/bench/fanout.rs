//! The host fan-out figure: 1,024 host agents on Unix sockets, pinged at once
//! by a separate client process.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host_client::Client;
use serde_json::json;

use super::err;
use super::harness::{ms, status_kb};
use super::stats::{Figure, Spread};
use crate::util::{bail, kill_pid, target_dir, Result};

/// Agents of the fan-out figure.
const FANOUT: usize = 1024;

/// Config of the host agents of the fan-out figure.
const FANOUT_CONFIG: &str = r#"{
  "log_level": "error",
  "log_file": null,
  "channel_name": "org.kvmmanager.agent.0",
  "max_message_size_kb": 64,
  "connection_retry_seconds": 5,
  "request_timeout_seconds": 30,
  "max_concurrent_requests": 10,
  "security": {
    "allowed_read_paths": ["/tmp"],
    "allowed_write_paths": ["/tmp"],
    "command_whitelist": null,
    "max_file_size_mb": 16,
    "max_command_timeout_seconds": 30
  }
}
"#;

/// Host agents stopped by pid on drop.
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.0 {
            kill_pid(c.id(), "KILL");
            let _ = c.wait();
        }
    }
}

/// 1,024 host agents on Unix sockets, pinged at once by a separate process
/// (its open-file limit raised to the hard limit first: one socket each).
pub(crate) fn fanout() -> Result<Vec<Figure>> {
    let dir = std::env::temp_dir().join(format!("kvmm-fanout-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("config.json"), FANOUT_CONFIG)?;
    let agent = target_dir().join("release/kvmmanager-agent");
    let mut agents = Agents(Vec::new());
    for i in 0..FANOUT {
        agents.0.push(
            Command::new(&agent)
                .arg("--foreground")
                .arg("--config")
                .arg(dir.join("config.json"))
                .arg("--listen")
                .arg(format!("unix:{}", dir.join(format!("a{i}.sock")).display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let start = Instant::now();
    while (0..FANOUT).any(|i| !dir.join(format!("a{i}.sock")).exists()) {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("host agents did not all listen within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let me = std::env::current_exe()?;
    let (mut totals, mut rss, mut answered) = (Vec::new(), Vec::new(), 0u64);
    for _ in 0..3 {
        let out = crate::util::output(
            Command::new("sh")
                .arg("-c")
                .arg(r#"ulimit -n "$(ulimit -Hn)" && exec "$0" bench --fanout-client "$1""#)
                .arg(&me)
                .arg(&dir),
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim()).map_err(err("fan-out"))?;
        totals.push(v["total_ms"].as_f64().unwrap_or(0.0));
        rss.push(v["vmhwm_kb"].as_f64().unwrap_or(0.0) / 1024.0);
        answered = v["answered"].as_u64().unwrap_or(0);
    }
    drop(agents);
    let _ = fs::remove_dir_all(&dir);
    let all = answered == FANOUT as u64;
    Ok(vec![
        Figure::new(
            &format!("fan-out: ping {FANOUT} agents, total (ms)"),
            Spread::of(&totals),
            None,
            "all answered",
            move |_| all,
        )
        .with_note(format!("{answered}/{FANOUT} answered")),
        Figure::new(
            "fan-out: host-client peak RSS (MB)",
            Spread::of(&rss),
            None,
            "(report)",
            |_| true,
        ),
    ])
}

/// The fan-out client process: connect to every `a*.sock` in `dir`, ping
/// all at once, print `{"total_ms", "answered", "vmhwm_kb"}`.
pub(crate) fn fanout_client_main(dir: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let socks: Vec<PathBuf> = (0..FANOUT)
        .map(|i| dir.join(format!("a{i}.sock")))
        .collect();
    let (total, answered) = rt.block_on(async move {
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for s in socks {
            set.spawn(async move {
                let c = Client::connect(&s).await?;
                c.ping().await
            });
        }
        let mut ok = 0u64;
        while let Some(r) = set.join_next().await {
            if matches!(r, Ok(Ok(_))) {
                ok += 1;
            }
        }
        (ms(start), ok)
    });
    let st = fs::read_to_string("/proc/self/status")?;
    println!(
        "{}",
        json!({"total_ms": total, "answered": answered, "vmhwm_kb": status_kb(&st, "VmHWM")})
    );
    Ok(())
}
