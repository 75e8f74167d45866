//! `kvmmanager-ctl mcp`: a Model Context Protocol server over stdio
//! (specification 2025-06-18; JSON-RPC 2.0, one message per line on
//! stdin and stdout, logs on stderr), written to the specification
//! directly: the Rust SDK (`rmcp`) needs a newer Rust than this
//! workspace's 1.80.
//!
//! Tools for the VMs on this host (every libvirt domain, or the one agent
//! `--socket` / `--domain` names): `list_vms`, `guest_info`, `metrics`,
//! `processes`, `read_file`, `read_log`; `exec` only with `--allow-exec`,
//! `write_file` only with `--allow-write`. A tool's arguments are the
//! agent method's typed params (agent-common) plus `vm`; they are checked
//! against those types before anything is sent, and the input schemas
//! list exactly those fields (`tools`, tested). An agent's refusal
//! (`policy_denied` and the rest) comes back as a tool result with
//! `isError: true` and the agent's message. Every tool call is audited:
//! one JSON line on stderr, and in `--audit-file` if given.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_common::methods::{
    ExecParams, FileReadParams, FileWriteParams, ProcessListParams, ReadLogParams,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::fleet::{probe_all, targets};
use super::{Cli, CliError, Command, EXIT_OK};
use crate::{libvirt, Client, ClientError, ClientOptions};

/// The protocol versions this server speaks, newest first.
pub const PROTOCOL_VERSIONS: &[&str] = &["2025-06-18", "2025-03-26", "2024-11-05"];

/// Most bytes of a request line read from the client.
const MAX_LINE: usize = 4 * 1024 * 1024;

/// Arguments of `mcp`.
#[derive(Debug, Clone, clap::Args)]
pub struct McpArgs {
    /// Offer the `exec` tool (runs commands in a guest, within its policy).
    #[arg(long)]
    pub allow_exec: bool,
    /// Offer the `write_file` tool (writes guest files, within its policy).
    #[arg(long)]
    pub allow_write: bool,
    /// Also append each tool call's audit line to this file.
    #[arg(long, value_name = "FILE")]
    pub audit_file: Option<PathBuf>,
}

/// One tool: its name, description, whether it changes a guest, and its
/// input schema's properties (beyond `vm`) as (name, JSON type, text).
struct Tool {
    name: &'static str,
    description: &'static str,
    mutating: bool,
    /// Takes `vm`.
    vm: bool,
    props: &'static [(&'static str, &'static str, &'static str)],
    required: &'static [&'static str],
}

/// Every tool, in the order `tools/list` gives them.
const TOOLS: &[Tool] = &[
    Tool {
        name: "list_vms",
        description: "List the VMs on this host with their guest agent's state (up, down, no channel, not answering), version, uptime and round-trip time.",
        mutating: false,
        vm: false,
        props: &[],
        required: &[],
    },
    Tool {
        name: "guest_info",
        description: "A VM's operating system, kernel, host name, CPUs, memory and uptime.",
        mutating: false,
        vm: true,
        props: &[],
        required: &[],
    },
    Tool {
        name: "metrics",
        description: "A VM's metrics: CPU time per CPU and in total, memory and swap, pressure stall information, load, disk and network counters, filesystem usage, uptime, process count.",
        mutating: false,
        vm: true,
        props: &[],
        required: &[],
    },
    Tool {
        name: "processes",
        description: "The processes in a VM: pid, parent, user, state, command line, CPU time, RSS, start time; filtered, sorted, the first N.",
        mutating: false,
        vm: true,
        props: &[
            ("filter", "string", "Only processes whose name or command line contains this text."),
            ("user", "string", "Only processes of this user."),
            ("sort", "string", "pid (default), cpu, memory or start."),
            ("limit", "integer", "At most this many processes (1 to 1000, default 1000)."),
            ("include_kernel_threads", "boolean", "Also list kernel threads."),
        ],
        required: &[],
    },
    Tool {
        name: "read_file",
        description: "Read a file in a VM (beneath the guest's allowed_read_paths), as UTF-8 text, at most 1 MiB per call.",
        mutating: false,
        vm: true,
        props: &[
            ("path", "string", "Absolute path in the guest."),
            ("offset", "integer", "Byte offset to start at (default 0)."),
            ("length", "integer", "Most bytes to return (default and maximum 1 MiB)."),
        ],
        required: &["path"],
    },
    Tool {
        name: "read_log",
        description: "The last lines of a log file in a VM (beneath allowed_read_paths) or of a systemd unit's journal; optionally since a Unix time and filtered by text.",
        mutating: false,
        vm: true,
        props: &[
            ("path", "string", "A log file in the guest (give this or unit)."),
            ("unit", "string", "A systemd unit whose journal to read (give this or path)."),
            ("lines", "integer", "The last N matching lines (1 to 10000, default 100)."),
            ("since", "integer", "Only lines logged at or after this Unix time."),
            ("filter", "string", "Only lines containing this text."),
        ],
        required: &[],
    },
    Tool {
        name: "exec",
        description: "Run a command in a VM (no shell; within the guest's command policy) and return its exit status and output.",
        mutating: true,
        vm: true,
        props: &[
            ("command", "string", "The program: a bare name or an absolute path."),
            ("args", "array", "Its arguments."),
            ("timeout_seconds", "integer", "Time limit (default the agent's request timeout)."),
            ("cwd", "string", "Working directory in the guest."),
            ("stdin", "string", "Text written to the command's stdin."),
        ],
        required: &["command"],
    },
    Tool {
        name: "write_file",
        description: "Write a UTF-8 text file in a VM (beneath the guest's allowed_write_paths), replacing it atomically.",
        mutating: true,
        vm: true,
        props: &[
            ("path", "string", "Absolute path in the guest."),
            ("content", "string", "The file's text."),
        ],
        required: &["path", "content"],
    },
];

