//! Pipes that carry file data to the host without passing through the
//! agent's memory (`splice(2)`), for [`crate::files`] and
//! [`crate::payload`]. Safe wrappers over nix; no `unsafe` of their own.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

/// A pipe whose buffer holds at least a given number of bytes.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A pipe (close-on-exec) that holds `capacity` bytes in page-sized
    /// buffers: `F_SETPIPE_SZ`, which fails above
    /// `/proc/sys/fs/pipe-max-size` (1 MiB by default) without
    /// `CAP_SYS_RESOURCE`.
    pub(crate) fn with_capacity(capacity: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let wanted = libc::c_int::try_from(capacity).map_err(|_| Errno::EINVAL)?;
        let got = fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(wanted))?;
        if got < wanted {
            return Err(Errno::ENOMEM.into());
        }
        Ok(Pipe { read, write })
    }

    /// Moves up to `len` bytes of `file` from `offset` into the pipe, by
    /// reference to the page cache where the file system allows it. Blocks
    /// on the file's I/O, never on the pipe: it stops early at the end of
    /// the file and when the pipe is full. Returns the bytes moved.
    pub(crate) fn fill_from(&self, file: &File, offset: u64, len: usize) -> io::Result<usize> {
        let mut off = libc::loff_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let mut moved = 0;
        while moved < len {
            match splice(
                file,
                Some(&mut off),
                &self.write,
                None,
                len - moved,
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(0) => break,
                Ok(n) => moved += n,
                Err(Errno::EINTR) => {}
                // The pipe is full (its buffers are per page: a range that
                // does not start on a page boundary needs one more).
                Err(Errno::EAGAIN) if moved > 0 => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(moved)
    }

    /// Makes `to` hold references to the pages of the `len` bytes this pipe
    /// holds (`tee(2)`: nothing is copied, and this pipe keeps its bytes).
    /// `to` must be empty and as large as this pipe; returns the bytes it
    /// took, all `len` unless it had less room.
    pub(crate) fn tee_into(&self, to: &Pipe, len: usize) -> io::Result<usize> {
        loop {
            match nix::fcntl::tee(&self.read, &to.write, len, SpliceFFlags::SPLICE_F_NONBLOCK) {
                Err(Errno::EINTR) => {}
                r => return r.map_err(io::Error::from),
            }
        }
    }

    /// The end the pipe's bytes are read from.
    pub(crate) fn reader(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Reads `len` bytes out of the pipe into memory, for a writer that
    /// cannot take them by `splice`.
    pub(crate) fn drain(&self, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            match nix::unistd::read(self.read.as_raw_fd(), &mut buf[filled..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(buf)
    }
}

/// One non-blocking `splice` of up to `len` bytes from the pipe end `from`
/// into `to` (a port or a socket): the bytes moved, or `WouldBlock` when
/// `to` takes nothing now.
pub(crate) fn splice_out(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    len: usize,
) -> io::Result<usize> {
    loop {
        match splice(
            from,
            None,
            to,
            None,
            len,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        ) {
            Err(Errno::EINTR) => {}
            r => return r.map_err(io::Error::from),
        }
    }
}

/// A file holding `data`, already unlinked, to fill pipes from (tests).
#[cfg(test)]
pub(crate) fn file_holding(data: &[u8]) -> File {
    use std::io::Write;
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(data).unwrap();
    file
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_file_range_goes_through_the_pipe_intact() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let file = file_holding(&data);
        let pipe = Pipe::with_capacity(1 << 20).unwrap();
        // From a page boundary, to the end of the file (fewer than asked).
        assert_eq!(
            pipe.fill_from(&file, 4096, 1 << 20).unwrap(),
            data.len() - 4096
        );
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let want = data.len() - 4096;
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; want];
            b.read_exact(&mut got).unwrap();
            got
        });
        let mut left = want;
        while left > 0 {
            left -= splice_out(pipe.reader(), a.as_fd(), left).unwrap();
        }
        a.flush().unwrap();
        assert!(reader.join().unwrap() == data[4096..], "the bytes differ");
    }

    #[test]
    fn tee_leaves_the_bytes_in_the_first_pipe_and_gives_them_to_the_second() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 241) as u8).collect();
        let file = file_holding(&data);
        let (pipe, held) = (
            Pipe::with_capacity(1 << 17).unwrap(),
            Pipe::with_capacity(1 << 17).unwrap(),
        );
        assert_eq!(pipe.fill_from(&file, 0, data.len()).unwrap(), data.len());
        assert_eq!(pipe.tee_into(&held, data.len()).unwrap(), data.len());
        assert!(pipe.drain(data.len()).unwrap() == data);
        assert!(held.drain(data.len()).unwrap() == data);
    }

    #[test]
    fn a_full_pipe_stops_the_fill_early_and_drain_reads_it() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 13) as u8).collect();
        let file = file_holding(&data);
        // One page of pipe: a range starting inside a page fills it with
        // the rest of that page only.
        let pipe = Pipe::with_capacity(4096).unwrap();
        let moved = pipe.fill_from(&file, 100, 8192).unwrap();
        assert!(moved > 0 && moved <= 4096, "{moved}");
        assert_eq!(pipe.drain(moved).unwrap(), &data[100..100 + moved]);
    }
}
