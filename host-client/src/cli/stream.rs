//! The streaming commands of `kvmmanager-ctl`: `exec --stream` (output as
//! it comes, our stdin passed through) and `shell` (a terminal session in
//! raw mode that follows our window's size).

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;

use agent_common::methods::ExecExitParams;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{CliError, ExecArgs, EXIT_EXEC_TIMEOUT};
use crate::{Client, ExecRequest, Pty, StreamReader, StreamWriter};

/// Arguments of `shell`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShellArgs {
    /// Working directory in the guest.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Set an environment variable for the command (repeatable).
    #[arg(short, long = "env", value_name = "K=V", value_parser = super::parse_env)]
    pub env: Vec<(String, String)>,
    /// The command and its arguments; default: the agent's shell_command.
    #[arg(num_args = 0.., trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// The exit status of a streamed command, as `exec` reports it.
pub(super) fn exit_code(e: &ExecExitParams) -> i32 {
    if e.timed_out {
        EXIT_EXEC_TIMEOUT
    } else if let Some(code) = e.exit_code {
        code
    } else if let Some(sig) = e.signal {
        128 + sig
    } else {
        super::EXIT_EXEC_FAILED
    }
}

fn local(what: &'static str) -> impl Fn(std::io::Error) -> CliError {
    move |source| CliError::Local {
        what: what.into(),
        source,
    }
}

/// Our stdin, read by a thread of its own (a read of a terminal cannot be
/// cancelled; the thread ends with the process), in chunks; `None` at end
/// of input.
fn stdin_chunks() -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let r = match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => Ok(buf[..n].to_vec()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = r.is_err();
            if tx.blocking_send(r).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// Passes our stdin to `stdin`; with `close`, closes it at our end of
/// input.
async fn pump_stdin(mut stdin: StreamWriter, close: bool) -> Result<(), CliError> {
    let mut chunks = stdin_chunks();
    while let Some(chunk) = chunks.recv().await {
        let chunk = chunk.map_err(local("cannot read stdin"))?;
        stdin
            .write_all(&chunk)
            .await
            .map_err(local("cannot send stdin to the command"))?;
    }
    if close {
        stdin
            .shutdown()
            .await
            .map_err(local("cannot close the command's stdin"))?;
    }
    Ok(())
}

/// Copies a stream to one of our outputs as it comes.
async fn pump_out(mut from: StreamReader, mut to: impl Write) -> Result<(), CliError> {
    while let Some(chunk) = from
        .read_chunk()
        .await
        .map_err(local("the command's output stream failed"))?
    {
        to.write_all(&chunk)
            .and_then(|()| to.flush())
            .map_err(local("cannot write the output"))?;
    }
    Ok(())
}

/// `exec --stream`.
pub(super) async fn exec(client: &Client, args: ExecArgs) -> Result<i32, CliError> {
    let mut words = args.command.into_iter();
    let req = ExecRequest {
        command: words.next(),
        args: words.collect(),
        env: args.env.into_iter().collect(),
        cwd: args.cwd,
        timeout_seconds: args.timeout,
        separate_stderr: true,
        ..ExecRequest::default()
    };
    let run = client.exec_start(req).await?;
    let stdin = run.stdin;
    // Our stdin goes to the command while it runs; a command that does not
    // read it does not wait for it.
    let feed = tokio::spawn(async move { pump_stdin(stdin, true).await });
    let out = pump_out(run.stdout, std::io::stdout());
    let err = async {
        match run.stderr {
            Some(e) => pump_out(e, std::io::stderr()).await,
            None => Ok(()),
        }
    };
    let (o, e) = tokio::join!(out, err);
    o?;
    e?;
    let exit = run.control.wait().await?;
    feed.abort();
    if exit.timed_out {
        eprintln!(
            "kvmmanager-ctl: warning: the command timed out after {} ms and was killed",
            exit.duration_ms
        );
    }
    Ok(exit_code(&exit))
}

/// Puts our terminal in raw mode and restores it when dropped, however
/// the session ends (exit, error, a signal that ends the runtime's work,
/// a panic).
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Result<Option<RawMode>, CliError> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = tcgetattr(stdin.as_fd()).map_err(|e| CliError::Local {
            what: "cannot read the terminal's settings".into(),
            source: e.into(),
        })?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).map_err(|e| CliError::Local {
            what: "cannot put the terminal in raw mode".into(),
            source: e.into(),
        })?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// `shell`.
