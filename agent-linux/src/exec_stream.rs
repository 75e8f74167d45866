//! Streamed commands (`exec_start`, `exec_signal`, `exec_resize`;
//! PROTOCOL.md): a command started under `exec_command`'s policy
//! (`crate::exec::start_streamed`) whose stdin and output are streams
//! (`crate::streams`), on pipes or a pseudo-terminal.
//!
//! One task per command pumps its descriptors: the host's data to stdin,
//! granting credit back as it is written; output to the host as far as
//! the host's credit allows (a host that stops reading stalls the command's
//! output, and with it, once the pipe is full, the command). When the main
//! process exits, output still in the pipes is sent, what is left of the
//! process group is killed (as for `exec_command`, after a short grace),
//! the streams are closed and `exec_exit` reports the status: the last
//! message of the command. A reset of the stream, the time limit or the
//! end of the session kill the command.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use agent_common::error::ErrorKind;
use agent_common::methods::{
    ExecExitParams, ExecResizeParams, ExecSignalParams, ExecStartParams, ExecStartResult,
    StreamAck, EXEC_EXIT, STREAM_WINDOW,
};
use bytes::{Bytes, BytesMut};
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::error::RpcError;
use crate::exec::{self, ExecError, StreamedStdio, EXIT_GRACE};
use crate::session::{Session, SessionId};
use crate::streams::{Open, Stream, StreamError};

/// The `TERM` of a pseudo-terminal when the host names none.
pub const DEFAULT_TERM: &str = "xterm-256color";

/// The largest number of rows or columns of a pseudo-terminal.
pub const MAX_TERMINAL_SIZE: u16 = 1000;

/// The signals `exec_signal` sends.
const SIGNALS: &[(&str, Signal)] = &[
    ("INT", Signal::SIGINT),
    ("TERM", Signal::SIGTERM),
    ("KILL", Signal::SIGKILL),
    ("HUP", Signal::SIGHUP),
    ("QUIT", Signal::SIGQUIT),
    ("USR1", Signal::SIGUSR1),
    ("USR2", Signal::SIGUSR2),
    ("WINCH", Signal::SIGWINCH),
    ("STOP", Signal::SIGSTOP),
    ("CONT", Signal::SIGCONT),
];

/// Why a streamed command could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum ExecStreamError {
    /// The params are inconsistent.
    #[error("invalid {method} request: {reason}")]
    Invalid {
        /// The method.
        method: &'static str,
        /// Why.
        reason: String,
    },
    /// A stream could not be opened.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The command could not be started.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// No command of this connection runs on that stream.
    #[error(
        "no command of this connection runs on stream {stream} (it ended, or was never started)"
    )]
    NoCommand {
        /// The stream.
        stream: u64,
    },
    /// The signal or resize failed.
    #[error("{what} failed")]
    Control {
        /// What.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl RpcError for ExecStreamError {
    fn kind(&self) -> ErrorKind {
        match self {
            ExecStreamError::Invalid { .. } => ErrorKind::InvalidParams,
            ExecStreamError::Stream(e) => e.kind(),
            ExecStreamError::Exec(e) => e.kind(),
            ExecStreamError::NoCommand { .. } => ErrorKind::NotFound,
            ExecStreamError::Control { source, .. } => crate::error::io_error_kind(source),
        }
    }

    fn data(&self) -> Vec<(&'static str, serde_json::Value)> {
        match self {
            ExecStreamError::Exec(e) => e.data(),
            _ => Vec::new(),
        }
    }
}

/// What the host asks of a running command.
enum Control {
    Signal(Signal, oneshot::Sender<io::Result<()>>),
    Resize(u16, u16, oneshot::Sender<io::Result<()>>),
}

/// The streamed commands running, by connection and stream, for
/// `exec_signal` and `exec_resize`.
#[derive(Default)]
pub struct Execs {
    running: Mutex<HashMap<(SessionId, u64), mpsc::Sender<Control>>>,
}

