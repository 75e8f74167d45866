//! qemu-ga's commands, each mapped onto the core method that does the same
//! work (`Agent::call`), with qemu-ga's argument and result shapes
//! (`qga/qapi-schema.json`).
//!
//! Only `guest-sync`, `guest-sync-delimited`, `guest-info`, `guest-ping` and
//! `guest-exec-status` are answered here without a core call: the first
//! four are about the dialect itself (the native `ping` does nothing and
//! is never disabled either), and `guest-exec-status` reads the
//! table that `guest-exec`'s background core call fills. Everything that
//! touches the guest goes through the core, so policy, slots, time limits,
//! the frozen refusals and the audit log are the native methods' own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agent_common::encoding::Encoding;
use agent_common::guestops::{
    FreezeStatus, FsFreezeParams, FsTrimParams, SetPasswordParams, SetTimeParams, SetVcpusParams,
    SshKeysParams, SshUserParams, SuspendMode, SuspendParams, VcpuState,
};
use agent_common::guestops::{MemoryBlockState, SetMemoryBlocksParams};
use agent_common::jsonrpc::{Id, Request};
use agent_common::methods::{
    Empty, ExecCommandRpc, ExecParams, ExecResult, FsFreezeRpc, FsFreezeStatusRpc, FsThawRpc,
    FsTrimRpc, GetFsinfoRpc, GetNetworkInfoRpc, GetSystemInfoRpc, GetTimeRpc, GetUsersRpc,
    GetVcpusRpc, IpFamily, Method, PowerParams, RebootRpc, Rpc, SetTimeRpc, SetUserPasswordRpc,
    SetVcpusRpc, ShutdownRpc, SshKeysAddRpc, SshKeysGetRpc, SshKeysRemoveRpc, SshKeysSetRpc,
};
use agent_common::methods::{
    FileReadParams, FileReadRpc, FileWriteParams, FileWriteRpc, GetBlockDevicesRpc,
    GetMemoryBlocksRpc, GetStatsRpc, SetMemoryBlocksRpc, SuspendRpc, WriteMode,
};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::OwnedSemaphorePermit;

use crate::dispatch::{Agent, Context};
use crate::power::PowerAction;
use crate::session::Session;

/// Every command the dialect serves: its name, the core method it maps onto
/// (`None`: answered by the dialect itself), and whether it replies on
/// success (`success-response` in `guest-info`).
pub(crate) const COMMANDS: &[(&str, Option<Method>, bool)] = &[
    ("guest-sync-delimited", None, true),
    ("guest-sync", None, true),
    ("guest-ping", None, true),
    ("guest-info", None, true),
    ("guest-get-osinfo", Some(Method::GetSystemInfo), true),
    ("guest-get-host-name", Some(Method::GetSystemInfo), true),
    ("guest-get-timezone", Some(Method::GetTime), true),
    ("guest-get-time", Some(Method::GetTime), true),
    ("guest-set-time", Some(Method::SetTime), true),
    ("guest-get-users", Some(Method::GetUsers), true),
    (
        "guest-network-get-interfaces",
        Some(Method::GetNetworkInfo),
        true,
    ),
    ("guest-network-get-route", Some(Method::GetStats), true),
    ("guest-get-fsinfo", Some(Method::GetFsinfo), true),
    ("guest-get-disks", Some(Method::GetBlockDevices), true),
    ("guest-get-diskstats", Some(Method::GetStats), true),
    ("guest-get-cpustats", Some(Method::GetStats), true),
    ("guest-get-load", Some(Method::GetStats), true),
    ("guest-fsfreeze-status", Some(Method::FsFreezeStatus), true),
    ("guest-fsfreeze-freeze", Some(Method::FsFreeze), true),
    ("guest-fsfreeze-freeze-list", Some(Method::FsFreeze), true),
    ("guest-fsfreeze-thaw", Some(Method::FsThaw), true),
    ("guest-fstrim", Some(Method::FsTrim), true),
    ("guest-get-vcpus", Some(Method::GetVcpus), true),
    ("guest-set-vcpus", Some(Method::SetVcpus), true),
    (
        "guest-ssh-get-authorized-keys",
        Some(Method::SshKeysGet),
        true,
    ),
    (
        "guest-ssh-add-authorized-keys",
        Some(Method::SshKeysAdd),
        true,
    ),
    (
        "guest-ssh-remove-authorized-keys",
        Some(Method::SshKeysRemove),
        true,
    ),
    (
        "guest-set-user-password",
        Some(Method::SetUserPassword),
        true,
    ),
    (
        "guest-get-memory-blocks",
        Some(Method::GetMemoryBlocks),
        true,
    ),
    (
        "guest-set-memory-blocks",
        Some(Method::SetMemoryBlocks),
        true,
    ),
    (
        "guest-get-memory-block-info",
        Some(Method::GetMemoryBlocks),
        true,
    ),
    ("guest-shutdown", Some(Method::Shutdown), false),
    ("guest-suspend-disk", Some(Method::Suspend), false),
    ("guest-suspend-ram", Some(Method::Suspend), false),
    ("guest-suspend-hybrid", Some(Method::Suspend), false),
    ("guest-file-open", Some(Method::FileRead), true),
    ("guest-file-read", Some(Method::FileRead), true),
    ("guest-file-write", Some(Method::FileWrite), true),
    ("guest-file-seek", Some(Method::FileRead), true),
    ("guest-file-flush", Some(Method::FileRead), true),
    ("guest-file-close", Some(Method::FileRead), true),
    ("guest-exec", Some(Method::ExecCommand), true),
    ("guest-exec-status", Some(Method::ExecCommand), true),
];

/// Results of `guest-exec` kept for `guest-exec-status` (running or not yet
/// collected). A `guest-exec` beyond it is refused.
pub(crate) const MAX_EXEC_ENTRIES: usize = 64;

/// How long `guest-exec-status` waits for a running command to finish
/// before it answers `exited: false`.
const STATUS_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Files open through `guest-file-open` at once, across sessions.
pub(crate) const MAX_FILE_HANDLES: usize = 64;

/// Bytes `guest-file-read` reads when its `count` is absent (qemu-ga's).
const DEFAULT_READ_COUNT: i64 = 4096;

/// The most one `guest-file-read` returns (a larger `count` gives a
/// shorter read; qemu-ga refuses counts above 48 MB): bounds the reply
/// held in memory.
const MAX_READ_COUNT: u64 = 8 * 1024 * 1024;

/// Bytes per `file_read` call of a `guest-file-read`: the largest multiple
/// of 3 within the core's chunk, so the base64 texts of the pieces join.
const READ_PIECE: u64 = agent_common::MAX_READ_CHUNK / 3 * 3;

/// A qemu-ga error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QgaError {
    /// `GenericError` or `CommandNotFound`.
    pub(crate) class: &'static str,
    /// What went wrong, for humans.
    pub(crate) desc: String,
}

