//! Embedding the client in a long-running service: one `Client` per VM,
//! shared by every task; a deadline on each call; retries only where they
//! are safe; the connection state watched for the platform's status page.
//!
//! ```sh
//! cargo run -p host-client --example service -- /run/kvmmanager/vm1.sock
//! ```

use std::time::Duration;

use host_client::agent_common::methods::ExecParams;
use host_client::{Client, ClientError, ClientOptions, ConnectionState};

/// Runs `op` again after errors that say a later attempt may succeed,
/// unless the first attempt may have run already and `idempotent` is false.
async fn with_retries<T, F, Fut>(idempotent: bool, mut op: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut wait = Duration::from_millis(200);
    for _ in 0..4 {
        match op().await {
            Err(e) if e.is_transient() && (idempotent || !e.may_have_run()) => {
                eprintln!("retrying after: {e}");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            other => return other,
        }
    }
    op().await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let socket = std::env::args()
        .nth(1)
        .ok_or("usage: service SOCKET (the VM's agent channel socket)")?;
    // Lazy: the service starts even while the VM is still booting.
    let client = Client::lazy(
        &socket,
        ClientOptions {
            call_timeout: Duration::from_secs(10),
            ..ClientOptions::default()
        },
    );

    // The platform's status page follows the connection.
    let mut state = client.state();
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            let now = *state.borrow_and_update();
            eprintln!("agent connection: {now:?}");
            if now == ConnectionState::Gone {
                break;
            }
        }
    });

    // Reads are idempotent: retried on any transient error.
    let quick = client.timeout(Duration::from_secs(2));
    let info = with_retries(true, || quick.system_info()).await?;
    println!("{} runs {}", info.hostname, info.kernel_release);

    // A command changes the guest: retried only when it cannot have run.
    let params = ExecParams {
        command: "uptime".into(),
        ..Default::default()
    };
    match with_retries(false, || client.exec(&params)).await {
        Ok(r) => print!("{}", r.stdout),
        Err(e) if e.is_policy_denied() => eprintln!("the guest's policy forbids uptime"),
        Err(e) if e.is_not_supported() => eprintln!("this agent cannot run commands"),
        Err(e) => return Err(e.into()),
    }
    client.close().await;
    Ok(())
}
