//! `kvmmanager-ctl` commands of the guest operations: `fsfreeze`,
//! `fstrim`, `time`, `users`, `ssh-keys`, `passwd`, `vcpus`, `fsinfo`,
//! `block-devices`, `stats`, `memory`, `suspend`;
//! their arguments, execution and tables (`--json` prints the agent's
//! result as it is).

use std::io::{BufRead, Read};
use std::path::PathBuf;

use agent_common::methods::BlockDevices;
use agent_common::methods::{
    FreezeStatus, FsFreezeStatusResult, FsInfo, FsTrimResult, GuestStats, LoggedInUsers,
    MemoryBlockState, MemoryBlocks, SshKeysResult, TimeInfo, VcpuState, Vcpus,
};
use clap::Subcommand;

use super::format::{human_size, key_values, table, Align};
use super::{out, out_json, CliError, Command, EXIT_AGENT, EXIT_OK};
use crate::{Client, ClientError};

/// `fsfreeze` actions.
#[derive(Debug, Subcommand)]
pub enum FreezeCmd {
    /// Freeze every local filesystem, or the mount points given; they thaw
    /// by themselves after the agent's freeze_timeout_seconds.
    Freeze {
        /// Mount points (default: every freezable filesystem).
        mount_points: Vec<String>,
    },
    /// Thaw what was frozen.
    Thaw,
    /// Show whether filesystems are frozen, and for how much longer.
    Status,
}

/// Arguments of `fstrim`.
#[derive(Debug, clap::Args)]
pub struct TrimArgs {
    /// Do not discard free extents shorter than this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub minimum: u64,
    /// Mount points (default: every trimmable filesystem).
    pub mount_points: Vec<String>,
}

/// Arguments of `time`.
#[derive(Debug, clap::Args)]
#[group(multiple = false)]
pub struct TimeArgs {
    /// Set the guest's clock (and hardware clock) to this host's clock.
    #[arg(long)]
    pub sync: bool,
    /// Set the guest's clock to this time, nanoseconds since the Unix epoch.
    #[arg(long, value_name = "NS")]
    pub set_ns: Option<u64>,
    /// Set the guest's clock from its hardware clock.
    #[arg(long)]
    pub from_rtc: bool,
}

/// Keys given on the command line or in a file.
#[derive(Debug, clap::Args)]
pub struct KeysInput {
    /// The guest user.
    pub user: String,
    /// Public key lines ("ssh-ed25519 AAAA... comment"; quote each).
    pub keys: Vec<String>,
    /// Read key lines from this file (- for stdin); blank and # lines skipped.
    #[arg(long, value_name = "FILE|-")]
    pub file: Option<PathBuf>,
}

/// `ssh-keys` actions.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Show a user's authorized keys (AGENT: added by the agent).
    Get {
        /// The guest user.
        user: String,
    },
    /// Add keys to the agent's block of the user's authorized_keys.
    Add(KeysInput),
    /// Remove keys from the agent's block.
    Remove(KeysInput),
    /// Make the agent's block exactly these keys (none: remove the block).
    Set(KeysInput),
}

/// Arguments of `passwd`.
#[derive(Debug, clap::Args)]
pub struct PasswdArgs {
    /// The guest user.
    pub user: String,
    /// The password read is a crypt(3) hash ($6$...), not the password.
    #[arg(long)]
    pub crypted: bool,
}

/// `suspend --mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SuspendArg {
    /// Suspend to RAM.
    Ram,
    /// Hibernate (memory to swap, then off).
    Disk,
    /// Memory to swap, then suspend to RAM.
    Hybrid,
}

/// Arguments of `memory`.
#[derive(Debug, clap::Args)]
pub struct MemoryArgs {
    /// Bring these memory blocks online (comma-separated ids).
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub online: Vec<u32>,
    /// Take these memory blocks offline (comma-separated ids).
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub offline: Vec<u32>,
}

