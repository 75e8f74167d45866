//! A synchronous facade over [`crate::Client`], for callers without tokio.
//!
//! [`Client`] owns a runtime with one worker thread, which keeps reading the
//! connection between calls (so [`Client::as_async`] works from any other
//! runtime too), and blocks the calling thread until each call is done.
//! Called from inside a tokio runtime, where blocking would stall it, its
//! methods return [`ClientError::InsideRuntime`] instead (see the
//! [embedding guide](crate::embedding)).
//!
//! ```no_run
//! # fn demo() -> Result<(), host_client::ClientError> {
//! let client = host_client::blocking::Client::connect("/tmp/vm.sock")?;
//! println!("{}", client.system_info()?.hostname);
//! # Ok(())
//! # }
//! ```
//!
//! Streams ([`Client::exec_start`], [`Client::forward_open`],
//! [`Client::follow_log`]) come as [`Reader`]s and [`Writer`]s, which are
//! [`std::io::Read`] and [`std::io::Write`]; a thread per direction keeps
//! both flowing (the agent's flow control holds a side nobody reads).

use std::io;
use std::path::Path;

use agent_common::methods::{
    AgentInfo, DiskUsage, ExecParams, ExecResult, FileReadParams, FileReadResult, FileWriteParams,
    FileWriteResult, NetworkInfo, PingResult, PowerResult, Rpc, SystemInfo,
};

use agent_common::streams::ExecExitParams;
use tokio_util::io::SyncIoBridge;

use crate::{ClientError, ClientOptions, ExecRequest, Progress, PushOptions, TransferSummary};

/// A blocking client: [`crate::Client`] plus its own runtime.
///
/// ```no_run
/// # fn demo() -> Result<(), host_client::ClientError> {
/// use host_client::blocking::Client;
/// let client = Client::connect("/tmp/vm.sock")?;
/// assert!(client.ping()?.pong);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Client {
    /// `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    inner: crate::Client,
}

impl Drop for Client {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its tasks stop, which panics
        // inside another runtime: there, let them stop in the background.
        if let Some(rt) = self.rt.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            }
        }
    }
}

