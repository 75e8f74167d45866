//! The guest operations against a loop-mounted ext4 filesystem of their
//! own, never the machine's: freeze, thaw and the self-thaw, hooks, the
//! `frozen` refusals, trim and the filesystem-to-disk map; and the method
//! allow/block policy through the real binary.
//!
//! Tests that need root (loop devices, `FIFREEZE`) skip when not root,
//! except under `CI=true`, where a skip fails. Every state-changing call
//! names the loop filesystem's mount point explicitly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use agent_common::error::ErrorKind;
use agent_common::methods::{FreezeStatus, FsFreezeParams, FsTrimParams, ThawReason};
use agent_linux::config::Config;
use agent_linux::error::RpcError;
use agent_linux::ops::freeze::{FreezeError, FreezeService};
use common::{error_kind, AgentProcess};
use serde_json::json;

/// True if the test may run; false (after saying so) to skip it. Under
/// `CI=true` a test that cannot run fails instead.
fn require_root(name: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{name} needs root (loop devices, FIFREEZE); under CI=true it may not be skipped"
    );
    eprintln!("skipping {name}: needs root");
    false
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A 64 MiB ext4 image on a loop device, mounted in a temp dir; thawed,
/// unmounted and detached (by path) when dropped.
struct LoopFs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
    device: String,
}

impl LoopFs {
    fn new() -> LoopFs {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let device = run("losetup", &["--find", "--show", img.to_str().unwrap()]);
        let fs = LoopFs {
            _dir: dir,
            mnt,
            device,
        };
        run("mount", &[&fs.device, fs.mnt.to_str().unwrap()]);
        fs
    }

    fn path(&self) -> &Path {
        &self.mnt
    }

    fn mount_point(&self) -> String {
        self.mnt.to_str().unwrap().to_owned()
    }

    /// Freezes it by hand (`fsfreeze -f`); thawed when the guard drops.
    fn freeze_by_hand(&self) -> HandFrozen {
        run("fsfreeze", &["-f", self.mnt.to_str().unwrap()]);
        HandFrozen(self.mount_point())
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let mp = self.mount_point();
        let _ = Command::new("fsfreeze").args(["-u", &mp]).output();
        let _ = Command::new("umount").arg(&mp).output();
        let _ = Command::new("losetup").args(["-d", &self.device]).output();
    }
}

struct HandFrozen(String);

impl Drop for HandFrozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").args(["-u", &self.0]).output();
    }
}

fn service(hook_dir: Option<PathBuf>, timeout: Duration) -> Arc<FreezeService> {
    FreezeService::new(&Config {
        freeze_timeout: timeout,
        fsfreeze_hook_dir: hook_dir,
        ..Config::default()
    })
}

fn only(fs: &LoopFs) -> FsFreezeParams {
    FsFreezeParams {
        mount_points: Some(vec![fs.mount_point()]),
    }
}

fn hook_dir(script: &str) -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let hook = dir.path().join("10-hook");
    std::fs::write(&hook, script).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o700)).unwrap();
    (dir, hook)
}

#[tokio::test]
async fn freeze_thaw_and_status_with_hooks() {
    if !require_root("freeze_thaw_and_status_with_hooks") {
        return;
    }
    let fs = LoopFs::new();
    let record = tempfile::NamedTempFile::new().unwrap();
    let (hooks, hook) = hook_dir(&format!(
        "#!/bin/sh\necho \"$1\" >> {}\necho said $1\n",
        record.path().display()
    ));
    let svc = service(Some(hooks.path().to_owned()), Duration::from_secs(600));
    let mp = fs.mount_point();
    let r = svc.freeze(only(&fs)).await.unwrap();
    assert_eq!(r.frozen, [mp.as_str()]);
    assert_eq!(r.hooks, [hook.display().to_string()]);
    assert_eq!(r.timeout_seconds, 600);
    assert!(svc.is_frozen());
    let s = svc.status();
    assert_eq!(s.status, FreezeStatus::Frozen);
    assert_eq!(s.mount_points, [mp.as_str()]);
    assert!(s.remaining_seconds.is_some_and(|r| r <= 600));
    // A second freeze is refused while the first holds.
    let e = svc.freeze(only(&fs)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Frozen, "{e}");
    let t = svc.thaw(ThawReason::Request).await.unwrap();
    assert_eq!(t.thawed, [mp.as_str()]);
    assert_eq!(t.hooks, [hook.display().to_string()]);
    assert!(!svc.is_frozen());
    let s = svc.status();
    assert_eq!(s.status, FreezeStatus::Thawed);
    assert_eq!(s.last_thaw, Some(ThawReason::Request));
    assert_eq!(s.remaining_seconds, None);
    assert_eq!(
        std::fs::read_to_string(record.path()).unwrap(),
        "freeze\nthaw\n"
    );
    std::fs::write(fs.path().join("after"), "x").unwrap();
}

