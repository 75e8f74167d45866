//! The JSON-RPC 2.0 envelope: ids, requests, responses and message parsing.
//!
//! The agent parses each line with [`parse_message`], which sorts a line into
//! single requests or a batch and turns every malformed part into the error
//! response JSON-RPC 2.0 prescribes. Ids are kept as raw JSON text so that a
//! string or number id is echoed byte for byte.

use serde::de::{DeserializeOwned, Error as _};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::error::{ErrorKind, ErrorObject};

/// The `jsonrpc` member every message carries.
pub const JSONRPC_VERSION: &str = "2.0";

/// A request id: a JSON string, number or `null`, kept as its raw JSON text.
#[derive(Debug, Clone)]
pub struct Id(Box<RawValue>);

impl Id {
    /// A numeric id.
    pub fn number(n: u64) -> Id {
        Id(RawValue::from_string(n.to_string()).expect("an integer is valid JSON"))
    }

    /// A string id.
    pub fn string(s: &str) -> Id {
        let text = serde_json::to_string(s).expect("a string serialises");
        Id(RawValue::from_string(text).expect("a serialised string is valid JSON"))
    }

    /// The `null` id, used in replies to requests whose id could not be read.
    pub fn null() -> Id {
        Id(RawValue::from_string("null".into()).expect("null is valid JSON"))
    }

    /// The id as an unsigned integer, when it is one.
    pub fn as_u64(&self) -> Option<u64> {
        self.0.get().parse().ok()
    }

    /// The raw JSON text of the id.
    pub fn as_raw(&self) -> &str {
        self.0.get()
    }

    /// True for the `null` id.
    pub fn is_null(&self) -> bool {
        self.0.get() == "null"
    }
}

impl PartialEq for Id {
    fn eq(&self, other: &Id) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Eq for Id {}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.get())
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        match raw.get().as_bytes().first() {
            Some(b'"' | b'-' | b'0'..=b'9') => Ok(Id(raw)),
            _ if raw.get() == "null" => Ok(Id(raw)),
            _ => Err(D::Error::custom("id must be a string, a number or null")),
        }
    }
}

/// A parsed request or notification.
#[derive(Debug)]
pub struct Request {
    /// `None` for a notification (no `id` member): it gets no reply.
    pub id: Option<Id>,
    /// The method name.
    pub method: String,
    /// The raw `params` member, if present.
    pub params: Option<Box<RawValue>>,
    /// The `attachment` member: the number of raw bytes that follow the
    /// line (see "Attachments" in PROTOCOL.md). Never set inside a batch.
    pub attachment: Option<u64>,
    /// The `attachment_crc32` member: the attachment's check value
    /// ([`crate::attachment_crc32`]).
    pub attachment_crc32: Option<u32>,
}

impl Request {
    /// Decodes the params into the method's typed params.
    ///
    /// Absent or `null` params are read as `{}`, so methods whose params are
    /// all optional accept both. Positional (array) params are refused.
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, ErrorObject> {
        let text = match &self.params {
            None => "{}",
            Some(raw) if raw.get() == "null" => "{}",
            Some(raw) => raw.get(),
        };
        if text.starts_with('[') {
            return Err(ErrorObject::new(
                ErrorKind::InvalidParams,
                format!("params of {} must be an object, not an array", self.method),
            ));
        }
        serde_json::from_str(text).map_err(|e| {
            ErrorObject::new(
                ErrorKind::InvalidParams,
                format!("invalid params for {}: {e}", self.method),
            )
        })
    }
}

/// A request as the host sends it.
#[derive(Debug, Serialize)]
pub struct OutgoingRequest<'a, P: Serialize> {
    /// Always "2.0".
    pub jsonrpc: &'static str,
    /// Method name.
    pub method: &'a str,
    /// Typed params.
    pub params: &'a P,
    /// Request id; `None` sends a notification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Id>,
    /// Length of the raw bytes sent right after the line, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment: Option<u64>,
    /// The check value of those bytes ([`crate::attachment_crc32`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachment_crc32: Option<u32>,
}