impl Client {
    /// Connects and syncs with default options.
    ///
    /// ```no_run
    /// let c = host_client::blocking::Client::connect("/tmp/vm.sock");
    /// ```
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_with(path, ClientOptions::default())
    }

    /// Connects and syncs with `opts`.
    ///
    /// ```no_run
    /// use host_client::{blocking::Client, ClientOptions};
    /// let c = Client::connect_with("/tmp/vm.sock", ClientOptions::default());
    /// ```
    pub fn connect_with(
        path: impl AsRef<Path>,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        outside_runtime()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("host-client")
            .enable_all()
            .build()
            .map_err(ClientError::Io)?;
        let inner = rt.block_on(crate::Client::connect_with(path, opts))?;
        Ok(Client {
            rt: Some(rt),
            inner,
        })
    }

    /// Runs `call` to completion on the client's runtime.
    fn block<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        outside_runtime()?;
        self.runtime().block_on(call)
    }

    /// The async client inside, e.g. to spawn work on [`Client::runtime`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// let path = c.as_async().path();
    /// ```
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// The runtime the calls run on.
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// let pong = c.runtime().block_on(c.as_async().ping());
    /// ```
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        match &self.rt {
            Some(rt) => rt,
            // Invariant: only `drop` takes the runtime.
            None => unreachable!("the blocking client's runtime is taken only when it is dropped"),
        }
    }

    /// See [`crate::Client::call`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// use agent_common::methods::{Empty, PingRpc};
    /// let pong = c.call::<PingRpc>(&Empty {});
    /// ```
    pub fn call<M: Rpc>(&self, params: &M::Params) -> Result<M::Result, ClientError> {
        self.block(self.inner.call::<M>(params))
    }

    /// See [`crate::Client::call_raw`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// let v = c.call_raw("ping", serde_json::json!({}));
    /// ```
    pub fn call_raw(
        &self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        self.block(self.inner.call_raw(method, params))
    }

    /// See [`crate::Client::ping`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// c.ping()?;
    /// # Ok::<(), host_client::ClientError>(())
    /// ```
    pub fn ping(&self) -> Result<PingResult, ClientError> {
        self.block(self.inner.ping())
    }

    /// See [`crate::Client::agent_info`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// println!("{}", c.agent_info()?.version);
    /// # Ok::<(), host_client::ClientError>(())
    /// ```
    pub fn agent_info(&self) -> Result<AgentInfo, ClientError> {
        self.block(self.inner.agent_info())
    }

    /// See [`crate::Client::system_info`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// println!("{}", c.system_info()?.hostname);
    /// # Ok::<(), host_client::ClientError>(())
    /// ```
    pub fn system_info(&self) -> Result<SystemInfo, ClientError> {
        self.block(self.inner.system_info())
    }

    /// See [`crate::Client::network_info`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// let n = c.network_info()?.interfaces.len();
    /// # Ok::<(), host_client::ClientError>(())
    /// ```
    pub fn network_info(&self) -> Result<NetworkInfo, ClientError> {
        self.block(self.inner.network_info())
    }

    /// See [`crate::Client::disk_usage`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// let n = c.disk_usage(false)?.filesystems.len();
    /// # Ok::<(), host_client::ClientError>(())
    /// ```
    pub fn disk_usage(&self, include_virtual: bool) -> Result<DiskUsage, ClientError> {
        self.block(self.inner.disk_usage(include_virtual))
    }

    /// See [`crate::Client::exec`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// use agent_common::methods::ExecParams;
    /// let r = c.exec(&ExecParams { command: "true".into(), ..Default::default() })?;
    /// # Ok::<(), host_client::ClientError>(())
    /// ```
    pub fn exec(&self, params: &ExecParams) -> Result<ExecResult, ClientError> {
        self.block(self.inner.exec(params))
    }

    /// See [`crate::Client::read_chunk`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// use agent_common::methods::FileReadParams;
    /// let r = c.read_chunk(&FileReadParams { path: "/etc/hostname".into(), ..Default::default() })?;
    /// # Ok::<(), host_client::ClientError>(())
    /// ```
    pub fn read_chunk(&self, params: &FileReadParams) -> Result<FileReadResult, ClientError> {
        self.block(self.inner.read_chunk(params))
    }

    /// See [`crate::Client::write_chunk`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// use agent_common::methods::FileWriteParams;
    /// c.write_chunk(&FileWriteParams { path: "/tmp/kvmmanager/a".into(), content: "hi".into(), ..Default::default() })?;
    /// # Ok::<(), host_client::ClientError>(())
    /// ```
    pub fn write_chunk(&self, params: &FileWriteParams) -> Result<FileWriteResult, ClientError> {
        self.block(self.inner.write_chunk(params))
    }

    /// See [`crate::Client::pull`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// c.pull("/var/log/syslog", "syslog", |_| {})?;
    /// # Ok::<(), host_client::ClientError>(())
    /// ```
    pub fn pull(
        &self,
        guest_path: &str,
        local_path: impl AsRef<Path>,
        progress: impl FnMut(Progress),
    ) -> Result<TransferSummary, ClientError> {
        self.block(self.inner.pull(guest_path, local_path, progress))
    }

    /// See [`crate::Client::push`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// c.push("a.bin", "/tmp/kvmmanager/a.bin", Default::default(), |_| {})?;
    /// # Ok::<(), host_client::ClientError>(())
    /// ```
    pub fn push(
        &self,
        local_path: impl AsRef<Path>,
        guest_path: &str,
        options: PushOptions,
        progress: impl FnMut(Progress),
    ) -> Result<TransferSummary, ClientError> {
        self.block(self.inner.push(local_path, guest_path, options, progress))
    }

    /// See [`crate::Client::shutdown`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// c.shutdown(0)?;
    /// # Ok::<(), host_client::ClientError>(())
    /// ```
    pub fn shutdown(&self, delay_seconds: u64) -> Result<PowerResult, ClientError> {
        self.block(self.inner.shutdown(delay_seconds))
    }

    /// See [`crate::Client::reboot`].
    ///
    /// ```no_run
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock").unwrap();
    /// c.reboot(0)?;
    /// # Ok::<(), host_client::ClientError>(())
    /// ```
    pub fn reboot(&self, delay_seconds: u64) -> Result<PowerResult, ClientError> {
        self.block(self.inner.reboot(delay_seconds))
    }

    /// See [`crate::Client::exec_start`].
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock")?;
    /// use std::io::{Read, Write};
    /// let mut run = c.exec_start(host_client::ExecRequest::new("cat", Vec::<String>::new()))?;
    /// run.stdin.write_all(b"hello\n")?;
    /// run.stdin.shutdown()?;
    /// let mut out = String::new();
    /// run.stdout.read_to_string(&mut out)?;
    /// assert_eq!(run.control.wait()?.exit_code, Some(0));
    /// # Ok(())
    /// # }
    /// ```
    pub fn exec_start(&self, req: ExecRequest) -> Result<ExecStream, ClientError> {
        let run = self.block(self.inner.exec_start(req))?;
        Ok(ExecStream {
            stdin: self.writer(run.stdin),
            stdout: self.reader(run.stdout),
            stderr: run.stderr.map(|r| self.reader(r)),
            control: ExecControl {
                inner: run.control,
                rt: self.runtime().handle().clone(),
            },
        })
    }

    /// See [`crate::Client::forward_open`].
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock")?;
    /// use std::io::{Read, Write};
    /// let mut web = c.forward_open("127.0.0.1", 80)?;
    /// web.writer.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    /// let mut page = Vec::new();
    /// web.reader.read_to_end(&mut page)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn forward_open(&self, host: &str, port: u16) -> Result<ForwardStream, ClientError> {
        let s = self.block(self.inner.forward_open(host, port))?;
        Ok(ForwardStream {
            reader: self.reader(s.reader),
            writer: self.writer(s.writer),
        })
    }

    /// See [`crate::Client::follow_log`].
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock")?;
    /// use std::io::{BufRead, BufReader};
    /// let log = c.follow_log("/var/log/syslog", Some(10), Some("error"))?;
    /// for line in BufReader::new(log).lines() {
    ///     println!("{}", line?);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn follow_log(
        &self,
        path: &str,
        lines: Option<u32>,
        filter: Option<&str>,
    ) -> Result<Reader, ClientError> {
        let r = self.block(self.inner.follow_log(path, lines, filter))?;
        Ok(self.reader(r))
    }

    /// See [`crate::Client::read_stream`]: the file's bytes from `offset`
    /// and its size.
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// # let c = host_client::blocking::Client::connect("/tmp/vm.sock")?;
    /// let (mut data, size) = c.read_stream("/var/log/syslog", 0)?;
    /// let copied = std::io::copy(&mut data, &mut std::io::sink())?;
    /// assert!(copied <= size);
    /// # Ok(())
    /// # }
    /// ```
    pub fn read_stream(&self, path: &str, offset: u64) -> Result<(Reader, u64), ClientError> {
        let (r, size) = self.block(self.inner.read_stream(path, offset))?;
        Ok((self.reader(r), size))
    }

    fn reader(&self, r: crate::StreamReader) -> Reader {
        Reader(SyncIoBridge::new_with_handle(
            r,
            self.runtime().handle().clone(),
        ))
    }

    fn writer(&self, w: crate::StreamWriter) -> Writer {
        Writer(SyncIoBridge::new_with_handle(
            w,
            self.runtime().handle().clone(),
        ))
    }
}

