//! TEMPORARY STUB (replaced by the helper's version at merge).
use std::path::{Path, PathBuf};
use std::time::Duration;
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kvmmanager-agent/config.json";
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}
impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub log_level: LogLevel,
    pub log_file: Option<PathBuf>,
    pub channel_name: String,
    pub max_message_size: usize,
    pub connection_retry: Duration,
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    pub security: SecurityConfig,
}
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityConfig {
    pub allowed_read_paths: Vec<PathBuf>,
    pub allowed_write_paths: Vec<PathBuf>,
    pub command_whitelist: Option<Vec<String>>,
    pub max_file_size: u64,
    pub max_command_timeout: Duration,
}
impl Default for Config {
    fn default() -> Self {
        Config {
            log_level: LogLevel::Info,
            log_file: None,
            channel_name: "org.kvmmanager.agent.0".into(),
            max_message_size: 65536,
            connection_retry: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 10,
            security: SecurityConfig {
                allowed_read_paths: vec!["/tmp".into()],
                allowed_write_paths: vec!["/tmp/kvmmanager".into()],
                command_whitelist: None,
                max_file_size: 10 << 20,
                max_command_timeout: Duration::from_secs(300),
            },
        }
    }
}
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("bad {0}")]
    Bad(String),
}
impl Config {
    pub fn from_json(text: &str) -> Result<Config, ConfigError> {
        let _ = text;
        Ok(Config::default())
    }
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Bad(e.to_string()))
            .and_then(|t| Config::from_json(&t))
    }
    pub fn limits(&self) -> agent_common::methods::Limits {
        agent_common::methods::Limits {
            max_message_size: self.max_message_size as u64,
            max_response_size: agent_common::MAX_RESPONSE_SIZE as u64,
            max_read_chunk: agent_common::MAX_READ_CHUNK,
            max_file_size: self.security.max_file_size,
            max_exec_output: agent_common::MAX_EXEC_OUTPUT,
            max_command_timeout_seconds: self.security.max_command_timeout.as_secs(),
            request_timeout_seconds: self.request_timeout.as_secs(),
            max_concurrent_requests: self.max_concurrent_requests as u32,
        }
    }
}
