//! Params and results of the guest operations: freeze and thaw, trim, time,
//! users and SSH keys, vCPUs and filesystem-to-disk mapping.
//!
//! Re-exported by [`crate::methods`], whose table names each method.

use serde::{Deserialize, Serialize};

/// Params of `fs_freeze`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsFreezeParams {
    /// Mount points to freeze; absent: every freezable local filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_points: Option<Vec<String>>,
}

/// Result of `fs_freeze`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsFreezeResult {
    /// The mount points frozen, in the order they were frozen.
    pub frozen: Vec<String>,
    /// Seconds after which the agent thaws them by itself.
    pub timeout_seconds: u64,
    /// Hook executables run with `freeze`, in order.
    pub hooks: Vec<String>,
}

/// Result of `fs_thaw`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsThawResult {
    /// The mount points thawed, in the order they were thawed.
    pub thawed: Vec<String>,
    /// Hook executables run with `thaw`, in order.
    pub hooks: Vec<String>,
}

/// Whether filesystems are frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreezeStatus {
    /// Nothing is frozen by the agent.
    Thawed,
    /// The agent holds filesystems frozen.
    Frozen,
}

/// Why the last freeze ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThawReason {
    /// An `fs_thaw` request.
    Request,
    /// `freeze_timeout_seconds` passed: the agent thawed by itself.
    Timeout,
    /// The agent was stopping.
    Shutdown,
}

/// Result of `fs_freeze_status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsFreezeStatusResult {
    /// `frozen` or `thawed`.
    pub status: FreezeStatus,
    /// The mount points frozen now (empty when thawed).
    pub mount_points: Vec<String>,
    /// Seconds left before the agent thaws by itself; null when thawed.
    pub remaining_seconds: Option<u64>,
    /// `freeze_timeout_seconds`.
    pub timeout_seconds: u64,
    /// How the last freeze ended; null if none has ended since the agent started.
    pub last_thaw: Option<ThawReason>,
}

/// Params of `fs_trim`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsTrimParams {
    /// Mount points to trim; absent: every trimmable local filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_points: Option<Vec<String>>,
    /// Free extents shorter than this many bytes are not discarded. Default 0.
    #[serde(default)]
    pub minimum_bytes: u64,
}

/// One filesystem's outcome of `fs_trim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimmedFilesystem {
    /// The mount point.
    pub mount_point: String,
    /// Bytes the filesystem discarded (as the kernel reports); null on error.
    pub trimmed_bytes: Option<u64>,
    /// Why it could not be trimmed; null on success.
    pub error: Option<String>,
}

/// Result of `fs_trim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsTrimResult {
    /// One entry per filesystem, in mount order.
    pub filesystems: Vec<TrimmedFilesystem>,
}

/// Result of `get_time`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeInfo {
    /// The guest's wall clock, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// The time zone's name (e.g. `Europe/Berlin`), when known.
    pub timezone: Option<String>,
    /// Offset of local time from UTC now, in seconds (east positive).
    pub utc_offset_seconds: i32,
}

/// Params of `set_time`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTimeParams {
    /// The time to set, nanoseconds since the Unix epoch; absent: read the
    /// hardware clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ns: Option<u64>,
}

/// Where `set_time` took the time from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSource {
    /// The request's `time_ns`.
    Request,
    /// The guest's hardware clock (RTC).
    Rtc,
}

/// Result of `set_time`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetTimeResult {
    /// The wall clock right after it was set, nanoseconds since the epoch.
    pub time_ns: u64,
    /// Where the time came from.
    pub source: TimeSource,
    /// The hardware clock was written (only with `source` `request`).
    pub rtc_written: bool,
}

/// One login session, from utmp.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedInUser {
    /// The user name.
    pub name: String,
    /// The terminal (`pts/0`, `tty1`).
    pub terminal: String,
    /// Where from (a host name or address); empty for a local login.
    pub host: String,
    /// When the session started, seconds since the epoch (fractional).
    pub login_time: f64,
}

/// Result of `get_users`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedInUsers {
    /// Every login session, oldest first.
    pub users: Vec<LoggedInUser>,
}

/// Params of `ssh_keys_get`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshUserParams {
    /// The guest user.
    pub username: String,
}

