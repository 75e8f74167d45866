//! `kvmmanager-ctl` fleet commands: `list`, `top`, `exporter` (every
//! libvirt domain on this host, or exactly one agent with `--socket` /
//! `--domain`), and `ps`, `kill`, `logs`, `metrics` for one agent.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_common::methods::{
    GetMetricsRpc, KillParams, KillProcessRpc, ListProcessesRpc, Metrics, ProcessListParams,
    ProcessSort, ReadLogParams, ReadLogRpc,
};
use serde_json::json;

use super::format::{human_duration, human_size, table, Align};
use super::{out, out_json, Cli, CliError, Command, EXIT_OK};
use crate::libvirt::{self, LibvirtError};
use crate::{Client, ClientOptions};

/// `--sort` of `ps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortArg {
    /// Ascending pid.
    Pid,
    /// Most CPU time first.
    Cpu,
    /// Largest resident set first.
    Memory,
    /// Most recently started first.
    Start,
}

/// Arguments of `ps`.
#[derive(Debug, Clone, clap::Args)]
pub struct PsArgs {
    /// Only processes whose name or command line contains this text.
    #[arg(long, value_name = "TEXT")]
    pub filter: Option<String>,
    /// Only processes of this user.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Order of the list.
    #[arg(long, value_enum, default_value = "pid")]
    pub sort: SortArg,
    /// Show at most this many processes (1 to 1000).
    #[arg(short = 'n', long, value_name = "N")]
    pub limit: Option<u32>,
    /// Also list kernel threads.
    #[arg(long)]
    pub kernel_threads: bool,
}

/// Arguments of `kill`.
#[derive(Debug, Clone, clap::Args)]
pub struct KillArgs {
    /// The process id in the guest.
    pub pid: u32,
    /// Signal: TERM, KILL, INT, HUP, QUIT, USR1, USR2, STOP or CONT.
    #[arg(long, default_value = "TERM")]
    pub signal: String,
    /// Only if the process started at this time (`ps --json` start_time).
    #[arg(long, value_name = "UNIX")]
    pub start_time: Option<u64>,
}

/// Arguments of `logs`.
#[derive(Debug, Clone, clap::Args)]
pub struct LogsArgs {
    /// Follow the file as it grows, across rotation (`tail -F`), until
    /// Ctrl-C, starting with its last N lines.
    #[arg(short, long, conflicts_with_all = ["unit", "since"])]
    pub follow: bool,
    /// A log file in the guest (beneath its allowed_read_paths).
    #[arg(required_unless_present = "unit", conflicts_with = "unit")]
    pub path: Option<String>,
    /// A systemd unit whose journal to read instead.
    #[arg(short, long, value_name = "UNIT")]
    pub unit: Option<String>,
    /// The last N lines.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 100)]
    pub lines: u32,
    /// Only lines logged since: Unix seconds, or an age like 90s, 10m, 2h, 1d.
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    pub since: Option<u64>,
    /// Only lines containing this text.
    #[arg(short, long, value_name = "TEXT")]
    pub grep: Option<String>,
}

/// Arguments of `list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Refresh every SECS seconds until interrupted.
    #[arg(short, long, value_name = "SECS")]
    pub watch: Option<u64>,
    /// Time limit per VM, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3)]
    pub vm_timeout: u64,
}

/// Arguments of `top`.
#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    /// Seconds between two samples.
    #[arg(short, long, value_name = "SECS", default_value_t = 2)]
    pub interval: u64,
    /// Stop after this many refreshes (default: until interrupted).
    #[arg(short = 'n', long, value_name = "N")]
    pub iterations: Option<u64>,
    /// Time limit per VM, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3)]
    pub vm_timeout: u64,
}

/// Arguments of `exporter`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExporterArgs {
    /// Address to serve /metrics on, e.g. 127.0.0.1:9187.
    #[arg(long, value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// Time limit of each VM's scrape, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub vm_timeout: u64,
}

/// Ages like `90s`, `10m`, `2h`, `1d` (before now), or Unix seconds.
fn parse_since(s: &str) -> Result<u64, String> {
    if let Ok(t) = s.parse::<u64>() {
        return Ok(t);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?} is neither Unix seconds nor an age like 10m")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is neither Unix seconds nor an age like 10m"))?;
    Ok(now_secs().saturating_sub(n.saturating_mul(mult)))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs `ps`, `kill`, `logs` or `metrics` on one agent.