/// Arguments of `vcpus`.
#[derive(Debug, clap::Args)]
pub struct VcpuArgs {
    /// Bring these CPUs online (comma-separated ids).
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub online: Vec<u32>,
    /// Take these CPUs offline (comma-separated ids).
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub offline: Vec<u32>,
}

fn local(what: &str) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Local {
        what: what.to_owned(),
        source,
    }
}

/// The key lines of `input`: its arguments, then its file's lines.
fn key_lines(input: &KeysInput) -> Result<Vec<String>, CliError> {
    let mut keys = input.keys.clone();
    if let Some(path) = &input.file {
        let text = if path.as_os_str() == "-" {
            let mut t = String::new();
            std::io::stdin()
                .read_to_string(&mut t)
                .map_err(local("cannot read stdin"))?;
            t
        } else {
            std::fs::read_to_string(path).map_err(|source| {
                CliError::Client(ClientError::LocalFile {
                    path: path.clone(),
                    source,
                })
            })?
        };
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    Ok(keys)
}

/// Runs one of this module's commands.
pub(super) async fn run(client: &Client, cmd: Command, json: bool) -> Result<i32, CliError> {
    match cmd {
        Command::Fsfreeze { action } => match action {
            FreezeCmd::Freeze { mount_points } => {
                let list = (!mount_points.is_empty()).then_some(mount_points);
                let r = client.fs_freeze(list).await?;
                if json {
                    out_json(&r)?;
                } else {
                    out(&format!(
                        "frozen: {} (thawed by the agent after {} s unless thawed before)\n",
                        r.frozen.join(", "),
                        r.timeout_seconds
                    ))?;
                }
            }
            FreezeCmd::Thaw => {
                let r = client.fs_thaw().await?;
                if json {
                    out_json(&r)?;
                } else if r.thawed.is_empty() {
                    out("nothing was frozen\n")?;
                } else {
                    out(&format!("thawed: {}\n", r.thawed.join(", ")))?;
                }
            }
            FreezeCmd::Status => {
                let r = client.fs_freeze_status().await?;
                if json {
                    out_json(&r)?;
                } else {
                    out(&render_freeze_status(&r))?;
                }
            }
        },
        Command::Fstrim(args) => {
            let list = (!args.mount_points.is_empty()).then_some(args.mount_points);
            let r = client.fs_trim(list, args.minimum).await?;
            if json {
                out_json(&r)?;
            } else {
                out(&render_trim(&r))?;
            }
            if r.filesystems.iter().any(|f| f.error.is_some()) {
                return Ok(EXIT_AGENT);
            }
        }
        Command::Time(args) => {
            let set = if args.sync {
                Some(client.sync_time().await?)
            } else if let Some(ns) = args.set_ns {
                Some(client.set_time(Some(ns)).await?)
            } else if args.from_rtc {
                Some(client.set_time(None).await?)
            } else {
                None
            };
            match set {
                Some(r) if json => out_json(&r)?,
                Some(r) => out(&format!(
                    "guest clock set to {} from the {}; hardware clock {}\n",
                    utc(r.time_ns),
                    match r.source {
                        agent_common::methods::TimeSource::Request => "host",
                        agent_common::methods::TimeSource::Rtc => "hardware clock",
                    },
                    if r.rtc_written {
                        "written"
                    } else {
                        "not written"
                    }
                ))?,
                None => {
                    let t = client.time().await?;
                    if json {
                        out_json(&t)?;
                    } else {
                        out(&render_time(&t))?;
                    }
                }
            }
        }
        Command::Users => {
            let r = client.users().await?;
            if json {
                out_json(&r)?;
            } else {
                out(&render_users(&r))?;
            }
        }
        Command::SshKeys { action } => {
            let r = match action {
                KeysCmd::Get { user } => client.ssh_keys(&user).await?,
                KeysCmd::Add(input) => {
                    let keys = key_lines(&input)?;
                    client.ssh_keys_add(&input.user, keys).await?
                }
                KeysCmd::Remove(input) => {
                    let keys = key_lines(&input)?;
                    client.ssh_keys_remove(&input.user, keys).await?
                }
                KeysCmd::Set(input) => {
                    let keys = key_lines(&input)?;
                    client.ssh_keys_set(&input.user, keys).await?
                }
            };
            if json {
                out_json(&r)?;
            } else {
                out(&render_keys(&r))?;
            }
        }
        Command::Passwd(args) => {
            // From stdin, never from the command line (ps, shell history).
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(local("cannot read the password from stdin"))?;
            let password = line.trim_end_matches(['\n', '\r']);
            let r = client
                .set_user_password(&args.user, password, args.crypted)
                .await?;
            if json {
                out_json(&r)?;
            } else {
                out(&format!("password of {} set\n", r.username))?;
            }
        }
        Command::Vcpus(args) => {
            let mut want: Vec<VcpuState> = args
                .online
                .iter()
                .map(|&id| VcpuState { id, online: true })
                .collect();
            want.extend(
                args.offline
                    .iter()
                    .map(|&id| VcpuState { id, online: false }),
            );
            let r = if want.is_empty() {
                client.vcpus().await?
            } else {
                client.set_vcpus(want).await?
            };
            if json {
                out_json(&r)?;
            } else {
                out(&render_vcpus(&r))?;
            }
        }
        Command::Fsinfo => {
            let r = client.fsinfo().await?;
            if json {
                out_json(&r)?;
            } else {
                out(&render_fsinfo(&r))?;
            }
        }
        Command::Suspend { mode } => {
            let mode = match mode {
                SuspendArg::Ram => agent_common::methods::SuspendMode::Ram,
                SuspendArg::Disk => agent_common::methods::SuspendMode::Disk,
                SuspendArg::Hybrid => agent_common::methods::SuspendMode::Hybrid,
            };
            let r = client.suspend(mode).await?;
            if json {
                out_json(&r)?;
            } else {
                out("suspend accepted\n")?;
            }
        }
        Command::Memory(args) => {
            let mut want: Vec<MemoryBlockState> = args
                .online
                .iter()
                .map(|&id| MemoryBlockState { id, online: true })
                .collect();
            want.extend(
                args.offline
                    .iter()
                    .map(|&id| MemoryBlockState { id, online: false }),
            );
            let r = if want.is_empty() {
                client.memory_blocks().await?
            } else {
                client.set_memory_blocks(want).await?
            };
            if json {
                out_json(&r)?;
            } else {
                out(&render_memory(&r))?;
            }
        }
        Command::BlockDevices => {
            let r = client.block_devices().await?;
            if json {
                out_json(&r)?;
            } else {
                out(&render_block_devices(&r))?;
            }
        }
        Command::Stats => {
            let r = client.stats().await?;
            if json {
                out_json(&r)?;
            } else {
                out(&render_stats(&r))?;
            }
        }
        _ => {}
    }
    Ok(EXIT_OK)
}

/// `ns` since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(super) fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let ms = ns % 1_000_000_000 / 1_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // H. Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn offset(seconds: i32) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let a = seconds.unsigned_abs();
    format!("{sign}{:02}:{:02}", a / 3600, a / 60 % 60)
}

