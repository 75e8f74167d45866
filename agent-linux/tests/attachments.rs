//! Attachments against the real binary over a Unix socket: raw bytes after
//! a `file_read` reply or a `file_write` request, their limits, and their
//! misuse.

mod common;

use common::{error_kind, AgentProcess};
use serde_json::{json, Value};

/// Every byte value, newlines and resync bytes included, several times.
fn nasty_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 256) as u8).collect()
}

fn request(id: u64, method: &str, params: Value, attachment: Option<&[u8]>) -> Vec<u8> {
    let mut msg = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
    if let Some(data) = attachment {
        msg["attachment"] = json!(data.len());
        msg["attachment_crc32"] = json!(agent_common::attachment_crc32(data));
    }
    let mut out = serde_json::to_vec(&msg).unwrap();
    out.push(b'\n');
    if let Some(data) = attachment {
        out.extend_from_slice(data);
    }
    out
}

#[test]
fn raw_bytes_round_trip_through_write_and_read() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    let data = nasty_bytes(300_000);
    let path = agent.write_dir().join("raw.bin");
    let path = path.to_str().unwrap();
    // One request, then a ping right behind the attachment: the framing
    // must find the ping after exactly the announced bytes.
    let mut wire = request(
        1,
        "file_write",
        json!({"path": path, "encoding": "attachment"}),
        Some(&data),
    );
    wire.extend_from_slice(&request(2, "ping", json!({}), None));
    c.send_raw(&wire);
    let mut replies: Vec<Value> = (0..2).map(|_| c.recv()).collect();
    replies.sort_by_key(|r| r["id"].as_u64());
    assert_eq!(
        replies[0]["result"]["bytes_written"],
        data.len(),
        "{}",
        replies[0]
    );
    assert_eq!(replies[1]["result"]["pong"], true);
    assert_eq!(std::fs::read(path).unwrap(), data);

    // Read it back raw, in two chunks.
    let mut back = Vec::new();
    for (id, offset) in [(3u64, 0u64), (4, 200_000)] {
        c.send_raw(&request(
            id,
            "file_read",
            json!({"path": path, "offset": offset, "length": 200_000, "encoding": "attachment"}),
            None,
        ));
        let r = c.recv();
        assert_eq!(r["id"], id);
        assert_eq!(r["result"]["encoding"], "attachment");
        assert_eq!(r["result"]["content"], "");
        let len = r["attachment"].as_u64().expect("an attachment member") as usize;
        assert_eq!(len as u64, r["result"]["bytes_read"].as_u64().unwrap());
        back.extend(c.recv_bytes(len));
    }
    assert_eq!(back, data);
    assert_eq!(
        agent.connect().call(5, "ping", json!({}))["result"]["pong"],
        true
    );
}

#[test]
fn chunked_upload_through_attachments() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    let data = nasty_bytes(2_500_000);
    let path = agent.write_dir().join("up.bin");
    let path = path.to_str().unwrap();
    let chunks: Vec<&[u8]> = data.chunks(1 << 20).collect();
    c.send_raw(&request(
        1,
        "file_write",
        json!({"path": path, "encoding": "attachment", "more": true}),
        Some(chunks[0]),
    ));
    let r = c.recv();
    let id = r["result"]["upload_id"]
        .as_str()
        .expect("an upload id")
        .to_owned();
    let mut offset = chunks[0].len();
    for (i, chunk) in chunks.iter().enumerate().skip(1) {
        let more = i + 1 < chunks.len();
        c.send_raw(&request(
            10 + i as u64,
            "file_write",
            json!({"path": path, "encoding": "attachment", "upload_id": id, "offset": offset, "more": more}),
            Some(chunk),
        ));
        let r = c.recv();
        assert_eq!(r["result"]["committed"], !more, "{r}");
        offset += chunk.len();
    }
    assert_eq!(std::fs::read(path).unwrap(), data);
}

#[test]
fn an_oversized_attachment_is_skipped_and_answered_to_its_id() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    let path = agent.write_dir().join("big.bin");
    let big = vec![b'\n'; (1 << 20) + 1];
    c.send_raw(&request(
        7,
        "file_write",
        json!({"path": path, "encoding": "attachment"}),
        Some(&big),
    ));
    let r = c.recv();
    assert_eq!(r["id"], 7);
    assert_eq!(error_kind(&r), "message_too_large");
    assert_eq!(r["error"]["data"]["limit"], 1 << 20);
    // The newlines inside it were not read as lines: the next reply is the
    // ping's, and nothing was written.
    assert_eq!(c.call(8, "ping", json!({}))["result"]["pong"], true);
    assert!(!path.exists());
}