pub(super) async fn run(client: &Client, cmd: Command, json: bool) -> Result<i32, CliError> {
    match cmd {
        Command::Ps(a) => {
            let r = client
                .call::<ListProcessesRpc>(&ProcessListParams {
                    filter: a.filter,
                    user: a.user,
                    sort: match a.sort {
                        SortArg::Pid => ProcessSort::Pid,
                        SortArg::Cpu => ProcessSort::Cpu,
                        SortArg::Memory => ProcessSort::Memory,
                        SortArg::Start => ProcessSort::Start,
                    },
                    limit: a.limit,
                    include_kernel_threads: a.kernel_threads,
                })
                .await?;
            if json {
                out_json(&r)?;
            } else {
                let rows: Vec<Vec<String>> = r
                    .processes
                    .iter()
                    .map(|p| {
                        vec![
                            p.pid.to_string(),
                            p.ppid.map_or("-".into(), |v| v.to_string()),
                            p.user
                                .clone()
                                .or(p.uid.map(|u| u.to_string()))
                                .unwrap_or_else(|| "-".into()),
                            p.state.clone(),
                            format!("{:.1}", p.cpu_time_ms as f64 / 1000.0),
                            human_size(p.rss_bytes),
                            human_duration(now_secs().saturating_sub(p.start_time) as f64),
                            if p.cmdline.is_empty() {
                                format!("[{}]", p.name)
                            } else {
                                p.cmdline.join(" ")
                            },
                        ]
                    })
                    .collect();
                use Align::{Left as L, Right as R};
                out(&table(
                    &[
                        "PID", "PPID", "USER", "STATE", "CPU s", "RSS", "AGE", "COMMAND",
                    ],
                    &[R, R, L, L, R, R, R, L],
                    &rows,
                ))?;
                if (r.matched as usize) > r.processes.len() {
                    out(&format!(
                        "({} of {} matching processes shown)\n",
                        r.processes.len(),
                        r.matched
                    ))?;
                }
            }
        }
        Command::Kill(a) => {
            let r = client
                .call::<KillProcessRpc>(&KillParams {
                    pid: a.pid,
                    signal: Some(a.signal),
                    start_time: a.start_time,
                })
                .await?;
            if json {
                out_json(&r)?;
            } else {
                out(&format!("sent {} to process {}\n", r.signal, r.pid))?;
            }
        }
        Command::Logs(a) => {
            let r = client
                .call::<ReadLogRpc>(&ReadLogParams {
                    path: a.path,
                    unit: a.unit,
                    lines: Some(a.lines),
                    since: a.since,
                    filter: a.grep,
                })
                .await?;
            if json {
                out_json(&r)?;
            } else {
                let mut text = r.lines.join("\n");
                if !text.is_empty() {
                    text.push('\n');
                }
                out(&text)?;
            }
        }
        Command::Metrics => {
            let m = client.call::<GetMetricsRpc>(&Default::default()).await?;
            if json {
                out_json(&m)?;
            } else {
                out(&render_metrics(&m))?;
            }
        }
        _ => {}
    }
    Ok(EXIT_OK)
}

fn render_metrics(m: &Metrics) -> String {
    let mut s = format!(
        "uptime {}  load {:.2} {:.2} {:.2}  processes {}\n",
        human_duration(m.uptime_seconds as f64),
        m.load_average[0],
        m.load_average[1],
        m.load_average[2],
        m.process_count
    );
    s.push_str(&format!(
        "memory {} of {} available, swap {} of {} free\n",
        human_size(m.memory.available_bytes),
        human_size(m.memory.total_bytes),
        human_size(m.memory.swap_free_bytes),
        human_size(m.memory.swap_total_bytes)
    ));
    if let Some(p) = &m.pressure {
        for (name, r) in [("cpu", &p.cpu), ("memory", &p.memory), ("io", &p.io)] {
            if let Some(r) = r {
                s.push_str(&format!(
                    "pressure {name}: some avg10 {:.2}% avg60 {:.2}%\n",
                    r.some.avg10, r.some.avg60
                ));
            }
        }
    }
    for d in &m.disks {
        s.push_str(&format!(
            "disk {}: read {} written {}\n",
            d.name,
            human_size(d.read_bytes),
            human_size(d.write_bytes)
        ));
    }
    for n in &m.networks {
        s.push_str(&format!(
            "net {}: rx {} tx {}\n",
            n.name,
            human_size(n.rx_bytes),
            human_size(n.tx_bytes)
        ));
    }
    for f in &m.filesystems {
        s.push_str(&format!(
            "fs {}: {} of {} available\n",
            f.mount_point,
            human_size(f.available_bytes),
            human_size(f.total_bytes)
        ));
    }
    s
}

