//! Transports: the virtio-serial port (the product) and a Unix socket
//! listener (local use and tests).
//!
//! A virtio-serial port reports end-of-file and `POLLHUP` at once, again
//! and again, while no host holds its socket. The agent must neither spin
//! nor sleep-poll then. It waits for `SIGIO` instead: with `O_ASYNC` and
//! `F_SETOWN` set, the kernel sends it on every change of the host's state.
//! `O_ASYNC` is enabled before the agent checks whether a host is attached,
//! so a host attaching between the check and the wait is never missed; it is
//! disabled while a host is attached, so transfers cost no signals. While a
//! host is attached the port is driven by epoll through tokio's `AsyncFd`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::AddWatchFlags;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::dirwatch::DirWatch;
use crate::dispatch::Agent;
use crate::qga::{Gate, Owner, QgaState};
use crate::server::{serve, OnEof};
use crate::sys;

/// The protocol a port or socket speaks.
#[derive(Debug, Clone)]
pub enum Dialect {
    /// The agent's own JSON-RPC 2.0 (PROTOCOL.md), on `channel_name`.
    JsonRpc,
    /// The QEMU guest agent's protocol, on `qemu_ga_channel_name`, with the
    /// state its sessions share (`guest-exec` results).
    Qga(Arc<QgaState>),
}

impl Dialect {
    /// Spawns a session of this dialect on `tracker`.
    fn spawn<R, W>(
        &self,
        tracker: &TaskTracker,
        agent: &Arc<Agent>,
        (reader, writer): (R, W),
        on_eof: OnEof,
        stop: &CancellationToken,
    ) -> tokio::task::JoinHandle<()>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: crate::payload::ReplySink + Send + 'static,
    {
        match self {
            Dialect::JsonRpc => {
                tracker.spawn(serve(agent.clone(), reader, writer, on_eof, stop.clone()))
            }
            Dialect::Qga(state) => tracker.spawn(crate::qga::serve(
                agent.clone(),
                state.clone(),
                reader,
                writer,
                stop.clone(),
            )),
        }
    }
}

/// Where the kernel makes the ports' device nodes (`/dev/vportNpM`).
const DEV_DIR: &str = "/dev";

/// Where sysfs lists virtio-serial ports.
const SYSFS_PORTS: &str = "/sys/class/virtio-ports";

/// Transport failures.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The `SIGIO` handler could not be installed.
    #[error("could not install the SIGIO handler")]
    Signal(#[source] io::Error),
    /// The Unix socket could not be created.
    #[error("could not listen on {path}")]
    Listen {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A path exists where the socket should go and is not a socket.
    #[error("{path} exists and is not a socket; remove it or choose another path")]
    NotASocket {
        /// The path.
        path: String,
    },
}

/// Finds the port device whose sysfs name is `name` (e.g. `/dev/vport0p1`).
pub fn find_port(name: &str) -> Option<PathBuf> {
    find_port_in(Path::new(SYSFS_PORTS), Path::new("/dev"), name)
}

fn find_port_in(sysfs: &Path, dev: &Path, name: &str) -> Option<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(sysfs).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|e| {
        let port_name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (port_name.trim_end() == name).then(|| dev.join(e.file_name()))
    })
}

/// True when a host holds the other end of the port (no `POLLHUP`).
fn host_attached(file: &File) -> io::Result<bool> {
    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO)?;
    let revents = fds[0].revents().unwrap_or(PollFlags::empty());
    Ok(!revents.contains(PollFlags::POLLHUP))
}

fn set_async(file: &File, on: bool) -> io::Result<()> {
    let flags = sys::fcntl_int(file, libc::F_GETFL, 0)?;
    let flags = if on {
        flags | libc::O_ASYNC
    } else {
        flags & !libc::O_ASYNC
    };
    sys::fcntl_int(file, libc::F_SETFL, flags)?;
    Ok(())
}

