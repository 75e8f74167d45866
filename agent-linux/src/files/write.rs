//! `file_write`: the request, and the atomic whole-file write through a
//! staging file renamed over the name (`Staged`), which uploads use too.

use super::*;

impl FileService {
    /// `file_write` on behalf of `session` (the host connection). With
    /// `encoding: attachment` the bytes are `attachment`, the raw bytes that
    /// followed the request line.
    pub async fn write(
        &self,
        session: u64,
        params: FileWriteParams,
        attachment: Option<Bytes>,
        gate: &CommitGate,
    ) -> Result<FileWriteResult, FileError> {
        let perms = match params.permissions {
            None => DEFAULT_PERMISSIONS,
            Some(mode) if mode & !ALLOWED_PERMISSIONS == 0 => mode,
            Some(mode) => return Err(FileError::BadPermissions { mode }),
        };
        let data = match (params.encoding, attachment) {
            (Encoding::Attachment, Some(data)) if params.content.is_empty() => data,
            (Encoding::Attachment, Some(_)) => {
                return Err(FileError::InvalidRequest {
                    reason: "with encoding attachment, content must be empty".into(),
                })
            }
            (Encoding::Attachment, None) => {
                return Err(FileError::InvalidRequest {
                    reason: "encoding attachment needs the data as the request's attachment \
                             (the attachment member and the raw bytes after the line)"
                        .into(),
                })
            }
            (_, Some(_)) => {
                return Err(FileError::InvalidRequest {
                    reason: "a request with an attachment must say encoding attachment".into(),
                })
            }
            (encoding, None) => Bytes::from(
                encoding
                    .decode(&params.content)
                    .map_err(FileError::Decode)?,
            ),
        };
        let limit = self.config.security.max_file_size;
        if let Some(id) = params.upload_id.clone() {
            return self.write_chunk(session, id, params, data, gate).await;
        }
        if params.offset.is_some_and(|o| o != 0) {
            return Err(FileError::InvalidRequest {
                reason: "offset is only allowed with upload_id".into(),
            });
        }
        let len = data.len() as u64;
        if len > limit {
            return Err(FileError::TooLarge {
                path: params.path,
                size: len,
                limit,
            });
        }
        let policy = Arc::clone(&self.write_policy);
        match (params.mode, params.more) {
            (WriteMode::Append, true) => Err(FileError::InvalidRequest {
                reason: "chunked uploads (more: true) need mode truncate or create_new".into(),
            }),
            (WriteMode::Append, false) => {
                let gate = gate.clone();
                blocking(move || {
                    gate.begin(&params.path)?;
                    append_blocking(&policy, &params.path, &data, perms, limit)
                })
                .await
            }
            (mode, false) => {
                let gate = gate.clone();
                blocking(move || {
                    let (dir, name) = policy.open_parent_for_write(&params.path)?;
                    let target = inspect_target(&dir, &name, &params.path, mode, perms)?;
                    let mut staged =
                        Staged::create(dir, name, target.perms, target.owner, &params.path)?;
                    staged
                        .file
                        .write_all(&data)
                        .map_err(io_err("write", &params.path))?;
                    gate.begin(&params.path)?;
                    staged.commit(mode, &params.path)?;
                    Ok(FileWriteResult {
                        bytes_written: len,
                        size: len,
                        upload_id: None,
                        committed: true,
                    })
                })
                .await
            }
            (mode, true) => {
                self.start_upload(session, params, mode, perms, data, gate)
                    .await
            }
        }
    }
}

/// A staging file in the target's directory, deleted on drop unless renamed into place.
pub(super) struct Staged {
    dir: OwnedFd,
    tmp_name: OsString,
    final_name: OsString,
    pub(super) file: File,
    live: bool,
}