/// One VM the fleet commands look at.
#[derive(Debug, Clone)]
pub struct FleetTarget {
    /// The domain name, or the socket path given.
    pub name: String,
    /// Its agent socket, if it has one.
    pub socket: Option<PathBuf>,
    /// Why it has none: `down` (not running), `no channel`.
    pub absent: Option<&'static str>,
}

/// The libvirt URI fleet commands use: `LIBVIRT_DEFAULT_URI`, else the
/// system daemon (as `--domain`).
fn libvirt_uri() -> Option<&'static str> {
    std::env::var_os("LIBVIRT_DEFAULT_URI")
        .is_none()
        .then_some("qemu:///system")
}

/// `virsh -q list --all` lines: `ID NAME STATE...`; `(name, running)`.
pub fn parse_virsh_list(text: &str) -> Vec<(String, bool)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _id = f.next()?;
            let name = f.next()?;
            let state: Vec<&str> = f.collect();
            Some((name.to_owned(), state.join(" ") == "running"))
        })
        .collect()
}

/// Every libvirt domain on this host, or the one agent `--socket` /
/// `--domain` names.
pub async fn targets(cli: &Cli) -> Result<Vec<FleetTarget>, CliError> {
    if let Some(d) = &cli.domain {
        let mut cmd = tokio::process::Command::new("virsh");
        if let Some(uri) = libvirt_uri() {
            cmd.args(["-c", uri]);
        }
        cmd.args(["domstate", "--", d]).kill_on_drop(true);
        // A domain virsh cannot say is running is looked up anyway: the
        // channel lookup then says what is wrong.
        let running = match cmd.output().await {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim() == "running",
            _ => true,
        };
        return Ok(vec![domain_target(d.clone(), running).await]);
    }
    if let Some(s) = &cli.socket {
        return Ok(vec![FleetTarget {
            name: s.display().to_string(),
            socket: Some(s.clone()),
            absent: None,
        }]);
    }
    let mut cmd = tokio::process::Command::new("virsh");
    if let Some(uri) = libvirt_uri() {
        cmd.args(["-c", uri]);
    }
    cmd.args(["-q", "list", "--all"]).kill_on_drop(true);
    let out = cmd.output().await.map_err(|e| LibvirtError::Virsh {
        domain: "(all)".into(),
        reason: format!("cannot run virsh: {e}"),
    })?;
    if !out.status.success() {
        return Err(LibvirtError::Virsh {
            domain: "(all)".into(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }
        .into());
    }
    let domains = parse_virsh_list(&String::from_utf8_lossy(&out.stdout));
    let found = futures::future::join_all(
        domains
            .into_iter()
            .map(|(name, running)| domain_target(name, running)),
    )
    .await;
    Ok(found)
}

async fn domain_target(name: String, running: bool) -> FleetTarget {
    if !running {
        return FleetTarget {
            name,
            socket: None,
            absent: Some("down"),
        };
    }
    match libvirt::channel_socket_for(libvirt_uri(), &name).await {
        Ok(p) => FleetTarget {
            name,
            socket: Some(p),
            absent: None,
        },
        Err(LibvirtError::Virsh { .. }) => FleetTarget {
            name,
            socket: None,
            absent: Some("down"),
        },
        Err(_) => FleetTarget {
            name,
            socket: None,
            absent: Some("no channel"),
        },
    }
}

/// What one VM's agent answered.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The target.
    pub target: FleetTarget,
    /// `up`, `down`, `no channel` or `not answering`.
    pub state: &'static str,
    /// The agent's version.
    pub version: Option<String>,
    /// `ping`'s round trip.
    pub rtt: Option<Duration>,
    /// Its metrics (with `metrics`).
    pub metrics: Option<Metrics>,
    /// Why it is not up.
    pub error: Option<String>,
    /// How long the probe took.
    pub took: Duration,
}