fn render_time(t: &TimeInfo) -> String {
    key_values(&[
        ("Time (UTC)", utc(t.time_ns)),
        (
            "Time zone",
            t.timezone.clone().unwrap_or_else(|| "-".into()),
        ),
        ("UTC offset", offset(t.utc_offset_seconds)),
    ])
}

fn render_freeze_status(r: &FsFreezeStatusResult) -> String {
    key_values(&[
        (
            "Status",
            match r.status {
                FreezeStatus::Frozen => "frozen".into(),
                FreezeStatus::Thawed => "thawed".into(),
            },
        ),
        (
            "Frozen",
            if r.mount_points.is_empty() {
                "-".into()
            } else {
                r.mount_points.join(", ")
            },
        ),
        (
            "Thaws by itself in",
            r.remaining_seconds
                .map_or_else(|| "-".into(), |s| format!("{s} s")),
        ),
        ("Freeze timeout", format!("{} s", r.timeout_seconds)),
        (
            "Last thaw",
            r.last_thaw
                .map_or_else(|| "-".into(), |t| format!("{t:?}").to_lowercase()),
        ),
    ])
}

fn render_trim(r: &FsTrimResult) -> String {
    let rows: Vec<Vec<String>> = r
        .filesystems
        .iter()
        .map(|f| {
            vec![
                f.mount_point.clone(),
                f.trimmed_bytes.map_or_else(|| "-".into(), human_size),
                f.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &["MOUNTED ON", "TRIMMED", "ERROR"],
        &[Align::Left, Align::Right, Align::Left],
        &rows,
    )
}

fn render_users(r: &LoggedInUsers) -> String {
    let rows: Vec<Vec<String>> = r
        .users
        .iter()
        .map(|u| {
            vec![
                u.name.clone(),
                u.terminal.clone(),
                if u.host.is_empty() {
                    "-".into()
                } else {
                    u.host.clone()
                },
                utc((u.login_time.max(0.0) * 1e9) as u64),
            ]
        })
        .collect();
    table(
        &["USER", "TERMINAL", "FROM", "LOGIN (UTC)"],
        &[Align::Left; 4],
        &rows,
    )
}

/// A key line with its base64 shortened, for a table.
fn short_key(line: &str) -> String {
    line.split(' ')
        .map(|w| {
            if w.len() > 40 && w.starts_with("AAAA") {
                format!("{}…{}", &w[..12], &w[w.len() - 8..])
            } else {
                w.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn render_keys(r: &SshKeysResult) -> String {
    let rows: Vec<Vec<String>> = r
        .keys
        .iter()
        .map(|k| {
            vec![
                if k.managed { "agent" } else { "user" }.to_owned(),
                short_key(&k.line),
            ]
        })
        .collect();
    format!(
        "{}\n{}",
        r.path,
        table(&["ADDED BY", "KEY"], &[Align::Left, Align::Left], &rows)
    )
}

fn render_vcpus(r: &Vcpus) -> String {
    let rows: Vec<Vec<String>> = r
        .cpus
        .iter()
        .map(|c| {
            vec![
                c.id.to_string(),
                if c.online { "online" } else { "offline" }.to_owned(),
                if c.can_offline {
                    "yes"
                } else {
                    "no (boot CPU)"
                }
                .to_owned(),
            ]
        })
        .collect();
    table(
        &["CPU", "STATE", "CAN GO OFFLINE"],
        &[Align::Right, Align::Left, Align::Left],
        &rows,
    )
}

fn render_fsinfo(r: &FsInfo) -> String {
    let rows: Vec<Vec<String>> = r
        .filesystems
        .iter()
        .map(|f| {
            let disks: Vec<String> = f
                .disks
                .iter()
                .map(|d| {
                    let mut s = format!("{} {}", d.device, d.bus_type);
                    if let Some(p) = &d.pci_address {
                        s.push_str(&format!(" pci {p}"));
                    }
                    if let Some(serial) = &d.serial {
                        s.push_str(&format!(" serial {serial}"));
                    }
                    s
                })
                .collect();
            vec![
                f.mount_point.clone(),
                f.name.clone(),
                f.fs_type.clone(),
                f.total_bytes.map_or_else(|| "-".into(), human_size),
                f.used_bytes.map_or_else(|| "-".into(), human_size),
                if disks.is_empty() {
                    "-".into()
                } else {
                    disks.join("; ")
                },
            ]
        })
        .collect();
    use Align::{Left as L, Right as R};
    table(
        &["MOUNTED ON", "DEVICE", "TYPE", "SIZE", "USED", "DISKS"],
        &[L, L, L, R, R, L],
        &rows,
    )
}

fn render_memory(m: &MemoryBlocks) -> String {
    let online = m.blocks.iter().filter(|b| b.online).count() as u64;
    let rows: Vec<Vec<String>> = m
        .blocks
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                if b.online { "online" } else { "offline" }.to_owned(),
                if b.can_offline { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    format!(
        "{} blocks of {}, {} online\n{}",
        m.blocks.len(),
        human_size(m.block_size_bytes),
        human_size(online.saturating_mul(m.block_size_bytes)),
        table(
            &["BLOCK", "STATE", "CAN GO OFFLINE"],
            &[Align::Right, Align::Left, Align::Left],
            &rows
        )
    )
}

fn render_block_devices(b: &BlockDevices) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(",")
        }
    };
    let rows: Vec<Vec<String>> = b
        .devices
        .iter()
        .map(|d| {
            let mut kind = d.kind.clone();
            if let Some(m) = &d.mapper_name {
                kind.push_str(&format!(" ({m})"));
            }
            vec![
                d.name.clone(),
                kind,
                human_size(d.size_bytes),
                if d.read_only { "ro" } else { "rw" }.to_owned(),
                list(&d.dependencies),
                list(&d.holders),
                d.address.as_ref().map_or_else(
                    || "-".to_owned(),
                    |a| {
                        let mut s = a.bus_type.clone();
                        if let Some(p) = &a.pci_address {
                            s.push_str(&format!(" pci {p}"));
                        }
                        if let Some(serial) = &a.serial {
                            s.push_str(&format!(" serial {serial}"));
                        }
                        s
                    },
                ),
            ]
        })
        .collect();
    use Align::{Left as L, Right as R};
    table(
        &["NAME", "KIND", "SIZE", "MODE", "ON", "UNDER", "ADDRESS"],
        &[L, L, R, L, L, L, L],
        &rows,
    )
}

fn render_stats(s: &GuestStats) -> String {
    use Align::{Left as L, Right as R};
    let [l1, l5, l15] = s.load_average;
    let secs = |ms: u64| format!("{:.0} s", ms as f64 / 1000.0);
    let cpus: Vec<Vec<String>> = s
        .cpus
        .iter()
        .map(|c| {
            vec![
                c.cpu.to_string(),
                secs(c.user_ms + c.nice_ms),
                secs(c.system_ms + c.irq_ms + c.softirq_ms),
                secs(c.idle_ms),
                secs(c.iowait_ms),
                secs(c.steal_ms),
            ]
        })
        .collect();
    let disks: Vec<Vec<String>> = s
        .disks
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                d.reads.to_string(),
                human_size(d.read_bytes),
                d.writes.to_string(),
                human_size(d.write_bytes),
                secs(d.busy_ms),
            ]
        })
        .collect();
    let routes: Vec<Vec<String>> = s
        .routes
        .iter()
        .map(|r| {
            vec![
                r.destination.clone(),
                r.gateway.clone().unwrap_or_else(|| "-".into()),
                r.interface.clone(),
                r.metric.to_string(),
            ]
        })
        .collect();
    format!(
        "Load average: {l1:.2}, {l5:.2}, {l15:.2}\n\n{}\n{}\n{}",
        table(
            &["CPU", "USER", "SYSTEM", "IDLE", "IOWAIT", "STEAL"],
            &[R, R, R, R, R, R],
            &cpus
        ),
        table(
            &["DEVICE", "READS", "READ", "WRITES", "WRITTEN", "BUSY"],
            &[L, R, R, R, R, R],
            &disks
        ),
        table(
            &["DESTINATION", "GATEWAY", "INTERFACE", "METRIC"],
            &[L, L, L, R],
            &routes
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_render_in_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_250_000_000), "2000-02-29T00:00:00.250Z");
        assert_eq!(utc(1_763_784_000_000_000_000), "2025-11-22T04:00:00.000Z");
        assert_eq!(offset(3600), "+01:00");
        assert_eq!(offset(-16200), "-04:30");
    }

    #[test]
    fn long_keys_are_shortened_in_tables() {
        let blob = format!("AAAAC3NzaC1lZDI1NTE5{}", "x".repeat(48));
        let s = short_key(&format!("ssh-ed25519 {blob} me@host"));
        assert!(
            s.starts_with("ssh-ed25519 AAAAC3NzaC1l…") && s.ends_with(" me@host"),
            "{s}"
        );
    }
}
