//! Command line and process life cycle of `kvmmanager-agent`.
//!
//! Exit codes: 0 stopped cleanly (or `--check-config` found the config
//! valid); 1 a runtime failure (transport, logging); 2 usage error;
//! 78 the configuration is invalid (`EX_CONFIG`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, LogLevel, DEFAULT_CONFIG_PATH};
use crate::dispatch::Agent;
use crate::{files, logging, transport};

/// Time requests get to finish after SIGTERM before they are cancelled.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Time cancelled requests get to send their `shutting_down` replies.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Exit code for an invalid configuration (sysexits `EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 78;

/// The kvmmanager guest agent: answers JSON-RPC 2.0 requests from the host
/// over a virtio-serial port, within the policy of its configuration.
#[derive(Debug, Parser)]
#[command(name = "kvmmanager-agent", version, about, long_about = None)]
pub struct Args {
    /// Configuration file.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Stay in the foreground (for systemd and containers); without it the
    /// agent detaches from the terminal and logs only to `log_file`.
    #[arg(long)]
    pub foreground: bool,
    /// Override the configured log level (error, warn, info, debug, trace).
    #[arg(long, value_name = "LEVEL", value_parser = parse_level)]
    pub log_level: Option<LogLevel>,
    /// Serve this virtio-serial device instead of finding the port named
    /// `channel_name` under /sys/class/virtio-ports.
    #[arg(long, value_name = "PATH")]
    pub device: Option<PathBuf>,
    /// Serve clients on a Unix socket instead (`unix:PATH`), for local use
    /// and tests. With --device as well, serve both.
    #[arg(long, value_name = "unix:PATH", value_parser = parse_listen)]
    pub listen: Option<PathBuf>,
    /// Validate the configuration, print a summary, and exit.
    #[arg(long)]
    pub check_config: bool,
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

fn parse_listen(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err("expected unix:PATH".into()),
    }
}

fn print_chain(what: &str, err: &dyn std::error::Error) {
    eprintln!("kvmmanager-agent: {what}: {}", crate::error::chain(err));
}

/// Runs the agent; returns the process exit code.
pub fn main() -> ExitCode {
    let args = Args::parse();
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
    if let Some(path) = args.listen.clone() {
        transports.spawn(transport::serve_unix(
            agent.clone(),
            path,
            stop.clone(),
            tracker.clone(),
        ));
    }
    if args.listen.is_none() || args.device.is_some() {
        transports.spawn(transport::serve_port(
            agent.clone(),
            args.device.clone(),
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
            PathBuf::from("/tmp/s")
        );
        assert!(parse_listen("tcp:1.2.3.4:5").is_err());
        assert!(parse_listen("unix:").is_err());
        assert_eq!(parse_level("debug").unwrap(), LogLevel::Debug);
        assert!(parse_level("loud").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
