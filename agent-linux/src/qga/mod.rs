//! The QEMU guest agent's protocol (qemu-ga), a second envelope over the
//! core (ARCHITECTURE.md, "The seam for a second dialect").
//!
//! Served on its own port (`qemu_ga_channel_name`, usually
//! `org.qemu.guest_agent.0`) or a Unix socket (`--listen qga:unix:PATH`),
//! so libvirt, Proxmox and KubeVirt talk to this agent as they talk to
//! qemu-ga. Requests are JSON objects `{"execute": NAME, "arguments": {..},
//! "id": ..}` (`framing`); replies `{"return": ..}` or `{"error":
//! {"class": .., "desc": ..}}`, with the request's `id` when it had one,
//! written as qemu-ga writes them (`": "` and `", "` between members).
//! Commands run one after the other, in order, as qemu-ga runs them; each
//! maps onto a core method (`commands`).

mod commands;
mod framing;
mod owner;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

pub use commands::QgaState;

/// The names of every qemu-ga command the dialect serves.
pub(crate) fn command_names() -> impl Iterator<Item = &'static str> {
    commands::COMMANDS.iter().map(|(name, _, _)| *name)
}
use commands::{QgaError, Reply};
use framing::{Piece, Splitter, RESET};
pub use owner::QEMU_GA_PORT;
pub(crate) use owner::{Gate, Owner};

use crate::dispatch::Agent;
use crate::session::Session;

/// Serves one qemu-ga connection until its input ends, it fails, or `stop`
/// is cancelled.
pub async fn serve<R, W>(
    agent: Arc<Agent>,
    state: Arc<QgaState>,
    mut reader: R,
    mut writer: W,
    stop: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let id = crate::server::next_session_id();
    debug!(session = id.0, "qemu-ga session started");
    let session = Arc::new(Session::detached(id));
    let write_timeout = agent.config().request_timeout.max(Duration::from_secs(30));
    let mut splitter = Splitter::new(agent.config().max_message_size);
    let mut buf = vec![0u8; 64 * 1024];
    let mut pieces = Vec::new();
    'session: loop {
        let n = tokio::select! {
            () = stop.cancelled() => break,
            r = reader.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    warn!(session = id.0, error = %e, "reading from the host failed");
                    break;
                }
            },
        };
        splitter.feed(&buf[..n], &mut pieces);
        for piece in pieces.drain(..) {
            let (bytes, reply) = handle(&agent, &state, &session, piece).await;
            let Some(bytes) = bytes else {
                // No reply owed (guest-shutdown): the action starts now.
                if let Some(action) = reply.after {
                    info!(?action, "power action requested through qemu-ga");
                    tokio::spawn(action.run());
                }
                continue;
            };
            let write = async {
                writer.write_all(&bytes).await?;
                writer.flush().await
            };
            match tokio::time::timeout(write_timeout, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(error = %e, "writing a reply failed; ending the session");
                    break 'session;
                }
                Err(_) => {
                    warn!(
                        seconds = write_timeout.as_secs(),
                        "the host has not read replies for too long; ending the session"
                    );
                    break 'session;
                }
            }
            drop(reply.slot);
            if let Some(action) = reply.after {
                info!(?action, "reply sent; starting the power action");
                tokio::spawn(action.run());
            }
        }
    }
    session.end();
    agent.end_session(id);
    debug!(session = id.0, "qemu-ga session ended");
}

/// One piece of input: the bytes to write (`None`: nothing owed) and what
/// the reply holds.
async fn handle(
    agent: &Arc<Agent>,
    state: &Arc<QgaState>,
    session: &Arc<Session>,
    piece: Piece,
) -> (Option<Vec<u8>>, Reply) {
    let refuse = |desc: String| Reply {
        result: Err(QgaError::generic(desc)),
        after: None,
        slot: None,
    };
    let object = match piece {
        Piece::Object(bytes) => bytes,
        Piece::Oversized => {
            warn!(
                limit = agent.config().max_message_size,
                "discarded an oversized qemu-ga request"
            );
            let r = refuse(format!(
                "JSON parse error, the request is longer than {} bytes (max_message_size_kb)",
                agent.config().max_message_size
            ));
            return (Some(encode(None, false, &r)), r);
        }
        Piece::Reset(token) => {
            let r = refuse(format!(
                "JSON parse error, stray '{}\u{FFFD}'",
                String::from_utf8_lossy(&token)
            ));
            return (Some(encode(None, false, &r)), r);
        }
        Piece::Junk(bytes) => {
            let r = refuse(format!(
                "JSON parse error, invalid keyword '{}'",
                String::from_utf8_lossy(&bytes)
            ));
            return (Some(encode(None, false, &r)), r);
        }
    };
    let request: Map<String, Value> = match serde_json::from_slice(&object) {
        Ok(m) => m,
        Err(e) => {
            let r = refuse(format!("JSON parse error, {e}"));
            return (Some(encode(None, false, &r)), r);
        }
    };
    let id = request.get("id").cloned();
    let (name, args) = match parse_request(&request) {
        Ok(x) => x,
        Err(e) => {
            let r = Reply {
                result: Err(e),
                after: None,
                slot: None,
            };
            return (Some(encode(id.as_ref(), false, &r)), r);
        }
    };
    let span = info_span!("qga", command = %name);
    let reply = commands::execute(agent, state, session, &name, &args)
        .instrument(span)
        .await;
    let delimited = name == "guest-sync-delimited";
    match &reply.result {
        Ok(None) => (None, reply),
        _ => (Some(encode(id.as_ref(), delimited, &reply)), reply),
    }
}

