//! Chunked uploads: start, chunks, commit, the end of a session, and the
//! expiry of idle uploads.

use super::*;

/// An open chunked upload.
pub(super) struct Upload {
    session: u64,
    /// Normalised path the upload will be committed to.
    path: String,
    mode: WriteMode,
    /// `None` once committed; chunk writers hold the read lock, the commit the write lock.
    staged: RwLock<Option<Staged>>,
    /// When a chunk last arrived or finished.
    last_active: Mutex<Instant>,
    /// Stops the upload's expiry task when the upload goes.
    _expiry: DropGuard,
}

impl Upload {
    fn touch(&self) {
        *lock(&self.last_active) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        lock(&self.last_active).elapsed()
    }
}

pub(super) type Uploads = Arc<Mutex<HashMap<String, Arc<Upload>>>>;

impl FileService {
    pub(super) async fn start_upload(
        &self,
        session: u64,
        params: FileWriteParams,
        mode: WriteMode,
        perms: u32,
        data: Bytes,
        gate: &CommitGate,
    ) -> Result<FileWriteResult, FileError> {
        self.expire_idle();
        if lock(&self.uploads).len() >= MAX_UPLOADS {
            return Err(FileError::TooManyUploads { limit: MAX_UPLOADS });
        }
        let norm = normalize_path(&params.path).ok();
        let policy = Arc::clone(&self.write_policy);
        let path = params.path.clone();
        let gate = gate.clone();
        let staged = blocking(move || {
            let (dir, name) = policy.open_parent_for_write(&path)?;
            let target = inspect_target(&dir, &name, &path, mode, perms)?;
            let staged = Staged::create(dir, name, target.perms, target.owner, &path)?;
            staged
                .file
                .write_all_at(&data, 0)
                .map_err(io_err("write", &path))?;
            // From here the upload is registered and its id answered.
            gate.begin(&path)?;
            Ok(staged)
        })
        .await?;
        let size = staged
            .file
            .metadata()
            .map_err(io_err("write", &params.path))?
            .len();
        let id = sys::random_hex(16).map_err(io_err("start an upload for", &params.path))?;
        let expiry = CancellationToken::new();
        let upload = Arc::new(Upload {
            session,
            // open_parent_for_write accepted the path, so it normalises.
            path: norm.unwrap_or_else(|| params.path.clone()),
            mode,
            staged: RwLock::new(Some(staged)),
            last_active: Mutex::new(Instant::now()),
            _expiry: expiry.clone().drop_guard(),
        });
        {
            let mut map = lock(&self.uploads);
            if map.len() >= MAX_UPLOADS {
                drop(map);
                // Dropping the upload deletes its staging file.
                drop(upload);
                return Err(FileError::TooManyUploads { limit: MAX_UPLOADS });
            }
            map.insert(id.clone(), Arc::clone(&upload));
        }
        tokio::spawn(expire_when_idle(
            Arc::clone(&self.uploads),
            id.clone(),
            Arc::downgrade(&upload),
            self.idle_timeout,
            expiry,
        ));
        tracing::debug!(upload_id = %id, path = %params.path, "upload started");
        Ok(FileWriteResult {
            bytes_written: size,
            size,
            upload_id: Some(id),
            committed: false,
        })
    }

    pub(super) async fn write_chunk(
        &self,
        session: u64,
        id: String,
        params: FileWriteParams,
        data: Bytes,
        gate: &CommitGate,
    ) -> Result<FileWriteResult, FileError> {
        let upload = lock(&self.uploads)
            .get(&id)
            .filter(|u| u.session == session)
            .cloned()
            .ok_or_else(|| FileError::UnknownUpload { id: id.clone() })?;
        upload.touch();
        let result = self
            .write_chunk_inner(&upload, &id, params, data, gate)
            .await;
        upload.touch();
        if result.is_err() {
            // Any failed chunk aborts the upload; the staging file goes with the last reference.
            self.remove_if_same(&id, &upload);
        }
        result
    }

