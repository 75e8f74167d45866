//! The async client: one connection, many calls in flight, sync and reconnect.
//!
//! This module holds the typed API ([`Client`]'s methods); the connection
//! machinery behind it (writer, reader task, id multiplexing, sync, resync,
//! reconnect, attachments on the wire) is in `conn`.
//!
//! # How a connection works
//! - [`Client`] keeps at most one connection to the channel socket. A reader
//!   task decodes reply lines and hands each to the call waiting for its id
//!   (a oneshot channel per call); writers take turns on the write half.
//! - Before the first call on a connection, and again after any call timed
//!   out, the client writes the resync byte 0xFF and a `sync` request with a
//!   fresh random nonce, and drops every line until the reply carrying that
//!   nonce. Stale replies meant for an earlier client, half lines and replies
//!   with other nonces are never taken as answers.
//! - Ids are `u64`, starting at a random value for every client and never
//!   reused, so a late reply to a call that timed out finds no taker and is
//!   dropped.
//! - When the reader sees the end of the stream (VM rebooted, agent
//!   restarted, QEMU gone), every pending call fails with
//!   [`ClientError::RequestLost`] (its request was sent: it may have run;
//!   a call whose request was not sent gets [`ClientError::ConnectionLost`],
//!   or is sent again once on a new connection) and the next call
//!   reconnects and syncs.
//! - Lines without `id` are notifications: once in sync, the reader hands
//!   them (and their attachments, always read off the wire) to the client's
//!   subscriptions by method, without ever waiting for one (`notify`).
//! - Calls that take one of the agent's slots first take one of as many
//!   permits (flow control, `call`), so a burst queues instead of getting
//!   `busy`. A call given up after its request may have reached the agent
//!   keeps its permit until the agent's late reply, and the agent is asked
//!   to stop it (`cancel`); see the embedding guide (`crate::embedding`).

mod call;
mod conn;
mod connector;
mod exec_stream;
mod forward;
mod notify;
mod ops;
mod state;
mod streams;

pub use call::CallOptions;
pub(crate) use conn::random_u64;
use conn::Conn;
use connector::Connector;
pub use connector::{AgentStream, BoxedStream, ConnectFuture};
pub use exec_stream::{ExecControl, ExecRequest, ExecStream, Pty};
pub use forward::ForwardStream;
use notify::Subscribers;
pub use notify::{Notification, Subscription, DEFAULT_SUBSCRIPTION_CAPACITY};
pub use state::ConnectionState;
use state::StateTx;
pub use streams::{StreamReader, StreamWriter};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::Duration;

use agent_common::encoding::Encoding;
use agent_common::methods::{
    AgentInfo, DiskUsage, DiskUsageParams, Empty, ExecCommandRpc, ExecParams, ExecResult,
    FileReadParams, FileReadResult, FileReadRpc, FileWriteParams, FileWriteResult, FileWriteRpc,
    GetAgentInfoRpc, GetDiskUsageRpc, GetNetworkInfoRpc, GetSystemInfoRpc, Limits, NetworkInfo,
    PingResult, PingRpc, PowerParams, PowerResult, RebootRpc, Rpc, ShutdownRpc, SystemInfo,
};
use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::Mutex as AsyncMutex;

use crate::error::ClientError;

/// Settings of a [`Client`].
///
/// ```
/// use std::time::Duration;
/// use host_client::ClientOptions;
///
/// let opts = ClientOptions {
///     call_timeout: Duration::from_secs(60),
///     ..ClientOptions::default()
/// };
/// assert_eq!(opts.max_in_flight_chunks, 2);
/// ```
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time limit of one call, unless the call gives its own. Default 30 s.
    pub call_timeout: Duration,
    /// Time limit of opening the socket. Default 5 s.
    pub connect_timeout: Duration,
    /// Time limit of the `sync` handshake. A channel socket accepts
    /// connections even when no agent runs in the guest, so this is where a
    /// missing agent shows. Default 10 s.
    pub sync_timeout: Duration,
    /// Chunk requests kept in flight by [`Client::push`] and
    /// [`Client::pull`] (for a streamed pull, its window: this many 1 MiB
    /// chunks). Default 2: with 1 MiB attachments, more buys no
    /// throughput in a 1-vCPU guest and each extra chunk queued ahead of a
    /// `ping` on the same connection adds latency (ARCHITECTURE.md,
    /// "Performance").
    pub max_in_flight_chunks: usize,
    /// Pull files with one `file_read_stream` where the agent serves it
    /// (the agent sends the chunks as the window allows, no request per
    /// chunk) instead of a `file_read` per chunk. Default true.
    pub stream_reads: bool,
    /// Reconnect on the next call after the connection was lost. Default true.
    pub reconnect: bool,
    /// Keep at most the agent's `max_concurrent_requests` calls that take
    /// a slot in flight; more wait their turn in a queue (first come, first
    /// served) instead of getting `busy`. Default true.
    pub flow_control: bool,
    /// Times a call answered `busy` (which did nothing) is sent again, after
    /// 20 ms, then 40 ms, ... within the call's time limit. The agent's
    /// slots are shared with other hosts and are freed a moment after a
    /// reply, so flow control alone cannot rule `busy` out. Default 3; 0
    /// returns `busy` at once.
    pub busy_retries: u32,
    /// When a call that may have reached the agent is given up (its time
    /// limit passed, or its future was dropped), ask the agent to stop it
    /// (`cancel`): a command is killed and its slot freed at once. Default
    /// true.
    pub cancel_abandoned: bool,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            call_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            sync_timeout: Duration::from_secs(10),
            max_in_flight_chunks: 2,
            stream_reads: true,
            reconnect: true,
            flow_control: true,
            busy_retries: 3,
            cancel_abandoned: true,
        }
    }
}

