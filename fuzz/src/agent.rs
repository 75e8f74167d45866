//! Properties of the fuzz targets that need the Linux agent (`dispatch`,
//! `path_policy`, `session`). Kept apart from `checks.rs`, which
//! agent-common's test suite includes and which must not depend on
//! agent-linux; this file is included by `agent-linux/tests/fuzz_regressions.rs`,
//! which replays these targets' seeds and regressions.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agent_common::error::ErrorKind;
use agent_common::jsonrpc::{parse_message, Entry, Incoming};
use agent_common::methods::Method;
use agent_linux::config::{Config, SecurityConfig};
use agent_linux::dispatch::{Agent, SessionId};
use agent_linux::policy::{CommandPolicy, PathPolicy};
use serde_json::{json, Value};

/// The agent's config over a scratch tree: its roots, a whitelist of `true`,
/// small limits so the fuzzers reach them.
fn agent_config(scratch: &Scratch, max_message_size: usize) -> Config {
    Config {
        request_timeout: Duration::from_secs(2),
        max_concurrent_requests: 4,
        max_message_size,
        security: SecurityConfig {
            allowed_read_paths: vec![scratch.read.clone()],
            allowed_write_paths: vec![scratch.write.clone()],
            command_whitelist: Some(vec!["true".into()]),
            max_file_size: 4096,
            max_command_timeout: Duration::from_secs(1),
            blocked_methods: machine_changing_methods(),
            ..SecurityConfig::default()
        },
        ..Config::default()
    }
}

/// The methods that change the machine the fuzzer runs on beyond the
/// scratch tree (freeze, trim, clock, keys, passwords, CPUs, and any added
/// later): blocked by the agent's own policy, so a fuzzed `fs_freeze {}`
/// is refused before its params are read. `exec_command` (whitelist of
/// `true`), `file_write` (scratch roots) and `shutdown`/`reboot` (never run
/// by `handle_line`; their notifications screened out) are what the
/// harness was built for.
pub fn machine_changing_methods() -> Vec<Method> {
    Method::ALL
        .iter()
        .copied()
        .filter(|m| m.facts().changes_guest)
        .filter(|m| {
            !matches!(
                m,
                Method::ExecCommand | Method::FileWrite | Method::Shutdown | Method::Reboot
            )
        })
        .collect()
}

/// Ignores SIGPIPE, as the agent's own process does (Rust's runtime sets
/// that up before `main`; a libFuzzer binary has no Rust `main`). Without
/// it, writing a command's stdin after the command exited (an ordinary
/// EPIPE for the agent) kills the fuzzer with SIGPIPE.
fn ignore_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler
    // and touches no memory of ours.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

const SENTINEL_TEXT: &str = "sentinel: must never change\n";

/// A scratch tree made once per process:
///
/// ```text
/// <parent>/sentinel            outside every root; must keep its content
/// <parent>/tree/read/...       allowed_read_paths, with hostile symlinks
/// <parent>/tree/write/...      allowed_write_paths
/// ```
pub struct Scratch {
    pub parent: PathBuf,
    pub read: PathBuf,
    pub write: PathBuf,
    pub sentinel: PathBuf,
}

