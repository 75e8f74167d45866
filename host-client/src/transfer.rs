//! Whole-file transfers in chunks, several chunk requests in flight.
//!
//! Nothing here holds a whole file in memory: at most
//! [`ClientOptions::max_in_flight_chunks`](crate::ClientOptions) chunks (plus
//! one read ahead) are buffered at a time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent_common::encoding::Encoding;
use agent_common::methods::{FileWriteParams, Limits, Method, WriteMode};
use agent_common::{MAX_ATTACHMENT_SIZE, MAX_READ_CHUNK, MAX_RESPONSE_SIZE};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::client::{random_u64, Client};
use crate::error::ClientError;

/// Progress of a transfer, passed to the progress callback after each chunk.
///
/// ```
/// let p = host_client::Progress { done: 50, total: Some(200) };
/// assert_eq!(p.fraction(), Some(0.25));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes transferred (acknowledged by the agent, for a push).
    pub done: u64,
    /// Total size, when known (not for a push from a pipe).
    pub total: Option<u64>,
}

impl Progress {
    /// `done / total`, when the total is known and not zero.
    ///
    /// ```
    /// let p = host_client::Progress { done: 1, total: None };
    /// assert_eq!(p.fraction(), None);
    /// ```
    pub fn fraction(&self) -> Option<f64> {
        match self.total {
            Some(t) if t > 0 => Some(self.done as f64 / t as f64),
            _ => None,
        }
    }
}

/// What a finished transfer moved, and how long it took.
///
/// ```
/// use std::time::Duration;
/// let s = host_client::TransferSummary { bytes: 1 << 20, duration: Duration::from_secs(2) };
/// assert_eq!(s.mib_per_s(), 0.5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransferSummary {
    /// Bytes transferred.
    pub bytes: u64,
    /// Wall-clock time of the transfer.
    pub duration: Duration,
}

impl TransferSummary {
    /// Throughput in MiB/s (0 for an instant transfer).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let s = host_client::TransferSummary { bytes: 10, duration: Duration::ZERO };
    /// assert_eq!(s.mib_per_s(), 0.0);
    /// ```
    pub fn mib_per_s(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            self.bytes as f64 / (1024.0 * 1024.0) / secs
        } else {
            0.0
        }
    }
}

/// How [`Client::push`] writes the guest file.
///
/// ```
/// use agent_common::methods::WriteMode;
/// let o = host_client::PushOptions { mode: WriteMode::CreateNew, permissions: Some(0o600) };
/// assert_eq!(host_client::PushOptions::default().mode, WriteMode::Truncate);
/// # let _ = o;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushOptions {
    /// Replace (atomically), append, or create only if missing.
    pub mode: WriteMode,
    /// Permission bits of a new file; the agent's default (0644) if `None`.
    pub permissions: Option<u32>,
}

/// Room kept in a request line for the envelope, the upload id and numbers.
const WRITE_ENVELOPE: usize = 512 + 256;
/// Room kept in a response line for the envelope.
const READ_ENVELOPE: usize = 1024;

/// Largest raw chunk a `file_write` to `path` may carry under `limits`:
/// with attachments, the attachment limit (the line holds only the params);
/// without, what base64 leaves of the request line.
pub(crate) fn write_chunk_size(limits: &Limits, path: &str) -> Result<usize, ClientError> {
    let max = usize::try_from(limits.max_message_size).unwrap_or(usize::MAX);
    if limits.max_attachment_size > 0 {
        if max < WRITE_ENVELOPE + path.len().saturating_mul(6) {
            return Err(ClientError::Protocol(format!(
                "the agent's max_message_size ({max} bytes) leaves no room for the params of a file_write to {path}"
            )));
        }
        let chunk = limits.max_attachment_size.min(MAX_ATTACHMENT_SIZE);
        return Ok(usize::try_from(chunk).unwrap_or(usize::MAX));
    }
    let budget = max.saturating_sub(WRITE_ENVELOPE + path.len().saturating_mul(6));
    let chunk = Encoding::Base64.max_raw_for(budget).min(4 * 1024 * 1024);
    if chunk == 0 {
        return Err(ClientError::Protocol(format!(
            "the agent's max_message_size ({max} bytes) leaves no room for file data"
        )));
    }
    Ok(chunk)
}

/// Largest raw chunk one `file_read` may ask for under `limits`.
pub(crate) fn read_chunk_size(limits: &Limits) -> u64 {
    if limits.max_attachment_size > 0 {
        return limits
            .max_read_chunk
            .min(MAX_READ_CHUNK)
            .min(limits.max_attachment_size)
            .max(1);
    }
    let response = limits.max_response_size.min(MAX_RESPONSE_SIZE as u64);
    let by_response = Encoding::Base64.max_raw_for(
        usize::try_from(response)
            .unwrap_or(usize::MAX)
            .saturating_sub(READ_ENVELOPE),
    ) as u64;
    limits
        .max_read_chunk
        .min(MAX_READ_CHUNK)
        .min(by_response)
        .max(1)
}

