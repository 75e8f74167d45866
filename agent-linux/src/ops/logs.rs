//! `read_log`: the last lines of a log file beneath `allowed_read_paths`
//! (read backwards from its end, opened by the path policy like
//! `file_read`), or of a systemd unit's journal (`journalctl`, started by
//! `exec.rs`, read newest first and stopped once enough lines came).
//!
//! Memory is bounded whatever the log holds: at most
//! [`MAX_LOG_LINES`] lines of at most [`MAX_LOG_LINE_BYTES`] bytes and
//! [`MAX_LOG_BYTES`] in all are kept, and at most `max_file_size_mb` bytes
//! of the file (or of journalctl's output) are scanned.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agent_common::error::ErrorKind;
use agent_common::methods::{
    LogLines, ReadLogParams, MAX_LOG_BYTES, MAX_LOG_LINES, MAX_LOG_LINE_BYTES,
};

use crate::error::RpcError;
use crate::ops::time::days_from_civil;
use crate::policy::{PathPolicy, PolicyError};

/// `lines` when the host gives none.
pub const DEFAULT_LOG_LINES: u32 = 100;
/// Bytes read from the file per step backwards.
const CHUNK: usize = 64 * 1024;
/// Most bytes kept of one line while its start is still being looked for.
const LINE_SCAN: usize = 16 * 1024;
/// Where journald's sockets live while it runs.
const JOURNAL_RUN_DIR: &str = "/run/systemd/journal";
/// How long `journalctl` may take.
const JOURNAL_TIME: Duration = Duration::from_secs(20);

/// Why `read_log` failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Params that do not make sense.
    #[error("{0}")]
    Params(String),
    /// The path policy refused the file, or it could not be opened.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Reading the file failed.
    #[error("could not read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No journal in this guest.
    #[error("no systemd journal in this guest ({0}); give `path` to read a log file")]
    NoJournal(&'static str),
    /// `journalctl` failed.
    #[error("journalctl failed: {0}")]
    Journal(String),
}

impl RpcError for LogError {
    fn kind(&self) -> ErrorKind {
        match self {
            LogError::Params(_) => ErrorKind::InvalidParams,
            LogError::Policy(e) => e.kind(),
            LogError::Read { source, .. } => crate::error::io_error_kind(source),
            LogError::NoJournal(_) => ErrorKind::NotSupported,
            LogError::Journal(_) => ErrorKind::IoError,
        }
    }
    fn data(&self) -> Vec<(&'static str, serde_json::Value)> {
        match self {
            LogError::Policy(e) => e.data(),
            _ => Vec::new(),
        }
    }
}

/// What a `read_log` keeps: the newest matching lines, newest first.
#[derive(Debug)]
pub struct Collector {
    want: usize,
    since: Option<u64>,
    filter: Option<String>,
    /// Kept lines, newest first.
    lines: Vec<String>,
    bytes: usize,
    /// Undated lines seen (newest first) waiting for the dated line they
    /// continue, when `since` is given.
    pending: Vec<String>,
    /// More matching lines may exist that were not kept.
    truncated: bool,
}

impl Collector {
    /// A collector for `p` (validated).
    pub fn new(p: &ReadLogParams) -> Result<Collector, LogError> {
        let want = match p.lines {
            Some(0) => return Err(LogError::Params("lines must be at least 1".into())),
            Some(n) if n > MAX_LOG_LINES => {
                return Err(LogError::Params(format!(
                    "lines {n} is more than {MAX_LOG_LINES}; ask for fewer"
                )))
            }
            Some(n) => n,
            None => DEFAULT_LOG_LINES,
        } as usize;
        Ok(Collector {
            want,
            since: p.since,
            filter: p.filter.clone().filter(|f| !f.is_empty()),
            lines: Vec::new(),
            bytes: 0,
            pending: Vec::new(),
            truncated: false,
        })
    }

