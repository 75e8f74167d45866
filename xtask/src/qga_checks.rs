//! The qemu-ga dialect through libvirt's own agent commands (issue 14):
//! the Debian guest's domain has qemu-ga's port `org.qemu.guest_agent.0`,
//! the agent serves it (`qemu_ga_channel_name` in the test config), and
//! `virsh` talks to it exactly as it talks to qemu-ga.

use std::process::Command;
use std::time::Duration;

use crate::debian::{DATA_MOUNT, HOSTNAME};
use crate::suite::{ensure, Tally};
use crate::util::{output_with_timeout, Result};
use crate::vm::LIBVIRT_URI;

/// `virsh -c qemu:///system ARGS` with a time limit; its stdout (not
/// `-q`: that hides what domfsfreeze and domfsthaw report).
fn virsh(args: &[&str]) -> Result<String> {
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
pub(crate) fn virsh_agent_checks(t: &mut Tally, domain: &str) {
    let n = |s: &str| format!("libvirt-debian-virsh-{s}");
    t.check(&n("qemu-agent-command-ping"), || {
        let out = virsh(&["qemu-agent-command", domain, r#"{"execute":"guest-ping"}"#])?;
        ensure(out.trim() == r#"{"return":{}}"#, || {
            format!("guest-ping: {out}")
        })
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
        let out = virsh(&["guestinfo", domain, "--os", "--hostname", "--timezone"])?;
        // No `os.id`: the agent's os info has no id field (PROTOCOL.md, the
        // qemu-ga dialect's differences).
        for want in [
            "os.name",
            "Debian GNU/Linux",
            "hostname",
            HOSTNAME,
            "timezone",
        ] {
            ensure(out.contains(want), || {
                format!("guestinfo lacks {want:?}: {out}")
            })?;
        }
        Ok(())
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
