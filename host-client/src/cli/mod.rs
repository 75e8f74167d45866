//! The `kvmmanager-ctl` command: argument parsing, output and exit codes.
//!
//! # Exit codes
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | the agent answered with an error (or the guest file changed during a transfer) |
//! | 2 | usage error |
//! | 3 | cannot connect, or the connection was lost |
//! | 4 | timeout |
//! | 5 | protocol violation |
//! | 6 | local file error |
//!
//! `exec` exits with the command's exit code, 128+N if it was killed by
//! signal N, 124 if it timed out, and 255 if kvmmanager-ctl itself failed.

mod exporter;
pub mod fleet;
mod format;
pub mod mcp;
pub mod ops;
mod render;
pub mod stream;
mod term;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_common::encoding::Encoding;
use agent_common::error::ErrorKind;
use agent_common::methods::{ExecParams, ExecResult, WriteMode};
use agent_common::DEFAULT_CHANNEL_NAME;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::libvirt::{self, LibvirtError};
use crate::{Client, ClientError, ClientOptions, PushOptions, TransferSummary};
use format::human_size;
use render::{render_df, render_info, render_net, render_sysinfo, ProgressLine};

/// Exit status: success.
pub const EXIT_OK: i32 = 0;
/// Exit status: the agent answered with an error.
pub const EXIT_AGENT: i32 = 1;
/// Exit status: usage error.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: cannot connect, or the connection was lost.
pub const EXIT_CONNECT: i32 = 3;
/// Exit status: a call timed out.
pub const EXIT_TIMEOUT: i32 = 4;
/// Exit status: the agent broke the protocol.
pub const EXIT_PROTOCOL: i32 = 5;
/// Exit status: a local file could not be read or written.
pub const EXIT_LOCAL: i32 = 6;
/// Exit status of `exec` when kvmmanager-ctl itself failed.
pub const EXIT_EXEC_FAILED: i32 = 255;
/// Interrupted by Ctrl-C (SIGINT); the agent was asked to stop the call.
pub const EXIT_INTERRUPTED: i32 = 130;
/// Exit status of `exec` when the command timed out.
pub const EXIT_EXEC_TIMEOUT: i32 = 124;

const ABOUT: &str = "Control a VM through its kvmmanager guest agent";

const LONG_ABOUT: &str = "\
Control a VM through its kvmmanager guest agent.

kvmmanager-ctl talks JSON-RPC to kvmmanager-agent inside a Linux guest over the
virtio-serial channel org.kvmmanager.agent.0, without any guest networking.
Name the guest by the host socket of that channel (--socket, or the
KVMMANAGER_SOCKET environment variable), or by its libvirt domain (--domain).

Examples:
  kvmmanager-ctl --domain web1 ping
  kvmmanager-ctl --socket /run/vm1/agent.sock sysinfo
  kvmmanager-ctl -d web1 exec -- systemctl is-active nginx
  kvmmanager-ctl -d web1 pull /var/log/syslog ./web1-syslog
  kvmmanager-ctl -d web1 push ./app.tar /tmp/kvmmanager/app.tar
  echo hello | kvmmanager-ctl -d web1 write /tmp/kvmmanager/hello
  kvmmanager-ctl -d web1 --json df | jq '.filesystems[].mount_point'
  kvmmanager-ctl channel-xml     # the <channel> to add with `virsh edit`";

const AFTER_HELP: &str = "\
Exit status:
  0  success
  1  the agent answered with an error (or the guest file changed during a transfer)
  2  usage error
  3  cannot connect, or the connection was lost
  4  timeout
  5  protocol violation
  6  local file error
  exec: the command's exit code, 128+N if killed by signal N, 124 if it timed
  out, 255 if kvmmanager-ctl itself failed.";

/// Command-line arguments of `kvmmanager-ctl`.
///
/// ```
/// use clap::Parser;
/// use host_client::cli::{Cli, Command};
///
/// let cli = Cli::try_parse_from(["kvmmanager-ctl", "--domain", "vm1", "df", "--all"]).unwrap();
/// assert!(matches!(cli.command, Command::Df { all: true }));
/// ```
#[derive(Debug, Parser)]
#[command(
    name = "kvmmanager-ctl",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// Host socket of the guest's org.kvmmanager.agent.0 channel.
    #[arg(
        short,
        long,
        global = true,
        env = "KVMMANAGER_SOCKET",
        value_name = "PATH"
    )]
    pub socket: Option<PathBuf>,
    /// libvirt domain whose channel socket to use (overrides KVMMANAGER_SOCKET).
    #[arg(short, long, global = true, value_name = "NAME")]
    pub domain: Option<String>,
    /// Print results as JSON, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log what the client does on stderr (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Time limit of each call, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--mode` of `write` and `push`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[non_exhaustive]
pub enum ModeArg {
    /// Replace the file atomically.
    Truncate,
    /// Append to the file.
    Append,
    /// Fail if the file exists.
    CreateNew,
}

