//! `get_stats`: load averages (`/proc/loadavg`), per-CPU time counters
//! (`/proc/stat`), per-device I/O counters (`/proc/diskstats`) and the
//! routing table (`/proc/net/route`, `/proc/net/ipv6_route`). Blocking.
//! The parsers are pure functions of the files' text.

use std::net::{Ipv4Addr, Ipv6Addr};

use agent_common::methods::{CpuTimes, DiskIo, GuestStats, IpFamily, Route};

use crate::sysinfo::{parse_loadavg, read, SysInfoError};

/// `RTF_UP`: the route is usable.
const RTF_UP: u32 = 0x1;
/// `RTF_REJECT`: an unreachable route.
const RTF_REJECT: u32 = 0x200;
/// `RTF_LOCAL`: a route to one of the guest's own addresses (local table).
const RTF_LOCAL: u32 = 0x8000_0000;

/// `get_stats`.
pub fn stats() -> Result<GuestStats, SysInfoError> {
    let load_average = parse_loadavg(&read("/proc/loadavg")?);
    let cpus = parse_cpu_times(&read("/proc/stat")?, crate::sys::clock_ticks());
    let disks = parse_diskstats(&read("/proc/diskstats")?);
    // A guest without IPv6 has no ipv6_route.
    let mut routes = parse_routes4(&read("/proc/net/route").unwrap_or_default());
    routes.extend(parse_routes6(
        &std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default(),
    ));
    Ok(GuestStats {
        load_average,
        cpus,
        disks,
        routes,
    })
}

/// The `cpuN` lines of `/proc/stat`, in ms at `hz` ticks per second.
pub fn parse_cpu_times(text: &str, hz: u64) -> Vec<CpuTimes> {
    let ms = |ticks: u64| ticks.saturating_mul(1000) / hz.max(1);
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let cpu = f.next()?.strip_prefix("cpu")?.parse::<u32>().ok()?;
            let v: Vec<u64> = f.map(|x| x.parse().unwrap_or(0)).collect();
            let at = |i: usize| ms(v.get(i).copied().unwrap_or(0));
            Some(CpuTimes {
                cpu,
                user_ms: at(0),
                nice_ms: at(1),
                system_ms: at(2),
                idle_ms: at(3),
                iowait_ms: at(4),
                irq_ms: at(5),
                softirq_ms: at(6),
                steal_ms: at(7),
                guest_ms: at(8),
                guest_nice_ms: at(9),
            })
        })
        .collect()
}

/// `/proc/diskstats`, without devices that never did any I/O.
pub fn parse_diskstats(text: &str) -> Vec<DiskIo> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            let name = (*f.get(2)?).to_owned();
            let d = DiskIo {
                name,
                reads: n(3),
                read_bytes: n(5).saturating_mul(512),
                read_ms: n(6),
                writes: n(7),
                write_bytes: n(9).saturating_mul(512),
                write_ms: n(10),
                in_flight: n(11),
                busy_ms: n(12),
                major: n(0),
                minor: n(1),
                read_merges: n(4),
                write_merges: n(8),
                weighted_ms: n(13),
                discards: n(14),
                discard_merges: n(15),
                discard_bytes: n(16).saturating_mul(512),
                discard_ms: n(17),
                flushes: n(18),
                flush_ms: n(19),
            };
            (d.reads > 0 || d.writes > 0).then_some(d)
        })
        .collect()
}

/// An address of `/proc/net/route`: a `__be32` printed as a native `%08X`.
fn route4_addr(hex: &str) -> Option<Ipv4Addr> {
    u32::from_str_radix(hex, 16)
        .ok()
        .map(|v| Ipv4Addr::from(v.to_ne_bytes()))
}

/// The up routes of `/proc/net/route`.
pub fn parse_routes4(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            if flags & RTF_UP == 0 || flags & RTF_REJECT != 0 {
                return None;
            }
            let dest = route4_addr(f.get(1)?)?;
            let gw = route4_addr(f.get(2)?)?;
            let mask = route4_addr(f.get(7)?)?;
            Some(Route {
                family: IpFamily::Ipv4,
                destination: format!("{dest}/{}", u32::from(mask).count_ones()),
                gateway: (!gw.is_unspecified()).then(|| gw.to_string()),
                interface: (*f.first()?).to_owned(),
                metric: f.get(6)?.parse().ok()?,
            })
        })
        .collect()
}