/// Connects to `t` and asks it, within `limit` in all.
pub async fn probe(t: FleetTarget, limit: Duration, with_metrics: bool) -> Probe {
    let started = Instant::now();
    let mut p = Probe {
        state: t.absent.unwrap_or("not answering"),
        target: t,
        version: None,
        rtt: None,
        metrics: None,
        error: None,
        took: Duration::ZERO,
    };
    let Some(socket) = p.target.socket.clone() else {
        return p;
    };
    let opts = ClientOptions {
        call_timeout: limit,
        connect_timeout: limit,
        sync_timeout: limit,
        reconnect: false,
        ..ClientOptions::default()
    };
    let ask = async {
        let client = Client::connect_with(socket, opts).await?;
        let t0 = Instant::now();
        client.ping().await?;
        let rtt = t0.elapsed();
        let info = client.agent_info().await?;
        let metrics = if with_metrics {
            Some(client.call::<GetMetricsRpc>(&Default::default()).await?)
        } else {
            None
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), client.close()).await;
        Ok::<_, crate::ClientError>((rtt, info.version, metrics))
    };
    match tokio::time::timeout(limit, ask).await {
        Ok(Ok((rtt, version, metrics))) => {
            p.state = "up";
            p.rtt = Some(rtt);
            p.version = Some(version);
            p.metrics = metrics;
        }
        Ok(Err(e)) => p.error = Some(e.to_string()),
        Err(_) => p.error = Some(format!("no answer within {} s", limit.as_secs())),
    }
    p.took = started.elapsed();
    p
}

/// Probes every target at once.
pub async fn probe_all(targets: Vec<FleetTarget>, limit: Duration, metrics: bool) -> Vec<Probe> {
    futures::future::join_all(targets.into_iter().map(|t| probe(t, limit, metrics))).await
}

/// Runs `list`, `top` or `exporter`; `None` for other commands.
pub(super) async fn dispatch(cli: &Cli) -> Result<Option<i32>, CliError> {
    match &cli.command {
        Command::List(a) => list(cli, a).await.map(Some),
        Command::Top(a) => top(cli, a).await.map(Some),
        Command::Exporter(a) => super::exporter::serve(cli, a).await.map(Some),
        _ => Ok(None),
    }
}

async fn list(cli: &Cli, a: &ListArgs) -> Result<i32, CliError> {
    loop {
        let probes = probe_all(
            targets(cli).await?,
            Duration::from_secs(a.vm_timeout.max(1)),
            true,
        )
        .await;
        if cli.json {
            let v: Vec<_> = probes
                .iter()
                .map(|p| {
                    json!({
                        "name": p.target.name,
                        "state": p.state,
                        "version": p.version,
                        "uptime_seconds": p.metrics.as_ref().map(|m| m.uptime_seconds),
                        "rtt_ms": p.rtt.map(|r| r.as_secs_f64() * 1000.0),
                        "error": p.error,
                    })
                })
                .collect();
            out_json(&v)?;
        } else {
            if a.watch.is_some() && std::io::stdout().is_terminal() {
                out("\x1b[H\x1b[2J")?;
            }
            out(&render_list(&probes))?;
        }
        match a.watch {
            Some(secs) => tokio::time::sleep(Duration::from_secs(secs.max(1))).await,
            None => return Ok(EXIT_OK),
        }
    }
}

/// The `list` table.
pub fn render_list(probes: &[Probe]) -> String {
    let rows: Vec<Vec<String>> = probes
        .iter()
        .map(|p| {
            vec![
                p.target.name.clone(),
                p.state.to_owned(),
                p.version.clone().unwrap_or_else(|| "-".into()),
                p.metrics
                    .as_ref()
                    .map_or("-".into(), |m| human_duration(m.uptime_seconds as f64)),
                p.rtt.map_or("-".into(), |r| {
                    format!("{:.1} ms", r.as_secs_f64() * 1000.0)
                }),
            ]
        })
        .collect();
    use Align::{Left as L, Right as R};
    table(
        &["VM", "AGENT", "VERSION", "UPTIME", "RTT"],
        &[L, L, L, R, R],
        &rows,
    )
}

/// Rates between two samples of one VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rates {
    /// CPU busy, percent of all CPUs.
    pub cpu_percent: f64,
    /// Memory in use, bytes.
    pub mem_used: u64,
    /// Memory in all, bytes.
    pub mem_total: u64,
    /// Disk bytes read per second (all devices).
    pub disk_read: f64,
    /// Disk bytes written per second.
    pub disk_write: f64,
    /// Network bytes received per second (all interfaces but `lo`).
    pub net_rx: f64,
    /// Network bytes sent per second.
    pub net_tx: f64,
}

