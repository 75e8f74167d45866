//! The JSON-RPC 2.0 envelope around an agent's method core, shared by every
//! agent (Linux, Windows).
//!
//! An agent's core answers one typed call at a time and knows nothing of the
//! wire. The envelope is everything between that core and a line:
//! [`parse_message`](crate::jsonrpc::parse_message) sorts a line into calls
//! (single, batch, notifications, malformed parts with their replies);
//! [`ReplyLine`] assembles the answers into the one line owed and encodes it
//! (the `sync` reply's leading newline, a reply too large replaced by a
//! `too_large` error); the framing errors ([`oversized`],
//! [`attachment_too_large`], [`attachment_unknown`], [`attachment_timeout`])
//! are built here so that every agent words and shapes them alike. A second
//! dialect (the QEMU guest agent's protocol) is another envelope over the
//! same core.

use bytes::BytesMut;
use serde::Serialize;

use crate::error::{ErrorKind, ErrorObject};
use crate::jsonrpc::{Entry, Id, Incoming, Response};
use crate::methods::Method;

/// The reply line owed for one incoming line.
#[derive(Debug)]
pub enum ReplyLine {
    /// The reply to a single request. A `sync` reply is written after an
    /// empty line, so that it starts a line even when stale output before
    /// it (an attachment cut off when the last host left) ended mid-line.
    Single {
        /// The reply.
        response: Response,
        /// True for the reply to a `sync`.
        sync: bool,
    },
    /// The replies of a batch, in completion order (never empty).
    Batch(Vec<Response>),
}

impl ReplyLine {
    /// The line owed for a single request that got `answer` (`None` for a
    /// notification: nothing is owed).
    pub fn single(entry_was_sync: bool, answer: Option<Response>) -> Option<ReplyLine> {
        answer.map(|response| ReplyLine::Single {
            response,
            sync: entry_was_sync,
        })
    }

    /// The line owed for a batch whose members got `answers` (notifications
    /// `None`); `None` when every member was a notification.
    pub fn batch(answers: impl IntoIterator<Item = Option<Response>>) -> Option<ReplyLine> {
        let replies: Vec<Response> = answers.into_iter().flatten().collect();
        (!replies.is_empty()).then_some(ReplyLine::Batch(replies))
    }

    /// The line, ready to write. A reply longer than
    /// [`MAX_RESPONSE_SIZE`](crate::MAX_RESPONSE_SIZE) is replaced by a
    /// `too_large` error for its id (`null` for a batch), so the host never
    /// receives a line it must drop. The second value is true when the
    /// line is the reply itself (not a replacement).
    pub fn encode(&self) -> (BytesMut, bool) {
        match self {
            ReplyLine::Single { response, sync } => {
                let mut line = BytesMut::new();
                if *sync {
                    line.extend_from_slice(b"\n");
                }
                let whole = encode_bounded(response, response.id.clone(), &mut line);
                (line, whole)
            }
            ReplyLine::Batch(replies) => {
                let mut line = BytesMut::new();
                let whole = encode_bounded(replies, Id::null(), &mut line);
                (line, whole)
            }
        }
    }
}

/// True when `entry` is a well-formed `sync` request.
pub fn is_sync(entry: &Entry) -> bool {
    matches!(entry, Ok(req) if req.method == Method::Sync.as_str())
}

/// Appends `value` as one line to `dst`, or, when it would be longer than
/// the protocol allows, a `too_large` error for `id`. True when `value`
/// itself was written.
fn encode_bounded<T: Serialize + ?Sized>(value: &T, id: Id, dst: &mut BytesMut) -> bool {
    let start = dst.len();
    let replacement = match crate::codec::encode_line(value, dst) {
        Ok(()) if dst.len() - start <= crate::MAX_RESPONSE_SIZE => return true,
        Ok(()) => Response::error(
            id,
            ErrorObject::new(
                ErrorKind::TooLarge,
                format!(
                    "the reply would exceed {} bytes; ask for less (a smaller length, or \
                     output_encoding base64)",
                    crate::MAX_RESPONSE_SIZE
                ),
            ),
        ),
        Err(e) => Response::error(
            Id::null(),
            ErrorObject::new(
                ErrorKind::InternalError,
                format!("could not encode the reply: {e}"),
            ),
        ),
    };
    dst.truncate(start);
    // Invariant: a small error reply (a raw id and a short message) always
    // serialises.
    let _ = crate::codec::encode_line(&replacement, dst);
    false
}

/// The id a reply about a line's framing goes to: the request's, as far as
/// it could be read, or `null` for a batch.
pub fn reply_id(incoming: &Incoming) -> Id {
    match incoming {
        Incoming::Single(Ok(req)) => req.id.clone().unwrap_or_else(Id::null),
        Incoming::Single(Err(resp)) => resp.id.clone(),
        Incoming::Batch(_) => Id::null(),
    }
}

