//! The method core: from one call to its outcome, and the JSON-RPC
//! envelope around it.
//!
//! [`Agent::handle`] takes a parsed line (the envelope,
//! `agent_common::envelope`, sorted it into single requests, batches and
//! notifications) and the [`Session`] it came on, runs each request through
//! `Agent::call` and assembles the one reply line owed. `call` applies, in
//! one place and from each method's [`Facts`](agent_common::methods::Facts)
//! (declared beside its types in agent-common's method table, never in a
//! list here):
//! - instant methods (`ping`, `sync`, `get_agent_info`, `cancel`) are answered at once
//!   and never wait behind other work;
//! - every other request takes a slot of `max_concurrent_requests`, held
//!   until its reply is written; when all are taken the request is answered
//!   `busy` at once;
//! - a method bounded by the request time limit gets
//!   `request_timeout_seconds`; one with its own (`exec_command`) is bounded
//!   inside; a `file_write` given up on never takes place afterwards
//!   ([`CommitGate`]);
//! - when the agent stops, requests still running are cancelled and
//!   answered `shutting_down`; a request the host cancels (`cancel` with
//!   its id, `crate::cancel`) is given up the same way and answered
//!   `cancelled`;
//! - methods that change the guest are logged with their outcome.
//!
//! `run` is the one `match` from method to handler; each arm names the
//! method's `Rpc` type, so a handler that takes or gives the wrong types
//! does not compile. Handlers know nothing of the wire: a second envelope
//! (another protocol) calls the same core.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_common::encoding::Encoding;
use agent_common::envelope::{self, ReplyLine};
use agent_common::error::{ErrorKind, ErrorObject};
use agent_common::jsonrpc::{parse_message, Entry, Incoming, Request, Response};
use agent_common::methods::{
    AgentInfo, CancelResult, CancelRpc, ExecCommandRpc, FileReadRpc, FileWriteRpc, GetAgentInfoRpc,
    GetDiskUsageRpc, GetNetworkInfoRpc, GetSystemInfoRpc, Method, PingResult, PingRpc, PowerParams,
    PowerResult, RebootRpc, Rpc, ShutdownRpc, SyncResult, SyncRpc, TimeLimit,
};
use agent_common::methods::{
    ExecResizeRpc, ExecSignalRpc, ExecStartRpc, FileReadStreamRpc, FollowLogRpc, ForwardOpenRpc,
    StreamAck, StreamCloseRpc, StreamCreditRpc, StreamDataRpc, StreamResetRpc,
};
use agent_common::methods::{
    FsFreezeRpc, FsFreezeStatusRpc, FsThawRpc, FsTrimRpc, GetFsinfoRpc, GetMemoryBlocksRpc,
    GetStatsRpc, GetTimeRpc, GetUsersRpc, GetVcpusRpc, SetMemoryBlocksRpc, SetTimeRpc,
    SetUserPasswordRpc, SetVcpusRpc, SshKeysAddRpc, SshKeysGetRpc, SshKeysParams, SshKeysRemoveRpc,
    SshKeysSetRpc, ThawReason,
};
use agent_common::methods::{GetBlockDevicesRpc, SuspendRpc};
use agent_common::methods::{GetMetricsRpc, KillProcessRpc, ListProcessesRpc, ReadLogRpc};
use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument, Span};

use crate::buffers::BufferPool;
use crate::config::Config;
use crate::error::{to_error_object, RpcError};
use crate::files::{CommitGate, FileService};
use crate::ops::freeze::FreezeService;
use crate::ops::users::{KeysOp, SystemUsers};
use crate::ops::{cpu, disks, logs, memory, mounts, procs, stats, time, trim, users};
use crate::payload::Payload;
use crate::power::PowerAction;
use crate::session::Session;
use crate::{exec, sysinfo};

/// Name reported by `get_agent_info`.
pub const AGENT_NAME: &str = "kvmmanager-agent";

/// The agent's shared state: configuration, services and limits.
pub struct Agent {
    config: Arc<Config>,
    files: FileService,
    slots: Arc<Semaphore>,
    /// Cancelled when in-flight requests must stop (end of the shutdown grace).
    abort: CancellationToken,
    /// `fs_freeze` state: while frozen, methods that could write answer
    /// `frozen`.
    freeze: Arc<FreezeService>,
    /// `allowed_read_paths`, for `read_log`.
    log_paths: Arc<crate::policy::PathPolicy>,
    /// Streamed commands running (`exec_start`).
    execs: Arc<crate::exec_stream::Execs>,
}

pub use crate::session::SessionId;

/// An encoded reply line and what to do once it has been written.
#[derive(Debug)]
pub struct Outgoing {
    /// The reply, one JSON line with its `\n`.
    pub line: BytesMut,
    /// The raw bytes the line announces, written right after it.
    pub attachment: Option<Payload>,
    /// A power action to start after the line is flushed.
    pub after: Option<PowerAction>,
    /// Permits released when the reply has been written (or dropped): the
    /// request's concurrency slot and its session's place in the queue, so
    /// that a host that does not read its replies holds them and gets no
    /// more work done (see `server.rs`).
    pub hold: Vec<OwnedSemaphorePermit>,
}

impl Outgoing {
    /// A reply that carries nothing else (a framing error).
    pub fn reply(response: Response) -> Outgoing {
        let (line, _) = ReplyLine::single(false, Some(response))
            .map(|l| l.encode())
            .unwrap_or_default();
        Outgoing {
            line,
            attachment: None,
            after: None,
            hold: Vec::new(),
        }
    }
}

/// The outcome of one method call before encoding.
/// What the core answers for one call, before any envelope encodes it.
pub(crate) struct Outcome {
    /// The method's result as JSON, or its error.
    pub(crate) result: Result<Box<RawValue>, ErrorObject>,
    /// Data for the reply's attachment (`file_read`).
    pub(crate) attachment: Option<Payload>,
    /// A power action to start once the reply is written.
    pub(crate) after: Option<PowerAction>,
    /// The concurrency slot the call took, held until its reply is written.
    pub(crate) slot: Option<OwnedSemaphorePermit>,
}