fn open_port(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    sys::fcntl_int(&file, libc::F_SETOWN, nix::unistd::getpid().as_raw())?;
    Ok(file)
}

/// Serves the virtio-serial port (the given device, or the one named
/// `name` in sysfs) in `dialect` until `stop` is cancelled.
///
/// qemu-ga's own port is opened only while the rule of `crate::qga::Gate`
/// gives it to this agent: never while an unmasked `qemu-guest-agent`
/// unit is installed, and closed at once when one appears.
pub async fn serve_port(
    agent: Arc<Agent>,
    dialect: Dialect,
    name: String,
    device: Option<PathBuf>,
    stop: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), TransportError> {
    // Installed before any O_ASYNC is set: SIGIO's default action kills.
    let mut sigio = signal(SignalKind::io()).map_err(TransportError::Signal)?;
    let retry = agent.config().connection_retry;
    let mut gate = match dialect {
        Dialect::Qga(_) => Gate::for_port(&name, device.is_some()),
        Dialect::JsonRpc => None,
    };
    let mut warned = false;
    let mut yielded = false;
    // Set up while the port is missing (see below).
    let mut dev_watch: Option<DirWatch> = None;
    while !stop.is_cancelled() {
        if let Some(gate) = &mut gate {
            if let Owner::QemuGa(unit) = gate.owner() {
                if !yielded {
                    info!(port = %name, unit = %unit.display(), "leaving the port to qemu-guest-agent (installed, not masked); `systemctl mask --now qemu-guest-agent` hands it to this agent");
                    yielded = true;
                }
                // Woken by a change to the unit folders only; by the retry
                // timer too where they cannot be watched.
                let watching = gate.is_watching();
                let fallback = async {
                    if watching {
                        std::future::pending().await
                    } else {
                        tokio::time::sleep(retry).await
                    }
                };
                tokio::select! {
                    () = gate.changed() => {}
                    () = fallback => {}
                    () = stop.cancelled() => break,
                }
                continue;
            }
            if yielded {
                info!(port = %name, "qemu-guest-agent is masked or gone; serving its port");
                yielded = false;
            }
        }
        let path = device.clone().or_else(|| find_port(&name));
        let opened = match &path {
            Some(p) => open_port(p).map(|f| (p.clone(), f)),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio-serial port named {name} in {SYSFS_PORTS}"),
            )),
        };
        let (path, file) = match opened {
            Ok(x) => x,
            Err(e) => {
                if !warned {
                    match dialect {
                        // Optional: most VMs have no qemu-ga channel.
                        Dialect::Qga(_) => {
                            info!(error = %e, retry_seconds = retry.as_secs(), "qemu-ga's port not available; serving it once it appears (libvirt's <channel> named {name})")
                        }
                        Dialect::JsonRpc => {
                            warn!(error = %e, retry_seconds = retry.as_secs(), "port not available; will retry (add the channel to the VM: kvmmanager-ctl channel-xml)")
                        }
                    }
                    warned = true;
                }
                // Wait for the port to appear: its device node is made in
                // the device folder (devtmpfs, with or without udev), so a
                // watch there wakes the agent when it does, and nothing
                // else does (no timer while idle). The watch is set up
                // before looking again, so a port that appears in between
                // is not missed. Without a watch: the retry timer.
                let missing = e.kind() == io::ErrorKind::NotFound;
                if !missing {
                    // There but not openable (held by another process, say):
                    // nothing in the folder will change; look again later.
                    dev_watch = None;
                } else if dev_watch.is_none() {
                    let dir = path
                        .as_deref()
                        .and_then(Path::parent)
                        .unwrap_or(Path::new(DEV_DIR))
                        .to_path_buf();
                    match DirWatch::new(
                        &[&dir],
                        AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
                    ) {
                        Ok(Some(w)) => {
                            dev_watch = Some(w);
                            continue;
                        }
                        Ok(None) | Err(_) => {
                            debug!(dir = %dir.display(), "cannot watch for the port; looking again every retry interval")
                        }
                    }
                }
                let changed = async {
                    match &mut gate {
                        Some(g) => g.changed().await,
                        None => std::future::pending().await,
                    }
                };
                let appeared = async {
                    match &mut dev_watch {
                        Some(w) => w.changed().await,
                        None => tokio::time::sleep(retry).await,
                    }
                };
                tokio::select! {
                    () = appeared => continue,
                    () = changed => continue,
                    () = stop.cancelled() => break,
                }
            }
        };
        warned = false;
        dev_watch = None;
        info!(port = %path.display(), name = %name, "serving the virtio-serial port");
        let served = serve_open_port(
            &agent,
            &dialect,
            &file,
            &mut sigio,
            gate.as_mut(),
            &stop,
            &tracker,
        )
        .await;
        match served {
            Ok(Closed::Stopped) => break,
            // The port is closed when `file` drops, below.
            Ok(Closed::Yielded) => {}
            Err(e) => {
                warn!(port = %path.display(), error = %e, "port failed; reopening");
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = stop.cancelled() => break,
                }
            }
        }
    }
    Ok(())
}

