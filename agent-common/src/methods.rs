//! Every method: its name, typed params and typed result.
//!
//! Each method is a unit type implementing [`Rpc`], which ties the method
//! name to its params and result types. The agent dispatches on [`Method`];
//! the host client calls `client.call::<M>(params)`. Params reject unknown
//! fields, so a typo is an `invalid_params` error and not a silent default.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::encoding::Encoding;
pub use crate::fleet::*;
pub use crate::guestops::*;
pub use crate::streams::*;

/// A method: its wire name and its params and result types.
pub trait Rpc {
    /// The method.
    const METHOD: Method;
    /// Params sent by the host.
    type Params: Serialize + DeserializeOwned + Send + Sync;
    /// Result returned by the agent.
    type Result: Serialize + DeserializeOwned + Send;
}

/// What the agent's dispatch, `get_agent_info`, the audit log and the policy
/// need to know of a method, declared once beside its types (the table
/// below), never in a hand-kept list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Answered at once: no concurrency slot, never queued behind other
    /// work, never `busy` or `timeout`.
    pub instant: bool,
    /// What bounds its time.
    pub time_limit: TimeLimit,
    /// Takes a request attachment (the data of a `file_write`).
    pub attachment_in: bool,
    /// May answer with an attachment (the data of a `file_read`).
    pub attachment_out: bool,
    /// Changes the guest: logged at info with its outcome (the audit
    /// trail), and the kind of method a policy restricts.
    pub changes_guest: bool,
    /// May run while the guest's filesystems are frozen.
    pub while_frozen: bool,
}

/// What bounds a method's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeLimit {
    /// Nothing: the method is instant.
    None,
    /// `request_timeout_seconds`.
    Request,
    /// Its own params (`exec_command`'s `timeout_seconds`).
    Own,
}

impl Facts {
    /// `ping`, `sync`, `get_agent_info`.
    const INSTANT: Facts = Facts {
        instant: true,
        time_limit: TimeLimit::None,
        attachment_in: false,
        attachment_out: false,
        changes_guest: false,
        while_frozen: true,
    };
    /// A read of the guest's state that takes a slot.
    const QUERY: Facts = Facts {
        instant: false,
        time_limit: TimeLimit::Request,
        ..Facts::INSTANT
    };
    /// A method that changes the guest.
    const CHANGE: Facts = Facts {
        changes_guest: true,
        while_frozen: false,
        ..Facts::QUERY
    };
}

/// Something done for every method's [`Rpc`] type (see
/// [`for_each_rpc`]): for tests and tools that check each method's types,
/// such as the PROTOCOL.md drift test.
pub trait RpcVisitor {
    /// Called once per method, in [`Method::ALL`] order.
    fn visit<M: Rpc>(&mut self);
}

macro_rules! methods {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, $ty:ident, $params:ty, $result:ty, $facts:expr; )*) => {
        /// Every method the protocol defines.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Method {
            $( $(#[$doc])* $variant, )*
        }

        impl Method {
            /// Every method, in the order PROTOCOL.md documents them.
            pub const ALL: &'static [Method] = &[ $( Method::$variant, )* ];

            /// The wire name.
            pub const fn as_str(self) -> &'static str {
                match self { $( Method::$variant => $name, )* }
            }

            /// The method with this wire name.
            pub fn from_name(name: &str) -> Option<Method> {
                match name { $( $name => Some(Method::$variant), )* _ => None }
            }

            /// What is known of the method (see [`Facts`]).
            pub const fn facts(self) -> Facts {
                match self { $( Method::$variant => $facts, )* }
            }
        }

        /// Calls `visitor` with every method's [`Rpc`] type, in
        /// [`Method::ALL`] order.
        pub fn for_each_rpc(visitor: &mut impl RpcVisitor) {
            $( visitor.visit::<$ty>(); )*
        }

        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy)]
            pub struct $ty;

            impl Rpc for $ty {
                const METHOD: Method = Method::$variant;
                type Params = $params;
                type Result = $result;
            }
        )*
    };
}