/// One request's reply before encoding, with what it holds.
struct Answer {
    response: Response,
    held: Held,
}

/// What an answer brings besides its reply: data, an action, its slot.
struct Held {
    attachment: Option<Payload>,
    after: Option<PowerAction>,
    slot: Option<OwnedSemaphorePermit>,
}

impl Answer {
    fn split(self) -> (Response, Held) {
        (self.response, self.held)
    }
}

/// What a call receives besides its params.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Context {
    /// A request on its own line: it may carry and return attachments.
    Single,
    /// A request inside a batch: no attachments either way.
    Batch,
}

impl Outcome {
    fn ok<T: Serialize>(value: &T) -> Outcome {
        Outcome {
            result: serde_json::value::to_raw_value(value).map_err(|e| {
                ErrorObject::new(
                    ErrorKind::InternalError,
                    format!("could not encode the result: {e}"),
                )
            }),
            attachment: None,
            after: None,
            slot: None,
        }
    }

    /// The result of method `M`.
    fn of<M: Rpc>(value: &M::Result) -> Outcome {
        Outcome::ok(value)
    }

    fn err(e: ErrorObject) -> Outcome {
        Outcome {
            result: Err(e),
            attachment: None,
            after: None,
            slot: None,
        }
    }
}

/// Why a blocking task failed to produce an answer.
#[derive(Debug, thiserror::Error)]
#[error("the worker thread failed")]
struct JoinError(#[source] tokio::task::JoinError);

impl RpcError for JoinError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::InternalError
    }
}

