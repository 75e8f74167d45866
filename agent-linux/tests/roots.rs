//! Safe roots and housekeeping against the real binary: roots swapped by a
//! guest user in a sticky directory, roots under writable directories, roots
//! removed by a `/tmp` cleaner, and staging files left by a killed agent.

mod common;

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{error_kind, staging_names, AgentProcess};
use serde_json::json;

/// An unprivileged guest user.
const USER: u32 = 1000;

/// `<tmp>/sticky` (root-owned, mode 1777, like `/tmp`) and `<tmp>/victim`
/// (a directory the agent must never write into).
struct Sticky {
    dir: tempfile::TempDir,
}

impl Sticky {
    fn new() -> Sticky {
        let dir = tempfile::tempdir().unwrap();
        for (d, mode) in [("sticky", 0o1777), ("victim", 0o755)] {
            let p = dir.path().join(d);
            std::fs::create_dir(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        Sticky { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn victim_is_empty(&self) -> bool {
        std::fs::read_dir(self.path("victim")).unwrap().count() == 0
    }
}

fn start_writing_to(root: &Path) -> AgentProcess {
    AgentProcess::start_with(
        json!({"allowed_write_paths": [root], "allowed_read_paths": [root]}),
        json!({}),
    )
}

fn write(agent: &AgentProcess, id: u64, path: &Path, content: &str) -> serde_json::Value {
    agent
        .connect()
        .call(id, "file_write", json!({"path": path, "content": content}))
}

#[test]
fn a_root_swapped_for_a_user_symlink_in_a_sticky_directory_never_receives_a_write() {
    let t = Sticky::new();
    let root = t.path("sticky/kvmroot");
    let agent = start_writing_to(&root);
    // The agent created the missing root itself, root-owned, 0755.
    let m = std::fs::symlink_metadata(&root).unwrap();
    assert!(m.is_dir());
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o755));
    let r = write(&agent, 1, &root.join("a.txt"), "first");
    assert_eq!(r["result"]["committed"], true, "{r}");

    // A guest user removes the root and plants a symlink to the victim.
    std::fs::remove_dir_all(&root).unwrap();
    symlink(t.path("victim"), &root).unwrap();
    std::os::unix::fs::lchown(&root, Some(USER), Some(USER)).unwrap();
    for (id, params) in [
        (2, json!({"path": root.join("a.txt"), "content": "owned"})),
        (
            3,
            json!({"path": root.join("b.txt"), "content": "x", "mode": "append"}),
        ),
        (
            4,
            json!({"path": root.join("c.txt"), "content": "x", "more": true}),
        ),
    ] {
        let r = agent.connect().call(id, "file_write", params);
        assert_eq!(error_kind(&r), "policy_denied", "{r}");
        let msg = r["error"]["message"].as_str().unwrap();
        let want = format!(
            "allowed root {0} is unsafe: {0} is a symbolic link in the sticky directory {1} owned by uid {USER}",
            root.display(),
            t.path("sticky").display()
        );
        assert_eq!(msg, want);
        assert_eq!(r["error"]["data"]["component"], root.display().to_string());
        assert_eq!(r["error"]["data"]["owner"], USER);
    }
    // Reads are refused the same way.
    let r = agent
        .connect()
        .call(5, "file_read", json!({"path": root.join("a.txt")}));
    assert_eq!(error_kind(&r), "policy_denied", "{r}");
    assert!(t.victim_is_empty());
    // The guest's log hears of it too.
    assert!(
        agent
            .log()
            .contains("is a symbolic link in the sticky directory"),
        "{}",
        agent.log()
    );
    // The link is left as it was: refused and reported, not removed.
    assert!(std::fs::symlink_metadata(&root)
        .unwrap()
        .file_type()
        .is_symlink());

    // A real directory of the user's own, planted there, is refused too.
    std::fs::remove_file(&root).unwrap();
    std::fs::create_dir(&root).unwrap();
    std::os::unix::fs::chown(&root, Some(USER), Some(USER)).unwrap();
    let r = write(&agent, 6, &root.join("a.txt"), "owned");
    assert_eq!(error_kind(&r), "policy_denied", "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!(
            "{} is a directory owned by uid {USER}",
            root.display()
        )) && msg.contains("in the sticky directory"),
        "{msg}"
    );
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    assert!(t.victim_is_empty());
}

