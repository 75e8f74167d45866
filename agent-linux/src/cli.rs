//! Command line and process life cycle of `kvmmanager-agent`.
//!
//! Exit codes: 0 stopped cleanly (or `--check-config` found the config
//! valid); 1 a runtime failure (transport, logging); 2 usage error;
//! 78 the configuration is invalid (`EX_CONFIG`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, LogLevel, DEFAULT_CONFIG_PATH};
use crate::dispatch::Agent;
use crate::qga::QgaState;
use crate::{files, logging, transport};

/// Time requests get to finish after SIGTERM before they are cancelled.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Time cancelled requests get to send their `shutting_down` replies.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Exit code for an invalid configuration (sysexits `EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 78;

/// The command line, parsed by hand: six flags do not need an argument
/// parser that was a tenth of the agent's binary (clap, about 200 KB).
const USAGE: &str = "\
kvmmanager-agent: the kvmmanager guest agent. Answers JSON-RPC 2.0 requests
from the host over a virtio-serial port, within the policy of its
configuration.

Usage: kvmmanager-agent [OPTIONS]

Options:
      --config FILE        Configuration file [default: /etc/kvmmanager-agent/config.json]
      --foreground         Stay in the foreground (for systemd and containers);
                           without it the agent detaches from the terminal and
                           logs only to log_file
      --log-level LEVEL    Override the configured log level (error, warn, info,
                           debug, trace)
      --device PATH        Serve this virtio-serial device instead of finding
                           the port named channel_name under /sys/class/virtio-ports
      --listen unix:PATH   Serve clients on a Unix socket instead, for local use
                           and tests; with --device as well, serve both
      --listen qga:unix:PATH
                           Serve the QEMU guest agent protocol on a Unix socket
                           (as qemu-ga -m unix-listen); may be given beside
                           --listen unix:PATH
      --check-config       Validate the configuration, print a summary, and exit
  -h, --help               Print help
  -V, --version            Print version
";

/// The parsed command line.
#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    /// Configuration file.
    pub config: PathBuf,
    /// Stay in the foreground.
    pub foreground: bool,
    /// Override of the configured log level.
    pub log_level: Option<LogLevel>,
    /// The virtio-serial device to serve instead of the named port.
    pub device: Option<PathBuf>,
    /// A Unix socket to serve (`unix:PATH`).
    pub listen: Option<PathBuf>,
    /// A Unix socket to serve in qemu-ga's protocol (`qga:unix:PATH`).
    pub listen_qga: Option<PathBuf>,
    /// Validate the configuration and exit.
    pub check_config: bool,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Run (or check the configuration) with these arguments.
    Run(Args),
    /// Print the help.
    Help,
    /// Print the version.
    Version,
}

/// A command line that cannot be used; printed with the usage, exit 2.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    /// An argument the agent does not take.
    #[error("unexpected argument {0:?}")]
    Unknown(String),
    /// An option without its value.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    /// An option given a value it does not take.
    #[error("{option} takes no value (got {value:?})")]
    UnexpectedValue {
        /// The option.
        option: &'static str,
        /// The value given.
        value: String,
    },
    /// An option given twice.
    #[error("{0} given more than once")]
    Repeated(&'static str),
    /// A value the option does not accept.
    #[error("invalid value {value:?} for {option}: {reason}")]
    Invalid {
        /// The option.
        option: &'static str,
        /// The value given.
        value: String,
        /// What was expected.
        reason: String,
    },
}