impl From<ModeArg> for WriteMode {
    fn from(m: ModeArg) -> WriteMode {
        match m {
            ModeArg::Truncate => WriteMode::Truncate,
            ModeArg::Append => WriteMode::Append,
            ModeArg::CreateNew => WriteMode::CreateNew,
        }
    }
}

/// Options of commands that write a guest file.
#[derive(Debug, Clone, clap::Args)]
pub struct WriteArgs {
    /// How to treat an existing file.
    #[arg(long, value_enum, default_value = "truncate")]
    pub mode: ModeArg,
    /// Permission bits of a new file, in octal (e.g. 0644).
    #[arg(long, value_name = "OCTAL", value_parser = parse_permissions)]
    pub permissions: Option<u32>,
}

/// Arguments of `exec`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExecArgs {
    /// Time limit of the command in seconds (the agent kills its process group).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Set an environment variable for the command (repeatable).
    #[arg(short, long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Feed this local file (or - for our stdin) to the command's stdin.
    #[arg(long, value_name = "FILE|-")]
    pub stdin: Option<PathBuf>,
    /// With --json, keep stdout/stderr base64-encoded instead of decoding them as text.
    #[arg(long)]
    pub binary: bool,
    /// Stream: print output as it comes and pass our stdin through (no
    /// output limit; the command ends when kvmmanager-ctl does).
    #[arg(long, conflicts_with_all = ["stdin", "binary"])]
    pub stream: bool,
    /// The command and its arguments (no shell: arguments are passed verbatim).
    #[arg(
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
#[non_exhaustive]
pub enum Command {
    /// Check the agent answers, and print the round-trip time.
    Ping,
    /// Show the agent's version, protocol, methods and limits.
    Info,
    /// Show the guest's OS, kernel, CPUs, memory and uptime.
    Sysinfo,
    /// Show the guest's network interfaces and addresses.
    Net,
    /// Show the guest's mounted filesystems and their usage.
    Df {
        /// Include pseudo filesystems (proc, sysfs, tmpfs, ...).
        #[arg(short, long)]
        all: bool,
    },
    /// Run a command in the guest; its output and exit status become ours.
    #[command(
        after_help = "Example:\n  kvmmanager-ctl -d web1 exec --env LC_ALL=C -- ls -l /var/log"
    )]
    Exec(ExecArgs),
    /// Open a terminal session in the guest (raw mode; the window size follows ours).
    #[command(
        after_help = "Examples:\n  kvmmanager-ctl -d web1 shell\n  kvmmanager-ctl -d web1 shell -- top\n\nExits with the session's exit status."
    )]
    Shell(stream::ShellArgs),
    /// Forward a local TCP port to an address inside the guest (until Ctrl-C).
    #[command(
        after_help = "Example:\n  kvmmanager-ctl -d web1 forward 8080:127.0.0.1:80\n\nThe agent connects only to addresses its security.allowed_forwards lists."
    )]
    Forward(stream::ForwardArgs),
    /// Print a guest file to stdout.
    Cat {
        /// Absolute path in the guest.
        path: String,
    },
    /// Copy a guest file to a local file (same as pull).
    Read {
        /// Absolute path in the guest.
        path: String,
        /// Local destination (- for stdout).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Write stdin to a guest file.
    #[command(
        after_help = "Example:\n  echo 'nameserver 10.0.0.1' | kvmmanager-ctl -d web1 write /tmp/kvmmanager/resolv.conf"
    )]
    Write {
        /// Absolute path in the guest.
        path: String,
        /// Write options.
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Copy a local file to the guest.
    Push {
        /// Local source file.
        local: PathBuf,
        /// Absolute destination path in the guest.
        guest: String,
        /// Write options.
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Copy a guest file to the host.
    Pull {
        /// Absolute source path in the guest.
        guest: String,
        /// Local destination (a directory keeps the guest file's name).
        local: PathBuf,
    },
    /// Power the guest off.
    Shutdown {
        /// Seconds to wait after answering.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        delay: u64,
    },
    /// Reboot the guest.
    Reboot {
        /// Seconds to wait after answering.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        delay: u64,
    },
    /// Call any method with JSON params and print the JSON result.
    #[command(
        after_help = "Example:\n  kvmmanager-ctl -d web1 call file_read '{\"path\":\"/etc/hostname\"}'"
    )]
    Call {
        /// Method name, e.g. get_system_info.
        method: String,
        /// Params as a JSON object (default {}).
        params: Option<String>,
    },
    /// Freeze, thaw or show the freeze state of the guest's filesystems.
    #[command(
        after_help = "Example:\n  kvmmanager-ctl -d web1 fsfreeze freeze /srv/data && snapshot && kvmmanager-ctl -d web1 fsfreeze thaw"
    )]
    Fsfreeze {
        /// What to do.
        #[command(subcommand)]
        action: ops::FreezeCmd,
    },
    /// Discard unused blocks of the guest's filesystems (FITRIM).
    Fstrim(ops::TrimArgs),
    /// Show the guest's clock, or set it (--sync: to this host's clock).
    Time(ops::TimeArgs),
    /// Show the guest's login sessions.
    Users,
    /// Show or change a user's authorized SSH keys.
    #[command(
        after_help = "Example:\n  kvmmanager-ctl -d web1 ssh-keys add alice --file ~/.ssh/id_ed25519.pub"
    )]
    SshKeys {
        /// What to do.
        #[command(subcommand)]
        action: ops::KeysCmd,
    },
    /// Set a user's password, read from the first line of stdin.
    #[command(
        after_help = "Example:\n  printf '%s\\n' \"$PW\" | kvmmanager-ctl -d web1 passwd alice"
    )]
    Passwd(ops::PasswdArgs),
    /// Show the guest's vCPUs, or bring them online or offline.
    Vcpus(ops::VcpuArgs),
    /// Show the guest's filesystems and the disks beneath them.
    Fsinfo,
    /// Show the guest's block devices and how they stack.
    BlockDevices,
    /// Show the guest's load, per-CPU times, per-disk I/O and routes.
    Stats,
    /// Show the guest's memory blocks, or bring them online or offline.
    Memory(ops::MemoryArgs),
    /// Suspend the guest (to RAM by default), where it supports it.
    Suspend {
        /// How to suspend.
        #[arg(long, value_enum, default_value = "ram")]
        mode: ops::SuspendArg,
    },
    /// Show every libvirt domain with its agent's state, version, uptime and
    /// round-trip time (or the one --socket/--domain names).
    #[command(after_help = "Example:\n  kvmmanager-ctl list --watch 5")]
    List(fleet::ListArgs),
    /// Live CPU, memory, disk and network rates of every VM (or one).
    #[command(after_help = "Example:\n  kvmmanager-ctl top --interval 2")]
    Top(fleet::TopArgs),
    /// Show the guest's processes.
    #[command(after_help = "Example:\n  kvmmanager-ctl -d web1 ps --sort cpu -n 10")]
    Ps(fleet::PsArgs),
    /// Send a signal to a process in the guest.
    #[command(after_help = "Example:\n  kvmmanager-ctl -d web1 kill 812 --signal TERM")]
    Kill(fleet::KillArgs),
    /// Show the last lines of a guest log file, or of a unit's journal; with
    /// -f, follow a file as it grows, across rotation (until Ctrl-C).
    #[command(
        after_help = "Examples:\n  kvmmanager-ctl -d web1 logs --unit nginx.service -n 50 --grep error --since 1h\n  kvmmanager-ctl -d web1 logs -f -n 50 --grep error /var/log/syslog"
    )]
    Logs(fleet::LogsArgs),
    /// Show the guest's metrics: CPU, memory, pressure, disks, network, filesystems.
    Metrics,
    /// Serve every VM's metrics to Prometheus on ADDR/metrics.
    #[command(after_help = "Example:\n  kvmmanager-ctl exporter --listen 127.0.0.1:9187")]
    Exporter(fleet::ExporterArgs),
    /// Serve the VMs to an AI assistant: an MCP server on stdin/stdout.
    #[command(
        after_help = "Example (an MCP client's server entry):\n  {\"command\": \"kvmmanager-ctl\", \"args\": [\"mcp\"]}"
    )]
    Mcp(mcp::McpArgs),
    /// Print the `<channel>` XML that gives a libvirt domain the agent's port.
    ChannelXml,
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn parse_permissions(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(v) if v <= 0o7777 && !digits.is_empty() => Ok(v),
        _ => Err(format!("{s:?} is not octal permission bits like 0644")),
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not of the form NAME=VALUE")),
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// A call or transfer failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The libvirt domain's socket could not be found.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// Neither --socket nor --domain was given.
    #[error("no guest given")]
    NoTarget,
    /// `call` params are not JSON.
    #[error("the params of call are not valid JSON")]
    BadParams(#[source] serde_json::Error),
    /// Interrupted (Ctrl-C, SIGINT) before the command finished; the agent
    /// was asked to stop the call.
    #[error("interrupted; the agent was asked to stop the call")]
    Interrupted,
    /// Our own stdin/stdout failed.
    #[error("{what}")]
    Local {
        /// What was being read or written.
        what: String,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
}

impl CliError {
    /// The documented exit status for this error.
    ///
    /// ```
    /// use host_client::{cli::CliError, ClientError};
    /// assert_eq!(CliError::from(ClientError::ConnectionLost).exit_code(), 3);
    /// ```
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Client(e) => match e.root() {
                // Never a root.
                ClientError::Transfer { .. } => EXIT_PROTOCOL,
                ClientError::Agent { .. }
                | ClientError::FileChanged { .. }
                | ClientError::StreamReset { .. }
                | ClientError::RequestTooLarge { .. } => EXIT_AGENT,
                ClientError::Connect { .. }
                | ClientError::ConnectTimeout { .. }
                | ClientError::ConnectionLost
                | ClientError::RequestLost { .. }
                | ClientError::Io(_) => EXIT_CONNECT,
                ClientError::Timeout { .. } => EXIT_TIMEOUT,
                ClientError::Protocol(_)
                | ClientError::BadResult { .. }
                | ClientError::Encode { .. } => EXIT_PROTOCOL,
                ClientError::LocalFile { .. } => EXIT_LOCAL,
                ClientError::InsideRuntime => EXIT_USAGE,
            },
            CliError::Libvirt(_) => EXIT_CONNECT,
            CliError::NoTarget | CliError::BadParams(_) => EXIT_USAGE,
            CliError::Interrupted => EXIT_INTERRUPTED,
            CliError::Local { .. } => EXIT_LOCAL,
        }
    }

    /// What the user can do about it.
    fn hint(&self) -> Option<String> {
        let channel_hint = format!(
            "is the VM running and does it have the {DEFAULT_CHANNEL_NAME} channel? see `kvmmanager-ctl channel-xml`"
        );
        Some(match self {
            CliError::Client(e) => match e.root() {
                ClientError::Transfer { .. } => return None,
                ClientError::Connect { source, .. }
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    "run as root or as a user allowed to open the socket".to_owned()
                }
                ClientError::Connect { .. } | ClientError::ConnectTimeout { .. } => channel_hint,
                ClientError::ConnectionLost | ClientError::RequestLost { .. } | ClientError::Io(_) => {
                    "the VM may have shut down or rebooted, or the agent restarted; retry".to_owned()
                }
                ClientError::Timeout { method, .. } if method == "sync" => {
                    "the channel is open but no agent answered: is kvmmanager-agent running in the guest?".to_owned()
                }
                ClientError::Timeout { .. } => {
                    "the guest may be slow or busy; retry with a larger --timeout".to_owned()
                }
                ClientError::Agent { error, .. } => match e.kind()? {
                    ErrorKind::PolicyDenied
                        if error
                            .data
                            .as_ref()
                            .and_then(|d| d.get("config_key"))
                            .and_then(|k| k.as_str())
                            .is_some_and(|k| k.ends_with("_methods")) =>
                    {
                        "the guest's configuration disables this method (security.allowed_methods, security.blocked_methods in /etc/kvmmanager-agent/config.json); `kvmmanager-ctl info` lists the disabled ones".to_owned()
                    }
                    ErrorKind::PolicyDenied
                        if matches!(e.root(), ClientError::Agent { method, .. } if method == "kill_process") =>
                    {
                        "the agent never signals init (pid 1), itself or kernel threads".to_owned()
                    }
                    ErrorKind::PolicyDenied => "the guest's policy refuses this; check security.allowed_read_paths, allowed_write_paths and command_whitelist in the guest's /etc/kvmmanager-agent/config.json".to_owned(),
                    ErrorKind::NotFound => "check the path or command name in the guest".to_owned(),
                    ErrorKind::MethodNotFound => "the agent may be older than kvmmanager-ctl; see `kvmmanager-ctl info`".to_owned(),
                    ErrorKind::TooLarge => "raise security.max_file_size_mb in the guest's /etc/kvmmanager-agent/config.json".to_owned(),
                    ErrorKind::Busy => "retry later, or raise max_concurrent_requests in the guest's config".to_owned(),
                    ErrorKind::AlreadyExists => "use --mode truncate to replace it".to_owned(),
                    ErrorKind::NotSupported => "this agent build or guest platform does not serve it; see `kvmmanager-ctl info`".to_owned(),
                    ErrorKind::ShuttingDown => "the agent is stopping; retry once the guest is back".to_owned(),
                    ErrorKind::InvalidParams => "see `kvmmanager-ctl info` and PROTOCOL.md for the method's params".to_owned(),
                    ErrorKind::Frozen => "the guest's filesystems are frozen: `kvmmanager-ctl fsfreeze thaw`, or wait for the agent to thaw them".to_owned(),
                    _ => return None,
                },
                ClientError::RequestTooLarge { .. } => {
                    "send less (e.g. files with `push`), or raise max_message_size_kb in the guest's config".to_owned()
                }
                ClientError::FileChanged { .. } => {
                    "the file is being written in the guest; retry when it is stable".to_owned()
                }
                ClientError::StreamReset { .. } => {
                    "the guest could not read on; the agent's log (journalctl -u kvmmanager-agent) has the cause".to_owned()
                }
                ClientError::Protocol(_) | ClientError::BadResult { .. } | ClientError::Encode { .. } => {
                    "kvmmanager-ctl and the agent disagree on the protocol; compare versions with `kvmmanager-ctl info`".to_owned()
                }
                ClientError::LocalFile { .. } => "check the local path and its permissions".to_owned(),
                ClientError::InsideRuntime => "use the async host_client::Client inside a tokio runtime".to_owned(),
            },
            CliError::Libvirt(LibvirtError::NoChannel { .. }) => {
                "add the channel with `virsh edit` (see `kvmmanager-ctl channel-xml`)".to_owned()
            }
            CliError::Libvirt(_) => {
                "check the name with `virsh list --all`, or pass --socket PATH".to_owned()
            }
            CliError::NoTarget => {
                "pass --socket PATH or --domain NAME, or set KVMMANAGER_SOCKET".to_owned()
            }
            CliError::BadParams(_) => "pass a JSON object, e.g. '{\"path\":\"/etc/hostname\"}'".to_owned(),
            CliError::Local { .. } | CliError::Interrupted => return None,
        })
    }

    /// The one-line message: `what failed: cause: cause (hint)`.
    ///
    /// ```
    /// use host_client::{cli::CliError, ClientError};
    /// let line = CliError::from(ClientError::ConnectionLost).message();
    /// assert!(line.starts_with("the connection to the agent was lost"));
    /// ```
    pub fn message(&self) -> String {
        let mut line = self.to_string();
        let mut source = std::error::Error::source(self);
        // `transparent` variants report the inner error's source chain.
        while let Some(s) = source {
            line.push_str(": ");
            line.push_str(&s.to_string());
            source = s.source();
        }
        if let Some(h) = self.hint() {
            line.push_str(&format!(" ({h})"));
        }
        line
    }
}

