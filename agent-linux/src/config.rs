//! The agent's configuration file.
//!
//! The file is JSON. It is parsed into a raw struct whose fields are all
//! optional and which rejects unknown keys (also inside `security`), then
//! validated into [`Config`] with defaults filled in. A missing key (or
//! `null`) takes its default. An unknown key or a bad value is refused with
//! the key's dotted name (`security.max_file_size_mb`) and the reason; the
//! agent does not start with an invalid config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_common::methods::Method;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::policy::{normalize_path, PathSyntaxError};

/// Where the agent looks for its config unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kvmmanager-agent/config.json";

/// Default of `fsfreeze_hook_dir`.
pub const DEFAULT_FSFREEZE_HOOK_DIR: &str = "/etc/kvmmanager-agent/fsfreeze-hook.d";

/// Methods the protocol needs to work at all: never disabled by
/// `security.allowed_methods` or `security.blocked_methods`.
pub const ALWAYS_ENABLED: &[Method] = &[Method::Ping, Method::Sync, Method::GetAgentInfo];

/// How much the agent logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Only failures of what the host asked for.
    Error,
    /// Also abnormal but handled situations.
    Warn,
    /// Also rare state changes (host connected, config loaded).
    Info,
    /// Developer detail.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The lower-case name used in the config and by `tracing` filters.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    /// The level named `name` (lower case), if any.
    pub fn from_name(name: &str) -> Option<LogLevel> {
        [
            LogLevel::Error,
            LogLevel::Warn,
            LogLevel::Info,
            LogLevel::Debug,
            LogLevel::Trace,
        ]
        .into_iter()
        .find(|l| l.as_str() == name)
    }
}

/// A guest address `forward_open` may connect to
/// (`security.allowed_forwards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardRule {
    /// The address.
    pub ip: std::net::IpAddr,
    /// The port; `None`: any.
    pub port: Option<u16>,
}

impl ForwardRule {
    /// `ADDRESS:PORT` or `ADDRESS:*`, IPv6 in brackets.
    pub fn parse(text: &str) -> Option<ForwardRule> {
        let (host, port) = text.rsplit_once(':')?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let ip: std::net::IpAddr = host.parse().ok()?;
        if ip.is_ipv6() && !text.starts_with('[') {
            return None;
        }
        let port = match port {
            "*" => None,
            p => Some(p.parse::<u16>().ok().filter(|p| *p > 0)?),
        };
        Some(ForwardRule { ip, port })
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Key `log_level`, default `info`.
    pub log_level: LogLevel,
    /// Key `log_file` (absolute), default none: log to stderr only.
    pub log_file: Option<PathBuf>,
    /// Key `audit_file` (absolute), default none: the audit lines go to
    /// the log only.
    pub audit_file: Option<PathBuf>,
    /// Key `channel_name`: the virtio-serial port name, default
    /// `org.kvmmanager.agent.0`.
    pub channel_name: String,
    /// Key `qemu_ga_channel_name`: the virtio-serial port on which the
    /// agent speaks the QEMU guest agent's protocol; default
    /// `org.qemu.guest_agent.0` (left to an installed, unmasked
    /// `qemu-guest-agent.service`: [`crate::qga`]), `null`: not served.
    pub qemu_ga_channel_name: Option<String>,
    /// Key `max_message_size_kb` (1..=16384, default 64), in bytes here.
    pub max_message_size: usize,
    /// Key `connection_retry_seconds` (1..=3600, default 5).
    pub connection_retry: Duration,
    /// Key `request_timeout_seconds` (1..=86400, default 30).
    pub request_timeout: Duration,
    /// Key `max_concurrent_requests` (1..=1024, default 10).
    pub max_concurrent_requests: usize,
    /// Key `freeze_timeout_seconds` (1..=86400, default 60): a freeze
    /// ends by itself after this long.
    pub freeze_timeout: Duration,
    /// Key `fsfreeze_hook_dir` (absolute, default
    /// `/etc/kvmmanager-agent/fsfreeze-hook.d`; `null`: no hooks).
    pub fsfreeze_hook_dir: Option<PathBuf>,
    /// Key `zero_copy_reads` (default true): `file_read` attachments go
    /// from the file to the port by `splice(2)` (PERFORMANCE.md); false
    /// reads them into a buffer first, for a kernel or file system where
    /// that misbehaves, and as the bench's comparison.
    pub zero_copy_reads: bool,
    /// Key `shell_command` (a bare name or an absolute path, default
    /// `/bin/sh`): what a terminal session (`exec_start` with `pty` and no
    /// `command`) runs; `security.command_whitelist` applies to it.
    pub shell_command: String,
    /// Key `security`.
    pub security: SecurityConfig,
}

/// The `security` section.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityConfig {
    /// Key `allowed_read_paths`: roots `file_read` may read under.
    pub allowed_read_paths: Vec<PathBuf>,
    /// Key `allowed_write_paths`: roots `file_write` may write under.
    pub allowed_write_paths: Vec<PathBuf>,
    /// Key `command_whitelist`: bare names or absolute paths; `None` allows any command.
    pub command_whitelist: Option<Vec<String>>,
    /// Key `max_file_size_mb` (1..=1048576, default 10), in bytes here.
    pub max_file_size: u64,
    /// Key `max_command_timeout_seconds` (1..=86400, default 300).
    pub max_command_timeout: Duration,
    /// Key `command_memory_max_mb` (1..=1048576, default `null`: no
    /// limit), in bytes here: `memory.max` of each command's cgroup.
    pub command_memory_max: Option<u64>,
    /// Key `command_max_processes` (1..=4194304, default `null`: no
    /// limit): `pids.max` of each command's cgroup.
    pub command_max_processes: Option<u64>,
    /// Key `allowed_methods`: the methods served; `None` (default): all.
    /// `ping`, `sync` and `get_agent_info` are served whatever it says.
    pub allowed_methods: Option<Vec<Method>>,
    /// Key `allowed_forwards` (default empty: no forwarding): the guest
    /// addresses `forward_open` may connect to.
    pub allowed_forwards: Vec<ForwardRule>,
    /// Key `blocked_methods` (default empty): methods refused, even if
    /// allowed.
    pub blocked_methods: Vec<Method>,
    /// The qemu-ga command names (`guest-*`) of `allowed_methods`: when
    /// any is listed, the qemu-ga dialect serves only those listed (each
    /// still needs its native method served). `None`: none listed.
    pub qga_allowed: Option<Vec<String>>,
    /// The qemu-ga command names of `blocked_methods`: refused in the
    /// qemu-ga dialect (their native methods are not affected).
    pub qga_blocked: Vec<String>,
}

