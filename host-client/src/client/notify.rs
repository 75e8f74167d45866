//! Notifications from the agent and the subscriptions that receive them.
//!
//! A notification is a JSON-RPC request object without `id` that the agent
//! writes of its own accord, possibly announcing an attachment like a reply
//! does. The reader task reads it (and its attachment, always, so framing
//! stays in step) and hands a copy to every [`Subscription`] for its method;
//! with none, it is dropped.
//!
//! Delivery never blocks the reader: each subscription has a bounded
//! channel, and a notification that finds it full is dropped for that
//! subscription (counted in [`Subscription::dropped`], logged once). A slow
//! subscriber thus loses notifications but never stalls the replies of other
//! calls. This layer is delivery only: flow control of streams is to be
//! per stream and credit-based on the agent's side, so that a well-behaved
//! consumer granting credit never sees its channel fill.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard, Weak};

use agent_common::jsonrpc::{parse_message, Incoming};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

/// Notifications a [`Subscription`] holds before further ones are dropped,
/// with [`Client::subscribe`](crate::Client::subscribe).
pub const DEFAULT_SUBSCRIPTION_CAPACITY: usize = 256;

/// A message the agent sent of its own accord: a JSON-RPC request object
/// without `id`.
#[derive(Debug, Clone)]
pub struct Notification {
    /// The method name, the key subscriptions are made by.
    pub method: String,
    /// The raw `params` member; `null` when absent.
    pub params: Box<RawValue>,
    /// The bytes the notification announced with a top-level `attachment`
    /// member, if it did.
    pub attachment: Option<Bytes>,
}

impl Notification {
    /// Decodes `params` into a typed value.
    ///
    /// ```
    /// # use host_client::Notification;
    /// # let n = Notification {
    /// #     method: "stream_data".into(),
    /// #     params: serde_json::value::to_raw_value(&serde_json::json!({"stream": 3})).unwrap(),
    /// #     attachment: None,
    /// # };
    /// let p: serde_json::Value = n.params()?;
    /// assert_eq!(p["stream"], 3);
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.params.get())
    }
}

/// A notification line as the reader task parsed it, before its attachment
/// (if any) arrived.
#[derive(Debug)]
pub(super) struct Header {
    pub(super) method: String,
    pub(super) params: Box<RawValue>,
    /// The announced attachment length.
    pub(super) attachment: Option<u64>,
}

impl Header {
    /// The notification `line` holds, if it is one: a single well-formed
    /// request without `id`.
    pub(super) fn parse(line: &[u8]) -> Option<Header> {
        match parse_message(line) {
            Incoming::Single(Ok(req)) if req.id.is_none() => Some(Header {
                method: req.method,
                params: req.params.unwrap_or_else(null),
                attachment: req.attachment,
            }),
            _ => None,
        }
    }

    pub(super) fn into_notification(self, attachment: Option<Bytes>) -> Notification {
        Notification {
            method: self.method,
            params: self.params,
            attachment,
        }
    }
}

fn null() -> Box<RawValue> {
    // A literal that is valid JSON, so this cannot fail.
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!())
}

/// One subscription's end in the registry.
struct Entry {
    id: u64,
    tx: mpsc::Sender<Notification>,
    dropped: Arc<AtomicU64>,
}

/// The subscriptions of one client, by method. Shared by the client, which
/// outlives its connections (so subscriptions survive a reconnect), and the
/// reader task of the current connection.
#[derive(Default)]
pub(crate) struct Subscribers {
    by_method: StdMutex<HashMap<String, Vec<Entry>>>,
    next_id: AtomicU64,
}

