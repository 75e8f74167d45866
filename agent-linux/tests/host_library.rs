//! The host library as a VM platform embeds it, against the real agent
//! binary: `cancel` on the wire, a timed-out command stopped on the agent,
//! flow control under many tasks, and futures dropped at every await point
//! of every call while transfers run (issue 18).

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use agent_common::encoding::Encoding;
use agent_common::methods::{
    CancelParams, CancelRpc, Empty, ExecParams, FileReadParams, FileWriteParams, GetSystemInfoRpc,
};
use common::{error_kind, AgentProcess};
use host_client::{CallOptions, Client, ClientError, ClientOptions, PushOptions};
use serde_json::json;

fn sleep_params(seconds: &str) -> ExecParams {
    ExecParams {
        command: "sleep".into(),
        args: vec![seconds.into()],
        ..Default::default()
    }
}

/// A call that takes the only slot, sent after a `ping` so that the
/// previous reply's slot is free: the agent lets go of a slot once its
/// reply is written, and the ping's reply comes from the same writer after
/// that (a host sending the instant it reads a reply may find it taken).
fn slot_call(
    c: &mut common::Conn,
    id: u64,
    method: &str,
    params: serde_json::Value,
) -> serde_json::Value {
    let r = c.call(1_000 + id, "ping", json!({}));
    assert_eq!(r["result"]["pong"], true, "{r}");
    c.call(id, method, params)
}

