//! `kvmmanager-ctl` run as a program, for what needs no agent: usage errors,
//! connection errors, channel-xml and completions. The commands that talk to
//! an agent are covered against the real agent by the workspace's
//! integration suite.

use std::process::{Command, Output};

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvmmanager-ctl"))
        .args(args)
        .env_remove("KVMMANAGER_SOCKET")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("kvmmanager-ctl runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn channel_xml_prints_the_channel_element() {
    let out = ctl(&["channel-xml"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout),
        "<channel type='unix'>\n  <source mode='bind'/>\n  <target type='virtio' name='org.kvmmanager.agent.0'/>\n</channel>\n"
    );
}

#[test]
fn completions_are_generated() {
    let out = ctl(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0));
    let script = text(&out.stdout);
    assert!(script.contains("complete -F"), "{script}");
    assert!(script.contains("channel-xml"));
}

#[test]
fn a_missing_socket_is_exit_3_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let out = ctl(&["--socket", sock.to_str().unwrap(), "ping"]);
    assert_eq!(out.status.code(), Some(3));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("kvmmanager-ctl: error: cannot connect to the agent socket "),
        "{err}"
    );
    assert!(err.contains("channel-xml"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn a_refused_socket_is_exit_3_and_exec_reports_255() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    // A socket file nobody listens on: connection refused.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let out = ctl(&["--socket", sock.to_str().unwrap(), "info"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let out = ctl(&["--socket", sock.to_str().unwrap(), "exec", "--", "true"]);
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
}

#[test]
fn the_socket_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("env.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_kvmmanager-ctl"))
        .arg("ping")
        .env("KVMMANAGER_SOCKET", &sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("env.sock"));
}

#[test]
fn usage_errors_are_exit_2() {
    for args in [
        &["frobnicate"][..],
        &["exec"],
        &["--socket"],
        &["write", "/tmp/x", "--mode", "sideways"],
    ] {
        let out = ctl(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // No target at all.
    let out = ctl(&["ping"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--socket PATH or --domain NAME"));
    // Bad JSON params are refused before connecting.
    let out = ctl(&["--socket", "/nonexistent", "call", "ping", "{nope"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_and_version_succeed_and_document_exit_codes() {
    let out = ctl(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for needle in [
        "Exit status:",
        "3  cannot connect",
        "--domain",
        "channel-xml",
        "Examples:",
    ] {
        assert!(help.contains(needle), "missing {needle:?} in help");
    }
    let out = ctl(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).starts_with("kvmmanager-ctl "));
}
