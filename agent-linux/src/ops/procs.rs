//! `get_metrics`, `list_processes` and `kill_process`, read from `/proc`:
//! memory and swap (`/proc/meminfo`), load and uptime, the cumulative time
//! per CPU and state (`/proc/stat`), the I/O counters per block device
//! (`/proc/diskstats`), pressure stall information (`/proc/pressure/*`) and
//! the processes ([`proc_pid`]); the network counters and the filesystems
//! come from the readers of `get_network_info` (`/sys/class/net/*/statistics`)
//! and `get_disk_usage` (the mounts and `statvfs`). Blocking; nothing is
//! kept between calls, so two hosts asking at once see the same counters.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use agent_common::error::ErrorKind;
use agent_common::methods::{
    CpuTimes, CpuTotal, FilesystemMetrics, KillParams, KillResult, MemoryMetrics, Metrics,
    NetworkCounters, Pressure, PressureLine, PressureResource, ProcessInfo, ProcessList,
    ProcessListParams, ProcessSort, MAX_CMDLINE_BYTES, MAX_PROCESSES,
};
use nix::sys::signal::Signal;
use nix::unistd::{Pid, Uid, User};

use crate::error::RpcError;
use crate::ops::proc_pid::{self, Units};
use crate::ops::stats;
use crate::sysinfo::{meminfo_bytes, parse_loadavg, parse_uptime, read, SysInfoError};

/// `get_metrics`.
pub fn metrics() -> Result<Metrics, SysInfoError> {
    let proc_stat = read("/proc/stat")?;
    let cpus = stats::parse_cpu_times(&proc_stat, crate::sys::clock_ticks());
    let disks = stats::parse_diskstats(&read("/proc/diskstats")?);
    let meminfo = read("/proc/meminfo")?;
    let mem = |key| meminfo_bytes(&meminfo, key);
    let memory = MemoryMetrics {
        total_bytes: mem("MemTotal"),
        free_bytes: mem("MemFree"),
        available_bytes: mem("MemAvailable"),
        used_bytes: mem("MemTotal").saturating_sub(mem("MemAvailable")),
        swap_total_bytes: mem("SwapTotal"),
        swap_free_bytes: mem("SwapFree"),
        swap_used_bytes: mem("SwapTotal").saturating_sub(mem("SwapFree")),
    };
    let process_count = proc_pid::read_all()
        .map_err(|source| SysInfoError::Read {
            path: "/proc".to_owned(),
            source,
        })?
        .iter()
        .filter(|p| !p.kernel)
        .count() as u32;

    let mut networks: Vec<NetworkCounters> = crate::sysinfo::interface_names()?
        .into_iter()
        .map(|name| {
            let s = crate::sysinfo::interface_statistics(&name);
            NetworkCounters {
                name,
                rx_bytes: s.rx_bytes,
                rx_packets: s.rx_packets,
                rx_errors: s.rx_errors,
                tx_bytes: s.tx_bytes,
                tx_packets: s.tx_packets,
                tx_errors: s.tx_errors,
            }
        })
        .collect();
    networks.sort_by(|a, b| a.name.cmp(&b.name));

    let filesystems = crate::sysinfo::disk_usage(false)?
        .filesystems
        .into_iter()
        .map(|f| FilesystemMetrics {
            mount_point: f.mount_point,
            device: f.device,
            fs_type: f.fs_type,
            total_bytes: f.total_bytes,
            available_bytes: f.free_bytes,
            read_only: f.read_only,
        })
        .collect();

    Ok(Metrics {
        timestamp_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        uptime_seconds: parse_uptime(&read("/proc/uptime")?) as u64,
        boot_time: proc_pid::boot_time(&proc_stat).unwrap_or(0),
        load_average: parse_loadavg(&read("/proc/loadavg")?),
        cpu_total: sum_cpus(&cpus),
        cpus,
        memory,
        pressure: pressure(|name| std::fs::read_to_string(format!("/proc/pressure/{name}")).ok()),
        disks,
        networks,
        filesystems,
        process_count,
    })
}

/// The time in each state summed over `cpus`.
pub fn sum_cpus(cpus: &[CpuTimes]) -> CpuTotal {
    let mut t = CpuTotal::default();
    for c in cpus {
        t.user_ms += c.user_ms;
        t.nice_ms += c.nice_ms;
        t.system_ms += c.system_ms;
        t.idle_ms += c.idle_ms;
        t.iowait_ms += c.iowait_ms;
        t.irq_ms += c.irq_ms;
        t.softirq_ms += c.softirq_ms;
        t.steal_ms += c.steal_ms;
    }
    t
}