impl Default for SecurityConfig {
    fn default() -> SecurityConfig {
        SecurityConfig {
            allowed_read_paths: ["/tmp", "/var/log", "/etc/hostname", "/etc/os-release"]
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            allowed_write_paths: vec![PathBuf::from("/tmp/kvmmanager")],
            command_whitelist: None,
            max_file_size: 10 * 1024 * 1024,
            max_command_timeout: Duration::from_secs(300),
            command_memory_max: None,
            command_max_processes: None,
            allowed_methods: None,
            blocked_methods: Vec::new(),
            qga_allowed: None,
            qga_blocked: Vec::new(),
            allowed_forwards: Vec::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            log_level: LogLevel::Info,
            log_file: None,
            audit_file: None,
            channel_name: agent_common::DEFAULT_CHANNEL_NAME.to_owned(),
            qemu_ga_channel_name: Some(crate::qga::QEMU_GA_PORT.to_owned()),
            max_message_size: 64 * 1024,
            connection_retry: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 10,
            freeze_timeout: Duration::from_secs(60),
            fsfreeze_hook_dir: Some(PathBuf::from(DEFAULT_FSFREEZE_HOOK_DIR)),
            zero_copy_reads: true,
            shell_command: "/bin/sh".to_owned(),
            security: SecurityConfig::default(),
        }
    }
}

/// Why a config was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// The error is in this file.
    #[error("config file {path}: {error}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        error: Box<ConfigError>,
    },
    /// The text is not valid JSON.
    #[error("config is not valid JSON at line {line} column {column}: {message}")]
    Syntax {
        /// Line of the error (1-based).
        line: usize,
        /// Column of the error (1-based).
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The top level is not a JSON object.
    #[error("config must be a JSON object")]
    NotAnObject,
    /// A key the agent does not know (dotted for nested keys).
    #[error("unknown config key {key:?}")]
    UnknownKey {
        /// The key, e.g. `security.max_file_size`.
        key: String,
    },
    /// A key has an invalid value.
    #[error("invalid value for config key {key}: {reason}")]
    InvalidValue {
        /// The dotted key.
        key: &'static str,
        /// Why the value is refused.
        reason: String,
    },
}

/// The file as written: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    log_level: Option<String>,
    log_file: Option<String>,
    audit_file: Option<String>,
    channel_name: Option<String>,
    /// Absent: the default port; `null`: off.
    #[serde(default, deserialize_with = "present")]
    qemu_ga_channel_name: Option<Option<String>>,
    max_message_size_kb: Option<u64>,
    connection_retry_seconds: Option<u64>,
    request_timeout_seconds: Option<u64>,
    max_concurrent_requests: Option<u64>,
    freeze_timeout_seconds: Option<u64>,
    fsfreeze_hook_dir: Option<String>,
    zero_copy_reads: Option<bool>,
    shell_command: Option<String>,
    security: Option<RawSecurity>,
}

/// The `security` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecurity {
    allowed_read_paths: Option<Vec<String>>,
    allowed_write_paths: Option<Vec<String>>,
    command_whitelist: Option<Vec<String>>,
    max_file_size_mb: Option<u64>,
    max_command_timeout_seconds: Option<u64>,
    command_memory_max_mb: Option<u64>,
    command_max_processes: Option<u64>,
    allowed_methods: Option<Vec<String>>,
    blocked_methods: Option<Vec<String>>,
    allowed_forwards: Option<Vec<String>>,
}

const TOP_KEYS: &[&str] = &[
    "log_level",
    "log_file",
    "audit_file",
    "channel_name",
    "qemu_ga_channel_name",
    "max_message_size_kb",
    "connection_retry_seconds",
    "request_timeout_seconds",
    "max_concurrent_requests",
    "freeze_timeout_seconds",
    "fsfreeze_hook_dir",
    "zero_copy_reads",
    "shell_command",
    "security",
];

const SECURITY_KEYS: &[&str] = &[
    "security.allowed_read_paths",
    "security.allowed_write_paths",
    "security.command_whitelist",
    "security.max_file_size_mb",
    "security.max_command_timeout_seconds",
    "security.command_memory_max_mb",
    "security.command_max_processes",
    "security.allowed_methods",
    "security.blocked_methods",
    "security.allowed_forwards",
];

/// Finds the key (of `known`, dotted with `prefix`) that makes `object` fail
/// to deserialize as `T`, by deserializing one key at a time.
fn diagnose<T: serde::de::DeserializeOwned>(
    object: &Map<String, Value>,
    prefix: &str,
    known: &'static [&'static str],
) -> Option<ConfigError> {
    for (key, value) in object {
        let dotted = format!("{prefix}{key}");
        let Some(static_key) = known.iter().copied().find(|k| *k == dotted) else {
            return Some(ConfigError::UnknownKey { key: dotted });
        };
        if static_key == "security" {
            // Diagnosed separately, with dotted keys.
            continue;
        }
        let mut single = Map::new();
        single.insert(key.clone(), value.clone());
        if let Err(e) = serde_json::from_value::<T>(Value::Object(single)) {
            return Some(ConfigError::InvalidValue {
                key: static_key,
                reason: e.to_string(),
            });
        }
    }
    None
}