#[tokio::test]
async fn a_freeze_left_alone_thaws_itself() {
    if !require_root("a_freeze_left_alone_thaws_itself") {
        return;
    }
    let fs = LoopFs::new();
    let svc = service(None, Duration::from_secs(1));
    svc.freeze(only(&fs)).await.unwrap();
    // Hang guard only: the timer fires after 1 s.
    for _ in 0..600 {
        if svc.status().status == FreezeStatus::Thawed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = svc.status();
    assert_eq!(s.status, FreezeStatus::Thawed);
    assert_eq!(s.last_thaw, Some(ThawReason::Timeout));
    assert!(!svc.is_frozen());
    std::fs::write(fs.path().join("after"), "x").unwrap();
}

#[tokio::test]
async fn a_partial_failure_thaws_what_was_frozen_and_names_the_mount() {
    if !require_root("a_partial_failure_thaws_what_was_frozen_and_names_the_mount") {
        return;
    }
    // b is mounted first, so a (mounted last) is frozen first; b is
    // frozen by someone else already, so FIFREEZE on it fails (EBUSY).
    let b = LoopFs::new();
    let a = LoopFs::new();
    let held = b.freeze_by_hand();
    let svc = service(None, Duration::from_secs(600));
    let e = svc
        .freeze(FsFreezeParams {
            mount_points: Some(vec![b.mount_point(), a.mount_point()]),
        })
        .await
        .unwrap_err();
    drop(held);
    let FreezeError::Freeze {
        mount_point,
        thawed,
        ..
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(*mount_point, b.mount_point());
    assert_eq!(*thawed, 1, "a was frozen, then thawed");
    assert!(e.to_string().contains(&b.mount_point()), "{e}");
    assert!(!svc.is_frozen());
    assert_eq!(svc.status().status, FreezeStatus::Thawed);
    std::fs::write(a.path().join("after"), "x").unwrap();
}

#[tokio::test]
async fn a_failing_freeze_hook_freezes_nothing() {
    if !require_root("a_failing_freeze_hook_freezes_nothing") {
        return;
    }
    let fs = LoopFs::new();
    let (hooks, _) =
        hook_dir("#!/bin/sh\n[ \"$1\" = thaw ] && exit 0\necho cannot flush >&2\nexit 3\n");
    let svc = service(Some(hooks.path().to_owned()), Duration::from_secs(600));
    let e = svc.freeze(only(&fs)).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("10-hook") && msg.contains("cannot flush"),
        "{msg}"
    );
    assert!(!svc.is_frozen());
    std::fs::write(fs.path().join("after"), "x").unwrap();
}

#[test]
fn trim_reports_bytes_for_the_filesystem_named() {
    if !require_root("trim_reports_bytes_for_the_filesystem_named") {
        return;
    }
    let fs = LoopFs::new();
    let r = agent_linux::ops::trim::trim(FsTrimParams {
        mount_points: Some(vec![fs.mount_point()]),
        minimum_bytes: 0,
    })
    .unwrap();
    assert_eq!(r.filesystems.len(), 1);
    let t = &r.filesystems[0];
    assert_eq!(t.mount_point, fs.mount_point());
    assert_eq!(t.error, None);
    assert!(t.trimmed_bytes.is_some_and(|b| b > 0), "{t:?}");
}

#[test]
fn the_loop_filesystem_maps_to_its_loop_device() {
    if !require_root("the_loop_filesystem_maps_to_its_loop_device") {
        return;
    }
    let fs = LoopFs::new();
    let mounts = agent_linux::ops::mounts::read_mounts().unwrap();
    let info = agent_linux::ops::disks::fsinfo(Path::new("/sys"), &mounts);
    let e = info
        .filesystems
        .iter()
        .find(|f| f.mount_point == fs.mount_point())
        .expect("the loop filesystem is listed");
    assert_eq!(e.fs_type, "ext4");
    assert_eq!(format!("/dev/{}", e.name), fs.device);
    assert_eq!(e.disks.len(), 1);
    assert_eq!(e.disks[0].device, fs.device);
    assert!(e.total_bytes.is_some_and(|t| t > 0));
}

/// The agent's own process: while frozen, writes answer `frozen` at once,
/// ping, status and thaw answer, the agent's log (on the frozen
/// filesystem) does not block it, and a write from elsewhere completes
/// only after the thaw.
#[test]
fn the_agent_never_blocks_on_a_frozen_filesystem() {
    if !require_root("the_agent_never_blocks_on_a_frozen_filesystem") {
        return;
    }
    let fs = LoopFs::new();
    let log = fs.path().join("agent.log");
    let agent = AgentProcess::start_with(
        json!({}),
        json!({"log_file": log, "freeze_timeout_seconds": 600, "fsfreeze_hook_dir": ""}),
    );
    let mut c = agent.connect();
    let r = c.call(1, "get_agent_info", json!({}));
    assert_eq!(r["result"]["limits"]["freeze_timeout_seconds"], 600);
    let r = c.call(2, "fs_freeze", json!({"mount_points": [fs.mount_point()]}));
    assert_eq!(r["result"]["frozen"], json!([fs.mount_point()]), "{r}");
    let before = std::fs::metadata(&log).unwrap().len();
    let target = fs.path().join("late.txt");
    let writer = std::thread::spawn({
        let target = target.clone();
        move || std::fs::write(target, "written after the thaw")
    });
    let w = c.call(
        3,
        "file_write",
        json!({"path": agent.write_dir().join("x"), "content": "x"}),
    );
    assert_eq!(error_kind(&w), "frozen", "{w}");
    assert!(w["error"]["message"].as_str().unwrap().contains("fs_thaw"));
    let x = c.call(4, "exec_command", json!({"command": "true"}));
    assert_eq!(error_kind(&x), "frozen", "{x}");
    for id in 5..25 {
        let p = c.call(id, "ping", json!({}));
        assert_eq!(p["result"]["pong"], true);
    }
    let s = c.call(30, "fs_freeze_status", json!({}));
    assert_eq!(s["result"]["status"], "frozen");
    assert_eq!(s["result"]["mount_points"], json!([fs.mount_point()]));
    let q = c.call(31, "get_disk_usage", json!({}));
    assert!(
        q["result"]["filesystems"].is_array(),
        "queries still answer"
    );
    // The write from outside cannot finish while the filesystem is frozen.
    assert!(!writer.is_finished());
    assert_eq!(
        std::fs::metadata(&log).unwrap().len(),
        before,
        "nothing logged while frozen"
    );
    let t = c.call(32, "fs_thaw", json!({}));
    assert_eq!(t["result"]["thawed"], json!([fs.mount_point()]), "{t}");
    writer.join().unwrap().unwrap();
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "written after the thaw"
    );
    let s = c.call(33, "fs_freeze_status", json!({}));
    assert_eq!(s["result"]["status"], "thawed");
    assert_eq!(s["result"]["last_thaw"], "request");
    let w = c.call(
        34,
        "file_write",
        json!({"path": agent.write_dir().join("x"), "content": "x"}),
    );
    assert_eq!(w["result"]["committed"], true, "{w}");
    // What was held comes out after the thaw.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("filesystems frozen"), "{text}");
    assert!(text.contains("filesystems thawed"), "{text}");
}