impl Execs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SessionId, u64), mpsc::Sender<Control>>> {
        // Single inserts, removes and lookups: never inconsistent.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn control(
        &self,
        session: SessionId,
        stream: u64,
        what: &'static str,
        make: impl FnOnce(oneshot::Sender<io::Result<()>>) -> Control,
    ) -> Result<StreamAck, ExecStreamError> {
        let tx = self
            .lock()
            .get(&(session, stream))
            .cloned()
            .ok_or(ExecStreamError::NoCommand { stream })?;
        let (done, result) = oneshot::channel();
        tx.send(make(done))
            .await
            .map_err(|_| ExecStreamError::NoCommand { stream })?;
        result
            .await
            .map_err(|_| ExecStreamError::NoCommand { stream })?
            .map_err(|source| ExecStreamError::Control { what, source })?;
        Ok(StreamAck {})
    }

    /// `exec_signal`.
    pub async fn signal(
        &self,
        session: &Session,
        p: ExecSignalParams,
    ) -> Result<StreamAck, ExecStreamError> {
        let name = p.signal.strip_prefix("SIG").unwrap_or(&p.signal);
        let Some(&(_, signal)) = SIGNALS.iter().find(|(n, _)| *n == name) else {
            let known: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
            return Err(ExecStreamError::Invalid {
                method: "exec_signal",
                reason: format!(
                    "unknown signal {:?}; use one of {}",
                    p.signal,
                    known.join(", ")
                ),
            });
        };
        self.control(session.id(), p.stream, "sending the signal", |done| {
            Control::Signal(signal, done)
        })
        .await
    }

    /// `exec_resize`.
    pub async fn resize(
        &self,
        session: &Session,
        p: ExecResizeParams,
    ) -> Result<StreamAck, ExecStreamError> {
        check_size("exec_resize", p.rows, p.cols)?;
        self.control(session.id(), p.stream, "resizing the terminal", |done| {
            Control::Resize(p.rows, p.cols, done)
        })
        .await
    }

    /// `exec_start`: checks, opens the streams, starts the command and
    /// leaves it to a task of its own.
    pub fn start(
        self: &Arc<Self>,
        config: &Config,
        session: &Session,
        p: ExecStartParams,
    ) -> Result<ExecStartResult, ExecStreamError> {
        let invalid = |reason: String| ExecStreamError::Invalid {
            method: "exec_start",
            reason,
        };
        let credit = crate::streams::host_window(p.window).map_err(invalid)?;
        if p.stderr_stream == Some(p.stream) {
            return Err(invalid("stderr_stream must differ from stream".into()));
        }
        if p.pty.is_some() && p.stderr_stream.is_some() {
            return Err(invalid(
                "a terminal has no separate stderr: drop stderr_stream or pty".into(),
            ));
        }
        if let Some(t) = &p.pty {
            check_size("exec_start", t.rows, t.cols)?;
            if let Some(term) = &t.term {
                if term.is_empty() || term.len() > 64 || !term.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(invalid(format!(
                        "pty.term {term:?} must be 1 to 64 printable ASCII characters"
                    )));
                }
            }
        }
        let command = match (&p.command, &p.pty) {
            (Some(c), _) => c.clone(),
            (None, Some(_)) => config.shell_command.clone(),
            (None, None) => {
                return Err(invalid(
                    "command is required (only a pty session defaults to shell_command)".into(),
                ))
            }
        };
        let mut opens = vec![Open {
            id: p.stream,
            credit,
            window: STREAM_WINDOW,
        }];
        if let Some(id) = p.stderr_stream {
            opens.push(Open {
                id,
                credit,
                window: 0,
            });
        }
        let mut streams = session
            .streams()
            .open_all(&opens, session.notifier())?
            .into_iter();
        // open_all returned one per entry of `opens`, which has at least one.
        let Some(main) = streams.next() else {
            unreachable!("open_all returned fewer streams than asked")
        };
        let stderr = streams.next();
        let stdio = match &p.pty {
            Some(t) => StreamedStdio::Pty {
                rows: t.rows,
                cols: t.cols,
                term: t.term.as_deref().unwrap_or(DEFAULT_TERM),
            },
            None => StreamedStdio::Pipes {
                stderr_apart: stderr.is_some(),
            },
        };
        let child = exec::start_streamed(
            config,
            &command,
            &p.args,
            &p.env,
            p.cwd.as_deref(),
            p.timeout_seconds,
            stdio,
        )?;
        let pid = child.pid();
        let (tx, rx) = mpsc::channel(4);
        let key = (session.id(), p.stream);
        self.lock().insert(key, tx);
        let execs = Arc::clone(self);
        let ended = session.ended().clone();
        let limit = p.timeout_seconds.map(Duration::from_secs);
        tokio::spawn(async move {
            let command = Command {
                child,
                main,
                stderr,
                limit,
                controls: rx,
            };
            tokio::select! {
                () = command.run() => {}
                () = ended.cancelled() => {}
            }
            execs.lock().remove(&key);
        });
        Ok(ExecStartResult {
            stream: p.stream,
            pid,
            window: STREAM_WINDOW,
        })
    }
}

