//! Waiting for a change in a few folders without a timer (inotify): for
//! systemd's unit folders (who owns qemu-ga's port, [`crate::qga`]), for
//! `/dev` (a virtio-serial port that appears, [`crate::transport`]) and for
//! the folder of a followed log ([`crate::follow`]).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tracing::debug;

/// Entries created, removed, renamed or rewritten in the folders.
pub(crate) const ENTRY_CHANGES: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_CLOSE_WRITE);

/// An inotify instance watching some folders.
pub(crate) struct DirWatch {
    /// The instance as a file: any bytes read from it are events, and any
    /// event means "look again".
    fd: Option<AsyncFd<File>>,
}

impl DirWatch {
    /// Watches those of `dirs` that exist for `events`; `None` when none
    /// does.
    pub(crate) fn new<P: AsRef<Path>>(
        dirs: &[P],
        events: AddWatchFlags,
    ) -> io::Result<Option<DirWatch>> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mut any = false;
        for dir in dirs {
            // Folders that do not exist here are skipped.
            any |= inotify
                .add_watch(dir.as_ref(), events | AddWatchFlags::IN_ONLYDIR)
                .is_ok();
        }
        if !any {
            return Ok(None);
        }
        // A second descriptor of the same instance (its watches with it).
        let fd = inotify.as_fd().try_clone_to_owned()?;
        Ok(Some(DirWatch {
            fd: Some(crate::sys::register(File::from(fd))?),
        }))
    }

    /// Waits until something changed in a watched folder (never, once
    /// reading the events failed).
    pub(crate) async fn changed(&mut self) {
        loop {
            let Some(fd) = &self.fd else {
                return std::future::pending().await;
            };
            let Ok(mut ready) = fd.readable().await else {
                self.fd = None;
                continue;
            };
            let mut buf = [0u8; 4096];
            let mut got = false;
            let failed = loop {
                let mut file: &File = fd.get_ref();
                match file.read(&mut buf) {
                    Ok(0) => break None,
                    Ok(_) => got = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready.clear_ready();
                        break None;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(e),
                }
            };
            if let Some(e) = failed {
                debug!(error = %e, "reading inotify events failed; no longer watching");
                self.fd = None;
                continue;
            }
            if got {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_new_entry_wakes_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let mut w = DirWatch::new(&[dir.path(), &missing], ENTRY_CHANGES)
            .unwrap()
            .expect("one folder exists");
        let waiter = tokio::time::timeout(Duration::from_millis(100), w.changed()).await;
        assert!(waiter.is_err(), "nothing changed yet");
        std::fs::write(dir.path().join("vport0p2"), b"").unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("the new entry is seen");
        assert!(DirWatch::new(&[&missing], ENTRY_CHANGES).unwrap().is_none());
    }
}