/// Pressure stall information from `read("cpu" | "memory" | "io")`, the
/// text of `/proc/pressure/<name>`; `None` when the kernel has none.
pub fn pressure(read: impl Fn(&str) -> Option<String>) -> Option<Pressure> {
    let p = Pressure {
        cpu: read("cpu").and_then(|t| parse_pressure(&t)),
        memory: read("memory").and_then(|t| parse_pressure(&t)),
        io: read("io").and_then(|t| parse_pressure(&t)),
    };
    (p.cpu.is_some() || p.memory.is_some() || p.io.is_some()).then_some(p)
}

/// One `/proc/pressure/*` file:
/// `some avg10=0.00 avg60=0.00 avg300=0.00 total=0` and a `full` line.
pub fn parse_pressure(text: &str) -> Option<PressureResource> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let slot = match fields.next() {
            Some("some") => &mut some,
            Some("full") => &mut full,
            _ => continue,
        };
        let mut l = PressureLine::default();
        for f in fields {
            let Some((k, v)) = f.split_once('=') else {
                continue;
            };
            match k {
                "avg10" => l.avg10 = v.parse().unwrap_or(0.0),
                "avg60" => l.avg60 = v.parse().unwrap_or(0.0),
                "avg300" => l.avg300 = v.parse().unwrap_or(0.0),
                "total" => l.total_us = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        *slot = Some(l);
    }
    Some(PressureResource { some: some?, full })
}

/// `list_processes`.
pub fn list_processes(p: ProcessListParams) -> Result<ProcessList, ProcessError> {
    let limit = match p.limit {
        Some(0) => return Err(ProcessError::Limit(0)),
        Some(n) if n > MAX_PROCESSES => return Err(ProcessError::Limit(n)),
        Some(n) => n,
        None => MAX_PROCESSES,
    } as usize;
    let table = proc_pid::read_all().map_err(ProcessError::Table)?;
    let units = Units::of_this_system();
    let mut names = UserNames::default();
    let mut all: Vec<ProcessInfo> = table
        .into_iter()
        .filter(|s| p.include_kernel_threads || !s.kernel)
        .map(|s| {
            let uid = proc_pid::uid(s.pid);
            ProcessInfo {
                pid: s.pid,
                ppid: (s.ppid != 0).then_some(s.ppid),
                uid,
                user: uid.and_then(|u| names.name(u)),
                state: s.state_name().to_owned(),
                cmdline: bounded_cmdline(proc_pid::cmdline(s.pid).iter()),
                cpu_time_ms: s.cpu_time_ms(units),
                rss_bytes: s.rss_bytes(units),
                start_time: s.start_time(units),
                name: s.comm,
            }
        })
        .filter(|info| matches(info, &p))
        .collect();
    sort(&mut all, p.sort);
    let matched = all.len() as u32;
    all.truncate(limit);
    Ok(ProcessList {
        matched,
        processes: all,
    })
}

/// The process passes `list_processes`' `filter` and `user`.
fn matches(info: &ProcessInfo, p: &ProcessListParams) -> bool {
    if let Some(user) = &p.user {
        if info.user.as_deref() != Some(user.as_str()) {
            return false;
        }
    }
    match &p.filter {
        Some(f) => {
            info.name.contains(f.as_str()) || info.cmdline.iter().any(|a| a.contains(f.as_str()))
        }
        None => true,
    }
}

/// Sorts by `key`; ties by pid, so the order is stable between calls.
pub fn sort(list: &mut [ProcessInfo], key: ProcessSort) {
    match key {
        ProcessSort::Pid => list.sort_by_key(|p| p.pid),
        ProcessSort::Cpu => {
            list.sort_by(|a, b| b.cpu_time_ms.cmp(&a.cpu_time_ms).then(a.pid.cmp(&b.pid)))
        }
        ProcessSort::Memory => {
            list.sort_by(|a, b| b.rss_bytes.cmp(&a.rss_bytes).then(a.pid.cmp(&b.pid)))
        }
        ProcessSort::Start => {
            list.sort_by(|a, b| b.start_time.cmp(&a.start_time).then(a.pid.cmp(&b.pid)))
        }
    }
}