impl Staged {
    /// Creates `.<name>.kvmtmp-<random>` in `dir` with exactly `perms` (and `owner`).
    pub(super) fn create(
        dir: OwnedFd,
        final_name: OsString,
        perms: u32,
        owner: Option<(u32, u32)>,
        path: &str,
    ) -> Result<Staged, FileError> {
        // Keep the staging name within NAME_MAX (255): a prefix of the name will do.
        let bytes = final_name.as_bytes();
        let prefix = &bytes[..bytes.len().min(200)];
        let mut attempts = 0;
        let (fd, tmp_name) = loop {
            let suffix = sys::random_hex(16).map_err(io_err("create a staging file for", path))?;
            let mut tmp = Vec::with_capacity(prefix.len() + 48);
            tmp.push(b'.');
            tmp.extend_from_slice(prefix);
            tmp.extend_from_slice(b".kvmtmp-");
            tmp.extend_from_slice(suffix.as_bytes());
            let tmp = OsString::from(OsStr::from_bytes(&tmp));
            match sys::openat2(
                dir.as_fd(),
                &tmp,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                perms,
                sys::BENEATH,
            ) {
                Ok(fd) => break (fd, tmp),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && attempts < 3 => attempts += 1,
                Err(e) => return Err(io_err("create a staging file for", path)(e)),
            }
        };
        let staged = Staged {
            dir,
            tmp_name,
            final_name,
            file: File::from(fd),
            live: true,
        };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&staged.file, Some(uid), Some(gid))
                .map_err(io_err("set the owner of", path))?;
        }
        // Exactly `perms`, whatever the umask.
        staged
            .file
            .set_permissions(std::fs::Permissions::from_mode(perms))
            .map_err(io_err("set the permissions of", path))?;
        Ok(staged)
    }

    /// fsyncs the data and renames it into place.
    pub(super) fn commit(&mut self, mode: WriteMode, path: &str) -> Result<(), FileError> {
        self.file.sync_all().map_err(io_err("write", path))?;
        let mut linked = false;
        let renamed = if mode == WriteMode::CreateNew {
            match sys::renameat2(
                self.dir.as_fd(),
                &self.tmp_name,
                &self.final_name,
                libc::RENAME_NOREPLACE,
            ) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // No RENAME_NOREPLACE on this filesystem: link fails if the name exists.
                    linked = true;
                    sys::linkat(self.dir.as_fd(), &self.tmp_name, &self.final_name)
                }
                other => other,
            }
        } else {
            sys::renameat2(self.dir.as_fd(), &self.tmp_name, &self.final_name, 0)
        };
        match renamed {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && mode == WriteMode::CreateNew => {
                return Err(FileError::AlreadyExists {
                    path: path.to_owned(),
                })
            }
            Err(e) => return Err(io_err("rename into place", path)(e)),
        }
        // After a rename the staging name is gone; after the link fallback
        // it remains and Drop removes it.
        if !linked {
            self.live = false;
        }
        sync_dir(&self.dir);
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.live {
            if let Err(e) = sys::unlinkat(self.dir.as_fd(), &self.tmp_name) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    tracing::warn!(name = ?self.tmp_name, error = %e, "cannot remove staging file");
                }
            }
        }
    }
}

/// Best-effort fsync of a directory (an `O_PATH` descriptor cannot be fsynced itself).
fn sync_dir(dir: &OwnedFd) {
    if let Ok(fd) = sys::openat2(
        dir.as_fd(),
        OsStr::new("."),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
        sys::BENEATH,
    ) {
        let _ = File::from(fd).sync_all();
    }
}

/// What replacing the target must preserve.
pub(super) struct TargetInfo {
    pub(super) perms: u32,
    pub(super) owner: Option<(u32, u32)>,
}