/// The rates from sample `a` to the later sample `b`.
pub fn rates(a: &Metrics, b: &Metrics) -> Rates {
    let secs = (b.timestamp_ms.saturating_sub(a.timestamp_ms) as f64 / 1000.0).max(0.001);
    let busy = |m: &Metrics| {
        let c = &m.cpu_total;
        c.user_ms + c.nice_ms + c.system_ms + c.irq_ms + c.softirq_ms + c.steal_ms
    };
    let all = |m: &Metrics| busy(m) + m.cpu_total.idle_ms + m.cpu_total.iowait_ms;
    let d_all = all(b).saturating_sub(all(a));
    let cpu_percent = if d_all == 0 {
        0.0
    } else {
        busy(b).saturating_sub(busy(a)) as f64 * 100.0 / d_all as f64
    };
    // Whole disks only (no partitions), so nothing is counted twice.
    let disks = |m: &Metrics, f: fn(&agent_common::methods::DiskIo) -> u64| -> u64 {
        let names: Vec<&str> = m.disks.iter().map(|d| d.name.as_str()).collect();
        m.disks
            .iter()
            .filter(|d| !names.iter().any(|n| *n != d.name && d.name.starts_with(n)))
            .map(f)
            .sum()
    };
    let net = |m: &Metrics, f: fn(&agent_common::methods::NetworkCounters) -> u64| -> u64 {
        m.networks.iter().filter(|n| n.name != "lo").map(f).sum()
    };
    let per_sec = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
    Rates {
        cpu_percent,
        mem_used: b.memory.used_bytes,
        mem_total: b.memory.total_bytes,
        disk_read: per_sec(disks(a, |d| d.read_bytes), disks(b, |d| d.read_bytes)),
        disk_write: per_sec(disks(a, |d| d.write_bytes), disks(b, |d| d.write_bytes)),
        net_rx: per_sec(net(a, |n| n.rx_bytes), net(b, |n| n.rx_bytes)),
        net_tx: per_sec(net(a, |n| n.tx_bytes), net(b, |n| n.tx_bytes)),
    }
}

