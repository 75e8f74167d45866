//! Real-VM checks of the guest operations (issue 13) in the Debian guest:
//! a real ext4 data disk (serial `kvmm-data`, mounted at `/srv/data`),
//! systemd, 2 vCPUs. Every check drives `kvmmanager-ctl --json` and reads
//! the guest's own view (`/etc/shadow`, `stat`, sysfs) through `exec`.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use crate::debian::{DATA_MOUNT, DATA_SERIAL};
use crate::suite::{ensure, Ctl, CtlRun, Tally};
use crate::util::{bail, Result};

/// `freeze_timeout_seconds` of the Debian test config.
pub(crate) const FREEZE_TIMEOUT_SECONDS: u64 = 30;

/// A crypt(3) SHA-512 hash (`openssl passwd -6 -salt kvmmsalt
/// kvmm-test-password`).
const PASSWORD_HASH: &str = "$6$kvmmsalt$3pviY2d2GKf3zRK6JT1TsDw.pf1.Q0pUwXnzcZldoQatvZC7.8T82hgf9Y9HpqjzHBq8ccz52RJLsCNNWQrjO0";

/// Where the freeze hook records its calls (on `/run`, never on a frozen
/// filesystem).
const HOOK_LOG: &str = "/run/kvmm-hook.log";