impl Subscribers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<Entry>>> {
        // Every critical section is a single insert, remove or scan, so a
        // panic inside one leaves the map consistent.
        self.by_method.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new subscription to `method`, holding up to `capacity` (at least 1)
    /// notifications.
    pub(crate) fn subscribe(self: &Arc<Self>, method: &str, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicU64::new(0));
        self.lock()
            .entry(method.to_owned())
            .or_default()
            .push(Entry {
                id,
                tx,
                dropped: dropped.clone(),
            });
        Subscription {
            method: method.to_owned(),
            id,
            rx,
            dropped,
            registry: Arc::downgrade(self),
        }
    }

    /// True if anybody is subscribed to `method`.
    pub(super) fn wants(&self, method: &str) -> bool {
        self.lock().contains_key(method)
    }

    /// Hands `n` to every subscription for its method without waiting: a
    /// full subscription does not get it.
    pub(super) fn deliver(&self, n: Notification) {
        let map = self.lock();
        let Some(entries) = map.get(&n.method) else {
            tracing::debug!(method = %n.method, "dropping a notification nobody subscribed to");
            return;
        };
        for e in entries {
            match e.tx.try_send(n.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if e.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(
                            method = %n.method,
                            "a subscriber is not keeping up: dropping notifications"
                        );
                    }
                }
                // The subscription is being dropped; its Drop removes it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    fn unsubscribe(&self, method: &str, id: u64) {
        let mut map = self.lock();
        if let Some(entries) = map.get_mut(method) {
            entries.retain(|e| e.id != id);
            if entries.is_empty() {
                map.remove(method);
            }
        }
    }
}

/// The notifications of one method, from [`Client::subscribe`](crate::Client::subscribe).
///
/// Dropping it unsubscribes. It keeps receiving across reconnects of its
/// client; [`Subscription::recv`] returns `None` once every clone of the
/// client is gone.
#[derive(Debug)]
pub struct Subscription {
    method: String,
    id: u64,
    rx: mpsc::Receiver<Notification>,
    dropped: Arc<AtomicU64>,
    registry: Weak<Subscribers>,
}

impl Subscription {
    /// The next notification, or `None` once the client is gone.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) {
    /// let mut sub = client.subscribe("stream_data");
    /// while let Some(n) = sub.recv().await {
    ///     println!("{} with {:?} bytes", n.params.get(), n.attachment.map(|a| a.len()));
    /// }
    /// # }
    /// ```
    pub async fn recv(&mut self) -> Option<Notification> {
        self.rx.recv().await
    }

    /// The next notification if one is waiting, without waiting.
    ///
    /// ```
    /// # use host_client::{Client, ClientOptions};
    /// let client = Client::lazy("/tmp/vm.sock", ClientOptions::default());
    /// let mut sub = client.subscribe("stream_data");
    /// assert!(sub.try_recv().is_none());
    /// ```
    pub fn try_recv(&mut self) -> Option<Notification> {
        self.rx.try_recv().ok()
    }

    /// The method subscribed to.
    ///
    /// ```
    /// # use host_client::{Client, ClientOptions};
    /// let client = Client::lazy("/tmp/vm.sock", ClientOptions::default());
    /// assert_eq!(client.subscribe("stream_data").method(), "stream_data");
    /// ```
    pub fn method(&self) -> &str {
        &self.method
    }