impl<'a, P: Serialize> OutgoingRequest<'a, P> {
    /// A request with an id.
    pub fn new(method: &'a str, params: &'a P, id: &'a Id) -> Self {
        OutgoingRequest {
            jsonrpc: JSONRPC_VERSION,
            method,
            params,
            id: Some(id),
            attachment: None,
            attachment_crc32: None,
        }
    }

    /// Announces `data` as the raw bytes sent right after the line: its
    /// length and its check value.
    pub fn with_attachment(mut self, data: &[u8]) -> Self {
        self.attachment = Some(data.len() as u64);
        self.attachment_crc32 = Some(crate::attachment_crc32(data));
        self
    }
}

/// A reply: the request's id and either a result or an error.
#[derive(Debug)]
pub struct Response {
    /// The id of the request this answers (null if it could not be read).
    pub id: Id,
    /// The raw result, or the error.
    pub outcome: Result<Box<RawValue>, ErrorObject>,
    /// The `attachment` member: the number of raw bytes that follow the
    /// line (only with a result).
    pub attachment: Option<u64>,
}

impl Response {
    /// A success reply carrying `result`.
    pub fn ok<T: Serialize>(id: Id, result: &T) -> Response {
        let outcome = serde_json::value::to_raw_value(result).map_err(|e| {
            ErrorObject::new(
                ErrorKind::InternalError,
                format!("could not encode the result: {e}"),
            )
        });
        Response {
            id,
            outcome,
            attachment: None,
        }
    }

    /// An error reply.
    pub fn error(id: Id, error: ErrorObject) -> Response {
        Response {
            id,
            outcome: Err(error),
            attachment: None,
        }
    }

    /// Decodes the result into `T`, or returns the agent's error.
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, ResponseError> {
        match self.outcome {
            Ok(raw) => serde_json::from_str(raw.get()).map_err(ResponseError::BadResult),
            Err(e) => Err(ResponseError::Agent(e)),
        }
    }
}

/// Why a reply could not be turned into a typed result.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    /// The agent answered with an error.
    #[error("agent error: {0}")]
    Agent(ErrorObject),
    /// The result did not have the expected shape.
    #[error("the result does not match the method's result type")]
    BadResult(#[source] serde_json::Error),
}

impl Serialize for Response {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(3 + usize::from(self.attachment.is_some())))?;
        map.serialize_entry("jsonrpc", JSONRPC_VERSION)?;
        match &self.outcome {
            Ok(result) => map.serialize_entry("result", result)?,
            Err(error) => map.serialize_entry("error", error)?,
        }
        map.serialize_entry("id", &self.id)?;
        if let Some(len) = self.attachment {
            map.serialize_entry("attachment", &len)?;
        }
        map.end()
    }
}

#[derive(Deserialize)]
struct RawResponse {
    jsonrpc: String,
    #[serde(default, deserialize_with = "present")]
    result: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<ErrorObject>,
    id: Id,
    #[serde(default)]
    attachment: Option<u64>,
}

