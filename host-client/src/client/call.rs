//! Per-call settings (time limit, deadline, retries, cancelling), flow
//! control, the connection's state and lifecycle (`close`, `reset`), and
//! clients over streams of the embedder's own.
//!
//! Settings belong to a [`Client`] handle: [`Client::timeout`] and friends
//! return a new handle on the same connection with the setting changed, so
//! every typed helper (`ping`, `exec`, `push`, ...) takes them without a
//! second set of methods.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agent_common::methods::Limits;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::connector::{AgentStream, Connector};
use super::{Client, ClientOptions, ConnectionState};
use crate::error::ClientError;

/// What flow control gave a call.
pub(super) enum Flow {
    /// One of the agent's slots, until the call ends.
    Permit(OwnedSemaphorePermit),
    /// Go ahead unbounded (the agent's limits are unknown).
    Unbounded,
    /// The call's deadline passed while it waited.
    TimedOut,
}

/// Settings of the calls made through one [`Client`] handle; `None` takes
/// the [`ClientOptions`] value.
///
/// ```
/// use std::time::Duration;
/// use host_client::{CallOptions, Client, ClientOptions};
///
/// let client = Client::lazy("/tmp/vm.sock", ClientOptions::default());
/// let quick = client.with_call_options(CallOptions {
///     timeout: Some(Duration::from_secs(2)),
///     busy_retries: Some(0),
///     ..CallOptions::default()
/// });
/// assert_eq!(quick.call_options().timeout, Some(Duration::from_secs(2)));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallOptions {
    /// Time limit of each call ([`ClientOptions::call_timeout`]).
    pub timeout: Option<Duration>,
    /// A point in time no call made through the handle outlives, whatever
    /// its time limit: the overall deadline of a [`Client::push`] or
    /// [`Client::pull`] made of many calls.
    pub deadline: Option<std::time::Instant>,
    /// [`ClientOptions::busy_retries`].
    pub busy_retries: Option<u32>,
    /// [`ClientOptions::cancel_abandoned`].
    pub cancel_abandoned: Option<bool>,
}

