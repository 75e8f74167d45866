// The properties the fuzz targets assert, one function per target. This file
// is also `include!`d by `agent-common/tests/fuzz_regressions.rs`, so keep it
// free of anything but agent-common, bytes, serde_json and tokio-util.

use agent_common::codec::{Frame, JsonLinesCodec};
use agent_common::error::ErrorKind;
use agent_common::jsonrpc::{parse_message, parse_response, Entry, Incoming, Response};
use agent_common::methods::{
    DiskUsageParams, Empty, ExecParams, FileReadParams, FileWriteParams, PowerParams, SyncParams,
};
use agent_common::RESYNC_BYTE;
use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// Decodes `pieces` one after the other with a fresh codec, then ends the
/// stream. A line starting with `@` announces an attachment as long as the
/// line, taken; one starting with `!` an attachment as long as the line,
/// skipped (as a reader that parsed such a line would).
fn decode_pieces(max: usize, pieces: &[&[u8]]) -> Vec<Frame> {
    let mut codec = JsonLinesCodec::new(max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        while let Some(f) = codec.decode(&mut buf).expect("decoding never fails") {
            if let Frame::Line(l) = &f {
                match l.first() {
                    Some(b'@') => codec.expect_attachment(l.len()),
                    Some(b'!') => codec.skip_attachment(l.len() as u64),
                    _ => {}
                }
            }
            frames.push(f);
        }
    }
    while let Some(f) = codec.decode_eof(&mut buf).expect("decoding never fails") {
        frames.push(f);
    }
    frames
}

/// Codec target. `data[0]` picks the maximum line length (1..=64), `data[1]`
/// and `data[2]` two split points; the rest is the input. Checks that frames
/// are bounded, hold no newline or 0xFF, attachments have the announced
/// length, and that none of it depends on how the input was split into reads
/// (whole, at two points, one byte at a time).
pub fn check_codec(data: &[u8]) {
    let [a, b, c, input @ ..] = data else {
        return;
    };
    let max = 1 + usize::from(*a) % 64;
    let whole = decode_pieces(max, &[input]);
    let mut announced = None;
    for frame in &whole {
        if let Frame::Attachment(data) = frame {
            assert_eq!(Some(data.len()), announced.take(), "attachment length");
        }
        announced = match frame {
            Frame::Line(l) if l.first() == Some(&b'@') => Some(l.len()),
            _ => None,
        };
        if let Frame::Line(line) = frame {
            assert!(line.len() <= max, "line of {} > max {max}", line.len());
            assert!(!line.contains(&b'\n'), "newline in a frame");
            assert!(!line.contains(&RESYNC_BYTE), "0xFF in a frame");
            assert!(
                !line.iter().all(u8::is_ascii_whitespace),
                "blank lines are skipped"
            );
        }
    }
    let (i, j) = {
        let n = input.len() + 1;
        let (x, y) = (usize::from(*b) * n / 256, usize::from(*c) * n / 256);
        (x.min(y), x.max(y))
    };
    let split = decode_pieces(max, &[&input[..i], &input[i..j], &input[j..]]);
    same_frames(&whole, &split, input, &format!("split at {i},{j}"));
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    let trickle = decode_pieces(max, &bytes);
    same_frames(&whole, &trickle, input, "byte-at-a-time reads");
}

/// The lines must not depend on how reads split the input. `Oversized` is
/// reported as soon as more than `max` bytes of one line are buffered, so a
/// 0xFF that cancels an over-long partial line may come before (whole input)
/// or after (small reads) that report: smaller reads can only add reports,
/// at most one per 0xFF.
fn same_frames(whole: &[Frame], split: &[Frame], input: &[u8], how: &str) {
    let lines = |frames: &[Frame]| -> Vec<Vec<u8>> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Line(l) => Some(l.to_vec()),
                Frame::Attachment(a) => Some([b"attachment:".as_slice(), a].concat()),
                Frame::Oversized => None,
            })
            .collect()
    };
    let oversized = |frames: &[Frame]| frames.iter().filter(|f| **f == Frame::Oversized).count();
    assert_eq!(lines(whole), lines(split), "{how} changed the lines");
    let resyncs = input.iter().filter(|&&b| b == RESYNC_BYTE).count();
    let (w, s) = (oversized(whole), oversized(split));
    assert!(
        w <= s && s <= w + resyncs,
        "{how}: {s} oversized reports, whole input {w}, {resyncs} resync bytes"
    );
}

/// Serialises `resp` as the agent would and parses it back as the host does.
fn round_trip(resp: &Response) {
    let line = serde_json::to_vec(resp).expect("a response serialises");
    assert!(!line.contains(&b'\n'), "a response must fit on one line");
    let back = parse_response(&line).expect("the agent's own reply parses");
    assert_eq!(
        back.id.as_raw(),
        resp.id.as_raw(),
        "id not echoed byte for byte"
    );
    match (&back.outcome, &resp.outcome) {
        (Ok(a), Ok(b)) => assert_eq!(a.get(), b.get()),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("result and error swapped in a round trip"),
    }
}

fn check_entry(entry: Entry) {
    match entry {
        Err(resp) => {
            let err = resp
                .outcome
                .as_ref()
                .expect_err("parse_message only builds error replies");
            let kind = ErrorKind::from_code(err.code).expect("a known error code");
            assert!(
                matches!(kind, ErrorKind::ParseError | ErrorKind::InvalidRequest),
                "parse_message answered {kind}"
            );
            assert_eq!(err.kind(), Some(kind), "data.kind disagrees with code");
            round_trip(&resp);
        }
        Ok(req) => {
            // Typed params either decode or are an invalid_params error.
            let codes = [
                req.params::<Empty>().err(),
                req.params::<SyncParams>().err(),
                req.params::<DiskUsageParams>().err(),
                req.params::<ExecParams>().err(),
                req.params::<FileReadParams>().err(),
                req.params::<FileWriteParams>().err(),
                req.params::<PowerParams>().err(),
            ];
            for e in codes.into_iter().flatten() {
                assert_eq!(e.kind(), Some(ErrorKind::InvalidParams), "{e}");
            }
            if let Some(id) = req.id {
                round_trip(&Response::ok(
                    id.clone(),
                    &serde_json::json!({"pong": true}),
                ));
                let err = agent_common::error::ErrorObject::new(ErrorKind::Busy, "busy");
                round_trip(&Response::error(id, err));
            }
        }
    }
}

/// JSON-RPC target: `parse_message` on arbitrary bytes. Malformed input gives
/// a parse error or invalid request reply with a known code; only input that
/// is not JSON is a parse error; every reply serialises on one line and
/// round-trips through `parse_response` with its id intact.
pub fn check_jsonrpc(data: &[u8]) {
    let incoming = parse_message(data);
    let is_parse_error = matches!(
        &incoming,
        Incoming::Single(Err(r)) if r.outcome.as_ref().err().map(|e| e.code) == Some(-32700)
    );
    if is_parse_error {
        assert!(
            serde_json::from_slice::<serde_json::Value>(data).is_err(),
            "valid JSON was answered with a parse error"
        );
    }
    match incoming {
        Incoming::Single(entry) => check_entry(entry),
        Incoming::Batch(entries) => {
            assert!(
                !entries.is_empty(),
                "an empty batch is an error, not a batch"
            );
            entries.into_iter().for_each(check_entry);
        }
    }
}
