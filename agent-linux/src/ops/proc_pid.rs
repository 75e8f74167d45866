//! The process table as `/proc/<pid>/` describes it: `stat` for every
//! process, `status` (the user) and `cmdline` only when asked. Threads are
//! not listed (`/proc` lists thread groups), but `/proc/<tid>/` of a thread
//! is read like a process's, which [`read_one`] relies on. Blocking; a
//! process that exits while it is being read is left out, not an error.

use std::fs;
use std::io;

/// `PF_KTHREAD` in `/proc/<pid>/stat`'s flags: a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Clock ticks, page size and boot time: what turns `stat`'s fields into
/// milliseconds, bytes and Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Units {
    /// Clock ticks per second (`_SC_CLK_TCK`).
    pub hz: u64,
    /// Bytes per page.
    pub page_size: u64,
    /// Boot time, Unix seconds (`btime` of `/proc/stat`).
    pub boot_time: u64,
}

impl Units {
    /// This system's units (the boot time from `/proc/stat`; 0 if it
    /// cannot be read).
    pub fn of_this_system() -> Units {
        let proc_stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        Units {
            hz: crate::sys::clock_ticks(),
            page_size: crate::sys::page_size(),
            boot_time: boot_time(&proc_stat).unwrap_or(0),
        }
    }
}

/// The `btime` line of `/proc/stat`.
pub fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The fields of `/proc/<pid>/stat` the agent reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// Process id.
    pub pid: u32,
    /// The command name (`comm`, at most 15 bytes, any bytes but NUL).
    pub comm: String,
    /// The state letter (`R`, `S`, `D`, ...).
    pub state: u8,
    /// Parent's pid; 0 for init and kthreadd.
    pub ppid: u32,
    /// A kernel thread.
    pub kernel: bool,
    /// User plus system time, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time, in clock ticks after boot.
    pub start_ticks: u64,
    /// Resident set, in pages.
    pub rss_pages: u64,
}

impl Stat {
    /// User plus system time in milliseconds.
    pub fn cpu_time_ms(&self, u: Units) -> u64 {
        self.cpu_ticks.saturating_mul(1000) / u.hz.max(1)
    }

    /// Start time, Unix seconds.
    pub fn start_time(&self, u: Units) -> u64 {
        u.boot_time + self.start_ticks / u.hz.max(1)
    }

    /// Resident set in bytes.
    pub fn rss_bytes(&self, u: Units) -> u64 {
        self.rss_pages.saturating_mul(u.page_size)
    }

    /// The state's name as `list_processes` reports it.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            b'R' => "running",
            b'S' => "sleeping",
            b'D' => "disk_sleep",
            b'T' => "stopped",
            b't' => "tracing",
            b'Z' => "zombie",
            b'X' | b'x' => "dead",
            b'I' => "idle",
            b'P' => "parked",
            b'K' => "wakekill",
            b'W' => "waking",
            _ => "unknown",
        }
    }
}

/// Parses `/proc/<pid>/stat`: `pid (comm) state ppid ...`. `comm` may hold
/// spaces and parentheses, so the last `)` ends it.
pub fn parse_stat(text: &[u8]) -> Option<Stat> {
    let open = text.iter().position(|&b| b == b'(')?;
    let close = text.iter().rposition(|&b| b == b')')?;
    let pid = std::str::from_utf8(&text[..open])
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = String::from_utf8_lossy(text.get(open + 1..close)?).into_owned();
    let rest = std::str::from_utf8(&text[close + 1..]).ok()?;
    // Field N of proc(5) is rest's field N - 3.
    let f: Vec<&str> = rest.split_ascii_whitespace().take(22).collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        pid,
        comm,
        state: *f.first()?.as_bytes().first()?,
        ppid: u32::try_from(num(1)?).ok()?,
        kernel: num(6)? & PF_KTHREAD != 0,
        cpu_ticks: num(11)?.saturating_add(num(12)?),
        start_ticks: num(19)?,
        rss_pages: num(21)?,
    })
}