/// Why a line from the agent is not a valid response.
#[derive(Debug, thiserror::Error)]
pub enum ResponseParseError {
    /// Not JSON, or not shaped like a response.
    #[error("not a JSON-RPC response")]
    Json(#[source] serde_json::Error),
    /// `jsonrpc` is not "2.0".
    #[error("jsonrpc member is {0:?}, expected \"2.0\"")]
    Version(String),
    /// Both or neither of `result` and `error` are present.
    #[error("a response must carry exactly one of result and error")]
    Shape,
    /// An error response announced an attachment.
    #[error("an error response cannot carry an attachment")]
    AttachmentOnError,
}

/// Parses one response line (the host side).
pub fn parse_response(line: &[u8]) -> Result<Response, ResponseParseError> {
    let raw: RawResponse = serde_json::from_slice(line).map_err(ResponseParseError::Json)?;
    if raw.jsonrpc != JSONRPC_VERSION {
        return Err(ResponseParseError::Version(raw.jsonrpc));
    }
    let outcome = match (raw.result, raw.error) {
        (Some(r), None) => Ok(r),
        (None, Some(e)) => Err(e),
        _ => return Err(ResponseParseError::Shape),
    };
    if outcome.is_err() && raw.attachment.is_some() {
        return Err(ResponseParseError::AttachmentOnError);
    }
    Ok(Response {
        id: raw.id,
        outcome,
        attachment: raw.attachment,
    })
}

/// A present member, even if its value is `null`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct RawRequest {
    #[serde(default)]
    jsonrpc: Option<Box<RawValue>>,
    #[serde(default)]
    method: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    params: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    attachment: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    attachment_crc32: Option<Box<RawValue>>,
}

/// One element of an incoming message: a request, or the error reply owed
/// for a malformed one.
pub type Entry = Result<Request, Response>;

/// An incoming line, sorted.
#[derive(Debug)]
pub enum Incoming {
    /// A single request (or the reply to a malformed one).
    Single(Entry),
    /// A batch: each element in order. Never empty.
    Batch(Vec<Entry>),
}

impl Incoming {
    /// The byte count of the attachment that follows this line, if the line
    /// is a single well-formed request that announces one.
    pub fn attachment(&self) -> Option<u64> {
        match self {
            Incoming::Single(Ok(req)) => req.attachment,
            _ => None,
        }
    }
}

/// Parses one incoming line into requests, following JSON-RPC 2.0:
/// invalid JSON gives a parse error (-32700) with `id: null`; an empty batch
/// or a malformed request gives an invalid request error (-32600).
pub fn parse_message(line: &[u8]) -> Incoming {
    let first = line.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        match serde_json::from_slice::<Vec<&RawValue>>(line) {
            Ok(items) if items.is_empty() => Incoming::Single(Err(Response::error(
                Id::null(),
                ErrorObject::new(ErrorKind::InvalidRequest, "empty batch"),
            ))),
            Ok(items) if items.len() > crate::MAX_BATCH_LEN => {
                Incoming::Single(Err(Response::error(
                    Id::null(),
                    ErrorObject::new(
                        ErrorKind::InvalidRequest,
                        format!(
                            "a batch of {} requests is longer than {}; none of them ran: \
                             send smaller batches",
                            items.len(),
                            crate::MAX_BATCH_LEN
                        ),
                    )
                    .with_data("limit", crate::MAX_BATCH_LEN as u64),
                )))
            }
            Ok(items) => Incoming::Batch(
                items
                    .into_iter()
                    .map(|raw| match parse_request(raw) {
                        Ok(req) if req.attachment.is_some() => Err(Response::error(
                            req.id.unwrap_or_else(Id::null),
                            ErrorObject::new(
                                ErrorKind::InvalidParams,
                                "a request inside a batch cannot carry an attachment; \
                                 its bytes were discarded: send it on its own line",
                            ),
                        )),
                        entry => entry,
                    })
                    .collect(),
            ),
            Err(e) => Incoming::Single(Err(parse_error(&e))),
        }
    } else {
        match serde_json::from_slice::<&RawValue>(line) {
            Ok(raw) => Incoming::Single(parse_request(raw)),
            Err(e) => Incoming::Single(Err(parse_error(&e))),
        }
    }
}

fn parse_error(e: &serde_json::Error) -> Response {
    Response::error(
        Id::null(),
        ErrorObject::new(
            ErrorKind::ParseError,
            format!("message is not valid JSON: {e}"),
        ),
    )
}

fn invalid(id: Id, why: impl Into<String>) -> Response {
    Response::error(id, ErrorObject::new(ErrorKind::InvalidRequest, why))
}