/// The `tools/list` entries offered with these flags.
fn tools(a: &McpArgs) -> Vec<Value> {
    TOOLS
        .iter()
        .filter(|t| allowed(t, a))
        .map(|t| {
            let mut props = Map::new();
            let mut required: Vec<&str> = t.required.to_vec();
            if t.vm {
                props.insert(
                    "vm".into(),
                    json!({"type": "string", "description": "The VM: its libvirt domain name (optional when kvmmanager-ctl was given --socket or --domain)."}),
                );
            }
            for (name, ty, text) in t.props {
                let mut p = json!({"type": ty, "description": text});
                if *ty == "array" {
                    p["items"] = json!({"type": "string"});
                }
                if *name == "sort" {
                    p["enum"] = json!(["pid", "cpu", "memory", "start"]);
                }
                props.insert((*name).into(), p);
            }
            required.sort_unstable();
            json!({
                "name": t.name,
                "description": t.description,
                "inputSchema": {
                    "type": "object",
                    "properties": props,
                    "required": required,
                    "additionalProperties": false,
                },
                "annotations": {"readOnlyHint": !t.mutating},
            })
        })
        .collect()
}

fn allowed(t: &Tool, a: &McpArgs) -> bool {
    match t.name {
        "exec" => a.allow_exec,
        "write_file" => a.allow_write,
        _ => true,
    }
}

/// Serves MCP on stdin/stdout until stdin ends.
pub(super) async fn serve(cli: &Cli, a: &McpArgs) -> Result<i32, CliError> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    eprintln!(
        "kvmmanager-ctl mcp: serving MCP on stdio (exec {}, write_file {})",
        if a.allow_exec { "on" } else { "off" },
        if a.allow_write { "on" } else { "off" }
    );
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(EXIT_OK),
            Err(source) => {
                return Err(CliError::Local {
                    what: "cannot read the MCP client's messages on stdin".into(),
                    source,
                })
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let reply = if line.len() > MAX_LINE {
            Some(error_reply(Value::Null, -32600, "message too large"))
        } else {
            handle(cli, a, &line).await
        };
        if let Some(r) = reply {
            let mut text = r.to_string();
            text.push('\n');
            stdout
                .write_all(text.as_bytes())
                .await
                .and(stdout.flush().await)
                .map_err(|source| CliError::Local {
                    what: "cannot write to the MCP client on stdout".into(),
                    source,
                })?;
        }
    }
}

