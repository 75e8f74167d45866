//! A minimal qemu-ga client: `guest-sync-delimited` handshake, then one JSON
//! command a line and one reply a line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::util::{bail, Result};

/// A connection to qemu-ga's port socket.
pub(crate) struct Qga {
    reader: Option<BufReader<UnixStream>>,
    writer: Option<UnixStream>,
    next_id: u64,
}

impl Qga {
    /// Connects and resynchronises (0xFF, `guest-sync-delimited`).
    pub(crate) fn connect(path: &Path) -> Result<Qga> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut q = Qga {
            reader: Some(BufReader::new(s.try_clone()?)),
            writer: Some(s),
            next_id: std::process::id() as u64 * 1000,
        };
        q.sync()?;
        Ok(q)
    }

    /// Closes the connection (the host side of the port goes away).
    pub(crate) fn close(&mut self) {
        if let Some(w) = self.writer.take() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        self.reader = None;
    }

    fn sync(&mut self) -> Result<()> {
        self.next_id += 1;
        let id = self.next_id;
        let line =
            format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut w = self.writer.as_ref().ok_or("qemu-ga: closed")?;
        w.write_all(&[0xFF])?;
        w.write_all(line.as_bytes())?;
        let r = self.reader.as_mut().ok_or("qemu-ga: closed")?;
        loop {
            if Instant::now() > deadline {
                bail!("qemu-ga: no sync reply");
            }
            // Skip to the 0xFF delimiter, then read the reply line.
            let mut b = [0u8; 1];
            r.read_exact(&mut b)?;
            if b[0] != 0xFF {
                continue;
            }
            let mut l = String::new();
            r.read_line(&mut l)?;
            let v: Value = serde_json::from_str(l.trim()).unwrap_or(Value::Null);
            if v["return"].as_u64() == Some(id) {
                return Ok(());
            }
        }
    }

    /// Runs one command and returns its `return` value.
    pub(crate) fn call(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let mut line = serde_json::to_vec(&json!({"execute": cmd, "arguments": args}))
            .map_err(|e| format!("json: {e}"))?;
        line.push(b'\n');
        let mut w = self.writer.as_ref().ok_or("qemu-ga: closed")?;
        w.write_all(&line)?;
        let r = self.reader.as_mut().ok_or("qemu-ga: closed")?;
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            bail!("qemu-ga: connection closed");
        }
        let mut v: Value = serde_json::from_str(l.trim_start_matches('\u{FF}').trim())
            .map_err(|e| format!("qemu-ga reply to {cmd}: {e}"))?;
        if !v["error"].is_null() {
            bail!("qemu-ga {cmd}: {}", v["error"]);
        }
        Ok(v["return"].take())
    }

    /// `guest-exec /bin/true` with captured output, then `guest-exec-status`
    /// polled back to back until it has exited.
    pub(crate) fn exec_true(&mut self) -> Result<()> {
        let r = self.call(
            "guest-exec",
            json!({"path": "/bin/true", "capture-output": true}),
        )?;
        let pid = r["pid"].as_i64().ok_or("guest-exec: no pid")?;
        loop {
            let s = self.call("guest-exec-status", json!({"pid": pid}))?;
            if s["exited"].as_bool() == Some(true) {
                if s["exitcode"].as_i64() != Some(0) {
                    bail!("guest-exec true: {s}");
                }
                return Ok(());
            }
        }
    }

    /// `sh -c script` through `guest-exec`, its status polled every 200 ms
    /// until it has exited; its standard output.
    pub(crate) fn sh(&mut self, script: &str) -> Result<String> {
        let r = self.call(
            "guest-exec",
            json!({"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}),
        )?;
        let pid = r["pid"].as_i64().ok_or("guest-exec: no pid")?;
        let start = Instant::now();
        loop {
            let s = self.call("guest-exec-status", json!({"pid": pid}))?;
            if s["exited"].as_bool() == Some(true) {
                if s["exitcode"].as_i64() != Some(0) {
                    bail!("guest-exec `{script}`: {s}");
                }
                let out = base64::engine::general_purpose::STANDARD
                    .decode(s["out-data"].as_str().unwrap_or(""))
                    .map_err(|e| format!("guest-exec out-data: {e}"))?;
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            if start.elapsed() > Duration::from_secs(120) {
                bail!("guest-exec `{script}` did not exit within 120 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Reads a guest file in `chunk`-byte `guest-file-read`s; pushes MiB/s.
    pub(crate) fn read_file(
        &mut self,
        path: &str,
        chunk: usize,
        rates: &mut Vec<f64>,
    ) -> Result<Vec<u8>> {
        let t = Instant::now();
        let h = self.call("guest-file-open", json!({"path": path, "mode": "r"}))?;
        let mut data = Vec::new();
        loop {
            let r = self.call("guest-file-read", json!({"handle": h, "count": chunk}))?;
            let b64 = r["buf-b64"].as_str().unwrap_or("");
            data.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| format!("base64: {e}"))?,
            );
            if r["eof"].as_bool() == Some(true) || r["count"].as_u64() == Some(0) {
                break;
            }
        }
        self.call("guest-file-close", json!({"handle": h}))?;
        rates.push(data.len() as f64 / 1048576.0 / t.elapsed().as_secs_f64().max(1e-9));
        Ok(data)
    }

    /// Writes `data` into a new guest file in `chunk`-byte `guest-file-write`s.
    pub(crate) fn write_file(&mut self, path: &str, data: &[u8], chunk: usize) -> Result<()> {
        let h = self.call("guest-file-open", json!({"path": path, "mode": "w"}))?;
        for c in data.chunks(chunk) {
            let b64 = base64::engine::general_purpose::STANDARD.encode(c);
            let r = self.call("guest-file-write", json!({"handle": h, "buf-b64": b64}))?;
            if r["count"].as_u64() != Some(c.len() as u64) {
                bail!("guest-file-write: {r}");
            }
        }
        self.call("guest-file-close", json!({"handle": h}))?;
        Ok(())
    }
}