/// Parses the arguments, runs the command and returns the exit status.
pub fn main() -> i32 {
    match Cli::try_parse() {
        Ok(cli) => run(cli),
        Err(e) => {
            let _ = e.print();
            if e.use_stderr() {
                EXIT_USAGE
            } else {
                EXIT_OK
            }
        }
    }
}

/// Runs a parsed command line and returns the exit status.
///
/// ```
/// use clap::Parser;
/// let cli = host_client::cli::Cli::try_parse_from(["kvmmanager-ctl", "channel-xml"]).unwrap();
/// assert_eq!(host_client::cli::run(cli), 0);
/// ```
pub fn run(cli: Cli) -> i32 {
    if cli.verbose > 0 {
        let level = if cli.verbose > 1 { "trace" } else { "debug" };
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
                "host_client={level}"
            )))
            .try_init();
    }
    let is_exec = matches!(cli.command, Command::Exec(_) | Command::Shell(_));
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvmmanager-ctl: error: cannot start the async runtime: {e}");
            return if is_exec {
                EXIT_EXEC_FAILED
            } else {
                EXIT_CONNECT
            };
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(CliError::Local { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            // Our reader went away (`| head`): not worth a message.
            EXIT_OK
        }
        Err(e) => {
            eprintln!("kvmmanager-ctl: error: {}", e.message());
            if is_exec && !matches!(e, CliError::Interrupted) {
                EXIT_EXEC_FAILED
            } else {
                e.exit_code()
            }
        }
    }
}