fn error_reply(id: Value, code: i32, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// The reply to one message; `None` for notifications and replies.
async fn handle(cli: &Cli, a: &McpArgs, line: &str) -> Option<Value> {
    let msg: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return Some(error_reply(
                Value::Null,
                -32700,
                &format!("parse error: {e}"),
            ))
        }
    };
    let id = msg.get("id").cloned();
    let Some(method) = msg.get("method").and_then(Value::as_str) else {
        // A response to a request of ours (we send none), or garbage.
        return id.map(|id| error_reply(id, -32600, "not a request"));
    };
    let id = id?; // Notifications (`notifications/initialized`, ...) get nothing.
    let params = msg.get("params").cloned().unwrap_or(json!({}));
    let result = match method {
        "initialize" => {
            let asked = params["protocolVersion"].as_str().unwrap_or("");
            let version = PROTOCOL_VERSIONS
                .iter()
                .find(|v| **v == asked)
                .unwrap_or(&PROTOCOL_VERSIONS[0]);
            json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "kvmmanager-ctl", "version": env!("CARGO_PKG_VERSION")},
                "instructions": "Tools to look at the VMs on this host through their guest agents. Every call is audited; the guest's policy decides what may be read, run or written.",
            })
        }
        "ping" => json!({}),
        "tools/list" => json!({"tools": tools(a)}),
        "tools/call" => {
            let name = params["name"].as_str().unwrap_or("").to_owned();
            let args = params.get("arguments").cloned().unwrap_or(json!({}));
            call_tool(cli, a, &name, args).await
        }
        _ => {
            return Some(error_reply(
                id,
                -32601,
                &format!("method not found: {method}"),
            ))
        }
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

/// A tool result: the JSON as text (and as structured content), or an error.
fn tool_result(r: Result<Value, String>) -> Value {
    match r {
        Ok(v) => {
            let structured = if v.is_object() {
                v.clone()
            } else {
                json!({"result": v})
            };
            json!({
                "content": [{"type": "text", "text": serde_json::to_string_pretty(&v).unwrap_or_default()}],
                "structuredContent": structured,
                "isError": false,
            })
        }
        Err(msg) => json!({
            "content": [{"type": "text", "text": msg}],
            "isError": true,
        }),
    }
}

async fn call_tool(cli: &Cli, a: &McpArgs, name: &str, args: Value) -> Value {
    let started = std::time::Instant::now();
    let tool = TOOLS.iter().find(|t| t.name == name);
    let r = match tool {
        None => Err(format!("no tool {name:?}; tools/list names the tools")),
        Some(t) if !allowed(t, a) => Err(format!(
            "{name} is disabled: it changes the guest; start `kvmmanager-ctl mcp` with --allow-{} to offer it",
            if name == "exec" { "exec" } else { "write" }
        )),
        Some(t) => run_tool(cli, t, args.clone()).await,
    };
    audit(a, name, &args, &r, started.elapsed());
    tool_result(r)
}

/// The arguments minus `vm`, as the typed params `T`.
fn typed<T: DeserializeOwned>(mut args: Value) -> Result<(Option<String>, T), String> {
    let obj = args
        .as_object_mut()
        .ok_or_else(|| "the arguments must be an object".to_owned())?;
    let vm = match obj.remove("vm") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err("vm must be a string (a libvirt domain name)".into()),
    };
    let p = serde_json::from_value(args).map_err(|e| format!("invalid arguments: {e}"))?;
    Ok((vm, p))
}

async fn connect(cli: &Cli, vm: Option<&str>) -> Result<Client, String> {
    let other =
        |v: &str| format!("this server serves one VM (--socket or --domain); {v:?} is not it");
    let domain = match (&cli.domain, &cli.socket, vm) {
        (Some(d), _, Some(v)) if d != v => return Err(other(v)),
        (Some(d), _, _) => Some(d.clone()),
        (None, Some(s), Some(v)) if s.display().to_string() != v => return Err(other(v)),
        (None, Some(_), _) => None,
        (None, None, Some(v)) => Some(v.to_owned()),
        (None, None, None) => {
            return Err("give vm: the VM's libvirt domain name (list_vms lists them)".into())
        }
    };
    let path = match (domain, &cli.socket) {
        (Some(d), _) => libvirt::channel_socket_for(libvirt_uri(), &d)
            .await
            .map_err(|e| e.to_string())?,
        (None, Some(s)) => s.clone(),
        (None, None) => return Err("no VM given".into()),
    };
    let t = Duration::from_secs(cli.timeout.max(1));
    let opts = ClientOptions {
        call_timeout: t,
        connect_timeout: t.min(Duration::from_secs(5)),
        sync_timeout: t.min(Duration::from_secs(10)),
        ..ClientOptions::default()
    };
    Client::connect_with(path, opts)
        .await
        .map_err(|e| e.to_string())
}

fn libvirt_uri() -> Option<&'static str> {
    std::env::var_os("LIBVIRT_DEFAULT_URI")
        .is_none()
        .then_some("qemu:///system")
}