pub(super) async fn shell(client: &Client, args: ShellArgs) -> Result<i32, CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let (rows, cols) = super::term::size().unwrap_or((24, 80));
    let mut words = args.command.into_iter();
    let req = ExecRequest {
        command: words.next(),
        args: words.collect(),
        env: args.env.into_iter().collect(),
        cwd: args.cwd,
        pty: Some(Pty {
            rows,
            cols,
            term: std::env::var("TERM").ok().filter(|t| !t.is_empty()),
        }),
        ..ExecRequest::default()
    };
    let mut winch = signal(SignalKind::window_change()).map_err(local("cannot watch SIGWINCH"))?;
    let mut term = signal(SignalKind::terminate()).map_err(local("cannot watch SIGTERM"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(local("cannot watch SIGHUP"))?;
    let run = client.exec_start(req).await?;
    let raw = RawMode::enter()?;
    let feed = tokio::spawn(pump_stdin(run.stdin, false));
    let screen = pump_out(run.stdout, std::io::stdout());
    tokio::pin!(screen);
    let control = run.control.clone();
    let ended = loop {
        tokio::select! {
            r = &mut screen => break r,
            Some(()) = winch.recv() => {
                if let Some((rows, cols)) = super::term::size() {
                    // A resize that fails (the command just ended) is harmless.
                    let _ = control.resize(rows, cols).await;
                }
            }
            Some(()) = term.recv() => break Err(CliError::Interrupted),
            Some(()) = hup.recv() => break Err(CliError::Interrupted),
        }
    };
    feed.abort();
    drop(raw);
    ended?;
    let exit = run.control.wait().await?;
    Ok(exit_code(&exit))
}

/// `logs -f`.
pub(super) async fn follow_logs(
    client: &Client,
    path: &str,
    lines: u32,
    grep: Option<&str>,
) -> Result<i32, CliError> {
    let log = client.follow_log(path, Some(lines), grep).await?;
    pump_out(log, std::io::stdout()).await?;
    Ok(super::EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        let spec = |b: &str, l, h: &str, g| ForwardSpec {
            bind: b.into(),
            local_port: l,
            guest_host: h.into(),
            guest_port: g,
        };
        assert_eq!(
            parse_forward("8080:127.0.0.1:80"),
            Ok(spec("127.0.0.1", 8080, "127.0.0.1", 80))
        );
        assert_eq!(
            parse_forward("0.0.0.0:0:10.0.0.2:443"),
            Ok(spec("0.0.0.0", 0, "10.0.0.2", 443))
        );
        assert_eq!(
            parse_forward("[::1]:8080:[::1]:80"),
            Ok(spec("::1", 8080, "::1", 80))
        );
        for bad in [
            "80",
            "8080:80",
            "x:1.2.3.4:80",
            "1:1.2.3.4:0",
            "1:2:3:4:5",
            "1:h:99999",
        ] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exit_codes() {
        let e = |exit_code, signal, timed_out| ExecExitParams {
            stream: 1,
            exit_code,
            signal,
            timed_out,
            duration_ms: 0,
        };
        assert_eq!(exit_code(&e(Some(0), None, false)), 0);
        assert_eq!(exit_code(&e(Some(7), None, false)), 7);
        assert_eq!(exit_code(&e(None, Some(15), false)), 143);
        assert_eq!(exit_code(&e(None, Some(9), true)), 124);
        assert_eq!(exit_code(&e(None, None, false)), 255);
    }
}

/// What `forward` listens on and where it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    /// The local address to listen on (default 127.0.0.1).
    pub bind: String,
    /// The local port.
    pub local_port: u16,
    /// The guest address (an IP address).
    pub guest_host: String,
    /// The guest port.
    pub guest_port: u16,
}

/// Parses `[BIND:]LOCALPORT:GUESTHOST:GUESTPORT` (IPv6 addresses in
/// brackets).
pub fn parse_forward(text: &str) -> Result<ForwardSpec, String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ':' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    let unbracket = |s: &str| {
        s.strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(s)
            .to_owned()
    };
    let port = |s: &str, what: &str| {
        s.parse::<u16>()
            .map_err(|_| format!("{what} {s:?} is not a port number (0 to 65535)"))
    };
    let (bind, rest) = match parts.len() {
        3 => ("127.0.0.1".to_owned(), &parts[..]),
        4 => (unbracket(parts[0]), &parts[1..]),
        _ => {
            return Err(format!(
                "{text:?} is not [BIND:]LOCALPORT:GUESTHOST:GUESTPORT (e.g. 8080:127.0.0.1:80)"
            ))
        }
    };
    let guest_port = port(rest[2], "GUESTPORT")?;
    if guest_port == 0 {
        return Err("GUESTPORT must not be 0".into());
    }
    Ok(ForwardSpec {
        bind,
        local_port: port(rest[0], "LOCALPORT")?,
        guest_host: unbracket(rest[1]),
        guest_port,
    })
}

/// Arguments of `forward`.
#[derive(Debug, Clone, clap::Args)]
pub struct ForwardArgs {
    /// Listen on BIND:LOCALPORT (BIND defaults to 127.0.0.1) and connect each
    /// connection to GUESTHOST:GUESTPORT inside the guest.
    #[arg(value_name = "[BIND:]LOCALPORT:GUESTHOST:GUESTPORT", value_parser = parse_forward)]
    pub spec: ForwardSpec,
}

/// `forward`: listens until interrupted; one stream per connection.
pub(super) async fn forward(client: &Client, args: ForwardArgs) -> Result<i32, CliError> {
    let spec = args.spec;
    let listener = tokio::net::TcpListener::bind((spec.bind.as_str(), spec.local_port))
        .await
        .map_err(local("cannot listen on the local address"))?;
    let here = listener
        .local_addr()
        .map_err(local("cannot read the local address"))?;
    eprintln!(
        "kvmmanager-ctl: forwarding {here} to {}:{} in the guest (Ctrl-C to stop)",
        spec.guest_host, spec.guest_port
    );
    loop {
        let (socket, peer) = listener
            .accept()
            .await
            .map_err(local("cannot accept a connection"))?;
        let client = client.clone();
        let (host, port) = (spec.guest_host.clone(), spec.guest_port);
        tokio::spawn(async move {
            let _ = socket.set_nodelay(true);
            let guest = match client.forward_open(&host, port).await {
                Ok(g) => g,
                Err(e) => {
                    // Dropping the socket tells the local client.
                    eprintln!("kvmmanager-ctl: forward: {peer} to {host}:{port}: {e}");
                    return;
                }
            };
            let (mut from_local, mut to_local) = socket.into_split();
            let (mut from_guest, mut to_guest) = (guest.reader, guest.writer);
            let up = async {
                let _ = tokio::io::copy(&mut from_local, &mut to_guest).await;
                let _ = to_guest.shutdown().await;
            };
            let down = async {
                let _ = tokio::io::copy(&mut from_guest, &mut to_local).await;
                let _ = to_local.shutdown().await;
            };
            tokio::join!(up, down);
        });
    }
}
