//! `file_read`: whole files and ranges, inline or as an attachment: a
//! large chunk spliced into a pipe (see [`crate::payload`]), else read into
//! a pooled buffer.

use super::*;
use crate::payload::{Payload, PipeChunk, PipePool};

/// Smallest `file_read` attachment chunk read into a pooled buffer (1 MiB
/// each); smaller ones get a buffer of their own size.
const POOLED_READ_MIN: usize = 64 * 1024;

impl FileService {
    /// `file_read`; with `encoding: attachment` the bytes are returned
    /// beside the result, which then has an empty `content`.
    pub async fn read(
        &self,
        params: FileReadParams,
    ) -> Result<(FileReadResult, Option<Payload>), FileError> {
        let policy = Arc::clone(&self.read_policy);
        let limit = self.config.security.max_file_size;
        let buffers = Arc::clone(&self.transfer_buffers);
        let pipes = Arc::clone(&self.transfer_pipes);
        let zero_copy = self.config.zero_copy_reads;
        blocking(move || read_blocking(&policy, &params, limit, &buffers, &pipes, zero_copy)).await
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends;
/// returns the bytes read.
fn read_at_full(file: &File, buf: &mut [u8], offset: u64, path: &str) -> Result<usize, FileError> {
    let mut filled = 0usize;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break, // The file shrank.
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read", path)(e)),
        }
    }
    Ok(filled)
}

/// The page size `splice` moves file data in: a chunk that starts on a
/// page boundary fits a pipe of its own length (the pool's 1 MiB pipes
/// for any chunk up to 1 MiB).
pub(super) const PAGE: u64 = 4096;

/// How an opened file's attachment chunks are made, decided once per file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Splice {
    /// Read into a buffer (`zero_copy_reads` off).
    Off,
    /// Spliced into a pipe; the file is on tmpfs, whose pages the port can
    /// never take out of the page cache.
    On,
    /// Spliced into a pipe, its pages held by a second one until written
    /// ([`hold_pages`]).
    HoldingPages,
}

impl Splice {
    /// The mode for `file` with `zero_copy_reads` as given.
    pub(super) fn for_file(file: &File, zero_copy_reads: bool) -> Splice {
        if !zero_copy_reads {
            Splice::Off
        } else if sys::on_tmpfs(file) {
            Splice::On
        } else {
            Splice::HoldingPages
        }
    }
}

/// Moves `want` bytes of `file` at `offset` into a pipe of their own:
/// `None` where the file system or the pipe size limit does not allow it
/// (the caller reads into a buffer instead). Fewer bytes than `want` only
/// at the end of the file (the host asks again for the rest otherwise).
fn splice_chunk(
    file: &File,
    offset: u64,
    want: usize,
    path: &str,
    splice: Splice,
    pipes: &Arc<PipePool>,
) -> Result<Option<(PipeChunk, usize)>, FileError> {
    // Chunks are at most MAX_READ_CHUNK, the pool's pipes' capacity (and
    // the pooled buffers' size, which the other path fills).
    debug_assert!(want <= pipes.capacity());
    let Ok(pipe) = pipes.take() else {
        return Ok(None);
    };
    match pipe.fill_from(file, offset, want) {
        Ok(moved) => {
            let chunk = PipeChunk::new(pipe, moved, pipes);
            Ok(if splice == Splice::HoldingPages {
                hold_pages(chunk, pipes.capacity()).map(|chunk| (chunk, moved))
            } else {
                Some((chunk, moved))
            })
        }
        // Not every file system can splice (EINVAL): read it instead.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Keeps a spliced chunk from taking the file out of the guest's page
/// cache: `None` where that cannot be made sure of (the caller reads into
/// a buffer instead).
///
/// `virtio_console` steals every page spliced into it that it can lock and
/// detach from the page cache (Linux 6.1's `pipe_to_sg`: a clean, unmapped
/// page of a disk file system such as ext4), so a pull would leave the
/// guest with the file evicted (measured in the Debian guest: 2,048 cached
/// pages of an 8 MiB file, 12 after one pull). A second pipe holding
/// references to the same pages (`tee`) until the chunk has been written
/// makes each steal fail, and the port copies the page as it does for
/// tmpfs, whose pages it can never take (no second pipe there:
/// [`Splice::On`]).
fn hold_pages(chunk: PipeChunk, capacity: usize) -> Option<PipeChunk> {
    if chunk.len() == 0 {
        return Some(chunk);
    }
    let held = sys::Pipe::with_capacity(capacity).ok()?;
    match chunk.pipe().tee_into(&held, chunk.len()) {
        Ok(n) if n == chunk.len() => Some(chunk.holding(held)),
        _ => None,
    }
}

/// `want` bytes of `file` from `offset` as an attachment: spliced into a
/// pipe of their own where the file system allows it (a chunk of 64 KiB
/// or more from a page boundary, `splice` not [`Splice::Off`]), else read
/// into a buffer
/// (pooled for a large chunk, of its own size otherwise). Fewer bytes than
/// `want` only at the end of the file.
pub(super) fn attachment_chunk(
    file: &File,
    offset: u64,
    want: usize,
    path: &str,
    buffers: &Arc<BufferPool>,
    pipes: &Arc<PipePool>,
    splice: Splice,
) -> Result<(Payload, usize), FileError> {
    let spliced = if splice != Splice::Off && want >= POOLED_READ_MIN && offset % PAGE == 0 {
        splice_chunk(file, offset, want, path, splice, pipes)?
    } else {
        None
    };
    Ok(if let Some((chunk, filled)) = spliced {
        (Payload::Pipe(chunk), filled)
    } else if want >= POOLED_READ_MIN {
        let mut buf = buffers.take();
        let filled = read_at_full(file, &mut buf.space()[..want], offset, path)?;
        buf.set_len(filled);
        (Payload::Bytes(buf.into_bytes()), filled)
    } else {
        let mut buf = vec![0u8; want];
        let filled = read_at_full(file, &mut buf, offset, path)?;
        buf.truncate(filled);
        (Payload::Bytes(Bytes::from(buf)), filled)
    })
}

/// Opens `path` for reading through the policy; its size, which must be
/// within `limit` (`max_file_size`).
pub(super) fn open_within(
    policy: &PathPolicy,
    path: &str,
    limit: u64,
) -> Result<(File, u64), FileError> {
    let file = policy.open_read(path)?;
    let size = file.metadata().map_err(io_err("read", path))?.len();
    if size > limit {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            size,
            limit,
        });
    }
    Ok((file, size))
}