#[test]
fn cancel_stops_a_running_command_and_aborts_an_upload() {
    let agent = AgentProcess::start_with(json!({}), json!({"max_concurrent_requests": 1}));
    let mut c = agent.connect();
    let started = agent.write_dir().join("started");
    c.send(&json!({"jsonrpc":"2.0","method":"exec_command",
        "params":{"command":"sh","args":["-c", format!("touch {}; exec sleep 30", started.display())]},
        "id":7}));
    // Once it runs, cancel it (the reply order is not fixed: collect both).
    for _ in 0..2000 {
        if started.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(started.exists(), "the command did not start");
    c.send(&json!({"jsonrpc":"2.0","method":"cancel","params":{"id":7},"id":8}));
    let (mut cancel, mut exec) = (None, None);
    for _ in 0..2 {
        let r = c.recv();
        match r["id"].as_u64() {
            Some(7) => exec = Some(r),
            Some(8) => cancel = Some(r),
            _ => panic!("unexpected reply {r}"),
        }
    }
    let (cancel, exec) = (cancel.unwrap(), exec.unwrap());
    assert_eq!(
        cancel["result"],
        json!({"cancelled": true, "upload_aborted": false})
    );
    assert_eq!(error_kind(&exec), "cancelled", "{exec}");
    // Its only slot is free once that reply is written: the ping's reply
    // comes from the same writer, after it let go of the earlier reply.
    let r = c.call(20, "ping", json!({}));
    assert_eq!(r["result"]["pong"], true, "{r}");
    let r = c.call(9, "exec_command", json!({"command":"true"}));
    assert_eq!(r["result"]["exit_code"], 0, "{r}");
    // Nothing of that id runs any more.
    let r = c.call(10, "cancel", json!({"id": 7}));
    assert_eq!(r["result"]["cancelled"], false, "{r}");
    // A cancel that overtakes its request (each line runs on a task of its
    // own) still stops it, as it starts.
    c.send(&json!({"jsonrpc":"2.0","method":"cancel","params":{"id":31}}));
    let r = slot_call(
        &mut c,
        31,
        "exec_command",
        json!({"command":"sleep","args":["30"]}),
    );
    assert_eq!(error_kind(&r), "cancelled", "{r}");

    // An upload given up is aborted: its next chunk finds nothing.
    let path = agent.write_dir().join("up.bin");
    let r = slot_call(
        &mut c,
        11,
        "file_write",
        json!({"path": path, "content": "aGVsbG8=", "encoding": "base64", "more": true}),
    );
    let upload_id = r["result"]["upload_id"].as_str().unwrap().to_owned();
    let r = c.call(12, "cancel", json!({"upload_id": upload_id}));
    assert_eq!(
        r["result"],
        json!({"cancelled": false, "upload_aborted": true})
    );
    let r = slot_call(
        &mut c,
        13,
        "file_write",
        json!({"path": path, "content": "aGVsbG8=", "encoding": "base64",
               "upload_id": upload_id, "offset": 5, "more": false}),
    );
    assert_eq!(error_kind(&r), "not_found", "{r}");
    assert!(!path.exists());
    // Another connection's upload is not this one's to abort.
    let r = slot_call(
        &mut c,
        14,
        "file_write",
        json!({"path": path, "content": "aGVsbG8=", "encoding": "base64", "more": true}),
    );
    let theirs = r["result"]["upload_id"].as_str().unwrap().to_owned();
    let mut other = agent.connect();
    let r = other.call(1, "cancel", json!({"upload_id": theirs}));
    assert_eq!(r["result"]["upload_aborted"], false, "{r}");
    // Neither member: a clear refusal.
    let r = c.call(15, "cancel", json!({}));
    assert_eq!(error_kind(&r), "invalid_params", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upload_id"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_exec_is_cancelled_on_the_agent_and_frees_its_slot() {
    let agent = AgentProcess::start_with(json!({}), json!({"max_concurrent_requests": 1}));
    let client = Client::connect(&agent.socket).await.unwrap();
    let e = client
        .timeout(Duration::from_millis(300))
        .exec(&sleep_params("30"))
        .await
        .unwrap_err();
    assert!(e.is_timeout() && e.may_have_run(), "{e:?}");
    // Flow control keeps the next call back until the agent answers the
    // cancelled one (its permit is kept until that late reply); without the
    // cancel that would be 30 s, past this call's limit. (The client's busy
    // retries cover only the instant between the agent writing a reply and
    // letting go of its slot.)
    let strict = client.with_call_options(CallOptions {
        timeout: Some(Duration::from_secs(20)),
        ..CallOptions::default()
    });
    let r = strict
        .exec(&ExecParams {
            command: "true".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_calls_from_eight_tasks_against_the_default_agent_all_succeed() {
    let agent = AgentProcess::start();
    let client = Client::connect(&agent.socket).await.unwrap();
    assert_eq!(client.limits().await.unwrap().max_concurrent_requests, 10);
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                let calls = (0..100).filter(|i| i % 8 == t).map(|i| {
                    let client = client.clone();
                    async move {
                        if i % 2 == 0 {
                            client.exec(&sleep_params("0.05")).await.map(|_| ())
                        } else {
                            client.call::<GetSystemInfoRpc>(&Empty {}).await.map(|_| ())
                        }
                    }
                });
                futures::future::join_all(calls).await
            })
        })
        .collect();
    let mut done = 0;
    for t in tasks {
        for r in t.await.unwrap() {
            r.unwrap();
            done += 1;
        }
    }
    assert_eq!(done, 100);
}

/// Writes `size` bytes of a pattern to `path`.
fn pattern_file(path: &Path, size: usize) {
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    std::fs::write(path, data).unwrap();
}

/// Polls `inner` at most `left` times (the first, then once per wake),
/// and gives up (dropping it with `self`) at the next wake: `None`.
struct PollAtMost<F> {
    inner: F,
    left: usize,
}

impl<F: Future + Unpin> Future for PollAtMost<F> {
    type Output = Option<F::Output>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        Pin::new(&mut self.inner).poll(cx).map(Some)
    }
}

type Op<'a> = Pin<Box<dyn Future<Output = Result<(), ClientError>> + Send + 'a>>;

