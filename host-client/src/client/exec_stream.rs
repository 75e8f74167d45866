//! Streamed commands: [`Client::exec_start`] and what it returns (stdin as
//! an [`AsyncWrite`](tokio::io::AsyncWrite), output as
//! [`AsyncRead`](tokio::io::AsyncRead)s, signals, resizes and the exit).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use agent_common::methods::{
    ExecExitParams, ExecResizeParams, ExecResizeRpc, ExecSignalParams, ExecSignalRpc,
    ExecStartParams, ExecStartResult, Method, PtyParams,
};

use super::streams::{Handle, Shared, StreamReader, StreamWriter};
use super::{decode, Client};
use crate::error::ClientError;

/// A pseudo-terminal for a streamed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pty {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
    /// `TERM`; `None`: the agent's default (`xterm-256color`).
    pub term: Option<String>,
}

/// What to start with [`Client::exec_start`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// The program; `None` with `pty`: the agent's `shell_command`.
    pub command: Option<String>,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest.
    pub cwd: Option<String>,
    /// Time limit in seconds; `None`: none.
    pub timeout_seconds: Option<u64>,
    /// Run on a pseudo-terminal.
    pub pty: Option<Pty>,
    /// Stderr on a stream of its own (without `pty`); otherwise it is
    /// merged into stdout.
    pub separate_stderr: bool,
    /// Bytes the agent may send on each stream before this side has read
    /// them; `None`: 1 MiB.
    pub window: Option<u64>,
}

impl ExecRequest {
    /// `command` with `args`, on pipes, stderr merged into stdout.
    pub fn new<I, S>(command: &str, args: I) -> ExecRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            command: Some(command.to_owned()),
            args: args.into_iter().map(Into::into).collect(),
            ..ExecRequest::default()
        }
    }
}

/// A running streamed command.
#[derive(Debug)]
pub struct ExecStream {
    /// The command's stdin (on a terminal: its keyboard). Shut it down to
    /// close stdin (on a terminal, send the end-of-file character instead).
    pub stdin: StreamWriter,
    /// Its stdout (with stderr unless separate; on a terminal: the screen).
    pub stdout: StreamReader,
    /// Its stderr, when asked for separately.
    pub stderr: Option<StreamReader>,
    /// Signals, resizes and the exit.
    pub control: ExecControl,
}

/// Signals, resizes and the exit of a streamed command; cheap to clone.
#[derive(Clone)]
pub struct ExecControl {
    client: Client,
    shared: Arc<Shared>,
    // Keeps the stream open while only the control is left.
    _handle: Arc<Handle>,
    pid: u32,
}

impl std::fmt::Debug for ExecControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecControl")
            .field("stream", &self.shared.id())
            .field("pid", &self.pid)
            .finish()
    }
}

impl ExecControl {
    /// The command's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends a signal (`INT`, `TERM`, `KILL`, `HUP`, `QUIT`, `USR1`,
    /// `USR2`, `WINCH`, `STOP`, `CONT`) to the command's process group.
    pub async fn signal(&self, signal: &str) -> Result<(), ClientError> {
        self.client
            .call::<ExecSignalRpc>(&ExecSignalParams {
                stream: self.shared.id(),
                signal: signal.to_owned(),
            })
            .await
            .map(drop)
    }

    /// Resizes the command's terminal.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.client
            .call::<ExecResizeRpc>(&ExecResizeParams {
                stream: self.shared.id(),
                rows,
                cols,
            })
            .await
            .map(drop)
    }

    /// Waits for the command to end: its status, once its output has all
    /// been sent.
    pub async fn wait(&self) -> Result<ExecExitParams, ClientError> {
        self.shared
            .exit()
            .await
            .map_err(|e| ClientError::Protocol(format!("the command's end was not seen: {e}")))
    }
}

/// Stream ids of this process: unique per connection is all the agent
/// asks, and a process-wide counter gives that for every client.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// A fresh stream id, with the next one free too (for a second stream).
pub(super) fn next_stream_id() -> u64 {
    NEXT_STREAM.fetch_add(2, Ordering::Relaxed)
}

impl Client {
    /// Starts a command in the guest whose stdin and output are streams
    /// (`exec_start`): bytes flow as they come, both ways, with flow
    /// control per stream. The command ends with the connection.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// use host_client::ExecRequest;
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// let mut run = client.exec_start(ExecRequest::new("cat", Vec::<String>::new())).await?;
    /// run.stdin.write_all(b"hello\n").await?;
    /// run.stdin.shutdown().await?;
    /// let mut out = String::new();
    /// run.stdout.read_to_string(&mut out).await?;
    /// assert_eq!(out, "hello\n");
    /// assert_eq!(run.control.wait().await?.exit_code, Some(0));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn exec_start(&self, req: ExecRequest) -> Result<ExecStream, ClientError> {
        let conn = self.ready().await?;
        let window = req.window.unwrap_or(super::streams::HOST_WINDOW);
        let table = self.inner.streams.clone();
        let id = next_stream_id();
        let stderr_id = (req.separate_stderr && req.pty.is_none()).then_some(id + 1);
        let main = table.register(id, conn.serial(), window);
        let err = stderr_id.map(|e| table.register(e, conn.serial(), window));
        let params = ExecStartParams {
            command: req.command,
            args: req.args,
            env: req.env,
            cwd: req.cwd,
            timeout_seconds: req.timeout_seconds,
            stream: id,
            stderr_stream: stderr_id,
            pty: req.pty.map(|p| PtyParams {
                rows: p.rows,
                cols: p.cols,
                term: p.term,
            }),
            window: Some(window),
        };
        let method = Method::ExecStart.as_str();
        let started = self
            .request_on_conn(&conn, method, &params)
            .await
            .and_then(|raw| decode::<ExecStartResult>(method, &raw));
        let started = match started {
            Ok(s) => s,
            Err(e) => {
                table.forget(id);
                if let Some(e) = stderr_id {
                    table.forget(e);
                }
                return Err(e);
            }
        };
        main.set_credit(started.window);
        let handle = Arc::new(Handle {
            shared: main.clone(),
            conn: conn.clone(),
            table: table.clone(),
        });
        let stderr = err.map(|shared| {
            StreamReader::new(Arc::new(Handle {
                shared,
                conn: conn.clone(),
                table: table.clone(),
            }))
        });
        Ok(ExecStream {
            stdin: StreamWriter::new(handle.clone()),
            stdout: StreamReader::new(handle.clone()),
            stderr,
            control: ExecControl {
                client: self.clone(),
                shared: main,
                _handle: handle,
                pid: started.pid,
            },
        })
    }
}
