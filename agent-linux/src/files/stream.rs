//! `file_read_stream`: a file's bytes from an offset to the size it had
//! when opened, carried by a stream (`crate::streams`) as fast as the
//! host's credit allows, then the agent's side closed.
//!
//! The file is opened through the read policy once, like a `file_read`;
//! each chunk (up to [`FILE_STREAM_CHUNK`], within the credit, ending on a
//! page boundary where it can) is spliced into a pipe of its own (one the
//! last chunks left empty, [`crate::payload::PipePool`]) on a blocking
//! thread and from there into the port by the writer, as a
//! `file_read` attachment is ([`read::attachment_chunk`]). No request per
//! chunk: a pull costs one request, not one per MiB. A file that shrinks
//! meanwhile ends the stream early (the host sees fewer bytes than
//! `size`); one that grows is read up to the size it had.

use agent_common::methods::{FileReadStreamParams, FileReadStreamResult, FILE_STREAM_CHUNK};

use super::read::{attachment_chunk, open_within, Splice, PAGE};
use super::*;
use crate::session::Session;
use crate::streams::{host_window, spawn_sender, Stream};

impl FileService {
    /// `file_read_stream`: checks, opens the file and leaves the sending
    /// to a task of its own.
    pub async fn read_stream(
        &self,
        session: &Session,
        p: FileReadStreamParams,
    ) -> Result<FileReadStreamResult, FileError> {
        let credit = host_window(p.window).map_err(|reason| FileError::InvalidStream { reason })?;
        let policy = Arc::clone(&self.read_policy);
        let limit = self.config.security.max_file_size;
        let path = p.path;
        let buffers = Arc::clone(&self.transfer_buffers);
        let pipes = Arc::clone(&self.transfer_pipes);
        let zero_copy = self.config.zero_copy_reads;
        let source = blocking(move || {
            let (file, size) = open_within(&policy, &path, limit)?;
            let splice = Splice::for_file(&file, zero_copy);
            Ok(Arc::new(Source {
                file,
                path,
                size,
                buffers,
                pipes,
                splice,
            }))
        })
        .await?;
        let size = source.size;
        spawn_sender(session, p.stream, credit, |stream| {
            send_file(stream, source, p.offset)
        })?;
        Ok(FileReadStreamResult {
            stream: p.stream,
            size,
        })
    }
}

/// The file a stream sends, up to `size`, and how its chunks are made.
struct Source {
    file: File,
    path: String,
    size: u64,
    buffers: Arc<BufferPool>,
    pipes: Arc<PipePool>,
    splice: Splice,
}

