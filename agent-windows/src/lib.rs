//! kvmmanager-agent for Windows guests: a stub that speaks the protocol.
//!
//! It serves `ping`, `sync` and `get_agent_info` and answers every other
//! method of the protocol with `not_supported`, so a host can already find,
//! synchronise with and identify a Windows guest. The dispatcher and the
//! synchronous line loop ([`serve`]) are platform-neutral and tested on
//! Linux (the binary's `--stdio` mode); the service entry point and the
//! virtio-serial port are behind `cfg(windows)` in `service`.
#![deny(missing_docs)]

use std::io::{self, Read, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use agent_common::codec::{CodecError, Frame, JsonLinesCodec};
use agent_common::envelope;
use agent_common::error::{ErrorKind, ErrorObject};
use agent_common::jsonrpc::{parse_message, Announced, Entry, Id, Incoming, Request, Response};
use agent_common::methods::{AgentInfo, Empty, Limits, Method, PingResult, SyncParams, SyncResult};
use bytes::BytesMut;
use tokio_util::codec::Decoder;

#[cfg(windows)]
pub mod service;

/// The virtio-serial port as Windows names it (vioser driver).
pub const WINDOWS_PORT_PATH: &str = r"\\.\Global\org.kvmmanager.agent.0";

/// Agent program name reported by `get_agent_info`.
pub const AGENT_NAME: &str = "kvmmanager-agent";

/// Platform reported by `get_agent_info`.
pub const PLATFORM: &str = "windows";

/// Methods this build serves; every other one answers `not_supported`.
pub const SERVED: &[Method] = &[Method::Ping, Method::Sync, Method::GetAgentInfo];

/// Default request limit, `max_message_size_kb` = 64.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024;

/// Answers requests. Holds the limits reported by `get_agent_info`.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    limits: Limits,
}

impl Default for Dispatcher {
    fn default() -> Dispatcher {
        Dispatcher {
            limits: Limits {
                max_message_size: DEFAULT_MAX_MESSAGE_SIZE as u64,
                max_response_size: agent_common::MAX_RESPONSE_SIZE as u64,
                max_read_chunk: agent_common::MAX_READ_CHUNK,
                max_file_size: 10 * 1024 * 1024,
                max_exec_output: agent_common::MAX_EXEC_OUTPUT,
                max_command_timeout_seconds: 300,
                request_timeout_seconds: 30,
                max_concurrent_requests: 10,
                // No attachments yet: the host uses base64.
                max_attachment_size: 0,
                // Not reported until the Windows agent contains commands
                // (a job object) and says so.
                command_containment: None,
                command_memory_max: None,
                command_max_processes: None,
                freeze_timeout_seconds: None,
            },
        }
    }
}

/// What goes back for one incoming line: the envelope's reply line,
/// shared with the Linux agent (`agent_common::envelope`).
pub use agent_common::envelope::ReplyLine as Reply;

impl Dispatcher {
    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Handles one request line; `None` when nothing is owed (notifications).
    pub fn handle_line(&self, line: &[u8]) -> Option<Reply> {
        match parse_message(line) {
            Incoming::Single(entry) => {
                let sync = envelope::is_sync(&entry);
                Reply::single(sync, self.handle_entry(entry))
            }
            Incoming::Batch(entries) => {
                Reply::batch(entries.into_iter().map(|e| self.handle_entry(e)))
            }
        }
    }

    /// The reply owed for an oversized line.
    pub fn oversized(&self) -> Reply {
        Reply::Single {
            response: envelope::oversized(self.limits.max_message_size),
            sync: false,
        }
    }

    fn handle_entry(&self, entry: Entry) -> Option<Response> {
        match entry {
            Err(reply) => Some(reply),
            Ok(req) => {
                let outcome = self.dispatch(&req);
                let id = req.id?;
                Some(match outcome {
                    Ok(r) => r.into_response(id),
                    Err(e) => Response::error(id, e),
                })
            }
        }
    }

    /// The one match from method to handler.
    pub fn dispatch(&self, req: &Request) -> Result<Outcome, ErrorObject> {
        let method = Method::from_name(&req.method).ok_or_else(|| {
            ErrorObject::new(
                ErrorKind::MethodNotFound,
                format!("no method named {}", req.method),
            )
        })?;
        match method {
            Method::Ping => {
                req.params::<Empty>()?;
                Ok(Outcome::Ping(PingResult {
                    pong: true,
                    timestamp: unix_now(),
                }))
            }
            Method::Sync => {
                let p: SyncParams = req.params()?;
                Ok(Outcome::Sync(SyncResult { nonce: p.nonce }))
            }
            Method::GetAgentInfo => {
                req.params::<Empty>()?;
                Ok(Outcome::AgentInfo(Box::new(self.agent_info())))
            }
            other => Err(ErrorObject::new(
                ErrorKind::NotSupported,
                format!("{other} is not supported on this platform yet"),
            )
            .with_data("method", other.as_str())),
        }
    }