fn route6_addr(hex: &str) -> Option<Ipv6Addr> {
    u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from)
}

/// The up routes of `/proc/net/ipv6_route`, without the loopback's and
/// the guest's own addresses.
pub fn parse_routes6(text: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let iface = *f.get(9)?;
            let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
            if iface == "lo" || flags & RTF_UP == 0 || flags & (RTF_REJECT | RTF_LOCAL) != 0 {
                return None;
            }
            let dest = route6_addr(f.first()?)?;
            let prefix = u8::from_str_radix(f.get(1)?, 16).ok()?;
            let gw = route6_addr(f.get(4)?)?;
            Some(Route {
                family: IpFamily::Ipv6,
                destination: format!("{dest}/{prefix}"),
                gateway: (!gw.is_unspecified()).then(|| gw.to_string()),
                interface: iface.to_owned(),
                metric: u32::from_str_radix(f.get(5)?, 16).ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lines_are_read_in_ms_without_the_total() {
        let t = "cpu  10 0 0 0\ncpu0 100 2 30 400 5 0 6 7 0 0\ncpu1 1 1 1 1\nintr 5\n";
        let c = parse_cpu_times(t, 100);
        assert_eq!(c.len(), 2);
        assert_eq!(
            (
                c[0].cpu,
                c[0].user_ms,
                c[0].nice_ms,
                c[0].system_ms,
                c[0].idle_ms
            ),
            (0, 1000, 20, 300, 4000)
        );
        assert_eq!(
            (c[0].iowait_ms, c[0].softirq_ms, c[0].steal_ms),
            (50, 60, 70)
        );
        assert_eq!((c[1].cpu, c[1].steal_ms), (1, 0));
    }

    #[test]
    fn diskstats_give_bytes_and_skip_idle_devices() {
        let t = " 254 0 vda 1314 0 48444 266 355 124 752 264 2 376 775\n   7 3 loop3 0 0 0 0 0 0 0 0 0 0 0\n";
        let d = parse_diskstats(t);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].name, "vda");
        assert_eq!(
            (d[0].reads, d[0].read_bytes, d[0].read_ms),
            (1314, 48444 * 512, 266)
        );
        assert_eq!(
            (d[0].writes, d[0].write_bytes, d[0].write_ms),
            (355, 752 * 512, 264)
        );
        assert_eq!((d[0].in_flight, d[0].busy_ms), (2, 376));
        assert_eq!((d[0].major, d[0].minor), (254, 0));
        assert_eq!(
            (d[0].read_merges, d[0].write_merges, d[0].weighted_ms),
            (0, 124, 775)
        );
        // Kernels since 4.18 and 5.5 add discard and flush counters.
        let t = " 254 16 vdb 10 1 80 2 20 3 160 4 0 9 11 5 6 4096 7 8 9\n";
        let d = &parse_diskstats(t)[0];
        assert_eq!(
            (d.discards, d.discard_merges, d.discard_bytes, d.discard_ms),
            (5, 6, 4096 * 512, 7)
        );
        assert_eq!((d.flushes, d.flush_ms), (8, 9));
    }

    #[test]
    fn routing_tables_parse() {
        // Written as a little-endian kernel prints them.
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                  eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  eth1\t000300C0\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let r = parse_routes4(v4);
        if cfg!(target_endian = "little") {
            assert_eq!(r.len(), 2);
            assert_eq!(r[0].destination, "0.0.0.0/0");
            assert_eq!(r[0].gateway.as_deref(), Some("192.0.2.1"));
            assert_eq!((r[0].interface.as_str(), r[0].metric), ("eth0", 100));
            assert_eq!(r[1].destination, "192.0.2.0/24");
            assert_eq!(r[1].gateway, None);
        }
        let v6 = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n\
                  00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 80200001       lo\n\
                  fd000000000000000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001     eth0\n";
        let r = parse_routes6(v6);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].destination, "fd00::/64");
        assert_eq!((r[0].gateway.as_deref(), r[0].metric), (None, 256));
        assert_eq!(r[1].destination, "::/0");
        assert_eq!(r[1].gateway.as_deref(), Some("fe80::1"));
    }

    #[test]
    fn this_machine_has_stats() {
        let s = stats().unwrap();
        assert!(!s.cpus.is_empty());
        assert!(s
            .cpus
            .iter()
            .any(|c| c.user_ms + c.system_ms + c.idle_ms > 0));
    }
}