/// An agent's answer as the tool's text: its error with kind and message.
fn agent_err(e: ClientError) -> String {
    match &e {
        ClientError::Agent { method, error } => format!(
            "the agent refused {method}: {} ({})",
            error.message,
            error.kind().map_or("error", |k| k.as_str())
        ),
        _ => e.to_string(),
    }
}

async fn ask(cli: &Cli, vm: Option<&str>, method: &str, params: Value) -> Result<Value, String> {
    let client = connect(cli, vm).await?;
    let r = client.call_raw(method, params).await.map_err(agent_err);
    let _ = tokio::time::timeout(Duration::from_secs(2), client.close()).await;
    r
}

async fn run_tool(cli: &Cli, t: &Tool, args: Value) -> Result<Value, String> {
    match t.name {
        "list_vms" => {
            let _: (Option<String>, agent_common::methods::Empty) = typed(args)?;
            let found = targets(cli).await.map_err(|e| e.message())?;
            let probes = probe_all(found, Duration::from_secs(3), true).await;
            Ok(json!({"vms": probes.iter().map(|p| json!({
                "name": p.target.name,
                "state": p.state,
                "version": p.version,
                "uptime_seconds": p.metrics.as_ref().map(|m| m.uptime_seconds),
                "rtt_ms": p.rtt.map(|r| r.as_secs_f64() * 1000.0),
            })).collect::<Vec<_>>()}))
        }
        "guest_info" => {
            let (vm, _): (_, agent_common::methods::Empty) = typed(args)?;
            ask(cli, vm.as_deref(), "get_system_info", json!({})).await
        }
        "metrics" => {
            let (vm, _): (_, agent_common::methods::Empty) = typed(args)?;
            ask(cli, vm.as_deref(), "get_metrics", json!({})).await
        }
        "processes" => {
            let (vm, p): (_, ProcessListParams) = typed(args)?;
            ask(cli, vm.as_deref(), "list_processes", enc(&p)).await
        }
        "read_file" => {
            let (vm, p): (_, FileReadParams) = typed(args)?;
            ask(cli, vm.as_deref(), "file_read", enc(&p)).await
        }
        "read_log" => {
            let (vm, p): (_, ReadLogParams) = typed(args)?;
            ask(cli, vm.as_deref(), "read_log", enc(&p)).await
        }
        "exec" => {
            let (vm, p): (_, ExecParams) = typed(args)?;
            ask(cli, vm.as_deref(), "exec_command", enc(&p)).await
        }
        "write_file" => {
            let (vm, p): (_, FileWriteParams) = typed(args)?;
            ask(cli, vm.as_deref(), "file_write", enc(&p)).await
        }
        other => Err(format!("no tool {other:?}")),
    }
}

/// Typed params back to JSON for `call_raw`.
fn enc<T: serde::Serialize>(p: &T) -> Value {
    // Plain structs of strings, numbers and maps: never fails.
    serde_json::to_value(p).unwrap_or_default()
}

/// The audit line of one tool call: never file contents, stdin or
/// environment values.
fn audit_line(tool: &str, args: &Value, r: &Result<Value, String>, took: Duration) -> String {
    let mut target = Map::new();
    if let Some(obj) = args.as_object() {
        for (k, v) in obj {
            match k.as_str() {
                "content" | "stdin" => {
                    target.insert(format!("{k}_bytes"), json!(v.as_str().map_or(0, str::len)));
                }
                "env" => {}
                _ => {
                    target.insert(k.clone(), v.clone());
                }
            }
        }
    }
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    json!({
        "time": secs,
        "tool": tool,
        "arguments": target,
        "outcome": if r.is_ok() { "ok" } else { "error" },
        "error": r.as_ref().err(),
        "duration_ms": took.as_millis() as u64,
    })
    .to_string()
}

fn audit(a: &McpArgs, tool: &str, args: &Value, r: &Result<Value, String>, took: Duration) {
    let line = audit_line(tool, args, r, took);
    eprintln!("kvmmanager-ctl mcp: audit {line}");
    if let Some(path) = &a.audit_file {
        let w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = w {
            eprintln!(
                "kvmmanager-ctl mcp: cannot write the audit file {}: {e}",
                path.display()
            );
        }
    }
}

