//! The least work a push asks of a guest, with no agent in the way: read
//! `BYTES` bytes from `PORT` in 1 MiB pieces (a push's chunk), check each
//! by the agent's own CRC-32 ([`agent_common::attachment_crc32`]) and
//! write it into `OUT` at its offset, as the agent writes a staging file.
//!
//! `cargo xtask bench` runs it in the guest, with the host writing into a
//! raw port, as the floor of the write row: what one vCPU does when it
//! does nothing but what the protocol requires of every pushed byte.
//!
//! ```text
//! push_floor PORT OUT BYTES
//! ```

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

/// A push's chunk: the agent's `max_attachment_size` default.
const CHUNK: usize = 1 << 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, port, out, bytes] = &args[..] else {
        eprintln!("usage: push_floor PORT OUT BYTES");
        return ExitCode::from(2);
    };
    match run(port, out, bytes) {
        Ok((done, check)) => {
            // The checks are printed so that none of them can be left out.
            println!("{done} bytes, CRC-32s xored {check:08x}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("push_floor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(port: &str, out: &str, bytes: &str) -> Result<(u64, u32), String> {
    let len: u64 = bytes.parse().map_err(|e| format!("BYTES {bytes:?}: {e}"))?;
    let mut port = File::open(port).map_err(|e| format!("open {port}: {e}"))?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(|e| format!("create {out}: {e}"))?;
    let mut buf = vec![0u8; CHUNK];
    let (mut done, mut check) = (0u64, 0u32);
    while done < len {
        let n = usize::try_from(len - done).map_or(CHUNK, |left| left.min(CHUNK));
        let piece = &mut buf[..n];
        port.read_exact(piece)
            .map_err(|e| format!("read the port after {done} bytes: {e}"))?;
        check ^= agent_common::attachment_crc32(piece);
        file.write_all_at(piece, done)
            .map_err(|e| format!("write {out} at {done}: {e}"))?;
        done += n as u64;
    }
    Ok((done, check))
}
