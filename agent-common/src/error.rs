//! Error codes: the JSON-RPC 2.0 standard ones and the application ones.
//!
//! Every error object the agent sends carries a `code` and a `data.kind`; the
//! kind is the machine-readable name of the cause, the code its number. Both
//! are listed in PROTOCOL.md and never change meaning once released.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The cause of an error, one per error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// -32700: the line is not valid JSON.
    ParseError,
    /// -32600: valid JSON but not a JSON-RPC 2.0 request.
    InvalidRequest,
    /// -32601: no method of that name.
    MethodNotFound,
    /// -32602: the params do not match the method (missing, unknown or mistyped fields).
    InvalidParams,
    /// -32603: a bug or an unexpected failure inside the agent.
    InternalError,
    /// -32000: the agent's policy (path or command allowlist, env rules) refuses the request.
    PolicyDenied,
    /// -32001: the file, directory or command does not exist.
    NotFound,
    /// -32002: an operating-system I/O error other than the specific ones below.
    IoError,
    /// -32003: the request or the command ran out of time.
    Timeout,
    /// -32004: a file or a requested range is larger than the configured limit.
    TooLarge,
    /// -32005: too many requests are in progress; retry later.
    Busy,
    /// -32006: `create_new` asked for a file that already exists.
    AlreadyExists,
    /// -32007: the request line is longer than `max_message_size_kb`.
    MessageTooLarge,
    /// -32008: the method exists but this platform or build cannot serve it.
    NotSupported,
    /// -32009: the agent is stopping and does not start new work.
    ShuttingDown,
    /// -32010: the command exists and is allowed but could not be started.
    SpawnFailed,
    /// -32011: the path names something other than a regular file (directory, FIFO, device).
    NotARegularFile,
    /// -32012: the guest's filesystem is full or over quota.
    NoSpace,
    /// -32013: the guest's operating system denied access (file permissions), not the policy.
    AccessDenied,
    /// -32014: the content is not valid in the requested encoding (for example not UTF-8).
    InvalidEncoding,
    /// -32015: the host cancelled the request (`cancel`) before it finished.
    Cancelled,
    /// -32016: the guest's filesystems are frozen (`fs_freeze`) and the
    /// request could write to one; thaw first.
    Frozen,
}