methods! {
    /// `ping`: liveness check.
    Ping => "ping", PingRpc, Empty, PingResult, Facts::INSTANT;
    /// `sync`: resynchronisation handshake; echoes the nonce.
    Sync => "sync", SyncRpc, SyncParams, SyncResult, Facts::INSTANT;
    /// `get_agent_info`: version, protocol version, methods and limits.
    GetAgentInfo => "get_agent_info", GetAgentInfoRpc, Empty, AgentInfo, Facts::INSTANT;
    /// `get_system_info`: OS, kernel, hostname, CPUs, memory, uptime.
    GetSystemInfo => "get_system_info", GetSystemInfoRpc, Empty, SystemInfo, Facts::QUERY;
    /// `get_network_info`: interfaces, addresses and counters.
    GetNetworkInfo => "get_network_info", GetNetworkInfoRpc, Empty, NetworkInfo, Facts::QUERY;
    /// `get_disk_usage`: mounted filesystems and their usage.
    GetDiskUsage => "get_disk_usage", GetDiskUsageRpc, DiskUsageParams, DiskUsage, Facts::QUERY;
    /// `exec_command`: run a command to completion and return its output.
    ExecCommand => "exec_command", ExecCommandRpc, ExecParams, ExecResult,
        Facts { time_limit: TimeLimit::Own, ..Facts::CHANGE };
    /// `file_read`: read (a range of) a file.
    FileRead => "file_read", FileReadRpc, FileReadParams, FileReadResult,
        Facts { attachment_out: true, ..Facts::QUERY };
    /// `file_write`: write a file, whole or in chunks.
    FileWrite => "file_write", FileWriteRpc, FileWriteParams, FileWriteResult,
        Facts { attachment_in: true, ..Facts::CHANGE };
    /// `shutdown`: power the guest off (after replying).
    Shutdown => "shutdown", ShutdownRpc, PowerParams, PowerResult, Facts::CHANGE;
    /// `reboot`: reboot the guest (after replying).
    Reboot => "reboot", RebootRpc, PowerParams, PowerResult, Facts::CHANGE;
    /// `cancel`: stop a request of this connection, or abort one of its uploads.
    Cancel => "cancel", CancelRpc, CancelParams, CancelResult, Facts::INSTANT;
    /// `fs_freeze`: freeze local filesystems (they thaw by themselves at
    /// `freeze_timeout_seconds`).
    FsFreeze => "fs_freeze", FsFreezeRpc, FsFreezeParams, FsFreezeResult,
        Facts { time_limit: TimeLimit::Own, ..Facts::CHANGE };
    /// `fs_thaw`: thaw what `fs_freeze` froze. Instant: answered even with
    /// every slot taken.
    FsThaw => "fs_thaw", FsThawRpc, Empty, FsThawResult,
        Facts { changes_guest: true, ..Facts::INSTANT };
    /// `fs_freeze_status`: frozen or thawed, and for how much longer.
    FsFreezeStatus => "fs_freeze_status", FsFreezeStatusRpc, Empty, FsFreezeStatusResult,
        Facts::INSTANT;
    /// `fs_trim`: discard unused blocks (`FITRIM`).
    FsTrim => "fs_trim", FsTrimRpc, FsTrimParams, FsTrimResult, Facts::CHANGE;
    /// `get_time`: wall clock and time zone.
    GetTime => "get_time", GetTimeRpc, Empty, TimeInfo, Facts::QUERY;
    /// `set_time`: set the wall clock (and the hardware clock).
    SetTime => "set_time", SetTimeRpc, SetTimeParams, SetTimeResult, Facts::CHANGE;
    /// `get_users`: login sessions (utmp).
    GetUsers => "get_users", GetUsersRpc, Empty, LoggedInUsers, Facts::QUERY;
    /// `ssh_keys_get`: a user's authorized SSH keys.
    SshKeysGet => "ssh_keys_get", SshKeysGetRpc, SshUserParams, SshKeysResult, Facts::QUERY;
    /// `ssh_keys_add`: add keys to the agent's block of `authorized_keys`.
    SshKeysAdd => "ssh_keys_add", SshKeysAddRpc, SshKeysParams, SshKeysResult, Facts::CHANGE;
    /// `ssh_keys_remove`: remove keys from the agent's block.
    SshKeysRemove => "ssh_keys_remove", SshKeysRemoveRpc, SshKeysParams, SshKeysResult,
        Facts::CHANGE;
    /// `ssh_keys_set`: replace the agent's block with these keys.
    SshKeysSet => "ssh_keys_set", SshKeysSetRpc, SshKeysParams, SshKeysResult, Facts::CHANGE;
    /// `set_user_password`: set a user's password (`chpasswd`).
    SetUserPassword => "set_user_password", SetUserPasswordRpc, SetPasswordParams,
        SetPasswordResult, Facts::CHANGE;
    /// `get_vcpus`: CPUs and whether they are online.
    GetVcpus => "get_vcpus", GetVcpusRpc, Empty, Vcpus, Facts::QUERY;
    /// `set_vcpus`: bring CPUs online or take them offline.
    SetVcpus => "set_vcpus", SetVcpusRpc, SetVcpusParams, Vcpus, Facts::CHANGE;
    /// `get_fsinfo`: filesystems and the disks beneath them.
    GetFsinfo => "get_fsinfo", GetFsinfoRpc, Empty, FsInfo, Facts::QUERY;
    /// `get_block_devices`: block devices and how they depend on each other.
    GetBlockDevices => "get_block_devices", GetBlockDevicesRpc, Empty, BlockDevices,
        Facts::QUERY;
    /// `get_stats`: load, per-CPU times, per-disk I/O, routes.
    GetStats => "get_stats", GetStatsRpc, Empty, GuestStats, Facts::QUERY;
    /// `get_memory_blocks`: memory blocks and whether they are online.
    GetMemoryBlocks => "get_memory_blocks", GetMemoryBlocksRpc, Empty, MemoryBlocks,
        Facts::QUERY;
    /// `set_memory_blocks`: bring memory blocks online or take them offline.
    SetMemoryBlocks => "set_memory_blocks", SetMemoryBlocksRpc, SetMemoryBlocksParams,
        MemoryBlocks, Facts::CHANGE;
    /// `suspend`: suspend to RAM, to disk, or both (after replying).
    Suspend => "suspend", SuspendRpc, SuspendParams, PowerResult, Facts::CHANGE;
    /// `get_metrics`: CPU, memory, pressure, load, disk, network and
    /// filesystem counters for dashboards and exporters.
    GetMetrics => "get_metrics", GetMetricsRpc, Empty, Metrics, Facts::QUERY;
    /// `list_processes`: the processes, filtered, sorted, the first N.
    ListProcesses => "list_processes", ListProcessesRpc, ProcessListParams, ProcessList,
        Facts::QUERY;
    /// `kill_process`: send a signal to a process.
    KillProcess => "kill_process", KillProcessRpc, KillParams, KillResult, Facts::CHANGE;
    /// `read_log`: the last lines of a log file or of a unit's journal.
    ReadLog => "read_log", ReadLogRpc, ReadLogParams, LogLines, Facts::QUERY;
    /// `stream_data`: bytes on a stream (the attachment), within the credit
    /// the agent granted. Instant: handled in order by the reader.
    StreamData => "stream_data", StreamDataRpc, StreamDataParams, StreamAck,
        Facts { attachment_in: true, ..Facts::INSTANT };
    /// `stream_credit`: the agent may send this many more bytes on a stream.
    StreamCredit => "stream_credit", StreamCreditRpc, StreamCreditParams, StreamAck,
        Facts::INSTANT;
    /// `stream_close`: the host sends no more on a stream (half-close).
    StreamClose => "stream_close", StreamCloseRpc, StreamCloseParams, StreamAck,
        Facts::INSTANT;
    /// `stream_reset`: end a stream at once, both ways.
    StreamReset => "stream_reset", StreamResetRpc, StreamResetParams, StreamAck,
        Facts::INSTANT;
    /// `exec_start`: start a command whose stdin and output are streams.
    ExecStart => "exec_start", ExecStartRpc, ExecStartParams, ExecStartResult,
        Facts::CHANGE;
    /// `exec_signal`: send a signal to a streamed command's process group.
    ExecSignal => "exec_signal", ExecSignalRpc, ExecSignalParams, StreamAck,
        Facts { changes_guest: true, ..Facts::INSTANT };
    /// `exec_resize`: resize a streamed command's terminal.
    ExecResize => "exec_resize", ExecResizeRpc, ExecResizeParams, StreamAck, Facts::INSTANT;
    /// `forward_open`: connect to a TCP port in the guest, the bytes as a stream.
    ForwardOpen => "forward_open", ForwardOpenRpc, ForwardOpenParams, ForwardOpenResult,
        Facts::QUERY;
    /// `follow_log`: a file's new lines as they are written (`tail -F`), as a stream.
    FollowLog => "follow_log", FollowLogRpc, FollowLogParams, FollowLogResult, Facts::QUERY;
    /// `file_read_stream`: a file's bytes from an offset to its end, as a
    /// stream the agent sends as fast as the host's credit allows.
    FileReadStream => "file_read_stream", FileReadStreamRpc, FileReadStreamParams,
        FileReadStreamResult, Facts::QUERY;
}

