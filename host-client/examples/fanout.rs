//! One client per VM, many VMs at once: every VM answers (or says why
//! not) within one overall deadline, however many there are.
//!
//! ```sh
//! cargo run -p host-client --example fanout -- /run/kvmmanager/*.sock
//! ```

use std::time::{Duration, Instant};

use host_client::{Client, ClientOptions};

#[tokio::main]
async fn main() {
    let sockets: Vec<String> = std::env::args().skip(1).collect();
    if sockets.is_empty() {
        eprintln!("usage: fanout SOCKET... (agent channel sockets)");
        std::process::exit(2);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let opts = ClientOptions {
        connect_timeout: Duration::from_secs(1),
        sync_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            let opts = opts.clone();
            tokio::spawn(async move {
                // Lazy, so that connecting counts against the deadline too.
                let client = Client::lazy(&socket, opts).deadline(deadline);
                let r = client.system_info().await;
                client.close().await;
                (socket, r)
            })
        })
        .collect();
    for t in tasks {
        match t.await {
            Ok((socket, Ok(info))) => {
                println!("{socket}: {} up {} s", info.hostname, info.uptime_seconds)
            }
            Ok((socket, Err(e))) => println!("{socket}: {e}"),
            Err(e) => println!("a task failed: {e}"),
        }
    }
}
