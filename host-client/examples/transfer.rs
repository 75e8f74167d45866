//! A push with progress, an overall deadline and cancel on Ctrl-C. A push
//! that is given up (deadline, Ctrl-C, or its future dropped in a
//! `select!`) aborts its upload on the agent: the guest file stays as it
//! was, and the agent's upload places are not used up.
//!
//! ```sh
//! cargo run -p host-client --example transfer -- /run/kvmmanager/vm1.sock disk.img /tmp/kvmmanager/disk.img
//! ```

use std::time::{Duration, Instant};

use host_client::{Client, PushOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, local, guest] = args.as_slice() else {
        return Err("usage: transfer SOCKET LOCAL_FILE GUEST_PATH".into());
    };
    let client = Client::connect(socket).await?;
    // The whole transfer must be done within ten minutes.
    let bounded = client.deadline(Instant::now() + Duration::from_secs(600));
    let push = bounded.push(local, guest, PushOptions::default(), |p| {
        if let Some(f) = p.fraction() {
            eprint!("\r{:5.1} %", f * 100.0);
        }
    });
    tokio::select! {
        r = push => {
            let s = r?;
            eprintln!("\r{} bytes in {:.1?} ({:.1} MiB/s)", s.bytes, s.duration, s.mib_per_s());
        }
        _ = tokio::signal::ctrl_c() => {
            // The push future is dropped here: its upload is aborted.
            eprintln!("\ncancelled");
        }
    }
    // Let the abort reach the agent before the connection closes (closing
    // discards the connection's uploads anyway).
    client.close().await;
    Ok(())
}