    /// Takes the next line, going back in time; false: enough, stop.
    pub fn push(&mut self, raw: &[u8]) -> bool {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = cut_line(raw);
        let Some(since) = self.since else {
            return self.keep(line);
        };
        match line_time(&line) {
            None => {
                // A continuation line: it goes with the dated line before it.
                if self.pending.len() < self.want {
                    self.pending.push(line);
                }
                true
            }
            Some(t) if t < since => {
                // Older than asked: so is everything before it.
                self.pending.clear();
                false
            }
            Some(_) => {
                let pending = std::mem::take(&mut self.pending);
                for l in pending {
                    if !self.keep(l) {
                        return false;
                    }
                }
                self.keep(line)
            }
        }
    }

    fn keep(&mut self, line: String) -> bool {
        if let Some(f) = &self.filter {
            if !line.contains(f.as_str()) {
                return true;
            }
        }
        if self.lines.len() >= self.want || self.bytes + line.len() > MAX_LOG_BYTES {
            self.truncated = true;
            return false;
        }
        self.bytes += line.len();
        self.lines.push(line);
        true
    }

    /// The kept lines, oldest first. `whole`: the source was read to its
    /// start (nothing older was skipped for size).
    pub fn finish(mut self, source: String, whole: bool) -> LogLines {
        // Undated lines at the very start of the log belong to no dated
        // line: with `since` they are left out.
        self.lines.reverse();
        LogLines {
            source,
            lines: self.lines,
            truncated: self.truncated || !whole,
        }
    }
}

/// The line as text, cut at [`MAX_LOG_LINE_BYTES`] (invalid UTF-8
/// replaced).
fn cut_line(raw: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(&raw[..raw.len().min(MAX_LOG_LINE_BYTES)]).into_owned();
    while s.len() > MAX_LOG_LINE_BYTES {
        s.pop();
    }
    s
}

