//! Real-VM checks of fleet observability (issue 16), on the initramfs
//! guest: metrics, a process the test started found by `ps` and ended by
//! `kill`, a log line written in the guest found by `logs`, the audit line
//! each mutating request leaves (without its secret), `list` and `top`
//! (captured through a terminal, `script`), and, under libvirt with two
//! running domains, a real Prometheus scraping `kvmmanager-ctl exporter`,
//! its series read back through Prometheus's HTTP API, and `list` showing
//! a running domain up and a stopped one down.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::suite::{ensure, exec_result, Ctl, Tally};
use crate::util::{bail, kill_pid, output_with_timeout, wait_timeout, Result};

/// Where the test guest's agent writes its audit trail (`guest.rs`).
pub(crate) const GUEST_AUDIT_FILE: &str = "/var/log/kvmmanager-audit.log";

/// A secret sent through every mutating request; it must appear nowhere.
const SECRET: &str = "fleet-S3CRET-7d1e";

/// The checks against one guest through `--socket` (or `--domain`).
pub(crate) fn fleet_checks(t: &mut Tally, ctl: &Ctl, prefix: &str) -> Result<()> {
    let n = |s: &str| format!("{prefix}{s}");
    t.check(&n("fleet-metrics"), || {
        let m = ctl.json(&["metrics"])?;
        ensure(m["memory"]["total_bytes"].as_u64().unwrap_or(0) > 0, || {
            format!("memory: {m}")
        })?;
        ensure(
            m["memory"]["available_bytes"].as_u64() <= m["memory"]["total_bytes"].as_u64(),
            || format!("available > total: {m}"),
        )?;
        ensure(m["process_count"].as_u64().unwrap_or(0) > 2, || {
            format!("process_count: {m}")
        })?;
        ensure(m["cpus"].as_array().is_some_and(|c| !c.is_empty()), || {
            format!("cpus: {m}")
        })?;
        ensure(
            m["networks"]
                .as_array()
                .is_some_and(|n| n.iter().any(|i| i["name"] == "lo")),
            || format!("no lo in networks: {m}"),
        )?;
        ensure(m["uptime_seconds"].as_u64().unwrap_or(0) > 0, || {
            format!("uptime: {m}")
        })
    });
    t.check(&n("fleet-ps-finds-and-kill-ends-a-process"), || {
        // A process the test starts in the guest. It must outlive the
        // `exec` that starts it (a command's cgroup is killed with its
        // request, and the channel serves one host connection at a time,
        // so no request can run beside `ps`): it leaves the command's
        // session and cgroup, as a root command may (SECURITY.md), and
        // becomes `sleep 4242`.
        ctl.sh(
            "setsid sh -c 'echo $$ > /sys/fs/cgroup/cgroup.procs 2>/dev/null; exec sleep 4242' \
             </dev/null >/dev/null 2>&1 & sleep 1",
        )?;
        ps_and_kill(ctl)
    });
    t.check(&n("fleet-logs-finds-a-line-written-in-the-guest"), || {
        let marker = format!("fleet-log-marker-{}", std::process::id());
        ctl.sh(&format!(
            "echo \"$(date -u +%Y-%m-%dT%H:%M:%SZ) one {marker}\" >> /var/log/fleet-test.log; \
             echo 'unrelated line' >> /var/log/fleet-test.log"
        ))?;
        let v = ctl.json(&["logs", "/var/log/fleet-test.log", "--grep", &marker])?;
        let lines = v["lines"].as_array().cloned().unwrap_or_default();
        ensure(
            lines.len() == 1 && lines[0].as_str().is_some_and(|l| l.ends_with(&marker)),
            || format!("logs --grep {marker}: {v}"),
        )?;
        let v = ctl.json(&["logs", "/var/log/fleet-test.log", "-n", "1"])?;
        ensure(v["lines"] == serde_json::json!(["unrelated line"]), || {
            format!("logs -n 1: {v}")
        })?;
        let v = ctl.json(&[
            "logs",
            "/var/log/fleet-test.log",
            "--since",
            "1h",
            "--grep",
            &marker,
        ])?;
        ensure(v["lines"].as_array().is_some_and(|l| l.len() == 1), || {
            format!("logs --since 1h: {v}")
        })?;
        let r = ctl.run(true, &["logs", "/etc/shadow"], Duration::from_secs(60))?;
        ensure(
            r.code == 1 && r.all_output().contains("policy_denied"),
            || format!("logs /etc/shadow: exit {} {}", r.code, r.all_output()),
        )
    });
    t.check(&n("fleet-audit-lines-without-secrets"), || audit_check(ctl));
    t.check(&n("fleet-list-one-agent"), || {
        let v = ctl.json(&["list"])?;
        let row = &v[0];
        ensure(
            v.as_array().map(Vec::len) == Some(1) && row["state"] == "up",
            || format!("list: {v}"),
        )?;
        ensure(
            row["version"].is_string() && row["rtt_ms"].is_number(),
            || format!("list: {v}"),
        )?;
        ensure(row["uptime_seconds"].as_u64().unwrap_or(0) > 0, || {
            format!("list: {v}")
        })
    });
    t.check(&n("fleet-top-renders-in-a-terminal"), || {
        top_in_terminal(ctl)
    });
    t.check(&n("fleet-mcp-python-client"), || mcp_check(ctl));
    Ok(())
}