    async fn write_chunk_inner(
        &self,
        upload: &Arc<Upload>,
        id: &str,
        params: FileWriteParams,
        data: Bytes,
        gate: &CommitGate,
    ) -> Result<FileWriteResult, FileError> {
        if normalize_path(&params.path).ok().as_deref() != Some(upload.path.as_str()) {
            return Err(FileError::InvalidRequest {
                reason: format!(
                    "path {:?} differs from the upload's path {:?}",
                    params.path, upload.path
                ),
            });
        }
        let offset = params.offset.ok_or_else(|| FileError::InvalidRequest {
            reason: "offset is required with upload_id".into(),
        })?;
        let len = data.len() as u64;
        let limit = self.config.security.max_file_size;
        let end = offset.saturating_add(len);
        if end > limit {
            return Err(FileError::TooLarge {
                path: params.path,
                size: end,
                limit,
            });
        }
        let commit = !params.more;
        if commit && !self.remove_if_same(id, upload) {
            return Err(FileError::UnknownUpload { id: id.to_owned() });
        }
        let upload = Arc::clone(upload);
        let id = id.to_owned();
        let path = params.path;
        let gate = gate.clone();
        blocking(move || {
            let unknown = || FileError::UnknownUpload { id: id.clone() };
            if let Err(e) = gate.begin(&path) {
                // Given up before the chunk was written: like any failed
                // chunk, it aborts the upload (its request's future, which
                // would remove it, is gone).
                *upload.staged.write().unwrap_or_else(|e| e.into_inner()) = None;
                return Err(e);
            }
            if commit {
                let mut guard = upload.staged.write().unwrap_or_else(|e| e.into_inner());
                let staged = guard.as_mut().ok_or_else(unknown)?;
                let size = write_chunk_at(staged, &data, offset, &path)?;
                staged.commit(upload.mode, &path)?;
                // Committed: nothing more may be written to it.
                *guard = None;
                tracing::debug!(upload_id = %id, %path, size, "upload committed");
                Ok(FileWriteResult {
                    bytes_written: len,
                    size,
                    upload_id: None,
                    committed: true,
                })
            } else {
                let guard = upload.staged.read().unwrap_or_else(|e| e.into_inner());
                let staged = guard.as_ref().ok_or_else(unknown)?;
                let size = write_chunk_at(staged, &data, offset, &path)?;
                Ok(FileWriteResult {
                    bytes_written: len,
                    size,
                    upload_id: Some(id),
                    committed: false,
                })
            }
        })
        .await
    }

    /// Aborts the uploads idle for [`UPLOAD_IDLE_TIMEOUT`] or more (their
    /// expiry tasks do it too; this makes a new upload see the slots free
    /// even if a task has not run yet).
    fn expire_idle(&self) {
        let expired: Vec<(String, Arc<Upload>)> = {
            let mut map = lock(&self.uploads);
            let ids: Vec<String> = map
                .iter()
                .filter(|(_, u)| u.idle_for() >= self.idle_timeout)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| map.remove(&id).map(|u| (id, u)))
                .collect()
        };
        for (id, upload) in expired {
            tracing::warn!(upload_id = %id, path = %upload.path, "upload idle too long; aborted");
        }
    }

    /// Removes upload `id` if it is still `upload`; true if this call removed it.
    fn remove_if_same(&self, id: &str, upload: &Arc<Upload>) -> bool {
        let mut map = lock(&self.uploads);
        match map.get(id) {
            Some(u) if Arc::ptr_eq(u, upload) => {
                map.remove(id);
                true
            }
            _ => false,
        }
    }

    /// Aborts `session`'s uploads and deletes their staging files.
    pub fn end_session(&self, session: u64) {
        self.release_buffers();
        let removed: Vec<Arc<Upload>> = {
            let mut map = lock(&self.uploads);
            let ids: Vec<String> = map
                .iter()
                .filter(|(_, u)| u.session == session)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        if !removed.is_empty() {
            tracing::debug!(
                session,
                count = removed.len(),
                "aborting uploads of ended session"
            );
        }
        // Dropped here, outside the lock: each deletes its staging file
        // (or the last chunk writer still holding it does).
        drop(removed);
    }

    /// Aborts `session`'s upload `id` (a host's `cancel`) and deletes its
    /// staging file; false if no such upload of that session is open.
    pub fn abort_upload(&self, session: u64, id: &str) -> bool {
        let removed = {
            let mut map = lock(&self.uploads);
            match map.get(id) {
                Some(u) if u.session == session => map.remove(id),
                _ => None,
            }
        };
        if let Some(u) = &removed {
            tracing::debug!(upload_id = %id, path = %u.path, "upload aborted by the host");
        }
        // Dropped outside the lock (see `end_session`).
        removed.is_some()
    }

    /// Frees the pooled transfer buffers and pipes (they are kept only
    /// while transfers run).
    pub fn release_buffers(&self) {
        self.transfer_buffers.clear();
        self.transfer_pipes.clear();
    }

    /// Aborts every upload (agent shutdown).
    pub fn abort_all(&self) {
        let removed: Vec<Arc<Upload>> = lock(&self.uploads).drain().map(|(_, u)| u).collect();
        drop(removed);
    }
}

