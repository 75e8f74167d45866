//! Host side of kvmmanager-agent: an async client library and the
//! `kvmmanager-ctl` command.
//!
//! A VM's agent is reached through the host end of its virtio-serial port:
//! the Unix socket that QEMU's `-chardev socket` or libvirt's
//! `<channel type='unix'>` creates. [`Client`] speaks JSON-RPC 2.0 over it,
//! with many calls in flight, resynchronisation after timeouts and
//! transparent reconnects; [`Client::push`] and [`Client::pull`] move files
//! of any size in chunks. [`blocking::Client`] wraps it for callers without a
//! tokio runtime, and [`libvirt`] finds a domain's socket.
//!
//! ```no_run
//! # async fn demo() -> Result<(), host_client::ClientError> {
//! use host_client::{Client, PushOptions};
//!
//! let path = host_client::libvirt::channel_socket("vm1").expect("vm1 has the channel");
//! let client = Client::connect(path).await?;
//! let r = client.ping().await?;
//! println!("guest clock: {}", r.timestamp);
//! client.push("build.tar", "/tmp/kvmmanager/build.tar", PushOptions::default(), |_| {}).await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod blocking;
#[cfg(feature = "cli")]
pub mod cli;
mod client;
#[doc = include_str!("../docs/embedding.md")]
pub mod embedding {}
mod error;
pub mod libvirt;
mod transfer;

/// The README's examples, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

#[cfg(test)]
mod fake;

pub use agent_common;
pub use client::{
    AgentStream, BoxedStream, CallOptions, Client, ClientOptions, ConnectFuture, ConnectionState,
    Notification, Subscription, DEFAULT_SUBSCRIPTION_CAPACITY,
};
pub use client::{
    ExecControl, ExecRequest, ExecStream, ForwardStream, Pty, StreamReader, StreamWriter,
};
pub use error::ClientError;
pub use transfer::{Progress, PushOptions, TransferSummary};
