//! The wire contract shared by the kvmmanager guest agents and the host client.
//!
//! Everything that crosses the virtio-serial port is defined here and only
//! here: the JSON-RPC 2.0 envelope ([`jsonrpc`]), the error codes
//! ([`error`]), the typed parameters and results of every method
//! ([`methods`]), content encodings ([`encoding`]) and the one line codec
//! both peers use ([`codec`]). `PROTOCOL.md` at the top of the repository is
//! the prose version of this crate; a test keeps the two in step.
#![deny(missing_docs)]

pub mod codec;
pub mod encoding;
pub mod envelope;
pub mod error;
pub mod fleet;
pub mod guestops;
pub mod jsonrpc;
pub mod methods;
pub mod streams;

/// Version of the protocol spoken by this crate, reported by `get_agent_info`.
///
/// It is bumped only for breaking changes (see "Versioning" in PROTOCOL.md).
pub const PROTOCOL_VERSION: u32 = 1;

/// Name of the virtio-serial port the agent listens on.
pub const DEFAULT_CHANNEL_NAME: &str = "org.kvmmanager.agent.0";

/// The resynchronisation byte. It never occurs in UTF-8 text, so it can never
/// be part of a JSON message; receiving it discards any partial input.
pub const RESYNC_BYTE: u8 = 0xFF;

/// Largest response line a host must be able to receive, in bytes.
///
/// Requests are limited by the agent's `max_message_size_kb`; responses may be
/// larger (a `file_read` chunk of [`MAX_READ_CHUNK`] bytes in base64 plus the
/// envelope, or the captured output of a command) but never exceed this.
pub const MAX_RESPONSE_SIZE: usize = 8 * 1024 * 1024;

/// Largest attachment (raw bytes after a message line) either peer sends:
/// the data of one `file_read` or `file_write` chunk with
/// `"encoding": "attachment"`. Reported as `limits.max_attachment_size`.
pub const MAX_ATTACHMENT_SIZE: u64 = 1024 * 1024;

/// Most requests in one batch line. A longer batch is refused whole
/// (`invalid_request`): the replies of one line must stay bounded, since
/// each costs the agent memory until the host reads it.
pub const MAX_BATCH_LEN: usize = 64;

/// The check value of an attachment: CRC-32 (IEEE 802.3, the polynomial of
/// zlib, gzip and PNG) of its bytes, sent as `attachment_crc32` beside
/// `attachment` in a request line. The agent writes an attachment only
/// when the bytes that arrived have this value, so an attachment cut short
/// and completed by other bytes (a later host's) is refused, never written.
pub fn attachment_crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// Most bytes one `file_read` call returns.
pub const MAX_READ_CHUNK: u64 = 1024 * 1024;

/// Most bytes of stdout, and separately of stderr, kept from one `exec_command`.
pub const MAX_EXEC_OUTPUT: u64 = 1024 * 1024;