/// Looks at the existing target of a replacing write.
pub(super) fn inspect_target(
    dir: &OwnedFd,
    name: &OsStr,
    path: &str,
    mode: WriteMode,
    requested: u32,
) -> Result<TargetInfo, FileError> {
    let new = TargetInfo {
        perms: requested,
        owner: None,
    };
    let Some(st) = sys::lstatat(dir.as_fd(), name).map_err(io_err("inspect", path))? else {
        return Ok(new);
    };
    if mode == WriteMode::CreateNew {
        return Err(FileError::AlreadyExists {
            path: path.to_owned(),
        });
    }
    if sys::is_regular(&st) {
        let root = sys::geteuid() == 0;
        return Ok(TargetInfo {
            perms: st.st_mode & 0o777,
            owner: root.then_some((st.st_uid, st.st_gid)),
        });
    }
    if sys::is_symlink(&st) {
        // The link itself is replaced; refuse only if it points, inside the
        // root, at something that is not a regular file.
        if let Ok(fd) = sys::openat2(dir.as_fd(), name, libc::O_PATH, 0, sys::BENEATH) {
            let target = sys::fstat(fd.as_fd()).map_err(io_err("inspect", path))?;
            if !sys::is_regular(&target) {
                return Err(FileError::NotRegularFile {
                    path: path.to_owned(),
                });
            }
        }
        return Ok(new);
    }
    Err(FileError::NotRegularFile {
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::test_env::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn truncate_replaces_atomically_and_keeps_permissions() {
        let e = env();
        let p = format!("{}/f", e.root);
        let r = e.svc.write_inline(1, wp(&p, "first")).await.unwrap();
        assert_eq!((r.bytes_written, r.size, r.committed), (5, 5, true));
        assert_eq!(r.upload_id, None);
        assert_eq!(mode_of(&p), DEFAULT_PERMISSIONS);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ino = std::fs::metadata(&p).unwrap().ino();
        let r = e
            .svc
            .write_inline(
                1,
                FileWriteParams {
                    permissions: Some(0o755),
                    ..wp(&p, "second!")
                },
            )
            .await
            .unwrap();
        assert_eq!(r.size, 7);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "second!");
        assert_eq!(mode_of(&p), 0o600, "existing permissions are kept");
        assert_ne!(
            std::fs::metadata(&p).unwrap().ino(),
            ino,
            "replaced, not rewritten"
        );
        // New file with explicit permissions, whatever the umask.
        let q = format!("{}/g", e.root);
        e.svc
            .write_inline(
                1,
                FileWriteParams {
                    permissions: Some(0o700),
                    ..wp(&q, "x")
                },
            )
            .await
            .unwrap();
        assert_eq!(mode_of(&q), 0o700);
        no_staging(&e.root);
    }

    #[tokio::test]
    async fn replacing_a_symlink_replaces_the_link_not_its_target() {
        let e = env();
        let secret = format!("{}/secret", e.outside);
        std::fs::write(&secret, "SECRET").unwrap();
        let link = format!("{}/link", e.root);
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        e.svc.write_inline(1, wp(&link, "mine")).await.unwrap();
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "SECRET");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "mine");
        // A hard link to an outside file is replaced too, never written through.
        let hl = format!("{}/hard", e.root);
        std::fs::hard_link(&secret, &hl).unwrap();
        e.svc.write_inline(1, wp(&hl, "mine")).await.unwrap();
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "SECRET");
    }

    #[tokio::test]
    async fn write_refusals() {
        let e = env_with(8);
        let fifo = format!("{}/fifo", e.root);
        nix::unistd::mkfifo(
            fifo.as_str(),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("sub", format!("{}/dirlink", e.root)).unwrap();
        std::os::unix::fs::symlink(&e.outside, format!("{}/outlink", e.root)).unwrap();
        let f = format!("{}/f", e.root);
        std::fs::write(&f, "old").unwrap();
        let cases: Vec<(FileWriteParams, ErrorKind)> = vec![
            (
                wp(&format!("{}/sub", e.root), "x"),
                ErrorKind::NotARegularFile,
            ),
            (wp(&fifo, "x"), ErrorKind::NotARegularFile),
            (
                wp(&format!("{}/dirlink", e.root), "x"),
                ErrorKind::NotARegularFile,
            ),
            (
                wp(&format!("{}/outlink/x", e.root), "x"),
                ErrorKind::PolicyDenied,
            ),
            (
                wp(&format!("{}/x", e.outside), "x"),
                ErrorKind::PolicyDenied,
            ),
            (
                wp(&format!("{}/../outside/x", e.root), "x"),
                ErrorKind::PolicyDenied,
            ),
            (wp(&format!("{}/nodir/x", e.root), "x"), ErrorKind::NotFound),
            (wp(&f, "123456789"), ErrorKind::TooLarge),
            (
                FileWriteParams {
                    permissions: Some(0o664),
                    ..wp(&f, "x")
                },
                ErrorKind::InvalidParams,
            ),
            (
                FileWriteParams {
                    permissions: Some(0o4755),
                    ..wp(&f, "x")
                },
                ErrorKind::InvalidParams,
            ),
            (
                FileWriteParams {
                    permissions: Some(0o1644),
                    ..wp(&f, "x")
                },
                ErrorKind::InvalidParams,
            ),
            (
                FileWriteParams {
                    encoding: Encoding::Base64,
                    ..wp(&f, "not base64!")
                },
                ErrorKind::InvalidEncoding,
            ),
            (
                FileWriteParams {
                    offset: Some(3),
                    ..wp(&f, "x")
                },
                ErrorKind::InvalidParams,
            ),
            (
                FileWriteParams {
                    mode: WriteMode::CreateNew,
                    ..wp(&f, "x")
                },
                ErrorKind::AlreadyExists,
            ),
            (
                FileWriteParams {
                    mode: WriteMode::Append,
                    more: true,
                    ..wp(&f, "x")
                },
                ErrorKind::InvalidParams,
            ),
            (
                FileWriteParams {
                    mode: WriteMode::Append,
                    ..wp(&f, "123456")
                },
                ErrorKind::TooLarge,
            ),
            (
                FileWriteParams {
                    mode: WriteMode::Append,
                    ..wp(&fifo, "x")
                },
                ErrorKind::NotARegularFile,
            ),
            (
                FileWriteParams {
                    mode: WriteMode::Append,
                    ..wp(&format!("{}/dirlink", e.root), "x")
                },
                ErrorKind::PolicyDenied,
            ),
            (
                FileWriteParams {
                    upload_id: Some("nope".into()),
                    offset: Some(0),
                    ..wp(&f, "x")
                },
                ErrorKind::NotFound,
            ),
        ];
        for (params, kind) in cases {
            let label = format!("{params:?}");
            let err = e.svc.write_inline(1, params).await.unwrap_err();
            assert_eq!(err.kind(), kind, "{label}: {err}");
        }
        // Nothing was written anywhere.
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "old");
        assert!(!Path::new(&format!("{}/x", e.outside)).exists());
        no_staging(&e.root);
    }

    #[tokio::test]
    async fn create_new_creates_once() {
        let e = env();
        let p = format!("{}/new", e.root);
        let params = FileWriteParams {
            mode: WriteMode::CreateNew,
            ..wp(&p, "one")
        };
        e.svc.write_inline(1, params.clone()).await.unwrap();
        let err = e.svc.write_inline(1, params).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "one");
        // A dangling symlink also makes the name taken.
        let dl = format!("{}/dangling", e.root);
        std::os::unix::fs::symlink("nowhere", &dl).unwrap();
        let err = e
            .svc
            .write_inline(
                1,
                FileWriteParams {
                    mode: WriteMode::CreateNew,
                    ..wp(&dl, "x")
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        no_staging(&e.root);
    }
}
