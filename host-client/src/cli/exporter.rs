//! `kvmmanager-ctl exporter --listen ADDR`: a Prometheus exporter. Each
//! `GET /metrics` scrapes every VM at once (each within `--vm-timeout`)
//! and answers in the OpenMetrics text format (`prometheus-client`), one
//! label set per domain; `kvmm_up` and `kvmm_scrape_duration_seconds` for
//! every VM, answering or not. Connections are served concurrently (at
//! most [`MAX_CONNECTIONS`] at once), each within time limits, so a client
//! that connects and stays silent delays nobody.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::fleet::{probe_all, targets, ExporterArgs, Probe};
use super::{Cli, CliError};

type Labels = Vec<(String, String)>;
type G = Family<Labels, Gauge<f64, AtomicU64>>;
type C = Family<Labels, Counter<f64, AtomicU64>>;

/// Most bytes of a request's head read.
const MAX_HEAD: usize = 8 * 1024;

/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

/// Time a client gets to send its request head, and to take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until interrupted.
pub(super) async fn serve(cli: &Cli, a: &ExporterArgs) -> Result<i32, CliError> {
    let listener = TcpListener::bind(a.listen)
        .await
        .map_err(|source| CliError::Local {
            what: format!("cannot listen on {}", a.listen),
            source,
        })?;
    eprintln!(
        "kvmmanager-ctl exporter: serving http://{}/metrics",
        listener.local_addr().map_or(a.listen, |l| l)
    );
    let limit = Duration::from_secs(a.vm_timeout.max(1));
    let mut serving = FuturesUnordered::new();
    loop {
        let room = serving.len() < MAX_CONNECTIONS;
        tokio::select! {
            r = listener.accept(), if room => match r {
                Ok((stream, _)) => serving.push(handle(cli, stream, limit)),
                Err(e) => {
                    eprintln!("kvmmanager-ctl exporter: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(r) = serving.next() => {
                if let Err(e) = r {
                    eprintln!("kvmmanager-ctl exporter: {e}");
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(super::EXIT_OK),
        }
    }
}

async fn handle(cli: &Cli, mut s: TcpStream, limit: Duration) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(CLIENT_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        )
    } else if path == "/metrics" || path.starts_with("/metrics?") {
        let body = match targets(cli).await {
            Ok(t) => render(&probe_all(t, limit, true).await),
            Err(e) => {
                let msg = format!("cannot list the VMs: {}\n", e.message());
                s.write_all(response("503 Service Unavailable", "text/plain", &msg).as_bytes())
                    .await?;
                return Ok(());
            }
        };
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "kvmmanager-ctl exporter: see /metrics\n".to_owned(),
        )
    };
    let answer = async {
        s.write_all(response(status, ctype, &body).as_bytes())
            .await?;
        s.shutdown().await
    };
    tokio::time::timeout(CLIENT_TIMEOUT, answer)
        .await
        .unwrap_or(Ok(()))
}

fn response(status: &str, ctype: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The metrics of every probed VM, in the OpenMetrics text format.
pub(super) fn render(probes: &[Probe]) -> String {
    let mut reg = Registry::default();
    let gauge = |reg: &mut Registry, name: &str, help: &str| {
        let f = G::default();
        reg.register(name, help, f.clone());
        f
    };
    let counter = |reg: &mut Registry, name: &str, help: &str| {
        let f = C::default();
        reg.register(name, help, f.clone());
        f
    };
    let up = gauge(
        &mut reg,
        "kvmm_up",
        "1 if the VM's agent answered this scrape",
    );
    let took = gauge(
        &mut reg,
        "kvmm_scrape_duration_seconds",
        "Time taken to scrape the VM's agent",
    );
    let cpu = counter(&mut reg, "kvmm_cpu_seconds", "CPU time by mode, all CPUs");
    let mem = gauge(
        &mut reg,
        "kvmm_memory_bytes",
        "Memory by kind (total, available, free, used)",
    );
    let swap = gauge(
        &mut reg,
        "kvmm_swap_bytes",
        "Swap by kind (total, free, used)",
    );
    let load = gauge(
        &mut reg,
        "kvmm_load_average",
        "Load average by period (1m, 5m, 15m)",
    );
    let uptime = gauge(
        &mut reg,
        "kvmm_uptime_seconds",
        "Seconds since the guest booted",
    );
    let procs = gauge(&mut reg, "kvmm_processes", "Processes running");
    let disk_r = counter(
        &mut reg,
        "kvmm_disk_read_bytes",
        "Bytes read per block device",
    );
    let disk_w = counter(
        &mut reg,
        "kvmm_disk_written_bytes",
        "Bytes written per block device",
    );
    let net_r = counter(
        &mut reg,
        "kvmm_network_receive_bytes",
        "Bytes received per interface",
    );
    let net_t = counter(
        &mut reg,
        "kvmm_network_transmit_bytes",
        "Bytes sent per interface",
    );
    let fs_size = gauge(&mut reg, "kvmm_filesystem_size_bytes", "Filesystem size");
    let fs_avail = gauge(
        &mut reg,
        "kvmm_filesystem_avail_bytes",
        "Filesystem bytes available",
    );
    let psi = counter(
        &mut reg,
        "kvmm_pressure_stalled_seconds",
        "Pressure stall time by resource and kind (some, full)",
    );
    for p in probes {
        let dom = || vec![("domain".to_owned(), p.target.name.clone())];
        let with = |k: &str, v: &str| {
            let mut l = dom();
            l.push((k.to_owned(), v.to_owned()));
            l
        };
        up.get_or_create(&dom())
            .set(if p.state == "up" { 1.0 } else { 0.0 });
        took.get_or_create(&dom()).set(p.took.as_secs_f64());
        let Some(m) = &p.metrics else { continue };
        let c = &m.cpu_total;
        for (mode, ms) in [
            ("user", c.user_ms),
            ("nice", c.nice_ms),
            ("system", c.system_ms),
            ("idle", c.idle_ms),
            ("iowait", c.iowait_ms),
            ("irq", c.irq_ms),
            ("softirq", c.softirq_ms),
            ("steal", c.steal_ms),
        ] {
            cpu.get_or_create(&with("mode", mode))
                .inc_by(ms as f64 / 1000.0);
        }
        let mm = &m.memory;
        for (kind, v) in [
            ("total", mm.total_bytes),
            ("available", mm.available_bytes),
            ("free", mm.free_bytes),
            ("used", mm.used_bytes),
        ] {
            mem.get_or_create(&with("kind", kind)).set(v as f64);
        }
        for (kind, v) in [
            ("total", mm.swap_total_bytes),
            ("free", mm.swap_free_bytes),
            ("used", mm.swap_used_bytes),
        ] {
            swap.get_or_create(&with("kind", kind)).set(v as f64);
        }
        for (period, v) in ["1m", "5m", "15m"].iter().zip(m.load_average) {
            load.get_or_create(&with("period", period)).set(v);
        }
        uptime.get_or_create(&dom()).set(m.uptime_seconds as f64);
        procs.get_or_create(&dom()).set(m.process_count as f64);
        for d in &m.disks {
            disk_r
                .get_or_create(&with("device", &d.name))
                .inc_by(d.read_bytes as f64);
            disk_w
                .get_or_create(&with("device", &d.name))
                .inc_by(d.write_bytes as f64);
        }
        for n in &m.networks {
            net_r
                .get_or_create(&with("interface", &n.name))
                .inc_by(n.rx_bytes as f64);
            net_t
                .get_or_create(&with("interface", &n.name))
                .inc_by(n.tx_bytes as f64);
        }
        for f in &m.filesystems {
            fs_size
                .get_or_create(&with("mountpoint", &f.mount_point))
                .set(f.total_bytes as f64);
            fs_avail
                .get_or_create(&with("mountpoint", &f.mount_point))
                .set(f.available_bytes as f64);
        }
        if let Some(pr) = &m.pressure {
            for (res, r) in [("cpu", &pr.cpu), ("memory", &pr.memory), ("io", &pr.io)] {
                let Some(r) = r else { continue };
                for (kind, line) in [("some", Some(&r.some)), ("full", r.full.as_ref())] {
                    if let Some(line) = line {
                        let mut l = with("resource", res);
                        l.push(("kind".into(), kind.into()));
                        psi.get_or_create(&l).inc_by(line.total_us as f64 / 1e6);
                    }
                }
            }
        }
    }
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &reg);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::fleet::FleetTarget;
    use agent_common::methods::{CpuTotal, MemoryMetrics, Metrics};

    #[test]
    fn every_vm_has_up_and_scrape_duration_and_answering_ones_their_series() {
        let target = |name: &str| FleetTarget {
            name: name.into(),
            socket: None,
            absent: None,
        };
        let up = Probe {
            target: target("web1"),
            state: "up",
            version: Some("0.1.0".into()),
            rtt: Some(Duration::from_millis(1)),
            metrics: Some(Metrics {
                timestamp_ms: 0,
                uptime_seconds: 42,
                boot_time: 0,
                load_average: [0.5, 0.25, 0.0],
                cpu_total: CpuTotal {
                    user_ms: 1500,
                    ..Default::default()
                },
                cpus: Vec::new(),
                memory: MemoryMetrics {
                    total_bytes: 1024,
                    ..Default::default()
                },
                pressure: None,
                disks: Vec::new(),
                networks: Vec::new(),
                filesystems: Vec::new(),
                process_count: 7,
            }),
            error: None,
            took: Duration::from_millis(250),
        };
        let down = Probe {
            target: target("db2"),
            state: "down",
            version: None,
            rtt: None,
            metrics: None,
            error: None,
            took: Duration::ZERO,
        };
        let text = render(&[up, down]);
        for want in [
            "kvmm_up{domain=\"web1\"} 1.0",
            "kvmm_up{domain=\"db2\"} 0.0",
            "kvmm_scrape_duration_seconds{domain=\"web1\"} 0.25",
            "kvmm_cpu_seconds_total{domain=\"web1\",mode=\"user\"} 1.5",
            "kvmm_memory_bytes{domain=\"web1\",kind=\"total\"} 1024.0",
            "kvmm_processes{domain=\"web1\"} 7.0",
            "kvmm_uptime_seconds{domain=\"web1\"} 42.0",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
        assert!(!text.contains("kvmm_processes{domain=\"db2\"}"), "{text}");
    }

    #[test]
    fn http_responses_carry_their_length() {
        let r = response("200 OK", "text/plain", "abc\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Content-Length: 4\r\n"));
        assert!(r.ends_with("\r\n\r\nabc\n"));
    }
}
