//! Streams over the one channel: wire types and limits (PROTOCOL.md,
//! "Streams").
//!
//! A stream is a pair of byte flows, one each way, named by an id the host
//! picks when it opens the stream (with `exec_start`). Data travels as
//! `stream_data` notifications whose bytes are the attachment; each side
//! sends only as many bytes as the other has granted (`stream_credit`), as
//! SSH channel windows (RFC 4254 section 5.2) and HTTP/2 `WINDOW_UPDATE`
//! do, so a stream whose reader stalls stalls alone. `stream_close` ends
//! one direction (half-close); `stream_reset` ends both at once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bytes the agent grants the host on a new stream (its window for the
/// host's data), and grants again as it consumes them.
pub const STREAM_WINDOW: u64 = 256 * 1024;

/// The most bytes the agent sends in one `stream_data` (per-message costs
/// dominate in an emulated guest: 64 KiB chunks forwarded at 37 MiB/s).
pub const STREAM_CHUNK: u64 = 256 * 1024;

/// The largest window a host may grant the agent (`window` of the opening
/// method, and the sum of its `stream_credit` grants outstanding).
pub const MAX_STREAM_WINDOW: u64 = 64 * 1024 * 1024;

/// Streams one connection may have open at once.
pub const MAX_STREAMS: usize = 32;

/// The wire name of the notification carrying an exec stream's exit.
pub const EXEC_EXIT: &str = "exec_exit";

/// Params of `stream_data`, either way: the stream; its bytes are the
/// line's attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDataParams {
    /// The stream.
    pub stream: u64,
}

/// Params of `stream_credit`, either way: the sender may send `bytes` more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamCreditParams {
    /// The stream.
    pub stream: u64,
    /// Bytes granted, besides those granted before.
    pub bytes: u64,
}

/// Params of `stream_close`, either way: the sender sends no more on the
/// stream (half-close; the other direction stays open).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamCloseParams {
    /// The stream.
    pub stream: u64,
}

/// Params of `stream_reset`, either way: the stream ends at once in both
/// directions; data in flight is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamResetParams {
    /// The stream.
    pub stream: u64,
    /// Why, for people (`flow_control`, `closed`, `session_ended`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer to a stream message sent as a request (with an `id`): `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamAck {}

/// A pseudo-terminal for `exec_start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtyParams {
    /// Rows (1 to 1000).
    pub rows: u16,
    /// Columns (1 to 1000).
    pub cols: u16,
    /// `TERM` for the command; default `xterm-256color`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
}

/// Params of `exec_start`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecStartParams {
    /// The program, as for `exec_command`. Absent with `pty`: the agent's
    /// `shell_command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Arguments, passed verbatim.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment variables, under `exec_command`'s rules.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute); default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Time limit; default none (the command ends with the connection). At
    /// most `max_command_timeout_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// The id of the stream: stdin one way, stdout (and stderr without
    /// `stderr_stream`, or the terminal with `pty`) the other.
    pub stream: u64,
    /// A second stream for stderr alone (agent to host only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_stream: Option<u64>,
    /// Run on a pseudo-terminal of this size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtyParams>,
    /// Bytes the host grants at once on each of its streams; default
    /// [`STREAM_WINDOW`], at most [`MAX_STREAM_WINDOW`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
}

/// Result of `exec_start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStartResult {
    /// The stream, as asked.
    pub stream: u64,
    /// The command's process id in the guest.
    pub pid: u32,
    /// Bytes the host may send on the stream before more credit.
    pub window: u64,
}

/// Params of `exec_signal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSignalParams {
    /// The command's stream.
    pub stream: u64,
    /// The signal's name: `INT`, `TERM`, `KILL`, `HUP`, `QUIT`, `USR1`,
    /// `USR2`, `WINCH`, `STOP`, `CONT` (a `SIG` prefix is allowed).
    pub signal: String,
}

/// Params of `exec_resize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecResizeParams {
    /// The command's stream (started with `pty`).
    pub stream: u64,
    /// Rows (1 to 1000).
    pub rows: u16,
    /// Columns (1 to 1000).
    pub cols: u16,
}

/// Params of the agent's `exec_exit` notification: the command ended.
/// Sent once its output streams were closed, so it is the last message of
/// the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExitParams {
    /// The command's stream.
    pub stream: u64,
    /// Exit status, if the command exited.
    pub exit_code: Option<i32>,
    /// Signal number, if it was killed by one.
    pub signal: Option<i32>,
    /// Killed because `timeout_seconds` passed.
    pub timed_out: bool,
    /// Time from start to exit.
    pub duration_ms: u64,
}

/// Params of `forward_open`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardOpenParams {
    /// The guest address to connect to: an IP address (no names), one
    /// that `security.allowed_forwards` lists.
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// The id of the stream that carries the connection's bytes.
    pub stream: u64,
    /// Bytes the host grants at once; default [`STREAM_WINDOW`], at most
    /// [`MAX_STREAM_WINDOW`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
}

/// Result of `forward_open`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardOpenResult {
    /// The stream, as asked.
    pub stream: u64,
    /// Bytes the host may send before more credit.
    pub window: u64,
}

/// Params of `follow_log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowLogParams {
    /// The file, beneath `security.allowed_read_paths`.
    pub path: String,
    /// Lines already in the file to send first (at most 10000); default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<u32>,
    /// Only lines containing this text (plain text, case-sensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// The id of the stream that carries the lines.
    pub stream: u64,
    /// Bytes the host grants at once; default [`STREAM_WINDOW`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
}

/// Result of `follow_log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowLogResult {
    /// The stream, as asked.
    pub stream: u64,
}

/// The most bytes the agent sends in one `stream_data` of a
/// `file_read_stream` (a file's chunk goes whole, as a `file_read`
/// attachment does).
pub const FILE_STREAM_CHUNK: u64 = crate::MAX_READ_CHUNK;

/// Params of `file_read_stream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReadStreamParams {
    /// The file, beneath `security.allowed_read_paths`.
    pub path: String,
    /// Byte offset to start at. Default 0.
    #[serde(default)]
    pub offset: u64,
    /// The id of the stream that carries the bytes.
    pub stream: u64,
    /// Bytes the host grants at once; default [`STREAM_WINDOW`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
}

/// Result of `file_read_stream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReadStreamResult {
    /// The stream, as asked.
    pub stream: u64,
    /// The file's size when it was opened: the stream carries its bytes
    /// from `offset` to this size (fewer only if the file shrinks
    /// meanwhile), then the agent closes its side.
    pub size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_reject_unknown_fields_and_keep_their_defaults() {
        let p: ExecStartParams = serde_json::from_str(r#"{"command":"cat","stream":1}"#).unwrap();
        assert_eq!(p.command.as_deref(), Some("cat"));
        assert_eq!((p.stream, p.pty, p.window), (1, None, None));
        assert!(serde_json::from_str::<ExecStartParams>(r#"{"stream":1,"stdin":"x"}"#).is_err());
        assert!(serde_json::from_str::<StreamCreditParams>(r#"{"stream":1}"#).is_err());
        let r: StreamResetParams = serde_json::from_str(r#"{"stream":2}"#).unwrap();
        assert_eq!(r.reason, None);
        assert_eq!(
            serde_json::to_string(&StreamDataParams { stream: 7 }).unwrap(),
            r#"{"stream":7}"#
        );
    }
}