fn out(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|source| CliError::Local {
            what: "cannot write to stdout".into(),
            source,
        })
}

fn out_json<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|source| ClientError::Encode {
        method: "output".into(),
        source,
    })?;
    out(&format!("{text}\n"))
}

async fn connect(cli: &Cli) -> Result<Client, CliError> {
    let path = match (&cli.domain, &cli.socket) {
        (Some(d), _) => libvirt::channel_socket(d)?,
        (None, Some(s)) => s.clone(),
        (None, None) => return Err(CliError::NoTarget),
    };
    let call_timeout = Duration::from_secs(cli.timeout.max(1));
    let defaults = ClientOptions::default();
    let opts = ClientOptions {
        call_timeout,
        sync_timeout: defaults.sync_timeout.min(call_timeout),
        connect_timeout: defaults.connect_timeout.min(call_timeout),
        ..defaults
    };
    Ok(Client::connect_with(path, opts).await?)
}

async fn dispatch(cli: Cli) -> Result<i32, CliError> {
    match &cli.command {
        Command::ChannelXml => {
            out(&format!("{}\n", libvirt::channel_xml()))?;
            return Ok(EXIT_OK);
        }
        Command::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "kvmmanager-ctl", &mut buf);
            out(&String::from_utf8_lossy(&buf))?;
            return Ok(EXIT_OK);
        }
        Command::Call {
            params: Some(p), ..
        } => {
            // Check the JSON before connecting.
            serde_json::from_str::<serde_json::Value>(p).map_err(CliError::BadParams)?;
        }
        _ => {}
    }
    if let Some(code) = fleet::dispatch(&cli).await? {
        return Ok(code);
    }
    if let Some(code) = mcp::dispatch(&cli).await? {
        return Ok(code);
    }
    let client = connect(&cli).await?;
    let result = tokio::select! {
        r = execute(&client, cli) => r,
        _ = tokio::signal::ctrl_c() => Err(CliError::Interrupted),
    };
    // Before the runtime goes: the agent is asked to stop what this run
    // gave up on (an interrupted or timed-out call), which the client's
    // own notification tasks could not do once the runtime is gone. Bounded,
    // as an agent that does not read cannot be told anything.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.close()).await;
    result
}