/// Why [`serve_open_port`] let go of the port.
enum Closed {
    /// `stop` was cancelled.
    Stopped,
    /// qemu-guest-agent owns the port now.
    Yielded,
}

/// Returns once the gate (if any) gives the port to qemu-ga, after a
/// change of the unit folders; never without a gate. It waits through
/// changes that leave the port to the agent (dpkg's temporary files), so a
/// `select!` branch on it is never disabled by an early answer.
async fn until_yield(gate: &mut Option<&mut Gate>) {
    match gate {
        Some(g) => loop {
            g.changed().await;
            if matches!(g.owner(), Owner::QemuGa(_)) {
                return;
            }
        },
        None => std::future::pending().await,
    }
}

async fn serve_open_port(
    agent: &Arc<Agent>,
    dialect: &Dialect,
    file: &File,
    sigio: &mut tokio::signal::unix::Signal,
    mut gate: Option<&mut Gate>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) -> io::Result<Closed> {
    loop {
        set_async(file, true)?;
        if !host_attached(file)? {
            debug!("no host attached; waiting for SIGIO");
            tokio::select! {
                _ = sigio.recv() => continue,
                () = until_yield(&mut gate) => {
                    info!("qemu-guest-agent was installed; closing its port");
                    return Ok(Closed::Yielded);
                }
                () = stop.cancelled() => return Ok(Closed::Stopped),
            }
        }
        set_async(file, false)?;
        info!("host attached");
        let stream = PortStream::new(file.try_clone()?)?;
        // A token of its own: the session ends when the port is handed to
        // qemu-ga, and with `stop`.
        let session_stop = stop.child_token();
        let mut session = dialect.spawn(tracker, agent, stream.split(), OnEof::Drop, &session_stop);
        // The session owns the port while it runs; a panic in it is a bug
        // already reported by the runtime.
        let mut yielded = false;
        loop {
            tokio::select! {
                _ = &mut session => break,
                () = until_yield(&mut gate), if !yielded => {
                    info!("qemu-guest-agent was installed; ending the session and closing its port");
                    session_stop.cancel();
                    yielded = true;
                }
            }
        }
        if stop.is_cancelled() {
            return Ok(Closed::Stopped);
        }
        if yielded {
            return Ok(Closed::Yielded);
        }
        info!("host detached");
    }
}

/// The port as a tokio stream. End of file means the host went away.
///
/// Its reading and writing halves ([`PortStream::split`]) share the
/// registration: readiness to read and to write are tracked apart, so
/// neither half waits on the other (no lock, unlike `tokio::io::split`),
/// and the writing half can `splice` file data into the port.
struct PortStream {
    fd: Arc<AsyncFd<File>>,
}

