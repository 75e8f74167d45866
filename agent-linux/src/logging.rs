//! Logging setup: `tracing` to stderr and, if configured, to `log_file`.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::EnvFilter;

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

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`.
pub fn init(level: LogLevel, log_file: Option<&Path>) -> Result<(), LoggingError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level.as_str()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}