/// Runs `mcp`; `None` for other commands.
pub(super) async fn dispatch(cli: &Cli) -> Result<Option<i32>, CliError> {
    match &cli.command {
        Command::Mcp(a) => serve(cli, a).await.map(Some),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(exec: bool, write: bool) -> McpArgs {
        McpArgs {
            allow_exec: exec,
            allow_write: write,
            audit_file: None,
        }
    }

    /// A sample value of a schema type.
    fn sample(ty: &str, name: &str) -> Value {
        match (ty, name) {
            (_, "sort") => json!("cpu"),
            ("string", _) => json!("/tmp/x"),
            ("integer", _) => json!(5),
            ("boolean", _) => json!(true),
            ("array", _) => json!(["a"]),
            _ => panic!("type {ty}"),
        }
    }

    /// Every property of a tool's schema is a field of its typed params
    /// (which refuse unknown fields), with the schema's type.
    fn check<T: DeserializeOwned>(tool: &str) {
        let t = TOOLS.iter().find(|t| t.name == tool).unwrap();
        let mut obj = Map::new();
        for (name, ty, _) in t.props {
            obj.insert((*name).into(), sample(ty, name));
            let one = json!({ *name: sample(ty, name) });
            if let Err(e) = serde_json::from_value::<T>(merge(one, t)) {
                panic!("{tool}: property {name} ({ty}) does not fit the params: {e}");
            }
        }
        serde_json::from_value::<T>(Value::Object(obj))
            .unwrap_or_else(|e| panic!("{tool}: all properties at once: {e}"));
        assert!(
            serde_json::from_value::<T>(json!({"no_such_field": 1})).is_err(),
            "params refuse unknown fields"
        );
    }

    /// `one` plus the tool's required properties.
    fn merge(mut one: Value, t: &Tool) -> Value {
        for r in t.required {
            let (_, ty, _) = t.props.iter().find(|(n, _, _)| n == r).unwrap();
            one[*r] = sample(ty, r);
        }
        one
    }

    #[test]
    fn schemas_are_the_typed_params() {
        check::<ProcessListParams>("processes");
        check::<FileReadParams>("read_file");
        check::<ReadLogParams>("read_log");
        check::<ExecParams>("exec");
        check::<FileWriteParams>("write_file");
        for t in TOOLS.iter().filter(|t| t.props.is_empty()) {
            serde_json::from_value::<agent_common::methods::Empty>(json!({})).unwrap();
            assert!(t.required.is_empty());
        }
    }

    #[test]
    fn mutating_tools_only_with_their_flags() {
        let names = |a: &McpArgs| -> Vec<String> {
            tools(a)
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_owned())
                .collect()
        };
        let plain = names(&args(false, false));
        assert_eq!(
            plain,
            [
                "list_vms",
                "guest_info",
                "metrics",
                "processes",
                "read_file",
                "read_log"
            ]
        );
        assert!(names(&args(true, false)).contains(&"exec".to_owned()));
        assert!(!names(&args(true, false)).contains(&"write_file".to_owned()));
        assert!(names(&args(false, true)).contains(&"write_file".to_owned()));
        for t in tools(&args(true, true)) {
            assert_eq!(t["inputSchema"]["type"], "object", "{t}");
            assert_eq!(t["inputSchema"]["additionalProperties"], false, "{t}");
        }
    }

    #[test]
    fn audit_lines_keep_contents_and_stdin_out() {
        let a = json!({"vm": "web1", "path": "/tmp/kvmmanager/x", "content": "s3cret", "stdin": "pw", "env": {"K": "v4lue"}});
        let l = audit_line(
            "write_file",
            &a,
            &Err("refused".into()),
            Duration::from_millis(3),
        );
        assert!(
            !l.contains("s3cret") && !l.contains("v4lue") && !l.contains("\"pw\""),
            "{l}"
        );
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["arguments"]["content_bytes"], 6);
        assert_eq!(v["arguments"]["path"], "/tmp/kvmmanager/x");
        assert_eq!(v["outcome"], "error");
    }

    #[test]
    fn typed_arguments_take_vm_apart_and_refuse_strangers() {
        let (vm, p): (_, ReadLogParams) =
            typed(json!({"vm": "web1", "unit": "x.service", "lines": 3})).unwrap();
        assert_eq!(vm.as_deref(), Some("web1"));
        assert_eq!(p.lines, Some(3));
        let e = typed::<ReadLogParams>(json!({"vm": "web1", "lnes": 3})).unwrap_err();
        assert!(e.contains("lnes"), "{e}");
        assert!(typed::<ReadLogParams>(json!({"vm": 3})).is_err());
    }
}