fn make_scratch(tag: &str) -> std::io::Result<Scratch> {
    use std::os::unix::fs::symlink;
    let parent = std::env::temp_dir().join(format!("kvmfuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&parent);
    let tree = parent.join("tree");
    let read = tree.join("read");
    let write = tree.join("write");
    std::fs::create_dir_all(read.join("sub/deeper"))?;
    std::fs::create_dir_all(&write)?;
    let sentinel = parent.join("sentinel");
    std::fs::write(&sentinel, SENTINEL_TEXT)?;
    std::fs::write(read.join("a.txt"), "hello\n")?;
    std::fs::write(read.join("sub/b.bin"), [0u8, 1, 2, 0xff, b'\n'])?;
    std::fs::write(read.join("sub/deeper/c"), "c")?;
    std::fs::write(write.join("existing"), "old")?;
    for dir in [&read, &write] {
        symlink("/etc/passwd", dir.join("passwd"))?;
        symlink("..", dir.join("up"))?;
        symlink("loop", dir.join("loop"))?;
        symlink("/proc/self/root", dir.join("rootfs"))?;
        symlink(&sentinel, dir.join("sentinel"))?;
        symlink("../../sentinel", dir.join("rel-sentinel"))?;
        symlink(&parent, dir.join("parent"))?;
    }
    symlink("a.txt", read.join("inside-link"))?;
    symlink("../write", read.join("to-write"))?;
    std::fs::create_dir(read.join("dir"))?;
    Ok(Scratch {
        parent: canon(&parent),
        read: canon(&read),
        write: canon(&write),
        sentinel: canon(&sentinel),
    })
}

fn canon(p: &Path) -> PathBuf {
    // Invariant: the scratch tree was just created, so it exists.
    std::fs::canonicalize(p).expect("the scratch tree exists")
}

fn parent_entries(s: &Scratch) -> BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(&s.parent)
        .expect("the scratch parent is readable")
        .map(|e| e.expect("a readable entry").file_name())
        .collect()
}

/// Nothing outside the roots was created or modified.
fn check_outside_untouched(s: &Scratch) {
    let text = std::fs::read(&s.sentinel).expect("the sentinel still exists");
    assert_eq!(text, SENTINEL_TEXT.as_bytes(), "the sentinel was modified");
    let meta = std::fs::symlink_metadata(&s.sentinel).expect("sentinel metadata");
    assert!(meta.file_type().is_file(), "the sentinel was replaced");
    let names = parent_entries(s);
    let want: BTreeSet<std::ffi::OsString> = ["sentinel", "tree"].map(Into::into).into();
    assert_eq!(names, want, "something appeared in the scratch parent");
    let tree: BTreeSet<std::ffi::OsString> = std::fs::read_dir(s.parent.join("tree"))
        .expect("tree readable")
        .map(|e| e.expect("entry").file_name())
        .collect();
    let want: BTreeSet<std::ffi::OsString> = ["read", "write"].map(Into::into).into();
    assert_eq!(tree, want, "something appeared beside the roots");
    assert_eq!(
        std::fs::read(s.read.join("a.txt")).expect("a.txt"),
        b"hello\n",
        "a file in the read-only root was modified"
    );
}

struct DispatchEnv {
    scratch: Scratch,
    agent: Arc<Agent>,
    rt: tokio::runtime::Runtime,
}

fn dispatch_env() -> &'static DispatchEnv {
    static ENV: OnceLock<DispatchEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        ignore_sigpipe();
        let scratch = make_scratch("dispatch").expect("creating the scratch tree");
        let config = agent_config(&scratch, 64 * 1024);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        DispatchEnv {
            scratch,
            agent: Agent::new(config),
            rt,
        }
    })
}

/// The whitelist `["true"]` lets exactly `true` (found in the safe PATH) run.
fn check_command_policy(command: &str) {
    let policy = CommandPolicy::new(Some(&["true".to_owned()]));
    if let Ok((path, _argv0)) = policy.resolve(command) {
        assert!(
            path == Path::new("/usr/bin/true") || path == Path::new("/bin/true"),
            "whitelist [\"true\"] let {command:?} run {}",
            path.display()
        );
    }
}

/// Per request: refuses to fuzz inputs that would really power the machine
/// off (a shutdown/reboot *notification* acts at once), and checks the
/// command policy on every exec command name.
fn screen(entry: &Entry) -> bool {
    let Ok(req) = entry else { return true };
    let method = Method::from_name(&req.method);
    if matches!(method, Some(Method::Shutdown | Method::Reboot)) && req.id.is_none() {
        return false;
    }
    if method == Some(Method::ExecCommand) {
        if let Ok(p) = req.params::<agent_common::methods::ExecParams>() {
            check_command_policy(&p.command);
        }
    }
    true
}

fn check_reply_object(v: &Value) {
    let obj = v.as_object().expect("each reply is an object");
    assert_eq!(obj.get("jsonrpc"), Some(&json!("2.0")), "jsonrpc: 2.0");
    assert!(obj.contains_key("id"), "a reply has an id");
    match (obj.get("result"), obj.get("error")) {
        (Some(_), None) => {}
        (None, Some(err)) => {
            let code = err
                .get("code")
                .and_then(Value::as_i64)
                .expect("error.code is an integer");
            let code = i32::try_from(code).expect("error.code fits i32");
            assert!(
                ErrorKind::from_code(code).is_some(),
                "unknown error code {code}: {err}"
            );
            assert!(err.get("message").is_some_and(Value::is_string), "message");
        }
        _ => panic!("a reply needs exactly one of result/error: {v}"),
    }
}

