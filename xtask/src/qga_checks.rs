//! The qemu-ga dialect through libvirt's own agent commands (issue 14):
//! the Debian guest's domain has qemu-ga's port `org.qemu.guest_agent.0`,
//! the agent serves it (`qemu_ga_channel_name` in the test config), and
//! `virsh` talks to it exactly as it talks to qemu-ga.

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::debian::{DATA_MOUNT, DATA_SERIAL, HOSTNAME, QEMU_GA_DEB_DIR};
use crate::suite::{ensure, Ctl, Tally};
use crate::util::{bail, output_with_timeout, Result};
use crate::vm::LIBVIRT_URI;

/// The agent's version, as `guest-info` reports it.
const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A user the checks create for the key and password commands.
const TEST_USER: &str = "kvmmqga";

/// `virsh qemu-agent-command DOMAIN CMD`: the reply's `return`.
fn agent_command(domain: &str, cmd: &Value) -> Result<Value> {
    let out = virsh(&["qemu-agent-command", domain, &cmd.to_string()])?;
    let v: Value = serde_json::from_str(out.trim())
        .map_err(|e| format!("{cmd}: reply is not JSON ({e}): {out}"))?;
    v.get("return")
        .cloned()
        .ok_or_else(|| format!("{cmd}: no return in {out}").into())
}

/// `guest-info`'s `version` through libvirt.
fn agent_version(domain: &str) -> Result<String> {
    let info = agent_command(domain, &json!({"execute": "guest-info"}))?;
    info["version"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("guest-info without a version: {info}").into())
}