impl PortStream {
    fn new(file: File) -> io::Result<PortStream> {
        let fd = Arc::new(sys::register(file)?);
        Ok(PortStream { fd })
    }

    /// The reading and the writing half.
    fn split(self) -> (PortStream, PortStream) {
        let writer = PortStream {
            fd: Arc::clone(&self.fd),
        };
        (self, writer)
    }

    /// On `WouldBlock`: the port takes nothing both while the host does
    /// not read and once it has gone; only the hang-up tells them apart.
    /// A writer blocked by a host that left must end the session (its
    /// reader may be waiting for this very write, under back-pressure, and
    /// never see the end of input).
    fn detached_error(&self) -> io::Result<()> {
        if host_attached(self.fd.get_ref())? {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the host detached from the port",
            ))
        }
    }
}

impl crate::payload::ReplySink for PortStream {
    /// `len` must be all the pipe holds. The guest kernel's
    /// `port_fops_splice_write` (Linux 6.1, Debian 12's) sizes its
    /// scatterlist by the pipe's occupancy and marks its end there, then
    /// hands the device only the entries it filled: a shorter `len` leaves
    /// empty entries before the end mark, which the virtqueue walks into
    /// (QEMU: "zero sized buffers are not allowed"; the guest oopses in
    /// `virtqueue_add_split`). [`crate::payload::write_payload`] passes a
    /// pipe's whole remaining content.
    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        pipe: std::os::fd::BorrowedFd<'_>,
        len: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        Some(loop {
            let mut guard = match self.fd.poll_write_ready(cx) {
                Poll::Ready(Ok(g)) => g,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            };
            match guard.try_io(|inner| sys::splice_out(pipe, inner.get_ref().as_fd(), len)) {
                Ok(result) => break Poll::Ready(result),
                Err(_would_block) => {
                    if let Err(e) = self.detached_error() {
                        break Poll::Ready(Err(e));
                    }
                }
            }
        })
    }
}