impl Agent {
    /// Builds the agent from a validated configuration.
    pub fn new(config: Config) -> Arc<Agent> {
        let config = Arc::new(config);
        Arc::new(Agent {
            files: FileService::new(config.clone()),
            slots: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            abort: CancellationToken::new(),
            freeze: FreezeService::new(&config),
            log_paths: Arc::new(crate::policy::PathPolicy::new(
                &config.security.allowed_read_paths,
            )),
            execs: Arc::default(),
            config,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The freeze state (`fs_freeze`).
    pub fn freeze_service(&self) -> &Arc<FreezeService> {
        &self.freeze
    }

    /// Thaws what `fs_freeze` froze: the agent never leaves the guest
    /// frozen behind it when it stops.
    pub async fn thaw_at_exit(&self) {
        if self.freeze.is_frozen() {
            match self.freeze.thaw(ThawReason::Shutdown).await {
                Ok(t) => info!(mount_points = ?t.thawed, "thawed at exit"),
                Err(e) => warn!(error = %crate::error::chain(&e), "could not thaw at exit"),
            }
        }
    }

    /// Cancels every request still running (they are answered `shutting_down`)
    /// and discards staged uploads.
    pub fn abort_all(&self) {
        self.abort.cancel();
        self.files.abort_all();
    }

    /// The buffers file data is read into, either way (`crate::buffers`).
    pub fn transfer_buffers(&self) -> Arc<BufferPool> {
        self.files.transfer_buffers()
    }

    /// Frees the memory kept for reuse (pooled transfer buffers) and hands the
    /// heap's free memory back to the kernel: once a session's last request
    /// is done.
    pub fn release_memory(&self) {
        self.files.release_buffers();
        crate::buffers::release_free_memory();
    }

    /// Forgets what belongs to a closed connection (its staged uploads).
    /// While filesystems are frozen, deleting their staging files would
    /// block: that waits for the thaw, on a task of its own.
    pub fn end_session(self: &Arc<Self>, session: SessionId) {
        if self.freeze.is_frozen() {
            let agent = self.clone();
            tokio::spawn(async move {
                agent.freeze.thawed().await;
                agent.files.end_session(session.0);
            });
            return;
        }
        self.files.end_session(session.0);
    }

    /// The reply to a line that exceeded `max_message_size_kb`.
    pub fn oversized_reply(&self) -> Outgoing {
        warn!(
            limit = self.config.max_message_size,
            "discarded an oversized request line and the input up to the next resync byte"
        );
        Outgoing::reply(envelope::oversized(self.config.max_message_size as u64))
    }

    /// Handles one request line that carries no attachment, for a session
    /// with no writer (tests and tools); `None` when nothing is owed.
    pub async fn handle_line(
        self: &Arc<Self>,
        session: SessionId,
        line: &[u8],
    ) -> Option<Outgoing> {
        let session = Session::detached(session);
        self.handle(&session, parse_message(line), None).await
    }

    /// Handles one parsed line and the attachment that followed it: the
    /// JSON-RPC envelope (single, batch, notifications) around
    /// `Agent::call`. `None` when nothing is owed (notifications).
    pub async fn handle(
        self: &Arc<Self>,
        session: &Session,
        incoming: Incoming,
        attachment: Option<Bytes>,
    ) -> Option<Outgoing> {
        let (answers, line) = match incoming {
            Incoming::Single(entry) => {
                let sync = envelope::is_sync(&entry);
                let answer = self
                    .handle_entry(session, entry, Context::Single, attachment)
                    .await;
                let (response, answer) = answer.map(Answer::split).unzip();
                (
                    answer.into_iter().collect::<Vec<_>>(),
                    ReplyLine::single(sync, response),
                )
            }
            Incoming::Batch(entries) => {
                let answers = join_all(
                    entries
                        .into_iter()
                        .map(|e| self.handle_entry(session, e, Context::Batch, None)),
                )
                .await;
                let (responses, answers): (Vec<_>, Vec<_>) =
                    answers.into_iter().flatten().map(Answer::split).unzip();
                (answers, ReplyLine::batch(responses.into_iter().map(Some)))
            }
        };
        let line = line?;
        let (bytes, whole) = line.encode();
        let mut out = Outgoing {
            line: bytes,
            attachment: None,
            after: None,
            hold: Vec::new(),
        };
        for a in answers {
            // Only a single request's reply carries data, and only whole.
            if whole {
                out.attachment = out.attachment.or(a.attachment);
            }
            out.after = out.after.or(a.after);
            out.hold.extend(a.slot);
        }
        Some(out)
    }

    async fn handle_entry(
        self: &Arc<Self>,
        session: &Session,
        entry: Entry,
        cx: Context,
        attachment: Option<Bytes>,
    ) -> Option<Answer> {
        let req = match entry {
            Ok(req) => req,
            Err(response) => {
                return Some(Answer {
                    response,
                    held: Held {
                        attachment: None,
                        after: None,
                        slot: None,
                    },
                })
            }
        };
        // The span names the request in what it logs; the methods answered
        // from memory log nothing, and a span (its fields formatted by the
        // subscriber, entered at every poll) would cost `ping` more than
        // its answer.
        let span = if Method::from_name(&req.method).is_some_and(answered_from_memory) {
            Span::none()
        } else {
            info_span!("request", method = %req.method, id = %req.id.as_ref().map_or("-".into(), |i| i.to_string()))
        };
        let id = req.id.clone();
        let outcome = self
            .call(session, &req, cx, attachment)
            .instrument(span)
            .await;
        // Notifications are carried out but never answered; a power action
        // asked for by a notification starts at once.
        let Some(id) = id else {
            if let Some(action) = outcome.after {
                info!(?action, "power action requested by a notification");
                tokio::spawn(action.run());
            }
            return None;
        };
        let data = outcome.attachment.filter(|_| outcome.result.is_ok());
        Some(Answer {
            response: Response {
                id,
                outcome: outcome.result,
                attachment: data.as_ref().map(|d| d.len() as u64),
            },
            held: Held {
                attachment: data,
                after: outcome.after,
                slot: outcome.slot,
            },
        })
    }

    /// The core: one typed call, whatever envelope it came in. The seam a
    /// second dialect plugs into (ARCHITECTURE.md).
    pub(crate) async fn call(
        self: &Arc<Self>,
        session: &Session,
        req: &Request,
        cx: Context,
        attachment: Option<Bytes>,
    ) -> Outcome {
        // The framing already took the announced bytes; a length that does
        // not match what arrived (a caller of `handle_line`) is refused.
        let attachment = match (req.attachment, attachment) {
            (None, None) => None,
            (Some(len), Some(data)) if len == data.len() as u64 => {
                if let Err(e) = check_attachment(req, &data) {
                    return Outcome::err(e);
                }
                Some(data)
            }
            _ => {
                return Outcome::err(ErrorObject::new(
                    ErrorKind::InvalidRequest,
                    "the attachment member does not match the bytes received",
                ))
            }
        };
        let Some(method) = Method::from_name(&req.method) else {
            return Outcome::err(ErrorObject::new(
                ErrorKind::MethodNotFound,
                format!(
                    "no method {:?}; get_agent_info lists the methods this agent serves",
                    req.method
                ),
            ));
        };
        let facts = method.facts();
        let attachment_in = attachment.as_ref().map_or(0, |a| a.len() as u64);
        // A guest-changing request refused before it ran leaves its audit
        // line too (a blocked method, frozen filesystems, busy).
        let refused = |e: ErrorObject| {
            let o = Outcome::err(e);
            if facts.changes_guest {
                log_outcome(session, req, method, &o, Instant::now(), attachment_in);
            }
            o
        };
        if !self.config.method_enabled(method) {
            return refused(method_disabled(method, &self.config));
        }
        if !facts.while_frozen && self.freeze.is_frozen() {
            return refused(frozen(method, self.freeze.remaining_seconds()));
        }
        if attachment.is_some() && !facts.attachment_in {
            return refused(ErrorObject::new(
                ErrorKind::InvalidParams,
                format!("{method} takes no attachment (only file_write does); it was discarded"),
            ));
        }
        let gate = CommitGate::default();
        if facts.instant {
            // Answered at once, never queued, no slot and no time limit.
            let started = Instant::now();
            let outcome = self.run(session, method, req, cx, attachment, &gate).await;
            if facts.changes_guest {
                log_outcome(session, req, method, &outcome, started, attachment_in);
            }
            return outcome;
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return refused(
                ErrorObject::new(
                    ErrorKind::Busy,
                    format!(
                        "{} requests are already running (max_concurrent_requests); retry later",
                        self.config.max_concurrent_requests
                    ),
                )
                .with_data("limit", self.config.max_concurrent_requests as u64),
            );
        };
        // A `cancel` naming this request's id stops it (`cancel.rs`).
        let registration = req
            .id
            .as_ref()
            .and_then(|id| id.as_u64())
            .map(|id| session.running().register(id));
        let cancelled = async {
            match &registration {
                Some(r) => r.token().cancelled().await,
                None => std::future::pending().await,
            }
        };
        let started = Instant::now();
        let mut work = std::pin::pin!(self.run(session, method, req, cx, attachment, &gate));
        // A method with a limit of its own (exec_command) is bounded inside.
        let limit = (facts.time_limit == TimeLimit::Request).then_some(self.config.request_timeout);
        let expired = async {
            match limit {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let cut = tokio::select! {
            biased;
            () = self.abort.cancelled() => Cut::GaveUp(shutting_down()),
            () = cancelled => Cut::GaveUp(cancelled_by_host(method)),
            o = &mut work => Cut::Done(o),
            () = expired => Cut::GaveUp(timed_out(method, limit.unwrap_or_default())),
        };
        let mut outcome = match cut {
            Cut::Done(o) => o,
            // The work never reaches a point of no return now: a file_write
            // wrote nothing and never will.
            Cut::GaveUp(e) if gate.cancel() => Outcome::err(if method == Method::FileWrite {
                e.with_data("outcome", "not_written")
            } else {
                e
            }),
            // A file_write is past its point of no return: its reply is its
            // own outcome, if that comes soon enough.
            Cut::GaveUp(e) => match tokio::time::timeout(COMMIT_GRACE, &mut work).await {
                Ok(o) => o,
                Err(_) => Outcome::err(e.with_data("outcome", "unknown")),
            },
        };
        drop(registration);
        log_outcome(session, req, method, &outcome, started, attachment_in);
        // The slot stays taken until the reply has been written.
        outcome.slot = Some(slot);
        outcome
    }

    async fn run(
        self: &Arc<Self>,
        session: &Session,
        method: Method,
        req: &Request,
        cx: Context,
        attachment: Option<Bytes>,
        gate: &CommitGate,
    ) -> Outcome {
        // The one match from method to handler. Each arm names the method's
        // Rpc type, whose params and result types the handler must take and
        // give: a mismatch does not compile.
        match method {
            Method::Ping => {
                self.typed::<PingRpc, _, _, _>(req, |_| async { Ok::<_, Never>(ping()) })
                    .await
            }
            Method::Sync => {
                self.typed::<SyncRpc, _, _, _>(req, |p| async move {
                    Ok::<_, Never>(SyncResult { nonce: p.nonce })
                })
                .await
            }
            Method::GetAgentInfo => {
                self.typed::<GetAgentInfoRpc, _, _, _>(req, |_| async {
                    Ok::<_, Never>(self.agent_info())
                })
                .await
            }
            Method::GetSystemInfo => {
                self.typed::<GetSystemInfoRpc, _, _, _>(req, |_| blocking(sysinfo::system_info))
                    .await
            }
            Method::GetNetworkInfo => {
                self.typed::<GetNetworkInfoRpc, _, _, _>(req, |_| blocking(sysinfo::network_info))
                    .await
            }
            Method::GetDiskUsage => {
                self.typed::<GetDiskUsageRpc, _, _, _>(req, |p| {
                    blocking(move || sysinfo::disk_usage(p.include_virtual))
                })
                .await
            }
            Method::ExecCommand => {
                self.typed::<ExecCommandRpc, _, _, _>(req, |p| async move {
                    if !(p.stdin_encoding.is_inline() && p.output_encoding.is_inline()) {
                        return Err(CallError::Params(
                            "exec_command carries stdin and output in strings: \
                             use encoding utf8 or base64, not attachment"
                                .into(),
                        ));
                    }
                    exec::exec_command(&self.config, p)
                        .await
                        .map_err(CallError::Inner)
                })
                .await
            }
            Method::FileRead => match req.params::<<FileReadRpc as Rpc>::Params>() {
                Ok(p) if p.encoding == Encoding::Attachment && cx == Context::Batch => {
                    Outcome::err(batch_attachment())
                }
                Ok(p) => match self.files.read(p).await {
                    Ok((result, data)) => {
                        let mut o = Outcome::of::<FileReadRpc>(&result);
                        o.attachment = data;
                        o
                    }
                    Err(e) => Outcome::err(to_error_object(&e)),
                },
                Err(e) => Outcome::err(e),
            },
            Method::FileWrite => match req.params::<<FileWriteRpc as Rpc>::Params>() {
                Ok(p) if p.encoding == Encoding::Attachment && cx == Context::Batch => {
                    Outcome::err(batch_attachment())
                }
                Ok(p) => match self.files.write(session.id().0, p, attachment, gate).await {
                    Ok(result) => Outcome::of::<FileWriteRpc>(&result),
                    Err(e) => Outcome::err(to_error_object(&e)),
                },
                Err(e) => Outcome::err(e),
            },
            Method::Shutdown => self
                .power::<ShutdownRpc>(req, |delay_seconds| PowerAction::Shutdown { delay_seconds }),
            Method::Reboot => {
                self.power::<RebootRpc>(req, |delay_seconds| PowerAction::Reboot { delay_seconds })
            }
            Method::Cancel => {
                self.typed::<CancelRpc, _, _, _>(req, |p| async move {
                    if p.id.is_none() && p.upload_id.is_none() {
                        return Err(CallError::<Never>::Params(
                            "cancel needs `id` (a running request) or `upload_id` (an open upload)"
                                .into(),
                        ));
                    }
                    Ok(CancelResult {
                        cancelled: p.id.is_some_and(|id| session.running().cancel(id)),
                        upload_aborted: p
                            .upload_id
                            .is_some_and(|u| self.files.abort_upload(session.id().0, &u)),
                    })
                })
                .await
            }
            Method::FsFreeze => {
                self.typed::<FsFreezeRpc, _, _, _>(req, |p| self.freeze.freeze(p))
                    .await
            }
            Method::FsThaw => {
                self.typed::<FsThawRpc, _, _, _>(req, |_| self.freeze.thaw(ThawReason::Request))
                    .await
            }
            Method::FsFreezeStatus => {
                self.typed::<FsFreezeStatusRpc, _, _, _>(req, |_| async {
                    Ok::<_, Never>(self.freeze.status())
                })
                .await
            }
            Method::FsTrim => {
                self.typed::<FsTrimRpc, _, _, _>(req, |p| blocking(move || trim::trim(p)))
                    .await
            }
            Method::GetTime => {
                self.typed::<GetTimeRpc, _, _, _>(req, |_| async {
                    Ok::<_, Never>(time::get_time())
                })
                .await
            }
            Method::SetTime => {
                self.typed::<SetTimeRpc, _, _, _>(req, |p| {
                    blocking(move || time::set_time(p, &time::SystemClocks))
                })
                .await
            }
            Method::GetUsers => {
                self.typed::<GetUsersRpc, _, _, _>(req, |_| blocking(users::get_users))
                    .await
            }
            Method::SshKeysGet => {
                self.typed::<SshKeysGetRpc, _, _, _>(req, |p| {
                    let p = SshKeysParams {
                        username: p.username,
                        keys: Vec::new(),
                    };
                    blocking(move || users::ssh_keys(&SystemUsers, KeysOp::Get, p))
                })
                .await
            }
            Method::SshKeysAdd => {
                self.typed::<SshKeysAddRpc, _, _, _>(req, |p| {
                    blocking(move || users::ssh_keys(&SystemUsers, KeysOp::Add, p))
                })
                .await
            }
            Method::SshKeysRemove => {
                self.typed::<SshKeysRemoveRpc, _, _, _>(req, |p| {
                    blocking(move || users::ssh_keys(&SystemUsers, KeysOp::Remove, p))
                })
                .await
            }
            Method::SshKeysSet => {
                self.typed::<SshKeysSetRpc, _, _, _>(req, |p| {
                    blocking(move || users::ssh_keys(&SystemUsers, KeysOp::Set, p))
                })
                .await
            }
            Method::SetUserPassword => {
                self.typed::<SetUserPasswordRpc, _, _, _>(req, |p| async move {
                    let chpasswd = crate::policy::lookup_safe_path("chpasswd");
                    users::set_password(&SystemUsers, chpasswd.as_deref(), p).await
                })
                .await
            }
            Method::GetVcpus => {
                self.typed::<GetVcpusRpc, _, _, _>(req, |_| {
                    blocking(|| cpu::get_vcpus(std::path::Path::new(cpu::CPU_SYSFS)))
                })
                .await
            }
            Method::SetVcpus => {
                self.typed::<SetVcpusRpc, _, _, _>(req, |p| {
                    blocking(move || cpu::set_vcpus(std::path::Path::new(cpu::CPU_SYSFS), p))
                })
                .await
            }
            Method::GetFsinfo => {
                self.typed::<GetFsinfoRpc, _, _, _>(req, |_| {
                    blocking(|| {
                        let all = mounts::read_mounts().map_err(|source| {
                            sysinfo::SysInfoError::Read {
                                path: "/proc/self/mountinfo".into(),
                                source,
                            }
                        })?;
                        Ok::<_, sysinfo::SysInfoError>(disks::fsinfo(
                            std::path::Path::new(disks::SYSFS),
                            &all,
                        ))
                    })
                })
                .await
            }
            Method::GetStats => {
                self.typed::<GetStatsRpc, _, _, _>(req, |_| blocking(stats::stats))
                    .await
            }
            Method::Suspend => match req.params::<<SuspendRpc as Rpc>::Params>() {
                Ok(p) => {
                    let root = std::path::Path::new(crate::ops::suspend::POWER_SYSFS);
                    match crate::ops::suspend::supported(root, p.mode) {
                        Ok(()) => {
                            let mut o = Outcome::of::<SuspendRpc>(&PowerResult { accepted: true });
                            o.after = Some(PowerAction::Suspend { mode: p.mode });
                            o
                        }
                        Err(e) => Outcome::err(to_error_object(&e)),
                    }
                }
                Err(e) => Outcome::err(e),
            },
            Method::GetBlockDevices => {
                self.typed::<GetBlockDevicesRpc, _, _, _>(req, |_| async {
                    blocking(|| {
                        Ok::<_, Never>(disks::block_devices(std::path::Path::new(disks::SYSFS)))
                    })
                    .await
                })
                .await
            }
            Method::GetMemoryBlocks => {
                self.typed::<GetMemoryBlocksRpc, _, _, _>(req, |_| {
                    blocking(|| memory::get_blocks(std::path::Path::new(memory::MEMORY_SYSFS)))
                })
                .await
            }
            Method::SetMemoryBlocks => {
                self.typed::<SetMemoryBlocksRpc, _, _, _>(req, |p| {
                    blocking(move || {
                        memory::set_blocks(std::path::Path::new(memory::MEMORY_SYSFS), p)
                    })
                })
                .await
            }
            Method::GetMetrics => {
                self.typed::<GetMetricsRpc, _, _, _>(req, |_| blocking(procs::metrics))
                    .await
            }
            Method::ListProcesses => {
                self.typed::<ListProcessesRpc, _, _, _>(req, |p| {
                    blocking(move || procs::list_processes(p))
                })
                .await
            }
            Method::KillProcess => {
                self.typed::<KillProcessRpc, _, _, _>(req, |p| {
                    blocking(move || procs::kill_process(p))
                })
                .await
            }
            Method::ReadLog => {
                self.typed::<ReadLogRpc, _, _, _>(req, |p| {
                    logs::read_log(
                        self.log_paths.clone(),
                        p,
                        self.config.security.max_file_size,
                    )
                })
                .await
            }
            // The host's stream messages: never wait (the session's reader
            // runs them itself, in order; `crate::streams`).
            Method::StreamData => {
                self.typed::<StreamDataRpc, _, _, _>(req, |p| async move {
                    session
                        .streams()
                        .data(p.stream, attachment.unwrap_or_default(), session.notifier())
                        .map(|()| StreamAck {})
                })
                .await
            }
            Method::StreamCredit => {
                self.typed::<StreamCreditRpc, _, _, _>(req, |p| async move {
                    session
                        .streams()
                        .credit(p.stream, p.bytes)
                        .map(|()| StreamAck {})
                })
                .await
            }
            Method::StreamClose => {
                self.typed::<StreamCloseRpc, _, _, _>(req, |p| async move {
                    session.streams().close(p.stream).map(|()| StreamAck {})
                })
                .await
            }
            Method::StreamReset => {
                self.typed::<StreamResetRpc, _, _, _>(req, |p| async move {
                    session.streams().reset(p.stream).map(|()| StreamAck {})
                })
                .await
            }
            Method::ExecStart => {
                self.typed::<ExecStartRpc, _, _, _>(req, |p| async move {
                    self.execs.start(&self.config, session, p)
                })
                .await
            }
            Method::ExecSignal => {
                self.typed::<ExecSignalRpc, _, _, _>(req, |p| self.execs.signal(session, p))
                    .await
            }
            Method::ExecResize => {
                self.typed::<ExecResizeRpc, _, _, _>(req, |p| self.execs.resize(session, p))
                    .await
            }
            Method::FollowLog => {
                self.typed::<FollowLogRpc, _, _, _>(req, |p| {
                    crate::follow::start(&self.config, session, p)
                })
                .await
            }
            Method::FileReadStream => {
                self.typed::<FileReadStreamRpc, _, _, _>(req, |p| {
                    self.files.read_stream(session, p)
                })
                .await
            }
            Method::ForwardOpen => {
                self.typed::<ForwardOpenRpc, _, _, _>(req, |p| {
                    crate::forward::open(&self.config, session, p)
                })
                .await
            }
        }
    }

    /// A power action: answered first, started once the reply is written.
    fn power<M: Rpc<Params = PowerParams, Result = PowerResult>>(
        &self,
        req: &Request,
        action: impl FnOnce(u64) -> PowerAction,
    ) -> Outcome {
        match req.params::<M::Params>() {
            Ok(p) => {
                let mut o = Outcome::of::<M>(&PowerResult { accepted: true });
                o.after = Some(action(p.delay_seconds));
                o
            }
            Err(e) => Outcome::err(e),
        }
    }

    /// Decodes the params of method `M`, runs `f`, and encodes its result:
    /// `f` takes exactly `M`'s params and gives exactly its result.
    ///
    /// `f`'s future is boxed: [`Agent::run`]'s future is as large as the
    /// largest of its arms, and every request's task holds one, so without
    /// the box each `ping` moved tens of KiB (an exec's or a file
    /// transfer's state) into a fresh task.
    async fn typed<M, E, F, Fut>(&self, req: &Request, f: F) -> Outcome
    where
        M: Rpc,
        E: RpcError,
        F: FnOnce(M::Params) -> Fut,
        Fut: std::future::Future<Output = Result<M::Result, E>>,
    {
        match req.params::<M::Params>() {
            Ok(p) => match Box::pin(f(p)).await {
                Ok(v) => Outcome::of::<M>(&v),
                Err(e) => Outcome::err(to_error_object(&e)),
            },
            Err(e) => Outcome::err(e),
        }
    }

    fn agent_info(&self) -> AgentInfo {
        AgentInfo {
            name: AGENT_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: agent_common::PROTOCOL_VERSION,
            platform: "linux".into(),
            methods: Method::ALL.iter().map(|m| m.as_str().to_owned()).collect(),
            disabled_methods: Method::ALL
                .iter()
                .filter(|m| !self.config.method_enabled(**m))
                .map(|m| m.as_str().to_owned())
                .collect(),
            limits: self.config.limits(),
        }
    }
}

/// The methods answered from memory, without waiting for anything and
/// without logging: `ping`, `sync`, `get_agent_info`. The session's reader
/// answers them itself (`server.rs`), without a task or a tracing span.
/// (Other instant methods may wait: `cancel` removes a staging file, which
/// blocks while filesystems are frozen; `fs_thaw` thaws them.)
pub(crate) fn answered_from_memory(method: Method) -> bool {
    matches!(method, Method::Ping | Method::Sync | Method::GetAgentInfo)
}

/// Never fails; the uninhabited error type keeps [`Agent::typed`] generic.
#[derive(Debug, thiserror::Error)]
enum Never {}

impl RpcError for Never {
    fn kind(&self) -> ErrorKind {
        match *self {}
    }
}

fn ping() -> PingResult {
    PingResult {
        pong: true,
        timestamp: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

/// Refuses an attachment whose bytes are not the ones its line announced:
/// without `attachment_crc32`, or with another check value (an attachment
/// cut short and completed by other bytes, such as a later host's).
fn check_attachment(req: &Request, data: &[u8]) -> Result<(), ErrorObject> {
    let Some(expected) = req.attachment_crc32 else {
        return Err(ErrorObject::new(
            ErrorKind::InvalidParams,
            "an attachment needs attachment_crc32 (the CRC-32 of its bytes) beside attachment; \
             nothing was written",
        ));
    };
    let actual = agent_common::attachment_crc32(data);
    if actual != expected {
        warn!(
            expected,
            actual, "an attachment's check value does not match; refused"
        );
        return Err(ErrorObject::new(
            ErrorKind::InvalidParams,
            format!(
                "the attachment's CRC-32 is {actual}, not the announced {expected}: it was cut \
                 short or corrupted, and nothing was written; send 0xFF and sync, then retry"
            ),
        ));
    }
    Ok(())
}

fn batch_attachment() -> ErrorObject {
    ErrorObject::new(
        ErrorKind::InvalidParams,
        "encoding attachment cannot be used inside a batch: send the request on its own line",
    )
}

/// A handler's error, or params refused before the handler ran.
#[derive(Debug, thiserror::Error)]
enum CallError<E: RpcError> {
    #[error("{0}")]
    Params(String),
    #[error(transparent)]
    Inner(E),
}

impl<E: RpcError> RpcError for CallError<E> {
    fn kind(&self) -> ErrorKind {
        match self {
            CallError::Params(_) => ErrorKind::InvalidParams,
            CallError::Inner(e) => e.kind(),
        }
    }
    fn data(&self) -> Vec<(&'static str, serde_json::Value)> {
        match self {
            CallError::Params(_) => Vec::new(),
            CallError::Inner(e) => e.data(),
        }
    }
}

/// How long a request that gave up waits for a `file_write` already past
/// its point of no return (an `fsync` and a rename, normally milliseconds)
/// before it answers that the outcome is unknown.
const COMMIT_GRACE: Duration = Duration::from_secs(10);

/// How a request's work ended.
enum Cut {
    /// It finished.
    Done(Outcome),
    /// The request gave up on it (time limit, agent stopping).
    GaveUp(ErrorObject),
}

fn timed_out(method: Method, limit: Duration) -> ErrorObject {
    ErrorObject::new(
        ErrorKind::Timeout,
        format!(
            "{method} did not finish within request_timeout_seconds ({} s)",
            limit.as_secs()
        ),
    )
    .with_data("limit", limit.as_secs())
}

fn cancelled_by_host(method: Method) -> ErrorObject {
    ErrorObject::new(
        ErrorKind::Cancelled,
        format!("{method} was cancelled by the host (cancel); it was stopped"),
    )
}

/// The refusal of a method the configuration disables.
fn method_disabled(method: Method, config: &Config) -> ErrorObject {
    let key = if config.security.blocked_methods.contains(&method) {
        "security.blocked_methods"
    } else {
        "security.allowed_methods"
    };
    let how = if key == "security.blocked_methods" {
        "remove it from"
    } else {
        "add it to"
    };
    ErrorObject::new(
        ErrorKind::PolicyDenied,
        format!("{method} is disabled by the agent's configuration; {how} {key} to allow it"),
    )
    .with_data("config_key", key)
    .with_data("method", method.as_str())
}

/// The refusal of a method that could write while filesystems are frozen.
fn frozen(method: Method, remaining: Option<u64>) -> ErrorObject {
    let when = remaining.map_or(String::new(), |r| {
        format!(" (they thaw by themselves in {r} s)")
    });
    let e = ErrorObject::new(
        ErrorKind::Frozen,
        format!(
            "the guest's filesystems are frozen and {method} could write to them; \
             call fs_thaw first{when}"
        ),
    );
    match remaining {
        Some(r) => e.with_data("remaining_seconds", r),
        None => e,
    }
}

fn shutting_down() -> ErrorObject {
    ErrorObject::new(
        ErrorKind::ShuttingDown,
        "the agent is stopping; the request was cancelled (retry once it is back)",
    )
}

async fn blocking<T, E, F>(f: F) -> Result<T, BlockingError<E>>
where
    T: Send + 'static,
    E: RpcError + Send + 'static,
    F: FnOnce() -> Result<T, E> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(BlockingError::Inner),
        Err(e) => Err(BlockingError::Join(JoinError(e))),
    }
}

/// A blocking task's error, or the failure of its thread.
#[derive(Debug, thiserror::Error)]
enum BlockingError<E: RpcError> {
    #[error(transparent)]
    Inner(E),
    #[error(transparent)]
    Join(JoinError),
}

impl<E: RpcError> RpcError for BlockingError<E> {
    fn kind(&self) -> ErrorKind {
        match self {
            BlockingError::Inner(e) => e.kind(),
            BlockingError::Join(e) => e.kind(),
        }
    }
    fn data(&self) -> Vec<(&'static str, serde_json::Value)> {
        match self {
            BlockingError::Inner(e) => e.data(),
            BlockingError::Join(_) => Vec::new(),
        }
    }
}

/// Methods that change the guest leave their audit line (`audit.rs`);
/// the others are logged at debug.
fn log_outcome(
    session: &Session,
    req: &Request,
    method: Method,
    outcome: &Outcome,
    started: Instant,
    attachment_in: u64,
) {
    let duration = started.elapsed();
    if method.facts().changes_guest {
        crate::audit::record(&crate::audit::Record {
            session: session.id().0,
            id: req.id.as_ref().map(|i| i.to_string()),
            method,
            params: req.params.as_deref().map(RawValue::get),
            attachment_in,
            outcome: outcome.result.as_ref().map(|r| r.get()),
            attachment_out: outcome.attachment.as_ref().map_or(0, |a| a.len() as u64),
            duration,
            at: SystemTime::now(),
        });
        return;
    }
    let ms = duration.as_millis() as u64;
    match &outcome.result {
        Ok(_) => debug!(%method, duration_ms = ms, "done"),
        Err(e) => debug!(%method, duration_ms = ms, error = %e, "failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn agent() -> Arc<Agent> {
        Agent::new(Config::default())
    }

    async fn reply(agent: &Arc<Agent>, line: &str) -> Option<Value> {
        let out = agent.handle_line(SessionId(1), line.as_bytes()).await?;
        assert_eq!(out.line.last(), Some(&b'\n'));
        Some(serde_json::from_slice(&out.line).unwrap())
    }

    /// Every request runs on a task holding this future: a `ping` must not
    /// carry the state of the largest method (an exec, a transfer), which
    /// [`Agent::typed`]'s box keeps out (it was 38 KiB in a debug build).
    #[test]
    fn a_request_future_does_not_carry_the_largest_method() {
        let a = agent();
        let s = Session::detached(SessionId(1));
        let ping = parse_message(br#"{"jsonrpc":"2.0","method":"ping","id":1}"#);
        let f = a.handle(&s, ping, None);
        let size = std::mem::size_of_val(&f);
        assert!(size <= 8 * 1024, "Agent::handle's future is {size} bytes");
    }

    #[tokio::test]
    async fn ping_and_sync_and_info() {
        let a = agent();
        let r = reply(&a, r#"{"jsonrpc":"2.0","method":"ping","id":1}"#)
            .await
            .unwrap();
        assert_eq!(r["result"]["pong"], true);
        assert_eq!(r["id"], 1);
        let r = reply(
            &a,
            r#"{"jsonrpc":"2.0","method":"sync","params":{"nonce":99},"id":"s"}"#,
        )
        .await
        .unwrap();
        assert_eq!(r["result"]["nonce"], 99);
        assert_eq!(r["id"], "s");
        let r = reply(&a, r#"{"jsonrpc":"2.0","method":"get_agent_info","id":2}"#)
            .await
            .unwrap();
        assert_eq!(
            r["result"]["protocol_version"],
            agent_common::PROTOCOL_VERSION
        );
        assert_eq!(
            r["result"]["methods"].as_array().unwrap().len(),
            Method::ALL.len()
        );
    }

    #[tokio::test]
    async fn the_sync_reply_starts_a_line_of_its_own() {
        let a = agent();
        let out = a
            .handle_line(
                SessionId(1),
                br#"{"jsonrpc":"2.0","method":"sync","params":{"nonce":3},"id":1}"#,
            )
            .await
            .unwrap();
        assert_eq!(out.line.first(), Some(&b'\n'));
        let out = a
            .handle_line(SessionId(1), br#"{"jsonrpc":"2.0","method":"ping","id":1}"#)
            .await
            .unwrap();
        assert_eq!(out.line.first(), Some(&b'{'));
    }

    #[tokio::test]
    async fn error_codes() {
        let a = agent();
        let cases: &[(&str, i64)] = &[
            ("nonsense", -32700),
            ("[]", -32600),
            (r#"{"jsonrpc":"2.0","method":"nope","id":1}"#, -32601),
            (
                r#"{"jsonrpc":"2.0","method":"ping","params":{"x":1},"id":1}"#,
                -32602,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"sync","params":{"nonce":-1},"id":1}"#,
                -32602,
            ),
            (r#"{"jsonrpc":"2.0","method":"sync","id":1}"#, -32602),
            (
                r#"{"jsonrpc":"2.0","method":"shutdown","params":{"delay_seconds":"x"},"id":1}"#,
                -32602,
            ),
        ];
        for (line, code) in cases {
            let r = reply(&a, line).await.unwrap();
            assert_eq!(r["error"]["code"], *code, "{line}");
            assert!(r["error"]["data"]["kind"].is_string());
        }
    }

    #[tokio::test]
    async fn notifications_get_no_reply_and_batches_get_arrays() {
        let a = agent();
        assert!(reply(&a, r#"{"jsonrpc":"2.0","method":"ping"}"#)
            .await
            .is_none());
        assert!(reply(&a, r#"[{"jsonrpc":"2.0","method":"ping"}]"#)
            .await
            .is_none());
        let r = reply(
            &a,
            r#"[{"jsonrpc":"2.0","method":"ping","id":1},{"jsonrpc":"2.0","method":"ping"},{"jsonrpc":"2.0","method":"x","id":"b"},5]"#,
        )
        .await
        .unwrap();
        let arr = r.as_array().unwrap();
        assert_eq!(arr.len(), 3);
        assert_eq!(arr[0]["id"], 1);
        assert_eq!(arr[1]["error"]["code"], -32601);
        assert_eq!(arr[2]["error"]["code"], -32600);
    }

    #[tokio::test]
    async fn shutdown_answers_first_and_carries_the_action() {
        let a = agent();
        let out = a
            .handle_line(
                SessionId(1),
                br#"{"jsonrpc":"2.0","method":"reboot","params":{"delay_seconds":3},"id":1}"#,
            )
            .await
            .unwrap();
        assert_eq!(out.after, Some(PowerAction::Reboot { delay_seconds: 3 }));
        let v: Value = serde_json::from_slice(&out.line).unwrap();
        assert_eq!(v["result"]["accepted"], true);
    }

    #[tokio::test]
    async fn suspend_is_checked_first_and_answered_before_it_acts() {
        let a = agent();
        // A request with an id: the action is only carried, never run here.
        let out = a
            .handle_line(
                SessionId(1),
                br#"{"jsonrpc":"2.0","method":"suspend","params":{"mode":"hybrid"},"id":1}"#,
            )
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&out.line).unwrap();
        match out.after {
            Some(action) => {
                assert_eq!(
                    action,
                    PowerAction::Suspend {
                        mode: agent_common::methods::SuspendMode::Hybrid
                    }
                );
                assert_eq!(v["result"]["accepted"], true);
            }
            None => assert_eq!(v["error"]["data"]["kind"], "not_supported", "{v}"),
        }
        let r = reply(
            &a,
            r#"{"jsonrpc":"2.0","method":"suspend","params":{"mode":"s3"},"id":2}"#,
        )
        .await
        .unwrap();
        assert_eq!(r["error"]["data"]["kind"], "invalid_params");
    }

    #[tokio::test]
    async fn guest_changing_methods_answer_frozen_while_frozen_and_status_always_answers() {
        let a = agent();
        // Nothing is frozen: the flag alone decides, as in dispatch, so no
        // filesystem of this machine is touched.
        a.freeze.pretend_frozen(true);
        let refused = [
            r#"{"jsonrpc":"2.0","method":"file_write","params":{"path":"/tmp/kvmmanager/x","content":"x"},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"exec_command","params":{"command":"true"},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"set_time","params":{"time_ns":1763784000000000000},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"ssh_keys_add","params":{"username":"root","keys":[]},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"fs_freeze","id":1}"#,
            r#"{"jsonrpc":"2.0","method":"fs_trim","id":1}"#,
            r#"{"jsonrpc":"2.0","method":"set_vcpus","params":{"cpus":[]},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"suspend","id":1}"#,
        ];
        for line in refused {
            let r = reply(&a, line).await.unwrap();
            assert_eq!(r["error"]["data"]["kind"], "frozen", "{line}: {r}");
            assert!(r["error"]["message"].as_str().unwrap().contains("fs_thaw"));
        }
        // With every slot taken, the instant ones still answer.
        let all = a.slots.clone().try_acquire_many_owned(10).unwrap();
        let r = reply(&a, r#"{"jsonrpc":"2.0","method":"ping","id":2}"#)
            .await
            .unwrap();
        assert_eq!(r["result"]["pong"], true);
        let r = reply(
            &a,
            r#"{"jsonrpc":"2.0","method":"fs_freeze_status","id":3}"#,
        )
        .await
        .unwrap();
        assert_eq!(r["result"]["timeout_seconds"], 60, "{r}");
        drop(all);
        let r = reply(&a, r#"{"jsonrpc":"2.0","method":"get_system_info","id":4}"#)
            .await
            .unwrap();
        assert!(r["result"].is_object(), "queries answer while frozen: {r}");
        a.freeze.pretend_frozen(false);
    }

    #[tokio::test]
    async fn busy_when_all_slots_are_taken_but_ping_still_answers() {
        let a = Agent::new(Config {
            max_concurrent_requests: 1,
            ..Config::default()
        });
        let _held = a.slots.clone().try_acquire_owned().unwrap();
        let r = reply(&a, r#"{"jsonrpc":"2.0","method":"get_system_info","id":1}"#)
            .await
            .unwrap();
        assert_eq!(r["error"]["data"]["kind"], "busy");
        let r = reply(&a, r#"{"jsonrpc":"2.0","method":"ping","id":2}"#)
            .await
            .unwrap();
        assert_eq!(r["result"]["pong"], true);
    }

    #[tokio::test]
    async fn abort_answers_shutting_down() {
        let a = agent();
        a.abort.cancel();
        let r = reply(&a, r#"{"jsonrpc":"2.0","method":"get_system_info","id":1}"#)
            .await
            .unwrap();
        assert_eq!(r["error"]["data"]["kind"], "shutting_down");
    }

    #[test]
    fn summary_omits_contents() {
        let s = crate::audit::summarize(r#"{"exit_code":0,"stdout":"secret","timed_out":false}"#);
        assert!(s.contains("exit_code=0"));
        assert!(!s.contains("secret"));
    }
}