/// A key that is present (with `null` or a value), for keys whose absence
/// and `null` mean different things.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

fn parse_raw(text: &str) -> Result<RawConfig, ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Syntax {
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    let Value::Object(top) = &value else {
        return Err(ConfigError::NotAnObject);
    };
    if let Some(e) = diagnose::<RawConfig>(top, "", TOP_KEYS) {
        return Err(e);
    }
    match top.get("security") {
        None | Some(Value::Null) => {}
        Some(Value::Object(sec)) => {
            if let Some(e) = diagnose::<RawSecurity>(sec, "security.", SECURITY_KEYS) {
                return Err(e);
            }
        }
        Some(_) => {
            return Err(ConfigError::InvalidValue {
                key: "security",
                reason: "must be an object".into(),
            })
        }
    }
    // Every key was checked above; this only fails on something diagnose
    // cannot attribute to one key.
    serde_json::from_value(value).map_err(|e| ConfigError::Syntax {
        line: 0,
        column: 0,
        message: e.to_string(),
    })
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::InvalidValue {
        key,
        reason: reason.into(),
    }
}

fn ranged(
    key: &'static str,
    value: Option<u64>,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    let v = value.unwrap_or(default);
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(invalid(
            key,
            format!("{v} is out of range {}..={}", range.start(), range.end()),
        ))
    }
}

/// Like [`ranged`] for a key whose default is "no limit" (`None`).
fn ranged_opt(
    key: &'static str,
    value: Option<u64>,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, ConfigError> {
    value
        .map(|v| ranged(key, Some(v), *range.start(), range))
        .transpose()
}

fn path_reason(e: PathSyntaxError) -> &'static str {
    match e {
        PathSyntaxError::Empty => "a path is empty",
        PathSyntaxError::Nul => "a path contains a NUL byte",
        PathSyntaxError::NotAbsolute => "paths must be absolute",
        PathSyntaxError::DotDot => "paths must not contain '..' components",
    }
}

/// qemu-ga commands the dialect needs to work at all (libvirt syncs and
/// pings before anything else): never disabled by a `guest-*` name.
pub const QGA_ALWAYS_ENABLED: &[&str] = &[
    "guest-sync",
    "guest-sync-delimited",
    "guest-ping",
    "guest-info",
];

/// Method names of `key`, each known: native methods, and qemu-ga command
/// names (`guest-*`) apart; `ping`, `sync` and `get_agent_info` (and
/// [`QGA_ALWAYS_ENABLED`]) may not be blocked.
fn method_list(
    key: &'static str,
    list: Vec<String>,
) -> Result<(Vec<Method>, Vec<String>), ConfigError> {
    let mut out = Vec::with_capacity(list.len());
    let mut qga: Vec<String> = Vec::new();
    for name in list {
        if name.starts_with("guest-") {
            if !crate::qga::command_names().any(|c| c == name) {
                return Err(invalid(
                    key,
                    format!("{name:?} is not a qemu-ga command of this agent (see guest-info)"),
                ));
            }
            if key == "security.blocked_methods" && QGA_ALWAYS_ENABLED.contains(&name.as_str()) {
                return Err(invalid(
                    key,
                    format!(
                        "{name} cannot be blocked: qemu-ga's clients need guest-sync, guest-sync-delimited, guest-ping and guest-info"
                    ),
                ));
            }
            if !qga.contains(&name) {
                qga.push(name);
            }
            continue;
        }
        let Some(m) = Method::from_name(&name) else {
            return Err(invalid(
                key,
                format!("{name:?} is not a method of this agent (see get_agent_info)"),
            ));
        };
        if key == "security.blocked_methods" && ALWAYS_ENABLED.contains(&m) {
            return Err(invalid(
                key,
                format!(
                    "{name} cannot be blocked: the protocol needs ping, sync and get_agent_info"
                ),
            ));
        }
        if !out.contains(&m) {
            out.push(m);
        }
    }
    Ok((out, qga))
}

fn path_list(
    key: &'static str,
    value: Option<Vec<String>>,
    default: &[PathBuf],
) -> Result<Vec<PathBuf>, ConfigError> {
    let Some(list) = value else {
        return Ok(default.to_vec());
    };
    let mut out: Vec<PathBuf> = Vec::with_capacity(list.len());
    for entry in &list {
        let norm = normalize_path(entry)
            .map_err(|e| invalid(key, format!("{entry:?}: {}", path_reason(e))))?;
        let norm = PathBuf::from(norm);
        if !out.contains(&norm) {
            out.push(norm);
        }
    }
    Ok(out)
}

