//! `file_write` with `mode: append`: beneath the root with
//! `O_APPEND|O_NOFOLLOW`, undone on a write error.

use super::*;

pub(super) fn append_blocking(
    policy: &PathPolicy,
    path: &str,
    data: &[u8],
    perms: u32,
    limit: u64,
) -> Result<FileWriteResult, FileError> {
    let (dir, name) = policy.open_parent_for_write(path)?;
    let not_regular = || FileError::NotRegularFile {
        path: path.to_owned(),
    };
    if let Some(st) = sys::lstatat(dir.as_fd(), &name).map_err(io_err("inspect", path))? {
        if sys::is_symlink(&st) {
            return Err(FileError::Symlink {
                path: path.to_owned(),
            });
        }
        if !sys::is_regular(&st) {
            return Err(not_regular());
        }
    }
    // O_NONBLOCK: a FIFO swapped in never blocks the open.
    let flags =
        libc::O_WRONLY | libc::O_APPEND | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let open = |extra| sys::openat2(dir.as_fd(), &name, flags | extra, perms, sys::BENEATH);
    let map_open = |e: io::Error| match e.raw_os_error() {
        Some(libc::ELOOP) => FileError::Symlink {
            path: path.to_owned(),
        },
        Some(libc::ENXIO) => not_regular(),
        _ => io_err("open", path)(e),
    };
    let (fd, created) = match open(libc::O_CREAT | libc::O_EXCL) {
        Ok(fd) => (fd, true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => (open(0).map_err(map_open)?, false),
        Err(e) => return Err(map_open(e)),
    };
    let mut file = File::from(fd);
    let remove_created = |file: &File| {
        if created {
            // Only if the name still is this file.
            if let (Ok(Some(st)), Ok(own)) =
                (sys::lstatat(dir.as_fd(), &name), sys::fstat(file.as_fd()))
            {
                if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino) {
                    let _ = sys::unlinkat(dir.as_fd(), &name);
                }
            }
        }
    };
    let st = sys::fstat(file.as_fd()).map_err(io_err("inspect", path))?;
    check_regular_single(&st, path)?;
    if created {
        if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(perms)) {
            remove_created(&file);
            return Err(io_err("set the permissions of", path)(e));
        }
    }
    let old_len = st.st_size as u64;
    let new_len = old_len.saturating_add(data.len() as u64);
    if new_len > limit {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            size: new_len,
            limit,
        });
    }
    if let Err(e) = file.write_all(data).and_then(|()| file.sync_data()) {
        if created {
            remove_created(&file);
        } else if let Err(t) = file.set_len(old_len) {
            tracing::warn!(%path, error = %t, "cannot undo a partial append");
        }
        return Err(io_err("append to", path)(e));
    }
    let size = file.metadata().map_err(io_err("append to", path))?.len();
    Ok(FileWriteResult {
        bytes_written: data.len() as u64,
        size,
        upload_id: None,
        committed: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::test_env::*;

    #[tokio::test]
    async fn append_creates_then_appends_and_refuses_hard_links() {
        let e = env();
        let p = format!("{}/log", e.root);
        let ap = |c: &str| FileWriteParams {
            mode: WriteMode::Append,
            permissions: Some(0o600),
            ..wp(&p, c)
        };
        let r = e.svc.write_inline(1, ap("ab")).await.unwrap();
        assert_eq!((r.size, r.committed), (2, true));
        assert_eq!(mode_of(&p), 0o600);
        let r = e.svc.write_inline(1, ap("cd")).await.unwrap();
        assert_eq!((r.bytes_written, r.size), (2, 4));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "abcd");
        let secret = format!("{}/secret", e.outside);
        std::fs::write(&secret, "S").unwrap();
        let hl = format!("{}/hard", e.root);
        std::fs::hard_link(&secret, &hl).unwrap();
        let err = e
            .svc
            .write_inline(
                1,
                FileWriteParams {
                    mode: WriteMode::Append,
                    ..wp(&hl, "x")
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PolicyDenied);
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "S");
        // And reading through the hard link is refused as well.
        let err = e.svc.read_inline(rp(&hl)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PolicyDenied);
    }
}