/// Parses one request object.
fn parse_request(raw: &RawValue) -> Entry {
    if !raw.get().starts_with('{') {
        return Err(invalid(Id::null(), "a request must be a JSON object"));
    }
    let req: RawRequest = serde_json::from_str(raw.get())
        .map_err(|e| invalid(Id::null(), format!("malformed request: {e}")))?;
    // The id first, so that the other errors can be answered to it.
    let id = match &req.id {
        None => None,
        Some(raw_id) => Some(
            serde_json::from_str::<Id>(raw_id.get())
                .map_err(|_| invalid(Id::null(), "id must be a string, a number or null"))?,
        ),
    };
    let reply_id = || id.clone().unwrap_or_else(Id::null);
    match req.jsonrpc.as_deref().map(RawValue::get) {
        Some("\"2.0\"") => {}
        Some(other) => {
            return Err(invalid(
                reply_id(),
                format!("jsonrpc must be \"2.0\", got {other}"),
            ))
        }
        None => return Err(invalid(reply_id(), "the jsonrpc member is missing")),
    }
    let method = match req.method.as_deref() {
        Some(m) => serde_json::from_str::<String>(m.get())
            .map_err(|_| invalid(reply_id(), "method must be a string"))?,
        None => return Err(invalid(reply_id(), "the method member is missing")),
    };
    if let Some(p) = &req.params {
        let t = p.get();
        if !(t.starts_with('{') || t.starts_with('[') || t == "null") {
            return Err(invalid(reply_id(), "params must be an object"));
        }
    }
    let attachment = match &req.attachment {
        None => None,
        Some(raw) => Some(raw.get().parse::<u64>().map_err(|_| {
            invalid(
                reply_id(),
                "attachment must be the byte count of the data after the line (an integer >= 0)",
            )
        })?),
    };
    let attachment_crc32 = match &req.attachment_crc32 {
        None => None,
        Some(raw) => Some(raw.get().parse::<u32>().map_err(|_| {
            invalid(
                reply_id(),
                "attachment_crc32 must be the CRC-32 of the attachment (an integer from 0 to 4294967295)",
            )
        })?),
    };
    Ok(Request {
        id,
        method,
        params: req.params,
        attachment,
        attachment_crc32,
    })
}

/// What a line says about the raw bytes that follow it, read before (and
/// apart from) everything else about the line: the framing must stay in
/// step whatever else is wrong with the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announced {
    /// No attachment follows.
    Nothing,
    /// Exactly this many bytes follow.
    Bytes(u64),
    /// An attachment may follow but its length cannot be known: the
    /// `attachment` member is not an integer >= 0, appears more than once
    /// (in the object, or in more than one element of a batch), or the line
    /// is not JSON and holds the text `attachment`. The reader must drop its
    /// input up to the next resync byte.
    Unknown,
}

/// Finds the top-level `attachment` members of a line (of the object, or of
/// each object in a batch), however malformed the rest of the line is.
pub fn announced_attachment(line: &[u8]) -> Announced {
    match serde_json::from_slice::<Members<'_>>(line) {
        Ok(Members(found)) => match found.as_slice() {
            [] => Announced::Nothing,
            [raw] => raw
                .get()
                .parse::<u64>()
                .map_or(Announced::Unknown, Announced::Bytes),
            _ => Announced::Unknown,
        },
        Err(_) if memchr::memmem::find(line, b"attachment").is_some() => Announced::Unknown,
        Err(_) => Announced::Nothing,
    }
}