    /// The `get_agent_info` result.
    pub fn agent_info(&self) -> AgentInfo {
        AgentInfo {
            name: AGENT_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: agent_common::PROTOCOL_VERSION,
            platform: PLATFORM.into(),
            methods: SERVED.iter().map(|m| m.as_str().to_owned()).collect(),
            disabled_methods: Vec::new(),
            limits: self.limits.clone(),
        }
    }
}

/// A typed result of a served method.
#[derive(Debug)]
pub enum Outcome {
    /// `ping`.
    Ping(PingResult),
    /// `sync`.
    Sync(SyncResult),
    /// `get_agent_info`.
    AgentInfo(Box<AgentInfo>),
}

impl Outcome {
    fn into_response(self, id: Id) -> Response {
        match self {
            Outcome::Ping(r) => Response::ok(id, &r),
            Outcome::Sync(r) => Response::ok(id, &r),
            Outcome::AgentInfo(r) => Response::ok(id, &*r),
        }
    }
}

fn unix_now() -> u64 {
    // A clock before 1970 reads as 0 rather than failing a ping.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why [`serve`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reading from the channel failed.
    #[error("could not read from the channel")]
    Read(#[source] io::Error),
    /// Writing to the channel failed.
    #[error("could not write to the channel")]
    Write(#[source] io::Error),
    /// A reply could not be encoded.
    #[error("could not encode a reply")]
    Encode(#[source] CodecError),
}

/// Serves requests read from `input` until end of stream, one at a time,
/// writing each reply line to `output` as soon as it is ready.
pub fn serve<R: Read, W: Write>(
    dispatcher: &Dispatcher,
    mut input: R,
    mut output: W,
) -> Result<(), ServeError> {
    let max = usize::try_from(dispatcher.limits().max_message_size).unwrap_or(usize::MAX);
    let mut codec = JsonLinesCodec::new(max);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ServeError::Read(e)),
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let frame = if n == 0 {
                codec.decode_eof(&mut buf)
            } else {
                codec.decode(&mut buf)
            };
            let reply = match frame {
                Ok(Some(Frame::Line(line))) => {
                    // This agent takes no attachments, but must step over
                    // one to stay in step with the stream (PROTOCOL.md,
                    // "Attachments"): a known length is skipped, an unknown
                    // one drops the input up to the next resync byte.
                    match agent_common::jsonrpc::announced_attachment(&line) {
                        Announced::Nothing => {}
                        Announced::Bytes(len) => codec.skip_attachment(len),
                        Announced::Unknown => codec.discard_until_resync(),
                    }
                    dispatcher.handle_line(&line)
                }
                Ok(Some(Frame::Oversized)) => {
                    // The line may have announced an attachment.
                    codec.discard_until_resync();
                    Some(dispatcher.oversized())
                }
                // Never returned: attachments are skipped above.
                Ok(Some(Frame::Attachment(_))) => None,
                Ok(None) => break,
                Err(CodecError::Io(e)) => return Err(ServeError::Read(e)),
                Err(e) => return Err(ServeError::Encode(e)),
            };
            if let Some(reply) = reply {
                let (out, _) = reply.encode();
                output.write_all(&out).map_err(ServeError::Write)?;
                output.flush().map_err(ServeError::Write)?;
            }
        }
        if n == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::jsonrpc::parse_response;
    use serde_json::Value;

    fn call(line: &str) -> Response {
        match Dispatcher::default().handle_line(line.as_bytes()) {
            Some(Reply::Single { response, .. }) => response,
            other => panic!("expected one reply to {line}, got {other:?}"),
        }
    }

    fn error_kind(r: &Response) -> Option<ErrorKind> {
        r.outcome.as_ref().err().and_then(ErrorObject::kind)
    }

    #[test]
    fn every_method_answers_a_result_or_not_supported() {
        for (i, m) in Method::ALL.iter().enumerate() {
            let line = format!(r#"{{"jsonrpc":"2.0","method":"{m}","id":{i}}}"#);
            let r = call(&line);
            assert_eq!(r.id.as_u64(), Some(i as u64), "{m}");
            match (SERVED.contains(m), &r.outcome) {
                (true, Ok(_)) if *m != Method::Sync => {}
                // sync without a nonce is a params error, tested below.
                (true, Err(e)) if *m == Method::Sync => assert_eq!(e.code, -32602),
                (false, Err(e)) => {
                    assert_eq!(e.kind(), Some(ErrorKind::NotSupported), "{m}");
                    assert_eq!(e.code, -32008);
                    assert!(e.message.contains("not supported on this platform"));
                }
                (served, outcome) => panic!("{m}: served={served}, got {outcome:?}"),
            }
        }
    }

    #[test]
    fn served_methods_return_their_results() {
        let cases: &[(&str, &str)] = &[
            (r#"{"jsonrpc":"2.0","method":"ping","id":1}"#, "pong"),
            (
                r#"{"jsonrpc":"2.0","method":"sync","params":{"nonce":18446744073709551615},"id":2}"#,
                "nonce",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"get_agent_info","id":3}"#,
                "limits",
            ),
        ];
        for (line, key) in cases {
            let r = call(line);
            let v: Value = r.into_result().expect("a result");
            assert!(v.get(key).is_some(), "{line}: {v}");
        }
        let r = call(cases[1].0);
        let v: SyncResult = r.into_result().expect("a sync result");
        assert_eq!(v.nonce, u64::MAX);
        let info: AgentInfo = call(cases[2].0).into_result().expect("agent info");
        assert_eq!(info.platform, "windows");
        assert_eq!(info.protocol_version, agent_common::PROTOCOL_VERSION);
        assert_eq!(info.methods, ["ping", "sync", "get_agent_info"]);
        assert_eq!(info.limits.max_message_size, 65536);
    }

    #[test]
    fn ids_are_echoed_byte_for_byte() {
        for id in [
            r#""abc""#,
            "1.50",
            "-7",
            "0",
            "null",
            "18446744073709551616",
        ] {
            let line = format!(r#"{{"jsonrpc":"2.0","method":"ping","id":{id}}}"#);
            assert_eq!(call(&line).id.as_raw(), id);
            let line = format!(r#"{{"jsonrpc":"2.0","method":"exec_command","id":{id}}}"#);
            assert_eq!(call(&line).id.as_raw(), id);
        }
    }

    #[test]
    fn protocol_errors_get_their_codes() {
        let cases: &[(&str, ErrorKind)] = &[
            ("{", ErrorKind::ParseError),
            ("[]", ErrorKind::InvalidRequest),
            (
                r#"{"jsonrpc":"1.0","method":"ping","id":1}"#,
                ErrorKind::InvalidRequest,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"guest-ping","id":1}"#,
                ErrorKind::MethodNotFound,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"ping","params":{"x":1},"id":1}"#,
                ErrorKind::InvalidParams,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"sync","params":[1],"id":1}"#,
                ErrorKind::InvalidParams,
            ),
        ];
        for (line, kind) in cases {
            assert_eq!(error_kind(&call(line)), Some(*kind), "{line}");
        }
    }

    #[test]
    fn notifications_get_no_reply_and_batches_omit_them() {
        let d = Dispatcher::default();
        assert!(d
            .handle_line(br#"{"jsonrpc":"2.0","method":"ping"}"#)
            .is_none());
        assert!(d
            .handle_line(br#"{"jsonrpc":"2.0","method":"reboot"}"#)
            .is_none());
        assert!(d
            .handle_line(br#"[{"jsonrpc":"2.0","method":"ping"},{"jsonrpc":"2.0","method":"x"}]"#)
            .is_none());
        let line = br#"[{"jsonrpc":"2.0","method":"ping","id":"a"},{"jsonrpc":"2.0","method":"ping"},{"jsonrpc":"2.0","method":"file_read","id":"b"}]"#;
        let Some(Reply::Batch(replies)) = d.handle_line(line) else {
            panic!("expected a batch reply")
        };
        let ids: Vec<&str> = replies.iter().map(|r| r.id.as_raw()).collect();
        assert_eq!(ids, [r#""a""#, r#""b""#]);
        assert_eq!(error_kind(&replies[1]), Some(ErrorKind::NotSupported));
    }

    #[test]
    fn serve_answers_lines_resyncs_and_survives_oversize() {
        let mut input = Vec::new();
        input.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"method\":\"pi");
        input.push(agent_common::RESYNC_BYTE);
        input.extend_from_slice(
            b"{\"jsonrpc\":\"2.0\",\"method\":\"sync\",\"params\":{\"nonce\":7},\"id\":1}\r\n\n",
        );
        input.extend(std::iter::repeat_n(b' ', DEFAULT_MAX_MESSAGE_SIZE + 10));
        input.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"method\":\"shutdown\",\"id\":2}\n");
        // Dropped: after an oversized line, input up to the next 0xFF is.
        input.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":9}\n");
        input.push(agent_common::RESYNC_BYTE);
        input.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":3}\n{\"partial");
        let mut output = Vec::new();
        serve(&Dispatcher::default(), &input[..], &mut output).expect("serve");
        let lines: Vec<&[u8]> = output
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 3, "{}", String::from_utf8_lossy(&output));
        let sync: SyncResult = parse_response(lines[0]).unwrap().into_result().unwrap();
        assert_eq!(sync.nonce, 7);
        // The oversized line (which ended in a shutdown request) is refused whole.
        let too_big = parse_response(lines[1]).unwrap();
        assert!(too_big.id.is_null());
        assert_eq!(error_kind(&too_big), Some(ErrorKind::MessageTooLarge));
        let ping = parse_response(lines[2]).unwrap();
        assert_eq!(ping.id.as_u64(), Some(3));
        assert!(ping.into_result::<PingResult>().unwrap().pong);
    }
}