impl Config {
    /// Parses and validates the config text.
    pub fn from_json(text: &str) -> Result<Config, ConfigError> {
        Config::validate(parse_raw(text)?)
    }

    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Config::from_json(&text).map_err(|e| ConfigError::InFile {
            path: path.to_owned(),
            error: Box::new(e),
        })
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let d = Config::default();
        let log_level = match raw.log_level {
            None => d.log_level,
            Some(name) => LogLevel::from_name(&name).ok_or_else(|| {
                invalid(
                    "log_level",
                    format!("{name:?} is not one of error, warn, info, debug, trace"),
                )
            })?,
        };
        // A file the agent appends to: absolute, normalised, not `/`.
        let file_key = |key: &'static str, raw: Option<String>| match raw {
            None => Ok(None),
            Some(p) => {
                let path = PathBuf::from(
                    normalize_path(&p)
                        .map_err(|e| invalid(key, format!("{p:?}: {}", path_reason(e))))?,
                );
                if path == Path::new("/") {
                    return Err(invalid(key, "must name a file, not /"));
                }
                Ok(Some(path))
            }
        };
        let shell_command = match raw.shell_command {
            None => d.shell_command.clone(),
            Some(c)
                if c.is_empty() || c.contains('\0') || (c.contains('/') && !c.starts_with('/')) =>
            {
                return Err(invalid(
                    "shell_command",
                    format!("{c:?} must be a bare program name or an absolute path"),
                ))
            }
            Some(c) => c,
        };
        let log_file = file_key("log_file", raw.log_file)?;
        let audit_file = file_key("audit_file", raw.audit_file)?;
        let port_name = |key: &'static str, name: String| {
            if name.is_empty() || name.contains(['/', '\0']) || name == "." || name == ".." {
                Err(invalid(
                    key,
                    format!("{name:?} must be a non-empty port name without '/'"),
                ))
            } else {
                Ok(name)
            }
        };
        let channel_name = port_name("channel_name", raw.channel_name.unwrap_or(d.channel_name))?;
        let qemu_ga_channel_name = match raw.qemu_ga_channel_name {
            // The default port, unless the agent's own port has its name.
            None => d.qemu_ga_channel_name.filter(|n| *n != channel_name),
            Some(n) => n
                .map(|n| port_name("qemu_ga_channel_name", n))
                .transpose()?,
        };
        if qemu_ga_channel_name.as_ref() == Some(&channel_name) {
            return Err(invalid(
                "qemu_ga_channel_name",
                format!("{channel_name:?} is channel_name already; one port speaks one protocol"),
            ));
        }
        let max_message_size_kb = ranged(
            "max_message_size_kb",
            raw.max_message_size_kb,
            64,
            1..=16384,
        )?;
        let connection_retry = ranged(
            "connection_retry_seconds",
            raw.connection_retry_seconds,
            5,
            1..=3600,
        )?;
        let request_timeout = ranged(
            "request_timeout_seconds",
            raw.request_timeout_seconds,
            30,
            1..=86400,
        )?;
        let max_concurrent_requests = ranged(
            "max_concurrent_requests",
            raw.max_concurrent_requests,
            10,
            1..=1024,
        )?;

        let freeze_timeout = ranged(
            "freeze_timeout_seconds",
            raw.freeze_timeout_seconds,
            60,
            1..=86400,
        )?;
        // Absent takes the default directory; `null` is absent too, so an
        // empty string is how hooks are turned off.
        let fsfreeze_hook_dir = match raw.fsfreeze_hook_dir {
            None => d.fsfreeze_hook_dir,
            Some(p) if p.is_empty() => None,
            Some(p) => Some(PathBuf::from(normalize_path(&p).map_err(|e| {
                invalid("fsfreeze_hook_dir", format!("{p:?}: {}", path_reason(e)))
            })?)),
        };

        let s = raw.security.unwrap_or_default();
        let ds = d.security;
        let allowed_read_paths = path_list(
            "security.allowed_read_paths",
            s.allowed_read_paths,
            &ds.allowed_read_paths,
        )?;
        let allowed_write_paths = path_list(
            "security.allowed_write_paths",
            s.allowed_write_paths,
            &ds.allowed_write_paths,
        )?;
        let command_whitelist = match s.command_whitelist {
            None => None,
            Some(list) => {
                let key = "security.command_whitelist";
                let mut out: Vec<String> = Vec::with_capacity(list.len());
                for entry in list {
                    let entry = if entry.starts_with('/') {
                        normalize_path(&entry)
                            .map_err(|e| invalid(key, format!("{entry:?}: {}", path_reason(e))))?
                    } else if entry.is_empty() {
                        return Err(invalid(key, "an entry is empty"));
                    } else if entry.contains('/') {
                        return Err(invalid(
                            key,
                            format!("{entry:?} must be a bare name or an absolute path"),
                        ));
                    } else if entry.contains('\0') || entry == "." || entry == ".." {
                        return Err(invalid(key, format!("{entry:?} is not a program name")));
                    } else {
                        entry
                    };
                    if !out.contains(&entry) {
                        out.push(entry);
                    }
                }
                Some(out)
            }
        };
        let max_file_size_mb = ranged(
            "security.max_file_size_mb",
            s.max_file_size_mb,
            10,
            1..=1_048_576,
        )?;
        let max_command_timeout = ranged(
            "security.max_command_timeout_seconds",
            s.max_command_timeout_seconds,
            300,
            1..=86400,
        )?;
        let command_memory_max_mb = ranged_opt(
            "security.command_memory_max_mb",
            s.command_memory_max_mb,
            1..=1_048_576,
        )?;
        // pid_max can be at most 2^22 (PID_MAX_LIMIT).
        let command_max_processes = ranged_opt(
            "security.command_max_processes",
            s.command_max_processes,
            1..=4_194_304,
        )?;

        let (allowed_methods, qga_allowed) = match s.allowed_methods {
            None => (None, None),
            Some(l) => {
                let (native, qga) = method_list("security.allowed_methods", l)?;
                (Some(native), (!qga.is_empty()).then_some(qga))
            }
        };
        let (blocked_methods, qga_blocked) = method_list(
            "security.blocked_methods",
            s.blocked_methods.unwrap_or_default(),
        )?;

        let allowed_forwards = s
            .allowed_forwards
            .unwrap_or_default()
            .iter()
            .map(|r| {
                ForwardRule::parse(r).ok_or_else(|| {
                    invalid(
                        "security.allowed_forwards",
                        format!(
                            "{r:?} is not ADDRESS:PORT or ADDRESS:* (an IP address; IPv6 in brackets)"
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Config {
            log_level,
            log_file,
            audit_file,
            channel_name,
            qemu_ga_channel_name,
            // At most 16384 KiB: fits any usize.
            max_message_size: (max_message_size_kb * 1024) as usize,
            connection_retry: Duration::from_secs(connection_retry),
            request_timeout: Duration::from_secs(request_timeout),
            // At most 1024.
            max_concurrent_requests: max_concurrent_requests as usize,
            freeze_timeout: Duration::from_secs(freeze_timeout),
            fsfreeze_hook_dir,
            zero_copy_reads: raw.zero_copy_reads.unwrap_or(true),
            shell_command,
            security: SecurityConfig {
                allowed_read_paths,
                allowed_write_paths,
                command_whitelist,
                max_file_size: max_file_size_mb * 1024 * 1024,
                max_command_timeout: Duration::from_secs(max_command_timeout),
                command_memory_max: command_memory_max_mb.map(|mb| mb * 1024 * 1024),
                command_max_processes,
                allowed_methods,
                blocked_methods,
                qga_allowed,
                qga_blocked,
                allowed_forwards,
            },
        })
    }

    /// True if the policy serves qemu-ga command `name` by its own name
    /// (`guest-*` names in `security.allowed_methods` and
    /// `security.blocked_methods`); its native method is checked apart.
    pub fn qga_command_enabled(&self, name: &str) -> bool {
        if QGA_ALWAYS_ENABLED.contains(&name) {
            return true;
        }
        let s = &self.security;
        !s.qga_blocked.iter().any(|n| n == name)
            && s.qga_allowed
                .as_ref()
                .map_or(true, |list| list.iter().any(|n| n == name))
    }

    /// True if `security.allowed_forwards` lets `forward_open` connect to
    /// `addr`.
    pub fn forward_allowed(&self, addr: std::net::SocketAddr) -> bool {
        self.security
            .allowed_forwards
            .iter()
            .any(|r| r.ip == addr.ip() && r.port.map_or(true, |p| p == addr.port()))
    }

    /// True if the policy serves `method` (`security.allowed_methods`,
    /// `security.blocked_methods`; a blocked name wins).
    pub fn method_enabled(&self, method: Method) -> bool {
        if ALWAYS_ENABLED.contains(&method) {
            return true;
        }
        let s = &self.security;
        !s.blocked_methods.contains(&method)
            && s.allowed_methods
                .as_ref()
                .map_or(true, |list| list.contains(&method))
    }

    /// The per-command cgroup limits this config asks for.
    pub fn command_limits(&self) -> crate::cgroup::CommandLimits {
        crate::cgroup::CommandLimits {
            memory_max: self.security.command_memory_max,
            pids_max: self.security.command_max_processes,
        }
    }

    /// The limits in force, as reported by `get_agent_info`. The command
    /// containment and per-command limits are those set up at start
    /// ([`crate::cgroup::init`]); without that, the process group alone.
    pub fn limits(&self) -> agent_common::methods::Limits {
        let containment = crate::cgroup::current();
        let in_force = containment.map(|c| c.limits()).unwrap_or_default();
        agent_common::methods::Limits {
            max_message_size: self.max_message_size as u64,
            max_response_size: agent_common::MAX_RESPONSE_SIZE as u64,
            max_read_chunk: agent_common::MAX_READ_CHUNK,
            max_file_size: self.security.max_file_size,
            max_exec_output: agent_common::MAX_EXEC_OUTPUT,
            max_command_timeout_seconds: self.security.max_command_timeout.as_secs(),
            request_timeout_seconds: self.request_timeout.as_secs(),
            // At most 1024 (validated).
            max_concurrent_requests: self.max_concurrent_requests.min(u32::MAX as usize) as u32,
            max_attachment_size: agent_common::MAX_ATTACHMENT_SIZE,
            command_containment: Some(containment.map_or("process_group", |c| c.name()).to_owned()),
            command_memory_max: in_force.memory_max,
            command_max_processes: in_force.pids_max,
            freeze_timeout_seconds: Some(self.freeze_timeout.as_secs()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_gives_the_defaults() {
        let c = Config::from_json("{}").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.log_file, None);
        assert_eq!(c.channel_name, "org.kvmmanager.agent.0");
        assert_eq!(c.max_message_size, 65536);
        assert_eq!(c.connection_retry, Duration::from_secs(5));
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.max_concurrent_requests, 10);
        assert_eq!(
            c.security.allowed_read_paths,
            ["/tmp", "/var/log", "/etc/hostname", "/etc/os-release"]
                .map(PathBuf::from)
                .to_vec()
        );
        assert_eq!(
            c.security.allowed_write_paths,
            vec![PathBuf::from("/tmp/kvmmanager")]
        );
        assert_eq!(c.security.command_whitelist, None);
        assert_eq!(c.security.max_file_size, 10 * 1024 * 1024);
        assert_eq!(c.security.max_command_timeout, Duration::from_secs(300));
        assert_eq!(c.security.command_memory_max, None);
        assert_eq!(c.security.command_max_processes, None);
        assert_eq!(c.freeze_timeout, Duration::from_secs(60));
        assert_eq!(
            c.fsfreeze_hook_dir,
            Some(PathBuf::from("/etc/kvmmanager-agent/fsfreeze-hook.d"))
        );
        assert_eq!(c.security.allowed_methods, None);
        assert!(c.security.blocked_methods.is_empty());
        assert!(Method::ALL.iter().all(|m| c.method_enabled(*m)));
        assert_eq!(Config::from_json(r#"{"security":{}}"#).unwrap(), c);
        assert_eq!(
            Config::from_json(
                r#"{"security":{"command_memory_max_mb":null,"command_max_processes":null}}"#
            )
            .unwrap(),
            c
        );
        assert_eq!(
            Config::from_json(r#"{"security":null,"log_file":null}"#).unwrap(),
            c
        );
    }

    #[test]
    fn the_packaged_config_is_the_default() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/config.json");
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(Config::from_json(&text).unwrap(), Config::default());
        let v: Value = serde_json::from_str(&text).unwrap();
        let mut keys: Vec<&str> = v["security"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut listed: Vec<&str> = SECURITY_KEYS
            .iter()
            .map(|k| k.trim_start_matches("security."))
            .collect();
        keys.sort_unstable();
        listed.sort_unstable();
        assert_eq!(keys, listed, "every security key is spelled out");
    }

    #[test]
    fn qemu_ga_port_is_served_by_default_and_null_turns_it_off() {
        let port = |text: &str| Config::from_json(text).unwrap().qemu_ga_channel_name;
        assert_eq!(port("{}").as_deref(), Some("org.qemu.guest_agent.0"));
        assert_eq!(port(r#"{"qemu_ga_channel_name": null}"#), None);
        assert_eq!(
            port(r#"{"qemu_ga_channel_name": "org.example.qga"}"#).as_deref(),
            Some("org.example.qga")
        );
        // The agent's own port named as qemu-ga's: the default steps aside,
        // a named clash is refused (in the table of refusals).
        assert_eq!(port(r#"{"channel_name": "org.qemu.guest_agent.0"}"#), None);
    }

    #[test]
    fn qemu_ga_command_names_narrow_the_dialect_only() {
        let c = Config::from_json(
            r#"{"security": {"allowed_methods": ["exec_command", "guest-exec", "guest-exec-status"],
                             "blocked_methods": ["guest-file-open", "get_users"]}}"#,
        )
        .unwrap();
        assert_eq!(c.security.allowed_methods, Some(vec![Method::ExecCommand]));
        assert_eq!(c.security.blocked_methods, vec![Method::GetUsers]);
        assert!(c.qga_command_enabled("guest-exec"));
        assert!(c.qga_command_enabled("guest-ping"), "always served");
        assert!(!c.qga_command_enabled("guest-get-osinfo"), "not listed");
        assert!(!c.qga_command_enabled("guest-file-open"), "blocked");
        let c = Config::from_json(r#"{"security": {"blocked_methods": ["guest-exec"]}}"#).unwrap();
        assert!(
            c.method_enabled(Method::ExecCommand),
            "the native twin stays"
        );
        assert!(!c.qga_command_enabled("guest-exec"));
        assert!(c.qga_command_enabled("guest-get-osinfo"));
        for (text, why) in [
            (
                r#"{"security": {"blocked_methods": ["guest-nope"]}}"#,
                "not a qemu-ga command",
            ),
            (
                r#"{"security": {"blocked_methods": ["guest-sync"]}}"#,
                "cannot be blocked",
            ),
            (
                r#"{"security": {"allowed_methods": ["guest-get-devices"]}}"#,
                "not a qemu-ga command",
            ),
        ] {
            let e = Config::from_json(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn every_key_is_read() {
        let c = Config::from_json(
            r#"{
                "log_level": "trace",
                "log_file": "/var/log//agent.log/",
                "audit_file": "/var/log/kvmmanager//audit.log",
                "channel_name": "org.example.x",
                "qemu_ga_channel_name": "org.qemu.guest_agent.0",
                "max_message_size_kb": 16384,
                "connection_retry_seconds": 1,
                "request_timeout_seconds": 86400,
                "max_concurrent_requests": 1024,
                "freeze_timeout_seconds": 5,
                "fsfreeze_hook_dir": "/etc/hooks//",
                "security": {
                    "allowed_read_paths": ["/", "/var/./log/"],
                    "allowed_write_paths": [],
                    "command_whitelist": ["ls", "/usr//bin/cat", "ls"],
                    "max_file_size_mb": 1048576,
                    "max_command_timeout_seconds": 1,
                    "command_memory_max_mb": 1048576,
                    "command_max_processes": 1,
                    "allowed_methods": ["fs_freeze", "fs_thaw", "exec_command", "fs_freeze"],
                    "blocked_methods": ["exec_command"]
                }
            }"#,
        )
        .unwrap();
        assert_eq!(c.log_level, LogLevel::Trace);
        assert_eq!(c.log_file, Some(PathBuf::from("/var/log/agent.log")));
        assert_eq!(
            c.audit_file,
            Some(PathBuf::from("/var/log/kvmmanager/audit.log"))
        );
        assert_eq!(c.channel_name, "org.example.x");
        assert_eq!(
            c.qemu_ga_channel_name.as_deref(),
            Some("org.qemu.guest_agent.0")
        );
        assert_eq!(c.max_message_size, 16 * 1024 * 1024);
        assert_eq!(c.connection_retry, Duration::from_secs(1));
        assert_eq!(c.request_timeout, Duration::from_secs(86400));
        assert_eq!(c.max_concurrent_requests, 1024);
        assert_eq!(
            c.security.allowed_read_paths,
            vec![PathBuf::from("/"), PathBuf::from("/var/log")]
        );
        assert!(c.security.allowed_write_paths.is_empty());
        assert_eq!(
            c.security.command_whitelist,
            Some(vec!["ls".to_owned(), "/usr/bin/cat".to_owned()])
        );
        assert_eq!(c.security.max_file_size, 1 << 40);
        assert_eq!(c.security.max_command_timeout, Duration::from_secs(1));
        assert_eq!(c.security.command_memory_max, Some(1 << 40));
        assert_eq!(c.security.command_max_processes, Some(1));
        assert_eq!(c.freeze_timeout, Duration::from_secs(5));
        assert_eq!(c.fsfreeze_hook_dir, Some(PathBuf::from("/etc/hooks")));
        assert_eq!(
            c.security.allowed_methods,
            Some(vec![Method::FsFreeze, Method::FsThaw, Method::ExecCommand])
        );
        assert_eq!(c.security.blocked_methods, vec![Method::ExecCommand]);
        let enabled: Vec<Method> = Method::ALL
            .iter()
            .copied()
            .filter(|m| c.method_enabled(*m))
            .collect();
        assert_eq!(
            enabled,
            [
                Method::Ping,
                Method::Sync,
                Method::GetAgentInfo,
                Method::FsFreeze,
                Method::FsThaw
            ],
            "a blocked name wins; ping, sync and get_agent_info are always served"
        );
        assert_eq!(
            c.command_limits(),
            crate::cgroup::CommandLimits {
                memory_max: Some(1 << 40),
                pids_max: Some(1)
            }
        );
        let l = c.limits();
        assert_eq!(l.max_message_size, 16 * 1024 * 1024);
        assert_eq!(l.max_file_size, 1 << 40);
        assert_eq!(l.max_command_timeout_seconds, 1);
        assert_eq!(l.request_timeout_seconds, 86400);
        assert_eq!(l.max_concurrent_requests, 1024);
        assert_eq!(l.max_read_chunk, agent_common::MAX_READ_CHUNK);
        assert_eq!(l.max_exec_output, agent_common::MAX_EXEC_OUTPUT);
        assert_eq!(l.max_response_size, agent_common::MAX_RESPONSE_SIZE as u64);
        assert_eq!(l.freeze_timeout_seconds, Some(5));
        // Unit tests never set up containment (cgroup::init moves the
        // process): the process group alone, and no limits in force.
        assert_eq!(l.command_containment.as_deref(), Some("process_group"));
        assert_eq!(
            (l.command_memory_max, l.command_max_processes),
            (None, None)
        );
    }

    #[test]
    fn an_empty_hook_dir_turns_hooks_off() {
        let c = Config::from_json(r#"{"fsfreeze_hook_dir":""}"#).unwrap();
        assert_eq!(c.fsfreeze_hook_dir, None);
        let c = Config::from_json(r#"{"fsfreeze_hook_dir":null}"#).unwrap();
        assert_eq!(c.fsfreeze_hook_dir, Config::default().fsfreeze_hook_dir);
    }

    #[test]
    fn log_levels_round_trip() {
        for name in ["error", "warn", "info", "debug", "trace"] {
            let c = Config::from_json(&format!(r#"{{"log_level":"{name}"}}"#)).unwrap();
            assert_eq!(c.log_level.as_str(), name);
        }
    }

    #[test]
    fn allowed_forwards_match_address_and_port() {
        let c =
            Config::from_json(r#"{"security":{"allowed_forwards":["127.0.0.1:80","[::1]:*"]}}"#)
                .unwrap();
        let ok = |a: &str| c.forward_allowed(a.parse().unwrap());
        assert!(ok("127.0.0.1:80"));
        assert!(!ok("127.0.0.1:81"));
        assert!(!ok("127.0.0.2:80"));
        assert!(ok("[::1]:1"));
        assert!(ok("[::1]:65535"));
        assert!(!Config::default().forward_allowed("127.0.0.1:80".parse().unwrap()));
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases: &[(&str, &str)] = &[
            (r#"{"log_level":"verbose"}"#, "log_level"),
            (r#"{"log_level":"INFO"}"#, "log_level"),
            (r#"{"log_level":3}"#, "log_level"),
            (r#"{"log_file":"agent.log"}"#, "log_file"),
            (r#"{"log_file":""}"#, "log_file"),
            (r#"{"shell_command":""}"#, "shell_command"),
            (r#"{"shell_command":"bin/sh"}"#, "shell_command"),
            (
                r#"{"security":{"allowed_forwards":["localhost:80"]}}"#,
                "security.allowed_forwards",
            ),
            (
                r#"{"security":{"allowed_forwards":["::1:80"]}}"#,
                "security.allowed_forwards",
            ),
            (
                r#"{"security":{"allowed_forwards":["127.0.0.1:0"]}}"#,
                "security.allowed_forwards",
            ),
            (r#"{"log_file":"/"}"#, "log_file"),
            (r#"{"log_file":"/var/log/../x"}"#, "log_file"),
            (r#"{"audit_file":"audit.log"}"#, "audit_file"),
            (r#"{"audit_file":"/"}"#, "audit_file"),
            (r#"{"channel_name":""}"#, "channel_name"),
            (r#"{"channel_name":"a/b"}"#, "channel_name"),
            (r#"{"channel_name":".."}"#, "channel_name"),
            (r#"{"channel_name":5}"#, "channel_name"),
            (r#"{"qemu_ga_channel_name":"a/b"}"#, "qemu_ga_channel_name"),
            (r#"{"qemu_ga_channel_name":""}"#, "qemu_ga_channel_name"),
            (
                r#"{"qemu_ga_channel_name":"org.kvmmanager.agent.0"}"#,
                "qemu_ga_channel_name",
            ),
            (r#"{"max_message_size_kb":0}"#, "max_message_size_kb"),
            (r#"{"max_message_size_kb":16385}"#, "max_message_size_kb"),
            (r#"{"max_message_size_kb":-1}"#, "max_message_size_kb"),
            (r#"{"max_message_size_kb":1.5}"#, "max_message_size_kb"),
            (r#"{"max_message_size_kb":"64"}"#, "max_message_size_kb"),
            (
                r#"{"connection_retry_seconds":0}"#,
                "connection_retry_seconds",
            ),
            (
                r#"{"connection_retry_seconds":3601}"#,
                "connection_retry_seconds",
            ),
            (
                r#"{"request_timeout_seconds":0}"#,
                "request_timeout_seconds",
            ),
            (
                r#"{"request_timeout_seconds":86401}"#,
                "request_timeout_seconds",
            ),
            (
                r#"{"max_concurrent_requests":0}"#,
                "max_concurrent_requests",
            ),
            (
                r#"{"max_concurrent_requests":1025}"#,
                "max_concurrent_requests",
            ),
            (r#"{"security":[]}"#, "security"),
            (r#"{"freeze_timeout_seconds":0}"#, "freeze_timeout_seconds"),
            (
                r#"{"freeze_timeout_seconds":86401}"#,
                "freeze_timeout_seconds",
            ),
            (r#"{"fsfreeze_hook_dir":"hooks"}"#, "fsfreeze_hook_dir"),
            (r#"{"fsfreeze_hook_dir":"/a/../b"}"#, "fsfreeze_hook_dir"),
            // qemu-ga names are accepted when the dialect has the command.
            (
                r#"{"security":{"allowed_methods":["guest-pong"]}}"#,
                "security.allowed_methods",
            ),
            (
                r#"{"security":{"blocked_methods":["guest-info"]}}"#,
                "security.blocked_methods",
            ),
            (
                r#"{"security":{"allowed_methods":"ping"}}"#,
                "security.allowed_methods",
            ),
            (
                r#"{"security":{"blocked_methods":["fs_freez"]}}"#,
                "security.blocked_methods",
            ),
            (
                r#"{"security":{"blocked_methods":["sync"]}}"#,
                "security.blocked_methods",
            ),
            (
                r#"{"security":{"blocked_methods":null,"allowed_methods":[1]}}"#,
                "security.allowed_methods",
            ),
            (
                r#"{"security":{"allowed_read_paths":"/tmp"}}"#,
                "security.allowed_read_paths",
            ),
            (
                r#"{"security":{"allowed_read_paths":["tmp"]}}"#,
                "security.allowed_read_paths",
            ),
            (
                r#"{"security":{"allowed_read_paths":[""]}}"#,
                "security.allowed_read_paths",
            ),
            (
                r#"{"security":{"allowed_read_paths":["/tmp/../etc"]}}"#,
                "security.allowed_read_paths",
            ),
            (
                r#"{"security":{"allowed_read_paths":[null]}}"#,
                "security.allowed_read_paths",
            ),
            (
                r#"{"security":{"allowed_write_paths":["./x"]}}"#,
                "security.allowed_write_paths",
            ),
            (
                r#"{"security":{"allowed_write_paths":["/a/.."]}}"#,
                "security.allowed_write_paths",
            ),
            (
                r#"{"security":{"command_whitelist":[""]}}"#,
                "security.command_whitelist",
            ),
            (
                r#"{"security":{"command_whitelist":["bin/ls"]}}"#,
                "security.command_whitelist",
            ),
            (
                r#"{"security":{"command_whitelist":["./ls"]}}"#,
                "security.command_whitelist",
            ),
            (
                r#"{"security":{"command_whitelist":[".."]}}"#,
                "security.command_whitelist",
            ),
            (
                r#"{"security":{"command_whitelist":["/bin/../sh"]}}"#,
                "security.command_whitelist",
            ),
            (
                r#"{"security":{"command_whitelist":"ls"}}"#,
                "security.command_whitelist",
            ),
            (
                r#"{"security":{"max_file_size_mb":0}}"#,
                "security.max_file_size_mb",
            ),
            (
                r#"{"security":{"max_file_size_mb":1048577}}"#,
                "security.max_file_size_mb",
            ),
            (
                r#"{"security":{"max_command_timeout_seconds":0}}"#,
                "security.max_command_timeout_seconds",
            ),
            (
                r#"{"security":{"max_command_timeout_seconds":86401}}"#,
                "security.max_command_timeout_seconds",
            ),
            (
                r#"{"security":{"command_memory_max_mb":0}}"#,
                "security.command_memory_max_mb",
            ),
            (
                r#"{"security":{"command_memory_max_mb":1048577}}"#,
                "security.command_memory_max_mb",
            ),
            (
                r#"{"security":{"command_memory_max_mb":"1G"}}"#,
                "security.command_memory_max_mb",
            ),
            (
                r#"{"security":{"command_max_processes":0}}"#,
                "security.command_max_processes",
            ),
            (
                r#"{"security":{"command_max_processes":4194305}}"#,
                "security.command_max_processes",
            ),
            (
                r#"{"security":{"command_max_processes":-1}}"#,
                "security.command_max_processes",
            ),
        ];
        for (text, key) in cases {
            match Config::from_json(text) {
                Err(ConfigError::InvalidValue { key: k, reason }) => {
                    assert_eq!(k, *key, "{text}");
                    assert!(!reason.is_empty());
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_dotted_name() {
        let cases = [
            (r#"{"log_levle":"info"}"#, "log_levle"),
            (r#"{"max_file_size_mb":10}"#, "max_file_size_mb"),
            (
                r#"{"security":{"max_file_size":10}}"#,
                "security.max_file_size",
            ),
            (
                r#"{"security":{"allowed_read_paths":[],"x":1}}"#,
                "security.x",
            ),
        ];
        for (text, key) in cases {
            assert_eq!(
                Config::from_json(text),
                Err(ConfigError::UnknownKey {
                    key: key.to_owned()
                }),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_json_is_a_syntax_error() {
        for text in ["", "{", r#"{"log_level":}"#, "{} x", r#"{"a":1,}"#] {
            match Config::from_json(text) {
                Err(ConfigError::Syntax { line, .. }) => assert!(line >= 1, "{text}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        for text in ["[]", "null", "1", r#""x""#] {
            assert_eq!(
                Config::from_json(text),
                Err(ConfigError::NotAnObject),
                "{text}"
            );
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        match Config::load(&path) {
            Err(ConfigError::Read { path: p, .. }) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
        std::fs::write(&path, r#"{"log_level":"loud"}"#).unwrap();
        let e = Config::load(&path).unwrap_err();
        assert!(e.to_string().contains(path.to_str().unwrap()), "{e}");
        assert!(e.to_string().contains("log_level"), "{e}");
        std::fs::write(&path, r#"{"log_level":"debug"}"#).unwrap();
        assert_eq!(Config::load(&path).unwrap().log_level, LogLevel::Debug);
    }
}
