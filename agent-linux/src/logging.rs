//! Logging setup: `tracing` to stderr and, if configured, to `log_file`.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::fmt::writer::MakeWriterExt;

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
            let writer = std::io::stderr.and(Mutex::new(file));
            builder.with_ansi(false).with_writer(writer).init();
        }
        // Colour only for a person at a terminal: journald (or a console)
        // would store the escape codes, and under TCG a serial console
        // pays for every byte.
        None => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}
