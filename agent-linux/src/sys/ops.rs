//! The guest operations' system calls: `FIFREEZE`, `FITHAW` and `FITRIM`
//! on a filesystem (through nix's ioctl macros), the RTC's `RTC_RD_TIME`
//! and `RTC_SET_TIME`, and `localtime_r` for the UTC offset.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `struct fstrim_range` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Debug, Default)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

/// `struct rtc_time` of `<linux/rtc.h>` (a `struct tm` without the zone).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RtcTime {
    /// Seconds, 0..=59.
    pub(crate) tm_sec: libc::c_int,
    /// Minutes, 0..=59.
    pub(crate) tm_min: libc::c_int,
    /// Hours, 0..=23.
    pub(crate) tm_hour: libc::c_int,
    /// Day of the month, 1..=31.
    pub(crate) tm_mday: libc::c_int,
    /// Month, 0..=11.
    pub(crate) tm_mon: libc::c_int,
    /// Years since 1900.
    pub(crate) tm_year: libc::c_int,
    /// Unused by the RTC drivers.
    pub(crate) tm_wday: libc::c_int,
    /// Unused by the RTC drivers.
    pub(crate) tm_yday: libc::c_int,
    /// Unused by the RTC drivers.
    pub(crate) tm_isdst: libc::c_int,
}

nix::ioctl_readwrite!(ioctl_fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(ioctl_fithaw, b'X', 120, libc::c_int);
nix::ioctl_readwrite!(ioctl_fitrim, b'X', 121, FstrimRange);
nix::ioctl_read!(ioctl_rtc_rd_time, b'p', 0x09, RtcTime);
nix::ioctl_write_ptr!(ioctl_rtc_set_time, b'p', 0x0a, RtcTime);

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// `ioctl(fd, FIFREEZE)`: freezes the filesystem `fd` (any file or
/// directory on it) is on.
pub(crate) fn fifreeze(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut unused: libc::c_int = 0;
    // SAFETY: `fd` is a valid descriptor for the call; the kernel ignores
    // the argument, which points to a live int anyway.
    unsafe { ioctl_fifreeze(fd.as_raw_fd(), &mut unused) }
        .map(drop)
        .map_err(errno)
}

/// `ioctl(fd, FITHAW)`: thaws the filesystem `fd` is on.
pub(crate) fn fithaw(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut unused: libc::c_int = 0;
    // SAFETY: as for `fifreeze`.
    unsafe { ioctl_fithaw(fd.as_raw_fd(), &mut unused) }
        .map(drop)
        .map_err(errno)
}

/// `ioctl(fd, FITRIM)` over the whole filesystem, skipping free extents
/// shorter than `minimum`; the bytes the filesystem reports trimmed.
pub(crate) fn fitrim(fd: BorrowedFd<'_>, minimum: u64) -> io::Result<u64> {
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: minimum,
    };
    // SAFETY: `fd` is valid and `range` is a live, initialised
    // `fstrim_range` the kernel reads and writes back.
    unsafe { ioctl_fitrim(fd.as_raw_fd(), &mut range) }.map_err(errno)?;
    Ok(range.len)
}

/// `ioctl(rtc, RTC_RD_TIME)`.
pub(crate) fn rtc_read(rtc: BorrowedFd<'_>) -> io::Result<RtcTime> {
    let mut t = RtcTime::default();
    // SAFETY: `rtc` is valid and `t` is a live `rtc_time` the kernel fills.
    unsafe { ioctl_rtc_rd_time(rtc.as_raw_fd(), &mut t) }.map_err(errno)?;
    Ok(t)
}

/// `ioctl(rtc, RTC_SET_TIME)`.
pub(crate) fn rtc_set(rtc: BorrowedFd<'_>, t: &RtcTime) -> io::Result<()> {
    // SAFETY: `rtc` is valid and `t` points to an initialised `rtc_time`
    // the kernel only reads.
    unsafe { ioctl_rtc_set_time(rtc.as_raw_fd(), t) }
        .map(drop)
        .map_err(errno)
}

/// The local time zone's offset from UTC at Unix time `t`, in seconds
/// (`tm_gmtoff` of `localtime_r`).
// libc deprecates `time_t` on musl (it will follow musl 1.2's 64-bit one);
// it is the type these calls take on every target.
#[allow(deprecated)]
pub(crate) fn utc_offset_at(t: i64) -> io::Result<i32> {
    let t: libc::time_t = t;
    // SAFETY: `tm` is plain old data; all-zero is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is the
    // thread-safe variant and writes only `tm`.
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() {
        return Err(io::Error::last_os_error());
    }
    // A zone offset is at most a day.
    Ok(tm.tm_gmtoff as i32)
}

/// `clock_settime(CLOCK_REALTIME)` to `secs` and `nanos` past the epoch.
// See `utc_offset_at` for `time_t`.
#[allow(deprecated)]
pub(crate) fn set_realtime(secs: u64, nanos: u32) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(secs)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        tv_nsec: libc::c_long::from(nanos.min(999_999_999) as i32),
    };
    // SAFETY: `ts` is a valid, initialised timespec that outlives the call.
    let r = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Clock ticks per second of `/proc/stat` (`sysconf(_SC_CLK_TCK)`, 100
/// if the system cannot tell).
pub(crate) fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}
