//! `get_memory_blocks` and `set_memory_blocks`: memory hot(un)plug through
//! `/sys/devices/system/memory/memoryN/online`, after a host adds or
//! removes memory. A block without an `online` switch, or not
//! `removable`, cannot go offline. Blocking; the sysfs directory is a
//! parameter so tests use a scratch tree.

use std::io;
use std::path::Path;

use agent_common::error::ErrorKind;
use agent_common::methods::{MemoryBlock, MemoryBlocks, SetMemoryBlocksParams};
use serde_json::Value;
use tracing::info;

use crate::error::{io_error_kind, RpcError};

/// Where the kernel lists memory blocks.
pub const MEMORY_SYSFS: &str = "/sys/devices/system/memory";

/// Why memory blocks could not be listed or changed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The list could not be read.
    #[error("cannot read {path}")]
    Read {
        /// What.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A request names a block the guest does not have.
    #[error("the guest has no memory block {0} (see get_memory_blocks)")]
    NoSuchBlock(u32),
    /// A request names a block twice.
    #[error("memory block {0} is named twice")]
    Twice(u32),
    /// A block that cannot go offline.
    #[error("memory block {0} cannot go offline (not removable)")]
    CannotOffline(u32),
    /// The kernel refused; those before it in the list were changed.
    #[error("cannot set memory block {id} {state} ({applied} change(s) before it in the list were made)")]
    Set {
        /// The block.
        id: u32,
        /// `online` or `offline`.
        state: &'static str,
        /// Changes made before it.
        applied: usize,
        /// The cause (`EBUSY`: pages in it could not be moved away).
        #[source]
        source: io::Error,
    },
}

impl RpcError for MemoryError {
    fn kind(&self) -> ErrorKind {
        match self {
            MemoryError::Read { source, .. } => io_error_kind(source),
            MemoryError::NoSuchBlock(_) | MemoryError::Twice(_) | MemoryError::CannotOffline(_) => {
                ErrorKind::InvalidParams
            }
            MemoryError::Set { source, .. } => match source.raw_os_error() {
                Some(libc::EBUSY) | Some(libc::EINVAL) => ErrorKind::IoError,
                _ => io_error_kind(source),
            },
        }
    }

    fn data(&self) -> Vec<(&'static str, Value)> {
        match self {
            MemoryError::NoSuchBlock(id)
            | MemoryError::Twice(id)
            | MemoryError::CannotOffline(id)
            | MemoryError::Set { id, .. } => vec![("block", (*id).into())],
            MemoryError::Read { .. } => Vec::new(),
        }
    }
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> MemoryError + '_ {
    move |source| MemoryError::Read {
        path: path.display().to_string(),
        source,
    }
}