/// Waits until `guest-info` through libvirt reports a version for which
/// `want` holds; the last version seen.
fn wait_version(domain: &str, timeout: Duration, want: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = agent_version(domain);
        match &seen {
            Ok(v) if want(v) => return Ok(v.clone()),
            _ if Instant::now() >= deadline => {
                bail!("guest-info after {timeout:?}: {seen:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The packaged default serves qemu-ga's port: right after `apt install`,
/// before the test config names it, libvirt's `guest-info` is answered by
/// this agent.
pub(crate) fn default_port_check(t: &mut Tally, domain: &str) {
    t.check("libvirt-debian-qemu-ga-port-by-default", || {
        let v = wait_version(domain, Duration::from_secs(30), |v| v == AGENT_VERSION)?;
        ensure(v == AGENT_VERSION, || format!("guest-info version {v}"))
    });
}

/// Debian's qemu-guest-agent installed beside the agent (`apt-get install`
/// of its `.deb`, kept in the image): the agent hands the port to qemu-ga,
/// whose first start opens it.
pub(crate) fn beside_qemu_ga_check(t: &mut Tally, ctl: &Ctl, domain: &str) {
    t.check("libvirt-debian-qemu-ga-beside", || {
        // Through systemd-run: apt under TCG may outlast an exec's limit.
        let r = ctl.run(
            true,
            &[
                "exec",
                "--timeout",
                "280",
                "--",
                "systemd-run",
                "--unit=kvmm-qga-install",
                "--collect",
                "--wait",
                "--quiet",
                "sh",
                "-c",
                &format!(
                    "DEBIAN_FRONTEND=noninteractive apt-get install -y {QEMU_GA_DEB_DIR}/qemu-guest-agent_*.deb >/var/log/kvmm-qga-install.log 2>&1"
                ),
            ],
            Duration::from_secs(300),
        )?;
        let v = r.json()?;
        ensure(crate::suite::exec_result(&v)["exit_code"] == 0, || {
            let log = ctl.sh("tail -n 20 /var/log/kvmm-qga-install.log").unwrap_or_default();
            format!("apt-get install qemu-guest-agent: {v}\n{log}")
        })?;
        // The agent let go of the port at once (the unit appeared).
        let log = ctl.sh(
            "journalctl -b -u kvmmanager-agent.service --no-pager -o cat | grep -c 'closing its port' || true",
        )?;
        ensure(log.trim() != "0", || {
            "the agent's journal does not say it closed qemu-ga's port".to_owned()
        })?;
        // Debian's postinst may leave the static unit alone (udev starts
        // it at boot): start it as its documentation says; it must open
        // the port at its first start.
        let state = ctl.sh("systemctl show qemu-guest-agent.service -p ActiveState -p NRestarts -p Result")?;
        println!("  qemu-guest-agent.service after apt-get install: {}", state.split_whitespace().collect::<Vec<_>>().join(" "));
        if !state.contains("ActiveState=active") {
            ctl.sh("systemctl start qemu-guest-agent.service")?;
        }
        // qemu-ga answers libvirt now (its version is not ours).
        let theirs = wait_version(domain, Duration::from_secs(60), |v| v != AGENT_VERSION).map_err(|e| {
            let diag = ctl
                .sh("systemctl status --no-pager qemu-guest-agent.service; journalctl -b --no-pager -u qemu-guest-agent.service | tail -n 20")
                .unwrap_or_default();
            format!("{e}\n{diag}")
        })?;
        ensure(theirs.starts_with("7.") || theirs.starts_with("8."), || {
            format!("qemu-ga's version {theirs}")
        })?;
        // Never fought over: qemu-ga's first start opened the port.
        let props = ctl.sh(
            "systemctl show qemu-guest-agent.service -p ActiveState -p NRestarts -p MainPID",
        )?;
        ensure(
            props.contains("ActiveState=active") && props.contains("NRestarts=0"),
            || format!("qemu-guest-agent.service: {props}"),
        )?;
        // Our own port is unaffected.
        ctl.wait_ping(Duration::from_secs(10)).map(|_| ())
    });
}

/// Masks qemu-guest-agent: the port is the agent's again, at once.
pub(crate) fn mask_check(t: &mut Tally, ctl: &Ctl, domain: &str) {
    t.check("libvirt-debian-qemu-ga-masked", || {
        ctl.sh("systemctl mask --now qemu-guest-agent.service")?;
        let ours = wait_version(domain, Duration::from_secs(30), |v| v == AGENT_VERSION)?;
        ensure(ours == AGENT_VERSION, || format!("after mask: {ours}"))?;
        let gone = ctl.sh("systemctl is-active qemu-guest-agent.service || true")?;
        ensure(gone.trim() != "active", || format!("qemu-ga still {gone}"))
    });
}

/// After a boot with qemu-guest-agent installed and not masked: qemu-ga
/// served the port from its first start, and the agent never opened it.
pub(crate) fn unmasked_at_boot_check(t: &mut Tally, ctl: &Ctl, domain: &str) {
    t.check("libvirt-debian-qemu-ga-owns-port-at-boot", || {
        let theirs = wait_version(domain, Duration::from_secs(60), |v| v != AGENT_VERSION)?;
        ensure(theirs != AGENT_VERSION, || {
            format!("guest-info version {theirs}")
        })?;
        let props =
            ctl.sh("systemctl show qemu-guest-agent.service -p ActiveState -p NRestarts")?;
        ensure(
            props.contains("ActiveState=active") && props.contains("NRestarts=0"),
            || format!("qemu-guest-agent.service: {props}"),
        )?;
        let log = ctl.sh("journalctl -b -u kvmmanager-agent.service --no-pager -o cat")?;
        ensure(log.contains("leaving the port to qemu-guest-agent"), || {
            "the agent's journal of this boot does not say it left qemu-ga's port".to_owned()
        })?;
        // One port opened in this boot: its own.
        let opened = log.matches("serving the virtio-serial port").count();
        ensure(opened == 1, || {
            format!("the agent opened {opened} ports in this boot:\n{log}")
        })
    });
}

/// `virsh -c qemu:///system ARGS` with a time limit; its stdout (not
/// `-q`: that hides what domfsfreeze and domfsthaw report).
pub(crate) fn virsh(args: &[&str]) -> Result<String> {
    let mut c = Command::new("virsh");
    c.args(["-c", LIBVIRT_URI]).args(args);
    let out = output_with_timeout(&mut c, Duration::from_secs(120))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure(out.status.success(), || {
        format!(
            "virsh {}: {}: {}{}",
            args.join(" "),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(stdout)
}

/// libvirt's agent commands against the agent's qemu-ga dialect.
pub(crate) fn virsh_agent_checks(t: &mut Tally, ctl: &Ctl, domain: &str) {
    let n = |s: &str| format!("libvirt-debian-virsh-{s}");
    t.check(&n("qemu-agent-command-ping"), || {
        let out = virsh(&["qemu-agent-command", domain, r#"{"execute":"guest-ping"}"#])?;
        ensure(out.trim() == r#"{"return":{}}"#, || {
            format!("guest-ping: {out}")
        })
    });
    t.check(&n("qemu-agent-command-info"), || {
        let info = agent_command(domain, &json!({"execute": "guest-info"}))?;
        ensure(info["version"] == AGENT_VERSION, || {
            format!("guest-info version: {}", info["version"])
        })?;
        let cmds = info["supported_commands"]
            .as_array()
            .ok_or_else(|| format!("guest-info: {info}"))?;
        let find = |name: &str| cmds.iter().find(|c| c["name"] == name).cloned();
        for name in [
            "guest-exec",
            "guest-file-open",
            "guest-get-fsinfo",
            "guest-fsfreeze-freeze",
        ] {
            let c = find(name).ok_or_else(|| format!("{name} not in guest-info"))?;
            ensure(
                c["enabled"] == true && c["success-response"] == true,
                || format!("{name}: {c}"),
            )?;
        }
        let shutdown = find("guest-shutdown").ok_or("guest-shutdown not in guest-info")?;
        ensure(shutdown["success-response"] == false, || {
            format!("guest-shutdown: {shutdown}")
        })
    });
    t.check(&n("qemu-agent-command-file"), || {
        let path = "/tmp/kvmmanager/virsh-file.txt";
        let text = "written by virsh qemu-agent-command\n";
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let h = agent_command(
            domain,
            &json!({"execute": "guest-file-open", "arguments": {"path": path, "mode": "w"}}),
        )?;
        let handle = h.as_i64().ok_or_else(|| format!("guest-file-open: {h}"))?;
        let w = agent_command(
            domain,
            &json!({"execute": "guest-file-write", "arguments": {"handle": handle, "buf-b64": b64(text.as_bytes())}}),
        )?;
        ensure(w["count"] == text.len(), || format!("guest-file-write: {w}"))?;
        agent_command(
            domain,
            &json!({"execute": "guest-file-close", "arguments": {"handle": handle}}),
        )?;
        let in_guest = ctl.sh(&format!("cat {path}"))?;
        ensure(in_guest == text, || format!("{path} in the guest: {in_guest:?}"))?;
        let h = agent_command(
            domain,
            &json!({"execute": "guest-file-open", "arguments": {"path": path}}),
        )?;
        let handle = h.as_i64().ok_or_else(|| format!("guest-file-open: {h}"))?;
        let r = agent_command(
            domain,
            &json!({"execute": "guest-file-read", "arguments": {"handle": handle, "count": 4096}}),
        )?;
        agent_command(
            domain,
            &json!({"execute": "guest-file-close", "arguments": {"handle": handle}}),
        )?;
        ensure(
            r["count"] == text.len() && r["buf-b64"] == b64(text.as_bytes()) && r["eof"] == true,
            || format!("guest-file-read: {r}"),
        )?;
        // The policy holds: /etc/shadow is outside allowed_read_paths.
        let refused = virsh(&[
            "qemu-agent-command",
            domain,
            r#"{"execute":"guest-file-open","arguments":{"path":"/etc/shadow"}}"#,
        ]);
        ensure(refused.is_err(), || format!("/etc/shadow opened: {refused:?}"))
    });
    t.check(&n("domifaddr-agent"), || {
        let out = virsh(&["domifaddr", domain, "--source", "agent"])?;
        let lo = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some("lo"))
            .ok_or_else(|| format!("no lo in domifaddr: {out}"))?;
        ensure(
            lo.contains("00:00:00:00:00:00") && lo.contains("ipv4") && lo.contains("127.0.0.1/8"),
            || format!("domifaddr lo: {out}"),
        )
    });
    t.check(&n("domhostname"), || {
        let out = virsh(&["domhostname", domain, "--source", "agent"])?;
        ensure(out.trim() == HOSTNAME, || format!("domhostname: {out}"))
    });
    t.check(&n("domtime"), || {
        let out = virsh(&["domtime", domain])?;
        let secs: u64 = out
            .split_whitespace()
            .last()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("domtime: {out}"))?;
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs();
        ensure(secs.abs_diff(host) < 60, || {
            format!("guest time {secs} vs host {host}")
        })
    });
    t.check(&n("guestinfo"), || {
        // Each group on its own, each with the facts of this guest.
        let groups: &[(&str, &[(&str, &str)])] = &[
            (
                "--os",
                &[
                    ("os.id", "debian"),
                    ("os.name", "Debian GNU/Linux"),
                    ("os.version-id", "12"),
                    ("os.machine", "x86_64"),
                    ("os.kernel-release", "cloud-amd64"),
                ],
            ),
            ("--hostname", &[("hostname", HOSTNAME)]),
            ("--timezone", &[("timezone.offset", "0")]),
            ("--user", &[("user.count", "")]),
            (
                "--filesystem",
                &[("fs.count", ""), ("mountpoint", DATA_MOUNT)],
            ),
            (
                "--disk",
                &[
                    ("disk.count", ""),
                    ("serial", DATA_SERIAL),
                    ("name", "/dev/vdb"),
                ],
            ),
            (
                "--interface",
                &[("if.count", ""), ("name", "lo"), ("addr", "127.0.0.1")],
            ),
        ];
        for (group, wants) in groups {
            let out = virsh(&["guestinfo", domain, group])?;
            for (key, value) in *wants {
                let hit = out.lines().any(|l| {
                    l.split_once(':')
                        .is_some_and(|(k, v)| k.trim().contains(key) && v.trim().contains(value))
                });
                ensure(hit, || {
                    format!("guestinfo {group} lacks {key} = {value}: {out}")
                })?;
            }
        }
        Ok(())
    });
    t.check(&n("user-sshkeys"), || {
        ctl.sh(&format!("id {TEST_USER} >/dev/null 2>&1 || useradd -m {TEST_USER}"))?;
        let dir = crate::suite::scratch("virsh-keys")?;
        let file = dir.join("keys.pub");
        let keys = [
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDWgPSS9orBb0aATbjX0a3Rlh+phq2fU/v88KhnlgkEm one@kvmm",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDkN+IMxJw0Fn8YxCpOxqBN+5RZiO8rMy3I8xPdjPL3c two@kvmm",
        ];
        std::fs::write(&file, format!("{}\n{}\n", keys[0], keys[1]))?;
        let f = file.display().to_string();
        virsh(&["set-user-sshkeys", domain, TEST_USER, "--file", &f])?;
        let got = virsh(&["get-user-sshkeys", domain, TEST_USER])?;
        ensure(keys.iter().all(|k| got.contains(k)), || {
            format!("get-user-sshkeys after set: {got}")
        })?;
        std::fs::write(&file, format!("{}\n", keys[0]))?;
        virsh(&["set-user-sshkeys", domain, TEST_USER, "--remove", "--file", &f])?;
        let got = virsh(&["get-user-sshkeys", domain, TEST_USER])?;
        ensure(!got.contains(keys[0]) && got.contains(keys[1]), || {
            format!("get-user-sshkeys after remove: {got}")
        })?;
        // A key the agent refuses: virsh fails and says why.
        std::fs::write(&file, "ssh-ed25519 AAAAnot-base64 bad@kvmm\n")?;
        let mut c = Command::new("virsh");
        c.args(["-c", LIBVIRT_URI, "set-user-sshkeys", domain, TEST_USER, "--file", &f]);
        let out = output_with_timeout(&mut c, Duration::from_secs(60))?;
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure(!out.status.success() && said.contains("refused"), || {
            format!("set-user-sshkeys with a bad key: {}: {said:?}", out.status)
        })?;
        let owner = ctl.sh(&format!(
            "stat -c '%U %a' /home/{TEST_USER}/.ssh /home/{TEST_USER}/.ssh/authorized_keys"
        ))?;
        ensure(
            owner.lines().collect::<Vec<_>>() == [format!("{TEST_USER} 700"), format!("{TEST_USER} 600")],
            || format!("owner and modes: {owner}"),
        )?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    });
    t.check(&n("set-user-password"), || {
        ctl.sh(&format!("id {TEST_USER} >/dev/null 2>&1 || useradd -m {TEST_USER}"))?;
        let field = || -> Result<String> {
            Ok(ctl
                .sh(&format!("getent shadow {TEST_USER} | cut -d: -f2"))?
                .trim()
                .to_owned())
        };
        let before = field()?;
        virsh(&["set-user-password", domain, TEST_USER, "plain-Secret-1"])?;
        let plain = field()?;
        ensure(plain.starts_with('$') && plain != before, || {
            format!("shadow after a plain password: {plain:?} (before {before:?})")
        })?;
        // `openssl passwd -6 -salt kvmmsalt crypted-Secret-2`.
        let crypted = "$6$kvmmsalt$xpJmDOee48KQhe8Mk27KNXgZh9Fdq1BbDg8ReV7hB6IAkRw016bqA6cQ.XOE3CC2VyLsEl1asAVPNZKlDY4Pe1";
        virsh(&["set-user-password", domain, TEST_USER, crypted, "--encrypted"])?;
        let now = field()?;
        ensure(now == crypted, || format!("shadow after --encrypted: {now:?}"))
    });
    t.check(&n("domtime-sync"), || {
        let host = || -> Result<u64> {
            Ok(std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|e| e.to_string())?
                .as_secs())
        };
        let guest = || -> Result<u64> {
            let out = virsh(&["domtime", domain])?;
            out.split_whitespace()
                .last()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("domtime: {out}").into())
        };
        let near = |what: &str, want: u64| -> Result<()> {
            let got = guest()?;
            ensure(got.abs_diff(want) < 60, || {
                format!("guest time {what}: {got}, expected about {want}")
            })
        };
        let result = (|| {
            // guest-set-time with a time: the clock (and the RTC) set.
            let back = (host()? - 3600).to_string();
            virsh(&["domtime", domain, "--time", &back])?;
            near("after --time an hour back", host()? - 3600)?;
            virsh(&["domtime", domain, "--now"])?;
            near("after --now", host()?)?;
            // The system clock alone an hour back (the RTC keeps the
            // time), then guest-set-time without a time: from the RTC.
            ctl.sh("date -s @$(( $(date +%s) - 3600 )) >/dev/null")?;
            near("after date -s an hour back", host()? - 3600)?;
            virsh(&["domtime", domain, "--sync"])?;
            near("after --sync", host()?)
        })();
        if result.is_err() {
            // Never leave the guest an hour off for the checks after.
            let _ = virsh(&["domtime", domain, "--now"]);
        }
        result
    });
    t.check(&n("domfsinfo"), || {
        let out = virsh(&["domfsinfo", domain])?;
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(DATA_MOUNT))
            .ok_or_else(|| format!("no {DATA_MOUNT} in domfsinfo: {out}"))?;
        // libvirt maps the guest's PCI address and serial to its own disk.
        ensure(line.contains("vdb"), || {
            format!("{DATA_MOUNT} not mapped to vdb: {line}")
        })
    });
    t.check(&n("domfsfreeze-thaw"), || {
        let froze = virsh(&["domfsfreeze", domain, "--mountpoint", DATA_MOUNT]);
        // Thaw whatever happened: a frozen guest fails every later check.
        let thawed = virsh(&["domfsthaw", domain]);
        let froze = froze?;
        ensure(froze.contains("Froze 1 filesystem"), || {
            format!("domfsfreeze: {froze}")
        })?;
        let thawed = thawed?;
        ensure(thawed.contains("Thawed 1 filesystem"), || {
            format!("domfsthaw: {thawed}")
        })
    });
    t.check(&n("qemu-agent-command-guest-exec"), || {
        let out = virsh(&[
            "qemu-agent-command",
            domain,
            r#"{"execute":"guest-exec","arguments":{"path":"/bin/echo","arg":["hi"],"capture-output":true}}"#,
        ])?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        let pid = v["return"]["pid"]
            .as_u64()
            .ok_or_else(|| format!("guest-exec: {out}"))?;
        let status = format!(r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = virsh(&["qemu-agent-command", domain, &status])?;
            let v: serde_json::Value = serde_json::from_str(out.trim())?;
            if v["return"]["exited"] == true {
                return ensure(
                    v["return"]["exitcode"] == 0 && v["return"]["out-data"] == "aGkK",
                    || format!("guest-exec-status: {out}"),
                );
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!("guest-exec did not finish within 30 s: {out}").into());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    t.check(&n("guestvcpus"), || {
        let out = virsh(&["guestvcpus", domain])?;
        ensure(out.contains("0-1"), || format!("guestvcpus: {out}"))
    });
}

/// A second qemu-ga channel of the Debian domain, where the test runs
/// Debian's qemu-ga beside the agent for the same-guest comparison.
pub(crate) const QGA_PEER_PORT: &str = "org.kvmmanager.qga-peer.0";

/// Read-only commands compared between the agent (through libvirt) and
/// Debian's qemu-ga (on [`QGA_PEER_PORT`]) in the same guest.
const SAME_GUEST: &[&str] = &[
    "guest-get-host-name",
    "guest-get-osinfo",
    "guest-get-timezone",
    "guest-get-users",
    "guest-get-vcpus",
    "guest-get-memory-block-info",
    "guest-network-get-interfaces",
    "guest-get-fsinfo",
    "guest-get-disks",
    "guest-get-diskstats",
    "guest-get-cpustats",
    "guest-fsfreeze-status",
];

/// Every member of a reply: its path (`a.b`, `[]` for array elements)
/// and JSON kind.
fn members(v: &Value) -> std::collections::BTreeSet<(String, &'static str)> {
    fn walk(v: &Value, path: String, out: &mut std::collections::BTreeSet<(String, &'static str)>) {
        let kind = match v {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        out.insert((path.clone(), kind));
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(x, p, out);
                }
            }
            Value::Array(a) => {
                for x in a {
                    walk(x, format!("{path}[]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(v, String::new(), &mut out);
    out
}

/// The same queries answered by the agent (libvirt's channel) and by
/// Debian's qemu-ga on a second channel of the same guest: the same
/// members with the same kinds, and the same facts.
pub(crate) fn same_guest_check(
    t: &mut Tally,
    ctl: &Ctl,
    domain: &str,
    peer: Option<std::path::PathBuf>,
) {
    t.check("libvirt-debian-qemu-ga-same-guest", || {
        let peer = peer.ok_or("no host socket for the qemu-ga peer channel")?;
        ctl.sh(&format!(
            "mkdir -p /run/kvmm-qga-peer && systemd-run --unit=kvmm-qga-peer --collect /usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/{QGA_PEER_PORT} -t /run/kvmm-qga-peer"
        ))?;
        let result = (|| -> Result<()> {
            let mut theirs = connect_peer(&peer)?;
            let version = theirs.call("guest-info", json!({}))?["version"].clone();
            ensure(version != AGENT_VERSION, || format!("the peer is not qemu-ga: {version}"))?;
            let mut alike = 0;
            for name in SAME_GUEST {
                let b = theirs.call(name, json!({}))?;
                let a = agent_command(domain, &json!({"execute": name}))?;
                let (ma, mb) = (members(&a), members(&b));
                let empty = |v: &Value| v.as_array().is_some_and(|x| x.is_empty());
                if !empty(&a) && !empty(&b) {
                    let only_ours: Vec<_> = ma.difference(&mb).collect();
                    let only_theirs: Vec<_> = mb.difference(&ma).collect();
                    ensure(only_ours.is_empty() && only_theirs.is_empty(), || {
                        format!("{name}: only ours {only_ours:?}, only qemu-ga's {only_theirs:?}\nours {a}\nqemu-ga {b}")
                    })?;
                }
                same_facts(name, &a, &b)?;
                alike += 1;
            }
            println!("  {alike} queries alike with qemu-ga {version} in the same guest");
            Ok(())
        })();
        let _ = ctl.sh("systemctl stop kvmm-qga-peer.service || true");
        result
    });
}

/// Connects to the peer's channel once qemu-ga answers there.
fn connect_peer(path: &std::path::Path) -> Result<crate::bench::qga::Qga> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match crate::bench::qga::Qga::connect(path) {
            Ok(q) => return Ok(q),
            Err(e) if Instant::now() >= deadline => bail!("qemu-ga on {QGA_PEER_PORT}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The facts both must agree on, per command.
fn same_facts(name: &str, a: &Value, b: &Value) -> Result<()> {
    let set = |v: &Value, key: &str| -> std::collections::BTreeSet<String> {
        v.as_array()
            .map(|x| x.iter().map(|e| e[key].to_string()).collect())
            .unwrap_or_default()
    };
    let sorted = |v: &Value, key: &str| {
        let mut x = v.as_array().cloned().unwrap_or_default();
        x.sort_by_key(|e| e[key].to_string());
        x
    };
    let same = |what: &str, x: &dyn std::fmt::Debug, y: &dyn std::fmt::Debug| {
        let (x, y) = (format!("{x:?}"), format!("{y:?}"));
        ensure(x == y, || format!("{name} {what}: ours {x}, qemu-ga's {y}"))
    };
    match name {
        "guest-get-host-name"
        | "guest-get-osinfo"
        | "guest-get-memory-block-info"
        | "guest-fsfreeze-status" => same("", a, b),
        "guest-get-timezone" => same("offset", &a["offset"], &b["offset"]),
        "guest-get-users" => same("users", &set(a, "user"), &set(b, "user")),
        "guest-get-vcpus" => same("vcpus", &sorted(a, "logical-id"), &sorted(b, "logical-id")),
        "guest-network-get-interfaces" => {
            let key = |v: &Value| -> Vec<(String, String, std::collections::BTreeSet<String>)> {
                sorted(v, "name")
                    .iter()
                    .map(|i| {
                        (
                            i["name"].to_string(),
                            i["hardware-address"].to_string(),
                            set(&i["ip-addresses"], "ip-address"),
                        )
                    })
                    .collect()
            };
            same("interfaces", &key(a), &key(b))
        }
        "guest-get-fsinfo" => {
            let key = |v: &Value| -> Vec<(String, String, String, String, Value)> {
                sorted(v, "mountpoint")
                    .iter()
                    .map(|f| {
                        (
                            f["mountpoint"].to_string(),
                            f["name"].to_string(),
                            f["type"].to_string(),
                            f["total-bytes"].to_string(),
                            f["disk"].clone(),
                        )
                    })
                    .collect()
            };
            same("filesystems", &key(a), &key(b))
        }
        "guest-get-disks" => same("disks", &sorted(a, "name"), &sorted(b, "name")),
        "guest-get-diskstats" => {
            // Ours lists devices that did I/O; each with qemu-ga's device
            // numbers, and counters taken after its own not smaller.
            for d in a.as_array().into_iter().flatten() {
                let t = b
                    .as_array()
                    .and_then(|x| x.iter().find(|t| t["name"] == d["name"]))
                    .ok_or_else(|| format!("{name}: qemu-ga has no {}", d["name"]))?;
                same(
                    "device numbers",
                    &(&d["major"], &d["minor"]),
                    &(&t["major"], &t["minor"]),
                )?;
                for (k, v) in d["stats"].as_object().into_iter().flatten() {
                    if k != "ios-pgr" {
                        ensure(v.as_u64() >= t["stats"][k].as_u64(), || {
                            format!(
                                "{name} {} {k}: ours {v} < qemu-ga's {}",
                                d["name"], t["stats"][k]
                            )
                        })?;
                    }
                }
            }
            Ok(())
        }
        "guest-get-cpustats" => {
            same("cpus", &set(a, "cpu"), &set(b, "cpu"))?;
            for c in a.as_array().into_iter().flatten() {
                let t = b
                    .as_array()
                    .and_then(|x| x.iter().find(|t| t["cpu"] == c["cpu"]))
                    .ok_or_else(|| format!("{name}: no cpu {}", c["cpu"]))?;
                for k in ["user", "system", "idle"] {
                    let (x, y) = (
                        c[k].as_u64().unwrap_or(0),
                        t[k].as_u64().unwrap_or(u64::MAX),
                    );
                    ensure(x >= y && x - y < 60_000, || {
                        format!("{name} cpu {} {k}: ours {x}, qemu-ga's {y} (ms)", c["cpu"])
                    })?;
                }
            }
            Ok(())
        }
        _ => bail!("{name} has no facts"),
    }
}