/// A client of one guest agent, reached through its channel's Unix socket.
///
/// Cheap to clone (clones share the connection) and usable from many tasks
/// at once: calls are multiplexed by id on the one connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), host_client::ClientError> {
/// use host_client::Client;
///
/// let client = Client::connect("/run/kvmmanager/vm1.sock").await?;
/// let info = client.system_info().await?;
/// println!("{} runs {}", info.hostname, info.kernel_release);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// This handle's per-call settings ([`Client::timeout`], ...).
    call: CallOptions,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("path", &self.inner.path)
            .field("options", &self.inner.opts)
            .field("call", &self.call)
            .finish_non_exhaustive()
    }
}

/// What an agent said of itself in `get_agent_info` that the client acts on.
struct Served {
    limits: Limits,
    /// It serves `file_read_stream` and its configuration allows it.
    read_stream: bool,
}

struct Inner {
    /// The socket path, or the name given to a connector (in errors).
    path: PathBuf,
    connector: Connector,
    opts: ClientOptions,
    /// The current connection. Held while connecting or syncing, so that new
    /// calls wait for a ready connection.
    conn: AsyncMutex<Option<Arc<Conn>>>,
    /// Set once a connection was lost and `reconnect` is off.
    closed: AtomicBool,
    next_id: AtomicU64,
    /// What the connected agent said of itself (`get_agent_info`), asked
    /// once per connection.
    served: StdMutex<Option<Served>>,
    /// Subscriptions to notifications; they outlive connections.
    subscribers: Arc<Subscribers>,
    /// Open streams (they end with their connection).
    streams: Arc<streams::StreamTable>,
    /// Published connection state.
    state: Arc<StateTx>,
    /// Flow control: one permit per agent slot (`max_concurrent_requests`,
    /// the number it was sized for).
    flow: StdMutex<Option<(usize, Arc<tokio::sync::Semaphore>)>>,
}

fn decode<T: serde::de::DeserializeOwned>(method: &str, raw: &RawValue) -> Result<T, ClientError> {
    serde_json::from_str(raw.get()).map_err(|source| ClientError::BadResult {
        method: method.to_owned(),
        source,
    })
}