/// Runs `cli`'s command on `client`.
async fn execute(client: &Client, cli: Cli) -> Result<i32, CliError> {
    let json = cli.json;
    match cli.command {
        Command::Ping => {
            let start = Instant::now();
            let r = client.ping().await?;
            let rtt = start.elapsed().as_secs_f64() * 1000.0;
            if json {
                out_json(&json!({"pong": r.pong, "timestamp": r.timestamp, "rtt_ms": rtt}))?;
            } else {
                out(&format!(
                    "pong from {}: time={rtt:.2} ms\n",
                    client.path().display()
                ))?;
            }
        }
        Command::Info => {
            let info = client.agent_info().await?;
            if json {
                out_json(&info)?;
            } else {
                out(&render_info(&info))?;
            }
        }
        Command::Sysinfo => {
            let s = client.system_info().await?;
            if json {
                out_json(&s)?;
            } else {
                out(&render_sysinfo(&s))?;
            }
        }
        Command::Net => {
            let n = client.network_info().await?;
            if json {
                out_json(&n)?;
            } else {
                out(&render_net(&n))?;
            }
        }
        Command::Df { all } => {
            let d = client.disk_usage(all).await?;
            if json {
                out_json(&d)?;
            } else {
                out(&render_df(&d))?;
            }
        }
        Command::Exec(args) if args.stream => return stream::exec(client, args).await,
        Command::Exec(args) => return exec(client, args, json).await,
        Command::Shell(args) => return stream::shell(client, args).await,
        Command::Forward(args) => return stream::forward(client, args).await,
        // -f is required (clap): a `logs` without it (read_log) is not here.
        Command::Logs(args) if args.follow => {
            // `follow` requires a path (clap: conflicts with `unit`).
            let path = args.path.unwrap_or_default();
            return stream::follow_logs(client, &path, args.lines, args.grep.as_deref()).await;
        }
        Command::Read { path, output } if output.as_os_str() == "-" => cat(client, &path).await?,
        Command::Cat { path } => cat(client, &path).await?,
        Command::Read { path, output }
        | Command::Pull {
            guest: path,
            local: output,
        } => {
            let mut bar = ProgressLine::new();
            let s = client.pull(&path, &output, |p| bar.update(p)).await;
            bar.finish();
            report_transfer(&s?, json, "pulled")?;
        }
        Command::Push {
            local,
            guest,
            write,
        } => {
            let mut bar = ProgressLine::new();
            let s = client
                .push(&local, &guest, push_options(&write), |p| bar.update(p))
                .await;
            bar.finish();
            report_transfer(&s?, json, "pushed")?;
        }
        Command::Write { path, write } => {
            let mut stdin = tokio::io::stdin();
            let s = client
                .push_from(
                    &mut stdin,
                    Path::new("stdin"),
                    None,
                    &path,
                    push_options(&write),
                    |_| {},
                )
                .await?;
            if json {
                report_transfer(&s, json, "wrote")?;
            }
        }
        Command::Shutdown { delay } => {
            let r = client.shutdown(delay).await?;
            if json {
                out_json(&r)?;
            } else {
                out("shutdown accepted\n")?;
            }
        }
        Command::Reboot { delay } => {
            let r = client.reboot(delay).await?;
            if json {
                out_json(&r)?;
            } else {
                out("reboot accepted\n")?;
            }
        }
        Command::Call { method, params } => {
            let params = match params {
                Some(p) => serde_json::from_str(&p).map_err(CliError::BadParams)?,
                None => json!({}),
            };
            let r = client.call_raw(&method, params).await?;
            out_json(&r)?;
        }
        cmd @ (Command::Fsfreeze { .. }
        | Command::Fstrim(_)
        | Command::Time(_)
        | Command::Users
        | Command::SshKeys { .. }
        | Command::Passwd(_)
        | Command::Vcpus(_)
        | Command::Fsinfo
        | Command::BlockDevices
        | Command::Stats
        | Command::Memory(_)
        | Command::Suspend { .. }) => return ops::run(client, cmd, json).await,
        cmd @ (Command::Ps(_) | Command::Kill(_) | Command::Logs(_) | Command::Metrics) => {
            return fleet::run(client, cmd, json).await
        }
        Command::ChannelXml
        | Command::Completions { .. }
        | Command::List(_)
        | Command::Top(_)
        | Command::Exporter(_)
        | Command::Mcp(_) => {}
    }
    Ok(EXIT_OK)
}