/// Every kind of call the library makes, as a future to drop.
fn op<'a>(client: &'a Client, which: usize, files: &'a Files) -> Op<'a> {
    match which {
        0 => Box::pin(async move { client.ping().await.map(|_| ()) }),
        1 => Box::pin(async move { client.agent_info().await.map(|_| ()) }),
        2 => Box::pin(async move { client.exec(&sleep_params("0.2")).await.map(|_| ()) }),
        3 => Box::pin(async move {
            client
                .read_bytes(&files.guest_src, 0, 4096)
                .await
                .map(|_| ())
        }),
        4 => Box::pin(async move {
            let p = FileWriteParams {
                path: files.guest_small.clone(),
                ..Default::default()
            };
            client
                .write_bytes(&p, bytes::Bytes::from_static(b"small"))
                .await
                .map(|_| ())
        }),
        5 => Box::pin(async move {
            client
                .push(
                    &files.local_src,
                    &files.guest_dst,
                    PushOptions::default(),
                    |_| {},
                )
                .await
                .map(|_| ())
        }),
        6 => Box::pin(async move {
            client
                .pull(&files.guest_src, &files.local_dst, |_| {})
                .await
                .map(|_| ())
        }),
        7 => Box::pin(async move {
            // Connecting and syncing, then a call on the new connection.
            let other = Client::connect(&files.socket).await?;
            other.call::<GetSystemInfoRpc>(&Empty {}).await.map(|_| ())
        }),
        8 => Box::pin(async move {
            let p = FileReadParams {
                path: files.guest_src.clone(),
                length: Some(1 << 20),
                encoding: Encoding::Base64,
                ..Default::default()
            };
            client.read_chunk(&p).await.map(|_| ())
        }),
        9 => Box::pin(async move {
            client
                .call_raw("get_disk_usage", json!({"include_virtual": false}))
                .await
                .map(|_| ())
        }),
        _ => unreachable!(),
    }
}

const OPS: usize = 10;

struct Files {
    socket: PathBuf,
    local_src: PathBuf,
    local_dst: PathBuf,
    guest_src: String,
    guest_dst: String,
    guest_small: String,
}

