//! The start-up sweep of the staging files a killed agent left behind.

use super::*;

/// Most directory entries [`remove_stale_staging`] visits, over all roots.
pub const SWEEP_MAX_ENTRIES: usize = 100_000;

/// What [`remove_stale_staging`] did.
#[derive(Debug, Default)]
pub struct StagingSweep {
    /// The staging files removed (paths, for the log).
    pub removed: Vec<String>,
    /// Directory entries visited.
    pub visited: usize,
    /// The sweep stopped at [`SWEEP_MAX_ENTRIES`].
    pub truncated: bool,
}

/// True if `name` is a staging file name, `.<name>.kvmtmp-<32 hex>` (with
/// `prefix` as `<name>` if given).
fn is_staging_name(name: &[u8], prefix: Option<&[u8]>) -> bool {
    const TAG: &[u8] = b".kvmtmp-";
    let Some(rest) = name.strip_prefix(b".") else {
        return false;
    };
    if rest.len() < TAG.len() + 32 + 1 {
        return false;
    }
    let (head, hex) = rest.split_at(rest.len() - 32);
    let Some(stem) = head.strip_suffix(TAG) else {
        return false;
    };
    !stem.is_empty()
        && hex
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        && prefix.map_or(true, |p| stem == &p[..p.len().min(200)])
}

/// Removes the staging files a killed agent left behind (see the module
/// documentation). Runs once at start-up, before any request is served, so
/// it never meets a staging file of this agent's own uploads.
pub fn remove_stale_staging(config: &Config) -> StagingSweep {
    let mut sweep = StagingSweep::default();
    let euid = sys::geteuid();
    let roots: Vec<String> = config
        .security
        .allowed_write_paths
        .iter()
        .filter_map(|r| r.to_str().map(normalize_path)?.ok())
        .collect();
    for root in &roots {
        // A root inside another write root is swept with it.
        let nested = roots
            .iter()
            .any(|other| other != root && (other == "/" || root.starts_with(&format!("{other}/"))));
        if nested {
            continue;
        }
        let Ok(walked) = crate::policy::walk_root(root, root, None) else {
            // Unsafe or unreadable: prepare_roots warned about it.
            continue;
        };
        match walked.found {
            Found::Dir(fd) => sweep_tree(root, &fd, euid, &mut sweep),
            Found::Other(_) | Found::Missing { last: true } => {
                // A file root: its staging files sit beside it.
                let (dir, name) = match walked.named {
                    Some(named) => named,
                    None => (walked.dir, walked.name),
                };
                let parent = root.rsplit_once('/').map_or("/", |(p, _)| p);
                sweep_dir(parent, &dir, Some(name.as_bytes()), euid, &mut sweep);
            }
            Found::Missing { last: false } => {}
        }
        if sweep.truncated {
            break;
        }
    }
    sweep
}

/// Sweeps the directory tree under `root` (an `O_PATH` descriptor): no
/// symbolic link is followed and no mount point crossed.
fn sweep_tree(root_path: &str, root: &OwnedFd, euid: u32, sweep: &mut StagingSweep) {
    let mut stack: Vec<OsString> = vec![OsString::from(".")];
    while let Some(rel) = stack.pop() {
        let Ok(dir) = sys::openat2(
            root.as_fd(),
            &rel,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            sys::SWEEP,
        ) else {
            continue;
        };
        let shown = if rel == "." {
            root_path.to_owned()
        } else {
            format!("{root_path}/{}", rel.to_string_lossy())
        };
        for name in sweep_dir(&shown, &dir, None, euid, sweep) {
            let mut sub = if rel == "." {
                OsString::new()
            } else {
                let mut s = rel.clone();
                s.push("/");
                s
            };
            sub.push(&name);
            stack.push(sub);
        }
        if sweep.truncated {
            return;
        }
    }
}