/// Params of `ssh_keys_add`, `ssh_keys_remove` and `ssh_keys_set`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshKeysParams {
    /// The guest user.
    pub username: String,
    /// Public key lines, `type base64 [comment]`.
    pub keys: Vec<String>,
}

/// One line of an `authorized_keys` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizedKey {
    /// The line as it is in the file.
    pub line: String,
    /// True if the agent added it (it sits in the agent's block); false for
    /// a line written by someone else, which the agent never changes.
    pub managed: bool,
}

/// Result of the `ssh_keys_*` methods: the file after the call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshKeysResult {
    /// The guest user.
    pub username: String,
    /// The `authorized_keys` file.
    pub path: String,
    /// Its key lines (comments and blank lines left out), in file order.
    pub keys: Vec<AuthorizedKey>,
}

/// Params of `set_user_password`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPasswordParams {
    /// The guest user.
    pub username: String,
    /// The password, or its crypt(3) hash with `crypted`.
    pub password: String,
    /// `password` is already hashed (`$6$...`). Default false.
    #[serde(default)]
    pub crypted: bool,
}

/// Result of `set_user_password`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPasswordResult {
    /// The user whose password was set.
    pub username: String,
}

/// One virtual CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vcpu {
    /// Logical CPU number.
    pub id: u32,
    /// Online now.
    pub online: bool,
    /// The guest lets it go offline (false for the boot CPU).
    pub can_offline: bool,
}

/// Result of `get_vcpus` and `set_vcpus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vcpus {
    /// Every CPU the kernel knows, by id.
    pub cpus: Vec<Vcpu>,
}

/// A wanted CPU state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// Logical CPU number.
    pub id: u32,
    /// Bring it online (true) or take it offline (false).
    pub online: bool,
}

/// Params of `set_vcpus`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetVcpusParams {
    /// The CPUs to change, applied in order.
    pub cpus: Vec<VcpuState>,
}

/// A disk beneath a filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAddress {
    /// The whole disk's device, e.g. `/dev/vda`.
    pub device: String,
    /// `virtio`, `scsi`, `ata`, `nvme`, `usb` or `unknown`.
    pub bus_type: String,
    /// PCI address of the controller, `dddd:bb:ss.f`, when on PCI.
    pub pci_address: Option<String>,
    /// The disk's serial number, when it has one.
    pub serial: Option<String>,
    /// SCSI channel (the bus of `host:channel:target:lun`).
    pub bus: Option<u32>,
    /// SCSI target.
    pub target: Option<u32>,
    /// SCSI logical unit.
    pub unit: Option<u32>,
}

/// One mounted filesystem and the disks it lives on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsInfoEntry {
    /// The mount point.
    pub mount_point: String,
    /// Its block device's kernel name, e.g. `vda1`, `dm-0`.
    pub name: String,
    /// Filesystem type.
    pub fs_type: String,
    /// Size in bytes, when `statvfs` answers.
    pub total_bytes: Option<u64>,
    /// Bytes in use, when `statvfs` answers.
    pub used_bytes: Option<u64>,
    /// Bytes free for unprivileged users (`f_bavail`), when `statvfs`
    /// answers (older agents: absent, read as null).
    #[serde(default)]
    pub available_bytes: Option<u64>,
    /// The whole disks beneath it (through partitions, LVM, LUKS, RAID).
    pub disks: Vec<DiskAddress>,
}

/// Result of `get_fsinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsInfo {
    /// Filesystems on block devices, in mount order.
    pub filesystems: Vec<FsInfoEntry>,
}

/// Time one CPU spent in each state since boot, in milliseconds
/// (`/proc/stat`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTimes {
    /// Logical CPU number.
    pub cpu: u32,
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
    /// Running a guest's vCPU (older agents: absent, read as 0).
    #[serde(default)]
    pub guest_ms: u64,
    /// Running a niced guest's vCPU (older agents: absent, read as 0).
    #[serde(default)]
    pub guest_nice_ms: u64,
}