/// The Unix time a log line starts with: an RFC 3339 time
/// (`2026-11-27T17:48:01Z`, `2026-11-27 17:48:01.123+01:00`), zone
/// required. `None` for a line that does not start with one.
pub fn line_time(line: &str) -> Option<u64> {
    let b = line.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = b.get(r)?;
        if s.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(s).ok()?.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut i = 19;
    if b[i] == b'.' || b[i] == b',' {
        i += 1;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' => 0,
        sign @ (b'+' | b'-') => {
            let oh = num(i + 1..i + 3)?;
            let om = match b.get(i + 3) {
                Some(b':') => num(i + 4..i + 6)?,
                _ => num(i + 3..i + 5)?,
            };
            let o = oh * 3600 + om * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let t = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s - offset;
    u64::try_from(t).ok()
}

/// `read_log`: from a file (`path`) or a unit's journal (`unit`).
pub async fn read_log(
    policy: Arc<PathPolicy>,
    p: ReadLogParams,
    scan_limit: u64,
) -> Result<LogLines, LogError> {
    let collector = Collector::new(&p)?;
    match (p.path, p.unit) {
        (Some(path), None) => {
            tokio::task::spawn_blocking(move || read_file(&policy, &path, collector, scan_limit))
                .await
                .map_err(|e| LogError::Journal(format!("the worker thread failed: {e}")))?
        }
        (None, Some(unit)) => read_journal(&unit, p.since, collector, scan_limit).await,
        _ => Err(LogError::Params(
            "give exactly one of `path` (a log file) and `unit` (a systemd unit's journal)".into(),
        )),
    }
}

/// The last lines of a file, read backwards from its end.
pub fn read_file(
    policy: &PathPolicy,
    path: &str,
    mut c: Collector,
    scan_limit: u64,
) -> Result<LogLines, LogError> {
    let file = policy.open_read(path)?;
    let whole = scan_backwards(&file, path, scan_limit, |l| c.push(l))?;
    Ok(c.finish(format!("file:{path}"), whole))
}

/// Hands `on_line` the file's lines from the last to the first until it
/// answers false; reads at most `scan_limit` bytes. True if it read to
/// the start of the file (or `on_line` had enough first).
fn scan_backwards(
    file: &File,
    path: &str,
    scan_limit: u64,
    mut on_line: impl FnMut(&[u8]) -> bool,
) -> Result<bool, LogError> {
    let err = |source| LogError::Read {
        path: path.to_owned(),
        source,
    };
    let size = file.metadata().map_err(err)?.len();
    let mut pos = size;
    let mut scanned = 0u64;
    // The end of the line whose start is not read yet (at most LINE_SCAN
    // bytes of it are kept, its start).
    let mut carry: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    let mut first = true;
    while pos > 0 {
        if scanned >= scan_limit {
            return Ok(false);
        }
        let n = (pos.min(CHUNK as u64)) as usize;
        pos -= n as u64;
        let chunk = &mut buf[..n];
        let mut filled = 0;
        while filled < n {
            match file.read_at(&mut chunk[filled..], pos + filled as u64) {
                Ok(0) => break,
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err(e)),
            }
        }
        scanned += n as u64;
        let mut joined = Vec::with_capacity(filled + carry.len());
        joined.extend_from_slice(&chunk[..filled]);
        joined.extend_from_slice(&carry);
        let mut end = joined.len();
        // The file's last newline ends the last line, not an empty one.
        if first && joined.last() == Some(&b'\n') {
            end -= 1;
        }
        first = false;
        while let Some(nl) = joined[..end].iter().rposition(|&b| b == b'\n') {
            if !on_line(&joined[nl + 1..end]) {
                return Ok(true);
            }
            end = nl;
        }
        joined.truncate(end.min(LINE_SCAN));
        carry = joined;
    }
    if !carry.is_empty() || size > 0 {
        on_line(&carry);
    }
    Ok(true)
}

/// A systemd unit name: letters, digits and `:-_.@\`, not starting with
/// `-` (never an option of journalctl), at most 256 bytes.
pub fn check_unit(unit: &str) -> Result<(), LogError> {
    let ok = !unit.is_empty()
        && unit.len() <= 256
        && !unit.starts_with('-')
        && unit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.@\\".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(LogError::Params(format!(
            "{unit:?} is not a systemd unit name (letters, digits and :-_.@\\ only)"
        )))
    }
}