/// An open chunked upload of a push: aborted on the agent (`cancel` with
/// its `upload_id`) unless the push committed it, whether the push failed
/// or its future was dropped. Otherwise it would hold one of the agent's 16
/// upload places until it expired or the connection ended.
struct UploadGuard<'a> {
    client: &'a Client,
    /// `None` once committed.
    upload_id: Option<String>,
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.upload_id.take() {
            self.client.abort_upload(id);
        }
    }
}

/// Reads until `buf` holds `want` bytes or the reader ends.
async fn read_full<R: AsyncRead + Unpin>(reader: &mut R, want: usize) -> std::io::Result<Bytes> {
    let mut buf = vec![0u8; want];
    let mut filled = 0;
    while filled < want {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(Bytes::from(buf))
}

impl Client {
    /// Reads `len` bytes at `offset` of a guest file (fewer only at its end),
    /// checking that the file keeps size `expected`. Returns the bytes and
    /// the size the agent reported.
    async fn read_range(
        &self,
        path: &str,
        offset: u64,
        len: u64,
        mut expected: Option<u64>,
    ) -> Result<(Vec<u8>, u64), ClientError> {
        let mut data = Vec::new();
        loop {
            let pos = offset + data.len() as u64;
            let (r, bytes) = self.read_bytes(path, pos, len - data.len() as u64).await?;
            match expected {
                Some(size) if size != r.size => {
                    return Err(ClientError::FileChanged {
                        path: path.to_owned(),
                        expected: size,
                        actual: r.size,
                    })
                }
                _ => expected = Some(r.size),
            }
            if bytes.len() as u64 != r.bytes_read || r.offset != pos {
                return Err(ClientError::Protocol(format!(
                    "file_read of {path} at {pos} returned {} bytes at offset {} but claims {}",
                    bytes.len(),
                    r.offset,
                    r.bytes_read
                )));
            }
            data.extend_from_slice(&bytes);
            let size = r.size;
            let want = len.min(size.saturating_sub(offset));
            if data.len() as u64 >= want {
                data.truncate(want as usize);
                return Ok((data, size));
            }
            if r.eof || bytes.is_empty() {
                // The file ended before the size it reported: it shrank.
                return Err(ClientError::FileChanged {
                    path: path.to_owned(),
                    expected: size,
                    actual: offset + data.len() as u64,
                });
            }
        }
    }

    /// Streams a guest file into `writer`, in order, with several chunk
    /// requests in flight. Fails with [`ClientError::FileChanged`] if the
    /// file changes size meanwhile. Errors writing to `writer` are reported
    /// as [`ClientError::LocalFile`] naming `local_name`.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// let mut out = tokio::io::stdout();
    /// client.read_to("/var/log/syslog", &mut out, "stdout".as_ref(), |_| {}).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn read_to<W: AsyncWrite + Unpin>(
        &self,
        guest_path: &str,
        writer: &mut W,
        local_name: &Path,
        mut progress: impl FnMut(Progress),
    ) -> Result<TransferSummary, ClientError> {
        let done = AtomicU64::new(0);
        self.read_to_inner(guest_path, writer, local_name, |p| {
            done.store(p.done, Ordering::Relaxed);
            progress(p);
        })
        .await
        .map_err(|e| ClientError::in_transfer(guest_path, done.load(Ordering::Relaxed), e))
    }

    async fn read_to_inner<W: AsyncWrite + Unpin>(
        &self,
        guest_path: &str,
        writer: &mut W,
        local_name: &Path,
        progress: impl FnMut(Progress),
    ) -> Result<TransferSummary, ClientError> {
        let start = Instant::now();
        let limits = self.limits().await?;
        let mut sink = PullSink {
            writer,
            local_name,
            progress,
            done: 0,
            total: 0,
        };
        if self.options().stream_reads && self.serves_read_stream() {
            self.pull_streamed(guest_path, &mut sink).await?;
        } else {
            let chunk = read_chunk_size(&limits);
            self.pull_chunked(guest_path, chunk, &mut sink).await?;
        }
        sink.writer.flush().await.map_err(sink.local_err())?;
        Ok(TransferSummary {
            bytes: sink.done,
            duration: start.elapsed(),
        })
    }

    /// The file by `file_read` chunks, several in flight.
    async fn pull_chunked<W: AsyncWrite + Unpin>(
        &self,
        guest_path: &str,
        chunk: u64,
        sink: &mut PullSink<'_, W, impl FnMut(Progress)>,
    ) -> Result<(), ClientError> {
        let (first, size) = self.read_range(guest_path, 0, chunk, None).await?;
        sink.total = size;
        sink.put(&first).await?;
        let n = self.options().max_in_flight_chunks.max(1);
        let offsets = (1..).map(|i| i * chunk).take_while(|&o| o < size);
        let mut chunks = futures::stream::iter(offsets)
            .map(|off| self.read_range(guest_path, off, chunk.min(size - off), Some(size)))
            .buffered(n);
        while let Some(r) = chunks.next().await {
            sink.put(&r?.0).await?;
        }
        Ok(())
    }

    /// The file through one `file_read_stream`.
    async fn pull_streamed<W: AsyncWrite + Unpin>(
        &self,
        guest_path: &str,
        sink: &mut PullSink<'_, W, impl FnMut(Progress)>,
    ) -> Result<(), ClientError> {
        let (mut data, size) = self.read_stream(guest_path, 0).await?;
        sink.total = size;
        (sink.progress)(Progress {
            done: 0,
            total: Some(size),
        });
        loop {
            match data.read_chunk().await {
                Ok(Some(chunk)) => sink.put(&chunk).await?,
                Ok(None) => break,
                Err(_) if data.connection_lost() => return Err(ClientError::ConnectionLost),
                Err(e) => {
                    return Err(ClientError::StreamReset {
                        method: Method::FileReadStream.as_str().into(),
                        reason: e.to_string(),
                    })
                }
            }
        }
        if sink.done != size {
            return Err(ClientError::FileChanged {
                path: guest_path.to_owned(),
                expected: size,
                actual: sink.done,
            });
        }
        Ok(())
    }

    /// Copies a guest file to `local_path`, through a temp file in the same
    /// directory renamed into place at the end (so a failed pull leaves no
    /// torn file). If `local_path` is a directory, the guest file's name is
    /// appended.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// let s = client.pull("/var/log/syslog", "syslog.txt", |p| {
    ///     eprint!("\r{} bytes", p.done);
    /// }).await?;
    /// println!("{:.1} MiB/s", s.mib_per_s());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn pull(
        &self,
        guest_path: &str,
        local_path: impl AsRef<Path>,
        mut progress: impl FnMut(Progress),
    ) -> Result<TransferSummary, ClientError> {
        let done = AtomicU64::new(0);
        self.pull_inner(guest_path, local_path.as_ref(), |p| {
            done.store(p.done, Ordering::Relaxed);
            progress(p);
        })
        .await
        .map_err(|e| ClientError::in_transfer(guest_path, done.load(Ordering::Relaxed), e))
    }

    async fn pull_inner(
        &self,
        guest_path: &str,
        local_path: &Path,
        progress: impl FnMut(Progress),
    ) -> Result<TransferSummary, ClientError> {
        let mut local = local_path.to_path_buf();
        if local.is_dir() {
            if let Some(name) = Path::new(guest_path).file_name() {
                local.push(name);
            }
        }
        let local_err = |source| ClientError::LocalFile {
            path: local.clone(),
            source,
        };
        let dir = match local.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(&format!(".{:08x}.part", random_u64() as u32))
            .tempfile_in(&dir)
            .map_err(local_err)?;
        let std_file = temp.as_file().try_clone().map_err(local_err)?;
        let mut file = tokio::io::BufWriter::new(tokio::fs::File::from_std(std_file));
        let summary = self
            .read_to_inner(guest_path, &mut file, &local, progress)
            .await?;
        file.flush().await.map_err(local_err)?;
        drop(file);
        {
            use std::os::unix::fs::PermissionsExt;
            let perms = std::fs::Permissions::from_mode(0o644);
            temp.as_file().set_permissions(perms).map_err(local_err)?;
        }
        temp.persist(&local).map_err(|e| local_err(e.error))?;
        Ok(summary)
    }

    /// Copies a local file to `guest_path`, in chunks sized from the agent's
    /// `max_message_size`, several in flight; the last chunk commits the
    /// upload (an atomic rename on the guest for `truncate` and
    /// `create_new`). A push that fails, or whose future is dropped, before
    /// the commit aborts its upload on the agent: the guest file is left as
    /// it was. A failed push is a [`ClientError::Transfer`] saying how many
    /// bytes the agent had acknowledged. With [`WriteMode::Append`] the chunks are appended one
    /// after the other instead (not atomic: the protocol cannot stage an
    /// append).
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// use host_client::PushOptions;
    /// client.push("disk.img", "/tmp/kvmmanager/disk.img", PushOptions::default(), |_| {}).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn push(
        &self,
        local_path: impl AsRef<Path>,
        guest_path: &str,
        options: PushOptions,
        mut progress: impl FnMut(Progress),
    ) -> Result<TransferSummary, ClientError> {
        let done = AtomicU64::new(0);
        self.push_inner(local_path.as_ref(), guest_path, options, |p| {
            done.store(p.done, Ordering::Relaxed);
            progress(p);
        })
        .await
        .map_err(|e| ClientError::in_transfer(guest_path, done.load(Ordering::Relaxed), e))
    }

    async fn push_inner(
        &self,
        local: &Path,
        guest_path: &str,
        options: PushOptions,
        progress: impl FnMut(Progress),
    ) -> Result<TransferSummary, ClientError> {
        let local_err = |source| ClientError::LocalFile {
            path: local.to_path_buf(),
            source,
        };
        let file = tokio::fs::File::open(local).await.map_err(local_err)?;
        let size = file.metadata().await.map_err(local_err)?.len();
        let mut reader = tokio::io::BufReader::new(file);
        self.push_from_inner(
            &mut reader,
            local,
            Some(size),
            guest_path,
            options,
            progress,
        )
        .await
    }

    /// Copies everything `reader` yields to `guest_path` (like
    /// [`Client::push`], for pipes). `total` is only used for progress;
    /// `local_name` names the source in errors.
    ///
    /// ```no_run
    /// # async fn demo(client: host_client::Client) -> Result<(), host_client::ClientError> {
    /// use host_client::PushOptions;
    /// let mut stdin = tokio::io::stdin();
    /// client
    ///     .push_from(&mut stdin, "stdin".as_ref(), None, "/tmp/kvmmanager/x", PushOptions::default(), |_| {})
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn push_from<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        local_name: &Path,
        total: Option<u64>,
        guest_path: &str,
        options: PushOptions,
        mut progress: impl FnMut(Progress),
    ) -> Result<TransferSummary, ClientError> {
        let done = AtomicU64::new(0);
        let track = |p: Progress| {
            done.store(p.done, Ordering::Relaxed);
            progress(p);
        };
        self.push_from_inner(reader, local_name, total, guest_path, options, track)
            .await
            .map_err(|e| ClientError::in_transfer(guest_path, done.load(Ordering::Relaxed), e))
    }

    async fn push_from_inner<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        local_name: &Path,
        total: Option<u64>,
        guest_path: &str,
        options: PushOptions,
        mut progress: impl FnMut(Progress),
    ) -> Result<TransferSummary, ClientError> {
        let start = Instant::now();
        let local_err = |source| ClientError::LocalFile {
            path: local_name.to_path_buf(),
            source,
        };
        let chunk = write_chunk_size(&self.limits().await?, guest_path)?;
        // The content goes in as bytes: `write_bytes` picks the encoding.
        let params = |upload_id: Option<String>, offset: Option<u64>, more| FileWriteParams {
            path: guest_path.to_owned(),
            content: String::new(),
            encoding: Encoding::Attachment,
            mode: options.mode,
            permissions: if upload_id.is_none() {
                options.permissions
            } else {
                None
            },
            offset,
            upload_id,
            more,
        };
        let check = |len: usize, written: u64| {
            if written == len as u64 {
                Ok(())
            } else {
                Err(ClientError::Protocol(format!(
                    "file_write to {guest_path} wrote {written} of {len} bytes"
                )))
            }
        };

        let first = read_full(reader, chunk).await.map_err(local_err)?;
        let mut next = read_full(reader, chunk).await.map_err(local_err)?;
        if next.is_empty() {
            // Fits in one call.
            let r = self
                .write_bytes(&params(None, None, false), first.clone())
                .await?;
            check(first.len(), r.bytes_written)?;
            let done = first.len() as u64;
            progress(Progress { done, total });
            return Ok(TransferSummary {
                bytes: done,
                duration: start.elapsed(),
            });
        }

        if options.mode == WriteMode::Append {
            // An append cannot be chunked as an upload: send each chunk as
            // an append of its own, one after the other.
            let mut current = first;
            let mut done = 0;
            loop {
                let r = self
                    .write_bytes(&params(None, None, false), current.clone())
                    .await?;
                check(current.len(), r.bytes_written)?;
                done += current.len() as u64;
                progress(Progress { done, total });
                if next.is_empty() {
                    return Ok(TransferSummary {
                        bytes: done,
                        duration: start.elapsed(),
                    });
                }
                current = next;
                next = read_full(reader, chunk).await.map_err(local_err)?;
            }
        }

        let r = self
            .write_bytes(&params(None, None, true), first.clone())
            .await?;
        check(first.len(), r.bytes_written)?;
        let upload_id = r.upload_id.ok_or_else(|| {
            ClientError::Protocol(format!(
                "file_write to {guest_path} with more=true returned no upload_id"
            ))
        })?;
        // From here until the commit, a failure or a drop of this future
        // aborts the upload on the agent instead of leaving it open.
        let mut upload = UploadGuard {
            client: self,
            upload_id: Some(upload_id.clone()),
        };
        let mut done = first.len() as u64;
        let mut offset = done;
        progress(Progress { done, total });

        let max_in_flight = self.options().max_in_flight_chunks.max(1);
        let mut in_flight = FuturesUnordered::new();
        loop {
            let current = next;
            next = read_full(reader, chunk).await.map_err(local_err)?;
            if next.is_empty() {
                // `current` is the last chunk: it commits, after every
                // middle chunk is acknowledged.
                while let Some(r) = in_flight.next().await {
                    done += r?;
                    progress(Progress { done, total });
                }
                let p = params(Some(upload_id.clone()), Some(offset), false);
                let r = self.write_bytes(&p, current.clone()).await?;
                check(current.len(), r.bytes_written)?;
                if !r.committed {
                    return Err(ClientError::Protocol(format!(
                        "the last file_write to {guest_path} did not commit the upload"
                    )));
                }
                upload.upload_id = None;
                done += current.len() as u64;
                progress(Progress { done, total });
                return Ok(TransferSummary {
                    bytes: done,
                    duration: start.elapsed(),
                });
            }
            while in_flight.len() >= max_in_flight {
                if let Some(r) = in_flight.next().await {
                    done += r?;
                    progress(Progress { done, total });
                }
            }
            let p = params(Some(upload_id.clone()), Some(offset), true);
            offset += current.len() as u64;
            let len = current.len();
            in_flight.push(async move {
                let r = self.write_bytes(&p, current).await?;
                check(len, r.bytes_written)?;
                Ok::<u64, ClientError>(len as u64)
            });
        }
    }
}