/// A stream's incoming side ([`crate::StreamReader`]) as [`io::Read`]: a
/// read waits for the next bytes; 0 is the end of the stream. Inside a
/// tokio runtime a read fails ([`ClientError::InsideRuntime`]) instead of
/// stalling it.
#[derive(Debug)]
pub struct Reader(SyncIoBridge<crate::StreamReader>);

impl io::Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        outside_runtime().map_err(io::Error::other)?;
        self.0.read(buf)
    }
}

/// A stream's outgoing side ([`crate::StreamWriter`]) as [`io::Write`]: a
/// write waits for the agent's credit. Inside a tokio runtime a write
/// fails ([`ClientError::InsideRuntime`]) instead of stalling it.
#[derive(Debug)]
pub struct Writer(SyncIoBridge<crate::StreamWriter>);

impl io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        outside_runtime().map_err(io::Error::other)?;
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        outside_runtime().map_err(io::Error::other)?;
        self.0.flush()
    }
}

impl Writer {
    /// Sends no more (the guest side reads end of input: a command's stdin
    /// closes, a forwarded connection is half-closed).
    pub fn shutdown(&mut self) -> io::Result<()> {
        outside_runtime().map_err(io::Error::other)?;
        self.0.shutdown()
    }
}

/// A running streamed command (see [`crate::ExecStream`]).
#[derive(Debug)]
pub struct ExecStream {
    /// The command's stdin; [`Writer::shutdown`] closes it.
    pub stdin: Writer,
    /// Its stdout (with stderr unless separate).
    pub stdout: Reader,
    /// Its stderr, when asked for separately.
    pub stderr: Option<Reader>,
    /// Signals, resizes and the exit.
    pub control: ExecControl,
}