/// One block device's I/O counters since boot (`/proc/diskstats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIo {
    /// Kernel name (`vda`, `vda1`, `dm-0`).
    pub name: String,
    /// Reads completed.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Milliseconds spent reading.
    pub read_ms: u64,
    /// Writes completed.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Milliseconds spent writing.
    pub write_ms: u64,
    /// I/Os in flight now.
    pub in_flight: u64,
    /// Milliseconds the device was busy.
    pub busy_ms: u64,
    /// Device number, major (older agents: absent, read as 0, as are the
    /// counters below).
    #[serde(default)]
    pub major: u64,
    /// Device number, minor.
    #[serde(default)]
    pub minor: u64,
    /// Reads merged with an adjacent one.
    #[serde(default)]
    pub read_merges: u64,
    /// Writes merged with an adjacent one.
    #[serde(default)]
    pub write_merges: u64,
    /// Discards completed.
    #[serde(default)]
    pub discards: u64,
    /// Bytes discarded.
    #[serde(default)]
    pub discard_bytes: u64,
    /// Discards merged.
    #[serde(default)]
    pub discard_merges: u64,
    /// Milliseconds spent discarding.
    #[serde(default)]
    pub discard_ms: u64,
    /// Flushes completed.
    #[serde(default)]
    pub flushes: u64,
    /// Milliseconds spent flushing.
    #[serde(default)]
    pub flush_ms: u64,
    /// Weighted milliseconds doing I/O (time × I/Os in flight).
    #[serde(default)]
    pub weighted_ms: u64,
}

/// One route of the kernel's main routing table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// `ipv4` or `ipv6`.
    pub family: crate::methods::IpFamily,
    /// Destination network, `address/prefix` (`0.0.0.0/0` is the default route).
    pub destination: String,
    /// Next hop; null for a directly connected network.
    pub gateway: Option<String>,
    /// Outgoing interface.
    pub interface: String,
    /// Route metric.
    pub metric: u32,
}

/// Result of `get_stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Load averages over 1, 5 and 15 minutes.
    pub load_average: [f64; 3],
    /// Per-CPU time counters, by CPU.
    pub cpus: Vec<CpuTimes>,
    /// Per-block-device I/O counters (devices with no I/O left out).
    pub disks: Vec<DiskIo>,
    /// The routing table (IPv4, then IPv6; up routes only).
    pub routes: Vec<Route>,
}

/// One memory block (`/sys/devices/system/memory/memoryN`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBlock {
    /// Block number.
    pub id: u32,
    /// Online now.
    pub online: bool,
    /// The kernel lets it go offline (its `online` switch exists and it
    /// says `removable`).
    pub can_offline: bool,
}

/// Result of `get_memory_blocks` and `set_memory_blocks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBlocks {
    /// Size of every block, bytes.
    pub block_size_bytes: u64,
    /// Every block, by id.
    pub blocks: Vec<MemoryBlock>,
}

/// A wanted memory block state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBlockState {
    /// Block number.
    pub id: u32,
    /// Bring it online (true) or take it offline (false).
    pub online: bool,
}

/// Params of `set_memory_blocks`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMemoryBlocksParams {
    /// The blocks to change, applied in order.
    pub blocks: Vec<MemoryBlockState>,
}

/// What `suspend` does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuspendMode {
    /// Suspend to RAM (S3).
    #[default]
    Ram,
    /// Hibernate: save memory to swap and power off (S4).
    Disk,
    /// Save memory to swap, then suspend to RAM.
    Hybrid,
}

/// Params of `suspend`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuspendParams {
    /// `ram`, `disk` or `hybrid`. Default `ram`.
    #[serde(default)]
    pub mode: SuspendMode,
}

/// One block device (`/sys/class/block`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    /// Kernel name (`vda`, `vda1`, `dm-0`).
    pub name: String,
    /// `disk`, `partition`, `dm` (LVM, LUKS), `md` (RAID), `loop` or `rom`.
    pub kind: String,
    /// The device-mapper name (`vg-data`, `luks-...`), for `dm` devices.
    pub mapper_name: Option<String>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Read-only.
    pub read_only: bool,
    /// The devices it is built on (its partition's disk, a dm or md
    /// device's members), by name.
    pub dependencies: Vec<String>,
    /// The devices built on it, by name.
    pub holders: Vec<String>,
    /// Bus, PCI address and serial, for whole disks.
    pub address: Option<DiskAddress>,
}

/// Result of `get_block_devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevices {
    /// Every block device, by name.
    pub devices: Vec<BlockDevice>,
}