impl Method {
    /// True for the methods answered at once (see [`Facts::instant`]).
    pub const fn is_instant(self) -> bool {
        self.facts().instant
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Params of methods that take none: `{}` (or absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Result of `ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResult {
    /// Always true.
    pub pong: bool,
    /// The guest's clock, Unix time in seconds.
    pub timestamp: u64,
}

/// Params of `sync`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncParams {
    /// A number the host chose; the reply carries it back.
    pub nonce: u64,
}

/// Result of `sync`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResult {
    /// The nonce from the request.
    pub nonce: u64,
}

/// Result of `get_agent_info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Agent program name, `kvmmanager-agent`.
    pub name: String,
    /// Agent version (semver).
    pub version: String,
    /// Protocol version, see [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// `linux` or `windows`.
    pub platform: String,
    /// Methods this agent serves.
    pub methods: Vec<String>,
    /// Those of `methods` its configuration disables
    /// (`security.allowed_methods`, `security.blocked_methods`): they answer
    /// `policy_denied`. Absent from older agents.
    #[serde(default)]
    pub disabled_methods: Vec<String>,
    /// Limits in force.
    pub limits: Limits,
}

/// The limits an agent enforces, so a host can size its requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Longest request line accepted, in bytes.
    pub max_message_size: u64,
    /// Longest response line the agent sends, in bytes.
    pub max_response_size: u64,
    /// Most bytes one `file_read` returns.
    pub max_read_chunk: u64,
    /// Largest file that may be read or written, in bytes.
    pub max_file_size: u64,
    /// Most bytes kept of each of stdout and stderr of a command.
    pub max_exec_output: u64,
    /// Longest `timeout_seconds` a command may ask for.
    pub max_command_timeout_seconds: u64,
    /// Time limit of every request other than `exec_command`.
    pub request_timeout_seconds: u64,
    /// Requests served at once.
    pub max_concurrent_requests: u32,
    /// Largest attachment the agent accepts or sends, in bytes; 0 (or
    /// absent, from agents before attachments) means none: use base64.
    #[serde(default)]
    pub max_attachment_size: u64,
    /// How each command's descendants are contained: `cgroup` (a cgroup v2
    /// per command: every descendant dies with it) or `process_group` (a
    /// descendant that calls `setsid()` escapes). Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_containment: Option<String>,
    /// `memory.max` of each command's cgroup, bytes; absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_memory_max: Option<u64>,
    /// `pids.max` of each command's cgroup; absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_max_processes: Option<u64>,
    /// Seconds after which a freeze ends by itself (`freeze_timeout_seconds`);
    /// absent from agents without `fs_freeze`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_timeout_seconds: Option<u64>,
}

/// Result of `get_system_info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemInfo {
    /// Operating system family (`linux`).
    pub os_type: String,
    /// `NAME` from os-release, e.g. `Debian GNU/Linux`.
    pub os_name: Option<String>,
    /// `VERSION_ID` from os-release, e.g. `12`.
    pub os_version: Option<String>,
    /// `PRETTY_NAME` from os-release.
    pub os_pretty_name: Option<String>,
    /// `ID` from os-release, e.g. `debian` (absent from older agents: read
    /// as null, as are the three below).
    #[serde(default)]
    pub os_id: Option<String>,
    /// `VERSION` from os-release, e.g. `12 (bookworm)`.
    #[serde(default)]
    pub os_version_name: Option<String>,
    /// `VARIANT` from os-release, e.g. `Server Edition`.
    #[serde(default)]
    pub os_variant: Option<String>,
    /// `VARIANT_ID` from os-release, e.g. `server`.
    #[serde(default)]
    pub os_variant_id: Option<String>,
    /// Kernel release (`uname -r`).
    pub kernel_release: String,
    /// Kernel version string (`uname -v`).
    pub kernel_version: String,
    /// Machine architecture (`uname -m`).
    pub architecture: String,
    /// Host name.
    pub hostname: String,
    /// Online logical CPUs.
    pub cpu_count: u32,
    /// CPU model name, when known.
    pub cpu_model: Option<String>,
    /// Total memory in bytes.
    pub memory_total_bytes: u64,
    /// Memory available for new work in bytes (`MemAvailable`).
    pub memory_available_bytes: u64,
    /// Total swap in bytes.
    pub swap_total_bytes: u64,
    /// Free swap in bytes.
    pub swap_free_bytes: u64,
    /// Seconds since boot.
    pub uptime_seconds: f64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load_average: [f64; 3],
}