async fn cat(client: &Client, path: &str) -> Result<(), CliError> {
    let mut stdout = tokio::io::stdout();
    client
        .read_to(path, &mut stdout, Path::new("stdout"), |_| {})
        .await
        .map_err(|e| match e.root() {
            ClientError::LocalFile { .. } => match e.into_root() {
                ClientError::LocalFile { source, .. } => CliError::Local {
                    what: "cannot write to stdout".into(),
                    source,
                },
                e => e.into(),
            },
            _ => e.into(),
        })?;
    Ok(())
}

fn push_options(w: &WriteArgs) -> PushOptions {
    PushOptions {
        mode: w.mode.into(),
        permissions: w.permissions,
    }
}

fn report_transfer(s: &TransferSummary, json: bool, verb: &str) -> Result<(), CliError> {
    let secs = s.duration.as_secs_f64();
    if json {
        out_json(&json!({"bytes": s.bytes, "seconds": secs, "mib_per_s": s.mib_per_s()}))
    } else {
        out(&format!(
            "{verb} {} in {secs:.2} s ({:.1} MiB/s)\n",
            human_size(s.bytes),
            s.mib_per_s()
        ))
    }
}

async fn exec(client: &Client, args: ExecArgs, json: bool) -> Result<i32, CliError> {
    let stdin = match &args.stdin {
        None => None,
        Some(p) => {
            let (what, data) = if p.as_os_str() == "-" {
                let mut buf = Vec::new();
                let r = std::io::stdin().read_to_end(&mut buf);
                ("stdin".to_owned(), r.map(|_| buf))
            } else {
                (p.display().to_string(), std::fs::read(p))
            };
            let data = data.map_err(|source| {
                CliError::Client(ClientError::LocalFile {
                    path: PathBuf::from(what),
                    source,
                })
            })?;
            // Learn the agent's request limit, so that too much stdin is
            // refused with a clear error.
            client.limits().await?;
            Some(Encoding::Base64.encode_lossy(&data))
        }
    };
    let mut words = args.command.into_iter();
    let command = words.next().unwrap_or_default();
    let params = ExecParams {
        command,
        args: words.collect(),
        timeout_seconds: args.timeout,
        env: args.env.into_iter().collect(),
        cwd: args.cwd,
        stdin,
        stdin_encoding: Encoding::Base64,
        output_encoding: Encoding::Base64,
    };
    let mut r = client.exec(&params).await?;
    let code = exec_exit_code(&r);
    let decode = |s: &str| {
        r.encoding.decode(s).map_err(|e| {
            CliError::Client(ClientError::Protocol(format!(
                "exec_command output does not decode: {e}"
            )))
        })
    };
    let stdout = decode(&r.stdout)?;
    let stderr = decode(&r.stderr)?;
    if json {
        if !args.binary {
            r.stdout = String::from_utf8_lossy(&stdout).into_owned();
            r.stderr = String::from_utf8_lossy(&stderr).into_owned();
            r.encoding = Encoding::Utf8;
        }
        out_json(&r)?;
        return Ok(code);
    }
    let local = |what: &str| {
        let what = what.to_owned();
        move |source| CliError::Local { what, source }
    };
    let mut o = std::io::stdout().lock();
    o.write_all(&stdout)
        .and_then(|()| o.flush())
        .map_err(local("cannot write to stdout"))?;
    let mut e = std::io::stderr().lock();
    e.write_all(&stderr)
        .and_then(|()| e.flush())
        .map_err(local("cannot write to stderr"))?;
    if r.stdout_truncated || r.stderr_truncated {
        let _ = writeln!(
            e,
            "kvmmanager-ctl: warning: the agent cut the command's output at its max_exec_output limit"
        );
    }
    if r.timed_out {
        let _ = writeln!(
            e,
            "kvmmanager-ctl: warning: the command timed out after {} ms and was killed",
            r.duration_ms
        );
    }
    Ok(code)
}