#[test]
fn blocked_and_unlisted_methods_are_refused_and_reported() {
    let agent = AgentProcess::start_with(
        json!({"allowed_methods": ["get_system_info", "exec_command", "fs_freeze_status"],
               "blocked_methods": ["exec_command"]}),
        json!({}),
    );
    let mut c = agent.connect();
    let r = c.call(1, "exec_command", json!({"command": "true"}));
    assert_eq!(error_kind(&r), "policy_denied", "{r}");
    assert_eq!(r["error"]["data"]["config_key"], "security.blocked_methods");
    let r = c.call(2, "get_time", json!({}));
    assert_eq!(error_kind(&r), "policy_denied", "{r}");
    assert_eq!(r["error"]["data"]["config_key"], "security.allowed_methods");
    let r = c.call(3, "get_system_info", json!({}));
    assert!(r["result"].is_object(), "{r}");
    let info = c.call(4, "get_agent_info", json!({}));
    let disabled = info["result"]["disabled_methods"].as_array().unwrap();
    assert!(disabled.contains(&json!("exec_command")));
    assert!(disabled.contains(&json!("get_time")));
    assert!(!disabled.contains(&json!("get_system_info")));
    assert!(!disabled.contains(&json!("ping")), "ping is always served");
}

#[test]
fn an_unknown_method_name_in_the_config_stops_the_agent_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"security":{"blocked_methods":["fs_freez"]}}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvmmanager-agent"))
        .args(["--check-config", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("security.blocked_methods") && err.contains("fs_freez"),
        "{err}"
    );
}