impl ErrorKind {
    /// Every kind, in code order. PROTOCOL.md lists exactly these.
    pub const ALL: &'static [ErrorKind] = &[
        ErrorKind::ParseError,
        ErrorKind::InvalidRequest,
        ErrorKind::MethodNotFound,
        ErrorKind::InvalidParams,
        ErrorKind::InternalError,
        ErrorKind::PolicyDenied,
        ErrorKind::NotFound,
        ErrorKind::IoError,
        ErrorKind::Timeout,
        ErrorKind::TooLarge,
        ErrorKind::Busy,
        ErrorKind::AlreadyExists,
        ErrorKind::MessageTooLarge,
        ErrorKind::NotSupported,
        ErrorKind::ShuttingDown,
        ErrorKind::SpawnFailed,
        ErrorKind::NotARegularFile,
        ErrorKind::NoSpace,
        ErrorKind::AccessDenied,
        ErrorKind::InvalidEncoding,
        ErrorKind::Cancelled,
        ErrorKind::Frozen,
    ];

    /// The numeric JSON-RPC error code.
    pub const fn code(self) -> i32 {
        match self {
            ErrorKind::ParseError => -32700,
            ErrorKind::InvalidRequest => -32600,
            ErrorKind::MethodNotFound => -32601,
            ErrorKind::InvalidParams => -32602,
            ErrorKind::InternalError => -32603,
            ErrorKind::PolicyDenied => -32000,
            ErrorKind::NotFound => -32001,
            ErrorKind::IoError => -32002,
            ErrorKind::Timeout => -32003,
            ErrorKind::TooLarge => -32004,
            ErrorKind::Busy => -32005,
            ErrorKind::AlreadyExists => -32006,
            ErrorKind::MessageTooLarge => -32007,
            ErrorKind::NotSupported => -32008,
            ErrorKind::ShuttingDown => -32009,
            ErrorKind::SpawnFailed => -32010,
            ErrorKind::NotARegularFile => -32011,
            ErrorKind::NoSpace => -32012,
            ErrorKind::AccessDenied => -32013,
            ErrorKind::InvalidEncoding => -32014,
            ErrorKind::Cancelled => -32015,
            ErrorKind::Frozen => -32016,
        }
    }

    /// The `data.kind` string.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ParseError => "parse_error",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::MethodNotFound => "method_not_found",
            ErrorKind::InvalidParams => "invalid_params",
            ErrorKind::InternalError => "internal_error",
            ErrorKind::PolicyDenied => "policy_denied",
            ErrorKind::NotFound => "not_found",
            ErrorKind::IoError => "io_error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Busy => "busy",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::MessageTooLarge => "message_too_large",
            ErrorKind::NotSupported => "not_supported",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::SpawnFailed => "spawn_failed",
            ErrorKind::NotARegularFile => "not_a_regular_file",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::AccessDenied => "access_denied",
            ErrorKind::InvalidEncoding => "invalid_encoding",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Frozen => "frozen",
        }
    }

    /// The kind for a numeric code, if the code is one of ours.
    pub fn from_code(code: i32) -> Option<ErrorKind> {
        ErrorKind::ALL.iter().copied().find(|k| k.code() == code)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A JSON-RPC 2.0 error object: `{"code", "message", "data"}`.
///
/// `data` is always an object with at least `kind`; some errors add fields
/// (for example `path`, `limit`, `size`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    /// Numeric code, see [`ErrorKind::code`].
    pub code: i32,
    /// One sentence for humans: what failed and what to do.
    pub message: String,
    /// Machine-readable details; `data.kind` names the cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl ErrorObject {
    /// A new error of `kind` with a human message and `data: {"kind": ...}`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ErrorObject {
        let mut data = Map::new();
        data.insert("kind".into(), Value::String(kind.as_str().into()));
        ErrorObject {
            code: kind.code(),
            message: message.into(),
            data: Some(Value::Object(data)),
        }
    }

    /// Adds one field to `data` (besides `kind`).
    pub fn with_data(mut self, key: &str, value: impl Into<Value>) -> ErrorObject {
        if let Some(Value::Object(map)) = self.data.as_mut() {
            map.insert(key.to_owned(), value.into());
        }
        self
    }

    /// The cause, from `data.kind` when present, else from the code.
    pub fn kind(&self) -> Option<ErrorKind> {
        self.data
            .as_ref()
            .and_then(|d| d.get("kind"))
            .and_then(|k| serde_json::from_value(k.clone()).ok())
            .or_else(|| ErrorKind::from_code(self.code))
    }
}

impl std::fmt::Display for ErrorObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind() {
            Some(kind) => write!(f, "{} ({kind}, code {})", self.message, self.code),
            None => write!(f, "{} (code {})", self.message, self.code),
        }
    }
}

impl std::error::Error for ErrorObject {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_and_kinds_are_unique_and_round_trip() {
        let codes: HashSet<i32> = ErrorKind::ALL.iter().map(|k| k.code()).collect();
        let names: HashSet<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(codes.len(), ErrorKind::ALL.len());
        assert_eq!(names.len(), ErrorKind::ALL.len());
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_code(kind.code()), Some(*kind));
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json, Value::String(kind.as_str().into()));
        }
    }

    #[test]
    fn application_codes_are_in_the_reserved_server_range() {
        for kind in ErrorKind::ALL {
            let c = kind.code();
            assert!(
                (-32099..=-32000).contains(&c) || (-32700..=-32600).contains(&c),
                "{kind} has code {c}"
            );
        }
    }

    #[test]
    fn error_object_carries_kind_and_extra_data() {
        let e = ErrorObject::new(ErrorKind::TooLarge, "file is too large").with_data("limit", 10);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["code"], -32004);
        assert_eq!(v["data"]["kind"], "too_large");
        assert_eq!(v["data"]["limit"], 10);
        assert_eq!(e.kind(), Some(ErrorKind::TooLarge));
    }
}