/// The exit status `exec` reports for a command's result.
fn exec_exit_code(r: &ExecResult) -> i32 {
    if r.timed_out {
        EXIT_EXEC_TIMEOUT
    } else if let Some(sig) = r.signal {
        128 + sig
    } else {
        r.exit_code.unwrap_or(EXIT_EXEC_FAILED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kvmmanager-ctl").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_takes_everything_after_the_double_dash() {
        let cli = parse(&[
            "-s",
            "/x",
            "exec",
            "--env",
            "A=1",
            "--timeout",
            "5",
            "--",
            "ls",
            "-l",
            "--",
            "/",
        ])
        .unwrap();
        let Command::Exec(e) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(e.command, ["ls", "-l", "--", "/"]);
        assert_eq!(e.env, [("A".to_owned(), "1".to_owned())]);
        assert_eq!(e.timeout, Some(5));
        assert_eq!(cli.socket.as_deref(), Some(Path::new("/x")));
        // Without --, the first non-option starts the command.
        let cli = parse(&["exec", "uname", "-a"]).unwrap();
        let Command::Exec(e) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(e.command, ["uname", "-a"]);
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = parse(&["df", "--all", "--json", "--domain", "vm1"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.domain.as_deref(), Some("vm1"));
        assert!(matches!(cli.command, Command::Df { all: true }));
        let cli = parse(&["--timeout", "7", "ping"]).unwrap();
        assert_eq!(cli.timeout, 7);
    }

    #[test]
    fn write_options_parse() {
        let cli = parse(&[
            "push",
            "a",
            "/tmp/b",
            "--mode",
            "create-new",
            "--permissions",
            "0600",
        ])
        .unwrap();
        let Command::Push { write, .. } = cli.command else {
            panic!("not push")
        };
        assert_eq!(write.mode, ModeArg::CreateNew);
        assert_eq!(write.permissions, Some(0o600));
    }

    #[test]
    fn guest_operation_commands_parse() {
        let cli = parse(&["fsfreeze", "freeze", "/srv/data", "/"]).unwrap();
        let Command::Fsfreeze {
            action: ops::FreezeCmd::Freeze { mount_points },
        } = cli.command
        else {
            panic!("not fsfreeze freeze")
        };
        assert_eq!(mount_points, ["/srv/data", "/"]);
        let cli = parse(&["vcpus", "--offline", "1,2", "--online", "3"]).unwrap();
        let Command::Vcpus(v) = cli.command else {
            panic!("not vcpus")
        };
        assert_eq!((v.offline, v.online), (vec![1, 2], vec![3]));
        let cli = parse(&["time", "--sync", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Time(ops::TimeArgs { sync: true, .. })
        ));
        let cli = parse(&[
            "ssh-keys",
            "add",
            "alice",
            "ssh-ed25519 AAAA x",
            "--file",
            "-",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::SshKeys {
                action: ops::KeysCmd::Add(_)
            }
        ));
        for bad in [
            &["time", "--sync", "--from-rtc"][..],
            &["fsfreeze"],
            &["passwd"],
            &["vcpus", "--online", "x"],
            &["ssh-keys", "get"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        let cases: &[&[&str]] = &[
            &[],
            &["exec"],
            &["frobnicate"],
            &["write", "/tmp/x", "--permissions", "0999"],
            &["write", "/tmp/x", "--mode", "sideways"],
            &["exec", "--env", "NOEQUALS", "--", "true"],
            &["read", "/tmp/x"],
            &["completions", "tcsh"],
        ];
        for args in cases {
            assert!(parse(args).is_err(), "{args:?} should not parse");
        }
    }

    #[test]
    fn permissions_and_env_parsers() {
        assert_eq!(parse_permissions("644"), Ok(0o644));
        assert_eq!(parse_permissions("0o755"), Ok(0o755));
        assert!(parse_permissions("").is_err());
        assert!(parse_permissions("17777").is_err());
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("=x").is_err());
    }

    #[test]
    fn exit_codes_follow_the_table() {
        use agent_common::error::ErrorObject;
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let cases: Vec<(CliError, i32)> = vec![
            (
                ClientError::Agent {
                    method: "file_read".into(),
                    error: ErrorObject::new(ErrorKind::PolicyDenied, "no"),
                }
                .into(),
                1,
            ),
            (CliError::NoTarget, 2),
            (
                ClientError::Connect {
                    path: "/x".into(),
                    source: io(),
                }
                .into(),
                3,
            ),
            (ClientError::ConnectionLost.into(), 3),
            (
                ClientError::Timeout {
                    method: "ping".into(),
                    after: Duration::from_secs(1),
                }
                .into(),
                4,
            ),
            (ClientError::Protocol("x".into()).into(), 5),
            (
                ClientError::LocalFile {
                    path: "/x".into(),
                    source: io(),
                }
                .into(),
                6,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.exit_code(), code, "{e:?}");
        }
    }

    #[test]
    fn error_lines_name_the_failure_the_cause_and_a_hint() {
        let e: CliError = ClientError::Connect {
            path: "/run/vm.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        }
        .into();
        let m = e.message();
        assert!(
            m.starts_with("cannot connect to the agent socket /run/vm.sock: "),
            "{m}"
        );
        assert!(m.contains("channel-xml"), "{m}");
        let e: CliError = ClientError::Agent {
            method: "file_read".into(),
            error: agent_common::error::ErrorObject::new(
                ErrorKind::PolicyDenied,
                "path is outside allowed_read_paths",
            ),
        }
        .into();
        let m = e.message();
        assert!(m.contains("path is outside allowed_read_paths"), "{m}");
        assert!(m.contains("security.allowed_read_paths"), "{m}");
    }

    #[test]
    fn exec_status_mapping() {
        let r = |exit_code, signal, timed_out| ExecResult {
            exit_code,
            signal,
            stdout: String::new(),
            stderr: String::new(),
            encoding: Encoding::Base64,
            stdout_truncated: false,
            stderr_truncated: false,
            timed_out,
            duration_ms: 1,
        };
        assert_eq!(exec_exit_code(&r(Some(0), None, false)), 0);
        assert_eq!(exec_exit_code(&r(Some(3), None, false)), 3);
        assert_eq!(exec_exit_code(&r(None, Some(9), false)), 137);
        assert_eq!(exec_exit_code(&r(None, Some(9), true)), 124);
        assert_eq!(exec_exit_code(&r(None, None, false)), 255);
    }
}