/// `get_memory_blocks` over the sysfs directory `root`.
pub fn get_blocks(root: &Path) -> Result<MemoryBlocks, MemoryError> {
    let size_file = root.join("block_size_bytes");
    let size = std::fs::read_to_string(&size_file).map_err(read_err(&size_file))?;
    let block_size_bytes = u64::from_str_radix(size.trim(), 16).unwrap_or(0);
    let mut blocks = Vec::new();
    for entry in std::fs::read_dir(root).map_err(read_err(root))? {
        let entry = entry.map_err(read_err(root))?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("memory"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let (online, switch) = match std::fs::read_to_string(dir.join("online")) {
            Ok(t) => (t.trim() == "1", true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (true, false),
            Err(e) => return Err(read_err(&dir)(e)),
        };
        let removable = std::fs::read_to_string(dir.join("removable"))
            .map(|t| t.trim() == "1")
            .unwrap_or(false);
        blocks.push(MemoryBlock {
            id,
            online,
            can_offline: switch && removable,
        });
    }
    blocks.sort_by_key(|b| b.id);
    Ok(MemoryBlocks {
        block_size_bytes,
        blocks,
    })
}

/// `set_memory_blocks` over `root`: every entry checked first, then applied
/// in order (a block already in the wanted state is left alone); the
/// blocks after.
pub fn set_blocks(root: &Path, p: SetMemoryBlocksParams) -> Result<MemoryBlocks, MemoryError> {
    let now = get_blocks(root)?;
    for (i, want) in p.blocks.iter().enumerate() {
        let Some(b) = now.blocks.iter().find(|b| b.id == want.id) else {
            return Err(MemoryError::NoSuchBlock(want.id));
        };
        if p.blocks[..i].iter().any(|w| w.id == want.id) {
            return Err(MemoryError::Twice(want.id));
        }
        if !want.online && !b.online {
            continue;
        }
        if !want.online && !b.can_offline {
            return Err(MemoryError::CannotOffline(want.id));
        }
    }
    let mut applied = 0;
    for want in &p.blocks {
        let Some(b) = now.blocks.iter().find(|b| b.id == want.id) else {
            continue;
        };
        if b.online == want.online {
            continue;
        }
        let state = if want.online { "online" } else { "offline" };
        let file = root.join(format!("memory{}", want.id)).join("online");
        std::fs::write(&file, if want.online { "1" } else { "0" }).map_err(|source| {
            MemoryError::Set {
                id: want.id,
                state,
                applied,
                source,
            }
        })?;
        info!(block = want.id, state, "memory block state changed");
        applied += 1;
    }
    get_blocks(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::methods::MemoryBlockState;

    fn tree(blocks: &[(bool, bool)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("block_size_bytes"), "8000000\n").unwrap();
        std::fs::write(dir.path().join("auto_online_blocks"), "online\n").unwrap();
        for (i, (online, removable)) in blocks.iter().enumerate() {
            let b = dir.path().join(format!("memory{i}"));
            std::fs::create_dir(&b).unwrap();
            std::fs::write(b.join("online"), if *online { "1\n" } else { "0\n" }).unwrap();
            std::fs::write(b.join("removable"), if *removable { "1\n" } else { "0\n" }).unwrap();
        }
        dir
    }

    fn want(list: &[(u32, bool)]) -> SetMemoryBlocksParams {
        SetMemoryBlocksParams {
            blocks: list
                .iter()
                .map(|&(id, online)| MemoryBlockState { id, online })
                .collect(),
        }
    }

    #[test]
    fn blocks_are_listed_with_their_size() {
        let t = tree(&[(true, false), (true, true), (false, true)]);
        let m = get_blocks(t.path()).unwrap();
        assert_eq!(m.block_size_bytes, 128 << 20);
        let got: Vec<(u32, bool, bool)> = m
            .blocks
            .iter()
            .map(|b| (b.id, b.online, b.can_offline))
            .collect();
        assert_eq!(got, [(0, true, false), (1, true, true), (2, false, true)]);
    }

    #[test]
    fn blocks_go_offline_and_online_and_bad_requests_change_nothing() {
        let t = tree(&[(true, false), (true, true), (false, true)]);
        let m = set_blocks(t.path(), want(&[(1, false), (2, true)])).unwrap();
        let got: Vec<bool> = m.blocks.iter().map(|b| b.online).collect();
        assert_eq!(got, [true, false, true]);
        for (p, text) in [
            (want(&[(2, false), (0, false)]), "cannot go offline"),
            (want(&[(2, false), (9, true)]), "no memory block 9"),
            (want(&[(2, false), (2, true)]), "twice"),
        ] {
            let e = set_blocks(t.path(), p).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidParams);
            assert!(e.to_string().contains(text), "{e}");
            assert_eq!(
                std::fs::read_to_string(t.path().join("memory2/online")).unwrap(),
                "1"
            );
        }
    }

    #[test]
    fn this_machine_lists_its_memory_blocks() {
        if let Ok(m) = get_blocks(Path::new(MEMORY_SYSFS)) {
            assert!(m.block_size_bytes > 0);
        }
    }
}