/// Dispatch target: one request line through the agent.
pub fn check_dispatch_line(line: &[u8]) {
    let env = dispatch_env();
    let allowed = match parse_message(line) {
        Incoming::Single(e) => screen(&e),
        Incoming::Batch(es) => es.iter().all(screen),
    };
    if !allowed {
        return;
    }
    let out = env.rt.block_on(env.agent.handle_line(SessionId(1), line));
    if let Some(out) = out {
        let bytes = &out.line[..];
        let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        // A sync reply is preceded by one empty line (PROTOCOL.md).
        let body = body.strip_prefix(b"\n").unwrap_or(body);
        assert!(!body.contains(&b'\n'), "a reply fits on one line");
        let v: Value = serde_json::from_slice(body).expect("the reply is JSON");
        match &v {
            Value::Array(items) => {
                assert!(!items.is_empty(), "no empty batch reply");
                items.iter().for_each(check_reply_object);
            }
            other => check_reply_object(other),
        }
    }
    check_outside_untouched(&env.scratch);
}

/// Consumes fuzz bytes to build values.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn string(&mut self) -> String {
        let n = usize::from(self.byte() % 24).min(self.0.len());
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8_lossy(s).into_owned()
    }
}

const KEYS: &[&str] = &[
    "path",
    "offset",
    "length",
    "encoding",
    "content",
    "mode",
    "permissions",
    "upload_id",
    "more",
    "command",
    "args",
    "timeout_seconds",
    "env",
    "cwd",
    "stdin",
    "stdin_encoding",
    "output_encoding",
    "delay_seconds",
    "nonce",
    "include_virtual",
    "bogus",
];

const WORDS: &[&str] = &[
    "a.txt",
    "sub/b.bin",
    "sub/deeper/c",
    "passwd",
    "up",
    "loop",
    "rootfs",
    "sentinel",
    "rel-sentinel",
    "parent",
    "inside-link",
    "to-write",
    "dir",
    "existing",
    "new",
    "..",
    ".",
    "/etc/passwd",
    "/proc/self/root/etc/passwd",
    "true",
    "/usr/bin/true",
    "/bin/true",
    "sh",
    "/bin/sh",
    "utf8",
    "utf-8",
    "base64",
    "hex",
    "truncate",
    "append",
    "create_new",
    "aGVsbG8=",
    "LD_PRELOAD",
    "PATH",
    "",
    "\0",
    "a\nb",
];

fn value(b: &mut Bytes<'_>, env: &DispatchEnv, depth: u8) -> Value {
    let word = |b: &mut Bytes<'_>| WORDS[usize::from(b.byte()) % WORDS.len()].to_owned();
    match b.byte() % 12 {
        0 => Value::Null,
        1 => Value::Bool(b.byte() & 1 == 1),
        2 => json!(b.byte()),
        3 => json!(u64::from_le_bytes([
            b.byte(),
            b.byte(),
            b.byte(),
            b.byte(),
            b.byte(),
            b.byte(),
            b.byte(),
            b.byte()
        ])),
        4 => json!(-i64::from(b.byte())),
        5 => Value::String(b.string()),
        6 => Value::String(word(b)),
        7 => Value::String(format!("{}/{}", env.scratch.read.display(), word(b))),
        8 => Value::String(format!("{}/{}", env.scratch.write.display(), word(b))),
        9 => Value::String(format!(
            "{}/{}/{}",
            env.scratch.write.display(),
            word(b),
            word(b)
        )),
        10 if depth < 2 => {
            let n = b.byte() % 4;
            Value::Array((0..n).map(|_| value(b, env, depth + 1)).collect())
        }
        11 if depth < 2 => object(b, env, depth + 1),
        _ => Value::String(word(b)),
    }
}

fn object(b: &mut Bytes<'_>, env: &DispatchEnv, depth: u8) -> Value {
    let n = b.byte() % 7;
    let mut map = serde_json::Map::new();
    for _ in 0..n {
        let key = KEYS[usize::from(b.byte()) % KEYS.len()].to_owned();
        map.insert(key, value(b, env, depth));
    }
    Value::Object(map)
}

/// Structured mode: byte 0 picks the method (from `Method::ALL`, or an
/// unknown name), byte 1 the id shape, the rest builds `params`.
pub fn check_dispatch_structured(data: &[u8]) {
    let env = dispatch_env();
    let mut b = Bytes(data);
    let m = usize::from(b.byte());
    let method = Method::ALL
        .get(m % (Method::ALL.len() + 1))
        .map_or("no_such_method", |m| m.as_str());
    let mut req = serde_json::Map::new();
    req.insert("jsonrpc".into(), json!("2.0"));
    req.insert("method".into(), json!(method));
    match b.byte() % 4 {
        0 => {}
        1 => {
            req.insert("id".into(), json!(7));
        }
        2 => {
            req.insert("id".into(), json!("s"));
        }
        _ => {
            req.insert("id".into(), Value::Null);
        }
    }
    match b.byte() % 4 {
        0 => {}
        1 => {
            req.insert("params".into(), value(&mut b, env, 0));
        }
        _ => {
            req.insert("params".into(), object(&mut b, env, 0));
        }
    }
    let line = serde_json::to_vec(&Value::Object(req)).expect("a JSON value serialises");
    check_dispatch_line(&line);
}