/// Sleeps until upload `id` has been idle for `timeout`, then aborts it
/// (its staging file goes with the last reference). Ends at once when the
/// upload goes (committed, aborted, session ended): `cancel` fires when the
/// upload is dropped. One timer per open upload, none when there is none.
async fn expire_when_idle(
    uploads: Uploads,
    id: String,
    upload: Weak<Upload>,
    timeout: Duration,
    cancel: CancellationToken,
) {
    loop {
        // Not held across the sleep: holding it would keep the upload alive.
        let Some(last) = upload.upgrade().map(|u| *lock(&u.last_active)) else {
            return;
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(last + timeout) => {}
        }
        let Some(current) = upload.upgrade() else {
            return;
        };
        if current.idle_for() < timeout {
            continue;
        }
        let removed = {
            let mut map = lock(&uploads);
            match map.get(&id) {
                Some(u) if Arc::ptr_eq(u, &current) => map.remove(&id),
                _ => None,
            }
        };
        if removed.is_some() {
            tracing::warn!(upload_id = %id, path = %current.path, "upload idle too long; aborted");
        }
        return;
    }
}

/// Writes a chunk at `offset` into the staging file; returns the staged
/// size so far.
fn write_chunk_at(staged: &Staged, data: &[u8], offset: u64, path: &str) -> Result<u64, FileError> {
    staged
        .file
        .write_all_at(data, offset)
        .map_err(io_err("write", path))?;
    Ok(staged.file.metadata().map_err(io_err("write", path))?.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::test_env::*;

    #[tokio::test]
    async fn chunked_upload_out_of_order_commits_byte_equal() {
        let e = env();
        let p = format!("{}/up.bin", e.root);
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let parts: Vec<&[u8]> = data.chunks(16_384).collect();
        let first = e
            .svc
            .write_inline(
                7,
                FileWriteParams {
                    content: Encoding::Base64.encode_lossy(parts[0]),
                    encoding: Encoding::Base64,
                    more: true,
                    ..wp(&p, "")
                },
            )
            .await
            .unwrap();
        assert!(!first.committed);
        let id = first.upload_id.unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "old",
            "not yet visible"
        );
        assert_eq!(staging_files(Path::new(&e.root)).unwrap().len(), 1);
        // The middle chunks concurrently and in reverse order.
        let middle = parts.len() - 1;
        let futs = (1..middle).rev().map(|i| {
            let params = chunk(&p, &id, (i * 16_384) as u64, parts[i], true);
            e.svc.write_inline(7, params)
        });
        for r in futures::future::join_all(futs).await {
            let r = r.unwrap();
            assert_eq!(
                (r.committed, r.upload_id.as_deref()),
                (false, Some(id.as_str()))
            );
        }
        let last = e
            .svc
            .write_inline(
                7,
                chunk(&p, &id, (middle * 16_384) as u64, parts[middle], false),
            )
            .await
            .unwrap();
        assert!(last.committed);
        assert_eq!(last.size, data.len() as u64);
        assert_eq!(std::fs::read(&p).unwrap(), data);
        assert_eq!(mode_of(&p), 0o640);
        assert_eq!(e.svc.open_uploads(), 0);
        no_staging(&e.root);
        // The id is gone once committed.
        let err = e
            .svc
            .write_inline(7, chunk(&p, &id, 0, b"x", false))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    async fn start(e: &Env, session: u64, p: &str, mode: WriteMode) -> String {
        e.svc
            .write_inline(
                session,
                FileWriteParams {
                    mode,
                    more: true,
                    ..wp(p, "abc")
                },
            )
            .await
            .unwrap()
            .upload_id
            .unwrap()
    }

    #[tokio::test]
    async fn uploads_belong_to_their_session_and_end_with_it() {
        let e = env();
        let p = format!("{}/s", e.root);
        let id = start(&e, 1, &p, WriteMode::Truncate).await;
        let err = e
            .svc
            .write_inline(2, chunk(&p, &id, 3, b"x", false))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        // Still open for its own session.
        assert_eq!(e.svc.open_uploads(), 1);
        e.svc.end_session(2);
        assert_eq!(staging_files(Path::new(&e.root)).unwrap().len(), 1);
        e.svc.end_session(1);
        assert_eq!(e.svc.open_uploads(), 0);
        no_staging(&e.root);
        assert!(!Path::new(&p).exists());
        let err = e
            .svc
            .write_inline(1, chunk(&p, &id, 3, b"x", false))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        // abort_all ends every session's uploads.
        start(&e, 3, &p, WriteMode::Truncate).await;
        start(&e, 4, &format!("{p}2"), WriteMode::Truncate).await;
        e.svc.abort_all();
        assert_eq!(e.svc.open_uploads(), 0);
        no_staging(&e.root);
    }

    #[tokio::test]
    async fn failed_chunks_abort_the_upload() {
        let e = env_with(10);
        let p = format!("{}/a", e.root);
        for bad in [
            chunk(&p, "", 8, b"xyz", true),                         // too large
            chunk(&format!("{}/other", e.root), "", 3, b"x", true), // other path
            FileWriteParams {
                offset: None,
                ..chunk(&p, "", 3, b"x", true)
            },
        ] {
            let id = start(&e, 1, &p, WriteMode::Truncate).await;
            let err = e
                .svc
                .write_inline(
                    1,
                    FileWriteParams {
                        upload_id: Some(id.clone()),
                        ..bad
                    },
                )
                .await
                .unwrap_err();
            assert_ne!(err.kind(), ErrorKind::NotFound, "{err}");
            assert_eq!(e.svc.open_uploads(), 0);
            no_staging(&e.root);
        }
        assert!(!Path::new(&p).exists());
    }

    #[tokio::test]
    async fn create_new_upload_refuses_an_existing_name_at_commit() {
        let e = env();
        let p = format!("{}/cn", e.root);
        let id = start(&e, 1, &p, WriteMode::CreateNew).await;
        std::fs::write(&p, "raced").unwrap();
        let err = e
            .svc
            .write_inline(1, chunk(&p, &id, 3, b"d", false))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "raced");
        no_staging(&e.root);
        // Refused up front when the name already exists.
        let err = e
            .svc
            .write_inline(
                1,
                FileWriteParams {
                    mode: WriteMode::CreateNew,
                    more: true,
                    ..wp(&p, "abc")
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    }

    fn staging_count(dir: &str) -> usize {
        staging_files(Path::new(dir)).unwrap().len()
    }

    #[tokio::test]
    async fn idle_uploads_expire_and_chunks_keep_them_alive() {
        let timeout = Duration::from_millis(300);
        let e = env_expiring(timeout);
        let p = format!("{}/slow.bin", e.root);
        let id = start(&e, 1, &p, WriteMode::Truncate).await;
        // A chunk every 100 ms keeps the upload alive past the timeout.
        for i in 0..5u64 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            e.svc
                .write_inline(1, chunk(&p, &id, 3 + i, b"x", true))
                .await
                .unwrap_or_else(|err| panic!("chunk {i}: {err}"));
        }
        assert_eq!(e.svc.open_uploads(), 1);
        // Then silence: the upload is aborted and its staging file deleted,
        // by its own timer (nothing else happens meanwhile).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while e.svc.open_uploads() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(e.svc.open_uploads(), 0);
        assert_eq!(staging_count(&e.root), 0);
        let err = e
            .svc
            .write_inline(1, chunk(&p, &id, 8, b"late", false))
            .await
            .unwrap_err();
        assert!(matches!(err, FileError::UnknownUpload { .. }), "{err}");
        assert!(!Path::new(&p).exists());
    }

    #[tokio::test]
    async fn a_new_upload_expires_idle_ones_before_counting_slots() {
        // The test runtime has one thread: while this test blocks it, no
        // expiry task can run, so only the check at the start of an upload
        // can free the slots.
        let e = env_expiring(Duration::from_millis(100));
        for i in 0..MAX_UPLOADS {
            start(&e, 1, &format!("{}/u{i}", e.root), WriteMode::Truncate).await;
        }
        assert_eq!(staging_count(&e.root), MAX_UPLOADS);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(e.svc.open_uploads(), MAX_UPLOADS);
        let id = start(&e, 2, &format!("{}/fresh", e.root), WriteMode::Truncate).await;
        assert_eq!(e.svc.open_uploads(), 1);
        assert_eq!(staging_count(&e.root), 1);
        e.svc
            .write_inline(2, chunk(&format!("{}/fresh", e.root), &id, 3, b"", false))
            .await
            .unwrap();
        no_staging(&e.root);
    }

    #[tokio::test]
    async fn a_finished_upload_leaves_no_timer_behind() {
        let e = env_expiring(Duration::from_secs(3600));
        let p = format!("{}/quick.bin", e.root);
        let id = start(&e, 1, &p, WriteMode::Truncate).await;
        let handle = tokio::runtime::Handle::current();
        assert_eq!(handle.metrics().num_alive_tasks(), 1);
        e.svc
            .write_inline(1, chunk(&p, &id, 3, b"", false))
            .await
            .unwrap();
        // The expiry task saw its upload go and ended.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while handle.metrics().num_alive_tasks() > 0 && std::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        assert_eq!(handle.metrics().num_alive_tasks(), 0);
        let id = start(&e, 1, &p, WriteMode::Truncate).await;
        assert!(!id.is_empty());
        e.svc.end_session(1);
        while handle.metrics().num_alive_tasks() > 0 && std::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        assert_eq!(handle.metrics().num_alive_tasks(), 0);
    }

    #[tokio::test]
    async fn too_many_uploads_is_busy() {
        let e = env();
        for i in 0..MAX_UPLOADS {
            start(&e, 1, &format!("{}/u{i}", e.root), WriteMode::Truncate).await;
        }
        let err = e
            .svc
            .write_inline(
                1,
                FileWriteParams {
                    more: true,
                    ..wp(&format!("{}/one-more", e.root), "x")
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Busy);
        e.svc.end_session(1);
        no_staging(&e.root);
    }
}