async fn top(cli: &Cli, a: &TopArgs) -> Result<i32, CliError> {
    let limit = Duration::from_secs(a.vm_timeout.max(1));
    let interval = Duration::from_secs(a.interval.max(1));
    let mut last: BTreeMap<String, Metrics> = BTreeMap::new();
    let mut done = 0u64;
    let tty = std::io::stdout().is_terminal();
    loop {
        let probes = probe_all(targets(cli).await?, limit, true).await;
        let mut rows = Vec::new();
        let mut jrows = Vec::new();
        for p in &probes {
            let now = p.metrics.clone();
            let r = match (last.get(&p.target.name), &now) {
                (Some(a), Some(b)) => Some(rates(a, b)),
                _ => None,
            };
            let cell = |f: &dyn Fn(&Rates) -> String| r.as_ref().map_or("-".into(), f);
            rows.push(vec![
                p.target.name.clone(),
                p.state.to_owned(),
                cell(&|r| format!("{:.1}%", r.cpu_percent)),
                now.as_ref().map_or("-".into(), |m| {
                    format!(
                        "{}/{}",
                        human_size(m.memory.used_bytes),
                        human_size(m.memory.total_bytes)
                    )
                }),
                cell(&|r| format!("{}/s", human_size(r.disk_read as u64))),
                cell(&|r| format!("{}/s", human_size(r.disk_write as u64))),
                cell(&|r| format!("{}/s", human_size(r.net_rx as u64))),
                cell(&|r| format!("{}/s", human_size(r.net_tx as u64))),
            ]);
            jrows.push(json!({
                "name": p.target.name,
                "state": p.state,
                "cpu_percent": r.as_ref().map(|r| r.cpu_percent),
                "memory_used_bytes": now.as_ref().map(|m| m.memory.used_bytes),
                "memory_total_bytes": now.as_ref().map(|m| m.memory.total_bytes),
                "disk_read_bytes_per_second": r.as_ref().map(|r| r.disk_read),
                "disk_write_bytes_per_second": r.as_ref().map(|r| r.disk_write),
                "net_rx_bytes_per_second": r.as_ref().map(|r| r.net_rx),
                "net_tx_bytes_per_second": r.as_ref().map(|r| r.net_tx),
            }));
            if let Some(m) = now {
                last.insert(p.target.name.clone(), m);
            }
        }
        if cli.json {
            out(&format!("{}\n", serde_json::Value::Array(jrows)))?;
        } else {
            use Align::{Left as L, Right as R};
            let mut screen = String::new();
            if tty {
                screen.push_str("\x1b[H\x1b[2J");
            }
            screen.push_str(&format!(
                "kvmmanager-ctl top: {} VMs, every {} s\n",
                probes.len(),
                interval.as_secs()
            ));
            screen.push_str(&table(
                &[
                    "VM",
                    "AGENT",
                    "CPU",
                    "MEMORY",
                    "DISK READ",
                    "DISK WRITE",
                    "NET RX",
                    "NET TX",
                ],
                &[L, L, R, R, R, R, R, R],
                &rows,
            ));
            out(&screen)?;
        }
        done += 1;
        if a.iterations.is_some_and(|n| done >= n) {
            return Ok(EXIT_OK);
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::methods::{CpuTotal, DiskIo, MemoryMetrics, NetworkCounters};

    fn sample(t_ms: u64, busy: u64, idle: u64, vda_read: u64, rx: u64) -> Metrics {
        Metrics {
            timestamp_ms: t_ms,
            uptime_seconds: 10,
            boot_time: 0,
            load_average: [0.0; 3],
            cpu_total: CpuTotal {
                user_ms: busy,
                idle_ms: idle,
                ..Default::default()
            },
            cpus: Vec::new(),
            memory: MemoryMetrics {
                total_bytes: 100,
                used_bytes: 40,
                ..Default::default()
            },
            pressure: None,
            disks: vec![
                DiskIo {
                    name: "vda".into(),
                    read_bytes: vda_read,
                    ..Default::default()
                },
                DiskIo {
                    name: "vda1".into(),
                    read_bytes: vda_read,
                    ..Default::default()
                },
            ],
            networks: vec![
                NetworkCounters {
                    name: "eth0".into(),
                    rx_bytes: rx,
                    ..Default::default()
                },
                NetworkCounters {
                    name: "lo".into(),
                    rx_bytes: rx * 100,
                    ..Default::default()
                },
            ],
            filesystems: Vec::new(),
            process_count: 1,
        }
    }

    #[test]
    fn rates_between_two_samples() {
        let a = sample(1_000, 100, 900, 0, 0);
        let b = sample(3_000, 350, 1650, 4096, 2000);
        let r = rates(&a, &b);
        assert!((r.cpu_percent - 25.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.disk_read, 2048.0, "whole disks only, per second");
        assert_eq!(r.net_rx, 1000.0, "without lo");
        assert_eq!((r.mem_used, r.mem_total), (40, 100));
        let same = rates(&b, &b);
        assert_eq!(same.cpu_percent, 0.0);
    }

    #[test]
    fn virsh_list_lines() {
        let text = " 3    web1   running\n -    db2    shut off\n 7    x      paused\n";
        assert_eq!(
            parse_virsh_list(text),
            [
                ("web1".to_owned(), true),
                ("db2".to_owned(), false),
                ("x".to_owned(), false)
            ]
        );
        assert!(parse_virsh_list("").is_empty());
    }

    #[test]
    fn since_ages_and_unix_times() {
        assert_eq!(parse_since("1700000000").unwrap(), 1_700_000_000);
        let t = parse_since("10m").unwrap();
        let now = now_secs();
        assert!(now - t >= 600 && now - t <= 602);
        assert!(parse_since("10x").is_err());
        assert!(parse_since("m").is_err());
    }

    #[test]
    fn the_list_table_shows_states() {
        let p = |name: &str, state| Probe {
            target: FleetTarget {
                name: name.into(),
                socket: None,
                absent: None,
            },
            state,
            version: (state == "up").then(|| "0.1.0".to_owned()),
            rtt: (state == "up").then(|| Duration::from_micros(1500)),
            metrics: None,
            error: None,
            took: Duration::ZERO,
        };
        let t = render_list(&[p("web1", "up"), p("db2", "down")]);
        assert!(t.contains("web1  up"), "{t}");
        assert!(t.contains("db2   down"), "{t}");
        assert!(t.contains("1.5 ms"), "{t}");
    }
}