/// The raw values of the `attachment` members of a line's top-level
/// object(s), in order.
struct Members<'a>(Vec<&'a RawValue>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut found = Vec::new();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    if key == "attachment" {
                        found.push(value);
                    }
                }
                Ok(Members(found))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut found = Vec::new();
                while let Some(element) = seq.next_element::<&'de RawValue>()? {
                    if element.get().starts_with('{') {
                        if let Ok(Members(inner)) =
                            serde_json::from_str::<Members<'de>>(element.get())
                        {
                            found.extend(inner);
                        }
                    }
                }
                Ok(Members(found))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Members(Vec::new()))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Members(Vec::new()))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Members(Vec::new()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Members(Vec::new()))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Members(Vec::new()))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Members(Vec::new()))
            }
        }
        d.deserialize_any(Visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(line: &str) -> Entry {
        match parse_message(line.as_bytes()) {
            Incoming::Single(e) => e,
            Incoming::Batch(_) => panic!("expected a single message"),
        }
    }

    fn err_of(e: Entry) -> (String, i32) {
        let r = e.expect_err("expected an error reply");
        (r.id.as_raw().to_owned(), r.outcome.unwrap_err().code)
    }

    #[test]
    fn attachments_are_read_checked_and_refused_in_batches() {
        let m = parse_message(br#"{"jsonrpc":"2.0","method":"file_write","id":1,"attachment":42}"#);
        assert_eq!(m.attachment(), Some(42));
        for bad in ["-1", "1.5", "\"3\"", "null", "18446744073709551616"] {
            let line = format!(r#"{{"jsonrpc":"2.0","method":"x","id":7,"attachment":{bad}}}"#);
            let m = parse_message(line.as_bytes());
            assert_eq!(m.attachment(), None, "{bad}");
            assert_eq!(
                err_of(match m {
                    Incoming::Single(e) => e,
                    Incoming::Batch(_) => unreachable!(),
                }),
                ("7".to_owned(), -32600),
                "{bad}"
            );
        }
        // PROTOCOL.md: an attachment inside a batch is invalid_params.
        let m = parse_message(br#"[{"jsonrpc":"2.0","method":"x","id":3,"attachment":1}]"#);
        assert_eq!(m.attachment(), None);
        let Incoming::Batch(mut entries) = m else {
            panic!("expected a batch")
        };
        assert_eq!(err_of(entries.remove(0)), ("3".to_owned(), -32602));
    }

    #[test]
    fn the_announced_attachment_is_read_whatever_else_is_wrong() {
        use Announced::{Bytes, Nothing, Unknown};
        let cases: &[(&str, Announced)] = &[
            (r#"{"jsonrpc":"2.0","method":"ping","id":1}"#, Nothing),
            (
                r#"{"jsonrpc":"2.0","method":"w","id":1,"attachment":5}"#,
                Bytes(5),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"w","id":1,"attachment":0}"#,
                Bytes(0),
            ),
            (
                r#"{"jsonrpc":"1.0","method":"w","id":1,"attachment":5}"#,
                Bytes(5),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"w","id":true,"attachment":5}"#,
                Bytes(5),
            ),
            (
                r#"{"jsonrpc":"2.0","jsonrpc":"2.0","attachment":7}"#,
                Bytes(7),
            ),
            (r#"{"\u0061ttachment":3,"method":5}"#, Bytes(3)),
            (
                r#"[{"jsonrpc":"2.0","method":"w","id":1,"attachment":9},{}]"#,
                Bytes(9),
            ),
            (r#"[1,"attachment",{"params":{"attachment":4}}]"#, Nothing),
            (r#"{"params":{"attachment":4},"id":1}"#, Nothing),
            (r#"{"attachment":5,"attachment":5}"#, Unknown),
            (r#"[{"attachment":5},{"attachment":5}]"#, Unknown),
            (r#"{"attachment":"5"}"#, Unknown),
            (r#"{"attachment":-1}"#, Unknown),
            (r#"{"attachment":1.0}"#, Unknown),
            (r#"{"attachment":null}"#, Unknown),
            (r#"{"attachment":18446744073709551616}"#, Unknown),
            (r#"{"jsonrpc":"2.0","attachment":5"#, Unknown),
            (r#"{"jsonrpc":"2.0","method":"ping""#, Nothing),
            ("not json", Nothing),
            ("42", Nothing),
            (r#""attachment""#, Nothing),
        ];
        for (line, want) in cases {
            assert_eq!(announced_attachment(line.as_bytes()), *want, "{line}");
        }
    }

    #[test]
    fn long_batches_are_refused_whole() {
        let one = r#"{"jsonrpc":"2.0","method":"ping","id":1}"#;
        let line = format!("[{}]", vec![one; crate::MAX_BATCH_LEN].join(","));
        assert!(
            matches!(parse_message(line.as_bytes()), Incoming::Batch(b) if b.len() == crate::MAX_BATCH_LEN)
        );
        let line = format!("[{}]", vec![one; crate::MAX_BATCH_LEN + 1].join(","));
        assert_eq!(err_of(single(&line)), ("null".to_owned(), -32600));
    }

    #[test]
    fn the_check_value_is_read_and_checked_for_range() {
        let r = single(
            r#"{"jsonrpc":"2.0","method":"w","id":1,"attachment":1,"attachment_crc32":4294967295}"#,
        )
        .unwrap();
        assert_eq!(r.attachment_crc32, Some(u32::MAX));
        for bad in ["4294967296", "-1", "\"1\"", "null"] {
            let line = format!(
                r#"{{"jsonrpc":"2.0","method":"w","id":2,"attachment":1,"attachment_crc32":{bad}}}"#
            );
            assert_eq!(err_of(single(&line)), ("2".to_owned(), -32600), "{bad}");
        }
        let (params, id) = (serde_json::json!({}), Id::number(1));
        let req = OutgoingRequest::new("w", &params, &id).with_attachment(b"abc");
        let text = serde_json::to_string(&req).unwrap();
        assert!(
            text.ends_with(r#""attachment":3,"attachment_crc32":891568578}"#),
            "{text}"
        );
    }

    #[test]
    fn responses_carry_their_attachment_length() {
        let mut r = Response::ok(Id::number(5), &serde_json::json!({"eof": true}));
        r.attachment = Some(3);
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"jsonrpc":"2.0","result":{"eof":true},"id":5,"attachment":3}"#
        );
        assert_eq!(parse_response(text.as_bytes()).unwrap().attachment, Some(3));
        let e = parse_response(
            br#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"m"},"id":5,"attachment":3}"#,
        );
        assert!(matches!(e, Err(ResponseParseError::AttachmentOnError)));
    }

    #[test]
    fn a_valid_request_parses() {
        let r = single(r#"{"jsonrpc":"2.0","method":"ping","id":1}"#).unwrap();
        assert_eq!(r.method, "ping");
        assert_eq!(r.id.unwrap().as_u64(), Some(1));
    }

    #[test]
    fn ids_are_echoed_exactly() {
        for id in [
            r#""abc""#,
            "1.50",
            "-7",
            "1e3",
            "18446744073709551615999",
            "null",
        ] {
            let line = format!(r#"{{"jsonrpc":"2.0","method":"ping","id":{id}}}"#);
            let r = single(&line).unwrap();
            let resp = Response::ok(r.id.unwrap(), &serde_json::json!({}));
            let text = serde_json::to_string(&resp).unwrap();
            assert!(text.ends_with(&format!(r#""id":{id}}}"#)), "{text}");
        }
    }

    #[test]
    fn a_request_without_id_is_a_notification() {
        let r = single(r#"{"jsonrpc":"2.0","method":"ping"}"#).unwrap();
        assert!(r.id.is_none());
    }

    #[test]
    fn malformed_input_gets_the_right_code() {
        let cases: &[(&str, &str, i32)] = &[
            ("{", "null", -32700),
            ("not json", "null", -32700),
            ("[]", "null", -32600),
            ("42", "null", -32600),
            (r#"{"jsonrpc":"1.0","method":"ping","id":3}"#, "3", -32600),
            (r#"{"method":"ping","id":"a"}"#, "\"a\"", -32600),
            (r#"{"jsonrpc":"2.0","method":5,"id":4}"#, "4", -32600),
            (r#"{"jsonrpc":"2.0","id":4}"#, "4", -32600),
            (
                r#"{"jsonrpc":"2.0","method":"ping","id":{}}"#,
                "null",
                -32600,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"ping","id":true}"#,
                "null",
                -32600,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"ping","params":3,"id":9}"#,
                "9",
                -32600,
            ),
            (
                r#"{"jsonrpc":"2.0","jsonrpc":"2.0","method":"ping","id":9}"#,
                "null",
                -32600,
            ),
        ];
        for (line, id, code) in cases {
            assert_eq!(err_of(single(line)), (id.to_string(), *code), "{line}");
        }
    }

    #[test]
    fn batches_keep_order_and_sort_good_from_bad() {
        let line = r#"[{"jsonrpc":"2.0","method":"a","id":1}, 1, {"jsonrpc":"2.0","method":"b"}]"#;
        let Incoming::Batch(items) = parse_message(line.as_bytes()) else {
            panic!("expected a batch")
        };
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].as_ref().unwrap().method, "a");
        assert!(items[1].is_err());
        assert!(items[2].as_ref().unwrap().id.is_none());
    }

    #[test]
    fn deeply_nested_json_is_a_parse_error_not_a_crash() {
        let line = "[".repeat(100_000);
        match parse_message(line.as_bytes()) {
            Incoming::Single(e) => assert_eq!(err_of(e).1, -32700),
            Incoming::Batch(_) => panic!("expected a parse error"),
        }
        let line = format!(
            r#"{{"jsonrpc":"2.0","method":"ping","params":{}1{},"id":1}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        // The envelope skips over params without recursing; decoding them
        // into typed params then fails cleanly.
        let r = single(&line).expect("the envelope is valid");
        assert_eq!(r.params::<serde_json::Value>().unwrap_err().code, -32602);
    }

    #[test]
    fn typed_params_reject_arrays_and_accept_absent() {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct P {
            #[serde(default)]
            n: u32,
        }
        let r = single(r#"{"jsonrpc":"2.0","method":"m","id":1}"#).unwrap();
        assert_eq!(r.params::<P>().unwrap().n, 0);
        let r = single(r#"{"jsonrpc":"2.0","method":"m","params":[1],"id":1}"#).unwrap();
        assert_eq!(r.params::<P>().unwrap_err().code, -32602);
        let r = single(r#"{"jsonrpc":"2.0","method":"m","params":{"x":1},"id":1}"#).unwrap();
        assert_eq!(r.params::<P>().unwrap_err().code, -32602);
        let r = single(r#"{"jsonrpc":"2.0","method":"m","params":{"n":-1},"id":1}"#).unwrap();
        assert_eq!(r.params::<P>().unwrap_err().code, -32602);
    }

    #[test]
    fn responses_round_trip() {
        let ok = Response::ok(Id::number(7), &serde_json::json!({"pong": true}));
        let line = serde_json::to_vec(&ok).unwrap();
        let back = parse_response(&line).unwrap();
        assert_eq!(back.id.as_u64(), Some(7));
        let v: serde_json::Value = back.into_result().unwrap();
        assert_eq!(v["pong"], true);

        let err = Response::error(Id::string("x"), ErrorObject::new(ErrorKind::Busy, "busy"));
        let line = serde_json::to_vec(&err).unwrap();
        let back = parse_response(&line).unwrap();
        assert_eq!(back.id, Id::string("x"));
        match back.into_result::<serde_json::Value>() {
            Err(ResponseError::Agent(e)) => assert_eq!(e.kind(), Some(ErrorKind::Busy)),
            other => panic!("{other:?}"),
        }
        assert!(parse_response(br#"{"jsonrpc":"2.0","id":1}"#).is_err());
        assert!(parse_response(br#"{"jsonrpc":"1.0","result":1,"id":1}"#).is_err());
    }
}