/// The `kvmmanager-ctl` commands and the JSON fields the real-VM checks
/// read, against the real agent and the loop filesystem.
#[test]
fn ctl_commands_show_the_fields_a_vm_check_reads() {
    if !require_root("ctl_commands_show_the_fields_a_vm_check_reads") {
        return;
    }
    let ctl =
        PathBuf::from(env!("CARGO_BIN_EXE_kvmmanager-agent")).with_file_name("kvmmanager-ctl");
    assert!(
        ctl.exists(),
        "{} is missing: run `cargo test --workspace`, or `cargo build -p host-client` first",
        ctl.display()
    );
    let fs = LoopFs::new();
    let mp = fs.mount_point();
    let agent = AgentProcess::start_with(json!({}), json!({"fsfreeze_hook_dir": ""}));
    let ctl_json = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(&ctl)
            .arg("--socket")
            .arg(&agent.socket)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let r = ctl_json(&["fsfreeze", "freeze", &mp]);
    assert_eq!(r["frozen"], json!([mp]));
    assert_eq!(r["timeout_seconds"], 60);
    let s = ctl_json(&["fsfreeze", "status"]);
    assert_eq!(
        (s["status"].as_str(), &s["mount_points"]),
        (Some("frozen"), &json!([mp]))
    );
    let t = ctl_json(&["fsfreeze", "thaw"]);
    assert_eq!(t["thawed"], json!([mp]));
    assert_eq!(ctl_json(&["fsfreeze", "status"])["last_thaw"], "request");
    let trim = ctl_json(&["fstrim", &mp]);
    assert_eq!(trim["filesystems"][0]["mount_point"], mp.as_str());
    assert!(
        trim["filesystems"][0]["trimmed_bytes"].as_u64().is_some(),
        "{trim}"
    );
    let info = ctl_json(&["fsinfo"]);
    let entry = info["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["mount_point"] == mp.as_str())
        .expect("the loop filesystem");
    assert_eq!(entry["disks"][0]["device"], fs.device.as_str());
    let cpus = ctl_json(&["vcpus"]);
    assert!(cpus["cpus"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["online"] == true));
    let time = ctl_json(&["time"]);
    assert!(time["time_ns"].as_u64().is_some_and(|t| t > 0));
    let users = ctl_json(&["users"]);
    assert!(users["users"].is_array());
}

/// An agent stopped while it holds a freeze thaws first.
#[test]
fn a_stopping_agent_thaws_what_it_froze() {
    if !require_root("a_stopping_agent_thaws_what_it_froze") {
        return;
    }
    let fs = LoopFs::new();
    let mut agent = AgentProcess::start_with(
        json!({}),
        json!({"freeze_timeout_seconds": 3600, "fsfreeze_hook_dir": ""}),
    );
    let mut c = agent.connect();
    let r = c.call(1, "fs_freeze", json!({"mount_points": [fs.mount_point()]}));
    assert_eq!(r["result"]["frozen"], json!([fs.mount_point()]), "{r}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "{status}");
    // Thawed: this write returns (it would block while frozen). Hang
    // guard only: if it does not, the guard's `fsfreeze -u` frees it.
    let writer = std::thread::spawn({
        let path = fs.path().join("after");
        move || std::fs::write(path, "x")
    });
    for _ in 0..600 {
        if writer.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        writer.is_finished(),
        "the filesystem stayed frozen after the agent stopped"
    );
    writer.join().unwrap().unwrap();
    assert!(agent.log().contains("thawed at exit"), "{}", agent.log());
}