/// Removes the staging files in `dir` (an `O_PATH` descriptor shown as
/// `shown`) that are regular files owned by `euid`, with names matching
/// `prefix` if given; returns its subdirectories.
fn sweep_dir(
    shown: &str,
    dir: &OwnedFd,
    prefix: Option<&[u8]>,
    euid: u32,
    sweep: &mut StagingSweep,
) -> Vec<OsString> {
    let mut subdirs = Vec::new();
    let Ok(readable) = sys::openat2(
        dir.as_fd(),
        OsStr::new("."),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
        sys::SWEEP,
    ) else {
        return subdirs;
    };
    let budget = SWEEP_MAX_ENTRIES.saturating_sub(sweep.visited);
    let entries = match sys::read_dir(readable, budget) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::debug!(directory = shown, error = %e, "staging sweep cannot list a directory");
            return subdirs;
        }
    };
    sweep.visited += entries.len();
    if sweep.visited >= SWEEP_MAX_ENTRIES {
        sweep.truncated = true;
    }
    for (name, kind) in entries {
        if kind == libc::DT_DIR {
            subdirs.push(name);
            continue;
        }
        if !matches!(kind, libc::DT_REG | libc::DT_UNKNOWN)
            || !is_staging_name(name.as_bytes(), prefix)
        {
            if kind == libc::DT_UNKNOWN {
                if let Ok(Some(st)) = sys::lstatat(dir.as_fd(), &name) {
                    if sys::is_dir(&st) {
                        subdirs.push(name);
                    }
                }
            }
            continue;
        }
        match sys::lstatat(dir.as_fd(), &name) {
            Ok(Some(st)) if sys::is_regular(&st) && st.st_uid == euid => {}
            Ok(Some(st)) if sys::is_dir(&st) => {
                subdirs.push(name);
                continue;
            }
            _ => continue,
        }
        let shown_file = format!("{}/{}", shown.trim_end_matches('/'), name.to_string_lossy());
        match sys::unlinkat(dir.as_fd(), &name) {
            Ok(()) => sweep.removed.push(shown_file),
            Err(e) => {
                tracing::warn!(file = %shown_file, error = %e, "cannot remove a stale staging file")
            }
        }
    }
    subdirs
}

/// Lists the staging files in `dir` (files named `.<name>.kvmtmp-<hex>`).
pub fn staging_files(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let b = name.as_bytes();
        if b.starts_with(b".") && b.windows(8).any(|w| w == b".kvmtmp-") {
            out.push(name);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_table() {
        let hex = "0123456789abcdef0123456789abcdef";
        let long = "n".repeat(250);
        let cases: &[(String, Option<&[u8]>, bool)] = &[
            (format!(".a.txt.kvmtmp-{hex}"), None, true),
            (format!(".a.txt.kvmtmp-{hex}"), Some(b"a.txt"), true),
            (format!(".a.txt.kvmtmp-{hex}"), Some(b"b.txt"), false),
            (format!("..kvmtmp-{hex}"), None, false),
            (format!("a.txt.kvmtmp-{hex}"), None, false),
            (format!(".a.txt.kvmtmp-{}", hex.to_uppercase()), None, false),
            (format!(".a.txt.kvmtmp-{}", &hex[1..]), None, false),
            (format!(".a.txt.kvmtmp-{hex}0"), None, false),
            (format!(".a.txt.kvmtmp-{hex}.x"), None, false),
            (".a.txt.kvmtmp-".to_owned(), None, false),
            (
                format!(".{}.kvmtmp-{hex}", "n".repeat(200)),
                Some(long.as_bytes()),
                true,
            ),
        ];
        for (name, prefix, want) in cases {
            assert_eq!(
                is_staging_name(name.as_bytes(), *prefix),
                *want,
                "{name} {prefix:?}"
            );
        }
    }

    #[test]
    fn the_staging_sweep_removes_only_the_agents_staging_files_and_follows_no_link() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        let hex = "00112233445566778899aabbccddeeff";
        let root = b.join("root");
        let outside = b.join("outside");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let stale = |d: &Path, n: &str| {
            let p = d.join(format!(".{n}.kvmtmp-{hex}"));
            std::fs::write(&p, "stale").unwrap();
            p
        };
        let gone = [stale(&root, "x"), stale(&root.join("a/b"), "y")];
        let kept = [
            stale(&outside, "z"),
            stale(&root, "users"),
            stale(b, "other-file"),
        ];
        std::os::unix::fs::chown(&kept[1], Some(1000), Some(1000)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/link")).unwrap();
        // A file root: its own staging files beside it go, others stay.
        let file_root = b.join("single.txt");
        let beside = stale(b, "single.txt");
        let mut config = Config::default();
        config.security.allowed_write_paths = vec![root.clone(), root.join("a"), file_root];
        let sweep = remove_stale_staging(&config);
        for p in gone.iter().chain([&beside]) {
            assert!(!p.exists(), "{} was left", p.display());
        }
        for p in &kept {
            assert!(p.exists(), "{} was removed", p.display());
        }
        assert_eq!(sweep.removed.len(), 3, "{:?}", sweep.removed);
        assert!(!sweep.truncated);
        assert!(sweep
            .removed
            .contains(&format!("{}/.x.kvmtmp-{hex}", root.display())));
    }
}
