//! Properties of the fuzz targets that need the Linux agent (`dispatch`,
//! `path_policy`). Kept apart from `checks.rs`, which agent-common's test
//! suite includes and which must not depend on agent-linux.

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
        let scratch = make_scratch("dispatch").expect("creating the scratch tree");
        let config = Config {
            request_timeout: Duration::from_secs(2),
            max_concurrent_requests: 4,
            max_message_size: 64 * 1024,
            security: SecurityConfig {
                allowed_read_paths: vec![scratch.read.clone()],
                allowed_write_paths: vec![scratch.write.clone()],
                command_whitelist: Some(vec!["true".into()]),
                max_file_size: 4096,
                max_command_timeout: Duration::from_secs(1),
            },
            ..Config::default()
        };
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
        let scratch = make_scratch("policy").expect("creating the scratch tree");
        let policy = PathPolicy::new(&[scratch.read.clone()]);
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