/// The command name and arguments of a request object, checked as qemu-ga
/// checks them.
fn parse_request(request: &Map<String, Value>) -> Result<(String, Map<String, Value>), QgaError> {
    if let Some(k) = request
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id"))
    {
        return Err(QgaError::generic(format!(
            "QMP input member '{k}' is unexpected"
        )));
    }
    let name = match request.get("execute") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(QgaError::generic(
                "QMP input member 'execute' must be a string",
            ))
        }
        None => return Err(QgaError::generic("QMP input lacks member 'execute'")),
    };
    let args = match request.get("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(QgaError::generic(
                "QMP input member 'arguments' must be an object",
            ))
        }
    };
    Ok((name, args))
}

/// Encodes a reply as qemu-ga does: `return` or `error` first, then the
/// `id`; `0xFF` first for `guest-sync-delimited`.
fn encode(id: Option<&Value>, delimited: bool, reply: &Reply) -> Vec<u8> {
    let mut out = Vec::new();
    if delimited {
        out.push(RESET);
    }
    let (key, value) = match &reply.result {
        Ok(v) => ("return", v.clone().unwrap_or(Value::Null)),
        Err(e) => (
            "error",
            serde_json::json!({"class": e.class, "desc": e.desc}),
        ),
    };
    let mut members = vec![(key, value)];
    if let Some(id) = id {
        members.push(("id", id.clone()));
    }
    out.push(b'{');
    for (i, (k, v)) in members.into_iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.push(b'"');
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"\": ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, QmpFormatter);
        // Invariant: a Value always serialises into a Vec.
        let _ = v.serialize(&mut ser);
    }
    out.extend_from_slice(b"}\n");
    out
}

/// serde_json's compact output with qemu-ga's separators (`": "` and
/// `", "`) and, as qemu-ga, ASCII only: other characters as `\uXXXX`.
struct QmpFormatter;

impl serde_json::ser::Formatter for QmpFormatter {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        // ASCII (base64 file contents, most text) in one piece.
        if fragment.is_ascii() {
            return writer.write_all(fragment.as_bytes());
        }
        for c in fragment.chars() {
            if c.is_ascii() {
                writer.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04X}")?;
                }
            }
        }
        Ok(())
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replies_are_written_as_qemu_ga_writes_them() {
        let ok = Reply {
            result: Ok(Some(json!({"a": [1, 2], "b": {}}))),
            after: None,
            slot: None,
        };
        assert_eq!(
            encode(Some(&json!("x")), false, &ok),
            b"{\"return\": {\"a\": [1, 2], \"b\": {}}, \"id\": \"x\"}\n".to_vec()
        );
        assert_eq!(encode(None, true, &ok)[0], 0xFF);
        let text = Reply {
            result: Ok(Some(json!("é😀\""))),
            after: None,
            slot: None,
        };
        assert_eq!(
            encode(None, false, &text),
            b"{\"return\": \"\\u00E9\\uD83D\\uDE00\\\"\"}\n".to_vec()
        );
        let err = Reply {
            result: Err(QgaError::generic("Parameter 'x' is unexpected")),
            after: None,
            slot: None,
        };
        assert_eq!(
            encode(None, false, &err),
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'x' is unexpected\"}}\n".to_vec()
        );
    }

    #[test]
    fn request_members_are_checked() {
        let cases = [
            (json!({"execute": "guest-ping"}), Ok("guest-ping")),
            (
                json!({"foo": 1}),
                Err("QMP input member 'foo' is unexpected"),
            ),
            (json!({"id": 1}), Err("QMP input lacks member 'execute'")),
            (
                json!({"execute": 1}),
                Err("QMP input member 'execute' must be a string"),
            ),
            (
                json!({"execute": "x", "arguments": []}),
                Err("QMP input member 'arguments' must be an object"),
            ),
        ];
        for (input, want) in cases {
            let got = parse_request(input.as_object().unwrap());
            match want {
                Ok(name) => assert_eq!(got.unwrap().0, name),
                Err(desc) => assert_eq!(got.unwrap_err().desc, desc, "{input}"),
            }
        }
    }
}