#[test]
fn a_root_removed_by_a_cleaner_is_recreated_safely() {
    let t = Sticky::new();
    let root = t.path("sticky/kvmroot");
    let agent = start_writing_to(&root);
    let r = write(&agent, 1, &root.join("a.txt"), "first");
    assert_eq!(r["result"]["committed"], true, "{r}");
    std::fs::remove_dir_all(&root).unwrap();
    let r = write(&agent, 2, &root.join("a.txt"), "again");
    assert_eq!(r["result"]["committed"], true, "{r}");
    let m = std::fs::symlink_metadata(&root).unwrap();
    assert!(m.is_dir());
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o755));
    assert_eq!(
        std::fs::read_to_string(root.join("a.txt")).unwrap(),
        "again"
    );
    // A read under a missing root creates nothing.
    std::fs::remove_dir_all(&root).unwrap();
    let r = agent
        .connect()
        .call(3, "file_read", json!({"path": root.join("a.txt")}));
    assert_eq!(error_kind(&r), "not_found", "{r}");
    assert!(!root.exists());
}

#[test]
fn a_root_under_a_group_or_other_writable_directory_is_refused() {
    let t = Sticky::new();
    for (id, mode) in [(1, 0o777), (2, 0o775), (3, 0o757)] {
        let open = t.path(&format!("open{mode:o}"));
        std::fs::create_dir_all(open.join("root")).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(mode)).unwrap();
        let root = open.join("root");
        let agent = start_writing_to(&root);
        let r = write(&agent, id, &root.join("a.txt"), "x");
        assert_eq!(error_kind(&r), "policy_denied", "{r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!(
                "{} is a directory writable by group or others without the sticky bit",
                open.display()
            )),
            "{msg}"
        );
        assert_eq!(r["error"]["data"]["mode"], mode);
        assert!(!root.join("a.txt").exists());
        // Start-up warned about it.
        assert!(
            agent
                .log()
                .contains(&format!("allowed root {} is unsafe", root.display())),
            "{}",
            agent.log()
        );
    }
}

#[test]
fn an_agent_killed_mid_upload_leaves_no_staging_file_after_it_restarts() {
    let mut agent = AgentProcess::start();
    let write_dir = agent.write_dir();
    let sub = write_dir.join("deep/er");
    std::fs::create_dir_all(&sub).unwrap();
    // Things the sweep must leave alone: another user's file with a staging
    // name, a name that only looks similar, a staging name on a directory.
    let hex = "0123456789abcdef0123456789abcdef";
    let users = write_dir.join(format!(".theirs.kvmtmp-{hex}"));
    std::fs::write(&users, "user").unwrap();
    std::os::unix::fs::chown(&users, Some(USER), Some(USER)).unwrap();
    let similar = write_dir.join(".x.kvmtmp-short");
    std::fs::write(&similar, "keep").unwrap();
    std::fs::create_dir(write_dir.join(format!(".d.kvmtmp-{hex}"))).unwrap();

    let mut c = agent.connect();
    let mut ids = Vec::new();
    for (id, dir) in [(1, &write_dir), (2, &sub)] {
        let r = c.call(
            id,
            "file_write",
            json!({"path": dir.join("big.bin"), "content": "part one", "more": true}),
        );
        ids.push(
            r["result"]["upload_id"]
                .as_str()
                .expect("an upload id")
                .to_owned(),
        );
    }
    let staged_top: Vec<String> = staging_names(&write_dir)
        .into_iter()
        .filter(|n| n.starts_with(".big.bin."))
        .collect();
    assert_eq!(staged_top.len(), 1, "{staged_top:?}");
    assert_eq!(staging_names(&sub).len(), 1);

    agent.sigkill();
    // The killed agent left both staging files behind.
    assert!(write_dir.join(&staged_top[0]).exists());
    assert_eq!(staging_names(&sub).len(), 1);

    agent.restart();
    let left = staging_names(&write_dir);
    assert_eq!(
        left,
        vec![
            format!(".d.kvmtmp-{hex}"),
            format!(".theirs.kvmtmp-{hex}"),
            ".x.kvmtmp-short".to_owned()
        ]
    );
    assert!(staging_names(&sub).is_empty());
    assert!(!write_dir.join("big.bin").exists());
    let log = agent.log();
    assert!(
        log.contains("removed a stale staging file") && log.contains(&staged_top[0]),
        "{log}"
    );
    // The restarted agent serves as usual.
    let r = agent.connect().call(
        3,
        "file_write",
        json!({"path": write_dir.join("big.bin"), "content": "whole"}),
    );
    assert_eq!(r["result"]["committed"], true, "{r}");
}

#[test]
fn the_listen_socket_is_owner_only() {
    let agent = AgentProcess::start();
    let m = std::fs::symlink_metadata(&agent.socket).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600);
    // Owned by the agent's user (the test's: it started the agent).
    assert_eq!(m.uid(), std::fs::metadata(agent.dir.path()).unwrap().uid());
}