impl QgaError {
    pub(crate) fn generic(desc: impl Into<String>) -> QgaError {
        QgaError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

/// What a command answers, and what the reply holds until it is written.
pub(crate) struct Reply {
    /// `None`: no reply on success (`guest-shutdown`).
    pub(crate) result: Result<Option<Value>, QgaError>,
    /// A power action to start once the reply is written (or at once when
    /// there is none).
    pub(crate) after: Option<PowerAction>,
    /// The core's concurrency slot, held until the reply is written.
    pub(crate) slot: Option<OwnedSemaphorePermit>,
}

impl Reply {
    fn of(result: Result<Value, QgaError>) -> Reply {
        Reply {
            result: result.map(Some),
            after: None,
            slot: None,
        }
    }
}

/// The state shared by every session of the dialect: `guest-exec`'s table.
#[derive(Debug, Default)]
pub struct QgaState {
    next_pid: AtomicI64,
    exec: Mutex<BTreeMap<i64, ExecEntry>>,
    /// Woken when a `guest-exec` result arrives.
    exec_done: tokio::sync::Notify,
    next_handle: AtomicI64,
    files: Mutex<BTreeMap<i64, FileHandle>>,
}

/// A `guest-file-open` handle: a path, its mode, where the next read
/// starts and the file's size as last seen. The file is not held open:
/// every read and write is a core call on the path.
#[derive(Debug, Clone)]
struct FileHandle {
    path: String,
    mode: OpenMode,
    position: u64,
    size: u64,
}

/// An fopen mode, as qemu-ga accepts them (`guest_file_open_modes` of
/// `qga/commands-posix.c`): `r`, `w`, `a`, each with `+` and `b` in either
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpenMode {
    read: bool,
    write: bool,
    /// Created when missing (w, a).
    create: bool,
    /// Emptied at open (w).
    truncate: bool,
    /// Every write goes to the end (a).
    append: bool,
}

impl OpenMode {
    fn parse(mode: &str) -> Option<OpenMode> {
        let (base, plus) = match mode {
            "r" | "rb" => ('r', false),
            "w" | "wb" => ('w', false),
            "a" | "ab" => ('a', false),
            "r+" | "rb+" | "r+b" => ('r', true),
            "w+" | "wb+" | "w+b" => ('w', true),
            "a+" | "ab+" | "a+b" => ('a', true),
            _ => return None,
        };
        Some(OpenMode {
            read: base == 'r' || plus,
            write: base != 'r' || plus,
            create: base != 'r',
            truncate: base == 'w',
            append: base == 'a',
        })
    }
}

#[derive(Debug)]
enum ExecEntry {
    Running,
    /// The `guest-exec-status` answer, kept until collected.
    Done(Result<Value, QgaError>),
}

impl QgaState {
    fn files(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, FileHandle>> {
        // Entries are replaced whole: consistent after a panic.
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self, handle: i64) -> Result<FileHandle, QgaError> {
        self.files()
            .get(&handle)
            .cloned()
            .ok_or_else(|| QgaError::generic(format!("handle '{handle}' has not been found")))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, ExecEntry>> {
        // A panic while holding the lock leaves a table that is still
        // consistent (entries are replaced whole).
        self.exec.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A command's `arguments`, checked as qemu-ga's generated code does.
struct Args<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Args<'a> {
    /// Refuses any member not in `allowed`, as qemu-ga does.
    fn new(map: &'a Map<String, Value>, allowed: &[&str]) -> Result<Args<'a>, QgaError> {
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(QgaError::generic(format!("Parameter '{k}' is unexpected")));
        }
        Ok(Args { map })
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn required(&self, key: &str) -> Result<&'a Value, QgaError> {
        self.get(key)
            .ok_or_else(|| QgaError::generic(format!("Parameter '{key}' is missing")))
    }

    fn typed<T>(
        key: &str,
        v: &'a Value,
        want: &str,
        f: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<T, QgaError> {
        f(v).ok_or_else(|| {
            QgaError::generic(format!(
                "Invalid parameter type for '{key}', expected: {want}"
            ))
        })
    }

    fn int(&self, key: &str) -> Result<i64, QgaError> {
        Self::typed(key, self.required(key)?, "integer", Value::as_i64)
    }

    fn opt_int(&self, key: &str) -> Result<Option<i64>, QgaError> {
        self.get(key)
            .map(|v| Self::typed(key, v, "integer", Value::as_i64))
            .transpose()
    }

    fn string(&self, key: &str) -> Result<&'a str, QgaError> {
        Self::typed(key, self.required(key)?, "string", Value::as_str)
    }

    fn opt_string(&self, key: &str) -> Result<Option<&'a str>, QgaError> {
        self.get(key)
            .map(|v| Self::typed(key, v, "string", Value::as_str))
            .transpose()
    }

    fn boolean(&self, key: &str) -> Result<bool, QgaError> {
        Self::typed(key, self.required(key)?, "boolean", Value::as_bool)
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, QgaError> {
        self.get(key)
            .map(|v| Self::typed(key, v, "boolean", Value::as_bool))
            .transpose()
    }

    fn strings(key: &str, v: &Value) -> Result<Vec<String>, QgaError> {
        let bad = || {
            QgaError::generic(format!(
                "Invalid parameter type for '{key}', expected: array of strings"
            ))
        };
        v.as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|s| s.as_str().map(str::to_owned).ok_or_else(bad))
            .collect()
    }

    fn opt_strings(&self, key: &str) -> Result<Option<Vec<String>>, QgaError> {
        self.get(key).map(|v| Self::strings(key, v)).transpose()
    }
}

/// Ids of the requests the dialect hands the core (for its logs and
/// `cancel` registry; qemu-ga has no cancel).
static NEXT_CALL: AtomicU64 = AtomicU64::new(1);

/// Calls core method `M` with `params`: the one path into the core.
async fn core<M: Rpc>(
    agent: &Arc<Agent>,
    session: &Session,
    params: &M::Params,
) -> (
    Result<M::Result, QgaError>,
    Option<PowerAction>,
    Option<OwnedSemaphorePermit>,
) {
    let params = match serde_json::value::to_raw_value(params) {
        Ok(p) => p,
        Err(e) => {
            return (
                Err(QgaError::generic(format!("could not encode the call: {e}"))),
                None,
                None,
            )
        }
    };
    let req = Request {
        id: Some(Id::number(NEXT_CALL.fetch_add(1, Ordering::Relaxed))),
        method: M::METHOD.as_str().to_owned(),
        params: Some(params),
        attachment: None,
        attachment_crc32: None,
    };
    // Boxed: the core's future is large, and `run` holds one per command.
    let outcome = Box::pin(agent.call(session, &req, Context::Single, None)).await;
    let result = match outcome.result {
        Ok(raw) => serde_json::from_str::<M::Result>(raw.get()).map_err(|e| {
            QgaError::generic(format!("could not read the result of {}: {e}", M::METHOD))
        }),
        Err(e) => Err(QgaError::generic(e.message)),
    };
    (result, outcome.after, outcome.slot)
}

/// Runs core method `M` and shapes its result with `shape`.
async fn mapped<M: Rpc>(
    agent: &Arc<Agent>,
    session: &Session,
    params: &M::Params,
    shape: impl FnOnce(M::Result) -> Value,
) -> Reply {
    let (result, after, slot) = core::<M>(agent, session, params).await;
    Reply {
        result: result.map(|r| Some(shape(r))),
        after,
        slot,
    }
}

/// Runs command `name` with `args`. `guest-sync-delimited` is answered by
/// the caller's framing as well (the `0xFF` before its reply).
pub(crate) async fn execute(
    agent: &Arc<Agent>,
    state: &Arc<QgaState>,
    session: &Arc<Session>,
    name: &str,
    args: &Map<String, Value>,
) -> Reply {
    match run(agent, state, session, name, args).await {
        Ok(reply) => reply,
        Err(e) => Reply::of(Err(e)),
    }
}

async fn run(
    agent: &Arc<Agent>,
    state: &Arc<QgaState>,
    session: &Arc<Session>,
    name: &str,
    args: &Map<String, Value>,
) -> Result<Reply, QgaError> {
    let empty = Empty {};
    if COMMANDS.iter().any(|(n, _, _)| *n == name) && !agent.config().qga_command_enabled(name) {
        let s = &agent.config().security;
        let (key, how) = if s.qga_blocked.iter().any(|n| n == name) {
            ("security.blocked_methods", "remove it from")
        } else {
            ("security.allowed_methods", "add it to")
        };
        return Err(QgaError::generic(format!(
            "{name} is disabled by the agent's configuration; {how} {key} to allow it"
        )));
    }
    Ok(match name {
        "guest-sync" | "guest-sync-delimited" => {
            let a = Args::new(args, &["id"])?;
            Reply::of(Ok(json!(a.int("id")?)))
        }
        "guest-info" => {
            Args::new(args, &[])?;
            Reply::of(Ok(info(agent)))
        }
        "guest-ping" => {
            // Like the native `ping`, which is never disabled and does
            // nothing: answered here, without a core call.
            Args::new(args, &[])?;
            Reply::of(Ok(json!({})))
        }
        "guest-get-osinfo" => {
            Args::new(args, &[])?;
            mapped::<GetSystemInfoRpc>(agent, session, &empty, |s| {
                let mut o = json!({
                    "kernel-release": s.kernel_release,
                    "kernel-version": s.kernel_version,
                    "machine": s.architecture,
                });
                // As qemu-ga: each os-release field only when the file has it.
                for (k, v) in [
                    ("id", s.os_id),
                    ("name", s.os_name),
                    ("pretty-name", s.os_pretty_name),
                    ("version", s.os_version_name),
                    ("version-id", s.os_version),
                    ("variant", s.os_variant),
                    ("variant-id", s.os_variant_id),
                ] {
                    if let Some(v) = v {
                        o[k] = json!(v);
                    }
                }
                o
            })
            .await
        }
        "guest-get-host-name" => {
            Args::new(args, &[])?;
            mapped::<GetSystemInfoRpc>(agent, session, &empty, |s| json!({"host-name": s.hostname}))
                .await
        }
        "guest-get-timezone" => {
            Args::new(args, &[])?;
            mapped::<GetTimeRpc>(agent, session, &empty, |t| {
                let mut o = json!({"offset": t.utc_offset_seconds});
                if let Some(zone) = t.timezone {
                    o["zone"] = json!(zone);
                }
                o
            })
            .await
        }
        "guest-get-time" => {
            Args::new(args, &[])?;
            mapped::<GetTimeRpc>(agent, session, &empty, |t| json!(t.time_ns)).await
        }
        "guest-set-time" => {
            let a = Args::new(args, &["time"])?;
            let time_ns = match a.opt_int("time")? {
                None => None,
                Some(t) => Some(
                    u64::try_from(t)
                        .map_err(|_| QgaError::generic(format!("Time {t} is invalid")))?,
                ),
            };
            mapped::<SetTimeRpc>(agent, session, &SetTimeParams { time_ns }, |_| json!({})).await
        }
        "guest-get-users" => {
            Args::new(args, &[])?;
            mapped::<GetUsersRpc>(agent, session, &empty, |u| {
                // One entry per user, with its earliest login, as qemu-ga.
                let mut first: BTreeMap<String, f64> = BTreeMap::new();
                for s in u.users {
                    let t = first.entry(s.name).or_insert(s.login_time);
                    *t = t.min(s.login_time);
                }
                Value::Array(
                    first
                        .into_iter()
                        .map(|(user, t)| json!({"user": user, "login-time": t}))
                        .collect(),
                )
            })
            .await
        }
        "guest-network-get-interfaces" => {
            Args::new(args, &[])?;
            mapped::<GetNetworkInfoRpc>(agent, session, &empty, |n| {
                Value::Array(n.interfaces.into_iter().map(interface).collect())
            })
            .await
        }
        "guest-get-fsinfo" => {
            Args::new(args, &[])?;
            mapped::<GetFsinfoRpc>(agent, session, &empty, |f| {
                Value::Array(f.filesystems.into_iter().map(fsinfo).collect())
            })
            .await
        }
        "guest-fsfreeze-status" => {
            Args::new(args, &[])?;
            mapped::<FsFreezeStatusRpc>(agent, session, &empty, |s| {
                json!(match s.status {
                    FreezeStatus::Frozen => "frozen",
                    FreezeStatus::Thawed => "thawed",
                })
            })
            .await
        }
        "guest-fsfreeze-freeze" | "guest-fsfreeze-freeze-list" => {
            let mount_points = if name == "guest-fsfreeze-freeze" {
                Args::new(args, &[])?;
                None
            } else {
                Args::new(args, &["mountpoints"])?.opt_strings("mountpoints")?
            };
            mapped::<FsFreezeRpc>(agent, session, &FsFreezeParams { mount_points }, |r| {
                json!(r.frozen.len())
            })
            .await
        }
        "guest-fsfreeze-thaw" => {
            Args::new(args, &[])?;
            mapped::<FsThawRpc>(agent, session, &empty, |r| json!(r.thawed.len())).await
        }
        "guest-fstrim" => {
            let a = Args::new(args, &["minimum"])?;
            let minimum = a.opt_int("minimum")?.unwrap_or(0);
            let minimum_bytes = u64::try_from(minimum)
                .map_err(|_| QgaError::generic("Parameter 'minimum' must not be negative"))?;
            let params = FsTrimParams {
                mount_points: None,
                minimum_bytes,
            };
            mapped::<FsTrimRpc>(agent, session, &params, |r| {
                let paths: Vec<Value> = r
                    .filesystems
                    .into_iter()
                    .map(|f| {
                        let mut o = json!({"path": f.mount_point});
                        match (f.trimmed_bytes, f.error) {
                            (_, Some(e)) => o["error"] = json!(e),
                            (Some(t), None) => {
                                o["trimmed"] = json!(t);
                                o["minimum"] = json!(minimum_bytes);
                            }
                            (None, None) => {}
                        }
                        o
                    })
                    .collect();
                json!({ "paths": paths })
            })
            .await
        }
        "guest-get-vcpus" => {
            Args::new(args, &[])?;
            mapped::<GetVcpusRpc>(agent, session, &empty, |v| {
                Value::Array(
                    v.cpus
                        .into_iter()
                        .map(|c| json!({"logical-id": c.id, "online": c.online, "can-offline": c.can_offline}))
                        .collect(),
                )
            })
            .await
        }
        "guest-set-vcpus" => {
            let a = Args::new(args, &["vcpus"])?;
            let cpus = vcpu_states(a.required("vcpus")?)?;
            let count = cpus.len();
            mapped::<SetVcpusRpc>(agent, session, &SetVcpusParams { cpus }, |_| json!(count)).await
        }
        "guest-ssh-get-authorized-keys" => {
            let a = Args::new(args, &["username"])?;
            let params = SshUserParams {
                username: a.string("username")?.to_owned(),
            };
            mapped::<SshKeysGetRpc>(
                agent,
                session,
                &params,
                |r| json!({"keys": r.keys.into_iter().map(|k| k.line).collect::<Vec<_>>()}),
            )
            .await
        }
        "guest-ssh-add-authorized-keys" | "guest-ssh-remove-authorized-keys" => {
            let add = name == "guest-ssh-add-authorized-keys";
            let allowed: &[&str] = if add {
                &["username", "keys", "reset"]
            } else {
                &["username", "keys"]
            };
            let a = Args::new(args, allowed)?;
            // Blank entries are no keys: libvirt's `set-user-sshkeys
            // --file` sends one for the file's last newline, and qemu-ga
            // (which compares keys with the file's lines) ignores them.
            let mut keys = Args::strings("keys", a.required("keys")?)?;
            keys.retain(|k| !k.trim().is_empty());
            let params = SshKeysParams {
                username: a.string("username")?.to_owned(),
                keys,
            };
            let done = |_| json!({});
            match (add, a.opt_bool("reset")?.unwrap_or(false)) {
                (true, true) => mapped::<SshKeysSetRpc>(agent, session, &params, done).await,
                (true, false) => mapped::<SshKeysAddRpc>(agent, session, &params, done).await,
                (false, _) => mapped::<SshKeysRemoveRpc>(agent, session, &params, done).await,
            }
        }
        "guest-set-user-password" => {
            let a = Args::new(args, &["username", "password", "crypted"])?;
            let username = a.string("username")?.to_owned();
            let encoded = a.string("password")?;
            let crypted = a.boolean("crypted")?;
            let password = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    QgaError::generic("Parameter 'password' must be base64 of UTF-8 text")
                })?;
            let params = SetPasswordParams {
                username,
                password,
                crypted,
            };
            mapped::<SetUserPasswordRpc>(agent, session, &params, |_| json!({})).await
        }
        "guest-shutdown" => {
            let a = Args::new(args, &["mode"])?;
            let params = PowerParams { delay_seconds: 0 };
            let mut reply = match a.opt_string("mode")?.unwrap_or("powerdown") {
                // The core powers off for both: no guest is left halted
                // but running.
                "powerdown" | "halt" => {
                    mapped::<ShutdownRpc>(agent, session, &params, |_| json!({})).await
                }
                "reboot" => mapped::<RebootRpc>(agent, session, &params, |_| json!({})).await,
                _ => {
                    return Err(QgaError::generic(
                        "mode is invalid (valid values are: halt|powerdown|reboot",
                    ))
                }
            };
            // qemu-ga sends nothing when it succeeds.
            if let Ok(Some(_)) = reply.result {
                reply.result = Ok(None);
            }
            reply
        }
        "guest-suspend-disk" | "guest-suspend-ram" | "guest-suspend-hybrid" => {
            Args::new(args, &[])?;
            let mode = match name {
                "guest-suspend-disk" => SuspendMode::Disk,
                "guest-suspend-ram" => SuspendMode::Ram,
                _ => SuspendMode::Hybrid,
            };
            let mut reply =
                mapped::<SuspendRpc>(agent, session, &SuspendParams { mode }, |_| json!({})).await;
            // Like guest-shutdown: no reply on success.
            if let Ok(Some(_)) = reply.result {
                reply.result = Ok(None);
            }
            reply
        }
        "guest-get-memory-blocks" => {
            Args::new(args, &[])?;
            mapped::<GetMemoryBlocksRpc>(agent, session, &empty, |m| {
                Value::Array(
                    m.blocks
                        .into_iter()
                        .map(|b| json!({"phys-index": b.id, "online": b.online, "can-offline": b.can_offline}))
                        .collect(),
                )
            })
            .await
        }
        "guest-get-disks" => {
            Args::new(args, &[])?;
            mapped::<GetBlockDevicesRpc>(agent, session, &empty, |b| {
                Value::Array(b.devices.into_iter().map(disk_info).collect())
            })
            .await
        }
        "guest-get-diskstats" => {
            Args::new(args, &[])?;
            mapped::<GetStatsRpc>(agent, session, &empty, |st| {
                Value::Array(st.disks.into_iter().map(disk_stats).collect())
            })
            .await
        }
        "guest-get-cpustats" => {
            Args::new(args, &[])?;
            mapped::<GetStatsRpc>(agent, session, &empty, |st| {
                Value::Array(
                    st.cpus
                        .into_iter()
                        .map(|c| {
                            json!({
                                "type": "linux", "cpu": c.cpu,
                                "user": c.user_ms, "nice": c.nice_ms,
                                "system": c.system_ms, "idle": c.idle_ms,
                                "iowait": c.iowait_ms, "irq": c.irq_ms,
                                "softirq": c.softirq_ms, "steal": c.steal_ms,
                                "guest": c.guest_ms, "guestnice": c.guest_nice_ms,
                            })
                        })
                        .collect(),
                )
            })
            .await
        }
        "guest-get-load" => {
            Args::new(args, &[])?;
            mapped::<GetStatsRpc>(agent, session, &empty, |st| {
                let [one, five, fifteen] = st.load_average;
                json!({"load1m": one, "load5m": five, "load15m": fifteen})
            })
            .await
        }
        "guest-network-get-route" => {
            Args::new(args, &[])?;
            mapped::<GetStatsRpc>(agent, session, &empty, |st| {
                Value::Array(st.routes.into_iter().filter_map(route).collect())
            })
            .await
        }
        "guest-set-memory-blocks" => {
            let a = Args::new(args, &["mem-blks"])?;
            let wanted = memory_block_states(a.required("mem-blks")?)?;
            set_memory_blocks(agent, session, wanted).await?
        }
        "guest-get-memory-block-info" => {
            Args::new(args, &[])?;
            mapped::<GetMemoryBlocksRpc>(
                agent,
                session,
                &empty,
                |m| json!({"size": m.block_size_bytes}),
            )
            .await
        }
        "guest-file-open" => {
            let a = Args::new(args, &["path", "mode"])?;
            let path = a.string("path")?.to_owned();
            let mode = a.opt_string("mode")?.unwrap_or("r");
            let m = OpenMode::parse(mode)
                .ok_or_else(|| QgaError::generic(format!("invalid file open mode '{mode}'")))?;
            // What fopen would check, under the policy: the file is there
            // and readable (r, r+), writable (r+), created or truncated
            // (w, w+: truncate; a, a+: create), and its size.
            let read_check = || FileReadParams {
                path: path.clone(),
                offset: 0,
                length: Some(1),
                encoding: Encoding::Base64,
            };
            let write_call = |mode| FileWriteParams {
                path: path.clone(),
                encoding: Encoding::Base64,
                mode,
                ..FileWriteParams::default()
            };
            let size = if m.create {
                let wmode = if m.truncate {
                    WriteMode::Truncate
                } else {
                    WriteMode::Append
                };
                let (r, _, _) = core::<FileWriteRpc>(agent, session, &write_call(wmode)).await;
                r?.size
            } else {
                let (r, _, _) = core::<FileReadRpc>(agent, session, &read_check()).await;
                let size = r?.size;
                if m.write {
                    // r+: also under the write policy (an empty append
                    // changes nothing).
                    let (r, _, _) =
                        core::<FileWriteRpc>(agent, session, &write_call(WriteMode::Append)).await;
                    r?;
                }
                size
            };
            let mut files = state.files();
            if files.len() >= MAX_FILE_HANDLES {
                return Err(QgaError::generic(format!(
                    "{MAX_FILE_HANDLES} files are open through guest-file-open; close some with guest-file-close"
                )));
            }
            let handle = state.next_handle.fetch_add(1, Ordering::Relaxed) + 1000;
            files.insert(
                handle,
                FileHandle {
                    path,
                    mode: m,
                    position: 0,
                    size,
                },
            );
            Reply::of(Ok(json!(handle)))
        }
        "guest-file-read" => {
            let a = Args::new(args, &["handle", "count"])?;
            let handle = a.int("handle")?;
            let count = a.opt_int("count")?.unwrap_or(DEFAULT_READ_COUNT);
            let count = u64::try_from(count).map_err(|_| {
                QgaError::generic(format!("value '{count}' is invalid for argument count"))
            })?;
            let file = state.handle(handle)?;
            if !file.mode.read {
                return Err(QgaError::generic(format!(
                    "handle '{handle}' was opened for writing"
                )));
            }
            // One reply of up to `count` bytes (at most MAX_READ_COUNT: a
            // shorter read, as fread may give), from `file_read` calls of
            // at most READ_PIECE bytes each: a multiple of 3, so their
            // base64 texts join into one.
            let count = count.min(MAX_READ_COUNT);
            let mut content = String::new();
            let (mut got, mut eof, mut size) = (0u64, false, file.size);
            let (mut after, mut slot) = (None, None);
            while got < count && !eof {
                let length = (count - got).min(READ_PIECE);
                let params = FileReadParams {
                    path: file.path.clone(),
                    offset: file.position + got,
                    length: Some(length),
                    encoding: Encoding::Base64,
                };
                let (result, a, s) = core::<FileReadRpc>(agent, session, &params).await;
                let r = result?;
                (after, slot) = (a, s);
                content.push_str(&r.content);
                got += r.bytes_read;
                size = r.size;
                eof = r.eof || r.bytes_read < length;
            }
            if let Some(f) = state.files().get_mut(&handle) {
                f.position = file.position + got;
                f.size = size;
            }
            Reply {
                result: Ok(Some(json!({"count": got, "buf-b64": content, "eof": eof}))),
                after,
                slot,
            }
        }
        "guest-file-write" => {
            let a = Args::new(args, &["handle", "buf-b64", "count"])?;
            let handle = a.int("handle")?;
            let encoded = a.string("buf-b64")?;
            let count = a.opt_int("count")?;
            let file = state.handle(handle)?;
            if !file.mode.write {
                return Err(QgaError::generic(format!(
                    "handle '{handle}' was opened for reading"
                )));
            }
            // Every write appends: at the end in a/a+, and in the other
            // modes only when the position is the end (writing into the
            // middle of a file is not done by this agent).
            if !file.mode.append && file.position != file.size {
                return Err(QgaError::generic(format!(
                    "this agent writes only at the end of a file: handle '{handle}' is at {} of {} bytes; seek to the end first",
                    file.position, file.size
                )));
            }
            let mut data = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| QgaError::generic("Parameter 'buf-b64' is not valid base64"))?;
            if let Some(count) = count {
                let n = usize::try_from(count)
                    .ok()
                    .filter(|n| *n <= data.len())
                    .ok_or_else(|| {
                        QgaError::generic(format!("value '{count}' is invalid for argument count"))
                    })?;
                data.truncate(n);
            }
            let params = FileWriteParams {
                path: file.path,
                content: base64::engine::general_purpose::STANDARD.encode(&data),
                encoding: Encoding::Base64,
                mode: WriteMode::Append,
                ..FileWriteParams::default()
            };
            let (result, after, slot) = core::<FileWriteRpc>(agent, session, &params).await;
            let r = result?;
            if let Some(f) = state.files().get_mut(&handle) {
                f.size = r.size;
                f.position = r.size;
            }
            Reply {
                result: Ok(Some(json!({"count": r.bytes_written, "eof": false}))),
                after,
                slot,
            }
        }
        "guest-file-seek" => {
            let a = Args::new(args, &["handle", "offset", "whence"])?;
            let handle = a.int("handle")?;
            let offset = a.int("offset")?;
            let whence = match a.required("whence")? {
                Value::String(s) if s == "set" => 0,
                Value::String(s) if s == "cur" => 1,
                Value::String(s) if s == "end" => 2,
                Value::Number(n) if n.as_i64().is_some_and(|w| (0..=2).contains(&w)) => {
                    n.as_i64().unwrap_or_default()
                }
                other => {
                    return Err(QgaError::generic(format!(
                        "Parameter 'whence' does not accept value {other}"
                    )))
                }
            };
            let file = state.handle(handle)?;
            // The size, for `end` and for `eof`: read afresh when the
            // handle may read (a one-byte read), else the size after this
            // handle's last write.
            let size = if file.mode.read {
                let params = FileReadParams {
                    path: file.path,
                    offset: 0,
                    length: Some(1),
                    encoding: Encoding::Base64,
                };
                let (result, _, _) = core::<FileReadRpc>(agent, session, &params).await;
                result?.size
            } else {
                file.size
            };
            let base = match whence {
                0 => 0,
                1 => i128::from(file.position),
                _ => i128::from(size),
            };
            let position = u64::try_from(base + i128::from(offset)).map_err(|_| {
                QgaError::generic("Invalid argument: the position would be negative")
            })?;
            if let Some(f) = state.files().get_mut(&handle) {
                f.position = position;
                f.size = size;
            }
            Reply::of(Ok(json!({"position": position, "eof": position >= size})))
        }
        "guest-file-flush" => {
            let a = Args::new(args, &["handle"])?;
            // Every write is already in place when it is answered.
            state.handle(a.int("handle")?)?;
            Reply::of(Ok(json!({})))
        }
        "guest-file-close" => {
            let a = Args::new(args, &["handle"])?;
            let handle = a.int("handle")?;
            state.files().remove(&handle).ok_or_else(|| {
                QgaError::generic(format!("handle '{handle}' has not been found"))
            })?;
            Reply::of(Ok(json!({})))
        }
        "guest-exec" => Reply::of(exec(agent, state, session, args)),
        "guest-exec-status" => {
            let a = Args::new(args, &["pid"])?;
            let pid = a.int("pid")?;
            let invalid = || QgaError::generic("Invalid parameter 'pid'");
            // A command still running gets STATUS_WAIT to finish before
            // the answer says `exited: false`: a host that polls back to
            // back then asks a few times instead of hundreds, and leaves
            // the guest's CPU to the command.
            let done = state.exec_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let running = matches!(
                state.table().get(&pid).ok_or_else(invalid)?,
                ExecEntry::Running
            );
            if running {
                let _ = tokio::time::timeout(STATUS_WAIT, done).await;
            }
            let mut table = state.table();
            match table.get(&pid).ok_or_else(invalid)? {
                ExecEntry::Running => Reply::of(Ok(json!({"exited": false}))),
                ExecEntry::Done(_) => match table.remove(&pid) {
                    Some(ExecEntry::Done(r)) => Reply::of(r),
                    _ => return Err(invalid()),
                },
            }
        }
        _ => {
            return Err(QgaError {
                class: "CommandNotFound",
                desc: format!("The command {name} has not been found"),
            })
        }
    })
}

/// `guest-info`: the agent's version and every command with its flags; a
/// command is enabled when the core method it maps onto is.
fn info(agent: &Agent) -> Value {
    let commands: Vec<Value> = COMMANDS
        .iter()
        .map(|(name, method, success)| {
            json!({
                "name": name,
                "enabled": agent.config().qga_command_enabled(name)
                    && method.map_or(true, |m| agent.config().method_enabled(m)),
                "success-response": success,
            })
        })
        .collect();
    json!({"version": env!("CARGO_PKG_VERSION"), "supported_commands": commands})
}

fn interface(i: agent_common::methods::NetworkInterface) -> Value {
    let mut o = json!({ "name": i.name });
    // qemu-ga gives the loopback's all-zero address too.
    let mac = i
        .mac_address
        .or_else(|| i.is_loopback.then(|| "00:00:00:00:00:00".to_owned()));
    if let Some(mac) = mac {
        o["hardware-address"] = json!(mac);
    }
    o["ip-addresses"] = Value::Array(
        i.addresses
            .into_iter()
            .map(|a| {
                json!({
                    "ip-address-type": match a.family {
                        IpFamily::Ipv4 => "ipv4",
                        IpFamily::Ipv6 => "ipv6",
                    },
                    "ip-address": a.address,
                    "prefix": a.prefix_len,
                })
            })
            .collect(),
    );
    let s = i.statistics;
    o["statistics"] = json!({
        "rx-bytes": s.rx_bytes, "rx-packets": s.rx_packets,
        "rx-errs": s.rx_errors, "rx-dropped": s.rx_dropped,
        "tx-bytes": s.tx_bytes, "tx-packets": s.tx_packets,
        "tx-errs": s.tx_errors, "tx-dropped": s.tx_dropped,
    });
    o
}

/// A PCI address `dddd:bb:ss.f` as qemu-ga's `GuestPCIAddress`; `-1`s when
/// the disk is not on PCI (as qemu-ga answers then).
fn pci(address: Option<&str>) -> Value {
    let parsed = address.and_then(|a| {
        let (domain, rest) = a.split_once(':')?;
        let (bus, rest) = rest.split_once(':')?;
        let (slot, function) = rest.split_once('.')?;
        let hex = |s: &str| i64::from_str_radix(s, 16).ok();
        Some([hex(domain)?, hex(bus)?, hex(slot)?, hex(function)?])
    });
    let [domain, bus, slot, function] = parsed.unwrap_or([-1; 4]);
    json!({"domain": domain, "bus": bus, "slot": slot, "function": function})
}

fn fsinfo(f: agent_common::guestops::FsInfoEntry) -> Value {
    let disks: Vec<Value> = f.disks.into_iter().map(disk_address).collect();
    let mut o = json!({
        "name": f.name,
        "mountpoint": f.mount_point,
        "type": f.fs_type,
        "disk": disks,
    });
    // As qemu-ga: what a non-root user can fill, used plus available
    // (without the blocks reserved for root).
    if let (Some(u), Some(a)) = (f.used_bytes, f.available_bytes) {
        o["total-bytes"] = json!(u + a);
    } else if let Some(t) = f.total_bytes {
        o["total-bytes"] = json!(t);
    }
    if let Some(u) = f.used_bytes {
        o["used-bytes"] = json!(u);
    }
    o
}

/// A disk address as qemu-ga's `GuestDiskAddress`.
fn disk_address(d: agent_common::guestops::DiskAddress) -> Value {
    let bus_type = match d.bus_type.as_str() {
        "ata" => "sata",
        "virtio" | "scsi" | "nvme" | "usb" => d.bus_type.as_str(),
        _ => "unknown",
    };
    let mut o = json!({
        "pci-controller": pci(d.pci_address.as_deref()),
        "bus-type": bus_type,
        "bus": d.bus.unwrap_or(0),
        "target": d.target.unwrap_or(0),
        "unit": d.unit.unwrap_or(0),
        "dev": d.device,
    });
    if let Some(serial) = d.serial {
        o["serial"] = json!(serial);
    }
    o
}

/// A block device as qemu-ga's `GuestDiskInfo`: device paths, a
/// partition's disk as its dependency, a device-mapper name as `alias`, the
/// address of whole disks.
fn disk_info(d: agent_common::guestops::BlockDevice) -> Value {
    let dev = |n: &str| format!("/dev/{n}");
    let mut o = json!({
        "name": dev(&d.name),
        "partition": d.kind == "partition",
        "dependencies": d.dependencies.iter().map(|n| dev(n)).collect::<Vec<_>>(),
    });
    if let Some(alias) = d.mapper_name {
        o["alias"] = json!(alias);
    }
    if let Some(address) = d.address {
        o["address"] = disk_address(address);
    }
    o
}

/// One device's counters as qemu-ga's `GuestDiskStatsInfo` (sectors of 512
/// bytes, times in ms).
fn disk_stats(d: agent_common::guestops::DiskIo) -> Value {
    json!({
        "name": d.name,
        "major": d.major,
        "minor": d.minor,
        "stats": {
            "read-sectors": d.read_bytes / 512, "read-ios": d.reads,
            "read-merges": d.read_merges, "read-ticks": d.read_ms,
            "write-sectors": d.write_bytes / 512, "write-ios": d.writes,
            "write-merges": d.write_merges, "write-ticks": d.write_ms,
            "discard-sectors": d.discard_bytes / 512, "discard-ios": d.discards,
            "discard-merges": d.discard_merges, "discard-ticks": d.discard_ms,
            "flush-ios": d.flushes, "flush-ticks": d.flush_ms,
            "ios-pgr": d.in_flight, "total-ticks": d.busy_ms,
            "weight-ticks": d.weighted_ms,
        },
    })
}

/// A route as qemu-ga's `GuestNetworkRoute`: the destination's address and
/// (IPv4) its mask or (IPv6) prefix length; an absent gateway as the
/// all-zero address, as `/proc/net/route` shows it.
fn route(r: agent_common::guestops::Route) -> Option<Value> {
    let (address, prefix) = r.destination.split_once('/')?;
    let prefix: u32 = prefix.parse().ok()?;
    Some(match r.family {
        IpFamily::Ipv4 => {
            let mask = u32::MAX.checked_shl(32 - prefix.min(32)).unwrap_or(0);
            json!({
                "iface": r.interface,
                "destination": address,
                "metric": r.metric,
                "gateway": r.gateway.unwrap_or_else(|| "0.0.0.0".into()),
                "mask": std::net::Ipv4Addr::from(mask).to_string(),
                "version": 4,
            })
        }
        IpFamily::Ipv6 => json!({
            "iface": r.interface,
            "destination": address,
            "metric": r.metric,
            "desprefixlen": prefix.to_string(),
            "nexthop": r.gateway.unwrap_or_else(|| "::".into()),
            "version": 6,
        }),
    })
}

/// `mem-blks` of `guest-set-memory-blocks`.
fn memory_block_states(v: &Value) -> Result<Vec<(u64, bool)>, QgaError> {
    let items = v.as_array().ok_or_else(|| {
        QgaError::generic("Invalid parameter type for 'mem-blks', expected: array")
    })?;
    items
        .iter()
        .map(|item| {
            let map = item.as_object().ok_or_else(|| {
                QgaError::generic(
                    "Invalid parameter type for 'mem-blks', expected: array of objects",
                )
            })?;
            let a = Args::new(map, &["phys-index", "online", "can-offline"])?;
            let index = u64::try_from(a.int("phys-index")?)
                .map_err(|_| QgaError::generic("Invalid parameter 'phys-index'"))?;
            Ok((index, a.boolean("online")?))
        })
        .collect()
}

/// `guest-set-memory-blocks`: one response per entry, as qemu-ga. Entries
/// naming no block answer `not-found`, those asking offline a block that
/// cannot go offline `operation-not-supported`; the rest are one
/// `set_memory_blocks` call, and each answers `success`, or
/// `operation-failed` when that call failed.
async fn set_memory_blocks(
    agent: &Arc<Agent>,
    session: &Session,
    wanted: Vec<(u64, bool)>,
) -> Result<Reply, QgaError> {
    if wanted.is_empty() {
        return Ok(Reply::of(Ok(json!([]))));
    }
    let (current, _, _) = core::<GetMemoryBlocksRpc>(agent, session, &Empty {}).await;
    let current = current?;
    let mut responses: Vec<Option<&str>> = Vec::with_capacity(wanted.len());
    let mut blocks: Vec<MemoryBlockState> = Vec::new();
    for &(index, online) in &wanted {
        let block = u32::try_from(index)
            .ok()
            .and_then(|id| current.blocks.iter().find(|b| b.id == id));
        responses.push(match block {
            None => Some("not-found"),
            Some(b) if !online && b.online && !b.can_offline => Some("operation-not-supported"),
            Some(b) => {
                // The native call names a block once: the last entry wins.
                blocks.retain(|s| s.id != b.id);
                blocks.push(MemoryBlockState { id: b.id, online });
                None
            }
        });
    }
    let (applied, after, slot) = if blocks.is_empty() {
        (Ok(()), None, None)
    } else {
        let (r, after, slot) =
            core::<SetMemoryBlocksRpc>(agent, session, &SetMemoryBlocksParams { blocks }).await;
        match r {
            // A policy refusal is the command's error, not a block's.
            Err(e) if !agent.config().method_enabled(Method::SetMemoryBlocks) => return Err(e),
            r => (r.map(|_| ()), after, slot),
        }
    };
    let out: Vec<Value> = wanted
        .iter()
        .zip(responses)
        .map(|(&(index, _), r)| {
            let response = r.unwrap_or(if applied.is_ok() {
                "success"
            } else {
                "operation-failed"
            });
            json!({"phys-index": index, "response": response})
        })
        .collect();
    Ok(Reply {
        result: Ok(Some(Value::Array(out))),
        after,
        slot,
    })
}

fn vcpu_states(v: &Value) -> Result<Vec<VcpuState>, QgaError> {
    let items = v
        .as_array()
        .ok_or_else(|| QgaError::generic("Invalid parameter type for 'vcpus', expected: array"))?;
    items
        .iter()
        .map(|item| {
            let map = item.as_object().ok_or_else(|| {
                QgaError::generic("Invalid parameter type for 'vcpus', expected: array of objects")
            })?;
            let a = Args::new(map, &["logical-id", "online", "can-offline"])?;
            let id = u32::try_from(a.int("logical-id")?)
                .map_err(|_| QgaError::generic("Invalid parameter 'logical-id'"))?;
            Ok(VcpuState {
                id,
                online: a.boolean("online")?,
            })
        })
        .collect()
}

/// What `capture-output` asks for: stdout, stderr.
fn capture(v: Option<&Value>) -> Result<(bool, bool), QgaError> {
    match v {
        None | Some(Value::Bool(false)) => Ok((false, false)),
        Some(Value::Bool(true)) => Ok((true, true)),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok((false, false)),
            "stdout" => Ok((true, false)),
            "stderr" => Ok((false, true)),
            "separated" => Ok((true, true)),
            "merged" => Err(QgaError::generic(
                "capture-output 'merged' is not supported by this agent; use 'separated'",
            )),
            _ => Err(QgaError::generic(format!(
                "Parameter 'capture-output' does not accept value '{s}'"
            ))),
        },
        Some(_) => Err(QgaError::generic(
            "Invalid parameter type for 'capture-output', expected: boolean or string",
        )),
    }
}