impl Client {
    /// This client with time limit `timeout` for each call (helpers
    /// included; [`Client::exec`] then no longer stretches it to the
    /// command's own limit). Shares the connection.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// use std::time::Duration;
    /// client.timeout(Duration::from_secs(2)).ping().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn timeout(&self, timeout: Duration) -> Client {
        self.with_call_options(CallOptions {
            timeout: Some(timeout),
            ..self.call
        })
    }

    /// This client with a deadline no call outlives: for a transfer, the
    /// time limit of the whole. Shares the connection.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// use std::time::{Duration, Instant};
    /// let by = Instant::now() + Duration::from_secs(60);
    /// client.deadline(by).pull("/var/log/syslog", "syslog", |_| {}).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn deadline(&self, at: std::time::Instant) -> Client {
        self.with_call_options(CallOptions {
            deadline: Some(at),
            ..self.call
        })
    }

    /// This client with `options` for its calls. Shares the connection.
    ///
    /// ```
    /// # use host_client::{CallOptions, Client, ClientOptions};
    /// let c = Client::lazy("/tmp/vm.sock", ClientOptions::default());
    /// let patient = c.with_call_options(CallOptions { busy_retries: Some(10), ..c.call_options() });
    /// assert_eq!(patient.call_options().busy_retries, Some(10));
    /// ```
    pub fn with_call_options(&self, options: CallOptions) -> Client {
        Client {
            inner: self.inner.clone(),
            call: options,
        }
    }

    /// The per-call settings of this handle.
    ///
    /// ```
    /// # use host_client::{CallOptions, Client, ClientOptions};
    /// let c = Client::lazy("/tmp/vm.sock", ClientOptions::default());
    /// assert_eq!(c.call_options(), CallOptions::default());
    /// ```
    pub fn call_options(&self) -> CallOptions {
        self.call
    }

    pub(super) fn call_timeout(&self) -> Duration {
        self.call.timeout.unwrap_or(self.inner.opts.call_timeout)
    }

    /// When a call given `after` from now must end.
    pub(super) fn deadline_for(&self, after: Duration) -> tokio::time::Instant {
        let own = tokio::time::Instant::now() + after;
        match self.call.deadline {
            Some(d) => own.min(tokio::time::Instant::from_std(d)),
            None => own,
        }
    }

    pub(super) fn busy_retries(&self) -> u32 {
        self.call
            .busy_retries
            .unwrap_or(self.inner.opts.busy_retries)
    }

    pub(super) fn cancel_abandoned(&self) -> bool {
        self.call
            .cancel_abandoned
            .unwrap_or(self.inner.opts.cancel_abandoned)
    }

    /// The agent's limits, boxed: flow control asks for them from inside a
    /// call, and `get_agent_info` is a call.
    fn limits_boxed(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Limits, ClientError>> + Send + '_>> {
        Box::pin(self.limits())
    }

    /// Waits (first come, first served) for one of the agent's slots.
    pub(super) async fn flow_permit(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Flow, ClientError> {
        let limits = match tokio::time::timeout_at(deadline, self.limits_boxed()).await {
            Ok(Ok(l)) => l,
            // An agent whose limits cannot be had (or read) still serves
            // calls: without flow control.
            Ok(Err(e @ (ClientError::Agent { .. } | ClientError::BadResult { .. }))) => {
                tracing::debug!("no flow control: the agent's limits are unknown ({e})");
                return Ok(Flow::Unbounded);
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(Flow::TimedOut),
        };
        let n = usize::try_from(limits.max_concurrent_requests)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS);
        let semaphore = {
            let mut flow = self.inner.flow.lock().unwrap_or_else(|e| e.into_inner());
            match &*flow {
                Some((size, s)) if *size == n => s.clone(),
                _ => {
                    let s = Arc::new(Semaphore::new(n));
                    *flow = Some((n, s.clone()));
                    s
                }
            }
        };
        match tokio::time::timeout_at(deadline, semaphore.acquire_owned()).await {
            Ok(Ok(p)) => Ok(Flow::Permit(p)),
            // Never closed.
            Ok(Err(_)) => Err(ClientError::ConnectionLost),
            Err(_) => Ok(Flow::TimedOut),
        }
    }

    /// Asks the agent to abort chunked upload `upload_id` (a push given
    /// up), from a task of its own, so that a drop can ask it.
    pub(crate) fn abort_upload(&self, upload_id: String) {
        if !self.cancel_abandoned() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.clone();
        handle.spawn(async move {
            let conn = client.inner.conn.lock().await.clone();
            // An upload belongs to its connection: with another one (or
            // none) it is gone already.
            if let Some(conn) = conn {
                tracing::debug!(%upload_id, "aborting an upload given up");
                conn.spawn_cancel(agent_common::methods::CancelParams {
                    id: None,
                    upload_id: Some(upload_id),
                });
            }
        });
    }

    /// The connection's state, as it changes.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) {
    /// use host_client::ConnectionState;
    /// let mut state = client.state();
    /// while state.changed().await.is_ok() {
    ///     if *state.borrow() == ConnectionState::Gone {
    ///         break;
    ///     }
    /// }
    /// # }
    /// ```
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.subscribe()
    }

    /// Closes the client for good (every handle of it): calls still waiting
    /// fail with [`ClientError::RequestLost`] after the agent was asked to
    /// stop them (`cancel`), later calls with
    /// [`ClientError::ConnectionLost`]. Ending the connection also discards
    /// its chunked uploads on the agent.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) {
    /// client.close().await;
    /// assert!(client.ping().await.is_err());
    /// # }
    /// ```
    pub async fn close(&self) {
        self.end_connection(true).await;
    }

    /// Like [`Client::close`], but the next call opens a new connection.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// client.reset().await;
    /// client.ping().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn reset(&self) {
        self.end_connection(false).await;
    }

    /// A client over a stream the embedder opened (a vsock, a passed file
    /// descriptor, an ssh tunnel): syncs on it now. It cannot reconnect
    /// when the stream ends: see [`Client::with_connector`] for that.
    /// `name` names the connection in errors.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), host_client::ClientError> {
    /// use host_client::{Client, ClientOptions};
    /// let stream = tokio::net::UnixStream::connect("/tmp/vm.sock").await.unwrap();
    /// let client = Client::from_stream("vm1", stream, ClientOptions::default()).await?;
    /// client.ping().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn from_stream<S: AgentStream>(
        name: &str,
        stream: S,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        let opts = ClientOptions {
            reconnect: false,
            ..opts
        };
        let client = Client::with(PathBuf::from(name), Connector::once(Box::new(stream)), opts);
        client.ready().await?;
        Ok(client)
    }

    /// A client whose connections come from `connect` (called for the
    /// first connection and for every reconnect), synced now. `name` names
    /// the connection in errors.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), host_client::ClientError> {
    /// use host_client::{Client, ClientOptions};
    /// let client = Client::with_connector(
    ///     "vm1",
    ///     || tokio::net::UnixStream::connect("/tmp/vm.sock"),
    ///     ClientOptions::default(),
    /// )
    /// .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn with_connector<F, Fut, S>(
        name: &str,
        connect: F,
        opts: ClientOptions,
    ) -> Result<Client, ClientError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::io::Result<S>> + Send + 'static,
        S: AgentStream,
    {
        let client = Client::with(PathBuf::from(name), Connector::custom(connect), opts);
        client.ready().await?;
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex as StdMutex;

    use agent_common::jsonrpc::Id;
    use serde_json::{json, Value};

    use super::*;
    use crate::fake::{self, client_opts, reply, FakeConn};

    fn limits(slots: u32) -> Value {
        json!({
            "name": "fake", "version": "0", "protocol_version": 1, "platform": "linux",
            "methods": [],
            "limits": {
                "max_message_size": 65536, "max_response_size": 8388608,
                "max_read_chunk": 1048576, "max_file_size": 1073741824,
                "max_exec_output": 1048576, "max_command_timeout_seconds": 300,
                "request_timeout_seconds": 30, "max_concurrent_requests": slots,
                "max_attachment_size": 0
            }
        })
    }

    /// Everything a fake agent saw: (method, id, params) in arrival order.
    type Seen = Arc<StdMutex<Vec<(String, Option<u64>, Value)>>>;

    /// A fake agent with `slots` slots that answers `get_agent_info` and
    /// `sync` at once, records every request (notifications too), answers
    /// `hold` only when `release` fires (or never), and `echo` after
    /// counting how many slot calls it holds at once (`peak`), answering
    /// `busy` beyond `slots`.
    fn agent(
        slots: u32,
        seen: Seen,
        peak: Arc<AtomicUsize>,
        release: Arc<tokio::sync::Notify>,
    ) -> fake::FakeAgent {
        fake::spawn(move |mut c: FakeConn, _| {
            let (seen, peak, release) = (seen.clone(), peak.clone(), release.clone());
            async move {
                let running = Arc::new(AtomicUsize::new(0));
                while let Some(req) = c.next_request().await {
                    let params: Value = req.params().unwrap_or(Value::Null);
                    let num = req.id.as_ref().and_then(Id::as_u64);
                    seen.lock()
                        .unwrap()
                        .push((req.method.clone(), num, params.clone()));
                    let Some(id) = req.id else { continue };
                    match req.method.as_str() {
                        "sync" => reply(&c, id, params).await,
                        "get_agent_info" => reply(&c, id, limits(slots)).await,
                        "hold" => {
                            let (w, release) = (c.writer.clone(), release.clone());
                            tokio::spawn(async move {
                                release.notified().await;
                                let r = agent_common::jsonrpc::Response::ok(id, &json!({}));
                                fake::send_response(&w, &r).await;
                            });
                        }
                        _ => {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            let (w, running) = (c.writer.clone(), running.clone());
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                let r = if now > slots as usize {
                                    agent_common::jsonrpc::Response::error(
                                        id,
                                        agent_common::error::ErrorObject::new(
                                            agent_common::error::ErrorKind::Busy,
                                            "busy",
                                        ),
                                    )
                                } else {
                                    agent_common::jsonrpc::Response::ok(id, &params)
                                };
                                // Freed before the reply is written, as the
                                // agent frees it once the reply is written.
                                running.fetch_sub(1, Ordering::SeqCst);
                                fake::send_response(&w, &r).await;
                            });
                        }
                    }
                }
            }
        })
    }

    fn flow_opts() -> ClientOptions {
        ClientOptions {
            flow_control: true,
            cancel_abandoned: true,
            ..client_opts()
        }
    }

    #[tokio::test]
    async fn flow_control_queues_calls_beyond_the_agents_slots() {
        let seen = Seen::default();
        let peak = Arc::new(AtomicUsize::new(0));
        let a = agent(3, seen, peak.clone(), Arc::default());
        let client = Client::connect_with(&a.path, flow_opts()).await.unwrap();
        let calls: Vec<_> = (0..40)
            .map(|i| {
                let c = client.clone();
                tokio::spawn(async move { c.call_raw("echo", json!({ "i": i })).await })
            })
            .collect();
        for (i, t) in calls.into_iter().enumerate() {
            // No retries: a busy would fail the call.
            assert_eq!(t.await.unwrap().unwrap(), json!({ "i": i }));
        }
        assert_eq!(
            peak.load(Ordering::SeqCst),
            3,
            "queued, never over the slots"
        );
    }

    #[tokio::test]
    async fn a_call_given_up_is_cancelled_and_keeps_its_slot_until_its_late_reply() {
        let seen = Seen::default();
        let release = Arc::new(tokio::sync::Notify::new());
        let a = agent(1, seen.clone(), Arc::default(), release.clone());
        let client = Client::connect_with(&a.path, flow_opts()).await.unwrap();
        let e = client
            .timeout(Duration::from_millis(100))
            .call_raw("hold", json!({}))
            .await
            .unwrap_err();
        assert!(e.is_timeout() && e.may_have_run(), "{e:?}");
        // The agent still runs `hold` in its only slot: the next call waits
        // for the late reply instead of being sent into a `busy`.
        let next = tokio::spawn({
            let c = client.clone();
            async move { c.call_raw("echo", json!({"n": 1})).await }
        });
        let hold_id = {
            // Hang guard only: the cancel notification is written by a task.
            let mut waited = 0;
            loop {
                let s = seen.lock().unwrap().clone();
                if let Some((_, _, p)) = s.iter().find(|(m, id, _)| m == "cancel" && id.is_none()) {
                    break p["id"].as_u64().unwrap();
                }
                waited += 1;
                assert!(waited < 1000, "no cancel was sent: {s:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let s = seen.lock().unwrap().clone();
        let hold = s.iter().find(|(m, ..)| m == "hold").unwrap();
        assert_eq!(hold.1, Some(hold_id), "the cancel names the call given up");
        assert!(
            !s.iter().any(|(m, ..)| m == "echo"),
            "echo was sent while the slot was taken: {s:?}"
        );
        release.notify_one();
        assert_eq!(next.await.unwrap().unwrap(), json!({"n": 1}));
    }

    #[tokio::test]
    async fn a_call_given_up_whose_reply_never_comes_frees_its_permit_after_a_grace() {
        // The agent never answers `hold`, nor acts on `cancel` (as after
        // an agent restart behind a connection QEMU kept open).
        let a = agent(1, Seen::default(), Arc::default(), Arc::default());
        let client = Client::connect_with(&a.path, flow_opts()).await.unwrap();
        let e = client
            .timeout(Duration::from_millis(100))
            .call_raw("hold", json!({}))
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        // The only permit comes back after the grace (2 s in tests),
        // within this call's 5 s.
        assert_eq!(
            client.call_raw("echo", json!({"n": 3})).await.unwrap(),
            json!({"n": 3})
        );
    }

    #[tokio::test]
    async fn a_dropped_call_is_cancelled_on_the_agent() {
        let seen = Seen::default();
        let a = agent(4, seen.clone(), Arc::default(), Arc::default());
        let client = Client::connect_with(&a.path, flow_opts()).await.unwrap();
        let call = client.call_raw("hold", json!({}));
        // Dropped while it waits for its reply.
        assert!(tokio::time::timeout(Duration::from_millis(100), call)
            .await
            .is_err());
        let mut waited = 0;
        loop {
            let s = seen.lock().unwrap().clone();
            let hold = s.iter().find(|(m, ..)| m == "hold").and_then(|h| h.1);
            if let Some((_, _, p)) = s.iter().find(|(m, ..)| m == "cancel") {
                assert_eq!(p["id"].as_u64(), hold);
                break;
            }
            waited += 1;
            assert!(waited < 1000, "no cancel was sent: {s:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The connection is in step for the next call.
        assert_eq!(
            client.call_raw("echo", json!({"n": 2})).await.unwrap(),
            json!({"n": 2})
        );
    }

    #[tokio::test]
    async fn an_agent_without_readable_limits_is_served_without_flow_control() {
        for info in [
            Err(agent_common::error::ErrorObject::new(
                agent_common::error::ErrorKind::MethodNotFound,
                "no such method",
            )),
            Ok(json!({"limits": "unreadable"})),
        ] {
            let a = fake::spawn(move |c: FakeConn, _| {
                let info = info.clone();
                fake::serve(
                    c,
                    fake::handler(move |m, p| {
                        let info = info.clone();
                        async move {
                            match m.as_str() {
                                "get_agent_info" => info,
                                _ => Ok(p),
                            }
                        }
                    }),
                )
            });
            let client = Client::connect_with(&a.path, flow_opts()).await.unwrap();
            assert_eq!(
                client.call_raw("echo", json!({"n": 4})).await.unwrap(),
                json!({"n": 4})
            );
        }
    }

    #[tokio::test]
    async fn state_close_and_reset() {
        let a = fake::spawn(|c: FakeConn, _| {
            fake::serve(
                c,
                fake::handler(|_, p| async move { Ok::<_, agent_common::error::ErrorObject>(p) }),
            )
        });
        let client = Client::lazy(&a.path, client_opts());
        let mut state = client.state();
        assert_eq!(*state.borrow_and_update(), ConnectionState::Idle);
        client.call_raw("echo", json!({})).await.unwrap();
        assert_eq!(*state.borrow_and_update(), ConnectionState::Connected);
        client.reset().await;
        assert_eq!(*state.borrow_and_update(), ConnectionState::Disconnected);
        client.call_raw("echo", json!({})).await.unwrap();
        assert_eq!(*state.borrow_and_update(), ConnectionState::Connected);
        assert_eq!(a.connections.load(Ordering::SeqCst), 2);
        client.close().await;
        assert_eq!(*state.borrow_and_update(), ConnectionState::Gone);
        let e = client.call_raw("echo", json!({})).await.unwrap_err();
        assert!(matches!(e, ClientError::ConnectionLost), "{e:?}");
        assert_eq!(a.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn clients_over_streams_of_the_embedders_own() {
        let a = fake::spawn(|c: FakeConn, _| {
            fake::serve(
                c,
                fake::handler(|_, p| async move { Ok::<_, agent_common::error::ErrorObject>(p) }),
            )
        });
        let stream = tokio::net::UnixStream::connect(&a.path).await.unwrap();
        let once = Client::from_stream("vm-once", stream, client_opts())
            .await
            .unwrap();
        assert_eq!(
            once.call_raw("echo", json!({"a": 1})).await.unwrap(),
            json!({"a": 1})
        );
        once.reset().await;
        // The stream is used up: no reconnect, and the error says so.
        let e = once.call_raw("echo", json!({})).await.unwrap_err();
        assert!(
            matches!(e, ClientError::ConnectionLost | ClientError::Connect { .. }),
            "{e:?}"
        );

        let path = a.path.clone();
        let dialled = Arc::new(AtomicUsize::new(0));
        let d = dialled.clone();
        let client = Client::with_connector(
            "vm-dialled",
            move || {
                d.fetch_add(1, Ordering::SeqCst);
                tokio::net::UnixStream::connect(path.clone())
            },
            client_opts(),
        )
        .await
        .unwrap();
        client.call_raw("echo", json!({})).await.unwrap();
        client.reset().await;
        client.call_raw("echo", json!({})).await.unwrap();
        assert_eq!(
            dialled.load(Ordering::SeqCst),
            2,
            "reconnected through the connector"
        );
        assert_eq!(client.path(), std::path::Path::new("vm-dialled"));
    }
}