/// Where a pull's bytes go: the local writer, with the count so far and
/// the progress callback (`total` is the size the agent reported).
struct PullSink<'a, W, P> {
    writer: &'a mut W,
    local_name: &'a Path,
    progress: P,
    done: u64,
    total: u64,
}

impl<W: AsyncWrite + Unpin, P: FnMut(Progress)> PullSink<'_, W, P> {
    fn local_err(&self) -> impl FnOnce(std::io::Error) -> ClientError {
        let path = self.local_name.to_path_buf();
        move |source| ClientError::LocalFile { path, source }
    }

    /// Writes `data` and reports the progress.
    async fn put(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.writer
            .write_all(data)
            .await
            .map_err(self.local_err())?;
        self.done += data.len() as u64;
        (self.progress)(Progress {
            done: self.done,
            total: Some(self.total),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(msg: u64, resp: u64, read: u64) -> Limits {
        Limits {
            max_message_size: msg,
            max_response_size: resp,
            max_read_chunk: read,
            max_file_size: 1 << 30,
            max_exec_output: 1 << 20,
            max_command_timeout_seconds: 300,
            request_timeout_seconds: 30,
            max_concurrent_requests: 10,
            max_attachment_size: 0,
            command_containment: None,
            command_memory_max: None,
            command_max_processes: None,
            freeze_timeout_seconds: None,
        }
    }

    #[test]
    fn write_chunks_fit_the_message_limit() {
        for (msg, path) in [
            (65536u64, "/tmp/a"),
            (4096, "/tmp/kvmmanager/long/name"),
            (2000, "/x"),
        ] {
            let l = limits(msg, 8 << 20, 1 << 20);
            let chunk = write_chunk_size(&l, path).unwrap();
            let p = FileWriteParams {
                path: path.into(),
                content: Encoding::Base64.encode_lossy(&vec![0xffu8; chunk]),
                encoding: Encoding::Base64,
                upload_id: Some("u".repeat(64)),
                offset: Some(u64::MAX),
                more: true,
                ..Default::default()
            };
            let id = agent_common::jsonrpc::Id::number(u64::MAX);
            let req = agent_common::jsonrpc::OutgoingRequest::new("file_write", &p, &id);
            let line = serde_json::to_string(&req).unwrap();
            assert!(line.len() < msg as usize, "{msg}: {} bytes", line.len());
            assert!(
                msg < 4096 || chunk as u64 > msg / 2,
                "chunk {chunk} is wastefully small for {msg}"
            );
        }
        assert!(write_chunk_size(&limits(100, 1 << 20, 1 << 20), "/x").is_err());
    }

    #[test]
    fn with_attachments_chunks_are_bounded_by_the_attachment_limit() {
        let l = Limits {
            max_attachment_size: 1 << 20,
            ..limits(65536, 8 << 20, 1 << 20)
        };
        assert_eq!(write_chunk_size(&l, "/x").unwrap(), 1 << 20);
        assert_eq!(read_chunk_size(&l), 1 << 20);
        let l = Limits {
            max_attachment_size: 4096,
            ..limits(65536, 8 << 20, 1 << 20)
        };
        assert_eq!(write_chunk_size(&l, "/x").unwrap(), 4096);
        assert_eq!(read_chunk_size(&l), 4096);
        // The params must still fit the line.
        let l = Limits {
            max_attachment_size: 1 << 20,
            ..limits(100, 8 << 20, 1 << 20)
        };
        assert!(write_chunk_size(&l, "/x").is_err());
    }

    #[test]
    fn read_chunks_respect_every_limit() {
        assert_eq!(read_chunk_size(&limits(65536, 8 << 20, 1 << 20)), 1 << 20);
        assert_eq!(read_chunk_size(&limits(65536, 8 << 20, 1000)), 1000);
        let small = read_chunk_size(&limits(65536, 64 * 1024, 1 << 20));
        assert!(Encoding::Base64.encoded_len(small as usize) + READ_ENVELOPE <= 64 * 1024);
    }
}

#[cfg(test)]
mod fake_fs_tests {
    use super::*;
    use crate::fake::{self, FakeConn};
    use crate::ClientOptions;
    use agent_common::error::{ErrorKind, ErrorObject};
    use agent_common::methods::{AgentInfo, FileReadParams, FileReadResult, FileWriteResult};
    use serde_json::Value;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// An agent keeping files in memory, with replies delayed by varying
    /// amounts so that chunk replies overtake each other.
    #[derive(Default)]
    struct Fs {
        files: HashMap<String, Vec<u8>>,
        /// upload id -> (path, staged bytes, bytes received)
        uploads: HashMap<String, (String, Vec<u8>, usize)>,
        in_flight: usize,
        max_in_flight: usize,
        /// Middle chunks of an upload in flight when its commit arrived.
        commit_overlaps: usize,
        commits: usize,
        writes: Vec<(bool, bool)>, // (has upload_id, more)
        reads: usize,
        /// Reads after which the file reports a bigger size.
        grow_after_reads: Option<usize>,
        /// Most bytes one read returns (short reads on purpose).
        short_read: u64,
        /// Offer attachments (`max_attachment_size` > 0).
        attachments: bool,
        /// Requests that carried an attachment, and replies that did.
        attachments_in: usize,
        attachments_out: usize,
    }

    const MAX_MESSAGE: u64 = 4096;
    const MAX_READ: u64 = 1000;

    fn limits(attachments: bool) -> Limits {
        Limits {
            max_message_size: MAX_MESSAGE,
            max_response_size: 8 << 20,
            max_read_chunk: MAX_READ,
            max_file_size: 1 << 30,
            max_exec_output: 1 << 20,
            max_command_timeout_seconds: 300,
            request_timeout_seconds: 30,
            max_concurrent_requests: 16,
            max_attachment_size: if attachments { 1500 } else { 0 },
            command_containment: None,
            command_memory_max: None,
            command_max_processes: None,
            freeze_timeout_seconds: None,
        }
    }

    type Answer = Result<(Value, Option<Bytes>), ErrorObject>;

    fn handle(fs: &Mutex<Fs>, method: &str, params: Value, data: Option<Bytes>) -> Answer {
        let mut fs = fs.lock().unwrap();
        if data.is_some() {
            fs.attachments_in += 1;
        }
        let no_data = |r: Result<Value, ErrorObject>| r.map(|v| (v, None));
        match method {
            "get_agent_info" => Ok(serde_json::to_value(AgentInfo {
                name: "fake".into(),
                version: "0".into(),
                protocol_version: 1,
                platform: "linux".into(),
                methods: vec![],
                disabled_methods: vec![],
                limits: limits(fs.attachments),
            })
            .map(|v| (v, None))
            .unwrap()),
            "file_read" => {
                let p: FileReadParams = serde_json::from_value(params).unwrap();
                fs.reads += 1;
                let grown = fs.grow_after_reads.is_some_and(|n| fs.reads > n);
                let data = fs
                    .files
                    .get(&p.path)
                    .ok_or_else(|| ErrorObject::new(ErrorKind::NotFound, "no such file"))?;
                let size = data.len() as u64 + u64::from(grown);
                let len = p
                    .length
                    .unwrap_or(MAX_READ)
                    .min(MAX_READ)
                    .min(fs.short_read);
                let start = p.offset.min(data.len() as u64) as usize;
                let end = (start + len as usize).min(data.len());
                let bytes = Bytes::copy_from_slice(&data[start..end]);
                let raw = p.encoding == Encoding::Attachment;
                assert!(
                    !raw || fs.attachments,
                    "attachment asked of an agent without"
                );
                let r = serde_json::to_value(FileReadResult {
                    content: if raw {
                        String::new()
                    } else {
                        p.encoding.encode_lossy(&bytes)
                    },
                    encoding: p.encoding,
                    offset: p.offset,
                    bytes_read: bytes.len() as u64,
                    eof: end as u64 >= size,
                    size,
                })
                .unwrap();
                if raw {
                    fs.attachments_out += 1;
                }
                Ok((r, raw.then_some(bytes)))
            }
            "file_write" => {
                let p: FileWriteParams = serde_json::from_value(params).unwrap();
                let bytes = match (p.encoding, data) {
                    (Encoding::Attachment, Some(d)) => d.to_vec(),
                    (_, None) => p.encoding.decode(&p.content).unwrap(),
                    (e, Some(_)) => panic!("attachment sent with encoding {e:?}"),
                };
                fs.writes.push((p.upload_id.is_some(), p.more));
                let (upload_id, committed, size) = match (&p.upload_id, p.more) {
                    (None, false) if p.mode == WriteMode::Append => {
                        let file = fs.files.entry(p.path.clone()).or_default();
                        file.extend_from_slice(&bytes);
                        (None, true, file.len())
                    }
                    (None, false) => {
                        let n = bytes.len();
                        fs.files.insert(p.path.clone(), bytes.clone());
                        (None, true, n)
                    }
                    (None, true) if p.mode == WriteMode::Append => {
                        return Err(ErrorObject::new(
                            ErrorKind::InvalidParams,
                            "append cannot be chunked",
                        ))
                    }
                    (None, true) => {
                        let id = format!("up{}", fs.uploads.len());
                        let n = bytes.len();
                        fs.uploads
                            .insert(id.clone(), (p.path.clone(), bytes.clone(), n));
                        (Some(id), false, n)
                    }
                    (Some(id), more) => {
                        let off = p.offset.unwrap() as usize;
                        let (path, staged, got) = fs.uploads.get_mut(id).unwrap();
                        if staged.len() < off + bytes.len() {
                            staged.resize(off + bytes.len(), 0);
                        }
                        staged[off..off + bytes.len()].copy_from_slice(&bytes);
                        *got += bytes.len();
                        let (path, n) = (path.clone(), staged.len());
                        if more {
                            (Some(id.clone()), false, n)
                        } else {
                            // This request counts itself as in flight.
                            if fs.in_flight > 1 {
                                fs.commit_overlaps += 1;
                            }
                            let (_, staged, got) = fs.uploads.remove(id).unwrap();
                            assert_eq!(got, staged.len(), "holes in the upload");
                            fs.commits += 1;
                            fs.files.insert(path, staged);
                            (None, true, n)
                        }
                    }
                };
                no_data(Ok(serde_json::to_value(FileWriteResult {
                    bytes_written: bytes.len() as u64,
                    size: size as u64,
                    upload_id,
                    committed,
                })
                .unwrap()))
            }
            _ => no_data(Err(ErrorObject::new(ErrorKind::MethodNotFound, "no"))),
        }
    }

    fn fs_agent(fs: Arc<Mutex<Fs>>) -> fake::FakeAgent {
        fake::spawn(move |c: FakeConn, _| {
            let fs = fs.clone();
            let h: fake::RawHandler = Arc::new(move |method, params, data| {
                let fs = fs.clone();
                Box::pin(async move {
                    let delay = {
                        let mut f = fs.lock().unwrap();
                        f.in_flight += 1;
                        f.max_in_flight = f.max_in_flight.max(f.in_flight);
                        (params["offset"].as_u64().unwrap_or(0) / 7 % 4) * 3
                    };
                    tokio::time::sleep(Duration::from_millis(delay + 1)).await;
                    let r = handle(&fs, &method, params, data);
                    fs.lock().unwrap().in_flight -= 1;
                    r
                })
            });
            fake::serve_raw(c, h)
        })
    }

    fn data(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x1234_5678;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect()
    }

    fn opts() -> ClientOptions {
        ClientOptions {
            call_timeout: Duration::from_secs(5),
            ..ClientOptions::default()
        }
    }

    #[tokio::test]
    async fn push_then_pull_round_trips_with_chunks_in_flight() {
        round_trip(false).await;
    }

    #[tokio::test]
    async fn push_then_pull_round_trips_through_attachments() {
        round_trip(true).await;
    }

    async fn round_trip(attachments: bool) {
        let fs = Arc::new(Mutex::new(Fs {
            short_read: u64::MAX,
            attachments,
            ..Fs::default()
        }));
        let agent = fs_agent(fs.clone());
        let client = crate::Client::connect_with(&agent.path, opts())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        let content = data(100_003);
        std::fs::write(&src, &content).unwrap();

        let mut last = None;
        let s = client
            .push(&src, "/tmp/kvmmanager/big", PushOptions::default(), |p| {
                last = Some(p)
            })
            .await
            .unwrap();
        assert_eq!(s.bytes, content.len() as u64);
        assert_eq!(
            last,
            Some(Progress {
                done: content.len() as u64,
                total: Some(content.len() as u64)
            })
        );
        {
            let f = fs.lock().unwrap();
            assert_eq!(f.files["/tmp/kvmmanager/big"], content);
            assert!(f.max_in_flight > 1, "chunks went one at a time");
            assert_eq!(f.commits, 1);
            assert_eq!(f.commit_overlaps, 0, "the commit overlapped other chunks");
            assert_eq!(f.writes.first(), Some(&(false, true)));
            assert_eq!(f.writes.last(), Some(&(true, false)));
            assert!(f.writes.len() > 30);
        }

        fs.lock().unwrap().max_in_flight = 0;
        let dst = dir.path().join("dst.bin");
        let s = client
            .pull("/tmp/kvmmanager/big", &dst, |_| {})
            .await
            .unwrap();
        assert_eq!(s.bytes, content.len() as u64);
        assert_eq!(std::fs::read(&dst).unwrap(), content);
        {
            let f = fs.lock().unwrap();
            assert!(f.max_in_flight > 1);
            if attachments {
                // Every chunk both ways went raw.
                assert_eq!(f.attachments_in, f.writes.len());
                assert_eq!(f.attachments_out, f.reads);
            } else {
                assert_eq!((f.attachments_in, f.attachments_out), (0, 0));
            }
        }
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[tokio::test]
    async fn short_reads_are_continued_and_pull_into_a_directory_keeps_the_name() {
        let content = data(5_500);
        let mut fs = Fs {
            short_read: 333,
            ..Fs::default()
        };
        fs.files.insert("/var/log/app.log".into(), content.clone());
        let agent = fs_agent(Arc::new(Mutex::new(fs)));
        let client = crate::Client::connect_with(&agent.path, opts())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        client
            .pull("/var/log/app.log", dir.path(), |_| {})
            .await
            .unwrap();
        assert_eq!(std::fs::read(dir.path().join("app.log")).unwrap(), content);
    }

    #[tokio::test]
    async fn small_and_empty_files_take_one_call() {
        let fs = Arc::new(Mutex::new(Fs {
            short_read: u64::MAX,
            ..Fs::default()
        }));
        let agent = fs_agent(fs.clone());
        let client = crate::Client::connect_with(&agent.path, opts())
            .await
            .unwrap();
        for content in [data(0), data(10), data(2000)] {
            fs.lock().unwrap().writes.clear();
            let mut reader = &content[..];
            client
                .push_from(
                    &mut reader,
                    Path::new("pipe"),
                    None,
                    "/tmp/kvmmanager/s",
                    PushOptions::default(),
                    |_| {},
                )
                .await
                .unwrap();
            let f = fs.lock().unwrap();
            assert_eq!(f.writes, vec![(false, false)]);
            assert_eq!(f.files["/tmp/kvmmanager/s"], content);
        }
        // And an empty file pulls back empty.
        let dir = tempfile::tempdir().unwrap();
        fs.lock().unwrap().files.insert("/e".into(), Vec::new());
        let s = client
            .pull("/e", dir.path().join("e"), |_| {})
            .await
            .unwrap();
        assert_eq!(s.bytes, 0);
        assert_eq!(std::fs::read(dir.path().join("e")).unwrap(), b"");
    }

    #[tokio::test]
    async fn append_sends_its_chunks_one_by_one_in_order() {
        let fs = Arc::new(Mutex::new(Fs::default()));
        fs.lock()
            .unwrap()
            .files
            .insert("/tmp/kvmmanager/log".into(), b"abc".to_vec());
        let agent = fs_agent(fs.clone());
        let client = crate::Client::connect_with(&agent.path, opts())
            .await
            .unwrap();
        let content = data(10_000);
        let mut reader = &content[..];
        let o = PushOptions {
            mode: WriteMode::Append,
            permissions: None,
        };
        let s = client
            .push_from(
                &mut reader,
                Path::new("pipe"),
                None,
                "/tmp/kvmmanager/log",
                o,
                |_| {},
            )
            .await
            .unwrap();
        assert_eq!(s.bytes, 10_000);
        let f = fs.lock().unwrap();
        assert!(f.writes.len() > 2);
        assert!(f.writes.iter().all(|w| *w == (false, false)));
        assert_eq!(f.files["/tmp/kvmmanager/log"][..3], *b"abc");
        assert_eq!(f.files["/tmp/kvmmanager/log"][3..], content[..]);
    }

    #[tokio::test]
    async fn requests_over_the_agents_limit_are_refused_before_sending() {
        let fs = Arc::new(Mutex::new(Fs::default()));
        let agent = fs_agent(fs.clone());
        let client = crate::Client::connect_with(&agent.path, opts())
            .await
            .unwrap();
        client.limits().await.unwrap();
        let big = "x".repeat(MAX_MESSAGE as usize);
        let e = client
            .call_raw(
                "file_write",
                serde_json::json!({"path": "/tmp/a", "content": big}),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::RequestTooLarge {
                    limit: MAX_MESSAGE,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(fs.lock().unwrap().writes.is_empty());
    }

    #[tokio::test]
    async fn pull_fails_if_the_file_changes_size_and_leaves_nothing() {
        let mut fs = Fs {
            short_read: u64::MAX,
            grow_after_reads: Some(2),
            ..Fs::default()
        };
        fs.files.insert("/var/log/busy".into(), data(20_000));
        let agent = fs_agent(Arc::new(Mutex::new(fs)));
        let client = crate::Client::connect_with(&agent.path, opts())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = client
            .pull("/var/log/busy", dir.path().join("busy"), |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.root(),
                ClientError::FileChanged {
                    expected: 20_000,
                    actual: 20_001,
                    ..
                }
            ),
            "{e:?}"
        );
        // It says how far it got: part of the file, not all of it.
        assert!(
            matches!(e.transfer_done(), Some(d) if d > 0 && d < 20_000),
            "{e:?}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn missing_guest_file_and_missing_local_file_are_reported() {
        let agent = fs_agent(Arc::new(Mutex::new(Fs::default())));
        let client = crate::Client::connect_with(&agent.path, opts())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = client
            .pull("/nope", dir.path().join("x"), |_| {})
            .await
            .unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::NotFound));
        let e = client
            .push(
                dir.path().join("absent"),
                "/tmp/x",
                PushOptions::default(),
                |_| {},
            )
            .await
            .unwrap_err();
        assert!(matches!(e.root(), ClientError::LocalFile { .. }), "{e:?}");
        assert_eq!(e.transfer_done(), Some(0));
    }
}