/// `guest-exec`: starts the core's `exec_command` in the background and
/// answers its pid at once; `guest-exec-status` collects the result.
fn exec(
    agent: &Arc<Agent>,
    state: &Arc<QgaState>,
    session: &Arc<Session>,
    args: &Map<String, Value>,
) -> Result<Value, QgaError> {
    let a = Args::new(
        args,
        &["path", "arg", "env", "input-data", "capture-output"],
    )?;
    let command = a.string("path")?.to_owned();
    let args = a.opt_strings("arg")?.unwrap_or_default();
    let mut env = BTreeMap::new();
    for pair in a.opt_strings("env")?.unwrap_or_default() {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            QgaError::generic(format!("Parameter 'env' entry {pair:?} is not NAME=VALUE"))
        })?;
        env.insert(k.to_owned(), v.to_owned());
    }
    let stdin = a.opt_string("input-data")?.map(str::to_owned);
    let (out, err) = capture(a.get("capture-output"))?;
    let params = ExecParams {
        command,
        args,
        timeout_seconds: Some(agent.config().security.max_command_timeout.as_secs()),
        env,
        cwd: None,
        stdin,
        stdin_encoding: Encoding::Base64,
        output_encoding: Encoding::Base64,
    };
    let pid = {
        let mut table = state.table();
        if table.len() >= MAX_EXEC_ENTRIES {
            return Err(QgaError::generic(format!(
                "{MAX_EXEC_ENTRIES} guest-exec results are running or not yet collected; collect them with guest-exec-status"
            )));
        }
        let pid = state.next_pid.fetch_add(1, Ordering::Relaxed) + 1;
        table.insert(pid, ExecEntry::Running);
        pid
    };
    let (agent, state, session) = (agent.clone(), state.clone(), session.clone());
    tokio::spawn(async move {
        let (result, _, slot) = core::<ExecCommandRpc>(&agent, &session, &params).await;
        drop(slot);
        let status = result.map(|r| exec_status(r, out, err));
        state.table().insert(pid, ExecEntry::Done(status));
        state.exec_done.notify_waiters();
    });
    Ok(json!({ "pid": pid }))
}

