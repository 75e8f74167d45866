//! Logging setup: `tracing` to stderr and, if configured, to `log_file`.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogLevel;

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The log file could not be opened for appending.
    #[error("could not open log file {path}")]
    Open {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Installs the global subscriber at `level`.
pub fn init(level: LogLevel, log_file: Option<&Path>) -> Result<(), LoggingError> {
    // A plain level, not an EnvFilter: its regex engine would add most of a
    // megabyte to the static guest binary.
    let max = match level {
        LogLevel::Error => tracing::Level::ERROR,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Trace => tracing::Level::TRACE,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(max)
        .with_target(false);
    match log_file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| LoggingError::Open {
                    path: path.display().to_string(),
                    source,
                })?;
            let writer = Held::new(std::io::stderr).and(Held::new(Mutex::new(file)));
            builder.with_ansi(false).with_writer(writer).init();
        }
        // No colour, even at a terminal: journald (or a console) would store
        // the escape codes, under TCG a serial console pays for every byte,
        // and tracing-subscriber's `ansi` feature costs the binary about
        // 8 KB of the size budget (PERFORMANCE.md).
        None => builder
            .with_ansi(false)
            .with_writer(Held::new(std::io::stderr))
            .init(),
    }
    Ok(())
}

/// The audit file (`audit_file`), once opened: written through the same
/// hold as the log, so nothing is written to a frozen filesystem.
static AUDIT: std::sync::OnceLock<Held<Mutex<std::fs::File>>> = std::sync::OnceLock::new();

/// Opens `path` (created mode 0600, appended to) as the audit file.
pub fn open_audit(path: &Path) -> Result<(), LoggingError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| LoggingError::Open {
            path: path.display().to_string(),
            source,
        })?;
    // Set once, at start; a second call keeps the first file.
    let _ = AUDIT.set(Held::new(Mutex::new(file)));
    Ok(())
}

/// Appends one line (without its newline) to the audit file, if there is
/// one. A failed write is logged, never fatal.
pub fn write_audit(line: &str) {
    use std::io::Write;
    let Some(audit) = AUDIT.get() else { return };
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    if let Err(e) = audit.make_writer().write_all(&buf) {
        tracing::warn!(error = %e, "could not write the audit file");
    }
}

/// Most bytes of log lines kept per output while held; later lines are
/// dropped (and counted in a line written at release).
pub const HELD_LOG_LIMIT: usize = 256 * 1024;

/// True while log output is held (filesystems frozen).
static HOLD: AtomicBool = AtomicBool::new(false);
/// Writers check [`HOLD`] and write under its read side; [`hold`] flips it
/// under the write side, so no write that saw "not held" is still on its
/// way once `hold(true)` returns.
static GATE: RwLock<()> = RwLock::new(());

/// Holds (`true`) or releases (`false`) the log output. While held (the
/// guest's filesystems are frozen: the log file, and journald behind
/// stderr, could block the agent) lines wait in memory, up to
/// [`HELD_LOG_LIMIT`] bytes per output; they are written before the next
/// line after the release.
pub fn hold(on: bool) {
    let _g = GATE.write().unwrap_or_else(|e| e.into_inner());
    HOLD.store(on, Ordering::SeqCst);
}

/// Lines kept while held, and how many bytes were dropped.
#[derive(Default)]
struct Backlog {
    kept: Vec<u8>,
    dropped: usize,
}

/// An output whose writes wait in memory while the log is held.
struct Held<M> {
    inner: M,
    backlog: Mutex<Backlog>,
}

impl<M> Held<M> {
    fn new(inner: M) -> Held<M> {
        Held {
            inner,
            backlog: Mutex::new(Backlog::default()),
        }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Held<M> {
    type Writer = HeldWriter<'a, M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        HeldWriter {
            inner: self.inner.make_writer(),
            backlog: &self.backlog,
        }
    }
}

/// One event's writer of a [`Held`] output.
struct HeldWriter<'a, W> {
    inner: W,
    backlog: &'a Mutex<Backlog>,
}

impl<W: std::io::Write> std::io::Write for HeldWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _g = GATE.read().unwrap_or_else(|e| e.into_inner());
        let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        if HOLD.load(Ordering::SeqCst) {
            if backlog.kept.len() + buf.len() <= HELD_LOG_LIMIT {
                backlog.kept.extend_from_slice(buf);
            } else {
                backlog.dropped += buf.len();
            }
            return Ok(buf.len());
        }
        if !backlog.kept.is_empty() || backlog.dropped > 0 {
            let kept = std::mem::take(&mut backlog.kept);
            self.inner.write_all(&kept)?;
            if backlog.dropped > 0 {
                let note = format!(
                    "(kvmmanager-agent: {} bytes of log lines dropped while filesystems were frozen)\n",
                    backlog.dropped
                );
                backlog.dropped = 0;
                self.inner.write_all(note.as_bytes())?;
            }
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn held_lines_wait_and_come_out_in_order_after_release() {
        let sink = Sink::default();
        let out = Held::new({
            let s = sink.clone();
            move || s.clone()
        });
        out.make_writer().write_all(b"one\n").unwrap();
        hold(true);
        out.make_writer().write_all(b"two\n").unwrap();
        assert_eq!(
            &*sink.0.lock().unwrap(),
            b"one\n",
            "nothing written while held"
        );
        out.make_writer()
            .write_all(&vec![b'x'; HELD_LOG_LIMIT])
            .unwrap();
        hold(false);
        out.make_writer().write_all(b"three\n").unwrap();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("one\ntwo\n(kvmmanager-agent: "), "{text}");
        assert!(text.ends_with("dropped while filesystems were frozen)\nthree\n"));
    }
}
