//! Rendering of results for people: the tables and key-value lists of
//! `info`, `sysinfo`, `net` and `df`, and the progress line of transfers.
//! The building blocks (tables, sizes, durations) are in `format`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::format::{human_duration, human_size, key_values, percent, table, Align};
use crate::Progress;

pub(super) fn render_info(info: &agent_common::methods::AgentInfo) -> String {
    let l = &info.limits;
    key_values(&[
        ("Agent", format!("{} {}", info.name, info.version)),
        ("Protocol", info.protocol_version.to_string()),
        ("Platform", info.platform.clone()),
        ("Methods", info.methods.join(", ")),
        ("Max request", human_size(l.max_message_size)),
        ("Max response", human_size(l.max_response_size)),
        ("Max read chunk", human_size(l.max_read_chunk)),
        (
            "Attachments",
            if l.max_attachment_size > 0 {
                format!("up to {}", human_size(l.max_attachment_size))
            } else {
                "no (file data in base64)".to_owned()
            },
        ),
        ("Max file size", human_size(l.max_file_size)),
        ("Max exec output", human_size(l.max_exec_output)),
        (
            "Max command time",
            format!("{} s", l.max_command_timeout_seconds),
        ),
        (
            "Request timeout",
            format!("{} s", l.request_timeout_seconds),
        ),
        ("Concurrent requests", l.max_concurrent_requests.to_string()),
        (
            "Disabled methods",
            if info.disabled_methods.is_empty() {
                "none".to_owned()
            } else {
                info.disabled_methods.join(", ")
            },
        ),
        (
            "Freeze timeout",
            l.freeze_timeout_seconds
                .map_or_else(|| "-".to_owned(), |s| format!("{s} s")),
        ),
    ])
}

pub(super) fn render_sysinfo(s: &agent_common::methods::SystemInfo) -> String {
    let os = s
        .os_pretty_name
        .clone()
        .or_else(|| s.os_name.clone())
        .unwrap_or_else(|| s.os_type.clone());
    let cpus = match &s.cpu_model {
        Some(m) => format!("{} x {m}", s.cpu_count),
        None => s.cpu_count.to_string(),
    };
    let [l1, l5, l15] = s.load_average;
    key_values(&[
        ("Hostname", s.hostname.clone()),
        ("OS", os),
        (
            "Kernel",
            format!("{} {}", s.kernel_release, s.kernel_version),
        ),
        ("Architecture", s.architecture.clone()),
        ("CPUs", cpus),
        (
            "Memory",
            format!(
                "{} total, {} available",
                human_size(s.memory_total_bytes),
                human_size(s.memory_available_bytes)
            ),
        ),
        (
            "Swap",
            format!(
                "{} total, {} free",
                human_size(s.swap_total_bytes),
                human_size(s.swap_free_bytes)
            ),
        ),
        ("Uptime", human_duration(s.uptime_seconds)),
        ("Load average", format!("{l1:.2}, {l5:.2}, {l15:.2}")),
    ])
}

pub(super) fn render_net(n: &agent_common::methods::NetworkInfo) -> String {
    let rows: Vec<Vec<String>> = n
        .interfaces
        .iter()
        .map(|i| {
            let state = match (i.is_up, i.is_running) {
                (true, true) => "up",
                (true, false) => "no-carrier",
                _ => "down",
            };
            let addrs: Vec<String> = i
                .addresses
                .iter()
                .map(|a| format!("{}/{}", a.address, a.prefix_len))
                .collect();
            vec![
                i.name.clone(),
                state.to_owned(),
                i.mac_address.clone().unwrap_or_else(|| "-".into()),
                i.mtu.map_or_else(|| "-".into(), |m| m.to_string()),
                human_size(i.statistics.rx_bytes),
                human_size(i.statistics.tx_bytes),
                if addrs.is_empty() {
                    "-".into()
                } else {
                    addrs.join(", ")
                },
            ]
        })
        .collect();
    use Align::{Left as L, Right as R};
    table(
        &["NAME", "STATE", "MAC", "MTU", "RX", "TX", "ADDRESSES"],
        &[L, L, L, R, R, R, L],
        &rows,
    )
}

pub(super) fn render_df(d: &agent_common::methods::DiskUsage) -> String {
    let rows: Vec<Vec<String>> = d
        .filesystems
        .iter()
        .map(|f| {
            vec![
                f.device.clone(),
                f.fs_type.clone(),
                human_size(f.total_bytes),
                human_size(f.used_bytes),
                human_size(f.free_bytes),
                percent(f.used_bytes, f.used_bytes + f.free_bytes),
                if f.read_only {
                    format!("{} (ro)", f.mount_point)
                } else {
                    f.mount_point.clone()
                },
            ]
        })
        .collect();
    use Align::{Left as L, Right as R};
    table(
        &[
            "FILESYSTEM",
            "TYPE",
            "SIZE",
            "USED",
            "AVAIL",
            "USE%",
            "MOUNTED ON",
        ],
        &[L, L, R, R, R, R, L],
        &rows,
    )
}

/// A single updating progress line on stderr, drawn only on a terminal.
pub(super) struct ProgressLine {
    enabled: bool,
    start: Instant,
    last: Option<Instant>,
    drawn: bool,
}

impl ProgressLine {
    pub(super) fn new() -> ProgressLine {
        ProgressLine {
            enabled: std::io::stderr().is_terminal(),
            start: Instant::now(),
            last: None,
            drawn: false,
        }
    }

    pub(super) fn update(&mut self, p: Progress) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let finished = p.total.is_some_and(|t| p.done >= t);
        if self
            .last
            .is_some_and(|l| now - l < Duration::from_millis(100))
            && !finished
        {
            return;
        }
        self.last = Some(now);
        let secs = self.start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            p.done as f64 / secs
        } else {
            0.0
        };
        let line = match (p.total, p.fraction()) {
            (Some(t), Some(f)) => format!(
                "{} / {}  {:3.0}%  {}/s",
                human_size(p.done),
                human_size(t),
                f * 100.0,
                human_size(rate as u64)
            ),
            _ => format!("{}  {}/s", human_size(p.done), human_size(rate as u64)),
        };
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[K{line}");
        let _ = e.flush();
        self.drawn = true;
    }

    pub(super) fn finish(&mut self) {
        if self.drawn {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K");
            let _ = e.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn df_table_renders() {
        let d = agent_common::methods::DiskUsage {
            filesystems: vec![agent_common::methods::Filesystem {
                device: "/dev/vda1".into(),
                mount_point: "/".into(),
                fs_type: "ext4".into(),
                total_bytes: 10 << 30,
                used_bytes: 3 << 30,
                free_bytes: 7 << 30,
                total_inodes: 0,
                free_inodes: 0,
                read_only: false,
            }],
        };
        assert_eq!(
            render_df(&d),
            "FILESYSTEM  TYPE      SIZE     USED    AVAIL  USE%  MOUNTED ON\n\
             /dev/vda1   ext4  10.0 GiB  3.0 GiB  7.0 GiB   30%  /\n"
        );
    }
}