#[test]
fn misused_attachments_are_refused_and_the_stream_stays_in_step() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    let path = agent.write_dir().join("x");
    let path = path.to_str().unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // Only file_write takes one.
        (request(1, "ping", json!({}), Some(b"\xff\n{}\n")), "invalid_params"),
        // The data must say so.
        (
            request(2, "file_write", json!({"path": path, "encoding": "base64"}), Some(b"abc")),
            "invalid_params",
        ),
        (
            request(
                3,
                "file_write",
                json!({"path": path, "content": "abc", "encoding": "attachment"}),
                Some(b"abc"),
            ),
            "invalid_params",
        ),
        // Encoding attachment with no attachment.
        (
            request(4, "file_write", json!({"path": path, "encoding": "attachment"}), None),
            "invalid_params",
        ),
        // Not for exec.
        (
            request(5, "exec_command", json!({"command": "true", "output_encoding": "attachment"}), None),
            "invalid_params",
        ),
        // Not inside a batch.
        (
            format!(
                "[{{\"jsonrpc\":\"2.0\",\"method\":\"file_read\",\"params\":{{\"path\":\"{path}\",\"encoding\":\"attachment\"}},\"id\":6}}]\n"
            )
            .into_bytes(),
            "invalid_params",
        ),
        // The check value is required, and must match.
        (
            b"{\"jsonrpc\":\"2.0\",\"method\":\"file_write\",\"params\":{\"path\":\"/nope\",\"encoding\":\"attachment\"},\"id\":7,\"attachment\":3}\nabc".to_vec(),
            "invalid_params",
        ),
        (
            format!(
                "{{\"jsonrpc\":\"2.0\",\"method\":\"file_write\",\"params\":{{\"path\":\"{path}\",\"encoding\":\"attachment\"}},\"id\":8,\"attachment\":3,\"attachment_crc32\":{}}}\nabd",
                agent_common::attachment_crc32(b"abc")
            )
            .into_bytes(),
            "invalid_params",
        ),
    ];
    for (id, (wire, kind)) in cases.into_iter().enumerate() {
        c.send_raw(&wire);
        let r = c.recv();
        let r = if r.is_array() { r[0].clone() } else { r };
        assert_eq!(r["id"], id as u64 + 1, "{r}");
        assert_eq!(error_kind(&r), kind, "{r}");
        assert!(r.get("attachment").is_none(), "{r}");
    }
    assert!(!std::path::Path::new(path).exists());
    assert_eq!(c.call(99, "ping", json!({}))["result"]["pong"], true);
}

/// A request that must never run: it writes `POISON` in the write root.
fn poison(agent: &AgentProcess) -> Vec<u8> {
    let path = agent.write_dir().join("POISON");
    request(
        666,
        "file_write",
        json!({"path": path.to_str().unwrap(), "content": "ran"}),
        None,
    )
}