/// A syntactically valid ed25519 public key line with this comment.
pub(crate) fn ed25519_line(seed: u8, comment: &str) -> String {
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend((0..32u8).map(|i| i.wrapping_mul(7).wrapping_add(seed)));
    format!(
        "ssh-ed25519 {} {comment}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

/// The guest's clock (ns since the epoch), through `get_time`.
fn guest_time_ns(ctl: &Ctl) -> Result<u64> {
    let v = ctl.json(&["time"])?;
    v["time_ns"]
        .as_u64()
        .ok_or_else(|| format!("no time_ns in {v}").into())
}

fn freeze_status(ctl: &Ctl) -> Result<Value> {
    ctl.json(&["fsfreeze", "status"])
}

/// Thaws whatever is frozen (a failed check must not leave the disk frozen).
fn thaw_anyway(ctl: &Ctl) {
    let _ = ctl.run(true, &["fsfreeze", "thaw"], Duration::from_secs(60));
}

/// Fails unless `r` failed with exit 1 and its message holds every `want`.
fn refused(r: &CtlRun, wants: &[&str]) -> Result<()> {
    ensure(r.code == 1, || {
        format!("exit {} (want 1): {}", r.code, r.all_output())
    })?;
    let out = r.all_output();
    for w in wants {
        ensure(out.contains(w), || format!("no {w:?} in: {out}"))?;
    }
    Ok(())
}

/// While `/srv/data` is frozen, a write to it that started before the thaw
/// completes only after it; hooks run with `freeze` and `thaw`; ping,
/// status and a query answer while frozen, and `exec` is refused at once.
fn freeze_blocks_a_write(ctl: &Ctl) -> Result<()> {
    ctl.sh(&format!(
            "d=/etc/kvmmanager-agent/fsfreeze-hook.d && mkdir -p $d && rm -f {HOOK_LOG} \
             && printf '#!/bin/sh\\necho \"$1\" >> {HOOK_LOG}\\n' > $d/10-record && chmod 755 $d/10-record \
             && rm -f {DATA_MOUNT}/w /tmp/kvmm-w-start /tmp/kvmm-w-done \
             && systemd-run --unit=kvmm-writer --collect --on-active=2 sh -c \
                'date +%s%N > /tmp/kvmm-w-start; echo written > {DATA_MOUNT}/w; date +%s%N > /tmp/kvmm-w-done'"
        ),
    )?;
    let v = ctl.json(&["fsfreeze", "freeze", DATA_MOUNT]);
    let v = match v {
        Ok(v) => v,
        Err(e) => {
            thaw_anyway(ctl);
            return Err(e);
        }
    };
    let outcome = (|| -> Result<u64> {
        ensure(v["frozen"] == serde_json::json!([DATA_MOUNT]), || {
            format!("frozen: {v}")
        })?;
        ensure(
            v["hooks"].as_array().is_some_and(|h| {
                h.iter()
                    .any(|x| x.as_str().is_some_and(|s| s.contains("10-record")))
            }),
            || format!("the freeze did not report the hook: {v}"),
        )?;
        let st = freeze_status(ctl)?;
        ensure(st["status"] == "frozen", || format!("status: {st}"))?;
        // Anything that could write is refused at once while frozen.
        let r = ctl.run(true, &["exec", "--", "true"], Duration::from_secs(30))?;
        ensure(r.all_output().contains("frozen"), || {
            format!("exec while frozen: exit {}: {}", r.code, r.all_output())
        })?;
        ctl.json(&["ping"])?;
        // The writer's timer fires 2 s after it was set. Reading is allowed
        // while frozen: wait until the writer has started (its start file
        // is on the root filesystem, which is not frozen), then a moment
        // more for it to block on the frozen one.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = ctl.run(true, &["cat", "/tmp/kvmm-w-start"], Duration::from_secs(30))?;
            if r.code == 0 {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the writer did not start within 20 s of the freeze: {}",
                    r.all_output()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        std::thread::sleep(Duration::from_secs(2));
        guest_time_ns(ctl)
    })();
    let thaw = ctl.json(&["fsfreeze", "thaw"]);
    let before_thaw = outcome?;
    let thaw = thaw?;
    ensure(thaw["thawed"] == serde_json::json!([DATA_MOUNT]), || {
        format!("thawed: {thaw}")
    })?;
    // The write completes right after the thaw.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (start, done) = loop {
        let out = ctl.sh("cat /tmp/kvmm-w-start /tmp/kvmm-w-done 2>/dev/null || true")?;
        let nums: Vec<u64> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if let [s, d] = nums[..] {
            break (s, d);
        }
        if Instant::now() >= deadline {
            bail!("the writer did not finish within 30 s of the thaw: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    ensure(start < before_thaw, || {
        format!("the writer started at {start}, after the thaw began ({before_thaw}): nothing was proven")
    })?;
    ensure(done > before_thaw, || {
        format!("the write completed at {done}, before the thaw ({before_thaw}): the freeze did not hold it")
    })?;
    let content = ctl.sh(&format!("cat {DATA_MOUNT}/w"))?;
    ensure(content == "written\n", || {
        format!("{DATA_MOUNT}/w: {content:?}")
    })?;
    let hooks = ctl.sh(&format!("cat {HOOK_LOG}"))?;
    ensure(hooks == "freeze\nthaw\n", || {
        format!("hook calls: {hooks:?}")
    })?;
    println!(
        "  a write started {:.1} s before the thaw completed {:.2} s after it",
        (before_thaw - start) as f64 / 1e9,
        (done - before_thaw) as f64 / 1e9
    );
    ctl.sh(
        // The hook folder too: the package does not ship it, and `apt purge`
        // (checked later) leaves /etc/kvmmanager-agent/ if it is not empty.
        "rm -f /etc/kvmmanager-agent/fsfreeze-hook.d/10-record /tmp/kvmm-w-start /tmp/kvmm-w-done \
         && rmdir /etc/kvmmanager-agent/fsfreeze-hook.d",
    )?;
    Ok(())
}

/// A freeze left alone thaws by itself at `freeze_timeout_seconds`.
fn freeze_thaws_itself(ctl: &Ctl) -> Result<()> {
    let v = ctl.json(&["fsfreeze", "freeze", DATA_MOUNT])?;
    ensure(v["timeout_seconds"] == FREEZE_TIMEOUT_SECONDS, || {
        thaw_anyway(ctl);
        format!("timeout_seconds: {v}")
    })?;
    std::thread::sleep(Duration::from_secs(FREEZE_TIMEOUT_SECONDS + 3));
    let st = freeze_status(ctl)?;
    if st["status"] != "thawed" {
        thaw_anyway(ctl);
        bail!(
            "still frozen {} s after a freeze with a {FREEZE_TIMEOUT_SECONDS} s limit: {st}",
            FREEZE_TIMEOUT_SECONDS + 3
        );
    }
    ensure(st["last_thaw"] == "timeout", || format!("last_thaw: {st}"))?;
    // And the filesystem takes writes again.
    ctl.sh(&format!(
        "echo again > {DATA_MOUNT}/w2 && rm {DATA_MOUNT}/w2"
    ))?;
    Ok(())
}

/// The guest operations' checks, prefixed with `prefix`.
pub(crate) fn guestops_checks(t: &mut Tally, ctl: &Ctl, prefix: &str) {
    let n = |s: &str| format!("{prefix}{s}");
    t.check(&n("fsinfo-maps-the-data-disk"), || {
        let v = ctl.json(&["fsinfo"])?;
        let fs = v["filesystems"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["mount_point"] == DATA_MOUNT))
            .ok_or_else(|| format!("no {DATA_MOUNT} in {v}"))?;
        let disk = &fs["disks"][0];
        ensure(
            disk["serial"] == DATA_SERIAL && disk["bus_type"] == "virtio",
            || format!("{DATA_MOUNT} maps to {fs}"),
        )?;
        ensure(disk["pci_address"].is_string(), || {
            format!("no PCI address: {fs}")
        })
    });
    t.check(&n("fsfreeze-holds-a-write-until-thaw"), || {
        freeze_blocks_a_write(ctl)
    });
    t.check(&n("fsfreeze-thaws-by-itself"), || freeze_thaws_itself(ctl));
    t.check(&n("fsfreeze-refusals"), || {
        let r = ctl.run(
            true,
            &["fsfreeze", "freeze", "/no/such/mount"],
            Duration::from_secs(60),
        )?;
        refused(&r, &["/no/such/mount", "not a mount point"])?;
        ensure(freeze_status(ctl)?["status"] == "thawed", || {
            "a refused freeze left something frozen".to_owned()
        })
    });
    t.check(&n("fstrim-reports-bytes"), || {
        let v = ctl.json(&["fstrim", DATA_MOUNT])?;
        let f = &v["filesystems"][0];
        ensure(
            f["mount_point"] == DATA_MOUNT && f["trimmed_bytes"].as_u64().unwrap_or(0) > 0,
            || format!("fstrim: {v}"),
        )
    });
    t.check(&n("time-set-and-sync"), || {
        let before = guest_time_ns(ctl)?;
        let target = before - 3_600_000_000_000;
        let v = ctl.json(&["time", "--set-ns", &target.to_string()])?;
        ensure(v["source"] == "request", || format!("set_time: {v}"))?;
        let now = guest_time_ns(ctl)?;
        ensure(now < before - 3_500_000_000_000, || {
            format!("the guest clock did not go back an hour: {before} -> {now}")
        })?;
        let v = ctl.json(&["time", "--sync"])?;
        ensure(v["rtc_written"] == true, || format!("time --sync: {v}"))?;
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_nanos() as u64;
        let guest = guest_time_ns(ctl)?;
        ensure(guest.abs_diff(host) < 5_000_000_000, || {
            format!(
                "after --sync the guest is {} s off the host",
                guest.abs_diff(host) as f64 / 1e9
            )
        })
    });
    t.check(&n("ssh-keys-added-beside-a-hand-written-line"), || {
        let hand = ed25519_line(1, "hand-written@kvmm");
        let ours = ed25519_line(2, "added-by-test@kvmm");
        ctl.sh(&format!(
                "id alice >/dev/null 2>&1 || useradd -m -s /bin/sh alice; \
                 install -d -o alice -g alice -m 700 ~alice/.ssh && \
                 printf '%s\\n' '{hand}' > ~alice/.ssh/authorized_keys && \
                 chown alice:alice ~alice/.ssh/authorized_keys && chmod 600 ~alice/.ssh/authorized_keys"
            ),
        )?;
        let v = ctl.json(&["ssh-keys", "add", "alice", &ours])?;
        let keys = v["keys"].as_array().cloned().unwrap_or_default();
        let has = |line: &str, managed: bool| {
            keys.iter()
                .any(|k| k["line"] == line && k["managed"] == managed)
        };
        ensure(has(&ours, true) && has(&hand, false), || {
            format!("keys after add: {v}")
        })?;
        let file = ctl.sh("cat ~alice/.ssh/authorized_keys")?;
        ensure(file.lines().any(|l| l == hand) && file.lines().any(|l| l == ours), || {
            format!("authorized_keys: {file}")
        })?;
        let modes = ctl.sh("stat -c '%U %a' ~alice/.ssh ~alice/.ssh/authorized_keys",
        )?;
        ensure(modes == "alice 700\nalice 600\n", || {
            format!("owner and modes: {modes:?}")
        })?;
        // Removing the agent's key leaves the hand-written one.
        let v = ctl.json(&["ssh-keys", "remove", "alice", &ours])?;
        let file = ctl.sh("cat ~alice/.ssh/authorized_keys")?;
        ensure(
            file.lines().any(|l| l == hand) && !file.contains(&ours),
            || format!("after remove: {file}\n{v}"),
        )
    });
    t.check(&n("ssh-keys-refusals"), || {
        let r = ctl.run(
            true,
            &["ssh-keys", "add", "alice", "not a key"],
            Duration::from_secs(60),
        )?;
        refused(&r, &["is refused"])?;
        let r = ctl.run(
            true,
            &["ssh-keys", "get", "no-such-user-kvmm"],
            Duration::from_secs(60),
        )?;
        refused(&r, &["no user \"no-such-user-kvmm\""])
    });
    t.check(&n("password-set-shows-in-shadow"), || {
        let mut cmd = ctl.command(true, &["passwd", "alice", "--crypted"]);
        let out = crate::util::output_with_stdin(
            &mut cmd,
            format!("{PASSWORD_HASH}\n").as_bytes(),
            Duration::from_secs(60),
        )?;
        ensure(out.status.success(), || {
            format!(
                "passwd: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let line = ctl.sh("grep '^alice:' /etc/shadow")?;
        ensure(line.split(':').nth(1) == Some(PASSWORD_HASH), || {
            format!("/etc/shadow: {line}")
        })?;
        // The password never reaches the log.
        let journal = ctl.sh("journalctl -u kvmmanager-agent.service --no-pager -o cat")?;
        ensure(!journal.contains("kvmmsalt"), || {
            "the password hash is in the agent's journal".to_owned()
        })
    });
    t.check(&n("vcpu-offline-and-online"), || {
        let state = || -> Result<Option<bool>> {
            let v = ctl.json(&["vcpus"])?;
            Ok(v["cpus"]
                .as_array()
                .and_then(|a| a.iter().find(|c| c["id"] == 1))
                .and_then(|c| c["online"].as_bool()))
        };
        ensure(state()? == Some(true), || {
            "cpu1 is not online to start with".to_owned()
        })?;
        ctl.json(&["vcpus", "--offline", "1"])?;
        let sysfs = ctl.sh("cat /sys/devices/system/cpu/cpu1/online")?;
        ensure(state()? == Some(false) && sysfs == "0\n", || {
            format!("after --offline 1: sysfs {sysfs:?}")
        })?;
        ctl.json(&["vcpus", "--online", "1"])?;
        let sysfs = ctl.sh("cat /sys/devices/system/cpu/cpu1/online")?;
        ensure(state()? == Some(true) && sysfs == "1\n", || {
            format!("after --online 1: sysfs {sysfs:?}")
        })?;
        // The boot CPU stays.
        let r = ctl.run(true, &["vcpus", "--offline", "0"], Duration::from_secs(60))?;
        refused(&r, &["cpu 0 cannot go offline"])
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = ed25519_line(1, "a@b");
        let b = ed25519_line(2, "a@b");
        assert_ne!(a, b);
        let blob = a.split(' ').nth(1).unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .unwrap();
        assert_eq!(bytes.len(), 4 + 11 + 4 + 32);
        assert_eq!(&bytes[4..15], b"ssh-ed25519");
    }
}