impl Args {
    /// Parses the arguments after the program name (`--opt VALUE` and
    /// `--opt=VALUE` alike).
    pub fn parse_from<I: IntoIterator<Item = String>>(args: I) -> Result<Invocation, UsageError> {
        let mut parsed = Args {
            config: PathBuf::from(DEFAULT_CONFIG_PATH),
            foreground: false,
            log_level: None,
            device: None,
            listen: None,
            listen_qga: None,
            check_config: false,
        };
        let mut config_seen = false;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let mut value = |option: &'static str| -> Result<String, UsageError> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => args.next().ok_or(UsageError::MissingValue(option)),
                }
            };
            let flag = |option: &'static str, slot: &mut bool| -> Result<(), UsageError> {
                if let Some(v) = &inline {
                    return Err(UsageError::UnexpectedValue {
                        option,
                        value: v.clone(),
                    });
                }
                if std::mem::replace(slot, true) {
                    return Err(UsageError::Repeated(option));
                }
                Ok(())
            };
            match name.as_str() {
                "-h" | "--help" => return Ok(Invocation::Help),
                "-V" | "--version" => return Ok(Invocation::Version),
                "--foreground" => flag("--foreground", &mut parsed.foreground)?,
                "--check-config" => flag("--check-config", &mut parsed.check_config)?,
                "--config" => {
                    if std::mem::replace(&mut config_seen, true) {
                        return Err(UsageError::Repeated("--config"));
                    }
                    parsed.config = PathBuf::from(value("--config")?);
                }
                "--log-level" => {
                    let v = value("--log-level")?;
                    let level = parse_level(&v).map_err(|reason| UsageError::Invalid {
                        option: "--log-level",
                        value: v,
                        reason,
                    })?;
                    if parsed.log_level.replace(level).is_some() {
                        return Err(UsageError::Repeated("--log-level"));
                    }
                }
                "--device" => {
                    let v = PathBuf::from(value("--device")?);
                    if parsed.device.replace(v).is_some() {
                        return Err(UsageError::Repeated("--device"));
                    }
                }
                "--listen" => {
                    let v = value("--listen")?;
                    let (qga, path) = parse_listen(&v).map_err(|reason| UsageError::Invalid {
                        option: "--listen",
                        value: v,
                        reason,
                    })?;
                    let slot = if qga {
                        &mut parsed.listen_qga
                    } else {
                        &mut parsed.listen
                    };
                    if slot.replace(path).is_some() {
                        return Err(UsageError::Repeated("--listen"));
                    }
                }
                _ => return Err(UsageError::Unknown(arg)),
            }
        }
        Ok(Invocation::Run(parsed))
    }
}

fn parse_level(s: &str) -> Result<LogLevel, String> {
    match s {
        "error" => Ok(LogLevel::Error),
        "warn" => Ok(LogLevel::Warn),
        "info" => Ok(LogLevel::Info),
        "debug" => Ok(LogLevel::Debug),
        "trace" => Ok(LogLevel::Trace),
        _ => Err("expected one of error, warn, info, debug, trace".into()),
    }
}

/// `unix:PATH` (JSON-RPC) or `qga:unix:PATH` (qemu-ga's protocol): whether
/// it is the latter, and the path.
fn parse_listen(s: &str) -> Result<(bool, PathBuf), String> {
    let (qga, rest) = match s.strip_prefix("qga:") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    match rest.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Ok((qga, PathBuf::from(p))),
        _ => Err("expected unix:PATH or qga:unix:PATH".into()),
    }
}

fn print_chain(what: &str, err: &dyn std::error::Error) {
    eprintln!("kvmmanager-agent: {what}: {}", crate::error::chain(err));
}