/// Dispatch target: byte 0 even = the rest is a raw line; odd = structured.
pub fn check_dispatch(data: &[u8]) {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 1 => check_dispatch_structured(rest),
        Some((_, rest)) => check_dispatch_line(rest),
        None => check_dispatch_line(b""),
    }
}

struct PolicyEnv {
    scratch: Scratch,
    policy: PathPolicy,
}

fn policy_env() -> &'static PolicyEnv {
    static ENV: OnceLock<PolicyEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        ignore_sigpipe();
        let scratch = make_scratch("policy").expect("creating the scratch tree");
        let policy = PathPolicy::new(std::slice::from_ref(&scratch.read));
        PolicyEnv { scratch, policy }
    })
}

fn fd_path(fd: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).expect("readlink /proc/self/fd")
}

/// Path policy target: byte 0 picks a prefix (none, the root, the root plus a
/// symlink name); the rest is the path. Whatever opens lies beneath the root.
pub fn check_path_policy(data: &[u8]) {
    let env = policy_env();
    let Some((sel, rest)) = data.split_first() else {
        return;
    };
    let tail = String::from_utf8_lossy(rest);
    let root = env.scratch.read.display().to_string();
    let path = match sel % 4 {
        0 => tail.into_owned(),
        1 => format!("{root}/{tail}"),
        2 => format!("{root}{tail}"),
        _ => {
            let w = WORDS[usize::from(sel / 4) % WORDS.len()];
            format!("{root}/{w}/{tail}")
        }
    };
    let root = &env.scratch.read;
    if let Ok(file) = env.policy.open_read(&path) {
        let real = fd_path(file.as_raw_fd());
        assert!(
            real.starts_with(root),
            "open_read({path:?}) opened {} outside {}",
            real.display(),
            root.display()
        );
        let meta = file.metadata().expect("fstat");
        assert!(meta.is_file(), "open_read({path:?}) opened a non-file");
    }
    if let Ok((dir, name)) = env.policy.open_parent_for_write(&path) {
        let real = fd_path(dir.as_raw_fd());
        assert!(
            real.starts_with(root),
            "open_parent_for_write({path:?}) opened {} outside {}",
            real.display(),
            root.display()
        );
        let name = name.to_string_lossy();
        assert!(
            !name.is_empty() && name != "." && name != ".." && !name.contains('/'),
            "open_parent_for_write({path:?}) gave the leaf {name:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Session target: a whole host connection through `server::serve`.

/// The session agent's longest request line: small, so that oversized lines
/// cost little.
const SESSION_MAX_MESSAGE: usize = 1024;

/// A cut-short attachment is followed by a pause at least this long: longer
/// than the agent's 10 s attachment timeout, so that it gives up on it.
/// (A shorter pause would make the next items the rest of its data, as if
/// the host had announced a wrong count.)
const CUT_SHORT_PAUSE_MIN: u64 = 12;

/// Virtual time a session may take before it counts as hung.
const SESSION_LIMIT: Duration = Duration::from_secs(3600);

/// Items (lines, resync bytes, announcing lines with their data) per input.
const MAX_ITEMS: usize = 24;

/// Attachments over `MAX_ATTACHMENT_SIZE` (each sent whole: 1 MiB) per input.
const MAX_TOO_LARGE: usize = 2;

/// The smallest pipe that may carry an attachment over `MAX_ATTACHMENT_SIZE`:
/// through a 1-byte pipe one takes over 10 s of real time.
const TOO_LARGE_MIN_PIPE: usize = 4096;

struct SessionEnv {
    scratch: Scratch,
    config: Config,
    /// Its clock is paused: it advances, at once, whenever every task waits
    /// on a timer, so attachment timeouts cost no real time.
    rt: tokio::runtime::Runtime,
}

fn session_env() -> &'static SessionEnv {
    static ENV: OnceLock<SessionEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        ignore_sigpipe();
        let scratch = make_scratch("session").expect("creating the scratch tree");
        let config = agent_config(&scratch, SESSION_MAX_MESSAGE);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a tokio runtime");
        SessionEnv {
            scratch,
            config,
            rt,
        }
    })
}

/// What the fake host does next.
enum Piece {
    /// Write these bytes.
    Data(Vec<u8>),
    /// Write nothing for this long (virtual time).
    Pause(Duration),
}