    /// Notifications dropped so far because this subscription's channel was
    /// full.
    ///
    /// ```
    /// # use host_client::{Client, ClientOptions};
    /// let client = Client::lazy("/tmp/vm.sock", ClientOptions::default());
    /// assert_eq!(client.subscribe("stream_data").dropped(), 0);
    /// ```
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.unsubscribe(&self.method, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{json, Value};

    use super::*;
    use crate::fake::{self, notify, reply, FakeConn};
    use crate::Client;

    use crate::fake::client_opts as opts;

    async fn synced(c: &mut FakeConn) {
        let (id, nonce) = c.expect_sync().await;
        reply(c, id, json!({ "nonce": nonce })).await;
    }

    async fn next(sub: &mut Subscription) -> Notification {
        tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("a notification in time")
            .expect("the client is alive")
    }

    #[test]
    fn only_single_requests_without_id_are_notifications() {
        let n =
            Header::parse(br#"{"jsonrpc":"2.0","method":"ev","params":{"a":1},"attachment":3}"#)
                .unwrap();
        assert_eq!((n.method.as_str(), n.params.get()), ("ev", r#"{"a":1}"#));
        assert_eq!(n.attachment, Some(3));
        let n = Header::parse(br#"{"jsonrpc":"2.0","method":"ev"}"#).unwrap();
        assert_eq!(n.params.get(), "null");
        for line in [
            &br#"{"jsonrpc":"2.0","method":"ev","id":1}"#[..],
            br#"[{"jsonrpc":"2.0","method":"ev"}]"#,
            br#"{"jsonrpc":"1.0","method":"ev"}"#,
            br#"{"jsonrpc":"2.0","result":{},"id":1}"#,
            b"not json",
        ] {
            assert!(
                Header::parse(line).is_none(),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[tokio::test]
    async fn notifications_with_and_without_attachments_interleave_with_replies() {
        let agent = fake::spawn(|mut c: FakeConn, _| async move {
            let (id, nonce) = c.expect_sync().await;
            // Stale before the sync reply: dropped, and its attachment
            // member not trusted (else it would eat the sync reply).
            notify(&c, "ev", json!({"n": 0}), None).await;
            c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"ev\",\"attachment\":9}\n")
                .await;
            reply(&c, id, json!({ "nonce": nonce })).await;
            while let Some(req) = c.next_request().await {
                let id = req.id.unwrap();
                let n = id.as_u64().unwrap();
                notify(&c, "ev", json!({"n": n, "kind": "plain"}), None).await;
                // Data that looks like lines, a reply to this very call and
                // the resync byte: all of it is attachment.
                let data = format!(
                    "\n\u{0}{{\"jsonrpc\":\"2.0\",\"result\":{{\"fake\":true}},\"id\":{n}}}\n"
                );
                let mut data = data.into_bytes();
                data.push(0xff);
                notify(&c, "ev", json!({"n": n, "kind": "data"}), Some(&data)).await;
                notify(&c, "other", json!({}), Some(&data)).await;
                reply(&c, id, json!({"pong": true, "timestamp": 42})).await;
            }
        });
        // Subscribed before connecting, so the stale ones would be seen.
        let client = Client::lazy(&agent.path, opts());
        let mut sub = client.subscribe("ev");
        for _ in 0..3 {
            assert_eq!(client.ping().await.unwrap().timestamp, 42);
            let plain = next(&mut sub).await;
            assert_eq!(plain.method, "ev");
            let p: Value = plain.params().unwrap();
            assert_eq!(p["kind"], "plain");
            assert!(plain.attachment.is_none());
            let data = next(&mut sub).await;
            let q: Value = data.params().unwrap();
            assert_eq!((&q["kind"], &q["n"]), (&json!("data"), &p["n"]));
            let bytes = data.attachment.unwrap();
            assert!(bytes.starts_with(b"\n\0{") && bytes.ends_with(b"}\n\xff"));
        }
        assert!(sub.try_recv().is_none(), "the stale ones were dropped");
        assert_eq!(sub.dropped(), 0);
    }

    #[tokio::test]
    async fn an_unsubscribed_attachment_is_consumed_and_the_next_reply_read() {
        let agent = fake::spawn(|mut c: FakeConn, _| async move {
            synced(&mut c).await;
            while let Some(req) = c.next_request().await {
                let id = req.id.unwrap();
                // A forged reply inside the attachment: taken as a reply
                // only if the client lost framing.
                let forged = serde_json::to_vec(&json!({
                    "jsonrpc": "2.0", "result": {"pong": true, "timestamp": 666}, "id": id
                }))
                .unwrap();
                let mut data = b"\n".to_vec();
                data.extend_from_slice(&forged);
                data.push(b'\n');
                notify(&c, "nobody", json!({}), Some(&data)).await;
                notify(&c, "nobody", json!({}), Some(b"")).await;
                reply(&c, id, json!({"pong": true, "timestamp": 42})).await;
            }
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        for _ in 0..3 {
            assert_eq!(client.ping().await.unwrap().timestamp, 42);
        }
        assert_eq!(
            agent.connections.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    }

    #[tokio::test]
    async fn a_full_subscription_drops_and_never_stalls_calls() {
        const BURST: u64 = 100;
        let agent = fake::spawn(|mut c: FakeConn, _| async move {
            synced(&mut c).await;
            while let Some(req) = c.next_request().await {
                for i in 0..BURST {
                    notify(&c, "ev", json!({"i": i}), Some(&[7u8; 1000])).await;
                }
                reply(&c, req.id.unwrap(), json!({"pong": true, "timestamp": 42})).await;
            }
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        let mut slow = client.subscribe_with_capacity("ev", 2);
        let mut keen = client.subscribe_with_capacity("ev", 1000);
        for _ in 0..5 {
            let r = tokio::time::timeout(Duration::from_secs(5), client.ping()).await;
            assert_eq!(r.expect("not stalled").unwrap().timestamp, 42);
        }
        // The reader handled each burst before the reply that followed it.
        assert_eq!(slow.dropped(), 5 * BURST - 2);
        let first: Value = slow.try_recv().unwrap().params().unwrap();
        assert_eq!(first["i"], 0);
        assert!(slow.try_recv().is_some() && slow.try_recv().is_none());
        assert_eq!(keen.dropped(), 0);
        let mut got = 0;
        while keen.try_recv().is_some() {
            got += 1;
        }
        assert_eq!(got, 5 * BURST);
    }

    #[tokio::test]
    async fn subscriptions_survive_a_reconnect_and_end_when_dropped_or_the_client_is_gone() {
        let agent = fake::spawn(|mut c: FakeConn, conn| async move {
            synced(&mut c).await;
            let req = c.next_request().await.unwrap();
            notify(&c, "ev", json!({"conn": conn}), None).await;
            reply(&c, req.id.unwrap(), json!({"pong": true, "timestamp": 42})).await;
            // Then the agent restarts (connection 0) or stays (others).
            if conn > 0 {
                while c.next_request().await.is_some() {}
            }
        });
        let client = Client::connect_with(&agent.path, opts()).await.unwrap();
        let mut sub = client.subscribe("ev");
        let mut other = client.subscribe("ev");
        assert_eq!(client.ping().await.unwrap().timestamp, 42);
        let p: Value = next(&mut sub).await.params().unwrap();
        assert_eq!(p["conn"], 0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(client.ping().await.unwrap().timestamp, 42);
        let p: Value = next(&mut sub).await.params().unwrap();
        assert_eq!(p["conn"], 1);
        assert_eq!(
            agent.connections.load(std::sync::atomic::Ordering::SeqCst),
            2
        );

        drop(sub);
        assert!(client.inner.subscribers.wants("ev"), "one is left");
        drop(other.try_recv());
        let registry = Arc::downgrade(&client.inner.subscribers);
        drop(client);
        // The reader task ends with the connection, and with it the last
        // sender.
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while other.recv().await.is_some() {}
        });
        end.await.expect("recv ends once the client is gone");
        assert!(registry.upgrade().is_none());
    }

    #[test]
    fn unsubscribing_one_leaves_the_others() {
        let registry = Arc::new(Subscribers::default());
        let a = registry.subscribe("ev", 1);
        let mut b = registry.subscribe("ev", 1);
        drop(a);
        registry.deliver(Notification {
            method: "ev".into(),
            params: null(),
            attachment: None,
        });
        assert!(b.try_recv().is_some());
        drop(b);
        assert!(!registry.wants("ev"), "dropping unsubscribes");
    }
}