impl Client {
    /// Connects to the agent behind the channel socket at `path` and syncs,
    /// with the default [`ClientOptions`].
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), host_client::ClientError> {
    /// let client = host_client::Client::connect("/tmp/vm.sock").await?;
    /// client.ping().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_with(path, ClientOptions::default()).await
    }

    /// Connects with the given options and syncs.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), host_client::ClientError> {
    /// use host_client::{Client, ClientOptions};
    /// let opts = ClientOptions { max_in_flight_chunks: 8, ..Default::default() };
    /// let client = Client::connect_with("/tmp/vm.sock", opts).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_with(
        path: impl AsRef<Path>,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        let client = Client::lazy(path, opts);
        client.ready().await?;
        Ok(client)
    }

    /// A client that connects on its first call instead of now.
    ///
    /// ```
    /// use host_client::{Client, ClientOptions};
    /// let client = Client::lazy("/tmp/vm.sock", ClientOptions::default());
    /// assert_eq!(client.path(), std::path::Path::new("/tmp/vm.sock"));
    /// ```
    pub fn lazy(path: impl AsRef<Path>, opts: ClientOptions) -> Client {
        let path = path.as_ref().to_path_buf();
        Client::with(path.clone(), Connector::Unix(path), opts)
    }

    fn with(path: PathBuf, connector: Connector, opts: ClientOptions) -> Client {
        // Ids start at a random point below 2^52 (exact in a double, for
        // peers that parse numbers as floats) so that replies meant for an
        // earlier client on the same channel are unlikely to match ours.
        let start = (random_u64() >> 12) | 1;
        Client {
            inner: Arc::new(Inner {
                path,
                connector,
                opts,
                conn: AsyncMutex::new(None),
                closed: AtomicBool::new(false),
                next_id: AtomicU64::new(start),
                served: StdMutex::new(None),
                subscribers: Arc::default(),
                streams: Arc::default(),
                state: Arc::new(StateTx::new()),
                flow: StdMutex::new(None),
            }),
            call: CallOptions::default(),
        }
    }

    /// The socket path this client connects to (for a client made by
    /// [`Client::from_stream`] or [`Client::with_connector`], the name
    /// given there).
    ///
    /// ```
    /// # use host_client::{Client, ClientOptions};
    /// let c = Client::lazy("/tmp/a.sock", ClientOptions::default());
    /// assert!(c.path().ends_with("a.sock"));
    /// ```
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The options in force.
    ///
    /// ```
    /// # use host_client::{Client, ClientOptions};
    /// let c = Client::lazy("/tmp/a.sock", ClientOptions::default());
    /// assert_eq!(c.options().max_in_flight_chunks, 2);
    /// ```
    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    /// Subscribes to the agent's notifications of `method`, holding up to
    /// [`DEFAULT_SUBSCRIPTION_CAPACITY`] that were not received yet.
    ///
    /// A notification is a request object without `id` that the agent
    /// sends of its own accord, possibly with an attachment. Each
    /// subscription to its method gets a copy; with none, it is dropped.
    /// The subscription lasts until it is dropped, across reconnects; what
    /// arrives while the client (re)syncs is dropped, as it may be stale.
    /// The reader never waits for a subscriber: when a subscription's
    /// channel is full, further notifications are dropped for it and
    /// counted in [`Subscription::dropped`].
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) {
    /// let mut sub = client.subscribe("stream_data");
    /// while let Some(n) = sub.recv().await {
    ///     let params: serde_json::Value = n.params().unwrap_or_default();
    ///     println!("{params} and {} raw bytes", n.attachment.map_or(0, |a| a.len()));
    /// }
    /// # }
    /// ```
    pub fn subscribe(&self, method: &str) -> Subscription {
        self.subscribe_with_capacity(method, DEFAULT_SUBSCRIPTION_CAPACITY)
    }

    /// [`Client::subscribe`] with a channel of `capacity` (at least 1)
    /// notifications.
    ///
    /// ```
    /// # use host_client::{Client, ClientOptions};
    /// let client = Client::lazy("/tmp/vm.sock", ClientOptions::default());
    /// let sub = client.subscribe_with_capacity("stream_data", 4096);
    /// assert_eq!(sub.method(), "stream_data");
    /// ```
    pub fn subscribe_with_capacity(&self, method: &str, capacity: usize) -> Subscription {
        self.inner.subscribers.subscribe(method, capacity)
    }

    /// Calls method `M` with its typed params and the default time limit.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// use agent_common::methods::{DiskUsageParams, GetDiskUsageRpc};
    /// let usage = client
    ///     .call::<GetDiskUsageRpc>(&DiskUsageParams { include_virtual: false })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn call<M: Rpc>(&self, params: &M::Params) -> Result<M::Result, ClientError> {
        self.call_with_timeout::<M>(params, self.call_timeout())
            .await
    }

    /// Calls method `M` with its own time limit.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// use std::time::Duration;
    /// use agent_common::methods::{Empty, PingRpc};
    /// client.call_with_timeout::<PingRpc>(&Empty {}, Duration::from_secs(2)).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn call_with_timeout<M: Rpc>(
        &self,
        params: &M::Params,
        timeout: Duration,
    ) -> Result<M::Result, ClientError> {
        let name = M::METHOD.as_str();
        let raw = self.request(name, params, timeout).await?;
        decode(name, &raw)
    }

    /// Calls any method by name with JSON params and returns the JSON result.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// let r = client.call_raw("ping", serde_json::json!({})).await?;
    /// assert_eq!(r["pong"], true);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn call_raw(
        &self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        self.call_raw_with_timeout(method, params, self.call_timeout())
            .await
    }

    /// [`Client::call_raw`] with its own time limit.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// use std::time::Duration;
    /// client.call_raw_with_timeout("ping", serde_json::json!({}), Duration::from_secs(1)).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn call_raw_with_timeout(
        &self,
        method: &str,
        params: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        let raw = self.request(method, &params, timeout).await?;
        decode(method, &raw)
    }

    /// `ping`: checks the agent answers.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// assert!(client.ping().await?.pong);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn ping(&self) -> Result<PingResult, ClientError> {
        self.call::<PingRpc>(&Empty {}).await
    }

    /// `get_agent_info`: version, protocol, methods and limits. The limits
    /// are remembered for sizing transfers (until the next reconnect).
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// let info = client.agent_info().await?;
    /// println!("agent {} speaks protocol {}", info.version, info.protocol_version);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn agent_info(&self) -> Result<AgentInfo, ClientError> {
        let info = self.call::<GetAgentInfoRpc>(&Empty {}).await?;
        let method = agent_common::methods::Method::FileReadStream.as_str();
        *self.served_slot() = Some(Served {
            limits: info.limits.clone(),
            read_stream: info.methods.iter().any(|m| m == method)
                && !info.disabled_methods.iter().any(|m| m == method),
        });
        Ok(info)
    }

    /// True if the agent serves `file_read_stream` (known once
    /// [`Client::limits`] has been asked on this connection).
    pub(crate) fn serves_read_stream(&self) -> bool {
        self.served_slot().as_ref().is_some_and(|s| s.read_stream)
    }

    fn served_slot(&self) -> MutexGuard<'_, Option<Served>> {
        // Only ever replaced whole, so a poisoned lock holds a valid value.
        self.inner.served.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent's limits, from `get_agent_info` (asked once per connection).
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// let limits = client.limits().await?;
    /// println!("requests up to {} bytes", limits.max_message_size);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn limits(&self) -> Result<Limits, ClientError> {
        if let Some(s) = self.served_slot().as_ref() {
            return Ok(s.limits.clone());
        }
        Ok(self.agent_info().await?.limits)
    }

    /// `get_system_info`: OS, kernel, hostname, CPUs, memory, uptime.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// println!("{}", client.system_info().await?.hostname);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn system_info(&self) -> Result<SystemInfo, ClientError> {
        self.call::<GetSystemInfoRpc>(&Empty {}).await
    }

    /// `get_network_info`: interfaces, addresses and counters.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// for i in client.network_info().await?.interfaces {
    ///     println!("{}", i.name);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn network_info(&self) -> Result<NetworkInfo, ClientError> {
        self.call::<GetNetworkInfoRpc>(&Empty {}).await
    }

    /// `get_disk_usage`; `include_virtual` also lists proc, sysfs, tmpfs...
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// for fs in client.disk_usage(false).await?.filesystems {
    ///     println!("{} {}", fs.mount_point, fs.used_bytes);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn disk_usage(&self, include_virtual: bool) -> Result<DiskUsage, ClientError> {
        self.call::<GetDiskUsageRpc>(&DiskUsageParams { include_virtual })
            .await
    }

    /// `exec_command`: runs a command to completion. The call's time limit
    /// is stretched to cover the command's own `timeout_seconds`, unless
    /// this handle has its own ([`Client::timeout`]). A call given up
    /// (time limit, dropped future) asks the agent to kill the command
    /// ([`ClientOptions::cancel_abandoned`]).
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// use agent_common::methods::ExecParams;
    /// let r = client
    ///     .exec(&ExecParams { command: "uname".into(), args: vec!["-a".into()], ..Default::default() })
    ///     .await?;
    /// print!("{}", r.stdout);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn exec(&self, params: &ExecParams) -> Result<ExecResult, ClientError> {
        let base = self.call_timeout();
        let timeout = match (params.timeout_seconds, self.call.timeout) {
            // The handle's own time limit ([`Client::timeout`]) wins.
            (Some(s), None) => base.max(Duration::from_secs(s.saturating_add(10))),
            _ => base,
        };
        self.call_with_timeout::<ExecCommandRpc>(params, timeout)
            .await
    }

    /// `file_read`: one chunk of a guest file. See [`Client::pull`] for whole files.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// use agent_common::methods::FileReadParams;
    /// let r = client
    ///     .read_chunk(&FileReadParams { path: "/etc/hostname".into(), ..Default::default() })
    ///     .await?;
    /// print!("{}", r.content);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// With `encoding: attachment` the bytes arrive raw; as this call
    /// returns only the result, they are handed back base64-encoded in
    /// `content` (and `encoding` says `base64`). [`Client::read_bytes`]
    /// returns them as bytes.
    pub async fn read_chunk(&self, params: &FileReadParams) -> Result<FileReadResult, ClientError> {
        let after = self.call_timeout();
        let (raw, data) = self
            .request_with(FileReadRpc::METHOD.as_str(), params, None, after)
            .await?;
        let mut r: FileReadResult = decode(FileReadRpc::METHOD.as_str(), &raw)?;
        if let Some(data) = data {
            r.content = Encoding::Base64.encode_lossy(&data);
            r.encoding = Encoding::Base64;
        }
        Ok(r)
    }

    /// `file_read` of up to `length` bytes at `offset`, as bytes. They come
    /// raw, as an attachment, when the agent supports attachments
    /// (`limits.max_attachment_size` > 0), and as base64 otherwise. The
    /// result's `content` is left empty.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// let (r, bytes) = client.read_bytes("/etc/hostname", 0, 4096).await?;
    /// assert_eq!(bytes.len() as u64, r.bytes_read);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn read_bytes(
        &self,
        path: &str,
        offset: u64,
        length: u64,
    ) -> Result<(FileReadResult, Bytes), ClientError> {
        let raw = self.limits().await?.max_attachment_size > 0;
        let params = FileReadParams {
            path: path.to_owned(),
            offset,
            length: Some(length),
            encoding: if raw {
                Encoding::Attachment
            } else {
                Encoding::Base64
            },
        };
        let after = self.call_timeout();
        let (result, data) = self
            .request_with(FileReadRpc::METHOD.as_str(), &params, None, after)
            .await?;
        let mut r: FileReadResult = decode(FileReadRpc::METHOD.as_str(), &result)?;
        let bytes = match (r.encoding, data) {
            (Encoding::Attachment, Some(data)) => data,
            (Encoding::Base64 | Encoding::Utf8, None) => {
                Bytes::from(r.encoding.decode(&r.content).map_err(|e| {
                    ClientError::Protocol(format!(
                        "file_read content of {path} does not decode: {e}"
                    ))
                })?)
            }
            (encoding, data) => {
                return Err(ClientError::Protocol(format!(
                    "file_read of {path} answered encoding {encoding:?} with {} attachment",
                    if data.is_some() { "an" } else { "no" }
                )))
            }
        };
        r.content = String::new();
        Ok((r, bytes))
    }

    /// `file_write` of `data` with `params` (its `content` and `encoding`
    /// are replaced): raw, as an attachment, when the agent supports
    /// attachments, and as base64 otherwise. See [`Client::push`] for
    /// whole files.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// use agent_common::methods::FileWriteParams;
    /// let params = FileWriteParams { path: "/tmp/kvmmanager/blob".into(), ..Default::default() };
    /// client.write_bytes(&params, bytes::Bytes::from_static(b"\x00\x01")).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn write_bytes(
        &self,
        params: &FileWriteParams,
        data: Bytes,
    ) -> Result<FileWriteResult, ClientError> {
        let raw = self.limits().await?.max_attachment_size > 0;
        let after = self.call_timeout();
        let (result, _) = if raw {
            let p = FileWriteParams {
                content: String::new(),
                encoding: Encoding::Attachment,
                ..params.clone()
            };
            self.request_with(FileWriteRpc::METHOD.as_str(), &p, Some(&data), after)
                .await?
        } else {
            let p = FileWriteParams {
                content: Encoding::Base64.encode_lossy(&data),
                encoding: Encoding::Base64,
                ..params.clone()
            };
            self.request_with(FileWriteRpc::METHOD.as_str(), &p, None, after)
                .await?
        };
        decode(FileWriteRpc::METHOD.as_str(), &result)
    }

    /// `file_write`: one chunk (or a whole small file). See [`Client::push`].
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// use agent_common::methods::FileWriteParams;
    /// client
    ///     .write_chunk(&FileWriteParams {
    ///         path: "/tmp/kvmmanager/hello".into(),
    ///         content: "hello\n".into(),
    ///         ..Default::default()
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn write_chunk(
        &self,
        params: &FileWriteParams,
    ) -> Result<FileWriteResult, ClientError> {
        self.call::<FileWriteRpc>(params).await
    }

    /// `shutdown`: powers the guest off `delay_seconds` after the reply.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// client.shutdown(0).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self, delay_seconds: u64) -> Result<PowerResult, ClientError> {
        self.call::<ShutdownRpc>(&PowerParams { delay_seconds })
            .await
    }

    /// `reboot`: reboots the guest `delay_seconds` after the reply.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// client.reboot(0).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn reboot(&self, delay_seconds: u64) -> Result<PowerResult, ClientError> {
        self.call::<RebootRpc>(&PowerParams { delay_seconds }).await
    }
}