/// The first number of the `key` line of a `/proc/<pid>/status` text
/// (`Uid:`: the real uid; `Tgid:`: the thread group).
pub fn parse_status_field(text: &str, key: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The arguments of a `/proc/<pid>/cmdline` (NUL-separated; empty for a
/// kernel thread or a zombie).
pub fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    let raw = raw.strip_suffix(b"\0").unwrap_or(raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// `/proc/<pid>/stat` of one process or thread; `None`: no such process.
pub fn read_one(pid: u32) -> io::Result<Option<Stat>> {
    match fs::read(format!("/proc/{pid}/stat")) {
        Ok(text) => Ok(parse_stat(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The pids under `/proc` (thread groups, not their threads).
pub fn pids() -> io::Result<Vec<u32>> {
    let mut pids: Vec<u32> = fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    Ok(pids)
}

/// `stat` of every process that is still there when read.
pub fn read_all() -> io::Result<Vec<Stat>> {
    Ok(pids()?
        .into_iter()
        .filter_map(|pid| read_one(pid).ok().flatten())
        .collect())
}

/// The `key` field of `/proc/<pid>/status`; `None` if the process is gone.
fn status_field(pid: u32, key: &str) -> Option<u32> {
    parse_status_field(
        &fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        key,
    )
}

/// A process's real uid; `None` if it is gone.
pub fn uid(pid: u32) -> Option<u32> {
    status_field(pid, "Uid:")
}

/// The process a thread id belongs to (its thread group; a process's own
/// pid for a process); `None` if it is gone.
pub fn thread_group(pid: u32) -> Option<u32> {
    status_field(pid, "Tgid:")
}

/// A process's arguments; empty if it is gone or a kernel thread.
pub fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| parse_cmdline(&raw))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &[u8] = b"4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1200 0 3 0 \
        150 25 0 0 20 0 1 0 9000 12345678 321 18446744073709551615 1 1 0 0 0 0 0 \
        4096 0 0 0 0 17 0 0 0 0 0 0\n";

    #[test]
    fn stat_fields_and_units() {
        let s = parse_stat(STAT).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.comm, "my (odd) name");
        assert_eq!((s.state, s.ppid, s.kernel), (b'S', 1, false));
        assert_eq!((s.cpu_ticks, s.start_ticks, s.rss_pages), (175, 9000, 321));
        let u = Units {
            hz: 100,
            page_size: 4096,
            boot_time: 1_700_000_000,
        };
        assert_eq!(s.cpu_time_ms(u), 1750);
        assert_eq!(s.start_time(u), 1_700_000_090);
        assert_eq!(s.rss_bytes(u), 321 * 4096);
        assert_eq!(s.state_name(), "sleeping");
    }

    #[test]
    fn kernel_threads_and_bad_lines() {
        let k = b"2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 3 0 0 20 0 1 0 1 0 0 \
            18446744073709551615 0 0 0 0 0 0 0 2147483647 0 0 0 0 0 0 0 0 0 0 0\n";
        let s = parse_stat(k).unwrap();
        assert!(s.kernel);
        assert_eq!(s.ppid, 0);
        for bad in [
            &b""[..],
            b"12 (x",
            b"12 (x) S",
            b"x (y) S 1 2 3",
            b"12 (x) S 1 2 3 4 5",
        ] {
            assert_eq!(parse_stat(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn status_cmdline_and_btime() {
        let status = "Name:\tsh\nTgid:\t7\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(parse_status_field(status, "Uid:"), Some(1000));
        assert_eq!(parse_status_field(status, "Tgid:"), Some(7));
        assert_eq!(parse_status_field("Name:\tsh\n", "Uid:"), None);
        assert_eq!(parse_cmdline(b"sleep\x0030\x00"), ["sleep", "30"]);
        assert_eq!(parse_cmdline(b"a\x00\x00b\x00"), ["a", "", "b"]);
        assert!(parse_cmdline(b"").is_empty());
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
        assert_eq!(boot_time("cpu 1 2 3\n"), None);
    }

    #[test]
    fn this_process_is_in_the_table() {
        let me = std::process::id();
        let all = read_all().unwrap();
        let s = all
            .iter()
            .find(|s| s.pid == me)
            .expect("this process listed");
        assert!(!s.kernel);
        assert!(s.rss_pages > 0);
        assert_eq!(uid(me), Some(crate::sys::geteuid()));
        assert!(!cmdline(me).is_empty());
        assert_eq!(read_one(u32::MAX - 1).unwrap(), None);
        let u = Units::of_this_system();
        assert!(u.boot_time > 0 && s.start_time(u) >= u.boot_time);
    }
}