impl AsyncRead for PortStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // One read straight into the uninitialised space (see sys::read_into).
            let result = guard.try_io(|inner| sys::read_into(inner.get_ref().as_fd(), buf));
            match result {
                Ok(Ok(_)) => return Poll::Ready(Ok(())),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|inner| inner.get_ref().write(buf)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => self.detached_error()?,
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

/// Binds a Unix socket at `path` that only its owner can connect to (mode
/// 0600) from the moment it appears there.
///
/// A socket file's mode comes from the umask at `bind`, and the umask is
/// process-wide (the agent is multithreaded, so changing it around `bind`
/// would race with every other thread creating files), while a `chmod`
/// after `bind` leaves an instant in which others may connect. So the
/// socket is bound inside a private directory (mode 0700, created beside
/// `path`, so the same filesystem), made 0600 there, where nobody else can
/// reach it, then renamed to `path` (which atomically replaces a stale
/// socket) and the directory removed. The private path is about 20 bytes
/// longer than `path`, within the 107 a socket path may have.
fn bind_owner_only(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = parent.join(format!(".kvmsock-{}", sys::random_hex(4)?));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("s");
    let bound = std::os::unix::net::UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    if bound.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Serves clients on a Unix socket at `path` in `dialect` until `stop` is
/// cancelled. A stale socket file is replaced; the socket is owner-only
/// (0600) from the start (see `bind_owner_only`).
pub async fn serve_unix(
    agent: Arc<Agent>,
    dialect: Dialect,
    path: PathBuf,
    stop: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), TransportError> {
    let listen_err = |source| TransportError::Listen {
        path: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(&path) {
        // A stale socket: the rename in bind_owner_only replaces it.
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => {
            return Err(TransportError::NotASocket {
                path: path.display().to_string(),
            })
        }
        Err(_) => {}
    }
    let listener = bind_owner_only(&path)
        .and_then(|l| {
            l.set_nonblocking(true)?;
            UnixListener::from_std(l)
        })
        .map_err(listen_err)?;
    info!(socket = %path.display(), "listening on a Unix socket");
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    debug!("client connected");
                    dialect.spawn(&tracker, &agent, stream.into_split(), OnEof::Drain, &stop);
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this process has `path` open (its descriptors' links).
    fn open_here(path: &Path) -> bool {
        std::fs::read_dir("/proc/self/fd")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
    }

    /// A port missing at start is opened when its device node appears,
    /// woken by the folder's watch: the retry interval is an hour.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_port_is_opened_when_its_node_appears_without_a_timer() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("vport9p1");
        let config = crate::config::Config {
            connection_retry: std::time::Duration::from_secs(3600),
            ..Default::default()
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_port(
            Agent::new(config),
            Dialect::JsonRpc,
            "org.example.test.0".into(),
            Some(dev.clone()),
            stop.clone(),
            TaskTracker::new(),
        ));
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!open_here(&dev));
        std::fs::write(&dev, b"").unwrap();
        let start = std::time::Instant::now();
        while !open_here(&dev) {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the port that appeared was not opened"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_port_stream_reads_attachments_written_in_small_pieces() {
        use agent_common::codec::{Frame, JsonLinesCodec};
        use futures::StreamExt;
        use std::os::unix::net::UnixStream;
        use tokio_util::codec::FramedRead;

        // A socket pair stands in for the port: non-blocking, 4 KiB writes.
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let stream = PortStream::new(File::from(std::os::fd::OwnedFd::from(ours))).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            theirs.write_all(b"{\"attachment\":3000000}\n").unwrap();
            for piece in sent.chunks(4096) {
                theirs.write_all(piece).unwrap();
            }
            theirs.write_all(b"[\"after\"]\n").unwrap();
        });
        let mut frames = FramedRead::new(stream, JsonLinesCodec::new(1024));
        let Some(Ok(Frame::Line(_))) = frames.next().await else {
            panic!("expected the header line")
        };
        frames.decoder_mut().expect_attachment(data.len());
        let Some(Ok(Frame::Attachment(got))) = frames.next().await else {
            panic!("expected the attachment")
        };
        assert!(got[..] == data[..], "the attachment differs");
        let Some(Ok(Frame::Line(after))) = frames.next().await else {
            panic!("expected the line after the attachment")
        };
        assert_eq!(&after[..], b"[\"after\"]");
        writer.join().unwrap();
    }

    #[test]
    fn the_socket_is_owner_only_from_the_start_and_replaces_a_stale_one() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        for round in 0..2 {
            // The second round replaces the first socket, now stale.
            let listener = bind_owner_only(&path).unwrap();
            let m = std::fs::symlink_metadata(&path).unwrap();
            assert!(m.file_type().is_socket(), "round {round}");
            assert_eq!(m.mode() & 0o7777, 0o600, "round {round}");
            // Nothing else is left beside it.
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![std::ffi::OsString::from("agent.sock")]);
            // It is the listening socket, under its final name.
            let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
            assert!(listener.accept().is_ok());
        }
        // A failed bind leaves no private directory behind.
        let missing = dir.path().join("no/such/dir/agent.sock");
        assert!(bind_owner_only(&missing).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn ports_are_found_by_sysfs_name() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        for (port, name) in [
            ("vport0p1", "org.qemu.guest_agent.0"),
            ("vport0p2", "org.kvmmanager.agent.0"),
        ] {
            std::fs::create_dir_all(sys.join(port)).unwrap();
            std::fs::write(sys.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_port_in(&sys, Path::new("/dev"), "org.kvmmanager.agent.0"),
            Some(PathBuf::from("/dev/vport0p2"))
        );
        assert_eq!(
            find_port_in(&sys, Path::new("/dev"), "org.kvmmanager.agent"),
            None
        );
        assert_eq!(
            find_port_in(&dir.path().join("none"), Path::new("/dev"), "x"),
            None
        );
    }
}