fn check_size(method: &'static str, rows: u16, cols: u16) -> Result<(), ExecStreamError> {
    let ok = |n: u16| (1..=MAX_TERMINAL_SIZE).contains(&n);
    if ok(rows) && ok(cols) {
        return Ok(());
    }
    Err(ExecStreamError::Invalid {
        method,
        reason: format!("rows and cols must be from 1 to {MAX_TERMINAL_SIZE} (got {rows}x{cols})"),
    })
}

/// One running command and its streams.
struct Command {
    child: exec::Streamed,
    main: Stream,
    stderr: Option<Stream>,
    limit: Option<Duration>,
    controls: mpsc::Receiver<Control>,
}

/// Our side of the command's descriptors, as async readers and writers.
pub(crate) type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type Writer = Box<dyn AsyncWrite + Send + Unpin>;

impl Command {
    async fn run(mut self) {
        let started = Instant::now();
        let (input, output, errors, pty) = match self.wire() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "could not watch a streamed command's descriptors; killing it");
                self.child.kill();
                self.main.reset("internal_error").await;
                if let Some(s) = &self.stderr {
                    s.reset("internal_error").await;
                }
                let _ = self.child.finish().await;
                return;
            }
        };
        let stdin = pump_in(self.main.clone(), input, pty.is_some());
        let stdout = pump_out(self.main.clone(), output);
        let stderr = async {
            if let (Some(s), Some(r)) = (&self.stderr, errors) {
                pump_out(s.clone(), r).await;
            }
        };
        let outputs = async { tokio::join!(stdout, stderr) };
        tokio::pin!(stdin, outputs);
        let deadline = self.limit.map(|l| tokio::time::Instant::now() + l);
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        let mut timed_out = false;
        let mut outputs_done = false;
        let mut stdin_done = false;
        // Until the main process exits (or must be killed).
        loop {
            tokio::select! {
                r = self.child.exited() => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "waiting for a streamed command failed; killing it");
                        self.child.kill();
                    }
                    break;
                }
                _ = &mut outputs, if !outputs_done => outputs_done = true,
                _ = &mut stdin, if !stdin_done => stdin_done = true,
                Some(c) = self.controls.recv() => match c {
                    Control::Signal(sig, done) => {
                        let _ = done.send(self.child.signal(sig));
                    }
                    Control::Resize(rows, cols, done) => {
                        let r = match &pty {
                            Some(fd) => crate::sys::set_winsize(fd.get_ref().as_fd(), rows, cols),
                            None => Err(io::Error::other("the command has no terminal (started without pty)")),
                        };
                        let _ = done.send(r);
                    }
                },
                () = &mut expired => {
                    timed_out = true;
                    self.child.kill();
                    break;
                }
                () = self.main.was_reset() => {
                    tracing::debug!(stream = self.main.id(), "stream reset; killing its command");
                    self.child.kill();
                    break;
                }
            }
        }
        if !outputs_done {
            // Descendants may still hold the output: a short grace, then
            // the group goes; what is in the pipes is still sent.
            outputs_done = tokio::time::timeout(EXIT_GRACE, &mut outputs).await.is_ok();
        }
        self.child.kill();
        if !outputs_done {
            tokio::select! {
                _ = &mut outputs => {}
                () = self.main.was_reset() => {}
            }
        }
        let status = self.child.finish().await;
        let _ = self.main.close().await;
        if let Some(s) = &self.stderr {
            let _ = s.close().await;
        }
        use std::os::unix::process::ExitStatusExt;
        let (exit_code, signal) = match &status {
            Ok(s) => (s.code(), s.signal()),
            Err(e) => {
                tracing::warn!(error = %e, "reaping a streamed command failed");
                (None, None)
            }
        };
        let exit = ExecExitParams {
            stream: self.main.id(),
            exit_code,
            signal,
            timed_out,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        tracing::debug!(?exit, "streamed command finished");
        let _ = self.main.send_msg(EXEC_EXIT, &exit, None).await;
    }

    /// Registers the command's descriptors with the runtime.
    #[allow(clippy::type_complexity)]
    fn wire(
        &mut self,
    ) -> io::Result<(
        Option<Writer>,
        Reader,
        Option<Reader>,
        Option<Arc<AsyncFd<crate::sys::PtyFd>>>,
    )> {
        if let Some(master) = self.child.pty.take() {
            let fd = Arc::new(crate::sys::register_pty(master)?);
            return Ok((
                Some(Box::new(Pty(fd.clone()))),
                Box::new(Pty(fd.clone())),
                None,
                Some(fd),
            ));
        }
        let missing = || io::Error::other("a pipe of the command is missing");
        let stdin = self.child.stdin.take().ok_or_else(missing)?;
        let stdout = self.child.stdout.take().ok_or_else(missing)?;
        let input: Writer = Box::new(pipe::Sender::from_owned_fd(stdin)?);
        let output: Reader = Box::new(pipe::Receiver::from_owned_fd(stdout)?);
        let errors = match self.child.stderr.take() {
            Some(fd) => Some(Box::new(pipe::Receiver::from_owned_fd(fd)?) as Reader),
            None => None,
        };
        Ok((Some(input), output, errors, None))
    }
}