/// The host's side of a session, built from the fuzz input.
struct HostStream {
    pieces: Vec<Piece>,
    /// Occurrences of `attachment` the generator wrote (announcing members).
    attachment_words: usize,
    /// Occurrences of `poison` (any case) the generator wrote (poison lines).
    poison_words: usize,
    /// The agent certainly reads the next item from its start: no malformed
    /// or oversized announcing line and no cut-short attachment since the
    /// last lone `0xFF` (after them, PROTOCOL.md lets the agent drop input up
    /// to the next `0xFF`, which may lie inside a later item's data).
    in_step: bool,
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| w.eq_ignore_ascii_case(needle))
        .count()
}

impl HostStream {
    fn raw(&mut self, bytes: &[u8]) {
        match self.pieces.last_mut() {
            Some(Piece::Data(d)) => d.extend_from_slice(bytes),
            _ => self.pieces.push(Piece::Data(bytes.to_vec())),
        }
    }

    /// Text the generator wrote: its `attachment` and `poison` words count as
    /// expected.
    fn generated(&mut self, bytes: &[u8]) {
        self.attachment_words += count(bytes, b"attachment");
        self.poison_words += count(bytes, b"poison");
        self.raw(bytes);
    }

    fn pause(&mut self, d: Duration) {
        self.pieces.push(Piece::Pause(d));
    }

    /// Every byte the host writes, pauses left out.
    fn bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for p in &self.pieces {
            if let Piece::Data(d) = p {
                all.extend_from_slice(d);
            }
        }
        all
    }

    /// False when the fuzz-chosen bytes (raw lines, filler) could make a
    /// request the property cannot account for: an `attachment` member or a
    /// `poison` word the generator did not write (both may also form across
    /// pieces), a `\u` escape (which could spell either, or a method name),
    /// or a `shutdown`/`reboot` call, which `serve` would really carry out
    /// after writing its reply. Each line the agent reads is a contiguous run
    /// of these bytes, so checking the whole stream is enough.
    fn is_sound(&self) -> bool {
        let all = self.bytes();
        count(&all, b"attachment") == self.attachment_words
            && count(&all, b"poison") == self.poison_words
            && count(&all, b"\\u") == 0
            && count(&all, b"shutdown") == 0
            && count(&all, b"reboot") == 0
    }
}

impl<'a> Bytes<'a> {
    /// Up to `max` raw bytes of the input.
    fn take(&mut self, max: usize) -> &'a [u8] {
        let n = (usize::from(self.byte()) % (max + 1)).min(self.0.len());
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        s
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// A request that must never run: it may only ever appear inside attachment
/// data. It would create `POISON-<n>` in the write root and be answered
/// with `"id":"poison"`.
fn poison_line(env: &SessionEnv, n: usize) -> Vec<u8> {
    let path = json_str(&format!("{}/POISON-{n}", env.scratch.write.display()));
    format!(
        r#"{{"jsonrpc":"2.0","method":"file_write","params":{{"path":{path},"content":"x"}},"id":"poison"}}"#
    )
    .into_bytes()
    .into_iter()
    .chain([b'\n'])
    .collect()
}

/// How an announcing line is malformed (`None`: well-formed, so the agent
/// knows exactly how many bytes follow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    Jsonrpc10,
    JsonrpcMissing,
    JsonrpcNumber,
    IdBool,
    IdObject,
    IdTwice,
    AttachmentTwice,
    AttachmentString,
    AttachmentFloat,
    AttachmentNegative,
    AttachmentNull,
    AttachmentHuge,
    MethodMissing,
    MethodNumber,
    ParamsString,
    InBatch,
    InBatchSecond,
}

const FLAWS: &[Flaw] = &[
    Flaw::Jsonrpc10,
    Flaw::JsonrpcMissing,
    Flaw::JsonrpcNumber,
    Flaw::IdBool,
    Flaw::IdObject,
    Flaw::IdTwice,
    Flaw::AttachmentTwice,
    Flaw::AttachmentString,
    Flaw::AttachmentFloat,
    Flaw::AttachmentNegative,
    Flaw::AttachmentNull,
    Flaw::AttachmentHuge,
    Flaw::MethodMissing,
    Flaw::MethodNumber,
    Flaw::ParamsString,
    Flaw::InBatch,
    Flaw::InBatchSecond,
];