/// Sends the file's chunks from `offset` as the credit allows, then closes
/// the agent's side; a read error resets the stream with its message.
async fn send_file(stream: Stream, src: Arc<Source>, mut offset: u64) {
    while offset < src.size {
        let Ok(room) = stream.writable_up_to(FILE_STREAM_CHUNK).await else {
            return;
        };
        // Within the credit and the file's rest, ending on a page boundary
        // where that leaves anything: a host that grants odd amounts must
        // not push every later chunk off the boundaries splicing needs.
        // (All the credit is still used: a host may grant only once it has
        // had everything it granted.)
        let mut end = offset + (room as u64).min(src.size - offset);
        if end < src.size && end - end % PAGE > offset {
            end -= end % PAGE;
        }
        // At most FILE_STREAM_CHUNK, which fits usize.
        let want = (end - offset) as usize;
        let s = Arc::clone(&src);
        let chunk = blocking(move || {
            attachment_chunk(
                &s.file, offset, want, &s.path, &s.buffers, &s.pipes, s.splice,
            )
        })
        .await;
        match chunk {
            // The file shrank: what there was has been sent.
            Ok((_, 0)) => break,
            Ok((data, n)) => {
                if stream.send(data).await.is_err() {
                    return;
                }
                offset += n as u64;
            }
            Err(e) => {
                tracing::warn!(path = %src.path, error = %e, "file_read_stream stopped");
                stream.reset(&format!("read_failed: {e}")).await;
                return;
            }
        }
    }
    let _ = stream.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Outgoing;
    use crate::files::test_env::*;
    use crate::session::test_session::{line, session};
    use agent_common::methods::MAX_STREAM_WINDOW;
    use std::time::Duration;
    use tokio::sync::mpsc;

    fn params(path: &str, window: Option<u64>) -> FileReadStreamParams {
        FileReadStreamParams {
            path: path.to_owned(),
            offset: 0,
            stream: 9,
            window,
        }
    }

    /// The next message on the stream: its method and its bytes.
    async fn next(rx: &mut mpsc::Receiver<Outgoing>) -> (String, Vec<u8>) {
        let o = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a message within 10 s")
            .expect("the session is open");
        let v = line(&o);
        assert_eq!(v["params"]["stream"], 9, "{v}");
        let data = o.attachment.map(|p| p.into_bytes().unwrap().to_vec());
        (
            v["method"].as_str().unwrap().to_owned(),
            data.unwrap_or_default(),
        )
    }

    /// Whole chunks of a file from a page boundary (spliced) and its
    /// unaligned rest arrive in order, each within the credit, then the
    /// agent's side closes.
    #[tokio::test]
    async fn sends_the_file_within_the_credit_then_closes() {
        let e = env_with(8 << 20);
        let p = format!("{}/big", e.root);
        let data: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let (s, mut rx, _keep) = session();
        let window = 3 << 20;
        let r = e
            .svc
            .read_stream(&s, params(&p, Some(window)))
            .await
            .unwrap();
        assert_eq!((r.stream, r.size), (9, data.len() as u64));
        let mut got = Vec::new();
        loop {
            let (method, bytes) = next(&mut rx).await;
            if method == "stream_close" {
                break;
            }
            assert_eq!(method, "stream_data");
            assert!(bytes.len() as u64 <= FILE_STREAM_CHUNK);
            got.extend_from_slice(&bytes);
        }
        assert_eq!(got, data);
    }

    /// With a window of 100 bytes the agent sends 100 bytes and waits;
    /// each grant lets exactly that much more go.
    #[tokio::test]
    async fn waits_for_credit() {
        let e = env();
        let p = format!("{}/f", e.root);
        std::fs::write(&p, vec![7u8; 250]).unwrap();
        let (s, mut rx, _keep) = session();
        e.svc.read_stream(&s, params(&p, Some(100))).await.unwrap();
        assert_eq!(next(&mut rx).await, ("stream_data".into(), vec![7u8; 100]));
        let nothing = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(nothing.is_err(), "sent beyond its credit");
        s.streams().credit(9, 200).unwrap();
        assert_eq!(next(&mut rx).await, ("stream_data".into(), vec![7u8; 150]));
        assert_eq!(next(&mut rx).await.0, "stream_close");
    }

    /// Credit of odd sizes: each chunk ends on a page boundary where it
    /// can, the credit is used up all the same, and the chunks get back
    /// onto page boundaries after an odd one.
    #[tokio::test]
    async fn odd_credit_keeps_chunks_on_page_boundaries() {
        let e = env();
        let p = format!("{}/f", e.root);
        let data: Vec<u8> = (0..30_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let (s, mut rx, _keep) = session();
        e.svc
            .read_stream(&s, params(&p, Some(10_000)))
            .await
            .unwrap();
        // 10,000 of credit: two pages, then the 1,808 left over; 10,000
        // more: up to the next page boundary (16,384), then what is left;
        // then the file's rest at once.
        let mut sizes = Vec::new();
        let mut got = Vec::new();
        for (grant, chunks) in [(0, 2), (10_000, 2), (100_000, 1)] {
            if grant > 0 {
                s.streams().credit(9, grant).unwrap();
            }
            for _ in 0..chunks {
                let (method, bytes) = next(&mut rx).await;
                assert_eq!(method, "stream_data");
                sizes.push(bytes.len());
                got.extend_from_slice(&bytes);
            }
        }
        assert_eq!(next(&mut rx).await.0, "stream_close");
        assert_eq!(sizes, [8192, 1808, 6384, 3616, 10_000]);
        assert_eq!(got, data);
    }

    /// From an offset, and from the end (nothing but the close).
    #[tokio::test]
    async fn starts_at_the_offset() {
        let e = env();
        let p = format!("{}/f", e.root);
        std::fs::write(&p, b"0123456789").unwrap();
        for (offset, want) in [(4u64, &b"456789"[..]), (10, b""), (99, b"")] {
            let (s, mut rx, _keep) = session();
            let r = e
                .svc
                .read_stream(
                    &s,
                    FileReadStreamParams {
                        offset,
                        ..params(&p, None)
                    },
                )
                .await
                .unwrap();
            assert_eq!(r.size, 10);
            let mut got = Vec::new();
            loop {
                let (method, bytes) = next(&mut rx).await;
                if method == "stream_close" {
                    break;
                }
                got.extend_from_slice(&bytes);
            }
            assert_eq!(got, want, "offset {offset}");
        }
    }

    /// Refusals open no stream: outside the roots, over max_file_size, a
    /// window of 0 or over the most, an id already open.
    #[tokio::test]
    async fn refusals_open_no_stream() {
        let e = env_with(1000);
        let inside = format!("{}/f", e.root);
        std::fs::write(&inside, vec![0u8; 10]).unwrap();
        let big = format!("{}/big", e.root);
        std::fs::write(&big, vec![0u8; 1001]).unwrap();
        let outside = format!("{}/f", e.outside);
        std::fs::write(&outside, b"secret").unwrap();
        let (s, mut rx, _keep) = session();
        let cases = [
            (params(&outside, None), ErrorKind::PolicyDenied),
            (params(&big, None), ErrorKind::TooLarge),
            (params(&inside, Some(0)), ErrorKind::InvalidParams),
            (
                params(&inside, Some(MAX_STREAM_WINDOW + 1)),
                ErrorKind::InvalidParams,
            ),
        ];
        for (p, kind) in cases {
            let err = e.svc.read_stream(&s, p.clone()).await.unwrap_err();
            assert_eq!(err.kind(), kind, "{p:?}: {err}");
        }
        assert!(s.streams().is_empty());
        assert!(rx.try_recv().is_err(), "a refusal sent nothing");
        // An id in use is refused and leaves the open stream alone.
        e.svc
            .read_stream(&s, params(&inside, Some(1)))
            .await
            .unwrap();
        let err = e
            .svc
            .read_stream(&s, params(&inside, None))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
        assert_eq!(s.streams().len(), 1);
    }

    /// A reset by the host stops the sending.
    #[tokio::test]
    async fn a_reset_stops_it() {
        let e = env_with(8 << 20);
        let p = format!("{}/big", e.root);
        std::fs::write(&p, vec![1u8; 3 << 20]).unwrap();
        let (s, mut rx, _keep) = session();
        e.svc
            .read_stream(&s, params(&p, Some(1 << 20)))
            .await
            .unwrap();
        assert_eq!(next(&mut rx).await.1.len(), 1 << 20);
        s.streams().reset(9).unwrap();
        s.streams().credit(9, 2 << 20).unwrap_err();
        let nothing = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(nothing.is_err(), "sent after the reset");
    }
}