/// Runs the agent; returns the process exit code.
pub fn main() -> ExitCode {
    let args = match Args::parse_from(std::env::args().skip(1)) {
        Ok(Invocation::Run(args)) => args,
        Ok(Invocation::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Version) => {
            println!("kvmmanager-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("kvmmanager-agent: error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            print_chain("invalid configuration", &e);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(level) = args.log_level {
        config.log_level = level;
    }
    if args.check_config {
        let s = &config.security;
        println!("configuration {} is valid", args.config.display());
        println!("  allowed_read_paths:  {:?}", s.allowed_read_paths);
        println!("  allowed_write_paths: {:?}", s.allowed_write_paths);
        match &s.command_whitelist {
            Some(list) => println!("  command_whitelist:   {list:?}"),
            None => println!("  command_whitelist:   any command"),
        }
        println!("  max_file_size:       {} bytes", s.max_file_size);
        println!(
            "  memory bound:        {} bytes with one host (SECURITY.md)",
            crate::server::memory_bound(&config, 1)
        );
        return ExitCode::SUCCESS;
    }
    if !args.foreground {
        if config.log_file.is_none() {
            eprintln!(
                "kvmmanager-agent: running detached without log_file: logs are lost \
                 (set log_file, or use --foreground under systemd)"
            );
        }
        if let Err(e) = nix::unistd::daemon(false, false) {
            print_chain("could not detach (use --foreground)", &e);
            return ExitCode::FAILURE;
        }
    }
    if let Err(e) = logging::init(config.log_level, config.log_file.as_deref()) {
        print_chain("could not set up logging", &e);
        return ExitCode::FAILURE;
    }
    if let Some(path) = &config.audit_file {
        if let Err(e) = logging::open_audit(path) {
            print_chain("could not open the audit file", &e);
            return ExitCode::FAILURE;
        }
    }
    crate::buffers::use_one_heap();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            print_chain("could not start the runtime", &e);
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args, config))
}

async fn run(args: Args, config: Config) -> ExitCode {
    for warning in files::prepare_roots(&config) {
        warn!("{warning}");
    }
    // Before serving: the sweep must not meet this agent's own uploads.
    let sweep = files::remove_stale_staging(&config);
    for file in &sweep.removed {
        info!(file = %file, "removed a stale staging file");
    }
    if sweep.truncated {
        warn!(
            visited = sweep.visited,
            "stale staging file sweep stopped at its limit of {} entries",
            files::SWEEP_MAX_ENTRIES
        );
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %args.config.display(),
        "kvmmanager-agent starting"
    );
    // Once, before any command: may move the agent into a leaf cgroup.
    crate::cgroup::init(config.command_limits());
    let agent = Agent::new(config);
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "could not install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let mut transports = tokio::task::JoinSet::new();
    // One state for every qemu-ga session: guest-exec results outlive the
    // connection that started them, as in qemu-ga.
    let qga = transport::Dialect::Qga(Arc::new(QgaState::default()));
    if let Some(path) = args.listen.clone() {
        transports.spawn(transport::serve_unix(
            agent.clone(),
            transport::Dialect::JsonRpc,
            path,
            stop.clone(),
            tracker.clone(),
        ));
    }
    if let Some(path) = args.listen_qga.clone() {
        transports.spawn(transport::serve_unix(
            agent.clone(),
            qga.clone(),
            path,
            stop.clone(),
            tracker.clone(),
        ));
    }
    let listening = args.listen.is_some() || args.listen_qga.is_some();
    if !listening || args.device.is_some() {
        transports.spawn(transport::serve_port(
            agent.clone(),
            transport::Dialect::JsonRpc,
            agent.config().channel_name.clone(),
            args.device.clone(),
            stop.clone(),
            tracker.clone(),
        ));
    }
    if let (false, Some(name)) = (listening, agent.config().qemu_ga_channel_name.clone()) {
        transports.spawn(transport::serve_port(
            agent.clone(),
            qga,
            name,
            None,
            stop.clone(),
            tracker.clone(),
        ));
    }
    let mut code = ExitCode::SUCCESS;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received; stopping"),
        _ = int.recv() => info!("SIGINT received; stopping"),
        Some(done) = transports.join_next() => {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    error!(error = %crate::error::chain(&e), "transport failed");
                    code = ExitCode::FAILURE;
                }
                Err(e) => {
                    error!(error = %e, "transport task failed");
                    code = ExitCode::FAILURE;
                }
            }
        }
    }
    // First of all: a stopping agent never leaves the guest frozen, and
    // nothing below (discarding uploads) may meet a frozen filesystem.
    agent.thaw_at_exit().await;
    stop.cancel();
    while transports.join_next().await.is_some() {}
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!("requests still running after the grace period; cancelling them");
        agent.abort_all();
        let _ = tokio::time::timeout(CANCEL_GRACE, tracker.wait()).await;
    }
    agent.abort_all();
    info!("kvmmanager-agent stopped");
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_and_level_parse() {
        assert_eq!(
            parse_listen("unix:/tmp/s").unwrap(),
            (false, PathBuf::from("/tmp/s"))
        );
        assert_eq!(
            parse_listen("qga:unix:/tmp/q").unwrap(),
            (true, PathBuf::from("/tmp/q"))
        );
        assert!(parse_listen("tcp:1.2.3.4:5").is_err());
        assert!(parse_listen("unix:").is_err());
        assert!(parse_listen("qga:unix:").is_err());
        assert!(parse_listen("qga:").is_err());
        assert_eq!(parse_level("debug").unwrap(), LogLevel::Debug);
        assert!(parse_level("loud").is_err());
    }

    fn parse(args: &[&str]) -> Result<Invocation, UsageError> {
        Args::parse_from(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn the_command_line_parses_both_value_forms_and_refuses_the_rest() {
        let Ok(Invocation::Run(a)) = parse(&[]) else {
            panic!("no arguments run with the defaults")
        };
        assert_eq!(a.config, PathBuf::from(DEFAULT_CONFIG_PATH));
        assert!(!a.foreground && !a.check_config && a.listen.is_none());
        let Ok(Invocation::Run(a)) = parse(&[
            "--foreground",
            "--config",
            "/c.json",
            "--log-level=debug",
            "--listen",
            "unix:/s",
            "--listen=qga:unix:/q",
            "--device=/dev/vport0p1",
            "--check-config",
        ]) else {
            panic!("a full command line")
        };
        assert_eq!(
            a,
            Args {
                config: "/c.json".into(),
                foreground: true,
                log_level: Some(LogLevel::Debug),
                device: Some("/dev/vport0p1".into()),
                listen: Some("/s".into()),
                listen_qga: Some("/q".into()),
                check_config: true,
            }
        );
        assert_eq!(parse(&["--help"]), Ok(Invocation::Help));
        assert!(USAGE.contains(&format!("[default: {DEFAULT_CONFIG_PATH}]")));
        assert_eq!(parse(&["-V"]), Ok(Invocation::Version));
        let cases: &[(&[&str], UsageError)] = &[
            (&["--nope"], UsageError::Unknown("--nope".into())),
            (&["x"], UsageError::Unknown("x".into())),
            (&["--config"], UsageError::MissingValue("--config")),
            (
                &["--foreground=yes"],
                UsageError::UnexpectedValue {
                    option: "--foreground",
                    value: "yes".into(),
                },
            ),
            (
                &["--foreground", "--foreground"],
                UsageError::Repeated("--foreground"),
            ),
            (
                &["--config", "a", "--config=b"],
                UsageError::Repeated("--config"),
            ),
            (
                &["--log-level", "loud"],
                UsageError::Invalid {
                    option: "--log-level",
                    value: "loud".into(),
                    reason: "expected one of error, warn, info, debug, trace".into(),
                },
            ),
            (
                &["--listen=tcp:1"],
                UsageError::Invalid {
                    option: "--listen",
                    value: "tcp:1".into(),
                    reason: "expected unix:PATH or qga:unix:PATH".into(),
                },
            ),
            (
                &[
                    "--listen=qga:unix:/a",
                    "--listen=unix:/b",
                    "--listen=qga:unix:/c",
                ],
                UsageError::Repeated("--listen"),
            ),
        ];
        for (args, want) in cases {
            assert_eq!(parse(args).unwrap_err(), *want, "{args:?}");
        }
    }
}