#[test]
fn an_attachment_of_a_line_refused_for_another_reason_is_still_consumed() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    let data = poison(&agent);
    let n = data.len();
    // Each line announces `n` bytes validly, and is wrong in another way.
    let lines = [
        format!(r#"{{"jsonrpc":"1.0","method":"file_write","id":1,"attachment":{n}}}"#),
        format!(r#"{{"jsonrpc":"2.0","method":"file_write","id":true,"attachment":{n}}}"#),
        format!(r#"{{"jsonrpc":"2.0","jsonrpc":"2.0","method":"ping","id":3,"attachment":{n}}}"#),
        format!(r#"{{"jsonrpc":"2.0","method":5,"id":4,"attachment":{n},"extra":1}}"#),
        format!(
            r#"[{{"jsonrpc":"2.0","method":"ping","id":5,"attachment":{n}}},{{"jsonrpc":"2.0","method":"ping","id":6}}]"#
        ),
        format!(r#"{{"jsonrpc":"2.0","method":"nope","id":7,"attachment":{n}}}"#),
    ];
    for (i, line) in lines.iter().enumerate() {
        let mut wire = line.clone().into_bytes();
        wire.push(b'\n');
        wire.extend_from_slice(&data);
        c.send_raw(&wire);
        let r = c.recv();
        let r = if r.is_array() { r[0].clone() } else { r };
        assert!(r.get("error").is_some(), "case {i}: {r}");
        if i == 4 {
            // Inside a batch: the element is invalid_params, its bytes consumed.
            assert_eq!(error_kind(&r), "invalid_params", "{r}");
            assert_eq!(r["id"], 5);
        }
        // The stream is in step: the next line is a request again.
        assert_eq!(
            c.call(100 + i as u64, "ping", json!({}))["id"],
            100 + i as u64
        );
    }
    assert!(!agent.write_dir().join("POISON").exists());
}

#[test]
fn a_line_whose_attachment_length_is_unknown_drops_input_until_resync() {
    let agent = AgentProcess::start_with(json!({}), json!({"max_message_size_kb": 4}));
    let mut c = agent.connect();
    let data = poison(&agent);
    let n = data.len();
    let lines = [
        format!(r#"{{"jsonrpc":"2.0","method":"file_write","id":1,"attachment":"{n}"}}"#),
        format!(
            r#"{{"jsonrpc":"2.0","method":"file_write","id":2,"attachment":{n},"attachment":{n}}}"#
        ),
        format!(
            r#"[{{"jsonrpc":"2.0","method":"ping","id":3,"attachment":{n}}},{{"attachment":{n}}}]"#
        ),
        format!(r#"{{"jsonrpc":"2.0","method":"file_write","id":4,"attachment":{n}.0}}"#),
        // Too long to keep: 5 KiB of params, over the 4 KiB limit.
        format!(
            r#"{{"jsonrpc":"2.0","method":"file_write","params":{{"path":"{}"}},"id":5,"attachment":{n}}}"#,
            "a".repeat(5000)
        ),
    ];
    for (i, line) in lines.iter().enumerate() {
        let mut wire = line.clone().into_bytes();
        wire.push(b'\n');
        wire.extend_from_slice(&data);
        // Poison again after more data, with no resync byte in between.
        wire.extend_from_slice(&data);
        c.send_raw(&wire);
        let r = c.recv();
        assert!(
            matches!(
                error_kind(&r).as_str(),
                "invalid_request" | "message_too_large"
            ),
            "case {i}: {r}"
        );
        // Nothing of the input after the line is read until 0xFF.
        c.send_raw(b"\xff");
        let nonce = 1000 + i as u64;
        let r = c.call(nonce, "sync", json!({ "nonce": nonce }));
        assert_eq!(r["result"]["nonce"], nonce, "case {i}: {r}");
    }
    assert!(!agent.write_dir().join("POISON").exists());
}

#[test]
fn an_attachment_cut_short_and_completed_by_a_new_host_is_never_written() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    let path = agent.write_dir().join("race.bin");
    let path_s = path.to_str().unwrap();
    // The old host announces 200 bytes and dies after 10; the new host's
    // 0xFF, sync and a ping arrive, and happen to fill the 200 exactly.
    let mut wire = request(
        1,
        "file_write",
        json!({"path": path_s, "encoding": "attachment"}),
        Some(&[b'x'; 200]),
    );
    wire.truncate(wire.len() - 190);
    let mut fresh = b"\xff".to_vec();
    fresh.extend_from_slice(&request(2, "sync", json!({"nonce": 77}), None));
    fresh.extend_from_slice(&request(3, "ping", json!({}), None));
    assert!(fresh.len() < 190);
    fresh.resize(190, b' ');
    wire.extend_from_slice(&fresh);
    c.send_raw(&wire);
    let r = c.recv();
    assert_eq!(r["id"], 1);
    assert_eq!(error_kind(&r), "invalid_params", "{r}");
    assert!(!path.exists(), "a cut-short attachment was written");
    // The new host retries its sync and is served.
    c.send_raw(b"\xff");
    assert_eq!(
        c.call(4, "sync", json!({"nonce": 78}))["result"]["nonce"],
        78
    );
}

#[test]
fn get_agent_info_reports_the_attachment_limit() {
    let agent = AgentProcess::start();
    let r = agent.connect().call(1, "get_agent_info", json!({}));
    assert_eq!(r["result"]["limits"]["max_attachment_size"], 1 << 20);
}

#[test]
fn an_attachment_cut_short_is_given_up_and_input_dropped_until_resync() {
    let agent = AgentProcess::start();
    let mut c = agent.connect();
    let path = agent.write_dir().join("cut.bin");
    let path_s = path.to_str().unwrap();
    // A host announces 1000 bytes, sends 10, and is gone; the next host's
    // bytes arrive. None of them may be taken as the rest of the data, nor
    // the lines among them as requests, until 0xFF.
    let mut wire = request(
        1,
        "file_write",
        json!({"path": path_s, "encoding": "attachment"}),
        Some(&[b'x'; 1000]),
    );
    wire.truncate(wire.len() - 990);
    c.send_raw(&wire);
    let started = std::time::Instant::now();
    let r = c.recv();
    assert!(started.elapsed() >= std::time::Duration::from_secs(9));
    assert_eq!(r["id"], 1);
    assert_eq!(error_kind(&r), "timeout");
    let evil = request(
        2,
        "file_write",
        json!({"path": path_s, "content": "injected"}),
        None,
    );
    c.send_raw(&evil);
    c.send_raw(b"\xff");
    let r = c.call(3, "sync", json!({"nonce": 5}));
    assert_eq!(r["result"]["nonce"], 5);
    assert!(!path.exists(), "the line after the cut attachment was run");
}
