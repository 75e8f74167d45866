//! Params and results of the fleet-observability methods: metrics, the
//! process list, signals and log reading.
//!
//! Re-exported by [`crate::methods`], whose table names each method.

use serde::{Deserialize, Serialize};

use crate::guestops::{CpuTimes, DiskIo};

/// Most processes `list_processes` returns (its default `limit`).
pub const MAX_PROCESSES: u32 = 1000;
/// Most bytes of one process's command line `list_processes` returns.
pub const MAX_CMDLINE_BYTES: usize = 2048;
/// Most lines `read_log` returns (its `lines` cap).
pub const MAX_LOG_LINES: u32 = 10_000;
/// Most bytes of one log line `read_log` returns.
pub const MAX_LOG_LINE_BYTES: usize = 4096;
/// Most bytes of lines `read_log` returns in all.
pub const MAX_LOG_BYTES: usize = 1024 * 1024;

/// Result of `get_metrics`: counters since boot and levels now, cheap
/// enough to take every few seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// The guest's clock when taken, Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// Seconds since boot.
    pub uptime_seconds: u64,
    /// Boot time, Unix seconds.
    pub boot_time: u64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load_average: [f64; 3],
    /// Time in each state, summed over every CPU.
    pub cpu_total: CpuTotal,
    /// Time in each state, per CPU.
    pub cpus: Vec<CpuTimes>,
    /// Memory and swap.
    pub memory: MemoryMetrics,
    /// Pressure stall information; absent where the kernel has none
    /// (`CONFIG_PSI` off, or `psi=0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure: Option<Pressure>,
    /// I/O counters per block device that did any I/O.
    pub disks: Vec<DiskIo>,
    /// Counters per network interface.
    pub networks: Vec<NetworkCounters>,
    /// Usage of each mounted disk filesystem.
    pub filesystems: Vec<FilesystemMetrics>,
    /// Processes (not threads) running now.
    pub process_count: u32,
}

/// CPU time in each state, summed over every CPU, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTotal {
    /// Running user code.
    pub user_ms: u64,
    /// Running niced user code.
    pub nice_ms: u64,
    /// Running the kernel.
    pub system_ms: u64,
    /// Idle.
    pub idle_ms: u64,
    /// Idle while I/O was outstanding.
    pub iowait_ms: u64,
    /// Serving interrupts.
    pub irq_ms: u64,
    /// Serving soft interrupts.
    pub softirq_ms: u64,
    /// Stolen by the hypervisor.
    pub steal_ms: u64,
}

/// Memory and swap, in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryMetrics {
    /// Total memory.
    pub total_bytes: u64,
    /// Memory not used at all.
    pub free_bytes: u64,
    /// Memory available for new work without swapping (`MemAvailable`).
    pub available_bytes: u64,
    /// Memory in use (total minus available).
    pub used_bytes: u64,
    /// Total swap.
    pub swap_total_bytes: u64,
    /// Free swap.
    pub swap_free_bytes: u64,
    /// Swap in use.
    pub swap_used_bytes: u64,
}

/// Pressure stall information (`/proc/pressure/*`), per resource; a
/// resource the kernel does not report is absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    /// CPU pressure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<PressureResource>,
    /// Memory pressure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<PressureResource>,
    /// I/O pressure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<PressureResource>,
}

/// One resource's pressure: some tasks stalled, and (where the kernel
/// reports it) all tasks stalled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PressureResource {
    /// At least one task stalled.
    pub some: PressureLine,
    /// Every non-idle task stalled at once; absent for the CPU on older
    /// kernels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<PressureLine>,
}

/// One line of a pressure file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PressureLine {
    /// Percentage of the last 10 seconds stalled.
    pub avg10: f64,
    /// Percentage of the last 60 seconds stalled.
    pub avg60: f64,
    /// Percentage of the last 300 seconds stalled.
    pub avg300: f64,
    /// Microseconds stalled since boot.
    pub total_us: u64,
}

/// One network interface's counters since it appeared.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkCounters {
    /// Interface name.
    pub name: String,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Send errors.
    pub tx_errors: u64,
}

/// One mounted disk filesystem's usage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesystemMetrics {
    /// Mount point.
    pub mount_point: String,
    /// Source device.
    pub device: String,
    /// Filesystem type.
    pub fs_type: String,
    /// Size in bytes.
    pub total_bytes: u64,
    /// Bytes available to unprivileged users.
    pub available_bytes: u64,
    /// Mounted read-only.
    pub read_only: bool,
}

/// What `list_processes` sorts by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessSort {
    /// Ascending process id.
    #[default]
    Pid,
    /// Most CPU time first.
    Cpu,
    /// Largest resident set first.
    Memory,
    /// Most recently started first.
    Start,
}

/// Params of `list_processes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessListParams {
    /// Only processes whose name or command line contains this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Only processes of this user (name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Order of the list. Default `pid`.
    #[serde(default)]
    pub sort: ProcessSort,
    /// Most processes returned (the first in `sort` order); default and
    /// maximum 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Also list kernel threads. Default false.
    #[serde(default)]
    pub include_kernel_threads: bool,
}

/// Result of `list_processes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessList {
    /// Processes that matched, before `limit`.
    pub matched: u32,
    /// The processes, in `sort` order, at most `limit`.
    pub processes: Vec<ProcessInfo>,
}

/// One process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: u32,
    /// Parent's process id (none for the first processes).
    pub ppid: Option<u32>,
    /// Real user id.
    pub uid: Option<u32>,
    /// User name, where the user database has one.
    pub user: Option<String>,
    /// State: `running`, `sleeping`, `disk_sleep`, `stopped`, `zombie`,
    /// `idle`, ... (`unknown` otherwise).
    pub state: String,
    /// Command name (`comm`).
    pub name: String,
    /// Command line, argument by argument (cut at 2 KiB in all; empty for
    /// kernel threads).
    pub cmdline: Vec<String>,
    /// CPU time used, user and system, in milliseconds.
    pub cpu_time_ms: u64,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
    /// Start time, Unix seconds.
    pub start_time: u64,
}

/// Params of `kill_process`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillParams {
    /// The process.
    pub pid: u32,
    /// Signal name: `TERM` (default), `KILL`, `INT`, `HUP`, `QUIT`, `USR1`,
    /// `USR2`, `STOP`, `CONT` (a `SIG` prefix is accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// The process's start time (`list_processes`' `start_time`): when
    /// given, a process with that pid but another start time (the pid was
    /// reused) is not signalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
}

/// Result of `kill_process`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillResult {
    /// The process signalled.
    pub pid: u32,
    /// The signal sent, by name (`TERM`).
    pub signal: String,
}

/// Params of `read_log`: exactly one of `path` and `unit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadLogParams {
    /// A log file beneath `allowed_read_paths`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A systemd unit whose journal to read (`nginx.service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The last this many lines (of those matching); default 100, at most
    /// 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<u32>,
    /// Only lines logged at or after this Unix time (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Only lines containing this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

/// Result of `read_log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLines {
    /// What was read: `file:/var/log/syslog` or `journal:nginx.service`.
    pub source: String,
    /// The lines, oldest first, without their newline (each cut at 4 KiB).
    pub lines: Vec<String>,
    /// True if older matching lines may exist that were not returned:
    /// `lines` were found, or a size limit was reached first.
    pub truncated: bool,
}
