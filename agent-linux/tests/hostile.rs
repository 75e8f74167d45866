//! The hostile-input matrix against the real binary: every trick gets a
//! clear error and nothing else happens (nothing read, written or run
//! outside policy), and the agent keeps serving.

mod common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use common::{error_kind, AgentProcess, Conn};
use serde_json::{json, Value};

fn read(c: &mut Conn, path: &str) -> Value {
    c.call(1, "file_read", json!({ "path": path }))
}

fn write(c: &mut Conn, path: &str, content: &str) -> Value {
    c.call(2, "file_write", json!({ "path": path, "content": content }))
}

fn exec(c: &mut Conn, params: Value) -> Value {
    c.call(3, "exec_command", params)
}

fn assert_alive(c: &mut Conn) {
    assert_eq!(c.call(99, "ping", json!({}))["result"]["pong"], true);
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn read_escapes_are_refused() {
    let agent = AgentProcess::start();
    let root = agent.read_dir();
    let secret = agent.dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    std::fs::write(root.join("ok.txt"), "fine").unwrap();
    symlink(&secret, root.join("abs-link")).unwrap();
    symlink("../secret.txt", root.join("rel-link")).unwrap();
    symlink(agent.dir.path(), root.join("dir-link")).unwrap();
    symlink("/proc/self/root", root.join("proc-root")).unwrap();
    symlink("/proc/self/fd/0", root.join("fd-link")).unwrap();
    symlink("/proc/self/cwd", root.join("cwd-link")).unwrap();
    symlink("loop", root.join("loop")).unwrap();
    let mut c = agent.connect();
    let cases = [
        format!("{}/../secret.txt", p(&root)),
        format!("{}/abs-link", p(&root)),
        format!("{}/rel-link", p(&root)),
        format!("{}/dir-link/secret.txt", p(&root)),
        format!("{}/proc-root{}", p(&root), p(&secret)),
        format!("{}/fd-link", p(&root)),
        format!("{}/cwd-link/secret.txt", p(&root)),
        format!("/proc/self/root{}", p(&secret)),
        format!("/proc/{}/root{}", agent.pid(), p(&secret)),
        p(&secret),
        "/etc/shadow".into(),
        "relative/path.txt".into(),
        "ok.txt".into(),
        String::new(),
        format!("{}/ok.txt\u{0}", p(&root)),
    ];
    for path in &cases {
        let r = read(&mut c, path);
        let kind = error_kind(&r);
        assert!(
            kind == "policy_denied" || kind == "invalid_params",
            "{path:?} gave {r}"
        );
        assert!(!r.to_string().contains("top secret"));
    }
    // A loop or a dangling link inside the root is an error, not a hang.
    let r = read(&mut c, &format!("{}/loop", p(&root)));
    assert!(r.get("error").is_some(), "{r}");
    // Relative: an absolute target is refused by RESOLVE_BENEATH whatever it names.
    symlink("missing", root.join("dangling")).unwrap();
    assert_eq!(
        error_kind(&read(&mut c, &format!("{}/dangling", p(&root)))),
        "not_found"
    );
    // The allowed file is still readable.
    let r = read(&mut c, &format!("{}/ok.txt", p(&root)));
    assert_eq!(r["result"]["content"], "fine");
    assert_alive(&mut c);
}

#[test]
fn special_files_are_refused_without_hanging() {
    let agent = AgentProcess::start();
    let root = agent.read_dir();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::fs::create_dir(root.join("dir")).unwrap();
    let dev = root.join("null");
    nix::sys::stat::mknod(
        &dev,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let mut c = agent.connect();
    for name in ["fifo", "dir", "null"] {
        let r = read(&mut c, &p(&root.join(name)));
        assert_eq!(error_kind(&r), "not_a_regular_file", "{name}: {r}");
    }
    assert_alive(&mut c);
}

#[test]
fn numbers_out_of_range_and_malformed_params() {
    let agent = AgentProcess::start();
    let file = agent.read_dir().join("f");
    std::fs::write(&file, "0123456789").unwrap();
    let mut c = agent.connect();
    let path = p(&file);
    // Huge offset: nothing there, eof.
    let r = c.call(1, "file_read", json!({"path": path, "offset": u64::MAX}));
    assert_eq!(r["result"]["bytes_read"], 0, "{r}");
    assert_eq!(r["result"]["eof"], true);
    // Huge length: capped, still the whole small file.
    let r = c.call(1, "file_read", json!({"path": path, "length": u64::MAX}));
    assert_eq!(r["result"]["content"], "0123456789", "{r}");
    for bad in [
        format!(
            r#"{{"jsonrpc":"2.0","method":"file_read","params":{{"path":"{path}","offset":-1}},"id":7}}"#
        ),
        format!(
            r#"{{"jsonrpc":"2.0","method":"file_read","params":{{"path":"{path}","offset":1e400}},"id":7}}"#
        ),
        format!(
            r#"{{"jsonrpc":"2.0","method":"file_read","params":{{"path":"{path}","length":18446744073709551616}},"id":7}}"#
        ),
        format!(
            r#"{{"jsonrpc":"2.0","method":"file_read","params":{{"path":"{path}","path":"/etc/shadow"}},"id":7}}"#
        ),
        format!(
            r#"{{"jsonrpc":"2.0","method":"file_read","params":{{"path":"{path}","encoding":"rot13"}},"id":7}}"#
        ),
        r#"{"jsonrpc":"2.0","method":"file_read","params":{"path":"\udcff"},"id":7}"#.to_string(),
        format!(
            r#"{{"jsonrpc":"2.0","method":"file_read","params":{{"path":"{path}","x":{}1{}}},"id":7}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        ),
    ] {
        c.send_raw(bad.as_bytes());
        c.send_raw(b"\n");
        let r = c.recv();
        let code = r["error"]["code"]
            .as_i64()
            .unwrap_or_else(|| panic!("{bad}: {r}"));
        assert!([-32700, -32600, -32602].contains(&code), "{bad}: {r}");
        assert!(!r.to_string().contains("root:"));
    }
    assert_alive(&mut c);
}

#[test]
fn write_escapes_are_refused_and_nothing_is_written() {
    let agent = AgentProcess::start();
    let root = agent.write_dir();
    let outside = agent.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let victim = outside.join("victim");
    std::fs::write(&victim, "original").unwrap();
    symlink(&outside, root.join("out-dir")).unwrap();
    symlink(&victim, root.join("victim-link")).unwrap();
    let mut c = agent.connect();
    for path in [
        format!("{}/../outside/new", p(&root)),
        format!("{}/out-dir/new", p(&root)),
        format!("{}/out-dir/victim", p(&root)),
        p(&outside.join("new")),
        format!("{}/x", p(&agent.read_dir())),
        "/etc/kvmm-should-not-exist".into(),
    ] {
        let r = write(&mut c, &path, "owned");
        let kind = error_kind(&r);
        assert!(
            kind == "policy_denied" || kind == "invalid_params",
            "{path}: {r}"
        );
    }
    assert!(!outside.join("new").exists());
    assert!(!agent.read_dir().join("x").exists());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original");
    // A symlink as the final component is replaced, never written through.
    let r = write(&mut c, &p(&root.join("victim-link")), "replaced");
    assert!(r.get("result").is_some(), "{r}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original");
    assert_eq!(
        std::fs::read_to_string(root.join("victim-link")).unwrap(),
        "replaced"
    );
    assert!(!root
        .join("victim-link")
        .symlink_metadata()
        .unwrap()
        .file_type()
        .is_symlink());
    assert_alive(&mut c);
}

#[test]
fn write_modes_permissions_and_limits() {
    let agent = AgentProcess::start_with(json!({"max_file_size_mb": 1}), json!({}));
    let root = agent.write_dir();
    let mut c = agent.connect();
    let f = p(&root.join("a.txt"));
    let r = c.call(1, "file_write", json!({"path": f, "content": "one"}));
    assert_eq!(r["result"]["committed"], true, "{r}");
    let mode = std::fs::metadata(root.join("a.txt"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o644);
    let r = c.call(
        1,
        "file_write",
        json!({"path": f, "content": "two", "mode": "create_new"}),
    );
    assert_eq!(error_kind(&r), "already_exists");
    let r = c.call(
        1,
        "file_write",
        json!({"path": f, "content": "+3", "mode": "append"}),
    );
    assert!(r.get("result").is_some(), "{r}");
    assert_eq!(
        std::fs::read_to_string(root.join("a.txt")).unwrap(),
        "one+3"
    );
    for perms in [0o666, 0o4755, 0o1777, 0o622] {
        let g = p(&root.join(format!("p{perms:o}")));
        let r = c.call(
            1,
            "file_write",
            json!({"path": g, "content": "x", "permissions": perms}),
        );
        assert!(r.get("error").is_some(), "{perms:o}: {r}");
        assert!(!root.join(format!("p{perms:o}")).exists());
    }
    let big = "x".repeat(40_000);
    // 1 MiB limit: 27 appends of 40 kB exceed it; the failing one writes nothing.
    let g = p(&root.join("big"));
    let mut refused = false;
    for _ in 0..30 {
        let r = c.call(
            1,
            "file_write",
            json!({"path": g, "content": big, "mode": "append"}),
        );
        if r.get("error").is_some() {
            assert_eq!(error_kind(&r), "too_large", "{r}");
            refused = true;
            break;
        }
    }
    assert!(refused);
    let size = std::fs::metadata(root.join("big")).unwrap().len();
    assert!(size <= 1024 * 1024 && size % 40_000 == 0, "{size}");
    let r = c.call(
        1,
        "file_write",
        json!({"path": g, "content": "%%%", "encoding": "base64"}),
    );
    assert_eq!(error_kind(&r), "invalid_encoding");
    assert_alive(&mut c);
}

#[test]
fn disk_full_leaves_nothing_behind() {
    let agent = AgentProcess::start();
    let small = agent.write_dir().join("small");
    std::fs::create_dir(&small).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&small)
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "mounting a small tmpfs needs root (the tests run as root)"
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&small);
    std::fs::write(small.join("keep"), "old").unwrap();
    let mut c = agent.connect();
    let content = "y".repeat(48_000);
    let path = p(&small.join("keep"));
    let mut failed = None;
    for i in 0..10 {
        // Fill the disk with other files, then try to replace `keep`.
        let filler = p(&small.join(format!("fill{i}")));
        let _ = c.call(1, "file_write", json!({"path": filler, "content": content}));
        let r = c.call(2, "file_write", json!({"path": path, "content": content}));
        if r.get("error").is_some() {
            failed = Some(r);
            break;
        }
        std::fs::write(small.join("keep"), "old").unwrap();
    }
    let r = failed.expect("the small disk filled up");
    assert_eq!(error_kind(&r), "no_space", "{r}");
    assert_eq!(std::fs::read_to_string(small.join("keep")).unwrap(), "old");
    let leftovers: Vec<_> = std::fs::read_dir(&small)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kvmtmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_alive(&mut c);
}

#[test]
fn command_tricks_are_refused() {
    let agent = AgentProcess::start();
    let tool = agent.write_dir().join("mytool");
    std::fs::write(&tool, "#!/bin/sh\necho pwned\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = agent.connect();
    for (params, kinds) in [
        (json!({"command": "./mytool"}), &["policy_denied"][..]),
        (json!({"command": "bin/echo"}), &["policy_denied"]),
        (
            json!({"command": "/usr/bin/../bin/echo"}),
            &["policy_denied"],
        ),
        (json!({"command": ""}), &["policy_denied", "invalid_params"]),
        (
            json!({"command": "echo\u{0}x"}),
            &["policy_denied", "invalid_params"],
        ),
        (
            json!({"command": "mytool", "env": {"PATH": p(&agent.write_dir())}}),
            &["not_found"],
        ),
        (
            json!({"command": "echo", "env": {"LD_PRELOAD": "/tmp/x.so"}}),
            &["policy_denied"],
        ),
        (
            json!({"command": "echo", "env": {"LD_LIBRARY_PATH": "/tmp"}}),
            &["policy_denied"],
        ),
        (
            json!({"command": "echo", "cwd": "relative"}),
            &["policy_denied", "invalid_params"],
        ),
    ] {
        let r = exec(&mut c, params.clone());
        let kind = error_kind(&r);
        assert!(kinds.contains(&kind.as_str()), "{params}: {r}");
        assert!(!r.to_string().contains("pwned"));
    }
    // Arguments are verbatim: no shell, no expansion, options stay arguments.
    let r = exec(
        &mut c,
        json!({"command": "echo", "args": ["$(id)", "--help", "*", "a b"]}),
    );
    assert_eq!(r["result"]["stdout"], "$(id) --help * a b\n", "{r}");
    assert_eq!(r["result"]["exit_code"], 0);
    assert_alive(&mut c);
}

#[test]
fn whitelist_is_exact() {
    let agent = AgentProcess::start_with(
        json!({"command_whitelist": ["echo", "/bin/true"]}),
        json!({}),
    );
    let mut c = agent.connect();
    let ok = |r: &Value| r.get("result").is_some();
    assert!(ok(&exec(
        &mut c,
        json!({"command": "echo", "args": ["hi"]})
    )));
    assert!(ok(&exec(&mut c, json!({"command": "/bin/true"}))));
    for denied in ["ls", "sh", "/bin/sh", "cat", "/bin/ls"] {
        let r = exec(&mut c, json!({"command": denied}));
        assert_eq!(error_kind(&r), "policy_denied", "{denied}: {r}");
    }
    assert_alive(&mut c);
}

#[test]
fn slow_work_never_delays_a_ping_and_busy_is_clear() {
    let agent = AgentProcess::start_with(json!({}), json!({"max_concurrent_requests": 1}));
    let mut c = agent.connect();
    c.send(&json!({"jsonrpc":"2.0","method":"exec_command","params":{"command":"sleep","args":["3"]},"id":1}));
    std::thread::sleep(std::time::Duration::from_millis(300));
    c.send(&json!({"jsonrpc":"2.0","method":"exec_command","params":{"command":"true"},"id":2}));
    c.send(&json!({"jsonrpc":"2.0","method":"ping","id":3}));
    let first = c.recv();
    let second = c.recv();
    let third = c.recv();
    // The busy refusal and the ping come back before the slow command.
    let ids: Vec<_> = [&first, &second, &third]
        .iter()
        .map(|r| r["id"].clone())
        .collect();
    assert_eq!(ids[2], 1, "{first} {second} {third}");
    let busy = [&first, &second]
        .into_iter()
        .find(|r| r["id"] == 2)
        .unwrap();
    assert_eq!(error_kind(busy), "busy");
    assert_eq!(third["result"]["exit_code"], 0);
}