/// Signals, resizes and the exit of a streamed command (see
/// [`crate::ExecControl`]); cheap to clone.
#[derive(Debug, Clone)]
pub struct ExecControl {
    inner: crate::ExecControl,
    rt: tokio::runtime::Handle,
}

impl ExecControl {
    /// The command's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// See [`crate::ExecControl::signal`].
    pub fn signal(&self, signal: &str) -> Result<(), ClientError> {
        outside_runtime()?;
        self.rt.block_on(self.inner.signal(signal))
    }

    /// See [`crate::ExecControl::resize`].
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        outside_runtime()?;
        self.rt.block_on(self.inner.resize(rows, cols))
    }

    /// See [`crate::ExecControl::wait`].
    pub fn wait(&self) -> Result<ExecExitParams, ClientError> {
        outside_runtime()?;
        self.rt.block_on(self.inner.wait())
    }
}

/// A TCP connection inside the guest (see [`crate::ForwardStream`]).
#[derive(Debug)]
pub struct ForwardStream {
    /// From the guest's service.
    pub reader: Reader,
    /// To the guest's service; [`Writer::shutdown`] half-closes.
    pub writer: Writer,
}

/// Blocking inside a tokio runtime would stall it (and `block_on` there
/// panics): refuse instead.
fn outside_runtime() -> Result<(), ClientError> {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => Err(ClientError::InsideRuntime),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake;
    use serde_json::json;

    #[test]
    fn blocking_client_works_without_a_runtime_of_its_own() {
        // The fake agent runs on a runtime in another thread.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let agent = rt.block_on(async {
            fake::spawn(|c, _| {
                fake::serve(
                    c,
                    fake::handler(|_, _| async { Ok(json!({"pong": true, "timestamp": 7})) }),
                )
            })
        });
        let client = Client::connect(&agent.path).unwrap();
        assert_eq!(client.ping().unwrap().timestamp, 7);
        assert_eq!(client.call_raw("ping", json!({})).unwrap()["timestamp"], 7);
        // Inside a runtime: an error, not a panic, whether connecting or
        // calling; and the async client inside works from that runtime.
        rt.block_on(async {
            let e = Client::connect(&agent.path).unwrap_err();
            assert!(matches!(e, ClientError::InsideRuntime), "{e:?}");
            let e = client.ping().unwrap_err();
            assert!(matches!(e, ClientError::InsideRuntime), "{e:?}");
            assert_eq!(client.as_async().ping().await.unwrap().timestamp, 7);
        });
        // Dropped inside a runtime: no panic either.
        rt.block_on(async { drop(client) });
        rt.block_on(async { drop(agent) });
    }
}
