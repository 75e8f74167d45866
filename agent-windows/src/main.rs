//! `kvmmanager-agent-windows`: the Windows guest agent (stub).
//!
//! On Windows, with no arguments, it runs as the `kvmmanager-agent` service
//! (or in the foreground when started from a console) on the port
//! `\\.\Global\org.kvmmanager.agent.0`. On every platform `--stdio` serves
//! the protocol on stdin/stdout, for tests.

use std::process::ExitCode;

use agent_windows::{serve, Dispatcher};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--stdio"] => {
            let stdin = std::io::stdin().lock();
            let stdout = std::io::stdout().lock();
            match serve(&Dispatcher::default(), stdin, stdout) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kvmmanager-agent-windows: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        ["--version"] => {
            println!("kvmmanager-agent-windows {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        [] => run_default(),
        _ => {
            eprintln!("usage: kvmmanager-agent-windows [--stdio | --version]");
            ExitCode::from(2)
        }
    }
}

#[cfg(windows)]
fn run_default() -> ExitCode {
    agent_windows::service::run()
}

#[cfg(not(windows))]
fn run_default() -> ExitCode {
    eprintln!(
        "kvmmanager-agent-windows serves Windows guests on {}; \
         on this platform only --stdio is available (use kvmmanager-agent on Linux)",
        agent_windows::WINDOWS_PORT_PATH
    );
    ExitCode::FAILURE
}
