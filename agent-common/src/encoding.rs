//! Content encodings for file data and command output.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// How binary content is carried inside a JSON string.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// The bytes are UTF-8 text, carried as-is (JSON-escaped).
    #[default]
    Utf8,
    /// The bytes are carried as standard base64 with padding (RFC 4648 §4).
    Base64,
    /// The bytes are not in a JSON string at all: they travel raw, as the
    /// message's attachment (see "Attachments" in PROTOCOL.md), and the
    /// string member is empty. Only `file_read` and `file_write` use it.
    Attachment,
}

/// Why content could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The string is not valid base64.
    #[error("content is not valid base64")]
    Base64(#[source] base64::DecodeError),
    /// Attachment content is not in a string.
    #[error("content with encoding attachment travels after the message line, not in a string")]
    NotInline,
}

impl Encoding {
    /// True for the encodings that put the bytes in a JSON string.
    pub fn is_inline(self) -> bool {
        self != Encoding::Attachment
    }

    /// Encodes `bytes`. With [`Encoding::Utf8`], `None` means the bytes are
    /// not valid UTF-8 (use base64 instead); with [`Encoding::Attachment`]
    /// always `None` (the bytes are not carried in a string).
    pub fn encode(self, bytes: &[u8]) -> Option<String> {
        match self {
            Encoding::Utf8 => std::str::from_utf8(bytes).ok().map(str::to_owned),
            Encoding::Base64 => Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            Encoding::Attachment => None,
        }
    }

    /// Encodes `bytes`, replacing invalid UTF-8 with U+FFFD in
    /// [`Encoding::Utf8`]. [`Encoding::Attachment`] is not an inline
    /// encoding; it falls back to base64 so that no bytes are lost.
    pub fn encode_lossy(self, bytes: &[u8]) -> String {
        match self {
            Encoding::Utf8 => String::from_utf8_lossy(bytes).into_owned(),
            Encoding::Base64 | Encoding::Attachment => {
                base64::engine::general_purpose::STANDARD.encode(bytes)
            }
        }
    }

    /// Decodes `content` back into bytes.
    pub fn decode(self, content: &str) -> Result<Vec<u8>, DecodeError> {
        match self {
            Encoding::Utf8 => Ok(content.as_bytes().to_vec()),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(content)
                .map_err(DecodeError::Base64),
            Encoding::Attachment => Err(DecodeError::NotInline),
        }
    }

    /// Number of bytes `len` raw bytes take once encoded (upper bound for
    /// UTF-8; 0 for an attachment, which adds nothing to the line).
    pub fn encoded_len(self, len: usize) -> usize {
        match self {
            Encoding::Utf8 => len.saturating_mul(6), // worst case: every byte escaped as \u00XX
            Encoding::Base64 => len.div_ceil(3).saturating_mul(4),
            Encoding::Attachment => 0,
        }
    }

    /// Largest raw chunk whose encoding fits in `budget` bytes of a line
    /// (for an attachment the line is not the limit: the whole budget).
    pub fn max_raw_for(self, budget: usize) -> usize {
        match self {
            Encoding::Utf8 => budget / 6,
            Encoding::Base64 => budget / 4 * 3,
            Encoding::Attachment => budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_all_bytes() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let s = Encoding::Base64.encode(&bytes).unwrap();
        assert_eq!(Encoding::Base64.decode(&s).unwrap(), bytes);
        assert!(s.len() <= Encoding::Base64.encoded_len(bytes.len()));
    }

    #[test]
    fn utf8_refuses_invalid_bytes_and_lossy_replaces_them() {
        assert_eq!(Encoding::Utf8.encode(b"\xff\xfe"), None);
        assert_eq!(Encoding::Utf8.encode_lossy(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(Encoding::Utf8.encode("é".as_bytes()).as_deref(), Some("é"));
    }

    #[test]
    fn bad_base64_is_an_error() {
        assert!(Encoding::Base64.decode("not base64!").is_err());
    }

    #[test]
    fn max_raw_for_fits_the_budget() {
        for budget in [0usize, 3, 4, 100, 65536] {
            let raw = Encoding::Base64.max_raw_for(budget);
            assert!(Encoding::Base64.encoded_len(raw) <= budget);
        }
    }
}