/// Result of `get_network_info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    /// Every network interface, sorted by name.
    pub interfaces: Vec<NetworkInterface>,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    /// Interface name, e.g. `eth0`.
    pub name: String,
    /// Hardware address, lower-case `aa:bb:...`, if it has one.
    pub mac_address: Option<String>,
    /// True if administratively up (`IFF_UP`).
    pub is_up: bool,
    /// True if the link is running (`IFF_RUNNING`).
    pub is_running: bool,
    /// True for the loopback interface.
    pub is_loopback: bool,
    /// MTU, if known.
    pub mtu: Option<u32>,
    /// IPv4 and IPv6 addresses.
    pub addresses: Vec<IpAddress>,
    /// Traffic counters.
    pub statistics: InterfaceStatistics,
}

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

/// An address on an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpAddress {
    /// `ipv4` or `ipv6`.
    pub family: IpFamily,
    /// The address, in its usual text form.
    pub address: String,
    /// Prefix length (e.g. 24).
    pub prefix_len: u8,
}

/// Interface counters, from `/sys/class/net/<name>/statistics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatistics {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Received packets dropped.
    pub rx_dropped: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Send errors.
    pub tx_errors: u64,
    /// Outgoing packets dropped.
    pub tx_dropped: u64,
}

/// Params of `get_disk_usage`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskUsageParams {
    /// Also list pseudo filesystems (proc, sysfs, cgroup, ...). Default false.
    #[serde(default)]
    pub include_virtual: bool,
}