/// The official Python MCP SDK, pinned.
const MCP_SDK: &str = "mcp==2.3.0";

/// A virtualenv under `target/` with the MCP SDK (`python3 -m venv`, then
/// `pip install`); made once, reused while it has that version.
pub(crate) fn mcp_client_python() -> Result<std::path::PathBuf> {
    let dir = crate::util::target_dir().join("mcp-venv");
    let python = dir.join("bin/python");
    let has_sdk = |py: &Path| {
        crate::util::succeeds(Command::new(py).args([
            "-c",
            "import importlib.metadata as m, sys; sys.exit(m.version('mcp') != '2.3.0')",
        ]))
    };
    if python.exists() && has_sdk(&python) {
        return Ok(python);
    }
    crate::util::run(Command::new("python3").arg("-m").arg("venv").arg(&dir))?;
    crate::util::run(Command::new(dir.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        MCP_SDK,
    ]))?;
    if !has_sdk(&python) {
        bail!(
            "{} cannot import {MCP_SDK} after installing it",
            python.display()
        );
    }
    Ok(python)
}

/// The Python MCP client lists the tools and calls each against the guest:
/// without flags the mutating ones are neither offered nor served; with
/// them they work; a policy refusal is a tool error; every call audited.
fn mcp_check(ctl: &Ctl) -> Result<()> {
    let crate::suite::Target::Socket(socket) = &ctl.target else {
        bail!("the MCP check runs with --socket");
    };
    let python = mcp_client_python()?;
    let script = crate::util::root().join("xtask/scripts/mcp_client.py");
    let dir = crate::suite::scratch("fleet-mcp")?;
    let run = |mode: &str| -> Result<(Value, String)> {
        let audit = dir.join(format!("audit-{mode}.log"));
        let out = output_with_timeout(
            Command::new(&python)
                .arg(&script)
                .arg(&ctl.bin)
                .arg(socket)
                .arg(mode)
                .arg(&audit),
            Duration::from_secs(180),
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure(out.status.success(), || {
            format!(
                "the MCP client ({mode}) failed: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let v: Value = serde_json::from_str(stdout.trim())
            .map_err(|e| format!("the MCP client printed no JSON ({e}): {stdout}"))?;
        Ok((v, std::fs::read_to_string(&audit).unwrap_or_default()))
    };
    let read_only = [
        "list_vms",
        "guest_info",
        "metrics",
        "processes",
        "read_file",
        "read_log",
    ];
    let (plain, audit) = run("plain")?;
    ensure(plain["server"] == "kvmmanager-ctl", || {
        format!("server: {plain}")
    })?;
    ensure(plain["tools"] == serde_json::json!(read_only), || {
        format!("tools without flags: {}", plain["tools"])
    })?;
    for (tool, schema) in plain["schemas"].as_object().cloned().unwrap_or_default() {
        ensure(schema["type"] == "object", || {
            format!("{tool} schema: {schema}")
        })?;
    }
    let r = &plain["results"];
    for tool in read_only {
        ensure(r[tool]["isError"] == false, || {
            format!("{tool}: {}", r[tool])
        })?;
    }
    ensure(
        r["guest_info"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("kvmm-guest")),
        || format!("guest_info: {}", r["guest_info"]),
    )?;
    let denied = &r["read_file_denied"];
    ensure(
        denied["isError"] == true
            && denied["text"]
                .as_str()
                .is_some_and(|t| t.contains("policy_denied")),
        || format!("read_file /etc/shadow: {denied}"),
    )?;
    for tool in ["exec", "write_file"] {
        ensure(
            r[tool]["isError"] == true
                && r[tool]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("disabled")),
            || format!("{tool} without its flag: {}", r[tool]),
        )?;
    }
    ensure(audit.lines().count() == 9, || {
        format!("audit lines (want 9, one per call):\n{audit}")
    })?;
    ensure(
        audit.contains("\"tool\":\"exec\"") && audit.contains("\"outcome\":\"error\""),
        || format!("audit:\n{audit}"),
    )?;
    let (allow, audit) = run("allow")?;
    let r = &allow["results"];
    ensure(allow["tools"].as_array().map(Vec::len) == Some(8), || {
        format!("tools with both flags: {}", allow["tools"])
    })?;
    ensure(
        r["exec"]["isError"] == false
            && r["exec"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("mcp-exec-ok")),
        || format!("exec with --allow-exec: {}", r["exec"]),
    )?;
    ensure(r["write_file"]["isError"] == false, || {
        format!("write_file with --allow-write: {}", r["write_file"])
    })?;
    let back = ctl
        .run(
            false,
            &["cat", "/tmp/kvmmanager/mcp.txt"],
            Duration::from_secs(60),
        )?
        .ok()?;
    ensure(back.stdout == "mcp-write-ok", || {
        format!("the file MCP wrote: {:?}", back.stdout)
    })?;
    ensure(
        audit.lines().count() == 9 && !audit.contains("mcp-write-ok"),
        || format!("audit with flags (9 lines, no file content):\n{audit}"),
    )
}

/// `ps` finds `sleep 4242`, `kill` with its start time ends it.
fn ps_and_kill(ctl: &Ctl) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let found = loop {
        let v = ctl.json(&["ps", "--filter", "4242"])?;
        let hit = v["processes"].as_array().and_then(|ps| {
            ps.iter()
                // argv[0] may be the resolved path (`/bin/sleep`).
                .find(|p| {
                    p["cmdline"].as_array().is_some_and(|a| {
                        a.len() == 2
                            && a[1] == "4242"
                            && a[0].as_str().is_some_and(|c| c.ends_with("sleep"))
                    })
                })
                .cloned()
        });
        match hit {
            Some(p) => break p,
            None if Instant::now() >= deadline => bail!("ps never listed sleep 4242: {v}"),
            None => std::thread::sleep(Duration::from_millis(300)),
        }
    };
    let pid = found["pid"].as_u64().ok_or("no pid")?.to_string();
    let start = found["start_time"]
        .as_u64()
        .ok_or("no start_time")?
        .to_string();
    ensure(found["state"] == "sleeping", || format!("state: {found}"))?;
    // A wrong start time: not signalled.
    let wrong = (found["start_time"].as_u64().unwrap_or(0) + 1).to_string();
    let r = ctl.run(
        true,
        &["kill", &pid, "--signal", "KILL", "--start-time", &wrong],
        Duration::from_secs(60),
    )?;
    ensure(r.code == 1 && r.all_output().contains("not_found"), || {
        format!(
            "kill with a wrong start time: exit {} {}",
            r.code,
            r.all_output()
        )
    })?;
    let v = ctl.json(&["kill", &pid, "--signal", "KILL", "--start-time", &start])?;
    ensure(v["signal"] == "KILL", || format!("kill: {v}"))?;
    // Gone (or a zombie until init reaps it).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = ctl.json(&["ps", "--filter", "4242"])?;
        let alive = v["processes"].as_array().is_some_and(|ps| {
            ps.iter()
                .any(|p| p["pid"] == found["pid"] && p["state"] != "zombie")
        });
        if !alive {
            break;
        }
        if Instant::now() >= deadline {
            bail!("sleep 4242 (pid {pid}) still runs 10 s after kill: {v}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // init and the agent are never signalled.
    for target in ["1".to_owned(), agent_pid(ctl)?] {
        let r = ctl.run(true, &["kill", &target], Duration::from_secs(60))?;
        ensure(
            r.code == 1 && r.all_output().contains("policy_denied"),
            || format!("kill {target}: exit {} {}", r.code, r.all_output()),
        )?;
    }
    Ok(())
}

fn agent_pid(ctl: &Ctl) -> Result<String> {
    let v = ctl.json(&["exec", "--", "pidof", "kvmmanager-agent"])?;
    let pid = exec_result(&v)["stdout"]
        .as_str()
        .unwrap_or("")
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned();
    ensure(!pid.is_empty(), || format!("pidof: {v}"))?;
    Ok(pid)
}

/// Mutating requests carrying a secret each leave their audit line, and
/// the secret is in neither the audit file nor the agent's log.
fn audit_check(ctl: &Ctl) -> Result<()> {
    let path = format!("/tmp/kvmmanager/fleet-audit-{}", std::process::id());
    let mut w = ctl
        .command(true, &["write", &path])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = w.stdin.take().ok_or("no stdin")?;
        stdin.write_all(SECRET.as_bytes())?;
    }
    let out = crate::util::wait_output(w, Duration::from_secs(60))?;
    ensure(out.status.success(), || {
        format!("write: {}", String::from_utf8_lossy(&out.stderr))
    })?;
    let env = format!("FLEET_TOKEN={SECRET}");
    ctl.json(&["exec", "--env", &env, "--", "true"])?;
    let mut p = ctl
        .command(true, &["passwd", "no-such-user-fleet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = p.stdin.take().ok_or("no stdin")?;
        stdin.write_all(format!("{SECRET}\n").as_bytes())?;
    }
    let out = crate::util::wait_output(p, Duration::from_secs(60))?;
    ensure(!out.status.success(), || {
        "passwd of a missing user succeeded".to_owned()
    })?;

    let file = ctl.json(&["logs", GUEST_AUDIT_FILE, "-n", "10000"])?;
    let log = ctl.json(&[
        "logs",
        "/var/log/kvmmanager-agent.log",
        "-n",
        "10000",
        "--grep",
        " audit ",
    ])?;
    for (what, v) in [("audit file", &file), ("agent log", &log)] {
        let text = v.to_string();
        ensure(!text.contains(SECRET), || {
            format!("the secret is in the {what}: {text}")
        })?;
        let lines: Vec<Value> = v["lines"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|l| {
                // A bare JSON line (the audit file), or after `audit ` (the
                // log line, whose span has braces of its own).
                let l = l.as_str()?;
                let json = match l.find(": audit {") {
                    Some(i) => &l[i + ": audit ".len()..],
                    None => l,
                };
                serde_json::from_str(json).ok()
            })
            .collect();
        let find = |method: &str, f: &dyn Fn(&Value) -> bool| {
            lines.iter().any(|l| l["method"] == method && f(l))
        };
        ensure(
            find("file_write", &|l| {
                l["target"]["path"] == path.as_str()
                    && l["outcome"] == "ok"
                    && l["bytes_in"].as_u64() == Some(SECRET.len() as u64)
            }),
            || format!("no file_write line for {path} in the {what}: {text}"),
        )?;
        ensure(
            find("exec_command", &|l| {
                l["target"]["env_names"] == serde_json::json!(["FLEET_TOKEN"])
            }),
            || format!("no exec_command line with env_names in the {what}: {text}"),
        )?;
        ensure(
            find("set_user_password", &|l| {
                l["target"]["username"] == "no-such-user-fleet" && l["outcome"] != "ok"
            }),
            || format!("no set_user_password line in the {what}: {text}"),
        )?;
        ensure(
            find("kill_process", &|l| {
                l["outcome"] == "ok" && l["target"]["signal"] == "KILL"
            }),
            || format!("no kill_process line in the {what}: {text}"),
        )?;
        ensure(
            lines
                .iter()
                .all(|l| l["method"] != "list_processes" && l["method"] != "read_log"),
            || format!("a query left an audit line in the {what}: {text}"),
        )?;
    }
    Ok(())
}

/// `top` through a pseudo-terminal (`script`): it clears the screen and
/// shows the VM up with a CPU percentage on its second refresh.
fn top_in_terminal(ctl: &Ctl) -> Result<()> {
    let cmd = ctl.command(false, &["top", "-n", "2", "-i", "1"]);
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(crate::util::quote)
        .collect::<Vec<_>>()
        .join(" ");
    let out = output_with_timeout(
        Command::new("script").args(["-q", "-e", "-c", &line, "/dev/null"]),
        Duration::from_secs(60),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure(out.status.success(), || {
        format!("top: {} {text}", out.status)
    })?;
    ensure(text.matches("\x1b[H\x1b[2J").count() == 2, || {
        format!("top did not refresh the screen twice: {text:?}")
    })?;
    let last = text.rsplit("\x1b[H\x1b[2J").next().unwrap_or("");
    ensure(last.contains("CPU") && last.contains("MEMORY"), || {
        format!("no header: {last:?}")
    })?;
    ensure(last.contains(" up ") && last.contains('%'), || {
        format!("the VM is not up with a CPU rate: {last:?}")
    })
}

/// A process this check started, stopped (by pid) when dropped.
struct Started {
    child: Child,
    what: &'static str,
}

impl Drop for Started {
    fn drop(&mut self) {
        kill_pid(self.child.id(), "TERM");
        if wait_timeout(&mut self.child, Duration::from_secs(10))
            .ok()
            .flatten()
            .is_none()
        {
            eprintln!("fleet: {} did not stop on TERM; killing it", self.what);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A free loopback port (bound and released: a race with other programs is
/// possible but harmless here, the start then fails and says so).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// GET `url` on loopback (curl).
fn http_get(url: &str) -> Result<String> {
    let out = output_with_timeout(
        Command::new("curl").args(["-sS", "--max-time", "10", url]),
        Duration::from_secs(15),
    )?;
    if !out.status.success() {
        bail!(
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Under libvirt, with `domains` running: a real Prometheus scrapes
/// `kvmmanager-ctl exporter` (every libvirt domain) and its HTTP API
/// answers each domain's `kvmm_up` 1 and its other series.
pub(crate) fn exporter_prometheus_check(
    t: &mut Tally,
    ctl_bin: &Path,
    domains: &[&str],
    scratch: &Path,
) {
    t.check("fleet-exporter-scraped-by-prometheus", || {
        if !crate::util::have_command("prometheus") {
            bail!("prometheus is not installed (cargo xtask deps installs Debian's prometheus)");
        }
        let ep = free_port()?;
        let exporter = Started {
            child: Command::new(ctl_bin)
                .args(["exporter", "--listen", &format!("127.0.0.1:{ep}"), "--vm-timeout", "2"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
            what: "kvmmanager-ctl exporter",
        };
        // The exporter answers by itself first (plain HTTP).
        let deadline = Instant::now() + Duration::from_secs(30);
        let direct = loop {
            match http_get(&format!("http://127.0.0.1:{ep}/metrics")) {
                Ok(b) => break b,
                Err(e) if Instant::now() >= deadline => bail!("the exporter does not answer: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        };
        for d in domains {
            ensure(direct.contains(&format!("kvmm_up{{domain=\"{d}\"}} 1")), || {
                format!("the exporter's own answer lacks {d} up:\n{direct}")
            })?;
        }
        let pp = free_port()?;
        let dir = scratch.join("prometheus");
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 3s\n  scrape_timeout: 3s\nscrape_configs:\n  \
                 - job_name: kvmm\n    static_configs:\n      - targets: ['127.0.0.1:{ep}']\n"
            ),
        )?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let _prometheus = Started {
            child: Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{pp}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
            what: "prometheus",
        };
        let query = |q: &str| -> Result<Vec<Value>> {
            let body = http_get(&format!(
                "http://127.0.0.1:{pp}/api/v1/query?query={}",
                q.replace('{', "%7B").replace('}', "%7D").replace('"', "%22").replace('=', "%3D")
            ))?;
            let v: Value = serde_json::from_str(&body)
                .map_err(|e| format!("Prometheus answered no JSON ({e}): {body}"))?;
            ensure(v["status"] == "success", || format!("query {q}: {v}"))?;
            Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
        };
        let value_of = |series: &[Value], d: &str| -> Option<String> {
            series
                .iter()
                .find(|s| s["metric"]["domain"] == d)
                .and_then(|s| s["value"][1].as_str().map(str::to_owned))
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let up = query("kvmm_up").unwrap_or_default();
            if domains.iter().all(|d| value_of(&up, d).as_deref() == Some("1")) {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "Prometheus never had kvmm_up 1 for {domains:?}: {up:?}\n--- prometheus log ---\n{}",
                    crate::util::tail(&dir.join("prometheus.log"), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        for q in [
            "kvmm_scrape_duration_seconds",
            "kvmm_memory_bytes{kind=\"total\"}",
            "kvmm_cpu_seconds_total{mode=\"idle\"}",
            "kvmm_processes",
        ] {
            let series = query(q)?;
            for d in domains {
                let v = value_of(&series, d)
                    .and_then(|s| s.parse::<f64>().ok())
                    .ok_or_else(|| format!("no {q} for {d} in Prometheus: {series:?}"))?;
                ensure(v > 0.0, || format!("{q} for {d} is {v}"))?;
            }
        }
        drop(exporter);
        Ok(())
    });
}

/// Under libvirt: `list` (every domain) shows `running` up; once
/// `stopped` is shut off (still defined), it shows it down.
pub(crate) fn list_libvirt_check(t: &mut Tally, ctl_bin: &Path, running: &str, stopped: &str) {
    t.check("fleet-list-libvirt-up-and-down", || {
        let list = || -> Result<Value> {
            let out = output_with_timeout(
                Command::new(ctl_bin).args(["--json", "list"]),
                Duration::from_secs(60),
            )?;
            ensure(out.status.success(), || {
                format!("list: {}", String::from_utf8_lossy(&out.stderr))
            })?;
            Ok(serde_json::from_slice(&out.stdout)?)
        };
        let state = |v: &Value, name: &str| -> Option<String> {
            v.as_array()?
                .iter()
                .find(|r| r["name"] == name)
                .and_then(|r| r["state"].as_str().map(str::to_owned))
        };
        let v = list()?;
        ensure(state(&v, running).as_deref() == Some("up"), || {
            format!("{running} not up: {v}")
        })?;
        crate::util::run(Command::new("virsh").args([
            "-q",
            "-c",
            crate::vm::LIBVIRT_URI,
            "destroy",
            stopped,
        ]))?;
        let v = list()?;
        ensure(state(&v, stopped).as_deref() == Some("down"), || {
            format!("{stopped} (shut off) not down: {v}")
        })?;
        ensure(state(&v, running).as_deref() == Some("up"), || {
            format!("{running} not up: {v}")
        })
    });
}

/// On the Debian guest (journald): `logs --unit` reads the agent's own
/// journal, newest lines, filtered; the audit lines of the requests the
/// suite made are in it.
pub(crate) fn journal_log_check(ctl: &Ctl) -> Result<()> {
    let v = ctl.json(&[
        "logs",
        "--unit",
        "kvmmanager-agent.service",
        "-n",
        "20",
        "--grep",
        ": audit {",
        "--since",
        "1h",
    ])?;
    ensure(v["source"] == "journal:kvmmanager-agent.service", || {
        format!("source: {v}")
    })?;
    let lines = v["lines"].as_array().cloned().unwrap_or_default();
    ensure(
        !lines.is_empty()
            && lines.len() <= 20
            && lines
                .iter()
                .all(|l| l.as_str().is_some_and(|l| l.contains(": audit {"))),
        || format!("the journal's audit lines: {v}"),
    )?;
    let v = ctl.json(&["logs", "--unit", "no-such-unit-kvmm.service"])?;
    ensure(v["lines"] == serde_json::json!([]), || {
        format!("a unit without a journal: {v}")
    })?;
    let r = ctl.run(true, &["logs", "--unit", "-x"], Duration::from_secs(60))?;
    ensure(r.code != 0, || {
        format!("logs --unit -x: {}", r.all_output())
    })
}