/// The host's data to the command's stdin; credit goes back as it is
/// written. Once the command stops reading (its stdin closed), data is
/// dropped and still granted back, so the host never waits on it. At the
/// host's `stream_close` stdin is closed (on a terminal it stays open: the
/// host sends the terminal's end-of-file character instead).
pub(crate) async fn pump_in(stream: Stream, mut input: Option<Writer>, pty: bool) {
    while let Some(data) = stream.recv().await {
        if let Some(w) = &mut input {
            if w.write_all(&data).await.is_err() {
                input = None;
            }
        }
        if stream.grant(data.len() as u64).await.is_err() {
            return;
        }
    }
    if !pty {
        if let Some(mut w) = input.take() {
            let _ = w.shutdown().await;
        }
    } else {
        // Keep the master open: the output side still needs it.
        std::future::pending::<()>().await;
    }
}

/// The command's output to the host, as far as its credit allows; ends at
/// end of output (a terminal's EIO once every process closed it) or when
/// the stream is gone.
pub(crate) async fn pump_out(stream: Stream, mut output: Reader) {
    loop {
        let Ok(room) = stream.writable().await else {
            return;
        };
        let mut buf = BytesMut::zeroed(room);
        let n = match output.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.truncate(n);
        if stream.send(Bytes::from(buf)).await.is_err() {
            return;
        }
    }
}

/// A pseudo-terminal's master side, read and written through the runtime.
struct Pty(Arc<AsyncFd<crate::sys::PtyFd>>);

impl AsyncRead for Pty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // EIO: every process closed the terminal; that is its end.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Pty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