/// Result of `get_disk_usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    /// Mounted filesystems, in mount order.
    pub filesystems: Vec<Filesystem>,
}

/// One mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filesystem {
    /// Source device (e.g. `/dev/vda1`, `tmpfs`).
    pub device: String,
    /// Mount point.
    pub mount_point: String,
    /// Filesystem type (e.g. `ext4`).
    pub fs_type: String,
    /// Size in bytes.
    pub total_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Bytes available to unprivileged users.
    pub free_bytes: u64,
    /// Total inodes (0 if the filesystem has none).
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Params of `exec_command`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// The program: a bare name (looked up in the agent's fixed PATH) or an
    /// absolute path. Never run through a shell.
    pub command: String,
    /// Arguments, passed verbatim.
    #[serde(default)]
    pub args: Vec<String>,
    /// Time limit; default `request_timeout_seconds`, at most
    /// `max_command_timeout_seconds`. On expiry the process group is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Extra environment variables (the base environment is minimal).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute); default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Data written to the command's stdin, then closed. Default: empty stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Encoding of `stdin`. Default `utf8`.
    #[serde(default)]
    pub stdin_encoding: Encoding,
    /// Encoding of `stdout`/`stderr` in the result. Default `utf8`
    /// (invalid UTF-8 replaced by U+FFFD); `base64` is binary-safe.
    #[serde(default)]
    pub output_encoding: Encoding,
}

/// Result of `exec_command`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Exit status, if the command exited.
    pub exit_code: Option<i32>,
    /// Signal number, if the command was killed by a signal.
    pub signal: Option<i32>,
    /// Captured stdout (at most `max_exec_output` bytes).
    pub stdout: String,
    /// Captured stderr (at most `max_exec_output` bytes).
    pub stderr: String,
    /// Encoding of `stdout` and `stderr`.
    pub encoding: Encoding,
    /// True if stdout was longer than the limit and was cut.
    pub stdout_truncated: bool,
    /// True if stderr was longer than the limit and was cut.
    pub stderr_truncated: bool,
    /// True if the time limit expired and the process group was killed.
    pub timed_out: bool,
    /// Wall-clock run time in milliseconds.
    pub duration_ms: u64,
}