/// The announcing line for `len` bytes of data, with `flaws` and, if
/// `oversized`, a `pad` member that makes it longer than the line limit.
fn announcing_line(
    env: &SessionEnv,
    b: &mut Bytes<'_>,
    n: usize,
    len: usize,
    flaws: &[Flaw],
    oversized: bool,
) -> Vec<u8> {
    let has = |f: Flaw| flaws.contains(&f);
    let mut members: Vec<String> = Vec::new();
    if has(Flaw::Jsonrpc10) {
        members.push(r#""jsonrpc":"1.0""#.into());
    } else if has(Flaw::JsonrpcNumber) {
        members.push(r#""jsonrpc":2.0"#.into());
    } else if !has(Flaw::JsonrpcMissing) {
        members.push(r#""jsonrpc":"2.0""#.into());
    }
    let (method, params) = match b.byte() % 4 {
        0 => (
            "file_write",
            format!(
                r#"{{"path":{},"encoding":"attachment"}}"#,
                json_str(&format!("{}/ok-{n}", env.scratch.write.display()))
            ),
        ),
        1 => (
            "file_read",
            format!(
                r#"{{"path":{},"encoding":"attachment"}}"#,
                json_str(&format!("{}/a.txt", env.scratch.read.display()))
            ),
        ),
        2 => ("ping", "{}".to_owned()),
        _ => ("no_such_method", "{}".to_owned()),
    };
    if has(Flaw::MethodNumber) {
        members.push(r#""method":5"#.into());
    } else if !has(Flaw::MethodMissing) {
        members.push(format!(r#""method":"{method}""#));
    }
    if has(Flaw::ParamsString) {
        members.push(r#""params":"x""#.into());
    } else {
        members.push(format!(r#""params":{params}"#));
    }
    let id = match b.byte() % 4 {
        0 => None,
        1 => Some(format!("{n}")),
        2 => Some(format!(r#""a{n}""#)),
        _ => Some("null".to_owned()),
    };
    if has(Flaw::IdBool) {
        members.push(r#""id":true"#.into());
    } else if has(Flaw::IdObject) {
        members.push(r#""id":{}"#.into());
    } else if let Some(id) = id {
        if has(Flaw::IdTwice) {
            members.push(format!(r#""id":{id}"#));
        }
        members.push(format!(r#""id":{id}"#));
    } else if has(Flaw::IdTwice) {
        members.push(r#""id":1"#.into());
        members.push(r#""id":2"#.into());
    }
    let attachment = if has(Flaw::AttachmentString) {
        format!(r#""{len}""#)
    } else if has(Flaw::AttachmentFloat) {
        format!("{len}.0")
    } else if has(Flaw::AttachmentNegative) {
        format!("-{len}")
    } else if has(Flaw::AttachmentNull) {
        "null".to_owned()
    } else if has(Flaw::AttachmentHuge) {
        "18446744073709551616".to_owned()
    } else {
        format!("{len}")
    };
    members.push(format!(r#""attachment":{attachment}"#));
    if has(Flaw::AttachmentTwice) {
        members.push(format!(r#""attachment":{attachment}"#));
    }
    let turn = usize::from(b.byte()) % members.len();
    members.rotate_left(turn);
    if oversized {
        let pad = SESSION_MAX_MESSAGE + usize::from(b.byte()) * 8;
        let at = usize::from(b.byte()) % (members.len() + 1);
        members.insert(at, format!(r#""pad":"{}""#, "p".repeat(pad)));
    }
    let object = format!("{{{}}}", members.join(","));
    let line = if has(Flaw::InBatchSecond) {
        format!(r#"[{{"jsonrpc":"2.0","method":"ping","id":"b{n}"}},{object}]"#)
    } else if has(Flaw::InBatch) {
        format!("[{object}]")
    } else {
        object
    };
    let mut line = line.into_bytes();
    line.push(b'\n');
    line
}

/// A request line the agent serves normally.
fn plain_line(env: &SessionEnv, b: &mut Bytes<'_>, n: usize) -> Vec<u8> {
    let line = match b.byte() % 4 {
        0 => format!(r#"{{"jsonrpc":"2.0","method":"ping","id":{n}}}"#),
        1 => format!(r#"{{"jsonrpc":"2.0","method":"sync","params":{{"nonce":{n}}},"id":{n}}}"#),
        2 => format!(
            r#"{{"jsonrpc":"2.0","method":"file_read","params":{{"path":{},"encoding":"attachment"}},"id":{n}}}"#,
            json_str(&format!("{}/a.txt", env.scratch.read.display()))
        ),
        _ => format!(
            r#"{{"jsonrpc":"2.0","method":"file_write","params":{{"path":{},"content":"aGk=","encoding":"base64"}},"id":{n}}}"#,
            json_str(&format!("{}/ok-{n}", env.scratch.write.display()))
        ),
    };
    let mut line = line.into_bytes();
    line.push(b'\n');
    line
}

/// One announcing line and its data, into `host`.
///
/// The data holds poison lines and fuzz-chosen filler. The agent consumes
/// exactly the announced bytes after a well-formed line it reads from its
/// start; after a malformed or oversized one it cannot know the count, and
/// PROTOCOL.md lets it drop input up to the next `0xFF` instead (so too
/// after a cut-short attachment, and it may still be doing so when this
/// item starts). Unless the count is certainly consumed, no poison line
/// follows a `0xFF` inside the data (it could legitimately run). Data
/// holding a `0xFF` ends with `\n`, so that what the agent reads after that
/// `0xFF` ends at this item's end, not inside the next line.
fn announce(
    env: &SessionEnv,
    b: &mut Bytes<'_>,
    host: &mut HostStream,
    n: usize,
    too_large: &mut usize,
) {
    let mut flaws = Vec::new();
    for _ in 0..2 {
        // 1..=FLAWS.len() picks a flaw; 0 (also the input's end) and the
        // upper half pick none, so about half of the lines are well-formed.
        let f = usize::from(b.byte()) % (2 * FLAWS.len());
        if let Some(flaw) = f.checked_sub(1).and_then(|i| FLAWS.get(i)) {
            flaws.push(*flaw);
        }
    }
    // The rare choices are never the default (a 0 byte, or the input's end).
    let oversized = b.byte() % 8 == 7;
    let well_formed = flaws.is_empty() && !oversized;
    // The agent consumes exactly the announced count: a `0xFF` in the data
    // is data, and poison may follow it.
    let exact = well_formed && host.in_step;
    let poison = poison_line(env, n);
    let mut data = Vec::new();
    // Where each piece of the data ends, and the poison words up to there.
    let mut ends = vec![(0, 0)];
    let mut poison_words = 0;
    let mut after_ff = false;
    for _ in 0..b.byte() % 6 {
        if b.byte() % 3 < 2 {
            if exact || !after_ff {
                data.extend_from_slice(&poison);
                poison_words += 2;
            }
        } else {
            let filler = b.take(64);
            after_ff |= filler.contains(&0xff);
            data.extend_from_slice(filler);
        }
        ends.push((data.len(), poison_words));
    }
    if b.byte() % 16 == 15 && *too_large > 0 {
        *too_large -= 1;
        let target = agent_common::MAX_ATTACHMENT_SIZE as usize + 1 + usize::from(b.byte());
        if exact || !after_ff {
            let k = target.saturating_sub(data.len()) / poison.len();
            data.extend(poison.repeat(k));
            poison_words += 2 * k;
        }
        data.resize(target.max(data.len()), b' ');
        ends.push((data.len(), poison_words));
    }
    let cut = b.byte();
    let cut_short = cut % 8 == 7;
    let (mut sent, len) = if cut_short {
        // Cut between two pieces, so that no poison line is cut in half.
        let (at, words) = ends[usize::from(b.byte()) % ends.len()];
        poison_words = words;
        let len = data.len() + 2 + usize::from(cut / 8);
        (data[..at].to_vec(), len)
    } else {
        let len = data.len();
        (data, len)
    };
    if sent.contains(&0xff) && sent.last() != Some(&b'\n') {
        sent.push(b'\n');
    }
    let line = announcing_line(env, b, n, len, &flaws, oversized);
    host.generated(&line);
    host.raw(&sent);
    host.poison_words += poison_words;
    if cut_short {
        let secs = CUT_SHORT_PAUSE_MIN + u64::from(b.byte() % 20);
        host.pause(Duration::from_secs(secs));
    }
    host.in_step = exact && !cut_short;
}

/// Decodes the fuzz input into what the host writes; at most `too_large`
/// attachments over `MAX_ATTACHMENT_SIZE`.
fn host_stream(env: &SessionEnv, b: &mut Bytes<'_>, too_large: usize) -> HostStream {
    let mut host = HostStream {
        pieces: Vec::new(),
        attachment_words: 0,
        poison_words: 0,
        in_step: true,
    };
    // Counts down: announce() sends one while it is above zero.
    let mut too_large = too_large;
    for n in 0..MAX_ITEMS {
        if b.0.is_empty() {
            break;
        }
        match b.byte() % 10 {
            0 => {
                let mut line: Vec<u8> = b
                    .take(200)
                    .iter()
                    .copied()
                    .filter(|c| *c != b'\n' && *c != 0xff)
                    .collect();
                line.push(b'\n');
                host.raw(&line);
            }
            1 => {
                // After a line's `\n`: ends any dropping, else does nothing.
                host.raw(&[0xff]);
                host.in_step = true;
            }
            2 => {
                let line = plain_line(env, b, n);
                host.generated(&line);
            }
            _ => announce(env, b, &mut host, n, &mut too_large),
        }
    }
    host
}

/// Collects what the agent writes.
#[derive(Clone, Default)]
struct Collect(Arc<std::sync::Mutex<Vec<u8>>>);

impl tokio::io::AsyncWrite for Collect {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0
            .lock()
            .expect("the collector's lock is never poisoned")
            .extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Takes spliced payloads as bytes read out of their pipe.
impl agent_linux::payload::ReplySink for Collect {}

async fn feed(mut host: tokio::io::DuplexStream, pieces: Vec<Piece>) {
    use tokio::io::AsyncWriteExt;
    for piece in pieces {
        match piece {
            Piece::Data(d) => {
                if host.write_all(&d).await.is_err() {
                    return;
                }
            }
            Piece::Pause(d) => tokio::time::sleep(d).await,
        }
    }
    // Dropping `host` ends the agent's input.
}

/// Splits the agent's output into replies, skipping the data of those that
/// announce an attachment.
fn session_replies(out: &[u8]) -> Vec<Value> {
    let mut rest = out;
    let mut replies = Vec::new();
    while !rest.is_empty() {
        let nl = rest
            .iter()
            .position(|&c| c == b'\n')
            .expect("every reply line ends with a newline");
        let line = &rest[..nl];
        rest = &rest[nl + 1..];
        // A sync reply is preceded by one empty line (PROTOCOL.md).
        if line.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_slice(line).expect("each reply line is JSON");
        if let Some(len) = v.get("attachment").and_then(Value::as_u64) {
            let len = usize::try_from(len).expect("an attachment length fits usize");
            assert!(rest.len() >= len, "a reply's attachment is cut short");
            rest = &rest[len..];
        }
        replies.push(v);
    }
    replies
}

/// Removes and returns the `POISON-*` files in the write root.
fn take_poison_files(write: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(write).expect("the write root is readable") {
        let entry = entry.expect("a readable entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("POISON-") {
            let _ = std::fs::remove_file(entry.path());
            found.push(name);
        }
    }
    found
}

/// Session target: the fuzz input becomes what a host writes on one
/// connection (request lines, resync bytes, raw lines, lines announcing
/// attachments, well-formed or not, with their data, cut short or not), fed
/// through `agent_linux::server::serve` on a paused-clock runtime.
///
/// Properties: attachment data is never read as requests (no `POISON-*`
/// file appears, no reply has `"id":"poison"`); the session ends; every
/// reply line is a JSON-RPC reply; nothing outside the roots changes.
pub fn check_session(data: &[u8]) {
    let env = session_env();
    let mut b = Bytes(data);
    let capacity = 1 + usize::from(b.byte()) * 256;
    let too_large = if capacity >= TOO_LARGE_MIN_PIPE {
        MAX_TOO_LARGE
    } else {
        0
    };
    let host = host_stream(env, &mut b, too_large);
    if !host.is_sound() {
        return;
    }
    let out = Collect::default();
    let ended = env.rt.block_on(async {
        let (host_end, agent_end) = tokio::io::duplex(capacity);
        let feeder = tokio::spawn(feed(host_end, host.pieces));
        let session = agent_linux::server::serve(
            Agent::new(env.config.clone()),
            agent_end,
            out.clone(),
            agent_linux::server::OnEof::Drain,
            tokio_util::sync::CancellationToken::new(),
        );
        let ended = tokio::time::timeout(SESSION_LIMIT, session).await.is_ok();
        feeder.abort();
        ended
    });
    let poisoned = take_poison_files(&env.scratch.write);
    let out = std::mem::take(&mut *out.0.lock().expect("not poisoned"));
    let replies = session_replies(&out);
    let mut ran = Vec::new();
    for v in &replies {
        let items = match v {
            Value::Array(items) => {
                assert!(!items.is_empty(), "no empty batch reply");
                items.as_slice()
            }
            other => std::slice::from_ref(other),
        };
        for item in items {
            check_reply_object(item);
            if item.get("id") == Some(&json!("poison")) {
                ran.push(item.to_string());
            }
        }
    }
    assert!(
        poisoned.is_empty() && ran.is_empty(),
        "attachment data was run as requests: files {poisoned:?}, replies {ran:?}"
    );
    assert!(ended, "the session did not end within {SESSION_LIMIT:?}");
    check_outside_untouched(&env.scratch);
}