fn read_blocking(
    policy: &PathPolicy,
    params: &FileReadParams,
    limit: u64,
    buffers: &Arc<BufferPool>,
    pipes: &Arc<PipePool>,
    zero_copy_reads: bool,
) -> Result<(FileReadResult, Option<Payload>), FileError> {
    let path = params.path.as_str();
    let (file, size) = open_within(policy, path, limit)?;
    let length = params.length.unwrap_or(MAX_READ_CHUNK).min(MAX_READ_CHUNK);
    let offset = params.offset;
    // At most MAX_READ_CHUNK (1 MiB).
    let want = size.saturating_sub(offset).min(length) as usize;
    if params.encoding == Encoding::Attachment {
        let splice = Splice::for_file(&file, zero_copy_reads);
        let (data, filled) = attachment_chunk(&file, offset, want, path, buffers, pipes, splice)?;
        let bytes_read = filled as u64;
        let result = FileReadResult {
            content: String::new(),
            encoding: Encoding::Attachment,
            offset,
            bytes_read,
            eof: offset.saturating_add(bytes_read) >= size,
            size,
        };
        return Ok((result, Some(data)));
    }
    let mut buf = vec![0u8; want];
    let filled = read_at_full(&file, &mut buf, offset, path)?;
    buf.truncate(filled);
    let content = match params.encoding {
        // Returned above.
        Encoding::Attachment => String::new(),
        Encoding::Base64 => Encoding::Base64.encode_lossy(&buf),
        Encoding::Utf8 => match std::str::from_utf8(&buf) {
            Ok(s) => s.to_owned(),
            // The chunk ends inside a character the file completes: return
            // the whole characters only; bytes_read says how many.
            Err(e)
                if e.error_len().is_none()
                    && e.valid_up_to() > 0
                    && offset + (filled as u64) < size =>
            {
                buf.truncate(e.valid_up_to());
                // Valid up to here by construction.
                String::from_utf8_lossy(&buf).into_owned()
            }
            Err(e) => {
                return Err(FileError::NotUtf8 {
                    path: path.to_owned(),
                    at: offset + e.valid_up_to() as u64,
                })
            }
        },
    };
    let bytes_read = buf.len() as u64;
    let result = FileReadResult {
        content,
        encoding: params.encoding,
        offset,
        bytes_read,
        eof: offset.saturating_add(bytes_read) >= size,
        size,
    };
    Ok((result, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::test_env::*;

    /// A 1 MiB-class chunk from a page boundary comes as a pipe, any other
    /// (small, unaligned, or with zero_copy_reads off) as bytes; the bytes
    /// are the file's either way.
    #[tokio::test]
    async fn large_aligned_chunks_are_spliced_and_others_read() {
        let e = env_with(8 << 20);
        let p = format!("{}/big", e.root);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let cases: &[(u64, Option<u64>, bool)] = &[
            (0, None, true),
            (1 << 20, None, true),
            // The last chunk, shorter than asked.
            (2 << 20, None, true),
            (4096, Some(65536), true),
            // Unaligned, or under 64 KiB: read into a buffer.
            (100, None, false),
            (0, Some(1000), false),
        ];
        for &(offset, length, spliced) in cases {
            let (r, payload) = e
                .svc
                .read(FileReadParams {
                    offset,
                    length,
                    encoding: Encoding::Attachment,
                    ..rp(&p)
                })
                .await
                .unwrap();
            let payload = payload.unwrap();
            assert_eq!(
                matches!(payload, Payload::Pipe(_)),
                spliced,
                "{offset} {length:?}"
            );
            let want = &data[offset as usize..][..r.bytes_read as usize];
            assert_eq!(payload.len() as u64, r.bytes_read);
            assert!(
                payload.into_bytes().unwrap()[..] == *want,
                "{offset} {length:?}"
            );
            let end = (offset + length.unwrap_or(1 << 20)).min(data.len() as u64);
            assert_eq!(r.bytes_read, end - offset, "{offset} {length:?}");
        }
        // With zero_copy_reads off, never a pipe.
        let mut config = (*e.svc.config).clone();
        config.zero_copy_reads = false;
        let svc = FileService::new(Arc::new(config));
        let (_, payload) = svc
            .read(FileReadParams {
                encoding: Encoding::Attachment,
                ..rp(&p)
            })
            .await
            .unwrap();
        assert!(matches!(payload, Some(Payload::Bytes(_))));
    }

    #[tokio::test]
    async fn read_ranges_and_eof() {
        let e = env();
        let p = format!("{}/f.txt", e.root);
        std::fs::write(&p, "hello world").unwrap();
        let cases: &[(u64, Option<u64>, &str, bool)] = &[
            (0, None, "hello world", true),
            (0, Some(5), "hello", false),
            (6, Some(5), "world", true),
            (6, Some(100), "world", true),
            (11, None, "", true),
            (50, None, "", true),
            (3, Some(0), "", false),
        ];
        for (offset, length, want, eof) in cases {
            let r = e
                .svc
                .read_inline(FileReadParams {
                    offset: *offset,
                    length: *length,
                    ..rp(&p)
                })
                .await
                .unwrap();
            assert_eq!(r.content, *want, "{offset} {length:?}");
            assert_eq!(r.bytes_read, want.len() as u64);
            assert_eq!(r.eof, *eof, "{offset} {length:?}");
            assert_eq!(r.size, 11);
            assert_eq!(r.offset, *offset);
        }
    }

    #[tokio::test]
    async fn read_utf8_boundaries_and_base64() {
        let e = env();
        let p = format!("{}/u.txt", e.root);
        std::fs::write(&p, "a\u{e9}b").unwrap(); // 61 c3 a9 62
        let r = e
            .svc
            .read_inline(FileReadParams {
                length: Some(2),
                ..rp(&p)
            })
            .await
            .unwrap();
        assert_eq!((r.content.as_str(), r.bytes_read, r.eof), ("a", 1, false));
        let r = e
            .svc
            .read_inline(FileReadParams {
                offset: 1,
                length: Some(2),
                ..rp(&p)
            })
            .await
            .unwrap();
        assert_eq!((r.content.as_str(), r.bytes_read), ("\u{e9}", 2));
        // Starting inside a character is invalid UTF-8.
        let err = e
            .svc
            .read_inline(FileReadParams {
                offset: 2,
                ..rp(&p)
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidEncoding);
        let bin = format!("{}/bin", e.root);
        std::fs::write(&bin, [0u8, 0xff, 0xfe, b'x']).unwrap();
        let err = e.svc.read_inline(rp(&bin)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidEncoding);
        assert!(err.to_string().contains("use encoding base64"), "{err}");
        let r = e
            .svc
            .read_inline(FileReadParams {
                encoding: Encoding::Base64,
                ..rp(&bin)
            })
            .await
            .unwrap();
        assert_eq!(
            Encoding::Base64.decode(&r.content).unwrap(),
            [0u8, 0xff, 0xfe, b'x']
        );
        assert_eq!(r.encoding, Encoding::Base64);
        // A truncated character at the end of the file is invalid too.
        let cut = format!("{}/cut", e.root);
        std::fs::write(&cut, [b'a', 0xc3]).unwrap();
        let err = e.svc.read_inline(rp(&cut)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidEncoding);
    }

    #[tokio::test]
    async fn read_refusals() {
        let e = env_with(10);
        let big = format!("{}/big", e.root);
        std::fs::write(&big, "0123456789A").unwrap();
        let err = e.svc.read_inline(rp(&big)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TooLarge);
        let obj = crate::error::to_error_object(&err);
        let data = obj.data.unwrap();
        assert_eq!(
            (data["size"].as_u64(), data["limit"].as_u64()),
            (Some(11), Some(10))
        );
        let fifo = format!("{}/fifo", e.root);
        nix::unistd::mkfifo(
            fifo.as_str(),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        for (path, kind) in [
            (fifo, ErrorKind::NotARegularFile),
            (format!("{}/sub", e.root), ErrorKind::NotARegularFile),
            (format!("{}/x", e.outside), ErrorKind::PolicyDenied),
            (format!("{}/nope", e.root), ErrorKind::NotFound),
        ] {
            let err = e.svc.read_inline(rp(&path)).await.unwrap_err();
            assert_eq!(err.kind(), kind, "{path}: {err}");
        }
    }
}