/// Params of `file_read`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReadParams {
    /// Absolute path, inside `allowed_read_paths`.
    pub path: String,
    /// Byte offset to start at. Default 0.
    #[serde(default)]
    pub offset: u64,
    /// Most bytes to return; default and maximum `max_read_chunk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// Encoding of `content`. Default `utf8`. With `attachment` the bytes
    /// come as the reply's attachment and `content` is empty.
    #[serde(default)]
    pub encoding: Encoding,
}

/// Result of `file_read`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReadResult {
    /// The bytes read, encoded (empty with `encoding: attachment`).
    pub content: String,
    /// Encoding of `content`.
    pub encoding: Encoding,
    /// Offset the bytes start at.
    pub offset: u64,
    /// Number of bytes in `content` (after decoding).
    pub bytes_read: u64,
    /// True if the read reached the end of the file.
    pub eof: bool,
    /// The file's size when it was read.
    pub size: u64,
}

/// How `file_write` treats an existing file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Replace the whole file, atomically (temp file + rename).
    #[default]
    Truncate,
    /// Append to the file (created if missing).
    Append,
    /// Create the file; fail with `already_exists` if it exists. Atomic.
    CreateNew,
}

/// Params of `file_write`.
///
/// A whole file in one call: `{path, content}`. A file larger than one
/// message: the first call sets `more: true` and gets an `upload_id`; later
/// calls pass `upload_id` and `offset` (they may be in flight at once, in any
/// order); the call with `more: false` (the default) commits the upload,
/// which renames the staged file into place atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWriteParams {
    /// Absolute path, inside `allowed_write_paths`.
    pub path: String,
    /// The bytes, encoded; empty (or absent) with `encoding: attachment`,
    /// where the bytes are the request's attachment.
    #[serde(default)]
    pub content: String,
    /// Encoding of `content`. Default `utf8`.
    #[serde(default)]
    pub encoding: Encoding,
    /// What to do with an existing file. Default `truncate`.
    #[serde(default)]
    pub mode: WriteMode,
    /// Permission bits for a new file (e.g. 0o644 = 420). Default 0o644.
    /// Group/other write and setuid/setgid/sticky bits are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<u32>,
    /// Offset of `content` within the upload (only with `upload_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Continue the chunked upload this id names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// More chunks follow: keep the upload staged. Default false.
    #[serde(default)]
    pub more: bool,
}

/// Result of `file_write`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWriteResult {
    /// Bytes written by this call.
    pub bytes_written: u64,
    /// Size of the file (or of the staged upload) after this call.
    pub size: u64,
    /// Id of the staged upload, while `more` chunks are expected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// True once the data is in place at `path`.
    pub committed: bool,
}

/// Params of `shutdown` and `reboot`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerParams {
    /// Seconds to wait after replying before acting. Default 0.
    #[serde(default)]
    pub delay_seconds: u64,
}

/// Result of `shutdown` and `reboot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerResult {
    /// Always true: the action is scheduled and happens after this reply.
    pub accepted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Method::ALL {
            assert_eq!(Method::from_name(m.as_str()), Some(*m));
        }
        assert_eq!(Method::from_name("guest-ping"), None);
    }

    #[test]
    fn params_reject_unknown_fields() {
        let e = serde_json::from_str::<FileReadParams>(r#"{"path":"/tmp/a","lenght":3}"#);
        assert!(e.unwrap_err().to_string().contains("unknown field"));
        let e = serde_json::from_str::<Empty>(r#"{"x":1}"#);
        assert!(e.is_err());
    }

    #[test]
    fn defaults_are_as_documented() {
        let p: FileWriteParams = serde_json::from_str(r#"{"path":"/a","content":""}"#).unwrap();
        assert_eq!(p.mode, WriteMode::Truncate);
        assert_eq!(p.encoding, Encoding::Utf8);
        assert!(!p.more);
        let p: ExecParams = serde_json::from_str(r#"{"command":"true"}"#).unwrap();
        assert!(p.args.is_empty());
        assert_eq!(p.output_encoding, Encoding::Utf8);
    }
}

/// Params of `cancel`: what to stop, of the requests and uploads of the
/// connection it comes on. At least one member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelParams {
    /// The (numeric) id of a request still running: it is stopped and
    /// answered `cancelled`, and its slot is freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// A chunked upload still open: it is aborted and its staging file
    /// removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
}

/// Result of `cancel`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelResult {
    /// A request with that id was running and has been stopped.
    pub cancelled: bool,
    /// The upload was open and has been aborted.
    pub upload_aborted: bool,
}