/// The reply to a line longer than `limit` bytes (`"id": null`: it was not
/// parsed). The input up to the next resync byte is dropped with it.
pub fn oversized(limit: u64) -> Response {
    Response::error(
        Id::null(),
        ErrorObject::new(
            ErrorKind::MessageTooLarge,
            format!(
                "request line longer than max_message_size ({limit} bytes) was discarded, with \
                 the input up to the next resync byte: send 0xFF and sync, then retry with \
                 shorter lines (large files in chunks)"
            ),
        )
        .with_data("limit", limit)
        .with_data("resync", true),
    )
}

/// The reply to a request whose attachment of `len` bytes is larger than
/// [`MAX_ATTACHMENT_SIZE`](crate::MAX_ATTACHMENT_SIZE) (it is skipped, not
/// read).
pub fn attachment_too_large(incoming: &Incoming, len: u64) -> Response {
    let limit = crate::MAX_ATTACHMENT_SIZE;
    Response::error(
        reply_id(incoming),
        ErrorObject::new(
            ErrorKind::MessageTooLarge,
            format!(
                "attachment of {len} bytes is larger than max_attachment_size ({limit}); it was \
                 discarded: send the data in smaller chunks"
            ),
        )
        .with_data("limit", limit),
    )
}

/// The reply to a line whose attachment length cannot be known (a malformed
/// or repeated `attachment` member): the input up to the next resync byte
/// is dropped.
pub fn attachment_unknown(incoming: &Incoming) -> Response {
    Response::error(
        reply_id(incoming),
        ErrorObject::new(
            ErrorKind::InvalidRequest,
            "the line's attachment member is not one integer >= 0, so where its data ends is \
             unknown: the line and the input up to the next resync byte were dropped; send 0xFF \
             and sync, then retry with one valid attachment member",
        )
        .with_data("resync", true),
    )
}

/// The reply to a request whose attachment did not arrive within `seconds`;
/// the input up to the next resync byte is dropped.
pub fn attachment_timeout(incoming: &Incoming, seconds: u64) -> Response {
    Response::error(
        reply_id(incoming),
        ErrorObject::new(
            ErrorKind::Timeout,
            format!(
                "the request's attachment did not arrive within {seconds} s and was dropped, \
                 with the input up to the next resync byte: send 0xFF and sync, then retry"
            ),
        )
        .with_data("limit", seconds)
        .with_data("resync", true),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonrpc::parse_message;

    fn single(line: &str) -> Entry {
        match parse_message(line.as_bytes()) {
            Incoming::Single(e) => e,
            Incoming::Batch(_) => panic!("a single request"),
        }
    }

    #[test]
    fn the_sync_reply_starts_a_line_of_its_own() {
        let entry = single(r#"{"jsonrpc":"2.0","method":"sync","params":{"nonce":1},"id":1}"#);
        assert!(is_sync(&entry));
        let line = ReplyLine::single(true, Some(Response::ok(Id::number(1), &1))).unwrap();
        assert!(line.encode().0.starts_with(b"\n{"));
        let line = ReplyLine::single(false, Some(Response::ok(Id::number(1), &1))).unwrap();
        assert!(line.encode().0.starts_with(b"{"));
        assert!(!is_sync(&single(
            r#"{"jsonrpc":"2.0","method":"ping","id":1}"#
        )));
    }

    #[test]
    fn notifications_owe_nothing() {
        assert!(ReplyLine::single(false, None).is_none());
        assert!(ReplyLine::batch([None, None]).is_none());
        let line = ReplyLine::batch([None, Some(Response::ok(Id::number(2), &true))]).unwrap();
        assert_eq!(
            &line.encode().0[..],
            b"[{\"jsonrpc\":\"2.0\",\"result\":true,\"id\":2}]\n"
        );
    }

    #[test]
    fn oversized_replies_become_errors_for_their_id() {
        let big = "x".repeat(crate::MAX_RESPONSE_SIZE + 1);
        let line = ReplyLine::single(false, Some(Response::ok(Id::number(4), &big))).unwrap();
        let (bytes, whole) = line.encode();
        assert!(!whole);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["data"]["kind"], "too_large");
        assert_eq!(v["id"], 4);
        let line = ReplyLine::batch([Some(Response::ok(Id::number(5), &big))]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&line.encode().0).unwrap();
        assert_eq!(v["id"], serde_json::Value::Null);
    }

    #[test]
    fn framing_errors_go_to_the_id_that_could_be_read() {
        let m = parse_message(br#"{"jsonrpc":"1.0","method":"w","id":7,"attachment":3}"#);
        assert_eq!(attachment_too_large(&m, 9).id, Id::number(7));
        assert_eq!(attachment_unknown(&m).id, Id::number(7));
        let m = parse_message(br#"[{"jsonrpc":"2.0","method":"w","id":7}]"#);
        assert!(attachment_timeout(&m, 10).id.is_null());
        let e = oversized(65536).outcome.unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::MessageTooLarge));
    }
}