/// Waits until `check` passes, retrying for up to 30 s (a hang guard: what
/// it waits for is the agent acting on `cancel` notifications written by
/// tasks of the client).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut last = String::new();
    for _ in 0..300 {
        match check().await {
            Ok(()) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn futures_dropped_at_every_await_point_leave_the_connection_in_step_and_the_agent_free() {
    let agent = AgentProcess::start();
    let local = tempfile::tempdir().unwrap();
    let files = Files {
        socket: agent.socket.clone(),
        local_src: local.path().join("src.bin"),
        local_dst: local.path().join("dst.bin"),
        guest_src: agent.write_dir().join("src.bin").display().to_string(),
        guest_dst: agent.write_dir().join("dst.bin").display().to_string(),
        guest_small: agent.write_dir().join("small.bin").display().to_string(),
    };
    // Three 1 MiB chunks and a bit: the first, middle ones in flight, the
    // commit.
    pattern_file(&files.local_src, 3 * (1 << 20) + 4321);
    std::fs::copy(&files.local_src, &files.guest_src).unwrap();
    let client = Client::connect(&agent.socket).await.unwrap();

    // Transfers keep running on the same client all along.
    let stop = tokio_util::sync::CancellationToken::new();
    let background = {
        let (client, stop) = (client.clone(), stop.clone());
        let (src, dst) = (files.local_src.clone(), agent.write_dir().join("bg.bin"));
        let (guest_src, pulled) = (files.guest_src.clone(), local.path().join("bg-pulled.bin"));
        tokio::spawn(async move {
            let mut rounds = 0u32;
            while !stop.is_cancelled() {
                let dst = dst.display().to_string();
                client
                    .push(&src, &dst, PushOptions::default(), |_| {})
                    .await
                    .expect("a background push");
                client
                    .pull(&guest_src, &pulled, |_| {})
                    .await
                    .expect("a background pull");
                rounds += 1;
            }
            rounds
        })
    };

    let mut dropped = [0usize; OPS];
    for (which, count) in dropped.iter_mut().enumerate() {
        // Resume the call k times (each time it was woken: it passed an
        // await point) and drop it at the next, for k = 0, 1, 2, ... until
        // the call completes by itself: every await point it reached was a
        // drop point.
        let mut k = 0;
        loop {
            let finished = PollAtMost {
                inner: op(&client, which, &files),
                left: k + 1,
            }
            .await;
            if let Some(r) = finished {
                r.unwrap_or_else(|e| panic!("op {which} failed undisturbed: {e}"));
                break;
            }
            *count += 1;
            // The connection is in step: the next calls work, including
            // one with an attachment (issue 18's misleading "announced an
            // attachment larger than" came from here).
            client.ping().await.expect("a ping after a drop");
            if k % 8 == 0 {
                client
                    .read_bytes(&files.guest_src, 0, 1 << 20)
                    .await
                    .expect("a read after a drop");
            }
            k += 1;
            assert!(k < 5000, "op {which} never completed");
        }
    }
    stop.cancel();
    let rounds = background.await.unwrap();
    assert!(rounds > 0);
    assert!(dropped.iter().all(|&n| n > 0), "{dropped:?}");
    eprintln!("dropped per op {dropped:?}, background rounds {rounds}");

    // Everything still works on the same connection...
    client.ping().await.unwrap();
    op(&client, 5, &files).await.unwrap();
    assert_eq!(
        std::fs::read(&files.guest_dst).unwrap(),
        std::fs::read(&files.local_src).unwrap()
    );

    // ...and the agent holds nothing for the calls given up, while this
    // connection stays open: all 16 upload places and all 10 slots can be
    // taken from another connection.
    let other = Client::connect_with(
        &agent.socket,
        ClientOptions {
            flow_control: false,
            busy_retries: 0,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    eventually("16 uploads can be opened", || async {
        let mut ids = Vec::new();
        let mut busy = None;
        for i in 0..16 {
            let p = FileWriteParams {
                path: agent
                    .write_dir()
                    .join(format!("u{i}"))
                    .display()
                    .to_string(),
                more: true,
                ..Default::default()
            };
            match other.write_bytes(&p, bytes::Bytes::from_static(b"x")).await {
                Ok(r) => ids.extend(r.upload_id),
                Err(e) => {
                    busy = Some(format!("upload {i}: {e}"));
                    break;
                }
            }
        }
        for id in ids {
            other
                .call::<CancelRpc>(&CancelParams {
                    id: None,
                    upload_id: Some(id),
                })
                .await
                .map_err(|e| e.to_string())?;
        }
        busy.map_or(Ok(()), Err)
    })
    .await;
    eventually("10 slots are free", || async {
        let params = sleep_params("0.3");
        let calls = (0..10).map(|_| other.exec(&params));
        for r in futures::future::join_all(calls).await {
            r.map_err(|e| e.to_string())?;
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_dropped_mid_transfer_do_not_use_up_the_agents_uploads() {
    // Issue 18: after 16 pushes dropped mid-transfer, every push failed
    // with `busy` (for every host) until the connection closed.
    let agent = AgentProcess::start();
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src.bin");
    pattern_file(&src, 4 * (1 << 20));
    let client = Client::connect(&agent.socket).await.unwrap();
    for i in 0..20 {
        let guest = agent
            .write_dir()
            .join(format!("d{i}"))
            .display()
            .to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut tx = Some(tx);
        let push = client.push(&src, &guest, PushOptions::default(), |p| {
            // Dropped once the agent acknowledged the first chunk: the
            // upload is open.
            if p.done > 0 {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        });
        tokio::select! {
            r = push => panic!("push {i} was to be dropped, it ended: {r:?}"),
            _ = rx => {}
        }
        assert!(!Path::new(&guest).exists(), "push {i} left its file");
    }
    // The connection stays open: only the aborts free the upload places.
    // Another host pushes with no busy retries (hang guard: the aborts are
    // written by the client's tasks).
    let other = Client::connect_with(
        &agent.socket,
        ClientOptions {
            busy_retries: 0,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    let guest = agent.write_dir().join("after").display().to_string();
    eventually("a push after 20 dropped ones", || async {
        other
            .push(&src, &guest, PushOptions::default(), |_| {})
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    client.ping().await.unwrap();
    assert_eq!(std::fs::read(&guest).unwrap(), std::fs::read(&src).unwrap());
}
