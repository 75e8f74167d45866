//! `fs_trim`: `FITRIM` on each local filesystem (or those named), so the
//! disk beneath can release the blocks the filesystem no longer uses.
//! Blocking: run on the blocking pool.

use std::io;
use std::os::fd::AsFd;

use agent_common::error::ErrorKind;
use agent_common::methods::{FsTrimParams, FsTrimResult, TrimmedFilesystem};
use serde_json::Value;

use super::freeze::open_mount;
use super::mounts::{self, SelectError};
use crate::error::{io_error_kind, RpcError};
use crate::sys;

/// Why `fs_trim` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum TrimError {
    /// The mount points asked for cannot be trimmed.
    #[error(transparent)]
    Select(#[from] SelectError),
    /// The mount table could not be read.
    #[error("cannot read the mount table")]
    Mounts(#[source] io::Error),
}

impl RpcError for TrimError {
    fn kind(&self) -> ErrorKind {
        match self {
            TrimError::Select(_) => ErrorKind::InvalidParams,
            TrimError::Mounts(e) => io_error_kind(e),
        }
    }

    fn data(&self) -> Vec<(&'static str, Value)> {
        match self {
            TrimError::Select(SelectError::NotMounted(m))
            | TrimError::Select(SelectError::Unsuitable { mount_point: m, .. }) => {
                vec![("mount_point", m.as_str().into())]
            }
            _ => Vec::new(),
        }
    }
}

/// `fs_trim`. A filesystem that cannot be trimmed gets its `error` in the
/// result; the others are trimmed all the same.
pub fn trim(p: FsTrimParams) -> Result<FsTrimResult, TrimError> {
    let all = mounts::read_mounts().map_err(TrimError::Mounts)?;
    let chosen = mounts::select(&all, p.mount_points.as_deref())?;
    let filesystems = chosen
        .iter()
        .map(|m| {
            let done = open_mount(m).and_then(|f| sys::fitrim(f.as_fd(), p.minimum_bytes));
            let (trimmed_bytes, error) = match done {
                Ok(n) => (Some(n), None),
                Err(e) => (None, Some(trim_error(&e))),
            };
            TrimmedFilesystem {
                mount_point: m.mount_point.clone(),
                trimmed_bytes,
                error,
            }
        })
        .collect();
    Ok(FsTrimResult { filesystems })
}

fn trim_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => {
            "the filesystem or its disk does not support discard (FITRIM)".to_owned()
        }
        Some(libc::EINVAL) => {
            "the filesystem refused the range (minimum_bytes larger than the filesystem?)"
                .to_owned()
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_selection_trims_nothing_and_names_the_mount() {
        let e = trim(FsTrimParams {
            mount_points: Some(vec!["/proc".into()]),
            minimum_bytes: 0,
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidParams);
        assert_eq!(e.data()[0].1, "/proc");
        let e = trim(FsTrimParams {
            mount_points: Some(vec![]),
            minimum_bytes: 0,
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidParams);
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = trim_error(&io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        assert!(e.contains("does not support discard"), "{e}");
    }
}