/// The arguments of `journalctl` for a unit, newest line first.
pub fn journal_args(unit: &str, since: Option<u64>) -> Vec<String> {
    let mut args: Vec<String> = [
        "--no-pager",
        "--quiet",
        "--reverse",
        "--output=short-iso",
        "--unit",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.push(unit.to_owned());
    if let Some(t) = since {
        args.push(format!("--since=@{t}"));
    }
    args
}

async fn read_journal(
    unit: &str,
    since: Option<u64>,
    mut c: Collector,
    scan_limit: u64,
) -> Result<LogLines, LogError> {
    check_unit(unit)?;
    if !Path::new(JOURNAL_RUN_DIR).is_dir() {
        return Err(LogError::NoJournal("journald is not running"));
    }
    let Some(journalctl) = crate::policy::lookup_safe_path("journalctl") else {
        return Err(LogError::NoJournal("no journalctl"));
    };
    // journalctl selects by time itself; the collector filters by text.
    c.since = None;
    let args = journal_args(unit, since);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out =
        crate::exec::read_helper_lines(&journalctl, &args, JOURNAL_TIME, scan_limit, |l| c.push(l))
            .await
            .map_err(|e| LogError::Journal(e.to_string()))?;
    if let Some(status) = out.status {
        if !status.success() {
            let msg = String::from_utf8_lossy(&out.stderr);
            return Err(LogError::Journal(format!(
                "{status}: {}",
                msg.trim().lines().next().unwrap_or("")
            )));
        }
    }
    // Stopped by the collector: it knows whether lines were left; stopped
    // for size or time: older lines may remain.
    let whole = out.status.is_some() || c.truncated;
    Ok(c.finish(format!("journal:{unit}"), whole))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn params(lines: Option<u32>, since: Option<u64>, filter: Option<&str>) -> ReadLogParams {
        ReadLogParams {
            path: None,
            unit: None,
            lines,
            since,
            filter: filter.map(Into::into),
        }
    }

    fn scratch(content: &[u8]) -> (tempfile::TempDir, String, PathPolicy) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(content)
            .unwrap();
        let policy = PathPolicy::new(&[dir.path().to_path_buf()]);
        (dir, path.to_str().unwrap().to_owned(), policy)
    }

    fn read(content: &[u8], p: ReadLogParams) -> LogLines {
        let (_d, path, policy) = scratch(content);
        read_file(&policy, &path, Collector::new(&p).unwrap(), 1 << 30).unwrap()
    }

    #[test]
    fn rfc3339_times_at_the_start_of_lines() {
        assert_eq!(line_time("1970-01-01T00:00:00Z x"), Some(0));
        assert_eq!(
            line_time("2026-11-27T17:48:01+00:00 host x"),
            Some(1_795_801_681)
        );
        assert_eq!(
            line_time("2026-11-27 18:48:01.123456+01:00 x"),
            Some(1_795_801_681)
        );
        assert_eq!(line_time("2026-11-27T16:48:01-0100 x"), Some(1_795_801_681));
        for undated in [
            "",
            "  at java.lang.Thread",
            "2026-11-27T17:48:01 no zone",
            "Nov 27 17:48:01 host syslog",
            "2026-13-27T17:48:01Z",
            "2026-11-27T17:48:0xZ",
            "1969-12-31T23:59:59Z",
        ] {
            assert_eq!(line_time(undated), None, "{undated}");
        }
    }

    #[test]
    fn the_last_lines_oldest_first() {
        let r = read(b"one\ntwo\nthree\nfour\n", params(Some(2), None, None));
        assert_eq!(r.lines, ["three", "four"]);
        assert!(r.truncated);
        let r = read(b"one\ntwo\nlast without newline", params(None, None, None));
        assert_eq!(r.lines, ["one", "two", "last without newline"]);
        assert!(!r.truncated);
        let r = read(b"a\r\n\nb\n", params(None, None, None));
        assert_eq!(r.lines, ["a", "", "b"]);
        let r = read(b"", params(None, None, None));
        assert!(r.lines.is_empty() && !r.truncated);
        assert!(r.source.starts_with("file:/"));
    }

    #[test]
    fn lines_across_chunks_and_long_lines() {
        let mut text = Vec::new();
        for i in 0..20_000 {
            writeln!(text, "line {i} {}", "x".repeat(i % 50)).unwrap();
        }
        let r = read(&text, params(Some(3_000), None, Some("line 1")));
        let expected: Vec<String> = (0..20_000)
            .map(|i| format!("line {i} {}", "x".repeat(i % 50)))
            .filter(|l| l.contains("line 1"))
            .collect();
        assert_eq!(r.lines.len(), 3_000);
        assert!(
            r.lines == expected[expected.len() - 3_000..],
            "the last 3000 matching lines"
        );
        assert!(r.truncated);
        let long = format!("{}\nshort\n", "é".repeat(100_000));
        let r = read(long.as_bytes(), params(None, None, None));
        assert_eq!(r.lines.len(), 2);
        assert!(r.lines[0].len() <= MAX_LOG_LINE_BYTES && r.lines[0].starts_with("éé"));
        assert_eq!(r.lines[1], "short");
    }

    #[test]
    fn since_keeps_newer_lines_and_their_continuations() {
        let text = b"orphan before any time\n\
            2026-11-27T10:00:00Z old\n  old detail\n\
            2026-11-27T11:00:00Z new\n  new detail\n\
            2026-11-27T12:00:00Z newest\n";
        let since = line_time("2026-11-27T10:30:00Z").unwrap();
        let r = read(text, params(None, Some(since), None));
        assert_eq!(
            r.lines,
            [
                "2026-11-27T11:00:00Z new",
                "  new detail",
                "2026-11-27T12:00:00Z newest"
            ]
        );
        assert!(!r.truncated);
        let r = read(text, params(None, Some(0), None));
        assert_eq!(r.lines.len(), 5, "the orphan line has no time: left out");
    }

    #[test]
    fn output_and_scan_are_bounded() {
        let line = "y".repeat(MAX_LOG_LINE_BYTES);
        let text = format!("{line}\n").repeat(400);
        let r = read(text.as_bytes(), params(Some(10_000), None, None));
        assert!(r.truncated);
        assert!(r.lines.len() * MAX_LOG_LINE_BYTES <= MAX_LOG_BYTES);
        let (_d, path, policy) = scratch(text.as_bytes());
        let p = params(Some(10_000), None, Some("nothing matches"));
        let r = read_file(&policy, &path, Collector::new(&p).unwrap(), CHUNK as u64).unwrap();
        assert!(r.truncated, "stopped at the scan limit");
    }

    #[test]
    fn bad_params_and_paths_outside_the_roots_are_refused() {
        assert!(Collector::new(&params(Some(0), None, None)).is_err());
        assert!(Collector::new(&params(Some(MAX_LOG_LINES + 1), None, None)).is_err());
        let (_d, _path, policy) = scratch(b"x\n");
        let c = Collector::new(&params(None, None, None)).unwrap();
        let e = read_file(&policy, "/etc/passwd", c, 1 << 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied, "{e}");
        for bad in ["", "-x", "a b", "a;b", "x/../y", &"u".repeat(257)] {
            assert!(check_unit(bad).is_err(), "{bad}");
        }
        check_unit("nginx.service").unwrap();
        check_unit("getty@tty1.service").unwrap();
        check_unit("systemd-fsck@dev-disk-by\\x2duuid.service").unwrap();
    }

    #[test]
    fn journal_arguments_never_take_an_option_from_the_host() {
        assert_eq!(
            journal_args("a.service", Some(5)),
            [
                "--no-pager",
                "--quiet",
                "--reverse",
                "--output=short-iso",
                "--unit",
                "a.service",
                "--since=@5"
            ]
        );
    }

    #[tokio::test]
    async fn exactly_one_source() {
        let policy = Arc::new(PathPolicy::new(&[]));
        let e = read_log(policy.clone(), params(None, None, None), 1 << 20)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidParams);
        let mut p = params(None, None, None);
        p.path = Some("/tmp/x".into());
        p.unit = Some("x.service".into());
        let e = read_log(policy, p, 1 << 20).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidParams);
    }

    #[tokio::test]
    async fn the_journal_reader_stops_once_it_has_enough() {
        // `seq` stands in for journalctl: the reader stops it early.
        let seq = crate::policy::lookup_safe_path("seq").expect("seq in the fixed PATH");
        let mut seen = 0;
        let out = crate::exec::read_helper_lines(
            &seq,
            &["1", "100000000"],
            Duration::from_secs(20),
            1 << 30,
            |l| {
                seen += 1;
                l != b"5"
            },
        )
        .await
        .unwrap();
        assert!(out.stopped && out.status.is_none());
        assert_eq!(seen, 5);
        let out =
            crate::exec::read_helper_lines(&seq, &["3"], Duration::from_secs(20), 1 << 30, |_| {
                true
            })
            .await
            .unwrap();
        assert!(!out.stopped && out.status.unwrap().success());
        let out = crate::exec::read_helper_lines(
            &seq,
            &["1", "1000000"],
            Duration::from_secs(20),
            100,
            |_| true,
        )
        .await
        .unwrap();
        assert!(out.stopped, "stopped at the byte limit");
    }
}
