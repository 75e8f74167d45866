//! `get_time` and `set_time`: the wall clock, the time zone and the
//! hardware clock (RTC, through `/dev/rtc0`'s `RTC_RD_TIME` and
//! `RTC_SET_TIME`, as `hwclock` does, without needing `hwclock`).
//!
//! The RTC is read and written in UTC, unless the third line of
//! `/etc/adjtime` says `LOCAL` (then in local time, as `hwclock` would).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::time::{SystemTime, UNIX_EPOCH};

use agent_common::error::ErrorKind;
use agent_common::methods::{SetTimeParams, SetTimeResult, TimeInfo, TimeSource};

use crate::error::{io_error_kind, RpcError};
use crate::sys::{self, RtcTime};

/// Earliest time `set_time` accepts: 2000-01-01T00:00:00Z, in ns. A
/// smaller value is most likely seconds sent as nanoseconds.
pub const MIN_TIME_NS: u64 = 946_684_800 * 1_000_000_000;
/// Latest time `set_time` accepts: 2200-01-01T00:00:00Z, in ns.
pub const MAX_TIME_NS: u64 = 7_258_118_400 * 1_000_000_000;

const NS: u64 = 1_000_000_000;

/// Why the time could not be set.
#[derive(Debug, thiserror::Error)]
pub enum TimeError {
    /// `time_ns` is out of range.
    #[error("time_ns {0} is outside 2000-01-01 .. 2200-01-01 (nanoseconds since the Unix epoch, not seconds)")]
    OutOfRange(u64),
    /// The hardware clock could not be read.
    #[error("cannot read the hardware clock")]
    ReadRtc(#[source] io::Error),
    /// The hardware clock holds no valid date.
    #[error("the hardware clock holds an invalid date ({0})")]
    BadRtc(String),
    /// The system clock could not be set.
    #[error("cannot set the system clock")]
    SetClock(#[source] io::Error),
}

impl RpcError for TimeError {
    fn kind(&self) -> ErrorKind {
        match self {
            TimeError::OutOfRange(_) => ErrorKind::InvalidParams,
            TimeError::ReadRtc(e) if e.kind() == io::ErrorKind::NotFound => ErrorKind::NotSupported,
            TimeError::ReadRtc(e) | TimeError::SetClock(e) => io_error_kind(e),
            TimeError::BadRtc(_) => ErrorKind::IoError,
        }
    }
}

/// The clocks `set_time` works on: the real ones, or a test's.
pub trait Clocks {
    /// Sets the system wall clock.
    fn set_system(&self, ns: u64) -> io::Result<()>;
    /// The system wall clock.
    fn system(&self) -> u64;
    /// Reads the hardware clock (UTC seconds since the epoch).
    fn read_rtc(&self) -> Result<u64, TimeError>;
    /// Writes the hardware clock (UTC seconds since the epoch).
    fn write_rtc(&self, secs: u64) -> io::Result<()>;
}

/// The guest's clocks.
pub struct SystemClocks;

fn open_rtc() -> io::Result<File> {
    File::open("/dev/rtc0").or_else(|_| File::open("/dev/rtc"))
}

/// True if `/etc/adjtime` keeps the RTC in local time.
fn rtc_is_local() -> bool {
    std::fs::read_to_string("/etc/adjtime")
        .ok()
        .and_then(|t| t.lines().nth(2).map(|l| l.trim() == "LOCAL"))
        .unwrap_or(false)
}

fn local_offset(secs: u64) -> i64 {
    i64::try_from(secs)
        .ok()
        .and_then(|s| sys::utc_offset_at(s).ok())
        .map_or(0, i64::from)
}

impl Clocks for SystemClocks {
    fn set_system(&self, ns: u64) -> io::Result<()> {
        sys::set_realtime(ns / NS, (ns % NS) as u32)
    }

    fn system(&self) -> u64 {
        now_ns()
    }

    fn read_rtc(&self) -> Result<u64, TimeError> {
        let rtc = open_rtc().map_err(TimeError::ReadRtc)?;
        let t = sys::rtc_read(rtc.as_fd()).map_err(TimeError::ReadRtc)?;
        let secs = rtc_to_unix(&t).ok_or_else(|| TimeError::BadRtc(format!("{t:?}")))?;
        if rtc_is_local() {
            // The offset at the (approximate) UTC time.
            let off = local_offset(secs);
            return Ok(secs.saturating_add_signed(-off));
        }
        Ok(secs)
    }

    fn write_rtc(&self, secs: u64) -> io::Result<()> {
        let secs = if rtc_is_local() {
            secs.saturating_add_signed(local_offset(secs))
        } else {
            secs
        };
        let rtc = open_rtc()?;
        sys::rtc_set(rtc.as_fd(), &unix_to_rtc(secs))
    }
}

/// The wall clock in ns since the epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The time zone's name: the target of `/etc/localtime` below `zoneinfo/`,
/// else `/etc/timezone`.
pub fn timezone_name() -> Option<String> {
    if let Ok(target) = std::fs::read_link("/etc/localtime") {
        let t = target.to_string_lossy();
        if let Some((_, name)) = t.split_once("zoneinfo/") {
            return Some(name.to_owned());
        }
    }
    std::fs::read_to_string("/etc/timezone")
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// `get_time`.
pub fn get_time() -> TimeInfo {
    let time_ns = now_ns();
    TimeInfo {
        time_ns,
        timezone: timezone_name(),
        utc_offset_seconds: i64::try_from(time_ns / NS)
            .ok()
            .and_then(|s| sys::utc_offset_at(s).ok())
            .unwrap_or(0),
    }
}

/// `set_time`: to `time_ns`, then the RTC to match; without it, from the
/// RTC. A missing or failing RTC after the system clock was set is not an
/// error: `rtc_written` says so.
pub fn set_time(p: SetTimeParams, clocks: &dyn Clocks) -> Result<SetTimeResult, TimeError> {
    match p.time_ns {
        Some(ns) => {
            if !(MIN_TIME_NS..=MAX_TIME_NS).contains(&ns) {
                return Err(TimeError::OutOfRange(ns));
            }
            clocks.set_system(ns).map_err(TimeError::SetClock)?;
            let rtc_written = match clocks.write_rtc(ns / NS) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "system clock set, but not the hardware clock");
                    false
                }
            };
            Ok(SetTimeResult {
                time_ns: clocks.system(),
                source: TimeSource::Request,
                rtc_written,
            })
        }
        None => {
            let secs = clocks.read_rtc()?;
            clocks
                .set_system(secs.saturating_mul(NS))
                .map_err(TimeError::SetClock)?;
            Ok(SetTimeResult {
                time_ns: clocks.system(),
                source: TimeSource::Rtc,
                rtc_written: false,
            })
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01 (`civil_from_days`).
pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// An RTC reading as seconds since the epoch; `None` if it is not a date.
fn rtc_to_unix(t: &RtcTime) -> Option<u64> {
    let ok = (0..60).contains(&t.tm_sec)
        && (0..60).contains(&t.tm_min)
        && (0..24).contains(&t.tm_hour)
        && (1..32).contains(&t.tm_mday)
        && (0..12).contains(&t.tm_mon)
        && t.tm_year >= 70;
    if !ok {
        return None;
    }
    let days = days_from_civil(
        i64::from(t.tm_year) + 1900,
        i64::from(t.tm_mon) + 1,
        i64::from(t.tm_mday),
    );
    let secs = days * 86_400
        + i64::from(t.tm_hour) * 3600
        + i64::from(t.tm_min) * 60
        + i64::from(t.tm_sec);
    u64::try_from(secs).ok()
}

/// Seconds since the epoch as an RTC setting.
fn unix_to_rtc(secs: u64) -> RtcTime {
    let days = (secs / 86_400) as i64;
    let rem = (secs % 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    // Every field is small: hours < 24, years < 2^31 for any u64 input
    // the range check lets through.
    RtcTime {
        tm_sec: (rem % 60) as i32,
        tm_min: (rem / 60 % 60) as i32,
        tm_hour: (rem / 3600) as i32,
        tm_mday: d as i32,
        tm_mon: (m - 1) as i32,
        tm_year: (y - 1900) as i32,
        tm_wday: ((days + 4).rem_euclid(7)) as i32,
        tm_yday: (days - days_from_civil(y, 1, 1)) as i32,
        tm_isdst: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct FakeClocks {
        system: Mutex<u64>,
        rtc: Mutex<Option<u64>>,
        rtc_fails: bool,
    }

    impl Clocks for FakeClocks {
        fn set_system(&self, ns: u64) -> io::Result<()> {
            *self.system.lock().unwrap() = ns;
            Ok(())
        }
        fn system(&self) -> u64 {
            *self.system.lock().unwrap()
        }
        fn read_rtc(&self) -> Result<u64, TimeError> {
            self.rtc
                .lock()
                .unwrap()
                .ok_or_else(|| TimeError::ReadRtc(io::Error::from_raw_os_error(libc::ENOENT)))
        }
        fn write_rtc(&self, secs: u64) -> io::Result<()> {
            if self.rtc_fails {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            *self.rtc.lock().unwrap() = Some(secs);
            Ok(())
        }
    }

    #[test]
    fn rtc_dates_round_trip() {
        for secs in [
            0u64,
            951_782_400,
            1_763_784_000,
            4_102_444_799,
            7_258_118_400,
        ] {
            let t = unix_to_rtc(secs);
            assert_eq!(rtc_to_unix(&t), Some(secs), "{secs}: {t:?}");
        }
        let t = unix_to_rtc(951_782_400); // 2000-02-29T00:00:00Z, a Tuesday
        assert_eq!(
            (t.tm_year, t.tm_mon, t.tm_mday, t.tm_wday, t.tm_yday),
            (100, 1, 29, 2, 59)
        );
        let bad = RtcTime {
            tm_mon: 12,
            ..unix_to_rtc(0)
        };
        assert_eq!(rtc_to_unix(&bad), None);
    }

    #[test]
    fn setting_a_time_writes_the_rtc_too() {
        let c = FakeClocks::default();
        let ns = 1_763_784_000_123_456_789;
        let r = set_time(SetTimeParams { time_ns: Some(ns) }, &c).unwrap();
        assert_eq!(r.time_ns, ns);
        assert_eq!(r.source, TimeSource::Request);
        assert!(r.rtc_written);
        assert_eq!(*c.rtc.lock().unwrap(), Some(1_763_784_000));
        let c = FakeClocks {
            rtc_fails: true,
            ..FakeClocks::default()
        };
        let r = set_time(SetTimeParams { time_ns: Some(ns) }, &c).unwrap();
        assert!(!r.rtc_written);
        assert_eq!(c.system(), ns);
    }

    #[test]
    fn without_a_time_the_rtc_sets_the_clock() {
        let c = FakeClocks::default();
        *c.rtc.lock().unwrap() = Some(1_763_784_000);
        let r = set_time(SetTimeParams { time_ns: None }, &c).unwrap();
        assert_eq!(r.source, TimeSource::Rtc);
        assert_eq!(r.time_ns, 1_763_784_000 * NS);
        let none = FakeClocks::default();
        let e = set_time(SetTimeParams { time_ns: None }, &none).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        assert_eq!(none.system(), 0, "nothing was set");
    }

    #[test]
    fn times_out_of_range_are_refused_before_anything_is_set() {
        let c = FakeClocks::default();
        for ns in [0, 1_763_784_000, MIN_TIME_NS - 1, MAX_TIME_NS + 1, u64::MAX] {
            let e = set_time(SetTimeParams { time_ns: Some(ns) }, &c).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidParams, "{ns}");
            assert!(e.to_string().contains("not seconds"), "{e}");
        }
        assert_eq!(c.system(), 0);
    }

    #[test]
    fn get_time_reads_this_machine() {
        let t = get_time();
        assert!(t.time_ns > MIN_TIME_NS);
        assert!(t.utc_offset_seconds.abs() <= 14 * 3600);
    }
}