/// The arguments, cut so that together they hold at most
/// [`MAX_CMDLINE_BYTES`] bytes (at a character boundary).
pub fn bounded_cmdline<S: AsRef<str>>(args: impl Iterator<Item = S>) -> Vec<String> {
    let mut left = MAX_CMDLINE_BYTES;
    let mut out = Vec::new();
    for a in args {
        let a = a.as_ref();
        if left == 0 {
            break;
        }
        let mut end = a.len().min(left);
        while !a.is_char_boundary(end) {
            end -= 1;
        }
        out.push(a[..end].to_owned());
        if end < a.len() {
            // Cut: what follows would be read as whole arguments.
            break;
        }
        left -= end;
    }
    out
}

/// User names by uid, looked up once per call.
#[derive(Default)]
struct UserNames(HashMap<u32, Option<String>>);

impl UserNames {
    fn name(&mut self, uid: u32) -> Option<String> {
        self.0
            .entry(uid)
            .or_insert_with(|| {
                User::from_uid(Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }
}

/// The signals `kill_process` sends, by name.
const SIGNALS: &[(&str, Signal)] = &[
    ("TERM", Signal::SIGTERM),
    ("KILL", Signal::SIGKILL),
    ("INT", Signal::SIGINT),
    ("HUP", Signal::SIGHUP),
    ("QUIT", Signal::SIGQUIT),
    ("USR1", Signal::SIGUSR1),
    ("USR2", Signal::SIGUSR2),
    ("STOP", Signal::SIGSTOP),
    ("CONT", Signal::SIGCONT),
];

/// The signal `name` names (`TERM` or `SIGTERM`); `None`: `TERM`.
pub fn parse_signal(name: Option<&str>) -> Result<(&'static str, Signal), ProcessError> {
    let name = name.unwrap_or("TERM");
    let bare = name.strip_prefix("SIG").unwrap_or(name);
    SIGNALS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(bare))
        .copied()
        .ok_or_else(|| ProcessError::Signal(name.to_owned()))
}

/// What [`check_target`] needs to know of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Its pid.
    pub pid: u32,
    /// Its thread group (the process a thread belongs to).
    pub tgid: u32,
    /// A kernel thread (`PF_KTHREAD`).
    pub kernel: bool,
    /// Its start time, Unix seconds.
    pub start_time: u64,
}

/// Refuses what `kill_process` never signals: pid 0 or 1 (init: the
/// guest would panic or stop), the agent itself (its threads included),
/// kernel threads, and a process started at another time than the caller
/// said (its pid was reused).
pub fn check_target(t: Target, agent: u32, start_time: Option<u64>) -> Result<(), ProcessError> {
    if t.pid <= 1 {
        return Err(ProcessError::Refused {
            pid: t.pid,
            why: "it is the guest's init process",
        });
    }
    if t.tgid == agent {
        return Err(ProcessError::Refused {
            pid: t.pid,
            why: "it is the agent itself",
        });
    }
    if t.kernel {
        return Err(ProcessError::Refused {
            pid: t.pid,
            why: "it is a kernel thread",
        });
    }
    if let Some(expected) = start_time {
        if expected != t.start_time {
            return Err(ProcessError::Reused {
                pid: t.pid,
                expected,
                actual: t.start_time,
            });
        }
    }
    Ok(())
}

/// `kill_process`.
pub fn kill_process(p: KillParams) -> Result<KillResult, ProcessError> {
    let (name, signal) = parse_signal(p.signal.as_deref())?;
    if p.pid <= 1 {
        check_target(
            Target {
                pid: p.pid,
                tgid: p.pid,
                kernel: false,
                start_time: 0,
            },
            std::process::id(),
            None,
        )?;
    }
    let stat = proc_pid::read_one(p.pid)
        .map_err(ProcessError::Table)?
        .ok_or(ProcessError::NotFound(p.pid))?;
    let units = Units::of_this_system();
    // A thread id names the process it belongs to in /proc/<tid>/status.
    let tgid = proc_pid::thread_group(p.pid).unwrap_or(p.pid);
    check_target(
        Target {
            pid: p.pid,
            tgid,
            kernel: stat.kernel,
            start_time: stat.start_time(units),
        },
        std::process::id(),
        p.start_time,
    )?;
    let pid = i32::try_from(p.pid).map_err(|_| ProcessError::NotFound(p.pid))?;
    nix::sys::signal::kill(Pid::from_raw(pid), signal).map_err(|e| match e {
        nix::errno::Errno::ESRCH => ProcessError::NotFound(p.pid),
        e => ProcessError::Kill {
            pid: p.pid,
            source: std::io::Error::from(e),
        },
    })?;
    Ok(KillResult {
        pid: p.pid,
        signal: name.to_owned(),
    })
}

/// Why `list_processes` or `kill_process` failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// `limit` out of range.
    #[error("limit {0} is out of range: give 1 to 1000")]
    Limit(u32),
    /// A signal name not in the list.
    #[error("unknown signal {0:?}: use TERM, KILL, INT, HUP, QUIT, USR1, USR2, STOP or CONT")]
    Signal(String),
    /// `/proc` could not be read.
    #[error("could not read the process table under /proc")]
    Table(#[source] std::io::Error),
    /// No such process.
    #[error("no process {0}")]
    NotFound(u32),
    /// A process `kill_process` never signals.
    #[error("process {pid} is not signalled: {why}")]
    Refused {
        /// The process.
        pid: u32,
        /// Why.
        why: &'static str,
    },
    /// The pid names a process started at another time.
    #[error(
        "process {pid} started at {actual}, not at {expected}: its pid was reused; \
         nothing was signalled"
    )]
    Reused {
        /// The process.
        pid: u32,
        /// The start time the host gave.
        expected: u64,
        /// The start time of the process with that pid now.
        actual: u64,
    },
    /// `kill(2)` failed.
    #[error("could not signal process {pid}")]
    Kill {
        /// The process.
        pid: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl RpcError for ProcessError {
    fn kind(&self) -> ErrorKind {
        match self {
            ProcessError::Limit(_) | ProcessError::Signal(_) => ErrorKind::InvalidParams,
            ProcessError::NotFound(_) | ProcessError::Reused { .. } => ErrorKind::NotFound,
            ProcessError::Refused { .. } => ErrorKind::PolicyDenied,
            ProcessError::Kill { source, .. } | ProcessError::Table(source) => {
                crate::error::io_error_kind(source)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pid: u32, cpu: u64, rss: u64, start: u64) -> ProcessInfo {
        ProcessInfo {
            pid,
            ppid: Some(1),
            uid: Some(0),
            user: Some("root".into()),
            state: "sleeping".into(),
            name: format!("p{pid}"),
            cmdline: vec![format!("/bin/p{pid}"), "--flag".into()],
            cpu_time_ms: cpu,
            rss_bytes: rss,
            start_time: start,
        }
    }

    #[test]
    fn pressure_lines_parse_and_absent_files_give_none() {
        let text = "some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\n\
                    full avg10=0.10 avg60=0.00 avg300=0.00 total=99\n";
        let r = parse_pressure(text).unwrap();
        assert_eq!(r.some.avg10, 1.5);
        assert_eq!(r.some.avg60, 0.25);
        assert_eq!(r.some.total_us, 12345);
        assert_eq!(r.full.unwrap().total_us, 99);
        // Older kernels have no `full` line for the CPU.
        let r = parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n").unwrap();
        assert_eq!(r.full, None);
        assert_eq!(parse_pressure(""), None);
        assert_eq!(parse_pressure("garbage\n"), None);
        assert_eq!(pressure(|_| None), None);
        let p = pressure(|n| (n == "io").then(|| text.to_owned())).unwrap();
        assert!(p.cpu.is_none() && p.memory.is_none() && p.io.is_some());
    }

    #[test]
    fn cpu_total_is_the_sum() {
        let c = |cpu, user_ms, idle_ms| CpuTimes {
            cpu,
            user_ms,
            idle_ms,
            ..Default::default()
        };
        let t = sum_cpus(&[c(0, 10, 100), c(1, 5, 50)]);
        assert_eq!((t.user_ms, t.idle_ms, t.system_ms), (15, 150, 0));
    }

    #[test]
    fn sorting_and_filtering() {
        let mut l = vec![
            info(3, 10, 300, 5),
            info(1, 30, 100, 9),
            info(2, 30, 200, 7),
        ];
        sort(&mut l, ProcessSort::Cpu);
        assert_eq!(l.iter().map(|p| p.pid).collect::<Vec<_>>(), [1, 2, 3]);
        sort(&mut l, ProcessSort::Memory);
        assert_eq!(l.iter().map(|p| p.pid).collect::<Vec<_>>(), [3, 2, 1]);
        sort(&mut l, ProcessSort::Start);
        assert_eq!(l.iter().map(|p| p.pid).collect::<Vec<_>>(), [1, 2, 3]);
        sort(&mut l, ProcessSort::Pid);
        assert_eq!(l.iter().map(|p| p.pid).collect::<Vec<_>>(), [1, 2, 3]);
        let by = |filter: Option<&str>, user: Option<&str>| ProcessListParams {
            filter: filter.map(Into::into),
            user: user.map(Into::into),
            ..Default::default()
        };
        assert!(matches(&l[0], &by(Some("p1"), None)));
        assert!(matches(&l[0], &by(Some("--flag"), Some("root"))));
        assert!(!matches(&l[0], &by(Some("p2"), None)));
        assert!(!matches(&l[0], &by(None, Some("nobody"))));
    }

    #[test]
    fn command_lines_are_bounded_at_a_character_boundary() {
        let long = "é".repeat(MAX_CMDLINE_BYTES);
        let out = bounded_cmdline(["a", long.as_str(), "never"].iter());
        assert_eq!(out[0], "a");
        assert_eq!(out.len(), 2);
        let total: usize = out.iter().map(String::len).sum();
        assert!((MAX_CMDLINE_BYTES - 1..=MAX_CMDLINE_BYTES).contains(&total));
    }

    #[test]
    fn signals_by_name() {
        assert_eq!(parse_signal(None).unwrap().0, "TERM");
        assert_eq!(parse_signal(Some("SIGKILL")).unwrap().1, Signal::SIGKILL);
        assert_eq!(parse_signal(Some("hup")).unwrap().0, "HUP");
        for bad in ["", "9", "SEGV", "SIGSYS", "TERM "] {
            assert!(
                matches!(parse_signal(Some(bad)), Err(ProcessError::Signal(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn init_the_agent_kernel_threads_and_reused_pids_are_refused() {
        let t = |pid, tgid, kernel, start_time| Target {
            pid,
            tgid,
            kernel,
            start_time,
        };
        let refused = |r: Result<(), ProcessError>| matches!(r, Err(ProcessError::Refused { .. }));
        assert!(refused(check_target(t(0, 0, false, 0), 500, None)));
        assert!(refused(check_target(t(1, 1, false, 0), 500, None)));
        assert!(refused(check_target(t(500, 500, false, 0), 500, None)));
        assert!(
            refused(check_target(t(503, 500, false, 0), 500, None)),
            "a thread of the agent"
        );
        assert!(refused(check_target(t(2, 2, true, 0), 500, None)));
        assert!(matches!(
            check_target(t(700, 700, false, 10), 500, Some(11)),
            Err(ProcessError::Reused { .. })
        ));
        assert!(check_target(t(700, 700, false, 10), 500, Some(10)).is_ok());
        assert!(check_target(t(700, 700, false, 10), 500, None).is_ok());
    }

    #[test]
    fn kill_refuses_the_agent_init_and_missing_processes() {
        let me = std::process::id();
        let r = kill_process(KillParams {
            pid: me,
            ..Default::default()
        });
        assert!(matches!(r, Err(ProcessError::Refused { .. })), "{r:?}");
        let r = kill_process(KillParams {
            pid: 1,
            signal: Some("KILL".into()),
            ..Default::default()
        });
        assert!(matches!(r, Err(ProcessError::Refused { .. })), "{r:?}");
        // A child found and signalled: tests/fleet.rs (processes are
        // spawned by exec.rs only, tests/tidy.rs).
        assert!(matches!(
            kill_process(KillParams {
                pid: u32::MAX - 1,
                ..Default::default()
            }),
            Err(ProcessError::NotFound(_))
        ));
    }

    #[test]
    fn metrics_of_this_machine_are_plausible() {
        let m = metrics().unwrap();
        assert!(!m.cpus.is_empty());
        assert!(m.memory.total_bytes > 0);
        assert!(m.memory.available_bytes <= m.memory.total_bytes);
        assert!(m.process_count > 0);
        assert!(m.uptime_seconds > 0);
        assert!(m.networks.iter().any(|n| n.name == "lo"));
        assert_eq!(m.cpu_total, sum_cpus(&m.cpus));
    }
}
