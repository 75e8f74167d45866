//! Commands: [`CommandPolicy`] and [`SAFE_PATH`] (see the [module
//! documentation](super) for the rules).

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{normalize_path, PolicyError, WHITELIST_KEY};

/// The only `PATH` a bare command name is looked up in, and the `PATH` the
/// child process starts with.
pub const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Which commands may run (see the module documentation).
#[derive(Debug, Clone)]
pub struct CommandPolicy {
    /// Normalised whitelist entries; `None` allows any command.
    whitelist: Option<Vec<String>>,
}

/// Looks a bare name up in [`SAFE_PATH`]: the first executable regular file.
pub fn lookup_safe_path(name: &str) -> Option<PathBuf> {
    SAFE_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| is_executable_file(p))
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

impl CommandPolicy {
    /// A policy allowing the commands in `whitelist`, or any if `None`.
    /// Entries are bare names or absolute paths (normalised here).
    pub fn new(whitelist: Option<&[String]>) -> CommandPolicy {
        let whitelist = whitelist.map(|list| {
            list.iter()
                .filter_map(|e| {
                    if e.starts_with('/') {
                        normalize_path(e).ok()
                    } else if !e.is_empty() && !e.contains('/') && !e.contains('\0') {
                        Some(e.clone())
                    } else {
                        None
                    }
                })
                .collect()
        });
        CommandPolicy { whitelist }
    }

    /// True if a whitelist is in force.
    pub fn is_restricted(&self) -> bool {
        self.whitelist.is_some()
    }

    /// Resolves the program to run: returns (path to execute, argv0).
    pub fn resolve(&self, command: &str) -> Result<(PathBuf, String), PolicyError> {
        let bad = |reason| PolicyError::BadCommand {
            command: command.to_owned(),
            reason,
        };
        if command.is_empty() {
            return Err(bad("the command is empty"));
        }
        if command.contains('\0') {
            return Err(bad("the command contains a NUL byte"));
        }
        let not_allowed = || PolicyError::CommandNotAllowed {
            command: command.to_owned(),
            key: WHITELIST_KEY,
        };
        let not_found = || PolicyError::CommandNotFound {
            command: command.to_owned(),
        };
        if command.starts_with('/') {
            let norm = normalize_path(command)
                .map_err(|_| bad("the command path must not contain '..' components"))?;
            if let Some(list) = &self.whitelist {
                let allowed = list.iter().any(|entry| {
                    if entry.starts_with('/') {
                        *entry == norm
                    } else {
                        lookup_safe_path(entry).is_some_and(|p| p.as_os_str() == OsStr::new(&norm))
                    }
                });
                if !allowed {
                    return Err(not_allowed());
                }
            }
            let path = PathBuf::from(norm);
            match std::fs::metadata(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_found()),
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Err(not_found()),
                Err(source) => Err(PolicyError::Io {
                    path: command.to_owned(),
                    source,
                }),
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
                    Ok((path, command.to_owned()))
                }
                Ok(_) => Err(PolicyError::NotExecutable {
                    path: command.to_owned(),
                }),
            }
        } else if command.contains('/') {
            Err(bad(
                "a command must be a bare name or an absolute path, not a relative path",
            ))
        } else if command == "." || command == ".." {
            Err(bad("the command is not a program name"))
        } else {
            let found = lookup_safe_path(command);
            if let Some(list) = &self.whitelist {
                let allowed = list.iter().any(|entry| {
                    if entry.starts_with('/') {
                        found
                            .as_ref()
                            .is_some_and(|p| p.as_os_str() == OsStr::new(entry))
                    } else {
                        entry == command
                    }
                });
                if !allowed {
                    return Err(not_allowed());
                }
            }
            found.map(|p| (p, command.to_owned())).ok_or_else(not_found)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RpcError;
    use agent_common::error::ErrorKind;
    use std::os::unix::fs::symlink;

    fn safe(name: &str) -> String {
        lookup_safe_path(name)
            .unwrap_or_else(|| panic!("{name} not in {SAFE_PATH}"))
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn command_syntax_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let plain = plain.to_str().unwrap();
        let d = dir.path().to_str().unwrap();
        let open = CommandPolicy::new(None);
        for (cmd, kind) in [
            ("", ErrorKind::PolicyDenied),
            ("tr\0ue", ErrorKind::PolicyDenied),
            ("./true", ErrorKind::PolicyDenied),
            ("bin/true", ErrorKind::PolicyDenied),
            ("/usr/bin/../bin/true", ErrorKind::PolicyDenied),
            ("..", ErrorKind::PolicyDenied),
            ("no-such-command-kvm", ErrorKind::NotFound),
            ("/no/such/command", ErrorKind::NotFound),
            (plain, ErrorKind::SpawnFailed),
            (d, ErrorKind::SpawnFailed),
        ] {
            let e = open.resolve(cmd).unwrap_err();
            assert_eq!(e.kind(), kind, "{cmd:?}: {e}");
        }
        let (path, argv0) = open.resolve("true").unwrap();
        assert_eq!(path, PathBuf::from(safe("true")));
        assert_eq!(argv0, "true");
        let (path, argv0) = open.resolve("//bin/./true").unwrap();
        assert_eq!(path, PathBuf::from("/bin/true"));
        assert_eq!(argv0, "//bin/./true");
    }

    #[test]
    fn whitelist_bare_and_absolute_entries() {
        let true_path = safe("true");
        let echo_path = safe("echo");
        let list = vec!["true".to_owned(), echo_path.clone()];
        let policy = CommandPolicy::new(Some(&list));
        assert!(policy.is_restricted());
        assert_eq!(policy.resolve("true").unwrap().0, PathBuf::from(&true_path));
        assert_eq!(
            policy.resolve(&true_path).unwrap().0,
            PathBuf::from(&true_path)
        );
        assert_eq!(policy.resolve("echo").unwrap().0, PathBuf::from(&echo_path));
        assert_eq!(
            policy.resolve(&echo_path).unwrap().0,
            PathBuf::from(&echo_path)
        );
        for cmd in ["false", "sh", "/bin/sh", "no-such-command-kvm"] {
            let e = policy.resolve(cmd).unwrap_err();
            assert!(
                matches!(e, PolicyError::CommandNotAllowed { .. }),
                "{cmd}: {e}"
            );
            assert!(e.to_string().contains(WHITELIST_KEY));
        }
        // A whitelisted bare name that is not installed is "not found".
        let list = vec!["no-such-command-kvm".to_owned()];
        let e = CommandPolicy::new(Some(&list))
            .resolve("no-such-command-kvm")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn symlinked_multicall_binaries_do_not_widen_the_whitelist() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let echo = safe("echo");
        symlink(&echo, format!("{d}/ls")).unwrap();
        symlink(&echo, format!("{d}/cat")).unwrap();
        let list = vec![format!("{d}/ls")];
        let policy = CommandPolicy::new(Some(&list));
        let (path, argv0) = policy.resolve(&format!("{d}/ls")).unwrap();
        assert_eq!(path, PathBuf::from(format!("{d}/ls")));
        assert_eq!(argv0, format!("{d}/ls"));
        let e = policy.resolve(&format!("{d}/cat")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied);
        let e = policy.resolve(&echo).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied);
        let e = policy.resolve("echo").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PolicyDenied);
    }
}