fn exec_status(r: ExecResult, out: bool, err: bool) -> Value {
    let mut o = json!({"exited": true});
    if let Some(code) = r.exit_code {
        o["exitcode"] = json!(code);
    }
    if let Some(signal) = r.signal {
        o["signal"] = json!(signal);
    }
    // As qemu-ga: data (and its truncation flag) only when there is some.
    if out && !r.stdout.is_empty() {
        o["out-data"] = json!(r.stdout);
        o["out-truncated"] = json!(r.stdout_truncated);
    }
    if err && !r.stderr.is_empty() {
        o["err-data"] = json!(r.stderr);
        o["err-truncated"] = json!(r.stderr_truncated);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked_as_qemu_ga_checks_them() {
        let map = json!({"id": 1, "x": 2});
        let map = map.as_object().unwrap();
        assert_eq!(
            Args::new(map, &["id"]).err().unwrap().desc,
            "Parameter 'x' is unexpected"
        );
        let a = Args::new(map, &["id", "x", "s"]).unwrap();
        assert_eq!(a.int("id").unwrap(), 1);
        assert_eq!(a.string("s").unwrap_err().desc, "Parameter 's' is missing");
        assert_eq!(
            a.string("id").unwrap_err().desc,
            "Invalid parameter type for 'id', expected: string"
        );
    }

    #[test]
    fn capture_output_takes_the_old_boolean_and_the_new_names() {
        assert_eq!(capture(None).unwrap(), (false, false));
        assert_eq!(capture(Some(&json!(true))).unwrap(), (true, true));
        assert_eq!(capture(Some(&json!("stderr"))).unwrap(), (false, true));
        assert_eq!(capture(Some(&json!("separated"))).unwrap(), (true, true));
        assert!(capture(Some(&json!("merged"))).is_err());
        assert!(capture(Some(&json!("both"))).is_err());
        assert!(capture(Some(&json!(1))).is_err());
    }

    #[test]
    fn fopen_modes_are_qemu_ga_s() {
        let m =
            |s: &str| OpenMode::parse(s).map(|m| (m.read, m.write, m.create, m.truncate, m.append));
        for s in ["r", "rb"] {
            assert_eq!(m(s), Some((true, false, false, false, false)), "{s}");
        }
        for s in ["w", "wb"] {
            assert_eq!(m(s), Some((false, true, true, true, false)), "{s}");
        }
        for s in ["a", "ab"] {
            assert_eq!(m(s), Some((false, true, true, false, true)), "{s}");
        }
        for s in ["r+", "rb+", "r+b"] {
            assert_eq!(m(s), Some((true, true, false, false, false)), "{s}");
        }
        for s in ["w+", "wb+", "w+b"] {
            assert_eq!(m(s), Some((true, true, true, true, false)), "{s}");
        }
        for s in ["a+", "ab+", "a+b"] {
            assert_eq!(m(s), Some((true, true, true, false, true)), "{s}");
        }
        for s in ["", "x", "rw", "wx", "r+x", "b", "+r", "R"] {
            assert_eq!(m(s), None, "{s:?}");
        }
    }

    #[test]
    fn routes_take_qemu_ga_s_shape() {
        use agent_common::guestops::Route;
        let v4 = route(Route {
            family: IpFamily::Ipv4,
            destination: "10.0.2.0/24".into(),
            gateway: None,
            interface: "eth0".into(),
            metric: 100,
        })
        .unwrap();
        assert_eq!(
            v4,
            json!({"iface": "eth0", "destination": "10.0.2.0", "metric": 100,
                   "gateway": "0.0.0.0", "mask": "255.255.255.0", "version": 4})
        );
        let default = route(Route {
            family: IpFamily::Ipv4,
            destination: "0.0.0.0/0".into(),
            gateway: Some("10.0.2.2".into()),
            interface: "eth0".into(),
            metric: 0,
        })
        .unwrap();
        assert_eq!(
            (default["mask"].clone(), default["gateway"].clone()),
            (json!("0.0.0.0"), json!("10.0.2.2"))
        );
        let v6 = route(Route {
            family: IpFamily::Ipv6,
            destination: "fe80::/64".into(),
            gateway: None,
            interface: "eth0".into(),
            metric: 256,
        })
        .unwrap();
        assert_eq!(
            v6,
            json!({"iface": "eth0", "destination": "fe80::", "metric": 256,
                   "desprefixlen": "64", "nexthop": "::", "version": 6})
        );
    }

    #[test]
    fn pci_addresses_are_parsed_or_minus_one() {
        assert_eq!(
            pci(Some("0000:00:1f.2")),
            json!({"domain": 0, "bus": 0, "slot": 31, "function": 2})
        );
        assert_eq!(
            pci(None),
            json!({"domain": -1, "bus": -1, "slot": -1, "function": -1})
        );
        assert_eq!(pci(Some("junk"))["domain"], json!(-1));
    }

    #[test]
    fn every_command_is_in_protocol_md() {
        let doc = include_str!("../../../PROTOCOL.md");
        for (name, _, _) in COMMANDS {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is not in PROTOCOL.md"
            );
        }
    }
}
