//! A raw probe of the agent's port: the protocol by hand, no client library.
//!
//! Connects to the host side of the port, sends the resync byte and a `sync`
//! with a nonce, drops every line until the reply carrying that nonce, then
//! sends one request and returns its reply. Used to check the port and the
//! agent independently of `kvmmanager-ctl`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::util::{bail, Result};

/// The resynchronisation byte (never valid in UTF-8 JSON).
const RESYNC_BYTE: u8 = 0xFF;

/// A nonce for the sync handshake.
fn nonce() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

/// Sends `method` with `params` after a sync handshake; returns the reply object.
pub(crate) fn call(socket: &Path, method: &str, params: Value, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    let stream =
        UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_millis(250)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);

    let n = nonce();
    let sync =
        json!({"jsonrpc": "2.0", "method": "sync", "params": {"nonce": n}, "id": "xtask-sync"});
    let mut bytes = vec![RESYNC_BYTE];
    bytes.extend_from_slice(sync.to_string().as_bytes());
    bytes.push(b'\n');
    writer.write_all(&bytes)?;
    wait_reply(&mut reader, deadline, |v| {
        v["id"] == "xtask-sync" && v["result"]["nonce"] == json!(n)
    })
    .map_err(|e| format!("sync handshake: {e}"))?;

    let req = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
    writer.write_all(format!("{req}\n").as_bytes())?;
    wait_reply(&mut reader, deadline, |v| v["id"] == json!(1))
        .map_err(|e| format!("{method}: {e}").into())
}

/// Reads lines until one parses and satisfies `want`, or the deadline passes.
fn wait_reply(
    reader: &mut BufReader<UnixStream>,
    deadline: Instant,
    want: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let mut buf = Vec::new();
    loop {
        if Instant::now() >= deadline {
            bail!("no reply before the deadline");
        }
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => bail!("the socket was closed"),
            Ok(_) if buf.ends_with(b"\n") => {
                let line = std::mem::take(&mut buf);
                if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                    if want(&v) {
                        return Ok(v);
                    }
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => bail!("read: {e}"),
        }
    }
}

/// `ping` through the raw probe; checks the reply has `pong: true`.
pub(crate) fn ping(socket: &Path, timeout: Duration) -> Result<Value> {
    let v = call(socket, "ping", json!({}), timeout)?;
    if v["result"]["pong"] != json!(true) {
        bail!("unexpected ping reply: {v}");
    }
    Ok(v)
}

/// Pings until the agent answers or `timeout` passes.
pub(crate) fn wait_ping(socket: &Path, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ping(socket, left.min(Duration::from_secs(5))) {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                bail!("agent did not answer ping within {timeout:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The manual ping line the docs show, for this socket.
///
/// `\377` (octal) rather than `\xff`: POSIX printf, as in dash (Debian's
/// `sh`), knows no hex escapes and would send the four characters `\xff`.
///
/// `shut-none`: socat must not half-close the socket when its stdin ends,
/// since QEMU's socket chardev takes that for a disconnect and the reply
/// then waits for the next client.
pub(crate) fn socat_line(socket: &Path) -> String {
    format!(
        r#"printf '\377{{"jsonrpc":"2.0","method":"ping","id":1}}\n' | socat -t 2 - UNIX-CONNECT:{},shut-none"#,
        socket.display()
    )
}

/// Runs [`socat_line`] through `sh` and returns what socat printed.
pub(crate) fn socat_ping(socket: &Path) -> Result<String> {
    let out = crate::util::output_with_timeout(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(socat_line(socket)),
        Duration::from_secs(20),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !text.contains(r#""pong":true"#) {
        bail!(
            "the socat line printed {text:?} (exit {}; stderr {:?})",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake agent: stale garbage first, then proper replies.
    fn fake_agent(listener: UnixListener) {
        let (stream, _) = listener.accept().unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        // A stale reply left from an earlier client, and a half line.
        w.write_all(b"{\"jsonrpc\":\"2.0\",\"result\":{\"pong\":true},\"id\":1}\n{\"partial")
            .unwrap();
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).unwrap();
        assert_eq!(line[0], RESYNC_BYTE);
        let req: Value = serde_json::from_slice(&line[1..]).unwrap();
        let nonce = req["params"]["nonce"].clone();
        // A wrong nonce first, which must be ignored.
        let wrong = json!({"jsonrpc":"2.0","result":{"nonce":0},"id":"xtask-sync"});
        let right = json!({"jsonrpc":"2.0","result":{"nonce":nonce},"id":"xtask-sync"});
        w.write_all(format!("\n{wrong}\n{right}\n").as_bytes())
            .unwrap();
        line.clear();
        r.read_until(b'\n', &mut line).unwrap();
        let req: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(req["method"], "ping");
        w.write_all(b"{\"jsonrpc\":\"2.0\",\"result\":{\"pong\":true,\"timestamp\":7},\"id\":1}\n")
            .unwrap();
    }

    #[test]
    fn probe_skips_stale_lines_and_wrong_nonces() {
        let dir = std::env::temp_dir().join(format!("xtask-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("a.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || fake_agent(listener));
        let v = ping(&sock, Duration::from_secs(10)).unwrap();
        assert_eq!(v["result"]["timestamp"], 7);
        t.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn socat_line_is_the_documented_one() {
        assert_eq!(
            socat_line(Path::new("/run/a.sock")),
            r#"printf '\377{"jsonrpc":"2.0","method":"ping","id":1}\n' | socat -t 2 - UNIX-CONNECT:/run/a.sock,shut-none"#
        );
    }

    #[test]
    fn probe_fails_on_a_closed_socket() {
        let dir = std::env::temp_dir().join(format!("xtask-probe-closed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("a.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || drop(listener.accept().unwrap()));
        assert!(ping(&sock, Duration::from_secs(5)).is_err());
        t.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
